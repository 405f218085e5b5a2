"""PyTorch's side of scripts/gpu-check's attention rows: scaled_dot_product_attention on its flash backend at SD 1.5's
attention shapes, bf16, batch 8 and 32, on the GPU; the lines have the form of tests/gpu_check.rs's
`f_flash_attention_throughput` (zeroconv's flash kernels), so the two can be read side by side.

FLOPs by FlashAttention's convention: forward 4*B*H*Lq*Lk*D, backward 2.5 times that. 3 untimed runs, then the
mean of 10, synchronised. Usage: python3 torch_sdpa.py"""
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [  # (what, batch, heads, lq, lk, head dim): the same list as tests/gpu_check.rs
    ("self 64x64, d 40", 8, 8, 4096, 4096, 40),
    ("self 32x32, d 80", 8, 8, 1024, 1024, 80),
    ("self 16x16, d 160", 8, 8, 256, 256, 160),
    ("cross 64x64 x 77, d 40", 8, 8, 4096, 77, 40),
    ("self 64x64, d 40", 32, 8, 4096, 4096, 40),
    ("self 32x32, d 80", 32, 8, 1024, 1024, 80),
    ("self 16x16, d 160", 32, 8, 256, 256, 160),
    ("cross 64x64 x 77, d 40", 32, 8, 4096, 77, 40),
]


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
    for what, b, h, lq, lk, d in SHAPES:
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
