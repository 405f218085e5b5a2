//! Fused kernels on the CPU: the group's register program runs over cache-sized blocks of the
//! iteration space, one instruction at a time over the whole block (so each step is a tight,
//! vectorisable loop), in parallel over contiguous ranges. Anchored groups first compute the
//! GroupNorm/LayerNorm statistics of each normalisation unit, then run the epilogue as the
//! normalised values are produced. Groups anchored on a convolution or a matrix product run in
//! `epilogue.rs`, on the same register program.

use super::elementwise::{simd, unary_backward_f32_loop, unary_derivative, unary_f32_loop, unary_value, Simd};
use super::float::Float;
use super::norm::mean_rstd;
use crate::graph::fusion::{Anchor, FusedKernel, Instr};
use crate::graph::{BinaryOp, DType, Shape};
use half::{bf16, f16};
use rayon::prelude::*;
use smallvec::SmallVec;

/// Elements per block: registers × BLOCK values stay in L1/L2.
pub const BLOCK: usize = 256;

pub fn scratch_len(k: &FusedKernel, slots: usize) -> usize {
    k.registers().max(1) * BLOCK * slots.max(1)
}

/// How an input is read for a range of output elements.
pub(super) enum Loader {
    Same,
    Scalar,
    /// The output's axes with the input's strides (0 on stretched axes), collapsed: size-1 axes dropped and
    /// neighbours that stay contiguous in the input merged, so the innermost axis is as long as it can be (a
    /// per-channel [N, C, 1, 1] input over [N, C, H, W] reads as runs of H·W copies of one value, a bias [D] over
    /// [B, L, D] as runs of D contiguous values).
    Broadcast {
        dims: Vec<usize>,
        strides: Vec<usize>,
    },
}

impl Loader {
    pub(super) fn new(input: &Shape, out: &Shape) -> Self {
        if input == out {
            Loader::Same
        } else if input.numel() == 1 {
            Loader::Scalar
        } else {
            let (dims, strides) = collapse(out.dims(), &input.broadcast_strides(out));
            Loader::Broadcast { dims, strides }
        }
    }

    fn load<T: Float>(&self, src: &[T], start: usize, dst: &mut [T]) {
        match self {
            Loader::Same => dst.copy_from_slice(&src[start..start + dst.len()]),
            Loader::Scalar => dst.fill(src[0]),
            Loader::Broadcast { dims, strides } => {
                // Odometer over the output index, starting at `start`, a run of the innermost axis at a time.
                let r = dims.len();
                let mut idx: SmallVec<[usize; 8]> = SmallVec::from_elem(0, r);
                let mut rem = start;
                let mut off = 0;
                for a in (0..r).rev() {
                    idx[a] = rem % dims[a];
                    rem /= dims[a];
                    off += idx[a] * strides[a];
                }
                let inner = r - 1;
                let (len, stride) = (dims[inner], strides[inner]);
                let mut at = 0;
                while at < dst.len() {
                    let run = (len - idx[inner]).min(dst.len() - at);
                    let out = &mut dst[at..at + run];
                    match stride {
                        0 => out.fill(src[off]),
                        1 => out.copy_from_slice(&src[off..off + run]),
                        s => out.iter_mut().enumerate().for_each(|(j, d)| *d = src[off + j * s]),
                    }
                    at += run;
                    idx[inner] += run;
                    off += run * stride;
                    if idx[inner] < len {
                        continue;
                    }
                    off -= len * stride;
                    idx[inner] = 0;
                    for a in (0..inner).rev() {
                        idx[a] += 1;
                        off += strides[a];
                        if idx[a] < dims[a] {
                            break;
                        }
                        off -= dims[a] * strides[a];
                        idx[a] = 0;
                    }
                }
            }
        }
    }
}

/// `dims` and `strides` with size-1 axes dropped and each axis merged into the one outside it when the pair is
/// contiguous in the input (outer stride = inner stride × inner size, which includes two stretched axes).
fn collapse(dims: &[usize], strides: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let (mut d, mut s): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    for (&n, &st) in dims.iter().zip(strides) {
        if n == 1 {
            continue;
        }
        if let (Some(ld), Some(ls)) = (d.last_mut(), s.last_mut()) {
            if *ls == st * n {
                *ld *= n;
                *ls = st;
                continue;
            }
        }
        d.push(n);
        s.push(st);
    }
    if d.is_empty() {
        d.push(1);
        s.push(0);
    }
    (d, s)
}

/// Rounds `v` to `dt`'s precision, keeping it in the compute type.
#[inline]
fn round<T: Float>(v: T, dt: DType) -> T {
    match dt {
        DType::BF16 => T::from_f64(bf16::from_f64(v.to_f64()).to_f64()),
        DType::F16 => T::from_f64(f16::from_f64(v.to_f64()).to_f64()),
        DType::F32 => T::from_f64(v.to_f64() as f32 as f64),
        _ => v,
    }
}

/// The normalisation of an anchored group: per unit (a GroupNorm group or a LayerNorm row),
/// mean and 1/std; and the per-element scale and shift.
struct Norm<'a, T> {
    unit: usize,
    /// Elements sharing one gamma/beta entry (GroupNorm: spatial size; LayerNorm: 1).
    inner: usize,
    /// gamma/beta period (GroupNorm: C; LayerNorm: D).
    period: usize,
    gamma: &'a [T],
    beta: &'a [T],
    eps: f64,
}

impl<T: Float> Norm<'_, T> {
    /// The normalised values of elements `e0..e0 + dst.len()` of `x` (one unit's `mean` and `rstd`), a run of
    /// elements sharing one gamma/beta entry at a time (no division per element).
    fn apply(&self, x: &[T], e0: usize, mean: T, rstd: T, dst: &mut [T]) {
        let x = &x[e0..e0 + dst.len()];
        let mut j = 0;
        while j < dst.len() {
            let e = e0 + j;
            let c = (e / self.inner) % self.period;
            if self.inner == 1 {
                // One entry per element (LayerNorm): a run along gamma/beta.
                let run = (self.period - c).min(dst.len() - j);
                let (g, b) = (&self.gamma[c..c + run], &self.beta[c..c + run]);
                for (k, (d, &v)) in dst[j..j + run].iter_mut().zip(&x[j..j + run]).enumerate() {
                    *d = (v - mean) * rstd * g[k] + b[k];
                }
                j += run;
            } else {
                let run = (self.inner - e % self.inner).min(dst.len() - j);
                let (g, b) = (self.gamma[c], self.beta[c]);
                for (d, &v) in dst[j..j + run].iter_mut().zip(&x[j..j + run]) {
                    *d = (v - mean) * rstd * g + b;
                }
                j += run;
            }
        }
    }
}

/// Runs `k` with inputs `ins` (each of its `input_shapes`) into `outs` (each of `k.shape`).
pub fn run<T: Float>(k: &FusedKernel, ins: &[&[T]], outs: &mut [&mut [T]], scratch: &mut [T], slots: usize) {
    debug_assert!(!k.anchor.is_product(), "product-anchored groups run in epilogue.rs");
    let total = k.shape.numel();
    let loaders: Vec<Loader> = k.input_shapes.iter().map(|s| Loader::new(s, &k.shape)).collect();
    let norm = match &k.anchor {
        Anchor::None => None,
        Anchor::GroupNorm { groups, eps } => {
            let d = k.shape.dims();
            let (c, s) = (d[1], k.shape.numel() / (d[0] * d[1]).max(1));
            Some(Norm { unit: c / groups * s, inner: s, period: c, gamma: ins[1], beta: ins[2], eps: eps.get() })
        }
        Anchor::LayerNorm { eps } => {
            let dd = *k.shape.dims().last().unwrap_or(&1);
            Some(Norm { unit: dd, inner: 1, period: dd, gamma: ins[1], beta: ins[2], eps: eps.get() })
        }
        Anchor::Conv2d { .. } | Anchor::Conv2dBackwardInput { .. } | Anchor::MatMul { .. } => None,
    };
    // Contiguous ranges, one per slot, aligned to normalisation units (or blocks).
    let align = norm.as_ref().map_or(BLOCK, |n| n.unit.max(1));
    let units = total.div_ceil(align);
    let per_slot = units.div_ceil(slots.max(1)).max(1) * align;
    let nslots = total.div_ceil(per_slot.max(1));
    let regs = k.registers().max(1);
    // Split every output at the slot boundaries.
    let mut parts: Vec<Vec<&mut [T]>> = (0..nslots).map(|_| Vec::with_capacity(outs.len())).collect();
    for o in outs.iter_mut() {
        let mut rest: &mut [T] = o;
        for p in parts.iter_mut() {
            let take = per_slot.min(rest.len());
            let (a, b) = std::mem::take(&mut rest).split_at_mut(take);
            p.push(a);
            rest = b;
        }
    }
    parts.into_par_iter().zip(scratch.par_chunks_mut(regs * BLOCK)).enumerate().for_each(
        |(si, (mut mine, regs_buf))| {
            let start = si * per_slot;
            let end = (start + per_slot).min(total);
            match &norm {
                None => run_range(k, &loaders, ins, &mut mine, regs_buf, start, start, end, None),
                Some(nm) => {
                    let mut u = start;
                    while u < end {
                        let (mean, rstd) = mean_rstd(&ins[0][u..u + nm.unit], nm.eps);
                        run_range(k, &loaders, ins, &mut mine, regs_buf, start, u, u + nm.unit, Some((nm, mean, rstd)));
                        u += nm.unit;
                    }
                }
            }
        },
    );
}

/// Evaluates elements [from, to) of the iteration space; `base` is where `outs` start.
#[allow(clippy::too_many_arguments)]
fn run_range<T: Float>(
    k: &FusedKernel,
    loaders: &[Loader],
    ins: &[&[T]],
    outs: &mut [&mut [T]],
    regs: &mut [T],
    base: usize,
    from: usize,
    to: usize,
    norm: Option<(&Norm<'_, T>, T, T)>,
) {
    let mut e0 = from;
    while e0 < to {
        let len = BLOCK.min(to - e0);
        let mut normalised = |dst: &mut [T]| {
            let (nm, mean, rstd) = norm.expect("anchored group");
            nm.apply(ins[0], e0, mean, rstd, dst);
        };
        eval_block(k, loaders, ins, regs, e0, len, AnchorValues::Computed(&mut normalised));
        for (o, &(r, _)) in outs.iter_mut().zip(&k.outputs) {
            o[e0 - base..e0 - base + len].copy_from_slice(&regs[r * BLOCK..r * BLOCK + len]);
        }
        e0 += len;
    }
}

/// The input a register reads in place instead of holding a copy: a load of an input of the iteration space's
/// own shape (its block is a plain slice of it) that is not an output (outputs are copied out of `regs`).
fn read_in_place(k: &FusedKernel, loaders: &[Loader], r: usize) -> Option<usize> {
    match k.body[r] {
        Instr::Load(i) if matches!(loaders[i], Loader::Same) && !k.outputs.iter().any(|&(o, _)| o == r) => Some(i),
        _ => None,
    }
}

/// Where a block's anchor values come from.
pub(super) enum AnchorValues<'a, T> {
    /// Written into the anchor's register by the closure (a normalisation computes them).
    Computed(&'a mut dyn FnMut(&mut [T])),
    /// Already in memory (a product's output block): instructions read them there, and the anchor's register is
    /// left unwritten, so a caller storing the anchor register must take these values instead.
    InPlace(&'a [T]),
}

/// Evaluates the body for elements `e0..e0 + len` (at most `BLOCK`) of the iteration space into `regs` (`BLOCK`
/// values per register, one register per instruction); `anchor` gives the anchor's values.
/// Registers that load an input of the iteration space's shape read it where it is (no copy).
/// Compiled again for the widest vector unit this CPU has, as the elementwise loops are (the crate's baseline is
/// SSE2's four lanes): the same operations in the same order, so the same bits at every width.
pub(super) fn eval_block<T: Float>(
    k: &FusedKernel,
    loaders: &[Loader],
    ins: &[&[T]],
    regs: &mut [T],
    e0: usize,
    len: usize,
    anchor: AnchorValues<'_, T>,
) {
    let program = (k, loaders, ins);
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512<T: Float>(
            program: Program<'_, T>,
            regs: &mut [T],
            span: (usize, usize),
            anchor: AnchorValues<'_, T>,
        ) {
            eval_block_body(program, regs, span, anchor)
        }
        #[target_feature(enable = "avx2")]
        fn avx2<T: Float>(program: Program<'_, T>, regs: &mut [T], span: (usize, usize), anchor: AnchorValues<'_, T>) {
            eval_block_body(program, regs, span, anchor)
        }
        match simd() {
            // SAFETY: `simd()` reports AVX-512 only after detecting it on this CPU.
            Simd::Avx512 => return unsafe { avx512(program, regs, (e0, len), anchor) },
            // SAFETY: as above, for AVX2.
            Simd::Avx2 => return unsafe { avx2(program, regs, (e0, len), anchor) },
            Simd::Baseline => {}
        }
    }
    eval_block_body(program, regs, (e0, len), anchor)
}

/// A fused kernel's register program with its loaders and inputs.
type Program<'a, T> = (&'a FusedKernel, &'a [Loader], &'a [&'a [T]]);

#[inline(always)]
fn eval_block_body<T: Float>(
    (k, loaders, ins): Program<'_, T>,
    regs: &mut [T],
    (e0, len): (usize, usize),
    anchor: AnchorValues<'_, T>,
) {
    let mut anchor = anchor;
    let in_place = match &anchor {
        AnchorValues::InPlace(values) => Some(*values),
        AnchorValues::Computed(_) => None,
    };
    for (r, ins_r) in k.body.iter().enumerate() {
        let (before, after) = regs.split_at_mut(r * BLOCK);
        let dst = &mut after[..len];
        let src = |a: usize| match (read_in_place(k, loaders, a), &k.body[a], in_place) {
            (Some(i), _, _) => &ins[i][e0..e0 + len],
            (None, Instr::Anchor, Some(values)) => &values[..len],
            (None, _, _) => &before[a * BLOCK..a * BLOCK + len],
        };
        match *ins_r {
            Instr::Load(i) => {
                if read_in_place(k, loaders, r).is_none() {
                    loaders[i].load(ins[i], e0, dst)
                }
            }
            Instr::Anchor => {
                if let AnchorValues::Computed(compute) = &mut anchor {
                    compute(dst)
                }
            }
            Instr::Const(c) => dst.fill(T::from_f64(c.get())),
            Instr::Unary(u, a) => {
                if !unary_f32_loop(u, src(a), dst) {
                    for (d, &x) in dst.iter_mut().zip(src(a)) {
                        *d = unary_value(u, x);
                    }
                }
            }
            Instr::UnaryBackward(u, x, dy) => {
                if !unary_backward_f32_loop(u, src(x), src(dy), dst) {
                    for ((d, &xv), &g) in dst.iter_mut().zip(src(x)).zip(src(dy)) {
                        *d = g * unary_derivative(u, xv);
                    }
                }
            }
            Instr::Binary(b, a, c) => {
                let (xa, xc) = (src(a), src(c));
                match b {
                    BinaryOp::Add => dst.iter_mut().zip(xa).zip(xc).for_each(|((d, &p), &q)| *d = p + q),
                    BinaryOp::Sub => dst.iter_mut().zip(xa).zip(xc).for_each(|((d, &p), &q)| *d = p - q),
                    BinaryOp::Mul => dst.iter_mut().zip(xa).zip(xc).for_each(|((d, &p), &q)| *d = p * q),
                    BinaryOp::Div => dst.iter_mut().zip(xa).zip(xc).for_each(|((d, &p), &q)| *d = p / q),
                }
            }
            Instr::Affine(a, alpha, beta) => {
                let (al, be) = (T::from_f64(alpha.get()), T::from_f64(beta.get()));
                for (d, &x) in dst.iter_mut().zip(src(a)) {
                    *d = x * al + be;
                }
            }
            Instr::Round(a, dt) => {
                for (d, &x) in dst.iter_mut().zip(src(a)) {
                    *d = round(x, dt);
                }
            }
        }
    }
}
