import dataclasses
from pathlib import Path

import pytest
import yaml

from neuroseg import config
from neuroseg.config import ConfigError
from neuroseg.paths import Paths


def test_defaults_then_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: t\nmaskrcnn:\n  backbone: resnet18\n  train: {epochs: 7}\n")
    cfg = config.load(p, ["maskrcnn.train.lr=0.01", "folds.n_folds=3"])
    assert cfg.name == "t"
    assert cfg.maskrcnn.backbone == "resnet18"
    assert cfg.maskrcnn.train.epochs == 7
    assert cfg.maskrcnn.train.lr == 0.01
    assert cfg.folds.n_folds == 3
    assert cfg.fold_ids == (0, 1, 2)
    # untouched values keep the section's own defaults (yolox trains with EMA by default)
    assert cfg.maskrcnn.train.batch_size == config.TrainConfig().batch_size
    assert cfg.yolox.train.ema is True


def test_partial_train_section_keeps_model_specific_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("yolox:\n  train: {epochs: 2}\n")
    cfg = config.load(p)
    assert cfg.yolox.train.epochs == 2
    assert cfg.yolox.train.ema is True  # YoloxConfig's own default, not TrainConfig's False


def test_unknown_key_lists_valid_names():
    with pytest.raises(ConfigError, match=r"maskrcnn: unknown key\(s\) \['backbon'\]; valid: \['backbone'"):
        config.load(None, ["maskrcnn.backbon=resnet18"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="maskrcnn.train.epochs: expected int, got 'many'"):
        config.load(None, ["maskrcnn.train.epochs=many"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config.load(None, ["maskrcnn.train.epochs"])
    with pytest.raises(ConfigError, match="config file not found"):
        config.load("nope.yaml")


def test_tuple_and_bool_coercion():
    cfg = config.load(None, ["maskrcnn.anchor_sizes=[4, 8]", "folds.train_folds=0,2", "yolox.train.ema=false"])
    assert cfg.maskrcnn.anchor_sizes == (4, 8)
    assert cfg.fold_ids == (0, 2)
    assert cfg.yolox.train.ema is False


def test_save_round_trip_and_hash(tmp_path):
    cfg = config.load(None, ["upernet.encoder=resnet18"])
    out = config.save(cfg, tmp_path / "saved.yaml")
    again = config.load(out)
    assert again == cfg
    assert yaml.safe_load(out.read_text())["upernet"]["encoder"] == "resnet18"
    other = dataclasses.replace(cfg, upernet=dataclasses.replace(cfg.upernet, encoder="resnet34"))
    assert cfg.section_hash("upernet") != other.section_hash("upernet")
    assert cfg.section_hash("maskrcnn") == other.section_hash("maskrcnn")


def test_speed_only_settings_leave_the_hashes_alone():
    """data.cache_decoded changes how fast samples come, not what they are: no cache, checkpoint
    or params.json made without it turns stale when it is switched on."""
    plain, kept = config.load(None), config.load(None, ["data.cache_decoded=true"])
    assert kept.data.cache_decoded is True and plain != kept
    assert kept.section_hash("ensemble", "data") == plain.section_hash("ensemble", "data")
    assert kept.section_hash() == plain.section_hash()
    assert "cache_decoded" not in kept.hashable_dict()["data"] and kept.to_dict()["data"]["cache_decoded"] is True
    assert config.load(None, ["data.train_scale=0.5"]).section_hash("data") != plain.section_hash("data")


@pytest.mark.parametrize("name", ["demo", "cpu", "kaggle", "reference"])
def test_shipped_configs_load(name):
    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.yolox.input_size % 32 == 0


def test_every_shipped_config_is_tested():
    shipped = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert shipped == ["cpu", "demo", "kaggle", "reference"]


def test_the_reference_config_is_one_mask_rcnn_on_one_fold():
    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / "reference.yaml")
    assert cfg.ensemble.models == ("maskrcnn",) and cfg.fold_ids == (0,)
    m = cfg.maskrcnn
    assert (m.backbone, m.fpn_channels, m.mask_head_channels, m.mask_head_convs) == ("resnet18", 256, 256, 4)
    assert (m.train.batch_size, m.train.lr, m.train.min_lr_ratio, m.detections_per_image) == (4, 5e-4, 0.0, 1000)


def test_paths_resolve_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NEUROSEG_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.delenv("NEUROSEG_OUTPUT_DIR", raising=False)
    paths = Paths.resolve()
    assert paths.train_csv == tmp_path / "d" / "train.csv"
    assert str(paths.output_dir) == "output"
    assert Paths.resolve("x", "y").oof_dir("maskrcnn", 2).as_posix() == "y/oof/maskrcnn/fold2"
    with pytest.raises(ValueError, match="unknown model 'detr'; valid"):
        paths.model_dir("detr")


def test_atomic_write_leaves_no_temp_and_normal_permissions(tmp_path):
    import os

    from neuroseg.utils.atomic_io import atomic_write_text

    umask = os.umask(0o022)
    try:
        out = atomic_write_text(tmp_path / "a" / "f.txt", "x")
    finally:
        os.umask(umask)
    assert out.read_text() == "x"
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in out.parent.iterdir()] == ["f.txt"]
