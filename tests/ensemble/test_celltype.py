"""The image-statistics cell-type classifier: features with known values, fit/predict on textures
that differ as the three cell lines do, its JSON form, and the honesty of its out-of-fold
probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from neuroseg.config import CELL_TYPES
from neuroseg.ensemble.celltype import CellTypeClassifier, feature_names, image_features, out_of_fold_probs


def texture(cell_type: str, seed: int, shape=(96, 128)) -> np.ndarray:
    """Noise smoothed at a scale per type -- fine mesh (shsy5y), large flat blobs (astro), mid-size
    bodies (cort) -- with a random brightness, so only the texture tells them apart."""
    rng = np.random.default_rng(seed)
    sigma = {"shsy5y": 0.7, "astro": 6.0, "cort": 2.5}[cell_type]
    x = ndi.gaussian_filter(rng.normal(size=shape), sigma)
    x = (x - x.mean()) / x.std()
    return np.clip(rng.uniform(100, 150) + 20 * x, 0, 255).astype(np.uint8)


def test_features_of_a_flat_image_are_known():
    f = dict(zip(feature_names(), image_features(np.full((40, 50), 51, np.uint8))))
    assert len(f) == len(image_features(np.zeros((8, 8), np.uint8)))
    assert f["mean"] == pytest.approx(0.2) and f["std"] == pytest.approx(0, abs=1e-7)
    assert all(f[f"p{q}"] == pytest.approx(0.2) for q in (1, 50, 99))
    assert f["hp1_std"] == pytest.approx(0, abs=1e-6) and f["grad_p99"] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        image_features(np.zeros((4, 4, 3), np.uint8))


def test_features_see_texture_not_brightness():
    fine, coarse = image_features(texture("shsy5y", 0)), image_features(texture("astro", 0))
    names = feature_names()
    assert fine[names.index("hp1_std")] > 3 * coarse[names.index("hp1_std")]
    # the high-frequency share of the power spectrum is larger for the fine texture
    assert fine[-1] > coarse[-1] + 1
    brighter = image_features(np.clip(texture("cort", 3).astype(int) + 40, 0, 255).astype(np.uint8))
    same = image_features(texture("cort", 3))
    np.testing.assert_allclose(brighter[names.index("hp2_std"):], same[names.index("hp2_std"):], rtol=1e-4)


def _data(n_per_type: int, seed0: int = 0) -> tuple[np.ndarray, list[str]]:
    types = [t for t in CELL_TYPES for _ in range(n_per_type)]
    return np.stack([image_features(texture(t, seed0 + k)) for k, t in enumerate(types)]), types


def test_classifier_learns_the_textures_and_round_trips_through_json():
    X, y = _data(6)
    clf = CellTypeClassifier.fit(X, y)
    X_new, y_new = _data(3, seed0=100)
    probs = clf.predict_proba(X_new)
    assert probs.shape == (9, 3)
    np.testing.assert_allclose(probs.sum(1), 1)
    assert [CELL_TYPES[k] for k in probs.argmax(1)] == y_new
    np.testing.assert_allclose(clf.predict_proba(X_new[0]), probs[0])  # one image: (3,)
    back = CellTypeClassifier.from_json(json.loads(json.dumps(clf.to_json())))
    np.testing.assert_allclose(back.predict_proba(X_new), probs)
    with pytest.raises(ValueError, match="features given"):
        clf.predict_proba(X_new[:, :5])


def test_classifier_errors():
    X, y = _data(2)
    clf = CellTypeClassifier.fit(X, y)
    stale = {**clf.to_json(), "features": feature_names()[:-1]}
    with pytest.raises(ValueError, match="rerun 05"):
        CellTypeClassifier.from_json(stale)
    with pytest.raises(ValueError, match="inconsistent"):
        CellTypeClassifier.from_json({**clf.to_json(), "intercept": [0.0, 1.0]})
    with pytest.raises(ValueError, match=r"no training image of \['cort'\]"):
        CellTypeClassifier.fit(X[:4], y[:4])
    with pytest.raises(ValueError, match="feature rows"):
        CellTypeClassifier.fit(X, y[:-1])


def test_out_of_fold_probabilities_never_see_the_image_itself():
    X, y = _data(4)
    folds = [k % 2 for k in range(len(y))]
    probs = out_of_fold_probs(X, y, folds)
    assert [CELL_TYPES[k] for k in probs.argmax(1)] == y
    # relabel fold 0's images: fold 0's probabilities (fitted on fold 1) stay, fold 1's change
    wrong = [CELL_TYPES[(CELL_TYPES.index(t) + 1) % 3] if f == 0 else t for t, f in zip(y, folds)]
    again = out_of_fold_probs(X, wrong, folds)
    held = np.array(folds) == 0
    np.testing.assert_allclose(again[held], probs[held])
    assert not np.allclose(again[~held], probs[~held])
    with pytest.raises(ValueError, match=r"outside fold 0 have no \['cort', 'shsy5y'\]"):
        out_of_fold_probs(X, y, [1 if t == "astro" else 0 for t in y])
