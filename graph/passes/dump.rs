//! A readable text dump of a graph, one line per node:
//! `%12 = conv2d(%3, %4, %5) stride=1 padding=1 : [2,64,32,32] f32   # fwd ckpt`

use crate::graph::ir::{Graph, Phase, ValueKind};
use std::fmt::Write;

pub fn dump(g: &Graph) -> String {
    let mut s = String::new();
    let (mut sources, mut bytes) = (0, 0usize);
    for (i, v) in g.values.iter().enumerate() {
        if v.kind.is_source() {
            let kind = match v.kind {
                ValueKind::Input => "input",
                ValueKind::Param { trainable: true } => "param",
                ValueKind::Param { trainable: false } => "frozen",
                ValueKind::State => "state",
                ValueKind::Intermediate => unreachable!("is_source"),
            };
            let _ = writeln!(s, "%{i} = {kind} \"{}\" : {} {}", v.name, v.shape, v.dtype);
            sources += 1;
        }
    }
    for node in &g.nodes {
        let outs: Vec<String> = node.outputs.iter().map(|o| format!("%{o}")).collect();
        let ins: Vec<String> = node.inputs.iter().map(|v| format!("%{v}")).collect();
        let types: Vec<String> = node
            .outputs
            .iter()
            .map(|&o| {
                bytes += g.values[o].bytes();
                format!("{} {}", g.values[o].shape, g.values[o].dtype)
            })
            .collect();
        let lhs = if outs.is_empty() { String::new() } else { format!("{} = ", outs.join(", ")) };
        let phase = match node.phase {
            Phase::Forward => "fwd",
            Phase::Backward => "bwd",
            Phase::Update => "update",
        };
        let attrs = node.op.attrs();
        let _ = writeln!(
            s,
            "{lhs}{}({}){}{} : {}   # {phase}{}",
            node.op.name(),
            ins.join(", "),
            if attrs.is_empty() { "" } else { " " },
            attrs,
            if types.is_empty() { "()".to_string() } else { types.join(", ") },
            if node.checkpoint { " ckpt" } else { "" }
        );
    }
    let outs: Vec<String> = g.outputs.iter().map(|o| format!("%{o}")).collect();
    let _ = writeln!(
        s,
        "outputs: {}\n# {} sources, {} nodes, {} bytes of intermediates",
        outs.join(", "),
        sources,
        g.nodes.len(),
        bytes
    );
    s
}
