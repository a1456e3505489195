"""OOF cache: format, freshness, atomic replacement, original coordinates, score-oof."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_oof

from neuroseg.evaluation import oof_cache
from neuroseg.paths import Paths
from neuroseg.pipeline import train_folds


def det(n: int, masks: bool = False) -> dict:
    rng = np.random.default_rng(n)
    xy = rng.uniform(0, 50, (n, 2))
    out = {"boxes": np.concatenate([xy, xy + 5], 1), "scores": rng.uniform(0, 1, n),
           "labels": np.full(n, 2)}
    if masks:
        out["mask_probs"] = rng.uniform(0, 1, (n, 28, 28))
    return out


@pytest.fixture()
def paths(tmp_path):
    return Paths(tmp_path / "data", tmp_path / "out")


def test_write_then_load_casts_to_the_documented_dtypes(paths):
    oof_cache.write_oof(paths, "maskrcnn", 1, [("a", det(3, masks=True)), ("b", det(1, masks=True))], "cfg1", "sha1")
    manifest = json.loads((paths.oof_dir("maskrcnn", 1) / "manifest.json").read_text())
    assert manifest == {"model": "maskrcnn", "fold": 1, "config_hash": "cfg1", "checkpoint_sha256": "sha1",
                        "image_ids": ["a", "b"], "format": 1}
    loaded = load_oof(paths, "maskrcnn", 1)
    a = loaded["a"]
    assert {k: str(v.dtype) for k, v in a.items()} == {
        "boxes": "float32", "scores": "float32", "labels": "int64", "mask_probs": "float16"}
    assert a["boxes"].shape == (3, 4) and a["mask_probs"].shape == (3, 28, 28)
    assert np.allclose(a["boxes"], det(3)["boxes"], atol=1e-4)
    assert [i for i, _ in oof_cache.iter_oof(paths, "maskrcnn", 1)] == ["a", "b"]


def test_empty_detections_and_upernet_values_read_back_as_written(paths):
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}
    oof_cache.write_oof(paths, "yolox", 0, [("x", empty)], "c", "s")
    got = load_oof(paths, "yolox", 0)
    assert list(got) == ["x"] and sorted(got["x"]) == ["boxes", "labels", "scores"]
    for key, dtype, shape in (("boxes", np.float32, (0, 4)), ("scores", np.float32, (0,)), ("labels", np.int64, (0,))):
        assert got["x"][key].dtype == dtype and got["x"][key].shape == shape, key
    # UPerNet: 1/3 everywhere but one pixel per channel; probabilities float16, the vote float32
    probs = np.full((3, 4, 5), 1 / 3)
    probs[:, 2, 3] = [0.0, 0.25, 0.75]
    oof_cache.write_oof(paths, "upernet", 0, [("x", {"probs": probs, "cell_type_probs": [0.2, 0.3, 0.5]})], "c", "s")
    got = load_oof(paths, "upernet", 0)
    assert list(got) == ["x"] and sorted(got["x"]) == ["cell_type_probs", "probs"]
    assert got["x"]["probs"].dtype == np.float16 and got["x"]["cell_type_probs"].dtype == np.float32
    expected = np.full((3, 4, 5), np.float16(1 / 3), np.float16)  # 0.33325: float16's nearest to 1/3
    expected[:, 2, 3] = [0.0, 0.25, 0.75]  # exact in float16
    np.testing.assert_array_equal(got["x"]["probs"], expected)
    assert got["x"]["probs"][0, 0, 0] == np.float16(0.33325)
    np.testing.assert_array_equal(got["x"]["cell_type_probs"], np.array([0.2, 0.3, 0.5], np.float32))


def test_detections_read_back_with_the_values_written(paths):
    pred = {"boxes": np.array([[1.5, 2.0, 10.25, 12.0], [0.0, 0.0, 3.0, 4.0]]), "scores": np.array([0.75, 0.5]),
            "labels": np.array([3, 1], np.int32), "mask_probs": np.zeros((2, 28, 28))}
    pred["mask_probs"][0, 3, 4] = 0.5
    pred["mask_probs"][1] = 1.0
    oof_cache.write_oof(paths, "maskrcnn", 0, [("m", pred)], "c", "s")
    got = load_oof(paths, "maskrcnn", 0)["m"]
    assert sorted(got) == ["boxes", "labels", "mask_probs", "scores"]
    np.testing.assert_array_equal(got["boxes"], np.array([[1.5, 2.0, 10.25, 12.0], [0, 0, 3, 4]], np.float32))
    np.testing.assert_array_equal(got["scores"], np.array([0.75, 0.5], np.float32))
    np.testing.assert_array_equal(got["labels"], np.array([3, 1], np.int64))
    assert got["labels"].dtype == np.int64 and got["boxes"].dtype == got["scores"].dtype == np.float32
    assert got["mask_probs"].dtype == np.float16 and got["mask_probs"].shape == (2, 28, 28)
    assert got["mask_probs"][0, 3, 4] == 0.5 and np.count_nonzero(got["mask_probs"][0]) == 1
    assert (got["mask_probs"][1] == 1).all()


def test_an_image_given_twice_is_refused_naming_it_and_the_old_cache_stays(paths):
    oof_cache.write_oof(paths, "yolox", 0, [("old", det(1))], "v1", "s")
    with pytest.raises(oof_cache.OOFError, match=r"^yolox fold 0: image img3 predicted twice$"):
        oof_cache.write_oof(paths, "yolox", 0, [("img3", det(1)), ("img4", det(2)), ("img3", det(2))], "v2", "s")
    assert oof_cache.is_fresh(paths, "yolox", 0, "v1", "s") and not oof_cache.is_fresh(paths, "yolox", 0, "v2", "s")
    assert list(load_oof(paths, "yolox", 0)) == ["old"]
    assert not [p for p in paths.oof_dir("yolox", 0).parent.iterdir() if p.name.startswith(".")]  # no temp dir


def test_an_empty_write_is_refused_not_cached_as_fresh(paths):
    # an empty fold cache would read as fresh to 05 and hold nothing: no cache instead
    with pytest.raises(oof_cache.OOFError, match=r"^upernet fold 2: no predictions to cache$"):
        oof_cache.write_oof(paths, "upernet", 2, [], "c", "s")
    assert not paths.oof_dir("upernet", 2).exists()
    assert not list(paths.oof_dir("upernet", 2).parent.iterdir())  # nor a temp dir left
    assert not oof_cache.is_fresh(paths, "upernet", 2, "c", "s")
    # ... and an empty rewrite keeps the cache that was there
    oof_cache.write_oof(paths, "upernet", 2, [("u", {"probs": np.zeros((3, 2, 2)), "cell_type_probs": [1, 0, 0]})],
                        "c", "s")
    with pytest.raises(oof_cache.OOFError, match="no predictions"):
        oof_cache.write_oof(paths, "upernet", 2, iter(()), "c2", "s")
    assert oof_cache.is_fresh(paths, "upernet", 2, "c", "s") and list(load_oof(paths, "upernet", 2)) == ["u"]


@pytest.mark.parametrize("model, pred, match", [
    ("yolox", {"boxes": np.zeros((1, 4)), "scores": np.zeros(1)}, r"lacks \['labels'\]"),
    ("yolox", {**det(2), "labels": np.array([1, 4])}, r"labels must be in 0..3"),
    ("maskrcnn", {**det(2), "mask_probs": np.zeros((2, 28, 28)), "labels": np.array([-1, 0])}, r"labels must be in 0..3"),
    ("yolox", {**det(2), "scores": np.zeros(3)}, "inconsistent shapes"),
    ("maskrcnn", {**det(2), "mask_probs": np.zeros((2, 14, 14))}, "inconsistent shapes"),
    ("upernet", {"probs": np.zeros((2, 4, 4)), "cell_type_probs": np.zeros(3)}, r"expected \(3,H,W\)"),
])
def test_malformed_prediction_is_refused_and_leaves_no_cache(paths, model, pred, match):
    with pytest.raises(oof_cache.OOFError, match=match):
        oof_cache.write_oof(paths, model, 0, [("img7", pred)], "c", "s")
    assert not paths.oof_dir(model, 0).exists()
    assert not list(paths.oof_dir(model, 0).parent.glob(".fold0.tmp-*"))  # temp dir cleaned up


def test_freshness_follows_config_checkpoint_and_completeness(paths):
    oof_cache.write_oof(paths, "yolox", 2, [("a", det(2)), ("b", det(1))], "cfg", "sha")
    assert oof_cache.is_fresh(paths, "yolox", 2, "cfg", "sha")
    assert not oof_cache.is_fresh(paths, "yolox", 2, "other", "sha")
    assert not oof_cache.is_fresh(paths, "yolox", 2, "cfg", "other")
    assert not oof_cache.is_fresh(paths, "yolox", 1, "cfg", "sha")
    (paths.oof_dir("yolox", 2) / "b.npz").unlink()
    assert not oof_cache.is_fresh(paths, "yolox", 2, "cfg", "sha")
    with pytest.raises(oof_cache.OOFError, match="partial OOF cache"):
        load_oof(paths, "yolox", 2)


def test_rewrite_replaces_the_whole_cache_never_mixes(paths):
    oof_cache.write_oof(paths, "yolox", 0, [("old1", det(1)), ("old2", det(1))], "v1", "s")
    oof_cache.write_oof(paths, "yolox", 0, [("new", det(2))], "v2", "s")
    d = paths.oof_dir("yolox", 0)
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "new.npz"]
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]


def test_a_failed_rewrite_keeps_the_previous_cache(paths):
    oof_cache.write_oof(paths, "yolox", 0, [("a", det(1))], "v1", "s")

    def broken():
        yield "b", det(1)
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError, match="killed"):
        oof_cache.write_oof(paths, "yolox", 0, broken(), "v2", "s")
    assert oof_cache.is_fresh(paths, "yolox", 0, "v1", "s")
    assert list(load_oof(paths, "yolox", 0)) == ["a"]


def test_missing_cache_error_says_what_to_run(paths):
    with pytest.raises(oof_cache.OOFError, match="train the model first"):
        load_oof(paths, "upernet", 3)


def test_to_original_undoes_the_training_scale_per_axis():
    pred = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 26.0]]), "scores": torch.tensor([0.9]),
            "labels": torch.tensor([3]), "mask_probs": torch.rand(1, 28, 28)}
    got = oof_cache.to_original("maskrcnn", pred, input_hw=(26, 35), original_hw=(52, 70))
    assert np.allclose(got["boxes"], [[20, 40, 60, 52]])
    assert np.allclose(got["mask_probs"], pred["mask_probs"].numpy(), atol=1e-3)  # box-relative: as is
    probs = torch.zeros(3, 2, 3)
    probs[1, :, :] = 1.0
    up = oof_cache.to_original("upernet", {"probs": probs, "cell_type_probs": torch.tensor([1.0, 0, 0])},
                         input_hw=(2, 3), original_hw=(4, 6))
    assert up["probs"].shape == (3, 4, 6) and np.all(up["probs"][1] == 1)


class FullImageBox(torch.nn.Module):
    """Predicts one box covering its whole input: after OOF it must cover the original image."""

    def forward(self, images):
        h, w = images.shape[-2:]
        return [{"boxes": torch.tensor([[0.0, 0.0, w, h]]), "scores": torch.tensor([0.5]),
                 "labels": torch.tensor([1])} for _ in images]


def test_predict_images_reports_original_coordinates(tmp_path):
    from PIL import Image

    for name, (h, w) in {"p": (52, 70), "q": (40, 40)}.items():  # two sizes in one batch
        Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / f"{name}.png")
    out = dict(train_folds.predict_images(FullImageBox(), "yolox", [tmp_path / "p.png", tmp_path / "q.png"],
                                       scale=0.5, batch_size=2, device=torch.device("cpu")))
    assert np.allclose(out["p"]["boxes"], [[0, 0, 70, 52]])
    assert np.allclose(out["q"]["boxes"], [[0, 0, 40, 40]])


# ---- score-oof ----

def truth_of(paths, image_id):
    from neuroseg.data.records import group_records, read_train_csv

    return next(r for r in group_records(read_train_csv(paths.clean_train_csv, paths.train_images))
                if r.image_id == image_id)


def perfect(model, rec):
    from neuroseg.pipeline.score_oof import truth_boxes, truth_indices

    boxes = truth_boxes(rec).numpy()
    n = len(boxes)
    if model == "upernet":
        probs = np.zeros((3, rec.height, rec.width), np.float32)
        probs[0] = 1
        for idx in truth_indices(rec):
            probs[:, idx // rec.width, idx % rec.width] = np.array([0, 1, 0])[:, None]
        return {"probs": probs, "cell_type_probs": np.array([1.0, 0, 0])}
    out = {"boxes": boxes, "scores": np.linspace(0.9, 0.5, n), "labels": np.ones(n, int)}
    if model == "maskrcnn":
        out["mask_probs"] = np.ones((n, 28, 28))
    return out


# Mask R-CNN: an all-ones 28x28 mask in a cell's exact 8x7 box (edges x0..x0+8) pastes pixels
# ceil(x0)..floor(x0+8), i.e. 9x8 px (box_masks: pixel i at coordinate i): IoU 56/72 = 0.78, a
# match at thresholds 0.5-0.75, so 6 of 10 thresholds: 0.6.
@pytest.mark.parametrize("model, key, expected", [("yolox", "ap50", 1.0), ("maskrcnn", "score", 0.6),
                                                  ("upernet", "score", 1.0)])
def test_score_oof_cli_scores_a_perfect_cache_high_and_a_miss_zero(tmp_path, capsys, model, key, expected):
    import engine_toys as T

    from neuroseg import cli

    paths = T.make_dataset(tmp_path, n_images=8)
    val = ["img00", "img02", "img04", "img06"]
    preds = {i: perfect(model, truth_of(paths, i)) for i in val}
    if model == "upernet":  # one image predicted empty: all background
        preds["img06"]["probs"][:] = np.array([1.0, 0, 0])[:, None, None]
    else:  # one image's boxes moved off its cells
        preds["img06"]["boxes"] = preds["img06"]["boxes"][:, [2, 3, 2, 3]] + [0, 0, 3, 3]
    oof_cache.write_oof(paths, model, 0, list(preds.items()), "c", "s")
    argv = ["score-oof", model, "--data-dir", str(paths.data_dir), "--output-dir", str(paths.output_dir),
            "--set", "folds.n_folds=2", "--json"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["folds"] == [0] and result["overall"]["images"] == 4
    by_type = result["by_cell_type"]  # img06 is shsy5y (i % 3 == 0), with img00
    assert by_type["astro"][key] == pytest.approx(expected) and by_type["cort"][key] == pytest.approx(expected)
    assert by_type["shsy5y"]["images"] == 2
    assert by_type["shsy5y"][key] == pytest.approx(expected / 2)
    assert result["overall"][key] == pytest.approx(expected * 3 / 4)


def test_lazy_oof_keeps_decoded_images_within_its_budget(paths, monkeypatch):
    pred = {"probs": np.full((3, 40, 50), 0.25), "cell_type_probs": [0.2, 0.3, 0.5]}
    oof_cache.write_oof(paths, "upernet", 0, [(i, pred) for i in "abc"], "c", "s")
    manifests = {0: oof_cache.read_manifest(paths, "upernet", 0)}
    size = sum(a.nbytes for a in load_oof(paths, "upernet", 0)["a"].values())
    loads = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    lazy = oof_cache.LazyOOF(paths, "upernet", manifests, keep_mb=2.5 * size / 2**20)  # room for two
    first = lazy["a"]
    assert lazy["a"] is first and len(loads) == 1  # kept: not read again
    with pytest.raises(ValueError, match="read-only"):
        first["probs"][0, 0, 0] = 1.0  # shared with every later reader
    lazy["b"], lazy["c"]  # "a" is the least recently used of three: dropped
    assert len(loads) == 3 and lazy["c"] is lazy["c"] and len(loads) == 3
    np.testing.assert_array_equal(lazy["a"]["probs"], first["probs"])
    assert len(loads) == 4
    unkept = oof_cache.LazyOOF(paths, "upernet", manifests)  # no budget: read on every access
    unkept["a"], unkept["a"]
    assert len(loads) == 6
