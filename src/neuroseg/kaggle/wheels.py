"""The wheels of the Kaggle bundle: every package inference needs that the Kaggle image lacks.

A Kaggle notebook submitted to a code competition has no internet, so ``pip install`` there can
only read a dataset of wheels (``--no-index --find-links``). That folder must hold the whole
dependency closure of what we need, *for the Kaggle image's Python and platform* (not this
machine's site-packages), minus what the image already ships -- torch and its CUDA libraries
alone are gigabytes, and replacing them would break the image's GPU set-up.

How it is collected:

1. ``pip install --dry-run --target T --report`` resolves the runtime requirements (the pins of
   ``requirements.txt`` less the build- and test-only ones) for the target Python/platform and
   returns every distribution with its ``Requires-Dist``. ``--target`` makes pip ignore what is
   installed here, so the answer does not depend on this machine.
2. :func:`select_wheels` walks that graph from the requirements, evaluating markers for the
   target, and stops at the excluded names (``DEFAULT_EXCLUDE``): torch's own dependencies are
   then left out too, unless something we bundle needs them.
3. ``pip download --no-deps --only-binary=:all:`` fetches exactly those pins for the target.
4. Two wheels are built here: the project (``pip wheel --no-deps``; it declares no dependencies)
   and yolox, which PyPI has only as an sdist whose declared pins (onnx 1.8.1, ...) cannot
   install; the notebook installs both with ``--no-deps``. yolox compiles an op against this
   machine's Python, so the target Python must be this one (3.11 here and on Kaggle).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterable, Mapping, Sequence

log = logging.getLogger("neuroseg")

DEFAULT_PYTHON_VERSION = "3.11"
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"  # Kaggle's image has a newer glibc; 2.28 is what wheels ship

# Shipped by Kaggle's GPU image; bundling them would replace its CUDA build of torch (and weigh
# gigabytes). Names or fnmatch patterns, compared after PEP 503 normalisation.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "torch", "torchvision", "torchaudio", "triton", "nvidia-*", "cuda-*",
    "numpy", "pandas", "scipy", "scikit-image", "scikit-learn", "pillow", "matplotlib", "numba", "llvmlite",
    "opencv-python", "opencv-python-headless", "opencv-contrib-python",
)
# In requirements.txt for building and testing, never needed by the notebook
BUILD_ONLY: tuple[str, ...] = ("pytest", "ensemble-boxes", "nbformat", "nbclient", "ipykernel", "packaging")
NO_DEPS_NOTE = "installed with --no-deps: the project declares none, yolox's own pins cannot install"
TAIL_CHARS = 4000


class BundleError(RuntimeError):
    """The bundle cannot be built; the message says what to fix."""


def canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def is_excluded(name: str, exclude: Iterable[str]) -> bool:
    name = canonical(name)
    return any(fnmatch.fnmatchcase(name, canonical(pattern)) for pattern in exclude)


def expand_platforms(platform: str) -> list[str]:
    """``manylinux_2_28_x86_64`` -> itself and every older manylinux tag of that architecture.

    pip (23.x) takes ``--platform`` literally for the new ``manylinux_2_Y`` tags, so a wheel
    tagged only ``manylinux_2_17`` (most of PyPI) would not match ``manylinux_2_28``; a real
    glibc-2.28 system accepts all of them.
    """
    parts = platform.split("_", 3)
    if len(parts) != 4 or parts[0] != "manylinux" or not (parts[1] + parts[2]).isdigit():
        return [platform]
    major, minor, arch = int(parts[1]), int(parts[2]), parts[3]
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)] if major == 2 else [platform]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for glibc, name in legacy.items() if major == 2 and minor >= glibc]
    return tags


def target_flags(python_version: str, platforms: Sequence[str]) -> list[str]:
    """pip options that resolve and download for another interpreter and platform."""
    abi = "cp" + python_version.replace(".", "")
    flags = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
             "--abi", abi]
    for platform in platforms:
        for tag in expand_platforms(platform):
            flags += ["--platform", tag]
    return flags


def read_pins(requirements_txt: Path, exclude: Iterable[str] = ()) -> list[str]:
    """The ``name==version`` lines of ``requirements.txt``, less build/test-only and excluded ones."""
    from packaging.requirements import InvalidRequirement, Requirement

    if not requirements_txt.is_file():
        raise BundleError(f"{requirements_txt} not found: run from the neuroseg checkout or pass --requirements")
    pins = []
    for n, raw in enumerate(requirements_txt.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            raise BundleError(f"{requirements_txt}, line {n}: {e}") from None
        if canonical(req.name) in {canonical(b) for b in BUILD_ONLY} or is_excluded(req.name, exclude):
            continue
        pins.append(str(req))
    return pins


def target_environment(report: Mapping, python_version: str) -> dict[str, str]:
    """Marker environment of the target: pip's (this machine's OS) with the target Python."""
    env = dict(report.get("environment", {}))
    env.update(python_version=python_version, python_full_version=f"{python_version}.0",
               implementation_name="cpython", platform_python_implementation="CPython",
               sys_platform="linux", platform_system="Linux", os_name="posix", platform_machine="x86_64")
    return env


def select_wheels(report: Mapping, requirements: Sequence[str], exclude: Iterable[str],
                  python_version: str) -> list[tuple[str, str]]:
    """``(name, version)`` of every distribution reachable from ``requirements`` in pip's
    resolution ``report`` without passing through an excluded name; sorted by name."""
    from packaging.requirements import Requirement

    exclude = tuple(exclude)
    env = target_environment(report, python_version)
    resolved = {canonical(item["metadata"]["name"]): item["metadata"] for item in report["install"]}
    todo = [(canonical(r.name), frozenset(r.extras)) for r in map(Requirement, requirements)]
    extras_done: dict[str, frozenset[str]] = {}
    while todo:
        name, extras = todo.pop()
        if is_excluded(name, exclude) or (name in extras_done and extras <= extras_done[name]):
            continue
        if name not in resolved:
            raise BundleError(f"pip's resolution has no {name!r} (needed by the bundle); "
                              f"resolved: {sorted(resolved)}")
        extras_done[name] = extras_done.get(name, frozenset()) | extras
        for text in resolved[name].get("requires_dist") or []:
            dep = Requirement(text)
            active = dep.marker is None or any(dep.marker.evaluate({**env, "extra": e})
                                               for e in ("", *extras_done[name]))
            if active:
                todo.append((canonical(dep.name), frozenset(dep.extras)))
    return sorted((resolved[n]["name"], resolved[n]["version"]) for n in extras_done)


def compact(cmd: Sequence[str]) -> list[str]:
    """``cmd`` for the log: the run of ``--platform`` tags from :func:`expand_platforms` as the
    first one and a count."""
    out: list[str] = []
    extra = 0
    for i, arg in enumerate(cmd):
        if i > 0 and cmd[i - 1] == "--platform" and "--platform" in out[:-1]:
            out.pop()  # the "--platform" just appended
            extra += 1
            continue
        out.append(arg)
    if extra:
        at = out.index("--platform") + 2
        out.insert(at, f"(+{extra} older tags)")
    return out


def run_pip(args: Sequence[str], what: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    cmd = [python, "-m", "pip", *args]
    log.info("kaggle-bundle: %s: %s", what, " ".join(compact(cmd)))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BundleError(f"{what} failed (pip exit {done.returncode}):\n{done.stderr[-TAIL_CHARS:]}")
    return done


def resolve(requirements: Sequence[str], flags: Sequence[str], workdir: Path) -> dict:
    """pip's dry-run resolution of ``requirements`` for the target (installs nothing)."""
    report = workdir / "resolution.json"
    run_pip(["install", "--quiet", "--dry-run", "--ignore-installed", "--target", str(workdir / "target"),
             "--report", str(report), *flags, *requirements], "resolve the runtime requirements")
    return json.loads(report.read_text())


def installed_versions(python: str) -> dict[str, str]:
    """``{canonical name: version}`` of the distributions ``python`` can import."""
    code = ("import json, importlib.metadata as m; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise BundleError(f"cannot list the packages of {python}:\n{done.stderr[-TAIL_CHARS:]}")
    return {canonical(n): v for n, v in json.loads(done.stdout).items() if n}


def same_version(a: str | None, b: str) -> bool:
    """PEP 440 equality (a report may say ``0.1.1-2209072238`` for ``0.1.1.post2209072238``)."""
    from packaging.version import InvalidVersion, Version

    if a is None:
        return False
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def installed_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        raise BundleError(f"{name} is not installed here: `make venv` installs it, and the bundle "
                          f"builds its wheel from the same version") from None


def build_project_wheel(project_dir: Path, dest: Path) -> Path:
    """The project's wheel, built from a copy of the sources so the checkout gets no build/ or
    egg-info debris."""
    if not (project_dir / "pyproject.toml").is_file() or not (project_dir / "src" / "neuroseg").is_dir():
        raise BundleError(f"{project_dir} is not a neuroseg checkout (pyproject.toml, src/neuroseg); "
                          f"pass --project-dir")
    with tempfile.TemporaryDirectory(prefix="neuroseg-src-") as tmp:
        src = Path(tmp)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(project_dir / name, src / name)
        shutil.copytree(project_dir / "src", src / "src",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        run_pip(["wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dest), str(src)],
                "build the neuroseg wheel")
    return _one_wheel(dest, "neuroseg")


def build_yolox_wheel(dest: Path, python_version: str) -> Path:
    """yolox at the version installed here, built as a wheel (PyPI has only its sdist)."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python_version != here:
        raise BundleError(f"--python-version {python_version}: yolox's wheel is compiled here, for this "
                          f"Python {here}; run kaggle-bundle from a Python {python_version} venv")
    version = installed_version("yolox")
    run_pip(["wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dest),
             f"yolox=={version}"], "build the yolox wheel (compiles its op; ~1 min unless pip cached it)")
    return _one_wheel(dest, "yolox")


def _one_wheel(folder: Path, name: str) -> Path:
    found = sorted(folder.glob(f"{name}-*.whl"))
    if len(found) != 1:
        raise BundleError(f"expected one {name} wheel in {folder}, found {[p.name for p in found]}")
    return found[0]


@dataclass(frozen=True)
class WheelSet:
    """What the notebook installs: ``requirements`` resolved by pip against the image plus the
    bundled wheels, then ``no_deps`` as they are."""

    requirements: tuple[str, ...]
    no_deps: tuple[str, ...]
    downloaded: tuple[str, ...]  # name==version fetched for the target
    omitted: tuple[str, ...]  # name==version left out because --skip-installed-in has them


def collect_wheels(dest: Path, requirements: Sequence[str], exclude: Sequence[str], python_version: str,
                   platforms: Sequence[str], project_dir: Path, skip_installed_in: str | None = None
                   ) -> WheelSet:
    """Fill ``dest`` (an empty folder) with the wheels; see the module docstring."""
    # the two local builds first: a wrong --python-version or a broken checkout fails in seconds
    project = build_project_wheel(project_dir, dest)
    yolox = build_yolox_wheel(dest, python_version)
    flags = target_flags(python_version, platforms)
    with tempfile.TemporaryDirectory(prefix="neuroseg-resolve-") as tmp:
        report = resolve(requirements, flags, Path(tmp))
    selected = [f"{n}=={v}" for n, v in select_wheels(report, requirements, exclude, python_version)]
    omitted: list[str] = []
    if skip_installed_in:
        have = installed_versions(skip_installed_in)
        omitted = [p for p in selected if same_version(have.get(canonical(p.split("==")[0])), p.split("==")[1])]
        selected = [p for p in selected if p not in omitted]
    log.info("kaggle-bundle: %d wheels to download for Python %s %s (%d excluded patterns%s)", len(selected),
             python_version, platforms, len(exclude),
             f", {len(omitted)} already in {skip_installed_in}" if skip_installed_in else "")
    if selected:
        run_pip(["download", "--quiet", "--no-deps", "--dest", str(dest), *flags, *selected],
                f"download {len(selected)} wheels")
    no_deps = tuple(f"{w.name.split('-')[0]}=={w.name.split('-')[1]}" for w in (project, yolox))
    return WheelSet(tuple(requirements), no_deps, tuple(selected), tuple(omitted))
