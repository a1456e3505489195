"""``python -m neuroseg score`` and ``validate``: exit codes, output and --json keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neuroseg import cli

TRUTH = """id,annotation,width,height,cell_type
i1,1 3,4,3,astro
i1,9 2,4,3,astro
i2,5 4,4,3,cort
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_score_prints_score_and_per_type(tmp_path, capsys):
    truth = write(tmp_path, "truth.csv", TRUTH)
    pred = write(tmp_path, "pred.csv", "id,predicted\ni1,1 3\ni2,5 4\n")  # i1 one of two, i2 perfect
    assert cli.main(["score", str(truth), str(pred)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "score 0.750000 (2 images)", "  astro    0.500000 (1 images)", "  cort     1.000000 (1 images)"]


def test_score_json_keys(tmp_path, capsys):
    truth = write(tmp_path, "truth.csv", TRUTH)
    assert cli.main(["score", str(truth), str(truth), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "score": 1.0, "per_cell_type": {"astro": 1.0, "cort": 1.0}, "n_images": 2}


def test_score_bad_prediction_names_file_and_line(tmp_path, capsys):
    truth = write(tmp_path, "truth.csv", TRUTH)
    pred = write(tmp_path, "pred.csv", "id,predicted\ni1,1 3\ni2,5 4 7\n")
    assert cli.main(["score", str(truth), str(pred)]) == 1
    err = capsys.readouterr().err
    assert f"{pred}: 1 problem(s)" in err
    assert "line 3, id 'i2': bad prediction RLE: odd number of values (3)" in err
    assert cli.main(["score", str(truth), str(tmp_path / "none.csv")]) == 1
    assert f"{tmp_path / 'none.csv'}: file not found" in capsys.readouterr().err


def test_validate_exit_codes(tmp_path, capsys):
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    for image_id in ("a", "b"):
        Image.fromarray(np.zeros((3, 4), dtype=np.uint8)).save(test_dir / f"{image_id}.png")
    good = write(tmp_path, "good.csv", "id,predicted\na,1 2\na,5 2\nb,\n")
    assert cli.main(["validate", str(good), "--test-dir", str(test_dir)]) == 0
    assert capsys.readouterr().out == "valid: 3 rows, 2 images\n"

    bad = write(tmp_path, "bad.csv", "id,predicted\na,1 2\na,2 2\n")
    assert cli.main(["validate", str(bad), "--test-dir", str(test_dir)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{bad}: lines 2 and 3, id 'a': masks overlap in 1 pixel(s)",
                                f"{bad}: id 'b' ({test_dir / 'b.png'}) has no row"]
    assert "invalid: 2 violation(s)" in err
    assert cli.main(["validate", str(good), "--shape", "1", "4"]) == 1  # 5 2 is past a 1 x 4 image
    capsys.readouterr()
    assert cli.main(["validate", str(good), "--test-dir", str(tmp_path / "missing")]) == 2
    assert "test dir not found" in capsys.readouterr().err


def test_module_entry_point_prints_the_hand_computed_scores(tmp_path):
    truth = write(tmp_path, "truth.csv", TRUTH)
    # 4 x 3 images. i1: truth {0,1,2} and {8,9}; "1 3" is the first exactly, "10 1" = {9} has
    # IoU 1/2 with the second, never > 0.5: TP 1, FP 1, FN 1 at every threshold -> 1/3.
    # i2: truth {4..7}; "5 3" = {4,5,6} has IoU 3/4: a match at t = 0.5 .. 0.7 (5 thresholds),
    # not at 0.75 (strictly greater) .. 0.95 -> (5 x 1 + 5 x 0) / 10 = 1/2.
    pred = write(tmp_path, "pred.csv", "id,predicted\ni1,1 3\ni1,10 1\ni2,5 3\n")
    run = subprocess.run([sys.executable, "-m", "neuroseg", "score", str(truth), str(pred), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert set(out) == {"score", "per_cell_type", "n_images"} and out["n_images"] == 2
    assert out["score"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert out["per_cell_type"] == pytest.approx({"astro": 1 / 3, "cort": 1 / 2})
    assert list(out["per_cell_type"]) == ["astro", "cort"]


def test_training_script_without_preprocess_says_what_to_run(tmp_path, capsys):
    from neuroseg.pipeline.train_folds import train_main

    rc = train_main("upernet", "test", ["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("train upernet: ") and "run 01_preprocess.py first" in err


def test_training_script_skips_a_model_the_ensemble_leaves_out(tmp_path, caplog):
    from neuroseg.pipeline.train_folds import train_main

    common = ["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out"),
              "--set", "ensemble.models=[maskrcnn,upernet]"]
    with caplog.at_level("INFO", logger="neuroseg"):
        assert train_main("yolox", "test", common) == 0  # no 01 run: it would fail if it started
    assert "yolox is not in ensemble.models ['maskrcnn', 'upernet']" in caplog.text
    assert not (tmp_path / "out" / "models").exists()
    # named folds train it anyway (here: stops at the missing 01, as any training would)
    assert train_main("yolox", "test", [*common, "--folds", "0"]) == 1
    assert train_main("upernet", "test", common) == 1
