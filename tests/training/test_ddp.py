"""Two processes (gloo, CPU) under torchrun train one epoch of the toy model: one set of files,
identical weights on both ranks, validation gathered over both shards."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import engine_toys as T
import pandas as pd
import torch

from neuroseg.evaluation import oof_cache
from neuroseg.training import checkpoint

WORKER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    import engine_toys as T
    from neuroseg.pipeline import train_folds
    from neuroseg.paths import Paths

    root = Path(sys.argv[1])
    paths = Paths(root / "data", root / "out")
    model = {{}}
    def factory():
        model["m"] = T.ToySegmenter()
        return model["m"]
    cfg = T.toy_config("upernet.train.epochs=1")
    train_folds.train_fold(cfg, paths, "upernet", 0, model_factory=factory)
    rank = os.environ["RANK"]
    # the test's own record of each rank's weights (the package writes from rank 0 only)
    torch.save(model["m"].state_dict(), root / f"rank{{rank}}.pt")
    train_folds.distributed.shutdown()
""")


def test_two_process_gloo_run_trains_one_epoch_and_writes_once(tmp_path):
    paths = T.make_dataset(tmp_path, n_images=8)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parents[1])))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    fold_dir = paths.fold_dir("upernet", 0)
    written = sorted(p.name for p in fold_dir.iterdir())
    assert written == ["best.pt", "config.yaml", "done.json", "history.csv", "history.png", "last.pt",
                       "manifest.json"]
    assert not list(fold_dir.glob(".*"))  # no temporary leftovers from a second writer
    last = checkpoint.load(paths.last_checkpoint("upernet", 0))
    assert last["epoch"] == 1 and last["world_size"] == 2
    # 4 train images, batch 2 per process, 2 processes: one step each
    assert last["scheduler"]["last_epoch"] == 1
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert T.same_weights(r0, last["model"])
    # parameters are all-reduced; BatchNorm running stats are rank-local after the last forward
    params = [k for k in r0 if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(r0[k], r1[k]) for k in params)
    assert not torch.equal(r0["bn.running_mean"], r1["bn.running_mean"])  # each rank saw its own shard
    # val images img00/02/04/06 are split over the ranks; the logged mean covers all four
    hist = pd.read_csv(paths.history_csv("upernet", 0))
    assert hist["val_image_number"].tolist() == [3.0]
    assert oof_cache.read_manifest(paths, "upernet", 0)["image_ids"] == ["img00", "img02", "img04", "img06"]
