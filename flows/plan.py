"""What a run would do, and why, worked out before anything runs.

For every stage in ORDER a plan gives the version the stage would have and its action:
cached (that version exists), pinned, build, missing (the run does not build it and the
store lacks it: the run would fail) or not run (downstream of every stage the run builds).
A build says why, against the newest complete version of that stage (by its manifest's
`finished`): the config keys that changed with old -> new values, the modules whose code
changed, the inputs this run builds anew, forced, or new (no earlier version).

`Plan.version` is the one computation of a stage's version: run_stage calls it too, so
the plan and the run cannot disagree. A stage's own part of its version (config, identity,
code) is computed once per Plan: identity functions may load models (the filter's
toxicity scorer), and the flow plans first, then runs with the same Plan.

No Prefect here: `c2m plan` needs no server.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from flows.config import Config
from flows.stages import ORDER, STAGES, code_version
from flows.store import ArtifactStore, content_version

ACTIONS = ("cached", "pinned", "build", "missing", "not run")


@dataclass(frozen=True)
class Own:
    """A stage's own part of its version: everything but its inputs' versions."""
    config: dict
    identity: dict                 # facts outside the config (input files, scorer, device)
    code_modules: dict[str, str]   # module (or "build function") -> short hash of its code

    @property
    def code_version(self) -> str:
        return code_version(self.code_modules)


@dataclass
class Plan:
    """What a run is asked to do."""
    cfg: Config
    store: ArtifactStore
    stages: list[str]                                   # the stages this run builds
    force: bool = False                                 # rebuild them even on a cache hit
    pins: dict[str, str] = field(default_factory=dict)  # stage -> version to use as is
    owns: dict[str, Own] = field(default_factory=dict, repr=False)  # computed so far

    def part_of_run(self, name: str) -> bool:
        """False for stages downstream of everything the run builds."""
        return ORDER.index(name) <= max(ORDER.index(s) for s in self.stages)

    def own(self, name: str) -> Own:
        if name not in self.owns:
            stage = STAGES[name]
            self.owns[name] = Own(stage.config(self.cfg), stage.identity(self.cfg), stage.code_modules())
        return self.owns[name]

    def version(self, name: str, inputs: dict[str, str]) -> str:
        """The stage's version given its inputs' versions (input stage -> version)."""
        own = self.own(name)
        return content_version(name, {**own.config, **own.identity}, own.code_version, inputs)


@dataclass(frozen=True)
class Step:
    """What the run does with one stage."""
    stage: str
    action: str                    # one of ACTIONS
    version: str | None            # None when not run
    reasons: tuple[str, ...] = ()  # why it builds (or why it is missing)
    against: str | None = None     # the version a build was compared with

    def line(self) -> str:
        """One line: stage, version, action, and the reasons after a colon."""
        head = f"{self.stage} {self.version or '-'} {self.action}"
        return head + (f": {'; '.join(self.reasons)}" if self.reasons else "")

    def to_dict(self) -> dict:
        return {"stage": self.stage, "version": self.version, "action": self.action,
                "reasons": list(self.reasons), "against": self.against}


def plan_run(plan: Plan) -> list[Step]:
    """The Step of every stage in ORDER, without running any."""
    steps: dict[str, Step] = {}
    for name in ORDER:
        steps[name] = _step(name, plan, steps)
    return list(steps.values())


def _step(name: str, plan: Plan, upstream: dict[str, Step]) -> Step:
    store = plan.store
    if not plan.part_of_run(name):
        return Step(name, "not run", None)
    if name in plan.pins:
        return Step(name, "pinned", store.resolve(name, plan.pins[name]))
    inputs = {i: upstream[i] for i in STAGES[name].inputs}
    version = plan.version(name, {i: s.version for i, s in inputs.items()})
    exists = store.exists(name, version)
    if name not in plan.stages:
        if exists:
            return Step(name, "cached", version)
        return Step(name, "missing", version, (
            f"this run does not build {name} and {store.root} has no {name}/{version}: the run "
            f"would fail; build {name} too, or pin a version (`c2m ls {name}`)",))
    if exists and not plan.force:
        return Step(name, "cached", version)
    if exists:
        return Step(name, "build", version, (f"forced: rebuilds {name}/{version}, which exists",))
    newest = newest_version(store, name)
    if newest is None:
        return Step(name, "build", version, (f"new: no earlier version of {name} in {store.root}",))
    return Step(name, "build", version, tuple(_why(name, plan.own(name), store.manifest(name, newest),
                                                   inputs)), newest)


def newest_version(store: ArtifactStore, stage: str) -> str | None:
    """The stage's complete version whose manifest says it finished last."""
    finished = {v: store.manifest(stage, v).get("finished", "") for v in store.versions(stage)}
    return max(finished, key=lambda v: finished[v]) if finished else None


def _why(name: str, own: Own, old: dict, inputs: dict[str, Step]) -> list[str]:
    """What differs between the version a run would build and an existing one."""
    reasons = config_changes({**old.get("config", {}), **old.get("identity", {})},
                             {**own.config, **own.identity})
    reasons += code_changes(old, own)
    old_inputs = {k: v["version"] for k, v in old.get("inputs", {}).items()}
    for stage in sorted(set(old_inputs) | set(inputs)):
        before, step = old_inputs.get(stage), inputs.get(stage)
        if step is None:
            reasons.append(f"input {stage} removed (was {before})")
            continue
        how = {"build": "built by this run", "cached": "exists", "pinned": "pinned",
               "missing": "missing"}[step.action]
        if before is None:
            reasons.append(f"input {stage} added: {step.version} ({how})")
        elif before != step.version:
            reasons.append(f"input {stage} changed: {before} -> {step.version} ({how})")
    return reasons or [f"differs from {name}/{old.get('version')} in a way its manifest does not show"]


def config_changes(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for each dotted key whose value differs; added and removed keys too."""
    before, after = flatten(old), flatten(_as_json(new))
    lines = []
    for key in sorted(set(before) | set(after)):
        if key not in before:
            lines.append(f"{key}: added = {show_value(after[key])}")
        elif key not in after:
            lines.append(f"{key}: removed (was {show_value(before[key])})")
        elif before[key] != after[key]:
            lines.append(f"{key}: {show_value(before[key])} -> {show_value(after[key])}")
    return lines


def code_changes(old: dict, own: Own) -> list[str]:
    if old.get("code_version") == own.code_version:
        return []
    modules = old.get("code_modules")
    if modules is None:
        return ["code changed (the old version does not record per-module hashes)"]
    lines = []
    for module in sorted(set(modules) | set(own.code_modules)):
        if module not in modules:
            lines.append(f"code added: {module}")
        elif module not in own.code_modules:
            lines.append(f"code removed: {module}")
        elif modules[module] != own.code_modules[module]:
            lines.append(f"code changed: {module}")
    return lines


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"dedup": {"threshold": 0.8}} -> {"dedup.threshold": 0.8}; an empty dict is a value."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _as_json(value):
    """As the manifest stores it (tuples become lists, paths strings), so equal compares equal."""
    return json.loads(json.dumps(value, default=str))


def show_value(value, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def render(steps: list[Step]) -> str:
    """One line per stage (stage, version, action), reasons indented below."""
    width = max(len(s.stage) for s in steps)
    lines = []
    for step in steps:
        lines.append(f"{step.stage:<{width}}  {step.version or '-':<12}  {step.action}")
        if step.against:
            lines.append(f"{'':<{width}}    against {step.stage}/{step.against}:")
        lines += [f"{'':<{width}}    {reason}" for reason in step.reasons]
    counts = {a: sum(s.action == a for s in steps) for a in ACTIONS}
    lines.append(", ".join(f"{n} {a}" for a, n in counts.items() if n))
    return "\n".join(lines)
