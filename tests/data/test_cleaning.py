"""Label cleaning on hand-made masks: holes filled, fragments and tiny instances dropped,
duplicates removed, other instances respected, and nothing changes with the switch off."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from tiny_kaggle import H, W, rect, ring

from neuroseg.data.cleaning import clean_annotations, clean_instance
from neuroseg.structures import rle


def frame(*instances: tuple[str, str, np.ndarray]) -> pd.DataFrame:
    """(image_id, cell_type, mask) -> a validated-looking train frame."""
    return pd.DataFrame([{"id": i, "annotation": rle.encode(m), "width": W, "height": H, "cell_type": t,
                          "sample_id": ""} for i, t, m in instances])


def test_ring_becomes_a_disk():
    df = frame(("x", "astro", ring(10, 10, 12, 4)))
    out, report = clean_annotations(df, enabled=True, min_fragment_area=16)
    assert out["annotation"].tolist() == [rle.encode(rect(10, 10, 12, 12))]
    astro = report["by_cell_type"]["astro"]
    assert (astro["instances_changed"], astro["pixels_added"], astro["pixels_removed"]) == (1, 16, 0)
    assert (astro["mean_area_before"], astro["mean_area_after"]) == (144 - 16, 144)
    assert report["changed_pixels_by_image"] == {"x": 16}


def test_fragment_is_removed_and_tiny_instance_dropped():
    body_and_fragment = rect(5, 5, 10, 10) | rect(30, 30, 2, 2)  # 100 px + a 4 px fragment
    df = frame(("x", "astro", body_and_fragment), ("x", "astro", rect(40, 50, 3, 3)))  # 9 px < 16
    out, report = clean_annotations(df, enabled=True, min_fragment_area=16)
    assert out["annotation"].tolist() == [rle.encode(rect(5, 5, 10, 10))]
    astro = report["by_cell_type"]["astro"]
    assert astro["fragments_removed"] == 1
    assert astro["instances_dropped"] == 1
    assert astro["pixels_removed"] == 4 + 9
    assert astro["mean_area_after"] == 100


def test_large_second_component_is_kept():
    two_cells = rect(5, 5, 10, 10) | rect(30, 30, 5, 5)  # 25 px >= 16: not a fragment
    result = clean_instance(np.flatnonzero(two_cells), (H, W), None, min_fragment_area=16)
    np.testing.assert_array_equal(result.indices, np.flatnonzero(two_cells))
    assert result.fragments_removed == 0


def test_hole_owned_by_another_instance_is_not_filled():
    inner = rect(14, 14, 2, 2)  # sits in the 4 x 4 hole of the ring
    df = frame(("x", "astro", ring(10, 10, 12, 4)), ("x", "astro", inner))
    out, report = clean_annotations(df, enabled=True, min_fragment_area=1)
    assert out["annotation"].tolist() == [rle.encode(rect(10, 10, 12, 12) & ~inner), rle.encode(inner)]
    astro = report["by_cell_type"]["astro"]
    assert (astro["pixels_added"], astro["hole_pixels_owned_by_others"]) == (12, 4)


def test_only_astro_is_cleaned_but_duplicates_go_everywhere():
    df = frame(("c", "cort", ring(10, 10, 12, 4)), ("c", "cort", rect(30, 30, 5, 5)),
               ("c", "cort", rect(30, 30, 5, 5)))
    out, report = clean_annotations(df, enabled=True)
    assert out["annotation"].tolist() == df["annotation"].tolist()[:2]
    cort = report["by_cell_type"]["cort"]
    assert (cort["duplicates_dropped"], cort["instances_changed"], cort["instances"]) == (1, 0, 3)


def test_switch_off_changes_nothing():
    df = frame(("x", "astro", ring(10, 10, 12, 4)), ("x", "astro", rect(40, 50, 3, 3)),
               ("x", "astro", rect(40, 50, 3, 3)))
    out, report = clean_annotations(df, enabled=False, min_fragment_area=16)
    pd.testing.assert_frame_equal(out, df)
    astro = report["by_cell_type"]["astro"]
    assert report["enabled"] is False
    assert astro["instances"] == 3
    assert astro["mean_area_before"] == astro["mean_area_after"] == round((128 + 9 + 9) / 3, 2)
    assert all(astro[k] == 0 for k in ("instances_changed", "pixels_added", "pixels_removed",
                                       "instances_dropped", "duplicates_dropped"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown cell type"):
        clean_annotations(frame(("x", "astro", rect(1, 1, 5, 5))), cell_types=("glia",))
    with pytest.raises(ValueError, match="min_fragment_area"):
        clean_annotations(frame(("x", "astro", rect(1, 1, 5, 5))), min_fragment_area=-1)
