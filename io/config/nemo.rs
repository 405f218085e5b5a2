//! NeMo compatibility: the keys a NeMo ControlNet config has that zeroconv accepts on purpose without reading
//! them, and the `params:` wrappers of `_target_`-style sections.
//!
//! Every key of a NeMo config is either read by the typed [`super::Config`] or listed here, with the reason.
//! Keys whose other values would change what is trained (e.g. `parameterization: v`) are accepted only at the
//! value zeroconv implements: any other value is an error rather than a silent difference.

use std::collections::HashSet;

use super::node::{join_path, Entry, Node, Value};
use super::scalar::{resolve_plain, Resolved};
use crate::error::{Error, Result};

/// Which values an ignored key may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepts {
    /// Anything: the key has no effect on what zeroconv does.
    Any,
    /// Only these values, in canonical form (`null`, `true`/`false`, numbers as `0`, `1`, strings as written).
    Only(&'static [&'static str]),
}

/// A key that zeroconv accepts and does not read.
#[derive(Debug, Clone, Copy)]
pub struct IgnoredKey {
    /// Dotted path; `*.name` matches `name` at any depth.
    pub path: &'static str,
    pub accepts: Accepts,
    /// Why zeroconv does not need it (shown in errors and the README).
    pub why: &'static str,
}

const fn any(path: &'static str, why: &'static str) -> IgnoredKey {
    IgnoredKey { path, accepts: Accepts::Any, why }
}

const fn only(path: &'static str, values: &'static [&'static str], why: &'static str) -> IgnoredKey {
    IgnoredKey { path, accepts: Accepts::Only(values), why }
}

const EXP_MANAGER_LOGS: &str = "zeroconv writes its own logs and metrics under the experiment directory";
const SAMPLING_ONLY: &str = "used by NeMo's DDPM sampler and logger only";
const PRECISION: &str = "the precision is trainer.precision";
const COMPILED: &str = "zeroconv always compiles the step into one graph and replays it";

/// Every key zeroconv accepts without reading it.
pub const IGNORED_KEYS: &[IgnoredKey] = &[
    any(
        "*._target_",
        "the Python class NeMo instantiates; zeroconv knows each section's model, except the text encoder's, which \
         model.cond_stage_config._target_ selects (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder or FrozenMegatronCLIPEmbedder; \
         another is refused)",
    ),
    any(
        "*.target",
        "the Python class of a legacy LDM section (with `params:`); read only in model.cond_stage_config, as _target_",
    ),
    any("name", "the NeMo job name; zeroconv names runs with exp_manager.name"),
    any("hydra", "Hydra's own settings (output directories, job logging)"),
    // trainer: PyTorch Lightning options with no counterpart.
    any("trainer.logger", EXP_MANAGER_LOGS),
    any("trainer.enable_checkpointing", "checkpoints are set by exp_manager (NeMo sets this False too)"),
    any("trainer.use_distributed_sampler", "zeroconv shards the data itself"),
    any("trainer.strategy", "zeroconv runs one data-parallel process per device"),
    any("trainer.benchmark", "cuDNN autotuning: zeroconv chooses kernels when it compiles the step"),
    any("trainer.enable_model_summary", "zeroconv prints its own graph summary"),
    any("trainer.enable_progress_bar", EXP_MANAGER_LOGS),
    any("trainer.num_sanity_val_steps", "ControlNet training runs no validation loop"),
    any("trainer.limit_val_batches", "ControlNet training runs no validation loop"),
    any("trainer.check_val_every_n_epoch", "ControlNet training runs no validation loop"),
    // exp_manager: loggers and NeMo checkpoint details.
    any("exp_manager.create_wandb_logger", EXP_MANAGER_LOGS),
    any("exp_manager.wandb_logger_kwargs", EXP_MANAGER_LOGS),
    any("exp_manager.create_tensorboard_logger", EXP_MANAGER_LOGS),
    any("exp_manager.log_step_timing", EXP_MANAGER_LOGS),
    any("exp_manager.ema", "exponential moving average of weights, accepted only while off"),
    only("exp_manager.ema.enable", &["false"], "zeroconv does not keep an EMA of the weights"),
    any("exp_manager.checkpoint_callback_params.every_n_epochs", "zeroconv checkpoints by step"),
    any("exp_manager.checkpoint_callback_params.monitor", "checkpoints are kept newest-first, not by a metric"),
    any("exp_manager.checkpoint_callback_params.mode", "checkpoints are kept newest-first, not by a metric"),
    any("exp_manager.checkpoint_callback_params.filename", "zeroconv names checkpoints by step"),
    any("exp_manager.checkpoint_callback_params.save_last", "the newest checkpoint is always kept"),
    any("exp_manager.checkpoint_callback_params.always_save_nemo", "zeroconv writes safetensors, not .nemo archives"),
    any("exp_manager.checkpoint_callback_params.save_nemo_on_train_end", "zeroconv writes safetensors, not .nemo"),
    // model: LatentDiffusion options that are fixed in zeroconv, or belong to NeMo's runtime.
    any("model.precision", PRECISION),
    only("model.num_timesteps_cond", &["1"], "conditioning-timestep schedules are not implemented"),
    any("model.log_every_t", SAMPLING_ONLY),
    any("model.image_size", "the latent size follows from the data resolution"),
    any("model.channels", "the latent channels are unet_config.in_channels"),
    only("model.cond_stage_trainable", &["false"], "the text encoder stays frozen"),
    only("model.conditioning_key", &["crossattn"], "text conditioning enters by cross-attention"),
    any("model.monitor", "no validation metric is tracked"),
    only("model.use_ema", &["false"], "zeroconv does not keep an EMA of the weights"),
    only("model.scale_by_std", &["false"], "the latent scale is model.scale_factor"),
    only("model.ckpt_path", &["null"], "load weights with unet_config.from_pretrained and friends"),
    any("model.ignore_keys", "belongs to ckpt_path"),
    any("model.load_only_unet", "belongs to ckpt_path"),
    only("model.parameterization", &["eps"], "zeroconv trains the noise-prediction (eps) objective"),
    any("model.clip_denoised", SAMPLING_ONLY),
    any("model.cosine_s", "only used by the cosine beta schedule"),
    only("model.given_betas", &["null"], "the schedule is linear_start/linear_end/timesteps"),
    only("model.original_elbo_weight", &["0"], "the loss is the simple MSE"),
    only("model.v_posterior", &["0"], "the DDPM posterior variance is not used"),
    only("model.l_simple_weight", &["1"], "the loss is the simple MSE"),
    only("model.use_positional_encodings", &["false"], "not implemented"),
    only("model.learn_logvar", &["false"], "the loss is the simple MSE"),
    only("model.logvar_init", &["0"], "the loss is the simple MSE"),
    only("model.beta_schedule", &["linear"], "the noise schedule is linear"),
    only("model.loss_type", &["l2"], "the loss is the simple MSE"),
    any("model.learning_rate", "a legacy LDM key; the rate is model.optim.lr"),
    any("model.concat_mode", "only used with conditioning_key: concat"),
    only("model.cond_stage_forward", &["null"], "the text encoder's forward is fixed"),
    any("model.fused_opt", "the optimizer update is compiled into the step"),
    any("model.inductor_cudagraphs", COMPILED),
    any("model.capture_cudagraph_iters", COMPILED),
    any("model.nsys_profile", "profile with ZEROCONV_DEBUG / nsys around zeroconv instead"),
    any("model.image_logger", SAMPLING_ONLY),
    any("model.apex_transformer_log_level", "a NeMo/Apex logging level"),
    any("model.gradient_as_bucket_view", "a PyTorch DDP memory option"),
    any("model.unet_config.use_fp16", PRECISION),
    any("model.control_stage_config.use_fp16", PRECISION),
    any("model.first_stage_config.monitor", "no validation metric is tracked"),
    any("model.first_stage_config.lossconfig", "the autoencoder is frozen; its training loss is not needed"),
    only("model.first_stage_config.ckpt_path", &["null"], "load the autoencoder with from_pretrained"),
    any("model.first_stage_config.image_key", "the batch key is model.first_stage_key"),
    any("model.first_stage_config.ignore_keys", "belongs to ckpt_path"),
    any("model.first_stage_config.capture_cudagraph_iters", COMPILED),
    any("model.cond_stage_config.device", "zeroconv places every model on trainer.accelerator"),
    only("model.cond_stage_config.freeze", &["true"], "the text encoder stays frozen"),
    any("model.cond_stage_config.capture_cudagraph_iters", COMPILED),
    any("model.cond_stage_config.use_fp16", PRECISION),
    any(
        "model.cond_stage_config.cache_dir",
        "where open_clip downloads the OpenCLIP weights; zeroconv reads them from model.cond_stage_config.from_pretrained",
    ),
    only("model.data.train.filterings", &["null"], "sample filtering is not implemented; filter the shards beforehand"),
    only(
        "model.data.webdataset.infinite_sampler",
        &["false"],
        "NeMo's infinite sampler draws shards with replacement into epochs of chunk_size x shards samples; zeroconv \
         reads every shard once per epoch",
    ),
    any("model.optim.sched.last_epoch", "a PyTorch scheduler resume detail"),
    any("model.optim.sched.max_steps", "taken from trainer.max_steps, as NeMo does"),
    any("infer.output_type", "zeroconv writes PNG files"),
    only("infer.control_image_preprocess", &["null"], "give the control images already preprocessed"),
];

/// The ignored-key rule for a dotted path, if any.
pub fn ignored_rule(path: &str) -> Option<&'static IgnoredKey> {
    let last = path.rsplit('.').next().unwrap_or(path);
    IGNORED_KEYS.iter().find(|k| match k.path.strip_prefix("*.") {
        Some(name) => name == last,
        None => k.path == path,
    })
}

/// Ignored keys directly under `parent` (for "did you mean" suggestions).
pub fn ignored_names_under(parent: &str) -> Vec<&'static str> {
    IGNORED_KEYS
        .iter()
        .filter_map(|k| {
            let rest = if parent.is_empty() { Some(k.path) } else { k.path.strip_prefix(parent)?.strip_prefix('.') };
            rest.filter(|r| !r.contains('.') && !r.starts_with('*'))
        })
        .collect()
}

/// A value in the canonical form [`Accepts::Only`] lists.
fn canonical(node: &Node) -> String {
    match &node.value {
        Value::Scalar { text, quoted: true } => text.clone(),
        Value::Scalar { text, quoted: false } => match resolve_plain(text) {
            Resolved::Null => "null".to_string(),
            Resolved::Bool(b) => b.to_string(),
            Resolved::Int(i) => (i as f64).to_string(),
            Resolved::Float(x) => x.to_string(),
            Resolved::Str(s) => s.to_string(),
        },
        _ => node.describe(),
    }
}

fn check(rule: &IgnoredKey, path: &str, node: &Node) -> Result<()> {
    let Accepts::Only(allowed) = rule.accepts else { return Ok(()) };
    if let Value::Invalid(msg) = &node.value {
        return Err(Error::msg(format!("{}: {path}: {msg}", node.origin)));
    }
    let value = canonical(node);
    if allowed.contains(&value.as_str()) {
        return Ok(());
    }
    Err(Error::msg(format!(
        "{}: {path} is {}, but zeroconv accepts only {} here: {}",
        node.origin,
        node.describe(),
        allowed.join(" or "),
        rule.why
    )))
}

/// Removes every ignored key from the tree after checking its value, and returns their paths.
pub fn strip_ignored(root: &mut Node) -> Result<Vec<String>> {
    if let Some(defaults) = root.get("defaults") {
        return Err(Error::msg(format!(
            "{}: Hydra `defaults` lists (config composition) are not supported; give one self-contained file",
            defaults.origin
        )));
    }
    let mut found = Vec::new();
    strip_in(root, "", &mut found)?;
    Ok(found)
}

fn strip_in(node: &mut Node, path: &str, found: &mut Vec<String>) -> Result<()> {
    let Value::Map(entries) = &mut node.value else { return Ok(()) };
    let mut kept: Vec<Entry> = Vec::with_capacity(entries.len());
    for mut entry in std::mem::take(entries) {
        let here = join_path(path, &entry.key);
        match ignored_rule(&here) {
            Some(rule) => {
                check(rule, &here, &entry.value)?;
                check_nested(&here, &entry.value)?;
                found.push(here);
            }
            None => {
                strip_in(&mut entry.value, &here, found)?;
                kept.push(entry);
            }
        }
    }
    *entries = kept;
    Ok(())
}

/// Inside an ignored section, the keys that still carry a value constraint (`exp_manager.ema.enable`).
fn check_nested(path: &str, node: &Node) -> Result<()> {
    let prefix = format!("{path}.");
    for rule in IGNORED_KEYS {
        if let Some(rest) = rule.path.strip_prefix(&prefix) {
            let segments: Vec<String> = rest.split('.').map(str::to_string).collect();
            if let Some(inner) = node.lookup(&segments) {
                check(rule, rule.path, inner)?;
            }
        }
    }
    Ok(())
}

/// Merges each `params:` section that sits beside `_target_` or `target` into its parent (NeMo and legacy
/// LDM configs wrap a model's arguments this way). Returns the paths of the sections merged.
pub fn unwrap_params(root: &mut Node) -> Result<HashSet<String>> {
    let mut merged = HashSet::new();
    unwrap_in(root, "", &mut merged)?;
    Ok(merged)
}

fn unwrap_in(node: &mut Node, path: &str, merged: &mut HashSet<String>) -> Result<()> {
    let Value::Map(entries) = &mut node.value else { return Ok(()) };
    let wrapped = entries.iter().any(|e| e.key == "_target_" || e.key == "target");
    if let Some(at) = entries.iter().position(|e| e.key == "params").filter(|_| wrapped) {
        let params = entries.remove(at);
        match params.value.value {
            Value::Map(inner) => {
                for entry in inner {
                    if let Some(outer) = entries.iter().find(|e| e.key == entry.key) {
                        return Err(Error::msg(format!(
                            "{}: {} is given twice: here inside `params` and at {}",
                            entry.key_origin,
                            join_path(path, &entry.key),
                            outer.key_origin
                        )));
                    }
                    entries.push(entry);
                }
            }
            _ if params.value.is_null() => {}
            _ => {
                return Err(Error::msg(format!(
                    "{}: {}.params must be a section, found {}",
                    params.key_origin,
                    path,
                    params.value.kind()
                )))
            }
        }
        merged.insert(path.to_string());
    }
    for entry in entries.iter_mut() {
        let here = join_path(path, &entry.key);
        unwrap_in(&mut entry.value, &here, merged)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_exact_paths_and_wildcards() {
        assert_eq!(ignored_rule("model.parameterization").map(|r| r.accepts), Some(Accepts::Only(&["eps"])));
        assert!(ignored_rule("model.unet_config._target_").is_some());
        assert!(ignored_rule("model.first_stage_config.lossconfig.target").is_some());
        assert!(ignored_rule("model.unet_config.model_channels").is_none());
        assert!(ignored_rule("trainer.parameterization").is_none());
        let under_trainer = ignored_names_under("trainer");
        assert!(under_trainer.contains(&"logger") && !under_trainer.contains(&"parameterization"));
        assert!(ignored_names_under("").contains(&"hydra"));
    }

    #[test]
    fn every_rule_is_unique_and_explained() {
        let mut paths: Vec<&str> = IGNORED_KEYS.iter().map(|k| k.path).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), IGNORED_KEYS.len());
        assert!(IGNORED_KEYS.iter().all(|k| !k.why.is_empty()));
    }
}
