//! The library argument builders: pure functions from the seam's [`Gemm`] and [`Conv`] (cuBLAS / cuDNN semantics,
//! as `engine/device/blas.rs` and `engine/device/dnn.rs` define and emulate them) to the exact parameters the real
//! libraries are called with: cuBLASLt matrix layouts, transposes and heuristic preferences, the
//! `cublasGemmStridedBatchedEx` fallback's arguments, and cuDNN tensor / filter / convolution descriptor values.
//!
//! Nothing here calls a library, so every value can be checked on the CPU (the tests rebuild the seam's
//! descriptor from the library parameters, reading them as the library documentation defines them, for every GEMM
//! and convolution of a lowered training step). `engine/cuda/device.rs` only copies these values into descriptors.

use crate::engine::device::{blas, dnn, Conv, ConvDirection, ConvMath, Gemm, GemmCompute, Layout4, Transpose};
use crate::error::{Error, Result};
use crate::graph::DType;
use cudarc::cublas::sys as blas_sys;
use cudarc::cublaslt::sys as lt_sys;
use cudarc::cudnn::sys as dnn_sys;

/// cuBLASLt's `cudaDataType_t` for a GEMM operand type.
pub fn lt_type(d: DType) -> Result<lt_sys::cudaDataType_t> {
    match d {
        DType::F32 => Ok(lt_sys::cudaDataType_t::CUDA_R_32F),
        DType::BF16 => Ok(lt_sys::cudaDataType_t::CUDA_R_16BF),
        DType::F16 => Ok(lt_sys::cudaDataType_t::CUDA_R_16F),
        other => Err(Error::Unsupported { backend: "cuda", msg: format!("no cuBLAS GEMM on {other}") }),
    }
}

/// cuBLAS's `cudaDataType_t` (the same values; a distinct Rust type in cudarc).
pub fn blas_type(d: DType) -> Result<blas_sys::cudaDataType_t> {
    match d {
        DType::F32 => Ok(blas_sys::cudaDataType_t::CUDA_R_32F),
        DType::BF16 => Ok(blas_sys::cudaDataType_t::CUDA_R_16BF),
        DType::F16 => Ok(blas_sys::cudaDataType_t::CUDA_R_16F),
        other => Err(Error::Unsupported { backend: "cuda", msg: format!("no cuBLAS GEMM on {other}") }),
    }
}

fn lt_op(t: Transpose) -> blas_sys::cublasOperation_t {
    match t {
        Transpose::N => blas_sys::cublasOperation_t::CUBLAS_OP_N,
        Transpose::T => blas_sys::cublasOperation_t::CUBLAS_OP_T,
    }
}

/// One cuBLASLt matrix layout (`cublasLtMatrixLayoutCreate(type, rows, cols, ld)` plus the batch attributes),
/// column-major (the default `CUBLASLT_ORDER_COL`): the matrix as stored, before any transpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LtLayout {
    pub dtype: lt_sys::cudaDataType_t,
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
    /// `CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT` (int32).
    pub batch: i32,
    /// `CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET` in elements (int64); 0 shares one matrix.
    pub stride: i64,
}

/// Everything one `cublasLtMatmul` needs besides pointers and handles: `D = alpha op(A) op(B) + beta C`, with C
/// and D the same matrix (the seam's GEMM is in place on C).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LtMatmul {
    /// `CUBLASLT_MATMUL_DESC_COMPUTE_TYPE`: `CUBLAS_COMPUTE_32F` (strict, also for bf16/f16 inputs) or
    /// `_32F_FAST_TF32` (opt-in, f32 inputs only).
    pub compute: lt_sys::cublasComputeType_t,
    /// `CUBLASLT_MATMUL_DESC_SCALE_TYPE`: alpha and beta are f32 host values.
    pub scale: lt_sys::cudaDataType_t,
    pub transa: blas_sys::cublasOperation_t,
    pub transb: blas_sys::cublasOperation_t,
    pub a: LtLayout,
    pub b: LtLayout,
    pub c: LtLayout,
    pub d: LtLayout,
    pub alpha: f32,
    pub beta: f32,
    /// `CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES`: the planned workspace.
    pub max_workspace: u64,
    /// `CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_{A,B,C,D}_BYTES`: what the pointers, leading dimensions and strides
    /// really guarantee (the default, 256, would let the heuristic pick kernels that fault on less).
    pub min_alignment: [u32; 4],
}

/// The largest power of two, at most 256, dividing the operand's address and (in bytes) its leading dimension and
/// batch stride: every column of every batch instance starts at a multiple of it.
pub fn alignment(ptr: u64, ld: u64, stride: u64, elem: u64) -> u32 {
    let mut a = 256u64;
    for v in [ptr, ld * elem, stride * elem] {
        if v != 0 {
            a = a.min(1 << v.trailing_zeros().min(8));
        }
    }
    a as u32
}

fn i64_of(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::msg(format!("gemm: {what} = {v} exceeds cuBLASLt's int64")))
}

/// The cuBLASLt parameters of `g`, after checking `g` as the emulated cuBLAS does ([`blas::validate`]).
///
/// Layouts describe each operand as stored: A is m×k for `transa == N`, else k×m; B is k×n for `transb == N`,
/// else n×k; C and D are m×n with C's type, leading dimension and stride. The batch count is on every layout
/// (cuBLASLt requires them to agree), the stride per operand.
pub fn lt_matmul(g: &Gemm) -> Result<LtMatmul> {
    blas::validate(g)?;
    let batch = i32::try_from(g.batch).map_err(|_| Error::msg(format!("gemm: batch {} exceeds int32", g.batch)))?;
    let stored = |t: Transpose, r: u64, c: u64| if t == Transpose::N { (r, c) } else { (c, r) };
    let (ar, ac) = stored(g.transa, g.m, g.k);
    let (br, bc) = stored(g.transb, g.k, g.n);
    let layout = |x: &crate::engine::device::MatrixRef, rows, cols, name: &str| -> Result<LtLayout> {
        Ok(LtLayout {
            dtype: lt_type(x.dtype)?,
            rows,
            cols,
            ld: i64_of(x.ld, &format!("ld{name}"))?,
            batch,
            stride: i64_of(x.stride, &format!("stride_{name}"))?,
        })
    };
    let c = layout(&g.c, g.m, g.n, "c")?;
    let compute = match g.compute {
        GemmCompute::F32 => lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        GemmCompute::F32FastTf32 => lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
    };
    let align = |x: &crate::engine::device::MatrixRef| alignment(x.ptr.0, x.ld, x.stride, x.dtype.size() as u64);
    Ok(LtMatmul {
        compute,
        scale: lt_sys::cudaDataType_t::CUDA_R_32F,
        transa: lt_op(g.transa),
        transb: lt_op(g.transb),
        a: layout(&g.a, ar, ac, "a")?,
        b: layout(&g.b, br, bc, "b")?,
        c,
        d: c,
        alpha: g.alpha,
        beta: g.beta,
        max_workspace: g.workspace.bytes,
        min_alignment: [align(&g.a), align(&g.b), align(&g.c), align(&g.c)],
    })
}

/// The arguments of `cublasGemmStridedBatchedEx` (the fallback when cuBLASLt's heuristic offers nothing), whose
/// sizes and leading dimensions are `int`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmExArgs {
    pub transa: blas_sys::cublasOperation_t,
    pub transb: blas_sys::cublasOperation_t,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub a_type: blas_sys::cudaDataType_t,
    pub lda: i32,
    pub stride_a: i64,
    pub b_type: blas_sys::cudaDataType_t,
    pub ldb: i32,
    pub stride_b: i64,
    pub c_type: blas_sys::cudaDataType_t,
    pub ldc: i32,
    pub stride_c: i64,
    pub batch: i32,
    pub compute: blas_sys::cublasComputeType_t,
    pub alpha: f32,
    pub beta: f32,
}

/// The `cublasGemmStridedBatchedEx` arguments of `g`: the same column-major parameters, checked to fit `int`.
pub fn gemm_ex(g: &Gemm) -> Result<GemmExArgs> {
    blas::validate(g)?;
    let int = |v: u64, what: &str| {
        i32::try_from(v).map_err(|_| Error::msg(format!("gemm: {what} = {v} exceeds the int of classic cuBLAS")))
    };
    let compute = match g.compute {
        GemmCompute::F32 => blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        GemmCompute::F32FastTf32 => blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
    };
    Ok(GemmExArgs {
        transa: lt_op(g.transa),
        transb: lt_op(g.transb),
        m: int(g.m, "m")?,
        n: int(g.n, "n")?,
        k: int(g.k, "k")?,
        a_type: blas_type(g.a.dtype)?,
        lda: int(g.a.ld, "lda")?,
        stride_a: i64_of(g.a.stride, "stride_a")?,
        b_type: blas_type(g.b.dtype)?,
        ldb: int(g.b.ld, "ldb")?,
        stride_b: i64_of(g.b.stride, "stride_b")?,
        c_type: blas_type(g.c.dtype)?,
        ldc: int(g.c.ld, "ldc")?,
        stride_c: i64_of(g.c.stride, "stride_c")?,
        batch: int(g.batch, "batch")?,
        compute,
        alpha: g.alpha,
        beta: g.beta,
    })
}

/// cuDNN's data type of a convolution operand.
pub fn dnn_type(d: DType) -> Result<dnn_sys::cudnnDataType_t> {
    match d {
        DType::F32 => Ok(dnn_sys::cudnnDataType_t::CUDNN_DATA_FLOAT),
        DType::BF16 => Ok(dnn_sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16),
        DType::F16 => Ok(dnn_sys::cudnnDataType_t::CUDNN_DATA_HALF),
        other => Err(Error::Unsupported { backend: "cuda", msg: format!("no cuDNN convolution on {other}") }),
    }
}

fn dnn_format(l: Layout4) -> dnn_sys::cudnnTensorFormat_t {
    match l {
        Layout4::Nchw => dnn_sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
        Layout4::Nhwc => dnn_sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
    }
}

/// cuDNN's math type for the seam's [`ConvMath`]: strict f32 is `CUDNN_FMA_MATH`, because `CUDNN_DEFAULT_MATH`
/// permits TF32 tensor cores for f32 data on Ampere and later (cuDNN API reference, `cudnnMathType_t`).
pub fn dnn_math(m: ConvMath) -> dnn_sys::cudnnMathType_t {
    match m {
        ConvMath::Fma => dnn_sys::cudnnMathType_t::CUDNN_FMA_MATH,
        ConvMath::Default => dnn_sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        ConvMath::TensorOp => dnn_sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    }
}

/// `cudnnSetTensor4dDescriptor(format, dtype, n, c, h, w)`: dims in N,C,H,W order whatever the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    pub format: dnn_sys::cudnnTensorFormat_t,
    pub dtype: dnn_sys::cudnnDataType_t,
    pub dims: [i32; 4],
}

/// `cudnnSetFilter4dDescriptor(dtype, format, k, c, r, s)`: NCHW format means KCRS memory, NHWC means KRSC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterDesc {
    pub dtype: dnn_sys::cudnnDataType_t,
    pub format: dnn_sys::cudnnTensorFormat_t,
    pub dims: [i32; 4],
}

/// `cudnnSetConvolution2dDescriptor(pad_h, pad_w, u, v, dilation_h, dilation_w, mode, compute)` and
/// `cudnnSetConvolutionMathType(math)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDesc {
    pub pad: [i32; 2],
    pub stride: [i32; 2],
    pub dilation: [i32; 2],
    pub mode: dnn_sys::cudnnConvolutionMode_t,
    pub compute: dnn_sys::cudnnDataType_t,
    pub math: dnn_sys::cudnnMathType_t,
}

/// The descriptors of one legacy-API convolution. `x`, `w` and `y` are the forward roles: backward data reads dy
/// from `y` and writes dx to `x`; backward filter reads x and dy and writes dw to `w`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DnnConv {
    pub direction: ConvDirection,
    pub x: TensorDesc,
    pub w: FilterDesc,
    pub y: TensorDesc,
    pub conv: ConvDesc,
    /// What `cudnnGetConvolution2dForwardOutputDim` must return for these descriptors: y's dims.
    pub output_dims: [i32; 4],
    pub alpha: f32,
    pub beta: f32,
    /// The workspace the algorithm may use (planned scratch).
    pub max_workspace: u64,
}

/// The cuDNN descriptors of `c`, after checking `c` as the emulated cuDNN does ([`dnn::validate`], which also
/// bounds every dim by `i32::MAX`). Cross-correlation, dilation 1, compute type FLOAT (f32 accumulation also for
/// bf16/f16 data: the PSEUDO_BFLOAT16 / PSEUDO_HALF configurations).
pub fn dnn_conv(c: &Conv) -> Result<DnnConv> {
    dnn::validate(c)?;
    let dt = dnn_type(c.x.dtype)?;
    let dims = |d: &[u64; 4]| d.map(|v| v as i32);
    let tensor = |t: &crate::engine::device::Tensor4| TensorDesc {
        format: dnn_format(t.layout),
        dtype: dt,
        dims: dims(&t.dims),
    };
    let pair = |p: [u64; 2]| p.map(|v| v as i32);
    Ok(DnnConv {
        direction: c.direction,
        x: tensor(&c.x),
        w: FilterDesc { dtype: dt, format: dnn_format(c.w.layout), dims: dims(&c.w.dims) },
        y: tensor(&c.y),
        conv: ConvDesc {
            pad: pair(c.padding),
            stride: pair(c.stride),
            dilation: [1, 1],
            mode: dnn_sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            compute: dnn_sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            math: dnn_math(c.math),
        },
        output_dims: dims(&c.y.dims),
        alpha: c.alpha,
        beta: c.beta,
        max_workspace: c.workspace.bytes,
    })
}

/// One entry of a `cudnnGet*Algorithm_v7` perf list, direction-independent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlgoPerf {
    pub algo: u32,
    pub ok: bool,
    pub memory: u64,
    pub deterministic: bool,
    pub math: dnn_sys::cudnnMathType_t,
}

/// Whether an algorithm's math type keeps the numerics the descriptor asked for: strict f32 accepts only FMA
/// kernels; the TF32 opt-in accepts FMA and default math; bf16/f16 accept tensor-op and FMA math.
pub fn math_allowed(wanted: ConvMath, got: dnn_sys::cudnnMathType_t) -> bool {
    use dnn_sys::cudnnMathType_t::*;
    match wanted {
        ConvMath::Fma => got == CUDNN_FMA_MATH,
        ConvMath::Default => matches!(got, CUDNN_FMA_MATH | CUDNN_DEFAULT_MATH),
        ConvMath::TensorOp => matches!(got, CUDNN_TENSOR_OP_MATH | CUDNN_FMA_MATH | CUDNN_DEFAULT_MATH),
    }
}

/// The algorithm to use, chosen once: the first entry of cuDNN's perf list (sorted fastest first) that succeeded,
/// is deterministic (results must not depend on the run; bwd-filter algorithms 0 and 3 use atomics), fits the
/// planned workspace and has an allowed math type. None when nothing qualifies; the error then lists `perfs`.
pub fn choose_algo(perfs: &[AlgoPerf], max_workspace: u64, math: ConvMath) -> Option<AlgoPerf> {
    perfs.iter().copied().find(|p| p.ok && p.deterministic && p.memory <= max_workspace && math_allowed(math, p.math))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::device::{DevPtr, Filter4, MatrixRef, Span, Tensor4};

    #[test]
    fn alignment_is_the_largest_power_of_two_dividing_every_column_start() {
        assert_eq!(alignment(0x1000, 64, 4096, 4), 256);
        assert_eq!(alignment(0x1000, 77, 0, 2), 2); // ld 77 bf16: 154-byte columns
        assert_eq!(alignment(0x1010, 64, 0, 4), 16);
        assert_eq!(alignment(0x1000, 8, 40, 2), 16);
        assert_eq!(alignment(0, 0, 0, 4), 256);
    }

    #[test]
    fn algorithms_are_deterministic_fit_the_workspace_and_keep_strict_math() {
        use dnn_sys::cudnnMathType_t::*;
        let p = |algo, ok, memory, deterministic, math| AlgoPerf { algo, ok, memory, deterministic, math };
        let perfs = [
            p(0, true, 0, false, CUDNN_FMA_MATH),
            p(1, false, 0, true, CUDNN_FMA_MATH),
            p(2, true, 1 << 20, true, CUDNN_FMA_MATH),
            p(3, true, 0, true, CUDNN_DEFAULT_MATH),
            p(5, true, 0, true, CUDNN_FMA_MATH),
        ];
        assert_eq!(choose_algo(&perfs, 0, ConvMath::Fma).map(|p| p.algo), Some(5));
        assert_eq!(choose_algo(&perfs, 1 << 20, ConvMath::Fma).map(|p| p.algo), Some(2));
        assert_eq!(choose_algo(&perfs, 0, ConvMath::Default).map(|p| p.algo), Some(3));
        assert_eq!(choose_algo(&perfs[..4], 0, ConvMath::Fma), None);
        assert_eq!(dnn_math(ConvMath::Fma), CUDNN_FMA_MATH);
    }

    /// A plain f32 GEMM of column-major m×k and k×n operands at `a`, `b`, `c` (leading dims as packed).
    fn gemm(m: u64, n: u64, k: u64, [a, b, c]: [u64; 3], workspace: Span) -> Gemm {
        let mat = |ptr, ld| MatrixRef { ptr: DevPtr(ptr), dtype: DType::F32, ld, stride: 0 };
        Gemm {
            transa: Transpose::N,
            transb: Transpose::N,
            m,
            n,
            k,
            alpha: 1.0,
            beta: 0.0,
            a: mat(a, m),
            b: mat(b, k),
            c: mat(c, m),
            batch: 1,
            compute: GemmCompute::F32,
            workspace,
        }
    }

    /// A forward 3x3 convolution of a [1, 3, 8, 8] input into `y_dims`, no padding (so [1, 4, 6, 6] is right).
    fn conv(y_dims: [u64; 4], workspace: Span) -> Conv {
        let t = |dims, ptr| Tensor4 { dims, layout: Layout4::Nchw, dtype: DType::F32, ptr: DevPtr(ptr) };
        Conv {
            direction: ConvDirection::Forward,
            x: t([1, 3, 8, 8], 0x1000),
            w: Filter4 { dims: [4, 3, 3, 3], layout: Layout4::Nchw, dtype: DType::F32, ptr: DevPtr(0x10000) },
            y: t(y_dims, 0x20000),
            padding: [0, 0],
            stride: [1, 1],
            alpha: 1.0,
            beta: 0.0,
            math: ConvMath::Fma,
            algo: 0,
            workspace,
        }
    }

    /// cuBLASLt's heuristic and cuDNN's choice are offered the workspace the plan gave the command, so the
    /// algorithms that need one (split-K, most implicit-GEMM, Winograd and FFT convolutions) are in reach.
    #[test]
    fn the_libraries_are_offered_the_planned_workspace() {
        use dnn_sys::cudnnMathType_t::*;
        let planned = crate::engine::gpu::LIBRARY_WORKSPACE;
        let ws = Span::new(DevPtr(0x4000_0000), planned);
        assert_eq!(lt_matmul(&gemm(3, 5, 4, [0x1000, 0x2000, 0x3000], ws)).unwrap().max_workspace, planned);
        let c = conv([1, 4, 6, 6], ws);
        let d = dnn_conv(&c).unwrap();
        assert_eq!(d.max_workspace, planned);
        let p = |algo, memory| AlgoPerf { algo, ok: true, memory, deterministic: true, math: CUDNN_FMA_MATH };
        // The fastest needs 8 MiB: chosen with the planned workspace, out of reach with none.
        let perfs = [p(1, 8 << 20), p(0, 0)];
        assert_eq!(choose_algo(&perfs, d.max_workspace, c.math).map(|p| p.algo), Some(1));
        assert_eq!(choose_algo(&perfs, 0, c.math).map(|p| p.algo), Some(0));
        // One byte beyond the plan is still refused.
        let perfs = [p(1, planned + 1), p(0, 0)];
        assert_eq!(choose_algo(&perfs, d.max_workspace, c.math).map(|p| p.algo), Some(0));
    }

    #[test]
    fn the_fallback_refuses_sizes_beyond_int() {
        let g = gemm(1 << 31, 1, 1, [0x1000, 0x10_0000_0000, 0x20_0000_0000], Span::new(DevPtr::NULL, 0));
        let e = gemm_ex(&g).unwrap_err().to_string();
        assert!(e.contains("m = 2147483648") && e.contains("int"), "{e}");
        // cuBLASLt's 64-bit sizes take it.
        let lt = lt_matmul(&g).unwrap();
        assert_eq!((lt.a.rows, lt.a.ld), (1 << 31, 1 << 31));
    }

    #[test]
    fn invalid_descriptors_fail_before_any_library_sees_them() {
        // 8x8 with a 3x3 filter, no padding: 6x6, not 8x8.
        let e = dnn_conv(&conv([1, 4, 8, 8], Span::new(DevPtr::NULL, 0))).unwrap_err().to_string();
        assert!(e.contains("cudnnGetConvolution2dForwardOutputDim"), "{e}");
    }
}
