//! Direct convolution on f32 with AVX-512, for convolutions whose im2col products are too thin to run
//! at speed: few channels over large maps (a ControlNet's hint encoder: 3→16→16→32→32→96→96→256 channels
//! from 512² down to 64² at SD scale). There the products have only 16-96 rows and 27-288 columns, and the
//! `gemm` crate's packing and blocking cost more than the arithmetic (25-50% of the machine's peak, see
//! BENCHMARKS.md).
//!
//! One image at a time, in bands of output rows, each band by one thread:
//! 1. [`prepare_band`] copies the input rows the band reads into zero-padded *planes* (a buffer of the
//!    thread's own, so they stay in its cache): for each channel and each stride phase `q`, the padded rows,
//!    keeping every `stride`-th column starting at `q`. A tap `(i, j)` of output row `oy` then reads a
//!    contiguous run of plane `(c, j mod s)`, row `oy·s + i`, from column `j div s`: no gathers and no bounds
//!    checks in the inner loop, for any stride and padding.
//! 2. The kernel holds a 6-channel × 64-pixel block of outputs in 24 vector registers (64 pixels of one row, or
//!    two rows of 32, or four of 16, as wide as the output is) and runs over every tap: four vector loads and six
//!    weight broadcasts per 24 FMAs.
//!
//! The backward-input of a stride-1 convolution is the forward convolution of `dy` with the flipped, transposed
//! weight and padding `k - 1 - p` ([`backward_input_as_forward`]). A strided one splits `dx` into its `s²` output
//! phases (pixels `(s·a + py, s·b + px)`), each a stride-1 convolution of `dy` with the window's taps that land on
//! it (for 3×3, stride 2: 1, 2, 2 and 4 taps), run by the same kernel ([`strided_backward_input_image`]).
//!
//! The weight gradient ([`backward_weight`]) reads the same planes: a block of `dw`, 3 output channels × the 9 taps
//! of one input channel's 3×3 window, is 27 vector partial sums over a band's pixels (twelve loads per 27 FMAs, the
//! nine tap loads from the same cache lines), folded into `dw` once per band.
//! The output rows are split into a fixed number of groups by the shape alone, each summing into its own
//! partial gradient, added in group order at the end, so the bits do not depend on the thread count.
//!
//! Every output element is computed by one thread in an order fixed by the shape alone, so the results have the
//! same bits whatever the thread count. They differ from the im2col path's in rounding (another summation
//! order), and this path runs only where AVX-512 is present: a machine without it computes the same convolution
//! through im2col, equal within rounding, not bit for bit.

use super::conv::Conv2dShape;
use super::layout::{copy_strided_f32, interleave2_f32};
use crate::error::{Error, Result};
use smallvec::SmallVec;
use std::ops::Range;

/// f32 lanes per AVX-512 vector.
pub(super) const LANES: usize = 16;
/// Forward: output channels per register block.
const FWD_CHANNELS: usize = 6;
/// Forward: output vectors per register block (24 accumulators): four vectors of one row where the output is wider
/// than 32 pixels, else two rows of two vectors or four rows of one (see [`strip_vectors`]). Each tap then costs
/// four vector loads and six weight broadcasts per 24 FMAs.
const FWD_BLOCK_VECTORS: usize = 4;

/// Forward: vectors per register block along an output row of `width` pixels: 4 (64 pixels) where the row is wider
/// than 32, else as few as cover the row; the block takes `FWD_BLOCK_VECTORS / vectors` rows.
fn strip_vectors(width: usize) -> usize {
    match width.div_ceil(LANES) {
        0 | 1 => 1,
        2 => 2,
        _ => FWD_BLOCK_VECTORS,
    }
}
/// Weight gradient: output channels and taps per register block (27 accumulators). The taps of a block belong to
/// one input channel (all nine of a 3×3 window), so their loads hit the same few cache lines of the planes.
const DW_CHANNELS: usize = 3;
const DW_TAPS: usize = 9;
/// Weight gradient: groups of output rows with partial gradients of their own (fewer when there are fewer rows):
/// the most threads the weight gradient uses.
const DW_GROUPS: usize = 4;
/// About this many bytes of planes per band: the band's input stays in the thread's L2 cache between being
/// copied and being read by every block of output channels.
const BAND_BYTES: usize = 384 << 10;
/// The weight gradient's bands are larger: each band costs a horizontal sum per accumulator and block, so a group
/// of rows is best one band (up to what still fits a 1 MiB L2 cache beside dy's rows).
const DW_BAND_BYTES: usize = 768 << 10;

/// Whether this CPU runs the direct kernels (AVX-512 F), detected once.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// The layout of one band's planes (see the module comment).
#[derive(Clone, Copy, Debug)]
pub(super) struct Planes {
    /// Output rows per band (the last band may have fewer).
    pub(super) band_rows: usize,
    /// Stride phases per channel.
    phases: usize,
    /// Padded input rows per plane: those the band's output rows read.
    rows: usize,
    /// Elements per plane row: every column a block of outputs reads, whole blocks included.
    row_len: usize,
}

impl Planes {
    /// The forward's bands (over all output rows).
    fn of(s: &Conv2dShape) -> Planes {
        Planes::over(s, s.out_h(), BAND_BYTES)
    }
    /// Bands of about `budget` bytes over `rows` output rows, balanced (no runt band at the end).
    pub(super) fn over(s: &Conv2dShape, rows: usize, budget: usize) -> Planes {
        let stride = s.stride.max(1);
        let strip = strip_vectors(s.out_w()) * LANES;
        let row_len = s.out_w().div_ceil(strip) * strip + (s.kw - 1) / stride;
        // Input rows per output row, over every channel and phase.
        let row_bytes = 4 * row_len * s.c.max(1) * stride * stride;
        let rows = rows.max(1);
        let bands = rows.div_ceil((budget / row_bytes).clamp(1, rows));
        let band_rows = rows.div_ceil(bands);
        Planes { band_rows, phases: stride, rows: (band_rows - 1) * stride + s.kh, row_len }
    }
    fn plane_len(&self) -> usize {
        self.rows * self.row_len
    }
    pub(super) fn len(&self, channels: usize) -> usize {
        channels * self.phases * self.plane_len()
    }
    /// Offset of the run tap `(c, i, j)` of the band's output row `r` reads.
    pub(super) fn tap(&self, (c, i, j): (usize, usize, usize), r: usize) -> usize {
        let plane = c * self.phases + j % self.phases;
        plane * self.plane_len() + (r * self.phases + i) * self.row_len + j / self.phases
    }
}

/// Taps of one output channel: `C·kh·kw`, in the weight's `(c, i, j)` order.
fn taps(s: &Conv2dShape) -> usize {
    s.c * s.kh * s.kw
}

fn tap_index(s: &Conv2dShape, t: usize) -> (usize, usize, usize) {
    (t / (s.kh * s.kw), t / s.kw % s.kh, t % s.kw)
}

/// Threads a convolution of this shape runs on, given `threads` (at least 1, at most one per band).
fn workers(s: &Conv2dShape, threads: usize) -> usize {
    band_workers(s.out_h(), Planes::of(s).band_rows, threads)
}

/// Threads `rows` output rows in bands of `band_rows` run on: at most one per band.
pub(super) fn band_workers(rows: usize, band_rows: usize, threads: usize) -> usize {
    threads.clamp(1, rows.div_ceil(band_rows).max(1))
}

/// Scratch elements of [`forward_image`] on `threads` threads: one band of planes per thread.
pub fn planes_scratch_len(s: &Conv2dShape, threads: usize) -> usize {
    workers(s, threads) * Planes::of(s).len(s.c)
}

/// Elements of the packed weight [`pack_weight`] writes and [`forward_image`] reads.
pub fn packed_weight_len(s: &Conv2dShape) -> usize {
    packed_len(s.o, taps(s))
}

/// Elements of a weight of `taps` taps packed for `channels` output channels (whole register blocks).
fn packed_len(channels: usize, taps: usize) -> usize {
    channels.div_ceil(FWD_CHANNELS) * FWD_CHANNELS * taps
}

/// Packs the forward weight into `packed` (`packed_weight_len`) by blocks of output channels:
/// `packed[(block·T + t)·6 + k] = weight(block·6 + k, t)`, zero past the last channel. `weight(o, t)` is tap `t`
/// (`(c·kh + i)·kw + j`) of output channel `o`. Once per call, before the images.
pub fn pack_weight(s: &Conv2dShape, weight: impl Fn(usize, usize) -> f32, packed: &mut [f32]) -> Result<()> {
    check(s, "packed weight", packed.len(), packed_weight_len(s))?;
    pack(s.o, taps(s), weight, packed);
    Ok(())
}

fn pack(channels: usize, taps: usize, weight: impl Fn(usize, usize) -> f32, packed: &mut [f32]) {
    if taps == 0 {
        // A phase no tap lands on (a 1×1 window of stride 2): nothing to pack, its pixels get zeros.
        return;
    }
    for (block, chunk) in packed.chunks_exact_mut(taps * FWD_CHANNELS).enumerate() {
        for (t, lanes) in chunk.chunks_exact_mut(FWD_CHANNELS).enumerate() {
            for (k, slot) in lanes.iter_mut().enumerate() {
                let o = block * FWD_CHANNELS + k;
                *slot = if o < channels { weight(o, t) } else { 0.0 };
            }
        }
    }
}

/// The forward convolution that computes the backward-input of the stride-1 convolution `s`: over `dy`
/// (`O` channels of `Ho × Wo`), padding `k - 1 - p`, weight `w'[c][o][i][j] = w[o][c][k-1-i][k-1-j]`, giving `dx`
/// (`C × H × W`). None when `s` is strided, its window not square, or its padding wider than the window.
pub fn backward_input_as_forward(s: &Conv2dShape) -> Option<Conv2dShape> {
    if s.stride != 1 || s.kh != s.kw || s.padding >= s.kh {
        return None;
    }
    let recast = Conv2dShape {
        n: s.n,
        c: s.o,
        h: s.out_h(),
        w: s.out_w(),
        o: s.c,
        kh: s.kh,
        kw: s.kw,
        stride: 1,
        padding: s.kh - 1 - s.padding,
    };
    (recast.out_h() == s.h && recast.out_w() == s.w).then_some(recast)
}

/// The recast weight of [`backward_input_as_forward`], as `pack_weight` takes it: tap `(o, i, j)` of output
/// channel `c`.
pub fn flipped_weight<'a>(s: &'a Conv2dShape, w: &'a [f32]) -> impl Fn(usize, usize) -> f32 + Sync + 'a {
    let window = s.kh * s.kw;
    // Where recast tap t = (o, i, j) reads for input channel 0 (channel c adds c·window): computed once, so that
    // packing does no divisions per element (three per element cost more than the packing itself, ~2 ms for
    // 128 channels, as much as the convolution they feed at 16x16).
    let from: Vec<usize> = (0..s.o * window)
        .map(|t| {
            // The recast has the same square window, so its tap numbering is `tap_index`'s, with `o` for `c`.
            let (o, i, j) = tap_index(s, t);
            o * s.c * window + (s.kh - 1 - i) * s.kw + (s.kw - 1 - j)
        })
        .collect();
    move |c, t| w[from[t] + c * window]
}

/// Fills `planes` with the input rows that output rows `first..first + band_rows` read, from one image `x_n`
/// (`C × H × W`).
pub(super) fn prepare_band(s: &Conv2dShape, p: &Planes, x_n: &[f32], first: usize, planes: &mut [f32]) {
    let plane_size = s.h * s.w;
    for (index, plane) in planes[..p.len(s.c)].chunks_exact_mut(p.plane_len()).enumerate() {
        let (c, q) = (index / p.phases, index % p.phases);
        let x_c = &x_n[c * plane_size..(c + 1) * plane_size];
        for (r, row) in plane.chunks_exact_mut(p.row_len).enumerate() {
            // Band row r is padded row first·stride + r, i.e. input row first·stride + r - padding.
            let input_row = (first * p.phases + r).checked_sub(s.padding).filter(|&iy| iy < s.h);
            let Some(iy) = input_row else {
                row.fill(0.0);
                continue;
            };
            let x_row = &x_c[iy * s.w..(iy + 1) * s.w];
            // Plane column k holds padded column k·stride + q, i.e. input column k·stride + q - padding: those
            // from `lo` to `hi` lie inside the row, the rest is padding.
            let stride = p.phases;
            let lo = s.padding.saturating_sub(q).div_ceil(stride).min(row.len());
            let hi = (s.padding + s.w).saturating_sub(q).div_ceil(stride).clamp(lo, row.len());
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
            let first_column = lo * stride + q - s.padding;
            copy_strided_f32(&mut row[lo..hi], &x_row[first_column..], stride);
        }
    }
}

/// A strided backward-input the direct kernels compute: odd square windows with "same" padding (`(k - 1) / 2`, as
/// every strided convolution of SD's U-Net and hint encoder has), so every output phase fits in `dy`'s planes.
pub fn strided_backward_input_supported(s: &Conv2dShape) -> bool {
    s.stride >= 2 && s.kh == s.kw && s.kh % 2 == 1 && s.padding == (s.kh - 1) / 2 && s.out_h() > 0 && s.out_w() > 0
}

/// One output phase `(py, px)` of a strided backward-input (`phases` lists them `py`-major): the pixels
/// `dx[c][s·a + py][s·b + px]`, `rows × cols` of them, are a stride-1 convolution of `dy` with the window's taps
/// `(i, j)` that land on them, tap `(o, i, j)` reading `dy[o][a + dr][b + dc]`.
struct Phase {
    rows: usize,
    cols: usize,
    /// `(o, i, j, dr, dc)`, output channels outermost.
    taps: Vec<(usize, usize, usize, isize, isize)>,
}

/// The phases of the strided backward-input `s` (which `strided_backward_input_supported` accepts), and the
/// padding of `dy`'s planes that covers every tap's offset.
fn phases(s: &Conv2dShape) -> (Vec<Phase>, usize) {
    let (st, pad) = (s.stride as isize, s.padding as isize);
    // Taps of window index `i` that land on phase `q`: dx row s·a + q = s·oy + i - pad, i.e. oy = a + (q + pad - i) / s.
    let offsets = |q: usize, k: usize| -> Vec<(usize, isize)> {
        (0..k)
            .filter(|&i| (q as isize + pad - i as isize).rem_euclid(st) == 0)
            .map(|i| (i, (q as isize + pad - i as isize).div_euclid(st)))
            .collect()
    };
    let mut out = Vec::new();
    let mut reach = 0;
    for py in 0..s.stride {
        for px in 0..s.stride {
            let (rows, cols) = (s.h.saturating_sub(py).div_ceil(s.stride), s.w.saturating_sub(px).div_ceil(s.stride));
            let mut taps = Vec::new();
            for o in 0..s.o {
                for &(i, dr) in &offsets(py, s.kh) {
                    for &(j, dc) in &offsets(px, s.kw) {
                        reach = reach.max(dr.unsigned_abs()).max(dc.unsigned_abs());
                        taps.push((o, i, j, dr, dc));
                    }
                }
            }
            out.push(Phase { rows, cols, taps });
        }
    }
    (out, reach)
}

/// `dy`'s planes for the phases: a stride-1 "convolution" over `dy` (`O × Ho × Wo`) padded by `reach`.
fn dy_shape(s: &Conv2dShape, reach: usize) -> Conv2dShape {
    let k = 2 * reach + 1;
    Conv2dShape { n: s.n, c: s.o, h: s.out_h(), w: s.out_w(), o: s.c, kh: k, kw: k, stride: 1, padding: reach }
}

/// Elements of all phases' packed weights.
pub fn strided_backward_input_packed_len(s: &Conv2dShape) -> usize {
    phases(s).0.iter().map(|ph| packed_len(s.c, ph.taps.len())).sum()
}

/// How [`strided_backward_input_image`] cuts `dx` into bands: `dy`'s planes for a band of phase rows `a` (each
/// phase's rows `a`, i.e. `dx` rows `s·a + py`), read by every phase, and one phase row's outputs (`s` phases of
/// `C × band_rows × ⌈W/s⌉`) before they are interleaved into `dx`.
struct StridedBands {
    planes: Planes,
    /// Phase rows of the phases that have the most (`py = 0`).
    rows: usize,
    /// Elements of one phase's output buffer.
    phase_len: usize,
}

impl StridedBands {
    fn of(s: &Conv2dShape) -> StridedBands {
        let (_, reach) = phases(s);
        let rows = s.h.div_ceil(s.stride);
        let planes = Planes::over(&dy_shape(s, reach), rows, BAND_BYTES);
        StridedBands { rows, phase_len: s.c * planes.band_rows * s.w.div_ceil(s.stride), planes }
    }
    /// Scratch of one worker: its planes, then a phase row's outputs.
    fn worker_len(&self, s: &Conv2dShape) -> usize {
        self.planes.len(s.o) + s.stride * self.phase_len
    }
}

/// Scratch of [`strided_backward_input_image`] on `threads` threads: each worker's planes and phase outputs.
pub fn strided_backward_input_scratch_len(s: &Conv2dShape, threads: usize) -> usize {
    let bands = StridedBands::of(s);
    band_workers(bands.rows, bands.planes.band_rows, threads) * bands.worker_len(s)
}

/// Packs every phase's weight (`w` is `O × C × k × k`), one after another, for [`strided_backward_input_image`].
pub fn pack_strided_backward_input(s: &Conv2dShape, w: &[f32], packed: &mut [f32]) -> Result<()> {
    check(s, "weight", w.len(), s.o * s.c * s.kh * s.kw)?;
    check(s, "packed weight", packed.len(), strided_backward_input_packed_len(s))?;
    let mut rest = packed;
    for ph in phases(s).0 {
        let (this, next) = rest.split_at_mut(packed_len(s.c, ph.taps.len()));
        pack(
            s.c,
            ph.taps.len(),
            |c, t| {
                let (o, i, j, _, _) = ph.taps[t];
                w[((o * s.c + c) * s.kh + i) * s.kw + j]
            },
            this,
        );
        rest = next;
    }
    Ok(())
}

/// Called with the output image and a range of its rows, every channel, as soon as those rows are final: once per
/// band when one thread computes the image (so the rows are still in its cache), once for all rows otherwise.
pub type RowsDone<'a> = &'a mut dyn FnMut(&mut [f32], Range<usize>);

/// One image of the strided backward-input: `dx_n` (`C × H × W`, overwritten) from `dy_n` (`O × Ho × Wo`) and the
/// weight as [`pack_strided_backward_input`] packed it. Band by band of phase rows: `dy`'s rows for the band go
/// into planes once, every phase runs the forward kernel on them into a buffer, and each row of phases
/// `(py, 0..s)` is interleaved into `dx` row `s·a + py`; `done` then gets the band's `dx` rows.
pub fn strided_backward_input_image(
    s: &Conv2dShape,
    (dy_n, packed): (&[f32], &[f32]),
    dx_n: &mut [f32],
    scratch: &mut [f32],
    threads: usize,
    done: RowsDone<'_>,
) -> Result<()> {
    if !strided_backward_input_supported(s) {
        return Err(Error::shape("conv2d", format!("direct convolution {s:?}: not a same-padded strided window")));
    }
    require_available()?;
    check(s, "dy", dy_n.len(), s.o * s.out_h() * s.out_w())?;
    check(s, "dx", dx_n.len(), s.c * s.h * s.w)?;
    check(s, "packed weight", packed.len(), strided_backward_input_packed_len(s))?;
    let need = strided_backward_input_scratch_len(s, threads);
    check(s, "scratch", scratch.len().min(need), need)?;
    let (phases, reach) = phases(s);
    let dys = dy_shape(s, reach);
    let bands = StridedBands::of(s);
    let p = &bands.planes;
    let at = |d: isize| (reach as isize + d) as usize;
    let mut weights = Vec::with_capacity(phases.len());
    let mut rest = packed;
    for ph in &phases {
        let (this, next) = rest.split_at(packed_len(s.c, ph.taps.len()));
        let offsets =
            ph.taps.iter().map(|&(o, _, _, dr, dc)| o * p.plane_len() + at(dr) * p.row_len + at(dc)).collect();
        weights.push((Taps { offsets, row_step: p.row_len }, this));
        rest = next;
    }
    let band_count = bands.rows.div_ceil(p.band_rows);
    let workers = band_workers(bands.rows, p.band_rows, threads);
    // Band `b` of phase rows into `dx` (through `dx`, which no other worker writes in these rows).
    let band = |b: usize, scratch: &mut [f32], dx: SharedOut| -> Range<usize> {
        let (planes, outs) = scratch[..bands.worker_len(s)].split_at_mut(p.len(dys.c));
        let first = b * p.band_rows;
        prepare_band(&dys, p, dy_n, first, planes);
        for py in 0..s.stride {
            let row_phases = &phases[py * s.stride..(py + 1) * s.stride];
            // The phases of one row have the same rows; the band's share of them.
            let len = (first + p.band_rows).min(row_phases[0].rows).saturating_sub(first);
            if len == 0 {
                continue;
            }
            let mut buffers: SmallVec<[&[f32]; 4]> = SmallVec::new();
            for (px, (ph, out)) in row_phases.iter().zip(outs.chunks_exact_mut(bands.phase_len)).enumerate() {
                let (taps, weight) = &weights[py * s.stride + px];
                let rows =
                    OutRows { ptr: SharedOut(out.as_mut_ptr()), channels: s.c, rows: p.band_rows, width: ph.cols };
                if ph.cols > 0 {
                    // SAFETY: AVX-512 F is present (`check`); the phase's runs reach column cols - 1 + 2·reach + a
                    // strip, within the planes' rows since cols ≤ Wo for same padding; `out` is this worker's own
                    // buffer of C × band_rows × cols floats, and `weight` holds the phase's taps for C channels.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        avx512::forward_rows(planes, (taps, weight, None), &rows, 0..len)
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = (taps, weight, &rows);
                }
                buffers.push(&out[..s.c * p.band_rows * ph.cols]);
            }
            for c in 0..s.c {
                for r in 0..len {
                    let row = s.stride * (first + r) + py;
                    // SAFETY: row < H (r < the phase's rows) and c < C, so the row lies inside dx; this band's rows
                    // belong to this worker alone.
                    let dst = unsafe { std::slice::from_raw_parts_mut(dx.ptr().add((c * s.h + row) * s.w), s.w) };
                    let src = |px: usize| {
                        let cols = row_phases[px].cols;
                        &buffers[px][(c * p.band_rows + r) * cols..][..cols]
                    };
                    interleave(dst, s.stride, src);
                }
            }
        }
        (s.stride * first).min(s.h)..(s.stride * (first + p.band_rows)).min(s.h)
    };
    run_bands((dx_n, s.h), (band_count, workers), (scratch, bands.worker_len(s)), band, done);
    Ok(())
}

/// Runs bands `0..bands` of an output image (`out`, `rows` rows per channel): `band(b, its worker's scratch, out)`
/// computes band `b` and returns the rows it made final. One worker runs them in order and hands each band's rows to
/// `done` at once; several split them and `done` gets every row at the end.
pub(super) fn run_bands(
    (out, rows): (&mut [f32], usize),
    (bands, workers): (usize, usize),
    (scratch, worker_len): (&mut [f32], usize),
    band: impl Fn(usize, &mut [f32], SharedOut) -> Range<usize> + Sync,
    done: RowsDone<'_>,
) {
    if workers == 1 {
        let scratch = &mut scratch[..worker_len];
        for b in 0..bands {
            // The pointer is taken afresh for every band: `done` borrows `out` in between.
            let final_rows = band(b, scratch, SharedOut(out.as_mut_ptr()));
            done(out, final_rows);
        }
        return;
    }
    use rayon::prelude::*;
    let per_worker = bands.div_ceil(workers);
    let shared = SharedOut(out.as_mut_ptr());
    scratch[..workers * worker_len].par_chunks_mut(worker_len).enumerate().for_each(|(w, scratch)| {
        for b in w * per_worker..((w + 1) * per_worker).min(bands) {
            band(b, scratch, shared);
        }
    });
    done(out, 0..rows);
}

/// Writes one row of `dx` from its `stride` phases: `dst[stride·b + px] = src(px)[b]`.
fn interleave<'a>(dst: &mut [f32], stride: usize, src: impl Fn(usize) -> &'a [f32]) {
    if stride == 2 {
        return interleave2_f32(dst, src(0), src(1));
    }
    for px in 0..stride.min(dst.len()) {
        for (d, &v) in dst[px..].iter_mut().step_by(stride).zip(src(px)) {
            *d = v;
        }
    }
}

/// A pointer that may cross to the worker threads: each task writes only its own disjoint part (see the uses).
#[derive(Clone, Copy)]
pub(super) struct SharedOut(*mut f32);
// SAFETY: the pointer is only dereferenced by tasks that write disjoint elements of a slice the caller borrows
// exclusively for the whole parallel section (see `forward_bands` and `strided_backward_input_image`).
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so closures capture the whole `Send` wrapper rather than its raw field).
    pub(super) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// One image of the forward convolution: `y_n` (`O × Ho × Wo`) = bias + conv(`x_n`, the weight as
/// `pack_weight` left it in `packed`). Bands of output rows go to `threads` threads, each with its own planes in
/// `planes` (`planes_scratch_len`); `done` gets the rows as they are final.
pub fn forward_image(
    s: &Conv2dShape,
    (x_n, packed, bias): (&[f32], &[f32], Option<&[f32]>),
    y_n: &mut [f32],
    planes: &mut [f32],
    threads: usize,
    done: RowsDone<'_>,
) -> Result<()> {
    let lengths = (packed_weight_len(s), planes_scratch_len(s, threads));
    require_available()?;
    check_forward_image(s, (x_n, packed, bias), (y_n, planes), lengths)?;
    let p = Planes::of(s);
    let taps =
        Taps { offsets: (0..taps(s)).map(|t| p.tap(tap_index(s, t), 0)).collect(), row_step: p.phases * p.row_len };
    forward_bands((s, &p, x_n), (&taps, packed, bias), y_n, planes, threads, done);
    Ok(())
}

/// Where a forward kernel reads its taps: each tap's run at a band's first output row, as an offset into the
/// band's planes, and the step from one output row to the next.
struct Taps {
    offsets: Vec<usize>,
    row_step: usize,
}

/// Where a forward kernel writes: `channels` planes of `rows × width` floats at `ptr`.
struct OutRows {
    ptr: SharedOut,
    channels: usize,
    rows: usize,
    width: usize,
}

/// Output rows of a forward kernel into `out` (`O × Ho × Wo` of `s`), in bands of `p.band_rows` spread over up to
/// `threads` workers, each preparing its bands of `input` in its own planes; `done` gets each band's rows when one
/// worker runs them all, else every row at the end.
///
/// The callers check what the kernel relies on: `input` holds `s`'s image, `out` its output, `planes` `threads`
/// bands of planes, the taps' runs lie inside a band's planes for every row of the band, and `packed` holds `taps`
/// taps for `O` channels.
fn forward_bands(
    (s, p, input): (&Conv2dShape, &Planes, &[f32]),
    (taps, packed, bias): (&Taps, &[f32], Option<&[f32]>),
    out: &mut [f32],
    planes: &mut [f32],
    threads: usize,
    done: RowsDone<'_>,
) {
    let out_rows = s.out_h();
    let bands = out_rows.div_ceil(p.band_rows);
    let workers = band_workers(out_rows, p.band_rows, threads);
    let band = |b: usize, planes: &mut [f32], out: SharedOut| -> Range<usize> {
        let first = b * p.band_rows;
        prepare_band(s, p, input, first, planes);
        let rows = first..(first + p.band_rows).min(out_rows);
        let out = OutRows { ptr: out, channels: s.o, rows: out_rows, width: s.out_w() };
        // SAFETY: AVX-512 F is present (the callers' `check`); the callers checked the lengths; bands are
        // disjoint and each goes to one worker, so workers write disjoint rows of `out`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::forward_rows(planes, (taps, packed, bias), &out, rows.clone())
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (taps, packed, bias, &out);
        rows
    };
    run_bands((out, out_rows), (bands, workers), (planes, p.len(s.c)), band, done);
}

/// Blocks of the weight gradient: groups of output channels × input channels × chunks of one channel's taps.
fn dw_blocks(s: &Conv2dShape) -> usize {
    s.o.div_ceil(DW_CHANNELS) * s.c * (s.kh * s.kw).div_ceil(DW_TAPS)
}

/// The weight gradient's bands, over one group's rows.
fn dw_planes(s: &Conv2dShape) -> Planes {
    Planes::over(s, s.out_h().div_ceil(dw_groups(s)), DW_BAND_BYTES)
}

/// The row groups of the weight gradient: a function of the shape only (see the module comment).
fn dw_groups(s: &Conv2dShape) -> usize {
    DW_GROUPS.clamp(1, s.out_h().max(1))
}

/// Scratch elements of [`backward_weight`]: per group of rows, a partial gradient and one band of planes.
pub fn backward_weight_scratch_len(s: &Conv2dShape) -> usize {
    dw_groups(s) * (s.o * taps(s) + dw_planes(s).len(s.c))
}

/// The weight gradient `dw` (`O × C·kh·kw`, overwritten) of the convolution `s` over the batch `x`, `dy`.
pub fn backward_weight(
    s: &Conv2dShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    scratch: &mut [f32],
    threads: usize,
) -> Result<()> {
    let (x_img, y_img, w_len) = (s.c * s.h * s.w, s.o * s.out_h() * s.out_w(), s.o * taps(s));
    let need = backward_weight_scratch_len(s);
    require_available()?;
    check_backward_weight(s, (x, dy, dw), scratch, need)?;
    dw.fill(0.0);
    if w_len == 0 || y_img == 0 || s.n == 0 {
        return Ok(());
    }
    let p = dw_planes(s);
    let groups = dw_groups(s);
    let rows_per_group = s.out_h().div_ceil(groups);
    let (partials, planes) = scratch[..need].split_at_mut(groups * w_len);
    let group = |(g, (partial, planes)): (usize, (&mut [f32], &mut [f32]))| {
        partial.fill(0.0);
        let rows = (g * rows_per_group).min(s.out_h())..((g + 1) * rows_per_group).min(s.out_h());
        for n in 0..s.n {
            let (x_n, dy_n) = (&x[n * x_img..(n + 1) * x_img], &dy[n * y_img..(n + 1) * y_img]);
            for first in rows.clone().step_by(p.band_rows) {
                prepare_band(s, &p, x_n, first, planes);
                let band = first..(first + p.band_rows).min(rows.end);
                for block in 0..dw_blocks(s) {
                    // SAFETY: AVX-512 F is present (`check`); the lengths were checked above; the planes hold the
                    // band's rows; `partial` is this group's own.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        avx512::weight_block(s, &p, planes, dy_n, partial, block, band.clone())
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = (block, &band, dy_n, &partial);
                }
            }
        }
    };
    let work = partials.chunks_exact_mut(w_len).zip(planes.chunks_exact_mut(p.len(s.c))).enumerate();
    if threads > 1 && groups > 1 {
        use rayon::prelude::*;
        work.collect::<Vec<_>>().into_par_iter().for_each(group);
    } else {
        work.for_each(group);
    }
    // Group order, whatever ran in parallel.
    for partial in partials.chunks_exact(w_len) {
        for (d, &v) in dw.iter_mut().zip(partial) {
            *d += v;
        }
    }
    Ok(())
}

/// Checks the lengths a forward kernel's image relies on: the input and output images, the packed weight
/// (`packed_len`), at least `scratch_need` elements of scratch and the bias (and that this CPU has AVX-512).
pub(super) fn check_forward_image(
    s: &Conv2dShape,
    (x_n, packed, bias): (&[f32], &[f32], Option<&[f32]>),
    (y_n, scratch): (&[f32], &[f32]),
    (packed_len, scratch_need): (usize, usize),
) -> Result<()> {
    check(s, "input", x_n.len(), s.c * s.h * s.w)?;
    check(s, "output", y_n.len(), s.o * s.out_h() * s.out_w())?;
    check(s, "packed weight", packed.len(), packed_len)?;
    check(s, "scratch", scratch.len().min(scratch_need), scratch_need)?;
    check(s, "bias", bias.map_or(s.o, <[f32]>::len), s.o)
}

/// Checks the lengths a weight-gradient kernel relies on: the batch's input and output gradient, the weight
/// gradient and at least `scratch_need` elements of scratch (and that this CPU has AVX-512).
pub(super) fn check_backward_weight(
    s: &Conv2dShape,
    (x, dy, dw): (&[f32], &[f32], &[f32]),
    scratch: &[f32],
    scratch_need: usize,
) -> Result<()> {
    check(s, "x", x.len(), s.n * s.c * s.h * s.w)?;
    check(s, "dy", dy.len(), s.n * s.o * s.out_h() * s.out_w())?;
    check(s, "dw", dw.len(), s.o * taps(s))?;
    check(s, "scratch", scratch.len().min(scratch_need), scratch_need)
}

/// That this CPU has AVX-512 (callers choose the direct kernels only then; the check keeps a wrong call an error
/// rather than an illegal instruction).
fn require_available() -> Result<()> {
    if available() {
        return Ok(());
    }
    Err(Error::msg("direct convolution: this CPU has no AVX-512 (the im2col path serves it)"))
}

/// Checks one length the unsafe kernels (these and Winograd's) rely on.
pub(super) fn check(s: &Conv2dShape, what: &str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::shape(
            "conv2d",
            format!("direct convolution {s:?}: {what} has {got} elements, needs {expected}"),
        ));
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// Lanes of a vector at `x0` that lie before `end`.
    #[inline(always)]
    pub(in crate::engine::cpu) fn lane_mask(x0: usize, end: usize) -> __mmask16 {
        let n = end.saturating_sub(x0).min(LANES);
        ((1u32 << n) - 1) as __mmask16
    }

    /// Output rows `rows` of `out`, every channel, from the band's `planes` (prepared for `rows.start`).
    ///
    /// # Safety
    /// AVX-512 F must be present, and what `forward_bands` lists its callers as checking must hold; no other
    /// thread touches rows `rows` of `out`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn forward_rows(
        planes: &[f32],
        (taps, packed, bias): (&Taps, &[f32], Option<&[f32]>),
        out: &OutRows,
        rows: Range<usize>,
    ) {
        let vectors = strip_vectors(out.width);
        let row_block = FWD_BLOCK_VECTORS / vectors;
        let mut runs: Vec<*const f32> = Vec::with_capacity(taps.offsets.len());
        let mut oy = rows.start;
        while oy < rows.end {
            // Blocks of `row_block` rows while they fit in the band, then single rows.
            let block_rows = if oy + row_block <= rows.end { row_block } else { 1 };
            runs.clear();
            // SAFETY (of the reads below): the callers guarantee every tap's run, a whole strip past `width`
            // included, lies inside the band's planes for each of its rows.
            let row_at = (oy - rows.start) * taps.row_step;
            // SAFETY: as above, each run starts inside the planes.
            runs.extend(taps.offsets.iter().map(|&at| unsafe { planes.as_ptr().add(at + row_at) }));
            let block = Block { runs: &runs, row_step: taps.row_step, out, oy };
            // SAFETY: as this function's; the block's rows lie inside `rows`.
            unsafe {
                match (block_rows, vectors) {
                    (1, 1) => block.run::<1, 1>(packed, bias),
                    (1, 2) => block.run::<1, 2>(packed, bias),
                    (1, _) => block.run::<1, FWD_BLOCK_VECTORS>(packed, bias),
                    (2, _) => block.run::<2, 2>(packed, bias),
                    _ => block.run::<FWD_BLOCK_VECTORS, 1>(packed, bias),
                }
            }
            oy += block_rows;
        }
    }

    /// `R` output rows from `oy`, each in strips of `V` vectors, every output channel: the taps' runs at row `oy`
    /// and the step to the next row.
    struct Block<'a> {
        runs: &'a [*const f32],
        row_step: usize,
        out: &'a OutRows,
        oy: usize,
    }

    impl Block<'_> {
        /// # Safety
        /// As [`forward_rows`]'s, for rows `oy..oy + R`; `R·V` vectors fit the registers (at most 4).
        #[target_feature(enable = "avx512f")]
        unsafe fn run<const R: usize, const V: usize>(&self, packed: &[f32], bias: Option<&[f32]>) {
            let (out, count, width) = (self.out, self.runs.len(), self.out.width);
            for block in 0..out.channels.div_ceil(FWD_CHANNELS) {
                // SAFETY: `packed` holds `count` taps × 6 channels for every block of output channels.
                let weights = unsafe { packed.as_ptr().add(block * count * FWD_CHANNELS) };
                let init: [f32; FWD_CHANNELS] =
                    std::array::from_fn(|k| bias.and_then(|b| b.get(block * FWD_CHANNELS + k)).copied().unwrap_or(0.0));
                for x0 in (0..width).step_by(V * LANES) {
                    let mut acc: [[[__m512; V]; R]; FWD_CHANNELS] =
                        std::array::from_fn(|k| [[_mm512_set1_ps(init[k]); V]; R]);
                    for (t, &run) in self.runs.iter().enumerate() {
                        let xv: [[__m512; V]; R] = std::array::from_fn(|r| {
                            std::array::from_fn(|v| {
                                // SAFETY: the strip lies inside the run, for each of the R rows (`forward_rows`).
                                unsafe { _mm512_loadu_ps(run.add(r * self.row_step + x0 + v * LANES)) }
                            })
                        });
                        for (k, a) in acc.iter_mut().enumerate() {
                            // SAFETY: tap t < count, channel k < 6 of this block.
                            let wv = _mm512_set1_ps(unsafe { *weights.add(t * FWD_CHANNELS + k) });
                            for r in 0..R {
                                for v in 0..V {
                                    a[r][v] = _mm512_fmadd_ps(wv, xv[r][v], a[r][v]);
                                }
                            }
                        }
                    }
                    for (k, a) in acc.iter().enumerate() {
                        let o = block * FWD_CHANNELS + k;
                        if o >= out.channels {
                            break;
                        }
                        for (r, a) in a.iter().enumerate() {
                            // SAFETY: channel o < channels and row oy + r < rows of `out`.
                            let row = unsafe { out.ptr.ptr().add((o * out.rows + self.oy + r) * width) };
                            for (v, &value) in a.iter().enumerate() {
                                let at = x0 + v * LANES;
                                if at >= width {
                                    break;
                                }
                                // SAFETY: lanes at or past the width are masked off; the row is one of this task's.
                                unsafe { _mm512_mask_storeu_ps(row.add(at), lane_mask(at, width), value) };
                            }
                        }
                    }
                }
            }
        }
    }

    /// Adds block `block` of `dw` (3 output channels × up to 9 taps of one input channel, numbered as `dw_blocks`
    /// counts them, tap chunks fastest) over the band's output rows `band` into `partial` (`O × T`).
    ///
    /// # Safety
    /// AVX-512 F must be present; `planes` holds the band as `prepare_band` left it for `band.start`; `dy` is one
    /// image's `O × Ho × Wo`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weight_block(
        s: &Conv2dShape,
        p: &Planes,
        planes: &[f32],
        dy: &[f32],
        partial: &mut [f32],
        block: usize,
        band: Range<usize>,
    ) {
        let (ho, wo, taps, window) = (s.out_h(), s.out_w(), taps(s), s.kh * s.kw);
        let chunks = window.div_ceil(DW_TAPS);
        let (ob, c, chunk) = (block / (s.c * chunks), block / chunks % s.c, block % chunks);
        // The block's taps: input channel c's window from tap chunk·9, at most to the window's end.
        let first_tap = c * window + chunk * DW_TAPS;
        let block_taps = (window - chunk * DW_TAPS).min(DW_TAPS);
        // Channels and taps past the end repeat the last one; their sums are computed and dropped.
        let o_of = |k: usize| (ob * DW_CHANNELS + k).min(s.o - 1);
        let t_of = |m: usize| first_tap + m.min(block_taps - 1);
        // Each channel's dy row and each tap's run at the band's first row, advanced by a fixed step per row (no
        // index arithmetic in the row loop: rows of 64 pixels are only four vector steps long).
        // SAFETY (of the pointers and loads below): rows of dy and of the band's planes, for the band's rows; whole
        // vectors end at or before Wo, the tail's lanes at or past Wo are masked off, and a plane row holds
        // Wo + (kw - 1) / stride elements past a tap's offset.
        // SAFETY: channel o_of(k) < O, row band.start < Ho: inside dy.
        let mut d_row: [*const f32; DW_CHANNELS] =
            std::array::from_fn(|k| unsafe { dy.as_ptr().add((o_of(k) * ho + band.start) * wo) });
        // SAFETY: tap t_of(m) < T, band row 0: inside the planes.
        let mut x_row: [*const f32; DW_TAPS] =
            std::array::from_fn(|m| unsafe { planes.as_ptr().add(p.tap(tap_index(s, t_of(m)), 0)) });
        let run_step = p.phases * p.row_len;
        let whole = wo / LANES * LANES;
        let tail = lane_mask(whole, wo);
        let mut acc = [[_mm512_setzero_ps(); DW_TAPS]; DW_CHANNELS];
        for _ in band {
            let mut x0 = 0;
            while x0 < wo {
                let mask = if x0 < whole { !0 } else { tail };
                let mut d = [_mm512_setzero_ps(); DW_CHANNELS];
                for k in 0..DW_CHANNELS {
                    // SAFETY: see above: unmasked lanes lie inside this dy row.
                    d[k] = unsafe { _mm512_maskz_loadu_ps(mask, d_row[k].add(x0)) };
                }
                for m in 0..DW_TAPS {
                    // SAFETY: see above: unmasked lanes lie inside this plane row.
                    let x = unsafe { _mm512_maskz_loadu_ps(mask, x_row[m].add(x0)) };
                    for k in 0..DW_CHANNELS {
                        acc[k][m] = _mm512_fmadd_ps(d[k], x, acc[k][m]);
                    }
                }
                x0 += LANES;
            }
            for row in d_row.iter_mut() {
                *row = row.wrapping_add(wo);
            }
            for row in x_row.iter_mut() {
                *row = row.wrapping_add(run_step);
            }
        }
        for (k, a) in acc.iter().enumerate() {
            let o = ob * DW_CHANNELS + k;
            if o >= s.o {
                break;
            }
            for (m, &value) in a.iter().take(block_taps).enumerate() {
                partial[o * taps + first_tap + m] += _mm512_reduce_add_ps(value);
            }
        }
    }
}
