"""The masked-LM objective (trainer/masked.py): BERT's masking, the bidirectional encoder,
training and exact resume, deterministic evaluation, the Megatron-BERT export, and
c2m compare's refusal. The flow with train.objective = masked and the CLI's refusals are
tested in test_flow.py (test_masked_objective_through_the_flow), on its tiny-corpus run."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from corpus.tokenizer import train_bpe
from trainer import masked
from trainer.data import write_shard
from trainer.evaluate import EvaluateConfig, evaluate
from trainer.export import export_hf
from trainer.model import GPT, GPTConfig, chunked_cross_entropy, load_model
from trainer.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "The river ran past the old mill, and the miller watched the water turn the wheel.",
    "A small bird sang on the fence while the farmer counted his sheep in the morning light.",
    "She wrote letters every Sunday; each one began with the weather and ended with a question.",
    "Numbers like 1234 and 56.78 appear in text, as do symbols: #, %, & and the odd emoji \u2603.",
]


def encoder(vocab_size=65, block_size=32, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                         causal=False, **kw))


# ---------------------------------------------------------------- masking

def test_bert_masking_statistics():
    V, T, B = 1000, 64, 4000
    mask_id = V - 1
    x = torch.from_numpy(np.random.default_rng(0).integers(0, mask_id, (B, T)))
    inputs, targets, positions = masked.mask_windows(x, mask_id, masked.eval_rngs(0, B))
    k = round(0.15 * T)
    assert positions.shape == targets.shape == (B, k)
    assert all(len(set(row.tolist())) == k for row in positions[:50])  # k distinct positions
    assert torch.equal(targets, x.gather(1, positions))
    chosen = torch.zeros_like(x, dtype=torch.bool).scatter_(1, positions, True)
    assert torch.equal(inputs[~chosen], x[~chosen])  # the others are untouched
    # every position is chosen about as often: 15% each
    per_position = chosen.float().mean(0)
    assert per_position.min() > 0.13 and per_position.max() < 0.17
    new = inputs.gather(1, positions)
    n = new.numel()
    as_mask = (new == mask_id).sum().item() / n
    random = ((new != mask_id) & (new != targets)).sum().item() / n
    kept = (new == targets).sum().item() / n
    assert abs(as_mask - 0.8) < 0.01
    assert abs(random - 0.1 * (1 - 1 / mask_id)) < 0.01  # a random token may be the original
    assert abs(kept - 0.1) < 0.01
    assert new.max() <= mask_id and not (new[new != mask_id] == mask_id).any()
    # the same generators, the same masks; another window index, others
    again = masked.mask_windows(x[:8], mask_id, masked.eval_rngs(0, 8))
    assert all(torch.equal(a, b[:8]) for a, b in zip(again, (inputs, targets, positions)))
    other = masked.mask_windows(x[:8], mask_id, masked.eval_rngs(8, 8))
    assert not torch.equal(other[2], positions[:8])
    # a window too short for 15% still gets one masked position
    assert masked.mask_windows(x[:2, :3], mask_id, masked.eval_rngs(0, 2))[2].shape == (2, 1)


def test_loss_is_on_the_masked_positions_only():
    model = encoder()
    with torch.no_grad():
        model.mlm_bias.normal_()  # a bias that is not zero must reach the loss and its gradient
    x = torch.randint(0, 64, (4, 32))
    inputs, targets, positions = masked.mask_windows(x, 64, masked.eval_rngs(0, 4))
    _, loss = model(inputs, targets, positions)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model.head(model.hidden_states(inputs)[0])  # every position's logits
    picked = logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.size(-1)))
    reference = F.cross_entropy(picked.reshape(-1, 65), targets.reshape(-1))
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    everywhere = F.cross_entropy(logits.reshape(-1, 65), x.reshape(-1))
    assert abs(everywhere.item() - loss.item()) > 1e-3  # not the loss over all positions
    # the chunked head with a bias, chunk boundaries inside the rows, under bf16 autocast too
    h, w, b = torch.randn(37, 8), torch.randn(11, 8), torch.randn(11)
    t = torch.randint(0, 11, (37,))
    torch.testing.assert_close(chunked_cross_entropy(h, w, t, chunk=5, bias=b),
                               F.cross_entropy(F.linear(h, w, b), t))


def test_the_encoder_sees_both_ways_the_decoder_only_back():
    idx = torch.randint(0, 64, (1, 20))
    changed = idx.clone()
    changed[0, 15] = (changed[0, 15] + 1) % 64
    for causal in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32,
                              causal=causal)).eval()
        with torch.no_grad():
            a, b = model(idx)[0], model(changed)[0]
        earlier_moved = not torch.allclose(a[0, :15], b[0, :15])
        assert earlier_moved == (not causal)
    assert not hasattr(GPT(GPTConfig(vocab_size=65, block_size=8, n_layer=1, n_head=1, n_embd=8)),
                       "mlm_dense")  # a causal model has no MLM head


def test_flops_per_token_counts_the_head_on_masked_positions_only():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from trainer import perf

    model = encoder(block_size=20)
    x = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(0))
    batch = masked.mask_windows(x, 64, masked.eval_rngs(0, 3))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(*batch)
        loss.backward()
    assert counter.get_total_flops() / x.numel() == pytest.approx(perf.flops_per_token(model.config, 20))


def test_an_old_checkpoint_without_the_causal_key_loads_causal(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=8, n_layer=1, n_head=1, n_embd=8))
    config = asdict(model.config)
    del config["causal"]
    torch.save({"model": model.state_dict(), "model_config": config}, tmp_path / "old.pt")
    loaded, _ = load_model(tmp_path / "old.pt")
    assert loaded.config.causal


# ---------------------------------------------------------------- training and evaluation

@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """A real BPE tokenizer, and shards of a 24-token pattern of its ids repeated: each
    token follows from its neighbours, so a tiny encoder learns to fill in within steps."""
    d = tmp_path_factory.mktemp("masked-data")
    tok = train_bpe(TEXTS * 5, vocab_size=300, min_frequency=1)
    tok.save(str(d / "tokenizer.json"))
    pattern = np.random.default_rng(0).integers(0, tok.get_vocab_size(), 24)
    stream = np.tile(pattern, 500).astype(np.uint16)
    write_shard(d / "train_0.bin", stream[:-2000])
    write_shard(d / "val_0.bin", stream[-2000:])
    return d, tok.get_vocab_size()


CFG = TrainConfig(objective="masked", n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8,
                  max_steps=40, learning_rate=1e-2, min_lr=1e-3, warmup_steps=5, weight_decay=0.0,
                  log_every=5, threads=1, seed=3, dtype="float32", checkpoint_every=20, eval_tokens=1024)


@pytest.fixture(scope="module")
def trained(text_data, tmp_path_factory):
    d, vocab = text_data
    out = tmp_path_factory.mktemp("masked-run")
    lines = []
    stats = train([d / "train_0.bin"], vocab, CFG, out, log=lines.append, val_shards=[d / "val_0.bin"],
                  val_tokens_per_byte=0.3)
    return out, stats, lines


def test_training_lowers_the_masked_loss(trained, text_data):
    out, stats, lines = trained
    _, vocab = text_data
    model, ckpt = load_model(out / "model.pt")
    assert not model.config.causal and model.config.vocab_size == vocab + 1
    assert ckpt["model_config"]["causal"] is False and ckpt["train_config"]["objective"] == "masked"
    assert abs(stats["initial_loss"] - math.log(vocab + 1)) < 0.3
    assert stats["final_loss"] < 0.6 * stats["initial_loss"]
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [r["step"] for r in val] == [19, 39]
    assert "val_bits_per_byte" not in val[0]  # a masked loss is no code length of the text
    assert val[-1]["val_tokens"] == (1024 // 32) * round(0.15 * 32)  # masked positions of the val windows
    assert val[-1]["val_accuracy"] > 0.3 and val[-1]["val_loss"] < val[0]["val_loss"]
    assert any(line.startswith("val") and "masked-token loss" in line for line in lines)


def test_masked_resume_is_bit_identical(text_data, tmp_path):
    d, vocab = text_data
    cfg = replace(CFG, max_steps=10, checkpoint_every=4, keep_last=5, dropout=0.1, log_every=3)
    kw = dict(val_shards=[d / "val_0.bin"], log=lambda _: None)
    whole = train([d / "train_0.bin"], vocab, cfg, tmp_path / "whole", **kw)
    out = tmp_path / "killed"
    train([d / "train_0.bin"], vocab, cfg, out, stop_after=6, **kw)
    resumed = train([d / "train_0.bin"], vocab, cfg, out, resume=True, **kw)
    assert resumed["resumed_from"].endswith("step_0000004.pt")
    assert resumed["final_loss"] == whole["final_loss"]
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["model"]
    b = torch.load(out / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a causal run may not continue a masked one's checkpoints
    with pytest.raises(ValueError, match="objective"):
        train([d / "train_0.bin"], vocab, replace(cfg, objective="causal", max_steps=12), out, resume=True,
              **kw)


def test_evaluate_reports_masked_figures_deterministically(trained, text_data):
    out, stats, _ = trained
    d, _ = text_data
    cfg = EvaluateConfig(batch_size=4, max_tokens=1024, samples=2, sample_tokens=24)
    first = evaluate(out / "model.pt", [d / "val_0.bin"], d / "tokenizer.json", cfg)
    again = evaluate(out / "model.pt", [d / "val_0.bin"], d / "tokenizer.json", cfg)
    assert first == again  # fixed masks: the same figures, exactly
    assert first["objective"] == "masked" and first["loss"] == pytest.approx(stats["val_loss"], rel=1e-5)
    assert "bits_per_byte" not in first and "compressors" not in first and "bits per byte" in first["left_out"]
    assert first["tokens_evaluated"] == (1024 // 32) * round(0.15 * 32) and first["window_tokens"] == 1024
    assert first["beats_unigram"] and first["accuracy"] > 0.3
    other_batch = evaluate(out / "model.pt", [d / "val_0.bin"], d / "tokenizer.json", replace(cfg, batch_size=7))
    assert other_batch["loss"] == pytest.approx(first["loss"], rel=1e-6)  # masks do not depend on batches
    assert other_batch["accuracy"] == first["accuracy"]
    sample = first["samples"][0]
    assert sample["prompt"].count(masked.MASK) == sample["masked"] == round(0.15 * 24)
    assert masked.MASK not in sample["text"] and 0 <= sample["correct"] <= sample["masked"]
    assert sample["text"].count("⟦") == sample["answer"].count("⟦") == sample["masked"]


# ---------------------------------------------------------------- export

def test_export_is_megatron_bert_with_our_logits(tmp_path, text_data, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline
    from tokenizers import Tokenizer

    d, vocab = text_data
    model = encoder(vocab_size=vocab + 1, block_size=32, seed=1)
    with torch.no_grad():  # no init zeros or ones left: a dropped or misplaced tensor shows
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 2 else 0.1))
    model.eval()
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config)}, tmp_path / "model.pt")
    out = export_hf(tmp_path / "model.pt", d / "tokenizer.json", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MegatronBertForMaskedLM"]

    hf_model = AutoModelForMaskedLM.from_pretrained(out, local_files_only=True).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tokenizer.mask_token == masked.MASK and hf_tokenizer.mask_token_id == vocab
    text = f"The river ran past the old {masked.MASK}, and the miller watched the water."
    ids = hf_tokenizer(text)["input_ids"]
    tok = masked.with_mask_token(Tokenizer.from_file(str(d / "tokenizer.json")), model.config)
    assert ids == tok.encode(text).ids and vocab in ids
    idx = torch.tensor([ids])
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf_model(idx).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    fill = pipeline("fill-mask", model=hf_model, tokenizer=hf_tokenizer, device="cpu", top_k=3)
    guesses = fill(text)
    assert len(guesses) == 3
    at = ids.index(vocab)
    assert guesses[0]["token"] == int(ours[0, at].argmax())


# ---------------------------------------------------------------- compare

def test_compare_refuses_masked_variants():
    from flows.compare import check_comparable, variants_from
    from flows.config import ConfigError

    variants = variants_from([{"train.objective": "masked"}, {"train.objective": "masked", "train.seed": 2}],
                             base="configs/demo.toml")
    with pytest.raises(ConfigError, match="V1, V2 set train.objective = masked"):
        check_comparable(variants, [v.load({}) for v in variants], seeds=1)
