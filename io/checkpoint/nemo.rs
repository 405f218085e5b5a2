//! NeMo `.nemo` archives: a tar (gzipped by older NeMo versions) holding `model_config.yaml` and
//! `model_weights.ckpt`, the latter a torch.save zip of the model's state dict.
//!
//! An uncompressed tar is mapped and the weights member sliced out of the mapping, so nothing is copied. A gzipped
//! one cannot be sliced: its weights member is decompressed into memory once. Before anything is inflated, each
//! member's declared size counts against a limit ([`inflate_limit`]: a gzip "bomb" of zeros inflates a thousandfold,
//! weights hardly shrink), and the weights member must fit in the memory available; the tar reader never reads
//! past a member's declared size.
//!
//! # NeMo key names and the original LDM/ControlNet names
//!
//! NeMo's Stable Diffusion and ControlNet (`nemo/collections/multimodal/models/text_to_image/controlnet/
//! controlnet.py`, `.../stable_diffusion/ldm/ddpm.py`, `.../diffusionmodules/openaimodel.py`) reuse the LDM module
//! tree, so most key names match, with three differences:
//!
//! 1. The Megatron wrapper: `MegatronLatentDiffusion` / `MegatronControlNet` hold the LDM model as `self.model`,
//!    so every key gains a leading `model.`:
//!    - `model.model.diffusion_model.*` → `model.diffusion_model.*` (the U-Net)
//!    - `model.control_model.*` → `control_model.*` (the ControlNet copy, hint block, zero convs)
//!    - `model.first_stage_model.*` → `first_stage_model.*` (the VAE)
//!    - `model.cond_stage_model.*` → `cond_stage_model.*` (the text encoder; a HuggingFace CLIP under
//!      `cond_stage_model.transformer.*` maps as is, NeMo's Megatron CLIP encoder has its own names, not mapped)
//!    - `model.betas`, `model.alphas_cumprod`, ... → `betas`, ... (schedule buffers)
//! 2. `torch.compile`: a compiled module is saved behind `_orig_mod`, e.g. `model.model._orig_mod.diffusion_model.*`
//!    or `model.model.diffusion_model._orig_mod.*`; the segment is dropped (NeMo's own loader does the same).
//! 3. Fused GroupNorm+SiLU: NeMo's `normalization(ch, act="silu")` is one module where LDM has `GroupNorm, SiLU`,
//!    so the layers after it move up by one inside every `ResBlock` of the U-Net and the ControlNet:
//!    `in_layers.1.*` (NeMo conv) = `in_layers.2.*` (LDM conv) and `out_layers.2.*` (NeMo conv) =
//!    `out_layers.3.*` (LDM conv). The mapping is unambiguous: in LDM `in_layers.1` is a SiLU and `out_layers.2` a
//!    Dropout, neither of which has parameters. The U-Net's final `out.0/out.2` keeps its unfused layout.
//!
//! A `.nemo` saved with tensor or pipeline parallelism holds one `model_weights.ckpt` per rank
//! (`mp_rank_00/...`); those are refused with a message, as are NeMo 2 distributed checkpoints (a
//! `model_weights/` directory of shards).

use crate::engine::host_memory::human_bytes;
use crate::error::{Error, Result};
use flate2::read::GzDecoder;
use std::io::{Cursor, Read};
use std::ops::Range;
use std::path::Path;

/// The most a gzipped archive of `compressed` bytes may inflate to, all members together: [`MAX_INFLATE_RATIO`]
/// times its size, and at least [`MIN_INFLATE_LIMIT`]. Checkpoint weights compress by a few percent; a stream of
/// zeros by a factor of a thousand.
pub(crate) fn inflate_limit(compressed: u64) -> u64 {
    compressed.saturating_mul(MAX_INFLATE_RATIO).max(MIN_INFLATE_LIMIT)
}
const MAX_INFLATE_RATIO: u64 = 32;
const MIN_INFLATE_LIMIT: u64 = 256 << 20;
/// The largest `model_config.yaml` read (real ones are a few KB).
const MAX_CONFIG_BYTES: u64 = 16 << 20;

pub(crate) fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// POSIX and GNU tar headers carry "ustar" at byte 257.
pub(crate) fn is_tar(bytes: &[u8]) -> bool {
    bytes.len() >= 512 && &bytes[257..262] == b"ustar"
}

/// Where the weights of a `.nemo` are.
pub(crate) enum Weights {
    /// A byte range of the (uncompressed, mapped) archive.
    Member(Range<usize>),
    /// The decompressed member of a gzipped archive.
    Decompressed(Vec<u8>),
}

pub(crate) struct NemoArchive {
    pub weights: Weights,
    pub config_yaml: Option<String>,
}

/// A member path without the "./" NeMo's tar writer puts in front.
fn member_name(raw: &Path) -> String {
    let s = raw.to_string_lossy();
    s.trim_start_matches("./").to_string()
}

fn file_name(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

pub(crate) fn read(bytes: &[u8], path: &Path) -> Result<NemoArchive> {
    let damaged = |e: std::io::Error| Error::file(path, format!("the .nemo tar archive is damaged or truncated ({e})"));
    let mut names = Vec::new();
    let mut weights: Vec<(String, Weights)> = Vec::new();
    let mut config_yaml = None;
    let mut visit = |name: String, entry: &mut dyn Read, size: u64, position: Option<u64>| -> Result<()> {
        match file_name(&name) {
            "model_weights.ckpt" => {
                let member = match position {
                    Some(start) => {
                        let end = start.checked_add(size).filter(|&e| e <= bytes.len() as u64).ok_or_else(|| {
                            Error::file(path, format!("member {name} runs past the end of the archive: truncated?"))
                        })?;
                        Weights::Member(start as usize..end as usize)
                    }
                    None => {
                        if let Some(available) = crate::engine::host_memory::available_bytes().filter(|&a| size > a) {
                            return Err(Error::file(
                                path,
                                format!(
                                    "member {name} of this gzipped .nemo inflates to {} but only {} of memory is \
                                     available; un-gzip the archive (`gunzip -c x.nemo > y.nemo`) so that it is mapped \
                                     instead",
                                    human_bytes(size),
                                    human_bytes(available)
                                ),
                            ));
                        }
                        let mut buf = Vec::new();
                        buf.try_reserve_exact(size as usize).map_err(|_| {
                            Error::file(path, format!("member {name}: cannot allocate {}", human_bytes(size)))
                        })?;
                        entry.take(size).read_to_end(&mut buf).map_err(damaged)?;
                        if (buf.len() as u64) < size {
                            return Err(Error::file(path, format!("member {name} is truncated")));
                        }
                        Weights::Decompressed(buf)
                    }
                };
                weights.push((name.clone(), member));
            }
            "model_config.yaml" if !name.contains('/') => {
                if size > MAX_CONFIG_BYTES {
                    return Err(Error::file(
                        path,
                        format!(
                            "member {name} is {}: not a config (at most {})",
                            human_bytes(size),
                            human_bytes(MAX_CONFIG_BYTES)
                        ),
                    ));
                }
                let mut text = String::new();
                entry.take(size).read_to_string(&mut text).map_err(damaged)?;
                config_yaml = Some(text);
            }
            _ => {}
        }
        names.push(name);
        Ok(())
    };

    if is_gzip(bytes) {
        let mut archive = tar::Archive::new(GzDecoder::new(bytes));
        let limit = inflate_limit(bytes.len() as u64);
        let mut declared = 0u64;
        for entry in archive.entries().map_err(damaged)? {
            let mut entry = entry.map_err(damaged)?;
            // Every member is inflated, if only to be skipped: all of them count, before any is read.
            declared = declared.saturating_add(entry.size());
            if declared > limit {
                let name = member_name(&entry.path().map_err(damaged)?);
                return Err(Error::file(
                    path,
                    format!(
                        "this {} gzipped .nemo declares {} of members up to {name}: more than the {} it may inflate \
                         to ({MAX_INFLATE_RATIO} times its size; weights hardly compress), refused before inflating",
                        human_bytes(bytes.len() as u64),
                        human_bytes(declared),
                        human_bytes(limit)
                    ),
                ));
            }
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = member_name(&entry.path().map_err(damaged)?);
            let size = entry.size();
            visit(name, &mut entry, size, None)?;
        }
    } else {
        // Seeking over members keeps the weights' pages untouched: only the 512-byte headers are read.
        let mut archive = tar::Archive::new(Cursor::new(bytes));
        for entry in archive.entries_with_seek().map_err(damaged)? {
            let mut entry = entry.map_err(damaged)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = member_name(&entry.path().map_err(damaged)?);
            let (size, position) = (entry.size(), entry.raw_file_position());
            visit(name, &mut entry, size, Some(position))?;
        }
    }

    match weights.len() {
        1 => {
            let (_, weights) = weights.remove(0);
            Ok(NemoArchive { weights, config_yaml })
        }
        0 if names.iter().any(|n| n.starts_with("model_weights/")) => Err(Error::file(
            path,
            "a NeMo distributed checkpoint (a model_weights/ directory of shards), which zeroconv cannot read: \
             export it from NeMo as a single model_weights.ckpt",
        )),
        0 => {
            names.truncate(10);
            // A complete tar ends with two zero blocks; without them the archive was cut short.
            let ends_cleanly =
                is_gzip(bytes) || bytes.len() >= 1024 && bytes[bytes.len() - 1024..].iter().all(|&b| b == 0);
            let hint = if ends_cleanly { "" } else { "; the archive lacks tar's end marker: truncated?" };
            Err(Error::file(
                path,
                format!("no model_weights.ckpt in the .nemo archive (it holds: {}){hint}", names.join(", ")),
            ))
        }
        n => {
            let shards: Vec<&str> = weights.iter().take(4).map(|(name, _)| name.as_str()).collect();
            Err(Error::file(
                path,
                format!(
                    "{n} weight shards ({}, ...): a tensor/pipeline-parallel .nemo must be merged into one rank first",
                    shards.join(", ")
                ),
            ))
        }
    }
}

/// Whether NeMo keys carry the Megatron wrapper's extra `model.` (true for every MegatronLatentDiffusion /
/// MegatronControlNet checkpoint; false for a raw LDM state dict that happens to sit in a `.nemo`).
pub fn is_megatron_wrapped<'a>(keys: impl IntoIterator<Item = &'a str>) -> bool {
    const WRAPPED: [&str; 4] =
        ["model.model.", "model.control_model.", "model.first_stage_model.", "model.cond_stage_model."];
    keys.into_iter().map(drop_orig_mod).any(|k| WRAPPED.iter().any(|p| k.starts_with(p)))
}

fn drop_orig_mod(key: &str) -> String {
    key.split('.').filter(|seg| *seg != "_orig_mod").collect::<Vec<_>>().join(".")
}

/// Maps one NeMo state-dict key to the original LDM/ControlNet name (see the module docs for the rules).
/// `megatron_wrapped` comes from [`is_megatron_wrapped`] over all keys of the checkpoint.
pub fn nemo_key_to_ldm(key: &str, megatron_wrapped: bool) -> String {
    let mut k = drop_orig_mod(key);
    if megatron_wrapped {
        if let Some(rest) = k.strip_prefix("model.") {
            k = rest.to_string();
        }
    }
    if k.starts_with("model.diffusion_model.") || k.starts_with("control_model.") {
        k = k.replace(".in_layers.1.", ".in_layers.2.").replace(".out_layers.2.", ".out_layers.3.");
        k = transformer_block_to_ldm(&k);
    }
    k
}

/// NeMo's names inside a `BasicTransformerBlock` → LDM's, for the plain modules and for Transformer Engine's fused
/// ones (NeMo's `_legacy_unet_ckpt_mapping` and `te_fp8_key_mapping` read backwards). NeMo keeps each LayerNorm
/// inside the module it feeds: `attn1.norm` (LDM `norm1`), `attn2.norm` (`norm2`), `ff.net.0` (`norm3`), which
/// moves the feed-forward's layers up by one (`ff.net.1.proj` is LDM's `ff.net.0.proj`, `ff.net.3` its
/// `ff.net.2`). With Transformer Engine the norm and the next projection are one module: `attn1.norm_to_q`
/// (`layer_norm_weight`/`layer_norm_bias` the norm, `weight` the query projection) and `ff.net` (`layer_norm_*`,
/// `fc1_*`, `fc2_*`). LDM never uses these names, so the rename cannot touch an LDM key. Transformer Engine's
/// `_extra_state` entries keep their names: they are not weights, and are counted as unexpected.
fn transformer_block_to_ldm(key: &str) -> String {
    let Some(at) = key.find(".transformer_blocks.") else { return key.to_string() };
    let start = at + ".transformer_blocks.".len();
    let Some(dot) = key[start..].find('.') else { return key.to_string() };
    let (head, tail) = key.split_at(start + dot + 1);
    const RENAMES: [(&str, &str); 14] = [
        ("attn1.norm_to_q.layer_norm_weight", "norm1.weight"),
        ("attn1.norm_to_q.layer_norm_bias", "norm1.bias"),
        ("attn1.norm_to_q.weight", "attn1.to_q.weight"),
        ("attn2.norm_to_q.layer_norm_weight", "norm2.weight"),
        ("attn2.norm_to_q.layer_norm_bias", "norm2.bias"),
        ("attn2.norm_to_q.weight", "attn2.to_q.weight"),
        ("ff.net.layer_norm_weight", "norm3.weight"),
        ("ff.net.layer_norm_bias", "norm3.bias"),
        ("ff.net.fc1_weight", "ff.net.0.proj.weight"),
        ("ff.net.fc1_bias", "ff.net.0.proj.bias"),
        ("ff.net.fc2_weight", "ff.net.2.weight"),
        ("ff.net.fc2_bias", "ff.net.2.bias"),
        ("ff.net.0.weight", "norm3.weight"),
        ("ff.net.0.bias", "norm3.bias"),
    ];
    if let Some((_, to)) = RENAMES.iter().find(|(from, _)| tail == *from) {
        return format!("{head}{to}");
    }
    const PREFIXES: [(&str, &str); 4] = [
        ("attn1.norm.", "norm1."),
        ("attn2.norm.", "norm2."),
        ("ff.net.1.proj.", "ff.net.0.proj."),
        ("ff.net.3.", "ff.net.2."),
    ];
    match PREFIXES.iter().find_map(|(from, to)| tail.strip_prefix(from).map(|rest| format!("{head}{to}{rest}"))) {
        Some(k) => k,
        None => key.to_string(),
    }
}

/// Whether a state dict uses NeMo's names: the Megatron wrapper's prefixes, or NeMo's transformer-block names
/// (which only NeMo writes) anywhere. A file in this layout is renamed by [`nemo_key_to_ldm`] whatever its
/// container (`.nemo` archive, a NeMo training `.ckpt`, or safetensors).
pub fn is_nemo_layout<'a>(keys: impl IntoIterator<Item = &'a str> + Clone) -> bool {
    const NEMO_ONLY: [&str; 4] = [".attn1.norm.", ".attn1.norm_to_q.", ".ff.net.layer_norm_", ".ff.net.1.proj."];
    is_megatron_wrapped(keys.clone()) || keys.into_iter().any(|k| NEMO_ONLY.iter().any(|n| k.contains(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_nemo_keys_to_ldm_names() {
        let cases = [
            (
                "model.model.diffusion_model.input_blocks.1.0.in_layers.1.weight",
                "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
            ),
            (
                "model.model.diffusion_model.input_blocks.1.0.in_layers.0.bias",
                "model.diffusion_model.input_blocks.1.0.in_layers.0.bias",
            ),
            (
                "model.model.diffusion_model.output_blocks.11.0.out_layers.2.weight",
                "model.diffusion_model.output_blocks.11.0.out_layers.3.weight",
            ),
            ("model.model._orig_mod.diffusion_model.out.2.weight", "model.diffusion_model.out.2.weight"),
            (
                "model.model.diffusion_model._orig_mod.input_blocks.10.0.in_layers.1.bias",
                "model.diffusion_model.input_blocks.10.0.in_layers.2.bias",
            ),
            (
                "model.control_model.middle_block.0.in_layers.1.weight",
                "control_model.middle_block.0.in_layers.2.weight",
            ),
            ("model.control_model.zero_convs.0.0.weight", "control_model.zero_convs.0.0.weight"),
            (
                "model.first_stage_model.encoder.down.0.block.0.conv1.weight",
                "first_stage_model.encoder.down.0.block.0.conv1.weight",
            ),
            ("model.betas", "betas"),
        ];
        for (nemo, ldm) in cases {
            assert_eq!(nemo_key_to_ldm(nemo, true), ldm, "{nemo}");
        }
        // Without the wrapper, a leading "model." is LDM's own (model.diffusion_model) and stays.
        assert_eq!(
            nemo_key_to_ldm("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", false),
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
        );
        assert!(is_megatron_wrapped(["model.betas", "model.model._orig_mod.diffusion_model.x"]));
        assert!(!is_megatron_wrapped(["model.diffusion_model.x", "betas"]));
    }

    #[test]
    fn input_layers_ten_and_up_are_not_confused_with_one() {
        let k = nemo_key_to_ldm("model.model.diffusion_model.input_blocks.1.0.in_layers.10.weight", true);
        assert_eq!(k, "model.diffusion_model.input_blocks.1.0.in_layers.10.weight");
    }
}
