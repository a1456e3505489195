"""``infer.ipynb``: the Kaggle notebook of the bundle, built with nbformat.

Only the first code cell is generated (the dataset ids); the others are fixed text, kept here as
plain strings so that what runs on Kaggle can be read in one place. The notebook

* finds its three inputs under ``$NEUROSEG_KAGGLE_ROOT/input`` (default ``/kaggle/input``) by what
  they hold, not by name: Kaggle has mounted competitions and datasets at different depths over
  the years (``input/<slug>``, ``input/competitions/<slug>``, ...). The competition folder is the
  one with a ``test/`` folder; the two bundle folders carry ``neuroseg-bundle.json``;
* installs from the wheels dataset with ``pip --no-index`` (the notebook has no internet), what
  the wheels manifest lists;
* runs ``neuroseg.pipeline.make_submission``, the code of ``06_make_submission.py``, on the
  competition's ``test/`` with the fold checkpoints and tuned parameters of the weights dataset,
  and copies the validated CSV to ``working/submission.csv``.
"""

from __future__ import annotations

from typing import Any

KAGGLE_ROOT_ENV = "NEUROSEG_KAGGLE_ROOT"
MANIFEST_NAME = "neuroseg-bundle.json"

FIND_INPUTS = '''\
# 1. Find the competition data and the two datasets under $NEUROSEG_KAGGLE_ROOT/input (default /kaggle/input)
import json, os, sys, time
from pathlib import Path

STARTED = time.time()
ROOT = Path(os.environ.get("NEUROSEG_KAGGLE_ROOT", "/kaggle"))
INPUT, WORKING = ROOT / "input", ROOT / "working"


def find_dirs(top, matches, max_depth=4):
    """Folders under `top` (at most `max_depth` levels down) for which `matches(folder)` holds;
    a match is not searched further, so a big competition folder is listed once."""
    found, level = [], [top]
    for _ in range(max_depth):
        below = []
        for folder in level:
            try:
                subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
            except OSError:
                continue
            for sub in subdirs:
                (found if matches(sub) else below).append(sub)
        level = below
    return found


def bundle_kind(folder):
    try:
        return json.loads((folder / MANIFEST).read_text()).get("kind")
    except (OSError, ValueError):
        return None


def pick(kind, candidates, preferred_name):
    """The one candidate; with several, the one named like the expected slug."""
    named = [c for c in candidates if c.name == preferred_name]
    if len(candidates) == 1 or len(named) == 1:
        return (named or candidates)[0]
    shown = sorted(INPUT.glob("*")) + sorted(INPUT.glob("*/*"))[:40] if INPUT.is_dir() else []
    listing = "\\n".join(f"  {p}" for p in shown) or "  (nothing)"
    raise FileNotFoundError(f"{kind}: {len(candidates)} candidate folders {candidates} under {INPUT}; "
                            f"add the input to the notebook (or remove the extra one). {INPUT} holds:\\n{listing}")


COMPETITION_DIR = pick("competition data (a folder with test/)",
                       find_dirs(INPUT, lambda d: (d / "test").is_dir() and bundle_kind(d) is None),
                       COMPETITION)
WHEELS_DIR = pick(WHEELS_DATASET, find_dirs(INPUT, lambda d: bundle_kind(d) == "wheels"),
                  WHEELS_DATASET.split("/")[1])
WEIGHTS_DIR = pick(WEIGHTS_DATASET, find_dirs(INPUT, lambda d: bundle_kind(d) == "weights"),
                   WEIGHTS_DATASET.split("/")[1])
WHEELS = json.loads((WHEELS_DIR / MANIFEST).read_text())
WEIGHTS = json.loads((WEIGHTS_DIR / MANIFEST).read_text())
print(f"competition {COMPETITION_DIR} ({len(list((COMPETITION_DIR / 'test').glob('*.png')))} test images)")
print(f"wheels      {WHEELS_DIR} (bundle {WHEELS['bundle_id']})")
print(f"weights     {WEIGHTS_DIR} (bundle {WEIGHTS['bundle_id']})")
if WHEELS["bundle_id"] != WEIGHTS["bundle_id"]:
    print("note: the wheels and weights datasets come from different kaggle-bundle runs")
'''

INSTALL = '''\
# 2. Install the packages from the wheels dataset, offline
import subprocess


def pip_install(*args):
    """pip from the wheels dataset only (--no-index): the notebook has no internet."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(WHEELS_DIR), *args]
    print("$", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(done.stdout[-2000:])
    if done.returncode != 0:
        raise RuntimeError(f"pip failed (exit {done.returncode}):\\n{done.stderr[-4000:]}")


pip_install(*WHEELS["requirements"])
pip_install("--no-deps", *WHEELS["no_deps"])  # the project and yolox: see the manifest's note
'''

CHECK = '''\
# 3. What runs: versions, and where neuroseg was imported from
import importlib.metadata

import torch

import neuroseg

for name in ("neuroseg", "yolox", "segmentation-models-pytorch", "torch", "numpy"):
    print(f"{name:<28} {importlib.metadata.version(name)}")
print("neuroseg imported from", Path(neuroseg.__file__).parent)
print("CUDA available:", torch.cuda.is_available())
'''

PREDICT = '''\
# 4. Predict test/ with every fold model and the tuned ensemble (06_make_submission.py)
import shutil, tempfile

from neuroseg import config
from neuroseg.utils.atomic_io import atomic_path
from neuroseg.paths import Paths
from neuroseg.pipeline.make_submission import make_submission
from neuroseg.utils.logging import setup_logging

setup_logging()
# The weights dataset is flat (no sub-folders to zip on upload); its manifest maps each file to
# its place in an output dir, which we lay out with links in a writable temporary folder.
RUN_DIR = Path(tempfile.mkdtemp(prefix="neuroseg-"))
for place, name in WEIGHTS["layout"].items():
    (RUN_DIR / place).parent.mkdir(parents=True, exist_ok=True)
    (RUN_DIR / place).symlink_to(WEIGHTS_DIR / name)
cfg = config.load(WEIGHTS_DIR / WEIGHTS["config"], CONFIG_OVERRIDES)
written = make_submission(cfg, Paths(COMPETITION_DIR, RUN_DIR))  # what 06_make_submission.py runs
WORKING.mkdir(parents=True, exist_ok=True)
with atomic_path(WORKING / "submission.csv") as tmp:
    shutil.copyfile(written, tmp)
'''

SUMMARY = '''\
# 5. The submission
import pandas as pd

sub = pd.read_csv(WORKING / "submission.csv", dtype=str, keep_default_na=False)
print(f"{WORKING / 'submission.csv'}: {sub['id'].nunique()} images, "
      f"{(sub['predicted'] != '').sum()} instances; {time.time() - STARTED:.0f} s in all")
sub.head()
'''


def settings_cell(competition: str, wheels_dataset: str, weights_dataset: str,
                  config_overrides: list[str]) -> str:
    lines = [
        "# Written by `python -m neuroseg kaggle-bundle`: the datasets this notebook reads.",
        f"COMPETITION = {competition!r}",
        f"WHEELS_DATASET = {wheels_dataset!r}",
        f"WEIGHTS_DATASET = {weights_dataset!r}",
        f"MANIFEST = {MANIFEST_NAME!r}  # in both datasets: kind, bundle id, what to install / where",
        f"CONFIG_OVERRIDES = {config_overrides!r}  # --set KEY=VALUE on top of the bundled config",
    ]
    return "\n".join(lines) + "\n"


def intro(title: str, wheels_dataset: str, weights_dataset: str, competition: str) -> str:
    return (f"# {title}\n\n"
            f"Instance segmentation for `{competition}` with the neuroseg ensemble (YOLOX + Mask R-CNN + "
            f"UPerNet, k folds), offline: the packages come from `{wheels_dataset}`, the fold checkpoints, "
            f"tuned ensemble parameters and config from `{weights_dataset}`. Writes "
            f"`/kaggle/working/submission.csv`.\n\n"
            f"Generated by `python -m neuroseg kaggle-bundle`; rebuild it rather than editing it here.")


def build_notebook(title: str, competition: str, wheels_dataset: str, weights_dataset: str,
                   config_overrides: list[str] | None = None) -> Any:
    """The notebook as an ``nbformat`` v4 node (``nbformat.writes`` turns it into text)."""
    import nbformat
    from nbformat import v4

    cells = [
        v4.new_markdown_cell(intro(title, wheels_dataset, weights_dataset, competition)),
        v4.new_code_cell(settings_cell(competition, wheels_dataset, weights_dataset,
                                       list(config_overrides or []))),
        v4.new_code_cell(FIND_INPUTS),
        v4.new_code_cell(INSTALL),
        v4.new_code_cell(CHECK),
        v4.new_code_cell(PREDICT),
        v4.new_code_cell(SUMMARY),
    ]
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i}"  # nbformat draws random ids: fixed ones keep rebuilds identical
    nb = v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(nb)
    return nb
