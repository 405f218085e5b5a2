//! WebDataset shards: reading, checking, writing and loading them for training.
//!
//! A shard is an uncompressed tar file; consecutive members sharing a key (`000123.jpg`, `000123.png`,
//! `000123.txt`) form one sample: the target image, the control map and the caption.
//!
//! - [`tar`]: streaming tar reader and writer.
//! - [`shards`]: shard paths, brace patterns and directories.
//! - [`group`]: members → samples.
//! - [`decode`]: samples → RGB images and caption; [`transform`]: resize, crop, flip, CHW `f32`.
//! - [`loader`]: the deterministic, resumable, multi-threaded loader, built on [`shuffle`] (the shuffle buffer),
//!   [`rng`] (seed-derived random streams) and [`pool`] (recycled pixel buffers).
//! - [`check`], [`make`], [`bench`](mod@bench): the `zeroconv dataset ...` commands.

pub mod bench;
pub mod check;
pub mod complete;
pub mod decode;
pub mod group;
pub mod loader;
pub mod make;
pub mod pool;
pub mod rng;
pub mod shards;
pub mod shuffle;
pub mod tar;
pub mod transform;

pub use bench::{run_bench, BenchArgs};
pub use check::{run_check, CheckArgs};
pub use decode::Fields;
pub use loader::{Batch, Loader, LoaderConfig, LoaderState, LoaderStats, Sample, SampleStream, SplitMode};
pub use make::{run_make, MakeArgs};
pub use transform::Filter;

/// The `zeroconv dataset` subcommands, ready to nest in the CLI:
/// `Dataset { #[command(subcommand)] command: DatasetCommand }`, then `data::run(&command)`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DatasetCommand {
    /// Scan shards: samples, bad samples with reasons, damaged shards, image sizes.
    Check(CheckArgs),
    /// Write shards from a folder of image / control map / caption triples (or fill50k's prompt.json).
    Make(MakeArgs),
    /// Measure decode + resize + crop throughput on generated shards.
    Bench(BenchArgs),
}

/// Runs one `zeroconv dataset` subcommand.
pub fn run(command: &DatasetCommand) -> crate::Result<()> {
    match command {
        DatasetCommand::Check(args) => run_check(args),
        DatasetCommand::Make(args) => run_make(args),
        DatasetCommand::Bench(args) => run_bench(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: DatasetCommand,
    }

    #[test]
    fn cli_definitions_are_valid_and_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["zeroconv", "check", "a.tar", "d/s-{0..3}.tar", "--json", "--strict"]).unwrap();
        let DatasetCommand::Check(args) = cli.command else { panic!("not check") };
        assert_eq!(args.paths, ["a.tar", "d/s-{0..3}.tar"]);
        assert!(args.json && args.strict);
        assert_eq!(args.fields(), Fields::default());
        let cli = Cli::try_parse_from(["zeroconv", "make", "in", "-o", "out/%06d.tar", "--maxcount", "50"]).unwrap();
        assert!(matches!(cli.command, DatasetCommand::Make(MakeArgs { maxcount: 50, .. })));
        let cli = Cli::try_parse_from(["zeroconv", "bench", "--shards", "2"]).unwrap();
        assert!(matches!(cli.command, DatasetCommand::Bench(BenchArgs { shards: 2, resolution: 512, .. })));
        assert!(Cli::try_parse_from(["zeroconv", "check"]).is_err(), "check needs a path");
    }
}
