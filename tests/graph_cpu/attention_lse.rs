//! Attention's log-sum-exp carried in the graph (`Op::Attention { lse: true }` and the backward's `lse` form, which
//! reads the forward's O and log-sum-exp) on the CPU backend: the same bits as the plain form for O and every
//! gradient; the rewrite that chooses the form per node (graph::passes::attention_lse: pairing, ids kept, nodes it
//! must leave alone); the memory plan keeping the log-sum-exp from the forward to the backward; activation
//! recomputation of the two-output forward; and the errors for what the form does not allow. The op's forward and
//! gradient checks against f64 and finite differences are in tests/graph_cpu/ops.rs (`attention_with_lse`).

use crate::common;

use common::nets::{self, NetSpec};
use common::Rng;
use zeroconv::engine::cpu::CpuBackend;
use zeroconv::engine::{Backend, HostTensor, Program};
use zeroconv::graph::autodiff::backward;
use zeroconv::graph::optim::{adamw_hyper, AdamWConfig, HYPER_INPUT};
use zeroconv::graph::passes::attention_lse::carry_attention_lse;
use zeroconv::graph::passes::{self, PassOptions};
use zeroconv::graph::{DType, F64Bits, Graph, NodeId, Op, Phase, Shape, ValueId};

const ALWAYS: &dyn Fn(&Graph, NodeId) -> bool = &|_, _| true;

/// q [2, 2, 70, 8] (more rows than one CPU attention block), k and v [2, 2, 19, 8], trainable, and a loss
/// Σ o ⊙ r; `lse` builds the forward with its log-sum-exp output. Returns the graph (outputs: loss, o, dq, dk, dv)
/// and its sources.
fn attention_step(dtype: DType, lse: bool, causal: bool) -> (Graph, Vec<ValueId>) {
    let mut g = Graph::new();
    let q = g.param("q", [2, 2, 70, 8], dtype, true);
    let k = g.param("k", [2, 2, 19, 8], dtype, true);
    let v = g.param("v", [2, 2, 19, 8], dtype, true);
    let r = g.input("r", [2, 2, 70, 8], dtype);
    let o = if lse {
        g.attention_with_lse(q, k, v, 0.35, causal).unwrap().0
    } else {
        g.attention(q, k, v, 0.35, causal).unwrap()
    };
    let prod = g.mul(o, r).unwrap();
    let loss = g.sum(prod, &[0, 1, 2, 3], false).unwrap();
    let grads = backward(&mut g, loss, &[q, k, v]).unwrap();
    g.outputs = vec![loss, o, grads[&q], grads[&k], grads[&v]];
    (g, vec![q, k, v, r])
}

/// The sources' values: scores of a few units, so the softmax is neither flat nor one-hot.
fn sources(g: &Graph, ids: &[ValueId], dtype: DType) -> Vec<(ValueId, HostTensor)> {
    let mut rng = Rng::new(41);
    ids.iter()
        .map(|&v| {
            let data: Vec<f64> = rng.vec(g.shape(v).numel()).into_iter().map(|x| 2.0 * x).collect();
            (v, HostTensor::from_f64(g.shape(v).clone(), dtype, &data).unwrap())
        })
        .collect()
}

/// The graph's outputs on the CPU backend, as bytes.
fn outputs(g: &Graph, inputs: &[(ValueId, HostTensor)]) -> Vec<Vec<u8>> {
    common::run(g.clone(), inputs, &g.outputs).into_iter().map(|t| t.bytes).collect()
}

#[test]
fn the_lse_form_gives_the_same_bits_as_the_plain_form() {
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        for causal in [false, true] {
            let (plain, ids) = attention_step(dtype, false, causal);
            let (with_lse, _) = attention_step(dtype, true, causal);
            let b = with_lse.nodes.iter().find(|n| matches!(n.op, Op::AttentionBackward { .. })).unwrap();
            assert!(matches!(b.op, Op::AttentionBackward { lse: true, .. }), "autodiff emits the lse form");
            assert_eq!(b.inputs.len(), 6);
            let inputs = sources(&plain, &ids, dtype);
            let (a, b) = (outputs(&plain, &inputs), outputs(&with_lse, &inputs));
            for (name, (x, y)) in ["loss", "o", "dq", "dk", "dv"].iter().zip(a.iter().zip(&b)) {
                assert!(x == y, "{dtype} causal={causal}: {name} differs between the two forms");
            }
        }
    }
}

#[test]
fn the_rewrite_pairs_each_backward_with_its_forward_and_keeps_every_id() {
    let (g, ids) = attention_step(DType::F32, false, true);
    let (out, rewritten) = carry_attention_lse(&g, ALWAYS).unwrap();
    assert_eq!(rewritten, 1);
    assert_eq!(out.nodes.len(), g.nodes.len(), "no node added or removed");
    assert_eq!(out.values.len(), g.values.len() + 1, "one value added: the log-sum-exp");
    for (a, b) in g.values.iter().zip(&out.values) {
        assert_eq!((&a.name, &a.shape, a.dtype, a.producer), (&b.name, &b.shape, b.dtype, b.producer));
    }
    assert_eq!(out.outputs, g.outputs);
    let f = g.nodes.iter().position(|n| matches!(n.op, Op::Attention { .. })).unwrap();
    let b = g.nodes.iter().position(|n| matches!(n.op, Op::AttentionBackward { .. })).unwrap();
    let lse = g.values.len();
    assert_eq!(out.nodes[f].op, Op::Attention { scale: F64Bits::new(0.35), causal: true, lse: true });
    assert_eq!(out.nodes[f].outputs, vec![g.nodes[f].outputs[0], lse]);
    assert_eq!((out.shape(lse), out.dtype(lse)), (&Shape(vec![2, 2, 70]), DType::F32));
    assert_eq!(out.values[lse].producer, Some((f, 1)));
    let old = &g.nodes[b].inputs;
    assert_eq!(out.nodes[b].inputs, vec![old[0], old[1], old[2], g.nodes[f].outputs[0], lse, old[3]]);
    assert!(matches!(out.nodes[b].op, Op::AttentionBackward { lse: true, .. }));
    for (i, (x, y)) in g.nodes.iter().zip(&out.nodes).enumerate() {
        if i != f && i != b {
            assert!(x.op == y.op && x.inputs == y.inputs && x.outputs == y.outputs, "node {i} changed");
        }
    }
    // The CPU backend runs the rewritten graph to the same bits, addressed by the same ids.
    let inputs = sources(&g, &ids, DType::F32);
    assert!(outputs(&g, &inputs) == outputs(&out, &inputs), "the rewrite changed a result");
    // A second run has nothing left to do.
    assert_eq!(carry_attention_lse(&out, ALWAYS).unwrap().1, 0);
}

#[test]
fn the_rewrite_leaves_what_it_must_alone() {
    // Nodes the caller does not want rewritten.
    let (g, _) = attention_step(DType::F32, false, false);
    let (out, rewritten) = carry_attention_lse(&g, &|_, _| false).unwrap();
    assert_eq!(rewritten, 0);
    assert_eq!(out.values.len(), g.values.len());
    assert!(g.nodes.iter().zip(&out.nodes).all(|(a, b)| a.op == b.op && a.inputs == b.inputs));

    // A backward with no forward reading the same q, k and v (another attention of equal shapes does not count),
    // nor one with other attributes.
    let mut g = Graph::new();
    let s = [1, 2, 5, 4];
    let (q, k, v, q2) = (
        g.input("q", s, DType::F32),
        g.input("k", s, DType::F32),
        g.input("v", s, DType::F32),
        g.input("q2", s, DType::F32),
    );
    let dout = g.input("dout", s, DType::F32);
    let o = g.attention(q2, k, v, 0.5, false).unwrap();
    let o_causal = g.attention(q, k, v, 0.5, true).unwrap();
    let grads = g
        .add_node(Op::AttentionBackward { scale: F64Bits::new(0.5), causal: false, lse: false }, &[q, k, v, dout])
        .unwrap();
    g.outputs.extend([o, o_causal]);
    g.outputs.extend(grads);
    let (out, rewritten) = carry_attention_lse(&g, ALWAYS).unwrap();
    assert_eq!(rewritten, 0);
    assert!(out.nodes.iter().all(|n| !matches!(n.op, Op::Attention { lse: true, .. })));
}

/// A forward that already has its log-sum-exp lends it to a plain backward of the same q, k and v.
#[test]
fn the_rewrite_reuses_a_log_sum_exp_the_forward_already_has() {
    let mut g = Graph::new();
    let s = [1, 1, 3, 4];
    let (q, k, v, dout) = (
        g.input("q", s, DType::F32),
        g.input("k", s, DType::F32),
        g.input("v", s, DType::F32),
        g.input("dout", s, DType::F32),
    );
    let (o, lse) = g.attention_with_lse(q, k, v, 0.5, false).unwrap();
    let op = Op::AttentionBackward { scale: F64Bits::new(0.5), causal: false, lse: false };
    let grads = g.add_node(op, &[q, k, v, dout]).unwrap();
    g.outputs.push(o);
    g.outputs.extend(grads);
    let (out, rewritten) = carry_attention_lse(&g, ALWAYS).unwrap();
    assert_eq!((rewritten, out.values.len()), (1, g.values.len()));
    assert_eq!(out.nodes[1].inputs, vec![q, k, v, o, lse, dout]);
}

/// The memory plan keeps the log-sum-exp (B·H·Lq floats) and O from the forward to the backward: no L x L.
#[test]
fn the_memory_plan_keeps_the_log_sum_exp_from_forward_to_backward() {
    let (g, _) = attention_step(DType::F32, false, false);
    let (out, _) = carry_attention_lse(&g, ALWAYS).unwrap();
    let f = out.nodes.iter().position(|n| matches!(n.op, Op::Attention { .. })).unwrap();
    let b = out.nodes.iter().position(|n| matches!(n.op, Op::AttentionBackward { .. })).unwrap();
    let plan = CpuBackend::new(1).plan(&out).unwrap();
    let buffer = |v: ValueId| plan.buffers.iter().find(|x| x.what == out.values[v].name).unwrap().clone();
    let lse = buffer(out.nodes[f].outputs[1]);
    assert_eq!(lse.bytes, (2 * 2 * 70 * 4usize).div_ceil(64) * 64, "B·H·Lq floats");
    assert_eq!((lse.start, lse.end), (f, b), "from the forward to the backward");
    let o = buffer(out.nodes[f].outputs[0]);
    assert!(o.start == f && o.end >= b, "O is kept for the backward");
}

/// Activation recomputation of the two-output forward: the backward reads O and the log-sum-exp of one recomputed
/// copy in the backward, and the results are the bits of the same step without recomputation.
#[test]
fn recomputation_recomputes_both_outputs_of_the_forward() {
    let build = || {
        let mut g = Graph::new();
        let x = g.input("x", [1, 2, 12, 4], DType::F32);
        let ws: Vec<ValueId> = ["wq", "wk", "wv"].iter().map(|n| g.param(n, [4], DType::F32, true)).collect();
        let y = g
            .checkpoint_scope(|g| {
                let q = g.mul(x, ws[0])?;
                let k = g.mul(x, ws[1])?;
                let v = g.mul(x, ws[2])?;
                let (o, _) = g.attention_with_lse(q, k, v, 0.5, true)?;
                // SiLU's backward reads O, so O (and with it the attention) is recomputed.
                g.silu(o)
            })
            .unwrap();
        let loss = g.mean_all(y).unwrap();
        let grads = backward(&mut g, loss, &ws).unwrap();
        g.outputs = vec![loss];
        g.outputs.extend(ws.iter().map(|w| grads[w]));
        (g, x, ws)
    };
    let (g, x, ws) = build();
    let mut rng = Rng::new(5);
    let mut inputs = vec![(x, HostTensor::from_f64([1, 2, 12, 4], DType::F32, &rng.vec(96)).unwrap())];
    for &w in &ws {
        inputs.push((w, HostTensor::from_f64([4], DType::F32, &rng.vec(4)).unwrap()));
    }
    let run = |checkpointing: bool| {
        let opt = passes::optimize(&g, &PassOptions { checkpointing, ..PassOptions::default() }).unwrap();
        let ins: Vec<(ValueId, HostTensor)> =
            inputs.iter().map(|(v, t)| (opt.map.get(*v).unwrap(), t.clone())).collect();
        let bits = outputs(&opt.graph, &ins);
        (opt.graph, bits)
    };
    let (kept, want) = run(false);
    let (recomputed, got) = run(true);
    assert!(got == want, "recomputation changed the loss or a gradient");
    for (h, name) in [(&kept, "kept"), (&recomputed, "recomputed")] {
        let b = h.nodes.iter().find(|n| matches!(n.op, Op::AttentionBackward { .. })).unwrap();
        let (o, lse) = (h.values[b.inputs[3]].producer.unwrap(), h.values[b.inputs[4]].producer.unwrap());
        assert_eq!((o.1, lse.1, o.0), (0, 1, lse.0), "{name}: o and lse of one forward");
        let phase = h.nodes[o.0].phase;
        assert_eq!(phase, if name == "kept" { Phase::Forward } else { Phase::Backward }, "{name}");
    }
    let forwards = recomputed.nodes.iter().filter(|n| matches!(n.op, Op::Attention { .. })).count();
    assert_eq!(forwards, 2, "the forward and its one recomputed copy");
}

/// A whole training step (conv, GroupNorm, attention, AdamW), with and without recomputation, rewritten to the
/// `lse` form: the CPU backend computes the same loss and parameters, bit for bit.
#[test]
fn a_training_step_in_the_lse_form_gives_the_same_bits() {
    for checkpoint in [false, true] {
        let spec = NetSpec { batch: 2, in_ch: 3, ch: 8, hw: 4, blocks: 1, checkpoint, dtype: DType::F32 };
        let s = nets::training_step(&spec, false);
        let (rewritten, n) = carry_attention_lse(&s.graph, ALWAYS).unwrap();
        assert_eq!(n, 1, "checkpoint={checkpoint}");
        let mut rng = Rng::new(9);
        let step: Vec<(&str, HostTensor)> = vec![
            ("x", HostTensor::from_f64([2, 3, 4, 4], DType::F32, &rng.vec(96)).unwrap()),
            ("target", HostTensor::from_f64([2, 3, 4, 4], DType::F32, &rng.vec(96)).unwrap()),
            (
                HYPER_INPUT,
                HostTensor::from_f64([3], DType::F32, &adamw_hyper(&AdamWConfig::default(), 1e-3, 1)).unwrap(),
            ),
        ];
        let results: Vec<Vec<Vec<u8>>> = [&s.graph, &rewritten]
            .iter()
            .map(|g| {
                let mut p = CpuBackend::new(2).compile((*g).clone()).unwrap();
                for (v, t) in &s.init {
                    p.upload(*v, t).unwrap();
                }
                for (name, t) in &step {
                    p.upload_named(name, t).unwrap();
                }
                p.launch().unwrap();
                std::iter::once(s.loss).chain(s.params.iter().copied()).map(|v| p.download(v).unwrap().bytes).collect()
            })
            .collect();
        assert!(results[0] == results[1], "checkpoint={checkpoint}: the lse form changed the step");
    }
}

#[test]
fn the_log_sum_exp_carries_no_gradient() {
    let mut g = Graph::new();
    let s = [1, 1, 3, 4];
    let (q, k, v) = (g.param("q", s, DType::F64, true), g.input("k", s, DType::F64), g.input("v", s, DType::F64));
    let (o, lse) = g.attention_with_lse(q, k, v, 0.5, false).unwrap();
    let a = g.mean_all(o).unwrap();
    let b = g.mean_all(lse).unwrap();
    let loss = g.add(a, b).unwrap();
    let err = backward(&mut g, loss, &[q]).unwrap_err().to_string();
    assert!(err.contains("log-sum-exp") && err.contains("no gradient"), "{err}");
}

#[test]
fn shape_inference_refuses_malformed_lse_forms() {
    let mut g = Graph::new();
    let s = [1, 2, 3, 4];
    let (q, k, v, dout) = (
        g.input("q", s, DType::F32),
        g.input("k", s, DType::F32),
        g.input("v", s, DType::F32),
        g.input("dout", s, DType::F32),
    );
    let (o, lse) = g.attention_with_lse(q, k, v, 0.5, false).unwrap();
    let bwd = |lse: bool| Op::AttentionBackward { scale: F64Bits::new(0.5), causal: false, lse };
    let bad_lse = g.input("lse_bf16", [1, 2, 3], DType::BF16);
    let short_lse = g.input("lse_short", [1, 2, 2], DType::F32);
    let k64 = g.input("k64", s, DType::F64);
    let mut refused = |op: Op, ins: &[ValueId], what: &str| {
        let err = g.add_node(op, ins).unwrap_err().to_string();
        assert!(err.contains(what), "expected `{what}` in: {err}");
    };
    refused(bwd(true), &[q, k, v, dout], "expects 6 inputs");
    refused(bwd(false), &[q, k, v, o, lse, dout], "expects 4 inputs");
    refused(bwd(true), &[q, k, v, o, bad_lse, dout], "lse must be f32");
    refused(bwd(true), &[q, k, v, o, short_lse, dout], "lse must be [B, H, Lq]");
    let attn = Op::Attention { scale: F64Bits::new(0.5), causal: false, lse: true };
    refused(attn, &[q, k64, v], "must share one type");
    let fine = g.add_node(bwd(true), &[q, k, v, o, lse, dout]).unwrap();
    assert_eq!(fine.len(), 3);
}

/// Over no keys the log-sum-exp is -inf, not the zeros the plain form writes for O: one clear error, no panic. A
/// batch of 0 has nothing to write and runs.
#[test]
fn an_empty_key_set_with_the_log_sum_exp_is_one_clear_error() {
    let build = |b: usize, lk: usize| {
        let mut g = Graph::new();
        let q = g.input("q", [b, 1, 3, 4], DType::F32);
        let (k, v) = (g.input("k", [b, 1, lk, 4], DType::F32), g.input("v", [b, 1, lk, 4], DType::F32));
        let (o, lse) = g.attention_with_lse(q, k, v, 0.5, false).unwrap();
        g.outputs.extend([o, lse]);
        CpuBackend::new(1).compile(g).unwrap()
    };
    let err = build(1, 0).launch().unwrap_err().to_string();
    assert!(err.contains("log-sum-exp") && err.contains("empty tensor"), "{err}");
    build(0, 5).launch().unwrap();
}
