"""The command line every numbered script and ``python -m neuroseg`` command shares.

Every script is ``main(argv)``: ``parse_args`` -> (config, paths, args) -> one package call.
"""

from __future__ import annotations

import argparse
import logging
from typing import Callable

from neuroseg import config as config_mod
from neuroseg.config import Config
from neuroseg.paths import Paths
from neuroseg.utils.logging import setup_logging

log = logging.getLogger("neuroseg")


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="YAML config (only values that differ from defaults)")
    p.add_argument("--data-dir", default=None, help="Kaggle-layout data dir (default $NEUROSEG_DATA_DIR "
                   "or input/sartorius-cell-instance-segmentation)")
    p.add_argument("--output-dir", default=None, help="output dir (default $NEUROSEG_OUTPUT_DIR or output)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set maskrcnn.train.epochs=3 (repeatable)")
    p.add_argument("--force", action="store_true", help="redo work even when a valid cached result exists")
    return p


def parse_args(
    description: str,
    argv: list[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Config, Paths, argparse.Namespace]:
    parser = base_parser(description)
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = config_mod.load(args.config, args.overrides)
    paths = Paths.resolve(args.data_dir, args.output_dir)
    log.info("config %s (%s), data %s, output %s", args.config or "<defaults>", cfg.name,
             paths.data_dir, paths.output_dir)
    return cfg, paths, args


def parse_folds(text: str | None) -> tuple[int, ...] | None:
    """``"0,2"`` -> (0, 2); None/"" -> None (all folds of the config)."""
    if not text:
        return None
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise SystemExit(f"--folds expects comma-separated integers, got {text!r}") from None
