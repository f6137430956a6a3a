"""Data stages at 1x and Nx the WCXB corpus: peak memory, throughput, parallel speed-up.

Runs the same stage builders the flow runs (flows/stages.py), without Prefect, on the
WCXB dev pages (../shared/data/wcxb-dev, ~440 MB of HTML) written as JSONL copies: copy
k of a page gets its own id and one extra paragraph, so copies are distinct documents
that every stage must process (exact dedup keeps them; near-dup may drop them).

Reports per stage: wall seconds, documents/s and MB/s (and per core), and the peak RSS
of the whole process tree (driver + Dask workers), at 1x and at --scale x. Peak memory
that does not grow with the corpus is the point. Also: extract with 1 and 2 Dask workers
(the speed-up), and the shard stage against raw `tokenizers` encode_batch on the same
texts (the reference). Prints tables and a final JSON line.
"""
from __future__ import annotations

import argparse
import gzip
import json
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

from flows import parallel  # noqa: E402
from flows.config import load_config  # noqa: E402
from flows.stages import DOCUMENT_STAGES, ORDER, STAGES, StageContext, partitions  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wcxb-dev"
DATA_STAGES = ORDER[: ORDER.index("shard") + 1]


class PeakRSS:
    """Samples the RSS of this process and all its children every 50 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def write_corpus(folder: Path, copies: int, pages: int) -> tuple[int, int]:
    """JSONL files of the WCXB pages, `copies` times; returns (documents, HTML bytes)."""
    urls = {json.loads(l)["id"]: json.loads(l)["url"] for l in (DATA / "index.jsonl").open()}
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


def run_stages(cfg, corpus: Path, work: Path, stages=DATA_STAGES) -> dict:
    """Build the given stages in order into `work`; returns per-stage figures."""
    cfg = replace(cfg, source=replace(cfg.source, kind="path", path=str(corpus)))
    figures, done = {}, {}
    for name in stages:
        stage = STAGES[name]
        out = work / name
        out.mkdir(parents=True)
        ctx = StageContext(cfg=cfg, inputs={i: done[i][0] for i in stage.inputs},
                           manifests={i: {"stats": done[i][1]} for i in stage.inputs},
                           out=out, log=lambda m: None)
        if name == "extract":
            parallel.client(cfg.dask)  # start-up is not extraction time
        with PeakRSS() as rss:
            started = time.perf_counter()
            stats = stage.build(ctx)
            seconds = time.perf_counter() - started
        if name == "shard":
            parallel.shutdown()  # the next measurement starts a cluster of its own
        done[name] = (out, stats)
        docs = stats.get("docs_in", stats.get("docs"))
        mb = stats.get("bytes_in", stats.get("bytes", 0)) / 1e6
        if name in ("tokenizer", "shard"):  # these read the deduplicated text
            docs = figures["dedup"]["docs_out"]
            mb = figures["dedup"]["mb_out"]
        cores = cfg.dask.workers if name in DOCUMENT_STAGES else 1
        figures[name] = {"seconds": round(seconds, 2), "docs": docs, "mb": round(mb, 1),
                         "docs_per_s": round(docs / seconds, 1), "mb_per_s": round(mb / seconds, 2),
                         "docs_per_s_per_core": round(docs / seconds / cores, 1),
                         "peak_rss_mb": round(rss.peak / 1e6), "cores": cores,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=4, help="the larger corpus is this many copies")
    parser.add_argument("--pages", type=int, default=0, help="WCXB pages per copy (0 = all 1,358)")
    parser.add_argument("--config", default="configs/wcxb.toml")
    parser.add_argument("--workdir", default="", help="keep outputs here (default: a temp dir, removed)")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # internal: one scale
    args = parser.parse_args()
    if args.one:  # a fresh process per scale, so no scale inherits another's heap
        cfg = load_config(args.config, {"filter.toxicity": "profanity-check",  # the same scorer at every scale
                                        "dask.local_directory": str(Path(args.workdir) / "dask")})
        corpus = Path(args.workdir) / f"corpus-{args.one}x"
        write_corpus(corpus, args.one, args.pages)
        try:
            print(json.dumps(run_stages(cfg, corpus, Path(args.workdir) / f"run-{args.one}x")))
        finally:
            parallel.shutdown()
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="c2m-scale-"))
    results: dict = {}
    try:
        for copies in (1, args.scale):
            proc = subprocess.run([sys.executable, __file__, "--one", str(copies), "--pages", str(args.pages),
                                   "--config", args.config, "--workdir", str(work)],
                                  stdout=subprocess.PIPE, text=True, check=True)
            figures = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"\n{copies}x: {figures['source']['docs']:,} pages, "
                  f"{figures['source']['mb']:,.0f} MB of HTML", flush=True)
            results[f"{copies}x"] = figures
            print(f"{'stage':10s} {'s':>7s} {'docs/s':>8s} {'MB/s':>6s} {'docs/s/core':>11s} {'peak RSS MB':>11s}")
            for name, f in figures.items():
                print(f"{name:10s} {f['seconds']:7.1f} {f['docs_per_s']:8.1f} {f['mb_per_s']:6.2f} "
                      f"{f['docs_per_s_per_core']:11.1f} {f['peak_rss_mb']:11,d}")
            if copies == 1:
                results["encode_batch_reference"] = encode_reference(
                    work / "run-1x" / "dedup", work / "run-1x" / "tokenizer" / "tokenizer.json")
        # extraction speed-up: the same 1x source partitions, 1 worker vs 2
        speed = {}
        for workers in (1, 2):
            cfg = load_config(args.config, {
                "filter.toxicity": "profanity-check", "dask.local_directory": str(work / "dask"),
                "dask.workers": workers, "source.kind": "path", "source.path": str(work / "corpus-1x")})
            out = work / f"extract-{workers}w"
            shutil.copytree(work / "run-1x" / "source", out / "source")
            ctx = StageContext(cfg=cfg, inputs={"source": out / "source"}, manifests={},
                               out=out / "extract", log=lambda m: None)
            (out / "extract").mkdir()
            parallel.client(cfg.dask)
            started = time.perf_counter()
            STAGES["extract"].build(ctx)
            speed[workers] = time.perf_counter() - started
            parallel.shutdown()
        results["extract_speedup_2_workers"] = round(speed[1] / speed[2], 2)
        results["extract_seconds_by_workers"] = {str(k): round(v, 2) for k, v in speed.items()}
        ref = results["encode_batch_reference"]
        shard = results["1x"]["shard"]
        print(f"\nextract: 1 worker {speed[1]:.1f} s, 2 workers {speed[2]:.1f} s: "
              f"speed-up {speed[1] / speed[2]:.2f}x")
        print(f"shard {shard['docs_per_s']:.1f} docs/s vs raw encode_batch {ref['docs_per_s']:.1f} docs/s: "
              f"{shard['docs_per_s'] / ref['docs_per_s']:.2f}x")
        growth = {s: round(results[f"{args.scale}x"][s]["peak_rss_mb"] / max(results["1x"][s]["peak_rss_mb"], 1), 2)
                  for s in results["1x"]}
        results["peak_rss_growth"] = growth
        print(f"peak RSS {args.scale}x / 1x by stage: {growth}")
        print(json.dumps(results))
    finally:
        parallel.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
