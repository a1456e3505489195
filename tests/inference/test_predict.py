"""Test-time inference: flip TTA un-flips, coordinates map back, streaming is lazy, checkpoints load.

The TTA tests use the equivariant stubs of ``predict_stubs.py`` (exact answers, milliseconds); the
submission and CLI tests use real but tiny, untrained models saved as ``best.pt`` the way the
engine saves them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from predict_stubs import StubDetector, StubSegmenter, asymmetric_image, bright_box, save_untrained_fold_models

from neuroseg.config import CELL_TYPES
from neuroseg.inference import tta
from neuroseg.inference.fold_models import FoldEnsemble, iter_predictions, load_trained_models
from neuroseg.inference.measurements import MEASUREMENT_COLUMNS
from neuroseg.paths import Paths

# asymmetric_image's bright rectangle in original pixels, xyxy edges
RECT = np.array([[20, 4, 36, 12]], dtype=np.float32)
# Mask grid cells that sample inside the rectangle in every view. The mask grid spans coordinates
# x0..x1 with pixel i at i (Mask R-CNN's geometry, box_masks), so its far edge samples one pixel
# past the rectangle, which a mirrored view sees at its near edge instead: after the un-flip's
# one-pixel shift the views agree everywhere but on that pixel (8 x 4 input px: 3.5 x 7 cells).
INNER = (slice(None), slice(0, 21), slice(0, 24))


# ---- tta.py ----

def test_flip_boxes_mirrors_like_the_image():
    img = torch.zeros(3, 10, 16)
    img[:, 2:5, 1:4] = 1.0  # box [1, 2, 4, 5]
    box = bright_box(img)
    for view in tta.VIEWS:
        flipped = bright_box(tta.flip_image(img, view))
        assert torch.equal(tta.flip_boxes(box, view, 10, 16), flipped), view
        # a flip is its own inverse
        assert torch.equal(tta.flip_boxes(flipped, view, 10, 16), box), view
    assert tta.views(False) == ("none",)
    with pytest.raises(ValueError, match="valid"):
        tta.flip_image(img, "rot90")


# ---- FoldEnsemble with stubs ----

def stub_ensemble(tta_flips: bool, folds: int = 1, scale: float = 0.5) -> FoldEnsemble:
    return FoldEnsemble({"yolox": [StubDetector() for _ in range(folds)],
                         "maskrcnn": [StubDetector(masks=True) for _ in range(folds)],
                         "upernet": [StubSegmenter() for _ in range(folds)]},
                        scale=scale, tta_flips=tta_flips)


def test_boxes_map_back_to_original_coordinates_in_every_view():
    image = asymmetric_image()
    # the stub really sees a different box on a flipped input, so un-flipping is what's tested
    x = torch.from_numpy(image).float().div(255).expand(3, -1, -1)
    assert not torch.equal(bright_box(tta.flip_image(x, "hflip")), bright_box(x))
    pred = stub_ensemble(tta_flips=True, folds=2).predict_image(image, "a")
    assert (pred.image_id, pred.height, pred.width) == ("a", 40, 60)
    assert len(pred.yolox) == len(pred.maskrcnn) == 2 * 3  # folds x views
    for boxset in pred.yolox + pred.maskrcnn:
        np.testing.assert_array_equal(boxset.boxes, RECT)  # input px / 0.5
        assert boxset.labels.tolist() == [2]


def test_mask_probs_and_upernet_probs_are_unflipped():
    image = asymmetric_image()
    plain = stub_ensemble(tta_flips=False).predict_image(image)
    flips = stub_ensemble(tta_flips=True).predict_image(image)
    ref = plain.maskrcnn_mask_probs[0]
    assert ref.shape == (1, 28, 28)
    assert not np.allclose(ref, ref[..., ::-1], atol=1e-3)  # asymmetric: a missed un-flip would show
    assert not np.allclose(ref, ref[:, ::-1], atol=1e-3)
    for m in flips.maskrcnn_mask_probs:
        np.testing.assert_allclose(m[INNER], ref[INNER], atol=2e-3)  # fp16 in the OOF format
    assert plain.upernet_probs.shape == (3, 40, 60) and plain.upernet_probs.dtype == np.float32
    np.testing.assert_allclose(flips.upernet_probs, plain.upernet_probs, atol=2e-3)
    np.testing.assert_allclose(flips.upernet_cell_type_probs, [0.2, 0.5, 0.3], atol=1e-6)
    # the probabilities are those of the image itself: bright rectangle = interior
    assert flips.upernet_probs[1, 8, 28] > 0.5 > flips.upernet_probs[1, 30, 5]


def test_mask_fn_averages_unflipped_views():
    image = asymmetric_image()
    ens_plain, ens_flips = stub_ensemble(False), stub_ensemble(True)
    got = ens_flips.mask_fn(image)(RECT, np.array([2]))
    want = ens_plain.mask_fn(image)(RECT, np.array([2]))
    assert got.shape == (1, 28, 28)
    np.testing.assert_allclose(got[INNER], want[INNER], atol=1e-4)
    assert not np.allclose(want, want[..., ::-1], atol=1e-3)
    assert ens_flips.mask_fn(image)(np.zeros((0, 4)), np.zeros(0)).shape == (0, 28, 28)


def test_mask_fn_runs_the_backbone_once_per_image():
    """The ensemble's tuning asks an image's mask function for new boxes many times: the features
    are computed on the first call only, kept (``nbytes``), and give the masks a fresh call gives."""
    image = asymmetric_image()
    ens = stub_ensemble(tta_flips=True, folds=2)
    fn = ens.mask_fn(image)
    assert fn.nbytes == 0  # nothing computed before the first call
    first = fn(RECT, np.array([2]))
    again = fn(RECT + 1, np.array([1]))
    assert [m.feature_calls for m in ens.models["maskrcnn"]] == [1, 1]
    assert fn.nbytes == 2 * 3 * (3 * 20 * 30) * 4  # folds x views x the stub's "features": its input at scale 0.5
    np.testing.assert_array_equal(first, ens.mask_fn(image)(RECT, np.array([2])))
    np.testing.assert_array_equal(again, ens.mask_fn(image)(RECT + 1, np.array([1])))


def test_one_forward_per_fold_covers_every_view_and_image():
    ens = stub_ensemble(tta_flips=True)
    images = [asymmetric_image(), np.full((40, 60), 30, np.uint8)]  # the second has no cell
    preds = ens.predict_batch(images, ["a", "b"])
    assert ens.models["yolox"][0].calls == 1
    assert [len(b.boxes) for b in preds[0].yolox] == [1, 1, 1]
    assert [len(b.boxes) for b in preds[1].yolox] == [0, 0, 0]


def test_detection_features_serve_the_mask_heads():
    """One batch of two images: each fold model's backbone runs once for the whole batch, and the
    mask heads that come with each image give the masks a fresh ``mask_fn`` gives."""
    ens = stub_ensemble(tta_flips=True, folds=2)
    images = [asymmetric_image(), np.roll(asymmetric_image(), 5, axis=1)]
    outs = ens.predict_with_heads(images, ["a", "b"], masks=False)
    assert [m.feature_calls for m in ens.models["maskrcnn"]] == [1, 1]
    for (pred, heads), image in zip(outs, images):
        assert pred.maskrcnn_mask_probs == [] and len(pred.maskrcnn) == 2 * 3  # folds x views
        got = heads(RECT, np.array([2]))
        assert [m.feature_calls for m in ens.models["maskrcnn"]] == [1, 1]  # nothing recomputed
        np.testing.assert_array_equal(got, stub_ensemble(True, folds=2).mask_fn(image)(RECT, np.array([2])))
    assert not np.array_equal(outs[0][1](RECT, np.array([2])), outs[1][1](RECT, np.array([2])))
    with_masks = ens.predict_batch(images, ["a", "b"])
    assert [len(m) for m in with_masks[0].maskrcnn_mask_probs] == [1] * 6
    np.testing.assert_array_equal(with_masks[1].maskrcnn[0].boxes, outs[1][0].maskrcnn[0].boxes)


def test_iter_predictions_is_lazy(tmp_path):
    """A generator: the second file is not even read before the first prediction is consumed, so
    memory holds one batch, never the whole test set."""
    good, bad = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(asymmetric_image()).save(good)
    bad.write_bytes(b"not a png")
    it = iter_predictions(stub_ensemble(False), [good, bad], batch_size=1)
    path, image, pred, heads = next(it)
    assert path == good and pred.image_id == "a" and image.shape == (40, 60) and heads is not None
    with pytest.raises(Exception, match="b.png"):
        next(it)


def test_missing_checkpoints_are_named_with_the_script(tmp_path):
    from neuroseg import config

    cfg = config.load(None, ["folds.n_folds=2"])
    with pytest.raises(FileNotFoundError) as e:
        load_trained_models(cfg, Paths(tmp_path, tmp_path / "out"), ["maskrcnn"], torch.device("cpu"))
    msg = str(e.value)
    assert "fold0/best.pt" in msg and "fold1/best.pt" in msg and "03_train_maskrcnn.py" in msg


# ---- make_submission with stubs: exact expectations ----

def kaggle_test_dir(root, images: dict[str, np.ndarray]) -> Paths:
    paths = Paths(root / "data", root / "out")
    paths.test_images.mkdir(parents=True)
    for image_id, image in images.items():
        Image.fromarray(image).save(paths.test_images / f"{image_id}.png")
    return paths


def write_default_params(paths: Paths) -> None:
    from neuroseg.ensemble.params import EnsembleParams
    from neuroseg.utils.atomic_io import atomic_write_json

    # the layout 05_ensemble.py writes (report.run_ensemble); only "params" is read back
    atomic_write_json(paths.ensemble_params, {"format": 1, "params": EnsembleParams().to_json(), "scores": {}})


def read_rows(path) -> dict[str, list[str]]:
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(df.columns) == ["id", "predicted"]
    out: dict[str, list[str]] = {}
    for image_id, predicted in zip(df["id"], df["predicted"]):
        out.setdefault(image_id, []).append(predicted)
    return out


@pytest.fixture
def stub_test_set(tmp_path):
    """A cell image and an image where nothing is detected, with default ensemble params."""
    paths = kaggle_test_dir(tmp_path, {"cells": asymmetric_image(), "blank": np.full((40, 60), 30, np.uint8)})
    write_default_params(paths)
    return paths


@pytest.mark.parametrize("only", [None, "maskrcnn", "upernet"])
def test_make_submission_rows_match_the_image(stub_test_set, only):
    from neuroseg import config
    from neuroseg.pipeline.make_submission import make_submission
    from neuroseg.structures import rle

    paths = stub_test_set
    cfg = config.load(None, ["submission.tta_flips=true"])
    out = make_submission(cfg, paths, only=only, folds=stub_ensemble(True, scale=0.5))
    assert out == (paths.submission_csv if only is None else paths.output_dir / f"submission_{only}.csv")
    if only is not None:
        assert not paths.submission_csv.exists()  # a single model never overwrites the ensemble's file
    rows = read_rows(out)
    assert sorted(rows) == ["blank", "cells"]
    assert rows["blank"] == [""]  # nothing detected: one row, empty prediction
    assert len(rows["cells"]) == 1
    mask = rle.decode(rows["cells"][0], (40, 60))
    rect = np.zeros((40, 60), bool)
    rect[4:12, 20:36] = True
    assert (mask & rect).sum() / (mask | rect).sum() > 0.8
    assert not list(paths.output_dir.glob(".*unvalidated*"))  # the temporary file was moved


def test_make_submission_refuses_an_invalid_csv(stub_test_set, monkeypatch):
    """Overlapping masks break the scorer's rules: the CSV is not put in place, the error lists why."""
    from neuroseg import config
    from neuroseg.pipeline.make_submission import SubmissionError, make_submission
    from neuroseg.structures import label_image

    monkeypatch.setattr(label_image, "label_to_rles", lambda label: ["1 5", "3 5"])
    with pytest.raises(SubmissionError, match="overlap"):
        make_submission(config.load(None, []), stub_test_set, folds=stub_ensemble(False))
    assert not stub_test_set.submission_csv.exists()


def test_make_submission_needs_tuned_params(stub_test_set):
    from neuroseg import config
    from neuroseg.pipeline.make_submission import make_submission

    stub_test_set.ensemble_params.write_text('{"format": 1, "params": {"ensemble": {}}}')
    with pytest.raises(ValueError, match="params.json.*rerun 05_ensemble.py"):
        make_submission(config.load(None, []), stub_test_set, folds=stub_ensemble(False))
    stub_test_set.ensemble_params.unlink()
    with pytest.raises(FileNotFoundError, match="run 05_ensemble.py first"):
        make_submission(config.load(None, []), stub_test_set, folds=stub_ensemble(False))


# ---- real (tiny, untrained) models from fake best.pt files: 06 script and predict CLI ----

TINY = ["device=cpu", "folds.n_folds=2", "folds.train_folds=[0]", "data.train_scale=1.0",
        "yolox.size=nano", "yolox.input_size=64", "maskrcnn.backbone=resnet18", "maskrcnn.v2_head=false",
        "maskrcnn.rpn_post_nms_top_n_test=50",
        "maskrcnn.detections_per_image=3", "upernet.encoder=resnet18", "upernet.decoder_channels=16",
        "submission.tta_flips=true"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Fold-0 ``best.pt`` of each model as the engine writes it, default params, a test folder."""
    from neuroseg import config

    root = tmp_path_factory.mktemp("trained")
    cfg = config.load(None, TINY)
    rng = np.random.default_rng(0)
    paths = kaggle_test_dir(root, {"t1": rng.integers(0, 255, (32, 40), dtype=np.uint8),
                                   "t2": asymmetric_image(32, 40)})
    save_untrained_fold_models(cfg, paths)
    write_default_params(paths)
    return paths


def script_args(paths: Paths, *extra: str) -> list[str]:
    return ["--data-dir", str(paths.data_dir), "--output-dir", str(paths.output_dir),
            *[a for o in TINY for a in ("--set", o)], *extra]


def test_06_script_writes_valid_submissions(trained):
    import importlib.util

    from neuroseg.structures.submission_csv import validate_submission

    spec = importlib.util.spec_from_file_location("make_submission", "06_make_submission.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(script_args(trained)) == 0
    assert validate_submission(trained.submission_csv, trained.test_images) == []
    assert sorted(read_rows(trained.submission_csv)) == ["t1", "t2"]
    assert script.main(script_args(trained, "--only", "maskrcnn")) == 0
    single = trained.output_dir / "submission_maskrcnn.csv"
    assert validate_submission(single, trained.test_images) == []
    # a fold the config asks for but nobody trained: exit 1, naming the checkpoint and the script
    assert script.main(script_args(trained, "--set", "folds.train_folds=[0,1]")) == 1


def test_predict_cli_mixed_png_and_tiff(trained, tmp_path, capsys):
    import tifffile

    from neuroseg.cli import main

    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(asymmetric_image(32, 40)).save(src / "a.png")
    tifffile.imwrite(src / "b.tif", asymmetric_image(36, 44))  # another size: its own forward pass
    (src / "notes.txt").write_text("ignored")
    out = tmp_path / "pred"
    argv = ["predict", str(src), "--out", str(out), "--output-dir", str(trained.output_dir),
            *[a for o in TINY for a in ("--set", o)], "--pixel-size", "0.5"]
    assert main(argv) == 0
    assert sorted(read_rows(out / "predictions.csv")) == ["a", "b"]
    cells = pd.read_csv(out / "measurements.csv", dtype={"image": str})
    summary = pd.read_csv(out / "summary.csv", dtype={"image": str}).set_index("image")
    assert tuple(cells.columns[:len(MEASUREMENT_COLUMNS)]) == MEASUREMENT_COLUMNS and "area_um2" in cells
    assert list(summary.index) == ["a", "b"]
    for stem, shape in (("a", (32, 40)), ("b", (36, 44))):
        label = np.array(Image.open(out / "labels" / f"{stem}.png"))
        assert label.shape == shape and label.dtype == np.uint16
        overlay = np.array(Image.open(out / "overlays" / f"{stem}.png"))
        assert overlay.shape == (*shape, 3)
        mine = cells[cells.image == stem]  # one row per cell of the label image, its area in px and µm²
        assert sorted(mine.label) == sorted(set(np.unique(label)) - {0})
        assert [int((label == k).sum()) for k in mine.label] == list(mine.area_px)
        np.testing.assert_allclose(mine.area_um2.to_numpy(float), mine.area_px.to_numpy(float) * 0.25)
        assert summary.loc[stem, "cell_count"] == len(mine)
        assert summary.loc[stem, "covered_fraction"] == pytest.approx((label > 0).mean())
        assert summary.loc[stem, "cell_type"] in CELL_TYPES and 0 < summary.loc[stem, "cell_type_prob"] <= 1
    with pytest.raises(SystemExit):  # argparse's usage error, exit 2
        main(argv[:-2] + ["--pixel-size", "-1"])
    assert "--pixel-size must be > 0 µm, got -1.0" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing"), "--out", str(out),
                 "--output-dir", str(trained.output_dir)]) == 2


def test_predict_folder_measures_every_cell(tmp_path):
    """The stub models find the bright rectangle (rows 4-11, cols 20-35) of each image: its row in
    measurements.csv has the rectangle's area, centroid and box; summary.csv counts it."""
    from neuroseg.ensemble.fusion import EnsembleParams
    from neuroseg.inference.predict import predict_folder

    src = tmp_path / "images"
    src.mkdir()
    files = [src / "a.png", src / "b.png"]
    Image.fromarray(asymmetric_image()).save(files[0])
    Image.fromarray(np.roll(asymmetric_image(), 10, axis=1)).save(files[1])
    out = tmp_path / "out"
    assert predict_folder(files, stub_ensemble(False, scale=1.0), EnsembleParams.defaults(), out, pixel_size=2.0) == 2
    cells = pd.read_csv(out / "measurements.csv", dtype={"image": str})
    assert list(cells.image) == ["a", "b"] and list(cells.label) == [1, 1]
    for row, shift in zip(cells.itertuples(), (0, 10)):
        label = np.array(Image.open(out / "labels" / f"{row.image}.png"))
        ys, xs = np.nonzero(label == 1)
        assert row.area_px == len(ys) > 0.8 * 8 * 16  # the 8 x 16 rectangle, give or take its edge
        assert (row.bbox_min_row, row.bbox_min_col, row.bbox_max_row, row.bbox_max_col) == (
            ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
        assert abs(row.centroid_row_px - 7.5) < 1 and abs(row.centroid_col_px - (27.5 + shift)) < 1
        assert row.area_um2 == row.area_px * 4 and row.score > 0
    assert (out / "measurements" / "a.csv").is_file()
    summary = pd.read_csv(out / "summary.csv", dtype={"image": str})
    assert list(summary.cell_count) == [1, 1] and list(summary.mean_area_px) == list(cells.area_px)


def test_predict_folder_goes_on_past_unreadable_images(tmp_path):
    """A truncated PNG and a 3-page TIFF between good images: the good ones are segmented and
    written, the failures listed with the file and why."""
    import tifffile

    from neuroseg.ensemble.fusion import EnsembleParams
    from neuroseg.inference.predict import predict_folder

    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(asymmetric_image()).save(src / "a.png")
    Image.fromarray(asymmetric_image()).save(src / "b.png")
    (src / "b.png").write_bytes((src / "b.png").read_bytes()[:60])  # truncated
    tifffile.imwrite(src / "c.tif", np.stack([asymmetric_image()] * 3), photometric="minisblack")  # 3 pages
    Image.fromarray(asymmetric_image()).save(src / "d.png")
    files = sorted(src.iterdir())
    failures: list = []
    out = tmp_path / "out"
    assert predict_folder(files, stub_ensemble(False, scale=1.0), EnsembleParams.defaults(), out,
                          batch_size=4, failures=failures) == 2
    assert [p.name for p, _ in failures] == ["b.png", "c.tif"]
    assert "unreadable" in failures[0][1] and "3-page" in failures[1][1]
    assert sorted(read_rows(out / "predictions.csv")) == ["a", "d"]
    assert sorted(p.stem for p in (out / "labels").iterdir()) == ["a", "d"]
    assert list(pd.read_csv(out / "summary.csv").image) == ["a", "d"]
    with pytest.raises(Exception, match="b.png"):  # without a failures list the first one stops the run
        predict_folder(files, stub_ensemble(False, scale=1.0), EnsembleParams.defaults(), tmp_path / "o2")


def test_predict_cli_exits_non_zero_naming_the_unreadable_files(trained, tmp_path, capsys):
    import tifffile

    from neuroseg.cli import main

    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(asymmetric_image(32, 40)).save(src / "good.png")
    (src / "cut.png").write_bytes((src / "good.png").read_bytes()[:50])
    tifffile.imwrite(src / "stack.tif", np.stack([asymmetric_image(32, 40)] * 3), photometric="minisblack")
    out = tmp_path / "pred"
    argv = ["predict", str(src), "--out", str(out), "--output-dir", str(trained.output_dir),
            *[a for o in TINY for a in ("--set", o)]]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "2 of 3 images" in err and "cut.png: " in err and "stack.tif: " in err and "3-page" in err
    assert sorted(read_rows(out / "predictions.csv")) == ["good"] and (out / "labels" / "good.png").is_file()


def test_skip_existing_redoes_only_the_unfinished_images(tmp_path):
    """A run killed during its third image (that image's measurement CSV, the done-mark, never
    written): the rerun with skip_existing segments that image only and writes the same tables."""
    from neuroseg.ensemble.fusion import EnsembleParams
    from neuroseg.inference.predict import predict_folder

    src = tmp_path / "images"
    src.mkdir()
    for k, name in enumerate("abc"):
        Image.fromarray(np.roll(asymmetric_image(), 4 * k, axis=1)).save(src / f"{name}.png")
    files = sorted(src.iterdir())
    out = tmp_path / "out"
    full = stub_ensemble(False, scale=1.0)
    assert predict_folder(files, full, EnsembleParams.defaults(), out) == 3
    assert full.models["yolox"][0].calls == 3
    first = {f: (out / f).read_bytes() for f in ("predictions.csv", "measurements.csv", "summary.csv")}
    (out / "measurements" / "c.csv").unlink()
    (out / "predictions.csv").unlink()
    again = stub_ensemble(False, scale=1.0)
    assert predict_folder(files, again, EnsembleParams.defaults(), out, skip_existing=True) == 3
    assert again.models["yolox"][0].calls == 1  # c only
    assert {f: (out / f).read_bytes() for f in first} == first
    redo = stub_ensemble(False, scale=1.0)
    predict_folder(files, redo, EnsembleParams.defaults(), out)  # without the flag: everything again
    assert redo.models["yolox"][0].calls == 3


def test_predict_folder_writes_tiff_labels_and_rois(tmp_path):
    import tifffile
    from roifile import roiread

    from neuroseg.ensemble.fusion import EnsembleParams
    from neuroseg.inference.label_files import rois_to_label
    from neuroseg.inference.predict import predict_folder

    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(asymmetric_image()).save(src / "a.png")
    out = tmp_path / "out"
    assert predict_folder([src / "a.png"], stub_ensemble(False, scale=1.0), EnsembleParams.defaults(), out,
                          label_format="tif", save_rois=True) == 1
    label = tifffile.imread(out / "labels" / "a.tif")
    assert label.dtype == np.uint32 and label.shape == (40, 60) and label.max() == 1
    assert not (out / "labels" / "a.png").exists()
    rois = roiread(out / "rois" / "a.zip")
    assert [r.name for r in rois] == ["1"] and np.array_equal(rois_to_label(rois, label.shape), label)
    again = stub_ensemble(False, scale=1.0)  # --skip-existing reads the TIFF back
    predict_folder([src / "a.png"], again, EnsembleParams.defaults(), out, label_format="tif", skip_existing=True)
    assert again.models["yolox"][0].calls == 0 and len(read_rows(out / "predictions.csv")["a"]) == 1


def test_write_outputs_refuses_what_it_cannot_write(tmp_path):
    from neuroseg.inference.predict import write_outputs

    label = np.zeros((4, 5), np.int64)
    with pytest.raises(ValueError, match=r"label format 'jpg'; valid: \['png', 'tif'\]"):
        write_outputs(tmp_path, "a", np.zeros((4, 5), np.uint8), label, label_format="jpg")
    label[0, 0] = 70_000
    with pytest.raises(ValueError, match="a: 70000 instances do not fit a uint16 label PNG .use --label-format tif"):
        write_outputs(tmp_path, "a", np.zeros((4, 5), np.uint8), label)
    write_outputs(tmp_path, "a", np.zeros((4, 5), np.uint8), label, label_format="tif")  # the TIFF holds it
    assert (tmp_path / "labels" / "a.tif").is_file()


def test_mask_heads_need_views_and_features_together():
    from neuroseg.inference.fold_models import MaskHeads

    ens = stub_ensemble(False)
    with pytest.raises(ValueError, match="MaskHeads: pass both views and features, or neither"):
        MaskHeads(ens, asymmetric_image(), views=torch.zeros(1, 3, 20, 30))


def test_predict_cli_plain_flags(trained, tmp_path, capsys):
    from neuroseg.cli import main

    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(asymmetric_image(32, 40)).save(src / "a.png")
    out = tmp_path / "pred"
    argv = ["predict", str(src), "--out", str(out), "--output-dir", str(trained.output_dir),
            *[a for o in TINY for a in ("--set", o)]]
    assert main([*argv, "--device", "cpu", "--batch-size", "2", "--tta", "off", "--label-format", "tif"]) == 0
    assert (out / "labels" / "a.tif").is_file() and not (out / "labels" / "a.png").exists()
    with pytest.raises(SystemExit):
        main([*argv, "--tta", "maybe"])
    assert "--tta: invalid choice: 'maybe'" in capsys.readouterr().err


def test_predict_cli_refuses_two_images_with_one_name(tmp_path, capsys):
    from neuroseg.inference.predict import cli_predict

    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(asymmetric_image()).save(src / "a.png")
    Image.fromarray(asymmetric_image()).save(src / "a.tiff")
    assert cli_predict([str(src), "--out", str(tmp_path / "o"), "--output-dir", str(tmp_path)]) == 2
    assert "share a name: ['a']" in capsys.readouterr().err


def test_predict_folder_gives_16_bit_and_float_copies_the_labels_of_the_8_bit_image(tmp_path):
    """The same cells from a.png, its 16-bit TIFF x 257 and its float TIFF / 255, by the data
    type's range and by percentiles; a 3-page TIFF needs --page."""
    import tifffile

    from neuroseg.ensemble.fusion import EnsembleParams
    from neuroseg.inference.image_input import InputOptions
    from neuroseg.inference.predict import predict_folder

    image = asymmetric_image()
    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(image).save(src / "a.png")
    tifffile.imwrite(src / "a16.tif", image.astype(np.uint16) * 257)
    tifffile.imwrite(src / "af.tif", image.astype(np.float32) / 255)
    tifffile.imwrite(src / "stack.tif", np.stack([np.zeros_like(image), image]), photometric="minisblack")
    files = [src / n for n in ("a.png", "a16.tif", "af.tif")]
    for k, normalize in enumerate(("auto", "off", (1, 99))):
        out = tmp_path / f"out{k}"
        assert predict_folder(files, stub_ensemble(False, scale=1.0), EnsembleParams.defaults(), out,
                              options=InputOptions(normalize=normalize)) == 3
        labels = [np.array(Image.open(out / "labels" / f"{p.stem}.png")) for p in files]
        assert labels[0].max() == 1 and all(np.array_equal(lab, labels[0]) for lab in labels[1:])
    failures: list = []
    predict_folder([src / "stack.tif"], stub_ensemble(False, scale=1.0), EnsembleParams.defaults(),
                   tmp_path / "s", failures=failures)
    assert failures[0][0] == src / "stack.tif" and "a 2-page stack; pass --page 0..1" in failures[0][1]
    predict_folder([src / "stack.tif"], stub_ensemble(False, scale=1.0), EnsembleParams.defaults(),
                   tmp_path / "s1", options=InputOptions(page=1, normalize="off"))
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "s1" / "labels" / "stack.png")), labels[0])


def test_overlay_colours_each_cell_and_outlines_are_its_boundary(tmp_path):
    from neuroseg.inference.predict import cell_colours, overlay, write_outputs

    image = np.full((40, 60), 100, np.uint8)
    label = np.zeros((40, 60), np.int32)
    label[5:15, 5:15], label[20:30, 30:50] = 1, 2
    colours = cell_colours(2)
    assert len({tuple(c) for c in colours[1:]}) == 2  # two cells, two colours
    out = overlay(image, label, caption="")
    np.testing.assert_array_equal(out[5, 5], colours[1])  # boundary pixel: the cell's own colour
    np.testing.assert_array_equal(out[25, 40], np.round(0.75 * 100 + 0.25 * colours[2].astype(float)))  # tinted
    np.testing.assert_array_equal(out[35, 5], [100, 100, 100])  # background untouched
    captioned = overlay(image, label, caption="x: 2 cells")
    assert (captioned[:3, :20] < 100).all() and (captioned[:14] > 200).any()  # dark band, light text
    write_outputs(tmp_path, "x", image, label, save_outlines=True)
    outline = np.array(Image.open(tmp_path / "outlines" / "x.png"))
    assert outline.dtype == np.uint8 and set(np.unique(outline)) == {0, 255}
    assert outline[5, 5] == 255 and outline[10, 10] == 0 and outline[5:15, 5:15].sum() == 255 * 36  # 10x10 ring


def test_predict_cli_input_and_tiling_flags(trained, tmp_path, capsys):
    import tifffile

    from neuroseg.cli import main

    src = tmp_path / "images"
    src.mkdir()
    tifffile.imwrite(src / "z.tif", np.stack([asymmetric_image(32, 40)] * 2).astype(np.uint16) * 257,
                     photometric="minisblack")
    out = tmp_path / "pred"
    argv = ["predict", str(src), "--out", str(out), "--output-dir", str(trained.output_dir),
            *[a for o in TINY for a in ("--set", o)]]
    assert main([*argv, "--page", "1", "--normalize", "1", "99", "--save-outlines", "--tile-above", "0"]) == 0
    assert (out / "outlines" / "z.png").is_file() and (out / "labels" / "z.png").is_file()
    assert main([*argv, "--out", str(tmp_path / "p2")]) == 1  # no --page: reported, named
    assert "z.tif" in capsys.readouterr().err
    for bad, message in ((["--normalize", "1"], "expected LOW HIGH percentiles"),
                         (["--normalize", "99", "1"], "0 <= LOW < HIGH <= 100"),
                         (["--tile-margin", "999"], "tile margin must be within 0..130"),
                         (["--tile-size", "40", "704"], "tiles must be >= 64 px on a side")):
        with pytest.raises(SystemExit):
            main([*argv, *bad])
        assert message in capsys.readouterr().err
