"""Progress of long loops: a tqdm bar on a terminal, a log line per minute in a log file.

A bar redrawn per step is unreadable in ``make submission > log`` (megabytes of carriage
returns); when stderr is not a terminal, :class:`Progress` logs ``desc: n/total unit, elapsed``
at most once per ``every_s`` seconds instead, with the last postfix (loss, lr) it was given.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Iterator

from tqdm import tqdm

log = logging.getLogger("neuroseg")


def on_terminal() -> bool:
    return sys.stderr.isatty()


class Progress:
    """``for x in Progress(items, "desc", total=n): ...``; ``set_postfix(**kw)`` as tqdm's."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None = None, unit: str = "it",
                 enabled: bool = True, leave: bool = False, every_s: float = 60.0,
                 terminal: bool | None = None) -> None:
        self.iterable, self.desc, self.unit, self.every_s = iterable, desc, unit, every_s
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.enabled = enabled
        self.terminal = on_terminal() if terminal is None else terminal
        self.postfix: dict[str, Any] = {}
        self.bar = (tqdm(iterable, total=self.total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
                    if enabled and self.terminal else None)

    def __iter__(self) -> Iterator:
        if self.bar is not None:
            yield from self.bar
            return
        start = last = time.monotonic()
        n = 0
        for item in self.iterable:
            yield item
            n += 1
            now = time.monotonic()
            if self.enabled and now - last >= self.every_s:
                last = now
                log.info("%s", self.line(n, now - start))

    def line(self, n: int, elapsed: float) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        post = "".join(f", {k} {v}" for k, v in self.postfix.items())
        return f"{self.desc}: {n}{of} {self.unit}, {elapsed:.0f}s{post}"

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
