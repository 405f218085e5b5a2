#!/usr/bin/env python3
"""Checks `zeroconv export --format diffusers` with diffusers itself.

Writes the tiny SD 1.5 parity ControlNet (tests/fixtures/parity, the generator's weights under the original
`control_model.*` keys) to a safetensors file, exports it with the zeroconv binary, loads the folder with diffusers'
`ControlNetModel.from_pretrained`, runs it on the parity inputs and compares its residuals with the ones the parity
fixture recorded from diffusers' own conversion of the same weights (`control.{i}` in sd15_tiny.expected.safetensors).

tests/io_formats/layouts.rs checks the same export without Python (keys, shapes, values and config.json against what
`save_pretrained` wrote); this script is the check by loading, for when torch and diffusers are at hand.

Usage:
    /work/torchenv/bin/python scripts/check_diffusers_export.py target/debug/zeroconv
(torch 2.15.0, diffusers 0.42.1, safetensors 0.8.0)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))
from make_parity_fixtures import generated_tensor, load_key_list  # noqa: E402

PARITY = REPO_ROOT / "tests" / "fixtures" / "parity"

# The tiny SD 1.5 ControlNet's architecture (tests/common: parity_sd15_tiny_unet) as a zeroconv config: the
# ControlNet's keys must equal the U-Net's.
ARCHITECTURE = """
    model_channels: 32
    attention_resolutions: [2, 1]
    num_res_blocks: 1
    channel_mult: [1, 2]
    num_heads: 2
    context_dim: 32"""
CONFIG = f"""
model:
  control_stage_config:
    image_size: 8
    in_channels: 4
    hint_channels: 3{ARCHITECTURE}
  unet_config:{ARCHITECTURE}
"""


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    binary = Path(sys.argv[1]).resolve()
    weights = {
        k: torch.from_numpy(generated_tensor(k, shape).copy())
        for k, shape in load_key_list("sd15_tiny")
        if k.startswith("control_model.")
    }
    with tempfile.TemporaryDirectory(prefix="zeroconv-export-check-") as tmp:
        tmp = Path(tmp)
        save_file(weights, str(tmp / "controlnet.safetensors"))
        (tmp / "tiny.yaml").write_text(CONFIG)
        subprocess.run(
            [str(binary), "export", "--config", "tiny.yaml", "--from", "controlnet.safetensors", "--out", "exported"],
            cwd=tmp,
            check=True,
        )
        model = ControlNetModel.from_pretrained(str(tmp / "exported")).eval()
    inputs = load_file(str(PARITY / "sd15_tiny.inputs.safetensors"))
    expected = load_file(str(PARITY / "sd15_tiny.expected.safetensors"))
    with torch.no_grad():
        down, mid = model(
            inputs["x"],
            inputs["t"],
            encoder_hidden_states=inputs["context"],
            controlnet_cond=inputs["hint"],
            conditioning_scale=1.0,
            return_dict=False,
        )
    outputs = list(down) + [mid]
    worst = 0.0
    for i, got in enumerate(outputs):
        want = expected[f"control.{i}"]
        worst = max(worst, ((got - want).norm() / want.norm()).item())
    count = sum(1 for k in expected if k.startswith("control."))
    if len(outputs) != count or worst > 1e-5:
        print(f"FAIL: {len(outputs)} residuals (fixture: {count}), worst relative error {worst:.3g}")
        return 1
    print(f"ok: diffusers loads the export; {len(outputs)} residuals match the fixture (worst relative error {worst:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
