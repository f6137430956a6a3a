"""MFU accounting: FLOPs per token, peak FLOP/s (spec sheet or measured), MFU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trainer import perf
from trainer.model import GPT, GPTConfig

TINY = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)


def test_flops_per_token_hand_count():
    # per layer: qkv 3*32*32 + proj 32*32 + fc 32*128 + proj 128*32 = 12288 weights;
    # 2 layers + the tied lm_head 64*32 = 26624 matmul weights -> 6 * 26624 = 159744;
    # attention: 12 * 2 layers * 32 wide * 16 tokens = 12288
    assert perf.flops_per_token(TINY, 16) == 159744 + 12288
    # the attention term grows with the window, the weight term does not
    assert perf.flops_per_token(TINY, 32) - perf.flops_per_token(TINY, 16) == 12 * 2 * 32 * 16


def test_flops_per_token_matches_torch_flop_counter():
    # torch's own count of every matmul in a forward + backward of the real model; the math
    # attention backend computes the full T x T square, as the formula counts it
    model = GPT(TINY)
    idx = torch.randint(0, TINY.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    assert counter.get_total_flops() / idx.numel() == perf.flops_per_token(TINY, 16)


def test_mfu_arithmetic():
    # 1000 tok/s * 2e9 FLOP/token = 2e12 FLOP/s, a fifth of a 1e13 peak
    assert perf.mfu(1000.0, 2e9, 1e13) == pytest.approx(0.2)
    assert perf.mfu(1000.0, 2e9, 2e12) == pytest.approx(1.0)
    # above the peak: the peak figure is wrong, so there is no MFU to report
    assert perf.mfu(1000.0, 2e9, 1.9e12) is None
    with pytest.raises(ValueError, match="peak"):
        perf.mfu(1000.0, 2e9, 0.0)


@pytest.mark.parametrize("name, dtype, tflops, label", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4, "H100 SXM"),
    ("NVIDIA H100 PCIe", "bf16", 756.0, "H100 PCIe"),
    ("NVIDIA H200", "bf16", 989.4, "H200"),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0, "A100"),
    ("NVIDIA A100-PCIE-40GB", "tf32", 156.0, "A100"),
    ("NVIDIA A10G", "fp32", 31.2, "A10G"),
    ("NVIDIA L40S", "fp16", 362.1, "L40S"),
    ("NVIDIA L4", "bf16", 121.0, "L4"),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2, "RTX 4090"),
    ("Tesla V100-SXM2-16GB", "fp16", 125.0, "V100"),
    ("Tesla T4", "float32", 8.1, "T4"),
])
def test_gpu_table_lookup_by_name(name, dtype, tflops, label):
    peak, found_label = perf.gpu_peak_flops(name, dtype)
    assert peak == pytest.approx(tflops * 1e12)
    assert label in found_label


def test_gpu_table_unknown_name_or_dtype():
    assert perf.gpu_peak_flops("Some Future GPU 9000", "bf16") is None
    assert perf.gpu_peak_flops("Tesla T4", "bf16") is None  # no bf16 tensor cores
    with pytest.raises(ValueError, match="dtype"):
        perf.gpu_peak_flops("NVIDIA L4", "int4")


def test_cuda_peak_uses_table_and_tf32_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    peak, source = perf.peak_flops(torch.device("cuda"), "bfloat16")
    assert peak == 312e12 and source == "spec sheet: NVIDIA A100 bf16 dense"
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert perf.peak_flops(torch.device("cuda"), "float32")[0] == 19.5e12
        torch.set_float32_matmul_precision("high")  # float32 matmuls on tensor cores
        assert perf.peak_flops(torch.device("cuda"), "float32") == (
            156e12, "spec sheet: NVIDIA A100 tf32 dense")
    finally:
        torch.set_float32_matmul_precision(precision)


def test_cpu_peak_is_measured_and_cached(monkeypatch):
    peak, source = perf.peak_flops(torch.device("cpu"), "float32")
    assert peak > 1e8  # any CPU torch runs on does better than 0.1 GFLOP/s
    assert source.startswith("measured:") and "fp32" in source
    assert f"{torch.get_num_threads()} threads" in source
    # a second call in the process reuses the measurement instead of timing again
    def no_matmul(*args, **kwargs):
        raise AssertionError("timed the matmul again")
    monkeypatch.setattr(torch, "matmul", no_matmul)
    assert perf.peak_flops(torch.device("cpu"), "float32") == (peak, source)


def test_cpu_peak_probe_is_bounded_and_adapts_its_size(monkeypatch):
    # A CPU on which matmuls run at 2 GFLOP/s (bf16 without native kernels, or a busy
    # machine): the probe must stay small instead of timing a 2048^3 matmul (~9 s here)
    real = torch.matmul

    def slow_matmul(a, b):
        time.sleep(2.0 * a.shape[0] * a.shape[1] * b.shape[1] / 2e9)
        return real(a, b)

    monkeypatch.setattr(torch, "matmul", slow_matmul)
    monkeypatch.setattr(perf, "_measured", {})
    t0 = time.perf_counter()
    peak, source = perf.measure_matmul_peak(torch.device("cpu"), "bfloat16")
    assert time.perf_counter() - t0 < 1.5
    assert "matmul 256^3, median of 5" in source and "bf16" in source
    assert 0.5e9 < peak < 2e9  # the sleep caps it at 2 GFLOP/s; what it measures comes near


def test_cpu_peak_probe_grows_to_a_large_size_where_matmuls_are_fast(monkeypatch):
    monkeypatch.setattr(perf, "_measured", {})
    t0 = time.perf_counter()
    peak, source = perf.measure_matmul_peak(torch.device("cpu"), "float32")
    assert time.perf_counter() - t0 < 2.0  # about a second, plus a busy neighbour's share
    size = int(source.split("matmul ")[1].split("^3")[0])
    assert size in (256, 512, 1024, 2048) and peak > 1e8


def test_resolve_device():
    assert perf.resolve_device("cpu") == torch.device("cpu")
    assert perf.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device = 'cuda'.*no CUDA"):
            perf.resolve_device("cuda")


def test_resolve_dtype_on_this_cpu():
    cpu = torch.device("cpu")
    assert perf.resolve_dtype(cpu, "float32") == ("float32", "as configured")
    with pytest.raises(ValueError, match="train.dtype = 'float16' needs a CUDA GPU"):
        perf.resolve_dtype(cpu, "float16")
    dtype, reason = perf.resolve_dtype(cpu, "auto")
    capability = torch.backends.cpu.get_cpu_capability()
    assert reason.startswith("auto: ") and capability in reason
    native = (torch.ops.mkldnn._is_mkldnn_bf16_supported()
              and perf.cpu_bf16_speedup() >= perf.BF16_MIN_SPEEDUP)
    assert dtype == ("bfloat16" if native else "float32")
    # cached: the flow's plan and the training agree, and the second call costs nothing
    t0 = time.perf_counter()
    assert perf.resolve_dtype(cpu, "auto") == (dtype, reason)
    assert time.perf_counter() - t0 < 0.01


def test_resolve_dtype_follows_the_measured_bf16_speed(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(perf, "_bf16_speedup", {"cpu": 2.4})
    assert perf.resolve_dtype(cpu, "auto") == (
        "bfloat16", f"auto: bf16 matmuls ran at 2.40x fp32's speed "
                    f"({torch.backends.cpu.get_cpu_capability()}, 256^3)")
    # bf16 kernels that are no faster (AVX-512 without bf16 instructions): float32
    monkeypatch.setattr(perf, "_bf16_speedup", {"cpu": 0.9})
    assert perf.resolve_dtype(cpu, "auto")[0] == "float32"
    dtype, reason = perf.resolve_dtype(cpu, "bfloat16")
    assert dtype == "bfloat16" and reason.startswith("warning: ") and "0.90x" in reason


def test_resolve_dtype_skips_the_probe_without_onednn_bf16(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(perf, "_bf16_speedup", {})

    def no_matmul(*args, **kwargs):
        raise AssertionError("timed a matmul")

    monkeypatch.setattr(torch, "matmul", no_matmul)
    dtype, reason = perf.resolve_dtype(torch.device("cpu"), "auto")
    assert dtype == "float32" and "no native bf16" in reason and "not timed" in reason


@pytest.mark.parametrize("bf16, requested, expected", [
    (True, "auto", "bfloat16"), (False, "auto", "float32"),
    (True, "bfloat16", "bfloat16"), (False, "bfloat16", "float16"),
    (False, "float16", "float16"), (True, "float32", "float32"),
])
def test_resolve_dtype_on_a_gpu(monkeypatch, bf16, requested, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    dtype, reason = perf.resolve_dtype(torch.device("cuda"), requested)
    assert dtype == expected and reason


AVX2_PROBE = """
import json, time, torch
from trainer import perf
t0 = time.perf_counter(); auto = perf.resolve_dtype(torch.device("cpu"), "auto"); t_auto = time.perf_counter() - t0
t0 = time.perf_counter(); asked = perf.resolve_dtype(torch.device("cpu"), "bfloat16"); t_asked = time.perf_counter() - t0
t0 = time.perf_counter(); peak = perf.measure_matmul_peak(torch.device("cpu"), "bfloat16"); t_peak = time.perf_counter() - t0
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "auto": auto, "t_auto": t_auto,
                  "asked": asked, "t_asked": t_asked, "peak": peak, "t_peak": t_peak}))
"""


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 only")
def test_a_cpu_without_native_bf16_trains_in_float32():
    # An AVX2-only CPU, as oneDNN and ATen see one when limited to AVX2: bf16 matmuls there
    # run ~100x slower than fp32, and one 2048^3 bf16 matmul took minutes
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", AVX2_PROBE], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.splitlines()[-1])
    assert r["capability"] == "AVX2"
    assert r["auto"][0] == "float32" and "not timed" in r["auto"][1] and r["t_auto"] < 0.05
    assert r["asked"][0] == "bfloat16" and r["asked"][1].startswith("warning: ")
    ratio = float(r["asked"][1].split("ran at ")[1].split("x")[0])
    assert ratio < 0.5 and r["t_asked"] < 1.0
    # ~2 GFLOP/s: it stays at 256^3 or 512^3 (not 2048^3, ~9 s per matmul)
    assert r["t_peak"] < 2.0 and any(f"bf16 matmul {n}^3" in r["peak"][1] for n in (256, 512))
