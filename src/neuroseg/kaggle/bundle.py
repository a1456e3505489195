"""``python -m neuroseg kaggle-bundle --user USER``: everything a Kaggle code-competition
submission needs, as three folders ready for the official ``kaggle`` CLI.

The competition runs a notebook with internet off, so code, weights and packages must already be
Kaggle datasets attached to it. Under ``--out`` (default ``<output dir>/kaggle``):

* ``wheels/``   every wheel inference needs that the Kaggle image lacks (``kaggle_wheels``), a
  ``neuroseg-bundle.json`` saying what the notebook installs, ``dataset-metadata.json``;
* ``weights/``  the fold checkpoints (``best.pt`` of every model and fold the config names), the
  tuned ``params.json`` and the resolved config, flat (no sub-folders, so no archive to unpack on
  upload), a manifest mapping each file to its place in an output dir, ``dataset-metadata.json``;
* ``notebook/`` ``infer.ipynb`` (``kaggle_notebook``) and ``kernel-metadata.json``.

Each folder is built beside its final place and renamed in only when all three are complete, so a
failed run (pip cannot resolve, a checkpoint is missing) leaves the previous bundle untouched.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from neuroseg import config as config_mod
from neuroseg.config import Config
from neuroseg.kaggle import wheels
from neuroseg.kaggle.notebook import MANIFEST_NAME, build_notebook
from neuroseg.kaggle.wheels import BundleError
from neuroseg.paths import Paths
from neuroseg.utils.atomic_io import atomic_write_json, atomic_write_text
from neuroseg.utils.hashing import file_sha256

log = logging.getLogger("neuroseg")

COMPETITION = "sartorius-cell-instance-segmentation"
NOTEBOOK_FILE = "infer.ipynb"
LICENSE = "CC0-1.0"
FOLDERS = ("wheels", "weights", "notebook")
# Kaggle user names and slugs appear in URLs: lowercase letters, digits, '-' (and '_' in names)
USER_RE = re.compile(r"[a-z0-9][a-z0-9_-]{1,38}")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{1,30}")


# ---- metadata (pure) ----

def check_user(user: str) -> str:
    if not USER_RE.fullmatch(user or ""):
        hint = f" (lowercase it: {user.lower()!r})" if user and USER_RE.fullmatch(user.lower()) else ""
        raise BundleError(f"--user {user!r} is not a Kaggle user name{hint}: expected the name in "
                          f"https://www.kaggle.com/USER, 2-39 lowercase letters, digits, '-' or '_'")
    return user


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise BundleError(f"--name {name!r}: the datasets are named NAME-wheels and NAME-weights, so NAME "
                          f"must be 2-31 lowercase letters, digits or '-'")
    return name


def kaggle_slug(title: str) -> str:
    """The slug Kaggle derives from a kernel title (lowercased, spaces -> '-'); ``kernels push``
    makes a new kernel under that slug when it differs from the id's."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def dataset_ids(user: str, name: str) -> dict[str, str]:
    return {"wheels": f"{user}/{name}-wheels", "weights": f"{user}/{name}-weights",
            "notebook": f"{user}/{name}-submission"}


def dataset_metadata(dataset_id: str, title: str) -> dict[str, Any]:
    """``dataset-metadata.json`` for ``kaggle datasets create -p FOLDER``."""
    return {"title": title, "id": dataset_id, "licenses": [{"name": LICENSE}]}


def kernel_metadata(user: str, name: str) -> dict[str, Any]:
    """``kernel-metadata.json`` for ``kaggle kernels push -p FOLDER``. Every flag is written out:
    the CLI turns internet *on* when ``enable_internet`` is absent, and a competition notebook
    with internet cannot be submitted."""
    ids = dataset_ids(user, name)
    title = f"{name} submission"
    if f"{user}/{kaggle_slug(title)}" != ids["notebook"]:
        raise BundleError(f"kernel title {title!r} does not give the slug of {ids['notebook']!r}")
    return {
        "id": ids["notebook"], "title": title, "code_file": NOTEBOOK_FILE, "language": "python",
        "kernel_type": "notebook", "is_private": "true", "enable_gpu": "true", "enable_tpu": "false",
        "enable_internet": "false", "dataset_sources": [ids["wheels"], ids["weights"]],
        "competition_sources": [COMPETITION], "kernel_sources": [], "model_sources": [],
    }


# ---- weights ----

def weight_files(cfg: Config, paths: Paths) -> dict[str, Path]:
    """``{place in an output dir: file here}`` of everything inference reads from the output dir:
    ``best.pt`` of every model and fold of the config (of its refit model instead where it has one:
    ``inference_runs``), and the tuned ``params.json``. Every missing file is listed with the
    script that makes it."""
    from neuroseg.inference.fold_models import inference_runs
    from neuroseg.inference.predict import load_params
    from neuroseg.paths import TRAIN_SCRIPTS

    files: dict[str, Path] = {}
    missing = []
    for model in cfg.ensemble.models:
        for fold in inference_runs(cfg, model):
            path = paths.best_checkpoint(model, fold)
            if path.is_file():
                files[path.relative_to(paths.output_dir).as_posix()] = path
            else:
                missing.append(f"  {path}  (model {model}, fold {fold}: train it with {TRAIN_SCRIPTS[model]})")
    if missing:
        raise BundleError(f"{len(missing)} fold checkpoint(s) missing for the bundle (config folds "
                          f"{list(cfg.fold_ids)}, models {list(cfg.ensemble.models)}):\n" + "\n".join(missing))
    load_params(paths)  # readable and complete, or an error saying to run 05_ensemble.py
    files[paths.ensemble_params.relative_to(paths.output_dir).as_posix()] = paths.ensemble_params
    return files


def flat_name(place: str) -> str:
    """``models/yolox/fold0/best.pt`` -> ``yolox-fold0.pt``; ``ensemble/params.json`` -> ``params.json``."""
    parts = place.split("/")
    if len(parts) == 4 and parts[0] == "models" and parts[3] == "best.pt":
        return f"{parts[1]}-{parts[2]}.pt"
    return parts[-1]


def link_or_copy(src: Path, dst: Path) -> str:
    """A hard link when ``src`` is on the same file system (checkpoints weigh hundreds of MB;
    training replaces ``best.pt`` with a new file rather than writing into it, so the bundle keeps
    the version it was built from), else a copy."""
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        shutil.copyfile(src, dst)
        return "copied"


def write_weights(dest: Path, cfg: Config, files: dict[str, Path], dataset_id: str, bundle_id: str,
                  title: str) -> None:
    from neuroseg.inference.fold_models import inference_runs

    layout = {place: flat_name(place) for place in files}
    if len(set(layout.values())) != len(layout):
        raise BundleError(f"two weight files would share a name: {layout}")
    for place, src in files.items():
        how = link_or_copy(src, dest / layout[place])
        log.info("kaggle-bundle: weights/%s <- %s (%s)", layout[place], src, how)
    config_mod.save(cfg, dest / "config.yaml")
    atomic_write_json(dest / MANIFEST_NAME, {
        "format": 1, "kind": "weights", "bundle_id": bundle_id, "config": "config.yaml",
        "config_name": cfg.name, "models": {m: list(inference_runs(cfg, m)) for m in cfg.ensemble.models},
        "layout": layout, "sha256": {name: file_sha256(dest / name) for name in layout.values()},
    })
    atomic_write_json(dest / "dataset-metadata.json", dataset_metadata(dataset_id, title))


# ---- wheels, notebook ----

def exclusions(extra: Sequence[str], include: Sequence[str]) -> list[str]:
    """The default exclude list plus ``--exclude`` names, less the ``--include`` ones."""
    bundled = {wheels.canonical(n) for n in include}
    return [p for p in (*wheels.DEFAULT_EXCLUDE, *extra) if wheels.canonical(p) not in bundled]


def write_wheels(dest: Path, args: argparse.Namespace, dataset_id: str, bundle_id: str, title: str) -> None:
    exclude = exclusions(args.exclude, args.include)
    requirements = wheels.read_pins(Path(args.requirements), exclude)
    found = wheels.collect_wheels(dest, requirements, exclude, args.python_version, args.platform,
                                  Path(args.project_dir), args.skip_installed_in)
    atomic_write_json(dest / MANIFEST_NAME, {
        "format": 1, "kind": "wheels", "bundle_id": bundle_id, "python_version": args.python_version,
        "platforms": list(args.platform), "requirements": list(found.requirements),
        "no_deps": list(found.no_deps), "no_deps_note": wheels.NO_DEPS_NOTE,
        "excluded": exclude, "omitted_as_installed": list(found.omitted),
        "wheels": {p.name: file_sha256(p) for p in sorted(dest.glob("*.whl"))},
    })
    atomic_write_json(dest / "dataset-metadata.json", dataset_metadata(dataset_id, title))


def write_notebook(dest: Path, user: str, name: str) -> None:
    import nbformat

    meta = kernel_metadata(user, name)
    ids = dataset_ids(user, name)
    nb = build_notebook(meta["title"], COMPETITION, ids["wheels"], ids["weights"])
    atomic_write_text(dest / NOTEBOOK_FILE, nbformat.writes(nb))
    atomic_write_json(dest / "kernel-metadata.json", meta)


# ---- the whole bundle ----

def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _swap_in(built: Path, final: Path) -> None:
    """Replace ``final`` by the complete folder ``built`` (a sibling), never leaving half of one."""
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        final.replace(trash / final.name)
        built.replace(final)
        shutil.rmtree(trash)
    else:
        built.replace(final)


def build_bundle(args: argparse.Namespace, cfg: Config, paths: Paths) -> dict[str, Path]:
    """Write the three folders under ``args.out``; returns ``{folder: path}``."""
    user, name = check_user(args.user), check_name(args.name)
    files = weight_files(cfg, paths)  # before the slow part: a missing checkpoint fails at once
    ids = dataset_ids(user, name)
    bundle_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".kaggle-bundle.", dir=out))
    try:
        built = {f: staging / f for f in FOLDERS}
        for folder in built.values():
            folder.mkdir()
        write_weights(built["weights"], cfg, files, ids["weights"], bundle_id, f"{name} weights")
        write_wheels(built["wheels"], args, ids["wheels"], bundle_id, f"{name} wheels")
        write_notebook(built["notebook"], user, name)
        final = {f: out / f for f in FOLDERS}
        for f in FOLDERS:
            _swap_in(built[f], final[f])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for f, path in final.items():
        log.info("kaggle-bundle: %s/ %.1f MB, %d files", path, folder_size(path) / 1e6,
                 sum(1 for p in path.iterdir()))
    return final


def next_steps(final: dict[str, Path], user: str, name: str) -> str:
    ids = dataset_ids(user, name)
    return "\n".join([
        "upload (first time; later: `kaggle datasets version -p DIR -m MSG --dir-mode zip`):",
        f"  kaggle datasets create -p {final['wheels']} --dir-mode zip",
        f"  kaggle datasets create -p {final['weights']} --dir-mode zip",
        f"  kaggle kernels push -p {final['notebook']}   # exits 0 even when a source is invalid: "
        f"check `kaggle kernels status {ids['notebook']}`",
        f"  kaggle competitions submit {COMPETITION} -k {ids['notebook']} -v 1 -f submission.csv -m neuroseg",
    ])


def default_project_dir() -> Path:
    """The checkout this package runs from (editable install), else the working directory."""
    import neuroseg

    candidate = Path(neuroseg.__file__).resolve().parents[2]
    return candidate if (candidate / "pyproject.toml").is_file() else Path.cwd()


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m neuroseg kaggle-bundle", description=__doc__.splitlines()[0])
    p.add_argument("--user", required=True, help="your Kaggle user name (the datasets and notebook are USER/...)")
    p.add_argument("--out", default=None, help="where wheels/, weights/, notebook/ go (default OUTPUT_DIR/kaggle)")
    p.add_argument("--name", default="neuroseg", help="NAME-wheels, NAME-weights, NAME-submission (default neuroseg)")
    p.add_argument("--config", default=None, help="the YAML config the models were trained with")
    p.add_argument("--output-dir", default=None, help="where the checkpoints and params.json are (default output)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--python-version", default=wheels.DEFAULT_PYTHON_VERSION,
                   help="the Kaggle image's Python (default 3.11; must be this Python: yolox is compiled here)")
    p.add_argument("--platform", action="append", default=None,
                   help=f"wheel platform tag, repeatable (default {wheels.DEFAULT_PLATFORM} and older)")
    p.add_argument("--exclude", action="append", default=[], metavar="NAME",
                   help="also leave out this package (the image has it); fnmatch patterns allowed")
    p.add_argument("--include", action="append", default=[], metavar="NAME",
                   help=f"bundle a package of the default exclude list {list(wheels.DEFAULT_EXCLUDE)}")
    p.add_argument("--project-dir", default=None, help="the neuroseg checkout to build the wheel from")
    p.add_argument("--requirements", default=None, help="pins to bundle (default PROJECT_DIR/requirements.txt)")
    p.add_argument("--skip-installed-in", default=None, metavar="PYTHON",
                   help="leave out wheels whose exact version PYTHON's environment has (tests: their kernel "
                        "stands in for the Kaggle image); never for a real upload")
    args = p.parse_args(argv)
    args.platform = args.platform or [wheels.DEFAULT_PLATFORM]
    args.project_dir = args.project_dir or str(default_project_dir())
    args.requirements = args.requirements or str(Path(args.project_dir) / "requirements.txt")
    return args


def cli_kaggle_bundle(argv: list[str] | None = None) -> int:
    from neuroseg.utils.logging import setup_logging

    args = parse(argv)
    setup_logging()
    try:
        cfg = config_mod.load(args.config, args.overrides)
        paths = Paths.resolve(None, args.output_dir)
        args.out = args.out or str(paths.output_dir / "kaggle")
        final = build_bundle(args, cfg, paths)
    except (BundleError, FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
        print(f"kaggle-bundle: {e}", file=sys.stderr)
        return 2
    print(next_steps(final, args.user, args.name))
    return 0
