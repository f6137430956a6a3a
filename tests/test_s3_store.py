"""The artifact store on S3: the whole flow against a real S3 API (moto's server).

One run is killed mid-stage; the next, `c2m run --set run.artifacts=s3://...` as the
README says, takes over and finishes; a third is all cache hits. `c2m verify`, `c2m why`,
`c2m ls` and `c2m gc` then work against the bucket.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import C2M, PROJECT, cli, finish_flow, free_port, start_flow, tiny_overrides
from flows.stages import DOCUMENT_STAGES, ORDER
from flows.store import ArtifactStore


def c2m(state: Path, *args: str) -> subprocess.CompletedProcess:
    return cli(*args, C2M_STATE=str(state))  # the state folder of the run under test


@pytest.fixture(scope="module")
def runs(prefect_harness, s3_server, tiny_corpus, tmp_path_factory):
    """A run killed while extract writes its partitions, the run that then builds all, and
    a third run of the same config."""
    import boto3

    bucket = "c2m-flow"
    boto3.client("s3").create_bucket(Bucket=bucket)
    root, work = f"s3://{bucket}/artifacts", tmp_path_factory.mktemp("s3-runs")
    state = work / "state"
    overrides = {**tiny_overrides(tiny_corpus, work / "unused"), "run.artifacts": root,
                 "source.docs_per_partition": 1}  # 29 partitions: extract takes long enough to kill
    killed = start_flow(overrides, work / "killed", C2M_STATE=str(state))
    store = ArtifactStore(root)
    seen = None
    deadline = time.monotonic() + 120
    while seen is None and time.monotonic() < deadline and killed.poll() is None:
        found = store.root.fs.glob(f"{store.root.path}/extract/*/docs/part-*.parquet")
        seen = found[0] if found else None
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(30)
    assert seen, f"extract wrote no partition before the run ended: {(work / 'killed' / 'log').read_text()[-2000:]}"
    after_kill = {"versions": store.versions("extract"), "partial": seen,
                  "ls": c2m(state, "ls", "extract", "--root", root)}
    # the README's command, with a Prefect server of its own
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    env = {**os.environ, "C2M_STATE": str(state), "C2M_PORT": str(free_port())}
    done = subprocess.run([C2M, "run", *sets], env=env, capture_output=True, text=True, timeout=300, cwd=PROJECT)
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads(done.stdout[done.stdout.index("{"):]), done.stderr
    second = finish_flow(start_flow(overrides, work / "second", C2M_STATE=str(state)), work / "second")
    return store, state, after_kill, first, second


def test_a_version_without_its_manifest_is_invisible(runs):
    store, _, after_kill, _, _ = runs
    assert after_kill["versions"] == []  # partitions were there, the manifest was not
    listing = after_kill["ls"]
    assert listing.returncode == 0, listing.stderr
    version = after_kill["partial"].split("/extract/")[1].split("/")[0]
    assert re.search(rf"extract/{version} .* build folder of pid \d+ on .*", listing.stdout), listing.stdout


def test_the_next_run_takes_over_and_builds_every_stage_into_the_bucket(runs):
    store, state, after_kill, (versions, log), _ = runs
    assert list(versions) == ORDER
    assert "took over the lease on extract/" in log and "its process is gone" in log
    for stage, version in versions.items():
        assert store.exists(stage, version) and store.latest(stage) == version
        assert store.verify(stage, version) == [], stage
    # conservation, from the manifests and from the partitions in the bucket
    stats = {s: store.manifest(s, versions[s])["stats"] for s in ["source", *DOCUMENT_STAGES]}
    previous = stats["source"]["docs"]
    assert previous == 29
    for stage in DOCUMENT_STAGES:
        assert stats[stage]["docs_in"] == previous == stats[stage]["docs_out"] + stats[stage]["docs_rejected"]
        previous = stats[stage]["docs_out"]
    # partitions never came to local disk: only the files local readers need were copied
    cache = state / "cache" / store.cache.name  # the runs' C2M_STATE
    copied = {p.relative_to(cache).parts[0] for p in cache.rglob("*") if p.is_file()}
    assert not list(state.rglob("*.parquet")), sorted(state.rglob("*.parquet"))[:3]
    assert copied == {"tokenizer", "shard", "train"}, copied  # read by shard, train, evaluate
    assert not [p for p in (cache / "builds").rglob("*") if p.is_file()]  # uploaded, then removed


def test_a_second_run_is_all_cache_hits(runs):
    store, _, _, (versions, _), (again, log) = runs
    assert again == versions
    assert "building" not in log
    assert log.count("cache hit") == len(ORDER)


def test_verify_why_ls_and_gc_work_against_the_bucket(runs, tiny_corpus):
    store, state, _, (versions, _), _ = runs
    root = str(store.root)
    verified = c2m(state, "verify", "--root", root)
    assert verified.returncode == 0, verified.stderr
    assert f"verified {len(ORDER)} versions" in verified.stdout
    why = c2m(state, "why", str(tiny_corpus / "copy-of-page-3.html.gz"), "--root", root, "--json")
    assert why.returncode == 0, why.stderr
    verdicts = {v["stage"]: v for v in json.loads(why.stdout)}
    assert verdicts["dedup"]["reason"] == "exact_duplicate"
    kept = c2m(state, "why", str(tiny_corpus / "0004.html.gz"), "--root", root, "--json")
    shard = {v["stage"]: v for v in json.loads(kept.stdout)}["shard"]
    assert shard["tokens"] > 0, shard
    # a damaged object is found: verify exits 1 naming it
    part = store.path("dedup", versions["dedup"]) / "docs" / "part-00000.parquet"
    data = part.read_bytes()
    part.write_bytes(data[:-10])
    try:
        broken = c2m(state, "verify", "dedup", "--root", root)
        assert broken.returncode == 1 and "docs/part-00000.parquet" in broken.stdout + broken.stderr
    finally:
        part.write_bytes(data)
    gc = c2m(state, "gc", "--root", root)
    assert gc.returncode == 0, gc.stderr
    assert store.temporaries() == []


def test_generate_reads_the_model_from_the_bucket(runs):
    store, state, _, (versions, _), _ = runs
    out = c2m(state, "generate", "--root", str(store.root), "--tokens", "5", "-p", "The")
    assert out.returncode == 0, out.stderr
    assert f"# train/{versions['train']}" in out.stderr and out.stdout.strip()
    # a local copy, checked against the manifest's sha256, is what torch loaded
    copy = state / "cache" / store.cache.name / "train" / versions["train"] / "model.pt"
    assert copy.is_file() and copy.stat().st_size == store.manifest("train", versions["train"])["files"]["model.pt"]["bytes"]
