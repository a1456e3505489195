"""Out-of-sample accuracy: split a labelled data dir into a fixed train and test part, run 01-06
on the train part with a config, score the test part (ensemble and each single model) per cell
type, and record every step's wall and CPU time.

    .venv/bin/python bench/bench_accuracy.py --config configs/cpu.yaml --out output/acc-cpu \
        [--data-dir ../shared/data/sartorius-mini] [--n-test 36] [--seed 0] [--set key=value ...]

The test images never touch training or tuning: they are the train part's ``test/`` folder, which
only 06 reads (``neuroseg.data.holdout``). Steps run as the user runs them (the numbered scripts,
one process each, default threads), resuming from their caches when rerun. Writes
``OUT/accuracy.json`` and ``OUT/accuracy.md``.

A rerun into the same OUT with the same config and overrides (after a crash or a kill) adds each
step's new time to the time of its earlier completed runs (``OUT/step_times.json``): a step that
only found its cache still counts what computing it cost, and ``runs`` says how many invocations
the figure sums. A step killed before it completed is not counted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuroseg import config as config_mod  # noqa: E402
from neuroseg.data.holdout import holdout_split, write_split  # noqa: E402
from neuroseg.evaluation.metric import score_files  # noqa: E402
from neuroseg.utils.atomic_io import atomic_write_json, atomic_write_text  # noqa: E402

SCRIPTS = {"yolox": "02_train_yolox.py", "maskrcnn": "03_train_maskrcnn.py", "upernet": "04_train_upernet.py"}


def run_step(name: str, argv: list[str], log_path: Path) -> dict[str, float]:
    """Run one script, its output appended to ``log_path``; wall and children's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"\n==== {name}: {' '.join(argv)}\n")
        log.flush()
        code = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {log_path}")
    print(f"{name}: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def record_step(ledger: Path, fingerprint: str, name: str, times: dict[str, float]) -> dict[str, float]:
    """Add one completed run of step ``name`` to the ledger and return the step's sums over every
    completed run of this ``fingerprint`` (config + overrides); another fingerprint starts over."""
    book = json.loads(ledger.read_text()) if ledger.is_file() else {}
    if book.get("fingerprint") != fingerprint:
        book = {"fingerprint": fingerprint, "steps": {}}
    old = book["steps"].get(name, {"wall_s": 0.0, "cpu_s": 0.0, "runs": 0})
    new = {k: round(old[k] + times[k], 1) for k in ("wall_s", "cpu_s")}
    new["runs"] = old["runs"] + 1
    book["steps"][name] = new
    atomic_write_json(ledger, book)
    if new["runs"] > 1:
        print(f"{name}: {new['wall_s']:.0f} s wall over {new['runs']} runs (earlier ones did the work this one "
              f"resumed from)", flush=True)
    return new


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "sartorius-mini"))
    p.add_argument("--out", required=True, help="work dir: the split, the run's outputs, the results")
    p.add_argument("--n-test", type=int, default=36)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    import pandas as pd

    out = Path(args.out)
    cfg = config_mod.load(args.config, args.overrides)
    split = holdout_split(pd.read_csv(Path(args.data_dir) / "train.csv", dtype=str, keep_default_na=False),
                          args.n_test, args.seed)
    data, truth = write_split(Path(args.data_dir), out / "split", split)
    common = ["--config", args.config, "--data-dir", str(data), "--output-dir", str(out / "run"),
              *(a for kv in args.overrides for a in ("--set", kv))]
    log_path = out / "steps.log"
    fingerprint = json.dumps({"config": args.config, "overrides": args.overrides, "data_dir": args.data_dir,
                              "n_test": args.n_test, "seed": args.seed}, sort_keys=True)
    steps: dict[str, dict[str, float]] = {}

    def step(name: str, argv: list[str]) -> None:
        steps[name] = record_step(out / "step_times.json", fingerprint, name, run_step(name, argv, log_path))

    step("01", ["01_preprocess.py", *common])
    for model in cfg.ensemble.models:
        step(SCRIPTS[model][:2], [SCRIPTS[model], *common])
    step("05", ["05_ensemble.py", *common])
    step("06", ["06_make_submission.py", *common])
    scores = {"ensemble": score_files(truth, out / "run" / "submission.csv")}
    for model in ("maskrcnn", "upernet"):
        if model in cfg.ensemble.models:
            step(f"06 --only {model}", ["06_make_submission.py", *common, "--only", model])
            scores[model] = score_files(truth, out / "run" / f"submission_{model}.csv")
    result = {"config": args.config, "overrides": args.overrides, "data_dir": args.data_dir,
              "n_train": len(split.train_ids), "n_test": len(split.test_ids), "seed": args.seed,
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "scores": {k: {"overall": s.score, **s.per_cell_type} for k, s in scores.items()},
              "steps": steps,
              "total": {k: round(sum(s[k] for s in steps.values()), 1) for k in ("wall_s", "cpu_s")}}
    if any(s["runs"] > 1 for s in steps.values()):
        result["note"] = "resumed: a step's times sum its completed runs (step_times.json)"
    atomic_write_json(out / "accuracy.json", result)
    lines = [f"# Out-of-sample accuracy: {args.config} {' '.join(args.overrides)}", "",
             f"{result['n_train']} train / {result['n_test']} test images of {args.data_dir} (seed {args.seed}), "
             f"{result['date']}. Test images were seen by 06 only.", "",
             "| method | overall | shsy5y | astro | cort |", "|---|---|---|---|---|"]
    for k, s in result["scores"].items():
        lines.append(f"| {k} | {s['overall']:.4f} | " + " | ".join(
            f"{s[t]:.4f}" if t in s else "-" for t in ("shsy5y", "astro", "cort")) + " |")
    lines += ["", "| step | wall s | CPU s |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['wall_s']:.0f} | {v['cpu_s']:.0f} |" for k, v in steps.items()]
    lines.append(f"| total | {result['total']['wall_s']:.0f} | {result['total']['cpu_s']:.0f} |")
    atomic_write_text(out / "accuracy.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
