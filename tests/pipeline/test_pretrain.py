"""Pretraining on a LIVECell-style COCO data set, then fine-tuning the folds from its checkpoint.

The synthetic LIVECell copy has what the real one has: the Kaggle layout
(``LIVECell_dataset_2021/annotations/LIVECell/livecell_coco_{train,val}.json``, TIFF images in one
sub-folder per cell line), file names that carry the cell line, one category "cell",
``annotations`` as an id -> annotation object (not a list), polygons, plus a few RLE and crowd
annotations -- and images of another size (80 x 96) than the Kaggle set it fine-tunes on.
"""

from __future__ import annotations

import json
import logging

import cv2
import engine_toys as T
import numpy as np
import pytest
import tifffile
import torch
from conftest import draw_cells, preprocessed_kaggle_set
from pycocotools import mask as mask_utils

from neuroseg import config, models
from neuroseg.data.coco.stream import JSONStreamError, iter_top_level
from neuroseg.evaluation import oof_cache
from neuroseg.paths import Paths
from neuroseg.pipeline import train_folds
from neuroseg.training import checkpoint, loop

LIVE_H, LIVE_W = 80, 96
LINES = {"SHSY5Y": "shsy5y", "A172": "cort"}  # cell line -> how the drawn cells look

TINY = {
    "yolox": ["yolox.size=nano", "yolox.input_size=64", "yolox.score_threshold=0.0"],
    "maskrcnn": ["maskrcnn.backbone=resnet18", "maskrcnn.v2_head=false", "maskrcnn.rpn_post_nms_top_n_train=200",
                 "maskrcnn.rpn_post_nms_top_n_test=100", "maskrcnn.detections_per_image=10",
                 "maskrcnn.box_batch_size_per_image=64", "maskrcnn.score_threshold=0.0"],
    "upernet": ["upernet.encoder=resnet18", "upernet.decoder_channels=16"],
}


def polygon(mask: np.ndarray) -> list[list[float]]:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def write_livecell(root, split: str, n_per_line: int, rng, first_id: int) -> dict:
    """Images and json of one split; returns ``{file name: masks}`` for the checks."""
    live = root / "LIVECell_dataset_2021"
    images, anns, truth = [], {}, {}
    for line, look in LINES.items():
        for k in range(n_per_line):
            image, masks = draw_cells(rng, LIVE_H, LIVE_W, look, n_cells=4)
            name = f"{line}_Phase_{split}_{k}_00d00h00m_1.tif"
            folder = live / "images" / "livecell_train_val_images" / line
            folder.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(folder / name, image)
            image_id = first_id + len(images)
            images.append({"id": image_id, "file_name": name, "width": LIVE_W, "height": LIVE_H})
            for j, m in enumerate(masks):
                if j == 0:  # compressed RLE, counts as str (what pycocotools writes to json)
                    seg = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                    seg = {"size": seg["size"], "counts": seg["counts"].decode("ascii")}
                else:
                    seg = polygon(m)
                ann_id = 1000 * image_id + j
                anns[str(ann_id)] = {"id": ann_id, "image_id": image_id, "segmentation": seg, "iscrowd": 0,
                                     "category_id": 1, "area": int(m.sum()), "bbox": [0, 0, 1, 1]}
            crowd = 1000 * image_id + 99  # skipped, as torchvision's reference does
            anns[str(crowd)] = {"id": crowd, "image_id": image_id, "segmentation": polygon(masks[0]),
                                "iscrowd": 1, "category_id": 1}
            truth[name] = masks
    # annotations before images, and as an object: the streaming reader takes any order
    doc = {"info": {"description": "synthetic LIVECell"}, "annotations": anns, "images": images,
           "categories": [{"id": 1, "name": "cell", "supercategory": "cell"}]}
    path = live / "annotations" / "LIVECell" / f"livecell_coco_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return truth


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Paths with a Kaggle set (3 images of 128 x 160, through the real 01 step, 3 folds) and a
    LIVECell copy (4 train, 2 val TIFFs of 80 x 96) in the data dir."""
    root = tmp_path_factory.mktemp("pretrain")
    rng = np.random.default_rng(0)
    paths = preprocessed_kaggle_set(root, rng)
    truth = write_livecell(root / "data", "train", 2, rng, first_id=1)
    truth |= write_livecell(root / "data", "val", 1, rng, first_id=100)
    return paths, truth


def tiny_config(model: str, *extra: str) -> config.Config:
    t = f"{model}.train"
    return config.load(None, ["device=cpu", "folds.n_folds=3", "data.train_scale=0.5", *TINY[model],
                              f"{t}.max_train_steps_per_epoch=2", f"{t}.batch_size=2", f"{t}.num_workers=0",
                              f"{t}.epochs=1", "pretrain.epochs=1", *extra])


# ---- the streaming json reader ----

def test_stream_reader_matches_json_load_at_any_buffer_size(tmp_path):
    doc = {"info": {"a": [1, {"b": "x}]"}]}, "n": 12345,
           "annotations": {str(i): {"id": i, "segmentation": [[1.5, 2.25, 3e2, 4]], "area": 123456789}
                           for i in range(30)},
           "images": [{"id": i, "file_name": f"x_{i}.tif"} for i in range(3)]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc, indent=1))
    for size in (1, 3, 7, 64, 1 << 20):  # buffer boundaries inside numbers, strings and keys
        got = list(iter_top_level(path, ("annotations", "images", "n"), buf_size=size))
        assert [v for k, v in got if k == "annotations"] == list(doc["annotations"].values()), size
        assert [v for k, v in got if k == "images"] == doc["images"]
        assert [v for k, v in got if k == "n"] == [12345]
    path.write_text(json.dumps(doc)[:-30])
    with pytest.raises(JSONStreamError, match=r"a\.json: malformed JSON"):
        list(iter_top_level(path, ("images",), buf_size=16))
    path.write_text("[1, 2]")
    with pytest.raises(JSONStreamError, match="expected '{'"):
        list(iter_top_level(path, ("images",)))


# ---- index and dataset ----

def test_index_and_dataset_decode_livecell_masks(data):
    from neuroseg.data.coco.dataset import ClassMapping, CocoInstanceDataset
    from neuroseg.data.coco.index import CocoIndex, build_index

    paths, truth = data
    json_path = paths.livecell_json("train")
    db = build_index(json_path, paths.livecell_images, paths.pretrain_index(json_path))
    index = CocoIndex(db)
    assert [im.file_name for im in index.images] == sorted(n for n in truth if "_train_" in n)
    assert index.categories == {1: "cell"}
    assert all(len(index.annotations(im.image_id)) == 4 for im in index.images)  # crowd skipped

    single = CocoInstanceDataset(index, ClassMapping(), scale=1.0)
    for i, im in enumerate(index.images):
        image, target = single[i]
        assert image.shape == (3, LIVE_H, LIVE_W) and target["image_id"] == im.file_name
        masks = target["masks"].numpy().astype(bool)
        want = truth[im.file_name]
        assert masks.shape == want.shape
        assert np.array_equal(masks[0], want[0])  # the RLE annotation: exact
        for got, ref in zip(masks[1:], want[1:]):  # polygons: rasterised outlines
            assert (got & ref).sum() / (got | ref).sum() > 0.7
        assert target["labels"].tolist() == [1] * 4 and int(target["cell_type"]) == 0  # all shsy5y
        assert set(np.unique(target["semantic"].numpy())) <= {0, 1, 2}

    cfg = config.load(None, ["pretrain.class_map=keep", "pretrain.cell_types=[a172=cort, shsy5y=shsy5y]"])
    keep = CocoInstanceDataset(index, ClassMapping.from_config(cfg.pretrain), scale=0.5)
    for i, im in enumerate(index.images):
        image, target = keep[i]
        assert image.shape == (3, LIVE_H // 2, LIVE_W // 2)
        cort = im.file_name.startswith("A172")
        assert target["labels"].tolist() == [3 if cort else 1] * 4
        assert int(target["cell_type"]) == (2 if cort else 0)

    with pytest.raises(ValueError, match="pretrain.cell_types entry 'a172'"):
        ClassMapping.from_config(config.load(None, ["pretrain.cell_types=[a172]"]).pretrain)


def test_index_problems_are_listed_and_an_unchanged_json_is_not_reindexed(data, tmp_path):
    from neuroseg.data.coco.index import CocoIndexError, build_index

    paths, _ = data
    src = paths.livecell_json("val")
    db = tmp_path / "val.sqlite"
    build_index(src, paths.livecell_images, db)
    stamp = db.stat().st_mtime_ns
    build_index(src, paths.livecell_images, db)
    assert db.stat().st_mtime_ns == stamp

    doc = json.loads(src.read_text())
    doc["images"].append({"id": 7, "file_name": "BV2_missing.tif", "width": 96, "height": 80})
    doc["annotations"]["2"] = {"id": 2, "image_id": 7, "segmentation": [[0, 0, 5, 0, 5, 5]]}  # not repeated
    doc["annotations"]["1"] = {"id": 1, "image_id": 12345, "segmentation": [[0, 0, 5, 0, 5, 5]]}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(CocoIndexError) as err:
        build_index(bad, paths.livecell_images, tmp_path / "bad.sqlite")
    msg = str(err.value)
    assert "bad.json: 2 problem(s)" in msg and "'BV2_missing.tif' not found below" in msg
    assert "annotation 1: image_id 12345 is not among the json's images" in msg
    assert not (tmp_path / "bad.sqlite").exists()


# ---- pretrain, then fine-tune the folds from the checkpoint ----

def flat_outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    return torch.cat([v.float().reshape(-1) for d in out for v in d.values() if torch.is_tensor(v)])


@pytest.mark.parametrize("model_name", ["yolox", "maskrcnn", "upernet"])
def test_pretrain_then_finetune_starts_from_the_checkpoint(data, model_name, monkeypatch):
    from neuroseg.pipeline.pretrain import load_pretrained, pretrain_model

    paths, _ = data
    cfg = tiny_config(model_name)
    summary = pretrain_model(cfg, paths, model_name)
    best = paths.pretrain_best(model_name)
    assert summary["skipped"] is False and best.is_file() and paths.pretrain_history(model_name).is_file()
    assert pretrain_model(cfg, paths, model_name)["skipped"] is True

    # weights really loaded: outputs equal the checkpoint's model and differ from a fresh one
    x = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(cfg.seed)
    fresh = models.build(model_name, cfg)
    torch.manual_seed(cfg.seed)
    loaded = models.build(model_name, cfg)
    load_pretrained(loaded, cfg, paths, model_name)
    ref = checkpoint.load_for_inference(best)
    assert torch.equal(flat_outputs(loaded, x), flat_outputs(ref, x))
    a, b = flat_outputs(loaded, x), flat_outputs(fresh, x)
    assert a.shape != b.shape or not torch.allclose(a, b)

    # the fold trainer hands loop.fit the pretrained weights, and its config hash says so
    seen = {}
    real_fit = loop.fit

    def spy(model, *args, **kw):
        seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        return real_fit(model, *args, **kw)

    monkeypatch.setattr(train_folds.loop, "fit", spy)
    tuned = tiny_config(model_name, "pretrain.enabled=true")
    result = train_folds.train_fold(tuned, paths, model_name, 0)
    ckpt = checkpoint.load(best)["model"]
    assert all(torch.equal(seen["state"][k], ckpt[k]) for k in ckpt)
    assert result["config_hash"] == oof_cache.fold_config_hash(tuned, paths, model_name)
    assert result["config_hash"] != oof_cache.fold_config_hash(cfg, paths, model_name)
    assert np.isfinite(result["best_metric"])


def test_train_model_pretrains_first_a_lone_fold_names_the_command(data, caplog):
    paths, _ = data
    cfg = tiny_config("upernet", "pretrain.enabled=true", "folds.train_folds=[1]")
    fresh = Paths(paths.data_dir, paths.output_dir / "elsewhere")
    for p in (paths.folds_csv, paths.clean_train_csv):  # the 01 outputs, no pretrain dir
        target = fresh.output_dir / p.relative_to(paths.output_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    with pytest.raises(FileNotFoundError, match="python -m neuroseg pretrain upernet"):
        train_folds.train_fold(cfg, fresh, "upernet", 1)
    (summary,) = train_folds.train_model(cfg, fresh, "upernet")
    assert fresh.pretrain_best("upernet").is_file() and summary["fold"] == 1
    # a best.pt brought without its data (an offline notebook) is used as it is
    moved = tiny_config("upernet", "pretrain.enabled=true", "folds.train_folds=[1]",
                        "pretrain.train_json=nowhere.json")
    with caplog.at_level(logging.WARNING, logger="neuroseg"):
        (again,) = train_folds.train_model(moved, fresh, "upernet")
    assert again["skipped"] is True and "nowhere.json not found" in caplog.text


def test_pretrain_cli(data, tmp_path, capsys):
    from neuroseg.cli import main

    paths, _ = data
    common = ["--data-dir", str(paths.data_dir), "--output-dir", str(tmp_path)]
    sets = [a for o in ["device=cpu", *TINY["upernet"], "upernet.train.max_train_steps_per_epoch=1",
                        "upernet.train.num_workers=0", "pretrain.epochs=1", "pretrain.max_val_images=1"]
            for a in ("--set", o)]
    assert main(["pretrain", "upernet", *common, *sets]) == 0
    assert (tmp_path / "pretrain" / "upernet" / "best.pt").is_file()
    assert main(["pretrain", "upernet", *common, *sets, "--set", "pretrain.train_json=nowhere.json"]) == 2
    assert "COCO json not found: nowhere.json" in capsys.readouterr().err


# ---- skip, resume, start afresh ----

class CocoToy(T.ToySegmenter):
    """The engine toy without its image-number metric (COCO image ids are file names)."""

    def score_predictions(self, preds, targets):
        return [{"score": float((p["probs"].argmax(0) == t["semantic"]).float().mean())}
                for p, t in zip(preds, targets)]


def toy_pretrain_config(*extra: str) -> config.Config:
    return config.load(None, ["device=cpu", "data.train_scale=0.5", "upernet.train.batch_size=2",
                              "upernet.train.num_workers=0", "upernet.train.max_train_steps_per_epoch=1",
                              "pretrain.epochs=2", "pretrain.max_val_images=1", *extra])


@pytest.fixture()
def own_output(data, tmp_path) -> Paths:
    """The module's LIVECell copy, with an output dir of this test's own."""
    paths, _ = data
    return Paths(paths.data_dir, tmp_path / "out")


@pytest.fixture()
def epochs_run(monkeypatch) -> list[int]:
    """The epochs each ``loop.fit`` of the pretraining runs (it takes no ``on_epoch_end`` itself)."""
    seen: list[int] = []
    real_fit = loop.fit

    def fit(*args, **kw):
        return real_fit(*args, **kw, on_epoch_end=lambda e, row: seen.append(e))

    monkeypatch.setattr(loop, "fit", fit)
    return seen


def pretrain_toy(cfg, paths, **kw):
    from neuroseg.pipeline.pretrain import pretrain_model

    return pretrain_model(cfg, paths, "upernet", model_factory=CocoToy, **kw)


def test_pretrain_of_the_same_config_is_skipped(own_output, epochs_run):
    cfg = toy_pretrain_config()
    first = pretrain_toy(cfg, own_output)
    best = own_output.pretrain_best("upernet")
    stamp, content = best.stat().st_mtime_ns, best.read_bytes()
    assert first["skipped"] is False and epochs_run == [1, 2]
    again = pretrain_toy(cfg, own_output)
    assert again["skipped"] is True and epochs_run == [1, 2]
    assert again["config_hash"] == first["config_hash"]
    assert again["best_epoch"] == first["best_epoch"] and again["best_metric"] == first["best_metric"]
    assert best.stat().st_mtime_ns == stamp and best.read_bytes() == content
    # fold-only settings (the fold epochs, workers) are not what the pretrained weights depend on
    fold_only = toy_pretrain_config("upernet.train.epochs=7", "upernet.train.num_workers=1")
    assert pretrain_toy(fold_only, own_output)["skipped"] is True


def test_killed_pretrain_resumes_from_last_pt(own_output, monkeypatch, caplog):
    cfg = toy_pretrain_config()
    real_fit = loop.fit

    def killed_fit(*args, **kw):
        def kill(epoch, row):
            if epoch == 1:
                raise KeyboardInterrupt("simulated kill")
        return real_fit(*args, **kw, on_epoch_end=kill)

    monkeypatch.setattr(loop, "fit", killed_fit)
    with pytest.raises(KeyboardInterrupt):
        pretrain_toy(cfg, own_output)
    d = own_output.pretrain_model_dir("upernet")
    assert checkpoint.load(own_output.pretrain_last("upernet"))["epoch"] == 1
    assert not (d / "done.json").exists() and (d / "manifest.json").is_file()

    epochs = []
    monkeypatch.setattr(loop, "fit", lambda *a, **kw: real_fit(*a, **kw, on_epoch_end=lambda e, r: epochs.append(e)))
    with caplog.at_level(logging.INFO, logger="neuroseg"):
        summary = pretrain_toy(cfg, own_output)
    assert epochs == [2] and summary["skipped"] is False
    assert "training afresh" not in caplog.text
    assert "upernet pretrain: resumed from" in caplog.text and "at epoch 2/2" in caplog.text
    assert len(checkpoint.load(own_output.pretrain_last("upernet"))["history"]) == 2
    done = json.loads((d / "done.json").read_text())
    assert done["config_hash"] == summary["config_hash"] and done["epochs"] == 2


def test_a_changed_pretrain_setting_trains_afresh(own_output, epochs_run, caplog):
    first = pretrain_toy(toy_pretrain_config(), own_output)
    with caplog.at_level(logging.INFO, logger="neuroseg"):
        changed = pretrain_toy(toy_pretrain_config("pretrain.epochs=3"), own_output)
    assert changed["config_hash"] != first["config_hash"] and changed["skipped"] is False
    # from epoch 1 again: the old last.pt was removed (fit would refuse its hash otherwise)
    assert epochs_run == [1, 2, 1, 2, 3]
    assert (f"upernet pretrain: training afresh (config changed: {first['config_hash']} -> "
            f"{changed['config_hash']})") in caplog.text
    d = own_output.pretrain_model_dir("upernet")
    assert json.loads((d / "manifest.json").read_text()) == {"model": "upernet",
                                                             "config_hash": changed["config_hash"]}
    assert checkpoint.load(own_output.pretrain_last("upernet"))["config_hash"] == changed["config_hash"]
    assert len(checkpoint.load(own_output.pretrain_last("upernet"))["history"]) == 3


def test_a_changed_model_train_setting_trains_afresh(own_output, epochs_run, caplog):
    first = pretrain_toy(toy_pretrain_config(), own_output)
    with caplog.at_level(logging.INFO, logger="neuroseg"):
        changed = pretrain_toy(toy_pretrain_config("upernet.train.lr=0.02"), own_output)
    assert changed["config_hash"] != first["config_hash"] and epochs_run == [1, 2, 1, 2]
    assert "upernet pretrain: training afresh (config changed" in caplog.text


def test_force_pretrains_again(own_output, epochs_run, caplog):
    cfg = toy_pretrain_config()
    first = pretrain_toy(cfg, own_output)
    stamp = own_output.pretrain_best("upernet").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="neuroseg"):
        again = pretrain_toy(cfg, own_output, force=True)
    assert again["skipped"] is False and epochs_run == [1, 2, 1, 2]
    assert again["config_hash"] == first["config_hash"]
    assert "upernet pretrain: training afresh (--force)" in caplog.text
    assert own_output.pretrain_best("upernet").stat().st_mtime_ns != stamp
    # same seed, same data: the retrained weights are the first run's
    assert again["best_metric"] == first["best_metric"]
