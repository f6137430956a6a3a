"""The eval set: taken before filtering, by id hash or from the user's own documents, and
kept out of training (also as a copy under another id)."""
from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from conftest import shared, tiny_overrides
from corpus.documents import Rejected, doc_id, is_val
from corpus.holdout import HoldoutConfig, external_eval_docs, hold_out, in_eval_split
from flows.config import ConfigError, load_config
from flows.store import ArtifactStore

UP_TO_HOLDOUT = ["source", "extract", "normalize", "holdout"]


def test_the_eval_split_is_stable_and_never_val():
    ids = [doc_id(f"https://example.com/{i}") for i in range(20_000)]
    held = [i for i in ids if in_eval_split(i, 0.02)]
    assert 0.015 < len(held) / len(ids) < 0.025
    assert held == [i for i in ids if in_eval_split(i, 0.02)]
    assert not [i for i in held if is_val(i, 0.3)]  # opposite ends of the hash range
    assert set(held) <= {i for i in ids if in_eval_split(i, 0.05)}  # a larger share only adds


def test_hold_out_drops_eval_documents_and_copies_of_their_text():
    docs = [{"id": "a", "text": "The eval page."}, {"id": "b", "text": "the  EVAL page. "},
            {"id": "c", "text": "A training page."}]
    out = list(hold_out(iter(docs), eval_ids=frozenset({"a"}), eval_hashes={_hash("The eval page."): "a"}))
    assert out[0] == Rejected(docs[0], "eval")
    assert out[1] == Rejected(docs[1], "eval_overlap", {"duplicate_of": "a"})  # case and spaces aside
    assert out[2] == docs[2]


def _hash(text):
    from corpus.dedup import text_hash

    return text_hash(text)


def test_pydoc_eval_pages_go_through_extract_and_normalize():
    skipped: dict = {}
    docs = list(external_eval_docs(HoldoutConfig(kind="pydoc", pydoc_modules=["textwrap", "no_such_mod"]),
                                   skipped))
    assert [d["source"] for d in docs] == ["pydoc:textwrap"]
    assert "TextWrapper" in docs[0]["text"] and "<" not in docs[0]["text"][:200]
    assert "no_such_mod" in skipped


def test_config_needs_a_path_for_kind_path():
    with pytest.raises(ConfigError, match="holdout.*needs path"):
        load_config(None, {"holdout.kind": "path"})
    with pytest.raises(ConfigError, match="holdout.fraction"):
        load_config(None, {"holdout.fraction": 0.7})


@pytest.fixture()
def eval_folder(tmp_path, tiny_corpus):
    """Two pages: a copy of a corpus page under another name, and a page not in the corpus."""
    folder = tmp_path / "my-eval"
    folder.mkdir()
    shutil.copy(tiny_corpus / "0002.html.gz", folder / "copy-of-0002.html.gz")
    shutil.copy(sorted(shared("wcxb-dev", "html").glob("*.html.gz"))[40], folder / "other.html.gz")
    return folder


def test_a_user_eval_corpus_is_held_out_with_its_copies(prefect_harness, tiny_corpus, eval_folder, tmp_path):
    from flows.flow import corpus_to_model

    overrides = {**tiny_overrides(tiny_corpus, tmp_path / "artifacts"),
                 "holdout.kind": "path", "holdout.path": str(eval_folder)}
    versions = corpus_to_model(config="configs/demo.toml", overrides=overrides, stages=UP_TO_HOLDOUT)
    store = ArtifactStore(tmp_path / "artifacts")
    folder = store.path("holdout", versions["holdout"])
    eval_docs = pq.read_table(folder / "eval").to_pylist()
    assert sorted(d["source"] for d in eval_docs) == ["copy-of-0002.html.gz", "other.html.gz"]
    rejected = pq.read_table(folder / "rejected").to_pylist()
    assert [(r["source"], r["reason"]) for r in rejected] == [("0002.html.gz", "eval_overlap")]
    twin = next(d["id"] for d in eval_docs if d["source"] == "copy-of-0002.html.gz")
    assert rejected[0]["duplicate_of"] == twin
    stats = store.manifest("holdout", versions["holdout"])["stats"]
    assert (stats["docs_in"], stats["docs_out"]) == (29, 28)
    assert stats["eval"]["kind"] == "path" and stats["eval"]["docs"] == 2
    # the files' contents make the version, not where they are
    moved = tmp_path / "elsewhere"
    shutil.copytree(eval_folder, moved)
    again = corpus_to_model(config="configs/demo.toml", stages=UP_TO_HOLDOUT,
                            overrides={**overrides, "holdout.path": str(moved)})
    assert again["holdout"] == versions["holdout"]


def test_an_empty_eval_split_fails_with_the_fix(prefect_harness, tiny_corpus, tmp_path):
    from flows.flow import corpus_to_model

    overrides = {**tiny_overrides(tiny_corpus, tmp_path / "artifacts"), "holdout.fraction": 0.001}
    state = corpus_to_model(config="configs/demo.toml", overrides=overrides, stages=UP_TO_HOLDOUT,
                            return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"eval set is empty .*raise holdout.fraction"):
        state.result()
    assert not ArtifactStore(tmp_path / "artifacts").versions("holdout")
