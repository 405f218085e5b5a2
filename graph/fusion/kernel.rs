//! What a fused group computes, as a small register program over one iteration space.
//!
//! A pointwise group evaluates `body` once per output element: `Load`s read the group's inputs
//! (broadcast to the iteration space), the other instructions compute, and `outputs` name the
//! registers stored. An anchored group first runs a normalisation (GroupNorm or LayerNorm) whose
//! per-element result is the `Anchor` register, so its epilogue runs while the data is hot.
//! Multi-tensor AdamW groups update many parameters in one kernel.

use crate::graph::op::{BinaryOp, F64Bits, UnaryOp};
use crate::graph::{DType, Shape};

pub type Reg = usize;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Instr {
    /// Input `i` of the fused node, broadcast to the iteration space.
    Load(usize),
    /// The anchor's normalised output (anchored groups only).
    Anchor,
    Const(F64Bits),
    Unary(UnaryOp, Reg),
    /// (x, dy) → dy · f'(x).
    UnaryBackward(UnaryOp, Reg, Reg),
    Binary(BinaryOp, Reg, Reg),
    Affine(Reg, F64Bits, F64Bits),
    /// Rounds to `DType`'s precision (the value stays in the compute type).
    Round(Reg, DType),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Anchor {
    None,
    /// Inputs 0, 1, 2 of the fused node are x, gamma, beta.
    GroupNorm {
        groups: usize,
        eps: F64Bits,
    },
    /// Inputs 0, 1, 2 of the fused node are x, gamma, beta.
    LayerNorm {
        eps: F64Bits,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FusedKernel {
    /// What it contains, e.g. `fused_groupnorm_silu_12`.
    pub name: String,
    /// The ops fused into it, in order.
    pub ops: Vec<String>,
    pub anchor: Anchor,
    /// The iteration space: every output has this shape.
    pub shape: Shape,
    /// Shapes of the fused node's inputs (each broadcasts to `shape`; anchors' gamma/beta excepted).
    pub input_shapes: Vec<Shape>,
    pub body: Vec<Instr>,
    /// Registers stored, one per output of the fused node, with the dtype stored.
    pub outputs: Vec<(Reg, DType)>,
}

/// Many AdamW updates in one kernel: inputs are (param, grad, m, v) per tensor, then the hyper input.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MultiAdamW {
    pub name: String,
    pub tensors: usize,
    pub beta1: F64Bits,
    pub beta2: F64Bits,
    pub eps: F64Bits,
    pub weight_decay: F64Bits,
}

impl FusedKernel {
    /// Registers the body needs (one per instruction).
    pub fn registers(&self) -> usize {
        self.body.len()
    }
}
