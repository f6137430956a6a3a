"""Data-parallel training: two CPU processes under torchrun (gloo), from the command line
and from the train stage (train.processes = 2), killed, resumed and failing."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import start_flow, tiny_overrides
from flows.store import ArtifactStore
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


# -- the train stage with train.processes = 2: torchrun started by the flow ----------

# Loaded by every Python process that has its folder on PYTHONPATH; acts only in the rank
# that C2M_TEST_RANK names (torchrun sets RANK): "slow:1" sleeps at every batch, so a test
# can kill the run mid-train; "fail:1" raises at the third batch.
SITECUSTOMIZE = textwrap.dedent("""
    import os
    mode, _, rank = os.environ.get("C2M_TEST_RANK", "").partition(":")
    if mode and os.environ.get("RANK") == rank:
        import time
        from trainer.data import EpochLoader

        real, batches = EpochLoader.next_batch, []
        def next_batch(self):
            batches.append(1)
            if mode == "slow":
                time.sleep(0.3)
            elif len(batches) == 3:
                raise RuntimeError(f"injected failure in rank {rank}")
            return real(self)
        EpochLoader.next_batch = next_batch
""")

# A flow run in a process of its own (as `c2m run` would be), in its own process group.
def training_processes(root: Path) -> list[int]:
    """Processes (torchrun and its ranks) training into a folder under `root`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"trainer.train" in argv and any(str(root).encode() in arg for arg in argv):
            found.append(int(proc.name))
    return found


def wait_until_gone(root: Path, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while training_processes(root):
        assert time.time() < deadline, f"training processes left behind: {training_processes(root)}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def hooks(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("rank-hooks")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])


@pytest.fixture(scope="module")
def two_processes(prefect_harness, tiny_corpus, tmp_path_factory, hooks):
    """A flow run killed mid-train (its ranks slowed), then run again to the end: the store,
    the overrides, the versions of the resumed run, its progress reports, the victim's log."""
    from flows.flow import corpus_to_model
    from flows.progress import LISTENERS

    tmp = tmp_path_factory.mktemp("ddp-flow")
    artifacts = tmp / "artifacts"
    overrides = {**tiny_overrides(tiny_corpus, artifacts), "train.processes": 2, "train.max_steps": 12,
                 "train.checkpoint_every": 4, "train.dropout": 0.1, "train.eval_tokens": 2048}
    victim = start_flow(overrides, tmp / "victim", PYTHONPATH=hooks, C2M_TEST_RANK="slow:1")
    deadline = time.time() + 240
    while not list(artifacts.glob("train/.tmp-work-*/checkpoints/step_*.pt")):
        assert victim.poll() is None, (tmp / "victim" / "log").read_text()[-3000:]
        assert time.time() < deadline, "training never wrote a checkpoint"
        time.sleep(0.1)
    assert training_processes(artifacts)  # torchrun and its ranks
    os.killpg(victim.pid, signal.SIGKILL)  # the flow's group: torchrun has a session of its own
    victim.wait()
    wait_until_gone(artifacts)  # they die with the flow process: nothing writes on behind the rerun
    (work,) = artifacts.glob("train/.tmp-work-*")
    killed_at = sorted(p.name for p in (work / "checkpoints").iterdir())[-1]

    reports = []
    LISTENERS.append(lambda stage, pct, text: reports.append((stage, pct, text)))
    try:
        versions = corpus_to_model(config="configs/demo.toml", overrides=overrides)
    finally:
        LISTENERS.clear()
    return SimpleNamespace(store=ArtifactStore(artifacts), overrides=overrides, versions=versions,
                           killed_at=killed_at, reports=reports, victim_log=(tmp / "victim" / "log").read_text())


def test_the_flow_trains_in_two_processes_and_evaluates_the_model(two_processes):
    run = two_processes
    log = run.victim_log
    assert "starting 2 training processes with torchrun" in log
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"cpu, float32, 2 process(es), {threads} threads" in log  # rank 0's lines reach the run's log
    assert re.search(r"step +0 \| loss", log)

    manifest = run.store.manifest("train", run.versions["train"])
    stats = manifest["stats"]
    assert manifest["config"]["train"]["processes"] == 2  # in the version: it changes the weights
    assert stats["steps"] == 12 and stats["tokens_seen"] == 12 * 2 * 4 * 32  # both ranks' windows
    folder = run.store.path("train", run.versions["train"])
    assert {p.name for p in folder.iterdir()} >= {"model.pt", "best.pt", "metrics.jsonl", "loss.png",
                                                  "checkpoints", "manifest.json", "report.md"}
    assert not list(run.store.root.glob("train/.tmp-*")), "work or build folders left behind"
    evaluated = run.store.manifest("evaluate", run.versions["evaluate"])["stats"]
    assert evaluated["checkpoint_step"] == 12 and math.isfinite(evaluated["loss"])
    assert [r["step"] for r in evaluated["curve"]] == [4, 8, 12]

    # progress came back from rank 0: throttled reports, then the final one at 100%
    train_reports = [(pct, text) for stage, pct, text in run.reports if stage == "train"]
    assert train_reports[-1][0] == 100 and "loss" in train_reports[-1][1]
    assert len(train_reports) >= 2


def test_one_process_gives_an_artifact_of_the_same_shape(two_processes):
    from flows.flow import corpus_to_model

    run = two_processes
    one = corpus_to_model(config="configs/demo.toml", overrides={**run.overrides, "train.processes": 1},
                          stages=["train"])
    assert one["train"] != run.versions["train"]
    two_dir, one_dir = (run.store.path("train", v) for v in (run.versions["train"], one["train"]))
    def shape(folder):  # event files are named by time, host and pid (a resumed run has two)
        return sorted({p.parent.relative_to(folder).as_posix() + "/<events>" if p.name.startswith("events.out")
                       else p.relative_to(folder).as_posix() for p in folder.rglob("*")})
    assert shape(two_dir) == shape(one_dir)
    two_stats, one_stats = (run.store.manifest("train", v)["stats"] for v in (run.versions["train"], one["train"]))
    assert two_stats.keys() == one_stats.keys()
    assert two_stats["tokens_seen"] == 2 * one_stats["tokens_seen"]  # the global batch doubles
    headings = [[line for line in (d / "report.md").read_text().splitlines() if line.startswith("#")][1:]
                for d in (two_dir, one_dir)]
    assert headings[0] == headings[1]


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_weights(two_processes):
    from flows.flow import corpus_to_model

    run = two_processes
    stats = run.store.manifest("train", run.versions["train"])["stats"]
    assert stats["resumed_from"].endswith(run.killed_at) and stats["steps"] == 12
    resumed = torch.load(run.store.path("train", run.versions["train"]) / "model.pt", weights_only=True)
    # the same version in one go (dropout on: every rank's RNG must be restored too)
    again = corpus_to_model(config="configs/demo.toml", overrides=run.overrides, stages=["train"], force=True)
    assert again["train"] == run.versions["train"]
    assert run.store.manifest("train", again["train"])["stats"]["resumed_from"] is None
    fresh = torch.load(run.store.path("train", again["train"]) / "model.pt", weights_only=True)
    assert all(torch.equal(fresh["model"][k], resumed["model"][k]) for k in fresh["model"])
    assert len(fresh["rng"]) == 2  # one RNG state per rank


def test_a_failing_rank_fails_the_stage_with_its_rank_and_last_lines(two_processes, hooks, monkeypatch):
    from flows.flow import corpus_to_model

    run = two_processes
    monkeypatch.setenv("PYTHONPATH", hooks)
    monkeypatch.setenv("C2M_TEST_RANK", "fail:1")
    with pytest.raises(Exception) as failed:
        corpus_to_model(config="configs/demo.toml", overrides=run.overrides, stages=["train"], force=True)
    message = str(failed.value)
    assert message.startswith("training failed in rank 1 of 2: RuntimeError: injected failure in rank 1")
    assert "its last lines:" in message and "raise RuntimeError" in message  # rank 1's traceback
    wait_until_gone(run.store.root, timeout=10)
