"""submission_csv.csv: writing it and every rule of the validator, each with its message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neuroseg.structures import rle, submission_csv

H, W = 6, 8
HH, WW = 20, 30  # the decoder tests: room for random masks


def box(y0: int, y1: int, x0: int, x1: int, shape=(HH, WW)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def idx(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask.ravel())


@pytest.fixture
def test_dir(tmp_path: Path) -> Path:
    d = tmp_path / "test"
    d.mkdir()
    for image_id in ("a", "b"):
        Image.fromarray(np.zeros((H, W), dtype=np.uint8)).save(d / f"{image_id}.png")
    return d


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sub.csv"
    p.write_text(text)
    return p


def test_write_submission_rows_and_empty_images(tmp_path):
    path = submission_csv.write_submission({"a": ["1 2", "5 1"], "b": [], "c": [""]}, tmp_path / "out" / "sub.csv")
    assert path.read_text() == "id,predicted\na,1 2\na,5 1\nb,\nc,\n"
    path = submission_csv.write_submission(iter([("x", ("3 1",))]), tmp_path / "sub2.csv")
    assert path.read_text() == "id,predicted\nx,3 1\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out", "sub.csv", "sub2.csv"]  # no temp file left


def test_write_submission_rejects_bad_ids(tmp_path):
    with pytest.raises(ValueError, match="'a' given twice"):
        submission_csv.write_submission([("a", ["1 1"]), ("a", [])], tmp_path / "s.csv")
    with pytest.raises(ValueError, match="'a,b': must be a non-empty string"):
        submission_csv.write_submission({"a,b": []}, tmp_path / "s.csv")
    with pytest.raises(ValueError, match="would break the CSV"):
        submission_csv.write_submission({"a": ["1 2\nb,3 4"]}, tmp_path / "s.csv")
    with pytest.raises(TypeError, match="one string"):
        submission_csv.write_submission({"a": "1 1"}, tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def test_valid_file_passes(tmp_path, test_dir):
    path = submission_csv.write_submission({"a": ["1 3", "9 2 17 2"], "b": []}, tmp_path / "sub.csv")
    assert submission_csv.validate_submission(path, test_dir) == []
    assert submission_csv.validate_submission(path, shape=(H, W)) == []


@pytest.mark.parametrize("rle_text, problem", [
    ("1 x", "bad RLE: non-integer value 'x'"),
    ("1 2 3", "bad RLE: odd number of values (3)"),
    ("0 2", "bad RLE: non-positive start 0"),
    ("1 0", "bad RLE: non-positive length 0"),
    ("9 2 1 2", "bad RLE: unsorted runs"),
    ("1 5 3 2", "bad RLE: overlapping runs"),  # pixels 3 and 4 twice in one mask
    (f"{H * W} 2", f"bad RLE: run past the image: pair 1 ends at pixel {H * W + 1} > {H * W}"),
])
def test_each_bad_rle_is_reported_with_file_line_and_id(tmp_path, test_dir, rle_text, problem):
    path = write(tmp_path, f"id,predicted\na,1 1\nb,{rle_text}\nb,{rle_text}\n")
    problems = submission_csv.validate_submission(path, test_dir)
    assert len(problems) == 2
    for line, text in zip((3, 4), problems):
        assert text.startswith(f"{path}: line {line}, id 'b': {problem}"), text


def test_overlapping_masks_name_both_lines_and_the_pixel_count(tmp_path):
    path = write(tmp_path, "id,predicted\na,1 4\nb,1 4\na,3 4\na,6 1\n")
    # lines 2 and 4 share pixels 3, 4; lines 4 and 5 share pixel 6; b is another image
    assert submission_csv.validate_submission(path, shape=(H, W)) == [
        f"{path}: lines 2 and 4, id 'a': masks overlap in 2 pixel(s)",
        f"{path}: lines 4 and 5, id 'a': masks overlap in 1 pixel(s)",
    ]


def test_every_overlapping_pair_is_listed_and_only_those(tmp_path):
    # a chain: line 2 (pixels 1-3) and 3 (3-5) share pixel 3, lines 3 and 5 (5-6) pixel 5; 2 and 5
    # share nothing. Line 4 is another image over the same pixels.
    path = write(tmp_path, "id,predicted\na,1 3\na,3 3\nb,1 6\na,5 2\n")
    assert submission_csv.validate_submission(path, shape=(H, W)) == [
        f"{path}: lines 2 and 3, id 'a': masks overlap in 1 pixel(s)",
        f"{path}: lines 3 and 5, id 'a': masks overlap in 1 pixel(s)",
    ]


def test_a_pixel_under_three_masks_gives_all_three_pairs(tmp_path):
    # lines 2 (pixels 1-4), 3 (3-6), 4 (4-6): pixel 4 is under all three. Pairs: 2-3 share 3, 4;
    # 2-4 share 4; 3-4 share 4, 5, 6. (Pairs of consecutive owners per pixel missed 2-4.)
    path = write(tmp_path, "id,predicted\na,1 4\na,3 4\na,4 3\n")
    assert submission_csv.validate_submission(path, shape=(H, W)) == [
        f"{path}: lines 2 and 3, id 'a': masks overlap in 2 pixel(s)",
        f"{path}: lines 2 and 4, id 'a': masks overlap in 1 pixel(s)",
        f"{path}: lines 3 and 4, id 'a': masks overlap in 3 pixel(s)",
    ]


def test_overlap_pairs_equal_a_pairwise_count(tmp_path):
    # 40 random boxes of one 20 x 30 image, many piled on one another: every pair against
    # np.intersect1d of the two masks' pixels
    rng = np.random.default_rng(3)
    masks = []
    for _ in range(40):
        y0, x0 = rng.integers(0, HH - 4), rng.integers(0, WW - 6)
        masks.append(box(y0, y0 + int(rng.integers(1, 5)), x0, x0 + int(rng.integers(1, 7))))
    path = write(tmp_path, "id,predicted\n" + "".join(f"a,{rle.encode(m)}\n" for m in masks))
    expected = []
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            n = np.intersect1d(idx(masks[i]), idx(masks[j])).size
            if n:
                expected.append(f"{path}: lines {i + 2} and {j + 2}, id 'a': masks overlap in {n} pixel(s)")
    assert len(expected) > 40  # dense enough that pixels lie under three or more masks
    assert submission_csv.validate_submission(path, shape=(HH, WW)) == expected


@pytest.mark.parametrize("content, problem", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a readable CSV: not UTF-8 text (byte 0x89: invalid start byte)"),
    ("id,predicted\nimg\u00e9,1 1\n".encode("latin-1"),
     "not a readable CSV: not UTF-8 text (byte 0xe9: invalid continuation byte)"),
    (b"id,predicted\n" + b"x" * 200_000 + b"\n", "not a readable CSV: line 2: field larger than field limit (131072)"),
], ids=["binary", "latin-1", "huge-field"])
def test_an_unreadable_csv_is_one_problem_naming_the_file(tmp_path, capsys, content, problem):
    path = tmp_path / "sub.csv"
    path.write_bytes(content)
    assert submission_csv.validate_submission(path) == [f"{path}: {problem}"]
    assert submission_csv.cli_validate([str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == f"{path}: {problem}\n" and err == "invalid: 1 violation(s)\n"


def test_a_directory_or_a_file_that_cannot_be_opened_is_named(tmp_path, monkeypatch):
    (tmp_path / "dir.csv").mkdir()
    assert submission_csv.validate_submission(tmp_path / "dir.csv") == [f"{tmp_path / 'dir.csv'}: a directory, not a file"]
    path = write(tmp_path, "id,predicted\na,1 1\n")
    real_open = Path.open

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)  # the tests run as root: chmod 000 would not stop them
    assert submission_csv.validate_submission(path) == [f"{path}: cannot read: Permission denied"]


def test_bad_test_pngs_are_each_named_with_what_failed(tmp_path, test_dir, capsys):
    good = (test_dir / "a.png").read_bytes()
    (test_dir / "c.png").write_bytes(good[:-12])  # IEND cut off: the header (and size) still read
    (test_dir / "d.png").write_text("not an image")
    bad_crc = bytearray(good)
    bad_crc[good.index(b"IDAT") + 6] ^= 0xFF  # a pixel-data byte: the chunk's checksum no longer holds
    (test_dir / "e.png").write_bytes(bytes(bad_crc))
    path = write(tmp_path, "id,predicted\na,\nb,\nc,\nd,\ne,\n")
    expected = (f"unreadable test image {test_dir / 'c.png'}: OSError: truncated PNG file\n"
                f"unreadable test image {test_dir / 'd.png'}: UnidentifiedImageError: cannot identify image file "
                f"'{test_dir / 'd.png'}'\n"
                f"unreadable test image {test_dir / 'e.png'}: SyntaxError: broken PNG file "
                f"(bad header checksum in b'IDAT')")
    with pytest.raises(ValueError) as e:
        submission_csv.validate_submission(path, test_dir)
    assert str(e.value) == expected
    assert submission_csv.cli_validate([str(path), "--test-dir", str(test_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: {expected}\n"
    # the same folder without them is valid
    for name in ("c", "d", "e"):
        (test_dir / f"{name}.png").unlink()
    assert submission_csv.validate_submission(write(tmp_path, "id,predicted\na,\nb,\n"), test_dir) == []


def test_missing_and_unknown_ids(tmp_path, test_dir):
    path = write(tmp_path, "id,predicted\na,\nzz,1 1\nzz,3 1\n")
    assert submission_csv.validate_submission(path, test_dir) == [
        f"{path}: line 3, id 'zz': unknown id (no zz.png in {test_dir})",
        f"{path}: id 'b' ({test_dir / 'b.png'}) has no row",
    ]


def test_image_size_comes_from_the_png(tmp_path, test_dir):
    path = write(tmp_path, f"id,predicted\na,{H * W} 1\nb,{H * W + 1} 1\n")  # fits 6x8 only for line 2
    assert submission_csv.validate_submission(path, test_dir) == [
        f"{path}: line 3, id 'b': bad RLE: run past the image: pair 1 ends at pixel {H * W + 1} > {H * W} "
        f"(height {H} x width {W})"]
    assert submission_csv.validate_submission(path) == []  # the 520 x 704 default holds both


def test_structure_violations(tmp_path):
    assert submission_csv.validate_submission(tmp_path / "nope.csv") == [f"{tmp_path / 'nope.csv'}: file not found"]
    path = write(tmp_path, "id,rle\na,1 1\n")
    assert submission_csv.validate_submission(path) == [
        f"{path}: line 1: header ['id', 'rle'] must be exactly ['id', 'predicted']"]
    path = write(tmp_path, "id,predicted\n")
    assert submission_csv.validate_submission(path) == [f"{path}: no rows after the header"]
    path = write(tmp_path, "id,predicted\na,1 1,extra\n,2 1\n")
    assert submission_csv.validate_submission(path) == [
        f"{path}: line 2: expected 2 fields (id,predicted), got 3: ['a', '1 1', 'extra']",
        f"{path}: line 3, id '': empty id"]
    with pytest.raises(FileNotFoundError, match="test dir not found"):
        submission_csv.validate_submission(path, tmp_path / "missing")


def test_decode_all_fast_path_equals_string_by_string():
    rng = np.random.default_rng(0)
    masks = [rng.random((HH, WW)) < p for p in (0.05, 0.5, 0.95)] + [box(0, 1, 0, 1), box(HH - 1, HH, WW - 1, WW)]
    rles = [rle.encode(m) for m in masks]
    out, problems = submission_csv.decode_all(rles, (HH, WW))
    assert problems == [] and len(out) == len(masks) == 5
    for got, m in zip(out, masks):
        np.testing.assert_array_equal(got, idx(m))


@pytest.mark.parametrize("bad, message", [
    ("1 2 x 3", "non-integer value 'x'"), ("1 2 3", "odd number"), ("0 2", "non-positive start"),
    ("1 -2", "non-positive length"), ("5 2 1 2", "unsorted runs"), ("1 5 3 2", "overlapping runs"),
    (f"{HH * WW} 2", "run past the image"), ("1 0 5", "odd number"), ("1 99999999999999999999999", "too large"),
])
def test_decode_all_reports_each_malformed_string_with_its_position(bad, message):
    good = rle.encode(box(0, 2, 0, 2))
    out, problems = submission_csv.decode_all([good, bad, good], (HH, WW))
    assert [p[0] for p in problems] == [1]
    assert message in problems[0][1]
    assert out[1] is None
    np.testing.assert_array_equal(out[2], idx(box(0, 2, 0, 2)))
