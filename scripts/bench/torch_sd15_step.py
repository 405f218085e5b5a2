"""The PyTorch side of scripts/gpu-check's throughput rows: the SD 1.5 ControlNet training step that
`zeroconv bench train --config configs/controlnet_sd15.yaml` times, in PyTorch, on the same GPU, in the same run.

diffusers' UNet2DConditionModel in SD 1.5's configuration (its defaults but a 768-wide context: 859,520,964
parameters, as SD 1.5's U-Net), frozen, and ControlNetModel.from_unet of it (361,279,120 trainable parameters, what
`zeroconv inspect` counts); random weights, as zeroconv's benchmark uses. One step: ControlNet forward, U-Net forward with the residuals, MSE against a random
target, backward into the ControlNet, AdamW. Latents 64x64, hints 512x512, 77 tokens. Precision `bf16` is autocast
to bfloat16 over fp32 weights (NeMo's bf16-mixed; zeroconv's bf16 keeps fp32 master weights too); `fp32` is plain
fp32 with TF32 off (zeroconv's fp32 is strict). Attention goes through scaled_dot_product_attention (its flash
backend in bf16 on Hopper).

Usage: python3 torch_sd15_step.py MODE PRECISION BATCH [STEPS] [--device cuda|cpu] [--small]
  MODE eager|compile; PRECISION bf16|fp32; 3 untimed steps, then STEPS timed (default 10), synchronised.
  --small: a 2-level, 64-channel model at 16x16 latents, to check the script itself on a CPU.
Prints one line ending in 'samples/s', then the peak memory PyTorch allocated."""
import argparse
import time

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

parser = argparse.ArgumentParser()
parser.add_argument("mode", choices=["eager", "compile"])
parser.add_argument("precision", choices=["bf16", "fp32"])
parser.add_argument("batch", type=int)
parser.add_argument("steps", type=int, nargs="?", default=10)
parser.add_argument("--device", default="cuda")
parser.add_argument("--small", action="store_true")
args = parser.parse_args()

dev = torch.device(args.device)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
if args.small:
    size, ctx_dim = 16, 64
    unet = UNet2DConditionModel(
        sample_size=size, block_out_channels=(64, 64), layers_per_block=1, cross_attention_dim=ctx_dim,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    ctrl = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
else:
    size, ctx_dim = 64, 768
    unet = UNet2DConditionModel(cross_attention_dim=ctx_dim)
    ctrl = ControlNetModel.from_unet(unet)
unet = unet.to(dev).requires_grad_(False)
ctrl = ctrl.to(dev).train()
opt = torch.optim.AdamW(ctrl.parameters(), lr=1e-5)
B = args.batch
x = torch.randn(B, 4, size, size, device=dev)
t = torch.randint(0, 1000, (B,), device=dev)
ctx = torch.randn(B, 77, ctx_dim, device=dev)
hint = torch.rand(B, 3, 8 * size, 8 * size, device=dev)
target = torch.randn(B, 4, size, size, device=dev)
dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32


def step():
    with torch.autocast(dev.type, dtype=dtype, enabled=args.precision == "bf16"):
        down, mid = ctrl(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
        eps = unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(eps.float(), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


if args.mode == "compile":
    step = torch.compile(step)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


for _ in range(3):
    step()
sync()
start = time.perf_counter()
for _ in range(args.steps):
    loss = step()
sync()
secs = (time.perf_counter() - start) / args.steps
print(f"PyTorch {torch.__version__} {args.mode} {args.precision} batch {B}: step {secs:.4f} s (loss {loss.item():.5f}), "
      f"{B / secs:.2f} samples/s")
if dev.type == "cuda":
    print(f"peak memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
