"""Logging set-up for the scripts and commands: one format, the "neuroseg" logger."""

from __future__ import annotations

import logging


def setup_logging(level: int = logging.INFO) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
