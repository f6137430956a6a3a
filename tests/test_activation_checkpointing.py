"""Activation checkpointing: the blocks are recomputed in backward, and nothing else changes."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from flows.config import versioned
from trainer.data import write_shard
from trainer.model import GPT, GPTConfig
from trainer.train import TrainConfig, train

VOCAB = 64
pytestmark = pytest.mark.usefixtures("one_thread")


def counting_calls(module: torch.nn.Module) -> list:
    """A list that grows by one at each call of module.forward (module hooks do not see
    checkpoint's recomputation)."""
    calls, forward = [], module.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


def gradients(config: GPTConfig, checkpointing: bool, seed: int = 0) -> tuple[float, dict, int]:
    """Loss, gradients and the first block's forward calls of one fp32 step, same init and batch."""
    torch.manual_seed(0)
    model = GPT(config).train()
    model.activation_checkpointing = checkpointing
    calls = counting_calls(model.blocks[0])
    idx = torch.randint(0, config.vocab_size, (4, config.block_size), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)  # the dropout masks
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, len(calls)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradients_match_without_checkpointing(dropout):
    config = GPTConfig(vocab_size=VOCAB, block_size=33, n_layer=3, n_head=2, n_embd=32, dropout=dropout)
    loss, plain, plain_calls = gradients(config, False)
    loss_ckpt, ckpt, ckpt_calls = gradients(config, True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the block really ran again in backward
    assert loss_ckpt == loss
    for name in plain:  # the recomputed dropout masks are the forward's (the RNG state is restored)
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-9, msg=name)
    if dropout:  # other masks give other gradients: the comparison above can tell
        _, other, _ = gradients(config, True, seed=1)
        assert not torch.allclose(other["blocks.0.mlp.fc.weight"], plain["blocks.0.mlp.fc.weight"], rtol=1e-3)


def test_no_recompute_outside_training():
    config = GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config)
    model.activation_checkpointing = True
    calls = counting_calls(model.blocks[0])
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        model.train()(idx)
    logits, cache = model.eval().forward_cached(idx)  # generation keeps its cache
    assert len(cache) == 2 and logits.shape == (2, 16, VOCAB) and len(calls) == 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_shard(d / "train_0.bin", np.random.default_rng(0).integers(0, VOCAB, size=4000).astype(np.uint16))
    return [d / "train_0.bin"]


def test_training_with_it_gives_the_same_run(shards, tmp_path):
    cfg = TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, max_steps=6,
                      warmup_steps=2, log_every=1, threads=1, seed=3, dtype="float32", checkpoint_every=0,
                      dropout=0.1)
    runs = {}
    for on in (False, True):
        out = tmp_path / str(on)
        train(shards, VOCAB, replace(cfg, activation_checkpointing=on), out, log=lambda _: None)
        runs[on] = ([json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()],
                    torch.load(out / "model.pt", weights_only=True)["model"])
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-6)
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value, rtol=1e-5, atol=1e-7)
    # the same weights: a cache hit may reuse a run made with or without it
    assert "activation_checkpointing" not in versioned(replace(cfg, activation_checkpointing=True))
