"""Training tokens/s in 1 process against N data-parallel processes (train.processes).

The demo's model (configs/demo.toml: 4 layers x 4 heads x 128 wide, context 64, batch 32
per process, vocab 4096) trains on random-token shards through trainer.train.train(),
with processes = 1 (in this process), processes = N (torchrun started by train(), gloo on
the CPU), and processes = 1 at N x the batch (the same global batch as N processes),
alternating, --repeat times. Each process gets cores // processes threads, as the train
stage gives them. tokens/s is train()'s own figure (all ranks'
tokens, the first step left out); wall seconds include torchrun's start. The median of the
repeats is reported: on shared cores single runs are noisy.

    .venv/bin/python benchmarks/ddp_speed.py [--processes 2] [--steps 60] [--repeat 3]

The last line printed is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.train_speed import cpu_model  # noqa: E402
from trainer.data import write_shard  # noqa: E402
from trainer.launch import cores  # noqa: E402
from trainer.train import TrainConfig, train  # noqa: E402


def run(shards: list[Path], vocab: int, processes: int, batch: int, steps: int, dtype: str,
        out: Path) -> dict:
    """One training run; train()'s result and the wall seconds, torchrun's start included."""
    cfg = TrainConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=batch,
                      max_steps=steps + 1, warmup_steps=10, dtype=dtype, processes=processes,
                      log_every=max(10, steps // 3), checkpoint_every=0)
    started = time.perf_counter()
    result = train(shards, vocab, cfg, out, log=lambda _: None)
    return {**result, "wall_s": time.perf_counter() - started}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2, help="the N to compare with 1")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per run")
    ap.add_argument("--batch", type=int, default=32, help="windows per step per process")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    vocab = 4096
    load_before = os.getloadavg()[0]
    n = args.processes
    setups = {"1": (1, args.batch), str(n): (n, args.batch), f"1, batch x{n}": (1, args.batch * n)}
    results: dict[str, list[dict]] = {name: [] for name in setups}
    with tempfile.TemporaryDirectory(prefix="ddp-speed-") as tmp:
        rng = np.random.default_rng(0)
        shards = []
        for i in range(2):
            shards.append(Path(tmp) / f"train_{i}.bin")
            write_shard(shards[-1], rng.integers(0, vocab, 1 << 20).astype(np.uint16))
        for i in range(args.repeat):
            for name, (processes, batch) in setups.items():
                r = run(shards, vocab, processes, batch, args.steps, args.dtype, Path(tmp) / f"run-{len(results[name])}-{i}-{processes}-{batch}")
                results[name].append(r)
                print(f"processes {name}: {r['tokens_per_s']:9,.0f} tokens/s, {r['wall_s']:5.1f} s wall "
                      f"({r['dtype']})", flush=True)
    load_after = os.getloadavg()[0]
    median = {p: statistics.median(r["tokens_per_s"] for r in rs) for p, rs in results.items()}
    wall = {p: statistics.median(r["wall_s"] for r in rs) for p, rs in results.items()}
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"\ncpu: {cpu_model()}, {cores()} cores, capability {capability}, torch {torch.__version__}; "
          f"dtype {results['1'][0]['dtype']}; load average before / after {load_before:.2f} / {load_after:.2f}")
    for name, (processes, batch) in setups.items():
        print(f"processes {name} ({max(1, cores() // processes)} thread(s) each, batch {batch} each): "
              f"median {median[name]:,.0f} tokens/s, {wall[name]:.1f} s wall")
    print(f"ratio {n} / 1: {median[str(n)] / median['1']:.2f}x; "
          f"{n} / (1, batch x{n}): {median[str(n)] / median[f'1, batch x{n}']:.2f}x")
    print(json.dumps({"cpu": cpu_model(), "cores": cores(), "cpu_capability": capability,
                      "dtype": results["1"][0]["dtype"], "batch_per_process": args.batch, "steps": args.steps,
                      "tokens_per_s": {p: [round(r["tokens_per_s"]) for r in rs] for p, rs in results.items()},
                      "median_tokens_per_s": {p: round(v) for p, v in median.items()},
                      "median_wall_s": {p: round(v, 1) for p, v in wall.items()},
                      "ratio": round(median[str(n)] / median["1"], 3),
                      "load_average": [round(load_before, 2), round(load_after, 2)]}))


if __name__ == "__main__":
    main()
