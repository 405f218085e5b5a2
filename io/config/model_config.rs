//! From the config file's sections to the models' hyper-parameters.

use crate::error::{Error, Result};
use crate::io::config::{self as schema, ClipLayer, Config, HiddenAct};
use crate::models::control_ldm::ControlLdmConfig;
use crate::models::{ClipActivation, ClipConfig, ClipOutput, ControlNetConfig, UNetConfig, VaeConfig};

pub fn unet(c: &schema::UNetConfig) -> UNetConfig {
    c.architecture(c.out_channels as usize)
}

pub fn controlnet(c: &schema::ControlNetConfig, out_channels: usize) -> ControlNetConfig {
    ControlNetConfig { unet: c.architecture(out_channels), hint_channels: c.hint_channels as usize }
}

pub fn vae(c: &schema::AutoencoderConfig, scale_factor: f64) -> VaeConfig {
    c.ddconfig.architecture(c.embed_dim as usize, scale_factor)
}

pub fn clip(c: &schema::TextEncoderConfig) -> Result<ClipConfig> {
    let layers = c.num_hidden_layers as usize;
    let output = match c.layer {
        ClipLayer::Last => ClipOutput::Last,
        ClipLayer::Penultimate => ClipOutput::Penultimate,
        ClipLayer::Hidden => {
            let idx = c.layer_idx.ok_or_else(|| {
                Error::msg("model.cond_stage_config.layer_idx: required when layer is 'hidden'".to_string())
            })?;
            // Negative indices count from the end of hidden_states (which starts with the embeddings).
            let i = if idx < 0 { layers as i64 + 1 + idx as i64 } else { idx as i64 };
            if i < 1 || i as usize > layers {
                return Err(Error::msg(format!("model.cond_stage_config.layer_idx: {idx} is outside 1..={layers}")));
            }
            ClipOutput::Hidden(i as usize - 1)
        }
    };
    Ok(ClipConfig {
        vocab_size: c.vocab_size as usize,
        max_position_embeddings: c.max_position_embeddings as usize,
        hidden_size: c.hidden_size as usize,
        intermediate_size: c.intermediate_size as usize,
        num_layers: layers,
        num_heads: c.num_attention_heads as usize,
        layer_norm_eps: 1e-5,
        activation: match c.hidden_act {
            HiddenAct::QuickGelu => ClipActivation::QuickGelu,
            HiddenAct::Gelu => ClipActivation::Gelu,
        },
        output,
    })
}

pub fn control_ldm(cfg: &Config) -> ControlLdmConfig {
    let m = &cfg.model;
    let unet = unet(&m.unet_config);
    ControlLdmConfig {
        control: controlnet(&m.control_stage_config, unet.out_channels),
        unet,
        only_mid_control: m.only_mid_control,
        sd_locked: m.sd_locked,
        strength: m.strength,
        guess_mode: m.guess_mode,
    }
}

/// The configs a diffusers file's block numbering is read against ([`crate::io::checkpoint::diffusers`]).
pub fn architecture(cfg: &Config) -> crate::io::checkpoint::Architecture {
    let ldm = control_ldm(cfg);
    crate::io::checkpoint::Architecture {
        unet: Some(ldm.unet),
        control: Some(ldm.control),
        vae: Some(vae(&cfg.model.first_stage_config, cfg.model.scale_factor)),
        megatron_clip: megatron_clip(&cfg.model.cond_stage_config),
    }
}

/// What loading a Megatron CLIP text tower needs from the config (None: the text encoder is not one).
pub fn megatron_clip(c: &schema::TextEncoderConfig) -> Option<crate::io::checkpoint::megatron_clip::MegatronClip> {
    let m = c.megatron.as_ref()?;
    let vocab = c.vocab_size as usize;
    let multiple = (m.vocab_padding as usize).max(1);
    Some(crate::io::checkpoint::megatron_clip::MegatronClip {
        legacy_qkv: m.megatron_legacy,
        num_heads: c.num_attention_heads as usize,
        vocab_size: vocab,
        padded_vocab_size: vocab.div_ceil(multiple) * multiple,
    })
}
