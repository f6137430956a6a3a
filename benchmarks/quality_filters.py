"""Heuristic quality filters (corpus.quality): drop rates per reason and throughput.

Two corpora, each extracted and normalised the way the pipeline does it
(`corpus.extract.html_to_text`, then `corpus.normalize.normalize_text`):
  wcxb   WCXB dev pages (../shared/data/wcxb-dev/html/*.html.gz), real web pages of
         several page types (article, forum, product, ...);
  pydoc  the stdlib pydoc corpus (`corpus.sources.render_pydoc()`), code documentation.

For each corpus it reports
  pipeline     the step with the config (defaults + --set): kept share, and the share
               dropped under each reason (the first failing rule, in evaluation order);
  group_alone  each group run on its own (the others disabled): share dropped per reason;
  independent  per rule, the share of documents that fail it whatever the other rules
               say, every rule on (optional ones included, marked "optional");
  sensitivity  fineweb_dup_line_chars at several thresholds (its default 0.01 comes from
               the released FineWeb filter, 0.1 from the FineWeb paper's text);
  by_page_type (wcxb) kept share per WCXB page type;
  throughput   docs/s and MB/s (UTF-8 text) of the step over the whole corpus, best of
               --repeat runs; "step" stops at the first failing rule, "all_rules"
               evaluates every rule of every document (the cost of a corpus that passes).

Reference (context, not a target): the FineWeb paper/blog (Penedo et al. 2024, "The
FineWeb Datasets", arXiv:2406.17557, and the blog post "FineWeb: decanting the web for
the finest text data at scale") report the share of *tokens* its three custom filters
removed from Common Crawl text that had already passed Gopher and C4 filtering, after
trafilatura extraction (which drops repeated page elements itself): line punctuation
about 10%, duplicated-line characters about 12%, short lines about 4%, about 22% in all.

    .venv/bin/python benchmarks/quality_filters.py                 # both corpora
    .venv/bin/python benchmarks/quality_filters.py --wcxb-limit 200 --no-pydoc
    .venv/bin/python benchmarks/quality_filters.py --set fineweb.max_dup_line_chars=0.1

The last line printed is a JSON summary.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, replace
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corpus.documents import Rejected  # noqa: E402
from corpus.extract import html_to_text  # noqa: E402
from corpus.normalize import normalize_text  # noqa: E402
from corpus.quality import (GROUP_ORDER, GROUPS, REASONS, QualityConfig,  # noqa: E402
                            quality_config, quality_failures, quality_filter, quality_values)
from flows.config import load_config  # noqa: E402

DEFAULT_WCXB = ROOT.parent / "shared" / "data" / "wcxb-dev"
SENSITIVITY = (0.01, 0.02, 0.05, 0.1, 0.2)


def _text_of(html: bytes) -> str:
    text, _ = normalize_text(html_to_text(html))
    return text


def _wcxb_page(path: str) -> str:
    return _text_of(gzip.decompress(Path(path).read_bytes()))


def load_wcxb(split: Path, limit: int, workers: int) -> list[dict]:
    index = split / "index.jsonl"
    if not index.exists():
        sys.exit(f"WCXB split not found: {index}")
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if (split / "html" / f"{r['id']}.html.gz").exists()]
    if limit:
        rows = rows[:limit]
    paths = [str(split / "html" / f"{r['id']}.html.gz") for r in rows]
    with ProcessPoolExecutor(workers) as pool:
        texts = list(pool.map(_wcxb_page, paths, chunksize=8))
    return [{"id": r["id"], "page_type": r.get("page_type"), "text": t}
            for r, t in zip(rows, texts)]


def load_pydoc(limit: int, workers: int) -> list[dict]:
    from corpus.sources import render_pydoc
    docs, _skipped = render_pydoc(limit=limit or None, workers=workers)
    with ProcessPoolExecutor(workers) as pool:
        texts = list(pool.map(_text_of, [d["html"] for d in docs], chunksize=4))
    return [{"id": d["id"], "text": t} for d, t in zip(docs, texts)]


def _share(counter: Counter, n: int) -> dict[str, float]:
    return {k: round(v / n, 4) for k, v in counter.most_common()} if n else {}


def _with(config: QualityConfig, **groups: dict) -> QualityConfig:
    """`config` with some settings of every group replaced: _with(c, enabled=..., skip=[])."""
    return QualityConfig(**{g: replace(getattr(config, g), **{k: v(g) if callable(v) else v
                                                              for k, v in groups.items()})
                            for g in GROUPS})


def _throughput(docs: list[dict], config: QualityConfig, repeat: int) -> dict:
    n_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    every_rule = _with(config, enabled=True, skip=[])
    best_step = best_all = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _item in quality_filter(docs, config=config):
            pass
        best_step = min(best_step, time.perf_counter() - started)
        started = time.perf_counter()
        for d in docs:
            quality_failures(d["text"], every_rule)
        best_all = min(best_all, time.perf_counter() - started)

    def rates(seconds: float) -> dict:
        return {"seconds": round(seconds, 3), "docs_per_s": round(len(docs) / seconds, 1),
                "mb_per_s": round(n_bytes / 1e6 / seconds, 2)}
    return {"step": rates(best_step), "all_rules": rates(best_all)}


def evaluate(name: str, docs: list[dict], config: QualityConfig, repeat: int) -> dict:
    n = len(docs)
    optional = {r for g in GROUPS for r in getattr(QualityConfig(), g).skip}

    reasons: Counter[str] = Counter()
    kept_by_type: Counter[str] = Counter()
    n_by_type: Counter[str] = Counter()
    for doc, item in zip(docs, quality_filter(docs, config=config)):
        if isinstance(item, Rejected):
            reasons[item.reason] += 1
        else:
            kept_by_type[doc.get("page_type")] += 1
        n_by_type[doc.get("page_type")] += 1
    kept = n - sum(reasons.values())

    group_alone = {}
    for group in GROUP_ORDER:
        alone = _with(config, enabled=lambda g: g == group)
        dropped = Counter(item.reason for item in quality_filter(docs, config=alone)
                          if isinstance(item, Rejected))
        group_alone[group] = {"dropped": round(sum(dropped.values()) / n, 4) if n else 0.0,
                              "by_reason": _share(dropped, n)}

    every_rule = _with(config, enabled=True, skip=[])
    fineweb_only = quality_config({g: {"enabled": g == "fineweb"} for g in GROUPS})
    independent: Counter[str] = Counter()
    dup_chars = []
    for doc in docs:
        independent.update(reason for reason, _ in quality_failures(doc["text"], every_rule))
        dup_chars.append(quality_values(doc["text"], fineweb_only)["fineweb_dup_line_chars"])
    ordered = [r for g in GROUP_ORDER for r in REASONS[g]]
    result = {
        "corpus": name,
        "docs": n,
        "mb": round(sum(len(d["text"].encode("utf-8")) for d in docs) / 1e6, 2),
        "pipeline": {"kept": round(kept / n, 4) if n else 0.0,
                     "dropped_by_reason": _share(reasons, n),
                     "dropped_by_group": {g: round(sum(reasons[r] for r in REASONS[g]) / n, 4)
                                          for g in GROUP_ORDER} if n else {}},
        "group_alone": group_alone,
        "independent": {r + (" (optional)" if r in optional else ""):
                        round(independent[r] / n, 4) for r in ordered} if n else {},
        "sensitivity_fineweb_dup_line_chars": {
            str(t): round(sum(v > t for v in dup_chars) / n, 4) for t in SENSITIVITY} if n else {},
        "throughput": _throughput(docs, config, repeat),
    }
    if any(d.get("page_type") for d in docs):
        result["by_page_type_kept"] = {
            t: f"{kept_by_type[t]}/{n_by_type[t]}" for t, _ in n_by_type.most_common()}
    return result


def _print_report(r: dict) -> None:
    print(f"\n== {r['corpus']}: {r['docs']} docs, {r['mb']} MB; kept {r['pipeline']['kept']:.1%}")
    print("  pipeline, dropped by first failing rule:")
    for reason, share in r["pipeline"]["dropped_by_reason"].items():
        print(f"    {reason:32s} {share:7.2%}")
    print("  each group alone:")
    for group, g in r["group_alone"].items():
        detail = ", ".join(f"{k} {v:.1%}" for k, v in g["by_reason"].items())
        print(f"    {group:18s} {g['dropped']:7.2%}  ({detail})")
    print("  independent failure rate per rule (every rule on):")
    for reason, share in r["independent"].items():
        if share:
            print(f"    {reason:43s} {share:7.2%}")
    print("  fineweb_dup_line_chars dropped at threshold:",
          ", ".join(f"{t}: {v:.1%}" for t, v in r["sensitivity_fineweb_dup_line_chars"].items()))
    if "by_page_type_kept" in r:
        print("  kept by page type:", r["by_page_type_kept"])
    t = r["throughput"]
    print(f"  throughput: step {t['step']['docs_per_s']} docs/s {t['step']['mb_per_s']} MB/s; "
          f"all rules {t['all_rules']['docs_per_s']} docs/s {t['all_rules']['mb_per_s']} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wcxb", type=Path, default=DEFAULT_WCXB,
                        help="WCXB split folder (index.jsonl + html/)")
    parser.add_argument("--wcxb-limit", type=int, default=0, help="first N pages (0 = all)")
    parser.add_argument("--pydoc-limit", type=int, default=0, help="first N modules (0 = all)")
    parser.add_argument("--no-wcxb", action="store_true")
    parser.add_argument("--no-pydoc", action="store_true")
    parser.add_argument("--workers", type=int, default=2,
                        help="processes for extraction (the filters run in one process)")
    parser.add_argument("--repeat", type=int, default=3, help="timing runs (best is kept)")
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE",
                        help="override a quality setting, e.g. fineweb.max_dup_line_chars=0.1")
    args = parser.parse_args()
    # the run config's [quality] section with --set laid over it: checked like a run's
    sets = dict(item.partition("=")[::2] for item in args.set)
    config = load_config(None, {f"quality.{k}": v for k, v in sets.items()}).quality

    results = []
    load_seconds = {}
    for name, wanted, load in (
            ("wcxb", not args.no_wcxb, lambda: load_wcxb(args.wcxb, args.wcxb_limit, args.workers)),
            ("pydoc", not args.no_pydoc, lambda: load_pydoc(args.pydoc_limit, args.workers))):
        if not wanted:
            continue
        started = time.perf_counter()
        docs = [d for d in load() if d["text"].strip()]  # extract rejects empty pages first
        load_seconds[name] = round(time.perf_counter() - started, 1)
        print(f"{name}: {len(docs)} documents extracted in {load_seconds[name]} s", flush=True)
        results.append(evaluate(name, docs, config, args.repeat))
        _print_report(results[-1])
    print(json.dumps({"config": asdict(config), "load_seconds": load_seconds,
                      "results": results}))


if __name__ == "__main__":
    main()
