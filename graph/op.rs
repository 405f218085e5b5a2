//! The op set: every operation the SD U-Net, ControlNet, VAE and CLIP text encoder need,
//! plus the backward ops autodiff emits and the fused optimizer update.
//!
//! Each op knows its output shapes (`infer`), so a graph is shape-checked as it is built.

use super::dtype::DType;
use super::fusion::kernel::{FusedKernel, MultiAdamW};
use super::shape::Shape;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Square,
    Recip,
    Silu,
    GeluErf,
    GeluTanh,
    /// x * sigmoid(1.702 x), CLIP's activation.
    QuickGelu,
    Relu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl UnaryOp {
    /// Every unary op, in declaration order.
    pub const ALL: [UnaryOp; 11] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Square,
        UnaryOp::Recip,
        UnaryOp::Silu,
        UnaryOp::GeluErf,
        UnaryOp::GeluTanh,
        UnaryOp::QuickGelu,
        UnaryOp::Relu,
    ];

    /// The op's one name (snake_case): `Op::name`, the kernels (`unary_<name>_<dtype>` in kernels/unary.cu) and
    /// the fused-kernel names all spell it this way.
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Square => "square",
            UnaryOp::Recip => "recip",
            UnaryOp::Silu => "silu",
            UnaryOp::GeluErf => "gelu_erf",
            UnaryOp::GeluTanh => "gelu_tanh",
            UnaryOp::QuickGelu => "quick_gelu",
            UnaryOp::Relu => "relu",
        }
    }
}

impl BinaryOp {
    /// Every binary op, in declaration order.
    pub const ALL: [BinaryOp; 4] = [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div];

    /// The op's one name: `Op::name` and the kernels (`binary_<name>_<dtype>` in kernels/binary.cu).
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }
}

/// Where a 4-d activation keeps its channels. `Nchw` is PyTorch's default (filters [O, C, kh, kw], cuDNN's KCRS);
/// `Nhwc` is channels last (`model.channels_last`, made by `graph::passes::channels_last`): activations
/// [N, H, W, C], filters [O, kh, kw, C] (KRSC), what cuDNN's tensor-core convolutions read without a transpose.
/// For GroupNorm, `Nhwc` means the channel axis is the last one ([N, ..., C]) instead of axis 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Layout {
    #[default]
    Nchw,
    Nhwc,
}

impl Layout {
    /// The permutation that takes a planar rank-`rank` tensor to channels last: axis 1 moved last. At rank 4 it
    /// takes NCHW to NHWC (and an OIHW filter to OHWI), `[0, 2, 3, 1]`.
    pub fn to_last(rank: usize) -> Vec<usize> {
        std::iter::once(0).chain(2..rank).chain(std::iter::once(1)).collect()
    }

    /// Its inverse, channels last back to planar (`[0, 3, 1, 2]` at rank 4).
    pub fn from_last(rank: usize) -> Vec<usize> {
        [0, rank - 1].into_iter().chain(1..rank - 1).collect()
    }

    /// The dims of a rank-4 tensor of this layout in NCHW order ([O, C, kh, kw] for a filter).
    pub fn nchw_dims(self, d: &[usize]) -> [usize; 4] {
        match self {
            Layout::Nchw => [d[0], d[1], d[2], d[3]],
            Layout::Nhwc => [d[0], d[3], d[1], d[2]],
        }
    }

    /// The shape of this layout holding NCHW dims [n, c, h, w].
    pub fn shape(self, [n, c, h, w]: [usize; 4]) -> Shape {
        match self {
            Layout::Nchw => Shape(vec![n, c, h, w]),
            Layout::Nhwc => Shape(vec![n, h, w, c]),
        }
    }

    /// The channel axis of a rank-`rank` tensor (GroupNorm: 1, or the last).
    pub fn channel_axis(self, rank: usize) -> usize {
        match self {
            Layout::Nchw => 1,
            Layout::Nhwc => rank.saturating_sub(1),
        }
    }

    /// " nhwc" for dumps and op attributes; nothing for the default.
    fn suffix(self) -> &'static str {
        match self {
            Layout::Nchw => "",
            Layout::Nhwc => " nhwc",
        }
    }
}

/// Floats stored by their bits so ops can be hashed and compared (CSE needs both).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct F64Bits(pub u64);
impl F64Bits {
    pub fn new(x: f64) -> Self {
        F64Bits(x.to_bits())
    }
    pub fn get(self) -> f64 {
        f64::from_bits(self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// A tensor filled with one value.
    Fill {
        value: F64Bits,
        shape: Shape,
        dtype: DType,
    },
    Unary(UnaryOp),
    /// (x, dy) -> dx for a unary op.
    UnaryBackward(UnaryOp),
    /// Broadcasting elementwise op.
    Binary(BinaryOp),
    /// y = alpha * x + beta.
    Affine {
        alpha: F64Bits,
        beta: F64Bits,
    },
    Cast {
        to: DType,
    },
    /// [..., M, K] x [..., K, N] -> [..., M, N] (operands transposed first when flagged).
    /// The batch dimensions must match, or one operand may be rank 2 (shared by every batch).
    MatMul {
        trans_a: bool,
        trans_b: bool,
    },
    /// x [N, C, H, W], w [O, C, kh, kw], optional bias [O] -> [N, O, Ho, Wo]; with `Layout::Nhwc`,
    /// x [N, H, W, C], w [O, kh, kw, C] -> [N, Ho, Wo, O].
    Conv2d {
        stride: usize,
        padding: usize,
        layout: Layout,
    },
    /// (dy, w) -> dx, where x was h x w (dims in `layout`, as the forward's).
    Conv2dBackwardInput {
        stride: usize,
        padding: usize,
        h: usize,
        w: usize,
        layout: Layout,
    },
    /// (x, dy) -> dw, the kernel being kh x kw (dims in `layout`, as the forward's).
    Conv2dBackwardWeight {
        stride: usize,
        padding: usize,
        kh: usize,
        kw: usize,
        layout: Layout,
    },
    /// x [N, C, ...] (`Layout::Nhwc`: [N, ..., C]), gamma [C], beta [C].
    GroupNorm {
        groups: usize,
        eps: F64Bits,
        layout: Layout,
    },
    /// (x, gamma, dy) -> (dx, dgamma, dbeta).
    GroupNormBackward {
        groups: usize,
        eps: F64Bits,
        layout: Layout,
    },
    /// Over the last axis: x [..., D], gamma [D], beta [D].
    LayerNorm {
        eps: F64Bits,
    },
    /// (x, gamma, dy) -> (dx, dgamma, dbeta).
    LayerNormBackward {
        eps: F64Bits,
    },
    /// Over the last axis.
    Softmax,
    /// (y, dy) -> dx.
    SoftmaxBackward,
    /// Scaled dot-product attention: q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv] -> o [B, H, Lq, Dv]. With
    /// `lse` a second output, the row log-sum-exp of the scaled scores over the visible keys, lse [B, H, Lq] in
    /// [`attention_lse_dtype`]: what a flash backward needs to rebuild the probabilities without a forward of its
    /// own (`graph::passes::attention_lse` chooses it per node; the CPU backend computes it from its softmax).
    Attention {
        scale: F64Bits,
        causal: bool,
        lse: bool,
    },
    /// (q, k, v, dout) -> (dq, dk, dv); with `lse`, (q, k, v, o, lse, dout) -> (dq, dk, dv), o and lse being the
    /// two outputs of the forward `Attention { lse: true }`. Either form gives the same gradients: o and lse are
    /// what the forward already knew, offered so a backend need not recompute them.
    AttentionBackward {
        scale: F64Bits,
        causal: bool,
        lse: bool,
    },
    /// Nearest-neighbour 2x upsampling of the last two axes.
    Upsample2x,
    /// The adjoint: sums each 2x2 block.
    Upsample2xBackward,
    Concat {
        axis: usize,
    },
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// The adjoint of slice: places dy at [start, start+len) of a zero tensor of `full` along `axis`.
    SliceBackward {
        axis: usize,
        start: usize,
        full: usize,
    },
    Reshape {
        shape: Shape,
    },
    Permute {
        perm: Vec<usize>,
    },
    /// (table [V, D], ids [...] of i32/i64) -> [..., D].
    Embedding,
    /// (ids, dy) -> dtable [vocab, D].
    EmbeddingBackward {
        vocab: usize,
    },
    /// The LDM sinusoidal timestep embedding: t [B] -> [B, dim], cos half first.
    TimestepEmbedding {
        dim: usize,
        max_period: F64Bits,
    },
    /// Sum over axes, keeping them as size 1 when `keepdim`.
    ReduceSum {
        axes: Vec<usize>,
        keepdim: bool,
    },
    /// Sum a broadcast gradient back down to `shape` (the adjoint of broadcasting).
    SumTo {
        shape: Shape,
    },
    BroadcastTo {
        shape: Shape,
    },
    /// mean((a - b)^2) -> scalar.
    MseLoss,
    /// (a, b, dloss) -> da.
    MseLossBackward,
    /// The AdamW update, in place: (param, grad, m, v, hyper [lr, 1/(1-beta1^t), 1/(1-beta2^t)]).
    /// Writes param, m and v; produces no value.
    AdamW {
        beta1: F64Bits,
        beta2: F64Bits,
        eps: F64Bits,
        weight_decay: F64Bits,
    },
    /// Gradient accumulation, in place: (acc, grad, keep [1]). acc ← acc + grad where keep ≠ 0, acc ← grad where
    /// keep = 0 (the first micro-batch of a step: a select, not a multiply, so stale contents never leak in, NaN
    /// included). acc and grad share shape and dtype, f32 (as AdamW's master weights) or f64; keep is f32. Produces no value.
    AccumulateGrad,
    /// The data-parallel gradient sum, in place: each of the `tensors` inputs (a bucket of gradient accumulators, one
    /// dtype, f32 or f64) is replaced by its elementwise sum over the `world_size` ranks, added in rank order (the
    /// communicator's contract, `engine::dist::Communicator`). A sum, not a mean: the accumulating step already
    /// scales the loss by 1 / (micro-batches × ranks), so the sum is the mean gradient of the whole step. Produces no
    /// value. Inserted by `graph::passes::all_reduce`; it has no gradient (it runs in the update, after the backward).
    AllReduce {
        tensors: usize,
        world_size: usize,
    },
    /// A fused group of pointwise ops (optionally after a normalisation), made by the fusion pass.
    Fused(Box<FusedKernel>),
    /// Several AdamW updates in one kernel, made by the fusion pass.
    MultiAdamW(Box<MultiAdamW>),
}

fn check_float(op: &str, d: DType) -> Result<()> {
    if d.is_float() {
        Ok(())
    } else {
        Err(Error::shape(op, format!("needs a float input, got {d}")))
    }
}

/// The type of attention's log-sum-exp output: f32 (the flash kernels' accumulator), f64 when q is f64 (the
/// precision the CPU backend computes an f64 graph in).
pub fn attention_lse_dtype(q: DType) -> DType {
    if q == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Attention's forms with the log-sum-exp keep every tensor but the log-sum-exp in one float type, so a backend
/// computes the node in one precision and the log-sum-exp's type follows from it.
fn one_dtype(op: &str, ins: &[(&Shape, DType)]) -> Result<()> {
    let d = ins[0].1;
    check_float(op, d)?;
    if ins.iter().any(|&(_, t)| t != d) {
        let types: Vec<String> = ins.iter().map(|(_, t)| t.to_string()).collect();
        return Err(Error::shape(op, format!("q, k, v (o, dout) must share one type, got [{}]", types.join(", "))));
    }
    Ok(())
}

/// The output shape of attention over q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv]: [B, H, Lq, Dv].
fn attention_out(op: &str, q: &Shape, k: &Shape, v: &Shape) -> Result<Shape> {
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Err(Error::shape(op, "q, k and v must be [B, H, L, D]"));
    }
    if q.0[..2] != k.0[..2] || k.0[..3] != v.0[..3] || q.0[3] != k.0[3] {
        return Err(Error::shape(op, format!("q {q}, k {k}, v {v} do not fit")));
    }
    Ok(Shape(vec![q.0[0], q.0[1], q.0[2], v.0[3]]))
}

fn conv_out(size: usize, k: usize, stride: usize, padding: usize) -> Option<usize> {
    (size + 2 * padding).checked_sub(k).map(|v| v / stride + 1)
}

impl Op {
    /// A short lower-case name, used in dumps and kernel names.
    pub fn name(&self) -> String {
        match self {
            Op::Fill { .. } => "fill".into(),
            Op::Unary(u) => u.name().into(),
            Op::UnaryBackward(u) => format!("{}_backward", u.name()),
            Op::Binary(b) => b.name().into(),
            Op::Affine { .. } => "affine".into(),
            Op::Cast { .. } => "cast".into(),
            Op::MatMul { .. } => "matmul".into(),
            Op::Conv2d { .. } => "conv2d".into(),
            Op::Conv2dBackwardInput { .. } => "conv2d_backward_input".into(),
            Op::Conv2dBackwardWeight { .. } => "conv2d_backward_weight".into(),
            Op::GroupNorm { .. } => "groupnorm".into(),
            Op::GroupNormBackward { .. } => "groupnorm_backward".into(),
            Op::LayerNorm { .. } => "layernorm".into(),
            Op::LayerNormBackward { .. } => "layernorm_backward".into(),
            Op::Softmax => "softmax".into(),
            Op::SoftmaxBackward => "softmax_backward".into(),
            Op::Attention { .. } => "attention".into(),
            Op::AttentionBackward { .. } => "attention_backward".into(),
            Op::Upsample2x => "upsample2x".into(),
            Op::Upsample2xBackward => "upsample2x_backward".into(),
            Op::Concat { .. } => "concat".into(),
            Op::Slice { .. } => "slice".into(),
            Op::SliceBackward { .. } => "slice_backward".into(),
            Op::Reshape { .. } => "reshape".into(),
            Op::Permute { .. } => "permute".into(),
            Op::Embedding => "embedding".into(),
            Op::EmbeddingBackward { .. } => "embedding_backward".into(),
            Op::TimestepEmbedding { .. } => "timestep_embedding".into(),
            Op::ReduceSum { .. } => "sum".into(),
            Op::SumTo { .. } => "sum_to".into(),
            Op::BroadcastTo { .. } => "broadcast_to".into(),
            Op::MseLoss => "mse_loss".into(),
            Op::MseLossBackward => "mse_loss_backward".into(),
            Op::AdamW { .. } => "adamw".into(),
            Op::AccumulateGrad => "accumulate_grad".into(),
            Op::AllReduce { .. } => "all_reduce".into(),
            Op::Fused(k) => k.name.clone(),
            Op::MultiAdamW(k) => k.name.clone(),
        }
    }

    /// Attributes worth printing in a dump.
    pub fn attrs(&self) -> String {
        match self {
            Op::Fill { value, shape, dtype } => format!("value={} {shape} {dtype}", value.get()),
            Op::Affine { alpha, beta } => format!("alpha={} beta={}", alpha.get(), beta.get()),
            Op::Cast { to } => format!("to={to}"),
            Op::MatMul { trans_a, trans_b } => format!("trans_a={trans_a} trans_b={trans_b}"),
            Op::Conv2d { stride, padding, layout }
            | Op::Conv2dBackwardInput { stride, padding, layout, .. }
            | Op::Conv2dBackwardWeight { stride, padding, layout, .. } => {
                format!("stride={stride} padding={padding}{}", layout.suffix())
            }
            Op::GroupNorm { groups, eps, layout } | Op::GroupNormBackward { groups, eps, layout } => {
                format!("groups={groups} eps={}{}", eps.get(), layout.suffix())
            }
            Op::LayerNorm { eps } | Op::LayerNormBackward { eps } => format!("eps={}", eps.get()),
            Op::Attention { scale, causal, lse } | Op::AttentionBackward { scale, causal, lse } => {
                format!("scale={:.6} causal={causal}{}", scale.get(), if *lse { " lse" } else { "" })
            }
            Op::Concat { axis } => format!("axis={axis}"),
            Op::Slice { axis, start, end } => format!("axis={axis} {start}..{end}"),
            Op::SliceBackward { axis, start, full } => format!("axis={axis} start={start} full={full}"),
            Op::Reshape { shape } => format!("{shape}"),
            Op::Permute { perm } => format!("{perm:?}"),
            Op::TimestepEmbedding { dim, max_period } => format!("dim={dim} max_period={}", max_period.get()),
            Op::ReduceSum { axes, keepdim } => format!("axes={axes:?} keepdim={keepdim}"),
            Op::SumTo { shape } | Op::BroadcastTo { shape } => format!("{shape}"),
            Op::AdamW { beta1, beta2, eps, weight_decay } => {
                format!("beta1={} beta2={} eps={} wd={}", beta1.get(), beta2.get(), eps.get(), weight_decay.get())
            }
            Op::Fused(k) => format!("[{}]", k.ops.join(" ")),
            Op::MultiAdamW(k) => format!("tensors={}", k.tensors),
            Op::AllReduce { tensors, world_size } => format!("tensors={tensors} world_size={world_size}"),
            Op::Unary(_)
            | Op::UnaryBackward(_)
            | Op::Binary(_)
            | Op::Softmax
            | Op::SoftmaxBackward
            | Op::Upsample2x
            | Op::Upsample2xBackward
            | Op::Embedding
            | Op::EmbeddingBackward { .. }
            | Op::MseLoss
            | Op::MseLossBackward
            | Op::AccumulateGrad => String::new(),
        }
    }

    /// True for ops that write their inputs in place (they are kept by dead-code elimination).
    pub fn has_side_effects(&self) -> bool {
        !self.in_place_inputs().is_empty()
    }

    /// The inputs an op writes in place (sources: parameters and state), by position; empty for every op that only
    /// writes its outputs. The one definition backends use to know what a node changes besides its outputs.
    pub fn in_place_inputs(&self) -> Vec<usize> {
        match self {
            // param, m and v of each (param, grad, m, v) group.
            Op::AdamW { .. } => vec![0, 2, 3],
            Op::MultiAdamW(k) => (0..k.tensors).flat_map(|t| [4 * t, 4 * t + 2, 4 * t + 3]).collect(),
            Op::AccumulateGrad => vec![0],
            Op::AllReduce { tensors, .. } => (0..*tensors).collect(),
            _ => Vec::new(),
        }
    }

    /// True for ops whose output is a view of the input's bytes (same element order).
    pub fn is_view(&self) -> bool {
        matches!(self, Op::Reshape { .. })
    }

    /// Output shapes and dtypes from input shapes and dtypes; the one place an op's inputs are validated.
    pub fn infer(&self, ins: &[(&Shape, DType)]) -> Result<Vec<(Shape, DType)>> {
        let n = self.name();
        let arity = |k: usize| -> Result<()> {
            if ins.len() == k {
                Ok(())
            } else {
                Err(Error::shape(&n, format!("expects {k} inputs, got {}", ins.len())))
            }
        };
        let same = |a: &Shape, b: &Shape, what: &str| -> Result<()> {
            if a == b {
                Ok(())
            } else {
                Err(Error::shape(&n, format!("{what}: {a} vs {b}")))
            }
        };
        match self {
            Op::Fill { shape, dtype, .. } => {
                arity(0)?;
                Ok(vec![(shape.clone(), *dtype)])
            }
            Op::Unary(_) | Op::Affine { .. } | Op::Softmax => {
                arity(1)?;
                check_float(&n, ins[0].1)?;
                if matches!(self, Op::Softmax) && ins[0].0.rank() == 0 {
                    return Err(Error::shape(&n, "needs rank >= 1"));
                }
                Ok(vec![(ins[0].0.clone(), ins[0].1)])
            }
            Op::UnaryBackward(_) | Op::SoftmaxBackward => {
                arity(2)?;
                same(ins[0].0, ins[1].0, "x and dy differ")?;
                Ok(vec![(ins[0].0.clone(), ins[1].1)])
            }
            Op::Binary(_) => {
                arity(2)?;
                if ins[0].1 != ins[1].1 {
                    return Err(Error::shape(&n, format!("dtypes differ: {} vs {}", ins[0].1, ins[1].1)));
                }
                Ok(vec![(Shape::broadcast(ins[0].0, ins[1].0, &n)?, ins[0].1)])
            }
            Op::Cast { to } => {
                arity(1)?;
                Ok(vec![(ins[0].0.clone(), *to)])
            }
            Op::MatMul { trans_a, trans_b } => {
                arity(2)?;
                let (a, b) = (ins[0].0, ins[1].0);
                if a.rank() < 2 || b.rank() < 2 {
                    return Err(Error::shape(&n, format!("operands need rank >= 2, got {a} and {b}")));
                }
                let (ra, rb) = (a.rank(), b.rank());
                let (m, ka) = if *trans_a { (a.0[ra - 1], a.0[ra - 2]) } else { (a.0[ra - 2], a.0[ra - 1]) };
                let (kb, nn) = if *trans_b { (b.0[rb - 1], b.0[rb - 2]) } else { (b.0[rb - 2], b.0[rb - 1]) };
                if ka != kb {
                    return Err(Error::shape(&n, format!("inner dimensions differ: {a} x {b}")));
                }
                // Either operand may be rank 2 and shared by every batch of the other.
                if ra != 2 && rb != 2 && a.0[..ra - 2] != b.0[..rb - 2] {
                    return Err(Error::shape(&n, format!("batch dimensions differ: {a} x {b}")));
                }
                let mut out = if ra >= rb { a.0[..ra - 2].to_vec() } else { b.0[..rb - 2].to_vec() };
                out.extend([m, nn]);
                Ok(vec![(Shape(out), ins[0].1)])
            }
            Op::Conv2d { stride, padding, layout } => {
                if ins.len() != 2 && ins.len() != 3 {
                    return Err(Error::shape(&n, "expects x, w and an optional bias"));
                }
                let (x, w) = (ins[0].0, ins[1].0);
                let names = match layout {
                    Layout::Nchw => "NCHW, OCkk",
                    Layout::Nhwc => "NHWC, OkkC",
                };
                if x.rank() != 4 || w.rank() != 4 {
                    return Err(Error::shape(&n, format!("x {x} and w {w} do not fit ({names})")));
                }
                let ([xn, xc, xh, xw], [wo, wc, kh, kw]) = (layout.nchw_dims(&x.0), layout.nchw_dims(&w.0));
                if xc != wc {
                    return Err(Error::shape(&n, format!("x {x} and w {w} do not fit ({names})")));
                }
                if ins.len() == 3 && ins[2].0 .0 != vec![wo] {
                    return Err(Error::shape(&n, format!("bias {} must be [{wo}]", ins[2].0)));
                }
                let ho = conv_out(xh, kh, *stride, *padding);
                let wd = conv_out(xw, kw, *stride, *padding);
                match (ho, wd) {
                    (Some(ho), Some(wd)) if *stride > 0 => Ok(vec![(layout.shape([xn, wo, ho, wd]), ins[0].1)]),
                    _ => Err(Error::shape(&n, format!("kernel {w} larger than padded input {x}"))),
                }
            }
            Op::Conv2dBackwardInput { h, w, layout, .. } => {
                arity(2)?;
                let (dy, wt) = (ins[0].0, ins[1].0);
                if dy.rank() != 4 || wt.rank() != 4 {
                    return Err(Error::shape(&n, format!("dy {dy} and w {wt} must be 4-d")));
                }
                let (n_, c) = (layout.nchw_dims(&dy.0)[0], layout.nchw_dims(&wt.0)[1]);
                Ok(vec![(layout.shape([n_, c, *h, *w]), ins[0].1)])
            }
            Op::Conv2dBackwardWeight { kh, kw, layout, .. } => {
                arity(2)?;
                let (x, dy) = (ins[0].0, ins[1].0);
                if x.rank() != 4 || dy.rank() != 4 {
                    return Err(Error::shape(&n, format!("x {x} and dy {dy} must be 4-d")));
                }
                let (o, c) = (layout.nchw_dims(&dy.0)[1], layout.nchw_dims(&x.0)[1]);
                Ok(vec![(layout.shape([o, c, *kh, *kw]), ins[0].1)])
            }
            Op::GroupNorm { groups, layout, .. } => {
                arity(3)?;
                let x = ins[0].0;
                let c = if x.rank() < 2 { 0 } else { x.0[layout.channel_axis(x.rank())] };
                if x.rank() < 2 || !c.is_multiple_of(*groups) {
                    return Err(Error::shape(&n, format!("{x}: channels must divide into {groups} groups")));
                }
                same(ins[1].0, &Shape(vec![c]), "gamma must be [C]")?;
                same(ins[2].0, &Shape(vec![c]), "beta must be [C]")?;
                Ok(vec![(x.clone(), ins[0].1)])
            }
            Op::LayerNorm { .. } => {
                arity(3)?;
                let x = ins[0].0;
                let d = *x.0.last().ok_or_else(|| Error::shape(&n, "needs rank >= 1"))?;
                same(ins[1].0, &Shape(vec![d]), "gamma must be [D]")?;
                same(ins[2].0, &Shape(vec![d]), "beta must be [D]")?;
                Ok(vec![(x.clone(), ins[0].1)])
            }
            Op::GroupNormBackward { .. } | Op::LayerNormBackward { .. } => {
                arity(3)?;
                same(ins[0].0, ins[2].0, "x and dy differ")?;
                Ok(vec![(ins[0].0.clone(), ins[2].1), (ins[1].0.clone(), ins[2].1), (ins[1].0.clone(), ins[2].1)])
            }
            Op::Attention { lse, .. } => {
                arity(3)?;
                let o = attention_out(&n, ins[0].0, ins[1].0, ins[2].0)?;
                let rows = Shape(o.0[..3].to_vec());
                let mut outs = vec![(o, ins[0].1)];
                if *lse {
                    one_dtype(&n, ins)?;
                    outs.push((rows, attention_lse_dtype(ins[0].1)));
                }
                Ok(outs)
            }
            Op::AttentionBackward { lse, .. } => {
                arity(if *lse { 6 } else { 4 })?;
                let o = attention_out(&n, ins[0].0, ins[1].0, ins[2].0)?;
                let dout = ins.last().expect("arity checked");
                same(dout.0, &o, "dout must be shaped as the output")?;
                if *lse {
                    let (fo, fl) = (ins[3], ins[4]);
                    same(fo.0, &o, "o must be the forward's output")?;
                    same(fl.0, &Shape(o.0[..3].to_vec()), "lse must be [B, H, Lq]")?;
                    one_dtype(&n, &[ins[0], ins[1], ins[2], fo, *dout])?;
                    let want = attention_lse_dtype(ins[0].1);
                    if fl.1 != want {
                        return Err(Error::shape(
                            &n,
                            format!("lse must be {want} for {} data, got {}", ins[0].1, fl.1),
                        ));
                    }
                }
                Ok(vec![(ins[0].0.clone(), dout.1), (ins[1].0.clone(), dout.1), (ins[2].0.clone(), dout.1)])
            }
            Op::Upsample2x => {
                arity(1)?;
                let x = ins[0].0;
                if x.rank() < 2 {
                    return Err(Error::shape(&n, "needs rank >= 2"));
                }
                let mut d = x.0.clone();
                let r = d.len();
                d[r - 1] *= 2;
                d[r - 2] *= 2;
                Ok(vec![(Shape(d), ins[0].1)])
            }
            Op::Upsample2xBackward => {
                arity(1)?;
                let x = ins[0].0;
                let r = x.rank();
                if r < 2 || !x.0[r - 1].is_multiple_of(2) || !x.0[r - 2].is_multiple_of(2) {
                    return Err(Error::shape(&n, format!("{x}: last two axes must be even")));
                }
                let mut d = x.0.clone();
                d[r - 1] /= 2;
                d[r - 2] /= 2;
                Ok(vec![(Shape(d), ins[0].1)])
            }
            Op::Concat { axis } => {
                if ins.is_empty() {
                    return Err(Error::shape(&n, "needs at least one input"));
                }
                let first = ins[0].0;
                if *axis >= first.rank() {
                    return Err(Error::shape(&n, format!("axis {axis} out of range for {first}")));
                }
                let mut d = first.0.clone();
                d[*axis] = 0;
                for (s, t) in ins {
                    let mut e = s.0.clone();
                    if e.len() != d.len() || *t != ins[0].1 {
                        return Err(Error::shape(&n, format!("{s} {t} does not fit {first} {}", ins[0].1)));
                    }
                    d[*axis] += e[*axis];
                    e[*axis] = 0;
                    let mut f = first.0.clone();
                    f[*axis] = 0;
                    if e != f {
                        return Err(Error::shape(&n, format!("{s} does not fit {first} off axis {axis}")));
                    }
                }
                Ok(vec![(Shape(d), ins[0].1)])
            }
            Op::Slice { axis, start, end } => {
                arity(1)?;
                let x = ins[0].0;
                if *axis >= x.rank() || start >= end || *end > x.0[*axis] {
                    return Err(Error::shape(&n, format!("{start}..{end} on axis {axis} of {x}")));
                }
                let mut d = x.0.clone();
                d[*axis] = end - start;
                Ok(vec![(Shape(d), ins[0].1)])
            }
            Op::SliceBackward { axis, full, start } => {
                arity(1)?;
                let mut d = ins[0].0 .0.clone();
                if *axis >= d.len() || start + d[*axis] > *full {
                    return Err(Error::shape(&n, "slice does not fit"));
                }
                d[*axis] = *full;
                Ok(vec![(Shape(d), ins[0].1)])
            }
            Op::Reshape { shape } => {
                arity(1)?;
                if shape.numel() != ins[0].0.numel() {
                    return Err(Error::shape(&n, format!("{} to {shape} changes the element count", ins[0].0)));
                }
                Ok(vec![(shape.clone(), ins[0].1)])
            }
            Op::Permute { perm } => {
                arity(1)?;
                let x = ins[0].0;
                let mut seen = vec![false; x.rank()];
                if perm.len() != x.rank()
                    || perm.iter().any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true))
                {
                    return Err(Error::shape(&n, format!("{perm:?} is not a permutation of {x}")));
                }
                Ok(vec![(Shape(perm.iter().map(|&p| x.0[p]).collect()), ins[0].1)])
            }
            Op::Embedding => {
                arity(2)?;
                let (t, ids) = (ins[0].0, ins[1]);
                if t.rank() != 2 || ids.1.is_float() {
                    return Err(Error::shape(&n, "table must be [V, D] and ids integers"));
                }
                let mut d = ids.0 .0.clone();
                d.push(t.0[1]);
                Ok(vec![(Shape(d), ins[0].1)])
            }
            Op::EmbeddingBackward { vocab } => {
                arity(2)?;
                let dy = ins[1].0;
                Ok(vec![(Shape(vec![*vocab, *dy.0.last().unwrap_or(&0)]), ins[1].1)])
            }
            Op::TimestepEmbedding { dim, .. } => {
                arity(1)?;
                if ins[0].0.rank() != 1 || dim % 2 != 0 {
                    return Err(Error::shape(&n, "t must be [B] and dim even"));
                }
                Ok(vec![(Shape(vec![ins[0].0 .0[0], *dim]), DType::F32)])
            }
            Op::ReduceSum { axes, keepdim } => {
                arity(1)?;
                let x = ins[0].0;
                if axes.iter().any(|&a| a >= x.rank()) {
                    return Err(Error::shape(&n, format!("axes {axes:?} out of range for {x}")));
                }
                let d =
                    x.0.iter()
                        .enumerate()
                        .filter_map(|(i, &s)| match (axes.contains(&i), keepdim) {
                            (false, _) => Some(s),
                            (true, true) => Some(1),
                            (true, false) => None,
                        })
                        .collect();
                Ok(vec![(Shape(d), ins[0].1)])
            }
            Op::SumTo { shape } => {
                arity(1)?;
                if Shape::broadcast(shape, ins[0].0, &n)? != *ins[0].0 {
                    return Err(Error::shape(&n, format!("{} does not broadcast from {shape}", ins[0].0)));
                }
                Ok(vec![(shape.clone(), ins[0].1)])
            }
            Op::BroadcastTo { shape } => {
                arity(1)?;
                if Shape::broadcast(shape, ins[0].0, &n)? != *shape {
                    return Err(Error::shape(&n, format!("{} does not broadcast to {shape}", ins[0].0)));
                }
                Ok(vec![(shape.clone(), ins[0].1)])
            }
            Op::MseLoss => {
                arity(2)?;
                same(ins[0].0, ins[1].0, "prediction and target differ")?;
                Ok(vec![(Shape::scalar(), ins[0].1)])
            }
            Op::MseLossBackward => {
                arity(3)?;
                same(ins[0].0, ins[1].0, "prediction and target differ")?;
                Ok(vec![(ins[0].0.clone(), ins[0].1)])
            }
            Op::Fused(k) => {
                if ins.len() != k.input_shapes.len() {
                    return Err(Error::shape(
                        &n,
                        format!("expects {} inputs, got {}", k.input_shapes.len(), ins.len()),
                    ));
                }
                Ok(k.outputs.iter().map(|&(_, d)| (k.shape.clone(), d)).collect())
            }
            Op::MultiAdamW(k) => {
                arity(4 * k.tensors + 1)?;
                Ok(vec![])
            }
            Op::AccumulateGrad => {
                arity(3)?;
                if !matches!(ins[0].1, DType::F32 | DType::F64) {
                    return Err(Error::shape(&n, format!("accumulators are f32 (or f64), got {}", ins[0].1)));
                }
                same(ins[0].0, ins[1].0, "grad")?;
                same(ins[2].0, &Shape(vec![1]), "keep must be [1]")?;
                if ins[1].1 != ins[0].1 {
                    return Err(Error::shape(&n, format!("grad is {}, acc is {}", ins[1].1, ins[0].1)));
                }
                if ins[2].1 != DType::F32 {
                    return Err(Error::shape(&n, format!("keep must be f32, got {}", ins[2].1)));
                }
                Ok(vec![])
            }
            Op::AllReduce { tensors, world_size } => {
                arity(*tensors)?;
                if *tensors == 0 {
                    return Err(Error::shape(&n, "needs at least one tensor"));
                }
                if *world_size < 2 {
                    return Err(Error::shape(&n, format!("a world of {world_size} rank(s) has nothing to sum")));
                }
                let d = ins[0].1;
                if !matches!(d, DType::F32 | DType::F64) || ins.iter().any(|&(_, t)| t != d) {
                    let types: Vec<String> = ins.iter().map(|(_, t)| t.to_string()).collect();
                    return Err(Error::shape(
                        &n,
                        format!("a bucket holds f32 or f64 accumulators of one type, got [{}]", types.join(", ")),
                    ));
                }
                Ok(vec![])
            }
            Op::AdamW { .. } => {
                arity(5)?;
                let p = ins[0].0;
                for (i, what) in [(1, "grad"), (2, "m"), (3, "v")] {
                    same(p, ins[i].0, what)?;
                }
                same(ins[4].0, &Shape(vec![3]), "hyper must be [3]")?;
                Ok(vec![])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{self, Arch};
    use std::collections::BTreeSet;

    /// The float storage types the GPU kernels are built for.
    const KERNEL_FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

    #[test]
    fn op_families_list_every_op_once_with_one_name() {
        for (i, u) in UnaryOp::ALL.into_iter().enumerate() {
            assert_eq!(u as usize, i, "UnaryOp::ALL is in declaration order");
            // The snake_case name is the variant's own name.
            assert_eq!(u.name().replace('_', ""), format!("{u:?}").to_lowercase());
            assert_eq!(Op::Unary(u).name(), u.name());
            assert_eq!(Op::UnaryBackward(u).name(), format!("{}_backward", u.name()));
        }
        for (i, b) in BinaryOp::ALL.into_iter().enumerate() {
            assert_eq!(b as usize, i, "BinaryOp::ALL is in declaration order");
            assert_eq!(b.name(), format!("{b:?}").to_lowercase());
            assert_eq!(Op::Binary(b).name(), b.name());
        }
        let names: BTreeSet<&str> =
            UnaryOp::ALL.iter().map(|u| u.name()).chain(BinaryOp::ALL.iter().map(|b| b.name())).collect();
        assert_eq!(names.len(), UnaryOp::ALL.len() + BinaryOp::ALL.len(), "op names are unique");
    }

    /// Every op of `UnaryOp::ALL` / `BinaryOp::ALL` has its kernels in every float type, under the name the GPU
    /// lowering looks up: in the PTX entry points when the kernels were compiled, else in the source (whose
    /// entry points `ZC_FOR_EACH_FLOAT(ZC_<FAMILY>_ENTRIES, <name>, <functor>)` defines).
    #[test]
    fn every_unary_and_binary_op_has_its_kernels() {
        let unary = kernels::module("unary").expect("kernels/unary.cu is embedded");
        let binary = kernels::module("binary").expect("kernels/binary.cu is embedded");
        let wanted = |stems: Vec<String>| -> Vec<String> {
            stems.iter().flat_map(|s| KERNEL_FLOATS.iter().map(move |d| format!("{s}_{}", d.name()))).collect()
        };
        let unary_kernels = wanted(
            UnaryOp::ALL
                .iter()
                .flat_map(|u| [format!("unary_{0}", u.name()), format!("unary_{0}_bwd", u.name())])
                .collect(),
        );
        let binary_kernels = wanted(
            BinaryOp::ALL
                .iter()
                .flat_map(|b| [format!("binary_{0}", b.name()), format!("binary_{0}_bcast", b.name())])
                .collect(),
        );
        if kernels::compiled() {
            for arch in Arch::ALL {
                for (m, want) in [(unary, &unary_kernels), (binary, &binary_kernels)] {
                    let entries: BTreeSet<&str> = m.entry_points(arch).into_iter().collect();
                    for k in want {
                        assert!(entries.contains(k.as_str()), "{}: no kernel {k} in the {} PTX", m.name, arch.name());
                    }
                }
            }
        }
        // The source pairs each name with the functor the fusion code generator uses, and the entry macros
        // spell the kernels as the lowering does, for every float type.
        for u in UnaryOp::ALL {
            let line = format!("ZC_FOR_EACH_FLOAT(ZC_UNARY_ENTRIES, {}, {})", u.name(), kernels::codegen::op_struct(u));
            assert!(unary.source.contains(&line), "kernels/unary.cu lacks `{line}`");
        }
        for b in BinaryOp::ALL {
            let functor = kernels::codegen::functor(b.name());
            let line = format!("ZC_FOR_EACH_FLOAT(ZC_BINARY_ENTRIES, {}, {functor})", b.name());
            assert!(binary.source.contains(&line), "kernels/binary.cu lacks `{line}`");
        }
        let full = unary.self_contained_source();
        assert!(full.contains("unary_##NAME##_##SUF(") && full.contains("unary_##NAME##_bwd_##SUF("));
        let full = binary.self_contained_source();
        assert!(full.contains("binary_##NAME##_##SUF(") && full.contains("binary_##NAME##_bcast_##SUF("));
        for d in KERNEL_FLOATS {
            assert!(full.contains(&format!(", {}, __VA_ARGS__)", d.name())), "ZC_FOR_EACH_FLOAT lacks {d}");
        }
    }
}
