//! OpenCLIP's text tower, SD 2.x's text encoder (`FrozenOpenCLIPEmbedder`), renamed to the Hugging Face
//! `CLIPTextModel` names zeroconv's text encoder reads (`cond_stage_model.transformer.text_model.*`).
//!
//! The original SD 2 checkpoints (and NeMo's, once [`super::nemo`] has dropped its `model.` wrapper) hold it under
//! `cond_stage_model.model.*`; open_clip's own `model.state_dict()` writes the same names without a prefix, beside
//! the vision tower (`visual.*`). The two towers are the same transformer with different names:
//!
//! | open_clip | `CLIPTextModel` |
//! | --- | --- |
//! | `token_embedding.weight` | `embeddings.token_embedding.weight` |
//! | `positional_embedding` (a bare parameter) | `embeddings.position_embedding.weight` |
//! | `transformer.resblocks.{i}.ln_1.*` | `encoder.layers.{i}.layer_norm1.*` |
//! | `transformer.resblocks.{i}.attn.in_proj_weight` [3d, d] | `encoder.layers.{i}.self_attn.{q,k,v}_proj.weight` |
//! | `transformer.resblocks.{i}.attn.in_proj_bias` [3d] | `encoder.layers.{i}.self_attn.{q,k,v}_proj.bias` |
//! | `transformer.resblocks.{i}.attn.out_proj.*` | `encoder.layers.{i}.self_attn.out_proj.*` |
//! | `transformer.resblocks.{i}.ln_2.*` | `encoder.layers.{i}.layer_norm2.*` |
//! | `transformer.resblocks.{i}.mlp.c_fc.*`, `mlp.c_proj.*` | `encoder.layers.{i}.mlp.fc1.*`, `mlp.fc2.*` |
//! | `ln_final.*` | `final_layer_norm.*` |
//!
//! `nn.MultiheadAttention` keeps q, k and v in one stacked projection (rows `0..d` are q, `d..2d` k, `2d..3d` v), and
//! both it and `nn.Linear` compute `x Wᵀ + b`, so each of the three is a block of rows: an entry over a third of the
//! stacked tensor's bytes (or, for a strided PyTorch view, the same strides from a later offset), never a copy.
//!
//! `text_projection` and `logit_scale` (CLIP's contrastive head, which SD does not use) and the vision tower map
//! nowhere: they keep their names and are the file's unexpected keys. A part of a block that zeroconv's transformer
//! has no counterpart for (open_clip's LayerScale `ls_1`/`ls_2`, for instance) is an error, never dropped: without it
//! the block would compute something else.

use super::{Checkpoint, DataRef, TensorEntry};
use crate::error::{Error, Result};
use crate::models::CLIP_PREFIX;
use std::collections::{BTreeMap, BTreeSet};

/// Where the original SD 2 checkpoints (`LatentDiffusion.cond_stage_model = FrozenOpenCLIPEmbedder`, whose open_clip
/// model is `self.model`) keep the text tower.
pub const SD2_PREFIX: &str = "cond_stage_model.model.";

/// Whether `keys` are an open_clip `state_dict` (the text tower's names at the top level).
pub fn is_open_clip_state_dict(keys: &[&str]) -> bool {
    keys.iter().any(|k| *k == "token_embedding.weight" || *k == "positional_embedding")
        && keys.iter().any(|k| k.starts_with("transformer.resblocks."))
}

/// The name(s) an open_clip key takes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    One(String),
    /// A stacked in-projection: the q, k and v names of its three row blocks.
    Qkv([String; 3]),
}

/// The `CLIPTextModel` name(s) of a text-tower key (`rest` is relative to the tower); `Ok(None)` for what is not
/// part of the text transformer (`text_projection`, `logit_scale`, `visual.*`); `Err` (the reason) for a block part
/// zeroconv's transformer lacks.
fn target(rest: &str) -> std::result::Result<Option<Target>, String> {
    let one = |name: String| Ok(Some(Target::One(format!("{CLIP_PREFIX}.{name}"))));
    match rest {
        "token_embedding.weight" => return one("embeddings.token_embedding.weight".into()),
        "positional_embedding" => return one("embeddings.position_embedding.weight".into()),
        _ => {}
    }
    if let Some(tail) = rest.strip_prefix("ln_final.") {
        return one(format!("final_layer_norm.{tail}"));
    }
    let Some(block) = rest.strip_prefix("transformer.resblocks.") else { return Ok(None) };
    let Some((i, part)) = block.split_once('.').and_then(|(i, p)| Some((i.parse::<usize>().ok()?, p))) else {
        return Err("not a numbered block of the text transformer".into());
    };
    let layer = format!("encoder.layers.{i}");
    let qkv = |tail: &str| {
        Ok(Some(Target::Qkv(["q", "k", "v"].map(|p| format!("{CLIP_PREFIX}.{layer}.self_attn.{p}_proj.{tail}")))))
    };
    match part {
        "attn.in_proj_weight" => return qkv("weight"),
        "attn.in_proj_bias" => return qkv("bias"),
        _ => {}
    }
    let renamed = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ]
    .iter()
    .find_map(|(from, to)| part.strip_prefix(from).map(|tail| format!("{to}{tail}")));
    match renamed {
        Some(name) if name.ends_with(".weight") || name.ends_with(".bias") => one(format!("{layer}.{name}")),
        _ => Err(format!(
            "'{part}' is a part of open_clip's residual block that zeroconv's text transformer does not have \
             (it has ln_1, attn.in_proj_weight/bias, attn.out_proj, ln_2, mlp.c_fc and mlp.c_proj)"
        )),
    }
}

/// Rows `[i·r/parts, (i+1)·r/parts)` of a tensor of `r` rows, for each `i`: entries over the same bytes. `None` when
/// the tensor has no rows to split or they do not divide evenly.
pub(crate) fn split_rows(entry: &TensorEntry, parts: usize) -> Option<Vec<TensorEntry>> {
    let (&rows, inner) = entry.shape.split_first()?;
    if parts == 0 || rows == 0 || !rows.is_multiple_of(parts) {
        return None;
    }
    let per = rows / parts;
    let row_elems: usize = inner.iter().product();
    let shape: Vec<usize> = std::iter::once(per).chain(inner.iter().copied()).collect();
    let parts = (0..parts).map(|i| {
        let data = match &entry.data {
            DataRef::Contiguous(range) => {
                let len = per * row_elems * entry.dtype.size();
                let start = range.start + i * len;
                DataRef::Contiguous(start..start + len)
            }
            DataRef::Strided { storage, offset, strides } => DataRef::Strided {
                storage: storage.clone(),
                offset: offset + i * per * strides[0],
                strides: strides.clone(),
            },
        };
        TensorEntry { dtype: entry.dtype, shape: shape.clone(), data, part: entry.part }
    });
    Some(parts.collect())
}

impl Checkpoint {
    /// Renames the open_clip text tower found under `prefix` (`SD2_PREFIX`, or "" for an open_clip `state_dict`) to
    /// the `CLIPTextModel` names, splitting each stacked in-projection into q, k and v. Keys outside `prefix` keep
    /// their names; keys under it that are not part of the text transformer keep theirs and are listed in
    /// [`Checkpoint::unmapped`]. A file without such keys is left as it is.
    pub(crate) fn rename_open_clip(&mut self, prefix: &str) -> Result<()> {
        let mut plan: BTreeMap<String, Target> = BTreeMap::new();
        let mut outside: BTreeSet<String> = BTreeSet::new();
        for key in self.tensors.keys().chain(self.skipped.keys()) {
            let Some(rest) = key.strip_prefix(prefix) else { continue };
            match target(rest) {
                Ok(Some(t)) => {
                    plan.insert(key.clone(), t);
                }
                Ok(None) => {
                    outside.insert(key.clone());
                }
                Err(why) => return Err(Error::file(self.file_of(key), format!("{key}: {why}"))),
            }
        }
        if plan.is_empty() {
            return Ok(());
        }
        for (key, t) in &plan {
            let Target::Qkv(names) = t else { continue };
            if let Some(why) = self.skipped.remove(key) {
                self.skipped.extend(names.iter().map(|n| (n.clone(), why.clone())));
                continue;
            }
            let Some(entry) = self.tensors.remove(key) else { continue };
            let file = self.sources[entry.part].path.clone();
            let stacked = match entry.shape.as_slice() {
                [rows, cols] => key.ends_with("in_proj_weight") && *rows == 3 * cols,
                [rows] => key.ends_with("in_proj_bias") && rows.is_multiple_of(3),
                _ => false,
            };
            let parts = split_rows(&entry, 3).filter(|_| stacked).ok_or_else(|| {
                Error::file(
                    &file,
                    format!(
                        "{key} has shape {:?}; open_clip stacks the q, k and v projections in it, so it must be [3d, d] \
                         (in_proj_weight) or [3d] (in_proj_bias)",
                        entry.shape
                    ),
                )
            })?;
            for (name, part) in names.iter().zip(parts) {
                if self.tensors.insert(name.clone(), part).is_some() {
                    return Err(Error::file(&file, format!("both {key} and {name} are in the checkpoint")));
                }
            }
        }
        // The split parts already carry their new names; the rest are renamed (or, outside the tower, listed).
        self.remap(|k| match plan.get(k) {
            Some(Target::One(name)) => Some((name.clone(), 0)),
            _ if outside.contains(k) => None,
            _ => Some((k.to_string(), 0)),
        })
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
        assert_eq!(mapped("positional_embedding"), one("embeddings.position_embedding.weight"));
        assert_eq!(mapped("ln_final.bias"), one("final_layer_norm.bias"));
        assert_eq!(mapped("transformer.resblocks.11.mlp.c_proj.weight"), one("encoder.layers.11.mlp.fc2.weight"));
        assert_eq!(
            mapped("transformer.resblocks.0.attn.out_proj.bias"),
            one("encoder.layers.0.self_attn.out_proj.bias")
        );
        match mapped("transformer.resblocks.3.attn.in_proj_bias") {
            Some(Target::Qkv(names)) => assert!(names[2].ends_with("encoder.layers.3.self_attn.v_proj.bias")),
            other => panic!("{other:?}"),
        }
        for outside in ["text_projection", "logit_scale", "visual.conv1.weight"] {
            assert_eq!(mapped(outside), None, "{outside}");
        }
        let err = target("transformer.resblocks.2.ls_1.gamma").unwrap_err();
        assert!(err.contains("ls_1.gamma"), "{err}");
    }

    #[test]
    fn split_rows_takes_blocks_of_the_same_bytes() {
        let whole = TensorEntry { dtype: DType::F16, shape: vec![6, 4], data: DataRef::Contiguous(100..148), part: 0 };
        let parts = split_rows(&whole, 3).unwrap();
        let ranges: Vec<_> = parts
            .iter()
            .map(|p| match &p.data {
                DataRef::Contiguous(r) => r.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ranges, vec![100..116, 116..132, 132..148]);
        assert!(parts.iter().all(|p| p.shape == [2, 4] && p.dtype == DType::F16));
        // A transposed view: storage rows of 6, strides [1, 6]; its row blocks start 2 elements apart.
        let strided = TensorEntry {
            dtype: DType::F32,
            shape: vec![6, 4],
            data: DataRef::Strided { storage: 0..96, offset: 0, strides: vec![1, 6] },
            part: 0,
        };
        let offsets: Vec<usize> = split_rows(&strided, 3)
            .unwrap()
            .iter()
            .map(|p| match &p.data {
                DataRef::Strided { offset, .. } => *offset,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(offsets, vec![0, 2, 4]);
        let odd = TensorEntry { dtype: DType::F32, shape: vec![5], data: DataRef::Contiguous(0..20), part: 0 };
        assert!(split_rows(&odd, 3).is_none());
    }
}
