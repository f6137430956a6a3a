"""Main-content extraction quality and speed on WCXB: naive get_text vs ours vs trafilatura.

Word-bag precision / recall / F1 (lowercased \\w+ tokens, multiset overlap) of each
extractor's text against the human-reviewed `ground_truth.main_content`, macro-averaged
over pages, per page type and overall; and documents per CPU-second (time.process_time,
single process, so the figure is per core). The extractors run interleaved page by page,
in rotating order, so a noisy shared machine slows them alike and the speed *ratios*
stay meaningful.

    .venv/bin/python benchmarks/extract_quality.py --pages 300
    .venv/bin/python benchmarks/extract_quality.py            # the whole split

trafilatura (`pip install trafilatura==2.3.1 lxml_html_clean`) is a reference only;
the product code never imports it. The last line printed is a JSON summary.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bs4 import BeautifulSoup  # noqa: E402

from corpus.extract import html_to_text  # noqa: E402

DEFAULT_SPLIT = ROOT.parent / "shared" / "data" / "wcxb-dev"
WORD = re.compile(r"\w+")


def words(text: str) -> Counter:
    return Counter(WORD.findall(text.lower()))


def prf(predicted: str, truth: Counter) -> tuple[float, float, float]:
    p = words(predicted)
    common = sum((p & truth).values())
    if not common:
        return 0.0, 0.0, 0.0
    precision, recall = common / sum(p.values()), common / sum(truth.values())
    return precision, recall, 2 * precision * recall / (precision + recall)


def load_pages(split: Path, n: int | None) -> list[dict]:
    """Pages with ground truth; with n, a sample stratified by page type (each type in
    proportion, spread evenly over the split)."""
    index = split / "index.jsonl"
    if not index.exists():
        sys.exit(f"WCXB split not found: {index}")
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    pages = []
    for row in rows:
        gt_path = split / "ground-truth" / f"{row['id']}.json"
        if not gt_path.exists():
            continue
        main = json.loads(gt_path.read_text())["ground_truth"].get("main_content")
        if main:
            pages.append({"id": row["id"], "type": row.get("page_type") or "unknown",
                          "truth": main})
    if n is not None and n < len(pages):
        by_type: dict[str, list[dict]] = defaultdict(list)
        for page in pages:
            by_type[page["type"]].append(page)
        chosen = []
        for type_pages in by_type.values():
            k = max(1, round(n * len(type_pages) / len(pages)))
            step = len(type_pages) / k
            chosen += [type_pages[int(i * step)] for i in range(k)]
        if len(chosen) < n:  # rounding left some out: top up, spread over the rest
            ids = {p["id"] for p in chosen}
            rest = [p for p in pages if p["id"] not in ids]
            step = len(rest) / (n - len(chosen))
            chosen += [rest[int(i * step)] for i in range(n - len(chosen))]
        pages = sorted(chosen, key=lambda p: p["id"])[:n]
    for page in pages:
        page["html"] = gzip.decompress((split / "html" / f"{page['id']}.html.gz").read_bytes())
    return pages


def naive(html: bytes) -> str:
    return BeautifulSoup(html, "lxml").get_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=None,
                        help="number of pages, stratified by page type (default: all)")
    parser.add_argument("--split", type=Path, default=DEFAULT_SPLIT,
                        help=f"WCXB split folder (default: {DEFAULT_SPLIT})")
    parser.add_argument("--no-trafilatura", action="store_true",
                        help="leave trafilatura out (it is not installed by the project)")
    parser.add_argument("--worst", type=int, default=0,
                        help="also list the N pages where ours trails trafilatura most "
                             "(lowest F1 without trafilatura)")
    args = parser.parse_args(argv)

    extractors = {"naive": naive, "ours": html_to_text}
    if not args.no_trafilatura:
        try:
            import trafilatura
        except ImportError as exc:
            sys.exit(f"trafilatura unavailable ({exc}); install trafilatura==2.3.1 "
                     "lxml_html_clean or pass --no-trafilatura")
        extractors["trafilatura"] = lambda html: trafilatura.extract(html) or ""
    warnings.filterwarnings("ignore")

    pages = load_pages(args.split, args.pages)
    names = list(extractors)
    cpu = dict.fromkeys(names, 0.0)
    scores: dict[str, list[tuple[str, str, float, float, float]]] = {n: [] for n in names}
    for i, page in enumerate(pages):
        truth = words(page["truth"])
        order = names[i % len(names):] + names[:i % len(names)]  # rotate who goes first
        for name in order:
            t0 = time.process_time()
            try:
                text = extractors[name](page["html"])
            except Exception as exc:  # noqa: BLE001 - a crash scores 0, the run goes on
                print(f"{name} failed on {page['id']}: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
                text = ""
            cpu[name] += time.process_time() - t0
            scores[name].append((page["id"], page["type"], *prf(text, truth)))

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else 0.0

    types = sorted({p["type"] for p in pages})
    summary: dict = {"pages": len(pages), "extractors": {}}
    header = f"{'page type':<14}{'pages':>6}" + "".join(f"{n + ' P/R/F1':>26}" for n in names)
    print(header)
    print("-" * len(header))
    for group in types + ["ALL"]:
        line = f"{group:<14}"
        for j, name in enumerate(names):
            rows = [s for s in scores[name] if group == "ALL" or s[1] == group]
            if j == 0:
                line += f"{len(rows):>6}"
            p, r, f = mean(s[2] for s in rows), mean(s[3] for s in rows), mean(s[4] for s in rows)
            line += f"{p:>10.3f}{r:>7.3f}{f:>7.3f}  "
            ex = summary["extractors"].setdefault(name, {"per_type": {}})
            if group == "ALL":
                ex.update(precision=round(p, 4), recall=round(r, 4), f1=round(f, 4))
            else:
                ex["per_type"][group] = {"pages": len(rows), "f1": round(f, 4)}
        print(line)
    print()
    for name in names:
        dps = len(pages) / cpu[name] if cpu[name] else float("inf")
        summary["extractors"][name]["cpu_s"] = round(cpu[name], 2)
        summary["extractors"][name]["docs_per_cpu_s"] = round(dps, 1)
        print(f"{name:<12} {dps:8.1f} docs per CPU-second ({cpu[name]:.1f} CPU-s)")
    if "trafilatura" in names:
        ref = summary["extractors"]["trafilatura"]
        ours = summary["extractors"]["ours"]
        summary["ours_vs_trafilatura"] = {
            "f1_delta": round(ours["f1"] - ref["f1"], 4),
            "speed_ratio": round(ours["docs_per_cpu_s"] / ref["docs_per_cpu_s"], 2)}
        print(f"ours vs trafilatura: F1 {summary['ours_vs_trafilatura']['f1_delta']:+.4f}, "
              f"speed x{summary['ours_vs_trafilatura']['speed_ratio']}")
    if args.worst:
        print(f"\nworst {args.worst} pages for ours (id, type, P, R, F1"
              + (", trafilatura F1)" if "trafilatura" in names else ")"))
        traf = {s[0]: s[4] for s in scores.get("trafilatura", [])}
        for s in sorted(scores["ours"], key=lambda s: s[4] - traf.get(s[0], 0))[:args.worst]:
            print(f"  {s[0]} {s[1]:<14} {s[2]:.2f} {s[3]:.2f} {s[4]:.2f} {traf.get(s[0], '')}")
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
