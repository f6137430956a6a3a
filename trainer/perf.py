"""Model FLOPs utilisation (MFU): the share of the hardware's peak matmul rate that
training turns into model arithmetic.

    mfu = tokens_per_s * flops_per_token / peak_flops

flops_per_token follows the PaLM paper (appendix B) and nanoGPT's `estimate_mfu`: 6 FLOPs
per weight per token (2 forward, 4 backward) plus the attention score and value matmuls.
The peak is the dense (no 2:4 sparsity) spec-sheet figure for known NVIDIA GPUs, and is
MEASURED everywhere else: a CPU's peak depends on its vector units (AVX-512, AMX), clock
and the thread count torch uses, so no table would be right.
"""
from __future__ import annotations

import re
import time

import torch

from trainer.model import GPTConfig

# Dense peak TFLOP/s from NVIDIA's data sheets (the sparsity figures halved back).
# "tf32" is what float32 matmuls get on tensor cores when torch allows it
# (torch.set_float32_matmul_precision("high")); "fp32" is the plain CUDA-core rate.
# GeForce cards: bf16/fp16 with fp32 accumulation, which is what torch matmuls use.
# A dtype missing from a row has no tensor-core path on that GPU (V100/T4 have no bf16).
# Patterns are tried in order, so the more specific names come first.
GPU_PEAK_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    (r"H100.*(PCIe|PCI-E)", "NVIDIA H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"H100.*NVL", "NVIDIA H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100", "NVIDIA H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H200.*NVL", "NVIDIA H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H200|GH200", "NVIDIA H200 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", "NVIDIA A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bA10G\b", "NVIDIA A10G", {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    (r"\bA10\b", "NVIDIA A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"L40S", "NVIDIA L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL40\b", "NVIDIA L40", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", "NVIDIA L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"RTX 4090", "NVIDIA GeForce RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 3090", "NVIDIA GeForce RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"RTX A6000", "NVIDIA RTX A6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    (r"V100.*PCIE", "NVIDIA V100 PCIe", {"fp16": 112.0, "fp32": 14.0}),
    (r"V100", "NVIDIA V100 SXM2", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bT4\b", "NVIDIA T4", {"fp16": 65.0, "fp32": 8.1}),
]

DTYPE_NAMES = {"float32": "fp32", "fp32": "fp32", "tf32": "tf32", "bfloat16": "bf16",
               "bf16": "bf16", "float16": "fp16", "fp16": "fp16"}
TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                "fp16": torch.float16}

_measured: dict[tuple, tuple[float, str]] = {}  # (device type, dtype, threads) -> peak, source


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a `seq_len`-token window.

    6 * N: each matmul weight does a multiply-add (2 FLOPs) forward and two backward (the
    input and the weight gradients). N counts the matmul weights only: per layer qkv
    3C^2, attention proj C^2, MLP 8C^2; plus the tied lm_head, V*C, counted because it
    does a vocab x n_embd matmul for every token even though its weight is the token
    embedding's (the embedding lookup itself is a gather, no FLOPs). Position embeddings,
    biases and LayerNorm gains do no matmul and are left out (nanoGPT keeps biases and
    LayerNorms in; they are <1% of N at any useful width).
    Attention: q.k^T and att.v are each 2*T*C FLOPs per token per layer forward, times 3
    for forward + backward = 12*L*C*T. That counts the full T x T square, as PaLM and
    nanoGPT do, although the causal mask makes half of it skippable.
    """
    L, C, V = config.n_layer, config.n_embd, config.vocab_size
    matmul_params = L * 12 * C * C + V * C
    return 6.0 * matmul_params + 12.0 * L * C * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: the achieved model FLOP/s over the peak FLOP/s."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_s * flops_per_token / peak


def gpu_peak_flops(name: str, dtype: str) -> tuple[float, str] | None:
    """(dense spec-sheet FLOP/s, label) for a GPU named like torch.cuda.get_device_name,
    or None for a GPU or dtype not in the table. dtype: fp32, tf32, bf16 or fp16."""
    key = DTYPE_NAMES.get(dtype)
    if key is None:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_NAMES)}")
    for pattern, label, tflops in GPU_PEAK_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            if key not in tflops:
                return None
            return tflops[key] * 1e12, label
    return None


def measure_matmul_peak(device: torch.device, dtype: str, size: int | None = None,
                        seconds: float = 0.3, repeats: int = 3) -> tuple[float, str]:
    """Best-of-`repeats` FLOP/s of size^3 matmuls in `dtype` on `device` with torch's
    current thread count, each repeat running about `seconds`; cached per process."""
    device = torch.device(device)
    key = DTYPE_NAMES.get(dtype)
    if key is None:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_NAMES)}")
    threads = torch.get_num_threads()
    size = size or (8192 if device.type == "cuda" else 2048)
    cache_key = (device.type, key, threads, size)
    if cache_key in _measured:
        return _measured[cache_key]

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(size, size, device=device).to(TORCH_DTYPES[key])
    b = torch.randn(size, size, device=device).to(TORCH_DTYPES[key])
    torch.matmul(a, b)  # warm-up: kernel selection, oneDNN/cuBLAS init
    sync()
    best = 0.0
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            n += 1
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
        best = max(best, 2.0 * size ** 3 * n / elapsed)
    where = f"{threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    result = (best, f"measured: {where} {key} matmul {size}^3")
    _measured[cache_key] = result
    return result


def peak_flops(device: torch.device, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for training in `dtype` on `device`.

    CUDA: the dense spec-sheet peak for a known GPU; float32 means tf32 when torch lets
    float32 matmuls use tensor cores (float32_matmul_precision "high" or "medium").
    Anything else (CPU, unknown GPU): a measured matmul peak.
    """
    device = torch.device(device)
    key = DTYPE_NAMES.get(dtype)
    if key is None:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_NAMES)}")
    if device.type == "cuda":
        if key == "fp32" and torch.get_float32_matmul_precision() != "highest":
            key = "tf32"
        found = gpu_peak_flops(torch.cuda.get_device_name(device), key)
        if found is not None:
            peak, label = found
            return peak, f"spec sheet: {label} {key} dense"
    return measure_matmul_peak(device, key)
