"""`c2m plan`: what a run would build, reuse or skip, and why, on a store the real flow built."""
from __future__ import annotations

import json

import pytest

from conftest import cli, free_port, tiny_overrides
from flows import stages
from flows.config import load_config
from flows.plan import Own, Plan, code_changes, config_changes, plan_run
from flows.stages import ORDER, select_stages
from flows.store import ArtifactStore


@pytest.fixture(scope="module")
def built(prefect_harness, tiny_corpus, tmp_path_factory):
    """The tiny corpus through the whole flow once, with the plan made before the run."""
    from flows.flow import corpus_to_model

    artifacts = tmp_path_factory.mktemp("plan") / "artifacts"
    overrides = tiny_overrides(tiny_corpus, artifacts)
    before = plan_run(Plan(load_config("configs/demo.toml", overrides), ArtifactStore(artifacts), ORDER))
    state = corpus_to_model(config="configs/demo.toml", overrides=overrides, return_state=True)
    return ArtifactStore(artifacts), overrides, before, state.result(), state.state_details.flow_run_id


def planned(overrides: dict, stages_: list[str] | None = None, **options) -> dict:
    """stage -> its Step, for a plan with these overrides."""
    cfg = load_config("configs/demo.toml", overrides)
    steps = plan_run(Plan(cfg, ArtifactStore(cfg.run.artifacts), select_stages(stages_), **options))
    return {s.stage: s for s in steps}


def actions(steps: dict) -> dict[str, str]:
    return {name: step.action for name, step in steps.items()}


def c2m_plan(overrides: dict, *args: str):
    """`c2m plan` in its own process, with no Prefect server to be found."""
    sets = [a for key, value in overrides.items() for a in ("--set", f"{key}={value}")]
    return cli("plan", "--config", "configs/demo.toml", *sets, *args,
               PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api", PREFECT_SERVER_EPHEMERAL_ENABLED="false")


def test_the_first_plan_builds_every_stage_as_new_and_the_run_gets_its_versions(built):
    store, _, before, versions, _ = built
    assert [s.stage for s in before] == ORDER
    assert all(s.action == "build" and s.reasons[0].startswith("new: ") for s in before)
    assert {s.stage: s.version for s in before} == versions
    for stage, version in versions.items():  # per-module hashes that make the code version
        manifest = store.manifest(stage, version)
        assert stages.code_version(manifest["code_modules"]) == manifest["code_version"]
        assert set(manifest["code_modules"]) == {*stages.STAGES[stage].modules, stages.BUILD_FUNCTION}


def test_c2m_plan_after_a_run_with_the_same_config_is_all_cached(built):
    _, overrides, _, versions, _ = built
    out = c2m_plan(overrides, "--json")
    assert out.returncode == 0, out.stderr
    steps = json.loads(out.stdout)
    assert [(s["stage"], s["version"], s["action"], s["reasons"]) for s in steps] == \
        [(stage, versions[stage], "cached", []) for stage in ORDER]


def test_c2m_plan_after_a_one_key_change_names_it_and_builds_only_downstream(built):
    _, overrides, _, versions, _ = built
    out = c2m_plan({**overrides, "dedup.threshold": 0.7})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    heads = {line.split()[0]: line.split()[1:] for line in lines if line[:1].isalpha()}
    downstream = ORDER[ORDER.index("dedup"):]
    for stage in ORDER:
        version, action = heads[stage]
        assert action == ("build" if stage in downstream else "cached"), stage
        assert (version == versions[stage]) == (stage not in downstream), stage
    dedup = lines.index(next(line for line in lines if line.startswith("dedup ")))
    assert lines[dedup + 1].strip() == f"against dedup/{versions['dedup']}:"
    assert lines[dedup + 2].strip() == "dedup.threshold: 0.0 -> 0.7"
    assert not lines[dedup + 3].startswith(" ")  # that key and nothing else
    assert f"input dedup changed: {versions['dedup']} -> {heads['dedup'][0]} (built by this run)" in out.stdout
    assert lines[-1] == f"{len(ORDER) - len(downstream)} cached, {len(downstream)} build"


def test_a_tokenizer_change_builds_the_tokenizer_and_what_reads_it(built):
    _, overrides, _, versions, _ = built
    steps = planned({**overrides, "tokenizer.vocab_size": 300})
    builds = [s for s in ORDER if steps[s].action == "build"]
    assert builds == ["tokenizer", "shard", "train", "evaluate"]
    assert steps["tokenizer"].reasons == ("tokenizer.vocab_size: 400 -> 300",)
    assert steps["tokenizer"].against == versions["tokenizer"]
    new = steps["tokenizer"].version
    assert steps["shard"].reasons == (f"input tokenizer changed: {versions['tokenizer']} -> {new} (built by this run)",)
    assert all(steps[s].version == versions[s] for s in ORDER if s not in builds)


def test_comment_and_docstring_edits_plan_nothing_and_a_code_edit_names_its_module(built, monkeypatch):
    _, overrides, _, versions, _ = built
    real = stages.module_source

    def edited(change):
        monkeypatch.setattr(stages, "module_source",
                            lambda name: change(real(name)) if name == "corpus.dedup" else real(name))

    edited(lambda src: "# a comment on top\n" + src.replace(
        '"""Exact duplicates always go;', '"""A reworded docstring. Exact duplicates always go;', 1)
        .replace("\n\n\n", "\n\n\n# another comment\n", 1))
    assert real("corpus.dedup") != stages.module_source("corpus.dedup")
    steps = planned(overrides)
    assert actions(steps) == dict.fromkeys(ORDER, "cached")
    assert {s: steps[s].version for s in ORDER} == versions

    edited(lambda src: src.replace("bands: int = Field(14,", "bands: int = Field(15,", 1))
    steps = planned(overrides)
    assert steps["dedup"].reasons == ("code changed: corpus.dedup",)
    assert [s for s in ORDER if steps[s].action == "build"] == ORDER[ORDER.index("dedup"):]


def test_pins_and_force(built):
    _, overrides, _, versions, _ = built
    # a pinned model: its own config change does not count, and evaluate is what it was
    steps = planned({**overrides, "train.max_steps": 4}, pins={"train": versions["train"][:8]})
    assert (steps["train"].action, steps["train"].version) == ("pinned", versions["train"])
    assert actions(steps) == {**dict.fromkeys(ORDER, "cached"), "train": "pinned"}
    assert steps["evaluate"].version == versions["evaluate"]
    # forced: rebuilt though it exists, the rest as it is
    steps = planned(overrides, ["evaluate"], force=True)
    assert actions(steps) == {**dict.fromkeys(ORDER, "cached"), "evaluate": "build"}
    assert steps["evaluate"].reasons == (f"forced: rebuilds evaluate/{versions['evaluate']}, which exists",)
    # a run of one stage: what follows it is not run; what it needs and lacks is missing
    steps = planned({**overrides, "dedup.threshold": 0.7}, ["tokenizer"])
    assert actions(steps) == {**dict.fromkeys(ORDER, "cached"), "dedup": "missing", "tokenizer": "build",
                              "shard": "not run", "train": "not run", "evaluate": "not run"}
    assert "the run would fail" in steps["dedup"].reasons[0]


def test_config_and_code_changes_against_older_manifests():
    assert config_changes({"dedup": {"bands": 14, "old": 1}, "device": "cpu"},
                          {"dedup": {"bands": 20, "new": (1, 2)}, "device": "cpu"}) == [
        "dedup.bands: 14 -> 20", "dedup.new: added = [1, 2]", "dedup.old: removed (was 1)"]
    own = Own({}, {}, {"corpus.dedup": "a" * 12, stages.BUILD_FUNCTION: "b" * 12})
    assert code_changes({"code_version": own.code_version}, own) == []
    assert code_changes({"code_version": "0" * 12}, own) == [
        "code changed (the old version does not record per-module hashes)"]
    assert code_changes({"code_version": "0" * 12, "code_modules": {"corpus.dedup": "c" * 12, "x": "d"}},
                        own) == ["code added: build function", "code changed: corpus.dedup", "code removed: x"]


def test_c2m_plan_exit_codes(built):
    _, overrides, _, _, _ = built
    bad = c2m_plan({**overrides, "dedup.threshold": 2})
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "dedup.threshold" in bad.stderr
    assert bad.stdout == ""


def test_a_run_logs_its_plan_first_and_its_summary_says_why(built):
    """Last here: it adds versions to the store the other tests plan against."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowRunFilter,
                                                FlowRunFilterId, LogFilter, LogFilterFlowRunId)
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogWorker

    from flows.flow import SUMMARY_KEY, corpus_to_model

    _, overrides, _, _, _ = built
    changed = {**overrides, "dedup.threshold": 0.7}
    steps = planned(changed)
    state = corpus_to_model(config="configs/demo.toml", overrides=changed, return_state=True)
    assert state.result() == {s: steps[s].version for s in ORDER}  # the plan's versions, built

    APILogWorker.drain_all(timeout=5)
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = [log.message for log in client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), sort=LogSort.TIMESTAMP_ASC)]
        (summary,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_KEY])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    first_stage_line = next(i for i, m in enumerate(logs) if m.startswith("source:"))
    plan_lines = [m for m in logs[:first_stage_line] if m.startswith("plan: ")]
    assert plan_lines == [f"plan: {steps[s].line()}" for s in ORDER]
    assert f"plan: dedup {steps['dedup'].version} build: dedup.threshold: 0.0 -> 0.7" in plan_lines
    markdown = summary.data.replace("\\", "")  # unescaped
    rows = {line.split("|")[1].strip(): line for line in markdown.splitlines() if line.startswith("| ")}
    assert rows["dedup"].rstrip(" |").endswith("dedup.threshold: 0.0 -> 0.7")
    assert "input dedup changed" in rows["tokenizer"]
    assert rows["filter"].rstrip().endswith("|  |")  # cached: no why
