//! The CUDA executor's library workspace (one allocation every cuBLASLt and cuDNN call shares) and its NVTX ranges,
//! on the emulated device.
//!
//! - Every GEMM and convolution of a training step gets the program's one workspace: 256-byte aligned, apart from
//!   every operand and from the arena (so from every live intermediate) at the moment of the call, as a device that
//!   watches the executor's liveness hooks sees it.
//! - The emulated libraries fill the workspace with 0xff at every call; results do not change, bit for bit, between
//!   a workspace of 0 bytes (the old behaviour) and a non-zero one.
//! - The plan grows by exactly the workspace, and only for graphs that call a library.
//! - A profiled step puts every command inside an NVTX range named as the profile names the node.

use crate::common;

use common::nets::{self, NetSpec, TrainingStep};
use zeroconv::engine::device::emu::{EmuDevice, EmuOptions};
use zeroconv::engine::device::{
    blas, dnn, Conv, Copy2d, DevPtr, Device, DeviceInfo, EventId, Gemm, GraphId, Launch, Mark, ModuleSource,
    NodeAccess, Span, Stream,
};
use zeroconv::engine::gpu::lower::Cmd;
use zeroconv::engine::gpu::{GpuBackend, StepMode};
use zeroconv::engine::{Backend, HostTensor, Program};
use zeroconv::graph::{BinaryOp, DType, Graph, Op, UnaryOp};
use zeroconv::{Error, Result};

/// The workspace these tests plan (small, so the emulated liveness checks stay fast; any non-zero size shows the
/// same).
const WORKSPACE: u64 = 1 << 20;

/// conv + GroupNorm + attention (GEMMs) + MSE + AdamW, fused: both kinds of library call.
fn step() -> TrainingStep {
    nets::training_step(
        &NetSpec { batch: 2, in_ch: 3, ch: 8, hw: 4, blocks: 1, checkpoint: false, dtype: DType::F32 },
        true,
    )
}

/// The workspace of a library command.
fn workspace_of(c: &Cmd) -> Option<Span> {
    match c {
        Cmd::Gemm(g) => Some(g.workspace),
        Cmd::Conv(c) => Some(c.workspace),
        _ => None,
    }
}

fn overlaps(a: &Span, b: &Span) -> bool {
    a.bytes > 0 && b.bytes > 0 && a.ptr.0 < b.end() && b.ptr.0 < a.end()
}

/// The emulated device, watching every library call's workspace against what the executor says is live.
struct Watch {
    inner: EmuDevice,
    arena: Span,
    live: Vec<Span>,
    /// Every workspace a GEMM or convolution was given.
    workspaces: Vec<Span>,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            inner: EmuDevice::new(EmuOptions::default()),
            arena: Span::new(DevPtr::NULL, 0),
            live: vec![],
            workspaces: vec![],
        }
    }

    /// The checks of one call's workspace `ws` against its operand spans.
    fn check(&mut self, what: &str, ws: Span, operands: &[(&str, Span)]) -> Result<()> {
        self.workspaces.push(ws);
        let fail = |m: String| Err(Error::msg(format!("{what}: workspace {ws:?} {m}")));
        if ws.bytes > 0 && !ws.ptr.0.is_multiple_of(256) {
            return fail("is not 256-byte aligned".into());
        }
        for (name, s) in operands {
            if overlaps(&ws, s) {
                return fail(format!("overlaps operand {name} {s:?}"));
            }
        }
        if overlaps(&ws, &self.arena) {
            return fail(format!("lies in the arena {:?}, where intermediates live", self.arena));
        }
        if let Some(l) = self.live.iter().find(|l| overlaps(&ws, l)) {
            return fail(format!("overlaps the live intermediate {l:?}"));
        }
        Ok(())
    }
}

impl Device for Watch {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    fn alloc(&mut self, bytes: u64, what: &str) -> Result<DevPtr> {
        self.inner.alloc(bytes, what)
    }
    fn load_module(&mut self, m: &ModuleSource) -> Result<()> {
        self.inner.load_module(m)
    }
    fn upload(&mut self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.inner.upload(dst, src)
    }
    fn download(&mut self, dst: &mut [u8], src: DevPtr) -> Result<()> {
        self.inner.download(dst, src)
    }
    fn copy2d(&mut self, s: Stream, c: &Copy2d) -> Result<()> {
        self.inner.copy2d(s, c)
    }
    fn memset(&mut self, dst: DevPtr, byte: u8, bytes: u64) -> Result<()> {
        self.inner.memset(dst, byte, bytes)
    }
    fn launch(&mut self, l: &Launch) -> Result<()> {
        self.inner.launch(l)
    }
    fn gemm(&mut self, g: &Gemm) -> Result<()> {
        let f = blas::footprint(g);
        self.check("gemm", g.workspace, &[("A", f.a), ("B", f.b), ("C", f.c)])?;
        self.inner.gemm(g)
    }
    fn conv(&mut self, c: &Conv) -> Result<()> {
        let f = dnn::footprint(c);
        self.check("conv", c.workspace, &[("x", f.x), ("w", f.w), ("y", f.y)])?;
        self.inner.conv(c)
    }
    fn all_reduce(&mut self, s: Stream, buf: DevPtr, count: u64, dtype: DType, average: bool) -> Result<()> {
        self.inner.all_reduce(s, buf, count, dtype, average)
    }
    fn record(&mut self, s: Stream, e: EventId) -> Result<()> {
        self.inner.record(s, e)
    }
    fn wait(&mut self, s: Stream, e: EventId) -> Result<()> {
        self.inner.wait(s, e)
    }
    fn begin_capture(&mut self) -> Result<()> {
        self.inner.begin_capture()
    }
    fn end_capture(&mut self) -> Result<GraphId> {
        self.inner.end_capture()
    }
    fn replay(&mut self, g: GraphId) -> Result<()> {
        self.inner.replay(g)
    }
    fn synchronize(&mut self) -> Result<()> {
        self.inner.synchronize()
    }
    fn mark(&mut self) -> Result<Mark> {
        self.inner.mark()
    }
    fn elapsed(&mut self, from: Mark, to: Mark) -> Result<std::time::Duration> {
        self.inner.elapsed(from, to)
    }
    fn release_marks(&mut self) {
        self.inner.release_marks()
    }
    fn before_command(&mut self, arena: Span, live: &[Span], access: &NodeAccess) -> Result<()> {
        (self.arena, self.live) = (arena, live.to_vec());
        self.inner.before_command(arena, live, access)
    }
    fn after_command(&mut self, what: &str, writes: &[Span]) -> Result<()> {
        self.inner.after_command(what, writes)
    }
}

#[test]
fn every_library_call_gets_the_one_workspace_apart_from_operands_and_live_data() {
    let s = step();
    let backend = GpuBackend::new(|| Ok(Watch::new()), StepMode::CaptureAfterFirst).with_library_workspace(WORKSPACE);
    let mut p = backend.compile(s.graph.clone()).unwrap();
    let ws = p.library_workspace();
    assert_eq!(ws.bytes, WORKSPACE);
    // Every library command carries it (the lowering, before anything runs).
    let (mut gemms, mut convs) = (0, 0);
    for (i, c) in p.all_commands() {
        match c {
            Cmd::Gemm(_) => gemms += 1,
            Cmd::Conv(_) => convs += 1,
            _ => continue,
        }
        assert_eq!(workspace_of(c), Some(ws), "node {i}: {c:?}");
    }
    assert!(gemms > 0 && convs > 0, "the step should call both libraries ({gemms} GEMMs, {convs} convolutions)");
    // Two steps: eager, then captured (the watch sees every command as it is issued or recorded).
    s.run_steps(&mut p, 1e-2, 2);
    let seen = &p.device().workspaces;
    assert_eq!(seen.len(), 2 * (gemms + convs), "every library call of both steps was checked");
    assert!(seen.iter().all(|w| *w == ws));
}

/// The emulated libraries overwrite the workspace with 0xff at every call, and the liveness checks allow the write
/// only for nodes that call a library: training with a workspace computes exactly what training without one does.
#[test]
fn the_poisoned_workspace_changes_no_result_and_zero_is_the_old_behaviour() {
    let s = step();
    let run = |bytes: u64| {
        let backend = GpuBackend::emulated(EmuOptions::default()).with_library_workspace(bytes);
        let mut p = backend.compile(s.graph.clone()).unwrap();
        let ws = p.library_workspace();
        let given: Vec<Span> = p.all_commands().filter_map(|(_, c)| workspace_of(c)).collect();
        assert!(!given.is_empty() && given.iter().all(|w| *w == ws), "{bytes}: {ws:?} vs {given:?}");
        (ws, s.run_steps(&mut p, 1e-2, 3))
    };
    let (none, plain) = run(0);
    assert_eq!(none, Span::new(DevPtr::NULL, 0), "0 plans no workspace: every call gets none, as before");
    let (some, with) = run(WORKSPACE);
    assert_eq!(some.bytes, WORKSPACE);
    for (t, (a, b)) in plain.iter().zip(&with).enumerate() {
        assert_eq!(a.0.to_bits(), b.0.to_bits(), "step {} loss", t + 1);
        assert!(a.1 == b.1, "step {}: parameters differ", t + 1);
    }
}

#[test]
fn the_plan_grows_by_exactly_the_workspace_and_only_with_library_calls() {
    let s = step();
    let plan = |g: &Graph, bytes: u64| {
        GpuBackend::emulated(EmuOptions::default()).with_library_workspace(bytes).plan(g).unwrap()
    };
    let (without, with) = (plan(&s.graph, 0), plan(&s.graph, 32 << 20));
    assert_eq!((without.library_workspace, with.library_workspace), (0, 32 << 20));
    assert_eq!(with.total_bytes() - without.total_bytes(), 32 << 20);
    assert_eq!(with.plan.arena_bytes, without.plan.arena_bytes, "the workspace is not arena scratch");

    // Pointwise only: no library call, so no workspace whatever the setting.
    let mut g = Graph::new();
    let x = g.input("x", [4, 4], DType::F32);
    let y = g.op1(Op::Unary(UnaryOp::Silu), &[x]).unwrap();
    g.outputs.push(y);
    assert_eq!(plan(&g, 32 << 20).library_workspace, 0);
}

/// `zeroconv profile` on a GPU: each node's commands sit inside an NVTX range named as the profile names the node,
/// so Nsight Systems' timeline shows node names. The emulated device records the ranges the executor opens.
#[test]
fn a_profiled_step_puts_every_command_in_its_nodes_range() {
    let mut g = Graph::new();
    let a = g.input("a", [8, 16], DType::F32);
    let b = g.input("b", [16, 8], DType::F32);
    let m = g.op1(Op::MatMul { trans_a: false, trans_b: false }, &[a, b]).unwrap();
    let s = g.op1(Op::Unary(UnaryOp::Silu), &[m]).unwrap();
    let z = g.op1(Op::Binary(BinaryOp::Mul), &[s, m]).unwrap();
    g.outputs.push(z);
    let mut p = GpuBackend::emulated(EmuOptions::default()).with_library_workspace(WORKSPACE).compile(g).unwrap();
    p.upload(a, &HostTensor::zeros([8, 16], DType::F32)).unwrap();
    p.upload(b, &HostTensor::zeros([16, 8], DType::F32)).unwrap();
    // Unprofiled steps (eager, then captured and replayed) open no range.
    p.launch().unwrap();
    p.launch().unwrap();
    assert!(p.device().ranges().is_empty());
    let outside = p.device().commands_outside_ranges();

    p.set_profiling(true, false);
    p.launch().unwrap();
    let names: Vec<String> = p.profile().unwrap().kernels.iter().map(|k| k.name.clone()).collect();
    let ranges = p.device().ranges();
    assert_eq!(ranges.len(), p.graph().nodes.len(), "one range per node: {ranges:?}");
    for (i, r) in ranges.iter().enumerate() {
        assert_eq!(r.name, names[i], "node {i}'s range");
        assert!(r.closed, "node {i}'s range was closed");
        assert_eq!(r.commands, p.commands(i).len() as u64, "node {i}: every command inside its range, no other");
    }
    assert!(names.iter().any(|n| n.starts_with("matmul")), "{names:?}");
    assert_eq!(p.device().commands_outside_ranges(), outside, "no command of the profiled step ran outside a range");

    // Unbalanced use of the seam is an error on the emulated device.
    let mut dev = EmuDevice::new(EmuOptions::default());
    dev.range_push("outer").unwrap();
    dev.range_pop().unwrap();
    assert!(dev.range_pop().unwrap_err().to_string().contains("without an open range"));
}
