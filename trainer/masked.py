"""Masked-LM training and scoring for the bidirectional encoder (GPTConfig(causal=False)).

BERT's masking (Devlin et al. 2019): in each window 15% of the positions are chosen, and
of those 80% become [MASK], 10% a random token and 10% stay as they are; the loss is
on the chosen positions alone. As in BERT's own data code, the count per window is
fixed (round(15% x block_size), at least one): every batch scores the same number of
positions, so the loss never averages over an empty set and compiled shapes stay put.

The [MASK] token is the model's last id, one past the tokenizer's vocabulary: the
tokenizer and shard stages stay as they are, so a causal and a masked run on one corpus
share those artifacts, and the token is added to a tokenizer only where text with
[MASK] in it is read or written (`with_mask_token`: fill-mask examples, the export).

Masks are a function of where the window is read, never of a global RNG: a training
batch's of (seed, rank, the loader's position), so a resumed run draws the very masks
the uninterrupted one drew; a val window's of its index, so every evaluation of a
model scores the same positions with the same replacements, whatever the batch size.
"""
from __future__ import annotations

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer

from trainer.data import EpochLoader, Shards

MASK = "[MASK]"
MASK_SHARE, REPLACE_MASK, REPLACE_RANDOM = 0.15, 0.8, 0.1  # the rest of the chosen stay unchanged
EVAL_SEED = 20190524  # the val masks' seed: fixed, so figures compare across runs and models


def model_vocab_size(tokenizer_vocab_size: int) -> int:
    """An encoder's vocabulary: the tokenizer's and [MASK] after it."""
    return tokenizer_vocab_size + 1


def mask_token_id(config) -> int:
    """[MASK]'s id in an encoder of this GPTConfig: its last."""
    if config.causal:
        raise ValueError("a causal model has no [MASK] token")
    return config.vocab_size - 1


def masks_per_window(block_size: int) -> int:
    return max(1, round(MASK_SHARE * block_size))


def mask_windows(x: torch.Tensor, mask_id: int, rngs: list[np.random.Generator]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windows x (B, T) -> (inputs (B, T) with BERT's replacements, targets (B, K): the
    original tokens at the chosen positions, positions (B, K)), in GPT.forward's order;
    window b draws from rngs[b]. Random replacements are real tokens (ids below mask_id)."""
    B, T = x.shape
    k = masks_per_window(T)
    positions = np.empty((B, k), dtype=np.int64)
    draws = np.empty((B, k))
    random_ids = np.empty((B, k), dtype=np.int64)
    for b, rng in enumerate(rngs):
        positions[b] = rng.permutation(T)[:k]
        draws[b] = rng.random(k)
        random_ids[b] = rng.integers(0, mask_id, k)
    positions_t = torch.from_numpy(positions)
    targets = x.gather(1, positions_t)
    replaced = torch.from_numpy(np.where(draws < REPLACE_MASK, mask_id,
                                         np.where(draws < REPLACE_MASK + REPLACE_RANDOM, random_ids, -1)))
    new = torch.where(replaced >= 0, replaced, targets)
    inputs = x.clone()
    inputs.scatter_(1, positions_t, new)
    return inputs, targets, positions_t


def next_masked_batch(loader: EpochLoader, mask_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loader's next batch, masked: (inputs, targets, positions) as mask_windows; the
    window itself is the target, so the loader's shifted y is not used."""
    rng = np.random.default_rng([loader.seed, loader.rank, loader.epoch, loader.index])
    x, _ = loader.next_batch()
    return mask_windows(x, mask_id, list(rng.spawn(len(x))))


def eval_rngs(first: int, n: int) -> list[np.random.Generator]:
    """The val windows first..first+n-1's generators."""
    return [np.random.default_rng([EVAL_SEED, i]) for i in range(first, first + n)]


def val_batch_logits(model: torch.nn.Module, x: torch.Tensor, first: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """An encoder on val windows x (B, T), the windows first..first+B-1: each masked with its
    fixed masks -> (logits (N, vocab) at the N masked positions, their original tokens (N,))."""
    device = next(model.parameters()).device
    inputs, targets, positions = mask_windows(x, mask_token_id(model.config), eval_rngs(first, len(x)))
    h, _ = model.hidden_states(inputs.to(device, non_blocking=True))
    positions = positions.to(device)
    h = h.gather(1, positions.unsqueeze(-1).expand(-1, -1, h.size(-1)))
    return model.head(h).view(-1, model.config.vocab_size), targets.to(device).view(-1)


def with_mask_token(tokenizer: Tokenizer, config) -> Tokenizer:
    """The tokenizer with [MASK] added as a special token at the encoder's mask id (one past
    the tokenizer's own vocabulary, see model_vocab_size); `tokenizer` is changed in place."""
    mask_id = mask_token_id(config)
    if tokenizer.token_to_id(MASK) is None:
        tokenizer.add_special_tokens([AddedToken(MASK, special=True, normalized=False)])
    if tokenizer.token_to_id(MASK) != mask_id:
        raise ValueError(f"the tokenizer puts {MASK} at id {tokenizer.token_to_id(MASK)}, the model "
                         f"at {mask_id}: use the tokenizer the model was trained with")
    return tokenizer


@torch.no_grad()
def fill_mask_examples(model: torch.nn.Module, shards: Shards, tokenizer: Tokenizer, n: int,
                       max_window_tokens: int) -> list[dict]:
    """What the encoder makes of the first n val windows (their first max_window_tokens
    tokens), 15% of each turned to [MASK] (fixed draws): {"prompt": the text with [MASK]s,
    "text": with the top-1 guesses in their place, marked ⟦so⟧, "answer": the original
    with the same tokens marked, "correct", "masked"}."""
    config = model.config
    mask_id = mask_token_id(config)
    tokenizer = with_mask_token(tokenizer, config)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        windows = shards.sequential_windows(config.block_size)
        for i, (x, _) in zip(range(n), windows):
            x = x[:max_window_tokens]
            _, _, positions = mask_windows(x.unsqueeze(0), mask_id, eval_rngs(i, 1))
            positions = positions[0].sort().values
            prompt = x.clone()
            prompt[positions] = mask_id
            logits = model.head(model.hidden_states(prompt.unsqueeze(0).to(device))[0])[0]
            guesses = logits[positions, :mask_id].argmax(-1).cpu()  # a real token, never [MASK]
            filled = x.clone()
            filled[positions] = guesses
            out.append({"prompt": tokenizer.decode(prompt.tolist(), skip_special_tokens=False),
                        "text": _marked(filled.tolist(), positions.tolist(), tokenizer),
                        "answer": _marked(x.tolist(), positions.tolist(), tokenizer),
                        "correct": int((guesses == x[positions]).sum()), "masked": len(positions)})
    finally:
        model.train(was_training)
    return out


def _marked(ids: list[int], positions: list[int], tokenizer: Tokenizer) -> str:
    """The text of ids with the tokens at `positions` (sorted) marked ⟦so⟧, a newline in a
    mark written \\n (a guessed newline would otherwise split the mark over two lines)."""
    pieces, start = [], 0
    for p in positions:
        token = tokenizer.decode(ids[p:p + 1], skip_special_tokens=False).replace("\n", "\\n")
        pieces += [tokenizer.decode(ids[start:p], skip_special_tokens=False), f"⟦{token}⟧"]
        start = p + 1
    return "".join(pieces) + tokenizer.decode(ids[start:], skip_special_tokens=False)
