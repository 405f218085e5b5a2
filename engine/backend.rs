//! The interface every backend implements. It is shaped for asynchronous devices: a compiled
//! program owns its device buffers, data moves by explicit host↔device copies, and `launch`
//! only enqueues a step; `synchronize` waits for it. The CPU backend runs synchronously behind
//! the same calls.

use super::tensor::HostTensor;
use crate::error::Result;
use crate::graph::passes::MemoryPlan;
use crate::graph::{Graph, ValueId};

/// What every backend checks before a host-to-device copy: only sources (inputs, parameters, state) are written,
/// with exactly their declared shape and dtype.
pub fn check_upload(graph: &Graph, v: ValueId, t: &HostTensor) -> Result<()> {
    let val = &graph.values[v];
    if !val.kind.is_source() {
        return Err(crate::Error::Binding {
            name: val.name.clone(),
            msg: "only inputs, parameters and state can be written".into(),
        });
    }
    if t.shape != val.shape || t.dtype != val.dtype {
        return Err(crate::Error::Binding {
            name: val.name.clone(),
            msg: format!("expected {} {}, got {} {}", val.shape, val.dtype, t.shape, t.dtype),
        });
    }
    Ok(())
}

/// The ranks a graph's all-reduce nodes sum over (`None` without any), checked to be one world size.
pub fn all_reduce_world(graph: &Graph) -> Result<Option<usize>> {
    let mut world = None;
    for (i, n) in graph.nodes.iter().enumerate() {
        if let crate::graph::Op::AllReduce { world_size, .. } = n.op {
            if world.is_some_and(|w| w != world_size) {
                return Err(crate::Error::msg(format!(
                    "node {i} (all_reduce) sums over {world_size} ranks, an earlier one over {}",
                    world.unwrap_or(0)
                )));
            }
            world = Some(world_size);
        }
    }
    Ok(world)
}

/// What every backend checks when it is handed a communicator: the graph's all-reduce nodes were built for its
/// world size.
pub fn check_communicator(graph: &Graph, comm: &dyn crate::engine::dist::Communicator) -> Result<()> {
    match all_reduce_world(graph)? {
        Some(w) if w != comm.world_size() => Err(crate::Error::msg(format!(
            "the step sums its gradients over {w} ranks, but the communicator joins {} (rank {})",
            comm.world_size(),
            comm.rank()
        ))),
        _ => Ok(()),
    }
}

/// A range of nodes to launch must lie within the graph.
pub fn check_node_range(graph: &Graph, nodes: &std::ops::Range<usize>) -> Result<()> {
    if nodes.start > nodes.end || nodes.end > graph.nodes.len() {
        return Err(crate::Error::msg(format!(
            "cannot launch nodes {}..{} of a program of {} nodes",
            nodes.start,
            nodes.end,
            graph.nodes.len()
        )));
    }
    Ok(())
}

pub trait Backend {
    type Program: Program;
    fn name(&self) -> &'static str;
    /// Plans memory and prepares every kernel of `graph`; allocates all device memory once.
    fn compile(&self, graph: Graph) -> Result<Self::Program>;
}

pub trait Program {
    fn graph(&self) -> &Graph;
    fn plan(&self) -> &MemoryPlan;
    /// Host → device copy into a source value (parameter, input or optimizer state).
    fn upload(&mut self, v: ValueId, t: &HostTensor) -> Result<()>;
    /// Device → host copy of any value that is still held (sources, graph outputs).
    fn download(&mut self, v: ValueId) -> Result<HostTensor>;
    /// Enqueues one execution of the whole graph.
    fn launch(&mut self) -> Result<()> {
        let n = self.graph().nodes.len();
        self.launch_nodes(0..n)
    }
    /// Enqueues one execution of the nodes in `nodes`, in order: a part of a step that runs more often than the rest
    /// (an accumulating step runs its micro-batch nodes once per micro-batch and its update once per step; see
    /// `graph::optim::update_start` for what makes such a split sound).
    fn launch_nodes(&mut self, nodes: std::ops::Range<usize>) -> Result<()>;
    /// Waits until every enqueued step has finished.
    fn synchronize(&mut self) -> Result<()>;

    /// Starts (or stops) timing every kernel; `echo` prints one line per kernel as it runs.
    fn set_profiling(&mut self, on: bool, echo: bool);
    /// The timings gathered since profiling started.
    fn profile(&self) -> Option<&crate::engine::profile::Profile>;

    /// Hands the program the communicator its all-reduce nodes (`Op::AllReduce`) sum the gradients through, once,
    /// before the first launch; its world size must be the one the step was built for. A backend that cannot sum
    /// across ranks refuses it.
    fn set_communicator(&mut self, comm: std::sync::Arc<dyn crate::engine::dist::Communicator>) -> Result<()> {
        let _ = comm;
        Err(crate::Error::msg("this backend cannot train in data parallel (it takes no communicator)"))
    }

    /// Uploads by source name.
    fn upload_named(&mut self, name: &str, t: &HostTensor) -> Result<()> {
        let v = self
            .graph()
            .find(name)
            .ok_or_else(|| crate::Error::Binding { name: name.into(), msg: "no such input or parameter".into() })?;
        self.upload(v, t)
    }
}
