//! The optimizer update as part of the compiled step: AdamW with decoupled weight decay,
//! fp32 master weights and fp32 moments, one in-place node per parameter.

use super::dtype::DType;
use super::ir::{Graph, Phase, ValueId};
use super::op::{F64Bits, Op};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's `torch.optim.AdamW` defaults.
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// The name of the per-step input holding `[lr, 1/(1-beta1^t), 1/(1-beta2^t)]`.
pub const HYPER_INPUT: &str = "adamw.hyper";

/// The host-side values of the hyper input for step `t` (1-based).
pub fn adamw_hyper(cfg: &AdamWConfig, lr: f64, t: u64) -> [f64; 3] {
    let t = t.max(1) as i32;
    [lr, 1.0 / (1.0 - cfg.beta1.powi(t)), 1.0 / (1.0 - cfg.beta2.powi(t))]
}

/// Appends one AdamW node per (parameter, gradient) pair, creating the `m` and `v` state
/// buffers (named `<param>.adam_m` / `.adam_v`). Returns the hyper input.
pub fn append_adamw(g: &mut Graph, pairs: &[(ValueId, ValueId)], cfg: &AdamWConfig) -> Result<ValueId> {
    let hyper = g.input(HYPER_INPUT, [3], DType::F32);
    g.set_phase(Phase::Update);
    let op = Op::AdamW {
        beta1: F64Bits::new(cfg.beta1),
        beta2: F64Bits::new(cfg.beta2),
        eps: F64Bits::new(cfg.eps),
        weight_decay: F64Bits::new(cfg.weight_decay),
    };
    for &(p, grad) in pairs {
        let pv = g.value(p).clone();
        if !matches!(pv.dtype, DType::F32 | DType::F64) {
            return Err(Error::msg(format!("AdamW keeps fp32 master weights; parameter {} is {}", pv.name, pv.dtype)));
        }
        let grad = g.cast(grad, pv.dtype)?;
        let m = g.state(&format!("{}.adam_m", pv.name), pv.shape.clone(), pv.dtype);
        let v = g.state(&format!("{}.adam_v", pv.name), pv.shape.clone(), pv.dtype);
        g.add_node(op.clone(), &[p, grad, m, v, hyper])?;
    }
    g.set_phase(Phase::Forward);
    Ok(hyper)
}

/// Differentiates `loss` with respect to every trainable parameter and appends their AdamW
/// update: the whole training step in one graph. Returns the hyper input.
pub fn append_training_step(g: &mut Graph, loss: ValueId, cfg: &AdamWConfig) -> Result<ValueId> {
    append_training_step_clipped(g, loss, cfg, None)
}

/// As [`append_training_step_clipped`], for `torch.optim.Adam` (NeMo's `adam`) when `l2` is set: the weight decay
/// is Adam's L2 term, `g + l2 * p` added to each (clipped) gradient before the moments, instead of AdamW's decoupled
/// decay (`cfg.weight_decay`, which should then be 0).
pub fn append_training_step_l2(
    g: &mut Graph,
    loss: ValueId,
    cfg: &AdamWConfig,
    clip: Option<f64>,
    l2: f64,
) -> Result<ValueId> {
    let pairs = backward_pairs(g, loss)?;
    append_update_of(g, &pairs, &UpdateRule { adamw: *cfg, clip, l2 }, Phase::Backward)
}

/// As `append_training_step`, clipping the gradients to a global L2 norm of at most `clip` first
/// (`torch.nn.utils.clip_grad_norm_`: g ← g · min(1, clip / (‖g‖ + 1e-6))).
pub fn append_training_step_clipped(
    g: &mut Graph,
    loss: ValueId,
    cfg: &AdamWConfig,
    clip: Option<f64>,
) -> Result<ValueId> {
    append_training_step_l2(g, loss, cfg, clip, 0.0)
}

/// What the update does with a step's gradients: clip them (global L2 norm), add Adam's L2 term, then AdamW.
#[derive(Clone, Copy, Debug)]
pub struct UpdateRule {
    pub adamw: AdamWConfig,
    /// `torch.nn.utils.clip_grad_norm_`'s max_norm; `None` does not clip.
    pub clip: Option<f64>,
    /// `torch.optim.Adam`'s weight decay (`g + l2 * p`); 0 for AdamW, which decays the weights itself.
    pub l2: f64,
}

/// The name of the per-micro-batch input of an accumulating step: 0 for a step's first micro-batch (the
/// accumulators are overwritten), 1 for the others (added to).
pub const KEEP_INPUT: &str = "grad_acc.keep";

/// The accumulator of parameter `p` is the state named `<p>.grad_acc`.
pub const ACCUMULATOR_SUFFIX: &str = ".grad_acc";

/// The sources of an accumulating step the caller feeds.
#[derive(Clone, Copy, Debug)]
pub struct AccumulatingStep {
    /// `[lr, 1/(1-beta1^t), 1/(1-beta2^t)]`, read by the update.
    pub hyper: ValueId,
    /// [`KEEP_INPUT`].
    pub keep: ValueId,
}

/// Gradient accumulation as a loop, as PyTorch does it: the graph computes one micro-batch's gradients of
/// `loss / batches_per_update` and adds them into persistent accumulators (state `<param>.grad_acc`, the size of the
/// trainable parameters); the nodes after it, all in [`Phase::Update`], clip the accumulated gradients and apply
/// the update. The caller runs the nodes before [`update_start`] once per micro-batch (feeding [`KEEP_INPUT`]) and
/// the rest once per step, so activations cost one micro-batch however many are accumulated. `batches_per_update`
/// is the number of equal micro-batches one update averages: those accumulated here, times the data-parallel ranks
/// whose accumulators are summed into these before the update.
pub fn append_accumulating_step(
    g: &mut Graph,
    loss: ValueId,
    rule: &UpdateRule,
    batches_per_update: usize,
) -> Result<AccumulatingStep> {
    if batches_per_update == 0 {
        return Err(Error::msg("gradient accumulation needs at least one micro-batch"));
    }
    let keep = g.input(KEEP_INPUT, [1], DType::F32);
    let scaled = if batches_per_update > 1 { g.scale(loss, 1.0 / batches_per_update as f64)? } else { loss };
    let pairs = backward_pairs(g, scaled)?;
    g.set_phase(Phase::Backward);
    let mut accumulated = Vec::with_capacity(pairs.len());
    for (p, d) in pairs {
        let pv = g.value(p).clone();
        let d = g.cast(d, pv.dtype)?;
        let acc = g.state(&format!("{}{ACCUMULATOR_SUFFIX}", pv.name), pv.shape.clone(), pv.dtype);
        g.add_node(Op::AccumulateGrad, &[acc, d, keep])?;
        accumulated.push((p, acc));
    }
    let hyper = append_update_of(g, &accumulated, rule, Phase::Update)?;
    Ok(AccumulatingStep { hyper, keep })
}

/// The index of the first node of the update, in a graph whose nodes are a micro-batch part followed by an update
/// part ([`append_accumulating_step`], after any passes). Checks what running the two parts as separate launches
/// relies on: every node from there on is an update node, and the update reads nothing the micro-batch part
/// computes (only sources, such as the accumulators, and its own values).
pub fn update_start(g: &Graph) -> Result<usize> {
    let start = g
        .nodes
        .iter()
        .position(|n| n.phase == Phase::Update)
        .ok_or_else(|| Error::msg("the step has no update nodes to run apart from its micro-batch nodes"))?;
    for (i, node) in g.nodes.iter().enumerate().skip(start) {
        if node.phase != Phase::Update {
            return Err(Error::msg(format!(
                "node {i} ({}) of the micro-batch part comes after the update starts at node {start}",
                node.op.name()
            )));
        }
        for &v in &node.inputs {
            if let Some((p, _)) = g.values[v].producer {
                if p < start {
                    return Err(Error::msg(format!(
                        "update node {i} ({}) reads {}, computed by the micro-batch part (node {p}): the update may \
                         read only sources and its own values",
                        node.op.name(),
                        g.values[v].name
                    )));
                }
            }
        }
    }
    Ok(start)
}

/// Differentiates `loss` with respect to every trainable parameter: (parameter, gradient) pairs, in creation order.
fn backward_pairs(g: &mut Graph, loss: ValueId) -> Result<Vec<(ValueId, ValueId)>> {
    let params = g.trainable_params();
    let grads = super::autodiff::backward(g, loss, &params)?;
    Ok(params.iter().filter_map(|p| grads.get(p).map(|&d| (*p, d))).collect())
}

/// Clipping and the L2 term (as nodes of `phase`), then the AdamW nodes; returns the hyper input.
fn append_update_of(g: &mut Graph, pairs: &[(ValueId, ValueId)], rule: &UpdateRule, phase: Phase) -> Result<ValueId> {
    let mut pairs = pairs.to_vec();
    g.set_phase(phase);
    if let Some(max_norm) = rule.clip {
        pairs = clip_grad_norm(g, &pairs, max_norm)?;
    }
    if rule.l2 != 0.0 {
        pairs = pairs
            .into_iter()
            .map(|(p, d)| {
                let d = g.cast(d, g.dtype(p))?;
                let decay = g.scale(p, rule.l2)?;
                Ok((p, g.add(d, decay)?))
            })
            .collect::<Result<_>>()?;
    }
    g.set_phase(Phase::Forward);
    append_adamw(g, &pairs, &rule.adamw)
}

/// Scales every gradient by min(1, max_norm / (‖all gradients‖₂ + 1e-6)), in the graph.
pub fn clip_grad_norm(g: &mut Graph, pairs: &[(ValueId, ValueId)], max_norm: f64) -> Result<Vec<(ValueId, ValueId)>> {
    let mut total: Option<ValueId> = None;
    for &(_, d) in pairs {
        let d32 = g.cast(d, DType::F32)?;
        let sq = g.unary(super::op::UnaryOp::Square, d32)?;
        let axes: Vec<usize> = (0..g.shape(sq).rank()).collect();
        let s = if axes.is_empty() { sq } else { g.sum(sq, &axes, false)? };
        total = Some(match total {
            Some(t) => g.add(t, s)?,
            None => s,
        });
    }
    let Some(total) = total else { return Ok(pairs.to_vec()) };
    let norm = g.unary(super::op::UnaryOp::Sqrt, total)?;
    let denom = g.affine(norm, 1.0, 1e-6)?;
    let ratio = g.unary(super::op::UnaryOp::Recip, denom)?;
    let ratio = g.scale(ratio, max_norm)?;
    // min(1, r) = 1 - relu(1 - r)
    let one_minus = g.affine(ratio, -1.0, 1.0)?;
    let relu = g.unary(super::op::UnaryOp::Relu, one_minus)?;
    let factor = g.affine(relu, -1.0, 1.0)?;
    pairs
        .iter()
        .map(|&(p, d)| {
            let f = g.cast(factor, g.dtype(d))?;
            Ok((p, g.mul(d, f)?))
        })
        .collect()
}
