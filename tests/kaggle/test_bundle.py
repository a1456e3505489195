"""``kaggle-bundle``: metadata, wheel selection, bad input, and the notebook run end to end here.

The end-to-end test builds a bundle from tiny untrained fold checkpoints (saved the way the
engine saves ``best.pt``), then executes ``infer.ipynb`` with nbclient against a Kaggle-like root
(``NEUROSEG_KAGGLE_ROOT``) whose ``input/`` holds a synthetic competition folder and the two
bundle folders. Its kernel is a throwaway venv that sees this venv's packages except the project,
yolox, segmentation-models-pytorch and yolox's small run-time needs
(``neuroseg.kaggle_rehearsal``), so pip must install those from the bundled wheels with
``--no-index``; the bundle is built with ``--skip-installed-in`` that kernel, which keeps the
download to those few wheels (the real bundle, ~22 MB, is measured in BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sysconfig
from pathlib import Path

import pytest

from neuroseg.kaggle import bundle as kaggle_bundle
from neuroseg.kaggle import notebook as kaggle_notebook
from neuroseg.kaggle import rehearsal as kaggle_rehearsal
from neuroseg.kaggle import wheels as kaggle_wheels
from neuroseg.kaggle.wheels import BundleError, canonical

ROOT = Path(__file__).resolve().parents[2]
USER = "test-user"
TINY = ["device=cpu", "folds.n_folds=2", "folds.train_folds=[0]", "data.train_scale=1.0",
        "yolox.size=nano", "yolox.input_size=64", "maskrcnn.backbone=resnet18", "maskrcnn.v2_head=false",
        "maskrcnn.rpn_post_nms_top_n_test=50",
        "maskrcnn.detections_per_image=5", "upernet.encoder=resnet18", "upernet.decoder_channels=16",
        "submission.tta_flips=true", "submission.batch_size=1"]
# what the kernel's "Kaggle image" lacks, so the bundle must bring it
WITHHELD = ("neuroseg", "yolox", "segmentation-models-pytorch", "loguru", "thop", "tabulate")


def set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


# ---- pure parts ----

def test_metadata_has_the_documented_fields():
    assert kaggle_bundle.dataset_metadata("u/neuroseg-wheels", "neuroseg wheels") == {
        "title": "neuroseg wheels", "id": "u/neuroseg-wheels", "licenses": [{"name": "CC0-1.0"}]}
    meta = kaggle_bundle.kernel_metadata("u", "neuroseg")
    assert meta["id"] == "u/neuroseg-submission"
    assert f"u/{kaggle_bundle.kaggle_slug(meta['title'])}" == meta["id"]
    assert (meta["kernel_type"], meta["enable_gpu"], meta["enable_internet"]) == ("notebook", "true", "false")
    assert meta["dataset_sources"] == ["u/neuroseg-wheels", "u/neuroseg-weights"]
    assert meta["competition_sources"] == ["sartorius-cell-instance-segmentation"]


@pytest.mark.parametrize("user", ["", "x", "Bad User", "a/b", "Upper"])
def test_bad_user_is_refused(user, capsys, tmp_path):
    code = kaggle_bundle.cli_kaggle_bundle(["--user", user, "--output-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--user {user!r} is not a Kaggle user name" in err
    if user == "Upper":
        assert "lowercase it: 'upper'" in err
    assert not (tmp_path / "kaggle").exists()


def test_missing_checkpoints_name_model_fold_and_script(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "models" / "yolox" / "fold0").mkdir(parents=True)
    (out / "models" / "yolox" / "fold0" / "best.pt").write_bytes(b"x")
    code = kaggle_bundle.cli_kaggle_bundle(["--user", USER, "--output-dir", str(out),
                                            "--set", "folds.n_folds=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "5 fold checkpoint(s) missing" in err
    assert "yolox/fold1/best.pt  (model yolox, fold 1: train it with 02_train_yolox.py)" in err
    assert "maskrcnn/fold0/best.pt  (model maskrcnn, fold 0: train it with 03_train_maskrcnn.py)" in err
    assert "upernet, fold 1: train it with 04_train_upernet.py" in err
    assert not (out / "kaggle").exists()


def test_select_wheels_follows_markers_and_extras_and_stops_at_excluded():
    def dist(name, version, *requires):
        return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}

    report = {"environment": {"python_version": "3.12"}, "install": [
        dist("Seg_Models", "1.0", "timm>=1", "torch", 'tomli; python_version < "3.11"', "hub[fast]"),
        dist("timm", "2.0", "torch", "PyYAML"),
        dist("hub", "3.0", 'xet; extra == "fast"', 'docs-tool; extra == "docs"', "filelock"),
        dist("torch", "9.0", "sympy", "filelock"),
        dist("xet", "1.0"), dist("PyYAML", "6.0"), dist("filelock", "4.0"), dist("sympy", "1.0"),
        dist("tomli", "2.0"), dist("docs-tool", "1.0"),
    ]}
    got = kaggle_wheels.select_wheels(report, ["seg-models==1.0"], ["torch"], python_version="3.10")
    # sympy only through torch (excluded); filelock through hub too; tomli by the *target* Python
    assert got == sorted([("PyYAML", "6.0"), ("Seg_Models", "1.0"), ("filelock", "4.0"), ("hub", "3.0"),
                          ("timm", "2.0"), ("tomli", "2.0"), ("xet", "1.0")])
    assert ("tomli", "2.0") not in kaggle_wheels.select_wheels(report, ["seg-models"], ["torch"], "3.11")
    with pytest.raises(BundleError, match="no 'absent'"):
        kaggle_wheels.select_wheels({"install": [dist("a", "1", "absent")]}, ["a"], [], "3.11")


def test_platforms_pins_and_exclusions(tmp_path):
    tags = kaggle_wheels.expand_platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags
    assert tags[-3:] == ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    assert kaggle_wheels.expand_platforms("linux_x86_64") == ["linux_x86_64"]
    assert kaggle_wheels.same_version("0.1.1.post2209072238", "0.1.1-2209072238")
    assert not kaggle_wheels.same_version(None, "1.0") and not kaggle_wheels.same_version("1.0", "1.0.1")
    assert kaggle_wheels.is_excluded("nvidia_cublas_cu12", kaggle_wheels.DEFAULT_EXCLUDE)
    assert kaggle_wheels.is_excluded("Pillow", kaggle_wheels.DEFAULT_EXCLUDE)
    exclude = kaggle_bundle.exclusions(["timm"], ["Pillow"])
    assert "timm" in exclude and "pillow" not in exclude and "torch" in exclude
    req = tmp_path / "requirements.txt"
    req.write_text("# c\nnumpy==2.0\nsegmentation_models_pytorch==0.6.0  # x\npytest==9\nnbclient==1\n\n")
    assert kaggle_wheels.read_pins(req, kaggle_wheels.DEFAULT_EXCLUDE) == ["segmentation_models_pytorch==0.6.0"]
    req.write_text("not a requirement ==\n")
    with pytest.raises(BundleError, match="line 1"):
        kaggle_wheels.read_pins(req)


def run_find_inputs() -> dict:
    """The notebook's settings + input-finding cells, executed here (``$NEUROSEG_KAGGLE_ROOT``)."""
    ns: dict = {}
    exec(kaggle_notebook.settings_cell("sartorius-cell-instance-segmentation", "u/ns-wheels",
                                       "u/ns-weights", []), ns)
    exec(kaggle_notebook.FIND_INPUTS, ns)
    return ns


@pytest.mark.parametrize("competition_at", ["sartorius-cell-instance-segmentation",
                                            "competitions/sartorius-cell-instance-segmentation"])
def test_notebook_finds_its_inputs_at_either_depth(tmp_path, monkeypatch, competition_at):
    monkeypatch.setenv(kaggle_notebook.KAGGLE_ROOT_ENV, str(tmp_path))
    inp = tmp_path / "input"
    (inp / competition_at / "test").mkdir(parents=True)
    for slug, kind in (("ns-wheels", "wheels"), ("datasets/u/ns-weights", "weights")):
        (inp / slug).mkdir(parents=True)
        (inp / slug / "neuroseg-bundle.json").write_text(json.dumps({"kind": kind, "bundle_id": "b1"}))
    ns = run_find_inputs()
    assert ns["COMPETITION_DIR"] == inp / competition_at
    assert ns["WHEELS_DIR"] == inp / "ns-wheels" and ns["WEIGHTS_DIR"] == inp / "datasets/u/ns-weights"
    (inp / competition_at / "test").rmdir()
    with pytest.raises(FileNotFoundError, match=r"competition data \(a folder with test/\): 0 candidate"):
        run_find_inputs()


# ---- end to end: bundle, notebook in a kernel without our packages, same CSV as 06 ----

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """An output dir with fold-0 ``best.pt`` of each model and default ensemble params."""
    from predict_stubs import save_untrained_fold_models

    from neuroseg import config
    from neuroseg.ensemble.params import EnsembleParams
    from neuroseg.paths import Paths
    from neuroseg.utils.atomic_io import atomic_write_json

    out = tmp_path_factory.mktemp("trained")
    paths = Paths(out, out)
    cfg = config.load(None, TINY)
    save_untrained_fold_models(cfg, paths)
    # untrained models score ~0.3 at best: low thresholds so that the CSV has instances to compare
    params = EnsembleParams()
    for p in params.ensemble.values():
        p.score_threshold, p.wbf_skip = 0.0, 0.0
    atomic_write_json(paths.ensemble_params, {"format": 1, "params": params.to_json(), "scores": {}})
    return out


def test_target_python_must_be_this_one(trained, tmp_path, capsys):
    code = kaggle_bundle.cli_kaggle_bundle(["--user", USER, "--out", str(tmp_path / "b"), "--output-dir",
                                            str(trained), *set_args(TINY), "--python-version", "3.9"])
    assert code == 2
    assert "--python-version 3.9: yolox's wheel is compiled here, for this Python 3.11" in capsys.readouterr().err
    assert os.listdir(tmp_path / "b") == []  # nothing half-built left behind


def site_listing() -> list[str]:
    return sorted(os.listdir(sysconfig.get_paths()["purelib"]))


@pytest.mark.slow
def test_bundle_notebook_runs_offline_and_matches_06(trained, tmp_path):
    from neuroseg.data.synthetic import write_dataset
    from neuroseg.structures.submission_csv import validate_submission

    venv_before = site_listing()
    competition = Path(write_dataset(tmp_path / "competition", n_images=1, seed=0, n_test=2,
                                     height=64, width=96)["out_dir"])
    kernel_python = kaggle_rehearsal.kernel_environment(tmp_path / "kernel-venv", WITHHELD)
    bundle = tmp_path / "bundle"
    code = kaggle_bundle.cli_kaggle_bundle([
        "--user", USER, "--out", str(bundle), "--output-dir", str(trained), *set_args(TINY),
        "--skip-installed-in", str(kernel_python)])
    assert code == 0

    # metadata, as documented
    for folder, slug in (("wheels", "neuroseg-wheels"), ("weights", "neuroseg-weights")):
        meta = json.loads((bundle / folder / "dataset-metadata.json").read_text())
        assert meta == {"title": slug.replace("-", " "), "id": f"{USER}/{slug}",
                        "licenses": [{"name": "CC0-1.0"}]}
    kernel = json.loads((bundle / "notebook" / "kernel-metadata.json").read_text())
    assert kernel["id"] == f"{USER}/neuroseg-submission" and kernel["code_file"] == "infer.ipynb"
    assert kernel["id"].split("/")[1] == kaggle_bundle.kaggle_slug(kernel["title"])
    assert (kernel["kernel_type"], kernel["enable_gpu"], kernel["enable_internet"]) == ("notebook", "true", "false")
    assert kernel["dataset_sources"] == [f"{USER}/neuroseg-wheels", f"{USER}/neuroseg-weights"]
    assert kernel["competition_sources"] == ["sartorius-cell-instance-segmentation"]

    # the wheels cover what the kernel lacks; the weights are the fold checkpoints, params, config
    wheels = json.loads((bundle / "wheels" / "neuroseg-bundle.json").read_text())
    assert {canonical(n) for n in WITHHELD} <= kaggle_rehearsal.bundled_names(bundle / "wheels")
    assert wheels["no_deps"] == ["neuroseg==0.1.0", "yolox==0.3.0"] and wheels["omitted_as_installed"]
    assert all(not kaggle_wheels.is_excluded(p.name.split("-")[0], kaggle_wheels.DEFAULT_EXCLUDE)
               for p in (bundle / "wheels").glob("*.whl"))
    weights = json.loads((bundle / "weights" / "neuroseg-bundle.json").read_text())
    assert weights["layout"] == {"models/yolox/fold0/best.pt": "yolox-fold0.pt",
                                 "models/maskrcnn/fold0/best.pt": "maskrcnn-fold0.pt",
                                 "models/upernet/fold0/best.pt": "upernet-fold0.pt",
                                 "ensemble/params.json": "params.json"}
    assert sorted(p.name for p in (bundle / "weights").iterdir()) == sorted(
        [*weights["layout"].values(), "config.yaml", "neuroseg-bundle.json", "dataset-metadata.json"])
    assert [p.name for p in bundle.iterdir() if p.name.startswith(".")] == []  # staging cleaned up

    # the notebook, offline, in the kernel that lacks our packages
    root = kaggle_rehearsal.kaggle_root(tmp_path / "kaggle", competition, bundle)
    executed, _ = kaggle_rehearsal.run_notebook(bundle / "notebook" / "infer.ipynb", kernel_python, root)
    text = executed.read_text()
    assert "Successfully installed" in text and "segmentation-models-pytorch-0.6.0" in text
    assert f"neuroseg imported from {tmp_path / 'kernel-venv' / 'lib'}" in text
    submission = root / "working" / "submission.csv"
    assert validate_submission(submission, competition / "test") == []

    # 06_make_submission.py on the same models and data writes the same bytes
    spec = importlib.util.spec_from_file_location("make_submission", ROOT / "06_make_submission.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--data-dir", str(competition), "--output-dir", str(trained), *set_args(TINY)]) == 0
    reference = (trained / "submission.csv").read_text()
    assert len(reference.splitlines()) > 3  # instances, not only one empty row per image
    assert submission.read_text() == reference

    # this venv was read, never written
    assert site_listing() == venv_before
