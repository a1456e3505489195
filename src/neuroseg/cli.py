"""``python -m neuroseg COMMAND ...``: one entry point, each command implemented beside its logic.

A command ``foo-bar`` lives in its module as ``cli_foo_bar(argv) -> int``, which parses its own
arguments. Modules are imported only when their command runs, so ``score`` does not pay for torch.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("neuroseg.evaluation.metric", "score a prediction CSV against a truth CSV (competition metric)"),
    "validate": ("neuroseg.structures.submission_csv", "check a submission CSV with the scorer's rules"),
    "synth": ("neuroseg.data.synthetic", "write a synthetic dataset in the Kaggle layout"),
    "score-oof": ("neuroseg.pipeline.score_oof", "score one model's cached out-of-fold predictions"),
    "predict": ("neuroseg.inference.predict", "segment a folder of images with the trained ensemble"),
    "pretrain": ("neuroseg.pipeline.pretrain", "pretrain one model on a COCO data set (LIVECell)"),
    "pseudo-label": ("neuroseg.pipeline.make_pseudo_labels", "pseudo-label unlabelled images for the training splits"),
    "kaggle-bundle": ("neuroseg.kaggle.bundle", "wheels, weights and notebook folders for a Kaggle submission"),
}


def usage() -> str:
    lines = ["usage: python -m neuroseg COMMAND [ARGS...]", "", "commands:"]
    width = max(map(len, COMMANDS)) + 1
    lines += [f"  {name:<{width}} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "python -m neuroseg COMMAND --help shows a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    func = getattr(module, "cli_" + name.replace("-", "_"))
    return int(func(rest) or 0)
