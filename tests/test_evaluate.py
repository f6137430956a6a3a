"""Evaluation: val metrics, bits per byte, compressor anchors, the checkpoint curve, evaluate()."""
import bz2
import gzip
import json
import lzma
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import zstandard
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import trainer.evaluate as ev
from conftest import shared
from trainer.data import Shards, write_shard
from trainer.evaluate import (EvaluateConfig, bits_per_byte, compressor_sizes, evaluate, evaluate_checkpoints, plot_curve,
                              token_bytes, val_byte_chunks, val_metrics)
from trainer.model import GPT, GPTConfig, load_model

EOT = "<|endoftext|>"
TINY = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_shards(tmp_path, lengths, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i, n in enumerate(lengths):
        paths.append(tmp_path / f"val_{i:06d}.bin")
        write_shard(paths[-1], rng.integers(0, vocab, n).astype(np.uint16))
    return Shards(paths)


def all_windows(shards, block_size, max_tokens=None):
    windows = list(shards.sequential_windows(block_size, max_tokens))
    return torch.stack([w[0] for w in windows]), torch.stack([w[1] for w in windows])


# ---------------------------------------------------------------- val_metrics

def test_val_metrics_equals_one_full_forward(tmp_path):
    torch.manual_seed(0)
    model = GPT(TINY)
    # two shards, with tails too short for another window, so batches straddle shards
    shards = random_shards(tmp_path, [16 * 5 + 7, 16 * 4 + 1])
    x, y = all_windows(shards, 16)
    with torch.no_grad():
        logits, loss = model.eval()(x)[0], model(x, y)[1]

    model.train()
    m = val_metrics(model, shards, batch_size=3, max_tokens=None)
    assert model.training  # given back in the mode it came in
    assert m["tokens"] == 9 * 16 == y.numel()
    assert m["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert m["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-6)
    assert m["accuracy"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    top5 = (logits.topk(5, dim=-1).indices == y.unsqueeze(-1)).any(-1).float().mean().item()
    assert m["top5_accuracy"] == pytest.approx(top5)
    assert m["top5_accuracy"] >= m["accuracy"]
    assert m["top5_accuracy"] > 0  # random tokens over 64 ids: about 5/64 land in the top 5

    # deterministic, and batch size changes nothing but the float64 sum order
    assert val_metrics(model, shards, batch_size=3, max_tokens=None) == m
    assert val_metrics(model, shards, batch_size=8, max_tokens=None)["loss"] == pytest.approx(m["loss"])
    model.eval()
    val_metrics(model, shards, batch_size=3, max_tokens=None)
    assert not model.training

    # max_tokens: whole windows only, the first ones, in order
    limited = val_metrics(model, shards, batch_size=3, max_tokens=40)
    assert limited["tokens"] == 32
    with torch.no_grad():
        _, first_two = model(x[:2], y[:2])
    assert limited["loss"] == pytest.approx(first_two.item(), rel=1e-6)


class FixedModel(nn.Module):
    """Predicts token (x + k) % V with probability P[k - 1]: logits we can reason about by hand."""

    P = [0.4, 0.2, 0.12, 0.1, 0.08, 0.05, 0.03, 0.02]  # offsets 1..7, then 0 (= 8)

    def __init__(self, vocab=8, block_size=4):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=1, n_head=1, n_embd=8)
        log_p = torch.log(torch.tensor(self.P))
        table = torch.stack([torch.roll(log_p, shifts=i + 1) for i in range(vocab)])
        self.table = nn.Parameter(table)  # table[i, (i + k) % V] = log P[k - 1]

    def forward(self, idx, targets=None):
        return self.table[idx], None


def test_val_metrics_on_logits_known_by_hand(tmp_path):
    model = FixedModel()
    assert torch.allclose(model.table.exp().sum(-1), torch.ones(8))
    # steps between consecutive tokens: 6 of +1, 2 of +2, 2 of +5, 2 of +6 (12 targets)
    steps = [1, 1, 2, 1, 5, 6, 1, 1, 2, 5, 1, 6]
    tokens = np.cumsum([3] + steps) % 8
    write_shard(tmp_path / "val.bin", tokens.astype(np.uint16))

    m = val_metrics(model, Shards([tmp_path / "val.bin"]), batch_size=2, max_tokens=None)
    assert m["tokens"] == 12
    expected = -(6 * math.log(0.4) + 2 * math.log(0.2) + 2 * math.log(0.08) + 2 * math.log(0.05)) / 12
    assert m["loss"] == pytest.approx(expected, rel=1e-6)
    assert m["accuracy"] == pytest.approx(6 / 12)  # the +1 steps are the top guess
    assert m["top5_accuracy"] == pytest.approx(10 / 12)  # +1, +2, +5 are in the top 5; +6 is not


def test_val_metrics_under_bf16_autocast(tmp_path):
    torch.manual_seed(0)
    model = GPT(TINY)
    shards = random_shards(tmp_path, [16 * 6 + 1])
    exact = val_metrics(model, shards, 4, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = val_metrics(model, shards, 4, None)
    assert low["tokens"] == exact["tokens"]
    assert low["loss"] == pytest.approx(exact["loss"], abs=0.02)
    assert isinstance(low["loss"], float) and math.isfinite(low["loss"])


def test_val_metrics_too_short_names_the_shard(tmp_path):
    shards = random_shards(tmp_path, [10])
    with pytest.raises(ValueError, match="val_000000.bin"):
        val_metrics(GPT(TINY), shards, 4, None)


# ---------------------------------------------------------------- bits per byte

def test_bits_per_byte_by_hand():
    # 2 bits per token, 4 bytes per token -> 0.5 bits per byte
    assert bits_per_byte(math.log(4), tokens_per_byte=1000 / 4000) == pytest.approx(0.5)
    # 1.5 nats = 2.16404256 bits per token; 300 tokens over 1000 bytes
    assert bits_per_byte(1.5, tokens_per_byte=300 / 1000) == pytest.approx(0.649212768, rel=1e-8)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0.0)


# ---------------------------------------------------------------- compressor anchors

@pytest.fixture(scope="module")
def web_text() -> bytes:
    """About 100 KB of real web prose: the ground-truth main text of WCXB pages."""
    parts, size = [], 0
    for page in sorted(shared("wcxb-dev", "ground-truth").glob("*.json"))[:200]:
        text = json.loads(page.read_text())["ground_truth"].get("main_content", "").encode("utf-8")
        parts.append(text)
        size += len(text)
        if size >= 100_000:
            break
    return b"\n\n".join(parts)[:100_000]


def test_compressor_anchors_match_one_shot_compression(web_text):
    # streamed in odd-sized pieces; the totals must match one-shot compression of the whole
    pieces = [web_text[i:i + 7919] for i in range(0, len(web_text), 7919)]
    n_bytes, sizes = compressor_sizes(pieces)
    assert n_bytes == len(web_text) == 100_000
    direct = {
        "gzip -9": len(gzip.compress(web_text, compresslevel=9)),
        "bzip2 -9": len(bz2.compress(web_text, compresslevel=9)),
        "xz -9": len(lzma.compress(web_text, preset=9)),
        "zstd -19": len(zstandard.ZstdCompressor(level=19).compress(web_text)),
    }
    assert sizes.keys() == direct.keys()
    for name in direct:
        assert sizes[name] == pytest.approx(direct[name], rel=0.01), name
    bpb = {name: 8 * size / n_bytes for name, size in sizes.items()}
    # English web prose: every compressor gets well under 8 bits; the stronger ones beat gzip
    assert all(1.5 < b < 4.5 for b in bpb.values()), bpb
    assert bpb["xz -9"] < bpb["gzip -9"] and bpb["bzip2 -9"] < bpb["gzip -9"]
    assert bpb["zstd -19"] < bpb["gzip -9"]


# ---------------------------------------------------------------- end to end

SENTENCES = [
    "the cat sat on the mat.",
    "the dog sat on the log.",
    "a cat and a dog sat together on the mat.",
    "the bird sang on the branch of the tree — café crème, 日本.",
] * 5


def byte_level_bpe(texts, vocab_size=300):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def test_token_bytes_round_trip():
    tok = byte_level_bpe(SENTENCES)
    table = token_bytes(tok)
    assert table[tok.token_to_id(EOT)] == b""
    for text in set(SENTENCES) | {"unseen words: ßüñ 🙂 and ĳ"}:
        ids = tok.encode(text).ids
        assert b"".join(table[i] for i in ids) == text.encode("utf-8")
    # a character cut between tokens keeps its bytes, where decode() would lose them
    ids = tok.encode("🙂").ids
    assert len(ids) > 1 and "🙂".encode("utf-8").startswith(table[ids[0]])
    assert tok.decode(ids[:1]).encode("utf-8") != table[ids[0]]

    word_level = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="my-tokenizer.json.*byte-level"):
        token_bytes(word_level, "my-tokenizer.json")


def test_val_byte_chunks_are_the_evaluated_targets(tmp_path, monkeypatch):
    tok = byte_level_bpe(SENTENCES)
    eot = tok.token_to_id(EOT)
    ids = []
    for text in SENTENCES:
        ids += [eot] + tok.encode(text).ids
    write_shard(tmp_path / "val.bin", np.array(ids, dtype=np.uint16))
    shards = Shards([tmp_path / "val.bin"])
    monkeypatch.setattr(ev, "COMPRESS_CHUNK_BYTES", 100)  # several chunks
    chunks = list(val_byte_chunks(shards, 16, None, token_bytes(tok)))
    assert len(chunks) > 2
    n_windows = (len(ids) - 1) // 16
    targets = np.array(ids[1:n_windows * 16 + 1])
    assert np.array_equal(np.concatenate([c[1] for c in chunks]), targets)
    # the targets run from the first document's start, separators dropped
    assert "".join(SENTENCES).encode("utf-8").startswith(b"".join(c[0] for c in chunks))


def train_tiny(tok, texts, steps, seed=0):
    """A few AdamW steps on random windows of the texts; returns the model and its config."""
    eot = tok.token_to_id(EOT)
    ids = []
    for text in texts:
        ids += [eot] + tok.encode(text).ids
    data = torch.tensor(ids)
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tok.get_vocab_size(), block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 17, (8,))
        x = torch.stack([data[s:s + 16] for s in starts])
        y = torch.stack([data[s + 1:s + 17] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, config


def save_checkpoint(model, config, step, path):
    from dataclasses import asdict
    torch.save({"model": model.state_dict(), "model_config": asdict(config), "step": step}, path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    tok = byte_level_bpe(SENTENCES)
    tok.save(str(d / "tokenizer.json"))
    eot = tok.token_to_id(EOT)
    ids = []
    for text in SENTENCES * 3:
        ids += [eot] + tok.encode(text).ids
    write_shard(d / "val_000000.bin", np.array(ids, dtype=np.uint16))
    untrained, config = train_tiny(tok, SENTENCES * 20, steps=0)
    save_checkpoint(untrained, config, 0, d / "step0.pt")
    model, config = train_tiny(tok, SENTENCES * 20, steps=60)
    save_checkpoint(model, config, 60, d / "model.pt")
    return d, tok, ids


def test_evaluate_end_to_end(run):
    d, tok, ids = run
    m = evaluate(d / "model.pt", [d / "val_000000.bin"], d / "tokenizer.json",
                 EvaluateConfig(batch_size=4, samples=0, max_tokens=0))
    json.dumps(m)  # the caller writes it as metrics.json

    model, _ = load_model(d / "model.pt")
    x, y = all_windows(Shards([d / "val_000000.bin"]), 16)
    with torch.no_grad():
        logits, loss = model(x)[0], model(x, y)[1]
    assert m["checkpoint_step"] == 60
    assert m["tokens_evaluated"] == y.numel()
    assert m["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert m["accuracy"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    assert m["top5_accuracy"] >= m["accuracy"]

    # the val bytes: the evaluated targets decoded (UTF-8 whole here: the last window ends
    # on an ASCII token in this text), end-of-text separators left out
    targets = y.flatten().tolist()
    text = tok.decode(targets).encode("utf-8")
    assert EOT.encode() not in text
    assert m["bytes_evaluated"] == len(text)
    assert m["tokens_per_byte"] == pytest.approx(len(targets) / len(text))
    assert m["bits_per_byte"] == pytest.approx(m["loss"] / math.log(2) * len(targets) / len(text))

    assert m["compressors"]["gzip -9"] == pytest.approx(8 * len(gzip.compress(text, 9)) / len(text), rel=0.01)
    assert m["compressors"]["xz -9"] == pytest.approx(8 * len(lzma.compress(text, preset=9)) / len(text),
                                                      rel=0.01)
    assert set(m["compressors"]) == {"gzip -9", "bzip2 -9", "xz -9", "zstd -19"}
    assert m["beats_compressors"] == [n for n, b in m["compressors"].items() if m["bits_per_byte"] < b]

    counts = np.bincount(np.array(targets), minlength=tok.get_vocab_size())
    p = counts[counts > 0] / counts.sum()
    assert m["unigram_entropy"] == pytest.approx(-(p * np.log(p)).sum())
    assert m["unigram_bits_per_byte"] == pytest.approx(
        m["unigram_entropy"] / math.log(2) * len(targets) / len(text))
    # the val text repeats the training sentences: a trained model must beat token frequencies
    assert m["beats_unigram"] is True and m["loss"] < m["unigram_entropy"]

    limited = evaluate(d / "model.pt", [d / "val_000000.bin"], d / "tokenizer.json",
                       EvaluateConfig(max_tokens=40, samples=0))
    assert limited["tokens_evaluated"] == 32
    assert limited["bytes_evaluated"] == len(b"".join(token_bytes(tok)[t] for t in targets[:32]))


def test_evaluate_samples(run):
    d, tok, ids = run
    cfg = EvaluateConfig(samples=2, sample_tokens=12, temperature=0.8, top_k=20, top_p=0.9,
                         seed=7, max_tokens=32)
    kw = dict(cfg=cfg, prompts=("", "the cat"))
    m = evaluate(d / "model.pt", [d / "val_000000.bin"], d / "tokenizer.json", **kw)
    assert [s["prompt"] for s in m["samples"]] == ["", "", "the cat", "the cat"]
    assert all(isinstance(s["text"], str) for s in m["samples"])
    assert all(s["text"].startswith("the cat") for s in m["samples"][2:])
    assert any(len(s["text"]) > len(s["prompt"]) for s in m["samples"])
    again = evaluate(d / "model.pt", [d / "val_000000.bin"], d / "tokenizer.json", **kw)
    assert again["samples"] == m["samples"]  # seeded


def test_evaluate_rejects_a_foreign_tokenizer(run, tmp_path):
    d, _, _ = run
    byte_level_bpe(SENTENCES * 3 + ["more words, other merges " * 40], vocab_size=400).save(
        str(tmp_path / "big.json"))
    with pytest.raises(ValueError, match="big.json"):
        evaluate(d / "model.pt", [d / "val_000000.bin"], tmp_path / "big.json", EvaluateConfig(samples=0))


def test_checkpoint_curve_and_plot(run, tmp_path):
    d, tok, ids = run
    final = evaluate(d / "model.pt", [d / "val_000000.bin"], d / "tokenizer.json",
                     EvaluateConfig(samples=0, max_tokens=0))
    curve = evaluate_checkpoints([d / "model.pt", d / "step0.pt"], [d / "val_000000.bin"],
                                 final["tokens_per_byte"], batch_size=4, max_tokens=None)
    assert [r["step"] for r in curve] == [0, 60]
    assert curve[1]["loss"] == pytest.approx(final["loss"])
    assert curve[1]["bits_per_byte"] == pytest.approx(final["bits_per_byte"])
    assert curve[0]["loss"] == pytest.approx(math.log(tok.get_vocab_size()), abs=0.1)  # untrained
    assert curve[0]["loss"] > curve[1]["loss"]
    for r in curve:
        assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2) * final["tokens_per_byte"])
        assert {"accuracy", "top5_accuracy", "perplexity", "tokens"} <= r.keys()

    plot_curve(curve, tmp_path / "curve.png", final["compressors"])
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))
