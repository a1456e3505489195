"""Every path under the data dir (Kaggle layout, read-only) and the output dir, in one place.

The data dir comes from ``--data-dir``, else ``$NEUROSEG_DATA_DIR``, else
``input/sartorius-cell-instance-segmentation``; the output dir from ``--output-dir``, else
``$NEUROSEG_OUTPUT_DIR``, else ``output``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path("input/sartorius-cell-instance-segmentation")
DEFAULT_OUTPUT_DIR = Path("output")
MODEL_NAMES: tuple[str, ...] = ("yolox", "maskrcnn", "upernet")
REFIT = "refit"
"""The fold name of a model trained on every labelled image (``train.refit_epochs``)."""
# the script that trains each model, named in the errors that ask for its outputs
TRAIN_SCRIPTS: dict[str, str] = {"yolox": "02_train_yolox.py", "maskrcnn": "03_train_maskrcnn.py",
                                 "upernet": "04_train_upernet.py"}


def resolve_data_dir(arg: str | Path | None = None) -> Path:
    return Path(arg or os.environ.get("NEUROSEG_DATA_DIR") or DEFAULT_DATA_DIR)


def resolve_output_dir(arg: str | Path | None = None) -> Path:
    return Path(arg or os.environ.get("NEUROSEG_OUTPUT_DIR") or DEFAULT_OUTPUT_DIR)


@dataclass(frozen=True)
class Paths:
    data_dir: Path
    output_dir: Path

    @classmethod
    def resolve(cls, data_dir: str | Path | None = None, output_dir: str | Path | None = None) -> "Paths":
        return cls(resolve_data_dir(data_dir), resolve_output_dir(output_dir))

    # ---- inputs (Kaggle layout) ----
    @property
    def train_csv(self) -> Path:
        return self.data_dir / "train.csv"

    @property
    def train_images(self) -> Path:
        return self.data_dir / "train"

    @property
    def test_images(self) -> Path:
        return self.data_dir / "test"

    @property
    def semi_supervised_images(self) -> Path:
        return self.data_dir / "train_semi_supervised"

    @property
    def livecell_dir(self) -> Path:
        return self.data_dir / "LIVECell_dataset_2021"

    @property
    def sample_submission(self) -> Path:
        return self.data_dir / "sample_submission.csv"

    def train_image(self, image_id: str) -> Path:
        return self.train_images / f"{image_id}.png"

    # ---- 01 preprocess ----
    @property
    def preprocess_dir(self) -> Path:
        return self.output_dir / "preprocess"

    @property
    def preprocess_manifest(self) -> Path:
        return self.preprocess_dir / "manifest.json"

    @property
    def folds_csv(self) -> Path:
        return self.output_dir / "folds.csv"

    @property
    def clean_train_csv(self) -> Path:
        """train.csv after the (switchable) label cleaning; what the trainers read."""
        return self.preprocess_dir / "train_clean.csv"

    @property
    def cleaning_report(self) -> Path:
        return self.preprocess_dir / "cleaning_report.json"

    @property
    def cleaning_figure(self) -> Path:
        """A few images with their raw vs cleaned masks, for a person to check the cleaning."""
        return self.preprocess_dir / "cleaning_examples.png"

    @property
    def preprocess_config(self) -> Path:
        return self.preprocess_dir / "config.yaml"

    def coco_json(self, fold: int, split: str) -> Path:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.preprocess_dir / "coco" / f"fold{fold}_{split}.json"

    @property
    def semantic_dir(self) -> Path:
        return self.preprocess_dir / "semantic"

    def semantic_target(self, image_id: str) -> Path:
        return self.semantic_dir / f"{image_id}.png"

    # ---- 02-04 training ----
    def model_dir(self, model: str) -> Path:
        if model not in MODEL_NAMES:
            raise ValueError(f"unknown model {model!r}; valid: {list(MODEL_NAMES)}")
        return self.output_dir / "models" / model

    def fold_dir(self, model: str, fold: int | str) -> Path:
        """``models/<model>/fold<k>``, or ``models/<model>/refit`` for ``fold=REFIT`` (the model
        trained on every labelled image, ``train.refit_epochs``)."""
        if fold == REFIT:
            return self.model_dir(model) / REFIT
        if isinstance(fold, str) or int(fold) < 0:
            raise ValueError(f"fold must be a fold number >= 0 or {REFIT!r}, got {fold!r}")
        return self.model_dir(model) / f"fold{fold}"

    def last_checkpoint(self, model: str, fold: int | str) -> Path:
        return self.fold_dir(model, fold) / "last.pt"

    def best_checkpoint(self, model: str, fold: int | str) -> Path:
        return self.fold_dir(model, fold) / "best.pt"

    def history_csv(self, model: str, fold: int | str) -> Path:
        return self.fold_dir(model, fold) / "history.csv"

    def oof_dir(self, model: str, fold: int) -> Path:
        if model not in MODEL_NAMES:
            raise ValueError(f"unknown model {model!r}; valid: {list(MODEL_NAMES)}")
        return self.output_dir / "oof" / model / f"fold{fold}"

    # ---- 05 ensemble, 06 submission ----
    @property
    def ensemble_dir(self) -> Path:
        return self.output_dir / "ensemble"

    @property
    def ensemble_params(self) -> Path:
        return self.ensemble_dir / "params.json"

    @property
    def ensemble_report(self) -> Path:
        return self.ensemble_dir / "report.md"

    @property
    def ensemble_oof_scores(self) -> Path:
        """Per-image OOF score of every method (single models, ensemble defaults and tuned)."""
        return self.ensemble_dir / "oof_scores.csv"

    def ensemble_figure(self, name: str) -> Path:
        """A PNG of the ensemble report (the score chart, OOF overlays), beside report.md."""
        return self.ensemble_dir / f"{name}.png"

    @property
    def submission_csv(self) -> Path:
        return self.output_dir / "submission.csv"

    def model_submission_csv(self, model: str) -> Path:
        """06 with ``--only MODEL``: one model's submission, beside (never over) the ensemble's."""
        if model not in MODEL_NAMES:
            raise ValueError(f"unknown model {model!r}; valid: {list(MODEL_NAMES)}")
        return self.output_dir / f"submission_{model}.csv"

    # ---- external data: pretraining on LIVECell-style COCO, pseudo-labels ----
    def livecell_json(self, split: str) -> Path:
        """LIVECell's COCO json of ``split``: the Kaggle copy keeps it in ``annotations/LIVECell/``,
        the original download beside ``images/``; the first that exists (else the Kaggle one)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        name = f"livecell_coco_{split}.json"
        candidates = [self.livecell_dir / "annotations" / "LIVECell" / name, self.livecell_dir / name]
        return next((p for p in candidates if p.is_file()), candidates[0])

    @property
    def livecell_images(self) -> Path:
        return self.livecell_dir / "images"

    @property
    def pretrain_dir(self) -> Path:
        return self.output_dir / "pretrain"

    def pretrain_index(self, json_path: str | Path) -> Path:
        """The SQLite index of a COCO json (one per json file: the name carries its path's hash)."""
        import hashlib

        resolved = str(Path(json_path).resolve())
        tag = hashlib.sha256(resolved.encode()).hexdigest()[:8]
        return self.pretrain_dir / "index" / f"{Path(json_path).stem}-{tag}.sqlite"

    def pretrain_model_dir(self, model: str) -> Path:
        if model not in MODEL_NAMES:
            raise ValueError(f"unknown model {model!r}; valid: {list(MODEL_NAMES)}")
        return self.pretrain_dir / model

    def pretrain_best(self, model: str) -> Path:
        """What the fold trainers start from when ``pretrain.enabled``."""
        return self.pretrain_model_dir(model) / "best.pt"

    def pretrain_last(self, model: str) -> Path:
        return self.pretrain_model_dir(model) / "last.pt"

    def pretrain_history(self, model: str) -> Path:
        return self.pretrain_model_dir(model) / "history.csv"

    @property
    def pseudo_dir(self) -> Path:
        return self.output_dir / "pseudo"

    @property
    def pseudo_labels_csv(self) -> Path:
        """``python -m neuroseg pseudo-label``'s default output (train.csv form + source, fold,
        image_path); its summary is the ``.json`` beside it."""
        return self.pseudo_dir / "pseudo_labels.csv"
