"""`c2m why` on the tiny corpus built by the real flow (source to shard): a kept document,
one the filter drops, an exact and a near duplicate, checked against the artifacts; the
shard index's token range decodes to the document's text."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from conftest import C2M, tiny_overrides
from corpus.index import INDEX_FILE, DocumentIndex, index_documents
from flows.stages import ORDER
from flows.store import ArtifactStore
from flows.why import why
from trainer.data import open_shard

DATA_STAGES = ORDER[: ORDER.index("shard") + 1]


@pytest.fixture(scope="module")
def built(prefect_harness, tiny_corpus, tmp_path_factory):
    from flows.flow import corpus_to_model

    artifacts = tmp_path_factory.mktemp("why") / "artifacts"
    state = corpus_to_model(config="configs/demo.toml", overrides=tiny_overrides(tiny_corpus, artifacts),
                            stages=DATA_STAGES, return_state=True)
    return ArtifactStore(artifacts), state.result()


def c2m(store: ArtifactStore, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "C2M_STATE": str(store.root.parent / "state")}
    return subprocess.run([C2M, "why", *args, "--root", str(store.root)], env=env,
                          capture_output=True, text=True, timeout=60)


def why_json(store: ArtifactStore, *args: str) -> list[dict]:
    result = c2m(store, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def rows(store: ArtifactStore, versions: dict, stage: str, sub: str) -> list[dict]:
    return pq.read_table(store.path(stage, versions[stage]) / sub).to_pylist()


def by_source(store, versions, stage, sub) -> dict[str, dict]:
    return {r["source"]: r for r in rows(store, versions, stage, sub)}


def test_every_data_stage_writes_an_index_in_its_manifest(built):
    store, versions = built
    for stage in DATA_STAGES:
        manifest = store.manifest(stage, versions[stage])
        if stage == "tokenizer":
            assert INDEX_FILE not in manifest["files"]
            continue
        assert INDEX_FILE in manifest["files"], stage  # checksummed: `c2m verify` covers it
        assert manifest["stats"]["index_seconds"] >= 0, stage
    assert not store.verify("dedup", versions["dedup"])
    dedup = store.path("dedup", versions["dedup"])
    index = DocumentIndex(dedup)
    assert len(index) == store.manifest("dedup", versions["dedup"])["stats"]["docs_in"]
    kept = rows(store, versions, "dedup", "docs")
    entry = index.get(kept[-1]["id"])  # row i of a docs/ file is the i-th kept document
    assert entry.kept and pq.read_table(dedup / entry.partition).to_pylist()[entry.row]["id"] == kept[-1]["id"]


def test_a_kept_document_ends_in_a_shard_whose_tokens_are_its_text(built):
    store, versions = built
    kept = by_source(store, versions, "dedup", "docs")["0002.html.gz"]
    verdicts = why_json(store, "0002.html.gz")  # by its source path
    assert [v["stage"] for v in verdicts] == DATA_STAGES[:DATA_STAGES.index("dedup") + 1] + ["shard"]
    assert all(v["verdict"] == "kept" for v in verdicts[:-1]) and verdicts[0]["id"] == kept["id"]
    assert verdicts[-2]["chars"] == kept["n_chars"] == len(kept["text"])
    span = verdicts[-1]
    assert span["verdict"] in ("train", "val") and span["version"] == versions["shard"]
    folder = store.path("shard", versions["shard"])
    tokens = np.concatenate([open_shard(folder / f["file"])[f["start"]:f["end"]] for f in span["files"]])
    assert len(tokens) == span["tokens"] and all(f["file"].startswith(span["split"]) for f in span["files"])
    tok = Tokenizer.from_file(str(store.path("tokenizer", versions["tokenizer"]) / "tokenizer.json"))
    assert tok.decode(tokens.tolist()) == kept["text"]
    text = c2m(store, kept["id"]).stdout  # by id, as text: one line per stage
    assert f"shard      {versions['shard']}" in text and span["files"][0]["file"] in text


def test_a_document_that_spans_two_shards_maps_to_both_files(built):
    store, versions = built
    folder = store.path("shard", versions["shard"])
    tok = Tokenizer.from_file(str(store.path("tokenizer", versions["tokenizer"]) / "tokenizer.json"))
    kept = rows(store, versions, "dedup", "docs")
    spans = [why(store, d["id"], versions)[-1] for d in kept]  # the library, without a process each
    split = [s for s in spans if len(s["files"]) == 2]
    assert split, "shard.shard_tokens is small enough that some document runs across two files"
    span = split[0]
    tokens = np.concatenate([open_shard(folder / f["file"])[f["start"]:f["end"]] for f in span["files"]])
    assert tok.decode(tokens.tolist()) == next(d["text"] for d in kept if d["id"] == span["id"])


def test_filtered_and_duplicate_documents_say_why_and_stop(built):
    store, versions = built
    short = by_source(store, versions, "filter", "rejected")["short.htm"]
    verdicts = why_json(store, "short.htm")
    assert [v["stage"] for v in verdicts][-1] == "filter"  # nothing after the stage that dropped it
    dropped = verdicts[-1]
    assert (dropped["verdict"], dropped["reason"]) == ("dropped", short["reason"])
    assert dropped.get("value") == short["value"] and dropped["chars"] == len(short["text"]) == 26
    toxic = why_json(store, "rant.html.gz")[-1]
    assert (toxic["reason"], toxic["toxicity"]) == ("toxic", by_source(store, versions, "filter", "rejected")
                                                    ["rant.html.gz"]["toxicity"])

    dups = by_source(store, versions, "dedup", "rejected")
    originals = by_source(store, versions, "dedup", "docs")
    exact = why_json(store, "copy-of-page-3.html.gz")[-1]
    assert (exact["stage"], exact["verdict"], exact["reason"]) == ("dedup", "duplicate", "exact_duplicate")
    assert exact["duplicate_of"] == dups["copy-of-page-3.html.gz"]["duplicate_of"] == originals["0004.html.gz"]["id"]
    assert exact["duplicate_source"] == "0004.html.gz" and "similarity" not in exact
    near = why_json(store, "edited-copy-of-page-5.html.gz")[-1]
    assert (near["verdict"], near["reason"]) == ("duplicate", "near_duplicate")
    assert near["duplicate_of"] == originals["0006.html.gz"]["id"]
    assert near["similarity"] == dups["edited-copy-of-page-5.html.gz"]["similarity"] > 0.8
    text = c2m(store, "edited-copy-of-page-5.html.gz").stdout
    assert f"near duplicate of {originals['0006.html.gz']['id']} (0006.html.gz), similarity" in text


def test_a_url_and_a_path_on_this_machine_find_the_document(built, tiny_corpus):
    store, versions = built
    kept = by_source(store, versions, "dedup", "docs")["0002.html.gz"]
    assert why_json(store, str(tiny_corpus / "0002.html.gz"))[0]["id"] == kept["id"]
    held = [r for r in rows(store, versions, "holdout", "rejected") if r["reason"] == "eval"]
    if held:  # the eval set: held out before any filtering
        last = why_json(store, held[0]["id"])[-1]
        assert (last["stage"], last["verdict"]) == ("holdout", "held_out")


def test_sample_shows_documents_dropped_for_a_reason_with_their_text(built):
    store, versions = built
    found = why_json(store, "--sample", "near_duplicate", "--n", "2")
    assert [d["source"] for d in found] == ["edited-copy-of-page-5.html.gz"]
    received = by_source(store, versions, "dedup", "rejected")["edited-copy-of-page-5.html.gz"]["text"]
    assert found[0]["chars"] == len(received) > 2000  # the text dedup received, truncated
    head = found[0]["text"].removesuffix(f" … [{len(received) - len(found[0]['text'].split(' … [')[0]):,} more chars]")
    assert received.startswith(head) and 300 < len(head) <= 600
    unknown = c2m(store, "--sample", "no_such_reason")
    assert unknown.returncode == 1
    assert "no document was dropped for 'no_such_reason'" in unknown.stderr
    assert "exact_duplicate (dedup 1)" in unknown.stderr  # the reasons there are


def test_run_versions_and_errors(built, tmp_path):
    store, versions = built
    record = json.loads(next((store.root / "runs").glob("*.json")).read_text())
    assert record["versions"] == versions
    via_run = why_json(store, "short.htm", "--run", record["name"])
    assert via_run == why_json(store, "short.htm", "--pin", f"filter={versions['filter'][:6]}")
    unknown = c2m(store, "0123456789abcdef")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith(f"error: not in source/{versions['source']}: '0123456789abcdef'")
    usage = c2m(store)
    assert usage.returncode == 2 and "give a DOC or --sample REASON" in usage.stderr
    # a version built before indexes existed: say so, and how to rebuild it
    (store.path("filter", versions["filter"]) / INDEX_FILE).rename(tmp_path / INDEX_FILE)
    try:
        missing = c2m(store, "short.htm")
        assert missing.returncode == 1
        assert f"filter/{versions['filter']} has no index.sqlite" in missing.stderr
        assert "c2m run --stage filter --force" in missing.stderr
    finally:
        (tmp_path / INDEX_FILE).rename(store.path("filter", versions["filter"]) / INDEX_FILE)


def test_index_documents_is_none_outside_document_stages(tmp_path):
    assert index_documents(tmp_path, tmp_path) is None
    assert not (tmp_path / INDEX_FILE).exists()


def test_reading_the_indexes_leaves_every_version_as_its_manifest_says(built):
    store, versions = built
    assert why_json(store, "0002.html.gz")  # opened read-only: no journal or lock files appear
    assert [p for stage, version in versions.items() for p in store.verify(stage, version)] == []
