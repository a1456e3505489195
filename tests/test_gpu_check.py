"""``bench/gpu_check.py``, the one command for a lent GPU, rehearsed on the CPU (``--dry-run``):
fold 0 of the kaggle config's three models on 10 real images, 05, and the ensemble's inference
with flip TTA, ending in the figures BENCHMARKS.md takes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_figure(real_data, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path),
                           "--data-dir", str(real_data)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] and result["device"] == "cpu" and result["config"].endswith("configs/kaggle.yaml")
    assert result["n_labelled_images"] == 10 and result["n_train_images"] == 8 and result["oof_images"] == 2
    assert set(result["models"]) == {"yolox", "maskrcnn", "upernet"}
    assert all(m["train_images_per_s"] > 0 and m["epochs"] == 1 for m in result["models"].values())
    inference = result["inference"]
    assert inference["images"] == 2 and inference["tta_views"] == 3 and inference["images_per_s"] > 0
    assert {"ensemble", "maskrcnn", "upernet"} <= set(result["oof_scores_in_sample"])
    text = (tmp_path / "gpu_check.md").read_text()
    assert text.startswith("gpu_check (dry run, cpu") and "| yolox |" in text and "3 TTA views" in text
