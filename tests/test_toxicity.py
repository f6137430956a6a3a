"""Toxicity scorers: the real Detoxify class on a tiny checkpoint built here, profanity-check
on real labelled tweets. No network."""
import csv
import random
from pathlib import Path

import pytest

from conftest import shared
from corpus.toxicity import ToxicityModelMissing, load_scorer

# detoxify "original" checkpoint class names, before detoxify standardises them
ORIGINAL_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "you are a wonderful person and I like you",
    "this is a terrible stupid idea and you are an idiot",
    "rain is falling on the quiet town tonight",
    "we will meet at the station after lunch",
    "nobody cares about your opinion, go away",
]


@pytest.fixture(autouse=True)
def _fresh_cache():
    load_scorer.cache_clear()
    yield
    load_scorer.cache_clear()


def _write_tiny_detoxify(root: Path, drop: str = "") -> tuple[Path, Path]:
    """A tiny BERT in detoxify's checkpoint layout plus its local HF config folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    config_dir = root / "config"
    config_dir.mkdir(parents=True)
    # Whole words and single characters: a fixed vocabulary, so scores repeat across processes
    # (a trained WordPiece vocab breaks ties differently from run to run).
    words = sorted({w for s in SENTENCES for w in s.replace(",", " , ").split()} | set("".join(SENTENCES)) - {" "})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    # transformers 5's BertTokenizer ignores vocab_file (all [UNK]): pass the vocab itself.
    BertTokenizer(vocab=vocab).save_pretrained(config_dir)
    # Large initializer_range: a random model whose scores differ visibly between texts.
    config = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128, max_position_embeddings=64,
                        num_labels=len(ORIGINAL_CLASSES), initializer_range=0.2)
    config.save_pretrained(config_dir)
    torch.manual_seed(0)
    state_dict = BertForSequenceClassification(config).state_dict()
    if drop:
        del state_dict[drop]
    ckpt = root / "toxic_original-c1212f89.ckpt"
    # What detoxify.load_checkpoint reads: config.arch.args (passed to get_model_and_tokenizer),
    # config.dataset.args.classes and state_dict. model_type is the hub name, as released.
    torch.save({"config": {
        "arch": {"args": {"model_type": "bert-base-uncased", "model_name": "BertForSequenceClassification",
                          "tokenizer_name": "BertTokenizer", "num_classes": len(ORIGINAL_CLASSES)}},
        "dataset": {"args": {"classes": ORIGINAL_CLASSES}},
    }, "state_dict": state_dict}, ckpt)
    return ckpt, config_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _write_tiny_detoxify(tmp_path_factory.mktemp("detoxify"))


def test_detoxify_scores_in_order_with_real_detoxify(tiny):
    from detoxify import Detoxify

    ckpt, config_dir = tiny
    scorer = load_scorer("detoxify", checkpoint=str(ckpt), config_dir=str(config_dir), batch_size=4)
    assert isinstance(scorer.detox, Detoxify)
    assert scorer.name == "detoxify" and str(ckpt) in scorer.model
    texts = SENTENCES + ["", "fox", "idiot " * 3]
    scores = scorer.score(texts)
    assert len(scores) == len(texts) and all(0.0 <= s <= 1.0 for s in scores)
    alone = [scorer.score([t])[0] for t in texts]
    assert scores == pytest.approx(alone, abs=1e-5)
    assert len({round(s, 4) for s in scores}) > len(texts) // 2, "scores should differ between texts"
    assert scorer.score([]) == []
    assert load_scorer("detoxify", checkpoint=str(ckpt), config_dir=str(config_dir), batch_size=4) is scorer


def test_detoxify_truncates_to_max_tokens(tiny):
    ckpt, config_dir = tiny
    scorer = load_scorer("detoxify", checkpoint=str(ckpt), config_dir=str(config_dir), max_tokens=16)
    assert scorer.detox.tokenizer.model_max_length == 16
    assert scorer.detox.tokenizer.unk_token_id not in scorer.detox.tokenizer("the quick fox")["input_ids"]
    head = "the quick brown fox jumps over the lazy dog and you are a wonderful".split()  # 14 words
    assert len(head) == 14  # + [CLS] + [SEP] = 16 tokens
    a = " ".join(head + ["idiot"] * 100)
    b = " ".join(head + ["rain", "station"] * 100)
    c = " ".join(["idiot"] + head[1:] + ["rain"] * 100)
    sa, sb, sc = scorer.score([a, b, c])
    assert sa == pytest.approx(sb, abs=1e-6)  # differ only after token 16
    assert sa != pytest.approx(sc, abs=1e-6)  # differ inside the first 16 tokens
    # 400 words would overflow the 64 position embeddings without truncation
    assert 0.0 <= scorer.score(["fox " * 400])[0] <= 1.0


def test_detoxify_checkpoint_missing_a_weight_raises(tmp_path):
    ckpt, config_dir = _write_tiny_detoxify(tmp_path, drop="classifier.weight")
    with pytest.raises(ValueError, match="lacks 1 weights.*classifier.weight"):
        load_scorer("detoxify", checkpoint=str(ckpt), config_dir=str(config_dir))


def test_detoxify_missing_files_raise_with_instructions(tmp_path, monkeypatch):
    import torch

    monkeypatch.delenv("C2M_DETOXIFY_CONFIG_DIR", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ToxicityModelMissing) as err:
        load_scorer("detoxify")
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "toxic_original-c1212f89.ckpt") in msg
    assert "https://github.com/unitaryai/detoxify/releases/download/v0.1-alpha/toxic_original-c1212f89.ckpt" in msg
    for needle in ("filter.detoxify_checkpoint", "filter.detoxify_config_dir", "config.json", "bert-base-uncased"):
        assert needle in msg

    with pytest.raises(ToxicityModelMissing, match=str(tmp_path / "nocfg")):
        load_scorer("detoxify", checkpoint=str(tmp_path / "x.ckpt"), config_dir=str(tmp_path / "nocfg"))


def test_auto_falls_back_to_profanity_check_and_off_is_none(tmp_path, monkeypatch):
    import torch

    monkeypatch.delenv("C2M_DETOXIFY_CONFIG_DIR", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    scorer = load_scorer("auto")
    assert scorer.name == "profanity-check" and scorer.model == "alt-profanity-check 1.9.1"
    scorer = load_scorer("auto", checkpoint=str(tmp_path / "x.ckpt"), config_dir=str(tmp_path / "nocfg"))
    assert scorer.name == "profanity-check"
    assert load_scorer("off") is None
    with pytest.raises(ValueError, match="auto, detoxify, profanity-check, off"):
        load_scorer("perspective")
    with pytest.raises(ValueError, match="unknown detoxify model"):
        load_scorer("detoxify", detoxify_model="huge")


def test_auto_finds_default_checkpoint_and_env_config_dir(tiny, tmp_path, monkeypatch):
    import torch

    ckpt, config_dir = tiny
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / ckpt.name).symlink_to(ckpt)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("C2M_DETOXIFY_CONFIG_DIR", str(config_dir))
    scorer = load_scorer("auto")
    assert scorer.name == "detoxify" and ckpt.name in scorer.model


def test_auto_finds_what_fetch_detoxify_saves(tiny, tmp_path, monkeypatch):
    import shutil

    import torch

    from corpus.toxicity import default_config_dir

    ckpt, config_dir = tiny
    monkeypatch.delenv("C2M_DETOXIFY_CONFIG_DIR", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / ckpt.name).symlink_to(ckpt)
    shutil.copytree(config_dir, default_config_dir("original"))  # the layout fetch_detoxify writes
    assert default_config_dir("original") == tmp_path / "hub" / "detoxify-config" / "original"
    assert load_scorer("auto").name == "detoxify"


def test_detoxify_int8_stays_close_to_fp32(tiny):
    ckpt, config_dir = tiny
    fp32 = load_scorer("detoxify", checkpoint=str(ckpt), config_dir=str(config_dir))
    int8 = load_scorer("detoxify", checkpoint=str(ckpt), config_dir=str(config_dir), int8=True)
    assert "int8" in int8.model and "int8" not in fp32.model
    import torch

    modules = list(int8.detox.model.modules())
    assert not any(type(m) is torch.nn.Linear for m in modules)
    assert any(type(m) is torch.ao.nn.quantized.dynamic.Linear for m in modules)
    texts = SENTENCES + ["idiot " * 3, "fox"]
    assert int8.score(texts) == pytest.approx(fp32.score(texts), abs=0.05)


def test_fetch_without_network_fails_in_one_clear_line():
    import subprocess
    import sys

    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "0"}
    proc = subprocess.run([sys.executable, "-m", "corpus.toxicity", "nonexistent-model"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("could not fetch detoxify nonexistent-model")
    assert "Traceback" not in proc.stderr


def test_profanity_check_separates_offensive_tweets():
    from sklearn.metrics import roc_auc_score

    # Davidson et al.: class 0 hate, 1 offensive, 2 neither
    with shared("toxicity-davidson", "labeled_data.csv").open(newline="", encoding="utf-8") as f:
        rows = [(int(r["class"]), r["tweet"]) for r in csv.DictReader(f)]
    rows = random.Random(0).sample(rows, 1000)
    labels = [int(c in (0, 1)) for c, _ in rows]
    scorer = load_scorer("profanity-check")
    scores = scorer.score([t for _, t in rows])
    assert all(0.0 <= s <= 1.0 for s in scores)
    auc = roc_auc_score(labels, scores)
    print(f"profanity-check AUC (hate+offensive vs neither, n=1000): {auc:.3f}")
    assert auc > 0.8
