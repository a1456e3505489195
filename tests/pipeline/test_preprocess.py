"""Step 01 end to end on a tiny hand-built Kaggle folder (and once on sartorius-mini): outputs,
idempotence (manifest), --force, config/input changes, stale files, bad input, the script."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools.coco import COCO
from tiny_kaggle import H, W, rect, write_dataset

from neuroseg import config
from neuroseg.data.records import DataError, read_train_csv
from neuroseg.data.semantic_targets import semantic_target_from_rles
from neuroseg.paths import Paths
from neuroseg.pipeline.preprocess import inputs_fingerprint, mtime_fingerprint, run_preprocess

ROOT = Path(__file__).resolve().parents[2]


def cfg(*overrides: str) -> config.Config:
    return config.load(None, ["folds.n_folds=3", *overrides])


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(write_dataset(tmp_path / "kaggle"), tmp_path / "out")


def _mtimes(paths: Paths) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in paths.output_dir.rglob("*") if p.is_file()}


def test_outputs(paths):
    summary = run_preprocess(cfg(), paths)
    assert not summary["skipped"]
    assert (summary["images"], summary["instances_raw"], summary["instances_clean"]) == (6, 9, 9)
    assert summary["cleaning"]["astro"]["pixels_added"] == 16  # the ring's 4 x 4 hole

    clean = read_train_csv(paths.clean_train_csv, paths.train_images)  # trainers can read it back
    ring = clean.loc[clean["id"] == "b1", "annotation"].iloc[0]
    np.testing.assert_array_equal(
        semantic_target_from_rles([ring], (H, W), 0) > 0, rect(10, 10, 12, 12))
    assert json.loads(paths.cleaning_report.read_text())["by_cell_type"]["astro"]["instances_changed"] == 1

    folds = pd.read_csv(paths.folds_csv, dtype=str, keep_default_na=False)
    assert sorted(folds["id"]) == ["a1", "a2", "b1", "c1", "d1", "e1"]
    assert folds.loc[folds["id"].isin(["a1", "a2"]), "fold"].nunique() == 1  # sample s1
    val_ids = []
    for fold in range(3):
        train = COCO(str(paths.coco_json(fold, "train")))
        val = COCO(str(paths.coco_json(fold, "val")))
        train_ids = {im["file_name"] for im in train.dataset["images"]}
        fold_val = {im["file_name"] for im in val.dataset["images"]}
        assert not train_ids & fold_val and len(train_ids | fold_val) == 6
        assert fold_val == {f"{i}.png" for i in folds.loc[folds["fold"] == str(fold), "id"]}
        val_ids += sorted(fold_val)
    assert len(val_ids) == 6

    for image_id, g in clean.groupby("id"):
        png = cv2.imread(str(paths.semantic_target(image_id)), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(png, semantic_target_from_rles(g["annotation"], (H, W), 2))
    with Image.open(paths.cleaning_figure) as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert config.load(paths.preprocess_config).folds.n_folds == 3


def test_second_run_is_a_no_op_and_force_or_changes_redo(paths, caplog):
    caplog.set_level(logging.INFO, logger="neuroseg")
    run_preprocess(cfg(), paths)
    before = _mtimes(paths)
    manifest = paths.preprocess_manifest.read_bytes()

    assert run_preprocess(cfg(), paths)["skipped"] is True
    assert "up to date" in caplog.text
    assert _mtimes(paths) == before and paths.preprocess_manifest.read_bytes() == manifest

    assert run_preprocess(cfg(), paths, force=True)["skipped"] is False
    assert paths.preprocess_manifest.stat().st_mtime_ns != before[str(paths.preprocess_manifest)]

    assert run_preprocess(cfg("preprocess.border_width=1"), paths)["skipped"] is False
    assert run_preprocess(cfg("preprocess.border_width=1"), paths)["skipped"] is True

    # fewer folds: the old fold2 files go, so no stale file is mixed in
    assert run_preprocess(cfg("folds.n_folds=2", "preprocess.border_width=1"), paths)["skipped"] is False
    assert not paths.coco_json(2, "train").exists() and paths.coco_json(1, "val").exists()

    # the same files again with new mtimes (a data set unzipped or synced anew): still up to date;
    # an image's bytes changed: redone
    done = cfg("folds.n_folds=2", "preprocess.border_width=1")
    image = paths.train_image("a1")
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**10))
    assert run_preprocess(done, paths)["skipped"] is True
    Image.fromarray(np.asarray(Image.open(image)) ^ 1).save(image)
    assert run_preprocess(done, paths)["skipped"] is False
    # a manifest of the older mtime fingerprint stays valid while the files keep their mtimes
    # (the fold hashes hold the stored value: no retraining on upgrade), not once they change
    manifest = json.loads(paths.preprocess_manifest.read_text())
    manifest["inputs_sha256"] = mtime_fingerprint(paths)
    paths.preprocess_manifest.write_text(json.dumps(manifest))
    assert run_preprocess(done, paths)["skipped"] is True
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**10))
    assert run_preprocess(done, paths)["skipped"] is False
    assert json.loads(paths.preprocess_manifest.read_text())["inputs_sha256"] == inputs_fingerprint(paths)

    # changed input (same rows, other order) and a deleted output both redo the step
    lines = paths.train_csv.read_text().splitlines()
    paths.train_csv.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    assert run_preprocess(cfg("folds.n_folds=2", "preprocess.border_width=1"), paths)["skipped"] is False
    paths.semantic_target("a1").unlink()
    assert run_preprocess(cfg("folds.n_folds=2", "preprocess.border_width=1"), paths)["skipped"] is False
    assert paths.semantic_target("a1").exists()


def test_bad_train_csv_names_file_line_and_id(paths):
    lines = paths.train_csv.read_text().splitlines()
    lines[1] = lines[1].replace(f",{W},{H},", f",{W},{H + 2},")  # a1: wrong height
    lines[4] = lines[4].replace("b1,", "b9,", 1)  # no b9.png
    lines[7] = lines[7].replace(",cort,", ",glia,")  # c1: unknown cell type
    paths.train_csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        run_preprocess(cfg(), paths)
    msg = str(e.value)
    assert str(paths.train_csv) in msg
    assert f"line 2, id 'a1': width x height {W}x{H + 2} != image {W}x{H}" in msg
    assert "line 5, id 'b9': image not found" in msg
    assert "line 8, id 'c1': unknown cell_type 'glia'" in msg
    assert not paths.preprocess_manifest.exists()


def test_a_truncated_png_with_an_intact_header_stops_01_naming_file_and_failure(paths, capsys):
    png = paths.train_images / "b1.png"
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])  # header and size intact, pixel data cut
    assert read_train_csv(paths.train_csv).shape[0] > 0  # the header-only check cannot see it
    with pytest.raises(DataError) as e:
        run_preprocess(cfg(), paths)
    msg = str(e.value)
    assert f"id 'b1': unreadable image {png}: image file is truncated" in msg
    assert msg.count("unreadable image") == 1  # one problem for the image, not one per annotation
    assert not paths.preprocess_manifest.exists()


def test_script_main(paths, caplog, capsys):
    spec = importlib.util.spec_from_file_location("preprocess_script", ROOT / "01_preprocess.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--data-dir", str(paths.data_dir), "--output-dir", str(paths.output_dir), "--set", "folds.n_folds=2"]
    caplog.set_level(logging.INFO, logger="neuroseg")
    assert script.main(argv) == 0 and paths.preprocess_manifest.exists()
    caplog.clear()
    assert script.main(argv) == 0 and "up to date" in caplog.text
    (paths.train_images / "a2.png").unlink()
    assert script.main(argv) == 1
    assert "id 'a2': image not found" in capsys.readouterr().err


def test_real_data(tmp_path, real_data):
    """The whole step on sartorius-mini (about 10 s on 2 shared cores)."""
    paths = Paths(real_data, tmp_path / "out")
    summary = run_preprocess(config.load(), paths)
    assert (summary["images"], summary["instances_raw"], summary["instances_clean"]) == (100, 10656, 10646)
    assert summary["cleaning"]["shsy5y"]["duplicates_dropped"] == 10
    astro = summary["cleaning"]["astro"]
    assert (astro["instances_changed"], astro["pixels_added"], astro["pixels_removed"]) == (317, 17647, 0)
    assert summary["images_per_fold"] == [20] * 5  # 100 singleton groups, evened out
    assert len(list(paths.semantic_dir.glob("*.png"))) == 100
    val = json.loads(paths.coco_json(0, "val").read_text())
    assert len(val["images"]) == summary["images_per_fold"][0]
