//! Emulated cuBLAS: a strided-batched GEMM with `cublasGemmStridedBatchedEx` / `cublasLtMatmul` semantics, written
//! from the cuBLAS documentation and deliberately independent of the lowering that builds [`Gemm`]s.
//!
//! - [`validate`] rejects what cuBLAS rejects (and the few things it leaves undefined that would make an emulated
//!   result meaningless), with one error naming the parameter and its value.
//! - [`footprint`] gives the exact byte range each operand can touch, for the emulated device's liveness and
//!   write checks.
//! - [`execute`] is a naive triple loop: products and sums in f64, one rounding to C's type at the end, C not read
//!   when `beta == 0`, TF32 rounding of the inputs for [`GemmCompute::F32FastTf32`].
//!
//! Semantics (cuBLAS Library User Guide, "cublas<t>gemmStridedBatched" and "cublasGemmStridedBatchedEx"):
//! `C[b] = alpha * op(A[b]) * op(B[b]) + beta * C[b]` for `b < batch`, column-major, element (i, j) of a matrix at
//! `i + j * ld`, `X[b]` starting `b * stride` elements after `X.ptr`, `op(A)` m×k, `op(B)` k×n, C m×n.

use super::{DevPtr, Gemm, GemmCompute, MatrixRef, Span, Transpose};
use crate::error::{Error, Result};
use crate::graph::DType;

/// The byte range each operand of a [`Gemm`] can touch (reads of A and B, reads and writes of C). A span is empty
/// (0 bytes) when the operand has no elements. Exact for any `Gemm` that [`validate`] accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmFootprint {
    pub a: Span,
    pub b: Span,
    pub c: Span,
}

/// (rows, cols) of A, B and C as stored (before `op`), in elements.
fn stored_shapes(g: &Gemm) -> [(u64, u64); 3] {
    let a = match g.transa {
        Transpose::N => (g.m, g.k),
        Transpose::T => (g.k, g.m),
    };
    let b = match g.transb {
        Transpose::N => (g.k, g.n),
        Transpose::T => (g.n, g.k),
    };
    [a, b, (g.m, g.n)]
}

/// `((batch-1)*stride + (cols-1)*ld + rows) * elem` bytes, 0 when the operand has no elements; None on overflow.
fn operand_bytes(rows: u64, cols: u64, x: &MatrixRef, batch: u64) -> Option<u64> {
    if rows == 0 || cols == 0 || batch == 0 {
        return Some(0);
    }
    let elems = (batch - 1).checked_mul(x.stride)?.checked_add((cols - 1).checked_mul(x.ld)?)?.checked_add(rows)?;
    elems.checked_mul(x.dtype.size() as u64)
}

/// The byte range each operand can touch: from `X.ptr`, `((batch-1)*stride + (cols-1)*ld + rows) * elem_size`
/// bytes, with (rows, cols) the operand as stored (A is m×k for `transa == N`, k×m otherwise; B is k×n for
/// `transb == N`, n×k otherwise; C is m×n); 0 bytes when rows or cols is 0. Sizes that overflow u64 (which
/// [`validate`] rejects) saturate.
pub fn footprint(g: &Gemm) -> GemmFootprint {
    let [(ar, ac), (br, bc), (cr, cc)] = stored_shapes(g);
    let span = |rows, cols, x: &MatrixRef| Span::new(x.ptr, operand_bytes(rows, cols, x, g.batch).unwrap_or(u64::MAX));
    GemmFootprint { a: span(ar, ac, &g.a), b: span(br, bc, &g.b), c: span(cr, cc, &g.c) }
}

fn err(msg: String) -> Error {
    Error::msg(format!("gemm: {msg}"))
}

fn trans_name(t: Transpose) -> &'static str {
    match t {
        Transpose::N => "N",
        Transpose::T => "T",
    }
}

/// True when two non-empty byte ranges share a byte.
fn spans_overlap(a: &Span, b: &Span) -> bool {
    a.bytes > 0 && b.bytes > 0 && a.ptr.0 < b.end() && b.ptr.0 < a.end()
}

/// True when two batch instances of an m×n column-major matrix with leading dimension `ld` and batch stride `s`
/// share an element: some `d` in 1..batch has `d*s = di + dj*ld` with |di| < m, |dj| < n. Since `ld >= m`, only
/// `dj = floor(d*s / ld)` and the next one can work. Exact, so interleaved batches (stride m, ld = batch*m, as
/// for a head-interleaved attention output) are accepted and stride 0 with batch > 1 is rejected.
fn batches_overlap(m: u64, n: u64, ld: u64, s: u64, batch: u64) -> bool {
    if m == 0 || n == 0 || batch < 2 {
        return false;
    }
    (1..batch).any(|d| {
        let v = d as u128 * s as u128;
        let (q, r) = (v / ld as u128, v % ld as u128);
        let (m, n, ld) = (m as u128, n as u128, ld as u128);
        (r < m && q < n) || (ld - r < m && q + 1 < n)
    })
}

/// Checks `g` against what cuBLAS accepts; one error naming the offending parameter and its value.
///
/// Rules and their sources (cuBLAS Library User Guide unless stated):
/// - `batch >= 1`. Deliberately stricter than `cublasGemmStridedBatchedEx`, whose documented error is only
///   "batchCount < 0" (0 is a quick return): the CUDA executor runs GEMMs through cuBLASLt, where the batch is
///   `CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT` (int32, "number of matmul operations to perform", default 1), and a
///   GEMM of no instances in a compiled training step is a lowering bug rather than a no-op to reproduce. Also
///   `batch <= i32::MAX` (that attribute is an `int32_t`).
/// - m, n, k = 0 are accepted, as cuBLAS accepts them (cublas<t>gemm: "CUBLAS_STATUS_INVALID_VALUE If m, n,
///   k < 0 ..."): m or n = 0
///   touches nothing; k = 0 leaves `C = beta * C` (the BLAS definition with an empty sum; `execute` does that).
/// - `lda >= max(1, m)` when `transa == N`, `>= max(1, k)` otherwise; `ldb >= max(1, k)` when `transb == N`,
///   `>= max(1, n)` otherwise; `ldc >= max(1, m)` (cublas<t>gemm, error CUBLAS_STATUS_INVALID_VALUE). Leading
///   dimensions and strides fit in i64 (cuBLASLt's `CUBLASLT_MATRIX_LAYOUT_LD` / `..._STRIDED_BATCH_OFFSET` are
///   `int64_t`).
/// - Types (cublasGemmEx, table of supported type combinations for CUBLAS_COMPUTE_32F and
///   CUBLAS_COMPUTE_32F_FAST_TF32): A and B of one type among f32 (CUDA_R_32F), bf16 (CUDA_R_16BF), f16
///   (CUDA_R_16F); C of that type or f32 (for f32 inputs that is f32). f64 and integer types are refused (this
///   seam has no f64 or integer GEMM). `F32FastTf32` only with f32 inputs (CUBLAS_COMPUTE_32F_FAST_TF32 lists
///   only CUDA_R_32F for A, B and C).
/// - Pointers of operands with elements are non-null ("C == NULL if C needs to be scaled" is an error; a null A
///   or B would fault) and aligned to their element size (a misaligned pointer is an illegal address on a GPU).
/// - No two batch instances of C share an element (the instances are independent GEMMs that cuBLAS runs
///   concurrently, so overlapping outputs have no defined result). The test is exact (see `batches_overlap`): it
///   implies `stride_c >= ldc * n` for the common non-interleaved layout, rejects stride 0 for C with batch > 1,
///   and accepts interleaved instances that share no element. Strides of A and B are free (0 shares one
///   matrix across the batch).
/// - C's footprint does not overlap A's or B's (cuBLAS does not support in-place GEMMs: results are undefined),
///   nor the workspace's.
/// - A workspace of more than 0 bytes has a non-null pointer aligned to 256 bytes (cublasLtMatmul's workspace
///   argument must be 256-byte aligned; cublasSetWorkspace returns CUBLAS_STATUS_INVALID_VALUE for a workspace
///   aligned to less than 256 bytes) and does not overlap A, B or C.
/// - Every footprint fits in the 64-bit address space.
pub fn validate(g: &Gemm) -> Result<()> {
    if g.batch == 0 {
        return Err(err("batch = 0: a strided-batched GEMM needs batch >= 1".into()));
    }
    if g.batch > i32::MAX as u64 {
        return Err(err(format!("batch = {} exceeds cuBLASLt's int32 batch count", g.batch)));
    }

    // Types.
    let ta = g.a.dtype;
    if !matches!(ta, DType::F32 | DType::BF16 | DType::F16) {
        return Err(err(format!("A dtype {ta} is not supported (f32, bf16 or f16)")));
    }
    if g.b.dtype != ta {
        return Err(err(format!("B dtype {} differs from A dtype {ta} (cuBLAS needs one input type)", g.b.dtype)));
    }
    if g.c.dtype != ta && g.c.dtype != DType::F32 {
        return Err(err(format!("C dtype {} is not supported with {ta} inputs (C must be {ta} or f32)", g.c.dtype)));
    }
    if g.compute == GemmCompute::F32FastTf32 && ta != DType::F32 {
        return Err(err(format!("compute F32FastTf32 needs f32 inputs, A and B are {ta}")));
    }

    // Leading dimensions and strides.
    let [(ar, ac), (br, bc), (cr, cc)] = stored_shapes(g);
    for (name, x, rows, what) in [
        (
            "lda",
            &g.a,
            ar,
            format!(
                "rows of A as stored (transa = {}: {})",
                trans_name(g.transa),
                if g.transa == Transpose::N { "m" } else { "k" }
            ),
        ),
        (
            "ldb",
            &g.b,
            br,
            format!(
                "rows of B as stored (transb = {}: {})",
                trans_name(g.transb),
                if g.transb == Transpose::N { "k" } else { "n" }
            ),
        ),
        ("ldc", &g.c, cr, "rows of C (m)".to_string()),
    ] {
        if x.ld < rows.max(1) {
            return Err(err(format!("{name} = {} is less than max(1, {what}) = {}", x.ld, rows.max(1))));
        }
        if x.ld > i64::MAX as u64 {
            return Err(err(format!("{name} = {} exceeds i64", x.ld)));
        }
    }
    for (name, x) in [("stride_a", &g.a), ("stride_b", &g.b), ("stride_c", &g.c)] {
        if x.stride > i64::MAX as u64 {
            return Err(err(format!("{name} = {} exceeds i64", x.stride)));
        }
    }

    // Footprints.
    let mut spans = [Span::new(DevPtr::NULL, 0); 3];
    for (i, (name, x, rows, cols)) in
        [("A", &g.a, ar, ac), ("B", &g.b, br, bc), ("C", &g.c, cr, cc)].into_iter().enumerate()
    {
        let bytes =
            operand_bytes(rows, cols, x, g.batch).filter(|&b| x.ptr.0.checked_add(b).is_some()).ok_or_else(|| {
                err(format!("{name} footprint overflows the address space (ld {}, stride {})", x.ld, x.stride))
            })?;
        if bytes > 0 && x.ptr == DevPtr::NULL {
            return Err(err(format!("{name} pointer is null but {name} has {rows}x{cols} elements")));
        }
        let size = x.dtype.size() as u64;
        if x.ptr.0 % size != 0 {
            return Err(err(format!(
                "{name} pointer {:#x} is not aligned to its element size ({size} bytes, {})",
                x.ptr.0, x.dtype
            )));
        }
        spans[i] = Span::new(x.ptr, bytes);
    }
    let [sa, sb, sc] = spans;

    if batches_overlap(g.m, g.n, g.c.ld, g.c.stride, g.batch) {
        return Err(err(format!(
            "stride_c = {} makes the {} batch instances of C (m = {}, n = {}, ldc = {}) overlap (stride_c >= ldc*n = {} \
             keeps them apart)",
            g.c.stride,
            g.batch,
            g.m,
            g.n,
            g.c.ld,
            g.c.ld.saturating_mul(g.n)
        )));
    }
    for (name, s) in [("A", &sa), ("B", &sb)] {
        if spans_overlap(&sc, s) {
            return Err(err(format!(
                "C [{:#x}, {:#x}) overlaps {name} [{:#x}, {:#x}): cuBLAS GEMMs are not in place",
                sc.ptr.0,
                sc.end(),
                s.ptr.0,
                s.end()
            )));
        }
    }

    // Workspace.
    let ws = g.workspace;
    if ws.bytes > 0 {
        if ws.ptr == DevPtr::NULL {
            return Err(err(format!("workspace pointer is null but workspace bytes = {}", ws.bytes)));
        }
        if !ws.ptr.0.is_multiple_of(256) {
            return Err(err(format!("workspace pointer {:#x} is not 256-byte aligned", ws.ptr.0)));
        }
        if ws.ptr.0.checked_add(ws.bytes).is_none() {
            return Err(err(format!("workspace ({} bytes) overflows the address space", ws.bytes)));
        }
        for (name, s) in [("A", &sa), ("B", &sb), ("C", &sc)] {
            if spans_overlap(&ws, s) {
                return Err(err(format!(
                    "workspace [{:#x}, {:#x}) overlaps {name} [{:#x}, {:#x})",
                    ws.ptr.0,
                    ws.end(),
                    s.ptr.0,
                    s.end()
                )));
            }
        }
    }
    Ok(())
}

/// Rounds an f32 to TF32 (8-bit exponent, 10-bit mantissa), to nearest, ties to even, as tensor cores read
/// f32 operands under CUBLAS_COMPUTE_32F_FAST_TF32. Infinities and NaNs pass through; a value above the largest
/// TF32 rounds to infinity.
fn round_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    let bits = x.to_bits();
    // 13 mantissa bits go; add half an ulp (minus one, plus the kept lsb: ties go to even).
    let rounded = bits + 0x0fff + ((bits >> 13) & 1);
    f32::from_bits(rounded & !0x1fff)
}

/// f64 to f32 rounding to odd: truncate toward zero, then set the last bit when inexact. A value rounded this way
/// and then to nearest even in a format with at least two fewer mantissa bits (bf16, f16) is rounded as if
/// directly from the f64, so the result is rounded once.
pub(crate) fn f64_to_f32_round_odd(v: f64) -> f32 {
    let f = v as f32;
    if v.is_nan() || f as f64 == v {
        return f;
    }
    // `f` is v rounded to nearest; step back toward zero when that rounded away from zero (also from infinity
    // to f32::MAX), which leaves the truncation.
    let bits = if (f as f64).abs() > v.abs() { f.to_bits() - 1 } else { f.to_bits() };
    f32::from_bits(bits | 1)
}

/// Reads one element at `addr` as f64 (exact for every supported type).
///
/// # Safety
/// `addr .. addr + dtype.size()` is readable, initialised memory.
pub(crate) unsafe fn read_elem(addr: u64, dtype: DType) -> f64 {
    let p = std::ptr::with_exposed_provenance::<u8>(addr as usize);
    // SAFETY: the caller guarantees `dtype.size()` readable bytes at `p`; `read_unaligned` needs no alignment and
    // every bit pattern is a valid value of these types.
    unsafe {
        match dtype {
            DType::F32 => p.cast::<f32>().read_unaligned() as f64,
            DType::BF16 => half::bf16::from_bits(p.cast::<u16>().read_unaligned()).to_f64(),
            DType::F16 => half::f16::from_bits(p.cast::<u16>().read_unaligned()).to_f64(),
            DType::F64 => p.cast::<f64>().read_unaligned(),
            DType::I32 => p.cast::<i32>().read_unaligned() as f64,
            DType::I64 => p.cast::<i64>().read_unaligned() as f64,
        }
    }
}

/// Rounds `v` once to `dtype` (to nearest, ties to even) and returns its bytes in memory order.
pub(crate) fn encode(v: f64, dtype: DType) -> ([u8; 8], usize) {
    let mut out = [0u8; 8];
    let n = dtype.size();
    match dtype {
        DType::F32 => out[..4].copy_from_slice(&(v as f32).to_ne_bytes()),
        DType::BF16 => out[..2].copy_from_slice(&half::bf16::from_f32(f64_to_f32_round_odd(v)).to_bits().to_ne_bytes()),
        DType::F16 => out[..2].copy_from_slice(&half::f16::from_f32(f64_to_f32_round_odd(v)).to_bits().to_ne_bytes()),
        DType::F64 => out.copy_from_slice(&v.to_ne_bytes()),
        DType::I32 => out[..4].copy_from_slice(&(v as i32).to_ne_bytes()),
        DType::I64 => out.copy_from_slice(&(v as i64).to_ne_bytes()),
    }
    (out, n)
}

/// Writes `v`, rounded once to `dtype`, at `addr`.
///
/// # Safety
/// `addr .. addr + dtype.size()` is writable memory that no live Rust reference covers.
unsafe fn write_elem(addr: u64, dtype: DType, v: f64) {
    let (bytes, n) = encode(v, dtype);
    let p = std::ptr::with_exposed_provenance_mut::<u8>(addr as usize);
    // SAFETY: the caller guarantees `n = dtype.size()` writable bytes at `p`, not aliased by a reference; `bytes`
    // is a local array, so the ranges do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, n) };
}

/// Fills a library call's workspace with 0xff (NaN in every float type): what a library leaves there is
/// unspecified, so nothing may rely on its contents, and live data placed there by mistake is destroyed visibly.
///
/// # Safety
/// `ws` (when not empty) is writable host memory that no Rust reference points into during the call.
pub(super) unsafe fn poison_workspace(ws: Span) {
    if ws.bytes > 0 {
        let p = std::ptr::with_exposed_provenance_mut::<u8>(ws.ptr.0 as usize);
        // SAFETY: the caller's guarantee.
        unsafe { std::ptr::write_bytes(p, 0xff, ws.bytes as usize) };
    }
}

/// Runs the GEMM on the host: validates it, then for each batch instance
/// `C[i + j*ldc] = alpha * sum_l opA(i, l) * opB(l, j) + beta * C[i + j*ldc]` for i < m, j < n, with
/// `opA(i, l) = A[i + l*lda]` (transa N) or `A[l + i*lda]` (T), likewise B. Inputs are read exactly (rounded to
/// TF32 first for `F32FastTf32`), products and sums are f64, and the result is rounded once to C's type. When
/// `beta == 0` C is not read (a NaN there does not propagate, as in cuBLAS: "if beta == 0, C does not have to be
/// a valid input"). Only the m×n elements of each C instance are written: padding rows (`m <= i < ldc`) and gaps
/// between instances are untouched. The workspace is filled with 0xff bytes first, as a library may leave it
/// holding anything (so a workspace that overlaps live data shows).
///
/// # Safety
/// - Every span of [`footprint`]`(g)` is valid, initialised host memory (A and B readable, C readable and
///   writable), as the emulated device's `DevPtr`s are host addresses, and stays so for the call; so is the
///   workspace span (writable).
/// - No Rust reference to C's or the workspace's span is live during the call, and C does not overlap A or B
///   (which [`validate`] also checks, with the workspace overlapping none of them).
pub unsafe fn execute(g: &Gemm) -> Result<()> {
    validate(g)?;
    // SAFETY: the caller guarantees the workspace writable and unaliased; validated to fit the address space.
    unsafe { poison_workspace(g.workspace) };
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
    let tf32 = g.compute == GemmCompute::F32FastTf32;
    let (alpha, beta) = (g.alpha as f64, g.beta as f64);
    let (sa, sb, sc) = (g.a.dtype.size() as u64, g.b.dtype.size() as u64, g.c.dtype.size() as u64);
    let input = |addr: u64, dtype: DType| -> f64 {
        // SAFETY: every address passed here is an element of A's or B's footprint (i < rows, l < cols,
        // b < batch of the operand as stored), which the caller guarantees readable.
        let v = unsafe { read_elem(addr, dtype) };
        if tf32 {
            round_tf32(v as f32) as f64
        } else {
            v
        }
    };
    // op(A) as m rows of k, op(B) as n columns of k: the inner loop is a contiguous dot product.
    let mut opa = vec![0f64; m * k];
    let mut opb = vec![0f64; n * k];
    for b in 0..g.batch {
        let a0 = g.a.ptr.0 + b * g.a.stride * sa;
        let b0 = g.b.ptr.0 + b * g.b.stride * sb;
        let c0 = g.c.ptr.0 + b * g.c.stride * sc;
        for i in 0..g.m {
            for l in 0..g.k {
                let e = match g.transa {
                    Transpose::N => i + l * g.a.ld,
                    Transpose::T => l + i * g.a.ld,
                };
                opa[i as usize * k + l as usize] = input(a0 + e * sa, g.a.dtype);
            }
        }
        for j in 0..g.n {
            for l in 0..g.k {
                let e = match g.transb {
                    Transpose::N => l + j * g.b.ld,
                    Transpose::T => j + l * g.b.ld,
                };
                opb[j as usize * k + l as usize] = input(b0 + e * sb, g.b.dtype);
            }
        }
        for j in 0..n {
            let bj = &opb[j * k..(j + 1) * k];
            for i in 0..m {
                let ai = &opa[i * k..(i + 1) * k];
                let sum = ai.iter().zip(bj).fold(0.0, |acc, (x, y)| acc + x * y);
                let addr = c0 + (i as u64 + j as u64 * g.c.ld) * sc;
                let mut v = alpha * sum;
                if beta != 0.0 {
                    // SAFETY: (i, j) with i < m, j < n of instance b is inside C's footprint, readable.
                    v += beta * unsafe { read_elem(addr, g.c.dtype) };
                }
                // SAFETY: the same element, writable and unaliased by the caller's contract; it is not in A's or B's
                // footprint (validated), so the inputs read above are unaffected.
                unsafe { write_elem(addr, g.c.dtype, v) };
            }
        }
    }
    Ok(())
}
