"""What the `c2m why` indexes cost: the data stages on the WCXB dev pages with and without
their indexes, in one run, and the time of a lookup. Target: under 5% of the data stages.

Runs the stage builders the flow runs (flows/stages.py, without Prefect) from source to
shard on ../shared/data/wcxb-dev/html, timing each build; then writes each document
stage's index as the flow does after a build (corpus.index.index_documents) and times
that. The shard stage writes its index while it writes shards and times that part
itself (stats index_seconds). Overhead = index seconds / data-stage seconds without them.

--synthetic N also indexes N synthetic ids (Parquet partitions of 1,000) to show that
building stays linear and memory bounded at millions of documents, and times lookups.
Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from corpus.index import DocumentIndex, TokenIndex, index_documents  # noqa: E402
from flows import parallel  # noqa: E402
from flows.config import load_config  # noqa: E402
from flows.stages import ORDER, STAGES, StageContext  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wcxb-dev" / "html"
DATA_STAGES = ORDER[: ORDER.index("shard") + 1]


def cpu() -> dict:
    import torch

    fields = dict(line.split(":", 1) for line in
                  subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if ":" in line)
    model = " ".join(f"{k.lower()} {fields[k].strip()}" for k in ("Model name", "CPU family", "Model") if k in fields)
    return {"model": model, "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": len(__import__("os").sched_getaffinity(0))}


def data_stages(cfg, work: Path) -> dict:
    """Build source..shard into work/<stage>; per stage the build seconds (without the
    index) and the index seconds."""
    figures, done = {}, {}
    for name in DATA_STAGES:
        stage = STAGES[name]
        out = work / name
        out.mkdir(parents=True)
        ctx = StageContext(cfg=cfg, inputs={i: done[i] for i in stage.inputs},
                           manifests={i: {"stats": figures[i]["stats"]} for i in stage.inputs},
                           out=out, log=lambda m: None)
        if name == "source":
            parallel.client(cfg.dask)  # cluster start-up is no stage's time
        started = time.perf_counter()
        stats = stage.build(ctx)
        build = time.perf_counter() - started
        started = time.perf_counter()
        indexed = index_documents(out, out, with_sources=not stage.inputs)
        index = time.perf_counter() - started if indexed is not None else stats.get("index_seconds", 0.0)
        if indexed is None:
            build -= index  # the shard stage indexes as it writes: its build time includes it
        done[name] = out
        figures[name] = {"build_s": round(build, 3), "index_s": round(index, 4),
                         "docs": stats.get("docs_in", stats.get("docs")), "stats": stats}
    return figures


def lookups(work: Path, n: int = 200) -> dict:
    """Per document: open every stage's index, find it, read its row (what `c2m why`
    does), cold (fresh open each time) in ms."""
    docs = [row for row in DocumentIndex(work / "source")._db.execute("SELECT id FROM docs")]
    ids = [r[0] for r in random.Random(0).sample(docs, min(n, len(docs)))]
    started = time.perf_counter()
    for id_ in ids:
        for name in DATA_STAGES:
            if name in ("tokenizer", "shard"):
                continue
            index = DocumentIndex(work / name)
            entry = index.get(id_)
            if entry is not None:
                index.read(entry, ["n_chars"] if entry.kept else ["reason", "value", "text"])
            index.close()
        TokenIndex(work / "shard").get(id_)
    return {"docs": len(ids), "ms_per_document_all_stages": round((time.perf_counter() - started) / len(ids) * 1e3, 2)}


def synthetic(n: int, work: Path) -> dict:
    """index_documents over n synthetic ids in docs/ partitions of 1,000; lookups."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = work / f"synthetic-{n}"
    (folder / "docs").mkdir(parents=True)
    part = 1000
    for p in range(n // part):
        ids = [hashlib.sha1(f"{p}-{i}".encode()).hexdigest()[:16] for i in range(part)]
        pq.write_table(pa.table({"id": ids, "text": ["x"] * part}), folder / "docs" / f"part-{p:05d}.parquet")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    index_documents(folder, folder)
    seconds = time.perf_counter() - started
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    probe = [hashlib.sha1(f"{random.randrange(n // part)}-{random.randrange(part)}".encode()).hexdigest()[:16]
             for _ in range(1000)]
    started = time.perf_counter()
    cold = DocumentIndex(folder)
    assert cold.get(probe[0])
    cold_ms = (time.perf_counter() - started) * 1e3
    started = time.perf_counter()
    assert all(cold.get(id_) for id_ in probe)
    warm_ms = (time.perf_counter() - started) / len(probe) * 1e3
    size = (folder / "index.sqlite").stat().st_size
    shutil.rmtree(folder)
    return {"docs": n, "index_s": round(seconds, 2), "us_per_doc": round(seconds / n * 1e6, 2),
            "file_mb": round(size / 1e6, 1), "peak_rss_growth_mb": round((rss_after - rss_before) / 1e3),
            "open_and_lookup_ms": round(cold_ms, 2), "lookup_ms": round(warm_ms, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/wcxb.toml")
    parser.add_argument("--pages", type=int, default=0, help="only the first N pages (0 = all 1,358)")
    parser.add_argument("--synthetic", type=int, default=0, help="also index N synthetic ids")
    parser.add_argument("--workdir", default="", help="keep outputs here (default: a temp dir, removed)")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is missing: put ../shared/data beside the checkout")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="c2m-index-"))
    corpus = DATA
    if args.pages:
        corpus = work / "pages"
        corpus.mkdir(parents=True)
        for page in sorted(DATA.glob("*.html.gz"))[: args.pages]:
            shutil.copy(page, corpus / page.name)
    cfg = load_config(args.config, {"source.path": str(corpus), "filter.toxicity": "profanity-check",
                                    "dask.local_directory": str(work / "dask")})
    results: dict = {"cpu": cpu()}
    try:
        figures = data_stages(cfg, work / "run")
        parallel.shutdown()
        build = sum(f["build_s"] for f in figures.values())
        index = sum(f["index_s"] for f in figures.values())
        print(f"CPU: {results['cpu']}")
        print(f"{'stage':10s} {'docs':>6s} {'build s':>9s} {'index s':>8s} {'index %':>8s}")
        for name, f in figures.items():
            share = f"{100 * f['index_s'] / f['build_s']:.2f}" if f["build_s"] else "-"
            print(f"{name:10s} {f['docs'] or '':>6} {f['build_s']:9.2f} {f['index_s']:8.4f} {share:>8s}")
        print(f"{'all':10s} {'':>6s} {build:9.2f} {index:8.4f} {100 * index / build:8.2f}")
        results["stages"] = {k: {x: v for x, v in f.items() if x != "stats"} for k, f in figures.items()}
        results.update(data_seconds_without_index=round(build, 2), index_seconds=round(index, 3),
                       overhead=round(index / build, 5), lookup=lookups(work / "run"))
        print(f"data stages {build:.2f} s without indexes, {build + index:.2f} s with: "
              f"+{100 * index / build:.2f}% (target < 5%)")
        print(f"c2m why lookup (every stage's index opened, row read): "
              f"{results['lookup']['ms_per_document_all_stages']} ms per document")
        if args.synthetic:
            results["synthetic"] = synthetic(args.synthetic, work)
            print(f"synthetic: {results['synthetic']}")
        print(json.dumps(results))
    finally:
        parallel.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
