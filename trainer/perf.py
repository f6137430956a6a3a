"""What the hardware can do: the device and dtype to train in, and model FLOPs
utilisation (MFU), the share of the hardware's peak matmul rate that training turns into
model arithmetic.

    mfu = tokens_per_s * flops_per_token / peak_flops

flops_per_token follows the PaLM paper (appendix B) and nanoGPT's `estimate_mfu`: 6 FLOPs
per weight per token (2 forward, 4 backward) plus the attention score and value matmuls.
The peak is the dense (no 2:4 sparsity) spec-sheet figure for known NVIDIA GPUs, and is
MEASURED everywhere else: a CPU's peak depends on its vector units (AVX-512, AMX), clock
and the thread count torch uses, so no table would be right.
"""
from __future__ import annotations

import re
import statistics
import time
from typing import Callable

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
    An encoder (masked LM) runs its head, BERT's C x C dense and the V x C output, on the
    masked positions only: that share of them per token.
    """
    from trainer.masked import masks_per_window

    L, C, V = config.n_layer, config.n_embd, config.vocab_size
    head = V * C if config.causal else masks_per_window(seq_len) / seq_len * (C * C + V * C)
    matmul_params = L * 12 * C * C + head
    return 6.0 * matmul_params + 12.0 * L * C * seq_len


PEAK_TOO_LOW = ("MFU not reported: training ran faster than the measured peak, so the peak "
                "probe underestimated it")


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float | None:
    """Model FLOPs utilisation: the achieved model FLOP/s over the peak FLOP/s.

    None above 1: no run beats the hardware's peak, so the peak figure is wrong (a measured
    probe that ran slow, e.g. while another process had the cores); see PEAK_TOO_LOW."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    value = tokens_per_s * flops_per_token / peak
    return value if value <= 1.0 else None


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


def measure_matmul_peak(device: torch.device, dtype: str, budget: float = 1.0,
                        repeats: int = 5) -> tuple[float, str]:
    """Median FLOP/s of `repeats` timings of square matmuls in `dtype` on `device` with
    torch's current thread count, in about `budget` seconds all told; cached per process.

    The size is picked by timing: it starts small (256 on a CPU) and doubles while the
    repeats at the next size still fit in half the budget, up to 2048 (8192 on a GPU).
    A fixed large size is no option: where a dtype has no native kernels (bf16 on an
    AVX2-only CPU runs ~100x slower than fp32) one 2048^3 matmul takes minutes.
    """
    device = torch.device(device)
    key = DTYPE_NAMES.get(dtype)
    if key is None:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_NAMES)}")
    threads = torch.get_num_threads()
    cache_key = (device.type, key, threads)
    if cache_key in _measured:
        return _measured[cache_key]

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    size, largest = (1024, 8192) if device.type == "cuda" else (256, 2048)

    def one_matmul(n: int) -> tuple[float, Callable[[], torch.Tensor]]:
        a = torch.randn(n, n, device=device).to(TORCH_DTYPES[key])
        b = torch.randn(n, n, device=device).to(TORCH_DTYPES[key])
        fn = lambda: torch.matmul(a, b)  # noqa: E731
        fn()  # warm-up: kernel selection, oneDNN/cuBLAS init
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0, fn

    took, fn = one_matmul(size)
    while size < largest and 8 * took * repeats <= budget / 2:  # 8x the work at twice the size
        size *= 2
        took, fn = one_matmul(size)
    rates = []
    for _ in range(repeats):  # each: as many matmuls as fit in its share, at least one
        n, t0 = 0, time.perf_counter()
        while not n or time.perf_counter() - t0 < budget / 2 / repeats:
            fn()
            sync()
            n += 1
        rates.append(2.0 * size ** 3 * n / (time.perf_counter() - t0))
    where = f"{threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    result = (statistics.median(rates), f"measured: {where} {key} matmul {size}^3, median of {repeats}")
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


# -- device and dtype --------------------------------------------------------------

# auto picks bf16 on a CPU only when its matmuls beat fp32's by this factor. Measured by
# cpu_bf16_speedup (256^3, one thread), at load 4.4 on 2 cores: 1.80-1.98x on a Zen 4 with
# AVX512_BF16, 0.02-0.04x on an AVX2-only CPU (oneDNN limited to AVX2): the threshold sits
# far from both, so the choice (part of the train version) is the same run to run.
# At 128^3 the Zen 4 gave only 1.33x: too close to call, hence 256.
BF16_MIN_SPEEDUP = 1.3
BF16_PROBE_SIZE = 256  # the matmul scale of a small (128-512 wide) model
_bf16_speedup: dict[str, float] = {}  # "cpu" -> measured bf16/fp32 speed ratio


def resolve_device(requested: str) -> torch.device:
    """torch.device for train.device: auto (cuda when torch sees a GPU, else cpu), cpu, cuda."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda' but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    return torch.device(requested)


def cpu_bf16_speedup() -> float:
    """bf16 over fp32 speed of BF16_PROBE_SIZE^3 matmuls on one CPU thread: the ratio of
    the median times of single matmuls, the two dtypes interleaved, 41 pairs or ~0.3 s.
    Cached per process: the flow asks when it plans the run and again when it trains.

    One thread and short single calls, because the cores may be shared: with 2 threads a
    busy neighbour turns each small matmul into a wait for the descheduled partner thread
    (both dtypes then time alike), and a timing window of several calls is often cut by a
    preemption, which moved the ratio between 0.5x and 5x under load; single ~0.5 ms
    calls are seldom cut, and the median skips those that are."""
    if "cpu" not in _bf16_speedup:
        n = BF16_PROBE_SIZE
        a32, b32 = torch.randn(n, n), torch.randn(n, n)
        a16, b16 = a32.bfloat16(), b32.bfloat16()

        def seconds(a: torch.Tensor, b: torch.Tensor) -> float:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            return time.perf_counter() - t0

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            seconds(a32, b32), seconds(a16, b16)  # warm-up: oneDNN kernel creation
            t32, t16, t0 = [], [], time.perf_counter()
            while len(t32) < 5 or (len(t32) < 41 and time.perf_counter() - t0 < 0.3):
                t32.append(seconds(a32, b32))
                t16.append(seconds(a16, b16))
        finally:
            torch.set_num_threads(threads)
        _bf16_speedup["cpu"] = statistics.median(t32) / statistics.median(t16)
    return _bf16_speedup["cpu"]


def resolve_dtype(device: torch.device, requested: str) -> tuple[str, str]:
    """(float32 | bfloat16 | float16, a one-line reason) for train.dtype on `device`.

    auto: bfloat16 where the device runs it natively (a CUDA GPU with bf16; a CPU whose
    oneDNN has bf16 kernels and whose bf16 matmuls run BF16_MIN_SPEEDUP x fp32's speed),
    else float32. bfloat16 on a CPU without native bf16 runs as asked; the reason is then
    a warning with the measured speed ratio. bfloat16 on a GPU without it becomes float16
    (with a grad scaler); float16 needs a GPU.
    """
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return (("bfloat16", "auto: this GPU has bf16") if native else
                    ("float32", "auto: this GPU has no bf16"))
        if requested == "bfloat16" and not native:
            return "float16", "bfloat16 asked, but this GPU has none: float16 with a grad scaler instead"
        return requested, "as configured"
    if requested == "float16":
        raise ValueError("train.dtype = 'float16' needs a CUDA GPU (it trains with a grad scaler); "
                         "on the CPU use 'auto', 'bfloat16' or 'float32'")
    if requested == "float32":
        return "float32", "as configured"
    capability = torch.backends.cpu.get_cpu_capability()
    onednn_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if requested == "auto" and not onednn_bf16:
        return "float32", (f"auto: this CPU has no native bf16 (oneDNN has no bf16 kernels; "
                           f"{capability}), so bf16 was not timed")
    ratio = cpu_bf16_speedup()
    measured = f"bf16 matmuls ran at {ratio:.2f}x fp32's speed ({capability}, {BF16_PROBE_SIZE}^3)"
    fast = onednn_bf16 and ratio >= BF16_MIN_SPEEDUP
    if requested == "auto":
        return ("bfloat16" if fast else "float32"), f"auto: {measured}"
    if fast:
        return "bfloat16", f"as configured; {measured}"
    return "bfloat16", (f"warning: bfloat16 as configured, but this CPU has no native bf16: {measured}; "
                        f"train.dtype = 'auto' would pick float32")
