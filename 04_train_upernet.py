"""04: train UPerNet on every fold (or --folds) and cache its out-of-fold predictions.

Multi-GPU: torchrun --nproc_per_node N 04_train_upernet.py --config configs/kaggle.yaml
"""

from __future__ import annotations

import sys

from neuroseg.runner import parse_args, parse_folds


def main(argv: list[str] | None = None) -> int:
    cfg, paths, args = parse_args(__doc__, argv, extra=lambda p: p.add_argument(
        "--folds", default=None, help="comma-separated folds to train, e.g. 0,2 (default: the config's)"))
    from neuroseg.training import train_model  # after parsing: --help does not pay for torch

    train_model(cfg, paths, "upernet", folds=parse_folds(args.folds), force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
