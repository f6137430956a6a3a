"""The whole flow on a tiny corpus: every stage's artifact, conservation, caching."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from conftest import cli, tiny_overrides
from flows.stages import DOCUMENT_STAGES, ORDER
from flows.store import ArtifactStore, file_sha256
from trainer.data import open_shard


@pytest.fixture(scope="module")
def first_run(prefect_harness, tiny_corpus, tmp_path_factory):
    from flows.flow import corpus_to_model

    artifacts = tmp_path_factory.mktemp("run") / "artifacts"
    overrides = tiny_overrides(tiny_corpus, artifacts)
    state = corpus_to_model(config="configs/demo.toml", overrides=overrides, return_state=True)
    return ArtifactStore(artifacts), overrides, state.result(), state.state_details.flow_run_id


def rows(path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(path.glob("part-*.parquet")))


def test_every_stage_leaves_a_complete_artifact(first_run):
    store, _, versions, _ = first_run
    assert list(versions) == ORDER
    for stage, version in versions.items():
        folder = store.path(stage, version)
        manifest = store.manifest(stage, version)
        assert manifest["stage"] == stage and manifest["version"] == version
        assert store.latest(stage) == version
        assert (folder / "report.md").read_text().startswith(f"# {stage} {version}")
        for name, meta in manifest["files"].items():  # checksums match what is on disk
            assert file_sha256(folder / name) == meta["sha256"], name
        for inp in manifest["inputs"].values():
            assert versions[inp["stage"]] == inp["version"]
    assert not list(store.root.glob("*/.tmp-*")), "temporary folders left behind"


def test_documents_are_conserved_stage_by_stage(first_run):
    store, _, versions, _ = first_run
    source = store.manifest("source", versions["source"])["stats"]
    assert source["docs"] == 29
    previous_out = source["docs"]
    for stage in DOCUMENT_STAGES:
        folder = store.path(stage, versions[stage])
        stats = store.manifest(stage, versions[stage])["stats"]
        kept, rejected = rows(folder / "docs"), rows(folder / "rejected")
        assert stats["docs_in"] == previous_out, stage
        assert (stats["docs_out"], stats["docs_rejected"]) == (kept, rejected), stage
        assert stats["docs_in"] == kept + rejected, stage
        assert sum(stats["rejected_by_reason"].values()) == rejected, stage
        previous_out = kept


def test_each_problem_document_is_rejected_for_its_reason(first_run):
    store, _, versions, _ = first_run

    def rejected(stage):
        table = pq.read_table(store.path(stage, versions[stage]) / "rejected").to_pylist()
        return {r["source"]: r for r in table}

    assert rejected("filter")["short.htm"]["reason"] in {"too_few_chars", "too_few_words"}
    assert rejected("filter")["rant.html.gz"]["reason"] == "toxic"
    assert rejected("filter")["rant.html.gz"]["toxicity"] >= 0.8
    dup = rejected("dedup")["copy-of-page-3.html.gz"]
    assert dup["reason"] == "exact_duplicate"
    kept = pq.read_table(store.path("dedup", versions["dedup"]) / "docs").to_pylist()
    assert dup["duplicate_of"] in {r["id"] for r in kept if r["source"] == "0004.html.gz"}
    near = rejected("dedup")["edited-copy-of-page-5.html.gz"]
    assert near["reason"] == "near_duplicate" and near["similarity"] > 0.8  # 3 words of 2,800 differ
    assert near["duplicate_of"] in {r["id"] for r in kept if r["source"] == "0006.html.gz"}
    assert {r["language"] for r in kept} == {"en"}
    normalized = {r["source"]: r for r in kept}
    assert "café" in normalized["mojibake.html"]["text"]
    assert "Ã" not in normalized["mojibake.html"]["text"]
    assert store.manifest("normalize", versions["normalize"])["stats"]["docs_changed"] >= 1
    report = (store.path("filter", versions["filter"]) / "report.md").read_text()
    assert "toxicity scorer: profanity-check" in report


def test_tokenizer_shards_model_and_metrics(first_run):
    store, overrides, versions, _ = first_run
    tok = Tokenizer.from_file(str(store.path("tokenizer", versions["tokenizer"]) / "tokenizer.json"))
    assert 256 < tok.get_vocab_size() <= overrides["tokenizer.vocab_size"]
    shard_dir = store.path("shard", versions["shard"])
    stats = store.manifest("shard", versions["shard"])["stats"]
    for split in ("train", "val"):
        total = sum(len(open_shard(shard_dir / name)) for name in stats[split]["shards"])
        assert total == stats[split]["tokens"] > 0
    assert len(stats["train"]["shards"]) > 1  # shard_tokens is small enough to split
    checkpoint = torch.load(store.path("train", versions["train"]) / "model.pt", weights_only=True)
    assert checkpoint["step"] == overrides["train.max_steps"]
    metrics = json.loads((store.path("evaluate", versions["evaluate"]) / "metrics.json").read_text())
    for key in ("loss", "perplexity", "bits_per_byte", "accuracy", "unigram_entropy"):
        assert metrics[key] > 0, key
    assert metrics["samples"]


def test_each_stage_publishes_its_report_to_prefect(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowRunFilter,
                                                FlowRunFilterId)

    _, _, versions, flow_run_id = first_run
    keys = [f"{stage}-report" for stage in ORDER]
    with get_client(sync_client=True) as client:  # other tests' runs publish the same keys
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)),
                                      flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    by_key = {a.key: a for a in found}
    assert set(by_key) == set(keys)
    assert "toxicity scorer: profanity-check" in by_key["filter-report"].data
    assert by_key["evaluate-report"].description == f"evaluate {versions['evaluate']}"


def test_an_existing_dask_cluster_can_run_the_stages(prefect_harness, tiny_corpus, tmp_path):
    from dask.distributed import LocalCluster

    from flows.flow import corpus_to_model

    overrides = tiny_overrides(tiny_corpus, tmp_path / "artifacts")
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None,
                      local_directory=str(tmp_path / "dask")) as cluster:
        versions = corpus_to_model(config="configs/demo.toml", stages=["source", "extract"],
                                   overrides={**overrides, "dask.scheduler": cluster.scheduler_address})
        # still up and usable: the flow closed its own client, not the user's cluster
        assert cluster.status.name == "running" and len(cluster.scheduler_info["workers"]) == 1
    stats = ArtifactStore(tmp_path / "artifacts").manifest("extract", versions["extract"])["stats"]
    assert stats["docs_in"] == 29 and stats["partitions"] == 4


def test_second_run_is_all_cache_hits(first_run):
    from flows.flow import corpus_to_model

    store, overrides, versions, _ = first_run
    before = {s: store.manifest(s, v)["finished"] for s, v in versions.items()}
    again = corpus_to_model(config="configs/demo.toml", overrides=overrides)
    assert again == versions
    assert {s: store.manifest(s, v)["finished"] for s, v in again.items()} == before
    assert all(len(store.versions(s)) == 1 for s in ORDER)


def test_changing_training_config_rebuilds_only_train_and_evaluate(first_run):
    from flows.flow import corpus_to_model

    store, overrides, versions, _ = first_run
    changed = corpus_to_model(config="configs/demo.toml",
                              overrides={**overrides, "train.max_steps": 4})
    assert [s for s in ORDER if changed[s] != versions[s]] == ["train", "evaluate"]
    # one stage re-run from the store, forced, pinned to the first model
    evaluated = store.manifest("evaluate", versions["evaluate"])["finished"]
    forced = corpus_to_model(config="configs/demo.toml", overrides=overrides, stages=["evaluate"],
                             force=True, pins={"train": versions["train"]})
    assert forced == versions
    assert store.manifest("evaluate", versions["evaluate"])["finished"] > evaluated


def test_a_failing_stage_leaves_no_artifact(prefect_harness, tiny_corpus, tmp_path):
    from flows.flow import corpus_to_model

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "docs.jsonl").write_text('{"text": "fine"}\n{not json\n')
    overrides = tiny_overrides(bad, tmp_path / "artifacts")
    with pytest.raises(Exception, match=r"docs.jsonl:2: line is not valid JSON"):
        corpus_to_model(config="configs/demo.toml", overrides=overrides)
    store = ArtifactStore(tmp_path / "artifacts")
    assert store.versions("source") == []
    assert not list(store.root.glob("*/.tmp-*"))


def test_unselected_stage_without_artifact_is_a_clear_error(prefect_harness, tiny_corpus, tmp_path):
    from flows.flow import corpus_to_model

    overrides = tiny_overrides(tiny_corpus, tmp_path / "artifacts")
    with pytest.raises(RuntimeError, match="does not build source"):
        corpus_to_model(config="configs/demo.toml", overrides=overrides, stages=["extract"])


def test_fine_tune_from_a_model_artifact_keeps_its_tokenizer(first_run):
    from flows.flow import corpus_to_model

    store, overrides, versions, _ = first_run
    tuned = corpus_to_model(config="configs/demo.toml", overrides={
        **overrides, "train.init_from": versions["train"][:10], "train.learning_rate": 3e-4,
        "train.min_lr": 3e-5, "train.schedule": "wsd"})
    assert all(tuned[s] == versions[s] for s in ORDER[:ORDER.index("tokenizer")])
    parent_tok = Tokenizer.from_file(str(store.path("tokenizer", versions["tokenizer"]) / "tokenizer.json"))
    tok = Tokenizer.from_file(str(store.path("tokenizer", tuned["tokenizer"]) / "tokenizer.json"))
    assert tok.get_vocab() == parent_tok.get_vocab()
    manifest = store.manifest("train", tuned["train"])
    assert manifest["identity"]["parent"]["version"] == versions["train"]
    assert manifest["stats"]["parent"]["version"] == versions["train"]
    # it starts where the parent ended, not from a random model
    parent = store.manifest("train", versions["train"])["stats"]
    assert manifest["stats"]["initial_loss"] < parent["initial_loss"] - 0.1
    assert "fine-tuned from train/" in (store.path("train", tuned["train"]) / "report.md").read_text()


def test_lora_fine_tune_through_the_flow(first_run):
    from flows.flow import corpus_to_model
    from trainer.model import load_model

    store, overrides, versions, _ = first_run
    tuned = corpus_to_model(config="configs/demo.toml", overrides={
        **overrides, "train.init_from": versions["train"][:10], "train.lora.rank": 8,
        "train.checkpoint_every": 2, "train.learning_rate": 1e-3, "train.min_lr": 1e-4})
    folder = store.path("train", tuned["train"])
    stats = store.manifest("train", tuned["train"])["stats"]
    assert stats["lora"]["trainable_params"] == 1 * 8 * 16 * 32  # 1 block of width 32, 4 Linears
    assert "LoRA rank 8" in (folder / "report.md").read_text()
    # adapter-only checkpoints, a merged model.pt with the parent's shape
    step = torch.load(sorted((folder / "checkpoints").glob("step_*.pt"))[0], weights_only=True)
    assert "model" not in step and step["adapter"]
    parent, _ = load_model(store.path("train", versions["train"]) / "model.pt")
    merged, _ = load_model(folder / "model.pt")
    assert merged.state_dict().keys() == parent.state_dict().keys()
    # evaluate scored the merged model and, through their base, the adapter checkpoints
    evaluated = store.manifest("evaluate", tuned["evaluate"])["stats"]
    assert [r["step"] for r in evaluated["curve"]][-1] == stats["steps"] and len(evaluated["curve"]) >= 2
    assert evaluated["curve"][-1]["loss"] == evaluated["loss"]


def test_a_killed_train_stage_resumes_to_the_same_model(first_run, monkeypatch):
    import trainer.train
    from flows.flow import corpus_to_model

    store, overrides, versions, _ = first_run
    longer = {**overrides, "train.max_steps": 8, "train.checkpoint_every": 2}
    real_train = trainer.train.train

    def killed_after_step_4(*args, **kwargs):
        real_train(*args, **kwargs, stop_after=4)
        raise RuntimeError("killed")

    monkeypatch.setattr(trainer.train, "train", killed_after_step_4)
    with pytest.raises(Exception, match="killed"):
        corpus_to_model(config="configs/demo.toml", overrides=longer)
    (work,) = store.root.glob("train/.tmp-work-*")
    assert sorted(p.name for p in (work / "checkpoints").iterdir())[-1] == "step_0000004.pt"
    monkeypatch.setattr(trainer.train, "train", real_train)

    resumed = corpus_to_model(config="configs/demo.toml", overrides=longer)
    stats = store.manifest("train", resumed["train"])["stats"]
    assert stats["resumed_from"].endswith("step_0000004.pt") and stats["steps"] == 8
    assert not work.exists()
    evaluated = store.manifest("evaluate", resumed["evaluate"])["stats"]
    assert [r["step"] for r in evaluated["curve"]] == [2, 4, 6, 8]  # the kept checkpoints; 8 is model.pt
    assert evaluated["curve"][-1]["loss"] == evaluated["loss"]
    assert len({r["loss"] for r in evaluated["curve"]}) == 4
    resumed_model = torch.load(store.path("train", resumed["train"]) / "model.pt", weights_only=True)["model"]
    # the same version built in one go, from scratch
    again = corpus_to_model(config="configs/demo.toml", overrides=longer, stages=["train"], force=True)
    assert again["train"] == resumed["train"]
    assert store.manifest("train", again["train"])["stats"]["resumed_from"] is None
    fresh_model = torch.load(store.path("train", again["train"]) / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(fresh_model[k], resumed_model[k]) for k in fresh_model)  # bit-identical


def test_generate_and_export_commands_on_a_model_artifact(first_run, tmp_path):
    store, _, versions, _ = first_run

    def c2m(*args):
        return cli(*args, "--root", str(store.root))

    out = c2m("generate", versions["train"][:8], "-p", "The", "-n", "2", "--tokens", "12", "--seed", "7")
    assert out.returncode == 0, out.stderr
    samples = out.stdout.split("-" * 40 + "\n")[:-1]
    assert len(samples) == 2 and all(s.startswith("The") and len(s) > len("The\n") for s in samples)
    assert c2m("generate", versions["train"][:8], "-p", "The", "-n", "2", "--tokens", "12",
               "--seed", "7").stdout == out.stdout  # seeded
    assert f"train/{versions['train']}" in out.stderr

    exported = c2m("export", "--out", str(tmp_path / "hf"))  # LATEST
    assert exported.returncode == 0, exported.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}

    missing = c2m("generate", "nope")
    assert missing.returncode == 1 and missing.stderr.strip().startswith("error: train/nope")


def test_the_eval_set_is_held_out_before_filtering_and_scored(first_run):
    """holdout takes the eval split from the normalized corpus; no later stage sees those
    documents; evaluate scores the final model and each checkpoint on them."""
    store, _, versions, _ = first_run
    held = store.path("holdout", versions["holdout"])
    eval_docs = pq.read_table(held / "eval").to_pylist()
    assert sorted(d["source"] for d in eval_docs) == ["0007.html.gz", "0010.html.gz", "0011.html.gz"]
    eval_ids = {d["id"] for d in eval_docs}
    rejected = pq.read_table(held / "rejected").to_pylist()
    assert {r["id"] for r in rejected if r["reason"] == "eval"} == eval_ids
    for stage in ("filter", "dedup"):
        folder = store.path(stage, versions[stage])
        seen = {r["id"] for sub in ("docs", "rejected") for r in pq.read_table(folder / sub).to_pylist()}
        assert not seen & eval_ids, stage
    stats = store.manifest("holdout", versions["holdout"])["stats"]
    assert stats["eval"]["docs"] == 3
    assert stats["eval"]["bytes"] == sum(len(d["text"].encode()) for d in eval_docs)
    metrics = json.loads((store.path("evaluate", versions["evaluate"]) / "metrics.json").read_text())
    scored = metrics["eval"]
    assert scored["docs"] == 3 and 0 < scored["bits_per_byte"] < 8
    # every token but the last window's remainder is scored: nearly all the eval bytes
    assert 0.9 * stats["eval"]["bytes"] < scored["bytes"] <= stats["eval"]["bytes"]
    steps = [r["step"] for r in scored["curve"]]
    assert steps == sorted(steps) and steps[-1] == metrics["checkpoint_step"]
    assert scored["curve"][-1]["tokens_seen"] == store.manifest("train", versions["train"])["stats"]["tokens_seen"]
    assert "eval set:" in (store.path("evaluate", versions["evaluate"]) / "report.md").read_text()


def test_masked_objective_through_the_flow(first_run, tmp_path):
    """train.objective = masked on the same corpus: only train and evaluate rebuild (the
    tokenizer and shards are shared), evaluate reports masked-token figures, and the CLI
    refuses to generate or serve the encoder but exports it as a masked LM."""

    from flows.flow import corpus_to_model
    from flows.report import key_figure

    store, overrides, versions, _ = first_run
    encoder = corpus_to_model(config="configs/demo.toml", overrides={
        **overrides, "train.objective": "masked", "train.checkpoint_every": 3})
    assert [s for s in ORDER if encoder[s] != versions[s]] == ["train", "evaluate"]
    evaluated = store.manifest("evaluate", encoder["evaluate"])
    s = evaluated["stats"]
    assert s["objective"] == "masked" and 0 <= s["accuracy"] <= 1 and s["tokens_evaluated"] > 0
    assert [r["step"] for r in s["curve"]] == [3, 6] and "bits_per_byte" not in s["curve"][0]
    assert 0 <= s["eval"]["accuracy"] <= 1 and [r["step"] for r in s["eval"]["curve"]] == [3, 6]
    report = (store.path("evaluate", encoder["evaluate"]) / "report.md").read_text()
    assert "masked-token accuracy" in report and "bits per byte, the compressor anchors" in report
    assert "masked tokens guessed right" in report  # the fill-mask examples
    assert key_figure(evaluated).startswith("masked-token accuracy")
    trained = (store.path("train", encoder["train"]) / "report.md").read_text()
    assert "train masked-token loss" in trained and "val masked-token loss" in trained

    def c2m(*args):
        return cli(*args, "--root", str(store.root))

    for command in (["generate", "-p", "The"], ["serve", "--port", "0"]):
        refused = c2m(command[0], encoder["train"][:10], *command[1:])
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.count("\n") == 1 and "masked LM" in refused.stderr
    exported = c2m("export", encoder["train"][:10], "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    assert "AutoModelForMaskedLM" in exported.stdout
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "megatron-bert"
