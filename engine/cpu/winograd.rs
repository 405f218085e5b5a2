//! Winograd F(2×2, 3×3) convolution on f32 with AVX-512 (below) or AVX2 and FMA (`winograd/avx2.rs`, the same sums
//! with 8-lane registers), for the stride-1, "same"-padded 3×3 convolutions that are most of a U-Net's and a hint
//! encoder's arithmetic (and, recast as forward convolutions, their backward-inputs).
//!
//! Each 2×2 block of outputs (a *tile*) is computed from the 4×4 input patch under it (Lavin & Gray, 2015):
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`. Over channels the elementwise product becomes 16 matrix products, one per
//! point `ξ` of the 4×4 transform domain: `M_ξ (O × tiles) = U_ξ (O × C) · V_ξ (C × tiles)`. That is 16·O·C
//! multiplications per tile of four outputs instead of 36·O·C: 2.25× fewer, paid for by the transforms of the input
//! (per channel and tile) and of the output (per output channel and tile), which cost little once a convolution has
//! a few dozen channels.
//!
//! One image at a time, in bands of tile rows, each band by one thread with its own scratch (it stays in that
//! core's L2 cache from one step to the next):
//! 1. The band's input rows go into zero-padded planes split by column parity (the direct kernels' planes for a
//!    4×4 window at stride 2, [`direct::prepare_band`]): the column `2·tx + k` of 16 consecutive tiles is then one
//!    contiguous vector load.
//! 2. The input transform `Bᵀ d B` (additions only), 16 tiles per vector, into `V[ξ][c][tile]`; a band's tiles are
//!    numbered row after row without gaps, so narrow maps (8 or 16 pixels: 4 or 8 tiles a row) still fill vectors.
//! 3. For each block of 6 output channels: the 16 products into `M[ξ][6][tile]`, by the direct forward's register
//!    block (6 channels × 4 vectors of tiles: four vector loads and six broadcasts per 24 FMAs), then the output
//!    transform `Aᵀ M A` (additions only), plus the bias, written to the output rows.
//!
//! The filter transform `G g Gᵀ` (sums and halves) runs once per call, sixteen filters at a time, blocks of output
//! channels spread over the threads.
//!
//! Every output element is computed by one thread in an order fixed by the shape alone, so the results have the same
//! bits whatever the thread count. They differ from the direct and im2col paths' in rounding: the transforms add and
//! subtract inputs before the products (F(2×2, 3×3)'s error stays within a few ulps of the sums' magnitude,
//! `tests/graph_cpu/cpu_kernels.rs` checks 1e-5 against the f64 convolution).

use super::conv::Conv2dShape;
use super::direct_conv::{self as direct, Planes, RowsDone, SharedOut, LANES};
use super::gemm::{matmul_batched, Batch, GemmDims, MatMut, MatRef};
use super::peak::detect_isa;
pub use super::peak::Isa;
use crate::error::{Error, Result};
use std::ops::Range;

/// Points of the transform domain: one per element of the 4×4 input patch.
const POINTS: usize = 16;
/// Output channels per register block of the products (6 × 4 vectors: 24 accumulators, as the direct forward).
const CHANNELS: usize = 6;
/// Vectors of tiles per register block.
const BLOCK_VECTORS: usize = 4;
/// About this many bytes of planes per band. A band's transformed input is four times its planes (16 points per
/// 4 input pixels), so planes, transformed input and one block's products stay within a 1 MiB L2 cache.
const PLANES_BYTES: usize = 96 << 10;
/// Tiles a band has at least (where the image has them): one register block of the products.
const MIN_BAND_TILES: usize = BLOCK_VECTORS * LANES;
/// The weight gradient's bands have more: each band's tiles are the reduction of 16 products through the `gemm`
/// crate, which packs its operands per call and runs them at a fraction of its speed below a few hundred.
const DW_MIN_BAND_TILES: usize = 256;

/// Whether this path computes the convolution `s`: a 3×3 window, stride 1, padding 1, on even-sized maps (the
/// tiles cover the output exactly), on a CPU with AVX-512 or AVX2 and FMA.
pub fn supported(s: &Conv2dShape) -> bool {
    isa().is_some()
        && (s.kh, s.kw, s.stride, s.padding) == (3, 3, 1, 1)
        && s.h >= 2
        && s.w >= 2
        && s.h.is_multiple_of(2)
        && s.w.is_multiple_of(2)
}

/// An error naming `s` unless this path computes it with the kernels of `isa` (the callers choose it only then; the
/// check keeps a wrong call an error rather than out-of-bounds tiles or an illegal instruction).
fn require_supported(isa: Isa, s: &Conv2dShape, what: &str) -> Result<()> {
    if supported(s) && isa != Isa::Portable && isa.present() {
        return Ok(());
    }
    Err(Error::shape(
        "conv2d",
        format!("Winograd {what} {s:?} with {isa:?}: not a 3×3, stride-1, same-padded window over even-sized maps on a CPU with those instructions"),
    ))
}

/// The kernels this CPU runs, or the error [`require_supported`] gives.
fn detected(s: &Conv2dShape, what: &str) -> Result<Isa> {
    isa().ok_or_else(|| {
        Error::shape("conv2d", format!("Winograd {what} {s:?}: this CPU has neither AVX-512 F nor AVX2 with FMA"))
    })
}

/// The shape whose planes hold a band's input patches: 4×4 windows at stride 2, one per tile.
fn patch_shape(s: &Conv2dShape) -> Conv2dShape {
    Conv2dShape { kh: 4, kw: 4, stride: 2, ..*s }
}

/// How an image is cut into bands of tile rows, and one band's scratch.
struct Bands {
    planes: Planes,
    /// Tiles per tile row, and tile rows.
    tiles_w: usize,
    tile_rows: usize,
}

impl Bands {
    fn of(s: &Conv2dShape) -> Bands {
        Bands::with_tiles(s, MIN_BAND_TILES)
    }
    /// Bands of at least `min_tiles` tiles where the image has them.
    fn with_tiles(s: &Conv2dShape, min_tiles: usize) -> Bands {
        let patches = patch_shape(s);
        let (tiles_w, tile_rows) = (s.w / 2, s.h / 2);
        let mut planes = Planes::over(&patches, tile_rows, PLANES_BYTES);
        // At least a whole register block of tiles per band where the image has them: fewer, and each product's
        // loads are spread over fewer FMAs.
        let tiles = planes.band_rows * tiles_w;
        if tiles < min_tiles {
            planes = Planes::over(&patches, tile_rows, PLANES_BYTES * min_tiles.div_ceil(tiles));
        }
        Bands { planes, tiles_w, tile_rows }
    }
    /// Tiles of a whole band, rounded up to whole vectors: the row length of `V` and `M`.
    fn tiles(&self) -> usize {
        (self.planes.band_rows * self.tiles_w).div_ceil(LANES) * LANES
    }
    fn transformed_len(&self, s: &Conv2dShape) -> usize {
        POINTS * s.c * self.tiles()
    }
    fn products_len(&self) -> usize {
        POINTS * CHANNELS * self.tiles()
    }
    /// One worker's scratch: its planes, the transformed input and one block's products.
    fn worker_len(&self, s: &Conv2dShape) -> usize {
        self.planes.len(s.c) + self.transformed_len(s) + self.products_len()
    }
}

/// Scratch elements of [`forward_image`] on `threads` threads.
pub fn scratch_len(s: &Conv2dShape, threads: usize) -> usize {
    let bands = Bands::of(s);
    direct::band_workers(bands.tile_rows, bands.planes.band_rows, threads) * bands.worker_len(s)
}

/// Elements of the transformed weight [`pack_weight`] writes.
pub fn packed_weight_len(s: &Conv2dShape) -> usize {
    POINTS * channel_blocks(s) * CHANNELS * s.c
}

fn channel_blocks(s: &Conv2dShape) -> usize {
    s.o.div_ceil(CHANNELS)
}

/// The 3×3 filters to transform: tap `t = i·3 + j` of input channel `c` for output channel `o` lies at
/// `data[o·o_stride + c·c_stride + t]`, or at `… + 8 - t` when `flipped` (a backward-input's recast weight: the
/// original weight transposed and flipped).
#[derive(Clone, Copy)]
pub struct Filters<'a> {
    data: &'a [f32],
    o_stride: usize,
    c_stride: usize,
    flipped: bool,
}

impl<'a> Filters<'a> {
    /// The weight `w` (`O × C × 3 × 3`) of the forward convolution `s`.
    pub fn forward(s: &Conv2dShape, w: &'a [f32]) -> Self {
        Filters { data: w, o_stride: s.c * 9, c_stride: 9, flipped: false }
    }

    /// The filters of the forward convolution that computes the backward-input of `original` (weight `w`): output
    /// channel `c` of the original's input, input channel `o` of its output, the window flipped.
    pub fn backward_input(original: &Conv2dShape, w: &'a [f32]) -> Self {
        Filters { data: w, o_stride: 9, c_stride: original.c * 9, flipped: true }
    }

    /// Where tap `t` of input channel 0 for output channel `o` lies.
    fn tap(&self, o: usize, t: usize) -> usize {
        o * self.o_stride + if self.flipped { 8 - t } else { t }
    }
}

/// Transforms the filters into `packed`:
/// `packed[((block·16 + ξ)·6 + k)·C + c] = U_ξ(block·6 + k, c)`, zero past the last channel. Once per call, sixteen
/// input channels at a time (each tap of the sixteen filters read by one AVX-512 gather), blocks of output channels
/// spread over `threads` threads (a scalar transform per filter on one thread cost as much as the products of a
/// 16x16 map; reading the taps one float at a time was then 12-17% of a 128->128 16x16 pass, `perf`).
pub fn pack_weight(s: &Conv2dShape, filters: Filters<'_>, packed: &mut [f32], threads: usize) -> Result<()> {
    direct::check(s, "packed weight", packed.len(), packed_weight_len(s))?;
    // Every tap the loops read, o·o_stride + c·c_stride + (8 - )t for o < O, c < C, lies in an O × C × 9 weight.
    direct::check(s, "weight", filters.data.len(), s.o * s.c * 9)?;
    let block_len = POINTS * CHANNELS * s.c;
    if block_len == 0 {
        return Ok(());
    }
    let reader = TapReader::new(filters.data, filters.c_stride);
    let pack_block = |(block, packed): (usize, &mut [f32])| {
        packed.fill(0.0);
        let mut taps = [[0.0; LANES]; 9];
        for k in 0..CHANNELS.min(s.o - block * CHANNELS) {
            let o = block * CHANNELS + k;
            for first in (0..s.c).step_by(LANES) {
                let lanes = (s.c - first).min(LANES);
                for (t, tap) in taps.iter_mut().enumerate() {
                    let at = filters.tap(o, t) + first * filters.c_stride;
                    reader.read(at, lanes, tap);
                }
                for (point, values) in filter_transform(&taps).iter().enumerate() {
                    let at = (point * CHANNELS + k) * s.c + first;
                    packed[at..at + lanes].copy_from_slice(&values[..lanes]);
                }
            }
        }
    };
    if threads > 1 {
        use rayon::prelude::*;
        packed.par_chunks_mut(block_len).enumerate().for_each(pack_block);
    } else {
        packed.chunks_mut(block_len).enumerate().for_each(pack_block);
    }
    Ok(())
}

/// Reads sixteen filters' tap at once: lane `l` at `data[at + l·stride]`. Whether to gather, and the gather's
/// offsets, are settled once per weight.
struct TapReader<'a> {
    data: &'a [f32],
    stride: usize,
    /// `l·stride` for every lane, where AVX-512 is present and they fit an i32 (else the plain loop reads). Only
    /// x86-64 gathers; elsewhere it stays `None` and unread.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    gather_offsets: Option<[i32; LANES]>,
}

impl<'a> TapReader<'a> {
    fn new(data: &'a [f32], stride: usize) -> Self {
        let fits = stride * LANES <= i32::MAX as usize;
        let gather = cfg!(target_arch = "x86_64") && direct::available() && fits;
        let gather_offsets = gather.then(|| std::array::from_fn(|l| (l * stride) as i32));
        TapReader { data, stride, gather_offsets }
    }

    /// `lane[l] = data[at + l·stride]` for `l < lanes` (1 to 16): one masked gather where AVX-512 is present.
    fn read(&self, at: usize, lanes: usize, lane: &mut [f32; LANES]) {
        let last = at + lanes.saturating_sub(1) * self.stride;
        assert!((1..=LANES).contains(&lanes) && last < self.data.len(), "filter taps past the weight");
        #[cfg(target_arch = "x86_64")]
        if let Some(offsets) = &self.gather_offsets {
            // SAFETY: `gather_offsets` is set only where AVX-512 F is present (`direct::available`), and holds
            // l·stride as i32 without overflow (checked in `new`); the gather reads data[at + l·stride] for
            // l < lanes only (the mask), all in bounds by the assertion.
            unsafe { avx512::gather_lanes(&self.data[at..], offsets, lanes, lane) };
            return;
        }
        for (l, value) in lane[..lanes].iter_mut().enumerate() {
            *value = self.data[at + l * self.stride];
        }
    }
}

/// `G g Gᵀ` of sixteen 3×3 filters side by side (`taps[i·3 + j][lane]`), point `ξ = row·4 + column` of each, with
/// `G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]`. Plain loops over the lanes, which the compiler vectorises.
fn filter_transform(taps: &[[f32; LANES]; 9]) -> [[f32; LANES]; POINTS] {
    // One 3-point column or row expanded to four: `[a, (a + b + c)/2, (a - b + c)/2, c]`.
    fn expand(a: &[f32; LANES], b: &[f32; LANES], c: &[f32; LANES]) -> [[f32; LANES]; 4] {
        let mut out = [[0.0; LANES]; 4];
        for lane in 0..LANES {
            let (a, b, c) = (a[lane], b[lane], c[lane]);
            let sum = a + c;
            out[0][lane] = a;
            out[1][lane] = 0.5 * (sum + b);
            out[2][lane] = 0.5 * (sum - b);
            out[3][lane] = c;
        }
        out
    }
    // G g: each column j of the filters expanded to four rows.
    let columns: [[[f32; LANES]; 4]; 3] = std::array::from_fn(|j| expand(&taps[j], &taps[3 + j], &taps[6 + j]));
    let mut u = [[0.0; LANES]; POINTS];
    for row in 0..4 {
        let expanded = expand(&columns[0][row], &columns[1][row], &columns[2][row]);
        u[row * 4..row * 4 + 4].copy_from_slice(&expanded);
    }
    u
}

/// One image of the forward convolution: `y_n` (`O × H × W`) = bias + conv(`x_n`, the weight as [`pack_weight`]
/// transformed it). Bands of tile rows go to up to `threads` threads, each with its own part of `scratch`
/// ([`scratch_len`]); `done` gets the output rows as they are final.
pub fn forward_image(
    s: &Conv2dShape,
    inputs: (&[f32], &[f32], Option<&[f32]>),
    y_n: &mut [f32],
    scratch: &mut [f32],
    threads: usize,
    done: RowsDone<'_>,
) -> Result<()> {
    forward_image_on(detected(s, "convolution")?, s, inputs, y_n, scratch, threads, done)
}

/// [`forward_image`] with the kernels of `isa` (the tests run the AVX2 kernels where AVX-512 is present too).
fn forward_image_on(
    isa: Isa,
    s: &Conv2dShape,
    (x_n, packed, bias): (&[f32], &[f32], Option<&[f32]>),
    y_n: &mut [f32],
    scratch: &mut [f32],
    threads: usize,
    done: RowsDone<'_>,
) -> Result<()> {
    require_supported(isa, s, "convolution")?;
    let lengths = (packed_weight_len(s), scratch_len(s, threads));
    direct::check_forward_image(s, (x_n, packed, bias), (y_n, scratch), lengths)?;
    let bands = Bands::of(s);
    let p = &bands.planes;
    let patches = patch_shape(s);
    let count = bands.tile_rows.div_ceil(p.band_rows);
    let workers = direct::band_workers(bands.tile_rows, p.band_rows, threads);
    let band = |b: usize, scratch: &mut [f32], y: SharedOut| -> Range<usize> {
        let first = b * p.band_rows;
        let tile_rows = first..(first + p.band_rows).min(bands.tile_rows);
        let (planes, rest) = scratch[..bands.worker_len(s)].split_at_mut(p.len(s.c));
        let (transformed, products) = rest.split_at_mut(bands.transformed_len(s));
        direct::prepare_band(&patches, p, x_n, first, planes);
        let work = Band { s, bands: &bands, tile_rows: tile_rows.clone() };
        // SAFETY: the ISA's instructions are present (`supported`); the lengths were checked above; the band's tile
        // rows lie inside the image, and bands are disjoint, each run by one worker, so workers write disjoint rows of
        // `y`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match isa {
                Isa::Avx512 => {
                    work.input_transform(planes, transformed);
                    for block in 0..channel_blocks(s) {
                        work.products(block, transformed, packed, products);
                        work.output_transform(block, products, bias, y);
                    }
                }
                Isa::Avx2Fma => {
                    work.input_transform_avx2(planes, transformed);
                    for block in 0..channel_blocks(s) {
                        work.products_avx2(block, transformed, packed, products);
                        work.output_transform_avx2(block, products, bias, y);
                    }
                }
                Isa::Portable => unreachable!("require_supported refuses it"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (isa, work, planes, transformed, products, y);
        2 * tile_rows.start..2 * tile_rows.end
    };
    direct::run_bands((y_n, s.h), (count, workers), (scratch, bands.worker_len(s)), band, done);
    Ok(())
}

/// Groups of tile rows with partial weight gradients of their own (fewer when there are fewer tile rows): the most
/// threads the weight gradient uses. A function of the shape only, so the bits do not depend on the thread count.
const DW_GROUPS: usize = 4;

fn dw_groups(s: &Conv2dShape) -> usize {
    DW_GROUPS.clamp(1, (s.h / 2).max(1))
}

/// The weight gradient's bands: at least `DW_MIN_BAND_TILES` tiles, at most one group's tile rows.
fn dw_bands(s: &Conv2dShape) -> Bands {
    let mut bands = Bands::with_tiles(s, DW_MIN_BAND_TILES);
    let group_rows = bands.tile_rows.div_ceil(dw_groups(s));
    if bands.planes.band_rows > group_rows {
        bands.planes = Planes::over(&patch_shape(s), group_rows, usize::MAX);
    }
    bands
}

/// One weight-gradient group's scratch: its partial `dUᵀ` (16 points × C × O), planes, the transformed input and the
/// transformed output gradient of one band.
fn dw_group_len(s: &Conv2dShape, bands: &Bands) -> usize {
    POINTS * s.c * s.o + bands.worker_len(s) - bands.products_len() + POINTS * s.o * bands.tiles()
}

/// Scratch elements of [`backward_weight`].
pub fn backward_weight_scratch_len(s: &Conv2dShape) -> usize {
    dw_groups(s) * dw_group_len(s, &dw_bands(s))
}

/// The weight gradient `dw` (`O × C × 3 × 3`, overwritten) of the convolution `s` over the batch `x`, `dy`:
/// `dU_ξ = Σ_tiles dM_ξ ⊙ V_ξ` with `V = Bᵀ d B` (the forward's input transform) and `dM = A dY Aᵀ` (each 2×2
/// block of `dy` spread over the 4×4 points), then `dw = Gᵀ dU G`. Per band, the 16 sums over its tiles are one
/// batch of products `dU_ξᵀ += V_ξ · dM_ξᵀ` (`C × O`, over the band's tiles). Tile rows are split into a fixed
/// number of groups, each summing its bands of every image into a partial of its own, added in group order.
pub fn backward_weight(
    s: &Conv2dShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    scratch: &mut [f32],
    threads: usize,
) -> Result<()> {
    backward_weight_on(detected(s, "weight gradient")?, s, x, dy, dw, scratch, threads)
}

/// [`backward_weight`] with the kernels of `isa`.
fn backward_weight_on(
    isa: Isa,
    s: &Conv2dShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    scratch: &mut [f32],
    threads: usize,
) -> Result<()> {
    require_supported(isa, s, "weight gradient")?;
    let (image, points_len) = (s.c * s.h * s.w, POINTS * s.c * s.o);
    let need = backward_weight_scratch_len(s);
    direct::check_backward_weight(s, (x, dy, dw), scratch, need)?;
    let bands = dw_bands(s);
    let group_len = dw_group_len(s, &bands);
    let (p, row_len) = (&bands.planes, bands.tiles());
    let patches = patch_shape(s);
    let groups = dw_groups(s);
    let rows_per_group = bands.tile_rows.div_ceil(groups);
    let group = |(g, scratch): (usize, &mut [f32])| -> Result<()> {
        let (partial, rest) = scratch.split_at_mut(points_len);
        let (planes, rest) = rest.split_at_mut(p.len(s.c));
        let (transformed, gradients) = rest.split_at_mut(bands.transformed_len(s));
        partial.fill(0.0);
        let rows = (g * rows_per_group).min(bands.tile_rows)..((g + 1) * rows_per_group).min(bands.tile_rows);
        for n in 0..s.n {
            let (x_n, dy_n) = (&x[n * image..(n + 1) * image], &dy[n * s.o * s.h * s.w..(n + 1) * s.o * s.h * s.w]);
            for first in rows.clone().step_by(p.band_rows) {
                let work = Band { s, bands: &bands, tile_rows: first..(first + p.band_rows).min(rows.end) };
                direct::prepare_band(&patches, p, x_n, first, planes);
                // SAFETY: the ISA's instructions are present (`supported`); the lengths were checked above and the
                // scratch split by the sizes `dw_group_len` sums.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match isa {
                        Isa::Avx512 => {
                            work.input_transform(planes, transformed);
                            work.gradient_transform(dy_n, gradients);
                        }
                        Isa::Avx2Fma => {
                            work.input_transform_avx2(planes, transformed);
                            work.gradient_transform_avx2(dy_n, gradients);
                        }
                        Isa::Portable => unreachable!("require_supported refuses it"),
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (isa, &work);
                // dUᵀ_ξ (C × O) += V_ξ (C × tiles) · dM_ξᵀ (tiles × O), the 16 points as one batch.
                let batch =
                    Batch { count: POINTS, a_stride: s.c * row_len, b_stride: s.o * row_len, c_stride: s.c * s.o };
                let dims = GemmDims::new(s.c, s.o, work.tiles());
                let (v, dm) = (MatRef::new(&*transformed, row_len), MatRef::transposed(&*gradients, row_len));
                matmul_batched(batch, dims, v, dm, MatMut::new(&mut *partial, s.o), true, 1)?;
            }
        }
        Ok(())
    };
    let partials = &mut scratch[..need];
    let mut work = partials.chunks_exact_mut(group_len).enumerate();
    if threads > 1 && groups > 1 {
        use rayon::prelude::*;
        work.collect::<Vec<_>>().into_par_iter().try_for_each(group)?;
    } else {
        work.try_for_each(group)?;
    }
    // Group order, whatever ran in parallel; then dw = Gᵀ dU G per filter.
    let (first_group, rest) = partials.split_at_mut(group_len);
    let sum = &mut first_group[..points_len];
    for partial in rest.chunks_exact(group_len) {
        for (d, &v) in sum.iter_mut().zip(&partial[..points_len]) {
            *d += v;
        }
    }
    for o in 0..s.o {
        for c in 0..s.c {
            let du: [f32; POINTS] = std::array::from_fn(|point| sum[(point * s.c + c) * s.o + o]);
            dw[(o * s.c + c) * 9..][..9].copy_from_slice(&filter_gradient(&du));
        }
    }
    Ok(())
}

/// `Gᵀ dU G` of one filter's 4×4 gradient `du` (row-major): the 3×3 gradient of its taps, with
/// `Gᵀ = [1 ½ ½ 0; 0 ½ -½ 0; 0 ½ ½ 1]`.
fn filter_gradient(du: &[f32; POINTS]) -> [f32; 9] {
    let reduce = |[a, b, c, d]: [f32; 4]| [a + 0.5 * (b + c), 0.5 * (b - c), 0.5 * (b + c) + d];
    // Gᵀ dU: each column of four reduced to three rows; then each row of four reduced to three.
    let columns: [[f32; 3]; 4] = std::array::from_fn(|j| reduce([du[j], du[4 + j], du[8 + j], du[12 + j]]));
    let mut g = [0.0; 9];
    for i in 0..3 {
        g[i * 3..i * 3 + 3].copy_from_slice(&reduce([columns[0][i], columns[1][i], columns[2][i], columns[3][i]]));
    }
    g
}

/// One band's work: the tile rows `tile_rows` of an image of `s`.
struct Band<'a> {
    s: &'a Conv2dShape,
    bands: &'a Bands,
    tile_rows: Range<usize>,
}

impl Band<'_> {
    /// Tiles in this band (the last band may have fewer rows), and the vectors that hold them.
    fn tiles(&self) -> usize {
        self.tile_rows.len() * self.bands.tiles_w
    }
}

/// One point's product for one block of output channels: `m[k][t] = Σ_c u[k][c] · v[c][t]`, rows `row_len` long.
struct Product {
    u: *const f32,
    v: *const f32,
    m: *mut f32,
    channels: usize,
    row_len: usize,
}

impl Product {
    /// Point `point` of block `block` of `band`: its rows of the transformed weight (`packed`), the band's transformed
    /// input and the block's products.
    fn of(
        band: &Band<'_>,
        block: usize,
        point: usize,
        (transformed, packed, products): (&[f32], &[f32], &mut [f32]),
    ) -> Self {
        let (c, row_len) = (band.s.c, band.bands.tiles());
        let (u, v) = (&packed[(block * POINTS + point) * CHANNELS * c..], &transformed[point * c * row_len..]);
        let m = &mut products[point * CHANNELS * row_len..];
        // What the kernels read and write from these pointers: 6 rows of C in U, C rows of `row_len` in V, 6 rows of
        // `row_len` in M.
        assert!(u.len() >= CHANNELS * c && v.len() >= c * row_len && m.len() >= CHANNELS * row_len, "Winograd product");
        Product { u: u.as_ptr(), v: v.as_ptr(), m: m.as_mut_ptr(), channels: c, row_len }
    }
}

/// The kernels this CPU runs: AVX-512 F where present, else AVX2 with FMA, else none.
pub fn isa() -> Option<Isa> {
    Some(detect_isa()).filter(|&isa| isa != Isa::Portable)
}

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use crate::engine::cpu::direct_conv::avx512::lane_mask;
    use std::arch::x86_64::*;

    /// `lane[l] = data[offsets[l]]` for `l < lanes`, by one masked gather.
    ///
    /// # Safety
    /// AVX-512 F must be present; `lanes` must be 1 to 16, and `offsets[l]` non-negative and inside `data` for
    /// every `l < lanes`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gather_lanes(data: &[f32], offsets: &[i32; LANES], lanes: usize, lane: &mut [f32; LANES]) {
        let mask = lane_mask(0, lanes);
        // SAFETY: as this function's: the masked lanes read inside `data`, the others read nothing; `offsets` and
        // `lane` hold sixteen values each.
        unsafe {
            let offsets = _mm512_loadu_si512(offsets.as_ptr().cast());
            let values = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, offsets, data.as_ptr());
            _mm512_storeu_ps(lane.as_mut_ptr(), values);
        }
    }

    /// `Bᵀ d B`'s one-dimensional step `Bᵀ [d0 d1 d2 d3]` (down the columns, then along the rows).
    ///
    /// # Safety
    /// AVX-512 F must be present. (A function with the feature, rather than a closure or an `inline(always)` helper:
    /// those are not compiled with it, and every intrinsic became a call.)
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn input_step(d: [__m512; 4]) -> [__m512; 4] {
        [_mm512_sub_ps(d[0], d[2]), _mm512_add_ps(d[1], d[2]), _mm512_sub_ps(d[2], d[1]), _mm512_sub_ps(d[1], d[3])]
    }

    /// `Aᵀ M A`'s one-dimensional step `Aᵀ [m0 m1 m2 m3]`, `Aᵀ = [1 1 1 0; 0 1 -1 -1]`.
    ///
    /// # Safety
    /// AVX-512 F must be present.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn output_step(m: [__m512; 4]) -> [__m512; 2] {
        [_mm512_add_ps(_mm512_add_ps(m[0], m[1]), m[2]), _mm512_sub_ps(_mm512_sub_ps(m[1], m[2]), m[3])]
    }

    impl Band<'_> {
        /// `V[ξ][c][tile] = (Bᵀ d B)_ξ` for every channel and tile of the band, from its planes.
        ///
        /// # Safety
        /// AVX-512 F must be present; `planes` holds the band as `prepare_band` left it; `transformed` has
        /// `Bands::transformed_len` elements.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn input_transform(&self, planes: &[f32], transformed: &mut [f32]) {
            let (s, p, tiles_w, row_len) = (self.s, &self.bands.planes, self.bands.tiles_w, self.bands.tiles());
            let out = transformed.as_mut_ptr();
            // From one patch row to the next in a plane, and from one point's rows of V to the next. Pointers per
            // channel and offsets per tile, rather than `Planes::tap` per load: the index arithmetic and its spills
            // cost as much as the transform.
            let plane_row = p.tap((0, 1, 0), 0) - p.tap((0, 0, 0), 0);
            let point_step = s.c * row_len;
            for c in 0..s.c {
                // SAFETY: the planes of channel c (even and odd padded columns) start inside the band's planes.
                let (even, odd) =
                    unsafe { (planes.as_ptr().add(p.tap((c, 0, 0), 0)), planes.as_ptr().add(p.tap((c, 0, 1), 0))) };
                for r in 0..self.tile_rows.len() {
                    for tx in (0..tiles_w).step_by(LANES) {
                        // Columns 2·tx + k of patch row a for 16 tiles: runs of the planes (a plane row holds a whole
                        // strip of vectors past the last tile, plus the one column the window reaches beyond it);
                        // patch row a of tile row r is plane row 2·r + a < 2·band_rows + 2, the planes' rows.
                        // Plain loops, no closures: see `input_step`.
                        let mut d = [[_mm512_setzero_ps(); 4]; 4];
                        for (a, row) in d.iter_mut().enumerate() {
                            let at = (2 * r + a) * plane_row + tx;
                            // SAFETY: see above.
                            *row = unsafe {
                                [
                                    _mm512_loadu_ps(even.add(at)),
                                    _mm512_loadu_ps(odd.add(at)),
                                    _mm512_loadu_ps(even.add(at + 1)),
                                    _mm512_loadu_ps(odd.add(at + 1)),
                                ]
                            };
                        }
                        // Bᵀ d down the columns, then (Bᵀ d) B along the rows.
                        let mut columns = [[_mm512_setzero_ps(); 4]; 4];
                        for k in 0..4 {
                            // SAFETY: AVX-512 F is present (this function's contract).
                            let column = unsafe { input_step([d[0][k], d[1][k], d[2][k], d[3][k]]) };
                            for a in 0..4 {
                                columns[a][k] = column[a];
                            }
                        }
                        let mask = lane_mask(tx, tiles_w);
                        // SAFETY: tiles r·tiles_w + tx.. of channel c's row of point 0.
                        let first = unsafe { out.add(c * row_len + r * tiles_w + tx) };
                        for (a, row) in columns.iter().enumerate() {
                            // SAFETY: as above.
                            let transformed_row = unsafe { input_step(*row) };
                            for (k, &value) in transformed_row.iter().enumerate() {
                                // SAFETY: the unmasked lanes are tiles r·tiles_w + tx.. of this band, below its
                                // tile count, within point (a, k)'s row of channel c.
                                unsafe { _mm512_mask_storeu_ps(first.add((a * 4 + k) * point_step), mask, value) };
                            }
                        }
                    }
                }
            }
        }

        /// `dM[ξ][o][tile] = (A dY Aᵀ)_ξ` for every output channel and tile of the band, from one image's `dy`
        /// (`O × H × W`), `A = [1 0; 1 1; 1 -1; 0 -1]`.
        ///
        /// # Safety
        /// AVX-512 F must be present; `dy` holds the image; `gradients` has 16 points × O × `Bands::tiles` elements.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn gradient_transform(&self, dy: &[f32], gradients: &mut [f32]) {
            let (s, tiles_w, row_len) = (self.s, self.bands.tiles_w, self.bands.tiles());
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            let out = gradients.as_mut_ptr();
            for o in 0..s.o {
                for (r, tile_row) in self.tile_rows.clone().enumerate() {
                    for tx in (0..tiles_w).step_by(LANES) {
                        let pixels = 2 * (tiles_w - tx).min(LANES);
                        // The tiles' 2×2 blocks of dy: rows 2·tile_row and 2·tile_row + 1, even and odd columns.
                        let mut block = [[_mm512_setzero_ps(); 2]; 2];
                        for (i, halves) in block.iter_mut().enumerate() {
                            // SAFETY: channel o < O, row 2·tile_row + i < H: a row of the image; the unmasked
                            // lanes are its pixels 2·tx.. below W.
                            let (low, high) = unsafe {
                                let row = dy.as_ptr().add((o * s.h + 2 * tile_row + i) * s.w + 2 * tx);
                                (
                                    _mm512_maskz_loadu_ps(lane_mask(0, pixels), row),
                                    _mm512_maskz_loadu_ps(lane_mask(LANES, pixels), row.add(LANES)),
                                )
                            };
                            *halves = [_mm512_permutex2var_ps(low, even, high), _mm512_permutex2var_ps(low, odd, high)];
                        }
                        // A dY: four rows of two; then each row [u, v] to [u, u + v, u - v, -v].
                        let [[p, q], [r0, r1]] = block;
                        let zero = _mm512_setzero_ps();
                        let rows = [
                            [p, q],
                            [_mm512_add_ps(p, r0), _mm512_add_ps(q, r1)],
                            [_mm512_sub_ps(p, r0), _mm512_sub_ps(q, r1)],
                            [_mm512_sub_ps(zero, r0), _mm512_sub_ps(zero, r1)],
                        ];
                        let mask = lane_mask(tx, tiles_w);
                        for (a, [u, v]) in rows.into_iter().enumerate() {
                            let points = [u, _mm512_add_ps(u, v), _mm512_sub_ps(u, v), _mm512_sub_ps(zero, v)];
                            for (b, value) in points.into_iter().enumerate() {
                                let at = ((a * 4 + b) * s.o + o) * row_len + r * tiles_w + tx;
                                // SAFETY: the unmasked lanes are this band's tiles, within point (a, b)'s row of o.
                                unsafe { _mm512_mask_storeu_ps(out.add(at), mask, value) };
                            }
                        }
                    }
                }
            }
        }

        /// The 16 products of output-channel block `block`: `M[ξ][k][tile] = Σ_c U_ξ(block·6 + k, c) · V[ξ][c][tile]`.
        ///
        /// # Safety
        /// AVX-512 F must be present; `transformed` holds the band's `V`, `packed` the transformed weight, `products`
        /// has `Bands::products_len` elements.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn products(&self, block: usize, transformed: &[f32], packed: &[f32], products: &mut [f32]) {
            let vectors = self.tiles().div_ceil(LANES);
            for point in 0..POINTS {
                let product = Product::of(self, block, point, (transformed, packed, products));
                let mut first = 0;
                while first < vectors {
                    let width = (vectors - first).min(BLOCK_VECTORS);
                    // SAFETY: vectors first..first + width lie within row_len (whole vectors of the band's tiles).
                    unsafe {
                        match width {
                            1 => product.run::<1>(first),
                            2 => product.run::<2>(first),
                            3 => product.run::<3>(first),
                            _ => product.run::<BLOCK_VECTORS>(first),
                        }
                    }
                    first += width;
                }
            }
        }

        /// `Y = Aᵀ M A` plus the bias for output-channel block `block`, into the band's output rows of `y`
        /// (`O × H × W`).
        ///
        /// # Safety
        /// AVX-512 F must be present; `products` holds the block's `M`; `y` points at the image's output, whose rows
        /// of this band no other thread touches.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn output_transform(
            &self,
            block: usize,
            products: &[f32],
            bias: Option<&[f32]>,
            y: SharedOut,
        ) {
            let (s, tiles_w, row_len) = (self.s, self.bands.tiles_w, self.bands.tiles());
            // Lanes 0-7 of the even and odd columns interleaved, then lanes 8-15.
            let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            for k in 0..CHANNELS {
                let o = block * CHANNELS + k;
                if o >= s.o {
                    break;
                }
                let bias = _mm512_set1_ps(bias.map_or(0.0, |b| b[o]));
                for (r, tile_row) in self.tile_rows.clone().enumerate() {
                    for tx in (0..tiles_w).step_by(LANES) {
                        let mask = lane_mask(tx, tiles_w);
                        // Aᵀ M down the columns: two rows of four (plain loops, see `input_step`).
                        let mut columns = [[_mm512_setzero_ps(); 2]; 4];
                        for (b, steps) in columns.iter_mut().enumerate() {
                            let mut column = [_mm512_setzero_ps(); 4];
                            for (a, value) in column.iter_mut().enumerate() {
                                let at = ((a * 4 + b) * CHANNELS + k) * row_len + r * tiles_w + tx;
                                // SAFETY: the unmasked lanes are this band's tiles, within M's row for (ξ, k).
                                *value = unsafe { _mm512_maskz_loadu_ps(mask, products.as_ptr().add(at)) };
                            }
                            // SAFETY: AVX-512 F is present (this function's contract).
                            *steps = unsafe { output_step(column) };
                        }
                        let pixels = 2 * (tiles_w - tx).min(LANES);
                        let [c0, c1, c2, c3] = columns;
                        let rows = [[c0[0], c1[0], c2[0], c3[0]], [c0[1], c1[1], c2[1], c3[1]]];
                        for (i, row) in rows.into_iter().enumerate() {
                            // SAFETY: as above.
                            let [even, odd] = unsafe { output_step(row) };
                            let (even, odd) = (_mm512_add_ps(even, bias), _mm512_add_ps(odd, bias));
                            // SAFETY: channel o < O, row 2·tile_row + i < H (H is even): inside the image.
                            let row = unsafe { y.ptr().add((o * s.h + 2 * tile_row + i) * s.w + 2 * tx) };
                            // SAFETY: the unmasked lanes are the row's pixels 2·tx.. below W = 2·tiles_w.
                            unsafe {
                                _mm512_mask_storeu_ps(
                                    row,
                                    lane_mask(0, pixels),
                                    _mm512_permutex2var_ps(even, low, odd),
                                );
                                _mm512_mask_storeu_ps(
                                    row.add(LANES),
                                    lane_mask(LANES, pixels),
                                    _mm512_permutex2var_ps(even, high, odd),
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    impl Product {
        /// Vectors `first..first + V` of tiles, all 6 channels: `V` vector loads and 6 broadcasts per `6·V` FMAs.
        ///
        /// # Safety
        /// AVX-512 F must be present; the pointers hold 6 rows of `channels` (`u`), `channels` rows of `row_len` (`v`) and
        /// 6 rows of `row_len` (`m`) floats; the vectors lie within `row_len`.
        #[target_feature(enable = "avx512f")]
        unsafe fn run<const V: usize>(&self, first: usize) {
            let mut acc = [[_mm512_setzero_ps(); V]; CHANNELS];
            for c in 0..self.channels {
                let x: [__m512; V] = std::array::from_fn(|i| {
                    // SAFETY: row c of V, vector first + i < row_len / 16.
                    unsafe { _mm512_loadu_ps(self.v.add(c * self.row_len + (first + i) * LANES)) }
                });
                for (k, a) in acc.iter_mut().enumerate() {
                    // SAFETY: channel k < 6 of U, input channel c < channels.
                    let w = _mm512_set1_ps(unsafe { *self.u.add(k * self.channels + c) });
                    for i in 0..V {
                        a[i] = _mm512_fmadd_ps(w, x[i], a[i]);
                    }
                }
            }
            for (k, a) in acc.iter().enumerate() {
                for (i, &value) in a.iter().enumerate() {
                    // SAFETY: row k < 6 of M, vector first + i < row_len / 16.
                    unsafe { _mm512_storeu_ps(self.m.add(k * self.row_len + (first + i) * LANES), value) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn values(rng: &mut Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.uniform_symmetric() as f32).collect()
    }

    /// The f64 forward (whole batch) and weight gradient of `s` by the im2col path, single-threaded: the reference
    /// `tests/graph_cpu/cpu_kernels.rs` checks against seven plain loops and against finite differences.
    fn reference(s: &Conv2dShape, (x, w, bias): (&[f32], &[f32], &[f32]), dy: &[f32]) -> (Vec<f64>, Vec<f64>) {
        use super::super::conv::{self, ConvThreads};
        let wide = |v: &[f32]| v.iter().map(|&v| f64::from(v)).collect::<Vec<f64>>();
        let (x, w, bias, dy, single) = (wide(x), wide(w), wide(bias), wide(dy), ConvThreads::single());
        let mut y = vec![0.0; s.y_len()];
        let mut scratch = vec![0.0; conv::conv2d_forward_scratch_len(s, single)];
        conv::conv2d_forward(s, &x, &w, Some(&bias), &mut y, &mut scratch, single).unwrap();
        let mut dw = vec![0.0; s.weight_len()];
        let mut scratch = vec![0.0; conv::conv2d_backward_weight_scratch_len(s, single)];
        conv::conv2d_backward_weight(s, &x, &dy, &mut dw, &mut scratch, single).unwrap();
        (y, dw)
    }

    /// One image's forward with the kernels of `isa`, on `threads` threads.
    fn forward(isa: Isa, s: &Conv2dShape, x: &[f32], w: &[f32], bias: &[f32], threads: usize) -> Vec<f32> {
        let mut packed = vec![f32::NAN; packed_weight_len(s)];
        pack_weight(s, Filters::forward(s, w), &mut packed, threads).unwrap();
        let (mut y, mut scratch) = (vec![f32::NAN; s.o * s.h * s.w], vec![f32::NAN; scratch_len(s, threads)]);
        forward_image_on(isa, s, (x, &packed, Some(bias)), &mut y, &mut scratch, threads, &mut |_, _| {}).unwrap();
        y
    }

    fn weight_gradient(isa: Isa, s: &Conv2dShape, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let (mut dw, mut scratch) = (vec![f32::NAN; s.o * s.c * 9], vec![f32::NAN; backward_weight_scratch_len(s)]);
        backward_weight_on(isa, s, x, dy, &mut dw, &mut scratch, 2).unwrap();
        dw
    }

    /// Asserts `got` within 1e-6 · max(1, |want|) of `want`, elementwise: the AVX2 and AVX-512 kernels do the same
    /// operations in the same order and should agree bit for bit, but that has not yet run on an AVX-512 machine, so
    /// this asks only for agreement far tighter than either's error against the f64 result (1e-5 and 1e-4 below).
    fn assert_agree(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (at, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{what}[{at}]: {g} vs {w}");
        }
    }

    /// The AVX2 kernels against the f64 convolution and weight gradient ([`reference`]), and where AVX-512 is present
    /// too, against its kernels ([`assert_agree`]). Maps whose tile rows are 1, 3, 5, 8
    /// and 20 tiles wide (tails of 8-lane registers, several rows per vector, narrow rows).
    #[test]
    fn avx2_kernels_match_the_f64_convolution_and_the_avx512_kernels() {
        if !Isa::Avx2Fma.present() {
            eprintln!("no AVX2 with FMA on this CPU: the AVX2 Winograd kernels cannot run here");
            assert!(isa().is_none() || isa() == Some(Isa::Avx512));
            return;
        }
        let shapes = [(1, 7, 2, 2, 5), (1, 9, 6, 6, 13), (2, 16, 16, 16, 7), (1, 12, 18, 10, 6), (1, 20, 8, 40, 9)];
        for (case, &(n, c, h, w, o)) in shapes.iter().enumerate() {
            let s = Conv2dShape { n, c, h, w, o, kh: 3, kw: 3, stride: 1, padding: 1 };
            let mut rng = Rng::new(40 + case as u64);
            let (x, wt, bias) = (values(&mut rng, n * c * h * w), values(&mut rng, o * c * 9), values(&mut rng, o));
            let dy = values(&mut rng, n * o * h * w);
            let (expected_y, expected_dw) = reference(&s, (&x, &wt, &bias), &dy);
            let image = c * h * w;
            for (i, (x_n, expected)) in x.chunks_exact(image).zip(expected_y.chunks_exact(o * h * w)).enumerate() {
                let y = forward(Isa::Avx2Fma, &s, x_n, &wt, &bias, 1);
                for (at, (&got, &want)) in y.iter().zip(expected).enumerate() {
                    assert!(
                        (f64::from(got) - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{s:?} image {i} [{at}]: {got} vs {want}"
                    );
                }
                assert_eq!(forward(Isa::Avx2Fma, &s, x_n, &wt, &bias, 3), y, "{s:?}: 3 threads");
                if Isa::Avx512.present() {
                    assert_agree(&format!("{s:?}: AVX-512"), &forward(Isa::Avx512, &s, x_n, &wt, &bias, 2), &y);
                }
            }
            let dw = weight_gradient(Isa::Avx2Fma, &s, &x, &dy);
            for (at, (&got, &want)) in dw.iter().zip(&expected_dw).enumerate() {
                assert!((f64::from(got) - want).abs() <= 1e-4 * want.abs().max(1.0), "{s:?} dw[{at}]: {got} vs {want}");
            }
            if Isa::Avx512.present() {
                assert_agree(
                    &format!("{s:?}: AVX-512 weight gradient"),
                    &weight_gradient(Isa::Avx512, &s, &x, &dy),
                    &dw,
                );
            }
        }
    }
}
