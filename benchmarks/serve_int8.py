"""int8 dynamic quantisation for `c2m serve --int8`: generation speed and val loss, float32 against int8.

The model is a train artifact (default: the store's LATEST, read only); the int8 model is
trainer.http_api.quantize_int8 of it (torch.ao.quantization.quantize_dynamic on every
nn.Linear, lm_head included), as the server builds it. In this one process:

  speed  tokens/s of trainer.generate.generate_ids from <|endoftext|>, no stop token, two
         lengths: within the context (the KV cache feeds one token per step) and 4x past it
         (each step past block_size recomputes the last block_size tokens). float and int8
         alternate, --repeats times each; the median counts.
  loss   trainer.evaluate.val_metrics over the artifact's val shards (the evaluate stage's
         windows, all of them unless --max-tokens), and bits per byte over the same targets.

    .venv/bin/python benchmarks/serve_int8.py               # LATEST under artifacts/
    .venv/bin/python benchmarks/serve_int8.py --model artifacts/train/<version> --threads 1

The 2 cores of the dev machine are shared: repeat a run before trusting a small difference.
The last line printed is a JSON summary.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from benchmarks import machine  # noqa: E402
from flows.store import ArtifactStore  # noqa: E402
from trainer.data import Shards  # noqa: E402
from trainer.evaluate import bits_per_byte, token_bytes, val_byte_chunks, val_metrics  # noqa: E402
from trainer.generate import EOT, generate_ids  # noqa: E402
from trainer.http_api import quantize_int8  # noqa: E402
from trainer.model import load_model  # noqa: E402


def cpu() -> dict:
    return {**machine.cpu(), "quantized_engine": torch.backends.quantized.engine}


def artifact(model: str | None, root: str) -> dict:
    """model.pt, tokenizer.json and the val shards of a train artifact (its lineage's)."""
    if model:
        folder = Path(model).resolve()
        store, version = ArtifactStore(folder.parent.parent), folder.name
    else:
        store = ArtifactStore(root)
        version = store.resolve("train")
    lineage = dict(store.lineage("train", version))
    val = sorted(store.path("shard", lineage["shard"]).glob("val_*.bin"))
    if not val:
        raise SystemExit(f"no val_*.bin in shard/{lineage['shard']}: rebuild the shard stage")
    return {"version": version, "model": store.path("train", version) / "model.pt",
            "tokenizer": store.path("tokenizer", lineage["tokenizer"]) / "tokenizer.json", "val": val}


def tokens_per_s(model, eot: int, n_tokens: int) -> float:
    start = time.perf_counter()
    ids = generate_ids(model, [eot], max_new_tokens=n_tokens, temperature=0.8,
                       generator=torch.Generator().manual_seed(0))
    assert len(ids) == n_tokens  # no stop token: every step counts
    return n_tokens / (time.perf_counter() - start)


def speed(models: dict, eot: int, n_tokens: int, repeats: int) -> dict:
    for model in models.values():  # warm-up: first calls pay for allocation and packing
        tokens_per_s(model, eot, 8)
    runs = {name: [] for name in models}
    for _ in range(repeats):  # alternate, so a neighbour's load falls on both
        for name, model in models.items():
            runs[name].append(tokens_per_s(model, eot, n_tokens))
    median = {name: statistics.median(r) for name, r in runs.items()}
    return {"tokens": n_tokens, **{f"{name}_tokens_per_s": round(v, 1) for name, v in median.items()},
            "speedup": round(median["int8"] / median["float32"], 3),
            "runs": {name: [round(v, 1) for v in r] for name, r in runs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a train artifact folder (default: LATEST under --root)")
    parser.add_argument("--root", default=str(ROOT / "artifacts"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--max-tokens", type=int, default=0, help="val tokens to score (0: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(cpu()), flush=True)

    found = artifact(args.model, args.root)
    model, _ = load_model(found["model"])
    models = {"float32": model, "int8": quantize_int8(model)}
    tokenizer = Tokenizer.from_file(str(found["tokenizer"]))
    eot = tokenizer.token_to_id(EOT)
    block = model.config.block_size
    print(f"train/{found['version']}: {model.config}", flush=True)

    speeds = {}
    for label, n_tokens in (("within_context", block - 1), ("past_context", 4 * block)):
        speeds[label] = speed(models, eot, n_tokens, args.repeats)
        print(label, json.dumps(speeds[label]), flush=True)

    shards = Shards(found["val"])
    max_tokens = args.max_tokens or None
    n_bytes = sum(len(chunk) for chunk, _ in
                  val_byte_chunks(shards, block, max_tokens, token_bytes(tokenizer, found["tokenizer"])))
    quality = {}
    for name, m in models.items():
        start = time.perf_counter()
        metrics = val_metrics(m, shards, batch_size=16, max_tokens=max_tokens)
        quality[name] = {"loss": round(metrics["loss"], 5), "accuracy": round(metrics["accuracy"], 5),
                         "bits_per_byte": round(bits_per_byte(metrics["loss"], metrics["tokens"] / n_bytes), 5),
                         "tokens": metrics["tokens"], "seconds": round(time.perf_counter() - start, 2)}
        print(name, json.dumps(quality[name]), flush=True)

    print(json.dumps({
        "benchmark": "serve_int8", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **cpu(), "model": f"train/{found['version']}", "n_layer": model.config.n_layer,
        "n_embd": model.config.n_embd, "block_size": block, "vocab_size": model.config.vocab_size,
        "speed": speeds, "val": quality,
        "loss_delta": round(quality["int8"]["loss"] - quality["float32"]["loss"], 5),
        "bits_per_byte_delta": round(quality["int8"]["bits_per_byte"] - quality["float32"]["bits_per_byte"], 5),
        "accuracy_delta": round(quality["int8"]["accuracy"] - quality["float32"]["accuracy"], 5),
    }))


if __name__ == "__main__":
    main()
