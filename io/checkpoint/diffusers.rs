//! The diffusers layout (`UNet2DConditionModel`, `ControlNetModel`, `AutoencoderKL`) and Hugging Face
//! `CLIPTextModel` files, renamed to the original LDM / ControlNet key names the models read.
//!
//! A diffusers file holds one component with its own module tree. Most leaf names are shared with LDM (the
//! transformer blocks keep theirs); what differs is the block numbering, which depends on the architecture: diffusers
//! numbers resnets and attentions per level (`down_blocks.{level}.resnets.{j}`), LDM numbers the blocks of the whole
//! encoder in sequence (`input_blocks.{n}`, downsamplers included) and the decoder from the lowest resolution up. The
//! numbering is therefore derived from the model config the run already has ([`Architecture`]), never from SD 1.5's
//! numbers; an index that the config does not have maps nowhere.
//!
//! A key that maps nowhere keeps its name: it is then one of the file's unexpected keys (counted, ignored), never a
//! value in a wrong tensor. Shapes are the same in both layouts except the VAE's mid-block attention, whose
//! projections diffusers stores as `Linear` weights `[C, C]` where LDM has 1x1 convolutions `[C, C, 1, 1]`.
//!
//! transformers 4 wrote `CLIPTextModel` keys under `text_model.`; transformers ≥ 5.6 flattened the model and writes
//! them without it. Both map to `cond_stage_model.transformer.text_model.*`.

use crate::models::{ControlNetConfig, UNetConfig, VaeConfig, CLIP_PREFIX, CONTROL_PREFIX, UNET_PREFIX, VAE_PREFIX};

/// The model configs a diffusers file's block numbering is derived from; `None` where the run has no such model.
#[derive(Clone, Debug, Default)]
pub struct Architecture {
    pub unet: Option<UNetConfig>,
    pub control: Option<ControlNetConfig>,
    pub vae: Option<VaeConfig>,
    /// What the weights of NeMo's Megatron CLIP text encoder do not tell (`FrozenMegatronCLIPEmbedder` runs only).
    pub megatron_clip: Option<super::megatron_clip::MegatronClip>,
}

/// The key layout of a checkpoint, recognised from its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// The original LDM / ControlNet names (or anything not recognised: the model's key check reports it).
    Ldm,
    /// NeMo's names (Megatron wrapper prefixes, transformer norms inside the modules they feed): see `nemo.rs`.
    Nemo,
    DiffusersUnet,
    DiffusersControlNet,
    DiffusersVae,
    /// `CLIPTextModel`, with (`text_model.*`, transformers 4) or without (transformers 5) the prefix.
    HfClip,
    /// An open_clip `state_dict` (`token_embedding.weight`, `transformer.resblocks.*`, ...): OpenCLIP's text tower,
    /// SD 2.x's text encoder ([`super::open_clip`]).
    OpenClip,
}

impl Layout {
    pub fn describe(self) -> &'static str {
        match self {
            Layout::Ldm => "original LDM",
            Layout::Nemo => "NeMo",
            Layout::DiffusersUnet => "diffusers UNet2DConditionModel",
            Layout::DiffusersControlNet => "diffusers ControlNetModel",
            Layout::DiffusersVae => "diffusers AutoencoderKL",
            Layout::HfClip => "Hugging Face CLIPTextModel",
            Layout::OpenClip => "open_clip CLIP state dict",
        }
    }
}

/// Recognises the layout. A file with any LDM-prefixed key is LDM (a full SD checkpoint holds all components).
pub fn detect(keys: &[&str]) -> Layout {
    let any = |f: &dyn Fn(&str) -> bool| keys.iter().any(|k| f(k));
    let ldm = [UNET_PREFIX, CONTROL_PREFIX, VAE_PREFIX, "cond_stage_model"];
    if any(&|k| ldm.iter().any(|p| k.strip_prefix(p).is_some_and(|r| r.starts_with('.')))) {
        Layout::Ldm
    } else if any(&|k| k.starts_with("controlnet_cond_embedding.") || k.starts_with("controlnet_down_blocks.")) {
        Layout::DiffusersControlNet
    } else if any(&|k| k.starts_with("encoder.down_blocks.") || k.starts_with("decoder.up_blocks.")) {
        Layout::DiffusersVae
    } else if any(&|k| k.starts_with("down_blocks.") || k.starts_with("up_blocks.") || k.starts_with("time_embedding."))
    {
        Layout::DiffusersUnet
    } else if any(&|k| k.starts_with("text_model.embeddings.") || k.starts_with("embeddings.token_embedding.")) {
        Layout::HfClip
    } else if super::open_clip::is_open_clip_state_dict(keys) {
        Layout::OpenClip
    } else {
        Layout::Ldm
    }
}

/// A key's LDM name, and the shape to give its tensor when the layouts store it differently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub key: String,
    /// Trailing unit dimensions to append (a `Linear` weight read as a 1x1 convolution).
    pub unit_dims: usize,
}

impl Mapped {
    fn plain(key: String) -> Mapped {
        Mapped { key, unit_dims: 0 }
    }
}

/// The U-Net's blocks per level, as the LDM constructor lays them out.
#[derive(Clone, Debug)]
pub struct UnetBlocks {
    /// ResBlocks per encoder level (the decoder has one more per level).
    res: Vec<usize>,
    /// Whether the level's blocks carry a SpatialTransformer.
    attn: Vec<bool>,
}

impl UnetBlocks {
    pub fn new(cfg: &UNetConfig) -> UnetBlocks {
        let levels = cfg.channel_mult.len();
        UnetBlocks {
            res: (0..levels).map(|l| cfg.num_res_blocks.get(l).copied().unwrap_or(0)).collect(),
            attn: (0..levels).map(|l| cfg.attention_resolutions.contains(&(1 << l))).collect(),
        }
    }

    pub(super) fn levels(&self) -> usize {
        self.res.len()
    }

    /// ResBlocks in encoder level `level`.
    pub(super) fn res(&self, level: usize) -> usize {
        self.res[level]
    }

    /// `input_blocks` index of the first ResBlock of `level` (block 0 is conv_in; a downsampler ends each level
    /// but the last).
    fn level_start(&self, level: usize) -> usize {
        1 + self.res[..level].iter().map(|r| r + 1).sum::<usize>()
    }

    pub(super) fn input(&self, level: usize, j: usize) -> Option<usize> {
        (level < self.levels() && j < self.res[level]).then(|| self.level_start(level) + j)
    }

    pub(super) fn downsampler(&self, level: usize) -> Option<usize> {
        (level + 1 < self.levels()).then(|| self.level_start(level) + self.res[level])
    }

    /// Number of `input_blocks` (and of the ControlNet's zero convolutions).
    fn inputs(&self) -> usize {
        self.level_start(self.levels()) - 1
    }

    /// `output_blocks` index of ResBlock `j` of diffusers' up block `up` (up block 0 is the lowest resolution).
    fn output(&self, up: usize, j: usize) -> Option<usize> {
        let levels = self.levels();
        let level = levels.checked_sub(up + 1)?;
        let start: usize = (0..up).map(|u| self.res[levels - 1 - u] + 1).sum();
        (j <= self.res[level]).then_some(start + j)
    }

    /// The LDM name of up block `up`'s upsampler conv: after the ResBlock, and after the transformer when the level
    /// has one.
    fn upsampler(&self, up: usize) -> Option<String> {
        let level = self.levels().checked_sub(up + 1)?;
        if level == 0 {
            return None;
        }
        let block = self.output(up, self.res[level])?;
        Some(format!("output_blocks.{block}.{}.conv", if self.attn[level] { 2 } else { 1 }))
    }
}

/// Splits `"{head}.{n}.{rest}"` into `(n, rest)`.
pub(super) fn indexed<'a>(key: &'a str, head: &str) -> Option<(usize, &'a str)> {
    let rest = key.strip_prefix(head)?.strip_prefix('.')?;
    let (n, rest) = rest.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// Replaces a leading module name `from` (followed by '.') with `to`.
pub(super) fn renamed(key: &str, from: &str, to: &str) -> Option<String> {
    key.strip_prefix(from).filter(|r| r.starts_with('.')).map(|r| format!("{to}{r}"))
}

/// Inside a U-Net ResBlock: diffusers' named layers and the positions in LDM's `in_layers`/`out_layers` Sequentials.
pub(super) const UNET_RESNET_LAYERS: [(&str, &str); 6] = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
];

/// A key inside a U-Net ResBlock, diffusers' name → LDM's.
fn unet_resnet(rest: &str) -> Option<String> {
    UNET_RESNET_LAYERS.iter().find_map(|(from, to)| renamed(rest, from, to))
}

/// The encoder half shared by the U-Net and the ControlNet: conv_in, the time embedding, the down blocks and the
/// mid block. `None` for anything else.
fn encoder_key(key: &str, b: &UnetBlocks) -> Option<String> {
    if let Some(k) = renamed(key, "conv_in", "input_blocks.0.0") {
        return Some(k);
    }
    if let Some(k) = renamed(key, "time_embedding.linear_1", "time_embed.0") {
        return Some(k);
    }
    if let Some(k) = renamed(key, "time_embedding.linear_2", "time_embed.2") {
        return Some(k);
    }
    if let Some((level, rest)) = indexed(key, "down_blocks") {
        if let Some((j, rest)) = indexed(rest, "resnets") {
            return Some(format!("input_blocks.{}.0.{}", b.input(level, j)?, unet_resnet(rest)?));
        }
        if let Some((j, rest)) = indexed(rest, "attentions") {
            let n = b.input(level, j).filter(|_| b.attn[level])?;
            return Some(format!("input_blocks.{n}.1.{rest}"));
        }
        let rest = rest.strip_prefix("downsamplers.0.conv.")?;
        return Some(format!("input_blocks.{}.0.op.{rest}", b.downsampler(level)?));
    }
    if let Some((j, rest)) = indexed(key, "mid_block.resnets") {
        return match j {
            0 | 1 => Some(format!("middle_block.{}.{}", 2 * j, unet_resnet(rest)?)),
            _ => None,
        };
    }
    let rest = key.strip_prefix("mid_block.attentions.0.")?;
    Some(format!("middle_block.1.{rest}"))
}

/// A diffusers `UNet2DConditionModel` key → `model.diffusion_model.*`.
pub fn unet_key(key: &str, b: &UnetBlocks) -> Option<String> {
    let ldm = encoder_key(key, b).or_else(|| {
        if let Some(k) = renamed(key, "conv_norm_out", "out.0").or_else(|| renamed(key, "conv_out", "out.2")) {
            return Some(k);
        }
        let (up, rest) = indexed(key, "up_blocks")?;
        if let Some((j, rest)) = indexed(rest, "resnets") {
            return Some(format!("output_blocks.{}.0.{}", b.output(up, j)?, unet_resnet(rest)?));
        }
        if let Some((j, rest)) = indexed(rest, "attentions") {
            let level = b.levels().checked_sub(up + 1)?;
            let n = b.output(up, j).filter(|_| b.attn[level])?;
            return Some(format!("output_blocks.{n}.1.{rest}"));
        }
        let rest = rest.strip_prefix("upsamplers.0.conv.")?;
        Some(format!("{}.{rest}", b.upsampler(up)?))
    })?;
    Some(format!("{UNET_PREFIX}.{ldm}"))
}

/// A diffusers `ControlNetModel` key → `control_model.*`.
pub fn controlnet_key(key: &str, cfg: &ControlNetConfig) -> Option<String> {
    let b = UnetBlocks::new(&cfg.unet);
    let convs = crate::models::controlnet::hint_convs(cfg.hint_channels, cfg.unet.model_channels).len();
    let ldm = encoder_key(key, &b).or_else(|| {
        if let Some(rest) = key.strip_prefix("controlnet_cond_embedding.") {
            // conv_in, blocks.0..n-2, conv_out: the convs of input_hint_block, SiLUs between them.
            if let Some(k) = renamed(rest, "conv_in", "input_hint_block.0") {
                return Some(k);
            }
            if let Some(k) = renamed(rest, "conv_out", &format!("input_hint_block.{}", 2 * (convs - 1))) {
                return Some(k);
            }
            let (k, rest) = indexed(rest, "blocks")?;
            return (k + 2 < convs).then(|| format!("input_hint_block.{}.{rest}", 2 * k + 2));
        }
        if let Some((k, rest)) = indexed(key, "controlnet_down_blocks") {
            return (k < b.inputs()).then(|| format!("zero_convs.{k}.0.{rest}"));
        }
        renamed(key, "controlnet_mid_block", "middle_block_out.0")
    })?;
    Some(format!("{CONTROL_PREFIX}.{ldm}"))
}

fn vae_resnet(rest: &str) -> Option<String> {
    let (layer, tail) = rest.split_once('.')?;
    match layer {
        "norm1" | "conv1" | "norm2" | "conv2" => Some(rest.to_string()),
        "conv_shortcut" => Some(format!("nin_shortcut.{tail}")),
        _ => None,
    }
}

/// The mid-block attention: diffusers' `Attention` (older files: `query`/`key`/`value`/`proj_attn`) → LDM's
/// AttnBlock, whose projections are 1x1 convolutions.
fn vae_attention(rest: &str) -> Option<Mapped> {
    let (layer, tail) = rest.rsplit_once('.')?;
    let to = match layer {
        "group_norm" => "norm",
        "to_q" | "query" => "q",
        "to_k" | "key" => "k",
        "to_v" | "value" => "v",
        "to_out.0" | "proj_attn" => "proj_out",
        _ => return None,
    };
    let unit_dims = if to != "norm" && tail == "weight" { 2 } else { 0 };
    Some(Mapped { key: format!("attn_1.{to}.{tail}"), unit_dims })
}

fn vae_mid(rest: &str) -> Option<Mapped> {
    if let Some((j, rest)) = indexed(rest, "resnets") {
        let block = match j {
            0 => "block_1",
            1 => "block_2",
            _ => return None,
        };
        return Some(Mapped::plain(format!("mid.{block}.{}", vae_resnet(rest)?)));
    }
    let m = vae_attention(rest.strip_prefix("attentions.0.")?)?;
    Some(Mapped { key: format!("mid.{}", m.key), unit_dims: m.unit_dims })
}

/// The keys the encoder and the decoder name alike (after `encoder.` / `decoder.`): conv_in, conv_out, the output
/// norm and the mid block; `None` for a level's key (or one that maps nowhere).
fn vae_shared(rest: &str) -> Option<Mapped> {
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        Some(Mapped::plain(rest.to_string()))
    } else if let Some(k) = renamed(rest, "conv_norm_out", "norm_out") {
        Some(Mapped::plain(k))
    } else {
        rest.strip_prefix("mid_block.").and_then(vae_mid)
    }
}

/// A diffusers `AutoencoderKL` key → `first_stage_model.*`.
pub fn vae_key(key: &str, cfg: &VaeConfig) -> Option<Mapped> {
    let levels = cfg.ch_mult.len();
    let nrb = cfg.num_res_blocks;
    let top = |k: &str| Some(Mapped::plain(k.to_string()));
    let m = if key.starts_with("quant_conv.") || key.starts_with("post_quant_conv.") {
        top(key)?
    } else if let Some(rest) = key.strip_prefix("encoder.") {
        let inner = if let Some(m) = vae_shared(rest) {
            m
        } else {
            let (level, rest) = indexed(rest, "down_blocks").filter(|(l, _)| *l < levels)?;
            if let Some((j, rest)) = indexed(rest, "resnets") {
                Mapped::plain(format!("down.{level}.block.{}.{}", (j < nrb).then_some(j)?, vae_resnet(rest)?))
            } else {
                let rest = rest.strip_prefix("downsamplers.0.conv.").filter(|_| level + 1 < levels)?;
                Mapped::plain(format!("down.{level}.downsample.conv.{rest}"))
            }
        };
        Mapped { key: format!("encoder.{}", inner.key), unit_dims: inner.unit_dims }
    } else {
        let rest = key.strip_prefix("decoder.")?;
        let inner = if let Some(m) = vae_shared(rest) {
            m
        } else {
            // The decoder's up blocks run from the lowest resolution; LDM's `up.{level}` counts from the highest.
            let (up, rest) = indexed(rest, "up_blocks")?;
            let level = levels.checked_sub(up + 1)?;
            if let Some((j, rest)) = indexed(rest, "resnets") {
                Mapped::plain(format!("up.{level}.block.{}.{}", (j <= nrb).then_some(j)?, vae_resnet(rest)?))
            } else {
                let rest = rest.strip_prefix("upsamplers.0.conv.").filter(|_| level > 0)?;
                Mapped::plain(format!("up.{level}.upsample.conv.{rest}"))
            }
        };
        Mapped { key: format!("decoder.{}", inner.key), unit_dims: inner.unit_dims }
    };
    Some(Mapped { key: format!("{VAE_PREFIX}.{}", m.key), unit_dims: m.unit_dims })
}

/// A Hugging Face `CLIPTextModel` key, with or without `text_model.` → `cond_stage_model.transformer.text_model.*`.
/// The projection of `CLIPTextModelWithProjection` and anything else outside the text transformer map nowhere.
pub fn clip_key(key: &str) -> Option<String> {
    let rest = key.strip_prefix("text_model.").unwrap_or(key);
    ["embeddings.", "encoder.layers.", "final_layer_norm."]
        .iter()
        .any(|p| rest.starts_with(p))
        .then(|| format!("{CLIP_PREFIX}.{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> UnetBlocks {
        UnetBlocks::new(&UNetConfig::default())
    }

    #[test]
    fn sd15_numbering_matches_the_ldm_tree() {
        let b = sd15();
        let u = |k: &str| unet_key(k, &b).map(|k| k.trim_start_matches("model.diffusion_model.").to_string());
        assert_eq!(u("down_blocks.1.resnets.1.conv1.weight").as_deref(), Some("input_blocks.5.0.in_layers.2.weight"));
        assert_eq!(u("down_blocks.2.downsamplers.0.conv.bias").as_deref(), Some("input_blocks.9.0.op.bias"));
        assert_eq!(u("down_blocks.3.resnets.1.norm2.weight").as_deref(), Some("input_blocks.11.0.out_layers.0.weight"));
        assert_eq!(u("down_blocks.3.attentions.0.norm.weight"), None, "SD 1.5's last level has no attention");
        assert_eq!(u("down_blocks.3.downsamplers.0.conv.weight"), None, "nor a downsampler");
        assert_eq!(u("up_blocks.0.upsamplers.0.conv.weight").as_deref(), Some("output_blocks.2.1.conv.weight"));
        assert_eq!(u("up_blocks.1.upsamplers.0.conv.weight").as_deref(), Some("output_blocks.5.2.conv.weight"));
        assert_eq!(u("up_blocks.3.attentions.2.proj_out.bias").as_deref(), Some("output_blocks.11.1.proj_out.bias"));
        assert_eq!(u("up_blocks.3.upsamplers.0.conv.weight"), None);
        assert_eq!(u("up_blocks.4.resnets.0.conv1.weight"), None);
        assert_eq!(
            u("mid_block.resnets.1.time_emb_proj.weight").as_deref(),
            Some("middle_block.2.emb_layers.1.weight")
        );
        assert_eq!(u("conv_norm_out.weight").as_deref(), Some("out.0.weight"));
    }

    #[test]
    fn vae_attention_becomes_a_one_by_one_conv() {
        let m = vae_key("decoder.mid_block.attentions.0.to_out.0.weight", &VaeConfig::default()).unwrap();
        assert_eq!(m, Mapped { key: "first_stage_model.decoder.mid.attn_1.proj_out.weight".into(), unit_dims: 2 });
        let m = vae_key("encoder.mid_block.attentions.0.group_norm.bias", &VaeConfig::default()).unwrap();
        assert_eq!(m, Mapped { key: "first_stage_model.encoder.mid.attn_1.norm.bias".into(), unit_dims: 0 });
        let m = vae_key("decoder.up_blocks.0.upsamplers.0.conv.weight", &VaeConfig::default()).unwrap();
        assert_eq!(m.key, "first_stage_model.decoder.up.3.upsample.conv.weight");
        assert_eq!(vae_key("decoder.up_blocks.3.upsamplers.0.conv.weight", &VaeConfig::default()), None);
    }

    #[test]
    fn clip_with_and_without_text_model() {
        let want = Some("cond_stage_model.transformer.text_model.final_layer_norm.weight".to_string());
        assert_eq!(clip_key("text_model.final_layer_norm.weight"), want);
        assert_eq!(clip_key("final_layer_norm.weight"), want);
        assert_eq!(clip_key("text_projection.weight"), None);
    }
}
