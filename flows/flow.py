"""The `corpus-to-model` Prefect flow: one task per stage, reading like the DAG.

Each task is thin: run_stage computes the stage's content version, skips it on a cache
hit, otherwise takes the version's lease (waiting while another run builds it, then
using that), builds it into a temporary folder, writes manifest and report, and renames it
into place. Every stage the run uses publishes its report as a Prefect artifact, a cache
hit too (with a note naming the run that built it), and a cache hit's task run ends in a
state named "Cached" ("Pinned" for a pinned version) so built and reused stages differ at
a glance. The flow starts by logging its plan (flows/plan.py: per stage cached, build or
pinned, and why), and ends by publishing one summary artifact, the table of stages.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports transformers

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.states import Completed
from prefect.utilities.annotations import quote

from corpus.index import index_documents
from flows import parallel, report
from flows.config import load_config
from flows.plan import Plan, Step, plan_run
from flows.progress import StageProgress
from flows.server import record_process
from flows.stages import ORDER, PARTITIONED, STAGES, StageContext, select_stages
from flows.store import ArtifactStore


@dataclass(frozen=True)
class Used:
    """How this run used a stage, for the summary."""
    got: str            # "built", "cached" or "pinned"
    seconds: float      # spent on the stage in this run
    report_id: str      # its report artifact in this run


@dataclass(frozen=True)
class Ref:
    """A stage's artifact as passed between tasks."""
    stage: str
    version: str
    path: Path
    used: Used | None = None


SUMMARY_KEY = "corpus-to-model-summary"


def run_stage(name: str, plan: Plan, inputs: dict[str, Ref]) -> tuple[Ref, str] | None:
    """The stage's artifact and how this run got it: "built", "cached" or "pinned"."""
    log = get_run_logger()
    store = plan.store
    if not plan.part_of_run(name):
        return None  # downstream of everything this run builds
    if name in plan.pins:
        version = store.resolve(name, plan.pins[name])
        log.info(f"{name}: pinned to {version}")
        return Ref(name, version, store.path(name, version)), "pinned"
    version = plan.version(name, {k: r.version for k, r in inputs.items()})  # as plan_run computes it
    if name not in plan.stages or (store.exists(name, version) and not plan.force):
        if not store.exists(name, version):
            raise RuntimeError(
                f"{name}: no artifact {name}/{version} for this config and its inputs, and this "
                f"run does not build {name}; run it too, or pin a version (`c2m ls {name}`)")
        log.info(f"{name}: cache hit, using {name}/{version} (skipped)")
        return _cache_hit(name, version, store, log), "cached"
    # only the lease holder builds a version: a second run waits here, then uses it
    with store.lease(name, version, log=log.info, run=_flow_run_name()) as lease:
        if store.exists(name, version) and (lease.waited_for or not plan.force):
            log.info(f"{name}: cache hit, using {name}/{version} built by "
                     f"{lease.waited_for or 'another run'} (skipped)")
            return _cache_hit(name, version, store, log), "cached"
        if lease.waited_for:
            log.info(f"{name}: {lease.waited_for} stopped without finishing {name}/{version}")
        own = plan.own(name)
        return _build(name, plan, inputs, lease, own.config, own.identity, own.code_version, log), "built"


def _flow_run_name() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.name


def _built_by() -> dict:
    from prefect.runtime import flow_run

    return {"flow_run_id": flow_run.id, "flow_run_name": flow_run.name}


def _cache_hit(name: str, version: str, store: ArtifactStore, log) -> Ref:
    warning = store.use_latest(name, version)  # may fail on a read-only or full store
    if warning:
        log.warning(warning)
    return Ref(name, version, store.path(name, version))


def _build(name: str, plan: Plan, inputs: dict[str, Ref], lease, sections: dict, identity: dict,
           code_version: str, log) -> Ref:
    stage, store, version = STAGES[name], plan.store, lease.version
    store.gc(name, keep_work=True, log=lambda m: log.info(f"{name}: {m}"), holding=lease)
    log.info(f"{name}: building {name}/{version}")
    build = store.begin(lease)
    work = store.work_dir(name, version)  # the lease holder's alone
    if plan.force:
        shutil.rmtree(work, ignore_errors=True)  # forced: start over, do not resume
    started = time.time()
    try:
        # partitions are read where they are; other files need a local copy
        ctx = StageContext(cfg=plan.cfg, inputs={k: r.path if k in PARTITIONED else store.local(r.stage, r.version)
                                                 for k, r in inputs.items()},
                           manifests={k: store.manifest(r.stage, r.version) for k, r in inputs.items()},
                           out=build.out, local_out=build.local, log=log.info, work=work,
                           progress=StageProgress(name), identity=identity)
        stats = stage.build(ctx)
        # id -> partition, row: `c2m why`
        indexed = index_documents(build.out, build.local, with_sources=not stage.inputs)
        if indexed is not None:
            stats["index_seconds"] = round(indexed, 3)
        finished = time.time()
        manifest = {
            "stage": name, "version": version, "code_version": code_version,
            "code_modules": plan.own(name).code_modules,
            "inputs": {k: {"stage": r.stage, "version": r.version} for k, r in inputs.items()},
            "config": sections, "identity": identity,
            "started": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
            "finished": dt.datetime.fromtimestamp(finished, dt.UTC).isoformat(),
            "duration_s": round(finished - started, 3), "stats": stats, "built_by": _built_by(),
        }
        markdown = report.render(manifest, build.local)
        (build.local / "report.md").write_text(markdown)
        path = store.commit(build, manifest)
        shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        store.abort(build)  # nothing half-written is left where a later stage could read it
        raise
    log.info(f"{name}: wrote {path} in {finished - started:.1f} s")
    return Ref(name, version, path)


def publish_report(ref: Ref, got: str, store: ArtifactStore) -> str:
    """Publish the stage's report.md as its `<stage>-report` artifact, plots embedded (the
    UI cannot load files beside it); a reused version's report opens with a note saying
    so. Returns the artifact's id."""
    markdown = report.for_prefect((ref.path / "report.md").read_text(), ref.path)
    if got != "built":
        markdown = report.cache_hit(store.manifest(ref.stage, ref.version), _flow_run_name(),
                                    ref.path, got) + "\n" + markdown
    artifact_id = create_markdown_artifact(
        markdown=markdown, key=f"{ref.stage}-report",
        description=f"{ref.stage} {ref.version}" + ("" if got == "built" else f" ({got})"))
    return str(artifact_id)


def _stage_task(name: str):
    @task(name=name, cache_policy=NONE, persist_result=False)
    def stage_task(plan: Plan, **inputs: Ref):
        started = time.time()
        outcome = run_stage(name, plan, inputs)
        if outcome is None:
            return None
        ref, got = outcome
        ref = replace(ref, used=Used(got, round(time.time() - started, 3),
                                     publish_report(ref, got, plan.store)))
        # a reused artifact's task run ends "Cached" (or "Pinned"), as Prefect's own cache hits do
        return ref if got == "built" else Completed(name=got.capitalize(), data=ref)
    return stage_task


def _use(stage_task, plan: Plan, **inputs: Ref | None) -> Ref | None:
    """Run a stage's task and return its artifact. `quote` keeps Prefect from tracing the
    plan to upstream tasks: a task's only dependencies in the run graph are its inputs."""
    return stage_task(quote(plan), return_state=True, **inputs).result()


def _ui_link(artifact_id: str) -> str | None:
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/artifacts/artifact/{artifact_id}" if ui else None


def publish_summary(refs: list[Ref], store: ArtifactStore, steps: list[Step] = ()) -> str:
    """The run's table of stages, the first artifact a user opens, with why each built
    stage was built (from the plan). Returns its id."""
    why = {s.stage: "; ".join(s.reasons) for s in steps}
    rows = []
    for ref in refs:
        manifest = store.manifest(ref.stage, ref.version)
        rows.append({"stage": ref.stage, "version": ref.version, "status": ref.used.got,
                     "duration_s": ref.used.seconds, "key": report.key_figure(manifest),
                     "link": _ui_link(ref.used.report_id),
                     "why": why.get(ref.stage, "") if ref.used.got == "built" else ""})
    summary_id = str(create_markdown_artifact(markdown=report.summary(rows), key=SUMMARY_KEY,
                                              description="the stages of this run"))
    get_run_logger().info(f"summary of this run: {_ui_link(summary_id) or SUMMARY_KEY}")
    return summary_id


source, extract, normalize, holdout, filter_, dedup, tokenizer, shard, train, evaluate = (
    _stage_task(name) for name in ORDER)


# each run records its process, so that a killed one is marked Crashed at the next start
@flow(name="corpus-to-model", log_prints=True, on_running=[record_process])
def corpus_to_model(config: str = "configs/demo.toml", overrides: dict[str, Any] | None = None,
                    stages: list[str] | None = None, from_stage: str | None = None,
                    force: bool = False, pins: dict[str, str] | None = None) -> dict[str, str]:
    """Raw HTML to a trained, evaluated GPT. `stages`/`from_stage` choose what to build
    (the rest is read from the store), `force` rebuilds those even on a cache hit,
    `pins` uses given versions of stages as they are."""
    cfg = load_config(config, overrides)
    plan = Plan(cfg, ArtifactStore(cfg.run.artifacts), select_stages(stages, from_stage),
                force, dict(pins or {}))
    steps = plan_run(plan)  # computes each stage's identity once; the stages reuse it
    for step in steps:
        get_run_logger().info(f"plan: {step.line()}")
    try:
        raw = _use(source, plan)
        extracted = _use(extract, plan, source=raw)
        normalized = _use(normalize, plan, extract=extracted)
        held_out = _use(holdout, plan, normalize=normalized)
        filtered = _use(filter_, plan, holdout=held_out)
        deduped = _use(dedup, plan, filter=filtered)
        tok = _use(tokenizer, plan, dedup=deduped)
        shards = _use(shard, plan, dedup=deduped, tokenizer=tok)
        parallel.shutdown()  # training runs alone on its cores
        model = _use(train, plan, shard=shards)
        scores = _use(evaluate, plan, train=model, shard=shards, tokenizer=tok, holdout=held_out)
    finally:
        parallel.shutdown()
    refs = [r for r in (raw, extracted, normalized, held_out, filtered, deduped, tok, shards, model, scores)
            if r is not None]
    publish_summary(refs, plan.store, steps)
    versions = {r.stage: r.version for r in refs}
    try:  # `c2m why --run` follows a document through them
        plan.store.record_run(versions, **_built_by())
    except OSError as exc:  # a read-only or full store still gives its cache hits
        get_run_logger().warning(f"could not record this run's versions in {plan.store.root / 'runs'} "
                                 f"({exc.strerror or exc}); `c2m why --run` will not know it")
    return versions
