"""06: predict every test image with the fold models and write a validated ``submission.csv``.

The submission is written to a temporary sibling, checked with the scorer's rules against the
test folder, and only then moved into place, so an invalid file never sits where it could be
uploaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

from neuroseg.config import Config
from neuroseg.inference.fold_models import FoldEnsemble, image_files
from neuroseg.inference.predict import load_params, models_needed, segment
from neuroseg.paths import Paths

log = logging.getLogger("neuroseg")

MAX_LISTED_PROBLEMS = 20


class SubmissionError(RuntimeError):
    """The written submission breaks the scorer's rules (the message lists the violations)."""


def make_submission(cfg: Config, paths: Paths, only: str | None = None,
                    folds: FoldEnsemble | None = None) -> Path:
    """Predict every ``test/*.png`` and write the validated submission CSV; returns its path.

    The ensemble writes ``paths.submission_csv``; ``only=MODEL`` writes
    ``paths.model_submission_csv(MODEL)`` so a single-model file never replaces the ensemble's.
    Raises :class:`SubmissionError` if the CSV breaks the scorer's rules. ``folds`` replaces the
    models loaded from the fold checkpoints (tests, benchmarks).
    """
    from neuroseg.structures.label_image import label_to_rles
    from neuroseg.structures.submission_csv import validate_submission, write_submission

    names = models_needed(cfg, only)
    params = load_params(paths)
    out = paths.submission_csv if only is None else paths.model_submission_csv(only)
    images = image_files(paths.test_images, (".png",))  # the scorer's test set is PNG
    if folds is None:
        folds = FoldEnsemble.from_checkpoints(cfg, paths, names)
    log.info("06: %d test images from %s; %s of %s models (the folds', or one refit), TTA views %s -> %s",
             len(images), paths.test_images, "fusion" if only is None else "single model",
             {n: len(m) for n, m in folds.models.items()}, list(folds.views), out)
    counts = {"images": 0, "empty": 0, "instances": 0}

    def rows() -> Iterator[tuple[str, list[str]]]:
        for path, _, result in segment(images, folds, params, only, cfg.submission.batch_size):
            rles = label_to_rles(result.label)
            counts["images"] += 1
            counts["instances"] += len(rles)
            counts["empty"] += not rles
            yield path.stem, rles

    unchecked = out.with_name(f".{out.stem}.unvalidated.csv")
    write_submission(rows(), unchecked)
    problems = validate_submission(unchecked, paths.test_images)
    if problems:
        listed = "\n".join(problems[:MAX_LISTED_PROBLEMS])
        extra = len(problems) - MAX_LISTED_PROBLEMS
        more = f"\n... and {extra} more" if extra > 0 else ""
        raise SubmissionError(f"{unchecked} breaks the scorer's rules ({len(problems)} violation(s)); "
                              f"{out} was not written:\n{listed}{more}")
    os.replace(unchecked, out)
    log.info("06: wrote %s (valid): %d images, %d instances, %d image(s) without any", out,
             counts["images"], counts["instances"], counts["empty"])
    return out
