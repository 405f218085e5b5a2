//! Graph passes. Each is a pure function from a graph to a graph (plus a map from old value ids
//! to new ones); none touches a device.

pub mod all_reduce;
pub mod attention_lse;
pub mod channels_last;
pub mod cse;
pub mod dce;
pub mod dump;
pub mod memplan;
pub mod recompute;
pub mod rewrite;

pub use memplan::{plan_memory, plan_memory_aligned, Location, MemoryPlan};
pub use rewrite::ValueMap;

use super::ir::{Graph, ValueId};
use crate::error::Result;

/// Options for `optimize`.
#[derive(Clone, Debug, Default)]
pub struct PassOptions {
    /// Recompute the activations of nodes marked `checkpoint` in the backward.
    pub checkpointing: bool,
    /// Record a text dump before and after each pass.
    pub dumps: bool,
    /// Fuse pointwise chains, normalisation epilogues and the AdamW updates (`model.inductor`).
    pub fusion: bool,
    /// Run convolutions and GroupNorms on channels-last activations (`model.channels_last`).
    pub channels_last: bool,
}

/// The result of running the pass pipeline.
pub struct Optimized {
    pub graph: Graph,
    /// Old value id → new value id (None where the value was removed).
    pub map: ValueMap,
    /// (pass name, dump after it), the first being the input graph.
    pub dumps: Vec<(String, String)>,
    /// What the fusion pass decided (empty when fusion is off).
    pub fusion: Option<crate::graph::fusion::FusionReport>,
}

/// Runs CSE, DCE, (optionally) the channels-last rewrite, (optionally) checkpointing and (optionally) fusion, in
/// that order: CSE must come before checkpointing, or it would merge recomputed activations back into the forward
/// ones; the layout is chosen before checkpointing so the recomputed nodes are the rewritten ones; and fusion comes
/// last so it sees the recomputation too.
pub fn optimize(g: &Graph, opts: &PassOptions) -> Result<Optimized> {
    let mut dumps = Vec::new();
    if opts.dumps {
        dumps.push(("input".to_string(), dump::dump(g)));
    }
    let mut graph = g.clone();
    let mut map = ValueMap::identity(g.values.len());
    type Pass = fn(&Graph) -> Result<(Graph, ValueMap)>;
    let mut passes: Vec<(&str, Pass)> = vec![("cse", cse::cse), ("dce", dce::dce)];
    if opts.channels_last {
        passes.push(("channels_last", channels_last::channels_last));
    }
    if opts.checkpointing {
        passes.push(("recompute", recompute::recompute));
    }
    for (name, pass) in passes {
        let (next, m) = pass(&graph)?;
        next.validate()?;
        map = map.then(&m);
        graph = next;
        if opts.dumps {
            dumps.push((name.to_string(), dump::dump(&graph)));
        }
    }
    let mut fusion = None;
    if opts.fusion {
        let (next, m, report) = crate::graph::fusion::fuse(&graph)?;
        next.validate()?;
        map = map.then(&m);
        graph = next;
        if opts.dumps {
            dumps.push(("fusion".to_string(), dump::dump(&graph)));
        }
        fusion = Some(report);
    }
    Ok(Optimized { graph, map, dumps, fusion })
}

/// Maps a list of value ids through `map`, failing if one was removed.
pub fn remap_all(map: &ValueMap, vs: &[ValueId]) -> Option<Vec<ValueId>> {
    vs.iter().map(|&v| map.get(v)).collect()
}
