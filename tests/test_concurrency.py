"""Concurrent runs, killed runs and failing stages never corrupt the artifact store.

The flows run in their own processes (as two `c2m run` would), against the session's
Prefect API, on one artifacts folder; `c2m verify`, `c2m gc` and `c2m ls` then check it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import PROJECT, cli, finish_flow, flow_argv, flow_env, start_flow, tiny_overrides
from flows.store import ArtifactStore

def built(log: str) -> list[str]:
    return re.findall(r"(\w+): building \1/(\w+)", log)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One Dask cluster for the module's runs (`dask.scheduler`): on 2 cores, a cluster per
    process would double the test's time, and which cluster ran a stage is not versioned."""
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                      local_directory=str(tmp_path_factory.mktemp("dask"))) as c:
        yield c


@pytest.fixture(scope="module")
def two_runs(prefect_harness, tiny_corpus, cluster, tmp_path_factory):
    """Two runs of the same flow and config on the same artifacts folder, at once."""
    root = tmp_path_factory.mktemp("concurrent")
    overrides = {**tiny_overrides(tiny_corpus, root / "artifacts"), "dask.scheduler": cluster.scheduler_address}
    procs = [start_flow(overrides, root / f"run{i}") for i in range(2)]
    results = [finish_flow(p, root / f"run{i}") for i, p in enumerate(procs)]
    return ArtifactStore(root / "artifacts"), overrides, results


def test_two_runs_at_once_build_each_version_once(two_runs):
    from flows.stages import ORDER  # here: Dask workers import this module, flows.stages brings torch

    store, _, [(first, log1), (second, log2)] = two_runs
    assert first == second and list(first) == ORDER
    # every stage version was built by exactly one of them; the other used it
    assert sorted(built(log1) + built(log2)) == sorted(first.items())
    waited = [line for line in (log1 + log2).splitlines() if re.search(r"\w+: waited [\d.]+ s for pid \d+", line)]
    assert waited, "neither run waited for the other"
    assert all(store.versions(s) == [v] for s, v in first.items())
    assert store.temporaries() == []
    checked = cli("verify", "--root", str(store.root))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith(f"verified {len(ORDER)} versions, ")


def test_verify_finds_a_corrupted_file_and_a_missing_rejected_partition(two_runs, tmp_path):
    store, _, [(versions, _), _] = two_runs
    copy = ArtifactStore(shutil.copytree(store.root, tmp_path / "artifacts"))
    kept = sorted((copy.path("normalize", versions["normalize"]) / "docs").glob("*.parquet"))[0]
    with open(kept, "r+b") as f:  # one byte, same size
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    rejected = sorted((copy.path("filter", versions["filter"]) / "rejected").glob("*.parquet"))[0]
    rejected.unlink()

    out = cli("verify", "--root", str(copy.root))
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    n, f = f"normalize/{versions['normalize']}", f"filter/{versions['filter']}"
    assert f"{n}: docs/{kept.name}: sha256 differs from the manifest" in lines
    assert f"{f}: rejected/{rejected.name}: missing (listed in the manifest)" in lines
    assert any(line.startswith(f"{f}: rejected/ holds ") for line in lines)
    assert any(re.match(rf"{f}: \d+ documents in, but \d+ kept \+ \d+ rejected", line) for line in lines)
    assert len(lines) == 4, lines
    assert out.stderr.startswith("error: 4 problems in ")
    # one stage: only its own problems
    assert cli("verify", "extract", "--root", str(copy.root)).returncode == 0
    assert cli("verify", "filter", versions["filter"][:6], "--root", str(copy.root)).returncode == 1


def read_only(store: Path, argv: list[str]) -> list[str] | None:
    """argv run with `store` read-only: chmod for a user, a read-only bind mount in a
    mount namespace of its own for root (whom chmod does not stop)."""
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(store)], check=True)
        return argv
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    return ["unshare", "--mount", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(store), *argv]


def test_a_read_only_store_gives_cache_hits(two_runs, tmp_path):
    from flows.stages import ORDER

    store, overrides, [(versions, _), _] = two_runs
    copy = ArtifactStore(shutil.copytree(store.root, tmp_path / "artifacts"))
    (copy.root / "evaluate" / "LATEST").write_text("older\n")  # the hit will want to move it
    argv = read_only(copy.root, flow_argv({**overrides, "run.artifacts": str(copy.root)}))
    if argv is None:
        pytest.skip("running as root and cannot make a read-only bind mount (unshare --mount failed)")
    try:
        out = subprocess.run(argv, cwd=PROJECT, env=flow_env(tmp_path / "home"), capture_output=True, text=True,
                             timeout=180)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(copy.root)], check=True)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert json.loads(log.split("RESULT ", 1)[1].splitlines()[0]) == versions
    assert not built(log) and log.count("cache hit") == len(ORDER)
    assert f"evaluate: could not point {copy.root}/evaluate/LATEST at {versions['evaluate']}" in log
    assert (copy.root / "evaluate" / "LATEST").read_text() == "older\n"


def test_a_run_killed_mid_train_is_taken_over_and_leaves_nothing_behind(two_runs, tmp_path):
    done, overrides, _ = two_runs
    store = ArtifactStore(shutil.copytree(done.root, tmp_path / "artifacts"))  # the data stages hit
    overrides = {**overrides, "run.artifacts": str(store.root),
                 "train.max_steps": 12, "train.checkpoint_every": 4, "train.eval_tokens": 2048,
                 "train.log_every": 2}
    victim = start_flow(overrides, tmp_path / "victim", slow_train=True)
    deadline = time.time() + 180
    while not list(store.root.glob("train/.tmp-work-*/checkpoints/step_*.pt")):
        assert victim.poll() is None, (tmp_path / "victim" / "log").read_text()[-3000:]
        assert time.time() < deadline, "training never wrote a checkpoint"
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()

    left = store.temporaries("train")
    assert {t.kind for t in left} == {"lease", "build", "work"} and not any(t.alive for t in left)
    listed = cli("ls", "train", "--root", str(store.root))
    assert listed.returncode == 0 and ".tmp-work-" in listed.stdout and "its process is gone" in listed.stdout

    versions, log = finish_flow(start_flow(overrides, tmp_path / "rerun"), tmp_path / "rerun")
    train = f"train/{versions['train']}"
    assert f"train: took over the lease on {train} from pid {victim.pid} on " in log
    assert re.search(rf"train: removing train/\.tmp-{versions['train']}-\w+ ", log)  # the victim's folder
    assert built(log) == [("train", versions["train"]), ("evaluate", versions["evaluate"])]
    stats = store.manifest("train", versions["train"])["stats"]
    assert re.search(r"step_\d+\.pt$", stats["resumed_from"]) and stats["steps"] == 12

    checked = cli("verify", "--root", str(store.root))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert store.temporaries() == []
    collected = cli("gc", "--root", str(store.root))
    assert collected.returncode == 0 and collected.stdout.strip() == "nothing to remove"
    assert "temporary" not in cli("ls", "--root", str(store.root)).stdout


# -- a failing parallel stage ---------------------------------------------------------

def slow_or_failing_partition(i: int, out_dir: Path) -> int:
    """Partition 0 fails at once; the others take a while and then write, as
    process_partition does (creating the folder if it is gone)."""
    if i == 0:
        raise ValueError("partition 0 is broken")
    time.sleep(1.0)
    (Path(out_dir) / "docs").mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "docs" / f"part-{i}").write_text("written")
    return i


def test_a_failing_partition_cancels_the_rest_before_the_folder_goes(cluster, tmp_path):
    from flows import parallel

    cfg = SimpleNamespace(scheduler=cluster.scheduler_address)
    out = tmp_path / ".tmp-extract"
    try:
        parallel.client(cfg)
        started = time.time()
        with pytest.raises(ValueError, match="partition 0 is broken"):
            parallel.map_partitions(cfg, slow_or_failing_partition, range(12), out_dir=out)
        waited = time.time() - started
        written = sorted(p.name for p in (out / "docs").iterdir()) if out.exists() else []
        shutil.rmtree(out, ignore_errors=True)  # what the stage's abort does
        time.sleep(2.5)  # longer than a partition: a straggler would have written by now
        assert not out.exists(), "a partition wrote into the folder after the stage failed"
    finally:
        parallel.shutdown()
    # the partition running when 0 failed finished; the ones not started never ran
    assert 1 <= len(written) <= 3, (written, waited)
