//! Resize-the-shortest-side, centre-crop, optional horizontal flip and conversion to CHW `f32`, in one pass.
//!
//! Two ways to place the crop: [`resize_crop`] resizes the image just enough to cover the output and crops its
//! middle (the loader's default, `dataset bench`); [`resize_crop_as`] with [`Resize::ShorterSide`] / [`Resize::Keep`]
//! does what NeMo's augmentations (torchvision `Resize(int)` then `CenterCrop((h, w))`) do: resize the shorter side
//! to a given length (or not at all), then take the middle `height x width`, offsets rounded as torchvision rounds
//! them and zero padding where the crop is larger than the image.
//!
//! Resizing follows Pillow's convolution resampling (the filter is stretched by the scale factor when shrinking,
//! so downscaling is antialiased; weights are normalised per output pixel), with `f32` intermediates instead of
//! Pillow's 8-bit ones. Only the output pixels inside the crop window are computed: resize-then-crop and this
//! produce the same numbers, without the discarded columns and rows.

use image::RgbImage;
use serde::{Deserialize, Serialize};

/// Resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    /// Nearest neighbour: keeps label values intact (control maps, segmentation maps).
    Nearest,
    /// Triangle filter, support 1.
    Bilinear,
    /// Keys cubic with a = -0.5 (as Pillow's BICUBIC), support 2.
    Bicubic,
    /// Lanczos with 3 lobes, support 3.
    Lanczos3,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Nearest => 0.5,
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos3 => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Nearest => f64::from(u8::from(x < 0.5)),
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos3 => {
                if x < 3.0 {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let px = std::f64::consts::PI * x;
        px.sin() / px
    }
}

/// Where the crop window lies in the resized image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Size of the image after resizing (before cropping).
    pub resized_width: u32,
    pub resized_height: u32,
    /// Top-left corner of the crop window in the resized image.
    pub left: u32,
    pub top: u32,
}

/// Resize so the image covers `width` x `height` (the shortest side for a square target), then centre the crop.
/// The longer side is truncated like torchvision's `Resize(int)`: 640x480 → 682x512; the crop starts at
/// `(resized - target) / 2`, rounded down.
pub fn cover_geometry(src_w: u32, src_h: u32, width: u32, height: u32) -> Geometry {
    let (sw, sh, w, h) = (src_w as u64, src_h as u64, width as u64, height as u64);
    let (rw, rh) = if sw * h <= sh * w { (w, (sh * w / sw).max(h)) } else { ((sw * h / sh).max(w), h) };
    Geometry {
        resized_width: rw as u32,
        resized_height: rh as u32,
        left: ((rw - w) / 2) as u32,
        top: ((rh - h) / 2) as u32,
    }
}

/// How an image is resized before the centre crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    /// Just enough to cover the crop ([`cover_geometry`]).
    #[default]
    Cover,
    /// The shorter side to this many pixels, the longer one in proportion (truncated), as torchvision's
    /// `Resize(int)` (NeMo's `resize_smallest_side`).
    ShorterSide(u32),
    /// Not at all: the crop is taken from the image as it is (NeMo without `resize_smallest_side`).
    Keep,
}

/// Where the crop window lies in the resized image; a negative offset means the crop reaches past the image on
/// that side, where it is padded with zeros (as torchvision's `CenterCrop` pads an image smaller than the crop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub resized_width: u32,
    pub resized_height: u32,
    pub left: i64,
    pub top: i64,
}

/// Python's `round` of `x / 2` (halves to even), for the integer `x`.
fn half_round_even(x: i64) -> i64 {
    let q = x.div_euclid(2);
    if x.rem_euclid(2) == 1 && q.rem_euclid(2) == 1 {
        q + 1
    } else {
        q
    }
}

/// torchvision's `CenterCrop` offset along one side: `round((size - crop) / 2)` when the image is at least as large
/// as the crop, else minus the padding it adds before that side (`(crop - size) // 2`).
fn centre_offset(size: u32, crop: u32) -> i64 {
    let (size, crop) = (i64::from(size), i64::from(crop));
    if size >= crop {
        half_round_even(size - crop)
    } else {
        -((crop - size) / 2)
    }
}

/// Where a `width` x `height` centre crop lies after `resize`.
pub fn placement(src_w: u32, src_h: u32, resize: Resize, width: u32, height: u32) -> Placement {
    let (rw, rh) = match resize {
        Resize::Cover => {
            let g = cover_geometry(src_w, src_h, width, height);
            return Placement {
                resized_width: g.resized_width,
                resized_height: g.resized_height,
                left: i64::from(g.left),
                top: i64::from(g.top),
            };
        }
        Resize::Keep => (src_w, src_h),
        Resize::ShorterSide(s) => {
            let (sw, sh, s) = (u64::from(src_w), u64::from(src_h), u64::from(s));
            // torchvision: the long side is int(s * long / short).
            if sw <= sh {
                (s as u32, (s * sh / sw.max(1)).max(1) as u32)
            } else {
                ((s * sw / sh.max(1)).max(1) as u32, s as u32)
            }
        }
    };
    Placement { resized_width: rw, resized_height: rh, left: centre_offset(rw, width), top: centre_offset(rh, height) }
}

/// Resizes `src` as `resize` says, centre-crops `width` x `height` (padding with zeros where the crop is larger),
/// optionally mirrors left-right and normalises. `Resize::Cover` is [`resize_crop`].
pub fn resize_crop_as(
    src: &RgbImage,
    resize: Resize,
    width: u32,
    height: u32,
    filter: Filter,
    flip: bool,
    norm: Normalize,
) -> Chw {
    let p = placement(src.width(), src.height(), resize, width, height);
    let (w, h) = (width as i64, height as i64);
    // The part of the output inside the resized image.
    let (x0, x1) = ((-p.left).clamp(0, w), (i64::from(p.resized_width) - p.left).clamp(0, w));
    let (y0, y1) = ((-p.top).clamp(0, h), (i64::from(p.resized_height) - p.top).clamp(0, h));
    if (x0, x1, y0, y1) == (0, w, 0, h) {
        let geo = Geometry {
            resized_width: p.resized_width,
            resized_height: p.resized_height,
            left: p.left as u32,
            top: p.top as u32,
        };
        return render(src, &geo, width as usize, height as usize, filter, flip, norm);
    }
    let (iw, ih) = ((x1 - x0).max(0) as usize, (y1 - y0).max(0) as usize);
    let inner = if iw > 0 && ih > 0 {
        let geo = Geometry {
            resized_width: p.resized_width,
            resized_height: p.resized_height,
            left: (p.left + x0) as u32,
            top: (p.top + y0) as u32,
        };
        render(src, &geo, iw, ih, filter, false, norm).data
    } else {
        Vec::new()
    };
    let (w, h, x0, y0) = (w as usize, h as usize, x0 as usize, y0 as usize);
    let mut data = vec![norm.bias; 3 * w * h];
    for c in 0..3 {
        for y in 0..ih {
            for x in 0..iw {
                let ox = if flip { w - 1 - (x0 + x) } else { x0 + x };
                data[(c * h + y0 + y) * w + ox] = inner[(c * ih + y) * iw + x];
            }
        }
    }
    Chw { height: h, width: w, data }
}

/// Output value = `pixel * scale + bias`, with `pixel` in [0, 255].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    pub scale: f32,
    pub bias: f32,
}

impl Normalize {
    /// [0, 255] → [-1, 1], for the target image.
    pub const SIGNED: Normalize = Normalize { scale: 1.0 / 127.5, bias: -1.0 };
    /// [0, 255] → [0, 1], for the control map.
    pub const UNIT: Normalize = Normalize { scale: 1.0 / 255.0, bias: 0.0 };
}

/// A 3-channel image in planar (CHW) `f32` layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Chw {
    pub height: usize,
    pub width: usize,
    /// `3 * height * width` values: all of channel 0, then channel 1, then channel 2.
    pub data: Vec<f32>,
}

/// Resizes `src` to cover `width` x `height`, centre-crops, optionally mirrors left-right and normalises.
pub fn resize_crop(src: &RgbImage, width: u32, height: u32, filter: Filter, flip: bool, norm: Normalize) -> Chw {
    let geo = cover_geometry(src.width(), src.height(), width, height);
    render(src, &geo, width as usize, height as usize, filter, flip, norm)
}

/// The `w` x `h` window of `src` resized to `geo`'s size, starting at `geo`'s offsets (inside the resized image).
fn render(src: &RgbImage, geo: &Geometry, w: usize, h: usize, filter: Filter, flip: bool, norm: Normalize) -> Chw {
    // Filled strictly in order with `extend`, so the (pooled) buffer is never zeroed first.
    let mut data = super::pool::take_floats(3 * w * h);
    if filter == Filter::Nearest {
        nearest(src, geo, w, h, flip, norm, &mut data);
    } else {
        let cols = Taps::new(filter, src.width() as usize, geo.resized_width as usize, geo.left as usize, w);
        let rows = Taps::new(filter, src.height() as usize, geo.resized_height as usize, geo.top as usize, h);
        convolve(src, &cols, &rows, w, h, flip, norm, &mut data);
    }
    debug_assert_eq!(data.len(), 3 * w * h);
    Chw { height: h, width: w, data }
}

/// For each output coordinate: the first source index and `len` weights (zero-padded to a uniform length so the
/// inner loops have a fixed trip count).
struct Taps {
    len: usize,
    start: Vec<usize>,
    weights: Vec<f32>,
}

impl Taps {
    /// Taps for output pixels `offset..offset + count` of an axis resized from `in_size` to `out_size`.
    fn new(filter: Filter, in_size: usize, out_size: usize, offset: usize, count: usize) -> Taps {
        let scale = in_size as f64 / out_size as f64;
        // Shrinking stretches the filter over more source pixels (antialiasing); enlarging keeps it as is.
        let stretch = scale.max(1.0);
        let support = filter.support() * stretch;
        let window = |out: usize| {
            let center = (out as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0) as usize).min(in_size - 1);
            let hi = ((center + support + 0.5).floor() as usize).clamp(lo + 1, in_size);
            (center, lo, hi)
        };
        // The widest window actually needed (4 taps for bicubic when enlarging), not a bound: every tap is work.
        let len = (offset..offset + count).map(|out| window(out).2 - window(out).1).max().unwrap_or(1);
        let mut start = Vec::with_capacity(count);
        let mut weights = vec![0f32; count * len];
        let mut row = vec![0f64; len];
        for (i, out) in (offset..offset + count).enumerate() {
            let (center, lo, hi) = window(out);
            // Shift the window left near the right edge so that `first + len` stays inside the source.
            let first = lo.min(in_size - len);
            row.fill(0.0);
            let mut total = 0.0;
            for j in lo..hi.min(first + len) {
                let w = filter.weight((j as f64 + 0.5 - center) / stretch);
                row[j - first] = w;
                total += w;
            }
            if total == 0.0 {
                // Cannot happen for these filters (the centre tap has weight > 0); keep the nearest pixel anyway.
                row[lo - first] = 1.0;
                total = 1.0;
            }
            for (dst, w) in weights[i * len..(i + 1) * len].iter_mut().zip(&row) {
                *dst = (w / total) as f32;
            }
            start.push(first);
        }
        Taps { len, start, weights }
    }
}

/// Reused per-thread buffers: one source row as `f32` pixels, and the horizontally filtered rows as three planes.
type RowScratch = (Vec<[f32; 3]>, Vec<f32>);

thread_local! {
    /// Per-thread scratch for the horizontal pass, reused across samples: allocating (and page-faulting) a few MB
    /// per image costs as much as the filtering itself.
    static SCRATCH: std::cell::RefCell<RowScratch> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Separable convolution: a horizontal pass over the source rows the crop needs (into three planes), then a
/// vertical pass per plane that writes each output row once, in output order.
#[allow(clippy::too_many_arguments)]
fn convolve(
    src: &RgbImage,
    cols: &Taps,
    rows: &Taps,
    w: usize,
    h: usize,
    flip: bool,
    norm: Normalize,
    out: &mut Vec<f32>,
) {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let (line, planes) = &mut *scratch;
        let row_lo = rows.start.iter().copied().min().unwrap_or(0);
        let row_hi = rows.start.iter().map(|s| s + rows.len).max().unwrap_or(0);
        let plane_len = (row_hi - row_lo) * w;
        horizontal_pass(src, cols, row_lo..row_hi, w, line, planes);
        let mut row = vec![0f32; w];
        for plane in planes.chunks_exact(plane_len) {
            for y in 0..h {
                let taps = &rows.weights[y * rows.len..(y + 1) * rows.len];
                let first = rows.start[y] - row_lo;
                let window = &plane[first * w..(first + rows.len) * w];
                // A fixed tap count lets the compiler keep every tap's sum in registers.
                match rows.len {
                    4 => blend_rows::<4>(window, taps, &mut row),
                    5 => blend_rows::<5>(window, taps, &mut row),
                    6 => blend_rows::<6>(window, taps, &mut row),
                    7 => blend_rows::<7>(window, taps, &mut row),
                    9 => blend_rows::<9>(window, taps, &mut row),
                    _ => blend_rows_any(window, taps, &mut row),
                }
                let values = row.iter().map(|v| v.clamp(0.0, 255.0) * norm.scale + norm.bias);
                if flip {
                    out.extend(values.rev());
                } else {
                    out.extend(values);
                }
            }
        }
    });
}

/// Filters source rows `rows` horizontally into three planes of `w` columns each (R, then G, then B).
fn horizontal_pass(
    src: &RgbImage,
    cols: &Taps,
    rows: std::ops::Range<usize>,
    w: usize,
    line: &mut Vec<[f32; 3]>,
    planes: &mut Vec<f32>,
) {
    let src_w = src.width() as usize;
    let raw = src.as_raw();
    let plane_len = rows.len() * w;
    planes.clear();
    planes.resize(3 * plane_len, 0.0);
    line.clear();
    line.resize(src_w, [0.0; 3]);
    let (red, rest) = planes.split_at_mut(plane_len);
    let (green, blue) = rest.split_at_mut(plane_len);
    for (i, y) in rows.enumerate() {
        for (dst, px) in line.iter_mut().zip(raw[y * src_w * 3..(y + 1) * src_w * 3].chunks_exact(3)) {
            *dst = [px[0] as f32, px[1] as f32, px[2] as f32];
        }
        let out = [&mut red[i * w..(i + 1) * w], &mut green[i * w..(i + 1) * w], &mut blue[i * w..(i + 1) * w]];
        match cols.len {
            4 => filter_row::<4>(line, cols, out),
            5 => filter_row::<5>(line, cols, out),
            6 => filter_row::<6>(line, cols, out),
            7 => filter_row::<7>(line, cols, out),
            9 => filter_row::<9>(line, cols, out),
            _ => filter_row_any(line, cols, out),
        }
    }
}

fn filter_row<const N: usize>(line: &[[f32; 3]], cols: &Taps, [red, green, blue]: [&mut [f32]; 3]) {
    let outputs = red.iter_mut().zip(green.iter_mut()).zip(blue.iter_mut());
    for ((((r, g), b), &start), weights) in outputs.zip(&cols.start).zip(cols.weights.chunks_exact(N)) {
        let (Ok(px), Ok(weights)) =
            (<&[[f32; 3]; N]>::try_from(&line[start..start + N]), <&[f32; N]>::try_from(weights))
        else {
            continue; // lengths are N by construction
        };
        let mut acc = [0f32; 3];
        for k in 0..N {
            acc[0] += weights[k] * px[k][0];
            acc[1] += weights[k] * px[k][1];
            acc[2] += weights[k] * px[k][2];
        }
        (*r, *g, *b) = (acc[0], acc[1], acc[2]);
    }
}

fn filter_row_any(line: &[[f32; 3]], cols: &Taps, [red, green, blue]: [&mut [f32]; 3]) {
    let outputs = red.iter_mut().zip(green.iter_mut()).zip(blue.iter_mut());
    for ((((r, g), b), &start), weights) in outputs.zip(&cols.start).zip(cols.weights.chunks_exact(cols.len)) {
        let mut acc = [0f32; 3];
        for (px, &wt) in line[start..start + cols.len].iter().zip(weights) {
            acc[0] += wt * px[0];
            acc[1] += wt * px[1];
            acc[2] += wt * px[2];
        }
        (*r, *g, *b) = (acc[0], acc[1], acc[2]);
    }
}

/// `row[x] = sum_k taps[k] * window[k * width + x]`: the vertical pass for one output row, all taps of a pixel
/// summed in registers, one store per pixel.
fn blend_rows<const N: usize>(window: &[f32], taps: &[f32], row: &mut [f32]) {
    let width = row.len();
    let Ok(taps) = <&[f32; N]>::try_from(taps) else { return blend_rows_any(window, taps, row) };
    let lines: [&[f32]; N] = std::array::from_fn(|k| &window[k * width..(k + 1) * width]);
    for (x, out) in row.iter_mut().enumerate() {
        let mut sum = 0f32;
        for k in 0..N {
            sum += taps[k] * lines[k][x];
        }
        *out = sum;
    }
}

fn blend_rows_any(window: &[f32], taps: &[f32], row: &mut [f32]) {
    let width = row.len();
    row.fill(0.0);
    for (k, &wt) in taps.iter().enumerate() {
        for (out, &v) in row.iter_mut().zip(&window[k * width..(k + 1) * width]) {
            *out += wt * v;
        }
    }
}

/// Nearest-neighbour sampling, as Pillow's NEAREST: source index `floor((i + 0.5) * scale)`.
fn nearest(src: &RgbImage, geo: &Geometry, w: usize, h: usize, flip: bool, norm: Normalize, out: &mut Vec<f32>) {
    let (src_w, src_h) = (src.width() as usize, src.height() as usize);
    let pick = |i: usize, offset: u32, in_size: usize, out_size: u32| {
        let scale = in_size as f64 / out_size as f64;
        (((i + offset as usize) as f64 + 0.5) * scale).floor().min((in_size - 1) as f64) as usize
    };
    let mut xs: Vec<usize> = (0..w).map(|x| pick(x, geo.left, src_w, geo.resized_width)).collect();
    if flip {
        xs.reverse();
    }
    let ys: Vec<usize> = (0..h).map(|y| pick(y, geo.top, src_h, geo.resized_height)).collect();
    let raw = src.as_raw();
    for c in 0..3 {
        for &sy in &ys {
            let row = &raw[sy * src_w * 3..(sy + 1) * src_w * 3];
            out.extend(xs.iter().map(|&sx| row[sx * 3 + c] as f32 * norm.scale + norm.bias));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward reference: resize the whole image with per-pixel f64 sums, then crop.
    fn reference(src: &RgbImage, w: u32, h: u32, filter: Filter) -> Vec<f64> {
        let geo = cover_geometry(src.width(), src.height(), w, h);
        let axis = |in_size: usize, out_size: usize| -> Vec<Vec<(usize, f64)>> {
            let scale = in_size as f64 / out_size as f64;
            let stretch = scale.max(1.0);
            (0..out_size)
                .map(|i| {
                    let center = (i as f64 + 0.5) * scale;
                    let taps: Vec<(usize, f64)> = (0..in_size)
                        .map(|j| (j, filter.weight((j as f64 + 0.5 - center) / stretch)))
                        .filter(|&(_, wt)| wt != 0.0)
                        .collect();
                    let total: f64 = taps.iter().map(|t| t.1).sum();
                    taps.into_iter().map(|(j, wt)| (j, wt / total)).collect()
                })
                .collect()
        };
        let xs = axis(src.width() as usize, geo.resized_width as usize);
        let ys = axis(src.height() as usize, geo.resized_height as usize);
        let mut out = vec![0f64; 3 * (w * h) as usize];
        for y in 0..h as usize {
            for x in 0..w as usize {
                for c in 0..3 {
                    let mut v = 0.0;
                    for &(sy, wy) in &ys[y + geo.top as usize] {
                        for &(sx, wx) in &xs[x + geo.left as usize] {
                            v += wy * wx * src.get_pixel(sx as u32, sy as u32)[c] as f64;
                        }
                    }
                    out[c * (w * h) as usize + y * w as usize + x] = v.clamp(0.0, 255.0);
                }
            }
        }
        out
    }

    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 37 + y * 11) as u8, (x * x + 3 * y) as u8, ((x ^ y) * 5) as u8])
        })
    }

    #[test]
    fn geometry_matches_shortest_side_resize_and_centre_crop() {
        assert_eq!(
            cover_geometry(640, 480, 512, 512),
            Geometry { resized_width: 682, resized_height: 512, left: 85, top: 0 }
        );
        assert_eq!(
            cover_geometry(480, 640, 512, 512),
            Geometry { resized_width: 512, resized_height: 682, left: 0, top: 85 }
        );
        assert_eq!(
            cover_geometry(100, 100, 50, 50),
            Geometry { resized_width: 50, resized_height: 50, left: 0, top: 0 }
        );
        // Non-square target: cover 64x32 from 100x100 → 64x64, crop rows 16..48.
        assert_eq!(
            cover_geometry(100, 100, 64, 32),
            Geometry { resized_width: 64, resized_height: 64, left: 0, top: 16 }
        );
    }

    #[test]
    fn nemo_placement_rounds_and_pads_as_torchvision() {
        // Resize(512) of 640x480 → 682x512; CenterCrop(512, 512): left round(85.0) = 85.
        assert_eq!(
            placement(640, 480, Resize::ShorterSide(512), 512, 512),
            Placement { resized_width: 682, resized_height: 512, left: 85, top: 0 }
        );
        // Halves round to even: (683 - 512) / 2 = 85.5 → 86, (681 - 512) / 2 = 84.5 → 84.
        assert_eq!(placement(683, 512, Resize::Keep, 512, 512).left, 86);
        assert_eq!(placement(681, 512, Resize::Keep, 512, 512).left, 84);
        // The resize does not depend on the crop: 64x64 resized to 128 keeps 128x128, the crop is its middle.
        assert_eq!(
            placement(64, 64, Resize::ShorterSide(128), 48, 32),
            Placement { resized_width: 128, resized_height: 128, left: 40, top: 48 }
        );
        // A crop larger than the image pads (crop - size) // 2 before it.
        assert_eq!(placement(10, 20, Resize::Keep, 15, 20).left, -2);
    }

    #[test]
    fn a_crop_larger_than_the_image_is_padded_with_zeros() {
        let src = RgbImage::from_pixel(4, 2, image::Rgb([255, 255, 255]));
        let out = resize_crop_as(&src, Resize::Keep, 6, 4, Filter::Bilinear, false, Normalize::UNIT);
        // torchvision pads [left 1, top 1, right 1, bottom 1]: a white 4x2 block in a black 6x4 frame.
        let plane: Vec<f32> = out.data[..24].to_vec();
        let want: Vec<f32> =
            (0..24).map(|i| if (1..3).contains(&(i / 6)) && (1..5).contains(&(i % 6)) { 1.0 } else { 0.0 }).collect();
        assert_eq!(plane, want);
        // Odd padding puts the extra column after the image; a flip mirrors the whole output.
        let src = RgbImage::from_fn(2, 1, |x, _| image::Rgb([if x == 0 { 100 } else { 200 }, 0, 0]));
        let out = resize_crop_as(&src, Resize::Keep, 5, 1, Filter::Nearest, false, Normalize { scale: 1.0, bias: 0.0 });
        assert_eq!(&out.data[..5], &[0.0, 100.0, 200.0, 0.0, 0.0]);
        let out = resize_crop_as(&src, Resize::Keep, 5, 1, Filter::Nearest, true, Normalize { scale: 1.0, bias: 0.0 });
        assert_eq!(&out.data[..5], &[0.0, 0.0, 200.0, 100.0, 0.0]);
    }

    #[test]
    fn fused_crop_equals_full_resize_then_crop() {
        for (sw, sh, w, h) in [(40, 30, 16, 16), (13, 29, 20, 20), (50, 20, 24, 12), (9, 9, 9, 9)] {
            let src = pattern(sw, sh);
            for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos3] {
                let got = resize_crop(&src, w, h, filter, false, Normalize { scale: 1.0, bias: 0.0 });
                let want = reference(&src, w, h, filter);
                for (i, (g, r)) in got.data.iter().zip(&want).enumerate() {
                    assert!((*g as f64 - r).abs() < 1e-2, "{sw}x{sh}->{w}x{h} {filter:?} [{i}]: {g} vs {r}");
                }
            }
        }
    }

    #[test]
    fn constant_image_stays_constant_and_normalises() {
        let src = RgbImage::from_pixel(37, 23, image::Rgb([255, 0, 51]));
        let out = resize_crop(&src, 16, 16, Filter::Bicubic, false, Normalize::SIGNED);
        let plane = 16 * 16;
        assert!(out.data[..plane].iter().all(|v| (v - 1.0).abs() < 1e-5));
        assert!(out.data[plane..2 * plane].iter().all(|v| (v + 1.0).abs() < 1e-5));
        assert!(out.data[2 * plane..].iter().all(|v| (v - (51.0 / 127.5 - 1.0)).abs() < 1e-5));
    }

    #[test]
    fn degenerate_sources_do_not_break_the_taps() {
        for (w, h) in [(1, 1), (1, 7), (7, 1), (2, 3)] {
            let src = RgbImage::from_pixel(w, h, image::Rgb([9, 99, 199]));
            for filter in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic, Filter::Lanczos3] {
                let out = resize_crop(&src, 5, 4, filter, true, Normalize { scale: 1.0, bias: 0.0 });
                assert_eq!(out.data.len(), 3 * 5 * 4);
                assert!(out.data[..20].iter().all(|v| (v - 9.0).abs() < 1e-3), "{w}x{h} {filter:?}");
                assert!(out.data[40..].iter().all(|v| (v - 199.0).abs() < 1e-3), "{w}x{h} {filter:?}");
            }
        }
    }

    #[test]
    fn nearest_keeps_labels_and_flip_mirrors() {
        let src = RgbImage::from_fn(8, 4, |x, _| image::Rgb([x as u8 * 10, 0, 0]));
        let out = resize_crop(&src, 8, 8, Filter::Nearest, false, Normalize { scale: 1.0, bias: 0.0 });
        // 8x4 → 16x8, crop columns 4..12 → source columns 2,2,3,3,4,4,5,5.
        assert_eq!(&out.data[..8], &[20.0, 20.0, 30.0, 30.0, 40.0, 40.0, 50.0, 50.0]);
        let flipped = resize_crop(&src, 8, 8, Filter::Nearest, true, Normalize { scale: 1.0, bias: 0.0 });
        let mut mirrored = out.data[..8].to_vec();
        mirrored.reverse();
        assert_eq!(&flipped.data[..8], &mirrored[..]);
        let bicubic = resize_crop(&src, 8, 8, Filter::Bicubic, false, Normalize::UNIT);
        let bicubic_flip = resize_crop(&src, 8, 8, Filter::Bicubic, true, Normalize::UNIT);
        for y in 0..8 {
            for x in 0..8 {
                assert_eq!(bicubic.data[y * 8 + x], bicubic_flip.data[y * 8 + 7 - x]);
            }
        }
    }
}
