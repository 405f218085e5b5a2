//! The CLIP text transformer (Hugging Face `CLIPTextModel` layout, as SD 1.x's
//! `FrozenCLIPEmbedder` wraps it): token + position embeddings, pre-norm causal self-attention
//! layers with MLPs, and the final layer norm, whose output is the U-Net's context.
//!
//! SD 2.x's OpenCLIP text tower (`FrozenOpenCLIPEmbedder`) is the same transformer with exact GELU in the MLP
//! ([`crate::models::ClipActivation::Gelu`]) and, as SD 2 configures it, the penultimate block's output through `ln_final`
//! ([`ClipOutput::Penultimate`]); its checkpoint names are mapped onto these by
//! `io::checkpoint::open_clip`.

use super::builder::{Init, ModelBuilder};
use super::config::{ClipConfig, ClipOutput};
use crate::error::{Error, Result};
use crate::graph::ValueId;

/// `ids` [B, L] (i32 or i64, L ≤ max_position_embeddings) → last hidden state [B, L, hidden].
pub fn clip_text(b: &mut ModelBuilder, prefix: &str, cfg: &ClipConfig, ids: ValueId) -> Result<ValueId> {
    let d = cfg.hidden_size;
    let dims = b.g.shape(ids).dims().to_vec();
    if dims.len() != 2 || dims[1] > cfg.max_position_embeddings {
        return Err(Error::msg(format!(
            "text ids must be [batch, ≤{}], got {}",
            cfg.max_position_embeddings,
            b.g.shape(ids)
        )));
    }
    let l = dims[1];
    let p = format!("{prefix}.embeddings");
    let tok = b.param(&format!("{p}.token_embedding.weight"), [cfg.vocab_size, d], Init::Normal(0.02));
    let pos = b.param(&format!("{p}.position_embedding.weight"), [cfg.max_position_embeddings, d], Init::Normal(0.01));
    let x = b.g.embedding(tok, ids)?;
    let pos = b.g.slice(pos, 0, 0, l)?;
    let mut x = b.g.add(x, pos)?;
    let heads = cfg.num_heads;
    let layers = match cfg.output {
        ClipOutput::Last => cfg.num_layers,
        ClipOutput::Penultimate => cfg.num_layers.saturating_sub(1),
        ClipOutput::Hidden(i) if i < cfg.num_layers => i + 1,
        ClipOutput::Hidden(i) => {
            return Err(Error::msg(format!("text encoder: layer {i} requested, it has {}", cfg.num_layers)))
        }
    };
    for i in 0..layers {
        let p = format!("{prefix}.encoder.layers.{i}");
        x = b.block(|b| {
            let h = b.layer_norm(&format!("{p}.layer_norm1"), x, d, cfg.layer_norm_eps)?;
            let q = b.linear(&format!("{p}.self_attn.q_proj"), h, d, d, true)?;
            let k = b.linear(&format!("{p}.self_attn.k_proj"), h, d, d, true)?;
            let v = b.linear(&format!("{p}.self_attn.v_proj"), h, d, d, true)?;
            let a = b.heads_attention(q, k, v, heads, true)?;
            let a = b.linear(&format!("{p}.self_attn.out_proj"), a, d, d, true)?;
            let x = b.g.add(x, a)?;
            let h = b.layer_norm(&format!("{p}.layer_norm2"), x, d, cfg.layer_norm_eps)?;
            let h = b.linear(&format!("{p}.mlp.fc1"), h, d, cfg.intermediate_size, true)?;
            let h = b.g.unary(cfg.activation.op(), h)?;
            let h = b.linear(&format!("{p}.mlp.fc2"), h, cfg.intermediate_size, d, true)?;
            b.g.add(x, h)
        })?;
    }
    match cfg.output {
        ClipOutput::Hidden(_) => Ok(x),
        _ => b.layer_norm(&format!("{prefix}.final_layer_norm"), x, d, cfg.layer_norm_eps),
    }
}
