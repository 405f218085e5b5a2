#!/usr/bin/env python3
"""Sampling trajectories written by diffusers' own StableDiffusionControlNetPipeline + DDIMScheduler, for
tests/graph_cpu/sample_pipeline.rs, which replays them with zeroconv's sampler core on the same weights (loaded through
zeroconv's loaders from both the LDM file and the diffusers pipeline folder). See tests/fixtures/pipeline/README.md.

Versions used for the committed fixture: torch 2.15.0, diffusers 0.42.1, transformers 5.24.0, safetensors 0.8.0,
numpy 2.4.6 (printed on every run).

The models are the tiny layout/parity models: the sd15_tiny U-Net and ControlNet and the vae_tiny VAE built by
scripts/make_parity_fixtures.py from the FNV-1a/SplitMix64 weights of their LDM keys (converted by diffusers' own
conversion code, loaded strict: the models whose save_pretrained files tests/fixtures/layouts/ holds), and the CLIP
text model transformers wrote into tests/fixtures/layouts/clip_tiny/text_encoder/.
The scheduler is DDIMScheduler configured as Stable Diffusion configures it (scripts/make_ddim_fixture.py's
SD_SCHEDULER: scaled_linear 0.00085..0.012 over 1000 steps, "leading" spacing, steps_offset 1, set_alpha_to_one
False): the schedule of a zeroconv run with SD's config (linear_start, linear_end, timesteps).

Every case runs the real pipeline `__call__` with given `latents=` (x_T), `prompt_embeds=`/`negative_prompt_embeds=`
(the text model's output on fixed token ids, also stored, so the test checks zeroconv's text encoder on them) and
`image=` (control maps in [0, 1], checked to reach the ControlNet unchanged), and records the latents after every
step (callback_on_step_end), the VAE decoder's raw output (before the pipeline maps [-1, 1] to [0, 1]) and the
pipeline's `output_type="pt"` image.

What is patched, and why:
- Guess mode. diffusers 0.42.1's ControlNetModel scales the residuals by `torch.logspace(-1, 0, n) *
  conditioning_scale` (0.1 up to 1). The original ControlNet and NeMo (whose semantics zeroconv follows) use
  `strength * 0.825 ** (12 - i)` for SD's 13 residuals. The generator wraps the ControlNet's forward so that in guess
  mode it computes the unscaled residuals and multiplies residual i of n by `conditioning_scale * 0.825 ** (n-1-i)`:
  for SD's 13 residuals exactly NeMo's list; for this tiny model's 5, zeroconv's ramp (`controlnet::control_scales`,
  ending at 1 on the middle block as diffusers' does; NeMo's code zips a fixed 13-entry list with the residuals and
  would use its first 5 entries, 0.825**12 to 0.825**8, for such a model). Outside guess mode the ControlNet runs
  unpatched. The script checks that the patch changes the result (so the comparison does test the scales) and prints
  by how much.
  The rest of guess mode is diffusers' own: with CFG the ControlNet runs on the conditional half only and the
  unconditional half gets zero residuals (the original ControlNet: no control on the unconditional branch).
- eta > 0. DDIMScheduler.step draws its variance noise with randn_tensor; the generator wraps `step` to draw that
  noise itself from a seeded torch.Generator, pass it through step's own `variance_noise` argument and record it,
  so zeroconv's core consumes the same noise.

Usage (transformers is not in the shared torch environment; install it into a git-ignored folder):
    python3 -m pip install --no-deps --target .tools/pytf transformers==5.24.0 tokenizers==0.23.3
    PYTHONPATH=.tools/pytf /work/torchenv/bin/python scripts/make_pipeline_fixture.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_parity_fixtures as mpf  # noqa: E402  (the tiny models and the weight generator)
from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline  # noqa: E402
from make_ddim_fixture import SD_SCHEDULER  # noqa: E402  (Stable Diffusion's scheduler config)
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

OUT_DIR = mpf.REPO_ROOT / "tests" / "fixtures" / "pipeline"
CLIP_DIR = mpf.REPO_ROOT / "tests" / "fixtures" / "layouts" / "clip_tiny" / "text_encoder"

BATCH = 2
LATENT_SIDE = 4  # the ControlNet's hint is 8x the latent side: 32x32 control maps
BOS, EOS = mpf.CLIP_TINY_CONFIG["bos_token_id"], mpf.CLIP_TINY_CONFIG["eos_token_id"]
CONTEXT = mpf.CLIP_TINY_CONFIG["max_position_embeddings"]

# Token ids as SD's tokenizer lays them out (BOS, tokens, EOS, padded with EOS): two captions, one negative prompt
# (the same for both images, as `--negative` is), and the empty prompt (the unconditional text without a negative).
CAPTIONS = [[11, 25, 37], [52, 7]]
NEGATIVE = [63, 81, 4]

# name -> pipeline arguments. `uncond` names the unconditional text: "negative" or "empty".
CASES = {
    "no_cfg": dict(steps=4, guidance=1.0, uncond="empty", scale=1.0, guess_mode=False, eta=0.0),
    "cfg_negative": dict(steps=4, guidance=7.5, uncond="negative", scale=1.0, guess_mode=False, eta=0.0),
    "cfg_scale": dict(steps=4, guidance=5.0, uncond="empty", scale=0.6, guess_mode=False, eta=0.0),
    "guess_cfg": dict(steps=4, guidance=7.5, uncond="negative", scale=0.8, guess_mode=True, eta=0.0),
    "guess_no_cfg": dict(steps=3, guidance=1.0, uncond="empty", scale=1.0, guess_mode=True, eta=0.0),
    "eta": dict(steps=5, guidance=7.5, uncond="negative", scale=1.0, guess_mode=False, eta=0.7),
}


def padded(tokens: list[int]) -> list[int]:
    ids = [BOS, *tokens, EOS]
    return ids + [EOS] * (CONTEXT - len(ids))


def nemo_guess_scales(n: int, conditioning_scale: float) -> list[float]:
    """Guess mode's per-residual scales as the original ControlNet / NeMo / zeroconv define them (see above)."""
    return [conditioning_scale * 0.825 ** (n - 1 - i) for i in range(n)]


def patch_guess_mode(controlnet, calls: list) -> None:
    """Guess mode with NeMo's scales instead of diffusers' logspace; records what each call received."""
    original = controlnet.forward

    def forward(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, guess_mode=False,
                **kwargs):
        calls.append({"rows": sample.shape[0], "guess_mode": guess_mode, "cond": controlnet_cond.detach().clone(),
                      "context": encoder_hidden_states.detach().clone()})
        if not guess_mode:
            return original(sample, timestep, encoder_hidden_states, controlnet_cond,
                            conditioning_scale=conditioning_scale, guess_mode=False, **kwargs)
        if kwargs.get("return_dict", True):
            raise SystemExit("the pipeline asked the ControlNet for a return_dict: the patch expects tuples")
        down, mid = original(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                             guess_mode=False, **kwargs)
        scales = nemo_guess_scales(len(down) + 1, float(conditioning_scale))
        return [d * s for d, s in zip(down, scales, strict=False)], mid * scales[-1]

    controlnet.forward = forward


def record_variance_noise(scheduler, seed: int, noises: list, replay: list | None = None) -> None:
    """DDIMScheduler.step with its eta > 0 noise drawn here (seeded; or taken from `replay`) and passed as
    `variance_noise`, recorded."""
    original = scheduler.step
    drawn = torch.Generator().manual_seed(seed)

    # The pipeline passes `eta` and `generator` because this signature has them (it gives no generator: None).
    def step(model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        if variance_noise is not None or generator is not None:
            raise SystemExit("the pipeline passed its own generator or variance noise")
        noise = None
        if eta > 0:
            if replay is None:
                noise = torch.randn(model_output.shape, generator=drawn, dtype=model_output.dtype)
            else:
                noise = replay[len(noises)].to(model_output.dtype)
            noises.append(noise.clone())
        return original(model_output, timestep, sample, eta=eta, use_clipped_model_output=use_clipped_model_output,
                        variance_noise=noise, return_dict=return_dict)

    scheduler.step = step


def build_pipeline() -> StableDiffusionControlNetPipeline:
    sd_weights = mpf.generated_ldm_weights(mpf.load_key_list("sd15_tiny"))
    sd = mpf.build_sd_models("sd15_tiny", mpf.ldm_original_config(mpf.SD15_TINY_UNET), sd_weights)
    vae_original = mpf.ldm_original_config(ddconfig=mpf.VAE_TINY_DDCONFIG, embed_dim=mpf.VAE_TINY_EMBED_DIM)
    vae, _ = mpf.build_vae("vae_tiny", vae_original, mpf.generated_ldm_weights(mpf.load_key_list("vae_tiny")),
                           torch.float32)
    text = CLIPTextModel.from_pretrained(CLIP_DIR, attn_implementation="eager").eval()
    return StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text, tokenizer=None, unet=sd.unet, controlnet=sd.controlnet,
        scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def run_case(
    pipe, name: str, case: dict, inputs: dict, patched: bool = True, replay: list | None = None
) -> dict[str, torch.Tensor]:
    pipe.scheduler = DDIMScheduler(**SD_SCHEDULER)
    noises: list = []
    record_variance_noise(pipe.scheduler, seed=7007, noises=noises, replay=replay)
    calls: list = []
    original_forward = pipe.controlnet.forward
    if patched:
        patch_guess_mode(pipe.controlnet, calls)
    decoded: list = []
    vae_decode = pipe.vae.decode

    def decode(z, *args, **kwargs):
        out = vae_decode(z, *args, **kwargs)
        decoded.append(out[0].detach().clone())
        return out

    pipe.vae.decode = decode
    latents: list = []
    timesteps: list = []

    def on_step(_pipe, i, t, kwargs):
        latents.append(kwargs["latents"].detach().clone())
        timesteps.append(int(t))
        return {}

    uncond = inputs["uncond_" + case["uncond"]]
    with torch.no_grad():
        image = pipe(
            prompt_embeds=inputs["cond_embeds"], negative_prompt_embeds=uncond, image=inputs["hint"],
            latents=inputs["latents"].clone(), num_inference_steps=case["steps"], guidance_scale=case["guidance"],
            controlnet_conditioning_scale=case["scale"], guess_mode=case["guess_mode"], eta=case["eta"],
            output_type="pt", callback_on_step_end=on_step,
        ).images
    pipe.vae.decode = vae_decode
    pipe.controlnet.forward = original_forward
    assert len(latents) == case["steps"] and len(decoded) == 1, name
    assert len(noises) == (case["steps"] if case["eta"] > 0 else 0), f"{name}: {len(noises)} noise draws"
    want_ts = DDIMScheduler(**SD_SCHEDULER)
    want_ts.set_timesteps(case["steps"])
    assert timesteps == [int(t) for t in want_ts.timesteps], f"{name}: timesteps {timesteps}"
    if patched:
        check_controlnet_calls(name, case, inputs, calls, uncond)
    out = {f"{name}.latents.{k}": x for k, x in enumerate(latents)}
    out.update({f"{name}.noise.{k}": n for k, n in enumerate(noises)})
    out[f"{name}.decoded"] = decoded[0]
    out[f"{name}.image"] = image
    return out


def check_controlnet_calls(name: str, case: dict, inputs: dict, calls: list, uncond: torch.Tensor) -> None:
    """What the pipeline gave the ControlNet: the control maps unchanged, and the halves the case implies."""
    assert len(calls) == case["steps"], f"{name}: {len(calls)} ControlNet calls"
    cfg = case["guidance"] > 1.0
    for call in calls:
        assert call["guess_mode"] == case["guess_mode"], name
        if cfg and not case["guess_mode"]:
            # [unconditional, conditional]: diffusers' order of the halves.
            assert call["rows"] == 2 * BATCH, name
            assert torch.equal(call["cond"], torch.cat([inputs["hint"]] * 2)), f"{name}: control maps changed"
            assert torch.equal(call["context"], torch.cat([uncond, inputs["cond_embeds"]])), name
        else:
            # No CFG, or guess mode with CFG: the ControlNet sees only the conditional rows.
            assert call["rows"] == BATCH, name
            assert torch.equal(call["cond"], inputs["hint"]), f"{name}: control maps changed"
            assert torch.equal(call["context"], inputs["cond_embeds"]), name


def float64_rounding(pipe, inputs: dict, tensors: dict) -> None:
    """The same cases in float64, to bound the fixture's own float32 rounding (the test's tolerance is 1e-4 of the
    largest magnitude; the fixture must sit well inside it)."""
    pipe64 = pipe.to(torch.float64)
    inputs64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    worst = 0.0
    for name, case in CASES.items():
        replay = [tensors[f"{name}.noise.{k}"] for k in range(case["steps"])] if case["eta"] > 0 else None
        out = run_case(pipe64, name, case, inputs64, replay=replay)
        for key, value in out.items():
            if ".noise." in key:
                continue
            error = (tensors[key].double() - value).abs().max().item() / value.abs().max().item()
            worst = max(worst, error)
    pipe.to(torch.float32)
    print(f"  float32 fixture vs the same pipeline in float64: largest error {worst:.1e} of the largest magnitude")
    assert worst < 1e-5, "the float32 fixture is too far from float64 for a 1e-4 comparison"


def make_inputs(text: CLIPTextModel) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1515)
    ids = {
        "cond_ids": torch.tensor([padded(c) for c in CAPTIONS], dtype=torch.int64),
        "negative_ids": torch.tensor([padded(NEGATIVE)] * BATCH, dtype=torch.int64),
        "empty_ids": torch.tensor([padded([])] * BATCH, dtype=torch.int64),
    }
    with torch.no_grad():
        # What the pipeline's encode_prompt takes from the text model (clip_skip None): the last hidden state.
        embeds = {k.replace("_ids", ""): text(input_ids=v).last_hidden_state for k, v in ids.items()}
    return {
        **ids,
        "cond_embeds": embeds["cond"],
        "uncond_negative": embeds["negative"],
        "uncond_empty": embeds["empty"],
        "latents": torch.randn(BATCH, 4, LATENT_SIDE, LATENT_SIDE, generator=generator),
        "hint": torch.rand(BATCH, 3, 8 * LATENT_SIDE, 8 * LATENT_SIDE, generator=generator),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    mpf.start_run()
    pipe = build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    inputs = make_inputs(pipe.text_encoder)
    tensors = dict(inputs)
    for name, case in CASES.items():
        out = run_case(pipe, name, case, inputs)
        final = out[f"{name}.latents.{case['steps'] - 1}"]
        print(f"  {name}: max |x_0| {final.abs().max().item():.3g}, max |decoded| "
              f"{out[f'{name}.decoded'].abs().max().item():.3g}")
        tensors.update(out)
    # The guess-mode patch must matter, or the guess-mode cases would not test zeroconv's scales.
    for name in ("guess_cfg", "guess_no_cfg"):
        case = CASES[name]
        last = f"{name}.latents.{case['steps'] - 1}"
        diffusers_scales = run_case(pipe, name, case, inputs, patched=False)[last]
        change = (diffusers_scales - tensors[last]).abs().max().item() / tensors[last].abs().max().item()
        print(f"  {name}: diffusers' logspace scales instead of NeMo's change x_0 by {change:.2e} (relative)")
        assert change > 1e-2, f"{name}: the guess-mode scales hardly matter; the case would not test them"
    float64_rounding(pipe, inputs, tensors)
    args.out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(args.out / "pipeline.safetensors"), metadata={"format": "pt"})
    doc = {
        "generator": "scripts/make_pipeline_fixture.py: " + ", ".join(f"{k} {v}" for k, v in mpf.versions().items()),
        "scheduler": SD_SCHEDULER,
        "batch": BATCH,
        "latent_side": LATENT_SIDE,
        "vae_scaling_factor": pipe.vae.config.scaling_factor,
        "cases": CASES,
    }
    (args.out / "cases.json").write_text(json.dumps(doc, indent=1) + "\n")
    for p in ("pipeline.safetensors", "cases.json"):
        (args.out / p).chmod(0o644)
        print(f"wrote {args.out / p} ({(args.out / p).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
