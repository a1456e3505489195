"""Lab images -> the models' 8-bit gray: bit depths, float, RGB, stacks, percentile normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from neuroseg.data.records import DataError
from neuroseg.inference.image_input import (
    DEFAULT_PERCENTILES,
    TRAINING_LEVELS,
    InputOptions,
    as_eight_bit_data,
    read_image,
    to_uint8,
)


@pytest.fixture(scope="module")
def real_image(real_data) -> np.ndarray:
    path = sorted((real_data / "train").glob("*.png"))[0]
    return np.array(Image.open(path))


def write_copies(folder, image: np.ndarray) -> dict[str, object]:
    """The 8-bit PNG, a 16-bit TIFF and PNG x 257, a float32 TIFF / 255 and an RGB PNG of ``image``."""
    files = {"png8": folder / "a.png", "tif16": folder / "a16.tif", "png16": folder / "a16.png",
             "float": folder / "af.tif", "rgb": folder / "argb.png"}
    Image.fromarray(image).save(files["png8"])
    tifffile.imwrite(files["tif16"], image.astype(np.uint16) * 257)
    Image.fromarray(image.astype(np.uint16) * 257).save(files["png16"])
    tifffile.imwrite(files["float"], image.astype(np.float32) / 255)
    Image.fromarray(np.repeat(image[..., None], 3, axis=2)).save(files["rgb"])
    return files


def test_16_bit_and_float_copies_of_a_real_image_read_as_the_original(real_image, tmp_path):
    files = write_copies(tmp_path, real_image)
    with Image.open(files["png16"]) as im:
        assert im.mode == "I;16"  # a real 16-bit PNG, what PIL alone refused before
    # data-type range: exact for copies of 8-bit data
    for name, path in files.items():
        np.testing.assert_array_equal(read_image(path, InputOptions(normalize="off")), real_image, err_msg=name)
    # percentiles are scale-free: every copy gives one and the same 8-bit image
    stretched = read_image(files["png8"], InputOptions(normalize=(1, 99)))
    assert not np.array_equal(stretched, real_image)
    for name, path in files.items():
        np.testing.assert_array_equal(read_image(path, InputOptions(normalize=(1, 99))), stretched, err_msg=name)
    # the default: 8-bit data as it is, whatever type holds it
    for name, path in files.items():
        np.testing.assert_array_equal(read_image(path), real_image, err_msg=name)
    p1, p99 = np.percentile(stretched, [1, 99])
    assert abs(p1 - TRAINING_LEVELS[0]) <= 1 and abs(p99 - TRAINING_LEVELS[1]) <= 1


def test_eight_bit_data_in_wider_types_is_found_exactly(real_image):
    """ImageJ's 8-to-16-bit conversion (values kept), x 257, x 256 (the shift), whole-numbered
    floats and floats / 255 all read as the 8-bit image; data that is not 8-bit -- 12-bit values,
    one value off the x 257 grid, floats between the 1/255 steps -- gets the percentiles."""
    wide = real_image.astype(np.uint16)
    for copy in (wide, wide * 257, wide * 256, real_image.astype(np.float32),
                 real_image.astype(np.float32) / 255, real_image.astype(np.int32)):
        np.testing.assert_array_equal(to_uint8(copy), real_image, err_msg=str(copy.dtype))
    off_grid = wide * 257
    off_grid[0, 0] += 1
    twelve_bit = wide * 16 + 3
    between = real_image.astype(np.float32) / 255 + 0.5 / 255 * (real_image < 255)
    for name, data in (("off the grid", off_grid), ("12-bit", twelve_bit), ("between steps", between)):
        assert as_eight_bit_data(data) is None, name
        np.testing.assert_array_equal(to_uint8(data), to_uint8(data, DEFAULT_PERCENTILES), err_msg=name)


def test_percentile_mapping_by_hand():
    x = np.arange(101, dtype=np.uint16).reshape(1, 101) * 40  # 0, 40, ..., 4000: 12-bit camera data
    out = to_uint8(x, (1, 99))
    lo, hi = TRAINING_LEVELS  # the 1st and 99th percentiles are 40 and 3960
    expect = np.clip(np.round((x.astype(float) - 40) * (hi - lo) / 3920 + lo), 0, 255)
    np.testing.assert_array_equal(out, expect)
    assert out[0, 1] == round(lo) and out[0, 99] == round(hi) and out.dtype == np.uint8
    # by the data type's range the same data would be nearly black
    assert to_uint8(x, "off").max() == round(4000 * 255 / 65535)
    assert (to_uint8(np.full((4, 4), 7.5, np.float32), (1, 99)) == round(sum(TRAINING_LEVELS) / 2)).all()


def test_rgb_becomes_luminance_like_pil(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    tifffile.imwrite(tmp_path / "c.tif", rgb, photometric="rgb")
    pil = np.array(Image.fromarray(rgb).convert("L")).astype(int)
    for name in ("c.png", "c.tif"):
        gray = read_image(tmp_path / name)
        assert gray.shape == (20, 30) and np.abs(gray.astype(int) - pil).max() <= 1
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif", InputOptions(channel=1)), rgb[..., 1])


def test_stacks_need_a_page_or_channel_and_say_so(tmp_path):
    a = np.arange(3 * 8 * 10, dtype=np.uint8).reshape(3, 8, 10)
    tifffile.imwrite(tmp_path / "pages.tif", a, photometric="minisblack")
    with pytest.raises(DataError, match=r"pages\.tif: shape \(3, 8, 10\) \(axes QYX\): a 3-page stack; pass --page 0\.\.2"):
        read_image(tmp_path / "pages.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "pages.tif", InputOptions(page=2)), a[2])
    with pytest.raises(DataError, match="--page 3 out of range, the file has 3 page"):
        read_image(tmp_path / "pages.tif", InputOptions(page=3))
    # an ImageJ hyperstack: 2 z-slices x 2 channels
    hyper = np.arange(2 * 2 * 8 * 10, dtype=np.uint16).reshape(2, 2, 8, 10)
    tifffile.imwrite(tmp_path / "zc.tif", hyper, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(DataError, match=r"zc\.tif: shape \(2, 2, 8, 10\) \(axes ZCYX\): a 2-page stack"):
        read_image(tmp_path / "zc.tif", InputOptions(channel=0))
    with pytest.raises(DataError, match="2 channels; pass --channel 0..1"):
        read_image(tmp_path / "zc.tif", InputOptions(page=1))
    got = read_image(tmp_path / "zc.tif", InputOptions(page=1, channel=0, normalize="off"))
    np.testing.assert_array_equal(got, np.round(hyper[1, 0] / 257).astype(np.uint8))
    Image.fromarray(a[0]).save(tmp_path / "one.png")
    with pytest.raises(DataError, match="--page 1 out of range, the file has 1 page"):
        read_image(tmp_path / "one.png", InputOptions(page=1))


def test_bad_files_and_values_are_named(tmp_path):
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    with pytest.raises(DataError, match="cut.png: unreadable image"):
        read_image(tmp_path / "cut.png")
    (tmp_path / "cut.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match="cut.tif: unreadable TIFF"):
        read_image(tmp_path / "cut.tif")
    tifffile.imwrite(tmp_path / "whole.tif", np.zeros((64, 64), np.uint16))
    (tmp_path / "half.tif").write_bytes((tmp_path / "whole.tif").read_bytes()[:4000])
    with pytest.raises(DataError, match="half.tif: unreadable TIFF"):
        read_image(tmp_path / "half.tif")
    tifffile.imwrite(tmp_path / "big.tif", np.full((8, 10), 3.0, np.float32))
    with pytest.raises(DataError, match=r"big.tif: float image with values 3\.\.3; --normalize off needs them in 0\.\.1"):
        read_image(tmp_path / "big.tif", InputOptions(normalize="off"))
    tifffile.imwrite(tmp_path / "nan.tif", np.full((8, 10), np.nan, np.float32))
    with pytest.raises(DataError, match="nan.tif: the image holds NaN"):
        read_image(tmp_path / "nan.tif")
    with pytest.raises(FileNotFoundError, match="image not found"):
        read_image(tmp_path / "missing.png")


@pytest.mark.parametrize("bad, match", [({"normalize": (99, 1)}, "LOW < HIGH"), ({"normalize": "on"}, "'auto', 'off'"),
                                        ({"page": -1}, "page must be >= 0")])
def test_input_options_refuse_nonsense(bad, match):
    with pytest.raises(ValueError, match=match):
        InputOptions(**bad)


def test_more_refusals_are_named(tmp_path):
    tifffile.imwrite(tmp_path / "signed.tif", np.array([[-5, 3], [2, 1]], np.int16))
    with pytest.raises(DataError, match="signed.tif: signed image with negative values"):
        read_image(tmp_path / "signed.tif", InputOptions(normalize="off"))
    tifffile.imwrite(tmp_path / "two.tif", np.zeros((2, 8, 10), np.uint8), metadata={"axes": "CYX"})
    with pytest.raises(DataError, match="--channel 2 out of range, the image has 2 channel"):
        read_image(tmp_path / "two.tif", InputOptions(channel=2))
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as w:
        w.write(np.zeros((8, 10), np.uint8))
        w.write(np.zeros((4, 6), np.uint8))
    with pytest.raises(DataError, match=r"mixed.tif: 2 images of different shapes"):
        read_image(tmp_path / "mixed.tif")
