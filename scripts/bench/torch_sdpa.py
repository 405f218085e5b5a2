"""PyTorch's side of scripts/gpu-check's attention rows: scaled_dot_product_attention on its flash backend at SD 1.5's
attention shapes, bf16, batch 8 and 32, on the GPU; the lines have the form of tests/gpu_check.rs's
`f_flash_attention_throughput` (zeroconv's flash kernels), so the two can be read side by side.

FLOPs by FlashAttention's convention: forward 4*B*H*Lq*Lk*D, backward 2.5 times that. 3 untimed runs, then the
mean of 10, synchronised. Usage: python3 torch_sdpa.py"""
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel



def shapes():
    """(what, batch, heads, lq, lk, head dim) from sd15_attention_shapes.csv, the list tests/gpu_check.rs reads."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd15_attention_shapes.csv")
    with open(path) as f:
        rows = [line.strip().split(",") for line in f if line.strip() and not line.startswith("#")]
    return [(what, *map(int, numbers)) for what, *numbers in rows]


def mean_seconds(fn, runs=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / runs


torch.manual_seed(18)
with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
    for what, b, h, lq, lk, d in shapes():
        q = torch.randn(b, h, lq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, h, lk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, h, lk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn(b, h, lq, d, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            fwd = mean_seconds(lambda: F.scaled_dot_product_attention(q, k, v))
        both = mean_seconds(lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), dout))
        flops = 4.0 * b * h * lq * lk * d
        print(f"attention {what}, batch {b}: forward {fwd * 1e3:.3f} ms ({flops / fwd / 1e12:.1f} TFLOP/s), "
              f"forward+backward {both * 1e3:.3f} ms ({3.5 * flops / both / 1e12:.1f} TFLOP/s)")
