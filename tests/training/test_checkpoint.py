"""``checkpoint.load_for_inference``: a ``best.pt`` as the training loop writes it (a tiny UPerNet),
the train-scale warning, eval mode, the weights, and files that are not inference checkpoints."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from neuroseg import config, models
from neuroseg.training import checkpoint

TRAIN_SCALE = 0.5
TINY_UPERNET = ["device=cpu", f"data.train_scale={TRAIN_SCALE}", "upernet.encoder=resnet18",
                "upernet.decoder_channels=16"]  # tests/pipeline/test_pretrain.py's TINY


@pytest.fixture(scope="module")
def best(tmp_path_factory):
    """-> (path of a best.pt, its saved state dict). Weights moved off the initialisation, BatchNorm
    statistics set, so a freshly built model differs from the checkpoint everywhere."""
    cfg = config.load(None, TINY_UPERNET)
    torch.manual_seed(0)
    model = models.build("upernet", cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.dtype.is_floating_point:
                value.add_(torch.rand(value.shape, generator=g) + 0.5)  # running_var stays > 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("fold0") / "best.pt"
    # what loop.fit writes: run.meta (train_folds: model_name, fold, config) + weights and metric
    checkpoint.save({"model_name": "upernet", "fold": 0, "config": cfg.to_dict(), "model": state,
                     "epoch": 1, "metric": 0.25, "config_hash": "abc"}, path)
    return path, state


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "neuroseg" and r.levelno >= logging.WARNING]


def test_same_train_scale_loads_silently_in_eval_mode_with_the_saved_weights(best, caplog):
    path, state = best
    with caplog.at_level(logging.WARNING, logger="neuroseg"):
        model = checkpoint.load_for_inference(path, "cpu", TRAIN_SCALE)
        unchecked = checkpoint.load_for_inference(path, "cpu")  # no scale given: nothing to compare
    assert warnings_of(caplog) == []
    for m in (model, unchecked):
        assert not m.training and not any(sub.training for sub in m.modules())
        loaded = m.state_dict()
        assert sorted(loaded) == sorted(state) and len(state) > 100
        assert all(torch.equal(loaded[k], state[k]) for k in state)
    torch.manual_seed(0)
    fresh = models.build("upernet", config.load(None, TINY_UPERNET)).state_dict()
    floats = [k for k, v in state.items() if v.dtype.is_floating_point]
    assert floats and not any(torch.equal(fresh[k], state[k]) for k in floats)  # really the file's weights


def test_another_train_scale_warns_naming_the_file_and_both_scales(best, caplog):
    path, state = best
    with caplog.at_level(logging.WARNING, logger="neuroseg"):
        model = checkpoint.load_for_inference(path, "cpu", 1.0)
    assert warnings_of(caplog) == [
        (f"{path} was trained at data.train_scale=0.5 but inference uses 1.0: cells will not have the size "
         "the model learnt")]
    assert not model.training and all(torch.equal(model.state_dict()[k], state[k]) for k in state)  # loads all the same


def test_a_file_that_is_not_an_inference_checkpoint_raises_naming_it(best, tmp_path):
    path, _ = best
    ckpt = checkpoint.load(path)
    del ckpt["config"]
    no_config = checkpoint.save(ckpt, tmp_path / "no_config.pt")
    with pytest.raises(RuntimeError, match=re.escape(f"{no_config} is not a neuroseg inference checkpoint (keys "
                                                     "['config_hash', 'epoch', 'fold', 'metric', 'model', "
                                                     "'model_name'])")):
        checkpoint.load_for_inference(no_config, "cpu", TRAIN_SCALE)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match=re.escape(f"cannot read checkpoint {garbage}: ")):
        checkpoint.load_for_inference(garbage)
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint not found: {tmp_path / 'missing.pt'}")):
        checkpoint.load_for_inference(tmp_path / "missing.pt")
