//! The trained ControlNet in diffusers' `ControlNetModel` layout: a folder with `config.json` and
//! `diffusion_pytorch_model.safetensors`, as `ControlNetModel.save_pretrained` writes it, so that
//! `ControlNetModel.from_pretrained(folder)` loads it.
//!
//! The key names are the inverse of [`super::diffusers::controlnet_key`], the mapping the loader uses; every name
//! this file derives is mapped back through that function and must give the key it came from, so the export can
//! only write names the tested loading direction agrees with.

use super::diffusers::{controlnet_key, indexed, renamed, UnetBlocks, UNET_RESNET_LAYERS};
use super::write::{write_atomically, write_safetensors, AsTensorView};
use crate::error::{Error, Result};
use crate::models::controlnet::hint_convs;
use crate::models::{ControlNetConfig, CONTROL_PREFIX};
use std::path::{Path, PathBuf};

/// The weight file diffusers reads from a model folder.
pub const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// A key inside a U-Net ResBlock, LDM's position → diffusers' name (the loader's table read backwards).
fn resnet_name(rest: &str) -> Option<String> {
    UNET_RESNET_LAYERS.iter().find_map(|(diffusers, ldm)| renamed(rest, ldm, diffusers))
}

/// The diffusers name of a `control_model.*` key, derived from the ControlNet's config; `None` for a key the
/// ControlNet does not have.
fn diffusers_name(key: &str, cfg: &ControlNetConfig) -> Option<String> {
    let k = key.strip_prefix(CONTROL_PREFIX)?.strip_prefix('.')?;
    let b = UnetBlocks::new(&cfg.unet);
    let convs = hint_convs(cfg.hint_channels, cfg.unet.model_channels).len();
    let plain = [
        ("input_blocks.0.0", "conv_in"),
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("middle_block_out.0", "controlnet_mid_block"),
    ];
    if let Some(name) = plain.iter().find_map(|(ldm, diffusers)| renamed(k, ldm, diffusers)) {
        return Some(name);
    }
    if let Some((n, r)) = indexed(k, "input_blocks") {
        for level in 0..b.levels() {
            if b.downsampler(level) == Some(n) {
                return Some(format!("down_blocks.{level}.downsamplers.0.conv.{}", r.strip_prefix("0.op.")?));
            }
            if let Some(j) = (0..b.res(level)).find(|&j| b.input(level, j) == Some(n)) {
                if let Some(r) = r.strip_prefix("0.") {
                    return Some(format!("down_blocks.{level}.resnets.{j}.{}", resnet_name(r)?));
                }
                return Some(format!("down_blocks.{level}.attentions.{j}.{}", r.strip_prefix("1.")?));
            }
        }
        return None;
    }
    if let Some((n, r)) = indexed(k, "middle_block") {
        return match n {
            0 | 2 => Some(format!("mid_block.resnets.{}.{}", n / 2, resnet_name(r)?)),
            1 => Some(format!("mid_block.attentions.0.{r}")),
            _ => None,
        };
    }
    if let Some((i, r)) = indexed(k, "input_hint_block") {
        // The hint block's convolutions sit at even positions, SiLUs between them.
        return match i {
            0 => Some(format!("controlnet_cond_embedding.conv_in.{r}")),
            i if i == 2 * (convs - 1) => Some(format!("controlnet_cond_embedding.conv_out.{r}")),
            i if i % 2 == 0 && i < 2 * (convs - 1) => {
                Some(format!("controlnet_cond_embedding.blocks.{}.{r}", i / 2 - 1))
            }
            _ => None,
        };
    }
    let (i, r) = indexed(k, "zero_convs")?;
    Some(format!("controlnet_down_blocks.{i}.{}", r.strip_prefix("0.")?))
}

/// The diffusers name of `key`, checked by mapping it back with the loader's function.
pub fn controlnet_diffusers_key(key: &str, cfg: &ControlNetConfig) -> Result<String> {
    let name = diffusers_name(key, cfg)
        .ok_or_else(|| Error::msg(format!("{key}: not a key of this ControlNet (no diffusers name for it)")))?;
    match controlnet_key(&name, cfg) {
        Some(back) if back == key => Ok(name),
        back => Err(Error::msg(format!(
            "{key}: its diffusers name {name} would load as {back:?}; refusing to write a file that loads wrongly"
        ))),
    }
}

/// `config.json` of a diffusers `ControlNetModel` with this architecture (the fields `save_pretrained` writes).
pub fn controlnet_config_json(cfg: &ControlNetConfig) -> Result<serde_json::Value> {
    let u = &cfg.unet;
    let levels = u.channel_mult.len();
    let per_level = u.num_res_blocks.first().copied().unwrap_or(0);
    if u.num_res_blocks.iter().any(|&n| n != per_level) {
        return Err(Error::msg(format!(
            "control_stage_config.num_res_blocks {:?}: diffusers' ControlNetModel has one layers_per_block for every \
             level; this ControlNet cannot be written in the diffusers layout (export it in the LDM layout)",
            u.num_res_blocks
        )));
    }
    let block_out: Vec<usize> = u.channel_mult.iter().map(|m| u.model_channels * m).collect();
    let heads: Vec<usize> = block_out.iter().map(|&ch| u.heads(ch).map(|(h, _)| h)).collect::<Result<_>>()?;
    let attention_head_dim =
        if heads.iter().all(|&h| h == heads[0]) { serde_json::json!(heads[0]) } else { serde_json::json!(heads) };
    let down_block_types: Vec<&str> = (0..levels)
        .map(|l| if u.attention_resolutions.contains(&(1 << l)) { "CrossAttnDownBlock2D" } else { "DownBlock2D" })
        .collect();
    // The hint block's channel ladder: every conv's output but the last (which is model_channels), once each.
    let mut ladder: Vec<usize> = Vec::new();
    let convs = hint_convs(cfg.hint_channels, u.model_channels);
    for &(_, out, _) in &convs[..convs.len() - 1] {
        if ladder.last() != Some(&out) {
            ladder.push(out);
        }
    }
    Ok(serde_json::json!({
        "_class_name": "ControlNetModel",
        "act_fn": "silu",
        "addition_embed_type": null,
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": null,
        "attention_head_dim": attention_head_dim,
        "block_out_channels": block_out,
        "class_embed_type": null,
        "conditioning_channels": cfg.hint_channels,
        "conditioning_embedding_out_channels": ladder,
        "controlnet_conditioning_channel_order": "rgb",
        "cross_attention_dim": u.context_dim,
        "down_block_types": down_block_types,
        "downsample_padding": 1,
        "encoder_hid_dim": null,
        "encoder_hid_dim_type": null,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "global_pool_conditions": false,
        "in_channels": u.in_channels,
        "layers_per_block": per_level,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-5,
        "norm_num_groups": crate::models::config::GROUP_NORM_GROUPS,
        "num_attention_heads": null,
        "num_class_embeds": null,
        "only_cross_attention": false,
        "projection_class_embeddings_input_dim": null,
        "resnet_time_scale_shift": "default",
        "transformer_layers_per_block": u.transformer_depth,
        "upcast_attention": false,
        "use_linear_projection": u.use_linear_in_transformer,
    }))
}

/// Writes `tensors` (`control_model.*` keys, every one of the ControlNet's) as a diffusers ControlNet folder `out`:
/// the weights first, then `config.json`, each atomically. Returns the weight file's path.
pub fn write_controlnet_diffusers<T: AsTensorView>(
    out: &Path,
    cfg: &ControlNetConfig,
    tensors: &[(String, T)],
) -> Result<PathBuf> {
    let config = controlnet_config_json(cfg)?;
    let renamed: Vec<(String, &T)> =
        tensors.iter().map(|(k, t)| Ok((controlnet_diffusers_key(k, cfg)?, t))).collect::<Result<_>>()?;
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, format!("cannot create the folder: {e}")))?;
    let weights = out.join(DIFFUSERS_WEIGHTS);
    let metadata = std::collections::BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&weights, &renamed, Some(&metadata))?;
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::msg(format!("config.json: {e}")))?;
    write_atomically(&out.join("config.json"), |w| {
        w.write_all(format!("{text}\n").as_bytes()).map_err(|e| Error::file(out.join("config.json"), e.to_string()))
    })?;
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::UNetConfig;

    #[test]
    fn every_sd15_controlnet_key_has_a_diffusers_name_that_maps_back() {
        let cfg = ControlNetConfig { unet: UNetConfig::default(), hint_channels: 3 };
        let specs = crate::models::counts::controlnet_params(&cfg).unwrap();
        for s in &specs {
            controlnet_diffusers_key(&s.key, &cfg).unwrap();
        }
        let name = |k: &str| controlnet_diffusers_key(&format!("control_model.{k}"), &cfg).unwrap();
        assert_eq!(name("input_blocks.4.1.proj_in.weight"), "down_blocks.1.attentions.0.proj_in.weight");
        assert_eq!(name("input_blocks.9.0.op.bias"), "down_blocks.2.downsamplers.0.conv.bias");
        assert_eq!(name("input_hint_block.14.weight"), "controlnet_cond_embedding.conv_out.weight");
        assert_eq!(name("input_hint_block.2.weight"), "controlnet_cond_embedding.blocks.0.weight");
        assert_eq!(name("zero_convs.11.0.bias"), "controlnet_down_blocks.11.bias");
        assert!(controlnet_diffusers_key("control_model.input_hint_block.1.weight", &cfg).is_err(), "a SiLU");
        assert!(controlnet_diffusers_key("model.diffusion_model.out.0.weight", &cfg).is_err());
    }

    #[test]
    fn sd15_config_matches_diffusers_names_for_it() {
        let cfg = ControlNetConfig { unet: UNetConfig::default(), hint_channels: 3 };
        let c = controlnet_config_json(&cfg).unwrap();
        assert_eq!(c["attention_head_dim"], serde_json::json!(8));
        assert_eq!(c["block_out_channels"], serde_json::json!([320, 640, 1280, 1280]));
        assert_eq!(c["conditioning_embedding_out_channels"], serde_json::json!([16, 32, 96, 256]));
        assert_eq!(c["down_block_types"][3], "DownBlock2D");
        let sd2 = ControlNetConfig {
            unet: UNetConfig { num_heads: -1, num_head_channels: 64, ..UNetConfig::default() },
            hint_channels: 3,
        };
        assert_eq!(controlnet_config_json(&sd2).unwrap()["attention_head_dim"], serde_json::json!([5, 10, 20, 20]));
    }
}
