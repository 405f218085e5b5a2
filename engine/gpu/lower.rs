//! Lowering: every op of a planned graph becomes a short list of device commands (kernel launches, cuBLAS GEMMs,
//! cuDNN convolutions, 2-d copies, memsets) with every address resolved, once, at compile time.
//!
//! Launch shapes are derived from tensor shapes only (never from the device), so reductions add in the same order
//! on every GPU and under emulation. Grid-stride kernels use 256-thread blocks and `min(ceil(n / 256), 1024)`
//! blocks; warp-per-row kernels use (32, 8) blocks.
//!
//! The same function lowers a node twice: first with placeholder addresses, to learn how much scratch and constant
//! memory it needs (so the memory planner can place it), then with the planned addresses.

use super::consts::{AdamWChunk, AdamWTensor, BroadcastDims, StridedDims, ZcBcast};
use crate::engine::device::{
    Arg, Conv, ConvDirection, ConvMath, Copy2d, DevPtr, Filter4, Gemm, GemmCompute, KernelRef, Launch, LaunchDims,
    Layout4, MatrixRef, Span, Tensor4, Transpose,
};
use crate::error::{Error, Result};
use crate::graph::fusion::Anchor;
use crate::graph::{DType, Graph, Layout, Node, Op, Shape, ValueId};
use crate::kernels::codegen;

mod epilogue;
pub mod flash;
pub use flash::HEAD_DIMS as FLASH_HEAD_DIMS;

/// One device command.
#[derive(Clone, Debug, PartialEq)]
pub enum Cmd {
    Launch(Launch),
    Gemm(Gemm),
    Conv(Conv),
    Copy2d(Copy2d),
    Memset {
        dst: DevPtr,
        byte: u8,
        bytes: u64,
    },
    /// `count` elements at `buf` summed over the data-parallel ranks, in place (`Device::all_reduce`, no average:
    /// see `Op::AllReduce`).
    AllReduce {
        buf: DevPtr,
        count: u64,
        dtype: DType,
    },
}

impl Cmd {
    /// A short description for listings: the kernel name, or the library call and its shape.
    pub fn describe(&self) -> String {
        match self {
            Cmd::Launch(l) => format!("launch {} grid {:?} block {:?}", l.kernel.name, l.dims.grid, l.dims.block),
            Cmd::Gemm(g) => format!(
                "gemm {:?}{:?} m={} n={} k={} batch={} {}",
                g.transa, g.transb, g.m, g.n, g.k, g.batch, g.a.dtype
            ),
            Cmd::Conv(c) => format!(
                "conv {:?} x={:?} w={:?} y={:?} stride={:?} pad={:?} {}",
                c.direction, c.x.dims, c.w.dims, c.y.dims, c.stride, c.padding, c.x.dtype
            ),
            Cmd::Copy2d(c) => format!("copy2d {}x{} bytes", c.height, c.width),
            Cmd::Memset { bytes, byte, .. } => format!("memset {bytes} bytes to {byte:#04x}"),
            Cmd::AllReduce { count, dtype, .. } => format!("all-reduce (sum) {count} {dtype}"),
        }
    }

    /// The kind, for counting: launch, gemm, conv, copy, memset or all-reduce.
    pub fn kind(&self) -> &'static str {
        match self {
            Cmd::Launch(_) => "launch",
            Cmd::Gemm(_) => "gemm",
            Cmd::Conv(_) => "conv",
            Cmd::Copy2d(_) => "copy",
            Cmd::Memset { .. } => "memset",
            Cmd::AllReduce { .. } => "all-reduce",
        }
    }
}

/// A bump allocator over a region whose base is known only in the second pass.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bump {
    pub base: u64,
    pub used: u64,
}

impl Bump {
    pub fn at(base: u64) -> Bump {
        Bump { base, used: 0 }
    }
    /// `bytes` at the next 256-byte boundary.
    fn take(&mut self, bytes: u64) -> Span {
        let off = self.used.div_ceil(256) * 256;
        self.used = off + bytes;
        Span::new(DevPtr(self.base + off), bytes)
    }
}

/// What lowering one node produced.
#[derive(Debug, Default)]
pub struct Lowered {
    pub cmds: Vec<Cmd>,
    /// Bytes to place in the constant region (tables, flags) at the node's constant offset, uploaded once.
    pub consts: Vec<u8>,
    /// Error flags (u32 in the constant region) that must read 0 after a step.
    pub error_flags: Vec<DevPtr>,
    /// Scratch and constant bytes used.
    pub scratch_bytes: u64,
    pub const_bytes: u64,
}

/// Where the lowering finds things.
pub struct Ctx<'a> {
    pub graph: &'a Graph,
    /// The device address of a value (placeholder in the first pass).
    pub addr: &'a dyn Fn(ValueId) -> DevPtr,
    pub scratch_base: u64,
    pub const_base: u64,
    /// The module holding the graph's fused kernels.
    pub fused_module: &'a str,
    /// Bytes of scratch attention may use for its score chunks.
    pub attention_budget: u64,
    /// Attention on the flash kernels where they fit (bf16/f16, a head dim they are built for); see [`flash`].
    pub flash_attention: bool,
    /// The workspace every cuBLASLt and cuDNN call gets (the program's one library workspace; none in the
    /// placeholder pass).
    pub library_workspace: Span,
    /// Where the all-reduce stages a bucket of several gradients ([`comm_staging_bytes`]; none in the placeholder
    /// pass).
    pub comm_staging: Span,
}

/// The bytes of the buffer every all-reduce of several gradients stages its bucket in: the largest such bucket.
///
/// Its own allocation, not arena scratch: the all-reduce runs on the communication stream while the compute stream
/// goes on with the backward, so memory the planner frees after the node would be reused under it. One buffer
/// serves every bucket because the communication stream runs the buckets' copies and sums one after another.
pub fn comm_staging_bytes(g: &Graph) -> u64 {
    g.nodes
        .iter()
        .filter(|n| matches!(n.op, Op::AllReduce { .. }) && n.inputs.len() > 1)
        .map(|n| n.inputs.iter().map(|&v| g.value(v).bytes() as u64).sum())
        .max()
        .unwrap_or(0)
}

/// The module of each hand-written kernel family.
mod module {
    pub const UNARY: &str = "unary";
    pub const BINARY: &str = "binary";
    pub const CAST: &str = "cast";
    pub const NORM: &str = "norm";
    pub const SOFTMAX: &str = "softmax";
    pub const REDUCE: &str = "reduce";
    pub const LOSS: &str = "loss";
    pub const ADAMW: &str = "adamw";
    pub const UPSAMPLE: &str = "upsample";
    pub const LAYOUT: &str = "layout";
    pub const ATTENTION: &str = "attention";
    pub const CHECK: &str = "check";
    pub const FLASH: &str = "flash_attention";
    pub const FLASH_BWD: &str = "flash_attention_bwd";
    pub const ALL: [&str; 14] =
        [UNARY, BINARY, CAST, NORM, SOFTMAX, REDUCE, LOSS, ADAMW, UPSAMPLE, LAYOUT, ATTENTION, CHECK, FLASH, FLASH_BWD];
}
pub use module::ALL as SHIPPED_MODULES;

const BLOCK: u32 = 256;
const MAX_GRID: u64 = 1024;

/// Grid-stride launch over n elements.
fn grid_stride(n: u64) -> LaunchDims {
    LaunchDims::linear(n.div_ceil(BLOCK as u64).clamp(1, MAX_GRID) as u32, BLOCK)
}

/// One warp per row, 8 rows per block.
fn warp_rows(rows: u64) -> LaunchDims {
    LaunchDims { grid: [rows.div_ceil(8).clamp(1, MAX_GRID) as u32, 1, 1], block: [32, 8, 1], shared_bytes: 0 }
}

fn suffix(op: &str, d: DType) -> Result<&'static str> {
    match d {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => Err(Error::Unsupported { backend: "cuda", msg: format!("{op} on {other} data") }),
    }
}

fn int_suffix(op: &str, d: DType) -> Result<&'static str> {
    match d {
        DType::I32 => Ok("i32"),
        DType::I64 => Ok("i64"),
        other => Err(Error::Unsupported { backend: "cuda", msg: format!("{op} with {other} ids") }),
    }
}

fn u32_of(what: &str, v: u64) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Unsupported { backend: "cuda", msg: format!("{what} {v} exceeds 32 bits") })
}

/// One attention node: its attributes, whether it carries the log-sum-exp (`Op::Attention { lse }`), and whether
/// it is the backward.
#[derive(Clone, Copy)]
struct Attn {
    scale: f32,
    causal: bool,
    lse: bool,
    backward: bool,
}

/// One convolution node's attributes: which pass, its stride and padding, and its memory format.
#[derive(Clone, Copy)]
pub(super) struct ConvOp {
    pub direction: ConvDirection,
    pub stride: usize,
    pub padding: usize,
    pub layout: Layout,
}

/// Emits commands for one node.
struct Emit<'c, 'a> {
    ctx: &'c Ctx<'a>,
    node: &'c Node,
    out: Lowered,
}

impl Emit<'_, '_> {
    fn g(&self) -> &Graph {
        self.ctx.graph
    }
    fn in_ptr(&self, i: usize) -> DevPtr {
        (self.ctx.addr)(self.node.inputs[i])
    }
    fn out_ptr(&self, i: usize) -> DevPtr {
        (self.ctx.addr)(self.node.outputs[i])
    }
    fn in_shape(&self, i: usize) -> &Shape {
        self.g().shape(self.node.inputs[i])
    }
    fn out_shape(&self, i: usize) -> &Shape {
        self.g().shape(self.node.outputs[i])
    }
    fn in_dtype(&self, i: usize) -> DType {
        self.g().dtype(self.node.inputs[i])
    }
    fn out_dtype(&self, i: usize) -> DType {
        self.g().dtype(self.node.outputs[i])
    }
    fn name(&self) -> String {
        self.node.op.name()
    }

    /// All float inputs and outputs share one dtype (the kernels take one storage type); returns it.
    fn one_float_dtype(&self) -> Result<DType> {
        let d = self.out_dtype(0);
        for &v in self.node.inputs.iter().chain(&self.node.outputs) {
            let dv = self.g().dtype(v);
            if dv.is_float() && dv != d {
                return Err(Error::Unsupported {
                    backend: "cuda",
                    msg: format!("{} mixes {d} and {dv} values; cast them to one type first", self.name()),
                });
            }
        }
        suffix(&self.name(), d)?;
        Ok(d)
    }

    /// The storage type of an attention node (`a`): every value but the log-sum-exp (f32 beside every type the
    /// kernels take, by shape inference) shares it.
    fn attention_dtype(&self, a: Attn) -> Result<DType> {
        let d = self.in_dtype(0);
        let lse = a.lse.then(|| if a.backward { self.node.inputs[4] } else { self.node.outputs[1] });
        for &v in self.node.inputs.iter().chain(&self.node.outputs) {
            let dv = self.g().dtype(v);
            if Some(v) != lse && dv != d {
                return Err(Error::Unsupported {
                    backend: "cuda",
                    msg: format!("{} mixes {d} and {dv} values; cast them to one type first", self.name()),
                });
            }
        }
        suffix(&self.name(), d)?;
        Ok(d)
    }

    fn scratch(&mut self, bytes: u64) -> Span {
        let mut b = Bump { base: self.ctx.scratch_base, used: self.out.scratch_bytes };
        let s = b.take(bytes);
        self.out.scratch_bytes = b.used;
        s
    }

    /// Places `bytes` in the constant region and returns their device address.
    fn constant(&mut self, bytes: &[u8]) -> DevPtr {
        let mut b = Bump { base: self.ctx.const_base, used: self.out.const_bytes };
        let s = b.take(bytes.len() as u64);
        let off = (s.ptr.0 - self.ctx.const_base) as usize;
        self.out.consts.resize(off, 0);
        self.out.consts.extend_from_slice(bytes);
        self.out.const_bytes = b.used;
        s.ptr
    }

    fn launch(&mut self, module: &str, name: String, dims: LaunchDims, args: Vec<Arg>, any_grid: bool) {
        let kernel = KernelRef { module: module.to_string(), name };
        self.out.cmds.push(Cmd::Launch(Launch { kernel, dims, args, any_grid }));
    }

    fn copy(&mut self, dst: DevPtr, src: DevPtr, bytes: u64) {
        self.out.cmds.push(Cmd::Copy2d(Copy2d {
            dst,
            dst_pitch: bytes,
            src,
            src_pitch: bytes,
            width: bytes,
            height: 1,
        }));
    }

    fn lower(&mut self) -> Result<()> {
        let op = self.node.op.clone();
        match &op {
            Op::Reshape { .. } => {} // a view: the planner gave it its input's bytes
            Op::Fill { value, shape, dtype } => {
                let n = shape.numel() as u64;
                if dtype.is_float() {
                    let name = format!("fill_{}", suffix("fill", *dtype)?);
                    let args = vec![Arg::Ptr(self.out_ptr(0)), Arg::u64(n), Arg::f32(value.get() as f32)];
                    self.launch(module::UNARY, name, grid_stride(n), args, true);
                } else {
                    let v = value.get();
                    let value = if *dtype == DType::I32 { Arg::i32(v as i32) } else { Arg::i64(v as i64) };
                    let name = format!("fill_{}", int_suffix("fill", *dtype)?);
                    self.launch(
                        module::LAYOUT,
                        name,
                        grid_stride(n),
                        vec![Arg::Ptr(self.out_ptr(0)), Arg::u64(n), value],
                        true,
                    );
                }
            }
            Op::Unary(u) => {
                let d = self.one_float_dtype()?;
                let n = self.out_shape(0).numel() as u64;
                let name = format!("unary_{}_{}", u.name(), suffix("unary", d)?);
                let args = vec![Arg::Ptr(self.in_ptr(0)), Arg::Ptr(self.out_ptr(0)), Arg::u64(n)];
                self.launch(module::UNARY, name, grid_stride(n), args, true);
            }
            Op::UnaryBackward(u) => {
                let d = self.one_float_dtype()?;
                let n = self.out_shape(0).numel() as u64;
                let name = format!("unary_{}_bwd_{}", u.name(), suffix("unary", d)?);
                let args =
                    vec![Arg::Ptr(self.in_ptr(0)), Arg::Ptr(self.in_ptr(1)), Arg::Ptr(self.out_ptr(0)), Arg::u64(n)];
                self.launch(module::UNARY, name, grid_stride(n), args, true);
            }
            Op::Binary(b) => {
                let d = self.one_float_dtype()?;
                let out = self.out_shape(0).clone();
                let n = out.numel() as u64;
                let sfx = suffix("binary", d)?;
                let mut args =
                    vec![Arg::Ptr(self.in_ptr(0)), Arg::Ptr(self.in_ptr(1)), Arg::Ptr(self.out_ptr(0)), Arg::u64(n)];
                let name = if self.in_shape(0) == &out && self.in_shape(1) == &out {
                    format!("binary_{}_{sfx}", b.name())
                } else {
                    args.push(Arg::pod(&BroadcastDims::new(&out, self.in_shape(0), self.in_shape(1))?));
                    format!("binary_{}_bcast_{sfx}", b.name())
                };
                self.launch(module::BINARY, name, grid_stride(n), args, true);
            }
            Op::Affine { alpha, beta } => {
                let d = self.one_float_dtype()?;
                let n = self.out_shape(0).numel() as u64;
                let args = vec![
                    Arg::Ptr(self.in_ptr(0)),
                    Arg::Ptr(self.out_ptr(0)),
                    Arg::u64(n),
                    Arg::f32(alpha.get() as f32),
                    Arg::f32(beta.get() as f32),
                ];
                self.launch(module::UNARY, format!("affine_{}", suffix("affine", d)?), grid_stride(n), args, true);
            }
            Op::Cast { to } => {
                let from = self.in_dtype(0);
                let n = self.out_shape(0).numel() as u64;
                if from == *to {
                    self.copy(self.out_ptr(0), self.in_ptr(0), n * to.size() as u64);
                } else {
                    let name = format!("cast_{}_{}", suffix("cast", from)?, suffix("cast", *to)?);
                    let args = vec![Arg::Ptr(self.in_ptr(0)), Arg::Ptr(self.out_ptr(0)), Arg::u64(n)];
                    self.launch(module::CAST, name, grid_stride(n), args, true);
                }
            }
            Op::MatMul { trans_a, trans_b } => self.matmul(*trans_a, *trans_b)?,
            Op::Conv2d { stride, padding, layout } => self.conv(ConvOp {
                direction: ConvDirection::Forward,
                stride: *stride,
                padding: *padding,
                layout: *layout,
            })?,
            Op::Conv2dBackwardInput { stride, padding, layout, .. } => self.conv(ConvOp {
                direction: ConvDirection::BackwardData,
                stride: *stride,
                padding: *padding,
                layout: *layout,
            })?,
            Op::Conv2dBackwardWeight { stride, padding, layout, .. } => self.conv(ConvOp {
                direction: ConvDirection::BackwardFilter,
                stride: *stride,
                padding: *padding,
                layout: *layout,
            })?,
            Op::GroupNorm { groups, eps, layout } => {
                let d = self.one_float_dtype()?;
                let (n, c, sp) = self.ncs_of(0, *layout)?;
                let g = *groups as u64;
                // The kernels walk planar [n, c, s] tensors: a channels-last node goes through planar scratch.
                let (x, y) = match layout {
                    Layout::Nchw => (self.in_ptr(0), self.out_ptr(0)),
                    Layout::Nhwc => {
                        let x = self.transpose_channels(d, self.in_ptr(0), None, (n, c, sp), true)?;
                        (x, self.scratch(n * c * sp * d.size() as u64).ptr)
                    }
                };
                let args = vec![
                    Arg::Ptr(x),
                    Arg::Ptr(self.in_ptr(1)),
                    Arg::Ptr(self.in_ptr(2)),
                    Arg::Ptr(y),
                    Arg::Ptr(DevPtr::NULL),
                    Arg::Ptr(DevPtr::NULL),
                    Arg::u64(n),
                    Arg::u64(c),
                    Arg::u64(sp),
                    Arg::u64(g),
                    Arg::f32(eps.get() as f32),
                ];
                let dims = LaunchDims::linear((n * g).clamp(1, MAX_GRID) as u32, BLOCK);
                self.launch(module::NORM, format!("groupnorm_{}", suffix("groupnorm", d)?), dims, args, true);
                if *layout == Layout::Nhwc {
                    self.transpose_channels(d, y, Some(self.out_ptr(0)), (n, c, sp), false)?;
                }
            }
            Op::GroupNormBackward { groups, eps, layout } => {
                let d = self.one_float_dtype()?;
                let sfx = suffix("groupnorm", d)?;
                let (n, c, sp) = self.ncs_of(0, *layout)?;
                let g = *groups as u64;
                let (x, dy, dx) = match layout {
                    Layout::Nchw => (self.in_ptr(0), self.in_ptr(2), self.out_ptr(0)),
                    Layout::Nhwc => {
                        let x = self.transpose_channels(d, self.in_ptr(0), None, (n, c, sp), true)?;
                        let dy = self.transpose_channels(d, self.in_ptr(2), None, (n, c, sp), true)?;
                        (x, dy, self.scratch(n * c * sp * d.size() as u64).ptr)
                    }
                };
                let dg = self.scratch(n * c * 4);
                let db = self.scratch(n * c * 4);
                let args = vec![
                    Arg::Ptr(x),
                    Arg::Ptr(self.in_ptr(1)),
                    Arg::Ptr(dy),
                    Arg::Ptr(dx),
                    Arg::Ptr(dg.ptr),
                    Arg::Ptr(db.ptr),
                    Arg::u64(n),
                    Arg::u64(c),
                    Arg::u64(sp),
                    Arg::u64(g),
                    Arg::f32(eps.get() as f32),
                ];
                let dims = LaunchDims::linear((n * g).clamp(1, MAX_GRID) as u32, BLOCK);
                self.launch(module::NORM, format!("groupnorm_bwd_{sfx}"), dims, args, true);
                if *layout == Layout::Nhwc {
                    self.transpose_channels(d, dx, Some(self.out_ptr(0)), (n, c, sp), false)?;
                }
                self.params_finish(sfx, dg.ptr, db.ptr, n, c);
            }
            Op::LayerNorm { eps } => {
                let d = self.one_float_dtype()?;
                let (rows, dim) = self.rows_last(0);
                let args = vec![
                    Arg::Ptr(self.in_ptr(0)),
                    Arg::Ptr(self.in_ptr(1)),
                    Arg::Ptr(self.in_ptr(2)),
                    Arg::Ptr(self.out_ptr(0)),
                    Arg::Ptr(DevPtr::NULL),
                    Arg::Ptr(DevPtr::NULL),
                    Arg::u64(rows),
                    Arg::u64(dim),
                    Arg::f32(eps.get() as f32),
                ];
                self.launch(
                    module::NORM,
                    format!("layernorm_{}", suffix("layernorm", d)?),
                    warp_rows(rows),
                    args,
                    true,
                );
            }
            Op::LayerNormBackward { eps } => {
                let d = self.one_float_dtype()?;
                let sfx = suffix("layernorm", d)?;
                let (rows, dim) = self.rows_last(0);
                const ROWS_PER_PART: u64 = 64;
                let parts = rows.div_ceil(ROWS_PER_PART).max(1);
                let stats = self.scratch(rows * 2 * 4);
                let dg = self.scratch(parts * dim * 4);
                let db = self.scratch(parts * dim * 4);
                let args = vec![
                    Arg::Ptr(self.in_ptr(0)),
                    Arg::Ptr(self.in_ptr(1)),
                    Arg::Ptr(self.in_ptr(2)),
                    Arg::Ptr(self.out_ptr(0)),
                    Arg::Ptr(stats.ptr),
                    Arg::u64(rows),
                    Arg::u64(dim),
                    Arg::f32(eps.get() as f32),
                ];
                self.launch(module::NORM, format!("layernorm_bwd_{sfx}"), warp_rows(rows), args, true);
                let args = vec![
                    Arg::Ptr(self.in_ptr(0)),
                    Arg::Ptr(self.in_ptr(2)),
                    Arg::Ptr(stats.ptr),
                    Arg::Ptr(dg.ptr),
                    Arg::Ptr(db.ptr),
                    Arg::u64(rows),
                    Arg::u64(dim),
                    Arg::u64(ROWS_PER_PART),
                ];
                let tiles = parts * dim.div_ceil(32);
                let dims =
                    LaunchDims { grid: [tiles.clamp(1, MAX_GRID) as u32, 1, 1], block: [32, 8, 1], shared_bytes: 0 };
                self.launch(module::NORM, format!("layernorm_bwd_params_{sfx}"), dims, args, true);
                self.params_finish(sfx, dg.ptr, db.ptr, parts, dim);
            }
            Op::Softmax => {
                let d = self.one_float_dtype()?;
                let (rows, dim) = self.rows_last(0);
                let args = vec![Arg::Ptr(self.in_ptr(0)), Arg::Ptr(self.out_ptr(0)), Arg::u64(rows), Arg::u64(dim)];
                self.launch(module::SOFTMAX, format!("softmax_{}", suffix("softmax", d)?), warp_rows(rows), args, true);
            }
            Op::SoftmaxBackward => {
                let d = self.one_float_dtype()?;
                let (rows, dim) = self.rows_last(0);
                let args = vec![
                    Arg::Ptr(self.in_ptr(0)),
                    Arg::Ptr(self.in_ptr(1)),
                    Arg::Ptr(self.out_ptr(0)),
                    Arg::u64(rows),
                    Arg::u64(dim),
                ];
                let name = format!("softmax_bwd_{}", suffix("softmax", d)?);
                self.launch(module::SOFTMAX, name, warp_rows(rows), args, true);
            }
            Op::Attention { scale, causal, lse } => {
                self.attention(Attn { scale: scale.get() as f32, causal: *causal, lse: *lse, backward: false })?
            }
            Op::AttentionBackward { scale, causal, lse } => {
                self.attention(Attn { scale: scale.get() as f32, causal: *causal, lse: *lse, backward: true })?
            }
            Op::Upsample2x | Op::Upsample2xBackward => {
                let d = self.one_float_dtype()?;
                // h, w of the small side: the input going up, the output going down.
                let small =
                    if matches!(op, Op::Upsample2x) { self.in_shape(0).clone() } else { self.out_shape(0).clone() };
                let r = small.rank();
                let (h, w) = (small.dims()[r - 2] as u64, small.dims()[r - 1] as u64);
                let planes = small.numel() as u64 / (h * w).max(1);
                let n = self.out_shape(0).numel() as u64;
                let name = if matches!(op, Op::Upsample2x) { "upsample2x" } else { "upsample2x_bwd" };
                let args = vec![
                    Arg::Ptr(self.in_ptr(0)),
                    Arg::Ptr(self.out_ptr(0)),
                    Arg::u64(planes),
                    Arg::u64(h),
                    Arg::u64(w),
                ];
                self.launch(module::UPSAMPLE, format!("{name}_{}", suffix(name, d)?), grid_stride(n), args, true);
            }
            Op::Concat { axis } => {
                let out = self.out_shape(0).clone();
                let es = self.out_dtype(0).size() as u64;
                let (outer, inner) = outer_inner(&out, *axis);
                let total = out.dims()[*axis] as u64;
                let mut at = 0u64;
                for i in 0..self.node.inputs.len() {
                    let len = self.in_shape(i).dims()[*axis] as u64;
                    self.out.cmds.push(Cmd::Copy2d(Copy2d {
                        dst: self.out_ptr(0).offset(at * inner * es),
                        dst_pitch: total * inner * es,
                        src: self.in_ptr(i),
                        src_pitch: len * inner * es,
                        width: len * inner * es,
                        height: outer,
                    }));
                    at += len;
                }
            }
            Op::Slice { axis, start, end } => {
                let x = self.in_shape(0).clone();
                let es = self.out_dtype(0).size() as u64;
                let (outer, inner) = outer_inner(&x, *axis);
                let (full, len) = (x.dims()[*axis] as u64, (end - start) as u64);
                self.out.cmds.push(Cmd::Copy2d(Copy2d {
                    dst: self.out_ptr(0),
                    dst_pitch: len * inner * es,
                    src: self.in_ptr(0).offset(*start as u64 * inner * es),
                    src_pitch: full * inner * es,
                    width: len * inner * es,
                    height: outer,
                }));
            }
            Op::SliceBackward { axis, start, full } => {
                let out = self.out_shape(0).clone();
                let es = self.out_dtype(0).size() as u64;
                let (outer, inner) = outer_inner(&out, *axis);
                let len = self.in_shape(0).dims()[*axis] as u64;
                let bytes = out.numel() as u64 * es;
                self.out.cmds.push(Cmd::Memset { dst: self.out_ptr(0), byte: 0, bytes });
                self.out.cmds.push(Cmd::Copy2d(Copy2d {
                    dst: self.out_ptr(0).offset(*start as u64 * inner * es),
                    dst_pitch: *full as u64 * inner * es,
                    src: self.in_ptr(0),
                    src_pitch: len * inner * es,
                    width: len * inner * es,
                    height: outer,
                }));
            }
            Op::Permute { perm } => {
                let x = self.in_shape(0).clone();
                let own = x.strides();
                let strides: Vec<i64> = perm.iter().map(|&p| own[p] as i64).collect();
                let out = self.out_shape(0).clone();
                self.copy_strided(&out, &strides)?;
            }
            Op::BroadcastTo { shape } => {
                let strides: Vec<i64> = self.in_shape(0).broadcast_strides(shape).iter().map(|&s| s as i64).collect();
                self.copy_strided(shape, &strides)?;
            }
            Op::Embedding => {
                let d = self.out_dtype(0);
                let table = self.in_shape(0).clone();
                let (vocab, dim) = (table.dims()[0] as u64, table.dims()[1] as u64);
                let n_ids = self.in_shape(1).numel() as u64;
                let name =
                    format!("embedding_{}_{}", suffix("embedding", d)?, int_suffix("embedding", self.in_dtype(1))?);
                let flag = self.constant(&0u32.to_le_bytes());
                self.out.error_flags.push(flag);
                self.out.cmds.push(Cmd::Memset { dst: flag, byte: 0, bytes: 4 });
                let args = vec![
                    Arg::Ptr(self.in_ptr(0)),
                    Arg::Ptr(self.in_ptr(1)),
                    Arg::Ptr(self.out_ptr(0)),
                    Arg::u64(n_ids),
                    Arg::u64(dim),
                    Arg::u64(vocab),
                    Arg::Ptr(flag),
                ];
                self.launch(module::LAYOUT, name, grid_stride(n_ids * dim), args, true);
            }
            Op::EmbeddingBackward { vocab } => {
                let d = self.out_dtype(0);
                let dim = self.out_shape(0).dims()[1] as u64;
                let n_ids = self.in_shape(0).numel() as u64;
                let name =
                    format!("embedding_bwd_{}_{}", suffix("embedding", d)?, int_suffix("embedding", self.in_dtype(0))?);
                let args = vec![
                    Arg::Ptr(self.in_ptr(0)),
                    Arg::Ptr(self.in_ptr(1)),
                    Arg::Ptr(self.out_ptr(0)),
                    Arg::u64(n_ids),
                    Arg::u64(dim),
                    Arg::u64(*vocab as u64),
                ];
                self.launch(module::LAYOUT, name, grid_stride(*vocab as u64 * dim), args, true);
            }
            Op::TimestepEmbedding { dim, max_period } => {
                let t = self.in_dtype(0);
                let sfx = if t == DType::F32 { "f32" } else { int_suffix("timestep_embedding", t)? };
                let batch = self.in_shape(0).numel() as u64;
                let args = vec![
                    Arg::Ptr(self.in_ptr(0)),
                    Arg::Ptr(self.out_ptr(0)),
                    Arg::u64(batch),
                    Arg::u64(*dim as u64),
                    Arg::f64(max_period.get()),
                ];
                let n = batch * *dim as u64;
                self.launch(module::LAYOUT, format!("timestep_embedding_{sfx}"), grid_stride(n), args, true);
            }
            Op::ReduceSum { axes, .. } => {
                let axes = axes.clone();
                self.sum_axes(&axes)?
            }
            Op::SumTo { shape } => {
                let x = self.in_shape(0).clone();
                let off = x.rank() - shape.rank();
                let axes: Vec<usize> =
                    (0..x.rank()).filter(|&a| a < off || (shape.dims()[a - off] == 1 && x.dims()[a] != 1)).collect();
                self.sum_axes(&axes)?
            }
            Op::MseLoss => {
                let d = self.one_float_dtype()?;
                let sfx = suffix("mse_loss", d)?;
                let n = self.in_shape(0).numel() as u64;
                let dims = grid_stride(n);
                let parts = dims.grid[0] as u64;
                let partial = self.scratch(parts * 4);
                let args = vec![Arg::Ptr(self.in_ptr(0)), Arg::Ptr(self.in_ptr(1)), Arg::Ptr(partial.ptr), Arg::u64(n)];
                // The number of partial sums is the grid: this launch must keep its real grid.
                self.launch(module::LOSS, format!("mse_partial_{sfx}"), dims, args, false);
                let args = vec![Arg::Ptr(partial.ptr), Arg::u64(parts), Arg::Ptr(self.out_ptr(0)), Arg::u64(n)];
                self.launch(module::LOSS, format!("mse_finish_{sfx}"), LaunchDims::linear(1, BLOCK), args, false);
            }
            Op::MseLossBackward => {
                let d = self.one_float_dtype()?;
                let n = self.in_shape(0).numel() as u64;
                let args = vec![
                    Arg::Ptr(self.in_ptr(0)),
                    Arg::Ptr(self.in_ptr(1)),
                    Arg::Ptr(self.in_ptr(2)),
                    Arg::Ptr(self.out_ptr(0)),
                    Arg::u64(n),
                ];
                self.launch(module::LOSS, format!("mse_bwd_{}", suffix("mse_loss", d)?), grid_stride(n), args, true);
            }
            Op::AdamW { beta1, beta2, eps, weight_decay } => {
                let hp = [beta1.get(), beta2.get(), eps.get(), weight_decay.get()];
                self.adamw(&[0], 4, hp)?
            }
            Op::MultiAdamW(k) => {
                let hp = [k.beta1.get(), k.beta2.get(), k.eps.get(), k.weight_decay.get()];
                let firsts: Vec<usize> = (0..k.tensors).map(|t| 4 * t).collect();
                self.adamw(&firsts, 4 * k.tensors, hp)?
            }
            Op::AccumulateGrad => {
                if self.in_dtype(0) != DType::F32 {
                    return Err(Error::Unsupported {
                        backend: "cuda",
                        msg: format!("gradient accumulators must be f32, not {}", self.in_dtype(0)),
                    });
                }
                let n = self.in_shape(0).numel() as u64;
                let args =
                    vec![Arg::Ptr(self.in_ptr(0)), Arg::Ptr(self.in_ptr(1)), Arg::Ptr(self.in_ptr(2)), Arg::u64(n)];
                self.launch(module::ADAMW, "accumulate_grad_f32".into(), grid_stride(n), args, true);
            }
            Op::AllReduce { .. } => self.all_reduce()?,
            Op::Fused(k) => self.fused(k)?,
        }
        Ok(())
    }

    /// A bucket of gradient accumulators summed over the ranks: one accumulator in place; several copied one after
    /// another into the staging buffer ([`comm_staging_bytes`]; so the bucket is one transfer: one NCCL call),
    /// reduced there and copied back. The executor issues all of these on the communication stream.
    fn all_reduce(&mut self) -> Result<()> {
        let dtype = self.in_dtype(0);
        if dtype != DType::F32 {
            return Err(Error::Unsupported {
                backend: "cuda",
                msg: format!("gradient accumulators must be f32, not {dtype}"),
            });
        }
        let n = self.node.inputs.len();
        let numel = |e: &Self, i: usize| e.in_shape(i).numel() as u64;
        if n == 1 {
            let cmd = Cmd::AllReduce { buf: self.in_ptr(0), count: numel(self, 0), dtype };
            self.out.cmds.push(cmd);
            return Ok(());
        }
        let count: u64 = (0..n).map(|i| numel(self, i)).sum();
        let size = dtype.size() as u64;
        let bucket = self.ctx.comm_staging;
        if bucket.ptr != DevPtr::NULL && bucket.bytes < count * size {
            return Err(Error::msg(format!(
                "all-reduce of {} bytes: the staging buffer holds {} bytes",
                count * size,
                bucket.bytes
            )));
        }
        let mut at = 0;
        for i in 0..n {
            let bytes = numel(self, i) * size;
            self.copy(bucket.ptr.offset(at), self.in_ptr(i), bytes);
            at += bytes;
        }
        self.out.cmds.push(Cmd::AllReduce { buf: bucket.ptr, count, dtype });
        let mut at = 0;
        for i in 0..n {
            let bytes = numel(self, i) * size;
            self.copy(self.in_ptr(i), bucket.ptr.offset(at), bytes);
            at += bytes;
        }
        Ok(())
    }

    /// (N, C, S) of input i viewed as [N, C, spatial...].
    /// (batch, channels, the rest) of input i, its channels where `layout` keeps them.
    fn ncs_of(&self, i: usize, layout: Layout) -> Result<(u64, u64, u64)> {
        let x = self.in_shape(i);
        if x.rank() < 2 {
            return Err(Error::shape(self.name(), format!("{x} needs rank >= 2")));
        }
        let (n, c) = (x.dims()[0] as u64, x.dims()[layout.channel_axis(x.rank())] as u64);
        Ok((n, c, x.numel() as u64 / (n * c).max(1)))
    }

    /// (rows, last axis) of input i.
    fn rows_last(&self, i: usize) -> (u64, u64) {
        let x = self.in_shape(i);
        let d = *x.dims().last().unwrap_or(&1) as u64;
        (x.numel() as u64 / d.max(1), d)
    }

    fn params_finish(&mut self, sfx: &str, dg: DevPtr, db: DevPtr, parts: u64, c: u64) {
        let args = vec![
            Arg::Ptr(dg),
            Arg::Ptr(db),
            Arg::Ptr(self.out_ptr(1)),
            Arg::Ptr(self.out_ptr(2)),
            Arg::u64(parts),
            Arg::u64(c),
        ];
        self.launch(module::NORM, format!("norm_params_finish_{sfx}"), grid_stride(c), args, true);
    }

    fn copy_strided(&mut self, out: &Shape, in_strides: &[i64]) -> Result<()> {
        let d = self.one_float_dtype()?;
        self.copy_strided_between(d, (self.in_ptr(0), in_strides), (self.out_ptr(0), out))
    }

    /// Writes `dst` (packed, shaped `out`) from `src` read with `in_strides` (one per axis of `out`), dtype `d`.
    fn copy_strided_between(
        &mut self,
        d: DType,
        (src, in_strides): (DevPtr, &[i64]),
        (dst, out): (DevPtr, &Shape),
    ) -> Result<()> {
        let n = out.numel() as u64;
        let args = vec![Arg::Ptr(src), Arg::Ptr(dst), Arg::u64(n), Arg::pod(&StridedDims::new(out, in_strides)?)];
        self.launch(module::LAYOUT, format!("copy_strided_{}", suffix("copy", d)?), grid_stride(n), args, true);
        Ok(())
    }

    /// Copies channels-last `src` ([n, s, c]) into a planar scratch tensor ([n, c, s]), or with `to_planar` false,
    /// planar `src` into channels-last `dst`: how the GroupNorm kernels (which walk planar tensors) serve
    /// `Layout::Nhwc` nodes. Returns the destination.
    fn transpose_channels(
        &mut self,
        d: DType,
        src: DevPtr,
        dst: Option<DevPtr>,
        (n, c, s): (u64, u64, u64),
        to_planar: bool,
    ) -> Result<DevPtr> {
        let dst = match dst {
            Some(p) => p,
            None => self.scratch(n * c * s * d.size() as u64).ptr,
        };
        let (n, c, s) = (n as usize, c as usize, s as usize);
        let (out, strides) = if to_planar {
            (Shape(vec![n, c, s]), [(s * c) as i64, 1, c as i64])
        } else {
            (Shape(vec![n, s, c]), [(c * s) as i64, 1, s as i64])
        };
        self.copy_strided_between(d, (src, &strides), (dst, &out))?;
        Ok(dst)
    }

    /// The row-major matmul as one strided-batched column-major GEMM: C^T = op(B)^T op(A)^T.
    fn matmul(&mut self, ta: bool, tb: bool) -> Result<()> {
        let d = self.one_float_dtype()?;
        let (a, b, out) = (self.in_shape(0).clone(), self.in_shape(1).clone(), self.out_shape(0).clone());
        self.matmul_into(ta, tb, d, (&a, self.in_ptr(0)), (&b, self.in_ptr(1)), (&out, self.out_ptr(0)));
        Ok(())
    }

    /// [`Emit::matmul`] of the given operands, all of dtype `d`, into `out`.
    fn matmul_into(
        &mut self,
        ta: bool,
        tb: bool,
        d: DType,
        (a, a_ptr): (&Shape, DevPtr),
        (b, b_ptr): (&Shape, DevPtr),
        (out, out_ptr): (&Shape, DevPtr),
    ) {
        let (ra, rb, ro) = (a.rank(), b.rank(), out.rank());
        let (a0, a1) = (a.dims()[ra - 2] as u64, a.dims()[ra - 1] as u64);
        let (b0, b1) = (b.dims()[rb - 2] as u64, b.dims()[rb - 1] as u64);
        let (m, n) = (out.dims()[ro - 2] as u64, out.dims()[ro - 1] as u64);
        let k = if ta { a0 } else { a1 };
        let mut batch = out.numel() as u64 / (m * n).max(1);
        let mut n_c = m;
        let (mut stride_a, stride_c) = (if ra == 2 { 0 } else { a0 * a1 }, m * n);
        // A shared right operand and a plain left one: the batch folds into one tall product.
        if rb == 2 && !ta && batch > 1 {
            n_c = batch * m;
            batch = 1;
            stride_a = 0;
        }
        let op = |t: bool| if t { Transpose::T } else { Transpose::N };
        self.out.cmds.push(Cmd::Gemm(Gemm {
            transa: op(tb),
            transb: op(ta),
            m: n,
            n: n_c,
            k,
            alpha: 1.0,
            beta: 0.0,
            a: MatrixRef { ptr: b_ptr, dtype: d, ld: b1, stride: if rb == 2 { 0 } else { b0 * b1 } },
            b: MatrixRef { ptr: a_ptr, dtype: d, ld: a1, stride: stride_a },
            c: MatrixRef { ptr: out_ptr, dtype: d, ld: n, stride: stride_c },
            batch,
            compute: GemmCompute::F32,
            workspace: self.ctx.library_workspace,
        }));
    }

    fn conv(&mut self, conv: ConvOp) -> Result<()> {
        let d = self.one_float_dtype()?;
        let bias = (conv.direction == ConvDirection::Forward && self.node.inputs.len() == 3).then(|| self.in_ptr(2));
        // (operand 0, w, result): (x, w, y) forward, (dy, w, dx) backward-data, (x, dy, dw) backward-filter.
        let (a, w, r) = (self.in_shape(0).clone(), self.in_shape(1).clone(), self.out_shape(0).clone());
        let operands = [(&a, self.in_ptr(0)), (&w, self.in_ptr(1)), (&r, self.out_ptr(0))];
        self.conv_into(conv, d, operands, bias)
    }

    /// A convolution of dtype `d` on (operand 0, operand 1, result) as [`Emit::conv`] reads them from the node, and
    /// for the forward with `bias`, the bias added in place.
    fn conv_into(
        &mut self,
        ConvOp { direction, stride, padding, layout }: ConvOp,
        d: DType,
        [(in0, in0_ptr), (in1, in1_ptr), (res, res_ptr)]: [(&Shape, DevPtr); 3],
        bias: Option<DevPtr>,
    ) -> Result<()> {
        // cuDNN takes the dims in NCHW (KCRS) order and the memory format separately.
        let t4 = |s: &Shape, ptr: DevPtr| -> Result<Tensor4> {
            if s.rank() != 4 {
                return Err(Error::shape("conv2d", format!("{s} is not 4-d")));
            }
            let dims = layout.nchw_dims(s.dims()).map(|v| v as u64);
            let layout = match layout {
                Layout::Nchw => Layout4::Nchw,
                Layout::Nhwc => Layout4::Nhwc,
            };
            Ok(Tensor4 { dims, layout, dtype: d, ptr })
        };
        let (x, w, y) = match direction {
            ConvDirection::Forward => (t4(in0, in0_ptr)?, t4(in1, in1_ptr)?, t4(res, res_ptr)?),
            // (dy, w) -> dx
            ConvDirection::BackwardData => (t4(res, res_ptr)?, t4(in1, in1_ptr)?, t4(in0, in0_ptr)?),
            // (x, dy) -> dw
            ConvDirection::BackwardFilter => (t4(in0, in0_ptr)?, t4(res, res_ptr)?, t4(in1, in1_ptr)?),
        };
        let w = Filter4 { dims: w.dims, layout: w.layout, dtype: w.dtype, ptr: w.ptr };
        let math = if d == DType::F32 { ConvMath::Fma } else { ConvMath::TensorOp };
        let (s, p) = (stride as u64, padding as u64);
        self.out.cmds.push(Cmd::Conv(Conv {
            direction,
            x,
            w,
            y,
            padding: [p, p],
            stride: [s, s],
            alpha: 1.0,
            beta: 0.0,
            math,
            algo: 0,
            workspace: self.ctx.library_workspace,
        }));
        if let Some(bias) = bias {
            // The bias, added in place: y[n, o, :] += bias[o] (y[n, :, o] channels last).
            let [n, o, h, wd] = y.dims.map(|v| v as usize);
            let (out, bias_shape) = match layout {
                Layout::Nchw => (Shape(vec![n, o, h * wd]), Shape(vec![o, 1])),
                Layout::Nhwc => (Shape(vec![n, h * wd, o]), Shape(vec![o])),
            };
            let args = vec![
                Arg::Ptr(y.ptr),
                Arg::Ptr(bias),
                Arg::Ptr(y.ptr),
                Arg::u64(out.numel() as u64),
                Arg::pod(&BroadcastDims::new(&out, &out, &bias_shape)?),
            ];
            let count = out.numel() as u64;
            self.launch(
                module::BINARY,
                format!("binary_add_bcast_{}", suffix("conv2d", d)?),
                grid_stride(count),
                args,
                true,
            );
        }
        Ok(())
    }

    /// Attention on the flash kernels when they are on and fit the node ([`flash`]); otherwise as batched GEMMs
    /// around softmax kernels, over chunks of (batch, head) pairs so the score scratch stays within the budget.
    /// The composite forward writes the log-sum-exp when the node has it (from its softmax kernel); its backward
    /// rebuilds the probabilities from the scores either way, so it reads only q, k, v and dout.
    fn attention(&mut self, a: Attn) -> Result<()> {
        if self.flash_attention(a)? {
            return Ok(());
        }
        let Attn { scale, causal, lse, backward } = a;
        let d = self.attention_dtype(a)?;
        let dout_input = if lse { 5 } else { 3 };
        let sfx = suffix("attention", d)?;
        let es = d.size() as u64;
        let (q, k, v) = (self.in_shape(0).clone(), self.in_shape(1).clone(), self.in_shape(2).clone());
        let bh = (q.dims()[0] * q.dims()[1]) as u64;
        let (lq, hd) = (q.dims()[2] as u64, q.dims()[3] as u64);
        let (lk, dv) = (k.dims()[2] as u64, v.dims()[3] as u64);
        let per_head = lq * lk * (if backward { 2 * (4 + es) } else { 4 + es });
        let chunk = (self.ctx.attention_budget / per_head.max(1)).clamp(1, bh);
        let s = self.scratch(chunk * lq * lk * 4);
        let p = self.scratch(chunk * lq * lk * es);
        let (dp, ds) = if backward {
            (self.scratch(chunk * lq * lk * 4), self.scratch(chunk * lq * lk * es))
        } else {
            (Span::new(DevPtr::NULL, 0), Span::new(DevPtr::NULL, 0))
        };
        let mat = |ptr: DevPtr, dtype: DType, ld: u64, stride: u64| MatrixRef { ptr, dtype, ld, stride };
        let workspace = self.ctx.library_workspace;
        let mut h0 = 0;
        while h0 < bh {
            let cnt = chunk.min(bh - h0);
            let qp = self.in_ptr(0).offset(h0 * lq * hd * es);
            let kp = self.in_ptr(1).offset(h0 * lk * hd * es);
            let vp = self.in_ptr(2).offset(h0 * lk * dv * es);
            let gemm = |transa, transb, m, n, k, alpha, a, b, c| {
                Cmd::Gemm(Gemm {
                    transa,
                    transb,
                    m,
                    n,
                    k,
                    alpha,
                    beta: 0.0,
                    a,
                    b,
                    c,
                    batch: cnt,
                    compute: GemmCompute::F32,
                    workspace,
                })
            };
            use Transpose::{N, T};
            // S = scale Q K^T (f32), as S^T = K Q^T column-major: [lk x lq].
            self.out.cmds.push(gemm(
                T,
                N,
                lk,
                lq,
                hd,
                scale,
                mat(kp, d, hd, lk * hd),
                mat(qp, d, hd, lq * hd),
                mat(s.ptr, DType::F32, lk, lq * lk),
            ));
            let rows = cnt * lq;
            let lse_ptr = if lse && !backward { self.out_ptr(1).offset(h0 * lq * 4) } else { DevPtr::NULL };
            let args = vec![
                Arg::Ptr(s.ptr),
                Arg::Ptr(p.ptr),
                Arg::Ptr(lse_ptr),
                Arg::u64(rows),
                Arg::u64(lq),
                Arg::u64(lk),
                Arg::i32(causal as i32),
            ];
            self.launch(module::ATTENTION, format!("attn_softmax_fwd_{sfx}"), warp_rows(rows), args, true);
            if !backward {
                // O = P V, as O^T = V^T P^T: [dv x lq].
                let op = self.out_ptr(0).offset(h0 * lq * dv * es);
                self.out.cmds.push(gemm(
                    N,
                    N,
                    dv,
                    lq,
                    lk,
                    1.0,
                    mat(vp, d, dv, lk * dv),
                    mat(p.ptr, d, lk, lq * lk),
                    mat(op, d, dv, lq * dv),
                ));
            } else {
                let dop = self.in_ptr(dout_input).offset(h0 * lq * dv * es);
                let (dqp, dkp, dvp) = (
                    self.out_ptr(0).offset(h0 * lq * hd * es),
                    self.out_ptr(1).offset(h0 * lk * hd * es),
                    self.out_ptr(2).offset(h0 * lk * dv * es),
                );
                // dV = P^T dO: [dv x lk] column-major.
                self.out.cmds.push(gemm(
                    N,
                    T,
                    dv,
                    lk,
                    lq,
                    1.0,
                    mat(dop, d, dv, lq * dv),
                    mat(p.ptr, d, lk, lq * lk),
                    mat(dvp, d, dv, lk * dv),
                ));
                // dP = dO V^T (f32): [lk x lq] column-major.
                self.out.cmds.push(gemm(
                    T,
                    N,
                    lk,
                    lq,
                    dv,
                    1.0,
                    mat(vp, d, dv, lk * dv),
                    mat(dop, d, dv, lq * dv),
                    mat(dp.ptr, DType::F32, lk, lq * lk),
                ));
                let args = vec![Arg::Ptr(p.ptr), Arg::Ptr(dp.ptr), Arg::Ptr(ds.ptr), Arg::u64(rows), Arg::u64(lk)];
                self.launch(module::ATTENTION, format!("attn_softmax_bwd_{sfx}"), warp_rows(rows), args, true);
                // dQ = scale dS K: [hd x lq] column-major.
                self.out.cmds.push(gemm(
                    N,
                    N,
                    hd,
                    lq,
                    lk,
                    scale,
                    mat(kp, d, hd, lk * hd),
                    mat(ds.ptr, d, lk, lq * lk),
                    mat(dqp, d, hd, lq * hd),
                ));
                // dK = scale dS^T Q: [hd x lk] column-major.
                self.out.cmds.push(gemm(
                    N,
                    T,
                    hd,
                    lk,
                    lq,
                    scale,
                    mat(qp, d, hd, lq * hd),
                    mat(ds.ptr, d, lk, lq * lk),
                    mat(dkp, d, hd, lk * hd),
                ));
            }
            h0 += cnt;
        }
        Ok(())
    }

    /// Sums input 0 over `axes` into output 0 (laid out as the input with those axes removed). Adjacent axes
    /// merge; each run of summed axes is one [outer, reduced, inner] reduction, innermost first, through f32
    /// intermediates so half-precision results are rounded once.
    fn sum_axes(&mut self, axes: &[usize]) -> Result<()> {
        let d = self.one_float_dtype()?;
        let sfx = suffix("sum", d)?;
        let x = self.in_shape(0).clone();
        // Merge into runs: (size, summed).
        let mut runs: Vec<(u64, bool)> = Vec::new();
        for (a, &n) in x.dims().iter().enumerate() {
            let summed = axes.contains(&a) && n != 1;
            if n == 1 {
                continue;
            }
            match runs.last_mut() {
                Some((size, s)) if *s == summed => *size *= n as u64,
                _ => runs.push((n as u64, summed)),
            }
        }
        let steps: Vec<usize> = (0..runs.len()).rev().filter(|&i| runs[i].1).collect();
        let bytes = x.numel() as u64 * d.size() as u64;
        if steps.is_empty() {
            self.copy(self.out_ptr(0), self.in_ptr(0), bytes);
            return Ok(());
        }
        // Intermediates: the input with the runs summed so far removed, in f32 (or T when T is f32).
        let mut src = self.in_ptr(0);
        let mut src_f32 = d == DType::F32;
        for (k, &i) in steps.iter().enumerate() {
            let outer: u64 = runs[..i].iter().map(|r| r.0).product();
            let reduced = runs[i].0;
            let inner: u64 = runs[i + 1..].iter().map(|r| r.0).product();
            runs[i].0 = 1;
            let last = k + 1 == steps.len();
            let dst_f32 = !last || d == DType::F32;
            let dst = if last { self.out_ptr(0) } else { self.scratch(outer * inner * 4).ptr };
            let io = match (src_f32, dst_f32) {
                (true, true) => "f32".to_string(),
                (false, false) => sfx.to_string(),
                (false, true) => format!("{sfx}_to_f32"),
                (true, false) => format!("f32_to_{sfx}"),
            };
            if inner == 1 {
                let args = vec![Arg::Ptr(src), Arg::Ptr(dst), Arg::u64(outer), Arg::u64(reduced)];
                let dims = LaunchDims::linear(outer.clamp(1, MAX_GRID) as u32, BLOCK);
                self.launch(module::REDUCE, format!("sum_rows_{io}"), dims, args, true);
            } else {
                let args = vec![Arg::Ptr(src), Arg::Ptr(dst), Arg::u64(outer), Arg::u64(reduced), Arg::u64(inner)];
                let tiles = outer * inner.div_ceil(32);
                let dims =
                    LaunchDims { grid: [tiles.clamp(1, MAX_GRID) as u32, 1, 1], block: [32, 8, 1], shared_bytes: 0 };
                self.launch(module::REDUCE, format!("sum_axis_{io}"), dims, args, true);
            }
            src = dst;
            src_f32 = dst_f32;
        }
        Ok(())
    }

    /// One AdamW launch per gradient dtype over the (param, grad, m, v) groups starting at `firsts`.
    fn adamw(&mut self, firsts: &[usize], hyper_input: usize, hp: [f64; 4]) -> Result<()> {
        const CHUNK: u64 = 65536;
        if self.in_dtype(hyper_input) != DType::F32 {
            return Err(Error::Unsupported { backend: "cuda", msg: "AdamW hyper-parameters must be f32".into() });
        }
        let mut by_dtype: Vec<(DType, Vec<usize>)> = Vec::new();
        for &f in firsts {
            for j in [0, 2, 3] {
                if self.in_dtype(f + j) != DType::F32 {
                    return Err(Error::Unsupported {
                        backend: "cuda",
                        msg: "AdamW parameters and moments must be f32 (master weights)".into(),
                    });
                }
            }
            let gd = self.in_dtype(f + 1);
            match by_dtype.iter_mut().find(|(d, _)| *d == gd) {
                Some((_, list)) => list.push(f),
                None => by_dtype.push((gd, vec![f])),
            }
        }
        for (gd, list) in by_dtype {
            let mut tensors = Vec::new();
            let mut chunks = Vec::new();
            for (t, &f) in list.iter().enumerate() {
                let numel = self.in_shape(f).numel() as u64;
                tensors.push(AdamWTensor {
                    param: self.in_ptr(f).0,
                    grad: self.in_ptr(f + 1).0,
                    m: self.in_ptr(f + 2).0,
                    v: self.in_ptr(f + 3).0,
                    numel,
                });
                for c in 0..numel.div_ceil(CHUNK) {
                    chunks.push(AdamWChunk { tensor: t as u32, chunk: u32_of("AdamW chunk", c)? });
                }
            }
            let tp = self.constant(bytemuck::cast_slice(&tensors));
            let cp = self.constant(bytemuck::cast_slice(&chunks));
            let n = chunks.len() as u64;
            let args = vec![
                Arg::Ptr(tp),
                Arg::Ptr(cp),
                Arg::u64(n),
                Arg::u64(CHUNK),
                Arg::Ptr(self.in_ptr(hyper_input)),
                Arg::f32(hp[0] as f32),
                Arg::f32(hp[1] as f32),
                Arg::f32(hp[2] as f32),
                Arg::f32(hp[3] as f32),
            ];
            let dims = LaunchDims::linear(n.clamp(1, MAX_GRID) as u32, BLOCK);
            self.launch(module::ADAMW, format!("adamw_grad_{}", suffix("adamw", gd)?), dims, args, true);
        }
        Ok(())
    }

    fn fused(&mut self, k: &crate::graph::fusion::FusedKernel) -> Result<()> {
        if k.anchor.is_product() {
            return self.fused_product(k);
        }
        let dts: Vec<DType> = self.node.inputs.iter().map(|&v| self.g().dtype(v)).collect();
        let gen = codegen::generate(k, &dts)?;
        let n = k.shape.numel() as u64;
        let mut args: Vec<Arg> = (0..self.node.inputs.len()).map(|i| Arg::Ptr(self.in_ptr(i))).collect();
        args.extend((0..self.node.outputs.len()).map(|o| Arg::Ptr(self.out_ptr(o))));
        args.push(Arg::u64(n));
        for (i, kind) in gen.inputs.iter().enumerate() {
            if *kind == codegen::InputKind::Broadcast {
                args.push(Arg::pod(&ZcBcast::new(&k.shape, &k.input_shapes[i])?));
            }
        }
        let module = self.ctx.fused_module.to_string();
        match &k.anchor {
            Anchor::None => self.launch(&module, gen.function, grid_stride(n), args, true),
            anchor => {
                let dims = k.shape.dims();
                let (unit, inner, period, eps) = match anchor {
                    Anchor::GroupNorm { groups, eps } => {
                        let (nn, c) = (dims[0] as u64, dims[1] as u64);
                        let s = n / (nn * c).max(1);
                        (c / *groups as u64 * s, s, c, eps.get())
                    }
                    Anchor::LayerNorm { eps } => {
                        let dd = *dims.last().unwrap_or(&1) as u64;
                        (dd, 1, dd, eps.get())
                    }
                    Anchor::None
                    | Anchor::Conv2d { .. }
                    | Anchor::Conv2dBackwardInput { .. }
                    | Anchor::MatMul { .. } => {
                        unreachable!("normalisation anchors only: pointwise and product groups return above")
                    }
                };
                args.extend([Arg::u64(unit), Arg::u64(inner), Arg::u64(period), Arg::f32(eps as f32)]);
                // One block per normalisation unit, exactly: these kernels are not grid-stride.
                let grid = u32_of("fused kernel grid", n / unit.max(1))?;
                self.launch(&module, gen.function, LaunchDims::linear(grid.max(1), BLOCK), args, false);
            }
        }
        Ok(())
    }
}

/// A launch that records `node` in `flag` (atomicMin) when any of the `n` elements at `ptr` is NaN or Inf.
pub fn check_finite(ptr: DevPtr, dtype: DType, n: u64, node: usize, flag: DevPtr) -> Result<Cmd> {
    let args = vec![Arg::Ptr(ptr), Arg::u64(n), Arg::u32(u32_of("node index", node as u64)?), Arg::Ptr(flag)];
    let kernel =
        KernelRef { module: module::CHECK.to_string(), name: format!("check_finite_{}", suffix("check", dtype)?) };
    Ok(Cmd::Launch(Launch { kernel, dims: grid_stride(n), args, any_grid: true }))
}

/// (product of the axes before `axis`, product of the axes after it).
fn outer_inner(s: &Shape, axis: usize) -> (u64, u64) {
    let d = s.dims();
    (d[..axis].iter().product::<usize>() as u64, d[axis + 1..].iter().product::<usize>() as u64)
}

/// Lowers node `i`: commands, constants and the scratch and constant bytes used.
pub fn lower_node(ctx: &Ctx, i: usize) -> Result<Lowered> {
    let node = &ctx.graph.nodes[i];
    for &v in node.inputs.iter().chain(&node.outputs) {
        if ctx.graph.dtype(v) == DType::F64 {
            return Err(Error::Unsupported {
                backend: "cuda",
                msg: format!(
                    "node {i} ({} {}) computes in f64, which only the CPU backend runs; build the graph in f32",
                    node.op.name(),
                    node.op.attrs()
                ),
            });
        }
    }
    let mut e = Emit { ctx, node, out: Lowered::default() };
    e.lower().map_err(|err| match err {
        Error::Unsupported { backend, msg } => {
            Error::Unsupported { backend, msg: format!("node {i} ({}): {msg}", node.op.name()) }
        }
        other => other,
    })?;
    Ok(e.out)
}
