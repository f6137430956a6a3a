"""filter, dedup, tokenizer and shard on small documents, through process_partition."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import offensive_tweets
from corpus.dedup import drop_duplicates, exact_duplicates, partition_hashes, text_hash
from corpus.documents import ConservationError, Rejected, is_val, process_partition, write_docs
from corpus.filter import FilterConfig, filter_docs
from corpus.quality import GROUPS, quality_config
from corpus.shard import write_token_shards
from corpus.tokenizer import EOT, bytes_per_token, train_bpe
from trainer.data import open_shard

PROSE = ("The tokenizer learns merges from the documents that survive filtering. Each shard holds "
         "a fixed number of tokens, and the validation split is chosen by document id. ")


def docs(*texts: str) -> list[dict]:
    return [{"id": f"d{i}", "source": f"doc{i}.html", "text": t} for i, t in enumerate(texts)]


FILTER = FilterConfig(min_chars=20, max_chars=2000)
QUALITY_OFF = quality_config({group: {"enabled": False} for group in GROUPS})


def test_filter_drops_by_length_and_toxicity_and_keeps_the_rest(tmp_path):
    rant = " ".join(offensive_tweets(15))
    write_docs(docs("too short", PROSE, PROSE * 30, rant), tmp_path / "part-00000.parquet")
    out = tmp_path / "out"
    out.mkdir()
    stats = process_partition(filter_docs, tmp_path / "part-00000.parquet", out,
                              config=replace(FILTER, toxicity_threshold=0.8), quality=QUALITY_OFF,
                              scorer_kind="profanity-check")
    assert stats["docs_in"] == 4 and stats["docs_out"] == 1
    assert stats["reasons"] == {"too_few_chars": 1, "too_many_chars": 1, "toxic": 1}
    kept = pq.read_table(out / "docs" / "part-00000.parquet").to_pylist()
    assert kept[0]["id"] == "d1" and kept[0]["toxicity"] < 0.8 and kept[0]["n_chars"] == len(PROSE)
    rejected = {r["id"]: r for r in pq.read_table(out / "rejected" / "part-00000.parquet").to_pylist()}
    assert rejected["d3"]["reason"] == "toxic" and rejected["d3"]["toxicity"] >= 0.8
    assert rejected["d0"]["text"] == "too short"  # rejected documents keep their text


def test_filter_without_scorer_scores_nothing():
    out = list(filter_docs(docs(PROSE), config=FILTER, quality=QUALITY_OFF, scorer_kind="off"))
    assert out[0]["toxicity"] is None
    assert out[0]["language"] == "en" and out[0]["language_score"] > 0.5  # labelled, not filtered


def test_filter_applies_quality_rules_then_language_before_scoring():
    german = ("Der Ausschuss wird seine Ergebnisse im Frühjahr veröffentlichen, nachdem die "
              "Anhörungen beendet sind und alle Zeugen gehört wurden. ") * 3
    lorem = PROSE + " Lorem ipsum dolor sit amet."
    out = list(filter_docs(docs(PROSE, lorem, german), config=replace(FILTER, languages=["en"]),
                           quality=quality_config({g: {"enabled": g == "c4"} for g in GROUPS}),
                           scorer_kind="off"))
    rejected = {r.doc["id"]: r for r in out if isinstance(r, Rejected)}
    assert [d["id"] for d in out if not isinstance(d, Rejected)] == ["d0"]
    assert (rejected["d1"].reason, rejected["d2"].reason) == ("c4_lorem_ipsum", "language")
    assert rejected["d2"].details["language"] == "de" and rejected["d2"].details["value"] > 0.65


def test_exact_dedup_ignores_case_and_whitespace_and_keeps_the_first(tmp_path):
    a, b = tmp_path / "part-00000.parquet", tmp_path / "part-00001.parquet"
    write_docs(docs(PROSE, "Something else entirely."), a)
    write_docs([{"id": "x", "source": "x.html", "text": PROSE.upper().replace(" ", "  \n")},
                {"id": "y", "source": "y.html", "text": "Unique."}], b)
    assert text_hash(PROSE) == text_hash(PROSE.upper().replace(" ", "  \n"))
    duplicates = exact_duplicates([*partition_hashes(a), *partition_hashes(b)])
    assert duplicates == {"x": "d0"}
    out = list(drop_duplicates(docs(PROSE) + [{"id": "x", "source": "x.html", "text": PROSE}],
                               exact=duplicates, near={}))
    assert out[0]["id"] == "d0"
    assert out[1] == Rejected(out[1].doc, "exact_duplicate", {"duplicate_of": "d0"})


def test_a_step_that_loses_documents_is_caught(tmp_path):
    write_docs(docs(PROSE, PROSE), tmp_path / "part-00000.parquet")

    def lossy(stream):
        yield next(iter(stream))

    with pytest.raises(ConservationError, match="read 2 documents but kept 1"):
        process_partition(lossy, tmp_path / "part-00000.parquet", tmp_path)


def test_split_is_deterministic_and_near_the_fraction():
    ids = [f"doc-{i}" for i in range(4000)]
    val = [i for i in ids if is_val(i, 0.1)]
    assert val == [i for i in ids if is_val(i, 0.1)]
    assert 300 < len(val) < 500


def corpus_texts(n: int = 60) -> list[str]:
    words = PROSE.split()
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=80)) + f" Document number {i}." for i in range(n)]


def test_tokenizer_round_trips_any_text_and_reports_compression():
    tok = train_bpe(iter(corpus_texts()), vocab_size=400)
    # vocab_size is an upper bound: a small corpus runs out of frequent pairs first
    assert 300 < tok.get_vocab_size() <= 400 and tok.token_to_id(EOT) == 0
    for text in ["validation split", "ünïcödé ✓ and 中文 and emoji 🙂", "  indented\n\tcode()"]:
        assert tok.decode(tok.encode(text).ids) == text
    figures = bytes_per_token(tok, corpus_texts(5))
    assert figures["docs"] == 5 and figures["bytes_per_token"] > 2


def test_shards_hold_every_document_once_separated_by_eot(tmp_path):
    texts = corpus_texts()
    tok = train_bpe(iter(texts), vocab_size=400)
    pairs = [(f"doc-{i}", t) for i, t in enumerate(texts)]
    stats = write_token_shards(iter(pairs), tok, tmp_path, shard_tokens=1000, val_fraction=0.2)
    eot = tok.token_to_id(EOT)
    for split in ("train", "val"):
        shards = [open_shard(tmp_path / name) for name in stats[split]["shards"]]
        assert all(len(s) == 1000 for s in shards[:-1])  # fixed size but the last
        tokens = np.concatenate(shards)
        assert tokens.dtype == np.uint16 and len(tokens) == stats[split]["tokens"]
        expected = [t for i, t in pairs if is_val(i, 0.2) == (split == "val")]
        assert stats[split]["docs"] == len(expected)
        assert stats[split]["bytes"] == sum(len(t.encode()) for t in expected)
        bounds = np.flatnonzero(tokens == eot).tolist() + [len(tokens)]
        decoded = [tok.decode(tokens[a + 1:b].tolist()) for a, b in zip(bounds, bounds[1:])]
        assert decoded == expected


def test_an_empty_split_is_a_clear_error(tmp_path):
    tok = train_bpe(iter(corpus_texts()), vocab_size=400)
    with pytest.raises(ValueError, match="val split is empty"):
        write_token_shards(iter([("only-one", PROSE)]), tok, tmp_path, shard_tokens=1000,
                           val_fraction=0.0)


def test_partition_stats_name_the_slowest_documents_and_sizes(tmp_path):
    import time

    from corpus.documents import merge_stats

    write_docs(docs("a" * 10, "b" * 100, "c" * 1000), tmp_path / "part-00000.parquet")

    def slow_on_b(stream):
        time.sleep(0.2)  # set-up before the first document is not charged to it
        for doc in stream:
            if doc["text"].startswith("b"):
                time.sleep(0.05)
            yield doc

    stats = merge_stats([process_partition(slow_on_b, tmp_path / "part-00000.parquet", tmp_path)])
    assert stats["slowest_docs"][0]["id"] == "d1"
    assert stats["slowest_docs"][0]["seconds"] >= 0.05
    assert max(d["seconds"] for d in stats["slowest_docs"][1:]) < 0.05
    # 10 bytes -> bucket 4 (8-15), 100 -> 7 (64-127), 1000 -> 10 (512-1023); all kept
    assert stats["size_hist"] == {4: [1, 1], 7: [1, 1], 10: [1, 1]}
