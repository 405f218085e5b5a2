//! `zeroconv forward`: the parity tool. Runs one model part on given weights and inputs and
//! writes every tensor a PyTorch user compares (see README "Parity with PyTorch").

use super::ConfigArgs;
use crate::app::device::DeviceChoice;
use crate::app::parity;
use crate::error::{Error, Result};
use crate::graph::DType;
use crate::io::checkpoint::{write_safetensors, Checkpoint};
use crate::io::config::model_config;
use crate::io::outputs::{check_output, Inputs};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// ControlNet + locked U-Net: eps, control.{i}; with --grad also loss and grad.<key>.
    Control,
    /// VAE encoder: `image` [B,3,H,W] in [-1,1] → `mean`, `logvar`.
    VaeEncode,
    /// VAE decoder: `z` [B,4,h,w] → `decoded`.
    VaeDecode,
    /// CLIP text encoder: `ids` [B,L] int64 → `hidden`.
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ComputePrecision {
    Fp32,
    Bf16,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  zeroconv forward --config configs/controlnet_sd15.yaml --ckpt weights.safetensors \\\n      --inputs in.safetensors --out out.safetensors --grad"
)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Weights: a file under the original keys (model.diffusion_model.*, control_model.*, first_stage_model.*,
    /// cond_stage_model.transformer.*), .safetensors, .ckpt/.pth or .nemo; a diffusers or Hugging Face file
    /// (U-Net, ControlNet, VAE, CLIPTextModel); or a diffusers component or pipeline folder.
    #[arg(long, value_name = "PATH")]
    pub ckpt: PathBuf,
    /// Inputs (safetensors): x [B,4,h,w], t [B] int64, context [B,L,D], hint [B,3,8h,8w] in [0,1], and with
    /// --grad target [B,4,h,w]; or image / z / ids for the other parts.
    #[arg(long, value_name = "FILE")]
    pub inputs: PathBuf,
    /// Where to write the outputs (safetensors, written atomically). Never one of the inputs; an existing file
    /// only with --force.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Overwrite --out if it exists.
    #[arg(long)]
    pub force: bool,
    /// Also compute loss = mean((eps - target)^2) and its gradient for every ControlNet parameter.
    #[arg(long)]
    pub grad: bool,
    /// Where the graph runs: cpu, cuda (a GPU) or cuda-emu (the CUDA executor under emulation on the
    /// CPU: slow, for checking).
    /// Default: the config's trainer.accelerator (auto: the GPU when one is usable, else the CPU).
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    #[arg(long, value_enum, default_value = "fp32")]
    pub precision: ComputePrecision,
    #[arg(long, value_enum, default_value = "control")]
    pub part: Part,
}

pub fn run(args: &ForwardArgs) -> Result<()> {
    if let Some(d) = args.device {
        d.check_available()?;
    }
    let mut inputs = Inputs::new();
    inputs.add(&args.ckpt, || format!("--ckpt {}", args.ckpt.display()));
    inputs.add(&args.inputs, || format!("--inputs {}", args.inputs.display()));
    if let Some(config) = &args.config.config {
        inputs.add(config, || format!("--config {}", config.display()));
    }
    check_output("--out", &args.out, &inputs, args.force)?;
    let cfg = args.config.load()?;
    let device = DeviceChoice::resolve(args.device, cfg.trainer.accelerator)?;
    let ckpt = Checkpoint::open_pretrained(&args.ckpt, &model_config::architecture(&cfg))?;
    let inputs = Checkpoint::open(&args.inputs)?;
    let compute = match args.precision {
        ComputePrecision::Fp32 => DType::F32,
        ComputePrecision::Bf16 => DType::BF16,
    };
    if args.part != Part::Control && (args.grad || compute != DType::F32) {
        return Err(Error::msg("--grad and --precision bf16 apply to --part control only"));
    }
    let m = &cfg.model;
    let outs = match args.part {
        Part::Control => {
            parity::control_ldm(device, &model_config::control_ldm(&cfg), &ckpt, &inputs, args.grad, compute)?
        }
        Part::VaeEncode | Part::VaeDecode => {
            let need = if args.part == Part::VaeEncode { "image" } else { "z" };
            if !inputs.contains(need) {
                return Err(Error::file(&args.inputs, format!("has no tensor '{need}' for --part {:?}", args.part)));
            }
            let vae = model_config::vae(&m.first_stage_config, m.scale_factor);
            let all = parity::vae_parts(device, &vae, &ckpt, &inputs)?;
            let keep: &[&str] = if args.part == Part::VaeEncode { &["mean", "logvar"] } else { &["decoded"] };
            all.into_iter().filter(|(k, _)| keep.contains(&k.as_str())).collect()
        }
        Part::Text => parity::text(device, &model_config::clip(&m.cond_stage_config)?, &ckpt, &inputs)?,
    };
    let mut meta = BTreeMap::new();
    meta.insert("producer".to_string(), format!("zeroconv {} forward", env!("CARGO_PKG_VERSION")));
    write_safetensors(&args.out, &outs, Some(&meta))?;
    eprintln!("wrote {} tensors to {}", outs.len(), args.out.display());
    Ok(())
}
