"""Near-duplicate removal: MinHash signatures, LSH buckets, union-find clusters, the step."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from corpus import dedup
from corpus.dedup import (drop_duplicates, near_duplicate_map, near_duplicates,
                          normalize_for_shingles, partition_signatures, text_signatures)
from corpus.documents import Rejected, process_partition, read_docs, write_docs

RNG = random.Random(7)
# letters only: digits fold to 0, so "w1" and "w2" would be the same word
VOCAB = sorted({"".join(RNG.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7))
                for _ in range(5000)})


def text(n: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def edited(t: str, every: int) -> str:
    """Replace one word in `every`: about 5 shingles in `every` change."""
    words = t.split()
    for i in range(every // 2, len(words), every):
        words[i] = "edited"
    return " ".join(words)


def shingles(t: str, n: int = 5) -> set:
    w = normalize_for_shingles(t)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_normalisation_folds_case_punctuation_digits_and_spacing():
    assert normalize_for_shingles("Hello,  WORLD!\n2024-11_22 “quoted” don’t") == \
        ["hello", "world", "0000", "00", "00", "quoted", "don", "t"]
    a = text(seed=1)
    noisy = " ".join(w.upper() + ("," if i % 3 else "  ") for i, w in enumerate(a.split()))
    sig = text_signatures([a, noisy])
    assert (sig[0] == sig[1]).all()


def test_identical_and_lightly_edited_docs_are_found_with_the_first_kept():
    a = text(seed=1)
    docs = [("a", a), ("other", text(seed=2)), ("copy", a), ("light", edited(a, 100)),
            ("Upper", a.upper())]
    found = {d: (k, s) for d, k, s in near_duplicates(docs)}
    assert set(found) == {"copy", "light", "Upper"}
    assert {k for k, _ in found.values()} == {"a"}
    assert found["copy"][1] == 1.0 and found["Upper"][1] == 1.0
    exact = jaccard(a, edited(a, 100))
    assert 0.85 < exact < 0.95
    assert abs(found["light"][1] - exact) < 0.12


def test_unrelated_and_weakly_related_docs_are_not_matched():
    docs = [(f"d{i}", text(seed=100 + i)) for i in range(40)]
    base = text(seed=1)
    docs += [("base", base), ("heavy", edited(base, 4))]      # Jaccard ~0.1
    assert jaccard(base, edited(base, 4)) < 0.3
    assert near_duplicates(docs) == []


def test_estimate_tracks_exact_jaccard():
    base = text(n=1500, seed=3)
    errors = []
    for every in (3, 5, 8, 12, 20, 40, 80):
        other = edited(base, every)
        est = float(dedup.similarity(*text_signatures([base, other])))
        errors.append(abs(est - jaccard(base, other)))
    # 112 permutations: standard error <= sqrt(.25 / 112) = 0.047
    assert max(errors) < 0.15
    assert np.mean(errors) < 0.06


def test_union_find_joins_chains_into_one_cluster():
    """A shares a bucket with B only, B with C only: A, B, C are one cluster kept as A,
    and C's similarity is measured against A, not B."""
    sig = np.arange(5 * 112, dtype=np.uint32).reshape(5, 112)   # all different
    sig[1, 0:8] = sig[0, 0:8]            # A~B in band 0
    sig[2, 8:16] = sig[1, 8:16]          # B~C in band 1
    sig[4, 16:24] = sig[3, 16:24]        # D~E in band 2
    found = near_duplicate_map([(["A", "B", "C"], sig[:3]), (["D", "E"], sig[3:])])
    assert found == {"B": ("A", round(8 / 112, 4)), "C": ("A", 0.0), "E": ("D", round(8 / 112, 4))}
    # Y is never a bucket's later member, yet joins X's cluster through Z: dropped too
    sig = np.arange(3 * 112, dtype=np.uint32).reshape(3, 112)
    sig[2, 0:8] = sig[1, 0:8]            # Y~Z in band 0, Y first
    sig[2, 8:16] = sig[0, 8:16]          # X~Z in band 1
    assert near_duplicate_map([(["X", "Y", "Z"], sig)]) == \
        {"Y": ("X", 0.0), "Z": ("X", round(8 / 112, 4))}
    with pytest.raises(ValueError, match="repeat"):
        near_duplicates([("a", "x"), ("a", "y")])
    a = text(n=600, seed=4)
    b = edited(a, 100)
    words = b.split()
    words[75::100] = ["other"] * len(words[75::100])
    c = " ".join(words)
    docs = [("a", a), ("b", b), ("c", c), ("z", text(seed=5))]
    assert {d: k for d, k, _ in near_duplicates(docs)} == {"b": "a", "c": "a"}
    uf = dedup._UnionFind(5)
    uf.union(3, 4)
    uf.union(1, 3)
    uf.union(4, 2)
    assert {uf.find(i) for i in (1, 2, 3, 4)} == {1} and uf.find(0) == 0


def test_clusters_do_not_depend_on_order_and_the_first_is_kept():
    """Determinism: the same input gives the same output; reordering the corpus keeps
    the same clusters (as sets of ids), and each keeps its first id in the new order."""
    base = [text(seed=10 + i) for i in range(6)]
    docs = [(f"d{i}", t) for i, t in enumerate(base)]
    docs += [(f"d{i}e{j}", edited(t, 100 + 50 * j)) for i, t in enumerate(base) for j in range(2)]

    def clusters(found, ids):
        kept = {d: k for d, k, _ in found}
        out = {}
        for id_ in ids:
            out.setdefault(kept.get(id_, id_), set()).add(id_)
        return sorted(map(sorted, out.values()))

    first = near_duplicates(docs)
    assert near_duplicates(docs) == first
    assert len(clusters(first, [i for i, _ in docs])) == 6
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    again = near_duplicates(shuffled)
    order = [i for i, _ in shuffled]
    assert clusters(again, order) == clusters(first, order)
    for d, k, _ in again:
        assert order.index(k) < order.index(d)


def test_signatures_are_the_same_in_any_partition(tmp_path):
    texts = [text(seed=20 + i) for i in range(5)] + ["", "tiny doc"]
    ids = [f"t{i}" for i in range(len(texts))]
    write_docs([{"id": i, "source": i, "text": t} for i, t in zip(ids[:3], texts[:3])],
               tmp_path / "part-00000.parquet")
    write_docs([{"id": i, "source": i, "text": t} for i, t in zip(ids[3:], texts[3:])],
               tmp_path / "part-00001.parquet")
    parts = [partition_signatures(tmp_path / f"part-0000{p}.parquet") for p in (0, 1)]
    assert parts[0][0] + parts[1][0] == ids
    together = text_signatures(texts)
    assert together.dtype == np.uint32 and together.shape == (len(texts), 112)
    assert (np.concatenate([parts[0][1], parts[1][1]]) == together).all()
    assert (text_signatures(texts[::-1])[::-1] == together).all()
    # other settings, other signatures; mixing them up is an error
    assert text_signatures(texts[:1], bands=4, rows=4).shape == (1, 16)
    with pytest.raises(ValueError, match="bands x rows"):
        near_duplicate_map(parts, bands=4, rows=4)
    with pytest.raises(ValueError, match="num_bands"):
        text_signatures(texts, num_bands=3)


def test_empty_and_short_docs_are_not_matched_by_accident():
    docs = [("e1", ""), ("e2", "   "), ("e3", "!!! ..."), ("s1", "just three words"),
            ("s2", "just three words"), ("s3", "other three words")]
    assert near_duplicates(docs) == [("s2", "s1", 1.0)]


def test_stage_path_and_step_yield_rejected_with_details(tmp_path):
    a, b = text(seed=30), text(seed=31)
    rows = [[{"id": "p0a", "source": "s", "text": a}, {"id": "p0b", "source": "s", "text": b}],
            [{"id": "p1a", "source": "s", "text": edited(a, 100)},
             {"id": "p1c", "source": "s", "text": text(seed=32)}]]
    paths = []
    for i, part in enumerate(rows):
        paths.append(tmp_path / f"part-{i:05d}.parquet")
        write_docs(part, paths[-1])
    sigs = [partition_signatures(p) for p in paths]
    duplicates = near_duplicate_map(sigs)
    assert set(duplicates) == {"p1a"} and duplicates["p1a"][0] == "p0a"
    assert duplicates == {d: (k, s) for d, k, s in
                          near_duplicates((r["id"], r["text"]) for part in rows for r in part)}
    shares = dedup.split_by_partition(duplicates, [ids for ids, _ in sigs])
    assert shares == [{}, {"p1a": duplicates["p1a"]}]

    out = list(drop_duplicates(iter(rows[1]), exact={}, near=shares[1]))
    assert out[1] is rows[1][1]
    assert out[0] == Rejected(rows[1][0], "near_duplicate",
                              {"duplicate_of": "p0a", "similarity": duplicates["p1a"][1]})
    stats = process_partition(drop_duplicates, paths[1], tmp_path / "out",
                              exact={}, near=shares[1])
    assert (stats["docs_out"], stats["reasons"]) == (1, {"near_duplicate": 1})
    rejected = list(read_docs(tmp_path / "out" / "rejected" / paths[1].name))
    assert rejected[0]["duplicate_of"] == "p0a"
    assert rejected[0]["similarity"] == pytest.approx(duplicates["p1a"][1])


def test_exact_dedup_is_unchanged():
    docs = [{"id": "d0", "text": "A  b"}, {"id": "d1", "text": "a b"}, {"id": "d2", "text": "c"}]
    dup = dedup.exact_duplicates((d["id"], dedup.text_hash(d["text"])) for d in docs)
    assert dup == {"d1": "d0"}
    out = list(dedup.drop_duplicates(iter(docs), exact=dup, near={}))
    assert out[0] is docs[0] and out[2] is docs[2]
    assert out[1] == Rejected(docs[1], "exact_duplicate", {"duplicate_of": "d0"})


def test_threshold_verifies_candidates():
    a = text(seed=40)
    docs = [("a", a), ("b", edited(a, 100))]
    s = near_duplicates(docs)[0][2]
    assert near_duplicates(docs, threshold=min(s + 0.05, 1.0)) == []
    assert near_duplicates(docs, threshold=s - 0.05)[0][:2] == ("b", "a")


def test_vectorised_words_are_those_of_normalize_for_shingles():
    texts = ["İstanbul’da 2024_11 café—naïve ÉCOLE straße ٣٤ ² x", "𝐀𝐁𝐂 bold 😀 emoji 𝟗 中文字 ok",
             "", "a\nb\tc  d", "snake_case_name __init__ e-mail O'Neil 3.14"]
    words, counts = dedup._word_hashes(texts)
    ref_words, ref_counts = dedup._word_hashes([" ".join(normalize_for_shingles(t)) for t in texts])
    assert counts.tolist() == [len(normalize_for_shingles(t)) for t in texts] == ref_counts.tolist()
    assert (words == ref_words).all()
    # distinct words, distinct hashes; the same word, the same hash wherever it is
    flat = [w for t in texts for w in normalize_for_shingles(t)]
    assert len(set(words.tolist())) == len(set(flat))


def test_signatures_do_not_depend_on_the_process(tmp_path):
    """Partitions are hashed in different worker processes: nothing may hang on
    PYTHONHASHSEED or on what a process looked up before."""
    texts = [text(seed=50), "Ünïcode 𝐀𝐁𝐂 ٣٤ words and 😀 more words here ok"]
    code = ("import sys, json; from corpus.dedup import text_signatures; "
            "print(json.dumps(text_signatures(json.loads(sys.stdin.read())).tolist()))")
    outs = []
    for seed in ("1", "2"):
        run = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts),
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed},
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        outs.append(json.loads(run.stdout))
    assert outs[0] == outs[1] == text_signatures(texts).tolist()


def test_one_step_for_exact_and_near_duplicates():
    a = text(seed=60)
    docs = [{"id": "e", "text": edited(a, 100)}, {"id": "o", "text": a},
            {"id": "o2", "text": a.upper()}, {"id": "x", "text": text(seed=61)}]
    exact = dedup.exact_duplicates((d["id"], dedup.text_hash(d["text"])) for d in docs)
    near = near_duplicate_map([([d["id"] for d in docs],
                                text_signatures([d["text"] for d in docs]))])
    assert exact == {"o2": "o"} and {k for k, _ in near.values()} == {"e"}
    assert set(near) == {"o", "o2"}       # the cluster keeps "e", never an exact duplicate
    out = list(dedup.drop_duplicates(iter(docs), exact=exact, near=near))
    assert [o if isinstance(o, dict) else (o.reason, o.details["duplicate_of"]) for o in out] \
        == [docs[0], ("near_duplicate", "e"), ("exact_duplicate", "o"), docs[3]]
