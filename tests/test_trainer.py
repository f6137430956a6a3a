"""The GPT model and the training loop, on tiny models and synthetic data."""
import functools
import json
import math
import os
import resource
import shutil
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch

from trainer.data import EpochLoader, Shards, write_shard
from trainer.evaluate import unigram_entropy
from trainer.model import GPT, GPTConfig, load_model
from trainer import perf
from trainer.train import (DiskFullError, TrainConfig, _save, _shared_cores_hint, lr_at, param_groups,
                           train)

VOCAB = 64
TINY = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=32)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- model

def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(0, VOCAB, (4, 32))
    logits, loss = model(idx)
    assert logits.shape == (4, 32, VOCAB) and loss is None
    logits, loss = model(idx, torch.randint(0, VOCAB, (4, 32)))
    assert loss.ndim == 0
    # small init -> near-uniform predictions -> loss close to ln(vocab)
    assert abs(loss.item() - math.log(VOCAB)) < 0.1
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_causal():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, VOCAB, (1, 20))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % VOCAB
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[0, :10], b[0, :10])  # the past does not see the future
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_tied_weights_and_param_count():
    model = GPT(TINY)
    assert model.lm_head.weight is model.wte.weight
    C, V, T, L = 32, VOCAB, 32, 2
    per_block = (2 * 2 * C) + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    assert model.num_params() == V * C + T * C + L * per_block + 2 * C


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    model = GPT(replace(TINY, n_embd=128, n_head=4, n_layer=8))
    proj = model.blocks[0].mlp.proj.weight.std().item()
    fc = model.blocks[0].mlp.fc.weight.std().item()
    assert abs(fc - 0.02) < 0.002
    assert abs(proj - 0.02 / math.sqrt(16)) < 0.001


# ---------------------------------------------------------------- lr schedules

def test_cosine_schedule():
    cfg = TrainConfig(max_steps=1000, warmup_steps=100, learning_rate=1e-3, min_lr=1e-4)
    warm = [lr_at(s, cfg) for s in range(100)]
    steps = np.diff(warm)
    assert np.allclose(steps, steps[0]) and steps[0] > 0  # linear rise
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-3)  # the peak
    assert max(lr_at(s, cfg) for s in range(1200)) == pytest.approx(1e-3)
    decay = [lr_at(s, cfg) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # monotone down
    assert lr_at(550, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # cosine midpoint
    assert lr_at(1000, cfg) == pytest.approx(1e-4)
    assert lr_at(5000, cfg) == pytest.approx(1e-4)  # stays at the floor
    assert lr_at(0, replace(cfg, warmup_steps=0)) == pytest.approx(1e-3)


def test_wsd_schedule():
    cfg = TrainConfig(max_steps=1000, warmup_steps=100, learning_rate=1e-3, min_lr=1e-4,
                      schedule="wsd", decay_frac=0.2)
    warm = [lr_at(s, cfg) for s in range(100)]
    assert np.allclose(np.diff(warm), 1e-5) and lr_at(99, cfg) == pytest.approx(1e-3)
    # stable: exactly the peak from the end of warmup to the start of the decay (step 800)
    assert all(lr_at(s, cfg) == 1e-3 for s in range(100, 801))
    decay = [lr_at(s, cfg) for s in range(800, 1001)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly down
    # 1 - sqrt: a quarter of the way through the decay, half of the drop is done
    assert lr_at(850, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(1000, cfg) == pytest.approx(1e-4) and lr_at(3000, cfg) == pytest.approx(1e-4)
    # a decay longer than what warmup leaves starts right after warmup
    short = replace(cfg, max_steps=200, decay_frac=0.9)
    assert lr_at(100, short) == pytest.approx(1e-3) and lr_at(101, short) < 1e-3


# ---------------------------------------------------------------- optimizer

def test_param_groups_decay_only_weight_matrices():
    model = GPT(TINY)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    free = {names[id(p)] for p in no_decay["params"]}
    assert decayed == {f"blocks.{i}.{m}.weight" for i in range(2)
                       for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    # embeddings (and lm_head, which is wte), norms and biases are not decayed
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "blocks.0.attn.qkv.bias",
            "blocks.1.ln2.weight"} <= free
    assert not decayed & free and decayed | free == set(names.values())  # each exactly once


# ---------------------------------------------------------------- epoch loader

T = 16


@pytest.fixture(scope="module")
def numbered_shards(tmp_path_factory):
    """Shards whose token at position i of shard s is 10000*s + i: a window tells where it came from."""
    d = tmp_path_factory.mktemp("numbered")
    lengths = [1000, 16, 530, 17]  # 62 + 0 (one window needs T+1 tokens) + 33 + 1 windows
    paths = []
    for s, n in enumerate(lengths):
        paths.append(d / f"s{s}.bin")
        write_shard(paths[-1], (10000 * s + np.arange(n)).astype(np.uint32))
    starts = {10000 * s + i for s, n in enumerate(lengths) for i in range(0, n - T, T)}
    return Shards(paths), starts


def epoch_starts(loader, batches):
    out = []
    for _ in range(batches):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (loader.batch_size, T) and x.dtype == torch.int64
        # contiguous tokens of one shard: y is x shifted by one
        assert torch.equal(y, x + 1) and torch.equal(x, x[:, :1] + torch.arange(T))
        out += x[:, 0].tolist()
    return out


def test_epoch_loader_visits_every_window_once_per_epoch(numbered_shards):
    shards, starts = numbered_shards
    assert len(starts) == 96
    loader = EpochLoader(shards, T, 8, seed=3)
    assert loader.n_windows == 96
    first, second = epoch_starts(loader, 12), epoch_starts(loader, 12)
    assert sorted(first) == sorted(second) == sorted(starts)  # each window exactly once
    assert first != second  # a new order each epoch
    assert epoch_starts(EpochLoader(shards, T, 8, seed=3), 12) == first  # seeded
    assert epoch_starts(EpochLoader(shards, T, 8, seed=4), 12) != first


def test_epoch_loader_ranks_take_disjoint_windows(numbered_shards):
    shards, starts = numbered_shards
    ranks = [epoch_starts(EpochLoader(shards, T, 4, seed=3, rank=r, world_size=2), 12) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and set(ranks[0]) | set(ranks[1]) == starts
    # 96 windows over 5 ranks: 19 each, the one left over is skipped this epoch
    five = [EpochLoader(shards, T, 19, seed=3, rank=r, world_size=5).next_windows() for r in range(5)]
    ids = np.concatenate(five)
    assert len(ids) == len(set(ids.tolist())) == 95


def test_epoch_loader_state_restores_the_sequence(numbered_shards):
    shards, _ = numbered_shards
    loader = EpochLoader(shards, T, 7, seed=5)
    epoch_starts(loader, 10)
    state = loader.state_dict()
    expected = epoch_starts(loader, 20)  # crosses into the next epochs
    restored = EpochLoader(shards, T, 7, seed=5)
    restored.load_state_dict(state)
    assert epoch_starts(restored, 20) == expected
    with pytest.raises(ValueError, match="seed"):
        EpochLoader(shards, T, 7, seed=6).load_state_dict(state)


def test_epoch_loader_too_little_data(tmp_path):
    write_shard(tmp_path / "short.bin", np.arange(16, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"short\.bin.*block_size"):
        EpochLoader(Shards([tmp_path / "short.bin"]), T, 4, seed=0)


# ---------------------------------------------------------------- training

PATTERN = np.random.default_rng(0).integers(0, VOCAB, size=24)  # repeats: needs context


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    stream = np.tile(PATTERN, 400).astype(np.uint16)
    paths = [d / "train_0.bin", d / "train_1.bin", d / "val_0.bin"]
    write_shard(paths[0], stream[:5000])
    write_shard(paths[1], stream[5000:])
    # val: the pattern with every 7th token replaced at random, so the val loss stays above 0
    noisy = stream[:3000].copy()
    noisy[::7] = np.random.default_rng(1).integers(0, VOCAB, size=len(noisy[::7]))
    write_shard(paths[2], noisy)
    return paths[:2], paths[2:]


TRAIN_CFG = TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_steps=60,
                        learning_rate=1e-2, min_lr=1e-3, warmup_steps=10, weight_decay=0.0,
                        log_every=10, threads=1, seed=7, dtype="float32", checkpoint_every=15,
                        keep_last=2, eval_tokens=1024)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(synthetic_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    lines = []
    stats = train(synthetic_shards[0], VOCAB, TRAIN_CFG, out, log=lines.append,
                  val_shards=synthetic_shards[1], val_tokens_per_byte=0.25)
    return out, stats, lines


def test_training_learns_the_pattern(trained, synthetic_shards):
    out, stats, lines = trained
    records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == list(range(0, 60, 10)) + [59]
    assert set(records[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen"}
    assert records[-1]["tokens_seen"] == 60 * 8 * 32
    assert all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 for r in records)
    initial = records[0]["loss"]
    assert abs(initial - math.log(VOCAB)) < 0.2
    unigram = unigram_entropy(np.bincount(np.concatenate(Shards(synthetic_shards[0]).tokens), minlength=VOCAB))
    assert unigram < math.log(VOCAB) - 0.5  # the pattern is not uniform
    # the repeating pattern is predictable from context: far below what token frequencies give
    assert stats["final_loss"] < 0.25 * initial
    assert stats["final_loss"] < 0.5 * unigram
    assert stats["steps"] == 60 and stats["tokens_seen"] == 60 * 8 * 32
    assert stats["tokens_per_s"] > 0 and stats["seconds"] > 0 and 0 < stats["mfu"] < 1
    assert stats["peak_flops_source"].startswith("measured")
    assert stats["dtype"] == "float32" and stats["dtype_reason"] == "as configured"
    assert lines[0] == "dtype float32: as configured" and stats["mfu_note"] is None
    assert stats["n_params"] == GPT(TINY).num_params()
    assert stats["compile_seconds"] is None and stats["parent"] is None and stats["resumed_from"] is None
    assert len([l for l in lines if l.startswith("step")]) == len(records)
    assert any(stats["peak_flops_source"] in l for l in lines[:2])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_checkpoints_and_best(trained, synthetic_shards):
    out, stats, _ = trained
    val = [r for r in read_metrics(out) if "val_loss" in r]
    assert [r["step"] for r in val] == [14, 29, 44, 59]
    assert set(val[0]) == {"step", "val_loss", "val_accuracy", "val_top5_accuracy", "val_tokens",
                           "val_bits_per_byte"}
    assert all(r["val_tokens"] == 1024 for r in val)  # eval_tokens bounds it
    assert val[-1]["val_bits_per_byte"] == pytest.approx(val[-1]["val_loss"] / math.log(2) * 0.25)
    # the val pattern has every 7th token noised: the model learns the rest fast, then its
    # growing confidence costs more on the noise, so here best.pt is not the last checkpoint
    assert val[0]["val_loss"] < 0.5 * math.log(VOCAB)
    assert stats["val_loss"] == val[-1]["val_loss"]
    assert stats["best_val_loss"] == min(r["val_loss"] for r in val)
    # keep_last=2: the two newest step checkpoints remain
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000045.pt", "step_0000060.pt"]
    best = torch.load(out / "best.pt", weights_only=True)
    best_step = min(val, key=lambda r: r["val_loss"])["step"] + 1
    assert best["step"] == best_step and best["best_val_loss"] == stats["best_val_loss"]
    # best.pt holds the weights that scored best_val_loss
    from trainer.evaluate import val_metrics
    model, _ = load_model(out / "best.pt")
    m = val_metrics(model, Shards(synthetic_shards[1]), TRAIN_CFG.batch_size, 1024)
    assert m["loss"] == pytest.approx(stats["best_val_loss"], rel=1e-6)


def test_checkpoint_round_trip(trained, synthetic_shards):
    out, stats, _ = trained
    raw = torch.load(out / "model.pt", weights_only=True)  # no pickled code needed
    assert set(raw) == {"model", "model_config", "train_config", "optimizer", "scaler", "step",
                        "tokens_seen", "loader", "rng", "best_val_loss", "best_step", "stale_checks",
                        "loss_window", "records", "parent"}
    assert raw["step"] == 60 and raw["tokens_seen"] == stats["tokens_seen"]
    assert raw["train_config"]["learning_rate"] == TRAIN_CFG.learning_rate
    assert raw["model_config"] == {"vocab_size": VOCAB, "block_size": 32, "n_layer": 2, "n_head": 2,
                                   "n_embd": 32, "dropout": 0.0, "bias": True, "causal": True}
    model, _ = load_model(out / "model.pt")
    assert model.lm_head.weight is model.wte.weight  # tying survives the reload
    x, y = EpochLoader(Shards(synthetic_shards[0]), 32, 4, seed=5).next_batch()
    with torch.no_grad():
        _, loss = model(x, y)
    assert loss.item() < 0.5 * stats["initial_loss"]  # the trained weights, not a fresh init


def test_training_is_deterministic_and_bf16_runs(synthetic_shards, tmp_path):
    cfg = replace(TRAIN_CFG, max_steps=6, log_every=1, checkpoint_every=0)
    a = train(synthetic_shards[0], VOCAB, cfg, tmp_path / "a", log=lambda _: None)
    b = train(synthetic_shards[0], VOCAB, cfg, tmp_path / "b", log=lambda _: None)
    assert a["final_loss"] == b["final_loss"]
    assert not (tmp_path / "a" / "best.pt").exists()  # no val shards, no best
    c = train(synthetic_shards[0], VOCAB, replace(cfg, dtype="bfloat16"), tmp_path / "c",
              log=lambda _: None)
    assert math.isfinite(c["final_loss"]) and c["final_loss"] < c["initial_loss"]
    assert c["final_loss"] != a["final_loss"]  # autocast really ran in bf16
    with pytest.raises(ValueError, match="float16.*CUDA"):
        train(synthetic_shards[0], VOCAB, replace(cfg, dtype="float16", device="cpu"), tmp_path / "d")
    with pytest.raises(ValueError, match="dtype"):
        train(synthetic_shards[0], VOCAB, replace(cfg, dtype="half"), tmp_path / "d")
    with pytest.raises(ValueError, match="schedule"):
        train(synthetic_shards[0], VOCAB, replace(cfg, schedule="linear"), tmp_path / "d")
    # a val set too short for one window fails at the start, not at the first checkpoint
    with pytest.raises(ValueError, match=r"val_0\.bin.*eval_tokens"):
        train(synthetic_shards[0], VOCAB, replace(cfg, eval_tokens=16), tmp_path / "d",
              val_shards=synthetic_shards[1])


def strip_timing(records):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in records]


def test_resume_is_bit_identical(synthetic_shards, tmp_path):
    # dropout: the resumed run must also restore the torch RNG to draw the same masks
    # log_every=5, checkpoint_every=4: the checkpoint at step 4 falls inside a logging window
    cfg = replace(TRAIN_CFG, max_steps=12, log_every=5, checkpoint_every=4, keep_last=5, dropout=0.1,
                  warmup_steps=3)
    kw = dict(val_shards=synthetic_shards[1], log=lambda _: None)
    whole = train(synthetic_shards[0], VOCAB, cfg, tmp_path / "whole", **kw)

    out = tmp_path / "killed"
    killed = train(synthetic_shards[0], VOCAB, cfg, out, stop_after=6, **kw)
    assert killed["steps"] == 6 and not (out / "model.pt").exists()
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [0, 5]  # the resume drops step 5
    (out / "metrics.jsonl").unlink()  # the checkpoint carries the metrics so far
    lines = []
    resumed = train(synthetic_shards[0], VOCAB, cfg, out, resume=True, log=lines.append,
                    val_shards=synthetic_shards[1])
    assert resumed["resumed_from"] == str(out / "checkpoints" / "step_0000004.pt")
    assert any("resuming from" in l and "step_0000004.pt" in l for l in lines)

    # the same metrics line for line (loss logged as a mean across the restart), the same weights
    assert strip_timing(read_metrics(out)) == strip_timing(read_metrics(tmp_path / "whole"))
    assert resumed["final_loss"] == whole["final_loss"] and resumed["tokens_seen"] == whole["tokens_seen"]
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["best_val_loss"] == b["best_val_loss"]
    for p, q in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(p["exp_avg"], q["exp_avg"]) and torch.equal(p["exp_avg_sq"], q["exp_avg_sq"])


def test_grad_accumulation_matches_a_bigger_batch(synthetic_shards, tmp_path):
    cfg = replace(TRAIN_CFG, max_steps=5, log_every=1, checkpoint_every=0, grad_clip=0.0)
    big = train(synthetic_shards[0], VOCAB, replace(cfg, batch_size=8), tmp_path / "big", log=lambda _: None)
    acc = train(synthetic_shards[0], VOCAB, replace(cfg, batch_size=4, grad_accum_steps=2), tmp_path / "acc",
                log=lambda _: None)
    assert acc["tokens_seen"] == big["tokens_seen"] == 5 * 8 * 32
    a, b = read_metrics(tmp_path / "big"), read_metrics(tmp_path / "acc")
    # the loss and the gradient norm are of the mean over all 8 windows: a missing 1/accum shows
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in a], [r["grad_norm"] for r in b], rtol=1e-4)
    wa = torch.load(tmp_path / "big" / "model.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "acc" / "model.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_compiled_run_saves_plain_keys(synthetic_shards, tmp_path, monkeypatch):
    # A real torch.compile (dynamo captures the graph and wraps the model in an
    # OptimizedModule whose state_dict keys start with "_orig_mod."), with the eager
    # backend: inductor's C++ build takes minutes on these shared cores.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    cfg = replace(TRAIN_CFG, max_steps=3, log_every=1, checkpoint_every=2, compile=True)
    lines = []
    stats = train(synthetic_shards[0], VOCAB, cfg, tmp_path, log=lines.append)
    assert stats["compile_seconds"] is not None and stats["compile_seconds"] >= 0
    assert any(l.startswith("torch.compile: the first step took") for l in lines)
    for path in (tmp_path / "model.pt", tmp_path / "checkpoints" / "step_0000002.pt"):
        keys = torch.load(path, weights_only=True)["model"].keys()
        assert keys == GPT(TINY).state_dict().keys()
    load_model(tmp_path / "model.pt")


def test_compile_failure_falls_back_to_eager(synthetic_shards, tmp_path, monkeypatch):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=broken_backend))
    cfg = replace(TRAIN_CFG, max_steps=3, log_every=1, checkpoint_every=0)
    lines = []
    stats = train(synthetic_shards[0], VOCAB, replace(cfg, compile=True), tmp_path / "c", log=lines.append)
    assert len([l for l in lines if l.startswith("torch.compile failed")]) == 1
    assert stats["compile_seconds"] is None
    train(synthetic_shards[0], VOCAB, cfg, tmp_path / "e", log=lambda _: None)
    # the failed attempt left no trace: same data position, same weights
    assert strip_timing(read_metrics(tmp_path / "c")) == strip_timing(read_metrics(tmp_path / "e"))


def test_fine_tune_starts_from_the_parent(trained, synthetic_shards, tmp_path):
    parent_path = trained[0] / "model.pt"
    # the config's shape (4 x 128 by default) is ignored: the parent's is used
    cfg = TrainConfig(batch_size=8, max_steps=3, learning_rate=1e-4, min_lr=1e-5, warmup_steps=1,
                      log_every=1, threads=1, seed=11, dtype="float32", checkpoint_every=0)
    stats = train(synthetic_shards[0], VOCAB, cfg, tmp_path / "ft", log=lambda _: None, init_from=parent_path)
    assert stats["parent"] == str(parent_path) and stats["n_params"] == trained[1]["n_params"]
    assert torch.load(tmp_path / "ft" / "model.pt", weights_only=True)["parent"] == str(parent_path)
    # step 0's loss is the parent's loss on the first batch the loader draws
    parent, _ = load_model(parent_path)
    x, y = EpochLoader(Shards(synthetic_shards[0]), 32, 8, seed=11).next_batch()
    with torch.no_grad():
        _, parent_loss = parent(x, y)
    first = read_metrics(tmp_path / "ft")[0]
    assert first["step"] == 0 and first["loss"] == pytest.approx(parent_loss.item(), rel=1e-5)
    assert first["loss"] < 0.25 * math.log(VOCAB)  # a fresh model starts at about ln(vocab)
    with pytest.raises(ValueError, match=r"model\.pt.*vocab_size 64.*100"):
        train(synthetic_shards[0], 100, cfg, tmp_path / "bad", init_from=parent_path)


def test_auto_dtype_is_resolved_logged_and_returned(synthetic_shards, tmp_path):
    lines = []
    stats = train(synthetic_shards[0], VOCAB, replace(TRAIN_CFG, dtype="auto", max_steps=3, log_every=1,
                                                      checkpoint_every=0), tmp_path, log=lines.append)
    dtype, reason = perf.resolve_dtype(torch.device("cpu"), "auto")
    assert (stats["dtype"], stats["dtype_reason"]) == (dtype, reason)
    assert lines[0] == f"dtype {dtype}: {reason}" and f"cpu, {dtype}," in lines[1]


def test_mfu_above_the_peak_is_not_reported(synthetic_shards, tmp_path, monkeypatch):
    # a peak probe that ran slow (a busy neighbour) gives a peak below what training does
    monkeypatch.setattr(perf, "peak_flops", lambda device, dtype: (1.0, "measured: a slow probe"))
    lines = []
    stats = train(synthetic_shards[0], VOCAB, replace(TRAIN_CFG, max_steps=3, log_every=1,
                                                      checkpoint_every=0), tmp_path, log=lines.append)
    assert stats["mfu"] is None and stats["mfu_note"] == perf.PEAK_TOO_LOW
    assert all(r["mfu"] is None for r in read_metrics(tmp_path))
    assert all("MFU n/a" in l for l in lines if l.startswith("step"))
    assert any(l.startswith(perf.PEAK_TOO_LOW) for l in lines)
    from flows.report import headline  # the train report says why there is no MFU

    report = "\n".join(headline({"stage": "train", "stats": stats}))
    assert perf.PEAK_TOO_LOW in report and "measured: a slow probe" in report
    assert "- dtype float32: as configured" in report and "MFU 0" not in report


def test_busy_cores_get_a_hint(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (4.2, 3.0, 2.0))  # training + 2 busy neighbours
    hint = _shared_cores_hint()
    assert hint.startswith("note: load average 4.2 on 2 cores") and "OMP_WAIT_POLICY=PASSIVE" in hint
    monkeypatch.setattr(os, "getloadavg", lambda: (2.1, 2.0, 2.0))  # training alone
    assert _shared_cores_hint() is None
    monkeypatch.setattr(os, "getloadavg", lambda: (4.2, 3.0, 2.0))
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # threads already sleep when idle
    assert _shared_cores_hint() is None


@pytest.fixture
def file_size_limit():
    """Writes past 64 KB fail with EFBIG, as on a full disk, for this process only."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_while_saving_is_named(synthetic_shards, tmp_path, monkeypatch, file_size_limit):
    # the disk looks full: 10 kB free, and the 64 KB write limit makes torch.save fail as it
    # does on a full disk ("[enforce fail at inline_container.cc:672] ...")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    cfg = replace(TRAIN_CFG, max_steps=3, log_every=1, checkpoint_every=0)
    with pytest.raises(DiskFullError) as failed:
        train(synthetic_shards[0], VOCAB, cfg, tmp_path, log=lambda _: None)
    message = str(failed.value)
    assert message.startswith("disk full: model.pt (about 0.") and "\n" not in message
    assert f"does not fit in {tmp_path}, which has 0.0 MB free" in message
    assert isinstance(failed.value, OSError) and "inline_container" in str(failed.value.__cause__)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "metrics.jsonl", "tensorboard"]  # no model.pt(.tmp)


def test_a_failed_checkpoint_write_leaves_nothing(tmp_path, file_size_limit):
    # the disk has room, the write fails anyway: the error names the file and the cause
    state = {"model": {"w": torch.zeros(100_000)}, "step": 1}
    with pytest.raises(OSError, match=rf"could not write {tmp_path / 'model.pt'} \(.* MB free there, "
                                      rf"about 0\.4 MB needed\): RuntimeError: \[enforce fail") as failed:
        _save(state, tmp_path / "model.pt")
    assert not isinstance(failed.value, DiskFullError)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- evaluation helpers

def test_unigram_entropy():
    assert unigram_entropy(np.array([5, 5, 5, 5, 0])) == pytest.approx(math.log(4))
    assert unigram_entropy(np.array([0, 7])) == 0.0
    p = np.array([0.5, 0.25, 0.25])
    assert unigram_entropy(np.array([2, 1, 1])) == pytest.approx(-(p * np.log(p)).sum())
