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
    let params = g.trainable_params();
    let grads = super::autodiff::backward(g, loss, &params)?;
    let mut pairs: Vec<(ValueId, ValueId)> = params.iter().filter_map(|p| grads.get(p).map(|&d| (*p, d))).collect();
    g.set_phase(Phase::Backward);
    if let Some(max_norm) = clip {
        pairs = clip_grad_norm(g, &pairs, max_norm)?;
    }
    if l2 != 0.0 {
        pairs = pairs
            .into_iter()
            .map(|(p, d)| {
                let d = g.cast(d, g.dtype(p))?;
                let decay = g.scale(p, l2)?;
                Ok((p, g.add(d, decay)?))
            })
            .collect::<Result<_>>()?;
    }
    g.set_phase(Phase::Forward);
    append_adamw(g, &pairs, cfg)
}

/// As `append_training_step`, clipping the gradients to a global L2 norm of at most `clip` first
/// (`torch.nn.utils.clip_grad_norm_`: g ← g · min(1, clip / (‖g‖ + 1e-6))).
pub fn append_training_step_clipped(
    g: &mut Graph,
    loss: ValueId,
    cfg: &AdamWConfig,
    clip: Option<f64>,
) -> Result<ValueId> {
    let params = g.trainable_params();
    let grads = super::autodiff::backward(g, loss, &params)?;
    let mut pairs: Vec<(ValueId, ValueId)> = params.iter().filter_map(|p| grads.get(p).map(|&d| (*p, d))).collect();
    if let Some(max_norm) = clip {
        g.set_phase(Phase::Backward);
        pairs = clip_grad_norm(g, &pairs, max_norm)?;
        g.set_phase(Phase::Forward);
    }
    append_adamw(g, &pairs, cfg)
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
