"""The rules the project's CSV readers share (``train.csv``, the pseudo-label CSV, the scorer's
truth and prediction CSVs): every cell read as text (``""`` when empty, nothing coerced or
NaN-ed before it is checked), required columns, positive integers, and one message listing
every problem, each with its line (header = line 1), so a user fixes a file in one pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

MAX_LISTED_PROBLEMS = 50


def read_text_csv(path: str | Path, columns: Sequence[str], error: type[Exception], hint: str = "",
                  **read_csv_args: Any) -> pd.DataFrame:
    """``path`` as str columns; ``error`` naming the file when it is missing, unreadable or
    lacks one of ``columns`` (``hint`` is appended to that message)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, **read_csv_args)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise error(f"{path}: not a readable CSV: {e}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise error(f"{path}: missing column(s) {missing}; found {list(df.columns)}{hint}")
    return df


def positive_int(text: str) -> int | None:
    """``"704"`` -> 704; None for anything but a plain positive decimal integer."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None


def problem_report(name: str | Path, problems: Sequence[str], limit: int = MAX_LISTED_PROBLEMS) -> str:
    """``"NAME: N problem(s):"`` and the first ``limit`` problems, one per indented line."""
    shown = list(problems[:limit])
    lines = [f"{name}: {len(problems)} problem(s):", *(f"  {p}" for p in shown)]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    return "\n".join(lines)
