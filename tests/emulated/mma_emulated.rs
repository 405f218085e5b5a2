//! The emulator's tensor-core instructions (kernels/mma.cuh under `__CUDACC_EMULATED__`): ldmatrix, mma.sync
//! m16n8k16 and cp.async, checked on the CPU.
//!
//! - ldmatrix (.x1/.x2/.x4, plain and .trans) on an identity-coded tile (every element holds its own coordinates)
//!   whose rows are scattered in shared memory: each lane's registers must hold exactly the elements the PTX ISA's
//!   table gives, transcribed a second time here (`a_fragment`, `b_fragment`, `ldmatrix_element`; `c_fragment` in
//!   tests/common/mma_probe.rs, which the GPU check shares).
//! - mma on fragments loaded by ldmatrix (so the ldmatrix and mma tables must agree, as they do on a GPU) against a
//!   naive product: identity and selection tiles, which make any misplaced element show as a wrong exact value,
//!   and random tiles in bf16 and f16, with B loaded both ways (ldmatrix of Bᵀ's rows, ldmatrix.trans of B's rows).
//! - cp.async: data arrives at the covering wait (cp.async.wait_group n leaves the n newest groups in flight),
//!   zero-fill, and the misuse a GPU would not report: a missing wait or barrier reads NaN, a copy never waited
//!   for, ldmatrix outside shared memory, and a partial warp at mma are launch errors.
//!
//! What no CPU test can show is that a real GPU uses these tables; scripts/gpu-check is where that is checked.

use zeroconv::engine::HostTensor;
use zeroconv::graph::{DType, Shape};
use zeroconv::kernels::emulate::{self, DeviceBuffer, EmuModule, KernelArgs, LaunchConfig, Schedule};

use crate::common;
use common::emulated::SCHEDULES;
use common::mma_probe::c_fragment;
use common::Rng;

const SOURCE: &str = r#"
#include "mma.cuh"

// 64 threads each copy 16 bytes of group 0 and 16 bytes of group 1 (chunks 64 + t) into shared memory, then read
// chunk (t + 17) % 128 (another thread's, of group 0 for t < 47) and chunk 64 + t (their own, of group 1).
// wait_mode 0: no wait before reading; 1: wait_group 1 (group 0 complete); 2: wait_group 0. `barrier`: a
// __syncthreads between waiting and reading. Chunks t % 5 == 4 of group 0 are zero-filled instead of copied.
extern "C" __global__ void async_copies(const float4* src, float4* out, int wait_mode, int barrier) {
    __shared__ __align__(16) float4 s[128];
    const int t = threadIdx.x;
    cp_async_16(&s[t], &src[t], t % 5 != 4);
    cp_async_commit();
    cp_async_16(&s[64 + t], &src[64 + t], true);
    cp_async_commit();
    if (wait_mode == 1) cp_async_wait<1>();
    if (wait_mode == 2) cp_async_wait<0>();
    if (barrier) __syncthreads();
    out[2 * t] = s[(t + 17) % 128];
    out[2 * t + 1] = s[64 + t];
    cp_async_wait<0>();
}

extern "C" __global__ void copy_never_waited(const float4* src) {
    __shared__ __align__(16) float4 s[32];
    cp_async_16(&s[threadIdx.x], &src[threadIdx.x], true);
    cp_async_commit();
}

extern "C" __global__ void ldmatrix_from_global(const unsigned short* tile, unsigned* out) {
    unsigned r[1];
    ldmatrix_x1(r, tile + (threadIdx.x & 7) * 8);
    out[threadIdx.x] = r[0];
}

extern "C" __global__ void mma_half_warp(float* out) {
    unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    float d[4] = {0, 0, 0, 0};
    if (threadIdx.x < 16) mma_m16n8k16<bf16>(d, a, b);
    out[threadIdx.x] = d[0];
}
"#;

/// The misuse and cp.async probes above, which only the emulator may run.
fn module() -> std::sync::Arc<EmuModule> {
    emulate::compile("mma_emulated_test", SOURCE).unwrap_or_else(|e| panic!("emulating the mma probes: {e}"))
}

/// kernels/mma_probe.cu: the layout probes, which scripts/gpu-check also runs on a GPU.
fn probe_module() -> std::sync::Arc<EmuModule> {
    let m = zeroconv::kernels::module("mma_probe").expect("kernels/mma_probe.cu is built");
    emulate::compile_module(m).unwrap_or_else(|e| panic!("emulating kernels/mma_probe.cu: {e}"))
}

fn launch(m: &EmuModule, kernel: &str, threads: u32, schedule: Schedule, args: KernelArgs) -> zeroconv::Result<()> {
    let cfg = LaunchConfig::new(1, threads).with_schedule(schedule);
    // SAFETY: every buffer is sized for the fixed tile shapes the probe kernels index.
    unsafe { m.launch(kernel, &cfg, &args) }
}

// ---- the PTX ISA's fragment tables, transcribed independently of kernels/mma.cuh ------------------------------------

/// (row, column) of element `i` (0..8, two per register, low half first) of the A fragment of `lane` (16x16).
fn a_fragment(lane: usize, i: usize) -> (usize, usize) {
    let (group, thread) = (lane >> 2, lane % 4);
    let row = if i < 2 || (4..6).contains(&i) { group } else { group + 8 };
    let col = thread * 2 + (i & 1) + if i >= 4 { 8 } else { 0 };
    (row, col)
}

/// (k, n) of element `i` (0..4) of the B fragment of `lane` (16x8).
fn b_fragment(lane: usize, i: usize) -> (usize, usize) {
    let (group, thread) = (lane >> 2, lane % 4);
    (thread * 2 + (i & 1) + if i >= 2 { 8 } else { 0 }, group)
}

/// (row, column) within its 8x8 matrix of half `h` of the register a lane receives from ldmatrix.
fn ldmatrix_element(lane: usize, h: usize, trans: bool) -> (usize, usize) {
    let (group, thread) = (lane >> 2, lane % 4);
    if trans {
        (thread * 2 + h, group)
    } else {
        (group, thread * 2 + h)
    }
}

/// Checks `probe_ldmatrix`'s output (6 variants x 32 lanes x 4 registers) for the tile of
/// [`common::mma_probe::ldmatrix_tile`] against the PTX ISA's ldmatrix table.
fn check_ldmatrix_registers(got: &[u32], context: &str) {
    for (v, (num, trans)) in
        [(1, false), (2, false), (4, false), (1, true), (2, true), (4, true)].into_iter().enumerate()
    {
        for lane in 0..32 {
            for reg in 0..4 {
                let word = got[(v * 32 + lane) * 4 + reg];
                let what = format!("ldmatrix x{num} trans {trans}, lane {lane}, register {reg} ({context})");
                if reg >= num {
                    assert_eq!(word, 0xdead_beef, "{what}: written although not loaded");
                    continue;
                }
                for h in 0..2 {
                    let (r, c) = ldmatrix_element(lane, h, trans);
                    let want = 256 * (8 * reg + r) + c;
                    assert_eq!((word >> (16 * h)) & 0xffff, want as u32, "{what}, half {h}");
                }
            }
        }
    }
}

#[test]
fn ldmatrix_gives_each_lane_the_elements_of_the_isa_table() {
    let m = probe_module();
    let (tile, slot) = (common::mma_probe::ldmatrix_tile(), common::mma_probe::ldmatrix_slots());
    for schedule in SCHEDULES {
        let (tb, sb) = (DeviceBuffer::from_slice("tile", &tile), DeviceBuffer::from_slice("slot", &slot));
        let out = DeviceBuffer::uninit("out", 6 * 32 * 4 * 4);
        launch(&m, "probe_ldmatrix", 32, schedule, KernelArgs::new().buffer(&tb).buffer(&sb).buffer(&out)).unwrap();
        check_ldmatrix_registers(&out.to_vec::<u32>().unwrap(), &format!("{schedule:?}"));
    }
}

/// The launches scripts/gpu-check makes on a GPU (tests/common/mma_probe.rs, through the device seam), here on the
/// emulated device: the ldmatrix registers follow the ISA's table and every mma gives the exact product, so what the
/// GPU is compared with is right.
#[test]
fn the_gpu_checks_probe_launches_follow_the_isa_tables_on_the_emulated_device() {
    let mut dev = zeroconv::engine::device::emu::EmuDevice::new(Default::default());
    let outputs = common::mma_probe::run(&mut dev);
    let words = |b: &[u8]| b.chunks(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect::<Vec<u32>>();
    let (name, regs) = &outputs[0];
    check_ldmatrix_registers(&words(regs), name);
    let cases = common::mma_probe::mma_cases();
    assert_eq!(outputs.len(), 1 + 2 * cases.len() * 2, "one output per launch");
    for (k, (name, bytes)) in outputs[1..].iter().enumerate() {
        let (_, a, b, c) = &cases[(k / 2) % cases.len()];
        let frag: Vec<f32> = words(bytes).into_iter().map(f32::from_bits).collect();
        let want = naive(a, b, c);
        for lane in 0..32 {
            for i in 0..4 {
                let (r, col) = c_fragment(lane, i);
                assert_eq!(frag[lane * 4 + i] as f64, want[r * 8 + col], "{name}: lane {lane}, accumulator {i}");
            }
        }
    }
}

fn rounded(dtype: DType, data: &[f64]) -> (Vec<u8>, Vec<f64>) {
    let t = HostTensor::from_f64(Shape(vec![data.len()]), dtype, data).expect("data fills shape");
    let v = t.to_f64();
    (t.bytes, v)
}

/// Runs one m16n8k16 on A (16x16), B (16x8) and C (16x8), all row-major, both ways of loading B, under every
/// schedule, and returns D (16x8, row-major, through the accumulator table) after checking both ways agree.
fn mma_once(m: &EmuModule, dtype: DType, a: &[f64], b: &[f64], c: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (ab, av) = rounded(dtype, a);
    let (bb, bv) = rounded(dtype, b);
    let bt: Vec<f64> = (0..8 * 16).map(|e| bv[(e % 16) * 8 + e / 16]).collect();
    let (btb, _) = rounded(dtype, &bt);
    // C as fragments: lane-major, through the accumulator table.
    let mut c_frag = vec![0f32; 128];
    for lane in 0..32 {
        for i in 0..4 {
            let (r, col) = c_fragment(lane, i);
            c_frag[lane * 4 + i] = c[r * 8 + col] as f32;
        }
    }
    let kernel = if dtype == DType::BF16 { "mma_tile_bf16" } else { "mma_tile_f16" };
    let mut first: Option<Vec<f32>> = None;
    for b_from_rows in [0, 1] {
        for schedule in SCHEDULES {
            let (a_buf, b_buf, bt_buf) = (
                DeviceBuffer::from_bytes("a", &ab),
                DeviceBuffer::from_bytes("b", &bb),
                DeviceBuffer::from_bytes("bt", &btb),
            );
            let (c_buf, d_buf) = (DeviceBuffer::from_slice("c", &c_frag), DeviceBuffer::uninit("d", 128 * 4));
            let args = KernelArgs::new().buffer(&a_buf).buffer(&b_buf).buffer(&bt_buf).buffer(&c_buf);
            launch(m, kernel, 32, schedule, args.buffer(&d_buf).i32(b_from_rows)).unwrap();
            let d = d_buf.to_vec::<f32>().unwrap();
            match &first {
                None => first = Some(d),
                Some(f) => assert!(
                    f.iter().zip(&d).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{kernel}: B loaded by rows {b_from_rows}, {schedule:?}: D differs"
                ),
            }
        }
    }
    let frag = first.unwrap();
    let mut d = vec![f64::NAN; 128];
    for lane in 0..32 {
        for i in 0..4 {
            let (r, col) = c_fragment(lane, i);
            d[r * 8 + col] = frag[lane * 4 + i] as f64;
        }
    }
    (d, av, bv)
}

fn naive(a: &[f64], b: &[f64], c: &[f64]) -> Vec<f64> {
    (0..128).map(|e| c[e] + (0..16).map(|k| a[(e / 8) * 16 + k] * b[k * 8 + e % 8]).sum::<f64>()).collect()
}

#[test]
fn mma_on_identity_coded_tiles_puts_every_element_in_its_place() {
    let m = probe_module();
    for dtype in [DType::BF16, DType::F16] {
        // Small integers are exact in both types. A = coded, B = the first 8 columns of the identity: D = A[:, :8].
        let coded_a: Vec<f64> = (0..256).map(|e| ((e / 16) * 16 + e % 16) as f64).collect();
        let identity_b: Vec<f64> = (0..128).map(|e| ((e / 8) == (e % 8)) as u8 as f64).collect();
        let zero_c = vec![0.0; 128];
        let (d, _, _) = mma_once(&m, dtype, &coded_a, &identity_b, &zero_c);
        let want: Vec<f64> = (0..128).map(|e| coded_a[(e / 8) * 16 + e % 8]).collect();
        assert_eq!(d, want, "{dtype:?}: A times the identity");
        // B selecting the upper half of k: D = A[:, 8:].
        let upper_b: Vec<f64> = (0..128).map(|e| ((e / 8) == (e % 8) + 8) as u8 as f64).collect();
        let (d, _, _) = mma_once(&m, dtype, &coded_a, &upper_b, &zero_c);
        let want: Vec<f64> = (0..128).map(|e| coded_a[(e / 8) * 16 + 8 + e % 8]).collect();
        assert_eq!(d, want, "{dtype:?}: A times the upper selection");
        // A = identity, B = coded: D = B; plus a coded C, added in place.
        let identity_a: Vec<f64> = (0..256).map(|e| ((e / 16) == (e % 16)) as u8 as f64).collect();
        let coded_b: Vec<f64> = (0..128).map(|e| ((e / 8) * 8 + e % 8) as f64).collect();
        let coded_c: Vec<f64> = (0..128).map(|e| 1000.0 * e as f64).collect();
        let (d, _, _) = mma_once(&m, dtype, &identity_a, &coded_b, &coded_c);
        let want: Vec<f64> = (0..128).map(|e| coded_b[e] + coded_c[e]).collect();
        assert_eq!(d, want, "{dtype:?}: the identity times B plus C");
    }
}

#[test]
fn mma_on_random_tiles_matches_a_naive_product() {
    let m = probe_module();
    for dtype in [DType::BF16, DType::F16] {
        for seed in 1..4u64 {
            let mut rng = Rng::new(seed * 7919 + dtype.size() as u64);
            let mut draw = |n: usize| (0..n).map(|_| rng.uniform() * 4.0).collect::<Vec<f64>>();
            let (a, b, c) = (draw(256), draw(128), draw(128));
            let (d, av, bv) = mma_once(&m, dtype, &a, &b, &c);
            let c32: Vec<f64> = c.iter().map(|&x| x as f32 as f64).collect();
            let want = naive(&av, &bv, &c32);
            for e in 0..128 {
                let terms: f64 =
                    c32[e].abs() + (0..16).map(|k| (av[(e / 8) * 16 + k] * bv[k * 8 + e % 8]).abs()).sum::<f64>();
                // Exact products, one f32 rounding of the sum.
                assert!(
                    (d[e] - want[e]).abs() <= terms * 2f64.powi(-23),
                    "{dtype:?} seed {seed}: D[{}][{}] = {}, expected {}",
                    e / 8,
                    e % 8,
                    d[e],
                    want[e]
                );
            }
        }
    }
}

#[test]
fn the_fragment_tables_written_here_are_consistent() {
    // The A and B tables of this file, composed with the accumulator table, describe a product only if they are
    // consistent with each other: every (row, k) of A and (k, n) of B is held by exactly one lane and element.
    let mut a_seen = [[0u8; 16]; 16];
    let mut b_seen = [[0u8; 8]; 16];
    let mut c_seen = [[0u8; 8]; 16];
    for lane in 0..32 {
        (0..8).for_each(|i| {
            let (r, c) = a_fragment(lane, i);
            a_seen[r][c] += 1;
        });
        (0..4).for_each(|i| {
            let (k, n) = b_fragment(lane, i);
            b_seen[k][n] += 1;
        });
        (0..4).for_each(|i| {
            let (r, c) = c_fragment(lane, i);
            c_seen[r][c] += 1;
        });
    }
    assert!(a_seen.iter().flatten().chain(b_seen.iter().flatten()).chain(c_seen.iter().flatten()).all(|&n| n == 1));
    // ldmatrix of a row-major tile yields the A fragment: matrix i of .x4 covers rows 8 (i % 2), columns 8 (i / 2)
    // when lanes give rows as mma_tile does; register i, half h is A element 2 i + h.
    for lane in 0..32 {
        for reg in 0..4 {
            for h in 0..2 {
                let (r, c) = ldmatrix_element(lane, h, false);
                assert_eq!(a_fragment(lane, 2 * reg + h), (r + 8 * (reg % 2), c + 8 * (reg / 2)));
            }
        }
        // ldmatrix.trans of B's rows (k) yields the B fragment: matrix i covers k 8 i .. 8 i + 7.
        for reg in 0..2 {
            for h in 0..2 {
                let (k, n) = ldmatrix_element(lane, h, true);
                assert_eq!(b_fragment(lane, 2 * reg + h), (k + 8 * reg, n));
            }
        }
    }
}

fn async_run(m: &EmuModule, wait_mode: i32, barrier: i32, schedule: Schedule) -> Vec<[f32; 4]> {
    let src: Vec<f32> = (0..128 * 4).map(|i| i as f32 + 0.5).collect();
    let (sb, out) = (DeviceBuffer::from_slice("src", &src), DeviceBuffer::uninit("out", 128 * 16));
    launch(m, "async_copies", 64, schedule, KernelArgs::new().buffer(&sb).buffer(&out).i32(wait_mode).i32(barrier))
        .unwrap();
    out.to_vec::<f32>().unwrap().chunks(4).map(|c| [c[0], c[1], c[2], c[3]]).collect()
}

/// Chunk `j` of the copy as async_copies writes it: src, or zeros for the zero-filled chunks of group 0.
fn chunk(j: usize) -> [f32; 4] {
    if j < 64 && j % 5 == 4 {
        return [0.0; 4];
    }
    std::array::from_fn(|e| (4 * j + e) as f32 + 0.5)
}

#[test]
fn cp_async_data_arrives_at_the_covering_wait() {
    let m = module();
    let nan = |v: &[f32; 4]| v.iter().all(|x| x.is_nan());
    for schedule in SCHEDULES {
        // Waiting for everything, then a barrier: every chunk, zero-filled ones as zeros.
        let got = async_run(&m, 2, 1, schedule);
        for t in 0..64 {
            assert_eq!(got[2 * t], chunk((t + 17) % 128), "{schedule:?}: thread {t}, other's chunk");
            assert_eq!(got[2 * t + 1], chunk(64 + t), "{schedule:?}: thread {t}, own chunk");
        }
        // wait_group 1: group 0 has arrived, this thread's group 1 has not.
        let got = async_run(&m, 1, 1, schedule);
        for t in 0..64 {
            let other = (t + 17) % 128;
            if other < 64 {
                assert_eq!(got[2 * t], chunk(other), "{schedule:?}: wait_group 1, thread {t}, group 0");
            }
            assert!(nan(&got[2 * t + 1]), "{schedule:?}: wait_group 1 let thread {t} read its newest group");
        }
        // No wait before reading: a thread's own copies have not arrived. (Another thread's may have, once that
        // thread passed its final wait: a race the kernel has without a wait and a barrier.)
        let got = async_run(&m, 0, 1, schedule);
        for t in 0..64 {
            assert!(nan(&got[2 * t + 1]), "{schedule:?}: thread {t} read its copy before any wait");
        }
    }
    // Waiting without a barrier: a thread that runs ahead reads chunks another thread has not copied yet.
    for schedule in [Schedule::Ascending, Schedule::Descending] {
        let got = async_run(&m, 2, 0, schedule);
        assert!(got.iter().step_by(2).any(nan), "{schedule:?}: the missing barrier went unnoticed");
    }
}

#[test]
fn misuse_of_the_matrix_instructions_is_a_launch_error() {
    let m = module();
    let src = DeviceBuffer::from_slice("src", &[1.0f32; 128]);
    let err = launch(&m, "copy_never_waited", 32, Schedule::Ascending, KernelArgs::new().buffer(&src)).unwrap_err();
    assert!(err.to_string().contains("cp.async copies never waited for"), "{err}");

    let tile = DeviceBuffer::from_slice("tile", &[0u16; 64]);
    let out = DeviceBuffer::uninit("out", 32 * 4);
    let err = launch(&m, "ldmatrix_from_global", 32, Schedule::Ascending, KernelArgs::new().buffer(&tile).buffer(&out))
        .unwrap_err();
    assert!(err.to_string().contains("not a 16-byte aligned row of shared memory"), "{err}");

    let err = launch(&m, "mma_half_warp", 32, Schedule::Lockstep, KernelArgs::new().buffer(&out)).unwrap_err();
    assert!(err.to_string().contains("every lane of a full warp"), "{err}");
}
