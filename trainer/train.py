"""Train a GPT on token shards, on the CPU.

One function, `train`, does the whole run: model, AdamW, warmup + cosine learning rate,
random windows from the shards, a metrics line every `log_every` steps, a loss plot and
a final checkpoint that loads with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from trainer.data import Shards
from trainer.model import GPT, GPTConfig

FINAL_LOSS_LOGS = 5  # final_loss averages this many of the last logged losses


@dataclass
class TrainConfig:
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    # optimisation
    batch_size: int = 16
    max_steps: int = 1000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    # runtime
    dtype: str = "float32"  # or "bfloat16": autocast on the CPU, about 2x faster
    seed: int = 1337
    log_every: int = 10
    threads: int = 0  # 0 = all cores
    dropout: float = 0.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step` (0-based): linear warmup to learning_rate, cosine down to min_lr.

    Steps 0..warmup_steps-1 rise linearly, reaching learning_rate at warmup_steps-1;
    from warmup_steps the rate follows half a cosine, reaching min_lr at max_steps.
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects container CPU limits
    except AttributeError:
        return os.cpu_count() or 1


def _optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    # Decay matrices (weights, embeddings) only; biases and LayerNorm gains stay free.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2))


def _plot_loss(records: list[dict], path: Path) -> None:
    # The object API with an Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)", color="tab:blue")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], color="tab:orange", alpha=0.6)
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def train(train_shards: list[Path], vocab_size: int, cfg: TrainConfig, out_dir: Path,
          log: Callable[[str], None] = print) -> dict:
    """Train from scratch; write metrics.jsonl, loss.png and model.pt into out_dir."""
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {cfg.dtype!r}")
    if cfg.max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {cfg.max_steps}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads or _cpu_count())
    torch.manual_seed(cfg.seed)  # model init
    batch_rng = torch.Generator().manual_seed(cfg.seed)  # data order, separate from init

    data = Shards(train_shards)
    model_config = GPTConfig(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)
    model = GPT(model_config)
    model.train()
    optimizer = _optimizer(model, cfg)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if cfg.dtype == "bfloat16"
                else contextlib.nullcontext())
    tokens_per_step = cfg.batch_size * cfg.block_size
    log(f"model: {model.num_params():,} parameters; data: {data.n_tokens:,} tokens in "
        f"{len(data)} shards; {cfg.max_steps} steps of {tokens_per_step} tokens, {cfg.dtype}, "
        f"{torch.get_num_threads()} threads")

    records: list[dict] = []
    loss_sum, loss_n = 0.0, 0
    t_start = time.perf_counter()
    t_last_log, steps_since_log = t_start, 0
    t_after_first = t_start
    with open(out_dir / "metrics.jsonl", "w") as metrics:
        for step in range(cfg.max_steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr

            x, y = data.random_batch(cfg.batch_size, cfg.block_size, batch_rng)
            with autocast:
                _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # clip_grad_norm_ with max_norm=inf only measures the norm
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            optimizer.step()

            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at step {step}; "
                                         f"try a lower learning_rate or float32")
            loss_sum, loss_n = loss_sum + loss_value, loss_n + 1
            steps_since_log += 1
            now = time.perf_counter()
            if step == 0:
                t_after_first = now  # the first step pays one-off warm-up costs

            if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
                # loss is the mean over the steps since the last line: less noisy than one batch
                record = {"step": step, "loss": loss_sum / loss_n, "lr": lr,
                          "grad_norm": float(grad_norm),
                          "tokens_per_s": steps_since_log * tokens_per_step / max(now - t_last_log, 1e-9)}
                records.append(record)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                log(f"step {step:6d} | loss {record['loss']:.4f} | lr {lr:.2e} | "
                    f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s")
                loss_sum, loss_n = 0.0, 0
                t_last_log, steps_since_log = now, 0
    t_end = time.perf_counter()

    _plot_loss(records, out_dir / "loss.png")
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": cfg.max_steps,
        "model_config": asdict(model_config),
        "train_config": asdict(cfg),
    }
    tmp = out_dir / "model.pt.tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, out_dir / "model.pt")  # never leave a half-written checkpoint

    if cfg.max_steps > 1:
        tokens_per_s = (cfg.max_steps - 1) * tokens_per_step / max(t_end - t_after_first, 1e-9)
    else:
        tokens_per_s = tokens_per_step / max(t_end - t_start, 1e-9)
    last = records[-FINAL_LOSS_LOGS:]
    return {
        "steps": cfg.max_steps,
        "tokens_seen": cfg.max_steps * tokens_per_step,
        "initial_loss": records[0]["loss"],
        "final_loss": sum(r["loss"] for r in last) / len(last),
        "tokens_per_s": tokens_per_s,
        "seconds": t_end - t_start,
        "n_params": model.num_params(),
    }


def load_model(path: Path) -> tuple[GPT, dict]:
    """Rebuild the model saved by `train`, in eval mode, on the CPU."""
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return model, checkpoint
