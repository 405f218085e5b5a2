//! What a fused group computes, as a small register program over one iteration space.
//!
//! A pointwise group evaluates `body` once per output element: `Load`s read the group's inputs
//! (broadcast to the iteration space), the other instructions compute, and `outputs` name the
//! registers stored. An anchored group first runs a normalisation (GroupNorm or LayerNorm) whose
//! per-element result is the `Anchor` register, so its epilogue runs while the data is hot. A group
//! may instead be anchored on a convolution or a matrix product (its epilogue: bias, residual and
//! broadcast adds, activations, scaling), whose output element is the `Anchor` register: the CPU
//! applies the epilogue in the product's output loop, and a GPU backend can map the same group to a
//! library call with a fused epilogue (cuDNN's conv+bias+activation, cuBLASLt's bias/GELU
//! epilogues) or run the plain call and then the epilogue as a generated kernel
//! ([`FusedKernel::split_epilogue`]).
//! Multi-tensor AdamW groups update many parameters in one kernel.

use crate::graph::op::{BinaryOp, F64Bits, Layout, Op, UnaryOp};
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
    /// `Op::Conv2d`: inputs 0, 1 (and 2 with `bias`) of the fused node are x, w (and the bias); the
    /// iteration space is the convolution's output.
    Conv2d {
        stride: usize,
        padding: usize,
        bias: bool,
    },
    /// `Op::Conv2dBackwardInput`: inputs 0, 1 are dy, w; the iteration space is dx.
    Conv2dBackwardInput {
        stride: usize,
        padding: usize,
    },
    /// `Op::MatMul`: inputs 0, 1 are the operands; the iteration space is the product.
    MatMul {
        trans_a: bool,
        trans_b: bool,
    },
}

impl Anchor {
    /// How many leading inputs of the fused node the anchor reads.
    pub fn operands(&self) -> usize {
        match self {
            Anchor::None => 0,
            Anchor::GroupNorm { .. } | Anchor::LayerNorm { .. } => 3,
            Anchor::Conv2d { bias, .. } => 2 + usize::from(*bias),
            Anchor::Conv2dBackwardInput { .. } | Anchor::MatMul { .. } => 2,
        }
    }

    /// The anchor of a group whose anchor node runs `op`; None for ops that cannot anchor.
    pub fn of(op: &Op, inputs: usize) -> Option<Anchor> {
        Some(match op {
            // Channels-last convolutions and GroupNorms do not anchor yet: the backends' fused kernels walk NCHW.
            Op::GroupNorm { groups, eps, layout: Layout::Nchw } => Anchor::GroupNorm { groups: *groups, eps: *eps },
            Op::LayerNorm { eps } => Anchor::LayerNorm { eps: *eps },
            Op::Conv2d { stride, padding, layout: Layout::Nchw } => {
                Anchor::Conv2d { stride: *stride, padding: *padding, bias: inputs == 3 }
            }
            Op::Conv2dBackwardInput { stride, padding, layout: Layout::Nchw, .. } => {
                Anchor::Conv2dBackwardInput { stride: *stride, padding: *padding }
            }
            Op::MatMul { trans_a, trans_b } => Anchor::MatMul { trans_a: *trans_a, trans_b: *trans_b },
            _ => return None,
        })
    }

    /// The op of a convolution or matrix-product anchor (it reads the first [`Anchor::operands`] inputs and
    /// writes a tensor of the group's shape `out`); None for normalisations and pointwise groups.
    pub fn op(&self, out: &Shape) -> Option<Op> {
        match *self {
            Anchor::None | Anchor::GroupNorm { .. } | Anchor::LayerNorm { .. } => None,
            Anchor::Conv2d { stride, padding, .. } => Some(Op::Conv2d { stride, padding, layout: Layout::Nchw }),
            Anchor::Conv2dBackwardInput { stride, padding } => {
                let d = out.dims();
                Some(Op::Conv2dBackwardInput { stride, padding, h: d[2], w: d[3], layout: Layout::Nchw })
            }
            Anchor::MatMul { trans_a, trans_b } => Some(Op::MatMul { trans_a, trans_b }),
        }
    }

    /// A normalisation anchor, computed by the fused kernel itself.
    pub fn is_normalisation(&self) -> bool {
        matches!(self, Anchor::GroupNorm { .. } | Anchor::LayerNorm { .. })
    }

    /// A convolution or matrix-product anchor: a product whose output the epilogue transforms.
    pub fn is_product(&self) -> bool {
        matches!(self, Anchor::Conv2d { .. } | Anchor::Conv2dBackwardInput { .. } | Anchor::MatMul { .. })
    }
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

/// The epilogue of a product-anchored group as a pointwise kernel of its own, for a backend that runs the product
/// as a library call into a buffer and then the epilogue.
#[derive(Clone, Debug, PartialEq)]
pub struct SplitEpilogue {
    /// A pointwise kernel (no anchor): its inputs are the fused node's inputs listed in `inputs`, then the product's
    /// output (the last input, of the group's shape, in the dtype of the product's operand 0).
    pub kernel: FusedKernel,
    /// The fused node's inputs the epilogue reads, in the kernel's order.
    pub inputs: Vec<usize>,
    /// The fused node's outputs the kernel writes, in the kernel's order.
    pub outputs: Vec<usize>,
    /// The fused node's output that is the product itself (stored unchanged), if any: the product can be written
    /// there directly, and the kernel does not write it again.
    pub product_output: Option<usize>,
}

impl FusedKernel {
    /// Registers the body needs (one per instruction).
    pub fn registers(&self) -> usize {
        self.body.len()
    }

    /// The register holding the anchor's value (the `Anchor` instruction), if any.
    pub fn anchor_register(&self) -> Option<Reg> {
        self.body.iter().position(|i| *i == Instr::Anchor)
    }

    /// The epilogue of a product-anchored kernel as a pointwise kernel reading the product's output; None for other
    /// kernels.
    pub fn split_epilogue(&self) -> Option<SplitEpilogue> {
        if !self.anchor.is_product() {
            return None;
        }
        let anchor_reg = self.anchor_register();
        let product_output = self.outputs.iter().position(|&(r, _)| Some(r) == anchor_reg);
        let inputs: Vec<usize> = {
            let mut v: Vec<usize> =
                self.body.iter().filter_map(|i| if let Instr::Load(k) = i { Some(*k) } else { None }).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let product = inputs.len();
        let body = self
            .body
            .iter()
            .map(|i| match i {
                Instr::Load(k) => Instr::Load(inputs.iter().position(|x| x == k).expect("listed above")),
                Instr::Anchor => Instr::Load(product),
                other => other.clone(),
            })
            .collect();
        let outputs: Vec<usize> = (0..self.outputs.len()).filter(|&o| Some(o) != product_output).collect();
        let mut input_shapes: Vec<Shape> = inputs.iter().map(|&i| self.input_shapes[i].clone()).collect();
        input_shapes.push(self.shape.clone());
        let kernel = FusedKernel {
            name: format!("{}_epilogue", self.name),
            ops: {
                // The members' ops less the product (not necessarily the first member: a pointwise producer of an
                // epilogue input may come before it).
                let product_op = self.anchor.op(&self.shape).map(|op| op.name());
                let mut ops = self.ops.clone();
                if let Some(at) = ops.iter().position(|o| Some(o) == product_op.as_ref()) {
                    ops.remove(at);
                }
                ops
            },
            anchor: Anchor::None,
            shape: self.shape.clone(),
            input_shapes,
            body,
            outputs: outputs.iter().map(|&o| self.outputs[o]).collect(),
        };
        Some(SplitEpilogue { kernel, inputs, outputs, product_output })
    }
}
