"""What a user sees of a run in Prefect, read back through the API of a real local server:
the flow run twice on the tiny corpus (everything built, then everything a cache hit)."""
from __future__ import annotations

import base64
import re

import pytest

from conftest import tiny_overrides
from flows.stages import ORDER
from flows.store import ArtifactStore

IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)")
PNG_URI = "data:image/png;base64,"


@pytest.fixture(scope="module")
def runs(prefect_harness, tiny_corpus, tmp_path_factory):
    """(store, [(versions, flow run id, flow run name), ...]) of a building run and a
    run of cache hits."""
    from prefect.client.orchestration import get_client

    from flows.flow import corpus_to_model

    artifacts = tmp_path_factory.mktemp("ui") / "artifacts"
    overrides = tiny_overrides(tiny_corpus, artifacts)
    done = []
    for _ in range(2):
        state = corpus_to_model(config="configs/demo.toml", overrides=overrides, return_state=True)
        run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            done.append((state.result(), run_id, client.read_flow_run(run_id).name))
    return ArtifactStore(artifacts), done


def artifacts_of(run_id) -> dict:
    """The run's markdown artifacts (reports and summary) by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterType, FlowRunFilter,
                                                FlowRunFilterId)

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["markdown"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    by_key = {}
    for artifact in found:
        assert artifact.key not in by_key, f"two artifacts {artifact.key} in one run"
        by_key[artifact.key] = artifact
    return by_key


def task_runs_of(run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return {t.name.rsplit("-", 1)[0]: t for t in found}  # "extract-a1b" -> "extract"


def test_every_stage_publishes_its_report_on_both_runs(runs):
    _, [(versions, first_id, first_name), (again, second_id, _)] = runs
    assert again == versions
    for run_id, cached in ((first_id, False), (second_id, True)):
        published = artifacts_of(run_id)
        assert set(published) == {f"{s}-report" for s in ORDER} | {"corpus-to-model-summary"}
        for stage in ORDER:
            data = published[f"{stage}-report"].data
            assert f"# {stage} {versions[stage]}" in data  # the full report, also on a hit
            # a hit says so and names the run that built the version
            assert ("cache hit" in data and first_name in data) == cached, (stage, data[:300])


def test_every_image_in_the_reports_is_an_embedded_png(runs):
    _, done = runs
    for _, run_id, _ in done:
        published = artifacts_of(run_id)
        for key, artifact in published.items():
            for link in IMAGE.findall(artifact.data):
                assert link.startswith(PNG_URI), f"{key} links an image the UI cannot load: {link[:80]}"
                assert base64.b64decode(link[len(PNG_URI):]).startswith(b"\x89PNG\r\n\x1a\n"), key
        assert IMAGE.findall(published["train-report"].data), "the loss plot is in the train report"


def test_the_summary_lists_every_stage_as_built_then_cached(runs):
    _, [(versions, first_id, _), (_, second_id, _)] = runs
    for run_id, status in ((first_id, "built"), (second_id, "cached")):
        published = artifacts_of(run_id)
        table = published["corpus-to-model-summary"].data
        rows = {cells[0]: cells for cells in
                ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
                 if line.startswith("|"))}
        for stage in ORDER:
            row = rows[stage]
            assert versions[stage] in row and status in row, row
            # the link opens this run's report of the stage in the UI
            assert f"/artifacts/artifact/{published[f'{stage}-report'].id})" in row[5], row
            # why it was built, from the plan; a cached stage needs no reason
            assert row[6].startswith("new: no earlier version") if status == "built" else row[6] == "", row


def test_cache_hits_are_told_apart_from_built_stages(runs):
    store, [(versions, first_id, first_name), (_, second_id, _)] = runs
    first, second = task_runs_of(first_id), task_runs_of(second_id)
    assert set(first) == set(second) == set(ORDER)
    assert {t.state_type.value for t in [*first.values(), *second.values()]} == {"COMPLETED"}
    assert {s: t.state_name for s, t in first.items()} == {s: "Completed" for s in ORDER}
    assert {s: t.state_name for s, t in second.items()} == {s: "Cached" for s in ORDER}
    for stage, version in versions.items():  # the manifest says which run built it
        built_by = store.manifest(stage, version)["built_by"]
        assert built_by == {"flow_run_id": str(first_id), "flow_run_name": first_name}


def test_the_run_graph_is_the_dag(runs):
    """Each task's upstream task runs are its real inputs, nothing else (not via the plan)."""
    _, [(_, first_id, _), _] = runs
    tasks = task_runs_of(first_id)
    name_of = {str(t.id): stage for stage, t in tasks.items()}
    assert not any(t.task_inputs.get("plan") for t in tasks.values())
    upstream = {stage: sorted(name_of[str(i.id)] for inputs in t.task_inputs.values() for i in inputs)
                for stage, t in tasks.items()}
    assert upstream == {
        "source": [],
        "extract": ["source"],
        "normalize": ["extract"],
        "holdout": ["normalize"],
        "filter": ["holdout"],
        "dedup": ["filter"],
        "tokenizer": ["dedup"],
        "shard": ["dedup", "tokenizer"],
        "train": ["shard"],
        "evaluate": ["holdout", "shard", "tokenizer", "train"],
    }
