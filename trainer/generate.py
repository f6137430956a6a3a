"""Sampling text from a trained GPT: temperature, top-k, top-p, with a KV cache."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from trainer.model import GPT

EOT = "<|endoftext|>"


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits (vocab,) with all but the k largest set to -inf."""
    kth = torch.topk(logits, min(k, logits.size(-1))).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Logits (vocab,) keeping only the nucleus: the smallest set of most likely tokens
    whose probabilities sum to at least p."""
    probs, order = torch.sort(F.softmax(logits, dim=-1), descending=True)
    # a token is in the nucleus if the more likely tokens before it sum to less than p
    outside_sorted = probs.cumsum(-1) - probs >= p
    outside = torch.empty_like(outside_sorted).scatter_(0, order, outside_sorted)
    return logits.masked_fill(outside, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> int:
    """One token id from next-token logits (vocab,); temperature 0 is greedy."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    return int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator))


def generate_ids(model: GPT, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, stop_id: int | None = None) -> list[int]:
    """Up to max_new_tokens ids sampled after prompt_ids (the new ids only), ending before
    stop_id if the model samples it. `generator` is a CPU generator: sampling runs on the
    CPU, so a seed gives the same tokens on any device. Call it on a model in eval mode."""
    return list(stream_ids(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, generator=generator, stop_id=stop_id))


@torch.inference_mode()  # on a generator: entered around each step, in the thread that asks
def stream_ids(model: GPT, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None,
               generator: torch.Generator | None = None, stop_id: int | None = None) -> Iterator[int]:
    """generate_ids one id at a time, as each is sampled (the HTTP API streams them); the
    checks run at the first step.

    Past block_size the cache cannot slide (its keys carry absolute positions), so each
    further token recomputes it on the last block_size tokens: exactly the context the
    uncached model would see, at the uncached cost.
    """
    if temperature < 0:
        raise ValueError(f"temperature {temperature} is negative: "
                         "use 0 for greedy, 1 for the model's own distribution")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k {top_k} must be at least 1 (or None for no top-k)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p {top_p} must be in (0, 1] (or None for no nucleus sampling)")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: start it with at least one token, e.g. <|endoftext|>")
    block_size = model.config.block_size
    device = model.wte.weight.device
    context = list(prompt_ids)
    feed, cache = context[-block_size:], None  # feed: the ids the cache does not hold yet
    for _ in range(max_new_tokens):
        if cache is not None and cache[0][0].size(2) + len(feed) > block_size:
            feed, cache = context[-block_size:], None  # full: recompute on the last block_size
        logits, cache = model.forward_cached(torch.tensor([feed], device=device), cache)
        next_id = sample_next(logits[0, -1].float().cpu(), temperature, top_k, top_p, generator)
        if next_id == stop_id:
            break
        context.append(next_id)
        yield next_id
        feed = [next_id]


def generate_texts(model: GPT, tokenizer: Tokenizer, prompts: list[str], *, n: int, max_new_tokens: int,
                   temperature: float, top_k: int | None, top_p: float | None, seed: int) -> list[dict]:
    """n samples per prompt, as [{"prompt", "text"}] with text = prompt + continuation.

    Each sample is conditioned on <|endoftext|> before the prompt, since every training
    document starts after one, and stops where the model ends the document.
    """
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"the tokenizer has no {EOT} token: use the one trained with the corpus")
    generator = torch.Generator().manual_seed(seed)
    out = []
    for prompt in prompts:
        prompt_ids = [eot] + (tokenizer.encode(prompt).ids if prompt else [])
        for _ in range(n):
            ids = generate_ids(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, generator=generator, stop_id=eot)
            out.append({"prompt": prompt, "text": prompt + tokenizer.decode(ids)})
    return out
