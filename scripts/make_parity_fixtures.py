#!/usr/bin/env python3
"""Reference fixtures for zeroconv's parity tests, computed by an independent PyTorch implementation.

Deterministic pseudo-random weights are generated under the ORIGINAL LDM / ControlNet checkpoint key names
listed in tests/fixtures/parity/*.keys.json (the keys the Rust side expects) by a small per-key generator
(FNV-1a 64 of the key seeds SplitMix64) that the Rust tests re-implement, so the weights are never stored.
They are converted with diffusers' own
LDM -> diffusers conversion code, loaded with strict=True into diffusers' UNet2DConditionModel /
ControlNetModel / AutoencoderKL and transformers' CLIPTextModel, and run on CPU in float32.

Any disagreement between a keys.json list and what the conversion + strict load expects (a key the
conversion needs but the list lacks, a listed key the conversion leaves unused, a shape mismatch) is a
hard error: the fixture for that model is not written and the script exits non-zero. See
tests/fixtures/parity/README.md for the file layout.

Usage:
    PYTHONPATH=.tools/py python3 scripts/make_parity_fixtures.py [--only sd15_tiny,clip_tiny] [--out DIR]
        [--weights-out SCRATCH_DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy
import safetensors
import torch
import transformers
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

PINNED_VERSIONS = {
    "torch": "2.15.0",
    "diffusers": "0.42.1",
    "transformers": "5.24.0",
    "safetensors": "0.8.0",
    "numpy": "2.4.6",
}

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "parity"

UNET_PREFIX = "model.diffusion_model."
CONTROL_PREFIX = "control_model."

# ---------------------------------------------------------------------------------------------------------------
# Configurations, written the way the original LDM / ControlNet yaml files write them (cldm_v15.yaml,
# cldm_v21.yaml), because diffusers' config builders read exactly those fields.
# ---------------------------------------------------------------------------------------------------------------

# The U-Net configs only use the first-stage ddconfig for the VAE scale factor (sample_size, informational).
# A real SD VAE downsamples by 8, which is also the ratio of the 64x64 hint to the 8x8 latent.
SD_FIRST_STAGE_DDCONFIG = {"ch": 128, "ch_mult": [1, 2, 4, 4], "z_channels": 4}

SD15_TINY_UNET = {
    "image_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_heads": 2,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 32,
    "use_checkpoint": False,
    "legacy": False,
}

# `num_heads` is deliberately absent (LDM's default is -1, as in cldm_v21.yaml): diffusers'
# create_unet_diffusers_config_from_ldm reads `num_heads` whenever the key is present and would take -1 as the
# head count; only when it is absent does it derive the per-level head counts from `num_head_channels`.
SD2_TINY_UNET = {
    "image_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [4, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 2],
    "num_head_channels": 16,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": 1,
    "context_dim": 24,
    "use_checkpoint": False,
    "legacy": False,
}

VAE_TINY_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
VAE_TINY_EMBED_DIM = 4

CLIP_TINY_CONFIG = {
    "vocab_size": 100,
    "max_position_embeddings": 16,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    # Only used for the pooled output, which the fixture does not record; set inside the tiny vocabulary so that
    # transformers does not warn about the default CLIP ids 49406/49407.
    "bos_token_id": 98,
    "eos_token_id": 99,
    "pad_token_id": 0,
}


def ldm_original_config(unet_params: dict | None = None, ddconfig: dict | None = None, embed_dim: int = 4) -> dict:
    """An LDM/ControlNet yaml as a dict; the ControlNet copies the U-Net encoder params plus hint_channels 3."""
    params: dict = {
        "first_stage_config": {"params": {"embed_dim": embed_dim, "ddconfig": ddconfig or SD_FIRST_STAGE_DDCONFIG}}
    }
    if unet_params is not None:
        params["unet_config"] = {"params": dict(unet_params)}
        params["control_stage_config"] = {"params": {**unet_params, "hint_channels": 3}}
    return {"model": {"params": params}}


# ---------------------------------------------------------------------------------------------------------------
# Deterministic LDM weights. Not stored in the repository: the Rust tests regenerate them bit for bit with the
# same generator, so this section is a contract (documented in tests/fixtures/parity/README.md) and must not
# change without regenerating every fixture and updating the Rust side.
# ---------------------------------------------------------------------------------------------------------------

MASK64 = (1 << 64) - 1
FNV1A64_OFFSET = 0xCBF29CE484222325
FNV1A64_PRIME = 0x100000001B3
SPLITMIX64_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX64_MUL1 = 0xBF58476D1CE4E5B9
SPLITMIX64_MUL2 = 0x94D049BB133111EB


def load_key_list(name: str) -> list[tuple[str, tuple[int, ...]]]:
    path = FIXTURE_DIR / f"{name}.keys.json"
    entries = json.loads(path.read_text())
    keys = [(str(k), tuple(int(d) for d in shape)) for k, shape in entries]
    if len({k for k, _ in keys}) != len(keys):
        raise SystemExit(f"{path}: duplicate keys")
    return keys


def fnv1a64(data: bytes) -> int:
    h = FNV1A64_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV1A64_PRIME) & MASK64
    return h


def splitmix64_scalar(seed: int, count: int) -> list[int]:
    """The textbook sequential SplitMix64, with Python ints; the reference for the vectorised version."""
    state, out = seed, []
    for _ in range(count):
        state = (state + SPLITMIX64_GAMMA) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * SPLITMIX64_MUL1) & MASK64
        z = ((z ^ (z >> 27)) * SPLITMIX64_MUL2) & MASK64
        out.append(z ^ (z >> 31))
    return out


def splitmix64(seed: int, count: int) -> numpy.ndarray:
    """The first `count` SplitMix64 outputs from `seed`, vectorised: the i-th state (1-based) is seed + i*gamma.

    numpy's uint64 array arithmetic wraps modulo 2^64, exactly like the scalar definition.
    """
    with numpy.errstate(over="ignore"):
        state = numpy.uint64(seed) + numpy.arange(1, count + 1, dtype=numpy.uint64) * numpy.uint64(SPLITMIX64_GAMMA)
        z = (state ^ (state >> numpy.uint64(30))) * numpy.uint64(SPLITMIX64_MUL1)
        z = (z ^ (z >> numpy.uint64(27))) * numpy.uint64(SPLITMIX64_MUL2)
        return z ^ (z >> numpy.uint64(31))


def generated_tensor(key: str, shape: tuple[int, ...]) -> numpy.ndarray:
    """One LDM tensor of the deterministic weights, as float32 (see the README for the exact contract)."""
    count = math.prod(shape)
    u = (splitmix64(fnv1a64(key.encode("utf-8")), count) >> numpy.uint64(11)).astype(numpy.float64) * 2.0**-53
    s = 2.0 * u - 1.0  # exact in float64: uniform on [-1, 1)
    if key.endswith(".bias"):
        value = 0.1 * s
    elif len(shape) == 1:
        # The only 1-D non-bias parameters are GroupNorm/LayerNorm scales.
        value = 1.0 + 0.1 * s
    else:
        value = s / math.sqrt(math.prod(shape[1:]))
    return value.astype(numpy.float32).reshape(shape)


def start_run() -> None:
    """What every script generating fixtures from these models does first: print the library versions, check the
    weight generator, and make the float32 CPU math single-threaded (bit-for-bit repeatable) and diffusers quiet."""
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    check_generator()
    torch.set_num_threads(1)
    diffusers.utils.logging.set_verbosity_error()


def check_generator() -> None:
    """Known answers for FNV-1a and SplitMix64, and the vectorised stream against the sequential one."""
    assert fnv1a64(b"") == 0xCBF29CE484222325 and fnv1a64(b"a") == 0xAF63DC4C8601EC8C, "FNV-1a 64 is wrong"
    assert splitmix64_scalar(0, 1) == [0xE220A8397B1DCDAF], "SplitMix64 is wrong"
    for seed in (0, 1, MASK64, fnv1a64(b"model.diffusion_model.input_blocks.0.0.weight")):
        assert splitmix64(seed, 1000).tolist() == splitmix64_scalar(seed, 1000), f"vectorised SplitMix64, seed {seed}"


def generated_ldm_weights(keys: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """weights s/sqrt(fan_in), norm weights 1 + 0.1*s, biases 0.1*s, s uniform on [-1, 1) from the key's stream.

    Every tensor is non-zero, including the ones LDM/ControlNet initialise to zero (zero_convs,
    middle_block_out, input_hint_block's last conv, out.2, proj_out, out_layers.3), so the control path and
    all residual branches contribute. Each tensor gets its own storage, which the conversion bookkeeping
    relies on to trace diffusers parameters back to LDM keys.
    """
    return {key: torch.from_numpy(generated_tensor(key, shape).copy()) for key, shape in keys}


# ---------------------------------------------------------------------------------------------------------------
# Conversion with bookkeeping: every diffusers tensor must come from exactly one listed LDM key, every listed LDM
# key must be used, and the result must match the diffusers model's parameters name for name and shape for shape.
# ---------------------------------------------------------------------------------------------------------------


class ConversionMismatch(Exception):
    """The keys.json list and diffusers' conversion + strict load disagree."""


def storage_id(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


@dataclass
class Converted:
    state_dict: dict[str, torch.Tensor]
    # diffusers parameter name -> LDM key it was converted from
    ldm_key_of: dict[str, str]


def track_conversion(label: str, ldm_weights: dict[str, torch.Tensor], converted: dict) -> Converted:
    by_storage = {storage_id(t): key for key, t in ldm_weights.items()}
    problems = []
    missing = sorted(name for name, t in converted.items() if t is None)
    if missing:
        problems.append(f"the conversion needs LDM tensors that the key list lacks, for diffusers keys {missing}")
    ldm_key_of = {}
    for name, tensor in converted.items():
        if tensor is None:
            continue
        source = by_storage.get(storage_id(tensor))
        if source is None:
            problems.append(f"diffusers key {name!r} is not a view of any listed LDM tensor")
            continue
        ldm_key_of[name] = source
    used = set(ldm_key_of.values())
    unused = sorted(set(ldm_weights) - used)
    if unused:
        problems.append(f"{len(unused)} listed LDM keys are left unused by the conversion: {unused}")
    if problems:
        raise ConversionMismatch(f"{label}: " + "; ".join(problems))
    return Converted({n: t for n, t in converted.items() if t is not None}, ldm_key_of)


def load_strict(label: str, model: torch.nn.Module, converted: Converted) -> None:
    """Report every name/shape disagreement precisely, then load with strict=True."""
    expected = model.state_dict()
    problems = []
    absent = sorted(set(expected) - set(converted.state_dict))
    extra = sorted(set(converted.state_dict) - set(expected))
    if absent:
        problems.append(f"the diffusers model has parameters the conversion did not produce: {absent}")
    if extra:
        named = [f"{n} (from {converted.ldm_key_of[n]})" for n in extra]
        problems.append(f"the conversion produced keys the diffusers model does not have: {named}")
    for name in sorted(set(expected) & set(converted.state_dict)):
        got, want = tuple(converted.state_dict[name].shape), tuple(expected[name].shape)
        if got != want:
            problems.append(f"{converted.ldm_key_of[name]} -> {name}: LDM shape {got} but diffusers expects {want}")
    if problems:
        raise ConversionMismatch(f"{label}: " + "; ".join(problems))
    model.load_state_dict(converted.state_dict, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# SD U-Net + ControlNet
# ---------------------------------------------------------------------------------------------------------------


def diffusers_unet_and_controlnet_configs(original_config: dict, checkpoint: dict) -> tuple[dict, dict]:
    # image_size is the pixel size (latent 8 x VAE factor 8); it only sets the informational sample_size.
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original_config, checkpoint, image_size=64)
    # diffusers 0.42.1's create_controlnet_diffusers_config_from_ldm calls create_unet_diffusers_config_from_ldm
    # without its required `checkpoint` argument (TypeError), so the ControlNet config is taken from the U-Net
    # config with the same field selection that function makes, plus the hint channels.
    control_params = original_config["model"]["params"]["control_stage_config"]["params"]
    shared = [
        "in_channels",
        "down_block_types",
        "block_out_channels",
        "layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
        "use_linear_projection",
        "class_embed_type",
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "transformer_layers_per_block",
    ]
    controlnet_config = {"conditioning_channels": control_params["hint_channels"]}
    controlnet_config.update({k: unet_config[k] for k in shared})
    return unet_config, controlnet_config


@dataclass
class SdModels:
    unet: UNet2DConditionModel
    controlnet: ControlNetModel
    unet_keys: Converted
    control_keys: Converted
    unet_config: dict
    controlnet_config: dict


def build_sd_models(
    name: str, original_config: dict, ldm_weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> SdModels:
    foreign = sorted(k for k in ldm_weights if not k.startswith((UNET_PREFIX, CONTROL_PREFIX)))
    if foreign:
        raise ConversionMismatch(f"{name}: keys outside {UNET_PREFIX}* / {CONTROL_PREFIX}*: {foreign}")
    unet_config, controlnet_config = diffusers_unet_and_controlnet_configs(original_config, ldm_weights)

    unet_ldm = {k: v for k, v in ldm_weights.items() if k.startswith(UNET_PREFIX)}
    control_ldm = {k: v for k, v in ldm_weights.items() if k.startswith(CONTROL_PREFIX)}
    unet_keys = track_conversion(f"{name} U-Net", unet_ldm, sfu.convert_ldm_unet_checkpoint(unet_ldm, unet_config))
    control_keys = track_conversion(
        f"{name} ControlNet", control_ldm, sfu.convert_controlnet_checkpoint(control_ldm, controlnet_config)
    )

    # Cast before loading: load_state_dict copies into the parameters' existing dtype.
    unet = UNet2DConditionModel(**unet_config).to(dtype)
    controlnet = ControlNetModel(**controlnet_config).to(dtype)
    load_strict(f"{name} U-Net", unet, unet_keys)
    load_strict(f"{name} ControlNet", controlnet, control_keys)
    unet.eval()
    controlnet.eval()
    return SdModels(unet, controlnet, unet_keys, control_keys, unet_config, controlnet_config)


def controlled_eps(models: SdModels, inputs: dict, control_scale: float = 1.0):
    """ControlledUnetModel: control[-1] is added to the middle-block output, control[i] to skip i."""
    down, mid = models.controlnet(
        inputs["x"],
        inputs["t"],
        encoder_hidden_states=inputs["context"],
        controlnet_cond=inputs["hint"],
        conditioning_scale=control_scale,
        guess_mode=False,
        return_dict=False,
    )
    eps = models.unet(
        inputs["x"],
        inputs["t"],
        encoder_hidden_states=inputs["context"],
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        return_dict=False,
    )[0]
    return eps, list(down) + [mid]


def sd_inputs(context_dim: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(2, 4, 8, 8, generator=generator),
        "t": torch.tensor([17, 803], dtype=torch.int64),
        "context": torch.randn(2, 5, context_dim, generator=generator),
        "hint": torch.rand(2, 3, 64, 64, generator=generator),
        "target": torch.randn(2, 4, 8, 8, generator=generator),
    }


def ldm_grads(models: SdModels, ldm_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of the ControlNet parameters, renamed to their LDM keys and reshaped to the LDM shapes."""
    grads = {}
    for param_name, param in models.controlnet.named_parameters():
        ldm_key = models.control_keys.ldm_key_of[param_name]
        if param.grad is None:
            raise SystemExit(f"no gradient reached ControlNet parameter {param_name} ({ldm_key})")
        if ldm_key in grads:
            raise SystemExit(f"two ControlNet parameters come from the same LDM key {ldm_key}")
        grads[ldm_key] = param.grad.detach().reshape(ldm_weights[ldm_key].shape).clone()
    missing = sorted(k for k in ldm_weights if k.startswith(CONTROL_PREFIX) and k not in grads)
    if missing:
        raise SystemExit(f"ControlNet LDM keys without a gradient: {missing}")
    return grads


def check_control_scale_zero(models: SdModels, inputs: dict) -> None:
    """With the residuals scaled to zero the controlled U-Net must equal the plain U-Net."""
    with torch.no_grad():
        eps_zero, residuals = controlled_eps(models, inputs, control_scale=0.0)
        plain = models.unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"], return_dict=False)[0]
        controlled, _ = controlled_eps(models, inputs, control_scale=1.0)
    assert all(torch.count_nonzero(r) == 0 for r in residuals), "scale-0 residuals are not zero"
    torch.testing.assert_close(eps_zero, plain, rtol=0, atol=1e-6)
    # And the control path must matter, otherwise the fixture would not test it.
    assert (controlled - plain).abs().max() > 1e-3, "ControlNet residuals do not change eps"


def check_against_float64(
    name: str, original_config: dict, ldm_weights: dict, inputs: dict, eps: torch.Tensor, grads: dict[str, torch.Tensor]
) -> None:
    """Redo eps and the gradients in float64 through a fresh conversion, and check the gradients two ways.

    1. Central difference of the loss along a random direction in LDM key space. The perturbation is applied to
       the LDM tensors before converting, so this also checks the diffusers -> LDM renaming of the gradients.
    2. The stored float32 gradients against the float64 ones, to bound the fixture's own rounding error
       (the same is printed for eps).
    """
    inputs64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}

    def models_at(weights: dict[str, torch.Tensor]) -> SdModels:
        models = build_sd_models(name, original_config, weights, dtype=torch.float64)
        models.unet.requires_grad_(False)
        return models

    weights64 = {k: v.double() for k, v in ldm_weights.items()}
    models = models_at(weights64)
    eps64, _ = controlled_eps(models, inputs64)
    ((eps64 - inputs64["target"]) ** 2).mean().backward()
    grads64 = ldm_grads(models, weights64)
    eps_error = (eps.double() - eps64.detach()).abs().max().item()
    print(f"  {name}: float32 eps vs float64: max abs error {eps_error:.1e} (max |eps| {eps64.abs().max().item():.1e})")
    assert eps_error < 1e-4 * eps64.abs().max().item(), f"{name}: float32 eps too far from float64"

    generator = torch.Generator().manual_seed(1234)
    direction = {k: torch.randn(g.shape, generator=generator, dtype=torch.float64) for k, g in grads64.items()}

    def loss_at(step: float) -> float:
        shifted = {k: v + step * direction[k] if k in direction else v for k, v in weights64.items()}
        with torch.no_grad():
            eps, _ = controlled_eps(models_at(shifted), inputs64)
            return ((eps - inputs64["target"]) ** 2).mean().item()

    h = 1e-6
    numeric = (loss_at(h) - loss_at(-h)) / (2 * h)
    analytic = sum((grads64[k] * direction[k]).sum().item() for k in grads64)
    rel = abs(numeric - analytic) / max(abs(numeric), 1e-12)
    print(f"  {name}: float64 directional derivative {analytic:.9e}, central difference {numeric:.9e} (rel {rel:.1e})")
    assert rel < 1e-6, f"{name}: float64 gradient disagrees with the central difference (rel {rel})"

    scale = max(g.abs().max().item() for g in grads64.values())
    worst = max((grads[k].double() - grads64[k]).abs().max().item() for k in grads64)
    print(f"  {name}: float32 gradients vs float64: max abs error {worst:.1e} (largest gradient {scale:.1e})")
    assert worst < 1e-4 * scale, f"{name}: float32 gradients are too far from float64 ({worst} vs scale {scale})"


def make_sd_fixture(name: str, unet_params: dict, input_seed: int) -> dict:
    keys = load_key_list(name)
    original_config = ldm_original_config(unet_params)
    ldm_weights = generated_ldm_weights(keys)
    models = build_sd_models(name, original_config, ldm_weights)
    print(f"  {name}: diffusers U-Net config {json.dumps(models.unet_config)}")
    print(f"  {name}: diffusers ControlNet config {json.dumps(models.controlnet_config)}")

    inputs = sd_inputs(unet_params["context_dim"], input_seed)
    check_control_scale_zero(models, inputs)

    # The U-Net is frozen (no parameter gradients) but differentiated through: the ControlNet's residuals
    # reach the loss only via the U-Net.
    models.unet.requires_grad_(False)
    models.controlnet.requires_grad_(True)
    eps, control = controlled_eps(models, inputs)
    loss = ((eps - inputs["target"]) ** 2).mean()
    loss.backward()
    grads = ldm_grads(models, ldm_weights)

    # diffusers pairs residuals with skips by zip(), which would silently drop extras: check the counts.
    def count_indices(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in ldm_weights if k.startswith(prefix)})

    n_zero_convs = count_indices(CONTROL_PREFIX + "zero_convs.")
    n_skips = count_indices(UNET_PREFIX + "input_blocks.")
    assert len(control) == n_zero_convs + 1 == n_skips + 1, f"{len(control)} control outputs, {n_skips} skips"

    check_against_float64(name, original_config, ldm_weights, inputs, eps.detach(), grads)

    expected = {"eps": eps.detach(), "loss": loss.detach().reshape(())}
    expected.update({f"control.{i}": c.detach() for i, c in enumerate(control)})
    expected.update({f"grad.{k}": g for k, g in grads.items()})
    configs = {
        "ldm_unet_config": unet_params,
        "diffusers_unet_config": models.unet_config,
        "diffusers_controlnet_config": models.controlnet_config,
    }
    return {"weights": ldm_weights, "inputs": inputs, "expected": expected, "_configs": configs}


# ---------------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------------


def build_vae(name: str, original_config: dict, ldm_weights: dict[str, torch.Tensor], dtype: torch.dtype):
    foreign = sorted(k for k in ldm_weights if not k.startswith("first_stage_model."))
    if foreign:
        raise ConversionMismatch(f"{name}: keys outside first_stage_model.*: {foreign}")
    vae_config = sfu.create_vae_diffusers_config_from_ldm(
        original_config, ldm_weights, image_size=VAE_TINY_DDCONFIG["resolution"]
    )
    converted = track_conversion(name, ldm_weights, sfu.convert_ldm_vae_checkpoint(ldm_weights, vae_config))
    vae = AutoencoderKL(**vae_config).to(dtype)
    try:
        load_strict(name, vae, converted)
    except ConversionMismatch as mismatch:
        level_attention = sorted({k.rsplit(".attn.", 1)[0] for k in ldm_weights if ".attn." in k})
        if level_attention:
            raise ConversionMismatch(
                f"{mismatch}. Cause: ddconfig attn_resolutions {VAE_TINY_DDCONFIG['attn_resolutions']} puts LDM "
                f"AttnBlocks into {level_attention}; diffusers' create_vae_diffusers_config_from_ldm always builds "
                "DownEncoderBlock2D/UpDecoderBlock2D (attention only in the mid blocks, as in the SD VAE whose "
                "attn_resolutions is []) and convert_ldm_vae_checkpoint has no mapping for these keys"
            ) from None
        raise
    vae.eval()
    return vae, vae_config


def vae_outputs(vae: AutoencoderKL, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        posterior = vae.encode(inputs["image"]).latent_dist
        decoded = vae.decode(inputs["z"]).sample
    return {"mean": posterior.mean, "logvar": posterior.logvar, "decoded": decoded}


def make_vae_fixture(name: str, input_seed: int) -> dict:
    keys = load_key_list(name)
    original_config = ldm_original_config(ddconfig=VAE_TINY_DDCONFIG, embed_dim=VAE_TINY_EMBED_DIM)
    ldm_weights = generated_ldm_weights(keys)
    vae, vae_config = build_vae(name, original_config, ldm_weights, torch.float32)
    print(f"  {name}: diffusers AutoencoderKL config {json.dumps(vae_config)}")

    generator = torch.Generator().manual_seed(input_seed)
    inputs = {
        "image": 2.0 * torch.rand(2, 3, 32, 32, generator=generator) - 1.0,
        "z": torch.randn(2, 4, 16, 16, generator=generator),
    }
    expected = vae_outputs(vae, inputs)
    with torch.no_grad():
        # Second way: the modules by hand (quant_conv after the encoder, post_quant_conv before the decoder).
        moments = vae.quant_conv(vae.encoder(inputs["image"]))
        mean, logvar = torch.chunk(moments, 2, dim=1)
        torch.testing.assert_close(expected["mean"], mean, rtol=0, atol=0)
        torch.testing.assert_close(expected["logvar"], logvar.clamp(-30.0, 20.0), rtol=0, atol=0)
        decoded = vae.decoder(vae.post_quant_conv(inputs["z"]))
        torch.testing.assert_close(expected["decoded"], decoded, rtol=0, atol=0)

    # The same in float64 through a fresh conversion, to bound the fixture's own float32 rounding.
    vae64, _ = build_vae(name, original_config, {k: v.double() for k, v in ldm_weights.items()}, torch.float64)
    expected64 = vae_outputs(vae64, {k: v.double() for k, v in inputs.items()})
    for part, value in expected.items():
        error = (value.double() - expected64[part]).abs().max().item()
        scale = expected64[part].abs().max().item()
        print(f"  {name}: float32 {part} vs float64: max abs error {error:.1e} (max |{part}| {scale:.1e})")
        assert error < 1e-4 * scale, f"{name}: float32 {part} too far from float64"
    configs = {
        "ldm_ddconfig": VAE_TINY_DDCONFIG,
        "ldm_embed_dim": VAE_TINY_EMBED_DIM,
        "diffusers_vae_config": vae_config,
    }
    return {"weights": ldm_weights, "inputs": inputs, "expected": expected, "_configs": configs}


# ---------------------------------------------------------------------------------------------------------------
# CLIP text encoder
# ---------------------------------------------------------------------------------------------------------------


def clip_by_hand(weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Pre-LN causal transformer with quick_gelu MLP, straight from the LDM-named tensors."""
    cfg = CLIP_TINY_CONFIG
    p = "cond_stage_model.transformer.text_model."

    def w(name: str) -> torch.Tensor:
        return weights[p + name]

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(
            x, x.shape[-1:], w(name + ".weight"), w(name + ".bias"), cfg["layer_norm_eps"]
        )

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ w(name + ".weight").T + w(name + ".bias")

    batch, length = ids.shape
    heads, width = cfg["num_attention_heads"], cfg["hidden_size"]
    x = w("embeddings.token_embedding.weight")[ids] + w("embeddings.position_embedding.weight")[:length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    for layer in range(cfg["num_hidden_layers"]):
        block = f"encoder.layers.{layer}."
        h = norm(x, block + "layer_norm1")
        q, k, v = (
            linear(h, block + f"self_attn.{n}_proj").reshape(batch, length, heads, -1).transpose(1, 2) for n in "qkv"
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads) + causal
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)
        x = x + linear(attended, block + "self_attn.out_proj")
        h = linear(norm(x, block + "layer_norm2"), block + "mlp.fc1")
        x = x + linear(h * torch.sigmoid(1.702 * h), block + "mlp.fc2")
    return norm(x, "final_layer_norm")


def make_clip_fixture(name: str, input_seed: int) -> dict:
    keys = load_key_list(name)
    ldm_weights = generated_ldm_weights(keys)
    foreign = sorted(k for k in ldm_weights if not k.startswith("cond_stage_model.transformer."))
    if foreign:
        raise ConversionMismatch(f"{name}: keys outside cond_stage_model.transformer.*: {foreign}")
    model = CLIPTextModel(CLIPTextConfig(**CLIP_TINY_CONFIG, attn_implementation="eager"))
    converted_dict = sfu.convert_ldm_clip_checkpoint(ldm_weights)
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` wrapper); diffusers' own loader
    # (create_diffusers_clip_model_from_ldm) then drops that prefix from the converted keys, and so do we.
    if not hasattr(model, "text_model"):
        converted_dict = {k.removeprefix("text_model."): v for k, v in converted_dict.items()}
    converted = track_conversion(name, ldm_weights, converted_dict)
    load_strict(name, model, converted)
    model.eval()

    generator = torch.Generator().manual_seed(input_seed)
    inputs = {"ids": torch.randint(0, CLIP_TINY_CONFIG["vocab_size"], (2, 7), generator=generator, dtype=torch.int64)}
    with torch.no_grad():
        out = model(input_ids=inputs["ids"], output_hidden_states=True)
        hidden = out.last_hidden_state
        model_text = getattr(model, "text_model", model)
        # Second way: last_hidden_state is final_layer_norm of the last encoder layer's output.
        torch.testing.assert_close(hidden, model_text.final_layer_norm(out.hidden_states[-1]), rtol=0, atol=0)
        # Causal mask: changing the last token must leave earlier positions unchanged.
        changed = inputs["ids"].clone()
        changed[:, -1] = (changed[:, -1] + 1) % CLIP_TINY_CONFIG["vocab_size"]
        hidden_changed = model(input_ids=changed).last_hidden_state
        torch.testing.assert_close(hidden_changed[:, :-1], hidden[:, :-1], rtol=0, atol=1e-6)
        assert (hidden_changed[:, -1] - hidden[:, -1]).abs().max() > 1e-4
        # Third way: the CLIP text transformer written out from the LDM tensors.
        torch.testing.assert_close(hidden, clip_by_hand(ldm_weights, inputs["ids"]), rtol=1e-5, atol=1e-5)
    configs = {"clip_text_config": CLIP_TINY_CONFIG}
    return {"weights": ldm_weights, "inputs": inputs, "expected": {"hidden": hidden}, "_configs": configs}


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------

FIXTURES = {
    "sd15_tiny": lambda: make_sd_fixture("sd15_tiny", SD15_TINY_UNET, input_seed=1501),
    "sd2_tiny": lambda: make_sd_fixture("sd2_tiny", SD2_TINY_UNET, input_seed=2101),
    "vae_tiny": lambda: make_vae_fixture("vae_tiny", input_seed=3101),
    "clip_tiny": lambda: make_clip_fixture("clip_tiny", input_seed=4101),
}


def versions() -> dict[str, str]:
    return {
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
    }


WEIGHTS_PROVENANCE = (
    "not stored: regenerate from the keys.json list with the FNV-1a/SplitMix64 generator of "
    "tests/fixtures/parity/README.md"
)

# Printed on every run and quoted in the README, so that a re-implementation of the generator can be checked.
GENERATOR_CHECK_KEYS = [
    ("model.diffusion_model.input_blocks.0.0.weight", (32, 4, 3, 3)),
    ("model.diffusion_model.input_blocks.0.0.bias", (32,)),
    ("model.diffusion_model.out.0.weight", (32,)),
]


def print_generator_check_values() -> None:
    for key, shape in GENERATOR_CHECK_KEYS:
        seed = fnv1a64(key.encode("utf-8"))
        first = generated_tensor(key, shape).reshape(-1)[:3]
        # Shortest float32 round-trip decimal (what Rust's `{}` prints for an f32) and the bit pattern.
        values = ", ".join(f"{v!s} (0x{v.view(numpy.uint32):08x})" for v in first)
        print(f"  {key} {list(shape)}: fnv1a64 0x{seed:016x}, first draw 0x{splitmix64(seed, 1)[0]:016x}")
        print(f"    first float32 values: {values}")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    path.chmod(0o644)  # safetensors writes through a private temporary file (0600)
    shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
    print(f"  wrote {shown}: {len(tensors)} tensors, {path.stat().st_size} bytes")


def write_fixture(name: str, fixture: dict, out_dir: Path, weights_dir: Path | None) -> None:
    # One metadata entry only: safetensors writes the metadata map in no fixed order, and a single key keeps the
    # files byte-for-byte reproducible.
    provenance = {
        "generator": "scripts/make_parity_fixtures.py",
        "versions": versions(),
        "weights": WEIGHTS_PROVENANCE,
        **fixture["_configs"],
    }
    metadata = {"fixture": json.dumps(provenance, sort_keys=True)}
    for part in ("inputs", "expected"):
        save_tensors(fixture[part], out_dir / f"{name}.{part}.safetensors", metadata)
    if weights_dir is not None:
        save_tensors(fixture["weights"], weights_dir / f"{name}.weights.safetensors", metadata)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(FIXTURES))
    parser.add_argument("--out", type=Path, default=FIXTURE_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--any-versions", action="store_true", help="run even if the versions differ from the pins")
    parser.add_argument(
        "--weights-out",
        type=Path,
        help="also write the generated weights as {name}.weights.safetensors here (for debugging; never commit them)",
    )
    args = parser.parse_args()

    found = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    wrong = {k: (found[k], v) for k, v in PINNED_VERSIONS.items() if found[k] != v}
    if wrong and not args.any_versions:
        print(f"error: versions differ from scripts/parity-requirements.txt: {wrong} (use --any-versions)")
        return 2

    names = list(FIXTURES) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in FIXTURES]
    if unknown:
        print(f"error: unknown fixture(s) {unknown}; known: {list(FIXTURES)}")
        return 2

    check_generator()
    print("generator check values:")
    print_generator_check_values()

    # Single-threaded float32 CPU math so that regeneration on one machine is bit-for-bit repeatable.
    torch.set_num_threads(1)
    diffusers.utils.logging.set_verbosity_error()  # the float64 re-runs cast models with .to(), which it warns about
    warnings.filterwarnings("ignore", message="`image_size` is deprecated")  # only sets the informational sample_size
    torch.set_default_dtype(torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.weights_out is not None:
        args.weights_out.mkdir(parents=True, exist_ok=True)
    failures = []
    for name in names:
        print(f"{name}:")
        try:
            fixture = FIXTURES[name]()
        except ConversionMismatch as mismatch:
            print(f"  KEY/SHAPE MISMATCH, fixture not written: {mismatch}")
            failures.append(name)
            continue
        write_fixture(name, fixture, args.out, args.weights_out)
    if failures:
        print(f"error: no fixture for {failures}: the LDM key list disagrees with diffusers' conversion (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
