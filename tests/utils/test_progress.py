"""Progress in a log file: lines per interval, never a redrawn bar; a bar on a terminal."""

from __future__ import annotations

import logging

from neuroseg.utils.progress import Progress


def test_off_a_terminal_it_logs_lines_with_count_total_and_postfix(caplog, capsys):
    caplog.set_level(logging.INFO, logger="neuroseg")
    p = Progress(range(3), "train fold 0", unit="step", every_s=0.0, terminal=False)
    seen = []
    for x in p:
        seen.append(x)
        p.set_postfix(loss=f"{x:.1f}")
    assert seen == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[0].startswith("train fold 0: 1/3 step, ")
    assert lines[2].startswith("train fold 0: 3/3 step,") and lines[2].endswith(", loss 2.0")
    assert "\r" not in capsys.readouterr().err  # no bar was drawn


def test_a_long_interval_logs_nothing_and_a_disabled_one_never(caplog):
    caplog.set_level(logging.INFO, logger="neuroseg")
    assert list(Progress(iter(range(5)), "x", every_s=3600, terminal=False)) == [0, 1, 2, 3, 4]
    assert list(Progress(range(5), "x", every_s=0.0, enabled=False, terminal=False)) == [0, 1, 2, 3, 4]
    assert caplog.records == []


def test_on_a_terminal_it_is_a_tqdm_bar(capsys):
    p = Progress(range(4), "predict", unit="img", terminal=True)
    assert list(p) == [0, 1, 2, 3]
    p.close()
    assert "predict" in capsys.readouterr().err
