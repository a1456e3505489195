"""Score against training budget: out-of-sample scores of ``bench_accuracy.py`` runs (each an
``OUT/accuracy.json``) against the wall time their models trained for, one line per series.

    .venv/bin/python bench/bench_budget.py --out docs/budget.png \\
        --run "cpu ensemble=/work/runs/acc-cpu-half" --run "cpu ensemble=/work/runs/acc-cpu4" \\
        --run "cpu ensemble + refit=/work/runs/acc-cpu4-refit" --base /work/runs/acc-cpu4-refit=/work/runs/acc-cpu4 \\
        --point "reference=22.0:0.1617:BENCHMARKS.md 2026-12-02"

``--run SERIES=DIR[:METHOD]``: DIR is a run's out dir or its ``accuracy.json`` itself (the
protocol runs' copies are kept in ``docs/runs/``: run dirs do not outlive a session). METHOD is
the submission scored (``ensemble``, the default, or a single model's ``06 --only``). The budget
is the wall time of the steps that trained it (02-04 for the ensemble, the model's own step for
one model: training plus each fold's OOF pass) on the quiet 2-core box, as issue 14 states
budgets; the table gives their CPU time beside it. ``--base DIR=BASE``: DIR is a copy of BASE's
run whose folds were reused (only a refit model trained), so BASE's 02-04 times are added to
DIR's. ``--point SERIES=TRAIN_WALL_MIN:SCORE:SOURCE``: a recorded figure whose run directory is
gone, plotted hollow and named with its source in the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TRAIN_STEPS = {"yolox": ("02",), "maskrcnn": ("03",), "upernet": ("04",), "ensemble": ("02", "03", "04")}


def accuracy_json(run: str | Path) -> Path:
    """A run's accuracy.json: ``run`` is the file itself or the out dir holding it."""
    path = Path(run)
    return path if path.suffix == ".json" else path / "accuracy.json"


def train_times(run_dir: str | Path, method: str) -> dict[str, float]:
    """Wall and CPU minutes of the steps that trained what ``method`` scores (one model's step,
    or 02-04 for the ensemble), from a run's accuracy.json."""
    steps = json.loads(accuracy_json(run_dir).read_text())["steps"]
    return {k: sum(steps[s][f"{k}_s"] for s in TRAIN_STEPS[method] if s in steps) / 60 for k in ("wall", "cpu")}


def read_point(spec: str, bases: dict[str, str]) -> dict:
    series, _, rest = spec.partition("=")
    if not rest:
        raise SystemExit(f"--run {spec!r}: expected SERIES=DIR[:METHOD]")
    run_dir, _, method = rest.partition(":")
    path = accuracy_json(run_dir)
    if not path.is_file():
        raise SystemExit(f"--run {spec!r}: {path} not found (bench/bench_accuracy.py writes it)")
    result = json.loads(path.read_text())
    method = method or "ensemble"
    if method not in result["scores"]:
        raise SystemExit(f"--run {spec!r}: {path} has no {method!r} score; it has {sorted(result['scores'])}")
    times = train_times(run_dir, method)
    source = run_dir
    if run_dir in bases:
        base = train_times(bases[run_dir], method)
        times = {k: times[k] + base[k] for k in times}
        source = f"{run_dir} (+ the folds of {bases[run_dir]})"
    return {"series": series, "source": source, "method": method, "recorded": False,
            "config": " ".join([result["config"], *result.get("overrides", [])]),
            "train_wall_min": times["wall"], "train_cpu_min": times["cpu"], **result["scores"][method]}


def recorded_point(spec: str) -> dict:
    series, _, rest = spec.partition("=")
    parts = rest.split(":", 2)
    if len(parts) != 3:
        raise SystemExit(f"--point {spec!r}: expected SERIES=TRAIN_WALL_MIN:SCORE:SOURCE")
    try:
        wall, score = float(parts[0]), float(parts[1])
    except ValueError:
        raise SystemExit(f"--point {spec!r}: TRAIN_WALL_MIN and SCORE must be numbers") from None
    return {"series": series, "source": parts[2], "method": "recorded", "recorded": True, "config": "-",
            "train_wall_min": wall, "train_cpu_min": float("nan"), "overall": score}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=[], metavar="SERIES=DIR[:METHOD]")
    ap.add_argument("--base", action="append", default=[], metavar="DIR=BASE_DIR")
    ap.add_argument("--point", action="append", default=[], metavar="SERIES=TRAIN_WALL_MIN:SCORE:SOURCE")
    ap.add_argument("--out", required=True, help="the PNG to write")
    args = ap.parse_args()
    if not args.run and not args.point:
        raise SystemExit("nothing to plot: give --run and/or --point")
    bases = dict(b.split("=", 1) for b in args.base)
    points = [*(read_point(s, bases) for s in args.run), *(recorded_point(s) for s in args.point)]
    points.sort(key=lambda p: (p["series"], p["train_wall_min"]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 6.4))
    for series in dict.fromkeys(p["series"] for p in points):
        pts = [p for p in points if p["series"] == series]
        (line,) = ax.plot([p["train_wall_min"] for p in pts], [p["overall"] for p in pts], "-", label=series)
        for p in pts:
            ax.plot(p["train_wall_min"], p["overall"], "o", color=line.get_color(),
                    fillstyle="none" if p["recorded"] else "full")
    ax.set_xlabel("training wall minutes (02-04, quiet 2-core box)")
    ax.set_ylabel("out-of-sample score (36 test images)")
    ax.set_title("score against training budget (hollow: recorded figure)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8)  # below the axes: inside, it hid points
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
    print("| series | run | config | scored | training wall min | training CPU min | overall | shsy5y | astro | cort |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for p in points:
        cells = " | ".join(f"{p[t]:.4f}" if t in p else "-" for t in ("overall", "shsy5y", "astro", "cort"))
        cpu = "-" if p["recorded"] else f"{p['train_cpu_min']:.1f}"
        print(f"| {p['series']} | {p['source']} | `{p['config']}` | {p['method']} | {p['train_wall_min']:.1f} | "
              f"{cpu} | {cells} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
