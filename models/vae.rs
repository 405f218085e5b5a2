//! AutoencoderKL (`ldm.models.autoencoder`): encoder to a diagonal Gaussian over latents, and
//! the decoder back to pixels. Keys follow `first_stage_model.{encoder,decoder,quant_conv,...}`.

use super::builder::ModelBuilder;
use super::config::VaeConfig;
use super::config::GROUP_NORM_GROUPS;
use crate::error::Result;
use crate::graph::ValueId;

/// The VAE's `Normalize` is GroupNorm(32, eps=1e-6).
const EPS: f64 = 1e-6;

impl ModelBuilder {
    /// ResnetBlock without a time embedding.
    fn vae_resblock(&mut self, p: &str, x: ValueId, inp: usize, out: usize) -> Result<ValueId> {
        self.block(|b| {
            let h = b.group_norm(&format!("{p}.norm1"), x, inp, GROUP_NORM_GROUPS, EPS)?;
            let h = b.g.silu(h)?;
            let h = b.conv(&format!("{p}.conv1"), h, inp, out, 3, 1, 1, false)?;
            let h = b.group_norm(&format!("{p}.norm2"), h, out, GROUP_NORM_GROUPS, EPS)?;
            let h = b.g.silu(h)?;
            let h = b.conv(&format!("{p}.conv2"), h, out, out, 3, 1, 1, false)?;
            let skip = if inp == out { x } else { b.conv(&format!("{p}.nin_shortcut"), x, inp, out, 1, 1, 0, false)? };
            b.g.add(skip, h)
        })
    }

    /// AttnBlock: single-head attention over the spatial positions, 1x1 conv projections.
    fn vae_attn(&mut self, p: &str, x: ValueId, ch: usize) -> Result<ValueId> {
        self.block(|b| {
            let d = b.g.shape(x).dims().to_vec();
            let (n, hh, ww) = (d[0], d[2], d[3]);
            let h = b.group_norm(&format!("{p}.norm"), x, ch, GROUP_NORM_GROUPS, EPS)?;
            let mut qkv = Vec::new();
            for name in ["q", "k", "v"] {
                let t = b.conv(&format!("{p}.{name}"), h, ch, ch, 1, 1, 0, false)?;
                let t = b.g.reshape(t, [n, 1, ch, hh * ww])?;
                qkv.push(b.g.permute(t, &[0, 1, 3, 2])?);
            }
            let o = b.g.attention(qkv[0], qkv[1], qkv[2], 1.0 / (ch as f64).sqrt(), false)?;
            let o = b.g.permute(o, &[0, 1, 3, 2])?;
            let o = b.g.reshape(o, [n, ch, hh, ww])?;
            let o = b.conv(&format!("{p}.proj_out"), o, ch, ch, 1, 1, 0, false)?;
            b.g.add(x, o)
        })
    }

    /// Downsample: pad right and bottom by one, then a stride-2 3x3 conv without padding.
    fn vae_downsample(&mut self, p: &str, x: ValueId, ch: usize) -> Result<ValueId> {
        let d = self.g.shape(x).dims().to_vec();
        let dt = self.g.dtype(x);
        let zc = self.g.fill(0.0, [d[0], d[1], d[2], 1], dt)?;
        let x = self.g.concat(&[x, zc], 3)?;
        let zr = self.g.fill(0.0, [d[0], d[1], 1, d[3] + 1], dt)?;
        let x = self.g.concat(&[x, zr], 2)?;
        self.conv(&format!("{p}.conv"), x, ch, ch, 3, 2, 0, false)
    }

    fn vae_mid(&mut self, p: &str, h: ValueId, ch: usize) -> Result<ValueId> {
        let h = self.vae_resblock(&format!("{p}.block_1"), h, ch, ch)?;
        let h = self.vae_attn(&format!("{p}.attn_1"), h, ch)?;
        self.vae_resblock(&format!("{p}.block_2"), h, ch, ch)
    }
}

/// Encodes images [N, in_channels, H, W] in [-1, 1]; returns (mean, logvar) of the latent
/// posterior, each [N, embed_dim, H/f, W/f] (logvar clamped to [-30, 20] as the original does).
pub fn vae_encode(b: &mut ModelBuilder, prefix: &str, cfg: &VaeConfig, x: ValueId) -> Result<(ValueId, ValueId)> {
    let p = format!("{prefix}.encoder");
    let mut h = b.conv(&format!("{p}.conv_in"), x, cfg.in_channels, cfg.ch, 3, 1, 1, false)?;
    let mut res = cfg.resolution;
    let levels = cfg.ch_mult.len();
    let mut block_in = cfg.ch;
    for (i, &mult) in cfg.ch_mult.iter().enumerate() {
        let block_out = cfg.ch * mult;
        for j in 0..cfg.num_res_blocks {
            h = b.vae_resblock(&format!("{p}.down.{i}.block.{j}"), h, block_in, block_out)?;
            block_in = block_out;
            if cfg.attn_resolutions.contains(&res) {
                h = b.vae_attn(&format!("{p}.down.{i}.attn.{j}"), h, block_in)?;
            }
        }
        if i != levels - 1 {
            h = b.vae_downsample(&format!("{p}.down.{i}.downsample"), h, block_in)?;
            res /= 2;
        }
    }
    h = b.vae_mid(&format!("{p}.mid"), h, block_in)?;
    h = b.group_norm(&format!("{p}.norm_out"), h, block_in, GROUP_NORM_GROUPS, EPS)?;
    h = b.g.silu(h)?;
    let zc = if cfg.double_z { 2 * cfg.z_channels } else { cfg.z_channels };
    h = b.conv(&format!("{p}.conv_out"), h, block_in, zc, 3, 1, 1, false)?;
    let moments = b.conv(&format!("{prefix}.quant_conv"), h, zc, 2 * cfg.embed_dim, 1, 1, 0, false)?;
    let mean = b.g.slice(moments, 1, 0, cfg.embed_dim)?;
    let logvar = b.g.slice(moments, 1, cfg.embed_dim, 2 * cfg.embed_dim)?;
    // clamp(-30, 20) = -30 + relu(x + 30) - relu(x - 20)
    let a = b.g.affine(logvar, 1.0, 30.0)?;
    let a = b.g.unary(crate::graph::UnaryOp::Relu, a)?;
    let c = b.g.affine(logvar, 1.0, -20.0)?;
    let c = b.g.unary(crate::graph::UnaryOp::Relu, c)?;
    let d = b.g.sub(a, c)?;
    let logvar = b.g.affine(d, 1.0, -30.0)?;
    Ok((mean, logvar))
}

/// Decodes latents z [N, embed_dim, h, w] (unscaled) to images [N, out_ch, 8h, 8w].
pub fn vae_decode(b: &mut ModelBuilder, prefix: &str, cfg: &VaeConfig, z: ValueId) -> Result<ValueId> {
    let p = format!("{prefix}.decoder");
    let z = b.conv(&format!("{prefix}.post_quant_conv"), z, cfg.embed_dim, cfg.z_channels, 1, 1, 0, false)?;
    let levels = cfg.ch_mult.len();
    let mut block_in = cfg.ch * cfg.ch_mult[levels - 1];
    let mut res = cfg.resolution >> (levels - 1);
    let mut h = b.conv(&format!("{p}.conv_in"), z, cfg.z_channels, block_in, 3, 1, 1, false)?;
    h = b.vae_mid(&format!("{p}.mid"), h, block_in)?;
    for i in (0..levels).rev() {
        let block_out = cfg.ch * cfg.ch_mult[i];
        for j in 0..=cfg.num_res_blocks {
            h = b.vae_resblock(&format!("{p}.up.{i}.block.{j}"), h, block_in, block_out)?;
            block_in = block_out;
            if cfg.attn_resolutions.contains(&res) {
                h = b.vae_attn(&format!("{p}.up.{i}.attn.{j}"), h, block_in)?;
            }
        }
        if i != 0 {
            let u = b.g.upsample2x(h)?;
            h = b.conv(&format!("{p}.up.{i}.upsample.conv"), u, block_in, block_in, 3, 1, 1, false)?;
            res *= 2;
        }
    }
    h = b.group_norm(&format!("{p}.norm_out"), h, block_in, GROUP_NORM_GROUPS, EPS)?;
    h = b.g.silu(h)?;
    b.conv(&format!("{p}.conv_out"), h, block_in, cfg.out_ch, 3, 1, 1, false)
}

/// The weightless first stage of the built-in demo: latents are the image averaged over
/// `factor` x `factor` blocks.
pub fn pixel_encode(b: &mut ModelBuilder, x: ValueId, factor: usize) -> Result<ValueId> {
    let d = b.g.shape(x).dims().to_vec();
    let (n, c, h, w) = (d[0], d[1], d[2] / factor, d[3] / factor);
    let blocks = b.g.reshape(x, [n, c, h, factor, w, factor])?;
    let s = b.g.sum(blocks, &[3, 5], false)?;
    b.g.scale(s, 1.0 / (factor * factor) as f64)
}

/// Its decoder: nearest upsampling by `factor` (a power of two).
pub fn pixel_decode(b: &mut ModelBuilder, z: ValueId, factor: usize) -> Result<ValueId> {
    let mut h = z;
    let mut f = factor;
    while f > 1 {
        h = b.g.upsample2x(h)?;
        f /= 2;
    }
    Ok(h)
}
