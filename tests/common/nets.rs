//! A small conv + GroupNorm + attention net with residual connections, the shape of a U-Net
//! block, for autodiff, planner, checkpointing and training tests.
#![allow(dead_code)]

use super::Rng;
use zeroconv::engine::{HostTensor, Program};
use zeroconv::graph::{DType, Graph, Shape, ValueId};
use zeroconv::Result;

pub struct NetSpec {
    pub batch: usize,
    pub in_ch: usize,
    pub ch: usize,
    pub hw: usize,
    pub blocks: usize,
    /// Wrap each block's interior in a checkpoint scope.
    pub checkpoint: bool,
    pub dtype: DType,
}

pub struct Net {
    pub g: Graph,
    pub x: ValueId,
    pub target: ValueId,
    pub out: ValueId,
    pub loss: ValueId,
    pub params: Vec<ValueId>,
}

/// A trainable parameter used in `dtype`. Half-precision nets keep f32 master weights (as mixed-precision training
/// does, and as AdamW requires) and compute with a cast of them.
fn p(g: &mut Graph, name: &str, shape: &[usize], dtype: DType, params: &mut Vec<ValueId>) -> ValueId {
    let master = if dtype.is_half() { DType::F32 } else { dtype };
    let v = g.param(name, Shape::new(shape), master, true);
    params.push(v);
    if master == dtype {
        v
    } else {
        g.cast(v, dtype).expect("cast of a parameter")
    }
}

/// Builds the net on `g` from input `x` [B, in_ch, hw, hw]; returns the output [B, in_ch, hw, hw].
pub fn build_body(g: &mut Graph, x: ValueId, s: &NetSpec, params: &mut Vec<ValueId>) -> Result<ValueId> {
    let dt = s.dtype;
    let w0 = p(g, "conv_in.weight", &[s.ch, s.in_ch, 3, 3], dt, params);
    let b0 = p(g, "conv_in.bias", &[s.ch], dt, params);
    let mut h = g.conv2d(x, w0, Some(b0), 1, 1)?;
    for i in 0..s.blocks {
        let gn_w = p(g, &format!("block{i}.norm.weight"), &[s.ch], dt, params);
        let gn_b = p(g, &format!("block{i}.norm.bias"), &[s.ch], dt, params);
        let cw = p(g, &format!("block{i}.conv.weight"), &[s.ch, s.ch, 3, 3], dt, params);
        let cb = p(g, &format!("block{i}.conv.bias"), &[s.ch], dt, params);
        let body = |g: &mut Graph| -> Result<ValueId> {
            let n = g.group_norm(h, gn_w, gn_b, 2, 1e-5)?;
            let a = g.silu(n)?;
            g.conv2d(a, cw, Some(cb), 1, 1)
        };
        let r = if s.checkpoint { g.checkpoint_scope(body)? } else { body(g)? };
        h = g.add(h, r)?;
    }
    // One attention block over the spatial positions, one head.
    let l = s.hw * s.hw;
    let an_w = p(g, "attn.norm.weight", &[s.ch], dt, params);
    let an_b = p(g, "attn.norm.bias", &[s.ch], dt, params);
    let wq = p(g, "attn.q.weight", &[s.ch, s.ch], dt, params);
    let wk = p(g, "attn.k.weight", &[s.ch, s.ch], dt, params);
    let wv = p(g, "attn.v.weight", &[s.ch, s.ch], dt, params);
    let wo = p(g, "attn.out.weight", &[s.ch, s.ch], dt, params);
    let bo = p(g, "attn.out.bias", &[s.ch], dt, params);
    let attn = |g: &mut Graph| -> Result<ValueId> {
        let n = g.group_norm(h, an_w, an_b, 2, 1e-5)?;
        let seq = g.reshape(n, [s.batch, s.ch, l])?;
        let seq = g.permute(seq, &[0, 2, 1])?;
        let q = g.linear(seq, wq, None)?;
        let k = g.linear(seq, wk, None)?;
        let v = g.linear(seq, wv, None)?;
        let (q, k, v) = (
            g.reshape(q, [s.batch, 1, l, s.ch])?,
            g.reshape(k, [s.batch, 1, l, s.ch])?,
            g.reshape(v, [s.batch, 1, l, s.ch])?,
        );
        let a = g.attention(q, k, v, 1.0 / (s.ch as f64).sqrt(), false)?;
        let a = g.reshape(a, [s.batch, l, s.ch])?;
        let o = g.linear(a, wo, Some(bo))?;
        let o = g.permute(o, &[0, 2, 1])?;
        g.reshape(o, [s.batch, s.ch, s.hw, s.hw])
    };
    let a = if s.checkpoint { g.checkpoint_scope(attn)? } else { attn(g)? };
    h = g.add(h, a)?;
    let wf = p(g, "conv_out.weight", &[s.in_ch, s.ch, 1, 1], dt, params);
    let bf = p(g, "conv_out.bias", &[s.in_ch], dt, params);
    let h = g.silu(h)?;
    g.conv2d(h, wf, Some(bf), 1, 0)
}

pub fn build(s: &NetSpec) -> Net {
    let mut g = Graph::new();
    let x = g.input("x", [s.batch, s.in_ch, s.hw, s.hw], s.dtype);
    let target = g.input("target", [s.batch, s.in_ch, s.hw, s.hw], s.dtype);
    let mut params = Vec::new();
    let out = build_body(&mut g, x, s, &mut params).expect("net builds");
    let loss = g.mse_loss(out, target).expect("loss");
    Net { g, x, target, out, loss, params }
}

/// Deterministic initial values: weights scaled by 1/sqrt(fan-in), norms at 1 ± noise.
pub fn init_values(g: &Graph, params: &[ValueId], seed: u64) -> Vec<(ValueId, HostTensor)> {
    let mut rng = Rng::new(seed);
    params
        .iter()
        .map(|&v| {
            let val = g.value(v);
            let n = val.shape.numel();
            let data: Vec<f64> = if val.name.contains("norm.weight") {
                (0..n).map(|_| 1.0 + 0.1 * rng.uniform()).collect()
            } else if val.shape.rank() >= 2 {
                let fan_in: usize = val.shape.dims()[1..].iter().product();
                (0..n).map(|_| rng.uniform() / (fan_in as f64).sqrt()).collect()
            } else {
                (0..n).map(|_| 0.1 * rng.uniform()).collect()
            };
            (v, HostTensor::from_f64(val.shape.clone(), val.dtype, &data).unwrap())
        })
        .collect()
}

/// A net whose training step has been appended, optimised: the graph, and the ids of its inputs, loss, parameters
/// and initial values remapped into it.
pub struct OptimizedNet {
    pub graph: Graph,
    pub x: ValueId,
    pub target: ValueId,
    pub loss: ValueId,
    pub params: Vec<ValueId>,
    pub init: Vec<(ValueId, HostTensor)>,
}

/// Optimises `net` (its step already appended; fusion on or off) and remaps its ids and `init` (its parameters'
/// initial values) into the optimised graph.
pub fn optimize(net: Net, init: Vec<(ValueId, HostTensor)>, fusion: bool) -> OptimizedNet {
    use zeroconv::graph::passes::{self, PassOptions};
    let opt = passes::optimize(&net.g, &PassOptions { fusion, ..Default::default() }).unwrap();
    let m = |v: ValueId| opt.map.get(v).unwrap();
    OptimizedNet {
        x: m(net.x),
        target: m(net.target),
        loss: m(net.loss),
        params: net.params.iter().map(|&v| m(v)).collect(),
        init: init.into_iter().map(|(v, t)| (m(v), t)).collect(),
        graph: opt.graph,
    }
}

/// The net of `spec` as one optimised training step (MSE, clipping at norm 1, AdamW with PyTorch's defaults), with
/// its initial values and ids remapped into the optimised graph.
pub struct TrainingStep {
    pub graph: Graph,
    pub init: Vec<(ValueId, HostTensor)>,
    pub loss: ValueId,
    pub params: Vec<ValueId>,
}

impl TrainingStep {
    /// Uploads the parameters' initial values into `p`.
    pub fn upload_init<P: Program>(&self, p: &mut P) {
        for (v, t) in &self.init {
            p.upload(*v, t).unwrap();
        }
    }

    /// Step `t`'s inputs: `x` and `target` drawn (in that order) from a generator seeded by the step, so every
    /// backend trains on the same data, in the graph's shapes and dtype; and AdamW's hyper-parameters at rate `lr`.
    pub fn step_inputs(&self, t: u64, lr: f64) -> Vec<(&'static str, HostTensor)> {
        use zeroconv::graph::optim::{adamw_hyper, AdamWConfig, HYPER_INPUT};
        let mut rng = Rng::new(100 + t);
        let mut draw = |name: &'static str| {
            let value = self.graph.value(self.graph.find(name).expect("the step has this input"));
            let data = rng.vec(value.shape.numel());
            (name, HostTensor::from_f64(value.shape.clone(), value.dtype, &data).unwrap())
        };
        let (x, target) = (draw("x"), draw("target"));
        let hyper = adamw_hyper(&AdamWConfig::default(), lr, t);
        vec![x, target, (HYPER_INPUT, HostTensor::from_f64([3], DType::F32, &hyper).unwrap())]
    }

    /// Uploads step `t`'s inputs ([`TrainingStep::step_inputs`]) into `p`.
    pub fn upload_step_inputs<P: Program>(&self, p: &mut P, t: u64, lr: f64) {
        for (name, x) in self.step_inputs(t, lr) {
            p.upload_named(name, &x).unwrap();
        }
    }

    /// From the initial values, `steps` steps at rate `lr`: each step's loss and parameters.
    pub fn run_steps<P: Program>(&self, p: &mut P, lr: f64, steps: u64) -> Vec<(f64, Vec<Vec<f64>>)> {
        self.upload_init(p);
        (1..=steps)
            .map(|t| {
                self.upload_step_inputs(p, t, lr);
                p.launch().unwrap_or_else(|e| panic!("step {t}: {e}"));
                let loss = p.download(self.loss).unwrap().to_f64()[0];
                (loss, self.params.iter().map(|&v| p.download(v).unwrap().to_f64()).collect())
            })
            .collect()
    }
}

pub fn training_step(spec: &NetSpec, fusion: bool) -> TrainingStep {
    use zeroconv::graph::optim::{append_training_step_clipped, AdamWConfig};
    use zeroconv::graph::passes::{self, PassOptions};
    let mut net = build(spec);
    let init = init_values(&net.g, &net.params, 11);
    net.g.outputs.push(net.loss);
    append_training_step_clipped(&mut net.g, net.loss, &AdamWConfig::default(), Some(1.0)).unwrap();
    let opts = PassOptions { checkpointing: spec.checkpoint, fusion, dumps: false, channels_last: false };
    let opt = passes::optimize(&net.g, &opts).unwrap();
    let init = init.into_iter().map(|(v, t)| (opt.map.get(v).unwrap(), t)).collect();
    let params = passes::remap_all(&opt.map, &net.params).unwrap();
    TrainingStep { loss: opt.map.get(net.loss).unwrap(), graph: opt.graph, init, params }
}
