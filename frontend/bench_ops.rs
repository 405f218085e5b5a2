//! `zeroconv bench ops`: GFLOP/s of the CPU matrix-product and convolution kernels, each beside the
//! machine's measured peak, so a figure reads as "how much of this machine does it use".
//!
//! Method: every case runs once untimed (packing buffers, page faults, clock ramp-up), then
//! `repeats` timed runs; the table shows the best run (the least disturbed by other processes) and
//! the median, and the percentage of peak uses the best, as the peak itself is a best-of figure.

use crate::engine::cpu::conv::{
    conv2d_backward_input, conv2d_backward_input_scratch_len, conv2d_backward_weight,
    conv2d_backward_weight_scratch_len, conv2d_forward, conv2d_forward_scratch_len, Conv2dShape, ConvSplit,
    ConvThreads,
};
use crate::engine::cpu::float::Float;
use crate::engine::cpu::gemm::{matmul, GemmDims, MatMut, MatRef};
use crate::engine::cpu::peak::{measure_bandwidth, measure_peak_f32, PeakFlops};
use crate::error::{Error, Result};
use std::io::Write;
use std::time::{Duration, Instant};

/// Options of `zeroconv bench ops`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchOpsArgs {
    /// Square GEMM sizes to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [256, 512, 1024, 1536, 2048])]
    pub sizes: Vec<usize>,
    /// Threads to use (default: every core the OS gives this process).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed runs per case, after one untimed warm-up run.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Skip the convolution section.
    #[arg(long)]
    pub no_conv: bool,
}

/// Runs the benchmark and writes its report to `out`.
pub fn run(args: &BenchOpsArgs, out: &mut (dyn Write + Send)) -> Result<()> {
    if let Some(bad) = args.sizes.iter().find(|&&s| s == 0) {
        return Err(Error::msg(format!("--sizes: {bad} is not a matrix size (must be at least 1)")));
    }
    if args.repeats == 0 {
        return Err(Error::msg("--repeats must be at least 1"));
    }
    let threads = match args.threads {
        Some(0) => return Err(Error::msg("--threads must be at least 1")),
        Some(t) => t,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::msg(format!("cannot start {threads} worker threads: {e}")))?;
    pool.install(|| report(args, threads, out))
}

fn report(args: &BenchOpsArgs, threads: usize, out: &mut dyn Write) -> Result<()> {
    let peak = measure_peak_f32(threads, args.repeats);
    // 256 MiB per array: far beyond any last-level cache this will run on.
    let bandwidth = measure_bandwidth(threads, 256 << 20, args.repeats);
    line(out, format_args!("zeroconv bench ops: {threads} thread(s); best of {} runs after 1 warm-up", args.repeats))?;
    line(
        out,
        format_args!(
            "peak f32: {:.1} GFLOP/s ({}, {} threads); memory: {:.1} GB/s (triad, 3 x {} MiB)",
            peak.gflops(),
            peak.isa.name(),
            peak.threads,
            bandwidth.gb_per_s(),
            bandwidth.array_bytes >> 20
        ),
    )?;
    line(out, format_args!(""))?;
    gemm_section(args, threads, &peak, out)?;
    if !args.no_conv {
        line(out, format_args!(""))?;
        conv_section(args, threads, &peak, out)?;
    }
    Ok(())
}

fn gemm_section(args: &BenchOpsArgs, threads: usize, peak: &PeakFlops, out: &mut dyn Write) -> Result<()> {
    line(out, format_args!("GEMM C = A·B, row-major, square"))?;
    line(
        out,
        format_args!(
            "{:<6} {:>6} {:>10} {:>14} {:>16} {:>8}",
            "dtype", "size", "best ms", "best GFLOP/s", "median GFLOP/s", "% peak"
        ),
    )?;
    for &size in &args.sizes {
        let t = time_gemm::<f32>(size, threads, args.repeats)?;
        gemm_row(out, "f32", size, &t, peak.flops_per_s)?;
    }
    // f64 runs at half the f32 lane count, so its peak is taken as half the f32 peak.
    let f64_size = args.sizes.iter().copied().filter(|&s| s <= 1024).max().unwrap_or(args.sizes[0]);
    let t = time_gemm::<f64>(f64_size, threads, args.repeats)?;
    gemm_row(out, "f64", f64_size, &t, peak.flops_per_s / 2.0)?;
    line(out, format_args!("(f64 % is of half the f32 peak: the same FMA units on half as many lanes)"))
}

fn gemm_row(out: &mut dyn Write, dtype: &str, size: usize, t: &Timing, peak: f64) -> Result<()> {
    line(
        out,
        format_args!(
            "{:<6} {:>6} {:>10.2} {:>14.1} {:>16.1} {:>7.1}%",
            dtype,
            size,
            t.best.as_secs_f64() * 1e3,
            t.best_gflops(),
            t.median_gflops(),
            100.0 * t.best_gflops() * 1e9 / peak
        ),
    )
}

fn time_gemm<T: Float>(size: usize, threads: usize, repeats: usize) -> Result<Timing> {
    let a = filled::<T>(size * size, 1);
    let b = filled::<T>(size * size, 2);
    let mut c = vec![T::ZERO; size * size];
    let dims = GemmDims::new(size, size, size);
    time(dims.flops(), repeats, || {
        matmul(dims, MatRef::new(&a, size), MatRef::new(&b, size), MatMut::new(&mut c, size), false, threads)
    })
}

/// Convolution shapes from Stable Diffusion 1.5's U-Net at training batch 2.
fn conv_cases() -> Vec<(&'static str, Conv2dShape)> {
    let conv3 = |n, c, o, hw, stride| Conv2dShape { n, c, h: hw, w: hw, o, kh: 3, kw: 3, stride, padding: 1 };
    vec![
        ("64->64 32x32 3x3", conv3(2, 64, 64, 32, 1)),
        ("128->128 16x16 3x3", conv3(2, 128, 128, 16, 1)),
        ("320->320 64x64 3x3", conv3(2, 320, 320, 64, 1)),
        ("320->320 64x64 3x3 s2", conv3(2, 320, 320, 64, 2)),
        ("640->320 32x32 1x1", Conv2dShape { n: 2, c: 640, h: 32, w: 32, o: 320, kh: 1, kw: 1, stride: 1, padding: 0 }),
        ("N=3 128->128 32x32 3x3", conv3(3, 128, 128, 32, 1)),
    ]
}

fn conv_section(args: &BenchOpsArgs, threads: usize, peak: &PeakFlops, out: &mut dyn Write) -> Result<()> {
    line(out, format_args!("conv2d f32, NCHW, N=2 unless named; GFLOP/s of the best run (% of peak)"))?;
    line(out, format_args!("split: images = whole images per thread, gemm = threads inside each product"))?;
    line(
        out,
        format_args!(
            "{:<24} {:<7} {:>8} {:>17} {:>17} {:>17}",
            "shape", "split", "GFLOP", "forward", "backward-input", "backward-weight"
        ),
    )?;
    let splits: &[(&str, ConvSplit)] = if threads > 1 {
        &[("images", ConvSplit::AcrossImages), ("gemm", ConvSplit::InsideGemm), ("auto", ConvSplit::Auto)]
    } else {
        &[("auto", ConvSplit::Auto)]
    };
    for (name, shape) in conv_cases() {
        for &(split_name, split) in splits {
            let conv_threads = ConvThreads { threads, split };
            let passes = time_conv(&shape, conv_threads, args.repeats)?;
            let cell = |t: &Timing| format!("{:.1} ({:.0}%)", t.best_gflops(), 100.0 * t.best_gflops() / peak.gflops());
            line(
                out,
                format_args!(
                    "{:<24} {:<7} {:>8.2} {:>17} {:>17} {:>17}",
                    name,
                    split_name,
                    shape.flops() * 1e-9,
                    cell(&passes[0]),
                    cell(&passes[1]),
                    cell(&passes[2])
                ),
            )?;
        }
    }
    Ok(())
}

/// Forward, backward-input and backward-weight timings of one shape.
fn time_conv(shape: &Conv2dShape, threads: ConvThreads, repeats: usize) -> Result<[Timing; 3]> {
    let x = filled::<f32>(shape.x_len(), 3);
    let w = filled::<f32>(shape.weight_len(), 4);
    let bias = filled::<f32>(shape.o, 5);
    let dy = filled::<f32>(shape.y_len(), 6);
    let mut y = vec![0.0f32; shape.y_len()];
    let mut dx = vec![0.0f32; shape.x_len()];
    let mut dw = vec![0.0f32; shape.weight_len()];
    let scratch_len = conv2d_forward_scratch_len(shape, threads)
        .max(conv2d_backward_input_scratch_len(shape, threads))
        .max(conv2d_backward_weight_scratch_len(shape, threads));
    let mut scratch = vec![0.0f32; scratch_len];
    let flops = shape.flops();
    let forward = time(flops, repeats, || conv2d_forward(shape, &x, &w, Some(&bias), &mut y, &mut scratch, threads))?;
    let backward_input =
        time(flops, repeats, || conv2d_backward_input(shape, &dy, &w, &mut dx, &mut scratch, threads))?;
    let backward_weight =
        time(flops, repeats, || conv2d_backward_weight(shape, &x, &dy, &mut dw, &mut scratch, threads))?;
    Ok([forward, backward_input, backward_weight])
}

/// Timed runs of one case.
struct Timing {
    flops: f64,
    best: Duration,
    median: Duration,
}

impl Timing {
    fn best_gflops(&self) -> f64 {
        self.flops / self.best.as_secs_f64() * 1e-9
    }
    fn median_gflops(&self) -> f64 {
        self.flops / self.median.as_secs_f64() * 1e-9
    }
}

fn time(flops: f64, repeats: usize, mut run: impl FnMut() -> Result<()>) -> Result<Timing> {
    run()?;
    let mut runs = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        run()?;
        runs.push(start.elapsed());
    }
    runs.sort();
    Ok(Timing { flops, best: runs[0], median: runs[runs.len() / 2] })
}

/// Deterministic values in [-1, 1): a product of them neither overflows nor goes denormal.
fn filled<T: Float>(len: usize, seed: u64) -> Vec<T> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            // xorshift64: cheap, and good enough to avoid any structure a kernel could exploit.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            T::from_f64((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
        })
        .collect()
}

fn line(out: &mut dyn Write, args: std::fmt::Arguments<'_>) -> Result<()> {
    writeln!(out, "{args}").map_err(|e| Error::msg(format!("cannot write the report: {e}")))
}
