//! Emulated cuDNN: the legacy-API 2-d convolution (`cudnnConvolutionForward`, `cudnnConvolutionBackwardData`,
//! `cudnnConvolutionBackwardFilter`; cross-correlation mode, dilation 1, one group), written from the cuDNN
//! documentation and deliberately independent of the lowering that builds [`Conv`]s.
//!
//! - [`validate`] rejects what cuDNN rejects (and what it leaves undefined), with one error naming the parameter.
//! - [`footprint`] gives the byte range of each operand and of the workspace.
//! - [`execute`] fills the workspace with 0xff bytes, then computes a naive cross-correlation in f64 and rounds
//!   each output element once; the output is not read when `beta == 0`.
//!
//! Memory formats (cuDNN API reference, `cudnnTensorFormat_t`, `cudnnSetTensor4dDescriptor`,
//! `cudnnSetFilter4dDescriptor`): dims are always given as [N, C, H, W] / [K, C, R, S]; a packed NCHW tensor puts
//! W innermost and N outermost, a packed NHWC tensor puts C innermost ("image, rows, columns, feature maps"); a
//! filter described with CUDNN_TENSOR_NCHW is laid out KCRS, with CUDNN_TENSOR_NHWC KRSC.
//!
//! Semantics, with `ih = oh*stride_h - pad_h + r`, `iw = ow*stride_w - pad_w + s` (taps outside the input read
//! zero padding):
//! - forward: `y[n,k,oh,ow] = alpha * sum_{c,r,s} x[n,c,ih,iw] * w[k,c,r,s] + beta * y`;
//! - backward data: `dx[n,c,ih,iw] = alpha * sum_{k,r,s,oh,ow with ih,iw} dy[n,k,oh,ow] * w[k,c,r,s] + beta * dx`
//!   (the adjoint of forward in x), dx in `x`, dy in `y`;
//! - backward filter: `dw[k,c,r,s] = alpha * sum_{n,oh,ow} x[n,c,ih,iw] * dy[n,k,oh,ow] + beta * dw` (the adjoint
//!   of forward in w), dw in `w`.

use super::blas::{encode, poison_workspace, read_elem};
use super::{Conv, ConvDirection, DevPtr, Layout4, Span};
use crate::error::{Error, Result};
use crate::graph::DType;

/// The byte ranges of a [`Conv`]'s operands (packed tensors: elements × element size from the pointer) and its
/// workspace (as given).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvFootprint {
    pub x: Span,
    pub w: Span,
    pub y: Span,
    pub workspace: Span,
}

fn elems(dims: &[u64; 4]) -> Option<u64> {
    dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

fn packed_bytes(dims: &[u64; 4], dtype: DType) -> Option<u64> {
    elems(dims)?.checked_mul(dtype.size() as u64)
}

/// The byte range of each operand: `N*C*H*W` (x, y) or `K*C*R*S` (w) elements of their type from the pointer,
/// and the workspace span as given. Sizes that overflow u64 (which [`validate`] rejects) saturate.
pub fn footprint(c: &Conv) -> ConvFootprint {
    let span =
        |ptr: DevPtr, dims: &[u64; 4], dtype: DType| Span::new(ptr, packed_bytes(dims, dtype).unwrap_or(u64::MAX));
    ConvFootprint {
        x: span(c.x.ptr, &c.x.dims, c.x.dtype),
        w: span(c.w.ptr, &c.w.dims, c.w.dtype),
        y: span(c.y.ptr, &c.y.dims, c.y.dtype),
        workspace: c.workspace,
    }
}

fn direction_name(d: ConvDirection) -> &'static str {
    match d {
        ConvDirection::Forward => "forward",
        ConvDirection::BackwardData => "backward data",
        ConvDirection::BackwardFilter => "backward filter",
    }
}

fn layout_name(l: Layout4) -> &'static str {
    match l {
        Layout4::Nchw => "NCHW",
        Layout4::Nhwc => "NHWC",
    }
}

/// cudnnGetConvolution2dForwardOutputDim for one spatial dim (dilation 1):
/// `1 + (input + 2*pad - filter) / stride`; None when the filter is larger than the padded input.
fn output_dim(input: u64, pad: u64, filter: u64, stride: u64) -> Option<u64> {
    let padded = input.checked_add(pad.checked_mul(2)?)?;
    Some(padded.checked_sub(filter)? / stride + 1)
}

fn spans_overlap(a: &Span, b: &Span) -> bool {
    a.bytes > 0 && b.bytes > 0 && a.ptr.0 < b.end() && b.ptr.0 < a.end()
}

/// Checks `c` against what cuDNN accepts; one error naming the offending parameter and its values.
///
/// Rules and their sources (cuDNN API reference):
/// - x, w and y have one type among f32, bf16, f16 (cudnnConvolutionForward and the backward calls return
///   CUDNN_STATUS_BAD_PARAM when xDesc, wDesc and yDesc have non-matching data types; with f32 compute these are
///   the FLOAT_CONFIG, PSEUDO_HALF_CONFIG and PSEUDO_BFLOAT16_CONFIG rows of the supported-configurations tables;
///   f64 and integer types are refused here).
/// - x, w and y share one memory-format family: NCHW tensors with a KCRS (CUDNN_TENSOR_NCHW) filter, or NHWC
///   tensors with a KRSC (CUDNN_TENSOR_NHWC) filter (the layout combinations the legacy convolution supports for
///   these types).
/// - Every dim is >= 1 (cudnnSetTensorNdDescriptor returns BAD_PARAM for an element of dimA that is negative or
///   zero), at most i32::MAX (the descriptors take `int`), and each tensor has at most i32::MAX elements
///   (cudnnSetTensorNdDescriptor returns NOT_SUPPORTED when the tensor exceeds 2 Giga-elements).
/// - `x.dims[1] == w.dims[1]` (BAD_PARAM when xDesc and wDesc have a non-matching number of input feature
///   maps; one group).
/// - `stride >= 1` (cudnnSetConvolution2dDescriptor returns BAD_PARAM when u or v is negative or zero); padding
///   >= 0 holds by type (BAD_PARAM when pad_h or pad_w is strictly negative).
/// - The filter fits in the padded input (`R <= H + 2*pad_h`, `S <= W + 2*pad_w`: BAD_PARAM when wDesc has a
///   spatial size larger than the input's including zero padding), and
///   `y.dims == [N, K, 1 + (H + 2*pad_h - R) / stride_h, 1 + (W + 2*pad_w - S) / stride_w]`, the dims
///   cudnnGetConvolution2dForwardOutputDim gives (dilation 1), which the convolution calls expect of yDesc.
/// - `algo` is a value of the direction's enum: cudnnConvolutionFwdAlgo_t has 8 (IMPLICIT_GEMM .. WINOGRAD_NONFUSED),
///   cudnnConvolutionBwdDataAlgo_t 6 (ALGO_0 .. WINOGRAD_NONFUSED), cudnnConvolutionBwdFilterAlgo_t 7 (ALGO_0 ..
///   FFT_TILING) except CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD (4), which cudnn.h marks "not implemented"
///   (NOT_SUPPORTED).
/// - Non-null pointers aligned to the element size (cuDNN reads the tensors with typed, aligned loads), and no
///   two of x, w, y overlap (the output of every direction must not alias its inputs: results are undefined).
/// - A workspace of more than 0 bytes has a non-null pointer and does not overlap x, w or y (the library
///   overwrites it freely).
pub fn validate(c: &Conv) -> Result<()> {
    let dir = direction_name(c.direction);
    let err = |msg: String| Error::msg(format!("conv ({dir}): {msg}"));

    // Types and layouts.
    let t = c.x.dtype;
    if !matches!(t, DType::F32 | DType::BF16 | DType::F16) {
        return Err(err(format!("x dtype {t} is not supported (f32, bf16 or f16)")));
    }
    for (name, d) in [("w", c.w.dtype), ("y", c.y.dtype)] {
        if d != t {
            return Err(err(format!("{name} dtype {d} differs from x dtype {t} (cuDNN needs one data type)")));
        }
    }
    let l = c.x.layout;
    for (name, ll) in [("w", c.w.layout), ("y", c.y.layout)] {
        if ll != l {
            return Err(err(format!(
                "{name} layout {} differs from x layout {} (NCHW tensors go with KCRS filters, NHWC with KRSC)",
                layout_name(ll),
                layout_name(l)
            )));
        }
    }

    // Dims.
    for (name, dims) in [("x", &c.x.dims), ("w", &c.w.dims), ("y", &c.y.dims)] {
        if let Some(i) = dims.iter().position(|&d| d == 0 || d > i32::MAX as u64) {
            return Err(err(format!("{name}.dims = {dims:?}: dim {i} must be in 1..=i32::MAX")));
        }
        if elems(dims).is_none_or(|e| e > i32::MAX as u64) {
            return Err(err(format!("{name}.dims = {dims:?} exceeds cuDNN's limit of 2^31-1 elements per tensor")));
        }
    }
    let [n, ch, h, wd] = c.x.dims;
    let [k, wc, r, s] = c.w.dims;
    if wc != ch {
        return Err(err(format!("w.dims[1] = {wc} (filter channels) differs from x.dims[1] = {ch} (input channels)")));
    }
    let [sh, sw] = c.stride;
    if sh == 0 || sw == 0 {
        return Err(err(format!("stride = {:?}: strides must be >= 1", c.stride)));
    }
    let [ph, pw] = c.padding;
    let (Some(ho), Some(wo)) = (output_dim(h, ph, r, sh), output_dim(wd, pw, s, sw)) else {
        return Err(err(format!(
            "filter {r}x{s} (w.dims = {:?}) is larger than the padded input {}x{} (x.dims = {:?}, padding = {:?})",
            c.w.dims,
            h as u128 + 2 * ph as u128,
            wd as u128 + 2 * pw as u128,
            c.x.dims,
            c.padding
        )));
    };
    let want = [n, k, ho, wo];
    if c.y.dims != want {
        return Err(err(format!(
            "y.dims = {:?} but cudnnGetConvolution2dForwardOutputDim gives {want:?} for x.dims = {:?}, w.dims = {:?}, \
             padding = {:?}, stride = {:?}",
            c.y.dims, c.x.dims, c.w.dims, c.padding, c.stride
        )));
    }

    // Algorithm.
    let (count, algo_enum) = match c.direction {
        ConvDirection::Forward => (8, "cudnnConvolutionFwdAlgo_t"),
        ConvDirection::BackwardData => (6, "cudnnConvolutionBwdDataAlgo_t"),
        ConvDirection::BackwardFilter => (7, "cudnnConvolutionBwdFilterAlgo_t"),
    };
    if c.algo >= count {
        return Err(err(format!("algo = {} is not a {algo_enum} (0..{count})", c.algo)));
    }
    if c.direction == ConvDirection::BackwardFilter && c.algo == 4 {
        return Err(err("algo = 4 (CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD) is not implemented by cuDNN".into()));
    }

    // Memory.
    let fp = footprint(c);
    let size = t.size() as u64;
    for (name, sp) in [("x", &fp.x), ("w", &fp.w), ("y", &fp.y)] {
        if sp.ptr == DevPtr::NULL {
            return Err(err(format!("{name} pointer is null")));
        }
        if sp.ptr.0.checked_add(sp.bytes).is_none() {
            return Err(err(format!("{name} ({} bytes) overflows the address space", sp.bytes)));
        }
        if sp.ptr.0 % size != 0 {
            return Err(err(format!(
                "{name} pointer {:#x} is not aligned to its element size ({size} bytes, {t})",
                sp.ptr.0
            )));
        }
    }
    for (an, a, bn, b) in [("x", &fp.x, "w", &fp.w), ("x", &fp.x, "y", &fp.y), ("w", &fp.w, "y", &fp.y)] {
        if spans_overlap(a, b) {
            return Err(err(format!(
                "{an} [{:#x}, {:#x}) overlaps {bn} [{:#x}, {:#x})",
                a.ptr.0,
                a.end(),
                b.ptr.0,
                b.end()
            )));
        }
    }
    let ws = c.workspace;
    if ws.bytes > 0 {
        if ws.ptr == DevPtr::NULL {
            return Err(err(format!("workspace pointer is null but workspace bytes = {}", ws.bytes)));
        }
        if ws.ptr.0.checked_add(ws.bytes).is_none() {
            return Err(err(format!("workspace ({} bytes) overflows the address space", ws.bytes)));
        }
        for (name, sp) in [("x", &fp.x), ("w", &fp.w), ("y", &fp.y)] {
            if spans_overlap(&ws, sp) {
                return Err(err(format!(
                    "workspace [{:#x}, {:#x}) overlaps {name} [{:#x}, {:#x})",
                    ws.ptr.0,
                    ws.end(),
                    sp.ptr.0,
                    sp.end()
                )));
            }
        }
    }
    Ok(())
}

/// Element offset of tensor element (n, c, h, w) of a packed tensor with dims [N, C, H, W].
fn tensor_offset(layout: Layout4, dims: &[usize; 4], n: usize, c: usize, h: usize, w: usize) -> usize {
    let [_, cc, hh, ww] = *dims;
    match layout {
        Layout4::Nchw => ((n * cc + c) * hh + h) * ww + w,
        Layout4::Nhwc => ((n * hh + h) * ww + w) * cc + c,
    }
}

/// Element offset of filter element (k, c, r, s) of a packed filter with dims [K, C, R, S]: KCRS or KRSC.
fn filter_offset(layout: Layout4, dims: &[usize; 4], k: usize, c: usize, r: usize, s: usize) -> usize {
    let [_, cc, rr, ss] = *dims;
    match layout {
        Layout4::Nchw => ((k * cc + c) * rr + r) * ss + s,
        Layout4::Nhwc => ((k * rr + r) * ss + s) * cc + c,
    }
}

/// For a tensor (or filter) with dims `d`, the memory offset of each element in logical [d0][d1][d2][d3] order.
fn physical_offsets(layout: Layout4, d: &[usize; 4], filter: bool) -> Vec<usize> {
    let mut out = Vec::with_capacity(d.iter().product());
    for a in 0..d[0] {
        for b in 0..d[1] {
            for c in 0..d[2] {
                for e in 0..d[3] {
                    out.push(if filter {
                        filter_offset(layout, d, a, b, c, e)
                    } else {
                        tensor_offset(layout, d, a, b, c, e)
                    });
                }
            }
        }
    }
    out
}

/// Reads a packed operand into logical (NCHW / KCRS) order.
///
/// # Safety
/// `span` (which covers every offset times the element size) is readable, initialised memory.
unsafe fn load(span: &Span, dtype: DType, offsets: &[usize]) -> Vec<f64> {
    let size = dtype.size() as u64;
    offsets
        .iter()
        .map(|&o| {
            // SAFETY: `o < elements`, so the element lies inside `span`, which the caller guarantees readable.
            unsafe { read_elem(span.ptr.0 + o as u64 * size, dtype) }
        })
        .collect()
}

/// Runs the convolution on the host: validates it, fills the workspace with 0xff bytes (so a workspace that
/// overlaps live data shows), then computes the direction's result (see the module docs) with f64 products and
/// sums, `alpha * sum + beta * out` (the output not read when `beta == 0`), each element rounded once to the
/// type. Every element of the output tensor is written; the inputs and the rest of memory are untouched. The math
/// type is not emulated: the result is the exact one that CUDNN_FMA_MATH approximates (TF32 under
/// CUDNN_DEFAULT_MATH is allowed, not promised, so no rounding is modelled for it).
///
/// # Safety
/// - Every span of [`footprint`]`(c)` is valid, initialised host memory (the emulated device's `DevPtr`s are
///   host addresses) for the call: the inputs readable, the output (y forward, x backward data, w backward
///   filter) and the workspace writable.
/// - No Rust reference to the output or workspace spans is live during the call. (The spans do not overlap one
///   another: [`validate`] checks that.)
pub unsafe fn execute(c: &Conv) -> Result<()> {
    validate(c)?;
    let fp = footprint(c);
    // SAFETY: the caller guarantees the workspace span writable and unaliased; its length fits the address space
    // (validated).
    unsafe { poison_workspace(fp.workspace) };

    let ud = |d: &[u64; 4]| d.map(|v| v as usize);
    let (xd, wdims, yd) = (ud(&c.x.dims), ud(&c.w.dims), ud(&c.y.dims));
    let [n_, c_, h_, w_] = xd;
    let [k_, _, r_, s_] = wdims;
    let [_, _, ho_, wo_] = yd;
    let [sh, sw] = c.stride.map(|v| v as usize);
    let [ph, pw] = c.padding.map(|v| v as usize);
    let (xo, wo, yo) = (
        physical_offsets(c.x.layout, &xd, false),
        physical_offsets(c.w.layout, &wdims, true),
        physical_offsets(c.y.layout, &yd, false),
    );
    let t = c.x.dtype;
    let (alpha, beta) = (c.alpha as f64, c.beta as f64);
    // Logical flat indices.
    let xi = |n: usize, ch: usize, h: usize, w: usize| ((n * c_ + ch) * h_ + h) * w_ + w;
    let wi = |k: usize, ch: usize, r: usize, s: usize| ((k * c_ + ch) * r_ + r) * s_ + s;
    let yi = |n: usize, k: usize, h: usize, w: usize| ((n * k_ + k) * ho_ + h) * wo_ + w;
    // The input tap (ih, iw) read by output (oh, ow) through filter tap (r, s), if inside the input.
    let tap = |oh: usize, ow: usize, r: usize, s: usize| -> Option<(usize, usize)> {
        let ih = (oh * sh + r).checked_sub(ph)?;
        let iw = (ow * sw + s).checked_sub(pw)?;
        (ih < h_ && iw < w_).then_some((ih, iw))
    };

    // The two inputs of the direction, in logical order, and the output's span and offsets.
    let (out_span, out_offsets) = match c.direction {
        ConvDirection::Forward => (fp.y, &yo),
        ConvDirection::BackwardData => (fp.x, &xo),
        ConvDirection::BackwardFilter => (fp.w, &wo),
    };
    let mut acc = vec![0f64; out_offsets.len()];
    match c.direction {
        ConvDirection::Forward => {
            // SAFETY: x and w are inputs of the forward convolution, readable by the caller's contract.
            let (x, w) = unsafe { (load(&fp.x, t, &xo), load(&fp.w, t, &wo)) };
            for n in 0..n_ {
                for k in 0..k_ {
                    for oh in 0..ho_ {
                        for ow in 0..wo_ {
                            let mut sum = 0f64;
                            for ch in 0..c_ {
                                for r in 0..r_ {
                                    for s in 0..s_ {
                                        if let Some((ih, iw)) = tap(oh, ow, r, s) {
                                            sum += x[xi(n, ch, ih, iw)] * w[wi(k, ch, r, s)];
                                        }
                                    }
                                }
                            }
                            acc[yi(n, k, oh, ow)] = sum;
                        }
                    }
                }
            }
        }
        ConvDirection::BackwardData => {
            // SAFETY: dy (in y) and w are inputs of the backward-data convolution, readable by the contract.
            let (dy, w) = unsafe { (load(&fp.y, t, &yo), load(&fp.w, t, &wo)) };
            for n in 0..n_ {
                for k in 0..k_ {
                    for oh in 0..ho_ {
                        for ow in 0..wo_ {
                            let g = dy[yi(n, k, oh, ow)];
                            for r in 0..r_ {
                                for s in 0..s_ {
                                    if let Some((ih, iw)) = tap(oh, ow, r, s) {
                                        for ch in 0..c_ {
                                            acc[xi(n, ch, ih, iw)] += g * w[wi(k, ch, r, s)];
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        ConvDirection::BackwardFilter => {
            // SAFETY: x and dy (in y) are inputs of the backward-filter convolution, readable by the contract.
            let (x, dy) = unsafe { (load(&fp.x, t, &xo), load(&fp.y, t, &yo)) };
            for n in 0..n_ {
                for k in 0..k_ {
                    for oh in 0..ho_ {
                        for ow in 0..wo_ {
                            let g = dy[yi(n, k, oh, ow)];
                            for r in 0..r_ {
                                for s in 0..s_ {
                                    if let Some((ih, iw)) = tap(oh, ow, r, s) {
                                        for ch in 0..c_ {
                                            acc[wi(k, ch, r, s)] += g * x[xi(n, ch, ih, iw)];
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    // Output: alpha * acc + beta * out, read only when beta != 0, encoded into one buffer and written at once.
    let old = if beta != 0.0 {
        // SAFETY: the output span is readable (it is read-write by the caller's contract).
        Some(unsafe { load(&out_span, t, out_offsets) })
    } else {
        None
    };
    let size = t.size();
    let mut bytes = vec![0u8; out_span.bytes as usize];
    for (i, &o) in out_offsets.iter().enumerate() {
        let mut v = alpha * acc[i];
        if let Some(old) = &old {
            v += beta * old[i];
        }
        let (e, len) = encode(v, t);
        bytes[o * size..o * size + len].copy_from_slice(&e[..len]);
    }
    let p = std::ptr::with_exposed_provenance_mut::<u8>(out_span.ptr.0 as usize);
    // SAFETY: the output span is exactly `bytes.len()` writable bytes, unaliased by the caller's contract; `bytes`
    // is a fresh local buffer, so the ranges do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
    Ok(())
}
