//! What this machine can do at best: f32 FLOP/s and memory bandwidth, measured rather than looked up,
//! so benchmarks can say what fraction of the machine a kernel uses.
//!
//! FLOP/s: every thread runs a loop of fused multiply-adds on independent accumulators, enough of
//! them to cover the FMA latency times the number of FMA pipes (Zen 4/5: 4 cycles × 2 pipes = 8; we
//! use 16 with AVX-512, 12 with AVX2 for want of registers). Nothing is loaded from memory.
//!
//! Bandwidth: a STREAM-style triad `a = b + s·c` over arrays far larger than the last-level cache,
//! split over the threads. Bytes are counted the STREAM way (two reads and one write per element;
//! the extra read a write-allocate cache does is not counted).

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// The widest FMA instruction set of this CPU: the one the FMA loop ran with, and the one Winograd's kernels
/// (`winograd.rs`) are built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2Fma,
    /// Plain Rust arithmetic, vectorised as the compiler sees fit; far from peak.
    Portable,
}

impl Isa {
    /// Whether this CPU runs it (the standard library caches what it detected).
    pub fn present(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512 | Isa::Avx2Fma => false,
            Isa::Portable => true,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "AVX-512 FMA",
            Isa::Avx2Fma => "AVX2 FMA",
            Isa::Portable => "portable",
        }
    }
}

/// The widest FMA instruction set this CPU supports.
pub fn detect_isa() -> Isa {
    [Isa::Avx512, Isa::Avx2Fma].into_iter().find(|isa| isa.present()).unwrap_or(Isa::Portable)
}

/// Measured peak f32 throughput.
#[derive(Clone, Copy, Debug)]
pub struct PeakFlops {
    pub flops_per_s: f64,
    pub threads: usize,
    pub isa: Isa,
}

impl PeakFlops {
    pub fn gflops(&self) -> f64 {
        self.flops_per_s * 1e-9
    }
}

/// Measured memory bandwidth.
#[derive(Clone, Copy, Debug)]
pub struct Bandwidth {
    pub bytes_per_s: f64,
    pub threads: usize,
    /// Size of each of the three arrays.
    pub array_bytes: usize,
}

impl Bandwidth {
    pub fn gb_per_s(&self) -> f64 {
        self.bytes_per_s * 1e-9
    }
}

/// Time each measurement aims for: long enough to swamp timer and thread start-up noise, short
/// enough that the benchmark stays quick.
const TARGET_RUN: Duration = Duration::from_millis(100);

/// Measures peak f32 FLOP/s with `threads` threads (at least 1), best of `repeats` runs after a
/// warm-up that also raises the clock.
pub fn measure_peak_f32(threads: usize, repeats: usize) -> PeakFlops {
    let threads = threads.max(1);
    let isa = detect_isa();
    // Calibrate the loop count on one thread so each run takes about TARGET_RUN.
    let mut iters: u64 = 1 << 16;
    loop {
        let start = Instant::now();
        black_box(fma_loop(isa, iters));
        let took = start.elapsed();
        if took >= TARGET_RUN / 4 {
            let scale = TARGET_RUN.as_secs_f64() / took.as_secs_f64();
            iters = ((iters as f64 * scale) as u64).max(1);
            break;
        }
        iters *= 4;
    }
    let flops_per_thread = iters as f64 * flops_per_iter(isa);
    let best = best_of(repeats.max(1), || {
        let barrier = Barrier::new(threads);
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    barrier.wait();
                    black_box(fma_loop(isa, iters));
                });
            }
        });
        start.elapsed()
    });
    PeakFlops { flops_per_s: flops_per_thread * threads as f64 / best.as_secs_f64(), threads, isa }
}

/// Measures memory bandwidth with a triad over three arrays of `array_bytes` each (use several
/// times the last-level cache), best of `repeats` runs after a warm-up pass.
pub fn measure_bandwidth(threads: usize, array_bytes: usize, repeats: usize) -> Bandwidth {
    let threads = threads.max(1);
    let len = (array_bytes / std::mem::size_of::<f32>()).max(threads);
    let chunk = len.div_ceil(threads);
    let mut a = vec![0.0f32; len];
    let b = vec![1.0f32; len];
    let c = vec![2.0f32; len];
    let scale = black_box(3.0f32);
    let mut triad = || {
        let start = Instant::now();
        std::thread::scope(|s| {
            for ((a, b), c) in a.chunks_mut(chunk).zip(b.chunks(chunk)).zip(c.chunks(chunk)) {
                s.spawn(move || {
                    for ((a, &b), &c) in a.iter_mut().zip(b).zip(c) {
                        *a = b + scale * c;
                    }
                });
            }
        });
        start.elapsed()
    };
    // The warm-up touches every page of `a` so page faults stay out of the timed runs.
    triad();
    let best = best_of(repeats.max(1), triad);
    black_box(&a);
    let bytes = 3.0 * (len * std::mem::size_of::<f32>()) as f64;
    Bandwidth { bytes_per_s: bytes / best.as_secs_f64(), threads, array_bytes: len * std::mem::size_of::<f32>() }
}

fn best_of(repeats: usize, mut run: impl FnMut() -> Duration) -> Duration {
    // One untimed run first: thread start-up, page faults, clock ramp-up.
    run();
    (0..repeats).map(|_| run()).min().unwrap_or(Duration::MAX)
}

const ACC_AVX512: usize = 16;
const ACC_AVX2: usize = 12;
const ACC_PORTABLE: usize = 16;

fn flops_per_iter(isa: Isa) -> f64 {
    // accumulators × lanes × 2 (an FMA is a multiply and an add)
    match isa {
        Isa::Avx512 => (ACC_AVX512 * 16 * 2) as f64,
        Isa::Avx2Fma => (ACC_AVX2 * 8 * 2) as f64,
        Isa::Portable => (ACC_PORTABLE * 2) as f64,
    }
}

/// `iters` rounds of `acc = acc·m + a` on every accumulator; returns their sum so the work is kept.
fn fma_loop(isa: Isa, iters: u64) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect_isa` returned Avx512 only after `is_x86_feature_detected!("avx512f")`.
        Isa::Avx512 => unsafe { x86::fma_avx512(iters) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect_isa` returned Avx2Fma only after detecting both avx2 and fma.
        Isa::Avx2Fma => unsafe { x86::fma_avx2(iters) },
        _ => fma_portable(iters),
    }
}

// The multiplier and addend keep every accumulator converging to a normal value (a/(1-m) = 1), so
// no run meets overflow or denormals, whatever the loop count.
const MUL: f32 = 0.999_9;
const ADD: f32 = 1.0e-4;

fn fma_portable(iters: u64) -> f32 {
    let mut acc = [1.0f32; ACC_PORTABLE];
    let (m, a) = (black_box(MUL), black_box(ADD));
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = *x * m + a;
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ACC_AVX2, ACC_AVX512, ADD, MUL};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma_avx512(iters: u64) -> f32 {
        let m = _mm512_set1_ps(std::hint::black_box(MUL));
        let a = _mm512_set1_ps(std::hint::black_box(ADD));
        // A fixed-size array of vectors with a fully unrolled inner loop: the compiler keeps every
        // accumulator in its own zmm register, giving 16 independent dependency chains.
        let mut acc = [_mm512_set1_ps(1.0); ACC_AVX512];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, m, a);
            }
        }
        let total = acc.iter().fold(_mm512_setzero_ps(), |s, &x| _mm512_add_ps(s, x));
        _mm512_reduce_add_ps(total)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma_avx2(iters: u64) -> f32 {
        let m = _mm256_set1_ps(std::hint::black_box(MUL));
        let a = _mm256_set1_ps(std::hint::black_box(ADD));
        let mut acc = [_mm256_set1_ps(1.0); ACC_AVX2];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, m, a);
            }
        }
        let total = acc.iter().fold(_mm256_setzero_ps(), |s, &x| _mm256_add_ps(s, x));
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds exactly the 8 floats an unaligned 256-bit store writes.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
        lanes.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every accumulator follows x ← x·m + a from 1, so each lane of every ISA's loop must hold the
    /// same value: the SIMD loops compute what the portable one does, lane for lane.
    #[test]
    fn every_fma_loop_computes_the_same_recurrence() {
        let iters = 1000;
        let mut x = 1.0f64;
        for _ in 0..iters {
            x = x * MUL as f64 + ADD as f64;
        }
        let isa = detect_isa();
        let lanes = match isa {
            Isa::Avx512 => ACC_AVX512 * 16,
            Isa::Avx2Fma => ACC_AVX2 * 8,
            Isa::Portable => ACC_PORTABLE,
        };
        for (name, total, count) in
            [("portable", fma_portable(iters), ACC_PORTABLE), (isa.name(), fma_loop(isa, iters), lanes)]
        {
            let per_lane = total as f64 / count as f64;
            assert!((per_lane - x).abs() < 1e-4, "{name}: {per_lane} per lane, expected {x}");
        }
    }

    #[test]
    fn measurements_are_positive_and_finite() {
        let peak = measure_peak_f32(1, 1);
        assert!(peak.flops_per_s.is_finite() && peak.flops_per_s > 0.0, "{peak:?}");
        let bandwidth = measure_bandwidth(2, 1 << 20, 1);
        assert!(bandwidth.bytes_per_s.is_finite() && bandwidth.bytes_per_s > 0.0, "{bandwidth:?}");
        assert_eq!(bandwidth.array_bytes, 1 << 20);
    }
}
