"""Exact deduplication by a hash of normalised text.

Two passes so that no step holds the corpus's text: hash every partition (in parallel),
decide on the small (id, hash) list which documents repeat an earlier one, then drop
those from each partition (in parallel again). The first occurrence in partition order
is kept, so the choice is deterministic.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable, Iterator

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


def drop_duplicates(docs: Iterable[dict], *, duplicates: dict[str, str]) -> Iterator[dict | Rejected]:
    """The step: `duplicates` holds this partition's share of exact_duplicates()."""
    for doc in docs:
        kept_id = duplicates.get(doc["id"])
        if kept_id is None:
            yield doc
        else:
            yield Rejected(doc, "exact_duplicate", {"duplicate_of": kept_id})
