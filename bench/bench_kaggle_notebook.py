"""The Kaggle bundle of the trained models: its size, and the time its notebook takes end to end
(pip install from the bundled wheels + inference on the competition's test/), run here.

    make kaggle CONFIG=configs/demo.yaml KAGGLE_USER=neuroseg-demo      # -> output/kaggle/
    .venv/bin/python bench/bench_kaggle_notebook.py --config configs/demo.yaml --data-dir input/synthetic

The notebook runs in a kernel that lacks every package the bundle has a wheel for (except what
the kernel itself needs to start: ipykernel, pip and their dependencies), so its pip installs the
whole bundle with ``--no-index``; see ``neuroseg.kaggle.rehearsal``. Then ``06_make_submission.py``
runs on the same models and data and the two CSVs are compared byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuroseg.kaggle import rehearsal  # noqa: E402
from neuroseg.kaggle.bundle import folder_size  # noqa: E402
from neuroseg.utils.logging import setup_logging  # noqa: E402


def cell_seconds(executed: Path) -> list[tuple[str, float]]:
    """(first line, seconds) of each code cell, from the timings nbclient records."""
    nb = json.loads(executed.read_text())
    out = []
    for cell in nb["cells"]:
        t = cell.get("metadata", {}).get("execution", {})
        if cell["cell_type"] == "code" and "iopub.execute_input" in t and "shell.execute_reply" in t:
            start, end = (datetime.fromisoformat(t[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            source = "".join(cell["source"])  # a list of lines in the file
            out.append((source.splitlines()[0][:60], (end - start).total_seconds()))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="output/kaggle", help="the folder kaggle-bundle wrote")
    p.add_argument("--data-dir", default="input/synthetic", help="a Kaggle-layout folder with test/")
    p.add_argument("--config", default="configs/demo.yaml", help="for the 06 comparison run")
    p.add_argument("--output-dir", default="output", help="the models the bundle was built from")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args()
    setup_logging()
    bundle = Path(args.bundle).resolve()
    work = Path(args.work or tempfile.mkdtemp(prefix="kaggle-rehearsal-"))
    wheels = bundle / "wheels"
    sizes = {f: folder_size(bundle / f) for f in ("wheels", "weights", "notebook")}
    print(f"bundle {bundle}: " + ", ".join(f"{f} {s / 1e6:.1f} MB" for f, s in sizes.items())
          + f"; {len(list(wheels.glob('*.whl')))} wheels")

    python = rehearsal.kernel_environment(work / "kernel-venv", rehearsal.bundled_names(wheels))
    root = rehearsal.kaggle_root(work / "kaggle", Path(args.data_dir).resolve(), bundle)
    executed, seconds = rehearsal.run_notebook(bundle / "notebook" / "infer.ipynb", python, root)
    print(f"notebook end to end: {seconds:.1f} s wall")
    for first_line, s in cell_seconds(executed):
        print(f"  {s:7.1f} s  {first_line}")

    out = work / "out06"  # 06 on the same models, written beside them, not over output/
    out.mkdir()
    for sub in ("models", "ensemble"):
        (out / sub).symlink_to((Path(args.output_dir) / sub).resolve())
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "06_make_submission.py"), "--config", args.config,
                    "--data-dir", args.data_dir, "--output-dir", str(out)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    same = filecmp.cmp(root / "working" / "submission.csv", out / "submission.csv", shallow=False)
    print(f"06_make_submission.py: {time.perf_counter() - started:.1f} s; notebook CSV identical: {same}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; scratch {work}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
