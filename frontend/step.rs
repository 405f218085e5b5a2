//! The compiled training step of a config: ControlNet + locked U-Net + loss + backward + AdamW
//! (with gradient clipping) as one graph, optimised by the passes the config asks for.

use super::config::{Config, Precision};
use super::model_config;
use crate::error::Result;
use crate::graph::optim::{append_training_step_clipped, append_training_step_l2, AdamWConfig};
use crate::graph::passes::{self, Optimized, PassOptions};
use crate::graph::{DType, Graph, ValueId};
use crate::models::control_ldm::{self, Batch};
use crate::models::ParamSpec;

/// The activation dtype a precision setting means (parameters and optimizer state stay f32).
pub fn compute_dtype(p: Precision) -> DType {
    match p {
        Precision::F32 => DType::F32,
        Precision::Bf16Mixed => DType::BF16,
        Precision::F16Mixed => DType::F16,
    }
}

/// The update's settings. Its `weight_decay` is AdamW's decoupled decay (`adamw`, `fused_adam`); for `adam` it is 0
/// and the decay enters the gradient instead ([`append_update`]).
pub fn adamw_config(cfg: &Config) -> AdamWConfig {
    let o = &cfg.model.optim;
    let decoupled = if o.name.decoupled_weight_decay() { o.weight_decay } else { 0.0 };
    AdamWConfig { beta1: o.betas[0], beta2: o.betas[1], eps: o.eps, weight_decay: decoupled }
}

/// Appends the backward pass, gradient clipping (`trainer.gradient_clip_val`) and the optimizer update of
/// `model.optim` to a step that computes `loss`; returns the hyper input. `adam` is `torch.optim.Adam`: its weight
/// decay is the L2 term `weight_decay * p` added to the clipped gradient before the moments (NeMo's `adam`);
/// `adamw` and `fused_adam` (Apex FusedAdam, AdamW mode) decay the weights directly.
pub fn append_update(g: &mut Graph, loss: ValueId, cfg: &Config) -> Result<ValueId> {
    let o = &cfg.model.optim;
    // Lightning: gradient_clip_val 0 (or null) does not clip.
    let clip = cfg.trainer.gradient_clip_val.filter(|&c| c > 0.0);
    if o.name.decoupled_weight_decay() {
        append_training_step_clipped(g, loss, &adamw_config(cfg), clip)
    } else {
        append_training_step_l2(g, loss, &adamw_config(cfg), clip, o.weight_decay)
    }
}

/// A training step before optimisation.
pub struct StepGraph {
    pub graph: Graph,
    pub params: Vec<ParamSpec>,
    pub loss: ValueId,
    pub hyper: ValueId,
    pub batch: Batch,
}

/// The step on latent-space inputs (`x`, `t`, `context`, `hint`, `target`), as `bench train`
/// times it: no VAE or text encoder.
pub fn latent_step(cfg: &Config, micro_batch: usize) -> Result<StepGraph> {
    let m = &cfg.model;
    let size = m.unet_config.image_size as usize;
    let batch = Batch { batch: micro_batch, latent_h: size, latent_w: size, context_len: 77 };
    let ldm = model_config::control_ldm(cfg);
    let compute = compute_dtype(cfg.trainer.precision);
    let mut built = control_ldm::build(&ldm, batch, DType::F32, compute, true)?;
    let loss = built.loss.expect("built with a loss");
    built.b.g.outputs.push(loss);
    let hyper = append_update(&mut built.b.g, loss, cfg)?;
    Ok(StepGraph { graph: built.b.g, params: built.b.params, loss, hyper, batch })
}

/// The passes the config asks for: checkpointing when `use_checkpoint`, fusion when `inductor`.
pub fn pass_options(cfg: &Config, dumps: bool) -> PassOptions {
    let m = &cfg.model;
    PassOptions {
        checkpointing: m.unet_config.use_checkpoint || m.control_stage_config.use_checkpoint,
        dumps,
        fusion: m.inductor,
    }
}

pub fn optimize(cfg: &Config, step: &StepGraph, dumps: bool) -> Result<Optimized> {
    run_passes(&step.graph, &pass_options(cfg, dumps))
}

/// The pass pipeline, printing the fusion decisions (fused, refused with the reason, undone) to
/// stderr when `ZEROCONV_LOG` names `fusion` (e.g. `ZEROCONV_LOG=fusion`).
pub fn run_passes(g: &Graph, opts: &PassOptions) -> Result<Optimized> {
    let opt = passes::optimize(g, opts)?;
    let wanted = std::env::var("ZEROCONV_LOG").is_ok_and(|v| v.split(',').any(|t| t.trim() == "fusion"));
    if let (true, Some(report)) = (wanted, &opt.fusion) {
        for line in &report.log {
            eprintln!("[fusion] {line}");
        }
        eprintln!(
            "[fusion] {} -> {} kernels, {} fused groups, planned peak {} -> {} bytes",
            report.nodes_before, report.nodes_after, report.fused_groups, report.peak_before, report.peak_after
        );
    }
    Ok(opt)
}
