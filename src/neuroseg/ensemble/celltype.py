"""Cell type of an image from its texture: a few image statistics and a logistic regression.

The ensemble picks every post-processing parameter by the image's cell type, and the models'
own class votes are only as good as the models: trained from scratch on 100 CPU images they
type 40-75 % of the images right (shsy5y and cort look alike to them). The three cell lines
differ plainly in texture, though -- shsy5y a dense mesh of neurites, cort small round bodies,
astro large flat cells -- so statistics of the whole image separate them: intensity
percentiles, high-pass energy at four scales, gradient magnitudes and the radial power
spectrum. A linear model on them needs no GPU and a few seconds to fit.

05 fits it fold by fold on the training folds of ``folds.csv`` (so its out-of-fold
probabilities are as honest as the models') and once on every image for the test set; its
probabilities then vote with the models (``fusion.type_votes``, voter ``"image"``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

from neuroseg.config import CELL_TYPES
from neuroseg.paths import Paths

log = logging.getLogger("neuroseg")

FORMAT = 1
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
HIGH_PASS_SIGMAS = (1, 2, 4, 8)
SPECTRUM_EDGES = tuple(np.geomspace(0.003, 0.5, 12).round(5).tolist())  # cycles per pixel


def feature_names() -> list[str]:
    names = ["mean", "std", *[f"p{q}" for q in PERCENTILES]]
    for s in HIGH_PASS_SIGMAS:
        names += [f"hp{s}_std", f"hp{s}_abs_mean", f"hp{s}_abs_p95"]
    names += ["grad_mean", "grad_std", "grad_p50", "grad_p90", "grad_p99"]
    names += [f"spectrum_{a:g}_{b:g}" for a, b in zip(SPECTRUM_EDGES[:-1], SPECTRUM_EDGES[1:])]
    return names


def image_features(image: np.ndarray) -> np.ndarray:
    """``uint8 (H, W)`` -> ``float64 (F,)`` in the order of :func:`feature_names`. The spectrum is
    binned by frequency and normalised by the total power, so it does not depend on image size."""
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"image_features: expected a non-empty (H, W) image, got shape {image.shape}")
    x = image.astype(np.float32) / 255.0
    f = [x.mean(), x.std(), *np.percentile(x, PERCENTILES)]
    for s in HIGH_PASS_SIGMAS:
        hp = np.abs(x - ndi.gaussian_filter(x, s))
        f += [hp.std(), hp.mean(), np.percentile(hp, 95)]
    grad = np.hypot(ndi.sobel(x, 0), ndi.sobel(x, 1))
    f += [grad.mean(), grad.std(), *np.percentile(grad, (50, 90, 99))]
    power = np.abs(np.fft.rfft2(x - x.mean())) ** 2
    radius = np.hypot(np.fft.fftfreq(x.shape[0])[:, None], np.fft.rfftfreq(x.shape[1])[None, :])
    total = power.sum() + 1e-12
    for a, b in zip(SPECTRUM_EDGES[:-1], SPECTRUM_EDGES[1:]):
        f.append(np.log(power[(radius >= a) & (radius < b)].sum() / total + 1e-12))
    return np.asarray(f, dtype=np.float64)


@dataclass(eq=False)
class CellTypeClassifier:
    """Standardised features -> softmax over ``CELL_TYPES``. Stored as plain numbers (JSON), so
    applying it needs NumPy only."""

    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    coef: np.ndarray  # (3, F)
    intercept: np.ndarray  # (3,)

    def __eq__(self, other: object) -> bool:  # the dataclass one would compare arrays to a bool
        return isinstance(other, CellTypeClassifier) and all(
            np.array_equal(getattr(self, k), getattr(other, k)) for k in ("mean", "scale", "coef", "intercept"))

    @classmethod
    def fit(cls, features: np.ndarray, cell_types: Sequence[str], c: float = 1.0) -> "CellTypeClassifier":
        """Multinomial logistic regression (scikit-learn's, L2 with inverse strength ``c``) on
        standardised features. Every cell type must occur; one that never does gets no column in
        scikit-learn, and a classifier that can never answer it is worse than none."""
        from sklearn.linear_model import LogisticRegression

        X = np.asarray(features, dtype=np.float64)
        present = set(cell_types)
        missing = [t for t in CELL_TYPES if t not in present]
        if missing:
            raise ValueError(f"CellTypeClassifier.fit: no training image of {missing}")
        if len(X) != len(cell_types):
            raise ValueError(f"CellTypeClassifier.fit: {len(X)} feature rows, {len(cell_types)} cell types")
        y = np.array([CELL_TYPES.index(t) for t in cell_types])
        mean, scale = X.mean(0), X.std(0)
        scale[scale < 1e-12] = 1.0  # a constant feature: leave it at 0 after centring
        model = LogisticRegression(C=c, max_iter=5000).fit((X - mean) / scale, y)
        return cls(mean, scale, model.coef_.copy(), model.intercept_.copy())

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """``(F,)`` or ``(N, F)`` -> ``(3,)`` or ``(N, 3)`` probabilities in ``CELL_TYPES`` order."""
        X = np.asarray(features, dtype=np.float64)
        if X.shape[-1] != len(self.mean):
            raise ValueError(f"CellTypeClassifier: {X.shape[-1]} features given, fitted on {len(self.mean)}")
        z = ((X - self.mean) / self.scale) @ self.coef.T + self.intercept
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "cell_types": list(CELL_TYPES), "features": feature_names(),
                "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": self.intercept.tolist()}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "CellTypeClassifier":
        """Inverse of ``to_json``; a file written for other features or cell types is an error
        (its numbers would silently mean something else)."""
        if obj.get("format") != FORMAT or obj.get("cell_types") != list(CELL_TYPES) \
                or obj.get("features") != feature_names():
            raise ValueError("cell-type classifier: written for another format, cell types or feature "
                             "list; rerun 05_ensemble.py")
        clf = cls(*(np.asarray(obj[k], dtype=np.float64) for k in ("mean", "scale", "coef", "intercept")))
        n = len(clf.mean)
        if clf.scale.shape != (n,) or clf.coef.shape != (len(CELL_TYPES), n) \
                or clf.intercept.shape != (len(CELL_TYPES),):
            raise ValueError("cell-type classifier: arrays of inconsistent shapes")
        return clf


def out_of_fold_probs(features: np.ndarray, cell_types: Sequence[str], folds: Sequence[int],
                      c: float = 1.0) -> np.ndarray:
    """``(N, 3)``: each image's probabilities from the classifier fitted on the other folds."""
    folds = np.asarray(folds)
    probs = np.zeros((len(folds), len(CELL_TYPES)))
    types = np.asarray(cell_types)
    for k in np.unique(folds):
        held = folds == k
        missing = sorted(set(CELL_TYPES) - set(types[~held]))
        if missing:
            raise ValueError(f"the images outside fold {k} have no {missing} to learn from")
        clf = CellTypeClassifier.fit(features[~held], types[~held].tolist(), c)
        probs[held] = clf.predict_proba(features[held])
    return probs


def fit_cell_type_classifier(paths: Paths, cell_type_of: Mapping[str, str], fold_of: Mapping[str, int]
                             ) -> tuple[CellTypeClassifier | None, dict[str, np.ndarray] | None]:
    """The image-statistics cell-type classifier: out-of-fold probabilities of the images of
    ``fold_of`` (each from the fit on the other folds, the models' own fold split; 05 passes every
    labelled image, ``tune_ensemble.labelled_folds``) for the tuning, and the fit on all of them
    for the test images. (None, None) when some fold's training images lack a cell type: the
    classifier could never answer it there."""
    from neuroseg.data.records import load_image
    from neuroseg.utils.progress import Progress

    ids = sorted(fold_of)
    features = np.stack([image_features(load_image(paths.train_image(i)))
                         for i in Progress(ids, "cell-type features", unit="img")])
    types = [cell_type_of[i] for i in ids]
    try:
        probs = out_of_fold_probs(features, types, [fold_of[i] for i in ids])
    except ValueError as e:  # a small data set whose folds miss a cell type: the models vote alone
        log.warning("cell-type classifier left out: %s", e)
        return None, None
    # its out-of-fold accuracy is scored with the models' votes (tune_ensemble: vote_accuracy)
    log.info("cell-type classifier: %d features of %d images from %s, fitted out-of-fold",
             features.shape[1], len(ids), paths.train_images)
    return CellTypeClassifier.fit(features, types), dict(zip(ids, probs))
