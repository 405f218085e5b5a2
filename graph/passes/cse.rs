//! Common-subexpression elimination: two nodes with the same op and the same inputs compute
//! the same values, so the second reads the first's outputs instead. Dead nodes left behind are
//! removed by DCE.

use super::rewrite::{Rewriter, ValueMap};
use crate::error::Result;
use crate::graph::ir::{Graph, ValueId};
use crate::graph::op::Op;
use std::collections::HashMap;

pub fn cse(g: &Graph) -> Result<(Graph, ValueMap)> {
    let mut rw = Rewriter::new(g);
    let mut seen: HashMap<(Op, Vec<ValueId>), Vec<ValueId>> = HashMap::new();
    for (i, node) in g.nodes.iter().enumerate() {
        let inputs: Vec<ValueId> = node.inputs.iter().map(|&v| rw.mapped(v)).collect();
        if !node.op.has_side_effects() {
            if let Some(existing) = seen.get(&(node.op.clone(), inputs.clone())) {
                for (&o, &e) in node.outputs.iter().zip(existing) {
                    rw.alias(o, e);
                }
                continue;
            }
        }
        let outs = rw.emit(i);
        if !node.op.has_side_effects() {
            seen.insert((node.op.clone(), inputs), outs);
        }
    }
    Ok(rw.finish())
}
