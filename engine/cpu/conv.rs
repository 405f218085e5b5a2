//! 2-D convolution on the CPU (NCHW, weight `[O, C, kh, kw]`, symmetric zero padding), forward and
//! both backward passes, lowered to matrix products.
//!
//! Per image `x_n` (`C × H·W`), im2col unrolls every receptive field into a column:
//! `cols` is `C·kh·kw × Ho·Wo`. Then
//! - forward:         `y_n  = W · cols`                (`O × Ho·Wo`)
//! - backward-input:  `dcols = Wᵀ · dy_n`, `dx_n = col2im(dcols)`
//! - backward-weight: `dWᵀ = Σ_n cols · dy_nᵀ`, transposed once at the end
//!
//! `cols` is built for a block of output rows at a time (about 1024 output pixels), not a whole
//! image, and each product works on the matching columns of `y_n` / `dy_n`. A 1×1, stride-1,
//! unpadded convolution already has `x_n` in the `cols` layout and skips im2col.
//!
//! Where AVX-512 is present, convolutions with few channels over large maps run a direct kernel instead
//! (`direct_conv.rs`; [`ConvMethod::Direct`], chosen per shape and pass by [`ConvMethod::Auto`]), and, there or
//! with AVX2, the stride-1, same-padded 3×3 convolutions with enough channels run Winograd F(2×2, 3×3)
//! (`winograd.rs`; [`ConvMethod::Winograd`]): their forward, their backward-input recast as a forward, and their
//! weight gradient.
//!
//! Callers pass the scratch (see the `*_scratch_len` functions); nothing here allocates.
//!
//! A fused epilogue (bias, residual and broadcast adds, SiLU: the fusion pass's convolution-anchored
//! groups) runs on the output while it is in cache: the forward hands each block of output rows to
//! a [`ConvEpilogue`] right after its product, the backward-input each image after its col2im.

use super::direct_conv as direct;
use super::elementwise::{as_f32, as_f32_mut, from_f32_mut};
use super::float::Float;
use super::gemm::{matmul, GemmDims, MatMut, MatRef};
use super::layout::{add_strided, copy_short, copy_strided};
use super::winograd;
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::ops::Range;

/// The sizes of one convolution. Output spatial sizes follow from the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dShape {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Output channels.
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    /// Zero padding added on each side of both spatial axes.
    pub padding: usize,
}

impl Conv2dShape {
    /// Checks that the window fits and the stride is positive, so the output sizes are defined.
    pub fn validate(&self) -> Result<()> {
        let err = |msg: String| Err(Error::shape("conv2d", msg));
        if self.stride == 0 {
            return err("stride must be at least 1".into());
        }
        if self.kh == 0 || self.kw == 0 {
            return err(format!("kernel {}×{} is empty", self.kh, self.kw));
        }
        if self.kh > self.h + 2 * self.padding || self.kw > self.w + 2 * self.padding {
            return err(format!(
                "kernel {}×{} is larger than the padded input {}×{} (padding {})",
                self.kh,
                self.kw,
                self.h + 2 * self.padding,
                self.w + 2 * self.padding,
                self.padding
            ));
        }
        Ok(())
    }
    /// Output height; 0 for a shape `validate` rejects, so sizing functions never panic.
    pub fn out_h(&self) -> usize {
        out_len(self.h, self.kh, self.stride, self.padding)
    }
    /// Output width; 0 for a shape `validate` rejects.
    pub fn out_w(&self) -> usize {
        out_len(self.w, self.kw, self.stride, self.padding)
    }
    pub fn x_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn weight_len(&self) -> usize {
        self.o * self.c * self.kh * self.kw
    }
    pub fn y_len(&self) -> usize {
        self.n * self.o * self.out_h() * self.out_w()
    }
    /// FLOPs of the forward pass (each backward pass costs the same), multiply-adds counted as two.
    pub fn flops(&self) -> f64 {
        2.0 * (self.n * self.o * self.out_h() * self.out_w()) as f64 * (self.c * self.kh * self.kw) as f64
    }
    /// A 1×1, stride-1, unpadded convolution: the input already is its own im2col matrix.
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }
    /// Rows of the im2col matrix: one per (input channel, kernel row, kernel column).
    fn patch_len(&self) -> usize {
        self.c * self.kh * self.kw
    }
    fn out_pixels(&self) -> usize {
        self.out_h() * self.out_w()
    }
    /// Output rows unrolled at a time (see `TARGET_BLOCK_PIXELS`); all of them for a pointwise
    /// convolution, whose input needs no unrolling.
    fn block_rows(&self) -> usize {
        let (ho, wo) = (self.out_h(), self.out_w());
        if self.is_pointwise() || wo == 0 {
            return ho.max(1);
        }
        TARGET_BLOCK_PIXELS.div_ceil(wo).clamp(1, ho.max(1))
    }
    /// The output-row blocks `(first, end)` one image is processed in.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> {
        let (ho, rows) = (self.out_h(), self.block_rows());
        (0..ho).step_by(rows).map(move |first| (first, (first + rows).min(ho)))
    }
    /// Scratch for one block of the im2col matrix.
    fn cols_len(&self) -> usize {
        if self.is_pointwise() {
            0
        } else {
            self.patch_len() * self.block_rows() * self.out_w()
        }
    }
}

fn out_len(input: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    (input + 2 * padding).checked_sub(kernel).map_or(0, |room| room / stride.max(1) + 1)
}

/// im2col unrolls this many output pixels (rounded up to whole output rows) at a time, rather than
/// a whole image: the product stays wide enough to run at full speed (n = 1024), while the block
/// (C·kh·kw × 1024 floats: 11.8 MB for C = 320) stays in the last-level cache between being written
/// and being read, and the scratch stays small. A 320-channel 64×64 image unrolled whole is 47 MB.
const TARGET_BLOCK_PIXELS: usize = 1024;

/// How a convolution is computed and spread over threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvMethod {
    /// Chosen per shape and pass from measurements (see `BENCHMARKS.md`).
    Auto,
    /// im2col products; each thread takes whole images, each with its own scratch; products run
    /// single-threaded.
    AcrossImages,
    /// im2col products; images one after another; each product (and im2col/col2im) uses every thread.
    InsideGemm,
    /// The direct kernels (`direct_conv.rs`) for the passes and types they serve (f32 on AVX-512; every pass, but
    /// a strided backward-input only with "same" padding); im2col as `Auto` would run it for the others.
    Direct,
    /// Winograd F(2×2, 3×3) (`winograd.rs`) for every pass of the shapes it serves (f32 on AVX-512 or AVX2: 3×3,
    /// stride 1, padding 1, even-sized maps); the direct kernels (as [`ConvMethod::Direct`]) for the rest.
    Winograd,
}

/// Threads a convolution may use, and how it uses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvThreads {
    /// Threads of the current rayon pool to use; 0 counts as 1.
    pub threads: usize,
    pub method: ConvMethod,
}

impl ConvThreads {
    pub fn auto(threads: usize) -> Self {
        ConvThreads { threads, method: ConvMethod::Auto }
    }
    pub fn single() -> Self {
        ConvThreads { threads: 1, method: ConvMethod::InsideGemm }
    }
}

/// The resolved plan: how many images run at once, and how many threads each product gets.
#[derive(Clone, Copy, Debug)]
struct Plan {
    workers: usize,
    gemm_threads: usize,
}

fn plan(shape: &Conv2dShape, threads: ConvThreads) -> Plan {
    let method = threads.method;
    let threads = threads_or_one(threads.threads);
    let across = match method {
        ConvMethod::AcrossImages => true,
        ConvMethod::InsideGemm => false,
        ConvMethod::Auto | ConvMethod::Direct | ConvMethod::Winograd => prefer_across_images(shape, threads),
    };
    let workers = if across { threads.min(shape.n).max(1) } else { 1 };
    Plan { workers, gemm_threads: if workers > 1 { 1 } else { threads } }
}

fn threads_or_one(threads: usize) -> usize {
    threads.max(1)
}

/// Measured on 2 Zen cores (`zeroconv bench ops`, see `BENCHMARKS.md`): whole images per thread
/// win when the images divide evenly over the threads, because nothing synchronises and im2col
/// runs in parallel for free. With a remainder (N=3 on 2 threads) one thread idles for a whole
/// image, and splitting each product wins.
fn prefer_across_images(shape: &Conv2dShape, threads: usize) -> bool {
    threads > 1 && shape.n >= threads && (shape.n.is_multiple_of(threads) || shape.n >= 4 * threads)
}

/// The passes of a convolution, each of which may run another method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Forward,
    BackwardInput,
    BackwardWeight,
}

/// The kernel that runs a pass of a convolution on f32 data (other types always take im2col), as reported by
/// [`conv_kernels`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKernel {
    /// im2col (or the input itself, for pointwise convolutions) and a matrix product.
    Im2col,
    /// The direct kernels (`direct_conv.rs`).
    Direct,
    /// Winograd F(2×2, 3×3) (`winograd.rs`).
    Winograd,
}

/// The kernel chosen for a pass, with what it computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Choice {
    Im2col,
    /// The direct kernels; for the forward and backward-input, on `computed`: the shape itself, or a stride-1
    /// backward-input recast as a forward (see `direct_conv::backward_input_as_forward`).
    Direct {
        computed: Conv2dShape,
    },
    /// The direct strided backward-input (by output phases).
    DirectStrided,
    /// Winograd, on `computed` as for [`Choice::Direct`].
    Winograd {
        computed: Conv2dShape,
    },
}

impl Choice {
    fn kernel(self) -> ConvKernel {
        match self {
            Choice::Im2col => ConvKernel::Im2col,
            Choice::Direct { .. } | Choice::DirectStrided => ConvKernel::Direct,
            Choice::Winograd { .. } => ConvKernel::Winograd,
        }
    }
}

/// The one place that decides which kernel runs a pass of `shape` on f32 data with this threading: both the
/// scratch sizing and the dispatch ask it, so they cannot disagree. Winograd takes precedence over the direct
/// kernels, and both over im2col.
fn choose(shape: &Conv2dShape, threads: ConvThreads, pass: Pass) -> Choice {
    let method = threads.method;
    // No vector kernels at all (the direct kernels need AVX-512, which implies Winograd's).
    if shape.n == 0 || winograd::isa().is_none() || matches!(method, ConvMethod::AcrossImages | ConvMethod::InsideGemm)
    {
        return Choice::Im2col;
    }
    // What the kernel computes: a stride-1 backward-input is the forward of its recast shape.
    let computed = match pass {
        Pass::Forward | Pass::BackwardWeight => Some(*shape),
        Pass::BackwardInput => direct::backward_input_as_forward(shape),
    };
    // Forced methods take every shape their kernel serves; `Auto` only where the measurements say it wins.
    let wins = |measured: bool| method != ConvMethod::Auto || measured;
    let family = Family::of_this_machine();
    if let (Some(computed), Some(isa)) = (computed.filter(winograd::supported), winograd::isa()) {
        if method != ConvMethod::Direct && wins(winograd_wins(&computed, pass, isa)) {
            return Choice::Winograd { computed };
        }
    }
    // The direct kernels need AVX-512 (Winograd also runs on AVX2).
    if !direct::available() {
        return Choice::Im2col;
    }
    match computed {
        Some(computed) if wins(direct_wins(&computed, pass, family)) => Choice::Direct { computed },
        Some(_) => Choice::Im2col,
        None if direct::strided_backward_input_supported(shape) && wins(direct_strided_wins(shape, family)) => {
            Choice::DirectStrided
        }
        None => Choice::Im2col,
    }
}

/// The processor families the kernel choices were measured on. They differ where the direct kernels read their
/// planes with little reuse (the strided passes: each tap's run starts new cache lines), which Zen 5 serves from its
/// caches faster than the Xeon (Sapphire Rapids class) the later measurements ran on. The family comes from the
/// processor itself (CPUID), so a machine makes the same choices, and rounds the same way, on every run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    /// AMD Zen 5, and any processor not listed (the first measurements' machine).
    Zen,
    Intel,
}

impl Family {
    fn of_this_machine() -> Family {
        static FAMILY: std::sync::OnceLock<Family> = std::sync::OnceLock::new();
        *FAMILY.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let id = std::arch::x86_64::__cpuid(0);
                let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
                if vendor == b"GenuineIntel" {
                    return Family::Intel;
                }
            }
            Family::Zen
        })
    }

    /// The most input channels (of the computed convolution) at which the direct kernels still beat im2col on a
    /// strided convolution, in every pass.
    ///
    /// Measured with `zeroconv bench ops --no-gemm --convs hint` (best of 2-3 passes, 2 threads, GFLOP/s forward /
    /// backward-input / weight gradient). On the Xeon, 32->96 s2 at 128x128: direct 122 / 90 / 89, im2col across
    /// images 165 / 173 / 170; 96->256 s2 at 64x64 forward 129 against 154; 16->32 s2 at 256x256: direct 108 / 87 /
    /// 90, im2col 94 / 76 / 76. On Zen 5 the direct kernels won up to 128 channels (forward and backward-input) and
    /// 32 (weight gradient), see [`direct_wins`].
    fn strided_direct_channels(self) -> Option<usize> {
        match self {
            Family::Zen => None,
            Family::Intel => Some(16),
        }
    }
}

/// The strided backward-input by output phases (stride-1 convolutions from O to C channels with a quarter of the
/// taps each), where it beats im2col: measured on Zen 5 from 8 channels of `dx` at least 32 wide, up to 128
/// channels of `dy`; on the Xeon only up to 16 channels of `dx` (see [`Family::strided_direct_channels`]).
fn direct_strided_wins(shape: &Conv2dShape, family: Family) -> bool {
    let few = family.strided_direct_channels().is_none_or(|most| shape.c <= most);
    shape.out_w() >= 32 && shape.c >= 8 && shape.o <= 128 && few
}

/// The kernels that run the forward, the backward-input and the weight gradient of `shape` on f32 data with this
/// threading: for tests and reports, which would otherwise not see which path ran.
pub fn conv_kernels(shape: &Conv2dShape, threads: ConvThreads) -> [ConvKernel; 3] {
    [Pass::Forward, Pass::BackwardInput, Pass::BackwardWeight].map(|pass| choose(shape, threads, pass).kernel())
}

/// Where Winograd beats the direct kernels and im2col (`computed` is the convolution it would compute), measured on
/// Zen 5 (`zeroconv bench ops`, BENCHMARKS.md, 2026-12-03), forward / backward-input GFLOP/s of the nominal FLOPs
/// against the best other method: from 32 channels in and out over maps at least 16 wide (96->96 at 64x64 241 / 241
/// against 158 / 156 direct, 64->64 at 32x32 208 / 204 against 169 / 172, 128->128 at 16x16 155 / 143 against
/// 140 / 126 by im2col, which `Auto` ran there). Not below: 16->16 at 256x256 lost (100 against 132 direct: too few
/// channels to pay for the transforms), and so did 128->128 at 8x8 (58 against 116 by im2col: four tiles a row
/// leave three quarters of each transform's vector empty, and the filter transform is paid for 16 tiles an image).
/// The weight gradient (16 products through the `gemm` crate over each band's tiles) wins by less, from 64 channels
/// over maps at least 32 wide: 96->96 at 64x64 160 against 137 by im2col, 256->64 at 32x32 151 against 124, 64->64
/// at 32x32 133 against 124; 32->32 at 128x128 lost (99 against 128 direct), 128->128 at 16x16 too (81 against 113).
///
/// On the Xeon, `zeroconv bench ops` had Winograd ahead from 16 channels too (16->16 at 256x256: 142 / 147 against
/// 130 / 131 GFLOP/s direct), but inside bench_small's step the forward lost more (3.9 -> 4.3 ms, per-kernel minima
/// of three interleaved `zeroconv profile` runs) than the backward-input gained (8.8 -> 8.5), so the rule stayed.
///
/// With AVX2 only (no direct kernels: Winograd against im2col), measured on a Zen 4 VM without AVX-512 (2026-12-04),
/// the forward and backward-input win from 16 computed output channels whatever the input channels: 3->16 at 256x256
/// forward 127 against 76 by im2col, 16->16 at 256x256 141 / 137 against 104 / 95, 96->96 at 64x64 285 / 284 against
/// 141 / 150, 128->128 at 16x16 181 / 174 against 149 / 156; the backward-input of 3->16 (a forward to 3 channels) lost
/// (43 against 83). The weight gradient keeps the rule above (16->16 at 256x256 lost, 93 against 109; 64->64 at 32x32
/// won, 154 against 142; 128->128 at 16x16 lost, 79 against 143).
fn winograd_wins(computed: &Conv2dShape, pass: Pass, isa: winograd::Isa) -> bool {
    match (pass, isa) {
        (Pass::Forward | Pass::BackwardInput, winograd::Isa::Avx2Fma) => computed.o >= 16 && computed.w >= 16,
        (Pass::Forward | Pass::BackwardInput, _) => computed.c >= 32 && computed.o >= 32 && computed.w >= 16,
        (Pass::BackwardWeight, _) => computed.c >= 64 && computed.o >= 64 && computed.w >= 32,
    }
}

/// Measured on Zen 5 (`zeroconv bench ops --convs hint`, and A/B pairs of `zeroconv profile` on bench_small's step,
/// minimum per kernel over 6 steps; BENCHMARKS.md): the direct kernels beat im2col where its products are thin (few
/// input channels: a short reduction) over rows at least 32 pixels wide, with at least 8 output channels. (With the
/// 6 × 64 register blocks of 2026-12-03, which stack rows for narrow outputs, 128->128 at 16x16 still measured level
/// with im2col forward, 125-131 against 142-157 GFLOP/s, and slower backward-input, so the rules stayed.)
/// - Forward: at stride 1 at any channel count once each thread has its own image (the hint encoder's 256->64 zero
///   convolution 5.8-6.2 -> 3.6 ms, 96->96 9.3-11.3 -> 7.0-7.9 ms), strided up to 128 input channels (96->256 s2
///   6.4-7.0 -> 5.4-5.7 ms; the copy into stride phases is then paid back).
/// - Backward-input at stride 1 (the forward kernel on the recast shape) up to 128 channels of `dy` (96->96:
///   9.4 -> 8.3 ms, since each band's epilogue runs while it is in cache); strided (by output phases) up to 128
///   (32->96 s2: 5.4-5.6 -> 4.0-4.8 ms; 96->256 s2 lost, 6.8-7.2 -> 7.7-8.6).
/// - Weight gradient up to 32 input channels at any stride (32->96 s2: 5.1 -> 4.0 ms); beyond, the `gemm` crate's
///   cache blocking wins (64->64 at 32x32: 1.25 ms by im2col, 1.8 direct; 96->96 even).
///
/// `shape` is the convolution the kernel computes (for a stride-1 backward-input, its recast as a forward).
///
/// On the Xeon the strided passes keep the direct kernels only up to [`Family::strided_direct_channels`].
fn direct_wins(shape: &Conv2dShape, pass: Pass, family: Family) -> bool {
    let wide = !shape.is_pointwise() && shape.out_w() >= 32;
    let strided_limit = family.strided_direct_channels().filter(|_| shape.stride > 1);
    if strided_limit.is_some_and(|most| shape.c > most) {
        return false;
    }
    match pass {
        Pass::Forward if shape.stride == 1 || shape.c <= 128 => wide && shape.o >= 8,
        Pass::Forward | Pass::BackwardInput => {
            wide && shape.o >= 8 && shape.c <= if shape.stride == 1 { 128 } else { 32 }
        }
        Pass::BackwardWeight => wide && shape.c <= 32,
    }
}

/// Scratch of a direct pass over `shape` (as `run_direct` cuts it): the packed weight (`packed_len`), then each
/// image running at once's own (`image_scratch(threads inside the image)`).
fn direct_pass_scratch_len(
    shape: &Conv2dShape,
    threads: ConvThreads,
    packed_len: usize,
    image_scratch: impl Fn(usize) -> usize,
) -> usize {
    let plan = plan(shape, threads);
    packed_len + plan.workers * image_scratch(plan.gemm_threads)
}

/// Scratch of the forward kernel `K` on `computed` (a forward, or a backward-input recast as one): the packed
/// weight, then each image running at once's own.
fn forward_kernel_scratch_len<K: ForwardKernel>(computed: &Conv2dShape, threads: ConvThreads) -> usize {
    direct_pass_scratch_len(computed, threads, (K::PACKED_LEN)(computed), |t| (K::IMAGE_SCRATCH_LEN)(computed, t))
}

/// Scratch the kernel chosen for this pass needs on f32 data (none for im2col, which the callers size).
fn chosen_kernel_scratch_len(shape: &Conv2dShape, threads: ConvThreads, pass: Pass) -> usize {
    match (choose(shape, threads, pass), pass) {
        (Choice::Im2col, _) => 0,
        (Choice::Direct { .. }, Pass::BackwardWeight) => direct::backward_weight_scratch_len(shape),
        (Choice::Winograd { .. }, Pass::BackwardWeight) => winograd::backward_weight_scratch_len(shape),
        (Choice::Direct { computed }, _) => forward_kernel_scratch_len::<DirectKernel>(&computed, threads),
        (Choice::Winograd { computed }, _) => forward_kernel_scratch_len::<WinogradKernel>(&computed, threads),
        (Choice::DirectStrided, _) => {
            let packed = direct::strided_backward_input_packed_len(shape);
            direct_pass_scratch_len(shape, threads, packed, |t| direct::strided_backward_input_scratch_len(shape, t))
        }
    }
}

/// Scratch elements `conv2d_forward` needs for this shape and threading.
pub fn conv2d_forward_scratch_len(shape: &Conv2dShape, threads: ConvThreads) -> usize {
    // f64 data takes im2col even where a faster f32 kernel runs, so the scratch serves either.
    let im2col = plan(shape, threads).workers * shape.cols_len();
    im2col.max(chosen_kernel_scratch_len(shape, threads, Pass::Forward))
}

/// Scratch elements `conv2d_backward_input` needs for this shape and threading.
pub fn conv2d_backward_input_scratch_len(shape: &Conv2dShape, threads: ConvThreads) -> usize {
    let im2col = plan(shape, threads).workers * shape.cols_len();
    im2col.max(chosen_kernel_scratch_len(shape, threads, Pass::BackwardInput))
}

/// How many partial weight gradients `conv2d_backward_weight` sums: a function of the shape only, so the
/// result has the same bits whatever the thread count (a resumed run stays bit-exact on another machine).
fn weight_grad_groups(shape: &Conv2dShape) -> usize {
    shape.n.clamp(1, 2)
}

/// Whether the groups run in parallel (each with its own im2col buffer), or one after another.
fn weight_grad_parallel(shape: &Conv2dShape, threads: ConvThreads) -> bool {
    plan(shape, threads).workers >= 2 && weight_grad_groups(shape) == 2
}

/// Scratch elements `conv2d_backward_weight` needs: a partial weight gradient (transposed, see
/// `conv2d_backward_weight`) per image group, and an im2col buffer per group running at once.
pub fn conv2d_backward_weight_scratch_len(shape: &Conv2dShape, threads: ConvThreads) -> usize {
    let buffers = if weight_grad_parallel(shape, threads) { weight_grad_groups(shape) } else { 1 };
    let im2col = weight_grad_groups(shape) * shape.weight_len() + buffers * shape.cols_len();
    im2col.max(chosen_kernel_scratch_len(shape, threads, Pass::BackwardWeight))
}

/// Work on a convolution's output while it is in cache (a fused epilogue).
pub trait ConvEpilogue<T>: Sync {
    /// Called by `conv2d_forward` once per image and block of output rows, right after that block's product, and
    /// by `conv2d_backward_input` once per image, after its col2im. Calls may run at the same time (for different
    /// images).
    fn apply(&self, call: EpilogueCall<'_, T>);
}

/// One call of a [`ConvEpilogue`].
pub struct EpilogueCall<'a, T> {
    /// The image.
    pub image: usize,
    /// Its output rows that are final, in every channel.
    pub rows: Range<usize>,
    /// The image's whole output (`channels × rows × width`).
    pub out_n: &'a mut [T],
    /// A scratch slot that no call running at the same time uses (below the thread count).
    pub slot: usize,
    /// Threads this call may spread over; it then owns slots `slot..slot + threads`.
    pub threads: usize,
}

/// `y = conv(x, w) + bias`. `x` is `[N, C, H, W]`, `w` is `[O, C, kh, kw]`, `bias` is `[O]`,
/// `y` is `[N, O, Ho, Wo]` and is overwritten.
pub fn conv2d_forward<T: Float>(
    shape: &Conv2dShape,
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    y: &mut [T],
    scratch: &mut [T],
    threads: ConvThreads,
) -> Result<()> {
    conv2d_forward_then(shape, (x, w, bias), y, scratch, threads, None)
}

/// [`conv2d_forward`], then `epilogue` on each block of output rows as soon as it is computed.
pub fn conv2d_forward_then<T: Float>(
    shape: &Conv2dShape,
    (x, w, bias): (&[T], &[T], Option<&[T]>),
    y: &mut [T],
    scratch: &mut [T],
    threads: ConvThreads,
    epilogue: Option<&dyn ConvEpilogue<T>>,
) -> Result<()> {
    shape.validate()?;
    check_len("x", x.len(), shape.x_len())?;
    check_len("weight", w.len(), shape.weight_len())?;
    check_len("y", y.len(), shape.y_len())?;
    if let Some(bias) = bias {
        check_len("bias", bias.len(), shape.o)?;
    }
    let plan = plan(shape, threads);
    check_scratch(scratch.len(), conv2d_forward_scratch_len(shape, threads))?;
    let choice = choose(shape, threads, Pass::Forward);
    if choice != Choice::Im2col {
        if let (Some(x), Some(w)) = (as_f32(x), as_f32(w)) {
            let bias = bias.map(|b| as_f32(b).ok_or_else(|| Error::msg("conv2d: bias of another type than x")));
            let bias = bias.transpose()?;
            return run_forward_kernel(choice, (x, KernelWeight::Own(w), bias), y, scratch, threads, epilogue);
        }
    }

    let x_img = shape.c * shape.h * shape.w;
    let (pixels, wo) = (shape.out_pixels(), shape.out_w());
    let w_mat = MatRef::new(w, shape.patch_len());
    let one_image = |n: usize, y_n: &mut [T], cols: &mut [T], gemm_threads: usize, slot: usize| -> Result<()> {
        let x_n = &x[n * x_img..(n + 1) * x_img];
        // The bias goes in first so the products can accumulate onto it: no second pass over y.
        if let Some(bias) = bias {
            for (row, &b) in y_n.chunks_exact_mut(pixels).zip(bias) {
                row.fill(b);
            }
        }
        for (first, end) in shape.blocks() {
            let block = (end - first) * wo;
            let cols_mat = unrolled(shape, x_n, first, end, cols, gemm_threads);
            let y_block = MatMut::new(&mut y_n[first * wo..], pixels);
            let dims = GemmDims::new(shape.o, block, shape.patch_len());
            matmul(dims, w_mat, cols_mat, y_block, bias.is_some(), gemm_threads)?;
            if let Some(e) = epilogue {
                e.apply(EpilogueCall { image: n, rows: first..end, out_n: y_n, slot, threads: gemm_threads });
            }
        }
        Ok(())
    };
    for_each_image(shape.n, plan, y, shape.o * pixels, scratch, shape.cols_len(), one_image)
}

/// The im2col matrix of output rows `first..end` of image `x_n`, as a product operand
/// (`C·kh·kw × pixels`): unrolled into `cols`, or, for a pointwise convolution, `x_n` itself.
fn unrolled<'a, T: Float>(
    shape: &Conv2dShape,
    x_n: &'a [T],
    first: usize,
    end: usize,
    cols: &'a mut [T],
    threads: usize,
) -> MatRef<'a, T> {
    if shape.is_pointwise() {
        return MatRef::new(x_n, shape.out_pixels());
    }
    let block = (end - first) * shape.out_w();
    im2col(shape, x_n, first, end, cols, threads);
    MatRef::new(&cols[..shape.patch_len() * block], block)
}

/// `dx = ∂L/∂x` given `dy = ∂L/∂y` and the weight; `dx` is `[N, C, H, W]` and is overwritten.
pub fn conv2d_backward_input<T: Float>(
    shape: &Conv2dShape,
    dy: &[T],
    w: &[T],
    dx: &mut [T],
    scratch: &mut [T],
    threads: ConvThreads,
) -> Result<()> {
    conv2d_backward_input_then(shape, (dy, w), dx, scratch, threads, None)
}

/// [`conv2d_backward_input`], then `epilogue` on each image's dx as soon as it is complete.
pub fn conv2d_backward_input_then<T: Float>(
    shape: &Conv2dShape,
    (dy, w): (&[T], &[T]),
    dx: &mut [T],
    scratch: &mut [T],
    threads: ConvThreads,
    epilogue: Option<&dyn ConvEpilogue<T>>,
) -> Result<()> {
    shape.validate()?;
    check_len("dy", dy.len(), shape.y_len())?;
    check_len("weight", w.len(), shape.weight_len())?;
    check_len("dx", dx.len(), shape.x_len())?;
    let plan = plan(shape, threads);
    check_scratch(scratch.len(), conv2d_backward_input_scratch_len(shape, threads))?;
    let choice = choose(shape, threads, Pass::BackwardInput);
    if choice != Choice::Im2col {
        if let (Some(dy), Some(w)) = (as_f32(dy), as_f32(w)) {
            return match choice {
                Choice::DirectStrided => direct_strided_backward_input(shape, (dy, w), dx, scratch, threads, epilogue),
                // The forward kernels compute the recast shape with the flipped weight.
                _ => {
                    let weight = KernelWeight::Flipped { original: shape, w };
                    run_forward_kernel(choice, (dy, weight, None), dx, scratch, threads, epilogue)
                }
            };
        }
    }

    let x_img = shape.c * shape.h * shape.w;
    let (pixels, wo) = (shape.out_pixels(), shape.out_w());
    let y_img = shape.o * pixels;
    let w_t = MatRef::transposed(w, shape.patch_len());
    let one_image = |n: usize, dx_n: &mut [T], dcols: &mut [T], gemm_threads: usize, slot: usize| -> Result<()> {
        let dy_n = &dy[n * y_img..(n + 1) * y_img];
        if shape.is_pointwise() {
            let dims = GemmDims::new(shape.c, pixels, shape.o);
            matmul(dims, w_t, MatRef::new(dy_n, pixels), MatMut::new(dx_n, pixels), false, gemm_threads)?;
        } else {
            // Blocks of output rows overlap in the input rows they read, so their col2im adds up.
            dx_n.fill(T::ZERO);
            for (first, end) in shape.blocks() {
                let block = (end - first) * wo;
                let dcols = &mut dcols[..shape.patch_len() * block];
                let dims = GemmDims::new(shape.patch_len(), block, shape.o);
                let dy_block = MatRef::new(&dy_n[first * wo..], pixels);
                matmul(dims, w_t, dy_block, MatMut::new(dcols, block), false, gemm_threads)?;
                col2im_add(shape, dcols, first, end, dx_n, gemm_threads);
            }
        }
        // dx_n is complete only now: every block of output rows adds into overlapping input rows.
        if let Some(e) = epilogue {
            e.apply(EpilogueCall { image: n, rows: 0..shape.h, out_n: dx_n, slot, threads: gemm_threads });
        }
        Ok(())
    };
    for_each_image(shape.n, plan, dx, x_img, scratch, shape.cols_len(), one_image)
}

/// `dw = ∂L/∂w` given the input `x` and `dy`; `dw` is `[O, C, kh, kw]` and is overwritten.
pub fn conv2d_backward_weight<T: Float>(
    shape: &Conv2dShape,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
    scratch: &mut [T],
    threads: ConvThreads,
) -> Result<()> {
    shape.validate()?;
    check_len("x", x.len(), shape.x_len())?;
    check_len("dy", dy.len(), shape.y_len())?;
    check_len("dw", dw.len(), shape.weight_len())?;
    let plan = plan(shape, threads);
    check_scratch(scratch.len(), conv2d_backward_weight_scratch_len(shape, threads))?;
    if shape.n == 0 {
        dw.fill(T::ZERO);
        return Ok(());
    }
    let choice = choose(shape, threads, Pass::BackwardWeight);
    if choice != Choice::Im2col {
        if let (Some(x), Some(dy), Some(dw)) = (as_f32(x), as_f32(dy), as_f32_mut(dw)) {
            let scratch = f32_scratch(scratch)?;
            return match choice.kernel() {
                ConvKernel::Winograd => winograd::backward_weight(shape, x, dy, dw, scratch, threads.threads),
                _ => direct::backward_weight(shape, x, dy, dw, scratch, threads.threads),
            };
        }
    }

    let x_img = shape.c * shape.h * shape.w;
    let y_img = shape.o * shape.out_pixels();
    let cols_len = shape.cols_len();
    let w_len = shape.weight_len();
    if w_len == 0 {
        return Ok(());
    }
    // The products are formed transposed, dwᵀ = Σ_n cols_n · dy_nᵀ (`C·kh·kw × O`), and transposed once
    // at the end. The direct form dy_n · cols_nᵀ makes the `gemm` crate pack the whole im2col matrix
    // with a transposing gather, which for few output channels costs more than the product: measured
    // 64 vs 200 GFLOP/s for O=64, C·kh·kw=576, Ho·Wo=1024 (see BENCHMARKS.md).
    let (pixels, wo) = (shape.out_pixels(), shape.out_w());
    // Sums cols · dyᵀ over images `first..last` and their row blocks into `dw_t` (overwriting it).
    let images = |first: usize, last: usize, dw_t: &mut [T], cols: &mut [T], gemm_threads: usize| -> Result<()> {
        let mut accumulate = false;
        for n in first..last {
            let x_n = &x[n * x_img..(n + 1) * x_img];
            let dy_n = &dy[n * y_img..(n + 1) * y_img];
            for (row_first, row_end) in shape.blocks() {
                let block = (row_end - row_first) * wo;
                let cols_mat = unrolled(shape, x_n, row_first, row_end, cols, gemm_threads);
                let dy_block_t = MatRef::transposed(&dy_n[row_first * wo..], pixels);
                let dims = GemmDims::new(shape.patch_len(), shape.o, block);
                matmul(dims, cols_mat, dy_block_t, MatMut::new(dw_t, shape.o), accumulate, gemm_threads)?;
                accumulate = true;
            }
        }
        Ok(())
    };

    // The images are split into a fixed number of groups (by shape alone); each group sums its images into its
    // own partial, and the partials are added in group order: the same additions whatever the thread count.
    let groups = weight_grad_groups(shape);
    let per_group = shape.n.div_ceil(groups);
    let parallel = weight_grad_parallel(shape, threads);
    let (partials, cols_all) = scratch.split_at_mut(groups * w_len);
    let group_range = |g: usize| ((g * per_group).min(shape.n), ((g + 1) * per_group).min(shape.n));
    let run_group = |(g, partial): (usize, &mut [T]), cols: &mut [T], gemm_threads: usize| -> Result<()> {
        let (first, last) = group_range(g);
        if first == last {
            partial.fill(T::ZERO);
            return Ok(());
        }
        images(first, last, partial, cols, gemm_threads)
    };
    if parallel {
        // One im2col buffer per group (none at all for convolutions that need no im2col).
        let cols_bufs: Vec<&mut [T]> = if cols_len == 0 {
            (0..groups).map(|_| <&mut [T]>::default()).collect()
        } else {
            cols_all.chunks_mut(cols_len).take(groups).collect()
        };
        partials
            .par_chunks_mut(w_len)
            .zip(cols_bufs)
            .enumerate()
            .try_for_each(|(g, (partial, cols))| run_group((g, partial), cols, 1))?;
    } else {
        let cols = &mut cols_all[..cols_len];
        for (g, partial) in partials.chunks_mut(w_len).enumerate() {
            run_group((g, partial), cols, plan.gemm_threads)?;
        }
    }
    // The partials summed in group order and transposed into dw, in one pass over the threads.
    sum_transposed(partials, shape.patch_len(), shape.o, dw, threads_or_one(threads.threads));
    Ok(())
}

/// `dst` (`cols × rows`) = `Σ_g src_g` transposed, where `partials` holds the `src_g` (`rows × cols` each, row-major)
/// one after another: `dst[c][r] = ((src_0[r][c] + src_1[r][c]) + …)`, the additions of summing the partials one
/// by one, so the same bits whatever the thread count. One pass instead of a sum and then a transpose on one thread
/// (together 40% of a 128->128 8x8 weight gradient): each thread takes a block of `TILE` `dst` rows, sums each
/// source row's `TILE` columns in a buffer (contiguous reads, which vectorise) and writes them down the block's
/// rows. Measured alone on 1152 × 128 from two partials: 172 µs as sum-then-transpose, 161 µs on one thread, 135 µs
/// on two.
fn sum_transposed<T: Float>(partials: &[T], rows: usize, cols: usize, dst: &mut [T], threads: usize) {
    const TILE: usize = 32;
    let len = rows * cols;
    if len == 0 {
        return;
    }
    let groups = partials.len() / len;
    let block = |(b, dst_rows): (usize, &mut [T])| {
        let width = dst_rows.len() / rows;
        for r in 0..rows {
            let at = r * cols + b * TILE;
            let mut sum = [T::ZERO; TILE];
            sum[..width].copy_from_slice(&partials[at..at + width]);
            for g in 1..groups {
                for (s, &p) in sum.iter_mut().zip(&partials[g * len + at..][..width]) {
                    *s += p;
                }
            }
            for (k, &s) in sum[..width].iter().enumerate() {
                dst_rows[k * rows + r] = s;
            }
        }
    };
    if threads > 1 {
        dst[..len].par_chunks_mut(TILE * rows).enumerate().for_each(block);
    } else {
        dst[..len].chunks_mut(TILE * rows).enumerate().for_each(block);
    }
}

/// `db = ∂L/∂bias`: `dy` summed over the batch and the output pixels. `db` is `[O]`, overwritten.
pub fn conv2d_backward_bias<T: Float>(shape: &Conv2dShape, dy: &[T], db: &mut [T]) -> Result<()> {
    shape.validate()?;
    check_len("dy", dy.len(), shape.y_len())?;
    check_len("db", db.len(), shape.o)?;
    db.fill(T::ZERO);
    let pixels = shape.out_pixels();
    if pixels == 0 {
        return Ok(());
    }
    for image in dy.chunks_exact(shape.o * pixels) {
        for (d, row) in db.iter_mut().zip(image.chunks_exact(pixels)) {
            *d += super::elementwise::sum_slice(row);
        }
    }
    Ok(())
}

/// The scratch as f32 (the direct kernels run only on f32 data, whose scratch is f32).
fn f32_scratch<T: Float>(scratch: &mut [T]) -> Result<&mut [f32]> {
    as_f32_mut(scratch).ok_or_else(|| Error::msg("conv2d: direct kernels on a scratch that is not f32"))
}

/// How a direct pass runs: the packed weight's length and how to fill it, the scratch one image needs on a given
/// number of threads, and how to compute one image (input image, packed weight, output image as f32, scratch,
/// threads, what to call as rows are final).
struct DirectPass<P, S, I> {
    packed_len: usize,
    pack: P,
    image_scratch: S,
    image: I,
}

/// Runs a direct pass over every image of `out` (`channels × rows × width` each), images spread over threads as
/// im2col's plan for `shape` spreads them, the epilogue on each band of rows as the pass finishes it.
fn run_direct<T: Float, P, S, I>(
    shape: &Conv2dShape,
    pass: DirectPass<P, S, I>,
    (out, out_img): (&mut [T], usize),
    scratch: &mut [T],
    threads: ConvThreads,
    epilogue: Option<&dyn ConvEpilogue<T>>,
) -> Result<()>
where
    P: FnOnce(&mut [f32]) -> Result<()>,
    S: Fn(usize) -> usize,
    I: Fn(usize, &[f32], &mut [f32], &mut [f32], usize, direct::RowsDone<'_>) -> Result<()> + Sync,
{
    let plan = plan(shape, threads);
    check_scratch(scratch.len(), pass.packed_len)?;
    let (packed, rest) = scratch.split_at_mut(pass.packed_len);
    let packed = f32_scratch(packed)?;
    (pass.pack)(packed)?;
    let packed = &*packed;
    let image = &pass.image;
    let one_image = |n: usize, out_n: &mut [T], scratch: &mut [T], threads: usize, slot: usize| -> Result<()> {
        let out32 =
            as_f32_mut(out_n).ok_or_else(|| Error::msg("conv2d: direct kernels on an output that is not f32"))?;
        let mut done = |out32: &mut [f32], rows: Range<usize>| {
            if let Some(e) = epilogue {
                // The output is f32 (it was f32 above), so it goes back to the epilogue's type unchanged.
                if let Some(out_n) = from_f32_mut::<T>(out32) {
                    e.apply(EpilogueCall { image: n, rows, out_n, slot, threads });
                }
            }
        };
        image(n, packed, out32, f32_scratch(scratch)?, threads, &mut done)
    };
    for_each_image(shape.n, plan, out, out_img, rest, (pass.image_scratch)(plan.gemm_threads), one_image)
}

/// The weight a forward kernel computes with: the convolution's own (`O × C × kh × kw`), or, for a stride-1
/// backward-input recast as a forward (`direct::backward_input_as_forward`), the weight of the `original`
/// convolution, which the kernel reads flipped and transposed.
#[derive(Clone, Copy)]
enum KernelWeight<'a> {
    Own(&'a [f32]),
    Flipped { original: &'a Conv2dShape, w: &'a [f32] },
}

/// A kernel that computes a forward convolution (or a stride-1 backward-input recast as one) on f32 data an image
/// at a time from a packed weight: the direct kernels and Winograd present the same interface, so one
/// [`DirectPass`] serves both.
trait ForwardKernel {
    /// Elements of the packed weight.
    const PACKED_LEN: fn(&Conv2dShape) -> usize;
    /// Scratch of one image on a number of threads.
    const IMAGE_SCRATCH_LEN: fn(&Conv2dShape, usize) -> usize;
    /// One image: (input, packed weight, bias), output, scratch, threads, what to call as rows are final.
    const IMAGE: ForwardImage;
    fn pack(s: &Conv2dShape, weight: KernelWeight<'_>, packed: &mut [f32], threads: usize) -> Result<()>;
}

/// The image function both forward kernels share the signature of (`direct_conv::forward_image`).
type ForwardImage = fn(
    &Conv2dShape,
    (&[f32], &[f32], Option<&[f32]>),
    &mut [f32],
    &mut [f32],
    usize,
    direct::RowsDone<'_>,
) -> Result<()>;

/// The direct forward kernel (`direct_conv.rs`).
struct DirectKernel;

impl ForwardKernel for DirectKernel {
    const PACKED_LEN: fn(&Conv2dShape) -> usize = direct::packed_weight_len;
    const IMAGE_SCRATCH_LEN: fn(&Conv2dShape, usize) -> usize = direct::planes_scratch_len;
    const IMAGE: ForwardImage = direct::forward_image;
    fn pack(s: &Conv2dShape, weight: KernelWeight<'_>, packed: &mut [f32], _: usize) -> Result<()> {
        match weight {
            KernelWeight::Own(w) => direct::pack_weight(s, |o, t| w[o * s.patch_len() + t], packed),
            KernelWeight::Flipped { original, w } => {
                direct::pack_weight(s, direct::flipped_weight(original, w), packed)
            }
        }
    }
}

/// Winograd F(2×2, 3×3) (`winograd.rs`).
struct WinogradKernel;

impl ForwardKernel for WinogradKernel {
    const PACKED_LEN: fn(&Conv2dShape) -> usize = winograd::packed_weight_len;
    const IMAGE_SCRATCH_LEN: fn(&Conv2dShape, usize) -> usize = winograd::scratch_len;
    const IMAGE: ForwardImage = winograd::forward_image;
    fn pack(s: &Conv2dShape, weight: KernelWeight<'_>, packed: &mut [f32], threads: usize) -> Result<()> {
        let filters = match weight {
            KernelWeight::Own(w) => winograd::Filters::forward(s, w),
            KernelWeight::Flipped { original, w } => winograd::Filters::backward_input(original, w),
        };
        winograd::pack_weight(s, filters, packed, threads)
    }
}

/// Runs the forward kernel `choice` names on the convolution it computes, of `x` with `weight`, into `y`.
fn run_forward_kernel<T: Float>(
    choice: Choice,
    inputs: (&[f32], KernelWeight<'_>, Option<&[f32]>),
    y: &mut [T],
    scratch: &mut [T],
    threads: ConvThreads,
    epilogue: Option<&dyn ConvEpilogue<T>>,
) -> Result<()> {
    match choice {
        Choice::Direct { computed } => {
            forward_pass::<DirectKernel, T>(&computed, inputs, y, scratch, threads, epilogue)
        }
        Choice::Winograd { computed } => {
            forward_pass::<WinogradKernel, T>(&computed, inputs, y, scratch, threads, epilogue)
        }
        Choice::Im2col | Choice::DirectStrided => {
            Err(Error::msg(format!("conv2d: {choice:?} is not a forward kernel")))
        }
    }
}

/// The forward convolution `shape` of `x` with `weight` into `y` by the kernel `K`.
fn forward_pass<K: ForwardKernel, T: Float>(
    shape: &Conv2dShape,
    (x, weight, bias): (&[f32], KernelWeight<'_>, Option<&[f32]>),
    y: &mut [T],
    scratch: &mut [T],
    threads: ConvThreads,
    epilogue: Option<&dyn ConvEpilogue<T>>,
) -> Result<()> {
    let x_img = shape.c * shape.h * shape.w;
    let pass = DirectPass {
        packed_len: (K::PACKED_LEN)(shape),
        pack: |packed: &mut [f32]| K::pack(shape, weight, packed, threads.threads),
        image_scratch: |threads| (K::IMAGE_SCRATCH_LEN)(shape, threads),
        image: |n: usize,
                packed: &[f32],
                y_n: &mut [f32],
                scratch: &mut [f32],
                threads: usize,
                done: direct::RowsDone<'_>| {
            (K::IMAGE)(shape, (&x[n * x_img..(n + 1) * x_img], packed, bias), y_n, scratch, threads, done)
        },
    };
    run_direct(shape, pass, (y, shape.o * shape.out_pixels()), scratch, threads, epilogue)
}

/// The direct backward-input of the strided convolution `shape` (see `direct_conv::strided_backward_input_image`).
fn direct_strided_backward_input<T: Float>(
    shape: &Conv2dShape,
    (dy, w): (&[f32], &[f32]),
    dx: &mut [T],
    scratch: &mut [T],
    threads: ConvThreads,
    epilogue: Option<&dyn ConvEpilogue<T>>,
) -> Result<()> {
    let y_img = shape.o * shape.out_pixels();
    let pass = DirectPass {
        packed_len: direct::strided_backward_input_packed_len(shape),
        pack: |packed: &mut [f32]| direct::pack_strided_backward_input(shape, w, packed),
        image_scratch: |threads| direct::strided_backward_input_scratch_len(shape, threads),
        image: |n: usize,
                packed: &[f32],
                dx_n: &mut [f32],
                scratch: &mut [f32],
                threads: usize,
                done: direct::RowsDone<'_>| {
            let dy_n = &dy[n * y_img..(n + 1) * y_img];
            direct::strided_backward_input_image(shape, (dy_n, packed), dx_n, scratch, threads, done)
        },
    };
    run_direct(shape, pass, (dx, shape.c * shape.h * shape.w), scratch, threads, epilogue)
}

/// Runs `one_image(n, out_n, scratch_n, gemm_threads, worker)` for every image: one after another, or
/// `plan.workers` images at a time, each worker owning a contiguous run of images and a scratch slice.
fn for_each_image<T: Float>(
    images: usize,
    plan: Plan,
    out: &mut [T],
    out_img: usize,
    scratch: &mut [T],
    scratch_img: usize,
    one_image: impl Fn(usize, &mut [T], &mut [T], usize, usize) -> Result<()> + Sync,
) -> Result<()> {
    if images == 0 || out_img == 0 {
        return Ok(());
    }
    if plan.workers == 1 {
        let scratch = &mut scratch[..scratch_img];
        for (n, out_n) in out.chunks_exact_mut(out_img).enumerate() {
            one_image(n, out_n, scratch, plan.gemm_threads, 0)?;
        }
        return Ok(());
    }
    let per_worker = images.div_ceil(plan.workers);
    let workers = images.div_ceil(per_worker);
    let run = |worker: usize, out_run: &mut [T], scratch_w: &mut [T]| -> Result<()> {
        for (i, out_n) in out_run.chunks_exact_mut(out_img).enumerate() {
            one_image(worker * per_worker + i, out_n, scratch_w, 1, worker)?;
        }
        Ok(())
    };
    let out_runs = out.par_chunks_mut(per_worker * out_img);
    if scratch_img == 0 {
        // Pointwise convolutions need no scratch (and slices cannot be cut into empty chunks).
        out_runs.enumerate().try_for_each(|(worker, out_run)| run(worker, out_run, &mut []))
    } else {
        let scratch_runs = scratch[..workers * scratch_img].par_chunks_mut(scratch_img);
        out_runs.zip(scratch_runs).enumerate().try_for_each(|(worker, (out_run, s))| run(worker, out_run, s))
    }
}

/// The output positions `o` in `0..out_len` whose input position `o·stride + offset - pad` lies
/// inside `0..in_len`, as a half-open range. `offset` is the kernel tap (row or column).
fn valid_outputs(offset: usize, pad: usize, stride: usize, in_len: usize, out_len: usize) -> (usize, usize) {
    // o·stride ≥ pad - offset
    let lo = if pad > offset { (pad - offset).div_ceil(stride) } else { 0 };
    // o·stride ≤ in_len + pad - offset - 1
    if in_len + pad <= offset {
        return (0, 0);
    }
    let hi = ((in_len + pad - offset - 1) / stride + 1).min(out_len);
    (lo.min(hi), hi)
}

/// Unrolls the receptive fields of output rows `first..end` of one image `x_n` (`C × H × W`) into
/// `cols` (`C·kh·kw × pixels`, pixels = (end - first)·Wo): row `(c, i, j)` holds input pixel
/// `(c, oy·s + i - p, ox·s + j - p)` for each output pixel `(oy, ox)`, zero where that is padding.
fn im2col<T: Float>(shape: &Conv2dShape, x_n: &[T], first: usize, end: usize, cols: &mut [T], threads: usize) {
    let wo = shape.out_w();
    let block = (end - first) * wo;
    let taps = shape.kh * shape.kw;
    let plane = shape.h * shape.w;
    let cols = &mut cols[..shape.patch_len() * block];
    let padded = SmallPadded::of(shape);
    // One channel's rows read only that channel's plane, so channels are independent work items.
    let channel = |(c, rows): (usize, &mut [T])| {
        let x_c = &x_n[c * plane..(c + 1) * plane];
        if let Some(padded) = padded {
            let p = padded.fill(shape, x_c);
            for (tap, row) in rows.chunks_exact_mut(block).enumerate() {
                let (i, j) = (tap / shape.kw, tap % shape.kw);
                for (oy, out_row) in (first..end).zip(row.chunks_exact_mut(wo)) {
                    copy_short(out_row, &p[padded.at(oy + i, j)..]);
                }
            }
            return;
        }
        for (tap, row) in rows.chunks_exact_mut(block).enumerate() {
            let (i, j) = (tap / shape.kw, tap % shape.kw);
            let (oy_lo, oy_hi) = valid_outputs(i, shape.padding, shape.stride, shape.h, shape.out_h());
            let (ox_lo, ox_hi) = valid_outputs(j, shape.padding, shape.stride, shape.w, wo);
            for (oy, out_row) in (first..end).zip(row.chunks_exact_mut(wo)) {
                if oy < oy_lo || oy >= oy_hi || ox_lo == ox_hi {
                    out_row.fill(T::ZERO);
                    continue;
                }
                let iy = oy * shape.stride + i - shape.padding;
                let x_row = &x_c[iy * shape.w..(iy + 1) * shape.w];
                out_row[..ox_lo].fill(T::ZERO);
                out_row[ox_hi..].fill(T::ZERO);
                // First input column read: ox_lo·s + j - p, which `valid_outputs` keeps ≥ 0.
                let ix0 = ox_lo * shape.stride + j - shape.padding;
                copy_strided(&mut out_row[ox_lo..ox_hi], &x_row[ix0..], shape.stride);
            }
        }
    };
    let per_channel = taps * block;
    if threads > 1 {
        cols.par_chunks_mut(per_channel).enumerate().for_each(channel);
    } else {
        cols.chunks_exact_mut(per_channel).enumerate().for_each(channel);
    }
}

/// Elements of the largest zero-padded plane [`SmallPadded`] keeps on the stack (16 KiB of f32).
const SMALL_PADDED_PLANE: usize = 4096;

/// A stride-1 convolution over a narrow map (under 32 columns): im2col copies each channel into a zero-padded plane
/// on the stack first, so that every row of every tap is one plain copy of `Wo` elements with no bounds to work out
/// (the padding supplies the zeros), and col2im adds into one the same way. Rows of 8 to 16 floats left the
/// per-row bounds, fills and `memmove` calls most of the work: measured alone, im2col of 128 channels at 8x8 took
/// 73 µs by rows and 29 µs through the padded plane, at 16x16 140 against 82; at 32x32 the rows won (159 against 192).
#[derive(Clone, Copy)]
struct SmallPadded {
    /// Row length of the padded plane.
    width: usize,
}

impl SmallPadded {
    fn of(s: &Conv2dShape) -> Option<SmallPadded> {
        let (height, width) = (s.h + 2 * s.padding, s.w + 2 * s.padding);
        let narrow = s.w > 0 && s.w < 32 && height * width <= SMALL_PADDED_PLANE;
        (s.stride == 1 && narrow).then_some(SmallPadded { width })
    }

    /// Where padded row `y`, column `x` starts.
    fn at(&self, y: usize, x: usize) -> usize {
        y * self.width + x
    }

    /// The plane `x_c` (`H × W`) with its zero padding.
    fn fill<T: Float>(&self, s: &Conv2dShape, x_c: &[T]) -> [T; SMALL_PADDED_PLANE] {
        let mut p = [T::ZERO; SMALL_PADDED_PLANE];
        for (y, x_row) in x_c.chunks_exact(s.w).enumerate() {
            let at = self.at(y + s.padding, s.padding);
            copy_short(&mut p[at..at + s.w], x_row);
        }
        p
    }
}

/// The adjoint of `im2col` for output rows `first..end`: adds every entry of `dcols`
/// (`C·kh·kw × pixels`) into `dx_n` (`C × H × W`) at the input pixel it was copied from.
fn col2im_add<T: Float>(shape: &Conv2dShape, dcols: &[T], first: usize, end: usize, dx_n: &mut [T], threads: usize) {
    let wo = shape.out_w();
    let block = (end - first) * wo;
    let taps = shape.kh * shape.kw;
    let plane = shape.h * shape.w;
    let padded = SmallPadded::of(shape);
    // Each channel's plane receives only from that channel's rows, so channels run independently.
    let channel = |(dx_c, rows): (&mut [T], &[T])| {
        if let Some(padded) = padded {
            // Into a zeroed padded plane with no bounds to work out (the padding takes what falls outside), then
            // its interior onto dx.
            let mut p = [T::ZERO; SMALL_PADDED_PLANE];
            for (tap, row) in rows.chunks_exact(block).enumerate() {
                let (i, j) = (tap / shape.kw, tap % shape.kw);
                for (oy, src) in (first..end).zip(row.chunks_exact(wo)) {
                    let at = padded.at(oy + i, j);
                    p[at..at + wo].iter_mut().zip(src).for_each(|(d, &g)| *d += g);
                }
            }
            for (y, dx_row) in dx_c.chunks_exact_mut(shape.w).enumerate() {
                let at = padded.at(y + shape.padding, shape.padding);
                dx_row.iter_mut().zip(&p[at..at + shape.w]).for_each(|(d, &g)| *d += g);
            }
            return;
        }
        for (tap, row) in rows.chunks_exact(block).enumerate() {
            let (i, j) = (tap / shape.kw, tap % shape.kw);
            let (oy_lo, oy_hi) = valid_outputs(i, shape.padding, shape.stride, shape.h, shape.out_h());
            let (ox_lo, ox_hi) = valid_outputs(j, shape.padding, shape.stride, shape.w, wo);
            if ox_lo == ox_hi {
                continue;
            }
            for oy in oy_lo.max(first)..oy_hi.min(end) {
                let iy = oy * shape.stride + i - shape.padding;
                let ix0 = ox_lo * shape.stride + j - shape.padding;
                let at = (oy - first) * wo;
                let src = &row[at + ox_lo..at + ox_hi];
                let dx_row = &mut dx_c[iy * shape.w..(iy + 1) * shape.w];
                add_strided(&mut dx_row[ix0..], src, shape.stride);
            }
        }
    };
    let per_channel = taps * block;
    let dcols = &dcols[..shape.patch_len() * block];
    if plane == 0 || per_channel == 0 {
        return;
    }
    if threads > 1 {
        dx_n.par_chunks_mut(plane).zip(dcols.par_chunks(per_channel)).for_each(channel);
    } else {
        dx_n.chunks_exact_mut(plane).zip(dcols.chunks_exact(per_channel)).for_each(channel);
    }
}

fn check_len(name: &str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::shape("conv2d", format!("{name} has {got} elements, the shape needs {expected}")));
    }
    Ok(())
}

fn check_scratch(got: usize, needed: usize) -> Result<()> {
    if got < needed {
        return Err(Error::shape("conv2d", format!("scratch has {got} elements, this convolution needs {needed}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv3(c: usize, o: usize, hw: usize, stride: usize) -> Conv2dShape {
        Conv2dShape { n: 2, c, h: hw, w: hw, o, kh: 3, kw: 3, stride, padding: 1 }
    }

    /// The measured rule of `Family::strided_direct_channels`: on the Xeon the strided passes keep the direct
    /// kernels only up to 16 input channels; on Zen 5 (and stride 1 anywhere) the choices are the first
    /// measurements'.
    #[test]
    fn strided_direct_kernels_stop_at_16_channels_on_intel_only() {
        let wide = conv3(32, 96, 128, 2);
        let narrow = conv3(16, 32, 256, 2);
        for pass in [Pass::Forward, Pass::BackwardWeight] {
            assert!(!direct_wins(&wide, pass, Family::Intel), "{pass:?}");
            assert!(direct_wins(&wide, pass, Family::Zen), "{pass:?}");
            assert!(direct_wins(&narrow, pass, Family::Intel), "{pass:?}");
            assert!(direct_wins(&narrow, pass, Family::Zen), "{pass:?}");
        }
        assert!(!direct_strided_wins(&wide, Family::Intel));
        assert!(direct_strided_wins(&wide, Family::Zen));
        assert!(direct_strided_wins(&narrow, Family::Intel));
        let unstrided = conv3(32, 32, 128, 1);
        for pass in [Pass::Forward, Pass::BackwardInput, Pass::BackwardWeight] {
            assert_eq!(direct_wins(&unstrided, pass, Family::Intel), direct_wins(&unstrided, pass, Family::Zen));
        }
    }
}
