//! Autodiff of a composite net, the passes (CSE, DCE, checkpointing), and the memory planner.

use crate::common;
use common::nets::{self, NetSpec};
use common::*;
use zeroconv::engine::cpu::CpuBackend;
use zeroconv::engine::{Backend, HostTensor, Program};
use zeroconv::graph::autodiff::backward;
use zeroconv::graph::passes::{self, memplan::storage_root, Location, PassOptions};
use zeroconv::graph::{DType, Graph, Phase, ValueId};

fn spec(blocks: usize, checkpoint: bool, dtype: DType) -> NetSpec {
    NetSpec { batch: 2, in_ch: 3, ch: 4, hw: 5, blocks, checkpoint, dtype }
}

#[test]
fn composite_net_gradients_match_finite_differences() {
    let s = spec(2, false, DType::F64);
    let template = nets::build(&s);
    // Args: x then every parameter, in creation order; gradients are checked for all of them.
    let mut args = vec![Arg::Float(template.g.shape(template.x).dims().to_vec())];
    args.extend(template.params.iter().map(|&p| Arg::Float(template.g.shape(p).dims().to_vec())));
    let build = |g: &mut Graph, a: &[ValueId]| {
        // Rebuild the body on the harness's sources, mapping parameters by creation order.
        let mut fresh = Graph::new();
        let x = fresh.input("x", template.g.shape(template.x).clone(), DType::F64);
        let mut ps = Vec::new();
        nets::build_body(&mut fresh, x, &s, &mut ps)?;
        let mut map: Vec<ValueId> = vec![usize::MAX; fresh.values.len()];
        map[x] = a[0];
        for (i, &p) in ps.iter().enumerate() {
            map[p] = a[i + 1];
        }
        let mut last = a[0];
        for node in fresh.nodes.clone() {
            let ins: Vec<ValueId> = node.inputs.iter().map(|&v| map[v]).collect();
            let outs = g.add_node(node.op.clone(), &ins)?;
            for (o, n) in node.outputs.iter().zip(outs) {
                map[*o] = n;
                last = n;
            }
        }
        Ok(last)
    };
    let mut rng = Rng::new(11);
    let mut vals = random_args(&args, &mut rng);
    // Realistic parameter scales keep the finite differences well conditioned.
    let init = nets::init_values(&template.g, &template.params, 5);
    for (i, (_, t)) in init.iter().enumerate() {
        vals[i + 1].data = t.to_f64();
    }
    grad_check("conv+groupnorm+attention net", &build, &args, &vals, 1e-5);
}

#[test]
fn frozen_parameters_and_inputs_get_no_gradient() {
    let mut g = Graph::new();
    let x = g.input("x", [3], DType::F32);
    let w = g.param("w", [3], DType::F32, true);
    let frozen = g.param("frozen", [3], DType::F32, false);
    let unused = g.param("unused", [3], DType::F32, true);
    let a = g.mul(x, frozen).unwrap();
    let b = g.mul(a, w).unwrap();
    let _dead = g.mul(unused, x).unwrap();
    let loss = g.sum(b, &[0], false).unwrap();
    let grads = backward(&mut g, loss, &[w, unused]).unwrap();
    assert!(grads.contains_key(&w));
    assert!(!grads.contains_key(&unused), "a parameter the loss does not use gets no gradient");
    // No backward node computes a gradient for the input or the frozen parameter: every
    // backward node's output feeds (transitively) only w's gradient.
    let bwd_nodes = g.nodes.iter().filter(|n| n.phase == Phase::Backward).count();
    // fill (the seed), reshape + broadcast_to (through the sum), mul (through x*f*w): nothing
    // flows toward x or the frozen parameter.
    assert_eq!(bwd_nodes, 4, "backward emitted {bwd_nodes} nodes for d(sum(x*f*w))/dw");
    for n in g.nodes.iter().filter(|n| n.phase == Phase::Backward) {
        assert!(
            !n.inputs.contains(&x) && !n.inputs.contains(&frozen),
            "{} reads x or the frozen parameter",
            n.op.name()
        );
    }
    let (opt, map) = passes::dce::dce(&{
        let mut h = g.clone();
        h.outputs = vec![grads[&w]];
        h
    })
    .unwrap();
    assert!(map.get(_dead).is_none(), "DCE removes the dead product");
    assert!(opt.nodes.len() < g.nodes.len());
}

#[test]
fn cse_merges_duplicates_and_dce_removes_dead_nodes() {
    let mut g = Graph::new();
    let x = g.input("x", [4, 4], DType::F32);
    let a = g.silu(x).unwrap();
    let b = g.silu(x).unwrap(); // same as a
    let c = g.add(a, b).unwrap();
    let _dead = g.unary(zeroconv::graph::UnaryOp::Exp, x).unwrap();
    g.outputs.push(c);
    let opt =
        passes::optimize(&g, &PassOptions { checkpointing: false, dumps: true, fusion: false, channels_last: false })
            .unwrap();
    let names: Vec<String> = opt.graph.nodes.iter().map(|n| n.op.name()).collect();
    assert_eq!(names, vec!["silu", "add"], "one silu, one add, no exp");
    let add = &opt.graph.nodes[1];
    assert_eq!(add.inputs[0], add.inputs[1], "both operands read the one silu");
    // The dumps name each pass and show the graph shrinking.
    let stages: Vec<&str> = opt.dumps.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(stages, vec!["input", "cse", "dce"]);
    assert!(opt.dumps[0].1.contains("exp(") && !opt.dumps[2].1.contains("exp("));
    assert!(opt.dumps[2].1.contains("silu(%0)"), "dump:\n{}", opt.dumps[2].1);
    // And the result is unchanged.
    let xv: Vec<f64> = (0..16).map(|i| i as f64 / 8.0 - 1.0).collect();
    let out =
        run(opt.graph, &[(x, HostTensor::from_f64([4, 4], DType::F32, &xv).unwrap())], &[opt.map.get(c).unwrap()]);
    let want: Vec<f64> = xv.iter().map(|&v| 2.0 * v / (1.0 + (-v).exp())).collect();
    assert_close("cse result", &out[0].to_f64(), &want, 1e-6);
}

/// Independent check of a memory plan: lifetimes recomputed here from the graph; every two
/// arena values (and node scratch) alive at the same node must not share a byte.
fn assert_plan_sound(g: &Graph, plan: &passes::MemoryPlan) {
    let n = g.nodes.len();
    let mut first = vec![usize::MAX; g.values.len()];
    let mut last = vec![0usize; g.values.len()];
    for (i, node) in g.nodes.iter().enumerate() {
        for &v in node.inputs.iter().chain(&node.outputs) {
            let r = storage_root(g, v);
            first[r] = first[r].min(i);
            last[r] = last[r].max(i);
        }
    }
    for &o in &g.outputs {
        last[storage_root(g, o)] = n - 1;
    }
    let mut ranges: Vec<(usize, usize, usize, usize, String)> = Vec::new(); // (start, end, lo, hi, what)
    for v in 0..g.values.len() {
        if storage_root(g, v) != v || first[v] == usize::MAX {
            continue;
        }
        if let Some(Location::Arena(off)) = plan.locations[v] {
            ranges.push((first[v], last[v], off, off + g.values[v].bytes(), g.values[v].name.clone()));
        }
    }
    for (i, s) in plan.scratch.iter().enumerate() {
        if let Some((off, bytes)) = s {
            ranges.push((i, i, *off, off + bytes, format!("scratch {i}")));
        }
    }
    let mut checked = 0;
    for a in 0..ranges.len() {
        for b in a + 1..ranges.len() {
            let (x, y) = (&ranges[a], &ranges[b]);
            let live_together = x.0 <= y.1 && y.0 <= x.1;
            let overlap = x.2 < y.3 && y.2 < x.3;
            assert!(!(live_together && overlap), "{} and {} are live together and share bytes", x.4, y.4);
            checked += 1;
        }
        assert!(ranges[a].3 <= plan.arena_bytes, "{} runs past the arena", ranges[a].4);
    }
    assert!(checked > 0);
}

fn training_graph(s: &NetSpec) -> (Graph, Vec<ValueId>, ValueId) {
    let mut net = nets::build(s);
    let grads = backward(&mut net.g, net.loss, &net.params).unwrap();
    let gids: Vec<ValueId> = net.params.iter().map(|p| grads[p]).collect();
    net.g.outputs.push(net.loss);
    net.g.outputs.extend(&gids);
    (net.g, gids, net.loss)
}

#[test]
fn memory_plan_never_overlaps_live_values_and_reuses_memory() {
    for (blocks, ckpt) in [(1, false), (3, false), (3, true)] {
        let s = spec(blocks, ckpt, DType::F32);
        let (g, _, _) = training_graph(&s);
        let opt = passes::optimize(
            &g,
            &PassOptions { checkpointing: ckpt, dumps: false, fusion: false, channels_last: false },
        )
        .unwrap();
        let prog = CpuBackend::new(2).compile(opt.graph).unwrap();
        let plan = prog.plan();
        assert_plan_sound(prog.graph(), plan);
        assert!(
            plan.arena_bytes < plan.unplanned_bytes,
            "planned peak {} should be below the sum of all intermediates {}",
            plan.arena_bytes,
            plan.unplanned_bytes
        );
    }
}

#[test]
fn checkpointing_lowers_the_peak_and_keeps_gradients() {
    let mut results = Vec::new();
    for ckpt in [false, true] {
        let s = NetSpec { batch: 2, in_ch: 3, ch: 8, hw: 8, blocks: 6, checkpoint: ckpt, dtype: DType::F32 };
        let net = nets::build(&s);
        let init = nets::init_values(&net.g, &net.params, 9);
        let (g, gids, loss) = training_graph(&s);
        let opt = passes::optimize(
            &g,
            &PassOptions { checkpointing: ckpt, dumps: false, fusion: false, channels_last: false },
        )
        .unwrap();
        let recomputed = opt.graph.values.iter().filter(|v| v.name.ends_with(".recompute")).count();
        assert_eq!(recomputed > 0, ckpt, "recomputation appears exactly when checkpointing");
        let mut p = CpuBackend::new(2).compile(opt.graph.clone()).unwrap();
        let mut rng = Rng::new(2);
        let xs = rng.vec(2 * 3 * 64);
        let ts = rng.vec(2 * 3 * 64);
        p.upload(opt.map.get(net.x).unwrap(), &HostTensor::from_f64([2, 3, 8, 8], DType::F32, &xs).unwrap()).unwrap();
        p.upload(opt.map.get(net.target).unwrap(), &HostTensor::from_f64([2, 3, 8, 8], DType::F32, &ts).unwrap())
            .unwrap();
        for (v, t) in &init {
            p.upload(opt.map.get(*v).unwrap(), t).unwrap();
        }
        p.launch().unwrap();
        let grads: Vec<Vec<f64>> =
            gids.iter().map(|&d| p.download(opt.map.get(d).unwrap()).unwrap().to_f64()).collect();
        let l = p.download(opt.map.get(loss).unwrap()).unwrap().to_f64()[0];
        results.push((p.plan().arena_bytes, grads, l));
    }
    let (peak_plain, grads_plain, loss_plain) = &results[0];
    let (peak_ckpt, grads_ckpt, loss_ckpt) = &results[1];
    assert!(peak_ckpt < peak_plain, "checkpointing should lower the planned peak: {peak_ckpt} vs {peak_plain}");
    assert_eq!(loss_plain, loss_ckpt);
    // Recomputation runs the same kernels on the same inputs: gradients are bit-identical.
    assert_eq!(grads_plain, grads_ckpt);
}

#[test]
fn upload_rejects_wrong_shapes_and_dtypes() {
    let mut g = Graph::new();
    let x = g.input("x", [2, 3], DType::F32);
    let y = g.silu(x).unwrap();
    g.outputs.push(y);
    let mut p = CpuBackend::new(1).compile(g).unwrap();
    let err = p.upload(x, &HostTensor::zeros([3, 2], DType::F32)).unwrap_err().to_string();
    assert!(err.contains("input x") && err.contains("[2,3]") && err.contains("[3,2]"), "{err}");
    let err = p.upload(x, &HostTensor::zeros([2, 3], DType::F64)).unwrap_err().to_string();
    assert!(err.contains("f64"), "{err}");
    let err = p.upload_named("nope", &HostTensor::zeros([2, 3], DType::F32)).unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn shape_errors_name_the_op_and_shapes() {
    let mut g = Graph::new();
    let a = g.input("a", [2, 3], DType::F32);
    let b = g.input("b", [4, 5], DType::F32);
    let e = g.matmul(a, b).unwrap_err().to_string();
    assert!(e.contains("matmul") && e.contains("[2,3]") && e.contains("[4,5]"), "{e}");
    let e = g.add(a, b).unwrap_err().to_string();
    assert!(e.contains("broadcast"), "{e}");
    let x = g.input("x", [1, 6, 4, 4], DType::F32);
    let gm = g.param("g", [6], DType::F32, true);
    let e = g.group_norm(x, gm, gm, 4, 1e-5).unwrap_err().to_string();
    assert!(e.contains("4 groups"), "{e}");
}

#[test]
fn the_finite_check_names_the_first_kernel_that_makes_a_nan() {
    let mut g = Graph::new();
    let x = g.input("x", [4], DType::F32);
    let a = g.unary(zeroconv::graph::UnaryOp::Exp, x).unwrap();
    let l = g.unary(zeroconv::graph::UnaryOp::Log, x).unwrap(); // log(-1) = NaN
    let s = g.add(a, l).unwrap();
    let y = g.silu(s).unwrap();
    g.outputs.push(y);
    let mut p = CpuBackend::new(1).compile(g).unwrap();
    p.upload(x, &HostTensor::from_f64([4], DType::F32, &[1.0, 2.0, -1.0, 3.0]).unwrap()).unwrap();
    p.launch().unwrap(); // unchecked: the NaN flows through
    p.set_check_finite(true);
    let err = p.launch().unwrap_err().to_string();
    assert!(err.contains("(log)") && err.contains("element 2") && err.contains("NaN"), "{err}");
}

/// GEGLU's backward: the two halves' gradients of one projection become one concatenation, not two zero-padded
/// slices' backwards and an add; halves that leave part of the axis untouched are padded once; slices that are
/// not side by side are still added.
#[test]
fn gradients_of_adjacent_slices_are_concatenated() {
    use zeroconv::graph::{Op, UnaryOp};
    let backward_ops = |ranges: [(usize, usize); 2]| {
        let mut g = Graph::new();
        let w = g.param("w", [2, 8], DType::F32, true);
        let a = g.slice(w, 1, ranges[0].0, ranges[0].1).unwrap();
        let b = g.slice(w, 1, ranges[1].0, ranges[1].1).unwrap();
        let act = g.unary(UnaryOp::GeluErf, b).unwrap();
        let y = g.mul(a, act).unwrap();
        let loss = g.mean_all(y).unwrap();
        let grads = backward(&mut g, loss, &[w]).unwrap();
        let dw = grads[&w];
        let producer = g.values[dw].producer.expect("dw has a producer").0;
        (g.nodes[producer].op.clone(), g.nodes[producer].inputs.clone(), g)
    };
    let (op, _, _) = backward_ops([(0, 4), (4, 8)]);
    assert!(matches!(op, Op::Concat { axis: 1 }), "halves filling the axis: {op:?}");
    let (op, inputs, g) = backward_ops([(1, 4), (4, 7)]);
    assert!(matches!(op, Op::SliceBackward { axis: 1, start: 1, full: 8 }), "halves inside the axis: {op:?}");
    let inner = g.values[inputs[0]].producer.expect("a concatenation").0;
    assert!(matches!(g.nodes[inner].op, Op::Concat { axis: 1 }), "{:?}", g.nodes[inner].op);
    let (op, _, _) = backward_ops([(0, 3), (5, 8)]);
    assert!(matches!(op, Op::Binary(zeroconv::graph::BinaryOp::Add)), "a gap between the slices: {op:?}");
}
