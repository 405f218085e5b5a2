//! Activation recomputation ("activation checkpointing"; named so here to keep it apart from weight checkpoint
//! files) as a rewrite: activations produced by nodes marked `checkpoint` are
//! not kept for the backward. Each backward node that reads one gets a recomputed copy instead,
//! emitted just before its first backward reader, so the forward original dies early and the
//! recomputed one lives only through the backward of its segment.

use super::rewrite::{Rewriter, ValueMap};
use crate::error::Result;
use crate::graph::ir::{Graph, NodeId, Phase, ValueId};
use std::collections::HashMap;

pub fn recompute(g: &Graph) -> Result<(Graph, ValueMap)> {
    let mut rw = Rewriter::new(g);
    // Old value → its recomputed new value.
    let mut recomputed: HashMap<ValueId, ValueId> = HashMap::new();
    for (i, node) in g.nodes.iter().enumerate() {
        if node.phase == Phase::Forward {
            rw.emit(i);
            continue;
        }
        let inputs: Vec<ValueId> = node.inputs.iter().map(|&v| resolve(g, &mut rw, &mut recomputed, v)).collect();
        let outs = rw.emit_copy(i, inputs, None);
        for (&o, &no) in node.outputs.iter().zip(&outs) {
            rw.alias(o, no);
        }
    }
    Ok(rw.finish())
}

fn is_recomputable(g: &Graph, n: NodeId) -> bool {
    let node = &g.nodes[n];
    node.checkpoint && node.phase == Phase::Forward && !node.op.has_side_effects()
}

/// The new value a backward node should read for old value `v`.
fn resolve(g: &Graph, rw: &mut Rewriter, recomputed: &mut HashMap<ValueId, ValueId>, v: ValueId) -> ValueId {
    match g.values[v].producer {
        Some((n, _)) if is_recomputable(g, n) => {
            if let Some(&r) = recomputed.get(&v) {
                return r;
            }
            let inputs: Vec<ValueId> = g.nodes[n].inputs.iter().map(|&u| resolve(g, rw, recomputed, u)).collect();
            let outs = rw.emit_copy(n, inputs, Some(Phase::Backward));
            for (&o, &no) in g.nodes[n].outputs.iter().zip(&outs) {
                recomputed.insert(o, no);
            }
            recomputed[&v]
        }
        _ => rw.mapped(v),
    }
}
