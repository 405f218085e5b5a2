//! The cuBLASLt / cuBLAS / cuDNN parameters the real device passes (`engine/cuda/args.rs`), checked on the CPU
//! against the seam's GEMM and convolution descriptors, which the emulated device executes with the libraries'
//! documented semantics.
//!
//! Each library parameter set is read back the way the library documentation defines it (a cuBLASLt layout
//! describes an operand as stored, op(A) is its transpose for TRANSA = T, D is m×n; cuDNN dims are N,C,H,W whatever
//! the format, an NCHW filter is KCRS, ...) into a seam descriptor, which must equal the one the lowering produced.
//! Every GEMM and convolution of whole lowered training steps is checked, up to the SD 1.5 ControlNet step: the
//! program is compiled on a device that only hands out addresses, so no memory or kernel is needed.

use std::path::Path;
use zeroconv::app::step;
use zeroconv::engine::cuda::args::{self, DnnConv, LtLayout, LtMatmul};
use zeroconv::engine::device::{
    Conv, Copy2d, DevPtr, Device, DeviceInfo, EventId, Filter4, Gemm, GemmCompute, GraphId, Launch, Layout4, MatrixRef,
    ModuleSource, Span, Stream, Tensor4, Transpose,
};
use zeroconv::engine::gpu::lower::Cmd;
use zeroconv::engine::gpu::{GpuBackend, StepMode, LIBRARY_WORKSPACE};
use zeroconv::engine::Backend;
use zeroconv::graph::DType;
use zeroconv::io::config::load_config;
use zeroconv::Result;

/// A device that only hands out 256-aligned addresses, so a program can be compiled (addresses planned, commands
/// lowered) at any size without memory.
struct AddressOnly {
    next: u64,
}

impl Device for AddressOnly {
    fn info(&self) -> DeviceInfo {
        DeviceInfo { name: "addresses only".into(), compute_capability: (9, 0), memory_bytes: 0 }
    }
    fn alloc(&mut self, bytes: u64, _what: &str) -> Result<DevPtr> {
        let p = self.next;
        self.next += bytes.div_ceil(1 << 20) * (1 << 20) + (1 << 20);
        Ok(DevPtr(p))
    }
    fn load_module(&mut self, _m: &ModuleSource) -> Result<()> {
        Ok(())
    }
    fn upload(&mut self, _dst: DevPtr, _src: &[u8]) -> Result<()> {
        Ok(())
    }
    fn download(&mut self, _dst: &mut [u8], _src: DevPtr) -> Result<()> {
        Ok(())
    }
    fn copy2d(&mut self, _s: Stream, _c: &Copy2d) -> Result<()> {
        Ok(())
    }
    fn memset(&mut self, _dst: DevPtr, _byte: u8, _bytes: u64) -> Result<()> {
        Ok(())
    }
    fn launch(&mut self, _l: &Launch) -> Result<()> {
        Ok(())
    }
    fn gemm(&mut self, _g: &Gemm) -> Result<()> {
        Ok(())
    }
    fn conv(&mut self, _c: &Conv) -> Result<()> {
        Ok(())
    }
    fn all_reduce(&mut self, _s: Stream, _b: DevPtr, _n: u64, _d: DType, _avg: bool) -> Result<()> {
        Ok(())
    }
    fn record(&mut self, _s: Stream, _e: EventId) -> Result<()> {
        Ok(())
    }
    fn wait(&mut self, _s: Stream, _e: EventId) -> Result<()> {
        Ok(())
    }
    fn begin_capture(&mut self) -> Result<()> {
        Ok(())
    }
    fn end_capture(&mut self) -> Result<GraphId> {
        Ok(GraphId(0))
    }
    fn replay(&mut self, _g: GraphId) -> Result<()> {
        Ok(())
    }
    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }
    fn mark(&mut self) -> Result<zeroconv::engine::device::Mark> {
        Ok(zeroconv::engine::device::Mark(0))
    }
    fn elapsed(
        &mut self,
        _from: zeroconv::engine::device::Mark,
        _to: zeroconv::engine::device::Mark,
    ) -> Result<std::time::Duration> {
        Ok(std::time::Duration::ZERO)
    }
    fn release_marks(&mut self) {}
}

/// Every command of one training step of `config`, with real planned addresses.
fn commands(config: &str, overrides: &[&str], batch: usize) -> Vec<Cmd> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(config);
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = load_config(Some(&path), &overrides).unwrap();
    let st = step::latent_step(&cfg, batch).unwrap();
    let opt = step::optimize(&cfg, &st, false).unwrap();
    let backend = GpuBackend::new(|| Ok(AddressOnly { next: 1 << 32 }), StepMode::Eager)
        .with_library_workspace(LIBRARY_WORKSPACE);
    let program = backend.compile(opt.graph).unwrap_or_else(|e| panic!("{config}: {e}"));
    program.all_commands().map(|(_, c)| c.clone()).collect()
}

fn dtype_of_lt(t: zeroconv_lt::cudaDataType_t) -> DType {
    use zeroconv_lt::cudaDataType_t::*;
    match t {
        CUDA_R_32F => DType::F32,
        CUDA_R_16BF => DType::BF16,
        CUDA_R_16F => DType::F16,
        other => panic!("unexpected cuBLASLt type {other:?}"),
    }
}

// The sys enums the builders produce, by their cudarc paths.
use cudarc::cublas::sys as zeroconv_blas;
use cudarc::cublaslt::sys as zeroconv_lt;
use cudarc::cudnn::sys as zeroconv_dnn;

fn op(o: zeroconv_blas::cublasOperation_t) -> Transpose {
    match o {
        zeroconv_blas::cublasOperation_t::CUBLAS_OP_N => Transpose::N,
        zeroconv_blas::cublasOperation_t::CUBLAS_OP_T => Transpose::T,
        other => panic!("unexpected operation {other:?}"),
    }
}

/// The GEMM cuBLASLt computes for these parameters (cuBLASLt docs, cublasLtMatmul: D = alpha op(A) op(B) + beta C,
/// op(A) m×k, op(B) k×n, C and D m×n; layouts give each matrix as stored, column-major).
fn gemm_from_lt(lt: &LtMatmul, ptrs: [DevPtr; 3], workspace: DevPtr) -> Gemm {
    let (transa, transb) = (op(lt.transa), op(lt.transb));
    let opshape = |l: &LtLayout, t: Transpose| if t == Transpose::N { (l.rows, l.cols) } else { (l.cols, l.rows) };
    let (m, n) = (lt.d.rows, lt.d.cols);
    let (am, ak) = opshape(&lt.a, transa);
    let (bk, bn) = opshape(&lt.b, transb);
    assert_eq!((am, bn), (m, n), "op(A) rows / op(B) cols must be D's");
    assert_eq!(ak, bk, "op(A) cols must equal op(B) rows");
    assert_eq!(lt.c, lt.d, "C and D are the same matrix");
    for l in [&lt.a, &lt.b, &lt.c] {
        assert_eq!(l.batch, lt.d.batch, "cuBLASLt needs one batch count on every layout");
    }
    assert_eq!(lt.scale, zeroconv_lt::cudaDataType_t::CUDA_R_32F);
    let mat =
        |l: &LtLayout, ptr| MatrixRef { ptr, dtype: dtype_of_lt(l.dtype), ld: l.ld as u64, stride: l.stride as u64 };
    let compute = match lt.compute {
        zeroconv_lt::cublasComputeType_t::CUBLAS_COMPUTE_32F => GemmCompute::F32,
        zeroconv_lt::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32 => GemmCompute::F32FastTf32,
        other => panic!("unexpected compute type {other:?}"),
    };
    Gemm {
        transa,
        transb,
        m,
        n,
        k: ak,
        alpha: lt.alpha,
        beta: lt.beta,
        a: mat(&lt.a, ptrs[0]),
        b: mat(&lt.b, ptrs[1]),
        c: mat(&lt.c, ptrs[2]),
        batch: lt.d.batch as u64,
        compute,
        workspace: Span::new(workspace, lt.max_workspace),
    }
}

/// The GEMM `cublasGemmStridedBatchedEx` computes for these arguments.
fn gemm_from_ex(a: &args::GemmExArgs, g: &Gemm) -> Gemm {
    let t = |d: zeroconv_blas::cudaDataType_t| match d {
        zeroconv_blas::cudaDataType_t::CUDA_R_32F => DType::F32,
        zeroconv_blas::cudaDataType_t::CUDA_R_16BF => DType::BF16,
        zeroconv_blas::cudaDataType_t::CUDA_R_16F => DType::F16,
        other => panic!("unexpected type {other:?}"),
    };
    let compute = match a.compute {
        zeroconv_blas::cublasComputeType_t::CUBLAS_COMPUTE_32F => GemmCompute::F32,
        zeroconv_blas::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32 => GemmCompute::F32FastTf32,
        other => panic!("unexpected compute type {other:?}"),
    };
    Gemm {
        transa: op(a.transa),
        transb: op(a.transb),
        m: a.m as u64,
        n: a.n as u64,
        k: a.k as u64,
        alpha: a.alpha,
        beta: a.beta,
        a: MatrixRef { ptr: g.a.ptr, dtype: t(a.a_type), ld: a.lda as u64, stride: a.stride_a as u64 },
        b: MatrixRef { ptr: g.b.ptr, dtype: t(a.b_type), ld: a.ldb as u64, stride: a.stride_b as u64 },
        c: MatrixRef { ptr: g.c.ptr, dtype: t(a.c_type), ld: a.ldc as u64, stride: a.stride_c as u64 },
        batch: a.batch as u64,
        compute,
        workspace: g.workspace,
    }
}

/// The convolution cuDNN computes for these descriptors (cuDNN API reference: dims in N,C,H,W / K,C,R,S order for
/// every format; NCHW means KCRS filters, NHWC means KRSC; cross-correlation; dilation 1; output dims from
/// cudnnGetConvolution2dForwardOutputDim).
fn conv_from_dnn(d: &DnnConv, c: &Conv) -> Conv {
    use zeroconv_dnn::cudnnDataType_t::*;
    use zeroconv_dnn::cudnnMathType_t::*;
    use zeroconv_dnn::cudnnTensorFormat_t::*;
    let dtype = |t| match t {
        CUDNN_DATA_FLOAT => DType::F32,
        CUDNN_DATA_BFLOAT16 => DType::BF16,
        CUDNN_DATA_HALF => DType::F16,
        other => panic!("unexpected cuDNN type {other:?}"),
    };
    let layout = |f| match f {
        CUDNN_TENSOR_NCHW => Layout4::Nchw,
        CUDNN_TENSOR_NHWC => Layout4::Nhwc,
        other => panic!("unexpected format {other:?}"),
    };
    let dims = |d: [i32; 4]| d.map(|v| u64::try_from(v).expect("positive dim"));
    assert_eq!(d.conv.mode, zeroconv_dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION);
    assert_eq!(d.conv.dilation, [1, 1]);
    assert_eq!(d.conv.compute, CUDNN_DATA_FLOAT, "f32 accumulation for every data type");
    // cudnnGetConvolution2dForwardOutputDim, dilation 1.
    let out = |i: usize, p: i32, r: i32, s: i32| 1 + (d.x.dims[i] + 2 * p - r) / s;
    let want = [
        d.x.dims[0],
        d.w.dims[0],
        out(2, d.conv.pad[0], d.w.dims[2], d.conv.stride[0]),
        out(3, d.conv.pad[1], d.w.dims[3], d.conv.stride[1]),
    ];
    assert_eq!(d.output_dims, want, "y dims differ from cudnnGetConvolution2dForwardOutputDim");
    assert_eq!(d.y.dims, want);
    assert_eq!(d.x.dims[1], d.w.dims[1], "one group: filter channels = input channels");
    let math = match d.conv.math {
        CUDNN_FMA_MATH => zeroconv::engine::device::ConvMath::Fma,
        CUDNN_DEFAULT_MATH => zeroconv::engine::device::ConvMath::Default,
        CUDNN_TENSOR_OP_MATH => zeroconv::engine::device::ConvMath::TensorOp,
        other => panic!("unexpected math {other:?}"),
    };
    Conv {
        direction: d.direction,
        x: Tensor4 { dims: dims(d.x.dims), layout: layout(d.x.format), dtype: dtype(d.x.dtype), ptr: c.x.ptr },
        w: Filter4 { dims: dims(d.w.dims), layout: layout(d.w.format), dtype: dtype(d.w.dtype), ptr: c.w.ptr },
        y: Tensor4 { dims: dims(d.y.dims), layout: layout(d.y.format), dtype: dtype(d.y.dtype), ptr: c.y.ptr },
        padding: d.conv.pad.map(|v| v as u64),
        stride: d.conv.stride.map(|v| v as u64),
        alpha: d.alpha,
        beta: d.beta,
        math,
        algo: c.algo,
        workspace: Span::new(c.workspace.ptr, d.max_workspace),
    }
}

/// Checks every GEMM and convolution of `cmds`, planned with a [`LIBRARY_WORKSPACE`] workspace, which is what
/// cuBLASLt's heuristic and cuDNN's algorithm choice must be offered; returns (gemms, fallback-capable gemms, convs).
fn check_all(what: &str, cmds: &[Cmd]) -> (usize, usize, usize) {
    let (mut gemms, mut ex, mut convs) = (0, 0, 0);
    for c in cmds {
        match c {
            Cmd::Gemm(g) => {
                gemms += 1;
                let lt = args::lt_matmul(g).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(lt.max_workspace, LIBRARY_WORKSPACE, "{what}: the heuristic's workspace limit");
                assert_eq!(gemm_from_lt(&lt, [g.a.ptr, g.b.ptr, g.c.ptr], g.workspace.ptr), *g, "{what}: {lt:?}");
                for (i, x) in [&g.a, &g.b, &g.c].into_iter().enumerate() {
                    let al = lt.min_alignment[i] as u64;
                    let es = x.dtype.size() as u64;
                    assert!(
                        x.ptr.0.is_multiple_of(al)
                            && (x.ld * es).is_multiple_of(al)
                            && (x.stride * es).is_multiple_of(al),
                        "{what}: promised alignment {al} does not hold for {x:?}"
                    );
                }
                if let Ok(a) = args::gemm_ex(g) {
                    ex += 1;
                    assert_eq!(gemm_from_ex(&a, g), *g, "{what}: {a:?}");
                }
            }
            Cmd::Conv(cv) => {
                convs += 1;
                let d = args::dnn_conv(cv).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(d.max_workspace, LIBRARY_WORKSPACE, "{what}: the algorithm choice's workspace limit");
                assert_eq!(conv_from_dnn(&d, cv), *cv, "{what}: {d:?}");
            }
            _ => {}
        }
    }
    (gemms, ex, convs)
}

#[test]
fn tiny_and_bench_small_steps_map_onto_the_libraries_exactly() {
    for (config, batch) in [("configs/tiny.yaml", 2), ("configs/bench_small.yaml", 2)] {
        for precision in ["32", "bf16-mixed"] {
            let what = format!("{config} {precision}");
            let cmds = commands(config, &[&format!("trainer.precision={precision}")], batch);
            let (gemms, ex, convs) = check_all(&what, &cmds);
            println!("{what}: {gemms} GEMMs ({ex} also fit classic cuBLAS), {convs} convolutions");
            assert!(gemms > 0 && convs > 0, "{what}: the step should have GEMMs and convolutions");
            assert_eq!(ex, gemms, "{what}: small steps fit the int sizes of the fallback");
        }
    }
}

#[test]
fn the_sd15_controlnet_step_maps_onto_the_libraries_exactly() {
    let cmds = commands("configs/controlnet_sd15.yaml", &["trainer.precision=bf16-mixed"], 1);
    let (gemms, ex, convs) = check_all("SD 1.5 bf16", &cmds);
    println!("SD 1.5 bf16 batch 1: {gemms} GEMMs ({ex} also fit classic cuBLAS), {convs} convolutions");
    assert!(gemms > 100 && convs > 100);
}

#[test]
fn a_wrong_transpose_in_the_builder_would_be_caught() {
    // The reading-back is not a mirror of the builder: swapping A's transpose changes the GEMM it describes.
    let g = Gemm {
        transa: Transpose::T,
        transb: Transpose::N,
        m: 3,
        n: 5,
        k: 4,
        alpha: 1.0,
        beta: 0.0,
        a: MatrixRef { ptr: DevPtr(0x1000), dtype: DType::F32, ld: 4, stride: 0 },
        b: MatrixRef { ptr: DevPtr(0x2000), dtype: DType::F32, ld: 4, stride: 0 },
        c: MatrixRef { ptr: DevPtr(0x3000), dtype: DType::F32, ld: 3, stride: 0 },
        batch: 1,
        compute: GemmCompute::F32,
        workspace: Span::new(DevPtr::NULL, 0),
    };
    let mut lt = args::lt_matmul(&g).unwrap();
    assert_eq!((lt.a.rows, lt.a.cols, lt.a.ld), (4, 3, 4), "A stored k x m for TRANSA = T");
    assert_eq!(gemm_from_lt(&lt, [g.a.ptr, g.b.ptr, g.c.ptr], DevPtr::NULL), g);
    lt.transa = zeroconv_blas::cublasOperation_t::CUBLAS_OP_N;
    let r = std::panic::catch_unwind(|| gemm_from_lt(&lt, [g.a.ptr, g.b.ptr, g.c.ptr], DevPtr::NULL));
    assert!(r.is_err(), "a layout inconsistent with its transpose must not read back");
}
