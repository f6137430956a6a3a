"""report.md (and a length-histogram PNG) for a stage, from its manifest."""
from __future__ import annotations

import json
from pathlib import Path


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def _table(rows: list[tuple], header: tuple) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def headline(manifest: dict) -> list[str]:
    """The few figures a reader looks for first, per stage."""
    s, stage = manifest["stats"], manifest["stage"]
    if "docs_in" in s:
        lines = [f"- documents: {s['docs_in']:,} in, **{s['docs_out']:,} kept**, "
                 f"{s['docs_rejected']:,} rejected",
                 f"- bytes: {_mb(s['bytes_in'])} in, {_mb(s['bytes_out'])} out"]
        if stage == "normalize":
            lines.append(f"- documents changed by repair: {s['docs_changed']:,}; fixes: "
                         + (", ".join(f"{k} {v}" for k, v in s["fixes"].items()) or "none"))
        if stage == "filter":
            lines.insert(0, f"- **toxicity scorer: {s['toxicity_scorer']}** "
                            f"({s['toxicity_model'] or 'no model'}), threshold {s['toxicity_threshold']}")
            if s["toxicity_note"]:
                lines.insert(1, f"- note: {s['toxicity_note']}")
            langs = ", ".join(f"{k} {v}" for k, v in list(s["kept_languages"].items())[:8])
            lines.append(f"- language identification: {s['language_model'] or 'off (no model)'}; "
                         f"kept by language: {langs or 'none'}")
        return lines
    if stage == "source":
        lines = [f"- documents: {s['docs']:,} in {s['partitions']} partitions, {_mb(s['bytes'])}"]
        if "python" in s:
            lines.append(f"- pydoc pages of Python {s['python']['python_version']}")
        else:
            lines.append(f"- read from {s['path']}")
        if s["skipped"]:
            lines.append("- skipped: " + ", ".join(
                f"{k} ({v})" for k, v in list(s["skipped"].items())[:10])
                + (f", and {len(s['skipped']) - 10} more" if len(s["skipped"]) > 10 else ""))
        return lines
    if stage == "tokenizer":
        h = s["heldout"]
        return [f"- vocab size: {s['vocab_size']:,}" + (f" ({s['vocab_size_note']})" if s.get("vocab_size_note") else ""),
                f"- held-out: {h['docs']:,} docs, {h['bytes_per_token']} bytes per token"]
    if stage == "shard":
        return [f"- {split}: {s[split]['docs']:,} docs, {s[split]['tokens']:,} tokens, "
                f"{len(s[split]['shards'])} shards" for split in ("train", "val")]
    if stage == "train":
        lines = [f"- {s['steps']:,} steps, {s['tokens_seen']:,} tokens, {s['n_params']:,} parameters; "
                 f"train loss {s['initial_loss']:.4f} -> {s['final_loss']:.4f}"]
        if s.get("val_loss") is not None:
            lines.append(f"- val loss {s['val_loss']:.4f} at the end, best {s['best_val_loss']:.4f} (best.pt)")
        if s.get("dtype"):
            lines.append(f"- dtype {s['dtype']}: {s['dtype_reason']}")
        mfu = (f"MFU {s['mfu']:.1%} of {s['peak_flops_source']}" if s.get("mfu") is not None
               else f"{s.get('mfu_note') or 'MFU not measured'} ({s['peak_flops_source']})")
        lines.append(f"- {s['tokens_per_s']:,.0f} tokens/s, {mfu}; "
                     f"{s['seconds']:.0f} s" + (f", of which {s['compile_seconds']:.0f} s compiling"
                                               if s.get("compile_seconds") else ""))
        if s.get("parent"):
            lines.append(f"- fine-tuned from train/{s['parent']['version']}")
        if s.get("resumed_from"):
            lines.append(f"- resumed from {Path(s['resumed_from']).name} of an interrupted run")
        return lines + ["", "![loss](loss.png)"]
    if stage == "evaluate":
        rows = [("model", f"{s['loss']:.4f}", f"{s['bits_per_byte']:.4f}"),
                ("unigram (val tokens' own entropy)", f"{s['unigram_entropy']:.4f}",
                 f"{s['unigram_bits_per_byte']:.4f}")]
        rows += [(name, "", f"{bpb:.4f}") for name, bpb in s["compressors"].items()]
        lines = [*_table(rows, ("validation", "loss (nats/token)", "bits per byte")), "",
                 f"- over {s['tokens_evaluated']:,} val tokens ({_mb(s['bytes_evaluated'])} of text): "
                 f"perplexity {s['perplexity']:.2f}, next-token accuracy top-1 {s['accuracy']:.3f}, "
                 f"top-5 {s['top5_accuracy']:.3f}",
                 f"- beats unigram: **{s['beats_unigram']}**; beats compressors: "
                 f"**{', '.join(s['beats_compressors']) or 'none'}**"]
        if s.get("curve"):
            lines += ["", "Per checkpoint, on the same val tokens:", ""]
            lines += _table([(r["step"], f"{r['loss']:.4f}", f"{r['bits_per_byte']:.4f}",
                              f"{r['accuracy']:.3f}", f"{r['top5_accuracy']:.3f}") for r in s["curve"]],
                            ("step", "loss", "bits per byte", "top-1", "top-5"))
            lines += ["", "![val curve](val_curve.png)"]
        return lines
    return []


def render(manifest: dict, out_dir: Path) -> str:
    s = manifest["stats"]
    lines = [f"# {manifest['stage']} {manifest['version']}", ""]
    lines += headline(manifest)
    inputs = ", ".join(f"{i['stage']}/{i['version']}" for i in manifest["inputs"].values()) or "none"
    lines += ["", f"- inputs: {inputs}", f"- duration: {manifest['duration_s']:.1f} s",
              f"- code version: {manifest['code_version']}", ""]
    if s.get("rejected_by_reason"):
        lines += ["## Rejected by reason", ""]
        lines += _table(list(s["rejected_by_reason"].items()), ("reason", "documents"))
        lines += ["", "## Examples of rejected documents", ""]
        for reason, examples in s["rejected_examples"].items():
            lines.append(f"### {reason}")
            for ex in examples:
                extra = {k: v for k, v in ex.items() if k not in ("id", "source", "text")}
                text = ex["text"].replace("\n", " ")
                lines.append(f"- `{ex['source']}` {json.dumps(extra) if extra else ''}: {text}")
            lines.append("")
    if s.get("size_hist"):
        lines += ["## Documents by size (UTF-8 bytes; raw HTML before extraction)", ""]
        lines += _table([(f"{2 ** (int(b) - 1):,}-{2 ** int(b) - 1:,}", n_in, n_out)
                         for b, (n_in, n_out) in s["size_hist"].items()], ("bytes", "in", "kept"))
        _plot_sizes(s["size_hist"], out_dir / "sizes.png", manifest["stage"])
        lines += ["", "![sizes](sizes.png)", ""]
    if s.get("slowest_docs"):
        lines += ["## Slowest documents", ""]
        lines += _table([(f"`{d['source']}`", d["id"], f"{d['seconds']:.3f}") for d in s["slowest_docs"]],
                        ("source", "id", "seconds"))
        lines += [""]
    if manifest["stage"] == "evaluate" and s.get("samples"):
        lines += ["## Samples", ""]
        for sample in s["samples"]:
            lines += [f"prompt {sample['prompt']!r}:", "", "```", sample["text"], "```", ""]
    lines += ["## Config", "", "```json", json.dumps(manifest["config"], indent=2), "```", ""]
    return "\n".join(lines)


def _plot_sizes(hist: dict, path: Path, stage: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"<{2 ** int(b):,}" for b in hist]
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(6.5, 3))
    ax.bar([i - 0.2 for i in x], [v[0] for v in hist.values()], width=0.4, label="in")
    ax.bar([i + 0.2 for i in x], [v[1] for v in hist.values()], width=0.4, label="kept")
    ax.set_xticks(list(x), labels, rotation=60, fontsize=7)
    ax.set_xlabel("UTF-8 bytes")
    ax.set_ylabel("documents")
    ax.set_title(f"{stage}: documents by size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
