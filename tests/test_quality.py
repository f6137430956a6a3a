"""Heuristic quality filters: one fixture per rule, a clean document that passes all,
config handling, edge cases, repetition fractions checked by hand on tiny inputs."""
from __future__ import annotations

import itertools

import pytest

from corpus.documents import REJECTED_COLUMNS, Rejected, process_partition, read_docs, write_docs
from corpus.quality import (GROUPS, REASONS, QualityConfig, QualityStats, quality_config,
                            quality_failures, quality_filter, quality_reason)

CLEAN_LINES = [
    "The river town of Hallam grew up around a ford where the old coaching road crossed the water.",
    "For most of the nineteenth century its mills turned wool from the surrounding hills into cloth.",
    "When the railway arrived in 1847, merchants built warehouses along the quay and a new bridge.",
    "Today the mills have become flats, studios and a small museum that tells the story of the trade.",
    "Visitors can walk the towpath to the weir, where herons wait patiently in the shallows.",
    "The parish church, rebuilt after a fire in 1902, keeps a carved screen rescued from the ruins.",
    "Local volunteers run a market every Saturday with bread, cheese and vegetables from nearby farms.",
    "In winter the fog settles low over the meadows, and the lamps along the quay glow like lanterns.",
]
CLEAN = "\n".join(CLEAN_LINES[:4]) + "\n\n" + "\n".join(CLEAN_LINES[4:])
ALL_ON = {group: {"skip": []} for group in GROUPS}  # every rule, optional ones included

RUSSIAN = (
    "Небольшой город на берегу реки вырос вокруг старого брода, где проходила почтовая дорога.\n"
    "Почти весь девятнадцатый век местные фабрики превращали шерсть с окрестных холмов в сукно.\n"
    "Когда пришла железная дорога, купцы построили склады вдоль набережной и новый каменный мост.\n"
    "Сегодня в бывших фабриках устроены квартиры, мастерские и маленький музей истории ремесла.\n"
    "Туристы гуляют по тропе вдоль канала до плотины, где цапли терпеливо ждут рыбу на мелководье.\n"
    "Приходская церковь, восстановленная после пожара, хранит резную преграду, спасённую из руин.\n"
)


def _words(prefix_letters: str, n: int, length: int) -> list[str]:
    """n distinct lowercase words of `length` letters."""
    combos = itertools.product(prefix_letters, repeat=length)
    return ["".join(c) for c in itertools.islice(combos, n)]


def _lines_of(words: list[str], per_line: int, end: str = ".") -> str:
    return "\n".join(" ".join(words[i:i + per_line]) + end for i in range(0, len(words), per_line))


def _short_word_text() -> str:
    """60 distinct two-letter words (mean length ~2.2) plus a few stop words."""
    words = _words("bcdfgklmnp", 60, 2)
    words[::10] = ["the"] * 6
    return _lines_of(words, 12)


def _short_lines_text() -> str:
    # >67% of lines are <= 30 characters, each a short sentence of its own
    words = " ".join(CLEAN_LINES).split()
    return _lines_of(words, 4)


# name -> (text, config, the failures expected under that config)
FIXTURES = {
    "gopher_word_count": (CLEAN_LINES[0], None, ["gopher_word_count"]),
    "gopher_mean_word_length": (_short_word_text(), None, ["gopher_mean_word_length"]),
    "gopher_symbol_ratio": (CLEAN + "\n" + " ".join(f"#tag{c}" for c in "abcdefghijklmno"),
                            None, ["gopher_symbol_ratio"]),
    "gopher_bullet_lines": ("\n".join("• " + line for line in CLEAN_LINES), None,
                            ["gopher_bullet_lines"]),
    "gopher_ellipsis_lines": ("\n".join(line[:-1] + "..." if i % 2 else line
                                        for i, line in enumerate(CLEAN_LINES)), None,
                              ["gopher_ellipsis_lines"]),
    "gopher_alpha_words": (CLEAN + "\n" + " ".join(str(100 + 7 * i) for i in range(45)) + ".",
                           None, ["gopher_alpha_words"]),
    "gopher_stop_words": (RUSSIAN, None, ["gopher_stop_words"]),
    "c4_lorem_ipsum": (CLEAN + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
                       None, ["c4_lorem_ipsum"]),
    "c4_curly_brace": (CLEAN + "\nThe set {1, 2, 3} has three members.", ALL_ON,
                       ["c4_curly_brace"]),
    "c4_javascript": (CLEAN + "\nPlease enable JavaScript to view the comments.\n"
                              "This map needs javascript turned on in your browser.",
                      None, ["c4_javascript"]),
    "c4_policy": (CLEAN + "\nThis website uses cookies to improve your experience.\n"
                          "By continuing you accept our privacy policy and terms.",
                  ALL_ON, ["c4_policy"]),
    "c4_punctuation": ("\n".join(line[:-1] for line in CLEAN_LINES), None,
                       ["c4_punctuation", "fineweb_line_punctuation"]),
    # 1 of 9 lines (0.11) ends in punctuation: enough for C4, too few for FineWeb
    "fineweb_line_punctuation": ("\n".join([line if i == 0 else line[:-1]
                                            for i, line in enumerate(CLEAN_LINES)]
                                           + ["Photographs courtesy of the Hallam town archive"]),
                                 None,
                                 ["fineweb_line_punctuation"]),
    "fineweb_short_lines": (_short_lines_text(), None, ["fineweb_short_lines"]),
    "fineweb_dup_line_chars": (CLEAN + "\nRead more.\nRead more.", None,
                               ["fineweb_dup_line_chars"]),
    "fineweb_list_like": (CLEAN, {"fineweb": {"skip": [], "max_lines_per_word": 0.05}},
                          ["fineweb_list_like"]),
    # repeating text repeats lines, paragraphs and n-grams at once: the fixtures below
    # trip their rule and the others that necessarily come with it
    "gopher_dup_lines": (CLEAN + "\n" + "\n".join(["Share."] * 6), None,
                         ["fineweb_dup_line_chars", "gopher_dup_lines"]),
    # 3 of 19 lines (0.16) are repeats, 0.25 of the characters
    "gopher_dup_line_chars": ("\n".join(CLEAN_LINES + CLEAN_LINES[:3]) + "\n" + "\n".join(
        f"Short note {c}." for c in "abcdefgh"), {"gopher_repetition": {"skip": [
            f"gopher_dup_{n}gram" for n in range(5, 11)]}, "fineweb": {"enabled": False}},
        ["gopher_dup_line_chars"]),
    "gopher_dup_paragraphs": ("\n\n".join(CLEAN_LINES + ["Share."] * 5),
                              {"fineweb": {"enabled": False}},
                              ["gopher_dup_lines", "gopher_dup_paragraphs"]),
    "gopher_dup_paragraph_chars": (
        "\n\n".join(CLEAN_LINES + CLEAN_LINES[:2]),
        {"fineweb": {"enabled": False}, "gopher_repetition": {
            "skip": ["gopher_dup_line_chars"] + [f"gopher_dup_{n}gram" for n in range(5, 11)]}},
        ["gopher_dup_paragraph_chars"]),
    "gopher_top_2gram": (CLEAN + "\n" + " ".join(["big deal"] * 40) + ".", None,
                         ["gopher_top_2gram", "gopher_top_3gram", "gopher_top_4gram"]
                         + [f"gopher_dup_{n}gram" for n in range(5, 11)]),
    "gopher_dup_5gram": (CLEAN + "\n" + "\n".join(
        f"{w} the old coaching road crossed." for w in ("Here", "There", "Then", "Again",
                                                          "Later", "Once")),
        {"gopher_repetition": {"max_top_2gram": 1.0, "max_top_3gram": 1.0,
                               "max_top_4gram": 1.0}},
        ["gopher_dup_5gram"]),
}


def _expected_reasons() -> set[str]:
    return {r for reasons in REASONS.values() for r in reasons}


def test_every_reason_has_a_fixture():
    covered = set(FIXTURES) | {f"gopher_top_{n}gram" for n in (3, 4)} | {
        f"gopher_dup_{n}gram" for n in range(6, 11)}
    assert covered == _expected_reasons()


def test_clean_prose_passes_every_rule():
    assert quality_failures(CLEAN, quality_config(ALL_ON)) == []
    assert quality_reason(CLEAN, QualityConfig()) is None
    assert quality_reason(CLEAN) is None


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_trips_its_rule(name):
    text, config, expected = FIXTURES[name]
    failures = [reason for reason, _ in quality_failures(text, quality_config(config))]
    assert sorted(failures) == sorted(expected)
    assert name in failures
    reason, details = quality_reason(text, quality_config(config))
    assert reason in expected and set(details) == {"value"} and isinstance(details["value"], float)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_turning_the_rules_off_keeps_the_doc(name):
    text, config, expected = FIXTURES[name]
    config = quality_config(config)
    for reason in expected:
        group = getattr(config, next(g for g, reasons in REASONS.items() if reason in reasons))
        group.skip = sorted(set(group.skip) | {reason})
    assert quality_reason(text, config) is None
    # and turning the whole group off does the same
    config = quality_config(FIXTURES[name][1])
    for reason in expected:
        getattr(config, next(g for g, rs in REASONS.items() if reason in rs)).enabled = False
    assert quality_reason(text, config) is None


def test_thresholds_come_from_config():
    n_words = len(CLEAN.split())
    assert quality_reason(CLEAN, quality_config({"gopher_quality": {"min_words": n_words + 1}})) == (
        "gopher_word_count", {"value": float(n_words)})
    assert quality_reason(CLEAN, quality_config({"gopher_quality": {"max_words": n_words - 1}}))[0] == \
        "gopher_word_count"
    assert quality_reason(CLEAN, quality_config({"gopher_quality": {"min_words": n_words}})) is None
    assert quality_reason(CLEAN, quality_config({"gopher_quality": {"min_stop_words": 1000}}))[0] == \
        "gopher_stop_words"
    assert quality_reason(CLEAN + "\nA heading", quality_config({"fineweb": {"min_line_punct": 1.0}}))[0] == \
        "fineweb_line_punctuation"
    assert quality_reason(CLEAN, quality_config({"fineweb": {"short_line_chars": 200}}))[0] == \
        "fineweb_short_lines"
    assert quality_reason(CLEAN, quality_config({"c4": {"min_punct_lines": 9}})) == (
        "c4_punctuation", {"value": 8.0})
    # a looser threshold keeps a fixture's document
    text, _, _ = FIXTURES["gopher_symbol_ratio"]
    assert quality_reason(text, quality_config({"gopher_quality": {"max_symbol_word_ratio": 0.5}})) is None
    text, _, _ = FIXTURES["fineweb_dup_line_chars"]
    assert quality_reason(text, quality_config({"fineweb": {"max_dup_line_chars": 0.1}})) is None


def test_curly_brace_rule_is_optional():
    text, _, _ = FIXTURES["c4_curly_brace"]
    assert quality_reason(text, quality_config({"c4": {"skip": []}}))[0] == "c4_curly_brace"
    assert quality_reason(text) is None


@pytest.mark.parametrize("bad", [
    {"gopher": {"min_words": 1}},
    {"gopher_quality": {"min_word": 1}},
    {"c4": {"skip": ["c4_curly"]}},
    {"c4": {"skip": ["gopher_word_count"]}},
    {"gopher_quality": {"min_words": 60, "max_words": 50}},
    {"fineweb": {"max_short_lines": 1.5}},
    {"nothing_here": {"enabled": True}},
])
def test_bad_config_is_an_error(bad):
    with pytest.raises(ValueError):
        quality_config(bad)


def test_defaults_are_not_shared():
    config = quality_config({"c4": {"skip": []}})
    config.fineweb.skip.append("fineweb_short_lines")
    assert QualityConfig().fineweb.skip == ["fineweb_list_like"]


# ----------------------------------------------------------------------------- edge cases

def test_empty_and_blank_texts():
    for text in ("", "\n\n\n", "   \n \t\n"):
        assert quality_reason(text) == ("gopher_word_count", {"value": 0.0})
        # every other rule copes with no words and no lines
        assert [r for r, _ in quality_failures(text, quality_config(ALL_ON))] == [
            "gopher_word_count", "gopher_mean_word_length", "gopher_alpha_words",
            "gopher_stop_words", "c4_punctuation", "fineweb_line_punctuation"]


def test_single_line():
    text = " ".join(CLEAN_LINES)
    assert "\n" not in text
    assert quality_failures(text, quality_config(ALL_ON)) == []
    stats = QualityStats(text)
    assert len(stats.lines) == len(stats.paragraphs) == 1


def test_empty_lines_do_not_count():
    spaced = "\n\n\n".join(CLEAN_LINES).replace("\n\n\n", "\n  \n\n")
    assert quality_failures(spaced, quality_config(ALL_ON)) == []
    stats = QualityStats(spaced)
    assert len(stats.lines) == len(CLEAN_LINES)
    assert stats.dup_lines == (0, 0)


def test_non_latin_text():
    # Cyrillic words are alphabetic; only the English stop-word rule drops them
    assert [r for r, _ in quality_failures(RUSSIAN)] == ["gopher_stop_words"]
    assert quality_reason(RUSSIAN, quality_config({"gopher_quality": {"skip": ["gopher_stop_words"]}})) is None
    # Chinese has no spaces: one "word" per line
    chinese = ("河流小镇围绕着一个古老的渡口发展起来。\n"
               "十九世纪的大部分时间里，镇上的磨坊把羊毛纺成布。\n")
    reason, details = quality_reason(chinese)
    assert (reason, details["value"]) == ("gopher_word_count", 2.0)
    stats = QualityStats(chinese)
    assert stats.alpha_words() == 1.0 and stats.punct_lines == 2


# ----------------------------------------------------------------------------- by hand

def test_duplicate_line_fractions_by_hand():
    s = QualityStats("aaaa\nbb\naaaa\ncc")
    assert s.dup_lines == (1, 4)            # the second "aaaa"
    assert quality_failures("aaaa\nbb\naaaa\ncc", quality_config({
        "gopher_quality": {"enabled": False}, "c4": {"enabled": False},
        "fineweb": {"enabled": False},
        "gopher_repetition": {"max_dup_lines": 0.24, "max_dup_line_chars": 0.33}})) == [
        ("gopher_dup_lines", {"value": 0.25}),            # 1 of 4 lines
        ("gopher_dup_line_chars", {"value": 4 / 12}),     # 4 of 4+2+4+2 characters
    ]
    s = QualityStats("a\nb\na\na")
    assert s.dup_lines == (2, 2)            # every copy after the first


def test_duplicate_paragraph_fractions_by_hand():
    s = QualityStats("p one\nstill one\n\np two\n\n  \n\np one\nstill one")
    assert s.paragraphs == ["p one\nstill one", "p two", "p one\nstill one"]
    assert s.dup_paragraphs == (1, 15)
    config = {"gopher_quality": {"enabled": False}, "c4": {"enabled": False},
              "fineweb": {"enabled": False}}
    values = dict(quality_failures("p one\nstill one\n\np two\n\n  \n\np one\nstill one",
                                   quality_config(config)))
    assert values["gopher_dup_paragraphs"] == {"value": 1 / 3}
    assert values["gopher_dup_paragraph_chars"] == {"value": 15 / 35}
    assert values["gopher_dup_lines"] == {"value": 2 / 5}   # "p one", "still one" again


def test_top_ngram_by_hand():
    # "a b" occurs 3 times (positions 0, 2, 4) and covers words 0..5: 6 of 7 characters
    assert QualityStats("a b a b a b c").top_ngram(2) == pytest.approx(6 / 7)
    # a tie between "aa b" and "b c" (twice each): the longer one wins, 6 of 8 characters
    assert QualityStats("aa b c aa b c").top_ngram(2) == pytest.approx(6 / 8)
    # overlapping occurrences count their shared word once
    assert QualityStats("a a a a").top_ngram(2) == 1.0
    # no repeated bigram: 0, however few words
    assert QualityStats("one two three").top_ngram(2) == 0.0
    assert QualityStats("").top_ngram(2) == 0.0
    # the trigram "a b a" occurs twice, at 0 and 2: words 0..4 of "a b a b a b c"
    assert QualityStats("a b a b a b c").top_ngram(3) == pytest.approx(5 / 7)


def test_duplicate_ngram_by_hand():
    text = "one two three four five six one two three four five seven"
    # "one two three four five" twice: 2 * 19 characters of 2 * 19 + 3 + 5
    assert QualityStats(text).dup_ngram(5) == pytest.approx(38 / 46)
    assert QualityStats(text).dup_ngram(6) == 0.0
    # overlapping duplicate 5-grams (starts 0, 1, 6, 7) cover every word once
    six = "u v w x y z"
    assert QualityStats(f"{six} {six}").dup_ngram(5) == 1.0
    assert QualityStats(f"{six} {six}").dup_ngram(6) == 1.0
    assert QualityStats(f"{six} {six}").dup_ngram(7) == 0.0
    assert QualityStats("too short").dup_ngram(5) == 0.0


def test_gopher_quality_values_by_hand():
    s = QualityStats("# one ... two … three\n- four\n- five...")
    assert len(s.words) == 10
    assert s.symbol_ratio() == pytest.approx(3 / 10)  # "...", "…", "..." vs one "#"
    assert s.mean_word_length() == pytest.approx(29 / 10)
    assert s.alpha_words() == pytest.approx(5 / 10)
    assert s.line_fraction(s.punct_lines) == pytest.approx(1 / 3)  # "- five..." ends in "."
    assert QualityStats("The cat, THE dog; to be").stop_words(10) == 4
    assert QualityStats("other bother thee").stop_words(10) == 0


# ----------------------------------------------------------------------------- the step

def test_step_and_partition(tmp_path):
    docs = [{"id": name, "source": name, "text": text}
            for name, (text, config, _) in FIXTURES.items() if config is None]
    docs.append({"id": "clean", "source": "clean", "text": CLEAN})
    out = list(quality_filter(docs, config=None))
    kept = [d for d in out if not isinstance(d, Rejected)]
    rejected = [d for d in out if isinstance(d, Rejected)]
    assert [d["id"] for d in kept] == ["clean"]
    # the first failing rule in evaluation order names the reason
    assert all(r.reason == FIXTURES[r.doc["id"]][2][0] for r in rejected)
    # through the partition runner: the value lands in the rejected/ files
    assert "value" in REJECTED_COLUMNS
    write_docs(docs, tmp_path / "in.parquet")
    stats = process_partition(quality_filter, tmp_path / "in.parquet", tmp_path / "out",
                              config=QualityConfig())
    assert stats["docs_out"] == 1 and stats["docs_rejected"] == len(docs) - 1
    rows = list(read_docs(tmp_path / "out" / "rejected" / "in.parquet"))
    by_id = {r["id"]: r for r in rows}
    assert by_id["gopher_word_count"]["value"] == float(len(CLEAN_LINES[0].split()))
    assert all(isinstance(r["value"], float) for r in rows)


def _reference_ngram_fractions(words: list[str], n: int) -> tuple[float, float]:
    """(top, duplicate) n-gram character fractions, straight from the definitions."""
    total = sum(map(len, words))
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = {g: grams.count(g) for g in grams}

    def covered(starts):
        idx = {j for i in starts for j in range(i, i + n)}
        return sum(len(words[j]) for j in idx) / total if total else 0.0
    top_count = max(counts.values(), default=0)
    if top_count < 2:
        top = 0.0
    else:
        # ties: the most characters, then the first to occur (max keeps the first)
        best = max((g for g in counts if counts[g] == top_count), key=lambda g: len("".join(g)))
        top = covered([i for i, g in enumerate(grams) if g == best])
    dup = covered([i for i, g in enumerate(grams) if counts[g] > 1])
    return top, dup


def test_ngram_fractions_match_the_definitions_on_random_texts():
    import random
    rng = random.Random(7)
    vocab = ["a", "bb", "ccc", "dddd", "the", "river", "x"]
    for _ in range(150):
        words = [rng.choice(vocab[:rng.randint(2, len(vocab))])
                 for _ in range(rng.randint(0, 40))]
        stats = QualityStats(" ".join(words))
        for n in range(2, 11):
            top, dup = _reference_ngram_fractions(words, n)
            assert stats.dup_ngram(n) == pytest.approx(dup), (words, n)
            if n <= 4:
                assert stats.top_ngram(n) == pytest.approx(top), (words, n)
