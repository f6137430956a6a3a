"""Peak memory of the filter stage alone, on a fresh Dask cluster, at growing corpus sizes.

benchmarks/scale.py runs every data stage on one cluster, so a stage's peak there includes
what earlier stages left in the workers' heaps. This isolates the filter stage (quality
rules, language ID, toxicity): its input is WCXB's ground-truth main text, repeated
--copies times with distinct ids, in partitions of --docs-per-partition documents.
Peak RSS is sampled every 50 ms, for this (driver) process and its worker processes.

    .venv/bin/python benchmarks/filter_memory.py --copies 1 4 8
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUND_TRUTH = ROOT.parent / "shared" / "data" / "wcxb-dev" / "ground-truth"


def measure(copies: int, docs_per_partition: int) -> dict:
    import psutil

    from corpus.documents import write_docs
    from flows import parallel
    from flows.config import load_config
    from flows.stages import STAGES, StageContext

    texts = [t for p in sorted(GROUND_TRUTH.glob("*.json"))
             if (t := json.loads(p.read_text())["ground_truth"].get("main_content"))]
    work = Path(tempfile.mkdtemp(prefix="filter-memory-"))
    folder = work / "holdout" / "docs"  # the filter stage reads the holdout stage's documents
    folder.mkdir(parents=True)
    batch, n_parts = [], 0
    for copy in range(copies):
        for i, text in enumerate(texts):
            batch.append({"id": f"{copy}-{i}", "source": f"wcxb/{i}", "text": text, "n_chars": len(text)})
            if len(batch) == docs_per_partition:
                write_docs(batch, folder / f"part-{n_parts:05d}.parquet")
                n_parts, batch = n_parts + 1, []
    if batch:
        write_docs(batch, folder / f"part-{n_parts:05d}.parquet")
        n_parts += 1
    del batch, texts

    cfg = load_config(str(ROOT / "configs" / "wcxb.toml"),
                      {"dask.workers": 2, "dask.local_directory": str(work / "dask")})
    parallel.client(cfg.dask)  # started before measuring: start-up is not the stage
    me = psutil.Process()
    peak = {"driver": 0, "workers": 0, "total": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            driver = me.memory_info().rss
            workers = 0
            for child in me.children(recursive=True):
                try:
                    workers += child.memory_info().rss
                except psutil.Error:
                    pass
            for key, value in (("driver", driver), ("workers", workers), ("total", driver + workers)):
                peak[key] = max(peak[key], value)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = work / "filter"
    out.mkdir()
    ctx = StageContext(cfg=cfg, inputs={"holdout": work / "holdout"}, manifests={}, out=out,
                       log=lambda m: None)
    started = time.perf_counter()
    stats = STAGES["filter"].build(ctx)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    parallel.shutdown()
    return {"copies": copies, "partitions": n_parts, "docs": stats["docs_in"], "kept": stats["docs_out"],
            "seconds": round(seconds, 1), **{f"peak_{k}_mb": round(v / 1e6) for k, v in peak.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, nargs="+", default=[1, 4, 8], help="corpus sizes, in copies of WCXB")
    ap.add_argument("--docs-per-partition", type=int, default=64)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.docs_per_partition)))
        return
    results = []
    for copies in args.copies:  # a fresh process per size: nothing carries over
        proc = subprocess.run([sys.executable, __file__, "--one", str(copies),
                               "--docs-per-partition", str(args.docs_per_partition)],
                              capture_output=True, text=True, check=True, cwd=ROOT)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{r['copies']}x: {r['docs']:,} docs in {r['partitions']} partitions, {r['seconds']} s; "
              f"peak RSS driver {r['peak_driver_mb']:,} MB, workers {r['peak_workers_mb']:,} MB, "
              f"total {r['peak_total_mb']:,} MB")
    base = results[0]["peak_total_mb"]
    growth = {f"{r['copies']}x": round(r["peak_total_mb"] / base, 3) for r in results}
    print(f"peak total RSS relative to {results[0]['copies']}x: {growth}")
    print(json.dumps({"runs": results, "peak_growth": growth}))


if __name__ == "__main__":
    main()
