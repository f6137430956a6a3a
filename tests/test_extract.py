"""corpus.extract: HTML to main text, on fixtures and on real WCXB pages."""
from __future__ import annotations

import gzip
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

from corpus.documents import (REJECTED_COLUMNS, Rejected, process_partition, read_docs,
                              write_docs)
import corpus.extract as extract_mod
from corpus.extract import ExtractTimeout, decode_html, extract, html_to_text

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


def test_http_charset_outranks_a_wrong_meta_charset():
    body = "<p>Crème brûlée à la française, déjà vu, naïveté</p>"
    html = ('<html><head><meta charset="utf-8"></head><body>' + body + "</body></html>"
            ).encode("latin-1")
    assert html_to_text(html, charset="ISO-8859-1") == "Crème brûlée à la française, déjà vu, naïveté"
    assert decode_html(html, charset="iso-8859-1").count("\ufffd") == 0
    # without the header the (wrong) meta wins and bad bytes become U+FFFD, no crash
    assert "\ufffd" in html_to_text(html)
    # a header naming another charset: Cyrillic under a wrong latin-1 meta
    ru = ('<meta charset="iso-8859-1"><p>Привет, мир</p>').encode("cp1251")
    assert html_to_text(ru, charset="windows-1251") == "Привет, мир"
    # unknown or junk header labels fall back to the page's own declaration
    assert html_to_text(ru, charset="no-such-charset") == html_to_text(ru)
    # a server-default latin-1 header on a valid UTF-8 page is not believed
    assert html_to_text("<p>café</p>".encode(), charset="ISO-8859-1") == "café"


def test_extract_step_passes_http_charset():
    html = '<meta charset="utf-8"><p>Déjà vu</p>'.encode("latin-1")
    docs = [{"id": "a", "source": "a", "html": html, "http_charset": "latin-1"},
            {"id": "b", "source": "b", "html": b"<p>plain</p>", "http_charset": None}]
    out = list(extract(docs))
    assert [o["text"] for o in out] == ["Déjà vu", "plain"]
    assert out[0]["http_charset"] == "latin-1"  # the column passes through


def test_size_cap_rejects_without_parsing(monkeypatch):
    def no_parse(*args, **kwargs):
        raise AssertionError("a page over the cap must not be parsed")

    big = b"<p>" + b"x " * 600 + b"</p>"
    monkeypatch.setattr(extract_mod, "html_to_text", no_parse)
    out = list(extract([{"id": "big", "source": "s", "html": big}], max_bytes=1000))
    assert len(out) == 1 and isinstance(out[0], Rejected)
    assert out[0].reason == "too_large"
    assert out[0].details == {"error": f"{len(big)} bytes > 1000"}
    assert out[0].doc["id"] == "big" and "html" not in out[0].doc
    assert set(out[0].details) <= set(REJECTED_COLUMNS)
    # the default cap is a module-level setting, far above real pages
    assert extract_mod.MAX_BYTES >= 6_000_000


def test_time_budget_aborts_a_slow_page_quickly():
    page = "<html><body>" + "<div><p>word <a href='#'>link</a></p></div>" * 5_000 + "</body></html>"
    start = time.perf_counter()
    out = list(extract([{"id": "slow", "source": "s", "html": page},
                        {"id": "ok", "source": "s", "html": "<p>fine</p>"}],
                       time_budget_s=0.001))
    elapsed = time.perf_counter() - start
    assert isinstance(out[0], Rejected) and out[0].reason == "extract_timeout"
    assert "error" in out[0].details and set(out[0].details) <= set(REJECTED_COLUMNS)
    assert out[1]["text"] == "fine"  # the next page is unaffected
    assert elapsed < 2.0, elapsed  # parse, then abort: it never runs on
    assert "word" in html_to_text(page)  # no budget, no abort


def test_time_budget_is_checked_inside_the_tree_walks(monkeypatch):
    # a fake clock that moves 0.1 s each time it is read: the budget of 1 s runs out
    # after ~10 looks, long after the parse, in the middle of walking 15,000 elements
    reads = []

    def fake_now():
        reads.append(1)
        return len(reads) * 0.1

    monkeypatch.setattr(extract_mod, "_now", fake_now)
    page = "<body>" + "<div><p>word <a href='#'>link</a></p></div>" * 5_000 + "</body>"
    with pytest.raises(ExtractTimeout):
        html_to_text(page, time_budget_s=1.0)
    assert 5 < len(reads) < 20, len(reads)
    monkeypatch.setattr(extract_mod, "_now", time.perf_counter)
    out = list(extract([{"id": "x", "source": "s", "html": page}], time_budget_s=None))
    assert "word" in out[0]["text"]


def test_default_budget_leaves_normal_pages_alone():
    out = list(extract([{"id": "a", "source": "s", "html": PAGE}]))
    assert out[0]["text"] == html_to_text(PAGE)
    assert extract_mod.TIME_BUDGET_S >= 1


# A realistic news page: the article body must win over everything around it.
NEWS_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Harbour reopens | Coast Gazette</title>
<script>window.dataLayer = [];</script></head>
<body class="single-post has-sidebar">
<div id="cookie-banner" class="cookie-consent">We use cookies to improve your experience.
  By continuing to browse you agree to our cookie policy. <a href="/privacy">Privacy</a>
  <a href="#" class="btn">Accept all cookies</a></div>
<div class="site-header"><a href="/" class="logo">Coast Gazette</a>
  <ul class="main-menu"><li><a href="/news">News</a></li><li><a href="/sport">Sport</a></li>
  <li><a href="/weather">Weather</a></li><li><a href="/opinion">Opinion</a></li></ul></div>
<div class="breadcrumbs"><a href="/">Home</a> › <a href="/news">News</a> › Harbour</div>
<div class="layout">
 <div class="content-column">
  <h1>Old harbour reopens after two years of repairs</h1>
  <div class="byline">By Ann Reporter, 3 March 2026</div>
  <div class="share-buttons"><a href="#">Share on Facebook</a> <a href="#">Share on X</a>
    <a href="#">Email this story</a></div>
  <div class="entry-content">
   <p>The old harbour in Porthmellow reopened on Saturday after two years of repairs to
   its sea wall, which was breached during the storms of the winter before last.</p>
   <p>Fishing boats returned to their moorings within hours, and the harbour master said
   the new wall had been built to withstand waves a third higher than the old one.</p>
   <h2>What was repaired</h2>
   <ul><li>The eastern sea wall, rebuilt in granite on new foundations</li>
   <li>Two slipways, widened for the lifeboat</li>
   <li>The fish market roof, replaced after the storm damage</li></ul>
   <table><tr><th>Work</th><th>Cost</th></tr><tr><td>Sea wall</td><td>4.1 million</td></tr>
   <tr><td>Slipways</td><td>0.6 million</td></tr></table>
   <p>Engineers measured the wall's movement with a small script:</p>
   <pre><code>for sensor in sensors:
    log(sensor.read())</code></pre>
   <p>The council expects the first summer season to bring back the visitors that kept the
   town's cafés and shops open before the closure.</p>
  </div>
  <div class="tags">Tags: <a href="/t/harbour">harbour</a> <a href="/t/storms">storms</a></div>
  <div class="related-posts"><h3>Related stories</h3><ul>
   <li><a href="/a1">Storm damage bill tops ten million pounds</a></li>
   <li><a href="/a2">Lifeboat crew rescue three from stricken yacht</a></li>
   <li><a href="/a3">Council approves new car park plan for the seafront</a></li></ul></div>
  <div id="comments" class="comments-area"><h3>2 comments</h3>
   <div class="comment">Jim: About time too, it has been a long wait.</div>
   <div class="comment">Sue: Great news for the town.</div></div>
 </div>
 <div class="sidebar">
  <div class="widget"><h3>Most read</h3><ol>
   <li><a href="/m1">Ten best beaches in the county this summer</a></li>
   <li><a href="/m2">Traffic chaos as bridge closes for a week</a></li>
   <li><a href="/m3">School wins national chess championship</a></li></ol></div>
  <div class="newsletter-signup">Get our free daily newsletter delivered to your inbox
   every morning with all the headlines.</div>
  <div class="ad-slot">Advertisement</div>
 </div>
</div>
<div class="site-footer">© 2026 Coast Gazette. All rights reserved.
 <a href="/about">About us</a> <a href="/contact">Contact</a> <a href="/jobs">Jobs</a></div>
</body></html>"""


def test_main_content_wins_over_boilerplate():
    text = html_to_text(NEWS_PAGE)
    for kept in ("Old harbour reopens after two years of repairs",
                 "The old harbour in Porthmellow reopened on Saturday",
                 "What was repaired", "Two slipways, widened for the lifeboat",
                 "Sea wall\t4.1 million", "for sensor in sensors:\n    log(sensor.read())",
                 "the visitors that kept the"):
        assert kept in text, kept
    for dropped in ("cookie", "Sport", "Weather", "Share on", "Related stories",
                    "Storm damage bill", "About time too", "Most read",
                    "Ten best beaches", "newsletter", "Advertisement", "All rights reserved",
                    "Home ›", "Tags:"):
        assert dropped not in text, dropped


def test_content_without_cms_markers_beats_link_lists():
    # no article/entry-content classes: hints and link density alone must do it
    page = NEWS_PAGE.replace('class="entry-content"', 'class="c7"').replace(
        '<div class="content-column">', '<div class="col">')
    text = html_to_text(page)
    assert "The old harbour in Porthmellow reopened on Saturday" in text
    assert "Two slipways, widened for the lifeboat" in text
    for dropped in ("cookie", "Related stories", "Ten best beaches", "All rights reserved"):
        assert dropped not in text, dropped


def test_forum_posts_are_content_not_comments():
    posts = "".join(f'<div class="comment post"><b>user{i}</b><p>' + f"Reply number {i} "
                    "with enough words to look like a real forum post about engines. " * 3
                    + "</p></div>" for i in range(8))
    page = (f'<body><ul class="nav"><li><a href="/">Forum home</a></li></ul>'
            f'<h1>Engine trouble</h1><div id="comments">{posts}</div></body>')
    text = html_to_text(page)
    assert all(f"Reply number {i}" in text for i in range(8))
    assert "Forum home" not in text


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
