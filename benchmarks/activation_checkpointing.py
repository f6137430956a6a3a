"""Activation checkpointing (train.activation_checkpointing): memory and speed, with and without.

Two shapes: the demo model as configs/demo.toml trains it (4 layers x 128 wide, context 64,
batch 32, vocab 4096), and the same model at context 512, batch 16, where activations,
not weights, take the memory. Each (shape, setting) runs in a fresh subprocess, a training
step as train() does it (GPT.forward with the chunked loss, backward, fused AdamW) on
random tokens, in the dtype train() picks here (--dtype):

  speed       tokens/s over --steps steps after 2 warm-up steps; runs alternate off/on
              --repeats times and the best of each is kept (the cores may be shared)
  torch peak  the most bytes torch had allocated at once during one step, above what lives
              between steps (weights, AdamW state): from torch.profiler's memory events
              (profile_memory=True), summed in time order
  RSS         the process's peak resident set during the steps above its resident set
              before them (VmHWM after resetting it through /proc/self/clear_refs), and the
              whole process's max RSS (getrusage); this child runs with a fixed glibc mmap
              threshold, so freed tensors leave the RSS instead of staying in the heap

    .venv/bin/python benchmarks/activation_checkpointing.py [--steps 10] [--dtype auto]

The last line printed is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from trainer import perf  # noqa: E402
from trainer.model import GPT, GPTConfig  # noqa: E402
from trainer.train import DTYPES, TrainConfig, param_groups  # noqa: E402


def demo_shapes() -> dict[str, dict]:
    demo = tomllib.loads((ROOT / "configs" / "demo.toml").read_text())
    known = TrainConfig.__pydantic_fields__
    t = TrainConfig(**{k: v for k, v in demo["train"].items() if k in known})
    model = {"vocab_size": demo["tokenizer"]["vocab_size"], "n_layer": t.n_layer, "n_head": t.n_head,
             "n_embd": t.n_embd}
    return {"demo": {**model, "block_size": t.block_size, "batch": t.batch_size},
            "context 512": {**model, "block_size": 512, "batch": 16}}


def cpu_description() -> dict:
    info = {"model": "unknown", "family": None, "model_number": None}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (s.strip() for s in line.partition(":"))
            if key == "model name" and info["model"] == "unknown":
                info["model"] = value
            elif key == "cpu family" and info["family"] is None:
                info["family"] = int(value)
            elif key == "model" and info["model_number"] is None:
                info["model_number"] = int(value)
    except OSError:
        pass
    return {**info, "capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "cores": len(os.sched_getaffinity(0))}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(spec: dict) -> dict:
    """One (shape, setting) in this fresh process: speed or memory."""
    shape, dtype = spec["shape"], spec["dtype"]
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=shape["vocab_size"], block_size=shape["block_size"], n_layer=shape["n_layer"],
                       n_head=shape["n_head"], n_embd=shape["n_embd"])
    model = GPT(config).train()
    model.activation_checkpointing = spec["checkpointing"]
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
    autocast = torch.autocast("cpu", dtype=DTYPES[dtype], enabled=DTYPES[dtype] is not None)
    batch, T = shape["batch"], shape["block_size"]

    def step() -> None:
        idx = torch.randint(0, config.vocab_size, (batch, T + 1))
        with autocast:
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up; AdamW's state exists after the first
        step()
    if spec["kind"] == "speed":
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            step()
        return {"tokens_per_s": spec["steps"] * batch * T / (time.perf_counter() - t0)}

    rss_before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    for _ in range(2):
        step()
    rss_step_mb = (_status_kb("VmHWM") - rss_before) / 1024 if reset else None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return {"torch_step_peak_mb": peak / 2**20, "rss_step_peak_mb": rss_step_mb,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}


def run_child(spec: dict) -> dict:
    env = dict(os.environ)
    if spec["kind"] == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # fixed: large blocks go back to the OS on free
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child {spec['kind']} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per speed run")
    p.add_argument("--repeats", type=int, default=2, help="speed runs per setting, alternating; best kept")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads; 0 = torch's default (all cores); 1 suffers least from busy neighbours")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    dtype, reason = perf.resolve_dtype(torch.device("cpu"), args.dtype)
    cpu = cpu_description()
    print(f"CPU: {cpu['model']} (family {cpu['family']}, model {cpu['model_number']}), "
          f"{cpu['capability']}, {cpu['cores']} cores, {args.threads or torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; dtype {dtype}: {reason}; "
          f"load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    results = []
    for name, shape in demo_shapes().items():
        row = {"shape": name, **shape}
        for on in (False, True):
            mem = run_child({"kind": "memory", "shape": shape, "dtype": dtype, "checkpointing": on,
                             "threads": args.threads})
            row.update({f"{k}_{'on' if on else 'off'}": v for k, v in mem.items()})
        for _ in range(args.repeats):
            for on in (False, True):
                speed = run_child({"kind": "speed", "shape": shape, "dtype": dtype, "checkpointing": on,
                                   "steps": args.steps, "threads": args.threads})["tokens_per_s"]
                key = f"tokens_per_s_{'on' if on else 'off'}"
                row[key] = max(row.get(key, 0.0), speed)
        row["speed_ratio"] = row["tokens_per_s_on"] / row["tokens_per_s_off"]
        row["torch_peak_ratio"] = row["torch_step_peak_mb_on"] / row["torch_step_peak_mb_off"]
        rss = [row[f"rss_step_peak_mb_{k}"] for k in ("off", "on")]
        print(f"{name:12s} B={shape['batch']} T={shape['block_size']}: torch step peak "
              f"{row['torch_step_peak_mb_off']:.0f} -> {row['torch_step_peak_mb_on']:.0f} MB "
              f"(x{row['torch_peak_ratio']:.2f}); RSS step peak "
              + " -> ".join("n/a" if v is None else f"{v:.0f}" for v in rss)
              + f" MB; max RSS {row['max_rss_mb_off']:.0f} -> "
              f"{row['max_rss_mb_on']:.0f} MB; tokens/s {row['tokens_per_s_off']:,.0f} -> "
              f"{row['tokens_per_s_on']:,.0f} (x{row['speed_ratio']:.2f})")
        results.append(row)
    print(json.dumps({"benchmark": "activation_checkpointing", "cpu": cpu, "dtype": dtype,
                      "threads": args.threads or torch.get_num_threads(),
                      "date": time.strftime("%Y-%m-%d", time.gmtime()), "steps": args.steps, "shapes": results}))


if __name__ == "__main__":
    main()
