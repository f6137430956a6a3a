"""Train a GPT on token shards, on the CPU or a GPU, in one process or under torchrun.

One function, `train`, does the whole run: model (fresh, or fine-tuned from a model.pt),
AdamW, a warmup + cosine or warmup-stable-decay learning rate, epochs of windows drawn
without replacement, gradient accumulation and clipping, bf16/fp16 mixed precision
(dtype "auto": bf16 only where the hardware runs it natively, see perf.resolve_dtype),
optional torch.compile, a metrics line every `log_every` steps (loss, tokens/s, MFU),
checkpoints with a validation pass every `checkpoint_every` steps that resume exactly,
and a final model.pt that loads with `torch.load(weights_only=True)`.

    python -m trainer.train --shards 'shards/train_*.bin' --vocab-size 4096 --out run \\
        [--val-shards 'shards/val_*.bin'] [--set batch_size=32 --set dtype=float32] [--resume]
    python -m trainer.train ... --set processes=2      # data-parallel (DDP): starts torchrun itself
    torchrun --nproc_per_node=2 -m trainer.train ...   # the same, or across machines (--nnodes)
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import random
import shutil
import sys
import time
import tomllib
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass
from torch.nn.parallel import DistributedDataParallel

from trainer import board, launch, lora, masked, perf
from trainer.data import EpochLoader, Shards
from trainer.lora import LoraConfig
from trainer.model import GPT, GPTConfig, load_model

FINAL_LOSS_LOGS = 5  # final_loss averages this many of the last logged losses (step 0's never)
LOSS_NAME = {"causal": "loss", "masked": "masked-token loss"}  # what the objective's loss is over
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # autocast dtype


@dataclass(config=ConfigDict(strict=True, extra="forbid", validate_assignment=True))
class TrainConfig:
    """The model, its optimisation, and the checkpoints that are scored on the val set."""
    # model (a fine-tune takes its shape from the parent checkpoint instead)
    n_layer: int = Field(4, ge=1, le=256)
    n_head: int = Field(4, ge=1, le=256)
    n_embd: int = Field(256, ge=1, le=65536, description="width; a multiple of n_head")
    block_size: int = Field(256, ge=1, le=1 << 20, description="context length in tokens")
    dropout: float = Field(0.0, ge=0, lt=1)
    objective: Literal["causal", "masked"] = Field("causal", description=(
        "causal: a GPT with next-token loss; masked: a bidirectional encoder with BERT's "
        "masked-token loss (15% of positions, 80/10/10; trainer/masked.py)"))
    # optimisation
    batch_size: int = Field(16, ge=1, le=1 << 16, description="windows per micro-step per process")
    grad_accum_steps: int = Field(1, ge=1, le=1 << 16, description="micro-steps per optimizer step")
    processes: int = Field(1, ge=1, le=4096, description=(
        "data-parallel processes (DDP ranks); above 1 the train stage starts them on this machine "
        "with torchrun (CPU: gloo, threads split between them; CUDA: one GPU each). Versioned: the "
        "global batch is batch_size x grad_accum_steps x processes and each process draws its own "
        "windows, so the weights differ"))
    max_steps: int = Field(2000, ge=1, description="optimizer steps")
    learning_rate: float = Field(1e-3, gt=0, le=1)
    min_lr: float = Field(1e-4, ge=0, le=1, description="where the schedule ends; at most learning_rate")
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "wsd"] = Field("cosine", description=(
        "wsd: warmup, stable, then 1-sqrt decay over decay_frac"))
    decay_frac: float = Field(0.2, ge=0, le=1, description="wsd: the share of steps spent decaying to min_lr")
    weight_decay: float = Field(0.1, ge=0, description="on Linear weight matrices only")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 = off")
    # runtime: the device and dtype that really run go into the train version
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when present")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "auto = bfloat16 where the device runs it natively, else float32; weights stay float32; "
        "float16 is for CUDA without bf16 (grad scaler)"))
    compile: bool = Field(False, description=(
        "torch.compile, eager fallback if it fails; a one-off cost (~80 s cold on 2 cores)"))
    activation_checkpointing: bool = Field(False, description=(
        "keep only each block's input and recompute the block in backward: less memory for "
        "activations, more compute (see benchmarks/activation_checkpointing.py); the same weights"))
    seed: int = Field(1337, ge=0)
    log_every: int = Field(50, ge=1, description="steps between metrics lines")
    threads: int = Field(0, ge=0, le=1024, description="torch threads per process; 0 = cores / processes")
    # checkpoints and validation
    checkpoint_every: int = Field(500, ge=0, description=(
        "steps between checkpoints, each scored on the val set; 0 = final only"))
    keep_last: int = Field(3, ge=1, description="checkpoints kept besides best.pt and model.pt")
    eval_tokens: int = Field(65536, ge=0, description="val tokens scored at each checkpoint; 0 = all")
    early_stop_patience: int = Field(0, ge=0, description=(
        "stop after this many val checks in a row without improvement; model.pt is then best.pt's "
        "weights; 0 = off"))
    min_delta: float = Field(0.0, ge=0, description=(
        "early stopping: a val loss counts as an improvement only below the best minus this"))
    init_from: str = Field("", description=(
        "fine-tune: a train version (or prefix) or a train artifact folder"))
    lora: LoraConfig = Field(default_factory=LoraConfig)

    # device and dtype as resolved on this machine, and the parent model, are in the
    # train stage's identity instead; activation checkpointing recomputes the same values
    # (tested: the same losses and weights), it changes memory and time only, like threads
    UNVERSIONED: ClassVar[tuple[str, ...]] = ("device", "dtype", "log_every", "threads", "init_from",
                                              "activation_checkpointing")

    @model_validator(mode="after")
    def _consistent(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr ({self.min_lr}) is above learning_rate ({self.learning_rate})")
        if self.lora.rank and not self.init_from:
            raise ValueError("lora.rank > 0 fine-tunes a trained model with adapters: set "
                             "init_from to a train version or folder (or lora.rank = 0)")
        if self.early_stop_patience and not self.checkpoint_every:
            raise ValueError("early_stop_patience counts the val checks at checkpoints: set "
                             "checkpoint_every above 0")
        return self


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step` (0-based).

    Both schedules rise linearly over warmup_steps, reaching learning_rate at step
    warmup_steps-1, and end at min_lr at max_steps.
    cosine: from warmup_steps, half a cosine down to min_lr.
    wsd: stable at learning_rate, then over the last decay_frac of max_steps down to
    min_lr as 1 - sqrt(progress), the shape Hägele et al. (2024, "Scaling Laws and
    Compute-Optimal Training Beyond Fixed Training Durations") found to match cosine,
    where a linear decay falls short. The stable phase can be continued from any of its
    checkpoints, which is the point of wsd.
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, cfg.max_steps - round(cfg.decay_frac * cfg.max_steps))
        if step < decay_start:
            return cfg.learning_rate
        progress = min(1.0, (step - decay_start) / max(1, cfg.max_steps - decay_start))
        return cfg.min_lr + (1.0 - math.sqrt(progress)) * (cfg.learning_rate - cfg.min_lr)
    raise ValueError(f"schedule must be 'cosine' or 'wsd', got {cfg.schedule!r}")


def param_groups(model: GPT, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the Linear weight matrices only.

    Embeddings (wte, wpe), LayerNorm gains and biases are not decayed: pulling them to
    zero only hurts. lm_head is tied to wte, so it is the same tensor and not decayed
    either (model.parameters() yields the shared tensor once, as wte.weight).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    chosen = {id(p) for p in decay}
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in chosen], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    # fused: one kernel for all parameters, on the CPU too since torch 2.4: measured 35-55 ms
    # against 110-150 ms per step for foreach on the 4x128 demo model (2 shared cores)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr_at(0, cfg),
                             betas=(cfg.beta1, cfg.beta2), fused=True)


def _setup(cfg: TrainConfig) -> tuple[torch.device, str, str, int, int]:
    """Device, compute dtype and why, rank and world size; joins the process group under
    torchrun and sets the CPU threads (before the dtype probe, which times matmuls)."""
    device = perf.resolve_device(cfg.device)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world != cfg.processes:
        raise ValueError(f"train.processes is {cfg.processes}, but torchrun started {world} processes "
                         f"(WORLD_SIZE); set processes = {world}")
    if world > 1 and not dist.is_initialized():  # started by torchrun
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":  # the cores this process may use (container limits), split between ranks
        torch.set_num_threads(cfg.threads or max(1, launch.cores() // world))
    else:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(local_rank)
    dtype, reason = perf.resolve_dtype(device, cfg.dtype)
    if world > 1:  # rank 0's probe decides for all: the ranks must train alike
        choice = [dtype, reason]
        dist.broadcast_object_list(choice, src=0)
        dtype, reason = choice
    if device.type == "cuda" and dtype != "float32":  # the float32 parts of a mixed run (attention) may use tf32
        torch.set_float32_matmul_precision("high")
    return device, dtype, reason, rank, world


def _shared_cores_hint() -> str | None:
    """A note when other processes keep these cores busy and OpenMP threads spin.

    Spinning is libgomp's default and the fastest on cores of our own; with a busy
    neighbour each thread keeps waiting for a descheduled partner. Measured on the demo
    model, 2 cores, one busy neighbour: spinning 3-4x slower than on idle cores,
    OMP_WAIT_POLICY=PASSIVE (read when torch loads, so it must be in the environment) or
    one thread 1.5-2x; under heavier load spinning was 10x slower. PASSIVE costs 10-18% on
    idle cores, so it stays the user's choice."""
    threads = torch.get_num_threads()
    if threads < 2 or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" \
            or not hasattr(os, "getloadavg"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load < cores + 1:  # training itself keeps about `threads` runnable
        return None
    return (f"note: load average {load:.1f} on {cores} cores: other processes share them, and "
            f"{threads} spinning OpenMP threads then train several times slower; start the run "
            f"with OMP_WAIT_POLICY=PASSIVE in the environment, or set train.threads = 1")


def _rng_state() -> dict:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            # as a tensor: weights_only loading refuses numpy arrays
            "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _rng_states(world: int) -> list[dict] | None:
    """Every rank's RNG state, gathered on rank 0 (None on the others)."""
    state = _rng_state()
    if world == 1:
        return [state]
    gathered = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(state, gathered, dst=0)
    return gathered


def _rank0s(flag: bool, world: int) -> bool:
    """Rank 0's flag on every rank (only rank 0 validates, and all ranks must stop together)."""
    if world == 1:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DiskFullError(OSError):
    """A checkpoint did not fit on its disk."""


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) checkpoint, each storage once (tied weights share one)."""
    seen: dict[int, int] = {}

    def walk(x) -> None:
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    return sum(seen.values())


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _save(obj: dict, path: Path) -> None:
    """torch.save through a temporary file and a rename: never a half-written checkpoint,
    even when the write fails; a full disk is named as such instead of torch's
    `[enforce fail at inline_container.cc]`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, Exception):  # Ctrl-C: only the clean-up
            raise
        needed, free = _tensor_bytes(obj), shutil.disk_usage(path.parent).free
        if free < needed:
            raise DiskFullError(f"disk full: {path.name} (about {_mb(needed)}) does not fit in "
                                f"{path.parent}, which has {_mb(free)} free; free some space there "
                                f"and run again (training resumes from the last checkpoint)") from e
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise OSError(f"could not write {path} ({_mb(free)} free there, about {_mb(needed)} "
                      f"needed): {type(e).__name__}: {first_line}") from e


def _plot(records: list[dict], path: Path, loss_name: str) -> None:
    # The object API with an Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train_recs = [r for r in records if "loss" in r]
    val_recs = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] for r in train_recs], [r["loss"] for r in train_recs], label="train")
    if val_recs:
        ax.plot([r["step"] for r in val_recs], [r["val_loss"] for r in val_recs], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{loss_name} (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    lr_ax = ax.twinx()
    lr_ax.plot([r["step"] for r in train_recs], [r["lr"] for r in train_recs], color="tab:gray", alpha=0.5)
    lr_ax.set_ylabel("learning rate", color="tab:gray")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _progress(done: int, start: int, total: int, loss: float, tokens_per_s: float,
              elapsed_s: float) -> dict:
    """What on_progress gets; the ETA extrapolates this run's pace (resumed steps excluded)."""
    ran = done - start
    eta_s = elapsed_s / ran * (total - done) if ran else None
    return {"unit": "step", "done": done, "total": total, "loss": loss,
            "tokens_per_s": tokens_per_s, "elapsed_s": elapsed_s, "eta_s": eta_s}


def train(train_shards: list[Path], vocab_size: int, cfg: TrainConfig, out_dir: Path,
          log: Callable[[str], None] = print, *, val_shards: list[Path] | None = None,
          val_tokens_per_byte: float | None = None, init_from: Path | None = None,
          resume: bool = False, stop_after: int | None = None,
          on_progress: Callable[[dict], None] | None = None) -> dict:
    """Train; write metrics.jsonl, loss.png, checkpoints/, best.pt and model.pt into out_dir.

    val_shards: scored (first cfg.eval_tokens tokens) at every checkpoint and at the end;
    val_tokens_per_byte (val tokens / val UTF-8 bytes) adds bits per byte to those lines.
    init_from: a model.pt to fine-tune: its weights and shape, this config's optimizer
    and schedule. resume: continue from the newest out_dir/checkpoints/step_*.pt, if any.
    stop_after: stop once this many steps are done, as if the process were killed then
    (no final evaluation, plot or model.pt); a later resume=True run picks it up.
    on_progress: called (rank 0 only) at every metrics line and once at the end with
    {"unit": "step", "done", "total" (max_steps), "loss", "tokens_per_s", "elapsed_s",
    "eta_s"}; the last call has done == total and eta_s == 0, also when early stopping
    ended the run (total is then the step it stopped at), but not after stop_after.
    cfg.early_stop_patience: after that many val checks in a row that do not beat the best
    val loss by more than cfg.min_delta, training stops and model.pt is a copy of best.pt
    (evaluate scores the best weights); the result's "ended" says why training ended.
    cfg.processes > 1: started by torchrun, this is one of the processes; otherwise it starts
    them with torchrun (trainer.launch) and returns rank 0's result.
    """
    if cfg.processes > 1 and "WORLD_SIZE" not in os.environ:
        return launch.launch(train_shards, vocab_size, cfg, out_dir, log, val_shards=val_shards,
                             val_tokens_per_byte=val_tokens_per_byte, init_from=init_from,
                             resume=resume, stop_after=stop_after, on_progress=on_progress)
    device, dtype, dtype_reason, rank, world = _setup(cfg)
    if rank != 0:
        log = lambda _: None  # noqa: E731  only rank 0 speaks and writes
        on_progress = None
    log(f"dtype {dtype}: {dtype_reason}")
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    saved = None
    found = sorted(ckpt_dir.glob("step_*.pt")) if resume else []
    if found:
        saved = torch.load(found[-1], weights_only=True, map_location="cpu")
        log(f"resuming from {found[-1]} (step {saved['step']})")
        changed = [k for k, v in asdict(cfg).items() if saved["train_config"].get(k) != v]
        if changed:
            log(f"the config differs from the checkpoint's in {', '.join(changed)}: "
                f"the run will not be the one that was interrupted")
        model_config = GPTConfig(**saved["model_config"])
        init_from = Path(saved["parent"]) if saved["parent"] else None
    elif init_from is not None:
        parent, _ = load_model(init_from)
        # an encoder's vocabulary has [MASK] after the tokenizer's (trainer.masked)
        tokens = parent.config.vocab_size - (not parent.config.causal)
        if tokens != vocab_size:
            raise ValueError(f"{init_from} was trained with vocab_size {tokens}, "
                             f"but these shards have vocab_size {vocab_size}: fine-tune on shards "
                             f"made with the parent's tokenizer")
        model_config = replace(parent.config, dropout=cfg.dropout)
        log(f"fine-tuning {init_from}: its shape {model_config} replaces the config's")
    else:
        model_config = GPTConfig(vocab_size=vocab_size if cfg.objective == "causal" else
                                 masked.model_vocab_size(vocab_size), block_size=cfg.block_size,
                                 n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                 dropout=cfg.dropout, causal=cfg.objective == "causal")
    if model_config.causal != (cfg.objective == "causal"):
        raise ValueError(f"train.objective is {cfg.objective!r}, but the model to continue is "
                         f"{'causal' if model_config.causal else 'masked'}: set train.objective to match")
    # measured before seeding: the measurement draws random matrices
    peak, peak_source = perf.peak_flops(device, dtype) if rank == 0 else (float("nan"), "")
    peak *= world  # the peak of all ranks together, as tokens/s counts all ranks
    torch.manual_seed(cfg.seed)  # the same init on every rank
    raw_model = GPT(model_config)
    raw_model.activation_checkpointing = cfg.activation_checkpointing
    if saved is None and init_from is not None:
        raw_model.load_state_dict(parent.state_dict())
    peft_model, base_digest = None, None  # LoRA: peft's wrapper of raw_model, the base's digest
    if cfg.lora.rank:
        if init_from is None:
            raise ValueError("train.lora.rank > 0 adapts a trained model: give init_from (its model.pt)")
        if saved is not None:  # the adapters resume over their frozen base
            raw_model.load_state_dict(load_model(init_from)[0].state_dict())
        base_digest = lora.weights_digest(raw_model.state_dict())
        peft_model = lora.add_adapters(raw_model, cfg.lora)  # the same init on every rank
        n_trainable, n_all = lora.trainable(raw_model)
        log(f"LoRA rank {cfg.lora.rank} (alpha {cfg.lora.alpha:g}) on {', '.join(cfg.lora.targets)}: "
            f"{n_trainable:,} of {n_all:,} parameters train ({n_trainable / n_all:.2%}); "
            f"checkpoints hold the adapters only, model.pt the merged model")
    raw_model.to(device).train()
    torch.manual_seed(cfg.seed + rank)  # dropout masks differ between ranks
    optimizer = _optimizer(raw_model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")  # bf16 needs none

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if world == 1:
            return module
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    model = wrap(torch.compile(raw_model) if cfg.compile else raw_model)
    autocast = (torch.autocast(device.type, dtype=DTYPES[dtype]) if DTYPES[dtype]
                else contextlib.nullcontext())
    block_size = model_config.block_size
    loader = EpochLoader(Shards(train_shards), block_size, cfg.batch_size, cfg.seed, rank, world)
    val_data = Shards(val_shards) if val_shards else None
    if val_data and next(val_data.sequential_windows(block_size, cfg.eval_tokens or None), None) is None:
        raise ValueError(f"no val shard ({', '.join(map(str, val_data.paths))}) holds a window of "
                         f"block_size+1 = {block_size + 1} tokens within eval_tokens = {cfg.eval_tokens}: "
                         f"use more val data, a larger eval_tokens or a smaller block_size")
    if cfg.early_stop_patience and val_data is None:
        raise ValueError("train.early_stop_patience watches the val loss, but no val shards were "
                         "given: pass val shards or set early_stop_patience = 0")
    tokens_per_step = cfg.batch_size * block_size * cfg.grad_accum_steps * world  # all ranks

    start, tokens_seen, best_val_loss, records = 0, 0, None, []
    best_step, stale_checks = None, 0  # best.pt's step; val checks since the last improvement
    loss_sum, loss_n = torch.zeros((), device=device), 0  # train loss since the last log line
    if saved is not None:
        if ("adapter" in saved) != bool(peft_model):
            raise ValueError(f"{found[-1]} was written with lora.rank "
                             f"{saved['train_config'].get('lora', {}).get('rank', 0)}, this run has "
                             f"{cfg.lora.rank}: resume with its settings, or train in an empty folder")
        if peft_model:
            if saved["base"]["digest"] != base_digest:
                raise ValueError(f"{init_from} is not the base model the adapters in {found[-1]} "
                                 f"were trained on (its weights differ)")
            lora.load_adapter_state(peft_model, saved["adapter"])
        else:
            raw_model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        loader.load_state_dict(saved["loader"])
        rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # older: rank 0's
        if len(rngs) == world:  # each rank's own: dropout masks go on as if never stopped
            _set_rng_state(rngs[rank])
        else:  # another number of processes: rank 0's, and masks of their own for the others
            _set_rng_state(rngs[0])
            if rank:
                torch.manual_seed(cfg.seed + rank + saved["step"])
        start, tokens_seen, best_val_loss = saved["step"], saved["tokens_seen"], saved["best_val_loss"]
        best_step, stale_checks = saved.get("best_step"), saved.get("stale_checks", 0)
        loss_sum, loss_n = saved["loss_window"][0].to(device), saved["loss_window"][1]
        records = saved["records"]  # the lines written after the checkpoint are dropped
    if rank == 0:
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    flops_per_token = perf.flops_per_token(model_config, block_size)
    log(f"model: {raw_model.num_params():,} parameters; data: {loader.shards.n_tokens:,} tokens in "
        f"{len(loader.shards)} shards, {loader.n_windows:,} windows; {cfg.max_steps} steps of "
        f"{tokens_per_step:,} tokens; {device}, {dtype}, {world} process(es), "
        f"{torch.get_num_threads()} threads (OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}); "
        f"peak {peak:.3g} FLOP/s ({peak_source})")

    def micro_steps() -> torch.Tensor:
        step_loss = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum_steps):
            # masked: (inputs, targets, positions), the loss on the masked positions only
            batch = loader.next_batch() if model_config.causal else \
                masked.next_masked_batch(loader, masked.mask_token_id(model_config))
            # under DDP, all-reduce the gradients only once, after the last micro-step
            sync = micro == cfg.grad_accum_steps - 1 or world == 1
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                _, loss = model(*(t.to(device, non_blocking=True) for t in batch))
                loss = loss / cfg.grad_accum_steps  # the gradient of the mean over all micro-batches
            scaler.scale(loss).backward()
            step_loss += loss.detach()
        return step_loss

    def validate(step: int) -> dict:
        from trainer.evaluate import bits_per_byte, val_metrics  # evaluate imports model, not train

        with autocast:  # val_metrics switches to eval mode and back
            m = val_metrics(raw_model, val_data, cfg.batch_size, cfg.eval_tokens or None)
        record = {"step": step, "val_loss": m["loss"], "val_accuracy": m["accuracy"],
                  "val_top5_accuracy": m["top5_accuracy"], "val_tokens": m["tokens"]}
        if val_tokens_per_byte and model_config.causal:  # masked: the loss is not over every byte
            record["val_bits_per_byte"] = bits_per_byte(m["loss"], val_tokens_per_byte)
        log(f"val    {step:6d} | {'' if model_config.causal else 'masked-token '}loss {m['loss']:.4f} "
            f"| accuracy {m['accuracy']:.3f}"
            + (f" | {record['val_bits_per_byte']:.3f} bits/byte" if "val_bits_per_byte" in record else ""))
        return record

    def weights() -> dict:
        if peft_model:  # the adapters only; their base is the parent model, checked on loading
            return {"adapter": lora.adapter_state(peft_model), "lora": asdict(cfg.lora),
                    "base": {"path": str(init_from), "digest": base_digest}}
        return {"model": raw_model.state_dict()}  # the plain GPT: no "_orig_mod."/"module." prefixes

    def final_model(state: dict) -> dict:
        """model.pt: a plain model that evaluate, generate and export load (LoRA: merged)."""
        return {**state, "model": lora.merged_state(peft_model)} if peft_model else state

    def checkpoint(done: int, rng: list[dict]) -> dict:
        return {**weights(),
                "model_config": asdict(model_config), "train_config": asdict(cfg),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": done,
                "tokens_seen": tokens_seen, "loader": loader.state_dict(), "rng": rng,
                "best_val_loss": best_val_loss, "best_step": best_step, "stale_checks": stale_checks,
                "loss_window": [loss_sum.cpu(), loss_n],
                "records": records,  # metrics.jsonl so far, to rewrite it on resume
                "parent": str(init_from) if init_from else None}

    step_seconds: list[float] = []  # the first steps of this run: compile time
    shared_hint = None
    compile_failed = False
    paused = 0.0  # seconds spent on validation and checkpoints, left out of tokens/s
    val_loss, done = None, start
    # resumed from the checkpoint at which a run stopped early: nothing left to train
    stopping = 0 < cfg.early_stop_patience <= stale_checks and start < cfg.max_steps
    if stopping:
        log(f"early stopping ended the run at this checkpoint (step {start}): nothing left to train")
    t_start = time.perf_counter()
    t_last_log, steps_since_log = t_start, 0
    # TensorBoard's copy of metrics.jsonl; purge_step=start hides what a killed run logged after it
    with (open(out_dir / "metrics.jsonl", "a") if rank == 0 else contextlib.nullcontext()) as metrics, \
            board.Board(out_dir if rank == 0 else None, purge_step=start) as curves:
        for step in range(start, cfg.max_steps):
            if stopping:
                break
            t_step = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.compile and step == start:  # compiling happens on the first call
                before = loader.state_dict()
                try:
                    step_loss = micro_steps()
                except Exception as e:  # noqa: BLE001  any compiler failure: train eagerly
                    log(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        f"training without it")
                    model, compile_failed = wrap(raw_model), True
                    optimizer.zero_grad(set_to_none=True)
                    loader.load_state_dict(before)  # redo the step on the same batches
                    step_loss = micro_steps()
            else:
                step_loss = micro_steps()
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            # clip_grad_norm_ with max_norm=inf only measures the norm
            grad_norm = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, loss_n = loss_sum + step_loss, loss_n + 1
            tokens_seen += tokens_per_step
            steps_since_log += 1
            done = step + 1
            if len(step_seconds) < 11:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                step_seconds.append(time.perf_counter() - t_step)

            if step % cfg.log_every == 0 or done == cfg.max_steps:
                if world > 1:
                    dist.all_reduce(loss_sum)  # the mean over all ranks' batches
                    loss_sum /= world
                # loss is the mean over the steps since the last line: less noisy than one batch
                loss = loss_sum.item() / loss_n
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} by step {step}; "
                                             f"try a lower learning_rate or float32")
                now = time.perf_counter()
                tokens_per_s = steps_since_log * tokens_per_step / max(now - t_last_log, 1e-9)
                record = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                          "tokens_per_s": tokens_per_s,
                          "mfu": perf.mfu(tokens_per_s, flops_per_token, peak) if rank == 0 else None,
                          "tokens_seen": tokens_seen}
                records.append(record)
                if rank == 0:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    curves.add(record)
                log(f"step {step:6d} | loss {loss:.4f} | lr {lr:.2e} | grad norm {record['grad_norm']:.3f}"
                    f" | {tokens_per_s:,.0f} tok/s | MFU "
                    + (f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a (above the peak probe)"))
                loss_sum, loss_n = torch.zeros((), device=device), 0
                t_last_log, steps_since_log = now, 0
                # once the 1-minute load average reflects training (not the stages before it)
                if not shared_hint and device.type == "cpu" and now - t_start > 120:
                    shared_hint = _shared_cores_hint()
                    if shared_hint:
                        log(shared_hint)
                if on_progress and done < cfg.max_steps:  # the last report comes after the final save
                    on_progress(_progress(done, start, cfg.max_steps, loss, tokens_per_s, now - t_start))

            if done == cfg.max_steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                t_pause = time.perf_counter()
                improved = False
                if rank == 0 and val_data is not None:
                    val = validate(step)
                    records.append(val)
                    metrics.write(json.dumps(val) + "\n")
                    metrics.flush()
                    curves.add(val)
                    val_loss = val["val_loss"]
                    # early stopping asks more of an improvement (min_delta) than best.pt does
                    beats = best_val_loss is None or val_loss < best_val_loss - cfg.min_delta
                    stale_checks = 0 if beats else stale_checks + 1
                    improved = best_val_loss is None or val_loss < best_val_loss
                    best_val_loss = val_loss if improved else best_val_loss
                    best_step = done if improved else best_step
                stopping = _rank0s(0 < cfg.early_stop_patience <= stale_checks and done < cfg.max_steps,
                                   world)
                rng = _rng_states(world)  # a collective: every rank's state, on rank 0
                if rank == 0:
                    state = checkpoint(done, rng)
                    if cfg.checkpoint_every:
                        _save(state, ckpt_dir / f"step_{done:07d}.pt")
                        for old in sorted(ckpt_dir.glob("step_*.pt"))[:-max(cfg.keep_last, 1)]:
                            old.unlink()
                    if improved:
                        _save(state, out_dir / "best.pt")
                    if done == cfg.max_steps:
                        _save(final_model(state), out_dir / "model.pt")
                if stopping and rank == 0:  # the others have no val loss
                    log(f"early stop at step {done}: {stale_checks} val checks without beating "
                        f"{best_val_loss:.4f} (step {best_step}) by more than {cfg.min_delta:g}; "
                        f"model.pt is best.pt")
                paused += time.perf_counter() - t_pause
                t_last_log += time.perf_counter() - t_pause
            if stop_after is not None and done >= stop_after:
                break
    t_end = time.perf_counter()

    ran = done - start
    compile_seconds = None
    if cfg.compile and ran and not compile_failed:
        # the first step minus a normal one; with a single step, all of it
        compile_seconds = max(0.0, step_seconds[0] - (float(np.median(step_seconds[1:])) if ran > 1 else 0.0))
        log(f"torch.compile: the first step took {step_seconds[0]:.1f} s, {compile_seconds:.1f} s "
            f"more than a normal step")
    if ran > 1:  # the first step pays one-off warm-up costs
        tokens_per_s = (ran - 1) * tokens_per_step / max(t_end - t_start - step_seconds[0] - paused, 1e-9)
    else:
        tokens_per_s = ran * tokens_per_step / max(t_end - t_start - paused, 1e-9)
    ended = "early_stop" if stopping else "max_steps" if done == cfg.max_steps else "stop_after"
    if rank == 0 and stopping:  # evaluate scores model.pt: the best weights, not the last
        best = torch.load(out_dir / "best.pt", weights_only=True)
        if peft_model:
            lora.load_adapter_state(peft_model, best["adapter"])
        _save(final_model(best), out_dir / "model.pt")
    if rank == 0 and ended != "stop_after":  # not when interrupted
        _plot(records, out_dir / "loss.png", LOSS_NAME[cfg.objective])
    if world > 1:
        dist.barrier()  # no rank leaves before rank 0 has written the files
    train_records = [r for r in records if "loss" in r]
    # step 0's loss is the untrained model's (about ln vocab_size): it says nothing of the end
    last = [r for r in train_records if r["step"] > 0][-FINAL_LOSS_LOGS:] or train_records[-1:]
    run_mfu = perf.mfu(tokens_per_s, flops_per_token, peak) if rank == 0 else None
    mfu_note = perf.PEAK_TOO_LOW if rank == 0 and run_mfu is None else None
    if mfu_note:
        log(f"{mfu_note} ({peak_source}: {peak:.3g} FLOP/s, "
            f"training {tokens_per_s * flops_per_token:.3g} FLOP/s)")
    if on_progress and ran:
        on_progress(_progress(done, start, done if stopping else cfg.max_steps,
                              train_records[-1]["loss"] if train_records else None, tokens_per_s,
                              t_end - t_start))
    return {
        "steps": done,
        "objective": cfg.objective,  # masked: every loss here is over the masked tokens only
        "ended": ended,  # max_steps, early_stop, or stop_after (resumable)
        "tokens_seen": tokens_seen,
        "initial_loss": train_records[0]["loss"] if train_records else None,
        "final_loss": sum(r["loss"] for r in last) / len(last) if last else None,
        "tokens_per_s": tokens_per_s,
        "seconds": t_end - t_start,
        "n_params": raw_model.num_params() - (n_trainable if peft_model else 0),  # LoRA: merged
        "lora": {**asdict(cfg.lora), "trainable_params": n_trainable,
                 "trainable_share": n_trainable / n_all} if peft_model else None,
        "mfu": run_mfu,
        "mfu_note": mfu_note,
        "peak_flops_source": peak_source,
        "dtype": dtype,
        "dtype_reason": dtype_reason,
        "compile_seconds": compile_seconds,
        "val_loss": val_loss,
        "best_val_loss": best_val_loss,
        "best_step": best_step,
        "early_stop": {"patience": cfg.early_stop_patience, "min_delta": cfg.min_delta,
                       "checks_without_improvement": stale_checks} if cfg.early_stop_patience else None,
        "parent": str(init_from) if init_from else None,
        "resumed_from": str(found[-1]) if found else None,
    }


def main(argv: list[str] | None = None) -> None:
    """Command line entry; under torchrun every process runs this and joins the group."""
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", nargs="+", required=True, metavar="GLOB",
                   help="train shards: files or globs, e.g. 'shards/train_*.bin'")
    p.add_argument("--val-shards", nargs="+", metavar="GLOB", help="val shards, scored at each checkpoint")
    p.add_argument("--val-tokens-per-byte", type=float, help="val tokens / val bytes: adds bits per byte")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a TrainConfig field; under torchrun, processes defaults to its WORLD_SIZE")
    p.add_argument("--init-from", type=Path, help="model.pt to fine-tune")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--stop-after", type=int, metavar="STEPS",
                   help="stop once this many steps are done, resumable with --resume")
    p.add_argument("--json-lines", action="store_true",
                   help="print log lines, progress and the result as JSON lines (for trainer.launch)")
    args = p.parse_args(argv)
    if args.json_lines and os.environ.get(launch.PARENT_PID) and "WORLD_SIZE" in os.environ:
        launch.die_with_parent(int(os.environ[launch.PARENT_PID]))  # never outlive torchrun

    def shards(patterns: list[str]) -> list[Path]:
        paths = []
        for pattern in patterns:
            found = sorted(Path(x) for x in glob.glob(pattern))
            if not found:
                p.error(f"no files match {pattern!r}")
            paths += found
        return paths

    values = {"processes": int(os.environ.get("WORLD_SIZE", 1)),
              **({"init_from": str(args.init_from)} if args.init_from else {})}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item}: should look like KEY=VALUE")
        *section, leaf = key.split(".")  # lora.rank=8: a field of the nested [train.lora]
        node = values
        for part in section:
            node = node.setdefault(part, {})
        try:  # TOML values: 10, 2e-3, true, "text" (text needs no quotes)
            node[leaf] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            node[leaf] = value
    try:
        if isinstance(values.get("lora"), dict):
            values["lora"] = LoraConfig(**values["lora"])
        cfg = TrainConfig(**values)
    except ValidationError as exc:
        p.error("; ".join(f"--set {'.'.join(map(str, e['loc'])) or '(together)'}: "
                          + e["msg"].removeprefix("Value error, ") for e in exc.errors()))

    def emit(kind: str, value) -> None:  # one write: the ranks share the launcher's pipe
        sys.stdout.write(json.dumps({kind: value}) + "\n")
        sys.stdout.flush()

    try:
        result = train(shards(args.shards), args.vocab_size, cfg, args.out,
                       log=partial(emit, "log") if args.json_lines else print,
                       val_shards=shards(args.val_shards) if args.val_shards else None,
                       val_tokens_per_byte=args.val_tokens_per_byte, init_from=args.init_from,
                       resume=args.resume, stop_after=args.stop_after,
                       on_progress=partial(emit, "progress") if args.json_lines else None)
    except Exception as exc:
        if args.json_lines:  # when: the launcher names the rank that failed first
            emit("failed", {"rank": int(os.environ.get("RANK", 0)), "error": f"{type(exc).__name__}: {exc}",
                            "time": time.time()})
        raise
    if int(os.environ.get("RANK", 0)) == 0 and args.json_lines:
        emit("result", result)
    elif int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
