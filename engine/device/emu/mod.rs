//! The emulated CUDA device: the device seam implemented on the CPU, so the CUDA executor's lowering runs and is
//! checked without a GPU.
//!
//! - Kernels run under the CUDA emulator (`kernels::emulate`): the same .cu sources, with every argument checked
//!   against the kernel's compiled parameter list. Kernels whose contract allows any grid run with at most
//!   [`EmuOptions::max_any_grid_blocks`] blocks (emulated threads are fibers; their cost is per thread).
//! - GEMMs and convolutions run through [`blas`](super::blas) and [`dnn`](super::dnn), naive implementations of
//!   the cuBLAS and cuDNN semantics that validate their arguments as the libraries do, after checking that every
//!   byte they may touch lies in device memory.
//! - CUDA graphs: while capturing, commands are recorded (arguments by value) instead of run; `replay` runs the
//!   recording. Allocation, module loading, copies from or to the host and synchronisation are errors while
//!   capturing, as they are (or break capture) on a GPU.
//! - All-reduce (the emulated NCCL): given a communicator ([`Device::set_communicator`]: a
//!   [`ThreadGroup`](crate::engine::dist::ThreadGroup) when the ranks are threads of one process, each with its own
//!   emulated device), `all_reduce` really sums the buffer across the ranks, in rank order, eagerly and on replay of a
//!   captured graph alike; without one the device is a world of one and the call checks its buffer only.
//! - Ranges (the seam's NVTX ranges): each `range_push` is recorded with the number of commands that ran while it
//!   was the innermost open range ([`EmuDevice::ranges`]), and commands run outside every range are counted, so a
//!   test can check that every command of a profiled step is inside the range of its node.
//! - Two streams ([`streams`]): the compute stream and the communication stream the gradient all-reduce runs on,
//!   ordered through events. Commands run at once, in issue order, but a command that touches memory the other
//!   stream's unfinished work touches, with no event ordering the two, is an error naming both (a race on a GPU);
//!   so is a capture that uses the communication stream without forking it from the compute stream, or ends with it
//!   unjoined.
//! - Liveness checks (when [`EmuOptions::check_liveness`]): before each node, every arena byte the memory plan says
//!   is dead is filled with 0xff (NaN in every float type); after it, any changed byte outside the node's declared
//!   outputs and scratch, or a changed guard band, is an error naming the node.

mod memory;
pub mod streams;

use super::shared_memory::{self, OptIn, SharedOptIns};
use super::{
    blas, dnn, Arg, Conv, Copy2d, DevPtr, Device, DeviceInfo, EventId, Gemm, GraphId, Launch, Mark, ModuleSource,
    NodeAccess, Span, Stream,
};
use crate::engine::dist::{Communicator, ReduceBuf};
use crate::error::{Error, Result};
use crate::graph::DType;
use crate::kernels::emulate::{self, Dim3, EmuModule, KernelArgs, LaunchConfig, Schedule};
use memory::Memory;
use std::collections::HashMap;
use std::sync::Arc;
use streams::{CaptureStreams, Streams};

/// How the emulated device runs.
#[derive(Clone, Copy, Debug)]
pub struct EmuOptions {
    /// Blocks an any-grid kernel runs with at most (the real grid when 0).
    pub max_any_grid_blocks: u32,
    /// Poison dead memory before each node and check for stray writes after it.
    pub check_liveness: bool,
    /// The emulator's thread schedule.
    pub schedule: Schedule,
    /// The architecture the device reports; it sets the dynamic shared memory a launch may opt in to
    /// ([`shared_memory::opt_in_limit`]).
    pub compute_capability: (u32, u32),
}

impl Default for EmuOptions {
    fn default() -> Self {
        EmuOptions {
            max_any_grid_blocks: 2,
            check_liveness: true,
            schedule: Schedule::Ascending,
            compute_capability: (9, 0),
        }
    }
}

/// A command as recorded during capture.
#[derive(Clone, Debug)]
enum Recorded {
    Launch(Launch),
    Gemm(Gemm),
    Conv(Conv),
    Copy2d(Stream, Copy2d),
    Memset { dst: DevPtr, byte: u8, bytes: u64 },
    AllReduce { stream: Stream, buf: DevPtr, count: u64, dtype: DType, average: bool },
    Record(Stream, EventId),
    Wait(Stream, EventId),
    Before { arena: Span, live: Vec<Span>, access: OwnedAccess },
    After { what: String, writes: Vec<Span> },
}

/// A [`NodeAccess`] kept in a recording.
#[derive(Clone, Debug)]
struct OwnedAccess {
    what: String,
    stream: Stream,
    reads: Vec<Span>,
    writes: Vec<Span>,
}

impl Recorded {
    /// The stream a device command runs on, and its description (none for the executor's notes and events).
    fn command(&self) -> Option<(Stream, String)> {
        match self {
            Recorded::Launch(l) => Some((Stream::Compute, format!("launch of `{}`", l.kernel.name))),
            Recorded::Gemm(_) => Some((Stream::Compute, "GEMM".into())),
            Recorded::Conv(_) => Some((Stream::Compute, "convolution".into())),
            Recorded::Copy2d(s, c) => {
                Some((*s, format!("copy of {}x{} bytes {:#x} -> {:#x}", c.height, c.width, c.src.0, c.dst.0)))
            }
            Recorded::Memset { dst, bytes, .. } => {
                Some((Stream::Compute, format!("memset of {bytes} bytes at {:#x}", dst.0)))
            }
            Recorded::AllReduce { stream, buf, count, dtype, .. } => {
                Some((*stream, format!("all-reduce of {count} {dtype} at {:#x}", buf.0)))
            }
            Recorded::Record(..) | Recorded::Wait(..) | Recorded::Before { .. } | Recorded::After { .. } => None,
        }
    }
}

/// How many commands of each kind the device ran (replays count every command they run).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmuCounts {
    pub launches: u64,
    pub gemms: u64,
    pub convs: u64,
    pub copies: u64,
    pub memsets: u64,
    /// All-reduce calls run (with or without other ranks).
    pub all_reduces: u64,
    /// Waits of the compute stream on an event of the communication stream (each one a point where the compute
    /// stream may stall for the sums).
    pub compute_waits: u64,
    pub replays: u64,
    /// Functions whose dynamic shared memory limit was raised above 48 KiB (what the real device does with
    /// `cuFuncSetAttribute`, once per function).
    pub shared_opt_ins: u64,
}

/// A range opened with `range_push`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmuRange {
    pub name: String,
    /// Commands that ran while it was the innermost open range.
    pub commands: u64,
    /// Whether `range_pop` closed it.
    pub closed: bool,
}

pub struct EmuDevice {
    options: EmuOptions,
    memory: Memory,
    modules: HashMap<String, Arc<EmuModule>>,
    capture: Option<Vec<Recorded>>,
    /// The cross-stream rules of the capture under way.
    capture_streams: CaptureStreams,
    /// What each stream has waited for of the other, and the work that may still race.
    streams: Streams,
    /// The node whose commands are running (between `before_command` and `after_command`), to name them in errors.
    node: Option<String>,
    graphs: Vec<Vec<Recorded>>,
    counts: EmuCounts,
    opt_ins: SharedOptIns,
    communicator: Option<Arc<dyn Communicator>>,
    /// The host's clock at each mark: the emulator runs every command as it is issued, so that is when the stream
    /// reached it.
    marks: Vec<std::time::Instant>,
    /// Every range opened so far, in order; the indices of the open ones, innermost last.
    ranges: Vec<EmuRange>,
    open_ranges: Vec<usize>,
    commands_outside_ranges: u64,
}

impl EmuDevice {
    pub fn new(options: EmuOptions) -> Self {
        EmuDevice {
            options,
            memory: Memory::default(),
            modules: HashMap::new(),
            capture: None,
            capture_streams: CaptureStreams::default(),
            streams: Streams::default(),
            node: None,
            graphs: Vec::new(),
            counts: EmuCounts::default(),
            opt_ins: SharedOptIns::default(),
            communicator: None,
            marks: Vec::new(),
            ranges: Vec::new(),
            open_ranges: Vec::new(),
            commands_outside_ranges: 0,
        }
    }

    /// Every range opened so far, in the order they were opened.
    pub fn ranges(&self) -> &[EmuRange] {
        &self.ranges
    }

    /// Commands (launches, library calls, copies, memsets, all-reduces) run while no range was open.
    pub fn commands_outside_ranges(&self) -> u64 {
        self.commands_outside_ranges
    }

    /// Counts a command that runs now against the innermost open range.
    fn count_in_range(&mut self) {
        match self.open_ranges.last() {
            Some(&r) => self.ranges[r].commands += 1,
            None => self.commands_outside_ranges += 1,
        }
    }

    pub fn counts(&self) -> EmuCounts {
        self.counts
    }

    pub fn options(&self) -> EmuOptions {
        self.options
    }

    fn not_capturing(&self, what: &str) -> Result<()> {
        if self.capture.is_some() {
            Err(Error::msg(format!("emulated device: {what} while capturing a CUDA graph (illegal on a GPU)")))
        } else {
            Ok(())
        }
    }

    /// Records `r` when capturing (checking the capture's cross-stream rules); otherwise returns it to be run now.
    fn record(&mut self, r: Recorded) -> Result<Option<Recorded>> {
        let Some(list) = &mut self.capture else { return Ok(Some(r)) };
        match &r {
            Recorded::Record(s, e) => self.capture_streams.record(*s, *e),
            Recorded::Wait(s, e) => self.capture_streams.wait(*s, *e),
            _ => {
                if let Some((stream, what)) = r.command() {
                    let what = match &self.node {
                        Some(node) => format!("{node}: {what}"),
                        None => what,
                    };
                    self.capture_streams.command(stream, &what)?;
                }
            }
        }
        // The node being recorded, to name its commands in the checks above.
        match &r {
            Recorded::Before { access, .. } => self.node = Some(access.what.clone()),
            Recorded::After { .. } => self.node = None,
            _ => {}
        }
        list.push(r);
        Ok(None)
    }

    /// `what` (a device command), named with the node it belongs to.
    fn in_node(&self, what: String) -> String {
        match &self.node {
            Some(node) => format!("{node}: {what}"),
            None => what,
        }
    }

    fn run(&mut self, r: &Recorded) -> Result<()> {
        if r.command().is_some() {
            self.count_in_range();
        }
        match r {
            Recorded::Launch(l) => self.run_launch(l),
            Recorded::Gemm(g) => self.run_gemm(g),
            Recorded::Conv(c) => self.run_conv(c),
            Recorded::Copy2d(stream, c) => {
                let what = self.in_node(r.command().map(|c| c.1).unwrap_or_default());
                let (src, dst) = copy_spans(c);
                self.streams.access(*stream, &what, &[src], &[dst])?;
                self.run_copy2d(c)
            }
            Recorded::Memset { dst, byte, bytes } => {
                self.counts.memsets += 1;
                let span = Span::new(*dst, *bytes);
                let what = self.in_node(r.command().map(|c| c.1).unwrap_or_default());
                self.streams.access(Stream::Compute, &what, &[], &[span])?;
                self.memory.write_with(span, "memset", |b| b.fill(*byte))?;
                Ok(())
            }
            Recorded::AllReduce { stream, buf, count, dtype, average } => {
                let span = Span::new(*buf, count * dtype.size() as u64);
                let what = self.in_node(r.command().map(|c| c.1).unwrap_or_default());
                self.streams.access(*stream, &what, &[span], &[span])?;
                self.run_all_reduce(*buf, *count, *dtype, *average)
            }
            Recorded::Record(stream, event) => {
                self.streams.record(*stream, *event);
                Ok(())
            }
            Recorded::Wait(stream, event) => {
                self.counts.compute_waits += u64::from(*stream == Stream::Compute);
                self.streams.wait(*stream, *event)
            }
            Recorded::Before { arena, live, access } => {
                self.streams.access(access.stream, &access.what, &access.reads, &access.writes)?;
                self.node = Some(access.what.clone());
                if self.options.check_liveness {
                    self.memory.poison_dead(*arena, live)?;
                }
                Ok(())
            }
            Recorded::After { what, writes } => {
                self.node = None;
                if self.options.check_liveness {
                    self.memory.check_unchanged(what, writes)?;
                }
                Ok(())
            }
        }
    }

    fn run_launch(&mut self, l: &Launch) -> Result<()> {
        self.counts.launches += 1;
        self.opt_in_shared(l)?;
        let module = self.modules.get(&l.kernel.module).ok_or_else(|| {
            Error::msg(format!("kernel `{}`: module `{}` was never loaded", l.kernel.name, l.kernel.module))
        })?;
        let mut args = KernelArgs::new();
        for (i, a) in l.args.iter().enumerate() {
            args = match a {
                Arg::Ptr(DevPtr::NULL) => args.null(),
                Arg::Ptr(p) => {
                    let what = format!("kernel `{}` argument {i}", l.kernel.name);
                    self.memory.check_pointer(*p, &what)?;
                    args.address(p.0, &what)
                }
                Arg::Value(bytes) => args.value_bytes(bytes),
            };
        }
        let [gx, gy, gz] = l.dims.grid;
        let max = self.options.max_any_grid_blocks;
        let gx = if l.any_grid && max > 0 { gx.min(max) } else { gx };
        let [bx, by, bz] = l.dims.block;
        let cfg = LaunchConfig::new(Dim3 { x: gx, y: gy, z: gz }, Dim3 { x: bx, y: by, z: bz })
            .with_shared_bytes(l.dims.shared_bytes)
            .with_schedule(self.options.schedule);
        // SAFETY: every pointer argument was checked to point into this device's memory; the lowering sizes each
        // kernel's buffers for the sizes it passes, and the liveness checks and guard bands catch a kernel that
        // writes outside them.
        unsafe { module.launch(&l.kernel.name, &cfg, &args) }
    }

    /// The 48 KiB rule of the real device ([`shared_memory`]): a launch above it opts its function in once, up to
    /// the limit of the emulated architecture, and is refused beyond it with the real device's message.
    fn opt_in_shared(&mut self, l: &Launch) -> Result<()> {
        let cc = self.options.compute_capability;
        let limit = shared_memory::opt_in_limit(cc).ok_or_else(|| {
            Error::msg(format!("emulated device: no shared memory limits known for compute capability {cc:?}"))
        })?;
        let device = format!("the emulated sm_{}{} device", cc.0, cc.1);
        let (module, name) = (&l.kernel.module, &l.kernel.name);
        if let OptIn::Raise(bytes) = self.opt_ins.check(module, name, l.dims.shared_bytes, limit, &device)? {
            if self.opt_ins.get(module, name).is_none() {
                self.counts.shared_opt_ins += 1;
            }
            self.opt_ins.raised(module, name, bytes);
        }
        Ok(())
    }

    fn run_gemm(&mut self, g: &Gemm) -> Result<()> {
        self.counts.gemms += 1;
        blas::validate(g)?;
        let f = blas::footprint(g);
        for (span, what) in
            [(f.a, "GEMM operand A"), (f.b, "GEMM operand B"), (f.c, "GEMM output C"), (g.workspace, "GEMM workspace")]
        {
            self.memory.check(span, what)?;
        }
        // SAFETY: every byte the GEMM may touch was checked to lie in this device's memory.
        unsafe { blas::execute(g) }
    }

    fn run_conv(&mut self, c: &Conv) -> Result<()> {
        self.counts.convs += 1;
        dnn::validate(c)?;
        let f = dnn::footprint(c);
        for (span, what) in [
            (f.x, "convolution x"),
            (f.w, "convolution w"),
            (f.y, "convolution y"),
            (f.workspace, "convolution workspace"),
        ] {
            self.memory.check(span, what)?;
        }
        // SAFETY: every byte the convolution may touch was checked to lie in this device's memory.
        unsafe { dnn::execute(c) }
    }

    fn run_copy2d(&mut self, c: &Copy2d) -> Result<()> {
        self.counts.copies += 1;
        if c.width > c.src_pitch.max(c.width) || (c.height > 1 && (c.width > c.src_pitch || c.width > c.dst_pitch)) {
            return Err(Error::msg(format!("copy2d: width {} exceeds a pitch ({:?})", c.width, c)));
        }
        if c.height == 0 || c.width == 0 {
            return Ok(());
        }
        let (src_span, dst_span) = copy_spans(c);
        if src_span.ptr.0 < dst_span.end() && dst_span.ptr.0 < src_span.end() {
            return Err(Error::msg(format!("copy2d: source and destination overlap ({c:?})")));
        }
        let src = self.memory.read(src_span, "copy2d source")?.to_vec();
        self.memory.write_with(dst_span, "copy2d destination", |dst| {
            for r in 0..c.height as usize {
                let (s, d) = (r * c.src_pitch as usize, r * c.dst_pitch as usize);
                dst[d..d + c.width as usize].copy_from_slice(&src[s..s + c.width as usize]);
            }
        })
    }

    /// Sums `count` elements at `buf` across the communicator's ranks (a world of one without a communicator), then
    /// divides by the world size when `average`.
    fn run_all_reduce(&mut self, buf: DevPtr, count: u64, dtype: DType, average: bool) -> Result<()> {
        self.counts.all_reduces += 1;
        let span = Span::new(buf, count * dtype.size() as u64);
        let Some(comm) = self.communicator.clone() else {
            return self.memory.check(span, "all-reduce buffer");
        };
        let world = comm.world_size() as f64;
        let mut result = Ok(());
        self.memory.write_with(span, "all-reduce buffer", |bytes| {
            result = match dtype {
                DType::F32 => match bytemuck::try_cast_slice_mut::<u8, f32>(bytes) {
                    Ok(x) => comm.all_reduce_sum(ReduceBuf::F32(&mut *x)).map(|()| {
                        if average {
                            x.iter_mut().for_each(|v| *v = (*v as f64 / world) as f32);
                        }
                    }),
                    Err(e) => Err(Error::msg(format!("all-reduce buffer {buf:?}: {e}"))),
                },
                DType::F64 => match bytemuck::try_cast_slice_mut::<u8, f64>(bytes) {
                    Ok(x) => comm.all_reduce_sum(ReduceBuf::F64(&mut *x)).map(|()| {
                        if average {
                            x.iter_mut().for_each(|v| *v /= world);
                        }
                    }),
                    Err(e) => Err(Error::msg(format!("all-reduce buffer {buf:?}: {e}"))),
                },
                other => Err(Error::msg(format!("emulated device: an all-reduce of {other}"))),
            };
        })?;
        result
    }

    fn submit(&mut self, r: Recorded) -> Result<()> {
        match self.record(r)? {
            Some(r) => self.run(&r),
            None => Ok(()),
        }
    }
}

/// The bytes a 2-d copy reads and writes (from the first byte of the first row to the last byte of the last).
fn copy_spans(c: &Copy2d) -> (Span, Span) {
    let rows = c.height.saturating_sub(1);
    let width = if c.height == 0 { 0 } else { c.width };
    (Span::new(c.src, rows * c.src_pitch + width), Span::new(c.dst, rows * c.dst_pitch + width))
}

impl Device for EmuDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: "emulated CUDA device".into(),
            compute_capability: self.options.compute_capability,
            memory_bytes: 0,
        }
    }

    fn alloc(&mut self, bytes: u64, what: &str) -> Result<DevPtr> {
        self.not_capturing("allocation")?;
        self.memory.alloc(bytes, what)
    }

    fn load_module(&mut self, module: &ModuleSource) -> Result<()> {
        self.not_capturing("module loading")?;
        if self.modules.contains_key(module.name()) {
            return Ok(());
        }
        let m = match module {
            ModuleSource::Shipped(m) => emulate::compile_module(m)?,
            ModuleSource::Generated { name, source } => emulate::compile(name, source)?,
        };
        self.modules.insert(module.name().to_string(), m);
        Ok(())
    }

    fn upload(&mut self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.not_capturing("a host-to-device copy")?;
        // Ordered on the compute stream, which the host then waits for (as the real device does).
        let span = Span::new(dst, src.len() as u64);
        self.streams.access(
            Stream::Compute,
            &format!("upload of {} bytes at {:#x}", span.bytes, dst.0),
            &[],
            &[span],
        )?;
        self.streams.finished(Stream::Compute);
        self.memory.write_with(Span::new(dst, src.len() as u64), "upload", |b| b.copy_from_slice(src))
    }

    fn download(&mut self, dst: &mut [u8], src: DevPtr) -> Result<()> {
        self.not_capturing("a device-to-host copy")?;
        let span = Span::new(src, dst.len() as u64);
        self.streams.access(
            Stream::Compute,
            &format!("download of {} bytes at {:#x}", span.bytes, src.0),
            &[span],
            &[],
        )?;
        self.streams.finished(Stream::Compute);
        dst.copy_from_slice(self.memory.read(Span::new(src, dst.len() as u64), "download")?);
        Ok(())
    }

    fn copy2d(&mut self, stream: Stream, c: &Copy2d) -> Result<()> {
        self.submit(Recorded::Copy2d(stream, *c))
    }

    fn memset(&mut self, dst: DevPtr, byte: u8, bytes: u64) -> Result<()> {
        self.submit(Recorded::Memset { dst, byte, bytes })
    }

    fn launch(&mut self, launch: &Launch) -> Result<()> {
        self.submit(Recorded::Launch(launch.clone()))
    }

    fn gemm(&mut self, g: &Gemm) -> Result<()> {
        self.submit(Recorded::Gemm(*g))
    }

    fn conv(&mut self, c: &Conv) -> Result<()> {
        self.submit(Recorded::Conv(*c))
    }

    fn all_reduce(&mut self, stream: Stream, buf: DevPtr, count: u64, dtype: DType, average: bool) -> Result<()> {
        self.memory.check(Span::new(buf, count * dtype.size() as u64), "all-reduce buffer")?;
        self.submit(Recorded::AllReduce { stream, buf, count, dtype, average })
    }

    fn record(&mut self, stream: Stream, event: EventId) -> Result<()> {
        self.submit(Recorded::Record(stream, event))
    }

    fn wait(&mut self, stream: Stream, event: EventId) -> Result<()> {
        self.submit(Recorded::Wait(stream, event))
    }

    fn set_communicator(&mut self, comm: Arc<dyn Communicator>) -> Result<()> {
        self.not_capturing("joining a communicator")?;
        self.communicator = Some(comm);
        Ok(())
    }

    fn begin_capture(&mut self) -> Result<()> {
        self.not_capturing("begin_capture")?;
        self.capture = Some(Vec::new());
        self.capture_streams = CaptureStreams::default();
        Ok(())
    }

    fn end_capture(&mut self) -> Result<GraphId> {
        let list = self.capture.take().ok_or_else(|| Error::msg("end_capture without begin_capture"))?;
        self.node = None;
        std::mem::take(&mut self.capture_streams).end()?;
        self.graphs.push(list);
        Ok(GraphId(self.graphs.len() - 1))
    }

    fn replay(&mut self, graph: GraphId) -> Result<()> {
        self.not_capturing("replaying a graph")?;
        // The recording is taken out while it runs (running needs `&mut self`) and put back, so a replay copies
        // nothing.
        let list =
            std::mem::take(self.graphs.get_mut(graph.0).ok_or_else(|| Error::msg(format!("no graph {graph:?}")))?);
        self.counts.replays += 1;
        let result = list.iter().try_for_each(|r| self.run(r));
        self.graphs[graph.0] = list;
        result
    }

    fn synchronize(&mut self) -> Result<()> {
        self.not_capturing("synchronize")?;
        self.streams.finished(Stream::Compute);
        self.streams.finished(Stream::Comm);
        Ok(())
    }

    fn mark(&mut self) -> Result<Mark> {
        self.not_capturing("mark")?;
        self.marks.push(std::time::Instant::now());
        Ok(Mark(self.marks.len() - 1))
    }

    fn elapsed(&mut self, from: Mark, to: Mark) -> Result<std::time::Duration> {
        match (self.marks.get(from.0), self.marks.get(to.0)) {
            (Some(a), Some(b)) if from.0 <= to.0 => Ok(b.duration_since(*a)),
            _ => Err(Error::msg(format!(
                "elapsed from mark {} to mark {}: {} marks are recorded, and the first must come first",
                from.0,
                to.0,
                self.marks.len()
            ))),
        }
    }

    fn release_marks(&mut self) {
        self.marks.clear();
    }

    fn range_push(&mut self, name: &str) -> Result<()> {
        self.ranges.push(EmuRange { name: name.to_string(), commands: 0, closed: false });
        self.open_ranges.push(self.ranges.len() - 1);
        Ok(())
    }

    fn range_pop(&mut self) -> Result<()> {
        let r = self.open_ranges.pop().ok_or_else(|| Error::msg("emulated device: range_pop without an open range"))?;
        self.ranges[r].closed = true;
        Ok(())
    }

    fn before_command(&mut self, arena: Span, live: &[Span], access: &NodeAccess) -> Result<()> {
        let access = OwnedAccess {
            what: access.what.to_string(),
            stream: access.stream,
            reads: access.reads.to_vec(),
            writes: access.writes.to_vec(),
        };
        self.submit(Recorded::Before { arena, live: live.to_vec(), access })
    }

    fn after_command(&mut self, what: &str, writes: &[Span]) -> Result<()> {
        self.submit(Recorded::After { what: what.to_string(), writes: writes.to_vec() })
    }
}
