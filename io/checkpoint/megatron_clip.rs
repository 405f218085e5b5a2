//! NeMo's Megatron CLIP text tower (`FrozenMegatronCLIPEmbedder`, the text encoder of NeMo's SD 2-style configs),
//! renamed to the Hugging Face `CLIPTextModel` names zeroconv's text encoder reads (`cond_stage_model.transformer.
//! text_model.*`).
//!
//! `FrozenMegatronCLIPEmbedder` keeps the text encoder of NeMo's `CLIPModel` (`CLIPTextTransformer`, the non-mcore
//! model: its forward reads `language_model.embedding` and `language_model.encoder` by name) as `self.model`, so an
//! SD checkpoint holds it under `cond_stage_model.model.` (a Megatron-wrapped NeMo checkpoint under
//! `model.cond_stage_model.model.`, whose `model.` [`super::nemo`] drops first); a CLIP `.nemo`, which its
//! `restore_from_path` names, holds the whole `CLIPModel` under `model.`, the text tower under `model.text_encoder.`.
//! NeMo's converter (`examples/multimodal/vision_language_foundation/clip/convert_external_clip_to_nemo.py`,
//! `mapping_openclip_state_dict`) gives the names, read backwards:
//!
//! | Megatron CLIP (under the prefix) | `CLIPTextModel` |
//! | --- | --- |
//! | `language_model.embedding.word_embeddings.weight` [padded vocab, d] | `embeddings.token_embedding.weight` (first `vocab_size` rows) |
//! | `language_model.embedding.position_embeddings` (a bare parameter) | `embeddings.position_embedding.weight` |
//! | `language_model.encoder.layers.{i}.input_layernorm.*` | `encoder.layers.{i}.layer_norm1.*` |
//! | `...layers.{i}.self_attention.query_key_value.weight` [3d, d], `.bias` [3d] | `...self_attn.{q,k,v}_proj.*` |
//! | `...layers.{i}.self_attention.dense.*` | `...self_attn.out_proj.*` |
//! | `...layers.{i}.post_attention_layernorm.*` | `...layer_norm2.*` |
//! | `...layers.{i}.mlp.dense_h_to_4h.*`, `mlp.dense_4h_to_h.*` | `...mlp.fc1.*`, `mlp.fc2.*` |
//! | `language_model.encoder.final_layernorm.*` | `final_layer_norm.*` |
//!
//! The block is OpenCLIP's (pre-LN, causal attention, GELU MLP, a final LayerNorm on whichever layer is output); the
//! config decides what the weights cannot tell ([`MegatronClip`]):
//! - **The rows of `query_key_value`.** NeMo's `ParallelAttention` views its output as [heads, 3·head_dim] and splits
//!   each head's part into q, k, v: the rows are interleaved per head (q₀ k₀ v₀ q₁ k₁ v₁ ...). With the model's
//!   `megatron_legacy: True` (NeMo's ViT-H-14 and ViT-L-14 CLIP configs, and what the OpenCLIP converter writes: it
//!   copies open_clip's `in_proj_weight` unchanged) it first reorders a legacy [3, heads, head_dim] layout into that
//!   one (`_transpose_last_dim`), so the rows are all q, then all k, then all v, as in open_clip: each is a block of
//!   rows, an entry over the file's bytes. Without it (`megatron_legacy: False`, NeMo's default CLIP config) the rows
//!   are gathered, once, at load, head by head, into q, k and v.
//! - **The vocabulary padding.** `word_embeddings` has the tokenizer's vocabulary padded up to a multiple of
//!   `make_vocab_size_divisible_by × tensor_model_parallel_size` (`_vocab_size_with_padding`); no token id reaches
//!   the padding rows, which are left out (the first `vocab_size` rows, over the same bytes). Any other row count is
//!   an error: the config's vocabulary does not describe the file.
//!
//! `head.weight` (CLIP's projection, which SD does not use), a CLIP `.nemo`'s `vision_encoder.*` and `logit_scale`
//! map nowhere: they keep their names and are the file's unexpected keys. A text-tower key without a counterpart in
//! zeroconv's transformer (learned-absolute `position_embeddings.weight`, which the embedder cannot add; token-type
//! embeddings; adapter weights) is an error, never dropped.

use super::open_clip::split_rows;
use super::source::Source;
use super::{gather, Checkpoint, DataRef, Part, TensorEntry};
use crate::error::{Error, Result};
use crate::models::CLIP_PREFIX;
use std::collections::{BTreeMap, BTreeSet};

/// Where an SD checkpoint keeps `FrozenMegatronCLIPEmbedder`'s text tower (after a Megatron wrapper's `model.`).
pub const SD_PREFIX: &str = "cond_stage_model.model.";
/// Where a CLIP `.nemo` (`MegatronCLIPModel.model`, a `CLIPModel`) keeps its text tower.
pub const CLIP_NEMO_PREFIX: &str = "model.text_encoder.";

/// What the run's config says about the Megatron CLIP text tower that its weights alone cannot tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MegatronClip {
    /// NeMo's `megatron_legacy`: true, the rows of `query_key_value` are all q, then all k, then all v; false,
    /// interleaved per head.
    pub legacy_qkv: bool,
    pub num_heads: usize,
    /// The tokenizer's vocabulary: the rows the model reads.
    pub vocab_size: usize,
    /// The rows of `word_embeddings`: `vocab_size` padded up to a multiple of `make_vocab_size_divisible_by ×
    /// tensor_model_parallel_size`.
    pub padded_vocab_size: usize,
}

/// Whether `keys` hold a Megatron CLIP text tower under one of the prefixes this module reads.
pub fn is_megatron_clip<'a>(keys: impl IntoIterator<Item = &'a str>) -> bool {
    keys.into_iter().any(|k| prefix_of(k).is_some_and(|p| k[p.len()..].starts_with("language_model.")))
}

fn prefix_of(key: &str) -> Option<&'static str> {
    [SD_PREFIX, CLIP_NEMO_PREFIX].into_iter().find(|p| key.starts_with(p))
}

/// The name(s) a Megatron CLIP key takes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    One(String),
    /// `word_embeddings`: its first `vocab_size` rows.
    Vocabulary(String),
    /// A fused `query_key_value`: the q, k and v names of its rows.
    Qkv([String; 3]),
}

/// The `CLIPTextModel` name(s) of a text-tower key (`rest` is relative to the prefix); `Ok(None)` for what is not
/// part of the text transformer (`head.weight`, a `.nemo`'s vision tower); `Err` (the reason) for a part zeroconv's
/// transformer lacks.
fn target(rest: &str) -> std::result::Result<Option<Target>, String> {
    let name = |n: String| format!("{CLIP_PREFIX}.{n}");
    let Some(lm) = rest.strip_prefix("language_model.") else { return Ok(None) };
    match lm {
        "embedding.word_embeddings.weight" => {
            return Ok(Some(Target::Vocabulary(name("embeddings.token_embedding.weight".into()))))
        }
        "embedding.position_embeddings" => {
            return Ok(Some(Target::One(name("embeddings.position_embedding.weight".into()))))
        }
        _ => {}
    }
    if let Some(tail) = lm.strip_prefix("encoder.final_layernorm.") {
        if tail == "weight" || tail == "bias" {
            return Ok(Some(Target::One(name(format!("final_layer_norm.{tail}")))));
        }
    }
    let lacks = || {
        format!(
            "'language_model.{lm}' is a part of NeMo's Megatron CLIP text tower that zeroconv's text transformer does \
             not have (it has embedding.word_embeddings, embedding.position_embeddings as a parameter, \
             encoder.layers.N.{{input_layernorm, self_attention.query_key_value, self_attention.dense, \
             post_attention_layernorm, mlp.dense_h_to_4h, mlp.dense_4h_to_h}} and encoder.final_layernorm)"
        )
    };
    let Some(block) = lm.strip_prefix("encoder.layers.") else { return Err(lacks()) };
    let Some((i, part)) = block.split_once('.').and_then(|(i, p)| Some((i.parse::<usize>().ok()?, p))) else {
        return Err(lacks());
    };
    let layer = format!("encoder.layers.{i}");
    let Some((module, tail)) = part.rsplit_once('.').filter(|(_, t)| *t == "weight" || *t == "bias") else {
        return Err(lacks());
    };
    let renamed = match module {
        "self_attention.query_key_value" => {
            let names = ["q", "k", "v"].map(|p| name(format!("{layer}.self_attn.{p}_proj.{tail}")));
            return Ok(Some(Target::Qkv(names)));
        }
        "input_layernorm" => "layer_norm1",
        "self_attention.dense" => "self_attn.out_proj",
        "post_attention_layernorm" => "layer_norm2",
        "mlp.dense_h_to_4h" => "mlp.fc1",
        "mlp.dense_4h_to_h" => "mlp.fc2",
        _ => return Err(lacks()),
    };
    Ok(Some(Target::One(name(format!("{layer}.{renamed}.{tail}")))))
}

/// The first `rows` rows of a tensor: an entry over the same bytes.
fn leading_rows(entry: &TensorEntry, rows: usize) -> TensorEntry {
    let mut shape = entry.shape.clone();
    shape[0] = rows;
    let data = match &entry.data {
        DataRef::Contiguous(range) => {
            let len = shape.iter().product::<usize>() * entry.dtype.size();
            DataRef::Contiguous(range.start..range.start + len)
        }
        DataRef::Strided { storage, offset, strides } => {
            DataRef::Strided { storage: storage.clone(), offset: *offset, strides: strides.clone() }
        }
    };
    TensorEntry { dtype: entry.dtype, shape, data, part: entry.part }
}

/// Reorders the rows of a per-head interleaved projection (row blocks [heads, 3, head_dim]) into all q, all k, all v.
/// `bytes` is the tensor, row-major, its rows a multiple of `3 · heads`.
fn deinterleave(bytes: &[u8], heads: usize) -> Vec<u8> {
    let head_bytes = bytes.len() / (3 * heads);
    let mut out = Vec::with_capacity(bytes.len());
    for which in 0..3 {
        for head in 0..heads {
            let start = (3 * head + which) * head_bytes;
            out.extend_from_slice(&bytes[start..start + head_bytes]);
        }
    }
    out
}

impl Checkpoint {
    /// Renames a Megatron CLIP text tower (under [`SD_PREFIX`] or [`CLIP_NEMO_PREFIX`]) to the `CLIPTextModel` names,
    /// as `megatron` describes it; keys outside the prefixes keep their names, and keys under them that are not part
    /// of the text transformer keep theirs and are listed in [`Checkpoint::unmapped`]. A file without such keys is
    /// left as it is; a file with them and no `megatron` description is an error saying what the config must name.
    pub(crate) fn rename_megatron_clip(&mut self, megatron: Option<&MegatronClip>) -> Result<()> {
        if !is_megatron_clip(self.tensors.keys().chain(self.skipped.keys()).map(String::as_str)) {
            return Ok(());
        }
        let Some(m) = megatron else {
            return Err(Error::file(
                &self.path,
                "holds NeMo's Megatron CLIP text encoder (language_model.* names), but the config does not describe \
                 one: set model.cond_stage_config._target_ to ...FrozenMegatronCLIPEmbedder with its restore_from_path \
                 or cfg (the order of query_key_value's rows and the vocabulary padding are not in the weights)",
            ));
        };
        let mut plan: BTreeMap<String, Target> = BTreeMap::new();
        let mut outside: BTreeSet<String> = BTreeSet::new();
        for key in self.tensors.keys().chain(self.skipped.keys()) {
            let Some(prefix) = prefix_of(key) else { continue };
            match target(&key[prefix.len()..]) {
                Ok(Some(t)) => {
                    plan.insert(key.clone(), t);
                }
                Ok(None) => {
                    outside.insert(key.clone());
                }
                Err(why) => return Err(Error::file(self.file_of(key), format!("{key}: {why}"))),
            }
        }
        self.check_fused_projections(&plan)?;
        for (key, t) in &plan {
            match t {
                Target::Qkv(names) => self.split_qkv(key, names, m)?,
                Target::Vocabulary(name) => self.drop_vocabulary_padding(key, name, m)?,
                Target::One(_) => {}
            }
        }
        // The split and sliced tensors already carry their new names; the rest are renamed (or, outside, listed).
        self.remap(|k| match plan.get(k) {
            Some(Target::One(name)) => Some((name.clone(), 0)),
            _ if outside.contains(k) => None,
            _ => Some((k.to_string(), 0)),
        })
    }

    /// Every block of the tower has both halves of its fused `query_key_value`: the one key that holds a block's q,
    /// k and v is named when it is missing (the model's own check could only name the q/k/v it would have given).
    fn check_fused_projections(&self, plan: &BTreeMap<String, Target>) -> Result<()> {
        let mut blocks: BTreeSet<String> = BTreeSet::new();
        for key in plan.keys() {
            if let Some(at) = key.find("language_model.encoder.layers.") {
                let start = at + "language_model.encoder.layers.".len();
                if let Some(len) = key[start..].find('.') {
                    blocks.insert(key[..start + len].to_string());
                }
            }
        }
        for block in blocks {
            for tail in ["weight", "bias"] {
                let fused = format!("{block}.self_attention.query_key_value.{tail}");
                if !plan.contains_key(&fused) {
                    return Err(Error::file(
                        &self.path,
                        format!(
                            "no tensor '{fused}' in the checkpoint: Megatron keeps the block's q, k and v projections                              in it (the block's other tensors are there)"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Replaces the fused `key` by its q, k and v rows, under `names`.
    fn split_qkv(&mut self, key: &str, names: &[String; 3], m: &MegatronClip) -> Result<()> {
        if let Some(why) = self.skipped.remove(key) {
            self.skipped.extend(names.iter().map(|n| (n.clone(), why.clone())));
            return Ok(());
        }
        let Some(entry) = self.tensors.remove(key) else { return Ok(()) };
        let file = self.sources[entry.part].path.clone();
        let fused = match entry.shape.as_slice() {
            [rows, cols] => key.ends_with(".weight") && *rows == 3 * cols,
            [rows] => key.ends_with(".bias") && rows.is_multiple_of(3),
            _ => false,
        };
        let heads_fit = m.num_heads > 0 && entry.shape[0].is_multiple_of(3 * m.num_heads);
        if !fused || !heads_fit {
            return Err(Error::file(
                &file,
                format!(
                    "{key} has shape {:?}; Megatron fuses the q, k and v projections of {} heads in it, so it must be \
                     [3d, d] (weight) or [3d] (bias), with d a multiple of the heads",
                    entry.shape, m.num_heads
                ),
            ));
        }
        let parts = if m.legacy_qkv {
            split_rows(&entry, 3).expect("checked: the rows divide by 3")
        } else {
            self.deinterleaved_rows(&entry, m.num_heads)
        };
        for (name, part) in names.iter().zip(parts) {
            if self.tensors.insert(name.clone(), part).is_some() {
                return Err(Error::file(&file, format!("both {key} and {name} are in the checkpoint")));
            }
        }
        Ok(())
    }

    /// The q, k and v rows of a per-head interleaved `entry`, gathered once into bytes of their own (a part of the
    /// checkpoint made at load, not a file).
    fn deinterleaved_rows(&mut self, entry: &TensorEntry, heads: usize) -> Vec<TensorEntry> {
        let from = &self.sources[entry.part];
        let file = from.source.bytes();
        let bytes = match &entry.data {
            DataRef::Contiguous(range) => deinterleave(&file[range.clone()], heads),
            DataRef::Strided { storage, offset, strides } => {
                deinterleave(&gather(&file[storage.clone()], entry.dtype.size(), *offset, &entry.shape, strides), heads)
            }
        };
        let (path, layout) = (from.path.clone(), from.layout);
        let third = bytes.len() / 3;
        let part = self.sources.len();
        self.sources.push(Part { path, source: Source::Owned(bytes), layout, derived: true });
        let mut shape = entry.shape.clone();
        shape[0] /= 3;
        (0..3)
            .map(|i| TensorEntry {
                dtype: entry.dtype,
                shape: shape.clone(),
                data: DataRef::Contiguous(i * third..(i + 1) * third),
                part,
            })
            .collect()
    }

    /// Replaces `word_embeddings` by its first `vocab_size` rows, under `name`.
    fn drop_vocabulary_padding(&mut self, key: &str, name: &str, m: &MegatronClip) -> Result<()> {
        if let Some(why) = self.skipped.remove(key) {
            self.skipped.insert(name.to_string(), why);
            return Ok(());
        }
        let Some(entry) = self.tensors.remove(key) else { return Ok(()) };
        let rows = entry.shape.first().copied().unwrap_or(0);
        if entry.shape.len() != 2 || rows != m.padded_vocab_size {
            return Err(Error::file(
                &self.sources[entry.part].path,
                format!(
                    "{key} has shape {:?}, but the config's vocabulary of {} tokens, padded as NeMo pads it \
                     (make_vocab_size_divisible_by × tensor_model_parallel_size), has {} rows: the config's vocab_size \
                     or padding does not describe this file",
                    entry.shape, m.vocab_size, m.padded_vocab_size
                ),
            ));
        }
        self.tensors.insert(name.to_string(), leading_rows(&entry, m.vocab_size));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::DType;

    fn mapped(rest: &str) -> Option<Target> {
        target(rest).unwrap()
    }

    #[test]
    fn names_follow_the_table() {
        let one = |s: &str| Some(Target::One(format!("{CLIP_PREFIX}.{s}")));
        assert_eq!(mapped("language_model.embedding.position_embeddings"), one("embeddings.position_embedding.weight"));
        assert_eq!(mapped("language_model.encoder.final_layernorm.bias"), one("final_layer_norm.bias"));
        assert_eq!(
            mapped("language_model.encoder.layers.11.mlp.dense_4h_to_h.weight"),
            one("encoder.layers.11.mlp.fc2.weight")
        );
        assert_eq!(
            mapped("language_model.encoder.layers.0.self_attention.dense.bias"),
            one("encoder.layers.0.self_attn.out_proj.bias")
        );
        assert_eq!(
            mapped("language_model.encoder.layers.2.post_attention_layernorm.weight"),
            one("encoder.layers.2.layer_norm2.weight")
        );
        match mapped("language_model.encoder.layers.3.self_attention.query_key_value.bias") {
            Some(Target::Qkv(names)) => assert!(names[1].ends_with("encoder.layers.3.self_attn.k_proj.bias")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(mapped("language_model.embedding.word_embeddings.weight"), Some(Target::Vocabulary(_))));
        for outside in ["head.weight", "vision_encoder.backbone.conv1.weight", "logit_scale"] {
            assert_eq!(mapped(outside), None, "{outside}");
        }
        for lacking in [
            "language_model.embedding.position_embeddings.weight",
            "language_model.embedding.tokentype_embeddings.weight",
            "language_model.encoder.layers.1.self_attention.adapter_layer.lora_kqv_adapter.linear_in.weight",
            "language_model.encoder.layers.x.input_layernorm.weight",
        ] {
            let err = target(lacking).unwrap_err();
            assert!(err.contains(lacking) && err.contains("does not have"), "{err}");
        }
    }

    #[test]
    fn deinterleave_gathers_each_projection_head_by_head() {
        // Two heads of two rows each, one byte per row: q0 q0 k0 k0 v0 v0 q1 q1 k1 k1 v1 v1.
        let rows: Vec<u8> = vec![10, 11, 20, 21, 30, 31, 12, 13, 22, 23, 32, 33];
        assert_eq!(deinterleave(&rows, 2), vec![10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33]);
    }

    #[test]
    fn the_vocabulary_keeps_its_leading_rows_over_the_same_bytes() {
        let padded = TensorEntry { dtype: DType::F32, shape: vec![8, 3], data: DataRef::Contiguous(40..136), part: 0 };
        let kept = leading_rows(&padded, 5);
        assert_eq!(kept.shape, [5, 3]);
        assert!(matches!(kept.data, DataRef::Contiguous(ref r) if *r == (40..100)));
    }
}
