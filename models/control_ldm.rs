//! `ControlLDM.apply_model` as one graph: the ControlNet reads the noised latent, the hint, the
//! timestep and the text context; its scaled residuals enter the locked U-Net, which predicts ε.
//! With a target, the ε-prediction MSE loss is appended.

use super::builder::ModelBuilder;
use super::config::{ControlNetConfig, UNetConfig};
use super::{controlnet, unet, CONTROL_PREFIX, UNET_PREFIX};
use crate::error::Result;
use crate::graph::{DType, ValueId};

#[derive(Clone, Debug)]
pub struct ControlLdmConfig {
    pub unet: UNetConfig,
    pub control: ControlNetConfig,
    pub only_mid_control: bool,
    /// `sd_locked: False` also trains the U-Net's output blocks and `out`.
    pub sd_locked: bool,
    /// Control strength and guess mode, giving one scale per residual.
    pub strength: f64,
    pub guess_mode: bool,
}

impl ControlLdmConfig {
    /// The original ControlNet recipe around `unet`: a ControlNet copied from its encoder (RGB hints), every residual
    /// added, the U-Net locked, strength 1, no guess mode.
    pub fn locked(unet: UNetConfig) -> Self {
        ControlLdmConfig {
            control: ControlNetConfig { unet: unet.clone(), hint_channels: 3 },
            unet,
            only_mid_control: false,
            sd_locked: true,
            strength: 1.0,
            guess_mode: false,
        }
    }
}

/// The shapes the graph is built for.
#[derive(Clone, Copy, Debug)]
pub struct Batch {
    pub batch: usize,
    /// Latent height and width (the hint is 8x larger).
    pub latent_h: usize,
    pub latent_w: usize,
    pub context_len: usize,
}

pub struct ControlLdmGraph {
    pub b: ModelBuilder,
    pub x: ValueId,
    pub t: ValueId,
    pub context: ValueId,
    pub hint: ValueId,
    pub eps: ValueId,
    /// The residuals as the ControlNet outputs them (before scaling), middle block's last.
    pub control: Vec<ValueId>,
    pub target: Option<ValueId>,
    pub loss: Option<ValueId>,
}

/// Builds ControlNet + locked U-Net for `shape`; parameters in `param_dtype`, activations in
/// `compute` (bf16 for mixed precision).
pub fn build(
    cfg: &ControlLdmConfig,
    shape: Batch,
    param_dtype: DType,
    compute: DType,
    with_loss: bool,
) -> Result<ControlLdmGraph> {
    build_gated(cfg, shape, param_dtype, compute, with_loss, false)
}

/// As `build`; with `gated`, an input `control_gate` [B,1,1,1] multiplies every residual per
/// sample (0 turns the control off for that sample: guess mode's unconditional half).
pub fn build_gated(
    cfg: &ControlLdmConfig,
    shape: Batch,
    param_dtype: DType,
    compute: DType,
    with_loss: bool,
    gated: bool,
) -> Result<ControlLdmGraph> {
    let mut b = ModelBuilder::new(param_dtype);
    b.checkpoint_blocks = cfg.unet.use_checkpoint || cfg.control.unet.use_checkpoint;
    let Batch { batch: n, latent_h: h, latent_w: w, context_len: l } = shape;
    let x = b.g.input("x", [n, cfg.unet.in_channels, h, w], param_dtype);
    let t = b.g.input("t", [n], DType::I64);
    let context = b.g.input("context", [n, l, cfg.unet.context_dim], param_dtype);
    let hint = b.g.input("hint", [n, cfg.control.hint_channels, 8 * h, 8 * w], param_dtype);
    let (xc, cc) = (b.g.cast(x, compute)?, b.g.cast(context, compute)?);
    let hc = b.g.cast(hint, compute)?;
    let control = b.with_trainable(true, |b| controlnet::controlnet(b, CONTROL_PREFIX, &cfg.control, xc, hc, t, cc))?;
    let scales = controlnet::control_scales(control.len(), cfg.strength, cfg.guess_mode);
    let mut scaled = controlnet::apply_scales(&mut b, &control, &scales)?;
    if gated {
        let gate = b.g.input("control_gate", [n, 1, 1, 1], param_dtype);
        let gate = b.g.cast(gate, compute)?;
        scaled = scaled.iter().map(|&c| b.g.mul(c, gate)).collect::<Result<_>>()?;
    }
    let eps = b.with_trainable(false, |b| {
        let control = unet::Control { residuals: &scaled, only_mid: cfg.only_mid_control };
        let inputs = unet::UnetInputs { x: xc, t, ctx: cc };
        unet::controlled_unet(b, UNET_PREFIX, &cfg.unet, inputs, Some(control), !cfg.sd_locked)
    })?;
    let eps = b.g.cast(eps, param_dtype)?;
    let (target, loss) = if with_loss {
        let target = b.g.input("target", [n, cfg.unet.out_channels, h, w], param_dtype);
        let loss = b.g.mse_loss(eps, target)?;
        (Some(target), Some(loss))
    } else {
        (None, None)
    };
    Ok(ControlLdmGraph { b, x, t, context, hint, eps, control, target, loss })
}
