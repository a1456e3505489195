"""neuroseg.data.synthetic: Kaggle layout, RLE validity, determinism, per-type realism, atomic writes."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from neuroseg import cli
from neuroseg.config import CELL_TYPES
from neuroseg.data.synthetic import FULL_H, FULL_W, MIN_AREA, STYLES, _image_rng, synth_image, write_dataset
from neuroseg.structures import rle

H, W = 128, 160  # small and non-square, like the real 520 x 704
COLUMNS = ["id", "annotation", "width", "height", "cell_type", "plate_time", "sample_date",
           "sample_id", "elapsed_timedelta"]
HEX12 = re.compile(r"[0-9a-f]{12}")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = write_dataset(out, n_images=8, seed=7, n_test=2, height=H, width=W)
    assert summary["n_train"] == 8 and summary["n_annotations"] > 8
    return out


@pytest.fixture(scope="module")
def train(dataset: Path) -> pd.DataFrame:
    return pd.read_csv(dataset / "train.csv", dtype=str, keep_default_na=False)


def test_layout_is_kaggle(dataset: Path, train: pd.DataFrame):
    assert sorted(p.name for p in dataset.iterdir()) == [
        "sample_submission.csv", "test", "test_truth.csv", "train", "train.csv", "train_semi_supervised"]
    assert (dataset / "train.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    assert list(train.columns) == COLUMNS
    ids = sorted(train.id.unique())
    assert all(HEX12.fullmatch(i) for i in ids)
    assert sorted(p.stem for p in (dataset / "train").glob("*.png")) == ids  # no unlabelled PNG
    assert len(list((dataset / "train_semi_supervised").glob("*.png"))) == 8 // 4
    for png in (dataset / "train").glob("*.png"):
        with Image.open(png) as im:
            assert (im.mode, im.size) == ("L", (W, H))  # 8-bit grayscale, PIL size is (w, h)
    assert set(train.width) == {str(W)} and set(train.height) == {str(H)}
    per_image = train.groupby("id").cell_type.agg(["nunique", "first"])
    assert (per_image["nunique"] == 1).all()  # one cell type per image, as in the real data
    counts = per_image["first"].value_counts()
    assert set(counts.index) == set(CELL_TYPES) and counts.max() - counts.min() <= 1  # balanced


def test_metadata_is_plausible_and_grouped(train: pd.DataFrame):
    meta = train.drop_duplicates("id")
    for row in meta.itertuples():
        assert re.fullmatch(r"\d\dh\d\dm00s", row.plate_time)
        hh, mm = row.plate_time[:2], row.plate_time[3:5]
        assert row.elapsed_timedelta == f"0 days {hh}:{mm}:00"
        assert re.fullmatch(r"20\d\d-\d\d-\d\d", row.sample_date)
        assert row.sample_id.split("[")[0] in ("shsy5y", "astros", "cort")
    per_sample = meta.groupby("sample_id").agg(n=("id", "size"), types=("cell_type", "nunique"),
                                               dates=("sample_date", "nunique"))
    assert (per_sample.types == 1).all() and (per_sample.dates == 1).all()
    assert (per_sample.n >= 2).any()  # grouped folds matter


def test_test_split_and_sample_submission(dataset: Path, train: pd.DataFrame):
    sub = pd.read_csv(dataset / "sample_submission.csv", dtype=str, keep_default_na=False)
    assert list(sub.columns) == ["id", "predicted"]
    test_ids = sorted(p.stem for p in (dataset / "test").glob("*.png"))
    assert len(test_ids) == 2 and sorted(sub.id) == test_ids
    assert (sub.predicted == "").all()
    assert not set(test_ids) & set(train.id)


def test_test_truth_holds_the_test_images_masks(dataset: Path, train: pd.DataFrame):
    """test_truth.csv (what `make demo` scores its submission against) is train.csv's format for
    exactly the test images: test image i of seed 7 is synth_image on the (seed 7, test split, i)
    stream, and its rows decode to that image's masks."""
    truth = pd.read_csv(dataset / "test_truth.csv", dtype=str, keep_default_na=False)
    assert list(truth.columns) == COLUMNS
    pngs = {p.stem: cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in (dataset / "test").glob("*.png")}
    assert sorted(truth.id.unique()) == sorted(pngs) and not set(truth.id) & set(train.id)
    found = 0
    for i in range(2):
        for cell_type in CELL_TYPES:
            image, masks = synth_image(cell_type, _image_rng(7, 2, i), H, W)
            for image_id in [k for k, png in pngs.items() if np.array_equal(png, image)]:
                rows = truth[truth.id == image_id]
                assert set(rows.cell_type) == {cell_type} and len(rows) == len(masks) > 0
                for annotation, mask in zip(rows.annotation, masks, strict=True):
                    assert np.array_equal(rle.decode(annotation, (H, W)), mask)
                found += 1
    assert found == 2


def test_every_rle_decodes_inside_its_image(dataset: Path, train: pd.DataFrame):
    for row in train.itertuples():
        shape = (int(row.height), int(row.width))
        mask = rle.decode(row.annotation, shape)  # raises on a run past the image
        assert mask.any()
    from neuroseg.data.records import read_train_csv  # the real consumer's validation accepts it too

    assert len(read_train_csv(dataset / "train.csv")) == len(train)


def test_overlapping_labels_exist_but_are_few(dataset: Path, train: pd.DataFrame):
    n_overlapping_images, overlap_px, labelled_px = 0, 0, 0
    for _, group in train.groupby("id"):
        stack = np.stack([rle.decode(a, (H, W)) for a in group.annotation])
        count = stack.sum(0)
        n_overlapping_images += int((count > 1).any())
        overlap_px += int((count > 1).sum())
        labelled_px += int((count > 0).sum())
    assert n_overlapping_images >= 1
    assert overlap_px < 0.1 * labelled_px  # mostly touching, a few overlapping (as Kaggle's)


def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path: Path, dataset: Path):
    write_dataset(tmp_path / "again", 8, seed=7, n_test=2, height=H, width=W)
    write_dataset(tmp_path / "other", 8, seed=8, n_test=2, height=H, width=W)
    first, again, other = _files(dataset), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert first == again
    assert first["train.csv"] != other["train.csv"]
    assert not set(first) & set(other) - {"train.csv", "sample_submission.csv", "test_truth.csv"}  # new ids


def _max_count(cell_type: str, height: int, width: int) -> int:
    """The most cells an image may hold: the type's full-size maximum scaled by the area, >= 1."""
    return max(1, round(STYLES[cell_type].count[1] * height * width / (FULL_H * FULL_W)))


def _hidden_fractions(masks: list[np.ndarray]) -> list[float]:
    """Per mask, the fraction of its pixels already covered by the masks before it."""
    covered, out = np.zeros_like(masks[0]), []
    for m in masks:
        out.append(float((m & covered).sum() / m.sum()))
        covered |= m
    return out


@pytest.mark.parametrize("cell_type", CELL_TYPES)
def test_synth_image_contract_and_sizes(cell_type):
    for height, width in [(64, 48), (H, W)]:
        image, masks = synth_image(cell_type, np.random.default_rng(0), height, width)
        assert image.dtype == np.uint8 and image.shape == (height, width)
        assert 1 <= len(masks) <= _max_count(cell_type, height, width)
        assert all(m.dtype == bool and m.shape == (height, width) for m in masks)
        assert min(int(m.sum()) for m in masks) >= MIN_AREA
        # a cell hides at most max_overlap of itself behind the earlier ones
        assert max(_hidden_fractions(masks)) <= STYLES[cell_type].max_overlap
    a = synth_image(cell_type, np.random.default_rng(5), H, W)
    b = synth_image(cell_type, np.random.default_rng(5), H, W)
    c = synth_image(cell_type, np.random.default_rng(6), H, W)
    assert np.array_equal(a[0], b[0]) and len(a[1]) == len(b[1])
    assert all(np.array_equal(ma, mb) for ma, mb in zip(a[1], b[1], strict=True))
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="valid"):
        synth_image("neuron", np.random.default_rng(0), H, W)


def test_train_csv_rles_decode_to_the_masks_of_synth_image(dataset: Path, train: pd.DataFrame):
    """Train image i of seed 7 is synth_image on the stream of (seed 7, train split, i): its PNG
    is that image and its rows, in order, decode to those masks."""
    pngs = {p.stem: cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in (dataset / "train").glob("*.png")}
    matched = {}
    for i in range(8):
        for cell_type in CELL_TYPES:
            image, masks = synth_image(cell_type, _image_rng(7, 1, i), H, W)
            for image_id in [k for k, png in pngs.items() if np.array_equal(png, image)]:
                matched[image_id] = (cell_type, masks)
    assert sorted(matched) == sorted(pngs)
    for image_id, (cell_type, masks) in matched.items():
        rows = train[train.id == image_id]
        assert set(rows.cell_type) == {cell_type} and len(rows) == len(masks)
        for annotation, mask in zip(rows.annotation, masks, strict=True):
            assert np.array_equal(rle.decode(annotation, (H, W)), mask)


def _elongation(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    evals = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(float)) + 1e-3 * np.eye(2))
    return float(np.sqrt(evals[1] / evals[0]))


@pytest.fixture(scope="module")
def per_type() -> dict[str, dict[str, float]]:
    """Statistics over 3 images of 256 x 320 per type (counts scale with area: x 0.22 of full)."""
    stats = {}
    for k, cell_type in enumerate(CELL_TYPES):
        areas, elong, counts = [], [], []
        for i in range(3):
            _, masks = synth_image(cell_type, np.random.default_rng([k, i]), 256, 320)
            counts.append(len(masks))
            areas += [int(m.sum()) for m in masks]
            elong += [_elongation(m) for m in masks]
        stats[cell_type] = {"area": float(np.median(areas)), "mean_area": float(np.mean(areas)),
                            "count": float(np.mean(counts)), "elong": float(np.mean(elong))}
    return stats


def test_cell_types_differ_as_the_real_ones_do(per_type):
    s = per_type
    assert s["astro"]["mean_area"] > 2 * max(s["shsy5y"]["mean_area"], s["cort"]["mean_area"])
    assert s["shsy5y"]["count"] > 3 * max(s["astro"]["count"], s["cort"]["count"])
    assert s["shsy5y"]["elong"] > s["cort"]["elong"] + 0.3
    # medians within x1.6 of the real data's (sartorius-mini: shsy5y 195, astro 894, cort 195 px)
    for cell_type, real in (("shsy5y", 195), ("astro", 894), ("cort", 195)):
        assert real / 1.6 < s[cell_type]["area"] < real * 1.6, (cell_type, s[cell_type]["area"])


@pytest.mark.parametrize("cell_type", CELL_TYPES)
def test_cells_have_a_bright_halo_and_clear_edges(cell_type):
    """Learnability: a bright ring outside each cell, a dark rim inside, strong edge gradient."""
    image, masks = synth_image(cell_type, np.random.default_rng(3), 256, 320)
    union = np.any(masks, 0).astype(np.uint8)
    k = np.ones((3, 3), np.uint8)
    ring = cv2.dilate(union, k, iterations=2).astype(bool) & ~union.astype(bool)
    rim = union.astype(bool) & ~cv2.erode(union, k, iterations=2).astype(bool)
    far = ~cv2.dilate(union, k, iterations=12).astype(bool)
    background = float(np.median(image[far]))
    assert image[ring].mean() > background + 3
    assert image[rim].mean() < background - 3
    smooth = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 1)
    grad = np.hypot(cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1))
    edge = cv2.morphologyEx(union, cv2.MORPH_GRADIENT, k).astype(bool)
    assert grad[edge].mean() > 3 * np.median(grad[far])


def test_cli_writes_dataset_and_preview_and_refuses_to_clobber(tmp_path: Path, capsys):
    out, preview = tmp_path / "d", tmp_path / "preview.png"
    args = ["synth", str(out), "--images", "3", "--test-images", "1", "--height", str(H),
            "--width", str(W), "--seed"]
    assert cli.main([*args, "1", "--preview", str(preview)]) == 0
    assert '"n_train": 3' in capsys.readouterr().out
    sheet = cv2.imread(str(preview))
    assert sheet.shape == (3 * (H + 6), 2 * W + 6, 3)  # one row per type: raw | outlined
    before = _files(out)
    with pytest.raises(SystemExit):
        cli.main([*args, "2"])  # not empty: refuses
    assert _files(out) == before
    assert cli.main([*args, "2", "--overwrite"]) == 0
    assert _files(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "preview.png"]  # no temp dirs left


def test_a_failed_run_leaves_nothing(tmp_path: Path, monkeypatch):
    import neuroseg.data.synthetic as synth

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(synth, "_render_cells", boom)
    with pytest.raises(RuntimeError):
        write_dataset(tmp_path / "d", 3, seed=0, n_test=1, height=H, width=W)
    assert list(tmp_path.iterdir()) == []


def test_livecell_copy_indexes_and_decodes_to_the_drawn_cells(tmp_path: Path):
    """``--livecell``: the Kaggle copy's layout and json shape (annotations as an object, polygons,
    one category), TIFFs at 3/4 of the size, a cell line per file-name prefix; the project's own
    COCO index and dataset read it back to the cells ``synth_image`` drew."""
    import json

    import tifffile

    from neuroseg.data.coco.dataset import ClassMapping, CocoInstanceDataset
    from neuroseg.data.coco.index import CocoIndex, build_index
    from neuroseg.data.synthetic_livecell import LINES
    from neuroseg.paths import Paths

    summary = write_dataset(tmp_path / "d", n_images=3, seed=1, n_test=0, height=128, width=160, livecell=4)
    assert summary["livecell"]["train"]["images"] == 4 and summary["livecell"]["val"]["images"] == 1
    paths = Paths(tmp_path / "d", tmp_path / "out")
    doc = json.loads(paths.livecell_json("train").read_text())
    assert isinstance(doc["annotations"], dict) and doc["categories"] == [{"id": 1, "name": "cell", "supercategory": "cell"}]
    tif = sorted(paths.livecell_images.rglob("*.tif"))
    assert len(tif) == 5 and {p.parent.name for p in tif} == set(LINES)
    assert all(p.name.startswith(p.parent.name + "_Phase_") for p in tif)
    assert tifffile.imread(tif[0]).shape == (96, 120) and tifffile.imread(tif[0]).dtype == np.uint8

    json_path = paths.livecell_json("train")
    index = CocoIndex(build_index(json_path, paths.livecell_images, paths.pretrain_index(json_path)))
    dataset = CocoInstanceDataset(index, ClassMapping(), scale=1.0)
    inter = union = 0
    for i, im in enumerate(index.images):
        line = im.file_name.split("_")[0]
        k = int(im.file_name.split("_")[3])
        _, drawn = synth_image(LINES[line], np.random.default_rng(np.random.SeedSequence(1, spawn_key=(7, 0, k))),
                               96, 120)
        image, target = dataset[i]
        masks = target["masks"].numpy().astype(bool)
        assert image.shape == (3, 96, 120) and len(masks) == len(drawn) > 0
        ious = [(a & b).sum() / (a | b).sum() for a, b in zip(masks, drawn)]
        assert min(ious) > 0.6, (im.file_name, ious)  # polygons through the outline pixels' centres
        inter += sum((a & b).sum() for a, b in zip(masks, drawn))
        union += sum((a | b).sum() for a, b in zip(masks, drawn))
    assert inter / union > 0.8
    with pytest.raises(ValueError, match="LIVECell images >= 0"):
        write_dataset(tmp_path / "e", n_images=1, seed=0, livecell=-1)
