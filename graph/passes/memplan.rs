//! The memory planner: every intermediate gets an offset in one arena, chosen from liveness, so
//! a step allocates nothing and its peak is known before it runs.
//!
//! A value is live from the node that produces it to the last node that reads it (both
//! inclusive, so a node's inputs and outputs never share bytes). Reshapes are views: they share
//! their input's storage. Each node may also ask for scratch (im2col buffers, half-precision
//! staging) live only while it runs. Placement is greedy by size, largest first, each at the
//! lowest offset that does not collide with an already placed buffer whose lifetime overlaps.

use crate::error::{Error, Result};
use crate::graph::ir::{Graph, NodeId, ValueId};

/// Buffers start at multiples of this, so any dtype and SIMD load is aligned.
pub const ALIGN: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// In the arena at this byte offset.
    Arena(usize),
    /// A view of (or the storage of) a source value: parameter, input or state.
    Source(ValueId),
}

/// One planned arena buffer: a value's storage (with its views) or a node's scratch.
#[derive(Clone, Debug)]
pub struct Buffer {
    pub offset: usize,
    pub bytes: usize,
    /// First and last node index at which it is live, inclusive.
    pub start: NodeId,
    pub end: NodeId,
    pub what: String,
}

#[derive(Clone, Debug)]
pub struct MemoryPlan {
    /// Per value: where its bytes are (None for values no node produces or reads).
    pub locations: Vec<Option<Location>>,
    /// Per node: its scratch offset and size in the arena.
    pub scratch: Vec<Option<(usize, usize)>>,
    pub buffers: Vec<Buffer>,
    /// The arena size: the planned peak of intermediate memory.
    pub arena_bytes: usize,
    /// What the intermediates and scratch would take without reuse.
    pub unplanned_bytes: usize,
    /// Parameters, inputs and optimizer state, which live outside the arena.
    pub source_bytes: usize,
}

fn align_up(x: usize, align: usize) -> usize {
    x.div_ceil(align) * align
}

/// The value whose storage `v` uses: itself, or for a view, its input's root.
pub fn storage_root(g: &Graph, v: ValueId) -> ValueId {
    let mut v = v;
    while let Some((n, _)) = g.values[v].producer {
        if g.nodes[n].op.is_view() {
            v = g.nodes[n].inputs[0];
        } else {
            break;
        }
    }
    v
}

/// Plans the arena for `g`; `scratch_bytes(node)` is the scratch the backend needs for a node.
pub fn plan_memory(g: &Graph, scratch_bytes: &dyn Fn(NodeId) -> usize) -> Result<MemoryPlan> {
    plan_memory_aligned(g, scratch_bytes, ALIGN)
}

/// [`plan_memory`] with every buffer starting at a multiple of `align` (a power of two, at least [`ALIGN`]): 256
/// for CUDA, whose libraries pick their fastest paths for 256-byte aligned operands.
pub fn plan_memory_aligned(g: &Graph, scratch_bytes: &dyn Fn(NodeId) -> usize, align: usize) -> Result<MemoryPlan> {
    if !align.is_power_of_two() || align < ALIGN {
        return Err(Error::msg(format!("memory plan: alignment {align} must be a power of two >= {ALIGN}")));
    }
    let align = |x: usize| align_up(x, align);
    let nv = g.values.len();
    let end_of_step = g.nodes.len().saturating_sub(1);
    let mut start = vec![usize::MAX; nv];
    let mut end = vec![0usize; nv];
    let mut used = vec![false; nv];
    for (i, node) in g.nodes.iter().enumerate() {
        for &o in &node.outputs {
            let r = storage_root(g, o);
            start[r] = start[r].min(i);
            end[r] = end[r].max(i);
            used[o] = true;
        }
        for &v in &node.inputs {
            let r = storage_root(g, v);
            end[r] = end[r].max(i);
            used[v] = true;
        }
    }
    for &o in &g.outputs {
        let r = storage_root(g, o);
        end[r] = end_of_step;
        used[o] = true;
    }

    let mut buffers: Vec<Buffer> = Vec::new();
    let mut buffer_of_root = vec![usize::MAX; nv];
    for v in 0..nv {
        let val = &g.values[v];
        if val.kind.is_source() || storage_root(g, v) != v || !used[v] {
            continue;
        }
        buffer_of_root[v] = buffers.len();
        buffers.push(Buffer {
            offset: 0,
            bytes: align(val.bytes()),
            start: start[v],
            end: end[v],
            what: val.name.clone(),
        });
    }
    let mut scratch_buffer = vec![usize::MAX; g.nodes.len()];
    for (i, node) in g.nodes.iter().enumerate() {
        let b = scratch_bytes(i);
        if b > 0 {
            scratch_buffer[i] = buffers.len();
            buffers.push(Buffer {
                offset: 0,
                bytes: align(b),
                start: i,
                end: i,
                what: format!("scratch of {}", node.op.name()),
            });
        }
    }

    // Greedy by size: big buffers first get the low offsets, small ones fill the gaps.
    let mut order: Vec<usize> = (0..buffers.len()).collect();
    order.sort_by_key(|&b| (std::cmp::Reverse(buffers[b].bytes), buffers[b].start));
    let mut placed: Vec<usize> = Vec::new();
    let mut arena_bytes = 0;
    for &b in &order {
        let (s, e, size) = (buffers[b].start, buffers[b].end, buffers[b].bytes);
        let mut conflicts: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&p| buffers[p].start <= e && s <= buffers[p].end)
            .map(|&p| (buffers[p].offset, buffers[p].offset + buffers[p].bytes))
            .collect();
        conflicts.sort_unstable();
        let mut offset = 0;
        for (lo, hi) in conflicts {
            if offset + size <= lo {
                break;
            }
            offset = offset.max(hi);
        }
        buffers[b].offset = offset;
        arena_bytes = arena_bytes.max(offset + size);
        placed.push(b);
    }

    let mut locations = vec![None; nv];
    for v in 0..nv {
        if !used[v] && !g.values[v].kind.is_source() {
            continue;
        }
        let r = storage_root(g, v);
        locations[v] = Some(if g.values[r].kind.is_source() {
            Location::Source(r)
        } else {
            Location::Arena(buffers[buffer_of_root[r]].offset)
        });
    }
    let scratch =
        scratch_buffer.iter().map(|&b| (b != usize::MAX).then(|| (buffers[b].offset, buffers[b].bytes))).collect();
    let unplanned_bytes = buffers.iter().map(|b| b.bytes).sum();
    let source_bytes = g.values.iter().filter(|v| v.kind.is_source()).map(|v| v.bytes()).sum();
    let plan = MemoryPlan { locations, scratch, buffers, arena_bytes, unplanned_bytes, source_bytes };
    plan.verify()?;
    Ok(plan)
}

impl MemoryPlan {
    /// Checks every pair of buffers: if their lifetimes overlap, their bytes must not.
    pub fn verify(&self) -> Result<()> {
        let mut by_start: Vec<&Buffer> = self.buffers.iter().collect();
        by_start.sort_by_key(|b| b.start);
        for (i, a) in by_start.iter().enumerate() {
            if a.offset + a.bytes > self.arena_bytes {
                return Err(Error::msg(format!("memory plan: {} runs past the arena", a.what)));
            }
            for b in &by_start[i + 1..] {
                if b.start > a.end {
                    break;
                }
                if a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes {
                    return Err(Error::msg(format!(
                        "memory plan: {} and {} are live together and overlap",
                        a.what, b.what
                    )));
                }
            }
        }
        Ok(())
    }

    /// A one-line summary for logs and `inspect`.
    pub fn summary(&self) -> String {
        format!(
            "arena {:.2} MiB planned (without reuse {:.2} MiB), parameters/inputs/state {:.2} MiB",
            self.arena_bytes as f64 / 1048576.0,
            self.unplanned_bytes as f64 / 1048576.0,
            self.source_bytes as f64 / 1048576.0
        )
    }
}
