//! The CPU GEMM and conv2d kernels against naive f64 references, adjoint identities and finite
//! differences.
//!
//! Error bounds: a dot product of length k computed in precision eps differs from the exact one by
//! at most about k·eps·Σ|a_i·b_i| (Higham's γ_k). The checks use that bound (times a small safety
//! factor) per element, so they cannot fail on rounding alone, yet any indexing mistake, which gives
//! errors of the size of the values themselves, fails them.

use zeroconv::engine::cpu::conv::{
    self, conv2d_backward_bias, conv2d_backward_input, conv2d_backward_input_scratch_len, conv2d_backward_weight,
    conv2d_backward_weight_scratch_len, conv2d_forward, conv2d_forward_scratch_len, Conv2dShape, ConvKernel,
    ConvMethod, ConvThreads,
};
use zeroconv::engine::cpu::float::Float;
use zeroconv::engine::cpu::gemm::{matmul, matmul_batched, Batch, GemmDims, MatMut, MatRef};
use zeroconv::Error;

/// xorshift64: deterministic values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn vec<T: Float>(&mut self, len: usize) -> Vec<T> {
        (0..len).map(|_| T::from_f64(self.next())).collect()
    }
}

fn to_f64<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

// ---------------------------------------------------------------------------------------------
// GEMM
// ---------------------------------------------------------------------------------------------

/// A GEMM case: sizes, layout, and what to do with C.
#[derive(Clone, Copy, Debug)]
struct GemmCase {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    /// Extra elements at the end of every stored row (leading dimension = width + pad).
    pad: usize,
    accumulate: bool,
    threads: usize,
}

/// Element (i, j) of op(X) where X is row-major with leading dimension `ld`.
fn at(x: &[f64], ld: usize, trans: bool, i: usize, j: usize) -> f64 {
    if trans {
        x[j * ld + i]
    } else {
        x[i * ld + j]
    }
}

/// Stored (rows, cols) of an operand whose logical shape is rows × cols.
fn stored(rows: usize, cols: usize, trans: bool) -> (usize, usize) {
    if trans {
        (cols, rows)
    } else {
        (rows, cols)
    }
}

/// Runs one case in precision T and checks every element of C against the f64 triple loop, and that
/// the row padding of C is untouched.
fn check_gemm<T: Float>(case: GemmCase, seed: u64) {
    let GemmCase { m, n, k, trans_a, trans_b, pad, accumulate, threads } = case;
    let mut rng = Rng::new(seed);
    let (a_rows, a_cols) = stored(m, k, trans_a);
    let (b_rows, b_cols) = stored(k, n, trans_b);
    let (lda, ldb, ldc) = (a_cols + pad, b_cols + pad, n + pad);
    // Padding holds NaN in A and B so that a kernel reading it poisons the result.
    let padded = |rng: &mut Rng, rows: usize, cols: usize, ld: usize| -> Vec<T> {
        let mut v: Vec<T> = rng.vec(rows * ld);
        for r in 0..rows {
            for x in &mut v[r * ld + cols..(r + 1) * ld] {
                *x = T::from_f64(f64::NAN);
            }
        }
        v
    };
    let a = padded(&mut rng, a_rows, a_cols, lda);
    let b = padded(&mut rng, b_rows, b_cols, ldb);
    let c0: Vec<T> = rng.vec(m * ldc);
    let mut c = c0.clone();
    matmul(
        GemmDims::new(m, n, k),
        MatRef { data: &a, ld: lda, trans: trans_a },
        MatRef { data: &b, ld: ldb, trans: trans_b },
        MatMut::new(&mut c, ldc),
        accumulate,
        threads,
    )
    .unwrap_or_else(|e| panic!("{case:?}: {e}"));

    let (a64, b64, c064) = (to_f64(&a), to_f64(&b), to_f64(&c0));
    let eps = T::EPSILON.to_f64();
    for i in 0..m {
        for j in 0..n {
            let (mut exact, mut magnitude) = (0.0, 0.0);
            for p in 0..k {
                let prod = at(&a64, lda, trans_a, i, p) * at(&b64, ldb, trans_b, p, j);
                exact += prod;
                magnitude += prod.abs();
            }
            if accumulate {
                exact += c064[i * ldc + j];
                magnitude += c064[i * ldc + j].abs();
            }
            let got = c[i * ldc + j].to_f64();
            let bound = 2.0 * (k as f64 + 2.0) * eps * magnitude + f64::MIN_POSITIVE;
            assert!((got - exact).abs() <= bound, "{case:?} C[{i},{j}] = {got}, expected {exact} (bound {bound})");
        }
        for j in n..ldc {
            assert_eq!(c[i * ldc + j].to_f64(), c064[i * ldc + j], "{case:?}: padding C[{i},{j}] was written");
        }
    }
}

#[test]
fn gemm_matches_naive_for_every_transpose_and_odd_sizes() {
    let sizes = [1, 7, 33, 129];
    let mut seed = 0;
    for &m in &sizes {
        for &n in &sizes {
            for &k in &sizes {
                for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
                    seed += 1;
                    // Vary layout, accumulation and threads across cases rather than multiply them out.
                    let pad = [0, 3, 17][seed as usize % 3];
                    let accumulate = seed % 2 == 0;
                    let threads = 1 + (seed as usize / 2) % 2;
                    let case = GemmCase { m, n, k, trans_a, trans_b, pad, accumulate, threads };
                    check_gemm::<f64>(case, seed);
                    check_gemm::<f32>(case, seed);
                }
            }
        }
    }
}

#[test]
fn gemm_accumulate_and_overwrite_both_hold_with_padded_leading_dimensions() {
    for accumulate in [false, true] {
        for threads in [1, 2] {
            for (trans_a, trans_b) in [(false, false), (true, true)] {
                let case = GemmCase { m: 65, n: 47, k: 129, trans_a, trans_b, pad: 5, accumulate, threads };
                check_gemm::<f64>(case, 7);
                check_gemm::<f32>(case, 8);
            }
        }
    }
}

#[test]
fn gemm_with_empty_inner_dimension_zeroes_or_keeps_c() {
    let a: Vec<f64> = vec![];
    let b: Vec<f64> = vec![];
    let mut c = vec![5.0f64; 6];
    let dims = GemmDims::new(2, 3, 0);
    matmul(dims, MatRef::new(&a, 0), MatRef::new(&b, 3), MatMut::new(&mut c, 3), true, 1).unwrap();
    assert_eq!(c, vec![5.0; 6], "C += A·B with k = 0 must leave C unchanged");
    matmul(dims, MatRef::new(&a, 0), MatRef::new(&b, 3), MatMut::new(&mut c, 3), false, 1).unwrap();
    assert_eq!(c, vec![0.0; 6], "C = A·B with k = 0 must zero C");
}

/// Batched products against per-member naive products, covering: a shared right operand with
/// back-to-back members (folded into one tall product), a shared right operand with gaps or
/// transposed left operands (not foldable), per-member right operands, and both thread splits.
fn check_batched<T: Float>(count: usize, shared_b: bool, trans_a: bool, gap: usize, threads: usize, seed: u64) {
    let (m, n, k) = (9, 13, 21);
    let mut rng = Rng::new(seed);
    let (a_rows, a_cols) = stored(m, k, trans_a);
    let (lda, ldb, ldc) = (a_cols, n, n);
    let a_stride = a_rows * lda + gap;
    let b_stride = if shared_b { 0 } else { k * ldb + gap };
    let c_stride = m * ldc + gap;
    let a: Vec<T> = rng.vec(count * a_stride);
    let b: Vec<T> = rng.vec(if shared_b { k * ldb } else { count * b_stride });
    let mut c = vec![T::from_f64(7.0); count * c_stride];
    let batch = Batch { count, a_stride, b_stride, c_stride };
    matmul_batched(
        batch,
        GemmDims::new(m, n, k),
        MatRef { data: &a, ld: lda, trans: trans_a },
        MatRef::new(&b, ldb),
        MatMut::new(&mut c, ldc),
        false,
        threads,
    )
    .unwrap();

    let (a64, b64) = (to_f64(&a), to_f64(&b));
    let eps = T::EPSILON.to_f64();
    for member in 0..count {
        let a_i = &a64[member * a_stride..];
        let b_i = &b64[member * b_stride..];
        for i in 0..m {
            for j in 0..n {
                let (mut exact, mut magnitude) = (0.0, 0.0);
                for p in 0..k {
                    let prod = at(a_i, lda, trans_a, i, p) * at(b_i, ldb, false, p, j);
                    exact += prod;
                    magnitude += prod.abs();
                }
                let got = c[member * c_stride + i * ldc + j].to_f64();
                let bound = 2.0 * (k as f64 + 2.0) * eps * magnitude;
                let what = format!("count {count} shared {shared_b} trans_a {trans_a} gap {gap} threads {threads}");
                assert!((got - exact).abs() <= bound, "{what}: member {member} C[{i},{j}] = {got}, expected {exact}");
            }
        }
        // The gap after each member's output is not part of any product and must keep its value.
        for x in &c[member * c_stride + m * ldc..(member + 1) * c_stride] {
            assert_eq!(x.to_f64(), 7.0, "gap between outputs was written");
        }
    }
}

#[test]
fn gemm_batched_matches_naive_with_shared_and_per_member_right_operands() {
    let mut seed = 100;
    for count in [1, 3, 4, 9] {
        for shared_b in [true, false] {
            for trans_a in [false, true] {
                for gap in [0, 2] {
                    for threads in [1, 2] {
                        seed += 1;
                        check_batched::<f64>(count, shared_b, trans_a, gap, threads, seed);
                        check_batched::<f32>(count, shared_b, trans_a, gap, threads, seed);
                    }
                }
            }
        }
    }
}

#[test]
fn gemm_rejects_bad_operands_with_an_error() {
    let a = vec![0.0f32; 12];
    let b = vec![0.0f32; 12];
    let mut c = vec![0.0f32; 9];
    let dims = GemmDims::new(3, 3, 4);
    // A too short for 3×4.
    let e = matmul(dims, MatRef::new(&a[..11], 4), MatRef::new(&b, 3), MatMut::new(&mut c, 3), false, 1);
    assert!(matches!(e, Err(Error::Shape { .. })), "{e:?}");
    // Leading dimension below the row width.
    let e = matmul(dims, MatRef::new(&a, 3), MatRef::new(&b, 3), MatMut::new(&mut c, 3), false, 1);
    assert!(matches!(e, Err(Error::Shape { .. })), "{e:?}");
    // C too short.
    let e = matmul(dims, MatRef::new(&a, 4), MatRef::new(&b, 3), MatMut::new(&mut c[..8], 3), false, 1);
    assert!(matches!(e, Err(Error::Shape { .. })), "{e:?}");
    // Batched outputs that overlap.
    let mut c2 = vec![0.0f32; 18];
    let batch = Batch { count: 2, a_stride: 0, b_stride: 0, c_stride: 4 };
    let e = matmul_batched(batch, dims, MatRef::new(&a, 4), MatRef::new(&b, 3), MatMut::new(&mut c2, 3), false, 1);
    assert!(matches!(e, Err(Error::Shape { .. })), "{e:?}");
    let message = e.unwrap_err().to_string();
    assert!(message.contains("overlap"), "unhelpful message: {message}");
}

// ---------------------------------------------------------------------------------------------
// conv2d
// ---------------------------------------------------------------------------------------------

/// The definition: seven nested loops, in f64, with the padding tested per tap.
fn naive_conv(s: &Conv2dShape, x: &[f64], w: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
    let (ho, wo) = (s.out_h(), s.out_w());
    let mut y = vec![0.0; s.y_len()];
    for n in 0..s.n {
        for o in 0..s.o {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = bias.map_or(0.0, |b| b[o]);
                    for c in 0..s.c {
                        for i in 0..s.kh {
                            for j in 0..s.kw {
                                let iy = (oy * s.stride + i) as isize - s.padding as isize;
                                let ix = (ox * s.stride + j) as isize - s.padding as isize;
                                if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                    continue;
                                }
                                let xv = x[((n * s.c + c) * s.h + iy as usize) * s.w + ix as usize];
                                acc += xv * w[((o * s.c + c) * s.kh + i) * s.kw + j];
                            }
                        }
                    }
                    y[((n * s.o + o) * ho + oy) * wo + ox] = acc;
                }
            }
        }
    }
    y
}

/// A shape from the input sizes `[N, C, H, W]`, output channels, kernel `(kh, kw)`, stride, padding.
fn shape(nchw: [usize; 4], o: usize, k: (usize, usize), stride: usize, padding: usize) -> Conv2dShape {
    let [n, c, h, w] = nchw;
    Conv2dShape { n, c, h, w, o, kh: k.0, kw: k.1, stride, padding }
}

/// Odd shapes covering kernels 1 and 3 (and a non-square one), strides 1 and 2, padding 0 and 1.
fn conv_shapes() -> Vec<Conv2dShape> {
    let mut shapes = Vec::new();
    for k in [(1, 1), (3, 3), (1, 3)] {
        for stride in [1, 2] {
            for padding in [0, 1] {
                shapes.push(shape([2, 3, 7, 5], 4, k, stride, padding));
                shapes.push(shape([3, 5, 6, 9], 2, k, stride, padding));
            }
        }
    }
    // A 1×1 stride-1 unpadded convolution (no im2col) with more channels, and a window filling the input.
    shapes.push(shape([2, 17, 5, 3], 11, (1, 1), 1, 0));
    shapes.push(shape([1, 2, 3, 3], 3, (3, 3), 1, 0));
    // A 5×5 window with padding 2 on a narrow map (im2col through a zero-padded plane).
    shapes.push(shape([2, 3, 9, 11], 2, (5, 5), 1, 2));
    shapes
}

/// Shapes with more than 1024 output pixels, which the kernels unroll in blocks of output rows
/// rather than whole: blocks of 26 + 14 rows, 31 + 3 rows at stride 2, one-row blocks of an
/// output wider than a block, and 52 + 28 rows of a narrow map.
fn blocked_conv_shapes() -> Vec<Conv2dShape> {
    vec![
        shape([2, 2, 40, 40], 3, (3, 3), 1, 1),
        shape([3, 3, 67, 67], 2, (3, 3), 2, 1),
        shape([2, 2, 3, 1100], 2, (1, 3), 1, 0),
        // Narrow and tall: blocks of 52 + 28 rows, each through the zero-padded plane.
        shape([2, 2, 80, 20], 3, (3, 3), 1, 1),
    ]
}

fn every_threading() -> Vec<ConvThreads> {
    vec![
        ConvThreads::single(),
        ConvThreads { threads: 2, method: ConvMethod::AcrossImages },
        ConvThreads { threads: 2, method: ConvMethod::InsideGemm },
        ConvThreads::auto(2),
        ConvThreads { threads: 3, method: ConvMethod::AcrossImages },
        ConvThreads { threads: 1, method: ConvMethod::Direct },
        ConvThreads { threads: 2, method: ConvMethod::Direct },
    ]
}

/// Shapes for the direct kernels (`direct_conv.rs`): several 64-pixel strips with a ragged tail, output channels
/// that are not a multiple of the 6-channel register block, bands of output rows (enough channels that a band
/// holds a few rows), stride 2 with its phase planes (and the backward-input's four output phases, also of an odd
/// size and of stride 3 with a 5×5 window), padding 0 (the backward-input recast pads by 2), a 5×5 window and a
/// non-square one; outputs 17-32 and up to 16 pixels wide, whose register blocks span two and four rows, with an
/// odd number of rows left over (also after a stride of 2).
fn direct_conv_shapes() -> Vec<Conv2dShape> {
    vec![
        shape([2, 40, 50, 70], 11, (3, 3), 1, 1),
        shape([1, 9, 33, 67], 10, (3, 3), 2, 1),
        shape([2, 12, 40, 70], 9, (3, 3), 2, 1),
        shape([1, 5, 31, 36], 11, (5, 5), 3, 2),
        shape([2, 6, 21, 40], 17, (3, 3), 1, 0),
        shape([1, 4, 20, 37], 9, (5, 5), 1, 2),
        shape([1, 3, 12, 45], 8, (1, 3), 1, 1),
        shape([3, 16, 34, 34], 16, (3, 3), 1, 1),
        shape([2, 7, 19, 30], 13, (3, 3), 1, 1),
        shape([1, 5, 23, 12], 7, (3, 3), 1, 1),
        shape([2, 6, 29, 50], 9, (3, 3), 2, 1),
        shape([1, 4, 14, 9], 6, (3, 3), 1, 1),
    ]
}

/// The direct kernels against the naive f64 convolution (forward) and the f64 im2col path (backward-input,
/// itself checked by the adjoint identities), in f32; the same bits on 1, 2 and 3 threads; and the path really
/// runs wherever the CPU has AVX-512 (else the method falls back to im2col, and this says so).
#[test]
fn direct_convolution_matches_naive_and_gives_the_same_bits_on_any_thread_count() {
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        zeroconv::engine::cpu::direct_conv::available(),
        std::arch::is_x86_feature_detected!("avx512f"),
        "the direct kernels must run wherever AVX-512 is present"
    );
    if !zeroconv::engine::cpu::direct_conv::available() {
        eprintln!("no AVX-512 on this CPU: ConvMethod::Direct runs im2col here, which the other tests check");
    }
    let direct = |threads| ConvThreads { threads, method: ConvMethod::Direct };
    for (case, s) in direct_conv_shapes().iter().enumerate() {
        let mut rng = Rng::new(700 + case as u64);
        let (x, w, bias, dy): (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) =
            (rng.vec(s.x_len()), rng.vec(s.weight_len()), rng.vec(s.o), rng.vec(s.y_len()));
        let (x64, w64, b64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&bias), to_f64(&dy));
        let y1 = forward(s, &x, &w, Some(&bias), direct(1));
        let expected_y = naive_conv(s, &x64, &w64, Some(&b64));
        let dx1 = backward_input(s, &dy, &w, direct(1));
        let expected_dx = backward_input(s, &dy64, &w64, ConvThreads::single());
        let dw1 = backward_weight(s, &x, &dy, direct(1));
        let expected_dw = backward_weight(s, &x64, &dy64, ConvThreads::single());
        if zeroconv::engine::cpu::direct_conv::available() {
            assert_close(&format!("forward {s:?}"), &to_f64(&y1), &expected_y, 1e-5);
            assert_close(&format!("backward-input {s:?}"), &to_f64(&dx1), &expected_dx, 1e-5);
            // Weight gradients sum over the batch and every output pixel: up to a few thousand terms.
            assert_close(&format!("weight gradient {s:?}"), &to_f64(&dw1), &expected_dw, 1e-4);
        } else {
            // im2col ran, its sums in the order of the `gemm` crate's micro-kernels for this CPU.
            let (ax, aw, ab, ady) = (abs(&x64), abs(&w64), abs(&b64), abs(&dy64));
            let taps = s.kh * s.kw;
            let magnitudes = naive_conv(s, &ax, &aw, Some(&ab));
            assert_within_sum_bound(&format!("forward {s:?}"), &to_f64(&y1), &expected_y, &magnitudes, s.c * taps + 1);
            let magnitudes = backward_input(s, &ady, &aw, ConvThreads::single());
            assert_within_sum_bound(&format!("dx {s:?}"), &to_f64(&dx1), &expected_dx, &magnitudes, s.o * taps);
            let magnitudes = backward_weight(s, &ax, &ady, ConvThreads::single());
            let pixels = s.n * s.out_h() * s.out_w();
            assert_within_sum_bound(&format!("dw {s:?}"), &to_f64(&dw1), &expected_dw, &magnitudes, pixels);
        }
        for threads in [2, 3] {
            assert_eq!(bits(&forward(s, &x, &w, Some(&bias), direct(threads))), bits(&y1), "forward {s:?} {threads}");
            assert_eq!(bits(&backward_input(s, &dy, &w, direct(threads))), bits(&dx1), "dx {s:?} {threads}");
            assert_eq!(bits(&backward_weight(s, &x, &dy, direct(threads))), bits(&dw1), "dw {s:?} {threads}");
        }
        if zeroconv::engine::cpu::direct_conv::available() {
            let recastable = s.stride == 1 && s.kh == s.kw;
            let phased = s.stride > 1 && s.kh == s.kw && s.kh % 2 == 1 && s.padding == s.kh / 2;
            let backward_input = recastable || phased;
            assert_eq!(
                conv::conv_kernels(s, direct(2)).map(|k| k == ConvKernel::Direct),
                [true, backward_input, true],
                "{s:?}: which passes"
            );
        }
    }
}

/// Winograd F(2×2, 3×3) shapes: even maps whose tile rows are 35, 20, 18, 8, 4 and 1 tiles wide (masked vectors,
/// several tile rows per vector), several bands with a short last one (48 channels over 38 rows), output channels
/// that leave a register block part-empty.
fn winograd_conv_shapes() -> Vec<Conv2dShape> {
    vec![
        shape([2, 40, 50, 70], 11, (3, 3), 1, 1),
        shape([1, 48, 38, 36], 20, (3, 3), 1, 1),
        shape([3, 24, 12, 40], 30, (3, 3), 1, 1),
        shape([2, 16, 16, 16], 13, (3, 3), 1, 1),
        shape([1, 33, 8, 8], 7, (3, 3), 1, 1),
        shape([1, 7, 2, 2], 5, (3, 3), 1, 1),
    ]
}

/// The Winograd kernels (forward, the backward-input recast as a forward, the weight gradient) against the naive
/// f64 convolution and the f64 im2col backward passes, in f32; the same bits on 1, 2 and 3 threads; and the path really runs
/// wherever the CPU has AVX-512 or AVX2 with FMA (the AVX2 kernels also run where AVX-512 is present, in
/// `winograd::tests`).
#[test]
fn winograd_convolution_matches_naive_and_gives_the_same_bits_on_any_thread_count() {
    let winograd = |threads| ConvThreads { threads, method: ConvMethod::Winograd };
    let available = zeroconv::engine::cpu::winograd::isa().is_some();
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        available,
        std::arch::is_x86_feature_detected!("avx512f")
            || std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
        "the Winograd kernels must run wherever AVX-512 or AVX2 with FMA is present"
    );
    if !available {
        eprintln!(
            "neither AVX-512 nor AVX2 on this CPU: ConvMethod::Winograd runs im2col here, which the other tests check"
        );
    }
    for (case, s) in winograd_conv_shapes().iter().enumerate() {
        let mut rng = Rng::new(900 + case as u64);
        let (x, w, bias, dy): (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) =
            (rng.vec(s.x_len()), rng.vec(s.weight_len()), rng.vec(s.o), rng.vec(s.y_len()));
        let (x64, w64, b64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&bias), to_f64(&dy));
        let y1 = forward(s, &x, &w, Some(&bias), winograd(1));
        assert_close(&format!("forward {s:?}"), &to_f64(&y1), &naive_conv(s, &x64, &w64, Some(&b64)), 1e-5);
        let unbiased = forward(s, &x, &w, None, winograd(1));
        assert_close(&format!("forward {s:?} no bias"), &to_f64(&unbiased), &naive_conv(s, &x64, &w64, None), 1e-5);
        let dx1 = backward_input(s, &dy, &w, winograd(1));
        let expected_dx = backward_input(s, &dy64, &w64, ConvThreads::single());
        assert_close(&format!("backward-input {s:?}"), &to_f64(&dx1), &expected_dx, 1e-5);
        // Weight gradients sum over the batch and every output pixel: up to a few thousand terms.
        let dw1 = backward_weight(s, &x, &dy, winograd(1));
        let expected_dw = backward_weight(s, &x64, &dy64, ConvThreads::single());
        assert_close(&format!("weight gradient {s:?}"), &to_f64(&dw1), &expected_dw, 1e-4);
        for threads in [2, 3] {
            let y = forward(s, &x, &w, Some(&bias), winograd(threads));
            assert_eq!(bits(&y), bits(&y1), "forward {s:?} {threads}");
            assert_eq!(bits(&backward_input(s, &dy, &w, winograd(threads))), bits(&dx1), "dx {s:?} {threads}");
            assert_eq!(bits(&backward_weight(s, &x, &dy, winograd(threads))), bits(&dw1), "dw {s:?} {threads}");
        }
        assert_eq!(
            conv::conv_kernels(s, winograd(2)).map(|k| k == ConvKernel::Winograd),
            [available; 3],
            "{s:?}: which passes"
        );
    }
    // Shapes it does not serve (odd maps, stride 2, 5×5, padding 0) fall back to the direct kernels.
    for s in [
        shape([1, 8, 9, 10], 8, (3, 3), 1, 1),
        shape([1, 8, 10, 10], 8, (3, 3), 2, 1),
        shape([1, 8, 10, 10], 8, (5, 5), 1, 2),
    ]
    .iter()
    .chain(&[shape([1, 8, 10, 10], 8, (3, 3), 1, 0)])
    {
        assert_eq!(conv::conv_kernels(s, winograd(2)).map(|k| k == ConvKernel::Winograd), [false; 3], "{s:?}");
        let mut rng = Rng::new(990);
        let (x, w): (Vec<f32>, Vec<f32>) = (rng.vec(s.x_len()), rng.vec(s.weight_len()));
        let expected = naive_conv(s, &to_f64(&x), &to_f64(&w), None);
        assert_close(&format!("fallback {s:?}"), &to_f64(&forward(s, &x, &w, None, winograd(2))), &expected, 1e-5);
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn forward<T: Float>(s: &Conv2dShape, x: &[T], w: &[T], bias: Option<&[T]>, threads: ConvThreads) -> Vec<T> {
    let mut y = vec![T::from_f64(f64::NAN); s.y_len()];
    let mut scratch = vec![T::from_f64(f64::NAN); conv2d_forward_scratch_len(s, threads)];
    conv2d_forward(s, x, w, bias, &mut y, &mut scratch, threads).unwrap_or_else(|e| panic!("{s:?}: {e}"));
    y
}

fn backward_input<T: Float>(s: &Conv2dShape, dy: &[T], w: &[T], threads: ConvThreads) -> Vec<T> {
    let mut dx = vec![T::from_f64(f64::NAN); s.x_len()];
    let mut scratch = vec![T::from_f64(f64::NAN); conv2d_backward_input_scratch_len(s, threads)];
    conv2d_backward_input(s, dy, w, &mut dx, &mut scratch, threads).unwrap_or_else(|e| panic!("{s:?}: {e}"));
    dx
}

fn backward_weight<T: Float>(s: &Conv2dShape, x: &[T], dy: &[T], threads: ConvThreads) -> Vec<T> {
    let mut dw = vec![T::from_f64(f64::NAN); s.weight_len()];
    let mut scratch = vec![T::from_f64(f64::NAN); conv2d_backward_weight_scratch_len(s, threads)];
    conv2d_backward_weight(s, x, dy, &mut dw, &mut scratch, threads).unwrap_or_else(|e| panic!("{s:?}: {e}"));
    dw
}

fn abs(v: &[f64]) -> Vec<f64> {
    v.iter().map(|v| v.abs()).collect()
}

/// Asserts that an f32 result whose sums ran in an order we do not choose (a library's micro-kernels, which differ
/// by instruction set) is within the bound on any f32 sum of `terms` products of the exact one:
/// |got - expected| ≤ (terms + 1)·u·Σ|products| elementwise (u = 2⁻²⁴; `magnitudes` holds the sums of |products|).
/// A wrong or missing product, of the size of the others, exceeds it.
fn assert_within_sum_bound(what: &str, got: &[f64], expected: &[f64], magnitudes: &[f64], terms: usize) {
    assert!(got.len() == expected.len() && got.len() == magnitudes.len(), "{what}: length");
    let u = f64::from(f32::EPSILON) / 2.0;
    for (i, ((g, e), m)) in got.iter().zip(expected).zip(magnitudes).enumerate() {
        let bound = (terms as f64 + 1.0) * u * m;
        assert!((g - e).abs() <= bound, "{what}[{i}]: got {g}, expected {e}, bound {bound:e}");
    }
}

/// Asserts |got - expected| ≤ rel · max(1, |expected|) elementwise.
fn assert_close(what: &str, got: &[f64], expected: &[f64], rel: f64) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!((g - e).abs() <= rel * e.abs().max(1.0), "{what}[{i}]: got {g}, expected {e}");
    }
}

#[test]
fn conv_forward_matches_naive_seven_loops() {
    for (case, s) in conv_shapes().iter().chain(&blocked_conv_shapes()).enumerate() {
        let mut rng = Rng::new(200 + case as u64);
        let x: Vec<f64> = rng.vec(s.x_len());
        let w: Vec<f64> = rng.vec(s.weight_len());
        let bias: Vec<f64> = rng.vec(s.o);
        for with_bias in [false, true] {
            let b = with_bias.then_some(&bias[..]);
            let expected = naive_conv(s, &x, &w, b);
            for threads in every_threading() {
                let what = format!("{s:?} bias {with_bias} {threads:?}");
                assert_close(&format!("f64 {what}"), &forward(s, &x, &w, b, threads), &expected, 1e-12);
                // f32 from the same (rounded) inputs; sums of at most 45 products of values in [-1, 1].
                let (x32, w32, b32): (Vec<f32>, Vec<f32>, Vec<f32>) =
                    (round_to_f32(&x), round_to_f32(&w), round_to_f32(&bias));
                let expected32 = naive_conv(s, &to_f64(&x32), &to_f64(&w32), with_bias.then_some(&to_f64(&b32)[..]));
                let got32 = to_f64(&forward(s, &x32, &w32, with_bias.then_some(&b32[..]), threads));
                assert_close(&format!("f32 {what}"), &got32, &expected32, 1e-5);
            }
        }
    }
}

fn round_to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

#[test]
fn conv_backward_passes_satisfy_the_adjoint_identities() {
    for (case, s) in conv_shapes().iter().chain(&blocked_conv_shapes()).enumerate() {
        let mut rng = Rng::new(300 + case as u64);
        // Several random pairs: one pair checks a single direction, a few make a wrong adjoint
        // passing essentially impossible.
        for trial in 0..3 {
            let x: Vec<f64> = rng.vec(s.x_len());
            let w: Vec<f64> = rng.vec(s.weight_len());
            let dy: Vec<f64> = rng.vec(s.y_len());
            for threads in every_threading() {
                let what = format!("{s:?} trial {trial} {threads:?}");
                let y = forward(s, &x, &w, None, threads);
                let lhs = dot(&y, &dy);
                let dx = backward_input(s, &dy, &w, threads);
                let dw = backward_weight(s, &x, &dy, threads);
                let scale = 1.0 + lhs.abs();
                assert!(
                    (lhs - dot(&x, &dx)).abs() <= 1e-12 * scale * s.x_len() as f64,
                    "<conv(x),dy> != <x,dx>: {what}"
                );
                assert!(
                    (lhs - dot(&w, &dw)).abs() <= 1e-12 * scale * s.x_len() as f64,
                    "<conv(x),dy> != <w,dw>: {what}"
                );
            }
        }
    }
}

/// L(x, w, b) = <conv(x, w) + b, dy> is linear in each argument, so a central difference is exact up
/// to rounding: every component of every gradient is checked.
#[test]
fn conv_gradients_match_finite_differences() {
    let h = 1e-3;
    for (case, s) in conv_shapes().iter().enumerate() {
        let mut rng = Rng::new(400 + case as u64);
        let x: Vec<f64> = rng.vec(s.x_len());
        let w: Vec<f64> = rng.vec(s.weight_len());
        let b: Vec<f64> = rng.vec(s.o);
        let dy: Vec<f64> = rng.vec(s.y_len());
        let threads = ConvThreads::auto(2);
        let loss = |x: &[f64], w: &[f64], b: &[f64]| dot(&forward(s, x, w, Some(b), threads), &dy);
        let central = |f: &dyn Fn(f64) -> f64| (f(h) - f(-h)) / (2.0 * h);

        let dx = backward_input(s, &dy, &w, threads);
        for i in 0..s.x_len() {
            let fd = central(&|d| {
                let mut xp = x.clone();
                xp[i] += d;
                loss(&xp, &w, &b)
            });
            assert!(
                (fd - dx[i]).abs() <= 1e-8 * (1.0 + fd.abs()),
                "{s:?} dx[{i}]: {} vs finite difference {fd}",
                dx[i]
            );
        }
        let dw = backward_weight(s, &x, &dy, threads);
        for i in 0..s.weight_len() {
            let fd = central(&|d| {
                let mut wp = w.clone();
                wp[i] += d;
                loss(&x, &wp, &b)
            });
            assert!(
                (fd - dw[i]).abs() <= 1e-8 * (1.0 + fd.abs()),
                "{s:?} dw[{i}]: {} vs finite difference {fd}",
                dw[i]
            );
        }
        let mut db = vec![f64::NAN; s.o];
        conv2d_backward_bias(s, &dy, &mut db).unwrap();
        for i in 0..s.o {
            let fd = central(&|d| {
                let mut bp = b.clone();
                bp[i] += d;
                loss(&x, &w, &bp)
            });
            assert!(
                (fd - db[i]).abs() <= 1e-8 * (1.0 + fd.abs()),
                "{s:?} db[{i}]: {} vs finite difference {fd}",
                db[i]
            );
        }
    }
}

#[test]
fn conv_backward_in_f32_matches_f64() {
    for (case, s) in conv_shapes().iter().chain(&blocked_conv_shapes()).enumerate() {
        let mut rng = Rng::new(500 + case as u64);
        let x: Vec<f32> = rng.vec(s.x_len());
        let w: Vec<f32> = rng.vec(s.weight_len());
        let dy: Vec<f32> = rng.vec(s.y_len());
        let (x64, w64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&dy));
        for threads in every_threading() {
            let what = format!("{s:?} {threads:?}");
            let dx = to_f64(&backward_input(s, &dy, &w, threads));
            assert_close(&format!("dx {what}"), &dx, &backward_input(s, &dy64, &w64, ConvThreads::single()), 1e-5);
            let dw = to_f64(&backward_weight(s, &x, &dy, threads));
            // Weight gradients sum over the batch and every output pixel: up to a few hundred terms.
            assert_close(&format!("dw {what}"), &dw, &backward_weight(s, &x64, &dy64, ConvThreads::single()), 1e-4);
        }
    }
}

#[test]
fn conv_rejects_bad_shapes_and_buffers_with_an_error() {
    let s = shape([2, 3, 5, 5], 4, (3, 3), 1, 1);
    let t = ConvThreads::single();
    let x = vec![0.0f32; s.x_len()];
    let w = vec![0.0f32; s.weight_len()];
    let mut y = vec![0.0f32; s.y_len()];
    let mut scratch = vec![0.0f32; conv2d_forward_scratch_len(&s, t)];
    assert!(conv2d_forward(&s, &x, &w, None, &mut y, &mut scratch, t).is_ok());

    let expect_shape_error = |r: zeroconv::Result<()>, what: &str| {
        assert!(matches!(r, Err(Error::Shape { .. })), "{what}: {r:?}");
    };
    expect_shape_error(conv2d_forward(&s, &x[1..], &w, None, &mut y, &mut scratch, t), "short x");
    expect_shape_error(conv2d_forward(&s, &x, &w[1..], None, &mut y, &mut scratch, t), "short weight");
    expect_shape_error(conv2d_forward(&s, &x, &w, Some(&[0.0; 3]), &mut y, &mut scratch, t), "short bias");
    let short = scratch.len() - 1;
    expect_shape_error(conv2d_forward(&s, &x, &w, None, &mut y, &mut scratch[..short], t), "short scratch");
    let stride0 = Conv2dShape { stride: 0, ..s };
    expect_shape_error(stride0.validate(), "stride 0");
    let too_big = Conv2dShape { kh: 8, ..s };
    expect_shape_error(too_big.validate(), "kernel larger than padded input");
    let mut dw = vec![0.0f32; s.weight_len()];
    expect_shape_error(conv2d_backward_weight(&s, &x, &y[1..], &mut dw, &mut scratch, t), "short dy");
}

#[test]
fn pointwise_convolution_needs_no_im2col_scratch() {
    let pointwise = shape([2, 8, 4, 4], 6, (1, 1), 1, 0);
    assert_eq!(conv2d_forward_scratch_len(&pointwise, ConvThreads::auto(2)), 0);
    assert_eq!(conv2d_backward_input_scratch_len(&pointwise, ConvThreads::single()), 0);
    // A strided 1×1 convolution still samples the input, so it goes through im2col.
    let strided = shape([2, 8, 4, 4], 6, (1, 1), 2, 0);
    assert_eq!(conv2d_forward_scratch_len(&strided, ConvThreads::single()), 8 * 2 * 2);
}

#[test]
fn large_images_are_unrolled_in_row_blocks_not_whole() {
    for s in blocked_conv_shapes() {
        let whole_image = s.c * s.kh * s.kw * s.out_h() * s.out_w();
        let scratch = conv2d_forward_scratch_len(&s, ConvThreads::single());
        assert!(scratch > 0 && scratch < whole_image, "{s:?}: scratch {scratch}, whole image {whole_image}");
    }
}

/// An epilogue that adds 1 to the rows it is handed and counts its calls: applied once to every row, and only to
/// rows that are final, the result is the plain convolution's plus 1 exactly.
struct AddOne {
    calls: std::sync::atomic::AtomicUsize,
    rows: usize,
    width: usize,
}

impl zeroconv::engine::cpu::conv::ConvEpilogue<f32> for AddOne {
    fn apply(&self, call: zeroconv::engine::cpu::conv::EpilogueCall<'_, f32>) {
        assert!(call.rows.end <= self.rows && call.threads >= 1, "rows {:?} of {}", call.rows, self.rows);
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for channel in call.out_n.chunks_exact_mut(self.rows * self.width) {
            for v in &mut channel[call.rows.start * self.width..call.rows.end * self.width] {
                *v += 1.0;
            }
        }
    }
}

/// The fused epilogue's contract on every path (direct kernels band by band, im2col): each row of every image
/// gets the epilogue once, after its last write. The direct kernels hand a single-threaded image over band by
/// band (more than one call per image somewhere here), others whole.
#[test]
fn conv_epilogues_see_every_row_once_and_final() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use zeroconv::engine::cpu::conv::{conv2d_backward_input_then, conv2d_forward_then};
    let mut banded = false;
    let threadings =
        [ConvThreads { threads: 1, method: ConvMethod::Direct }, ConvThreads::auto(2), ConvThreads::single()];
    for (case, s) in direct_conv_shapes().iter().enumerate() {
        let mut rng = Rng::new(900 + case as u64);
        let (x, w, bias, dy): (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) =
            (rng.vec(s.x_len()), rng.vec(s.weight_len()), rng.vec(s.o), rng.vec(s.y_len()));
        for threads in threadings {
            let plain_y = forward(s, &x, &w, Some(&bias), threads);
            let e = AddOne { calls: AtomicUsize::new(0), rows: s.out_h(), width: s.out_w() };
            let mut y = vec![f32::NAN; s.y_len()];
            let mut scratch = vec![f32::NAN; conv2d_forward_scratch_len(s, threads)];
            conv2d_forward_then(s, (&x, &w, Some(&bias)), &mut y, &mut scratch, threads, Some(&e)).unwrap();
            let expected: Vec<f32> = plain_y.iter().map(|v| v + 1.0).collect();
            assert_same_bits(&y, &expected, &format!("forward {s:?} {threads:?}"));
            banded |= threads.threads == 1 && e.calls.load(Ordering::Relaxed) > s.n;

            let plain_dx = backward_input(s, &dy, &w, threads);
            let e = AddOne { calls: AtomicUsize::new(0), rows: s.h, width: s.w };
            let mut dx = vec![f32::NAN; s.x_len()];
            let mut scratch = vec![f32::NAN; conv2d_backward_input_scratch_len(s, threads)];
            conv2d_backward_input_then(s, (&dy, &w), &mut dx, &mut scratch, threads, Some(&e)).unwrap();
            let expected: Vec<f32> = plain_dx.iter().map(|v| v + 1.0).collect();
            assert_same_bits(&dx, &expected, &format!("backward-input {s:?} {threads:?}"));
            banded |= threads.threads == 1 && e.calls.load(Ordering::Relaxed) > s.n;
        }
    }
    assert!(banded || !zeroconv::engine::cpu::direct_conv::available(), "no direct pass ran band by band");
}

/// Asserts two f32 vectors have the same bits, naming the first element that differs (not printing them whole).
fn assert_same_bits(got: &[f32], expected: &[f32], what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    if let Some(i) = got.iter().zip(expected).position(|(g, e)| g.to_bits() != e.to_bits()) {
        panic!("{what}: element {i} is {}, expected {}", got[i], expected[i]);
    }
}

/// Batched products whose batch folds into the rows of one product large enough to run as two blocks of rows
/// (`linalg::row_block`): against f64, A entering transposed or not and B shared, with the same bits on 1, 2 and 3
/// threads, and an epilogue hook that sees every row once, after its product.
#[test]
fn row_blocked_products_match_f64_and_give_the_same_bits_on_any_thread_count() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use zeroconv::engine::cpu::linalg::{batched_matmul, batched_matmul_then, row_block, Operand};
    use zeroconv::graph::Shape;
    // (A's shape, whether it enters transposed, B's shape, the output's shape)
    type Case<'a> = (&'a [usize], bool, &'a [usize], &'a [usize]);
    let cases: [Case<'_>; 3] = [
        (&[2, 100, 96], false, &[96, 160], &[2, 100, 160]),
        (&[96, 201], true, &[96, 130], &[201, 130]),
        (&[301, 64], false, &[64, 129], &[301, 129]),
    ];
    for (case, &(sa, ta, sb, so)) in cases.iter().enumerate() {
        let (sa, sb, so) = (Shape(sa.to_vec()), Shape(sb.to_vec()), Shape(so.to_vec()));
        let mut rng = Rng::new(950 + case as u64);
        let (a, b): (Vec<f32>, Vec<f32>) = (rng.vec(sa.numel()), rng.vec(sb.numel()));
        let (a64, b64) = (to_f64(&a), to_f64(&b));
        let operands =
            |a, b| (Operand { data: a, shape: &sa, trans: ta }, Operand { data: b, shape: &sb, trans: false });
        let rows = so.numel() / so.dims()[so.rank() - 1];
        let (x, y) = operands(&a[..], &b[..]);
        assert!(row_block(&x, &y, &so) < rows, "case {case}: runs as one block");
        let mut expected = vec![0.0f64; so.numel()];
        let (x64, y64) =
            (Operand { data: &a64[..], shape: &sa, trans: ta }, Operand { data: &b64[..], shape: &sb, trans: false });
        batched_matmul(x64, y64, &mut expected, &so, 1);
        let k = if ta { sa.dims()[0] } else { sa.dims()[sa.rank() - 1] };
        let mut first: Option<Vec<f32>> = None;
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut out = vec![f32::NAN; so.numel()];
            let seen = AtomicUsize::new(0);
            let n = so.dims()[so.rank() - 1];
            let after = |_: usize, r: std::ops::Range<usize>, c: &mut [f32]| {
                assert_eq!(c.len(), r.len() * n);
                assert!(c.iter().all(|v| v.is_finite()), "rows {r:?} handed over before their product");
                seen.fetch_add(r.len(), Ordering::Relaxed);
            };
            let (x, y) = operands(&a[..], &b[..]);
            pool.install(|| batched_matmul_then(x, y, &mut out, &so, threads, Some(&after)));
            assert_eq!(seen.load(Ordering::Relaxed), rows, "case {case}, {threads} threads: rows handed over");
            // A dot product of length k in f32: within k·eps of the sum of |terms| (each |term| < 1).
            assert_close(&format!("case {case}"), &to_f64(&out), &expected, k as f64 * 1.2e-7 * 4.0);
            match &first {
                None => first = Some(out),
                Some(f) => assert_same_bits(&out, f, &format!("case {case}, {threads} threads")),
            }
        }
    }
}
