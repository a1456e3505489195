"""The training loop and fold orchestration, on a 1-conv toy model and a few 40x32 images."""

from __future__ import annotations

import copy
import logging
import math

import engine_toys as T
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_oof
from torch import nn

from neuroseg.config import TrainConfig
from neuroseg.evaluation import oof_cache
from neuroseg.pipeline import train_folds
from neuroseg.training import checkpoint, loop
from neuroseg.utils.hashing import file_sha256


@pytest.fixture()
def paths(tmp_path):
    return T.make_dataset(tmp_path, n_images=8)


def run(cfg, paths, fold=0, **kw):
    return train_folds.train_fold(cfg, paths, "upernet", fold, model_factory=T.ToySegmenter, **kw)


def test_fold_writes_checkpoints_history_and_oof(paths):
    # validation every 2nd epoch of 2: only after epoch 2, so best.pt must be epoch 2's EMA
    cfg = T.toy_config("upernet.train.ema=true", "upernet.train.ema_decay=0.9", "upernet.train.val_every=2")
    summary = run(cfg, paths)
    assert summary["skipped"] is False and summary["best_epoch"] == 2
    fold_dir = paths.fold_dir("upernet", 0)
    for name in ("last.pt", "best.pt", "history.csv", "history.png", "config.yaml", "done.json"):
        assert (fold_dir / name).is_file(), name
    assert (fold_dir / "history.png").read_bytes()[:4] == b"\x89PNG"

    hist = pd.read_csv(paths.history_csv("upernet", 0))
    assert list(hist["epoch"]) == [1, 2]
    for col in ("lr", "loss", "loss_seg", "loss_cls", "time_s"):
        assert hist[col].notna().all(), col
    assert hist["val_score"].isna().tolist() == [True, False]
    assert hist["val_cell_type_acc"].notna().tolist() == [False, True]
    assert summary["best_metric"] == pytest.approx(hist["val_score"].iloc[1])

    last = checkpoint.load(paths.last_checkpoint("upernet", 0))
    assert {"model", "ema", "optimizer", "scheduler", "scaler", "epoch", "best_metric", "rng",
            "config", "config_hash"} <= set(last)
    assert last["epoch"] == 2 and last["ema"]["updates"] == 4  # 2 epochs x 2 steps (4 train images)
    best = checkpoint.load(paths.best_checkpoint("upernet", 0))
    assert T.same_weights(best["model"], last["ema"]["module"])  # the EMA weights, not the raw ones
    assert not T.same_weights(best["model"], last["model"])

    # OOF: val images of fold 0, in the original 32x40 although the model ran at scale 0.5
    manifest = oof_cache.read_manifest(paths, "upernet", 0)
    assert manifest["image_ids"] == ["img00", "img02", "img04", "img06"]
    assert manifest["config_hash"] == summary["config_hash"]
    assert manifest["checkpoint_sha256"] == file_sha256(paths.best_checkpoint("upernet", 0))
    cached = load_oof(paths, "upernet", 0)
    probs = cached["img00"]["probs"]
    assert probs.dtype == np.float16 and probs.shape == (3, T.H, T.W)
    assert np.allclose(probs.astype(np.float32).sum(0), 1.0, atol=1e-2)
    assert cached["img00"]["cell_type_probs"].dtype == np.float32
    assert cached["img00"]["cell_type_probs"].shape == (3,)


def test_val_every_0_never_validates_and_predicts_with_the_last_weights(paths, monkeypatch):
    calls = []
    real = loop._val_metrics
    monkeypatch.setattr(loop, "_val_metrics", lambda *a: calls.append(1) or real(*a))
    cfg = T.toy_config("upernet.train.val_every=0")
    summary = run(cfg, paths)
    assert calls == [] and summary["best_epoch"] == 2 and math.isnan(summary["best_metric"])
    best = checkpoint.load(paths.best_checkpoint("upernet", 0))
    last = checkpoint.load(paths.last_checkpoint("upernet", 0))
    assert best["epoch"] == 2 and T.same_weights(best["model"], last["model"])
    assert pd.read_csv(paths.history_csv("upernet", 0))["epoch"].tolist() == [1, 2]
    assert oof_cache.read_manifest(paths, "upernet", 0)["checkpoint_sha256"] == file_sha256(
        paths.best_checkpoint("upernet", 0))
    # a deleted best.pt of the finished run comes back from the last weights, still unvalidated
    paths.best_checkpoint("upernet", 0).unlink()
    run(cfg, paths, force=False)
    assert calls == [] and T.same_weights(checkpoint.load(paths.best_checkpoint("upernet", 0))["model"],
                                          last["model"])


def test_a_negative_val_every_is_refused(paths):
    with pytest.raises(ValueError, match="val_every must be >= 0"):
        run(T.toy_config("upernet.train.val_every=-1"), paths)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    overrides = ("upernet.train.ema=true", "upernet.train.ema_decay=0.9")
    full = T.make_dataset(tmp_path / "a", n_images=8)
    cut = T.make_dataset(tmp_path / "b", n_images=8)
    run(T.toy_config(*overrides), full)

    def kill_after_first_epoch(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run(T.toy_config(*overrides), cut, on_epoch_end=kill_after_first_epoch)
    assert checkpoint.load(cut.last_checkpoint("upernet", 0))["epoch"] == 1
    assert not train_folds.run_files(cut, "upernet", 0).done.exists()

    epochs_run = []
    run(T.toy_config(*overrides), cut, on_epoch_end=lambda e, r: epochs_run.append(e))
    assert epochs_run == [2]  # continued, did not restart
    a = checkpoint.load(full.last_checkpoint("upernet", 0))
    b = checkpoint.load(cut.last_checkpoint("upernet", 0))
    assert T.same_weights(a["model"], b["model"])
    assert T.same_weights(a["ema"]["module"], b["ema"]["module"])
    assert len(pd.read_csv(cut.history_csv("upernet", 0))) == 2


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    def one_epoch(d, seed):
        p = T.make_dataset(tmp_path / d, n_images=8)
        run(T.toy_config("upernet.train.epochs=1", f"seed={seed}"), p)
        return T.weights(p.last_checkpoint("upernet", 0))

    first = one_epoch("a", 1)
    assert T.same_weights(first, one_epoch("b", 1))
    assert not T.same_weights(first, one_epoch("c", 2))


def test_cache_decoded_trains_the_same_weights_and_keeps_a_fold_done(tmp_path, caplog):
    """data.cache_decoded: the images are decoded once before the DataLoader's worker forks, and
    training gives the same weights bit for bit; a fold trained without it stays done with it."""
    def one_epoch(d, *over):
        p = T.make_dataset(tmp_path / d, n_images=8)
        run(T.toy_config("upernet.train.epochs=1", "upernet.train.num_workers=1", *over), p)
        return p, T.weights(p.last_checkpoint("upernet", 0))

    caplog.set_level(logging.INFO, logger="neuroseg")
    p, plain = one_epoch("a")
    assert "data.cache_decoded" not in caplog.text
    _, kept = one_epoch("b", "data.cache_decoded=true")
    assert "data.cache_decoded: 4 training images decoded" in caplog.text  # fold 0 of 8 images, 2 folds
    assert T.same_weights(plain, kept)
    again = run(T.toy_config("upernet.train.epochs=1", "upernet.train.num_workers=1", "data.cache_decoded=true"), p)
    assert again["skipped"] is True


def test_finished_fold_is_skipped_force_retrains_config_change_restarts(paths, caplog):
    cfg = T.toy_config("upernet.train.epochs=1")
    run(cfg, paths)
    epochs = []
    again = run(cfg, paths, on_epoch_end=lambda e, r: epochs.append(e))
    assert again["skipped"] is True and epochs == []

    run(cfg, paths, force=True, on_epoch_end=lambda e, r: epochs.append(e))
    assert epochs == [1]

    caplog.set_level(logging.INFO, logger="neuroseg")
    changed = T.toy_config("upernet.train.epochs=1", "upernet.train.lr=0.02")
    result = run(changed, paths, on_epoch_end=lambda e, r: epochs.append(e))
    assert epochs == [1, 1] and result["skipped"] is False
    assert "training afresh (config changed" in caplog.text
    assert oof_cache.read_manifest(paths, "upernet", 0)["config_hash"] == result["config_hash"]
    # only the fold's own config matters: training another subset of folds reuses this one
    subset = T.toy_config("upernet.train.epochs=1", "upernet.train.lr=0.02", "folds.train_folds=[0]")
    assert run(subset, paths)["skipped"] is True


def test_stale_or_partial_oof_is_rebuilt_without_retraining(paths):
    cfg = T.toy_config("upernet.train.epochs=1")
    run(cfg, paths)
    oof_dir = paths.oof_dir("upernet", 0)
    (oof_dir / "img02.npz").unlink()  # partial cache
    assert not oof_cache.is_fresh(paths, "upernet", 0, oof_cache.fold_config_hash(cfg, paths, "upernet"),
                            file_sha256(paths.best_checkpoint("upernet", 0)))
    epochs = []
    assert run(cfg, paths, on_epoch_end=lambda e, r: epochs.append(e))["skipped"] is True
    assert epochs == [] and (oof_dir / "img02.npz").is_file()


def test_missing_preprocess_outputs_name_the_step(paths):
    paths.folds_csv.unlink()
    with pytest.raises(FileNotFoundError, match="run 01_preprocess.py first"):
        run(T.toy_config(), paths)


def test_folds_csv_must_match_n_folds(paths):
    with pytest.raises(ValueError, match="n_folds=3"):
        run(T.toy_config("folds.n_folds=3"), paths)


def test_max_train_steps_caps_an_epoch(paths):
    run(T.toy_config("upernet.train.epochs=1", "upernet.train.batch_size=1",
                     "upernet.train.max_train_steps_per_epoch=3"), paths)
    assert checkpoint.load(paths.last_checkpoint("upernet", 0))["scheduler"]["last_epoch"] == 3


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    f = [loop.lr_factor(s, total_steps=10, warmup_steps=2, min_lr_ratio=0.1) for s in range(11)]
    assert f[:2] == [0.5, 1.0]
    assert f[2] == pytest.approx(1.0)
    assert f[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[1:], f[2:]))


def test_optimizer_choice_and_no_decay_on_1d_params():
    model = T.ToySegmenter()
    opt = loop.build_optimizer(model, TrainConfig(optimizer="sgd", weight_decay=0.1))
    assert isinstance(opt, torch.optim.SGD)
    decayed, plain = opt.param_groups
    assert all(p.ndim > 1 for p in decayed["params"]) and plain["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="adamw or sgd"):
        loop.build_optimizer(model, TrainConfig(optimizer="adam"))


def _toy_loss(model, x: torch.Tensor) -> torch.Tensor:
    seg, cls = model._logits(x)
    return seg.square().mean() + cls.square().mean()


def test_adamw_is_fused_and_steps_as_the_plain_one():
    torch.manual_seed(0)
    # eval mode: BatchNorm on running statistics. In training mode it cancels the conv bias, whose
    # gradient is then rounding noise (~1e-10) that Adam's normalisation blows up differently in
    # the fused and the plain kernel (0.004 apart after 2 steps on the 2026-12-06 box)
    model = T.ToySegmenter().eval()
    twin = copy.deepcopy(model)
    tc = TrainConfig(optimizer="adamw", lr=0.01, weight_decay=0.1)
    fused = loop.build_optimizer(model, tc)
    assert fused.defaults["fused"] is True
    decay = [p for p in twin.parameters() if p.ndim > 1]
    plain = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                               {"params": [p for p in twin.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
                              lr=0.01, foreach=False)
    x = torch.rand(2, 3, 16, 16)
    for _ in range(3):
        for m, opt in ((model, fused), (twin, plain)):
            opt.zero_grad()
            _toy_loss(m, x).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    torch.manual_seed(0)
    start = T.ToySegmenter()
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), start.parameters()))


def test_ema_ramps_up_and_copies_integer_buffers():
    model = nn.BatchNorm1d(2)
    ema = checkpoint.ModelEMA(model, decay=0.9, ramp=1.0)
    with torch.no_grad():
        model.weight.fill_(2.0)
    model.num_batches_tracked.fill_(7)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1))
    assert ema.module.weight[0].item() == pytest.approx(d * 1.0 + (1 - d) * 2.0)
    assert ema.module.num_batches_tracked.item() == 7
    assert not ema.module.weight.requires_grad


# ---- the real models, one capped step each, through the same loop ----

TINY_MODELS = {
    "yolox": ["yolox.size=nano", "yolox.input_size=64"],
    "maskrcnn": ["maskrcnn.backbone=resnet18", "maskrcnn.v2_head=false", "maskrcnn.rpn_post_nms_top_n_train=200",
                 "maskrcnn.rpn_post_nms_top_n_test=100", "maskrcnn.detections_per_image=10",
                 "maskrcnn.box_batch_size_per_image=64"],
    "upernet": ["upernet.encoder=resnet18", "upernet.decoder_channels=16"],
}


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    """conftest's three 128x160 synthetic images through the real 01 step, 3 folds."""
    from conftest import preprocessed_kaggle_set

    return preprocessed_kaggle_set(tmp_path_factory.mktemp("real"), np.random.default_rng(0))


@pytest.mark.parametrize("model", ["yolox", "maskrcnn", "upernet"])
def test_real_model_trains_a_capped_epoch_and_caches_oof(preprocessed, model):
    from neuroseg import config

    t = f"{model}.train"
    cfg = config.load(None, ["device=cpu", "folds.n_folds=3", "data.train_scale=0.5", *TINY_MODELS[model],
                             f"{t}.epochs=1", f"{t}.max_train_steps_per_epoch=1", f"{t}.batch_size=2",
                             f"{t}.num_workers=0"])
    summary = train_folds.train_fold(cfg, preprocessed, model, 0)
    assert np.isfinite(summary["best_metric"])
    hist = pd.read_csv(preprocessed.history_csv(model, 0))
    assert np.isfinite(hist["loss"]).all() and f"val_{summary['val_metric']}" in hist
    (image_id, pred), = load_oof(preprocessed, model, 0).items()
    assert {k: str(v.dtype) for k, v in pred.items()} == {k: d for k, (d, _) in oof_cache.SPEC[model].items()}
    if model == "upernet":  # original 128x160, although the model saw 64x80
        assert pred["probs"].shape == (3, 128, 160)
    else:
        assert pred["boxes"].shape[1:] == (4,) and len(pred["scores"]) == len(pred["labels"])
        assert (pred["boxes"][:, 2] <= 160 + 1e-3).all() and (pred["boxes"][:, 3] <= 128 + 1e-3).all()


# ---- fit's resume guards, on an in-memory set (no files but the run's own) ----

class ToySet(torch.utils.data.Dataset):
    """``n`` random 3x16x20 images whose semantic target is a threshold of the first channel."""

    def __init__(self, n: int, first: int = 0) -> None:
        g = torch.Generator().manual_seed(first)
        self.items = []
        for i in range(first, first + n):
            image = torch.rand(3, 16, 20, generator=g)
            sem = (image[0] > 0.5).long() + (image[0] > 0.8).long()
            self.items.append((image, {"semantic": sem, "cell_type": torch.tensor(i % 3),
                                       "image_id": f"img{i:02d}"}))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def toy_fit(tmp_path, model=None, config_hash="a", epochs=2, n_train=4, **kw):
    from neuroseg.data.datasets import collate

    tc = TrainConfig(epochs=epochs, batch_size=2, num_workers=0, lr=0.01, warmup_epochs=0.5)
    fit_run = loop.FitRun(last_path=tmp_path / "last.pt", best_path=tmp_path / "best.pt",
                          history_path=tmp_path / "history.csv", config_hash=config_hash, desc="toy")
    torch.manual_seed(0)
    model = model if model is not None else T.ToySegmenter()
    return loop.fit(model, ToySet(n_train), ToySet(2, first=50), tc, fit_run, collate_fn=collate, **kw)


def kill_after(epoch_to_kill):
    def hook(epoch, row):
        if epoch == epoch_to_kill:
            raise KeyboardInterrupt("simulated kill")
    return hook


def test_fit_refuses_a_last_pt_of_another_config(tmp_path):
    toy_fit(tmp_path, config_hash="a", epochs=1)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(RuntimeError, match=r"last\.pt belongs to config a, not b; remove it or train with --force"):
        toy_fit(tmp_path, config_hash="b", epochs=1)
    assert (tmp_path / "last.pt").read_bytes() == before  # left as it was


def test_fit_resuming_without_best_pt_writes_a_new_one_at_the_next_validation(tmp_path, caplog):
    with pytest.raises(KeyboardInterrupt):
        toy_fit(tmp_path, on_epoch_end=kill_after(1))
    assert checkpoint.load(tmp_path / "best.pt")["epoch"] == 1
    # a best metric no validation can beat (scores are <= 1): only the reset lets epoch 2 win
    last = checkpoint.load(tmp_path / "last.pt")
    assert last["best_epoch"] == 1
    checkpoint.save({**last, "best_metric": 2.0}, tmp_path / "last.pt")
    (tmp_path / "best.pt").unlink()
    epochs = []
    with caplog.at_level(logging.WARNING, logger="neuroseg"):
        summary = toy_fit(tmp_path, on_epoch_end=lambda e, r: epochs.append(e))
    assert epochs == [2]
    assert "best.pt is missing; the next validation will write a new one" in caplog.text
    assert summary["best_epoch"] == 2 and summary["best_metric"] < 1.0
    best = checkpoint.load(tmp_path / "best.pt")
    assert best["epoch"] == 2 and best["metric"] == summary["best_metric"]
    assert checkpoint.load(tmp_path / "last.pt")["best_epoch"] == 2


def test_a_finished_run_whose_best_pt_was_deleted_rewrites_it_from_the_last_weights(tmp_path, caplog):
    seen = {}
    first = toy_fit(tmp_path, on_epoch_end=lambda e, r: seen.setdefault(e, checkpoint.load(tmp_path / "last.pt")))
    last = checkpoint.load(tmp_path / "last.pt")
    # the optimizer state is kept while epochs are left to resume, dropped after the last one
    assert seen[1]["optimizer"]["state"] and last["epoch"] == 2 and last["optimizer"] is None
    assert last["scheduler"]["last_epoch"] == seen[1]["scheduler"]["last_epoch"] + 2  # 2 steps an epoch
    (tmp_path / "best.pt").unlink()
    epochs = []
    with caplog.at_level(logging.WARNING, logger="neuroseg"):
        summary = toy_fit(tmp_path, on_epoch_end=lambda e, r: epochs.append(e))
    assert epochs == []  # nothing retrained
    assert "no epoch is left: from the last epoch's weights" in caplog.text
    best = checkpoint.load(tmp_path / "best.pt")
    assert summary["best_epoch"] == best["epoch"] == 2 and best["metric"] == summary["best_metric"]
    weights = last["ema"]["module"] if last.get("ema") else last["model"]
    assert best["model"].keys() == weights.keys()
    assert all(torch.equal(best["model"][k], weights[k]) for k in weights)
    assert first["epochs"] == summary["epochs"] == 2


def test_fit_keeps_the_stored_best_when_best_pt_is_there(tmp_path):
    # the same tampered last.pt with best.pt left in place: epoch 2 cannot beat 2.0
    with pytest.raises(KeyboardInterrupt):
        toy_fit(tmp_path, on_epoch_end=kill_after(1))
    last = checkpoint.load(tmp_path / "last.pt")
    checkpoint.save({**last, "best_metric": 2.0}, tmp_path / "last.pt")
    best_bytes = (tmp_path / "best.pt").read_bytes()
    summary = toy_fit(tmp_path)
    assert summary["best_epoch"] == 1 and summary["best_metric"] == 2.0
    assert (tmp_path / "best.pt").read_bytes() == best_bytes


def test_fit_resumes_across_a_world_size_change_with_a_warning(tmp_path, caplog):
    with pytest.raises(KeyboardInterrupt):
        toy_fit(tmp_path, on_epoch_end=kill_after(1))
    last = checkpoint.load(tmp_path / "last.pt")
    assert last["world_size"] == 1
    checkpoint.save({**last, "world_size": 2}, tmp_path / "last.pt")  # as two processes wrote it
    epochs = []
    with caplog.at_level(logging.INFO, logger="neuroseg"):
        toy_fit(tmp_path, on_epoch_end=lambda e, r: epochs.append(e))
    assert epochs == [2]  # resumed, not refused, not restarted
    assert "toy: resuming with 1 processes, checkpoint had 2 (steps per epoch change)" in caplog.text
    assert "toy: resumed from" in caplog.text and "at epoch 2/2" in caplog.text
    assert checkpoint.load(tmp_path / "last.pt")["world_size"] == 1


def test_fit_takes_a_last_pt_without_world_size_as_one_process(tmp_path, caplog):
    with pytest.raises(KeyboardInterrupt):
        toy_fit(tmp_path, on_epoch_end=kill_after(1))
    last = checkpoint.load(tmp_path / "last.pt")
    del last["world_size"]  # written by an older version
    checkpoint.save(last, tmp_path / "last.pt")
    with caplog.at_level(logging.WARNING, logger="neuroseg"):
        toy_fit(tmp_path)
    assert "processes" not in caplog.text


class NaNOnCall(T.ToySegmenter):
    """Returns NaN losses on the ``bad``-th training forward; records the parameters each
    training forward saw."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad, self.calls, self.seen = bad, 0, []

    def forward(self, images, targets=None):
        if not self.training:
            return super().forward(images, targets)
        self.calls += 1
        self.seen.append({k: p.detach().clone() for k, p in self.named_parameters()})
        losses = super().forward(images, targets)
        if self.calls == self.bad:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses


def test_fit_skips_a_step_with_non_finite_gradients(tmp_path, caplog):
    model = NaNOnCall(bad=2)
    with caplog.at_level(logging.WARNING, logger="neuroseg"):
        summary = toy_fit(tmp_path, model=model, epochs=1, n_train=6)  # 3 steps
    assert model.calls == 3
    seen = model.seen
    assert not T.same_weights(seen[0], seen[1])  # step 1 updated the weights
    assert T.same_weights(seen[1], seen[2])  # step 2 (NaN) did not
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "toy epoch 1/1: 1 of 3 steps skipped (non-finite gradients)" in caplog.text
    (row,) = checkpoint.load(tmp_path / "last.pt")["history"]
    assert row["skipped_steps"] == 1.0 and row["steps"] == 3
    assert math.isnan(row["loss"])  # the NaN loss enters the epoch's mean
    assert pd.read_csv(tmp_path / "history.csv")["skipped_steps"].tolist() == [1.0]
    # the schedule still advanced on the skipped step; validation ran on finite weights
    assert checkpoint.load(tmp_path / "last.pt")["scheduler"]["last_epoch"] == 3
    assert summary["best_epoch"] == 1 and math.isfinite(summary["best_metric"])


def test_fit_records_zero_skipped_steps_when_all_are_finite(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="neuroseg"):
        toy_fit(tmp_path, epochs=1)
    assert pd.read_csv(tmp_path / "history.csv")["skipped_steps"].tolist() == [0.0]
    assert "skipped" not in caplog.text


def test_fused_adamw_under_a_grad_scaler_unscales_once_and_skips_inf_steps():
    """The loop's float16 path (CUDA) calls scaler.unscale_ before clipping, then scaler.step: a
    fused AdamW must then step on the unscaled gradients, and skip a step with an inf gradient."""
    torch.manual_seed(0)
    model = T.ToySegmenter().eval()  # every parameter with a real gradient: see the test above
    twin = copy.deepcopy(model)
    tc = TrainConfig(optimizer="adamw", lr=0.01, weight_decay=0.0)
    fused = loop.build_optimizer(model, tc)
    plain = torch.optim.AdamW(twin.parameters(), lr=0.01, weight_decay=0.0, foreach=False)
    x = torch.rand(2, 3, 16, 16)
    for poison in (False, True, False):
        for m, opt in ((model, fused), (twin, plain)):
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
            before = [p.detach().clone() for p in m.parameters()]
            opt.zero_grad()
            scaler.scale(_toy_loss(m, x)).backward()
            if poison:
                next(m.parameters()).grad[0].view(-1)[0] = float("inf")
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            assert all(torch.equal(a, b) for a, b in zip(before, m.parameters())) is poison
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


class _DtypeRecorder(T.ToySegmenter):
    """The toy segmenter, noting the dtype its convolution computes in."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.dtype] = []

    def _logits(self, images):
        seg, cls = super()._logits(images)
        if self.training:
            self.seen.append(seg.dtype)
        return seg, cls


@pytest.mark.parametrize("supported", [True, False])
def test_cpu_bf16_trains_in_bfloat16_where_the_cpu_has_it(paths, monkeypatch, caplog, supported):
    monkeypatch.setattr(loop, "cpu_bf16_supported", lambda: supported)
    models = []

    def factory():
        models.append(_DtypeRecorder())
        return models[-1]

    cfg = T.toy_config("upernet.train.cpu_bf16=true", "upernet.train.val_every=0")
    with caplog.at_level(logging.WARNING):
        train_folds.train_fold(cfg, paths, "upernet", 0, model_factory=factory)
    model = models[0]  # the trained one (the OOF pass builds another)
    assert model.seen == [torch.bfloat16 if supported else torch.float32] * 4  # 2 epochs x 2 steps
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    assert ("has no AMX" in caplog.text) is not supported
    state = checkpoint.load(paths.best_checkpoint("upernet", 0))["model"]
    assert all(v.dtype != torch.bfloat16 for v in state.values())
    # off by default, and never on CUDA (float16 AMP there)
    assert loop.autocast_dtype(TrainConfig(), torch.device("cpu")) is None
    assert loop.autocast_dtype(TrainConfig(cpu_bf16=True, amp=False), torch.device("cuda")) is None
    assert loop.autocast_dtype(TrainConfig(cpu_bf16=True), torch.device("cuda")) == torch.float16


@pytest.mark.parametrize("onednn_bf16, amx, expected", [(True, True, True), (True, False, False),
                                                        (False, True, False)])
def test_cpu_bf16_only_with_amx(monkeypatch, onednn_bf16, amx, expected):
    """AVX512-BF16 without AMX made training slower than fp32 (BENCHMARKS.md): bf16 needs both."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
    monkeypatch.setattr(torch._C._cpu, "_init_amx", lambda: amx, raising=False)
    assert loop.cpu_bf16_supported() is expected
