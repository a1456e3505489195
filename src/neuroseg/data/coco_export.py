"""Image records -> COCO instance-segmentation dict (pure; after tascj's ``df2coco``).

Segmentations are pycocotools compressed RLE with ``counts`` as str, so the dict is JSON-ready
and ``pycocotools.coco.COCO`` loads it. ``category_id`` is the cell type index + 1 (the detector
label); image ``id`` is the 1-based position in ``image_ids``, ``file_name`` is ``<id>.png``.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from pycocotools import mask as mask_utils

from neuroseg.config import CELL_TYPES
from neuroseg.data.records import ImageRecord
from neuroseg.structures import rle

CATEGORIES: list[dict] = [{"id": i + 1, "name": t, "supercategory": "cell"} for i, t in enumerate(CELL_TYPES)]


def record_annotations(record: ImageRecord) -> list[dict]:
    """COCO annotations of one image, without ids (segmentation, bbox xywh, area, category)."""
    anns = []
    for a in record.annotations:
        seg = rle.to_coco(a, record.shape)
        # one RLE per call: pycocotools' area() on a list overflows a uint8 past 255 objects
        compressed = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
        anns.append({"segmentation": seg, "bbox": [float(v) for v in mask_utils.toBbox(compressed)],
                     "area": int(mask_utils.area(compressed)), "iscrowd": 0, "category_id": record.label})
    return anns


def build_coco(records: Iterable[ImageRecord], annotations: Mapping[str, Sequence[dict]] | None = None) -> dict:
    """COCO dict of ``records`` in the given order. ``annotations`` (id -> record_annotations)
    lets a caller that writes several folds convert each image's masks only once."""
    images, anns = [], []
    for image_index, record in enumerate(records, start=1):
        images.append({"id": image_index, "file_name": f"{record.image_id}.png",
                       "height": record.height, "width": record.width, "cell_type": record.cell_type})
        per_image = annotations[record.image_id] if annotations is not None else record_annotations(record)
        for ann in per_image:
            anns.append({**ann, "id": len(anns) + 1, "image_id": image_index})
    return {"info": {"description": "neuroseg: Sartorius cell instance segmentation"},
            "images": images, "annotations": anns, "categories": CATEGORIES}


def records_to_coco(records: Sequence[ImageRecord], image_ids: Iterable[str]) -> dict:
    """COCO dict of the records whose id is in ``image_ids`` (in that order); unknown ids raise."""
    by_id = {r.image_id: r for r in records}
    image_ids = list(image_ids)
    unknown = [i for i in image_ids if i not in by_id]
    if unknown:
        raise KeyError(f"records_to_coco: {len(unknown)} id(s) without a record, e.g. {unknown[:5]}")
    return build_coco(by_id[i] for i in image_ids)
