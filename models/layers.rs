//! The building blocks shared by every model: linear, conv, norms and multi-head attention,
//! each registering its parameters under `{prefix}.weight` / `{prefix}.bias` as PyTorch names them.

use super::builder::{Init, ModelBuilder};
use crate::error::Result;
use crate::graph::ValueId;

impl ModelBuilder {
    /// A parameter as the computation reads it (cast to the compute dtype when they differ).
    pub fn read(&mut self, v: ValueId, like: ValueId) -> Result<ValueId> {
        let dt = self.g.dtype(like);
        self.g.cast(v, dt)
    }

    /// `nn.Linear(inp, out, bias)` applied to the last axis of `x`.
    pub fn linear(&mut self, p: &str, x: ValueId, inp: usize, out: usize, bias: bool) -> Result<ValueId> {
        self.linear_init(p, x, inp, out, bias, false)
    }

    /// `zero_init`: weight and bias start at zero (`zero_module`).
    pub fn linear_init(
        &mut self,
        p: &str,
        x: ValueId,
        inp: usize,
        out: usize,
        bias: bool,
        zero_init: bool,
    ) -> Result<ValueId> {
        let bound = 1.0 / (inp as f64).sqrt();
        let init = if zero_init { Init::Zeros } else { Init::Uniform(bound) };
        let w = self.param(&format!("{p}.weight"), [out, inp], init);
        let w = self.read(w, x)?;
        let b = if bias {
            let b = self.param(&format!("{p}.bias"), [out], init);
            Some(self.read(b, x)?)
        } else {
            None
        };
        self.g.linear(x, w, b)
    }

    /// `nn.Conv2d(inp, out, k, stride, padding)` with bias.
    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &mut self,
        p: &str,
        x: ValueId,
        inp: usize,
        out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        zero_init: bool,
    ) -> Result<ValueId> {
        let bound = 1.0 / ((inp * k * k) as f64).sqrt();
        let init = if zero_init { Init::Zeros } else { Init::Uniform(bound) };
        let w = self.param(&format!("{p}.weight"), [out, inp, k, k], init);
        let b = self.param(&format!("{p}.bias"), [out], init);
        let (w, b) = (self.read(w, x)?, self.read(b, x)?);
        self.g.conv2d(x, w, Some(b), stride, padding)
    }

    /// `nn.GroupNorm(groups, ch, eps)`.
    pub fn group_norm(&mut self, p: &str, x: ValueId, ch: usize, groups: usize, eps: f64) -> Result<ValueId> {
        let w = self.param(&format!("{p}.weight"), [ch], Init::Ones);
        let b = self.param(&format!("{p}.bias"), [ch], Init::Zeros);
        let (w, b) = (self.read(w, x)?, self.read(b, x)?);
        self.g.group_norm(x, w, b, groups, eps)
    }

    /// `nn.LayerNorm(d, eps)` over the last axis.
    pub fn layer_norm(&mut self, p: &str, x: ValueId, d: usize, eps: f64) -> Result<ValueId> {
        let w = self.param(&format!("{p}.weight"), [d], Init::Ones);
        let b = self.param(&format!("{p}.bias"), [d], Init::Zeros);
        let (w, b) = (self.read(w, x)?, self.read(b, x)?);
        self.g.layer_norm(x, w, b, eps)
    }

    /// [B, L, H·D] → [B, H, L, D].
    pub fn split_heads(&mut self, x: ValueId, heads: usize) -> Result<ValueId> {
        let d = self.g.shape(x).dims().to_vec();
        let (b, l, inner) = (d[0], d[1], d[2]);
        let x = self.g.reshape(x, [b, l, heads, inner / heads])?;
        self.g.permute(x, &[0, 2, 1, 3])
    }

    /// [B, H, L, D] → [B, L, H·D].
    pub fn merge_heads(&mut self, x: ValueId) -> Result<ValueId> {
        let d = self.g.shape(x).dims().to_vec();
        let (b, h, l, dh) = (d[0], d[1], d[2], d[3]);
        let x = self.g.permute(x, &[0, 2, 1, 3])?;
        self.g.reshape(x, [b, l, h * dh])
    }

    /// Multi-head attention of already projected q [B, Lq, H·D], k, v [B, Lk, H·D].
    pub fn heads_attention(
        &mut self,
        q: ValueId,
        k: ValueId,
        v: ValueId,
        heads: usize,
        causal: bool,
    ) -> Result<ValueId> {
        let dh = self.g.shape(q).dims()[2] / heads;
        let (q, k, v) = (self.split_heads(q, heads)?, self.split_heads(k, heads)?, self.split_heads(v, heads)?);
        let o = self.g.attention(q, k, v, 1.0 / (dh as f64).sqrt(), causal)?;
        self.merge_heads(o)
    }
}
