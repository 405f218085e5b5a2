//! `zeroconv profile`: runs training steps with every kernel timed; prints a table per kernel
//! (name, the ops fused into it, launches, time, share of the step, bytes moved, achieved
//! GB/s or GFLOP/s), writes a Chrome trace and, with --dump-ir, the IR before and after each pass.

use super::bench_train::{prepare, run_step};
use super::ConfigArgs;
use crate::app::device::DeviceChoice;
use crate::app::step;
use crate::engine::gpu::lower::Cmd;
use crate::engine::host_memory::human_bytes;
use crate::engine::Program;
use crate::error::{Error, Result};
use crate::graph::{Graph, Op};
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  zeroconv profile --config configs/bench_small.yaml --steps 3 --dump-ir ir/\n\
  Open the trace (profile_trace.json) in https://ui.perfetto.dev or chrome://tracing.")]
pub struct ProfileArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Profiled steps (after one warm-up step).
    #[arg(long, default_value_t = 3, allow_negative_numbers = true, value_parser = crate::app::cli::whole::<u64>)]
    pub steps: u64,
    /// Where to write the Chrome trace JSON.
    #[arg(long, value_name = "FILE", default_value = "profile_trace.json")]
    pub trace: PathBuf,
    /// Write the IR before and after each pass (and the fusion decisions) into this folder.
    #[arg(long, value_name = "DIR")]
    pub dump_ir: Option<PathBuf>,
    /// Rows of the table (slowest kernels first; 0 = all).
    #[arg(long, default_value_t = 40, allow_negative_numbers = true, value_parser = crate::app::cli::whole::<usize>)]
    pub top: usize,
    #[arg(long, allow_negative_numbers = true, value_parser = crate::app::cli::whole::<usize>)]
    pub threads: Option<usize>,
    /// Where the step runs: cpu, cuda (a GPU) or cuda-emu (the CUDA executor under emulation on the
    /// CPU: slow, for checking; also lists the step's lowered device commands by kind).
    /// Default: the config's trainer.accelerator (auto: the GPU when one is usable, else the CPU).
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    /// With --device cuda-emu: one line per lowered device command of a step (`node N (op): <command>`).
    #[arg(long)]
    pub commands: bool,
}

fn io(path: &std::path::Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::file(path, e.to_string())
}

pub fn run(args: &ProfileArgs, out: &mut dyn Write) -> Result<()> {
    if let Some(d) = args.device {
        d.check_available()?;
    }
    if args.steps == 0 {
        return Err(Error::msg("--steps 0: profile times at least 1 step"));
    }
    let cfg = args.config.load()?;
    let device = DeviceChoice::resolve(args.device, cfg.trainer.accelerator)?;
    if args.commands && device != DeviceChoice::CudaEmu {
        return Err(Error::msg(format!(
            "--commands lists the CUDA executor's lowered device commands; --device {device} has none (use --device cuda-emu)"
        )));
    }
    if let Some(dir) = &args.dump_ir {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let st = step::latent_step(&cfg, cfg.model.micro_batch_size as usize)?;
        let opt = step::optimize(&cfg, &st, true)?;
        for (i, (pass, text)) in opt.dumps.iter().enumerate() {
            let p = dir.join(format!("{i:02}_{pass}.ir"));
            std::fs::write(&p, text).map_err(io(&p))?;
        }
        if let Some(report) = &opt.fusion {
            let p = dir.join("fusion.log");
            std::fs::write(&p, report.log.join("\n") + "\n").map_err(io(&p))?;
        }
        eprintln!("IR dumps written to {}", dir.display());
    }
    let mut r = prepare(&cfg, args.threads, device)?;
    run_step(&mut r, &cfg, 1)?;
    r.prog.set_profiling(true, false);
    for t in 0..args.steps {
        run_step(&mut r, &cfg, 2 + t)?;
    }
    let prof = r.prog.profile().expect("profiling is on");
    let steps = prof.steps.max(1) as f64;
    let total = prof.total().as_secs_f64();
    let w =
        |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(|e| crate::Error::msg(format!("stdout: {e}")));
    w(
        out,
        format!(
            "{} steps, {:.4} s per step in kernels, {} kernels per step",
            prof.steps,
            total / steps,
            prof.kernels.iter().filter(|k| k.launches > 0).count()
        ),
    )?;
    w(
        out,
        format!(
            "{:<38} {:<30} {:>5} {:>10} {:>7} {:>10} {:>10} {:>10}",
            "kernel", "ops", "runs", "total ms", "share", "bytes/run", "GB/s", "GFLOP/s"
        ),
    )?;
    let ranked = prof.ranked();
    let rows = if args.top == 0 { ranked.len() } else { args.top.min(ranked.len()) };
    for k in &ranked[..rows] {
        let secs = k.total.as_secs_f64();
        let per = secs / k.launches as f64;
        let mut ops = k.ops.join(" ");
        if ops.len() > 30 {
            ops.truncate(27);
            ops.push_str("...");
        }
        w(
            out,
            format!(
                "{:<38} {:<30} {:>5} {:>10.3} {:>6.1}% {:>10} {:>10.2} {:>10.2}",
                k.name,
                ops,
                k.launches,
                secs * 1e3,
                100.0 * secs / total.max(1e-12),
                human_bytes(k.cost.bytes as u64),
                k.cost.bytes / per.max(1e-12) / 1e9,
                k.cost.flops / per.max(1e-12) / 1e9
            ),
        )?;
    }
    if rows < ranked.len() {
        let rest: f64 = ranked[rows..].iter().map(|k| k.total.as_secs_f64()).sum();
        w(
            out,
            format!("... {} more kernels, {:.1}% of the time", ranked.len() - rows, 100.0 * rest / total.max(1e-12)),
        )?;
    }
    // Time by op kind, the quick answer to "where does the time go".
    let mut by_kind: std::collections::BTreeMap<String, f64> = Default::default();
    for k in &ranked {
        let product = ["conv2d", "conv2d_backward_input", "matmul"];
        let anchor = k.ops.iter().find(|o| product.contains(&o.as_str()));
        let kind = if let (true, Some(op)) = (k.name.starts_with("fused_"), anchor) {
            // A convolution or product with its epilogue: listed under its op, so the shares stay comparable.
            format!("{op} (+ epilogue)")
        } else if k.name.starts_with("fused_") {
            "fused (pointwise/norm epilogues/AdamW)".to_string()
        } else {
            k.ops[0].clone()
        };
        *by_kind.entry(kind).or_default() += k.total.as_secs_f64();
    }
    let mut kinds: Vec<(String, f64)> = by_kind.into_iter().collect();
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    w(out, "time by kind:".to_string())?;
    for (kind, t) in kinds {
        w(out, format!("  {kind:<40} {:>8.1} ms/step {:>6.1}%", t / steps * 1e3, 100.0 * t / total.max(1e-12)))?;
    }
    std::fs::write(&args.trace, prof.chrome_trace()).map_err(io(&args.trace))?;
    w(out, format!("trace: {}", args.trace.display()))?;
    if let Some(cmds) = r.prog.commands() {
        write_commands(out, r.prog.graph(), &cmds, args.commands)?;
    }
    Ok(())
}

/// The lowered device commands of one step: counts by kind, then (with `all`) one line per command.
fn write_commands(out: &mut dyn Write, g: &Graph, cmds: &[(usize, &Cmd)], all: bool) -> Result<()> {
    let w =
        |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(|e| crate::Error::msg(format!("stdout: {e}")));
    let kinds = ["launch", "gemm", "conv", "copy", "memset"];
    let counts: Vec<String> =
        kinds.iter().map(|k| format!("{k} {}", cmds.iter().filter(|(_, c)| c.kind() == *k).count())).collect();
    w(out, format!("device commands per step: {} ({})", cmds.len(), counts.join(", ")))?;
    // Which attention the executor chose (flash kernels or the composite softmax between GEMMs), by kernel name:
    // the profile table above names nodes by op, so this is where use_flash_attention shows.
    let mut attention: std::collections::BTreeMap<&str, usize> = Default::default();
    for (node, c) in cmds {
        if let (Op::Attention { .. } | Op::AttentionBackward { .. }, Cmd::Launch(l)) = (&g.nodes[*node].op, c) {
            *attention.entry(l.kernel.name.as_str()).or_default() += 1;
        }
    }
    if !attention.is_empty() {
        let names: Vec<String> = attention.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        w(out, format!("attention kernels per step: {}", names.join(", ")))?;
    }
    if all {
        for (node, c) in cmds {
            w(out, format!("node {node} ({}): {}", g.nodes[*node].op.name(), c.describe()))?;
        }
    }
    Ok(())
}
