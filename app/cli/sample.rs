//! `zeroconv sample`: generate images that follow a control map (DDIM, classifier-free guidance).

use super::ConfigArgs;
use crate::app::device::DeviceChoice;
use crate::app::sampler::{check_settings, load_weights, sample, write_grid, SampleSettings};
use crate::app::train::{step_models, tokenizer};
use crate::error::{Error, Result};
use crate::io::outputs::{check_output, Inputs};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  zeroconv sample --config configs/controlnet_sd15.yaml --ckpt v1-5-pruned.safetensors \\\n      --control runs/sd15/controlnet.safetensors --hint map.png --prompt \"a red house\" --n 4 --out out.png"
)]
pub struct SampleArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Stable Diffusion weights (U-Net, VAE, text encoder): a checkpoint in any layout `from_pretrained` reads, or a
    /// diffusers pipeline folder (unet/, vae/, text_encoder/). Repeat it for weights in several files (e.g. a
    /// separate VAE; a later file's tensors win). Default: the config's `from_pretrained` files.
    #[arg(long, value_name = "PATH")]
    pub ckpt: Vec<PathBuf>,
    /// The ControlNet: control_model.* keys (e.g. a run's controlnet.safetensors), or a diffusers ControlNetModel
    /// file or folder.
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
    /// The control map (PNG/JPEG); its size sets the output size and must be a multiple of 8x the latent's stride.
    /// Default: the config's `infer.control` (one row of the grid per image, with `infer.prompts`).
    #[arg(long, value_name = "FILE")]
    pub hint: Option<PathBuf>,
    /// The prompt (default: the config's `infer.prompts`, one per `infer.control` image; else empty).
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(long, default_value = "")]
    pub negative: String,
    /// DDIM steps (default: `infer.inference_steps`, 50).
    #[arg(long, allow_negative_numbers = true, value_parser = crate::app::cli::whole::<usize>)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale, 1 disables guidance (default: `infer.unconditional_guidance_scale`, 7.5).
    #[arg(long, allow_negative_numbers = true)]
    pub cfg: Option<f64>,
    /// DDIM eta: 0 deterministic, up to 1 (default: `infer.eta`, 0).
    #[arg(long, allow_negative_numbers = true)]
    pub eta: Option<f64>,
    /// Control strength, scales every residual (default: `model.strength`, 1).
    #[arg(long, allow_negative_numbers = true)]
    pub strength: Option<f64>,
    /// Guess mode: residuals scaled 0.825^(12-i), no control on the unconditional branch (also on with
    /// `model.guess_mode`).
    #[arg(long)]
    pub guess_mode: bool,
    /// Seed of the initial noise (default: `infer.seed`, 0).
    #[arg(long, allow_negative_numbers = true, value_parser = crate::app::cli::whole::<u64>)]
    pub seed: Option<u64>,
    /// Images per prompt (default: `infer.num_images_per_prompt`, 1).
    #[arg(long, allow_negative_numbers = true, value_parser = crate::app::cli::whole::<usize>)]
    pub n: Option<usize>,
    /// The output PNG: the control map, then the samples.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Overwrite --out if it exists.
    #[arg(long)]
    pub force: bool,
    #[arg(long, allow_negative_numbers = true, value_parser = crate::app::cli::whole::<usize>)]
    pub threads: Option<usize>,
    /// Where the graphs run: cpu, cuda (a GPU) or cuda-emu (the CUDA executor under emulation on the
    /// CPU: slow, for checking).
    /// Default: the config's trainer.accelerator (auto: the GPU when one is usable, else the CPU).
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
}

pub fn run(args: &SampleArgs) -> Result<()> {
    if let Some(d) = args.device {
        d.check_available()?;
    }
    // The config first (a small file): its infer.* and model.strength/guess_mode are the defaults of the flags.
    let cfg = args.config.load()?;
    let device = DeviceChoice::resolve(args.device, cfg.trainer.accelerator)?;
    let infer = &cfg.infer;
    let settings = SampleSettings {
        steps: args.steps.unwrap_or(infer.inference_steps as usize),
        cfg_scale: args.cfg.unwrap_or(infer.unconditional_guidance_scale),
        strength: args.strength.unwrap_or(cfg.model.strength),
        guess_mode: args.guess_mode || cfg.model.guess_mode,
        seed: args.seed.unwrap_or(infer.seed),
        negative: args.negative.clone(),
        eta: args.eta.unwrap_or(infer.eta),
        progress: true,
        threads: args.threads,
        device,
        flash_attention: crate::app::train::compile_options(&cfg, args.threads)?.flash_attention,
    };
    let n = args.n.unwrap_or(infer.num_images_per_prompt as usize);
    // The numbers, checked before any weights are read or allocated.
    check_settings(n, &settings, cfg.model.timesteps as usize)?;
    // (control map, prompt) pairs: the flags, else the config's infer.control / infer.prompts.
    let pairs: Vec<(PathBuf, String)> = match (&args.hint, &args.prompt) {
        (Some(h), p) => vec![(h.clone(), p.clone().or_else(|| infer.prompts.first().cloned()).unwrap_or_default())],
        (None, p) if !infer.control.is_empty() => infer
            .control
            .iter()
            .zip(&infer.prompts)
            .map(|(h, q)| (h.clone(), p.clone().unwrap_or_else(|| q.clone())))
            .collect(),
        (None, _) => {
            return Err(Error::msg(
                "no control map: give --hint FILE, or infer.control (with infer.prompts) in the config",
            ))
        }
    };
    let mut inputs = Inputs::new();
    for (hint, _) in &pairs {
        inputs.add(hint, || format!("--hint {}", hint.display()));
    }
    inputs.add(&args.control, || format!("--control {}", args.control.display()));
    let weight_files = sd_weight_files(&args.ckpt, &cfg);
    for (ckpt, named) in &weight_files {
        inputs.add(ckpt, || named.clone());
    }
    if let Some(config) = &args.config.config {
        inputs.add(config, || format!("--config {}", config.display()));
    }
    check_output("--out", &args.out, &inputs, args.force)?;
    let models = step_models(&cfg)?;
    let tok = tokenizer(&cfg)?;
    let mut maps: Vec<f32> = Vec::new();
    let mut size = None;
    for (hint, _) in &pairs {
        let (map, side) = read_map(hint)?;
        if size.is_some_and(|s| s != side) {
            return Err(Error::file(hint, format!("is {side}x{side}; every control map must have the same size")));
        }
        size = Some(side);
        maps.extend(map);
    }
    let w = size.expect("at least one control map");
    check_infer_sizes(&cfg, w, models.first_stage.factor())?;
    crate::app::sampler::ensure_memory(pairs.len().saturating_mul(n), w)?;
    let plane = 3 * w * w;
    // Row r of the grid: map r and its n samples, in (pair, image) order.
    let hints: Vec<f32> =
        (0..pairs.len()).flat_map(|r| (0..n).flat_map(move |_| r * plane..(r + 1) * plane)).map(|i| maps[i]).collect();
    let captions: Vec<String> = pairs.iter().flat_map(|(_, p)| std::iter::repeat_n(p.clone(), n)).collect();
    // Weights: every key sampling reads, from the weight files then --control.
    let files: Vec<&std::path::Path> =
        weight_files.iter().map(|(p, _)| p.as_path()).chain([args.control.as_path()]).collect();
    let megatron_clip = crate::io::config::model_config::megatron_clip(&cfg.model.cond_stage_config);
    let store = load_weights(&models, megatron_clip.as_ref(), &files)?;
    let imgs = sample(&models, &store, &tok, &hints, &captions, w, &settings)?;
    // Column 0: the maps; column k: the k-th sample of every row.
    let columns_data: Vec<Vec<f32>> = (0..n)
        .map(|k| {
            (0..pairs.len()).flat_map(|r| imgs[(r * n + k) * plane..(r * n + k + 1) * plane].iter().copied()).collect()
        })
        .collect();
    let mut columns: Vec<(&[f32], bool)> = vec![(&maps[..], true)];
    columns.extend(columns_data.iter().map(|c| (&c[..], false)));
    write_grid(&args.out, &columns, pairs.len(), w)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// The `infer.*` keys zeroconv does not apply as NeMo does, refused unless they agree with what it does: it samples
/// at the control map's own size (no resize), with the first stage's down factor, into `--out`.
fn check_infer_sizes(cfg: &crate::io::config::Config, side: usize, factor: usize) -> Result<()> {
    let i = &cfg.infer;
    let default = crate::io::config::InferConfig::default();
    for (key, v, d) in [
        ("infer.height", i.height, default.height),
        ("infer.width", i.width, default.width),
        ("infer.hint_image_size", i.hint_image_size, default.hint_image_size),
    ] {
        if v != d && v as usize != side {
            return Err(Error::msg(format!(
                "{key} is {v}, but the control map is {side}x{side}: zeroconv samples at the control map's own size \
                 (it does not resize), so give a {v}x{v} map (or leave {key} at its default)"
            )));
        }
    }
    if i.down_factor as usize != factor {
        return Err(Error::msg(format!(
            "infer.down_factor is {}, but the first stage downsamples by {factor}; leave it at {factor}",
            i.down_factor
        )));
    }
    if !i.save_to_file || i.out_path != default.out_path {
        return Err(Error::msg(
            "infer.save_to_file / infer.out_path: zeroconv sample writes one PNG grid to --out; leave them at their \
             defaults (true, samples)",
        ));
    }
    Ok(())
}

/// A square control map as [3, side, side] values in [0, 1], and its side.
fn read_map(path: &std::path::Path) -> Result<(Vec<f32>, usize)> {
    let img = image::open(path).map_err(|e| Error::file(path, format!("cannot read the control map: {e}")))?;
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    if w != h {
        return Err(Error::file(path, format!("is {w}x{h}; the control map must be square")));
    }
    let plane = w * h;
    let mut one = vec![0f32; 3 * plane];
    for (i, p) in rgb.pixels().enumerate() {
        for c in 0..3 {
            one[c * plane + i] = p[c] as f32 / 255.0;
        }
    }
    Ok((one, w))
}

/// The Stable Diffusion weight files, each with how the user named it: `--ckpt` as given, else the config's
/// `from_pretrained` files (each once). Empty when neither names any: loading then names what is missing.
fn sd_weight_files(ckpt: &[PathBuf], cfg: &crate::io::config::Config) -> Vec<(PathBuf, String)> {
    if !ckpt.is_empty() {
        return ckpt.iter().map(|p| (p.clone(), format!("--ckpt {}", p.display()))).collect();
    }
    let m = &cfg.model;
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    for (key, path) in [
        ("model.unet_config.from_pretrained", &m.unet_config.from_pretrained),
        ("model.first_stage_config.from_pretrained", &m.first_stage_config.from_pretrained),
        ("model.cond_stage_config.from_pretrained", &m.cond_stage_config.from_pretrained),
    ] {
        if let Some(path) = path {
            if !files.iter().any(|(p, _)| p == path) {
                files.push((path.clone(), format!("{key} {}", path.display())));
            }
        }
    }
    files
}
