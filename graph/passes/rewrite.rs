//! Rebuilding a graph node by node with remapped value ids: the machinery every pass shares.

use crate::graph::ir::{Graph, Node, NodeId, Phase, Value, ValueId};

/// Old value id → new value id.
#[derive(Clone, Debug)]
pub struct ValueMap(pub Vec<Option<ValueId>>);

impl ValueMap {
    pub fn identity(n: usize) -> Self {
        ValueMap((0..n).map(Some).collect())
    }
    pub fn get(&self, v: ValueId) -> Option<ValueId> {
        self.0.get(v).copied().flatten()
    }
    /// `self` followed by `next`.
    pub fn then(&self, next: &ValueMap) -> ValueMap {
        ValueMap(self.0.iter().map(|v| v.and_then(|v| next.get(v))).collect())
    }
}

/// Builds a new graph from an old one: all sources are copied first (same order), then nodes
/// are emitted one at a time.
pub struct Rewriter<'a> {
    pub old: &'a Graph,
    pub new: Graph,
    pub map: Vec<Option<ValueId>>,
}

impl<'a> Rewriter<'a> {
    pub fn new(old: &'a Graph) -> Self {
        let mut new = Graph::new();
        let mut map = vec![None; old.values.len()];
        for (i, v) in old.values.iter().enumerate() {
            if v.kind.is_source() {
                new.values.push(v.clone());
                map[i] = Some(new.values.len() - 1);
            }
        }
        Rewriter { old, new, map }
    }

    /// The new id of an old value (it must have been emitted already).
    pub fn mapped(&self, v: ValueId) -> ValueId {
        self.map[v].unwrap_or_else(|| panic!("pass bug: value {} used before it was emitted", self.old.values[v].name))
    }

    /// Makes every later use of old value `v` read new value `to`.
    pub fn alias(&mut self, v: ValueId, to: ValueId) {
        self.map[v] = Some(to);
    }

    /// Emits old node `n` with its inputs mapped; maps its outputs to the new ones.
    pub fn emit(&mut self, n: NodeId) -> Vec<ValueId> {
        let inputs = self.old.nodes[n].inputs.iter().map(|&v| self.mapped(v)).collect();
        let outs = self.emit_copy(n, inputs, None);
        for (&o, &no) in self.old.nodes[n].outputs.iter().zip(&outs) {
            self.map[o] = Some(no);
        }
        outs
    }

    /// Emits a copy of old node `n` reading `inputs`, without touching the map (for clones).
    pub fn emit_copy(&mut self, n: NodeId, inputs: Vec<ValueId>, phase: Option<Phase>) -> Vec<ValueId> {
        let node = &self.old.nodes[n];
        let id = self.new.nodes.len();
        let outputs: Vec<ValueId> = node
            .outputs
            .iter()
            .enumerate()
            .map(|(k, &o)| {
                let v = &self.old.values[o];
                let name = if phase.is_some() { format!("{}.recompute", v.name) } else { v.name.clone() };
                self.new.values.push(Value { name, producer: Some((id, k)), ..v.clone() });
                self.new.values.len() - 1
            })
            .collect();
        self.new.nodes.push(Node {
            op: node.op.clone(),
            inputs,
            outputs: outputs.clone(),
            phase: phase.unwrap_or(node.phase),
            checkpoint: node.checkpoint && phase.is_none(),
        });
        outputs
    }

    pub fn finish(mut self) -> (Graph, ValueMap) {
        self.new.outputs = self.old.outputs.iter().map(|&o| self.mapped(o)).collect();
        (self.new, ValueMap(self.map))
    }
}
