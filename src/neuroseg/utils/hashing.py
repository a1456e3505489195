"""The project's one way to fingerprint files and settings (sha256 everywhere).

``file_sha256`` names a checkpoint or wheel by content; ``json_hash`` is the short hash of a
JSON-able settings dict that manifests compare to detect a stale cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def file_sha256(path: str | Path, into: "hashlib._Hash | None" = None) -> str:
    """Hex sha256 of a file's bytes (``hashlib.file_digest``: read in chunks, never whole).
    With ``into``, the bytes are fed into that running hash instead, and its digest returned."""
    with open(path, "rb") as f:
        h = hashlib.file_digest(f, (lambda: into) if into is not None else "sha256")
    return h.hexdigest()


def json_hash(obj: Any, length: int = 16) -> str:
    """Stable short hash of a JSON-able object (keys sorted; tuples and sets as lists)."""
    blob = json.dumps(obj, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
