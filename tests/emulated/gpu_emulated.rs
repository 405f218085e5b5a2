//! The CUDA executor on the emulated device against the CPU backend: every op (one-node graphs, every float dtype
//! it supports, awkward shapes), then whole training steps (eager, captured, replayed).
//!
//! Each op case is one test body run on both backends (the CPU backend is the reference): the same graph, the same
//! uploaded inputs, every output compared. The emulated device poisons dead arena memory before each node and
//! fails on any byte a node writes outside its outputs and scratch, so a wrong offset, leading dimension or
//! transpose fails at the node that makes it.

use crate::common;

use common::nets::{self, NetSpec};
use common::Rng;
use zeroconv::engine::cpu::CpuBackend;
use zeroconv::engine::device::emu::{EmuDevice, EmuOptions};
use zeroconv::engine::gpu::{GpuBackend, GpuProgram, StepMode};
use zeroconv::engine::{Backend, HostTensor, Program};
use zeroconv::graph::{BinaryOp, DType, F64Bits, Graph, Layout, Op, Shape, UnaryOp, ValueId};

const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// With a library workspace (4 MiB, cuBLAS's recommendation before Hopper; the size does not matter here), which
/// the emulated cuBLAS and cuDNN fill with 0xff at every call: no result may depend on it.
fn emulated() -> GpuBackend<EmuDevice> {
    GpuBackend::emulated(EmuOptions::default()).with_library_workspace(4 << 20)
}

/// Relative tolerance for one output: f32 differs only in summation order; half types by one rounding.
fn tolerance(d: DType) -> f64 {
    match d {
        DType::F32 => 2e-5,
        _ => 2e-2,
    }
}

/// max |a - b| / max(|b|_inf, 1e-6); infinite when either side has a NaN the other lacks.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-6);
    let mut worst = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        if x.is_nan() != y.is_nan() {
            return f64::INFINITY;
        }
        if x != y {
            worst = worst.max((x - y).abs());
        }
    }
    worst / scale
}

/// ||a - b|| / ||b|| (L2); infinite on a NaN.
fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    if a.iter().any(|x| x.is_nan()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-30)).sqrt()
}

/// An input of a case: shape, dtype and values (ids for integer inputs).
struct In {
    shape: Vec<usize>,
    dtype: DType,
    data: Vec<f64>,
}

fn random(shape: &[usize], dtype: DType, rng: &mut Rng) -> In {
    In { shape: shape.to_vec(), dtype, data: rng.vec(shape.iter().product()) }
}

/// Runs `op` on `inputs` on both backends and compares every output.
fn check(what: &str, op: Op, inputs: Vec<In>) {
    let mut g = Graph::new();
    let ids: Vec<ValueId> =
        inputs.iter().enumerate().map(|(i, x)| g.input(&format!("in{i}"), Shape::new(&x.shape), x.dtype)).collect();
    let outs = g.add_node(op, &ids).unwrap_or_else(|e| panic!("{what}: {e}"));
    g.outputs.extend(&outs);
    let tensors: Vec<HostTensor> =
        inputs.iter().map(|x| HostTensor::from_f64(Shape::new(&x.shape), x.dtype, &x.data).unwrap()).collect();
    let mut cpu = CpuBackend::new(2).compile(g.clone()).unwrap();
    let mut gpu = emulated().compile(g.clone()).unwrap_or_else(|e| panic!("{what}: compile: {e}"));
    for (&v, t) in ids.iter().zip(&tensors) {
        cpu.upload(v, t).unwrap();
        gpu.upload(v, t).unwrap();
    }
    cpu.launch().unwrap();
    gpu.launch().unwrap_or_else(|e| panic!("{what}: {e}"));
    for &o in &outs {
        let want = cpu.download(o).unwrap().to_f64();
        let got = gpu.download(o).unwrap().to_f64();
        assert!(got.iter().all(|x| x.is_finite()), "{what}: non-finite output (an element never written?)");
        let e = rel_err(&got, &want);
        let tol = tolerance(g.dtype(o));
        assert!(
            e <= tol,
            "{what}: output {o} relative error {e:.3e} > {tol:.0e}\n got {:?}\nwant {:?}",
            &got[..got.len().min(6)],
            &want[..want.len().min(6)]
        );
    }
}

fn f(x: f64) -> F64Bits {
    F64Bits::new(x)
}

#[test]
fn pointwise_ops() {
    let mut rng = Rng::new(1);
    for d in FLOATS {
        for u in UnaryOp::ALL {
            // log, sqrt and recip are checked on x >= 0.5, inside their domain and away from the pole.
            let positive = matches!(u, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Recip);
            let x_in = |shape: &[usize], rng: &mut Rng| {
                let mut x = random(shape, d, rng);
                if positive {
                    x.data.iter_mut().for_each(|v| *v = v.abs() + 0.5);
                }
                x
            };
            let name = u.name();
            check(&format!("{name} {d}"), Op::Unary(u), vec![x_in(&[3, 37], &mut rng)]);
            let (x, dy) = (x_in(&[1031], &mut rng), random(&[1031], d, &mut rng));
            check(&format!("{name} backward {d}"), Op::UnaryBackward(u), vec![x, dy]);
        }
        for b in BinaryOp::ALL {
            let (x, mut y) = (random(&[2, 3, 5], d, &mut rng), random(&[2, 3, 5], d, &mut rng));
            y.data.iter_mut().for_each(|v| *v = v.signum() * (v.abs() + 0.5));
            check(&format!("{b:?} {d}"), Op::Binary(b), vec![x, y]);
            let (x, mut y) = (random(&[2, 3, 5], d, &mut rng), random(&[3, 1], d, &mut rng));
            y.data.iter_mut().for_each(|v| *v = v.signum() * (v.abs() + 0.5));
            check(&format!("{b:?} broadcast {d}"), Op::Binary(b), vec![x, y]);
        }
        check(&format!("affine {d}"), Op::Affine { alpha: f(-1.5), beta: f(0.25) }, vec![random(&[300], d, &mut rng)]);
        check(&format!("fill {d}"), Op::Fill { value: f(0.75), shape: Shape::new(&[5, 7]), dtype: d }, vec![]);
        for to in FLOATS {
            check(&format!("cast {d} -> {to}"), Op::Cast { to }, vec![random(&[257], d, &mut rng)]);
        }
    }
    check("fill i64", Op::Fill { value: f(3.0), shape: Shape::new(&[9]), dtype: DType::I64 }, vec![]);
}

#[test]
fn matrix_products_every_transpose_and_batch_layout() {
    let mut rng = Rng::new(2);
    for d in [DType::F32, DType::BF16] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (m, k, n) = (5, 7, 3);
            let a_shape = |b: &[usize]| {
                let mut s = b.to_vec();
                s.extend(if ta { [k, m] } else { [m, k] });
                s
            };
            let b_shape = |b: &[usize]| {
                let mut s = b.to_vec();
                s.extend(if tb { [n, k] } else { [k, n] });
                s
            };
            let op = Op::MatMul { trans_a: ta, trans_b: tb };
            for (ba, bb) in [
                (vec![], vec![]),
                (vec![4], vec![4]),
                (vec![2, 3], vec![]),
                (vec![], vec![3]),
                (vec![2, 2], vec![2, 2]),
            ] {
                let what = format!("matmul ta={ta} tb={tb} batch {ba:?}x{bb:?} {d}");
                check(&what, op.clone(), vec![random(&a_shape(&ba), d, &mut rng), random(&b_shape(&bb), d, &mut rng)]);
            }
        }
    }
}

#[test]
fn convolutions_forward_and_backward() {
    let mut rng = Rng::new(3);
    for d in [DType::F32, DType::BF16] {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            for (k, stride, pad, hw) in [(3, 1, 1, 7), (3, 2, 1, 8), (1, 1, 0, 5), (3, 1, 0, 6), (3, 2, 1, 7)] {
                let (n, c, o) = (2, 3, 4);
                let x = layout.shape([n, c, hw, hw]).0;
                let w = layout.shape([o, c, k, k]).0;
                let ho = (hw + 2 * pad - k) / stride + 1;
                let dy = layout.shape([n, o, ho, ho]).0;
                let what = format!("conv k{k} s{stride} p{pad} {hw}x{hw} {layout:?} {d}");
                let op = Op::Conv2d { stride, padding: pad, layout };
                check(&what, op.clone(), vec![random(&x, d, &mut rng), random(&w, d, &mut rng)]);
                check(
                    &format!("{what} bias"),
                    op,
                    vec![random(&x, d, &mut rng), random(&w, d, &mut rng), random(&[o], d, &mut rng)],
                );
                let bi = Op::Conv2dBackwardInput { stride, padding: pad, h: hw, w: hw, layout };
                check(&format!("{what} backward input"), bi, vec![random(&dy, d, &mut rng), random(&w, d, &mut rng)]);
                let bw = Op::Conv2dBackwardWeight { stride, padding: pad, kh: k, kw: k, layout };
                check(&format!("{what} backward weight"), bw, vec![random(&x, d, &mut rng), random(&dy, d, &mut rng)]);
            }
        }
    }
}

#[test]
fn normalisations_and_softmax() {
    let mut rng = Rng::new(4);
    for d in FLOATS {
        // Planar [2, 4, 3, 5] and channels last [2, 3, 5, 4]: the same sizes, the channels on axis 1 or last.
        for (layout, x) in [(Layout::Nchw, [2, 4, 3, 5]), (Layout::Nhwc, [2, 3, 5, 4])] {
            let gn = Op::GroupNorm { groups: 2, eps: f(1e-5), layout };
            check(
                &format!("groupnorm {layout:?} {d}"),
                gn,
                vec![random(&x, d, &mut rng), random(&[4], d, &mut rng), random(&[4], d, &mut rng)],
            );
            let gnb = Op::GroupNormBackward { groups: 2, eps: f(1e-5), layout };
            check(
                &format!("groupnorm backward {layout:?} {d}"),
                gnb,
                vec![random(&x, d, &mut rng), random(&[4], d, &mut rng), random(&x, d, &mut rng)],
            );
        }
        let ln = Op::LayerNorm { eps: f(1e-5) };
        check(
            &format!("layernorm {d}"),
            ln,
            vec![random(&[3, 70, 33], d, &mut rng), random(&[33], d, &mut rng), random(&[33], d, &mut rng)],
        );
        let lnb = Op::LayerNormBackward { eps: f(1e-5) };
        check(
            &format!("layernorm backward {d}"),
            lnb,
            vec![random(&[3, 70, 33], d, &mut rng), random(&[33], d, &mut rng), random(&[3, 70, 33], d, &mut rng)],
        );
        check(&format!("softmax {d}"), Op::Softmax, vec![random(&[13, 37], d, &mut rng)]);
        check(
            &format!("softmax backward {d}"),
            Op::SoftmaxBackward,
            vec![random(&[13, 37], d, &mut rng), random(&[13, 37], d, &mut rng)],
        );
    }
}

#[test]
fn attention_forward_and_backward() {
    let mut rng = Rng::new(5);
    for d in [DType::F32, DType::BF16] {
        for (lq, lk, causal) in [(6, 6, false), (6, 6, true), (5, 9, false)] {
            let (b, h, hd, dv) = (2, 3, 4, 5);
            let q = [b, h, lq, hd];
            let k = [b, h, lk, hd];
            let v = [b, h, lk, dv];
            let what = format!("attention lq{lq} lk{lk} causal={causal} {d}");
            let op = Op::Attention { scale: f(0.5), causal, lse: false };
            check(&what, op, vec![random(&q, d, &mut rng), random(&k, d, &mut rng), random(&v, d, &mut rng)]);
            let op = Op::AttentionBackward { scale: f(0.5), causal, lse: false };
            let ins = vec![
                random(&q, d, &mut rng),
                random(&k, d, &mut rng),
                random(&v, d, &mut rng),
                random(&[b, h, lq, dv], d, &mut rng),
            ];
            check(&format!("{what} backward"), op, ins);
        }
    }
}

#[test]
fn data_movement_and_reductions() {
    let mut rng = Rng::new(6);
    for d in FLOATS {
        check(&format!("upsample {d}"), Op::Upsample2x, vec![random(&[2, 3, 3, 5], d, &mut rng)]);
        check(&format!("upsample backward {d}"), Op::Upsample2xBackward, vec![random(&[2, 3, 6, 10], d, &mut rng)]);
        for axis in 0..3 {
            let mut s2 = vec![2, 3, 4];
            s2[axis] = 5;
            check(
                &format!("concat axis {axis} {d}"),
                Op::Concat { axis },
                vec![random(&[2, 3, 4], d, &mut rng), random(&s2, d, &mut rng)],
            );
            let full = [4, 6, 5][axis];
            let mut s = vec![4, 6, 5];
            check(
                &format!("slice axis {axis} {d}"),
                Op::Slice { axis, start: 1, end: 3 },
                vec![random(&s, d, &mut rng)],
            );
            s[axis] = 2;
            check(
                &format!("slice backward axis {axis} {d}"),
                Op::SliceBackward { axis, start: 1, full },
                vec![random(&s, d, &mut rng)],
            );
        }
        for perm in [vec![1, 0], vec![0, 2, 1], vec![2, 0, 3, 1]] {
            let shape: Vec<usize> = [3, 5, 2, 4][..perm.len()].to_vec();
            check(&format!("permute {perm:?} {d}"), Op::Permute { perm }, vec![random(&shape, d, &mut rng)]);
        }
        check(
            &format!("broadcast {d}"),
            Op::BroadcastTo { shape: Shape::new(&[2, 3, 4]) },
            vec![random(&[3, 1], d, &mut rng)],
        );
        for (shape, axes) in [
            (vec![4, 6, 5], vec![0]),
            (vec![4, 6, 5], vec![2]),
            (vec![4, 6, 5], vec![1]),
            (vec![4, 6, 5], vec![0, 2]),
            (vec![2, 3, 4, 5], vec![0, 2, 3]),
            (vec![4, 6, 5], vec![0, 1, 2]),
        ] {
            let what = format!("sum {shape:?} over {axes:?} {d}");
            check(&what, Op::ReduceSum { axes, keepdim: false }, vec![random(&shape, d, &mut rng)]);
        }
        check(&format!("sum_to {d}"), Op::SumTo { shape: Shape::new(&[3, 1]) }, vec![random(&[2, 3, 4], d, &mut rng)]);
        check(&format!("mse {d}"), Op::MseLoss, vec![random(&[3, 77], d, &mut rng), random(&[3, 77], d, &mut rng)]);
        let ins = vec![random(&[3, 77], d, &mut rng), random(&[3, 77], d, &mut rng), random(&[], d, &mut rng)];
        check(&format!("mse backward {d}"), Op::MseLossBackward, ins);
    }
}

#[test]
fn embeddings_and_timesteps() {
    let mut rng = Rng::new(7);
    for d in FLOATS {
        for ids in [DType::I32, DType::I64] {
            let table = random(&[11, 6], d, &mut rng);
            let idv = In { shape: vec![2, 5], dtype: ids, data: vec![0., 10., 3., 3., 7., 1., 2., 10., 0., 5.] };
            check(&format!("embedding {d} {ids}"), Op::Embedding, vec![table, idv]);
            let idv = In { shape: vec![2, 5], dtype: ids, data: vec![0., 10., 3., 3., 7., 1., 2., 10., 0., 5.] };
            check(
                &format!("embedding backward {d} {ids}"),
                Op::EmbeddingBackward { vocab: 11 },
                vec![idv, random(&[2, 5, 6], d, &mut rng)],
            );
        }
    }
    for t in [DType::I64, DType::F32] {
        let tv = In { shape: vec![3], dtype: t, data: vec![0., 17., 999.] };
        check(&format!("timestep embedding {t}"), Op::TimestepEmbedding { dim: 10, max_period: f(10000.0) }, vec![tv]);
    }
}

#[test]
fn an_out_of_range_id_is_an_error_after_the_step() {
    let mut g = Graph::new();
    let table = g.input("table", [4, 3], DType::F32);
    let ids = g.input("ids", [2], DType::I64);
    let out = g.op1(Op::Embedding, &[table, ids]).unwrap();
    g.outputs.push(out);
    let mut p = emulated().compile(g).unwrap();
    p.upload(table, &HostTensor::zeros([4, 3], DType::F32)).unwrap();
    p.upload(ids, &HostTensor::from_i64([2], &[1, 4]).unwrap()).unwrap();
    let err = p.launch().unwrap_err().to_string();
    assert!(err.contains("ids") && err.contains("out of range"), "{err}");
}

#[test]
fn f64_graphs_are_refused_naming_the_node() {
    let mut g = Graph::new();
    let x = g.input("x", [3], DType::F64);
    let y = g.unary(UnaryOp::Exp, x).unwrap();
    g.outputs.push(y);
    let err = emulated().compile(g).err().expect("f64 must be refused").to_string();
    assert!(err.contains("node 0") && err.contains("exp") && err.contains("f64"), "{err}");
}

// ---- whole training steps ---------------------------------------------------------------------------------------

type Step = nets::TrainingStep;

/// conv + GroupNorm + attention + residual + MSE + clipping + AdamW, optimised.
fn training_step(dtype: DType, fusion: bool, checkpoint: bool) -> Step {
    nets::training_step(&NetSpec { batch: 2, in_ch: 3, ch: 8, hw: 4, blocks: 2, checkpoint, dtype }, fusion)
}

/// bf16: a small rate, so the first steps (which move each weight by about ±lr whatever its gradient) keep the weights
/// within bf16's tolerance of the CPU's; f32 checks the update itself at full size.
fn lr(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-2
    } else {
        1e-4
    }
}

fn run_steps<P: Program>(p: &mut P, s: &Step, dtype: DType, steps: u64) -> Vec<(f64, Vec<Vec<f64>>)> {
    s.upload_init(p);
    let moments: Vec<ValueId> = s
        .params
        .iter()
        .flat_map(|&v| {
            let name = &p.graph().values[v].name;
            [p.graph().find(&format!("{name}.adam_m")), p.graph().find(&format!("{name}.adam_v"))]
        })
        .flatten()
        .collect();
    let mut out = Vec::new();
    for t in 1..=steps {
        s.upload_step_inputs(p, t, lr(dtype));
        p.launch().unwrap_or_else(|e| panic!("step {t}: {e}"));
        let loss = p.download(s.loss).unwrap().to_f64()[0];
        let state = s.params.iter().chain(&moments).map(|&v| p.download(v).unwrap().to_f64()).collect();
        out.push((loss, state));
    }
    out
}

fn compare_with_cpu(dtype: DType, fusion: bool, checkpoint: bool) {
    let what = format!("{dtype} fusion={fusion} checkpoint={checkpoint}");
    let s = training_step(dtype, fusion, checkpoint);
    if fusion {
        // Convolution epilogues lower as the library call, then the generated epilogue: make sure some are here.
        let products = s.graph.nodes.iter().filter(|n| matches!(&n.op, Op::Fused(k) if k.anchor.is_product())).count();
        assert!(products > 0, "{what}: no convolution- or product-anchored kernel in the fused step");
    }
    let mut cpu = CpuBackend::new(2).compile(s.graph.clone()).unwrap();
    let mut gpu = emulated().compile(s.graph.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let want = run_steps(&mut cpu, &s, dtype, 3);
    let got = run_steps(&mut gpu, &s, dtype, 3);
    let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
    for (t, ((gl, gs), (wl, ws))) in got.iter().zip(&want).enumerate() {
        let e = ((gl - wl) / wl.abs().max(1e-6)).abs();
        assert!(e <= tol, "{what}: step {} loss {gl} vs cpu {wl}", t + 1);
        for (i, (a, b)) in gs.iter().zip(ws).enumerate() {
            // f32: elementwise. bf16: relative L2, since AdamW's first steps move each weight by about ±lr
            // whatever the gradient's size, so a gradient near zero that rounds to the other sign moves one weight
            // the other way.
            // The second moments hold squared gradients, which doubles the gradients' relative error: bf16
            // state gets 5e-2.
            let (e, tol) = if dtype == DType::F32 { (rel_err(a, b), 1e-4) } else { (rel_l2(a, b), 5e-2) };
            assert!(e <= tol, "{what}: step {} state tensor {i}: relative error {e:.3e}", t + 1);
        }
    }
    let counts = gpu.device().counts();
    assert_eq!(counts.replays, 2, "{what}: steps 2 and 3 must be graph replays");
}

#[test]
fn training_steps_match_the_cpu_f32() {
    compare_with_cpu(DType::F32, false, false);
    compare_with_cpu(DType::F32, true, false);
    compare_with_cpu(DType::F32, true, true);
}

#[test]
fn training_steps_match_the_cpu_bf16() {
    compare_with_cpu(DType::BF16, true, false);
    compare_with_cpu(DType::BF16, false, true);
}

/// A replayed graph computes exactly what eager execution computes.
#[test]
fn replay_equals_eager_bit_for_bit() {
    let s = training_step(DType::F32, true, false);
    let eager_backend = GpuBackend::new(|| Ok(EmuDevice::new(EmuOptions::default())), StepMode::Eager);
    let mut eager: GpuProgram<EmuDevice> = eager_backend.compile(s.graph.clone()).unwrap();
    let mut replayed = emulated().compile(s.graph.clone()).unwrap();
    let a = run_steps(&mut eager, &s, DType::F32, 3);
    let b = run_steps(&mut replayed, &s, DType::F32, 3);
    for (t, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.0.to_bits(), y.0.to_bits(), "step {} loss", t + 1);
        assert!(x.1 == y.1, "step {}: parameters or moments differ", t + 1);
    }
    assert_eq!(eager.device().counts().replays, 0);
    assert_eq!(replayed.device().counts().replays, 2);
}

/// Node by node: both backends run node i on what they computed so far, and every output of node i must agree;
/// the first node that diverges is named.
fn lockstep(dtype: DType, fusion: bool, checkpoint: bool) {
    let what = format!("{dtype} fusion={fusion} checkpoint={checkpoint}");
    let s = training_step(dtype, fusion, checkpoint);
    let mut cpu = CpuBackend::new(2).compile(s.graph.clone()).unwrap();
    let mut gpu = emulated().compile(s.graph.clone()).unwrap();
    s.upload_init(&mut cpu);
    s.upload_init(&mut gpu);
    s.upload_step_inputs(&mut cpu, 1, lr(dtype));
    s.upload_step_inputs(&mut gpu, 1, lr(dtype));
    let tol = if dtype == DType::F32 { 1e-4 } else { 5e-2 };
    for (i, node) in s.graph.nodes.iter().enumerate() {
        cpu.launch_node(i).unwrap();
        gpu.launch_node(i).unwrap_or_else(|e| panic!("{what}: {e}"));
        for &o in &node.outputs {
            let (want, got) = (cpu.download(o).unwrap().to_f64(), gpu.download(o).unwrap().to_f64());
            let e = rel_l2(&got, &want);
            assert!(
                e <= tol,
                "{what}: node {i} ({} {}) is the first to diverge: output {} relative error {e:.3e}",
                node.op.name(),
                node.op.attrs(),
                s.graph.values[o].name
            );
        }
    }
}

#[test]
fn lockstep_with_the_cpu_names_no_divergent_node() {
    lockstep(DType::F32, false, false);
    lockstep(DType::F32, true, true);
    lockstep(DType::BF16, true, false);
}

// ---- the emulated device's own checks ------------------------------------------------------------------------

use zeroconv::engine::device::{
    Arg, DevPtr, Device, KernelRef, Launch, LaunchDims, ModuleSource, NodeAccess, Span, Stream,
};

fn fill(ptr: DevPtr, n: u64, value: f32) -> Launch {
    Launch {
        kernel: KernelRef { module: "unary".into(), name: "fill_f32".into() },
        dims: LaunchDims::linear(1, 64),
        args: vec![Arg::Ptr(ptr), Arg::u64(n), Arg::f32(value)],
        any_grid: true,
    }
}

/// A compute-stream node that declares no reads or writes (the liveness tests need none).
fn node_access(what: &str) -> NodeAccess<'_> {
    NodeAccess { what, stream: Stream::Compute, reads: &[], writes: &[] }
}

fn device_with_unary() -> EmuDevice {
    let mut d = EmuDevice::new(EmuOptions::default());
    d.load_module(&ModuleSource::Shipped(zeroconv::kernels::module("unary").unwrap())).unwrap();
    d
}

#[test]
fn a_write_outside_the_declared_outputs_is_caught_at_its_node() {
    let mut d = device_with_unary();
    let arena = d.alloc(1024, "arena").unwrap();
    let all = Span::new(arena, 1024);
    d.before_command(all, &[], &node_access("node")).unwrap();
    d.launch(&fill(arena, 64, 1.0)).unwrap(); // writes 256 bytes
    let err = d.after_command("node 7 (fill)", &[Span::new(arena, 128)]).unwrap_err().to_string();
    assert!(err.contains("node 7 (fill)") && err.contains("byte 128") && err.contains("arena"), "{err}");
    // Declared in full, the same write passes.
    d.before_command(all, &[], &node_access("node")).unwrap();
    d.launch(&fill(arena, 64, 1.0)).unwrap();
    d.after_command("node 8 (fill)", &[Span::new(arena, 256)]).unwrap();
}

#[test]
fn dead_memory_reads_as_nan_and_live_memory_is_kept() {
    let mut d = device_with_unary();
    let arena = d.alloc(512, "arena").unwrap();
    d.upload(arena, &[0u8; 512]).unwrap();
    // Bytes 0..256 live, 256..512 dead: the dead half is poisoned with 0xff before the node runs.
    d.before_command(Span::new(arena, 512), &[Span::new(arena, 256)], &node_access("node 0")).unwrap();
    d.after_command("node 0", &[]).unwrap();
    let mut back = vec![0u8; 512];
    d.download(&mut back, arena).unwrap();
    assert!(back[..256].iter().all(|&b| b == 0) && back[256..].iter().all(|&b| b == 0xff));
}

#[test]
fn capture_records_replay_runs_and_illegal_calls_are_errors() {
    let mut d = device_with_unary();
    let buf = d.alloc(256, "buf").unwrap();
    d.begin_capture().unwrap();
    d.launch(&fill(buf, 64, 2.5)).unwrap();
    for (what, err) in [
        ("alloc", d.alloc(16, "x").map(|_| ()).unwrap_err()),
        ("upload", d.upload(buf, &[0; 4]).unwrap_err()),
        ("download", d.download(&mut [0; 4], buf).unwrap_err()),
        ("synchronize", d.synchronize().unwrap_err()),
    ] {
        assert!(err.to_string().contains("while capturing"), "{what}: {err}");
    }
    let g = d.end_capture().unwrap();
    let mut back = [0u8; 4];
    d.download(&mut back, buf).unwrap();
    assert_eq!(back, [0xff; 4], "capturing must not run the launch");
    d.replay(g).unwrap();
    d.download(&mut back, buf).unwrap();
    assert_eq!(f32::from_le_bytes(back), 2.5);
    assert_eq!(d.counts().replays, 1);
}

/// With the per-kernel check compiled in, the step fails naming the first node whose output is not finite.
#[test]
fn the_finite_check_names_the_first_node_with_a_nan() {
    let mut g = Graph::new();
    let x = g.input("x", [4], DType::F32);
    let a = g.unary(UnaryOp::Exp, x).unwrap();
    let l = g.unary(UnaryOp::Log, x).unwrap();
    let s = g.add(a, l).unwrap();
    g.outputs.push(s);
    let mut p = emulated().with_check_finite(true).compile(g).unwrap();
    assert!(p.checks_finite());
    p.upload(x, &HostTensor::from_f64([4], DType::F32, &[1.0, 2.0, 3.0, 4.0]).unwrap()).unwrap();
    p.launch().unwrap();
    p.launch().unwrap(); // the captured step (the flag is reset inside it)
    p.upload(x, &HostTensor::from_f64([4], DType::F32, &[1.0, 2.0, -1.0, 4.0]).unwrap()).unwrap();
    let err = p.launch().unwrap_err().to_string();
    assert!(err.contains("node 1 (log)"), "{err}");
}

/// Attention over chunks of (batch, head) pairs: a budget that fits one pair's scores at a time gives the same
/// result as one chunk, forward and backward.
#[test]
fn attention_in_chunks_equals_one_chunk() {
    let mut rng = Rng::new(9);
    let (b, h, lq, lk, hd) = (2, 3, 5, 7, 4);
    let ins: Vec<In> = vec![
        random(&[b, h, lq, hd], DType::F32, &mut rng),
        random(&[b, h, lk, hd], DType::F32, &mut rng),
        random(&[b, h, lk, hd], DType::F32, &mut rng),
        random(&[b, h, lq, hd], DType::F32, &mut rng),
    ];
    let mut g = Graph::new();
    let ids: Vec<ValueId> =
        ins.iter().enumerate().map(|(i, x)| g.input(&format!("in{i}"), Shape::new(&x.shape), x.dtype)).collect();
    let o = g.op1(Op::Attention { scale: f(0.5), causal: true, lse: false }, &ids[..3]).unwrap();
    let grads = g.add_node(Op::AttentionBackward { scale: f(0.5), causal: true, lse: false }, &ids).unwrap();
    g.outputs.push(o);
    g.outputs.extend(&grads);
    let per_pair = (lq * lk * 2 * (4 + 4)) as u64; // the backward's S, P, dP, dS of one (batch, head) pair
    let chunked = emulated().with_attention_budget(per_pair);
    let lowered = chunked.compile(g.clone()).unwrap();
    let gemms = lowered.all_commands().filter(|(_, c)| c.kind() == "gemm").count();
    // The backward (S, P, dP, dS) fits one pair per chunk: 6 chunks of 5 GEMMs; the forward (S, P) two pairs: 3
    // chunks of 2 GEMMs.
    assert_eq!(gemms, 6 * 5 + 3 * 2, "chunks of (batch, head) pairs within the budget");
    let mut outs = Vec::new();
    for backend in [emulated(), chunked] {
        let mut p = backend.compile(g.clone()).unwrap();
        for (&v, x) in ids.iter().zip(&ins) {
            p.upload(v, &HostTensor::from_f64(Shape::new(&x.shape), x.dtype, &x.data).unwrap()).unwrap();
        }
        p.launch().unwrap();
        outs.push(g.outputs.iter().map(|&v| p.download(v).unwrap().to_f64()).collect::<Vec<_>>());
    }
    assert_eq!(outs[0], outs[1], "chunking changes no bit");
}

/// `zeroconv profile` and `ZEROCONV_DEBUG=2` on the CUDA executor time each node between two stream marks (CUDA
/// events on a GPU, where launches return before the kernels run), read once the step has finished: every node of
/// a profiled step is timed once per step, in node order on the trace, and the device's marks refuse capture and
/// out-of-order or unknown spans.
#[test]
fn profiling_times_every_node_between_stream_marks() {
    let mut g = Graph::new();
    let x = g.input("x", [64, 64], DType::F32);
    let y = g.op1(Op::Unary(UnaryOp::Silu), &[x]).unwrap();
    let z = g.op1(Op::Binary(BinaryOp::Mul), &[y, x]).unwrap();
    g.outputs.push(z);
    let mut p = emulated().compile(g).unwrap();
    p.upload(x, &HostTensor::zeros([64, 64], DType::F32)).unwrap();
    p.set_profiling(true, false);
    for _ in 0..2 {
        p.launch().unwrap();
    }
    let profile = p.profile().expect("profiling is on");
    assert_eq!(profile.steps, 2);
    let timed: Vec<_> = profile.kernels.iter().filter(|k| k.launches > 0).collect();
    assert_eq!(timed.len(), p.graph().nodes.len(), "every node is timed");
    assert!(timed.iter().all(|k| k.launches == 2 && !k.total.is_zero()), "{timed:?}");
    let starts: Vec<_> = profile.events.iter().filter(|e| e.step == 0).map(|e| (e.node, e.start)).collect();
    assert!(starts.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{starts:?}");

    let mut dev = EmuDevice::new(EmuOptions::default());
    let (a, b) = (dev.mark().unwrap(), dev.mark().unwrap());
    assert!(dev.elapsed(a, b).is_ok());
    assert!(dev.elapsed(b, a).is_err(), "a span must run forwards");
    assert!(dev.elapsed(a, zeroconv::engine::device::Mark(7)).is_err(), "an unknown mark is an error");
    dev.release_marks();
    assert!(dev.elapsed(a, b).is_err(), "released marks are gone");
    dev.begin_capture().unwrap();
    assert!(dev.mark().unwrap_err().to_string().contains("capturing"));
}
