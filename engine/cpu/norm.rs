//! GroupNorm, LayerNorm and softmax, forward and backward. Statistics are computed in two passes
//! (mean, then the variance of the centred values) for accuracy.

use super::elementwise::{as_f32_mut, exp_shifted_f32, fold_lanes, sum_lanes, sum_map, sum_slice, sum_zip};
use super::float::Float;
use rayon::prelude::*;

/// The mean and 1/sqrt(variance + eps) of one normalisation unit (two passes, lane sums).
pub(super) fn mean_rstd<T: Float>(x: &[T], eps: f64) -> (T, T) {
    let n = T::from_f64(x.len() as f64);
    let mean = sum_slice(x) / n;
    let var = sum_map(x, |v| (v - mean) * (v - mean)) / n;
    (mean, T::ONE / (var + T::from_f64(eps)).sqrt())
}

/// The shape GroupNorm works on: x is [n, c, s] (s = the product of the spatial dims), normalised over
/// `groups` groups of channels with `eps`.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormGeom {
    pub n: usize,
    pub c: usize,
    pub s: usize,
    pub groups: usize,
    pub eps: f64,
}

/// The outputs of a normalisation's backward: the input's gradient, the scale's and the shift's, and the scratch
/// the per-block partial sums of the latter two go through (so no two threads write the same element).
pub struct NormGrads<'a, T> {
    pub dx: &'a mut [T],
    pub dgamma: &'a mut [T],
    pub dbeta: &'a mut [T],
    pub partial: &'a mut [T],
}

/// Each channel's group (mean, rstd) of one channels-last image `xb` ([s, c]), repeated per channel so the loops over
/// a pixel's channels need no division. Sums are per channel in f64 over the pixels (a group's channels are
/// interleaved with the others', so there is no contiguous block to sum), then per group.
fn channels_last_stats<T: Float>(g: &GroupNormGeom, xb: &[T]) -> (Vec<T>, Vec<T>) {
    let (c, cg) = (g.c, g.c / g.groups);
    let count = (cg * g.s) as f64;
    let mut sums = vec![0.0f64; c];
    for px in xb.chunks_exact(c) {
        for (a, &v) in sums.iter_mut().zip(px) {
            *a += v.to_f64();
        }
    }
    let group_mean: Vec<f64> = sums.chunks_exact(cg).map(|ch| ch.iter().sum::<f64>() / count).collect();
    let mean: Vec<f64> = (0..c).map(|ch| group_mean[ch / cg]).collect();
    let mut sq = vec![0.0f64; c];
    for px in xb.chunks_exact(c) {
        for ((a, &v), &m) in sq.iter_mut().zip(px).zip(&mean) {
            let d = v.to_f64() - m;
            *a += d * d;
        }
    }
    let group_rstd: Vec<f64> =
        sq.chunks_exact(cg).map(|ch| 1.0 / (ch.iter().sum::<f64>() / count + g.eps).sqrt()).collect();
    let rstd = (0..c).map(|ch| T::from_f64(group_rstd[ch / cg])).collect();
    (mean.into_iter().map(T::from_f64).collect(), rstd)
}

/// GroupNorm over channels-last x ([n, s, c]): one image per task.
pub fn group_norm_channels_last<T: Float>(g: &GroupNormGeom, x: &[T], gamma: &[T], beta: &[T], y: &mut [T]) {
    let (c, image) = (g.c, g.s * g.c);
    y.par_chunks_mut(image.max(1)).enumerate().take(g.n).for_each(|(i, yb)| {
        let xb = &x[i * image..(i + 1) * image];
        let (mean, rstd) = channels_last_stats(g, xb);
        let scale: Vec<T> = rstd.iter().zip(gamma).map(|(&r, &ga)| r * ga).collect();
        let shift: Vec<T> = (0..c).map(|ch| beta[ch] - mean[ch] * scale[ch]).collect();
        for (yp, xp) in yb.chunks_exact_mut(c).zip(xb.chunks_exact(c)) {
            for (((o, &v), &a), &b) in yp.iter_mut().zip(xp).zip(&scale).zip(&shift) {
                *o = v * a + b;
            }
        }
    });
}

/// The backward of [`group_norm_channels_last`]: dx, and per-(n, channel) partial dgamma/dbeta in `partial`
/// ([N, C, 2]), reduced over N as the planar backward does.
pub fn group_norm_channels_last_backward<T: Float>(
    g: &GroupNormGeom,
    x: &[T],
    gamma: &[T],
    dy: &[T],
    out: NormGrads<'_, T>,
) {
    let (c, cg, image) = (g.c, g.c / g.groups, g.s * g.c);
    let NormGrads { dx, dgamma, dbeta, partial } = out;
    let count = (cg * g.s) as f64;
    dx.par_chunks_mut(image.max(1)).zip(partial.par_chunks_mut(c * 2)).enumerate().take(g.n).for_each(
        |(i, (dxb, pb))| {
            let (xb, db) = (&x[i * image..(i + 1) * image], &dy[i * image..(i + 1) * image]);
            let (mean, rstd) = channels_last_stats(g, xb);
            // Per channel: sum(dy * xhat) (dgamma's part) and sum(dy) (dbeta's).
            let (mut dg, mut dbt) = (vec![0.0f64; c], vec![0.0f64; c]);
            for (xp, dp) in xb.chunks_exact(c).zip(db.chunks_exact(c)) {
                for ((((a, b), &xv), &d), (&m, &r)) in
                    dg.iter_mut().zip(dbt.iter_mut()).zip(xp).zip(dp).zip(mean.iter().zip(&rstd))
                {
                    *a += (d * ((xv - m) * r)).to_f64();
                    *b += d.to_f64();
                }
            }
            // Per group, the means of dxhat = dy * gamma and of dxhat * xhat; then dx = rstd * (dxhat - m1 - xhat *
            // m2), written per channel as dy * a + (x - mean) * b + k (centred first, so nothing cancels).
            let (mut m1, mut m2) = (vec![0.0f64; g.groups], vec![0.0f64; g.groups]);
            for ch in 0..c {
                pb[ch * 2] = T::from_f64(dg[ch]);
                pb[ch * 2 + 1] = T::from_f64(dbt[ch]);
                m1[ch / cg] += dbt[ch] * gamma[ch].to_f64() / count;
                m2[ch / cg] += dg[ch] * gamma[ch].to_f64() / count;
            }
            let mut coef = vec![(T::ZERO, T::ZERO, T::ZERO); c];
            for (ch, k) in coef.iter_mut().enumerate() {
                let r = rstd[ch].to_f64();
                let (g1, g2) = (m1[ch / cg], m2[ch / cg]);
                *k = (T::from_f64(r * gamma[ch].to_f64()), T::from_f64(-r * r * g2), T::from_f64(-r * g1));
            }
            for (dxp, (xp, dp)) in dxb.chunks_exact_mut(c).zip(xb.chunks_exact(c).zip(db.chunks_exact(c))) {
                for ((((o, &xv), &d), &(a, b, k)), &m) in dxp.iter_mut().zip(xp).zip(dp).zip(&coef).zip(&mean) {
                    *o = d * a + (xv - m) * b + k;
                }
            }
        },
    );
    reduce_param_partials(g, partial, dgamma, dbeta);
}

/// dgamma and dbeta: the per-(n, channel) partial sums in `partial` ([N, C, 2]) summed over N, in order.
fn reduce_param_partials<T: Float>(g: &GroupNormGeom, partial: &[T], dgamma: &mut [T], dbeta: &mut [T]) {
    let c = g.c;
    for ch in 0..c {
        let (mut dg, mut dbt) = (T::ZERO, T::ZERO);
        for b in 0..g.n {
            dg += partial[(b * c + ch) * 2];
            dbt += partial[(b * c + ch) * 2 + 1];
        }
        dgamma[ch] = dg;
        dbeta[ch] = dbt;
    }
}

/// Each (n, group) is a contiguous block of x.
pub fn group_norm<T: Float>(g: &GroupNormGeom, x: &[T], gamma: &[T], beta: &[T], y: &mut [T]) {
    let GroupNormGeom { n, c, s, groups, eps } = *g;
    let cg = c / groups;
    let block = cg * s;
    y.par_chunks_mut(block).enumerate().take(n * groups).for_each(|(i, yb)| {
        let xb = &x[i * block..(i + 1) * block];
        let (mean, rstd) = mean_rstd(xb, eps);
        let g0 = (i % groups) * cg;
        for ch in 0..cg {
            let scale = rstd * gamma[g0 + ch];
            let shift = beta[g0 + ch] - mean * scale;
            for (o, &v) in yb[ch * s..(ch + 1) * s].iter_mut().zip(&xb[ch * s..(ch + 1) * s]) {
                *o = v * scale + shift;
            }
        }
    });
}

/// Writes dx, and per-(n, channel) partial dgamma/dbeta into `partial` ([N, C, 2]) which it then reduces over N.
pub fn group_norm_backward<T: Float>(g: &GroupNormGeom, x: &[T], gamma: &[T], dy: &[T], out: NormGrads<'_, T>) {
    let GroupNormGeom { n, c, s, groups, eps } = *g;
    let NormGrads { dx, dgamma, dbeta, partial } = out;
    let cg = c / groups;
    let block = cg * s;
    let count = T::from_f64(block as f64);
    dx.par_chunks_mut(block).zip(partial.par_chunks_mut(cg * 2)).enumerate().take(n * groups).for_each(
        |(i, (dxb, pb))| {
            let xb = &x[i * block..(i + 1) * block];
            let db = &dy[i * block..(i + 1) * block];
            let (mean, rstd) = mean_rstd(xb, eps);
            let g0 = (i % groups) * cg;
            // sum(dxhat) and sum(dxhat * xhat) over the group.
            let (mut s1, mut s2) = (T::ZERO, T::ZERO);
            for ch in 0..cg {
                let (xc, dc) = (&xb[ch * s..(ch + 1) * s], &db[ch * s..(ch + 1) * s]);
                let dg = sum_zip(xc, dc, |xv, d| d * ((xv - mean) * rstd));
                let dbt = sum_slice(dc);
                pb[ch * 2] = dg;
                pb[ch * 2 + 1] = dbt;
                s1 += dbt * gamma[g0 + ch];
                s2 += dg * gamma[g0 + ch];
            }
            let (m1, m2) = (s1 / count, s2 / count);
            for ch in 0..cg {
                let gm = gamma[g0 + ch];
                for ((o, &xv), &d) in
                    dxb[ch * s..(ch + 1) * s].iter_mut().zip(&xb[ch * s..(ch + 1) * s]).zip(&db[ch * s..(ch + 1) * s])
                {
                    let xh = (xv - mean) * rstd;
                    *o = rstd * (d * gm - m1 - xh * m2);
                }
            }
        },
    );
    reduce_param_partials(g, partial, dgamma, dbeta);
}

pub fn layer_norm<T: Float>(x: &[T], gamma: &[T], beta: &[T], y: &mut [T], d: usize, eps: f64) {
    super::par::par_rows(y, d, |r, yr| {
        let xr = &x[r * d..(r + 1) * d];
        let (mean, rstd) = mean_rstd(xr, eps);
        for (j, o) in yr.iter_mut().enumerate() {
            *o = (xr[j] - mean) * rstd * gamma[j] + beta[j];
        }
    });
}

/// x is rows of `d`. Rows are split into `blocks` fixed groups; each writes its partial dgamma/dbeta into its own
/// slot of `partial` ([blocks, 2, D]) before they are summed.
pub fn layer_norm_backward<T: Float>(x: &[T], gamma: &[T], dy: &[T], out: NormGrads<'_, T>, d: usize, eps: f64) {
    let NormGrads { dx, dgamma, dbeta, partial } = out;
    let rows = x.len() / d.max(1);
    let blocks = layer_norm_blocks(rows);
    let rows_per = rows.div_ceil(blocks).max(1);
    let count = T::from_f64(d as f64);
    dx.par_chunks_mut(rows_per * d).zip(partial.par_chunks_mut(2 * d)).enumerate().for_each(|(b, (dxb, pb))| {
        pb.fill(T::ZERO);
        let (pg, pbt) = pb.split_at_mut(d);
        for (k, dxr) in dxb.chunks_mut(d).enumerate() {
            let r = b * rows_per + k;
            let xr = &x[r * d..(r + 1) * d];
            let dr = &dy[r * d..(r + 1) * d];
            let (mean, rstd) = mean_rstd(xr, eps);
            for j in 0..d {
                let xh = (xr[j] - mean) * rstd;
                pg[j] += dr[j] * xh;
                pbt[j] += dr[j];
            }
            let gm = &gamma[..d];
            let s1 = sum_zip(dr, gm, |dv, g| dv * g);
            let s2 = sum_lanes(d, |j| dr[j] * gm[j] * ((xr[j] - mean) * rstd));
            let (m1, m2) = (s1 / count, s2 / count);
            for j in 0..d {
                let xh = (xr[j] - mean) * rstd;
                dxr[j] = rstd * (dr[j] * gamma[j] - m1 - xh * m2);
            }
        }
    });
    let used = rows.div_ceil(rows_per);
    for j in 0..d {
        let (mut g, mut b) = (T::ZERO, T::ZERO);
        for k in 0..used {
            g += partial[k * 2 * d + j];
            b += partial[k * 2 * d + d + j];
        }
        dgamma[j] = g;
        dbeta[j] = b;
    }
}

/// How many partial-sum blocks LayerNorm's backward uses for `rows` rows (fixed, so results do
/// not depend on the thread count).
pub fn layer_norm_blocks(rows: usize) -> usize {
    rows.clamp(1, 16)
}

pub fn softmax_rows<T: Float>(x: &[T], y: &mut [T], d: usize) {
    super::par::par_rows(y, d, |r, yr| softmax_row(&x[r * d..(r + 1) * d], yr));
}

#[inline]
pub fn softmax_row<T: Float>(x: &[T], y: &mut [T]) {
    y.copy_from_slice(x);
    softmax_in_place(y);
}

/// Softmax of one row, in place, subtracting the maximum first so exp cannot overflow.
#[inline]
pub fn softmax_in_place<T: Float>(y: &mut [T]) {
    softmax_in_place_stats(y);
}

/// [`softmax_in_place`], returning the row's log-sum-exp, max + ln(sum(exp(x - max))): the probabilities are the
/// same bits either way.
#[inline]
pub fn softmax_in_place_lse<T: Float>(y: &mut [T]) -> T {
    let (m, sum) = softmax_in_place_stats(y);
    m + sum.ln()
}

/// The softmax of one row in place; returns its maximum and sum(exp(x - max)). The maximum is taken in lanes (the
/// same value as a serial maximum: max is exact), the exponentials through the f32 loop (libm's expf per element
/// was a tenth of attention's time) and the sum in lanes.
#[inline]
fn softmax_in_place_stats<T: Float>(y: &mut [T]) -> (T, T) {
    let m = max_lanes(y);
    match as_f32_mut(y) {
        Some(yf) => exp_shifted_f32(yf, m.to_f64() as f32),
        None => y.iter_mut().for_each(|v| *v = (*v - m).exp()),
    }
    let sum = sum_slice(y);
    let inv = T::ONE / sum;
    y.iter_mut().for_each(|v| *v *= inv);
    (m, sum)
}

/// The largest element (NaNs ignored, as `f32::max` does), in lanes ([`fold_lanes`]; max is exact, so the same
/// value as a serial maximum).
fn max_lanes<T: Float>(y: &[T]) -> T {
    fold_lanes(y.len(), y[0], |i| y[i], |a, b| a.max(b))
}

pub fn softmax_backward<T: Float>(y: &[T], dy: &[T], dx: &mut [T], d: usize) {
    super::par::par_rows(dx, d, |r, dxr| {
        let (yr, dr) = (&y[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
        let dot: T = sum_zip(yr, dr, |a, b| a * b);
        for j in 0..d {
            dxr[j] = yr[j] * (dr[j] - dot);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f32 softmax rows (lane maximum, the polynomial exponential, lane sums) against f64 softmax, within 1e-6 of
    /// each probability; -inf entries (masks) come out exactly 0, and the log-sum-exp matches.
    #[test]
    fn f32_softmax_matches_f64_and_keeps_masked_entries_zero() {
        for len in [1usize, 7, 8, 77, 256, 1000] {
            let x64: Vec<f64> = (0..len).map(|i| ((i * 37 % 101) as f64 - 50.0) * 0.173).collect();
            let mut x32: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
            if len > 2 {
                x32[1] = f32::NEG_INFINITY;
            }
            let mut y64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
            let lse64 = softmax_in_place_lse(&mut y64);
            let lse32 = softmax_in_place_lse(&mut x32);
            assert!((lse32 as f64 - lse64).abs() <= 1e-5 * lse64.abs().max(1.0), "{len}: lse {lse32} vs {lse64}");
            for (i, (&a, &b)) in x32.iter().zip(&y64).enumerate() {
                assert!((a as f64 - b).abs() <= 1e-6, "{len}[{i}]: {a} vs {b}");
            }
            if len > 2 {
                assert_eq!(x32[1].to_bits(), 0f32.to_bits(), "{len}: a -inf score");
            }
        }
    }
}
