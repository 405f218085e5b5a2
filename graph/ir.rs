//! The graph: values with static shapes and dtypes, and nodes (ops) in a topological order.
//!
//! Nodes are appended in execution order, so the node list is always a valid schedule.
//! Values are produced by exactly one node, except sources (inputs, parameters, optimizer state).

use super::dtype::DType;
use super::op::{BinaryOp, F64Bits, Layout, Op, UnaryOp};
use super::shape::Shape;
use crate::error::{Error, Result};

pub type ValueId = usize;
pub type NodeId = usize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// Fed by the caller every step.
    Input,
    /// A model weight; `trainable` ones receive gradients.
    Param { trainable: bool },
    /// Persistent buffers that are not weights (optimizer moments).
    State,
    /// Produced by a node; lives in the planned arena.
    Intermediate,
}

impl ValueKind {
    /// Sources live outside the arena and persist across steps.
    pub fn is_source(&self) -> bool {
        !matches!(self, ValueKind::Intermediate)
    }
}

/// Which part of the step a node belongs to; passes (checkpointing) use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    Forward,
    Backward,
    Update,
}

#[derive(Clone, Debug)]
pub struct Value {
    pub shape: Shape,
    pub dtype: DType,
    pub kind: ValueKind,
    pub name: String,
    /// The node that produces it and the output index, for intermediates.
    pub producer: Option<(NodeId, usize)>,
}

impl Value {
    pub fn bytes(&self) -> usize {
        self.shape.numel() * self.dtype.size()
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    pub phase: Phase,
    /// Marked activations are not kept for the backward: the checkpoint pass recomputes them.
    pub checkpoint: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub values: Vec<Value>,
    pub nodes: Vec<Node>,
    /// Values the caller reads after a step (the loss, metrics).
    pub outputs: Vec<ValueId>,
    /// While set, new nodes are marked for recomputation (see `checkpoint_scope`).
    checkpointing: bool,
    phase: Option<Phase>,
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn value(&self, v: ValueId) -> &Value {
        &self.values[v]
    }
    pub fn shape(&self, v: ValueId) -> &Shape {
        &self.values[v].shape
    }
    pub fn dtype(&self, v: ValueId) -> DType {
        self.values[v].dtype
    }

    fn add_source(&mut self, name: &str, shape: Shape, dtype: DType, kind: ValueKind) -> ValueId {
        self.values.push(Value { shape, dtype, kind, name: name.to_string(), producer: None });
        self.values.len() - 1
    }

    pub fn input(&mut self, name: &str, shape: impl Into<Shape>, dtype: DType) -> ValueId {
        self.add_source(name, shape.into(), dtype, ValueKind::Input)
    }
    pub fn param(&mut self, name: &str, shape: impl Into<Shape>, dtype: DType, trainable: bool) -> ValueId {
        self.add_source(name, shape.into(), dtype, ValueKind::Param { trainable })
    }
    pub fn state(&mut self, name: &str, shape: impl Into<Shape>, dtype: DType) -> ValueId {
        self.add_source(name, shape.into(), dtype, ValueKind::State)
    }

    /// Finds a source value by name.
    pub fn find(&self, name: &str) -> Option<ValueId> {
        self.values.iter().position(|v| v.kind.is_source() && v.name == name)
    }

    /// Trainable parameters, in creation order.
    pub fn trainable_params(&self) -> Vec<ValueId> {
        (0..self.values.len()).filter(|&v| self.values[v].kind == ValueKind::Param { trainable: true }).collect()
    }

    pub fn set_phase(&mut self, phase: Phase) {
        self.phase = Some(phase);
    }

    /// Runs `f` with every node it adds marked for recomputation in the backward pass.
    pub fn checkpoint_scope<T>(&mut self, f: impl FnOnce(&mut Graph) -> Result<T>) -> Result<T> {
        let saved = self.set_checkpointing(true);
        let r = f(self);
        self.set_checkpointing(saved);
        r
    }

    /// Marks (or stops marking) new nodes for recomputation; returns the previous setting.
    pub fn set_checkpointing(&mut self, on: bool) -> bool {
        std::mem::replace(&mut self.checkpointing, on)
    }

    pub fn checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// Appends a node after checking its inputs; returns its outputs.
    pub fn add_node(&mut self, op: Op, inputs: &[ValueId]) -> Result<Vec<ValueId>> {
        let ins: Vec<(&Shape, DType)> = inputs.iter().map(|&v| (&self.values[v].shape, self.values[v].dtype)).collect();
        let outs = op.infer(&ins)?;
        let id = self.nodes.len();
        let base = op.name();
        let outputs = outs
            .into_iter()
            .enumerate()
            .map(|(i, (shape, dtype))| {
                self.values.push(Value {
                    shape,
                    dtype,
                    kind: ValueKind::Intermediate,
                    name: format!("{base}_{id}{}", if i > 0 { format!(".{i}") } else { String::new() }),
                    producer: Some((id, i)),
                });
                self.values.len() - 1
            })
            .collect();
        self.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            outputs,
            phase: self.phase.unwrap_or(Phase::Forward),
            checkpoint: self.checkpointing,
        });
        Ok(self.nodes[id].outputs.clone())
    }

    /// Appends a single-output node.
    pub fn op1(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId> {
        let outs = self.add_node(op, inputs)?;
        outs.first().copied().ok_or_else(|| Error::msg("op produced no value"))
    }

    // ---- builders: one per op, so model code reads like PyTorch ----

    pub fn fill(&mut self, value: f64, shape: impl Into<Shape>, dtype: DType) -> Result<ValueId> {
        self.op1(Op::Fill { value: F64Bits::new(value), shape: shape.into(), dtype }, &[])
    }
    pub fn unary(&mut self, u: UnaryOp, x: ValueId) -> Result<ValueId> {
        self.op1(Op::Unary(u), &[x])
    }
    pub fn silu(&mut self, x: ValueId) -> Result<ValueId> {
        self.unary(UnaryOp::Silu, x)
    }
    pub fn binary(&mut self, b: BinaryOp, x: ValueId, y: ValueId) -> Result<ValueId> {
        self.op1(Op::Binary(b), &[x, y])
    }
    pub fn add(&mut self, x: ValueId, y: ValueId) -> Result<ValueId> {
        self.binary(BinaryOp::Add, x, y)
    }
    pub fn sub(&mut self, x: ValueId, y: ValueId) -> Result<ValueId> {
        self.binary(BinaryOp::Sub, x, y)
    }
    pub fn mul(&mut self, x: ValueId, y: ValueId) -> Result<ValueId> {
        self.binary(BinaryOp::Mul, x, y)
    }
    pub fn div(&mut self, x: ValueId, y: ValueId) -> Result<ValueId> {
        self.binary(BinaryOp::Div, x, y)
    }
    pub fn affine(&mut self, x: ValueId, alpha: f64, beta: f64) -> Result<ValueId> {
        self.op1(Op::Affine { alpha: F64Bits::new(alpha), beta: F64Bits::new(beta) }, &[x])
    }
    pub fn scale(&mut self, x: ValueId, alpha: f64) -> Result<ValueId> {
        self.affine(x, alpha, 0.0)
    }
    pub fn cast(&mut self, x: ValueId, to: DType) -> Result<ValueId> {
        if self.dtype(x) == to {
            return Ok(x);
        }
        self.op1(Op::Cast { to }, &[x])
    }
    pub fn matmul(&mut self, a: ValueId, b: ValueId) -> Result<ValueId> {
        self.op1(Op::MatMul { trans_a: false, trans_b: false }, &[a, b])
    }
    pub fn matmul_t(&mut self, a: ValueId, b: ValueId, trans_a: bool, trans_b: bool) -> Result<ValueId> {
        self.op1(Op::MatMul { trans_a, trans_b }, &[a, b])
    }
    /// x [..., in] · w [out, in]ᵀ + b [out], as `torch.nn.Linear`.
    pub fn linear(&mut self, x: ValueId, w: ValueId, b: Option<ValueId>) -> Result<ValueId> {
        let y = self.matmul_t(x, w, false, true)?;
        match b {
            Some(b) => self.add(y, b),
            None => Ok(y),
        }
    }
    pub fn conv2d(
        &mut self,
        x: ValueId,
        w: ValueId,
        b: Option<ValueId>,
        stride: usize,
        padding: usize,
    ) -> Result<ValueId> {
        let mut ins = vec![x, w];
        ins.extend(b);
        self.op1(Op::Conv2d { stride, padding, layout: Layout::Nchw }, &ins)
    }
    pub fn group_norm(
        &mut self,
        x: ValueId,
        gamma: ValueId,
        beta: ValueId,
        groups: usize,
        eps: f64,
    ) -> Result<ValueId> {
        self.op1(Op::GroupNorm { groups, eps: F64Bits::new(eps), layout: Layout::Nchw }, &[x, gamma, beta])
    }
    pub fn layer_norm(&mut self, x: ValueId, gamma: ValueId, beta: ValueId, eps: f64) -> Result<ValueId> {
        self.op1(Op::LayerNorm { eps: F64Bits::new(eps) }, &[x, gamma, beta])
    }
    pub fn softmax(&mut self, x: ValueId) -> Result<ValueId> {
        self.op1(Op::Softmax, &[x])
    }
    pub fn attention(&mut self, q: ValueId, k: ValueId, v: ValueId, scale: f64, causal: bool) -> Result<ValueId> {
        self.op1(Op::Attention { scale: F64Bits::new(scale), causal, lse: false }, &[q, k, v])
    }
    /// Attention that also outputs its row log-sum-exp (see [`Op::Attention`]): (o, lse).
    pub fn attention_with_lse(
        &mut self,
        q: ValueId,
        k: ValueId,
        v: ValueId,
        scale: f64,
        causal: bool,
    ) -> Result<(ValueId, ValueId)> {
        let outs = self.add_node(Op::Attention { scale: F64Bits::new(scale), causal, lse: true }, &[q, k, v])?;
        Ok((outs[0], outs[1]))
    }
    pub fn upsample2x(&mut self, x: ValueId) -> Result<ValueId> {
        self.op1(Op::Upsample2x, &[x])
    }
    pub fn concat(&mut self, xs: &[ValueId], axis: usize) -> Result<ValueId> {
        self.op1(Op::Concat { axis }, xs)
    }
    pub fn slice(&mut self, x: ValueId, axis: usize, start: usize, end: usize) -> Result<ValueId> {
        self.op1(Op::Slice { axis, start, end }, &[x])
    }
    /// Splits `x` into `n` equal parts along `axis`, as `torch.chunk` does for divisible sizes.
    pub fn chunk(&mut self, x: ValueId, n: usize, axis: usize) -> Result<Vec<ValueId>> {
        let size = self.shape(x).0.get(axis).copied().unwrap_or(0);
        if n == 0 || size % n != 0 {
            return Err(Error::shape("chunk", format!("axis {axis} of {} does not split into {n}", self.shape(x))));
        }
        let part = size / n;
        (0..n).map(|i| self.slice(x, axis, i * part, (i + 1) * part)).collect()
    }
    pub fn reshape(&mut self, x: ValueId, shape: impl Into<Shape>) -> Result<ValueId> {
        let shape = shape.into();
        if *self.shape(x) == shape {
            return Ok(x);
        }
        self.op1(Op::Reshape { shape }, &[x])
    }
    pub fn permute(&mut self, x: ValueId, perm: &[usize]) -> Result<ValueId> {
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return Ok(x);
        }
        self.op1(Op::Permute { perm: perm.to_vec() }, &[x])
    }
    pub fn embedding(&mut self, table: ValueId, ids: ValueId) -> Result<ValueId> {
        self.op1(Op::Embedding, &[table, ids])
    }
    pub fn timestep_embedding(&mut self, t: ValueId, dim: usize, max_period: f64) -> Result<ValueId> {
        self.op1(Op::TimestepEmbedding { dim, max_period: F64Bits::new(max_period) }, &[t])
    }
    pub fn sum(&mut self, x: ValueId, axes: &[usize], keepdim: bool) -> Result<ValueId> {
        self.op1(Op::ReduceSum { axes: axes.to_vec(), keepdim }, &[x])
    }
    /// Mean over all elements (a scalar).
    pub fn mean_all(&mut self, x: ValueId) -> Result<ValueId> {
        let n = self.shape(x).numel();
        let axes: Vec<usize> = (0..self.shape(x).rank()).collect();
        let s = self.sum(x, &axes, false)?;
        self.scale(s, 1.0 / n as f64)
    }
    pub fn mean(&mut self, x: ValueId, axes: &[usize], keepdim: bool) -> Result<ValueId> {
        let n: usize = axes.iter().map(|&a| self.shape(x).0.get(a).copied().unwrap_or(1)).product();
        let s = self.sum(x, axes, keepdim)?;
        self.scale(s, 1.0 / n as f64)
    }
    pub fn broadcast_to(&mut self, x: ValueId, shape: impl Into<Shape>) -> Result<ValueId> {
        let shape = shape.into();
        if *self.shape(x) == shape {
            return Ok(x);
        }
        self.op1(Op::BroadcastTo { shape }, &[x])
    }
    pub fn sum_to(&mut self, x: ValueId, shape: impl Into<Shape>) -> Result<ValueId> {
        let shape = shape.into();
        if *self.shape(x) == shape {
            return Ok(x);
        }
        self.op1(Op::SumTo { shape }, &[x])
    }
    pub fn mse_loss(&mut self, pred: ValueId, target: ValueId) -> Result<ValueId> {
        self.op1(Op::MseLoss, &[pred, target])
    }

    /// Every node that reads each value, in node order.
    pub fn consumers(&self) -> Vec<Vec<NodeId>> {
        let mut c = vec![Vec::new(); self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for &v in &n.inputs {
                if c[v].last() != Some(&i) {
                    c[v].push(i);
                }
            }
        }
        c
    }

    /// Checks the invariants passes rely on: topological order and producers that agree with nodes.
    pub fn validate(&self) -> Result<()> {
        let mut defined: Vec<bool> = self.values.iter().map(|v| v.kind.is_source()).collect();
        for (i, n) in self.nodes.iter().enumerate() {
            for &v in &n.inputs {
                if !defined[v] {
                    return Err(Error::msg(format!(
                        "node {i} ({}) reads {} before it is produced",
                        n.op.name(),
                        self.values[v].name
                    )));
                }
            }
            for (k, &o) in n.outputs.iter().enumerate() {
                if self.values[o].producer != Some((i, k)) {
                    return Err(Error::msg(format!("value {} has a stale producer", self.values[o].name)));
                }
                defined[o] = true;
            }
        }
        for &o in &self.outputs {
            if !defined[o] {
                return Err(Error::msg(format!("graph output {} is never produced", self.values[o].name)));
            }
        }
        Ok(())
    }
}
