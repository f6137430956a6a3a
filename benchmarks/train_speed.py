"""Training speed: trainer.train.train() against a plain PyTorch loop, with MFU.

Both loops train the same model class (trainer.model.GPT) at the same shape, in this one
process, one after the other:

  reference  the loop a user would write by hand: float32, eager, torch.optim.AdamW
             (default, non-fused), grad-norm clipping at 1.0, random windows of a random
             token tensor in memory (nanoGPT's get_batch), the loss F.cross_entropy of the
             model's logits (nanoGPT's head, not our chunked one);
  ours       trainer.train.train() at --dtype (auto: what train() picks for this
             hardware, printed with its reason) / --compile, on random-token shards
             written with trainer.data.write_shard into a temp dir: its whole loop,
             data loading, learning-rate schedule, logging and all.

tokens/s leave out the warm-up steps (ours: train() leaves out its first step, which pays
for compilation). MFU = tokens/s * trainer.perf.flops_per_token / trainer.perf.peak_flops:
a spec-sheet peak on a known NVIDIA GPU, a measured matmul peak on a CPU (printed with
its source). The 2 cores of the dev machine are shared, so repeat a run before trusting
a difference of less than ~15%. A busy neighbour slows 2 spinning OpenMP threads 3-10x;
OMP_WAIT_POLICY=PASSIVE (or --threads 1) then helps, at a cost of 10-18% on an idle machine
(the run prints the load average and the policy).

    .venv/bin/python benchmarks/train_speed.py --dtype bf16 --compile on --steps 60
    # the demo's model (configs/demo.toml), in the dtype train() picks here:
    .venv/bin/python benchmarks/train_speed.py --width 128 --context 64 --batch 32 --vocab 4096
    # GPT-2 124M on a GPU:
    .venv/bin/python benchmarks/train_speed.py --layers 12 --heads 12 --width 768 \\
        --context 1024 --vocab 50304 --batch 16 --dtype bf16 --compile on

The last line printed is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer import perf  # noqa: E402
from trainer.data import token_dtype, write_shard  # noqa: E402
from trainer.model import GPT, GPTConfig  # noqa: E402
from trainer.train import TrainConfig, train  # noqa: E402

# nanoGPT on the 2-core dev machine, 4 layers x 4 heads x 256 wide, context 256,
# vocab 8192, batch 16 (the issue's figures): tokens/s by setting
ISSUE_NANOGPT_TOKENS_PER_S = {"fp32 eager": 3800, "fp32 compile": 4000,
                              "bf16 autocast": 7400, "bf16 autocast + compile": 9400}
TRAIN_DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def cpu_model() -> str:
    """lscpu's "Model name" (from /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def reference_loop(config: GPTConfig, batch: int, steps: int, warmup_steps: int,
                   device: torch.device, dtype: str, seed: int) -> dict:
    """The plain loop: model, AdamW, random windows; tokens/s over the steps after warm-up."""
    torch.manual_seed(seed)
    data = torch.randint(0, config.vocab_size, (1 << 20,), dtype=torch.int64)
    model = GPT(config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    T = config.block_size

    def step() -> float:
        starts = torch.randint(len(data) - T - 1, (batch,))
        x = torch.stack([data[i:i + T] for i in starts]).to(device)
        y = torch.stack([data[i + 1:i + 1 + T] for i in starts]).to(device)
        with autocast:
            logits, _ = model(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()  # syncs a GPU, so the clock below sees finished work

    for _ in range(warmup_steps):
        step()
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": steps * batch * T / seconds, "seconds": seconds,
            "final_loss": losses[-1]}


def our_loop(config: GPTConfig, batch: int, steps: int, warmup_steps: int, device: torch.device,
             dtype: str, compile_model: bool, threads: int, seed: int, log) -> dict:
    """trainer.train.train() on synthetic shards; its result dict."""
    cfg = TrainConfig(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                      block_size=config.block_size, batch_size=batch,
                      max_steps=warmup_steps + steps, device=device.type,
                      dtype=TRAIN_DTYPES[dtype], compile=compile_model, threads=threads, seed=seed,
                      log_every=max(10, (warmup_steps + steps) // 5),
                      checkpoint_every=0)  # only the final model.pt, outside the timed steps
    rng = np.random.default_rng(seed)
    tokens = max(1 << 20, 2 * batch * (config.block_size + 1) * (warmup_steps + steps))
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        shards = []
        for i in range(2):
            path = Path(tmp) / f"train-{i:03d}.bin"
            write_shard(path, rng.integers(0, config.vocab_size, tokens // 2,
                                           dtype=token_dtype(config.vocab_size)))
            shards.append(path)
        return train(shards, config.vocab_size, cfg, Path(tmp) / "run", log=log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--width", type=int, default=256, help="n_embd")
    ap.add_argument("--context", type=int, default=256, help="block_size, tokens per window")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30, help="timed steps of each loop")
    ap.add_argument("--warmup-steps", type=int, default=2,
                    help="untimed steps before them (ours: run too; train() times all but its first)")
    ap.add_argument("--dtype", choices=TRAIN_DTYPES, default="auto",
                    help="ours; auto: bf16 where the hardware runs it natively, else fp32")
    ap.add_argument("--compile", choices=("on", "off"), default="off", help="ours: torch.compile")
    ap.add_argument("--reference-dtype", choices=("fp32", "bf16"), default="fp32",
                    help="the plain loop's dtype (bf16 = autocast); fp32 is the issue's baseline")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each loop, alternating; the best of each is reported")
    ap.add_argument("--no-reference", action="store_true", help="time ours only")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = all cores")
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--verbose", action="store_true", help="print train()'s log lines")
    args = ap.parse_args()

    device = torch.device(args.device if args.device != "auto"
                          else "cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif hasattr(os, "sched_getaffinity"):  # all the cores this process may use, as train() does
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    threads = torch.get_num_threads()
    config = GPTConfig(vocab_size=args.vocab, block_size=args.context, n_layer=args.layers,
                       n_head=args.heads, n_embd=args.width)
    fpt = perf.flops_per_token(config, args.context)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {threads} threads"
    capability = torch.backends.cpu.get_cpu_capability()
    dtype, dtype_reason = perf.resolve_dtype(device, TRAIN_DTYPES[args.dtype])
    args.dtype = SHORT[dtype]  # what train() runs: it resolves "auto" the same way (cached)
    n_params = GPT(config).num_params()
    print(f"model {args.layers} layers x {args.heads} heads x {args.width} wide, context "
          f"{args.context}, vocab {args.vocab}: {n_params / 1e6:.2f} M parameters, "
          f"{fpt / 1e6:.1f} MFLOP/token (fwd+bwd); batch {args.batch}, {args.steps} timed steps "
          f"after {args.warmup_steps} warm-up; {where}, torch {torch.__version__}")
    print(f"cpu: {cpu_model()}, capability {capability}; ours in {dtype}: {dtype_reason}")
    # other processes on the cores slow both loops, and 2-thread OpenMP far more than 1
    load_before = os.getloadavg()[0]

    # Measured (CPU) peaks first, before the loops heat the machine; train() reuses the
    # cached figure for its own MFU. The reference keeps torch's float32 matmul precision
    # as found here (train() switches a GPU to tf32), and its peak is taken under it.
    fp32_precision = torch.get_float32_matmul_precision()
    reference_peak = None if args.no_reference else perf.peak_flops(device, args.reference_dtype)
    perf.peak_flops(device, args.dtype)

    # Alternate the two loops --repeat times and keep the best of each: a neighbour's
    # burst on a shared core then slows one run, not one loop.
    references, runs = [], []
    lines: list[str] = []
    log = print if args.verbose else lines.append
    for _ in range(args.repeat):
        if not args.no_reference:
            torch.set_float32_matmul_precision(fp32_precision)
            references.append(reference_loop(config, args.batch, args.steps, args.warmup_steps,
                                             device, args.reference_dtype, args.seed))
        runs.append(our_loop(config, args.batch, args.steps, args.warmup_steps, device,
                             args.dtype, args.compile == "on", args.threads, args.seed, log))
    reference = max(references, key=lambda r: r["tokens_per_s"]) if references else None
    ours = max(runs, key=lambda r: r["tokens_per_s"])
    if args.repeat > 1:
        print("runs, tokens/s: " + "; ".join(
            name + " " + ", ".join(f"{r['tokens_per_s']:,.0f}" for r in results)
            for name, results in (("reference", references), ("ours", runs)) if results))
    load_after = os.getloadavg()[0]
    print(f"load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}"
          f" on {os.cpu_count()} cores; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    if device.type == "cpu" and load_before >= 1.0 and threads > 1 \
            and os.environ.get("OMP_WAIT_POLICY", "").lower() != "passive":
        # measured on the 2-core dev box with one busy neighbour: 2 spinning OpenMP threads
        # ran the demo model ~3x slower than with OMP_WAIT_POLICY=PASSIVE or 1 thread
        print("note: other processes were busy on these cores; spinning OpenMP threads then "
              "wait on a descheduled partner. Compare with OMP_WAIT_POLICY=PASSIVE or --threads 1")
    peak, source = perf.peak_flops(device, args.dtype)  # as train() saw it: tf32 on a GPU
    rows = []  # (name, tokens/s, (peak, source))
    if reference:
        rows.append((f"reference: plain loop, {args.reference_dtype} eager",
                     reference["tokens_per_s"], reference_peak))
    rows.append((f"ours: train(), {args.dtype}{' + compile' if args.compile == 'on' else ''}",
                 ours["tokens_per_s"], (peak, source)))
    if not math.isfinite(ours.get("final_loss", 0.0)):
        print(f"warning: ours ended at loss {ours['final_loss']}", file=sys.stderr)

    print(f"\n{'loop':40s} {'tokens/s':>10s} {'GFLOP/s':>9s} {'MFU':>7s}")
    for name, tok_s, (row_peak, _) in rows:
        row_mfu = perf.mfu(tok_s, fpt, row_peak)
        print(f"{name:40s} {tok_s:10,.0f} {tok_s * fpt / 1e9:9.1f} "
              + (f"{row_mfu:7.2%}" if row_mfu is not None else "    n/a"))
    if any(perf.mfu(tok_s, fpt, row_peak) is None for _, tok_s, (row_peak, _) in rows):
        print(perf.PEAK_TOO_LOW)
    for name, _, (row_peak, row_source) in rows:
        print(f"peak for {name.split(':')[0]}: {row_peak / 1e12:.3f} TFLOP/s ({row_source})")
    speedup = ours["tokens_per_s"] / reference["tokens_per_s"] if reference else None
    if speedup:
        print(f"speed-up ours / reference: {speedup:.2f}x")
    # the first run pays the compile; later runs in this process reuse its graphs
    compile_seconds = runs[0].get("compile_seconds")
    if compile_seconds is not None:
        print(f"compile: {compile_seconds:.1f} s in the first run (before its timed steps)")
    if device.type == "cpu" and (args.layers, args.heads, args.width, args.context, args.vocab,
                                 args.batch) == (4, 4, 256, 256, 8192, 16):
        print("for context, the issue's nanoGPT figures at this shape on this 2-core machine: "
              + ", ".join(f"{k} ~{v:,} tok/s" for k, v in ISSUE_NANOGPT_TOKENS_PER_S.items()))

    print(json.dumps({
        "tokens_per_s": round(ours["tokens_per_s"], 1),
        "reference_tokens_per_s": round(reference["tokens_per_s"], 1) if reference else None,
        "speedup": round(speedup, 3) if speedup else None,
        "mfu": round(ours["mfu"], 4) if ours["mfu"] is not None else None,
        "dtype": dtype, "dtype_reason": dtype_reason, "cpu": cpu_model(), "cpu_capability": capability,
        "peak_flops": peak, "peak_source": source,
        "flops_per_token": fpt, "compile_seconds": compile_seconds,
        "device": where, "load_average": [round(load_before, 2), round(load_after, 2)],
        "config": {"layers": args.layers, "heads": args.heads,
                                    "width": args.width, "context": args.context,
                                    "vocab": args.vocab, "batch": args.batch,
                                    "steps": args.steps, "warmup_steps": args.warmup_steps,
                                    "repeat": args.repeat,
                                    "dtype": args.dtype, "compile": args.compile == "on",
                                    "reference_dtype": args.reference_dtype,
                                    "threads": threads}}))


if __name__ == "__main__":
    main()
