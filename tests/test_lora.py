"""LoRA fine-tuning (peft): what trains, the merged model, adapter checkpoints, exact resume,
and that it learns a new corpus."""
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from flows.config import ConfigError, load_config
from trainer import launch
from trainer.data import write_shard
from trainer.lora import LoraConfig, add_adapters, merged_state, trainable
from trainer.model import GPT, GPTConfig, load_model
from trainer.train import TrainConfig, train

VOCAB = 64
pytestmark = pytest.mark.usefixtures("one_thread")

BASE_CFG = TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_steps=60,
                       learning_rate=1e-2, min_lr=1e-3, warmup_steps=5, weight_decay=0.0, log_every=5,
                       threads=1, seed=3, dtype="float32", checkpoint_every=0, eval_tokens=512)


def pattern_shards(folder, seed):
    """A repeating random pattern (train) and its first tokens (val): one 'corpus'."""
    folder.mkdir(parents=True, exist_ok=True)
    stream = np.tile(np.random.default_rng(seed).integers(0, VOCAB, size=24), 300).astype(np.uint16)
    write_shard(folder / "train_0.bin", stream)
    write_shard(folder / "val_0.bin", stream[:1000])
    return [folder / "train_0.bin"], [folder / "val_0.bin"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small model trained on corpus A, and a corpus B it has never seen."""
    root = tmp_path_factory.mktemp("lora")
    corpus_a, corpus_b = pattern_shards(root / "a", seed=0), pattern_shards(root / "b", seed=1)
    train(corpus_a[0], VOCAB, BASE_CFG, root / "base", log=lambda _: None, val_shards=corpus_a[1])
    return root / "base" / "model.pt", corpus_b


def lora_cfg(base_path, **kw):
    return replace(BASE_CFG, max_steps=100, learning_rate=1e-2, min_lr=1e-3, checkpoint_every=20,
                   keep_last=10, init_from=str(base_path), lora=LoraConfig(**{"rank": 8, **kw}))


def fine_tune(base, out, cfg=None, **kw):
    base_path, corpus_b = base
    return train(corpus_b[0], VOCAB, cfg or lora_cfg(base_path), out, log=lambda _: None,
                 val_shards=corpus_b[1], init_from=base_path, **kw)


@pytest.fixture(scope="module")
def tuned(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned")
    return out, fine_tune(base, out)


def test_rank_8_trains_under_5_percent_of_the_demo_model():
    demo = load_config("configs/demo.toml").train
    vocab = load_config("configs/demo.toml").tokenizer.vocab_size
    model = GPT(GPTConfig(vocab_size=vocab, block_size=demo.block_size, n_layer=demo.n_layer,
                          n_head=demo.n_head, n_embd=demo.n_embd))
    n_base = model.num_params()
    add_adapters(model, LoraConfig(rank=8))
    n_trainable, n_all = trainable(model)
    # 8 x (in + out) per adapted Linear: qkv, attn.proj, mlp.fc, mlp.proj in every block
    C = demo.n_embd
    assert n_trainable == demo.n_layer * 8 * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert n_all == n_base + n_trainable
    assert n_trainable / n_all < 0.05, f"{n_trainable:,} of {n_all:,}"
    assert all(("lora_" in name) == p.requires_grad for name, p in model.named_parameters())


def test_the_merged_model_is_base_plus_the_scaled_low_rank_update():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=32)
    base_model = GPT(config).eval()
    base_weights = {k: v.clone() for k, v in base_model.state_dict().items()}
    settings = LoraConfig(rank=4, alpha=8.0, targets=["attn.qkv", "mlp.fc"])
    adapted = add_adapters(base_model, settings)
    for name, p in base_model.named_parameters():  # B starts at zero: make the update visible
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    x = torch.randint(0, VOCAB, (3, 32))
    with torch.no_grad():
        adapter_logits = base_model(x)[0]
        merged = GPT(config).eval()
        merged.load_state_dict(merged_state(adapted))
        merged_logits = merged(x)[0]
        # by hand: W + alpha / rank * B @ A in each adapted layer, nothing else changed
        by_hand = dict(base_weights)
        for i in range(config.n_layer):
            for layer in ("attn.qkv", "mlp.fc"):
                module = base_model.get_submodule(f"blocks.{i}.{layer}")
                update = module.lora_B["default"].weight @ module.lora_A["default"].weight
                by_hand[f"blocks.{i}.{layer}.weight"] = base_weights[f"blocks.{i}.{layer}.weight"] + 2.0 * update
        manual = GPT(config).eval()
        manual.load_state_dict(by_hand)
        manual_logits = manual(x)[0]
        base_logits = GPT(config).eval()
        base_logits.load_state_dict(base_weights)
        unchanged = base_logits(x)[0]
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_logits, manual_logits, atol=1e-5, rtol=1e-5)
    assert (merged_logits - unchanged).abs().max() > 1e-2  # the adapters did change the output
    state = merged_state(adapted)
    assert all(torch.equal(state[k], base_weights[k]) for k in base_weights
               if not k.endswith(("qkv.weight", "fc.weight")))


def test_fine_tuning_lowers_the_loss_on_a_new_corpus_and_leaves_the_base_frozen(base, tuned):
    out, stats = tuned
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    assert val[-1] < 0.6 * np.log(VOCAB) < val[0], val  # well below a uniform guess
    parent, _ = load_model(base[0])
    assert stats["n_params"] == parent.num_params()  # the merged model's
    assert stats["lora"]["rank"] == 8 and stats["lora"]["trainable_params"] == 2 * 8 * 16 * 32
    assert stats["lora"]["trainable_share"] == 2 * 8 * 16 * 32 / (stats["n_params"] + 2 * 8 * 16 * 32)
    merged = torch.load(out / "model.pt", weights_only=True)["model"]
    before = parent.state_dict()
    assert merged.keys() == before.keys()
    for name, weight in before.items():
        adapted = name.endswith(("qkv.weight", "proj.weight", "fc.weight"))
        assert torch.equal(merged[name], weight) != adapted, name


def test_checkpoints_hold_the_adapters_and_load_merged(base, tuned, tmp_path):
    out, _ = tuned
    step = out / "checkpoints" / "step_0000020.pt"
    saved = torch.load(step, weights_only=True)
    assert "model" not in saved and saved["base"]["path"] == str(base[0])
    assert all("lora_" in k for k in saved["adapter"])
    assert sum(v.numel() for v in saved["adapter"].values()) == 2 * 8 * 16 * 32  # no base weight
    model, _ = load_model(step)
    final, _ = load_model(out / "model.pt")
    assert type(model) is GPT and model.state_dict().keys() == final.state_dict().keys()
    # the final checkpoint's adapters, merged on loading, are model.pt's weights
    last, _ = load_model(out / "checkpoints" / "step_0000100.pt")
    assert all(torch.equal(last.state_dict()[k], final.state_dict()[k]) for k in final.state_dict())
    # the base is needed, and must be the one the adapters were trained on
    moved = tmp_path / "moved.pt"
    base[0].rename(moved)
    try:
        with pytest.raises(FileNotFoundError, match="adapters only.*base model"):
            load_model(step)
        assert load_model(step, base=moved)[0].state_dict().keys() == final.state_dict().keys()
    finally:
        moved.rename(base[0])
    with pytest.raises(ValueError, match="not the model the adapters"):
        load_model(step, base=out / "model.pt")


def test_resume_is_exact(base, tuned, tmp_path):
    out, stats = tuned
    # dropout on the adapters: resume must also restore the random state
    cfg = lora_cfg(base[0], dropout=0.1)
    whole = fine_tune(base, tmp_path / "whole", cfg)
    fine_tune(base, tmp_path / "split", cfg, stop_after=40)
    resumed = fine_tune(base, tmp_path / "split", cfg, resume=True)
    assert resumed["resumed_from"].endswith("step_0000040.pt")
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["adapter"][k], b["adapter"][k]) for k in a["adapter"])
    assert whole["val_loss"] == resumed["val_loss"]
    # dropout made a difference, so the test above could fail
    assert not torch.equal(a["model"]["blocks.0.attn.qkv.weight"],
                           torch.load(out / "model.pt", weights_only=True)["model"]["blocks.0.attn.qkv.weight"])


def test_resuming_with_other_lora_settings_is_refused(base, tuned, tmp_path):
    out, _ = tuned
    full = replace(lora_cfg(base[0]), lora=LoraConfig())
    with pytest.raises(ValueError, match="lora.rank 8, this run has 0"):
        fine_tune(base, out, full, resume=True)


def test_config_and_command_line(base, tmp_path):
    with pytest.raises(ConfigError, match="lora.rank > 0 fine-tunes a trained model.*init_from"):
        load_config("configs/demo.toml", {"train.lora.rank": 8})
    with pytest.raises(ConfigError, match=r"train.lora.targets = \['lm_head'\]: should be a list of"):
        load_config("configs/demo.toml", {"train.lora.targets": '["lm_head"]', "train.init_from": "x"})
    cfg = replace(lora_cfg(base[0], alpha=4.0, targets=["mlp.fc"]), max_steps=2, checkpoint_every=0)
    # the DDP launcher passes nested settings as dotted keys, which the train CLI reads back
    cmd = launch.command(base[1][0], VOCAB, cfg, tmp_path / "cli", val_shards=None,
                         val_tokens_per_byte=None, init_from=base[0], resume=False, stop_after=None)
    assert "lora.targets=[\"mlp.fc\"]" in cmd and "lora.alpha=4.0" in cmd
    train_args = cmd[cmd.index("trainer.train") + 1:]  # what each torchrun process gets
    out = subprocess.run([sys.executable, "-m", "trainer.train", *train_args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])["result"]
    assert result["lora"]["alpha"] == 4.0 and result["lora"]["targets"] == ["mlp.fc"]
    assert result["lora"]["trainable_params"] == 2 * 8 * (32 + 4 * 32)
    bad = subprocess.run([sys.executable, "-m", "trainer.train", "--shards", str(base[1][0][0]),
                          "--vocab-size", str(VOCAB), "--out", str(tmp_path / "bad"), "--set", "lora.rank=8"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "init_from" in bad.stderr
