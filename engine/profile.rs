//! Per-kernel timing: what `ZEROCONV_DEBUG=2` prints as each kernel runs and what
//! `zeroconv profile` tabulates and writes as a Chrome trace.

use crate::graph::cost::{display_shape, node_cost, Cost};
use crate::graph::{Graph, NodeId};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct KernelStat {
    pub node: NodeId,
    pub name: String,
    /// The ops inside (one for unfused kernels).
    pub ops: Vec<String>,
    pub shape: String,
    pub cost: Cost,
    pub launches: u64,
    pub total: Duration,
}

/// One kernel execution, for the trace.
#[derive(Clone, Debug)]
pub struct TraceEvent {
    pub node: NodeId,
    /// Since the profile started.
    pub start: Duration,
    pub duration: Duration,
    pub step: u64,
}

#[derive(Clone, Debug)]
pub struct Profile {
    pub kernels: Vec<KernelStat>,
    pub events: Vec<TraceEvent>,
    pub steps: u64,
    origin: Instant,
    /// Print one line per kernel as it runs (ZEROCONV_DEBUG=2).
    pub echo: bool,
}

impl Profile {
    pub fn new(g: &Graph, echo: bool) -> Self {
        let kernels = g
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| KernelStat {
                node: i,
                // Fused kernels are named (with their node id) by the fusion pass.
                name: match &n.op {
                    crate::graph::Op::Fused(_) | crate::graph::Op::MultiAdamW(_) => n.op.name(),
                    op => format!("{}_{i}", op.name()),
                },
                ops: match &n.op {
                    crate::graph::Op::Fused(k) => k.ops.clone(),
                    op => vec![op.name()],
                },
                shape: display_shape(g, n),
                cost: node_cost(g, n),
                launches: 0,
                total: Duration::ZERO,
            })
            .collect();
        Profile { kernels, events: Vec::new(), steps: 0, origin: Instant::now(), echo }
    }

    pub fn record(&mut self, node: NodeId, start: Instant, duration: Duration) {
        let k = &mut self.kernels[node];
        k.launches += 1;
        k.total += duration;
        self.events.push(TraceEvent { node, start: start - self.origin, duration, step: self.steps });
        if self.echo {
            let s = duration.as_secs_f64().max(1e-9);
            eprintln!(
                "{:<44} {:<22} {:>9.3} ms {:>8.2} GFLOP/s {:>8.2} GB/s",
                k.name,
                k.shape,
                s * 1e3,
                k.cost.flops / s / 1e9,
                k.cost.bytes / s / 1e9
            );
        }
    }

    pub fn end_step(&mut self) {
        self.steps += 1;
    }

    /// Kernels that ran, slowest first.
    pub fn ranked(&self) -> Vec<&KernelStat> {
        let mut v: Vec<&KernelStat> = self.kernels.iter().filter(|k| k.launches > 0).collect();
        v.sort_by_key(|k| std::cmp::Reverse(k.total));
        v
    }

    pub fn total(&self) -> Duration {
        self.kernels.iter().map(|k| k.total).sum()
    }

    /// The Chrome trace event format (loadable in Perfetto / chrome://tracing).
    pub fn chrome_trace(&self) -> String {
        let mut s = String::from("{\"traceEvents\":[\n");
        for (i, e) in self.events.iter().enumerate() {
            let k = &self.kernels[e.node];
            let sep = if i + 1 < self.events.len() { "," } else { "" };
            s.push_str(&format!(
                "{{\"name\":{},\"cat\":\"kernel\",\"ph\":\"X\",\"ts\":{:.3},\"dur\":{:.3},\"pid\":1,\"tid\":1,\"args\":{{\"ops\":{},\"shape\":{},\"step\":{},\"flops\":{},\"bytes\":{}}}}}{sep}\n",
                json_str(&k.name),
                e.start.as_secs_f64() * 1e6,
                e.duration.as_secs_f64() * 1e6,
                json_str(&k.ops.join(" ")),
                json_str(&k.shape),
                e.step,
                k.cost.flops,
                k.cost.bytes
            ));
        }
        s.push_str("],\"displayTimeUnit\":\"ms\"}\n");
        s
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}
