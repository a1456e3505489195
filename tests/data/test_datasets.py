"""InstanceDataset / collate / InferenceDataset on tiny synthetic Kaggle-layout data."""

from __future__ import annotations

import dataclasses
import shutil

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from neuroseg import config
from neuroseg.config import CELL_TYPES, AugmentConfig
from neuroseg.data.datasets import (
    InferenceDataset,
    InstanceDataset,
    build_augment,
    collate,
    model_data_config,
    needs_masks,
    pack_layers,
    unpack_layers,
)
from neuroseg.data.semantic_targets import semantic_target

NO_AUG = AugmentConfig(hflip=0, vflip=0, rotate90=0, scale_limit=0, brightness_contrast=0, blur=0)


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_shapes_dtypes_labels_match_the_annotations(tiny_records_dir, tiny_records, tiny_images):
    ds = InstanceDataset(tiny_records, tiny_records_dir / "train")
    assert len(ds) == 3
    for i, rec in enumerate(tiny_records):
        image, t = ds[i]
        cell_type, raw, masks = tiny_images[rec.image_id]
        assert image.dtype == torch.float32 and image.shape == (3, 128, 160)
        assert 0 <= image.min() and image.max() <= 1
        assert torch.equal(image[0], image[2])  # gray repeated
        assert torch.allclose(image[0] * 255, torch.from_numpy(raw).float())
        n = len(masks)
        assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (n, 128, 160)
        # CSV order kept, overlapping labels intact (the astro image has overlaps)
        assert np.array_equal(t["masks"].numpy().astype(bool), masks)
        assert t["boxes"].dtype == torch.float32
        assert t["boxes"].tolist() == [_bbox(m) for m in masks]
        assert t["labels"].dtype == torch.int64
        assert t["labels"].tolist() == [CELL_TYPES.index(cell_type) + 1] * n
        assert t["cell_type"].dtype == torch.int64 and t["cell_type"].item() == CELL_TYPES.index(cell_type)
        assert t["semantic"].dtype == torch.int64
        assert np.array_equal(t["semantic"].numpy(), semantic_target(masks, 2))
        assert t["image_id"] == rec.image_id


def test_overlapping_instances_use_separate_layers():
    a = np.arange(0, 6)  # pixels 0..5 of a 4x4 image
    b = np.arange(4, 10)  # overlaps a on 4, 5
    c = np.arange(12, 14)  # overlaps nothing
    layers = pack_layers([a, b, c], (4, 4))
    assert layers.shape == (2, 4, 4)  # c fits in the first layer
    masks = unpack_layers(layers, 3).reshape(3, -1)
    for k, idx in enumerate((a, b, c)):
        assert np.flatnonzero(masks[k]).tolist() == idx.tolist()


def test_scale_resizes_image_masks_and_drops_vanished_instances(tiny_records_dir, tiny_records):
    half = InstanceDataset(tiny_records, tiny_records_dir / "train", scale=0.5)
    image, t = half[0]
    assert image.shape == (3, 64, 80) and t["masks"].shape[1:] == (64, 80) and t["semantic"].shape == (64, 80)
    # at 1/20 (6 x 8 px) nearest-neighbour resizing loses some cells: they must be dropped, not kept empty
    tiny = InstanceDataset(tiny_records, tiny_records_dir / "train", scale=0.05)
    _, t = tiny[0]
    n_in = len(tiny_records[0].annotations)
    assert 0 < len(t["masks"]) < n_in
    assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
    assert (t["masks"].flatten(1).sum(1) > 0).all()


def test_hflip_moves_image_masks_boxes_and_semantic_together(tiny_records_dir, tiny_records):
    plain = InstanceDataset(tiny_records, tiny_records_dir / "train")
    flip = InstanceDataset(tiny_records, tiny_records_dir / "train",
                           augment=dataclasses.replace(NO_AUG, hflip=1.0))
    img0, t0 = plain[1]
    img1, t1 = flip[1]
    w = img0.shape[-1]
    assert torch.equal(img1, img0.flip(-1))
    assert torch.equal(t1["masks"], t0["masks"].flip(-1))
    assert torch.equal(t1["semantic"], t0["semantic"].flip(-1))
    x1, y1, x2, y2 = t0["boxes"].unbind(1)
    assert torch.equal(t1["boxes"], torch.stack([w - x2, y1, w - x1, y2], 1))


def test_random_augmentation_keeps_targets_consistent(tiny_records_dir, tiny_records):
    aug = AugmentConfig(hflip=0.5, vflip=0.5, rotate90=1.0, scale_limit=0.3, brightness_contrast=1.0, blur=1.0)
    ds = InstanceDataset(tiny_records, tiny_records_dir / "train", augment=aug)
    torch.manual_seed(3)
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape[-2:] in ((128, 160), (160, 128))  # rotate90 may swap H and W
        masks = t["masks"].numpy().astype(bool)
        assert masks.shape[0] > 0 and masks.reshape(len(masks), -1).any(1).all()
        assert t["boxes"].tolist() == [_bbox(m) for m in masks]
        # every instance pixel is a cell pixel of the semantic map and vice versa (same warp)
        assert np.array_equal(t["semantic"].numpy() > 0, masks.any(0))


def test_random_crop_is_a_window_of_the_whole_sample(tiny_records_dir, tiny_records):
    """crop_size 64 on 128x160 images: image, masks and semantic are the same 64x64 window of the
    uncropped sample; instances cut by the window keep their visible part, boxes follow; a crop
    larger than the image pads it (gray image, empty labels)."""
    plain = InstanceDataset(tiny_records, tiny_records_dir / "train")
    crop = InstanceDataset(tiny_records, tiny_records_dir / "train", augment=dataclasses.replace(NO_AUG, crop_size=64))
    torch.manual_seed(0)
    for i in range(len(plain)):
        img0, t0 = plain[i]
        img1, t1 = crop[i]
        assert img1.shape[-2:] == (64, 64)
        hits = [(y, x) for y in range(128 - 63) for x in range(160 - 63)
                if torch.equal(img0[..., y:y + 64, x:x + 64], img1)]
        assert hits, "the crop is not a window of the image"
        y, x = hits[0]
        assert torch.equal(t1["semantic"], t0["semantic"][y:y + 64, x:x + 64])
        window = t0["masks"][:, y:y + 64, x:x + 64]
        assert torch.equal(t1["masks"], window[window.flatten(1).any(1)])
        assert t1["boxes"].tolist() == [_bbox(m) for m in t1["masks"].numpy().astype(bool)]
    big = InstanceDataset(tiny_records, tiny_records_dir / "train", augment=dataclasses.replace(NO_AUG, crop_size=192))
    img, t = big[0]
    assert img.shape[-2:] == (192, 192) and t["semantic"].shape == (192, 192)
    assert int((t["semantic"] > 0).sum()) == int((plain[0][1]["semantic"] > 0).sum())
    with pytest.raises(ValueError, match="crop_size"):
        InstanceDataset(tiny_records, tiny_records_dir / "train", augment=dataclasses.replace(NO_AUG, crop_size=-1))


def test_the_window_is_cut_before_the_flips_and_after_the_scale_jitter(tiny_records_dir, tiny_records):
    """The flips work on the window, not the whole image (cheaper, same distribution): a
    flipped window is a window of the flipped image, its labels alike."""
    first = build_augment(dataclasses.replace(NO_AUG, hflip=1.0, rotate90=1.0, crop_size=64)).transforms
    assert [type(t) for t in first] == [A.RandomCrop, A.HorizontalFlip, A.RandomRotate90]
    scaled = build_augment(dataclasses.replace(NO_AUG, hflip=1.0, scale_limit=0.2, crop_size=64)).transforms
    assert [type(t) for t in scaled] == [A.Affine, A.RandomCrop, A.HorizontalFlip]
    plain = InstanceDataset(tiny_records, tiny_records_dir / "train")
    crop = InstanceDataset(tiny_records, tiny_records_dir / "train",
                           augment=dataclasses.replace(NO_AUG, hflip=1.0, crop_size=64))
    torch.manual_seed(0)
    for i in range(len(plain)):
        img0, t0 = plain[i]
        img0, sem0, masks0 = img0.flip(-1), t0["semantic"].flip(-1), t0["masks"].flip(-1)
        img1, t1 = crop[i]
        hits = [(y, x) for y in range(128 - 63) for x in range(160 - 63)
                if torch.equal(img0[..., y:y + 64, x:x + 64], img1)]
        assert hits, "the sample is not a window of the flipped image"
        y, x = hits[0]
        assert torch.equal(t1["semantic"], sem0[y:y + 64, x:x + 64])
        window = masks0[:, y:y + 64, x:x + 64]
        assert torch.equal(t1["masks"], window[window.flatten(1).any(1)])


def test_preloaded_images_give_the_same_samples_without_their_files(tmp_path, tiny_records_dir, tiny_records,
                                                                    tiny_images):
    """``preload`` (data.cache_decoded) decodes every image once: the samples equal those of a
    dataset that reads the files per sample, under the same draws, and need no file after it."""
    aug = AugmentConfig(hflip=0.5, vflip=0.5, rotate90=0.5, scale_limit=0.0, brightness_contrast=0.5, blur=0,
                        crop_size=64)
    images = tmp_path / "train"
    shutil.copytree(tiny_records_dir / "train", images)
    plain, kept = InstanceDataset(tiny_records, images, augment=aug), InstanceDataset(tiny_records, images, augment=aug)
    held = kept.preload()
    # per 128 x 160 image: the uint8 image, and uint16 label layers (as many as cells cover one
    # pixel at most: 3 in the astro image, else 1) plus the semantic layer
    layers = [int(tiny_images[r.image_id][2].sum(0).max()) for r in tiny_records]
    assert sorted(layers) == [1, 1, 3]
    assert held == sum(128 * 160 * (1 + 2 * (n + 1)) for n in layers)

    def draws(ds):
        out = []
        for i in range(6):
            torch.manual_seed(i)
            out.append(ds[i % 3])
        return out

    before = draws(plain)
    for f in images.glob("*.png"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="image not found"):
        plain[0]
    for (img_a, t_a), (img_b, t_b) in zip(before, draws(kept), strict=True):
        assert torch.equal(img_a, img_b)
        assert sorted(t_a) == sorted(t_b)
        assert all(t_a[k] == t_b[k] if k == "image_id" else torch.equal(t_a[k], t_b[k]) for k in t_a)


def test_yolox_trains_on_whole_images_whatever_the_crop_size():
    """YOLOX letterboxes its input to input_size: a crop would be blown up to it in training and
    never seen at inference, so its training data ignores crop_size; the other models keep it."""
    cfg = config.load(None, ["data.augment.crop_size=256", "data.augment.hflip=0.3"])
    yolox = model_data_config(cfg, "yolox")
    assert yolox.data.augment == dataclasses.replace(cfg.data.augment, crop_size=0)
    assert yolox.yolox == cfg.yolox and yolox.data.train_scale == cfg.data.train_scale
    assert model_data_config(cfg, "maskrcnn") is cfg and model_data_config(cfg, "upernet") is cfg


def test_a_model_may_train_on_its_own_window_size():
    cfg = config.load(None, ["data.augment.crop_size=256", "upernet.crop_size=128", "maskrcnn.crop_size=0",
                             "yolox.input_size=320"])
    upernet, maskrcnn = model_data_config(cfg, "upernet"), model_data_config(cfg, "maskrcnn")
    assert upernet.data.augment == dataclasses.replace(cfg.data.augment, crop_size=128)
    assert maskrcnn.data.augment == dataclasses.replace(cfg.data.augment, crop_size=0)  # whole images
    assert upernet.upernet == cfg.upernet and maskrcnn.maskrcnn == cfg.maskrcnn
    assert model_data_config(cfg, "yolox").data.augment.crop_size == 0
    same = config.load(None, ["data.augment.crop_size=256", "upernet.crop_size=256"])
    assert model_data_config(same, "upernet") is same
    with pytest.raises(ValueError, match=r"upernet.crop_size must be >= 0, or -1 for data.augment.crop_size; got -2"):
        model_data_config(config.load(None, ["upernet.crop_size=-2"]), "upernet")


def test_augmentation_follows_torch_seed(tiny_records_dir, tiny_records):
    aug = AugmentConfig(hflip=0.5, vflip=0.5, rotate90=0.5, scale_limit=0.3, brightness_contrast=0.5, blur=0)
    ds = InstanceDataset(tiny_records, tiny_records_dir / "train", augment=aug)

    def run(seed):
        torch.manual_seed(seed)
        return [ds[i % 3][0] for i in range(6)]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))


def test_semantic_dir_png_is_used_and_validated(tmp_path, tiny_records_dir, tiny_records):
    sem_dir = tmp_path / "semantic"
    sem_dir.mkdir()
    rec = tiny_records[0]
    cached = np.zeros(rec.shape, dtype=np.uint8)
    cached[:10, :20] = 2  # deliberately unlike the computed target: proves the file is read
    cv2.imwrite(str(sem_dir / f"{rec.image_id}.png"), cached)
    ds = InstanceDataset(tiny_records[:1], tiny_records_dir / "train", semantic_dir=sem_dir)
    assert np.array_equal(ds[0][1]["semantic"].numpy(), cached)
    cv2.imwrite(str(sem_dir / f"{rec.image_id}.png"), cached + 3)
    with pytest.raises(ValueError, match=rf"{rec.image_id}\.png: semantic values must be 0/1/2"):
        ds[0]


def test_collate_pads_mixed_orientations(tiny_records_dir, tiny_records):
    ds = InstanceDataset(tiny_records[:1], tiny_records_dir / "train")
    rot = InstanceDataset(tiny_records[:1], tiny_records_dir / "train",
                          augment=dataclasses.replace(NO_AUG, rotate90=1.0))
    a, b = ds[0], rot[0]
    assert b[0].shape[-2:] == (160, 128)
    images, targets = collate([a, b])
    assert images.shape == (2, 3, 160, 160)
    assert torch.equal(images[0, :, :128, :160], a[0])
    assert targets[0]["masks"].shape[-2:] == (160, 160) and targets[0]["semantic"].shape == (160, 160)
    assert targets[0]["masks"][:, 128:].sum() == 0 and targets[0]["semantic"][128:].sum() == 0
    assert torch.equal(targets[1]["masks"][:, :, :128], b[1]["masks"])


def test_a_box_only_models_samples_are_the_same_without_masks(tiny_records_dir, tiny_records):
    """YOLOX trains from boxes: its samples skip the (N, H, W) masks, and everything else is what
    the full sample holds under the same augmentation draw; collate pads them all the same."""
    assert [needs_masks(m) for m in ("yolox", "maskrcnn", "upernet")] == [False, True, True]
    aug = AugmentConfig(hflip=0.5, vflip=0.5, rotate90=0.5, scale_limit=0.3, brightness_contrast=0.5, blur=0)
    full = InstanceDataset(tiny_records, tiny_records_dir / "train", augment=aug)
    boxes = InstanceDataset(tiny_records, tiny_records_dir / "train", augment=aug, masks=False)
    pairs = []
    for i in range(12):
        torch.manual_seed(i)
        a = full[i % 3]
        torch.manual_seed(i)
        pairs.append((a, boxes[i % 3]))
    shapes = {tuple(a[0].shape) for a, _ in pairs}
    assert len(shapes) == 2  # rotated and upright samples: collate pads
    for (img_a, ta), (img_b, tb) in pairs:
        assert "masks" in ta and "masks" not in tb and len(ta["boxes"]) > 0
        assert torch.equal(img_a, img_b)
        assert set(ta) - set(tb) == {"masks"}
        assert all(torch.equal(ta[k], tb[k]) for k in ("boxes", "labels", "semantic", "cell_type"))
    images, targets = collate([b for _, b in pairs])
    assert images.shape[-2:] == (160, 160) and all("masks" not in t for t in targets)
    assert {tuple(t["semantic"].shape) for t in targets} == {(160, 160)}


def test_inference_dataset(tiny_records_dir, tiny_images):
    paths = sorted((tiny_records_dir / "train").glob("*.png"))
    assert [p.stem for p in paths] == sorted(tiny_images)
    full, half = InferenceDataset(paths), InferenceDataset(paths, scale=0.5)
    assert len(full) == len(half) == 3
    for i, path in enumerate(paths):
        raw = tiny_images[path.stem][1]  # the uint8 (128, 160) gray written to the PNG
        image, image_id, original = full[i]
        assert image_id == path.stem and original == (128, 160)
        assert image.dtype == torch.float32 and image.shape == (3, 128, 160)
        expect = torch.from_numpy(raw).float() / 255  # the gray in [0, 1], in all three channels
        for channel in image:
            assert torch.equal(channel, expect)
        image, image_id, original = half[i]
        assert image_id == path.stem and original == (128, 160)  # the original size, not the input's
        assert image.dtype == torch.float32 and image.shape == (3, 64, 80)
        # halved by area averaging: each pixel the mean of its 2 x 2 block, to half a grey level
        block_mean = torch.from_numpy(raw.reshape(64, 2, 80, 2).mean(axis=(1, 3))).float()
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
        assert (image[0] * 255 - block_mean).abs().max() <= 0.5 + 1e-3
