"""02: train YOLOX on every fold (or --folds) and cache its out-of-fold predictions.

Multi-GPU: torchrun --nproc_per_node N 02_train_yolox.py --config configs/kaggle.yaml
"""

from __future__ import annotations

import sys

from neuroseg.pipeline.train_folds import train_main


def main(argv: list[str] | None = None) -> int:
    return train_main("yolox", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
