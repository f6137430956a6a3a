"""Evaluate a checkpoint on held-out shards: loss, accuracy, bits per byte, compressor anchors, samples.

The validation set is fixed and deterministic: the non-overlapping windows of
`Shards.sequential_windows(block_size, max_tokens)`, in order. Every figure here is
over the target tokens of those windows, and "the val bytes" are exactly the UTF-8
bytes those target tokens decode to, end-of-text separators excluded (they mark
document boundaries and stand for no text; the shard stage counts bytes the same way).

Bits per byte makes a model comparable with models on other tokenizers and with
general-purpose compressors: the model's total loss in bits over the val targets,
divided by the val bytes. The anchors are gzip -9, bzip2 -9, xz -9 and zstd -19 run
over the very same bytes.
"""
from __future__ import annotations

import bz2
import json
import lzma
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from operator import methodcaller
from pathlib import Path
from typing import ClassVar, Iterable

import numpy as np
import torch
import torch.nn.functional as F
import zstandard
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from tokenizers import Tokenizer

from trainer.data import Shards
from trainer.generate import generate_texts
from trainer.masked import fill_mask_examples, val_batch_logits
from trainer.model import load_model

# name -> a fresh streaming compressor (.compress(chunk), .flush()) at the CLI's setting
@dataclass(config=ConfigDict(strict=True, extra="forbid", validate_assignment=True))
class EvaluateConfig:
    """The final model on a fixed val set, the curve over kept checkpoints, samples."""
    batch_size: int = Field(16, ge=1, le=4096, description="val windows per forward pass")
    max_tokens: int = Field(2_000_000, ge=0, description=(
        "the first N val tokens (0 = all); the compressor anchors see the same bytes"))
    samples: int = Field(3, ge=0, le=100, description="samples generated per prompt")
    sample_tokens: int = Field(80, ge=1, le=4096, description="tokens per sample")
    temperature: float = Field(0.8, ge=0, description="0 = greedy")
    top_k: int = Field(50, ge=0, description="keep the k likeliest tokens; 0 = off")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling; 1 = off")
    seed: int = Field(1234, ge=0)

    UNVERSIONED: ClassVar[tuple[str, ...]] = ("batch_size",)


COMPRESSORS = {
    "gzip -9": lambda: zlib.compressobj(9, zlib.DEFLATED, 31),  # wbits 31: gzip container
    "bzip2 -9": lambda: bz2.BZ2Compressor(9),
    "xz -9": lambda: lzma.LZMACompressor(preset=9),
    "zstd -19": lambda: zstandard.ZstdCompressor(level=19).compressobj(),
}
COMPRESS_CHUNK_BYTES = 1 << 22  # bytes handed to the compressors at a time: bounds memory


def bits_per_byte(loss_nats: float, tokens_per_byte: float) -> float:
    """Convert mean nats per token to bits per byte of the text those tokens encode
    (tokens_per_byte: the tokens over the UTF-8 bytes they decode to)."""
    if not tokens_per_byte > 0:
        raise ValueError(f"tokens per byte must be positive, got {tokens_per_byte}")
    return loss_nats / math.log(2) * tokens_per_byte


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the distribution given by token counts."""
    total = counts.sum()
    if total <= 0:
        raise ValueError("no tokens to take a unigram entropy of")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


@torch.no_grad()
def val_metrics(model: torch.nn.Module, shards: Shards, batch_size: int,
                max_tokens: int | None = None) -> dict:
    """Loss (mean nats/token), perplexity, top-1 and top-5 accuracy over the fixed val windows.

    `tokens` is the number of targets evaluated. Works on a model on any device and under
    the caller's autocast; the model is put in eval mode and given back in the mode it
    was in, so the train loop can call this between steps. An encoder (masked LM) gets
    the same figures over the masked tokens of those windows, each masked with its fixed
    masks (trainer.masked.val_batch_logits).
    """
    block_size = model.config.block_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # summed on the device and read once at the end: no host sync per batch
        total_loss = torch.zeros((), dtype=torch.float64, device=device)
        correct1 = torch.zeros((), dtype=torch.int64, device=device)
        correct5 = torch.zeros((), dtype=torch.int64, device=device)
        n = seen = 0
        windows = shards.sequential_windows(block_size, max_tokens)
        while batch := [w for _, w in zip(range(batch_size), windows)]:
            x = torch.stack([w[0] for w in batch])
            if model.config.causal:
                logits, _ = model(x.to(device, non_blocking=True))
                y = torch.stack([w[1] for w in batch]).to(device, non_blocking=True).view(-1)
            else:
                logits, y = val_batch_logits(model, x, seen)
            seen += len(batch)
            # cross-entropy in float32 whatever the autocast dtype; summed in float64 so a
            # long eval does not lose the small terms
            logits = logits.float().view(-1, logits.size(-1))
            total_loss += F.cross_entropy(logits, y, reduction="none").double().sum()
            # top-1 is the first of the top-5, so ties can never make top-5 < top-1
            top5 = logits.topk(min(5, logits.size(-1)), dim=-1).indices
            hit = top5 == y.unsqueeze(-1)
            correct1 += hit[:, 0].sum()
            correct5 += hit.any(dim=-1).sum()
            n += y.numel()
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError(
            f"no val shard holds a window of block_size+1 = {block_size + 1} tokens"
            + (f" within max_tokens={max_tokens}" if max_tokens is not None else "")
            + f" (val shards: {', '.join(str(p) for p in shards.paths)}); "
            "use more val data, a larger max_tokens or a smaller block_size")
    loss = total_loss.item() / n
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
        "accuracy": correct1.item() / n,
        "top5_accuracy": correct5.item() / n,
        "tokens": n,
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE spells its tokens in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def token_bytes(tokenizer: Tokenizer, tokenizer_path: Path | str = "the tokenizer") -> list[bytes]:
    """The raw bytes each token id stands for; special tokens (<|endoftext|>) stand for none.

    Read from the vocabulary rather than `tokenizer.decode`, which would turn a UTF-8
    character split across two evaluated windows into replacement characters.
    """
    spec = json.loads(tokenizer.to_str())
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{tokenizer_path} is not a byte-level BPE tokenizer; bits per byte needs "
                         "one (train it with the tokenizer stage)")
    char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    added = tokenizer.get_added_tokens_decoder()
    table = [b""] * tokenizer.get_vocab_size()
    for text, id_ in tokenizer.get_vocab(with_added_tokens=True).items():
        if id_ in added:
            table[id_] = b"" if added[id_].special else text.encode("utf-8")
            continue
        try:
            table[id_] = bytes(char_to_byte[c] for c in text)
        except KeyError:
            raise ValueError(f"{tokenizer_path}: token {id_} ({text!r}) is not spelled in the "
                             "byte-level alphabet; retrain the tokenizer") from None
    return table


def val_byte_chunks(shards: Shards, block_size: int, max_tokens: int | None,
                    table: list[bytes]) -> Iterable[tuple[bytes, np.ndarray]]:
    """The val bytes in chunks, each with the target tokens it decodes from.

    The same windows `val_metrics` evaluates, so the bytes are exactly what the model
    was scored on (a window's first target follows its last input; consecutive windows'
    targets are contiguous).
    """
    chunk: list[bytes] = []
    ids: list[np.ndarray] = []
    size = 0
    for _, y in shards.sequential_windows(block_size, max_tokens):
        y = y.numpy()
        piece = b"".join(table[t] for t in y.tolist())
        chunk.append(piece)
        ids.append(y)
        size += len(piece)
        if size >= COMPRESS_CHUNK_BYTES:
            yield b"".join(chunk), np.concatenate(ids)
            chunk, ids, size = [], [], 0
    if ids:
        yield b"".join(chunk), np.concatenate(ids)


def compressor_sizes(chunks: Iterable[bytes]) -> tuple[int, dict[str, int]]:
    """Stream `chunks` through every compressor in COMPRESSORS: (input bytes, {name: output bytes}).

    Each compressor sees the whole stream as one input, as its command-line tool would,
    but only a chunk is held at a time. The four run in threads (all release the GIL).
    """
    compressors = {name: make() for name, make in COMPRESSORS.items()}
    sizes = dict.fromkeys(compressors, 0)
    n_bytes = 0
    with ThreadPoolExecutor(len(compressors)) as pool:
        def feed(call: methodcaller) -> None:
            for name, out in zip(compressors, pool.map(call, compressors.values())):
                sizes[name] += len(out)
        for chunk in chunks:
            n_bytes += len(chunk)
            feed(methodcaller("compress", chunk))
        feed(methodcaller("flush"))
    return n_bytes, sizes


def evaluate(checkpoint: Path, val_shards: list[Path], tokenizer_path: Path,
             cfg: EvaluateConfig | None = None, *, prompts=("",), device: str = "cpu") -> dict:
    """Metrics of a checkpoint on the val shards, as a JSON-serialisable dict.

    Everything is over the same val targets (see the module docstring): the model's
    loss and accuracy, its bits per byte, the unigram baseline (the entropy of those
    targets' own frequency table: the best any context-free model could do) and the
    compressors' bits per byte.

    The comparison with compressors is not quite even, and it is reported as it falls:
    a compressor starts cold and learns the text's statistics from the val bytes alone,
    while the model brings what it learned from the train split; on a small val set
    (well under a megabyte) that start-up cost weighs heavily on the compressors. The
    model, in turn, sees no context across a window boundary, and pays for the
    end-of-text tokens in its loss while their bytes are not counted.

    Cost: xz -9 and zstd -19 compress about 0.4 MB/s each on a busy 2-core machine
    (13 MB of web text: 35 s and 31 s; gzip and bzip2 about 1 s); they run in parallel
    threads, and max_tokens bounds the bytes they see.
    """
    cfg = cfg or EvaluateConfig()
    max_tokens = cfg.max_tokens or None
    model, ckpt = load_model(checkpoint, device)
    shards = Shards(val_shards)
    block_size = model.config.block_size
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"{tokenizer_path} has {tokenizer.get_vocab_size()} tokens but {checkpoint} "
                         f"was trained on {model.config.vocab_size}; pass the run's own tokenizer")
    if not model.config.causal:
        return evaluate_encoder(model, ckpt, shards, tokenizer, cfg)

    metrics = val_metrics(model, shards, cfg.batch_size, max_tokens)
    n_tokens = metrics["tokens"]

    counts = np.zeros(model.config.vocab_size, dtype=np.int64)
    table = token_bytes(tokenizer, tokenizer_path)

    def chunks():
        for chunk, ids in val_byte_chunks(shards, block_size, max_tokens, table):
            counts[:] += np.bincount(ids, minlength=len(counts))
            yield chunk

    n_bytes, sizes = compressor_sizes(chunks())
    if n_bytes == 0:
        raise ValueError(f"the evaluated val tokens of {', '.join(map(str, val_shards))} decode to no "
                         "text; use more val data or a larger max_tokens")
    model_bpb = bits_per_byte(metrics["loss"], n_tokens / n_bytes)
    compressors = {name: 8 * size / n_bytes for name, size in sizes.items()}
    unigram = unigram_entropy(counts)

    if cfg.samples > 0 and prompts:
        texts = generate_texts(model, tokenizer, list(prompts), n=cfg.samples,
                               max_new_tokens=cfg.sample_tokens, temperature=cfg.temperature,
                               top_k=cfg.top_k or None, top_p=cfg.top_p if cfg.top_p < 1 else None,
                               seed=cfg.seed)
    else:
        texts = []
    return {
        "objective": "causal",
        "checkpoint_step": int(ckpt.get("step", 0)),
        "n_params": model.num_params(),
        "block_size": block_size,
        "loss": metrics["loss"],
        "perplexity": metrics["perplexity"],
        "accuracy": metrics["accuracy"],
        "top5_accuracy": metrics["top5_accuracy"],
        "tokens_evaluated": n_tokens,
        "bytes_evaluated": n_bytes,
        "tokens_per_byte": n_tokens / n_bytes,
        "bits_per_byte": model_bpb,
        "unigram_entropy": unigram,
        "unigram_bits_per_byte": bits_per_byte(unigram, n_tokens / n_bytes),
        "beats_unigram": metrics["loss"] < unigram,
        "compressors": compressors,
        "beats_compressors": [name for name, bpb in compressors.items() if model_bpb < bpb],
        "samples": texts,
    }


MASKED_LEAVES_OUT = ("bits per byte, the compressor anchors and text samples are left out: they "
                     "measure a model that predicts every next token from the ones before it, while "
                     "a masked LM predicts 15% of the tokens from both sides, so its loss is not a "
                     "code length for the text; the unigram entropy stays as the context-free baseline")


def evaluate_encoder(model: torch.nn.Module, ckpt: dict, shards: Shards, tokenizer: Tokenizer,
                     cfg: EvaluateConfig) -> dict:
    """evaluate for a masked LM: masked-token loss and accuracy on the val windows (fixed
    masks), the unigram baseline, and fill-mask examples in place of samples."""
    max_tokens = cfg.max_tokens or None
    metrics = val_metrics(model, shards, cfg.batch_size, max_tokens)
    counts = np.zeros(model.config.vocab_size, dtype=np.int64)
    for x, _ in shards.sequential_windows(model.config.block_size, max_tokens):
        counts += np.bincount(x.numpy(), minlength=len(counts))
    # the masked positions are a uniform sample of these tokens: the same baseline in expectation
    unigram = unigram_entropy(counts)
    return {
        "objective": "masked",
        "checkpoint_step": int(ckpt.get("step", 0)),
        "n_params": model.num_params(),
        "block_size": model.config.block_size,
        "loss": metrics["loss"],
        "perplexity": metrics["perplexity"],
        "accuracy": metrics["accuracy"],
        "top5_accuracy": metrics["top5_accuracy"],
        "tokens_evaluated": metrics["tokens"],  # masked positions
        "window_tokens": int(counts.sum()),
        "unigram_entropy": unigram,
        "beats_unigram": metrics["loss"] < unigram,
        "left_out": MASKED_LEAVES_OUT,
        "samples": fill_mask_examples(model, shards, tokenizer, cfg.samples, cfg.sample_tokens),
    }


def evaluate_checkpoints(checkpoint_paths: list[Path], val_shards: list[Path], tokens_per_byte: float | None,
                         batch_size: int = 16, max_tokens: int | None = None,
                         device: str = "cpu") -> list[dict]:
    """The val curve over a run's kept checkpoints: step, val_metrics and bits per byte, by step.

    `tokens_per_byte` is the ratio `evaluate` reports for the same windows; None (masked
    LM) leaves bits per byte out.
    """
    shards = Shards(val_shards)
    records = []
    for path in checkpoint_paths:
        model, ckpt = load_model(path, device)
        m = val_metrics(model, shards, batch_size, max_tokens)
        records.append({"step": int(ckpt.get("step", 0)), **m,
                        **({"bits_per_byte": bits_per_byte(m["loss"], tokens_per_byte)}
                           if tokens_per_byte and model.config.causal else {})})
    return sorted(records, key=lambda r: r["step"])


def heldout_curve(checkpoint_paths: list[Path], shards_paths: list[Path], tokenizer_path: Path,
                  batch_size: int = 16, device: str = "cpu") -> list[dict]:
    """Each checkpoint's loss, accuracy and bits per byte on every token of a held-out
    set (no max_tokens, so models on other tokenizers are scored on the same bytes, up to
    the last window's remainder). By step; `bytes` is what the targets decode to. A masked
    LM's records have its masked-token loss and accuracy, and no bytes."""
    shards = Shards(shards_paths)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    table = token_bytes(tokenizer, tokenizer_path)
    records, n_bytes = [], None
    for path in checkpoint_paths:
        model, ckpt = load_model(path, device)
        if not model.config.causal:
            m = val_metrics(model, shards, batch_size, None)
            records.append({"step": int(ckpt.get("step", 0)), "loss": m["loss"], "accuracy": m["accuracy"],
                            "top5_accuracy": m["top5_accuracy"], "tokens": m["tokens"]})
            continue
        if n_bytes is None:  # the windows depend on block_size only: the same for every checkpoint
            n_bytes = sum(len(chunk) for chunk, _ in
                          val_byte_chunks(shards, model.config.block_size, None, table))
            if not n_bytes:
                raise ValueError(f"the held-out tokens of {', '.join(map(str, shards_paths))} decode "
                                 "to no text; use a larger eval set")
        m = val_metrics(model, shards, batch_size, None)
        records.append({"step": int(ckpt.get("step", 0)), "loss": m["loss"], "accuracy": m["accuracy"],
                        "tokens": m["tokens"], "bytes": n_bytes,
                        "bits_per_byte": bits_per_byte(m["loss"], m["tokens"] / n_bytes)})
    return sorted(records, key=lambda r: r["step"])


def plot_curve(records: list[dict], path: Path, compressors: dict[str, float] | None = None,
               heldout: list[dict] | None = None) -> None:
    """Val loss and bits per byte against step; the compressors' bits per byte as flat
    lines; the eval set's bits per byte (`heldout`, from heldout_curve) beside val's. Records
    without bits per byte (a masked LM's) get masked-token accuracy in that panel."""
    # The object API with an Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    loss_ax, bpb_ax = fig.subplots(1, 2)
    steps = [r["step"] for r in records]
    loss_ax.plot(steps, [r["loss"] for r in records], marker="o", color="tab:blue")
    right = "bits_per_byte" if all("bits_per_byte" in r for r in records) else "accuracy"
    loss_ax.set_ylabel("val loss (nats/token)" if right == "bits_per_byte" else "val masked-token loss (nats)")
    bpb_ax.plot(steps, [r[right] for r in records], marker="o", color="tab:blue", label="model, val")
    if heldout:
        bpb_ax.plot([r["step"] for r in heldout], [r[right] for r in heldout], marker="s",
                    color="tab:cyan", label="model, eval set")
    for (name, bpb), color in zip((compressors or {}).items(), ["tab:orange", "tab:green", "tab:red",
                                                                 "tab:purple", "tab:brown"]):
        bpb_ax.axhline(bpb, linestyle="--", color=color, label=name)
    bpb_ax.set_ylabel("bits per byte" if right == "bits_per_byte" else "masked-token accuracy")
    bpb_ax.legend(fontsize="small")
    for ax in (loss_ax, bpb_ax):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    os.replace(tmp, path)
