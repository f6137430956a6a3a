"""Markdown reports from stage manifests.

One renderer: a title, the stage's warnings (once, short), a headline section per stage
(HEADLINES), then the sections any stage's stats may carry (rejections, sizes, slow
documents, samples) and its config. report.md on disk links its plots by relative path;
`for_prefect` embeds them, since the Prefect UI shows a data URI but not a relative path.
Document text is escaped so that markdown shows it as it is.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

# -- markdown that shows text as it is ------------------------------------------------

_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~&])")  # inline markup; `|` splits table cells
# what would start a list, setext heading or numbered item at the start of a line
_BLOCK_START = re.compile(r"^([-+=]|\d{1,9}[.)](?=\s|$))")


def escape(text) -> str:
    """Text shown as it is, on one line, in running text or a table cell."""
    flat = " ".join(str(text).split())
    return _BLOCK_START.sub(lambda m: m.group(1)[:-1] + "\\" + m.group(1)[-1],
                            _SPECIAL.sub(r"\\\1", flat))


def _longest_backticks(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def code(text) -> str:
    """An inline code span that any backticks in the text cannot close (not in tables:
    a `|` there would still split the cell)."""
    flat = " ".join(str(text).split())
    ticks = "`" * (_longest_backticks(flat) + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") else ""
    return f"{ticks}{pad}{flat}{pad}{ticks}"


def fenced(text: str, info: str = "") -> list[str]:
    """A code block whose fence is longer than any backtick run inside it."""
    fence = "`" * max(3, _longest_backticks(text) + 1)
    return [fence + info, text, fence]


def _table(rows: list[tuple], header: tuple) -> list[str]:
    """Cells are escaped here; pass plain values."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60} min"


# -- headline: the few figures a reader looks for first, per stage ----------------------

def _documents(s: dict) -> list[str]:
    return [f"- documents: {s['docs_in']:,} in, **{s['docs_out']:,} kept**, {s['docs_rejected']:,} rejected",
            f"- bytes: {_mb(s['bytes_in'])} in, {_mb(s['bytes_out'])} out"]


def _source(s: dict) -> list[str]:
    lines = [f"- documents: {s['docs']:,} in {s['partitions']} partitions, {_mb(s['bytes'])}",
             f"- pydoc pages of Python {s['python']['python_version']}" if "python" in s
             else f"- read from {code(s['path'])}"]
    if s["skipped"]:
        shown = [f"{escape(name)} ({escape(why)})" for name, why in list(s["skipped"].items())[:5]]
        more = len(s["skipped"]) - len(shown)
        lines.append(f"- skipped {len(s['skipped']):,}: " + ", ".join(shown)
                     + (f", and {more:,} more (all in manifest.json)" if more else ""))
    return lines


def _normalize(s: dict) -> list[str]:
    fixes = ", ".join(f"{escape(k)} {v:,}" for k, v in s["fixes"].items()) or "none"
    return _documents(s) + [f"- documents changed by repair: {s['docs_changed']:,}; fixes: {fixes}"]


def _holdout(s: dict) -> list[str]:
    e = s["eval"]
    skipped = ", ".join(f"{escape(str(k))} {v}" for k, v in e["skipped"].items())
    return [f"- **eval set ({e['kind']}): {e['docs']:,} documents, {_mb(e['bytes'])}**"
            + (f"; not usable: {skipped}" if skipped else ""),
            *_documents(s)]


def _filter(s: dict) -> list[str]:
    langs = ", ".join(f"{escape(k)} {v:,}" for k, v in list(s["kept_languages"].items())[:8])
    return [f"- **toxicity scorer: {s['toxicity_scorer']}** ({escape(s['toxicity_model'] or 'no model')}), "
            f"threshold {s['toxicity_threshold']}",
            *_documents(s),
            f"- language identification: {escape(s['language_model'] or 'off (no model)')}; "
            f"kept by language: {langs or 'none'}"]


def _tokenizer(s: dict) -> list[str]:
    h = s["heldout"]
    lines = [f"- vocab size: {s['vocab_size']:,}",
             f"- held-out: {h['docs']:,} docs, {h['bytes_per_token']} bytes per token"]
    if s.get("parent_tokenizer"):
        lines.append(f"- the parent model's tokenizer ({s['parent_tokenizer']}), not trained")
    return lines


def _shard(s: dict) -> list[str]:
    return [f"- {split}: {s[split]['docs']:,} docs, {s[split]['tokens']:,} tokens, "
            f"{len(s[split]['shards'])} shards" for split in ("train", "val")]


def _loss(s: dict) -> str:
    """What a train run's losses are over: a masked LM's only over its masked tokens."""
    return "masked-token loss" if s.get("objective") == "masked" else "loss"


def _train(s: dict) -> list[str]:
    loss = _loss(s)
    lines = [f"- {s['steps']:,} steps, {s['tokens_seen']:,} tokens, {s['n_params']:,} parameters; "
             f"train {loss} {s['initial_loss']:.4f} -> {s['final_loss']:.4f}"]
    if s.get("val_loss") is not None:
        at = f" at step {s['best_step']:,}" if s.get("best_step") else ""
        lines.append(f"- val {loss} {s['val_loss']:.4f} at the end, best {s['best_val_loss']:.4f}{at} (best.pt)")
    if s.get("early_stop"):
        lines.append(_ended(s))
    if s.get("dtype"):
        lines.append(f"- dtype {s['dtype']}: {escape(s['dtype_reason'])}")
    mfu = (f"MFU {s['mfu']:.1%} of {escape(s['peak_flops_source'])}" if s.get("mfu") is not None
           else f"{s.get('mfu_note') or 'MFU not measured'} ({escape(s['peak_flops_source'])})")
    compiling = f", of which {s['compile_seconds']:.0f} s compiling" if s.get("compile_seconds") else ""
    lines.append(f"- {s['tokens_per_s']:,.0f} tokens/s, {mfu}; {s['seconds']:.0f} s{compiling}")
    if s.get("parent"):
        lines.append(f"- fine-tuned from train/{s['parent']['version']}")
    if s.get("lora"):
        lora = s["lora"]
        lines.append(f"- LoRA rank {lora['rank']} (alpha {lora['alpha']:g}, dropout {lora['dropout']:g}) "
                     f"on {', '.join(lora['targets'])}: {lora['trainable_params']:,} parameters trained "
                     f"({lora['trainable_share']:.2%}); checkpoints hold the adapters, model.pt the "
                     f"merged model")
    if s.get("resumed_from"):
        lines.append(f"- resumed from {escape(Path(s['resumed_from']).name)} of an interrupted run")
    return lines + ["", "![loss](loss.png)"]


def _ended(s: dict) -> str:
    stop, loss = s["early_stop"], _loss(s)
    rule = (f"{stop['patience']} val checks in a row without beating the best val {loss} by more "
            f"than {stop['min_delta']:g}")
    if s.get("ended") == "early_stop":
        return (f"- **stopped early** at step {s['steps']:,} after {rule}; model.pt is best.pt "
                f"(step {s['best_step']:,}, val {loss} {s['best_val_loss']:.4f})")
    return f"- ran to max_steps: early stopping ({rule}) did not fire"


def _evaluate_masked(s: dict) -> list[str]:
    """A masked LM's figures: masked-token loss and accuracy (fixed masks, trainer.masked)."""
    held = s.get("eval")
    lines = [f"- **masked LM: masked-token accuracy {s['accuracy']:.3f} on val**"
             + (f", **{held['accuracy']:.3f} on the eval set** ({held['docs']:,} documents held out "
                f"before filtering, {held['tokens']:,} masked tokens)" if held else ""),
             f"- val: masked-token loss {s['loss']:.4f} nats (unigram entropy {s['unigram_entropy']:.4f}, "
             f"beats unigram: **{s['beats_unigram']}**), top-5 accuracy {s['top5_accuracy']:.3f}, over "
             f"{s['tokens_evaluated']:,} masked of {s['window_tokens']:,} val tokens",
             f"- {escape(s['left_out'])}"]
    eval_rows = {r["step"]: r for r in (held or {}).get("curve", [])}
    if s.get("curve"):
        lines += ["", "Per checkpoint, masked tokens of the same val windows (and of the eval set):", ""]
        lines += _table([(r["step"], f"{r['loss']:.4f}", f"{r['accuracy']:.3f}", f"{r['top5_accuracy']:.3f}",
                          *((f"{eval_rows[r['step']]['loss']:.4f}", f"{eval_rows[r['step']]['accuracy']:.3f}")
                            if r["step"] in eval_rows else ("", "")))
                         for r in s["curve"]],
                        ("step", "val loss", "val accuracy", "val top-5", "eval loss", "eval accuracy"))
        lines += ["", "![val curve](val_curve.png)"]
    return lines


def _evaluate(s: dict) -> list[str]:
    if s.get("objective") == "masked":
        return _evaluate_masked(s)
    rows = [("model", f"{s['loss']:.4f}", f"{s['bits_per_byte']:.4f}"),
            ("unigram (val tokens' own entropy)", f"{s['unigram_entropy']:.4f}",
             f"{s['unigram_bits_per_byte']:.4f}")]
    rows += [(name, "", f"{bpb:.4f}") for name, bpb in s["compressors"].items()]
    lines = [*_table(rows, ("validation", "loss (nats/token)", "bits per byte")), "",
             f"- over {s['tokens_evaluated']:,} val tokens ({_mb(s['bytes_evaluated'])} of text): "
             f"perplexity {s['perplexity']:.2f}, next-token accuracy top-1 {s['accuracy']:.3f}, "
             f"top-5 {s['top5_accuracy']:.3f}",
             f"- beats unigram: **{s['beats_unigram']}**; beats compressors: "
             f"**{escape(', '.join(s['beats_compressors']) or 'none')}**"]
    held = s.get("eval")
    if held:
        lines.insert(0, f"- **eval set: {held['bits_per_byte']:.4f} bits per byte** (loss {held['loss']:.4f}) "
                        f"over {held['docs']:,} documents held out before filtering, {_mb(held['bytes'])} "
                        "scored: the figure to compare across data variants and tokenizers")
    eval_bpb = {r["step"]: f"{r['bits_per_byte']:.4f}" for r in (held or {}).get("curve", [])}
    if s.get("curve"):
        lines += ["", "Per checkpoint, on the same val tokens (and the eval set):", ""]
        lines += _table([(r["step"], f"{r['loss']:.4f}", f"{r['bits_per_byte']:.4f}",
                          eval_bpb.get(r["step"], ""), f"{r['accuracy']:.3f}", f"{r['top5_accuracy']:.3f}")
                         for r in s["curve"]],
                        ("step", "val loss", "val bits per byte", "eval bits per byte", "top-1", "top-5"))
        lines += ["", "![val curve](val_curve.png)"]
    return lines


HEADLINES = {"source": _source, "extract": _documents, "normalize": _normalize, "holdout": _holdout,
             "filter": _filter,
             "dedup": _documents, "tokenizer": _tokenizer, "shard": _shard, "train": _train,
             "evaluate": _evaluate}


def headline(manifest: dict) -> list[str]:
    """The few figures a reader looks for first, for this manifest's stage."""
    return HEADLINES.get(manifest["stage"], lambda s: [])(manifest["stats"])


# -- warnings: one short line each, at the top ------------------------------------------

def _first_sentence(text: str) -> str:
    return re.split(r"\.\s|\n", text.strip(), maxsplit=1)[0].rstrip(".")


def _filter_warnings(s: dict) -> list[str]:
    note = s.get("toxicity_note")
    if not note:
        return []
    why = _first_sentence(note.removeprefix("auto fell back from detoxify: "))
    fix = "; `c2m fetch-detoxify` fetches it" if "c2m fetch-detoxify" in note else ""
    return [f"toxicity: {escape(s['toxicity_scorer'])} stood in for detoxify ({escape(why)}){fix}"]


def _tokenizer_warnings(s: dict) -> list[str]:
    return [f"tokenizer: {escape(s['vocab_size_note'])}"] if s.get("vocab_size_note") else []


WARNINGS = {"filter": _filter_warnings, "tokenizer": _tokenizer_warnings}


def warnings(manifest: dict) -> list[str]:
    return WARNINGS.get(manifest["stage"], lambda s: [])(manifest["stats"])


# -- sections any stage's stats may carry ----------------------------------------------

def _rejected(s: dict, out_dir: Path) -> list[str]:
    if not s.get("rejected_by_reason"):
        return []
    lines = ["## Rejected by reason", "",
             *_table(list(s["rejected_by_reason"].items()), ("reason", "documents")),
             "", "## Examples of rejected documents", ""]
    for reason, examples in s["rejected_examples"].items():
        lines.append(f"### {escape(reason)}")
        for ex in examples:
            extra = {k: v for k, v in ex.items() if k not in ("id", "source", "text")}
            lines.append(f"- {code(ex['source'])}" + (f" {code(json.dumps(extra))}" if extra else "")
                         + f": {escape(ex['text'])}")
        lines.append("")
    return lines


def _sizes(s: dict, out_dir: Path) -> list[str]:
    if not s.get("size_hist"):
        return []
    _plot_sizes(s["size_hist"], out_dir / "sizes.png")
    rows = [(f"{2 ** (int(b) - 1):,}-{2 ** int(b) - 1:,}", n_in, n_out)
            for b, (n_in, n_out) in s["size_hist"].items()]
    return ["## Documents by size (UTF-8 bytes; raw HTML before extraction)", "",
            *_table(rows, ("bytes", "in", "kept")), "", "![sizes](sizes.png)", ""]


def _slowest(s: dict, out_dir: Path) -> list[str]:
    if not s.get("slowest_docs"):
        return []
    rows = [(d["source"], d["id"], f"{d['seconds']:.3f}") for d in s["slowest_docs"]]
    return ["## Slowest documents", "", *_table(rows, ("source", "id", "seconds")), ""]


def _samples(s: dict, out_dir: Path) -> list[str]:
    lines = ["## Samples", ""] if s.get("samples") else []
    for sample in s.get("samples") or ():
        if "masked" in sample:  # a masked LM's fill-mask example (trainer.masked)
            lines += [f"{sample['correct']} of {sample['masked']} masked tokens guessed right:", "",
                      *fenced(sample["prompt"]), "", "the model's guesses:", "", *fenced(sample["text"]), "",
                      "the original:", "", *fenced(sample["answer"]), ""]
            continue
        lines += [f"prompt {code(repr(sample['prompt']))}:", "", *fenced(sample["text"]), ""]
    return lines


DETAILS = (_rejected, _sizes, _slowest, _samples)


def render(manifest: dict, out_dir: Path) -> str:
    """report.md for a stage; writes the plots it links (sizes.png) into out_dir."""
    lines = [f"# {manifest['stage']} {manifest['version']}", ""]
    notes = warnings(manifest)
    if notes:
        lines += ["> **warnings**", ">", *(f"> - {note}" for note in notes), ""]
    lines += headline(manifest)
    inputs = ", ".join(f"{i['stage']}/{i['version']}" for i in manifest["inputs"].values()) or "none"
    lines += ["", f"- inputs: {inputs}", f"- duration: {duration(manifest['duration_s'])}",
              f"- code version: {manifest['code_version']}", ""]
    for section in DETAILS:
        lines += section(manifest["stats"], out_dir)
    lines += ["## Config", "", *fenced(json.dumps(manifest["config"], indent=2), "json"), ""]
    return "\n".join(lines)


def _plot_sizes(hist: dict, path: Path) -> None:
    # The object API with an Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = range(len(hist))
    ax.bar([i - 0.2 for i in x], [v[0] for v in hist.values()], width=0.4, label="in")
    ax.bar([i + 0.2 for i in x], [v[1] for v in hist.values()], width=0.4, label="kept")
    ax.set_xticks(list(x), [f"<{2 ** int(b):,}" for b in hist], rotation=60, fontsize=7)
    ax.set_xlabel("UTF-8 bytes")
    ax.set_ylabel("documents")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)


# -- for the Prefect UI -----------------------------------------------------------------

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _embed(match: re.Match, folder: Path) -> str:
    alt, target = match.groups()
    if re.match(r"^[a-z][a-z0-9+.-]*:|^/", target, re.I):  # a URL or data URI already
        return match.group(0)
    path = folder / target
    if not path.is_file():
        return f"*({escape(alt or target)}: {escape(target)} not found)*"
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"![{alt}](data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()})"


def for_prefect(markdown: str, folder: Path) -> str:
    """The same markdown with each local image embedded as a data URI (the Prefect UI shows
    no relative image path); a missing image becomes a short note. Code blocks are left as
    they are."""
    out, fence = [], None
    for line in markdown.split("\n"):
        opened = _FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
        elif fence is not None and opened and opened.group(1)[0] == fence[0] \
                and len(opened.group(1)) >= len(fence) and not line.strip().strip(fence[0]):
            fence = None
        elif fence is None:
            line = _IMAGE.sub(lambda m: _embed(m, folder), line)
        out.append(line)
    return "\n".join(out)


# -- key figures, cache hits, the run summary -------------------------------------------

def _kept(s: dict) -> str:
    return f"{s['docs_out']:,} of {s['docs_in']:,} docs kept"


KEY_FIGURES = {
    "source": lambda s: f"{s['docs']:,} docs, {_mb(s['bytes'])}",
    "extract": _kept, "normalize": _kept, "filter": _kept, "dedup": _kept,
    "holdout": lambda s: f"eval set {s['eval']['docs']:,} docs, {_mb(s['eval']['bytes'])}; {_kept(s)}",
    "tokenizer": lambda s: f"vocab {s['vocab_size']:,}, {s['heldout']['bytes_per_token']:.2f} bytes/token",
    "shard": lambda s: f"{s['train']['tokens']:,} train + {s['val']['tokens']:,} val tokens",
    "train": lambda s: f"{s['steps']:,} steps" + (" (early stop)" if s.get("ended") == "early_stop" else "")
                       + f", {s['tokens_per_s']:,.0f} tokens/s",
    "evaluate": lambda s: f"{s['bits_per_byte']:.3f} val bits/byte"
                          + (f", eval {s['eval']['bits_per_byte']:.3f}" if s.get("eval") else "")
    if s.get("objective") != "masked" else f"masked-token accuracy {s['accuracy']:.3f} val"
                          + (f", eval {s['eval']['accuracy']:.3f}" if s.get("eval") else ""),
}


def key_figure(manifest: dict) -> str:
    """The one figure that says what a stage did, for tables and cache-hit notes."""
    figure = KEY_FIGURES.get(manifest["stage"])
    return figure(manifest["stats"]) if figure else ""


def cache_hit(manifest: dict, run_name: str | None, folder: Path, got: str = "cached") -> str:
    """A short report for a stage this run used without building it: found in the store
    ("cached") or given by `--pin` ("pinned"); `folder` is the version's artifact folder."""
    stage, version = manifest["stage"], manifest["version"]
    builder = (manifest.get("built_by") or {}).get("flow_run_name")
    user = f"Run {escape(run_name)}" if run_name else "This run"
    when = str(manifest.get("finished", "")).replace("T", " ")[:16]
    built = (f"- built by run {escape(builder)}" if builder else "- built") \
        + (f" on {when} UTC" if when else "") + f", in {duration(manifest['duration_s'])}"
    return "\n".join([
        f"# {stage} {version}: {'pinned' if got == 'pinned' else 'cache hit'}", "",
        f"{user} used {stage}/{version} as stored, without building it"
        + (" (pinned)." if got == "pinned" else "."), "",
        built,
        f"- {escape(key_figure(manifest))}",
        f"- full report: below, and in {code(folder / 'report.md')}", ""])


def summary(rows: list[dict]) -> str:
    """The run's table of stages: rows of stage, version, status (built, cached, pinned),
    duration_s, key (from key_figure), link (the stage report's URL, or None) and why
    (what the plan said made a built stage build)."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    tally = ", ".join(f"{n} {status}" for status, n in counts.items())
    lines = [f"{len(rows)} stages: {tally}", "",
             "| stage | version | status | duration | key figure | report | why |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        link = f"[report]({row['link']})" if row.get("link") else ""
        cells = [escape(row["stage"]), escape(row["version"]), escape(row["status"]),
                 duration(row.get("duration_s")), escape(row.get("key") or "")]
        lines.append("| " + " | ".join(cells + [link, escape(row.get("why") or "")]) + " |")
    return "\n".join(lines) + "\n"
