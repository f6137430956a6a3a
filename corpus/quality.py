"""Heuristic quality filters: Gopher quality and repetition, C4, FineWeb.

Written from the published definitions: Gopher (Rae et al. 2021, "Scaling Language
Models", appendix A.1.1 and table A1), C4 (Raffel et al. 2020, section 2.2) and FineWeb
(Penedo et al. 2024, section 3.3 "custom filters"; defaults as in the FineWeb quality
filter of datatrove). Every rule drops the document with a named reason and the measured
value: `Rejected(doc, "gopher_symbol_ratio", {"value": 0.23})`.

Shared units (computed once per document, lazily):
- lines: the text split on "\\n", each stripped, empty ones left out.
- paragraphs: the text split on blank lines, stripped, empty ones left out.
- words: whitespace-separated tokens, as they are (punctuation attached, case kept).
  Word characters = the sum of the tokens' lengths (no whitespace).

Definitions where the papers leave room:
- Duplicate lines/paragraphs: every occurrence after the first counts as a duplicate
  (what would go if the repeats were removed). *_dup_lines = duplicates / lines;
  *_dup_line_chars = characters of the duplicates / characters of all lines. Same for
  paragraphs.
- Top n-gram fraction (n=2..4): the most frequent word n-gram that occurs at least twice
  (ties: the one with more characters, then the one occurring first); value = word characters covered by its
  occurrences (a word in two overlapping occurrences counts once) / word characters.
  A document with no repeated n-gram scores 0.
- Duplicate n-gram fraction (n=5..10): word characters covered by any n-gram occurring
  more than once, overlaps counted once, / word characters.
- gopher_symbol_ratio: Gopher's "symbol-to-word ratio greater than 0.1 for either the
  hash symbol or the ellipsis" -- two ratios ("#" count / words and "..."-or-"…" count /
  words); the value is the larger.
- gopher_stop_words: occurrences (not distinct words) of the, be, to, of, and, that,
  have, with, case-insensitive. Non-English text fails this rule, as in Gopher.
- Terminal punctuation (C4 and FineWeb): a line ending in . ! ? " ' ” ’ 。！？.
- c4_punctuation: C4 keeps only lines ending in terminal punctuation. As a document
  filter it counts those lines and drops the document when fewer than
  `min_punct_lines` (default 1: the page C4's line filter would empty). The fraction
  variant is fineweb_line_punctuation.
- c4_javascript / c4_policy: C4 drops lines mentioning "javascript" (its notices) and,
  in its released code, lines with cookie/privacy-policy phrases; here the document goes
  when the fraction of such lines is above the threshold. c4_policy is off by default.
- c4_curly_brace: C4 drops any page with "{"; that removes every code page (the pydoc
  corpus entirely), so it is off by default. Value: the number of "{".
- fineweb_dup_line_chars: characters in duplicate lines / characters of all lines, the
  same quantity as gopher_dup_line_chars. FineWeb's paper text gives the threshold as
  0.1; the released FineWeb filter (datatrove FineWebQualityFilter) uses 0.01, the
  default here.
- fineweb_list_like (off by default): lines / words above 0.3 (FineWeb counts "\\n"
  characters; here non-empty lines, so blank lines between paragraphs do not count).

Evaluation order (the first failing rule names the reason): gopher_quality, c4, fineweb,
gopher_repetition -- cheap checks first, the n-gram counts last and only for documents
the other rules kept. `quality_failures` lists every failing rule, order-independent.

Config: QualityConfig, one typed group per rule family (GopherQuality, C4, FineWeb,
GopherRepetition), each with `enabled`, its thresholds and `skip` (reason names of rules
turned off); in TOML, [quality.<group>] tables. `quality_config({group: {...}})` builds one
from partial settings.
"""
from __future__ import annotations

import dataclasses
import re
from functools import cached_property
from typing import Callable, Iterable, Iterator, Literal

import numpy as np
from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from corpus.documents import Rejected

GROUP_ORDER = ("gopher_quality", "c4", "fineweb", "gopher_repetition")

STOP_WORDS = re.compile(r"(?<!\w)(?:the|be|to|of|and|that|have|with)(?!\w)")
BULLETS = ("•", "‣", "◦", "⁃", "▪", "▫", "●", "○", "■", "□", "►", "▶", "➢", "➤", "·",
           "-", "*", "–")
ELLIPSES = ("...", "…")
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？")
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                  "use of cookies", "use cookies")
# a whitespace-delimited token with no letter in it (only digits, "_" and punctuation)
_NO_ALPHA_WORD = re.compile(r"(?<!\S)(?:[\d_]|[^\w\s])+(?!\S)").findall
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


class QualityStats:
    """Quantities the rules share, each computed at most once per document."""

    def __init__(self, text: str):
        self.text = text
        self._ngram_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @cached_property
    def lines(self) -> list[str]:
        return [s for s in (line.strip() for line in self.text.split("\n")) if s]

    @cached_property
    def line_chars(self) -> int:
        return sum(map(len, self.lines))

    @cached_property
    def paragraphs(self) -> list[str]:
        return [s for s in (p.strip() for p in _PARAGRAPH_BREAK.split(self.text)) if s]

    @cached_property
    def words(self) -> list[str]:
        return self.text.split()

    @cached_property
    def word_chars(self) -> int:
        return sum(map(len, self.words))

    @cached_property
    def lower(self) -> str:
        return self.text.lower()

    @cached_property
    def dup_lines(self) -> tuple[int, int]:
        return _duplicates(self.lines)

    @cached_property
    def dup_paragraphs(self) -> tuple[int, int]:
        return _duplicates(self.paragraphs)

    @cached_property
    def punct_lines(self) -> int:
        return sum(1 for line in self.lines if line.endswith(TERMINAL_PUNCT))

    @cached_property
    def _word_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.words), dtype=np.int64, count=len(self.words))

    def _ngram_ids(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(id of the n-gram starting at each position, occurrences of each id): exact,
        built from the (n-1)-gram ids and the next word's id, one sort per n."""
        if n not in self._ngram_cache:
            if n == 1:
                index = {w: i for i, w in enumerate(dict.fromkeys(self.words))}
                ids = np.fromiter(map(index.__getitem__, self.words), dtype=np.int64,
                                  count=len(self.words))
                counts = np.bincount(ids)
            else:
                prev, prev_counts = self._ngram_ids(n - 1)
                if len(prev) < 2 or prev_counts.max() < 2:
                    # no (n-1)-gram repeats, so no n-gram does: all distinct
                    ids = np.arange(max(len(prev) - 1, 0), dtype=np.int64)
                    counts = np.ones(len(ids), dtype=np.int64)
                else:
                    words, vocab = self._ngram_ids(1)
                    # (n-1)-gram id and next word id -> one int64, distinct per pair
                    pairs = prev[:-1] * len(vocab) + words[n - 1:]
                    _, ids, counts = np.unique(pairs, return_inverse=True,
                                               return_counts=True)
            self._ngram_cache[n] = ids, counts
        return self._ngram_cache[n]

    # ---- the values of the rules
    def line_fraction(self, count: int) -> float:
        return count / len(self.lines) if self.lines else 0.0

    def mean_word_length(self) -> float:
        return self.word_chars / len(self.words) if self.words else 0.0

    def symbol_ratio(self) -> float:
        if not self.words:
            return 0.0
        hashes = self.text.count("#")
        ellipses = self.text.count("...") + self.text.count("…")
        return max(hashes, ellipses) / len(self.words)

    def alpha_words(self) -> float:
        if not self.words:
            return 0.0
        return 1 - len(_NO_ALPHA_WORD(self.text)) / len(self.words)

    def stop_words(self, enough: int) -> int:
        """Stop-word occurrences, counted up to `enough` (the count is exact below it)."""
        n = 0
        for _ in STOP_WORDS.finditer(self.lower):
            n += 1
            if n >= enough:
                break
        return n

    def lines_containing(self, phrases: tuple[str, ...]) -> float:
        if not any(p in self.lower for p in phrases):
            return 0.0
        hits = sum(1 for line in self.lines if any(p in line.lower() for p in phrases))
        return self.line_fraction(hits)

    def top_ngram(self, n: int) -> float:
        """Characters covered by the most frequent repeated n-gram / word characters."""
        ids, counts = self._ngram_ids(n)
        if len(ids) == 0 or counts.max() < 2:
            return 0.0
        top = np.flatnonzero(counts[ids] == counts.max())  # positions of the most frequent
        chars = self._span_chars(n)[top]
        best = ids[top[np.argmax(chars)]]                   # ties: the most characters
        return self._covered(ids == best, n)

    def dup_ngram(self, n: int) -> float:
        """Characters covered by n-grams that occur more than once / word characters."""
        ids, counts = self._ngram_ids(n)
        if len(ids) == 0 or counts.max() < 2:
            return 0.0
        return self._covered(counts[ids] > 1, n)

    def _span_chars(self, n: int) -> np.ndarray:
        """Word characters of the n words starting at each position."""
        prefix = np.concatenate(([0], np.cumsum(self._word_lengths)))
        return prefix[n:] - prefix[:-n]

    def _covered(self, starts: np.ndarray, n: int) -> float:
        """Word characters in the union of the n-word spans at the `starts` mask."""
        if not self.word_chars:
            return 0.0
        # word j is covered when a span starts in [j-n+1, j]
        started = np.concatenate(([0], np.cumsum(starts, dtype=np.int64)))
        j = np.arange(len(self.words))
        hi = np.minimum(j + 1, len(starts))
        lo = np.minimum(np.maximum(j - n + 1, 0), len(starts))
        covered = started[hi] - started[lo] > 0
        return float(self._word_lengths[covered].sum()) / self.word_chars

def _duplicates(items: list[str]) -> tuple[int, int]:
    """(count, characters) of the items that repeat an earlier item."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


# (group, reason, value(stats, group config), fails(value, group config))
Rule = tuple[str, str, Callable[[QualityStats, dict], float], Callable[[float, dict], bool]]
RULES: list[Rule] = [
    ("gopher_quality", "gopher_word_count", lambda s, g: len(s.words),
     lambda v, g: not g["min_words"] <= v <= g["max_words"]),
    ("gopher_quality", "gopher_mean_word_length", lambda s, g: s.mean_word_length(),
     lambda v, g: not g["min_mean_word_length"] <= v <= g["max_mean_word_length"]),
    ("gopher_quality", "gopher_symbol_ratio", lambda s, g: s.symbol_ratio(),
     lambda v, g: v > g["max_symbol_word_ratio"]),
    ("gopher_quality", "gopher_bullet_lines",
     lambda s, g: s.line_fraction(sum(1 for line in s.lines if line.startswith(BULLETS))),
     lambda v, g: v > g["max_bullet_lines"]),
    ("gopher_quality", "gopher_ellipsis_lines",
     lambda s, g: s.line_fraction(sum(1 for line in s.lines if line.endswith(ELLIPSES))),
     lambda v, g: v > g["max_ellipsis_lines"]),
    ("gopher_quality", "gopher_alpha_words", lambda s, g: s.alpha_words(),
     lambda v, g: v < g["min_alpha_words"]),
    ("gopher_quality", "gopher_stop_words", lambda s, g: s.stop_words(g["min_stop_words"]),
     lambda v, g: v < g["min_stop_words"]),

    ("c4", "c4_lorem_ipsum", lambda s, g: float("lorem ipsum" in s.lower),
     lambda v, g: v > 0),
    ("c4", "c4_curly_brace", lambda s, g: s.text.count("{"), lambda v, g: v > 0),
    ("c4", "c4_javascript", lambda s, g: s.lines_containing(("javascript",)),
     lambda v, g: v > g["max_javascript_lines"]),
    ("c4", "c4_policy", lambda s, g: s.lines_containing(POLICY_PHRASES),
     lambda v, g: v > g["max_policy_lines"]),
    ("c4", "c4_punctuation", lambda s, g: s.punct_lines,
     lambda v, g: v < g["min_punct_lines"]),

    ("fineweb", "fineweb_line_punctuation", lambda s, g: s.line_fraction(s.punct_lines),
     lambda v, g: v < g["min_line_punct"]),
    ("fineweb", "fineweb_short_lines",
     lambda s, g: s.line_fraction(sum(1 for line in s.lines
                                      if len(line) <= g["short_line_chars"])),
     lambda v, g: v > g["max_short_lines"]),
    ("fineweb", "fineweb_dup_line_chars", lambda s, g: _ratio(s.dup_lines[1], s.line_chars),
     lambda v, g: v > g["max_dup_line_chars"]),
    ("fineweb", "fineweb_list_like", lambda s, g: _ratio(len(s.lines), len(s.words)),
     lambda v, g: v > g["max_lines_per_word"]),

    ("gopher_repetition", "gopher_dup_lines",
     lambda s, g: _ratio(s.dup_lines[0], len(s.lines)), lambda v, g: v > g["max_dup_lines"]),
    ("gopher_repetition", "gopher_dup_paragraphs",
     lambda s, g: _ratio(s.dup_paragraphs[0], len(s.paragraphs)),
     lambda v, g: v > g["max_dup_paragraphs"]),
    ("gopher_repetition", "gopher_dup_line_chars",
     lambda s, g: _ratio(s.dup_lines[1], s.line_chars),
     lambda v, g: v > g["max_dup_line_chars"]),
    ("gopher_repetition", "gopher_dup_paragraph_chars",
     lambda s, g: _ratio(s.dup_paragraphs[1], sum(map(len, s.paragraphs))),
     lambda v, g: v > g["max_dup_paragraph_chars"]),
    *[("gopher_repetition", f"gopher_top_{n}gram",
       (lambda n: lambda s, g: s.top_ngram(n))(n),
       (lambda n: lambda v, g: v > g[f"max_top_{n}gram"])(n)) for n in (2, 3, 4)],
    *[("gopher_repetition", f"gopher_dup_{n}gram",
       (lambda n: lambda s, g: s.dup_ngram(n))(n),
       (lambda n: lambda v, g: v > g[f"max_dup_{n}gram"])(n)) for n in range(5, 11)],
]
REASONS: dict[str, tuple[str, ...]] = {
    group: tuple(r for g, r, _, _ in RULES if g == group) for group in GROUP_ORDER}
_ORDERED_RULES = [rule for group in GROUP_ORDER for rule in RULES if rule[0] == group]


# ----------------------------------------------------------------------------- config

_STRICT = ConfigDict(strict=True, extra="forbid", validate_assignment=True)
_SKIP = "reason names of this group's rules to turn off"


@dataclass(config=_STRICT)
class GopherQuality:
    """Gopher quality rules (Rae et al. 2021, A.1.1)."""
    enabled: bool = True
    min_words: int = Field(50, ge=0, description="fewer words: gopher_word_count")
    max_words: int = Field(100_000, ge=1, description="more words: gopher_word_count")
    min_mean_word_length: float = Field(3.0, ge=0)
    max_mean_word_length: float = Field(10.0, ge=0)
    max_symbol_word_ratio: float = Field(0.1, ge=0, description='"#" or "..."/"…" per word')
    max_bullet_lines: float = Field(0.9, ge=0, le=1)
    max_ellipsis_lines: float = Field(0.3, ge=0, le=1)
    min_alpha_words: float = Field(0.8, ge=0, le=1)
    min_stop_words: int = Field(2, ge=0, description="English only: non-English docs drop here")
    skip: list[Literal[REASONS["gopher_quality"]]] = Field(default_factory=list, description=_SKIP)

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) is above max_words ({self.max_words})")
        return self


@dataclass(config=_STRICT)
class GopherRepetition:
    """Gopher repetition rules: duplicate lines, paragraphs and n-grams (table A1)."""
    enabled: bool = True
    max_dup_lines: float = Field(0.30, ge=0, le=1)
    max_dup_paragraphs: float = Field(0.30, ge=0, le=1)
    max_dup_line_chars: float = Field(0.20, ge=0, le=1)
    max_dup_paragraph_chars: float = Field(0.20, ge=0, le=1)
    max_top_2gram: float = Field(0.20, ge=0, le=1)
    max_top_3gram: float = Field(0.18, ge=0, le=1)
    max_top_4gram: float = Field(0.16, ge=0, le=1)
    max_dup_5gram: float = Field(0.15, ge=0, le=1)
    max_dup_6gram: float = Field(0.14, ge=0, le=1)
    max_dup_7gram: float = Field(0.13, ge=0, le=1)
    max_dup_8gram: float = Field(0.12, ge=0, le=1)
    max_dup_9gram: float = Field(0.11, ge=0, le=1)
    max_dup_10gram: float = Field(0.10, ge=0, le=1)
    skip: list[Literal[REASONS["gopher_repetition"]]] = Field(default_factory=list, description=_SKIP)


@dataclass(config=_STRICT)
class C4:
    """C4 rules (Raffel et al. 2020, 2.2) as document filters."""
    enabled: bool = True
    min_punct_lines: int = Field(1, ge=0, description="drop if fewer lines end in . ! ? \" ' etc.")
    max_javascript_lines: float = Field(0.1, ge=0, le=1)
    max_policy_lines: float = Field(0.1, ge=0, le=1)
    skip: list[Literal[REASONS["c4"]]] = Field(
        default_factory=lambda: ["c4_curly_brace", "c4_policy"],
        description=_SKIP + "; the curly-brace rule drops every code page")


@dataclass(config=_STRICT)
class FineWeb:
    """FineWeb's custom filters (Penedo et al. 2024, 3.3)."""
    enabled: bool = True
    min_line_punct: float = Field(0.12, ge=0, le=1)
    max_short_lines: float = Field(0.67, ge=0, le=1)
    short_line_chars: int = Field(30, ge=0)
    max_dup_line_chars: float = Field(0.01, ge=0, le=1, description=(
        "datatrove's value; the paper's text says 0.1"))
    max_lines_per_word: float = Field(0.3, ge=0)
    skip: list[Literal[REASONS["fineweb"]]] = Field(
        default_factory=lambda: ["fineweb_list_like"], description=_SKIP)


GROUPS = {"gopher_quality": GopherQuality, "c4": C4, "fineweb": FineWeb,
          "gopher_repetition": GopherRepetition}


@dataclass(config=_STRICT)
class QualityConfig:
    """Heuristic document filters; the first failing rule names the drop reason.
    Drop rates on WCXB: benchmarks/quality_filters.py."""
    gopher_quality: GopherQuality = Field(default_factory=GopherQuality)
    c4: C4 = Field(default_factory=C4)
    fineweb: FineWeb = Field(default_factory=FineWeb)
    gopher_repetition: GopherRepetition = Field(default_factory=GopherRepetition)


def quality_config(groups: dict[str, dict] | None = None) -> QualityConfig:
    """A QualityConfig from {group: {setting: value}}, the rest defaults."""
    groups = groups or {}
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown quality groups {sorted(unknown)}; groups are {', '.join(GROUPS)}")
    return QualityConfig(**{g: GROUPS[g](**values) for g, values in groups.items()})


def _active_rules(config: QualityConfig | None) -> list[tuple[Rule, dict]]:
    groups = dataclasses.asdict(config or QualityConfig())
    return [(rule, groups[rule[0]]) for rule in _ORDERED_RULES
            if groups[rule[0]]["enabled"] and rule[1] not in groups[rule[0]]["skip"]]


# ----------------------------------------------------------------------------- API

def _failures(text: str, rules: list[tuple[Rule, dict]]) -> Iterator[tuple[str, dict]]:
    stats = QualityStats(text)
    for (_, reason, value_of, fails), group_config in rules:
        value = value_of(stats, group_config)
        if fails(value, group_config):
            yield reason, {"value": float(value)}


def quality_reason(text: str, config: QualityConfig | None = None) -> tuple[str, dict] | None:
    """(reason, {"value": ...}) for the first failing rule, None if the text is kept."""
    return next(_failures(text, _active_rules(config)), None)


def quality_failures(text: str, config: QualityConfig | None = None) -> list[tuple[str, dict]]:
    """Every failing rule, in evaluation order (for reports; the step stops at the first)."""
    return list(_failures(text, _active_rules(config)))


def quality_values(text: str, config: QualityConfig | None = None) -> dict[str, float]:
    """The measured value of every active rule, pass or fail (for threshold studies).
    gopher_stop_words counts only up to its threshold."""
    stats = QualityStats(text)
    return {reason: float(value_of(stats, group_config))
            for (_, reason, value_of, _), group_config
            in _active_rules(config)}


def quality_checker(config: QualityConfig | None = None) -> Callable[[str], tuple[str, dict] | None]:
    """`quality_reason` with the config resolved once, for use on many documents."""
    rules = _active_rules(config)
    return lambda text: next(_failures(text, rules), None)


def quality_filter(docs: Iterable[dict], *, config: QualityConfig | None = None
                   ) -> Iterator[dict | Rejected]:
    """The step: keeps documents that pass every enabled rule; the others are yielded as
    Rejected(doc, reason, {"value": float}) for the first failing rule."""
    check = quality_checker(config)
    for doc in docs:
        failure = check(doc.get("text") or "")
        if failure is None:
            yield doc
        else:
            yield Rejected(doc, *failure)
