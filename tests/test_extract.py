"""corpus.extract: HTML to main text, on fixtures and on real WCXB pages."""
from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

from corpus.documents import Rejected, process_partition, read_docs, write_docs
from corpus.extract import extract, html_to_text

WCXB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wcxb-dev"
N_PAGES = 50

PAGE = """<!DOCTYPE html>
<html><head><title>Page title</title><style>p { color: red }</style>
<script>var tracking = "SCRIPT_TEXT";</script></head>
<body>
<header><a href="/">Logo</a> SITE_BANNER</header>
<nav><ul><li><a href="/">Home</a></li><li>NAV_LINK</li></ul></nav>
<article>
  <h1>Fish   &amp; chips</h1>
  <p>First    paragraph
     spans <b>two</b> source lines&nbsp;here.</p>
  <p>Second<br>line two of the second</p>
  <ul><li>apple</li><li>pear <i>and</i> plum</li></ul>
  <pre>
def f(x):
    if x:
        return 1

    return 2
</pre>
  <table><tr><th>Name</th><th>Qty</th></tr><tr><td>eggs</td><td> 12 </td></tr></table>
  <div>outer<div>inner</div>after</div>
  <p>Entities: &lt;tag&gt; &quot;q&quot; &eacute; &#8364; &#x263A;</p>
</article>
<!-- COMMENT_TEXT -->
<aside>ASIDE_TEXT</aside>
<form><label>Email</label><input name="e"> FORM_TEXT <button>Subscribe</button></form>
<noscript>NOSCRIPT_TEXT</noscript>
<template><p>TEMPLATE_TEXT</p></template>
<footer>FOOTER_TEXT &copy; 2026</footer>
</body></html>"""


@pytest.fixture(scope="module")
def page_text() -> str:
    return html_to_text(PAGE)


def test_boilerplate_elements_are_dropped(page_text):
    for marker in ("SCRIPT_TEXT", "SITE_BANNER", "NAV_LINK", "COMMENT_TEXT", "ASIDE_TEXT",
                   "FORM_TEXT", "Subscribe", "NOSCRIPT_TEXT", "TEMPLATE_TEXT",
                   "FOOTER_TEXT", "Page title", "color: red"):
        assert marker not in page_text, marker


def test_block_structure_becomes_lines(page_text):
    lines = page_text.split("\n")
    assert lines[0] == "Fish & chips"
    # inline whitespace collapses, the paragraph is one line, &nbsp; stays a no-break space
    assert "First paragraph spans two source lines\xa0here." in lines
    assert "Second" in lines and "line two of the second" in lines
    assert "apple" in lines and "pear and plum" in lines
    assert ["outer", "inner", "after"] == lines[lines.index("outer"):lines.index("outer") + 3]
    # paragraphs are separated by one blank line, never more
    assert "\n\n\n" not in page_text
    assert page_text == page_text.strip()
    assert all(line == line.strip(" \t") for line in lines if not line.startswith(" "))


def test_pre_keeps_line_breaks_and_indentation(page_text):
    assert "def f(x):\n    if x:\n        return 1\n\n    return 2" in page_text


def test_table_cells_on_one_row(page_text):
    assert "Name\tQty" in page_text.split("\n")
    assert "eggs\t12" in page_text.split("\n")


def test_entities_are_decoded(page_text):
    assert 'Entities: <tag> "q" é € ☺' in page_text


def test_runs_of_breaks_collapse():
    text = html_to_text("<div>a</div><br><br><br><br><p></p><p> </p><div>b<br><br>c</div>")
    assert text == "a\n\nb\n\nc"


def test_main_element_is_the_text_when_present():
    body = "<p>" + "Main content sentence. " * 20 + "</p>"
    html = f"<body><div>Sidebar junk</div><main>{body}</main><div>More junk</div></body>"
    text = html_to_text(html)
    assert "junk" not in text and text.startswith("Main content sentence.")
    # a nearly empty <main> (filled in by scripts) is not trusted
    assert "junk" in html_to_text("<body><div>Sidebar junk</div><main> </main></body>")


def test_misnested_header_does_not_swallow_the_page():
    # an unclosed <header>: the parser nests the whole page in it
    html = "<body><header><a>Logo</a><div><p>" + "Real text here. " * 30 + "</p></div>"
    assert "Real text here." in html_to_text(html)


def test_cp1252_bytes_with_declared_charset():
    html = ('<html><head><meta http-equiv="Content-Type" content="text/html; '
            'charset=iso-8859-1"></head><body><p>Caf\xe9 \u201cna\xefve\u201d \u2014 '
            '5\u20ac</p></body></html>').encode("cp1252")
    # declared latin-1 is read as windows-1252, as browsers do: the quotes survive
    assert html_to_text(html) == "Café “naïve” — 5€"


def test_other_declared_charset():
    html = '<meta charset="windows-1251"><p>Привет, мир</p>'.encode("cp1251")
    assert html_to_text(html) == "Привет, мир"


def test_invalid_utf8_bytes_do_not_crash():
    html = b'<meta charset="utf-8"><p>good caf\xc3\xa9 \xff\xfe bad \xc3( bytes</p>'
    text = html_to_text(html)
    assert text.startswith("good café") and "bytes" in text
    # undeclared, mostly UTF-8: stays UTF-8, bad bytes replaced
    assert html_to_text(b"<p>na\xc3\xafve \x80 ok</p>") == "naïve \ufffd ok"
    assert isinstance(html_to_text(bytes(range(256)) * 4), str)


def test_undeclared_legacy_encodings():
    short = "<p>Café crème brûlée, ‘naïve’</p>".encode("cp1252")  # too short to detect
    assert html_to_text(short) == "Café crème brûlée, ‘naïve’"
    russian = ("<p>" + "Привет, мир! Как дела? Всё хорошо, спасибо. " * 5 + "</p>").encode("cp1251")
    assert html_to_text(russian).startswith("Привет, мир! Как дела? Всё хорошо")


def test_utf8_bom_outranks_meta_charset():
    html = b"\xef\xbb\xbf<meta charset=iso-8859-1><p>caf\xc3\xa9</p>"
    assert html_to_text(html) == "café"


def test_extract_step_rejects_and_keeps_ids():
    docs = [
        {"id": "a", "source": "a.html", "html": b"<p>Hello <b>world</b></p>", "text": None},
        {"id": "b", "source": "b.html", "html": b"<html><body><script>x()</script></body>",
         "text": None},
        {"id": "c", "source": "c.txt", "html": None, "text": "plain text given"},
        {"id": "d", "source": "d.txt", "html": None, "text": "   \n "},
        {"id": "e", "source": "e.html", "html": 12345, "text": None},  # not HTML at all
    ]
    out = list(extract(iter(docs)))
    assert len(out) == len(docs)
    kept = [o for o in out if not isinstance(o, Rejected)]
    rejected = [o for o in out if isinstance(o, Rejected)]
    assert [d["id"] for d in kept] == ["a", "c"]
    assert kept[0] == {"id": "a", "source": "a.html", "text": "Hello world"}
    assert kept[1]["text"] == "plain text given" and "html" not in kept[1]
    assert [(r.doc["id"], r.reason) for r in rejected] == [
        ("b", "empty_after_extract"), ("d", "empty_after_extract"), ("e", "extract_error")]
    assert "error" in rejected[2].details and rejected[2].details["error"]


def test_extract_through_process_partition(tmp_path):
    rows = [{"id": f"d{i}", "source": f"{i}.html",
             "html": (f"<p>document {i}</p>" if i % 3 else "<p> </p>").encode(), "text": None}
            for i in range(9)]
    write_docs(rows, tmp_path / "part-00000.parquet")
    (tmp_path / "out").mkdir()  # process_partition expects its output folder to exist
    stats = process_partition(extract, tmp_path / "part-00000.parquet", tmp_path / "out")
    assert (stats["docs_in"], stats["docs_out"], stats["docs_rejected"]) == (9, 6, 3)
    assert stats["reasons"] == {"empty_after_extract": 3}
    kept = list(read_docs(tmp_path / "out" / "docs" / "part-00000.parquet"))
    assert [d["text"] for d in kept] == [f"document {i}" for i in range(9) if i % 3]
    assert "html" not in kept[0]
    rejected = list(read_docs(tmp_path / "out" / "rejected" / "part-00000.parquet"))
    assert {r["id"] for r in rejected} == {"d0", "d3", "d6"}


# ---------------------------------------------------------------- real pages (WCXB)

WORD = re.compile(r"\w+")


def word_f1(predicted: str, truth: str) -> float:
    p, t = Counter(WORD.findall(predicted.lower())), Counter(WORD.findall(truth.lower()))
    common = sum((p & t).values())
    if not common:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(t.values())
    return 2 * precision * recall / (precision + recall)


def wcxb_pages(n: int) -> list[tuple[str, bytes, str]]:
    """n pages spread over the split: (id, html bytes, ground-truth main content)."""
    index = WCXB / "index.jsonl"
    if not index.exists():
        pytest.fail(f"WCXB data missing: {index} not found; the real test data must be at "
                    f"{WCXB} (see /work/shared/data/README.md)")
    ids = [json.loads(line)["id"] for line in index.read_text().splitlines() if line]
    pages = []
    for id_ in ids[::len(ids) // n]:
        truth = json.loads((WCXB / "ground-truth" / f"{id_}.json").read_text())
        main = truth["ground_truth"].get("main_content")
        if main:  # a few pages have no ground truth
            pages.append((id_, gzip.decompress((WCXB / "html" / f"{id_}.html.gz").read_bytes()),
                          main))
    return pages[:n]


def test_wcxb_word_f1_beats_naive_get_text():
    pages = wcxb_pages(N_PAGES)
    assert len(pages) == N_PAGES
    ours = [word_f1(html_to_text(html), truth) for _, html, truth in pages]
    naive = [word_f1(BeautifulSoup(html, "lxml").get_text(), truth) for _, html, truth in pages]
    ours_f1, naive_f1 = sum(ours) / len(ours), sum(naive) / len(naive)
    print(f"WCXB {len(pages)} pages: word-bag F1 ours {ours_f1:.3f}, naive {naive_f1:.3f}")
    assert ours_f1 > naive_f1 + 0.05, (ours_f1, naive_f1)
    assert ours_f1 > 0.75
    # no page may come out empty unless its HTML holds (almost) no text at all
    empty = [id_ for (id_, html, _), f in zip(pages, ours) if f == 0.0]
    assert len(empty) <= 2, empty
