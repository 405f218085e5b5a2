//! The device seam: everything the CUDA executor asks of a GPU, as one trait with two implementations.
//!
//! - [`emu::EmuDevice`] runs on the CPU: kernels through the CUDA emulator (`kernels::emulate`, the same .cu
//!   sources), GEMMs and convolutions through naive implementations written from the cuBLAS and cuDNN
//!   documentation ([`blas`], [`dnn`]), CUDA graphs as recorded command lists, and liveness poisoning, so the whole
//!   lowering (launch shapes, argument order, offsets, leading dimensions, transposes, layouts, workspaces, capture)
//!   is checked in CI without a GPU.
//! - `CudaDevice` (the CUDA executor, part 2) calls the driver, cuBLASLt and cuDNN through cudarc.
//!
//! The types here are plain data in the libraries' own terms (column-major GEMMs with leading dimensions and batch
//! strides; 4-d tensor and filter descriptors with dims in N,C,H,W order whatever the memory format), so the
//! lowering can be read side by side with the cuBLAS and cuDNN documentation.

pub mod blas;
pub mod dnn;
pub mod emu;
pub mod shared_memory;

use crate::error::Result;
use crate::graph::DType;
use smallvec::SmallVec;

/// A device address. On the emulated device it is a host address inside one of its allocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DevPtr(pub u64);

impl DevPtr {
    pub const NULL: DevPtr = DevPtr(0);

    /// The address `bytes` further on.
    pub fn offset(self, bytes: u64) -> DevPtr {
        DevPtr(self.0 + bytes)
    }
}

/// A byte range of device memory: what a command reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub ptr: DevPtr,
    pub bytes: u64,
}

impl Span {
    pub fn new(ptr: DevPtr, bytes: u64) -> Span {
        Span { ptr, bytes }
    }
    pub fn end(&self) -> u64 {
        self.ptr.0 + self.bytes
    }
    /// True when `other` lies entirely inside this span.
    pub fn contains(&self, other: &Span) -> bool {
        other.bytes == 0 || (other.ptr.0 >= self.ptr.0 && other.end() <= self.end())
    }
}

/// One kernel argument, in parameter order: a device pointer, or the bytes of a by-value parameter (a scalar or a
/// `#[repr(C)]` struct), exactly as the kernel's parameter list lays them out.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    Ptr(DevPtr),
    Value(SmallVec<[u8; 16]>),
}

impl Arg {
    /// Bytes the argument takes in a kernel's parameter list (a device pointer is 8), as the PTX declares it.
    pub fn size(&self) -> usize {
        match self {
            Arg::Ptr(_) => 8,
            Arg::Value(b) => b.len(),
        }
    }
    pub fn u64(v: u64) -> Arg {
        Arg::Value(SmallVec::from_slice(&v.to_le_bytes()))
    }
    pub fn i32(v: i32) -> Arg {
        Arg::Value(SmallVec::from_slice(&v.to_le_bytes()))
    }
    pub fn u32(v: u32) -> Arg {
        Arg::Value(SmallVec::from_slice(&v.to_le_bytes()))
    }
    pub fn i64(v: i64) -> Arg {
        Arg::Value(SmallVec::from_slice(&v.to_le_bytes()))
    }
    pub fn f32(v: f32) -> Arg {
        Arg::Value(SmallVec::from_slice(&v.to_le_bytes()))
    }
    pub fn f64(v: f64) -> Arg {
        Arg::Value(SmallVec::from_slice(&v.to_le_bytes()))
    }
    /// A plain-old-data struct passed by value.
    pub fn pod<T: bytemuck::Pod>(v: &T) -> Arg {
        Arg::Value(SmallVec::from_slice(bytemuck::bytes_of(v)))
    }
}

/// Grid, block and dynamic shared memory of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LaunchDims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

impl LaunchDims {
    pub fn linear(grid: u32, block: u32) -> LaunchDims {
        LaunchDims { grid: [grid, 1, 1], block: [block, 1, 1], shared_bytes: 0 }
    }
    pub fn threads(&self) -> u64 {
        self.grid.iter().chain(&self.block).map(|&d| d as u64).product()
    }
}

/// A kernel by module and entry-point name. The module is named explicitly (never looked up from PTX, which is
/// empty on a machine that built without NVRTC).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelRef {
    /// A `kernels/*.cu` module name (`unary`), or the name of a generated module.
    pub module: String,
    pub name: String,
}

/// One kernel launch with its arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub kernel: KernelRef,
    pub dims: LaunchDims,
    pub args: Vec<Arg>,
    /// The kernel's contract allows any grid with the same result (grid-stride loops whose results do not depend
    /// on the grid). An emulated device may then run it with a smaller grid; a GPU ignores this.
    pub any_grid: bool,
}

/// Where a kernel module's code comes from.
#[derive(Clone, Debug)]
pub enum ModuleSource {
    /// A hand-written `kernels/*.cu` module, embedded at build time.
    Shipped(&'static crate::kernels::KernelModule),
    /// A generated module (fused kernels): its name and self-contained CUDA source.
    Generated { name: String, source: String },
}

impl ModuleSource {
    pub fn name(&self) -> &str {
        match self {
            ModuleSource::Shipped(m) => m.name,
            ModuleSource::Generated { name, .. } => name,
        }
    }
}

/// cuBLAS's `cublasOperation_t` for one operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transpose {
    N,
    T,
}

/// How a GEMM accumulates: strict f32 (also for bf16/f16 inputs), or TF32 tensor cores for f32 inputs (opt-in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmCompute {
    F32,
    F32FastTf32,
}

/// One column-major matrix operand of a GEMM: cuBLAS's pointer, type, leading dimension and batch stride (both in
/// elements; stride 0 shares one matrix across the batch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatrixRef {
    pub ptr: DevPtr,
    pub dtype: DType,
    pub ld: u64,
    pub stride: u64,
}

/// A strided-batched GEMM with cuBLAS's column-major semantics:
/// `C[b] = alpha * op(A[b]) * op(B[b]) + beta * C[b]` for b < batch, op(A) m×k, op(B) k×n, C m×n, where
/// `X[b]` starts `b * stride` elements after `X.ptr` and element (i, j) of a matrix is at `i + j * ld`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub transa: Transpose,
    pub transb: Transpose,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub alpha: f32,
    pub beta: f32,
    pub a: MatrixRef,
    pub b: MatrixRef,
    pub c: MatrixRef,
    pub batch: u64,
    pub compute: GemmCompute,
    /// Workspace the library may use (planned scratch); `bytes` may be 0.
    pub workspace: Span,
}

/// The memory layout of a 4-d tensor or filter. Dims are always given in N,C,H,W (K,C,R,S) order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout4 {
    /// NCHW tensors, KCRS filters.
    Nchw,
    /// NHWC tensors, KRSC filters.
    Nhwc,
}

/// A packed 4-d tensor (cuDNN `cudnnSetTensor4dDescriptor`): dims [N, C, H, W].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tensor4 {
    pub dims: [u64; 4],
    pub layout: Layout4,
    pub dtype: DType,
    pub ptr: DevPtr,
}

/// A packed filter (cuDNN `cudnnSetFilter4dDescriptor`): dims [K, C, R, S].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filter4 {
    pub dims: [u64; 4],
    pub layout: Layout4,
    pub dtype: DType,
    pub ptr: DevPtr,
}

/// Which cuDNN convolution call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvDirection {
    /// `cudnnConvolutionForward`: y = alpha * conv(x, w) + beta * y.
    Forward,
    /// `cudnnConvolutionBackwardData`: dx (in `x`) = alpha * conv_transpose(dy (in `y`), w) + beta * dx.
    BackwardData,
    /// `cudnnConvolutionBackwardFilter`: dw (in `w`) = alpha * correlate(x, dy (in `y`)) + beta * dw.
    BackwardFilter,
}

/// cuDNN's math type for a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvMath {
    /// `CUDNN_FMA_MATH`: strict f32 (no TF32).
    Fma,
    /// `CUDNN_DEFAULT_MATH`: TF32 allowed for f32 on Ampere and later.
    Default,
    /// `CUDNN_TENSOR_OP_MATH`: tensor cores for bf16/f16.
    TensorOp,
}

/// One cuDNN 2-d convolution (cross-correlation, dilation 1, one group, f32 compute), legacy API.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conv {
    pub direction: ConvDirection,
    pub x: Tensor4,
    pub w: Filter4,
    pub y: Tensor4,
    /// [pad_h, pad_w] and [stride_h, stride_w].
    pub padding: [u64; 2],
    pub stride: [u64; 2],
    pub alpha: f32,
    pub beta: f32,
    pub math: ConvMath,
    /// The algorithm chosen at compile time (cuDNN's enum value for this direction).
    pub algo: u32,
    pub workspace: Span,
}

/// `cuMemcpy2DAsync` device to device: `height` rows of `width` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copy2d {
    pub dst: DevPtr,
    pub dst_pitch: u64,
    pub src: DevPtr,
    pub src_pitch: u64,
    pub width: u64,
    pub height: u64,
}

/// What a device is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (u32, u32),
    pub memory_bytes: u64,
}

/// A recorded CUDA graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphId(pub usize);

/// A point in the stream's work (a CUDA event on a GPU): kernels run asynchronously there, so the time a node takes
/// is read between two marks once the stream has finished, never from the host's clock around the launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mark(pub usize);

/// The device's two streams. Everything runs on the compute stream except the gradient all-reduce and its staging
/// copies, which run on the communication stream so that they overlap the rest of the backward. The streams are
/// ordered only through events ([`Device::record`], [`Device::wait`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Compute,
    Comm,
}

impl Stream {
    pub fn name(self) -> &'static str {
        match self {
            Stream::Compute => "compute",
            Stream::Comm => "comm",
        }
    }
}

/// An event ordering the two streams (a CUDA event created with `CU_EVENT_DISABLE_TIMING` on a GPU). The caller
/// names events by small numbers; the device creates one on first use and reuses it whenever the number comes
/// again: a wait orders after the record of that event last issued before it (`cuStreamWaitEvent`'s semantics), so
/// re-recording an event after a wait was issued is safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventId(pub usize);

/// What a node reads and writes, declared by the executor before its commands (`Device::before_command`), on the
/// stream it runs on: the emulated device checks it against the unfinished work of the other stream.
#[derive(Clone, Copy, Debug)]
pub struct NodeAccess<'a> {
    /// The node, as errors name it (`node 12 (adamw)`).
    pub what: &'a str,
    pub stream: Stream,
    pub reads: &'a [Span],
    pub writes: &'a [Span],
}

/// What the CUDA executor asks of a GPU. Work is ordered on the compute stream, except what names the
/// communication stream ([`Stream::Comm`]), which is ordered with it only through events; `download` waits for the
/// compute stream, `synchronize` for both. Allocation and module loading happen at compile time only, never while
/// capturing. A capture begins and ends on the compute stream; the communication stream joins it by waiting on an
/// event the compute stream recorded inside the capture, and must be joined back (the compute stream waits on an
/// event recorded after its last work) before the capture ends.
pub trait Device {
    fn info(&self) -> DeviceInfo;
    /// Device memory for the program's lifetime (256-byte aligned). `what` names it in errors.
    fn alloc(&mut self, bytes: u64, what: &str) -> Result<DevPtr>;
    /// Makes a module's kernels launchable; called once per module before any capture.
    fn load_module(&mut self, module: &ModuleSource) -> Result<()>;
    /// Host to device, stream-ordered.
    fn upload(&mut self, dst: DevPtr, src: &[u8]) -> Result<()>;
    /// Device to host; waits for the stream first.
    fn download(&mut self, dst: &mut [u8], src: DevPtr) -> Result<()>;
    /// A device-to-device copy on `stream`.
    fn copy2d(&mut self, stream: Stream, c: &Copy2d) -> Result<()>;
    fn memset(&mut self, dst: DevPtr, byte: u8, bytes: u64) -> Result<()>;
    fn launch(&mut self, launch: &Launch) -> Result<()>;
    fn gemm(&mut self, g: &Gemm) -> Result<()>;
    fn conv(&mut self, c: &Conv) -> Result<()>;
    /// Sum (then divide by the world size when `average`) across ranks, in place, ordered on `stream` (and captured
    /// like any other command). A device given no communicator is a world of one: a no-op.
    fn all_reduce(&mut self, stream: Stream, buf: DevPtr, count: u64, dtype: DType, average: bool) -> Result<()>;
    /// Records `event` on `stream` after the work issued there so far.
    fn record(&mut self, stream: Stream, event: EventId) -> Result<()>;
    /// Makes the work issued on `stream` from now on wait for the last record of `event` (on the other stream).
    fn wait(&mut self, stream: Stream, event: EventId) -> Result<()>;
    /// Joins the device to the data-parallel ranks `comm` describes, before any capture; `all_reduce` then sums
    /// across them. A device that cannot refuses, saying why.
    fn set_communicator(&mut self, comm: std::sync::Arc<dyn crate::engine::dist::Communicator>) -> Result<()> {
        Err(crate::Error::msg(format!(
            "{} cannot sum across data-parallel ranks (rank {} of {})",
            self.info().name,
            comm.rank(),
            comm.world_size()
        )))
    }
    /// Starts recording the stream's work into a graph instead of running it.
    fn begin_capture(&mut self) -> Result<()>;
    fn end_capture(&mut self) -> Result<GraphId>;
    fn replay(&mut self, graph: GraphId) -> Result<()>;
    fn synchronize(&mut self) -> Result<()>;
    /// Records a mark after the work issued so far (not while capturing: a captured graph is timed as a whole).
    fn mark(&mut self) -> Result<Mark>;
    /// The time from `from` to `to`, once the stream has passed `to` (call `synchronize` first).
    fn elapsed(&mut self, from: Mark, to: Mark) -> Result<std::time::Duration>;
    /// Forgets every mark, so the next step's marks reuse their events.
    fn release_marks(&mut self);
    /// Opens a named range around the commands issued until the matching `range_pop` (ranges nest): an NVTX range
    /// on a GPU, so a profiler's timeline (Nsight Systems) shows what each command belongs to. A host-side note,
    /// never captured into a graph; the executor opens them only in profiled (eager) steps. No-ops by default.
    fn range_push(&mut self, _name: &str) -> Result<()> {
        Ok(())
    }
    /// Closes the innermost open range.
    fn range_pop(&mut self) -> Result<()> {
        Ok(())
    }

    /// The checks only an emulated device can make, called by the executor around each command (no-ops on a GPU):
    /// `before_command` receives the memory that holds live data at this command (everything else in the arena is
    /// dead and may be poisoned) and what the node reads and writes on which stream (checked against the other
    /// stream's unfinished work); `after_command` the spans the command was allowed to write (anything else that
    /// changed is an error naming `what`).
    fn before_command(&mut self, _arena: Span, _live: &[Span], _access: &NodeAccess) -> Result<()> {
        Ok(())
    }
    fn after_command(&mut self, _what: &str, _writes: &[Span]) -> Result<()> {
        Ok(())
    }
}
