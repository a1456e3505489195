"""records -> COCO: pycocotools.COCO loads the written file and its masks are the Kaggle masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from tiny_kaggle import images, write_dataset

from neuroseg.config import CELL_TYPES
from neuroseg.data.coco_export import records_to_coco
from neuroseg.data.records import group_records, read_train_csv
from neuroseg.structures import rle

# pycocotools 2.0.x warns on every annToMask under numpy 2 (its __array__ lacks `copy`)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("kaggle"))
    return group_records(read_train_csv(root / "train.csv"))


def _load(d: dict, tmp_path) -> COCO:
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(d))
    return COCO(str(path))


def test_coco_loads_and_masks_equal_kaggle_masks(records, tmp_path):
    d = records_to_coco(records, ["c1", "a1", "b1"])
    coco = _load(d, tmp_path)
    assert [im["file_name"] for im in d["images"]] == ["c1.png", "a1.png", "b1.png"]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CELL_TYPES)
    assert len(coco.getAnnIds()) == 6 and sorted(coco.getAnnIds()) == [1, 2, 3, 4, 5, 6]
    spec = images()
    for image in d["images"]:
        kaggle_id = image["file_name"][:-4]
        cell_type, _, masks = spec[kaggle_id]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert len(anns) == len(masks)
        for ann, expected in zip(anns, masks):
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), expected)
            assert ann["category_id"] == CELL_TYPES.index(cell_type) + 1
            assert ann["iscrowd"] == 0 and ann["area"] == int(expected.sum())
            assert isinstance(ann["segmentation"]["counts"], str)


def test_bbox_is_xywh(records):
    d = records_to_coco(records, ["a2", "c1"])
    # a2: rect(20, 20, 6, 10) -> x 20, y 20, w 10, h 6; c1: rect(0, 0, 5, 5) and rect(40, 50, 8, 14)
    assert [a["bbox"] for a in d["annotations"]] == [[20, 20, 10, 6], [0, 0, 5, 5], [50, 40, 14, 8]]
    assert [a["image_id"] for a in d["annotations"]] == [1, 2, 2]


def test_unknown_image_id_raises(records):
    with pytest.raises(KeyError, match="1 id\\(s\\) without a record, e.g. \\['nope'\\]"):
        records_to_coco(records, ["a1", "nope"])


def test_real_image_through_coco(tmp_path, real_data):
    import pandas as pd

    df = pd.read_csv(real_data / "train.csv", dtype={"id": str})
    small = df.groupby("id").size().idxmin()  # the image with the fewest cells, to keep it quick
    record = group_records(df[df["id"] == small])[0]
    coco = _load(records_to_coco([record], [small]), tmp_path)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == len(record.annotations)
    for ann, text in zip(anns, record.annotations):
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), rle.decode(text, record.shape))
