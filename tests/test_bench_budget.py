"""bench/bench_budget.py: a run's budget from its accuracy.json, given as the run dir or the file."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_run(path: Path) -> None:
    path.write_text(json.dumps({
        "config": "configs/cpu.yaml", "overrides": ["upernet.train.epochs=160"],
        "scores": {"ensemble": {"overall": 0.25, "cort": 0.3}, "maskrcnn": {"overall": 0.2}},
        "steps": {"01": {"wall_s": 6, "cpu_s": 6}, "03": {"wall_s": 600, "cpu_s": 900},
                  "04": {"wall_s": 300, "cpu_s": 450}, "05": {"wall_s": 120, "cpu_s": 120}}}))


def test_budget_reads_a_run_dir_or_its_kept_json(tmp_path):
    (tmp_path / "run").mkdir()
    write_run(tmp_path / "run" / "accuracy.json")
    write_run(tmp_path / "kept.json")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_budget.py"), "--out", str(tmp_path / "b.png"),
                          "--run", f"ens={tmp_path / 'run'}", "--run", f"mr={tmp_path / 'kept.json'}:maskrcnn",
                          "--point", "ref=22.0:0.16:recorded"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.stdout.splitlines() if line.startswith("| ")}
    # the ensemble trained in 02-04 (03 + 04: 15 min wall, 22.5 CPU); Mask R-CNN alone in 03
    assert "| 15.0 | 22.5 | 0.2500 | - | - | 0.3000 |" in rows["ens"]
    assert "| 10.0 | 15.0 | 0.2000 |" in rows["mr"]
    assert "| 22.0 | - | 0.1600 |" in rows["ref"]
    assert (tmp_path / "b.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_budget.py"), "--out", str(tmp_path / "c.png"),
                          "--run", f"x={tmp_path / 'gone.json'}"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "gone.json not found" in bad.stderr
