"""Exact deduplication by a hash of normalised text, and near-duplicate removal by
MinHash + LSH (see "near duplicates" below).

Two passes so that no step holds the corpus's text: hash every partition (in parallel),
decide on the small (id, hash) list which documents repeat an earlier one, then drop
those from each partition (in parallel again). The first occurrence in partition order
is kept, so the choice is deterministic. Near duplicates follow the same plan with
MinHash signatures in place of the hash; both keep the first document in corpus order.
Exact duplicates have equal signatures, so over the same documents in the same order the
document a near-duplicate cluster keeps is never an exact duplicate (but an exact
duplicate's original may be a near duplicate of an earlier document).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from corpus.documents import Rejected, read_docs

_SPACE = re.compile(r"\s+")


def text_hash(text: str) -> str:
    """Case and whitespace do not make a document new."""
    canonical = _SPACE.sub(" ", text.lower()).strip()
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).hexdigest()


def partition_hashes(path: str | Path) -> list[tuple[str, str]]:
    return [(row["id"], text_hash(row["text"])) for row in read_docs(path, ["id", "text"])]


def exact_duplicates(hashes: Iterable[tuple[str, str]]) -> dict[str, str]:
    """{duplicate id: id of the first document with the same hash}."""
    first: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    for id_, h in hashes:
        if h in first:
            duplicates[id_] = first[h]
        else:
            first[h] = id_
    return duplicates


# -- near duplicates: MinHash + LSH ------------------------------------------------
#
# Three steps, each a pure function, so the stage can map the first and last over
# partitions and run the middle one on the driver without the corpus's text:
#   partition_signatures(path) -> (ids, signature matrix)        per partition
#   near_duplicate_map([(ids, sig), ...]) -> {dropped: (kept, s)}  on the driver
#   drop_duplicates(docs, exact=..., near=share)                  the step, per partition
# `near_duplicates(docs)` runs the same three in process, for small sets and tests.
#
# Text is normalised (lowercase, punctuation -> space, digits -> 0, whitespace
# collapsed: `normalize_for_shingles`) and each run of 5 words is a shingle. For speed
# the words are found and hashed in numpy on the code points of a batch of texts (a
# lookup table built from the same regular expressions gives each code point's class),
# not with Python strings; the result is the same word sequence (tested). A word's hash
# is deterministic across processes (no use of hash()): the sum of code point x a
# random odd constant per position, finalised. A shingle's 32-bit hash is a polynomial
# of its word hashes, finalised. Permutation i maps a shingle hash x to the high 32 bits
# of (a_i*x + b_i) mod 2**64, a_i odd (Dietzfelbinger's multiply-add-shift, a universal
# family for 32-bit keys): two numpy passes over a (permutations x shingles) block and a
# segmented minimum. (a*x + b) mod (2**61 - 1) with a, b kept below 2**32, so that nothing
# overflows, took five passes and gave correlated permutations: mean |estimate - Jaccard|
# 0.085 against datasketch's 0.025; this family gives 0.029.) The minimum 64-bit value has
# the minimum high half, so the minimum runs on uint64 and signatures keep high halves.
# LSH: `bands` bands of `rows` rows; documents whose rows agree in a band share a
# bucket and are candidates; candidates are joined with union-find and each cluster
# keeps its first document in corpus order (partition order, then row order).

_PUNCT = re.compile(r"[^\w\s]|_")
_DIGIT = re.compile(r"\d")
_WORD_CHAR = re.compile(r"[^\W_]")             # \w but "_": what _PUNCT leaves
_SHINGLE_MUL = np.uint64(0x9E3779B97F4A7C15)
_FIN1 = np.uint64(0xBF58476D1CE4E5B9)
_FIN2 = np.uint64(0x94D049BB133111EB)
_CHUNK = 1 << 14                     # shingle columns per permutation block
_BATCH_CHARS = 1 << 16               # code points per batch of texts: fits in cache


@dataclass(config=ConfigDict(strict=True, extra="forbid", validate_assignment=True))
class DedupConfig:
    """Exact duplicates always go; near duplicates by MinHash LSH (FineWeb: 14 x 8, 5-grams)."""
    near: bool = Field(True, description="MinHash LSH near duplicates after exact ones")
    bands: int = Field(14, ge=1, le=1024, description="LSH bands; bands x rows = permutations")
    rows: int = Field(8, ge=1, le=1024, description="rows per band")
    ngram: int = Field(5, ge=1, le=64, description="words per shingle")
    seed: int = Field(1, ge=0, description="permutation parameters")
    threshold: float = Field(0.0, ge=0, le=1, description=(
        "> 0: a bucket-mate joins a cluster only if its estimated similarity to the "
        "bucket's first reaches this; 0 = off"))

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows


def _config(config: dict) -> DedupConfig:
    return DedupConfig(**config)


def normalize_for_shingles(text: str) -> list[str]:
    """The words shingles are made of: case, punctuation, digits and spacing folded."""
    return _DIGIT.sub("0", _PUNCT.sub(" ", text.lower())).split()


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), each (num_perm, 1) uint64: a odd, b any."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 64, size=(num_perm, 1), dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 1 << 64, size=(num_perm, 1), dtype=np.uint64)
    return a, b


def _finalise(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: every input bit moves every output bit."""
    x ^= x >> np.uint64(30)
    x *= _FIN1
    x ^= x >> np.uint64(27)
    x *= _FIN2
    x ^= x >> np.uint64(31)
    return x


# per code point: 0 separator, 1 word character, 2 digit, 255 not looked up yet
_CHAR_CLASS: np.ndarray | None = None
_POSITION_KEYS = np.random.default_rng(0x5EED).integers(
    0, 1 << 64, size=64, dtype=np.uint64) | np.uint64(1)


def _char_class(c: str) -> int:
    return 2 if _DIGIT.match(c) else 1 if _WORD_CHAR.match(c) else 0


def _char_classes(cp: np.ndarray) -> np.ndarray:
    """What normalize_for_shingles does to each code point in `cp`, by a lookup table
    built with its own regular expressions: the Basic Multilingual Plane on first use,
    other planes as their code points turn up."""
    global _CHAR_CLASS
    if _CHAR_CLASS is None:
        table = np.full(0x110000, 255, dtype=np.uint8)
        table[:0x10000] = [_char_class(chr(i)) for i in range(0x10000)]
        _CHAR_CLASS = table
    cls = _CHAR_CLASS[cp]
    unknown = cls == 255
    if unknown.any():
        new = np.unique(cp[unknown])
        _CHAR_CLASS[new] = [_char_class(chr(c)) for c in new.tolist()]
        cls = _CHAR_CLASS[cp]
    return cls


def _word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash of every word of every text, in order; each text's word count),
    with the words of normalize_for_shingles, computed on code points in numpy: a word's
    hash is the finalised sum of code point x a random odd constant per position."""
    lowered = [t.lower() for t in texts]
    lens = np.fromiter(map(len, lowered), dtype=np.int64, count=len(lowered))
    text_starts = np.cumsum(lens + 1) - (lens + 1)       # texts joined by "\n"
    cp = np.frombuffer("\n".join(lowered).encode("utf-32-le", "surrogatepass"),
                       dtype=np.uint32)
    cls = _char_classes(cp)
    is_word = cls != 0
    edges = np.diff(is_word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    counts = np.bincount(np.searchsorted(text_starts, starts, side="right") - 1,
                         minlength=len(texts))
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint64), counts
    folded = np.where(cls == 2, np.uint32(48), cp)[is_word]   # digits -> "0"
    word_len = (ends - starts).astype(np.int32)
    offsets = np.cumsum(word_len, dtype=np.int64) - word_len  # first char of each word
    pos = np.arange(len(folded), dtype=np.int32)
    pos -= np.repeat(offsets.astype(np.int32), word_len)
    pos &= len(_POSITION_KEYS) - 1
    v = _POSITION_KEYS[pos]
    v *= folded
    h = np.add.reduceat(v, offsets)
    h += word_len.astype(np.uint64) * _SHINGLE_MUL
    return _finalise(h), counts


def _shingle_hashes(word_hashes: np.ndarray, ngram: int) -> np.ndarray:
    """32-bit hashes (as uint64) of every run of `ngram` words; a document shorter than
    that is one shingle of all its words."""
    n = len(word_hashes)
    width = min(ngram, n)
    if width == 0:
        return np.zeros(0, dtype=np.uint64)
    h = word_hashes[:n - width + 1].copy()
    for j in range(1, width):
        h *= _SHINGLE_MUL
        h += word_hashes[j:n - width + 1 + j]
    return _finalise(h) >> np.uint64(32)


def text_signatures(texts: Iterable[str], **config: Any) -> np.ndarray:
    """MinHash signatures, (len(texts), bands * rows) uint32, one row per text. A text
    with no words gets the all-ones row, which `near_duplicate_map` never matches."""
    cfg = _config(config)
    a, b = permutations(cfg.num_perm, cfg.seed)
    texts = list(texts)
    sig = np.full((cfg.num_perm, len(texts)), np.iinfo(np.uint64).max, dtype=np.uint64)
    buf = np.empty((cfg.num_perm, _CHUNK), dtype=np.uint64)
    empty = np.zeros(len(texts), dtype=bool)
    first = 0
    while first < len(texts):                  # batches of about _BATCH_CHARS
        last, size = first, 0
        while last < len(texts) and (last == first or size + len(texts[last]) <= _BATCH_CHARS):
            size += len(texts[last]) + 1
            last += 1
        keys, n_shingles = _shingle_keys(texts[first:last], cfg.ngram, first)
        empty[first:last] = n_shingles == 0
        _min_hash(keys, a, b, sig, buf)
        first = last
    out = (sig >> np.uint64(32)).astype(np.uint32).T.copy()   # the high half is the hash
    out[empty] = np.iinfo(np.uint32).max
    return out


def _shingle_keys(texts: list[str], ngram: int, first_doc: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct (document index << 32 | 32-bit shingle hash) of the texts, and
    each text's number of shingles."""
    words, counts = _word_hashes(texts)
    doc = np.repeat(np.arange(first_doc, first_doc + len(texts), dtype=np.uint64), counts)
    n = len(words)
    sh = np.zeros(0, dtype=np.uint64)
    if n >= ngram:                             # windows within one text
        sh = words[:n - ngram + 1].copy()
        for j in range(1, ngram):
            sh *= _SHINGLE_MUL
            sh += words[j:n - ngram + 1 + j]
        sh = _finalise(sh) >> np.uint64(32)
        same = doc[:n - ngram + 1] == doc[ngram - 1:]
        sh = sh[same] | (doc[:n - ngram + 1][same] << np.uint64(32))
    n_shingles = np.maximum(counts - ngram + 1, 0)
    short = np.flatnonzero((counts > 0) & (counts < ngram))
    if len(short):                             # a text shorter than a shingle is one
        ends = np.cumsum(counts)
        extra = [_shingle_hashes(words[ends[i] - counts[i]:ends[i]], ngram)
                 | np.uint64((first_doc + int(i)) << 32) for i in short]
        sh = np.concatenate([sh, *extra])
        n_shingles[short] = 1
    sh.sort()                                  # by document, then hash
    if len(sh):
        sh = sh[np.r_[True, sh[1:] != sh[:-1]]]
    return sh, n_shingles


def _min_hash(keys: np.ndarray, a: np.ndarray, b: np.ndarray, sig: np.ndarray,
              buf: np.ndarray) -> None:
    """sig[:, doc] = min over the doc's shingles x of (a x + b) mod 2**64, in place."""
    doc_of = (keys >> np.uint64(32)).astype(np.int64)
    x = keys & np.uint64(0xFFFFFFFF)
    for start in range(0, len(x), buf.shape[1]):
        xs = x[start:start + buf.shape[1]]
        h = buf[:, :len(xs)]
        np.multiply(a, xs, out=h)
        h += b
        docs = doc_of[start:start + len(xs)]
        seg = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
        cols = docs[seg]                       # each document once per chunk
        sig[:, cols] = np.minimum(sig[:, cols], np.minimum.reduceat(h, seg, axis=1))


def partition_signatures(path: str | Path, **config: Any) -> tuple[list[str], np.ndarray]:
    """Pass 1 of the stage: ids and MinHash signatures of one partition."""
    ids, texts = [], []
    for row in read_docs(path, ["id", "text"]):
        ids.append(row["id"])
        texts.append(row["text"] or "")
    return ids, text_signatures(texts, **config)


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: one hash per band of each signature row."""
    n = len(sig)
    if sig.shape[1] < bands * rows:
        raise ValueError(f"signatures have {sig.shape[1]} values; bands x rows = "
                         f"{bands * rows}")
    v = sig[:, :bands * rows].astype(np.uint64).reshape(n, bands, rows)
    h = np.full((n, bands), 0x243F6A8885A308D3, dtype=np.uint64)
    for r in range(rows):
        h ^= v[:, :, r]
        h *= _SHINGLE_MUL
        h = _finalise(h)
    return h


class _UnionFind:
    """Over 0..n-1; the root of a set is its smallest member (= first in corpus order)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def similarity(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray | float:
    """MinHash estimate of Jaccard: the fraction of equal signature values."""
    return np.mean(np.asarray(sig_a) == np.asarray(sig_b), axis=-1)


def candidate_pairs(bands_h: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(k, 2) int64 pairs (first, other) of rows that share a bucket in some band, with
    `first` the bucket's first row; repeats across bands are removed."""
    n = len(bands_h)
    idx = np.arange(n) if valid is None else np.flatnonzero(valid)
    pairs = []
    for band in range(bands_h.shape[1]):
        keys = bands_h[idx, band]
        order = np.argsort(keys, kind="stable")        # rows in corpus order within a key
        sk = keys[order]
        starts = np.r_[True, sk[1:] != sk[:-1]]
        group_first = np.maximum.accumulate(np.where(starts, np.arange(len(sk)), 0))
        member = ~starts
        if member.any():
            pairs.append(np.stack([idx[order[group_first[member]]], idx[order[member]]], 1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def near_duplicate_map(parts: Iterable[tuple[Sequence[str], np.ndarray]], **config: Any
                       ) -> dict[str, tuple[str, float]]:
    """{dropped id: (kept id, estimated similarity to it)} over the whole corpus, from
    each partition's (ids, signatures) in partition order. Needs no text."""
    cfg = _config(config)
    ids: list[str] = []
    sigs = []
    for part_ids, sig in parts:
        if len(part_ids) != len(sig):
            raise ValueError(f"{len(part_ids)} ids but {len(sig)} signatures")
        ids.extend(part_ids)
        sigs.append(np.asarray(sig))
    if not ids:
        return {}
    if len(set(ids)) != len(ids):
        raise ValueError("document ids repeat: the map could not say which is dropped")
    sig = np.concatenate(sigs)
    if sig.shape[1] != cfg.num_perm:
        raise ValueError(f"signatures have {sig.shape[1]} values but bands x rows = "
                         f"{cfg.num_perm}: compute them with the same settings")
    valid = ~(sig == np.iinfo(sig.dtype).max).all(axis=1)   # texts with no words
    pairs = candidate_pairs(band_hashes(sig, cfg.bands, cfg.rows), valid)
    if cfg.threshold > 0 and len(pairs):
        pairs = pairs[similarity(sig[pairs[:, 0]], sig[pairs[:, 1]]) >= cfg.threshold]
    uf = _UnionFind(len(ids))
    for i, j in pairs.tolist():
        uf.union(i, j)
    # a document in some pair whose cluster starts before it (it may be only ever the
    # first of its buckets, and joined to an earlier document through another one)
    dropped = [i for i in np.unique(pairs).tolist() if uf.find(i) != i]
    if not dropped:
        return {}
    kept = np.array([uf.find(i) for i in dropped])
    sims = similarity(sig[dropped], sig[kept])
    return {ids[i]: (ids[k], round(float(s), 4)) for i, k, s in zip(dropped, kept.tolist(), sims)}


def near_duplicates(docs: Iterable[tuple[str, str]], **config: Any
                    ) -> list[tuple[str, str, float]]:
    """(dropped id, kept id, estimated similarity) for (id, text) pairs, in corpus order,
    by the same code as the stage (one in-memory partition)."""
    ids, texts = [], []
    for id_, text in docs:
        ids.append(id_)
        texts.append(text or "")
    found = near_duplicate_map([(ids, text_signatures(texts, **config))], **config)
    return [(id_, *found[id_]) for id_ in ids if id_ in found]


def split_by_partition(duplicates: dict[str, Any], part_ids: Iterable[Sequence[str]]
                       ) -> list[dict[str, Any]]:
    """Each partition's share of a {dropped id: ...} map, for pass 2 of the stage."""
    return [{id_: duplicates[id_] for id_ in ids if id_ in duplicates} for ids in part_ids]


def drop_duplicates(docs: Iterable[dict], *, exact: dict[str, str],
                    near: dict[str, tuple[str, float]]) -> Iterator[dict | Rejected]:
    """The step: this partition's shares of exact_duplicates() and of
    near_duplicate_map() (either may be empty); an exact duplicate is reported as one."""
    for doc in docs:
        if doc["id"] in exact:
            yield Rejected(doc, "exact_duplicate", {"duplicate_of": exact[doc["id"]]})
        elif doc["id"] in near:
            kept_id, similarity_ = near[doc["id"]]
            yield Rejected(doc, "near_duplicate", {"duplicate_of": kept_id,
                                                   "similarity": similarity_})
        else:
            yield doc
