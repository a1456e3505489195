"""Stream the elements of a COCO json's top-level arrays without loading the whole file.

LIVECell's train json holds ~1.6 M annotations; ``json.load`` turns that into several GB of
Python objects. :func:`iter_top_level` walks ijson's event stream (its C yajl backend) and builds
one element at a time, so memory holds one read buffer and one element. A top-level value may be
an array or an object of elements -- LIVECell stores ``annotations`` as ``{"<id>": {...}, ...}``,
which ``pycocotools.coco.COCO`` rejects -- and its elements come back the same way either way.
The keys may come in any order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import ijson
from ijson.common import ObjectBuilder

_STARTS = ("start_map", "start_array")
_ENDS = ("end_map", "end_array")


class JSONStreamError(ValueError):
    """The json is malformed or not a top-level object; the message names the file."""


def iter_top_level(path: str | Path, keys: tuple[str, ...], buf_size: int = 1 << 16
                   ) -> Iterator[tuple[str, Any]]:
    """Yield ``(key, element)`` for every element of the top-level values named in ``keys``
    (an array's items, an object's values; a scalar value comes back as itself), in file order.
    Other top-level values are read event by event and dropped, never built."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO json not found: {path}")
    with open(path, "rb") as f:
        events = ((event, value) for _, event, value in ijson.parse(f, buf_size=buf_size, use_float=True))
        try:
            yield from _top_level(events, set(keys), path)
        except ijson.JSONError as e:
            raise JSONStreamError(f"{path}: malformed JSON: {e}") from None


def _top_level(events: Iterator[tuple[str, Any]], wanted: set[str], path: Path) -> Iterator[tuple[str, Any]]:
    first = next(events, None)
    if first is None or first[0] != "start_map":
        raise JSONStreamError(f"{path}: expected '{{' (a top-level object), found "
                              f"{first[0] if first else 'an empty file'}")
    for event, key in events:
        if event == "end_map":
            return
        keep = key in wanted  # event is "map_key"
        event, value = next(events)
        if event not in _STARTS:
            if keep:
                yield key, value
            continue
        closing = "end_array" if event == "start_array" else "end_map"
        for event, value in events:
            if event == closing:
                break
            if closing == "end_map":  # an object of elements: skip the element's own key
                event, value = next(events)
            element = _build(events, event, value, keep)
            if keep:
                yield key, element


def _build(events: Iterator[tuple[str, Any]], event: str, value: Any, keep: bool) -> Any:
    """The JSON value that starts with ``(event, value)``, consumed from ``events``; built only
    when ``keep``."""
    if event not in _STARTS:
        return value
    builder = ObjectBuilder() if keep else None
    depth = 0
    while True:
        if builder is not None:
            builder.event(event, value)
        depth += event in _STARTS
        depth -= event in _ENDS
        if depth == 0:
            return builder.value if builder is not None else None
        event, value = next(events)
