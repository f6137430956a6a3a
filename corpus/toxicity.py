"""Toxicity scorers: detoxify (a BERT-family classifier) or profanity-check (a linear model).

`load_scorer(kind, ...)` returns an object with `score(texts) -> list[float]`, a toxicity
probability in [0, 1] per text, or None for kind "off".

detoxify offline: its weights come from GitHub releases (torch.hub) and its model config and
tokenizer from the Hugging Face hub, and `Detoxify` calls `from_pretrained(<hub name stored in
the checkpoint>)` even when given `huggingface_config_path`. So we load the checkpoint, point
its `config.arch.args.model_type` at a local folder holding config.json + tokenizer files, and
hand the patched checkpoint to the real `Detoxify` class.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Protocol

# Before any transformers import: otherwise every hub lookup retries for ~25 s offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

KINDS = ("auto", "detoxify", "profanity-check", "off")
CONFIG_DIR_ENV = "C2M_DETOXIFY_CONFIG_DIR"
log = logging.getLogger(__name__)


class ToxicityModelMissing(RuntimeError):
    """The detoxify checkpoint or its local Hugging Face config folder is not there."""


class Scorer(Protocol):
    name: str
    model: str

    def score(self, texts: list[str]) -> list[float]: ...


def _first_words(text: str, n: int) -> str:
    # Every whitespace word yields at least one token, so n words hold the first n tokens;
    # cutting here keeps tokenizing (and length-sorting) cheap for long documents.
    return " ".join(text.split(maxsplit=n)[:n])


class ProfanityScorer:
    name = "profanity-check"

    def __init__(self, max_tokens: int = 256):
        from importlib.metadata import version

        from profanity_check import predict_prob

        self._predict_prob = predict_prob
        self.max_tokens = max_tokens
        self.model = f"alt-profanity-check {version('alt-profanity-check')}"

    def score(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        cut = [_first_words(t, self.max_tokens) for t in texts]
        return [float(p) for p in self._predict_prob(cut)]


class DetoxifyScorer:
    """The real `detoxify.Detoxify`, loaded offline, scoring in length-sorted batches.

    The score is the "toxicity" output (every released detoxify model has one); for a
    checkpoint without it, the max over outputs whose name contains "toxic".
    """

    name = "detoxify"

    def __init__(self, checkpoint: str, config_dir: str, detoxify_model: str = "original",
                 max_tokens: int = 256, batch_size: int = 32, int8: bool = False):
        import torch
        from detoxify import Detoxify

        device = "cuda" if torch.cuda.is_available() else "cpu"
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)  # no pickle code from a downloaded file
        if "config" not in ckpt or "state_dict" not in ckpt:
            raise ValueError(f"{checkpoint} is not a detoxify checkpoint (needs 'config' and 'state_dict')")
        ckpt["config"]["arch"]["args"]["model_type"] = str(config_dir)
        provided = list(ckpt["state_dict"])
        # Detoxify loads its checkpoint with torch.load, which takes a file object: an
        # in-memory copy avoids writing a patched 400 MB file next to the user's.
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        del ckpt
        buf.seek(0)
        self.detox = Detoxify(checkpoint=buf, device=device)
        del buf

        # A missing weight would load silently as random values: refuse instead.
        model = self.detox.model
        prefix = model.base_model_prefix + "."
        provided = {_canonical_key(k, prefix) for k in provided}
        missing = sorted(k for k in model.state_dict() if _canonical_key(k, prefix) not in provided)
        if missing:
            raise ValueError(f"detoxify checkpoint {checkpoint} lacks {len(missing)} weights of "
                             f"{type(model).__name__}, e.g. {missing[:5]}")

        limit = getattr(model.config, "max_position_embeddings", max_tokens)
        # Detoxify.predict tokenizes with truncation=True, i.e. to model_max_length.
        self.detox.tokenizer.model_max_length = min(max_tokens, limit)
        if int8:
            # Linear layers in int8, weights quantised once, activations per batch: ~3x
            # faster on CPU. Measure agreement with fp32 first (benchmarks/toxicity.py --int8).
            with warnings.catch_warnings():  # deprecated for torchao; works in torch 2.13
                warnings.simplefilter("ignore")
                self.detox.model = torch.ao.quantization.quantize_dynamic(
                    self.detox.model, {torch.nn.Linear}, dtype=torch.qint8)
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.model = f"detoxify {detoxify_model}{' int8' if int8 else ''} ({checkpoint})"

    def score(self, texts: list[str]) -> list[float]:
        import torch

        cut = [_first_words(t, self.max_tokens) for t in texts]
        # Sorting by length keeps each batch about one length, so padding stays small.
        order = sorted(range(len(cut)), key=lambda i: len(cut[i]))
        scores = [0.0] * len(cut)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                for i, s in zip(idx, self._toxicity(self.detox.predict([cut[i] for i in idx]))):
                    scores[i] = float(s)
        return scores

    @staticmethod
    def _toxicity(out: dict) -> list[float]:
        # predict() squeezes its output: a batch of one gives floats instead of lists.
        out = {k: v if isinstance(v, list) else [v] for k, v in out.items()}
        if "toxicity" in out:
            return out["toxicity"]
        cols = [v for k, v in out.items() if "toxic" in k]
        if not cols:
            raise ValueError(f"detoxify model has no toxicity output among {list(out)}")
        return [max(row) for row in zip(*cols)]


def _canonical_key(key: str, base_prefix: str) -> str:
    # transformers renames legacy LayerNorm gamma/beta and adds or drops the base model
    # prefix ("bert.") on load; compare keys modulo both.
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    return key.removeprefix(base_prefix)


def detoxify_paths(detoxify_model: str = "original", checkpoint: str = "",
                   config_dir: str = "") -> tuple[Path, Path | None, str]:
    """(checkpoint path, config folder or None, download URL of the checkpoint)."""
    from detoxify.detoxify import MODEL_URLS

    if detoxify_model not in MODEL_URLS:
        raise ValueError(f"unknown detoxify model {detoxify_model!r}; valid: {sorted(MODEL_URLS)}")
    url = MODEL_URLS[detoxify_model]
    if not checkpoint:
        import torch

        # Where detoxify's torch.hub.load_state_dict_from_url caches the download.
        checkpoint = os.path.join(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[1])
    config_dir = config_dir or os.environ.get(CONFIG_DIR_ENV, "") or str(default_config_dir(detoxify_model))
    return Path(checkpoint), Path(config_dir), url


def default_config_dir(detoxify_model: str) -> Path:
    """Where `fetch_detoxify` saves the HF config and tokenizer, and where `auto` looks."""
    import torch

    return Path(torch.hub.get_dir()) / "detoxify-config" / detoxify_model


def fetch_detoxify(detoxify_model: str = "original") -> tuple[Path, Path]:
    """Download the checkpoint into the torch hub cache and save its HF config and
    tokenizer beside it; needs internet (run `c2m fetch-detoxify`, which turns the
    offline switches off for this one process). Returns (checkpoint, config folder)."""
    import torch

    ckpt_path, _, url = detoxify_paths(detoxify_model)
    config_dir = default_config_dir(detoxify_model)
    if not ckpt_path.is_file():
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(ckpt_path), progress=True)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hub_name = ckpt["config"]["arch"]["args"]["model_type"]
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.from_pretrained(hub_name).save_pretrained(config_dir)
    AutoTokenizer.from_pretrained(hub_name).save_pretrained(config_dir)
    return ckpt_path, config_dir


def _missing_detoxify(ckpt: Path, config_dir: Path, url: str) -> str:
    """What is missing and how to provide it; '' when everything is there."""
    problems = []
    if not ckpt.is_file():
        problems.append(
            f"detoxify checkpoint not found at {ckpt}. On a machine with internet run "
            f"`c2m fetch-detoxify` (it saves the checkpoint and its config there), or download "
            f"{url} yourself (`curl -L -o {ckpt} {url}`), or set the config key "
            f"filter.detoxify_checkpoint to its path.")
    if not (config_dir / "config.json").is_file() or not (config_dir / "tokenizer_config.json").is_file():
        where = f"{config_dir} has no config.json/tokenizer_config.json (set it with the config "\
                f"key filter.detoxify_config_dir or env {CONFIG_DIR_ENV})"
        problems.append(
            f"detoxify's Hugging Face config folder is missing: {where}. `c2m fetch-detoxify` "
            f"saves it there. By hand: it must hold the base model's config.json and tokenizer "
            f"files, e.g. for 'original' run "
            f"`AutoConfig.from_pretrained('bert-base-uncased').save_pretrained(DIR)` and "
            f"`AutoTokenizer.from_pretrained('bert-base-uncased').save_pretrained(DIR)` on a "
            f"machine with internet, then set filter.detoxify_config_dir to DIR.")
    return "\n".join(problems)


@functools.lru_cache(maxsize=None)  # one load per process: filter partitions call this often
def load_scorer(kind: str, *, detoxify_model: str = "original", checkpoint: str = "",
                config_dir: str = "", max_tokens: int = 256, batch_size: int = 32,
                int8: bool = False) -> Scorer | None:
    """kind: "detoxify", "profanity-check", "auto" (detoxify when its files are there,
    else profanity-check) or "off" (None)."""
    if kind not in KINDS:
        raise ValueError(f"unknown toxicity scorer {kind!r}; valid: {', '.join(KINDS)}")
    if kind == "off":
        return None
    if kind == "profanity-check":
        return ProfanityScorer(max_tokens)
    ckpt, cfg, url = detoxify_paths(detoxify_model, checkpoint, config_dir)
    missing = _missing_detoxify(ckpt, cfg, url)
    if missing:
        if kind == "auto":
            log.warning("toxicity: detoxify unavailable, using profanity-check.\n%s", missing)
            return ProfanityScorer(max_tokens)
        raise ToxicityModelMissing(missing)
    return DetoxifyScorer(str(ckpt), str(cfg), detoxify_model, max_tokens, batch_size, int8)


if __name__ == "__main__":  # `c2m fetch-detoxify` runs this with the offline switches off
    import sys

    model_name = sys.argv[1] if len(sys.argv) > 1 else "original"
    try:
        checkpoint, config = fetch_detoxify(model_name)
    except Exception as exc:  # one line, not a traceback: the caller explains what to do
        sys.exit(f"could not fetch detoxify {model_name}: {type(exc).__name__}: {exc}")
    print(f"checkpoint: {checkpoint}\nconfig:     {config}")
