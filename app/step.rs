//! The compiled training step of a config: ControlNet + locked U-Net + loss + backward + AdamW
//! (with gradient clipping) as one graph, optimised by the passes the config asks for.

use crate::error::Result;
use crate::graph::optim::{append_accumulating_step, append_training_step_l2, AdamWConfig, UpdateRule};
use crate::graph::passes::all_reduce::{insert_gradient_all_reduce, BUCKET_BYTES};
use crate::graph::passes::{self, Optimized, PassOptions};
use crate::graph::{DType, Graph, ValueId};
use crate::io::config::model_config;
use crate::io::config::{Config, Precision};
use crate::models::control_ldm::{self, Batch};
use crate::models::train_step::{micro_step_hw, StepInputs, StepModels, TrainPhase};
use crate::models::{ModelBuilder, ParamSpec};

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
    let rule = update_rule(cfg);
    append_training_step_l2(g, loss, &rule.adamw, rule.clip, rule.l2)
}

/// What the update does with the gradients: `trainer.gradient_clip_val` (0 or null: no clipping, as in Lightning),
/// then `model.optim` (`adam`'s weight decay as the L2 term, see [`append_update`]).
pub fn update_rule(cfg: &Config) -> UpdateRule {
    let o = &cfg.model.optim;
    let l2 = if o.name.decoupled_weight_decay() { 0.0 } else { o.weight_decay };
    UpdateRule { adamw: adamw_config(cfg), clip: cfg.trainer.gradient_clip_val.filter(|&c| c > 0.0), l2 }
}

/// The step `zeroconv train` runs, before optimisation: one micro-batch from pixels and token ids (frozen VAE and
/// text encoder included), its backward and the update. With `micro_batches` > 1 (gradient accumulation) or data
/// parallelism (`trainer.devices × trainer.num_nodes` > 1) the micro-batch part adds its gradients into
/// accumulators and the update is a separate part run once per step ([`append_accumulating_step`]), so memory does
/// not grow with the number of micro-batches and the ranks' accumulators can be summed before the update.
pub struct TrainStepGraph {
    pub graph: Graph,
    pub params: Vec<ParamSpec>,
    pub inputs: StepInputs,
    /// The micro-batch's loss (unscaled).
    pub loss: ValueId,
    pub hyper: ValueId,
    /// The accumulators' keep input, when accumulating.
    pub keep: Option<ValueId>,
    /// Micro-batches per optimizer step in each process.
    pub micro_batches: usize,
    /// Processes training in data parallel.
    pub world_size: usize,
}

/// Builds [`TrainStepGraph`] for `phase` on (h, w) images, as the config asks (micro-batch size, accumulation,
/// precision, activation recomputation, update rule).
pub fn train_step(cfg: &Config, models: &StepModels, phase: TrainPhase, hw: (usize, usize)) -> Result<TrainStepGraph> {
    let micro = cfg.model.micro_batch_size as usize;
    let micro_batches = cfg.grad_accumulation().max(1) as usize;
    let world_size = cfg.data_parallel_size().max(1) as usize;
    let mut b = ModelBuilder::new(DType::F32);
    b.checkpoint_blocks = pass_options(cfg, false).checkpointing;
    let out = micro_step_hw(&mut b, models, phase, micro, hw, compute_dtype(cfg.trainer.precision), "")?;
    b.g.outputs.push(out.loss);
    let (hyper, keep) = if micro_batches > 1 || world_size > 1 {
        let acc = append_accumulating_step(&mut b.g, out.loss, &update_rule(cfg), micro_batches * world_size)?;
        // The ranks' gradients are summed in the backward, bucket by bucket, when each rank runs one micro-batch
        // per update, else at the start of the update (value ids unchanged).
        b.g = insert_gradient_all_reduce(&b.g, world_size, micro_batches, BUCKET_BYTES)?;
        (acc.hyper, Some(acc.keep))
    } else {
        (append_update(&mut b.g, out.loss, cfg)?, None)
    };
    Ok(TrainStepGraph {
        graph: b.g,
        params: b.params,
        inputs: out.inputs,
        loss: out.loss,
        hyper,
        keep,
        micro_batches,
        world_size,
    })
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

/// The passes the config asks for: checkpointing when `use_checkpoint`, fusion when `inductor`, the channels-last
/// rewrite when `channels_last`.
pub fn pass_options(cfg: &Config, dumps: bool) -> PassOptions {
    let m = &cfg.model;
    PassOptions {
        checkpointing: m.unet_config.use_checkpoint || m.control_stage_config.use_checkpoint,
        dumps,
        fusion: m.inductor,
        channels_last: m.channels_last,
    }
}

pub fn optimize(cfg: &Config, step: &StepGraph, dumps: bool) -> Result<Optimized> {
    run_passes(&step.graph, &pass_options(cfg, dumps))
}

/// The pass pipeline. On stderr: the fusion report with `ZEROCONV_DEBUG=1` or more, and every fusion decision
/// (fused, refused with the reason, undone) as well with `ZEROCONV_DEBUG=3` or `ZEROCONV_LOG=fusion` (knobs.rs).
pub fn run_passes(g: &Graph, opts: &PassOptions) -> Result<Optimized> {
    let opt = passes::optimize(g, opts)?;
    let decisions = crate::knobs::log_fusion_decisions();
    if let (true, Some(report)) = (decisions || crate::knobs::debug_level() >= 1, &opt.fusion) {
        if decisions {
            for line in &report.log {
                eprintln!("[fusion] {line}");
            }
        }
        eprintln!(
            "[fusion] {} -> {} kernels, {} fused groups, planned peak {} -> {} bytes",
            report.nodes_before, report.nodes_after, report.fused_groups, report.peak_before, report.peak_after
        );
    }
    Ok(opt)
}
