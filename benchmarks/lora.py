"""LoRA fine-tuning against full fine-tuning (the reference) of the same model on the same new corpus.

Both start from one train artifact (--base, e.g. the demo model, trained on Python's docs)
and train on the shards of another corpus made with that model's tokenizer (--shards, e.g.
the shard artifact of `c2m run --config configs/wcxb.toml --set train.init_from=...`), with
the same steps, batches and schedule shape; each at the learning rate usual for it (LoRA's
adapters start at zero and want a larger one). Each run is a real train() call in this
process, one after the other, and reports:

  trainable    parameters that get gradients and AdamW state
  tokens/s     train()'s figure (the first step left out)
  val loss     on the new corpus's val shards (first 65,536 tokens, float32), before (the
               base model) and after (model.pt)
  checkpoint   bytes of one step_*.pt (LoRA: adapters + their optimizer state only)
  model.pt     bytes of the final model (LoRA: merged, a plain model)

    .venv/bin/python benchmarks/lora.py --base artifacts/train/<v> --shards artifacts/shard/<v> \\
        [--steps 300] [--rank 8]

The last line printed is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402
from trainer.data import Shards  # noqa: E402
from trainer.evaluate import val_metrics  # noqa: E402
from trainer.lora import LoraConfig  # noqa: E402
from trainer.model import load_model  # noqa: E402
from trainer.train import TrainConfig, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="train artifact folder (its model.pt)")
    p.add_argument("--shards", type=Path, required=True, help="shard folder of the new corpus")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--full-lr", type=float, default=5e-4, help="full fine-tuning's peak learning rate")
    p.add_argument("--lora-lr", type=float, default=5e-3, help="LoRA's peak learning rate")
    args = p.parse_args()
    base = args.base / "model.pt"
    train_shards = sorted(args.shards.glob("train_*.bin"))
    val_shards = sorted(args.shards.glob("val_*.bin"))
    if not (base.is_file() and train_shards and val_shards):
        p.error(f"need {base} and train_*.bin / val_*.bin in {args.shards}")
    parent, checkpoint = load_model(base)
    shards_vocab = json.loads((args.shards / "manifest.json").read_text())["stats"]["vocab_size"] \
        if (args.shards / "manifest.json").is_file() else parent.config.vocab_size
    if shards_vocab != parent.config.vocab_size:
        p.error(f"{args.shards} was tokenized with vocab {shards_vocab}, the model has "
                f"{parent.config.vocab_size}: make the shards with the base model's tokenizer")
    print(json.dumps(cpu()), flush=True)
    trained = TrainConfig(**{k: v for k, v in checkpoint["train_config"].items() if k != "lora"})
    common = replace(trained, max_steps=args.steps, warmup_steps=max(1, args.steps // 10),
                     schedule="cosine", checkpoint_every=args.steps, keep_last=1, log_every=50,
                     eval_tokens=65536, early_stop_patience=0, init_from=str(base), device="cpu")
    def val_loss(model) -> float:  # float32, the same windows before and after
        return val_metrics(model, Shards(val_shards), common.batch_size, common.eval_tokens)["loss"]

    before = val_loss(parent)
    runs = {"full fine-tuning": replace(common, learning_rate=args.full_lr, min_lr=args.full_lr / 10),
            f"LoRA rank {args.rank}": replace(common, learning_rate=args.lora_lr, min_lr=args.lora_lr / 10,
                                              lora=LoraConfig(rank=args.rank))}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in runs.items():
            out = Path(tmp) / name.replace(" ", "_")
            stats = train(train_shards, parent.config.vocab_size, cfg, out, log=lambda _: None,
                          val_shards=val_shards, init_from=base)
            n_trainable = stats["lora"]["trainable_params"] if stats["lora"] else stats["n_params"]
            results[name] = {
                "learning_rate": cfg.learning_rate, "trainable": n_trainable,
                "trainable_share": n_trainable / (stats["n_params"] + (n_trainable if stats["lora"] else 0)),
                "tokens_per_s": stats["tokens_per_s"], "seconds": stats["seconds"],
                "val_loss_before": before, "val_loss_after": val_loss(load_model(out / "model.pt")[0]),
                "checkpoint_bytes": next((out / "checkpoints").glob("step_*.pt")).stat().st_size,
                "model_bytes": (out / "model.pt").stat().st_size, "dtype": stats["dtype"]}
            r = results[name]
            print(f"{name:18s} trainable {r['trainable']:>10,} ({r['trainable_share']:6.2%}) | "
                  f"{r['tokens_per_s']:8,.0f} tok/s | val loss {before:.4f} -> {r['val_loss_after']:.4f} | "
                  f"checkpoint {r['checkpoint_bytes'] / 1e6:6.2f} MB | model.pt {r['model_bytes'] / 1e6:.2f} MB",
                  flush=True)
    full, low = results["full fine-tuning"], results[f"LoRA rank {args.rank}"]
    print(f"LoRA / full: {low['tokens_per_s'] / full['tokens_per_s']:.2f}x tokens/s, "
          f"{low['checkpoint_bytes'] / full['checkpoint_bytes']:.3f}x checkpoint bytes, "
          f"val loss gain {before - low['val_loss_after']:.4f} vs {before - full['val_loss_after']:.4f}")
    print(json.dumps({"base": str(args.base), "shards": str(args.shards), "steps": args.steps, **cpu(),
                      "runs": results}))


if __name__ == "__main__":
    main()
