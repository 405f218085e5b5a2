//! Checks across keys that types alone cannot express, so that a config that loads can be built: e.g. the
//! ControlNet must mirror the U-Net's encoder, GroupNorm needs channel counts divisible by 32, the global batch
//! must split into micro-batches.

use super::schema::{Config, SchedConfig};
use super::values::ClipLayer;

/// The first problem found: the dotted key it is about and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub path: String,
    pub msg: String,
}

type Check = Result<(), Invalid>;

fn invalid(path: impl Into<String>, msg: impl Into<String>) -> Check {
    Err(Invalid { path: path.into(), msg: msg.into() })
}

fn require(ok: bool, path: &str, msg: impl FnOnce() -> String) -> Check {
    if ok {
        Ok(())
    } else {
        invalid(path, msg())
    }
}

/// GroupNorm's group count (the U-Net, the ControlNet and the VAE).
const NORM_GROUPS: u32 = crate::models::GROUP_NORM_GROUPS as u32;

fn unet_arch(config: &Config) -> crate::models::UNetConfig {
    let u = &config.model.unet_config;
    u.architecture(u.out_channels as usize)
}

fn control_arch(config: &Config) -> crate::models::UNetConfig {
    config.model.control_stage_config.architecture(config.model.unet_config.out_channels as usize)
}

pub fn validate(config: &Config) -> Check {
    check_trainer(config)?;
    check_batch(config)?;
    check_diffusion(config)?;
    check_unet(&unet_arch(config), "model.unet_config")?;
    check_unet(&control_arch(config), "model.control_stage_config")?;
    check_control_mirrors_unet(config)?;
    check_autoencoder(config)?;
    check_text_encoder(config)?;
    check_optim(config)?;
    check_infer(config)?;
    check_resume(config)
}

fn check_trainer(config: &Config) -> Check {
    let t = &config.trainer;
    require(t.devices >= 1, "trainer.devices", || "must be at least 1".into())?;
    require(t.num_nodes >= 1, "trainer.num_nodes", || "must be at least 1".into())?;
    require(t.log_every_n_steps >= 1, "trainer.log_every_n_steps", || "must be at least 1".into())?;
    require(t.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", || "must be at least 1".into())?;
    let clip = t.gradient_clip_val.unwrap_or(0.0);
    require(clip.is_finite() && clip >= 0.0, "trainer.gradient_clip_val", || format!("must be >= 0, found {clip}"))
}

fn check_batch(config: &Config) -> Check {
    let m = &config.model;
    require(m.micro_batch_size >= 1, "model.micro_batch_size", || "must be at least 1".into())?;
    let Some(global) = m.global_batch_size else { return Ok(()) };
    let per_micro_step = u64::from(m.micro_batch_size) * u64::from(config.data_parallel_size());
    require(global >= 1 && u64::from(global) % per_micro_step == 0, "model.global_batch_size", || {
        format!(
            "{global} is not a multiple of micro_batch_size × devices × num_nodes = {per_micro_step}; \
             gradient accumulation is global / that"
        )
    })?;
    require(config.trainer.accumulate_grad_batches == 1, "trainer.accumulate_grad_batches", || {
        "must stay 1 when model.global_batch_size is set (accumulation follows from it, as in NeMo)".into()
    })
}

fn check_diffusion(config: &Config) -> Check {
    let m = &config.model;
    require(m.timesteps >= 1, "model.timesteps", || "must be at least 1".into())?;
    require(m.linear_start > 0.0 && m.linear_start < m.linear_end && m.linear_end < 1.0, "model.linear_start", || {
        format!("need 0 < linear_start < linear_end < 1, found {} and {}", m.linear_start, m.linear_end)
    })?;
    require(m.scale_factor > 0.0 && m.scale_factor.is_finite(), "model.scale_factor", || "must be > 0".into())?;
    require(m.strength.is_finite(), "model.strength", || format!("must be a finite number, found {}", m.strength))?;
    let p = m.text_embedding_dropout_rate;
    require((0.0..=1.0).contains(&p), "model.text_embedding_dropout_rate", || format!("must be in [0, 1], found {p}"))
}

/// The U-Net architecture check the models run when they are built (one definition: `UNetConfig::check`), on a
/// config section, naming the section's key.
fn check_unet(arch: &crate::models::UNetConfig, at: &str) -> Check {
    arch.check().map_err(|p| Invalid { path: format!("{at}.{}", p.key), msg: p.why })
}

fn check_control_mirrors_unet(config: &Config) -> Check {
    let unet = unet_arch(config).mirrored_keys();
    let control = control_arch(config).mirrored_keys();
    for ((key, u), (_, c)) in unet.iter().zip(control.iter()) {
        require(u == c, &format!("model.control_stage_config.{key}"), || {
            format!(
                "{c} differs from model.unet_config.{key} ({u}): the ControlNet starts as a copy of the U-Net's \
                 encoder, so the two must match"
            )
        })?;
    }
    // NeMo reads use_flash_attention per module; the CUDA executor picks attention kernels per compiled step, where
    // the U-Net's attention and the ControlNet's are the same op, so two values could not both be honoured.
    let (u, c) = (config.model.unet_config.use_flash_attention, config.model.control_stage_config.use_flash_attention);
    require(u == c, "model.control_stage_config.use_flash_attention", || {
        format!(
            "{c} differs from model.unet_config.use_flash_attention ({u}): the CUDA executor selects flash attention \
             for the whole step (it cannot tell the U-Net's attention from the ControlNet's), so set both keys to the \
             same value"
        )
    })?;
    require(config.model.control_stage_config.hint_channels >= 1, "model.control_stage_config.hint_channels", || {
        "must be at least 1".into()
    })
}

fn check_autoencoder(config: &Config) -> Check {
    let vae = &config.model.first_stage_config;
    let dd = &vae.ddconfig;
    require(vae.embed_dim >= 1, "model.first_stage_config.embed_dim", || "must be at least 1".into())?;
    require(dd.z_channels >= 1, "model.first_stage_config.ddconfig.z_channels", || "must be at least 1".into())?;
    require(dd.num_res_blocks >= 1, "model.first_stage_config.ddconfig.num_res_blocks", || {
        "must be at least 1".into()
    })?;
    require(!dd.ch_mult.is_empty(), "model.first_stage_config.ddconfig.ch_mult", || "needs at least one level".into())?;
    let widths: Vec<u32> = dd.ch_mult.iter().map(|m| m * dd.ch).collect();
    require(dd.ch > 0 && widths.iter().all(|w| w % NORM_GROUPS == 0), "model.first_stage_config.ddconfig.ch", || {
        format!("every level's width (ch × ch_mult = {widths:?}) must be a positive multiple of {NORM_GROUPS}")
    })?;
    require((0.0..1.0).contains(&dd.dropout), "model.first_stage_config.ddconfig.dropout", || {
        format!("must be in [0, 1), found {}", dd.dropout)
    })
}

fn check_text_encoder(config: &Config) -> Check {
    let t = &config.model.cond_stage_config;
    let at = "model.cond_stage_config";
    require(t.max_length >= 2, &format!("{at}.max_length"), || "must be at least 2 (BOS and EOS)".into())?;
    require(t.max_length <= t.max_position_embeddings, &format!("{at}.max_length"), || {
        format!("{} is more than max_position_embeddings ({})", t.max_length, t.max_position_embeddings)
    })?;
    require(
        t.num_attention_heads > 0 && t.hidden_size.is_multiple_of(t.num_attention_heads),
        &format!("{at}.num_attention_heads"),
        || format!("{} heads must divide hidden_size {}", t.num_attention_heads, t.hidden_size),
    )?;
    require(t.num_hidden_layers >= 1, &format!("{at}.num_hidden_layers"), || "must be at least 1".into())?;
    require(!t.pad_token.is_empty(), &format!("{at}.pad_token"), || "must not be empty".into())?;
    match (t.layer, t.layer_idx) {
        (ClipLayer::Hidden, None) => invalid(format!("{at}.layer_idx"), "layer: hidden needs a layer_idx"),
        (ClipLayer::Hidden, Some(i)) => {
            let n = i64::from(t.num_hidden_layers);
            require((-n..n).contains(&i64::from(i)), &format!("{at}.layer_idx"), || {
                format!("{i} is outside the {n} layers")
            })
        }
        (_, Some(_)) => invalid(format!("{at}.layer_idx"), "is only used with layer: hidden"),
        (_, None) => Ok(()),
    }
}

fn check_optim(config: &Config) -> Check {
    let o = &config.model.optim;
    require(o.lr > 0.0 && o.lr.is_finite(), "model.optim.lr", || format!("must be > 0, found {}", o.lr))?;
    require(o.weight_decay >= 0.0 && o.weight_decay.is_finite(), "model.optim.weight_decay", || {
        format!("must be >= 0, found {}", o.weight_decay)
    })?;
    require(o.betas.iter().all(|b| (0.0..1.0).contains(b)), "model.optim.betas", || {
        format!("each beta must be in [0, 1), found {:?}", o.betas)
    })?;
    require(o.eps > 0.0, "model.optim.eps", || format!("must be > 0, found {}", o.eps))?;
    o.sched.as_ref().map_or(Ok(()), check_sched)
}

fn check_sched(s: &SchedConfig) -> Check {
    let at = "model.optim.sched";
    for (steps, ratio, what) in [(s.warmup_steps, s.warmup_ratio, "warmup"), (s.hold_steps, s.hold_ratio, "hold")] {
        require(steps.is_none() || ratio.is_none(), &format!("{at}.{what}_ratio"), || {
            format!("give {what}_steps or {what}_ratio, not both")
        })?;
        if let Some(r) = ratio {
            require((0.0..=1.0).contains(&r), &format!("{at}.{what}_ratio"), || {
                format!("must be in [0, 1], found {r}")
            })?;
        }
    }
    require(s.min_lr >= 0.0, &format!("{at}.min_lr"), || format!("must be >= 0, found {}", s.min_lr))
}

fn check_infer(config: &Config) -> Check {
    let i = &config.infer;
    require(i.down_factor >= 1, "infer.down_factor", || "must be at least 1".into())?;
    for (key, v) in [("unconditional_guidance_scale", i.unconditional_guidance_scale), ("eta", i.eta)] {
        require(v.is_finite(), &format!("infer.{key}"), || format!("must be a finite number, found {v}"))?;
    }
    require((0.0..=1.0).contains(&i.eta), "infer.eta", || {
        format!("{} is outside DDIM's 0 (deterministic) to 1", i.eta)
    })?;
    for (key, size) in [("height", i.height), ("width", i.width)] {
        require(size >= 1 && size % i.down_factor == 0, &format!("infer.{key}"), || {
            format!("{size} must be a positive multiple of down_factor ({})", i.down_factor)
        })?;
    }
    require(i.inference_steps >= 1 && i.inference_steps <= config.model.timesteps, "infer.inference_steps", || {
        format!("must be in 1..={} (model.timesteps)", config.model.timesteps)
    })?;
    require(i.control.is_empty() || i.control.len() == i.prompts.len(), "infer.control", || {
        format!("gives {} control images for {} prompts; give one per prompt", i.control.len(), i.prompts.len())
    })
}

fn check_resume(config: &Config) -> Check {
    match (&config.exp_manager.resume_from_checkpoint, &config.model.resume_from_checkpoint) {
        (Some(a), Some(b)) if a != b => invalid(
            "exp_manager.resume_from_checkpoint",
            format!("{} differs from model.resume_from_checkpoint ({}); give one", a.display(), b.display()),
        ),
        _ => Ok(()),
    }
}
