"""corpus.sources: WARC input (.warc, .warc.gz per-record gzip, as Common Crawl
publishes them). The WARC files are written here with warcio's writer."""
from __future__ import annotations

import gzip
import hashlib
import io
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from warcio.archiveiterator import ArchiveIterator
from warcio.warcwriter import WARCWriter

from corpus.documents import doc_id, read_docs
from corpus.sources import (
    MAX_DECODED_BYTES,
    decode_http_body,
    fingerprint,
    http_charset,
    input_files,
    path_documents,
    write_partitions,
)

DATE = "2024-02-21T10:11:{:02d}Z"
LATIN1_PAGE = "<html><p>caf\xe9 cr\xe8me</p></html>".encode("latin-1")
GZ_PAGE = b"<html><body><p>gzipped page</p></body></html>"
CHUNKED_PAGE = b"<html><p>first chunk</p><p>second chunk</p></html>"


def http(status: str, headers: dict[str, str], body: bytes) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"HTTP/1.1 {status}\r\n{head}\r\n".encode("latin-1") + body


def chunked(body: bytes, size: int) -> bytes:
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


# (WARC-Type, target URI, record block) in file order; revisit/warcinfo built apart
RECORDS = [
    ("request", "http://example.com/latin",
     b"GET /latin HTTP/1.1\r\nHost: example.com\r\n\r\n"),
    ("response", "http://example.com/latin",
     http("200 OK", {"Content-Type": "text/html; charset=ISO-8859-1"}, LATIN1_PAGE)),
    ("response", "https://example.com/gz",
     http("200 OK", {"Content-Type": "text/html", "Content-Encoding": "gzip"},
          gzip.compress(GZ_PAGE, mtime=0))),
    ("response", "https://example.com/chunked",
     http("200 OK", {"Content-Type": 'application/xhtml+xml; charset="UTF-8"',
                     "Transfer-Encoding": "chunked"}, chunked(CHUNKED_PAGE, 20))),
    ("response", "https://example.com/missing",
     http("404 Not Found", {"Content-Type": "text/html"}, b"<p>not found</p>")),
    ("response", "https://example.com/logo.png",
     http("200 OK", {"Content-Type": "image/png"}, b"\x89PNG\r\n\x1a\n" + bytes(64))),
    ("response", "https://example.com/broken-gzip",
     http("200 OK", {"Content-Type": "text/html", "Content-Encoding": "gzip"},
          b"this is not gzip data")),
    ("response", "dns:example.com", b"20240221101112\nexample.com. 300 IN A 192.0.2.1\n"),
    ("response", "http://example.com/latin",  # the same URL again: first one wins
     http("200 OK", {"Content-Type": "text/html; charset=utf-8"}, b"<p>second capture</p>")),
    ("response", "https://example.com/deflate",
     http("200 OK", {"Content-Type": "TEXT/HTML;Charset=Windows-1252",
                     "Content-Encoding": "deflate", "Transfer-Encoding": "chunked"},
          chunked(zlib.compress(b"<p>deflated and chunked</p>"), 7))),
]


def write_warc(path, records=RECORDS, compress=True, date_offset=0):
    """A WARC as a crawler writes it: warcinfo, then `records`, then a revisit. The
    same bytes every time (fixed record ids and dates)."""
    def headers(i):
        return {"WARC-Date": DATE.format(i + date_offset),
                "WARC-Record-ID": f"<urn:uuid:00000000-0000-0000-0000-{i:012d}>"}

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=compress)
        writer.write_record(writer.create_warc_record(
            "", "warcinfo", payload=io.BytesIO(b"software: test\r\n"),
            warc_content_type="application/warc-fields", warc_headers_dict=headers(99)))
        for i, (kind, uri, block) in enumerate(records):
            extra = {"warc_content_type": "text/dns"} if uri.startswith("dns:") else {}
            writer.write_record(writer.create_warc_record(
                uri, kind, payload=io.BytesIO(block), warc_headers_dict=headers(i), **extra))
        writer.write_record(writer.create_revisit_record(
            "http://example.com/latin", "sha1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "http://example.com/latin", DATE.format(1), warc_headers_dict=headers(98)))
    return path


EXPECTED = [  # (url, fetch_date, http_charset, html)
    ("http://example.com/latin", DATE.format(1), "iso-8859-1", LATIN1_PAGE),
    ("https://example.com/gz", DATE.format(2), None, GZ_PAGE),
    ("https://example.com/chunked", DATE.format(3), "utf-8", CHUNKED_PAGE),
    ("https://example.com/deflate", DATE.format(9), "windows-1252",
     b"<p>deflated and chunked</p>"),
]


def skipped_counts(name: str) -> dict[str, int]:
    return {
        f"{name}: non-200 responses": 1,
        f"{name}: non-HTML responses": 1,
        f"{name}: responses with an undecodable Content-Encoding or chunked body": 1,
        f"{name}: non-HTTP responses": 1,
        f"{name}: repeated URLs (first capture kept)": 1,
        f"{name}: revisit records (no payload)": 1,
    }


@pytest.mark.parametrize("name,compress", [("crawl.warc.gz", True), ("crawl.warc", False)])
def test_warc_html_responses(tmp_path, name, compress):
    path = write_warc(tmp_path / name, compress=compress)
    if compress:  # gzipped per record, as Common Crawl does: one gzip member each
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    skipped = {}
    docs = list(path_documents(path, skipped=skipped))
    assert [(d["url"], d["fetch_date"], d["http_charset"], d["html"]) for d in docs] == EXPECTED
    for doc in docs:
        assert doc["source"] == doc["url"] and doc["id"] == doc_id(doc["url"])
        assert doc["text"] is None
        assert set(doc) == {"id", "source", "html", "text", "url", "fetch_date", "http_charset"}
    assert skipped == skipped_counts(name)  # warcinfo and request records aren't counted


def test_warc_folder_dedups_across_files_and_mixes_with_html(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    write_warc(root / "a.warc.gz")
    # the second crawl: same URLs again (all repeats) plus one new page
    new = ("response", "https://example.com/new",
           http("200 OK", {"Content-Type": "text/html"}, b"<p>new</p>"))
    write_warc(root / "sub" / "b.warc", RECORDS + [new], compress=False, date_offset=30)
    (root / "page.html").write_bytes(b"<p>plain file</p>")
    (root / "notes.txt").write_text("x")
    skipped = {}
    docs = list(path_documents(root, skipped=skipped))
    assert [d["source"] for d in docs] == [u for u, *_ in EXPECTED] + [
        "page.html", "https://example.com/new"]
    assert docs[-1]["fetch_date"] == DATE.format(30 + len(RECORDS))
    assert "url" not in docs[-2]  # HTML files keep their keys; write_docs fills None
    assert skipped["sub/b.warc: repeated URLs (first capture kept)"] == 1 + len(EXPECTED)
    assert skipped["a.warc.gz: repeated URLs (first capture kept)"] == 1
    assert skipped["notes.txt"].startswith("unsupported file type")
    # ids are unique, so the partitions write; the WARC columns are typed even when a
    # partition holds no WARC document or no charset
    stats = write_partitions(docs, tmp_path / "raw", docs_per_partition=2)
    assert stats["docs"] == 6 and stats["partitions"] == 3
    parts = sorted((tmp_path / "raw").glob("part-*.parquet"))
    schema = pq.read_schema(parts[0])
    for column in ("url", "fetch_date", "http_charset"):
        assert schema.field(column).type == pa.string()
    rows = [row for p in parts for row in read_docs(p)]
    assert rows[1]["http_charset"] is None and rows[0]["http_charset"] == "iso-8859-1"
    assert rows[4]["url"] is None and rows[4]["source"] == "page.html"
    assert input_files(root) == [(root / "a.warc.gz", "a.warc.gz"),
                                 (root / "page.html", "page.html"),
                                 (root / "sub" / "b.warc", "sub/b.warc")]


def record_offsets(path) -> list[int]:
    with open(path, "rb") as f:
        records = ArchiveIterator(f)
        return [records.get_record_offset() for _ in records]


@pytest.mark.parametrize("name,compress", [("cut.warc.gz", True), ("cut.warc", False)])
def test_truncated_warc_names_file_record_and_offset(tmp_path, name, compress):
    path = write_warc(tmp_path / name, compress=compress)
    offsets = record_offsets(path)
    data = path.read_bytes()
    # cut inside the last record (the revisit); the records before it are intact
    path.write_bytes(data[:offsets[-1] + (len(data) - offsets[-1]) // 2])
    skipped = {}
    docs = []
    with pytest.raises(ValueError, match=rf"{name}: WARC record {len(offsets)} \(at byte "
                                         rf"{offsets[-1]}\) is truncated.*download it again"):
        for doc in path_documents(path, skipped=skipped):
            docs.append(doc)
    assert len(docs) == len(EXPECTED)  # yielded before the error was found
    # a cut inside an HTML response's payload
    second_html = offsets[2]  # warcinfo, request, response(latin), ...
    path.write_bytes(data[:second_html + (offsets[3] - second_html) * 3 // 4])
    with pytest.raises(ValueError, match=rf"record 3 \(at byte {offsets[2]}\) is truncated"):
        list(path_documents(path))


def test_corrupt_warc_gives_a_clear_error(tmp_path, capfd):
    path = write_warc(tmp_path / "bad.warc.gz")
    offsets = record_offsets(path)
    data = path.read_bytes()
    # garbage between two gzip members
    path.write_bytes(data[:offsets[4]] + b"garbage!" * 8 + data[offsets[4]:])
    with pytest.raises(ValueError, match=rf"bad\.warc\.gz: not a readable WARC file: WARC "
                                         rf"record 5 \(at byte {offsets[4]}\): Invalid WARC "
                                         r"record.*download it again"):
        list(path_documents(path))
    # a flipped byte at the start of a small member: warcio takes the member for
    # uncompressed data and can't parse it
    path.write_bytes(data[:offsets[2] + 12] + bytes([data[offsets[2] + 12] ^ 0xFF])
                     + data[offsets[2] + 13:])
    with pytest.raises(ValueError, match=rf"bad\.warc\.gz: not a readable WARC file: WARC "
                                         rf"record 3 \(at byte {offsets[2]}\): Invalid WARC "
                                         r"record, first line: \\x8b"):
        list(path_documents(path))
    # ... and inside a large member: warcio reports the zlib error on stderr only and
    # ends the record early, which shows up as a truncated record
    page = b"<p>" + b"".join(hashlib.sha256(b"%d" % i).hexdigest().encode()
                             for i in range(2000)) + b"</p>"
    big = ("response", "https://example.com/big",
           http("200 OK", {"Content-Type": "text/html"}, page))
    write_warc(path, [big] + RECORDS)
    offsets = record_offsets(path)
    data = path.read_bytes()
    assert offsets[2] - offsets[1] > 40_000  # more than warcio's 16 KiB read block
    mid = (offsets[1] + offsets[2]) // 2
    path.write_bytes(data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:])
    with pytest.raises(ValueError, match=rf"bad\.warc\.gz: WARC record 2 \(at byte "
                                         rf"{offsets[1]}\) is truncated, \d+ bytes short"):
        list(path_documents(path))
    assert "Error -3 while decompressing data" in capfd.readouterr().err
    # not a WARC at all
    other = tmp_path / "notes.warc"
    other.write_bytes(b"hello world\n" * 5)
    with pytest.raises(ValueError, match=r"notes\.warc: not a readable WARC file: WARC "
                                         r"record 1 \(at byte 0\)"):
        list(path_documents(other))


def test_fingerprint_covers_warc_files(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    write_warc(root / "a.warc.gz")
    write_warc(root / "b.warc", compress=False)
    first = fingerprint(root)
    assert first["files"] == 2
    assert first["bytes"] == sum(p.stat().st_size for p in root.iterdir())
    data = bytearray((root / "b.warc").read_bytes())
    data[-10] ^= 1
    (root / "b.warc").write_bytes(bytes(data))
    assert fingerprint(root)["sha256"] != first["sha256"]
    assert fingerprint(root / "a.warc.gz")["files"] == 1


def test_http_helpers():
    assert http_charset('text/html; charset="UTF-8"') == "utf-8"
    assert http_charset("text/html;charset=Shift_JIS; foo=bar") == "shift_jis"
    assert http_charset("text/html") is None and http_charset(None) is None
    assert decode_http_body(b"plain", None, None) == b"plain"
    assert decode_http_body(b"plain", "chunked", None) == b"plain"  # not really chunked
    assert decode_http_body(chunked(b"abcdef", 4)[:-5], "chunked", None) == b"abcdef"
    both = gzip.compress(zlib.compress(b"twice"))  # Content-Encoding: deflate, gzip
    assert decode_http_body(both, None, "deflate, gzip") == b"twice"
    raw_deflate = zlib.compressobj(wbits=-15)
    body = raw_deflate.compress(b"raw deflate") + raw_deflate.flush()
    assert decode_http_body(body, None, "deflate") == b"raw deflate"
    # cut short (WARC-Truncated): what is there
    assert decode_http_body(gzip.compress(b"x" * 10000)[:-8], None, "gzip") == b"x" * 10000
    with pytest.raises(ValueError, match="unsupported Content-Encoding 'compress'"):
        decode_http_body(b"x", None, "compress")
    with pytest.raises(zlib.error):
        decode_http_body(b"not gzip", None, "gzip")
    bomb = gzip.compress(bytes(MAX_DECODED_BYTES + 1))
    with pytest.raises(ValueError, match="inflates to more than"):
        decode_http_body(bomb, None, "gzip")
    try:
        import brotli
    except ImportError:  # not a dependency: Common Crawl stores payloads decoded
        with pytest.raises(ValueError, match="br needs the brotli package"):
            decode_http_body(b"x", None, "br")
    else:
        assert decode_http_body(brotli.compress(b"<p>br</p>"), None, "br") == b"<p>br</p>"
