"""Skip, resume or start afresh (training.run_state), on files made by hand in tmp_path."""

from __future__ import annotations

import json
import logging

import pytest

from neuroseg.training import run_state
from neuroseg.training.run_state import RunFiles


@pytest.fixture()
def files(tmp_path) -> RunFiles:
    return RunFiles(done=tmp_path / "done.json", manifest=tmp_path / "manifest.json", best=tmp_path / "best.pt",
                    last=tmp_path / "last.pt", others=(tmp_path / "history.csv", tmp_path / "history.png"))


def write(path, obj=None):
    path.write_text(json.dumps(obj) if obj is not None else "x")
    return path


def test_all_lists_every_file_of_the_run(files, tmp_path):
    assert [p.name for p in files.all] == ["last.pt", "best.pt", "done.json", "manifest.json",
                                           "history.csv", "history.png"]


def test_nothing_there_is_not_stale(files):
    assert run_state.stale_reason(files, "a") is None


def test_same_hash_is_not_stale_another_names_both(files):
    write(files.manifest, {"config_hash": "a"})
    write(files.last)
    assert run_state.stale_reason(files, "a") is None
    assert run_state.stale_reason(files, "b") == "config changed: a -> b"


def test_manifest_without_a_hash_is_stale(files):
    write(files.manifest, {"model": "upernet"})
    assert run_state.stale_reason(files, "a") == "config changed: None -> a"


def test_checkpoints_without_a_manifest_are_named(files):
    write(files.last)
    assert run_state.stale_reason(files, "a") == "['last.pt'] without a manifest"
    write(files.done, {"config_hash": "a"})
    assert run_state.stale_reason(files, "a") == "['last.pt', 'done.json'] without a manifest"
    files.last.unlink()
    assert run_state.stale_reason(files, "a") == "['done.json'] without a manifest"


def test_best_or_history_alone_without_a_manifest_is_not_stale(files):
    write(files.best)
    write(files.others[0])
    assert run_state.stale_reason(files, "a") is None


def test_force_is_stale_whatever_is_there(files):
    assert run_state.stale_reason(files, "a", force=True) == "--force"
    write(files.manifest, {"config_hash": "a"})
    assert run_state.stale_reason(files, "a", force=True) == "--force"


def test_begin_clears_a_run_of_another_config(files, caplog):
    write(files.manifest, {"config_hash": "old"})
    for p in files.all[:3] + files.others:
        write(p)
    saved = []
    with caplog.at_level(logging.INFO, logger="neuroseg"):
        run_state.begin(files, "new", {"model": "upernet", "fold": 1}, "upernet fold 1",
                        save_config=lambda: saved.append(sorted(p.name for p in files.all if p.exists())))
    assert "upernet fold 1: training afresh (config changed: old -> new)" in caplog.text
    assert saved == [[]]  # every file was gone when the config was saved
    assert [p.name for p in files.all if p.exists()] == ["manifest.json"]
    assert json.loads(files.manifest.read_text()) == {"model": "upernet", "fold": 1, "config_hash": "new"}


def test_begin_keeps_the_files_of_the_same_config(files, caplog):
    write(files.manifest, {"config_hash": "a", "model": "upernet"})
    for p in (files.last, files.best, *files.others):
        write(p, {"kept": p.name})
    saved = []
    with caplog.at_level(logging.INFO, logger="neuroseg"):
        run_state.begin(files, "a", {"model": "upernet"}, "desc", save_config=lambda: saved.append(1))
    assert "training afresh" not in caplog.text and saved == [1]
    for p in (files.last, files.best, *files.others):
        assert json.loads(p.read_text()) == {"kept": p.name}
    assert json.loads(files.manifest.read_text()) == {"model": "upernet", "config_hash": "a"}


def test_begin_with_force_clears_the_same_config(files, caplog):
    write(files.manifest, {"config_hash": "a"})
    write(files.last)
    write(files.done, {"config_hash": "a"})
    with caplog.at_level(logging.INFO, logger="neuroseg"):
        run_state.begin(files, "a", {}, "desc", force=True)
    assert "desc: training afresh (--force)" in caplog.text
    assert not files.last.exists() and not files.done.exists()
    assert json.loads(files.manifest.read_text()) == {"config_hash": "a"}


def test_begin_clears_checkpoints_without_a_manifest(files, caplog):
    write(files.last)
    write(files.best)
    with caplog.at_level(logging.INFO, logger="neuroseg"):
        run_state.begin(files, "a", {"model": "yolox"}, "desc")
    assert "desc: training afresh (['last.pt'] without a manifest)" in caplog.text
    assert not files.last.exists() and not files.best.exists()
    assert json.loads(files.manifest.read_text()) == {"model": "yolox", "config_hash": "a"}


def test_begin_on_another_rank_deletes_and_writes_nothing(files):
    write(files.manifest, {"config_hash": "old"})
    write(files.last)
    saved = []
    run_state.begin(files, "new", {}, "desc", is_main=False, save_config=lambda: saved.append(1))
    assert files.last.exists() and saved == []
    assert json.loads(files.manifest.read_text()) == {"config_hash": "old"}


def test_the_manifest_hash_wins_over_what_is_passed_in(files):
    run_state.begin(files, "a", {"config_hash": "spoofed", "model": "m"}, "desc")
    assert json.loads(files.manifest.read_text()) == {"model": "m", "config_hash": "a"}


def test_finished_needs_best_and_done_of_the_same_hash(files):
    done = {"config_hash": "a", "best_metric": 0.5, "best_epoch": 3}
    write(files.done, done)
    assert run_state.finished(files, "a") is None  # no best.pt
    write(files.best)
    assert run_state.finished(files, "a") == done
    assert run_state.finished(files, "b") is None
    assert run_state.finished(files, "a", force=True) is None
    files.done.unlink()
    assert run_state.finished(files, "a") is None
