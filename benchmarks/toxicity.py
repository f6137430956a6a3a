"""Toxicity scorers against labelled tweets and ordinary web pages.

For each scorer that can run here (profanity-check always; detoxify when its weights are
on disk, see `c2m fetch-detoxify`):
- precision and recall on ../shared/data/toxicity-davidson (positive = hate speech or
  offensive, negative = neither) at the configured threshold, and over a threshold sweep;
- the share of ordinary WCXB pages (extracted and normalised as the pipeline does) that
  the filter would drop: its false positives on real documents;
- documents per second.
With --int8 and detoxify present: agreement of int8 with fp32 (max |Δscore|, decisions
that flip at the threshold) on the same texts, before anyone turns toxicity_int8 on.
Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from corpus.extract import html_to_text  # noqa: E402
from corpus.normalize import normalize_text  # noqa: E402
from corpus.toxicity import ToxicityModelMissing, load_scorer  # noqa: E402
from flows.config import load_config  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def davidson(n: int, seed: int) -> tuple[list[str], list[bool]]:
    path = DATA / "toxicity-davidson" / "labeled_data.csv"
    if not path.is_file():
        sys.exit(f"{path} is missing: put ../shared/data beside the checkout")
    with open(path, newline="") as f:
        rows = [(r["tweet"], r["class"] in ("0", "1")) for r in csv.DictReader(f)]
    random.Random(seed).shuffle(rows)
    rows = rows[:n] if n else rows
    return [t for t, _ in rows], [y for _, y in rows]


def wcxb_texts(n: int, seed: int) -> list[str]:
    pages = sorted((DATA / "wcxb-dev" / "html").glob("*.html.gz"))
    if not pages:
        sys.exit(f"{DATA / 'wcxb-dev'} is missing: put ../shared/data beside the checkout")
    random.Random(seed).shuffle(pages)
    texts = []
    for page in pages[:n] if n else pages:
        text, _ = normalize_text(html_to_text(gzip.decompress(page.read_bytes())))
        if text:
            texts.append(text)
    return texts


def precision_recall(scores: list[float], labels: list[bool], threshold: float) -> tuple[float, float]:
    flagged = [y for s, y in zip(scores, labels) if s >= threshold]
    tp = sum(flagged)
    positives = sum(labels)
    return (tp / len(flagged) if flagged else 0.0), (tp / positives if positives else 0.0)


def timed(scorer, texts: list[str]) -> tuple[list[float], float]:
    started = time.process_time()
    scores = scorer.score(texts)
    return scores, len(texts) / max(time.process_time() - started, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.toml", help="threshold and scorer settings from here")
    parser.add_argument("--tweets", type=int, default=5000, help="Davidson tweets to score (0 = all 24,783)")
    parser.add_argument("--pages", type=int, default=400, help="WCXB pages to score (0 = all 1,358)")
    parser.add_argument("--int8", action="store_true", help="also measure detoxify int8 against fp32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    f = load_config(args.config).filter
    threshold = f.toxicity_threshold
    common = {k: v for k, v in f.scorer_args().items() if k != "int8"}
    scorers = {"profanity-check": load_scorer("profanity-check", **common)}
    try:
        scorers["detoxify"] = load_scorer("detoxify", **common)
        if args.int8:
            scorers["detoxify-int8"] = load_scorer("detoxify", **common, int8=True)
    except ToxicityModelMissing as exc:
        print(f"detoxify not measured: its weights are not here.\n{exc}\n", file=sys.stderr)

    tweets, labels = davidson(args.tweets, args.seed)
    pages = wcxb_texts(args.pages, args.seed)
    print(f"{len(tweets):,} tweets ({sum(labels):,} hate/offensive), {len(pages):,} WCXB pages, "
          f"threshold {threshold}\n")
    print(f"{'scorer':16s} {'precision':>9s} {'recall':>7s} {'pages dropped':>14s} "
          f"{'tweets/s':>9s} {'pages/s':>8s}")
    results, raw = {}, {}
    for name, scorer in scorers.items():
        tweet_scores, tweets_per_s = timed(scorer, tweets)
        page_scores, pages_per_s = timed(scorer, pages)
        raw[name] = tweet_scores + page_scores
        p, r = precision_recall(tweet_scores, labels, threshold)
        dropped = sum(s >= threshold for s in page_scores) / len(pages)
        sweep = {t: dict(zip(("precision", "recall"), precision_recall(tweet_scores, labels, t)),
                         pages_dropped=sum(s >= t for s in page_scores) / len(pages))
                 for t in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)}
        results[name] = {"precision": p, "recall": r, "pages_dropped": dropped,
                         "tweets_per_cpu_s": tweets_per_s, "pages_per_cpu_s": pages_per_s,
                         "model": scorer.model, "sweep": sweep}
        print(f"{name:16s} {p:9.3f} {r:7.3f} {dropped:14.3%} {tweets_per_s:9.0f} {pages_per_s:8.1f}")
    for name, res in results.items():
        print(f"\n{name} by threshold: precision / recall / WCXB pages dropped")
        for t, v in res["sweep"].items():
            print(f"  {t:4.2f}  {v['precision']:.3f} / {v['recall']:.3f} / {v['pages_dropped']:.3%}")
    if "detoxify-int8" in raw:
        diffs = [abs(a - b) for a, b in zip(raw["detoxify"], raw["detoxify-int8"])]
        flips = sum((a >= threshold) != (b >= threshold) for a, b in zip(raw["detoxify"], raw["detoxify-int8"]))
        results["int8_agreement"] = {"max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
                                     "decision_flips": flips, "texts": len(diffs)}
        print(f"\nint8 vs fp32: max |diff| {max(diffs):.4f}, decisions flipped {flips}/{len(diffs)}")
    print(json.dumps({"threshold": threshold, "tweets": len(tweets), "pages": len(pages), **results}))


if __name__ == "__main__":
    main()
