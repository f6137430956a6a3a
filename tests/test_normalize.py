"""corpus.normalize: ftfy repair on ftfy's own cases, whitespace rules, the step."""
from __future__ import annotations

import gzip
import json

import ftfy
import pytest

from conftest import missing_shared, shared
from corpus.documents import Rejected, process_partition, read_docs, write_docs
from corpus.extract import html_to_text
from corpus.normalize import ftfy_fix, normalize, normalize_text, normalize_whitespace

# fixes that repair mojibake; none may fire on text that has none
ENCODING_FIXES = ("encode:", "decode:", "restore_byte_a0", "replace_lossy_sequences")


def load_cases(name: str) -> list[dict]:
    return json.loads(shared("ftfy-cases", name).read_text(encoding="utf-8"))


def case_id(case: dict) -> str:
    return case["label"][:60]


def _pass_cases() -> list[dict]:
    # parameters are made at collection, where a skip would skip the whole module
    why = missing_shared("ftfy-cases")
    if why:
        return [pytest.param(None, id="ftfy-cases-missing", marks=pytest.mark.skip(reason=why))]
    cases = load_cases("in-the-wild.json") + load_cases("synthetic.json")
    return [c for c in cases if c["expect"] == "pass"]


def test_case_files_are_there():
    assert len(load_cases("negative.json")) >= 30
    assert len(_pass_cases()) >= 90


@pytest.mark.parametrize("case", _pass_cases(), ids=case_id)
def test_ftfy_pass_cases_are_repaired(case):
    text, fixes = normalize_text(case["original"])
    assert text == normalize_whitespace(case["fixed"])
    # the ftfy stage alone gives exactly the expected repair
    assert ftfy_fix(case["original"])[0] == case["fixed"]
    if case["original"] != case["fixed"]:
        assert fixes


def test_negative_cases_are_left_alone():
    for case in load_cases("negative.json"):
        fixed, fixes = ftfy_fix(case["original"])
        # no mojibake repair fires; `fixed` differs from `original` only where ftfy's
        # default configuration straightens curly quotes
        assert fixed == case["fixed"], case["label"]
        assert not [f for f in fixes if f.startswith(ENCODING_FIXES)], (case["label"], fixes)
        text, _ = normalize_text(case["original"])
        assert text == normalize_whitespace(case["fixed"]), case["label"]


def test_ftfy_stage_equals_fix_text_on_real_pages():
    pages = sorted(shared("wcxb-dev", "html").glob("*.html.gz"))[::140]
    assert len(pages) >= 9
    texts = [html_to_text(gzip.decompress(p.read_bytes())) for p in pages]
    texts.append("a < b\n&amp; stays\n")  # "<" switches entity unescaping off, as ftfy does
    texts.append("&amp; unescaped\na < b\n&amp; then kept\n")
    for text in texts:
        assert ftfy_fix(text)[0] == ftfy.fix_text(text)


def test_own_cases():
    assert normalize_text("cafÃ©") == ("café", ["encode:latin-1", "decode:utf-8"])
    text, fixes = normalize_text("wait\x85 what")  # C1 control: windows-1252 ellipsis
    assert text == "wait… what" and fixes
    text, fixes = normalize_text("fish &amp; chips")  # an entity left over
    assert text == "fish & chips" and "unescape_html" in fixes
    assert normalize_text("e\u0301t\u00e9")[0] == "\u00e9t\u00e9"  # NFC
    assert normalize_text("plain text") == ("plain text", [])


def test_whitespace_rules():
    raw = "\n\n  Title  \r\n\r\n\r\n\r\npara\u00a0one\u2003two   \rnext\n\n\n\n" \
          "def f():\n    return 1\t \n\n\tdone\n \n  \n"
    text, fixes = normalize_text(raw)
    assert text == "  Title\n\npara one two\nnext\n\ndef f():\n    return 1\n\n\tdone"
    assert fixes[-1] == "whitespace"
    assert normalize_text(" \n\u00a0\n\t") == ("", ["whitespace"])


def test_normalize_step(tmp_path):
    docs = [
        {"id": "a", "source": "a", "text": "cafÃ© crÃ¨me"},
        {"id": "b", "source": "b", "text": "already clean"},
        {"id": "c", "source": "c", "text": "\u00a0\r\n  \r\n"},
    ]
    out = list(normalize(iter(docs)))
    assert out[0]["text"] == "café crème" and out[0]["normalized_changed"] is True
    assert "decode:utf-8" in out[0]["normalize_fixes"]
    assert out[1]["text"] == "already clean" and out[1]["normalized_changed"] is False
    assert out[1]["normalize_fixes"] == []
    assert isinstance(out[2], Rejected) and out[2].reason == "empty_after_normalize"
    assert out[2].doc["text"] == docs[2]["text"]  # the rejected row shows the input text

    write_docs(docs, tmp_path / "part-00000.parquet")
    (tmp_path / "out").mkdir()
    stats = process_partition(normalize, tmp_path / "part-00000.parquet", tmp_path / "out")
    assert (stats["docs_out"], stats["docs_rejected"]) == (2, 1)
    kept = list(read_docs(tmp_path / "out" / "docs" / "part-00000.parquet"))
    assert [d["normalized_changed"] for d in kept] == [True, False]
    assert kept[0]["normalize_fixes"][:2] == ["encode:latin-1", "decode:utf-8"]
