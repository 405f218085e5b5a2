//! Sampling: DDIM (η = 0, or above 0 with fresh noise per step) with classifier-free guidance and control strength (guess mode
//! included), then the first stage's decoder. Used by `zeroconv sample`, by the training loop's
//! validation grids, and by the control-fidelity evaluation. [`sample`] tokenizes, encodes and draws the noise;
//! [`denoise_and_decode`] is the rest, on given text embeddings, x_T and per-step noise (checked against diffusers'
//! StableDiffusionControlNetPipeline by tests/graph_cpu/sample_pipeline.rs).

use super::device::{compile_program, CompileOptions, DeviceChoice, DeviceProgram};
use crate::app::weights::store::WeightStore;
use crate::engine::{HostTensor, Program};
use crate::error::{Error, Result};
use crate::graph::passes::PassOptions;
use crate::graph::DType;
use crate::io::checkpoint::megatron_clip::MegatronClip;
use crate::io::checkpoint::{Architecture, Checkpoint};
use crate::io::tokenizer::ClipTokenizer;
use crate::models::builder::ParamSpec;
use crate::models::control_ldm::{self, Batch};
use crate::models::train_step::{decode_latents, latent_channels, FirstStage, StepModels};
use crate::models::{clip, ModelBuilder, CLIP_PREFIX};
use crate::rng::Rng;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct SampleSettings {
    pub steps: usize,
    /// Classifier-free guidance scale (1 = no guidance: the unconditional branch is skipped).
    pub cfg_scale: f64,
    pub strength: f64,
    pub guess_mode: bool,
    pub seed: u64,
    pub negative: String,
    /// DDIM η: 0 is deterministic; above 0 each step adds fresh noise from the seed's generator.
    pub eta: f64,
    /// Draw a progress line over the DDIM steps on stderr.
    pub progress: bool,
    pub threads: Option<usize>,
    pub device: DeviceChoice,
    /// The config's `use_flash_attention` (the CUDA executor's attention kernels; the CPU ignores it).
    pub flash_attention: bool,
}

impl Default for SampleSettings {
    fn default() -> Self {
        SampleSettings {
            steps: 50,
            cfg_scale: 9.0,
            strength: 1.0,
            guess_mode: false,
            seed: 0,
            negative: String::new(),
            eta: 0.0,
            progress: false,
            threads: None,
            device: DeviceChoice::Cpu,
            flash_attention: false,
        }
    }
}

fn compile(s: &SampleSettings, g: crate::graph::Graph) -> Result<DeviceProgram> {
    compile_program(s.device, g, &CompileOptions { threads: s.threads, flash_attention: s.flash_attention })
}

/// Text embeddings [n, L, D] of `captions`, cut and padded by `tok`.
pub fn encode_text(
    m: &StepModels,
    store: &WeightStore,
    tok: &ClipTokenizer,
    captions: &[String],
    s: &SampleSettings,
) -> Result<HostTensor> {
    let ids: Vec<Vec<u32>> = captions.iter().map(|c| tok.encode(c)).collect();
    encode_ids(m, store, &ids, s)
}

/// Text embeddings [n, L, D] of token id rows (each exactly the text encoder's L ids: BOS, tokens, EOS, padding).
pub fn encode_ids(m: &StepModels, store: &WeightStore, ids: &[Vec<u32>], s: &SampleSettings) -> Result<HostTensor> {
    let n = ids.len();
    let l = m.clip.max_position_embeddings;
    let mut all = Vec::with_capacity(n * l);
    for t in ids {
        if t.len() != l {
            return Err(Error::msg(format!("the tokenizer gives {} ids; the text encoder takes {l}", t.len())));
        }
        all.extend(t.iter().map(|&i| i as f64));
    }
    let mut b = ModelBuilder::new(DType::F32);
    let ids = b.g.input("ids", [n, l], DType::I64);
    let h = clip::clip_text(&mut b, CLIP_PREFIX, &m.clip, ids)?;
    b.g.outputs.push(h);
    let opt = super::step::run_passes(&b.g, &PassOptions { fusion: true, ..Default::default() })?;
    let mut prog = compile(s, opt.graph)?;
    store.upload(&mut prog, &opt.map, &b.params)?;
    prog.upload(opt.map.get(ids).expect("kept"), &HostTensor::from_f64([n, l], DType::I64, &all)?)?;
    prog.launch()?;
    prog.download(opt.map.get(h).expect("output"))
}

/// The sampling settings a user controls, checked before anything is read or allocated (the CLI calls it first):
/// one error naming the flag.
pub fn check_settings(n: usize, s: &SampleSettings, schedule: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::msg("--n 0: the number of images must be at least 1"));
    }
    if s.steps == 0 || s.steps > schedule {
        return Err(Error::msg(format!(
            "--steps {}: the DDIM steps must be between 1 and {schedule} (the diffusion schedule's length)",
            s.steps
        )));
    }
    for (flag, v) in [("--cfg", s.cfg_scale), ("--strength", s.strength), ("--eta", s.eta)] {
        if !v.is_finite() {
            return Err(Error::msg(format!("{flag} {v}: must be a finite number")));
        }
    }
    if !(0.0..=1.0).contains(&s.eta) {
        return Err(Error::msg(format!("--eta {}: DDIM's eta must be between 0 (deterministic) and 1", s.eta)));
    }
    Ok(())
}

/// Host memory sampling `images` images of `side`² pixels takes outside the compiled programs, a bound: per image
/// its hint and its output in f32 and their f64 staging copies, doubled for classifier-free guidance's second half.
pub fn host_bytes(images: usize, side: usize) -> u64 {
    (images as u64).saturating_mul(3 * (side as u64).pow(2)).saturating_mul(4 + 4 + 2 * 8 + 2 * 8)
}

/// Refuses a request whose host buffers alone exceed the memory available, before allocating them.
pub fn ensure_memory(images: usize, side: usize) -> Result<()> {
    crate::engine::host_memory::ensure_available(
        host_bytes(images, side),
        &format!("sampling {images} images of {side}x{side}"),
        "ask for fewer images (--n, infer.num_images_per_prompt, or fewer prompts)",
    )
}

/// Generates one image per hint: tokenizes and encodes the captions (and the negative prompt for guidance), draws
/// x_T and each step's η noise from the seed's generator, and runs [`denoise_and_decode`]. `hints` is
/// [n, C, H, W] in [0, 1] with H = W = `size`; returns images [n, 3, H, W] in [-1, 1].
pub fn sample(
    m: &StepModels,
    store: &WeightStore,
    tok: &ClipTokenizer,
    hints: &[f32],
    captions: &[String],
    size: usize,
    s: &SampleSettings,
) -> Result<Vec<f32>> {
    let n = captions.len();
    check_settings(n, s, m.schedule.len())?;
    let multiple = m.image_multiple();
    if !size.is_multiple_of(multiple) {
        return Err(Error::msg(format!(
            "a {size}x{size} hint does not fit this model: the size must be a multiple of {multiple} (the first stage's \
             {} times the U-Net's levels)",
            m.first_stage.factor()
        )));
    }
    let lat = size / m.first_stage.factor();
    if HINT_FACTOR * lat != size {
        return Err(Error::msg(format!(
            "the first stage downsamples by {}, but the ControlNet reads control maps {HINT_FACTOR}x the latent's side: \
             images and control maps of one size need a first stage that downsamples by {HINT_FACTOR}",
            m.first_stage.factor()
        )));
    }
    ensure_memory(n, size)?;
    let hint_c = m.ldm.control.hint_channels;
    if hints.len() != n * hint_c * size * size {
        return Err(Error::msg(format!("{} hint values for {n} hints of {hint_c}x{size}x{size}", hints.len())));
    }
    let guided = s.cfg_scale != 1.0;
    // One text-encoder run: the captions, then the negative prompt once per image for the unconditional half.
    let mut texts: Vec<String> = captions.to_vec();
    if guided {
        texts.extend(std::iter::repeat_n(s.negative.clone(), n));
    }
    let ctx = encode_text(m, store, tok, &texts, s)?.to_f32();
    let (cond, uncond) = ctx.split_at(ctx.len() / texts.len() * n);
    let per = latent_channels(m) * lat * lat;
    let mut rng = Rng::new(s.seed);
    let latents: Vec<f32> = (0..n * per).map(|_| rng.normal() as f32).collect();
    let start = SamplerStart { images: n, cond, uncond: guided.then_some(uncond), hints, latents, latent_side: lat };
    let mut noise = |_step: usize| (0..n * per).map(|_| rng.normal() as f32).collect();
    let out = denoise_and_decode(m, store, start, s, &mut noise, &mut |_, _| {})?;
    Ok(out.decoded.into_iter().map(|v| v.clamp(-1.0, 1.0)).collect())
}

/// The ControlNet's hint block downsamples control maps by 8 to the latent's size.
const HINT_FACTOR: usize = 8;

/// What DDIM sampling starts from once the text is encoded and x_T drawn: the inputs of [`denoise_and_decode`]
/// besides the weights, the settings and the per-step noise.
pub struct SamplerStart<'a> {
    /// The number of images n.
    pub images: usize,
    /// The captions' text embeddings [n, L, D]: the conditional half.
    pub cond: &'a [f32],
    /// The negative prompt's text embeddings [n, L, D]: the unconditional half, needed when guidance is on
    /// (`cfg_scale` ≠ 1) and ignored without.
    pub uncond: Option<&'a [f32]>,
    /// Control maps [n, hint_channels, 8h, 8w] in [0, 1].
    pub hints: &'a [f32],
    /// x_T [n, C, h, w], h = w = `latent_side`.
    pub latents: Vec<f32>,
    pub latent_side: usize,
}

/// The result of [`denoise_and_decode`].
pub struct Sampled {
    /// x_0, the latents after the last DDIM step [n, C, h, w].
    pub latents: Vec<f32>,
    /// The first stage's decoding of x_0 [n, 3, H, W], unclamped (nominally in [-1, 1]).
    pub decoded: Vec<f32>,
}

/// The sampler's core: DDIM over the run's schedule (`m.schedule`, `s.steps` timesteps) from x_T, each step one
/// ε prediction of the ControlNet-controlled U-Net on both halves at once (conditional rows first, then the
/// unconditional ones; guess mode gates the control off on the unconditional rows), classifier-free guidance
/// ε_u + cfg·(ε_c − ε_u), and the DDIM update; then the first stage's decoder. Reads `steps`, `cfg_scale`,
/// `strength`, `guess_mode`, `eta` and the compile settings of `s` (the seed and the negative prompt are
/// [`sample`]'s). With η > 0, `noise(i)` gives step i's standard normal z, n·C·h·w values; `on_step(i, x)` sees
/// the latents after step i.
pub fn denoise_and_decode(
    m: &StepModels,
    store: &WeightStore,
    start: SamplerStart<'_>,
    s: &SampleSettings,
    noise: &mut dyn FnMut(usize) -> Vec<f32>,
    on_step: &mut dyn FnMut(usize, &[f32]),
) -> Result<Sampled> {
    let SamplerStart { images: n, cond, uncond, hints, latents: mut x, latent_side: lat } = start;
    check_settings(n, s, m.schedule.len())?;
    let c = latent_channels(m);
    let per = c * lat * lat;
    let unet_multiple = 1 << m.ldm.unet.channel_mult.len().saturating_sub(1);
    if lat == 0 || !lat.is_multiple_of(unet_multiple) {
        return Err(Error::msg(format!(
            "{lat}x{lat} latents do not fit this U-Net: the side must be a multiple of {unet_multiple}"
        )));
    }
    if x.len() != n * per {
        return Err(Error::msg(format!("{} initial latent values for {n} latents of {c}x{lat}x{lat}", x.len())));
    }
    let (hint_c, hint_side) = (m.ldm.control.hint_channels, HINT_FACTOR * lat);
    if hints.len() != n * hint_c * hint_side * hint_side {
        return Err(Error::msg(format!(
            "{} hint values for {n} control maps of {hint_c}x{hint_side}x{hint_side} ({HINT_FACTOR}x the latent's side)",
            hints.len()
        )));
    }
    let (l, d) = (m.clip.max_position_embeddings, m.ldm.unet.context_dim);
    let guided = s.cfg_scale != 1.0;
    let uncond = match (guided, uncond) {
        (false, _) => None,
        (true, Some(u)) => Some(u),
        (true, None) => {
            return Err(Error::msg(format!(
                "guidance scale {}: classifier-free guidance needs the unconditional text embeddings",
                s.cfg_scale
            )))
        }
    };
    for (what, e) in std::iter::once(("conditional", cond)).chain(uncond.map(|u| ("unconditional", u))) {
        if e.len() != n * l * d {
            return Err(Error::msg(format!("{} {what} text embedding values for {n} texts of {l}x{d}", e.len())));
        }
    }
    let rows = if guided { 2 * n } else { n };
    // The ε model, with a per-row control gate (guess mode: no control on the unconditional half).
    let mut ldm = m.ldm.clone();
    ldm.strength = s.strength;
    ldm.guess_mode = s.guess_mode;
    let shape = Batch { batch: rows, latent_h: lat, latent_w: lat, context_len: l };
    let mut built = control_ldm::build_gated(&ldm, shape, DType::F32, DType::F32, false, true)?;
    built.b.g.outputs.push(built.eps);
    let opt = super::step::run_passes(&built.b.g, &PassOptions { fusion: true, ..Default::default() })?;
    let mut prog = compile(s, opt.graph)?;
    store.upload(&mut prog, &opt.map, &built.b.params)?;
    let id = |v| opt.map.get(v).expect("sampler inputs are kept");
    let context: Vec<f64> = cond.iter().chain(uncond.unwrap_or_default()).map(|&v| v as f64).collect();
    prog.upload(id(built.context), &HostTensor::from_f64([rows, l, d], DType::F32, &context)?)?;
    let mut hint_rows: Vec<f64> = hints.iter().map(|&v| v as f64).collect();
    if guided {
        hint_rows.extend(hints.iter().map(|&v| v as f64));
    }
    prog.upload(id(built.hint), &HostTensor::from_f64([rows, hint_c, hint_side, hint_side], DType::F32, &hint_rows)?)?;
    let gate: Vec<f64> = (0..rows).map(|r| if r >= n && s.guess_mode { 0.0 } else { 1.0 }).collect();
    let gate_v = prog.graph().find("control_gate").expect("gated graph");
    prog.upload(gate_v, &HostTensor::from_f64([rows, 1, 1, 1], DType::F32, &gate)?)?;
    let sched = &m.schedule;
    let ts = sched.ddim_timesteps(s.steps);
    for (i, &t) in ts.iter().enumerate() {
        if s.progress {
            eprint!("\rDDIM step {}/{} (t = {t})   ", i + 1, ts.len());
        }
        let mut xin: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        if guided {
            xin.extend(x.iter().map(|&v| v as f64));
        }
        prog.upload(id(built.x), &HostTensor::from_f64([rows, c, lat, lat], DType::F32, &xin)?)?;
        prog.upload(id(built.t), &HostTensor::from_f64([rows], DType::I64, &vec![t as f64; rows])?)?;
        prog.launch()?;
        let e = prog.download(id(built.eps))?.to_f32();
        let eps: Vec<f32> = if guided {
            let (ec, eu) = e.split_at(n * per);
            ec.iter().zip(eu).map(|(&ec, &eu)| eu + s.cfg_scale as f32 * (ec - eu)).collect()
        } else {
            e
        };
        let z = if s.eta > 0.0 {
            let z = noise(i);
            if z.len() != n * per {
                return Err(Error::msg(format!(
                    "DDIM step {i}: {} noise values for {} latent values",
                    z.len(),
                    n * per
                )));
            }
            Some(z)
        } else {
            None
        };
        x = sched.ddim_step(&x, &eps, t, ts.get(i + 1).copied(), s.eta, z.as_deref());
        on_step(i, &x);
    }
    if s.progress {
        eprintln!();
    }
    let decoded = decode(m, store, &x, n, lat, s)?;
    Ok(Sampled { latents: x, decoded })
}

/// The first stage's decoding of latents [n, C, lat, lat], unclamped.
fn decode(
    m: &StepModels,
    store: &WeightStore,
    x: &[f32],
    n: usize,
    lat: usize,
    s: &SampleSettings,
) -> Result<Vec<f32>> {
    let c = latent_channels(m);
    let mut b = ModelBuilder::new(DType::F32);
    let z = b.g.input("z", [n, c, lat, lat], DType::F32);
    let img = decode_latents(&mut b, m, z)?;
    b.g.outputs.push(img);
    let opt = super::step::run_passes(&b.g, &PassOptions { fusion: true, ..Default::default() })?;
    let mut prog = compile(s, opt.graph)?;
    store.upload(&mut prog, &opt.map, &b.params)?;
    let zv: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    prog.upload(opt.map.get(z).expect("kept"), &HostTensor::from_f64([n, c, lat, lat], DType::F32, &zv)?)?;
    prog.launch()?;
    Ok(prog.download(opt.map.get(img).expect("output"))?.to_f32())
}

/// The parameters sampling reads: the text encoder, the ControlNet and U-Net, and the first stage's decoder.
pub fn sampling_params(m: &StepModels) -> Result<Vec<ParamSpec>> {
    let lat = 1 << m.ldm.unet.channel_mult.len().saturating_sub(1);
    let shape = Batch { batch: 1, latent_h: lat, latent_w: lat, context_len: m.clip.max_position_embeddings };
    let mut specs = control_ldm::build_gated(&m.ldm, shape, DType::F32, DType::F32, false, true)?.b.params;
    let mut b = ModelBuilder::new(DType::F32);
    let ids = b.g.input("ids", [1, m.clip.max_position_embeddings], DType::I64);
    clip::clip_text(&mut b, CLIP_PREFIX, &m.clip, ids)?;
    let z = b.g.input("z", [1, latent_channels(m), lat, lat], DType::F32);
    decode_latents(&mut b, m, z)?;
    specs.extend(b.params);
    Ok(specs)
}

/// Reads every weight sampling needs from `files` (each an LDM/NeMo checkpoint, a diffusers or Hugging Face file,
/// component folder or pipeline folder; a key in several files is taken from the last), refusing a file that holds
/// none of them and a set of files that leaves any missing.
/// `megatron_clip`: what the config says of a Megatron CLIP text tower (`model_config::megatron_clip`), which its
/// file alone cannot tell; None for every other text encoder.
pub fn load_weights(m: &StepModels, megatron_clip: Option<&MegatronClip>, files: &[&Path]) -> Result<WeightStore> {
    let specs = sampling_params(m)?;
    let arch = Architecture {
        unet: Some(m.ldm.unet.clone()),
        control: Some(m.ldm.control.clone()),
        vae: match &m.first_stage {
            FirstStage::Kl(v) => Some(v.clone()),
            FirstStage::Pixel => None,
        },
        megatron_clip: megatron_clip.cloned(),
    };
    let mut store = WeightStore::default();
    for path in files {
        let ck = Checkpoint::open_pretrained(path, &arch)?;
        if store.load_matching(&ck, &specs)? == 0 {
            return Err(Error::file(path, "holds none of the model's keys"));
        }
    }
    let missing: Vec<&str> =
        specs.iter().filter(|s| !store.tensors.contains_key(&s.key)).map(|s| s.key.as_str()).collect();
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(5).copied().collect();
        let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::msg(format!(
            "{} weights are missing from {}, e.g. {} (the Stable Diffusion weights hold the U-Net, the VAE and the \
             text encoder: give them with --ckpt, or set the config's from_pretrained keys; the ControlNet's are the \
             control_model.* keys)",
            missing.len(),
            names.join(", "),
            shown.join(", ")
        )));
    }
    Ok(store)
}

/// A PNG grid: one row per sample, each row the control map then the images given for it.
/// `columns[k]` holds NCHW data in [-1, 1] (images) or [0, 1] (`unit[k]` true: maps).
pub fn write_grid(path: &std::path::Path, columns: &[(&[f32], bool)], n: usize, size: usize) -> Result<()> {
    let cols = columns.len();
    let mut img = image::RgbImage::new((cols * size) as u32, (n * size) as u32);
    let plane = size * size;
    for (ci, (data, unit)) in columns.iter().enumerate() {
        for r in 0..n {
            for y in 0..size {
                for x in 0..size {
                    let mut px = [0u8; 3];
                    for (ch, p) in px.iter_mut().enumerate() {
                        let v = data[(r * 3 + ch) * plane + y * size + x];
                        let u = if *unit { v } else { (v + 1.0) * 0.5 };
                        *p = (u.clamp(0.0, 1.0) * 255.0).round() as u8;
                    }
                    img.put_pixel((ci * size + x) as u32, (r * size + y) as u32, image::Rgb(px));
                }
            }
        }
    }
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| Error::file(path, format!("PNG encoding: {e}")))?;
    crate::io::checkpoint::write_atomically(path, |w| w.write_all(&bytes).map_err(|e| Error::msg(e.to_string())))
}
