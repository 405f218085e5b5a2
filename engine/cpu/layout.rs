//! Data movement: concat, slice and its adjoint, permute, nearest 2x upsampling and its adjoint,
//! embedding lookup and its adjoint, the sinusoidal timestep embedding.

use super::float::Float;
use super::par::{par_chunks, par_rows};
use crate::graph::Shape;

/// `dst[k] = src[k·stride]` for every `k` of `dst` (a strided convolution's input columns). Stride 2 goes by pairs,
/// which vectorises, where a strided walk copies an element at a time.
pub fn copy_strided<T: Copy>(dst: &mut [T], src: &[T], stride: usize) {
    match stride {
        1 => dst.copy_from_slice(&src[..dst.len()]),
        2 => {
            let pairs = dst.len().min(src.len() / 2);
            for (d, pair) in dst[..pairs].iter_mut().zip(src.chunks_exact(2)) {
                *d = pair[0];
            }
            if pairs < dst.len() {
                dst[pairs] = src[2 * pairs];
            }
        }
        _ => dst.iter_mut().zip(src.iter().step_by(stride)).for_each(|(d, &v)| *d = v),
    }
}

/// `dst = src[..dst.len()]` for short rows (a small feature map's): eight elements at a time as fixed-size moves the
/// compiler inlines, where `copy_from_slice` calls `memmove`, whose call costs more than moving eight floats.
#[inline(always)]
pub fn copy_short<T: Copy>(dst: &mut [T], src: &[T]) {
    let src = &src[..dst.len()];
    let mut dst8 = dst.chunks_exact_mut(8);
    let mut src8 = src.chunks_exact(8);
    for (d, s) in (&mut dst8).zip(&mut src8) {
        let s: &[T; 8] = s.try_into().expect("chunks_exact(8) yields 8 elements");
        d.copy_from_slice(s);
    }
    for (d, &s) in dst8.into_remainder().iter_mut().zip(src8.remainder()) {
        *d = s;
    }
}

/// `dst[k·stride] += src[k]` for every `k` of `src` (the adjoint of [`copy_strided`]), by pairs at stride 2.
pub fn add_strided<T: Float>(dst: &mut [T], src: &[T], stride: usize) {
    match stride {
        1 => dst[..src.len()].iter_mut().zip(src).for_each(|(d, &g)| *d += g),
        2 => {
            let pairs = src.len().min(dst.len() / 2);
            for (pair, &g) in dst.chunks_exact_mut(2).zip(&src[..pairs]) {
                pair[0] += g;
            }
            if pairs < src.len() {
                dst[2 * pairs] += src[pairs];
            }
        }
        _ => dst.iter_mut().step_by(stride).zip(src).for_each(|(d, &g)| *d += g),
    }
}

/// (outer, size along axis, inner) for a contiguous shape split at `axis`.
fn split(s: &Shape, axis: usize) -> (usize, usize, usize) {
    let d = s.dims();
    (d[..axis].iter().product(), d[axis], d[axis + 1..].iter().product())
}

pub fn concat<T: Float>(ins: &[(&[T], &Shape)], axis: usize, out: &mut [T], os: &Shape) {
    let (outer, total, inner) = split(os, axis);
    let row = total * inner;
    par_rows(out, row, |o, orow| {
        let mut at = 0;
        for (x, xs) in ins {
            let len = xs.dims()[axis] * inner;
            orow[at..at + len].copy_from_slice(&x[o * len..(o + 1) * len]);
            at += len;
        }
    });
    debug_assert_eq!(out.len(), outer * row);
}

pub fn slice<T: Float>(x: &[T], xs: &Shape, axis: usize, start: usize, out: &mut [T], os: &Shape) {
    let (_, full, inner) = split(xs, axis);
    let len = os.dims()[axis] * inner;
    par_rows(out, len, |o, orow| {
        let base = o * full * inner + start * inner;
        orow.copy_from_slice(&x[base..base + len]);
    });
}

pub fn slice_backward<T: Float>(dy: &[T], ds: &Shape, axis: usize, start: usize, out: &mut [T], os: &Shape) {
    let (_, full, inner) = split(os, axis);
    let len = ds.dims()[axis] * inner;
    par_rows(out, full * inner, |o, orow| {
        orow.fill(T::ZERO);
        orow[start * inner..start * inner + len].copy_from_slice(&dy[o * len..(o + 1) * len]);
    });
}

pub fn permute<T: Float>(x: &[T], xs: &Shape, perm: &[usize], out: &mut [T], os: &Shape) {
    let xst = xs.strides();
    // Stride in x of each output axis.
    let st: Vec<usize> = perm.iter().map(|&p| xst[p]).collect();
    let od = os.dims();
    let last = od.last().copied().unwrap_or(1).max(1);
    let ls = st.last().copied().unwrap_or(1);
    par_rows(out, last, |row, orow| {
        let mut rem = row;
        let mut base = 0;
        for ax in (0..od.len().saturating_sub(1)).rev() {
            base += (rem % od[ax]) * st[ax];
            rem /= od[ax];
        }
        if ls == 1 {
            // The last axis stays last (attention's head split and merge): each output row is one copy.
            orow.copy_from_slice(&x[base..base + last]);
        } else {
            for (j, o) in orow.iter_mut().enumerate() {
                *o = x[base + j * ls];
            }
        }
    });
}

/// x [..., H, W] → [..., 2H, 2W].
pub fn upsample2x<T: Float>(x: &[T], w: usize, out: &mut [T]) {
    let w2 = 2 * w;
    par_rows(out, w2, |r, orow| {
        // Output row r of a plane reads input row r/2 (planes stack, so r/2 indexes all rows).
        let src = &x[(r / 2) * w..][..w];
        for (j, o) in orow.iter_mut().enumerate() {
            *o = src[j / 2];
        }
    });
}

/// dy [..., 2H, 2W] → [..., H, W], each output summing its 2x2 block.
pub fn upsample2x_backward<T: Float>(dy: &[T], h: usize, w: usize, out: &mut [T]) {
    let w2 = 2 * w;
    par_rows(out, w, |r, orow| {
        let (plane, i) = (r / h, r % h);
        let top = &dy[(plane * 2 * h + 2 * i) * w2..][..w2];
        let bot = &dy[(plane * 2 * h + 2 * i + 1) * w2..][..w2];
        for (j, o) in orow.iter_mut().enumerate() {
            *o = top[2 * j] + top[2 * j + 1] + bot[2 * j] + bot[2 * j + 1];
        }
    });
}

/// Reads integer ids whatever their storage.
pub enum Ids<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

impl Ids<'_> {
    pub fn len(&self) -> usize {
        match self {
            Ids::I32(v) => v.len(),
            Ids::I64(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn get(&self, i: usize) -> i64 {
        match self {
            Ids::I32(v) => v[i] as i64,
            Ids::I64(v) => v[i],
        }
    }
    /// The first id outside 0..vocab, if any.
    pub fn first_out_of_range(&self, vocab: usize) -> Option<(usize, i64)> {
        (0..self.len()).map(|i| (i, self.get(i))).find(|&(_, id)| id < 0 || id as usize >= vocab)
    }
}

pub fn embedding<T: Float>(table: &[T], d: usize, ids: &Ids, out: &mut [T]) {
    par_rows(out, d, |i, orow| {
        let id = ids.get(i) as usize;
        orow.copy_from_slice(&table[id * d..(id + 1) * d]);
    });
}

pub fn embedding_backward<T: Float>(ids: &Ids, dy: &[T], d: usize, out: &mut [T]) {
    out.fill(T::ZERO);
    for i in 0..ids.len() {
        let id = ids.get(i) as usize;
        for (o, &g) in out[id * d..(id + 1) * d].iter_mut().zip(&dy[i * d..(i + 1) * d]) {
            *o += g;
        }
    }
}

/// The LDM `timestep_embedding`: [cos(t·f_k), sin(t·f_k)] with f_k = max_period^(-k/half).
pub fn timestep_embedding(t: &[f64], dim: usize, max_period: f64, out: &mut [f32]) {
    let half = dim / 2;
    par_chunks(out, |start, o| {
        for (j, v) in o.iter_mut().enumerate() {
            let idx = start + j;
            let (b, k) = (idx / dim, idx % dim);
            let f = (-(max_period.ln()) * (k % half) as f64 / half as f64).exp();
            let arg = t[b] * f;
            *v = if k < half { arg.cos() } else { arg.sin() } as f32;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both helpers against the plain strided walk, for every stride 1-3 and every pairing of lengths that fits
    /// (odd and even, the last element alone at stride 2).
    #[test]
    fn strided_copy_and_add_match_the_plain_walk() {
        for stride in 1..=3 {
            for src_len in 0..12usize {
                let src: Vec<f32> = (0..src_len).map(|i| i as f32 + 0.5).collect();
                // dst[k] = src[k·stride] needs (len - 1)·stride < src_len.
                for len in (0..=src_len).filter(|&l| l == 0 || (l - 1) * stride < src_len) {
                    let mut got = vec![f32::NAN; len];
                    copy_strided(&mut got, &src, stride);
                    let expected: Vec<f32> = (0..len).map(|k| src[k * stride]).collect();
                    assert_eq!(got, expected, "copy: stride {stride}, {len} of {src_len}");
                    // The adjoint: dst[k·stride] += got[k] over a destination of src_len elements.
                    let mut dst: Vec<f32> = (0..src_len).map(|i| -(i as f32)).collect();
                    let mut want = dst.clone();
                    for (k, &g) in got.iter().enumerate() {
                        want[k * stride] += g;
                    }
                    add_strided(&mut dst, &got, stride);
                    assert_eq!(dst, want, "add: stride {stride}, {len} into {src_len}");
                }
            }
        }
    }
}
