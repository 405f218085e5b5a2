//! The `zeroconv` command line. Each subcommand's options live next to its implementation in
//! `app/cli/` (a `clap::Args` struct); this file only routes.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use zeroconv::app::cli::bench_ops::BenchOpsArgs;
use zeroconv::app::cli::dataset::{self, DatasetCommand};
use zeroconv::app::cli::{bench_train, export, forward, inspect, kernels, launch, profile, sample, tokenize, train};
use zeroconv::engine::bench_ops;
use zeroconv::Result;

#[derive(Debug, Parser)]
#[command(name = "zeroconv", version, about = "Train ControlNets with the whole training step compiled as one graph")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a ControlNet (with no config: the built-in demo on synthetic shapes).
    Train(train::TrainArgs),
    /// Generate images that follow a control map.
    Sample(sample::SampleArgs),
    /// Print each component's parameter count and memory for a config (nothing runs).
    Inspect(inspect::InspectArgs),
    /// The parity tool: run a model part on given weights and inputs, write its outputs (and gradients).
    Forward(forward::ForwardArgs),
    /// WebDataset shards: check, make, bench.
    Dataset {
        #[command(subcommand)]
        command: DatasetCommand,
    },
    /// Measure the training step and kernels on this machine.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Time every kernel of the training step: a table, a Chrome trace and IR dumps.
    Profile(profile::ProfileArgs),
    /// CUDA kernels: ptxas reports, generated fused kernels.
    #[command(subcommand)]
    Kernels(kernels::KernelsCommand),
    /// Print how the config's tokenizer cuts captions: ids, tokens, and whether max_length cut them.
    Tokenize(tokenize::TokenizeArgs),
    /// Write a trained ControlNet in the original layout or as a diffusers ControlNetModel folder.
    Export(export::ExportArgs),
    /// Data parallel without torchrun: start one process per device with torchrun's variables and wait for them.
    Launch(launch::LaunchArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Time the compiled training step on random inputs: samples/s and peak memory.
    Train(bench_train::BenchTrainArgs),
    /// GFLOP/s of the CPU GEMM and conv2d kernels beside this machine's measured peak.
    Ops(BenchOpsArgs),
}

fn run(cli: Cli) -> Result<()> {
    let mut stdout = std::io::stdout();
    match cli.command {
        Command::Train(args) => train::run(&args),
        Command::Sample(args) => sample::run(&args),
        Command::Inspect(args) => inspect::run(&args, &mut stdout),
        Command::Forward(args) => forward::run(&args),
        Command::Dataset { command } => dataset::run(&command),
        Command::Bench(BenchCommand::Train(args)) => bench_train::run(&args, &mut stdout),
        Command::Bench(BenchCommand::Ops(args)) => bench_ops::run(&args.options(), &mut std::io::stdout()),
        Command::Profile(args) => profile::run(&args, &mut stdout),
        Command::Kernels(cmd) => kernels::run(&cmd, &mut stdout),
        Command::Launch(args) => launch::run(&args),
        Command::Tokenize(args) => tokenize::run(&args, &mut stdout),
        Command::Export(args) => export::run(&args),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zeroconv: {e}");
            ExitCode::FAILURE
        }
    }
}
