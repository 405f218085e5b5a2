//! `zeroconv sample`: generate images that follow a control map (DDIM, classifier-free guidance).

use super::ConfigArgs;
use crate::error::{Error, Result};
use crate::frontend::checkpoint::Checkpoint;
use crate::frontend::device::DeviceChoice;
use crate::frontend::outputs::{check_output, Inputs};
use crate::frontend::sample::{check_settings, sample, write_grid, SampleSettings};
use crate::frontend::train::{step_models, tokenizer};
use crate::frontend::weights_store::WeightStore;
use crate::models::train_step::Phase;
use crate::models::ModelBuilder;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  zeroconv sample --config configs/controlnet_sd15.yaml --ckpt v1-5-pruned.safetensors \\\n      --control runs/sd15/controlnet.safetensors --hint map.png --prompt \"a red house\" --n 4 --out out.png"
)]
pub struct SampleArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Stable Diffusion weights (U-Net, VAE, text encoder) under the original keys.
    #[arg(long, value_name = "FILE")]
    pub ckpt: Option<PathBuf>,
    /// The ControlNet (control_model.* keys), e.g. a run's controlnet.safetensors.
    #[arg(long, value_name = "FILE")]
    pub control: PathBuf,
    /// The control map (PNG/JPEG); its size sets the output size and must be a multiple of 8x the latent's stride.
    #[arg(long, value_name = "FILE")]
    pub hint: PathBuf,
    #[arg(long, default_value = "")]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative: String,
    #[arg(long, default_value_t = 50, allow_negative_numbers = true, value_parser = crate::frontend::cli::whole::<usize>)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 disables guidance).
    #[arg(long, default_value_t = 9.0, allow_negative_numbers = true)]
    pub cfg: f64,
    /// Control strength (scales every residual).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub strength: f64,
    /// Guess mode: residuals scaled 0.825^(12-i), no control on the unconditional branch.
    #[arg(long)]
    pub guess_mode: bool,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = crate::frontend::cli::whole::<u64>)]
    pub seed: u64,
    /// Images to generate.
    #[arg(long, default_value_t = 4, allow_negative_numbers = true, value_parser = crate::frontend::cli::whole::<usize>)]
    pub n: usize,
    /// The output PNG: the control map, then the samples.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Overwrite --out if it exists.
    #[arg(long)]
    pub force: bool,
    #[arg(long, allow_negative_numbers = true, value_parser = crate::frontend::cli::whole::<usize>)]
    pub threads: Option<usize>,
    /// Where the graphs run: cpu, cuda (not available yet) or cuda-emu (the CUDA executor under emulation on the
    /// CPU: slow, for checking).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceChoice,
}

pub fn run(args: &SampleArgs) -> Result<()> {
    args.device.check_available()?;
    // The numbers on the command line, checked before anything is read or allocated.
    let mut settings = SampleSettings {
        steps: args.steps,
        cfg_scale: args.cfg,
        strength: args.strength,
        guess_mode: args.guess_mode,
        seed: args.seed,
        negative: args.negative.clone(),
        threads: args.threads,
        device: args.device,
        flash_attention: false, // from the config, once it is loaded
    };
    check_settings(args.n, &settings)?;
    let mut inputs = Inputs::new();
    inputs.add(&args.hint, || format!("--hint {}", args.hint.display()));
    inputs.add(&args.control, || format!("--control {}", args.control.display()));
    if let Some(ckpt) = &args.ckpt {
        inputs.add(ckpt, || format!("--ckpt {}", ckpt.display()));
    }
    if let Some(config) = &args.config.config {
        inputs.add(config, || format!("--config {}", config.display()));
    }
    check_output("--out", &args.out, &inputs, args.force)?;
    let cfg = args.config.load()?;
    settings.flash_attention = crate::frontend::train::compile_options(&cfg, args.threads)?.flash_attention;
    let models = step_models(&cfg)?;
    let tok = tokenizer(&cfg)?;
    let img =
        image::open(&args.hint).map_err(|e| Error::file(&args.hint, format!("cannot read the control map: {e}")))?;
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    if w != h {
        return Err(Error::file(&args.hint, format!("is {w}x{h}; the control map must be square")));
    }
    let plane = w * h;
    let mut one = vec![0f32; 3 * plane];
    for (i, p) in rgb.pixels().enumerate() {
        for c in 0..3 {
            one[c * plane + i] = p[c] as f32 / 255.0;
        }
    }
    let hints: Vec<f32> = (0..args.n).flat_map(|_| one.iter().copied()).collect();
    let captions = vec![args.prompt.clone(); args.n];
    // Weights: every key of the sampling models, from --ckpt then --control.
    let specs = {
        let mut b = ModelBuilder::new(crate::graph::DType::F32);
        crate::models::train_step::micro_step(&mut b, &models, Phase::Control, 1, w, crate::graph::DType::F32, "")?;
        b.params
    };
    let mut store = WeightStore::default();
    for path in args.ckpt.iter().chain(std::iter::once(&args.control)) {
        let ck = Checkpoint::open(path)?.into_ldm_keys()?;
        if store.load_matching(&ck, &specs)? == 0 {
            return Err(Error::file(path, "holds none of the model's keys"));
        }
    }
    let missing: Vec<&str> =
        specs.iter().filter(|s| !store.tensors.contains_key(&s.key)).map(|s| s.key.as_str()).collect();
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(5).copied().collect();
        return Err(Error::msg(format!(
            "{} weights are missing from --ckpt/--control, e.g. {} (is --ckpt the Stable Diffusion checkpoint?)",
            missing.len(),
            shown.join(", ")
        )));
    }
    let imgs = sample(&models, &store, &tok, &hints, &captions, w, &settings)?;
    // One row: the map, then the n samples.
    let per = 3 * plane;
    let mut columns: Vec<(&[f32], bool)> = vec![(&hints[..per], true)];
    for i in 0..args.n {
        columns.push((&imgs[i * per..(i + 1) * per], false));
    }
    write_grid(&args.out, &columns, 1, w)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
