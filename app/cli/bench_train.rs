//! `zeroconv bench train`: times the compiled training step on random inputs after a warm-up
//! and prints samples/s and peak memory; the last line is the figure, ending in `samples/s`.

use super::{peak_rss_bytes, ConfigArgs};
use crate::app::device::{compile_program, DeviceChoice, DeviceProgram};
use crate::app::step::{self, StepGraph};
use crate::app::weights::init_params;
use crate::engine::host_memory::human_bytes;
use crate::engine::{HostTensor, Program};
use crate::error::Result;
use crate::graph::optim::adamw_hyper;
use crate::graph::passes::Optimized;
use crate::graph::DType;
use crate::rng::Rng;
use std::io::Write;
use std::time::Instant;

#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  zeroconv bench train --config configs/bench_small.yaml")]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Timed steps.
    #[arg(long, default_value_t = 10, allow_negative_numbers = true, value_parser = crate::app::cli::whole::<u64>)]
    pub steps: u64,
    /// Untimed steps first (caches, page faults, thread pool).
    #[arg(long, default_value_t = 2, allow_negative_numbers = true, value_parser = crate::app::cli::whole::<u64>)]
    pub warmup: u64,
    /// CPU threads (default: one per core).
    #[arg(long, allow_negative_numbers = true, value_parser = crate::app::cli::whole::<usize>)]
    pub threads: Option<usize>,
    /// Where the step runs: cpu, cuda (a GPU) or cuda-emu (the CUDA executor under emulation on the
    /// CPU: slow, for checking).
    /// Default: the config's trainer.accelerator (auto: the GPU when one is usable, else the CPU).
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
}

/// A compiled training step with random weights and random inputs, ready to launch.
pub struct ReadyStep {
    pub step: StepGraph,
    pub opt: Optimized,
    pub prog: DeviceProgram,
    pub compile_secs: f64,
}

/// Builds, optimises and compiles the latent-space training step of a config for `device`, then fills the
/// parameters and inputs with random values.
pub fn prepare(cfg: &crate::io::config::Config, threads: Option<usize>, device: DeviceChoice) -> Result<ReadyStep> {
    device.check_available()?;
    let t0 = Instant::now();
    let st = step::latent_step(cfg, cfg.model.micro_batch_size as usize)?;
    let opt = step::optimize(cfg, &st, false)?;
    let options = crate::app::train::compile_options(cfg, threads)?;
    let mut prog = compile_program(device, opt.graph.clone(), &options)?;
    let compile_secs = t0.elapsed().as_secs_f64();
    init_params(&mut prog, &opt.map, &st.params, 1)?;
    let mut rng = Rng::new(2);
    for name in ["x", "context", "hint", "target"] {
        let Some(v) = prog.graph().find(name) else { continue };
        let val = prog.graph().value(v).clone();
        let data: Vec<f64> =
            (0..val.shape.numel()).map(|_| if name == "hint" { rng.uniform() } else { rng.normal() }).collect();
        prog.upload(v, &HostTensor::from_f64(val.shape.clone(), val.dtype, &data)?)?;
    }
    if let Some(t) = prog.graph().find("t") {
        let n = prog.graph().shape(t).numel();
        let ts: Vec<f64> = (0..n).map(|_| rng.below(1000) as f64).collect();
        prog.upload(t, &HostTensor::from_f64([n], DType::I64, &ts)?)?;
    }
    Ok(ReadyStep { step: st, opt, prog, compile_secs })
}

/// Uploads step `t`'s optimizer hyper-parameters and runs one step.
pub fn run_step(r: &mut ReadyStep, cfg: &crate::io::config::Config, t: u64) -> Result<()> {
    let h = adamw_hyper(&step::adamw_config(cfg), cfg.model.optim.lr, t);
    let hyper = r.opt.map.get(r.step.hyper).expect("the hyper input is kept");
    r.prog.upload(hyper, &HostTensor::from_f64([3], DType::F32, &h)?)?;
    r.prog.launch()?;
    r.prog.synchronize()
}

pub fn run(args: &BenchTrainArgs, out: &mut dyn Write) -> Result<()> {
    if let Some(d) = args.device {
        d.check_available()?;
    }
    if args.steps == 0 {
        return Err(crate::Error::msg("--steps 0: bench train times at least 1 step"));
    }
    let cfg = args.config.load()?;
    let device = DeviceChoice::resolve(args.device, cfg.trainer.accelerator)?;
    let mut r = prepare(&cfg, args.threads, device)?;
    let w =
        |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(|e| crate::Error::msg(format!("stdout: {e}")));
    if device == DeviceChoice::CudaEmu {
        w(out, "device: cuda-emu (the CUDA executor under emulation on the CPU: slow, for checking)".to_string())?;
    }
    let kernels = r.prog.graph().nodes.iter().filter(|n| !n.op.is_view()).count();
    let trainable: usize = r.step.params.iter().filter(|p| p.trainable).map(|p| p.shape.numel()).sum();
    w(
        out,
        format!(
            "config: batch {}, {}x{} latents, precision {:?}, fusion {}, checkpointing {}",
            r.step.batch.batch,
            r.step.batch.latent_h,
            r.step.batch.latent_w,
            cfg.trainer.precision,
            cfg.model.inductor,
            step::pass_options(&cfg, false).checkpointing
        ),
    )?;
    let g = r.prog.graph();
    let (flops, bytes) = g.nodes.iter().fold((0.0, 0.0), |(f, b), n| {
        let c = crate::graph::cost::node_cost(g, n);
        (f + c.flops, b + c.bytes)
    });
    w(out, format!("compiled: {kernels} kernels, {trainable} trainable parameters, in {:.2} s", r.compile_secs))?;
    w(
        out,
        format!("work per step (cost model): {:.2} GFLOP, {} moved by kernels", flops / 1e9, human_bytes(bytes as u64)),
    )?;
    w(out, format!("memory plan: {}", r.prog.plan().summary()))?;
    let mut t = 1;
    for _ in 0..args.warmup {
        run_step(&mut r, &cfg, t)?;
        t += 1;
    }
    let loss_id = r.opt.map.get(r.step.loss).expect("loss is an output");
    let mut times = Vec::new();
    for _ in 0..args.steps {
        let s = Instant::now();
        run_step(&mut r, &cfg, t)?;
        times.push(s.elapsed().as_secs_f64());
        t += 1;
    }
    let loss = r.prog.download(loss_id)?.to_f64()[0];
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let batch = r.step.batch.batch as f64;
    w(out, format!("step: mean {:.4} s, best {:.4} s over {} steps (loss {loss:.5})", mean, best, times.len()))?;
    let planned = (r.prog.plan().arena_bytes + r.prog.plan().source_bytes) as f64;
    w(
        out,
        format!(
            "peak memory: planned {} (arena + parameters + optimizer state), process peak RSS {}",
            human_bytes(planned as u64),
            peak_rss_bytes().map_or("unknown".to_string(), human_bytes)
        ),
    )?;
    w(out, format!("{:.2} samples/s", batch / mean))
}
