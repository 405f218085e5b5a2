//! Pointwise kernels, broadcasting, reductions to a shape, the MSE loss and the AdamW update.

use super::float::Float;
use super::par::{par_chunks, par_rows};
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

/// The widest vector unit this CPU has, detected once: the loops above are compiled again for it (the crate's
/// baseline is x86-64's SSE2, four lanes). The same operations in the same order, without FMA contraction (Rust
/// never contracts), so every width gives the same bits: results do not depend on the machine.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Simd {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn simd() -> Simd {
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

pub fn unary<T: Float>(u: UnaryOp, x: &[T], y: &mut [T]) {
    if u == UnaryOp::Silu {
        if let (Some(xf), Some(yf)) = (as_f32(x), as_f32_mut(y)) {
            par_chunks(yf, |start, out| silu_f32(&xf[start..start + out.len()], out));
            return;
        }
    }
    par_chunks(y, |start, out| {
        for (o, &v) in out.iter_mut().zip(&x[start..]) {
            *o = unary_value(u, v);
        }
    });
}

pub fn unary_backward<T: Float>(u: UnaryOp, x: &[T], dy: &[T], dx: &mut [T]) {
    if u == UnaryOp::Silu {
        if let (Some(xf), Some(df), Some(of)) = (as_f32(x), as_f32(dy), as_f32_mut(dx)) {
            par_chunks(of, |start, out| {
                let n = out.len();
                silu_backward_f32(&xf[start..start + n], &df[start..start + n], out)
            });
            return;
        }
    }
    par_chunks(dx, |start, out| {
        for ((o, &v), &d) in out.iter_mut().zip(&x[start..]).zip(&dy[start..]) {
            *o = d * unary_derivative(u, v);
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

/// Sum of a contiguous run with eight independent accumulators, so it vectorises.
#[inline]
fn sum_slice<T: Float>(s: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let chunks = s.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    let mut total = rest.iter().copied().sum::<T>();
    for a in acc {
        total += a;
    }
    total
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
    par_chunks(out, |start, o| {
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
    fn silu_gives_the_same_bits_at_every_vector_width() {
        let mut x: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.0) * 0.037).collect();
        x.extend([0.0, -0.0, 1e-30, -1e-30, 88.5, -88.5, 1e30, -1e30, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
        let dy: Vec<f32> = x.iter().enumerate().map(|(i, _)| 1.0 - (i % 7) as f32 * 0.3).collect();
        let (mut fast, mut base) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        silu_f32(&x, &mut fast);
        silu_loop(&x, &mut base);
        assert!(fast.iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits()), "silu");
        silu_backward_f32(&x, &dy, &mut fast);
        silu_backward_loop(&x, &dy, &mut base);
        assert!(fast.iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits()), "silu backward");
    }
}
