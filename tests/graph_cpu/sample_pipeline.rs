//! zeroconv's sampler against diffusers' StableDiffusionControlNetPipeline with DDIMScheduler (fixture written by
//! diffusers: scripts/make_pipeline_fixture.py, tests/fixtures/pipeline/README.md). The same tiny weights, loaded
//! through zeroconv's loaders from the LDM file and from the diffusers pipeline folder, the same x_T, text
//! embeddings, control maps and (η > 0) per-step noise give diffusers' latents after every DDIM step, its decoded
//! image and its final [0, 1] image: without guidance, with guidance and a negative prompt, with control strength
//! (diffusers' `controlnet_conditioning_scale`) 0.6, in guess mode with and without guidance (NeMo's 0.825 ramp; the
//! generator patches diffusers' logspace to it), and with η 0.7, on the schedule of SD's config.
//!
//! Tolerance: 1e-4 of the largest magnitude of each compared tensor, the project's f32 bound against PyTorch
//! (DESIGN.md, "Numerics"). Both sides run in f32 through the text-encoded context, 3 to 5 controlled U-Net
//! evaluations (guidance multiplies ε differences by up to 7.5) and the VAE decoder, so agreement is at the level
//! of f32 rounding, not bitwise; the generator checks that diffusers' own f32 run is within 1e-5 of its f64 run.

use crate::common;

use common::layout_fixtures::{fixtures, pipeline_folder, write_ldm_file};
use common::training::tmp;
use std::path::Path;
use zeroconv::app::device::DeviceChoice;
use zeroconv::app::sampler::{denoise_and_decode, encode_ids, load_weights, SampleSettings, SamplerStart};
use zeroconv::app::train::step_models;
use zeroconv::app::weights::store::WeightStore;
use zeroconv::io::checkpoint::Checkpoint;
use zeroconv::io::config::load_config;
use zeroconv::models::control_ldm::ControlLdmConfig;
use zeroconv::models::schedule::Schedule;
use zeroconv::models::train_step::{FirstStage, StepModels};
use zeroconv::models::VaeConfig;

const TOL: f64 = 1e-4;

struct Fixture {
    doc: serde_json::Value,
    tensors: Checkpoint,
}

impl Fixture {
    fn load() -> Self {
        let dir = fixtures().join("pipeline");
        let doc = serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
        Fixture { doc, tensors: Checkpoint::open(&dir.join("pipeline.safetensors")).unwrap() }
    }
    fn f32s(&self, key: &str) -> Vec<f32> {
        self.tensors.to_f32(key).unwrap_or_else(|e| panic!("{e}"))
    }
    fn ids(&self, key: &str) -> Vec<Vec<u32>> {
        let t = self.tensors.tensor(key).unwrap_or_else(|e| panic!("{e}"));
        let l = t.shape[1];
        t.to_f64().chunks(l).map(|row| row.iter().map(|&v| v as u32).collect()).collect()
    }
    fn usize(&self, key: &str) -> usize {
        self.doc[key].as_u64().unwrap() as usize
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The tiny models of the layout fixtures, on the diffusion schedule of SD's config (the run's schedule).
fn models(fx: &Fixture) -> StepModels {
    let sd15 = load_config(Some(&Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/controlnet_sd15.yaml")), &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let schedule = step_models(&sd15).unwrap_or_else(|e| panic!("{e}")).schedule;
    // The schedule diffusers' DDIMScheduler was given is that of SD's config.
    let s = &fx.doc["scheduler"];
    let diffusers = Schedule::scaled_linear(
        s["beta_start"].as_f64().unwrap(),
        s["beta_end"].as_f64().unwrap(),
        s["num_train_timesteps"].as_u64().unwrap() as usize,
    );
    assert_eq!(s["beta_schedule"], "scaled_linear");
    assert_eq!(schedule.betas, diffusers.betas, "SD's config and the fixture's DDIMScheduler have other schedules");
    let unet = common::parity_sd15_tiny_unet();
    let scale_factor = fx.doc["vae_scaling_factor"].as_f64().unwrap();
    StepModels {
        ldm: ControlLdmConfig::locked(unet),
        first_stage: FirstStage::Kl(VaeConfig {
            ch: 32,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            resolution: 32,
            scale_factor,
            ..Default::default()
        }),
        clip: common::parity_clip_tiny(),
        scale_factor,
        schedule,
    }
}

fn settings(case: &serde_json::Value) -> SampleSettings {
    SampleSettings {
        steps: case["steps"].as_u64().unwrap() as usize,
        cfg_scale: case["guidance"].as_f64().unwrap(),
        strength: case["scale"].as_f64().unwrap(),
        guess_mode: case["guess_mode"].as_bool().unwrap(),
        eta: case["eta"].as_f64().unwrap(),
        threads: Some(2),
        device: DeviceChoice::Cpu,
        ..Default::default()
    }
}

/// Every case of the fixture on `store`: each step's latents, the decoded image and the [0, 1] image.
fn check_cases(fx: &Fixture, m: &StepModels, store: &WeightStore, weights: &str) {
    let cases = fx.doc["cases"].as_object().unwrap();
    assert!(cases.len() >= 6, "the fixture has {} cases", cases.len());
    let (n, lat) = (fx.usize("batch"), fx.usize("latent_side"));
    let cond = fx.f32s("cond_embeds");
    for (name, case) in cases {
        let s = settings(case);
        let what = format!("{weights}, {name}");
        let uncond = fx.f32s(&format!("uncond_{}", case["uncond"].as_str().unwrap()));
        let guided = s.cfg_scale != 1.0;
        let start = SamplerStart {
            images: n,
            cond: &cond,
            // Without guidance the core must not need the unconditional text.
            uncond: guided.then_some(&uncond[..]),
            hints: &fx.f32s("hint"),
            latents: fx.f32s("latents"),
            latent_side: lat,
        };
        let mut noise_drawn = 0;
        let mut noise = |i: usize| {
            noise_drawn += 1;
            fx.f32s(&format!("{name}.noise.{i}"))
        };
        let mut trajectory: Vec<Vec<f32>> = Vec::new();
        let mut on_step = |i: usize, x: &[f32]| {
            assert_eq!(i, trajectory.len());
            trajectory.push(x.to_vec());
        };
        let out = denoise_and_decode(m, store, start, &s, &mut noise, &mut on_step).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(noise_drawn, if s.eta > 0.0 { s.steps } else { 0 }, "{what}: per-step noise draws");
        assert_eq!(trajectory.len(), s.steps, "{what}: steps");
        for (i, x) in trajectory.iter().enumerate() {
            let want = f64s(&fx.f32s(&format!("{name}.latents.{i}")));
            common::assert_close(&format!("{what}: latents after step {i}"), &f64s(x), &want, TOL);
        }
        assert_eq!(out.latents, trajectory[s.steps - 1], "{what}: x_0 is the last step's latents");
        let decoded = fx.f32s(&format!("{name}.decoded"));
        common::assert_close(&format!("{what}: decoded image"), &f64s(&out.decoded), &f64s(&decoded), TOL);
        // The pipeline's output image: [-1, 1] mapped to [0, 1] and clamped, as zeroconv's images are clamped to
        // [-1, 1] and written as (v + 1) / 2.
        let ours: Vec<f64> = out.decoded.iter().map(|&v| ((v.clamp(-1.0, 1.0) as f64) + 1.0) / 2.0).collect();
        let image = f64s(&fx.f32s(&format!("{name}.image")));
        common::assert_close(&format!("{what}: [0, 1] image"), &ours, &image, TOL);
    }
}

#[test]
fn sampling_matches_diffusers_controlnet_pipeline_on_ldm_and_diffusers_weights() {
    let fx = Fixture::load();
    let m = models(&fx);
    let dir = tmp("sample-pipeline");
    let ldm = dir.path().join("sd_tiny.safetensors");
    write_ldm_file(&["sd15_tiny", "vae_tiny", "clip_tiny"], &ldm);
    // The text encoder diffusers' pipeline ran: transformers 5's file.
    let pipe = pipeline_folder(dir.path(), "pipe", "text_encoder");
    let from_ldm = load_weights(&m, None, &[&ldm]).unwrap_or_else(|e| panic!("{e}"));
    let from_diffusers = load_weights(&m, None, &[&pipe]).unwrap_or_else(|e| panic!("{e}"));
    let keys = |w: &WeightStore| w.tensors.keys().cloned().collect::<std::collections::BTreeSet<String>>();
    let (a, b) = (keys(&from_ldm), keys(&from_diffusers));
    assert!(a == b, "keys only in the LDM file's: {:?}; only in the folder's: {:?}", &a - &b, &b - &a);
    for (key, t) in &from_ldm.tensors {
        assert!(from_diffusers.tensors[key] == *t, "{key}: the diffusers folder gives other values");
    }
    // The text embeddings the pipeline was given: the CLIP text model's last hidden state on the stored ids.
    let s = SampleSettings { threads: Some(2), device: DeviceChoice::Cpu, ..Default::default() };
    for (ids, embeds) in
        [("cond_ids", "cond_embeds"), ("negative_ids", "uncond_negative"), ("empty_ids", "uncond_empty")]
    {
        let got = encode_ids(&m, &from_diffusers, &fx.ids(ids), &s).unwrap_or_else(|e| panic!("{e}")).to_f64();
        common::assert_close(&format!("text embeddings of {ids}"), &got, &f64s(&fx.f32s(embeds)), TOL);
    }
    check_cases(&fx, &m, &from_ldm, "LDM file");
    check_cases(&fx, &m, &from_diffusers, "diffusers folder");
}

#[test]
fn the_sampler_core_refuses_inputs_that_do_not_fit() {
    let fx = Fixture::load();
    let m = models(&fx);
    let store = WeightStore::default();
    let (cond, hints, latents) = (fx.f32s("cond_embeds"), fx.f32s("hint"), fx.f32s("latents"));
    let run = |s: &SampleSettings, start: SamplerStart<'_>| {
        denoise_and_decode(&m, &store, start, s, &mut |_| Vec::new(), &mut |_, _| {})
            .err()
            .expect("refused")
            .to_string()
    };
    let start = || SamplerStart {
        images: 2,
        cond: &cond,
        uncond: None,
        hints: &hints,
        latents: latents.clone(),
        latent_side: 4,
    };
    let guided = SampleSettings { cfg_scale: 7.5, steps: 2, ..Default::default() };
    let err = run(&guided, start());
    assert!(err.contains("unconditional text embeddings"), "{err}");
    let plain = SampleSettings { cfg_scale: 1.0, steps: 2, ..Default::default() };
    let err = run(&plain, SamplerStart { hints: &hints[..hints.len() / 2], ..start() });
    assert!(err.contains("hint values") && err.contains("3x32x32"), "{err}");
    let err = run(&plain, SamplerStart { latents: latents[1..].to_vec(), ..start() });
    assert!(err.contains("initial latent values"), "{err}");
    let err = run(&plain, SamplerStart { latent_side: 3, ..start() });
    assert!(err.contains("3x3 latents") && err.contains("multiple of 2"), "{err}");
    let err = run(&plain, SamplerStart { cond: &cond[1..], ..start() });
    assert!(err.contains("conditional text embedding values"), "{err}");
    let noisy = SampleSettings { cfg_scale: 1.0, steps: 2, eta: 0.5, ..Default::default() };
    let weights = tmp("sample-pipeline-noise");
    write_ldm_file(&["sd15_tiny", "vae_tiny", "clip_tiny"], &weights.path().join("w.safetensors"));
    let store = load_weights(&m, None, &[&weights.path().join("w.safetensors")]).unwrap();
    let err = denoise_and_decode(&m, &store, start(), &noisy, &mut |_| vec![0.0; 3], &mut |_, _| {})
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("DDIM step 0: 3 noise values for 128 latent values"), "{err}");
}

#[test]
fn sampling_weights_missing_from_the_files_are_named() {
    let fx = Fixture::load();
    let m = models(&fx);
    let dir = tmp("sample-pipeline-missing");
    // The U-Net and ControlNet only: the VAE and the text encoder are missing.
    let path = dir.path().join("sd_only.safetensors");
    write_ldm_file(&["sd15_tiny"], &path);
    let err = load_weights(&m, None, &[&path]).err().expect("refused").to_string();
    assert!(err.contains("weights are missing from") && err.contains("sd_only.safetensors"), "{err}");
    let clip = dir.path().join("clip.safetensors");
    write_ldm_file(&["clip_tiny"], &clip);
    let vae_only = common::layout_fixtures::rebuild("vae_tiny/vae", dir.path());
    assert!(load_weights(&m, None, &[&path, &clip, &vae_only]).is_ok());
    // A file with none of the model's keys is named, even when the others hold everything.
    let other = dir.path().join("other.safetensors");
    let t = zeroconv::engine::HostTensor::from_f64([2], zeroconv::graph::DType::F32, &[1.0, 2.0]).unwrap();
    zeroconv::io::checkpoint::write_safetensors(&other, &[("not_a_model_key".to_string(), t)], None).unwrap();
    let err = load_weights(&m, None, &[&path, &clip, &vae_only, &other]).err().expect("refused").to_string();
    assert!(err.contains("other.safetensors") && err.contains("holds none of the model's keys"), "{err}");
}
