//! `zeroconv dataset check | make | bench`: the command-line side of the WebDataset tools in `crate::io::data`
//! (their options, the reports they print); the scanning, writing and measuring live there.

use crate::io::data::bench::{bench, BenchOptions};
use crate::io::data::check::{check_shards, CheckReport};
use crate::io::data::make::{make_shards, MakeOptions};
use crate::io::data::Fields;
use crate::{Error, Result};
use std::io::Write;
use std::path::PathBuf;

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

/// Scan WebDataset shards: count the usable samples, name bad samples and damaged shards, tally image sizes.
///
/// Every sample is decoded as the loader would decode it, so `samples` is what training will see. The report goes
/// to stdout, progress to stderr.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Shards: tar files, brace patterns (`data/shard-{000000..000099}.tar`) or directories of `.tar` files.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<String>,
    /// Print one JSON object (shards, samples, bad, errors, sizes) instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// Fail (non-zero exit) when any sample is bad or any shard is damaged or missing.
    #[arg(long)]
    pub strict: bool,
    /// Member extensions that may hold the target image, in order of preference.
    #[arg(long, value_delimiter = ',', default_value = "jpg,jpeg,webp")]
    pub image_ext: Vec<String>,
    /// Member extensions that may hold the control map.
    #[arg(long, value_delimiter = ',', default_value = "png")]
    pub control_ext: Vec<String>,
    /// Member extensions that may hold the caption.
    #[arg(long, value_delimiter = ',', default_value = "txt")]
    pub caption_ext: Vec<String>,
    /// Shards scanned in parallel (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl CheckArgs {
    pub fn fields(&self) -> Fields {
        let lower = |v: &[String]| v.iter().map(|e| e.trim_start_matches('.').to_lowercase()).collect();
        Fields { image: lower(&self.image_ext), control: lower(&self.control_ext), caption: lower(&self.caption_ext) }
    }
}

/// `zeroconv dataset check`.
pub fn run_check(args: &CheckArgs) -> Result<()> {
    let report = check_shards(&args.paths, &args.fields(), args.threads, true)?;
    if args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| Error::msg(format!("JSON output: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", text_report(&report));
    }
    if args.strict && (report.bad > 0 || report.damaged_shards > 0) {
        return Err(Error::msg(format!(
            "dataset check failed: {} bad samples, {} damaged or missing shards",
            report.bad, report.damaged_shards
        )));
    }
    Ok(())
}

fn text_report(report: &CheckReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "shards:  {} ({} damaged or missing)", report.shards, report.damaged_shards);
    let _ = writeln!(out, "samples: {} usable, {} bad", report.samples, report.bad);
    let _ = writeln!(out, "read:    {:.1} MB", report.bytes as f64 / 1e6);
    for (title, sizes) in [("image sizes", &report.image_sizes), ("control map sizes", &report.control_sizes)] {
        let mut by_count: Vec<(&String, &u64)> = sizes.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let shown: Vec<String> = by_count.iter().take(8).map(|(s, n)| format!("{s} ({n})")).collect();
        let more = if by_count.len() > 8 { format!(", and {} more sizes", by_count.len() - 8) } else { String::new() };
        let _ = writeln!(out, "{title}: {}{more}", if shown.is_empty() { "none".into() } else { shown.join(", ") });
    }
    if !report.errors.is_empty() {
        let _ = writeln!(out, "problems:");
        for e in &report.errors {
            let _ = writeln!(out, "  {e}");
        }
        if report.errors_omitted > 0 {
            let _ = writeln!(out, "  ... and {} more", report.errors_omitted);
        }
    }
    out
}
/// Write WebDataset shards from a folder of image / control map / caption triples.
///
/// The folder holds either a fill50k-style `prompt.json` (lines of {"source", "target", "prompt"}) or the
/// subfolders `images/`, `controls/` and `captions/` with files matched by name.
#[derive(Debug, Clone, clap::Args)]
pub struct MakeArgs {
    /// Input folder (fill50k layout with prompt.json, or images/ controls/ captions/ subfolders).
    #[arg(value_name = "DIR")]
    pub input: PathBuf,
    /// Output shard names, with a printf-style shard number, e.g. `shards/fill50k-%06d.tar`.
    #[arg(short, long, value_name = "PATTERN")]
    pub output: String,
    /// Samples per shard.
    #[arg(long, default_value_t = 1000)]
    pub maxcount: usize,
    /// Also start a new shard before a shard would exceed this many bytes.
    #[arg(long)]
    pub maxsize: Option<u64>,
    /// JPEG quality for images that are not JPEG or WebP already and must be re-encoded.
    #[arg(long, default_value_t = 95, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub quality: u8,
    /// Stop at the first unreadable input instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// Overwrite shards that exist already (a shard is never written over one of the inputs).
    #[arg(long)]
    pub force: bool,
}

impl MakeArgs {
    pub fn options(&self) -> MakeOptions {
        let MakeArgs { input, output, maxcount, maxsize, quality, strict, force } = self.clone();
        MakeOptions { input, output, maxcount, maxsize, quality, strict, force }
    }
}

/// `zeroconv dataset make`.
pub fn run_make(args: &MakeArgs) -> Result<()> {
    let report = make_shards(&args.options(), true)?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "wrote {} samples into {} shards ({} skipped)",
        report.samples,
        report.shards.len(),
        report.skipped
    );
    if let (Some(first), Some(last)) = (report.shards.first(), report.shards.last()) {
        let _ = writeln!(out, "first shard: {}\nlast shard:  {}", first.display(), last.display());
    }
    Ok(())
}

/// Measure the loader's decode + resize + crop throughput on generated shards (640x480 JPEG q90 + PNG map).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Folder for the generated shards; existing ones are reused.
    #[arg(long, default_value = "target/bench-loader")]
    pub dir: PathBuf,
    /// Number of shards of 100 samples to generate and read.
    #[arg(long, default_value_t = 4)]
    pub shards: usize,
    /// Output resolution (square).
    #[arg(long, default_value_t = 512)]
    pub resolution: u32,
    /// Decoding threads for the "all threads" run (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Timed passes over the shards per configuration; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Print the results as one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    pub fn options(&self) -> BenchOptions {
        let BenchArgs { dir, shards, resolution, threads, repeats, json: _ } = self.clone();
        BenchOptions { dir, shards, resolution, threads, repeats }
    }
}

/// `zeroconv dataset bench`.
pub fn run_bench(args: &BenchArgs) -> Result<()> {
    let report = bench(&args.options(), true)?;
    if args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| Error::msg(format!("JSON output: {e}")))?;
        println!("{text}");
        return Ok(());
    }
    println!(
        "decode + resize + crop to {0}x{0}, {1} samples, best of {2}",
        report.resolution, report.rows[0].samples, args.repeats
    );
    println!("{:<12} {:>7} {:>10} {:>12}", "run", "threads", "seconds", "samples/s");
    for r in &report.rows {
        println!("{:<12} {:>7} {:>10.3} {:>12.1}", r.name, r.threads, r.seconds, r.samples_per_s);
    }
    let b = &report.sequential_breakdown;
    println!(
        "sequential, per sample: read {:.2} ms, decode {:.2} ms, image resize {:.2} ms, map resize {:.2} ms",
        b.read_ms, b.decode_ms, b.image_resize_ms, b.control_resize_ms
    );
    Ok(())
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
