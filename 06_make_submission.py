"""06: predict test/*.png with every fold model (flip TTA), fuse, write a validated submission.

    python 06_make_submission.py --config configs/kaggle.yaml        # -> output/submission.csv
    python 06_make_submission.py --only maskrcnn                     # -> output/submission_maskrcnn.csv
"""

from __future__ import annotations

import sys

from neuroseg.args import parse_args


def main(argv: list[str] | None = None) -> int:
    cfg, paths, args = parse_args(__doc__.splitlines()[0], argv, extra=lambda p: p.add_argument(
        "--only", choices=("maskrcnn", "upernet"), default=None,
        help="one model's submission (submission_<model>.csv) instead of the ensemble's"))
    from neuroseg.pipeline.make_submission import SubmissionError, make_submission  # after parsing: --help skips torch

    try:
        make_submission(cfg, paths, only=args.only)
    except (FileNotFoundError, SubmissionError) as e:
        print(f"06_make_submission: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
