//! The subcommands of the `zeroconv` binary: each module holds one command's arguments (a
//! `clap::Args` struct with its `--help` text) and its `run` function. `app/main.rs` routes.

pub mod bench_ops;
pub mod bench_train;
pub mod dataset;
pub mod export;
pub mod forward;
pub mod inspect;
pub mod kernels;
pub mod launch;
pub mod profile;
pub mod sample;
pub mod tokenize;
pub mod train;

use crate::error::Result;
use crate::io::config::{load_config, Config};
use std::path::PathBuf;

/// The value parser of every count, size, seed and port flag: a whole number, with a clear word for a negative
/// one (clap would otherwise take `-5` for a flag and suggest `-- -5`, which passes it as a config override).
pub fn whole<T: std::str::FromStr>(s: &str) -> std::result::Result<T, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!("{s} is negative; give a whole number (0 or more, within the flag's range)"));
    }
    s.trim().parse().map_err(|_| format!("{s} is not a whole number in the flag's range"))
}

/// `--config FILE` plus Hydra-style `key.path=value` overrides, shared by every command that
/// reads a config.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// A NeMo-style YAML config (e.g. configs/controlnet_sd15.yaml). Without it: the built-in tiny config.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Overrides applied after the file, in order: `model.sd_locked=False trainer.precision=bf16 ...`
    #[arg(value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

impl ConfigArgs {
    pub fn load(&self) -> Result<Config> {
        load_config(self.config.as_deref(), &self.overrides)
    }
}

/// The process's peak resident memory (VmHWM), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
