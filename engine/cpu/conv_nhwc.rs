//! Channels-last convolutions (`Layout::Nhwc`): x [N, H, W, C], w [O, kh, kw, C], y [N, Ho, Wo, O].
//!
//! In this layout a convolution is one matrix product per block of output pixels. The pixels' receptive fields
//! are gathered into rows of `kh·kw·C` (each tap a contiguous run of C channels, zeros where the window leaves
//! the image), and `rows × w^T` gives the pixels' O channels, already in NHWC order. The backward-input is the
//! transposed product followed by a scatter-add of the rows into dx; the weight gradient sums `dy^T × rows` over the
//! blocks. A 1×1, stride-1, unpadded convolution gathers nothing: the activations are the rows.
//!
//! The blocks are cut by the shape alone (not the thread count), so the sums, and the bits, are the same on any
//! number of threads.

use super::conv::Conv2dShape;
use super::direct_conv::backward_input_as_forward;
use super::float::Float;
use super::gemm::{matmul, GemmDims, MatMut, MatRef};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Elements of one block of gathered rows: 512 KiB of f32, so a block stays in a core's L2 cache while its product
/// reads it.
const BLOCK_ELEMS: usize = 128 * 1024;

/// Output pixels per block (all of them, across the batch, for a pointwise convolution).
fn block_pixels(s: &Conv2dShape) -> usize {
    let pixels = s.n * s.out_h() * s.out_w();
    if s.is_pointwise() {
        return pixels.max(1);
    }
    (BLOCK_ELEMS / patch_len(s).max(1)).clamp(16, pixels.max(16))
}

/// The length of one gathered row: one value per (kernel row, kernel column, input channel).
fn patch_len(s: &Conv2dShape) -> usize {
    s.kh * s.kw * s.c
}

/// Scratch elements one block of gathered rows takes (none for a pointwise convolution).
fn rows_len(s: &Conv2dShape) -> usize {
    if s.is_pointwise() {
        0
    } else {
        block_pixels(s) * patch_len(s)
    }
}

/// Scratch elements any of the three passes needs: a block of gathered rows, and for a backward-input that runs
/// as a forward convolution of dy ([`as_forward_of_dy`]), its flipped filter and its own block of rows.
pub fn scratch_len(s: &Conv2dShape) -> usize {
    match as_forward_of_dy(s) {
        Some(f) => rows_len(s).max(rows_len(&f) + s.weight_len()),
        None => rows_len(s),
    }
}

/// A stride-1 backward-input is the forward convolution of dy with the filter flipped in space and with its
/// channel axes swapped (w'[c, r, t, o] = w[o, kh-1-r, kw-1-t, c]) and padding kh-1-p: one product per block and
/// no scatter. The shape of that forward (the planar direct kernels' recast, [`backward_input_as_forward`]), where it
/// applies; a pointwise convolution needs neither.
fn as_forward_of_dy(s: &Conv2dShape) -> Option<Conv2dShape> {
    if s.is_pointwise() {
        return None;
    }
    backward_input_as_forward(s)
}

/// Checks the sizes, and that `scratch` holds the `needed` elements the pass uses.
fn check(s: &Conv2dShape, lens: [(&str, usize, usize); 3], (scratch, needed): (usize, usize)) -> Result<()> {
    s.validate()?;
    for (name, got, want) in lens {
        if got != want {
            return Err(Error::shape("conv2d (NHWC)", format!("{name} has {got} elements, expected {want}")));
        }
    }
    if scratch < needed {
        return Err(Error::msg(format!("conv2d (NHWC): scratch of {scratch} elements, {needed} needed")));
    }
    Ok(())
}

/// The input pixel (image row, column) a tap of an output pixel reads, or None in the padding.
fn source(s: &Conv2dShape, (oh, ow): (usize, usize), (r, t): (usize, usize)) -> Option<(usize, usize)> {
    let ih = (oh * s.stride + r).checked_sub(s.padding)?;
    let iw = (ow * s.stride + t).checked_sub(s.padding)?;
    (ih < s.h && iw < s.w).then_some((ih, iw))
}

/// Splits output pixel `p` (counted over the batch) into (image, row, column).
fn pixel(s: &Conv2dShape, p: usize) -> (usize, usize, usize) {
    let (ho, wo) = (s.out_h(), s.out_w());
    (p / (ho * wo), p / wo % ho, p % wo)
}

/// Gathers the receptive fields of output pixels `first..first + rows.len() / patch` into `rows`.
fn gather<T: Float>(s: &Conv2dShape, x: &[T], first: usize, rows: &mut [T]) {
    let (patch, c) = (patch_len(s), s.c);
    rows.par_chunks_mut(patch).enumerate().for_each(|(i, row)| {
        let (n, oh, ow) = pixel(s, first + i);
        for r in 0..s.kh {
            for t in 0..s.kw {
                let dst = &mut row[(r * s.kw + t) * c..][..c];
                match source(s, (oh, ow), (r, t)) {
                    Some((ih, iw)) => dst.copy_from_slice(&x[((n * s.h + ih) * s.w + iw) * c..][..c]),
                    None => dst.fill(T::ZERO),
                }
            }
        }
    });
}

/// Adds gathered-row gradients back into dx (the adjoint of [`gather`]). Windows overlap, so the threads split
/// the channels, not the pixels: each element of dx has one writer.
fn scatter_add<T: Float>(s: &Conv2dShape, rows: &[T], first: usize, dx: &mut [T]) {
    let (patch, c) = (patch_len(s), s.c);
    let threads = rayon::current_num_threads().clamp(1, c.div_ceil(8).max(1));
    let per = c.div_ceil(threads);
    let (dx_addr, dx_len) = (dx.as_mut_ptr() as usize, dx.len());
    (0..threads).into_par_iter().for_each(|part| {
        let (c0, c1) = (part * per, ((part + 1) * per).min(c));
        for (i, row) in rows.chunks_exact(patch).enumerate() {
            let (n, oh, ow) = pixel(s, first + i);
            for r in 0..s.kh {
                for t in 0..s.kw {
                    if let Some((ih, iw)) = source(s, (oh, ow), (r, t)) {
                        let src = &row[(r * s.kw + t) * c + c0..(r * s.kw + t) * c + c1];
                        let at = ((n * s.h + ih) * s.w + iw) * c + c0;
                        assert!(at + (c1 - c0) <= dx_len, "conv2d (NHWC): scatter past dx");
                        // SAFETY: `at..at + c1 - c0` lies inside dx (asserted above), and it holds
                        // channels c0..c1 of one pixel, which only this task writes: the tasks' channel ranges are
                        // disjoint, so no two live slices overlap. dx outlives the parallel loop.
                        let dst = unsafe { std::slice::from_raw_parts_mut((dx_addr as *mut T).add(at), c1 - c0) };
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d += v;
                        }
                    }
                }
            }
        }
    });
}

/// The rows of one block of output pixels, as the products read them: the activations themselves for a pointwise
/// convolution, else their receptive fields gathered into `scratch`.
fn block_rows<'a, T: Float>(
    s: &Conv2dShape,
    x: &'a [T],
    (first, count): (usize, usize),
    scratch: &'a mut [T],
) -> MatRef<'a, T> {
    if s.is_pointwise() {
        return MatRef::new(&x[first * s.c..(first + count) * s.c], s.c);
    }
    let patch = patch_len(s);
    gather(s, x, first, &mut scratch[..count * patch]);
    MatRef::new(&scratch[..count * patch], patch)
}

/// Output pixel blocks: (first pixel, pixel count).
fn blocks(s: &Conv2dShape) -> impl Iterator<Item = (usize, usize)> {
    let (total, per) = (s.n * s.out_h() * s.out_w(), block_pixels(s));
    (0..total.div_ceil(per)).map(move |b| (b * per, per.min(total - b * per)))
}

/// `y = conv(x, w) + bias`, all NHWC; y is overwritten.
pub fn forward<T: Float>(
    s: &Conv2dShape,
    (x, w, bias): (&[T], &[T], Option<&[T]>),
    y: &mut [T],
    scratch: &mut [T],
    threads: usize,
) -> Result<()> {
    let lens = [("x", x.len(), s.x_len()), ("w", w.len(), s.weight_len()), ("y", y.len(), s.y_len())];
    check(s, lens, (scratch.len(), rows_len(s)))?;
    if let Some(b) = bias {
        if b.len() != s.o {
            return Err(Error::shape("conv2d (NHWC)", format!("bias has {} elements, expected {}", b.len(), s.o)));
        }
        // The bias goes in first so the products accumulate onto it.
        for px in y.chunks_exact_mut(s.o) {
            px.copy_from_slice(b);
        }
    }
    let patch = patch_len(s);
    for (first, count) in blocks(s) {
        let rows = block_rows(s, x, (first, count), scratch);
        let out = MatMut::new(&mut y[first * s.o..(first + count) * s.o], s.o);
        matmul(GemmDims::new(count, s.o, patch), rows, MatRef::transposed(w, patch), out, bias.is_some(), threads)?;
    }
    Ok(())
}

/// `dx` from `dy` and the weight, all NHWC; dx is overwritten.
pub fn backward_input<T: Float>(
    s: &Conv2dShape,
    dy: &[T],
    w: &[T],
    dx: &mut [T],
    scratch: &mut [T],
    threads: usize,
) -> Result<()> {
    check(
        s,
        [("dy", dy.len(), s.y_len()), ("w", w.len(), s.weight_len()), ("dx", dx.len(), s.x_len())],
        (scratch.len(), scratch_len(s)),
    )?;
    let patch = patch_len(s);
    if s.is_pointwise() {
        let dims = GemmDims::new(s.n * s.h * s.w, s.c, s.o);
        return matmul(dims, MatRef::new(dy, s.o), MatRef::new(w, patch), MatMut::new(dx, s.c), false, threads);
    }
    if let Some(f) = as_forward_of_dy(s) {
        let (flipped, rest) = scratch.split_at_mut(s.weight_len());
        for (o, wo) in w.chunks_exact(patch).enumerate() {
            for r in 0..s.kh {
                for t in 0..s.kw {
                    let tap = &wo[(r * s.kw + t) * s.c..][..s.c];
                    let at = ((s.kh - 1 - r) * s.kw + (s.kw - 1 - t)) * s.o + o;
                    for (ch, &v) in tap.iter().enumerate() {
                        flipped[ch * s.kh * s.kw * s.o + at] = v;
                    }
                }
            }
        }
        return forward(&f, (dy, flipped, None), dx, rest, threads);
    }
    dx.fill(T::ZERO);
    for (first, count) in blocks(s) {
        let rows = &mut scratch[..count * patch];
        let dy_block = MatRef::new(&dy[first * s.o..(first + count) * s.o], s.o);
        matmul(
            GemmDims::new(count, patch, s.o),
            dy_block,
            MatRef::new(w, patch),
            MatMut::new(rows, patch),
            false,
            threads,
        )?;
        scatter_add(s, rows, first, dx);
    }
    Ok(())
}

/// `dw` from x and `dy`, all NHWC; dw is overwritten.
pub fn backward_weight<T: Float>(
    s: &Conv2dShape,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
    scratch: &mut [T],
    threads: usize,
) -> Result<()> {
    check(
        s,
        [("x", x.len(), s.x_len()), ("dy", dy.len(), s.y_len()), ("dw", dw.len(), s.weight_len())],
        (scratch.len(), rows_len(s)),
    )?;
    let patch = patch_len(s);
    for (i, (first, count)) in blocks(s).enumerate() {
        let rows = block_rows(s, x, (first, count), scratch);
        let dy_block = MatRef::transposed(&dy[first * s.o..(first + count) * s.o], s.o);
        let dims = GemmDims::new(s.o, patch, count);
        matmul(dims, dy_block, rows, MatMut::new(dw, patch), i > 0, threads)?;
    }
    if s.n * s.out_h() * s.out_w() == 0 {
        dw.fill(T::ZERO);
    }
    Ok(())
}
