"""The GPT model, the training loop and evaluation, on tiny models and synthetic data."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from trainer.data import Shards, write_shard
from trainer.evaluate import bits_per_byte, evaluate, unigram_entropy
from trainer.model import GPT, GPTConfig
from trainer.train import TrainConfig, _optimizer, load_model, lr_at, train

VOCAB = 64
TINY = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models gain nothing from threads, and spinning OpenMP threads crawl when
    # another process shares the cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def test_generate():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    start = torch.zeros(2, 1, dtype=torch.long)
    # longer than block_size: the context must be cropped
    out = model.generate(start, 40, top_k=5, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 41)
    assert out.min() >= 0 and out.max() < VOCAB
    again = model.generate(start, 40, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    greedy = model.generate(start, 5, temperature=0)
    assert torch.equal(greedy, model.generate(start, 5, temperature=0))
    # top_k=1 is greedy too
    assert torch.equal(greedy, model.generate(start, 5, top_k=1, generator=torch.Generator()))


# ---------------------------------------------------------------- lr schedule

def test_lr_schedule():
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


# ---------------------------------------------------------------- training

PATTERN = np.random.default_rng(0).integers(0, VOCAB, size=24)  # repeats: needs context


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    stream = np.tile(PATTERN, 400).astype(np.uint16)
    paths = [d / "train_0.bin", d / "train_1.bin"]
    write_shard(paths[0], stream[:5000])
    write_shard(paths[1], stream[5000:])
    return paths


TRAIN_CFG = TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_steps=100,
                        learning_rate=1e-2, min_lr=1e-3, warmup_steps=10, weight_decay=0.0,
                        log_every=10, threads=1, seed=7)


@pytest.fixture(scope="module")
def trained(synthetic_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    lines = []
    stats = train(synthetic_shards, VOCAB, TRAIN_CFG, out, log=lines.append)
    return out, stats, lines


def test_training_learns_the_pattern(trained, synthetic_shards):
    out, stats, lines = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(0, 100, 10)) + [99]
    assert set(records[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
    initial = records[0]["loss"]
    assert abs(initial - math.log(VOCAB)) < 0.2
    unigram = unigram_entropy(Shards(synthetic_shards).token_counts(VOCAB))
    assert unigram < math.log(VOCAB) - 0.5  # the pattern is not uniform
    # the repeating pattern is predictable from context: far below what token frequencies give
    assert stats["final_loss"] < 0.25 * initial
    assert stats["final_loss"] < 0.5 * unigram
    assert stats["steps"] == 100 and stats["tokens_seen"] == 100 * 8 * 32
    assert stats["tokens_per_s"] > 0 and stats["seconds"] > 0
    assert stats["n_params"] == GPT(TINY).num_params()
    assert len([l for l in lines if l.startswith("step")]) == len(records)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_round_trip(trained, synthetic_shards):
    out, stats, _ = trained
    raw = torch.load(out / "model.pt", weights_only=True)  # no pickled code needed
    assert set(raw) == {"model", "optimizer", "step", "model_config", "train_config"}
    assert raw["step"] == 100
    assert raw["train_config"]["learning_rate"] == TRAIN_CFG.learning_rate
    assert raw["model_config"] == {"vocab_size": VOCAB, "block_size": 32, "n_layer": 2, "n_head": 2,
                                   "n_embd": 32, "dropout": 0.0, "bias": True}

    model, ckpt = load_model(out / "model.pt")
    assert not model.training
    assert model.lm_head.weight is model.wte.weight  # tying survives the reload
    manual = GPT(GPTConfig(**raw["model_config"]))
    manual.load_state_dict(raw["model"])
    manual.eval()
    x, y = Shards(synthetic_shards).random_batch(4, 32, torch.Generator().manual_seed(5))
    logits, loss = model(x, y)
    torch.testing.assert_close(logits, manual(x)[0], rtol=0, atol=0)
    # these are the trained weights, not a fresh init
    assert loss.item() < 0.5 * stats["initial_loss"]
    # and the optimizer state can resume: it fits an optimizer built the same way
    opt = _optimizer(model, TRAIN_CFG)
    opt.load_state_dict(ckpt["optimizer"])
    assert opt.state[model.wte.weight]["step"].item() == 100


def test_training_is_deterministic_and_bf16_runs(synthetic_shards, tmp_path):
    cfg = replace(TRAIN_CFG, max_steps=6, log_every=1)
    a = train(synthetic_shards, VOCAB, cfg, tmp_path / "a", log=lambda _: None)
    b = train(synthetic_shards, VOCAB, cfg, tmp_path / "b", log=lambda _: None)
    assert a["final_loss"] == b["final_loss"]
    c = train(synthetic_shards, VOCAB, replace(cfg, dtype="bfloat16"), tmp_path / "c", log=lambda _: None)
    assert math.isfinite(c["final_loss"]) and c["final_loss"] < c["initial_loss"]
    with pytest.raises(ValueError, match="dtype"):
        train(synthetic_shards, VOCAB, replace(cfg, dtype="float16"), tmp_path / "d")


# ---------------------------------------------------------------- evaluation

def test_bits_per_byte_arithmetic():
    # 2 bits per token, 4 bytes per token -> 0.5 bits per byte
    assert bits_per_byte(2 * math.log(2), n_tokens=1000, n_bytes=4000) == pytest.approx(0.5)
    assert bits_per_byte(math.log(2), 10, 10) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 10, 0)


def test_unigram_entropy():
    assert unigram_entropy(np.array([5, 5, 5, 5, 0])) == pytest.approx(math.log(4))
    assert unigram_entropy(np.array([0, 7])) == 0.0
    p = np.array([0.5, 0.25, 0.25])
    assert unigram_entropy(np.array([2, 1, 1])) == pytest.approx(-(p * np.log(p)).sum())


SENTENCES = [
    "the cat sat on the mat.",
    "the dog sat on the log.",
    "a cat and a dog sat together on the mat.",
    "the bird sang on the branch of the tree.",
] * 5


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    vocab = tok.get_vocab_size()

    def shard(name, texts):
        ids = []
        for t in texts:
            ids += [eot] + tok.encode(t).ids
        write_shard(d / name, np.array(ids, dtype=np.uint16))
        return d / name, len(ids), sum(len(t.encode("utf-8")) for t in texts)

    train_path, _, _ = shard("train.bin", SENTENCES * 20)
    val_path, val_tokens, val_bytes = shard("val.bin", SENTENCES * 3)
    cfg = TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8, max_steps=60,
                      learning_rate=1e-2, min_lr=1e-3, warmup_steps=5, log_every=20, threads=1)
    train([train_path], vocab, cfg, d / "run", log=lambda _: None)
    return d, val_path, val_tokens, val_bytes, vocab


def test_evaluate(text_setup):
    d, val_path, val_tokens, val_bytes, vocab = text_setup
    m = evaluate(d / "run" / "model.pt", [val_path], val_bytes, val_tokens, d / "tokenizer.json",
                 batch_size=4, samples=2, sample_tokens=20, prompts=("", "the cat"))
    json.dumps(m)  # the caller writes it as metrics.json

    # independent recomputation of loss and accuracy over the same windows
    model, _ = load_model(d / "run" / "model.pt")
    windows = list(Shards([val_path]).sequential_windows(16))
    x = torch.stack([w[0] for w in windows])
    y = torch.stack([w[1] for w in windows])
    with torch.no_grad():
        logits, loss = model(x, y)
    assert m["tokens_evaluated"] == len(windows) * 16 == y.numel()
    assert m["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert m["accuracy"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())

    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert m["bits_per_byte"] == pytest.approx(m["loss"] / math.log(2) * val_tokens / val_bytes)
    counts = np.bincount(np.fromfile(val_path, dtype=np.uint16, offset=1024), minlength=vocab)
    p = counts[counts > 0] / counts.sum()
    assert m["unigram_entropy"] == pytest.approx(-(p * np.log(p)).sum())
    assert m["unigram_bits_per_byte"] == pytest.approx(
        m["unigram_entropy"] / math.log(2) * val_tokens / val_bytes)
    # the val text repeats the training sentences: a trained model must beat token frequencies
    assert m["beats_unigram"] is True and m["loss"] < m["unigram_entropy"]

    assert [s["prompt"] for s in m["samples"]] == ["", "", "the cat", "the cat"]
    assert all(isinstance(s["text"], str) for s in m["samples"])
    assert all(s["text"].startswith("the cat") for s in m["samples"][2:])
    assert any(len(s["text"]) > len(s["prompt"]) for s in m["samples"])
    # seeded: the same call gives the same samples
    again = evaluate(d / "run" / "model.pt", [val_path], val_bytes, val_tokens, d / "tokenizer.json",
                     batch_size=4, samples=2, sample_tokens=20, prompts=("", "the cat"))
    assert again["samples"] == m["samples"]
    assert again["loss"] == m["loss"]

    limited = evaluate(d / "run" / "model.pt", [val_path], val_bytes, val_tokens, d / "tokenizer.json",
                       max_tokens=40, samples=0)
    assert limited["tokens_evaluated"] == 32 and limited["samples"] == []
