"""The DAG as data: each stage's inputs, config sections, code, and how it is built.

A build function gets a StageContext (config, input artifact folders, where to write)
and calls the pure code in corpus/ or trainer/, mapping partitions over Dask where the
stage is per-document. It returns the stats that go into the manifest.

Parquet partitions are read and written where the store keeps them (a local folder or an
fsspec URL: Dask workers elsewhere reach them by URL); every other file is read from and
written to local folders (tokenizers, numpy and torch need local files).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import textwrap
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from tokenizers import Tokenizer

from corpus import dedup, holdout, sources, tokenizer, toxicity
from corpus.documents import (is_val, merge_stats, open_partition, process_partition, read_docs, read_texts,
                              write_docs)
from corpus.extract import extract
from corpus.filter import filter_docs
from corpus.language import load_language_model
from corpus.normalize import normalize
from corpus.shard import write_document_tokens, write_token_shards
from flows.config import Config, versioned
from flows.parallel import map_partitions
from flows.store import ArtifactStore


@dataclass
class StageContext:
    cfg: Config                    # the whole run config
    # input stage -> its version: where it lives for PARTITIONED stages, else a local copy
    inputs: dict[str, Path]
    manifests: dict[str, dict]     # input stage -> its manifest
    out: Path                      # where the version's partitions go (any fsspec location)
    # a local folder for every other file the stage writes; None: out is local, use it
    local_out: Path | None = None
    log: Callable[[str], None] = print
    # scratch that survives a failed or killed run of this stage version (train's
    # checkpoints), so re-running it resumes; removed once the artifact is complete
    work: Path | None = None
    # gets {"unit", "done", "total", ...} as the stage goes (flows.progress.StageProgress)
    progress: Callable[[dict], None] = lambda info: None  # noqa: E731
    # the stage's identity as its version has it (computed once per run); None: compute it
    identity: dict | None = None

    def __post_init__(self):
        self.local_out = self.local_out or self.out


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    sections: tuple[str, ...]               # config sections that change the output
    modules: tuple[str, ...]                # code whose change makes a new version
    build: Callable[[StageContext], dict]
    # facts outside the config that change the output (input files, Python, scorer)
    identity: Callable[[dict], dict] = field(default=lambda cfg: {})

    def config(self, cfg: Config) -> dict:
        """The settings of this stage that change its output (part of its version)."""
        return {s: versioned(cfg.section(s)) for s in self.sections}

    def code_modules(self) -> dict[str, str]:
        """A short hash of each module's code and of the build function's, so that a plan
        can name the module that changed."""
        hashes = {name: source_hash(module_source(name)) for name in self.modules}
        hashes[BUILD_FUNCTION] = source_hash(textwrap.dedent(inspect.getsource(self.build)))
        return dict(sorted(hashes.items()))

    def code_version(self) -> str:
        return code_version(self.code_modules())


BUILD_FUNCTION = "build function"  # its key in code_modules


def code_version(code_modules: dict[str, str]) -> str:
    """The stage's code version: one hash of its per-module hashes."""
    return _short_hash(json.dumps(code_modules, sort_keys=True))


@functools.lru_cache(maxsize=256)  # stages share modules; parsing is most of a plan's cost
def source_hash(source: str) -> str:
    return _short_hash(code_fingerprint(source))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def module_source(name: str) -> str:
    """A module's source, found without importing it (importing trainer modules costs torch)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ValueError(f"code version: module {name!r} has no Python source file")
    return Path(spec.origin).read_text()


_PARSE_TRIES = 5


def code_fingerprint(source: str) -> str:
    """What of Python source decides what it does: its syntax tree without docstrings.
    Comments, docstrings, blank lines and formatting are not in it, so editing them
    rebuilds nothing."""
    for attempt in range(_PARSE_TRIES):
        try:
            tree = ast.parse(source)
            break
        except SystemError:
            # CPython 3.11 counts AST-building depth per interpreter, not per thread
            # (python/cpython#106905): a parse in another thread at the same moment (Prefect
            # loading a flow, an import) fails this one with "AST constructor recursion
            # depth mismatch". Nothing is wrong with the source: parse it again.
            if attempt == _PARSE_TRIES - 1:
                raise
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def partitions(folder: Path) -> list[Path]:
    """A document stage's kept partitions (its dropped ones are in rejected/)."""
    return sorted((folder / "docs").glob("part-*.parquet"))


def _map_docs(ctx: StageContext, input_stage: str, step, **step_cfg) -> dict:
    parts = partitions(ctx.inputs[input_stage])
    results = map_partitions(ctx.cfg.dask, partial(process_partition, step), parts,
                             on_progress=ctx.progress, out_dir=ctx.out, **step_cfg)
    return merge_stats(results)


# -- source ------------------------------------------------------------------------

def source_identity(cfg: Config) -> dict:
    if cfg.source.kind == "pydoc":
        return {"python": sources.pydoc_info()}
    return {"input_files": sources.fingerprint(cfg.source.path)}


def build_source(ctx: StageContext) -> dict:
    src = ctx.cfg.source
    skipped: dict[str, str | int] = {}  # {module or file: reason} or {file: reason: count}
    if src.kind == "pydoc":
        docs = sources.pydoc_documents(limit=src.pydoc_limit or None, skipped=skipped)
    else:
        docs = sources.path_documents(src.path, skipped=skipped)
    stats = sources.write_partitions(docs, ctx.out / "docs", src.docs_per_partition)
    if not stats["docs"]:
        raise ValueError(f"source: no documents read from {src.kind} {src.path}")
    origin = {"python": sources.pydoc_info()} if src.kind == "pydoc" else \
        {"path": str(Path(src.path).resolve())}
    return {**stats, **origin, "skipped": skipped}


# -- document stages ---------------------------------------------------------------

def build_extract(ctx: StageContext) -> dict:
    return _map_docs(ctx, "source", extract)


def build_normalize(ctx: StageContext) -> dict:
    stats = _map_docs(ctx, "extract", normalize)
    changed, fixes = 0, {}
    for part in partitions(ctx.out):
        for row in read_docs(part, ["normalized_changed", "normalize_fixes"]):
            changed += bool(row["normalized_changed"])
            for fix in row["normalize_fixes"] or ():
                fixes[fix] = fixes.get(fix, 0) + 1
    return {**stats, "docs_changed": changed, "fixes": fixes}


def holdout_identity(cfg: Config) -> dict:
    h = cfg.holdout
    if h.kind == "path":
        return {"eval_files": sources.fingerprint(h.path)}
    return {"python": sources.pydoc_info()} if h.kind == "pydoc" else {}


def build_holdout(ctx: StageContext) -> dict:
    """The eval set into eval/, and the training candidates without it (and without
    copies of its texts) into docs/."""
    h, parts = ctx.cfg.holdout, partitions(ctx.inputs["normalize"])
    skipped: dict[str, int | str] = {}
    if h.kind == "split":
        # workers write the eval documents; only their ids and text hashes come back
        written = map_partitions(ctx.cfg.dask, partial(_write_split_eval, fraction=h.fraction), parts,
                                 out_dir=ctx.out)
        pairs = [key for part in written for key in part]
    else:
        pairs = _write_external_eval(h, ctx.out / "eval", ctx.cfg.source.docs_per_partition, skipped)
    if not pairs:
        where = (f"{h.fraction:.0%} of {sum(_rows(p) for p in parts)} documents" if h.kind == "split"
                 else f"holdout.kind = {h.kind!r}, skipped: {skipped}")
        raise ValueError(f"holdout: the eval set is empty ({where}); raise holdout.fraction "
                         "or give holdout.kind = 'path' with your own eval documents")
    eval_hashes: dict[str, str] = {}
    for id_, text_hash, _ in pairs:
        eval_hashes.setdefault(text_hash, id_)
    stats = _map_docs(ctx, "normalize", holdout.hold_out, eval_ids=frozenset(p[0] for p in pairs),
                      eval_hashes=eval_hashes)
    return {**stats, "eval": {"kind": h.kind, "docs": len(pairs), "bytes": sum(p[2] for p in pairs),
                              "skipped": skipped}}


def eval_partitions(folder: Path) -> list[Path]:
    """The holdout stage's eval documents."""
    return sorted((folder / "eval").glob("part-*.parquet"))


def _rows(part: Path) -> int:
    return open_partition(part).metadata.num_rows


def _eval_key(doc: dict) -> tuple[str, str, int]:
    """What the driver keeps of an eval document: id, text hash, UTF-8 bytes."""
    return doc["id"], dedup.text_hash(doc["text"]), len(doc["text"].encode("utf-8"))


def _write_split_eval(path: Path, out_dir: Path, fraction: float) -> list[tuple[str, str, int]]:
    docs = holdout.split_eval_docs(path, fraction)
    (out_dir / "eval").mkdir(parents=True, exist_ok=True)
    write_docs(docs, out_dir / "eval" / path.name)
    return [_eval_key(d) for d in docs]


def _write_external_eval(h, out: Path, per_partition: int, skipped: dict) -> list[tuple[str, str, int]]:
    pairs: list[tuple[str, str, int]] = []

    def tracked(docs):
        for doc in docs:
            pairs.append(_eval_key(doc))
            yield doc
    sources.write_partitions(tracked(holdout.external_eval_docs(h, skipped)), out, per_partition)
    return pairs


def filter_identity(cfg: Config) -> dict:
    """Which models will really run: `auto` and the bundled language model depend on
    what is installed here."""
    f = cfg.filter
    scorer = toxicity.load_scorer(f.toxicity, **f.scorer_args())
    lid = load_language_model(f.language_model)
    return {"scorer": None if scorer is None else {"name": scorer.name, "model": scorer.model},
            "language_model": lid.name if lid else None}


def build_filter(ctx: StageContext) -> dict:
    f = ctx.cfg.filter
    identity = filter_identity(ctx.cfg) if ctx.identity is None else ctx.identity  # loading scorers is slow
    scorer = identity["scorer"]
    note = ""
    if f.toxicity == "auto" and scorer and scorer["name"] != "detoxify":
        try:
            toxicity.load_scorer("detoxify", **f.scorer_args())
        except toxicity.ToxicityModelMissing as exc:
            note = f"auto fell back from detoxify: {exc}"
    # workers run the scorer the driver resolved, never their own `auto` choice
    stats = _map_docs(ctx, "holdout", filter_docs, config=f, quality=ctx.cfg.quality,
                      scorer_kind=scorer["name"] if scorer else "off")
    languages: dict[str, int] = {}
    for part in partitions(ctx.out):
        for row in read_docs(part, ["language"] if identity["language_model"] else ["id"]):
            lang = row.get("language") or "unidentified"
            languages[lang] = languages.get(lang, 0) + 1
    return {**stats, "toxicity_scorer": scorer["name"] if scorer else "off",
            "toxicity_model": scorer["model"] if scorer else None,
            "toxicity_threshold": f.toxicity_threshold, "toxicity_note": note,
            "language_model": identity["language_model"],
            "kept_languages": dict(sorted(languages.items(), key=lambda kv: -kv[1]))}


def build_dedup(ctx: StageContext) -> dict:
    d, dask_cfg = ctx.cfg.dedup, ctx.cfg.dask
    parts = partitions(ctx.inputs["filter"])
    hashes = map_partitions(dask_cfg, dedup.partition_hashes, parts, on_progress=ctx.progress)
    part_ids = [[id_ for id_, _ in part] for part in hashes]
    exact = dedup.exact_duplicates(pair for part in hashes for pair in part)
    near: dict[str, tuple[str, float]] = {}
    if d.near:
        near_cfg = asdict(d)
        signatures = map_partitions(dask_cfg, partial(dedup.partition_signatures, **near_cfg), parts,
                                    on_progress=ctx.progress)
        near = dedup.near_duplicate_map(signatures, **near_cfg)
    # a copy of a document that is itself a near duplicate points at the one kept
    exact = {id_: near[kept][0] if kept in near else kept for id_, kept in exact.items()}
    shares = zip(parts, dedup.split_by_partition(exact, part_ids),
                 dedup.split_by_partition(near, part_ids))
    return merge_stats(map_partitions(dask_cfg, _dedup_partition, list(shares),
                                      on_progress=ctx.progress, out_dir=ctx.out))


def _dedup_partition(item: tuple[Path, dict, dict], out_dir: Path) -> dict:
    path, exact, near = item
    return process_partition(dedup.drop_duplicates, path, out_dir,
                             exact=exact, near=near)


# -- tokenizer and shards ----------------------------------------------------------

def model_artifact(ref: str, artifacts: str | Path) -> dict:
    """A trained model and its tokenizer: `ref` is a train version (or unique prefix) in the
    store at `artifacts`, empty for the latest, or the path of a train artifact folder."""
    folder = Path(ref).expanduser()
    if ref and folder.is_dir():
        folder = folder.resolve()
        if folder.parent.name != "train":
            raise ValueError(f"{ref} is not a train artifact folder (artifacts/train/<version>)")
        store, version = ArtifactStore(folder.parent.parent), folder.name
    else:
        store = ArtifactStore(artifacts)
        version = store.resolve("train", ref or None)
    manifest = store.manifest("train", version)
    lineage = store.lineage("train", version)
    # the model's tokenizer comes with it: token ids mean nothing under another vocabulary
    tokenizer_version = dict(lineage)["tokenizer"]
    return {"version": version, "sha256": manifest["files"]["model.pt"]["sha256"],
            "manifest": manifest, "lineage": lineage,
            "model": store.local("train", version, ["model.pt"]) / "model.pt",
            "tokenizer_version": tokenizer_version,
            "tokenizer": store.local("tokenizer", tokenizer_version, ["tokenizer.json"]) / "tokenizer.json"}


def parent_model(cfg: Config) -> dict | None:
    """The model `train.init_from` names, to fine-tune on this run's corpus."""
    ref = cfg.train.init_from
    return model_artifact(ref, cfg.run.artifacts) if ref else None


def train_identity(cfg: Config) -> dict:
    """The device and dtype that will really run (they change the weights), and the parent."""
    from trainer import perf

    device = perf.resolve_device(cfg.train.device)
    dtype, _ = perf.resolve_dtype(device, cfg.train.dtype)
    parent = parent_model(cfg)
    return {"device": device.type, "dtype": dtype,
            **({"parent": {"version": parent["version"], "sha256": parent["sha256"]}} if parent else {})}


def tokenizer_identity(cfg: Config) -> dict:
    parent = parent_model(cfg)
    return {"parent_tokenizer": parent["tokenizer_version"]} if parent else {}


def build_tokenizer(ctx: StageContext) -> dict:
    parts = partitions(ctx.inputs["dedup"])
    val_fraction = ctx.cfg.split.val_fraction
    t = ctx.cfg.tokenizer
    parent = parent_model(ctx.cfg)
    if parent:
        tok = Tokenizer.from_file(str(parent["tokenizer"]))
        ctx.log(f"tokenizer: the parent model's ({parent['tokenizer_version']}), not trained")
    else:
        # trained on the train split only, so the held-out figure is honest
        train_texts = (text for id_, text in read_texts(parts) if not is_val(id_, val_fraction))
        tok = tokenizer.train_bpe(train_texts, vocab_size=t.vocab_size, min_frequency=t.min_frequency)
    tok.save(str(ctx.local_out / "tokenizer.json"))
    heldout = tokenizer.bytes_per_token(
        tok, (text for id_, text in read_texts(parts) if is_val(id_, val_fraction)))
    short = None
    if not parent and tok.get_vocab_size() < t.vocab_size:
        short = (f"the corpus gave {tok.get_vocab_size():,} of the {t.vocab_size:,} tokens asked for: "
                 f"no more pairs occur {t.min_frequency}+ times")
        ctx.log(f"tokenizer: {short}")
    return {"vocab_size": tok.get_vocab_size(), "vocab_size_note": short, "heldout": heldout,
            "parent_tokenizer": parent["tokenizer_version"] if parent else None}


def build_shard(ctx: StageContext) -> dict:
    tok = Tokenizer.from_file(str(ctx.inputs["tokenizer"] / "tokenizer.json"))
    splits = write_token_shards(
        read_texts(partitions(ctx.inputs["dedup"])), tok, ctx.local_out,
        shard_tokens=ctx.cfg.shard.shard_tokens, val_fraction=ctx.cfg.split.val_fraction)
    return {"vocab_size": tok.get_vocab_size(), **splits}


# -- model -------------------------------------------------------------------------

def build_train(ctx: StageContext) -> dict:
    from trainer.train import train

    shard_dir, val = ctx.inputs["shard"], ctx.manifests["shard"]["stats"]["val"]
    parent = parent_model(ctx.cfg)
    # Train in the work folder, which outlives a failed or killed run: re-running the
    # stage resumes from its newest checkpoint. Then move the results into the artifact.
    stats = train(sorted(shard_dir.glob("train_*.bin")), ctx.manifests["shard"]["stats"]["vocab_size"],
                  ctx.cfg.train, ctx.work, log=ctx.log,
                  val_shards=sorted(shard_dir.glob("val_*.bin")),
                  val_tokens_per_byte=val["tokens"] / val["bytes"],
                  init_from=parent["model"] if parent else None, resume=True,
                  on_progress=ctx.progress)
    for item in ctx.work.iterdir():
        item.rename(ctx.local_out / item.name)
    if parent:
        stats["parent"] = {"version": parent["version"], "path": str(parent["model"])}
    return stats


def build_evaluate(ctx: StageContext) -> dict:
    from trainer.board import write_evaluation
    from trainer.evaluate import evaluate, evaluate_checkpoints, heldout_curve, plot_curve

    e = ctx.cfg.evaluate
    val = sorted(ctx.inputs["shard"].glob("val_*.bin"))
    metrics = evaluate(ctx.inputs["train"] / "model.pt", val,
                       ctx.inputs["tokenizer"] / "tokenizer.json", e)
    # the same val windows for every kept checkpoint: the curve and the final figure agree;
    # model.pt, scored above, is the last checkpoint (or best.pt's copy after an early stop)
    final = metrics["checkpoint_step"]
    earlier = [p for p in sorted((ctx.inputs["train"] / "checkpoints").glob("step_*.pt"))
               if int(p.stem.removeprefix("step_")) != final]
    # a masked LM has no bits per byte (metrics["left_out"] says why): its curves are loss and accuracy
    curve = evaluate_checkpoints(earlier, val, metrics.get("tokens_per_byte"), e.batch_size, e.max_tokens or None)
    curve.append({"step": final, "tokens": metrics["tokens_evaluated"],
                  **{k: metrics[k] for k in ("loss", "perplexity", "accuracy", "top5_accuracy", "bits_per_byte")
                     if k in metrics}})
    # the eval set, in this run's tokens: bits per byte compare across tokenizers and filters
    tok_path = ctx.inputs["tokenizer"] / "tokenizer.json"
    held = write_document_tokens(read_texts(eval_partitions(ctx.inputs["holdout"])),
                                 Tokenizer.from_file(str(tok_path)), ctx.local_out, "eval")
    eval_curve = heldout_curve([*earlier, ctx.inputs["train"] / "model.pt"],
                               [ctx.local_out / name for name in held["shards"]], tok_path, e.batch_size)
    trained = ctx.manifests["train"]["stats"]
    for record in eval_curve:  # tokens seen in training by that checkpoint
        record["tokens_seen"] = record["step"] * trained["tokens_seen"] // max(trained["steps"], 1)
    metrics["eval"] = {**eval_curve[-1], "docs": held["docs"], "eval_set_bytes": held["bytes"],
                       "curve": eval_curve}
    # early stopping makes model.pt (appended last) an earlier step than the newest checkpoints
    curve.sort(key=lambda r: r["step"])
    eval_curve.sort(key=lambda r: r["step"])
    plot_curve(curve, ctx.local_out / "val_curve.png", metrics.get("compressors"), eval_curve)
    # the train loop generates no text: the samples go to TensorBoard from here
    write_evaluation(ctx.local_out, metrics)
    metrics["curve"] = curve
    (ctx.local_out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("source", (), ("source",), ("corpus.sources", "corpus.documents"), build_source,
          identity=source_identity),
    Stage("extract", ("source",), (), ("corpus.extract", "corpus.documents"), build_extract),
    Stage("normalize", ("extract",), (), ("corpus.normalize", "corpus.documents"),
          build_normalize),
    Stage("holdout", ("normalize",), ("holdout",), ("corpus.holdout", "corpus.documents"), build_holdout,
          identity=holdout_identity),
    Stage("filter", ("holdout",), ("filter", "quality"),
          ("corpus.filter", "corpus.quality", "corpus.language", "corpus.toxicity", "corpus.documents"),
          build_filter, identity=filter_identity),
    Stage("dedup", ("filter",), ("dedup",), ("corpus.dedup", "corpus.documents"), build_dedup),
    Stage("tokenizer", ("dedup",), ("tokenizer", "split"), ("corpus.tokenizer",), build_tokenizer,
          identity=tokenizer_identity),
    Stage("shard", ("dedup", "tokenizer"), ("shard", "split"), ("corpus.shard", "trainer.data"), build_shard),
    Stage("train", ("shard",), ("train",),
          ("trainer.model", "trainer.train", "trainer.data", "trainer.perf", "trainer.evaluate",
           "trainer.board", "trainer.masked", "trainer.lora"), build_train,
          identity=train_identity),
    Stage("evaluate", ("train", "shard", "tokenizer", "holdout"), ("evaluate",),
          ("trainer.evaluate", "trainer.generate", "trainer.model", "trainer.data", "trainer.board",
           "trainer.masked", "trainer.lora"),  # lora: adapter checkpoints are merged to be scored
          build_evaluate),
]}
ORDER = list(STAGES)
DOCUMENT_STAGES = ("extract", "normalize", "holdout", "filter", "dedup")
PARTITIONED = ("source", *DOCUMENT_STAGES)  # artifacts of Parquet partitions, read where they are


def select_stages(stages: list[str] | None = None, from_stage: str | None = None) -> list[str]:
    chosen = list(stages or ORDER)
    if from_stage:
        chosen = ORDER[ORDER.index(_known(from_stage)):]
    return [s for s in ORDER if s in {_known(s) for s in chosen}]


def _known(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(ORDER)}")
    return stage
