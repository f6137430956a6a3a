"""Raw inputs into raw partitions.

A raw document is a dict: `id` (the input's own id, else `doc_id(source)`), `source`
(path relative to the input root, URL, or `pydoc:<module>`), `html` (raw undecoded
bytes, None when the input gave text) and `text` (str, None when html was given).

- `pydoc_documents` / `render_pydoc`: the demo corpus, the standard library's pydoc
  HTML rendered on this machine, one subprocess per module.
- `path_documents`: a folder of HTML files, or JSONL / Parquet files of records.
- `write_partitions`: stream documents into `part-NNNNN.parquet` partitions.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import sysconfig
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow.parquet as pq

from corpus.documents import doc_id, write_docs

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- pydoc

# Standard-library modules never rendered: side effects on import (antigravity opens a
# browser, this prints), GUI, test and packaging tools.
PYDOC_EXCLUDED = frozenset({
    "antigravity", "this", "turtle", "turtledemo", "tkinter", "idlelib", "test",
    "lib2to3", "ensurepip", "venv", "pydoc_data", "__main__",
})

# Runs in a fresh interpreter in isolated mode (-I: no PYTHON* variables, no user
# site-packages, the working directory not on sys.path), so neither the project nor
# the user's setup shadows a stdlib module. Anything the module prints on import goes
# to stderr; only the page reaches stdout.
_RENDER_SCRIPT = r"""
import os, sys
out = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
sys.stdout = sys.stderr
import importlib, pydoc
name = sys.argv[1]
module = importlib.import_module(name)
page = pydoc.html.page(pydoc.describe(module), pydoc.html.document(module, name))
out.write(page.encode("utf-8", "backslashreplace"))
out.flush()
"""


# The interpreter behind any virtualenv: the pages (sys.executable, sys.path ...) then
# read the same from every checkout on this machine.
PYDOC_PYTHON = getattr(sys, "_base_executable", None) or sys.executable


def default_pydoc_modules() -> list[str]:
    """Sorted public top-level standard-library module names, minus PYDOC_EXCLUDED.
    Modules missing on this platform (msvcrt, winreg ...) stay in: they fail to
    import and are reported as skipped."""
    return sorted(name for name in sys.stdlib_module_names
                  if not name.startswith("_") and name not in PYDOC_EXCLUDED)


def pydoc_info() -> dict:
    """What the pydoc corpus depends on: it is rendered from this interpreter."""
    return {
        "python_version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "stdlib": sysconfig.get_paths()["stdlib"],  # pages name files under it
        "platform": platform.platform(),
    }


_ADDRESS = re.compile(rb"(\bat(?: |&nbsp;)0x|\bhandle )[0-9a-fA-F]{6,16}\b")


def _render_env() -> dict[str, str]:
    # A fixed, minimal environment: pydoc prints os.environ wherever it is data or a
    # default argument (os.environ, cgi.FieldStorage), and the user's environment (paths,
    # tokens, keys) must not become training data, nor make pages differ between runs.
    return {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONHASHSEED": "0"}  # set reprs (frozenset constants ...) in a fixed order


def render_module(name: str, timeout: float = 60) -> tuple[bytes | None, str | None]:
    """(html, None) or (None, why it was skipped). Never raises for a bad module."""
    if name in PYDOC_EXCLUDED:
        return None, "excluded: side effects on import, or a GUI/test/packaging tool"
    try:
        proc = subprocess.run(
            [PYDOC_PYTHON, "-I", "-W", "ignore", "-c", _RENDER_SCRIPT, name],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, env=_render_env())
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:g} s"
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
        return None, f"exit code {proc.returncode}: {lines[-1].strip() if lines else 'no message'}"
    if not proc.stdout.strip():
        return None, "rendered an empty page"
    # default values like <object object at 0x7f...> differ per run (ASLR): pin them so
    # the same interpreter renders the same bytes every time
    return _ADDRESS.sub(rb"\g<1>0", proc.stdout), None


def pydoc_document(name: str, html: bytes) -> dict:
    source = f"pydoc:{name}"
    return {"id": doc_id(source), "source": source, "html": html, "text": None}


class PydocCorpus:
    """Iterator over the pydoc pages of `modules`, in module order, rendered `workers`
    at a time. While and after iterating: `skipped` {module: reason}, `rendered`
    (module names yielded) and `seconds` (wall time of the iteration so far)."""

    def __init__(self, modules: list[str] | None = None, limit: int | None = None,
                 timeout: float = 60, workers: int = 2,
                 skipped: dict[str, str] | None = None) -> None:
        self.modules = list(modules) if modules is not None else default_pydoc_modules()
        self.limit = limit
        self.timeout = timeout
        self.workers = max(1, workers)
        self.skipped: dict[str, str] = skipped if skipped is not None else {}
        self.rendered: list[str] = []
        self.seconds = 0.0
        self._iterator: Iterator[dict] | None = None

    def __iter__(self) -> "PydocCorpus":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._generate()
        return next(self._iterator)

    def _generate(self) -> Iterator[dict]:
        started = time.perf_counter()
        names = iter(self.modules)
        pending: deque[tuple[str, Future]] = deque()
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pydoc")
        try:
            while True:
                # keep a bounded window of renders in flight; yield in module order
                while len(pending) < 2 * self.workers:
                    name = next(names, None)
                    if name is None:
                        break
                    pending.append((name, pool.submit(render_module, name, self.timeout)))
                if not pending:
                    break
                name, future = pending.popleft()
                html, reason = future.result()
                self.seconds = time.perf_counter() - started
                if html is None:
                    self.skipped[name] = reason
                    log.warning("pydoc: skipped %s (%s)", name, reason)
                    continue
                self.rendered.append(name)
                yield pydoc_document(name, html)
                if self.limit is not None and len(self.rendered) >= self.limit:
                    break
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.seconds = time.perf_counter() - started


def pydoc_documents(modules: list[str] | None = None, limit: int | None = None,
                    timeout: float = 60, workers: int = 2,
                    skipped: dict[str, str] | None = None) -> PydocCorpus:
    """The demo corpus: pydoc HTML of the standard library (default module list:
    `default_pydoc_modules()`), each module rendered in its own subprocess of this
    interpreter with `timeout` seconds. At most `limit` documents (None or 0: all).
    Modules that are excluded, fail to import or time out are skipped and listed in
    `.skipped` {module: reason}, which is the `skipped` dict if one is given."""
    return PydocCorpus(modules, limit=limit or None, timeout=timeout, workers=workers,
                       skipped=skipped)


def render_pydoc(modules: list[str] | None = None, limit: int | None = None,
                 timeout: float = 60, workers: int = 2) -> tuple[list[dict], dict[str, str]]:
    """All pydoc documents at once, and the skipped modules {name: reason}."""
    corpus = pydoc_documents(modules, limit=limit, timeout=timeout, workers=workers)
    docs = list(corpus)
    return docs, corpus.skipped


# ----------------------------------------------------------------------------- paths

HTML_SUFFIXES = (".html", ".htm", ".html.gz", ".htm.gz")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
SUPPORTED = ", ".join(HTML_SUFFIXES + RECORD_SUFFIXES)
PARQUET_BATCH_ROWS = 256
_SURROGATES = re.compile("[\ud800-\udfff]")


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(HTML_SUFFIXES):
        return "html"
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def _html_bytes(value, where: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        # Already-decoded HTML: store it as UTF-8 behind a byte-order mark, which
        # outranks any <meta charset> the page still declares when it is decoded.
        return codecs.BOM_UTF8 + value.encode("utf-8", "surrogatepass")
    raise ValueError(f"{where}: 'html' must be a string, got {type(value).__name__}")


def _record_document(record: dict, default_source: str, where: str) -> dict:
    html, text = record.get("html"), record.get("text")
    if html is None and text is None:
        raise ValueError(f"{where}: record has neither 'html' nor 'text'; "
                         "every record needs one of them")
    if html is not None:
        html, text = _html_bytes(html, where), None
    elif not isinstance(text, str):
        raise ValueError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    elif _SURROGATES.search(text):
        # JSON can carry lone surrogates ("\ud800"), which Parquet can't store: join
        # valid pairs, replace lone ones with U+FFFD
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    source = record.get("source") or record.get("url") or default_source
    id_ = record.get("id")
    return {"id": str(id_) if id_ is not None else doc_id(source), "source": source,
            "html": html, "text": text}


def _html_file(path: Path, rel: str) -> Iterator[dict]:
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: not a readable gzip file ({exc}); "
                             "re-compress it or remove it from the input") from exc
    yield {"id": doc_id(rel), "source": rel, "html": data, "text": None}


def _jsonl_file(path: Path, rel: str) -> Iterator[dict]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue  # a blank line holds no record
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: line is not valid JSON ({exc.msg}); each "
                                     "line must be one JSON object") from exc
                if not isinstance(record, dict):
                    raise ValueError(f"{where}: line is JSON {type(record).__name__}, "
                                     "not an object with an 'html' or 'text' field")
                yield _record_document(record, f"{rel}#L{lineno}", where)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it as JSONL ({exc})") from exc


def _parquet_file(path: Path, rel: str) -> Iterator[dict]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for bad files
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from exc
    names = pf.schema_arrow.names
    if "html" not in names and "text" not in names:
        raise ValueError(f"{path}: has neither an 'html' nor a 'text' column "
                         f"(columns: {', '.join(names)}); rename the content column")
    columns = [c for c in ("id", "url", "source", "html", "text") if c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        for record in batch.to_pylist():
            yield _record_document(record, f"{rel}#{row}", f"{path} row {row}")
            row += 1


_READERS = {"html": _html_file, "jsonl": _jsonl_file, "parquet": _parquet_file}


def path_documents(path: str | Path, skipped: dict[str, str] | None = None) -> Iterator[dict]:
    """Raw documents from a folder (searched recursively, in sorted order) of
    .html/.htm/.html.gz files and/or .jsonl/.jsonl.gz/.parquet files of records with
    an `html` or `text` field (optional `id`, `url`/`source`), or from one such file.
    `source` is the path relative to the folder given (the file name for a single
    file) or the record's url/source. Files of other types in a folder are logged as
    warnings and, if `skipped` is a dict, listed there {relative path: reason}.
    Raises ValueError, naming the file, for anything it cannot read."""
    root = Path(path)
    if not root.exists():
        raise ValueError(f"{root}: no such file or folder; give a folder of HTML files "
                         f"or a JSONL/Parquet file or folder ({SUPPORTED})")
    if root.is_file():
        kind = _kind(root)
        if kind is None:
            raise ValueError(f"{root}: unsupported file type; supported: {SUPPORTED} "
                             "(or give the folder that holds them)")
        yield from _READERS[kind](root, root.name)
        return
    files = sorted((f for f in root.rglob("*") if f.is_file()),
                   key=lambda f: f.relative_to(root).as_posix())
    supported = [(f, _kind(f)) for f in files]
    others = [f for f, kind in supported if kind is None]
    if len(others) == len(files):
        raise ValueError(f"{root}: no supported files ({SUPPORTED}) in this folder"
                         + (f"; it holds {len(others)} other files, e.g. "
                            f"{others[0].relative_to(root).as_posix()}" if others else
                            "; it is empty"))
    if others:
        log.warning("%s: skipping %d files of unsupported types, e.g. %s", root,
                    len(others), ", ".join(f.relative_to(root).as_posix() for f in others[:3]))
        if skipped is not None:
            for f in others:
                skipped[f.relative_to(root).as_posix()] = f"unsupported file type ({SUPPORTED})"
    for f, kind in supported:
        if kind is not None:
            yield from _READERS[kind](f, f.relative_to(root).as_posix())


def input_files(path: str | Path) -> list[tuple[Path, str]]:
    """The files `path_documents(path)` reads, as (path, relative name), in order."""
    root = Path(path)
    if root.is_file():
        return [(root, root.name)] if _kind(root) else []
    files = sorted((f for f in root.rglob("*") if f.is_file() and _kind(f)),
                   key=lambda f: f.relative_to(root).as_posix())
    return [(f, f.relative_to(root).as_posix()) for f in files]


def fingerprint(path: str | Path) -> dict:
    """Content identity of an input: {files, bytes, sha256} over the relative names and
    bytes of the files `path_documents` would read (other files don't count). Same
    content, same fingerprint, wherever the folder lives and whatever the mtimes."""
    root = Path(path)
    if not root.exists():
        raise ValueError(f"{root}: no such file or folder")
    digest = hashlib.sha256()
    n_files = n_bytes = 0
    for file, rel in input_files(root):
        digest.update(rel.encode("utf-8") + b"\0")
        size = 0
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        digest.update(size.to_bytes(8, "little"))
        n_files += 1
        n_bytes += size
    return {"files": n_files, "bytes": n_bytes, "sha256": digest.hexdigest()}


# ------------------------------------------------------------------------ partitions

def partition_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_partitions(docs: Iterable[dict], out_dir: str | Path,
                     docs_per_partition: int) -> dict:
    """Stream documents into `out_dir/part-00000.parquet`, ... of `docs_per_partition`
    documents each (the last may be smaller; no documents, no partitions), holding one
    partition in memory at a time. Returns {docs, partitions, bytes} where bytes counts
    the html (or text, UTF-8) payload. Raises ValueError on a duplicate id, naming both
    sources, and if `out_dir` already holds partitions."""
    if docs_per_partition < 1:
        raise ValueError(f"docs_per_partition must be at least 1, got {docs_per_partition}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("part-*.parquet"))
    if stale:
        raise ValueError(f"{out}: already holds {len(stale)} partitions ({stale[0].name} ...); "
                         "write raw partitions into an empty folder")
    seen: dict[str, str | None] = {}
    batch: list[dict] = []
    n_docs = n_parts = n_bytes = 0
    for doc in docs:
        id_ = doc["id"]
        if id_ in seen:
            raise ValueError(f"duplicate document id {id_!r}: {seen[id_]!r} and "
                             f"{doc.get('source')!r}; ids must be unique (give the input "
                             "distinct 'id' values or remove the duplicate)")
        seen[id_] = doc.get("source")
        payload = doc.get("html")
        if payload is None:
            payload = doc.get("text") or ""
        n_bytes += len(payload) if isinstance(payload, bytes) else len(payload.encode("utf-8"))
        n_docs += 1
        batch.append(doc)
        if len(batch) == docs_per_partition:
            write_docs(batch, out / partition_name(n_parts))
            n_parts += 1
            batch = []
    if batch:
        write_docs(batch, out / partition_name(n_parts))
        n_parts += 1
    return {"docs": n_docs, "partitions": n_parts, "bytes": n_bytes}
