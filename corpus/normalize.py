"""Unicode repair and whitespace normalisation of extracted text.

`normalize_text` runs ftfy with its default configuration (mojibake, C1 controls,
leftover HTML entities, terminal escapes, ligatures, full-width characters, curly
quotes to straight ones, NFC), line by line exactly as `ftfy.fix_text` does, but keeping
ftfy's explanation of each fix; then it normalises whitespace. `normalize` is the
pipeline step.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import ftfy

from corpus.documents import Rejected

FTFY_CONFIG = ftfy.TextFixerConfig(explain=True)

# A segment made only of these characters is left alone by every ftfy fix (no
# entities, escapes, control characters or non-ASCII text): skip the call.
_NEEDS_FTFY = re.compile(r"[^\t\n\x0c\x20-\x25\x27-\x7e]")
# Unicode space separators other than the plain space (NBSP, en/em spaces, thin space,
# ideographic space ...), which NFC leaves alone.
_ODD_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_LINE_BREAKS = re.compile("\r\n?|[\x0b\x0c\x85\u2028\u2029]")
_TRAILING = re.compile(r"[ \t]+(?=\n|\Z)")
_BLANK_RUNS = re.compile(r"\n{3,}")


def _fix_name(action: str, parameter: str) -> str:
    if action in ("apply", "transcode"):
        return parameter
    return f"{action}:{parameter}"  # encode:sloppy-windows-1252, decode:utf-8, normalize:NFC


def ftfy_fix(text: str) -> tuple[str, list[str]]:
    """`ftfy.fix_text(text)` (same segmentation, same result) plus the names of the
    fixes it applied, in first-applied order."""
    config = FTFY_CONFIG
    fixes: dict[str, None] = {}
    out: list[str] = []
    pos, n = 0, len(text)
    while pos < n:
        textbreak = text.find("\n", pos) + 1
        if textbreak == 0:
            textbreak = n
        if textbreak - pos > config.max_decode_length:
            textbreak = pos + config.max_decode_length
        segment = text[pos:textbreak]
        pos = textbreak
        if config.unescape_html == "auto" and "<" in segment:
            # as ftfy.fix_text: text with "<" in it is HTML-like; unescaping from here
            # on would change its meaning
            config = config._replace(unescape_html=False)
        if not _NEEDS_FTFY.search(segment):
            out.append(segment)
            continue
        fixed, explanation = ftfy.fix_and_explain(segment, config)
        out.append(fixed)
        for action, parameter in explanation or ():
            fixes[_fix_name(action, parameter)] = None
    return "".join(out), list(fixes)


def normalize_whitespace(text: str) -> str:
    """Line breaks to \\n, odd spaces to " ", no trailing spaces on lines, at most one
    blank line in a row, no leading blank lines or trailing whitespace. Indentation
    (leading spaces and tabs) is kept: code depends on it."""
    text = _LINE_BREAKS.sub("\n", text)
    text = _ODD_SPACES.sub(" ", text)
    text = _TRAILING.sub("", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.lstrip("\n").rstrip()


def normalize_text(text: str) -> tuple[str, list[str]]:
    """Repaired, whitespace-normalised text and the names of the fixes applied (ftfy's
    explanation steps, then "whitespace" if that pass changed anything)."""
    fixed, fixes = ftfy_fix(text)
    spaced = normalize_whitespace(fixed)
    if spaced != fixed:
        fixes.append("whitespace")
    return spaced, fixes


def normalize(docs: Iterable[dict]) -> Iterator[dict | Rejected]:
    """Step: updates `text`, adds `normalized_changed` (bool) and `normalize_fixes`
    (list of fix names); rejects `empty_after_normalize` (the rejected row keeps the
    text as it was before normalisation)."""
    for doc in docs:
        before = doc.get("text") or ""
        text, fixes = normalize_text(before)
        if not text.strip():
            yield Rejected(doc, "empty_after_normalize")
            continue
        out = dict(doc)
        out["text"] = text
        out["normalized_changed"] = text != before
        out["normalize_fixes"] = fixes
        yield out
