//! `zeroconv inspect`: each component's parameter count and memory, without running anything.

use super::ConfigArgs;
use crate::app::device::DeviceChoice;
use crate::app::step;
use crate::engine::cpu::CpuBackend;
use crate::engine::device::emu::{EmuDevice, EmuOptions};
use crate::engine::gpu::GpuBackend;
use crate::engine::host_memory::human_bytes;
use crate::error::Result;
use crate::io::config::model_config;
use crate::models::counts::{clip_params, controlnet_params, total, unet_params, vae_params};
use crate::models::train_step::TrainPhase;
use std::io::Write;

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Also build and plan the training step `zeroconv train` compiles (VAE and text encoder included, at the
    /// crop's size, one micro-batch of activations) and print its planned peak memory (takes a few seconds for SD
    /// 1.5).
    #[arg(long)]
    pub plan: bool,
    /// Print every parameter key with its shape.
    #[arg(long)]
    pub keys: bool,
    /// With --plan: also plan the training step's device memory on the CUDA executor (`cuda` or `cuda-emu`: the
    /// same plan; nothing is allocated and no GPU is needed).
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
}

pub fn run(args: &InspectArgs, out: &mut dyn Write) -> Result<()> {
    let cfg = args.config.load()?;
    let m = &cfg.model;
    let ldm = model_config::control_ldm(&cfg);
    let parts = [
        ("U-Net (model.diffusion_model)", unet_params(&ldm.unet)?),
        ("ControlNet (control_model)", controlnet_params(&ldm.control)?),
        (
            "VAE (first_stage_model)",
            // The pixel first stage (the demo's) has no weights: 8x8 block averages.
            match m.first_stage_config.kind {
                crate::io::config::FirstStageKind::Pixel => Vec::new(),
                crate::io::config::FirstStageKind::AutoencoderKl => {
                    vae_params(&model_config::vae(&m.first_stage_config, m.scale_factor))?
                }
            },
        ),
        ("CLIP text encoder (cond_stage_model)", clip_params(&model_config::clip(&m.cond_stage_config)?)?),
    ];
    let w =
        |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(|e| crate::Error::msg(format!("stdout: {e}")));
    w(out, format!("{:<40} {:>15} {:>12}", "component", "parameters", "fp32 memory"))?;
    let mut sum = 0;
    for (name, ps) in &parts {
        let n = total(ps);
        sum += n;
        w(out, format!("{:<40} {:>15} {:>12}", name, group_digits(n), human_bytes(4 * n as u64)))?;
    }
    w(out, format!("{:<40} {:>15} {:>12}", "total", group_digits(sum), human_bytes(4 * sum as u64)))?;
    let trainable = total(&parts[1].1)
        + if m.sd_locked {
            0
        } else {
            parts[0]
                .1
                .iter()
                .filter(|p| p.key.contains(".output_blocks.") || p.key.contains(".out."))
                .map(|p| p.shape.numel())
                .sum()
        };
    w(
        out,
        format!(
            "trainable: {} parameters (sd_locked={}); AdamW moments {}",
            group_digits(trainable),
            m.sd_locked,
            human_bytes(8 * trainable as u64)
        ),
    )?;
    if args.keys {
        for (_, ps) in &parts {
            for p in ps {
                w(out, format!("{} {}", p.key, p.shape))?;
            }
        }
    }
    if args.plan {
        // Exactly the step `zeroconv train` compiles for the ControlNet: pixels in (the crop's size), the frozen VAE
        // and text encoder, one micro-batch of activations (accumulation runs it in a loop), the update.
        if matches!(args.device, Some(DeviceChoice::Cuda | DeviceChoice::CudaEmu)) {
            // A bad value is the environment's fault, not the config's: an error of its own.
            crate::knobs::library_workspace_bytes()?;
        }
        match train_step_plan(&cfg, args.device) {
            Ok(line) => {
                w(out, line)?;
                w(
                    out,
                    "host memory on --device cpu: the arena and the parameters/inputs/state above are host memory, and \
                     training keeps no other copy of the weights (checkpoints stream one tensor at a time); add the \
                     data pipeline and the program's code (BENCHMARKS.md: SD 1.5 at batch 1 peaked 11% above the plan)"
                        .to_string(),
                )?
            }
            Err(e) => w(out, format!("training step: this config cannot be trained: {e}"))?,
        }
        // The latent-space step `bench train` times (and ../shared/bench's PyTorch step runs): no VAE or text encoder.
        let st = step::latent_step(&cfg, m.micro_batch_size as usize)?;
        let opt = step::optimize(&cfg, &st, false)?;
        let plan = CpuBackend::default().plan(&opt.graph)?;
        w(
            out,
            format!(
                "bench train step (latent space, no VAE or text encoder; batch {}, {}x{} latents): {} kernels; {}",
                st.batch.batch,
                st.batch.latent_h,
                st.batch.latent_w,
                opt.graph.nodes.iter().filter(|n| !n.op.is_view()).count(),
                plan.summary()
            ),
        )?;
    }
    Ok(())
}

/// The plan of the ControlNet step `zeroconv train` compiles, as one line.
fn train_step_plan(cfg: &crate::io::config::Config, device: Option<DeviceChoice>) -> Result<String> {
    let models = crate::app::train::step_models(cfg)?;
    let (h, w) = crate::app::train::data::image_size(cfg);
    let st = step::train_step(cfg, &models, TrainPhase::Control, (h, w))?;
    let opt = step::run_passes(&st.graph, &step::pass_options(cfg, false))?;
    let plan = CpuBackend::default().plan(&opt.graph)?;
    let f = models.first_stage.factor();
    let gpu = match device {
        Some(DeviceChoice::Cuda | DeviceChoice::CudaEmu) => {
            let flash = crate::app::train::compile_options(cfg, None)?.flash_attention;
            let backend = GpuBackend::<EmuDevice>::emulated(EmuOptions::default()).with_flash_attention(flash);
            let p = backend.plan(&opt.graph)?;
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            format!(
                "\nCUDA executor (flash attention {}): {:.2} GiB of device memory: arena {:.2} GiB (intermediates and \
                 every kernel's scratch), parameters, inputs and optimizer state {:.2} GiB, kernel constants {:.1} \
                 KiB, and\n  library workspace: {:.1} MiB (one, shared by every cuBLASLt and cuDNN call; {})",
                if flash { "on" } else { "off" },
                gib(p.total_bytes()),
                gib(p.plan.arena_bytes as u64),
                gib(p.source_bytes),
                p.const_total as f64 / 1024.0,
                p.library_workspace as f64 / (1u64 << 20) as f64,
                crate::knobs::LIBRARY_WORKSPACE_MIB
            )
        }
        _ => String::new(),
    };
    Ok(format!(
        "training step (micro-batch {} x {} per optimizer step, {h}x{w} images, {}x{} latents, precision {:?}): {} \
         kernels; {}",
        cfg.model.micro_batch_size,
        st.micro_batches,
        h / f,
        w / f,
        cfg.trainer.precision,
        opt.graph.nodes.iter().filter(|n| !n.op.is_view()).count(),
        plan.summary()
    ) + &gpu)
}

pub fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
