//! Sampling: DDIM (η = 0, or above 0 with fresh noise per step) with classifier-free guidance and control strength (guess mode
//! included), then the first stage's decoder. Used by `zeroconv sample`, by the training loop's
//! validation grids, and by the control-fidelity evaluation.

use super::device::{compile_program, CompileOptions, DeviceChoice, DeviceProgram};
use super::rng::Rng;
use super::tokenizer::ClipTokenizer;
use super::weights_store::WeightStore;
use crate::engine::{HostTensor, Program};
use crate::error::{Error, Result};
use crate::graph::passes::PassOptions;
use crate::graph::DType;
use crate::models::control_ldm::{self, Batch};
use crate::models::train_step::{decode_latents, latent_channels, StepModels};
use crate::models::{clip, ModelBuilder, CLIP_PREFIX};

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

/// Text embeddings [n, L, D] of `captions`.
pub fn encode_text(
    m: &StepModels,
    store: &WeightStore,
    tok: &ClipTokenizer,
    captions: &[String],
    s: &SampleSettings,
) -> Result<HostTensor> {
    let n = captions.len();
    let l = m.clip.max_position_embeddings;
    let mut b = ModelBuilder::new(DType::F32);
    let ids = b.g.input("ids", [n, l], DType::I64);
    let h = clip::clip_text(&mut b, CLIP_PREFIX, &m.clip, ids)?;
    b.g.outputs.push(h);
    let opt = super::step::run_passes(&b.g, &PassOptions { fusion: true, ..Default::default() })?;
    let mut prog = compile(s, opt.graph)?;
    store.upload(&mut prog, &opt.map, &b.params)?;
    let mut all = Vec::with_capacity(n * l);
    for c in captions {
        let t = tok.encode(c);
        if t.len() != l {
            return Err(Error::msg(format!("the tokenizer gives {} ids; the text encoder takes {l}", t.len())));
        }
        all.extend(t.iter().map(|&i| i as f64));
    }
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

/// Generates one image per hint. `hints` is [n, C, H, W] in [0, 1]; returns images [n, 3, H, W]
/// in [-1, 1].
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
    ensure_memory(n, size)?;
    let hint_c = m.ldm.control.hint_channels;
    if hints.len() != n * hint_c * size * size {
        return Err(Error::msg(format!("{} hint values for {n} hints of {hint_c}x{size}x{size}", hints.len())));
    }
    let lat = size / m.first_stage.factor();
    let c = latent_channels(m);
    let guided = s.cfg_scale != 1.0;
    let rows = if guided { 2 * n } else { n };
    // Text: the captions, then the negative prompt for the unconditional half.
    let mut texts: Vec<String> = captions.to_vec();
    if guided {
        texts.extend(std::iter::repeat_n(s.negative.clone(), n));
    }
    let ctx = encode_text(m, store, tok, &texts, s)?;
    // The ε model, with a per-row control gate (guess mode: no control on the unconditional half).
    let mut ldm = m.ldm.clone();
    ldm.strength = s.strength;
    ldm.guess_mode = s.guess_mode;
    let shape = Batch { batch: rows, latent_h: lat, latent_w: lat, context_len: m.clip.max_position_embeddings };
    let mut built = control_ldm::build_gated(&ldm, shape, DType::F32, DType::F32, false, true)?;
    built.b.g.outputs.push(built.eps);
    let opt = super::step::run_passes(&built.b.g, &PassOptions { fusion: true, ..Default::default() })?;
    let mut prog = compile(s, opt.graph)?;
    store.upload(&mut prog, &opt.map, &built.b.params)?;
    let id = |v| opt.map.get(v).expect("sampler inputs are kept");
    prog.upload(id(built.context), &ctx)?;
    let mut hint_rows: Vec<f64> = hints.iter().map(|&v| v as f64).collect();
    if guided {
        hint_rows.extend(hints.iter().map(|&v| v as f64));
    }
    prog.upload(id(built.hint), &HostTensor::from_f64([rows, hint_c, size, size], DType::F32, &hint_rows)?)?;
    let gate: Vec<f64> = (0..rows).map(|r| if r >= n && s.guess_mode { 0.0 } else { 1.0 }).collect();
    let gate_v = prog.graph().find("control_gate").expect("gated graph");
    prog.upload(gate_v, &HostTensor::from_f64([rows, 1, 1, 1], DType::F32, &gate)?)?;
    let sched = &m.schedule;
    let mut rng = Rng::new(s.seed);
    let per = c * lat * lat;
    let mut x: Vec<f32> = (0..n * per).map(|_| rng.normal() as f32).collect();
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
            let (cond, unc) = e.split_at(n * per);
            cond.iter().zip(unc).map(|(&ec, &eu)| eu + s.cfg_scale as f32 * (ec - eu)).collect()
        } else {
            e
        };
        let noise: Option<Vec<f32>> = (s.eta > 0.0).then(|| (0..n * per).map(|_| rng.normal() as f32).collect());
        x = sched.ddim_step(&x, &eps, t, ts.get(i + 1).copied(), s.eta, noise.as_deref());
    }
    if s.progress {
        eprintln!();
    }
    // Decode.
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
    let out = prog.download(opt.map.get(img).expect("output"))?.to_f32();
    Ok(out.into_iter().map(|v| v.clamp(-1.0, 1.0)).collect())
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
    super::checkpoint::write_atomically(path, |w| w.write_all(&bytes).map_err(|e| Error::msg(e.to_string())))
}
