//! The data-parallel gradient sum as part of the step: for a world of more than one rank, all-reduce nodes
//! ([`Op::AllReduce`]) over buckets of gradient accumulators, at the start of the update part of an accumulating step
//! (`graph::optim::append_accumulating_step`), so gradient clipping and AdamW read the gradients of every rank.
//!
//! Buckets follow the order the backward produces the gradients (the order of its `AccumulateGrad` nodes), hold one
//! dtype each and close before they would pass [`BUCKET_BYTES`]; a gradient larger than that is a bucket of its own.
//! Backends sum a bucket of several tensors through scratch the size of the bucket (one transfer per bucket) and a
//! bucket of one tensor in place, so the planned arena grows by at most one bucket.
//!
//! The nodes are spliced into the node list rather than rebuilt through a `Rewriter`: they produce no value, so every
//! value keeps its id and the caller's handles (inputs, loss, hyper-parameters) stay valid.

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
/// training), inserted where the update starts ([`update_start`]); for `world_size` 1, `g` unchanged. Value ids are
/// unchanged either way. Fails on a graph that is not an accumulating step (no update part to run after the sum,
/// or no accumulators to sum).
pub fn insert_gradient_all_reduce(g: &Graph, world_size: usize, bucket_bytes: usize) -> Result<Graph> {
    if world_size <= 1 {
        return Ok(g.clone());
    }
    if g.nodes.iter().any(|n| matches!(n.op, Op::AllReduce { .. })) {
        return Err(Error::msg("all-reduce pass: the step already sums its gradients over the ranks"));
    }
    let start = update_start(g)?;
    let accumulators = accumulators_in_backward_order(g);
    if accumulators.is_empty() {
        return Err(Error::msg(
            "all-reduce pass: the step has no gradient accumulators to sum over the ranks (data parallelism needs the \
             accumulating step)",
        ));
    }
    let reduce: Vec<Node> = buckets(g, &accumulators, bucket_bytes)
        .into_iter()
        .map(|bucket| {
            let op = Op::AllReduce { tensors: bucket.len(), world_size };
            let ins: Vec<_> = bucket.iter().map(|&v| (&g.values[v].shape, g.values[v].dtype)).collect();
            op.infer(&ins)?;
            Ok(Node { op, inputs: bucket, outputs: Vec::new(), phase: Phase::Update, checkpoint: false })
        })
        .collect::<Result<_>>()?;
    let mut out = g.clone();
    let k = reduce.len();
    for v in &mut out.values {
        if let Some((n, i)) = v.producer {
            if n >= start {
                v.producer = Some((n + k, i));
            }
        }
    }
    out.nodes.splice(start..start, reduce);
    out.validate()?;
    Ok(out)
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
