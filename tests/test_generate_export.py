"""Generation with the KV cache (trainer/generate.py) and the Hugging Face export (trainer/export.py)."""
from __future__ import annotations

import time
from dataclasses import asdict

import pytest
import torch

import trainer.generate as generate
from corpus.tokenizer import EOT, train_bpe
from trainer.export import export_hf
from trainer.generate import (generate_ids, generate_texts, sample_next, top_k_filter,
                              top_p_filter)
from trainer.model import GPT, GPTConfig, load_model

TEXTS = [
    "The river ran past the old mill, and the miller watched the water turn the wheel.",
    "A small bird sang on the fence while the farmer counted his sheep in the morning light.",
    "Numbers like 1234 and 56.78 appear in text, as do symbols: #, %, & and the odd emoji \u2603.",
    "She wrote letters every Sunday; each one began with the weather and ended with a question.",
] * 5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt(*, vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True, seed=0,
             weight_std=0.3) -> GPT:
    """A random model whose biases and LayerNorm gains are not the init's zeros and ones,
    so an export that dropped or misplaced them would show in the logits. Weights larger
    than the init's make greedy decoding wander instead of repeating one token."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer,
                          n_head=n_head, n_embd=n_embd, bias=bias))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, weight_std)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 1:  # LayerNorm gain
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def uncached_greedy(model: GPT, prompt_ids: list[int], max_new_tokens: int):
    """The reference: every step runs the whole context (cropped to block_size) from scratch."""
    ids, all_logits = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(torch.tensor([ids[-model.config.block_size:]]))
            all_logits.append(logits[0, -1])
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids):], all_logits


def test_cached_greedy_equals_uncached_past_block_size(monkeypatch):
    model = tiny_gpt(block_size=16)
    seen_logits = []

    def recording_sample_next(logits, *args):
        seen_logits.append(logits)
        return sample_next(logits, *args)

    monkeypatch.setattr(generate, "sample_next", recording_sample_next)
    prompt = [5, 17, 42, 7, 99]
    new_ids = generate_ids(model, prompt, max_new_tokens=40, temperature=0)  # 45 > 16 tokens
    expected_ids, expected_logits = uncached_greedy(model, prompt, 40)
    assert new_ids == expected_ids
    assert len(set(new_ids)) > 5  # a real sequence, not one token repeated
    assert len(seen_logits) == 40
    for step, (got, want) in enumerate(zip(seen_logits, expected_logits)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"logits differ at step {step}")


def test_forward_cached_prompt_then_tokens_equals_forward():
    model = tiny_gpt(block_size=16)
    idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    full, _ = model(idx)
    with torch.no_grad():
        first, cache = model.forward_cached(idx[:, :5])  # several tokens at once, then more
        rest, cache = model.forward_cached(idx[:, 5:9], cache)
        last, cache = model.forward_cached(idx[:, 9:], cache)
    torch.testing.assert_close(torch.cat([first, rest, last], dim=1), full, atol=1e-5, rtol=0)
    assert cache[0][0].shape == (2, 2, 12, 16)
    with pytest.raises(ValueError, match="block_size"):
        model.forward_cached(idx[:, :5], cache)


def test_top_p_keeps_smallest_nucleus_hand_built():
    probs = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05])
    logits = probs.log()
    kept = lambda p: set(torch.nonzero(top_p_filter(logits, p) > float("-inf")).flatten().tolist())
    assert kept(0.4) == {1}
    assert kept(0.75) == {1, 3}
    assert kept(0.85) == {1, 3, 0}
    assert kept(0.97) == {0, 1, 2, 3, 4}
    # sampling only ever draws from the nucleus, and from all of it
    generator = torch.Generator().manual_seed(0)
    drawn = {sample_next(logits, 1.0, None, 0.75, generator) for _ in range(300)}
    assert drawn == {1, 3}


def test_top_p_nucleus_properties_random():
    generator = torch.Generator().manual_seed(3)
    for _ in range(50):
        logits = torch.randn(40, generator=generator) * 2
        p = float(torch.rand(1, generator=generator)) * 0.98 + 0.01
        probs = logits.softmax(-1)
        keep = top_p_filter(logits, p) > float("-inf")
        mass = probs[keep].sum()
        assert mass >= p - 1e-6
        assert mass - probs[keep].min() < p  # without its least likely token it falls short
        if (~keep).any():
            assert probs[keep].min() >= probs[~keep].max()


def test_top_k_and_greedy():
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.9])
    assert (top_k_filter(logits, 2) > float("-inf")).nonzero().flatten().tolist() == [1, 3]
    assert torch.equal(top_k_filter(logits, 10), logits)
    generator = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, 2, None, generator) for _ in range(200)} == {1, 3}
    assert {sample_next(logits, 0.0, None, None, generator) for _ in range(5)} == {1}
    model = tiny_gpt()
    for bad in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate_ids(model, [1], max_new_tokens=2, **bad)
    with pytest.raises(ValueError, match="empty"):
        generate_ids(model, [], max_new_tokens=2)


def test_stop_id_ends_generation():
    model = tiny_gpt()
    ids = generate_ids(model, [3, 4], max_new_tokens=20, temperature=0)
    stop = ids[len(ids) // 2]
    assert generate_ids(model, [3, 4], max_new_tokens=20, temperature=0, stop_id=stop) \
        == ids[:ids.index(stop)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXTS, vocab_size=300, min_frequency=1)


def test_generate_texts_seeded(tokenizer):
    model = tiny_gpt(vocab_size=tokenizer.get_vocab_size())
    kwargs = dict(n=2, max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95)
    first = generate_texts(model, tokenizer, ["The river", ""], seed=7, **kwargs)
    assert [s["prompt"] for s in first] == ["The river", "The river", "", ""]
    assert all(s["text"].startswith(s["prompt"]) and len(s["text"]) > len(s["prompt"]) for s in first)
    assert generate_texts(model, tokenizer, ["The river", ""], seed=7, **kwargs) == first
    others = [generate_texts(model, tokenizer, ["The river", ""], seed=s, **kwargs) for s in (8, 9)]
    assert all(other != first for other in others)


def test_speed_cached_vs_uncached():
    model = tiny_gpt(vocab_size=300, block_size=256, n_layer=4, n_head=4, n_embd=128)
    n = 200
    t0 = time.perf_counter()
    cached = generate_ids(model, [1], max_new_tokens=n, temperature=0)
    t1 = time.perf_counter()
    uncached, _ = uncached_greedy(model, [1], n)
    t2 = time.perf_counter()
    assert cached == uncached
    print(f"\n{n} tokens, 4x128 model, block 256: cached {n / (t1 - t0):.0f} tok/s, "
          f"uncached {n / (t2 - t1):.0f} tok/s, speed-up {(t2 - t1) / (t1 - t0):.1f}x")


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*model_config"):
        load_model(tmp_path / "other.pt")


@pytest.mark.parametrize("bias", [True, False])
def test_export_hf_matches_our_model(tmp_path, tokenizer, bias, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_gpt(vocab_size=tokenizer.get_vocab_size(), block_size=32, bias=bias)
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config)}, tmp_path / "model.pt")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    out = export_hf(tmp_path / "model.pt", tmp_path / "tokenizer.json", tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    hf_model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    eot = tokenizer.token_to_id(EOT)
    assert hf_tokenizer.eos_token_id == eot and hf_tokenizer.model_max_length == 32
    text = "The miller wrote 1234 letters \u2603 on Sunday."
    ids = tokenizer.encode(text).ids
    assert hf_tokenizer(text)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == text

    idx = torch.tensor([[eot] + ids])
    ours, _ = model(idx)
    with torch.no_grad():
        theirs = hf_model(idx).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    prompt = [eot] + ids[:4]
    with torch.no_grad():
        hf_out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   max_new_tokens=8, do_sample=False, pad_token_id=eot)
    hf_ids = hf_out[0, len(prompt):].tolist()
    if hf_ids[-1] == eot:  # HF keeps the end token, generate_ids stops before it
        hf_ids = hf_ids[:-1]
    assert len(hf_ids) >= 4  # enough tokens to compare
    assert generate_ids(model, prompt, max_new_tokens=8, temperature=0, stop_id=eot) == hf_ids


def test_export_hf_refuses_foreign_folder(tmp_path, tokenizer):
    model = tiny_gpt(vocab_size=tokenizer.get_vocab_size())
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config)}, tmp_path / "model.pt")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        export_hf(tmp_path / "model.pt", tmp_path / "tokenizer.json", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
