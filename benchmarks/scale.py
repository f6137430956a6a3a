"""Data stages at 1x and Nx the WCXB corpus: peak memory per process, throughput, and
the cost of an object store and a separate-process Dask cluster.

Runs the same stage builders the flow runs (flows/stages.py), through the same
ArtifactStore calls (lease, begin, build, index, commit), without Prefect, on the WCXB
dev pages (../shared/data/wcxb-dev, ~400 MB of HTML) written as JSONL copies: copy k of
a page gets its own id and one extra paragraph, so copies are distinct documents that
every stage must process (exact dedup keeps them; near-dup may drop them).

Each scale (1x, then --scale x) runs in a fresh process. The reference: a local store
folder and a LocalCluster of 2 workers. With --artifacts URL and/or --scheduler ADDRESS,
each scale runs a second time, the target: stage outputs under that store URL (Parquet
partitions written and read there; tokenizer.json, shards and indexes in local folders,
exactly as the flow does), the document stages on that cluster (else a LocalCluster).
An external cluster's workers are restarted before each run, so no run inherits another's
heap. The S3 credentials and endpoint come from the environment (AWS_*), in this process
and on the workers.

Reports per stage: seconds, documents/s and MB/s, the peak RSS of the driver (this
process) and of the largest Dask worker process, each sampled every 0.2 s where it runs,
the Nx/1x growth of both, and the target/reference slowdown. Without flags also: extract
with 1 and 2 workers (the speed-up) and the shard stage against raw `tokenizers`
encode_batch on the same texts. Prints tables and a final JSON line.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402  (a dask dependency)

from corpus.index import index_documents  # noqa: E402
from flows import parallel  # noqa: E402
from flows.config import load_config  # noqa: E402
from flows.stages import DOCUMENT_STAGES, ORDER, PARTITIONED, STAGES, StageContext, partitions  # noqa: E402
from flows.store import ArtifactStore, Lease  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wcxb-dev"
DATA_STAGES = ORDER[: ORDER.index("shard") + 1]
VERSION = "bench"     # every stage's version in a benchmark store (one store per run)
SAMPLE_S = 0.2        # RSS sampling interval, driver and workers
REFERENCE, TARGET = "local", "target"


def _rss_sampler(peak: dict, stop: threading.Event) -> None:
    me = psutil.Process()
    while not stop.is_set():
        peak["bytes"] = max(peak["bytes"], me.memory_info().rss)
        stop.wait(SAMPLE_S)


def worker_peak(dask_worker, reset: bool = False) -> int:
    """Runs in a Dask worker process (client.run): its peak RSS since the last reset,
    from a sampling thread started on the first call."""
    state = getattr(dask_worker, "_bench_rss", None)
    if state is None:
        state = dask_worker._bench_rss = {"bytes": 0}
        threading.Thread(target=_rss_sampler, args=(state, threading.Event()), daemon=True).start()
    peak = max(state["bytes"], psutil.Process().memory_info().rss)
    if reset:
        state["bytes"] = psutil.Process().memory_info().rss
    return peak


class PeakRSS:
    """Peak RSS over a block, per process: this one (the driver) and each Dask worker."""

    def __init__(self, client):
        self.client = client
        self.driver = 0
        self.workers: dict[str, int] = {}   # worker address -> peak bytes
        self._peak = {"bytes": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_rss_sampler, args=(self._peak, self._stop), daemon=True)

    def __enter__(self):
        self._pids = self.client.run(os.getpid)
        self.client.run(worker_peak, reset=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.driver = self._peak["bytes"]
        self.workers = self.client.run(worker_peak)
        if self.client.run(os.getpid) != self._pids:  # a worker restarted: its peak is lost
            print(f"warning: Dask workers changed during the stage: {self._pids} -> "
                  f"{self.client.run(os.getpid)}", file=sys.stderr)


def write_corpus(folder: Path, copies: int, pages: int) -> tuple[int, int]:
    """JSONL files of the WCXB pages, `copies` times, a page at a time; returns
    (documents, HTML bytes)."""
    urls = {}
    with (DATA / "index.jsonl").open() as index:
        for line in index:
            record = json.loads(line)
            urls[record["id"]] = record["url"]
    files = sorted((DATA / "html").glob("*.html.gz"))[: pages or None]
    if not files:
        sys.exit(f"{DATA} is missing: put ../shared/data beside the checkout")
    folder.mkdir(parents=True)
    n = size = 0
    for k in range(copies):
        with (folder / f"copy-{k}.jsonl").open("w") as out:
            for f in files:
                html = gzip.decompress(f.read_bytes()).decode("utf-8", "replace")
                if k:  # a distinct document: its own id and one more paragraph
                    html = html.replace("</body>", f"<p>Copy {k} of this page.</p></body>", 1)
                page = f.name.split(".")[0]
                out.write(json.dumps({"id": f"{page}-{k}", "url": urls.get(page, page), "html": html}) + "\n")
                n += 1
                size += len(html.encode())
    return n, size


def build_stage(store: ArtifactStore, name: str, cfg, client) -> tuple[dict, dict]:
    """Build one stage as the flow does, into `store`; returns (stats, timings)."""
    stage = STAGES[name]
    lease = Lease(store, name, VERSION, log=lambda m: None).acquire()
    try:
        build = store.begin(lease)
        # partitions are read where they are; other files need a local copy
        ctx = StageContext(cfg=cfg, inputs={i: store.path(i, VERSION) if i in PARTITIONED
                                            else store.local(i, VERSION) for i in stage.inputs},
                           manifests={i: store.manifest(i, VERSION) for i in stage.inputs},
                           out=build.out, local_out=build.local, log=lambda m: None)
        with PeakRSS(client) as rss:
            started = time.perf_counter()
            stats = stage.build(ctx)
            built = time.perf_counter()
        index_s = index_documents(build.out, build.local, with_sources=not stage.inputs)
        indexed = time.perf_counter()
        store.commit(build, {"stats": stats})
        committed = time.perf_counter()
    finally:
        lease.release()
    return stats, {"seconds": built - started, "index_s": index_s or 0.0, "commit_s": committed - indexed,
                   "driver_peak": rss.driver, "worker_peak": max(rss.workers.values())}


def run_stages(cfg, corpus: Path, store: ArtifactStore, stages=DATA_STAGES) -> dict:
    """Build the given stages in order into `store`; returns per-stage figures."""
    cfg = replace(cfg, source=replace(cfg.source, kind="path", path=str(corpus)))
    client = parallel.client(cfg.dask)  # start-up is no stage's time
    if cfg.dask.scheduler:  # fresh worker processes, as a LocalCluster's are
        client.restart(wait_for_workers=True)
    workers = len(client.scheduler_info()["workers"])
    figures: dict = {}
    for name in stages:
        stats, t = build_stage(store, name, cfg, client)
        docs = stats.get("docs_in", stats.get("docs"))
        mb = stats.get("bytes_in", stats.get("bytes", 0)) / 1e6
        if name in ("tokenizer", "shard"):  # these read the deduplicated text
            docs, mb = figures["dedup"]["docs_out"], figures["dedup"]["mb_out"]
        cores = workers if name in DOCUMENT_STAGES else 1
        seconds = t["seconds"]
        figures[name] = {"seconds": round(seconds, 2), "docs": docs, "mb": round(mb, 1),
                         "docs_per_s": round(docs / seconds, 1), "mb_per_s": round(mb / seconds, 2),
                         "docs_per_s_per_core": round(docs / seconds / cores, 1), "cores": cores,
                         "index_s": round(t["index_s"], 2), "commit_s": round(t["commit_s"], 2),
                         "driver_peak_mb": round(t["driver_peak"] / 1e6),
                         "worker_peak_mb": round(t["worker_peak"] / 1e6),
                         "docs_out": stats.get("docs_out"), "mb_out": round(stats.get("bytes_out", 0) / 1e6, 1)}
    return figures


def encode_reference(deduped: Path, tokenizer_json: Path) -> dict:
    """Raw tokenizers encode_batch over the same texts, nothing written."""
    from tokenizers import Tokenizer

    from corpus.documents import read_texts

    tok = Tokenizer.from_file(str(tokenizer_json))
    started = time.perf_counter()
    n = 0
    batch: list[str] = []
    for _, text in read_texts(partitions(deduped)):
        batch.append(text)
        if len(batch) == 256:
            n += len(tok.encode_batch(batch))
            batch = []
    n += len(tok.encode_batch(batch))
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "docs_per_s": round(n / seconds, 1)}


def stage_config(args, mode: str, **overrides):
    sets = {"filter.toxicity": "profanity-check",  # the same scorer at every scale
            "dask.local_directory": str(Path(args.workdir) / "dask"), **overrides}
    if mode == TARGET and args.scheduler:
        sets["dask.scheduler"] = args.scheduler
    return load_config(args.config, sets)


def store_location(args, mode: str, copies: int) -> str:
    if mode == TARGET and args.artifacts:
        return f"{args.artifacts.rstrip('/')}/{args.run_id}/{copies}x"
    return str(Path(args.workdir) / f"store-{mode}-{copies}x")


def run_one(args) -> None:
    """One scale in one mode, in this fresh process; prints its figures as JSON."""
    store = ArtifactStore(store_location(args, args.mode, args.one))
    try:
        figures = run_stages(stage_config(args, args.mode), Path(args.workdir) / f"corpus-{args.one}x", store)
    finally:
        parallel.shutdown()
    print(json.dumps(figures))


def run_subprocess(args, copies: int, mode: str, work: Path, run_id: str) -> dict:
    argv = [sys.executable, __file__, "--one", str(copies), "--mode", mode, "--run-id", run_id,
            "--config", args.config, "--workdir", str(work),
            "--artifacts", args.artifacts, "--scheduler", args.scheduler]
    # the local cache of a remote store's versions and its builds' local folders
    env = {**os.environ, "C2M_STATE": str(work / f"state-{mode}-{copies}x")}
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode:
        sys.exit(f"scale.py: the {copies}x {mode} run failed (exit {proc.returncode}); its error is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(title: str, figures: dict) -> None:
    print(f"\n{title}")
    print(f"{'stage':10s} {'s':>7s} {'docs/s':>8s} {'MB/s':>6s} {'docs/s/core':>11s} "
          f"{'index s':>7s} {'commit s':>8s} {'driver MB':>9s} {'worker MB':>9s}")
    for name, f in figures.items():
        print(f"{name:10s} {f['seconds']:7.1f} {f['docs_per_s']:8.1f} {f['mb_per_s']:6.2f} "
              f"{f['docs_per_s_per_core']:11.1f} {f['index_s']:7.1f} {f['commit_s']:8.1f} "
              f"{f['driver_peak_mb']:9,d} {f['worker_peak_mb']:9,d}")


def growth(small: dict, large: dict) -> dict:
    """Per stage: driver and largest-worker peak RSS, Nx / 1x."""
    return {s: {who: round(large[s][f"{who}_peak_mb"] / max(small[s][f"{who}_peak_mb"], 1), 2)
                for who in ("driver", "worker")} for s in small}


def slowdown(reference: dict, target: dict) -> dict:
    """Per stage: target seconds / reference seconds (build, and build + index + commit)."""
    def total(f):
        return f["seconds"] + f["index_s"] + f["commit_s"]
    return {s: {"build": round(target[s]["seconds"] / reference[s]["seconds"], 2),
                "with_commit": round(total(target[s]) / total(reference[s]), 2)} for s in reference}


def speedup_and_encode(args, work: Path, results: dict) -> None:
    """Default mode only: extract with 1 vs 2 workers on the 1x source, and shard vs raw
    encode_batch."""
    store = ArtifactStore(store_location(args, REFERENCE, 1))
    results["encode_batch_reference"] = encode_reference(
        store.path("dedup", VERSION), store.path("tokenizer", VERSION) / "tokenizer.json")
    speed = {}
    for workers in (1, 2):
        cfg = stage_config(args, REFERENCE, **{"dask.workers": workers, "source.kind": "path",
                                               "source.path": str(work / "corpus-1x")})
        out = work / f"extract-{workers}w"
        out.mkdir()
        ctx = StageContext(cfg=cfg, inputs={"source": store.path("source", VERSION)}, manifests={},
                           out=out, log=lambda m: None)
        parallel.client(cfg.dask)
        started = time.perf_counter()
        STAGES["extract"].build(ctx)
        speed[workers] = time.perf_counter() - started
        parallel.shutdown()
    results["extract_speedup_2_workers"] = round(speed[1] / speed[2], 2)
    results["extract_seconds_by_workers"] = {str(k): round(v, 2) for k, v in speed.items()}
    ref, shard = results["encode_batch_reference"], results["1x"][REFERENCE]["shard"]
    print(f"\nextract: 1 worker {speed[1]:.1f} s, 2 workers {speed[2]:.1f} s: speed-up {speed[1] / speed[2]:.2f}x")
    print(f"shard {shard['docs_per_s']:.1f} docs/s vs raw encode_batch {ref['docs_per_s']:.1f} docs/s: "
          f"{shard['docs_per_s'] / ref['docs_per_s']:.2f}x")


def remove_target(args) -> None:
    if args.artifacts:
        from upath import UPath

        where = UPath(f"{args.artifacts.rstrip('/')}/{args.run_id}", use_listings_cache=False)
        if where.exists():
            where.fs.rm(where.path, recursive=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=4, help="the larger corpus is this many copies")
    parser.add_argument("--pages", type=int, default=0, help="WCXB pages per copy (0 = all 1,358)")
    parser.add_argument("--config", default="configs/wcxb.toml")
    parser.add_argument("--artifacts", default="", help="target store URL (s3://bucket/prefix, or a folder)")
    parser.add_argument("--scheduler", default="", help="target Dask cluster (tcp://host:port)")
    parser.add_argument("--workdir", default="", help="keep outputs here (default: a temp dir, removed)")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # internal: one scale
    parser.add_argument("--mode", default=REFERENCE, help=argparse.SUPPRESS)  # internal: which store
    parser.add_argument("--run-id", default="", help=argparse.SUPPRESS)  # internal: the target prefix
    args = parser.parse_args()
    if args.one:  # a fresh process per scale and mode, so none inherits another's heap
        run_one(args)
        return

    modes = [REFERENCE, *([TARGET] if args.artifacts or args.scheduler else [])]
    keep = bool(args.workdir)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="c2m-scale-")).resolve()
    args.workdir, args.run_id = str(work), time.strftime("scale-%Y%m%d-%H%M%S")
    described = {REFERENCE: "local folder + LocalCluster(2)",
                 TARGET: f"{args.artifacts or 'local folder'} + {args.scheduler or 'LocalCluster(2)'}"}
    results: dict = {"modes": {mode: described[mode] for mode in modes}}
    began = time.perf_counter()
    try:
        for copies in (1, args.scale):
            docs, size = write_corpus(work / f"corpus-{copies}x", copies, args.pages)
            print(f"\n{copies}x: {docs:,} pages, {size / 1e6:,.0f} MB of HTML", flush=True)
            scale = results[f"{copies}x"] = {}
            for mode in modes:
                scale[mode] = run_subprocess(args, copies, mode, work, args.run_id)
                print_table(f"{copies}x, {mode}: {results['modes'][mode]}", scale[mode])
            if TARGET in modes:
                scale["slowdown"] = slowdown(scale[REFERENCE], scale[TARGET])
                print(f"\n{copies}x slowdown target / local (build; build + index + commit):")
                for stage, s in scale["slowdown"].items():
                    print(f"  {stage:10s} {s['build']:5.2f}x  {s['with_commit']:5.2f}x")
            sys.stdout.flush()
        if TARGET not in modes:
            speedup_and_encode(args, work, results)
        for mode in modes:
            g = results.setdefault("peak_rss_growth", {})[mode] = growth(
                results["1x"][mode], results[f"{args.scale}x"][mode])
            print(f"\npeak RSS {args.scale}x / 1x, {mode}: " +
                  ", ".join(f"{s} {v['driver']:.2f}/{v['worker']:.2f}" for s, v in g.items()) +
                  "  (driver/largest worker)")
        results["seconds"] = round(time.perf_counter() - began)
        print(json.dumps(results))
    finally:
        parallel.shutdown()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
            remove_target(args)


if __name__ == "__main__":
    main()
