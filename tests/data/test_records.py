"""train.csv validation (every problem listed with file, line, id), image loading, records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_kaggle import H, W, images, write_dataset

from neuroseg.data import records
from neuroseg.structures import rle


@pytest.fixture
def kaggle_dir(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "kaggle")



def instance_masks(record) -> np.ndarray:
    """Every annotation of a record decoded: ``bool (N, H, W)``."""
    return np.stack([rle.decode(a, record.shape) for a in record.annotations])

def _rewrite(path: Path, edit) -> list[str]:
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")
    return lines


def test_valid_csv_is_read_with_types_and_empty_metadata(kaggle_dir):
    df = records.read_train_csv(kaggle_dir / "train.csv")
    assert len(df) == sum(len(m) for _, _, m in images().values())
    assert df["width"].dtype == np.int64 and df["height"].dtype == np.int64
    assert set(df["width"]) == {W} and set(df["height"]) == {H}
    assert df.loc[df["id"] == "a1", "sample_id"].tolist() == ["s1", "s1"]
    assert df.loc[df["id"] == "b1", "sample_id"].tolist() == ["", ""]
    assert (df["plate_time"] == "").all()


def test_every_problem_is_listed_with_file_line_and_id(kaggle_dir):
    csv = kaggle_dir / "train.csv"

    def edit(lines):
        lines[1] = lines[1].replace(f",{W},{H},", f",{W},{H + 1},")  # line 2: wrong height
        lines[3] = lines[3].replace(",shsy5y,", ",neuron,")  # line 4: unknown cell type
        lines[4] = lines[4].replace("b1,", "zz,", 1)  # line 5: no zz.png
        lines[5] = "b1,5 3 1 2," + lines[5].split(",", 2)[2]  # line 6: unsorted runs
        lines[6] = lines[6].replace(f",{W},", ",wide,")  # line 7: non-integer width
    _rewrite(csv, edit)
    with pytest.raises(records.DataError) as e:
        records.read_train_csv(csv)
    msg = str(e.value)
    assert msg.startswith(f"{csv}: 5 problem(s):")
    assert f"line 2, id 'a1': width x height {W}x{H + 1} != image {W}x{H}" in msg
    assert "line 4, id 'a2': unknown cell_type 'neuron'" in msg
    assert f"line 5, id 'zz': image not found: {kaggle_dir / 'train' / 'zz.png'}" in msg
    assert "line 6, id 'b1': bad annotation: unsorted runs" in msg
    assert "line 7, id 'c1': width 'wide' is not a positive integer" in msg


def test_listing_is_capped(kaggle_dir):
    csv = kaggle_dir / "train.csv"
    _rewrite(csv, lambda lines: lines.extend([f"a1,1 1,{W},{H},glia,,,,"] * 60))
    with pytest.raises(records.DataError) as e:
        records.read_train_csv(csv)
    assert "60 problem(s)" in str(e.value)
    assert str(e.value).rstrip().endswith("... and 10 more")


def test_missing_columns_empty_annotation_and_mixed_cell_type(kaggle_dir):
    csv = kaggle_dir / "train.csv"
    original = csv.read_text()
    csv.write_text(original.replace("cell_type", "celltype", 1))
    with pytest.raises(records.DataError, match=r"missing column\(s\) \['cell_type'\]"):
        records.read_train_csv(csv)
    lines = original.splitlines()
    lines[1] = "a1,," + lines[1].split(",", 2)[2]
    lines[2] = lines[2].replace(",shsy5y,", ",cort,")
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(records.DataError) as e:
        records.read_train_csv(csv)
    assert "line 2, id 'a1': empty annotation" in str(e.value)
    assert "line 3, id 'a1': cell_type 'cort' differs from 'shsy5y' on line 2" in str(e.value)


def test_missing_file_or_images_dir_and_blank_line(kaggle_dir, tmp_path):
    with pytest.raises(records.DataError, match="file not found"):
        records.read_train_csv(tmp_path / "train.csv")
    with pytest.raises(records.DataError, match="images dir .*nowhere not found"):
        records.read_train_csv(kaggle_dir / "train.csv", tmp_path / "nowhere")
    _rewrite(kaggle_dir / "train.csv", lambda lines: lines.insert(2, ""))
    with pytest.raises(records.DataError) as e:
        records.read_train_csv(kaggle_dir / "train.csv")
    assert "1 problem(s):\n  line 3: blank line" in str(e.value)


def test_real_train_csv_validates(real_data):
    df = records.read_train_csv(real_data / "train.csv")
    assert len(df) == 10656 and df["id"].nunique() == 100
    per_type = df.groupby("id")["cell_type"].first().value_counts().to_dict()
    assert per_type == {"cort": 53, "shsy5y": 24, "astro": 23}


def test_load_image_png_tiff_and_colour(tmp_path):
    gray = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(gray).save(tmp_path / "g.tif")
    np.testing.assert_array_equal(records.load_image(tmp_path / "g.png"), gray)
    np.testing.assert_array_equal(records.load_image(tmp_path / "g.tif"), gray)
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(tmp_path / "c.png")
    out = records.load_image(tmp_path / "c.png")
    assert out.dtype == np.uint8 and out.shape == (H, W)
    np.testing.assert_array_equal(out, gray)  # equal channels convert to the same gray


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="x.png"):
        records.load_image(tmp_path / "x.png")
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "d.png")
    with pytest.raises(records.DataError, match="d.png: I;16 image"):
        records.load_image(tmp_path / "d.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(records.DataError, match="bad.png: unreadable image"):
        records.load_image(tmp_path / "bad.png")


def test_group_records_and_instance_masks(kaggle_dir):
    df = records.read_train_csv(kaggle_dir / "train.csv")
    shuffled = records.group_records(df.sample(frac=1, random_state=0))
    assert [r.image_id for r in shuffled] == sorted(images())
    grouped = records.group_records(df)
    b1 = grouped[2]
    assert (b1.image_id, b1.cell_type, b1.shape, b1.sample_id, b1.label) == ("b1", "astro", (H, W), "", 2)
    assert grouped[0].sample_id == "s1"
    masks = instance_masks(b1)
    assert masks.dtype == bool and masks.shape == (2, H, W)
    for m, expected in zip(masks, images()["b1"][2]):
        np.testing.assert_array_equal(m, expected)
    assert b1.annotations == tuple(rle.encode(m) for m in images()["b1"][2])
