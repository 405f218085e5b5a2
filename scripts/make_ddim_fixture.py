#!/usr/bin/env python3
"""Writes tests/fixtures/ddim/trajectories.json: DDIM trajectories computed by diffusers' own DDIMScheduler, set up
as Stable Diffusion's scheduler config sets it (scaled_linear betas 0.00085..0.012 over 1000 steps, "leading"
timestep spacing with steps_offset 1, set_alpha_to_one False, no clipping, epsilon prediction), for the Rust test
tests/graph_cpu/ddim_schedule.rs, which replays them with zeroconv's schedule: the same timesteps, and the same x_prev for the
same x_t, ε and (η > 0) noise.

Each case: a number of inference steps and an η; the initial x_T, one ε per step and (for η > 0) one noise tensor
per step are pseudo-random (numpy, seeded) and stored, so the Rust side needs no generator.

    python3 -m venv .torchenv && .torchenv/bin/pip install torch diffusers
    .torchenv/bin/python scripts/make_ddim_fixture.py
"""
import json
import os

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                    prediction_type="epsilon")
N = 16  # elements per tensor


def case(steps, eta, seed):
    rng = np.random.default_rng(seed)
    sched = DDIMScheduler(**SD_SCHEDULER)
    sched.set_timesteps(steps)
    x = torch.tensor(rng.standard_normal(N), dtype=torch.float64)
    xs, eps_all, noise_all = [x.tolist()], [], []
    for t in sched.timesteps:
        eps = torch.tensor(rng.standard_normal(N), dtype=torch.float64)
        noise = torch.tensor(rng.standard_normal(N), dtype=torch.float64)
        x = sched.step(eps, t, x, eta=eta, variance_noise=noise if eta > 0 else None).prev_sample
        eps_all.append(eps.tolist())
        noise_all.append(noise.tolist() if eta > 0 else [])
        xs.append(x.tolist())
    return {"steps": steps, "eta": eta, "timesteps": [int(t) for t in sched.timesteps], "x": xs, "eps": eps_all,
            "noise": noise_all}


def main():
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "ddim", "trajectories.json")
    cases = [case(50, 0.0, 1), case(20, 0.0, 2), case(7, 0.0, 3), case(50, 0.5, 4), case(13, 1.0, 5)]
    doc = {"generator": f"diffusers {diffusers.__version__} DDIMScheduler, torch {torch.__version__}",
           "scheduler": SD_SCHEDULER, "cases": cases}
    with open(out, "w") as f:
        json.dump(doc, f)
        f.write("\n")
    print(f"wrote {os.path.normpath(out)} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
