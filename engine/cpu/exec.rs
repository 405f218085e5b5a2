//! The CPU backend: runs a planned graph out of one arena, with no allocation of tensor memory
//! per step. Every node computes in f32 (f64 when the graph uses f64); half-precision values are
//! staged through f32 scratch that the memory planner reserves for the node.

use super::aligned::AlignedVec;
use super::conv::{self, Conv2dShape, ConvMethod, ConvThreads};
use super::conv_nhwc;
use super::elementwise as ew;
use super::float::Float;
use super::layout::{self, Ids};
use super::linalg::{self, AttnGeom};
use super::norm;
use crate::engine::backend::{check_communicator, check_node_range, check_upload, Backend, Program};
use crate::engine::dist::{Communicator, ReduceBuf};
use crate::engine::tensor::HostTensor;
use crate::error::{Error, Result};
use crate::graph::op::Layout;
use crate::graph::passes::{plan_memory, Location, MemoryPlan};
use crate::graph::{DType, Graph, Node, Op, Shape, ValueId};
use half::{bf16, f16};
use smallvec::SmallVec;
use std::sync::Arc;

pub struct CpuBackend {
    threads: usize,
}

impl CpuBackend {
    pub fn new(threads: usize) -> Self {
        CpuBackend { threads: threads.max(1) }
    }
    /// One thread per core.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }
}

impl CpuBackend {
    /// The memory plan `compile` would make for `graph`, without allocating it.
    pub fn plan(&self, graph: &Graph) -> Result<MemoryPlan> {
        let execs: Vec<NodeExec> = graph.nodes.iter().map(|n| node_exec(graph, n, self.threads)).collect();
        plan_memory(graph, &|i| {
            let e = &execs[i];
            (e.kernel_scratch + e.kernel_scratch_len) * e.compute.size()
        })
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new(Self::default_threads())
    }
}

/// How a node is run: its compute type and where its staged (half → f32) copies live.
#[derive(Clone, Debug)]
struct NodeExec {
    compute: DType,
    /// Where the kernel's own scratch starts (elements of the compute type): before it, the
    /// f32 copies of half-precision inputs then outputs, in order.
    kernel_scratch: usize,
    kernel_scratch_len: usize,
}

pub struct CpuProgram {
    graph: Graph,
    plan: MemoryPlan,
    execs: Vec<NodeExec>,
    threads: usize,
    pool: rayon::ThreadPool,
    // The buffers are owned here and only ever accessed through the raw pointers below, which
    // were taken from `as_mut_ptr` once; nothing else borrows them.
    _arena: AlignedVec<u64>,
    arena_ptr: *mut u8,
    _sources: Vec<AlignedVec<u64>>,
    source_ptr: Vec<*mut u8>,
    profile: Option<crate::engine::profile::Profile>,
    /// Check every kernel's outputs for NaN/Inf (ZEROCONV_CHECK_FINITE=1): the first kernel that
    /// produces one stops the step with its name.
    check_finite: bool,
    /// What the all-reduce nodes sum over (data parallelism; see `Program::set_communicator`).
    communicator: Option<Arc<dyn Communicator>>,
}

// SAFETY: the program exclusively owns every buffer its raw pointers point into; moving it to
// another thread moves that ownership, and all access goes through `&mut self` methods.
unsafe impl Send for CpuProgram {}
// SAFETY: a shared `&CpuProgram` is only used inside `launch` (which holds `&mut self`), where
// nodes run one after another and each node's parallel kernel writes disjoint planned bytes.
unsafe impl Sync for CpuProgram {}

fn float_compute(g: &Graph, node: &Node) -> DType {
    let any_f64 = node.inputs.iter().chain(&node.outputs).any(|&v| g.dtype(v) == DType::F64);
    if any_f64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Ops with their own handling of dtypes (no staging).
fn is_special(op: &Op) -> bool {
    matches!(
        op,
        Op::Reshape { .. }
            | Op::Cast { .. }
            | Op::TimestepEmbedding { .. }
            | Op::AdamW { .. }
            | Op::MultiAdamW(_)
            | Op::AccumulateGrad
            | Op::AllReduce { .. }
    )
}

/// The sizes of a convolution on x and w of `layout` (the same sizes whichever the layout).
fn conv_geom(x: &Shape, w: &Shape, stride: usize, padding: usize, layout: Layout) -> Conv2dShape {
    let ([n, c, h, wd], [o, _, kh, kw]) = (layout.nchw_dims(x.dims()), layout.nchw_dims(w.dims()));
    Conv2dShape { n, c, h, w: wd, o, kh, kw, stride, padding }
}

/// GroupNorm's sizes for x of `layout`: [n, c, s] planar, [n, s, c] channels last.
fn group_norm_geom(x: &Shape, groups: usize, eps: f64, layout: Layout) -> norm::GroupNormGeom {
    let d = x.dims();
    let (n, c) = (d[0], d[layout.channel_axis(d.len())]);
    norm::GroupNormGeom { n, c, s: x.numel() / (n * c).max(1), groups, eps }
}

fn conv_threads(threads: usize) -> ConvThreads {
    ConvThreads { threads, method: ConvMethod::Auto }
}

/// Scratch elements (of the compute type) the kernel itself needs.
fn kernel_scratch_len(g: &Graph, node: &Node, threads: usize) -> usize {
    let s = |i: usize| g.shape(node.inputs[i]);
    let o = |i: usize| g.shape(node.outputs[i]);
    match &node.op {
        Op::Conv2d { stride, padding, layout: Layout::Nchw } => {
            let geom = conv_geom(s(0), s(1), *stride, *padding, Layout::Nchw);
            conv::conv2d_forward_scratch_len(&geom, conv_threads(threads))
        }
        Op::Conv2dBackwardInput { stride, padding, layout: Layout::Nchw, .. } => {
            let geom = conv_geom(o(0), s(1), *stride, *padding, Layout::Nchw);
            conv::conv2d_backward_input_scratch_len(&geom, conv_threads(threads))
        }
        Op::Conv2dBackwardWeight { stride, padding, layout: Layout::Nchw, .. } => {
            let geom = conv_geom(s(0), o(0), *stride, *padding, Layout::Nchw);
            conv::conv2d_backward_weight_scratch_len(&geom, conv_threads(threads))
        }
        Op::Conv2d { stride, padding, layout: Layout::Nhwc } => {
            conv_nhwc::scratch_len(&conv_geom(s(0), s(1), *stride, *padding, Layout::Nhwc))
        }
        Op::Conv2dBackwardInput { stride, padding, layout: Layout::Nhwc, .. } => {
            conv_nhwc::scratch_len(&conv_geom(o(0), s(1), *stride, *padding, Layout::Nhwc))
        }
        Op::Conv2dBackwardWeight { stride, padding, layout: Layout::Nhwc, .. } => {
            conv_nhwc::scratch_len(&conv_geom(s(0), o(0), *stride, *padding, Layout::Nhwc))
        }
        Op::GroupNormBackward { groups, eps, layout } => {
            let g = group_norm_geom(s(0), *groups, eps.get(), *layout);
            g.n * g.c * 2
        }
        Op::LayerNormBackward { .. } => {
            let d = *s(0).dims().last().unwrap_or(&1);
            norm::layer_norm_blocks(s(0).numel() / d.max(1)) * 2 * d
        }
        Op::Attention { scale, causal, .. } | Op::AttentionBackward { scale, causal, .. } => {
            let geom = AttnGeom::from_shapes(s(0), s(1), s(2), scale.get(), *causal);
            linalg::attention_scratch_len(&geom, threads)
        }
        Op::Fused(k) if k.anchor.is_product() => super::epilogue::scratch_len(k, threads),
        Op::Fused(k) => super::fused::scratch_len(k, threads),
        // A bucket of several accumulators is packed into one buffer, so it crosses to the other ranks in one
        // transfer; a single one is reduced where it is.
        Op::AllReduce { tensors, .. } if *tensors > 1 => node.inputs.iter().map(|&v| g.shape(v).numel()).sum(),
        Op::Fill { .. }
        | Op::Unary(_)
        | Op::UnaryBackward(_)
        | Op::Binary(_)
        | Op::Affine { .. }
        | Op::Cast { .. }
        | Op::MatMul { .. }
        | Op::GroupNorm { .. }
        | Op::LayerNorm { .. }
        | Op::Softmax
        | Op::SoftmaxBackward
        | Op::Upsample2x
        | Op::Upsample2xBackward
        | Op::Concat { .. }
        | Op::Slice { .. }
        | Op::SliceBackward { .. }
        | Op::Reshape { .. }
        | Op::Permute { .. }
        | Op::Embedding
        | Op::EmbeddingBackward { .. }
        | Op::TimestepEmbedding { .. }
        | Op::ReduceSum { .. }
        | Op::SumTo { .. }
        | Op::BroadcastTo { .. }
        | Op::MseLoss
        | Op::MseLossBackward
        | Op::AdamW { .. }
        | Op::MultiAdamW(_)
        | Op::AccumulateGrad
        | Op::AllReduce { .. } => 0,
    }
}

fn node_exec(g: &Graph, node: &Node, threads: usize) -> NodeExec {
    let compute = float_compute(g, node);
    let staging = if is_special(&node.op) {
        0
    } else {
        node.inputs.iter().chain(&node.outputs).filter(|&&v| g.dtype(v).is_half()).map(|&v| g.shape(v).numel()).sum()
    };
    NodeExec { compute, kernel_scratch: staging, kernel_scratch_len: kernel_scratch_len(g, node, threads) }
}

impl Backend for CpuBackend {
    type Program = CpuProgram;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn compile(&self, graph: Graph) -> Result<CpuProgram> {
        graph.validate()?;
        let execs: Vec<NodeExec> = graph.nodes.iter().map(|n| node_exec(&graph, n, self.threads)).collect();
        let plan = self.plan(&graph)?;
        // A plan larger than memory is refused before anything is allocated (the allocator would abort).
        crate::engine::host_memory::ensure_available(
            (plan.arena_bytes + plan.source_bytes) as u64,
            "the compiled step (planned arena + parameters, inputs and optimizer state)",
            "lower the batch or image size, or turn on activation checkpointing",
        )?;
        // Aligned like the plan's offsets (`memplan::ALIGN`), so every tensor starts on a cache line.
        let mut arena = AlignedVec::<u64>::zeroed(plan.arena_bytes.div_ceil(8));
        let arena_ptr = arena.as_mut_ptr().cast::<u8>();
        let mut sources = Vec::new();
        let mut source_ptr = vec![std::ptr::null_mut(); graph.values.len()];
        for (v, val) in graph.values.iter().enumerate() {
            if val.kind.is_source() {
                let mut buf = AlignedVec::<u64>::zeroed(val.bytes().div_ceil(8).max(1));
                source_ptr[v] = buf.as_mut_ptr().cast::<u8>();
                sources.push(buf);
            }
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads)
            .thread_name(|i| format!("zeroconv-cpu-{i}"))
            .build()
            .map_err(|e| Error::msg(format!("cannot start the CPU thread pool: {e}")))?;
        Ok(CpuProgram {
            graph,
            plan,
            execs,
            threads: self.threads,
            pool,
            _arena: arena,
            arena_ptr,
            _sources: sources,
            source_ptr,
            profile: None,
            check_finite: crate::knobs::check_finite(),
            communicator: None,
        })
        .map(|mut p| {
            let level = crate::knobs::debug_level();
            if level >= 2 {
                p.set_profiling(true, true);
            }
            p
        })
    }
}

impl CpuProgram {
    fn ptr(&self, v: ValueId) -> Result<*mut u8> {
        match self.plan.locations[v] {
            // SAFETY: the planner placed the value inside the arena (verified by `MemoryPlan::verify`).
            Some(Location::Arena(off)) => Ok(unsafe { self.arena_ptr.add(off) }),
            Some(Location::Source(s)) => Ok(self.source_ptr[s]),
            None => Err(Error::msg(format!("value {} is not held by this program", self.graph.values[v].name))),
        }
    }

    /// A typed view of value `v`'s bytes.
    ///
    /// SAFETY (for callers): no `&mut` view of overlapping bytes may be alive. The memory plan
    /// guarantees that values live at the same node never overlap, and a node's inputs and
    /// outputs are live together.
    unsafe fn view<'a, T>(&self, v: ValueId) -> Result<&'a [T]> {
        let n = self.graph.shape(v).numel();
        // SAFETY: the value's planned bytes hold `n` elements; the caller guarantees no aliasing `&mut` view.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr(v)? as *const T, n) })
    }

    /// SAFETY: as `view`, and this must be the only view of these bytes.
    #[allow(clippy::mut_from_ref)]
    unsafe fn view_mut<'a, T>(&self, v: ValueId) -> Result<&'a mut [T]> {
        let n = self.graph.shape(v).numel();
        // SAFETY: as in `view`; the caller guarantees this is the only view of these bytes.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr(v)? as *mut T, n) })
    }

    /// The node's scratch, as elements of T.
    ///
    /// SAFETY: scratch is planned live only during its node, disjoint from everything else then.
    #[allow(clippy::mut_from_ref)]
    unsafe fn scratch<'a, T>(&self, i: usize) -> &'a mut [T] {
        match self.plan.scratch[i] {
            // SAFETY: the planner placed `bytes` of scratch at `off` inside the arena, live only during node `i`.
            Some((off, bytes)) => unsafe {
                std::slice::from_raw_parts_mut(self.arena_ptr.add(off) as *mut T, bytes / std::mem::size_of::<T>())
            },
            None => &mut [],
        }
    }

    fn read_f64(&self, v: ValueId) -> Result<Vec<f64>> {
        let n = self.graph.shape(v).numel();
        let p = self.ptr(v)?;
        // SAFETY: reads `n` elements of the value's own dtype from its planned bytes.
        let bytes = unsafe { std::slice::from_raw_parts(p, n * self.graph.dtype(v).size()) };
        Ok(HostTensor { shape: self.graph.shape(v).clone(), dtype: self.graph.dtype(v), bytes: bytes.to_vec() }
            .to_f64())
    }

    fn run_node(&self, i: usize) -> Result<()> {
        let node = &self.graph.nodes[i];
        // Empty tensors (a batch of 0): a node with nothing to write does nothing (the kernels split their
        // outputs into chunks of a size derived from the shape, which is 0 here). AdamW updates in place and has
        // no outputs; its kernel takes empty tensors as they are.
        if !node.outputs.is_empty() {
            if node.outputs.iter().all(|&o| self.graph.shape(o).numel() == 0) {
                return Ok(());
            }
            if let Some(&empty) = node.inputs.iter().find(|&&v| self.graph.shape(v).numel() == 0) {
                return self.run_node_with_empty_input(i, empty);
            }
        }
        match &node.op {
            Op::Reshape { .. } => return Ok(()), // a view: planned to share its input's bytes
            Op::Fill { value, shape, dtype } if !dtype.is_float() => {
                // Integer fills are written as their own type (the generic path computes in floats).
                let t = HostTensor::from_f64(shape.clone(), *dtype, &vec![value.get(); shape.numel()])?;
                // SAFETY: the output holds `numel * size` bytes of this dtype and this is its only view.
                let out = unsafe { self.view_mut::<u8>(node.outputs[0])? };
                // SAFETY: `view_mut::<u8>` spans numel bytes; the value spans numel * size.
                let out = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr(), t.bytes.len()) };
                out.copy_from_slice(&t.bytes);
                return Ok(());
            }
            Op::Cast { .. } => return self.run_cast(node),
            Op::TimestepEmbedding { dim, max_period } => {
                let t = self.read_f64(node.inputs[0])?;
                // SAFETY: the output is f32 (checked by shape inference) and the only view.
                let out = unsafe { self.view_mut::<f32>(node.outputs[0])? };
                layout::timestep_embedding(&t, *dim, max_period.get(), out);
                return Ok(());
            }
            Op::AdamW { beta1, beta2, eps, weight_decay } => {
                let hp = (beta1.get(), beta2.get(), eps.get(), weight_decay.get());
                return self.run_adamw(&node.inputs[..4], node.inputs[4], hp);
            }
            Op::MultiAdamW(k) => {
                let hp = (k.beta1.get(), k.beta2.get(), k.eps.get(), k.weight_decay.get());
                let hyper = node.inputs[4 * k.tensors];
                for t in 0..k.tensors {
                    self.run_adamw(&node.inputs[4 * t..4 * t + 4], hyper, hp)?;
                }
                return Ok(());
            }
            Op::AccumulateGrad => return self.run_accumulate_grad(node),
            Op::AllReduce { .. } => return self.run_all_reduce(i),
            _ => {}
        }
        match self.execs[i].compute {
            DType::F64 => self.run_generic::<f64>(i),
            _ => self.run_generic::<f32>(i),
        }
    }

    /// Node `i` reads the empty tensor `empty` and writes a non-empty one. Ops that sum over the empty extent
    /// (matrix products over K = 0, weight and parameter gradients over a batch of 0, reductions) write zeros,
    /// the sum of no terms; the MSE loss, a mean of nothing, is NaN (as in PyTorch); concatenation and the
    /// adjoint of slicing copy what there is. Any other op is an error naming the tensor, never a kernel that
    /// splits its work into chunks of size 0.
    fn run_node_with_empty_input(&self, i: usize, empty: ValueId) -> Result<()> {
        let node = &self.graph.nodes[i];
        let fill = |value: f64| -> Result<()> {
            for &o in &node.outputs {
                let (shape, dtype) = (self.graph.shape(o).clone(), self.graph.dtype(o));
                let t = HostTensor::from_f64(shape.clone(), dtype, &vec![value; shape.numel()])?;
                // SAFETY: the output's planned bytes hold `numel * size` bytes of its dtype, and a node's outputs
                // are written by nothing else while it runs.
                let out = unsafe { std::slice::from_raw_parts_mut(self.ptr(o)?, t.bytes.len()) };
                out.copy_from_slice(&t.bytes);
            }
            Ok(())
        };
        match &node.op {
            Op::Concat { .. } | Op::SliceBackward { .. } => match self.execs[i].compute {
                DType::F64 => self.run_generic::<f64>(i),
                _ => self.run_generic::<f32>(i),
            },
            // The log-sum-exp of an empty row is -inf and of an empty contraction ln(visible keys): not zeros.
            Op::Attention { lse: true, .. } => Err(Error::Unsupported {
                backend: "cpu",
                msg: format!(
                    "attention with its log-sum-exp output over the empty tensor {} ({})",
                    self.graph.values[empty].name,
                    self.graph.shape(empty)
                ),
            }),
            Op::MatMul { .. }
            | Op::Conv2dBackwardInput { .. }
            | Op::Conv2dBackwardWeight { .. }
            | Op::GroupNormBackward { .. }
            | Op::LayerNormBackward { .. }
            | Op::Attention { .. }
            | Op::AttentionBackward { .. }
            | Op::EmbeddingBackward { .. }
            | Op::ReduceSum { .. }
            | Op::SumTo { .. } => fill(0.0),
            Op::MseLoss => fill(f64::NAN),
            op => Err(Error::msg(format!(
                "{} reads the empty tensor {} ({}) and would write a non-empty one: not supported",
                op.name(),
                self.graph.values[empty].name,
                self.graph.shape(empty)
            ))),
        }
    }

    /// One AdamW update of (param, grad, m, v) with hyper-parameters read from `hyper`.
    fn run_adamw(&self, pgmv: &[ValueId], hyper: ValueId, (b1, b2, e, wd): (f64, f64, f64, f64)) -> Result<()> {
        let h = self.read_f64(hyper)?;
        let hyper = [h[0], h[1], h[2]];
        // SAFETY: param, grad, m and v are distinct values (params/state are separate source
        // buffers, grad is in the arena), so the four views do not alias.
        unsafe {
            match self.graph.dtype(pgmv[0]) {
                DType::F32 => ew::adamw(
                    self.view_mut::<f32>(pgmv[0])?,
                    self.view::<f32>(pgmv[1])?,
                    self.view_mut::<f32>(pgmv[2])?,
                    self.view_mut::<f32>(pgmv[3])?,
                    hyper,
                    b1,
                    b2,
                    e,
                    wd,
                ),
                _ => ew::adamw(
                    self.view_mut::<f64>(pgmv[0])?,
                    self.view::<f64>(pgmv[1])?,
                    self.view_mut::<f64>(pgmv[2])?,
                    self.view_mut::<f64>(pgmv[3])?,
                    hyper,
                    b1,
                    b2,
                    e,
                    wd,
                ),
            }
        }
        Ok(())
    }

    /// acc ← grad (keep = 0) or acc + grad (keep ≠ 0), in place.
    fn run_accumulate_grad(&self, node: &Node) -> Result<()> {
        let (acc, grad) = (node.inputs[0], node.inputs[1]);
        let keep = self.read_f64(node.inputs[2])?[0] != 0.0;
        // SAFETY: acc is a state buffer and grad a different value (in the arena or another source), so the two
        // views do not alias; shape inference made them the same shape and dtype.
        unsafe {
            match self.graph.dtype(acc) {
                DType::F32 => ew::accumulate_grad(self.view_mut::<f32>(acc)?, self.view::<f32>(grad)?, keep),
                DType::F64 => ew::accumulate_grad(self.view_mut::<f64>(acc)?, self.view::<f64>(grad)?, keep),
                other => {
                    return Err(Error::Unsupported { backend: "cpu", msg: format!("gradient accumulation in {other}") })
                }
            }
        }
        Ok(())
    }

    /// Node `i`'s bucket of accumulators summed over the ranks, in place: a single accumulator where it is, several
    /// packed into the node's scratch (one transfer), reduced, and unpacked.
    fn run_all_reduce(&self, i: usize) -> Result<()> {
        let node = &self.graph.nodes[i];
        let comm = self.communicator.as_deref().ok_or_else(|| {
            Error::msg(
                "the step sums its gradients over the data-parallel ranks, but the program was given no communicator \
                 (Program::set_communicator)",
            )
        })?;
        // SAFETY: the accumulators are distinct state buffers (sources), the scratch is this node's own arena bytes,
        // and nothing else runs while the node does; each view below is the only one of its bytes while it lives.
        unsafe {
            match (self.graph.dtype(node.inputs[0]), node.inputs.len()) {
                (DType::F32, 1) => comm.all_reduce_sum(ReduceBuf::F32(self.view_mut::<f32>(node.inputs[0])?)),
                (DType::F64, 1) => comm.all_reduce_sum(ReduceBuf::F64(self.view_mut::<f64>(node.inputs[0])?)),
                (DType::F32, _) => self.packed(i, |b: &mut [f32]| comm.all_reduce_sum(ReduceBuf::F32(b))),
                (DType::F64, _) => self.packed(i, |b: &mut [f64]| comm.all_reduce_sum(ReduceBuf::F64(b))),
                (other, _) => Err(Error::Unsupported { backend: "cpu", msg: format!("an all-reduce of {other}") }),
            }
        }
    }

    /// Copies node `i`'s inputs (one dtype, T) one after another into its scratch, runs `f` on them, copies back.
    ///
    /// SAFETY: the inputs are distinct buffers of type T that nothing else views while the node runs.
    unsafe fn packed<T: Copy>(&self, i: usize, f: impl FnOnce(&mut [T]) -> Result<()>) -> Result<()> {
        let ins = &self.graph.nodes[i].inputs;
        let total: usize = ins.iter().map(|&v| self.graph.shape(v).numel()).sum();
        // SAFETY: the planner gave the node `total` elements of scratch (`kernel_scratch_len`), live only now.
        let buf = &mut unsafe { self.scratch::<T>(i) }[..total];
        let mut at = 0;
        for &v in ins {
            // SAFETY: the caller's guarantee.
            let x = unsafe { self.view::<T>(v)? };
            buf[at..at + x.len()].copy_from_slice(x);
            at += x.len();
        }
        f(buf)?;
        let mut at = 0;
        for &v in ins {
            // SAFETY: the caller's guarantee.
            let x = unsafe { self.view_mut::<T>(v)? };
            let n = x.len();
            x.copy_from_slice(&buf[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// The first non-finite value among node `i`'s outputs (float ones), as an error naming it.
    fn check_outputs_finite(&self, i: usize) -> Result<()> {
        let node = &self.graph.nodes[i];
        for &o in &node.outputs {
            if !self.graph.dtype(o).is_float() {
                continue;
            }
            let vals = self.read_f64(o)?;
            if let Some((at, v)) = vals.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(Error::msg(format!(
                    "the first non-finite value of the step: {v} at element {at} of {} ({} {}), produced by node {i} ({}) {}",
                    self.graph.values[o].name,
                    self.graph.shape(o),
                    self.graph.dtype(o),
                    node.op.name(),
                    node.op.attrs()
                )));
            }
        }
        Ok(())
    }

    /// Runs node `i` alone (lockstep comparisons with another backend); `launch` runs them all.
    pub fn launch_node(&mut self, i: usize) -> Result<()> {
        let this = &*self;
        this.pool.install(|| this.run_node(i))
    }

    /// Turns the per-kernel NaN/Inf check on or off (it is also on with ZEROCONV_CHECK_FINITE=1).
    pub fn set_check_finite(&mut self, on: bool) {
        self.check_finite = on;
    }

    fn run_cast(&self, node: &Node) -> Result<()> {
        let (x, y) = (node.inputs[0], node.outputs[0]);
        let (from, to) = (self.graph.dtype(x), self.graph.dtype(y));
        // SAFETY: input and output are distinct planned values of the declared dtypes.
        unsafe {
            match (from, to) {
                (DType::F32, DType::BF16) => convert(self.view::<f32>(x)?, self.view_mut::<bf16>(y)?, bf16::from_f32),
                (DType::F32, DType::F16) => convert(self.view::<f32>(x)?, self.view_mut::<f16>(y)?, f16::from_f32),
                (DType::BF16, DType::F32) => convert(self.view::<bf16>(x)?, self.view_mut::<f32>(y)?, bf16::to_f32),
                (DType::F16, DType::F32) => convert(self.view::<f16>(x)?, self.view_mut::<f32>(y)?, f16::to_f32),
                (DType::F32, DType::F64) => convert(self.view::<f32>(x)?, self.view_mut::<f64>(y)?, |v| v as f64),
                (DType::F64, DType::F32) => convert(self.view::<f64>(x)?, self.view_mut::<f32>(y)?, |v| v as f32),
                _ => {
                    // Rare combinations (ints, half to half) go through f64.
                    let vals = self.read_f64(x)?;
                    let t = HostTensor::from_f64(self.graph.shape(y).clone(), to, &vals)?;
                    let out = self.view_mut::<u8>(y)?;
                    // `view_mut::<u8>` spans numel bytes; the value spans numel * size.
                    let out = std::slice::from_raw_parts_mut(out.as_mut_ptr(), t.bytes.len());
                    out.copy_from_slice(&t.bytes);
                }
            }
        }
        Ok(())
    }

    fn run_generic<T: Float + Staged>(&self, i: usize) -> Result<()> {
        let node = &self.graph.nodes[i];
        let e = &self.execs[i];
        // SAFETY: the node's scratch is disjoint from its inputs and outputs (planned), and the
        // staged regions and the kernel scratch are disjoint sub-slices of it.
        let scratch: &mut [T] = unsafe { self.scratch::<T>(i) };
        let (staging, kscratch) = scratch.split_at_mut(e.kernel_scratch.min(scratch.len()));
        let mut staging: &mut [T] = staging;
        let mut ins: SmallVec<[&[T]; 6]> = SmallVec::new();
        let mut staged_in: SmallVec<[&[T]; 4]> = SmallVec::new();
        let mut ids = None;
        // Staged inputs come first in the staging area, in input order.
        for &v in &node.inputs {
            let dt = self.graph.dtype(v);
            if dt.is_half() {
                let n = self.graph.shape(v).numel();
                let (dst, rest) = std::mem::take(&mut staging).split_at_mut(n);
                staging = rest;
                // SAFETY: reading the input's own planned bytes as its dtype.
                unsafe { T::stage_in(dt, self.ptr(v)?, dst) };
                staged_in.push(&*dst);
            }
        }
        let mut staged_iter = staged_in.into_iter();
        for &v in &node.inputs {
            let dt = self.graph.dtype(v);
            if dt.is_half() {
                ins.push(staged_iter.next().expect("staged above"));
            } else if dt.is_float() {
                // SAFETY: see `view`.
                ins.push(unsafe { self.view::<T>(v)? });
            } else {
                // SAFETY: integer ids, read as their own type.
                ids = Some(unsafe {
                    match dt {
                        DType::I32 => Ids::I32(self.view::<i32>(v)?),
                        _ => Ids::I64(self.view::<i64>(v)?),
                    }
                });
                ins.push(&[]);
            }
        }
        let mut outs: SmallVec<[&mut [T]; 3]> = SmallVec::new();
        let mut staged_outs: SmallVec<[(usize, DType, *mut u8); 3]> = SmallVec::new();
        for (k, &v) in node.outputs.iter().enumerate() {
            let dt = self.graph.dtype(v);
            if dt.is_half() {
                let n = self.graph.shape(v).numel();
                let (dst, rest) = std::mem::take(&mut staging).split_at_mut(n);
                staging = rest;
                staged_outs.push((k, dt, self.ptr(v)?));
                outs.push(dst);
            } else {
                // SAFETY: see `view_mut`; outputs of one node are distinct planned values.
                outs.push(unsafe { self.view_mut::<T>(v)? });
            }
        }
        self.kernel(node, &ins, &mut outs, &mut kscratch[..e.kernel_scratch_len], ids)?;
        for (k, dt, p) in staged_outs {
            // SAFETY: writing the output's own planned bytes as its dtype.
            unsafe { T::stage_out(dt, outs[k], p) };
        }
        Ok(())
    }

    fn kernel<T: Float>(
        &self,
        node: &Node,
        ins: &[&[T]],
        outs: &mut [&mut [T]],
        scratch: &mut [T],
        ids: Option<Ids>,
    ) -> Result<()> {
        let g = &self.graph;
        let s = |i: usize| g.shape(node.inputs[i]);
        let os = |i: usize| g.shape(node.outputs[i]);
        match &node.op {
            Op::Fill { value, .. } => ew::fill(value.get(), outs[0]),
            Op::Unary(u) => ew::unary(*u, ins[0], outs[0]),
            Op::UnaryBackward(u) => ew::unary_backward(*u, ins[0], ins[1], outs[0]),
            Op::Binary(b) => ew::binary(*b, ins[0], s(0), ins[1], s(1), outs[0], os(0)),
            Op::Affine { alpha, beta } => ew::affine(ins[0], alpha.get(), beta.get(), outs[0]),
            Op::MatMul { trans_a, trans_b } => {
                let a = linalg::Operand { data: ins[0], shape: s(0), trans: *trans_a };
                let b = linalg::Operand { data: ins[1], shape: s(1), trans: *trans_b };
                linalg::batched_matmul(a, b, outs[0], os(0), self.threads)
            }
            Op::Conv2d { stride, padding, layout } => {
                let geom = conv_geom(s(0), s(1), *stride, *padding, *layout);
                let (x, w, bias) = (ins[0], ins[1], ins.get(2).copied());
                match layout {
                    Layout::Nchw => {
                        conv::conv2d_forward(&geom, x, w, bias, outs[0], scratch, conv_threads(self.threads))?
                    }
                    Layout::Nhwc => conv_nhwc::forward(&geom, (x, w, bias), outs[0], scratch, self.threads)?,
                }
            }
            Op::Conv2dBackwardInput { stride, padding, layout, .. } => {
                let geom = conv_geom(os(0), s(1), *stride, *padding, *layout);
                match layout {
                    Layout::Nchw => conv::conv2d_backward_input(
                        &geom,
                        ins[0],
                        ins[1],
                        outs[0],
                        scratch,
                        conv_threads(self.threads),
                    )?,
                    Layout::Nhwc => conv_nhwc::backward_input(&geom, ins[0], ins[1], outs[0], scratch, self.threads)?,
                }
            }
            Op::Conv2dBackwardWeight { stride, padding, layout, .. } => {
                let geom = conv_geom(s(0), os(0), *stride, *padding, *layout);
                match layout {
                    Layout::Nchw => conv::conv2d_backward_weight(
                        &geom,
                        ins[0],
                        ins[1],
                        outs[0],
                        scratch,
                        conv_threads(self.threads),
                    )?,
                    Layout::Nhwc => conv_nhwc::backward_weight(&geom, ins[0], ins[1], outs[0], scratch, self.threads)?,
                }
            }
            Op::GroupNorm { groups, eps, layout } => {
                let g = group_norm_geom(s(0), *groups, eps.get(), *layout);
                match layout {
                    Layout::Nchw => norm::group_norm(&g, ins[0], ins[1], ins[2], outs[0]),
                    Layout::Nhwc => norm::group_norm_channels_last(&g, ins[0], ins[1], ins[2], outs[0]),
                }
            }
            Op::GroupNormBackward { groups, eps, layout } => {
                let [dx, dg, db] = outs else { unreachable!("three outputs by shape inference") };
                let g = group_norm_geom(s(0), *groups, eps.get(), *layout);
                let grads = norm::NormGrads { dx, dgamma: dg, dbeta: db, partial: scratch };
                match layout {
                    Layout::Nchw => norm::group_norm_backward(&g, ins[0], ins[1], ins[2], grads),
                    Layout::Nhwc => norm::group_norm_channels_last_backward(&g, ins[0], ins[1], ins[2], grads),
                }
            }
            Op::LayerNorm { eps } => {
                let d = *s(0).dims().last().unwrap_or(&1);
                norm::layer_norm(ins[0], ins[1], ins[2], outs[0], d, eps.get());
            }
            Op::LayerNormBackward { eps } => {
                let d = *s(0).dims().last().unwrap_or(&1);
                let [dx, dg, db] = outs else { unreachable!("three outputs by shape inference") };
                let grads = norm::NormGrads { dx, dgamma: dg, dbeta: db, partial: scratch };
                norm::layer_norm_backward(ins[0], ins[1], ins[2], grads, d, eps.get());
            }
            Op::Softmax => norm::softmax_rows(ins[0], outs[0], *s(0).dims().last().unwrap_or(&1)),
            Op::SoftmaxBackward => norm::softmax_backward(ins[0], ins[1], outs[0], *s(0).dims().last().unwrap_or(&1)),
            Op::Attention { scale, causal, .. } => {
                let geom = AttnGeom::from_shapes(s(0), s(1), s(2), scale.get(), *causal);
                let (o, lse) = match outs {
                    [o] => (&mut **o, None),
                    [o, lse] => (&mut **o, Some(&mut **lse)),
                    _ => unreachable!("one or two outputs by shape inference"),
                };
                linalg::attention(&geom, ins[0], ins[1], ins[2], linalg::AttnOut { o, lse }, scratch, self.threads);
            }
            Op::AttentionBackward { scale, causal, .. } => {
                let geom = AttnGeom::from_shapes(s(0), s(1), s(2), scale.get(), *causal);
                let [dq, dk, dv] = outs else { unreachable!("three outputs by shape inference") };
                let grads = linalg::AttnGrads { dq, dk, dv, scratch };
                // The probabilities are rebuilt from q and k whatever the form (the lse form's o and lse, inputs 3
                // and 4, are for backends that would otherwise run a forward again), so both forms give the
                // same gradients, bit for bit; dout is the last input.
                let dout = ins[ins.len() - 1];
                linalg::attention_backward(&geom, ins[0], ins[1], ins[2], dout, grads, self.threads);
            }
            Op::Upsample2x => layout::upsample2x(ins[0], *s(0).dims().last().unwrap_or(&1), outs[0]),
            Op::Upsample2xBackward => {
                let d = os(0).dims();
                layout::upsample2x_backward(ins[0], d[d.len() - 2], d[d.len() - 1], outs[0]);
            }
            Op::Concat { axis } => {
                let parts: SmallVec<[(&[T], &Shape); 6]> = ins.iter().enumerate().map(|(k, x)| (*x, s(k))).collect();
                layout::concat(&parts, *axis, outs[0], os(0));
            }
            Op::Slice { axis, start, .. } => layout::slice(ins[0], s(0), *axis, *start, outs[0], os(0)),
            Op::SliceBackward { axis, start, .. } => {
                layout::slice_backward(ins[0], s(0), *axis, *start, outs[0], os(0))
            }
            Op::Permute { perm } => layout::permute(ins[0], s(0), perm, outs[0], os(0)),
            Op::Embedding => {
                let ids = ids.ok_or_else(|| Error::msg("embedding: ids missing"))?;
                let (vocab, d) = (s(0).dims()[0], s(0).dims()[1]);
                if let Some((at, id)) = ids.first_out_of_range(vocab) {
                    return Err(Error::msg(format!(
                        "embedding: id {id} at position {at} is outside the table of {vocab} rows"
                    )));
                }
                layout::embedding(ins[0], d, &ids, outs[0]);
            }
            Op::EmbeddingBackward { vocab } => {
                let ids = ids.ok_or_else(|| Error::msg("embedding backward: ids missing"))?;
                if let Some((at, id)) = ids.first_out_of_range(*vocab) {
                    return Err(Error::msg(format!(
                        "embedding: id {id} at position {at} is outside the table of {vocab} rows"
                    )));
                }
                layout::embedding_backward(&ids, ins[1], *os(0).dims().last().unwrap_or(&1), outs[0]);
            }
            Op::ReduceSum { .. } => {
                // keepdim or not, the output's elements are laid out as the kept shape.
                let kept = kept_shape(s(0), os(0), &node.op);
                ew::sum_to(ins[0], s(0), outs[0], &kept);
            }
            Op::SumTo { .. } => ew::sum_to(ins[0], s(0), outs[0], os(0)),
            Op::BroadcastTo { .. } => ew::broadcast_to(ins[0], s(0), outs[0], os(0)),
            Op::MseLoss => outs[0][0] = ew::mse_loss(ins[0], ins[1]),
            Op::MseLossBackward => ew::mse_loss_backward(ins[0], ins[1], ins[2][0], outs[0]),
            Op::Fused(k) if k.anchor.is_product() => super::epilogue::run(k, ins, outs, scratch, self.threads)?,
            Op::Fused(k) => super::fused::run(k, ins, outs, scratch, self.threads),
            Op::Reshape { .. }
            | Op::Cast { .. }
            | Op::TimestepEmbedding { .. }
            | Op::AdamW { .. }
            | Op::MultiAdamW(_)
            | Op::AccumulateGrad
            | Op::AllReduce { .. } => {
                unreachable!("handled in run_node")
            }
        }
        Ok(())
    }
}

fn kept_shape(x: &Shape, _out: &Shape, op: &Op) -> Shape {
    match op {
        Op::ReduceSum { axes, .. } => {
            Shape(x.dims().iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect())
        }
        _ => x.clone(),
    }
}

fn convert<A: Copy + Sync, B: Send>(x: &[A], y: &mut [B], f: impl Fn(A) -> B + Sync) {
    super::par::par_chunks(y, |start, o| {
        for (r, &v) in o.iter_mut().zip(&x[start..]) {
            *r = f(v);
        }
    });
}

/// Moving half-precision values into and out of the compute type.
pub trait Staged: Sized {
    /// # Safety
    /// `src` must point at `dst.len()` elements of `dt`.
    unsafe fn stage_in(dt: DType, src: *const u8, dst: &mut [Self]);
    /// # Safety
    /// `dst` must point at `src.len()` writable elements of `dt`.
    unsafe fn stage_out(dt: DType, src: &[Self], dst: *mut u8);
}

/// The 16-bit storage of `dt` at `src`, `len` elements, as a slice.
///
/// # Safety
/// `src` must point at `len` readable elements of `dt` that nothing writes while the slice lives.
unsafe fn half_slice<'a, H>(src: *const u8, len: usize) -> &'a [H] {
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(src as *const H, len) }
}

/// # Safety
/// `dst` must point at `len` writable elements that nothing else reads or writes while the slice lives.
unsafe fn half_slice_mut<'a, H>(dst: *mut u8, len: usize) -> &'a mut [H] {
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts_mut(dst as *mut H, len) }
}

impl Staged for f32 {
    unsafe fn stage_in(dt: DType, src: *const u8, dst: &mut [f32]) {
        match dt {
            // SAFETY: the caller guarantees the pointer covers the slice's length in elements of `dt`.
            DType::BF16 => convert(unsafe { half_slice::<bf16>(src, dst.len()) }, dst, bf16::to_f32),
            // SAFETY: the caller guarantees the pointer covers the slice's length in elements of `dt`.
            _ => convert(unsafe { half_slice::<f16>(src, dst.len()) }, dst, f16::to_f32),
        }
    }
    unsafe fn stage_out(dt: DType, src: &[f32], dst: *mut u8) {
        match dt {
            // SAFETY: the caller guarantees the pointer covers the slice's length in elements of `dt`.
            DType::BF16 => convert(src, unsafe { half_slice_mut::<bf16>(dst, src.len()) }, bf16::from_f32),
            // SAFETY: the caller guarantees the pointer covers the slice's length in elements of `dt`.
            _ => convert(src, unsafe { half_slice_mut::<f16>(dst, src.len()) }, f16::from_f32),
        }
    }
}

impl Staged for f64 {
    unsafe fn stage_in(dt: DType, src: *const u8, dst: &mut [f64]) {
        match dt {
            // SAFETY: the caller guarantees the pointer covers the slice's length in elements of `dt`.
            DType::BF16 => convert(unsafe { half_slice::<bf16>(src, dst.len()) }, dst, bf16::to_f64),
            // SAFETY: the caller guarantees the pointer covers the slice's length in elements of `dt`.
            _ => convert(unsafe { half_slice::<f16>(src, dst.len()) }, dst, f16::to_f64),
        }
    }
    unsafe fn stage_out(dt: DType, src: &[f64], dst: *mut u8) {
        match dt {
            // SAFETY: the caller guarantees the pointer covers the slice's length in elements of `dt`.
            DType::BF16 => convert(src, unsafe { half_slice_mut::<bf16>(dst, src.len()) }, bf16::from_f64),
            // SAFETY: the caller guarantees the pointer covers the slice's length in elements of `dt`.
            _ => convert(src, unsafe { half_slice_mut::<f16>(dst, src.len()) }, f16::from_f64),
        }
    }
}

impl Program for CpuProgram {
    fn graph(&self) -> &Graph {
        &self.graph
    }
    fn plan(&self) -> &MemoryPlan {
        &self.plan
    }

    fn upload(&mut self, v: ValueId, t: &HostTensor) -> Result<()> {
        check_upload(&self.graph, v, t)?;
        // SAFETY: the source buffer holds the value's bytes (the tensor was checked to have its shape and dtype)
        // and `&mut self` excludes any concurrent step.
        unsafe { std::ptr::copy_nonoverlapping(t.bytes.as_ptr(), self.source_ptr[v], t.bytes.len()) };
        Ok(())
    }

    fn download(&mut self, v: ValueId) -> Result<HostTensor> {
        let val = &self.graph.values[v];
        let p = self.ptr(v)?;
        // SAFETY: the value's bytes are planned (or a source buffer) and no step is running.
        let bytes = unsafe { std::slice::from_raw_parts(p, val.bytes()) }.to_vec();
        Ok(HostTensor { shape: val.shape.clone(), dtype: val.dtype, bytes })
    }

    fn launch_nodes(&mut self, nodes: std::ops::Range<usize>) -> Result<()> {
        check_node_range(&self.graph, &nodes)?;
        let mut profile = self.profile.take();
        let this = &*self;
        let r = this.pool.install(|| {
            for i in nodes {
                let start = std::time::Instant::now();
                this.run_node(i)
                    .map_err(|e| Error::msg(format!("node {i} ({}): {e}", this.graph.nodes[i].op.name())))?;
                if this.check_finite {
                    this.check_outputs_finite(i)?;
                }
                if let Some(p) = profile.as_mut() {
                    p.record(i, start, start.elapsed());
                }
            }
            Ok(())
        });
        if let Some(p) = profile.as_mut() {
            p.end_step();
        }
        self.profile = profile;
        r
    }

    fn set_profiling(&mut self, on: bool, echo: bool) {
        self.profile = on.then(|| crate::engine::profile::Profile::new(&self.graph, echo));
    }

    fn profile(&self) -> Option<&crate::engine::profile::Profile> {
        self.profile.as_ref()
    }

    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }

    fn set_communicator(&mut self, comm: Arc<dyn Communicator>) -> Result<()> {
        check_communicator(&self.graph, comm.as_ref())?;
        self.communicator = Some(comm);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::passes::memplan::ALIGN;

    #[test]
    fn every_value_of_a_compiled_program_is_64_byte_aligned() {
        let mut g = Graph::new();
        let x = g.input("x", [3, 5], DType::F32);
        let w = g.param("w", [3, 5], DType::F32, true);
        let s = g.add(x, w).unwrap();
        let t = g.add(s, x).unwrap();
        let _ = g.add(t, w).unwrap();
        let program = CpuBackend::new(1).compile(g).unwrap();
        for v in 0..program.graph.values.len() {
            if let Ok(ptr) = program.ptr(v) {
                assert_eq!(ptr as usize % ALIGN, 0, "value {}", program.graph.values[v].name);
            }
        }
    }
}
