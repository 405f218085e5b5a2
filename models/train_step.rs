//! The whole training step of `ControlLDM` from pixels and token ids: the frozen first stage
//! encodes the image to latents, the frozen text encoder embeds the caption, the latent is noised
//! at a timestep, and the ControlNet + locked U-Net predict the noise (ε-prediction MSE).
//! Random draws (timesteps, noise, prompt dropout) are inputs, made by the host's seeded RNG, so a
//! resumed run replays them exactly.

use super::builder::ModelBuilder;
use super::config::{ClipConfig, VaeConfig};
use super::control_ldm::ControlLdmConfig;
use super::unet::{Control, UnetInputs};
use super::{clip, controlnet, unet, vae, CLIP_PREFIX, CONTROL_PREFIX, UNET_PREFIX, VAE_PREFIX};
use crate::error::Result;
use crate::graph::{DType, UnaryOp, ValueId};

#[derive(Clone, Debug)]
pub enum FirstStage {
    Kl(VaeConfig),
    /// 8x8 block averages (the built-in demo).
    Pixel,
}

impl FirstStage {
    /// Pixels per latent cell along each side.
    pub fn factor(&self) -> usize {
        match self {
            FirstStage::Kl(v) => 1 << (v.ch_mult.len() - 1),
            FirstStage::Pixel => 8,
        }
    }
}

#[derive(Clone, Debug)]
pub struct StepModels {
    pub ldm: ControlLdmConfig,
    pub first_stage: FirstStage,
    pub clip: ClipConfig,
    pub scale_factor: f64,
    /// The diffusion schedule (`model.linear_start`, `linear_end`, `timesteps`): training's noising and DDIM
    /// sampling both use it.
    pub schedule: super::schedule::Schedule,
}

impl StepModels {
    /// What every image side must be a multiple of: the first stage's downsampling times the U-Net's (its side
    /// halves once per level after the first).
    pub fn image_multiple(&self) -> usize {
        self.first_stage.factor() << self.ldm.unet.channel_mult.len().saturating_sub(1)
    }
}

/// What is trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainPhase {
    /// The U-Net alone, every parameter (no ControlNet): pretraining a base model.
    Base,
    /// The ControlNet (and the U-Net decoder when `sd_locked` is false).
    Control,
}

/// The per-step inputs of a micro-batch.
#[derive(Clone, Copy, Debug)]
pub struct StepInputs {
    /// [B, 3, H, W] in [-1, 1].
    pub image: ValueId,
    /// [B, hint_channels, H, W] in [0, 1].
    pub hint: ValueId,
    /// [B, L] int64 token ids.
    pub ids: ValueId,
    /// [B] int64 timesteps.
    pub t: ValueId,
    /// [B, C, h, w] the noise to add (the target of the prediction).
    pub noise: ValueId,
    /// [B, C, h, w] the posterior sample's noise (KL first stage only).
    pub posterior_noise: Option<ValueId>,
    /// [B, 1, 1, 1]: √ᾱ_t and √(1-ᾱ_t) per sample.
    pub sqrt_alpha: ValueId,
    pub sqrt_one_minus_alpha: ValueId,
    /// [B, 1, 1]: 1 keeps the caption's embedding, 0 drops it (prompt dropout).
    pub keep_text: ValueId,
}

pub struct StepOutputs {
    pub inputs: StepInputs,
    pub loss: ValueId,
    pub eps: ValueId,
}

/// Encodes images to (scaled) latents.
pub fn encode_latents(
    b: &mut ModelBuilder,
    m: &StepModels,
    image: ValueId,
    posterior_noise: Option<ValueId>,
) -> Result<ValueId> {
    match &m.first_stage {
        FirstStage::Pixel => {
            let z = vae::pixel_encode(b, image, 8)?;
            b.g.scale(z, m.scale_factor)
        }
        FirstStage::Kl(cfg) => {
            let (mean, logvar) = vae::vae_encode(b, VAE_PREFIX, cfg, image)?;
            let z = match posterior_noise {
                Some(e) => {
                    let half = b.g.scale(logvar, 0.5)?;
                    let std = b.g.unary(UnaryOp::Exp, half)?;
                    let s = b.g.mul(std, e)?;
                    b.g.add(mean, s)?
                }
                None => mean,
            };
            b.g.scale(z, m.scale_factor)
        }
    }
}

/// Latents back to images [-1, 1] (unscaling first).
pub fn decode_latents(b: &mut ModelBuilder, m: &StepModels, z: ValueId) -> Result<ValueId> {
    let z = b.g.scale(z, 1.0 / m.scale_factor)?;
    match &m.first_stage {
        FirstStage::Pixel => vae::pixel_decode(b, z, 8),
        FirstStage::Kl(cfg) => vae::vae_decode(b, VAE_PREFIX, cfg, z),
    }
}

/// Latent channels of the first stage.
pub fn latent_channels(m: &StepModels) -> usize {
    match &m.first_stage {
        FirstStage::Kl(v) => v.embed_dim,
        FirstStage::Pixel => 3,
    }
}

/// Appends one micro-batch's forward and loss to `b` (parameters are shared by key, so calling it
/// again for the next micro-batch reuses them).
pub fn micro_step(
    b: &mut ModelBuilder,
    m: &StepModels,
    phase: TrainPhase,
    n: usize,
    hw: usize,
    compute: DType,
    tag: &str,
) -> Result<StepOutputs> {
    micro_step_hw(b, m, phase, n, (hw, hw), compute, tag)
}

/// [`micro_step`] for images of `(height, width)` pixels (a non-square `center_crop_h_w`).
pub fn micro_step_hw(
    b: &mut ModelBuilder,
    m: &StepModels,
    phase: TrainPhase,
    n: usize,
    (h, w): (usize, usize),
    compute: DType,
    tag: &str,
) -> Result<StepOutputs> {
    let f = m.first_stage.factor();
    let (lat_h, lat_w) = (h / f, w / f);
    let c = latent_channels(m);
    let ctx_len = m.clip.max_position_embeddings;
    let dt = b.param_dtype;
    let image = b.g.input(&format!("image{tag}"), [n, 3, h, w], dt);
    let hint = b.g.input(&format!("hint{tag}"), [n, m.ldm.control.hint_channels, h, w], dt);
    let ids = b.g.input(&format!("ids{tag}"), [n, ctx_len], DType::I64);
    let t = b.g.input(&format!("t{tag}"), [n], DType::I64);
    let noise = b.g.input(&format!("noise{tag}"), [n, c, lat_h, lat_w], dt);
    let posterior_noise = match m.first_stage {
        FirstStage::Kl(_) => Some(b.g.input(&format!("posterior_noise{tag}"), [n, c, lat_h, lat_w], dt)),
        FirstStage::Pixel => None,
    };
    let sqrt_alpha = b.g.input(&format!("sqrt_alpha{tag}"), [n, 1, 1, 1], dt);
    let sqrt_one_minus_alpha = b.g.input(&format!("sqrt_one_minus_alpha{tag}"), [n, 1, 1, 1], dt);
    let keep_text = b.g.input(&format!("keep_text{tag}"), [n, 1, 1], dt);
    let inputs =
        StepInputs { image, hint, ids, t, noise, posterior_noise, sqrt_alpha, sqrt_one_minus_alpha, keep_text };

    // Frozen encoders.
    let (z0, ctx) = b.with_trainable(false, |b| {
        let z0 = encode_latents(b, m, image, posterior_noise)?;
        let ctx = clip::clip_text(b, CLIP_PREFIX, &m.clip, ids)?;
        Ok((z0, ctx))
    })?;
    let ctx = b.g.mul(ctx, keep_text)?;
    // x_t = √ᾱ·z0 + √(1-ᾱ)·ε
    let a = b.g.mul(z0, sqrt_alpha)?;
    let s = b.g.mul(noise, sqrt_one_minus_alpha)?;
    let xt = b.g.add(a, s)?;
    let (xc, cc) = (b.g.cast(xt, compute)?, b.g.cast(ctx, compute)?);
    let eps = match phase {
        TrainPhase::Base => b.with_trainable(true, |b| {
            unet::controlled_unet(b, UNET_PREFIX, &m.ldm.unet, UnetInputs { x: xc, t, ctx: cc }, None, true)
        })?,
        TrainPhase::Control => {
            let hc = b.g.cast(hint, compute)?;
            let control =
                b.with_trainable(true, |b| controlnet::controlnet(b, CONTROL_PREFIX, &m.ldm.control, xc, hc, t, cc))?;
            let scales = controlnet::control_scales(control.len(), 1.0, false);
            let scaled = controlnet::apply_scales(b, &control, &scales)?;
            b.with_trainable(false, |b| {
                let control = Control { residuals: &scaled, only_mid: m.ldm.only_mid_control };
                let inputs = UnetInputs { x: xc, t, ctx: cc };
                unet::controlled_unet(b, UNET_PREFIX, &m.ldm.unet, inputs, Some(control), !m.ldm.sd_locked)
            })?
        }
    };
    let eps = b.g.cast(eps, dt)?;
    let loss = b.g.mse_loss(eps, noise)?;
    Ok(StepOutputs { inputs, loss, eps })
}
