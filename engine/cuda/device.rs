//! The device seam on a real GPU: [`CudaDevice`] implements [`Device`] on the driver API, cuBLASLt (cuBLAS as the
//! fallback) and cuDNN's legacy convolution API, through cudarc's `sys` level with raw device pointers.
//!
//! Everything is ordered on one compute stream of the device's primary context, except the gradient all-reduce and
//! its staging copies, which run on a communication stream ordered with it through events (`record`, `wait`), so
//! NCCL overlaps the rest of the backward. NCCL uses no library workspace. Library parameters come from the pure
//! builders in [`super::args`]; the algorithm of every GEMM and convolution is chosen once, at its first call (step
//! 1 runs eagerly, so that is never during capture), and kept with its descriptors. Before any cudarc call,
//! [`CudaDevice::open`] probes every library and symbol ([`super::libs`]), so a missing library is an error, never
//! a panic.

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CString};

use cudarc::cublas::sys as blas_sys;
use cudarc::cublaslt::sys as lt_sys;
use cudarc::cudnn::sys as dnn_sys;
use cudarc::driver::sys as drv;

use super::args::{self, AlgoPerf, DnnConv, LtLayout, LtMatmul};
use super::handles::{blas_check, dnn_check, drv_check, lt_check, Owned};
use super::libs::{self, LibReport};
use super::probe::{probe_device, DeviceInfo as ProbeInfo};
use crate::engine::device::shared_memory::{OptIn, SharedOptIns};
use crate::engine::device::{
    Arg, Conv, ConvDirection, Copy2d, DevPtr, Device, DeviceInfo, EventId, Gemm, GraphId, Launch, Mark, ModuleSource,
    Stream,
};
use crate::error::{Error, Result};
use crate::graph::DType;
use crate::kernels::{self, Arch, KernelModule};

/// Which embedded image of a module a device loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleImage {
    /// ptxas output, run natively: no JIT, and no need for a driver as new as the NVRTC that wrote the PTX.
    Cubin(Arch),
    /// PTX, compiled by the driver at load time (for newer architectures than the cubins target).
    Ptx(Arch),
}

/// The image to load for `arch` on a device of compute capability `device_major`.x: the cubin when the device
/// runs that architecture's machine code natively (same major version) and the cubin exists, otherwise the PTX.
pub fn module_image(module: &KernelModule, arch: Arch, device_major: u32) -> ModuleImage {
    if device_major == arch.major() && !module.cubin(arch).is_empty() {
        ModuleImage::Cubin(arch)
    } else {
        ModuleImage::Ptx(arch)
    }
}

/// A loaded module: its functions (looked up on first use) and each entry's parameter sizes from its PTX, so a
/// launch with the wrong arguments is an error here (the driver never checks).
struct LoadedModule {
    module: Owned<drv::CUmodule>,
    functions: HashMap<String, drv::CUfunction>,
    ptx: String,
}

/// The device's primary context, retained in `open` and released once on drop (after everything created in it).
struct PrimaryContext {
    ctx: drv::CUcontext,
    device: drv::CUdevice,
}

impl Drop for PrimaryContext {
    fn drop(&mut self) {
        // SAFETY: balances the cuDevicePrimaryCtxRetain of `CudaDevice::open`.
        let status = unsafe { drv::cuDevicePrimaryCtxRelease_v2(self.device) };
        if let Err(e) = drv_check(status, "cuDevicePrimaryCtxRelease") {
            eprintln!("warning: releasing the CUDA context: {e}");
        }
    }
}

/// A GEMM's descriptors and algorithm, built once.
// Plans are built once per GEMM and kept in a map, so the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum GemmPlan {
    Lt {
        desc: Owned<lt_sys::cublasLtMatmulDesc_t>,
        layouts: [Owned<lt_sys::cublasLtMatrixLayout_t>; 3],
        algo: lt_sys::cublasLtMatmulAlgo_t,
        args: LtMatmul,
    },
    /// cuBLASLt's heuristic offered nothing (e.g. a 77-element leading dimension): classic cuBLAS.
    Ex(args::GemmExArgs),
}

/// A convolution's descriptors and algorithm, built once.
struct ConvPlan {
    x: Owned<dnn_sys::cudnnTensorDescriptor_t>,
    w: Owned<dnn_sys::cudnnFilterDescriptor_t>,
    y: Owned<dnn_sys::cudnnTensorDescriptor_t>,
    conv: Owned<dnn_sys::cudnnConvolutionDescriptor_t>,
    algo: AlgoPerf,
    args: DnnConv,
}

/// One GPU: its primary context, a compute stream and a communication stream, the library handles, the device memory and modules it owns, and the
/// plans of every GEMM and convolution it has run.
pub struct CudaDevice {
    // Field order is drop order: everything that belongs to the context goes before it.
    /// The data-parallel ranks' NCCL communicator (`set_communicator`); none alone.
    nccl: Option<super::nccl::NcclComm>,
    graphs: Vec<Owned<drv::CUgraphExec>>,
    /// CUDA events for `mark`, created on first use and reused every step; `marks_used` of them hold marks.
    events: Vec<Owned<drv::CUevent>>,
    marks_used: usize,
    /// The events that order the two streams (`record`, `wait`), by number, created on first use without timing.
    sync_events: Vec<Option<Owned<drv::CUevent>>>,
    gemm_plans: HashMap<Vec<u64>, GemmPlan>,
    conv_plans: HashMap<Vec<u64>, ConvPlan>,
    lt: Owned<lt_sys::cublasLtHandle_t>,
    blas: Owned<blas_sys::cublasHandle_t>,
    dnn: Owned<dnn_sys::cudnnHandle_t>,
    modules: HashMap<String, LoadedModule>,
    allocations: Vec<(Owned<drv::CUdeviceptr>, u64)>,
    stream: Owned<drv::CUstream>,
    /// The communication stream: NCCL's all-reduce and its staging copies.
    comm_stream: Owned<drv::CUstream>,
    context: PrimaryContext,
    device: drv::CUdevice,
    probe: ProbeInfo,
    arch: Arch,
    libs: Vec<LibReport>,
    capturing: bool,
    /// The device's per-block dynamic shared memory limit with the opt-in, from the driver.
    shared_opt_in_limit: u32,
    /// Functions whose `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` was raised, and to what.
    shared_opt_ins: SharedOptIns,
}

// SAFETY: the device's handles are used only through `&mut self` (one thread at a time), and every entry point
// makes the context current on the calling thread first (`bind`), which is what the driver and the libraries
// require of a handle used from another thread.
unsafe impl Send for CudaDevice {}

fn unavailable(e: Error) -> Error {
    match e {
        Error::CudaUnavailable(m) => Error::CudaUnavailable(m),
        other => Error::CudaUnavailable(other.to_string()),
    }
}

impl CudaDevice {
    /// Whether device `ordinal` can be opened, as far as it can be told without creating a context: the driver, the
    /// device, every library and symbol, and the kernels in this build. One `CudaUnavailable` line otherwise.
    pub fn check_available(ordinal: usize) -> Result<()> {
        libs::probe_library(libs::Lib::Driver)?;
        let probe = probe_device(ordinal)?;
        libs::probe_all(false).map_err(|e| match e {
            Error::CudaUnavailable(m) => Error::CudaUnavailable(format!("{} found, but {m}", probe.name)),
            other => other,
        })?;
        if !kernels::compiled() {
            return Err(Error::CudaUnavailable(format!(
                "this build has no CUDA kernels ({}); run `eval \"$(scripts/setup-cuda-tools)\"` and rebuild",
                kernels::build_note()
            )));
        }
        Ok(())
    }

    /// Probes every library and device `ordinal`, creates a stream on its primary context and the library
    /// handles. No module is loaded yet (the executor loads those it needs; [`CudaDevice::load_all_shipped`] loads
    /// every one).
    pub fn open(ordinal: usize) -> Result<Self> {
        // The driver first: without it nothing else matters, and its message names the candidates tried.
        libs::probe_library(libs::Lib::Driver)?;
        let probe = probe_device(ordinal)?;
        // NVRTC only matters for generated kernels missing from the disk cache; its absence is reported when
        // such a kernel is compiled.
        let libs = libs::probe_all(false).map_err(unavailable)?;
        if !kernels::compiled() {
            return Err(Error::Unsupported {
                backend: "cuda",
                msg: format!(
                    "this build has no CUDA kernels ({}); run `eval \"$(scripts/setup-cuda-tools)\"` and rebuild",
                    kernels::build_note()
                ),
            });
        }
        let (major, minor) = probe.compute_capability;
        let arch = Arch::for_compute_capability(major, minor).ok_or_else(|| Error::Unsupported {
            backend: "cuda",
            msg: format!("{} has compute capability {major}.{minor}; kernels need 8.0 or newer", probe.name),
        })?;

        let mut device: drv::CUdevice = 0;
        // SAFETY: the driver library is loaded and initialised (probe_device called cuInit); `device` is a valid
        // out-pointer.
        drv_check(unsafe { drv::cuDeviceGet(&mut device, ordinal as c_int) }, "cuDeviceGet")?;
        let mut ctx: drv::CUcontext = std::ptr::null_mut();
        // SAFETY: `device` is a valid device handle; `ctx` a valid out-pointer.
        drv_check(unsafe { drv::cuDevicePrimaryCtxRetain(&mut ctx, device) }, "cuDevicePrimaryCtxRetain")?;
        let context = PrimaryContext { ctx, device };
        let mut optin: c_int = 0;
        drv_check(
            // SAFETY: `device` is a valid device handle; `optin` a valid out-pointer; the attribute a valid enum value.
            unsafe {
                drv::cuDeviceGetAttribute(
                    &mut optin,
                    drv::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                    device,
                )
            },
            "cuDeviceGetAttribute(MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)",
        )?;
        let shared_opt_in_limit = u32::try_from(optin).unwrap_or(0);
        // SAFETY: `ctx` is the live primary context of this device.
        drv_check(unsafe { drv::cuCtxSetCurrent(ctx) }, "cuCtxSetCurrent")?;

        let stream = create_stream("the compute stream")?;
        let comm_stream = create_stream("the communication stream")?;
        let s = stream.raw();

        let mut lt: lt_sys::cublasLtHandle_t = std::ptr::null_mut();
        // SAFETY: cuBLASLt was probed (library and symbols); `lt` is a valid out-pointer.
        lt_check(unsafe { lt_sys::cublasLtCreate(&mut lt) }, "cublasLtCreate")?;
        // SAFETY: created above, destroyed once.
        let lt = unsafe { Owned::new(lt, "the cuBLASLt handle", destroy::lt_handle) };
        let mut bh: blas_sys::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: cuBLAS was probed; `bh` is a valid out-pointer.
        blas_check(unsafe { blas_sys::cublasCreate_v2(&mut bh) }, "cublasCreate")?;
        // SAFETY: created above, destroyed once.
        let blas = unsafe { Owned::new(bh, "the cuBLAS handle", destroy::blas_handle) };
        // SAFETY: live handle and stream; the stream types are the same CUstream_st pointer under two names.
        blas_check(unsafe { blas_sys::cublasSetStream_v2(bh, s as blas_sys::cudaStream_t) }, "cublasSetStream")?;
        // No TF32 unless a GEMM's compute type asks for it.
        blas_check(
            // SAFETY: live handle.
            unsafe { blas_sys::cublasSetMathMode(bh, blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH) },
            "cublasSetMathMode",
        )?;
        let mut dh: dnn_sys::cudnnHandle_t = std::ptr::null_mut();
        // SAFETY: cuDNN was probed; `dh` is a valid out-pointer.
        dnn_check(unsafe { dnn_sys::cudnnCreate(&mut dh) }, "cudnnCreate")?;
        // SAFETY: created above, destroyed once.
        let dnn = unsafe { Owned::new(dh, "the cuDNN handle", destroy::dnn_handle) };
        // SAFETY: live handle and stream.
        dnn_check(unsafe { dnn_sys::cudnnSetStream(dh, s as dnn_sys::cudaStream_t) }, "cudnnSetStream")?;

        Ok(CudaDevice {
            graphs: Vec::new(),
            gemm_plans: HashMap::new(),
            conv_plans: HashMap::new(),
            lt,
            blas,
            dnn,
            modules: HashMap::new(),
            allocations: Vec::new(),
            stream,
            comm_stream,
            context,
            device,
            probe,
            arch,
            libs,
            capturing: false,
            nccl: None,
            events: Vec::new(),
            marks_used: 0,
            sync_events: Vec::new(),
            shared_opt_in_limit,
            shared_opt_ins: SharedOptIns::default(),
        })
    }

    /// What the probe found: the device, its compute capability, memory and driver version.
    pub fn probe_info(&self) -> &ProbeInfo {
        &self.probe
    }

    /// The libraries in use, with their versions.
    pub fn libraries(&self) -> &[LibReport] {
        &self.libs
    }

    /// The build of the kernels this device runs.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The raw CUDA device handle.
    pub fn raw_device(&self) -> drv::CUdevice {
        self.device
    }

    /// Makes this device's context current on the calling thread (every entry point does it first).
    fn bind(&self) -> Result<()> {
        // SAFETY: the context is alive while `self` is.
        drv_check(unsafe { drv::cuCtxSetCurrent(self.context.ctx) }, "cuCtxSetCurrent")
    }

    fn stream(&self) -> drv::CUstream {
        self.stream.raw()
    }

    fn stream_of(&self, s: Stream) -> drv::CUstream {
        match s {
            Stream::Compute => self.stream.raw(),
            Stream::Comm => self.comm_stream.raw(),
        }
    }

    /// Event `e` of `record`/`wait`, created (without timing, the cheapest kind) on first use.
    fn sync_event(&mut self, e: EventId) -> Result<drv::CUevent> {
        if self.sync_events.len() <= e.0 {
            self.sync_events.resize_with(e.0 + 1, || None);
        }
        if let Some(ev) = &self.sync_events[e.0] {
            return Ok(ev.raw());
        }
        let mut ev: drv::CUevent = std::ptr::null_mut();
        let flags = drv::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: the context is current (the caller bound it); `ev` is a valid out-pointer. Creating an event is
        // not a stream operation, so it is legal while capturing.
        drv_check(unsafe { drv::cuEventCreate(&mut ev, flags) }, "cuEventCreate(CU_EVENT_DISABLE_TIMING)")?;
        // SAFETY: created above, destroyed once on drop, before the context (field order).
        let owned = unsafe { Owned::new(ev, "a CUDA event", destroy::event) };
        let raw = owned.raw();
        self.sync_events[e.0] = Some(owned);
        Ok(raw)
    }

    /// Waits for both streams.
    fn synchronize_streams(&self) -> Result<()> {
        for s in [self.stream(), self.comm_stream.raw()] {
            // SAFETY: live streams of this context.
            drv_check(unsafe { drv::cuStreamSynchronize(s) }, "cuStreamSynchronize")?;
        }
        Ok(())
    }

    fn not_capturing(&self, what: &str) -> Result<()> {
        if self.capturing {
            Err(Error::msg(format!("CUDA: {what} while capturing a CUDA graph")))
        } else {
            Ok(())
        }
    }

    /// Loads every shipped kernel module.
    pub fn load_all_shipped(&mut self) -> Result<()> {
        for m in kernels::MODULES {
            self.load_module(&ModuleSource::Shipped(m))?;
        }
        Ok(())
    }

    /// The kernel `name` of module `module` (loaded before).
    fn function(&mut self, module: &str, name: &str) -> Result<drv::CUfunction> {
        let m = self
            .modules
            .get_mut(module)
            .ok_or_else(|| Error::msg(format!("kernel `{name}`: module `{module}` was never loaded")))?;
        if let Some(f) = m.functions.get(name) {
            return Ok(*f);
        }
        let cname = CString::new(name).map_err(|_| Error::msg(format!("kernel name `{name}` has a NUL byte")))?;
        let mut f: drv::CUfunction = std::ptr::null_mut();
        drv_check(
            // SAFETY: the module is loaded in this device's context (bound by the caller); `cname` is NUL-terminated.
            unsafe { drv::cuModuleGetFunction(&mut f, m.module.raw(), cname.as_ptr()) },
            &format!("cuModuleGetFunction({name})"),
        )?;
        m.functions.insert(name.to_string(), f);
        Ok(f)
    }

    /// Whether kernel `name` of a loaded module can be looked up (for the GPU check).
    pub fn has_kernel(&mut self, module: &str, name: &str) -> Result<()> {
        self.bind()?;
        self.function(module, name).map(|_| ())
    }

    fn plan_gemm(&mut self, g: &Gemm) -> Result<GemmPlan> {
        let a = args::lt_matmul(g)?;
        let layout = |l: &LtLayout, name: &'static str| -> Result<Owned<lt_sys::cublasLtMatrixLayout_t>> {
            let mut h: lt_sys::cublasLtMatrixLayout_t = std::ptr::null_mut();
            lt_check(
                // SAFETY: cuBLASLt is loaded; `h` is a valid out-pointer.
                unsafe { lt_sys::cublasLtMatrixLayoutCreate(&mut h, l.dtype, l.rows, l.cols, l.ld) },
                &format!("cublasLtMatrixLayoutCreate({name})"),
            )?;
            // SAFETY: created above, destroyed once.
            let owned = unsafe { Owned::new(h, "a cuBLASLt matrix layout", destroy::lt_layout) };
            use lt_sys::cublasLtMatrixLayoutAttribute_t::*;
            // SAFETY: live layout; each buffer is the attribute's documented type (int32 batch count, int64 stride).
            unsafe {
                lt_check(
                    lt_sys::cublasLtMatrixLayoutSetAttribute(
                        h,
                        CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        (&l.batch as *const i32).cast(),
                        4,
                    ),
                    "cublasLtMatrixLayoutSetAttribute(BATCH_COUNT)",
                )?;
                lt_check(
                    lt_sys::cublasLtMatrixLayoutSetAttribute(
                        h,
                        CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        (&l.stride as *const i64).cast(),
                        8,
                    ),
                    "cublasLtMatrixLayoutSetAttribute(STRIDED_BATCH_OFFSET)",
                )?;
            }
            Ok(owned)
        };
        let mut d: lt_sys::cublasLtMatmulDesc_t = std::ptr::null_mut();
        // SAFETY: cuBLASLt is loaded; `d` is a valid out-pointer.
        lt_check(unsafe { lt_sys::cublasLtMatmulDescCreate(&mut d, a.compute, a.scale) }, "cublasLtMatmulDescCreate")?;
        // SAFETY: created above, destroyed once.
        let desc = unsafe { Owned::new(d, "a cuBLASLt matmul descriptor", destroy::lt_matmul_desc) };
        let (ta, tb) = (a.transa as i32, a.transb as i32);
        use lt_sys::cublasLtMatmulDescAttributes_t::*;
        // SAFETY: live descriptor; TRANSA/TRANSB take a cublasOperation_t as int32.
        unsafe {
            lt_check(
                lt_sys::cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, (&ta as *const i32).cast(), 4),
                "cublasLtMatmulDescSetAttribute(TRANSA)",
            )?;
            lt_check(
                lt_sys::cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSB, (&tb as *const i32).cast(), 4),
                "cublasLtMatmulDescSetAttribute(TRANSB)",
            )?;
        }
        let layouts = [layout(&a.a, "A")?, layout(&a.b, "B")?, layout(&a.c, "C")?];

        let mut p: lt_sys::cublasLtMatmulPreference_t = std::ptr::null_mut();
        // SAFETY: cuBLASLt is loaded; `p` is a valid out-pointer.
        lt_check(unsafe { lt_sys::cublasLtMatmulPreferenceCreate(&mut p) }, "cublasLtMatmulPreferenceCreate")?;
        // SAFETY: created above, destroyed once (at the end of this function).
        let pref = unsafe { Owned::new(p, "a cuBLASLt preference", destroy::lt_preference) };
        use lt_sys::cublasLtMatmulPreferenceAttributes_t::*;
        let ws = a.max_workspace;
        // SAFETY: live preference; MAX_WORKSPACE_BYTES is a uint64, the MIN_ALIGNMENT ones uint32.
        unsafe {
            lt_check(
                lt_sys::cublasLtMatmulPreferenceSetAttribute(
                    p,
                    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&ws as *const u64).cast(),
                    8,
                ),
                "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)",
            )?;
            for (attr, v) in [
                CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ]
            .into_iter()
            .zip(a.min_alignment)
            {
                lt_check(
                    lt_sys::cublasLtMatmulPreferenceSetAttribute(p, attr, (&v as *const u32).cast(), 4),
                    "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT)",
                )?;
            }
        }
        let mut result = std::mem::MaybeUninit::<lt_sys::cublasLtMatmulHeuristicResult_t>::zeroed();
        let mut count: c_int = 0;
        // SAFETY: every descriptor is live; one result slot and a count out-pointer. The heuristic runs no device
        // work.
        let status = unsafe {
            lt_sys::cublasLtMatmulAlgoGetHeuristic(
                self.lt.raw(),
                d,
                layouts[0].raw(),
                layouts[1].raw(),
                layouts[2].raw(),
                layouts[2].raw(),
                pref.raw(),
                1,
                result.as_mut_ptr(),
                &mut count,
            )
        };
        // SAFETY: zero-initialised, and written by the library when it returned a result.
        let result = unsafe { result.assume_init() };
        let usable = status == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            && count > 0
            && result.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            && result.workspaceSize as u64 <= ws;
        if usable {
            return Ok(GemmPlan::Lt { desc, layouts, algo: result.algo, args: a });
        }
        if status != lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            && status != lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED
        {
            lt_check(status, "cublasLtMatmulAlgoGetHeuristic")?;
        }
        Ok(GemmPlan::Ex(args::gemm_ex(g)?))
    }

    fn plan_conv(&mut self, c: &Conv) -> Result<ConvPlan> {
        let a = args::dnn_conv(c)?;
        let tensor = |t: &args::TensorDesc, name: &str| -> Result<Owned<dnn_sys::cudnnTensorDescriptor_t>> {
            let mut h: dnn_sys::cudnnTensorDescriptor_t = std::ptr::null_mut();
            // SAFETY: cuDNN is loaded; `h` is a valid out-pointer.
            dnn_check(unsafe { dnn_sys::cudnnCreateTensorDescriptor(&mut h) }, "cudnnCreateTensorDescriptor")?;
            // SAFETY: created above, destroyed once.
            let owned = unsafe { Owned::new(h, "a cuDNN tensor descriptor", destroy::tensor_desc) };
            let [n, ch, hh, w] = t.dims;
            dnn_check(
                // SAFETY: live descriptor; plain values.
                unsafe { dnn_sys::cudnnSetTensor4dDescriptor(h, t.format, t.dtype, n, ch, hh, w) },
                &format!("cudnnSetTensor4dDescriptor({name} {:?})", t.dims),
            )?;
            Ok(owned)
        };
        let x = tensor(&a.x, "x")?;
        let y = tensor(&a.y, "y")?;
        let mut fh: dnn_sys::cudnnFilterDescriptor_t = std::ptr::null_mut();
        // SAFETY: cuDNN is loaded; valid out-pointer.
        dnn_check(unsafe { dnn_sys::cudnnCreateFilterDescriptor(&mut fh) }, "cudnnCreateFilterDescriptor")?;
        // SAFETY: created above, destroyed once.
        let w = unsafe { Owned::new(fh, "a cuDNN filter descriptor", destroy::filter_desc) };
        let [k, ch, r, s] = a.w.dims;
        dnn_check(
            // SAFETY: live descriptor; plain values.
            unsafe { dnn_sys::cudnnSetFilter4dDescriptor(fh, a.w.dtype, a.w.format, k, ch, r, s) },
            &format!("cudnnSetFilter4dDescriptor({:?})", a.w.dims),
        )?;
        let mut ch_: dnn_sys::cudnnConvolutionDescriptor_t = std::ptr::null_mut();
        // SAFETY: cuDNN is loaded; valid out-pointer.
        dnn_check(unsafe { dnn_sys::cudnnCreateConvolutionDescriptor(&mut ch_) }, "cudnnCreateConvolutionDescriptor")?;
        // SAFETY: created above, destroyed once.
        let conv = unsafe { Owned::new(ch_, "a cuDNN convolution descriptor", destroy::conv_desc) };
        let cd = a.conv;
        dnn_check(
            // SAFETY: live descriptor; plain values.
            unsafe {
                dnn_sys::cudnnSetConvolution2dDescriptor(
                    ch_,
                    cd.pad[0],
                    cd.pad[1],
                    cd.stride[0],
                    cd.stride[1],
                    cd.dilation[0],
                    cd.dilation[1],
                    cd.mode,
                    cd.compute,
                )
            },
            "cudnnSetConvolution2dDescriptor",
        )?;
        // SAFETY: live descriptor.
        dnn_check(unsafe { dnn_sys::cudnnSetConvolutionMathType(ch_, cd.math) }, "cudnnSetConvolutionMathType")?;
        let mut out = [0 as c_int; 4];
        let [o0, o1, o2, o3] = &mut out;
        dnn_check(
            // SAFETY: live descriptors; four int out-pointers.
            unsafe { dnn_sys::cudnnGetConvolution2dForwardOutputDim(ch_, x.raw(), w.raw(), o0, o1, o2, o3) },
            "cudnnGetConvolution2dForwardOutputDim",
        )?;
        if out != a.output_dims {
            return Err(Error::msg(format!(
                "cuDNN: cudnnGetConvolution2dForwardOutputDim gives {out:?}, the lowering expects {:?}",
                a.output_dims
            )));
        }
        let perfs = self.algo_perfs(&a, &x, &w, &y, &conv)?;
        let algo = args::choose_algo(&perfs, a.max_workspace, c.math).ok_or_else(|| {
            Error::msg(format!(
                "cuDNN: no deterministic {:?} algorithm with {:?} math fits the planned {} bytes of workspace; \
                 cuDNN offered {perfs:?}",
                c.direction, a.conv.math, a.max_workspace
            ))
        })?;
        // The chosen algorithm's math type goes on the descriptor (cuDNN reports it per algorithm).
        // SAFETY: live descriptor.
        dnn_check(unsafe { dnn_sys::cudnnSetConvolutionMathType(ch_, algo.math) }, "cudnnSetConvolutionMathType")?;
        Ok(ConvPlan { x, w, y, conv, algo, args: a })
    }

    /// cuDNN's perf list for the direction (`cudnnGet*Algorithm_v7`: heuristics only, no device work).
    fn algo_perfs(
        &self,
        a: &DnnConv,
        x: &Owned<dnn_sys::cudnnTensorDescriptor_t>,
        w: &Owned<dnn_sys::cudnnFilterDescriptor_t>,
        y: &Owned<dnn_sys::cudnnTensorDescriptor_t>,
        conv: &Owned<dnn_sys::cudnnConvolutionDescriptor_t>,
    ) -> Result<Vec<AlgoPerf>> {
        let h = self.dnn.raw();
        let mut n: c_int = 0;
        let ok = |s: dnn_sys::cudnnStatus_t| s == dnn_sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS;
        let det = |d: dnn_sys::cudnnDeterminism_t| d == dnn_sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC;
        Ok(match a.direction {
            ConvDirection::Forward => {
                let mut r = [std::mem::MaybeUninit::<dnn_sys::cudnnConvolutionFwdAlgoPerf_t>::zeroed(); 8];
                dnn_check(
                    // SAFETY: live handle and descriptors; `r` holds the 8 requested entries.
                    unsafe {
                        dnn_sys::cudnnGetConvolutionForwardAlgorithm_v7(
                            h,
                            x.raw(),
                            w.raw(),
                            conv.raw(),
                            y.raw(),
                            8,
                            &mut n,
                            r.as_mut_ptr().cast(),
                        )
                    },
                    "cudnnGetConvolutionForwardAlgorithm_v7",
                )?;
                r[..n.clamp(0, 8) as usize]
                    .iter()
                    .map(|p| {
                        // SAFETY: the first `n` entries were written by cuDNN.
                        let p = unsafe { p.assume_init() };
                        AlgoPerf {
                            algo: p.algo as u32,
                            ok: ok(p.status),
                            memory: p.memory as u64,
                            deterministic: det(p.determinism),
                            math: p.mathType,
                        }
                    })
                    .collect()
            }
            ConvDirection::BackwardData => {
                let mut r = [std::mem::MaybeUninit::<dnn_sys::cudnnConvolutionBwdDataAlgoPerf_t>::zeroed(); 6];
                dnn_check(
                    // SAFETY: as above, 6 entries.
                    unsafe {
                        dnn_sys::cudnnGetConvolutionBackwardDataAlgorithm_v7(
                            h,
                            w.raw(),
                            y.raw(),
                            conv.raw(),
                            x.raw(),
                            6,
                            &mut n,
                            r.as_mut_ptr().cast(),
                        )
                    },
                    "cudnnGetConvolutionBackwardDataAlgorithm_v7",
                )?;
                r[..n.clamp(0, 6) as usize]
                    .iter()
                    .map(|p| {
                        // SAFETY: the first `n` entries were written by cuDNN.
                        let p = unsafe { p.assume_init() };
                        AlgoPerf {
                            algo: p.algo as u32,
                            ok: ok(p.status),
                            memory: p.memory as u64,
                            deterministic: det(p.determinism),
                            math: p.mathType,
                        }
                    })
                    .collect()
            }
            ConvDirection::BackwardFilter => {
                let mut r = [std::mem::MaybeUninit::<dnn_sys::cudnnConvolutionBwdFilterAlgoPerf_t>::zeroed(); 7];
                dnn_check(
                    // SAFETY: as above, 7 entries.
                    unsafe {
                        dnn_sys::cudnnGetConvolutionBackwardFilterAlgorithm_v7(
                            h,
                            x.raw(),
                            y.raw(),
                            conv.raw(),
                            w.raw(),
                            7,
                            &mut n,
                            r.as_mut_ptr().cast(),
                        )
                    },
                    "cudnnGetConvolutionBackwardFilterAlgorithm_v7",
                )?;
                r[..n.clamp(0, 7) as usize]
                    .iter()
                    .map(|p| {
                        // SAFETY: the first `n` entries were written by cuDNN.
                        let p = unsafe { p.assume_init() };
                        AlgoPerf {
                            algo: p.algo as u32,
                            ok: ok(p.status),
                            memory: p.memory as u64,
                            deterministic: det(p.determinism),
                            math: p.mathType,
                        }
                    })
                    .collect()
            }
        })
    }

    /// A launch above 48 KiB of dynamic shared memory raises its function's limit first, once per function (the
    /// rule of [`crate::engine::device::shared_memory`], shared with the emulated device); beyond the device's
    /// opt-in limit it is an error naming the kernel and the limit.
    fn opt_in_shared(&mut self, l: &Launch, f: drv::CUfunction) -> Result<()> {
        let (module, name) = (&l.kernel.module, &l.kernel.name);
        let (major, minor) = self.probe.compute_capability;
        let device = format!("{} (compute capability {major}.{minor})", self.probe.name);
        let need = self.shared_opt_ins.check(module, name, l.dims.shared_bytes, self.shared_opt_in_limit, &device)?;
        if let OptIn::Raise(bytes) = need {
            let value = c_int::try_from(bytes).map_err(|_| Error::msg(format!("kernel `{name}`: {bytes} bytes")))?;
            drv_check(
                // SAFETY: `f` is a function of a module loaded in the bound context; the attribute is a valid enum
                // value and `value` is within the device's opt-in limit (checked above).
                unsafe {
                    drv::cuFuncSetAttribute(
                        f,
                        drv::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        value,
                    )
                },
                &format!("cuFuncSetAttribute({name}, MAX_DYNAMIC_SHARED_SIZE_BYTES, {bytes})"),
            )?;
            self.shared_opt_ins.raised(module, name, bytes);
        }
        Ok(())
    }

    /// Launches `l` after checking its arguments against the entry's PTX parameter list.
    fn run_launch(&mut self, l: &Launch) -> Result<()> {
        let m = self.modules.get(&l.kernel.module).ok_or_else(|| {
            Error::msg(format!("kernel `{}`: module `{}` was never loaded", l.kernel.name, l.kernel.module))
        })?;
        if let Some(params) = kernels::ptx_entry_params(&m.ptx, &l.kernel.name) {
            let given: Vec<usize> = l.args.iter().map(Arg::size).collect();
            if given != params {
                return Err(Error::msg(format!(
                    "kernel `{}`: arguments of {given:?} bytes, but its PTX takes {params:?}",
                    l.kernel.name
                )));
            }
        } else if !m.ptx.is_empty() {
            return Err(Error::msg(format!("module `{}` has no kernel `{}`", l.kernel.module, l.kernel.name)));
        }
        let f = self.function(&l.kernel.module, &l.kernel.name)?;
        self.opt_in_shared(l, f)?;
        // Argument storage: pointers as u64, values as their bytes (8-byte aligned copies); the driver reads
        // `params[i]` during the call (and copies them into a captured graph node).
        let mut words: Vec<Vec<u64>> = l
            .args
            .iter()
            .map(|a| match a {
                Arg::Ptr(p) => vec![p.0],
                Arg::Value(b) => {
                    let mut w = vec![0u64; b.len().div_ceil(8).max(1)];
                    bytemuck::cast_slice_mut::<u64, u8>(&mut w)[..b.len()].copy_from_slice(b);
                    w
                }
            })
            .collect();
        let mut params: Vec<*mut c_void> = words.iter_mut().map(|w| w.as_mut_ptr().cast()).collect();
        let [gx, gy, gz] = l.dims.grid;
        let [bx, by, bz] = l.dims.block;
        // SAFETY: `f` is a function of a module loaded in the bound context; `params` has one pointer per kernel
        // parameter (count and sizes checked against the PTX above), each to storage that outlives the call; the
        // pointer arguments are addresses the executor allocated on this device.
        drv_check(
            unsafe {
                drv::cuLaunchKernel(
                    f,
                    gx,
                    gy,
                    gz,
                    bx,
                    by,
                    bz,
                    l.dims.shared_bytes,
                    self.stream(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            &format!("cuLaunchKernel({})", l.kernel.name),
        )
    }
}

/// A GEMM's identity for the plan cache: every field, floats by their bits.
fn gemm_key(g: &Gemm) -> Vec<u64> {
    let m = |x: &crate::engine::device::MatrixRef| [x.ptr.0, dtype_code(x.dtype), x.ld, x.stride];
    let mut k = vec![
        g.transa as u64,
        g.transb as u64,
        g.m,
        g.n,
        g.k,
        g.alpha.to_bits() as u64,
        g.beta.to_bits() as u64,
        g.batch,
        g.compute as u64,
        g.workspace.ptr.0,
        g.workspace.bytes,
    ];
    for x in [&g.a, &g.b, &g.c] {
        k.extend(m(x));
    }
    k
}

/// A convolution's identity for the plan cache (the seam's `algo` is not part of it: the device chooses).
fn conv_key(c: &Conv) -> Vec<u64> {
    let mut k = vec![
        c.direction as u64,
        c.x.layout as u64,
        c.w.layout as u64,
        dtype_code(c.x.dtype),
        c.math as u64,
        c.alpha.to_bits() as u64,
        c.beta.to_bits() as u64,
        c.workspace.bytes,
    ];
    k.extend(c.x.dims);
    k.extend(c.w.dims);
    k.extend(c.y.dims);
    k.extend(c.padding);
    k.extend(c.stride);
    k
}

fn dtype_code(d: DType) -> u64 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
        DType::F64 => 3,
        DType::I32 => 4,
        DType::I64 => 5,
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // The fields release their handles next; they need the context current on this thread.
        if let Err(e) = self.bind() {
            eprintln!("warning: releasing the CUDA device: {e}");
        }
        if !self.capturing {
            // Waiting lets queued work finish before its memory is freed.
            if let Err(e) = self.synchronize_streams() {
                eprintln!("warning: releasing the CUDA device: {e}");
            }
        }
    }
}

impl Device for CudaDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.probe.name.clone(),
            compute_capability: self.probe.compute_capability,
            memory_bytes: self.probe.total_memory_bytes as u64,
        }
    }

    fn alloc(&mut self, bytes: u64, what: &str) -> Result<DevPtr> {
        self.not_capturing("allocation")?;
        self.bind()?;
        let mut p: drv::CUdeviceptr = 0;
        let n = usize::try_from(bytes).map_err(|_| Error::msg(format!("{what}: {bytes} bytes do not fit")))?;
        // SAFETY: a context is current; `p` is a valid out-pointer. cuMemAlloc aligns to at least 256 bytes.
        drv_check(unsafe { drv::cuMemAlloc_v2(&mut p, n.max(1)) }, &format!("cuMemAlloc({bytes} bytes for {what})"))?;
        // SAFETY: allocated above, freed once, before the context is released.
        let owned = unsafe { Owned::new(p, "device memory", destroy::memory) };
        self.allocations.push((owned, bytes));
        Ok(DevPtr(p))
    }

    fn load_module(&mut self, module: &ModuleSource) -> Result<()> {
        self.not_capturing("module loading")?;
        if self.modules.contains_key(module.name()) {
            return Ok(());
        }
        self.bind()?;
        let (image, ptx): (Vec<u8>, String) = match module {
            ModuleSource::Shipped(m) => {
                let ptx = m.ptx(self.arch).to_string();
                match module_image(m, self.arch, self.probe.compute_capability.0) {
                    ModuleImage::Cubin(a) => (m.cubin(a).to_vec(), ptx),
                    ModuleImage::Ptx(_) => (nul_terminated(&ptx), ptx),
                }
            }
            ModuleSource::Generated { source, .. } => {
                let (ptx, _cached) =
                    super::nvrtc::compile_cached(source, self.arch, &super::nvrtc::default_cache_dir())?;
                (nul_terminated(&ptx), ptx)
            }
        };
        let mut m: drv::CUmodule = std::ptr::null_mut();
        drv_check(
            // SAFETY: `image` is a complete cubin or NUL-terminated PTX that outlives the call; a context is current.
            unsafe { drv::cuModuleLoadData(&mut m, image.as_ptr().cast()) },
            &format!("cuModuleLoadData({})", module.name()),
        )?;
        // SAFETY: loaded above, unloaded once before the context is released.
        let owned = unsafe { Owned::new(m, "a kernel module", destroy::module) };
        self.modules.insert(module.name().to_string(), LoadedModule { module: owned, functions: HashMap::new(), ptx });
        Ok(())
    }

    fn upload(&mut self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.not_capturing("a host-to-device copy")?;
        self.bind()?;
        // SAFETY: `src` is valid for its length; the destination is device memory of this context (the executor
        // copies into values it allocated). The stream is synchronised before returning, so `src` (pageable host
        // memory) outlives the copy.
        unsafe {
            drv_check(
                drv::cuMemcpyHtoDAsync_v2(dst.0, src.as_ptr().cast(), src.len(), self.stream()),
                "cuMemcpyHtoDAsync",
            )?;
            drv_check(drv::cuStreamSynchronize(self.stream()), "cuStreamSynchronize")
        }
    }

    fn download(&mut self, dst: &mut [u8], src: DevPtr) -> Result<()> {
        self.not_capturing("a device-to-host copy")?;
        self.bind()?;
        // SAFETY: `dst` is valid for writes of its length and is not touched until the stream has synchronised.
        unsafe {
            drv_check(
                drv::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr().cast(), src.0, dst.len(), self.stream()),
                "cuMemcpyDtoHAsync",
            )?;
            drv_check(drv::cuStreamSynchronize(self.stream()), "cuStreamSynchronize")
        }
    }

    fn copy2d(&mut self, stream: Stream, c: &Copy2d) -> Result<()> {
        self.bind()?;
        if c.width == 0 || c.height == 0 {
            return Ok(());
        }
        // SAFETY: plain data; every pointer field not used for device-to-device copies is null.
        let mut p: drv::CUDA_MEMCPY2D = unsafe { std::mem::zeroed() };
        p.srcMemoryType = drv::CUmemorytype::CU_MEMORYTYPE_DEVICE;
        p.srcDevice = c.src.0;
        p.srcPitch = c.src_pitch as usize;
        p.dstMemoryType = drv::CUmemorytype::CU_MEMORYTYPE_DEVICE;
        p.dstDevice = c.dst.0;
        p.dstPitch = c.dst_pitch as usize;
        p.WidthInBytes = c.width as usize;
        p.Height = c.height as usize;
        // SAFETY: both regions are device memory of this context, sized by the lowering for these pitches.
        drv_check(unsafe { drv::cuMemcpy2DAsync_v2(&p, self.stream_of(stream)) }, "cuMemcpy2DAsync")
    }

    fn memset(&mut self, dst: DevPtr, byte: u8, bytes: u64) -> Result<()> {
        self.bind()?;
        // SAFETY: `bytes` bytes from `dst` are device memory of this context.
        drv_check(unsafe { drv::cuMemsetD8Async(dst.0, byte, bytes as usize, self.stream()) }, "cuMemsetD8Async")
    }

    fn launch(&mut self, launch: &Launch) -> Result<()> {
        self.bind()?;
        self.run_launch(launch)
    }

    fn gemm(&mut self, g: &Gemm) -> Result<()> {
        self.bind()?;
        let key = gemm_key(g);
        if !self.gemm_plans.contains_key(&key) {
            let plan = self.plan_gemm(g)?;
            self.gemm_plans.insert(key.clone(), plan);
        }
        let plan = &self.gemm_plans[&key];
        let ws = g.workspace;
        match plan {
            GemmPlan::Lt { desc, layouts, algo, args } => {
                let (alpha, beta) = (args.alpha, args.beta);
                // SAFETY: descriptors and algorithm were built for exactly this GEMM (same pointers, sizes, types);
                // the operands and workspace are device memory the executor planned for it; alpha/beta are host
                // f32 (the default host pointer mode, scale type f32).
                lt_check(
                    unsafe {
                        lt_sys::cublasLtMatmul(
                            self.lt.raw(),
                            desc.raw(),
                            (&alpha as *const f32).cast(),
                            g.a.ptr.0 as *const c_void,
                            layouts[0].raw(),
                            g.b.ptr.0 as *const c_void,
                            layouts[1].raw(),
                            (&beta as *const f32).cast(),
                            g.c.ptr.0 as *const c_void,
                            layouts[2].raw(),
                            g.c.ptr.0 as *mut c_void,
                            layouts[2].raw(),
                            algo,
                            ws.ptr.0 as *mut c_void,
                            ws.bytes as usize,
                            self.stream.raw() as lt_sys::cudaStream_t,
                        )
                    },
                    "cublasLtMatmul",
                )
            }
            GemmPlan::Ex(a) => {
                let h = self.blas.raw();
                blas_check(
                    // SAFETY: live handle; the workspace is planned device memory (or none), set before the call so
                    // that cuBLAS allocates nothing (required under graph capture).
                    unsafe { blas_sys::cublasSetWorkspace_v2(h, ws.ptr.0 as *mut c_void, ws.bytes as usize) },
                    "cublasSetWorkspace",
                )?;
                // SAFETY: the arguments were built and range-checked from this GEMM; the operands are device memory
                // the executor planned for it; alpha/beta are host f32 values (compute type 32F).
                blas_check(
                    unsafe {
                        blas_sys::cublasGemmStridedBatchedEx(
                            h,
                            a.transa,
                            a.transb,
                            a.m,
                            a.n,
                            a.k,
                            (&a.alpha as *const f32).cast(),
                            g.a.ptr.0 as *const c_void,
                            a.a_type,
                            a.lda,
                            a.stride_a,
                            g.b.ptr.0 as *const c_void,
                            a.b_type,
                            a.ldb,
                            a.stride_b,
                            (&a.beta as *const f32).cast(),
                            g.c.ptr.0 as *mut c_void,
                            a.c_type,
                            a.ldc,
                            a.stride_c,
                            a.batch,
                            a.compute,
                            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                        )
                    },
                    "cublasGemmStridedBatchedEx",
                )
            }
        }
    }

    fn conv(&mut self, c: &Conv) -> Result<()> {
        self.bind()?;
        let key = conv_key(c);
        if !self.conv_plans.contains_key(&key) {
            self.not_capturing("choosing a cuDNN algorithm")?;
            let plan = self.plan_conv(c)?;
            self.conv_plans.insert(key.clone(), plan);
        }
        let p = &self.conv_plans[&key];
        let (alpha, beta) = (p.args.alpha, p.args.beta);
        let (al, be) = ((&alpha as *const f32).cast::<c_void>(), (&beta as *const f32).cast::<c_void>());
        let ws = (c.workspace.ptr.0 as *mut c_void, c.workspace.bytes as usize);
        let h = self.dnn.raw();
        let (x, w, y) = (c.x.ptr.0 as *mut c_void, c.w.ptr.0 as *mut c_void, c.y.ptr.0 as *mut c_void);
        // SAFETY (all three): the descriptors and algorithm were built for exactly these dims, types and layouts
        // (validated); x, w and y are device memory the executor planned for them, the output not overlapping the
        // inputs; the algorithm's workspace fits the planned span; alpha/beta are host f32 (compute FLOAT).
        let status = match c.direction {
            ConvDirection::Forward => {
                // SAFETY: see above.
                unsafe {
                    dnn_sys::cudnnConvolutionForward(
                        h,
                        al,
                        p.x.raw(),
                        x,
                        p.w.raw(),
                        w,
                        p.conv.raw(),
                        fwd_algo(p.algo.algo)?,
                        ws.0,
                        ws.1,
                        be,
                        p.y.raw(),
                        y,
                    )
                }
            }
            ConvDirection::BackwardData => {
                // SAFETY: see above.
                unsafe {
                    dnn_sys::cudnnConvolutionBackwardData(
                        h,
                        al,
                        p.w.raw(),
                        w,
                        p.y.raw(),
                        y,
                        p.conv.raw(),
                        bwd_data_algo(p.algo.algo)?,
                        ws.0,
                        ws.1,
                        be,
                        p.x.raw(),
                        x,
                    )
                }
            }
            ConvDirection::BackwardFilter => {
                // SAFETY: see above.
                unsafe {
                    dnn_sys::cudnnConvolutionBackwardFilter(
                        h,
                        al,
                        p.x.raw(),
                        x,
                        p.y.raw(),
                        y,
                        p.conv.raw(),
                        bwd_filter_algo(p.algo.algo)?,
                        ws.0,
                        ws.1,
                        be,
                        p.w.raw(),
                        w,
                    )
                }
            }
        };
        dnn_check(status, &format!("cudnnConvolution{:?} (algorithm {})", c.direction, p.algo.algo))
    }

    fn all_reduce(&mut self, stream: Stream, buf: DevPtr, count: u64, dtype: DType, average: bool) -> Result<()> {
        if !dtype.is_float() {
            return Err(Error::msg(format!("all-reduce of {dtype}")));
        }
        // One rank: the sum (and the average) of one contribution is that contribution.
        let Some(nccl) = &self.nccl else { return Ok(()) };
        self.bind()?;
        let s = self.stream_of(stream);
        // SAFETY: the lowering passes a buffer of `count` elements of `dtype` in this device's memory; the stream is
        // this context's, made current by `bind`. NCCL calls are legal while capturing (they become graph nodes) on
        // a stream that joined the capture.
        unsafe { nccl.all_reduce(buf.0, count, dtype, average, s as *mut std::ffi::c_void) }
    }

    fn record(&mut self, stream: Stream, event: EventId) -> Result<()> {
        self.bind()?;
        let ev = self.sync_event(event)?;
        // SAFETY: live event and stream of this context. While capturing, a record on the capturing stream followed
        // by a wait on the other is how the other stream joins the capture (a fork), and a record on the other
        // stream waited for by the capturing one joins it back (CUDA Programming Guide, "Cross-stream Dependencies
        // and Events", docs.nvidia.com/cuda/cuda-c-programming-guide/#cross-stream-dependencies-and-events).
        drv_check(
            unsafe { drv::cuEventRecord(ev, self.stream_of(stream)) },
            &format!("cuEventRecord({})", stream.name()),
        )
    }

    fn wait(&mut self, stream: Stream, event: EventId) -> Result<()> {
        self.bind()?;
        let ev = self.sync_event(event)?;
        // SAFETY: live event and stream of this context; flags 0 is the only value the driver defines.
        let status = unsafe { drv::cuStreamWaitEvent(self.stream_of(stream), ev, 0) };
        drv_check(status, &format!("cuStreamWaitEvent({})", stream.name()))
    }

    fn set_communicator(&mut self, comm: std::sync::Arc<dyn crate::engine::dist::Communicator>) -> Result<()> {
        self.not_capturing("joining the NCCL communicator")?;
        let (rank, world) = (comm.rank(), comm.world_size());
        let id = comm.nccl_unique_id().ok_or_else(|| {
            Error::msg(format!(
                "CUDA: rank {rank} of {world} joined without an NCCL id (rank 0 hands one out at the rendezvous when \
                 it trains with --device cuda): every rank must use the same --device"
            ))
        })?;
        let nccl = super::nccl::Nccl::load()?;
        self.bind()?;
        // SAFETY: `bind` made this device's context current on this thread.
        self.nccl = Some(unsafe { super::nccl::NcclComm::init(nccl, &id, rank, world) }?);
        Ok(())
    }

    fn begin_capture(&mut self) -> Result<()> {
        self.not_capturing("begin_capture")?;
        self.bind()?;
        drv_check(
            // SAFETY: live stream of the bound context. Thread-local mode: only this thread's unsafe calls (which
            // would break capture) are errors.
            unsafe {
                drv::cuStreamBeginCapture_v2(
                    self.stream(),
                    drv::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
            },
            "cuStreamBeginCapture",
        )?;
        self.capturing = true;
        Ok(())
    }

    fn end_capture(&mut self) -> Result<GraphId> {
        if !self.capturing {
            return Err(Error::msg("CUDA: end_capture without begin_capture"));
        }
        self.bind()?;
        self.capturing = false;
        let mut g: drv::CUgraph = std::ptr::null_mut();
        // SAFETY: the stream is capturing (begun above); `g` is a valid out-pointer. A communication stream that
        // forked from the capture and was not joined back makes this fail with CUDA_ERROR_STREAM_CAPTURE_UNJOINED,
        // an error status.
        drv_check(unsafe { drv::cuStreamEndCapture(self.stream(), &mut g) }, "cuStreamEndCapture")?;
        // SAFETY: `g` is the captured graph, owned here and destroyed once (instantiation copies it).
        let graph = unsafe { Owned::new(g, "a captured CUDA graph", destroy::graph) };
        let mut exec: drv::CUgraphExec = std::ptr::null_mut();
        drv_check(
            // SAFETY: live graph; valid out-pointer; no flags.
            unsafe { drv::cuGraphInstantiateWithFlags(&mut exec, graph.raw(), 0) },
            "cuGraphInstantiateWithFlags",
        )?;
        // SAFETY: instantiated above, destroyed once before the context.
        let exec = unsafe { Owned::new(exec, "an instantiated CUDA graph", destroy::graph_exec) };
        self.graphs.push(exec);
        Ok(GraphId(self.graphs.len() - 1))
    }

    fn replay(&mut self, graph: GraphId) -> Result<()> {
        self.not_capturing("replaying a graph")?;
        self.bind()?;
        let exec = self.graphs.get(graph.0).ok_or_else(|| Error::msg(format!("no CUDA graph {graph:?}")))?;
        // SAFETY: live executable graph and stream of this context.
        drv_check(unsafe { drv::cuGraphLaunch(exec.raw(), self.stream()) }, "cuGraphLaunch")
    }

    fn synchronize(&mut self) -> Result<()> {
        self.not_capturing("synchronize")?;
        self.bind()?;
        self.synchronize_streams()
    }

    fn mark(&mut self) -> Result<Mark> {
        self.not_capturing("mark")?;
        self.bind()?;
        if self.marks_used == self.events.len() {
            let mut ev: drv::CUevent = std::ptr::null_mut();
            // SAFETY: the context is current (bind); `ev` is a valid out-pointer; the driver's event symbols were
            // probed with the library. Default flags: the event records timing.
            drv_check(unsafe { drv::cuEventCreate(&mut ev, 0) }, "cuEventCreate")?;
            // SAFETY: created above, destroyed once on drop, before the context (field order).
            self.events.push(unsafe { Owned::new(ev, "a CUDA event", destroy::event) });
        }
        let ev = self.events[self.marks_used].raw();
        // SAFETY: `ev` is a live event of this context and the stream is live.
        drv_check(unsafe { drv::cuEventRecord(ev, self.stream()) }, "cuEventRecord")?;
        self.marks_used += 1;
        Ok(Mark(self.marks_used - 1))
    }

    fn elapsed(&mut self, from: Mark, to: Mark) -> Result<std::time::Duration> {
        if from.0 >= self.marks_used || to.0 >= self.marks_used {
            return Err(Error::msg(format!(
                "elapsed from mark {} to mark {}: {} marks are recorded",
                from.0, to.0, self.marks_used
            )));
        }
        self.bind()?;
        let mut ms = 0f32;
        let (start, end) = (self.events[from.0].raw(), self.events[to.0].raw());
        // SAFETY: both events are live and recorded on this context's stream; `ms` is a valid out-pointer. An
        // event the stream has not reached yet is an error status (CUDA_ERROR_NOT_READY), not undefined behaviour.
        let status = unsafe { drv::cuEventElapsedTime(&mut ms, start, end) };
        drv_check(status, "cuEventElapsedTime")?;
        Ok(std::time::Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
    }

    fn release_marks(&mut self) {
        self.marks_used = 0;
    }

    /// An NVTX range (host-side: it brackets the calls that enqueue the node's work, which is what Nsight Systems
    /// correlates with the kernels they launch); nothing when NVTX is not installed ([`super::nvtx`]).
    fn range_push(&mut self, name: &str) -> Result<()> {
        if let Some(n) = super::nvtx::Nvtx::get() {
            n.push(name);
        }
        Ok(())
    }

    fn range_pop(&mut self) -> Result<()> {
        if let Some(n) = super::nvtx::Nvtx::get() {
            n.pop();
        }
        Ok(())
    }
}

/// A non-blocking stream of its own on the current context: graph capture cannot use the legacy default stream.
fn create_stream(what: &'static str) -> Result<Owned<drv::CUstream>> {
    let mut s: drv::CUstream = std::ptr::null_mut();
    drv_check(
        // SAFETY: a context is current (the caller's); `s` is a valid out-pointer.
        unsafe { drv::cuStreamCreate(&mut s, drv::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) },
        &format!("cuStreamCreate ({what})"),
    )?;
    // SAFETY: created above, destroyed once on drop, before the context.
    Ok(unsafe { Owned::new(s, what, destroy::stream) })
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn fwd_algo(a: u32) -> Result<dnn_sys::cudnnConvolutionFwdAlgo_t> {
    use dnn_sys::cudnnConvolutionFwdAlgo_t::*;
    Ok(match a {
        0 => CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        1 => CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        2 => CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        3 => CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        4 => CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        5 => CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        6 => CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        7 => CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
        _ => return Err(Error::msg(format!("cuDNN: forward algorithm {a} does not exist"))),
    })
}

fn bwd_data_algo(a: u32) -> Result<dnn_sys::cudnnConvolutionBwdDataAlgo_t> {
    use dnn_sys::cudnnConvolutionBwdDataAlgo_t::*;
    Ok(match a {
        0 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
        1 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        2 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
        3 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
        4 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
        5 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
        _ => return Err(Error::msg(format!("cuDNN: backward-data algorithm {a} does not exist"))),
    })
}

fn bwd_filter_algo(a: u32) -> Result<dnn_sys::cudnnConvolutionBwdFilterAlgo_t> {
    use dnn_sys::cudnnConvolutionBwdFilterAlgo_t::*;
    Ok(match a {
        0 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
        1 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        2 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
        3 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
        5 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
        6 => CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
        _ => return Err(Error::msg(format!("cuDNN: backward-filter algorithm {a} is not usable"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH_CUBINS: KernelModule = KernelModule {
        name: "t",
        source: "",
        ptx_sm80: "ptx80",
        cubin_sm80: b"\x7fELF",
        ptxas_report_sm80: "",
        ptx_sm90: "ptx90",
        cubin_sm90: b"\x7fELF",
        ptxas_report_sm90: "",
    };
    const PTX_ONLY: KernelModule = KernelModule { cubin_sm80: b"", cubin_sm90: b"", ..WITH_CUBINS };

    #[test]
    fn cubins_run_on_their_own_major_version_and_ptx_elsewhere() {
        assert_eq!(module_image(&WITH_CUBINS, Arch::Sm80, 8), ModuleImage::Cubin(Arch::Sm80));
        assert_eq!(module_image(&WITH_CUBINS, Arch::Sm90, 9), ModuleImage::Cubin(Arch::Sm90));
        // Blackwell (10.x, 12.x) gets the sm_90 build as PTX, which the driver compiles for it.
        assert_eq!(module_image(&WITH_CUBINS, Arch::Sm90, 10), ModuleImage::Ptx(Arch::Sm90));
        assert_eq!(module_image(&PTX_ONLY, Arch::Sm90, 9), ModuleImage::Ptx(Arch::Sm90));
        assert_eq!(module_image(&PTX_ONLY, Arch::Sm80, 8), ModuleImage::Ptx(Arch::Sm80));
    }

    #[test]
    fn the_device_chooses_every_usable_cudnn_algorithm_by_number() {
        for a in 0..8 {
            assert_eq!(fwd_algo(a).unwrap() as u32, a);
        }
        for a in 0..6 {
            assert_eq!(bwd_data_algo(a).unwrap() as u32, a);
        }
        for a in [0, 1, 2, 3, 5, 6] {
            assert_eq!(bwd_filter_algo(a).unwrap() as u32, a);
        }
        assert!(bwd_filter_algo(4).is_err() && fwd_algo(8).is_err());
    }
}

/// The destroy functions of [`Owned`] handles: each undoes one create call, on a handle that `Owned::new`'s
/// contract says came from it and is destroyed only here, once.
///
/// # Safety (every function)
/// `h` came from the matching create call, is live, and is destroyed by nobody else.
mod destroy {
    use super::*;
    pub unsafe fn event(h: drv::CUevent) -> Result<()> {
        // SAFETY: the function's contract: `h` is live and owned by the dropping `Owned` (a CUDA event).
        drv_check(unsafe { drv::cuEventDestroy_v2(h) }, "cuEventDestroy")
    }
    pub unsafe fn stream(h: drv::CUstream) -> Result<()> {
        // SAFETY: the function's contract: `h` is live and owned by the dropping `Owned` (the CUDA stream).
        drv_check(unsafe { drv::cuStreamDestroy_v2(h) }, "cuStreamDestroy")
    }
    pub unsafe fn lt_handle(h: lt_sys::cublasLtHandle_t) -> Result<()> {
        // SAFETY: the function's contract: `h` is live and owned by the dropping `Owned` (the cuBLASLt handle).
        lt_check(unsafe { lt_sys::cublasLtDestroy(h) }, "cublasLtDestroy")
    }
    pub unsafe fn blas_handle(h: blas_sys::cublasHandle_t) -> Result<()> {
        // SAFETY: the function's contract: `h` is live and owned by the dropping `Owned` (the cuBLAS handle).
        blas_check(unsafe { blas_sys::cublasDestroy_v2(h) }, "cublasDestroy")
    }
    pub unsafe fn dnn_handle(h: dnn_sys::cudnnHandle_t) -> Result<()> {
        // SAFETY: the function's contract: `h` is live and owned by the dropping `Owned` (the cuDNN handle).
        dnn_check(unsafe { dnn_sys::cudnnDestroy(h) }, "cudnnDestroy")
    }
    pub unsafe fn lt_layout(h: lt_sys::cublasLtMatrixLayout_t) -> Result<()> {
        // SAFETY: the function's contract: `h` is live and owned by the dropping `Owned` (a cuBLASLt matrix layout).
        lt_check(unsafe { lt_sys::cublasLtMatrixLayoutDestroy(h) }, "cublasLtMatrixLayoutDestroy")
    }
    pub unsafe fn lt_matmul_desc(h: lt_sys::cublasLtMatmulDesc_t) -> Result<()> {
        // SAFETY: the function's contract: `h` is live and owned by the dropping `Owned` (a cuBLASLt matmul descriptor).
        lt_check(unsafe { lt_sys::cublasLtMatmulDescDestroy(h) }, "cublasLtMatmulDescDestroy")
    }
    pub unsafe fn lt_preference(h: lt_sys::cublasLtMatmulPreference_t) -> Result<()> {
        // SAFETY: the function's contract: `h` is live and owned by the dropping `Owned` (a cuBLASLt preference).
        lt_check(unsafe { lt_sys::cublasLtMatmulPreferenceDestroy(h) }, "cublasLtMatmulPreferenceDestroy")
    }
    pub unsafe fn tensor_desc(h: dnn_sys::cudnnTensorDescriptor_t) -> Result<()> {
        // SAFETY: the function's contract: `h` is live and owned by the dropping `Owned` (a cuDNN tensor descriptor).
        dnn_check(unsafe { dnn_sys::cudnnDestroyTensorDescriptor(h) }, "cudnnDestroyTensorDescriptor")
    }
    pub unsafe fn filter_desc(h: dnn_sys::cudnnFilterDescriptor_t) -> Result<()> {
        // SAFETY: the function's contract: `h` is live and owned by the dropping `Owned` (a cuDNN filter descriptor).
        dnn_check(unsafe { dnn_sys::cudnnDestroyFilterDescriptor(h) }, "cudnnDestroyFilterDescriptor")
    }
    pub unsafe fn conv_desc(h: dnn_sys::cudnnConvolutionDescriptor_t) -> Result<()> {
        // SAFETY: the function's contract: `h` is live and owned by the dropping `Owned` (a cuDNN convolution descriptor).
        dnn_check(unsafe { dnn_sys::cudnnDestroyConvolutionDescriptor(h) }, "cudnnDestroyConvolutionDescriptor")
    }
    pub unsafe fn memory(h: drv::CUdeviceptr) -> Result<()> {
        // SAFETY: the function's contract: `h` is live and owned by the dropping `Owned` (device memory).
        drv_check(unsafe { drv::cuMemFree_v2(h) }, "cuMemFree")
    }
    pub unsafe fn module(h: drv::CUmodule) -> Result<()> {
        // SAFETY: the function's contract: `h` is live and owned by the dropping `Owned` (a kernel module).
        drv_check(unsafe { drv::cuModuleUnload(h) }, "cuModuleUnload")
    }
    pub unsafe fn graph(h: drv::CUgraph) -> Result<()> {
        // SAFETY: the function's contract: `h` is live and owned by the dropping `Owned` (a captured CUDA graph).
        drv_check(unsafe { drv::cuGraphDestroy(h) }, "cuGraphDestroy")
    }
    pub unsafe fn graph_exec(h: drv::CUgraphExec) -> Result<()> {
        // SAFETY: the function's contract: `h` is live and owned by the dropping `Owned` (an instantiated CUDA graph).
        drv_check(unsafe { drv::cuGraphExecDestroy(h) }, "cuGraphExecDestroy")
    }
}
