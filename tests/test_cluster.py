"""The data stages on a Dask cluster of separate processes (`dask.scheduler`).

A `dask scheduler` and two `dask worker` processes, each worker with its own working
directory and scratch space, as on a real cluster; the flow runs in a process of its own
(as `c2m run` would), against the session's Prefect API.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import C2M, cli, finish_flow, free_port, start_flow, tiny_overrides
from flows.stages import DOCUMENT_STAGES, ORDER
from flows.store import ArtifactStore

DASK = str(Path(sys.executable).with_name("dask"))  # the CLI of this venv
DATA_STAGES = ORDER[:ORDER.index("shard") + 1]
DOC_STAGES = DOCUMENT_STAGES  # one task per partition each

PARTITION_TASKS = ("process_partition-", "_dedup_partition-")  # the keys of their Dask tasks

def left_running(pgids: set[int], pids: set[int]) -> list[int]:
    """Live (not zombie) processes among `pids` or in any of the process groups `pgids`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        pid = int(stat.parent.name)
        if fields[0] != "Z" and (int(fields[2]) in pgids or pid in pids):
            members.append(pid)
    return members


def worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid)


def spawn(argv: list[str], cwd: Path) -> subprocess.Popen:
    """A cluster process in its own process group (a worker's nanny and its worker
    process share it), its output in cwd/log; environment inherited (AWS_* included)."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(argv, cwd=cwd, stdout=open(cwd / "log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture(scope="module")
def dask_cluster(s3_server, tmp_path_factory):
    """`dask scheduler` and two `dask worker`s (1 thread each, nanny on) on 127.0.0.1.
    Yields (address, client); afterwards no process of theirs is left. After s3_server:
    the workers inherit its AWS_* variables, as a real cluster's would be configured."""
    from dask.distributed import Client

    root = tmp_path_factory.mktemp("cluster")
    address = f"tcp://127.0.0.1:{free_port()}"
    procs = [spawn([DASK, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                    "--no-dashboard"], root / "scheduler")]
    for name in ("w1", "w2"):
        procs.append(spawn([DASK, "worker", address, "--name", name, "--host", "127.0.0.1",
                            "--nthreads", "1", "--memory-limit", "2GiB", "--no-dashboard",
                            "--local-directory", str(root / name / "scratch")], root / name / "cwd"))
    client, workers = None, set()
    try:
        client = Client(address, timeout="30s")
        client.wait_for_workers(2, timeout=60)
        client.get_task_stream()  # registers the scheduler's task stream: it records from now on
        yield address, client
    except Exception:
        logs = "".join(f"\n--- {log}:\n{log.read_text()[-1500:]}" for log in sorted(root.rglob("log")))
        raise AssertionError(f"the Dask cluster at {address} did not come up:{logs}") from None
    finally:
        if client is not None:
            workers = set(worker_pids(client).values())  # the nannies' worker processes now
            client.close()
        for p in procs[::-1]:  # workers first, then the scheduler
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        deadline = time.monotonic() + 20
        while left_running({p.pid for p in procs}, workers) and time.monotonic() < deadline:
            time.sleep(0.2)  # a nanny's worker process may outlive it briefly
        left = left_running({p.pid for p in procs}, workers)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"Dask processes left after teardown: {left}"


@pytest.fixture
def store_root(s3_artifacts) -> str:
    """The S3 store (moto's server): the workers reach the artifacts only through it."""
    return s3_artifacts


def overrides(tiny_corpus: Path, root: str, scratch: Path, **more) -> dict:
    return {**tiny_overrides(tiny_corpus, scratch / "unused"), "run.artifacts": root,
            "dask.local_directory": str(scratch / "dask"), **more}


def data_files(store: ArtifactStore, stage: str, version: str) -> dict[str, str]:
    """{file: sha256} of a version's data, from its manifest (its report holds timings)."""
    files = store.manifest(stage, version)["files"]
    return {name: meta["sha256"] for name, meta in files.items()
            if name != "report.md" and not name.endswith(".png")}


def test_the_data_stages_give_the_same_artifacts_on_a_cluster_as_locally(
        prefect_harness, dask_cluster, tiny_corpus, store_root, tmp_path):
    address, client = dask_cluster
    started = time.time()
    # both at once: on 2 cores most of a run is starting processes and importing
    on_cluster = start_flow(overrides(tiny_corpus, f"{store_root}/cluster", tmp_path,
                                      **{"dask.scheduler": address}), tmp_path / "cluster", DATA_STAGES)
    # the reference: a local folder and a LocalCluster, the defaults
    local_root = str(tmp_path / "local-store")
    on_local_cluster = start_flow(overrides(tiny_corpus, local_root, tmp_path), tmp_path / "local",
                                  DATA_STAGES)
    versions, _ = finish_flow(on_cluster, tmp_path / "cluster")
    local, _ = finish_flow(on_local_cluster, tmp_path / "local")
    ran = [(t["key"], t["worker"]) for t in client.get_task_stream(start=started)]

    assert versions == local and list(versions) == DATA_STAGES
    cluster_store, local_store = ArtifactStore(f"{store_root}/cluster"), ArtifactStore(local_root)
    for stage, version in versions.items():
        files = data_files(cluster_store, stage, version)
        assert files and files == data_files(local_store, stage, version), stage
    # every document partition was processed by the separate workers, none elsewhere
    partitions = sum(1 for stage in DOC_STAGES for name in data_files(cluster_store, stage, versions[stage])
                     if name.startswith("docs/"))
    processed = [worker for key, worker in ran if str(key).startswith(PARTITION_TASKS)]
    assert len(processed) == partitions and set(processed) <= set(worker_pids(client))


def test_a_worker_killed_mid_stage_is_retried_and_the_stage_commits_once(
        prefect_harness, dask_cluster, tiny_corpus, store_root, tmp_path):
    address, client = dask_cluster
    root = f"{store_root}/killed"
    sets = overrides(tiny_corpus, root, tmp_path, **{"dask.scheduler": address,
                                                     "source.docs_per_partition": 2})
    flow = start_flow(sets, tmp_path / "run", DATA_STAGES)
    killed = None
    deadline = time.monotonic() + 180
    while killed is None:  # kill a worker as soon as it runs a partition (of extract, the first)
        assert flow.poll() is None, (tmp_path / "run" / "log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no partition ever ran on the cluster"
        for worker, keys in client.processing().items():
            if any(str(k).startswith(PARTITION_TASKS) for k in keys):
                pid = worker_pids(client)[worker]
                os.kill(pid, signal.SIGKILL)
                killed = worker, pid
                break
        else:
            time.sleep(0.01)
    versions, log = finish_flow(flow, tmp_path / "run")

    lost = [msg for _, msg in client.get_events("all")
            if msg.get("action") == "remove-worker" and msg.get("worker") == killed[0]]
    assert lost and any(str(k).startswith(PARTITION_TASKS) for k in lost[0]["processing-tasks"]), \
        f"the worker was killed with no partition in flight: {lost}"
    assert list(versions) == DATA_STAGES
    store = ArtifactStore(root)
    for stage, version in versions.items():  # built once, committed once
        assert log.count(f"{stage}: building {stage}/") == 1 and store.versions(stage) == [version], stage
    assert store.temporaries() == []
    for stage in DOC_STAGES:  # conservation, from the manifests (verify counts the files)
        stats = store.manifest(stage, versions[stage])["stats"]
        assert stats["docs_in"] == stats["docs_out"] + stats["docs_rejected"] > 0, stage
    checked = cli("verify", "--root", root)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed one
    assert killed[1] not in worker_pids(client).values()


def test_the_demo_deployment_runs_on_the_s3_store_and_the_cluster(dask_cluster, tiny_corpus, s3_artifacts, tmp_path):
    """The README's commands: `c2m up`, then `prefect deployment run corpus-to-model/demo`
    with the store and the cluster as overrides; the serve process runs it."""
    address, client = dask_cluster
    env = {**os.environ, "C2M_STATE": str(tmp_path / "state"), "C2M_PORT": str(free_port())}
    env.update(PREFECT_API_URL=f"http://127.0.0.1:{env['C2M_PORT']}/api", PREFECT_HOME=str(tmp_path / "home"))
    sets = {**tiny_overrides(tiny_corpus, tmp_path / "unused"), "run.artifacts": s3_artifacts,
            "dask.scheduler": address}
    prefect = str(Path(sys.executable).with_name("prefect"))
    before = {t["key"] for t in client.get_task_stream()}
    up = subprocess.run([C2M, "up"], env=env, capture_output=True, text=True, timeout=240)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        run = subprocess.run([prefect, "deployment", "run", "corpus-to-model/demo", "-p", 'stages=["source", "extract"]',
                              "-p", f"overrides={json.dumps(sets)}", "--watch"],
                             env=env, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        subprocess.run([C2M, "down"], env=env, capture_output=True, timeout=120)
    store = ArtifactStore(s3_artifacts)
    extract = store.latest("extract")
    assert extract and store.verify("extract", extract) == []
    ran_here = {t["key"] for t in client.get_task_stream()
                if t["key"].startswith("process_partition-") and t["key"] not in before}
    stats = store.manifest("extract", extract)["stats"]
    assert stats["docs_in"] == 29 and len(ran_here) == stats["partitions"] == 4  # on this cluster
