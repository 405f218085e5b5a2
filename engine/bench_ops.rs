//! `zeroconv bench ops`: GFLOP/s of the CPU matrix-product and convolution kernels, each beside the
//! machine's measured peak, so a figure reads as "how much of this machine does it use".
//!
//! Method: every case runs once untimed (packing buffers, page faults, clock ramp-up), then
//! `repeats` timed runs; the table shows the best run (the least disturbed by other processes) and
//! the median, and the percentage of peak uses the best, as the peak itself is a best-of figure.

use crate::engine::cpu::aligned::AlignedVec;
use crate::engine::cpu::conv::{
    conv2d_backward_input, conv2d_backward_input_scratch_len, conv2d_backward_weight,
    conv2d_backward_weight_scratch_len, conv2d_forward, conv2d_forward_scratch_len, Conv2dShape, ConvMethod,
    ConvThreads,
};
use crate::engine::cpu::float::Float;
use crate::engine::cpu::gemm::{matmul, GemmDims, MatMut, MatRef};
use crate::engine::cpu::peak::{measure_bandwidth, measure_peak_f32, PeakFlops};
use crate::error::{Error, Result};
use std::io::Write;
use std::time::{Duration, Instant};

/// What `zeroconv bench ops` measures (app/cli/bench_ops.rs holds the flags; the errors name them).
#[derive(Clone, Debug)]
pub struct BenchOpsOptions {
    /// Square GEMM sizes to measure (comma-separated).
    pub sizes: Vec<usize>,
    /// Threads to use (default: every core the OS gives this process).
    pub threads: Option<usize>,
    /// Timed runs per case, after one untimed warm-up run.
    pub repeats: usize,
    /// Passes over every case; each case keeps its best run over all passes. Spreading a case's
    /// runs over time keeps a burst of other work on a shared machine from spoiling it.
    pub rounds: usize,
    /// Further passes, only over the cases that have not yet had a quiet pass (other processes
    /// using under 0.1 core), up to this many passes in all.
    pub max_rounds: usize,
    /// Skip the GEMM section.
    pub no_gemm: bool,
    /// Skip the convolution section.
    pub no_conv: bool,
    /// Only the convolution cases whose name contains this text (e.g. `hint`); all when `None`.
    pub convs: Option<String>,
}

/// Runs the benchmark and writes its report to `out`.
pub fn run(args: &BenchOpsOptions, out: &mut (dyn Write + Send)) -> Result<()> {
    if let Some(bad) = args.sizes.iter().find(|&&s| s == 0) {
        return Err(Error::msg(format!("--sizes: {bad} is not a matrix size (must be at least 1)")));
    }
    if args.sizes.is_empty() {
        return Err(Error::msg("--sizes: give at least one size"));
    }
    if args.repeats == 0 {
        return Err(Error::msg("--repeats must be at least 1"));
    }
    if args.rounds == 0 {
        return Err(Error::msg("--rounds must be at least 1"));
    }
    if args.max_rounds < args.rounds {
        return Err(Error::msg(format!("--max-rounds ({}) is below --rounds ({})", args.max_rounds, args.rounds)));
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

/// What one row of the report measures.
#[derive(Clone, Copy, Debug)]
enum Case {
    Gemm { size: usize, f64: bool },
    Conv { name: &'static str, shape: Conv2dShape, method: ConvMethod },
}

impl Case {
    fn label(&self) -> String {
        match self {
            Case::Gemm { size, f64 } => format!("{} {size}", if *f64 { "f64" } else { "f32" }),
            Case::Conv { name, method, .. } => format!("{name} / {}", method_name(*method)),
        }
    }
    fn measure(&self, threads: usize, repeats: usize) -> Result<Vec<Timing>> {
        match *self {
            Case::Gemm { size, f64: false } => Ok(vec![time_gemm::<f32>(size, threads, repeats)?]),
            Case::Gemm { size, f64: true } => Ok(vec![time_gemm::<f64>(size, threads, repeats)?]),
            Case::Conv { shape, method, .. } => {
                Ok(time_conv(&shape, ConvThreads { threads, method }, repeats)?.to_vec())
            }
        }
    }
}

fn method_name(method: ConvMethod) -> &'static str {
    match method {
        ConvMethod::AcrossImages => "images",
        ConvMethod::InsideGemm => "gemm",
        ConvMethod::Auto => "auto",
        ConvMethod::Direct => "direct",
        ConvMethod::Winograd => "winograd",
    }
}

/// Other processes using less than this many cores during a pass leave it undisturbed.
const QUIET_CORES: f64 = 0.1;

/// One row of the report: the best of every pass, kept until the end so percentages can use the
/// best peak measurement.
struct Row {
    case: Case,
    timings: Vec<Timing>,
    /// The fewest cores' worth of CPU other processes used during one of this row's passes.
    others: Option<f64>,
}

impl Row {
    fn had_quiet_pass(&self) -> bool {
        self.others.is_some_and(|o| o < QUIET_CORES)
    }
    /// Folds in another pass: each timing keeps its fastest run (other work can only slow a run).
    fn add_pass(&mut self, timings: Vec<Timing>, others: Option<f64>) {
        for (kept, new) in self.timings.iter_mut().zip(timings) {
            if new.best < kept.best {
                *kept = new;
            }
        }
        self.others = match (self.others, others) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

fn cases(args: &BenchOpsOptions, threads: usize) -> Vec<Case> {
    let mut cases = Vec::new();
    if !args.no_gemm {
        cases.extend(args.sizes.iter().map(|&size| Case::Gemm { size, f64: false }));
        let f64_size = args.sizes.iter().copied().filter(|&s| s <= 1024).max().unwrap_or(args.sizes[0]);
        cases.push(Case::Gemm { size: f64_size, f64: true });
    }
    if !args.no_conv {
        let methods: &[ConvMethod] = if threads > 1 {
            &[
                ConvMethod::AcrossImages,
                ConvMethod::InsideGemm,
                ConvMethod::Direct,
                ConvMethod::Winograd,
                ConvMethod::Auto,
            ]
        } else {
            &[ConvMethod::InsideGemm, ConvMethod::Direct, ConvMethod::Winograd, ConvMethod::Auto]
        };
        let wanted = |name: &str| args.convs.as_deref().is_none_or(|part| name.contains(part));
        for (name, shape) in conv_cases().into_iter().filter(|(name, _)| wanted(name)) {
            cases.extend(methods.iter().map(|&method| Case::Conv { name, shape, method }));
        }
    }
    cases
}

fn report(args: &BenchOpsOptions, threads: usize, out: &mut dyn Write) -> Result<()> {
    let whole_run = CpuMonitor::start();
    // 256 MiB per array: far beyond any last-level cache this will run on.
    let bandwidth = measure_bandwidth(threads, 256 << 20, args.repeats);
    let mut peaks = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    for round in 1..=args.max_rounds {
        let all_cases = cases(args, threads);
        let needed: Vec<bool> = (0..all_cases.len())
            .map(|i| round <= args.rounds || rows.get(i).is_none_or(|row| !row.had_quiet_pass()))
            .collect();
        let quiet_peak =
            peaks.iter().any(|(_, others): &(PeakFlops, Option<f64>)| others.is_some_and(|o| o < QUIET_CORES));
        if !needed.contains(&true) && quiet_peak {
            break;
        }
        peaks.push(measured_peak(threads, args.repeats));
        let mut rerun = 0;
        for (i, case) in all_cases.into_iter().enumerate() {
            if !needed[i] {
                continue;
            }
            rerun += 1;
            let monitor = CpuMonitor::start();
            let timings = case.measure(threads, args.repeats)?;
            let others = monitor.others();
            match rows.get_mut(i) {
                Some(row) => row.add_pass(timings, others),
                None => rows.push(Row { case, timings, others }),
            }
        }
        eprintln!("round {round}: measured {rerun} case(s)");
    }
    peaks.push(measured_peak(threads, args.repeats));
    let others = whole_run.others();
    let (peak, _) =
        peaks.iter().copied().max_by(|a, b| a.0.flops_per_s.total_cmp(&b.0.flops_per_s)).unwrap_or(peaks[0]);
    let peak_range = peaks.iter().map(|p| format!("{:.0}", p.0.gflops())).collect::<Vec<_>>().join(", ");
    let quietest_peak = peaks.iter().filter_map(|p| p.1).min_by(f64::total_cmp);
    let (gemm_rows, conv_rows): (Vec<Row>, Vec<Row>) =
        rows.into_iter().partition(|r| matches!(r.case, Case::Gemm { .. }));
    let unquiet = gemm_rows.iter().chain(&conv_rows).filter(|r| !r.had_quiet_pass()).count();

    line(
        out,
        format_args!(
            "zeroconv bench ops: {threads} thread(s); each case, in each pass: 1 warm-up run, then at least {} \
             timed runs (and {MIN_TIMED:?}); {} passes, more (up to {}) for cases without a quiet one; \
             best run over all passes shown with its pass's median, % of peak from the best",
            args.repeats, args.rounds, args.max_rounds
        ),
    )?;
    line(
        out,
        format_args!(
            "peak f32: {:.1} GFLOP/s ({}, {} threads; best of the measurements before each pass and at the end: \
             {}; quietest: others {})",
            peak.gflops(),
            peak.isa.name(),
            peak.threads,
            peak_range,
            cores(quietest_peak)
        ),
    )?;
    line(
        out,
        format_args!(
            "memory: {:.1} GB/s (triad a = b + s*c, 3 x {} MiB)",
            bandwidth.gb_per_s(),
            bandwidth.array_bytes >> 20
        ),
    )?;
    line(
        out,
        format_args!(
            "other processes during the run: {} (\"others\" column: the row's quietest pass); \
             {unquiet} row(s) never had a quiet pass (others < {QUIET_CORES} core)",
            cores(others)
        ),
    )?;
    if !gemm_rows.is_empty() {
        line(out, format_args!(""))?;
        print_gemm_table(&gemm_rows, peak.gflops(), out)?;
    }
    if !conv_rows.is_empty() {
        line(out, format_args!(""))?;
        print_conv_table(&conv_rows, peak.gflops(), out)?;
    }
    Ok(())
}

fn print_gemm_table(rows: &[Row], peak_gflops: f64, out: &mut dyn Write) -> Result<()> {
    line(out, format_args!("GEMM C = A·B, row-major, square, untransposed"))?;
    line(
        out,
        format_args!(
            "{:<12} {:>10} {:>14} {:>16} {:>8} {:>8}",
            "dtype size", "best ms", "best GFLOP/s", "median GFLOP/s", "% peak", "others"
        ),
    )?;
    for row in rows {
        let t = &row.timings[0];
        // f64 runs on the same FMA units with half the lanes, so its peak is half the f32 peak.
        let row_peak = if matches!(row.case, Case::Gemm { f64: true, .. }) { peak_gflops / 2.0 } else { peak_gflops };
        line(
            out,
            format_args!(
                "{:<12} {:>10.2} {:>14.1} {:>16.1} {:>7.1}% {:>8}",
                row.case.label(),
                t.best.as_secs_f64() * 1e3,
                t.best_gflops(),
                t.median_gflops(),
                100.0 * t.best_gflops() / row_peak,
                cores(row.others)
            ),
        )?;
    }
    line(out, format_args!("(f64 % is of half the f32 peak: the same FMA units on half as many lanes)"))?;
    Ok(())
}

fn print_conv_table(rows: &[Row], peak_gflops: f64, out: &mut dyn Write) -> Result<()> {
    line(out, format_args!("conv2d f32, NCHW, 3x3 pad 1 / 1x1 pad 0; GFLOP/s of the best run (% of peak)"))?;
    line(out, format_args!("method: images = im2col, whole images per thread; gemm = im2col, threads inside each product; direct = direct kernels (AVX-512, else im2col; strided backward-input by im2col); winograd = F(2x2, 3x3) (AVX-512 or AVX2) where it applies, else as direct"))?;
    line(
        out,
        format_args!(
            "{:<34} {:>6} {:>14} {:>14} {:>15} {:>7}",
            "shape / method", "GFLOP", "forward", "bwd-input", "bwd-weight", "others"
        ),
    )?;
    for row in rows {
        let cell = |t: &Timing| format!("{:.1} ({:.0}%)", t.best_gflops(), 100.0 * t.best_gflops() / peak_gflops);
        line(
            out,
            format_args!(
                "{:<34} {:>6.2} {:>14} {:>14} {:>15} {:>7}",
                row.case.label(),
                row.timings[0].flops * 1e-9,
                cell(&row.timings[0]),
                cell(&row.timings[1]),
                cell(&row.timings[2]),
                cores(row.others)
            ),
        )?;
    }
    Ok(())
}

/// The peak, and the cores' worth of CPU other processes used while it was measured.
fn measured_peak(threads: usize, repeats: usize) -> (PeakFlops, Option<f64>) {
    let monitor = CpuMonitor::start();
    let peak = measure_peak_f32(threads, repeats);
    (peak, monitor.others())
}

fn cores(others: Option<f64>) -> String {
    others.map_or_else(|| "n/a".to_string(), |c| format!("{c:.2} cores"))
}

fn time_gemm<T: Float>(size: usize, threads: usize, repeats: usize) -> Result<Timing> {
    let a = filled::<T>(size * size, 1);
    let b = filled::<T>(size * size, 2);
    let mut c = AlignedVec::<T>::zeroed(size * size);
    let dims = GemmDims::new(size, size, size);
    time(dims.flops(), repeats, || {
        matmul(dims, MatRef::new(&a, size), MatRef::new(&b, size), MatMut::new(&mut c, size), false, threads)
    })
}

/// Convolution shapes from Stable Diffusion 1.5's U-Net at training batch 2, and the hint encoder of
/// `configs/bench_small.yaml` (batch 2, 256x256 hints: few channels over large maps, 44% of that step's FLOPs).
fn conv_cases() -> Vec<(&'static str, Conv2dShape)> {
    let conv3 = |n, c, o, hw, stride| Conv2dShape { n, c, h: hw, w: hw, o, kh: 3, kw: 3, stride, padding: 1 };
    vec![
        ("hint 3->16 256x256 3x3", conv3(2, 3, 16, 256, 1)),
        ("hint 16->16 256x256 3x3", conv3(2, 16, 16, 256, 1)),
        ("hint 16->32 256x256 3x3 s2", conv3(2, 16, 32, 256, 2)),
        ("hint 32->32 128x128 3x3", conv3(2, 32, 32, 128, 1)),
        ("hint 32->96 128x128 3x3 s2", conv3(2, 32, 96, 128, 2)),
        ("hint 96->96 64x64 3x3", conv3(2, 96, 96, 64, 1)),
        ("hint 96->256 64x64 3x3 s2", conv3(2, 96, 256, 64, 2)),
        ("hint 256->64 32x32 3x3", conv3(2, 256, 64, 32, 1)),
        ("64->64 32x32 3x3", conv3(2, 64, 64, 32, 1)),
        ("128->128 16x16 3x3", conv3(2, 128, 128, 16, 1)),
        ("128->128 8x8 3x3", conv3(2, 128, 128, 8, 1)),
        ("320->320 64x64 3x3", conv3(2, 320, 320, 64, 1)),
        ("320->320 64x64 3x3 s2", conv3(2, 320, 320, 64, 2)),
        ("640->320 32x32 1x1", Conv2dShape { n: 2, c: 640, h: 32, w: 32, o: 320, kh: 1, kw: 1, stride: 1, padding: 0 }),
        ("N=3 128->128 32x32 3x3", conv3(3, 128, 128, 32, 1)),
    ]
}

/// Forward, backward-input and backward-weight timings of one shape.
fn time_conv(shape: &Conv2dShape, threads: ConvThreads, repeats: usize) -> Result<[Timing; 3]> {
    let x = filled::<f32>(shape.x_len(), 3);
    let w = filled::<f32>(shape.weight_len(), 4);
    let bias = filled::<f32>(shape.o, 5);
    let dy = filled::<f32>(shape.y_len(), 6);
    let mut y = AlignedVec::<f32>::zeroed(shape.y_len());
    let mut dx = AlignedVec::<f32>::zeroed(shape.x_len());
    let mut dw = AlignedVec::<f32>::zeroed(shape.weight_len());
    let scratch_len = conv2d_forward_scratch_len(shape, threads)
        .max(conv2d_backward_input_scratch_len(shape, threads))
        .max(conv2d_backward_weight_scratch_len(shape, threads));
    let mut scratch = AlignedVec::<f32>::zeroed(scratch_len);
    let flops = shape.flops();
    let forward = time(flops, repeats, || conv2d_forward(shape, &x, &w, Some(&bias), &mut y, &mut scratch, threads))?;
    let backward_input =
        time(flops, repeats, || conv2d_backward_input(shape, &dy, &w, &mut dx, &mut scratch, threads))?;
    let backward_weight =
        time(flops, repeats, || conv2d_backward_weight(shape, &x, &dy, &mut dw, &mut scratch, threads))?;
    Ok([forward, backward_input, backward_weight])
}

/// Timed runs of one case.
#[derive(Clone, Copy, Debug)]
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

/// Timed runs continue past `repeats` until they add up to this, so short cases get enough runs for
/// the best one to be undisturbed.
const MIN_TIMED: Duration = Duration::from_millis(200);
/// ... but no more than this many runs.
const MAX_RUNS: usize = 200;

fn time(flops: f64, repeats: usize, mut run: impl FnMut() -> Result<()>) -> Result<Timing> {
    run()?;
    let mut runs = Vec::with_capacity(repeats);
    let mut total = Duration::ZERO;
    while runs.len() < repeats || (total < MIN_TIMED && runs.len() < MAX_RUNS) {
        let start = Instant::now();
        run()?;
        let took = start.elapsed();
        total += took;
        runs.push(took);
    }
    runs.sort();
    Ok(Timing { flops, best: runs[0], median: runs[runs.len() / 2] })
}

/// Deterministic values in [-1, 1): a product of them neither overflows nor goes denormal. Aligned, as the CPU
/// program's tensors are, so a timing does not depend on where the allocator put the buffer.
fn filled<T: Float>(len: usize, seed: u64) -> AlignedVec<T> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut values = AlignedVec::zeroed(len);
    for v in values.iter_mut() {
        // xorshift64: cheap, and good enough to avoid any structure a kernel could exploit.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *v = T::from_f64((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0);
    }
    values
}

fn line(out: &mut dyn Write, args: std::fmt::Arguments<'_>) -> Result<()> {
    writeln!(out, "{args}").map_err(|e| Error::msg(format!("cannot write the report: {e}")))
}

/// CPU time other processes take while a measurement runs, from Linux's `/proc` counters: all CPU
/// time the machine spent busy (including time the hypervisor stole), minus this process's own.
/// A row measured while others held a core is not a fair figure, and the report says so.
struct CpuMonitor {
    start: Option<CpuTicks>,
}

#[derive(Clone, Copy)]
struct CpuTicks {
    machine_busy: u64,
    machine_total: u64,
    own: u64,
}

impl CpuMonitor {
    fn start() -> Self {
        CpuMonitor { start: CpuTicks::read() }
    }
    /// Average number of cores other processes kept busy since `start`, if the counters exist.
    fn others(&self) -> Option<f64> {
        let (start, end) = (self.start?, CpuTicks::read()?);
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
        let total = end.machine_total.checked_sub(start.machine_total)?;
        if total == 0 {
            return None;
        }
        let busy = end.machine_busy.saturating_sub(start.machine_busy);
        let own = end.own.saturating_sub(start.own);
        Some(busy.saturating_sub(own) as f64 / total as f64 * cpus)
    }
}

impl CpuTicks {
    fn read() -> Option<CpuTicks> {
        // First line: "cpu user nice system idle iowait irq softirq steal ...", in clock ticks.
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).map_while(|f| f.parse().ok()).collect();
        if fields.len() < 8 {
            return None;
        }
        let idle = fields[3] + fields[4];
        let busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7];
        // utime and stime are fields 14 and 15; the command name before them may contain spaces,
        // so count from the closing parenthesis.
        let own_stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let after_name = &own_stat[own_stat.rfind(')')? + 1..];
        let own: Vec<u64> = after_name.split_whitespace().skip(11).take(2).map_while(|f| f.parse().ok()).collect();
        if own.len() < 2 {
            return None;
        }
        Some(CpuTicks { machine_busy: busy, machine_total: busy + idle, own: own[0] + own[1] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> BenchOpsOptions {
        BenchOpsOptions {
            sizes: vec![8],
            threads: Some(1),
            repeats: 1,
            rounds: 1,
            max_rounds: 1,
            no_gemm: false,
            no_conv: true,
            convs: None,
        }
    }

    fn timing(ms: u64) -> Timing {
        Timing { flops: 1e9, best: Duration::from_millis(ms), median: Duration::from_millis(ms + 1) }
    }

    #[test]
    fn bad_options_are_refused_before_measuring() {
        let cases = [
            (BenchOpsOptions { sizes: vec![256, 0], ..args() }, "--sizes"),
            (BenchOpsOptions { sizes: vec![], ..args() }, "--sizes"),
            (BenchOpsOptions { threads: Some(0), ..args() }, "--threads"),
            (BenchOpsOptions { repeats: 0, ..args() }, "--repeats"),
            (BenchOpsOptions { rounds: 0, ..args() }, "--rounds"),
            (BenchOpsOptions { rounds: 3, max_rounds: 2, ..args() }, "--max-rounds"),
        ];
        for (bad, option) in cases {
            let mut out = Vec::new();
            let message = run(&bad, &mut out).expect_err(option).to_string();
            assert!(message.contains(option), "error should name {option}: {message}");
            assert!(out.is_empty(), "nothing should be measured or printed for {option}");
        }
    }

    #[test]
    fn a_row_keeps_each_timings_fastest_pass_and_its_quietest_others() {
        let case = Case::Gemm { size: 8, f64: false };
        let mut row = Row { case, timings: vec![timing(10), timing(5)], others: Some(0.9) };
        assert!(!row.had_quiet_pass());
        row.add_pass(vec![timing(7), timing(9)], Some(0.05));
        assert_eq!(row.timings[0].best, Duration::from_millis(7));
        assert_eq!(row.timings[1].best, Duration::from_millis(5));
        assert!(row.had_quiet_pass());
        row.add_pass(vec![timing(8), timing(8)], Some(1.5));
        assert_eq!(row.others, Some(0.05));
    }

    #[test]
    fn filled_values_stay_in_range_and_differ_by_seed() {
        let a = filled::<f32>(1000, 1);
        let b = filled::<f32>(1000, 2);
        assert!(a.iter().all(|x| (-1.0..1.0).contains(x)));
        assert_ne!(*a, *b);
    }
}
