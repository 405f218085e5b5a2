//! Pointwise kernels, broadcasting, reductions to a shape, the MSE loss and the AdamW update.

use super::float::Float;
use super::par::{par_chunks, par_chunks_by_work, par_rows};
use crate::graph::{BinaryOp, Shape, UnaryOp};

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const INV_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

#[inline]
fn sigmoid<T: Float>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

#[inline]
pub fn unary_value<T: Float>(u: UnaryOp, x: T) -> T {
    let half = T::from_f64(0.5);
    match u {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Square => x * x,
        UnaryOp::Recip => T::ONE / x,
        UnaryOp::Silu => x * sigmoid(x),
        UnaryOp::GeluErf => half * x * (T::ONE + (x * T::from_f64(INV_SQRT_2)).erf()),
        UnaryOp::GeluTanh => {
            let u = T::from_f64(SQRT_2_OVER_PI) * (x + T::from_f64(0.044715) * x * x * x);
            half * x * (T::ONE + u.tanh())
        }
        UnaryOp::QuickGelu => x * sigmoid(T::from_f64(1.702) * x),
        UnaryOp::Relu => {
            if x > T::ZERO {
                x
            } else {
                T::ZERO
            }
        }
    }
}

/// d(unary(x))/dx.
#[inline]
pub fn unary_derivative<T: Float>(u: UnaryOp, x: T) -> T {
    let half = T::from_f64(0.5);
    match u {
        UnaryOp::Neg => -T::ONE,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => T::ONE / x,
        UnaryOp::Sqrt => half / x.sqrt(),
        UnaryOp::Square => x + x,
        UnaryOp::Recip => -T::ONE / (x * x),
        UnaryOp::Silu => {
            let s = sigmoid(x);
            s * (T::ONE + x * (T::ONE - s))
        }
        UnaryOp::GeluErf => {
            let cdf = half * (T::ONE + (x * T::from_f64(INV_SQRT_2)).erf());
            cdf + x * T::from_f64(INV_SQRT_2PI) * (-half * x * x).exp()
        }
        UnaryOp::GeluTanh => {
            let c = T::from_f64(0.044715);
            let k = T::from_f64(SQRT_2_OVER_PI);
            let t = (k * (x + c * x * x * x)).tanh();
            half * (T::ONE + t) + half * x * (T::ONE - t * t) * k * (T::ONE + T::from_f64(3.0) * c * x * x)
        }
        UnaryOp::QuickGelu => {
            let a = T::from_f64(1.702);
            let s = sigmoid(a * x);
            s + a * x * s * (T::ONE - s)
        }
        UnaryOp::Relu => {
            if x > T::ZERO {
                T::ONE
            } else {
                T::ZERO
            }
        }
    }
}

/// Views a slice of `T` as f32 when `T` is f32.
pub(crate) fn as_f32<T: Float>(x: &[T]) -> Option<&[f32]> {
    // SAFETY: only when T is f32 (same type, so same size, alignment and validity).
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) })
}

pub(crate) fn as_f32_mut<T: Float>(x: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: as `as_f32`; the exclusive borrow moves into the returned slice.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut f32, x.len()) })
}

/// The inverse of `as_f32_mut`: f32 data as `T` when `T` is f32.
pub(crate) fn from_f32_mut<T: Float>(x: &mut [f32]) -> Option<&mut [T]> {
    // SAFETY: only when T is f32 (same type); the exclusive borrow moves into the returned slice.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut T, x.len()) })
}

/// e^x for f32 without a libm call, so loops over slices vectorise: x = n·ln2 + r, |r| ≤ ln2/2,
/// e^r by its degree-7 Taylor polynomial (relative error < 3e-7), 2^n through the exponent bits.
/// Only for the sigmoid of SiLU, whose argument is clamped first (so no inf/NaN handling).
///
/// n is rounded by adding 1.5·2^23, where a float's unit in the last place is 1, so the sum's low mantissa bits
/// hold n + 2^22 as an integer: 2^n's exponent comes from those bits. (A float-to-int `as` cast would do the same,
/// but Rust's saturating cast keeps LLVM from vectorising the loop: measured 3x slower.)
#[inline(always)]
fn exp_poly(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = x.clamp(-87.0, 88.0);
    let k = x * std::f32::consts::LOG2_E + ROUND;
    let n = k - ROUND;
    let r = (x - n * 0.693_145_75) - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(k.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23)
}

/// SiLU and its backward on f32 slices: one straight loop each, which the compiler vectorises
/// (the generic per-element path calls libm's expf once per element). NaN inputs propagate.
#[inline(always)]
fn silu_loop(x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v / (1.0 + exp_poly(-v));
    }
}

#[inline(always)]
fn silu_backward_loop(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((o, &v), &d) in dx.iter_mut().zip(x).zip(dy) {
        let s = 1.0 / (1.0 + exp_poly(-v));
        *o = d * s * (1.0 + v * (1.0 - s));
    }
}

/// erf(x) for f32 without a libm call, so GELU's loops vectorise (libm's `erff` per element made GELU and its
/// backward 2-3% of bench_small's step): x·P(x²)/Q(x²) on |x| ≤ 3.95, ±1 beyond (erf(3.95) rounds to 1 in f32).
/// The rational was fitted to erf by reweighted least squares on the relative error (the fit's relative error is
/// 1.9e-9 in f64); evaluated in f32 it is within 7 units in the last place of the exact value (6.3 at 2.92; mean 0.6),
/// checked against f64 erf on a dense grid in the tests below.
#[inline(always)]
fn erf_poly(x: f32) -> f32 {
    // The fitted coefficients rounded to f32 (the first is 2/sqrt(pi), erf's slope at 0, to f32 precision).
    const P: [f32; 7] = [
        std::f32::consts::FRAC_2_SQRT_PI,
        0.185_168_82,
        0.054_274_544,
        0.003_843_335,
        3.779_282_9e-4,
        4.640_214_7e-6,
        -1.296_591_4e-8,
    ];
    const Q: [f32; 6] = [1.0, 0.497_435, 0.113_910_73, 0.015_443_618, 0.001_304_043_7, 6.269_041e-5];
    let a = x.abs().min(3.95);
    let t = a * a;
    let p = P[0] + t * (P[1] + t * (P[2] + t * (P[3] + t * (P[4] + t * (P[5] + t * P[6])))));
    let q = Q[0] + t * (Q[1] + t * (Q[2] + t * (Q[3] + t * (Q[4] + t * Q[5]))));
    // NaN stays NaN (min keeps the non-NaN operand, so take the sign and the NaN from x itself).
    let v = (a * p / q).min(1.0).copysign(x);
    if x.is_nan() {
        x
    } else {
        v
    }
}

/// GELU (the erf form) and its backward on f32 slices, as the SiLU loops.
#[inline(always)]
fn gelu_erf_loop(x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = 0.5 * v * (1.0 + erf_poly(v * INV_SQRT_2 as f32));
    }
}

#[inline(always)]
fn gelu_erf_backward_loop(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((o, &v), &d) in dx.iter_mut().zip(x).zip(dy) {
        let cdf = 0.5 * (1.0 + erf_poly(v * INV_SQRT_2 as f32));
        *o = d * (cdf + v * INV_SQRT_2PI as f32 * exp_poly(-0.5 * v * v));
    }
}

/// `y = e^(y - m)` in place with [`exp_poly`] (softmax's numerators, every `y - m` ≤ 0); below -87, where e^x is
/// under 1.7e-38 (and for a -inf mask), 0, so masked scores stay exactly 0.
#[inline(always)]
fn exp_shifted_loop(y: &mut [f32], m: f32) {
    for v in y.iter_mut() {
        let d = *v - m;
        *v = if d < -87.0 { 0.0 } else { exp_poly(d) };
    }
}

/// The widest vector unit this CPU has, detected once: the loops above are compiled again for it (the crate's
/// baseline is x86-64's SSE2, four lanes). The same operations in the same order, without FMA contraction (Rust
/// never contracts), so every width gives the same bits: results do not depend on the machine.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Simd {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

pub(crate) fn simd() -> Simd {
    static WIDTH: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *WIDTH.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Simd::Avx2;
            }
        }
        Simd::Baseline
    })
}

/// Defines `$name`, which runs `$body` compiled for the detected vector width.
macro_rules! dispatched {
    ($(#[$doc:meta])* $name:ident ($($arg:ident: $ty:ty),*) => $body:ident) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                match simd() {
                    // SAFETY: `simd()` chose this width only after detecting the feature on this CPU.
                    Simd::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Simd::Avx2 => return unsafe { avx2($($arg),*) },
                    Simd::Baseline => {}
                }
            }
            $body($($arg),*)
        }
    };
}

dispatched!(
    /// SiLU of `x` into `y`, at the CPU's vector width.
    silu_f32(x: &[f32], y: &mut [f32]) => silu_loop
);
dispatched!(
    /// SiLU's backward (`dx = dy · silu'(x)`), at the CPU's vector width.
    silu_backward_f32(x: &[f32], dy: &[f32], dx: &mut [f32]) => silu_backward_loop
);
dispatched!(
    /// `y = e^(y - m)` in place, at the CPU's vector width.
    exp_shifted_f32(y: &mut [f32], m: f32) => exp_shifted_loop
);
dispatched!(
    /// GELU (erf form) of `x` into `y`, at the CPU's vector width.
    gelu_erf_f32(x: &[f32], y: &mut [f32]) => gelu_erf_loop
);
dispatched!(
    /// GELU's backward, at the CPU's vector width.
    gelu_erf_backward_f32(x: &[f32], dy: &[f32], dx: &mut [f32]) => gelu_erf_backward_loop
);

/// `y = u(x)` through `u`'s f32 loop; false (nothing written) when `T` is not f32 or `u` has none.
pub(crate) fn unary_f32_loop<T: Float>(u: UnaryOp, x: &[T], y: &mut [T]) -> bool {
    let (Some(xf), Some(yf)) = (as_f32(x), as_f32_mut(y)) else { return false };
    match u {
        UnaryOp::Silu => silu_f32(xf, yf),
        UnaryOp::GeluErf => gelu_erf_f32(xf, yf),
        _ => return false,
    }
    true
}

/// `dx = dy · u'(x)` through `u`'s f32 loop; false (nothing written) when `T` is not f32 or `u` has none.
pub(crate) fn unary_backward_f32_loop<T: Float>(u: UnaryOp, x: &[T], dy: &[T], dx: &mut [T]) -> bool {
    let (Some(xf), Some(df), Some(of)) = (as_f32(x), as_f32(dy), as_f32_mut(dx)) else { return false };
    match u {
        UnaryOp::Silu => silu_backward_f32(xf, df, of),
        UnaryOp::GeluErf => gelu_erf_backward_f32(xf, df, of),
        _ => return false,
    }
    true
}

pub fn unary<T: Float>(u: UnaryOp, x: &[T], y: &mut [T]) {
    par_chunks(y, |start, out| {
        let xs = &x[start..start + out.len()];
        if !unary_f32_loop(u, xs, out) {
            for (o, &v) in out.iter_mut().zip(xs) {
                *o = unary_value(u, v);
            }
        }
    });
}

pub fn unary_backward<T: Float>(u: UnaryOp, x: &[T], dy: &[T], dx: &mut [T]) {
    par_chunks(dx, |start, out| {
        let n = out.len();
        let (xs, ds) = (&x[start..start + n], &dy[start..start + n]);
        if !unary_backward_f32_loop(u, xs, ds, out) {
            for ((o, &v), &d) in out.iter_mut().zip(xs).zip(ds) {
                *o = d * unary_derivative(u, v);
            }
        }
    });
}

pub fn affine<T: Float>(x: &[T], alpha: f64, beta: f64, y: &mut [T]) {
    let (a, b) = (T::from_f64(alpha), T::from_f64(beta));
    par_chunks(y, |start, out| {
        for (o, &v) in out.iter_mut().zip(&x[start..]) {
            *o = v * a + b;
        }
    });
}

pub fn fill<T: Float>(value: f64, y: &mut [T]) {
    let v = T::from_f64(value);
    par_chunks(y, |_, out| out.fill(v));
}

#[inline]
fn apply<T: Float>(b: BinaryOp, x: T, y: T) -> T {
    match b {
        BinaryOp::Add => x + y,
        BinaryOp::Sub => x - y,
        BinaryOp::Mul => x * y,
        BinaryOp::Div => x / y,
    }
}

/// The offsets, in `shape`'s own layout, of the start of output row `row` (rows run along the
/// last axis of `out`), given `shape`'s broadcast strides.
#[inline]
fn row_offset(out: &[usize], strides: &[usize], row: usize) -> usize {
    let mut rem = row;
    let mut off = 0;
    for ax in (0..out.len().saturating_sub(1)).rev() {
        let i = rem % out[ax];
        rem /= out[ax];
        off += i * strides[ax];
    }
    off
}

/// Broadcasting binary op. Rows along the last output axis are processed with a stride of 0
/// or 1 for each operand, so bias and scale broadcasts stay vectorisable.
pub fn binary<T: Float>(b: BinaryOp, x: &[T], xs: &Shape, y: &[T], ys: &Shape, out: &mut [T], os: &Shape) {
    if xs == os && ys == os {
        par_chunks(out, |start, o| {
            for ((r, &p), &q) in o.iter_mut().zip(&x[start..]).zip(&y[start..]) {
                *r = apply(b, p, q);
            }
        });
        return;
    }
    if ys.numel() == 1 && xs == os {
        let q = y[0];
        par_chunks(out, |start, o| {
            for (r, &p) in o.iter_mut().zip(&x[start..]) {
                *r = apply(b, p, q);
            }
        });
        return;
    }
    let od = os.dims();
    let (sx, sy) = (xs.broadcast_strides(os), ys.broadcast_strides(os));
    let last = od.last().copied().unwrap_or(1).max(1);
    let (lx, ly) = (sx.last().copied().unwrap_or(0), sy.last().copied().unwrap_or(0));
    par_rows(out, last, |row, o| {
        let (bx, by) = (row_offset(od, &sx, row), row_offset(od, &sy, row));
        match (lx, ly) {
            (1, 1) => {
                for ((r, &p), &q) in o.iter_mut().zip(&x[bx..bx + last]).zip(&y[by..by + last]) {
                    *r = apply(b, p, q);
                }
            }
            (1, 0) => {
                let q = y[by];
                for (r, &p) in o.iter_mut().zip(&x[bx..bx + last]) {
                    *r = apply(b, p, q);
                }
            }
            (0, 1) => {
                let p = x[bx];
                for (r, &q) in o.iter_mut().zip(&y[by..by + last]) {
                    *r = apply(b, p, q);
                }
            }
            _ => {
                for (j, r) in o.iter_mut().enumerate() {
                    *r = apply(b, x[bx + j * lx], y[by + j * ly]);
                }
            }
        }
    });
}

pub fn broadcast_to<T: Float>(x: &[T], xs: &Shape, out: &mut [T], os: &Shape) {
    let od = os.dims();
    let sx = xs.broadcast_strides(os);
    let last = od.last().copied().unwrap_or(1).max(1);
    let lx = sx.last().copied().unwrap_or(0);
    par_rows(out, last, |row, o| {
        let bx = row_offset(od, &sx, row);
        if lx == 1 {
            o.copy_from_slice(&x[bx..bx + last]);
        } else {
            o.fill(x[bx]);
        }
    });
}

/// Independent running values of the lane folds below: a fixed number, so the order of the operations, and so
/// the bits, do not depend on the machine or the thread count. 32, so that even at the crate's baseline (SSE2)
/// eight vector adders' chains run side by side: with 8 the sums waited on the adder's latency (two chains of
/// four), and `perf` showed GroupNorm's statistics and the bias gradients' plane sums as scalar `addss` loops.
const LANES: usize = 32;

/// `op` over f(i) for i in 0..n, starting from `init`, in `LANES` interleaved running values so the loop
/// vectorises (a serial sum waits on the adder's latency each element: GroupNorm's statistics ran 5-10x slower).
/// The tail is folded first, then the running values by halves (lane k with lane k + 16, ..., a fixed tree), then
/// into the tail's value: a fixed order, so the same bits on any machine and thread count. `init` must be an
/// identity of `op` (0 for +; any element for max).
#[inline(always)]
pub(super) fn fold_lanes<T: Float>(n: usize, init: T, f: impl Fn(usize) -> T, op: impl Fn(T, T) -> T) -> T {
    let mut acc = [init; LANES];
    let body = n - n % LANES;
    for i in (0..body).step_by(LANES) {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = op(*a, f(i + k));
        }
    }
    let tail = (body..n).map(&f).fold(init, &op);
    op(tail, fold_tree(acc, &op))
}

/// The running values of a lane fold combined by halves: `LANES / 2` ops that vectorise, then a quarter, ...
#[inline(always)]
fn fold_tree<T: Float>(mut acc: [T; LANES], op: impl Fn(T, T) -> T) -> T {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for k in 0..width {
            acc[k] = op(acc[k], acc[k + width]);
        }
    }
    acc[0]
}

/// Σ f(i) for i in 0..n, in lanes ([`fold_lanes`]).
#[inline(always)]
pub(super) fn sum_lanes<T: Float>(n: usize, f: impl Fn(usize) -> T) -> T {
    fold_lanes(n, T::ZERO, f, |a, b| a + b)
}

/// Σ f(a[i], b[i]) in lanes: the additions of [`sum_lanes`] in the same order, read a chunk of `LANES` at a time so
/// no element needs a bounds check and the loop vectorises.
#[inline(always)]
pub(super) fn sum_zip<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let b = &b[..a.len()];
    let (chunks_a, chunks_b) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = chunks_a.remainder().iter().zip(chunks_b.remainder()).fold(T::ZERO, |s, (&x, &y)| s + f(x, y));
    let mut acc = [T::ZERO; LANES];
    for (xa, xb) in chunks_a.zip(chunks_b) {
        for k in 0..LANES {
            acc[k] += f(xa[k], xb[k]);
        }
    }
    tail + fold_tree(acc, |x, y| x + y)
}

/// Σ f(s[i]) in lanes, as [`sum_zip`].
#[inline(always)]
pub(super) fn sum_map<T: Float>(s: &[T], f: impl Fn(T) -> T) -> T {
    sum_zip(s, s, |x, _| f(x))
}

/// Sum of a contiguous run, in lanes.
#[inline]
pub(super) fn sum_slice<T: Float>(s: &[T]) -> T {
    sum_map(s, |v| v)
}

/// Sums `x` (shape `xs`) down to `out` (shape `os`, which broadcasts to `xs`; leading axes may
/// be missing). Each output element sums its own preimage, so threads never share a write and
/// the result does not depend on the thread count. The trailing reduced axes are contiguous in
/// `x` and are summed as slices (a conv bias gradient sums whole feature maps).
pub fn sum_to<T: Float>(x: &[T], xs: &Shape, out: &mut [T], os: &Shape) {
    let xd = xs.dims();
    let pad = xd.len() - os.rank();
    let od: Vec<usize> = std::iter::repeat_n(1, pad).chain(os.dims().iter().copied()).collect();
    let xst = xs.strides();
    let reduced_axis = |a: usize| od[a] == 1 && xd[a] != 1;
    // The trailing run of reduced (or size-1) axes: one contiguous slice per step.
    let mut split = xd.len();
    while split > 0 && (reduced_axis(split - 1) || xd[split - 1] == 1) {
        split -= 1;
    }
    let inner: usize = xd[split..].iter().product();
    let kept: Vec<(usize, usize)> = (0..split).filter(|&a| !reduced_axis(a)).map(|a| (xd[a], xst[a])).collect();
    let reduced: Vec<(usize, usize)> = (0..split).filter(|&a| reduced_axis(a)).map(|a| (xd[a], xst[a])).collect();
    let count: usize = reduced.iter().map(|r| r.0).product();
    let kept_len: usize = kept.iter().map(|k| k.0).product();
    if inner == 1 && count * kept_len == x.len() && reduced.iter().all(|r| r.1 >= kept_len) {
        // Leading axes reduced, a contiguous suffix kept (a bias gradient, [B, L, D] → [D]): x is [count, D] rows
        // and each output element adds its column top to bottom, the same additions in the same order as the
        // general loop below, but a row at a time so the loop vectorises and reads x once, in order.
        par_chunks(out, |start, o| {
            o.fill(T::ZERO);
            for row in x.chunks_exact(kept_len) {
                for (r, &v) in o.iter_mut().zip(&row[start..]) {
                    *r += v;
                }
            }
        });
        return;
    }
    // Each output reads `count · inner` inputs: a few outputs over large planes (a bias gradient [N, C, H, W] → [C])
    // still spread over the threads.
    par_chunks_by_work(out, count * inner, |start, o| {
        let mut idx = vec![0usize; reduced.len()];
        for (j, r) in o.iter_mut().enumerate() {
            let mut rem = start + j;
            let mut base = 0;
            for &(size, stride) in kept.iter().rev() {
                base += (rem % size) * stride;
                rem /= size;
            }
            idx.iter_mut().for_each(|i| *i = 0);
            let mut acc = T::ZERO;
            let mut off = base;
            for _ in 0..count {
                acc += if inner == 1 { x[off] } else { sum_slice(&x[off..off + inner]) };
                // Odometer increment over the outer reduced axes, innermost first.
                for a in (0..reduced.len()).rev() {
                    idx[a] += 1;
                    off += reduced[a].1;
                    if idx[a] < reduced[a].0 {
                        break;
                    }
                    off -= reduced[a].0 * reduced[a].1;
                    idx[a] = 0;
                }
            }
            *r = acc;
        }
    });
}

pub fn mse_loss<T: Float>(a: &[T], b: &[T]) -> T {
    let n = a.len().max(1);
    let partial: f64 = super::par::par_sum(a.len(), |lo, hi| {
        let mut s = T::ZERO;
        for i in lo..hi {
            let d = a[i] - b[i];
            s += d * d;
        }
        s.to_f64()
    });
    T::from_f64(partial / n as f64)
}

pub fn mse_loss_backward<T: Float>(a: &[T], b: &[T], dloss: T, da: &mut [T]) {
    let k = dloss * T::from_f64(2.0 / a.len().max(1) as f64);
    par_chunks(da, |start, o| {
        for ((r, &p), &q) in o.iter_mut().zip(&a[start..]).zip(&b[start..]) {
            *r = (p - q) * k;
        }
    });
}

/// AdamW exactly as `torch.optim.AdamW` (non-amsgrad, non-fused): decoupled weight decay first,
/// then the bias-corrected step. `hyper` = [lr, 1/(1-beta1^t), 1/(1-beta2^t)].
#[allow(clippy::too_many_arguments)]
pub fn adamw<T: Float>(
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
    hyper: [f64; 3],
    beta1: f64,
    beta2: f64,
    eps: f64,
    wd: f64,
) {
    let [lr, bc1, bc2] = hyper;
    let (b1, b2) = (T::from_f64(beta1), T::from_f64(beta2));
    let (ob1, ob2) = (T::from_f64(1.0 - beta1), T::from_f64(1.0 - beta2));
    let decay = T::from_f64(1.0 - lr * wd);
    let step = T::from_f64(lr * bc1);
    let sqrt_bc2 = T::from_f64(bc2.sqrt());
    let eps = T::from_f64(eps);
    let n = p.len();
    let chunk = super::par::chunk_len(n);
    use rayon::prelude::*;
    p.par_chunks_mut(chunk).zip(m.par_chunks_mut(chunk)).zip(v.par_chunks_mut(chunk)).enumerate().for_each(
        |(ci, ((pc, mc), vc))| {
            let gc = &g[ci * chunk..];
            for i in 0..pc.len() {
                let gi = gc[i];
                mc[i] = b1 * mc[i] + ob1 * gi;
                vc[i] = b2 * vc[i] + ob2 * gi * gi;
                let denom = vc[i].sqrt() * sqrt_bc2 + eps;
                pc[i] = pc[i] * decay - step * mc[i] / denom;
            }
        },
    );
}

/// Gradient accumulation in place: `acc = acc + g` when `keep`, else `acc = g` (the first micro-batch of a step).
pub fn accumulate_grad<T: Float>(acc: &mut [T], g: &[T], keep: bool) {
    let chunk = super::par::chunk_len(acc.len());
    use rayon::prelude::*;
    acc.par_chunks_mut(chunk).enumerate().for_each(|(ci, ac)| {
        let gc = &g[ci * chunk..ci * chunk + ac.len()];
        if keep {
            for (a, &x) in ac.iter_mut().zip(gc) {
                *a += x;
            }
        } else {
            ac.copy_from_slice(gc);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loops compiled for this CPU's vector width give the baseline build's bits (which is what makes results
    /// independent of the machine), on ordinary values, both ends of the exp clamp, infinities and NaN.
    /// The exponent taken from the rounding sum's bits is the integer a cast gives, for every clamped argument.
    #[test]
    fn exp_poly_takes_two_to_the_n_from_the_rounding_sum() {
        let by_cast = |x: f32| {
            let x = x.clamp(-87.0, 88.0);
            let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            let r = (x - n * 0.693_145_75) - n * 1.428_606_8e-6;
            let p = 1.0
                + r * (1.0
                    + r * (0.5
                        + r * (1.0 / 6.0
                            + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
            p * f32::from_bits(((n as i32 + 127) as u32) << 23)
        };
        let mut x = -100.0f32;
        while x < 100.0 {
            assert_eq!(exp_poly(x).to_bits(), by_cast(x).to_bits(), "{x}");
            x += 0.0013;
        }
        for x in [-87.0, 88.0, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0] {
            assert_eq!(exp_poly(x).to_bits(), by_cast(x).to_bits(), "{x}");
        }
        assert!(exp_poly(f32::NAN).is_nan());
    }

    #[test]
    fn f32_loops_give_the_same_bits_at_every_vector_width() {
        let mut x: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.0) * 0.037).collect();
        x.extend([0.0, -0.0, 1e-30, -1e-30, 88.5, -88.5, 1e30, -1e30, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
        let dy: Vec<f32> = x.iter().enumerate().map(|(i, _)| 1.0 - (i % 7) as f32 * 0.3).collect();
        let same = |fast: &[f32], base: &[f32], what: &str| {
            assert!(fast.iter().zip(base).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}");
        };
        let (mut fast, mut base) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        silu_f32(&x, &mut fast);
        silu_loop(&x, &mut base);
        same(&fast, &base, "silu");
        silu_backward_f32(&x, &dy, &mut fast);
        silu_backward_loop(&x, &dy, &mut base);
        same(&fast, &base, "silu backward");
        gelu_erf_f32(&x, &mut fast);
        gelu_erf_loop(&x, &mut base);
        same(&fast, &base, "gelu");
        gelu_erf_backward_f32(&x, &dy, &mut fast);
        gelu_erf_backward_loop(&x, &dy, &mut base);
        same(&fast, &base, "gelu backward");
        let (mut fast, mut base) = (x.clone(), x.clone());
        exp_shifted_f32(&mut fast, 3.5);
        exp_shifted_loop(&mut base, 3.5);
        same(&fast, &base, "exp shifted");
    }

    /// The slice sums (`sum_zip`, `sum_map`, `sum_slice`) add in `sum_lanes`'s order, bit for bit, for lengths
    /// around the lane count and its multiples; `max_lanes`-style folds keep the exact maximum; every sum is within
    /// a few ulps of the f64 sum of the same values.
    #[test]
    fn slice_sums_add_in_the_lane_order_and_stay_near_the_f64_sum() {
        for n in [0, 1, 7, LANES - 1, LANES, LANES + 1, 3 * LANES + 5, 1000, 6144] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37) % 101) as f32 * 0.013 - 0.6).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 53) % 67) as f32 * 0.021 - 0.7).collect();
            let by_index = sum_lanes(n, |i| a[i] * b[i] - 0.25);
            let by_chunk = sum_zip(&a, &b, |x, y| x * y - 0.25);
            assert_eq!(by_index.to_bits(), by_chunk.to_bits(), "n = {n}: sum_zip");
            let squares = sum_map(&a, |x| x * x);
            assert_eq!(squares.to_bits(), sum_lanes(n, |i| a[i] * a[i]).to_bits(), "n = {n}: sum_map");
            let plain = sum_slice(&a);
            let exact: f64 = a.iter().map(|&v| v as f64).sum();
            let scale: f64 = a.iter().map(|&v| (v as f64).abs()).sum::<f64>().max(1e-30);
            assert!(((plain as f64) - exact).abs() <= 1e-6 * scale, "n = {n}: {plain} against {exact}");
            if n > 0 {
                let max = fold_lanes(n, a[0], |i| a[i], |x, y| x.max(y));
                assert_eq!(max, a.iter().copied().fold(f32::MIN, f32::max), "n = {n}: max");
            }
        }
    }

    /// The f32 erf is within 7 units in the last place of f64's erf everywhere (every f32 in [0, 4.5] with its
    /// low 7 mantissa bits cleared, about 8 million values, and tiny ones), odd, ±1 in the tails, NaN for NaN.
    #[test]
    fn erf_poly_is_within_seven_ulp_of_erf() {
        let mut worst = (0.0f64, 0.0f32);
        let mut bits = 0u32;
        while f32::from_bits(bits) <= 4.5 {
            let x = f32::from_bits(bits);
            let exact = libm::erf(x as f64);
            let ulp = {
                let e = exact as f32;
                (f32::from_bits(e.to_bits() + 1) - e) as f64
            };
            let err = (erf_poly(x) as f64 - exact).abs() / ulp.max(f32::MIN_POSITIVE as f64);
            if err > worst.0 {
                worst = (err, x);
            }
            assert_eq!(erf_poly(-x).to_bits(), (-erf_poly(x)).to_bits(), "odd at {x}");
            bits += 128;
        }
        assert!(worst.0 <= 7.0, "{} ulp at {}", worst.0, worst.1);
        for x in [5.0f32, 100.0, 1e30, f32::INFINITY] {
            assert_eq!(erf_poly(x), 1.0);
            assert_eq!(erf_poly(-x), -1.0);
        }
        assert!(erf_poly(f32::NAN).is_nan());
        assert_eq!(erf_poly(0.0).to_bits(), 0.0f32.to_bits());
        assert_eq!(erf_poly(-0.0).to_bits(), (-0.0f32).to_bits());
    }

    /// GELU and its derivative through the f32 loops against the f64 formulas (libm's erf and exp).
    #[test]
    fn gelu_erf_loops_match_the_f64_formula() {
        let x: Vec<f32> = (0..20001).map(|i| (i as f32 - 10000.0) * 0.001).collect();
        let dy = vec![1.0f32; x.len()];
        let (mut y, mut dx) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        gelu_erf_f32(&x, &mut y);
        gelu_erf_backward_f32(&x, &dy, &mut dx);
        for ((&v, &g), &d) in x.iter().zip(&y).zip(&dx) {
            let v64 = v as f64;
            let want = unary_value(UnaryOp::GeluErf, v64);
            let want_d = unary_derivative(UnaryOp::GeluErf, v64);
            assert!((g as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "gelu({v}) = {g}, want {want}");
            assert!((d as f64 - want_d).abs() <= 1e-6 * (1.0 + want_d.abs()), "gelu'({v}) = {d}, want {want_d}");
        }
    }
}
