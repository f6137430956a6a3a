"""HTML to main text: drop boilerplate elements, keep the block structure as lines.

`html_to_text` parses with BeautifulSoup + lxml and walks the tree once, the way a
browser's `innerText` lays text out: block elements start and end lines, inline
whitespace collapses to one space, `<pre>` keeps its own line breaks and indentation,
table cells on one row are separated by a tab. `extract` is the pipeline step.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

from bs4 import BeautifulSoup, NavigableString, Tag
from bs4.dammit import EncodingDetector, UnicodeDammit

from corpus.documents import Rejected

# Elements whose whole subtree is never main text.
DROP_TAGS = frozenset({
    "script", "style", "noscript", "nav", "header", "footer", "aside", "form",
    "template", "head", "title", "iframe", "svg", "canvas", "object", "embed",
    "select", "option", "button", "textarea", "dialog", "audio", "video", "map",
})
# <header>/<footer> inside these are part of the content (an article's title and
# byline), not the page's banner. A <form> or <noscript> holding an article, or at least
# five paragraphs, is kept too: ASP.NET pages wrap the whole <body> in a form, and forum
# engines (Discourse, Flarum) serve their server-rendered posts inside <noscript>.
CONTENT_CONTAINERS = ("article", "main")
# Block elements: they start and end a line. The ones in PARAGRAPH_TAGS are also
# separated from their neighbours by a blank line.
PARAGRAPH_TAGS = frozenset({
    "p", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "table", "hr",
    "figure", "listing", "xmp", "plaintext",
})
BLOCK_TAGS = PARAGRAPH_TAGS | frozenset({
    "address", "article", "aside", "body", "center", "dd", "details", "dir", "div",
    "dl", "dt", "fieldset", "figcaption", "footer", "form", "header", "hgroup", "html",
    "legend", "li", "main", "menu", "nav", "ol", "section", "summary", "ul", "tbody",
    "thead", "tfoot", "tr", "caption", "frameset", "noframes", "search",
})
PRE_TAGS = frozenset({"pre", "listing", "xmp", "plaintext"})
CELL_TAGS = frozenset({"td", "th"})

_WS = re.compile(r"[ \t\n\r\f]+")  # HTML's ASCII whitespace; NBSP is left alone
_SPACES = re.compile(r" {2,}")
_TAB_SPACES = re.compile(r" *\t *")
HIDE_HIDDEN = True
FORM_RULE = "p"
HIDE_NONE = False
_NONE = re.compile(r"display\s*:\s*none")
_LATIN1 = {"iso-8859-1", "iso8859-1", "latin-1", "latin1", "l1", "iso_8859-1",
           "us-ascii", "ascii"}


def decode_html(data: bytes) -> str:
    """Decode raw HTML bytes: BOM, then the declared charset, then UTF-8, then charset
    detection, then windows-1252; the last resort replaces undecodable bytes, so this
    never raises. Latin-1 and ASCII declarations are read as windows-1252, as browsers
    (and the HTML standard) do."""
    declared = EncodingDetector.find_declared_encoding(data, is_html=True)
    known = ["windows-1252"] if declared and declared.lower() in _LATIN1 else None
    dammit = UnicodeDammit(data, known_definite_encodings=known,
                           user_encodings=["utf-8"], is_html=True)
    if dammit.unicode_markup is None:  # only if every candidate failed even with "replace"
        return data.decode("utf-8", errors="replace")
    return dammit.unicode_markup


def _keep_anyway(tag: Tag) -> bool:
    """A header/footer inside an article, or a form wrapping the content, is kept."""
    name = tag.name
    if name in ("header", "footer"):
        return any(p.name in CONTENT_CONTAINERS for p in tag.parents)
    if name in ("form", "noscript"):
        if FORM_RULE == "keep" and name == "form": return True
        if FORM_RULE == "len" and len(tag.get_text()) > 1000: return True
        return (tag.find(CONTENT_CONTAINERS) is not None
                or len(tag.find_all("p", limit=5)) >= 5)
    return False


class _Layout:
    """Accumulates text into lines; block boundaries and <br> ask for line breaks."""

    __slots__ = ("lines", "cur", "cur_pre", "cur_tab", "pending")

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.cur: list[str] = []
        self.cur_pre = False
        self.cur_tab = False
        self.pending = 0  # line breaks requested before the next text: 0, 1 or 2

    def _flush(self) -> bool:
        """End the current line; False if it held no text."""
        if not self.cur:
            return False
        line = "".join(self.cur)
        self.cur = []
        if self.cur_pre:
            line = line.rstrip()
        else:
            line = _SPACES.sub(" ", line).strip()
        if self.cur_tab:
            line = _TAB_SPACES.sub("\t", line).strip()
        self.cur_pre = self.cur_tab = False
        if not line:
            return False
        self.lines.append(line)
        return True

    def _start_text(self) -> None:
        if self.pending:
            if self.lines:
                self.lines.extend([""] * (self.pending - 1))
            self.pending = 0

    def block(self, breaks: int) -> None:
        self._flush()
        if breaks > self.pending:
            self.pending = breaks

    def br(self) -> None:
        if not self._flush() and self.lines:
            # an empty line: <br><br> gives a blank line
            self.pending = min(self.pending + 1, 2)
        elif self.pending < 1:
            self.pending = 1

    def text(self, s: str) -> None:
        s = _WS.sub(" ", s)
        if not self.cur and (s == " " or not s):
            return
        self._start_text()
        self.cur.append(s)

    def pre_text(self, s: str) -> None:
        parts = s.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for i, part in enumerate(parts):
            if i:
                # a line break inside <pre>: keep empty lines too
                if not self._flush():
                    self._start_text()
                    self.lines.append("")
                    # a blank line is itself; further breaks count from it
            if part:
                self._start_text()
                self.cur.append(part)
                self.cur_pre = True

    def cell(self) -> None:
        if self.cur:
            self.cur.append("\t")
            self.cur_tab = True

    def result(self) -> str:
        self._flush()
        out: list[str] = []
        blank = True  # drops leading blank lines too
        for line in self.lines:
            if line:
                out.append(line)
                blank = False
            elif not blank:
                out.append("")
                blank = True
        while out and not out[-1]:
            out.pop()
        return "\n".join(out)


def _is_text(node) -> bool:
    # Comment, CData, Doctype, Declaration, ProcessingInstruction and the strings bs4
    # puts in <script>/<style>/<template> are NavigableString subclasses: skip them.
    return type(node) is NavigableString


def soup_to_text(soup: BeautifulSoup) -> str:
    layout = _Layout()
    pre_depth = 0
    # iterative walk: (node, is_end_marker); pages can nest deeper than the recursion limit
    stack: list[tuple[object, bool]] = [(soup, False)]
    pop, push = stack.pop, stack.append
    while stack:
        node, end = pop()
        if end:
            name = node.name
            if name in PRE_TAGS:
                pre_depth -= 1
            if name in BLOCK_TAGS:
                layout.block(2 if name in PARAGRAPH_TAGS else 1)
            continue
        if isinstance(node, Tag):
            name = node.name
            if name in DROP_TAGS and not _keep_anyway(node):
                continue
            if HIDE_HIDDEN and "hidden" in node.attrs:
                continue
            if HIDE_NONE and _NONE.search(node.get("style") or ""):
                continue
            if name == "br":
                layout.br()
                continue
            if name in BLOCK_TAGS:
                layout.block(2 if name in PARAGRAPH_TAGS else 1)
            elif name in CELL_TAGS:
                layout.cell()
            elif name == "img":
                continue
            if name in PRE_TAGS:
                pre_depth += 1
            push((node, True))
            children = node.contents
            for i in range(len(children) - 1, -1, -1):
                push((children[i], False))
        elif _is_text(node):
            if pre_depth:
                layout.pre_text(node)
            else:
                layout.text(node)
    return layout.result()


def html_to_text(html: str | bytes) -> str:
    """The main text of an HTML page, as lines (see the module docstring)."""
    if isinstance(html, (bytes, bytearray, memoryview)):
        html = decode_html(bytes(html))
    soup = BeautifulSoup(html, "lxml")
    return soup_to_text(soup)


def extract(docs: Iterable[dict]) -> Iterator[dict | Rejected]:
    """Step: raw documents (html or text) in, {id, source, text, ...} out; the html
    column is dropped, other columns pass through. Rejects `empty_after_extract` and
    `extract_error` (with details {"error": ...}); one bad page never stops the rest."""
    for doc in docs:
        out = {k: v for k, v in doc.items() if k != "html"}
        html = doc.get("html")
        try:
            text = html_to_text(html) if html is not None else (doc.get("text") or "")
        except Exception as exc:  # noqa: BLE001 - one page must not kill the partition
            out["text"] = None
            yield Rejected(out, "extract_error", {"error": f"{type(exc).__name__}: {exc}"})
            continue
        out["text"] = text
        if not text.strip():
            yield Rejected(out, "empty_after_extract")
        else:
            yield out
