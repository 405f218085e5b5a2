//! What each node must compute and move: the FLOPs and bytes a profiler divides by time, and the
//! floor (the larger of FLOPs/peak and bytes/bandwidth) a kernel can at best reach.

use super::fusion::{Anchor, FusedKernel};
use super::ir::{Graph, Node};
use super::op::Op;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    /// Floating-point operations (a multiply-add counts 2).
    pub flops: f64,
    /// Bytes read and written, each input and output once.
    pub bytes: f64,
}

pub fn node_cost(g: &Graph, node: &Node) -> Cost {
    let bytes: usize = node.inputs.iter().chain(&node.outputs).map(|&v| g.values[v].bytes()).sum();
    let out = |i: usize| g.shape(node.outputs[i]).clone();
    let inp = |i: usize| g.shape(node.inputs[i]).clone();
    let numel = node.outputs.first().map_or(0, |&o| g.shape(o).numel()) as f64;
    let flops = match &node.op {
        Op::MatMul { trans_a, .. } => {
            let a = inp(0);
            let k = if *trans_a { a.dims()[a.rank() - 2] } else { a.dims()[a.rank() - 1] };
            2.0 * out(0).numel() as f64 * k as f64
        }
        Op::Conv2d { .. } => {
            let w = inp(1);
            2.0 * out(0).numel() as f64 * (w.numel() / w.dims()[0]) as f64
        }
        Op::Conv2dBackwardInput { .. } => {
            // dx = Wᵀ · dy: the forward's cost.
            let (dy, w) = (inp(0), inp(1));
            2.0 * dy.numel() as f64 * (w.numel() / w.dims()[0]) as f64
        }
        Op::Conv2dBackwardWeight { .. } => {
            let (dy, w) = (inp(1), out(0));
            2.0 * dy.numel() as f64 * (w.numel() / w.dims()[0]) as f64
        }
        Op::Attention { .. } | Op::AttentionBackward { .. } => {
            let (q, k, v) = (inp(0), inp(1), inp(2));
            let (bh, lq, lk, d, dv) = (q.dims()[0] * q.dims()[1], q.dims()[2], k.dims()[2], q.dims()[3], v.dims()[3]);
            let fwd = 2.0 * (bh * lq * lk) as f64 * (d + dv) as f64;
            // The backward recomputes the scores and does four more products.
            if matches!(node.op, Op::Attention { .. }) {
                fwd
            } else {
                fwd + 2.0 * (bh * lq * lk) as f64 * (2 * d + 2 * dv) as f64
            }
        }
        Op::GroupNorm { .. } | Op::LayerNorm { .. } => 8.0 * numel,
        Op::GroupNormBackward { .. } | Op::LayerNormBackward { .. } => 12.0 * numel,
        Op::Softmax | Op::SoftmaxBackward => 5.0 * numel,
        Op::Fused(k) => {
            let per = k.body.len() as f64 + if k.anchor.is_normalisation() { 8.0 } else { 0.0 };
            per * k.shape.numel() as f64 + product_flops(k)
        }
        Op::AdamW { .. } => 12.0 * inp(0).numel() as f64,
        Op::AccumulateGrad => inp(0).numel() as f64,
        // One addition per element and rank (the transfer is the cost that matters, and it is not a FLOP).
        Op::AllReduce { tensors, world_size } => {
            (0..*tensors).map(|t| inp(t).numel() as f64).sum::<f64>() * (*world_size as f64 - 1.0)
        }
        Op::MultiAdamW(k) => (0..k.tensors).map(|t| 12.0 * inp(4 * t).numel() as f64).sum(),
        Op::Reshape { .. } => 0.0,
        // About one operation per output element.
        Op::Fill { .. }
        | Op::Unary(_)
        | Op::UnaryBackward(_)
        | Op::Binary(_)
        | Op::Affine { .. }
        | Op::Cast { .. }
        | Op::Upsample2x
        | Op::Upsample2xBackward
        | Op::Concat { .. }
        | Op::Slice { .. }
        | Op::SliceBackward { .. }
        | Op::Permute { .. }
        | Op::Embedding
        | Op::EmbeddingBackward { .. }
        | Op::TimestepEmbedding { .. }
        | Op::ReduceSum { .. }
        | Op::SumTo { .. }
        | Op::BroadcastTo { .. }
        | Op::MseLoss
        | Op::MseLossBackward => numel,
    };
    let bytes = if node.op.is_view() { 0 } else { bytes };
    Cost { flops, bytes: bytes as f64 }
}

/// The FLOPs of a fused kernel's convolution or matrix product (0 for other anchors).
fn product_flops(k: &FusedKernel) -> f64 {
    let (shapes, out) = (&k.input_shapes, k.shape.numel() as f64);
    // Multiply-adds per output element of the forward (and, for backward-input, per element of dy).
    let per_row = |w: &crate::graph::Shape| (w.numel() / w.dims()[0].max(1)) as f64;
    match k.anchor {
        Anchor::Conv2d { .. } => 2.0 * out * per_row(&shapes[1]),
        Anchor::Conv2dBackwardInput { .. } => 2.0 * shapes[0].numel() as f64 * per_row(&shapes[1]),
        Anchor::MatMul { trans_a, .. } => {
            let a = &shapes[0];
            let kk = if trans_a { a.dims()[a.rank() - 2] } else { a.dims()[a.rank() - 1] };
            2.0 * out * kk as f64
        }
        Anchor::None | Anchor::GroupNorm { .. } | Anchor::LayerNorm { .. } => 0.0,
    }
}

/// The shape a profiler shows for a node: its first output's (or first input's).
pub fn display_shape(g: &Graph, node: &Node) -> String {
    node.outputs.first().or(node.inputs.first()).map(|&v| g.shape(v).to_string()).unwrap_or_default()
}
