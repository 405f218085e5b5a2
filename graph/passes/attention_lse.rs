//! Carries attention's row log-sum-exp from the forward to the backward: each chosen `AttentionBackward` whose
//! forward is in the graph becomes the `lse` form, reading the forward's O and log-sum-exp (a second output the
//! forward now writes) instead of rebuilding them. A backend runs it on the graph it is given when its attention
//! backward can use them (the CUDA executor's flash kernels); the CPU backend needs neither and never runs it.
//!
//! What it costs is explicit in the graph, so the memory planner accounts for it: the log-sum-exp (B·H·Lq floats,
//! never L²) and O live from the forward to the backward.
//!
//! The rewrite is in place: every value and node keeps its id (callers address a compiled program by the ids of
//! the graph they compiled, and run node ranges by node index), the log-sum-exps are new values appended at the
//! end. A backward is paired with the latest attention before it that has its op attributes and reads the very
//! same q, k and v: under activation recomputation that is the recomputed copy in the backward, so the forward's
//! own O still dies early. A backward with no such forward (a graph holding only the backward) is left as it is.

use crate::error::Result;
use crate::graph::ir::{Graph, NodeId, Value, ValueId, ValueKind};
use crate::graph::op::Op;

/// `g` with every `AttentionBackward { lse: false }` that `wants` (called with the graph and the backward node)
/// and that has its forward in the graph turned into the `lse` form; returns the new graph and how many backward
/// nodes were rewritten.
pub fn carry_attention_lse(g: &Graph, wants: &dyn Fn(&Graph, NodeId) -> bool) -> Result<(Graph, usize)> {
    let mut out = g.clone();
    let mut rewritten = 0;
    for b in 0..g.nodes.len() {
        let Op::AttentionBackward { scale, causal, lse: false } = g.nodes[b].op else { continue };
        if !wants(g, b) {
            continue;
        }
        let qkv = &g.nodes[b].inputs[..3];
        let forward = (0..b).rev().find(|&f| {
            matches!(out.nodes[f].op, Op::Attention { scale: s, causal: c, .. } if s == scale && c == causal)
                && out.nodes[f].inputs == qkv
        });
        let Some(f) = forward else { continue };
        let (o, lse) = forward_outputs(&mut out, f)?;
        let dout = g.nodes[b].inputs[3];
        let inputs = vec![qkv[0], qkv[1], qkv[2], o, lse, dout];
        let op = Op::AttentionBackward { scale, causal, lse: true };
        // Shape inference checks the new form; its outputs are the old ones.
        let ins: Vec<_> = inputs.iter().map(|&v| (out.shape(v), out.dtype(v))).collect();
        op.infer(&ins)?;
        out.nodes[b].op = op;
        out.nodes[b].inputs = inputs;
        rewritten += 1;
    }
    out.validate()?;
    Ok((out, rewritten))
}

/// The forward attention node `f`'s O and log-sum-exp, giving it the log-sum-exp output when it has none yet.
fn forward_outputs(g: &mut Graph, f: NodeId) -> Result<(ValueId, ValueId)> {
    let Op::Attention { scale, causal, lse } = g.nodes[f].op else { unreachable!("paired with an attention node") };
    let o = g.nodes[f].outputs[0];
    if lse {
        return Ok((o, g.nodes[f].outputs[1]));
    }
    let op = Op::Attention { scale, causal, lse: true };
    let ins: Vec<_> = g.nodes[f].inputs.iter().map(|&v| (g.shape(v), g.dtype(v))).collect();
    let (shape, dtype) = op.infer(&ins)?.swap_remove(1);
    let name = format!("{}.lse", g.values[o].name);
    g.values.push(Value { shape, dtype, kind: ValueKind::Intermediate, name, producer: Some((f, 1)) });
    let lse = g.values.len() - 1;
    g.nodes[f].op = op;
    g.nodes[f].outputs.push(lse);
    Ok((o, lse))
}
