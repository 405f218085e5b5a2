//! Channels last (`model.channels_last`): rewrites a step so that its convolutions and GroupNorms run on NHWC
//! activations and OHWI (KRSC) filters, the layout cuDNN's tensor-core convolutions read without transposing.
//!
//! Each 4-d value of the old graph is held in the new one in one or both of two forms: planar (as it was, NCHW)
//! and channels last (the planar tensor permuted by `Layout::TO_NHWC`). Convolutions (forward and both
//! backwards) take and give channels last. Ops that do not care where the channels are run on whichever form
//! their inputs have, channels last as soon as one 4-d input has that form: pointwise ops, GroupNorm and its
//! backward, concatenations and slices (on the mapped axis), sums and broadcasts with mapped axes, the
//! upsampling (as a reshape and a broadcast) and the loss. Every other op reads planar forms. A form is made by
//! one permute the first time a reader needs it, and shared by all later readers. A permute the model does itself
//! composes with the layout's: the spatial transformer's NCHW -> [N, H, W, C] -> [N, HW, C] becomes a plain
//! reshape, and so does its way back.
//!
//! Sources keep their layout, so checkpoints, exported weights and the optimizer state are the same with or
//! without the pass: a filter is permuted to OHWI on its way into the convolutions, and its gradient back to
//! OIHW on its way to the update. The rewritten step computes the same function; only the order of some sums
//! (and so the last bits) differs.

use super::rewrite::{Rewriter, ValueMap};
use crate::error::Result;
use crate::graph::ir::{Graph, NodeId, ValueId};
use crate::graph::op::{Layout, Op};
use crate::graph::shape::Shape;

/// The step with its convolutions and GroupNorms channels last (see the module documentation).
pub fn channels_last(g: &Graph) -> Result<(Graph, ValueMap)> {
    let mut p = Pass { r: Rewriter::new(g), nhwc: vec![None; g.values.len()] };
    for n in 0..g.nodes.len() {
        p.node(n)?;
    }
    for &o in &g.outputs {
        p.planar(o)?;
    }
    Ok(p.r.finish())
}

struct Pass<'a> {
    /// Its `map` holds each old value's planar form.
    r: Rewriter<'a>,
    /// Each old value's channels-last form, where one was made.
    nhwc: Vec<Option<ValueId>>,
}

/// The NHWC position of NCHW axis `a`.
fn nhwc_axis(a: usize) -> usize {
    Layout::TO_NCHW[a]
}

/// The channels-last shape of a 4-d planar shape.
fn nhwc_shape(s: &Shape) -> Shape {
    Shape(Layout::TO_NHWC.iter().map(|&a| s.0[a]).collect())
}

impl Pass<'_> {
    fn old(&self) -> &Graph {
        self.r.old
    }

    fn rank(&self, v: ValueId) -> usize {
        self.old().shape(v).rank()
    }

    fn has_nhwc(&self, v: ValueId) -> bool {
        self.nhwc[v].is_some()
    }

    /// Appends `op` to the new graph (with the phase and recompute mark of the node being rewritten, set by
    /// [`Pass::node`]).
    fn add(&mut self, op: Op, inputs: &[ValueId]) -> Result<Vec<ValueId>> {
        self.r.new.add_node(op, inputs)
    }

    fn add1(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId> {
        self.r.new.op1(op, inputs)
    }

    /// The planar form of old value `v`, made from its channels-last one if it has none yet.
    fn planar(&mut self, v: ValueId) -> Result<ValueId> {
        if let Some(p) = self.r.map[v] {
            return Ok(p);
        }
        let c = self.nhwc[v].expect("pass bug: a value with neither form");
        let p = self.add1(Op::Permute { perm: Layout::TO_NCHW.to_vec() }, &[c])?;
        self.r.new.values[p].name = format!("{}.nchw", self.old().values[v].name);
        self.r.map[v] = Some(p);
        Ok(p)
    }

    /// The channels-last form of 4-d old value `v`, made from its planar one if it has none yet.
    fn channels_last(&mut self, v: ValueId) -> Result<ValueId> {
        if let Some(c) = self.nhwc[v] {
            return Ok(c);
        }
        let p = self.r.mapped(v);
        let c = self.add1(Op::Permute { perm: Layout::TO_NHWC.to_vec() }, &[p])?;
        self.r.new.values[c].name = format!("{}.nhwc", self.old().values[v].name);
        self.nhwc[v] = Some(c);
        Ok(c)
    }

    /// Records new value `new`, made for old value `v`, as its channels-last form (named after it, for dumps).
    fn set_nhwc(&mut self, v: ValueId, new: ValueId) {
        self.r.new.values[new].name = format!("{}.nhwc", self.old().values[v].name);
        self.nhwc[v] = Some(new);
    }

    /// Emits old node `n` unchanged, on planar inputs.
    fn planar_node(&mut self, n: NodeId) -> Result<()> {
        let ins = self.old().nodes[n].inputs.clone();
        for &v in &ins {
            self.planar(v)?;
        }
        self.r.emit(n);
        Ok(())
    }

    /// Emits `op` on the channels-last forms of the 4-d inputs (and the planar forms of the others), and makes its
    /// outputs the channels-last forms of old node `n`'s outputs.
    fn nhwc_node(&mut self, n: NodeId, op: Op) -> Result<()> {
        let (ins, outs) = (self.old().nodes[n].inputs.clone(), self.old().nodes[n].outputs.clone());
        let mut args = Vec::with_capacity(ins.len());
        for &v in &ins {
            args.push(if self.rank(v) == 4 { self.channels_last(v)? } else { self.planar(v)? });
        }
        let news = self.add(op, &args)?;
        for (&o, &new) in outs.iter().zip(&news) {
            if self.rank(o) == 4 {
                self.set_nhwc(o, new);
            } else {
                self.r.new.values[new].name = self.old().values[o].name.clone();
                self.r.map[o] = Some(new);
            }
        }
        Ok(())
    }

    /// Whether a shape-agnostic op on `ins` can run channels last: every input is 4-d or a single value
    /// (broadcasting the same way in either layout), and one 4-d input already has a channels-last form.
    fn follows_channels_last(&self, ins: &[ValueId]) -> bool {
        let fits = ins.iter().all(|&v| self.rank(v) == 4 || self.old().shape(v).numel() == 1);
        fits && ins.iter().any(|&v| self.rank(v) == 4 && self.has_nhwc(v))
    }

    fn node(&mut self, n: NodeId) -> Result<()> {
        let old = self.r.old;
        let node = &old.nodes[n];
        let (op, ins, outs) = (node.op.clone(), node.inputs.clone(), node.outputs.clone());
        self.r.new.set_phase(node.phase);
        self.r.new.set_checkpointing(node.checkpoint);
        let out_rank4 = outs.len() == 1 && self.rank(outs[0]) == 4;
        let agnostic = out_rank4 && self.follows_channels_last(&ins);
        match op {
            Op::Conv2d { stride, padding, layout: Layout::Nchw } => {
                // The bias is 1-d and stays as it is.
                self.nhwc_node(n, Op::Conv2d { stride, padding, layout: Layout::Nhwc })
            }
            Op::Conv2dBackwardInput { stride, padding, h, w, layout: Layout::Nchw } => {
                self.nhwc_node(n, Op::Conv2dBackwardInput { stride, padding, h, w, layout: Layout::Nhwc })
            }
            Op::Conv2dBackwardWeight { stride, padding, kh, kw, layout: Layout::Nchw } => {
                self.nhwc_node(n, Op::Conv2dBackwardWeight { stride, padding, kh, kw, layout: Layout::Nhwc })
            }
            Op::GroupNorm { groups, eps, layout: Layout::Nchw } if self.rank(ins[0]) == 4 && self.has_nhwc(ins[0]) => {
                self.nhwc_node(n, Op::GroupNorm { groups, eps, layout: Layout::Nhwc })
            }
            Op::GroupNormBackward { groups, eps, layout: Layout::Nchw }
                if self.rank(ins[0]) == 4 && (self.has_nhwc(ins[0]) || self.has_nhwc(ins[2])) =>
            {
                self.nhwc_node(n, Op::GroupNormBackward { groups, eps, layout: Layout::Nhwc })
            }
            Op::Unary(_) | Op::UnaryBackward(_) | Op::Binary(_) | Op::Affine { .. } | Op::Cast { .. } if agnostic => {
                self.nhwc_node(n, op)
            }
            Op::MseLossBackward if agnostic => self.nhwc_node(n, op),
            Op::MseLoss if self.follows_channels_last(&ins) => self.nhwc_node(n, op),
            Op::Concat { axis } if agnostic => self.nhwc_node(n, Op::Concat { axis: nhwc_axis(axis) }),
            Op::Slice { axis, start, end } if agnostic => {
                self.nhwc_node(n, Op::Slice { axis: nhwc_axis(axis), start, end })
            }
            Op::SliceBackward { axis, start, full } if agnostic => {
                self.nhwc_node(n, Op::SliceBackward { axis: nhwc_axis(axis), start, full })
            }
            Op::SumTo { ref shape } | Op::BroadcastTo { ref shape } if agnostic => {
                let shape = nhwc_shape(shape);
                let op = if matches!(op, Op::SumTo { .. }) { Op::SumTo { shape } } else { Op::BroadcastTo { shape } };
                self.nhwc_node(n, op)
            }
            Op::ReduceSum { ref axes, keepdim } if self.rank(ins[0]) == 4 && self.has_nhwc(ins[0]) => {
                self.reduce_sum(n, axes, keepdim)
            }
            Op::Permute { ref perm } if self.rank(ins[0]) == 4 => self.permute(n, perm),
            Op::Upsample2x if agnostic => self.upsample(n, false),
            Op::Upsample2xBackward if agnostic => self.upsample(n, true),
            _ => self.planar_node(n),
        }
    }

    /// A sum over axes of a 4-d value with a channels-last form: the axes mapped. With `keepdim` the result is
    /// channels last; without, it is planar when the kept axes come out in the same order (the channel axis summed
    /// away, or kept with only the batch axis), else the sum reads the planar form.
    fn reduce_sum(&mut self, n: NodeId, axes: &[usize], keepdim: bool) -> Result<()> {
        let mapped: Vec<usize> = axes.iter().map(|&a| nhwc_axis(a)).collect();
        let mut sorted = mapped.clone();
        sorted.sort_unstable();
        let op = Op::ReduceSum { axes: sorted, keepdim };
        if keepdim {
            return self.nhwc_node(n, op);
        }
        let kept_planar: Vec<usize> = (0..4).filter(|a| !axes.contains(a)).collect();
        let kept_nhwc: Vec<usize> = Layout::TO_NHWC.iter().copied().filter(|a| !axes.contains(a)).collect();
        if kept_planar != kept_nhwc {
            return self.planar_node(n);
        }
        let (x, o) = (self.old().nodes[n].inputs[0], self.old().nodes[n].outputs[0]);
        let c = self.channels_last(x)?;
        let y = self.add1(op, &[c])?;
        self.r.new.values[y].name = self.old().values[o].name.clone();
        self.r.map[o] = Some(y);
        Ok(())
    }

    /// A permute of a 4-d value. Of a channels-last form, it composes with the layout's permute, and vanishes when
    /// the two cancel (the transformer's way in). Of a planar value by `TO_NCHW` (the transformer's way out), its
    /// output's channels-last form is the input itself.
    fn permute(&mut self, n: NodeId, perm: &[usize]) -> Result<()> {
        let (x, o) = (self.old().nodes[n].inputs[0], self.old().nodes[n].outputs[0]);
        if self.has_nhwc(x) {
            let c = self.channels_last(x)?;
            let composed: Vec<usize> = perm.iter().map(|&a| nhwc_axis(a)).collect();
            let y = if composed.iter().enumerate().all(|(i, &a)| i == a) {
                c
            } else {
                let y = self.add1(Op::Permute { perm: composed }, &[c])?;
                self.r.new.values[y].name = self.old().values[o].name.clone();
                y
            };
            self.r.map[o] = Some(y);
            return Ok(());
        }
        if perm == Layout::TO_NCHW {
            let p = self.planar(x)?;
            self.nhwc[o] = Some(p);
            return Ok(());
        }
        self.planar_node(n)
    }

    /// Nearest 2x upsampling of a channels-last [N, H, W, C] as a reshape to [N, H, 1, W, 1, C], a broadcast to
    /// [N, H, 2, W, 2, C] and a reshape to [N, 2H, 2W, C]; its adjoint (`backward`) as a reshape of
    /// [N, 2H, 2W, C] to [N, H, 2, W, 2, C] and a sum over the two 2s.
    fn upsample(&mut self, n: NodeId, backward: bool) -> Result<()> {
        let (x, o) = (self.old().nodes[n].inputs[0], self.old().nodes[n].outputs[0]);
        let c = self.channels_last(x)?;
        let small = if backward { self.old().shape(o).clone() } else { self.old().shape(x).clone() };
        let [nb, ch, h, w] = [small.0[0], small.0[1], small.0[2], small.0[3]];
        let y = if backward {
            let split = self.add1(Op::Reshape { shape: Shape(vec![nb, h, 2, w, 2, ch]) }, &[c])?;
            self.add1(Op::ReduceSum { axes: vec![2, 4], keepdim: false }, &[split])?
        } else {
            let split = self.add1(Op::Reshape { shape: Shape(vec![nb, h, 1, w, 1, ch]) }, &[c])?;
            let wide = self.add1(Op::BroadcastTo { shape: Shape(vec![nb, h, 2, w, 2, ch]) }, &[split])?;
            self.add1(Op::Reshape { shape: Shape(vec![nb, 2 * h, 2 * w, ch]) }, &[wide])?
        };
        self.set_nhwc(o, y);
        Ok(())
    }
}
