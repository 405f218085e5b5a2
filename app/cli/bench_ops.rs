//! `zeroconv bench ops`: the flags of the CPU kernel benchmark in `crate::engine::bench_ops`.

use crate::engine::bench_ops::BenchOpsOptions;

/// Options of `zeroconv bench ops`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchOpsArgs {
    /// Square GEMM sizes to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [256, 512, 1024, 1536, 2048], allow_negative_numbers = true, value_parser = super::whole::<usize>)]
    pub sizes: Vec<usize>,
    /// Threads to use (default: every core the OS gives this process).
    #[arg(long, allow_negative_numbers = true, value_parser = super::whole::<usize>)]
    pub threads: Option<usize>,
    /// Timed runs per case, after one untimed warm-up run.
    #[arg(long, default_value_t = 5, allow_negative_numbers = true, value_parser = super::whole::<usize>)]
    pub repeats: usize,
    /// Passes over every case; each case keeps its best run over all passes. Spreading a case's
    /// runs over time keeps a burst of other work on a shared machine from spoiling it.
    #[arg(long, default_value_t = 2, allow_negative_numbers = true, value_parser = super::whole::<usize>)]
    pub rounds: usize,
    /// Further passes, only over the cases that have not yet had a quiet pass (other processes
    /// using under 0.1 core), up to this many passes in all.
    #[arg(long, default_value_t = 8, allow_negative_numbers = true, value_parser = super::whole::<usize>)]
    pub max_rounds: usize,
    /// Skip the GEMM section.
    #[arg(long)]
    pub no_gemm: bool,
    /// Skip the convolution section.
    #[arg(long)]
    pub no_conv: bool,
    /// Only the convolution cases whose name contains this text (e.g. `hint` for bench_small's hint encoder).
    #[arg(long)]
    pub convs: Option<String>,
}

impl BenchOpsArgs {
    pub fn options(&self) -> BenchOpsOptions {
        let BenchOpsArgs { sizes, threads, repeats, rounds, max_rounds, no_gemm, no_conv, convs } = self.clone();
        BenchOpsOptions { sizes, threads, repeats, rounds, max_rounds, no_gemm, no_conv, convs }
    }
}
