//! `zeroconv train`: trains a ControlNet. With no config it trains the built-in tiny demo on
//! synthetic shapes on the CPU (see README "The embedded default").

use super::ConfigArgs;
use crate::app::device::DeviceChoice;
use crate::app::train::{out_dir, train, TrainOptions};
use crate::error::Result;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  zeroconv train                                   # the built-in demo (about 4 minutes on 2 cores)\n  zeroconv train trainer.max_steps=6 --out runs/quick\n  zeroconv train --config configs/controlnet_sd15.yaml 'model.data.train.dataset_path=[\"shards/{000000..000099}.tar\"]'\n  zeroconv train --config configs/controlnet_sd15.yaml --resume --out runs/sd15"
)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Output directory (checkpoints, metrics.jsonl, sample grids, the exported ControlNet). It belongs to one run:
    /// locked while the run lives, and a new run into a folder that holds a run's files is refused (use --resume or
    /// another folder). Default: exp_manager.exp_dir/exp_manager.name.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Continue the folder's run from its newest checkpoint in DIR/checkpoints (weights, optimizer moments, step, RNG,
    /// data position). A config that changes the computation is refused; the learning rate and max_steps may change.
    #[arg(long)]
    pub resume: bool,
    /// Make bad samples and damaged shards errors instead of skipping them.
    #[arg(long)]
    pub strict: bool,
    /// CPU threads (default: one per core).
    #[arg(long, allow_negative_numbers = true, value_parser = crate::app::cli::whole::<usize>)]
    pub threads: Option<usize>,
    /// Where the training step runs: cpu, cuda (a GPU) or cuda-emu (the CUDA executor under emulation
    /// on the CPU: slow, for checking).
    /// Default: the config's trainer.accelerator (auto: the GPU when one is usable, else the CPU).
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    /// Skip the validation grids and the control-fidelity evaluation.
    #[arg(long)]
    pub no_eval: bool,
    /// Initialise frozen weights that no file provides at random instead of refusing (tests and benchmarks only:
    /// a ControlNet trained against a random U-Net, VAE or text encoder is useless).
    #[arg(long)]
    pub allow_random_weights: bool,
}

pub fn run(args: &TrainArgs) -> Result<()> {
    if let Some(d) = args.device {
        d.check_available()?;
    }
    let cfg = args.config.load()?;
    let device = DeviceChoice::resolve(args.device, cfg.trainer.accelerator)?;
    let out = out_dir(&cfg, args.out.as_deref());
    eprintln!("training into {}", out.display());
    let opts = TrainOptions {
        out_dir: out.clone(),
        resume: args.resume,
        threads: args.threads,
        device,
        allow_random_weights: args.allow_random_weights,
        strict: args.strict,
        progress: true,
        evaluate: !args.no_eval,
        fail_checkpoint_after: None,
    };
    let report = train(&cfg, &opts)?;
    if report.rank != 0 {
        return Ok(());
    }
    if let (Some((_, first_step, first)), Some((_, last_step, last))) = (report.losses.first(), report.losses.last()) {
        eprintln!("loss: {first:.4} at step {first_step} -> {last:.4} at step {last_step}");
    }
    if let Some(p) = &report.exported {
        eprintln!("ControlNet exported to {} (control_model.* keys)", p.display());
    }
    Ok(())
}
