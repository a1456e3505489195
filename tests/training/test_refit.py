"""The refit model (``train.refit_epochs``): one model of every labelled image trained after the
folds, which 06, predict and the Kaggle bundle use instead of the fold models; on the 1-conv toy."""

from __future__ import annotations

import engine_toys as T
import pandas as pd
import pytest
import torch

from neuroseg import models
from neuroseg.evaluation import oof_cache
from neuroseg.inference import fold_models
from neuroseg.kaggle.bundle import flat_name, weight_files
from neuroseg.paths import REFIT
from neuroseg.pipeline import train_folds
from neuroseg.training import checkpoint


@pytest.fixture()
def paths(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "build", lambda name, cfg: T.ToySegmenter())  # every run, OOF included
    return T.make_dataset(tmp_path, n_images=8)


def test_the_default_run_trains_the_folds_then_one_model_on_every_image(paths):
    cfg = T.toy_config("upernet.train.epochs=1", "upernet.train.refit_epochs=3")
    out = train_folds.train_model(cfg, paths, "upernet")
    assert [s["fold"] for s in out] == [0, 1, REFIT] and not any(s["skipped"] for s in out)

    hist = pd.read_csv(paths.history_csv("upernet", REFIT))
    # 3 epochs (not the folds' 1) of 4 steps: all 8 images at batch 2, where a fold trains on 4
    assert hist["epoch"].tolist() == [1, 2, 3] and hist["steps"].tolist() == [4, 4, 4]
    assert pd.read_csv(paths.history_csv("upernet", 0))["steps"].tolist() == [2]
    best = checkpoint.load(paths.best_checkpoint("upernet", REFIT))
    last = checkpoint.load(paths.last_checkpoint("upernet", REFIT))
    assert best["epoch"] == 3 and T.same_weights(best["model"], last["model"])  # no validation: the last
    assert (paths.fold_dir("upernet", REFIT) / "done.json").is_file()
    assert paths.fold_dir("upernet", REFIT) == paths.model_dir("upernet") / "refit"
    # no OOF of its own (it has seen every image 05 tunes on); the folds' OOF are there
    assert not (paths.output_dir / "oof" / "upernet" / "refit").exists()
    assert oof_cache.read_manifest(paths, "upernet", 1)["image_ids"] == ["img01", "img03", "img05", "img07"]

    # another refit length retrains the refit model alone: the folds' hash leaves refit_epochs out
    more = T.toy_config("upernet.train.epochs=1", "upernet.train.refit_epochs=2")
    again = train_folds.train_model(more, paths, "upernet")
    assert [s["skipped"] for s in again] == [True, True, False]
    assert pd.read_csv(paths.history_csv("upernet", REFIT))["epoch"].tolist() == [1, 2]
    none = T.toy_config("upernet.train.epochs=1")
    assert oof_cache.fold_config_hash(none, paths, "upernet") == oof_cache.fold_config_hash(more, paths, "upernet")
    assert oof_cache.refit_config_hash(cfg, paths, "upernet") != oof_cache.refit_config_hash(more, paths, "upernet")
    # without refit_epochs only the folds train
    assert [s["fold"] for s in train_folds.train_model(none, paths, "upernet")] == [0, 1]


def test_folds_and_refit_by_name_and_the_refusals(paths):
    assert train_folds.parse_runs("1, refit") == (1, REFIT)
    assert train_folds.parse_runs("refit") == (REFIT,)
    assert train_folds.parse_runs("") is None
    with pytest.raises(SystemExit, match="comma-separated integers"):
        train_folds.parse_runs("0,all")
    with pytest.raises(SystemExit, match="refit_epochs is 0"):
        train_folds.train_model(T.toy_config(), paths, "upernet", folds=(REFIT,))
    with pytest.raises(SystemExit, match="refit_epochs must be >= 0"):
        train_folds.train_model(T.toy_config("upernet.train.refit_epochs=-1"), paths, "upernet")
    with pytest.raises(SystemExit, match="pseudo-labels are made per fold"):
        train_folds.train_model(T.toy_config("upernet.train.refit_epochs=2", "pseudo.enabled=true"), paths,
                                "upernet", folds=(REFIT,))
    with pytest.raises(ValueError, match="fold number >= 0 or 'refit'"):
        paths.fold_dir("upernet", "all")
    # only the refit was asked for: no fold trains
    out = train_folds.train_model(T.toy_config("upernet.train.refit_epochs=1"), paths, "upernet", folds=(REFIT,))
    assert [s["fold"] for s in out] == [REFIT] and not paths.fold_dir("upernet", 0).exists()


def test_inference_loads_the_refit_model_where_there_is_one(paths, monkeypatch):
    cfg = T.toy_config("upernet.train.refit_epochs=1")
    train_folds.train_model(cfg, paths, "upernet", folds=(0, 1))
    with pytest.raises(FileNotFoundError, match=r"(?s)1 checkpoint\(s\) missing.*upernet/refit/best.pt"):
        fold_models.load_trained_models(cfg, paths, ["upernet"], torch.device("cpu"), runs=fold_models.inference_runs)
    train_folds.train_model(cfg, paths, "upernet")
    monkeypatch.setattr(fold_models.checkpoint, "load_for_inference", lambda path, *a: path)
    device = torch.device("cpu")
    assert fold_models.load_trained_models(cfg, paths, ["upernet"], device, runs=fold_models.inference_runs) == {
        "upernet": [paths.best_checkpoint("upernet", REFIT)]}
    # the OOF models (05) stay the folds; without refit_epochs inference uses them too
    folds = [paths.best_checkpoint("upernet", f) for f in (0, 1)]
    assert fold_models.load_trained_models(cfg, paths, ["upernet"], device) == {"upernet": folds}
    plain = T.toy_config()
    assert fold_models.load_trained_models(plain, paths, ["upernet"], device, runs=fold_models.inference_runs) == {
        "upernet": folds}


def test_the_kaggle_bundle_carries_the_refit_model_not_the_folds(paths, monkeypatch):
    monkeypatch.setattr("neuroseg.inference.predict.load_params", lambda paths: {})
    cfg = T.toy_config("upernet.train.refit_epochs=1", "ensemble.models=[upernet]")
    train_folds.train_model(cfg, paths, "upernet")
    places = sorted(weight_files(cfg, paths))
    assert places == ["ensemble/params.json", "models/upernet/refit/best.pt"]
    assert flat_name(places[1]) == "upernet-refit.pt"
