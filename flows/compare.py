"""`c2m compare` and the `corpus-to-model/compare` deployment: did a data change make the
model better?

Each variant (a config file, or overrides over a base config) runs through the
corpus-to-model flow once per seed; the store's content versions make the stages that
are the same in two runs build once (the seeds share every data stage). Every variant
trains the same model shape on the same token budget and is scored on the same eval
bytes (the holdout stage's eval set, in bits per byte, which count bytes, not tokens).
The result is a `compare` artifact: a table, the eval curves overlaid, and a verdict
that calls a difference real only when the seeds' ranges do not overlap.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import statistics
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows import report
from flows.flow import corpus_to_model
from flows.server import record_process
from flows.config import Config, ConfigError, load_config, sections, versioned
from flows.plan import config_changes, flatten, show_value
from flows.report import code, escape
from flows.store import ArtifactStore, content_version

# what makes two models comparable: the same shape and the same tokens seen
SAME_IN_EVERY_VARIANT = ("train.n_layer", "train.n_head", "train.n_embd", "train.block_size",
                         "train.batch_size", "train.grad_accum_steps", "train.max_steps")
SEED_KEY = "train.seed"
REPORT_KEY = "compare-report"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str                      # a short label: the config file's stem, or V1, V2 ...
    config: str                    # config file
    overrides: dict[str, Any]      # laid over it

    def load(self, common: dict[str, Any]) -> Config:
        return load_config(self.config, {**common, **self.overrides})


def variants_from(items: list[str | dict], base: str) -> list[Variant]:
    """Config paths, or override sets ({key: value}) over `base`."""
    if len(items) < 2:
        raise ConfigError(f"compare needs two variants or more, got {len(items)}")
    out = []
    for i, item in enumerate(items, 1):
        if isinstance(item, dict):
            out.append(Variant(f"V{i}", base, dict(item)))
        else:
            out.append(Variant(Path(item).stem, str(item), {}))
    names = [v.name for v in out]
    if len(set(names)) < len(names):  # two files of one name in different folders
        out = [dataclasses.replace(v, name=f"V{i}-{v.name}") for i, v in enumerate(out, 1)]
    return out


def settings(cfg: Config) -> dict[str, Any]:
    """The settings that change an artifact, by section (run and dask change none)."""
    return {name: versioned(cfg.section(name)) for name in sections() if name not in ("run", "dask")}


def config_diff(first: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """`key: old -> new` for each setting (of `settings`) that differs, the seed aside."""
    return [line for line in config_changes(first, other) if not line.startswith(SEED_KEY + ":")]


def check_comparable(variants: list[Variant], cfgs: list[Config], seeds: int) -> None:
    """Raise ConfigError unless every variant trains the same shape on the same budget."""
    if not 1 <= seeds <= 16:
        raise ConfigError(f"--seeds {seeds}: should be 1 to 16 (2 or more for a verdict)")
    flats = [flatten(settings(c)) for c in cfgs]
    problems = [f"{v.name} sets {k} = {show_value(f[k])}, {variants[0].name} {show_value(flats[0][k])}"
                for v, f in zip(variants[1:], flats[1:]) for k in SAME_IN_EVERY_VARIANT
                if f[k] != flats[0][k]]
    encoders = [v.name for v, c in zip(variants, cfgs) if c.train.objective == "masked"]
    if encoders:  # their evaluate has masked-token figures only (trainer.evaluate.MASKED_LEAVES_OUT)
        problems.append(f"{', '.join(encoders)} set train.objective = masked: variants are ranked by the "
                        "eval set's bits per byte, which only a causal model has")
    roots = {c.run.artifacts for c in cfgs}
    if len(roots) > 1:
        problems.append(f"the variants use different artifact roots ({', '.join(sorted(roots))}); "
                        "they must share one store")
    if problems:
        raise ConfigError("variants must train the same model shape on the same token budget: "
                          + "; ".join(problems))


# -- the result ---------------------------------------------------------------------

def variant_result(variant: Variant, diff: list[str], runs: list[tuple[int, dict[str, str]]],
                   store: ArtifactStore) -> dict:
    """A variant's row: what its runs kept, trained and scored, from their manifests."""
    first = runs[0][1]
    dedup = store.manifest("dedup", first["dedup"])["stats"]
    shard = store.manifest("shard", first["shard"])["stats"]
    seeds = []
    for seed, versions in runs:
        metrics = json.loads((store.path("evaluate", versions["evaluate"]) / "metrics.json").read_text())
        trained = store.manifest("train", versions["train"])["stats"]
        seeds.append({"seed": seed, "bits_per_byte": metrics["eval"]["bits_per_byte"],
                      "eval_bytes": metrics["eval"]["bytes"], "train_seconds": trained["seconds"],
                      "curve": [{"tokens_seen": r["tokens_seen"], "bits_per_byte": r["bits_per_byte"]}
                                for r in metrics["eval"]["curve"]],
                      "versions": {s: versions[s] for s in ("train", "evaluate")}})
    scores = [s["bits_per_byte"] for s in seeds]
    return {"variant": variant.name, "config": variant.config, "overrides": variant.overrides,
            "diff": diff, "docs_kept": dedup["docs_out"], "train_tokens": shard["train"]["tokens"],
            "data_versions": {s: first[s] for s in ("holdout", "filter", "dedup", "tokenizer", "shard")},
            "seeds": seeds, "mean": statistics.fmean(scores), "low": min(scores), "high": max(scores),
            "train_seconds": statistics.fmean(s["train_seconds"] for s in seeds)}


def verdicts(rows: list[dict]) -> list[str]:
    """Each variant against the first: real only when the seeds' ranges do not overlap
    (every seed of one scores better than every seed of the other)."""
    first, out = rows[0], []
    for row in rows[1:]:
        gap = row["mean"] - first["mean"]
        what = f"{row['variant']} vs {first['variant']}: {gap:+.4f} bits per byte"
        if len(row["seeds"]) < 2 or len(first["seeds"]) < 2:
            out.append(f"{what}; one seed each, so no spread to judge it by: run with --seeds 2 or more")
        elif row["high"] < first["low"] or row["low"] > first["high"]:
            better = row["variant"] if gap < 0 else first["variant"]
            out.append(f"{what}: **real**, beyond the seed spread ({_range(first)}; {_range(row)}): "
                       f"{better} is better")
        else:
            out.append(f"{what}: **within seed noise** (the seeds' ranges overlap: {_range(first)}; "
                       f"{_range(row)}); no difference shown")
    return out


def _range(row: dict) -> str:
    return f"{row['variant']} {row['low']:.4f}-{row['high']:.4f}"


def spread(row: dict) -> float:
    """Half the seeds' range: mean ± spread covers every seed."""
    return (row["high"] - row["low"]) / 2


def render(rows: list[dict], lines_of_verdict: list[str], plot: str | None) -> str:
    n_seeds = len(rows[0]["seeds"])
    header = ("variant", "differs from " + rows[0]["variant"], "docs kept", "train tokens",
              "eval bits/byte per seed", f"mean ± spread ({n_seeds} seed{'s' * (n_seeds > 1)})", "train time")
    body = []
    for row in rows:
        diff = "<br>".join(escape(d) for d in row["diff"]) or ("(the reference)" if row is rows[0] else "nothing")
        body.append((escape(row["variant"]), diff, f"{row['docs_kept']:,}", f"{row['train_tokens']:,}",
                     ", ".join(f"{s['bits_per_byte']:.4f}" for s in row["seeds"]),
                     f"**{row['mean']:.4f}** ± {spread(row):.4f}", report.duration(row["train_seconds"])))
    eval_bytes = sorted({s["eval_bytes"] for row in rows for s in row["seeds"]})
    lines = ["# compare", "", *(f"- {v}" for v in lines_of_verdict), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             *("| " + " | ".join(r) + " |" for r in body), "",
             f"Scored on the same eval set (holdout/{rows[0]['data_versions']['holdout']}): "
             f"{eval_bytes[0]:,}" + (f"-{eval_bytes[-1]:,}" if len(eval_bytes) > 1 else "")
             + " bytes scored per model (each tokenizer's last partial window aside). "
             "Lower is better. Spread is half the range over seeds; a difference is called real "
             "only when no seed of one variant reaches the other's range."]
    if plot:
        lines += ["", f"![eval curves]({plot})"]
    lines += ["", "Per variant: " + "; ".join(
        f"{escape(r['variant'])}: {code(r['config'])}"
        + (f" with {code(json.dumps(r['overrides']))}" if r["overrides"] else "") for r in rows)]
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict], path: Path) -> None:
    """Eval bits per byte against tokens seen: one colour per variant, one line per seed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for row, colour in zip(rows, colours * 4):
        for i, seed in enumerate(row["seeds"]):
            curve = seed["curve"]
            ax.plot([r["tokens_seen"] for r in curve], [r["bits_per_byte"] for r in curve],
                    marker="o", color=colour, linestyle=("-", "--", ":", "-.")[i % 4],
                    label=f"{row['variant']} seed {seed['seed']}")
    ax.set_xlabel("tokens seen in training")
    ax.set_ylabel("eval bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def compare_version(rows: list[dict]) -> str:
    """The comparison's content version: what was compared and the evaluate versions."""
    from flows.stages import source_hash

    config = [{"variant": r["variant"], "diff": r["diff"]} for r in rows]
    inputs = {f"{r['variant']}/{s['seed']}": s["versions"]["evaluate"] for r in rows for s in r["seeds"]}
    return content_version("compare", {"variants": config}, source_hash(Path(__file__).read_text()), inputs)


def write_artifact(store: ArtifactStore, rows: list[dict], log=print) -> Path:
    """The `compare/<version>/` artifact: report.md, eval_curves.png, rows.json."""
    version = compare_version(rows)
    if store.exists("compare", version):
        log(f"compare: cache hit, compare/{version} (skipped)")
        return store.path("compare", version)
    with store.lease("compare", version, log=log) as lease:
        if store.exists("compare", version):
            return store.path("compare", version)
        build = store.begin(lease)
        try:
            started = time.time()
            plot_curves(rows, build.local / "eval_curves.png")
            said = verdicts(rows)
            markdown = render(rows, said, "eval_curves.png")
            (build.local / "report.md").write_text(markdown)
            (build.local / "rows.json").write_text(json.dumps(rows, indent=2))
            now = dt.datetime.now(dt.UTC).isoformat()
            manifest = {"code_version": "", "config": {}, "identity": {}, "started": now, "finished": now,
                        "duration_s": round(time.time() - started, 3),
                        "inputs": {f"{r['variant']}/{s['seed']}": {"stage": "evaluate",
                                                                    "version": s["versions"]["evaluate"]}
                                   for r in rows for s in r["seeds"]},
                        "stats": {"variants": [{k: r[k] for k in ("variant", "diff", "docs_kept",
                                                                  "train_tokens", "mean", "low", "high")}
                                               for r in rows], "verdicts": said}}
            path = store.commit(build, manifest)
        except BaseException:
            store.abort(build)
            raise
    log(f"compare: wrote {path}")
    return path


# -- the flow -----------------------------------------------------------------------

# the same flow name as the main flow: the deployment is corpus-to-model/compare
@flow(name="corpus-to-model", log_prints=True, on_running=[record_process])
def compare(configs: list[str | dict[str, Any]], seeds: int = 2, base: str = "configs/demo.toml",
            overrides: dict[str, Any] | None = None) -> dict:
    """Run each variant (a config file, or overrides over `base`) once per seed through
    corpus-to-model, then write and publish the compare artifact."""
    log = get_run_logger()
    variants = variants_from(configs, base)
    common = dict(overrides or {})
    cfgs = [v.load(common) for v in variants]
    check_comparable(variants, cfgs, seeds)
    trees = [settings(c) for c in cfgs]
    store = ArtifactStore(cfgs[0].run.artifacts)
    rows = []
    for variant, cfg, tree in zip(variants, cfgs, trees):
        runs = []
        for seed in range(cfg.train.seed, cfg.train.seed + seeds):
            log.info(f"compare: {variant.name}, seed {seed}")
            run = corpus_to_model.with_options(flow_run_name=f"{variant.name}-seed-{seed}")
            runs.append((seed, run(config=variant.config,
                                   overrides={**common, **variant.overrides, SEED_KEY: seed})))
        diff = config_diff(trees[0], tree) if variant is not variants[0] else []
        rows.append(variant_result(variant, diff, runs, store))
    path = write_artifact(store, rows, log=log.info)
    create_markdown_artifact(markdown=report.for_prefect((path / "report.md").read_text(), path),
                             key=REPORT_KEY, description=f"compare {path.name}")
    for line in store.manifest("compare", path.name)["stats"]["verdicts"]:
        log.info(line.replace("**", ""))
    return {"compare": path.name, "report": str(path / "report.md"),
            "variants": {r["variant"]: {"mean": r["mean"], "spread": spread(r),
                                        "seeds": [s["bits_per_byte"] for s in r["seeds"]]}
                         for r in rows}}
