//! The CUDA executor with flash attention on (`GpuBackend::with_flash_attention`), on the emulated device, against
//! the CPU backend: which attention nodes take the flash kernels (bf16/f16 with a head dim they are built for) and
//! which keep the composite path (f32, other head dims); single attention nodes at head dims whose kernels need
//! more than 48 KiB of shared memory (the opt-in path); a whole bf16 training step node by node and over three steps
//! (eager, then captured and replayed); the 48 KiB rule of the emulated device; the config keys.
//!
//! The kernels' own numerics are checked in tests/emulated/flash_attention_emulated.rs; here it is the lowering: argument
//! order, pointer offsets per head, launch shapes, and the graph rewrite that hands the forward's O and log-sum-exp
//! to the backward (graph::passes::attention_lse), so the backward runs no forward kernel and its scratch is delta
//! alone; a backward with no forward to pair with, and the `lse` form off the flash kernels, on the composite path.

use crate::common;

use common::nets::{self, NetSpec};
use common::Rng;
use zeroconv::engine::cpu::CpuBackend;
use zeroconv::engine::device::emu::{EmuDevice, EmuOptions};
use zeroconv::engine::device::shared_memory::opt_in_limit;
use zeroconv::engine::device::{Arg, DevPtr, Device, KernelRef, Launch, LaunchDims, ModuleSource};
use zeroconv::engine::gpu::lower::Cmd;
use zeroconv::engine::gpu::{lower_graph, GpuBackend, GpuProgram};
use zeroconv::engine::{Backend, HostTensor, Program};
use zeroconv::graph::{DType, F64Bits, Graph, Op, ValueId};

fn flash_backend() -> GpuBackend<EmuDevice> {
    GpuBackend::emulated(EmuOptions::default()).with_flash_attention(true)
}

/// The names of every kernel a program launches in one step.
fn kernel_names(p: &GpuProgram<EmuDevice>) -> Vec<String> {
    p.all_commands()
        .filter_map(|(_, c)| if let Cmd::Launch(l) = c { Some(l.kernel.name.clone()) } else { None })
        .collect()
}

/// The kernels the program's attention backward nodes launch.
fn backward_kernel_names(p: &GpuProgram<EmuDevice>) -> Vec<String> {
    let g = p.graph();
    p.all_commands()
        .filter_map(|(i, c)| match (&g.nodes[i].op, c) {
            (Op::AttentionBackward { .. }, Cmd::Launch(l)) => Some(l.kernel.name.clone()),
            _ => None,
        })
        .collect()
}

/// ||a - b|| / ||b|| (L2); infinite on a NaN.
fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.iter().any(|x| x.is_nan()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-30)).sqrt()
}

// ---- single attention nodes -------------------------------------------------------------------------------------

/// Attention forward and backward as one graph (q, k, v, dout -> o, dq, dk, dv) on both backends; returns the
/// emulated program for inspection.
fn attention_case(dtype: DType, shape: [usize; 4], lk: usize, causal: bool) -> GpuProgram<EmuDevice> {
    let [b, h, lq, d] = shape;
    let what = format!("{dtype} b {b} h {h} lq {lq} lk {lk} d {d} causal {causal}");
    let mut g = Graph::new();
    let q = g.input("q", [b, h, lq, d], dtype);
    let k = g.input("k", [b, h, lk, d], dtype);
    let v = g.input("v", [b, h, lk, d], dtype);
    let dout = g.input("dout", [b, h, lq, d], dtype);
    let scale = F64Bits::new(1.0 / (d as f64).sqrt());
    let o = g.add_node(Op::Attention { scale, causal, lse: false }, &[q, k, v]).unwrap();
    let grads = g.add_node(Op::AttentionBackward { scale, causal, lse: false }, &[q, k, v, dout]).unwrap();
    g.outputs.extend(o.iter().chain(&grads));
    let mut rng = Rng::new(lq as u64 * 31 + d as u64);
    // Scores of a few units, so the softmax is neither flat nor one-hot.
    let inputs: Vec<(ValueId, HostTensor)> = [(q, 2.0), (k, 2.0), (v, 1.0), (dout, 1.0)]
        .into_iter()
        .map(|(id, amp)| {
            let s = g.shape(id).clone();
            let data: Vec<f64> = rng.vec(s.numel()).into_iter().map(|x| amp * x).collect();
            (id, HostTensor::from_f64(s, dtype, &data).unwrap())
        })
        .collect();
    let mut cpu = CpuBackend::new(2).compile(g.clone()).unwrap();
    let mut gpu = flash_backend().compile(g.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    for (id, t) in &inputs {
        cpu.upload(*id, t).unwrap();
        gpu.upload(*id, t).unwrap();
    }
    cpu.launch().unwrap();
    gpu.launch().unwrap_or_else(|e| panic!("{what}: {e}"));
    for (&out, name) in g.outputs.iter().zip(["O", "dQ", "dK", "dV"]) {
        let (want, got) = (cpu.download(out).unwrap().to_f64(), gpu.download(out).unwrap().to_f64());
        let e = rel_l2(&got, &want);
        assert!(e <= 1e-2, "{what}: {name} relative error {e:.3e}");
    }
    gpu
}

#[test]
fn attention_nodes_take_the_flash_kernels_and_match_the_cpu() {
    // d 40 (one block of 64 rows, two heads of two batches), d 128 forward and d 160 above 48 KiB of shared
    // memory, lengths that are not multiples of 64, cross-attention with 77 keys, causal.
    for (dtype, shape, lk, causal) in [
        (DType::BF16, [2, 2, 17, 40], 77, false),
        (DType::F16, [1, 2, 100, 64], 100, true),
        (DType::BF16, [1, 1, 70, 128], 17, false),
        (DType::BF16, [1, 1, 65, 160], 65, true),
    ] {
        let d = shape[3];
        let p = attention_case(dtype, shape, lk, causal);
        let names = kernel_names(&p);
        let sfx = if dtype == DType::BF16 { "bf16" } else { "f16" };
        let want = [
            format!("flash_attn_fwd_{sfx}_d{d}"),
            format!("flash_attn_bwd_delta_{sfx}"),
            format!("flash_attn_bwd_dkdv_{sfx}_d{d}"),
            format!("flash_attn_bwd_dq_{sfx}_d{d}"),
        ];
        for w in &want {
            assert!(names.contains(w), "d {d}: no {w} in {names:?}");
        }
        // The forward node alone runs the forward kernel: the backward reads its O and log-sum-exp (the executor
        // gave both nodes the `lse` form) and recomputes neither. No composite softmax.
        assert_eq!(names.iter().filter(|n| **n == want[0]).count(), 1, "{names:?}");
        let backward = backward_kernel_names(&p);
        assert!(!backward.iter().any(|n| n.starts_with("flash_attn_fwd")), "the backward runs a forward: {backward:?}");
        assert_eq!(backward, want[1..], "d {d}: the backward's launches");
        assert!(!names.iter().any(|n| n.starts_with("attn_softmax")), "{names:?}");
        let g = p.graph();
        assert!(matches!(g.nodes[0].op, Op::Attention { lse: true, .. }), "{:?}", g.nodes[0].op);
        assert!(matches!(g.nodes[1].op, Op::AttentionBackward { lse: true, .. }), "{:?}", g.nodes[1].op);
        // Above 48 KiB (from d 128, forward and backward): the three functions were opted in, once each.
        let opt_ins = p.device().counts().shared_opt_ins;
        let expected = if d >= 128 { 3 } else { 0 };
        assert_eq!(opt_ins, expected, "d {d}: shared memory opt-ins");
    }
}

/// The backward's scratch is delta alone (B·H·Lq floats): O and the log-sum-exp come from the forward, through the
/// graph, where the memory plan keeps them (O from the forward to the backward, the log-sum-exp likewise, B·H·Lq
/// floats). Nothing is L x L.
#[test]
fn flash_scratch_is_linear_in_the_sequence_length() {
    let (bh, l, d) = (2u64, 1000u64, 64u64);
    let mut g = Graph::new();
    let shape = [1, bh as usize, l as usize, d as usize];
    let (q, k, v, dout) = (
        g.input("q", shape, DType::BF16),
        g.input("k", shape, DType::BF16),
        g.input("v", shape, DType::BF16),
        g.input("dout", shape, DType::BF16),
    );
    let scale = F64Bits::new(0.125);
    let o = g.add_node(Op::Attention { scale, causal: false, lse: false }, &[q, k, v]).unwrap();
    let grads = g.add_node(Op::AttentionBackward { scale, causal: false, lse: false }, &[q, k, v, dout]).unwrap();
    g.outputs.extend(o.iter().chain(&grads));
    let flash = lower_graph(&g, true).unwrap();
    let composite = lower_graph(&g, false).unwrap();
    assert!(flash.iter().flatten().all(|c| !matches!(c, Cmd::Gemm(_))), "flash attention needs no GEMM");
    assert!(composite[1].iter().any(|c| matches!(c, Cmd::Gemm(_))));
    let p = flash_backend().compile(g).unwrap();
    let aligned = |bytes: u64| bytes.div_ceil(256) * 256;
    let rows_f32 = aligned(bh * l * 4);
    // The forward writes its log-sum-exp into the graph's value: no scratch. The backward's is delta alone, where
    // it used to also hold a recomputed O and log-sum-exp.
    let scratch = |i: usize| p.plan().scratch[i].map_or(0, |(_, bytes)| bytes as u64);
    assert_eq!(scratch(0), 0, "forward scratch");
    assert_eq!(scratch(1), rows_f32, "backward scratch: delta, B·H·Lq floats");
    let recomputing = aligned(bh * l * d * 2) + 3 * rows_f32;
    assert!(scratch(1) < recomputing, "the backward's scratch shrank: {} vs {recomputing}", scratch(1));
    // The log-sum-exp lives from the forward (node 0) to the backward (node 1), B·H·Lq floats.
    let lse = p.graph().nodes[0].outputs[1];
    let buffer = p.plan().buffers.iter().find(|b| b.what == p.graph().values[lse].name).expect("a buffer for the lse");
    assert_eq!((buffer.bytes as u64, buffer.start, buffer.end), (rows_f32, 0, 1));
    let arena = p.plan().arena_bytes as u64;
    // The four outputs, the log-sum-exp and delta, 256-aligned; the composite path's scores alone would be
    // 2 x 1000 x 1000 x (4 + 2) x 2 bytes.
    let linear = 4 * aligned(bh * l * d * 2) + 2 * rows_f32;
    assert!(arena <= linear, "arena {arena} bytes, expected at most {linear} (no L x L scores)");
}

/// A backward with no forward in the graph to take O and the log-sum-exp from runs on the composite path, and
/// matches the CPU.
#[test]
fn a_backward_without_its_forward_keeps_the_composite_path() {
    let dtype = DType::BF16;
    let mut g = Graph::new();
    let shape = [1, 2, 17, 40];
    let (q, k, v, dout) = (
        g.input("q", shape, dtype),
        g.input("k", shape, dtype),
        g.input("v", shape, dtype),
        g.input("dout", shape, dtype),
    );
    let grads =
        g.add_node(Op::AttentionBackward { scale: F64Bits::new(0.25), causal: true, lse: false }, &[q, k, v, dout]);
    g.outputs.extend(grads.unwrap());
    let mut gpu = flash_backend().compile(g.clone()).unwrap();
    let names = kernel_names(&gpu);
    assert!(names.iter().all(|n| !n.starts_with("flash_")), "{names:?}");
    assert!(names.iter().any(|n| n == "attn_softmax_bwd_bf16"), "{names:?}");
    assert!(matches!(gpu.graph().nodes[0].op, Op::AttentionBackward { lse: false, .. }));
    let mut cpu = CpuBackend::new(2).compile(g.clone()).unwrap();
    let mut rng = Rng::new(7);
    for x in [q, k, v, dout] {
        let t = HostTensor::from_f64(g.shape(x).clone(), dtype, &rng.vec(g.shape(x).numel())).unwrap();
        cpu.upload(x, &t).unwrap();
        gpu.upload(x, &t).unwrap();
    }
    cpu.launch().unwrap();
    gpu.launch().unwrap();
    for &o in &g.outputs {
        let e = rel_l2(&gpu.download(o).unwrap().to_f64(), &cpu.download(o).unwrap().to_f64());
        assert!(e <= 1e-2, "relative error {e:.3e}");
    }
}

/// The `lse` forms off the flash kernels (f32 data; flash off): the composite forward writes the log-sum-exp from its
/// softmax kernel and the composite backward reads dout from its last input; outputs and log-sum-exp match the CPU.
#[test]
fn the_lse_form_on_the_composite_path_matches_the_cpu() {
    for (dtype, backend) in [(DType::F32, flash_backend()), (DType::BF16, GpuBackend::emulated(EmuOptions::default()))]
    {
        let mut g = Graph::new();
        let (q, k, v) =
            (g.input("q", [2, 2, 9, 8], dtype), g.input("k", [2, 2, 13, 8], dtype), g.input("v", [2, 2, 13, 8], dtype));
        let dout = g.input("dout", [2, 2, 9, 8], dtype);
        let scale = F64Bits::new(0.4);
        let fwd = g.add_node(Op::Attention { scale, causal: true, lse: true }, &[q, k, v]).unwrap();
        let bwd = Op::AttentionBackward { scale, causal: true, lse: true };
        let grads = g.add_node(bwd, &[q, k, v, fwd[0], fwd[1], dout]).unwrap();
        g.outputs.extend(fwd.iter().chain(&grads));
        let mut gpu = backend.compile(g.clone()).unwrap();
        let names = kernel_names(&gpu);
        assert!(names.iter().all(|n| !n.starts_with("flash_")), "{dtype}: {names:?}");
        let mut cpu = CpuBackend::new(2).compile(g.clone()).unwrap();
        let mut rng = Rng::new(8);
        for x in [q, k, v, dout] {
            let data: Vec<f64> = rng.vec(g.shape(x).numel()).into_iter().map(|e| 2.0 * e).collect();
            let t = HostTensor::from_f64(g.shape(x).clone(), dtype, &data).unwrap();
            cpu.upload(x, &t).unwrap();
            gpu.upload(x, &t).unwrap();
        }
        cpu.launch().unwrap();
        gpu.launch().unwrap();
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        for (&o, name) in g.outputs.iter().zip(["O", "lse", "dQ", "dK", "dV"]) {
            let e = rel_l2(&gpu.download(o).unwrap().to_f64(), &cpu.download(o).unwrap().to_f64());
            assert!(e <= tol, "{dtype} {name}: relative error {e:.3e}");
        }
    }
}

/// More heads than a grid's y dimension allows are launched in chunks, each with its pointers moved on.
#[test]
fn more_than_65535_heads_launch_in_chunks() {
    let heads = 70_000usize;
    let mut g = Graph::new();
    let shape = [1, heads, 1, 40];
    let (q, k, v) =
        (g.input("q", shape, DType::BF16), g.input("k", shape, DType::BF16), g.input("v", shape, DType::BF16));
    let o = g.add_node(Op::Attention { scale: F64Bits::new(0.5), causal: false, lse: false }, &[q, k, v]).unwrap();
    g.outputs.extend(o);
    let cmds = lower_graph(&g, true).unwrap();
    let launches: Vec<&Launch> =
        cmds[0].iter().filter_map(|c| if let Cmd::Launch(l) = c { Some(l) } else { None }).collect();
    assert_eq!(launches.len(), 2);
    assert_eq!(launches[0].dims.grid, [1, 65535, 1]);
    assert_eq!(launches[1].dims.grid, [1, (heads - 65535) as u32, 1]);
    let ptr = |l: &Launch, i: usize| if let Arg::Ptr(p) = l.args[i] { p.0 } else { panic!("argument {i}") };
    // q (argument 0) of the second chunk starts 65535 heads of 1 x 40 bf16 further on; the log-sum-exp (argument 4)
    // 65535 f32 rows further on.
    assert_eq!(ptr(launches[1], 0) - ptr(launches[0], 0), 65535 * 40 * 2);
    assert_eq!(ptr(launches[1], 4) - ptr(launches[0], 4), 65535 * 4);
}

#[test]
fn f32_and_unsupported_head_dims_keep_the_composite_path() {
    for (dtype, d) in [(DType::F32, 64), (DType::BF16, 24), (DType::F16, 8)] {
        let mut g = Graph::new();
        let shape = [1, 2, 17, d];
        let (q, k, v) = (g.input("q", shape, dtype), g.input("k", shape, dtype), g.input("v", shape, dtype));
        let o = g.add_node(Op::Attention { scale: F64Bits::new(0.5), causal: false, lse: false }, &[q, k, v]).unwrap();
        g.outputs.extend(o);
        let p = flash_backend().compile(g).unwrap();
        let names = kernel_names(&p);
        assert!(names.iter().all(|n| !n.starts_with("flash_")), "{dtype} d {d}: {names:?}");
        assert!(names.iter().any(|n| n.starts_with("attn_softmax_fwd")), "{dtype} d {d}: {names:?}");
    }
}

// ---- the 48 KiB rule ---------------------------------------------------------------------------------------------

/// A launch of the d 128 forward (which needs 52224 bytes of shared memory) with `shared` bytes.
fn launch_fwd_d128(dev: &mut EmuDevice, shared: u32) -> zeroconv::Result<()> {
    let buf = dev.alloc(4096, "q, k, v, o and lse").unwrap();
    let p = |off: u64| Arg::Ptr(DevPtr(buf.0 + off));
    let args = vec![p(0), p(256), p(512), p(768), p(1024), Arg::u64(1), Arg::u64(1), Arg::f32(0.1), Arg::i32(0)];
    let kernel = KernelRef { module: "flash_attention".into(), name: "flash_attn_fwd_bf16_d128".into() };
    let dims = LaunchDims { grid: [1, 1, 1], block: [128, 1, 1], shared_bytes: shared };
    dev.launch(&Launch { kernel, dims, args, any_grid: false })
}

fn device(cc: (u32, u32)) -> EmuDevice {
    let mut dev = EmuDevice::new(EmuOptions { compute_capability: cc, ..EmuOptions::default() });
    let m = zeroconv::kernels::module("flash_attention").expect("the flash module is built");
    dev.load_module(&ModuleSource::Shipped(m)).unwrap();
    dev
}

#[test]
fn launches_above_48_kib_opt_in_once_and_stop_at_the_architecture_limit() {
    let mut dev = device((9, 0));
    launch_fwd_d128(&mut dev, 52224).unwrap();
    launch_fwd_d128(&mut dev, 52224).unwrap();
    assert_eq!(dev.counts().shared_opt_ins, 1, "one opt-in per function");
    launch_fwd_d128(&mut dev, 100_000).unwrap(); // more of the same function: raised again, still one function
    assert_eq!(dev.counts().shared_opt_ins, 1);
    // sm_90 allows 227 KiB; one byte more is refused before anything runs, naming the kernel and the limit.
    let limit = opt_in_limit((9, 0)).unwrap();
    assert_eq!(limit, 227 * 1024);
    launch_fwd_d128(&mut dev, limit).unwrap();
    let err = launch_fwd_d128(&mut dev, limit + 1).unwrap_err().to_string();
    assert!(err.contains("flash_attn_fwd_bf16_d128") && err.contains("232448") && err.contains("sm_90"), "{err}");

    // sm_80 allows 163 KiB.
    let mut dev = device((8, 0));
    let err = launch_fwd_d128(&mut dev, 170_000).unwrap_err().to_string();
    assert!(err.contains("flash_attn_fwd_bf16_d128") && err.contains("166912") && err.contains("sm_80"), "{err}");
    launch_fwd_d128(&mut dev, 166_912).unwrap();
    assert_eq!(dev.info().compute_capability, (8, 0));
}

// ---- a whole training step ---------------------------------------------------------------------------------------

type Step = nets::TrainingStep;

/// The small test net with 40 channels, so its one-head attention has head dim 40 (over 16 positions), in `dtype`,
/// with clipping and AdamW, fused.
fn training_step(dtype: DType) -> Step {
    training_step_checkpointed(dtype, false)
}

fn training_step_checkpointed(dtype: DType, checkpoint: bool) -> Step {
    nets::training_step(&NetSpec { batch: 2, in_ch: 3, ch: 40, hw: 4, blocks: 1, checkpoint, dtype }, true)
}

/// A small rate: AdamW's first steps move each weight by about ±lr whatever its gradient, so a gradient near 0 that
/// rounds to the other sign in bf16 moves that weight the other way; 1e-4 keeps that within bf16's tolerance.
const LR: f64 = 1e-4;

#[test]
fn a_bf16_training_step_with_flash_matches_the_cpu_over_three_steps() {
    let dtype = DType::BF16;
    let s = training_step(dtype);
    let mut gpu = flash_backend().compile(s.graph.clone()).unwrap();
    let names = kernel_names(&gpu);
    for k in [
        "flash_attn_fwd_bf16_d40",
        "flash_attn_bwd_delta_bf16",
        "flash_attn_bwd_dkdv_bf16_d40",
        "flash_attn_bwd_dq_bf16_d40",
    ] {
        assert!(names.iter().any(|n| n == k), "no {k} launch in the step");
    }
    assert!(!names.iter().any(|n| n.starts_with("attn_softmax")), "a composite attention is left: {names:?}");
    // One forward launch per attention forward node; the backward launches none.
    let forwards = gpu.graph().nodes.iter().filter(|n| matches!(n.op, Op::Attention { lse: true, .. })).count();
    assert_eq!(forwards, 1);
    assert_eq!(names.iter().filter(|n| n.starts_with("flash_attn_fwd")).count(), forwards, "{names:?}");
    let backward = backward_kernel_names(&gpu);
    assert!(!backward.is_empty() && !backward.iter().any(|n| n.starts_with("flash_attn_fwd")), "{backward:?}");

    // Node by node on step 1's inputs: the first node that diverges is named.
    let mut cpu = CpuBackend::new(2).compile(s.graph.clone()).unwrap();
    s.upload_init(&mut cpu);
    s.upload_init(&mut gpu);
    s.upload_step_inputs(&mut cpu, 1, LR);
    s.upload_step_inputs(&mut gpu, 1, LR);
    for (i, node) in s.graph.nodes.iter().enumerate() {
        cpu.launch_node(i).unwrap();
        gpu.launch_node(i).unwrap_or_else(|e| panic!("node {i}: {e}"));
        for &o in &node.outputs {
            let e = rel_l2(&gpu.download(o).unwrap().to_f64(), &cpu.download(o).unwrap().to_f64());
            assert!(e <= 5e-2, "node {i} ({}) is the first to diverge: relative error {e:.3e}", node.op.name());
        }
    }

    // Three whole steps on fresh programs: eager, captured and replayed, replayed.
    let mut cpu = CpuBackend::new(2).compile(s.graph.clone()).unwrap();
    let mut gpu = flash_backend().compile(s.graph.clone()).unwrap();
    let want = s.run_steps(&mut cpu, LR, 3);
    let got = s.run_steps(&mut gpu, LR, 3);
    for (t, ((gl, gs), (wl, ws))) in got.iter().zip(&want).enumerate() {
        let e = ((gl - wl) / wl.abs().max(1e-6)).abs();
        assert!(e <= 2e-2, "step {} loss {gl} vs cpu {wl}", t + 1);
        for (i, (a, b)) in gs.iter().zip(ws).enumerate() {
            let e = rel_l2(a, b);
            assert!(e <= 5e-2, "step {}: parameter {i}: relative error {e:.3e}", t + 1);
        }
    }
    assert_eq!(gpu.device().counts().replays, 2, "steps 2 and 3 must be graph replays");
}

/// With activation recomputation the attention is run again in the backward (that is what recomputation is); the
/// backward pairs with that recomputed copy, so the forward's O still dies early, and launches no forward itself.
#[test]
fn a_checkpointed_bf16_step_with_flash_reads_the_recomputed_forward() {
    use zeroconv::graph::Phase;
    let dtype = DType::BF16;
    let s = training_step_checkpointed(dtype, true);
    let mut gpu = flash_backend().compile(s.graph.clone()).unwrap();
    let g = gpu.graph().clone();
    let b = g.nodes.iter().position(|n| matches!(n.op, Op::AttentionBackward { .. })).expect("a backward");
    assert!(matches!(g.nodes[b].op, Op::AttentionBackward { lse: true, .. }), "{:?}", g.nodes[b].op);
    let producer = |i: usize| g.values[g.nodes[b].inputs[i]].producer.expect("o and lse are produced");
    let forward = producer(3).0;
    assert_eq!((producer(3), producer(4)), ((forward, 0), (forward, 1)), "o and lse of one forward");
    assert_eq!(g.nodes[forward].phase, Phase::Backward, "paired with the recomputed attention");
    assert!(matches!(g.nodes[forward].op, Op::Attention { lse: true, .. }));
    // The forward pass's own attention keeps one output: nothing reads a log-sum-exp from it.
    let first = g.nodes.iter().position(|n| matches!(n.op, Op::Attention { .. })).unwrap();
    assert!(first < forward && matches!(g.nodes[first].op, Op::Attention { lse: false, .. }));
    let names = kernel_names(&gpu);
    assert_eq!(names.iter().filter(|n| n.starts_with("flash_attn_fwd")).count(), 2, "forward and recomputation");
    assert!(!backward_kernel_names(&gpu).iter().any(|n| n.starts_with("flash_attn_fwd")));

    let mut cpu = CpuBackend::new(2).compile(s.graph.clone()).unwrap();
    let (want, got) = (s.run_steps(&mut cpu, LR, 1), s.run_steps(&mut gpu, LR, 1));
    let (gl, wl) = (got[0].0, want[0].0);
    assert!(((gl - wl) / wl.abs().max(1e-6)).abs() <= 2e-2, "loss {gl} vs cpu {wl}");
    for (i, (a, b)) in got[0].1.iter().zip(&want[0].1).enumerate() {
        let e = rel_l2(a, b);
        assert!(e <= 5e-2, "parameter {i}: relative error {e:.3e}");
    }
}

#[test]
fn an_f32_training_step_with_flash_on_keeps_the_composite_path() {
    let s = training_step(DType::F32);
    let p = flash_backend().compile(s.graph).unwrap();
    let names = kernel_names(&p);
    assert!(names.iter().all(|n| !n.starts_with("flash_")), "{names:?}");
    assert!(names.iter().any(|n| n == "attn_softmax_fwd_f32") && names.iter().any(|n| n == "attn_softmax_bwd_f32"));
}

// ---- configs -----------------------------------------------------------------------------------------------------

#[test]
fn the_two_use_flash_attention_keys_must_agree() {
    use zeroconv::io::config::load_config;
    let load = |u: &str, c: &str| {
        let o = [
            format!("model.unet_config.use_flash_attention={u}"),
            format!("model.control_stage_config.use_flash_attention={c}"),
        ];
        load_config(None, &o)
    };
    let cfg = load("True", "True").unwrap();
    assert!(zeroconv::app::train::compile_options(&cfg, None).unwrap().flash_attention);
    assert!(!zeroconv::app::train::compile_options(&load("False", "False").unwrap(), None).unwrap().flash_attention);
    for (u, c) in [("True", "False"), ("False", "True")] {
        let err = load(u, c).unwrap_err().to_string();
        assert!(
            err.contains("model.control_stage_config.use_flash_attention")
                && err.contains("model.unet_config.use_flash_attention"),
            "{err}"
        );
    }
    // A config built in code is refused by the same rule when it is compiled.
    let err = zeroconv::app::device::flash_attention(true, false).unwrap_err().to_string();
    assert!(err.contains("model.unet_config.use_flash_attention") && err.contains("model.control_stage_config"));
}

/// `zeroconv profile --device cuda-emu` on the built-in tiny config with use_flash_attention: True lists the flash
/// kernels by name. The run widens the tiny config's attention to 64 channels and one head (head dim 64, self- and cross-attention) in bf16,
/// shrunk as in tests/emulated/device_choice.rs (batch 1, 8x8 latents, one level) to run in seconds under emulation.
#[test]
fn profile_on_cuda_emu_lists_the_flash_kernels() {
    let dir = tempfile::Builder::new().prefix("zeroconv-flash-profile-").tempdir().unwrap();
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.yaml");
    let trace = dir.path().join("trace.json");
    let mut args = vec![
        "profile".to_string(),
        "--config".into(),
        cfg.into(),
        "--steps".into(),
        "1".into(),
        "--top".into(),
        "3".into(),
        "--trace".into(),
        trace.to_str().unwrap().into(),
        "--device".into(),
        "cuda-emu".into(),
        "model.micro_batch_size=1".into(),
        "trainer.precision=bf16".into(),
    ];
    for section in ["unet_config", "control_stage_config"] {
        for kv in [
            "image_size=8",
            "channel_mult=[1]",
            "attention_resolutions=[1]",
            "model_channels=64",
            "num_heads=1",
            "use_flash_attention=True",
        ] {
            args.push(format!("model.{section}.{kv}"));
        }
    }
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_zeroconv"))
        .args(&args)
        .current_dir(dir.path())
        .env_remove("ZEROCONV_DEBUG")
        .env_remove("ZEROCONV_CHECK_FINITE")
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "profile failed:\n{out}\n{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("attention kernels per step: "))
        .unwrap_or_else(|| panic!("no attention kernel line:\n{out}"));
    for k in [
        "flash_attn_fwd_bf16_d64",
        "flash_attn_bwd_delta_bf16",
        "flash_attn_bwd_dkdv_bf16_d64",
        "flash_attn_bwd_dq_bf16_d64",
    ] {
        assert!(line.contains(k), "{k} missing: {line}");
    }
}
