"""Score against training budget: out-of-sample scores of several ``bench_accuracy.py`` runs (each
an ``OUT/accuracy.json``) against the CPU time their models trained for, one line per series.

    .venv/bin/python bench/bench_budget.py --out docs/budget.png \\
        --run "reference=/work/runs/acc-ref27:maskrcnn" --run "reference=/work/runs/acc-ref54:maskrcnn" \\
        --run "cpu ensemble=/work/runs/acc-cpu-half" --run "cpu ensemble=/work/runs/acc-cpu3"

``SERIES=DIR[:METHOD]``: METHOD is the submission scored (``ensemble``, the default, or a single
model's ``06 --only``). The budget is the CPU time of 02-04 (training plus each fold's OOF
pass), which a busy box changes less than wall time. Prints a markdown table; writes the PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TRAIN_STEPS = ("02", "03", "04")


def read_point(spec: str) -> dict:
    series, _, rest = spec.partition("=")
    if not rest:
        raise SystemExit(f"--run {spec!r}: expected SERIES=DIR[:METHOD]")
    run_dir, _, method = rest.partition(":")
    path = Path(run_dir) / "accuracy.json"
    if not path.is_file():
        raise SystemExit(f"--run {spec!r}: {path} not found (bench/bench_accuracy.py writes it)")
    result = json.loads(path.read_text())
    method = method or "ensemble"
    if method not in result["scores"]:
        raise SystemExit(f"--run {spec!r}: {path} has no {method!r} score; it has {sorted(result['scores'])}")
    steps = result["steps"]
    return {"series": series, "dir": run_dir, "method": method,
            "config": " ".join([result["config"], *result.get("overrides", [])]),
            "train_cpu_min": sum(steps[s]["cpu_s"] for s in TRAIN_STEPS if s in steps) / 60,
            "total_wall_min": result["total"]["wall_s"] / 60, **result["scores"][method]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, metavar="SERIES=DIR[:METHOD]")
    ap.add_argument("--out", required=True, help="the PNG to write")
    args = ap.parse_args()
    points = sorted((read_point(s) for s in args.run), key=lambda p: (p["series"], p["train_cpu_min"]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for series in dict.fromkeys(p["series"] for p in points):
        pts = [p for p in points if p["series"] == series]
        ax.plot([p["train_cpu_min"] for p in pts], [p["overall"] for p in pts], "o-", label=series)
    ax.set_xlabel("training CPU minutes (02-04, 2-core box)")
    ax.set_ylabel("out-of-sample score (36 test images)")
    ax.set_title("score against training budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
    print("| series | run | scored | training CPU min | 01-06 wall min | overall | shsy5y | astro | cort |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for p in points:
        cells = " | ".join(f"{p[t]:.4f}" if t in p else "-" for t in ("overall", "shsy5y", "astro", "cort"))
        print(f"| {p['series']} | `{p['config']}` | {p['method']} | {p['train_cpu_min']:.1f} | "
              f"{p['total_wall_min']:.1f} | {cells} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
