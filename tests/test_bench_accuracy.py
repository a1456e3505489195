"""bench/bench_accuracy.py: a resumed run's step times sum the completed runs of the same setup."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "bench" / "bench_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_resumed_step_keeps_the_time_of_the_run_that_did_its_work(tmp_path):
    record_step = load_bench().record_step
    ledger = tmp_path / "step_times.json"
    # the first invocation trains 03 for 1,500 s; the rerun finds its checkpoint in 2 s
    assert record_step(ledger, "A", "03", {"wall_s": 1500.0, "cpu_s": 2900.0}) == \
        {"wall_s": 1500.0, "cpu_s": 2900.0, "runs": 1}
    assert record_step(ledger, "A", "03", {"wall_s": 2.0, "cpu_s": 1.5}) == \
        {"wall_s": 1502.0, "cpu_s": 2901.5, "runs": 2}
    assert record_step(ledger, "A", "05", {"wall_s": 300.0, "cpu_s": 400.0})["runs"] == 1
    assert json.loads(ledger.read_text())["steps"]["03"]["runs"] == 2
    # another config or override in the same out dir: its steps start from nothing
    assert record_step(ledger, "B", "03", {"wall_s": 7.0, "cpu_s": 7.0}) == {"wall_s": 7.0, "cpu_s": 7.0, "runs": 1}
    assert sorted(json.loads(ledger.read_text())["steps"]) == ["03"]
