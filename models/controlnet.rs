//! The ControlNet (`cldm.ControlNet`): a trainable copy of the U-Net encoder and middle block,
//! the hint encoder, and a zero-initialised 1x1 conv after every input block and after the
//! middle block.

use super::builder::ModelBuilder;
use super::config::ControlNetConfig;
use super::unet::layout;
use crate::error::Result;
use crate::graph::ValueId;

/// `input_hint_block`: (in, out, stride) of each conv; SiLU between them; the last one zero.
pub fn hint_convs(hint_channels: usize, model_channels: usize) -> [(usize, usize, usize); 8] {
    [
        (hint_channels, 16, 1),
        (16, 16, 1),
        (16, 32, 2),
        (32, 32, 1),
        (32, 96, 2),
        (96, 96, 1),
        (96, 256, 2),
        (256, model_channels, 1),
    ]
}

/// Builds the ControlNet at `prefix` (`control_model`); returns the control residuals in the
/// order the locked U-Net consumes them reversed: one per input block, the middle block's last.
pub fn controlnet(
    b: &mut ModelBuilder,
    prefix: &str,
    cfg: &ControlNetConfig,
    x: ValueId,
    hint: ValueId,
    t: ValueId,
    ctx: ValueId,
) -> Result<Vec<ValueId>> {
    let ucfg = &cfg.unet;
    let lay = layout(ucfg)?;
    let emb = b.time_embed(prefix, t, ucfg, x)?;
    // The hint encoder: 8x downsampling to the latent grid.
    let mut g = b.g.cast(hint, b.g.dtype(x))?;
    let convs = hint_convs(cfg.hint_channels, ucfg.model_channels);
    for (i, &(inp, out, stride)) in convs.iter().enumerate() {
        let last = i == convs.len() - 1;
        g = b.conv(&format!("{prefix}.input_hint_block.{}", 2 * i), g, inp, out, 3, stride, 1, last)?;
        if !last {
            g = b.g.silu(g)?;
        }
    }
    let (hh, hw) = (b.g.shape(g).dims()[2], b.g.shape(g).dims()[3]);
    let (xh, xw) = (b.g.shape(x).dims()[2], b.g.shape(x).dims()[3]);
    if (hh, hw) != (xh, xw) {
        return Err(crate::Error::msg(format!(
            "the hint encodes to {hh}x{hw} but the latent is {xh}x{xw}: the hint must be 8x the latent size ({}x{})",
            8 * xh,
            8 * xw
        )));
    }
    let mut outs = Vec::new();
    let mut h = x;
    for (i, blk) in lay.input.iter().enumerate() {
        h = b.input_block(&format!("{prefix}.input_blocks.{i}"), blk, h, emb, ctx, ucfg)?;
        if i == 0 {
            h = b.g.add(h, g)?;
        }
        let ch = lay.input_chans[i];
        outs.push(b.conv(&format!("{prefix}.zero_convs.{i}.0"), h, ch, ch, 1, 1, 0, true)?);
    }
    h = b.middle_block(&format!("{prefix}.middle_block"), h, emb, ctx, &lay, ucfg)?;
    let ch = lay.middle_ch;
    outs.push(b.conv(&format!("{prefix}.middle_block_out.0"), h, ch, ch, 1, 1, 0, true)?);
    Ok(outs)
}

/// Per-residual control scales: `strength` everywhere, or guess mode's 0.825^(12-i) ramp
/// (`strength` times it), as in the original `ControlLDM`.
pub fn control_scales(n: usize, strength: f64, guess_mode: bool) -> Vec<f64> {
    if guess_mode {
        (0..n).map(|i| strength * 0.825f64.powi((n - 1 - i) as i32)).collect()
    } else {
        vec![strength; n]
    }
}

/// Multiplies each residual by its scale (a no-op where the scale is 1).
pub fn apply_scales(b: &mut ModelBuilder, control: &[ValueId], scales: &[f64]) -> Result<Vec<ValueId>> {
    control.iter().zip(scales).map(|(&c, &s)| if s == 1.0 { Ok(c) } else { b.g.scale(c, s) }).collect()
}
