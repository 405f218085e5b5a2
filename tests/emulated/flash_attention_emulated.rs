//! The FlashAttention-2 kernels (kernels/flash_attention.cu, kernels/flash_attention_bwd.cu) under the CUDA
//! emulator, against the CPU backend's attention (Op::Attention and Op::AttentionBackward, run in f64 on the values
//! the kernels read).
//!
//! Every head dim (16, 32, 40, 64, 80, 128, 160), lengths that are not multiples of the 64-row tiles (1, 17, 77, 100, 257,
//! with Lq < Lk, Lq > Lk and a single key), causal and not, bf16 and f16: O and the log-sum-exp of the forward,
//! then dQ, dK and dV of the backward fed with the kernel's own O and log-sum-exp, as the executor would. Each case
//! runs under every emulator schedule (warp orders, lockstep, shuffled; blocks ascending and descending), whose
//! outputs must be the same bits: the kernels use no atomics and no order-dependent reduction, and the backward
//! must also repeat its bits run after run. Output buffers start as NaN, so an element no block writes fails the
//! comparison; guard bands catch writes past a tensor.
//!
//! Tolerances: the kernels round the probabilities to the storage type once (the A operand of P V and of the
//! gradient products), accumulate in f32, and round each output once, so the error of an output element is a few
//! units in the last place of the storage type relative to the size of the terms it sums (`terms` below), plus
//! the storage rounding of the result itself.

use crate::common;

use common::emulated::Kernels;
use common::Rng;
use zeroconv::engine::cpu::CpuBackend;
use zeroconv::engine::{Backend, HostTensor, Program};
use zeroconv::graph::{DType, F64Bits, Graph, Op, Shape, ValueId};
use zeroconv::kernels::emulate::{DeviceBuffer, KernelArgs, LaunchConfig, Schedule};

const HEAD_DIMS: [usize; 7] = [16, 32, 40, 64, 80, 128, 160];
const BLOCK: usize = 64;

fn pad16(d: usize) -> usize {
    d.div_ceil(16) * 16
}

/// Dynamic shared memory of the forward: Q, K and V tiles of 64 rows of pad16(D) + 8 16-bit elements.
fn fwd_smem(d: usize) -> u32 {
    (3 * BLOCK * (pad16(d) + 8) * 2) as u32
}

/// Of the backward kernels: four such tiles and two f32 rows of 64.
fn bwd_smem(d: usize) -> u32 {
    (4 * BLOCK * (pad16(d) + 8) * 2 + 2 * BLOCK * 4) as u32
}

fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => unreachable!("flash attention stores bf16 or f16"),
    }
}

/// One attention problem: BH heads of q [lq, d], k and v [lk, d].
#[derive(Clone, Copy, Debug)]
struct Case {
    bh: usize,
    lq: usize,
    lk: usize,
    d: usize,
    causal: bool,
}

impl Case {
    fn scale(&self) -> f64 {
        1.0 / (self.d as f64).sqrt()
    }
    fn name(&self, dtype: DType) -> String {
        let Case { bh, lq, lk, d, causal } = *self;
        format!("bh {bh} lq {lq} lk {lk} d {d} causal {causal} {}", suffix(dtype))
    }
}

/// The cases: every head dim, every length of the issue, cross (Lq != Lk) and self attention, causal and not.
fn cases() -> Vec<Case> {
    let c = |bh, lq, lk, d, causal| Case { bh, lq, lk, d, causal };
    vec![
        c(2, 100, 77, 16, false),
        c(1, 257, 17, 16, true),
        c(1, 17, 100, 32, false),
        c(1, 100, 100, 32, true),
        c(2, 17, 77, 40, false),
        c(1, 100, 100, 40, true),
        c(1, 1, 17, 64, false),
        c(1, 77, 77, 64, true),
        c(1, 257, 100, 80, false),
        c(1, 100, 257, 80, true),
        c(1, 17, 1, 128, false),
        c(1, 77, 17, 128, true),
        c(2, 100, 77, 160, false),
        c(1, 257, 257, 160, true),
    ]
}

struct Inputs {
    q: HostTensor,
    k: HostTensor,
    v: HostTensor,
    dout: HostTensor,
}

fn tensor(shape: &[usize], dtype: DType, data: &[f64]) -> HostTensor {
    HostTensor::from_f64(Shape(shape.to_vec()), dtype, data).expect("data fills shape")
}

fn inputs(case: &Case, dtype: DType) -> Inputs {
    let Case { bh, lq, lk, d, .. } = *case;
    let seed = case.name(dtype).bytes().fold(0x9e37_79b9u64, |h, b| h.wrapping_mul(131).wrapping_add(b as u64));
    let mut rng = Rng::new(seed);
    let mut draw = |n: usize, amp: f64| (0..n).map(|_| amp * rng.uniform()).collect::<Vec<f64>>();
    // Scores of a few units after scaling, so the softmax is neither flat nor one-hot.
    let q = tensor(&[1, bh, lq, d], dtype, &draw(bh * lq * d, 2.0));
    let k = tensor(&[1, bh, lk, d], dtype, &draw(bh * lk * d, 2.0));
    let v = tensor(&[1, bh, lk, d], dtype, &draw(bh * lk * d, 1.0));
    let dout = tensor(&[1, bh, lq, d], dtype, &draw(bh * lq * d, 1.0));
    Inputs { q, k, v, dout }
}

/// Runs `op` on the CPU backend in f64 on the values of `ins` (as the kernels read them) and returns its outputs.
fn cpu(ins: &[&HostTensor], op: Op) -> Vec<Vec<f64>> {
    let mut g = Graph::new();
    let ids: Vec<ValueId> =
        ins.iter().enumerate().map(|(i, t)| g.input(&format!("in{i}"), t.shape.clone(), DType::F64)).collect();
    let outs = g.add_node(op, &ids).expect("attention node");
    let mut p = CpuBackend::new(1).compile(g).expect("compile the reference graph");
    for (&v, t) in ids.iter().zip(ins) {
        let wide = HostTensor::from_f64(t.shape.clone(), DType::F64, &t.to_f64()).expect("f64 copy");
        p.upload(v, &wide).expect("upload");
    }
    p.launch().expect("run the reference graph");
    outs.iter().map(|&o| p.download(o).expect("download").to_f64()).collect()
}

fn values(bytes: &[u8], dtype: DType) -> Vec<f64> {
    HostTensor { shape: Shape(vec![bytes.len() / dtype.size()]), dtype, bytes: bytes.to_vec() }.to_f64()
}

fn f32s(bytes: &[u8]) -> Vec<f64> {
    bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
}

/// Units in the last place of the storage type, relative.
fn eps(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        _ => unreachable!(),
    }
}

/// The largest |got - want| / (eps (|want| + terms)) and where, with `terms` the size of what each element sums
/// (NaN counts as infinitely wrong). Correct kernels stay below 1 on these cases (measured: at most 0.83).
fn worst_error(dtype: DType, got: &[f64], want: &[f64], terms: &[f64]) -> (f64, usize) {
    assert_eq!(got.len(), want.len(), "length");
    let e = eps(dtype);
    let mut worst = (0.0, 0);
    for (i, ((&g, &w), &t)) in got.iter().zip(want).zip(terms).enumerate() {
        let ratio = (g - w).abs() / (e * (w.abs() + t) + 1e-6);
        let ratio = if ratio.is_nan() { f64::INFINITY } else { ratio };
        if ratio > worst.0 {
            worst = (ratio, i);
        }
    }
    worst
}

/// |got - want| <= 4 eps (|want| + terms) per element.
fn assert_close(what: &str, dtype: DType, got: &[f64], want: &[f64], terms: &[f64]) {
    let (ratio, i) = worst_error(dtype, got, want, terms);
    assert!(ratio <= 4.0, "{what}: element {i} is {}, expected {} ({ratio:.1} units, 4 allowed)", got[i], want[i]);
}

/// The f64 softmax probabilities p[h][i][j] of the case (0 on masked keys) and the log-sum-exp per row.
fn probabilities(case: &Case, x: &Inputs) -> (Vec<f64>, Vec<f64>) {
    let Case { bh, lq, lk, d, causal } = *case;
    let (q, k) = (x.q.to_f64(), x.k.to_f64());
    let (mut p, mut lse) = (vec![0.0; bh * lq * lk], vec![0.0; bh * lq]);
    for h in 0..bh {
        for i in 0..lq {
            let visible = if causal { (i + 1).min(lk) } else { lk };
            let s: Vec<f64> = (0..visible)
                .map(|j| case.scale() * (0..d).map(|c| q[(h * lq + i) * d + c] * k[(h * lk + j) * d + c]).sum::<f64>())
                .collect();
            let m = s.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let sum: f64 = s.iter().map(|&x| (x - m).exp()).sum();
            lse[h * lq + i] = m + sum.ln();
            for (j, &sj) in s.iter().enumerate() {
                p[(h * lq + i) * lk + j] = (sj - m).exp() / sum;
            }
        }
    }
    (p, lse)
}

/// Σ_b |a_ib| |c_bj| for row-major a [n][m] and c [m][r], per head: the size of the terms of (a c)_ij.
fn abs_product(a: &[f64], c: &[f64], heads: usize, n: usize, m: usize, r: usize, transpose_a: bool) -> Vec<f64> {
    let mut out = vec![0.0; heads * n * r];
    for h in 0..heads {
        for i in 0..n {
            for b in 0..m {
                let av = if transpose_a { a[h * m * n + b * n + i] } else { a[h * n * m + i * m + b] }.abs();
                for j in 0..r {
                    out[(h * n + i) * r + j] += av * c[(h * m + b) * r + j].abs();
                }
            }
        }
    }
    out
}

fn launch_forward(k: &Kernels, case: &Case, dtype: DType, x: &Inputs) -> Vec<Vec<u8>> {
    let Case { bh, lq, lk, d, causal } = *case;
    let kernel = format!("flash_attn_fwd_{}_d{d}", suffix(dtype));
    let (q, kb, v) = (
        DeviceBuffer::from_bytes("q", &x.q.bytes),
        DeviceBuffer::from_bytes("k", &x.k.bytes),
        DeviceBuffer::from_bytes("v", &x.v.bytes),
    );
    let (o, lse) = (DeviceBuffer::uninit("o", bh * lq * d * dtype.size()), DeviceBuffer::uninit("lse", bh * lq * 4));
    let args = KernelArgs::new().buffer(&q).buffer(&kb).buffer(&v).buffer(&o).buffer(&lse);
    let args = args.u64(lq as u64).u64(lk as u64).f32(case.scale() as f32).i32(causal as i32);
    k.launch_with_shared(&kernel, (lq.div_ceil(BLOCK) as u32, bh as u32), 128, fwd_smem(d), args);
    vec![o.to_bytes(), lse.to_bytes()]
}

/// delta, then dK and dV, then dQ, from the forward's o and lse.
fn launch_backward(k: &Kernels, case: &Case, dtype: DType, x: &Inputs, o: &[u8], lse: &[u8]) -> Vec<Vec<u8>> {
    let Case { bh, lq, lk, d, causal } = *case;
    let sfx = suffix(dtype);
    let buf = |name: &str, bytes: &[u8]| DeviceBuffer::from_bytes(name, bytes);
    let (q, kb, v, dout) =
        (buf("q", &x.q.bytes), buf("k", &x.k.bytes), buf("v", &x.v.bytes), buf("dout", &x.dout.bytes));
    let (ob, lseb) = (buf("o", o), buf("lse", lse));
    let delta = DeviceBuffer::uninit("delta", bh * lq * 4);
    let args = KernelArgs::new().buffer(&ob).buffer(&dout).buffer(&delta).u64((bh * lq) as u64).u64(d as u64);
    k.launch(&format!("flash_attn_bwd_delta_{sfx}"), 2, (32, 4), args);

    let size = dtype.size();
    let (dq, dk, dv) = (
        DeviceBuffer::uninit("dq", bh * lq * d * size),
        DeviceBuffer::uninit("dk", bh * lk * d * size),
        DeviceBuffer::uninit("dv", bh * lk * d * size),
    );
    let common = || KernelArgs::new().buffer(&q).buffer(&kb).buffer(&v).buffer(&dout).buffer(&lseb).buffer(&delta);
    let tail = |a: KernelArgs| a.u64(lq as u64).u64(lk as u64).f32(case.scale() as f32).i32(causal as i32);
    let kv = common().buffer(&dk).buffer(&dv);
    k.launch_with_shared(
        &format!("flash_attn_bwd_dkdv_{sfx}_d{d}"),
        (lk.div_ceil(BLOCK) as u32, bh as u32),
        128,
        bwd_smem(d),
        tail(kv),
    );
    k.launch_with_shared(
        &format!("flash_attn_bwd_dq_{sfx}_d{d}"),
        (lq.div_ceil(BLOCK) as u32, bh as u32),
        128,
        bwd_smem(d),
        tail(common().buffer(&dq)),
    );
    vec![delta.to_bytes(), dq.to_bytes(), dk.to_bytes(), dv.to_bytes()]
}

#[test]
fn flash_attention_matches_the_cpu_backend() {
    let fwd = Kernels::new("flash_attention");
    let bwd = Kernels::new("flash_attention_bwd");
    for d in HEAD_DIMS {
        assert!(cases().iter().any(|c| c.d == d && c.causal) && cases().iter().any(|c| c.d == d && !c.causal));
    }
    for case in cases() {
        let Case { bh, lq, lk, d, causal } = case;
        for dtype in [DType::BF16, DType::F16] {
            let what = case.name(dtype);
            let x = inputs(&case, dtype);
            let scale = F64Bits::new(case.scale());

            // Forward: O and the log-sum-exp.
            let got = fwd.each_schedule(&format!("forward {what}"), || launch_forward(&fwd, &case, dtype, &x));
            // The graph's attention with its log-sum-exp output, on the CPU backend: what the executor's flash
            // forward stands in for.
            let want = cpu(&[&x.q, &x.k, &x.v], Op::Attention { scale, causal, lse: true });
            let (p, lse) = probabilities(&case, &x);
            let v = x.v.to_f64();
            let o_terms = abs_product(&p, &v, bh, lq, lk, d, false);
            assert_close(&format!("O, {what}"), dtype, &values(&got[0], dtype), &want[0], &o_terms);
            let got_lse = f32s(&got[1]);
            for (i, ((&g, &w), &c)) in got_lse.iter().zip(&lse).zip(&want[1]).enumerate() {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "lse, {what}: row {i} is {g}, expected {w}");
                assert!((c - w).abs() <= 1e-12 * (1.0 + w.abs()), "CPU lse, {what}: row {i} is {c}, expected {w}");
            }

            // Backward, from the kernel's own O and log-sum-exp.
            let (o, lse_bytes) = (got[0].clone(), got[1].clone());
            let got = bwd
                .each_schedule(&format!("backward {what}"), || launch_backward(&bwd, &case, dtype, &x, &o, &lse_bytes));
            let again = launch_backward(&bwd, &case, dtype, &x, &o, &lse_bytes);
            assert!(got == again, "backward {what}: a second run gave different bits");
            let want = cpu(&[&x.q, &x.k, &x.v, &x.dout], Op::AttentionBackward { scale, causal, lse: false });

            // delta_i = do_i . o_i with the o the kernel stored.
            let (ov, dov) = (values(&o, dtype), x.dout.to_f64());
            let delta = f32s(&got[0]);
            for r in 0..bh * lq {
                let (w, t): (f64, f64) = (0..d).fold((0.0, 0.0), |(s, a), c| {
                    let prod = ov[r * d + c] * dov[r * d + c];
                    (s + prod, a + prod.abs())
                });
                assert!(
                    (delta[r] - w).abs() <= 1e-5 * t + 1e-7,
                    "delta, {what}: row {r} is {}, expected {w}",
                    delta[r]
                );
            }

            // The size of the terms: ds_ij = p_ij (dp_ij - delta_i) has terms p |dp| + p |delta|.
            let (qv, kv) = (x.q.to_f64(), x.k.to_f64());
            let mut ds_abs = vec![0.0; bh * lq * lk];
            for h in 0..bh {
                for i in 0..lq {
                    let r = h * lq + i;
                    let delta_abs: f64 = (0..d).map(|c| (ov[r * d + c] * dov[r * d + c]).abs()).sum();
                    for j in 0..lk {
                        let dp: f64 = (0..d).map(|c| (dov[r * d + c] * v[(h * lk + j) * d + c]).abs()).sum();
                        ds_abs[r * lk + j] = p[r * lk + j] * (dp + delta_abs);
                    }
                }
            }
            let s = case.scale();
            let dq_terms: Vec<f64> = abs_product(&ds_abs, &kv, bh, lq, lk, d, false).iter().map(|t| s * t).collect();
            let dk_terms: Vec<f64> = abs_product(&ds_abs, &qv, bh, lk, lq, d, true).iter().map(|t| s * t).collect();
            let dv_terms = abs_product(&p, &dov, bh, lk, lq, d, true);
            assert_close(&format!("dQ, {what}"), dtype, &values(&got[1], dtype), &want[0], &dq_terms);
            assert_close(&format!("dK, {what}"), dtype, &values(&got[2], dtype), &want[1], &dk_terms);
            assert_close(&format!("dV, {what}"), dtype, &values(&got[3], dtype), &want[2], &dv_terms);
        }
    }
    fwd.assert_all_launched();
    bwd.assert_all_launched();
}

/// The comparison above catches a wrong fragment layout: the forward with the P fragment's middle registers swapped
/// (rows g + 8 of keys 0-7 taken for rows g of keys 8-15), as a slip in kernel code touching fragments would.
#[test]
fn a_misplaced_fragment_fails_the_comparison() {
    let source = zeroconv::kernels::module("flash_attention").expect("module").self_contained_source();
    let right = "    a[1] = pack2<T>(lo[2], lo[3]);\n    a[2] = pack2<T>(hi[0], hi[1]);";
    let wrong = "    a[1] = pack2<T>(hi[0], hi[1]);\n    a[2] = pack2<T>(lo[2], lo[3]);";
    assert_eq!(source.matches(right).count(), 1, "acc_to_a changed: update this test");
    let module = zeroconv::kernels::emulate::compile("flash_attention_misplaced", &source.replace(right, wrong))
        .unwrap_or_else(|e| panic!("{e}"));
    let k = Kernels::from_module(module);
    let case = Case { bh: 1, lq: 17, lk: 77, d: 64, causal: false };
    let x = inputs(&case, DType::BF16);
    let got = launch_forward(&k, &case, DType::BF16, &x);
    let want = cpu(&[&x.q, &x.k, &x.v], Op::Attention { scale: F64Bits::new(case.scale()), causal: false, lse: false });
    let (p, _) = probabilities(&case, &x);
    let terms = abs_product(&p, &x.v.to_f64(), 1, 17, 77, 64, false);
    let (ratio, _) = worst_error(DType::BF16, &values(&got[0], DType::BF16), &want[0], &terms);
    assert!(ratio > 50.0, "a swapped fragment gave errors of only {ratio:.1} units");
}

#[test]
fn too_little_shared_memory_traps() {
    let m = Kernels::new("flash_attention").module;
    let case = Case { bh: 1, lq: 17, lk: 17, d: 64, causal: false };
    let x = inputs(&case, DType::BF16);
    let (q, k, v) = (
        DeviceBuffer::from_bytes("q", &x.q.bytes),
        DeviceBuffer::from_bytes("k", &x.k.bytes),
        DeviceBuffer::from_bytes("v", &x.v.bytes),
    );
    let (o, lse) = (DeviceBuffer::uninit("o", 17 * 64 * 2), DeviceBuffer::uninit("lse", 17 * 4));
    let args = KernelArgs::new().buffer(&q).buffer(&k).buffer(&v).buffer(&o).buffer(&lse);
    let args = args.u64(17).u64(17).f32(0.125).i32(0);
    let cfg = LaunchConfig::new((1, 1), 128).with_shared_bytes(fwd_smem(64) - 16).with_schedule(Schedule::Ascending);
    // SAFETY: the buffers hold the 17 x 64 tensors the arguments describe.
    let err = unsafe { m.launch("flash_attn_fwd_bf16_d64", &cfg, &args) }.unwrap_err();
    assert!(err.to_string().contains("__trap()"), "{err}");
}
