"""The artifact store: versions, atomic commits, pointers, lineage, leases, gc, verify."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import flows.store
from flows.store import ArtifactStore, LeaseLost, content_version


def test_version_depends_on_every_ingredient():
    base = content_version("extract", {"a": 1}, "code1", {"source": "v1"})
    assert base == content_version("extract", {"a": 1}, "code1", {"source": "v1"})
    assert len({base,
                content_version("normalize", {"a": 1}, "code1", {"source": "v1"}),
                content_version("extract", {"a": 2}, "code1", {"source": "v1"}),
                content_version("extract", {"a": 1}, "code2", {"source": "v1"}),
                content_version("extract", {"a": 1}, "code1", {"source": "v2"})}) == 5


def commit(store: ArtifactStore, stage: str, version: str, files: dict[str, bytes] | None = None,
           manifest: dict | None = None) -> None:
    with store.lease(stage, version) as lease:
        build = store.begin(lease)
        for name, data in (files or {}).items():
            (build.out / name).parent.mkdir(parents=True, exist_ok=True)
            (build.out / name).write_bytes(data)
        store.commit(build, manifest or {"inputs": {}, "stats": {}})


def test_commit_is_all_or_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.lease("extract", "abc") as lease:
        build = store.begin(lease)
        tmp = build.out
        (tmp / "part-00000.parquet").write_bytes(b"data")
        (tmp / "manifest.json").write_text("{}")  # as just before the rename
        assert not store.exists("extract", "abc")  # a half-written version is invisible
        assert store.versions("extract") == [] and store.latest("extract") is None
        store.commit(build, {"inputs": {}, "stats": {}})
    assert store.exists("extract", "abc") and store.latest("extract") == "abc"
    files = store.manifest("extract", "abc")["files"]
    assert files["part-00000.parquet"]["bytes"] == 4
    assert not tmp.exists()

    with store.lease("extract", "def") as lease:
        failed = store.begin(lease)
        (failed.out / "x").write_text("partial")
        store.abort(failed)
    assert store.versions("extract") == ["abc"]
    assert not list((tmp_path / "extract").glob(".tmp-*"))
    assert not list((tmp_path / "extract").glob(".lease-*"))  # released


def test_recommit_replaces_and_resolve_by_prefix(tmp_path):
    store = ArtifactStore(tmp_path)
    for content in (b"one", b"two"):
        commit(store, "train", "abc123", {"model.pt": content})
    assert (store.path("train", "abc123") / "model.pt").read_text() == "two"
    assert store.resolve("train", "abc") == "abc123"
    assert store.resolve("train") == "abc123"
    with pytest.raises(FileNotFoundError, match="0 versions match"):
        store.resolve("train", "zzz")
    with pytest.raises(FileNotFoundError, match="run it first"):
        store.resolve("evaluate")


def test_lineage_walks_inputs(tmp_path):
    store = ArtifactStore(tmp_path)
    commit(store, "source", "s1")
    commit(store, "extract", "e1", manifest={"inputs": {"source": {"stage": "source", "version": "s1"}},
                                             "stats": {}})
    assert store.lineage("extract", "e1") == [("extract", "e1"), ("source", "s1")]


# -- leases ---------------------------------------------------------------------------

def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fake_lease(store: ArtifactStore, stage: str, version: str, gen: int = 0, age_s: float = 0,
               **holder) -> str:
    """A lease file as another run would have left it."""
    path = store.root / stage / f".lease-{version}.{gen}"
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "token": f"tok{gen}0000",
            "run": "other-run", **holder}
    path.write_text(json.dumps(info))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return info["token"]


def test_a_second_run_waits_for_the_holder_and_says_for_whom(tmp_path, monkeypatch):
    monkeypatch.setattr(flows.store, "POLL_S", 0.05)
    store = ArtifactStore(tmp_path)
    first = store.lease("train", "v1", run="first").acquire()
    said: list[str] = []
    got = {}
    waiter = threading.Thread(target=lambda: got.update(lease=store.lease("train", "v1", log=said.append).acquire()))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and "lease" not in got  # waits while the holder lives
    store.commit(store.begin(first), {"inputs": {}, "stats": {}})
    first.release()
    waiter.join(5)
    second = got["lease"]
    assert second.waited_for == f"pid {os.getpid()} on {socket.gethostname()}, flow run first"
    assert said[0].startswith("train: waiting for train/v1: pid ") and said[-1].startswith("train: waited ")
    assert store.exists("train", "v1")  # what the waiter then uses as a cache hit
    second.release()


def test_a_dead_holders_lease_is_taken_over(tmp_path):
    store = ArtifactStore(tmp_path)
    fake_lease(store, "train", "v1", gen=0, pid=dead_pid())
    said: list[str] = []
    with store.lease("train", "v1", log=said.append) as lease:
        assert lease.path.name == ".lease-v1.1" and "its process is gone" in lease.took_over
        assert not (store.root / "train" / ".lease-v1.0").exists()
        assert said == [f"train: took over the lease on train/v1 from {lease.took_over}"]
    # another machine: its process cannot be seen, only its heartbeat
    fake_lease(store, "train", "v2", host="elsewhere", age_s=flows.store.STALE_S + 5)
    with store.lease("train", "v2") as lease:
        assert "no heartbeat for" in lease.took_over
    fake_lease(store, "train", "v3", host="elsewhere", age_s=5)
    assert store.lease("train", "v3").acquire(wait=False) is None  # alive: not taken


def test_a_lost_lease_is_never_committed(tmp_path):
    store = ArtifactStore(tmp_path)
    lease = store.lease("train", "v1").acquire()
    build = store.begin(lease)
    (build.out / "model.pt").write_text("mine")
    fake_lease(store, "train", "v1", gen=1)  # a live run took it over (this process: alive)
    with pytest.raises(LeaseLost, match="took it over"):
        store.commit(build, {"inputs": {}, "stats": {}})
    assert not store.exists("train", "v1")
    lease.release()
    assert (store.root / "train" / ".lease-v1.1").exists()  # not ours to remove


# -- temporary folders ---------------------------------------------------------------

def test_gc_removes_what_dead_runs_left_and_keeps_live_ones(tmp_path):
    store = ArtifactStore(tmp_path)
    live = store.lease("extract", "live").acquire()
    live_tmp = store.begin(live).out
    (live_tmp / "part.parquet").write_bytes(b"x" * 1000)
    dead = fake_lease(store, "extract", "dead", pid=dead_pid())
    dead_tmp = store.root / "extract" / f".tmp-dead-{dead}"
    (dead_tmp / "docs").mkdir(parents=True)
    (dead_tmp / "docs" / "part.parquet").write_bytes(b"y" * 3000)
    work = store.work_dir("train", "abc")
    (work / "checkpoints").mkdir(parents=True)
    (work / "checkpoints" / "step_1.pt").write_bytes(b"z" * 2048)
    orphan = store.root / "extract" / ".tmp-gone-12345678"  # its lease is gone entirely
    orphan.mkdir()

    listed = {t.path.name: t for t in store.temporaries()}
    assert set(listed) == {live_tmp.name, live.path.name, dead_tmp.name, ".lease-dead.0",
                           work.name, orphan.name}
    assert listed[live_tmp.name].alive and listed[live.path.name].alive
    assert not listed[dead_tmp.name].alive and listed[dead_tmp.name].bytes == 3000
    assert "its process is gone" in listed[dead_tmp.name].describe()
    assert not listed[work.name].alive

    said: list[str] = []
    assert store.gc(keep_work=True, log=said.append) == (3, 3000 + listed[".lease-dead.0"].bytes)
    assert work.exists()  # a rerun of its version resumes from it
    assert not dead_tmp.exists() and not orphan.exists()
    assert any(line.startswith(f"removing extract/{dead_tmp.name}  2.9 KB  build folder of pid ")
               for line in said)

    from typer.testing import CliRunner

    from flows.cli import app

    listed = CliRunner().invoke(app, ["ls", "--root", str(tmp_path)])
    assert listed.exit_code == 0 and "temporary (`c2m gc` removes those whose run is gone):" in listed.stdout
    assert f"train/{work.name}  2.0 KB  resumable work folder of no known run" in listed.stdout
    collected = CliRunner().invoke(app, ["gc", "--root", str(tmp_path)])
    assert collected.exit_code == 0 and not work.exists()
    assert collected.stdout.splitlines() == [
        f"removing train/{work.name}  2.0 KB  resumable work folder of no known run: its run is gone "
        "(a rerun of the same config resumes from it)",
        "removed 1 temporary entry, 2.0 KB; kept 2 that belong to live runs"]
    assert live_tmp.exists() and live.path.exists()  # a live run's are never touched
    assert [t.path for t in store.temporaries()] == [live.path, live_tmp]
    live.release()


# -- verify ----------------------------------------------------------------------------

def parquet(rows: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": [str(i) for i in range(rows)]}), sink)
    return sink.getvalue().to_pybytes()


def test_verify_checks_files_and_conservation(tmp_path):
    store = ArtifactStore(tmp_path)
    commit(store, "source", "s1", {"docs/part-0.parquet": parquet(5)}, {"inputs": {}, "stats": {"docs": 5}})
    commit(store, "extract", "e1", {"docs/part-0.parquet": parquet(3), "rejected/part-0.parquet": parquet(2)},
           {"inputs": {"source": {"stage": "source", "version": "s1"}},
            "stats": {"docs_in": 5, "docs_out": 3, "docs_rejected": 2}})
    assert store.verify("source", "s1") == [] and store.verify("extract", "e1") == []

    folder = store.path("extract", "e1")
    (folder / "rejected" / "part-0.parquet").unlink()
    (folder / "stray.txt").write_text("?")
    with open(folder / "docs" / "part-0.parquet", "r+b") as f:  # same size, other bytes
        f.seek(8)
        f.write(b"\xff")
    assert store.verify("extract", "e1") == [
        "extract/e1: rejected/part-0.parquet: missing (listed in the manifest)",
        "extract/e1: stray.txt: not in the manifest",
        "extract/e1: docs/part-0.parquet: sha256 differs from the manifest",
        "extract/e1: rejected/ holds 0 documents, the manifest says 2 rejected",
        "extract/e1: 5 documents in, but 3 kept + 0 rejected = 3",
    ]


# -- the same protocol on S3 (moto's server) ---------------------------------------------

def test_on_s3_a_lease_is_one_conditional_create_and_a_version_appears_with_its_manifest(s3_artifacts):
    store, other = ArtifactStore(s3_artifacts), ArtifactStore(s3_artifacts)  # two runs' views
    lease = store.lease("extract", "v1").acquire()
    assert other.lease("extract", "v1").acquire(wait=False) is None  # If-None-Match: one holder
    build = store.begin(lease)
    assert build.out == store.path("extract", "v1") and build.local.is_dir()  # no rename on S3
    (build.out / "docs" / "part-00000.parquet").write_bytes(b"a partition a worker wrote")
    (build.local / "index.sqlite").write_bytes(b"a file written locally")
    assert other.versions("extract") == [] and not other.exists("extract", "v1")  # no manifest yet
    kinds = sorted((t.kind, t.alive) for t in other.temporaries())
    assert kinds == [("build", True), ("lease", True)]
    store.commit(build, {"inputs": {}, "stats": {}})
    lease.release()
    assert other.versions("extract") == ["v1"] and other.latest("extract") == "v1"
    files = other.manifest("extract", "v1")["files"]
    assert set(files) == {"docs/part-00000.parquet", "index.sqlite"} and other.verify("extract", "v1") == []
    assert not build.local.exists() and other.temporaries() == []
    local = other.local("extract", "v1", ["index.sqlite"])  # a checked local copy of one file
    assert (local / "index.sqlite").read_bytes() == b"a file written locally"
    assert not (local / "docs").exists()
    # an object changed behind the manifest's back is refused, and no copy of it is kept
    (other.path("extract", "v1") / "docs" / "part-00000.parquet").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256 differs from its manifest"):
        other.local("extract", "v1")
    assert not (local / "docs" / "part-00000.parquet").exists()


def test_on_s3_a_dead_builders_prefix_is_taken_over_or_collected(s3_artifacts, monkeypatch):
    monkeypatch.setattr(flows.store, "STALE_S", 1.0)
    store = ArtifactStore(s3_artifacts)
    gone = store.lease("extract", "v2", run="gone")
    gone.info["host"] = "another-machine"  # whose death only silence tells
    gone.acquire()
    gone._stop.set()  # its heartbeat stops: the machine died
    (store.begin(gone).out / "docs" / "part-00003.parquet").write_bytes(b"half a build")
    time.sleep(1.5)
    (dead,) = [t for t in store.temporaries() if t.kind == "build"]
    assert not dead.alive and dead.owner["run"] == "gone"
    said: list[str] = []
    with store.lease("extract", "v2", log=said.append) as lease:  # the next builder
        assert "no heartbeat for" in lease.took_over
        build = store.begin(lease)
        assert not (build.out / "docs" / "part-00003.parquet").exists()  # cleared first
        (build.out / "docs" / "part-00000.parquet").write_bytes(b"whole")
        store.commit(build, {"inputs": {}, "stats": {}})
    assert list(store.manifest("extract", "v2")["files"]) == ["docs/part-00000.parquet"]
    # and leftovers nobody takes over are collected
    late = store.lease("extract", "v3", run="late")
    late.info["host"] = "another-machine"
    late.acquire()
    late._stop.set()
    (store.begin(late).out / "docs" / "part-00000.parquet").write_bytes(b"x" * 100)
    time.sleep(1.5)
    removed, freed = store.gc(log=said.append)
    assert removed == 2 and freed >= 100  # the prefix and the lease
    assert store.temporaries() == [] and store.versions("extract") == ["v2"]
