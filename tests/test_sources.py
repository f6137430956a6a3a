"""corpus.sources: pydoc rendering, reading inputs, writing raw partitions."""
from __future__ import annotations

import gzip
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus.documents import doc_id, read_docs
from corpus.sources import (RAW_COLUMNS,
    PYDOC_EXCLUDED,
    default_pydoc_modules,
    path_documents,
    pydoc_documents,
    pydoc_info,
    render_module,
    render_pydoc,
    write_partitions,
)

# ----------------------------------------------------------------------------- pydoc


def test_pydoc_renders_real_pages_and_reports_skips():
    corpus = pydoc_documents(["json", "textwrap", "antigravity", "no_such_module"])
    docs = list(corpus)
    assert [d["source"] for d in docs] == ["pydoc:json", "pydoc:textwrap"]
    for doc, name in zip(docs, ["json", "textwrap"]):
        assert doc["id"] == doc_id(f"pydoc:{name}")
        assert doc["text"] is None and isinstance(doc["html"], bytes)
        html = doc["html"].decode("utf-8")
        assert html.lstrip().lower().startswith("<!doctype html>")
        assert "<title>Python: " in html and name in html
    assert b"dumps" in docs[0]["html"] and b"TextWrapper" in docs[1]["html"]
    assert set(corpus.skipped) == {"antigravity", "no_such_module"}
    assert "excluded" in corpus.skipped["antigravity"]
    assert "No module named 'no_such_module'" in corpus.skipped["no_such_module"]
    assert corpus.rendered == ["json", "textwrap"] and corpus.seconds > 0


def test_pydoc_limit_timeout_and_helpers():
    docs, skipped = render_pydoc(["textwrap", "json", "html"], limit=1)
    assert [d["source"] for d in docs] == ["pydoc:textwrap"] and skipped == {}
    html, reason = render_module("json", timeout=0.001)
    assert html is None and "timed out" in reason
    modules = default_pydoc_modules()
    assert modules == sorted(modules) and "json" in modules and "os" in modules
    assert not any(m.startswith("_") for m in modules)
    assert not PYDOC_EXCLUDED & set(modules)
    assert set(modules) <= set(sys.stdlib_module_names)
    info = pydoc_info()
    assert info["python_version"].count(".") == 2 and info["implementation"]


def test_pydoc_pages_are_reproducible():
    # json's page shows a default value with a memory address; pinned, two renders match
    first, second = render_module("json")[0], render_module("json")[0]
    assert first == second and b" at 0x0&gt;" in first


def test_pydoc_pages_never_carry_the_users_environment(monkeypatch):
    # pydoc prints os.environ as data of `os`: a secret in the caller's environment
    # would otherwise become training data
    monkeypatch.setenv("C2M_CANARY_SECRET", "hunter2-do-not-train-on-me")
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    html, reason = render_module("os")
    assert reason is None and b"environ" in html
    assert b"hunter2-do-not-train-on-me" not in html and b"C2M_CANARY_SECRET" not in html
    assert b"/somewhere/else" not in html


def test_pydoc_module_printing_on_import_does_not_corrupt_the_page(tmp_path, monkeypatch):
    # `this` prints the Zen of Python on import; render it anyway (bypassing the
    # exclusion list) and check only the page reaches stdout
    monkeypatch.setattr("corpus.sources.PYDOC_EXCLUDED", frozenset())
    html, reason = render_module("this")
    assert reason is None
    assert html.lstrip().lower().startswith(b"<!doctype html>")
    assert b"Beautiful is better than ugly." not in html


# ----------------------------------------------------------------------------- paths


@pytest.fixture
def html_folder(tmp_path):
    root = tmp_path / "site"
    (root / "sub").mkdir(parents=True)
    (root / "b.html").write_bytes(b"<p>b page</p>")
    (root / "a.htm").write_bytes("<meta charset=latin-1><p>caf\xe9</p>".encode("latin-1"))
    (root / "sub" / "c.html.gz").write_bytes(gzip.compress(b"<p>c page</p>"))
    (root / "notes.txt").write_text("not a page")
    return root


def test_path_documents_html_folder(html_folder):
    skipped = {}
    docs = list(path_documents(html_folder, skipped=skipped))
    assert [d["source"] for d in docs] == ["a.htm", "b.html", "sub/c.html.gz"]
    assert [d["id"] for d in docs] == [doc_id(d["source"]) for d in docs]
    assert docs[0]["html"] == "<meta charset=latin-1><p>caf\xe9</p>".encode("latin-1")  # raw
    assert docs[2]["html"] == b"<p>c page</p>"  # gunzipped
    assert all(d["text"] is None for d in docs)
    assert list(skipped) == ["notes.txt"]
    # a single file: source is its name
    assert [d["source"] for d in path_documents(html_folder / "sub" / "c.html.gz")] == \
        ["c.html.gz"]


def test_path_documents_jsonl_text(tmp_path):
    lines = [{"text": "first", "url": "https://example.com/1"},
             {"id": 7, "text": "second"},
             {"html": "<meta charset=latin-1><p>café</p>", "source": "s3"}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    docs = list(path_documents(path))
    assert docs[0] == {"id": doc_id("https://example.com/1"), "source": "https://example.com/1",
                       "html": None, "text": "first"}
    assert docs[1]["id"] == "7" and docs[1]["source"] == "docs.jsonl#L2"
    # decoded HTML from JSON is stored as UTF-8 behind a BOM, which outranks the meta tag
    from corpus.extract import html_to_text
    assert docs[2]["text"] is None and html_to_text(docs[2]["html"]) == "café"
    gz = tmp_path / "more.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "zipped"}\n'))
    assert [d["text"] for d in path_documents(gz)] == ["zipped"]


def test_path_documents_parquet_html(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"html": pa.array([b"<p>one</p>", b"<p>two</p>"], pa.binary()),
                             "url": ["u1", "u2"]}), folder / "a.parquet")
    pq.write_table(pa.table({"html": ["<p>three</p>"], "id": ["x3"]}), folder / "b.parquet")
    docs = list(path_documents(folder))
    assert [(d["id"], d["source"]) for d in docs] == [
        (doc_id("u1"), "u1"), (doc_id("u2"), "u2"), ("x3", "b.parquet#0")]
    assert docs[0]["html"] == b"<p>one</p>" and docs[0]["text"] is None
    assert docs[2]["html"].endswith(b"<p>three</p>")


def test_path_documents_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        list(path_documents(tmp_path / "missing"))
    odd = tmp_path / "page.txt"
    odd.write_text("x")
    with pytest.raises(ValueError, match=r"page\.txt: unsupported file type"):
        list(path_documents(odd))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: line is not valid JSON"):
        list(path_documents(bad))
    neither = tmp_path / "neither.jsonl"
    neither.write_text('{"text": "ok"}\n{"url": "u"}\n')
    with pytest.raises(ValueError, match=r"neither\.jsonl:2: record has neither 'html' nor"):
        list(path_documents(neither))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no supported files.*empty"):
        list(path_documents(tmp_path / "empty"))
    (tmp_path / "others").mkdir()
    (tmp_path / "others" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="no supported files.*readme.md"):
        list(path_documents(tmp_path / "others"))
    cols = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"body": ["x"]}), cols)
    with pytest.raises(ValueError, match=r"cols\.parquet: has neither an 'html' nor a 'text'"):
        list(path_documents(cols))
    badgz = tmp_path / "bad.html.gz"
    badgz.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"bad\.html\.gz: not a readable gzip"):
        list(path_documents(badgz))
    ints = tmp_path / "ints.parquet"  # a url column of integers: named, not an ArrowTypeError
    pq.write_table(pa.table({"text": ["a", "b"], "url": [17, 18]}), ints)
    with pytest.raises(ValueError, match=r"ints\.parquet row 0: 'url' must be a string, got int 17"):
        list(path_documents(ints))


# ------------------------------------------------------------------------ partitions


def make_docs(n: int) -> list[dict]:
    return [{"id": f"id{i}", "source": f"s{i}", "html": f"<p>{i}</p>".encode(), "text": None}
            for i in range(n)]


def test_write_partitions_sizes_and_round_trip(tmp_path):
    docs = make_docs(25)
    out = tmp_path / "raw"

    def stream():
        for i, doc in enumerate(docs):
            # streaming: partition k is on disk before the first doc of partition k+1
            if i and i % 10 == 0:
                assert (out / f"part-{i // 10 - 1:05d}.parquet").exists()
            yield doc

    stats = write_partitions(stream(), out, docs_per_partition=10)
    assert stats == {"docs": 25, "partitions": 3,
                     "bytes": sum(len(d["html"]) for d in docs)}
    parts = sorted(out.glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet",
                                       "part-00002.parquet"]
    assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [10, 10, 5]
    # every raw partition has the same columns; fields an input lacks are None
    assert [row for p in parts for row in read_docs(p)] == [
        {**dict.fromkeys(RAW_COLUMNS), **d} for d in docs]


def test_write_partitions_text_docs_and_errors(tmp_path):
    texts = [{"id": "t", "source": "x", "html": None, "text": "héllo"}]
    assert write_partitions(texts, tmp_path / "t", 5)["bytes"] == len("héllo".encode())
    with pytest.raises(ValueError, match="already holds 1 partitions"):
        write_partitions(texts, tmp_path / "t", 5)
    dup = make_docs(3) + [{"id": "id1", "source": "other", "html": b"x", "text": None}]
    with pytest.raises(ValueError, match=r"duplicate document id 'id1': 's1' and 'other'"):
        write_partitions(dup, tmp_path / "d", 2)
    assert write_partitions([], tmp_path / "e", 2) == {"docs": 0, "partitions": 0, "bytes": 0}


def test_fingerprint_follows_content(tmp_path, html_folder):
    from corpus.sources import fingerprint
    first = fingerprint(html_folder)
    assert first["files"] == 3 and first["bytes"] > 0 and len(first["sha256"]) == 64
    (html_folder / "notes.txt").write_text("unsupported files don't count")
    assert fingerprint(html_folder) == first
    moved = tmp_path / "elsewhere"
    html_folder.rename(moved)
    assert fingerprint(moved) == first  # location doesn't matter
    (moved / "b.html").write_bytes(b"<p>B page</p>")
    assert fingerprint(moved)["sha256"] != first["sha256"]
    with pytest.raises(ValueError, match="no such file"):
        fingerprint(tmp_path / "missing")


def test_pydoc_skipped_dict_and_zero_limit():
    skipped: dict[str, str] = {}
    docs = list(pydoc_documents(["no_such_module", "textwrap"], limit=0, skipped=skipped))
    assert [d["source"] for d in docs] == ["pydoc:textwrap"]
    assert list(skipped) == ["no_such_module"]


def test_binary_files_saved_as_html_are_read_raw_and_rejected_by_extract(tmp_path):
    # the sources stage passes a file's bytes on as they are; extract names what they are
    from corpus.documents import Rejected
    from corpus.extract import extract

    (tmp_path / "noise.html").write_bytes(os.urandom(166_000))
    (tmp_path / "logo.htm").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(4000))
    (tmp_path / "twice.html.gz").write_bytes(gzip.compress(gzip.compress(b"<p>x</p>")))
    (tmp_path / "page.html").write_bytes(b"<p>a real page</p>")
    docs = list(path_documents(tmp_path))
    assert [d["source"] for d in docs] == ["logo.htm", "noise.html", "page.html",
                                           "twice.html.gz"]
    assert docs[1]["html"] == (tmp_path / "noise.html").read_bytes()
    out = {(o.doc if isinstance(o, Rejected) else o)["source"]: o for o in extract(docs)}
    assert out["page.html"]["text"] == "a real page"
    for name, error in (("noise.html", "bytes are control bytes"),
                        ("logo.htm", "starts with the PNG file signature"),
                        ("twice.html.gz", "starts with the gzip file signature")):
        assert isinstance(out[name], Rejected) and out[name].reason == "binary", name
        assert error in out[name].details["error"] and out[name].details["value"] >= 0
