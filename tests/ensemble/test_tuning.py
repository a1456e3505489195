"""Tuning on a hand-built OOF cache: the search, the IoU-table scoring, and tuned parameters that
beat the defaults and that ``fuse`` reproduces exactly."""

from __future__ import annotations

import numpy as np
import pytest
from ensemble_toys import CELLS, H, W, as_oof, ellipse_in, ellipse_mask_fn, image_pred, truth_of, type_probs

from neuroseg import config
from neuroseg.config import CELL_TYPES
from neuroseg.ensemble import fusion
from neuroseg.ensemble.fusion import fuse, single_model
from neuroseg.ensemble.params import EnsembleParams
from neuroseg.ensemble.tuning import (
    CHEAP_EVALS_PER_TRIAL,
    SCORE_GRID,
    coordinate_search,
    predictions_from_oof,
    score_table,
    tune_ensemble,
    tune_vote_weights,
)
from neuroseg.evaluation.metric import image_score, iou_matrix, iou_sparse
from neuroseg.structures.label_image import masks_to_label

FALSE_POSITIVES = [[26, 44, 34, 52], [44, 26, 52, 33]]  # background patches only YOLOX reports


def test_score_table_equals_the_metric():
    rng = np.random.default_rng(1)
    for _ in range(20):
        # overlapping truth (as Kaggle labels), disjoint predictions (a label image)
        truth = [np.flatnonzero(rng.random((16, 16)) < 0.15) for _ in range(rng.integers(0, 5))]
        blobs = [rng.random((16, 16)) < 0.2 for _ in range(rng.integers(0, 5))]
        truth += [np.flatnonzero(b) for b in blobs[:2]]  # some exact hits
        label, scores = masks_to_label(np.array(blobs).reshape(-1, 16, 16), rng.random(len(blobs)))
        iou = iou_matrix(truth, label)
        keep = np.stack([scores >= s for s in (0.0, 0.3, 0.7, 1.1)])
        expected = [image_score(iou[:, k]) for k in keep]
        np.testing.assert_allclose(score_table(iou, keep), expected)
        np.testing.assert_allclose(score_table(iou_sparse(truth, label), keep), expected)


def test_coordinate_search_finds_the_grid_optimum_and_never_loses():
    grids = {"a": [0, 1, 2, 3], "b": [0, 1, 2], "c": [5, 6]}

    def f(p):  # separable, optimum at a=2, b=0, c=6
        return -(p["a"] - 2) ** 2 - p["b"] ** 2 + p["c"]

    best, value, n = coordinate_search(grids, {"a": 0, "b": 2, "c": 5}, f, 100, np.random.default_rng(0))
    assert best == {"a": 2, "b": 0, "c": 6} and value == 6
    # a budget of one evaluation returns the start itself
    start = {"a": 0, "b": 2, "c": 5}
    assert coordinate_search(grids, start, f, 1, np.random.default_rng(0)) == (start, f(start), 1)


def test_coordinate_search_spends_its_budget_on_the_costly_coordinates():
    grids = {"a": [0, 1, 2, 3], "b": [0, 1, 2], "c": [5, 6]}
    seen = []

    def f(p):
        seen.append(dict(p))
        return -(p["a"] - 2) ** 2 - p["b"] ** 2 + p["c"]

    start = {"a": 0, "b": 2, "c": 5}
    best, value, n = coordinate_search(grids, start, f, 2, np.random.default_rng(0), costly=["a"], max_total=100)
    # two settings of "a" (the start's and one more: 1, the first tried), the cheap ones free
    assert {p["a"] for p in seen} == {0, 1}
    assert best == {"a": 1, "b": 0, "c": 6} and value == 5 and n == len(seen)
    seen.clear()
    assert coordinate_search(grids, start, f, 2, np.random.default_rng(0), costly=["a"], max_total=3)[2] == 3
    assert len(seen) == 3


def _rows_tuner(rows: dict[int, list[float]]):
    """A tuner whose per-image scores at ``{"a": k}`` are ``rows[k]`` (one free column)."""
    from neuroseg.ensemble.tuning import _Tuner

    class Rows(_Tuner):
        free_grid = [0.0]

        def image_row(self, image_id, p):
            return np.array([rows[p["a"]][int(image_id)]])

    return Rows([str(k) for k in range(len(rows[0]))], {})


def test_a_gain_one_lucky_image_explains_is_not_taken():
    # a=1 lifts one image of four a lot (the best mean); a=2 lifts every image a little
    rows = {0: [0.2, 0.2, 0.2, 0.2], 1: [0.9, 0.2, 0.2, 0.2], 2: [0.3, 0.3, 0.31, 0.29]}
    tuner = _rows_tuner(rows)
    assert tuner.objective({"a": 1}) == pytest.approx(0.375) and tuner.objective({"a": 2}) == pytest.approx(0.3)
    # one image's gain: its mean is exactly one standard error, so any z above 1 refuses it
    assert not tuner.significant({"a": 1}, {"a": 0}, 1.5) and tuner.significant({"a": 2}, {"a": 0}, 1.5)
    assert tuner.significant({"a": 1}, {"a": 0}, 0.5)
    plain = coordinate_search({"a": [0, 1, 2]}, {"a": 0}, tuner.objective, 10, np.random.default_rng(0))
    gated = coordinate_search({"a": [0, 1, 2]}, {"a": 0}, tuner.objective, 10, np.random.default_rng(0),
                              accept=lambda new, old: tuner.significant(new, old, 1.5))
    assert plain[0] == {"a": 1} and gated[0] == {"a": 2} and gated[1] == pytest.approx(0.3)
    # a refusing gate keeps the start
    assert coordinate_search({"a": [0, 1, 2]}, {"a": 0}, tuner.objective, 10, np.random.default_rng(0),
                             accept=lambda new, old: False)[0] == {"a": 0}


def test_ensemble_min_gain_se_gates_every_tuning(tuned, monkeypatch):
    """The setting reaches the search of every method; a gate that refuses every step leaves each
    at its start (only the free score threshold / minimum area still chosen), and 0 turns it off."""
    from neuroseg.ensemble import tuning

    oof, truth, mask_fns, _, _ = tuned
    asked = []

    def refuse(self, new, old, z):
        asked.append((type(self).__name__, z))
        return False

    monkeypatch.setattr(tuning._Tuner, "significant", refuse)
    cfg = config.from_dict({"ensemble": {"tune_trials": 25, "tune_seed": 0, "min_gain_se": 1.5,
                                         "warm_start": False}})
    params, report = tune_ensemble(oof, truth, cfg, mask_fns)
    # (every method searches through tuning._tune; on the toy only the ensemble finds a better step)
    assert "_EnsembleTuner" in {name for name, _ in asked}
    assert {z for _, z in asked} == {1.5}
    d = EnsembleParams()
    for t in CELL_TYPES:
        assert (params.maskrcnn[t].mask_threshold, params.maskrcnn[t].min_area) == \
            (d.maskrcnn[t].mask_threshold, d.maskrcnn[t].min_area)
        assert (params.upernet[t].interior_threshold, params.upernet[t].seed_threshold) == \
            (d.upernet[t].interior_threshold, d.upernet[t].seed_threshold)
        keep = ("score_threshold",)
        assert {k: v for k, v in vars(params.ensemble[t]).items() if k not in keep} == \
            {k: v for k, v in vars(d.ensemble[t]).items() if k not in keep}
    asked.clear()
    tune_ensemble(oof, truth, config.from_dict({"ensemble": {"tune_trials": 3, "min_gain_se": 0.0}}), mask_fns)
    assert asked == []
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=rf"ensemble.min_gain_se must be >= 0 \(0: no gate\), got {bad}"):
            tune_ensemble(oof, truth, config.from_dict({"ensemble": {"min_gain_se": bad}}), mask_fns)


def test_warm_start_begins_the_ensemble_at_the_better_single_model(tuned):
    """YOLOX's confident false positives sink the default start (both detectors weighted 1). With
    one box-fusion setting allowed the search cannot leave that weighting; warm-started, it begins
    at a single model's point (here UPerNet's own instances, the toy's best model: no YOLOX) and
    scores at least what the better single model does."""
    oof, truth, mask_fns, _, _ = tuned
    runs = {}
    for warm in (False, True):
        cfg = config.from_dict({"ensemble": {"tune_trials": 1, "tune_seed": 0, "warm_start": warm}})
        runs[warm] = tune_ensemble(oof, truth, cfg, mask_fns)
    assert all(p.yolox_weight == 1.0 for p in runs[False][0].ensemble.values())
    assert all(p.yolox_weight == 0.0 for p in runs[True][0].ensemble.values())
    assert set(runs[True][1]["ensemble_start"]) == set(CELL_TYPES) and "ensemble_start" not in runs[False][1]
    assert set(runs[True][1]["ensemble_start"].values()) <= {"maskrcnn", "upernet"}
    summary = runs[True][1]["summary"]
    assert summary["ensemble"]["overall"] > runs[False][1]["summary"]["ensemble"]["overall"]
    assert summary["ensemble"]["overall"] >= max(summary["maskrcnn"]["overall"], summary["upernet"]["overall"])


def test_vote_weights_follow_the_reliable_model():
    truth = {f"i{k}": truth_of(t) for k, t in enumerate(CELL_TYPES)}
    # YOLOX always right; UPerNet confidently wrong on two images, so the default equal vote errs
    votes = {f"i{k}": {"yolox": np.eye(3)[k] * 0.6, "upernet": np.eye(3)[(k + 1) % 3] if k else np.eye(3)[0]}
             for k in range(3)}
    weights, acc = tune_vote_weights(votes, truth, {"yolox": 1.0, "maskrcnn": 1.0, "upernet": 1.0})
    assert acc == 1.0 and weights["yolox"] > weights["upernet"]


def test_vote_weights_without_a_voter_keep_the_start(caplog):
    # a class-agnostic Mask R-CNN alone, no classifier: no image has a vote (05 crashed here)
    truth = {"i0": truth_of("cort"), "i1": truth_of(CELL_TYPES[0])}
    start = {"yolox": 1.0, "maskrcnn": 0.5, "upernet": 1.0, "image": 1.0}
    with caplog.at_level("WARNING", logger="neuroseg"):
        weights, acc = tune_vote_weights({"i0": {}, "i1": {}}, truth, start)
    assert weights == start and acc == 0.5  # every image typed CELL_TYPES[0]: one of two right
    assert "no cell-type voter" in caplog.text


def test_the_image_classifier_joins_the_vote_and_single_models_keep_theirs(tuned):
    oof, truth, _, _, _ = tuned
    ids = sorted(truth)
    # every model calls every image cort; the classifier is right but for one image
    wrong = {m: {i: dict(oof[m][i]) for i in ids} for m in ("yolox", "upernet")}
    for i in ids:
        wrong["yolox"][i]["labels"] = np.full_like(wrong["yolox"][i]["labels"], CELL_TYPES.index("cort") + 1)
        wrong["upernet"][i]["cell_type_probs"] = type_probs("cort").astype(np.float16)
    image = {i: type_probs(truth[i].cell_type, 0.6) for i in ids}
    image[ids[0]] = type_probs("cort", 0.6)
    cfg = config.from_dict({"ensemble": {"tune_trials": 2}})
    params, report = tune_ensemble(wrong, truth, cfg, None, image)
    acc = report["vote_accuracy"]
    assert acc["image"] == pytest.approx(5 / 6) and acc["ensemble"] == pytest.approx(5 / 6)
    assert acc["upernet"] == pytest.approx(2 / 6)  # its own vote: right on the two cort images only
    assert params.vote_weights["image"] > 0 and params.vote_weights["maskrcnn"] == 0.0
    # without the classifier nobody votes it, and the ensemble types as badly as the models
    params, report = tune_ensemble(wrong, truth, cfg, None)
    assert params.vote_weights["image"] == 0.0 and report["vote_accuracy"]["ensemble"] == pytest.approx(2 / 6)


@pytest.fixture(scope="module")
def tuned():
    """Two images per cell type; YOLOX adds confident false positives that the default score
    threshold lets through."""
    preds = {f"{t}{k}": image_pred(f"{t}{k}", t, yolox_extra=FALSE_POSITIVES, yolox_score=1.0)
             for t in CELL_TYPES for k in range(2)}
    truth = {i: truth_of(p.image_id[:-1]) for i, p in preds.items()}
    oof = {m: {i: as_oof(p)[m] for i, p in preds.items()} for m in ("yolox", "maskrcnn", "upernet")}
    mask_fns = {i: ellipse_mask_fn() for i in preds}
    # the plain search from the defaults (no gate, no warm start): on two images a type the gate
    # would refuse most steps, and these tests are about the search and its bookkeeping
    cfg = config.from_dict({"ensemble": {"tune_trials": 25, "tune_seed": 0, "min_gain_se": 0.0,
                                         "warm_start": False}})
    params, report = tune_ensemble(oof, truth, cfg, mask_fns)
    for fn in mask_fns.values():  # what the tuning asked, before other tests call fuse with them
        fn.tuning_calls = list(fn.calls)
    return oof, truth, mask_fns, params, report


def test_the_mask_head_never_sees_a_box_below_the_lowest_score_threshold_searched(tuned):
    """ensemble.min_score_threshold (0.1 by default) bounds the search, and the fused boxes scored
    below it get no mask; rows at the thresholds searched are those of an unpruned tuning."""
    from neuroseg.ensemble import tuning

    oof, truth, mask_fns, params, _ = tuned
    assert all(p.score_threshold >= 0.1 for p in params.ensemble.values())
    ids = ["cort0", "cort1"]

    local = {m: dict(oof[m]) for m in oof}  # the fixture's OOF stays as it is
    for i in ids:  # Mask R-CNN's boxes rescored to 0.02-0.2: some fall below the floor
        s = oof["maskrcnn"][i]["scores"]
        local["maskrcnn"][i] = {**oof["maskrcnn"][i], "scores": np.linspace(0.02, 0.2, len(s)).astype(s.dtype)}

    def get_pred(i):
        return predictions_from_oof(i, truth[i].shape, {m: local[m][i] for m in local})
    p = {"model_weights": (0.0, 1.0), "wbf_iou": 0.55, "wbf_skip": 0.01, "upernet_weight": 0.0,
         "mask_threshold": 0.5, "min_area": 0, "max_overlap": 1.0, "upernet_instances": 0.0}
    rows = {}
    for floor in (0.0, 0.1):
        fns = {i: ellipse_mask_fn() for i in ids}
        tuner = tuning._EnsembleTuner(ids, truth, get_pred, fns, "cort", 0.3, None)
        tuner.free_grid = [s for s in SCORE_GRID if s >= floor]
        rows[floor] = tuner.table(p)
        asked = [len(b) for fn in fns.values() for b, _ in fn.calls]
        fused = [len(fusion.fuse_boxes(get_pred(i), tuner.params(p, 0.0))[0]) for i in ids]
        if floor == 0.0:
            assert asked == fused
        else:
            scores = [fusion.fuse_boxes(get_pred(i), tuner.params(p, 0.0))[1] for i in ids]
            assert asked == [int((s >= 0.1).sum()) for s in scores] and sum(asked) < sum(fused)
    np.testing.assert_array_equal(rows[0.1], rows[0.0][:, SCORE_GRID.index(0.1):])


def test_tuned_parameters_beat_the_defaults(tuned):
    _, _, _, params, report = tuned
    s = report["summary"]
    assert s["ensemble"]["overall"] > s["ensemble_defaults"]["overall"] + 0.1
    for t in CELL_TYPES:
        assert s["ensemble"]["per_cell_type"][t] > s["ensemble_defaults"]["per_cell_type"][t]
    assert report["n_images"] == 6 and set(report["evaluations"]["ensemble"]) == set(CELL_TYPES)
    assert all(n <= CHEAP_EVALS_PER_TRIAL * 25 for n in report["evaluations"]["ensemble"].values())


def test_fuse_reproduces_the_tuning_scores(tuned):
    """The tuning's shortcuts (cached crops, pruning, IoU tables) must score what fuse produces."""
    oof, truth, mask_fns, params, report = tuned
    defaults = EnsembleParams.defaults()
    for i, t in truth.items():
        pred = predictions_from_oof(i, (H, W), {m: oof[m][i] for m in oof})
        for p, name in ((params, "ensemble"), (defaults, "ensemble_defaults")):
            out = fuse(pred, p, mask_fns[i])
            assert image_score(iou_matrix(t.indices, out.label)) == pytest.approx(report["per_image"][name][i])
        for model in ("maskrcnn", "upernet"):
            out = single_model(pred, model, params)
            assert image_score(iou_matrix(t.indices, out.label)) == pytest.approx(report["per_image"][model][i])


def test_oof_of_other_sized_images_is_refused_naming_the_image(tuned):
    """An OOF cache left from another data set (same ids, other image size) must not crash deep in
    the painting with an index error: it names the image and what to rerun."""
    oof, _, _, _, _ = tuned
    i = next(iter(oof["upernet"]))
    with pytest.raises(ValueError, match=f"image {i}: UPerNet's OOF probabilities are {H}x{W} px, "
                                         f"the image {H + 8}x{W}: .*rerun 02-04"):
        predictions_from_oof(i, (H + 8, W), {m: oof[m][i] for m in oof})


def test_tune_without_maskrcnn_uses_upernet_masks(tuned):
    oof, truth, _, _, _ = tuned
    cfg = config.from_dict({"ensemble": {"tune_trials": 8}})
    ids = list(truth)[:2]
    params, report = tune_ensemble({m: {i: oof[m][i] for i in ids} for m in ("yolox", "upernet")},
                                   {i: truth[i] for i in ids}, cfg, None)
    assert report["models"] == ["yolox", "upernet"] and "maskrcnn" not in report["per_image"]
    assert params.vote_weights["maskrcnn"] == 0.0
    assert all(p.maskrcnn_weight == 0.0 for p in params.ensemble.values())
    assert report["summary"]["ensemble"]["overall"] >= report["summary"]["ensemble_defaults"]["overall"]
    with pytest.raises(ValueError, match="no image"):
        tune_ensemble({"yolox": {"x": oof["yolox"][ids[0]]}}, {i: truth[i] for i in ids}, cfg, None)


def _toy_run(tmp_path, tuned, n_folds: int = 2):
    """A data dir of the toy images and an output dir with their OOF cache in ``n_folds`` folds."""
    from conftest import write_kaggle_dir
    from ensemble_toys import CELLS, ellipse_in

    from neuroseg.evaluation import oof_cache as oof_mod
    from neuroseg.paths import Paths

    oof, truth, _, _, _ = tuned
    ids = sorted(truth)
    rng = np.random.default_rng(0)
    write_kaggle_dir(tmp_path / "data", {i: (truth[i].cell_type, rng.integers(0, 255, (H, W), dtype=np.uint8),
                                             np.array([ellipse_in(b) for b in CELLS])) for i in ids})
    paths = Paths(tmp_path / "data", tmp_path / "out")
    for m in ("yolox", "upernet"):
        for fold in range(n_folds):
            oof_mod.write_oof(paths, m, fold, [(i, oof[m][i]) for i in ids[fold::n_folds]], "hash", "sha")
    return paths


def test_run_ensemble_writes_params_report_and_skips_when_fresh(tmp_path, tuned):
    from neuroseg.evaluation import oof_cache as oof_mod
    from neuroseg.inference.predict import load_params
    from neuroseg.paths import Paths
    from neuroseg.pipeline.tune_ensemble import run_ensemble
    from neuroseg.utils.atomic_io import read_json

    cfg = config.from_dict({"folds": {"n_folds": 2}, "ensemble": {"models": ["yolox", "upernet"],
                                                                  "tune_trials": 4}})
    with pytest.raises(oof_mod.OOFError, match="yolox fold 0.*02_train_yolox.py"):
        run_ensemble(cfg, Paths(tmp_path / "data", tmp_path / "empty"))
    paths = _toy_run(tmp_path, tuned)
    out = run_ensemble(cfg, paths)
    stored = read_json(out)
    assert stored["n_images"] == 6 and stored["models"] == ["yolox", "upernet"]
    assert set(stored["scores"]) == {"upernet", "ensemble", "ensemble_defaults"}
    assert load_params(paths) == EnsembleParams.from_json(stored["params"])  # what 06 reads
    assert load_params(paths).cell_type_classifier is not None and "image" in stored["vote_accuracy"]
    report = paths.ensemble_report.read_text()
    assert "| ensemble |" in report and paths.ensemble_figure("scores").is_file()
    s = stored["scores"]  # UPerNet is the only single model here
    gains = ", ".join(f"{t} {s['ensemble']['per_cell_type'][t] - s['upernet']['per_cell_type'][t]:+.4f} (vs upernet)"
                      for t in CELL_TYPES)
    assert f"Per cell type, vs that type's best single model: {gains}." in report
    assert paths.ensemble_figure("overlay_astro").is_file()
    assert len(np.genfromtxt(paths.ensemble_oof_scores, delimiter=",", skip_header=1)) == 6
    # beside the in-sample scores, each fold scored with parameters tuned on the other fold
    cv = stored["scores_cross_validated"]
    assert set(cv) == {"ensemble", "upernet"}
    assert cv["ensemble"]["images_per_cell_type"] == {t: 2 for t in CELL_TYPES}
    assert f"| ensemble | {cv['ensemble']['overall']:.4f} |" in report.split("### Cross-validated")[1]
    # a second run with nothing changed does nothing; a changed setting or --force redoes it
    mtime = out.stat().st_mtime_ns
    run_ensemble(cfg, paths)
    assert out.stat().st_mtime_ns == mtime
    run_ensemble(cfg, paths, force=True)
    assert out.stat().st_mtime_ns > mtime
    mtime = out.stat().st_mtime_ns
    run_ensemble(config.from_dict({**cfg.to_dict(), "ensemble": {**cfg.to_dict()["ensemble"], "tune_seed": 1}}),
                 paths)
    assert out.stat().st_mtime_ns > mtime


def test_fold_tunings_in_other_processes_score_as_in_one(tmp_path, tuned, caplog):
    # ensemble.workers: the cross-validated fold tunings run in spawned processes beside the
    # in-sample one; the figures must be those of one process doing everything in turn
    from neuroseg.pipeline.tune_ensemble import run_ensemble
    from neuroseg.utils.atomic_io import read_json

    paths = _toy_run(tmp_path, tuned, n_folds=3)
    stored = {}
    for workers in (1, 3):
        cfg = config.from_dict({"folds": {"n_folds": 3}, "ensemble": {"models": ["yolox", "upernet"],
                                                                      "tune_trials": 4, "workers": workers}})
        with caplog.at_level("INFO", logger="neuroseg"):
            caplog.clear()
            stored[workers] = read_json(run_ensemble(cfg, paths, force=True))
        spawned = "cross-validated tuning of folds [0, 1, 2] in 2 more process(es)" in caplog.text
        assert spawned == (workers == 3)
    cv = stored[1]["scores_cross_validated"]
    assert set(cv) == {"ensemble", "upernet"} and cv["ensemble"]["images_per_cell_type"] == {t: 2 for t in CELL_TYPES}
    assert stored[3]["scores_cross_validated"] == cv
    assert stored[3]["params"] == stored[1]["params"] and stored[3]["scores"] == stored[1]["scores"]


def test_tuning_processes_by_hand_and_a_negative_count_refused():
    from neuroseg.pipeline.tune_ensemble import tuning_processes

    def cfg(workers):
        return config.from_dict({"ensemble": {"workers": workers}})

    assert tuning_processes(cfg(1), 4) == 1
    assert tuning_processes(cfg(8), 2) == 3  # the main process + one per fold, no more
    assert tuning_processes(cfg(3), 0) == 1  # nothing to cross-validate
    with pytest.raises(ValueError, match=r"ensemble.workers must be >= 0 .* got -2"):
        tuning_processes(cfg(-2), 2)


def test_the_05_script_refuses_a_negative_workers_count_or_gate_in_one_line(tmp_path, tuned, capsys):
    import importlib.util

    paths = _toy_run(tmp_path, tuned)
    spec = importlib.util.spec_from_file_location("ensemble_05", "05_ensemble.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--data-dir", str(paths.data_dir), "--output-dir", str(paths.output_dir),
            "--set", "folds.n_folds=2", "--set", "ensemble.models=[yolox,upernet]"]
    code = script.main([*args, "--set", "ensemble.workers=-1"])
    err = capsys.readouterr().err
    assert code == 1 and "05_ensemble: ensemble.workers must be >= 0" in err and "Traceback" not in err
    assert not paths.ensemble_params.exists()
    code = script.main([*args, "--set", "ensemble.min_gain_se=-0.5"])
    err = capsys.readouterr().err
    assert code == 1 and "05_ensemble: ensemble.min_gain_se must be >= 0 (0: no gate), got -0.5" in err
    assert "Traceback" not in err and not paths.ensemble_params.exists()


def test_cross_validated_scores_of_some_folds_only(tuned):
    from neuroseg.ensemble.cross_validation import cross_validated_scores

    oof, truth, _, _, _ = tuned
    ids = sorted(truth)
    fold_of = {i: k % 3 for k, i in enumerate(ids)}
    models = {m: oof[m] for m in ("yolox", "upernet")}
    cfg = config.from_dict({"ensemble": {"tune_trials": 4}})
    every = cross_validated_scores(models, truth, fold_of, cfg)["per_image"]
    part = cross_validated_scores(models, truth, fold_of, cfg, only_folds=[2])["per_image"]
    assert set(part["ensemble"]) == {i for i in ids if fold_of[i] == 2}
    assert part["ensemble"] == {i: every["ensemble"][i] for i in part["ensemble"]}
    with pytest.raises(ValueError, match=r"folds \[5\] hold none of the images"):
        cross_validated_scores(models, truth, fold_of, cfg, only_folds=[5])


def test_mask_head_checkpoint_must_be_the_one_that_wrote_the_oof(tmp_path):
    from neuroseg.evaluation import oof_cache as oof_mod
    from neuroseg.paths import Paths
    from neuroseg.pipeline.tune_ensemble import OOFMaskFns

    paths = Paths(tmp_path / "data", tmp_path / "out")
    manifests = {0: {"image_ids": ["a"], "checkpoint_sha256": "0" * 64}}
    with pytest.raises(FileNotFoundError, match="03_train_maskrcnn.py"):
        OOFMaskFns(config.from_dict({}), paths, manifests)
    paths.best_checkpoint("maskrcnn", 0).parent.mkdir(parents=True)
    paths.best_checkpoint("maskrcnn", 0).write_bytes(b"retrained")
    with pytest.raises(oof_mod.OOFError, match="not the checkpoint"):
        OOFMaskFns(config.from_dict({"device": "cpu"}), paths, manifests)


def test_tuning_asks_the_mask_head_only_for_new_boxes(tuned):
    _, _, mask_fns, _, report = tuned
    for fn in mask_fns.values():
        asked = [{b.tobytes() for b in boxes.astype(np.float32)} for boxes, _ in fn.tuning_calls]
        assert asked and all(not (a & b) for a, b in zip(asked, asked[1:]))
    # so fewer calls than evaluations: WBF IoU and skip settings leave these separated boxes as they are
    assert max(len(fn.tuning_calls) for fn in mask_fns.values()) < report["evaluations"]["ensemble"]["cort"]


def test_05_leaves_the_classifier_out_when_a_fold_lacks_a_cell_type(tmp_path, caplog):
    from conftest import write_kaggle_dir

    from neuroseg.ensemble.celltype import fit_cell_type_classifier
    from neuroseg.paths import Paths

    rng = np.random.default_rng(0)
    ids = [f"{t}{k}" for t in CELL_TYPES for k in range(2)]
    write_kaggle_dir(tmp_path / "data", {i: (i[:-1], rng.integers(0, 255, (H, W), dtype=np.uint8),
                                             np.array([ellipse_in(CELLS[0])])) for i in ids})
    paths = Paths(tmp_path / "data", tmp_path / "out")
    truth = {i: truth_of(i[:-1]) for i in ids}
    types = {i: t.cell_type for i, t in truth.items()}
    clf, probs = fit_cell_type_classifier(paths, types, {i: k % 2 for k, i in enumerate(ids)})
    assert clf is not None and set(probs) == set(ids)
    # only the astro images in fold 1: fold 0's classifier, fitted on fold 1, would know astro alone
    with caplog.at_level("WARNING", logger="neuroseg"):
        assert fit_cell_type_classifier(paths, types, {i: int(i.startswith("astro")) for i in ids}) == (None, None)
    assert "left out: the images outside fold 0 have no ['cort', 'shsy5y']" in caplog.text


def test_05_classifier_learns_from_every_labelled_image_when_one_fold_was_trained(tmp_path):
    from conftest import write_kaggle_dir

    from neuroseg.ensemble.celltype import fit_cell_type_classifier
    from neuroseg.paths import Paths
    import pandas as pd

    from neuroseg.data.pseudo_labels import holdout_ids
    from neuroseg.pipeline.tune_ensemble import labelled_folds

    rng = np.random.default_rng(0)
    ids = [f"{t}{k}" for t in CELL_TYPES for k in range(3)]
    write_kaggle_dir(tmp_path / "data", {i: (i[:-1], rng.integers(0, 255, (H, W), dtype=np.uint8),
                                             np.array([ellipse_in(CELLS[0])])) for i in ids})
    paths = Paths(tmp_path / "data", tmp_path / "out")
    types = {i: i[:-1] for i in ids}
    oof_fold = {i: 0 for i in ids if i.endswith("0")}  # configs/reference.yaml: fold 0 trained alone
    # the OOF images alone: fold 0 has no other fold to learn from
    assert fit_cell_type_classifier(paths, types, oof_fold) == (None, None)
    paths.folds_csv.parent.mkdir(parents=True)
    paths.folds_csv.write_text("id,fold,cell_type\n" + "".join(f"{i},{int(i[-1])},{i[:-1]}\n" for i in ids)
                               + "gone,1,cort\n")
    truth = {i: truth_of(t) for i, t in types.items()}
    folds = labelled_folds(config.from_dict({}), paths, oof_fold, truth)
    assert folds == {i: int(i[-1]) for i in ids}  # "gone" is not in train.csv's truth
    clf, probs = fit_cell_type_classifier(paths, types, folds)
    assert clf is not None and set(probs) == set(ids)
    assert labelled_folds(config.from_dict({}), Paths(tmp_path / "data", tmp_path / "none"), oof_fold, {}) == oof_fold
    # images held out as unlabelled (pseudo.holdout_fraction) stay out of the classifier too
    holdout = config.from_dict({"pseudo": {"holdout_fraction": 0.4}})
    held = holdout_ids(holdout, pd.read_csv(paths.folds_csv, dtype=str, keep_default_na=False))
    oof_kept = {i: f for i, f in oof_fold.items() if i not in held}  # training leaves them out too
    assert held and set(labelled_folds(holdout, paths, oof_kept, truth)) == set(ids) - held


def test_ensemble_rows_without_upernet_instances_are_shared_whatever_upernet_params(tuned):
    """UPerNet's post-processing (each tuning tunes its own) changes an ensemble row only where
    its instances join (``upernet_instances`` > 0): elsewhere another tuning reuses the row."""
    import dataclasses

    from neuroseg.ensemble import tuning

    oof, truth, mask_fns, params, _ = tuned
    ids = ["cort0", "cort1"]

    def get_pred(i):
        return predictions_from_oof(i, truth[i].shape, {m: oof[m][i] for m in oof})

    memo = tuning.TuningMemo(tuning.MaskMemo(2**30))
    p = {"model_weights": (1.0, 1.0), "wbf_iou": 0.55, "wbf_skip": 0.05, "upernet_weight": 0.3,
         "mask_threshold": 0.5, "min_area": 10, "max_overlap": 1.0, "upernet_instances": 0.0}
    up = params.upernet["cort"]
    other = dataclasses.replace(up, seed_threshold=up.seed_threshold + 0.1)
    first = tuning._EnsembleTuner(ids, truth, get_pred, mask_fns, "cort", 0.3, up, memo)
    second = tuning._EnsembleTuner(ids, truth, get_pred, mask_fns, "cort", 0.3, other, memo)
    rows = first.table(p)
    calls = []
    second.image_row = lambda i, q: calls.append(i) or first.image_row(i, q)
    np.testing.assert_array_equal(second.table(p), rows)
    assert calls == []  # reused
    second.table({**p, "upernet_instances": 0.5})
    assert calls == ids  # UPerNet's instances join: its own parameters, its own rows
