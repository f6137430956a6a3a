"""Documents, Parquet partitions and the step protocol every document stage follows.

A document is a plain dict with at least `id`, `source` and `text`. A step is a
generator function: documents in, documents out. A document the step drops is yielded
as `Rejected(doc, reason, details)` instead of being swallowed, so the partition runner
can write it to `rejected/` and check input = kept + rejected.
"""
from __future__ import annotations

import hashlib
import heapq
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 300
SLOWEST_DOCS = 5
READ_BATCH_ROWS = 256


class Rejected(NamedTuple):
    doc: dict
    reason: str
    details: dict = {}


Step = Callable[..., Iterator[dict | Rejected]]


class ConservationError(RuntimeError):
    """A step lost or invented documents: input != kept + rejected."""


def doc_id(source: str) -> str:
    """Stable id from a source path or URL."""
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:16]


def hash_bucket(id_: str) -> int:
    """A document's place in [0, 2**64), from its id: the splits are ranges of it."""
    return int.from_bytes(hashlib.sha256(id_.encode("utf-8")).digest()[:8], "big")


def is_val(id_: str, val_fraction: float) -> bool:
    """Deterministic train/val split by document id, the same in every stage: the bottom
    of the hash range (the eval set takes the top, see corpus.holdout)."""
    return hash_bucket(id_) < val_fraction * 2**64


def as_path(path: str | Path) -> Path:
    """A local path as a Path, any other fsspec URL ("s3://bucket/x") as a UPath: the same
    pathlib API over whatever store holds the partitions."""
    if isinstance(path, (Path, UPath)):
        return path
    return UPath(path) if "://" in str(path) else Path(path)


def is_remote(path: Path) -> bool:
    return not isinstance(path, Path)  # a UPath over an object store, not a local path


def open_partition(path: str | Path) -> pq.ParquetFile:
    path = as_path(path)
    try:
        # a remote partition is fetched whole, one request: partitions are bounded by
        # source.docs_per_partition, and Parquet's many small seeks cost a round trip each
        return pq.ParquetFile(pa.BufferReader(path.read_bytes()) if is_remote(path) else path)
    except Exception as exc:  # pyarrow raises several types for bad files
        raise ValueError(f"{path}: not a readable Parquet partition ({exc}); "
                         "re-run the stage that wrote it with force") from exc


def read_docs(partition: str | Path | pq.ParquetFile, columns: list[str] | None = None) -> Iterator[dict]:
    """Stream the rows of one Parquet partition (a path, or one already open) as dicts,
    a record batch at a time."""
    if not isinstance(partition, pq.ParquetFile):
        partition = open_partition(partition)
    for batch in partition.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
        yield from batch.to_pylist()


def read_texts(paths: Iterable[str | Path]) -> Iterator[tuple[str, str]]:
    """(id, text) for every document of the given partitions, streamed."""
    for path in paths:
        for row in read_docs(path, columns=["id", "text"]):
            yield row["id"], row["text"]


# Types of the columns stages write, so that a column that is all null in one partition
# has the same type as in the others and a stage folder reads as one dataset.
COLUMN_TYPES = {
    "id": pa.string(), "source": pa.string(), "text": pa.string(), "html": pa.binary(),
    "n_chars": pa.int64(), "reason": pa.string(), "error": pa.string(),
    "toxicity": pa.float64(), "duplicate_of": pa.string(), "normalized_changed": pa.bool_(),
    "normalize_fixes": pa.list_(pa.string()), "value": pa.float64(), "similarity": pa.float64(),
    "language": pa.string(), "language_score": pa.float64(),
    # raw documents read from WARC files
    "url": pa.string(), "fetch_date": pa.string(), "http_charset": pa.string(),
    # how extract decoded bytes that did not decode cleanly with their declared charset
    "decoding": pa.string(),
}
# Every rejected/ file has these columns, whichever reasons it holds.
REJECTED_COLUMNS = ("id", "source", "text", "reason", "error", "value", "language", "toxicity",
                    "duplicate_of", "similarity")


def write_docs(rows: list[dict], path: str | Path, columns: Iterable[str] | None = None) -> None:
    """Write one partition (nothing for no rows: readers glob the files there are).
    Columns: `columns`, else the union of the rows' keys in first-seen order."""
    if not rows:
        return
    names = list(columns or dict.fromkeys(k for row in rows for k in row))
    table = pa.table({k: pa.array([row.get(k) for row in rows], type=COLUMN_TYPES.get(k))
                      for k in names})
    path = as_path(path)
    if is_remote(path):  # one PUT of the whole file: an object appears complete or not at all
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, compression="zstd")
        path.write_bytes(buffer.getvalue().to_pybytes())
    else:
        pq.write_table(table, path, compression="zstd")


def _truncate(text: str | None) -> str:
    text = (text or "").strip()
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "…"


def process_partition(step: Step, in_path: str | Path, out_dir: str | Path,
                      **step_config: Any) -> dict:
    """Run `step` over one input partition; write kept docs to `out_dir/docs/<name>`
    and dropped ones to `out_dir/rejected/<name>`. Returns the partition's stats."""
    in_path, out_dir = as_path(in_path), as_path(out_dir)
    started = time.perf_counter()
    # the count comes from the file, not from what the step chose to read; opened once (a
    # remote partition is one download)
    partition = open_partition(in_path)
    n_in = partition.metadata.num_rows
    bytes_in = 0
    last = started
    sizes_in: Counter[int] = Counter()

    def counted(docs: Iterator[dict]) -> Iterator[dict]:
        nonlocal bytes_in, last
        for i, doc in enumerate(docs):
            if i == 0:
                last = time.perf_counter()  # a step's set-up (loading a model) is not a document's time
            size = _size(doc)
            bytes_in += size
            sizes_in[size.bit_length()] += 1
            yield doc

    kept: list[dict] = []
    rejected: list[dict] = []
    reasons: Counter[str] = Counter()
    examples: dict[str, list[dict]] = {}
    slowest: list[tuple[float, str, str]] = []  # a min-heap of the SLOWEST_DOCS slowest
    for item in step(counted(read_docs(partition)), **step_config):
        now = time.perf_counter()
        doc = item.doc if isinstance(item, Rejected) else item
        # time since the previous output: per document for streaming steps; a batching
        # step's batch time lands on the first document of the batch
        entry = (now - last, doc["id"], doc.get("source") or "")
        (heapq.heappushpop if len(slowest) >= SLOWEST_DOCS else heapq.heappush)(slowest, entry)
        last = now
        if isinstance(item, Rejected):
            reasons[item.reason] += 1
            unknown = set(item.details) - set(REJECTED_COLUMNS)
            if unknown:
                raise ValueError(f"rejection details {sorted(unknown)} have no column in "
                                 "REJECTED_COLUMNS; add them there")
            row = {"id": item.doc["id"], "source": item.doc.get("source"),
                   "text": item.doc.get("text"), "reason": item.reason, **item.details}
            rejected.append(row)
            if len(examples.setdefault(item.reason, [])) < EXAMPLES_PER_REASON:
                examples[item.reason].append({"id": row["id"], "source": row["source"],
                                              "text": _truncate(row["text"]), **item.details})
        else:
            item["n_chars"] = len(item["text"])
            kept.append(item)
    if n_in != len(kept) + len(rejected):
        raise ConservationError(
            f"{in_path}: step {getattr(step, '__name__', step)} read {n_in} documents but "
            f"kept {len(kept)} and rejected {len(rejected)}")
    for sub in ("docs", "rejected"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    write_docs(kept, out_dir / "docs" / in_path.name)
    write_docs(rejected, out_dir / "rejected" / in_path.name, columns=REJECTED_COLUMNS)
    return {
        "partition": in_path.name,
        "docs_in": n_in,
        "docs_out": len(kept),
        "docs_rejected": len(rejected),
        "bytes_in": bytes_in,
        "bytes_out": sum(len(d["text"].encode("utf-8")) for d in kept),
        "size_hist_in": dict(sizes_in),
        "size_hist_out": dict(Counter(len(d["text"].encode("utf-8")).bit_length() for d in kept)),
        "slowest_docs": sorted(slowest, reverse=True),
        "reasons": dict(reasons),
        "examples": examples,
        "seconds": time.perf_counter() - started,
    }


def _size(doc: dict) -> int:
    """Bytes of a document's payload: its raw HTML if it still has it, else its text."""
    payload = doc.get("html") or doc.get("text") or ""
    return len(payload) if isinstance(payload, bytes) else len(payload.encode("utf-8"))


def merge_stats(parts: list[dict]) -> dict:
    """Sum per-partition stats into stage stats; keeps a few examples per reason."""
    reasons: Counter[str] = Counter()
    hist_in: Counter[int] = Counter()
    hist_out: Counter[int] = Counter()
    examples: dict[str, list[dict]] = {}
    for p in parts:
        reasons.update(p["reasons"])
        hist_in.update(p["size_hist_in"])
        hist_out.update(p["size_hist_out"])
        for reason, exs in p["examples"].items():
            room = EXAMPLES_PER_REASON - len(examples.setdefault(reason, []))
            examples[reason].extend(exs[:max(room, 0)])
    slowest = sorted(parts, key=lambda p: p["seconds"], reverse=True)[:5]
    stats = {
        "partitions": len(parts),
        "docs_in": sum(p["docs_in"] for p in parts),
        "docs_out": sum(p["docs_out"] for p in parts),
        "docs_rejected": sum(p["docs_rejected"] for p in parts),
        "bytes_in": sum(p["bytes_in"] for p in parts),
        "bytes_out": sum(p["bytes_out"] for p in parts),
        "rejected_by_reason": dict(reasons.most_common()),
        "rejected_examples": examples,
        # documents by UTF-8 size (raw HTML for pages not yet extracted), input and
        # kept: key b counts documents with 2**(b-1) <= bytes < 2**b
        "size_hist": {b: [hist_in[b], hist_out[b]] for b in sorted(hist_in | hist_out)},
        "slowest_docs": [{"id": i, "source": src, "seconds": round(t, 4)} for t, i, src in
                         heapq.nlargest(SLOWEST_DOCS, (d for p in parts for d in p["slowest_docs"]))],
        "partition_seconds": round(sum(p["seconds"] for p in parts), 3),
        "slowest_partitions": {p["partition"]: round(p["seconds"], 3) for p in slowest},
    }
    if stats["docs_in"] != stats["docs_out"] + stats["docs_rejected"]:
        raise ConservationError(f"stage lost documents: {stats['docs_in']} in, "
                                f"{stats['docs_out']} kept, {stats['docs_rejected']} rejected")
    return stats
