//! Kernel semantics of kernels/layout.cu, kernels/attention.cu and kernels/check.cu, checked on the CPU under the
//! host emulation of the CUDA execution model (`zeroconv::kernels::emulate`), as tests/emulated/kernels_emulated.rs does
//! for the other modules.
//!
//! Every kernel of these modules, for every storage and index type, runs on awkward sizes (1, 31, 33, 1031,
//! permutations and broadcasts of rank 0 to 8, Lq != Lk, causal and not, ids at 0, at vocab - 1, past the end and
//! negative) under four thread schedules, whose outputs must agree bit for bit (a race or a missing barrier would
//! break that). Grids of one or two blocks exercise the grid-stride loops; a grid that covers the data once must
//! then give the very same bytes, since none of these kernels' results depends on the launch shape. References are
//! naive loops in this file, in f64 on the values the kernel read; copies and gathers must be exact, arithmetic
//! is allowed its f32 error plus the rounding of the one final store to a half type.
//!
//! Needs g++ (any machine of this project has it); without it every test fails with a message saying so.

use crate::common;

use bytemuck::{Pod, Zeroable};
use common::emulated::Kernels;
use common::Rng;
use zeroconv::engine::HostTensor;
use zeroconv::graph::{DType, Shape};
use zeroconv::kernels::emulate::{DeviceBuffer, KernelArgs};

const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F16];
const INDICES: [DType; 2] = [DType::I32, DType::I64];

// ---- harness ------------------------------------------------------------------------------------------------------

fn suffix(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::F64 => unreachable!("no kernel takes f64 tensors"),
    }
}

/// `data` rounded to `dtype` (truncated for the integer types), as little-endian bytes.
fn store(dtype: DType, data: &[f64]) -> Vec<u8> {
    HostTensor::from_f64(Shape(vec![data.len()]), dtype, data).expect("data fills shape").bytes
}

/// Integers stored as `dtype` (i32 or i64); every value must fit.
fn store_ids(dtype: DType, ids: &[i64]) -> Vec<u8> {
    match dtype {
        DType::I32 => ids.iter().flat_map(|&v| i32::try_from(v).expect("fits i32").to_le_bytes()).collect(),
        DType::I64 => ids.iter().flat_map(|&v| v.to_le_bytes()).collect(),
        _ => unreachable!("ids are i32 or i64"),
    }
}

fn load(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    let n = bytes.len() / dtype.size();
    HostTensor { shape: Shape(vec![n]), dtype, bytes: bytes.to_vec() }.to_f64()
}

fn buffer(label: &str, bytes: &[u8]) -> DeviceBuffer {
    DeviceBuffer::from_bytes(label, bytes)
}

fn output(label: &str, n: usize, dtype: DType) -> DeviceBuffer {
    DeviceBuffer::uninit(label, n * dtype.size())
}

fn seed(what: &str) -> Rng {
    Rng::new(what.bytes().fold(0x1234_5678u64, |h, b| h.wrapping_mul(131).wrapping_add(b as u64)))
}

fn uniform(rng: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| lo + (hi - lo) * (rng.uniform() * 0.5 + 0.5)).collect()
}

fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// The spacing of `dtype`'s values at |w|: one unit in the last place, subnormal spacing below the normal range.
fn ulp(dtype: DType, w: f64) -> f64 {
    let (mantissa_bits, min_exp) = match dtype {
        DType::F32 => (23, -126),
        DType::BF16 => (7, -126),
        DType::F16 => (10, -14),
        _ => unreachable!("float storage types only"),
    };
    let e = if w == 0.0 { min_exp } else { (w.abs().log2().floor() as i32).max(min_exp) };
    2f64.powi(e - mantissa_bits)
}

/// |got - want| <= f32_error + one unit of `dtype` at `want` elementwise: the kernel's f32 arithmetic (bounded by
/// the caller per element) plus the rounding of its one final store.
fn assert_within(what: &str, dtype: DType, got: &[f64], want: &[f64], f32_error: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let allowed = f32_error(i) + ulp(dtype, w);
        assert!((g - w).abs() <= allowed, "{what}: element {i} is {g}, expected {w} (allowed error {allowed:.2e})");
    }
}

/// The two grids of every case: one or two blocks (so grid-stride loops repeat on the larger sizes), and enough
/// blocks of `block` threads (or warps) to cover `n` items once.
fn grids(n: usize, block: u32, case: usize) -> (u32, u32) {
    let full = (n.div_ceil(block as usize) as u32).max(1);
    (1 + (case % 2) as u32, full)
}

/// f32 unit roundoff, 2^-24.
const F32_EPS: f64 = 1.0 / 16_777_216.0;

// ---- layout.cu: copy_strided ----------------------------------------------------------------------------------------

/// Host mirror of `StridedDims` (kernels/layout.cu), passed by value: 136 bytes, no padding (Pod proves it).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct StridedDims {
    shape: [i64; 8],
    in_strides: [i64; 8],
    rank: i32,
    pad: i32,
}
const _: () = assert!(std::mem::size_of::<StridedDims>() == 136);

/// Element strides of a row-major tensor of shape `dims`.
fn row_major_strides(dims: &[usize]) -> Vec<i64> {
    let mut s = vec![1i64; dims.len()];
    for d in (0..dims.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * dims[d + 1] as i64;
    }
    s
}

/// One strided copy: `x` holds `in_len` elements, `y` has shape `out` and reads x through `strides`.
struct CopyCase {
    what: String,
    in_len: usize,
    out: Vec<usize>,
    strides: Vec<i64>,
}

/// y = x.permute(perm): y's axis k is x's axis perm[k].
fn permute_case(shape: &[usize], perm: &[usize]) -> CopyCase {
    let s = row_major_strides(shape);
    CopyCase {
        what: format!("permute {shape:?} by {perm:?}"),
        in_len: shape.iter().product(),
        out: perm.iter().map(|&p| shape[p]).collect(),
        strides: perm.iter().map(|&p| s[p]).collect(),
    }
}

/// y = x broadcast to `to` (NumPy rules: `from` aligned to the right, stride 0 where it is 1 or missing).
fn broadcast_case(from: &[usize], to: &[usize]) -> CopyCase {
    let s = row_major_strides(from);
    let lead = to.len() - from.len();
    CopyCase {
        what: format!("broadcast {from:?} to {to:?}"),
        in_len: from.iter().product(),
        out: to.to_vec(),
        strides: (0..to.len()).map(|d| if d >= lead && from[d - lead] != 1 { s[d - lead] } else { 0 }).collect(),
    }
}

/// The naive gather: y[i] = x[sum_k idx_k(i) * strides[k]], element by element, on raw bytes.
fn gather(x: &[u8], elem: usize, shape: &[usize], strides: &[i64]) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let mut y = Vec::with_capacity(n * elem);
    for i in 0..n {
        let (mut rest, mut offset) = (i, 0i64);
        for k in (0..shape.len()).rev() {
            offset += (rest % shape[k]) as i64 * strides[k];
            rest /= shape[k];
        }
        let at = offset as usize * elem;
        y.extend_from_slice(&x[at..at + elem]);
    }
    y
}

fn check_copy_strided(k: &Kernels) {
    let cases = [
        permute_case(&[], &[]),
        permute_case(&[1], &[0]),
        permute_case(&[31], &[0]),
        permute_case(&[1031], &[0]),
        permute_case(&[33, 31], &[1, 0]),
        permute_case(&[1031, 2], &[1, 0]),
        permute_case(&[2, 3, 5], &[2, 0, 1]),
        permute_case(&[3, 1, 4, 5], &[0, 2, 3, 1]),
        permute_case(&[2, 5, 7, 3], &[3, 2, 1, 0]),
        permute_case(&[2, 3, 1, 4, 5], &[4, 1, 3, 0, 2]),
        broadcast_case(&[1], &[33]),
        broadcast_case(&[], &[31]),
        broadcast_case(&[3, 1], &[2, 3, 5]),
        broadcast_case(&[5], &[7, 5]),
        broadcast_case(&[1, 4, 1], &[2, 3, 4, 5]),
        broadcast_case(&[2, 1, 3, 1, 2], &[2, 4, 3, 2, 2]),
        broadcast_case(&[1031], &[2, 1031]),
        broadcast_case(&[2, 1, 3, 1, 2, 1, 2, 1], &[2, 2, 3, 2, 2, 1, 2, 3]), // rank 8, the most StridedDims holds
    ];
    for dtype in FLOATS {
        let sfx = suffix(dtype);
        let kernel = format!("copy_strided_{sfx}");
        for (c, case) in cases.iter().enumerate() {
            let what = format!("{kernel} {}", case.what);
            let n: usize = case.out.iter().product();
            // Arbitrary bit patterns (NaNs with payloads among them): a copy must move bytes, not values.
            let x = random_bytes(&mut seed(&what), case.in_len * dtype.size());
            let mut dims = StridedDims::zeroed();
            for (d, (&e, &s)) in case.out.iter().zip(&case.strides).enumerate() {
                dims.shape[d] = e as i64;
                dims.in_strides[d] = s;
            }
            dims.rank = case.out.len() as i32;
            let (small, full) = grids(n, 64, c);
            let got = k.each_schedule_and_grid(&what, small, full, |grid| {
                let (xb, y) = (buffer("x", &x), output("y", n, dtype));
                k.launch(&kernel, grid, 64, KernelArgs::new().buffer(&xb).buffer(&y).u64(n as u64).value(dims));
                vec![y.to_bytes()]
            });
            assert!(got[0] == gather(&x, dtype.size(), &case.out, &case.strides), "{what}: not the gathered bytes");
        }
    }
}

// ---- layout.cu: embeddings ----------------------------------------------------------------------------------------

/// (n_ids, dim, vocab): single elements, rows around a warp, one long row, a vocabulary of one.
const EMBEDDING_CASES: [(usize, usize, usize); 6] =
    [(1, 1, 1), (31, 33, 7), (33, 1, 40), (5, 1031, 3), (40, 8, 1), (3, 2, 1031)];

/// Random ids in range, with 0 and vocab - 1 present; with `bad`, every third id replaced by one out of range
/// (negative, vocab itself, far past it, and for i64 one that an i32 truncation would bring back in range).
fn embedding_ids(rng: &mut Rng, n_ids: usize, vocab: usize, index: DType, bad: bool) -> Vec<i64> {
    let mut ids: Vec<i64> = (0..n_ids).map(|_| rng.below(vocab as u64) as i64).collect();
    ids[0] = 0;
    ids[n_ids - 1] = vocab as i64 - 1;
    if bad {
        let wide = index == DType::I64;
        let out_of_range = [
            -1,
            vocab as i64,
            if wide { i64::MIN } else { i32::MIN as i64 },
            vocab as i64 + 1000,
            if wide { (1i64 << 32) + 1 } else { i32::MAX as i64 },
            if wide { i64::MAX } else { -7 },
        ];
        for (j, i) in (0..n_ids).filter(|i| i % 3 == 1 || n_ids == 1).enumerate() {
            ids[i] = out_of_range[j % out_of_range.len()];
        }
    }
    ids
}

fn check_embedding(k: &Kernels) {
    for dtype in FLOATS {
        for index in INDICES {
            let kernel = format!("embedding_{}_{}", suffix(dtype), suffix(index));
            for (c, &(n_ids, dim, vocab)) in EMBEDDING_CASES.iter().enumerate() {
                for (bad, err_before) in [(false, 0u32), (true, 0), (false, 1)] {
                    let what = format!("{kernel} {n_ids} ids, dim {dim}, vocab {vocab}, bad ids {bad}");
                    let mut rng = seed(&what);
                    let table = random_bytes(&mut rng, vocab * dim * dtype.size());
                    let ids = embedding_ids(&mut rng, n_ids, vocab, index, bad);
                    let n = n_ids * dim;
                    let (small, full) = grids(n, 32, c);
                    let got = k.each_schedule_and_grid(&what, small, full, |grid| {
                        let (tb, ib) = (buffer("table", &table), buffer("ids", &store_ids(index, &ids)));
                        let (out, err) = (output("out", n, dtype), DeviceBuffer::from_slice("err", &[err_before]));
                        let args = KernelArgs::new().buffer(&tb).buffer(&ib).buffer(&out);
                        let args = args.u64(n_ids as u64).u64(dim as u64).u64(vocab as u64).buffer(&err);
                        k.launch(&kernel, grid, 32, args);
                        vec![out.to_bytes(), err.to_bytes()]
                    });
                    let row = dim * dtype.size();
                    let mut want = Vec::with_capacity(n * dtype.size());
                    for &id in &ids {
                        if (0..vocab as i64).contains(&id) {
                            want.extend_from_slice(&table[id as usize * row..(id as usize + 1) * row]);
                        } else {
                            want.extend(vec![0u8; row]);
                        }
                    }
                    assert!(got[0] == want, "{what}: rows differ from the table's (or bad rows are not zero)");
                    let err = u32::from_le_bytes(got[1][..4].try_into().unwrap());
                    assert_eq!(err, u32::from(bad) | err_before, "{what}: error flag");
                }
            }
        }
    }
}

fn check_embedding_bwd(k: &Kernels) {
    for dtype in FLOATS {
        for index in INDICES {
            let kernel = format!("embedding_bwd_{}_{}", suffix(dtype), suffix(index));
            for (c, &(n_ids, dim, vocab)) in EMBEDDING_CASES.iter().enumerate() {
                for bad in [false, true] {
                    let what = format!("{kernel} {n_ids} ids, dim {dim}, vocab {vocab}, bad ids {bad}");
                    let mut rng = seed(&what);
                    let ids = embedding_ids(&mut rng, n_ids, vocab, index, bad);
                    let dy = store(dtype, &uniform(&mut rng, n_ids * dim, -1.0, 1.0));
                    let n = vocab * dim;
                    let (small, full) = grids(n, 64, c);
                    let got = k.each_schedule_and_grid(&what, small, full, |grid| {
                        let (ib, dyb) = (buffer("ids", &store_ids(index, &ids)), buffer("dy", &dy));
                        let dtable = output("dtable", n, dtype);
                        let args = KernelArgs::new().buffer(&ib).buffer(&dyb).buffer(&dtable);
                        k.launch(&kernel, grid, 64, args.u64(n_ids as u64).u64(dim as u64).u64(vocab as u64));
                        vec![dtable.to_bytes()]
                    });
                    // f64 sums of the values read, with the size of their terms and how many there are.
                    let dyv = load(dtype, &dy);
                    let (mut want, mut terms, mut count) = (vec![0.0; n], vec![0.0; n], vec![0usize; n]);
                    for (i, &id) in ids.iter().enumerate() {
                        if (0..vocab as i64).contains(&id) {
                            for d in 0..dim {
                                let at = id as usize * dim + d;
                                want[at] += dyv[i * dim + d];
                                terms[at] += dyv[i * dim + d].abs();
                                count[at] += 1;
                            }
                        }
                    }
                    let gotv = load(dtype, &got[0]);
                    // Sequential f32 additions: at most count * 2^-24 * sum |terms| off.
                    assert_within(&what, dtype, &gotv, &want, |i| count[i] as f64 * F32_EPS * terms[i]);
                    for (i, &c) in count.iter().enumerate() {
                        let bits = &got[0][i * dtype.size()..(i + 1) * dtype.size()];
                        assert!(c > 0 || bits.iter().all(|&b| b == 0), "{what}: row {} never named, not +0", i / dim);
                    }
                }
            }
        }
    }
}

// ---- layout.cu: timestep embedding and integer fills -------------------------------------------------------------

/// The CPU backend's formula (engine/cpu/layout.rs `timestep_embedding`), element by element.
fn timestep_reference(t: &[f64], dim: usize, max_period: f64) -> Vec<f32> {
    let half = dim / 2;
    let mut out = Vec::with_capacity(t.len() * dim);
    for &tb in t {
        for k in 0..dim {
            let f = (-(max_period.ln()) * (k % half) as f64 / half as f64).exp();
            let arg = tb * f;
            out.push(if k < half { arg.cos() } else { arg.sin() } as f32);
        }
    }
    out
}

fn check_timestep_embedding(k: &Kernels) {
    // (batch, dim, max_period)
    let cases = [(1, 2, 10_000.0), (3, 32, 10_000.0), (33, 320, 10_000.0), (2, 1030, 10_000.0), (5, 6, 100.0)];
    for t_type in [DType::I32, DType::I64, DType::F32] {
        let kernel = format!("timestep_embedding_{}", suffix(t_type));
        for (c, &(batch, dim, max_period)) in cases.iter().enumerate() {
            let what = format!("{kernel} batch {batch}, dim {dim}, max_period {max_period}");
            let mut rng = seed(&what);
            // Diffusion timesteps (0 and 999 among them), a negative one, and for f32 fractional ones.
            let mut t: Vec<f64> = (0..batch).map(|_| rng.below(1000) as f64).collect();
            t[0] = 0.0;
            if batch > 2 {
                t[1] = 999.0;
                t[2] = -5.0;
            }
            if t_type == DType::F32 {
                t.iter_mut().skip(3).for_each(|v| *v += 0.25 + rng.uniform().abs() * 0.5);
            }
            let tb = store(t_type, &t);
            let t_read = load(t_type, &tb);
            let n = batch * dim;
            let (small, full) = grids(n, 64, c);
            let got = k.each_schedule_and_grid(&what, small, full, |grid| {
                let (tbuf, out) = (buffer("t", &tb), output("out", n, DType::F32));
                let args = KernelArgs::new().buffer(&tbuf).buffer(&out).u64(batch as u64).u64(dim as u64);
                k.launch(&kernel, grid, 64, args.value(max_period));
                vec![out.to_bytes()]
            });
            let want: Vec<f64> = timestep_reference(&t_read, dim, max_period).iter().map(|&v| v as f64).collect();
            // The same f64 expression; CUDA's f64 libm may differ from the host's in the last f64 bit, which can
            // move the f32 rounding by one unit.
            assert_within(&what, DType::F32, &load(DType::F32, &got[0]), &want, |_| 0.0);
        }
        // dim < 2 has no frequencies: nothing is written.
        let (tbuf, out) = (buffer("t", &store(t_type, &[3.0, 4.0])), buffer("out", &[0xabu8; 8]));
        let args = KernelArgs::new().buffer(&tbuf).buffer(&out).u64(2).u64(1).value(10_000.0f64);
        k.launch(&kernel, 1, 32, args);
        assert_eq!(out.to_bytes(), [0xab; 8], "{kernel} dim 1 wrote its output");
    }
}

fn check_fill_int(k: &Kernels) {
    for (c, n) in [1usize, 31, 33, 1031].into_iter().enumerate() {
        let (small, full) = grids(n, 32, c);
        let value = i32::MIN + 5;
        let got = k.each_schedule_and_grid(&format!("fill_i32 n={n}"), small, full, |grid| {
            let y = output("y", n, DType::I32);
            k.launch("fill_i32", grid, 32, KernelArgs::new().buffer(&y).u64(n as u64).i32(value));
            vec![y.to_bytes()]
        });
        assert!(got[0] == store_ids(DType::I32, &vec![value as i64; n]), "fill_i32 n={n}");
        let value = -(1i64 << 40) - 3;
        let got = k.each_schedule_and_grid(&format!("fill_i64 n={n}"), small, full, |grid| {
            let y = output("y", n, DType::I64);
            k.launch("fill_i64", grid, 32, KernelArgs::new().buffer(&y).u64(n as u64).value(value));
            vec![y.to_bytes()]
        });
        assert!(got[0] == store_ids(DType::I64, &vec![value; n]), "fill_i64 n={n}");
    }
}

#[test]
fn layout_kernels_match_naive_references() {
    let k = Kernels::new("layout");
    check_copy_strided(&k);
    check_embedding(&k);
    check_embedding_bwd(&k);
    check_timestep_embedding(&k);
    check_fill_int(&k);
    k.assert_all_launched();
}

// ---- attention.cu ---------------------------------------------------------------------------------------------------

/// f64 softmax of row r's visible scores (key j <= r % lq when causal), 0 on the masked keys.
/// The probabilities and each row's log-sum-exp over its visible keys.
fn attention_reference(s: &[f64], rows: usize, lq: usize, lk: usize, causal: bool) -> (Vec<f64>, Vec<f64>) {
    let mut p = vec![0.0; rows * lk];
    let mut lse = vec![0.0; rows];
    for r in 0..rows {
        let visible = if causal { (r % lq + 1).min(lk) } else { lk };
        let row = &s[r * lk..r * lk + visible];
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        let sum: f64 = row.iter().map(|&v| (v - m).exp()).sum();
        for j in 0..visible {
            p[r * lk + j] = (row[j] - m).exp() / sum;
        }
        lse[r] = m + sum.ln();
    }
    (p, lse)
}

#[test]
fn attention_kernels_match_f64_softmax() {
    let k = Kernels::new("attention");
    check_attention(&k);
    k.assert_all_launched();
}

fn check_attention(k: &Kernels) {
    // (batch * heads, lq, lk, warps per block): a single key, Lq < Lk, Lq > Lk (causal rows past the last key see
    // every key), rows around a warp, one row longer than a block.
    let cases = [(1, 1, 1, 1), (2, 3, 5, 2), (1, 33, 31, 3), (2, 5, 1031, 4), (3, 7, 64, 1), (1, 40, 33, 2)];
    for dtype in FLOATS {
        let sfx = suffix(dtype);
        for (c, &(bh, lq, lk, warps)) in cases.iter().enumerate() {
            let rows = bh * lq;
            let (small, full) = grids(rows, warps as u32, c);
            for causal in [false, true] {
                let what = format!("{bh}x{lq}x{lk} causal {causal} {sfx}");
                let mut rng = seed(&what);
                let mut sv = uniform(&mut rng, rows * lk, -8.0, 8.0);
                if lk > 2 {
                    sv[lk + 1] = f64::NEG_INFINITY; // masked by a score: weight 0, the rest of the row unaffected
                }
                let s = store(DType::F32, &sv);
                let sv = load(DType::F32, &s);

                let fwd = format!("attn_softmax_fwd_{sfx}");
                let got = k.each_schedule_and_grid(&format!("{fwd} {what}"), small, full, |grid| {
                    let (sb, p, lse) =
                        (buffer("s", &s), output("p", rows * lk, dtype), output("lse", rows, DType::F32));
                    let args = KernelArgs::new().buffer(&sb).buffer(&p).buffer(&lse).u64(rows as u64).u64(lq as u64);
                    k.launch(&fwd, grid, (32, warps as u32), args.u64(lk as u64).i32(causal as i32));
                    vec![p.to_bytes(), lse.to_bytes()]
                });
                let (want, want_lse) = attention_reference(&sv, rows, lq, lk, causal);
                // max + logf(sum): the sum's few f32 roundings, relative to the log-sum-exp's size.
                let lse = load(DType::F32, &got[1]);
                assert_within(&format!("{fwd} {what} lse"), DType::F32, &lse, &want_lse, |i| {
                    4e-6 * (want_lse[i].abs() + 1.0)
                });
                // expf of (s - max) rounded in f32 (|s - max| <= 16), and a sum of at most 33 terms per lane plus
                // a 5-level butterfly: well under 2e-5 relative.
                let pv = load(dtype, &got[0]);
                assert_within(&format!("{fwd} {what}"), dtype, &pv, &want, |i| 2e-5 * want[i].abs());
                for (i, &w) in want.iter().enumerate() {
                    let bits = &got[0][i * dtype.size()..(i + 1) * dtype.size()];
                    assert!(w != 0.0 || bits.iter().all(|&b| b == 0), "{fwd} {what}: masked element {i} is not +0");
                }
                if dtype == DType::F32 {
                    // In place (p == s), as the header allows for f32; without the log-sum-exp (null).
                    let sb = buffer("s", &s);
                    let args = KernelArgs::new().buffer(&sb).buffer(&sb).null().u64(rows as u64).u64(lq as u64);
                    k.launch(&fwd, small, (32, warps as u32), args.u64(lk as u64).i32(causal as i32));
                    assert!(sb.to_bytes() == got[0], "{fwd} {what}: in place differs");
                }

                // The backward reads p as the forward stored it.
                let p = got[0].clone();
                let dp = store(DType::F32, &uniform(&mut rng, rows * lk, -1.0, 1.0));
                let (pv, dpv) = (load(dtype, &p), load(DType::F32, &dp));
                let bwd = format!("attn_softmax_bwd_{sfx}");
                let got = k.each_schedule_and_grid(&format!("{bwd} {what}"), small, full, |grid| {
                    let (pb, dpb, ds) = (buffer("p", &p), buffer("dp", &dp), output("ds", rows * lk, dtype));
                    let args = KernelArgs::new().buffer(&pb).buffer(&dpb).buffer(&ds).u64(rows as u64);
                    k.launch(&bwd, grid, (32, warps as u32), args.u64(lk as u64));
                    vec![ds.to_bytes()]
                });
                let (mut want, mut scale) = (vec![0.0; rows * lk], vec![0.0; rows * lk]);
                for r in 0..rows {
                    let range = r * lk..(r + 1) * lk;
                    let dot: f64 = range.clone().map(|i| pv[i] * dpv[i]).sum();
                    let dot_terms: f64 = range.clone().map(|i| (pv[i] * dpv[i]).abs()).sum();
                    for i in range {
                        want[i] = pv[i] * (dpv[i] - dot);
                        scale[i] = pv[i].abs() * (dpv[i].abs() + dot_terms);
                    }
                }
                // ds = p * (dp - dot) cancels where dp is close to dot; its error is relative to its terms.
                assert_within(&format!("{bwd} {what}"), dtype, &load(dtype, &got[0]), &want, |i| 1e-5 * scale[i]);
                // In place (ds == p), as the header allows.
                let (pb, dpb) = (buffer("p", &p), buffer("dp", &dp));
                let args = KernelArgs::new().buffer(&pb).buffer(&dpb).buffer(&pb).u64(rows as u64);
                k.launch(&bwd, small, (32, warps as u32), args.u64(lk as u64));
                assert!(pb.to_bytes() == got[0], "{bwd} {what}: in place differs");
            }
        }
    }
}

// ---- check.cu -------------------------------------------------------------------------------------------------------

/// Bit patterns of `dtype`: (NaN, +inf, -inf, NaN with the sign set) and (largest finite, smallest subnormal,
/// -0), which are finite.
fn special_bits(dtype: DType) -> ([u32; 4], [u32; 3]) {
    match dtype {
        DType::F32 => ([0x7fc0_0000, 0x7f80_0000, 0xff80_0000, 0xff80_0001], [0x7f7f_ffff, 0x0000_0001, 0x8000_0000]),
        DType::BF16 => ([0x7fc1, 0x7f80, 0xff80, 0xffc0], [0x7f7f, 0x0001, 0x8000]),
        DType::F16 => ([0x7e00, 0x7c00, 0xfc00, 0xfc01], [0x7bff, 0x0001, 0x8000]),
        _ => unreachable!("float storage types only"),
    }
}

fn put_bits(bytes: &mut [u8], dtype: DType, i: usize, bits: u32) {
    let size = dtype.size();
    bytes[i * size..(i + 1) * size].copy_from_slice(&bits.to_le_bytes()[..size]);
}

#[test]
fn check_finite_kernels_flag_the_smallest_bad_node() {
    let k = Kernels::new("check");
    check_finite(&k);
    k.assert_all_launched();
}

fn check_finite(k: &Kernels) {
    for dtype in FLOATS {
        let kernel = format!("check_finite_{}", suffix(dtype));
        let (bad_bits, finite_bits) = special_bits(dtype);
        for (c, n) in [1usize, 31, 33, 1031].into_iter().enumerate() {
            let what = format!("{kernel} n={n}");
            let mut rng = seed(&what);
            let mut finite = store(dtype, &uniform(&mut rng, n, -1000.0, 1000.0));
            for (j, &bits) in finite_bits.iter().enumerate() {
                put_bits(&mut finite, dtype, (j * 13) % n, bits);
            }
            // Tensors with one bad element each, at the start, the end, the middle, and a wrapped position.
            let bad: Vec<Vec<u8>> = bad_bits
                .iter()
                .zip([0, n - 1, n / 2, 37 % n])
                .map(|(&bits, at)| {
                    let mut x = finite.clone();
                    put_bits(&mut x, dtype, at, bits);
                    x
                })
                .collect();
            // (tensor, node) in launch order: the flag ends at the smallest node whose tensor was bad.
            let launches: [(&[u8], u32); 7] =
                [(&finite, 2), (&bad[0], 7), (&finite, 1), (&bad[1], 9), (&bad[2], 5), (&bad[3], 6), (&finite, 0)];
            let (small, full) = grids(n, 32, c);
            let got = k.each_schedule_and_grid(&what, small, full, |grid| {
                let first_bad = DeviceBuffer::from_slice("first_bad", &[u32::MAX]);
                let mut seen = Vec::new();
                for &(x, node) in &launches {
                    let xb = buffer("x", x);
                    let args = KernelArgs::new().buffer(&xb).u64(n as u64).u32(node).buffer(&first_bad);
                    k.launch(&kernel, grid, 32, args);
                    seen.push(first_bad.to_bytes());
                }
                seen
            });
            let flags: Vec<u32> = got.iter().map(|b| u32::from_le_bytes(b[..4].try_into().unwrap())).collect();
            assert_eq!(flags, [u32::MAX, 7, 7, 7, 5, 5, 5], "{what}: first_bad after each launch");
        }
    }
}
