"""Step 01: validate train.csv, clean labels, make folds, write COCO json and semantic targets.

    python 01_preprocess.py [--config configs/kaggle.yaml] [--data-dir D] [--output-dir O] [--force]

Does nothing when its outputs are up to date (see neuroseg.pipeline.preprocess).
"""

from __future__ import annotations

import sys

from neuroseg.args import parse_args
from neuroseg.data.records import DataError
from neuroseg.pipeline.preprocess import run_preprocess


def main(argv: list[str] | None = None) -> int:
    cfg, paths, args = parse_args(__doc__.splitlines()[0], argv)
    try:
        run_preprocess(cfg, paths, force=args.force)
    except DataError as e:
        print(f"01_preprocess: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
