//! Data movement: concat, slice and its adjoint, permute, nearest 2x upsampling and its adjoint,
//! embedding lookup and its adjoint, the sinusoidal timestep embedding.

#[cfg(target_arch = "x86_64")]
use super::elementwise::{simd, Simd};
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

/// [`copy_strided`] on f32, with stride 2 (every strided convolution of SD's U-Net and hint encoder) through
/// AVX-512 where the CPU has it: sixteen outputs per two loads and one two-source permute, where the portable loop
/// compiles to SSE2 pairs.
pub fn copy_strided_f32(dst: &mut [f32], src: &[f32], stride: usize) {
    #[cfg(target_arch = "x86_64")]
    if stride == 2 && simd() == Simd::Avx512 {
        let vectors = dst.len().min(src.len() / 2) / 16;
        // SAFETY: AVX-512 F is present (`simd()` detected it); the loop reads src[..32·vectors] and writes
        // dst[..16·vectors], both in bounds by `vectors`' definition.
        unsafe { avx512::deinterleave2(dst, src, vectors) };
        let done = 16 * vectors;
        copy_strided(&mut dst[done..], &src[2 * done..], 2);
        return;
    }
    copy_strided(dst, src, stride)
}

/// `dst[2·k] = even[k]`, `dst[2·k + 1] = odd[k]` for every element of `dst` (`even` holds `⌈len/2⌉` elements,
/// `odd` `⌊len/2⌋`): a row of a stride-2 backward-input's output from its two column phases. Through AVX-512 where
/// the CPU has it (two loads, two two-source permutes, two stores per 32 outputs).
pub fn interleave2_f32(dst: &mut [f32], even: &[f32], odd: &[f32]) {
    let pairs = dst.len() / 2;
    let (even, odd) = (&even[..dst.len().div_ceil(2)], &odd[..pairs]);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if simd() == Simd::Avx512 {
        let vectors = pairs / 16;
        // SAFETY: AVX-512 F is present; the loop reads even[..16·vectors] and odd[..16·vectors] (both hold at
        // least `pairs` elements) and writes dst[..32·vectors] (dst holds 2·pairs).
        unsafe { avx512::interleave2(dst, even, odd, vectors) };
        done = 16 * vectors;
    }
    for (pair, (&e, &o)) in dst[2 * done..].chunks_exact_mut(2).zip(even[done..].iter().zip(&odd[done..])) {
        pair[0] = e;
        pair[1] = o;
    }
    if dst.len() % 2 == 1 {
        dst[dst.len() - 1] = even[pairs];
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `dst[k] = src[2·k]` for `k < 16·vectors`.
    ///
    /// # Safety
    /// AVX-512 F must be present; `src` must hold `32·vectors` elements and `dst` `16·vectors`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn deinterleave2(dst: &mut [f32], src: &[f32], vectors: usize) {
        let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        for v in 0..vectors {
            // SAFETY: v < vectors, so both loads lie in src[..32·vectors] and the store in dst[..16·vectors].
            unsafe {
                let a = _mm512_loadu_ps(src.as_ptr().add(32 * v));
                let b = _mm512_loadu_ps(src.as_ptr().add(32 * v + 16));
                _mm512_storeu_ps(dst.as_mut_ptr().add(16 * v), _mm512_permutex2var_ps(a, evens, b));
            }
        }
    }

    /// `dst[2·k] = even[k]`, `dst[2·k + 1] = odd[k]` for `k < 16·vectors`.
    ///
    /// # Safety
    /// AVX-512 F must be present; `even` and `odd` must hold `16·vectors` elements and `dst` `32·vectors`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn interleave2(dst: &mut [f32], even: &[f32], odd: &[f32], vectors: usize) {
        let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        for v in 0..vectors {
            // SAFETY: v < vectors, so the loads lie in even/odd[..16·vectors] and the stores in dst[..32·vectors].
            unsafe {
                let e = _mm512_loadu_ps(even.as_ptr().add(16 * v));
                let o = _mm512_loadu_ps(odd.as_ptr().add(16 * v));
                _mm512_storeu_ps(dst.as_mut_ptr().add(32 * v), _mm512_permutex2var_ps(e, low, o));
                _mm512_storeu_ps(dst.as_mut_ptr().add(32 * v + 16), _mm512_permutex2var_ps(e, high, o));
            }
        }
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

    /// The f32 fast paths (AVX-512 where present: whole vectors, then the tail) against the plain walk, for lengths
    /// around one and two vectors.
    #[test]
    fn stride_two_f32_paths_match_the_plain_walk() {
        for len in [0, 1, 15, 16, 17, 31, 32, 33, 47, 64, 65, 100] {
            let src: Vec<f32> = (0..2 * len + 3).map(|i| i as f32 * 0.25 - 7.0).collect();
            let mut got = vec![f32::NAN; len];
            copy_strided_f32(&mut got, &src, 2);
            let expected: Vec<f32> = (0..len).map(|k| src[2 * k]).collect();
            assert_eq!(got, expected, "deinterleave {len}");
            let (even, odd): (Vec<f32>, Vec<f32>) =
                ((0..len.div_ceil(2)).map(|k| k as f32).collect(), (0..len / 2).map(|k| -(k as f32) - 0.5).collect());
            let mut dst = vec![f32::NAN; len];
            interleave2_f32(&mut dst, &even, &odd);
            let want: Vec<f32> = (0..len).map(|i| if i % 2 == 0 { even[i / 2] } else { odd[i / 2] }).collect();
            assert_eq!(dst, want, "interleave {len}");
        }
    }
}
