//! The Winograd kernels with AVX2 and FMA, for processors without AVX-512 (Zen 2-4 as most hypervisors expose them,
//! Intel's client cores). The layout, the bands and the order of every sum are the AVX-512 kernels' (`super::avx512`),
//! so both should give the same bits (the tests ask for agreement within 1e-6 wherever both run: the comparison has
//! not yet run on an AVX-512 machine); what differs is the register budget: 16 registers of 8 lanes instead of 32 of
//! 16.
//! - The transforms run 8 tiles at a time (one 4×4 patch of 8 tiles is 16 registers).
//! - The products use a register block of 6 output channels × 16 tiles (12 accumulators, two loads and a broadcast
//!   per 12 FMAs), the AVX2 kernels' usual shape, where the AVX-512 block holds 6 × 64.
//!
//! Masked loads and stores (`vmaskmovps`) are slow on AMD's cores, so they serve only the tails: whole groups of 8
//! lanes are plain loads and stores.

use super::{Band, Product, CHANNELS, POINTS};
use crate::engine::cpu::direct_conv::{SharedOut, LANES};
use std::arch::x86_64::*;

/// Lanes of one register.
const HALF: usize = 8;

/// The lanes `0..lanes` (up to 8) of a register, as a `vmaskmovps` mask.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn first_lanes(lanes: usize) -> __m256i {
    _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes.min(HALF) as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// Lanes `0..lanes` of the 8 at `p`, the others zero.
///
/// # Safety
/// AVX2 must be present; `p..p + lanes.min(8)` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load(p: *const f32, lanes: usize) -> __m256 {
    // SAFETY: as this function's; a masked load reads only the unmasked lanes.
    unsafe {
        if lanes >= HALF {
            _mm256_loadu_ps(p)
        } else {
            _mm256_maskload_ps(p, first_lanes(lanes))
        }
    }
}

/// Stores lanes `0..lanes` of `v` at `p`.
///
/// # Safety
/// AVX2 must be present; `p..p + lanes.min(8)` must be writable and no other thread's.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn store(p: *mut f32, lanes: usize, v: __m256) {
    // SAFETY: as this function's; a masked store writes only the unmasked lanes.
    unsafe {
        if lanes >= HALF {
            _mm256_storeu_ps(p, v)
        } else if lanes > 0 {
            _mm256_maskstore_ps(p, first_lanes(lanes), v)
        }
    }
}

/// `Bᵀ [d0 d1 d2 d3]`, as `super::avx512::input_step`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn input_step(d: [__m256; 4]) -> [__m256; 4] {
    [_mm256_sub_ps(d[0], d[2]), _mm256_add_ps(d[1], d[2]), _mm256_sub_ps(d[2], d[1]), _mm256_sub_ps(d[1], d[3])]
}

/// `Aᵀ [m0 m1 m2 m3]`, as `super::avx512::output_step`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn output_step(m: [__m256; 4]) -> [__m256; 2] {
    [_mm256_add_ps(_mm256_add_ps(m[0], m[1]), m[2]), _mm256_sub_ps(_mm256_sub_ps(m[1], m[2]), m[3])]
}

impl Band<'_> {
    /// `V[ξ][c][tile] = (Bᵀ d B)_ξ` for every channel and tile of the band, from its planes (as the AVX-512 kernel).
    ///
    /// # Safety
    /// AVX2 and FMA must be present; `planes` holds the band as `prepare_band` left it; `transformed` has
    /// `Bands::transformed_len` elements.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn input_transform_avx2(&self, planes: &[f32], transformed: &mut [f32]) {
        let (s, p, tiles_w, row_len) = (self.s, &self.bands.planes, self.bands.tiles_w, self.bands.tiles());
        let out = transformed.as_mut_ptr();
        let plane_row = p.tap((0, 1, 0), 0) - p.tap((0, 0, 0), 0);
        let point_step = s.c * row_len;
        for c in 0..s.c {
            // SAFETY: the planes of channel c (even and odd padded columns) start inside the band's planes.
            let (even, odd) =
                unsafe { (planes.as_ptr().add(p.tap((c, 0, 0), 0)), planes.as_ptr().add(p.tap((c, 0, 1), 0))) };
            for r in 0..self.tile_rows.len() {
                for tx in (0..tiles_w).step_by(HALF) {
                    // Bᵀ d down each column k of the 8 tiles' patches as it is loaded: columns 2·tx + k of patch rows
                    // 0-3 are runs of the planes (a plane row holds a whole 16-lane strip past the last tile, plus
                    // the column the window reaches beyond it).
                    let mut by_column = [[_mm256_setzero_ps(); 4]; 4];
                    for (k, column) in by_column.iter_mut().enumerate() {
                        let plane = if k % 2 == 0 { even } else { odd };
                        // No closures here: they are not compiled with this function's features, and every intrinsic
                        // in one became a call.
                        let mut d = [_mm256_setzero_ps(); 4];
                        for (a, value) in d.iter_mut().enumerate() {
                            // SAFETY: see above: patch row a of tile row r is plane row 2·r + a, inside the band.
                            *value = unsafe { _mm256_loadu_ps(plane.add((2 * r + a) * plane_row + tx + k / 2)) };
                        }
                        *column = input_step(d);
                    }
                    let lanes = tiles_w - tx;
                    // SAFETY: tiles r·tiles_w + tx.. of channel c's row of point 0.
                    let first = unsafe { out.add(c * row_len + r * tiles_w + tx) };
                    for a in 0..4 {
                        // (Bᵀ d) B along patch row a (a plain copy in the closure, no intrinsic).
                        let row = by_column.map(|column| column[a]);
                        for (k, &value) in input_step(row).iter().enumerate() {
                            // SAFETY: the stored lanes are tiles r·tiles_w + tx.. of this band, below its tile count,
                            // within point (a, k)'s row of channel c.
                            unsafe { store(first.add((a * 4 + k) * point_step), lanes, value) };
                        }
                    }
                }
            }
        }
    }

    /// `dM[ξ][o][tile] = (A dY Aᵀ)_ξ` for every output channel and tile of the band, from one image's `dy`
    /// (`O × H × W`), as the AVX-512 kernel.
    ///
    /// # Safety
    /// AVX2 and FMA must be present; `dy` holds the image; `gradients` has 16 points × O × `Bands::tiles` elements.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gradient_transform_avx2(&self, dy: &[f32], gradients: &mut [f32]) {
        let (s, tiles_w, row_len) = (self.s, self.bands.tiles_w, self.bands.tiles());
        let out = gradients.as_mut_ptr();
        let zero = _mm256_setzero_ps();
        for o in 0..s.o {
            for (r, tile_row) in self.tile_rows.clone().enumerate() {
                for tx in (0..tiles_w).step_by(HALF) {
                    let tiles = (tiles_w - tx).min(HALF);
                    // The 8 tiles' 2×2 blocks of dy: rows 2·tile_row and 2·tile_row + 1, even and odd columns.
                    let mut block = [[zero; 2]; 2];
                    for (i, halves) in block.iter_mut().enumerate() {
                        // SAFETY: channel o < O, row 2·tile_row + i < H: a row of the image; the loaded lanes are its
                        // pixels 2·tx.. below W = 2·tiles_w.
                        let (low, high) = unsafe {
                            let row = dy.as_ptr().add((o * s.h + 2 * tile_row + i) * s.w + 2 * tx);
                            (load(row, 2 * tiles), load(row.add(HALF), (2 * tiles).saturating_sub(HALF)))
                        };
                        // Even lanes of low then high: [l0 l2 h0 h2 | l4 l6 h4 h6], put in order by 64-bit lanes.
                        let even = _mm256_shuffle_ps::<0b10_00_10_00>(low, high);
                        let odd = _mm256_shuffle_ps::<0b11_01_11_01>(low, high);
                        *halves = [
                            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(even))),
                            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(odd))),
                        ];
                    }
                    let [[p, q], [r0, r1]] = block;
                    let rows = [
                        [p, q],
                        [_mm256_add_ps(p, r0), _mm256_add_ps(q, r1)],
                        [_mm256_sub_ps(p, r0), _mm256_sub_ps(q, r1)],
                        [_mm256_sub_ps(zero, r0), _mm256_sub_ps(zero, r1)],
                    ];
                    for (a, [u, v]) in rows.into_iter().enumerate() {
                        let points = [u, _mm256_add_ps(u, v), _mm256_sub_ps(u, v), _mm256_sub_ps(zero, v)];
                        for (b, value) in points.into_iter().enumerate() {
                            let at = ((a * 4 + b) * s.o + o) * row_len + r * tiles_w + tx;
                            // SAFETY: the stored lanes are this band's tiles, within point (a, b)'s row of o.
                            unsafe { store(out.add(at), tiles, value) };
                        }
                    }
                }
            }
        }
    }

    /// The 16 products of output-channel block `block`, as the AVX-512 kernel, 16 tiles at a time.
    ///
    /// # Safety
    /// AVX2 and FMA must be present; `transformed` holds the band's `V`, `packed` the transformed weight, `products`
    /// has `Bands::products_len` elements.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn products_avx2(&self, block: usize, transformed: &[f32], packed: &[f32], products: &mut [f32]) {
        let vectors = self.tiles().div_ceil(LANES);
        for point in 0..POINTS {
            let product = Product::of(self, block, point, (transformed, packed, products));
            for vector in 0..vectors {
                // SAFETY: vector < row_len / 16: whole vectors of the band's tiles.
                unsafe { product.run_avx2(vector) };
            }
        }
    }

    /// `Y = Aᵀ M A` plus the bias for output-channel block `block`, into the band's output rows of `y`, as the
    /// AVX-512 kernel, 8 tiles (16 pixels of a row) at a time.
    ///
    /// # Safety
    /// AVX2 and FMA must be present; `products` holds the block's `M`; `y` points at the image's output, whose rows
    /// of this band no other thread touches.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn output_transform_avx2(
        &self,
        block: usize,
        products: &[f32],
        bias: Option<&[f32]>,
        y: SharedOut,
    ) {
        let (s, tiles_w, row_len) = (self.s, self.bands.tiles_w, self.bands.tiles());
        for k in 0..CHANNELS {
            let o = block * CHANNELS + k;
            if o >= s.o {
                break;
            }
            let bias = _mm256_set1_ps(bias.map_or(0.0, |b| b[o]));
            for (r, tile_row) in self.tile_rows.clone().enumerate() {
                for tx in (0..tiles_w).step_by(HALF) {
                    let tiles = (tiles_w - tx).min(HALF);
                    // Aᵀ M down the columns: two rows of four.
                    let mut columns = [[_mm256_setzero_ps(); 2]; 4];
                    for (b, steps) in columns.iter_mut().enumerate() {
                        let mut column = [_mm256_setzero_ps(); 4];
                        for (a, value) in column.iter_mut().enumerate() {
                            let at = ((a * 4 + b) * CHANNELS + k) * row_len + r * tiles_w + tx;
                            // SAFETY: the loaded lanes are this band's tiles, within M's row for (ξ, k).
                            *value = unsafe { load(products.as_ptr().add(at), tiles) };
                        }
                        *steps = output_step(column);
                    }
                    let pixels = 2 * tiles;
                    let [c0, c1, c2, c3] = columns;
                    let rows = [[c0[0], c1[0], c2[0], c3[0]], [c0[1], c1[1], c2[1], c3[1]]];
                    for (i, row) in rows.into_iter().enumerate() {
                        let [even, odd] = output_step(row);
                        let (even, odd) = (_mm256_add_ps(even, bias), _mm256_add_ps(odd, bias));
                        // [e0 o0 e1 o1 | e4 o4 e5 o5] and [e2 o2 e3 o3 | e6 o6 e7 o7], then their 128-bit halves in
                        // pixel order.
                        let (low, high) = (_mm256_unpacklo_ps(even, odd), _mm256_unpackhi_ps(even, odd));
                        let first = _mm256_permute2f128_ps::<0x20>(low, high);
                        let second = _mm256_permute2f128_ps::<0x31>(low, high);
                        // SAFETY: channel o < O, row 2·tile_row + i < H (H is even): inside the image; the stored
                        // lanes are the row's pixels 2·tx.. below W = 2·tiles_w.
                        unsafe {
                            let row = y.ptr().add((o * s.h + 2 * tile_row + i) * s.w + 2 * tx);
                            store(row, pixels, first);
                            store(row.add(HALF), pixels.saturating_sub(HALF), second);
                        }
                    }
                }
            }
        }
    }
}

impl Product {
    /// Tiles `16·vector..16·vector + 16`, all 6 channels: two loads and 6 broadcasts per 12 FMAs.
    ///
    /// # Safety
    /// AVX2 and FMA must be present; as `Product::run`'s.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, vector: usize) {
        let mut acc = [[_mm256_setzero_ps(); 2]; CHANNELS];
        let first = vector * LANES;
        for c in 0..self.channels {
            // SAFETY: row c of V, tiles first..first + 16 < row_len.
            let x = unsafe {
                let row = self.v.add(c * self.row_len + first);
                [_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(HALF))]
            };
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: channel k < 6 of U, input channel c < channels.
                let w = unsafe { _mm256_broadcast_ss(&*self.u.add(k * self.channels + c)) };
                a[0] = _mm256_fmadd_ps(w, x[0], a[0]);
                a[1] = _mm256_fmadd_ps(w, x[1], a[1]);
            }
        }
        for (k, a) in acc.iter().enumerate() {
            // SAFETY: row k < 6 of M, tiles first..first + 16 < row_len.
            unsafe {
                let row = self.m.add(k * self.row_len + first);
                _mm256_storeu_ps(row, a[0]);
                _mm256_storeu_ps(row.add(HALF), a[1]);
            }
        }
    }
}
