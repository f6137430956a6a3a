"""Per-version indexes that find one document without scanning the corpus (`c2m why`).

Each document stage's version folder gets `index.sqlite`: document id -> kept or
rejected, the partition file and the row in it, the rejection reason, and for the first
stage (source) the document's source path or URL, so a URL can be looked up too. The
shard stage's folder gets one that maps id -> split, token offset and length, and each
shard file to the token range it holds.

Why SQLite: a lookup is a B-tree search (~10 us warm, <1 ms cold at millions of
documents), the file is one plain file that can be read whole or by page ranges (an
object store later), and it is built with bounded memory: rows are appended in partition
order, then `CREATE UNIQUE INDEX` sorts the ids with SQLite's external merge sort (at
most CACHE_KIB of memory, then temporary files). Measured here (ids alone, 2 cores):
appending then indexing took 2.4 us/document at 2 and at 6 million documents, while
inserting into an id-keyed (WITHOUT ROWID) table went from 2.9 to 6.8 us as its tree
outgrew the cache. An id-sorted Parquet file (0.2 ms a look-up) would need an external
sort of our own.

The driver reads only the `id` (and `reason`, or `source`) columns of the partitions,
one record batch at a time: its memory is one batch plus SQLite's cache, whatever the
corpus size.
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

from corpus.documents import as_path, open_partition

INDEX_FILE = "index.sqlite"
FORMAT = "1"
CACHE_KIB = 64 * 1024       # SQLite page cache and sorter memory while building
READ_ROWS = 64 * 1024       # ids read per record batch
WRITE_ROWS = 16 * 1024      # token-index rows buffered per insert
DOCUMENT_FOLDERS = ("docs", "rejected")


class IndexMissing(FileNotFoundError):
    """A version folder has no index (built before indexes existed)."""


def _create(path: Path, kind: str, schema: str) -> sqlite3.Connection:
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    # the file is written once into a temporary folder and renamed into place with its
    # version: no journal is needed, and none is left beside it
    db.executescript(f"PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; "
                     f"PRAGMA cache_size=-{CACHE_KIB}; BEGIN;"
                     "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);" + schema)
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("kind", kind), ("format", FORMAT)])
    return db


def _open(path: Path, kind: str) -> sqlite3.Connection:
    if not path.is_file():
        raise IndexMissing(f"{path}: no such index")
    # immutable: no locks and no -journal/-shm files beside a committed artifact
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    meta = dict(db.execute("SELECT key, value FROM meta"))
    if meta.get("kind") != kind or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: a {meta.get('kind')} index, format {meta.get('format')}; "
                         f"expected {kind}, format {FORMAT}")
    return db


# -- document stages ---------------------------------------------------------------

DOCUMENTS_SCHEMA = """
CREATE TABLE files(file INTEGER PRIMARY KEY, path TEXT NOT NULL);
CREATE TABLE docs(id TEXT NOT NULL, file INTEGER NOT NULL, row INTEGER NOT NULL,
                  reason TEXT, source TEXT);
"""


def document_partitions(folder: Path) -> list[str]:
    """A document stage's partitions, relative to its version folder: kept, then rejected."""
    return [f"{sub}/{p.name}" for sub in DOCUMENT_FOLDERS
            for p in sorted((folder / sub).glob("part-*.parquet"))]


def index_documents(folder: str | Path, out: Path, with_sources: bool = False) -> float | None:
    """Write `out/index.sqlite` (a local folder: SQLite writes local files) for a document
    stage's version `folder` (local or an fsspec URL, holding docs/ and/or rejected/
    partitions); `with_sources` also indexes the `source` column. Returns the seconds it
    took, None if the folder is not a document stage's."""
    folder = as_path(folder)
    partitions = document_partitions(folder)
    if not partitions:
        return None
    started = time.perf_counter()
    db = _create(Path(out) / INDEX_FILE, "documents", DOCUMENTS_SCHEMA)
    try:
        for file_no, rel in enumerate(partitions):
            db.execute("INSERT INTO files VALUES (?, ?)", (file_no, rel))
            rejected = rel.startswith("rejected/")
            columns = ["id", *(["reason"] if rejected else []), *(["source"] if with_sources else [])]
            row = 0
            for batch in open_partition(folder / rel).iter_batches(batch_size=READ_ROWS, columns=columns):
                ids = batch.column("id").to_pylist()
                reasons = batch.column("reason").to_pylist() if rejected else repeat(None)
                sources = batch.column("source").to_pylist() if with_sources else repeat(None)
                db.executemany("INSERT INTO docs VALUES (?, ?, ?, ?, ?)",
                               zip(ids, repeat(file_no), range(row, row + len(ids)), reasons, sources))
                row += len(ids)
        _unique_ids(db, "docs", folder)
        if with_sources:
            db.execute("CREATE INDEX by_source ON docs(source)")
        db.execute("COMMIT")
    finally:
        db.close()
    return time.perf_counter() - started


def _unique_ids(db: sqlite3.Connection, table: str, folder: Path) -> None:
    try:
        db.execute(f"CREATE UNIQUE INDEX {table}_id ON {table}(id)")
    except sqlite3.IntegrityError:
        twice = db.execute(f"SELECT id FROM {table} GROUP BY id HAVING count(*) > 1 LIMIT 1").fetchone()
        raise ValueError(f"{folder}: document id {twice[0]!r} appears more than once; "
                         "a stage must keep or reject each document exactly once") from None


@dataclass(frozen=True)
class Entry:
    """Where one document is in a document stage's version."""
    id: str
    partition: str          # relative to the version folder: docs/part-00000.parquet
    row: int                # its row in that file
    reason: str | None      # why the stage rejected it; None when kept
    source: str | None      # the source stage's index only

    @property
    def kept(self) -> bool:
        return self.partition.startswith("docs/")


class DocumentIndex:
    """A document stage's index, opened read-only: `index` is a local copy of the
    version's index.sqlite (default: the one in `folder`), `folder` the version itself."""

    def __init__(self, folder: str | Path, index: Path | None = None):
        self.folder = as_path(folder)
        self._db = _open(index or self.folder / INDEX_FILE, "documents")
        self._files = dict(self._db.execute("SELECT file, path FROM files"))

    def _entries(self, sql: str, args: tuple) -> list[Entry]:
        return [Entry(id_, self._files[file_no], row, reason, source)
                for id_, file_no, row, reason, source in self._db.execute(sql, args)]

    def get(self, id_: str) -> Entry | None:
        found = self._entries("SELECT id, file, row, reason, source FROM docs WHERE id = ?", (id_,))
        return found[0] if found else None

    def ids_for_source(self, source: str) -> list[str]:
        """The ids of the documents read from `source` (the source stage's index)."""
        return [r[0] for r in self._db.execute("SELECT id FROM docs WHERE source = ? LIMIT 10", (source,))]

    def rejected(self, reason: str, n: int) -> list[Entry]:
        """Up to n documents rejected for `reason`, in partition order (a scan that stops
        at the n-th)."""
        return self._entries("SELECT id, file, row, reason, source FROM docs WHERE reason = ? LIMIT ?",
                             (reason, n))

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM docs").fetchone()[0]

    def read(self, entry: Entry, columns: list[str]) -> dict:
        """The given columns (those the file has) of the document's row, reading one
        row group of those columns only."""
        return read_row(self.folder / entry.partition, entry.row, columns)

    def close(self) -> None:
        self._db.close()


def read_row(path: Path, row: int, columns: list[str]) -> dict:
    pf = open_partition(path)
    present = [c for c in columns if c in pf.schema_arrow.names]
    for group in range(pf.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        if row < rows:
            return pf.read_row_group(group, columns=present).slice(row, 1).to_pylist()[0]
        row -= rows
    raise ValueError(f"{path}: has no row {row}; its index does not match it (`c2m verify`)")


# -- token shards ------------------------------------------------------------------

TOKENS_SCHEMA = """
CREATE TABLE shards(split TEXT NOT NULL, name TEXT NOT NULL, first INTEGER NOT NULL,
                    tokens INTEGER NOT NULL, PRIMARY KEY (split, first));
CREATE TABLE tokens(id TEXT NOT NULL, split TEXT NOT NULL, offset INTEGER NOT NULL,
                    length INTEGER NOT NULL);
"""


class TokenIndexWriter:
    """Streams id -> (split, offset, length) rows into `index.sqlite` as shards are written.
    `offset` counts tokens from the start of the split's first shard: a document may run
    across two files. `seconds` is the time spent indexing, apart from the shard writing."""

    def __init__(self, folder: Path):
        started = time.perf_counter()
        self.folder = folder
        self._db = _create(folder / INDEX_FILE, "tokens", TOKENS_SCHEMA)
        self._rows: list[tuple[str, str, int, int]] = []
        self.seconds = time.perf_counter() - started

    def document(self, id_: str, split: str, offset: int, length: int) -> None:
        self._rows.append((id_, split, offset, length))
        if len(self._rows) >= WRITE_ROWS:
            self._flush()

    def _flush(self) -> None:
        started = time.perf_counter()
        self._db.executemany("INSERT INTO tokens VALUES (?, ?, ?, ?)", self._rows)
        self._rows = []
        self.seconds += time.perf_counter() - started

    def shard(self, split: str, name: str, first: int, tokens: int) -> None:
        self._db.execute("INSERT INTO shards VALUES (?, ?, ?, ?)", (split, name, first, tokens))

    def close(self) -> float:
        """Finish the index; returns the seconds spent on it."""
        self._flush()
        started = time.perf_counter()
        try:
            _unique_ids(self._db, "tokens", self.folder)
            self._db.execute("COMMIT")
        finally:
            self._db.close()
        return self.seconds + time.perf_counter() - started

    def abort(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class TokenSpan:
    """Where a document's tokens are: [offset, offset + length) of its split's token
    stream, preceded by the end-of-text token at offset - 1; `files` are
    (shard file, start, end) token ranges within each file it touches."""
    id: str
    split: str
    offset: int
    length: int
    files: list[tuple[str, int, int]]


class TokenIndex:
    def __init__(self, folder: str | Path):
        """`folder`: a local folder holding the shard stage's index.sqlite."""
        self.folder = Path(folder)
        self._db = _open(self.folder / INDEX_FILE, "tokens")

    def get(self, id_: str) -> TokenSpan | None:
        found = self._db.execute("SELECT split, offset, length FROM tokens WHERE id = ?", (id_,)).fetchone()
        if found is None:
            return None
        split, offset, length = found
        end = offset + length
        files = [(name, max(offset, first) - first, min(end, first + tokens) - first)
                 for name, first, tokens in self._db.execute(
                     "SELECT name, first, tokens FROM shards WHERE split = ? AND first < ? "
                     "AND first + tokens > ? ORDER BY first", (split, end, offset))]
        return TokenSpan(id_, split, offset, length, files)

    def close(self) -> None:
        self._db.close()


def index_kind(folder: str | Path) -> str | None:
    """"documents", "tokens", or None when the folder has no index."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return None
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    try:
        return dict(db.execute("SELECT key, value FROM meta")).get("kind")
    finally:
        db.close()
