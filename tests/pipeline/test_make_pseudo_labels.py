"""Pseudo-labels: thresholds filter them, they join training splits only, held-out images leave
every split. The ensemble runs on the equivariant stubs of ``predict_stubs.py`` (milliseconds);
the CLI test uses tiny untrained models saved as fold ``best.pt`` files."""

from __future__ import annotations

import shutil

import engine_toys as T
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from predict_stubs import StubDetector, StubSegmenter, asymmetric_image

from neuroseg import config
from neuroseg.config import PseudoLabelConfig
from neuroseg.data.pseudo_labels import PSEUDO_COLUMNS, holdout_ids, read_pseudo_labels
from neuroseg.data.records import DataError
from neuroseg.evaluation import oof_cache
from neuroseg.inference.fold_models import FoldEnsemble
from neuroseg.pipeline import train_folds
from neuroseg.pipeline.make_pseudo_labels import collect_images, filter_instances, make_pseudo_labels
from neuroseg.structures import rle

STUB_SCORE = 0.7157  # the fused score of the stubs' one cell in asymmetric_image (default params)


# ---- thresholds ----

def test_filter_keeps_confident_instances_of_confident_images():
    label = np.zeros((4, 8), np.int32)
    for k in range(1, 5):
        label[:2, 2 * k - 2:2 * k] = k
    scores = np.array([0.9, 0.8, 0.3, 0.95], np.float32)  # median 0.85, mean 0.7375

    kept, why = filter_instances(label, scores, PseudoLabelConfig(min_score=0.5, min_image_score=0.5,
                                                                  min_instances=3))
    assert why == "kept"
    want = label.copy()
    want[want == 3] = 0
    want[want == 4] = 3  # renumbered 1..K in order
    assert np.array_equal(kept, want)

    def why(**kw) -> str:
        return filter_instances(label, scores, PseudoLabelConfig(**kw))[1]

    assert why(min_score=0.5, min_instances=4) == "too few instances"  # only 3 score >= 0.5
    assert why(min_image_score=0.86) == "image score"  # median 0.85
    assert why(min_image_score=0.8, min_instances=1) == "kept"
    assert why(min_image_score=0.8, image_score="mean") == "image score"  # mean 0.7375
    empty = np.zeros((4, 8), np.int32)
    assert filter_instances(empty, np.zeros(0), PseudoLabelConfig()) == (None, "no instances")
    with pytest.raises(ValueError, match="pseudo.image_score 'max'"):
        filter_instances(label, scores, PseudoLabelConfig(image_score="max"))


def stub_ensemble() -> FoldEnsemble:
    return FoldEnsemble({"yolox": [StubDetector()], "maskrcnn": [StubDetector(masks=True)],
                         "upernet": [StubSegmenter()]}, scale=0.5)


@pytest.fixture
def unlabelled(tmp_path):
    folder = tmp_path / "semi"
    folder.mkdir()
    Image.fromarray(asymmetric_image()).save(folder / "cells.png")
    Image.fromarray(np.full((40, 60), 30, np.uint8)).save(folder / "blank.png")
    return folder


def test_make_pseudo_labels_per_fold_and_thresholds(unlabelled, tmp_path):
    from neuroseg.ensemble.params import EnsembleParams

    images = sorted(unlabelled.glob("*.png"))
    out = tmp_path / "pseudo" / "labels.csv"
    cfg = config.load(None, ["pseudo.min_score=0.5", "pseudo.min_image_score=0.5", "pseudo.min_instances=1"])
    summary = make_pseudo_labels(cfg, images, {0: stub_ensemble(), 1: stub_ensemble()}, EnsembleParams(), out)
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert tuple(df.columns) == PSEUDO_COLUMNS
    assert df["id"].tolist() == ["cells", "cells"] and df["fold"].tolist() == ["0", "1"]
    assert set(df["source"]) == {"pseudo"} and set(df["cell_type"]) == {"astro"}
    assert df["image_path"].iloc[0] == str((unlabelled / "cells.png").resolve())
    mask = rle.decode(df["annotation"].iloc[0], (40, 60))
    assert mask[4:12, 20:36].mean() > 0.9
    assert summary["outcomes"] == {"kept": 2, "no instances": 2}
    assert summary["folds"] == {"0": {"images": 1, "instances": 1}, "1": {"images": 1, "instances": 1}}
    assert out.with_suffix(".json").is_file()
    records = read_pseudo_labels(out)
    assert [(r.record.image_id, r.fold, r.image_dir) for r in records] == [("cells", 0, unlabelled.resolve()),
                                                                          ("cells", 1, unlabelled.resolve())]

    for dropping, why in ((f"pseudo.min_score={STUB_SCORE + 0.01}", "too few instances"),
                          (f"pseudo.min_image_score={STUB_SCORE + 0.01}", "image score")):
        strict = config.load(None, ["pseudo.min_instances=1", "pseudo.min_score=0.5",
                                    "pseudo.min_image_score=0.5", dropping])
        summary = make_pseudo_labels(strict, images, {None: stub_ensemble()}, EnsembleParams(), out)
        assert summary["outcomes"] == {why: 1, "no instances": 1}
        assert pd.read_csv(out).empty and read_pseudo_labels(out) == []


# ---- the training splits ----

def write_pseudo_csv(path, rows: list[tuple[str, str, str]], folder) -> None:
    """``rows``: (image id, fold, annotation) of images in ``folder``, 32 x 40, astro."""
    lines = [dict(id=i, annotation=a, width=T.W, height=T.H, cell_type="astro", plate_time="",
                  sample_date="", sample_id="", elapsed_timedelta="", source="pseudo", fold=f,
                  image_path=str(folder / f"{i}.png"))
             for i, f, a in rows]
    pd.DataFrame(lines, columns=list(PSEUDO_COLUMNS)).to_csv(path, index=False)


@pytest.fixture
def toy(tmp_path):
    """engine_toys' 8 images (2 folds) and two unlabelled images u1, u2 with a pseudo-label CSV:
    u1 for every fold, u2 for fold 1 only."""
    paths = T.make_dataset(tmp_path, n_images=8)
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for new, old in (("u1", "img00"), ("u2", "img01")):
        shutil.copy(paths.train_image(old), folder / f"{new}.png")
    mask = np.zeros((T.H, T.W), np.uint8)
    mask[3:10, 4:12] = 1
    csv = tmp_path / "pseudo.csv"
    write_pseudo_csv(csv, [("u1", "", rle.encode(mask)), ("u2", "1", rle.encode(mask))], folder)
    return paths, csv


def split_ids(ds) -> list[str]:
    parts = getattr(ds, "datasets", [ds])
    return [r.image_id for p in parts for r in p.records]


def test_pseudo_labels_join_training_splits_never_validation(toy):
    paths, csv = toy
    cfg = T.toy_config("pseudo.enabled=true", f"pseudo.csv={csv}")
    for fold, extra in ((0, ["u1"]), (1, ["u1", "u2"])):
        train, val = train_folds.load_fold_records(cfg, paths, fold)
        train_set, val_set = train_folds.build_datasets(cfg, paths, train, val, fold)
        assert split_ids(train_set) == [r.image_id for r in train] + extra
        assert split_ids(val_set) == [r.image_id for r in val]  # nothing pseudo in validation
        image, target = train_set[len(train_set) - 1]  # read from its own folder
        # at train scale 0.5; the training augmentation may turn it by 90 degrees
        assert image.shape in ((3, T.H // 2, T.W // 2), (3, T.W // 2, T.H // 2)) and target["image_id"] == extra[-1]
        assert target["labels"].tolist() == [2] and int(target["cell_type"]) == 1  # astro

    summary = train_folds.train_fold(cfg, paths, "upernet", 1, model_factory=T.ToySegmenter)
    assert not {"u1", "u2"} & set(oof_cache.read_manifest(paths, "upernet", 1)["image_ids"])
    plain = T.toy_config()
    # the hash the fold was trained under is the one 05 and score-oof check the cache against
    assert summary["config_hash"] == oof_cache.fold_config_hash(cfg, paths, "upernet")
    assert summary["config_hash"] != oof_cache.fold_config_hash(plain, paths, "upernet")


def test_pseudo_label_of_a_labelled_image_or_a_bad_row_is_an_error(toy, tmp_path):
    paths, csv = toy
    cfg = T.toy_config("pseudo.enabled=true", f"pseudo.csv={csv}")
    write_pseudo_csv(csv, [("img03", "", "1 5")], paths.train_images)
    train, val = train_folds.load_fold_records(cfg, paths, 0)
    with pytest.raises(DataError, match=r"labelled images of this run, e\.g\. \['img03'\]"):
        train_folds.build_datasets(cfg, paths, train, val, 0)

    write_pseudo_csv(csv, [("u1", "7", "1 5"), ("u1", "x", "5 1 1 1")], tmp_path / "unlabelled")
    with pytest.raises(DataError) as err:
        read_pseudo_labels(csv)
    assert "line 3, id 'u1': fold 'x' is neither empty nor a fold number" in str(err.value)
    assert "line 3, id 'u1': bad annotation" in str(err.value)
    write_pseudo_csv(csv, [("u1", "7", "1 5")], tmp_path / "unlabelled")
    with pytest.raises(DataError, match=r"rows for fold\(s\) \['7'\], but n_folds=2"):
        train_folds.build_datasets(cfg, paths, train, val, 0)
    missing = T.toy_config("pseudo.enabled=true", f"pseudo.csv={tmp_path / 'none.csv'}")
    with pytest.raises(FileNotFoundError, match="python -m neuroseg pseudo-label"):
        train_folds.build_datasets(missing, paths, train, val, 0)
    with pytest.raises(FileNotFoundError, match="run 02-05 with --set pseudo.enabled=false"):
        train_folds.train_model(missing, paths, "upernet")  # at once, before any training


def test_holdout_leaves_every_split_and_may_be_pseudo_labelled(toy, tmp_path):
    paths, csv = toy
    cfg = T.toy_config("pseudo.holdout_fraction=0.25")
    folds = pd.read_csv(paths.folds_csv, dtype=str, keep_default_na=False)
    held = holdout_ids(cfg, folds)
    # 8 images: shsy5y 3, astro 3, cort 2 -> round(0.75) + round(0.75) + round(0.5) = 2, one per type
    assert len(held) == 2 and len(set(folds.set_index("id").loc[sorted(held), "cell_type"])) == 2
    assert holdout_ids(cfg, folds) == held and holdout_ids(T.toy_config(), folds) == set()
    for fold in (0, 1):
        train, val = train_folds.load_fold_records(cfg, paths, fold)
        assert not held & {r.image_id for r in (*train, *val)}
        assert len(train) + len(val) == 6

    # held-out images: pseudo-labelled from train/, they join the training split
    assert [p.name for p in collect_images(cfg, paths, [], holdout=True)] == [f"{i}.png" for i in sorted(held)]
    h = sorted(held)[0]
    write_pseudo_csv(csv, [(h, "", "1 5")], paths.train_images)
    on = T.toy_config("pseudo.holdout_fraction=0.25", "pseudo.enabled=true", f"pseudo.csv={csv}")
    train, val = train_folds.load_fold_records(on, paths, 0)
    train_set, _ = train_folds.build_datasets(on, paths, train, val, 0)
    assert split_ids(train_set)[-1] == h

    labelled = tmp_path / "labelled"
    labelled.mkdir()
    shutil.copy(paths.train_image("img03" if "img03" not in held else "img05"), labelled)
    with pytest.raises(ValueError, match="are labelled training images"):
        collect_images(cfg, paths, [str(labelled)], holdout=False)
    with pytest.raises(ValueError, match="holdout_fraction is 0"):
        collect_images(T.toy_config(), paths, [], holdout=True)


# ---- python -m neuroseg pseudo-label, on tiny untrained fold models ----

TINY = ["device=cpu", "folds.n_folds=2", "data.train_scale=1.0", "yolox.size=nano", "yolox.input_size=64",
        "maskrcnn.backbone=resnet18", "maskrcnn.v2_head=false", 
        "maskrcnn.rpn_post_nms_top_n_test=50", "maskrcnn.detections_per_image=3", "upernet.encoder=resnet18",
        "upernet.decoder_channels=16", "submission.tta_flips=false", "pseudo.min_score=0",
        "pseudo.min_image_score=0", "pseudo.min_instances=1", "pseudo.holdout_fraction=0.5"]


def test_pseudo_label_cli(toy, tmp_path, capsys):
    import torch

    from neuroseg import models
    from neuroseg.cli import main
    from neuroseg.ensemble.params import EnsembleParams
    from neuroseg.training import checkpoint
    from neuroseg.utils.atomic_io import atomic_write_json

    paths, _ = toy
    cfg = config.load(None, TINY)
    for name in ("yolox", "maskrcnn", "upernet"):
        for fold in (0, 1):
            torch.manual_seed(fold)
            model = models.build(name, cfg)
            checkpoint.save({"model": model.state_dict(), "model_name": name, "fold": fold, "epoch": 1,
                             "metric": 0.0, "config": cfg.to_dict(), "config_hash": "test"},
                            paths.best_checkpoint(name, fold))
    atomic_write_json(paths.ensemble_params, {"format": 1, "params": EnsembleParams().to_json(), "scores": {}})
    common = ["--data-dir", str(paths.data_dir), "--output-dir", str(paths.output_dir),
              *[a for o in TINY for a in ("--set", o)]]
    assert main(["pseudo-label", str(tmp_path / "unlabelled"), "--holdout", *common]) == 0
    summary = pd.read_json(paths.pseudo_labels_csv.with_suffix(".json"), typ="series")
    held = holdout_ids(cfg, pd.read_csv(paths.folds_csv, dtype=str, keep_default_na=False))
    assert len(held) == 5  # round(0.5 x 3) + round(0.5 x 3) + round(0.5 x 2), per cell type
    assert summary["images"] == 2 + 5 and sorted(summary["folds"]) == ["0", "1"]
    assert sum(summary["outcomes"].values()) == 2 * 7  # every image once per fold
    read_pseudo_labels(paths.pseudo_labels_csv)  # valid, whatever untrained models found

    assert main(["pseudo-label", str(paths.train_images), *common]) == 2
    assert "are labelled training images" in capsys.readouterr().err
