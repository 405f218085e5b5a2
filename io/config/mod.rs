//! NeMo-style YAML configs with Hydra-style command-line overrides.
//!
//! ```no_run
//! use std::path::Path;
//! use zeroconv::io::config::{load_config, Config};
//!
//! // `zeroconv train --config configs/controlnet_sd15.yaml trainer.precision=bf16 model.micro_batch_size=8`
//! let overrides = vec!["trainer.precision=bf16".to_string(), "model.micro_batch_size=8".to_string()];
//! let config: Config = load_config(Some(Path::new("configs/controlnet_sd15.yaml")), &overrides)?;
//! // `zeroconv train` with no file: the tiny config compiled into the binary (overrides still apply).
//! let tiny = load_config(None, &[])?;
//! assert_eq!(tiny, Config::builtin_tiny());
//! # Ok::<(), zeroconv::Error>(())
//! ```
//!
//! Loading runs these steps, each in its own module:
//! 1. [`yaml`]: the file to an untyped tree that remembers each value's text, quoting and `file:line:col`;
//! 2. [`nemo::unwrap_params`]: NeMo's `_target_` + `params:` wrappers merged into their sections;
//! 3. [`overrides`]: the command-line overrides, in order;
//! 4. [`interpolate`]: OmegaConf `${...}` references;
//! 5. [`text_encoder`]: the text encoder's family (CLIP or OpenCLIP, from `cond_stage_config._target_` or `arch`)
//!    and the keys it implies;
//! 6. [`nemo::strip_ignored`]: the NeMo keys zeroconv accepts without reading, each checked against the
//!    values zeroconv supports;
//! 7. [`de`]: the typed [`Config`] (serde), where an unknown key or a wrong type is one error naming the full
//!    dotted key, its position and the nearest valid key;
//! 8. [`validate`]: checks across keys (the ControlNet mirrors the U-Net, channel counts fit GroupNorm, ...).

mod de;
mod emit;
mod interpolate;
mod megatron_clip;
pub mod model_config;
pub mod nemo;
mod node;
mod overrides;
mod scalar;
mod schema;
mod text_encoder;
mod validate;
mod values;
mod yaml;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use nemo::{Accepts, IgnoredKey, IGNORED_KEYS};
pub use schema::*;
pub use values::{
    Accelerator, ClipLayer, CropSize, HiddenAct, Interpolation, OptimizerName, Precision, SamplerName, SchedulerName,
    TextCleanup, ValCheckInterval,
};

use crate::error::{Error, Result};
use node::{join_path, Node, Origin, Value};

/// The tiny configuration, compiled in: `zeroconv train` with no config file trains it.
pub const TINY_YAML: &str = include_str!("../../configs/tiny.yaml");
const TINY_SOURCE: &str = "built-in configs/tiny.yaml";

/// What loading found besides the config itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// The file name (or the built-in config's name).
    pub source: String,
    /// Dotted paths of the NeMo keys that were present and accepted without being read.
    pub ignored_keys: Vec<String>,
}

/// Loads a config file (`None`: the built-in tiny config) and applies Hydra-style overrides
/// (`key=value`, `+key=value`, `++key=value`, `~key`), in order. Every error is one line naming the key,
/// and the file position or override it came from.
pub fn load_config(path: Option<&Path>, overrides: &[String]) -> Result<Config> {
    load_config_with_report(path, overrides).map(|(config, _)| config)
}

/// [`load_config`], also telling which NeMo keys were accepted without being read (for a verbose log).
pub fn load_config_with_report(path: Option<&Path>, overrides: &[String]) -> Result<(Config, LoadReport)> {
    match path {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read the config: {e}")))?;
            load_text(&text, &path.display().to_string(), overrides)
        }
        None => load_text(TINY_YAML, TINY_SOURCE, overrides),
    }
}

fn load_text(text: &str, source: &str, overrides: &[String]) -> Result<(Config, LoadReport)> {
    let mut tree = yaml::parse_document(text, &Arc::from(source))?;
    let unwrapped = nemo::unwrap_params(&mut tree)?;
    for text in overrides {
        let parsed = overrides::parse(text)?;
        overrides::apply(&mut tree, &parsed, &unwrapped)?;
    }
    let mut tree = interpolate::resolve(&tree);
    text_encoder::resolve(&mut tree)?;
    let ignored_keys = nemo::strip_ignored(&mut tree)?;
    let config: Config = de::from_node(&tree)?;
    if let Err(problem) = validate::validate(&config) {
        let mut origins = HashMap::new();
        collect_origins(&tree, "", &mut origins);
        let location = origins.get(&problem.path).map_or_else(String::new, |o: &Origin| format!("{o}: "));
        return Err(Error::msg(format!("{location}{}: {}", problem.path, problem.msg)));
    }
    Ok((config, LoadReport { source: source.to_string(), ignored_keys }))
}

fn collect_origins(node: &Node, path: &str, out: &mut HashMap<String, Origin>) {
    out.insert(path.to_string(), node.origin.clone());
    if let Value::Map(entries) = &node.value {
        for entry in entries {
            collect_origins(&entry.value, &join_path(path, &entry.key), out);
        }
    }
}

impl Config {
    /// The tiny configuration compiled into the binary (`configs/tiny.yaml`).
    pub fn builtin_tiny() -> Config {
        // The file is part of the binary and a test loads it, so failing here is a build defect, not bad input.
        load_text(TINY_YAML, TINY_SOURCE, &[]).map(|(c, _)| c).expect("the built-in configs/tiny.yaml is valid")
    }

    /// Loads a config from YAML text; `source` names it in errors.
    pub fn from_yaml_str(text: &str, source: &str, overrides: &[String]) -> Result<Config> {
        load_text(text, source, overrides).map(|(c, _)| c)
    }

    /// The config as YAML, every key written out (defaults included). It loads back to the same config.
    pub fn to_yaml(&self) -> String {
        match serde_json::to_value(self) {
            Ok(value) => emit::to_yaml(&value),
            Err(e) => format!("# the config could not be written: {e}\n"),
        }
    }

    /// Every key the typed config reads, as dotted paths (leaves only).
    pub fn key_paths() -> Vec<String> {
        let mut full = Config::default();
        // Optional sections are listed with their keys.
        full.model.optim.sched = Some(SchedConfig::default());
        full.model.cond_stage_config.megatron = Some(MegatronTextConfig { megatron_legacy: true, vocab_padding: 128 });
        let mut paths = Vec::new();
        if let Ok(value) = serde_json::to_value(&full) {
            collect_leaf_paths(&value, "", &mut paths);
        }
        paths
    }

    /// Processes training in data parallel: devices × nodes.
    pub fn data_parallel_size(&self) -> u32 {
        self.trainer.devices.saturating_mul(self.trainer.num_nodes)
    }

    /// Samples per optimizer step, over all processes.
    pub fn global_batch_size(&self) -> u32 {
        self.model.global_batch_size.unwrap_or_else(|| {
            self.model.micro_batch_size * self.data_parallel_size() * self.trainer.accumulate_grad_batches
        })
    }

    /// Micro-batches accumulated per optimizer step in each process.
    pub fn grad_accumulation(&self) -> u32 {
        match self.model.global_batch_size {
            Some(global) => global / (self.model.micro_batch_size * self.data_parallel_size()).max(1),
            None => self.trainer.accumulate_grad_batches,
        }
    }

    /// The checkpoint to resume from, whichever of the two NeMo keys gives it.
    pub fn resume_checkpoint(&self) -> Option<&Path> {
        self.exp_manager.resume_from_checkpoint.as_deref().or(self.model.resume_from_checkpoint.as_deref())
    }

    /// Seed of the data order and augmentations.
    pub fn data_seed(&self) -> u64 {
        self.model.data.seed.unwrap_or(self.model.seed)
    }

    /// This run's directory: explicit_log_dir, or exp_dir/name (exp_dir defaults to ./zeroconv_experiments).
    pub fn run_dir(&self) -> PathBuf {
        let e = &self.exp_manager;
        e.explicit_log_dir
            .clone()
            .unwrap_or_else(|| e.exp_dir.clone().unwrap_or_else(|| PathBuf::from("zeroconv_experiments")).join(&e.name))
    }
}

fn collect_leaf_paths(value: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, inner) in map {
                collect_leaf_paths(inner, &join_path(path, key), out);
            }
        }
        _ => out.push(path.to_string()),
    }
}
