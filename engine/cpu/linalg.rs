//! Batched matrix products and scaled-dot-product attention on top of the GEMM kernel.

use super::elementwise::sum_zip;
use super::float::Float;
use super::gemm::{self, GemmDims, MatMut, MatRef};
use super::norm::{softmax_in_place, softmax_in_place_lse};
use super::par::SlotPool;
use crate::graph::Shape;
use rayon::prelude::*;
use std::ops::Range;

/// C = A·B (each operand as `op` describes it), or += with `accumulate`. The operands are slices of planned buffers
/// whose sizes shape inference guarantees, so a length error is a bug here.
#[inline]
fn matmul<T: Float>(
    dims: GemmDims,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    c: MatMut<'_, T>,
    accumulate: bool,
    threads: usize,
) {
    gemm::matmul(dims, a, b, c, accumulate, threads).expect("matmul operands sized by shape inference");
}

/// An operand of [`matmul`]: rows of stride `ld`, transposed when `trans`.
#[inline]
fn op<T>(data: &[T], ld: usize, trans: bool) -> MatRef<'_, T> {
    MatRef { data, ld, trans }
}

/// Query rows processed together by attention: bounds its scratch to `ATTN_BLOCK × Lk` per thread.
pub const ATTN_BLOCK: usize = 64;

/// One operand of a batched product: its data, its shape [..., rows, cols], and whether it enters transposed.
pub struct Operand<'a, T> {
    pub data: &'a [T],
    pub shape: &'a Shape,
    pub trans: bool,
}

/// [..., M, K] x [..., K, N] with transpose flags; either operand may be rank 2 (shared). `out` has shape `so`.
pub fn batched_matmul<T: Float>(x: Operand<'_, T>, y: Operand<'_, T>, out: &mut [T], so: &Shape, threads: usize) {
    batched_matmul_then(x, y, out, so, threads, None);
}

/// Called with a block of whole rows of a product's output as soon as they are final: the rows' range (counted
/// over the batch folded into rows) and their elements. Blocks may be handed over at the same time from different
/// threads, each with its block index.
pub type RowsFinal<'a, T> = &'a (dyn Fn(usize, Range<usize>, &mut [T]) + Sync);

/// Rows of each block `batched_matmul_then` hands to `after` (the last may have fewer): a function of the shapes
/// only, so that the results have the same bits on any thread count. When the batch folds into the rows of one
/// product (a shared right operand), it runs as two halves once a half is worth a thread (each single-threaded on 2
/// threads: 0.62 ms against 0.71 for one product split inside the `gemm` crate at 512×1024×128), and an epilogue
/// runs on each half while it is in cache; otherwise the whole output is one block.
pub fn row_block<T>(x: &Operand<'_, T>, y: &Operand<'_, T>, so: &Shape) -> usize {
    let g = Geometry::of(x, y, so);
    let rows = g.batch * g.m;
    if g.folds() && rows >= 64 && rows * g.n * g.k >= 1 << 21 {
        rows.div_ceil(2)
    } else {
        rows
    }
}

/// The sizes of a batched product (see `batched_matmul`).
struct Geometry {
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    a_step: usize,
    b_step: usize,
    ta: bool,
}

impl Geometry {
    fn of<T>(x: &Operand<'_, T>, y: &Operand<'_, T>, so: &Shape) -> Geometry {
        let (sa, sb) = (x.shape, y.shape);
        let (ra, rb, ro) = (sa.rank(), sb.rank(), so.rank());
        let (m, n) = (so.dims()[ro - 2], so.dims()[ro - 1]);
        let k = if x.trans { sa.dims()[ra - 2] } else { sa.dims()[ra - 1] };
        let batch = so.numel() / (m * n).max(1);
        let a_step = if ra == 2 { 0 } else { m * k };
        let b_step = if rb == 2 { 0 } else { k * n };
        Geometry { m, n, k, batch, a_step, b_step, ta: x.trans }
    }
    /// A single product, or a batch sharing its right operand: the batch folds into the rows of one product.
    fn folds(&self) -> bool {
        self.batch == 1 || (self.b_step == 0 && !self.ta)
    }
}

/// [`batched_matmul`], then `after` on each block of rows (the whole output at once when the batch does not fold
/// into rows).
pub fn batched_matmul_then<T: Float>(
    x: Operand<'_, T>,
    y: Operand<'_, T>,
    out: &mut [T],
    so: &Shape,
    threads: usize,
    after: Option<RowsFinal<'_, T>>,
) {
    let g = Geometry::of(&x, &y, so);
    let Geometry { m, n, k, batch, a_step, b_step, ta } = g;
    let (a, b, tb) = (x.data, y.data, y.trans);
    let lda = x.shape.dims()[x.shape.rank() - 1];
    let ldb = y.shape.dims()[y.shape.rank() - 1];
    if g.folds() {
        // A shared B: the batch folds into the rows of one large product, cut into blocks of rows.
        let per_block = row_block(&x, &y, so).max(1);
        let blocks = (batch * m).div_ceil(per_block);
        let block = |i: usize, c: &mut [T], threads: usize| {
            let first = i * per_block;
            let len = c.len() / n.max(1);
            // Row r of op(A) starts at element r·lda as stored, or at column r when A enters transposed.
            let a_block = op(&a[if ta { first } else { first * lda }..], lda, ta);
            matmul(GemmDims::new(len, n, k), a_block, op(b, ldb, tb), MatMut::new(c, n), false, threads);
            if let Some(after) = after {
                after(i, first..first + len, c);
            }
        };
        if blocks > 1 && threads > 1 {
            let inner = (threads / blocks).max(1);
            out.par_chunks_mut(per_block * n).enumerate().for_each(|(i, c)| block(i, c, inner));
        } else {
            for (i, c) in out.chunks_mut((per_block * n).max(1)).enumerate() {
                block(i, c, threads);
            }
        }
        return;
    }
    // Product `i` of the batch into `c`, on `threads` threads.
    let product = |i: usize, c: &mut [T], threads: usize| {
        let (ai, bi) = (op(&a[i * a_step..], lda, ta), op(&b[i * b_step..], ldb, tb));
        matmul(GemmDims::new(m, n, k), ai, bi, MatMut::new(c, n), false, threads);
    };
    let small = m * n * k < 96 * 96 * 96;
    if small && batch >= threads {
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| product(i, c, 1));
    } else {
        for (i, c) in out.chunks_mut(m * n).enumerate() {
            product(i, c, threads);
        }
    }
    if let Some(after) = after {
        after(0, 0..batch * m, out);
    }
}

/// Attention geometry: q [B·H, Lq, D], k [B·H, Lk, D], v [B·H, Lk, Dv].
#[derive(Clone, Copy, Debug)]
pub struct AttnGeom {
    pub bh: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
    pub scale: f64,
    pub causal: bool,
}

impl AttnGeom {
    pub fn from_shapes(q: &Shape, k: &Shape, v: &Shape, scale: f64, causal: bool) -> Self {
        let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
        AttnGeom { bh: qd[0] * qd[1], lq: qd[2], lk: kd[2], d: qd[3], dv: vd[3], scale, causal }
    }
    fn block(&self) -> usize {
        ATTN_BLOCK.min(self.lq).max(1)
    }
    /// Scratch elements per worker slot (forward needs the first half).
    pub fn slot_len(&self) -> usize {
        2 * self.block() * self.lk
    }
}

pub fn attention_scratch_len(g: &AttnGeom, slots: usize) -> usize {
    g.slot_len() * slots
}

/// Scores of query rows [r0, r0+rows) against all keys, as probabilities, into `p`; with `lse`, each row's
/// log-sum-exp of the scaled visible scores into `lse[i]`.
fn probabilities<T: Float>(
    g: &AttnGeom,
    q: &[T],
    k: &[T],
    r0: usize,
    rows: usize,
    p: &mut [T],
    mut lse: Option<&mut [T]>,
) {
    matmul(
        GemmDims::new(rows, g.lk, g.d),
        op(&q[r0 * g.d..], g.d, false),
        op(k, g.d, true),
        MatMut::new(p, g.lk),
        false,
        1,
    );
    let scale = T::from_f64(g.scale);
    for (i, row) in p.chunks_mut(g.lk).take(rows).enumerate() {
        let visible = if g.causal { (r0 + i + 1).min(g.lk) } else { g.lk };
        row[..visible].iter_mut().for_each(|v| *v *= scale);
        let (live, masked) = row.split_at_mut(visible);
        match lse.as_deref_mut() {
            Some(lse) => lse[i] = softmax_in_place_lse(live),
            None => softmax_in_place(live),
        }
        masked.fill(T::ZERO);
    }
}

/// What attention's forward writes: O [B·H, Lq, Dv], and with `lse` the row log-sum-exps [B·H, Lq].
pub struct AttnOut<'a, T> {
    pub o: &'a mut [T],
    pub lse: Option<&'a mut [T]>,
}

pub fn attention<T: Float>(
    g: &AttnGeom,
    q: &[T],
    k: &[T],
    v: &[T],
    out: AttnOut<'_, T>,
    scratch: &mut [T],
    slots: usize,
) {
    let blk = g.block();
    let AttnOut { o: out, lse } = out;
    // One task per problem of the B·H, each on whichever scratch slot is free (see `SlotPool`).
    let pool = SlotPool::new(scratch, g.slot_len(), slots.max(1));
    let lse_rows: Vec<Option<&mut [T]>> = match lse {
        Some(l) => l.chunks_mut(g.lq.max(1)).map(Some).collect(),
        None => (0..g.bh).map(|_| None).collect(),
    };
    out.par_chunks_mut((g.lq * g.dv).max(1)).zip(lse_rows).with_max_len(1).enumerate().for_each(|(i, (o, mut lse))| {
        pool.with(|sc| {
            let (qi, ki, vi) = (&q[i * g.lq * g.d..], &k[i * g.lk * g.d..], &v[i * g.lk * g.dv..]);
            let mut r0 = 0;
            while r0 < g.lq {
                let rows = blk.min(g.lq - r0);
                let p = &mut sc[..rows * g.lk];
                let lse = lse.as_deref_mut().map(|l| &mut l[r0..r0 + rows]);
                probabilities(g, qi, ki, r0, rows, p, lse);
                matmul(
                    GemmDims::new(rows, g.dv, g.lk),
                    op(p, g.lk, false),
                    op(vi, g.dv, false),
                    MatMut::new(&mut o[r0 * g.dv..], g.dv),
                    false,
                    1,
                );
                r0 += rows;
            }
        })
    });
}

/// What attention's backward writes: the gradients of q, k and v, and its per-thread scratch (probabilities and
/// their gradient for one block of query rows).
pub struct AttnGrads<'a, T> {
    pub dq: &'a mut [T],
    pub dk: &'a mut [T],
    pub dv: &'a mut [T],
    pub scratch: &'a mut [T],
}

pub fn attention_backward<T: Float>(
    g: &AttnGeom,
    q: &[T],
    k: &[T],
    v: &[T],
    dout: &[T],
    grads: AttnGrads<'_, T>,
    slots: usize,
) {
    let AttnGrads { dq, dk, dv, scratch } = grads;
    let blk = g.block();
    let scale = T::from_f64(g.scale);
    // One task per problem of the B·H, each on whichever scratch slot is free (see `SlotPool`).
    let pool = SlotPool::new(scratch, g.slot_len(), slots.max(1));
    dq.par_chunks_mut((g.lq * g.d).max(1))
        .zip(dk.par_chunks_mut((g.lk * g.d).max(1)))
        .zip(dv.par_chunks_mut((g.lk * g.dv).max(1)))
        .with_max_len(1)
        .enumerate()
        .for_each(|(i, ((dqi, dki), dvi))| {
            pool.with(|sc| {
                let (qi, ki, vi) = (&q[i * g.lq * g.d..], &k[i * g.lk * g.d..], &v[i * g.lk * g.dv..]);
                let doi = &dout[i * g.lq * g.dv..];
                dki.fill(T::ZERO);
                dvi.fill(T::ZERO);
                let mut r0 = 0;
                while r0 < g.lq {
                    let rows = blk.min(g.lq - r0);
                    let (p, dp) = sc.split_at_mut(blk * g.lk);
                    let (p, dp) = (&mut p[..rows * g.lk], &mut dp[..rows * g.lk]);
                    probabilities(g, qi, ki, r0, rows, p, None);
                    let dob = &doi[r0 * g.dv..];
                    // dV += Pᵀ·dO
                    matmul(
                        GemmDims::new(g.lk, g.dv, rows),
                        op(p, g.lk, true),
                        op(dob, g.dv, false),
                        MatMut::new(dvi, g.dv),
                        true,
                        1,
                    );
                    // dP = dO·Vᵀ
                    matmul(
                        GemmDims::new(rows, g.lk, g.dv),
                        op(dob, g.dv, false),
                        op(vi, g.dv, true),
                        MatMut::new(dp, g.lk),
                        false,
                        1,
                    );
                    // dS = P ∘ (dP − rowsum(dP ∘ P)) · scale
                    for (pr, dr) in p.chunks(g.lk).zip(dp.chunks_mut(g.lk)) {
                        let dot: T = sum_zip(pr, dr, |a, b| a * b);
                        for (d, &pv) in dr.iter_mut().zip(pr) {
                            *d = pv * (*d - dot) * scale;
                        }
                    }
                    // dQ = dS·K ; dK += dSᵀ·Q
                    matmul(
                        GemmDims::new(rows, g.d, g.lk),
                        op(dp, g.lk, false),
                        op(ki, g.d, false),
                        MatMut::new(&mut dqi[r0 * g.d..], g.d),
                        false,
                        1,
                    );
                    matmul(
                        GemmDims::new(g.lk, g.d, rows),
                        op(dp, g.lk, true),
                        op(&qi[r0 * g.d..], g.d, false),
                        MatMut::new(dki, g.d),
                        true,
                        1,
                    );
                    r0 += rows;
                }
            })
        });
}
