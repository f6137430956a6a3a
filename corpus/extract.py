"""HTML to main text: find the main content, drop boilerplate, keep blocks as lines.

`html_to_text` decodes bytes (`decode_html`; an HTTP header charset outranks <meta>),
parses with BeautifulSoup + lxml and lays text out the way a browser's `innerText`
does: block elements start and end lines, inline whitespace collapses to one space,
`<pre>` keeps its own line breaks and indentation, table cells on one row are
separated by a tab.

Which text is kept: one post-order walk (`measure`) counts the words, and the words
inside links, of every element. The main text is the one element a CMS marks as the
article body (entry-content, itemprop=articleBody, ...; or the page's one <article>)
plus the <h1>; else the page's one <main>, if it holds most of the page's text; else
the whole page. Inside it, the layout walk leaves out boilerplate: DROP_TAGS
(script, nav, header, footer, aside, form ...), anything styled display:none or
`hidden`, landmark roles (navigation, banner, complementary ...), blocks whose class
or id say nav/menu/footer/sidebar/share/related/cookie/banner/breadcrumb/ad ... (but
not "...-content"/"...-body"), comment blocks (unless the comments are most of the
page: a forum thread), and link lists (mostly links, little other text; unless the
whole page is mostly links: a link aggregator). A block holding more than half of the
page's words is never dropped for its hints. Lists, tables and code inside the content
stay. A page left with almost no text is laid out again with fewer drops.

Guards: `extract` rejects pages over MAX_BYTES unparsed ("too_large"), pages whose
parse or extraction runs past TIME_BUDGET_S ("extract_timeout"; the parse and the
walks check the clock, no signals, so it works in Dask worker threads), and what is
not text: "binary" data (a binary file signature, or more than BINARY_SHARE control
bytes such as NUL; judged before decoding) and "not_text", text more than
NOT_TEXT_SHARE U+FFFD or control characters. A declared charset that fails badly on
the bytes gives way to charset detection; kept documents say in `decoding` how bytes
that did not decode cleanly with their declared charset were decoded.

Word-bag F1 against WCXB's ground truth (dev split, 1,337 pages with ground truth,
macro; `benchmarks/extract_quality.py`): 0.859 here vs 0.827 for trafilatura 2.3.1
(default settings) and 0.707 for plain `BeautifulSoup(html, "lxml").get_text()`; at
least trafilatura's on every page type. Speed, same run: 23.7 docs per CPU-second,
1.3x trafilatura's 18.2, 0.8x get_text's 29.6 (the lxml parse is most of the cost).
"""
from __future__ import annotations

import codecs
import re
import time
import warnings
from typing import Iterable, Iterator, NamedTuple

from bs4 import (BeautifulSoup, MarkupResemblesLocatorWarning, NavigableString, Tag,
                 XMLParsedAsHTMLWarning)
from bs4.dammit import EncodingDetector

from corpus.documents import Rejected

# Pages that look like a URL or like XML (RSS, XHTML) are still parsed as HTML, on purpose.
warnings.filterwarnings("ignore", category=MarkupResemblesLocatorWarning)
warnings.filterwarnings("ignore", category=XMLParsedAsHTMLWarning)

# Elements whose whole subtree is never main text.
DROP_TAGS = frozenset({
    "script", "style", "noscript", "nav", "header", "footer", "aside", "form",
    "template", "head", "title", "iframe", "svg", "canvas", "object", "embed",
    "select", "option", "button", "textarea", "dialog", "audio", "video", "map",
})
# Dropped even when the strict pass leaves almost nothing.
RELAXED_DROP_TAGS = DROP_TAGS - {"nav", "header", "footer", "aside", "form", "noscript",
                                 "dialog"}
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

# A page's single <main> (or role="main") element is its main text, unless it holds less
# than this many characters (an empty shell that scripts fill in).
MIN_MAIN_CHARS = 200
# ... and at least this share of the page's words outside links (a <main> holding only
# a page's hero banner, its text below it).
MIN_MAIN_SHARE = 0.5
# A page whose text is shorter than this is laid out again with RELAXED_DROP_TAGS.
MIN_TEXT_CHARS = 200

# Guards against pathological pages (both overridable per call and in the `extract`
# step). The largest WCXB page (5.3 MB, mostly scripts) parses in 0.12 s and the
# slowest takes 0.35 s end to end, but markup made of nothing but tiny elements
# (<br>, <p>, <span>a</span> ...) builds a bs4 tree at only 20k-50k nodes per second:
# 8 MiB of it took 13 to 105 s and up to 2 GB. So the parse checks the clock too
# (`_Soup`), as do the tree walks after it, and gives up past the budget; the size cap
# keeps the text and tree of a page that fits the budget in bounds.
MAX_BYTES = 8 * 2**20
TIME_BUDGET_S = 5.0
# Nodes visited between two looks at the clock.
_CLOCK_EVERY = 512
_now = time.perf_counter  # wall clock: a thread waiting on the GIL is slow too

# HTML's ASCII whitespace collapses; a no-break space is kept, as a browser keeps it
# (pydoc and many pages indent code with &nbsp;)
_ASCII_WS = " \t\n\r\f"
_WS = re.compile(r"[ \t\n\r\f]+")
_SPACES = re.compile(r" {2,}")
_TAB_SPACES = re.compile(r" *\t *")
# Bytes that neither UTF-8 nor the declared charset fit go to charset detection only
# with at least this many undecodable bytes; with fewer, detection guesses wildly, and
# windows-1252 is the HTML standard's default.
MIN_DETECT_BYTES = 64
# A declared charset fails badly (and detection gets a say) when it leaves more than this
# many bad bytes and more bad bytes than good non-ASCII characters; with fewer, the
# declaration wins (a few stray bytes on a page in the declared charset).
FEW_BAD_BYTES = 8
_DISPLAY_NONE = re.compile(r"display\s*:\s*none")
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF32_LE, "utf-32-le"),
         (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))


# Labels browsers read as a superset encoding (the WHATWG Encoding Standard), as Python
# codec names; and the JIS X 0213 variants charset detection names, which browsers
# decode as EUC-JP and Shift_JIS.
_SUPERSETS = {"iso8859-1": "cp1252", "ascii": "cp1252", "iso8859-9": "cp1254",
              "tis-620": "cp874", "iso8859-11": "cp874", "gb2312": "gb18030",
              "gbk": "gb18030", "euc_kr": "cp949", "shift_jis": "cp932",
              "euc_jis_2004": "euc_jp", "euc_jisx0213": "euc_jp",
              "shift_jis_2004": "cp932", "shift_jisx0213": "cp932"}


def _codec_name(label: str | None) -> str | None:
    """A charset label as a browser reads it, as a Python codec name: latin-1 and ASCII
    mean windows-1252, GB2312 means GB18030 and so on; UTF-16/32 named for a file that
    is read as ASCII-compatible bytes means UTF-8. None if absent or unknown to Python."""
    if not label:
        return None
    try:
        codec = codecs.lookup(label.strip().strip("\"'"))
    except (LookupError, ValueError, TypeError):
        return None
    if not getattr(codec, "_is_text_encoding", True):  # base64, rot13 ...
        return None
    name = codec.name
    if name.startswith(("utf-16", "utf-32")):
        return "utf-8"
    return _SUPERSETS.get(name, name)


# The legacy encodings of the web (the WHATWG Encoding Standard), as codec names:
# detection also names DOS and Mac code pages (cp852, mac-latin2 ...) that no browser
# decodes a page with; measured on WCXB pages re-encoded, those guesses were all wrong.
WEB_CHARSETS = frozenset(_codec_name(label) for label in (
    "utf-8", "ibm866", "iso-8859-2", "iso-8859-3", "iso-8859-4", "iso-8859-5", "iso-8859-6",
    "iso-8859-7", "iso-8859-8", "iso-8859-10", "iso-8859-13", "iso-8859-14", "iso-8859-15",
    "iso-8859-16", "koi8-r", "koi8-u", "macintosh", "mac-cyrillic", "cp874",
    "windows-1250", "windows-1251", "windows-1252", "windows-1253", "windows-1254",
    "windows-1255", "windows-1256", "windows-1257", "windows-1258", "gb18030", "big5",
    "euc-jp", "iso-2022-jp", "shift_jis", "euc-kr"))


def _declared_encoding(data: bytes) -> str | None:
    """The charset a <meta> (or XML declaration) names, read as `_codec_name` does."""
    return _codec_name(EncodingDetector.find_declared_encoding(data, is_html=True))


# Single-byte charsets that servers send by default (Apache's old ISO-8859-1 default):
# bytes that are valid, non-ASCII UTF-8 under such a header are UTF-8 (text in these
# charsets is valid UTF-8 by chance almost never).
_DEFAULT_HEADER_CHARSETS = frozenset({"cp1252"})


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Decoded(NamedTuple):
    text: str
    charset: str  # the Python codec that decoded the bytes
    # None when the bytes decoded cleanly with the charset the page declared (BOM, HTTP
    # header or <meta>) or, undeclared, as UTF-8; else what was done: the `decoding`
    # column of the extract stage
    problem: str | None


def _non_ascii(text: str) -> int:
    return len(text) - len(text.encode("ascii", "ignore"))


def _replaced(data: bytes, encoding: str) -> str | None:
    try:
        return data.decode(encoding, "replace")
    except (UnicodeError, LookupError, ValueError):  # odd codecs raise odd errors
        return None


# Charset detection reads the words that hold non-ASCII bytes, up to this many bytes of
# them: given a whole page, the detector samples a few chunks, mostly markup and
# scripts, and misreads a page whose text is a small part of it (15 languages, text
# inside 40 KB of markup: 12 read right from the words, none from the whole page).
DETECT_SAMPLE_BYTES = 2**16
_NON_ASCII_TAIL = re.compile(rb"[\x80-\xff][^\s<>]*")  # a word from its first such byte
_WORD_BREAK = re.compile(rb"[\s<>\x80-\xff]")


def _detection_sample(data: bytes) -> bytes:
    words, size = [], 0
    for match in _NON_ASCII_TAIL.finditer(data):
        start = match.start()
        # the word's ASCII head, found backwards in a few bytes (a regex that started
        # each match there would backtrack over every long ASCII token of the page)
        head = _WORD_BREAK.split(data[max(0, start - 24):start])[-1]
        words.append(head + match.group())
        size += len(words[-1]) + 1
        if size >= DETECT_SAMPLE_BYTES:
            break
    return b" ".join(words)


def _guess(data: bytes, bad: int, exclude: list[str]) -> Decoded:
    """For bytes that no declared charset fits (`bad`: how many bytes UTF-8 or the
    declared charset left undecodable): if there are at least MIN_DETECT_BYTES, charset
    detection (bs4's EncodingDetector, with charset_normalizer or chardet where
    installed) on `_detection_sample`, or on the whole page where that finds nothing;
    then UTF-8 and windows-1252, the HTML standard's default. The first candidate in
    WEB_CHARSETS and not in `exclude` that decodes strictly wins, else the first with
    bad bytes replaced."""
    names: dict[str, str] = {}  # codec: how it was found
    if bad >= MIN_DETECT_BYTES:
        for chunk in (_detection_sample(data), data):
            detector = EncodingDetector(chunk)
            labels = list(detector.encodings)  # detection (if any), UTF-8, windows-1252
            if detector.chardet_encoding:
                break
        for label in labels:
            name = _codec_name(label)
            if name in WEB_CHARSETS and name not in exclude:
                names.setdefault(name, "detected" if label == detector.chardet_encoding
                                 else "assumed")
    names.setdefault("cp1252", "assumed")
    for name, how in names.items():
        try:
            return Decoded(data.decode(name), name, f"{name} {how}")
        except (UnicodeError, LookupError, ValueError):
            pass
    for name, how in names.items():
        text = _replaced(data, name)
        if text is not None:
            return Decoded(text, name, f"{name} {how}")
    return Decoded(data.decode("cp1252", "replace"), "cp1252", "cp1252 assumed")


def decode_html(data: bytes, charset: str | None = None) -> Decoded:
    """Decode raw HTML bytes; never raises. Order, as a browser's: a byte-order mark;
    `charset`, the HTTP Content-Type header's, which outranks the page's own <meta>
    (except that a windows-1252/latin-1 header on bytes that are valid non-ASCII UTF-8
    gives way to UTF-8: that header is often a server default); the declared charset;
    UTF-8. Bytes that none of these decode: the declared charset with its bad bytes
    replaced, unless it fails badly (FEW_BAD_BYTES; one bad byte must not turn a page
    into mojibake); then `_guess` (detection), kept if it leaves fewer U+FFFD.
    Undeclared: UTF-8 with bad bytes replaced if it is mostly valid UTF-8, else
    `_guess`. The result names the charset used and, where it is not the declared one
    or bytes were replaced, what happened (`Decoded.problem`)."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            text = data[len(bom):].decode(encoding, errors="replace")
            bad = text.count("\ufffd")
            problem = f"{encoding}: {bad} bad bytes replaced" if bad else None
            return Decoded(text, encoding, problem)
    header = _codec_name(charset)
    if header in _DEFAULT_HEADER_CHARSETS and not data.isascii() and _is_utf8(data):
        header = "utf-8"
    meta = _declared_encoding(data)
    declared = [e for e in dict.fromkeys((header, meta)) if e]
    for encoding in dict.fromkeys((*declared, "utf-8")):
        try:
            text = data.decode(encoding)
        except (UnicodeError, LookupError, ValueError):
            continue
        if not declared or encoding == declared[0]:
            return Decoded(text, encoding, None)
        return Decoded(text, encoding, f"{encoding}: declared {declared[0]} does not fit")
    tries = [(t.count("\ufffd"), e, t) for e in declared if (t := _replaced(data, e)) is not None]
    if tries:
        bad, encoding, text = min(tries, key=lambda t: t[0])  # the header's on a tie
        if bad <= FEW_BAD_BYTES or bad < _non_ascii(text) - bad:  # not failing badly
            return Decoded(text, encoding, f"{encoding}: {bad} bad bytes replaced")
        guess = _guess(data, bad, declared)
        if guess.text.count("\ufffd") < bad:
            return guess._replace(problem=f"{guess.problem}; declared {encoding} left "
                                          f"{bad} bad bytes")
        return Decoded(text, encoding, f"{encoding}: {bad} bad bytes replaced, "
                                       "detection did no better")
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if bad <= max(FEW_BAD_BYTES, len(data) // 1000) and _non_ascii(text) - bad >= bad:
        return Decoded(text, "utf-8", f"utf-8: {bad} bad bytes replaced")
    guess = _guess(data, bad, ["utf-8"])
    return guess._replace(problem=f"{guess.problem}; no charset declared")


class ExtractTimeout(RuntimeError):
    """Extraction of one page ran past its time budget."""


class _Clock:
    """A deadline that tree walks check every _CLOCK_EVERY nodes (no signals: the step
    runs in Dask worker threads, where signal.alarm is not available). `count`: the
    nodes visited so far, carried from one walk to the next."""

    __slots__ = ("deadline", "budget", "count")

    def __init__(self, budget_s: float | None) -> None:
        self.budget = budget_s
        self.deadline = None if budget_s is None else _now() + budget_s
        self.count = 0

    def check(self, doing: str = "extraction") -> None:
        if self.deadline is not None and _now() > self.deadline:
            raise ExtractTimeout(f"{doing} took over {self.budget:g} s")


_NO_CLOCK = _Clock(None)


class _Soup(BeautifulSoup):
    """BeautifulSoup + lxml whose parse looks at the clock every _CLOCK_EVERY nodes.
    lxml calls back into bs4 for every tag, string and comment (`endData` sees them
    all), and an exception raised there stops the parse: a page of tiny elements just
    under MAX_BYTES otherwise parsed for 13 to 105 s here (2 busy cores)."""

    def __init__(self, markup: str, clock: _Clock) -> None:
        self._clock = clock  # before BeautifulSoup.__init__, which parses
        self._nodes = 0
        super().__init__(markup, "lxml")

    def endData(self, containerClass=None) -> None:  # noqa: N802, N803 - bs4's names
        self._nodes += 1
        if not self._nodes % _CLOCK_EVERY:
            self._clock.check("parsing")
        super().endData(containerClass)


class NotText(ValueError):
    """A document that is not text. `reason`: "binary" (judged on its bytes, before
    decoding) or "not_text" (its text is mostly U+FFFD or control characters); `value`:
    the share of control bytes, or of U+FFFD and control characters; `text`: the text,
    if there was one."""

    def __init__(self, reason: str, value: float, message: str, text: str | None = None):
        super().__init__(message)
        self.reason, self.value, self.text = reason, value, text


# Bytes that text in an ASCII-compatible charset never holds: the C0 controls but the
# whitespace \t \n \v \f \r and ESC (ISO-2022-JP escapes). Random bytes hold 10% of
# them, compressed data and images as many; WCXB's 1,358 pages none.
_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0E, 0x1B), *range(0x1C, 0x20)])
_OTHER_BYTES = bytes(b for b in range(256) if b not in _CONTROL_BYTES)
BINARY_SHARE = 0.01
# Signatures of files that get saved or served as HTML by mistake; a PDF can be
# mostly printable bytes.
_SIGNATURES = ((b"%PDF-", "PDF"), (b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"),
               (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"),
               (b"GIF89a", "GIF"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"),
               (b"7z\xbc\xaf\x27\x1c", "7z"), (b"\x7fELF", "ELF"), (b"\x00asm", "WebAssembly"))
# Characters that are not text: U+FFFD (bytes that could not be decoded), the C0
# controls but whitespace, DEL and the C1 controls. WCXB's texts hold at most 1.1%
# of them (C1 controls: mojibake that normalize repairs).
_NOT_TEXT_CHARS = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")
NOT_TEXT_SHARE = 0.10


def control_share(data: bytes) -> float:
    """The share of `data`'s bytes that are control bytes text never holds."""
    return len(data.translate(None, _OTHER_BYTES)) / len(data) if data else 0.0


def check_bytes(data: bytes) -> None:
    """Raise NotText("binary") for data that is plainly not text: a known binary file
    signature, or more than BINARY_SHARE control bytes (NUL and the like)."""
    share = control_share(data)
    for signature, kind in _SIGNATURES:
        if data.startswith(signature):
            raise NotText("binary", share, f"starts with the {kind} file signature")
    if share > BINARY_SHARE:
        raise NotText("binary", share, f"{share:.1%} of its {len(data)} bytes are control "
                                       "bytes (NUL and the like): binary data")


def check_text(text: str, decoding: str | None = None) -> None:
    """Raise NotText("not_text") for text of which more than NOT_TEXT_SHARE of the
    characters, and more than FEW_BAD_BYTES (a few stray ones in a short text are not
    noise), are U+FFFD or control characters; `decoding`, if any, goes in the message
    (how the bytes were decoded)."""
    bad = len(_NOT_TEXT_CHARS.findall(text))
    if bad > FEW_BAD_BYTES and bad > NOT_TEXT_SHARE * len(text):
        how = f" (decoding: {decoding})" if decoding else ""
        raise NotText("not_text", bad / len(text),
                      f"{bad} of its {len(text)} characters ({bad / len(text):.1%}) are U+FFFD "
                      f"or control characters{how}", text)


def _keep_anyway(tag: Tag, judge: "_Judge | None" = None) -> bool:
    """A header/footer inside an article, or a form wrapping the content, is kept."""
    name = tag.name
    if name in ("header", "footer"):
        return any(p.name in CONTENT_CONTAINERS for p in tag.parents)
    if name in ("form", "noscript"):
        if judge is not None and judge.stats.get(id(tag), (0, 0))[0] >= CONTENT_FORM_WORDS:
            return True
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
            line = line.rstrip(_ASCII_WS)
        else:
            line = _SPACES.sub(" ", line).strip(_ASCII_WS)
        if self.cur_tab:
            line = _TAB_SPACES.sub("\t", line).strip(_ASCII_WS)
        self.cur_pre = self.cur_tab = False
        if not line.strip():  # also a line of only no-break spaces
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
            if part:
                self._start_text()
                self.cur.append(part)
                self.cur_pre = True

    def cell(self) -> None:
        if self.cur and not "".join(self.cur).strip():
            self.cur = []  # only no-break spaces so far: an empty cell, no separator
            self.cur_pre = self.cur_tab = False
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


# ------------------------------------------------------------------ block scoring
# Class/id hints of boilerplate blocks, matched in each lowercased class and the id.
NEG_HINT = re.compile(
    r"nav|menu|footer|sidebar|side-bar|share|sharing|social|related|cookie|"
    r"consent|banner|breadcrumb|(?<![a-z0-9])ads?(?![a-z0-9])|advert|sponsor|promo|newsletter|"
    r"subscribe|popup|modal|pagination|pager|toolbar|signup|login|disclaimer|gdpr|"
    r"recommend|trending|outbrain|taboola|masthead|skip-link|screen-reader|sr-only|"
    r"visually-hidden|(?<![a-z0-9])tags(?![a-z0-9])|upsell|cross-?sell|recently-viewed|"
    r"rating|reviews|signature|user-?info|postprofile|avatar|member-?info|badge|"
    r"reputation|reactions|(?<![a-z])vote")
# ... unless the name ends in a content word ("sidebar-content", "nav-main-body") or
# describes the page rather than the block ("has-sidebar", "no-ads").
POS_SUFFIX = re.compile(r"(?:content|body|text|article|main|post|entry|story)s?$|"
                        r"^(?:has|no|with|without)[-_]")
# Comments are boilerplate on an article page, the content on a forum page: they are
# dropped only where they hold less than COMMENT_FRACTION of the page's words.
COMMENT_HINT = re.compile(r"comment|disqus|respond|reply|replies")
COMMENT_FRACTION = 0.25
# The article body a CMS marks: if exactly one element (the outermost) carries one of
# these names or itemprop="articleBody" and holds at least MIN_BODY_WORDS, the page's
# text is its <h1> and that element.
BODY_HINT = re.compile(
    r"(?:entry|post|article|story|blog|news)[-_]?(?:content|body|text)|articlebody|"
    r"article__body|article__content|body-text|post-entry|rich-text-article")
MIN_BODY_WORDS = 100
SELECT_BODY = True
SELECT_ARTICLE = True
# ARIA roles of boilerplate landmarks.
NEG_ROLES = frozenset({"navigation", "banner", "contentinfo", "complementary", "search",
                       "menu", "menubar", "dialog", "alertdialog", "toolbar"})
# A block holding more than this share of the page's words is a wrapper around the
# content ("page-with-sidebar"), never dropped for its hints.
WRAPPER_FRACTION = 0.5
# Blocks dropped as link lists: at least LINK_DENSITY of their words in links and fewer
# than MAX_NONLINK_WORDS words outside links.
LINK_BLOCKS = frozenset({"ul", "ol", "div", "section", "table", "dl", "menu", "p", "tr",
                         "td", "li", "span", "h2", "h3", "h4", "h5", "h6"})
LINK_DENSITY = 0.7
MAX_NONLINK_WORDS = 40
# ... except on a page with at least this share of its words in links.
LINK_PAGE_DENSITY = 0.4
# A <form> or <noscript> with at least this many words holds content, not a form.
CONTENT_FORM_WORDS = 150
# Elements whose text never counts.
_UNCOUNTED = frozenset({"script", "style", "template", "head", "title"})


def _hint(tag: Tag) -> int:
    """0: no hint; 1: boilerplate by its class or id; 2: a comment block; 3: an
    article body."""
    attrs = tag.attrs
    if attrs.get("itemprop") == "articleBody":
        return 3
    names = attrs.get("class") or []
    if isinstance(names, str):
        names = names.split()
    ident = attrs.get("id")
    if isinstance(ident, str) and ident:
        names = [*names, ident]
    found = 0
    for name in names:
        name = name.lower()
        if POS_SUFFIX.search(name):
            if BODY_HINT.search(name):
                found = 3
            continue
        if NEG_HINT.search(name):
            return 1
        if found != 3 and COMMENT_HINT.search(name):
            found = 2
    return found


class Measure(NamedTuple):
    stats: dict[int, tuple[int, int, int]]  # id(tag): (words, words in links, _hint)
    comment_words: int  # words in comment blocks (outermost ones)
    bodies: list[Tag]  # article-body elements (outermost ones), see BODY_HINT
    articles: list[Tag]  # <article> elements
    h1: Tag | None  # the first <h1>
    mains: list[Tag]  # <main> and role="main" elements


def measure(root: BeautifulSoup | Tag, clock: _Clock = _NO_CLOCK) -> Measure:
    """Word counts of every element under `root`, and the elements that can hold the
    main text, in one iterative post-order walk."""
    bodies: list[Tag] = []
    articles: list[Tag] = []
    mains: list[Tag] = []
    h1 = None
    body_depth = 0
    stats: dict[int, tuple[int, int, int]] = {}
    acc = [[0, 0]]
    # (node, 0) to enter a node; (tag, 1 + its _hint) to leave a tag
    stack: list = [(root, 0)]
    pop, push = stack.pop, stack.append
    comment_depth = comment_words = 0
    count, every, check = clock.count, _CLOCK_EVERY, clock.deadline is not None
    while stack:
        node, end = pop()
        count += 1
        if check and not count % every:
            clock.check()
        if end:
            words, links = acc.pop()
            if node.name == "a":
                links = words
            stats[id(node)] = (words, links, end - 1)
            top = acc[-1]
            top[0] += words
            top[1] += links
            if end == 3:
                comment_depth -= 1
                if not comment_depth:
                    comment_words += words
            elif end == 4:
                body_depth -= 1
        elif isinstance(node, Tag):
            name = node.name
            if name in _UNCOUNTED:
                continue
            if name == "article":
                articles.append(node)
            elif name == "h1":
                h1 = node  # the walk goes backwards: the last one seen is the first
            elif name == "main":
                mains.append(node)
            acc.append([0, 0])
            hint = 0
            if node.attrs:
                hint = _hint(node)
                if name != "main" and node.attrs.get("role") == "main":
                    mains.append(node)
            if hint == 2:
                comment_depth += 1
            elif hint == 3:
                if not body_depth:
                    bodies.append(node)
                body_depth += 1
            push((node, 1 + hint))
            for child in node.contents:
                push((child, 0))
        elif type(node) is NavigableString:
            acc[-1][0] += len(node.split())
    clock.count = count
    return Measure(stats, comment_words, bodies, articles, h1, mains)


_NOTHING = (0, 0, 0)


class _Judge:
    """Decides which blocks are boilerplate from their hints and link density."""

    __slots__ = ("stats", "wrapper_words", "drop_comments", "drop_links")

    def __init__(self, stats: dict[int, tuple[int, int, int]], page_words: int,
                 comment_words: int = 0, page_links: int = 0) -> None:
        self.stats = stats
        self.wrapper_words = WRAPPER_FRACTION * page_words
        self.drop_comments = comment_words < COMMENT_FRACTION * page_words
        # on a page made mostly of links (a link aggregator) the link lists are the content
        self.drop_links = page_links < LINK_PAGE_DENSITY * page_words

    def __call__(self, tag: Tag) -> bool:
        words, links, hint = self.stats.get(id(tag), _NOTHING)
        if not words or words > self.wrapper_words:
            return False
        if hint == 1 or (hint == 2 and self.drop_comments):
            return True
        attrs = tag.attrs
        if attrs and (attrs.get("role") in NEG_ROLES or "hidden" in attrs):
            return True
        return (self.drop_links and tag.name in LINK_BLOCKS and links >= LINK_DENSITY * words
                and words - links < MAX_NONLINK_WORDS)


def soup_to_text(soup: BeautifulSoup | Tag, clock: _Clock = _NO_CLOCK) -> str:
    """Lay out a parsed page as text, boilerplate left out (see the module docstring).
    The main text is, in order: the one element a CMS marks as the article body (or
    the one <article>), with the page's <h1>; else the one <main> (or role="main")
    element, if it holds MIN_MAIN_CHARS and MIN_MAIN_SHARE of the page's text, even
    when a misnested page has put it inside a <nav> or <header>; else the whole page.
    Within it, boilerplate blocks are left out (`_Judge`)."""
    stats, comment_words, bodies, articles, h1, mains = measure(soup, clock)
    page_words, page_links, _ = stats.get(id(soup), _NOTHING)
    judge = _Judge(stats, page_words, comment_words, page_links)
    if not (SELECT_BODY and len(bodies) == 1 and stats[id(bodies[0])][0] >= MIN_BODY_WORDS):
        bodies = []
        if SELECT_ARTICLE and len(articles) == 1 and stats[id(articles[0])][0] >= MIN_BODY_WORDS:
            bodies = articles
    if bodies:
        body = bodies[0]
        text = layout_text(body, judge=judge, clock=clock)
        if len(text) >= MIN_TEXT_CHARS:
            if h1 is not None and not any(p is body for p in h1.parents):
                title = layout_text(h1, clock=clock)
                if title:
                    text = f"{title}\n\n{text}"
            return text
    if len(mains) == 1:
        words, links, _ = stats.get(id(mains[0]), _NOTHING)
        if words - links >= MIN_MAIN_SHARE * (page_words - page_links):
            text = layout_text(mains[0], judge=judge, clock=clock)
            if len(text) >= MIN_MAIN_CHARS:
                return text
    text = layout_text(soup, judge=judge, clock=clock)
    if len(text) < MIN_TEXT_CHARS:
        # Almost nothing left: hints or link density misjudged the page, misnested
        # markup (an unclosed <header> swallowing the page) or content hidden until
        # scripts run. Step back: no scoring, then fewer dropped tags.
        for drop, drop_hidden in ((DROP_TAGS, True), (RELAXED_DROP_TAGS, False)):
            relaxed = layout_text(soup, drop, drop_hidden=drop_hidden, clock=clock)
            if len(relaxed) > len(text):
                text = relaxed
            if len(text) >= MIN_TEXT_CHARS:
                break
    return text


def layout_text(root: BeautifulSoup | Tag, drop: frozenset[str] = DROP_TAGS,
                drop_hidden: bool = True, judge=None, clock: _Clock = _NO_CLOCK) -> str:
    """The text of `root` laid out in lines, the elements in `drop` (and, if
    `drop_hidden`, those styled display:none, and those `judge` calls boilerplate)
    left out."""
    layout = _Layout()
    pre_depth = 0
    count, every, check = clock.count, _CLOCK_EVERY, clock.deadline is not None
    # iterative walk: (node, is_end_marker); pages nest deeper than the recursion limit
    stack: list[tuple[Tag | NavigableString, bool]] = [(root, False)]
    pop, push = stack.pop, stack.append
    while stack:
        node, end = pop()
        count += 1
        if check and not count % every:
            clock.check()
        if end:
            name = node.name
            if name in PRE_TAGS:
                pre_depth -= 1
            if name in BLOCK_TAGS:
                layout.block(2 if name in PARAGRAPH_TAGS else 1)
            continue
        if isinstance(node, Tag):
            name = node.name
            if node is not root:
                if name in drop and not _keep_anyway(node, judge):
                    continue
                if drop_hidden and _DISPLAY_NONE.search(node.attrs.get("style") or ""):
                    continue
                if judge is not None and not pre_depth and judge(node):
                    continue
            if name == "br":
                layout.br()
                continue
            if name in BLOCK_TAGS:
                layout.block(2 if name in PARAGRAPH_TAGS else 1)
            elif name in CELL_TAGS:
                layout.cell()
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
    clock.count = count
    return layout.result()


def _page_text(html: str | bytes, charset: str | None, clock: _Clock) -> tuple[str, str | None]:
    """(main text, decoding problem or None): `html_to_text`'s work."""
    problem = None
    if isinstance(html, (bytes, bytearray, memoryview)):
        data = bytes(html)
        check_bytes(data)
        html, _, problem = decode_html(data, charset=charset)
    soup = BeautifulSoup(html, "lxml") if clock.deadline is None else _Soup(html, clock)
    clock.check()
    text = soup_to_text(soup, clock)
    check_text(text, problem)
    return text, problem


def html_to_text(html: str | bytes, *, charset: str | None = None,
                 time_budget_s: float | None = None) -> str:
    """The main text of an HTML page, as lines (see the module docstring). `charset`:
    the HTTP header's, for bytes (it outranks <meta>). Raises NotText for binary data
    and for text that is mostly U+FFFD or control characters. With `time_budget_s`,
    raises ExtractTimeout once the parse or the work after it finds the budget spent."""
    return _page_text(html, charset, _Clock(time_budget_s))[0]


def extract(docs: Iterable[dict], *, max_bytes: int = MAX_BYTES,
            time_budget_s: float | None = TIME_BUDGET_S) -> Iterator[dict | Rejected]:
    """Step: raw documents (html or text) in, {id, source, text, decoding, ...} out; the
    html column is dropped, other columns pass through; a document's `http_charset`, if
    any, decodes its bytes ahead of their <meta> charset. `decoding` is None, or how
    bytes that did not decode cleanly with their declared charset were decoded (see
    `decode_html`). Rejects `too_large` (html over `max_bytes`, not parsed), `binary`
    (details {"value": share of control bytes, "error": ...}), `not_text` ({"value":
    share of U+FFFD and control characters in the text, "error": ...}),
    `extract_timeout` (over `time_budget_s` seconds, parse included),
    `empty_after_extract` and `extract_error` ({"error": ...}); one bad page never
    stops the rest."""
    for doc in docs:
        out = {k: v for k, v in doc.items() if k != "html"}
        out["decoding"] = None
        html = doc.get("html")
        if isinstance(html, (str, bytes, bytearray, memoryview)):
            size = len(html.encode("utf-8", "replace")) if isinstance(html, str) else len(html)
            if size > max_bytes:
                out["text"] = None
                yield Rejected(out, "too_large", {"error": f"{size} bytes > {max_bytes}"})
                continue
        try:
            if html is not None:
                text, out["decoding"] = _page_text(html, doc.get("http_charset"),
                                                   _Clock(time_budget_s))
            else:
                text = doc.get("text") or ""
                check_text(text)
        except NotText as exc:
            out["text"] = exc.text
            yield Rejected(out, exc.reason, {"value": exc.value, "error": str(exc)})
            continue
        except ExtractTimeout as exc:
            out["text"] = None
            yield Rejected(out, "extract_timeout", {"error": str(exc)})
            continue
        except Exception as exc:  # noqa: BLE001 - one page must not kill the partition
            out["text"] = None
            yield Rejected(out, "extract_error", {"error": f"{type(exc).__name__}: {exc}"})
            continue
        out["text"] = text
        if not text.strip():
            yield Rejected(out, "empty_after_extract")
        else:
            yield out
