//! Gradient accumulation as a loop: the `AccumulateGrad` op against an f64 reference, an accumulating step equal to
//! one big batch (with clipping and Adam's L2 term, over several optimizer steps, on the CPU and on the CUDA
//! executor under emulation, whose two node ranges are captured and replayed separately), the planned memory of the
//! step that `zeroconv train` compiles independent of the number of micro-batches, and training with accumulation
//! resuming bit for bit.

use crate::common;
use common::nets::{self, NetSpec};
use common::training::{opts, tiny, tmp};
use common::Rng;

use zeroconv::app::step;
use zeroconv::app::train::{self, train, TrainOptions, TrainReport};
use zeroconv::engine::cpu::CpuBackend;
use zeroconv::engine::device::emu::{EmuDevice, EmuOptions};
use zeroconv::engine::gpu::GpuBackend;
use zeroconv::engine::{Backend, HostTensor, Program};
use zeroconv::graph::optim::{
    adamw_hyper, append_accumulating_step, append_training_step_l2, update_start, AdamWConfig, UpdateRule, HYPER_INPUT,
    KEEP_INPUT,
};
use zeroconv::graph::passes::{self, PassOptions};
use zeroconv::graph::{DType, Graph, Op, ValueId};
use zeroconv::models::train_step::TrainPhase;

// ---- the op -------------------------------------------------------------------------------------------------------

/// keep = 0 overwrites (even a NaN), keep = 1 adds; f32 and f64 against sums taken in f64.
#[test]
fn accumulate_grad_overwrites_then_adds() {
    for dtype in [DType::F32, DType::F64] {
        let n = 1000;
        let mut g = Graph::new();
        let acc = g.state("acc", [n], dtype);
        let grad = g.input("grad", [n], dtype);
        let keep = g.input("keep", [1], DType::F32);
        g.add_node(Op::AccumulateGrad, &[acc, grad, keep]).unwrap();
        let mut p = CpuBackend::new(2).compile(g).unwrap();
        p.upload(acc, &HostTensor::from_f64([n], dtype, &vec![f64::NAN; n]).unwrap()).unwrap();
        let mut rng = Rng::new(3);
        let mut want = vec![0.0f64; n];
        for micro in 0..3 {
            let gr = rng.vec(n);
            let rounded = HostTensor::from_f64([n], dtype, &gr).unwrap();
            for (w, x) in want.iter_mut().zip(rounded.to_f64()) {
                *w = if micro == 0 { x } else { *w + x };
            }
            p.upload(grad, &rounded).unwrap();
            p.upload(keep, &HostTensor::from_f64([1], DType::F32, &[micro.min(1) as f64]).unwrap()).unwrap();
            p.launch().unwrap();
        }
        let got = p.download(acc).unwrap().to_f64();
        let tol = if dtype == DType::F32 { 1e-6 } else { 1e-15 };
        common::assert_close(&format!("accumulate_grad {dtype}"), &got, &want, tol);
    }
}

#[test]
fn accumulate_grad_refuses_mismatched_operands() {
    let mut g = Graph::new();
    let acc = g.state("acc", [4], DType::F32);
    let grad = g.input("grad", [5], DType::F32);
    let half = g.input("half", [4], DType::BF16);
    let keep = g.input("keep", [1], DType::F32);
    let keep64 = g.input("keep64", [1], DType::F64);
    let err = |ins: &[ValueId]| g.clone().add_node(Op::AccumulateGrad, ins).unwrap_err().to_string();
    assert!(err(&[acc, grad, keep]).contains("grad"), "{}", err(&[acc, grad, keep]));
    assert!(err(&[acc, half, keep]).contains("bf16"), "{}", err(&[acc, half, keep]));
    assert!(err(&[half, half, keep]).contains("accumulators are f32"), "{}", err(&[half, half, keep]));
    assert!(err(&[acc, acc, keep64]).contains("keep must be f32"), "{}", err(&[acc, acc, keep64]));
    assert!(g.clone().add_node(Op::AccumulateGrad, &[acc, acc, keep]).unwrap().is_empty());
}

// ---- an accumulating step equals one big batch ---------------------------------------------------------------------

const MICRO: usize = 2;
const MICRO_BATCHES: usize = 3;

fn rule(clip: Option<f64>, l2: f64) -> UpdateRule {
    UpdateRule {
        adamw: AdamWConfig { weight_decay: if l2 == 0.0 { 0.01 } else { 0.0 }, ..Default::default() },
        clip,
        l2,
    }
}

struct Built {
    graph: Graph,
    x: ValueId,
    target: ValueId,
    loss: ValueId,
    params: Vec<ValueId>,
    init: Vec<(ValueId, HostTensor)>,
}

/// The test net at batch `batch`, with either the one-graph step (`accumulate` false) or the accumulating one.
fn built(batch: usize, accumulate: bool, r: &UpdateRule, fusion: bool) -> Built {
    let s = NetSpec { batch, in_ch: 3, ch: 8, hw: 4, blocks: 1, checkpoint: false, dtype: DType::F32 };
    let mut net = nets::build(&s);
    let init = nets::init_values(&net.g, &net.params, 5);
    net.g.outputs.push(net.loss);
    if accumulate {
        append_accumulating_step(&mut net.g, net.loss, r, MICRO_BATCHES).unwrap();
    } else {
        append_training_step_l2(&mut net.g, net.loss, &r.adamw, r.clip, r.l2).unwrap();
    }
    let opt = passes::optimize(&net.g, &PassOptions { fusion, ..Default::default() }).unwrap();
    let m = |v: ValueId| opt.map.get(v).unwrap();
    Built {
        x: m(net.x),
        target: m(net.target),
        loss: m(net.loss),
        params: net.params.iter().map(|&v| m(v)).collect(),
        init: init.into_iter().map(|(v, t)| (m(v), t)).collect(),
        graph: opt.graph,
    }
}

/// Step t's data: MICRO × MICRO_BATCHES samples of x and target.
fn step_data(t: u64) -> (Vec<f64>, Vec<f64>) {
    let mut rng = Rng::new(40 + t);
    let n = MICRO * MICRO_BATCHES * 3 * 16;
    (rng.vec(n), rng.vec(n))
}

/// Runs `steps` optimizer steps; returns each step's mean loss and the final parameters.
fn run<P: Program>(p: &mut P, b: &Built, accumulate: bool, steps: u64) -> (Vec<f64>, Vec<Vec<f64>>) {
    for (v, t) in &b.init {
        p.upload(*v, t).unwrap();
    }
    let n = p.graph().nodes.len();
    let update = if accumulate { update_start(p.graph()).unwrap() } else { n };
    let per_micro = MICRO * 3 * 16;
    let mut losses = Vec::new();
    for t in 1..=steps {
        let (x, y) = step_data(t);
        let hyper = HostTensor::from_f64([3], DType::F32, &adamw_hyper(&AdamWConfig::default(), 1e-2, t)).unwrap();
        p.upload_named(HYPER_INPUT, &hyper).unwrap();
        if accumulate {
            let mut sum = 0.0;
            for k in 0..MICRO_BATCHES {
                let part = |d: &[f64]| {
                    HostTensor::from_f64([MICRO, 3, 4, 4], DType::F32, &d[k * per_micro..(k + 1) * per_micro]).unwrap()
                };
                p.upload(b.x, &part(&x)).unwrap();
                p.upload(b.target, &part(&y)).unwrap();
                p.upload_named(KEEP_INPUT, &HostTensor::from_f64([1], DType::F32, &[k.min(1) as f64]).unwrap())
                    .unwrap();
                p.launch_nodes(0..update).unwrap();
                sum += p.download(b.loss).unwrap().to_f64()[0];
            }
            p.launch_nodes(update..n).unwrap();
            losses.push(sum / MICRO_BATCHES as f64);
        } else {
            let shape = [MICRO * MICRO_BATCHES, 3, 4, 4];
            p.upload(b.x, &HostTensor::from_f64(shape, DType::F32, &x).unwrap()).unwrap();
            p.upload(b.target, &HostTensor::from_f64(shape, DType::F32, &y).unwrap()).unwrap();
            p.launch().unwrap();
            losses.push(p.download(b.loss).unwrap().to_f64()[0]);
        }
    }
    (losses, b.params.iter().map(|&v| p.download(v).unwrap().to_f64()).collect())
}

fn assert_same_training(what: &str, (la, pa): &(Vec<f64>, Vec<Vec<f64>>), (lb, pb): &(Vec<f64>, Vec<Vec<f64>>)) {
    common::assert_close(&format!("{what}: losses"), la, lb, 1e-5);
    for (i, (a, b)) in pa.iter().zip(pb).enumerate() {
        // AdamW moves each weight by about ±lr; f32 sums in another order differ by rounding only.
        common::assert_close(&format!("{what}: parameter {i}"), a, b, 1e-4);
    }
}

/// Three optimizer steps of 3 micro-batches of 2 give the losses and weights of three steps of one batch of 6: with
/// AdamW, with clipping that takes effect, and with Adam's L2 term. A step that kept the previous step's gradients
/// (a wrong keep) or dropped a micro-batch would differ from the second step on.
#[test]
fn an_accumulating_step_equals_one_big_batch() {
    for (what, r) in
        [("adamw", rule(None, 0.0)), ("adamw clipped", rule(Some(0.05), 0.0)), ("adam l2", rule(None, 0.1))]
    {
        for fusion in [false, true] {
            let what = format!("{what} fusion={fusion}");
            let big = built(MICRO * MICRO_BATCHES, false, &r, fusion);
            let acc = built(MICRO, true, &r, fusion);
            let want = run(&mut CpuBackend::new(2).compile(big.graph.clone()).unwrap(), &big, false, 3);
            let got = run(&mut CpuBackend::new(2).compile(acc.graph.clone()).unwrap(), &acc, true, 3);
            assert_same_training(&what, &got, &want);
        }
    }
}

/// The CUDA executor runs the two node ranges of an accumulating step, each captured into its own graph after its
/// first launch and replayed from then on, and trains exactly like the CPU.
#[test]
fn the_cuda_executor_captures_and_replays_both_parts() {
    let r = rule(Some(0.05), 0.0);
    let acc = built(MICRO, true, &r, true);
    let want = run(&mut CpuBackend::new(2).compile(acc.graph.clone()).unwrap(), &acc, true, 3);
    let mut gpu = GpuBackend::<EmuDevice>::emulated(EmuOptions::default()).compile(acc.graph.clone()).unwrap();
    let got = run(&mut gpu, &acc, true, 3);
    assert_same_training("cuda-emu", &got, &want);
    // Micro-batch part: 9 launches, the first eager, then captured and replayed 8 times; update: 3, replayed 2.
    assert_eq!(gpu.device().counts().replays, 8 + 2);
}

/// The split is checked: the one-graph step's update reads the gradients the backward computes, so it cannot run
/// apart, and a range outside the program is an error.
#[test]
fn a_step_whose_update_reads_the_backward_cannot_be_split() {
    let r = rule(None, 0.0);
    let big = built(2, false, &r, false);
    let err = update_start(&big.graph).unwrap_err().to_string();
    assert!(err.contains("computed by the micro-batch part"), "{err}");
    let mut p = CpuBackend::new(1).compile(big.graph.clone()).unwrap();
    let n = big.graph.nodes.len();
    let err = p.launch_nodes(0..n + 1).unwrap_err().to_string();
    assert!(err.contains(&format!("of a program of {n} nodes")), "{err}");
}

// ---- the step `zeroconv train` compiles ---------------------------------------------------------------------------

fn accumulating(micro_batches: u32) -> zeroconv::io::config::Config {
    let global = format!("model.global_batch_size={}", 2 * micro_batches);
    tiny(&["model.micro_batch_size=2", "model.base_pretrain_steps=0"], &[global.as_str()])
}

/// Activations cost one micro-batch however many are accumulated: the planned arena of 2 and of 8 micro-batches is
/// the same, and the persistent buffers grow only by the accumulators (one f32 per trainable weight) over a step
/// without accumulation.
#[test]
fn planned_memory_does_not_grow_with_the_micro_batches() {
    let plan = |micro_batches: u32| {
        let cfg = accumulating(micro_batches);
        let models = train::step_models(&cfg).unwrap();
        let st = step::train_step(&cfg, &models, TrainPhase::Control, (64, 64)).unwrap();
        assert_eq!(st.micro_batches, micro_batches as usize);
        let trainable: usize = st.params.iter().filter(|p| p.trainable).map(|p| p.shape.numel()).sum();
        let opt = step::run_passes(&st.graph, &step::pass_options(&cfg, false)).unwrap();
        (CpuBackend::new(1).plan(&opt.graph).unwrap(), trainable)
    };
    let (one, trainable) = plan(1);
    let (two, _) = plan(2);
    let (eight, _) = plan(8);
    assert_eq!(two.arena_bytes, eight.arena_bytes, "the arena grew with the micro-batches");
    assert_eq!(two.source_bytes, eight.source_bytes);
    assert_eq!(two.source_bytes, one.source_bytes + 4 * trainable + 4, "accumulators and the keep input");
    assert!(two.arena_bytes <= one.arena_bytes + one.arena_bytes / 50, "{} vs {}", two.arena_bytes, one.arena_bytes);
}

fn control_losses(r: &TrainReport) -> Vec<(u64, u64)> {
    r.losses.iter().filter(|l| l.0 == "control").map(|l| (l.1, l.2.to_bits())).collect()
}

/// Training with 2 micro-batches per step: the loss is finite, metrics.jsonl counts optimizer steps, and a run
/// stopped after step 2 and resumed to step 4 logs the same losses and exports the same ControlNet as one run.
#[test]
fn training_with_accumulation_resumes_bit_for_bit() {
    let cfg = |steps: u64| {
        let mut c = accumulating(2);
        c.trainer.max_steps = Some(steps);
        c
    };
    let a = tmp("accum-a");
    let full = train(&cfg(4), &opts(a.path())).unwrap();
    assert_eq!(control_losses(&full).len(), 4);
    assert!(full.losses.iter().all(|l| l.2.is_finite()));
    let b = tmp("accum-b");
    let first = train(&cfg(2), &opts(b.path())).unwrap();
    let second = train(&cfg(4), &TrainOptions { resume: true, ..opts(b.path()) }).unwrap();
    let mut resumed = control_losses(&first);
    resumed.extend(control_losses(&second));
    assert_eq!(resumed, control_losses(&full), "losses differ after resuming");
    assert_eq!(
        std::fs::read(a.path().join("controlnet.safetensors")).unwrap(),
        std::fs::read(b.path().join("controlnet.safetensors")).unwrap()
    );
    let m = std::fs::read_to_string(a.path().join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(m.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 4);
}
