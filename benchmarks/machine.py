"""The machine a benchmark runs on, printed beside its figures: the CPU (lscpu's model name,
family and model), torch's CPU capability, the cores this process may use, torch's threads."""
from __future__ import annotations

import os
import subprocess

import torch


def cpu() -> dict:
    fields = dict(line.split(":", 1) for line in
                  subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if ":" in line)
    model = ", ".join(f"{k} {fields[k].strip()}" for k in ("Model name", "CPU family", "Model") if k in fields)
    return {"cpu": model, "capability": torch.backends.cpu.get_cpu_capability(),
            "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
