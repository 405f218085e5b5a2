//! `zeroconv export`: a trained ControlNet in the layout another tool reads: the original ControlNet keys
//! (`control_model.*`, one safetensors file) or a diffusers `ControlNetModel` folder (`config.json` and
//! `diffusion_pytorch_model.safetensors`, loadable with `ControlNetModel.from_pretrained`).

use super::ConfigArgs;
use crate::engine::HostTensor;
use crate::error::{Error, Result};
use crate::io::checkpoint::diffusers_export::{write_controlnet_diffusers, DIFFUSERS_WEIGHTS};
use crate::io::checkpoint::{write_safetensors, Checkpoint};
use crate::io::config::model_config;
use crate::io::outputs::{check_output, Inputs};
use crate::models::counts::controlnet_params;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// The original ControlNet keys (`control_model.*`) in one safetensors file.
    Ldm,
    /// A diffusers `ControlNetModel` folder.
    Diffusers,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  zeroconv export --config configs/controlnet_sd15.yaml --from runs/sd15/controlnet.safetensors \
                        --format diffusers --out controlnet-diffusers/"
)]
pub struct ExportArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The trained ControlNet: a run's `controlnet.safetensors`, a training checkpoint
    /// (`checkpoints/step_*.safetensors`), or any file or folder `from_pretrained` reads.
    #[arg(long = "from", value_name = "PATH")]
    pub from: PathBuf,
    #[arg(long, value_enum, default_value = "diffusers")]
    pub format: ExportFormat,
    /// The output: a folder for `diffusers`, a `.safetensors` file for `ldm`. Never one of the inputs; an existing
    /// one only with --force.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Overwrite --out if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &ExportArgs) -> Result<()> {
    let mut inputs = Inputs::new();
    add_inputs(&mut inputs, &args.from);
    if let Some(config) = &args.config.config {
        inputs.add(config, || format!("--config {}", config.display()));
    }
    check_output("--out", &args.out, &inputs, args.force)?;
    if args.format == ExportFormat::Diffusers {
        for file in [DIFFUSERS_WEIGHTS, "config.json"] {
            check_output("--out", &args.out.join(file), &inputs, true)?;
        }
    }
    let cfg = args.config.load()?;
    let arch = model_config::architecture(&cfg);
    let control = arch.control.clone().ok_or_else(|| Error::msg("the config has no ControlNet"))?;
    let ckpt = Checkpoint::open_pretrained(&args.from, &arch)?;
    let tensors = controlnet_tensors(&ckpt, &control)?;
    let written = match args.format {
        ExportFormat::Ldm => {
            write_safetensors(&args.out, &tensors, None)?;
            args.out.clone()
        }
        ExportFormat::Diffusers => write_controlnet_diffusers(&args.out, &control, &tensors)?,
    };
    eprintln!("exported {} ControlNet tensors to {}", tensors.len(), written.display());
    Ok(())
}

/// `--from` and, for a folder, the files in it (an export into the folder it reads from would write over them).
fn add_inputs(inputs: &mut Inputs, from: &Path) {
    inputs.add(from, || format!("--from {}", from.display()));
    if let Ok(entries) = std::fs::read_dir(from) {
        for entry in entries.flatten() {
            let path = entry.path();
            inputs.add(&path, || format!("--from's {}", path.display()));
        }
    }
}

/// Every tensor of the ControlNet, under its `control_model.*` key, in the model's order; one error naming the file
/// and the missing or mis-shaped keys when the checkpoint does not hold them all.
fn controlnet_tensors(ckpt: &Checkpoint, cfg: &crate::models::ControlNetConfig) -> Result<Vec<(String, HostTensor)>> {
    let specs = controlnet_params(cfg)?;
    let mut missing = Vec::new();
    let mut tensors = Vec::new();
    for spec in &specs {
        match ckpt.shape(&spec.key) {
            Some(shape) if shape == spec.shape.dims() => tensors.push((spec.key.clone(), ckpt.to_host(&spec.key)?)),
            Some(shape) => missing.push(format!("{} (shape {shape:?}, the config says {})", spec.key, spec.shape)),
            None => missing.push(spec.key.clone()),
        }
    }
    if missing.is_empty() {
        return Ok(tensors);
    }
    let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
    Err(Error::file(
        ckpt.path(),
        format!(
            "does not hold the config's ControlNet: {} of its {} tensors are missing or mis-shaped ({}{}); is this \
             the ControlNet of a run with this config?",
            missing.len(),
            specs.len(),
            shown.join(", "),
            if missing.len() > shown.len() { ", ..." } else { "" }
        ),
    ))
}
