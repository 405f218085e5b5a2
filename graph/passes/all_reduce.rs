//! The data-parallel gradient sum as part of the step: for a world of more than one rank, all-reduce nodes
//! ([`Op::AllReduce`]) over buckets of gradient accumulators of an accumulating step
//! (`graph::optim::append_accumulating_step`), so gradient clipping and AdamW read the gradients of every rank.
//!
//! Where the sums go depends on the micro-batches a rank accumulates per update:
//! - One (the common case: micro-batch = global batch / ranks): each accumulation moves up to right after the node
//!   that completes its gradient, and each bucket's sum goes right after the last accumulation into it, in the
//!   backward. On a GPU the sums then run on the communication stream while the rest of the backward runs.
//! - Several: at the start of the update part. The micro-batch part runs once per micro-batch, and only the last
//!   micro-batch's backward could sum (summing after every one would add the ranks' partial sums again), which would
//!   take a second micro-batch program; so these steps sum after the backward, without overlap.
//!
//! Buckets follow the order the backward produces the gradients (the order of its `AccumulateGrad` nodes), hold one
//! dtype each and close before they would pass [`BUCKET_BYTES`]; a gradient larger than that is a bucket of its own.
//! Backends sum a bucket of several tensors through a buffer the size of the bucket (one transfer per bucket) and a
//! bucket of one tensor in place, so memory grows by at most one bucket.
//!
//! The nodes are placed by reordering the node list rather than rebuilding through a `Rewriter`: they produce no
//! value, so every value keeps its id and the caller's handles (inputs, loss, hyper-parameters) stay valid.

use crate::error::{Error, Result};
use crate::graph::ir::{Graph, Node, Phase, ValueId};
use crate::graph::op::Op;
use crate::graph::optim::update_start;

/// The size a bucket of gradients closes at: PyTorch DDP's default `bucket_cap_mb`, large enough that a transfer
/// costs its bandwidth rather than its latency, small enough that the staging buffer is a small part of the arena.
pub const BUCKET_BYTES: usize = 25 << 20;

/// The gradient accumulators of an accumulating step, in the order its backward writes them (first write).
pub fn accumulators_in_backward_order(g: &Graph) -> Vec<ValueId> {
    let mut seen = vec![false; g.values.len()];
    let mut out = Vec::new();
    for node in &g.nodes {
        if let (Op::AccumulateGrad, Some(&acc)) = (&node.op, node.inputs.first()) {
            if !std::mem::replace(&mut seen[acc], true) {
                out.push(acc);
            }
        }
    }
    out
}

/// Splits `accumulators` (in order) into buckets of one dtype and at most `bucket_bytes` (a larger tensor alone).
pub fn buckets(g: &Graph, accumulators: &[ValueId], bucket_bytes: usize) -> Vec<Vec<ValueId>> {
    let mut out: Vec<Vec<ValueId>> = Vec::new();
    let mut bytes = 0;
    for &a in accumulators {
        let size = g.value(a).bytes();
        let fits = out.last().is_some_and(|b| g.dtype(b[0]) == g.dtype(a) && bytes + size <= bucket_bytes);
        if fits {
            out.last_mut().expect("a bucket").push(a);
            bytes += size;
        } else {
            out.push(vec![a]);
            bytes = size;
        }
    }
    out
}

/// `g` with all-reduce nodes over every gradient accumulator, in buckets of `bucket_bytes` ([`BUCKET_BYTES`] in
/// training): with `micro_batches` 1 each right after the backward's last write into its bucket (the accumulations
/// moved up to their gradients first), otherwise where the update starts ([`update_start`]); for `world_size` 1,
/// `g` unchanged. Value ids are unchanged either way. Fails on a graph that is not an accumulating step (no update
/// part to run after the sum, or no accumulators to sum).
pub fn insert_gradient_all_reduce(
    g: &Graph,
    world_size: usize,
    micro_batches: usize,
    bucket_bytes: usize,
) -> Result<Graph> {
    if world_size <= 1 {
        return Ok(g.clone());
    }
    if g.nodes.iter().any(|n| matches!(n.op, Op::AllReduce { .. })) {
        return Err(Error::msg("all-reduce pass: the step already sums its gradients over the ranks"));
    }
    let start = update_start(g)?;
    if accumulators_in_backward_order(g).is_empty() {
        return Err(Error::msg(
            "all-reduce pass: the step has no gradient accumulators to sum over the ranks (data parallelism needs the \
             accumulating step)",
        ));
    }
    let overlapped = micro_batches == 1;
    let mut out = if overlapped { with_early_accumulation(g, start) } else { g.clone() };
    let accumulators = accumulators_in_backward_order(&out);
    let phase = if overlapped { Phase::Backward } else { Phase::Update };
    // (position in the node list the sum goes before, node), in bucket order.
    let mut sums: Vec<(usize, Node)> = buckets(&out, &accumulators, bucket_bytes)
        .into_iter()
        .map(|bucket| {
            let op = Op::AllReduce { tensors: bucket.len(), world_size };
            let ins: Vec<_> = bucket.iter().map(|&v| (&out.values[v].shape, out.values[v].dtype)).collect();
            op.infer(&ins)?;
            let at = if overlapped { last_accumulation(&out, &bucket)? + 1 } else { start };
            Ok((at, Node { op, inputs: bucket, outputs: Vec::new(), phase, checkpoint: false }))
        })
        .collect::<Result<_>>()?;
    // Buckets follow the first writes; a bucket whose last write comes after a later bucket's goes after it.
    sums.sort_by_key(|s| s.0);
    let mut order: Vec<Slot> = Vec::with_capacity(out.nodes.len() + sums.len());
    let mut sums = sums.into_iter().peekable();
    for i in 0..=out.nodes.len() {
        while let Some((_, node)) = sums.next_if(|(at, _)| *at == i) {
            order.push(Slot::New(node));
        }
        if i < out.nodes.len() {
            order.push(Slot::Old(i));
        }
    }
    out = rebuilt(&out, order);
    out.validate()?;
    Ok(out)
}

/// The index of the last node that accumulates into one of `bucket`'s accumulators.
fn last_accumulation(g: &Graph, bucket: &[ValueId]) -> Result<usize> {
    g.nodes
        .iter()
        .rposition(|n| matches!(n.op, Op::AccumulateGrad) && n.inputs.first().is_some_and(|a| bucket.contains(a)))
        .ok_or_else(|| Error::msg(format!("all-reduce pass: nothing accumulates into {}", g.value(bucket[0]).name)))
}

/// One node of a rebuilt node list: a node of the old list, or a new one.
enum Slot {
    Old(usize),
    New(Node),
}

/// `g` with its nodes in `order` (every old node once), producers renumbered; values are untouched.
fn rebuilt(g: &Graph, order: Vec<Slot>) -> Graph {
    let mut out = g.clone();
    let mut new_index = vec![0; g.nodes.len()];
    out.nodes = order
        .into_iter()
        .enumerate()
        .map(|(at, slot)| match slot {
            Slot::Old(i) => {
                new_index[i] = at;
                g.nodes[i].clone()
            }
            Slot::New(node) => node,
        })
        .collect();
    for v in &mut out.values {
        if let Some((n, i)) = v.producer {
            v.producer = Some((new_index[n], i));
        }
    }
    out
}

/// `g` with every accumulation of the micro-batch part (the nodes before `start`) moved up to right after the node
/// that completes its gradient, with the casts that only feed it: `append_accumulating_step` appends them all after
/// the backward, which would hold every sum back to the end of it. Only earlier, never past another use of the
/// accumulator (an accumulator that anything else before the update touches stays where it is), so the values are
/// the same.
fn with_early_accumulation(g: &Graph, start: usize) -> Graph {
    // How many nodes of the micro-batch part read each value, and the last that does.
    let mut users = vec![0usize; g.values.len()];
    let mut user = vec![0usize; g.values.len()];
    for (j, node) in g.nodes[..start].iter().enumerate() {
        for &v in &node.inputs {
            users[v] += 1;
            user[v] = j;
        }
    }
    // Which nodes move: accumulations whose accumulator nothing else reads before the update, and the casts whose
    // one use is such an accumulation (or such a cast).
    let mut moves = vec![false; g.nodes.len()];
    for i in (0..start).rev() {
        let node = &g.nodes[i];
        moves[i] = match node.op {
            Op::AccumulateGrad => users[node.inputs[0]] == 1,
            Op::Cast { .. } => {
                let out = node.outputs[0];
                users[out] == 1 && moves[user[out]] && !g.outputs.contains(&out)
            }
            _ => false,
        };
    }
    // Each moving node goes right after the last node it depends on that stays (none: first of all).
    let mut anchor: Vec<Option<usize>> = vec![None; g.nodes.len()];
    for i in 0..start {
        if moves[i] {
            anchor[i] = g.nodes[i]
                .inputs
                .iter()
                .filter_map(|&v| g.values[v].producer.map(|(p, _)| if moves[p] { anchor[p] } else { Some(p) }))
                .flatten()
                .max();
        }
    }
    let mut after: Vec<Vec<usize>> = vec![Vec::new(); g.nodes.len()];
    let mut order = Vec::with_capacity(g.nodes.len());
    for i in 0..g.nodes.len() {
        match (moves[i], anchor[i]) {
            (true, Some(a)) => after[a].push(i),
            (true, None) => order.push(Slot::Old(i)),
            (false, _) => {}
        }
    }
    for i in 0..g.nodes.len() {
        if !moves[i] {
            order.push(Slot::Old(i));
            order.extend(after[i].iter().map(|&j| Slot::Old(j)));
        }
    }
    rebuilt(g, order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::DType;

    #[test]
    fn buckets_close_at_the_size_and_at_a_change_of_dtype() {
        let mut g = Graph::new();
        let a = g.state("a", [4], DType::F32); // 16 bytes
        let b = g.state("b", [4], DType::F32);
        let c = g.state("c", [10], DType::F32); // 40 bytes: larger than a bucket, alone
        let d = g.state("d", [2], DType::F64);
        let e = g.state("e", [2], DType::F32);
        let f = g.state("f", [1], DType::F32);
        assert_eq!(buckets(&g, &[a, b, c, d, e, f], 32), vec![vec![a, b], vec![c], vec![d], vec![e, f]]);
        assert_eq!(buckets(&g, &[a, b, c], 1 << 20), vec![vec![a, b, c]]);
        assert!(buckets(&g, &[], 32).is_empty());
    }
}
