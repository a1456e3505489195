"""05: tune the ensemble (YOLOX + Mask R-CNN boxes, mask-head + UPerNet masks) per cell type on the
out-of-fold predictions; writes output/ensemble/params.json and report.md.

    python 05_ensemble.py --config configs/cpu.yaml --data-dir ../shared/data/sartorius-mini
"""

from __future__ import annotations

import sys

from neuroseg.args import parse_args


def main(argv: list[str] | None = None) -> int:
    cfg, paths, args = parse_args(__doc__.splitlines()[0], argv)
    from neuroseg.config import ConfigError
    from neuroseg.evaluation.oof_cache import OOFError  # after parsing: --help does not pay for torch
    from neuroseg.pipeline.tune_ensemble import run_ensemble

    try:
        run_ensemble(cfg, paths, force=args.force)
    except (FileNotFoundError, OOFError, ConfigError) as e:  # a message naming what to do
        print(f"05_ensemble: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
