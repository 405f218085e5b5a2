//! Building each component symbolically to list its parameters (keys, shapes, counts) without
//! running anything: what `zeroconv inspect` prints and checkpoint loading checks against.

use super::builder::{ModelBuilder, ParamSpec};
use super::config::{ClipConfig, ControlNetConfig, UNetConfig, VaeConfig};
use super::{clip, controlnet, unet, vae, CLIP_PREFIX, CONTROL_PREFIX, UNET_PREFIX, VAE_PREFIX};
use crate::error::Result;
use crate::graph::DType;

/// Smallest latent side every level can halve down to.
fn small_latent(levels: usize) -> usize {
    1 << levels.saturating_sub(1).max(1)
}

pub fn unet_params(cfg: &UNetConfig) -> Result<Vec<ParamSpec>> {
    let mut b = ModelBuilder::new(DType::F32);
    let s = small_latent(cfg.channel_mult.len());
    let x = b.g.input("x", [1, cfg.in_channels, s, s], DType::F32);
    let t = b.g.input("t", [1], DType::I64);
    let c = b.g.input("context", [1, 1, cfg.context_dim], DType::F32);
    unet::controlled_unet(&mut b, UNET_PREFIX, cfg, unet::UnetInputs { x, t, ctx: c }, None, false)?;
    Ok(b.params)
}

pub fn controlnet_params(cfg: &ControlNetConfig) -> Result<Vec<ParamSpec>> {
    let mut b = ModelBuilder::new(DType::F32);
    let s = small_latent(cfg.unet.channel_mult.len());
    let x = b.g.input("x", [1, cfg.unet.in_channels, s, s], DType::F32);
    let h = b.g.input("hint", [1, cfg.hint_channels, 8 * s, 8 * s], DType::F32);
    let t = b.g.input("t", [1], DType::I64);
    let c = b.g.input("context", [1, 1, cfg.unet.context_dim], DType::F32);
    controlnet::controlnet(&mut b, CONTROL_PREFIX, cfg, x, h, t, c)?;
    Ok(b.params)
}

pub fn vae_params(cfg: &VaeConfig) -> Result<Vec<ParamSpec>> {
    let mut b = ModelBuilder::new(DType::F32);
    let f = 1 << (cfg.ch_mult.len() - 1);
    let x = b.g.input("image", [1, cfg.in_channels, f, f], DType::F32);
    vae::vae_encode(&mut b, VAE_PREFIX, cfg, x)?;
    let z = b.g.input("z", [1, cfg.embed_dim, 1, 1], DType::F32);
    vae::vae_decode(&mut b, VAE_PREFIX, cfg, z)?;
    Ok(b.params)
}

pub fn clip_params(cfg: &ClipConfig) -> Result<Vec<ParamSpec>> {
    let mut b = ModelBuilder::new(DType::F32);
    let ids = b.g.input("ids", [1, 1], DType::I64);
    clip::clip_text(&mut b, CLIP_PREFIX, cfg, ids)?;
    Ok(b.params)
}

pub fn total(params: &[ParamSpec]) -> usize {
    params.iter().map(|p| p.shape.numel()).sum()
}
