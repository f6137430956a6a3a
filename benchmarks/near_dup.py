"""Near-duplicate detection: corpus.dedup's MinHash + LSH vs datasketch, on WCXB pages.

Builds a labelled set of near-duplicate pairs from real text: the main text of WCXB dev
pages (`corpus.extract.html_to_text`) plus synthetic edits of each page (words deleted,
inserted or replaced, scattered or in blocks) tuned to land at shingle Jaccard 0.5-0.97;
with --pydoc N, also the pydoc pages of N standard-library modules rendered here.
Every figure is measured against the exact Jaccard of the word 5-gram shingle sets
(the same normalisation as corpus.dedup), not against the labels alone:

  recall     pairs (page, variant) and (variant, variant) with exact Jaccard >= 0.8 that
             end in one cluster, overall and by Jaccard bin;
  precision  reported (dropped, kept) pairs whose exact Jaccard >= --precision-at (0.7),
             also for pairs that join two different pages (real duplication, unlabelled);
  docs/s     end to end (normalise, shingle, MinHash, LSH, clusters) for ours and for
             datasketch's MinHash + MinHashLSH(num_perm=bands*rows, params=(bands, rows))
             on the same shingle sets, run alternately --repeat times in this one
             process (best of each), so a busy machine slows both alike.

    .venv/bin/pip install datasketch      # the reference only; corpus/ never imports it
    .venv/bin/python benchmarks/near_dup.py --pages 300 --variants 2

The last line printed is a JSON summary.
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corpus.dedup import near_duplicates, normalize_for_shingles  # noqa: E402
from corpus.extract import html_to_text  # noqa: E402

DEFAULT_SPLIT = ROOT.parent / "shared" / "data" / "wcxb-dev"
BINS = [(0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 0.95),
        (0.95, 1.01)]


def load_texts(split: Path, n: int, min_words: int) -> list[tuple[str, str]]:
    """(page id, main text) for up to n pages spread evenly over the split."""
    index = split / "index.jsonl"
    if not index.exists():
        sys.exit(f"WCXB split not found: {index}")
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    step = max(1, len(rows) // max(n, 1))
    out = []
    for row in rows[::step]:
        path = split / "html" / f"{row['id']}.html.gz"
        if not path.exists():
            continue
        text = html_to_text(gzip.decompress(path.read_bytes()))
        if len(normalize_for_shingles(text)) >= min_words:
            out.append((f"wcxb-{row['id']}", text))
        if len(out) >= n:
            break
    return out


def shingles(text: str, n: int = 5) -> set[str]:
    words = normalize_for_shingles(text)
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def edit(text: str, target: float, rng: random.Random, vocab: list[str]) -> str:
    """A copy of `text` with about the word edits that give shingle Jaccard `target`."""
    words = text.split()
    n = len(words)
    kept_shingles = 2 * target / (1 + target)          # J = s / (2 - s)
    if rng.random() < 0.6:                             # scattered single-word edits
        n_edits = max(1, round(n * (1 - kept_shingles ** (1 / 5))))
        for _ in range(n_edits):
            i = rng.randrange(len(words))
            op = rng.choice("dir")
            if op == "d" and len(words) > 5:
                del words[i]
            elif op == "i":
                words.insert(i, rng.choice(vocab))
            else:
                words[i] = rng.choice(vocab)
    else:                                              # a few blocks replaced / dropped
        n_blocks = rng.randint(1, 4)
        lost = n * (1 - kept_shingles)
        length = max(1, round(lost / n_blocks) - 4)
        for _ in range(n_blocks):
            i = rng.randrange(max(1, len(words) - length))
            block = [rng.choice(vocab) for _ in range(length)] if rng.random() < 0.5 else []
            words[i:i + length] = block
    return " ".join(words)


class UnionFind:
    def __init__(self, keys):
        self.parent = {k: k for k in keys}
        self.order = {k: i for i, k in enumerate(keys)}

    def find(self, k):
        while self.parent[k] != k:
            self.parent[k] = self.parent[self.parent[k]]
            k = self.parent[k]
        return k

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if self.order[ra] > self.order[rb]:
                ra, rb = rb, ra
            self.parent[rb] = ra


def run_datasketch(docs: list[tuple[str, str]], bands: int, rows: int, seed: int
                   ) -> list[tuple[str, str, float]]:
    from datasketch import MinHash, MinHashLSH

    num_perm = bands * rows
    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    sigs = {}
    for id_, text in docs:
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch([s.encode("utf-8") for s in shingles(text)])
        sigs[id_] = m
        lsh.insert(id_, m)
    uf = UnionFind([id_ for id_, _ in docs])
    for id_, m in sigs.items():
        for other in lsh.query(m):
            uf.union(id_, other)
    return [(id_, uf.find(id_), sigs[id_].jaccard(sigs[uf.find(id_)]))
            for id_, _ in docs if uf.find(id_) != id_]


def evaluate(found: list[tuple[str, str, float]], pairs: list[tuple[str, str, float]],
             sh: dict[str, set], recall_at: float, precision_at: float) -> dict:
    kept = {d: k for d, k, _ in found}
    root = lambda x: kept.get(x, x)  # noqa: E731
    same = [(j, root(a) == root(b)) for a, b, j in pairs]
    high = [ok for j, ok in same if j >= recall_at]
    by_bin = {}
    for lo, hi in BINS:
        hits = [ok for j, ok in same if lo <= j < hi]
        by_bin[f"{lo:.2f}-{min(hi, 1):.2f}"] = (sum(hits), len(hits))
    exact = [jaccard(sh[d], sh[k]) for d, k, _ in found]
    good = sum(j >= precision_at for j in exact)
    # pairs of two different WCXB pages (or their variants): real, unlabelled duplication
    cross = [j for (d, k, _), j in zip(found, exact) if d.split("-v")[0] != k.split("-v")[0]]
    err = [abs(s - j) for (_, _, s), j in zip(found, exact)]
    return {"recall": sum(high) / len(high) if high else None, "recall_pairs": len(high),
            "precision": good / len(found) if found else None, "reported": len(found),
            "by_bin": by_bin, "mean_abs_sim_error": sum(err) / len(err) if err else None,
            "cross_page": len(cross), "cross_page_precision":
                sum(j >= precision_at for j in cross) / len(cross) if cross else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", type=Path, default=DEFAULT_SPLIT, help="WCXB split folder")
    ap.add_argument("--pages", type=int, default=300, help="WCXB pages to use")
    ap.add_argument("--variants", type=int, default=2, help="edited copies per page")
    ap.add_argument("--min-words", type=int, default=50, help="skip shorter pages")
    ap.add_argument("--pydoc", type=int, default=0, metavar="N",
                    help="add the pydoc pages of N standard-library modules, rendered here "
                         "(unlabelled; they share boilerplate, so they test precision)")
    ap.add_argument("--bands", type=int, default=14)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--recall-at", type=float, default=0.8,
                    help="recall over labelled pairs with exact Jaccard >= this")
    ap.add_argument("--precision-at", type=float, default=0.7,
                    help="a reported pair is right when its exact Jaccard >= this")
    ap.add_argument("--verify", type=float, default=0.7,
                    help="also time ours with threshold=VERIFY (a bucket-mate joins a cluster "
                         "only at estimated similarity >= VERIFY); 0: skip")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of each, alternating")
    ap.add_argument("--no-datasketch", action="store_true", help="time ours only")
    args = ap.parse_args()

    t0 = time.perf_counter()
    pages = load_texts(args.split, args.pages, args.min_words)
    rng = random.Random(args.seed)
    vocab = sorted({w for _, t in pages for w in t.split()})
    docs, pairs_of = list(pages), []
    for id_, text in pages:
        group = [id_]
        for v in range(args.variants):
            vid = f"{id_}-v{v}"
            docs.append((vid, edit(text, rng.uniform(0.5, 0.97), rng, vocab)))
            group.append(vid)
        pairs_of.append(group)
    if args.pydoc:
        from corpus.sources import render_pydoc
        rendered, _ = render_pydoc(limit=args.pydoc, workers=1)
        docs += [(f"pydoc-{d['source'].split(':', 1)[1]}", html_to_text(d["html"]))
                 for d in rendered]
    rng.shuffle(docs)                     # variants are not always after their page
    sh = {id_: shingles(text) for id_, text in docs}
    pairs = [(g[i], g[j], jaccard(sh[g[i]], sh[g[j]]))
             for g in pairs_of for i in range(len(g)) for j in range(i + 1, len(g))]
    n_words = sum(len(normalize_for_shingles(t)) for _, t in docs)
    print(f"{len(pages)} pages + {len(pages) * args.variants} variants + "
          f"{len(docs) - len(pages) * (1 + args.variants)} pydoc pages = {len(docs)} docs, "
          f"{n_words / len(docs):.0f} words/doc; {len(pairs)} labelled pairs, "
          f"{sum(j >= args.recall_at for *_, j in pairs)} at Jaccard >= {args.recall_at} "
          f"(prepared in {time.perf_counter() - t0:.1f} s)")

    cfg = {"bands": args.bands, "rows": args.rows, "seed": args.seed}
    methods = {"ours": lambda: near_duplicates(docs, **cfg)}
    if args.verify:
        methods[f"ours@{args.verify:g}"] = lambda: near_duplicates(docs, **cfg,
                                                                  threshold=args.verify)
    if not args.no_datasketch:
        methods["datasketch"] = lambda: run_datasketch(docs, args.bands, args.rows, args.seed)
    best: dict[str, dict] = {}
    found: dict[str, list] = {}
    for _ in range(args.repeat):
        for name, fn in methods.items():
            w, c = time.perf_counter(), time.process_time()
            found[name] = fn()
            w, c = time.perf_counter() - w, time.process_time() - c
            b = best.setdefault(name, {"wall_s": w, "cpu_s": c})
            b["wall_s"], b["cpu_s"] = min(b["wall_s"], w), min(b["cpu_s"], c)

    results = {}
    for name in methods:
        r = evaluate(found[name], pairs, sh, args.recall_at, args.precision_at)
        r["docs_per_s"] = len(docs) / best[name]["wall_s"]
        r["docs_per_cpu_s"] = len(docs) / max(best[name]["cpu_s"], 1e-9)
        results[name] = r

    print(f"\nbands x rows = {args.bands} x {args.rows}; best of {args.repeat} alternating runs")
    print(f"{'':12}{'recall':>8}{'precision':>11}{'reported':>10}{'|est-J|':>9}"
          f"{'docs/s':>9}{'docs/cpu-s':>12}")
    for name, r in results.items():
        print(f"{name:12}{r['recall']:8.3f}{r['precision'] or 0:11.3f}{r['reported']:10d}"
              f"{r['mean_abs_sim_error'] or 0:9.3f}{r['docs_per_s']:9.0f}{r['docs_per_cpu_s']:12.0f}")
    for name, r in results.items():
        if r["cross_page"]:
            print(f"{name}: {r['cross_page']} reported pairs join two different pages, "
                  f"{r['cross_page_precision']:.2f} of them at exact Jaccard >= {args.precision_at}")
    print("\nrecall by exact Jaccard of labelled pairs (found / pairs)")
    print(f"{'bin':12}" + "".join(f"{n:>14}" for n in results))
    for b in results["ours"]["by_bin"]:
        print(f"{b:12}" + "".join(f"{r['by_bin'][b][0]:>8}/{r['by_bin'][b][1]:<5}"
                                  for r in results.values()))
    summary = {"docs": len(docs), "pages": len(pages), "labelled_pairs": len(pairs),
               "bands": args.bands, "rows": args.rows, "recall_at": args.recall_at,
               "precision_at": args.precision_at}
    for name, r in results.items():
        summary[name] = {k: (round(v, 4) if isinstance(v, float) else v)
                         for k, v in r.items() if k != "by_bin"}
    if "datasketch" in results:
        summary["speedup_wall"] = round(results["ours"]["docs_per_s"]
                                        / results["datasketch"]["docs_per_s"], 2)
        summary["speedup_cpu"] = round(results["ours"]["docs_per_cpu_s"]
                                       / results["datasketch"]["docs_per_cpu_s"], 2)
        print(f"\nspeed-up ours / datasketch: {summary['speedup_wall']}x wall, "
              f"{summary['speedup_cpu']}x CPU")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
