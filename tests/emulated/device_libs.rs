//! The emulated cuBLAS and cuDNN (`engine/device/blas.rs`, `engine/device/dnn.rs`) against naive references
//! written here in f64, row-major, from the libraries' documented semantics (never through the code under test).
//!
//! Inputs are small multiples of 1/8, so every product and sum is exact in f64 and every expected value is exactly
//! representable in f32: outputs are compared bit for bit after one rounding to the output type. Memory that an
//! operation must not touch (padding rows of C, gaps between batch instances, guard bytes after every buffer, the
//! inputs) is filled with a sentinel and checked afterwards.

use half::{bf16, f16};
use zeroconv::engine::device::blas;
use zeroconv::engine::device::dnn;
use zeroconv::engine::device::{
    Conv, ConvDirection, ConvMath, DevPtr, Filter4, Gemm, GemmCompute, Layout4, MatrixRef, Span, Tensor4, Transpose,
};
use zeroconv::graph::DType;

/// SplitMix64: deterministic, no RNG crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A multiple of 1/8 in [-2, 2]: exact in bf16, f16 and f32.
    fn eighth(&mut self) -> f64 {
        (self.next() % 33) as f64 / 8.0 - 2.0
    }
    fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.eighth()).collect()
    }
}

/// Bytes after every buffer that nothing may touch.
const GUARD: usize = 64;
const SENTINEL: u8 = 0xA5;

/// Host memory standing in for device memory. After construction it is accessed only through `base` (the address
/// the library gets), never through a reference to the vector.
struct Mem {
    owner: Vec<u64>,
    base: *mut u8,
    len: usize,
}

impl Mem {
    /// `len` usable bytes plus `GUARD`, all set to `fill`, 8-byte aligned.
    fn new(len: usize, fill: u8) -> Mem {
        let total = (len + GUARD).div_ceil(8) * 8;
        let mut m =
            Mem { owner: vec![u64::from_ne_bytes([fill; 8]); total / 8], base: std::ptr::null_mut(), len: total };
        m.base = m.owner.as_mut_ptr().cast::<u8>();
        m
    }
    fn ptr(&self) -> DevPtr {
        DevPtr(self.base as u64)
    }
    fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len];
        // SAFETY: `base .. base + len` is the vector's allocation, owned by `self` and not otherwise borrowed.
        unsafe { std::ptr::copy_nonoverlapping(self.base, out.as_mut_ptr(), self.len) };
        out
    }
    fn write(&mut self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= self.len);
        // SAFETY: the range is inside the allocation (asserted), owned by `self`; `bytes` is another allocation.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(off), bytes.len()) };
    }
    fn put(&mut self, elem: usize, dt: DType, v: f64) {
        self.write(elem * dt.size(), &enc(dt, v));
    }
    fn get(&self, elem: usize, dt: DType) -> f64 {
        let off = elem * dt.size();
        dec(dt, &self.snapshot()[off..off + dt.size()])
    }
}

/// One value in memory order, rounded once (through f32, exact for the values used here).
fn enc(dt: DType, v: f64) -> Vec<u8> {
    match dt {
        DType::F32 => (v as f32).to_ne_bytes().to_vec(),
        DType::BF16 => bf16::from_f32(v as f32).to_bits().to_ne_bytes().to_vec(),
        DType::F16 => f16::from_f32(v as f32).to_bits().to_ne_bytes().to_vec(),
        other => panic!("no test encoding for {other}"),
    }
}

fn dec(dt: DType, b: &[u8]) -> f64 {
    match dt {
        DType::F32 => f32::from_ne_bytes(b.try_into().unwrap()) as f64,
        DType::BF16 => bf16::from_bits(u16::from_ne_bytes(b.try_into().unwrap())).to_f64(),
        DType::F16 => f16::from_bits(u16::from_ne_bytes(b.try_into().unwrap())).to_f64(),
        other => panic!("no test decoding for {other}"),
    }
}

/// `v` rounded to `dt` as the library must round it.
fn rounded(dt: DType, v: f64) -> f64 {
    dec(dt, &enc(dt, v))
}

fn same(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a == b)
}

/// TF32 rounding written from its definition: keep 11 significant bits (1 + 10), to nearest, ties to even.
fn tf32_ref(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let e = ((x.to_bits() >> 52) & 0x7ff) as i32 - 1023;
    let ulp = 2f64.powi(e - 10);
    (x / ulp).round_ties_even() * ulp
}

// ---------------------------------------------------------------------------------------------------------------
// GEMM
// ---------------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct GemmCase {
    ta: Transpose,
    tb: Transpose,
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    /// Extra rows in every leading dimension.
    pad: usize,
    /// Extra elements between batch instances.
    gap: usize,
    share_a: bool,
    share_b: bool,
    alpha: f32,
    beta: f32,
    tin: DType,
    tout: DType,
    compute: GemmCompute,
}

impl GemmCase {
    fn new(ta: Transpose, tb: Transpose) -> GemmCase {
        GemmCase {
            ta,
            tb,
            m: 5,
            n: 4,
            k: 3,
            batch: 1,
            pad: 0,
            gap: 0,
            share_a: false,
            share_b: false,
            alpha: 1.5,
            beta: 0.0,
            tin: DType::F32,
            tout: DType::F32,
            compute: GemmCompute::F32,
        }
    }
}

/// The workspace every emulated GEMM case gets.
const GEMM_WORKSPACE_BYTES: usize = 512;

/// Element count of a stored operand's footprint, from its definition.
fn footprint_elems(rows: usize, cols: usize, ld: usize, stride: usize, batch: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (batch - 1) * stride + (cols - 1) * ld + rows
    }
}

/// Runs one case with the given logical inputs (row-major op(A)[b]: m×k, op(B)[b]: k×n, C0[b]: m×n; one matrix
/// when shared) and checks C, the untouched memory and the footprints. Returns C as row-major f64 per instance.
fn run_gemm_with(cs: &GemmCase, opa: &[Vec<f64>], opb: &[Vec<f64>], c0: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let GemmCase { m, n, k, batch, pad, gap, .. } = *cs;
    let (sa, sb, sc) = (cs.tin.size(), cs.tin.size(), cs.tout.size());

    // A as stored: op(A)(i, l) is A(i, l) for N, A(l, i) for T.
    let (ar, ac) = if cs.ta == Transpose::N { (m, k) } else { (k, m) };
    let lda = ar.max(1) + pad;
    let stride_a = if cs.share_a { 0 } else { lda * ac + gap };
    let a_elems = footprint_elems(ar, ac, lda, stride_a, batch);
    let mut amem = Mem::new(a_elems * sa, SENTINEL);
    for (b, mat) in opa.iter().enumerate() {
        for i in 0..m {
            for l in 0..k {
                let (r, c) = if cs.ta == Transpose::N { (i, l) } else { (l, i) };
                amem.put(b * stride_a + r + c * lda, cs.tin, mat[i * k + l]);
            }
        }
    }
    // B as stored: op(B)(l, j) is B(l, j) for N, B(j, l) for T.
    let (br, bc) = if cs.tb == Transpose::N { (k, n) } else { (n, k) };
    let ldb = br.max(1) + pad;
    let stride_b = if cs.share_b { 0 } else { ldb * bc + gap };
    let b_elems = footprint_elems(br, bc, ldb, stride_b, batch);
    let mut bmem = Mem::new(b_elems * sb, SENTINEL);
    for (b, mat) in opb.iter().enumerate() {
        for l in 0..k {
            for j in 0..n {
                let (r, c) = if cs.tb == Transpose::N { (l, j) } else { (j, l) };
                bmem.put(b * stride_b + r + c * ldb, cs.tin, mat[l * n + j]);
            }
        }
    }
    // C: m×n per instance, with padding rows and gaps left at the sentinel; NaN where beta == 0.
    let ldc = m.max(1) + pad;
    let stride_c = ldc * n + gap;
    let c_elems = footprint_elems(m, n, ldc, stride_c, batch);
    let mut cmem = Mem::new(c_elems * sc, SENTINEL);
    for (b, mat) in c0.iter().enumerate() {
        for i in 0..m {
            for j in 0..n {
                let v = if cs.beta == 0.0 { f64::NAN } else { mat[i * n + j] };
                cmem.put(b * stride_c + i + j * ldc, cs.tout, v);
            }
        }
    }

    let mref = |mem: &Mem, dtype, ld: usize, stride: usize| MatrixRef {
        ptr: mem.ptr(),
        dtype,
        ld: ld as u64,
        stride: stride as u64,
    };
    // A workspace at the first 256-byte boundary of a zeroed buffer: the GEMM fills it with 0xff and nothing else.
    let wsmem = Mem::new(GEMM_WORKSPACE_BYTES + 256, 0x00);
    let ws_off = (wsmem.ptr().0.div_ceil(256) * 256 - wsmem.ptr().0) as usize;
    let g = Gemm {
        transa: cs.ta,
        transb: cs.tb,
        m: m as u64,
        n: n as u64,
        k: k as u64,
        alpha: cs.alpha,
        beta: cs.beta,
        a: mref(&amem, cs.tin, lda, stride_a),
        b: mref(&bmem, cs.tin, ldb, stride_b),
        c: mref(&cmem, cs.tout, ldc, stride_c),
        batch: batch as u64,
        compute: cs.compute,
        workspace: Span::new(wsmem.ptr().offset(ws_off as u64), GEMM_WORKSPACE_BYTES as u64),
    };
    let fp = blas::footprint(&g);
    assert_eq!(fp.a, Span::new(amem.ptr(), (a_elems * sa) as u64), "{cs:?}: footprint of A");
    assert_eq!(fp.b, Span::new(bmem.ptr(), (b_elems * sb) as u64), "{cs:?}: footprint of B");
    assert_eq!(fp.c, Span::new(cmem.ptr(), (c_elems * sc) as u64), "{cs:?}: footprint of C");

    let (a_before, b_before, c_before) = (amem.snapshot(), bmem.snapshot(), cmem.snapshot());
    // SAFETY: every footprint lies inside its `Mem` (checked above), which lives until the end of this function;
    // the three buffers are distinct allocations, and no reference to them is live.
    unsafe { blas::execute(&g) }.unwrap_or_else(|e| panic!("{cs:?}: {e}"));
    assert_eq!(amem.snapshot(), a_before, "{cs:?}: A changed");
    assert_eq!(bmem.snapshot(), b_before, "{cs:?}: B changed");
    let wsb = wsmem.snapshot();
    let (before, rest) = wsb.split_at(ws_off);
    let (workspace, after) = rest.split_at(GEMM_WORKSPACE_BYTES);
    assert!(workspace.iter().all(|&b| b == 0xff), "{cs:?}: workspace not filled with 0xff");
    assert!(before.iter().chain(after).all(|&b| b == 0), "{cs:?}: bytes around the workspace changed");

    // Reference: row-major, f64, one rounding.
    let tf = |x: f64| if cs.compute == GemmCompute::F32FastTf32 { tf32_ref(x) } else { x };
    let c_after = cmem.snapshot();
    let mut logical = vec![false; c_after.len() / sc];
    let mut out = Vec::new();
    for b in 0..batch {
        let a = &opa[if cs.share_a { 0 } else { b }];
        let bm = &opb[if cs.share_b { 0 } else { b }];
        let mut got_b = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut sum = 0.0;
                for l in 0..k {
                    sum += tf(a[i * k + l]) * tf(bm[l * n + j]);
                }
                let mut want = cs.alpha as f64 * sum;
                if cs.beta != 0.0 {
                    want += cs.beta as f64 * c0[b][i * n + j];
                }
                let want = rounded(cs.tout, want);
                let e = b * stride_c + i + j * ldc;
                logical[e] = true;
                let got = dec(cs.tout, &c_after[e * sc..(e + 1) * sc]);
                assert!(same(got, want), "{cs:?}: C[{b}]({i}, {j}) = {got}, want {want}");
                got_b[i * n + j] = got;
            }
        }
        out.push(got_b);
    }
    for (e, &is_logical) in logical.iter().enumerate() {
        if !is_logical {
            assert_eq!(
                &c_after[e * sc..(e + 1) * sc],
                &c_before[e * sc..(e + 1) * sc],
                "{cs:?}: C element {e} (padding, gap or guard) changed"
            );
        }
    }
    out
}

/// Random inputs for a case; returns C.
fn run_gemm(cs: &GemmCase, rng: &mut Rng) -> Vec<Vec<f64>> {
    let na = if cs.share_a { 1 } else { cs.batch };
    let nb = if cs.share_b { 1 } else { cs.batch };
    let opa: Vec<_> = (0..na).map(|_| rng.vec(cs.m * cs.k)).collect();
    let opb: Vec<_> = (0..nb).map(|_| rng.vec(cs.k * cs.n)).collect();
    let c0: Vec<_> = (0..cs.batch).map(|_| rng.vec(cs.m * cs.n)).collect();
    run_gemm_with(cs, &opa, &opb, &c0)
}

const TRANS: [(Transpose, Transpose); 4] = [
    (Transpose::N, Transpose::N),
    (Transpose::N, Transpose::T),
    (Transpose::T, Transpose::N),
    (Transpose::T, Transpose::T),
];

#[test]
fn gemm_transposes_padding_batches_alpha_beta() {
    let mut rng = Rng(1);
    let mut cases = 0;
    for (ta, tb) in TRANS {
        for batch in [1, 3] {
            for (pad, gap) in [(0, 0), (2, 3)] {
                for (alpha, beta) in [(1.5, 0.0), (-0.75, 0.5), (1.0, 0.0)] {
                    let cs = GemmCase { batch, pad, gap, alpha, beta, ..GemmCase::new(ta, tb) };
                    run_gemm(&cs, &mut rng);
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 48);
}

#[test]
fn gemm_shared_operands_stride_zero() {
    let mut rng = Rng(2);
    for (ta, tb) in TRANS {
        for (share_a, share_b) in [(true, false), (false, true), (true, true)] {
            let cs = GemmCase { batch: 3, pad: 1, gap: 2, share_a, share_b, beta: 0.5, ..GemmCase::new(ta, tb) };
            let c = run_gemm(&cs, &mut rng);
            assert_eq!(c.len(), 3);
        }
    }
}

#[test]
fn gemm_input_and_output_types() {
    let mut rng = Rng(3);
    for (tin, tout) in [
        (DType::F32, DType::F32),
        (DType::BF16, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::F16, DType::F32),
        (DType::F16, DType::F16),
    ] {
        for (ta, tb) in TRANS {
            for beta in [0.0, 0.5] {
                let cs = GemmCase { batch: 3, pad: 1, gap: 1, beta, tin, tout, k: 7, ..GemmCase::new(ta, tb) };
                run_gemm(&cs, &mut rng);
            }
        }
    }
}

#[test]
fn gemm_half_outputs_round_once() {
    // Sums that are not representable in the half type: the output is the nearest value (ties to even).
    let mut rng = Rng(4);
    for tout in [DType::BF16, DType::F16] {
        let cs = GemmCase {
            m: 3,
            n: 3,
            k: 9,
            tin: tout,
            tout,
            alpha: 1.0,
            beta: 0.0,
            ..GemmCase::new(Transpose::N, Transpose::N)
        };
        // 1 + 1/256 + 1/512 ... : values whose sum needs more than 8 (bf16) or 11 (f16) significant bits.
        let opa: Vec<Vec<f64>> = vec![(0..27).map(|i| if i % 9 == 0 { 1.0 } else { 0.125 * (i % 9) as f64 }).collect()];
        let opb: Vec<Vec<f64>> = vec![(0..27).map(|_| rng.eighth()).collect()];
        run_gemm_with(&cs, &opa, &opb, &[vec![0.0; 9]]);
    }
}

/// Rounding once, not twice: a sum just above a half-type midpoint by less than half an f32 ulp rounds up, where
/// f64 -> f32 -> half would land on the midpoint and tie to even (down).
#[test]
fn gemm_half_outputs_do_not_double_round() {
    // bf16 near 1: ulp 2^-7, midpoint 1 + 2^-8; 2^-30 is far below f32's half ulp (2^-24).
    // f16 near 1: ulp 2^-10, midpoint 1 + 2^-11; 2^-24 is exactly f32's half ulp (a tie f32 would break down).
    for (dt, mid, tiny, want) in [
        (DType::BF16, 2f64.powi(-8), 2f64.powi(-30), 1.0 + 2f64.powi(-7)),
        (DType::F16, 2f64.powi(-11), 2f64.powi(-24), 1.0 + 2f64.powi(-10)),
    ] {
        let mut a = Mem::new(16, 0);
        let mut b = Mem::new(16, 0);
        let c = Mem::new(16, 0);
        for (i, v) in [1.0, mid, tiny].into_iter().enumerate() {
            a.put(i, dt, v);
            b.put(i, dt, 1.0);
        }
        assert_eq!(a.get(2, dt), tiny, "{dt} represents the tiny term");
        let m = |mem: &Mem, ld| MatrixRef { ptr: mem.ptr(), dtype: dt, ld, stride: 0 };
        let g = Gemm {
            transa: Transpose::T,
            transb: Transpose::N,
            m: 1,
            n: 1,
            k: 3,
            alpha: 1.0,
            beta: 0.0,
            a: m(&a, 3),
            b: m(&b, 3),
            c: m(&c, 1),
            batch: 1,
            compute: GemmCompute::F32,
            workspace: Span::new(DevPtr::NULL, 0),
        };
        // SAFETY: A and B are 3 elements, C one, inside their live `Mem`s.
        unsafe { blas::execute(&g) }.unwrap();
        assert_eq!(c.get(0, dt), want, "{dt}: 1 + midpoint + tiny must round up");
    }
}

#[test]
fn gemm_zero_sized() {
    let mut rng = Rng(5);
    // k = 0: the sum is empty, C = beta * C (and 0 when beta == 0, even over NaN).
    for beta in [0.0, 0.5] {
        let cs = GemmCase { k: 0, batch: 2, pad: 1, beta, ..GemmCase::new(Transpose::T, Transpose::N) };
        let c = run_gemm(&cs, &mut rng);
        if beta == 0.0 {
            assert!(c.iter().flatten().all(|&v| v == 0.0));
        }
    }
    // m = 0 or n = 0: nothing is touched (the C checks above cover it: every element stays the sentinel).
    for (m, n) in [(0, 4), (5, 0)] {
        let cs = GemmCase { m, n, batch: 2, beta: 0.5, ..GemmCase::new(Transpose::N, Transpose::T) };
        run_gemm(&cs, &mut rng);
    }
}

#[test]
fn gemm_tf32_rounds_inputs() {
    // 1 + 2^-12 rounds down to 1; 1 + 3*2^-11 is a tie between 1 + 2^-10 and 1 + 2^-9 and goes to the even one,
    // 1 + 2^-9; negative values round symmetrically. Strict f32: no rounding.
    // 1 + 2^-11 is a tie between 1 and 1 + 2^-10 and goes down to 1.
    let x = 1.0 + 2f64.powi(-12);
    let y = 1.0 + 3.0 * 2f64.powi(-11);
    let z = 1.0 + 2f64.powi(-11);
    let opa = vec![vec![x, y, -y, z]];
    let opb = vec![vec![1.0, 1.0, 1.0, 1.0]];
    let base = GemmCase { m: 1, n: 1, k: 4, alpha: 1.0, beta: 0.0, ..GemmCase::new(Transpose::N, Transpose::N) };
    let strict = run_gemm_with(&base, &opa, &opb, &[vec![0.0]]);
    assert_eq!(strict[0][0], x + z);
    let tf = GemmCase { compute: GemmCompute::F32FastTf32, ..base };
    let fast = run_gemm_with(&tf, &opa, &opb, &[vec![0.0]]);
    assert_eq!(fast[0][0], 2.0, "1 + 2^-12 must round to 1 and ties must go to even");
    assert_eq!(tf32_ref(y), 1.0 + 2f64.powi(-9));

    // Random f32 inputs with 20 significant bits, every transpose: equal to the reference that rounds to TF32,
    // different from strict f32.
    let mut rng = Rng(6);
    let mut wide = || {
        let mant = 1.0 + (rng.next() % (1 << 20)) as f64 / (1u64 << 20) as f64;
        let sign = if rng.next().is_multiple_of(2) { 1.0 } else { -1.0 };
        sign * mant * 2f64.powi((rng.next() % 5) as i32 - 2)
    };
    for (ta, tb) in TRANS {
        let cs =
            GemmCase { batch: 2, pad: 1, beta: 0.5, compute: GemmCompute::F32FastTf32, k: 6, ..GemmCase::new(ta, tb) };
        let opa: Vec<Vec<f64>> = (0..2).map(|_| (0..cs.m * cs.k).map(|_| wide()).collect()).collect();
        let opb: Vec<Vec<f64>> = (0..2).map(|_| (0..cs.k * cs.n).map(|_| wide()).collect()).collect();
        let c0: Vec<Vec<f64>> = (0..2).map(|_| (0..cs.m * cs.n).map(|_| wide()).collect()).collect();
        let fast = run_gemm_with(&cs, &opa, &opb, &c0);
        let strict = run_gemm_with(&GemmCase { compute: GemmCompute::F32, ..cs }, &opa, &opb, &c0);
        let differ = fast.iter().flatten().zip(strict.iter().flatten()).filter(|(a, b)| a != b).count();
        assert!(differ > 0, "TF32 rounding is not visible");
    }
}

/// Row-major data seen column-major: the GEMMs a lowering emits for linear layers and attention, checked against
/// row-major references that know nothing of leading dimensions.
#[test]
fn gemm_row_major_folded_and_batched() {
    let mut rng = Rng(7);
    let (batch, rows, kdim, nout) = (3, 4, 5, 6);
    // Linear layer folded over the batch: Y[batch*rows, nout] = X[batch*rows, kdim] · W[nout, kdim]^T, all
    // row-major, as one GEMM: column-major Y^T (nout × batch*rows, ld nout) = op(W) · op(X) with W read transposed
    // (ld kdim) and X as is (ld kdim): n covers all batch*rows rows.
    let x = rng.vec(batch * rows * kdim);
    let w = rng.vec(nout * kdim);
    let mut xm = Mem::new(x.len() * 4, SENTINEL);
    let mut wm = Mem::new(w.len() * 4, SENTINEL);
    let ym = Mem::new(batch * rows * nout * 4, SENTINEL);
    for (i, &v) in x.iter().enumerate() {
        xm.put(i, DType::F32, v);
    }
    for (i, &v) in w.iter().enumerate() {
        wm.put(i, DType::F32, v);
    }
    let mref = |mem: &Mem, ld: usize, stride: usize| MatrixRef {
        ptr: mem.ptr(),
        dtype: DType::F32,
        ld: ld as u64,
        stride: stride as u64,
    };
    let g = Gemm {
        transa: Transpose::T,
        transb: Transpose::N,
        m: nout as u64,
        n: (batch * rows) as u64,
        k: kdim as u64,
        alpha: 1.0,
        beta: 0.0,
        a: mref(&wm, kdim, 0),
        b: mref(&xm, kdim, 0),
        c: mref(&ym, nout, 0),
        batch: 1,
        compute: GemmCompute::F32,
        workspace: Span::new(DevPtr::NULL, 0),
    };
    // SAFETY: the footprints are the three whole buffers (x, w, y sizes), alive until the end of the test.
    unsafe { blas::execute(&g) }.unwrap();
    for r in 0..batch * rows {
        for o in 0..nout {
            let want: f64 = (0..kdim).map(|l| x[r * kdim + l] * w[o * kdim + l]).sum();
            assert_eq!(ym.get(r * nout + o, DType::F32), want, "Y[{r}][{o}]");
        }
    }

    // Attention scores per batch: S[b] = Q[b] · K[b]^T with Q, K row-major [batch, t, d] and S row-major
    // [batch, t, t]: column-major S[b]^T = op(K[b]) · op(Q[b]), K read transposed, strides t*d and t*t.
    let (t, d) = (5, 3);
    let q = rng.vec(batch * t * d);
    let kk = rng.vec(batch * t * d);
    let mut qm = Mem::new(q.len() * 4, SENTINEL);
    let mut km = Mem::new(kk.len() * 4, SENTINEL);
    let sm = Mem::new(batch * t * t * 4, SENTINEL);
    for (i, (&qv, &kv)) in q.iter().zip(&kk).enumerate() {
        qm.put(i, DType::F32, qv);
        km.put(i, DType::F32, kv);
    }
    let g = Gemm {
        transa: Transpose::T,
        transb: Transpose::N,
        m: t as u64,
        n: t as u64,
        k: d as u64,
        alpha: 0.5,
        beta: 0.0,
        a: mref(&km, d, t * d),
        b: mref(&qm, d, t * d),
        c: mref(&sm, t, t * t),
        batch: batch as u64,
        compute: GemmCompute::F32,
        workspace: Span::new(DevPtr::NULL, 0),
    };
    // SAFETY: as above: the footprints are the whole q, k and s buffers.
    unsafe { blas::execute(&g) }.unwrap();
    for b in 0..batch {
        for i in 0..t {
            for j in 0..t {
                let want: f64 = 0.5 * (0..d).map(|l| q[(b * t + i) * d + l] * kk[(b * t + j) * d + l]).sum::<f64>();
                assert_eq!(sm.get((b * t + i) * t + j, DType::F32), want, "S[{b}][{i}][{j}]");
            }
        }
    }
}

/// A valid GEMM on made-up addresses (validate reads no memory).
fn base_gemm() -> Gemm {
    let mref = |ptr: u64, ld: u64, stride: u64| MatrixRef { ptr: DevPtr(ptr), dtype: DType::F32, ld, stride };
    Gemm {
        transa: Transpose::N,
        transb: Transpose::N,
        m: 4,
        n: 3,
        k: 2,
        alpha: 1.0,
        beta: 0.0,
        a: mref(0x10000, 4, 8),
        b: mref(0x20000, 2, 6),
        c: mref(0x30000, 4, 12),
        batch: 2,
        compute: GemmCompute::F32,
        workspace: Span::new(DevPtr(0x40000), 1024),
    }
}

fn gemm_err(f: impl FnOnce(&mut Gemm)) -> String {
    let mut g = base_gemm();
    f(&mut g);
    match blas::validate(&g) {
        Ok(()) => panic!("validate accepted {g:?}"),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn assert_mentions(msg: &str, words: &[&str]) {
    for w in words {
        assert!(msg.contains(w), "error {msg:?} does not mention {w:?}");
    }
}

#[test]
fn gemm_validation_errors() {
    blas::validate(&base_gemm()).unwrap();
    // Interleaved batch instances of C (ld = batch*m, stride m) share no element: accepted.
    let mut g = base_gemm();
    g.c.ld = 8;
    g.c.stride = 4;
    blas::validate(&g).unwrap();
    // m, n, k = 0 are accepted; ld must still be >= 1.
    let mut g = base_gemm();
    (g.m, g.k) = (0, 0);
    blas::validate(&g).unwrap();

    assert_mentions(&gemm_err(|g| g.batch = 0), &["batch = 0"]);
    assert_mentions(&gemm_err(|g| g.batch = 1 << 31), &["batch"]);
    assert_mentions(&gemm_err(|g| g.a.ld = 3), &["lda = 3", "max(1", "= 4"]);
    assert_mentions(
        &gemm_err(|g| {
            g.transa = Transpose::T;
            g.a.ld = 1
        }),
        &["lda = 1", "transa = T", "= 2"],
    );
    assert_mentions(&gemm_err(|g| g.b.ld = 1), &["ldb = 1", "= 2"]);
    assert_mentions(
        &gemm_err(|g| {
            g.transb = Transpose::T;
            g.b.ld = 2
        }),
        &["ldb = 2", "transb = T", "= 3"],
    );
    assert_mentions(&gemm_err(|g| g.c.ld = 3), &["ldc = 3", "= 4"]);
    assert_mentions(
        &gemm_err(|g| {
            g.m = 0;
            g.a.ld = 0
        }),
        &["lda = 0", "max(1"],
    );
    assert_mentions(
        &gemm_err(|g| {
            g.a.dtype = DType::F64;
            g.b.dtype = DType::F64;
            g.c.dtype = DType::F64
        }),
        &["A dtype f64"],
    );
    assert_mentions(
        &gemm_err(|g| {
            g.a.dtype = DType::I32;
            g.b.dtype = DType::I32;
            g.c.dtype = DType::I32
        }),
        &["A dtype i32"],
    );
    assert_mentions(&gemm_err(|g| g.b.dtype = DType::BF16), &["B dtype bf16", "A dtype f32"]);
    assert_mentions(
        &gemm_err(|g| {
            g.a.dtype = DType::BF16;
            g.b.dtype = DType::BF16;
            g.c.dtype = DType::F16
        }),
        &["C dtype f16", "bf16"],
    );
    assert_mentions(&gemm_err(|g| g.c.dtype = DType::BF16), &["C dtype bf16"]);
    assert_mentions(
        &gemm_err(|g| {
            g.a.dtype = DType::F16;
            g.b.dtype = DType::F16;
            g.compute = GemmCompute::F32FastTf32
        }),
        &["F32FastTf32", "f16"],
    );
    assert_mentions(&gemm_err(|g| g.c.stride = 11), &["stride_c = 11", "overlap"]);
    assert_mentions(&gemm_err(|g| g.c.stride = 0), &["stride_c = 0", "overlap"]);
    // Interleaved instances that collide through the next column: instance 1 (rows 6..10 of column 0) reaches
    // into column 1 of instance 0.
    assert_mentions(
        &gemm_err(|g| {
            g.c.ld = 8;
            g.c.stride = 6
        }),
        &["stride_c = 6", "overlap"],
    );
    assert_mentions(&gemm_err(|g| g.a.ptr = DevPtr(0x10002)), &["A pointer", "aligned"]);
    assert_mentions(
        &gemm_err(|g| {
            g.a.dtype = DType::BF16;
            g.b.dtype = DType::BF16;
            g.b.ptr = DevPtr(0x20001)
        }),
        &["B pointer", "aligned", "2 bytes"],
    );
    assert_mentions(&gemm_err(|g| g.c.ptr = DevPtr(0x30002)), &["C pointer", "aligned"]);
    assert_mentions(&gemm_err(|g| g.b.ptr = DevPtr::NULL), &["B pointer is null"]);
    assert_mentions(&gemm_err(|g| g.c.ptr = DevPtr(0x10010)), &["C", "overlaps A"]);
    assert_mentions(&gemm_err(|g| g.b.ptr = DevPtr(0x30008)), &["C", "overlaps B"]);
    assert_mentions(&gemm_err(|g| g.workspace.ptr = DevPtr::NULL), &["workspace pointer is null", "1024"]);
    assert_mentions(&gemm_err(|g| g.workspace.ptr = DevPtr(0x40010)), &["workspace", "256"]);
    assert_mentions(&gemm_err(|g| g.workspace.ptr = DevPtr(0x2ff00)), &["workspace", "overlaps C"]);
    assert_mentions(&gemm_err(|g| g.a.stride = u64::MAX / 2), &["A footprint overflows"]);
    assert_mentions(&gemm_err(|g| g.b.ld = 1 << 63), &["ldb", "i64"]);
    assert_mentions(&gemm_err(|g| g.a.stride = 1 << 63), &["stride_a", "i64"]);
    // A workspace of 0 bytes may be null.
    let mut g = base_gemm();
    g.workspace = Span::new(DevPtr::NULL, 0);
    blas::validate(&g).unwrap();
}

#[test]
fn gemm_execute_validates_first() {
    let c = Mem::new(64, SENTINEL);
    let before = c.snapshot();
    let mut g = base_gemm();
    g.c.ptr = c.ptr();
    g.a.ld = 1;
    // SAFETY: validation fails before any memory is touched (A and B are made-up addresses and are never read).
    let e = unsafe { blas::execute(&g) }.unwrap_err().to_string();
    assert_mentions(&e, &["lda = 1"]);
    assert_eq!(c.snapshot(), before);
}

// ---------------------------------------------------------------------------------------------------------------
// Convolution
// ---------------------------------------------------------------------------------------------------------------

/// Element strides of a packed tensor (dims N,C,H,W) or filter (dims K,C,R,S), from the cuDNN format definitions.
fn elem_strides(layout: Layout4, d: [usize; 4]) -> [usize; 4] {
    let [_, c, h, w] = d;
    match layout {
        // N, C, H, W with W innermost (KCRS for filters).
        Layout4::Nchw => [c * h * w, h * w, w, 1],
        // N, H, W, C with C innermost (KRSC for filters).
        Layout4::Nhwc => [h * w * c, 1, w * c, c],
    }
}

fn logical_index(d: [usize; 4], i: [usize; 4]) -> usize {
    ((i[0] * d[1] + i[1]) * d[2] + i[2]) * d[3] + i[3]
}

fn for_each_index(d: [usize; 4], mut f: impl FnMut([usize; 4])) {
    for a in 0..d[0] {
        for b in 0..d[1] {
            for c in 0..d[2] {
                for e in 0..d[3] {
                    f([a, b, c, e]);
                }
            }
        }
    }
}

/// Stores logical (NCHW / KCRS order) data into `mem` in `layout`.
fn store(mem: &mut Mem, layout: Layout4, d: [usize; 4], dt: DType, data: &[f64]) {
    let st = elem_strides(layout, d);
    for_each_index(d, |i| {
        let off: usize = (0..4).map(|a| i[a] * st[a]).sum();
        mem.put(off, dt, data[logical_index(d, i)]);
    });
}

/// Reads `mem` in `layout` back into logical order.
fn fetch(mem: &Mem, layout: Layout4, d: [usize; 4], dt: DType) -> Vec<f64> {
    let st = elem_strides(layout, d);
    let bytes = mem.snapshot();
    let mut out = vec![0.0; d.iter().product()];
    for_each_index(d, |i| {
        let off: usize = (0..4).map(|a| i[a] * st[a]).sum::<usize>() * dt.size();
        out[logical_index(d, i)] = dec(dt, &bytes[off..off + dt.size()]);
    });
    out
}

#[derive(Clone, Copy, Debug)]
struct Geometry {
    x: [usize; 4],
    w: [usize; 4],
    /// [vertical, horizontal].
    stride: [usize; 2],
    pad: [usize; 2],
}

impl Geometry {
    fn square(ks: usize, stride: usize, pad: usize) -> Geometry {
        Geometry { x: [2, 3, 7, 5], w: [4, 3, ks, ks], stride: [stride; 2], pad: [pad; 2] }
    }
    fn y(&self) -> [usize; 4] {
        let o = |d: usize| (self.x[2 + d] + 2 * self.pad[d] - self.w[2 + d]) / self.stride[d] + 1;
        [self.x[0], self.w[0], o(0), o(1)]
    }
    /// Input row (`d` = 0) or column (1) read by output position `o` through filter tap `t`, if inside the input.
    fn input_pos(&self, d: usize, o: usize, t: usize) -> Option<usize> {
        let p = (o * self.stride[d] + t) as isize - self.pad[d] as isize;
        (p >= 0 && (p as usize) < self.x[2 + d]).then_some(p as usize)
    }
}

/// y = conv(x, w), gathered per output element.
fn ref_forward(g: &Geometry, x: &[f64], w: &[f64]) -> Vec<f64> {
    let [n_, c_, h_, w_] = g.x;
    let [k_, _, r_, s_] = g.w;
    let yd = g.y();
    let mut y = vec![0.0; yd.iter().product()];
    for_each_index(yd, |[n, k, oh, ow]| {
        let mut sum = 0.0;
        for c in 0..c_ {
            for r in 0..r_ {
                for s in 0..s_ {
                    if let (Some(ih), Some(iw)) = (g.input_pos(0, oh, r), g.input_pos(1, ow, s)) {
                        sum += x[logical_index([n_, c_, h_, w_], [n, c, ih, iw])]
                            * w[logical_index([k_, c_, r_, s_], [k, c, r, s])];
                    }
                }
            }
        }
        y[logical_index(yd, [n, k, oh, ow])] = sum;
    });
    y
}

/// dx = conv_transpose(dy, w), gathered per input element: output positions with `oh*stride - pad + r == ih`.
fn ref_backward_data(g: &Geometry, dy: &[f64], w: &[f64]) -> Vec<f64> {
    let [k_, _, r_, s_] = g.w;
    let yd = g.y();
    let mut dx = vec![0.0; g.x.iter().product()];
    let source = |d: usize, i: usize, t: usize| -> Option<usize> {
        let (p, st) = ((i + g.pad[d]).checked_sub(t)?, g.stride[d]);
        (p % st == 0 && p / st < yd[2 + d]).then_some(p / st)
    };
    for_each_index(g.x, |[n, c, ih, iw]| {
        let mut sum = 0.0;
        for k in 0..k_ {
            for r in 0..r_ {
                for s in 0..s_ {
                    if let (Some(oh), Some(ow)) = (source(0, ih, r), source(1, iw, s)) {
                        sum += dy[logical_index(yd, [n, k, oh, ow])] * w[logical_index(g.w, [k, c, r, s])];
                    }
                }
            }
        }
        dx[logical_index(g.x, [n, c, ih, iw])] = sum;
    });
    dx
}

/// dw = correlate(x, dy), gathered per filter element.
fn ref_backward_filter(g: &Geometry, x: &[f64], dy: &[f64]) -> Vec<f64> {
    let n_ = g.x[0];
    let yd = g.y();
    let mut dw = vec![0.0; g.w.iter().product()];
    for_each_index(g.w, |[k, c, r, s]| {
        let mut sum = 0.0;
        for n in 0..n_ {
            for oh in 0..yd[2] {
                for ow in 0..yd[3] {
                    if let (Some(ih), Some(iw)) = (g.input_pos(0, oh, r), g.input_pos(1, ow, s)) {
                        sum += x[logical_index(g.x, [n, c, ih, iw])] * dy[logical_index(yd, [n, k, oh, ow])];
                    }
                }
            }
        }
        dw[logical_index(g.w, [k, c, r, s])] = sum;
    });
    dw
}

const WORKSPACE_BYTES: usize = 96;

/// Runs one convolution through the library: `inputs` are the logical x, w, y contents (the output's entry is
/// its old value, replaced by NaN when beta == 0). Checks that only the output changed, that the workspace is
/// 0xff, that the guard bytes are untouched, and the footprints; returns the output in logical order.
#[allow(clippy::too_many_arguments)]
fn run_conv(
    dir: ConvDirection,
    layout: Layout4,
    dt: DType,
    g: &Geometry,
    x: &[f64],
    w: &[f64],
    y: &[f64],
    alpha: f32,
    beta: f32,
) -> Vec<f64> {
    let yd = g.y();
    let size = dt.size();
    let count = |d: [usize; 4]| d.iter().product::<usize>();
    let nan = |v: &[f64], is_out: bool| -> Vec<f64> {
        if is_out && beta == 0.0 {
            vec![f64::NAN; v.len()]
        } else {
            v.to_vec()
        }
    };
    let mut xm = Mem::new(count(g.x) * size, SENTINEL);
    let mut wm = Mem::new(count(g.w) * size, SENTINEL);
    let mut ym = Mem::new(count(yd) * size, SENTINEL);
    let ws = Mem::new(WORKSPACE_BYTES, 0x00);
    store(&mut xm, layout, g.x, dt, &nan(x, dir == ConvDirection::BackwardData));
    store(&mut wm, layout, g.w, dt, &nan(w, dir == ConvDirection::BackwardFilter));
    store(&mut ym, layout, yd, dt, &nan(y, dir == ConvDirection::Forward));
    let u = |d: [usize; 4]| d.map(|v| v as u64);
    let conv = Conv {
        direction: dir,
        x: Tensor4 { dims: u(g.x), layout, dtype: dt, ptr: xm.ptr() },
        w: Filter4 { dims: u(g.w), layout, dtype: dt, ptr: wm.ptr() },
        y: Tensor4 { dims: u(yd), layout, dtype: dt, ptr: ym.ptr() },
        padding: g.pad.map(|v| v as u64),
        stride: g.stride.map(|v| v as u64),
        alpha,
        beta,
        math: ConvMath::Fma,
        algo: 1,
        workspace: Span::new(ws.ptr(), WORKSPACE_BYTES as u64),
    };
    let fp = dnn::footprint(&conv);
    assert_eq!(fp.x, Span::new(xm.ptr(), (count(g.x) * size) as u64));
    assert_eq!(fp.w, Span::new(wm.ptr(), (count(g.w) * size) as u64));
    assert_eq!(fp.y, Span::new(ym.ptr(), (count(yd) * size) as u64));
    assert_eq!(fp.workspace, conv.workspace);

    let before = [xm.snapshot(), wm.snapshot(), ym.snapshot()];
    // SAFETY: the footprints are the first bytes of four distinct live `Mem`s (checked above); nothing borrows
    // them during the call.
    unsafe { dnn::execute(&conv) }.unwrap_or_else(|e| panic!("{dir:?} {layout:?} {dt} {g:?}: {e}"));
    let after = [xm.snapshot(), wm.snapshot(), ym.snapshot()];
    let out = match dir {
        ConvDirection::Forward => 2,
        ConvDirection::BackwardData => 0,
        ConvDirection::BackwardFilter => 1,
    };
    for (i, ((a, b), span)) in after.iter().zip(&before).zip([fp.x, fp.w, fp.y]).enumerate() {
        if i != out {
            assert_eq!(a, b, "{dir:?} {layout:?} {g:?}: input {i} changed");
        } else {
            let used = span.bytes as usize;
            assert_eq!(a[used..], b[used..], "{dir:?} {layout:?} {g:?}: guard after the output changed");
        }
    }
    let wsb = ws.snapshot();
    assert!(wsb[..WORKSPACE_BYTES].iter().all(|&b| b == 0xff), "workspace not filled with 0xff");
    assert!(wsb[WORKSPACE_BYTES..].iter().all(|&b| b == 0x00), "bytes after the workspace changed");
    match dir {
        ConvDirection::Forward => fetch(&ym, layout, yd, dt),
        ConvDirection::BackwardData => fetch(&xm, layout, g.x, dt),
        ConvDirection::BackwardFilter => fetch(&wm, layout, g.w, dt),
    }
}

const DIRECTIONS: [ConvDirection; 3] =
    [ConvDirection::Forward, ConvDirection::BackwardData, ConvDirection::BackwardFilter];
const LAYOUTS: [Layout4; 2] = [Layout4::Nchw, Layout4::Nhwc];

fn geometries() -> Vec<Geometry> {
    let mut out = Vec::new();
    for stride in [1, 2] {
        for pad in [0, 1, 2] {
            for ks in [1, 3] {
                out.push(Geometry::square(ks, stride, pad));
            }
        }
    }
    // Different vertical and horizontal strides, paddings and filter sizes: a swapped index shows.
    out.push(Geometry { x: [2, 3, 7, 5], w: [4, 3, 3, 3], stride: [2, 1], pad: [1, 2] });
    out.push(Geometry { x: [2, 3, 7, 5], w: [4, 3, 3, 1], stride: [1, 2], pad: [2, 0] });
    out.push(Geometry { x: [1, 2, 6, 9], w: [3, 2, 1, 3], stride: [2, 3], pad: [0, 1] });
    out
}

fn check_conv_case(rng: &mut Rng, dir: ConvDirection, layout: Layout4, dt: DType, g: &Geometry, alpha: f32, beta: f32) {
    let x = rng.vec(g.x.iter().product());
    let w = rng.vec(g.w.iter().product());
    let y = rng.vec(g.y().iter().product());
    let got = run_conv(dir, layout, dt, g, &x, &w, &y, alpha, beta);
    let (exact, old) = match dir {
        ConvDirection::Forward => (ref_forward(g, &x, &w), &y),
        ConvDirection::BackwardData => (ref_backward_data(g, &y, &w), &x),
        ConvDirection::BackwardFilter => (ref_backward_filter(g, &x, &y), &w),
    };
    for (i, (&got, (&exact, &old))) in got.iter().zip(exact.iter().zip(old)).enumerate() {
        let mut want = alpha as f64 * exact;
        if beta != 0.0 {
            want += beta as f64 * old;
        }
        let want = rounded(dt, want);
        assert!(
            same(got, want),
            "{dir:?} {layout:?} {dt} {g:?} alpha {alpha} beta {beta}: element {i} = {got}, want {want}"
        );
    }
}

#[test]
fn conv_all_directions_layouts_strides_paddings_kernels() {
    let mut rng = Rng(11);
    let mut cases = 0;
    for dir in DIRECTIONS {
        for layout in LAYOUTS {
            for g in geometries() {
                for (alpha, beta) in [(1.5, 0.0), (-0.75, 0.5)] {
                    check_conv_case(&mut rng, dir, layout, DType::F32, &g, alpha, beta);
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 3 * 2 * 15 * 2);
}

#[test]
fn conv_half_types() {
    let mut rng = Rng(12);
    for dt in [DType::BF16, DType::F16] {
        for dir in DIRECTIONS {
            for layout in LAYOUTS {
                let g = Geometry::square(3, 2, 1);
                check_conv_case(&mut rng, dir, layout, dt, &g, 1.0, 0.0);
                check_conv_case(&mut rng, dir, layout, dt, &g, 0.5, 0.5);
            }
        }
    }
}

/// Backward data and backward filter are the adjoints of forward: <dy, conv(x, w)> = <bwd_data(dy, w), x> =
/// <bwd_filter(x, dy), w>, in f64, through the library only.
#[test]
fn conv_backward_passes_are_adjoints_of_forward() {
    let mut rng = Rng(13);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for layout in LAYOUTS {
        for g in geometries() {
            let x = rng.vec(g.x.iter().product());
            let w = rng.vec(g.w.iter().product());
            let dy = rng.vec(g.y().iter().product());
            let y = run_conv(ConvDirection::Forward, layout, DType::F32, &g, &x, &w, &dy, 1.0, 0.0);
            let dx = run_conv(ConvDirection::BackwardData, layout, DType::F32, &g, &x, &w, &dy, 1.0, 0.0);
            let dw = run_conv(ConvDirection::BackwardFilter, layout, DType::F32, &g, &x, &w, &dy, 1.0, 0.0);
            let (a, b, c) = (dot(&dy, &y), dot(&dx, &x), dot(&dw, &w));
            let tol = 1e-9 * (1.0 + a.abs());
            assert!(
                (a - b).abs() <= tol && (a - c).abs() <= tol,
                "{layout:?} {g:?}: <dy,y> {a}, <dx,x> {b}, <dw,w> {c}"
            );
        }
    }
}

/// NHWC + KRSC and NCHW + KCRS hold the same convolution: the same logical data gives the same logical result.
#[test]
fn conv_layouts_agree() {
    let mut rng = Rng(14);
    let g = Geometry { x: [2, 3, 7, 5], w: [4, 3, 3, 2], stride: [2, 1], pad: [2, 1] };
    let x = rng.vec(g.x.iter().product());
    let w = rng.vec(g.w.iter().product());
    let dy = rng.vec(g.y().iter().product());
    for dir in DIRECTIONS {
        let a = run_conv(dir, Layout4::Nchw, DType::F32, &g, &x, &w, &dy, 1.0, 0.0);
        let b = run_conv(dir, Layout4::Nhwc, DType::F32, &g, &x, &w, &dy, 1.0, 0.0);
        assert_eq!(a, b, "{dir:?}");
    }
}

/// A valid convolution on made-up addresses: x [2,3,7,5], w [4,3,3,3], pad 1, stride 2: y [2,4,4,3].
fn base_conv() -> Conv {
    let t = |dims, ptr| Tensor4 { dims, layout: Layout4::Nchw, dtype: DType::F32, ptr: DevPtr(ptr) };
    Conv {
        direction: ConvDirection::Forward,
        x: t([2, 3, 7, 5], 0x100000),
        w: Filter4 { dims: [4, 3, 3, 3], layout: Layout4::Nchw, dtype: DType::F32, ptr: DevPtr(0x200000) },
        y: t([2, 4, 4, 3], 0x300000),
        padding: [1, 1],
        stride: [2, 2],
        alpha: 1.0,
        beta: 0.0,
        math: ConvMath::Fma,
        algo: 0,
        workspace: Span::new(DevPtr(0x400000), 4096),
    }
}

fn conv_err(f: impl FnOnce(&mut Conv)) -> String {
    let mut c = base_conv();
    f(&mut c);
    match dnn::validate(&c) {
        Ok(()) => panic!("validate accepted {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn conv_validation_errors() {
    dnn::validate(&base_conv()).unwrap();
    for dir in DIRECTIONS {
        let mut c = base_conv();
        c.direction = dir;
        dnn::validate(&c).unwrap();
    }
    let mut c = base_conv();
    c.workspace = Span::new(DevPtr::NULL, 0);
    dnn::validate(&c).unwrap();

    assert_mentions(
        &conv_err(|c| {
            c.x.dtype = DType::F64;
            c.w.dtype = DType::F64;
            c.y.dtype = DType::F64
        }),
        &["x dtype f64"],
    );
    assert_mentions(&conv_err(|c| c.w.dtype = DType::BF16), &["w dtype bf16", "x dtype f32"]);
    assert_mentions(&conv_err(|c| c.y.dtype = DType::F16), &["y dtype f16"]);
    assert_mentions(&conv_err(|c| c.w.layout = Layout4::Nhwc), &["w layout NHWC", "x layout NCHW"]);
    assert_mentions(&conv_err(|c| c.y.layout = Layout4::Nhwc), &["y layout NHWC"]);
    assert_mentions(&conv_err(|c| c.x.dims[0] = 0), &["x.dims", "dim 0"]);
    assert_mentions(&conv_err(|c| c.w.dims[3] = 0), &["w.dims", "dim 3"]);
    assert_mentions(&conv_err(|c| c.x.dims = [1 << 16, 1 << 16, 7, 5]), &["x.dims", "2^31-1 elements"]);
    assert_mentions(&conv_err(|c| c.w.dims[1] = 2), &["w.dims[1] = 2", "x.dims[1] = 3"]);
    assert_mentions(&conv_err(|c| c.stride = [2, 0]), &["stride = [2, 0]"]);
    assert_mentions(
        &conv_err(|c| {
            c.w.dims = [4, 3, 10, 3];
            c.padding = [1, 1]
        }),
        &["filter 10x3", "padded input 9x7"],
    );
    assert_mentions(&conv_err(|c| c.y.dims = [2, 4, 3, 3]), &["y.dims = [2, 4, 3, 3]", "[2, 4, 4, 3]"]);
    assert_mentions(&conv_err(|c| c.y.dims = [2, 5, 4, 3]), &["y.dims", "[2, 4, 4, 3]"]);
    assert_mentions(&conv_err(|c| c.algo = 8), &["algo = 8", "cudnnConvolutionFwdAlgo_t"]);
    assert_mentions(
        &conv_err(|c| {
            c.direction = ConvDirection::BackwardData;
            c.algo = 6
        }),
        &["algo = 6", "cudnnConvolutionBwdDataAlgo_t"],
    );
    assert_mentions(
        &conv_err(|c| {
            c.direction = ConvDirection::BackwardFilter;
            c.algo = 4
        }),
        &["backward filter", "algo = 4", "WINOGRAD"],
    );
    assert_mentions(&conv_err(|c| c.x.ptr = DevPtr::NULL), &["x pointer is null"]);
    assert_mentions(&conv_err(|c| c.w.ptr = DevPtr(0x200002)), &["w pointer", "aligned"]);
    assert_mentions(&conv_err(|c| c.y.ptr = DevPtr(0x100100)), &["x [", "overlaps y"]);
    assert_mentions(&conv_err(|c| c.w.ptr = DevPtr(0x100010)), &["x [", "overlaps w"]);
    assert_mentions(&conv_err(|c| c.workspace.ptr = DevPtr::NULL), &["workspace pointer is null", "4096"]);
    assert_mentions(&conv_err(|c| c.workspace.ptr = DevPtr(0x1fff00)), &["workspace", "overlaps w"]);
    assert_mentions(&conv_err(|c| c.x.ptr = DevPtr(u64::MAX - 64)), &["x (", "overflows"]);
}

#[test]
fn conv_execute_validates_first() {
    let ws = Mem::new(64, 0x00);
    let mut c = base_conv();
    c.workspace = Span::new(ws.ptr(), 64);
    c.stride = [0, 1];
    // SAFETY: validation fails before any memory is touched (x, w, y are made-up addresses, never accessed).
    let e = unsafe { dnn::execute(&c) }.unwrap_err().to_string();
    assert_mentions(&e, &["stride"]);
    assert!(ws.snapshot().iter().all(|&b| b == 0), "the workspace was filled before validation");
}
