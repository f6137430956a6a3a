"""MFU accounting: FLOPs per token, peak FLOP/s (spec sheet or measured), MFU."""
from __future__ import annotations

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
