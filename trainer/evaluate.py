"""Evaluate a checkpoint on held-out shards: loss, perplexity, bits per byte, samples.

Bits per byte makes models with different tokenizers comparable: a token's loss is
spread over the bytes it stands for, using the val split's own tokens-per-byte ratio.
The unigram baseline is the entropy of the val tokens' own frequency table, the best a
model that ignores context could do; a trained model must come in below it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from trainer.data import Shards
from trainer.train import load_model

EOT = "<|endoftext|>"


def bits_per_byte(loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Convert mean nats per token to bits per byte of the text those tokens encode."""
    if n_tokens <= 0 or n_bytes <= 0:
        raise ValueError(f"need positive token and byte counts, got {n_tokens} tokens, {n_bytes} bytes")
    return loss_nats / math.log(2) * (n_tokens / n_bytes)


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the distribution given by token counts."""
    total = counts.sum()
    if total <= 0:
        raise ValueError("no tokens to take a unigram entropy of")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


@torch.no_grad()
def _val_loss(model, shards: Shards, batch_size: int, max_tokens: int | None) -> tuple[float, float, int]:
    """Sum of cross-entropy, number of correct top-1 guesses, number of targets."""
    total_loss, correct, n = 0.0, 0, 0
    windows = shards.sequential_windows(model.config.block_size, max_tokens)
    while True:
        batch = [w for _, w in zip(range(batch_size), windows)]
        if not batch:
            break
        x = torch.stack([w[0] for w in batch])
        y = torch.stack([w[1] for w in batch])
        logits, _ = model(x)
        logits = logits.float().view(-1, logits.size(-1))
        # summed in float64 so a long eval does not lose small terms
        total_loss += F.cross_entropy(logits, y.view(-1), reduction="sum").double().item()
        correct += int((logits.argmax(dim=-1) == y.view(-1)).sum())
        n += y.numel()
    return total_loss, correct, n


def _samples(model, tokenizer: Tokenizer, prompts, samples: int, sample_tokens: int,
             temperature: float, top_k: int | None, seed: int) -> list[dict]:
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"tokenizer has no {EOT} token to start samples from")
    generator = torch.Generator().manual_seed(seed)
    out = []
    for prompt in prompts:
        # every document starts after an end-of-text token, so condition on one
        prompt_ids = [eot] + (tokenizer.encode(prompt).ids if prompt else [])
        idx = torch.tensor([prompt_ids], dtype=torch.long)
        for _ in range(samples):
            ids = model.generate(idx, sample_tokens, temperature=temperature, top_k=top_k,
                                 generator=generator)[0, len(prompt_ids):].tolist()
            if eot in ids:  # the model ended the document
                ids = ids[:ids.index(eot)]
            out.append({"prompt": prompt, "text": prompt + tokenizer.decode(ids)})
    return out


def evaluate(checkpoint: Path, val_shards: list[Path], val_bytes: int, val_tokens: int,
             tokenizer_path: Path, *, batch_size: int = 16, max_tokens: int | None = None,
             samples: int = 3, sample_tokens: int = 64, temperature: float = 0.8,
             top_k: int | None = 50, seed: int = 1234, prompts=("",)) -> dict:
    """Metrics of a checkpoint on the val shards, as a JSON-serialisable dict.

    val_bytes and val_tokens are the totals of the whole val split (UTF-8 bytes of its
    text, tokens in its shards); their ratio converts per-token loss to per-byte.
    """
    model, ckpt = load_model(checkpoint)
    shards = Shards(val_shards)
    block_size = model.config.block_size

    total_loss, correct, n = _val_loss(model, shards, batch_size, max_tokens)
    if n == 0:
        raise ValueError(f"no val shard holds a window of block_size+1 = {block_size + 1} tokens"
                         + (f" within max_tokens={max_tokens}" if max_tokens is not None else ""))
    loss = total_loss / n
    unigram = unigram_entropy(shards.token_counts(model.config.vocab_size))

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "accuracy": correct / n,
        "bits_per_byte": bits_per_byte(loss, val_tokens, val_bytes),
        "tokens_evaluated": n,
        "unigram_entropy": unigram,
        "unigram_bits_per_byte": bits_per_byte(unigram, val_tokens, val_bytes),
        "beats_unigram": loss < unigram,
        "tokens_per_byte": val_tokens / val_bytes,
        "val_tokens": val_tokens,
        "val_bytes": val_bytes,
        "block_size": block_size,
        "n_params": model.num_params(),
        "checkpoint_step": int(ckpt.get("step", 0)),
        "samples": _samples(model, tokenizer, prompts, samples, sample_tokens,
                            temperature, top_k, seed),
    }
