//! The fusion pass: groups pointwise ops with each other and into the normalisation, convolution or
//! matrix product before them (epilogue fusion), and the AdamW updates into multi-tensor kernels.
//!
//! Candidates are producer→consumer edges between fusable nodes with the same iteration space,
//! scored by the bytes fusion saves (the intermediate's write and read, or only the read when
//! it must still be stored for another reader), and merged greedily, best first, as Inductor's
//! scheduler does. A merge is refused, with the reason logged, when it would create a cycle
//! (a path leaving the group and coming back), put two anchors (normalisations, convolutions,
//! products) in one group, give an anchor a prologue, or grow a group past `MAX_GROUP` ops.
//! Finally the planned peak is compared with the unfused graph's, and the weakest merges are
//! undone until fusion no longer raises it.
//!
//! Fusion runs after autodiff, on the forward and backward alike: a backward convolution
//! (`conv2d_backward_input`) anchors the gradient ops that consume it (SiLU's backward, gradient
//! sums) just as a forward one anchors its bias, residual and time-embedding adds. Every member
//! computes what autodiff wrote; only where the intermediates live changes.

use super::kernel::{Anchor, FusedKernel, Instr, MultiAdamW, Reg};
use crate::error::Result;
use crate::graph::ir::{Graph, NodeId, ValueId};
use crate::graph::op::{Layout, Op};
use crate::graph::passes::plan_memory;
use crate::graph::passes::rewrite::{Rewriter, ValueMap};
use std::collections::{BTreeMap, BinaryHeap, HashMap};

/// Largest number of ops in one fused group (bounds registers and code size).
pub const MAX_GROUP: usize = 24;
/// Parameters updated by one multi-tensor AdamW kernel.
pub const ADAMW_TENSORS_PER_KERNEL: usize = 64;

#[derive(Clone, Debug, Default)]
pub struct FusionReport {
    /// One line per decision: fused, refused (with the reason), undone.
    pub log: Vec<String>,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub peak_before: usize,
    pub peak_after: usize,
    pub fused_groups: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Pointwise,
    Anchor,
    Other,
}

fn kind(g: &Graph, n: NodeId) -> Kind {
    let node = &g.nodes[n];
    let floats = node.inputs.iter().chain(&node.outputs).all(|&v| g.dtype(v).is_float());
    if !floats || node.outputs.len() != 1 {
        return Kind::Other;
    }
    match node.op {
        Op::Unary(_)
        | Op::UnaryBackward(_)
        | Op::Binary(_)
        | Op::Affine { .. }
        | Op::Cast { .. }
        | Op::BroadcastTo { .. } => Kind::Pointwise,
        // Channels-last convolutions and GroupNorms run alone for now (see `Anchor::of`).
        Op::GroupNorm { layout: Layout::Nhwc, .. }
        | Op::Conv2d { layout: Layout::Nhwc, .. }
        | Op::Conv2dBackwardInput { layout: Layout::Nhwc, .. } => Kind::Other,
        Op::GroupNorm { .. } | Op::LayerNorm { .. } => Kind::Anchor,
        // A product with an empty operand (a sum over nothing) is written as zeros by the backends' empty-tensor
        // path, which knows the plain ops only.
        Op::MatMul { .. } | Op::Conv2d { .. } | Op::Conv2dBackwardInput { .. } => {
            if node.inputs.iter().any(|&v| g.shape(v).numel() == 0) {
                Kind::Other
            } else {
                Kind::Anchor
            }
        }
        Op::Fill { .. }
        | Op::Conv2dBackwardWeight { .. }
        | Op::GroupNormBackward { .. }
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
        | Op::Embedding
        | Op::EmbeddingBackward { .. }
        | Op::TimestepEmbedding { .. }
        | Op::ReduceSum { .. }
        | Op::SumTo { .. }
        | Op::MseLoss
        | Op::MseLossBackward
        | Op::AdamW { .. }
        | Op::AccumulateGrad
        | Op::AllReduce { .. }
        | Op::Fused(_)
        | Op::MultiAdamW(_) => Kind::Other,
    }
}

/// A convolution or matrix product (an anchor that is not a normalisation).
fn is_product(g: &Graph, n: NodeId) -> bool {
    kind(g, n) == Kind::Anchor && !matches!(g.nodes[n].op, Op::GroupNorm { .. } | Op::LayerNorm { .. })
}

fn label(g: &Graph, n: NodeId) -> String {
    format!("{}_{n}", g.nodes[n].op.name())
}

/// Union-find over nodes with member lists.
struct Groups {
    parent: Vec<usize>,
    members: Vec<Vec<NodeId>>,
}

impl Groups {
    fn new(n: usize) -> Self {
        Groups { parent: (0..n).collect(), members: (0..n).map(|i| vec![i]).collect() }
    }
    fn find(&mut self, x: usize) -> usize {
        let mut r = x;
        while self.parent[r] != r {
            r = self.parent[r];
        }
        let mut y = x;
        while self.parent[y] != r {
            let next = self.parent[y];
            self.parent[y] = r;
            y = next;
        }
        r
    }
    fn union(&mut self, a: usize, b: usize) -> usize {
        let (big, small) = if self.members[a].len() >= self.members[b].len() { (a, b) } else { (b, a) };
        self.parent[small] = big;
        let moved = std::mem::take(&mut self.members[small]);
        self.members[big].extend(moved);
        big
    }
}

struct Ctx<'a> {
    g: &'a Graph,
    consumers: Vec<Vec<NodeId>>,
    /// For each node, the nodes that read its outputs.
    succ: Vec<Vec<NodeId>>,
}

impl Ctx<'_> {
    /// Whether merging groups `a` and `b` would create a cycle: some path from one group leaves
    /// both and re-enters the other.
    fn creates_cycle(&self, groups: &mut Groups, a: usize, b: usize) -> Option<NodeId> {
        let (ra, rb) = (groups.find(a), groups.find(b));
        let in_ab: Vec<NodeId> = groups.members[ra].iter().chain(&groups.members[rb]).copied().collect();
        let limit = *in_ab.iter().max().unwrap_or(&0);
        let mut inside = vec![false; self.g.nodes.len()];
        for &m in &in_ab {
            inside[m] = true;
        }
        let mut seen = vec![false; self.g.nodes.len()];
        let mut stack: Vec<(NodeId, NodeId)> = Vec::new(); // (node, the outside node the path left through)
        for &m in &in_ab {
            for &s in &self.succ[m] {
                if !inside[s] && !seen[s] {
                    seen[s] = true;
                    stack.push((s, s));
                }
            }
        }
        while let Some((n, via)) = stack.pop() {
            for &s in &self.succ[n] {
                if inside[s] {
                    return Some(via);
                }
                // Nodes are in topological order: nothing after the group's last member leads back.
                if s <= limit && !seen[s] {
                    seen[s] = true;
                    stack.push((s, via));
                }
            }
        }
        None
    }
}

/// Runs fusion on `g`.
pub fn fuse(g: &Graph) -> Result<(Graph, ValueMap, FusionReport)> {
    let n = g.nodes.len();
    let consumers = g.consumers();
    let mut succ = vec![Vec::new(); n];
    for (i, node) in g.nodes.iter().enumerate() {
        for &o in &node.outputs {
            for &c in &consumers[o] {
                if !succ[i].contains(&c) {
                    succ[i].push(c);
                }
            }
        }
    }
    let ctx = Ctx { g, consumers, succ };
    let mut report = FusionReport { nodes_before: n, ..Default::default() };
    let is_output: Vec<bool> = {
        let mut v = vec![false; g.values.len()];
        for &o in &g.outputs {
            v[o] = true;
        }
        v
    };

    // Candidates: (score, producer, consumer).
    let mut candidates: Vec<(usize, NodeId, NodeId)> = Vec::new();
    for (p, node) in g.nodes.iter().enumerate() {
        let kp = kind(g, p);
        if kp == Kind::Other {
            continue;
        }
        let v = node.outputs[0];
        for &c in &ctx.consumers[v] {
            if kind(g, c) != Kind::Pointwise || g.shape(g.nodes[c].outputs[0]) != g.shape(v) {
                continue;
            }
            let only_reader = ctx.consumers[v].len() == 1 && !is_output[v];
            let bytes = g.values[v].bytes();
            if !only_reader && is_product(g, p) {
                // The product is stored anyway: its epilogue would save one read, but hold the product and the
                // epilogue's outputs together while the convolution's scratch (im2col) is live, which raised the
                // tiny config's planned arena by 2%. (The memory guard below sees values, not backend scratch.)
                // Nor is it faster: allowed, bench_small's hint-encoder convolutions with SiLU epilogues took
                // 0.4-0.5 ms longer per pair than the convolution and the plain SiLU (per-kernel minima of three
                // interleaved `zeroconv profile` runs, 2026-12-03): the product is written either way, and the
                // epilogue's block-wise evaluation cost more than the one read it saved.
                report.log.push(format!(
                    "refuse {} -> {}: the product is read elsewhere too, so it would be held with the epilogue's output",
                    label(g, p),
                    label(g, c)
                ));
                continue;
            }
            candidates.push((if only_reader { 2 * bytes } else { bytes }, p, c));
        }
    }
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));

    let mut groups = Groups::new(n);
    let mut accepted: Vec<(usize, NodeId, NodeId)> = Vec::new();
    for &(score, p, c) in &candidates {
        let (gp, gc) = (groups.find(p), groups.find(c));
        if gp == gc {
            continue;
        }
        let pair = format!("{} -> {}", label(g, p), label(g, c));
        let size = groups.members[gp].len() + groups.members[gc].len();
        if size > MAX_GROUP {
            report.log.push(format!("refuse {pair}: the group would hold {size} ops (limit {MAX_GROUP})"));
            continue;
        }
        let anchors: Vec<NodeId> = groups.members[gp]
            .iter()
            .chain(&groups.members[gc])
            .copied()
            .filter(|&m| kind(g, m) == Kind::Anchor)
            .collect();
        if anchors.len() > 1 {
            report.log.push(format!(
                "refuse {pair}: two anchors ({}) cannot share a kernel",
                anchors.iter().map(|&a| label(g, a)).collect::<Vec<_>>().join(", ")
            ));
            continue;
        }
        if let Some(&a) = anchors.first() {
            let merged: Vec<NodeId> = groups.members[gp].iter().chain(&groups.members[gc]).copied().collect();
            let fed =
                g.nodes[a].inputs.iter().any(|&v| g.values[v].producer.is_some_and(|(pn, _)| merged.contains(&pn)));
            if fed {
                report.log.push(format!(
                    "refuse {pair}: {} would get a prologue (its input computed in the group)",
                    label(g, a)
                ));
                continue;
            }
        }
        if let Some(via) = ctx.creates_cycle(&mut groups, gp, gc) {
            report.log.push(format!("refuse {pair}: would create a cycle through {}", label(g, via)));
            continue;
        }
        groups.union(gp, gc);
        accepted.push((score, p, c));
        report.log.push(format!("fuse {pair}: saves {score} bytes"));
    }

    // The memory guard: undo the weakest merges until fusion does not raise the planned peak.
    let peak_before = plan_memory(g, &|_| 0)?.arena_bytes;
    let mut keep = accepted.len();
    let mut built = build(g, &groups_from(n, &accepted[..keep]), &ctx, &is_output)?;
    let mut peak_after = plan_memory(&built.0, &|_| 0)?.arena_bytes;
    while peak_after > peak_before && keep > 0 {
        // Drop the weakest quarter at a time (at least one merge) and re-plan.
        let drop = (keep / 4).max(1);
        for &(score, p, c) in accepted[keep - drop..keep].iter().rev() {
            report.log.push(format!(
                "undo {} -> {} (saves {score} bytes): fusion raised the planned peak",
                label(g, p),
                label(g, c)
            ));
        }
        keep -= drop;
        built = build(g, &groups_from(n, &accepted[..keep]), &ctx, &is_output)?;
        peak_after = plan_memory(&built.0, &|_| 0)?.arena_bytes;
    }
    let (graph, map, fused_groups) = built;
    report.peak_before = peak_before;
    report.peak_after = peak_after;
    report.nodes_after = graph.nodes.iter().filter(|n| !n.op.is_view()).count();
    report.nodes_before = g.nodes.iter().filter(|n| !n.op.is_view()).count();
    report.fused_groups = fused_groups;
    Ok((graph, map, report))
}

/// Member lists (sorted) of the groups that the `merges` produce, by representative.
fn groups_from(n: usize, merges: &[(usize, NodeId, NodeId)]) -> Vec<Vec<NodeId>> {
    let mut gr = Groups::new(n);
    for &(_, p, c) in merges {
        let (a, b) = (gr.find(p), gr.find(c));
        if a != b {
            gr.union(a, b);
        }
    }
    let mut out = Vec::new();
    for i in 0..n {
        if gr.find(i) == i {
            let mut m = gr.members[i].clone();
            m.sort_unstable();
            out.push(m);
        }
    }
    out
}

/// Builds the fused graph: one node per group (multi-member groups become `Op::Fused`), AdamW
/// nodes grouped into multi-tensor kernels, ordered topologically with each group at the place
/// of its last member. Returns the graph, the value map and the number of fused groups.
fn build(g: &Graph, groups: &[Vec<NodeId>], ctx: &Ctx, is_output: &[bool]) -> Result<(Graph, ValueMap, usize)> {
    let n = g.nodes.len();
    // Units: fused groups, AdamW batches, and single nodes.
    let mut unit_of = vec![usize::MAX; n];
    let mut units: Vec<Vec<NodeId>> = Vec::new();
    for members in groups {
        if members.len() > 1 {
            for &m in members {
                unit_of[m] = units.len();
            }
            units.push(members.clone());
        }
    }
    let adamw: Vec<NodeId> = (0..n).filter(|&i| matches!(g.nodes[i].op, Op::AdamW { .. })).collect();
    let mut adamw_batches: BTreeMap<(u64, u64, u64, u64), Vec<NodeId>> = BTreeMap::new();
    for &a in &adamw {
        if let Op::AdamW { beta1, beta2, eps, weight_decay } = &g.nodes[a].op {
            adamw_batches.entry((beta1.0, beta2.0, eps.0, weight_decay.0)).or_default().push(a);
        }
    }
    for batch in adamw_batches.values() {
        for chunk in batch.chunks(ADAMW_TENSORS_PER_KERNEL) {
            if chunk.len() > 1 {
                for &m in chunk {
                    unit_of[m] = units.len();
                }
                units.push(chunk.to_vec());
            }
        }
    }
    for (i, u) in unit_of.iter_mut().enumerate() {
        if *u == usize::MAX {
            *u = units.len();
            units.push(vec![i]);
        }
    }
    // Kahn's algorithm over units, earliest "last member" first.
    let nu = units.len();
    let mut indeg = vec![0usize; nu];
    let mut out_edges: Vec<Vec<usize>> = vec![Vec::new(); nu];
    for (u, members) in units.iter().enumerate() {
        let mut preds: Vec<usize> = Vec::new();
        for &m in members {
            for &v in &g.nodes[m].inputs {
                if let Some((p, _)) = g.values[v].producer {
                    let pu = unit_of[p];
                    if pu != u && !preds.contains(&pu) {
                        preds.push(pu);
                    }
                }
            }
        }
        indeg[u] = preds.len();
        for p in preds {
            out_edges[p].push(u);
        }
    }
    let key = |u: usize| std::cmp::Reverse(*units[u].iter().max().expect("non-empty unit"));
    let mut heap: BinaryHeap<(std::cmp::Reverse<NodeId>, usize)> = BinaryHeap::new();
    for (u, &d) in indeg.iter().enumerate() {
        if d == 0 {
            heap.push((key(u), u));
        }
    }
    let mut rw = Rewriter::new(g);
    let mut fused_groups = 0;
    let mut emitted = 0;
    while let Some((_, u)) = heap.pop() {
        emitted += 1;
        let members = &units[u];
        if members.len() == 1 {
            rw.emit(members[0]);
        } else if matches!(g.nodes[members[0]].op, Op::AdamW { .. }) {
            emit_multi_adamw(g, &mut rw, members)?;
            fused_groups += 1;
        } else {
            emit_fused(g, &mut rw, members, ctx, is_output)?;
            fused_groups += 1;
        }
        for &v in &out_edges[u] {
            indeg[v] -= 1;
            if indeg[v] == 0 {
                heap.push((key(v), v));
            }
        }
    }
    if emitted != nu {
        return Err(crate::Error::msg("fusion bug: the fused graph has a cycle"));
    }
    let (graph, map) = rw.finish();
    Ok((graph, map, fused_groups))
}

fn emit_multi_adamw(g: &Graph, rw: &mut Rewriter, members: &[NodeId]) -> Result<()> {
    let Op::AdamW { beta1, beta2, eps, weight_decay } = g.nodes[members[0]].op.clone() else {
        unreachable!("AdamW batch")
    };
    let mut inputs = Vec::new();
    for &m in members {
        inputs.extend(g.nodes[m].inputs[..4].iter().map(|&v| rw.mapped(v)));
    }
    inputs.push(rw.mapped(g.nodes[members[0]].inputs[4]));
    let id = rw.new.nodes.len();
    let k =
        MultiAdamW { name: format!("fused_adamw_multi_{id}"), tensors: members.len(), beta1, beta2, eps, weight_decay };
    rw.new.set_phase(g.nodes[members[0]].phase);
    rw.new.add_node(Op::MultiAdamW(Box::new(k)), &inputs)?;
    Ok(())
}

fn emit_fused(g: &Graph, rw: &mut Rewriter, members: &[NodeId], ctx: &Ctx, is_output: &[bool]) -> Result<()> {
    let in_group = |n: NodeId| members.binary_search(&n).is_ok();
    let mut inputs: Vec<ValueId> = Vec::new(); // old value ids
    let mut body: Vec<Instr> = Vec::new();
    let mut reg_of: HashMap<ValueId, Reg> = HashMap::new();
    let mut anchor = Anchor::None;
    let mut ops = Vec::new();
    // An anchor's operands (a normalisation's x, gamma and beta; a convolution's x, w and bias; a product's
    // operands) are the first inputs.
    if let Some(&a) = members.iter().find(|&&m| kind(g, m) == Kind::Anchor) {
        inputs.extend(&g.nodes[a].inputs);
        anchor = Anchor::of(&g.nodes[a].op, g.nodes[a].inputs.len()).expect("anchor kinds");
    }
    let load =
        |v: ValueId, body: &mut Vec<Instr>, reg_of: &mut HashMap<ValueId, Reg>, inputs: &mut Vec<ValueId>| -> Reg {
            if let Some(&r) = reg_of.get(&v) {
                return r;
            }
            let i = inputs.iter().position(|&x| x == v).unwrap_or_else(|| {
                inputs.push(v);
                inputs.len() - 1
            });
            body.push(Instr::Load(i));
            reg_of.insert(v, body.len() - 1);
            body.len() - 1
        };
    for &m in members {
        let node = &g.nodes[m];
        ops.push(node.op.name());
        let arg =
            |k: usize, body: &mut Vec<Instr>, reg_of: &mut HashMap<ValueId, Reg>, inputs: &mut Vec<ValueId>| -> Reg {
                load(node.inputs[k], body, reg_of, inputs)
            };
        let instr = match &node.op {
            Op::GroupNorm { .. }
            | Op::LayerNorm { .. }
            | Op::Conv2d { .. }
            | Op::Conv2dBackwardInput { .. }
            | Op::MatMul { .. } => Instr::Anchor,
            Op::Unary(u) => Instr::Unary(*u, arg(0, &mut body, &mut reg_of, &mut inputs)),
            Op::UnaryBackward(u) => {
                let x = arg(0, &mut body, &mut reg_of, &mut inputs);
                Instr::UnaryBackward(*u, x, arg(1, &mut body, &mut reg_of, &mut inputs))
            }
            Op::Binary(b) => {
                let x = arg(0, &mut body, &mut reg_of, &mut inputs);
                Instr::Binary(*b, x, arg(1, &mut body, &mut reg_of, &mut inputs))
            }
            Op::Affine { alpha, beta } => Instr::Affine(arg(0, &mut body, &mut reg_of, &mut inputs), *alpha, *beta),
            Op::Cast { to } => Instr::Round(arg(0, &mut body, &mut reg_of, &mut inputs), *to),
            Op::BroadcastTo { .. } => {
                // The loader broadcasts: the op is just a load of its (smaller) input.
                let r = arg(0, &mut body, &mut reg_of, &mut inputs);
                reg_of.insert(node.outputs[0], r);
                continue;
            }
            op => unreachable!("{} is not fusable", op.name()),
        };
        body.push(instr);
        reg_of.insert(node.outputs[0], body.len() - 1);
    }
    // Outputs: member values read outside the group or by the caller.
    let mut out_values: Vec<ValueId> = Vec::new();
    for &m in members {
        let v = g.nodes[m].outputs[0];
        if is_output[v] || ctx.consumers[v].iter().any(|&c| !in_group(c)) {
            out_values.push(v);
        }
    }
    let last = *members.last().expect("non-empty");
    let shape = g.shape(g.nodes[last].outputs[0]).clone();
    let id = rw.new.nodes.len();
    let mut names: Vec<String> = Vec::new();
    for o in &ops {
        if names.last() != Some(o) && o != "broadcast_to" {
            names.push(o.clone());
        }
    }
    let name = if names.len() > 5 {
        format!("fused_{}_etc_{id}", names[..5].join("_"))
    } else {
        format!("fused_{}_{id}", names.join("_"))
    };
    let k = FusedKernel {
        name,
        ops,
        anchor,
        shape,
        input_shapes: inputs.iter().map(|&v| g.shape(v).clone()).collect(),
        body,
        outputs: out_values.iter().map(|v| (reg_of[v], g.dtype(*v))).collect(),
    };
    let mapped: Vec<ValueId> = inputs.iter().map(|&v| rw.mapped(v)).collect();
    rw.new.set_phase(g.nodes[last].phase);
    let outs = rw.new.add_node(Op::Fused(Box::new(k)), &mapped)?;
    for (&old, &new) in out_values.iter().zip(&outs) {
        rw.new.values[new].name = g.values[old].name.clone();
        rw.alias(old, new);
    }
    Ok(())
}
