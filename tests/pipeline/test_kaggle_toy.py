"""The GPU user's path at toy scale: ``make pseudo submission CONFIG=configs/kaggle.yaml``, then the
Kaggle bundle and its notebook, on the CPU.

The models, heads, fold count, LIVECell pretraining, pseudo-label rounds and flip TTA are the
kaggle config's: YOLOX-x, Mask R-CNN R50 v2, UPerNet ConvNeXt-B, 5 folds. Only what sets the cost
is overridden (``TOY``): the image sizes (a synthetic competition folder of 128 x 160 images,
with ``train_semi_supervised/`` and a LIVECell-style COCO set of 96 x 120 TIFFs, both written by
``neuroseg synth``), the input sizes, epochs, steps and batch sizes, detection counts and the
tuning trials -- and the score floors (the pseudo-label thresholds and the ensemble's lowest
searched score threshold), which one-step models never reach. What this catches is wiring: a
pretrained checkpoint that does not fit the fold models, a pseudo-label round that reads the wrong
folder, a bundle that lacks a file the notebook needs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from neuroseg import config
from neuroseg.data.synthetic import write_dataset
from neuroseg.kaggle import bundle as kaggle_bundle
from neuroseg.kaggle import rehearsal as kaggle_rehearsal
from neuroseg.paths import MODEL_NAMES, Paths
from neuroseg.structures.submission_csv import validate_submission

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "kaggle.yaml"
N_FOLDS = 5
STEPS = ["max_train_steps_per_epoch=1", "batch_size=2", "num_workers=0"]
TOY = [
    "device=cpu",
    *[f"{m}.train.{s}" for m in MODEL_NAMES for s in STEPS],
    "yolox.train.epochs=1", "yolox.no_aug_epochs=0",  # the one epoch with mosaic, as most are
    "yolox.input_size=128", "yolox.max_detections=20",
    "maskrcnn.train.epochs=1", "maskrcnn.detections_per_image=20", "maskrcnn.rpn_post_nms_top_n_test=100",
    "maskrcnn.rpn_post_nms_top_n_train=200", "maskrcnn.box_batch_size_per_image=32",
    "upernet.train.epochs=1",
    "pretrain.epochs=1", "pretrain.max_val_images=2",
    "ensemble.tune_trials=2", "submission.batch_size=2",
    "pseudo.min_score=0", "pseudo.min_image_score=0", "pseudo.min_instances=1",
    "ensemble.min_score_threshold=0",
]
WITHHELD = ("neuroseg", "yolox", "segmentation-models-pytorch", "ensemble-boxes")


def set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The synthetic data and ``make pseudo submission`` on it: (paths, make's log, seconds)."""
    root = tmp_path_factory.mktemp("kaggle_toy")
    data = Path(write_dataset(root / "data", n_images=15, seed=0, n_test=2, height=128, width=160,
                              livecell=4)["out_dir"])
    paths = Paths(data, root / "output")
    env = {**os.environ, "NEUROSEG_OUTPUT_DIR": str(paths.output_dir)}
    cmd = ["make", "-C", str(ROOT), "pseudo", "submission", f"CONFIG={CONFIG}", f"DATA_DIR={data}",
           f"ARGS={shlex.join(set_args(TOY))}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log = done.stdout + done.stderr
    (root / "make.log").write_text(log)
    assert done.returncode == 0, f"make pseudo submission failed (log {root / 'make.log'}):\n{log[-6000:]}"
    yield paths, log, seconds
    shutil.rmtree(root)  # ~10 GB of checkpoints: pytest keeps its last three runs' folders


@pytest.mark.slow
def test_make_pseudo_submission_runs_the_kaggle_config_through_both_rounds(toy_run):
    paths, log, seconds = toy_run
    cfg = config.load(CONFIG, TOY)
    assert (cfg.yolox.size, cfg.maskrcnn.backbone, cfg.maskrcnn.v2_head, cfg.upernet.encoder) == (
        "x", "resnet50", True, "tu-convnext_base")
    assert cfg.folds.n_folds == N_FOLDS and cfg.pretrain.enabled and cfg.pseudo.enabled and cfg.submission.tta_flips
    # pretraining once per model on the LIVECell copy, every fold of both rounds starting from it
    for model in MODEL_NAMES:
        assert paths.pretrain_best(model).is_file(), model
        assert log.count(f"{model}: initialised from the pretrained {paths.pretrain_best(model)}") == 2 * N_FOLDS
    # round 1 labelled train_semi_supervised/ per fold; round 2 trained every fold on its labels
    pseudo = pd.read_csv(paths.pseudo_labels_csv)
    semi = {p.stem for p in paths.semi_supervised_images.glob("*.png")}
    assert len(semi) == 3 and set(pseudo.id) <= semi
    kept = {k: pseudo[pseudo.fold == k].id.nunique() for k in range(N_FOLDS)}
    assert min(kept.values()) >= 1, kept
    added = re.findall(r"fold (\d+): \+ (\d+) pseudo-labelled training images", log)
    assert sorted(added) == sorted((str(k), str(n)) for k, n in kept.items() for _ in MODEL_NAMES)
    # every fold model of the final round, and a valid submission of the test images
    for model in MODEL_NAMES:
        for fold in range(N_FOLDS):
            done = json.loads((paths.fold_dir(model, fold) / "done.json").read_text())
            assert paths.best_checkpoint(model, fold).is_file() and done["epochs"] == getattr(cfg, model).train.epochs
    assert validate_submission(paths.submission_csv, paths.test_images) == []
    print(f"toy kaggle run: make pseudo submission took {seconds:.0f} s")


@pytest.mark.slow
def test_the_toy_runs_kaggle_bundle_notebook_writes_06s_submission(toy_run, tmp_path):
    paths, _, _ = toy_run
    kernel_python = kaggle_rehearsal.kernel_environment(tmp_path / "kernel-venv", WITHHELD)
    bundle = tmp_path / "bundle"
    code = kaggle_bundle.cli_kaggle_bundle([
        "--user", "toy-user", "--out", str(bundle), "--config", str(CONFIG), "--output-dir", str(paths.output_dir),
        *set_args(TOY), "--skip-installed-in", str(kernel_python)])
    assert code == 0
    layout = json.loads((bundle / "weights" / "neuroseg-bundle.json").read_text())["layout"]
    assert {f"models/{m}/fold{k}/best.pt" for m in MODEL_NAMES for k in range(N_FOLDS)} <= set(layout)
    root = kaggle_rehearsal.kaggle_root(tmp_path / "kaggle", paths.data_dir, bundle)
    kaggle_rehearsal.run_notebook(bundle / "notebook" / "infer.ipynb", kernel_python, root)
    notebook_csv = root / "working" / "submission.csv"
    assert validate_submission(notebook_csv, paths.test_images) == []
    assert notebook_csv.read_bytes() == paths.submission_csv.read_bytes()  # 15 fold models, flip TTA
    shutil.rmtree(bundle)  # the weights: links to the checkpoints, or 5 GB of copies
