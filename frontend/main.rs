//! The `zeroconv` command line. Each subcommand's options live next to its implementation in
//! `frontend/` (a `clap::Args` struct); this file only routes. To add a command (`train`, `sample`,
//! `forward`, `inspect`, `dataset`), add a variant to `Command` and one arm to `run`.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use zeroconv::frontend::bench_ops::{self, BenchOpsArgs};
use zeroconv::Result;

#[derive(Debug, Parser)]
#[command(name = "zeroconv", version, about = "Train ControlNets with the whole training step compiled as one graph")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure kernels and steps on this machine.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// GFLOP/s of the CPU GEMM and conv2d kernels beside this machine's measured peak.
    Ops(BenchOpsArgs),
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench(BenchCommand::Ops(args)) => bench_ops::run(&args, &mut std::io::stdout()),
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
