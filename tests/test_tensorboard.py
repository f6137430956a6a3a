"""TensorBoard: the train loop's event files (read back with TensorBoard's own reader), a
resumed run's steps once each, evaluate's samples, and `c2m tensorboard` serving runs side
by side."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import C2M, free_port
from flows.store import ArtifactStore
from trainer.board import FOLDER, write_evaluation
from trainer.data import write_shard
from trainer.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
# log at steps 0, 5, 10, 11; a checkpoint and val line every 4 steps: val at 3, 7, 11
CFG = TrainConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_steps=12,
                  learning_rate=1e-2, min_lr=1e-3, warmup_steps=2, log_every=5, checkpoint_every=4,
                  keep_last=5, eval_tokens=256, threads=1, seed=3, dtype="float32")
TRAIN_TAGS = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"]
VAL_TAGS = ["val/loss", "val/bits_per_byte"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    stream = np.tile(np.random.default_rng(0).integers(0, VOCAB, size=24), 200).astype(np.uint16)
    write_shard(d / "train_0.bin", stream[:4000])
    write_shard(d / "val_0.bin", stream[4000:])
    return {"train_shards": [d / "train_0.bin"],
            "kw": {"val_shards": [d / "val_0.bin"], "val_tokens_per_byte": 0.25, "log": lambda _: None}}


def read(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder))  # TensorBoard's reader: it applies purge_step as the UI does
    acc.Reload()
    return acc


def steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(shards["train_shards"], VOCAB, CFG, out, **shards["kw"])
    return out


def test_training_writes_the_curves(run):
    acc = read(run / FOLDER / "train")
    assert set(TRAIN_TAGS + VAL_TAGS) <= set(acc.Tags()["scalars"])
    records = metrics(run)
    for tag in TRAIN_TAGS:
        assert steps(acc, tag) == [0, 5, 10, 11]
    for tag in VAL_TAGS:
        assert steps(acc, tag) == [3, 7, 11]
    # the values are metrics.jsonl's (stored as float32)
    losses = [r["loss"] for r in records if "loss" in r]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    bpb = [r["val_bits_per_byte"] for r in records if "val_loss" in r]
    assert [e.value for e in acc.Scalars("val/bits_per_byte")] == pytest.approx(bpb, rel=1e-6)


def test_a_resumed_run_shows_each_step_once(shards, run, tmp_path):
    out = tmp_path / "killed"
    kw = shards["kw"]
    train(shards["train_shards"], VOCAB, CFG, out, stop_after=6, **kw)  # logged step 5, checkpoint at 4
    assert steps(read(out / FOLDER / "train"), "train/loss") == [0, 5]
    train(shards["train_shards"], VOCAB, CFG, out, resume=True, **kw)  # from step 4: step 5 again
    assert len(list((out / FOLDER / "train").glob("events.out.tfevents.*"))) == 2  # the killed run's stays
    acc = read(out / FOLDER / "train")
    for tag in TRAIN_TAGS:
        assert steps(acc, tag) == [0, 5, 10, 11]
    for tag in VAL_TAGS:
        assert steps(acc, tag) == [3, 7, 11]
    # resume is exact: the same curve as the run that was never stopped
    assert [e.value for e in acc.Scalars("train/loss")] == \
        [e.value for e in read(run / FOLDER / "train").Scalars("train/loss")]


def test_evaluate_writes_samples_and_the_heldout_curve(tmp_path):
    samples = [{"prompt": "", "text": "def f(x):\n    return x"}, {"prompt": "The", "text": "The end"}]
    write_evaluation(tmp_path, {"checkpoint_step": 12, "samples": samples,
                                "eval": {"curve": [{"step": 8, "loss": 2.0, "bits_per_byte": 1.5},
                                                   {"step": 12, "loss": 1.0, "bits_per_byte": 0.75}]}})
    acc = read(tmp_path / FOLDER / "evaluate")
    assert steps(acc, "heldout/loss") == [7, 11]  # where the train run logged those checkpoints' val
    assert [e.value for e in acc.Scalars("heldout/bits_per_byte")] == [1.5, 0.75]
    [text] = acc.Tensors("samples/text_summary")  # torch's add_text names it so
    assert text.step == 11
    markdown = text.tensor_proto.string_val[0].decode()
    assert "    def f(x):\n        return x" in markdown and "    The end" in markdown


# -- c2m tensorboard -----------------------------------------------------------------

def commit(store: ArtifactStore, stage: str, version: str, out_dir: Path | None, inputs: dict) -> None:
    """A version with out_dir's tensorboard/ folder (None: without one)."""
    with store.lease(stage, version, log=lambda _: None) as lease:
        build = store.begin(lease)
        (build.local / "model.pt").write_bytes(b"weights")  # local: out, or what commit uploads
        if out_dir is not None:
            shutil.copytree(out_dir / FOLDER, build.local / FOLDER)
        store.commit(build, {"inputs": inputs, "stats": {}})


@pytest.fixture(scope="module")
def store(run, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store") / "artifacts"
    store = ArtifactStore(root)
    evaluation = tmp_path_factory.mktemp("evaluation")
    write_evaluation(evaluation, {"checkpoint_step": 12, "samples": [{"prompt": "", "text": "hi"}]})
    commit(store, "train", "aaa111", run, {})
    commit(store, "train", "old000", None, {})  # trained before TensorBoard support
    commit(store, "train", "bbb222", run, {})
    commit(store, "evaluate", "eee444", evaluation, {"train": {"stage": "train", "version": "aaa111"}})
    return root


def c2m(store: Path, *args: str) -> subprocess.Popen:
    """`c2m tensorboard ARGS --root STORE`, its state (error logs) beside the store."""
    return subprocess.Popen([C2M, "tensorboard", *args, "--root", str(store)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "C2M_STATE": str(store.parent / "state")})


def poll(command: subprocess.Popen, url: str, done, seconds: float = 60):
    """url's JSON once done(it) holds (TensorBoard loads runs in the background), else the last."""
    got, deadline = None, time.monotonic() + seconds
    while time.monotonic() < deadline and command.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                got = json.load(r)
            if done(got):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    return got


def test_c2m_tensorboard_serves_runs_side_by_side(store):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = c2m(store, "aaa", "bbb", "--port", str(port))
    try:
        runs = poll(command, f"{base}/data/runs", lambda runs: len(runs) == 3)
        children = psutil.Process(command.pid).children(recursive=True)
        assert sorted(runs or []) == ["aaa111/evaluate", "aaa111/train", "bbb222/train"], \
            (runs, command.poll(), command.stderr.read() if command.poll() is not None else "")
        # [wall time, step, value] each
        points = poll(command, f"{base}/data/plugin/scalars/scalars?run=bbb222%2Ftrain&tag=train%2Floss",
                      lambda points: len(points) == 4)
        assert [step for _, step, _ in points] == [0, 5, 10, 11]
        with urllib.request.urlopen(f"{base}/", timeout=5) as r:
            assert b"TensorBoard" in r.read()
    finally:
        command.send_signal(signal.SIGTERM)
        out, err = command.communicate(timeout=30)
    assert command.returncode == 143, err  # SIGTERM: stopped as the other commands stop
    assert "TensorBoard at http://127.0.0.1:" in out
    assert children and not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


def test_a_version_without_event_files_is_named(store):
    command = c2m(store, "old", "--port", str(free_port()))
    out, err = command.communicate(timeout=60)
    assert command.returncode == 1
    assert err.splitlines()[0] == ("error: train/old000 has no TensorBoard event files: it was trained "
                                   "before c2m wrote them; train it again with this version of c2m to "
                                   "get its curves")


def test_a_port_in_use_is_named(store):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        command = c2m(store, "--port", str(port))
        out, err = command.communicate(timeout=60)
    assert command.returncode == 1
    assert err.splitlines()[0] == f"error: port {port} on 127.0.0.1 is in use (another TensorBoard?): pass --port"


def test_without_a_version_the_latest_and_the_running_trainings(store, run):
    from flows import board

    artifacts = ArtifactStore(store)
    with artifacts.lease("train", "live999", log=lambda _: None):  # a training running now
        work = artifacts.work_dir("train", "live999")
        shutil.copytree(run / FOLDER, work / FOLDER)
        found = board.runs(artifacts, [])
    assert found == {work / FOLDER: "live999", artifacts.path("train", "bbb222") / FOLDER: "bbb222"}
    assert board.runs(artifacts, []) == {artifacts.path("train", "bbb222") / FOLDER: "bbb222"}  # it ended


def test_an_s3_store_brings_only_the_event_files(s3_server, run, tmp_path):
    import boto3

    from flows import board

    boto3.client("s3").create_bucket(Bucket="c2m-tensorboard")
    artifacts = ArtifactStore("s3://c2m-tensorboard/artifacts")
    artifacts.cache = tmp_path / "cache"  # not the project's state folder
    commit(artifacts, "train", "aaa111", run, {})
    [(folder, name)] = board.runs(artifacts, ["aaa"]).items()
    assert name == "aaa111" and folder == tmp_path / "cache" / "train" / "aaa111" / FOLDER
    assert steps(read(folder / "train"), "train/loss") == [0, 5, 10, 11]
    assert not (folder.parent / "model.pt").exists()  # the checkpoints stay in the bucket
