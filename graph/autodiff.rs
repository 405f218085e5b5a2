//! Reverse-mode autodiff as a graph-to-graph transform: backward nodes are appended to the same
//! graph as the forward ones (phase `Backward`), so every later pass treats both alike.
//!
//! Gradients flow only where they are needed: a value gets a gradient only if it depends on a
//! parameter we differentiate with respect to *and* the loss depends on it. Frozen parameters
//! and inputs get none.

use super::ir::{Graph, NodeId, Phase, ValueId};
use super::op::{BinaryOp, Layout, Op};
use super::shape::Shape;
use crate::error::{Error, Result};
use std::collections::HashMap;

/// Appends the backward of `loss` (a scalar) to `g`; returns each `wrt` value's gradient.
/// A `wrt` value the loss does not depend on gets no entry.
pub fn backward(g: &mut Graph, loss: ValueId, wrt: &[ValueId]) -> Result<HashMap<ValueId, ValueId>> {
    if g.shape(loss).numel() != 1 {
        return Err(Error::shape("backward", format!("loss must be a scalar, got {}", g.shape(loss))));
    }
    let forward_len = g.nodes.len();
    let depends = depends_on_wrt(g, wrt, forward_len);
    let reaches = reaches_loss(g, loss, forward_len);
    let needs = |v: ValueId| depends[v] && reaches[v];

    g.set_phase(Phase::Backward);
    let mut grads: HashMap<ValueId, ValueId> = HashMap::new();
    let seed = g.fill(1.0, g.shape(loss).clone(), g.dtype(loss))?;
    grads.insert(loss, seed);

    for n in (0..forward_len).rev() {
        let node = &g.nodes[n];
        if !node.inputs.iter().any(|&v| needs(v)) {
            continue;
        }
        let dys: Vec<Option<ValueId>> = node.outputs.iter().map(|o| grads.get(o).copied()).collect();
        if dys.iter().all(Option::is_none) {
            continue;
        }
        let wanted: Vec<bool> = node.inputs.iter().map(|&v| needs(v)).collect();
        let dxs = vjp(g, n, &dys, &wanted)?;
        let inputs = g.nodes[n].inputs.clone();
        for (i, dx) in dxs.into_iter().enumerate() {
            let (Some(dx), true) = (dx, wanted[i]) else { continue };
            let v = inputs[i];
            let total = match grads.get(&v) {
                Some(&prev) => accumulate(g, prev, dx)?,
                None => dx,
            };
            grads.insert(v, total);
        }
    }
    g.set_phase(Phase::Forward);
    Ok(wrt.iter().filter_map(|&w| grads.get(&w).map(|&d| (w, d))).collect())
}

/// The sum of two gradient contributions to one value. Where both are slices' backwards that sit side by side on
/// one axis (GEGLU's two halves of one projection: each half's gradient padded with zeros to the whole, then
/// added), the sum is their concatenation, padded once more only if the two still do not fill the axis: the same
/// values (a zero added to a number is that number) without writing and reading the zeros and without the add.
/// Three or more chunks merge pairwise as their contributions arrive.
fn accumulate(g: &mut Graph, prev: ValueId, dx: ValueId) -> Result<ValueId> {
    if let (Some(a), Some(b)) = (slice_backward_of(g, prev), slice_backward_of(g, dx)) {
        let (first, second) = if a.start <= b.start { (a, b) } else { (b, a) };
        let adjacent =
            first.axis == second.axis && first.full == second.full && first.start + first.len == second.start;
        if adjacent && g.dtype(first.dy) == g.dtype(second.dy) {
            let joined = g.concat(&[first.dy, second.dy], first.axis)?;
            if first.start == 0 && second.start + second.len == first.full {
                return Ok(joined);
            }
            let (axis, start, full) = (first.axis, first.start, first.full);
            return g.op1(Op::SliceBackward { axis, start, full }, &[joined]);
        }
    }
    g.add(prev, dx)
}

/// A slice's backward: its gradient `dy` placed at `start..start + len` of `full` along `axis`.
#[derive(Clone, Copy)]
struct PlacedSlice {
    axis: usize,
    start: usize,
    len: usize,
    full: usize,
    dy: ValueId,
}

/// `v` as a slice's backward, if a `SliceBackward` node produced it.
fn slice_backward_of(g: &Graph, v: ValueId) -> Option<PlacedSlice> {
    let (n, _) = g.values[v].producer?;
    let Op::SliceBackward { axis, start, full } = g.nodes[n].op else { return None };
    let dy = g.nodes[n].inputs[0];
    Some(PlacedSlice { axis, start, len: g.shape(dy).0[axis], full, dy })
}

/// Which values depend on a `wrt` value through differentiable inputs.
fn depends_on_wrt(g: &Graph, wrt: &[ValueId], upto: usize) -> Vec<bool> {
    let mut dep = vec![false; g.values.len()];
    for &w in wrt {
        dep[w] = true;
    }
    for node in &g.nodes[..upto] {
        let d = node.inputs.iter().enumerate().any(|(i, &v)| dep[v] && differentiable_input(&node.op, i));
        if d {
            for &o in &node.outputs {
                dep[o] = true;
            }
        }
    }
    dep
}

/// Which values the loss depends on.
fn reaches_loss(g: &Graph, loss: ValueId, upto: usize) -> Vec<bool> {
    let mut r = vec![false; g.values.len()];
    r[loss] = true;
    for node in g.nodes[..upto].iter().rev() {
        if node.outputs.iter().any(|&o| r[o]) {
            for &v in &node.inputs {
                r[v] = true;
            }
        }
    }
    r
}

/// Integer indices, timesteps and optimizer hyper-parameters carry no gradient.
fn differentiable_input(op: &Op, i: usize) -> bool {
    match op {
        Op::Embedding => i == 0,
        Op::TimestepEmbedding { .. }
        | Op::Fill { .. }
        | Op::AdamW { .. }
        | Op::MultiAdamW(_)
        | Op::AccumulateGrad
        | Op::AllReduce { .. } => false,
        Op::Unary(_)
        | Op::UnaryBackward(_)
        | Op::Binary(_)
        | Op::Affine { .. }
        | Op::Cast { .. }
        | Op::MatMul { .. }
        | Op::Conv2d { .. }
        | Op::Conv2dBackwardInput { .. }
        | Op::Conv2dBackwardWeight { .. }
        | Op::GroupNorm { .. }
        | Op::GroupNormBackward { .. }
        | Op::LayerNorm { .. }
        | Op::LayerNormBackward { .. }
        | Op::Softmax
        | Op::SoftmaxBackward
        | Op::Attention { .. }
        | Op::AttentionBackward { .. }
        | Op::Upsample2x
        | Op::Upsample2xBackward
        | Op::Concat { .. }
        | Op::Slice { .. }
        | Op::SliceBackward { .. }
        | Op::Reshape { .. }
        | Op::Permute { .. }
        | Op::EmbeddingBackward { .. }
        | Op::ReduceSum { .. }
        | Op::SumTo { .. }
        | Op::BroadcastTo { .. }
        | Op::MseLoss
        | Op::MseLossBackward
        | Op::Fused(_) => true,
    }
}

/// The vector-Jacobian product of node `n`: input gradients from output gradients.
fn vjp(g: &mut Graph, n: NodeId, dys: &[Option<ValueId>], wanted: &[bool]) -> Result<Vec<Option<ValueId>>> {
    let node = g.nodes[n].clone();
    let ins = &node.inputs;
    let x_shape = |g: &Graph, i: usize| g.shape(ins[i]).clone();
    // Single-output ops: the gradient of their output.
    let dy = dys[0];
    let need = |i: usize| wanted.get(i).copied().unwrap_or(false);
    let one = |g: &mut Graph, f: &dyn Fn(&mut Graph, ValueId) -> Result<ValueId>| -> Result<Vec<Option<ValueId>>> {
        match dy {
            Some(d) => Ok(vec![Some(f(g, d)?)]),
            None => Ok(vec![None]),
        }
    };
    match &node.op {
        Op::Fill { .. } | Op::TimestepEmbedding { .. } => Ok(vec![None; ins.len()]),
        Op::Unary(u) => {
            let u = *u;
            one(g, &|g, d| g.op1(Op::UnaryBackward(u), &[ins[0], d]))
        }
        Op::Binary(b) => {
            let d = dy.expect("binary has one output");
            let (a, bv, out) = (ins[0], ins[1], node.outputs[0]);
            let (sa, sb) = (x_shape(g, 0), x_shape(g, 1));
            let (da, db) = match b {
                BinaryOp::Add => (
                    if need(0) { Some(g.sum_to(d, sa)?) } else { None },
                    if need(1) { Some(g.sum_to(d, sb)?) } else { None },
                ),
                BinaryOp::Sub => (
                    if need(0) { Some(g.sum_to(d, sa)?) } else { None },
                    if need(1) {
                        let s = g.sum_to(d, sb)?;
                        Some(g.scale(s, -1.0)?)
                    } else {
                        None
                    },
                ),
                BinaryOp::Mul => (
                    if need(0) {
                        let t = g.mul(d, bv)?;
                        Some(g.sum_to(t, sa)?)
                    } else {
                        None
                    },
                    if need(1) {
                        let t = g.mul(d, a)?;
                        Some(g.sum_to(t, sb)?)
                    } else {
                        None
                    },
                ),
                BinaryOp::Div => {
                    // d(a/b)/da = 1/b;  d(a/b)/db = -(a/b)/b = -out/b.
                    let t = g.div(d, bv)?;
                    let da = if need(0) { Some(g.sum_to(t, sa)?) } else { None };
                    let db = if need(1) {
                        let u = g.mul(t, out)?;
                        let s = g.sum_to(u, sb)?;
                        Some(g.scale(s, -1.0)?)
                    } else {
                        None
                    };
                    (da, db)
                }
            };
            Ok(vec![da, db])
        }
        Op::Affine { alpha, .. } => {
            let a = alpha.get();
            one(g, &|g, d| g.scale(d, a))
        }
        Op::Cast { .. } => {
            let to = g.dtype(ins[0]);
            one(g, &|g, d| g.cast(d, to))
        }
        Op::MatMul { trans_a: ta, trans_b: tb } => {
            let d = dy.expect("matmul has one output");
            let (a, b) = (ins[0], ins[1]);
            let (sa, sb) = (x_shape(g, 0), x_shape(g, 1));
            let da = if need(0) {
                // C = op(A)·op(B): dop(A) = dC·op(B)ᵀ, so dA = dC·op(B)ᵀ or its transpose.
                let r = if !ta { g.matmul_t(d, b, false, !tb)? } else { g.matmul_t(b, d, *tb, true)? };
                Some(g.sum_to(r, sa.clone())?)
            } else {
                None
            };
            let db = if need(1) {
                if sb.rank() == 2 && sa.rank() > 2 && !ta {
                    // B shared by every batch: fold the batch into the rows so one GEMM sums it.
                    let k = sa.0[sa.rank() - 1];
                    let nn = g.shape(d).0[g.shape(d).rank() - 1];
                    let a2 = g.reshape(a, [sa.numel() / k, k])?;
                    let d2 = g.reshape(d, [g.shape(d).numel() / nn, nn])?;
                    Some(if !tb { g.matmul_t(a2, d2, true, false)? } else { g.matmul_t(d2, a2, true, false)? })
                } else {
                    let r = if !tb { g.matmul_t(a, d, !ta, false)? } else { g.matmul_t(d, a, true, *ta)? };
                    Some(g.sum_to(r, sb)?)
                }
            } else {
                None
            };
            Ok(vec![da, db])
        }
        Op::Conv2d { stride, padding, layout } => {
            let d = dy.expect("conv has one output");
            let (stride, padding, layout) = (*stride, *padding, *layout);
            let [_, _, h, w] = layout.nchw_dims(&x_shape(g, 0).0);
            let [_, _, kh, kw] = layout.nchw_dims(&x_shape(g, 1).0);
            let dx = if need(0) {
                Some(g.op1(Op::Conv2dBackwardInput { stride, padding, h, w, layout }, &[d, ins[1]])?)
            } else {
                None
            };
            let dw = if need(1) {
                Some(g.op1(Op::Conv2dBackwardWeight { stride, padding, kh, kw, layout }, &[ins[0], d])?)
            } else {
                None
            };
            let mut r = vec![dx, dw];
            if ins.len() == 3 {
                // The bias gradient sums dy over every axis but the channels.
                let spatial: &[usize] = match layout {
                    Layout::Nchw => &[0, 2, 3],
                    Layout::Nhwc => &[0, 1, 2],
                };
                r.push(if need(2) { Some(g.sum(d, spatial, false)?) } else { None });
            }
            Ok(r)
        }
        Op::GroupNorm { groups, eps, layout } => {
            let d = dy.expect("groupnorm has one output");
            let back = Op::GroupNormBackward { groups: *groups, eps: *eps, layout: *layout };
            let outs = g.add_node(back, &[ins[0], ins[1], d])?;
            Ok(outs.into_iter().map(Some).collect())
        }
        Op::LayerNorm { eps } => {
            let d = dy.expect("layernorm has one output");
            let outs = g.add_node(Op::LayerNormBackward { eps: *eps }, &[ins[0], ins[1], d])?;
            Ok(outs.into_iter().map(Some).collect())
        }
        Op::Softmax => {
            let y = node.outputs[0];
            one(g, &|g, d| g.op1(Op::SoftmaxBackward, &[y, d]))
        }
        Op::Attention { scale, causal, lse } => {
            // The log-sum-exp is statistics offered to the backward, not a result to train through: a loss that
            // reads it has no backward op to differentiate it.
            if dys.get(1).copied().flatten().is_some() {
                return Err(Error::msg(
                    "autodiff: the loss depends on attention's log-sum-exp output, which carries no gradient",
                ));
            }
            let Some(d) = dy else { return Ok(vec![None; ins.len()]) };
            let op = Op::AttentionBackward { scale: *scale, causal: *causal, lse: *lse };
            let inputs = if *lse {
                vec![ins[0], ins[1], ins[2], node.outputs[0], node.outputs[1], d]
            } else {
                vec![ins[0], ins[1], ins[2], d]
            };
            let outs = g.add_node(op, &inputs)?;
            Ok(outs.into_iter().map(Some).collect())
        }
        Op::Upsample2x => one(g, &|g, d| g.op1(Op::Upsample2xBackward, &[d])),
        Op::Concat { axis } => {
            let d = dy.expect("concat has one output");
            let mut start = 0;
            let mut r = Vec::new();
            for (i, &x) in ins.iter().enumerate() {
                let len = g.shape(x).0[*axis];
                r.push(if need(i) { Some(g.slice(d, *axis, start, start + len)?) } else { None });
                start += len;
            }
            Ok(r)
        }
        Op::Slice { axis, start, .. } => {
            let full = g.shape(ins[0]).0[*axis];
            let (axis, start) = (*axis, *start);
            one(g, &|g, d| g.op1(Op::SliceBackward { axis, start, full }, &[d]))
        }
        Op::SliceBackward { axis, start, .. } => {
            let len = g.shape(ins[0]).0[*axis];
            let (axis, start) = (*axis, *start);
            one(g, &|g, d| g.slice(d, axis, start, start + len))
        }
        Op::Reshape { .. } => {
            let s = x_shape(g, 0);
            one(g, &|g, d| g.reshape(d, s.clone()))
        }
        Op::Permute { perm } => {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            one(g, &|g, d| g.permute(d, &inv))
        }
        Op::Embedding => {
            let vocab = g.shape(ins[0]).0[0];
            let ids = ins[1];
            Ok(vec![
                match dy {
                    Some(d) => Some(g.op1(Op::EmbeddingBackward { vocab }, &[ids, d])?),
                    None => None,
                },
                None,
            ])
        }
        Op::ReduceSum { axes, keepdim } => {
            let xs = x_shape(g, 0);
            let kept = Shape(xs.0.iter().enumerate().map(|(i, &s)| if axes.contains(&i) { 1 } else { s }).collect());
            let keepdim = *keepdim;
            one(g, &|g, d| {
                let d = if keepdim { d } else { g.reshape(d, kept.clone())? };
                g.broadcast_to(d, xs.clone())
            })
        }
        Op::SumTo { .. } => {
            let xs = x_shape(g, 0);
            one(g, &|g, d| g.broadcast_to(d, xs.clone()))
        }
        Op::BroadcastTo { .. } => {
            let xs = x_shape(g, 0);
            one(g, &|g, d| g.sum_to(d, xs.clone()))
        }
        Op::MseLoss => {
            let d = dy.expect("mse has one output");
            let da = g.op1(Op::MseLossBackward, &[ins[0], ins[1], d])?;
            let db = if need(1) { Some(g.scale(da, -1.0)?) } else { None };
            Ok(vec![Some(da), db])
        }
        op @ (Op::UnaryBackward(_)
        | Op::Conv2dBackwardInput { .. }
        | Op::Conv2dBackwardWeight { .. }
        | Op::GroupNormBackward { .. }
        | Op::LayerNormBackward { .. }
        | Op::SoftmaxBackward
        | Op::AttentionBackward { .. }
        | Op::Upsample2xBackward
        | Op::EmbeddingBackward { .. }
        | Op::MseLossBackward) => {
            Err(Error::msg(format!("autodiff: {} is not differentiable (it is itself a backward op)", op.name())))
        }
        // The data-parallel gradient sum runs in the update, on gradients the backward already produced: nothing
        // differentiates through it (its adjoint would be another all-reduce, which no training step needs).
        op @ (Op::AdamW { .. } | Op::MultiAdamW(_) | Op::AccumulateGrad | Op::AllReduce { .. }) => {
            Err(Error::msg(format!("autodiff: {} is not differentiable (an optimizer update)", op.name())))
        }
        op @ Op::Fused(_) => Err(Error::msg(format!(
            "autodiff: {} is not differentiable (a fused kernel: differentiate before fusing)",
            op.name()
        ))),
    }
}
