#!/usr/bin/env python3
"""Files in the diffusers and Hugging Face layouts, written by diffusers' and transformers' own `save_pretrained`,
for zeroconv's layout tests (tests/io_formats/layouts.rs). See tests/fixtures/layouts/README.md.

The models are the tiny parity models of scripts/make_parity_fixtures.py (sd15_tiny U-Net + ControlNet, vae_tiny,
clip_tiny), built exactly as there: deterministic weights under the ORIGINAL LDM key names, converted by diffusers'
own conversion code and loaded strict. Each model is then saved by the library that defines its layout.

What is stored (the generated weights are never stored where that would cost megabytes):
- For the diffusers U-Net, ControlNet and VAE: `config.json` as written, and the weight file's safetensors header
  only (`diffusion_pytorch_model.safetensors.header`: the 8-byte length and the JSON header, byte for byte as
  save_pretrained wrote them), plus `ldm_sources.json`: for each diffusers key, the LDM key whose generated tensor
  diffusers' conversion put there. The Rust tests rebuild the full file: header, then each tensor's values from the
  FNV-1a/SplitMix64 generator of its LDM key, in the header's offset order. The script checks that this rebuild is
  byte-identical to the file save_pretrained wrote.
- For the CLIP text model (90 KB): the whole files. `text_encoder/` as transformers 5 writes it (keys without
  `text_model.`), `text_encoder_v4/` with every key renamed to `text_model.*` (the layout transformers 4 wrote and
  every SD `text_encoder/` folder on the Hub has), and `text_encoder_bin/pytorch_model.bin`, the v4 keys saved
  with torch.save (the `.bin` files of older repositories).

Usage:
    PYTHONPATH=<dir with transformers 5.24> python3 scripts/make_layout_fixtures.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_parity_fixtures as mpf  # noqa: E402  (the tiny models and the weight generator)
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

OUT_DIR = mpf.REPO_ROOT / "tests" / "fixtures" / "layouts"


def header_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[: 8 + n]


def rebuild(header: bytes, sources: dict[str, str], ldm_shapes: dict[str, tuple[int, ...]]) -> bytes:
    """What the Rust tests do: the header, then each tensor's generated values in offset order."""
    meta = json.loads(header[8:])
    entries = sorted(((v["data_offsets"], k) for k, v in meta.items() if k != "__metadata__"))
    out = bytearray(header)
    for (start, end), key in entries:
        assert len(out) - len(header) == start, f"{key}: gap before the tensor"
        ldm = sources[key]
        assert meta[key]["dtype"] == "F32", f"{key}: {meta[key]['dtype']}"
        out += mpf.generated_tensor(ldm, ldm_shapes[ldm]).tobytes()
        assert len(out) - len(header) == end, f"{key}: size differs from its LDM tensor {ldm}"
    return bytes(out)


def save_diffusers(model, converted: mpf.Converted, ldm_shapes: dict, out: Path, scratch: Path) -> None:
    """save_pretrained, then keep the config, the weight file's header and the key provenance."""
    model.save_pretrained(scratch, safe_serialization=True)
    weights = scratch / "diffusion_pytorch_model.safetensors"
    header = header_bytes(weights)
    sources = dict(sorted(converted.ldm_key_of.items()))
    if rebuild(header, sources, ldm_shapes) != weights.read_bytes():
        raise SystemExit(f"{out}: the rebuilt weight file differs from the one save_pretrained wrote")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(scratch / "config.json", out / "config.json")
    (out / "diffusion_pytorch_model.safetensors.header").write_bytes(header)
    (out / "ldm_sources.json").write_text(json.dumps(sources, indent=0) + "\n")
    print(f"  wrote {out.relative_to(mpf.REPO_ROOT)}: {len(sources)} tensors, header {len(header)} bytes")


def sd15(out: Path, scratch: Path) -> None:
    keys = mpf.load_key_list("sd15_tiny")
    shapes = dict(keys)
    weights = mpf.generated_ldm_weights(keys)
    models = mpf.build_sd_models("sd15_tiny", mpf.ldm_original_config(mpf.SD15_TINY_UNET), weights)
    save_diffusers(models.unet, models.unet_keys, shapes, out / "sd15_tiny" / "unet", scratch / "unet")
    save_diffusers(models.controlnet, models.control_keys, shapes, out / "sd15_tiny" / "controlnet", scratch / "cn")


def vae(out: Path, scratch: Path) -> None:
    keys = mpf.load_key_list("vae_tiny")
    weights = mpf.generated_ldm_weights(keys)
    original = mpf.ldm_original_config(ddconfig=mpf.VAE_TINY_DDCONFIG, embed_dim=mpf.VAE_TINY_EMBED_DIM)
    model, config = mpf.build_vae("vae_tiny", original, weights, torch.float32)
    converted = mpf.track_conversion(
        "vae_tiny", weights, mpf.sfu.convert_ldm_vae_checkpoint(weights, config)
    )
    save_diffusers(model, converted, dict(keys), out / "vae_tiny" / "vae", scratch / "vae")


def clip(out: Path, scratch: Path) -> None:
    keys = mpf.load_key_list("clip_tiny")
    weights = mpf.generated_ldm_weights(keys)
    model = CLIPTextModel(CLIPTextConfig(**mpf.CLIP_TINY_CONFIG, attn_implementation="eager"))
    converted = mpf.sfu.convert_ldm_clip_checkpoint(weights)
    if not hasattr(model, "text_model"):  # transformers >= 5.6: no text_model wrapper
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    mpf.load_strict("clip_tiny", model, mpf.track_conversion("clip_tiny", weights, converted))
    v5 = out / "clip_tiny" / "text_encoder"
    model.save_pretrained(scratch / "clip", safe_serialization=True)
    v5.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(scratch / "clip" / name, v5 / name)
    written = mpf.safetensors.safe_open(str(v5 / "model.safetensors"), "pt")
    names = list(written.keys())
    if any(k.startswith("text_model.") for k in names):
        raise SystemExit("this transformers writes text_model.* keys: the fixture expects the transformers 5 layout")
    # transformers 4's layout (and every SD text_encoder/ on the Hub): the same tensors under text_model.*.
    v4_tensors = {f"text_model.{k}": written.get_tensor(k) for k in names}
    v4 = out / "clip_tiny" / "text_encoder_v4"
    v4.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(v5 / "config.json", v4 / "config.json")
    save_file(v4_tensors, str(v4 / "model.safetensors"), metadata={"format": "pt"})
    old = out / "clip_tiny" / "text_encoder_bin"
    old.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(v5 / "config.json", old / "config.json")
    torch.save(v4_tensors, old / "pytorch_model.bin")
    for p in (v5 / "model.safetensors", v4 / "model.safetensors", old / "pytorch_model.bin"):
        p.chmod(0o644)
        print(f"  wrote {p.relative_to(mpf.REPO_ROOT)}: {p.stat().st_size} bytes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    mpf.start_run()
    with tempfile.TemporaryDirectory() as scratch:
        for make in (sd15, vae, clip):
            print(f"{make.__name__}:")
            make(args.out, Path(scratch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
