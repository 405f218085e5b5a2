//! Row-major matrix products `C = op(A)·op(B)` (or `C += ...`) on the CPU, f32 and f64.
//!
//! The arithmetic is done by the `gemm` crate (packed, cache-blocked micro-kernels chosen at run time
//! for AVX-512, AVX2 or NEON). This module only validates the operands, maps our row-major
//! "leading dimension + transpose flag" description onto its (row stride, column stride) form, and
//! picks how to spread a batch over threads.
//!
//! Our code never allocates; the `gemm` crate keeps its packing buffers in thread-local slabs and,
//! for some shapes, allocates a packed copy of the right operand per call. That is outside our
//! control short of writing our own micro-kernels.

use super::float::Float;
use crate::error::{Error, Result};
use gemm::Parallelism;
use rayon::prelude::*;

/// Sizes of one product: `op(A)` is `m × k`, `op(B)` is `k × n`, `C` is `m × n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmDims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl GemmDims {
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        GemmDims { m, n, k }
    }
    /// Multiply-adds counted as two FLOPs, the usual convention for GFLOP/s figures.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// An input operand: a row-major matrix with row stride `ld` (in elements), used as stored or
/// transposed. With `trans`, an operand whose logical shape is `r × c` is stored as `c × r`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    pub data: &'a [T],
    pub ld: usize,
    pub trans: bool,
}

impl<'a, T> MatRef<'a, T> {
    /// The matrix as stored.
    pub fn new(data: &'a [T], ld: usize) -> Self {
        MatRef { data, ld, trans: false }
    }
    /// The transpose of the stored matrix.
    pub fn transposed(data: &'a [T], ld: usize) -> Self {
        MatRef { data, ld, trans: true }
    }
}

/// The output matrix: row-major with row stride `ld`.
#[derive(Debug)]
pub struct MatMut<'a, T> {
    pub data: &'a mut [T],
    pub ld: usize,
}

impl<'a, T> MatMut<'a, T> {
    pub fn new(data: &'a mut [T], ld: usize) -> Self {
        MatMut { data, ld }
    }
}

/// How a batch of products is laid out: matrix `i` of each operand starts at `i * stride`.
/// `b_stride == 0` shares one right operand across the batch (a linear layer over a batch, or a
/// convolution weight); the other strides must step past a whole matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    pub count: usize,
    pub a_stride: usize,
    pub b_stride: usize,
    pub c_stride: usize,
}

/// `C = op(A)·op(B)`, or `C += op(A)·op(B)` with `accumulate`. `threads <= 1` runs on the calling
/// thread; more splits the product inside the micro-kernel loops over the current rayon pool.
pub fn matmul<T: Float>(
    dims: GemmDims,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    c: MatMut<'_, T>,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    let batch = Batch { count: 1, a_stride: 0, b_stride: 0, c_stride: 0 };
    matmul_batched(batch, dims, a, b, c, accumulate, threads)
}

/// A batch of products with the same sizes and layouts, `C_i = op(A_i)·op(B_i)` (or `+=`).
///
/// Threads go across the batch when it divides evenly enough (each product then runs
/// single-threaded, with no synchronisation inside it), otherwise inside each product.
pub fn matmul_batched<T: Float>(
    batch: Batch,
    dims: GemmDims,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    c: MatMut<'_, T>,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    validate(&batch, &dims, &a, &b, &c)?;
    let GemmDims { m, n, k } = dims;
    if batch.count == 0 || m == 0 || n == 0 {
        return Ok(());
    }

    // A shared right operand with untransposed, back-to-back left operands and outputs is one tall
    // product: fewer, larger calls pack B once and parallelise better.
    let folds =
        batch.count > 1 && batch.b_stride == 0 && !a.trans && batch.a_stride == m * a.ld && batch.c_stride == m * c.ld;
    if folds {
        let tall = GemmDims { m: m * batch.count, n, k };
        // SAFETY: `validate` checked that every batch member lies inside the slices, and the folded
        // product covers exactly those rows with the same leading dimensions.
        unsafe { gemm_raw(tall, &a, &b, c.data, c.ld, accumulate, threads) };
        return Ok(());
    }

    let c_ld = c.ld;
    if batch.count == 1 || !split_across_batch(batch.count, &dims, threads) {
        for i in 0..batch.count {
            let c_i = &mut c.data[i * batch.c_stride..];
            let a_i = MatRef { data: tail(a.data, i * batch.a_stride), ..a };
            let b_i = MatRef { data: tail(b.data, i * batch.b_stride), ..b };
            // SAFETY: `validate` checked that member `i` of each operand fits in its slice.
            unsafe { gemm_raw(dims, &a_i, &b_i, c_i, c_ld, accumulate, threads) };
        }
        return Ok(());
    }

    // One contiguous group of batch members per thread, each member single-threaded inside.
    let per_group = batch.count.div_ceil(threads);
    c.data.par_chunks_mut(per_group * batch.c_stride).take(batch.count.div_ceil(per_group)).enumerate().for_each(
        |(group, c_group)| {
            let first = group * per_group;
            let last = (first + per_group).min(batch.count);
            for i in first..last {
                let c_i = &mut c_group[(i - first) * batch.c_stride..];
                let a_i = MatRef { data: tail(a.data, i * batch.a_stride), ..a };
                let b_i = MatRef { data: tail(b.data, i * batch.b_stride), ..b };
                // SAFETY: `validate` checked that member `i` of each operand fits in its slice, and
                // that outputs of different members do not overlap, so groups write disjoint memory.
                unsafe { gemm_raw(dims, &a_i, &b_i, c_i, c_ld, accumulate, 1) };
            }
        },
    );
    Ok(())
}

/// Whether to give each thread whole batch members rather than split every product.
///
/// Across the batch there is no synchronisation and no shared packing, so it wins whenever the
/// members divide evenly over the threads, or are numerous enough that the uneven tail is small.
/// For a few large members with a remainder (3 over 2 threads), splitting inside is better. This is
/// the rule measured for convolutions, which are batches of products (BENCHMARKS.md, "Threads");
/// batched GEMM on its own has not been benchmarked.
fn split_across_batch(count: usize, dims: &GemmDims, threads: usize) -> bool {
    if threads <= 1 {
        return false;
    }
    // Below this the `gemm` crate runs single-threaded anyway (its own threshold is 48·48·256).
    let too_small_to_split = dims.m * dims.n * dims.k < 48 * 48 * 256;
    count.is_multiple_of(threads) || count >= 4 * threads || too_small_to_split
}

/// The slice from `offset` on; empty past the end. An operand with no elements (k = 0) may sit at an
/// offset beyond its slice, and is never read.
fn tail<T>(data: &[T], offset: usize) -> &[T] {
    &data[offset.min(data.len())..]
}

/// Elements a row-major `rows × cols` matrix with row stride `ld` spans.
fn span(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * ld + cols
    }
}

fn check_operand<T>(
    name: &str,
    op: &MatRef<'_, T>,
    rows: usize,
    cols: usize,
    count: usize,
    stride: usize,
) -> Result<()> {
    // Stored shape: the logical shape, swapped when transposed.
    let (stored_rows, stored_cols) = if op.trans { (cols, rows) } else { (rows, cols) };
    check_stored(name, op.data.len(), stored_rows, stored_cols, op.ld, count, stride)
}

fn check_stored(
    name: &str,
    len: usize,
    rows: usize,
    cols: usize,
    ld: usize,
    count: usize,
    stride: usize,
) -> Result<()> {
    if rows > 0 && cols > 0 && ld < cols {
        return Err(Error::shape("matmul", format!("{name}: leading dimension {ld} is less than its {cols} columns")));
    }
    let one = span(rows, cols, ld);
    let needed = if count == 0 || one == 0 { 0 } else { (count - 1) * stride + one };
    if len < needed {
        return Err(Error::shape(
            "matmul",
            format!("{name}: {count} matrices of {rows}×{cols} (ld {ld}, batch stride {stride}) need {needed} elements, got {len}"),
        ));
    }
    Ok(())
}

fn validate<T>(batch: &Batch, dims: &GemmDims, a: &MatRef<'_, T>, b: &MatRef<'_, T>, c: &MatMut<'_, T>) -> Result<()> {
    let GemmDims { m, n, k } = *dims;
    check_operand("A", a, m, k, batch.count, batch.a_stride)?;
    check_operand("B", b, k, n, batch.count, batch.b_stride)?;
    check_stored("C", c.data.len(), m, n, c.ld, batch.count, batch.c_stride)?;
    let c_span = span(m, n, c.ld);
    if batch.count > 1 && c_span > 0 && batch.c_stride < c_span {
        return Err(Error::shape(
            "matmul",
            format!(
                "C: batch stride {} is smaller than one {m}×{n} output (ld {}), outputs would overlap",
                batch.c_stride, c.ld
            ),
        ));
    }
    Ok(())
}

/// One product through the `gemm` crate.
///
/// # Safety
/// `a`, `b` and `c` must hold an `m × k`, `k × n` and `m × n` matrix in the layouts described (checked
/// by `validate`), and `c` must not overlap `a` or `b` (guaranteed by the borrow types).
unsafe fn gemm_raw<T: Float>(
    dims: GemmDims,
    a: &MatRef<'_, T>,
    b: &MatRef<'_, T>,
    c: &mut [T],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    let GemmDims { m, n, k } = dims;
    // (row stride, column stride) of op(X) in elements: a transposed row-major matrix is column-major.
    let strides = |x: &MatRef<'_, T>| if x.trans { (1isize, x.ld as isize) } else { (x.ld as isize, 1isize) };
    let (a_rs, a_cs) = strides(a);
    let (b_rs, b_cs) = strides(b);
    let parallelism = if threads <= 1 { Parallelism::None } else { Parallelism::Rayon(threads) };
    // SAFETY: forwarded from the caller; `gemm` reads `dst` only when `read_dst` (accumulate) is set,
    // computing dst = alpha·dst + beta·lhs·rhs with alpha = beta = 1.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        )
    }
}
