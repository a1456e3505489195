"""The three models against the contract, on 128-px synthetic batches with the smallest variants."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from neuroseg import config
from neuroseg.models import MODELS, build
from neuroseg.models.upernet import WatershedParams, probs_to_instances
from neuroseg.models.weights import WeightsError, load_weights
from neuroseg.models.yolox import box_ap50
from neuroseg.structures.box_masks import paste_masks
from neuroseg.training import checkpoint

TINY = {
    "yolox": ["yolox.size=nano", "yolox.input_size=128", "yolox.mosaic_prob=0"],
    "maskrcnn": ["maskrcnn.backbone=resnet18", "maskrcnn.v2_head=false", "maskrcnn.anchor_sizes=[4,8,16,32,64]",
                 "maskrcnn.rpn_post_nms_top_n_train=100", "maskrcnn.rpn_post_nms_top_n_test=100",
                 # the mask head costs ~1 GFLOP per RoI: few of them (16 sampled per image, at
                 # most 4 positive, so 4 mask RoIs) and 10 detections
                 "maskrcnn.box_batch_size_per_image=16", "maskrcnn.score_threshold=0.0",
                 "maskrcnn.detections_per_image=10"],
    "upernet": ["upernet.encoder=resnet18", "upernet.decoder_channels=32"],
}
OVERFIT = {"yolox": (3e-3, 40), "maskrcnn": (1e-4, 12), "upernet": (3e-3, 40)}  # lr, max steps


def tiny_cfg(name: str, *extra: str) -> config.Config:
    return config.load(None, [*TINY[name], *extra])


def tiny_model(name: str, *extra: str):
    torch.manual_seed(0)
    return build(name, tiny_cfg(name, *extra))


def recalibrate_bn(model, images, targets) -> None:
    """Set BatchNorm running statistics to this batch's. YOLOX's BN momentum (0.03) on 0-255 input
    leaves the running variance far from the truth after a few dozen steps (eval then finds
    nothing, while train-mode BN finds every cell); real runs take thousands of steps."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, exactly its statistics
    with torch.no_grad():
        model.train()(images, targets)
    for bn in bns:
        bn.momentum = 0.1


@pytest.fixture(scope="module")
def trained(request):
    """name -> (model overfitted on the fixed batch, loss history, batch); built lazily, once."""
    cache: dict = {}

    def get(name: str, batch):
        if name not in cache:
            images, targets = batch
            model = tiny_model(name).train()
            lr, steps = OVERFIT[name]
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            history = []
            for _ in range(steps):
                losses = model(images, targets)
                assert set(losses) and all(torch.isfinite(v) and v.dim() == 0 for v in losses.values()), losses
                loss = sum(losses.values())
                history.append(loss.item())
                opt.zero_grad()
                loss.backward()
                opt.step()
                if loss.item() < history[0] / 2 and len(history) >= 5:
                    break
            recalibrate_bn(model, images, targets)
            cache[name] = (model.eval(), history, batch)
        return cache[name]

    return get


def test_registry_builds_and_lists_names():
    assert set(MODELS) == {"yolox", "maskrcnn", "upernet"}
    with pytest.raises(ValueError, match=r"unknown model 'detr'.*'maskrcnn'.*'upernet'.*'yolox'"):
        build("detr", config.Config())


def test_yolox_validates_its_config():
    with pytest.raises(ValueError, match="multiple of 32.*100"):
        tiny_model("yolox", "yolox.input_size=100")
    with pytest.raises(ValueError, match=r"unknown yolox size 'huge'.*'nano'"):
        tiny_model("yolox", "yolox.size=huge")


@pytest.mark.parametrize("name", ["yolox", "maskrcnn", "upernet"])
def test_overfits_a_fixed_batch(name, trained, tiny_batch):
    _, history, _ = trained(name, tiny_batch)
    assert min(history) < history[0] / 2, f"{name} loss {history[0]:.3f} -> {history}"


@pytest.mark.parametrize("name", ["yolox", "maskrcnn", "upernet"])
def test_checkpoint_reload_gives_identical_eval_outputs(name, trained, tiny_batch, tmp_path):
    model, _, (images, _) = trained(name, tiny_batch)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = build(name, tiny_cfg(name)).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        a, b = model(images), fresh(images)
    assert len(a) == len(b) == 2
    for pa, pb in zip(a, b):
        assert pa.keys() == pb.keys()
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k
    if name == "upernet":
        assert a[0]["probs"].shape == (3, 128, 128)
        assert torch.allclose(a[0]["probs"].sum(0), torch.ones(128, 128))
        assert a[0]["cell_type_probs"].shape == (3,)
    else:
        assert len(a[0]["boxes"]) > 0  # an overfitted detector finds something
        assert a[0]["labels"].dtype == torch.int64 and set(a[0]["labels"].tolist()) <= {1, 2, 3}


def test_maskrcnn_masks_for_boxes_reproduces_its_own_mask_probs(trained, tiny_batch):
    model, _, (images, _) = trained("maskrcnn", tiny_batch)
    with torch.no_grad():
        preds = model(images)
        again = model.masks_for_boxes(images, [p["boxes"] for p in preds], [p["labels"] for p in preds])
        kept = model.masks_for_boxes(images, [p["boxes"] for p in preds], [p["labels"] for p in preds],
                                     features=model.box_features(images))
    for p, m, k in zip(preds, again, kept):
        assert p["mask_probs"].shape == m.shape == (len(p["boxes"]), 28, 28)
        assert torch.allclose(p["mask_probs"], m, atol=1e-5)
        assert torch.equal(k, m)
    empty = model.masks_for_boxes(images, [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.int64)] * 2)
    assert [e.shape for e in empty] == [(0, 28, 28)] * 2


def test_maskrcnn_detect_without_masks_keeps_the_detections(trained, tiny_batch):
    """``detect(masks=False)`` (the ensemble's pass: it masks its fused boxes later) gives the same
    boxes, scores and labels, no masks, and features that reproduce the mask head's output."""
    model, _, (images, _) = trained("maskrcnn", tiny_batch)
    with torch.no_grad():
        full = model(images)
        dets, features = model.detect(images, masks=False)
        later = model.masks_for_boxes(images, [d["boxes"] for d in dets], [d["labels"] for d in dets],
                                      features=features)
    assert sum(len(d["boxes"]) for d in dets) > 0
    for f, d, m in zip(full, dets, later):
        assert "mask_probs" not in d
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(f[key], d[key]), key
        assert torch.allclose(f["mask_probs"], m, atol=1e-5)


def test_maskrcnn_v2_heads_build_and_train(tiny_batch):
    model = tiny_model("maskrcnn", "maskrcnn.v2_head=true", ).train()
    rpn_convs = [m for m in model.net.rpn.head.conv.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(rpn_convs) == 2  # conv_depth=2
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.net.roi_heads.mask_head.modules())
    losses = model(*tiny_batch)
    assert {"loss_mask", "loss_classifier", "loss_objectness"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("v2", [False, True])
def test_maskrcnn_narrow_fpn_and_mask_head_build_train_and_predict(tiny_batch, v2):
    """The CPU shape (configs/cpu.yaml): FPN width and mask head convs/channels from the config."""
    model = tiny_model("maskrcnn", f"maskrcnn.v2_head={str(v2).lower()}", "maskrcnn.fpn_channels=32",
                       "maskrcnn.mask_head_channels=16", "maskrcnn.mask_head_convs=2")
    assert model.net.backbone.out_channels == 32
    convs = [m for m in model.net.roi_heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(32, 16), (16, 16)]
    assert model.net.roi_heads.mask_predictor.conv5_mask.in_channels == 16
    assert model.net.rpn.head.cls_logits.in_channels == 32
    losses = model.train()(*tiny_batch)
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        preds = model.eval()(tiny_batch[0])
    assert all(p["mask_probs"].shape[1:] == (28, 28) for p in preds)
    with pytest.raises(ValueError, match="mask_head_convs"):
        tiny_model("maskrcnn", "maskrcnn.mask_head_convs=0")
    with pytest.raises(ValueError, match="fpn_channels"):
        tiny_model("maskrcnn", "maskrcnn.fpn_channels=0")


@pytest.mark.parametrize("shape", [(64, 64), (96, 160), (640, 640)])
def test_maskrcnn_sees_every_input_at_its_own_size(shape):
    """Inputs come at the model's scale already (data.train_scale, crop_size windows, tiles):
    neither training nor inference resizes them -- torchvision's transform would blow a 64-px crop
    up, and shrink a 640 x 640 tile to 520 x 520 -- and boxes stay in input coordinates."""
    model = tiny_model("maskrcnn")
    image = [torch.rand(3, *shape)]
    target = [{"boxes": torch.tensor([[8.0, 8.0, 24.0, 40.0]]), "labels": torch.tensor([1]),
               "masks": torch.zeros((1, *shape), dtype=torch.uint8)}]
    images, targets = model.train().net.transform(image, target)
    assert images.image_sizes == [shape] and targets[0]["boxes"].tolist() == [[8.0, 8.0, 24.0, 40.0]]
    images, _ = model.eval().net.transform(image)
    assert images.image_sizes == [shape]
    assert images.tensors.shape[-2] % 32 == 0 and images.tensors.shape[-1] % 32 == 0  # padded only


def test_removed_resize_keys_load_with_a_warning(caplog):
    """Older config files and the configs stored in older checkpoints name maskrcnn.min_size."""
    config._warned.clear()
    with caplog.at_level("WARNING", logger="neuroseg"):
        cfg = config.from_dict({"maskrcnn": {"min_size": 520, "max_size": 704, "backbone": "resnet18"}})
    assert "maskrcnn.min_size is no longer used" in caplog.text
    assert cfg.maskrcnn.backbone == "resnet18"
    assert not hasattr(cfg.maskrcnn, "min_size")
    with pytest.raises(config.ConfigError, match="unknown key"):
        config.from_dict({"maskrcnn": {"min_sise": 520}})


def test_paste_masks_fills_the_box():
    probs = torch.ones(1, 28, 28)
    out = paste_masks(probs, torch.tensor([[10.0, 20.0, 30.0, 60.0]]), (80, 50))
    assert out.shape == (1, 80, 50)
    assert out[0, 22:58, 12:28].min() > 0.99
    assert out[0, :18].max() == 0 and out[0, :, 32:].max() == 0


def _scatter_rects(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(images)
    for b in boxes.long():
        out[:, :, b[1]:b[3], b[0]:b[2]] = 1.0
    return out


def test_yolox_letterbox_keeps_boxes_on_their_pixels():
    model = tiny_model("yolox")
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0], [60.0, 40.0, 90.0, 48.0]])
    images = _scatter_rects(torch.zeros(1, 3, 48, 96), boxes)  # non-square: padded below
    x, sx, sy, (nh, nw) = model._letterbox(images, 128)
    assert x.shape == (1, 3, 128, 128) and (nh, nw) == (64, 128)
    assert (x[0, 0, nh:] == 114).all()
    scaled = boxes * torch.tensor([sx, sy, sx, sy])
    for b in scaled.round().long():
        assert x[0, 0, b[1] + 1:b[3] - 1, b[0] + 1:b[2] - 1].min() > 250  # inside: bright
        assert x[0, 0, b[1] - 2, b[0]:b[2]].max() < 5  # just above: dark


def test_yolox_letterbox_antialiases_when_it_shrinks():
    """One-pixel stripes shrunk to 0.375x average to about mid gray (plain bilinear samples two
    pixels per output and gives 42..212); enlarging is unchanged bilinear."""
    model = tiny_model("yolox")
    stripes = torch.zeros(1, 3, 256, 256)
    stripes[..., ::2] = 1.0
    x, *_ = model._letterbox(stripes, 96)
    inner = x[..., 2:-2]  # the outer columns see the stripes' edge
    assert torch.allclose(inner, torch.full_like(inner, 127.5), atol=10.0)
    small = torch.rand(1, 3, 32, 32)
    big, *_ = model._letterbox(small, 64)
    torch.testing.assert_close(big, torch.nn.functional.interpolate(small * 255, size=(64, 64), mode="bilinear",
                                                                   align_corners=False))


def test_yolox_infers_at_the_ratio_it_trained_with(tiny_batch):
    """Training on 128-px images into input_size 64 records the long side (0.5x); at inference a
    256 x 192 tile is halved too, padded to multiples of 32, not squeezed into 64 x 64. The side
    survives the EMA and a state-dict round trip; a checkpoint without it fits inputs as before."""
    model = tiny_model("yolox", "yolox.input_size=64")
    tile = torch.rand(1, 3, 256, 192)
    assert int(model.train_long_side) == 0
    assert model._letterbox(tile, 64, model.inference_ratio())[0].shape == (1, 3, 64, 64)  # untrained: fit
    ema = checkpoint.ModelEMA(model, 0.9998)
    model.train()(*tiny_batch)
    ema.update(model)
    assert int(model.train_long_side) == 128 and model.inference_ratio() == 0.5
    assert int(ema.module.train_long_side) == 128  # copied, not averaged from 0
    x, sx, sy, content = model._letterbox(tile, 64, model.inference_ratio())
    assert x.shape == (1, 3, 128, 96) and (sx, sy) == (0.5, 0.5) and content == (128, 96)
    odd, *_ = model._letterbox(torch.rand(1, 3, 100, 150), 64, model.inference_ratio())
    assert odd.shape == (1, 3, 64, 96)  # 50 x 75 content, padded up to multiples of 32
    small, *_ = model._letterbox(torch.rand(1, 3, 96, 128), 64, model.inference_ratio())
    assert small.shape == (1, 3, 64, 64)  # the training size: the training square, as before
    fresh = tiny_model("yolox", "yolox.input_size=64")
    fresh.load_state_dict(model.state_dict())
    assert int(fresh.train_long_side) == 128
    old = {k: v for k, v in model.state_dict().items() if k != "train_long_side"}
    fresh.load_state_dict(old)
    assert int(fresh.train_long_side) == 0
    with torch.no_grad():
        preds = model.eval()(tile)
    assert preds[0]["boxes"].shape[1] == 4 and (preds[0]["boxes"][:, 2] <= 192).all()


def test_yolox_mosaic_moves_boxes_with_their_pixels():
    model = tiny_model("yolox", "yolox.mosaic_prob=1")
    torch.manual_seed(0)
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 30.0], [70.0, 60.0, 110.0, 120.0]]),
             torch.tensor([[30.0, 30.0, 90.0, 50.0]])]
    x = torch.zeros(2, 3, 128, 128)
    for i, b in enumerate(boxes):
        x[i:i + 1] = _scatter_rects(x[i:i + 1], b) * 255
    classes = [torch.tensor([0, 1]), torch.tensor([2])]
    n_kept = 0
    for _ in range(5):
        out, ob, oc = model._mosaic(x, boxes, classes, (128, 128))
        assert out.shape == x.shape
        for i in range(2):
            assert len(ob[i]) == len(oc[i])
            for b in ob[i].round().long():
                n_kept += 1
                assert (b[2:] - b[:2]).min() >= 2
                assert out[i, 0, b[1]:b[3], b[0]:b[2]].float().mean() > 200  # the box is on its rectangle
    assert n_kept > 0


def test_yolox_last_epochs_turn_off_mosaic_and_turn_on_l1(tiny_batch):
    model = tiny_model("yolox", "yolox.mosaic_prob=1", "yolox.no_aug_epochs=2").train()
    model.on_epoch_start(0, 10)
    assert model.mosaic_active and not model.net.head.use_l1
    assert model(*tiny_batch)["l1_loss"].item() == 0
    model.on_epoch_start(8, 10)
    assert not model.mosaic_active and model.net.head.use_l1
    assert model(*tiny_batch)["l1_loss"].item() > 0


def test_yolox_multiscale_stays_a_multiple_of_32():
    model = tiny_model("yolox", "yolox.input_size=128", "yolox.multiscale_range=2")
    sizes = {model._train_size() for _ in range(200)}
    assert sizes == {64, 96, 128, 160, 192}


def test_box_ap50_hand_computed():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    pred = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [21, 21, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> envelope 1, 2/3, 2/3 -> AP = 1/2 + 1/2 * 2/3
    ap, rec = box_ap50(pred, scores, gt)
    assert ap == pytest.approx(0.5 + 1 / 3) and rec == 1.0
    assert box_ap50(pred[:0], scores[:0], gt) == (0.0, 0.0)
    assert box_ap50(pred[:0], scores[:0], gt[:0]) == (1.0, 1.0)


def test_score_predictions_of_perfect_predictions(tiny_batch):
    images, targets = tiny_batch
    yolox = tiny_model("yolox")
    preds = [{"boxes": t["boxes"], "scores": torch.linspace(1, 0.5, len(t["boxes"])), "labels": t["labels"]}
             for t in targets]
    assert [s["ap50"] for s in yolox.score_predictions(preds, targets)] == [1.0, 1.0]

    # Mask R-CNN: masks resampled to 28 x 28 in their boxes, as the mask head would predict them
    mrcnn = tiny_model("maskrcnn")
    preds = []
    for t in targets:
        rois = torch.cat([torch.arange(len(t["boxes"]), dtype=torch.float32)[:, None], t["boxes"]], 1)
        probs = roi_align(t["masks"][:, None].float(), rois, (28, 28), 1.0, aligned=True)[:, 0]
        preds.append({"boxes": t["boxes"], "scores": torch.ones(len(rois)), "labels": t["labels"],
                      "mask_probs": probs})
    assert min(s["score"] for s in mrcnn.score_predictions(preds, targets)) > 0.8

    # UPerNet: one-hot probabilities of the true semantic map are split back into the cells exactly
    upernet = tiny_model("upernet")
    preds = [{"probs": torch.nn.functional.one_hot(t["semantic"], 3).permute(2, 0, 1).float(),
              "cell_type_probs": torch.nn.functional.one_hot(t["cell_type"], 3).float()} for t in targets]
    assert upernet.score_predictions(preds, targets) == [{"score": 1.0, "cell_type_acc": 1.0}] * 2


def test_probs_to_instances_splits_touching_cells_along_the_border():
    probs = np.zeros((3, 20, 30), dtype=np.float32)
    probs[0] = 1
    cells = np.zeros((20, 30), dtype=bool)
    cells[5:15, 3:27] = True  # one blob = two touching cells ...
    probs[:, cells] = [[0], [0.9], [0.1]]
    probs[:, 5:15, 14:16] = np.array([0, 0.2, 0.8])[:, None, None]  # ... split by a border strip
    probs[:, 1:3, 1:3] = np.array([0, 1, 0])[:, None, None]  # a 4-px speck, under min_area
    label, scores = probs_to_instances(probs, WatershedParams(min_area=8))
    assert label.dtype == np.int32 and label.max() == 2
    assert (label[cells] > 0).all() and (label[~cells] == 0).all()
    left, right = label[10, 5], label[10, 25]
    assert left != right and (label[5:15, 3:14] == left).all() and (label[5:15, 16:27] == right).all()
    assert scores.shape == (2,) and np.all((scores > 0.7) & (scores < 0.9))
    empty, s = probs_to_instances(np.stack([np.ones((4, 4)), np.zeros((4, 4)), np.zeros((4, 4))]))
    assert empty.max() == 0 and s.shape == (0,)


def test_upernet_pads_odd_sizes_and_crops_back():
    model = tiny_model("upernet").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 70, 100))
    assert out[0]["probs"].shape == (3, 70, 100)


# ---- weights ----

def _nano_state(num_classes: int) -> dict[str, torch.Tensor]:
    from yolox.models import YOLOPAFPN, YOLOX, YOLOXHead

    net = YOLOX(YOLOPAFPN(0.33, 0.25, depthwise=True), YOLOXHead(num_classes, 0.25, depthwise=True))
    return net.state_dict()


def test_load_weights_skips_only_class_dependent_heads(tmp_path, caplog):
    coco = _nano_state(80)
    path = tmp_path / "yolox_nano.pth"
    # official layout: {"model": ...}; a DDP "module." prefix is stripped too
    torch.save({"model": {f"module.{k}": v for k, v in coco.items()}, "start_epoch": 300}, path)
    with caplog.at_level(logging.WARNING):
        model = build("yolox", tiny_cfg("yolox", f"yolox.weights={path}"))
    own = model.net.state_dict()
    stem = "backbone.backbone.stem.conv.conv.weight"
    assert torch.equal(own[stem], coco[stem])
    assert own["head.cls_preds.0.weight"].shape[0] == 3  # fresh 3-class head
    assert "class-dependent head" in caplog.text and "head.cls_preds.0.weight" in caplog.text


def test_load_weights_errors_name_the_file_and_the_problem(tmp_path):
    model = tiny_model("yolox")
    with pytest.raises(WeightsError, match="weights file not found: .*missing.pth"):
        load_weights(model.net, tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk\.pth: not a readable torch weights file"):
        load_weights(model.net, junk)
    # YOLOX-tiny weights into nano: shapes differ outside the heads
    tiny_state = build("yolox", tiny_cfg("yolox", "yolox.size=tiny")).net.state_dict()
    torch.save(tiny_state, tmp_path / "tiny.pth")
    with pytest.raises(WeightsError, match=r"tiny\.pth: \d+ tensor\(s\) differ in shape.*\n  backbone\..*file \("):
        load_weights(model.net, tmp_path / "tiny.pth", head_prefixes=("head.cls_preds.",))
    # a different network altogether: too few matching tensors
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), tmp_path / "other.pth")
    with pytest.raises(WeightsError, match=r"other\.pth: only 0 of the model's \d+ tensors found"):
        load_weights(model.net, tmp_path / "other.pth")
    # the same class-dependent mismatch is an error when heads may not differ
    torch.save(_nano_state(80), tmp_path / "coco.pth")
    with pytest.raises(WeightsError, match="head.cls_preds.0.weight: file \\(80, 64, 1, 1\\)"):
        load_weights(model.net, tmp_path / "coco.pth", allow_head_mismatch=False,
                     head_prefixes=("head.cls_preds.",))


def test_upernet_encoder_weights_from_a_plain_timm_checkpoint(tmp_path):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("convnext_atto", pretrained=False)  # with its classifier head
    torch.save(source.state_dict(), tmp_path / "convnext_atto.pth")
    model = build("upernet", tiny_cfg("upernet", "upernet.encoder=tu-convnext_atto",
                                      f"upernet.encoder_weights={tmp_path / 'convnext_atto.pth'}"))
    enc = model.net.encoder.state_dict()
    assert torch.equal(enc["model.stem_0.weight"], source.state_dict()["stem.0.weight"])
    assert torch.equal(enc["model.stages_3.blocks.1.mlp.fc2.weight"],
                       source.state_dict()["stages.3.blocks.1.mlp.fc2.weight"])


def test_yolox_batchnorm_momentum_comes_from_the_config():
    bns = [m for m in tiny_model("yolox", "yolox.bn_momentum=0.2").modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(bn.momentum == 0.2 and bn.eps == 1e-3 for bn in bns)


def test_maskrcnn_class_agnostic_has_one_cell_class_and_untyped_detections(tiny_batch):
    """``class_agnostic``: box and mask predictors of background + "cell"; the cell-type labels of
    the targets are learnt as that one class; detections carry label 0; the mask head ignores the
    labels it is given (any cell type gets the "cell" mask)."""
    images, targets = tiny_batch
    assert {int(v) for t in targets for v in t["labels"]} > {1}  # the batch holds more than one type
    model = tiny_model("maskrcnn", "maskrcnn.class_agnostic=true").train()
    rh = model.net.roi_heads
    assert rh.box_predictor.cls_score.out_features == 2 and rh.box_predictor.bbox_pred.out_features == 8
    assert rh.mask_predictor.mask_fcn_logits.out_channels == 2
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(3):  # a label of 2 or 3 would index past the 2 classes and fail here
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    recalibrate_bn(model, images, targets)
    with torch.no_grad():
        preds = model.eval()(images)
        boxes = [p["boxes"] for p in preds]
        typed = [model.masks_for_boxes(images, boxes, [torch.full((len(b),), k) for b in boxes]) for k in (1, 2, 3)]
    assert sum(len(p["labels"]) for p in preds) > 0
    assert all((p["labels"] == 0).all() for p in preds)
    for p, m1, m3 in zip(preds, typed[0], typed[2]):
        assert torch.equal(m1, m3)
        assert torch.allclose(p["mask_probs"], m1, atol=1e-5)
