"""Run a bundle's ``infer.ipynb`` here, as Kaggle would, before uploading anything.

Two stand-ins make the rehearsal honest:

* a **Kaggle-like root** (``kaggle_root``): ``input/`` holds the competition folder one level
  deeper than the datasets (as newer Kaggle images mount it) and the wheels and weights folders
  under their dataset slugs; ``working/`` is where the submission must appear. The notebook is
  pointed at it with ``NEUROSEG_KAGGLE_ROOT``.
* a **kernel without the bundle's packages** (``kernel_environment``): a throwaway venv that sees
  this environment's packages through symlinks *except* the withheld ones (the project, yolox,
  segmentation-models-pytorch, ...), standing in for the Kaggle image, which has torch & co. but
  not those. pip in that kernel must really install them from the bundled wheels with
  ``--no-index`` (its config files and ``PIP_*`` variables are cleared), into the throwaway venv:
  this environment is never written to.

Used by ``tests/test_kaggle_bundle.py`` and ``bench/bench_kaggle_notebook.py``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import sysconfig
import time
from importlib import metadata
from pathlib import Path
from typing import Iterable

from neuroseg.kaggle.wheels import canonical

log = logging.getLogger("neuroseg")

KERNEL_NAME = "neuroseg-kaggle-rehearsal"
KERNEL_NEEDS = ("ipykernel", "pip")  # the kernel must start before pip installs anything


def kaggle_root(root: Path, competition_dir: Path, bundle_dir: Path) -> Path:
    """``root/input/competitions/<competition>``, ``root/input/<wheels slug>``,
    ``root/input/<weights slug>`` (links, read-only in spirit) and an empty ``root/working``."""
    meta = json.loads((bundle_dir / "notebook" / "kernel-metadata.json").read_text())
    links = {Path("competitions") / meta["competition_sources"][0]: competition_dir}
    for dataset_id, folder in zip(meta["dataset_sources"], ("wheels", "weights")):
        links[Path(dataset_id.split("/")[1])] = bundle_dir / folder
    for place, target in links.items():
        (root / "input" / place).parent.mkdir(parents=True, exist_ok=True)
        (root / "input" / place).symlink_to(Path(target).resolve(), target_is_directory=True)
    (root / "working").mkdir(parents=True, exist_ok=True)
    return root


def top_level_entries(dist: metadata.Distribution) -> set[str]:
    """The site-packages entries a distribution installed (packages, modules, its .dist-info)."""
    return {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}


def dependency_closure(names: Iterable[str], dists: dict[str, metadata.Distribution]) -> set[str]:
    """Canonical names of ``names`` and everything they require, among the installed ``dists``."""
    from packaging.requirements import Requirement

    todo, seen = [canonical(n) for n in names], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in dists:
            continue
        seen.add(name)
        for text in dists[name].requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return seen


def bundled_names(wheels_dir: Path) -> set[str]:
    """Canonical project names of the wheels in a folder (``name-version-...whl``)."""
    return {canonical(p.name.split("-")[0]) for p in wheels_dir.glob("*.whl")}


def kernel_environment(dest: Path, withhold: Iterable[str]) -> Path:
    """A venv at ``dest`` seeing this environment's site-packages minus ``withhold`` (and minus
    every ``.pth``, so no editable install leaks in); returns its python. What the kernel itself
    needs to start (ipykernel, pip and their dependencies) is never withheld."""
    site = Path(sysconfig.get_paths()["purelib"])
    dists = {canonical(d.metadata["Name"]): d for d in metadata.distributions(path=[str(site)])}
    keep = dependency_closure(KERNEL_NEEDS, dists)
    withheld = {canonical(n) for n in withhold} - keep
    hidden = set().union(*(top_level_entries(dists[n]) for n in withheld if n in dists))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    image = dest / "image-site-packages"
    image.mkdir()
    for entry in sorted(site.iterdir()):
        if entry.name not in hidden and entry.suffix != ".pth":
            (image / entry.name).symlink_to(entry)
    kernel_site = dest / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (kernel_site / "kaggle-image.pth").write_text(f"{image}\n")
    log.info("rehearsal kernel %s: %d packages of %s withheld: %s", dest, len(withheld), site,
             sorted(withheld))
    return dest / "bin" / "python"


def kernel_env_vars(root: Path) -> dict[str, str]:
    """The kernel's environment: ours without pip's settings (only the bundled wheels may serve)
    or import paths, plus the Kaggle root."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(NEUROSEG_KAGGLE_ROOT=str(root), PIP_CONFIG_FILE=os.devnull, PYTHONNOUSERSITE="1",
               IPYTHONDIR=str(root / "kernels" / "ipython"),
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return env


def run_notebook(notebook: Path, kernel_python: Path, root: Path, timeout_s: int = 1800) -> tuple[Path, float]:
    """Execute ``notebook`` in a kernel of ``kernel_python`` against the Kaggle-like ``root``; the
    executed copy is written beside ``root/working``. Returns ``(executed notebook, seconds)``.
    A failing cell raises ``nbclient.exceptions.CellExecutionError`` with its traceback."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [str(kernel_python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Kaggle rehearsal", "language": "python"}))
    km = AsyncKernelManager(kernel_name=KERNEL_NAME, connection_file=str(spec_dir / "connection.json"),
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir.parent)]))
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, km=km, timeout=timeout_s, resources={"metadata": {"path": str(root)}})
    started = time.perf_counter()
    try:
        client.execute(env=kernel_env_vars(root))
    finally:
        executed = root / f"{notebook.stem}.executed.ipynb"
        nbformat.write(nb, executed)
    seconds = time.perf_counter() - started
    log.info("rehearsal: %s ran in %.1f s -> %s", notebook, seconds, executed)
    return executed, seconds
