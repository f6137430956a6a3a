"""The artifact store: versions, atomic commits, pointers, lineage."""
from __future__ import annotations

import pytest

from flows.store import ArtifactStore, content_version


def test_version_depends_on_every_ingredient():
    base = content_version("extract", {"a": 1}, "code1", {"source": "v1"})
    assert base == content_version("extract", {"a": 1}, "code1", {"source": "v1"})
    assert len({base,
                content_version("normalize", {"a": 1}, "code1", {"source": "v1"}),
                content_version("extract", {"a": 2}, "code1", {"source": "v1"}),
                content_version("extract", {"a": 1}, "code2", {"source": "v1"}),
                content_version("extract", {"a": 1}, "code1", {"source": "v2"})}) == 5


def test_commit_is_all_or_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    tmp = store.begin("extract", "abc")
    (tmp / "part-00000.parquet").write_bytes(b"data")
    assert not store.exists("extract", "abc")  # a half-written version is invisible
    assert store.versions("extract") == [] and store.latest("extract") is None
    store.commit(tmp, "extract", "abc", {"inputs": {}, "stats": {}})
    assert store.exists("extract", "abc") and store.latest("extract") == "abc"
    files = store.manifest("extract", "abc")["files"]
    assert files["part-00000.parquet"]["bytes"] == 4
    assert not tmp.exists()

    failed = store.begin("extract", "def")
    (failed / "x").write_text("partial")
    store.abort(failed)
    assert store.versions("extract") == ["abc"]
    assert not list((tmp_path / "extract").glob(".tmp-*"))


def test_recommit_replaces_and_resolve_by_prefix(tmp_path):
    store = ArtifactStore(tmp_path)
    for content in ("one", "two"):
        tmp = store.begin("train", "abc123")
        (tmp / "model.pt").write_text(content)
        store.commit(tmp, "train", "abc123", {"inputs": {}, "stats": {}})
    assert (store.path("train", "abc123") / "model.pt").read_text() == "two"
    assert store.resolve("train", "abc") == "abc123"
    assert store.resolve("train") == "abc123"
    with pytest.raises(FileNotFoundError, match="0 versions match"):
        store.resolve("train", "zzz")
    with pytest.raises(FileNotFoundError, match="run it first"):
        store.resolve("evaluate")


def test_lineage_walks_inputs(tmp_path):
    store = ArtifactStore(tmp_path)
    for stage, version, inputs in [("source", "s1", {}),
                                   ("extract", "e1", {"source": {"stage": "source", "version": "s1"}})]:
        store.commit(store.begin(stage, version), stage, version, {"inputs": inputs, "stats": {}})
    assert store.lineage("extract", "e1") == [("extract", "e1"), ("source", "s1")]
