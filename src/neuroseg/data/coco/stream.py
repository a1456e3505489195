"""Stream the elements of a COCO json's top-level arrays without loading the whole file.

LIVECell's train json holds ~1.6 M annotations; ``json.load`` turns that into several GB of
Python objects. :func:`iter_top_level` reads the file in chunks and decodes one element at a
time with the standard library's C scanner (``JSONDecoder.raw_decode``), so memory holds one
chunk and one element. A top-level value may be an array or an object of elements -- LIVECell
stores ``annotations`` as ``{"<id>": {...}, ...}``, which ``pycocotools.coco.COCO`` rejects -- and
its elements come back the same way either way. The keys may come in any order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, TextIO

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\r\n"
CHUNK_CHARS = 1 << 20


class JSONStreamError(ValueError):
    """The json is malformed or not a top-level object; the message names the file and offset."""


class _Reader:
    def __init__(self, f: TextIO, path: Path, chunk: int) -> None:
        self.f, self.path, self.chunk = f, path, chunk
        self.buf, self.pos, self.consumed, self.eof = "", 0, 0, False

    def error(self, what: str) -> JSONStreamError:
        return JSONStreamError(f"{self.path}: {what} at character {self.consumed + self.pos}")

    def fill(self) -> bool:
        """Read more text (at least as much as is buffered: a large element costs O(n), not O(n^2))."""
        if self.eof:
            return False
        if self.pos > len(self.buf) // 2:
            self.consumed += self.pos
            self.buf, self.pos = self.buf[self.pos:], 0
        more = self.f.read(max(self.chunk, len(self.buf)))
        self.eof = not more
        self.buf += more
        return bool(more)

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.buf) or not self.fill():
                return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = self.peek() or "end of file"
            raise self.error(f"expected {ch!r}, found {found!r}")
        self.pos += 1

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self.fill():
                    continue
                raise self.error(f"malformed JSON ({e.msg})") from None
            # a number cut by the chunk boundary decodes as a shorter number: read on and redo
            if end == len(self.buf) and self.fill():
                continue
            self.pos = end
            return obj

    def elements(self) -> Iterator[Any]:
        """The elements of the array, or the values of the object, that starts here."""
        opening = self.peek()
        closing = {"[": "]", "{": "}"}[opening]
        self.pos += 1
        first = True
        while True:
            ch = self.peek()
            if ch == closing:
                self.pos += 1
                return
            if not first:
                self.expect(",")
            first = False
            if opening == "{":
                key = self.value()
                if not isinstance(key, str):
                    raise self.error("object key is not a string")
                self.expect(":")
            yield self.value()


def iter_top_level(path: str | Path, keys: tuple[str, ...], chunk: int = CHUNK_CHARS
                   ) -> Iterator[tuple[str, Any]]:
    """Yield ``(key, element)`` for every element of the top-level values named in ``keys``
    (an array's items, an object's values; a scalar value comes back as itself), in file order.
    Other top-level values are read element by element and dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO json not found: {path}")
    with open(path, encoding="utf-8") as f:
        r = _Reader(f, path, chunk)
        r.expect("{")
        first = True
        while True:
            ch = r.peek()
            if ch == "}":
                break
            if ch == "":
                raise r.error("unexpected end of file inside the top-level object")
            if not first:
                r.expect(",")
            first = False
            key = r.value()
            if not isinstance(key, str):
                raise r.error("top-level key is not a string")
            r.expect(":")
            wanted = key in keys
            if r.peek() in ("[", "{"):
                for element in r.elements():
                    if wanted:
                        yield key, element
            else:
                element = r.value()
                if wanted:
                    yield key, element
        r.pos += 1
        if r.peek() != "":
            raise r.error("text after the top-level object")
