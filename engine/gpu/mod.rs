//! The CUDA executor, generic over the device seam ([`crate::engine::device::Device`]): on a GPU through
//! `CudaDevice`, on the CPU through the emulated device, which runs the same lowered commands and checks them.
//!
//! At compile time: every node is lowered once to device commands ([`lower`]), the memory planner places
//! intermediates and per-node scratch (partial sums, attention scores) in one 256-byte-aligned arena, parameters /
//! optimizer state / inputs get fixed offsets in one source region, AdamW tables and error flags sit in a constant
//! region uploaded once, and every cuBLASLt and cuDNN call shares one library workspace, an allocation of its own
//! ([`LIBRARY_WORKSPACE`]). Gradient all-reduce nodes run on the device's communication stream, ordered with the
//! compute stream by events (`issue_node`), staging buckets in a buffer of their own. Nothing is allocated per step. Step 1 runs eagerly (it warms module
//! loading and libraries), step 2 is captured into a CUDA graph and replayed, every later step is a replay.

pub mod consts;
pub mod lower;

use crate::engine::backend::{all_reduce_world, check_communicator, check_node_range, check_upload, Backend, Program};
use crate::engine::device::emu::{EmuDevice, EmuOptions};
use crate::engine::device::{DevPtr, Device, EventId, GraphId, ModuleSource, NodeAccess, Span, Stream};
use crate::engine::dist::Communicator;
use crate::engine::profile::Profile;
use crate::engine::tensor::HostTensor;
use crate::error::{Error, Result};
use crate::graph::passes::{plan_memory_aligned, Location, MemoryPlan};
use crate::graph::{Graph, ValueId};
use lower::{lower_node, Cmd, Ctx, Lowered};

/// Every device buffer starts at a multiple of this.
const ALIGN: u64 = 256;
/// Scratch attention may use for one chunk of scores (S, P and, backward, dP, dS), by default.
pub const ATTENTION_BUDGET: u64 = 256 << 20;
/// The library workspace by default (`ZEROCONV_LIBRARY_WORKSPACE_MIB` overrides it): the workspace cuBLASLt's
/// heuristic and cuDNN's algorithm choice may use. The cuBLAS documentation (cublasSetWorkspace,
/// docs.nvidia.com/cuda/cublas/#cublassetworkspace) recommends a 32 MiB user workspace on Hopper and 4 MiB on
/// other architectures; the larger one serves both. With none, cuBLASLt has no split-K kernels and cuDNN none of
/// its algorithms that need memory (most implicit-GEMM, Winograd and FFT ones).
///
/// One workspace serves every call because every library call runs on the compute stream, in order, so no two of
/// them use it at once (PyTorch likewise keeps one cuBLAS workspace per stream). The communication stream runs only
/// NCCL's all-reduce and its staging copies, which use no library workspace; a stream that ran library calls would
/// need a workspace of its own.
pub const LIBRARY_WORKSPACE: u64 = 32 << 20;

/// How steps are executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepMode {
    /// Step 1 eager, step 2 captured and replayed, later steps replayed.
    CaptureAfterFirst,
    /// Every step eager (profiling, debugging).
    Eager,
}

/// Builds [`GpuProgram`]s on devices made by `make_device` (one device per program).
pub struct GpuBackend<D: Device> {
    make_device: Box<dyn Fn() -> Result<D> + Send + Sync>,
    mode: StepMode,
    check_finite: bool,
    attention_budget: u64,
    flash_attention: bool,
    /// Bytes of the library workspace; `None`: from `ZEROCONV_LIBRARY_WORKSPACE_MIB` (read when planning, so a bad
    /// value is an error there).
    library_workspace: Option<u64>,
}

impl<D: Device> GpuBackend<D> {
    /// The per-kernel NaN/Inf check is on when `ZEROCONV_CHECK_FINITE=1` (see [`GpuBackend::with_check_finite`]).
    pub fn new(make_device: impl Fn() -> Result<D> + Send + Sync + 'static, mode: StepMode) -> Self {
        let check_finite = crate::knobs::check_finite();
        GpuBackend {
            make_device: Box::new(make_device),
            mode,
            check_finite,
            attention_budget: ATTENTION_BUDGET,
            flash_attention: false,
            library_workspace: None,
        }
    }

    /// The workspace every cuBLASLt and cuDNN call may use, in bytes (0: none); see [`LIBRARY_WORKSPACE`].
    pub fn with_library_workspace(mut self, bytes: u64) -> Self {
        self.library_workspace = Some(bytes);
        self
    }

    /// The scratch attention may use for its score matrices; (batch, head) pairs are processed in chunks that fit.
    pub fn with_attention_budget(mut self, bytes: u64) -> Self {
        self.attention_budget = bytes;
        self
    }

    /// Attention and its backward on bf16/f16 data with head dim 16, 32, 40, 64, 80, 128 or 160 (v's equal to q's) run on
    /// the flash kernels: no L x L scores; the forward keeps its O and log-sum-exp for the backward (the graph is
    /// rewritten so at compile time: [`lower::flash::carry_lse`]), whose scratch is then B·H·L floats. Other
    /// attention (f32 storage, other head dims) keeps the composite path. Off by default (`use_flash_attention` in a
    /// config).
    pub fn with_flash_attention(mut self, on: bool) -> Self {
        self.flash_attention = on;
        self
    }

    /// After every node, a `check_finite` kernel over each float output records the first node (in step order)
    /// that produced a NaN or Inf; the step then fails naming it. Costs one extra launch per float output.
    pub fn with_check_finite(mut self, on: bool) -> Self {
        self.check_finite = on;
        self
    }
}

impl GpuBackend<EmuDevice> {
    /// The CUDA executor on the emulated device (slow: for checking the lowering on the CPU).
    pub fn emulated(options: EmuOptions) -> Self {
        GpuBackend::new(move || Ok(EmuDevice::new(options)), StepMode::CaptureAfterFirst)
    }
}

/// One node's lowered commands and what the liveness and stream checks need.
struct NodeCmds {
    cmds: Vec<Cmd>,
    /// The communication stream for an all-reduce node (the `k`-th of the graph: its commands and events), the
    /// compute stream for every other node.
    comm: Option<usize>,
    /// Spans the node reads: its inputs.
    reads: Vec<Span>,
    /// Spans the node may write: its outputs, its scratch, in-place targets and its constants.
    writes: Vec<Span>,
    /// Arena spans that hold live data when the node starts (everything else in the arena is dead).
    live: Vec<Span>,
}

/// Whether a command is a library call, which gets the library workspace.
fn uses_library_workspace(c: &Cmd) -> bool {
    matches!(c, Cmd::Gemm(_) | Cmd::Conv(_))
}

/// The event the compute stream records before each all-reduce node for the communication stream to wait on (one,
/// re-recorded each time: a wait orders after the record last issued before it).
const FORK_EVENT: EventId = EventId(0);

/// The event the communication stream records after the `k`-th all-reduce node, which the compute stream waits on
/// before its first command that touches the bucket.
fn done_event(k: usize) -> EventId {
    EventId(1 + k)
}

/// An all-reduce node issued on the communication stream that the compute stream has not waited for yet.
struct PendingSum {
    k: usize,
    /// What it reads and writes: the bucket's accumulators and the staging buffer.
    spans: Vec<Span>,
}

fn overlaps(a: &Span, b: &Span) -> bool {
    a.bytes > 0 && b.bytes > 0 && a.ptr.0 < b.end() && b.ptr.0 < a.end()
}

pub struct GpuProgram<D: Device> {
    graph: Graph,
    plan: MemoryPlan,
    device: D,
    mode: StepMode,
    arena: Span,
    /// The one workspace of every cuBLASLt and cuDNN call (0 bytes when there is none).
    library_workspace: Span,
    /// Where all-reduce nodes stage buckets of several gradients (0 bytes when none does).
    comm_staging: Span,
    /// Device address of every value the program holds.
    addresses: Vec<Option<DevPtr>>,
    nodes: Vec<NodeCmds>,
    error_flags: Vec<(usize, DevPtr)>,
    /// The first node with a non-finite output (u32::MAX: none), when the per-kernel check is on.
    finite_flag: Option<DevPtr>,
    /// Each node range launched so far: how often, and its captured CUDA graph once there is one. A whole step is
    /// one range; an accumulating step has two (its micro-batch nodes and its update), each captured on its own.
    ranges: Vec<RangeRuns>,
    profile: Option<Profile>,
    /// The ranks the graph's all-reduce nodes sum over, and whether the device was given a communicator of that many
    /// (`Program::set_communicator`): a step that needs one runs only with it.
    all_reduce_world: Option<usize>,
    communicator_attached: bool,
}

/// The launches of one node range.
struct RangeRuns {
    nodes: std::ops::Range<usize>,
    launches: u64,
    captured: Option<GraphId>,
}

fn align(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// The module holding a graph's fused kernels: the shipped `fused_generated` when it has all of them, else a module
/// generated for this graph (compiled at run time: NVRTC on a GPU, the host compiler under emulation).
fn fused_module(g: &Graph) -> Result<Option<ModuleSource>> {
    let gens = crate::kernels::codegen::for_graph(g)?;
    if gens.is_empty() {
        return Ok(None);
    }
    if let Some(m) = crate::kernels::module("fused_generated") {
        if gens.iter().all(|(_, f)| m.source.contains(&format!("void {}(", f.function))) {
            return Ok(Some(ModuleSource::Shipped(m)));
        }
    }
    let functions: Vec<_> = gens.into_iter().map(|(_, f)| f).collect();
    let source = crate::kernels::codegen::module_source(&functions);
    let name = format!("fused_{:016x}", crate::hash::fnv1a64(source.as_bytes()));
    Ok(Some(ModuleSource::Generated { name, source }))
}

/// Every node lowered with placeholder addresses (0 for values, scratch and constants at offset 0).
fn lower_placeholders(
    graph: &Graph,
    fused_name: &str,
    attention_budget: u64,
    flash_attention: bool,
) -> Result<Vec<Lowered>> {
    let placeholder = |_: ValueId| DevPtr::NULL;
    let ctx = Ctx {
        graph,
        addr: &placeholder,
        scratch_base: 0,
        const_base: 0,
        fused_module: fused_name,
        attention_budget,
        flash_attention,
        library_workspace: Span::new(DevPtr::NULL, 0),
        comm_staging: Span::new(DevPtr::NULL, 0),
    };
    (0..graph.nodes.len()).map(|i| lower_node(&ctx, i)).collect()
}

/// The commands of one step of `graph`, per node, without a device (addresses are placeholders): for inspecting
/// and counting what a step launches, and for checking launches against the kernels' PTX signatures at any size.
/// `flash_attention` as [`GpuBackend::with_flash_attention`].
pub fn lower_graph(graph: &Graph, flash_attention: bool) -> Result<Vec<Vec<Cmd>>> {
    graph.validate()?;
    let graph = &for_attention(graph.clone(), flash_attention)?;
    let fused = fused_module(graph)?;
    let fused_name = fused.as_ref().map(|m| m.name().to_string()).unwrap_or_default();
    let lowered = lower_placeholders(graph, &fused_name, ATTENTION_BUDGET, flash_attention)?;
    Ok(lowered.into_iter().map(|l| l.cmds).collect())
}

/// The graph the executor runs: with flash attention on, each attention backward that runs on the flash kernels
/// reads its forward's O and log-sum-exp instead of running a forward again ([`lower::flash::carry_lse`]; value
/// and node ids are unchanged, so the caller's ids still address the program).
fn for_attention(graph: Graph, flash_attention: bool) -> Result<Graph> {
    if flash_attention {
        lower::flash::carry_lse(&graph)
    } else {
        Ok(graph)
    }
}

/// Where a program's device memory goes, decided before anything is allocated.
pub struct DevicePlan {
    /// The arena: intermediates and every node's scratch, 256-byte aligned.
    pub plan: MemoryPlan,
    /// Offset of each source value (parameters, optimizer state, inputs) in the sources region.
    pub source_offsets: Vec<Option<u64>>,
    pub source_bytes: u64,
    /// Offset of each node's constants (AdamW tables, broadcast descriptors) in the constants region.
    pub const_offsets: Vec<u64>,
    pub const_total: u64,
    /// The library workspace, its own allocation (0 when configured so, or when the graph makes no library call).
    pub library_workspace: u64,
    /// The all-reduce's staging buffer, its own allocation ([`lower::comm_staging_bytes`]).
    pub comm_staging: u64,
}

impl DevicePlan {
    /// Device memory in all: arena, sources, constants, the library workspace and the all-reduce's staging buffer.
    pub fn total_bytes(&self) -> u64 {
        self.plan.arena_bytes as u64 + self.source_bytes + self.const_total + self.library_workspace + self.comm_staging
    }
}

impl<D: Device> GpuBackend<D> {
    /// Plans `graph`'s device memory as [`Backend::compile`] will, without a device (for `inspect --plan`).
    pub fn plan(&self, graph: &Graph) -> Result<DevicePlan> {
        graph.validate()?;
        let graph = &for_attention(graph.clone(), self.flash_attention)?;
        let fused = fused_module(graph)?;
        let fused_name = fused.as_ref().map(|m| m.name().to_string()).unwrap_or_default();
        self.plan_device(graph, &fused_name)
    }

    fn plan_device(&self, graph: &Graph, fused_name: &str) -> Result<DevicePlan> {
        let first = lower_placeholders(graph, fused_name, self.attention_budget, self.flash_attention)?;
        let library_calls = first.iter().any(|l| l.cmds.iter().any(uses_library_workspace));
        let library_workspace = if library_calls {
            match self.library_workspace {
                Some(b) => b,
                None => crate::knobs::library_workspace_bytes()?,
            }
        } else {
            0
        };
        let scratch: Vec<u64> = first.iter().map(|l| l.scratch_bytes).collect();
        let mut const_offsets = Vec::with_capacity(graph.nodes.len());
        let mut const_total = 0u64;
        for l in &first {
            const_offsets.push(const_total);
            const_total += align(l.const_bytes);
        }
        let plan = plan_memory_aligned(graph, &|i| scratch[i] as usize, ALIGN as usize)?;
        let mut source_offsets = vec![None; graph.values.len()];
        let mut source_bytes = 0u64;
        for (v, val) in graph.values.iter().enumerate() {
            if val.kind.is_source() {
                source_offsets[v] = Some(source_bytes);
                source_bytes += align(val.bytes() as u64);
            }
        }
        let comm_staging = lower::comm_staging_bytes(graph);
        Ok(DevicePlan {
            plan,
            source_offsets,
            source_bytes,
            const_offsets,
            const_total,
            library_workspace,
            comm_staging,
        })
    }
}

impl<D: Device> Backend for GpuBackend<D> {
    type Program = GpuProgram<D>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn compile(&self, graph: Graph) -> Result<GpuProgram<D>> {
        graph.validate()?;
        let graph = for_attention(graph, self.flash_attention)?;
        let all_reduce_world = all_reduce_world(&graph)?;
        let fused = fused_module(&graph)?;
        let fused_name = fused.as_ref().map(|m| m.name().to_string()).unwrap_or_default();
        let n = graph.nodes.len();

        // Pass 1, placeholder addresses: how much scratch and constant memory each node needs.
        let DevicePlan {
            plan,
            source_offsets,
            source_bytes,
            const_offsets,
            mut const_total,
            library_workspace,
            comm_staging,
        } = self.plan_device(&graph, &fused_name)?;

        // Allocate: the arena, one region for every source value, the constants.
        let mut device = (self.make_device)()?;
        let arena_ptr = device.alloc(plan.arena_bytes.max(1) as u64, "arena")?;
        let sources_ptr = device.alloc(source_bytes.max(1), "parameters, optimizer state and inputs")?;
        // Sources start at zero, as on every backend: optimizer state that is never uploaded begins at 0.
        device.memset(sources_ptr, 0, source_bytes.max(1))?;
        // The finite-check flag sits after the nodes' constants.
        let flag_offset = const_total;
        if self.check_finite {
            const_total += ALIGN;
        }
        let consts_ptr = device.alloc(const_total.max(1), "constants")?;
        // Its own allocation, not arena scratch: no intermediate ever lives in it, so the libraries may overwrite all
        // of it at any call, and the device's alignment (256 bytes, what cublasLtMatmul asks of a workspace) holds.
        let library_workspace = match library_workspace {
            0 => Span::new(DevPtr::NULL, 0),
            bytes => Span::new(device.alloc(bytes, "library workspace (cuBLASLt, cuDNN)")?, bytes),
        };
        let comm_staging = match comm_staging {
            0 => Span::new(DevPtr::NULL, 0),
            bytes => Span::new(device.alloc(bytes, "all-reduce staging buffer")?, bytes),
        };
        let finite_flag = self.check_finite.then(|| consts_ptr.offset(flag_offset));
        let addresses: Vec<Option<DevPtr>> = (0..graph.values.len())
            .map(|v| match plan.locations[v] {
                Some(Location::Arena(off)) => Some(arena_ptr.offset(off as u64)),
                Some(Location::Source(s)) => source_offsets[s].map(|o| sources_ptr.offset(o)),
                None => None,
            })
            .collect();

        // Pass 2, real addresses.
        let addr = |v: ValueId| addresses[v].unwrap_or(DevPtr::NULL);
        let mut consts = vec![0u8; const_total as usize];
        let mut nodes = Vec::with_capacity(n);
        let mut error_flags = Vec::new();
        let mut comm_nodes = 0;
        for (i, &const_offset) in const_offsets.iter().enumerate() {
            let scratch_span = plan.scratch[i]
                .map(|(off, bytes)| Span::new(arena_ptr.offset(off as u64), bytes as u64))
                .unwrap_or(Span::new(DevPtr::NULL, 0));
            let ctx = Ctx {
                graph: &graph,
                addr: &addr,
                scratch_base: scratch_span.ptr.0,
                const_base: consts_ptr.0 + const_offset,
                fused_module: &fused_name,
                attention_budget: self.attention_budget,
                flash_attention: self.flash_attention,
                library_workspace,
                comm_staging,
            };
            let Lowered { mut cmds, consts: bytes, error_flags: flags, scratch_bytes, const_bytes } =
                lower_node(&ctx, i)?;
            if let Some(flag) = finite_flag {
                if i == 0 {
                    cmds.insert(0, Cmd::Memset { dst: flag, byte: 0xff, bytes: 4 });
                }
                for &o in &graph.nodes[i].outputs {
                    let d = graph.dtype(o);
                    if d.is_float() && graph.shape(o).numel() > 0 {
                        cmds.push(lower::check_finite(addr(o), d, graph.shape(o).numel() as u64, i, flag)?);
                    }
                }
            }
            if scratch_bytes > scratch_span.bytes {
                return Err(Error::msg(format!("node {i}: lowering asked for more scratch on its second pass")));
            }
            let at = const_offset as usize;
            consts[at..at + bytes.len()].copy_from_slice(&bytes);
            error_flags.extend(flags.into_iter().map(|f| (i, f)));
            let node = &graph.nodes[i];
            let comm = matches!(node.op, crate::graph::Op::AllReduce { .. }).then_some(comm_nodes);
            comm_nodes += usize::from(comm.is_some());
            let mut writes: Vec<Span> = node
                .outputs
                .iter()
                .map(|&o| Span::new(addr(o), graph.value(o).bytes() as u64))
                .chain([scratch_span, Span::new(consts_ptr.offset(const_offset), const_bytes)])
                // The finite check writes its flag after compute nodes only (an all-reduce has no outputs).
                .chain(finite_flag.filter(|_| comm.is_none()).map(|f| Span::new(f, 4)))
                .collect();
            if comm.is_some() {
                writes.push(comm_staging);
            }
            let reads = node
                .inputs
                .iter()
                .filter_map(|&v| addresses[v].map(|p| Span::new(p, graph.value(v).bytes() as u64)))
                .collect();
            if cmds.iter().any(uses_library_workspace) {
                writes.push(library_workspace);
            }
            // In-place ops (AdamW, gradient accumulation) also write some of their inputs.
            for j in node.op.in_place_inputs() {
                let v = node.inputs[j];
                writes.push(Span::new(addr(v), graph.value(v).bytes() as u64));
            }
            let live = plan
                .buffers
                .iter()
                .filter(|b| b.start < i && b.end >= i)
                .map(|b| Span::new(arena_ptr.offset(b.offset as u64), b.bytes as u64))
                .collect();
            nodes.push(NodeCmds { cmds, comm, reads, writes, live });
        }

        // Modules: every shipped one the commands name, and the fused module.
        let mut needed: Vec<&str> = nodes
            .iter()
            .flat_map(|n| n.cmds.iter())
            .filter_map(|c| if let Cmd::Launch(l) = c { Some(l.kernel.module.as_str()) } else { None })
            .collect();
        needed.sort_unstable();
        needed.dedup();
        for name in needed {
            if name == fused_name {
                continue;
            }
            let m = crate::kernels::module(name)
                .ok_or_else(|| Error::msg(format!("the lowering names a kernel module `{name}` that is not built")))?;
            device.load_module(&ModuleSource::Shipped(m))?;
        }
        if let Some(f) = &fused {
            if let (ModuleSource::Generated { name, source }, true) = (f, crate::knobs::debug_level() >= 4) {
                eprintln!("[kernels] generated module {name}:\n{source}");
            }
            device.load_module(f)?;
        }
        device.upload(consts_ptr, &consts)?;
        let arena = Span::new(arena_ptr, plan.arena_bytes as u64);
        let profile = (crate::knobs::debug_level() >= 2).then(|| Profile::new(&graph, true));
        Ok(GpuProgram {
            graph,
            plan,
            device,
            mode: self.mode,
            arena,
            library_workspace,
            comm_staging,
            addresses,
            nodes,
            error_flags,
            finite_flag,
            ranges: Vec::new(),
            profile,
            all_reduce_world,
            communicator_attached: false,
        })
    }
}

impl<D: Device> GpuProgram<D> {
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The one workspace every cuBLASLt and cuDNN command is given (0 bytes: none).
    pub fn library_workspace(&self) -> Span {
        self.library_workspace
    }

    /// The lowered commands of node `i`.
    pub fn commands(&self, i: usize) -> &[Cmd] {
        &self.nodes[i].cmds
    }

    /// Every command of a step, in order, with its node.
    pub fn all_commands(&self) -> impl Iterator<Item = (usize, &Cmd)> {
        self.nodes.iter().enumerate().flat_map(|(i, n)| n.cmds.iter().map(move |c| (i, c)))
    }

    /// The buffer all-reduce nodes stage buckets of several gradients in (0 bytes: none).
    pub fn comm_staging(&self) -> Span {
        self.comm_staging
    }

    /// Runs node `i` alone, eagerly (lockstep comparisons with another backend); `launch` runs a whole step.
    pub fn launch_node(&mut self, i: usize) -> Result<()> {
        let mut pending = Vec::new();
        self.issue_node(i, &mut pending)?;
        self.join_comm(&mut pending)
    }

    /// Issues node `i`'s commands, with the liveness hooks around them. An all-reduce node runs on the
    /// communication stream: after the compute stream's work so far (which includes the backward's last write into
    /// its bucket), and it joins `pending`. A compute node first waits for every pending sum whose memory it
    /// touches (clipping and AdamW reading the summed gradients, the next accumulation writing them).
    fn issue_node(&mut self, i: usize, pending: &mut Vec<PendingSum>) -> Result<()> {
        let node = &self.nodes[i];
        let what = format!("node {i} ({})", self.graph.nodes[i].op.name());
        let stream = match node.comm {
            Some(_) => {
                self.device.record(Stream::Compute, FORK_EVENT)?;
                self.device.wait(Stream::Comm, FORK_EVENT)?;
                Stream::Comm
            }
            None => {
                let touches = |p: &PendingSum| {
                    p.spans.iter().any(|s| node.reads.iter().chain(&node.writes).any(|t| overlaps(s, t)))
                };
                for p in pending.iter().filter(|p| touches(p)) {
                    self.device.wait(Stream::Compute, done_event(p.k))?;
                }
                pending.retain(|p| !touches(p));
                Stream::Compute
            }
        };
        let access = NodeAccess { what: &what, stream, reads: &node.reads, writes: &node.writes };
        self.device.before_command(self.arena, &node.live, &access)?;
        for c in &node.cmds {
            let r = match c {
                Cmd::Launch(l) => self.device.launch(l),
                Cmd::Gemm(g) => self.device.gemm(g),
                Cmd::Conv(cv) => self.device.conv(cv),
                Cmd::Copy2d(cp) => self.device.copy2d(stream, cp),
                Cmd::Memset { dst, byte, bytes } => self.device.memset(*dst, *byte, *bytes),
                Cmd::AllReduce { buf, count, dtype } => self.device.all_reduce(stream, *buf, *count, *dtype, false),
            };
            r.map_err(|e| Error::msg(format!("{what}, {}: {e}", c.describe())))?;
        }
        if let Some(k) = node.comm {
            self.device.record(Stream::Comm, done_event(k))?;
            let spans = node.reads.iter().chain(&node.writes).copied().filter(|s| s.bytes > 0).collect();
            pending.push(PendingSum { k, spans });
        }
        self.device.after_command(&what, &node.writes)
    }

    /// The compute stream waits for every sum still pending: at the end of every node range, so a range leaves no
    /// work behind on the communication stream (a captured range must join it back before the capture ends, and
    /// the host's downloads wait for the compute stream only). The communication stream runs in order, so waiting
    /// for the last sum waits for all.
    fn join_comm(&mut self, pending: &mut Vec<PendingSum>) -> Result<()> {
        if let Some(last) = pending.last() {
            self.device.wait(Stream::Compute, done_event(last.k))?;
        }
        pending.clear();
        Ok(())
    }

    /// Runs (or, while capturing, records) the commands of the nodes in `nodes`.
    fn issue_nodes(&mut self, nodes: std::ops::Range<usize>) -> Result<()> {
        let mut pending = Vec::new();
        if self.profile.is_none() {
            for i in nodes {
                self.issue_node(i, &mut pending)?;
            }
            return self.join_comm(&mut pending);
        }
        // Profiling (never while capturing): kernels run asynchronously on a GPU, so a node's time is the span
        // between the stream marks (CUDA events) around its commands, read once the stream has finished them.
        let host_start = std::time::Instant::now();
        let first = self.device.mark()?;
        let mut spans = Vec::with_capacity(nodes.len());
        let mut before = first;
        for i in nodes {
            // A range named as the profile names the node, so Nsight Systems' timeline (NVTX on a GPU) shows it.
            let name = self.profile.as_ref().map(|p| p.kernels[i].name.clone()).unwrap_or_default();
            self.device.range_push(&name)?;
            self.issue_node(i, &mut pending)?;
            self.device.range_pop()?;
            let after = self.device.mark()?;
            spans.push((i, before, after));
            before = after;
        }
        self.join_comm(&mut pending)?;
        self.device.synchronize()?;
        let mut timed = Vec::with_capacity(spans.len());
        for (i, from, to) in spans {
            timed.push((i, host_start + self.device.elapsed(first, from)?, self.device.elapsed(from, to)?));
        }
        self.device.release_marks();
        if let Some(p) = self.profile.as_mut() {
            for (i, start, duration) in timed {
                p.record(i, start, duration);
            }
            p.end_step();
        }
        Ok(())
    }

    /// Whether the per-kernel NaN/Inf check was compiled in.
    pub fn checks_finite(&self) -> bool {
        self.finite_flag.is_some()
    }

    /// After a step: every error flag must still read 0, and the finite check must have found nothing.
    fn check_error_flags(&mut self) -> Result<()> {
        if let Some(flag) = self.finite_flag {
            let mut word = [0u8; 4];
            self.device.download(&mut word, flag)?;
            let node = u32::from_le_bytes(word);
            if node != u32::MAX {
                let n = &self.graph.nodes[node as usize];
                return Err(Error::msg(format!(
                    "the first non-finite value of the step was produced by node {node} ({}) {}",
                    n.op.name(),
                    n.op.attrs()
                )));
            }
        }
        for k in 0..self.error_flags.len() {
            let (node, flag) = self.error_flags[k];
            let mut word = [0u8; 4];
            self.device.download(&mut word, flag)?;
            if u32::from_le_bytes(word) != 0 {
                let n = &self.graph.nodes[node];
                let ids = &self.graph.values[n.inputs[1]];
                return Err(Error::Binding {
                    name: ids.name.clone(),
                    msg: format!(
                        "an id is out of range for the {}-row table of node {node} ({})",
                        self.graph.shape(n.inputs[0]).dims()[0],
                        n.op.name()
                    ),
                });
            }
        }
        Ok(())
    }
}

impl<D: Device> Program for GpuProgram<D> {
    fn graph(&self) -> &Graph {
        &self.graph
    }

    fn plan(&self) -> &MemoryPlan {
        &self.plan
    }

    fn upload(&mut self, v: ValueId, t: &HostTensor) -> Result<()> {
        check_upload(&self.graph, v, t)?;
        let val = &self.graph.values[v];
        let ptr = self.addresses[v].ok_or_else(|| Error::msg(format!("{} has no device memory", val.name)))?;
        self.device.upload(ptr, &t.bytes)
    }

    fn download(&mut self, v: ValueId) -> Result<HostTensor> {
        let val = &self.graph.values[v];
        let ptr =
            self.addresses[v].ok_or_else(|| Error::msg(format!("value {} is not held by this program", val.name)))?;
        let mut bytes = vec![0u8; val.bytes()];
        self.device.download(&mut bytes, ptr)?;
        Ok(HostTensor { shape: val.shape.clone(), dtype: val.dtype, bytes })
    }

    fn launch_nodes(&mut self, nodes: std::ops::Range<usize>) -> Result<()> {
        check_node_range(&self.graph, &nodes)?;
        if let (Some(w), false) = (self.all_reduce_world, self.communicator_attached) {
            return Err(Error::msg(format!(
                "the step sums its gradients over {w} data-parallel ranks, but the device was given no communicator \
                 (Program::set_communicator)"
            )));
        }
        let r = match self.ranges.iter().position(|r| r.nodes == nodes) {
            Some(r) => r,
            None => {
                self.ranges.push(RangeRuns { nodes: nodes.clone(), launches: 0, captured: None });
                self.ranges.len() - 1
            }
        };
        let replay = self.mode == StepMode::CaptureAfterFirst && self.profile.is_none();
        match (replay, self.ranges[r].launches, self.ranges[r].captured) {
            (true, _, Some(g)) => self.device.replay(g)?,
            (true, s, None) if s >= 1 => {
                self.device.begin_capture()?;
                let recorded = self.issue_nodes(nodes);
                let graph = self.device.end_capture()?;
                recorded?;
                self.ranges[r].captured = Some(graph);
                self.device.replay(graph)?;
            }
            _ => self.issue_nodes(nodes)?,
        }
        self.ranges[r].launches += 1;
        self.check_error_flags()
    }

    fn synchronize(&mut self) -> Result<()> {
        self.device.synchronize()
    }

    fn set_communicator(&mut self, comm: std::sync::Arc<dyn Communicator>) -> Result<()> {
        check_communicator(&self.graph, comm.as_ref())?;
        self.device.set_communicator(comm)?;
        self.communicator_attached = true;
        Ok(())
    }

    fn set_profiling(&mut self, on: bool, echo: bool) {
        self.profile = on.then(|| Profile::new(&self.graph, echo));
    }

    fn profile(&self) -> Option<&Profile> {
        self.profile.as_ref()
    }
}
