//! Dead-code elimination: keeps the nodes that produce graph outputs or have side effects
//! (the optimizer update), and whatever they read.

use super::rewrite::{Rewriter, ValueMap};
use crate::error::Result;
use crate::graph::ir::Graph;

pub fn dce(g: &Graph) -> Result<(Graph, ValueMap)> {
    let mut live_value = vec![false; g.values.len()];
    for &o in &g.outputs {
        live_value[o] = true;
    }
    let mut live_node = vec![false; g.nodes.len()];
    for (i, node) in g.nodes.iter().enumerate().rev() {
        if node.op.has_side_effects() || node.outputs.iter().any(|&o| live_value[o]) {
            live_node[i] = true;
            for &v in &node.inputs {
                live_value[v] = true;
            }
        }
    }
    let mut rw = Rewriter::new(g);
    for (i, &live) in live_node.iter().enumerate() {
        if live {
            rw.emit(i);
        }
    }
    Ok(rw.finish())
}
