//! `zeroconv kernels`: the CUDA kernels of this build (ptxas reports) and the fused kernels the
//! shipped configs generate.

use crate::app::step;
use crate::error::{Error, Result};
use crate::io::config::{load_config, Config};
use crate::kernels::codegen;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Subcommand)]
pub enum KernelsCommand {
    /// Print the ptxas register/spill report of every compiled kernel (sm_90, or --arch sm80).
    Report {
        #[arg(long, default_value = "sm90")]
        arch: String,
    },
    /// Generate the CUDA source of every fused kernel the given configs' training steps produce.
    Generate {
        /// Configs to generate for (default: the shipped configs in configs/).
        #[arg(long = "config", value_name = "FILE")]
        configs: Vec<PathBuf>,
        /// Write the module here instead of printing it.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// The configs whose fused kernels are compiled at build time (`kernels/fused_generated.cu`).
pub fn shipped_configs(root: &Path) -> Vec<PathBuf> {
    vec![
        root.join("configs/tiny.yaml"),
        root.join("configs/controlnet_sd15.yaml"),
        root.join("configs/bench_small.yaml"),
    ]
}

/// The generated module for `configs`: every fused kernel of each config's training step, in
/// fp32 and in the config's own precision.
pub fn generated_module(configs: &[PathBuf]) -> Result<String> {
    let mut all = Vec::new();
    for path in configs {
        let base = load_config(Some(path), &[])?;
        for precision in ["32", "bf16-mixed"] {
            let cfg: Config =
                load_config(Some(path), &[format!("trainer.precision={precision}"), "model.inductor=True".into()])?;
            let _ = &base;
            // Two samples per step are enough: shapes do not change the generated code.
            let st = step::latent_step(&cfg, 2)?;
            let opt = step::optimize(&cfg, &st, false)?;
            all.extend(codegen::for_graph(&opt.graph)?.into_iter().map(|(_, g)| g));
        }
    }
    Ok(codegen::module_source(&all))
}

pub fn run(cmd: &KernelsCommand, out: &mut dyn Write) -> Result<()> {
    let w = |out: &mut dyn Write, s: &str| write!(out, "{s}").map_err(|e| Error::msg(format!("stdout: {e}")));
    match cmd {
        KernelsCommand::Report { arch } => {
            if !crate::kernels::compiled() {
                return Err(Error::msg(format!(
                    "this build has no compiled kernels: {}",
                    crate::kernels::build_note()
                )));
            }
            for m in crate::kernels::MODULES {
                let report = match arch.as_str() {
                    "sm80" => m.ptxas_report_sm80,
                    "sm90" => m.ptxas_report_sm90,
                    other => return Err(Error::msg(format!("--arch {other}: expected sm80 or sm90"))),
                };
                w(out, &format!("== {} ({arch})\n{report}\n", m.name))?;
            }
            Ok(())
        }
        KernelsCommand::Generate { configs, out: file } => {
            let configs = if configs.is_empty() { shipped_configs(Path::new(".")) } else { configs.clone() };
            let text = generated_module(&configs)?;
            match file {
                Some(p) => std::fs::write(p, &text).map_err(|e| Error::file(p, e.to_string())),
                None => w(out, &text),
            }
        }
    }
}
