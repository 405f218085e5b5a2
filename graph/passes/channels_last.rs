//! Channels last (`model.channels_last`): rewrites a step so that its convolutions and GroupNorms run on NHWC
//! activations and OHWI (KRSC) filters, the layout cuDNN's tensor-core convolutions read without transposing.
//!
//! Each value of rank 3 or more ([N, C, spatial...]) of the old graph is held in the new one in one or both of two
//! forms: planar (as it was) and channels last (axis 1 moved last: [N, spatial..., C]; for 4-d values the permute
//! `Layout::to_last`). Convolutions (forward and both backwards) take and give channels last. Ops that do not care
//! where the channels are run on whichever form their inputs have, channels last as soon as one input has that
//! form: pointwise ops, GroupNorm and its backward, concatenations and slices (on the mapped axis), sums and
//! broadcasts with mapped axes, reshapes that keep N and C and regroup the spatial axes, the upsampling (as a
//! reshape and a broadcast) and the loss. Every other op reads planar forms. A form is made by one permute the
//! first time a reader needs it, and shared by all later readers. A permute the model does itself composes with
//! the layout's: the spatial transformer's [N, C, H, W] -> [N, C, HW] -> [N, HW, C] becomes a plain reshape of the
//! channels-last activations, and so does its way back.
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

/// The channels-last position of planar axis `a` of a rank-`r` value.
fn last_axis(a: usize, r: usize) -> usize {
    Layout::from_last(r)[a]
}

/// The channels-last shape of a planar shape (rank 3 or more).
fn last_shape(s: &Shape) -> Shape {
    Shape(Layout::to_last(s.rank()).iter().map(|&a| s.0[a]).collect())
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
        let op = self.relayout(v, Layout::from_last(self.rank(v)), self.old().shape(v).clone());
        let p = self.add1(op, &[c])?;
        self.r.new.values[p].name = format!("{}.nchw", self.old().values[v].name);
        self.r.map[v] = Some(p);
        Ok(p)
    }

    /// The channels-last form of old value `v` (rank 3 or more), made from its planar one if it has none yet.
    fn channels_last(&mut self, v: ValueId) -> Result<ValueId> {
        if let Some(c) = self.nhwc[v] {
            return Ok(c);
        }
        let p = self.r.mapped(v);
        let op = self.relayout(v, Layout::to_last(self.rank(v)), last_shape(self.old().shape(v)));
        let c = self.add1(op, &[p])?;
        self.r.new.values[c].name = format!("{}.nhwc", self.old().values[v].name);
        self.nhwc[v] = Some(c);
        Ok(c)
    }

    /// The op that changes old value `v`'s layout by `perm`, giving `shape`: a permute, or a reshape (a view, no
    /// copy) when every spatial axis has size 1 ([N, C, 1, 1], the time embedding): the two forms then have the same
    /// memory order.
    fn relayout(&self, v: ValueId, perm: Vec<usize>, shape: Shape) -> Op {
        if self.old().shape(v).0[2..].iter().all(|&d| d == 1) {
            Op::Reshape { shape }
        } else {
            Op::Permute { perm }
        }
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

    /// Emits `op` on the channels-last forms of the inputs of rank `rank` (and the planar forms of the others), and
    /// makes its outputs of that rank the channels-last forms of old node `n`'s outputs.
    fn nhwc_node(&mut self, n: NodeId, op: Op, rank: usize) -> Result<()> {
        let (ins, outs) = (self.old().nodes[n].inputs.clone(), self.old().nodes[n].outputs.clone());
        let mut args = Vec::with_capacity(ins.len());
        for &v in &ins {
            args.push(if self.rank(v) == rank { self.channels_last(v)? } else { self.planar(v)? });
        }
        let news = self.add(op, &args)?;
        for (&o, &new) in outs.iter().zip(&news) {
            if self.rank(o) == rank {
                self.set_nhwc(o, new);
            } else {
                self.r.new.values[new].name = self.old().values[o].name.clone();
                self.r.map[o] = Some(new);
            }
        }
        Ok(())
    }

    /// Whether a shape-agnostic op on `ins` can run channels last at rank `rank` (3 or more): every input has that
    /// rank or is a single value (broadcasting the same way in either layout), and one input of that rank already
    /// has a channels-last form.
    fn follows_channels_last(&self, ins: &[ValueId], rank: usize) -> bool {
        let fits = ins.iter().all(|&v| self.rank(v) == rank || self.old().shape(v).numel() == 1);
        rank >= 3 && fits && ins.iter().any(|&v| self.rank(v) == rank && self.has_nhwc(v))
    }

    fn node(&mut self, n: NodeId) -> Result<()> {
        let old = self.r.old;
        let node = &old.nodes[n];
        let (op, ins, outs) = (node.op.clone(), node.inputs.clone(), node.outputs.clone());
        self.r.new.set_phase(node.phase);
        self.r.new.set_checkpointing(node.checkpoint);
        // The rank of the single output, which a shape-agnostic op shares with its inputs.
        let r = if outs.len() == 1 { self.rank(outs[0]) } else { 0 };
        let agnostic = self.follows_channels_last(&ins, r);
        let x_last = |p: &Self| !ins.is_empty() && p.rank(ins[0]) >= 3 && p.has_nhwc(ins[0]);
        match op {
            Op::Conv2d { stride, padding, layout: Layout::Nchw } => {
                // The bias is 1-d and stays as it is.
                self.nhwc_node(n, Op::Conv2d { stride, padding, layout: Layout::Nhwc }, 4)
            }
            Op::Conv2dBackwardInput { stride, padding, h, w, layout: Layout::Nchw } => {
                self.nhwc_node(n, Op::Conv2dBackwardInput { stride, padding, h, w, layout: Layout::Nhwc }, 4)
            }
            Op::Conv2dBackwardWeight { stride, padding, kh, kw, layout: Layout::Nchw } => {
                self.nhwc_node(n, Op::Conv2dBackwardWeight { stride, padding, kh, kw, layout: Layout::Nhwc }, 4)
            }
            Op::GroupNorm { groups, eps, layout: Layout::Nchw } if x_last(self) => {
                self.nhwc_node(n, Op::GroupNorm { groups, eps, layout: Layout::Nhwc }, self.rank(ins[0]))
            }
            Op::GroupNormBackward { groups, eps, layout: Layout::Nchw }
                if self.rank(ins[0]) >= 3 && (self.has_nhwc(ins[0]) || self.has_nhwc(ins[2])) =>
            {
                self.nhwc_node(n, Op::GroupNormBackward { groups, eps, layout: Layout::Nhwc }, self.rank(ins[0]))
            }
            Op::Unary(_) | Op::UnaryBackward(_) | Op::Binary(_) | Op::Affine { .. } | Op::Cast { .. } if agnostic => {
                self.nhwc_node(n, op, r)
            }
            Op::MseLossBackward if agnostic => self.nhwc_node(n, op, r),
            Op::MseLoss if x_last(self) && self.follows_channels_last(&ins, self.rank(ins[0])) => {
                self.nhwc_node(n, op, self.rank(ins[0]))
            }
            Op::Concat { axis } if agnostic => self.nhwc_node(n, Op::Concat { axis: last_axis(axis, r) }, r),
            Op::Slice { axis, start, end } if agnostic => {
                self.nhwc_node(n, Op::Slice { axis: last_axis(axis, r), start, end }, r)
            }
            Op::SliceBackward { axis, start, full } if agnostic => {
                self.nhwc_node(n, Op::SliceBackward { axis: last_axis(axis, r), start, full }, r)
            }
            Op::SumTo { ref shape } | Op::BroadcastTo { ref shape } if agnostic => {
                let shape = last_shape(shape);
                let op = if matches!(op, Op::SumTo { .. }) { Op::SumTo { shape } } else { Op::BroadcastTo { shape } };
                self.nhwc_node(n, op, r)
            }
            Op::ReduceSum { ref axes, keepdim } if x_last(self) => self.reduce_sum(n, axes, keepdim),
            Op::Reshape { ref shape } if x_last(self) && self.regroups_spatial(ins[0], shape) => {
                let c = self.channels_last(ins[0])?;
                let y = self.add1(Op::Reshape { shape: last_shape(shape) }, &[c])?;
                self.set_nhwc(outs[0], y);
                Ok(())
            }
            Op::Permute { ref perm } if self.rank(ins[0]) >= 3 => self.permute(n, perm),
            Op::Upsample2x if agnostic && r == 4 => self.upsample(n, false),
            Op::Upsample2xBackward if agnostic && r == 4 => self.upsample(n, true),
            Op::AdamW { .. } | Op::MultiAdamW(_) | Op::AccumulateGrad | Op::AllReduce { .. } => {
                // These write their planar inputs in place: a channels-last copy made before would be stale, so
                // later readers make a new one from the written value.
                self.planar_node(n)?;
                for v in ins {
                    self.nhwc[v] = None;
                }
                Ok(())
            }
            _ => self.planar_node(n),
        }
    }

    /// Whether reshaping planar `x` to `shape` keeps the batch and channel axes and only regroups the spatial ones,
    /// so that the same reshape of the spatial axes applies to the channels-last form.
    fn regroups_spatial(&self, x: ValueId, shape: &Shape) -> bool {
        let d = &self.old().shape(x).0;
        shape.rank() >= 3 && shape.0[..2] == d[..2]
    }

    /// A sum over axes of a value with a channels-last form: the axes mapped. With `keepdim` the result is
    /// channels last; without, it is planar when the kept axes come out in the same order (the channel axis summed
    /// away, or kept with only the batch axis), else the sum reads the planar form.
    fn reduce_sum(&mut self, n: NodeId, axes: &[usize], keepdim: bool) -> Result<()> {
        let r = self.rank(self.old().nodes[n].inputs[0]);
        let mut mapped: Vec<usize> = axes.iter().map(|&a| last_axis(a, r)).collect();
        mapped.sort_unstable();
        let op = Op::ReduceSum { axes: mapped, keepdim };
        if keepdim {
            return self.nhwc_node(n, op, r);
        }
        let kept_planar: Vec<usize> = (0..r).filter(|a| !axes.contains(a)).collect();
        let kept_nhwc: Vec<usize> = Layout::to_last(r).into_iter().filter(|a| !axes.contains(a)).collect();
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

    /// A permute of a value of rank 3 or more. Of a channels-last form, it composes with the layout's permute, and
    /// vanishes when the two cancel (the transformer's way in). Of a planar value by the layout's inverse (the
    /// transformer's way out), its output's channels-last form is the input itself.
    fn permute(&mut self, n: NodeId, perm: &[usize]) -> Result<()> {
        let (x, o) = (self.old().nodes[n].inputs[0], self.old().nodes[n].outputs[0]);
        let r = self.rank(x);
        if self.has_nhwc(x) {
            let c = self.channels_last(x)?;
            let composed: Vec<usize> = perm.iter().map(|&a| last_axis(a, r)).collect();
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
        if perm == Layout::from_last(r) {
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
