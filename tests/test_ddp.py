"""Data-parallel training: two CPU processes under torchrun (gloo), through the command line."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from trainer.data import write_shard

VOCAB = 64
ROOT = Path(__file__).resolve().parents[1]

# Runs `python -m trainer.train`'s main in each rank, recording the ids of the windows
# that rank's loader hands out (only rank 0 writes files, so the test needs its own record).
WORKER = textwrap.dedent("""
    import json, os, sys
    import trainer.train
    from trainer.data import EpochLoader

    seen = []
    next_windows = EpochLoader.next_windows
    def recording(self):
        ids = next_windows(self)
        seen.extend(ids.tolist())
        return ids
    EpochLoader.next_windows = recording
    trainer.train.main(sys.argv[1:])
    with open(os.path.join(os.environ["SEEN_DIR"], f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(seen, f)
""")


def test_two_ranks_train_on_different_windows(tmp_path):
    pattern = np.random.default_rng(0).integers(0, VOCAB, size=24)
    stream = np.tile(pattern, 300).astype(np.uint16)
    write_shard(tmp_path / "train_0.bin", stream[:3600])
    write_shard(tmp_path / "train_1.bin", stream[3600:])
    (tmp_path / "worker.py").write_text(WORKER)
    out = tmp_path / "run"
    steps, batch, block = 16, 4, 32
    settings = dict(n_layer=1, n_head=2, n_embd=32, block_size=block, batch_size=batch, max_steps=steps,
                    learning_rate=1e-2, min_lr=1e-3, warmup_steps=2, log_every=5, threads=1,
                    dtype="float32", checkpoint_every=8, grad_accum_steps=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "worker.py"), "--shards", str(tmp_path / "train_*.bin"),
           "--vocab-size", str(VOCAB), "--out", str(out)]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "SEEN_DIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    # one result line (rank 0 only); tokens counted over both ranks
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1
    result = results[0]
    assert result["steps"] == steps and result["tokens_seen"] == steps * 2 * batch * block * 2

    # each rank drew batch * accum windows per step, and never one the other rank drew
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == steps * 2 * batch
    n_windows = 3599 // block + 3599 // block
    first_epoch = [s[:n_windows // 2] for s in seen]
    assert not set(first_epoch[0]) & set(first_epoch[1])

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.5 * losses[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000008.pt", "step_0000016.pt"]
    ckpt = torch.load(out / "checkpoints" / "step_0000008.pt", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert ckpt["step"] == 8 and ckpt["loader"]["world_size"] == 2
    assert (out / "model.pt").exists() and (out / "loss.png").exists()
