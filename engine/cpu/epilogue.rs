//! Fused kernels anchored on a convolution or a matrix product (the fusion pass's product anchors):
//! the product writes its output, and the group's register program (`fused.rs`) runs on it while it
//! is in cache: a forward convolution hands over each block of output rows right after its GEMM, a
//! backward-input convolution each image after its col2im, a matrix product its whole output.
//!
//! The product is written into the output that stores it unchanged when the group has one (its value
//! is read outside the group too, e.g. the pre-activation SiLU's backward needs), otherwise into
//! output 0, which the epilogue then overwrites in place: each block of `BLOCK` elements is read
//! into the anchor register before any output of that block is stored.
//!
//! The product runs exactly as the plain op would (same call, same blocking and threads), and the
//! epilogue's instructions are the ones the pointwise kernels run, so on f32 data the results are
//! bit-identical to the unfused graph's.

use super::conv::{self, Conv2dShape, ConvEpilogue, ConvThreads, EpilogueCall};
use super::float::Float;
use super::fused::{eval_block, AnchorValues, Loader, BLOCK};
use super::linalg;
use crate::error::{Error, Result};
use crate::graph::fusion::{Anchor, FusedKernel};
use crate::graph::Shape;
use rayon::prelude::*;
use smallvec::SmallVec;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

/// Elements per parallel task of a matrix product's epilogue.
const MATMUL_TASK: usize = 16 * 1024;

type Slices<'a, T> = SmallVec<[&'a mut [T]; 4]>;

/// Scratch elements (of the compute type) a product-anchored kernel needs: the product's own, then one block of
/// registers per thread.
pub fn scratch_len(k: &FusedKernel, threads: usize) -> usize {
    product_scratch_len(k, threads) + registers_len(k) * threads.max(1)
}

fn registers_len(k: &FusedKernel) -> usize {
    k.registers().max(1) * BLOCK
}

fn conv_threads(threads: usize) -> ConvThreads {
    ConvThreads::auto(threads)
}

/// The convolution's sizes: x and w are inputs 0 and 1 (forward), or dx is the iteration space and w input 1
/// (backward-input).
fn conv_shape(k: &FusedKernel) -> Option<Conv2dShape> {
    let (x, (stride, padding)) = match k.anchor {
        Anchor::Conv2d { stride, padding, .. } => (&k.input_shapes[0], (stride, padding)),
        Anchor::Conv2dBackwardInput { stride, padding } => (&k.shape, (stride, padding)),
        _ => return None,
    };
    let (xd, wd) = (x.dims(), k.input_shapes[1].dims());
    Some(Conv2dShape { n: xd[0], c: xd[1], h: xd[2], w: xd[3], o: wd[0], kh: wd[2], kw: wd[3], stride, padding })
}

fn product_scratch_len(k: &FusedKernel, threads: usize) -> usize {
    match (&k.anchor, conv_shape(k)) {
        (Anchor::Conv2d { .. }, Some(s)) => conv::conv2d_forward_scratch_len(&s, conv_threads(threads)),
        (Anchor::Conv2dBackwardInput { .. }, Some(s)) => {
            conv::conv2d_backward_input_scratch_len(&s, conv_threads(threads))
        }
        _ => 0,
    }
}

/// Runs the product-anchored kernel `k` with inputs `ins` (each of its `input_shapes`) into `outs` (each of
/// `k.shape`), on `threads` threads.
pub fn run<T: Float>(
    k: &FusedKernel,
    ins: &[&[T]],
    outs: &mut [&mut [T]],
    scratch: &mut [T],
    threads: usize,
) -> Result<()> {
    let threads = threads.max(1);
    if outs.is_empty() {
        return Err(Error::msg(format!("{}: a fused kernel without outputs", k.name)));
    }
    let need = scratch_len(k, threads);
    if scratch.len() < need {
        return Err(Error::msg(format!("{}: scratch has {} elements, needs {need}", k.name, scratch.len())));
    }
    let (product_scratch, registers) = scratch.split_at_mut(product_scratch_len(k, threads));
    let slots: Vec<Mutex<&mut [T]>> =
        registers.chunks_exact_mut(registers_len(k)).take(threads).map(Mutex::new).collect();
    let anchor_reg = k.anchor_register();
    // The product is written into one output and read there in place (`AnchorValues::InPlace`, its register is
    // never filled); the fusion pass stores a register once, so a second output of the product has no producer.
    if k.outputs.iter().filter(|&&(r, _)| Some(r) == anchor_reg).count() > 1 {
        return Err(Error::msg(format!("{}: the product is stored in more than one output", k.name)));
    }
    let y_index = k.outputs.iter().position(|&(r, _)| Some(r) == anchor_reg).unwrap_or(0);
    let (before, rest) = outs.split_at_mut(y_index);
    let (y, after) = rest.split_first_mut().expect("y_index < outs.len()");
    let mut others: Slices<'_, T> = before.iter_mut().chain(after.iter_mut()).map(|o| &mut **o).collect();
    let program =
        Epilogue { k, loaders: k.input_shapes.iter().map(|s| Loader::new(s, &k.shape)).collect(), ins, y_index, slots };
    match k.anchor {
        Anchor::Conv2d { bias, .. } => {
            let s = conv_shape(k).expect("a convolution anchor");
            let e = ConvImages::new(&program, &s, &k.shape, &mut others);
            let operands = (ins[0], ins[1], bias.then(|| ins[2]));
            conv::conv2d_forward_then(&s, operands, y, product_scratch, conv_threads(threads), Some(&e))
        }
        Anchor::Conv2dBackwardInput { .. } => {
            let s = conv_shape(k).expect("a convolution anchor");
            let e = ConvImages::new(&program, &s, &k.shape, &mut others);
            conv::conv2d_backward_input_then(&s, (ins[0], ins[1]), y, product_scratch, conv_threads(threads), Some(&e))
        }
        Anchor::MatMul { trans_a, trans_b } => {
            let a = linalg::Operand { data: ins[0], shape: &k.input_shapes[0], trans: trans_a };
            let b = linalg::Operand { data: ins[1], shape: &k.input_shapes[1], trans: trans_b };
            let n = k.shape.dims().last().copied().unwrap_or(1);
            let rows = k.shape.numel() / n.max(1);
            let blocks =
                ProductBlocks::new(&program, &mut others, (rows, linalg::row_block(&a, &b, &k.shape)), n, threads);
            let after = |i: usize, rows: Range<usize>, block: &mut [T]| blocks.apply(i, rows, block);
            linalg::batched_matmul_then(a, b, y, &k.shape, threads, Some(&after));
            Ok(())
        }
        Anchor::None | Anchor::GroupNorm { .. } | Anchor::LayerNorm { .. } => {
            Err(Error::msg(format!("{}: not anchored on a convolution or a matrix product", k.name)))
        }
    }
}

/// Which elements of a chunk to evaluate: `len` elements starting `skip` into every `period`.
struct Pattern {
    period: usize,
    skip: usize,
    len: usize,
}

/// The register program with its inputs, and a register block per thread.
struct Epilogue<'k, 's, T> {
    k: &'k FusedKernel,
    loaders: Vec<Loader>,
    ins: &'k [&'k [T]],
    /// The output the product is written into (the others are passed apart from it).
    y_index: usize,
    slots: Vec<Mutex<&'s mut [T]>>,
}

fn lock<'m, X>(m: &'m Mutex<X>) -> MutexGuard<'m, X> {
    // A poisoned lock means another task panicked, which propagates anyway; the data is still what it was.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T: Float> Epilogue<'_, '_, T> {
    /// Evaluates elements `base..base + y.len()` of the iteration space: `y` holds the product's values there and
    /// receives output `y_index`; `others` (the other outputs, in order) receive theirs at the same positions.
    fn segment(&self, base: usize, y: &mut [T], others: &mut [&mut [T]], regs: &mut [T]) {
        let anchor_reg = self.k.anchor_register();
        let mut at = 0;
        while at < y.len() {
            let len = BLOCK.min(y.len() - at);
            let product = &y[at..at + len];
            eval_block(self.k, &self.loaders, self.ins, regs, base + at, len, AnchorValues::InPlace(product));
            for (j, &(r, _)) in self.k.outputs.iter().enumerate() {
                if Some(r) == anchor_reg {
                    // The product itself, already in `y`: output `y_index` is its only output (`run` checks).
                    continue;
                }
                let value = &regs[r * BLOCK..r * BLOCK + len];
                let dst = match j.cmp(&self.y_index) {
                    std::cmp::Ordering::Equal => &mut y[at..at + len],
                    std::cmp::Ordering::Less => &mut others[j][at..at + len],
                    std::cmp::Ordering::Greater => &mut others[j - 1][at..at + len],
                };
                dst.copy_from_slice(value);
            }
            at += len;
        }
    }

    /// Evaluates the elements `pattern` picks from a chunk starting at element `base` of the iteration space.
    fn chunk(&self, base: usize, pattern: &Pattern, y: &mut [T], others: &mut [&mut [T]], regs: &mut [T]) {
        let mut start = 0;
        while start + pattern.skip < y.len() {
            let (from, to) = (start + pattern.skip, (start + pattern.skip + pattern.len).min(y.len()));
            let mut parts: Slices<'_, T> = others.iter_mut().map(|o| &mut o[from..to]).collect();
            self.segment(base + from, &mut y[from..to], &mut parts, regs);
            start += pattern.period;
        }
    }

    /// [`Epilogue::chunk`] over `y` split at whole periods into at most `threads` tasks, which use register slots
    /// `first_slot..first_slot + threads`.
    fn spread(
        &self,
        base: usize,
        pattern: &Pattern,
        y: &mut [T],
        others: &mut [&mut [T]],
        first_slot: usize,
        threads: usize,
    ) {
        let periods = y.len().div_ceil(pattern.period.max(1));
        if threads <= 1 || periods <= 1 {
            let mut regs = lock(&self.slots[first_slot]);
            self.chunk(base, pattern, y, others, &mut regs);
            return;
        }
        let per_task = periods.div_ceil(threads) * pattern.period;
        let mut tasks: Vec<(usize, &mut [T], Slices<'_, T>)> =
            y.chunks_mut(per_task).enumerate().map(|(i, yc)| (i, yc, Slices::new())).collect();
        for o in others.iter_mut() {
            for (task, oc) in tasks.iter_mut().zip(o.chunks_mut(per_task)) {
                task.2.push(oc);
            }
        }
        tasks.into_par_iter().for_each(|(i, yc, mut oc)| {
            let mut regs = lock(&self.slots[first_slot + i]);
            self.chunk(base + i * per_task, pattern, yc, &mut oc, &mut regs);
        });
    }
}

/// The other outputs cut into `count` parts of `len` elements (images, blocks of rows), each behind its own lock, so
/// that epilogue calls for different parts, running at the same time, each take their own.
fn cut_outputs<'o, T>(others: &'o mut [&mut [T]], count: usize, len: usize) -> Vec<Mutex<Slices<'o, T>>> {
    let mut parts: Vec<Slices<'o, T>> = (0..count).map(|_| Slices::new()).collect();
    if len > 0 {
        for o in others.iter_mut() {
            for (slices, part) in parts.iter_mut().zip(o.chunks_mut(len)) {
                slices.push(part);
            }
        }
    }
    parts.into_iter().map(Mutex::new).collect()
}

/// A matrix product's epilogue, run on each block of rows as the product hands it over (`linalg::row_block`),
/// with the other outputs cut into the same blocks.
struct ProductBlocks<'p, 'k, 's, 'o, T> {
    program: &'p Epilogue<'k, 's, T>,
    blocks: Vec<Mutex<Slices<'o, T>>>,
    /// Elements per row of the output.
    n: usize,
    threads: usize,
}

impl<'p, 'k, 's, 'o, T: Float> ProductBlocks<'p, 'k, 's, 'o, T> {
    fn new(
        program: &'p Epilogue<'k, 's, T>,
        others: &'o mut [&mut [T]],
        rows: (usize, usize),
        n: usize,
        threads: usize,
    ) -> Self {
        let (total, per_block) = rows;
        let count = total.div_ceil(per_block.max(1)).max(1);
        ProductBlocks { program, blocks: cut_outputs(others, count, per_block * n), n, threads }
    }

    /// Block `i`, rows `rows`: `y` holds the product there. Blocks run one per thread when there are several.
    fn apply(&self, i: usize, rows: Range<usize>, y: &mut [T]) {
        let mut others = lock(&self.blocks[i]);
        let (slot, threads) = if self.blocks.len() > 1 { (i % self.threads, 1) } else { (0, self.threads) };
        let every = Pattern { period: MATMUL_TASK, skip: 0, len: MATMUL_TASK };
        self.program.spread(rows.start * self.n, &every, y, &mut others, slot, threads);
    }
}

/// A convolution's epilogue: the other outputs cut into images, so calls for different images (running at the
/// same time) each take their own.
struct ConvImages<'p, 'k, 's, 'o, T> {
    program: &'p Epilogue<'k, 's, T>,
    images: Vec<Mutex<Slices<'o, T>>>,
    /// Elements per channel of one image, and per row.
    plane: usize,
    width: usize,
}

impl<'p, 'k, 's, 'o, T: Float> ConvImages<'p, 'k, 's, 'o, T> {
    /// `out` is the iteration space ([N, C, H, W]: the convolution's output, or dx).
    fn new(program: &'p Epilogue<'k, 's, T>, s: &Conv2dShape, out: &Shape, others: &'o mut [&mut [T]]) -> Self {
        let d = out.dims();
        let (plane, width) = (d[2] * d[3], d[3]);
        let image = d[1] * plane;
        ConvImages { program, images: cut_outputs(others, s.n, image), plane, width }
    }
}

impl<T: Float> ConvEpilogue<T> for ConvImages<'_, '_, '_, '_, T> {
    fn apply(&self, call: EpilogueCall<'_, T>) {
        let EpilogueCall { image, rows, out_n, slot, threads } = call;
        let mut others = lock(&self.images[image]);
        // Rows `rows` of every channel: `len` elements `skip` into each channel's plane.
        let pattern = Pattern { period: self.plane, skip: rows.start * self.width, len: rows.len() * self.width };
        self.program.spread(image * out_n.len(), &pattern, out_n, &mut others, slot, threads);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::fusion::Instr;
    use crate::graph::op::UnaryOp;
    use crate::graph::DType;

    /// A convolution + SiLU group that stores both the product and the SiLU, in either order, and one that stores
    /// only the SiLU: every output must hold the bits of the plain convolution and of SiLU applied to it, whichever
    /// output the product is written into (the epilogue reads the product in place, `AnchorValues::InPlace`).
    /// Two shapes: one im2col runs, one wide enough for the direct kernels where AVX-512 is present.
    #[test]
    fn a_product_stored_beside_its_epilogue_keeps_its_bits() {
        let shapes = [
            Conv2dShape { n: 2, c: 3, h: 9, w: 9, o: 4, kh: 3, kw: 3, stride: 1, padding: 1 },
            Conv2dShape { n: 2, c: 4, h: 6, w: 40, o: 8, kh: 3, kw: 3, stride: 1, padding: 1 },
        ];
        for s in shapes {
            let x: Vec<f32> = (0..s.x_len()).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
            let w: Vec<f32> = (0..s.weight_len()).map(|i| ((i * 53) % 67) as f32 / 40.0 - 0.8).collect();
            let threads = ConvThreads::auto(2);
            let mut scratch = vec![0.0f32; conv::conv2d_forward_scratch_len(&s, threads)];
            let mut product = vec![0.0f32; s.y_len()];
            conv::conv2d_forward(&s, &x, &w, None, &mut product, &mut scratch, threads).expect("plain convolution");
            let mut silu = vec![0.0f32; s.y_len()];
            super::super::elementwise::silu_f32(&product, &mut silu);
            let y_shape = Shape::new(&[s.n, s.o, s.out_h(), s.out_w()]);
            for outputs in [vec![0, 1], vec![1, 0], vec![1]] {
                let k = FusedKernel {
                    name: "fused_conv2d_silu_test".into(),
                    ops: vec!["conv2d".into(), "silu".into()],
                    anchor: Anchor::Conv2d { stride: 1, padding: 1, bias: false },
                    shape: y_shape.clone(),
                    input_shapes: vec![Shape::new(&[s.n, s.c, s.h, s.w]), Shape::new(&[s.o, s.c, 3, 3])],
                    body: vec![Instr::Anchor, Instr::Unary(UnaryOp::Silu, 0)],
                    outputs: outputs.iter().map(|&r| (r, DType::F32)).collect(),
                };
                let mut outs: Vec<Vec<f32>> = outputs.iter().map(|_| vec![f32::NAN; s.y_len()]).collect();
                let mut outs_mut: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                let mut scratch = vec![0.0f32; scratch_len(&k, 2)];
                run(&k, &[&x, &w], &mut outs_mut, &mut scratch, 2).expect("fused kernel");
                for (out, &r) in outs.iter().zip(&outputs) {
                    let want = if r == 0 { &product } else { &silu };
                    let same = out.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{s:?}, outputs {outputs:?}: register {r} differs from the unfused value");
                }
            }
            // The product stored twice: refused, not half-written.
            let k = FusedKernel {
                name: "fused_conv2d_twice".into(),
                ops: vec!["conv2d".into()],
                anchor: Anchor::Conv2d { stride: 1, padding: 1, bias: false },
                shape: y_shape.clone(),
                input_shapes: vec![Shape::new(&[s.n, s.c, s.h, s.w]), Shape::new(&[s.o, s.c, 3, 3])],
                body: vec![Instr::Anchor],
                outputs: vec![(0, DType::F32), (0, DType::F32)],
            };
            let (mut a, mut b) = (vec![0.0f32; s.y_len()], vec![0.0f32; s.y_len()]);
            let mut scratch = vec![0.0f32; scratch_len(&k, 2)];
            let err = run(&k, &[&x, &w], &mut [&mut a, &mut b], &mut scratch, 2).expect_err("a twice-stored product");
            assert!(err.to_string().contains("more than one output"), "{err}");
        }
    }
}
