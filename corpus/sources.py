"""Raw inputs into raw partitions.

A raw document is a dict: `id` (the input's own id, else `doc_id(source)`), `source`
(path relative to the input root, URL, or `pydoc:<module>`), `html` (raw undecoded
bytes, None when the input gave text) and `text` (str, None when html was given).

- `pydoc_documents` / `render_pydoc`: the demo corpus, the standard library's pydoc
  HTML rendered on this machine, one subprocess per module.
- `path_documents`: a folder of HTML files, JSONL / Parquet files of records, or WARC
  files (as Common Crawl publishes them: HTML `response` records, see `_warc_file`).
- `write_partitions`: stream documents into `part-NNNNN.parquet` partitions.
"""
from __future__ import annotations

import codecs
import functools
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
import zlib
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, Iterable, Iterator, Literal

import pyarrow.parquet as pq
from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed
from warcio.statusandheaders import StatusAndHeadersParser, StatusAndHeadersParserException

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from corpus.documents import as_path, doc_id, write_docs

log = logging.getLogger(__name__)


@dataclass(config=ConfigDict(strict=True, extra="forbid", validate_assignment=True))
class SourceConfig:
    """What goes in: the stdlib's pydoc pages (the demo) or your own files."""
    kind: Literal["pydoc", "path"] = Field("pydoc", description=(
        "pydoc: the stdlib docs rendered here | path: your own files"))
    path: str = Field("", description=(
        "kind=path: a folder of .html/.htm/.html.gz, WARC, .jsonl or .parquet files (html or "
        "text column); its files' contents, not the path, make the version"))
    pydoc_limit: int = Field(0, ge=0, description="kind=pydoc: at most N pages (0 = all)")
    docs_per_partition: int = Field(32, ge=1, le=1_000_000, description="documents per Parquet partition")

    UNVERSIONED: ClassVar[tuple[str, ...]] = ("path",)

    @model_validator(mode="after")
    def _path_for_kind(self):
        if self.kind == "path" and not self.path:
            raise ValueError("kind = 'path' needs path = the folder or file to read")
        return self

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
WARC_SUFFIXES = (".warc", ".warc.gz")
SUPPORTED = ", ".join(HTML_SUFFIXES + RECORD_SUFFIXES + WARC_SUFFIXES)
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
    if name.endswith(WARC_SUFFIXES):
        return "warc"
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
    for key in ("source", "url"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__} "
                             f"{record[key]!r}; store it as text")
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


# ----------------------------------------------------------------------------- WARC

HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
# Records that never hold a document: not counted as skipped.
WARC_NON_DOCUMENT_TYPES = frozenset({"warcinfo", "request", "metadata"})
WARC_CHUNK = 1 << 16
MAX_DECODED_BYTES = 64 << 20  # a compressed body inflating past this is skipped
_HTTP_PARSER = StatusAndHeadersParser(["HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/2.0"])
_CHARSET = re.compile(r"""charset\s*=\s*["']?([^\s;"',]+)""", re.IGNORECASE)
# skipped reasons, counted per WARC file as {"<file>: <reason>": count}
SKIP_REVISIT = "revisit records (no payload)"
SKIP_NOT_HTTP = "non-HTTP responses"
SKIP_STATUS = "non-200 responses"
SKIP_NOT_HTML = "non-HTML responses"
SKIP_ENCODING = "responses with an undecodable Content-Encoding or chunked body"
SKIP_DUPLICATE = "repeated URLs (first capture kept)"


def http_charset(content_type: str | None) -> str | None:
    """The charset parameter of a Content-Type header, lowercased, or None."""
    match = _CHARSET.search(content_type or "")
    return match.group(1).lower() if match else None


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _dechunk(body: bytes) -> bytes:
    """Undo `Transfer-Encoding: chunked`. A body that doesn't start with a chunk
    header is returned as it is (servers send that header with plain bodies); one cut
    off mid-chunk (WARC-Truncated) keeps what is there. Raises ValueError if malformed."""
    out, pos = [], 0
    while True:
        eol = body.find(b"\n", pos)
        line = (body[pos:] if eol < 0 else body[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(line, 16)
        except ValueError:
            if pos == 0:
                return body
            if eol < 0 and not line:
                return b"".join(out)  # truncated after a chunk
            raise ValueError(f"bad chunk header {line[:20]!r} at byte {pos}") from None
        if size == 0 or eol < 0:
            return b"".join(out)
        out.append(body[eol + 1:eol + 1 + size])
        pos = eol + 1 + size
        if body[pos:pos + 2] == b"\r\n":
            pos += 2
        elif body[pos:pos + 1] == b"\n":
            pos += 1
        elif pos < len(body):
            raise ValueError(f"chunk of {size} bytes not followed by CRLF")


def _decompress(data: bytes, encoding: str) -> bytes:
    if encoding in ("gzip", "x-gzip"):
        obj = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    elif encoding == "deflate":  # zlib-wrapped as the RFC says, or raw as some servers send
        obj = zlib.decompressobj(wbits=zlib.MAX_WBITS if data[:1] == b"\x78"
                                 else -zlib.MAX_WBITS)
    elif encoding == "br":
        try:
            import brotli
        except ImportError:
            raise ValueError("Content-Encoding br needs the brotli package") from None
        return brotli.decompress(data)
    else:
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")
    # a stream cut short (WARC-Truncated) gives what it holds; corrupt data raises
    out = obj.decompress(data, MAX_DECODED_BYTES)
    if obj.unconsumed_tail:
        raise ValueError(f"{encoding} body inflates to more than {MAX_DECODED_BYTES} bytes")
    return out


def decode_http_body(body: bytes, transfer_encoding: str | None,
                     content_encoding: str | None) -> bytes:
    """The payload as the server meant it: chunked transfer coding undone, then the
    content codings (gzip, x-gzip, deflate, br, identity) in reverse order. Raises
    ValueError (or zlib.error) for a body it can't decode."""
    if transfer_encoding and "chunked" in transfer_encoding.lower():
        body = _dechunk(body)
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    for coding in reversed([c for c in codings if c and c != "identity"]):
        body = _decompress(body, coding)
    return body


class _BadRecord(Exception):
    """A record cut short or broken: says what, to follow 'WARC record N (at byte X)'."""


def _short(limit_reader) -> _BadRecord:
    return _BadRecord(f"is truncated, {limit_reader.limit} bytes short of its "
                      "Content-Length")


def _read_all(limit_reader) -> bytes:
    data = limit_reader.read()
    if getattr(limit_reader, "limit", 0):
        raise _short(limit_reader)
    return data


def _drain(limit_reader) -> None:
    while limit_reader.read(WARC_CHUNK):
        pass
    if getattr(limit_reader, "limit", 0):
        raise _short(limit_reader)


def _warc_file(path: Path, rel: str, skipped: dict[str, str | int] | None = None,
               seen: set[str] | None = None) -> Iterator[dict]:
    """HTML documents from a WARC file (.warc, or .warc.gz compressed per record as
    Common Crawl publishes them): `response` records of http(s) URLs with status 200
    and an HTML Content-Type (text/html, application/xhtml+xml; the HTTP header, else
    WARC-Identified-Payload-Type). Each document: id = doc_id(url), source = url =
    WARC-Target-URI, fetch_date = WARC-Date (ISO 8601, as written), http_charset (of
    the HTTP Content-Type, lowercased, or None), html = the payload bytes with
    transfer/content codings undone but the charset not decoded, text None.

    Other records are counted, not listed, into `skipped` as {"<rel>: <reason>": n}:
    revisits, non-HTTP, non-200, non-HTML, undecodable bodies, and URLs already in
    `seen` (ids are unique: the first capture of a URL wins; `seen` spans the files
    of one `path_documents` call). warcinfo/request/metadata records are not counted.

    A truncated or corrupt file raises ValueError naming the file, the record number
    and its byte offset (warcio can't resume after a broken record: its gzip reader
    loses its place, and a short record may be the last one)."""
    counts: Counter[str] = Counter()
    seen = set() if seen is None else seen
    number, records = 0, None
    try:
        with open(path, "rb") as f:
            records = ArchiveIterator(f, no_record_parse=True)
            while True:
                number += 1  # the record being read, for errors
                try:
                    record = next(records)
                except StopIteration:
                    break
                if record.length is None:
                    raise _BadRecord("is truncated or corrupt: its header has no "
                                     "Content-Length")
                doc = _warc_document(record, counts, seen)
                if doc is not None:
                    yield doc
    except _BadRecord as exc:
        raise ValueError(
            f"{path}: WARC record {number} (at byte {_offset(records)}) {exc}; the file "
            "is incomplete or corrupt: download it again, or remove it from the input"
        ) from None
    except (ArchiveLoadFailed, StatusAndHeadersParserException, ValueError, OSError,
            EOFError, zlib.error) as exc:
        raise ValueError(
            f"{path}: not a readable WARC file: WARC record {number} (at byte "
            f"{_offset(records)}): {_brief(exc)}; the file is corrupt or not a WARC: "
            "download it again, or remove it from the input (a .warc.gz must be gzipped "
            "per record: `warcio recompress` fixes one gzipped whole)") from exc
    finally:
        if skipped is not None:
            for reason, n in counts.items():
                skipped[f"{rel}: {reason}"] = n


def _offset(records) -> int:
    """Where the record being read starts (in the compressed file for .warc.gz)."""
    return getattr(records, "offset", 0) or 0


def _brief(exc: Exception) -> str:
    """An exception's message on one short line: warcio quotes the bytes it choked on."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 120 else text[:120] + "..."


def _warc_document(record, counts: Counter, seen: set[str]) -> dict | None:
    """One WARC record's document, or None (counted into `counts` if it was a
    capture). Reads the record to its end either way; raises _BadRecord if it is short."""
    raw = record.raw_stream
    kind = record.rec_type
    url = record.rec_headers.get_header("WARC-Target-URI") or ""
    if kind != "response":
        if kind == "revisit":
            counts[SKIP_REVISIT] += 1
        elif kind not in WARC_NON_DOCUMENT_TYPES:
            counts[f"{kind} records"] += 1
        _drain(raw)
        return None
    if not url.lower().startswith(("http://", "https://")):
        counts[SKIP_NOT_HTTP] += 1
        _drain(raw)
        return None
    try:
        http = _HTTP_PARSER.parse(raw)
    except (StatusAndHeadersParserException, EOFError):
        counts[SKIP_NOT_HTTP] += 1
        _drain(raw)
        return None
    if http.get_statuscode() != "200":
        counts[SKIP_STATUS] += 1
        _drain(raw)
        return None
    content_type = http.get_header("Content-Type")
    media = _media_type(content_type) or _media_type(
        record.rec_headers.get_header("WARC-Identified-Payload-Type"))
    if media not in HTML_TYPES:
        counts[SKIP_NOT_HTML] += 1
        _drain(raw)
        return None
    body = _read_all(raw)
    try:
        html = decode_http_body(body, http.get_header("Transfer-Encoding"),
                                http.get_header("Content-Encoding"))
    except Exception as exc:  # noqa: BLE001 - zlib.error, ValueError, brotli.error ...
        log.debug("%s: undecodable body (%s)", url, exc)
        counts[SKIP_ENCODING] += 1
        return None
    id_ = doc_id(url)
    if id_ in seen:
        counts[SKIP_DUPLICATE] += 1
        return None
    seen.add(id_)
    return {"id": id_, "source": url, "html": html, "text": None, "url": url,
            "fetch_date": record.rec_headers.get_header("WARC-Date"),
            "http_charset": http_charset(content_type)}


_READERS = {"html": _html_file, "jsonl": _jsonl_file, "parquet": _parquet_file,
            "warc": _warc_file}


def path_documents(path: str | Path,
                   skipped: dict[str, str | int] | None = None) -> Iterator[dict]:
    """Raw documents from a folder (searched recursively, in sorted order) of
    .html/.htm/.html.gz files, .jsonl/.jsonl.gz/.parquet files of records with an
    `html` or `text` field (optional `id`, `url`/`source`) and/or .warc/.warc.gz files,
    or from one such file. `source` is the path relative to the folder given (the file
    name for a single file), the record's url/source, or a WARC record's target URI.
    WARC documents also carry `url`, `fetch_date` and `http_charset` (see `_warc_file`).
    Files of other types in a folder are logged as warnings and, if `skipped` is a
    dict, listed there {relative path: reason}; WARC records not read are counted
    there {"<relative path>: <reason>": count}.
    Raises ValueError, naming the file, for anything it cannot read."""
    seen_urls: set[str] = set()  # WARC captures: the first of a URL wins, in all files
    readers = {**_READERS,
               "warc": functools.partial(_warc_file, skipped=skipped, seen=seen_urls)}
    root = Path(path)
    if not root.exists():
        raise ValueError(f"{root}: no such file or folder; give a folder of HTML files "
                         f"or a JSONL/Parquet file or folder ({SUPPORTED})")
    if root.is_file():
        kind = _kind(root)
        if kind is None:
            raise ValueError(f"{root}: unsupported file type; supported: {SUPPORTED} "
                             "(or give the folder that holds them)")
        yield from readers[kind](root, root.name)
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
            yield from readers[kind](f, f.relative_to(root).as_posix())


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

# Every raw partition has these columns, whatever mix of inputs it came from (None
# where an input has no such field: an HTML file has no fetch date).
RAW_COLUMNS = ("id", "source", "html", "text", "url", "fetch_date", "http_charset")


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
    out = as_path(out_dir)
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
            write_docs(batch, out / partition_name(n_parts), columns=RAW_COLUMNS)
            n_parts += 1
            batch = []
    if batch:
        write_docs(batch, out / partition_name(n_parts), columns=RAW_COLUMNS)
        n_parts += 1
    return {"docs": n_docs, "partitions": n_parts, "bytes": n_bytes}
