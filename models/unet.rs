//! The LDM `openaimodel` U-Net (with SpatialTransformers), as used by SD 1.x/2.x, and the
//! pieces the ControlNet shares with it. Keys follow the original module tree.

use super::builder::ModelBuilder;
use super::config::{UNetConfig, GROUP_NORM_GROUPS};
use crate::error::Result;
use crate::graph::ValueId;

/// The widths of one transformer block's attention: the token width `dim`, the context's `ctx_dim` (= `dim` for
/// self-attention), and `heads` heads of `dh` channels.
#[derive(Clone, Copy, Debug)]
struct AttnWidths {
    dim: usize,
    ctx_dim: usize,
    heads: usize,
    dh: usize,
}

/// ResBlocks use `GroupNorm32` (eps 1e-5); SpatialTransformer's `Normalize` uses eps 1e-6.
pub const RES_EPS: f64 = 1e-5;
pub const TRANSFORMER_NORM_EPS: f64 = 1e-6;

/// What one input block of the encoder holds.
#[derive(Clone, Debug, PartialEq)]
pub enum InputBlock {
    /// `input_blocks.0`: the first conv, in_channels → model_channels.
    ConvIn {
        out: usize,
    },
    /// A ResBlock, then a SpatialTransformer when `attn` is set (heads, head width).
    Res {
        inp: usize,
        out: usize,
        attn: Option<(usize, usize)>,
    },
    Down {
        ch: usize,
    },
}

/// What one output block of the decoder holds.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputBlock {
    pub inp: usize,
    pub skip: usize,
    pub out: usize,
    pub attn: Option<(usize, usize)>,
    pub upsample: bool,
}

/// The block layout the LDM constructor derives from the config.
pub struct Layout {
    pub input: Vec<InputBlock>,
    pub input_chans: Vec<usize>,
    pub middle_ch: usize,
    pub middle_attn: (usize, usize),
    pub output: Vec<OutputBlock>,
}

pub fn layout(cfg: &UNetConfig) -> Result<Layout> {
    cfg.validate("unet_config")?;
    let mc = cfg.model_channels;
    let mut input = vec![InputBlock::ConvIn { out: mc }];
    let mut chans = vec![mc];
    let mut ch = mc;
    let mut ds = 1;
    let levels = cfg.channel_mult.len();
    for (level, &mult) in cfg.channel_mult.iter().enumerate() {
        for _ in 0..cfg.num_res_blocks[level] {
            let out = mult * mc;
            let attn = if cfg.attention_resolutions.contains(&ds) { Some(cfg.heads(out)?) } else { None };
            input.push(InputBlock::Res { inp: ch, out, attn });
            ch = out;
            chans.push(ch);
        }
        if level != levels - 1 {
            input.push(InputBlock::Down { ch });
            chans.push(ch);
            ds *= 2;
        }
    }
    let middle_attn = cfg.heads(ch)?;
    let middle_ch = ch;
    let mut output = Vec::new();
    let mut skips = chans.clone();
    for (level, &mult) in cfg.channel_mult.iter().enumerate().rev() {
        for i in 0..=cfg.num_res_blocks[level] {
            let skip = skips.pop().expect("one skip per input block");
            let out = mc * mult;
            let attn = if cfg.attention_resolutions.contains(&ds) { Some(cfg.heads(out)?) } else { None };
            let upsample = level != 0 && i == cfg.num_res_blocks[level];
            output.push(OutputBlock { inp: ch, skip, out, attn, upsample });
            ch = out;
            if upsample {
                ds /= 2;
            }
        }
    }
    Ok(Layout { input, input_chans: chans, middle_ch, middle_attn, output })
}

impl ModelBuilder {
    /// `time_embed`: sinusoidal embedding of t, then Linear, SiLU, Linear.
    pub fn time_embed(&mut self, p: &str, t: ValueId, cfg: &UNetConfig, like: ValueId) -> Result<ValueId> {
        let mc = cfg.model_channels;
        let ted = cfg.time_embed_dim();
        let e = self.g.timestep_embedding(t, mc, 10000.0)?;
        let e = self.g.cast(e, self.g.dtype(like))?;
        let e = self.linear(&format!("{p}.time_embed.0"), e, mc, ted, true)?;
        let e = self.g.silu(e)?;
        self.linear(&format!("{p}.time_embed.2"), e, ted, ted, true)
    }

    /// ResBlock (no scale-shift norm): in_layers, + emb_layers(emb), out_layers (zero conv), skip.
    pub fn resblock(
        &mut self,
        p: &str,
        x: ValueId,
        emb: ValueId,
        inp: usize,
        out: usize,
        ted: usize,
    ) -> Result<ValueId> {
        self.block(|b| {
            let h = b.group_norm(&format!("{p}.in_layers.0"), x, inp, GROUP_NORM_GROUPS, RES_EPS)?;
            let h = b.g.silu(h)?;
            let h = b.conv(&format!("{p}.in_layers.2"), h, inp, out, 3, 1, 1, false)?;
            let e = b.g.silu(emb)?;
            let e = b.linear(&format!("{p}.emb_layers.1"), e, ted, out, true)?;
            let n = b.g.shape(e).dims()[0];
            let e = b.g.reshape(e, [n, out, 1, 1])?;
            let h = b.g.add(h, e)?;
            let h = b.group_norm(&format!("{p}.out_layers.0"), h, out, GROUP_NORM_GROUPS, RES_EPS)?;
            let h = b.g.silu(h)?;
            let h = b.conv(&format!("{p}.out_layers.3"), h, out, out, 3, 1, 1, true)?;
            let skip =
                if inp == out { x } else { b.conv(&format!("{p}.skip_connection"), x, inp, out, 1, 1, 0, false)? };
            b.g.add(skip, h)
        })
    }

    /// CrossAttention: q from x, k and v from `ctx` (or x for self-attention), then to_out.0.
    fn cross_attention(&mut self, p: &str, x: ValueId, ctx: Option<ValueId>, w: &AttnWidths) -> Result<ValueId> {
        let AttnWidths { dim, ctx_dim, heads, dh } = *w;
        let inner = heads * dh;
        let src = ctx.unwrap_or(x);
        let src_dim = if ctx.is_some() { ctx_dim } else { dim };
        let q = self.linear(&format!("{p}.to_q"), x, dim, inner, false)?;
        let k = self.linear(&format!("{p}.to_k"), src, src_dim, inner, false)?;
        let v = self.linear(&format!("{p}.to_v"), src, src_dim, inner, false)?;
        let o = self.heads_attention(q, k, v, heads, false)?;
        self.linear(&format!("{p}.to_out.0"), o, inner, dim, true)
    }

    /// BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward, pre-norm.
    fn transformer_block(&mut self, p: &str, x: ValueId, ctx: ValueId, w: &AttnWidths) -> Result<ValueId> {
        let dim = w.dim;
        let h = self.layer_norm(&format!("{p}.norm1"), x, dim, 1e-5)?;
        let h = self.cross_attention(&format!("{p}.attn1"), h, None, &AttnWidths { ctx_dim: dim, ..*w })?;
        let x = self.g.add(h, x)?;
        let h = self.layer_norm(&format!("{p}.norm2"), x, dim, 1e-5)?;
        let h = self.cross_attention(&format!("{p}.attn2"), h, Some(ctx), w)?;
        let x = self.g.add(h, x)?;
        let h = self.layer_norm(&format!("{p}.norm3"), x, dim, 1e-5)?;
        let ff = dim * 4;
        let h = self.linear(&format!("{p}.ff.net.0.proj"), h, dim, ff * 2, true)?;
        let parts = self.g.chunk(h, 2, 2)?;
        let gate = self.g.unary(crate::graph::UnaryOp::GeluErf, parts[1])?;
        let h = self.g.mul(parts[0], gate)?;
        let h = self.linear(&format!("{p}.ff.net.2"), h, ff, dim, true)?;
        self.g.add(h, x)
    }

    /// SpatialTransformer: norm, proj_in (1x1 conv or linear), transformer blocks, proj_out
    /// (zero-initialised), residual.
    pub fn spatial_transformer(
        &mut self,
        p: &str,
        x: ValueId,
        ctx: ValueId,
        ch: usize,
        (heads, dh): (usize, usize),
        cfg: &UNetConfig,
    ) -> Result<ValueId> {
        self.block(|b| {
            let d = b.g.shape(x).dims().to_vec();
            let (n, hh, ww) = (d[0], d[2], d[3]);
            let inner = heads * dh;
            let h = b.group_norm(&format!("{p}.norm"), x, ch, GROUP_NORM_GROUPS, TRANSFORMER_NORM_EPS)?;
            let to_seq = |b: &mut ModelBuilder, h: ValueId, c: usize| -> Result<ValueId> {
                let h = b.g.reshape(h, [n, c, hh * ww])?;
                b.g.permute(h, &[0, 2, 1])
            };
            let mut h = if cfg.use_linear_in_transformer {
                let s = to_seq(b, h, ch)?;
                b.linear(&format!("{p}.proj_in"), s, ch, inner, true)?
            } else {
                let c = b.conv(&format!("{p}.proj_in"), h, ch, inner, 1, 1, 0, false)?;
                to_seq(b, c, inner)?
            };
            let widths = AttnWidths { dim: inner, ctx_dim: cfg.context_dim, heads, dh };
            for i in 0..cfg.transformer_depth {
                h = b.transformer_block(&format!("{p}.transformer_blocks.{i}"), h, ctx, &widths)?;
            }
            let from_seq = |b: &mut ModelBuilder, h: ValueId, c: usize| -> Result<ValueId> {
                let h = b.g.permute(h, &[0, 2, 1])?;
                b.g.reshape(h, [n, c, hh, ww])
            };
            let h = if cfg.use_linear_in_transformer {
                let l = b.linear_init(&format!("{p}.proj_out"), h, inner, ch, true, true)?;
                from_seq(b, l, ch)?
            } else {
                let s = from_seq(b, h, inner)?;
                b.conv(&format!("{p}.proj_out"), s, inner, ch, 1, 1, 0, true)?
            };
            b.g.add(h, x)
        })
    }

    /// Runs input block `i` of `layout` at key prefix `p` (`…input_blocks.{i}`).
    pub fn input_block(
        &mut self,
        p: &str,
        blk: &InputBlock,
        h: ValueId,
        emb: ValueId,
        ctx: ValueId,
        cfg: &UNetConfig,
    ) -> Result<ValueId> {
        match blk {
            InputBlock::ConvIn { out } => self.conv(&format!("{p}.0"), h, cfg.in_channels, *out, 3, 1, 1, false),
            InputBlock::Res { inp, out, attn } => {
                let h = self.resblock(&format!("{p}.0"), h, emb, *inp, *out, cfg.time_embed_dim())?;
                match attn {
                    Some(a) => self.spatial_transformer(&format!("{p}.1"), h, ctx, *out, *a, cfg),
                    None => Ok(h),
                }
            }
            InputBlock::Down { ch } => self.conv(&format!("{p}.0.op"), h, *ch, *ch, 3, 2, 1, false),
        }
    }

    /// The middle block: ResBlock, SpatialTransformer, ResBlock.
    pub fn middle_block(
        &mut self,
        p: &str,
        h: ValueId,
        emb: ValueId,
        ctx: ValueId,
        lay: &Layout,
        cfg: &UNetConfig,
    ) -> Result<ValueId> {
        let ch = lay.middle_ch;
        let ted = cfg.time_embed_dim();
        let h = self.resblock(&format!("{p}.0"), h, emb, ch, ch, ted)?;
        let h = self.spatial_transformer(&format!("{p}.1"), h, ctx, ch, lay.middle_attn, cfg)?;
        self.resblock(&format!("{p}.2"), h, emb, ch, ch, ted)
    }
}

/// The U-Net's inputs: the noisy latents, the timesteps and the text context.
#[derive(Clone, Copy, Debug)]
pub struct UnetInputs {
    pub x: ValueId,
    pub t: ValueId,
    pub ctx: ValueId,
}

/// The ControlNet's residuals as the locked U-Net takes them: one per input block plus the middle block's (last),
/// already scaled; with `only_mid`, only the middle block's is added.
#[derive(Clone, Copy, Debug)]
pub struct Control<'a> {
    pub residuals: &'a [ValueId],
    pub only_mid: bool,
}

/// The locked U-Net with control residuals, as `ControlledUnetModel.forward`; without control it is the plain
/// `UNetModel`. The decoder half's weights are trainable with `trainable_decoder` (`sd_locked: False`).
pub fn controlled_unet(
    b: &mut ModelBuilder,
    prefix: &str,
    cfg: &UNetConfig,
    inputs: UnetInputs,
    control: Option<Control<'_>>,
    trainable_decoder: bool,
) -> Result<ValueId> {
    let UnetInputs { x, t, ctx } = inputs;
    let only_mid_control = control.is_some_and(|c| c.only_mid);
    let control = control.map(|c| c.residuals);
    let lay = layout(cfg)?;
    let emb = b.time_embed(prefix, t, cfg, x)?;
    let mut hs = Vec::new();
    let mut h = x;
    for (i, blk) in lay.input.iter().enumerate() {
        h = b.input_block(&format!("{prefix}.input_blocks.{i}"), blk, h, emb, ctx, cfg)?;
        hs.push(h);
    }
    h = b.middle_block(&format!("{prefix}.middle_block"), h, emb, ctx, &lay, cfg)?;
    let mut control: Vec<ValueId> = control.map(|c| c.to_vec()).unwrap_or_default();
    if let Some(c) = control.pop() {
        h = b.g.add(h, c)?;
    }
    let ted = cfg.time_embed_dim();
    b.with_trainable(trainable_decoder || b.trainable, |b| {
        for (i, blk) in lay.output.iter().enumerate() {
            let p = format!("{prefix}.output_blocks.{i}");
            let mut skip = hs.pop().expect("one skip per output block");
            if let Some(c) = control.pop() {
                if !only_mid_control {
                    skip = b.g.add(skip, c)?;
                }
            }
            h = b.g.concat(&[h, skip], 1)?;
            h = b.resblock(&format!("{p}.0"), h, emb, blk.inp + blk.skip, blk.out, ted)?;
            let mut idx = 1;
            if let Some(a) = blk.attn {
                h = b.spatial_transformer(&format!("{p}.1"), h, ctx, blk.out, a, cfg)?;
                idx = 2;
            }
            if blk.upsample {
                let u = b.g.upsample2x(h)?;
                h = b.conv(&format!("{p}.{idx}.conv"), u, blk.out, blk.out, 3, 1, 1, false)?;
            }
        }
        let h = b.group_norm(&format!("{prefix}.out.0"), h, cfg.model_channels, GROUP_NORM_GROUPS, RES_EPS)?;
        let h = b.g.silu(h)?;
        b.conv(&format!("{prefix}.out.2"), h, cfg.model_channels, cfg.out_channels, 3, 1, 1, true)
    })
}
