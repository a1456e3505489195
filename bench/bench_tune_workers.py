"""05 in one process against 05 with the cross-validated fold tunings in other processes
(``ensemble.workers``), on a finished run's OOF cache: wall and CPU time of each, and whether
both wrote the same parameters and scores (in-sample and cross-validated).

    .venv/bin/python bench/bench_tune_workers.py --config configs/cpu.yaml \\
        --data-dir <the run's data dir> --output-dir <the run's output dir> [--workers 2]

Each variant runs ``run_ensemble`` as 05 does (forced, from cold) into its own scratch output dir,
whose every entry but ``ensemble/`` links to the run's: the run itself is left as it is. The
one-process variant runs first. CPU time includes the child processes'.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuroseg import config as config_mod  # noqa: E402
from neuroseg.paths import Paths  # noqa: E402
from neuroseg.pipeline.tune_ensemble import run_ensemble  # noqa: E402
from neuroseg.utils.atomic_io import read_json  # noqa: E402
from neuroseg.utils.logging import setup_logging  # noqa: E402


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_05(cfg, data_dir: Path, run_dir: Path, scratch: Path, workers: int) -> tuple[dict, float, float]:
    out = scratch / f"workers{workers}"
    out.mkdir()
    for entry in run_dir.iterdir():
        if entry.name != "ensemble":
            (out / entry.name).symlink_to(entry.resolve())
    cfg = dataclasses.replace(cfg, ensemble=dataclasses.replace(cfg.ensemble, workers=workers))
    t0, c0 = time.perf_counter(), cpu_seconds()
    stored = read_json(run_ensemble(cfg, Paths(data_dir, out), force=True))
    return stored, time.perf_counter() - t0, cpu_seconds() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--output-dir", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=2, help="processes of the variant compared with one")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    setup_logging()
    cfg = config_mod.load(args.config, args.overrides)
    with tempfile.TemporaryDirectory() as d:
        one, wall1, cpu1 = timed_05(cfg, args.data_dir, args.output_dir, Path(d), 1)
        many, wall_n, cpu_n = timed_05(cfg, args.data_dir, args.output_dir, Path(d), args.workers)
    keys = ("params", "scores", "scores_cross_validated")
    same = all(one[k] == many[k] for k in keys)
    print(f"{one['n_images']} OOF images, {cfg.ensemble.tune_trials} trials")
    print(f"1 process:    {wall1:.0f} s wall, {cpu1:.0f} s CPU")
    print(f"{args.workers} processes:  {wall_n:.0f} s wall, {cpu_n:.0f} s CPU  (wall ratio {wall1 / wall_n:.2f}x)")
    print(f"same parameters, in-sample and cross-validated scores: {same}")
    if not same:
        for k in keys:
            if one[k] != many[k]:
                print(f"  {k} differ:\n    1: {one[k]}\n    {args.workers}: {many[k]}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
