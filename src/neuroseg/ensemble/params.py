"""Parameters of the ensemble and of each single model, per cell type, and their JSON form.

``tuning.py`` fills them on the OOF cache, ``05_ensemble.py`` writes them into params.json,
``fusion.fuse`` / ``single_model`` read them. Defaults
are reasonable starting points; the tuning starts from them and only keeps strict improvements.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from neuroseg.config import CELL_TYPES
from neuroseg.ensemble.celltype import CellTypeClassifier
from neuroseg.models.upernet import WatershedParams
from neuroseg.structures.box_masks import MASK_THRESHOLD

VOTE_MODELS: tuple[str, ...] = ("yolox", "maskrcnn", "upernet")
# Who votes on an image's cell type: the models, and the image-statistics classifier (celltype.py)
VOTERS: tuple[str, ...] = (*VOTE_MODELS, "image")


@dataclass
class TypeParams:
    """Ensemble post-processing for the images of one cell type."""

    yolox_weight: float = 1.0  # WBF weight of the model (split over its passes)
    maskrcnn_weight: float = 1.0
    wbf_iou: float = 0.55  # boxes of one cell cluster above this IoU
    wbf_skip: float = 0.05  # boxes scored below this are not fused
    upernet_weight: float = 0.3  # share of UPerNet in the mask probability (the rest: mask head)
    mask_threshold: float = MASK_THRESHOLD
    score_threshold: float = 0.3  # on the rescored score
    min_area: int = 10  # px, after overlap resolution
    max_overlap: float = 1.0  # drop a candidate when higher-scored ones hold more of it (1: never)
    upernet_instances: float = 0.0  # score factor of UPerNet's own instances as candidates (0: none)


@dataclass
class MaskRCNNParams:
    mask_threshold: float = MASK_THRESHOLD
    score_threshold: float = 0.3
    min_area: int = 0


@dataclass
class UPerNetParams(WatershedParams):
    """UPerNet's watershed (its defaults are ``WatershedParams``') plus a score threshold."""

    score_threshold: float = 0.0  # on the instance's mean interior probability


_SECTIONS: dict[str, type] = {"ensemble": TypeParams, "maskrcnn": MaskRCNNParams, "upernet": UPerNetParams}


def _per_type(cls: type) -> dict[str, Any]:
    return {t: cls() for t in CELL_TYPES}


@dataclass
class EnsembleParams:
    """Per cell type parameters of the ensemble and of each single model, the vote weights, and
    the cell-type classifier that votes as ``"image"`` (None: it does not vote)."""

    ensemble: dict[str, TypeParams] = field(default_factory=lambda: _per_type(TypeParams))
    maskrcnn: dict[str, MaskRCNNParams] = field(default_factory=lambda: _per_type(MaskRCNNParams))
    upernet: dict[str, UPerNetParams] = field(default_factory=lambda: _per_type(UPerNetParams))
    vote_weights: dict[str, float] = field(default_factory=lambda: {m: 1.0 for m in VOTERS})
    cell_type_classifier: CellTypeClassifier | None = None

    @classmethod
    def defaults(cls) -> "EnsembleParams":
        return cls()

    def to_json(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable); ``from_json`` reads it back."""
        out: dict[str, Any] = {s: {t: dataclasses.asdict(p) for t, p in getattr(self, s).items()}
                               for s in _SECTIONS}
        out["vote_weights"] = dict(self.vote_weights)
        out["cell_type_classifier"] = None if self.cell_type_classifier is None else self.cell_type_classifier.to_json()
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "EnsembleParams":
        """Inverse of ``to_json``; also takes a whole params.json (05's output: the params under
        "params", beside scores and provenance). Unknown or missing sections, types and fields are
        errors naming the valid ones (a params.json from another version must not half-load)."""
        if isinstance(obj, dict) and "params" in obj:
            obj = obj["params"]
        expected = [*_SECTIONS, "vote_weights", "cell_type_classifier"]
        if isinstance(obj, dict) and "cell_type_classifier" not in obj:  # written before it existed
            obj = {**obj, "cell_type_classifier": None}
        if not isinstance(obj, dict) or sorted(obj) != sorted(expected):
            raise ValueError(f"ensemble params: expected sections {expected}, got "
                             f"{sorted(obj) if isinstance(obj, dict) else type(obj).__name__}")
        kwargs: dict[str, Any] = {}
        for section, pcls in _SECTIONS.items():
            if sorted(obj[section]) != sorted(CELL_TYPES):
                raise ValueError(f"ensemble params [{section}]: expected cell types {list(CELL_TYPES)}, "
                                 f"got {sorted(obj[section])}")
            names = {f.name: f.type for f in dataclasses.fields(pcls)}
            kwargs[section] = {}
            for t, values in obj[section].items():
                if sorted(values) != sorted(names):
                    raise ValueError(f"ensemble params [{section}][{t}]: expected fields {sorted(names)}, "
                                     f"got {sorted(values)}")
                kwargs[section][t] = pcls(**{k: (int(v) if names[k] in ("int", int) else float(v))
                                             for k, v in values.items()})
        unknown = sorted(set(obj["vote_weights"]) - set(VOTERS))
        if unknown:
            raise ValueError(f"ensemble params [vote_weights]: unknown voter(s) {unknown}; valid: "
                             f"{list(VOTERS)}")
        kwargs["vote_weights"] = {m: float(obj["vote_weights"].get(m, 0.0)) for m in VOTERS}
        clf = obj["cell_type_classifier"]
        kwargs["cell_type_classifier"] = None if clf is None else CellTypeClassifier.from_json(clf)
        return cls(**kwargs)
