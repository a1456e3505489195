"""04: train UPerNet on every fold (or --folds) and cache its out-of-fold predictions.

Multi-GPU: torchrun --nproc_per_node N 04_train_upernet.py --config configs/kaggle.yaml
"""

from __future__ import annotations

import sys

from neuroseg.pipeline.train_folds import train_main


def main(argv: list[str] | None = None) -> int:
    return train_main("upernet", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
