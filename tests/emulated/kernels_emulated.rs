//! Kernel semantics checked on the CPU (DESIGN.md, "Verifying GPU code without a GPU", point 3).
//!
//! Every kernel of every `kernels/*.cu`, for f32, bf16 and f16, runs under the host emulation of the CUDA
//! execution model (`zeroconv::kernels::emulate`) on random inputs of awkward sizes (1, 31, 33, 1031, odd
//! spatial sizes, rows that are not multiples of 32, grids too small to cover the data) and its output is compared
//! with the CPU backend running the same op as a one-node graph. Each case runs under four thread schedules
//! (warp by warp ascending and descending, lockstep, shuffled lockstep): the kernels promise deterministic
//! results for a given launch shape, so the outputs must agree bit for bit, which a missing barrier or a race
//! would break. References are computed by the CPU backend in f64 on the values the kernel read (see `cpu`).
//!
//! The first tests check the emulator itself: barriers order memory, shuffles exchange across lanes, atomics are
//! atomic, and misuse is reported instead of hanging or passing.
//!
//! Needs g++ (any machine of this project has it); without it every test fails with a message saying so.

use crate::common;

use std::collections::BTreeSet;
use std::sync::Arc;

use bytemuck::{Pod, Zeroable};
use common::emulated::{Kernels, SCHEDULES};
use common::Rng;
use zeroconv::engine::cpu::CpuBackend;
use zeroconv::engine::{Backend, HostTensor, Program};
use zeroconv::graph::{BinaryOp, DType, F64Bits, Graph, Layout, Op, Shape, UnaryOp, ValueId};
use zeroconv::kernels::emulate::{self, DeviceBuffer, EmuModule, KernelArgs, LaunchConfig, Schedule};
use zeroconv::kernels::{self, Arch, MODULES};

const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

// ---- harness ------------------------------------------------------------------------------------------------------

fn compile(name: &str, source: &str) -> Arc<EmuModule> {
    emulate::compile(name, source).unwrap_or_else(|e| panic!("emulating `{name}`: {e}"))
}

fn suffix(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => unreachable!("kernels exist for float storage types only"),
    }
}

/// `data` rounded to `dtype`.
fn tensor(shape: &[usize], dtype: DType, data: &[f64]) -> HostTensor {
    HostTensor::from_f64(Shape(shape.to_vec()), dtype, data).expect("data fills shape")
}

fn upload(label: &str, t: &HostTensor) -> DeviceBuffer {
    DeviceBuffer::from_bytes(label, &t.bytes)
}

fn output(label: &str, n: usize, dtype: DType) -> DeviceBuffer {
    DeviceBuffer::uninit(label, n * dtype.size())
}

fn values(bytes: &[u8], dtype: DType) -> Vec<f64> {
    let n = bytes.len() / dtype.size();
    HostTensor { shape: Shape(vec![n]), dtype, bytes: bytes.to_vec() }.to_f64()
}

fn uniform(rng: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| lo + (hi - lo) * (rng.uniform() * 0.5 + 0.5)).collect()
}

fn seed(what: &str) -> Rng {
    Rng::new(what.bytes().fold(0x1234_5678u64, |h, b| h.wrapping_mul(131).wrapping_add(b as u64)))
}

/// The reference: the CPU backend running `op` in f64 on the very values the kernel read (the inputs rounded to
/// the kernel's storage type). f64 makes the reference exact to far below any tolerance used here, so what is
/// measured is the kernel's own error: its f32 arithmetic and the rounding of its output.
fn cpu(ins: &[&HostTensor], op: impl FnOnce(&mut Graph, &[ValueId]) -> Vec<ValueId>) -> Vec<HostTensor> {
    let wide: Vec<HostTensor> =
        ins.iter().map(|t| HostTensor::from_f64(t.shape.clone(), DType::F64, &t.to_f64()).expect("f64 copy")).collect();
    cpu_native(&wide.iter().collect::<Vec<_>>(), op)
}

/// Builds a graph with one input per tensor in `ins` (of their own dtypes), applies `op` (which returns the values
/// to read), runs it on the CPU backend and returns those values.
fn cpu_native(ins: &[&HostTensor], op: impl FnOnce(&mut Graph, &[ValueId]) -> Vec<ValueId>) -> Vec<HostTensor> {
    let mut g = Graph::new();
    let ids: Vec<ValueId> =
        ins.iter().enumerate().map(|(i, t)| g.input(&format!("in{i}"), t.shape.clone(), t.dtype)).collect();
    let outs = op(&mut g, &ids);
    let mut p = CpuBackend::new(1).compile(g).expect("compile the reference graph");
    for (&v, t) in ids.iter().zip(ins) {
        p.upload(v, t).expect("upload");
    }
    p.launch().expect("run the reference graph");
    outs.iter().map(|&o| p.download(o).expect("download")).collect()
}

/// Relative error allowed for results stored as `dtype` that went through f32 arithmetic in a different order:
/// f32 rounding differences, or one unit in the last place of a bf16/f16 result that sat near a rounding
/// boundary.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::BF16 => 1.0 / 128.0,
        DType::F16 => 1.0 / 1024.0,
        _ => unreachable!(),
    }
}

/// |got - want| <= tol * max(|want|, floor) elementwise, plus f16's subnormal spacing, where the floor is 10% of
/// max |want| or `scale`, the size of the terms the result was computed from when they cancel (values that cancel
/// to nearly zero cannot be more accurate than the terms). NaN and inf must match exactly.
fn assert_close(what: &str, dtype: DType, got: &[f64], want: &[f64], scale: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let tol = tolerance(dtype);
    let floor = (0.1 * want.iter().filter(|w| w.is_finite()).fold(0.0f64, |m, w| m.max(w.abs()))).max(scale);
    let tiny = if dtype == DType::F16 { 6e-8 } else { 1e-30 };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !w.is_finite() || !g.is_finite() {
            assert!(g.is_nan() && w.is_nan() || g == w, "{what}: element {i} is {g}, expected {w}");
            continue;
        }
        let allowed = tol * w.abs().max(floor) + tiny;
        assert!((g - w).abs() <= allowed, "{what}: element {i} is {g}, expected {w} (allowed error {allowed:.2e})");
    }
}

fn check(what: &str, dtype: DType, got: &[u8], want: &HostTensor) {
    check_scaled(what, dtype, got, want, 0.0);
}

fn check_scaled(what: &str, dtype: DType, got: &[u8], want: &HostTensor, scale: f64) {
    assert_close(what, dtype, &values(got, dtype), &want.to_f64(), scale);
}

fn max_abs(t: &HostTensor) -> f64 {
    t.to_f64().iter().fold(0.0f64, |m, v| m.max(v.abs()))
}

/// The size of the terms of a normalisation's input gradient, rstd * (|dy * gamma| + mean |dy * gamma|):
/// dx is their difference, and nearly cancels when a group or row has few elements.
fn norm_grad_scale(x: &HostTensor, dy: &HostTensor, gamma: &HostTensor, count: usize, eps: f64) -> f64 {
    let max_rstd = moments(&x.to_f64(), count, eps).1.into_iter().fold(0.0f64, f64::max);
    2.0 * max_rstd * max_abs(dy) * max_abs(gamma)
}

/// A grid that covers `n` elements with `block` threads each, but at most `cap` blocks, so grid-stride loops
/// run more than once on the larger sizes.
fn grid_for(n: usize, block: u32, cap: u32) -> u32 {
    (n.div_ceil(block as usize) as u32).clamp(1, cap)
}

// ---- the emulator itself --------------------------------------------------------------------------------------------

const SELF_TEST_SOURCE: &str = r#"
// Tree reduction in shared memory: correct only if every step is separated by a barrier.
extern "C" __global__ void tree_sum(const float* x, float* out, int use_barrier) {
    __shared__ float buf[256];
    const unsigned t = threadIdx.x;
    buf[t] = x[blockIdx.x * blockDim.x + t];
    if (use_barrier) __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) buf[t] += buf[t + s];
        if (use_barrier) __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = buf[0];
}

// Reverses a block's values through dynamic shared memory.
extern "C" __global__ void reverse_dynamic(const int* x, int* y) {
    extern __shared__ int staging[];
    const unsigned t = threadIdx.x;
    staging[t] = x[blockIdx.x * blockDim.x + t];
    __syncthreads();
    y[blockIdx.x * blockDim.x + t] = staging[blockDim.x - 1 - t];
}

// Eight warp collectives per thread, written to out[8 * thread + k].
extern "C" __global__ void shuffles(const int* x, int* out) {
    const unsigned t = threadIdx.x;
    const int v = x[t];
    int* o = out + 8 * t;
    o[0] = __shfl_xor_sync(0xffffffffu, v, 5);
    o[1] = __shfl_down_sync(0xffffffffu, v, 3);
    o[2] = __shfl_up_sync(0xffffffffu, v, 2);
    o[3] = __shfl_sync(0xffffffffu, v, 7);
    o[4] = __shfl_xor_sync(0xffffffffu, v, 9, 8);
    o[5] = __shfl_down_sync(0xffffffffu, v, 3, 16);
    o[6] = (int)__ballot_sync(0xffffffffu, v & 1);
    // Two half-warps with their own masks meet at different collectives: legal, each half is its own group.
    o[7] = (t & 31) < 16 ? __shfl_xor_sync(0x0000ffffu, v, 1) : __reduce_add_sync(0xffff0000u, v);
}

// Block and warp votes and reductions, written to out[8 * thread + k].
extern "C" __global__ void votes(const int* x, int* out) {
    const unsigned t = threadIdx.x;
    const int v = x[t];
    int* o = out + 8 * t;
    o[0] = __syncthreads_count(v > 0);
    o[1] = __syncthreads_and(v > -100);
    o[2] = __syncthreads_or(v == 7);
    o[3] = __any_sync(0xffffffffu, v == 7);
    o[4] = __all_sync(0xffffffffu, v > -20);
    o[5] = (int)__match_any_sync(0xffffffffu, v % 3);
    o[6] = __reduce_min_sync(0xffffffffu, v);
    o[7] = __reduce_max_sync(0xffffffffu, v);
}

extern "C" __global__ void mixed_barriers(int* y) {
    y[threadIdx.x] = threadIdx.x < 40 ? __syncthreads_count(1) : (__syncthreads(), 0);
}

// Butterfly sum of floats: every lane must end with the warp's total.
extern "C" __global__ void warp_total(const float* x, float* out) {
    float v = x[threadIdx.x];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    out[threadIdx.x] = v;
}

// counters: [0] atomicAdd count, [1] ticket dispenser, [2] racy read-modify-write split by a barrier,
// [3] atomicInc wrapping at 9. tickets[k]: the thread that drew ticket k. fsum: float atomicAdd. imax: atomicMax.
extern "C" __global__ void atomics(unsigned* counters, unsigned* tickets, float* fsum, int* imax) {
    const unsigned id = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(&counters[0], 1u);
    tickets[atomicAdd(&counters[1], 1u)] = id;
    atomicAdd(fsum, 0.5f);
    atomicMax(imax, (int)id);
    atomicInc(&counters[3], 9u);
    const unsigned seen = counters[2];
    __syncthreads();
    counters[2] = seen + 1;
}

extern "C" __global__ void read_uninitialised_shared(float* out) {
    __shared__ float never_written[64];
    out[threadIdx.x] = never_written[threadIdx.x];
}

extern "C" __global__ void write_one_past(float* y, unsigned long long n) {
    if (threadIdx.x == 0) y[n] = 1.0f;
}

extern "C" __global__ void divergent_barrier(float* y) {
    if (threadIdx.x < 16) __syncthreads();
    y[threadIdx.x] = 1.0f;
}

extern "C" __global__ void barrier_against_shuffle(float* y) {
    float v = 1.0f;
    if (threadIdx.x == 0) __syncthreads();
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    y[threadIdx.x] = v;
}

extern "C" __global__ void mask_without_self(int* y) { y[threadIdx.x] = __shfl_sync(0x1u, 1, 0); }

extern "C" __global__ void mixed_collectives(int* y) {
    y[threadIdx.x] = threadIdx.x % 2 ? (int)__ballot_sync(0xffffffffu, 1) : __shfl_xor_sync(0xffffffffu, 1, 1);
}

extern "C" __global__ void traps(int* y) { if (threadIdx.x == 3) __trap(); y[threadIdx.x] = 0; }
"#;

fn self_test() -> Arc<EmuModule> {
    compile("emulator_self_test", SELF_TEST_SOURCE)
}

fn run(m: &EmuModule, kernel: &str, cfg: LaunchConfig, args: KernelArgs) -> zeroconv::Result<()> {
    // SAFETY: the self-test kernels index only within the sizes their tests allocate.
    unsafe { m.launch(kernel, &cfg, &args) }
}

#[test]
fn barriers_order_shared_memory_and_their_absence_shows() {
    let m = self_test();
    let (blocks, threads) = (3usize, 256usize);
    let x: Vec<f32> = (0..blocks * threads).map(|i| ((i * 7919) % 23) as f32 - 11.0).collect();
    let want: Vec<f32> = x.chunks(threads).map(|c| c.iter().sum()).collect();
    let sums = |use_barrier: i32, schedule: Schedule| {
        let (xb, out) = (DeviceBuffer::from_slice("x", &x), DeviceBuffer::uninit("out", blocks * 4));
        let cfg = LaunchConfig::new(blocks as u32, threads as u32).with_schedule(schedule);
        run(&m, "tree_sum", cfg, KernelArgs::new().buffer(&xb).buffer(&out).i32(use_barrier)).unwrap();
        out.to_vec::<f32>().unwrap()
    };
    for s in SCHEDULES {
        assert_eq!(sums(1, s), want, "with barriers, {s:?}");
    }
    // Without them, threads that run ahead read partial sums not yet written (poisoned shared memory: NaN).
    for s in [Schedule::Ascending, Schedule::Lockstep, Schedule::Shuffled(3)] {
        let got = sums(0, s);
        assert!(got.iter().zip(&want).any(|(g, w)| g != w), "missing barriers went unnoticed under {s:?}: {got:?}");
    }
}

#[test]
fn dynamic_shared_memory_is_per_block() {
    let m = self_test();
    let x: Vec<i32> = (0..5 * 40).collect();
    let (xb, y) = (DeviceBuffer::from_slice("x", &x), DeviceBuffer::uninit("y", x.len() * 4));
    for s in SCHEDULES {
        let cfg = LaunchConfig::new(5, 40).with_shared_bytes(40 * 4).with_schedule(s);
        run(&m, "reverse_dynamic", cfg, KernelArgs::new().buffer(&xb).buffer(&y)).unwrap();
        let want: Vec<i32> = x.chunks(40).flat_map(|c| c.iter().rev().copied()).collect();
        assert_eq!(y.to_vec::<i32>().unwrap(), want, "{s:?}");
    }
}

#[test]
fn warp_shuffles_follow_cuda_semantics() {
    let m = self_test();
    let n = 64usize; // two warps
    let x: Vec<i32> = (0..n as i32).map(|i| i * 3 + 1).collect();
    let (xb, out) = (DeviceBuffer::from_slice("x", &x), DeviceBuffer::uninit("out", n * 8 * 4));
    for s in SCHEDULES {
        run(
            &m,
            "shuffles",
            LaunchConfig::new(1, n as u32).with_schedule(s),
            KernelArgs::new().buffer(&xb).buffer(&out),
        )
        .unwrap();
        let got = out.to_vec::<i32>().unwrap();
        for t in 0..n {
            let (warp, lane) = (t / 32 * 32, t % 32);
            let at = |l: usize| x[warp + l];
            let seg = |w: usize| lane / w * w;
            let ballot = (0..32).filter(|&l| at(l) & 1 != 0).fold(0u32, |b, l| b | 1 << l) as i32;
            // xor 9 within segments of 8: lane ^ 9 lands in the next segment (own value) or an earlier one.
            let xor9 = if (lane ^ 9) >= seg(8) + 8 { at(lane) } else { at(lane ^ 9) };
            let down3_16 = if lane % 16 + 3 < 16 { at(lane + 3) } else { at(lane) };
            let half = if lane < 16 { at(lane ^ 1) } else { (16..32).map(at).sum() };
            let want = [
                at(lane ^ 5),
                if lane + 3 < 32 { at(lane + 3) } else { at(lane) },
                if lane >= 2 { at(lane - 2) } else { at(lane) },
                at(7),
                xor9,
                down3_16,
                ballot,
                half,
            ];
            assert_eq!(&got[8 * t..8 * t + 8], &want, "thread {t}, {s:?}");
        }
    }
    let xf: Vec<f32> = (0..n).map(|i| i as f32 * 0.25).collect();
    let (xb, out) = (DeviceBuffer::from_slice("x", &xf), DeviceBuffer::uninit("out", n * 4));
    run(&m, "warp_total", LaunchConfig::new(1, n as u32), KernelArgs::new().buffer(&xb).buffer(&out)).unwrap();
    let got = out.to_vec::<f32>().unwrap();
    for t in 0..n {
        assert_eq!(got[t], xf[t / 32 * 32..t / 32 * 32 + 32].iter().sum::<f32>(), "lane {t}");
    }
    // A partial warp: lanes 48..63 do not exist, so the butterfly reads undefined values (NaN), as on a GPU.
    run(&m, "warp_total", LaunchConfig::new(1, 48), KernelArgs::new().buffer(&xb).buffer(&out)).unwrap();
    assert!(out.to_vec::<f32>().unwrap()[32..48].iter().all(|v| v.is_nan()));
}

#[test]
fn votes_and_warp_reductions_follow_cuda_semantics() {
    let m = self_test();
    let n = 64usize;
    // Warp 0 holds -20..=11 (a 7 among them), warp 1 holds 12..=43.
    let x: Vec<i32> = (0..n as i32).map(|i| i - 20).collect();
    let (xb, out) = (DeviceBuffer::from_slice("x", &x), DeviceBuffer::uninit("out", n * 8 * 4));
    for s in SCHEDULES {
        run(&m, "votes", LaunchConfig::new(1, n as u32).with_schedule(s), KernelArgs::new().buffer(&xb).buffer(&out))
            .unwrap();
        let got = out.to_vec::<i32>().unwrap();
        let positive = x.iter().filter(|&&v| v > 0).count() as i32;
        for t in 0..n {
            let warp = &x[t / 32 * 32..t / 32 * 32 + 32];
            let same = warp.iter().enumerate().filter(|(_, &v)| v % 3 == x[t] % 3).fold(0u32, |b, (l, _)| b | 1 << l);
            let want = [
                positive,
                1,
                1,
                warp.contains(&7) as i32,
                warp.iter().all(|&v| v > -20) as i32,
                same as i32,
                *warp.iter().min().unwrap(),
                *warp.iter().max().unwrap(),
            ];
            assert_eq!(&got[8 * t..8 * t + 8], &want, "thread {t}, {s:?}");
        }
    }
}

#[test]
fn atomics_are_atomic_and_plain_read_modify_writes_race() {
    let m = self_test();
    let (blocks, threads) = (4u32, 96u32);
    let total = (blocks * threads) as usize;
    let counters = DeviceBuffer::zeroed("counters", 4 * 4);
    let tickets = DeviceBuffer::uninit("tickets", total * 4);
    let fsum = DeviceBuffer::zeroed("fsum", 4);
    let imax = DeviceBuffer::from_slice("imax", &[-1i32]);
    let args = KernelArgs::new().buffer(&counters).buffer(&tickets).buffer(&fsum).buffer(&imax);
    run(&m, "atomics", LaunchConfig::new(blocks, threads).with_schedule(Schedule::Shuffled(9)), args).unwrap();
    let c = counters.to_vec::<u32>().unwrap();
    assert_eq!(c[0], total as u32);
    assert_eq!(c[1], total as u32);
    // Every thread of a block read the counter before any wrote it back: one increment survives per block.
    assert_eq!(c[2], blocks, "the emulator did not interleave threads at the barrier");
    assert_eq!(c[3], (total % 10) as u32, "atomicInc wraps after 9");
    let mut t = tickets.to_vec::<u32>().unwrap();
    t.sort_unstable();
    assert_eq!(t, (0..total as u32).collect::<Vec<_>>(), "each ticket drawn exactly once");
    assert_eq!(fsum.to_vec::<f32>().unwrap(), [0.5 * total as f32]);
    assert_eq!(imax.to_vec::<i32>().unwrap(), [total as i32 - 1]);
}

#[test]
fn shared_memory_starts_poisoned_and_overruns_are_caught() {
    let m = self_test();
    let out = DeviceBuffer::zeroed("out", 64 * 4);
    run(&m, "read_uninitialised_shared", LaunchConfig::new(2, 64), KernelArgs::new().buffer(&out)).unwrap();
    assert!(out.to_vec::<f32>().unwrap().iter().all(|v| v.is_nan()), "unwritten shared memory must read as NaN");

    let y = DeviceBuffer::zeroed("y", 10 * 4);
    let err = run(&m, "write_one_past", LaunchConfig::new(1, 32), KernelArgs::new().buffer(&y).u64(10)).unwrap_err();
    assert!(err.to_string().contains("wrote past the end of buffer `y` (40 bytes)"), "{err}");
}

#[test]
fn misuse_is_reported_not_hung() {
    let m = self_test();
    let y = DeviceBuffer::zeroed("y", 64 * 4);
    let expect = |kernel: &str, block: u32, want: &str| {
        let err = run(&m, kernel, LaunchConfig::new(1, block), KernelArgs::new().buffer(&y)).unwrap_err().to_string();
        assert!(err.contains(kernel) && err.contains(want), "{kernel}: {err}");
    };
    expect("divergent_barrier", 32, "threads of the block had exited");
    expect("barrier_against_shuffle", 32, "deadlock");
    expect("mask_without_self", 32, "does not name the calling lane");
    expect("mixed_collectives", 32, "different warp collectives");
    expect("traps", 32, "thread (3,0,0): __trap() called");
    expect("mixed_barriers", 64, "different kinds of block barrier");

    // Launch configurations and arguments are checked against CUDA's limits and the kernel's parameters.
    let bad_launch = |cfg: LaunchConfig, args: KernelArgs, want: &str| {
        let err = run(&m, "write_one_past", cfg, args).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    };
    let ok_args = || KernelArgs::new().buffer(&y).u64(0);
    bad_launch(LaunchConfig::new(1, 2048), ok_args(), "1024 threads per block");
    bad_launch(LaunchConfig::new(0, 32), ok_args(), "no zero dimension");
    bad_launch(LaunchConfig::new(1, 32), KernelArgs::new().buffer(&y), "takes 2 parameters, 1 arguments given");
    bad_launch(LaunchConfig::new(1, 32), KernelArgs::new().buffer(&y).u32(0), "4 bytes given, the parameter has 8");
    bad_launch(
        LaunchConfig::new(1, 32),
        KernelArgs::new().buffer(&y).buffer(&y),
        "buffer `y` given for a 8-byte value",
    );
    bad_launch(LaunchConfig::new(1, 32), KernelArgs::new().u64(0).u64(0), "given for a pointer parameter");
    let err = run(&m, "write_one_pas", LaunchConfig::new(1, 32), ok_args()).unwrap_err().to_string();
    assert!(err.contains("no kernel `write_one_pas`; did you mean `write_one_past`?"), "{err}");
}

/// Generated kernels are sources of their own that include the project's device headers.
#[test]
fn a_source_may_include_the_device_headers() {
    let source = "#include \"common.cuh\"\n\
                  extern \"C\" __global__ void block_sums(const float* x, float* y) {\n\
                      float s = block_sum(x[blockIdx.x * blockDim.x + threadIdx.x]);\n\
                      if (threadIdx.x == 0) y[blockIdx.x] = s;\n\
                  }\n";
    let m = compile("generated_example", source);
    let x: Vec<f32> = (0..3 * 64).map(|i| (i % 5) as f32).collect();
    let (xb, y) = (DeviceBuffer::from_slice("x", &x), DeviceBuffer::uninit("y", 3 * 4));
    run(&m, "block_sums", LaunchConfig::new(3, 64), KernelArgs::new().buffer(&xb).buffer(&y)).unwrap();
    let want: Vec<f32> = x.chunks(64).map(|c| c.iter().sum()).collect();
    assert_eq!(y.to_vec::<f32>().unwrap(), want);
}

#[test]
fn compile_errors_quote_the_compiler() {
    let err = emulate::compile("broken", "extern \"C\" __global__ void k(float* y) { y[0] = undefined_name; }\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("undefined_name") && err.contains("broken.cu"), "{err}");
}

// ---- every module is covered -----------------------------------------------------------------------------------

/// The modules the tests below check; a new kernels/*.cu must be added here with its test. The generated
/// module `fused_generated` is checked kernel by kernel in tests/emulated/fused_emulated.rs, and `attention`, `check` and
/// `layout` are checked in tests/emulated/kernels_layout_emulated.rs.
const TESTED_MODULES: [&str; 16] = [
    "adamw",
    "attention",
    "binary",
    "cast",
    "check",
    // Tested in tests/emulated/flash_attention_emulated.rs.
    "flash_attention",
    "flash_attention_bwd",
    "fused_generated",
    "layout",
    "loss",
    // The tensor-core probes, tested in tests/emulated/mma_emulated.rs (and on a GPU by scripts/gpu-check).
    "mma_probe",
    "norm",
    "reduce",
    "softmax",
    "unary",
    "upsample",
];

#[test]
fn every_module_and_kernel_is_emulated() {
    let embedded: BTreeSet<&str> = MODULES.iter().map(|m| m.name).collect();
    assert_eq!(embedded, TESTED_MODULES.into_iter().collect(), "kernels/*.cu and the modules tested here differ");
    for m in MODULES {
        let emu = Kernels::new(m.name).module;
        assert!(!emu.kernels().is_empty(), "{}: no kernels found", m.name);
        // Where NVRTC built the PTX, the emulator must have found exactly the kernels NVRTC compiled.
        if kernels::compiled() {
            let ptx: BTreeSet<&str> = m.entry_points(Arch::Sm80).into_iter().collect();
            let found: BTreeSet<&str> = emu.kernels().iter().map(|k| k.name.as_str()).collect();
            assert_eq!(found, ptx, "{}: emulated kernels differ from the PTX entry points", m.name);
        }
    }
}

// ---- unary.cu -------------------------------------------------------------------------------------------------------

/// Element counts around a warp and a block, and one that leaves a ragged last block.
const SIZES: [usize; 4] = [1, 31, 33, 1031];

#[test]
fn unary_kernels_match_the_cpu_backend() {
    let k = Kernels::new("unary");
    for dtype in FLOATS {
        let sfx = suffix(dtype);
        for n in SIZES {
            let (grid, block) = (grid_for(n, 64, 4), 64);
            for op in UnaryOp::ALL {
                let name = op.name();
                let mut rng = seed(&format!("{name}{n}{sfx}"));
                let positive = matches!(op, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Recip);
                let (lo, hi) = if positive { (0.05, 4.0) } else { (-4.0, 4.0) };
                let x = tensor(&[n], dtype, &uniform(&mut rng, n, lo, hi));
                let dy = tensor(&[n], dtype, &uniform(&mut rng, n, -1.0, 1.0));

                let fwd = format!("unary_{name}_{sfx}");
                let got = k.each_schedule(&fwd, || {
                    let (xb, y) = (upload("x", &x), output("y", n, dtype));
                    k.launch(&fwd, grid, block, KernelArgs::new().buffer(&xb).buffer(&y).u64(n as u64));
                    vec![y.to_bytes()]
                });
                let want = cpu(&[&x], |g, a| vec![g.unary(op, a[0]).unwrap()]);
                check(&format!("{fwd} n={n}"), dtype, &got[0], &want[0]);

                let bwd = format!("unary_{name}_bwd_{sfx}");
                let got = k.each_schedule(&bwd, || {
                    let (xb, dyb, dx) = (upload("x", &x), upload("dy", &dy), output("dx", n, dtype));
                    k.launch(&bwd, grid, block, KernelArgs::new().buffer(&xb).buffer(&dyb).buffer(&dx).u64(n as u64));
                    vec![dx.to_bytes()]
                });
                let want = cpu(&[&x, &dy], |g, a| g.add_node(Op::UnaryBackward(op), &[a[0], a[1]]).unwrap());
                check(&format!("{bwd} n={n}"), dtype, &got[0], &want[0]);
            }

            let x = tensor(&[n], dtype, &uniform(&mut seed(&format!("affine{n}")), n, -3.0, 3.0));
            let affine = format!("affine_{sfx}");
            let got = k.each_schedule(&affine, || {
                let (xb, y) = (upload("x", &x), output("y", n, dtype));
                let args = KernelArgs::new().buffer(&xb).buffer(&y).u64(n as u64).f32(-1.5).f32(0.25);
                k.launch(&affine, grid, block, args);
                vec![y.to_bytes()]
            });
            let want = cpu(&[&x], |g, a| vec![g.affine(a[0], -1.5, 0.25).unwrap()]);
            check(&format!("{affine} n={n}"), dtype, &got[0], &want[0]);

            let fill = format!("fill_{sfx}");
            let got = k.each_schedule(&fill, || {
                let y = output("y", n, dtype);
                k.launch(&fill, grid, block, KernelArgs::new().buffer(&y).u64(n as u64).f32(0.3));
                vec![y.to_bytes()]
            });
            let want = cpu_native(&[], |g, _| vec![g.fill(0.3, Shape(vec![n]), dtype).unwrap()]);
            assert_eq!(got[0], want[0].bytes, "{fill} n={n}: the same rounding of 0.3 everywhere");
        }

        // In place (y == x, dx == dy), as the header allows.
        let n = 1031;
        let mut rng = seed("inplace");
        let x = tensor(&[n], dtype, &uniform(&mut rng, n, -4.0, 4.0));
        let dy = tensor(&[n], dtype, &uniform(&mut rng, n, -1.0, 1.0));
        let xb = upload("x", &x);
        k.launch(&format!("unary_silu_{sfx}"), 3, 128, KernelArgs::new().buffer(&xb).buffer(&xb).u64(n as u64));
        let want = cpu(&[&x], |g, a| vec![g.unary(UnaryOp::Silu, a[0]).unwrap()]);
        check("unary_silu in place", dtype, &xb.to_bytes(), &want[0]);
        let (xb, dyb) = (upload("x", &x), upload("dy", &dy));
        let args = KernelArgs::new().buffer(&xb).buffer(&dyb).buffer(&dyb).u64(n as u64);
        k.launch(&format!("unary_silu_bwd_{sfx}"), 3, 128, args);
        let want = cpu(&[&x, &dy], |g, a| g.add_node(Op::UnaryBackward(UnaryOp::Silu), &[a[0], a[1]]).unwrap());
        check("unary_silu_bwd in place", dtype, &dyb.to_bytes(), &want[0]);
    }
    k.assert_all_launched();
}

// ---- binary.cu ------------------------------------------------------------------------------------------------------

/// Host mirror of `BroadcastDims` (kernels/binary.cu), passed by value: 200 bytes, no padding (Pod proves it).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct BroadcastDims {
    shape: [i64; 8],
    a_strides: [i64; 8],
    b_strides: [i64; 8],
    rank: i32,
    padding: i32,
}
const _: () = assert!(std::mem::size_of::<BroadcastDims>() == 200);

/// Element strides of a row-major tensor of shape `dims`.
fn row_major_strides(dims: &[usize]) -> Vec<i64> {
    let mut s = vec![1i64; dims.len()];
    for d in (0..dims.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * dims[d + 1] as i64;
    }
    s
}

/// Strides per output axis of an operand with shape `dims` and element strides `strides`, aligned to the right
/// of `out` (NumPy broadcasting): 0 on the axes it is broadcast along.
fn broadcast_strides(out: &[usize], dims: &[usize], strides: &[i64]) -> [i64; 8] {
    let mut s = [0i64; 8];
    let lead = out.len() - dims.len();
    for d in lead..out.len() {
        if dims[d - lead] != 1 {
            s[d] = strides[d - lead];
        }
    }
    s
}

fn broadcast_out(a: &[usize], b: &[usize]) -> Vec<usize> {
    let rank = a.len().max(b.len());
    let at = |s: &[usize], d: usize| if d + s.len() >= rank { s[d + s.len() - rank] } else { 1 };
    (0..rank).map(|d| at(a, d).max(at(b, d))).collect()
}

#[test]
fn binary_kernels_match_the_cpu_backend() {
    let k = Kernels::new("binary");
    let broadcasts: [(&[usize], &[usize]); 7] = [
        (&[2, 3, 4, 5], &[3, 1, 5]),
        (&[4, 1], &[3]),
        (&[], &[2, 3]),
        (&[], &[]),
        (&[2, 1, 6], &[5, 1]),
        (&[1031], &[1]),
        (&[2, 1, 3, 1, 2, 1, 2, 3], &[1, 2, 1, 3, 1, 2, 1, 1]), // rank 8, the most BroadcastDims holds
    ];
    for dtype in FLOATS {
        let sfx = suffix(dtype);
        for op in BinaryOp::ALL {
            let name = op.name();
            let mut rng = seed(&format!("{name}{sfx}"));
            // Divisors stay in [1.5, 2.5].
            let (blo, bhi) = if op == BinaryOp::Div { (1.5, 2.5) } else { (-2.0, 2.0) };
            let kernel = format!("binary_{name}_{sfx}");
            for n in SIZES {
                let a = tensor(&[n], dtype, &uniform(&mut rng, n, -2.0, 2.0));
                let b = tensor(&[n], dtype, &uniform(&mut rng, n, blo, bhi));
                let got = k.each_schedule(&kernel, || {
                    let (ab, bb, y) = (upload("a", &a), upload("b", &b), output("y", n, dtype));
                    let args = KernelArgs::new().buffer(&ab).buffer(&bb).buffer(&y).u64(n as u64);
                    k.launch(&kernel, grid_for(n, 32, 5), 32, args);
                    vec![y.to_bytes()]
                });
                let want = cpu(&[&a, &b], |g, v| vec![g.binary(op, v[0], v[1]).unwrap()]);
                check(&format!("{kernel} n={n}"), dtype, &got[0], &want[0]);
            }

            let kernel = format!("binary_{name}_bcast_{sfx}");
            for (sa, sb) in broadcasts {
                let out = broadcast_out(sa, sb);
                let n: usize = out.iter().product();
                let a = tensor(sa, dtype, &uniform(&mut rng, sa.iter().product(), -2.0, 2.0));
                let b = tensor(sb, dtype, &uniform(&mut rng, sb.iter().product(), blo, bhi));
                let mut dims = BroadcastDims::zeroed();
                for (d, &e) in out.iter().enumerate() {
                    dims.shape[d] = e as i64;
                }
                dims.a_strides = broadcast_strides(&out, sa, &row_major_strides(sa));
                dims.b_strides = broadcast_strides(&out, sb, &row_major_strides(sb));
                dims.rank = out.len() as i32;
                let got = k.each_schedule(&kernel, || {
                    let (ab, bb, y) = (upload("a", &a), upload("b", &b), output("y", n, dtype));
                    let args = KernelArgs::new().buffer(&ab).buffer(&bb).buffer(&y).u64(n as u64).value(dims);
                    k.launch(&kernel, grid_for(n, 64, 3), 64, args);
                    vec![y.to_bytes()]
                });
                let want = cpu(&[&a, &b], |g, v| vec![g.binary(op, v[0], v[1]).unwrap()]);
                check(&format!("{kernel} {sa:?} {sb:?}"), dtype, &got[0], &want[0]);
            }

            // In place, y == a, where `a` has y's own layout (b broadcast along the rows).
            let a = tensor(&[33, 5], dtype, &uniform(&mut rng, 165, -2.0, 2.0));
            let b = tensor(&[5], dtype, &uniform(&mut rng, 5, blo, bhi));
            let mut dims = BroadcastDims::zeroed();
            dims.shape[..2].copy_from_slice(&[33, 5]);
            dims.a_strides[..2].copy_from_slice(&[5, 1]);
            dims.b_strides[..2].copy_from_slice(&[0, 1]);
            dims.rank = 2;
            let (ab, bb) = (upload("a", &a), upload("b", &b));
            k.launch(&kernel, 2, 32, KernelArgs::new().buffer(&ab).buffer(&bb).buffer(&ab).u64(165).value(dims));
            let want = cpu(&[&a, &b], |g, v| vec![g.binary(op, v[0], v[1]).unwrap()]);
            check(&format!("{kernel} in place"), dtype, &ab.to_bytes(), &want[0]);

            // A strided view: `a` is stored [7, 5] and read transposed, as [5, 7].
            let a = tensor(&[7, 5], dtype, &uniform(&mut rng, 35, -2.0, 2.0));
            let b = tensor(&[5, 7], dtype, &uniform(&mut rng, 35, blo, bhi));
            let mut dims = BroadcastDims::zeroed();
            dims.shape[..2].copy_from_slice(&[5, 7]);
            dims.a_strides[..2].copy_from_slice(&[1, 5]);
            dims.b_strides[..2].copy_from_slice(&[7, 1]);
            dims.rank = 2;
            let (ab, bb, y) = (upload("a", &a), upload("b", &b), output("y", 35, dtype));
            k.launch(&kernel, 1, 32, KernelArgs::new().buffer(&ab).buffer(&bb).buffer(&y).u64(35).value(dims));
            let want = cpu(&[&a, &b], |g, v| {
                let at = g.permute(v[0], &[1, 0]).unwrap();
                vec![g.binary(op, at, v[1]).unwrap()]
            });
            check(&format!("{kernel} transposed view"), dtype, &y.to_bytes(), &want[0]);
        }
    }
    k.assert_all_launched();
}

// ---- cast.cu --------------------------------------------------------------------------------------------------------

/// f32 bit patterns at every boundary of the narrowing conversions, plus random ones.
fn f32_probe_bits() -> Vec<u32> {
    let mut bits = vec![
        0x0000_0000,
        0x8000_0000,
        0x0000_0001,
        0x007f_ffff,
        0x0080_0000, // zeros, f32 subnormals, smallest normal
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0xffc0_0001,
        0x7f80_0001,
        0x7fbf_ffff, // inf and NaNs (incl. signalling)
        0x7f7f_ffff,
        0x7f7f_8000,
        0x7f7f_7fff, // bf16 overflow: max f32, the tie to inf, just below
        0x3f80_8000,
        0x3f81_8000,
        0x3f80_7fff,
        0x3f80_8001, // bf16 ties to even both ways
        0x477f_e000,
        0x477f_efff,
        0x477f_f000,
        0x4780_0000, // f16: 65504, just below/at the round-to-inf point, 65536
        0x3880_0000,
        0x387f_ffff,
        0x387f_f000,
        0x387f_efff, // f16 smallest normal and the subnormal edge
        0x3300_0000,
        0x3300_0001,
        0x32ff_ffff,
        0x3380_0000,
        0x33c0_0000, // f16 half of smallest subnormal and around
        0x3f80_1000,
        0x3f80_3000,
        0x3f80_0fff, // f16 ties to even
    ];
    let negatives: Vec<u32> = bits.iter().map(|b| b ^ 0x8000_0000).collect();
    bits.extend(negatives);
    let mut rng = seed("cast");
    bits.extend((0..20_000).map(|_| rng.next_u64() as u32));
    bits.extend((0..20_000).map(|_| 0x3000_0000 + (rng.next_u64() % 0x1800_0000) as u32)); // around f16's range
    bits
}

fn same_bits_or_both_nan(what: &str, to: DType, got: &[u8], want: &[u8]) {
    let (g, w) = (values(got, to), values(want, to));
    for i in 0..g.len() {
        let s = to.size();
        let same = got[i * s..(i + 1) * s] == want[i * s..(i + 1) * s] || (g[i].is_nan() && w[i].is_nan());
        assert!(same, "{what}: element {i}: {} vs {}", g[i], w[i]);
    }
}

#[test]
fn cast_kernels_match_the_cpu_backend_bit_for_bit() {
    let k = Kernels::new("cast");
    let every_half: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
    let probes: Vec<u8> = f32_probe_bits().into_iter().flat_map(|b| b.to_le_bytes()).collect();
    for (from, to) in [
        (DType::F32, DType::BF16),
        (DType::F32, DType::F16),
        (DType::BF16, DType::F32),
        (DType::F16, DType::F32),
        (DType::BF16, DType::F16),
        (DType::F16, DType::BF16),
    ] {
        let bytes = if from == DType::F32 { probes.clone() } else { every_half.clone() };
        let n = bytes.len() / from.size();
        let x = HostTensor { shape: Shape(vec![n]), dtype: from, bytes };
        let kernel = format!("cast_{}_{}", suffix(from), suffix(to));
        let got = k.each_schedule(&kernel, || {
            let (xb, y) = (upload("x", &x), output("y", n, to));
            k.launch(&kernel, 7, 256, KernelArgs::new().buffer(&xb).buffer(&y).u64(n as u64));
            vec![y.to_bytes()]
        });
        let want = cpu_native(&[&x], |g, a| vec![g.cast(a[0], to).unwrap()]);
        same_bits_or_both_nan(&kernel, to, &got[0], &want[0].bytes);
    }
    k.assert_all_launched();
}

// ---- reduce.cu ------------------------------------------------------------------------------------------------------

#[test]
fn reduce_kernels_match_the_cpu_backend() {
    let k = Kernels::new("reduce");
    for dtype in FLOATS {
        let sfx = suffix(dtype);
        // (rows, cols, block, grid): rows that outnumber the grid, columns around a warp and a block.
        let kernel = format!("sum_rows_{sfx}");
        for (rows, cols, block, grid) in
            [(1, 1, 32, 1), (3, 31, 64, 2), (5, 33, 32, 5), (2, 1031, 128, 1), (33, 7, 96, 4)]
        {
            let x = tensor(&[rows, cols], dtype, &uniform(&mut seed(&kernel), rows * cols, -1.0, 1.0));
            let got = k.each_schedule(&kernel, || {
                let (xb, y) = (upload("x", &x), output("y", rows, dtype));
                k.launch(
                    &kernel,
                    grid,
                    block,
                    KernelArgs::new().buffer(&xb).buffer(&y).u64(rows as u64).u64(cols as u64),
                );
                vec![y.to_bytes()]
            });
            let want = cpu(&[&x], |g, a| vec![g.sum(a[0], &[1], false).unwrap()]);
            check(&format!("{kernel} {rows}x{cols}"), dtype, &got[0], &want[0]);
        }
        // (outer, reduced, inner, block rows k, grid).
        let kernel = format!("sum_axis_{sfx}");
        for (outer, reduced, inner, rows_k, grid) in [
            (1, 1, 2, 1, 1),
            (2, 5, 33, 4, 3),
            (3, 17, 70, 32, 2),
            (1, 1031, 3, 8, 1),
            (4, 1, 40, 3, 16),
            (2, 64, 31, 7, 5),
        ] {
            let n = outer * reduced * inner;
            let x = tensor(&[outer, reduced, inner], dtype, &uniform(&mut seed(&kernel), n, -1.0, 1.0));
            let got = k.each_schedule(&kernel, || {
                let (xb, y) = (upload("x", &x), output("y", outer * inner, dtype));
                let args =
                    KernelArgs::new().buffer(&xb).buffer(&y).u64(outer as u64).u64(reduced as u64).u64(inner as u64);
                k.launch(&kernel, grid, (32, rows_k), args);
                vec![y.to_bytes()]
            });
            let want = cpu(&[&x], |g, a| vec![g.sum(a[0], &[1], false).unwrap()]);
            check(&format!("{kernel} {outer}x{reduced}x{inner}"), dtype, &got[0], &want[0]);
        }
    }
    // The half types to and from f32: the same sums, with the input or the output kept in f32.
    for half in [DType::BF16, DType::F16] {
        let sfx = suffix(half);
        for (from, to, kernel) in
            [(half, DType::F32, format!("sum_rows_{sfx}_to_f32")), (DType::F32, half, format!("sum_rows_f32_to_{sfx}"))]
        {
            for (rows, cols, block, grid) in [(1, 1, 32, 1), (5, 33, 32, 2), (2, 1031, 128, 1), (33, 7, 96, 4)] {
                let x = tensor(&[rows, cols], from, &uniform(&mut seed(&kernel), rows * cols, -1.0, 1.0));
                let got = k.each_schedule(&kernel, || {
                    let (xb, y) = (upload("x", &x), output("y", rows, to));
                    let args = KernelArgs::new().buffer(&xb).buffer(&y).u64(rows as u64).u64(cols as u64);
                    k.launch(&kernel, grid, block, args);
                    vec![y.to_bytes()]
                });
                let want = cpu(&[&x], |g, a| vec![g.sum(a[0], &[1], false).unwrap()]);
                check(&format!("{kernel} {rows}x{cols}"), to, &got[0], &want[0]);
            }
        }
        for (from, to, kernel) in
            [(half, DType::F32, format!("sum_axis_{sfx}_to_f32")), (DType::F32, half, format!("sum_axis_f32_to_{sfx}"))]
        {
            for (outer, reduced, inner, rows_k, grid) in
                [(1, 1, 2, 1, 1), (2, 5, 33, 4, 3), (1, 1031, 3, 8, 1), (2, 64, 31, 7, 5)]
            {
                let n = outer * reduced * inner;
                let x = tensor(&[outer, reduced, inner], from, &uniform(&mut seed(&kernel), n, -1.0, 1.0));
                let got = k.each_schedule(&kernel, || {
                    let (xb, y) = (upload("x", &x), output("y", outer * inner, to));
                    let args = KernelArgs::new().buffer(&xb).buffer(&y);
                    k.launch(&kernel, grid, (32, rows_k), args.u64(outer as u64).u64(reduced as u64).u64(inner as u64));
                    vec![y.to_bytes()]
                });
                let want = cpu(&[&x], |g, a| vec![g.sum(a[0], &[1], false).unwrap()]);
                check(&format!("{kernel} {outer}x{reduced}x{inner}"), to, &got[0], &want[0]);
            }
        }
    }
    k.assert_all_launched();
}

// ---- norm.cu --------------------------------------------------------------------------------------------------------

/// Mean and 1/sqrt(var + eps) of each consecutive `count` values, in f64.
fn moments(x: &[f64], count: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    x.chunks(count)
        .map(|c| {
            let mean = c.iter().sum::<f64>() / count as f64;
            let var = c.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / count as f64;
            (mean, 1.0 / (var + eps).sqrt())
        })
        .unzip()
}

/// f32 statistics from a kernel against f64 ones: the mean to 1e-5 of the data's scale (it may be near zero),
/// rstd to 1e-5 relative.
fn check_stats(what: &str, mean: &[f32], rstd: &[f32], x: &[f64], count: usize, eps: f64) {
    let (want_mean, want_rstd) = moments(x, count, eps);
    let scale = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for i in 0..want_mean.len() {
        assert!(
            (mean[i] as f64 - want_mean[i]).abs() <= 1e-5 * scale,
            "{what}: mean {i}: {} vs {}",
            mean[i],
            want_mean[i]
        );
        assert!(
            (rstd[i] as f64 / want_rstd[i] - 1.0).abs() <= 1e-5,
            "{what}: rstd {i}: {} vs {}",
            rstd[i],
            want_rstd[i]
        );
    }
}

/// The statistics outputs of a normalisation forward are optional, each on its own: with either or both null the
/// output is unchanged and each statistic given is the one of the full launch (`full` = [y, mean, rstd] bytes).
fn optional_stats(
    kernel: &str,
    what: &str,
    full: &[Vec<u8>],
    launch: impl Fn(&DeviceBuffer, Option<&DeviceBuffer>, Option<&DeviceBuffer>),
) {
    for (with_mean, with_rstd) in [(false, false), (true, false), (false, true)] {
        let y = DeviceBuffer::uninit("y", full[0].len());
        let mean = with_mean.then(|| DeviceBuffer::uninit("mean", full[1].len()));
        let rstd = with_rstd.then(|| DeviceBuffer::uninit("rstd", full[2].len()));
        launch(&y, mean.as_ref(), rstd.as_ref());
        let case = format!("{kernel} {what} with mean {with_mean}, rstd {with_rstd}");
        assert_eq!(y.to_bytes(), full[0], "{case}: y changed");
        if let Some(m) = &mean {
            assert_eq!(m.to_bytes(), full[1], "{case}: mean not written");
        }
        if let Some(r) = &rstd {
            assert_eq!(r.to_bytes(), full[2], "{case}: rstd not written");
        }
    }
}

#[test]
fn norm_kernels_match_the_cpu_backend() {
    let k = Kernels::new("norm");
    groupnorm_cases(&k);
    layernorm_cases(&k);
    k.assert_all_launched();
}

fn groupnorm_cases(k: &Kernels) {
    let eps = 1e-5f32 as f64; // the value the kernel receives as f32
                              // (x shape [N, C, spatial...], groups, block, grid): one element per group, odd spatial sizes, one channel
                              // per group, a group of 2062 elements, grids smaller than N * G.
    let cases: [(&[usize], usize, u32, u32); 5] = [
        (&[1, 4, 1], 2, 32, 1),
        (&[2, 6, 7], 3, 64, 4),
        (&[2, 4, 5, 5], 4, 96, 3),
        (&[3, 8, 33], 2, 128, 6),
        (&[1, 2, 1031], 1, 256, 1),
    ];
    for dtype in FLOATS {
        let sfx = suffix(dtype);
        for (shape, groups, block, grid) in cases {
            let (n, c) = (shape[0], shape[1]);
            let s: usize = shape[2..].iter().product();
            let what = format!("{shape:?} G={groups} {sfx}");
            let mut rng = seed(&what);
            // An offset larger than the spread, where one-pass variance would lose precision.
            let x = tensor(shape, dtype, &uniform(&mut rng, n * c * s, 2.0, 4.0));
            let gamma = tensor(&[c], dtype, &uniform(&mut rng, c, 0.5, 1.5));
            let beta = tensor(&[c], dtype, &uniform(&mut rng, c, -0.5, 0.5));
            let dy = tensor(shape, dtype, &uniform(&mut rng, n * c * s, -1.0, 1.0));
            let dims =
                |args: KernelArgs| args.u64(n as u64).u64(c as u64).u64(s as u64).u64(groups as u64).f32(eps as f32);

            let fwd = format!("groupnorm_{sfx}");
            let got = k.each_schedule(&fwd, || {
                let (xb, gb, bb) = (upload("x", &x), upload("gamma", &gamma), upload("beta", &beta));
                let y = output("y", n * c * s, dtype);
                let (mean, rstd) = (output("mean", n * groups, DType::F32), output("rstd", n * groups, DType::F32));
                let args = KernelArgs::new().buffer(&xb).buffer(&gb).buffer(&bb).buffer(&y).buffer(&mean).buffer(&rstd);
                k.launch(&fwd, grid, block, dims(args));
                vec![y.to_bytes(), mean.to_bytes(), rstd.to_bytes()]
            });
            let want = cpu(&[&x, &gamma, &beta], |g, a| vec![g.group_norm(a[0], a[1], a[2], groups, eps).unwrap()]);
            check(&format!("{fwd} {what}"), dtype, &got[0], &want[0]);
            let stats = |b: &[u8]| bytemuck::pod_read_unaligned::<f32>(&b[..4]);
            let (mean, rstd): (Vec<f32>, Vec<f32>) =
                got[1].chunks(4).zip(got[2].chunks(4)).map(|(m, r)| (stats(m), stats(r))).unzip();
            check_stats(&format!("{fwd} {what}"), &mean, &rstd, &x.to_f64(), c / groups * s, eps);
            let (xb, gb, bb) = (upload("x", &x), upload("gamma", &gamma), upload("beta", &beta));
            optional_stats(&fwd, &what, &got, |y, mean, rstd| {
                let args = KernelArgs::new().buffer(&xb).buffer(&gb).buffer(&bb).buffer(y);
                let args = match mean {
                    Some(m) => args.buffer(m),
                    None => args.null(),
                };
                let args = match rstd {
                    Some(r) => args.buffer(r),
                    None => args.null(),
                };
                k.launch(&fwd, grid, block, dims(args));
            });

            let bwd = format!("groupnorm_bwd_{sfx}");
            let finish = format!("norm_params_finish_{sfx}");
            let got = k.each_schedule(&bwd, || {
                let (xb, gb, dyb) = (upload("x", &x), upload("gamma", &gamma), upload("dy", &dy));
                let dx = output("dx", n * c * s, dtype);
                let (dg_part, db_part) =
                    (output("dgamma_part", n * c, DType::F32), output("dbeta_part", n * c, DType::F32));
                let args = KernelArgs::new()
                    .buffer(&xb)
                    .buffer(&gb)
                    .buffer(&dyb)
                    .buffer(&dx)
                    .buffer(&dg_part)
                    .buffer(&db_part);
                k.launch(&bwd, grid, block, dims(args));
                let (dg, db) = (output("dgamma", c, dtype), output("dbeta", c, dtype));
                let args = KernelArgs::new()
                    .buffer(&dg_part)
                    .buffer(&db_part)
                    .buffer(&dg)
                    .buffer(&db)
                    .u64(n as u64)
                    .u64(c as u64);
                k.launch(&finish, 2, 4, args);
                vec![dx.to_bytes(), dg.to_bytes(), db.to_bytes()]
            });
            let want = cpu(&[&x, &gamma, &dy], |g, a| {
                let op = Op::GroupNormBackward { groups, eps: F64Bits::new(eps), layout: Layout::Nchw };
                g.add_node(op, &[a[0], a[1], a[2]]).unwrap()
            });
            let dx_scale = norm_grad_scale(&x, &dy, &gamma, c / groups * s, eps);
            check_scaled(&format!("{bwd} {what} dx"), dtype, &got[0], &want[0], dx_scale);
            check(&format!("{bwd} {what} dgamma"), dtype, &got[1], &want[1]);
            check(&format!("{bwd} {what} dbeta"), dtype, &got[2], &want[2]);
        }
    }
}

fn layernorm_cases(k: &Kernels) {
    let eps = 1e-5f32 as f64; // the value the kernel receives as f32
                              // (rows, D, warps per block, grid, rows per parameter-gradient part).
    let cases = [(1, 1, 1, 1, 1), (5, 31, 4, 1, 2), (33, 33, 3, 4, 4), (3, 1031, 2, 1, 1), (7, 64, 8, 2, 3)];
    for dtype in FLOATS {
        let sfx = suffix(dtype);
        for (rows, d, warps, grid, rows_per_part) in cases {
            let what = format!("{rows}x{d} {sfx}");
            let mut rng = seed(&what);
            let x = tensor(&[rows, d], dtype, &uniform(&mut rng, rows * d, -3.0, 5.0));
            let gamma = tensor(&[d], dtype, &uniform(&mut rng, d, 0.5, 1.5));
            let beta = tensor(&[d], dtype, &uniform(&mut rng, d, -0.5, 0.5));
            let dy = tensor(&[rows, d], dtype, &uniform(&mut rng, rows * d, -1.0, 1.0));

            let fwd = format!("layernorm_{sfx}");
            let got = k.each_schedule(&fwd, || {
                let (xb, gb, bb) = (upload("x", &x), upload("gamma", &gamma), upload("beta", &beta));
                let (y, mean, rstd) =
                    (output("y", rows * d, dtype), output("mean", rows, DType::F32), output("rstd", rows, DType::F32));
                let args = KernelArgs::new().buffer(&xb).buffer(&gb).buffer(&bb).buffer(&y).buffer(&mean).buffer(&rstd);
                k.launch(&fwd, grid, (32, warps), args.u64(rows as u64).u64(d as u64).f32(eps as f32));
                vec![y.to_bytes(), mean.to_bytes(), rstd.to_bytes()]
            });
            let want = cpu(&[&x, &gamma, &beta], |g, a| vec![g.layer_norm(a[0], a[1], a[2], eps).unwrap()]);
            check(&format!("{fwd} {what}"), dtype, &got[0], &want[0]);
            let f32s = |b: &[u8]| values(b, DType::F32).into_iter().map(|v| v as f32).collect::<Vec<f32>>();
            check_stats(&format!("{fwd} {what}"), &f32s(&got[1]), &f32s(&got[2]), &x.to_f64(), d, eps);
            let (xb, gb, bb) = (upload("x", &x), upload("gamma", &gamma), upload("beta", &beta));
            optional_stats(&fwd, &what, &got, |y, mean, rstd| {
                let args = KernelArgs::new().buffer(&xb).buffer(&gb).buffer(&bb).buffer(y);
                let args = match mean {
                    Some(m) => args.buffer(m),
                    None => args.null(),
                };
                let args = match rstd {
                    Some(r) => args.buffer(r),
                    None => args.null(),
                };
                k.launch(&fwd, grid, (32, warps), args.u64(rows as u64).u64(d as u64).f32(eps as f32));
            });

            let bwd = format!("layernorm_bwd_{sfx}");
            let params = format!("layernorm_bwd_params_{sfx}");
            let finish = format!("norm_params_finish_{sfx}");
            let parts = rows.div_ceil(rows_per_part);
            let got = k.each_schedule(&bwd, || {
                let (xb, gb, dyb) = (upload("x", &x), upload("gamma", &gamma), upload("dy", &dy));
                let (dx, stats) = (output("dx", rows * d, dtype), output("stats", rows * 2, DType::F32));
                let args = KernelArgs::new().buffer(&xb).buffer(&gb).buffer(&dyb).buffer(&dx).buffer(&stats);
                k.launch(&bwd, grid, (32, warps), args.u64(rows as u64).u64(d as u64).f32(eps as f32));
                let (dg_part, db_part) =
                    (output("dgamma_part", parts * d, DType::F32), output("dbeta_part", parts * d, DType::F32));
                let args = KernelArgs::new().buffer(&xb).buffer(&dyb).buffer(&stats).buffer(&dg_part).buffer(&db_part);
                k.launch(&params, grid + 1, (32, warps), args.u64(rows as u64).u64(d as u64).u64(rows_per_part as u64));
                let (dg, db) = (output("dgamma", d, dtype), output("dbeta", d, dtype));
                let args = KernelArgs::new().buffer(&dg_part).buffer(&db_part).buffer(&dg).buffer(&db);
                k.launch(&finish, grid_for(d, 32, 3), 32, args.u64(parts as u64).u64(d as u64));
                vec![dx.to_bytes(), dg.to_bytes(), db.to_bytes(), stats.to_bytes()]
            });
            let want = cpu(&[&x, &gamma, &dy], |g, a| {
                g.add_node(Op::LayerNormBackward { eps: F64Bits::new(eps) }, &[a[0], a[1], a[2]]).unwrap()
            });
            check_scaled(
                &format!("{bwd} {what} dx"),
                dtype,
                &got[0],
                &want[0],
                norm_grad_scale(&x, &dy, &gamma, d, eps),
            );
            check(&format!("{bwd} {what} dgamma"), dtype, &got[1], &want[1]);
            check(&format!("{bwd} {what} dbeta"), dtype, &got[2], &want[2]);
            let stats = f32s(&got[3]);
            let (mean, rstd): (Vec<f32>, Vec<f32>) = stats.chunks(2).map(|p| (p[0], p[1])).unzip();
            check_stats(&format!("{bwd} {what} stats"), &mean, &rstd, &x.to_f64(), d, eps);
        }
    }
}

// ---- softmax.cu -----------------------------------------------------------------------------------------------------

#[test]
fn softmax_kernels_match_the_cpu_backend() {
    let k = Kernels::new("softmax");
    // (rows, D, warps per block, grid): rows of 1 and 5 elements, one longer than a block, more rows than warps.
    let cases = [(1, 1, 1, 1), (3, 5, 2, 1), (2, 1025, 4, 1), (33, 31, 3, 4), (4, 64, 1, 2)];
    for dtype in FLOATS {
        let sfx = suffix(dtype);
        for (rows, d, warps, grid) in cases {
            let what = format!("{rows}x{d} {sfx}");
            let mut rng = seed(&what);
            let mut xs = uniform(&mut rng, rows * d, -8.0, 8.0);
            if d > 2 {
                xs[1] = f64::NEG_INFINITY; // a masked entry: weight 0, the rest of the row unaffected
            }
            let x = tensor(&[rows, d], dtype, &xs);
            let dy = tensor(&[rows, d], dtype, &uniform(&mut rng, rows * d, -1.0, 1.0));

            let fwd = format!("softmax_{sfx}");
            let got = k.each_schedule(&fwd, || {
                let (xb, y) = (upload("x", &x), output("y", rows * d, dtype));
                k.launch(
                    &fwd,
                    grid,
                    (32, warps),
                    KernelArgs::new().buffer(&xb).buffer(&y).u64(rows as u64).u64(d as u64),
                );
                vec![y.to_bytes()]
            });
            let want = cpu(&[&x], |g, a| vec![g.softmax(a[0]).unwrap()]);
            check(&format!("{fwd} {what}"), dtype, &got[0], &want[0]);
            // In place (y == x), as the header allows.
            let xb = upload("x", &x);
            k.launch(&fwd, grid, (32, warps), KernelArgs::new().buffer(&xb).buffer(&xb).u64(rows as u64).u64(d as u64));
            assert_eq!(xb.to_bytes(), got[0], "{fwd} {what}: in place differs");

            // The backward reads y, the forward's output in the storage type.
            let y = tensor(&[rows, d], dtype, &want[0].to_f64());
            let bwd = format!("softmax_bwd_{sfx}");
            let got = k.each_schedule(&bwd, || {
                let (yb, dyb, dx) = (upload("y", &y), upload("dy", &dy), output("dx", rows * d, dtype));
                let args = KernelArgs::new().buffer(&yb).buffer(&dyb).buffer(&dx).u64(rows as u64).u64(d as u64);
                k.launch(&bwd, grid, (32, warps), args);
                vec![dx.to_bytes()]
            });
            let want = cpu(&[&y, &dy], |g, a| g.add_node(Op::SoftmaxBackward, &[a[0], a[1]]).unwrap());
            // dx = y * (dy - dot) cancels where dy is close to dot; its terms are of size |dy|.
            check_scaled(&format!("{bwd} {what}"), dtype, &got[0], &want[0], 2.0 * max_abs(&y) * max_abs(&dy));
            // In place (dx == dy), as the header allows.
            let (yb, dyb) = (upload("y", &y), upload("dy", &dy));
            let args = KernelArgs::new().buffer(&yb).buffer(&dyb).buffer(&dyb).u64(rows as u64).u64(d as u64);
            k.launch(&bwd, grid, (32, warps), args);
            assert_eq!(dyb.to_bytes(), got[0], "{bwd} {what}: in place differs");
        }
    }
    k.assert_all_launched();
}

// ---- loss.cu --------------------------------------------------------------------------------------------------------

#[test]
fn mse_kernels_match_the_cpu_backend() {
    let k = Kernels::new("loss");
    for dtype in FLOATS {
        let sfx = suffix(dtype);
        for n in [1, 33, 1031, 4099] {
            let what = format!("n={n} {sfx}");
            let mut rng = seed(&what);
            let a = tensor(&[n], dtype, &uniform(&mut rng, n, -2.0, 2.0));
            let b = tensor(&[n], dtype, &uniform(&mut rng, n, -2.0, 2.0));
            let dloss = tensor(&[], dtype, &[0.75]);
            let parts = grid_for(n, 64, 5);

            let (partial, finish) = (format!("mse_partial_{sfx}"), format!("mse_finish_{sfx}"));
            let got = k.each_schedule(&partial, || {
                let (ab, bb, part) = (upload("a", &a), upload("b", &b), output("partial", parts as usize, DType::F32));
                k.launch(&partial, parts, 64, KernelArgs::new().buffer(&ab).buffer(&bb).buffer(&part).u64(n as u64));
                // Two blocks: the second must leave the loss alone (the kernel's guard against careless launches).
                let loss = output("loss", 1, dtype);
                let args = KernelArgs::new().buffer(&part).u64(parts as u64).buffer(&loss).u64(n as u64);
                k.launch(&finish, 2, 32, args);
                vec![loss.to_bytes()]
            });
            let want = cpu(&[&a, &b], |g, v| vec![g.mse_loss(v[0], v[1]).unwrap()]);
            check(&format!("{partial} + {finish} {what}"), dtype, &got[0], &want[0]);

            let bwd = format!("mse_bwd_{sfx}");
            let got = k.each_schedule(&bwd, || {
                let (ab, bb, db, da) =
                    (upload("a", &a), upload("b", &b), upload("dloss", &dloss), output("da", n, dtype));
                let args = KernelArgs::new().buffer(&ab).buffer(&bb).buffer(&db).buffer(&da).u64(n as u64);
                k.launch(&bwd, grid_for(n, 32, 3), 32, args);
                vec![da.to_bytes()]
            });
            let want = cpu(&[&a, &b, &dloss], |g, v| g.add_node(Op::MseLossBackward, &[v[0], v[1], v[2]]).unwrap());
            check(&format!("{bwd} {what}"), dtype, &got[0], &want[0]);
        }
    }
    k.assert_all_launched();
}

// ---- adamw.cu -------------------------------------------------------------------------------------------------------

/// Host mirror of `AdamWTensor` (kernels/adamw.cu): four device pointers and the element count, 40 bytes.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AdamWTensor {
    param: u64,
    grad: u64,
    m: u64,
    v: u64,
    numel: u64,
}
const _: () = assert!(std::mem::size_of::<AdamWTensor>() == 40);

/// Host mirror of `AdamWChunk`: which tensor, and which chunk of it; 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AdamWChunk {
    tensor: u32,
    chunk: u32,
}
const _: () = assert!(std::mem::size_of::<AdamWChunk>() == 8);

#[test]
fn adamw_kernels_match_the_cpu_backend() {
    let k = Kernels::new("adamw");
    // f32 values of the hyper-parameters, so both sides use the same numbers.
    let (beta1, beta2, eps, wd) = (0.9f32, 0.999f32, 1e-8f32, 0.01f32);
    let lr = 1e-2f32;
    let sizes = [1usize, 33, 1031, 64];
    let chunk_size = 64usize;
    for dtype in FLOATS {
        let sfx = suffix(dtype);
        let kernel = format!("adamw_grad_{sfx}");
        let mut rng = seed(&kernel);
        let params: Vec<HostTensor> =
            sizes.iter().map(|&n| tensor(&[n], DType::F32, &uniform(&mut rng, n, -1.0, 1.0))).collect();
        // Two steps, each with its own gradients (stored as the gradient type).
        let grads: Vec<Vec<HostTensor>> = (0..2)
            .map(|_| sizes.iter().map(|&n| tensor(&[n], dtype, &uniform(&mut rng, n, -0.5, 0.5))).collect())
            .collect();
        let hyper = |t: i32| [lr, 1.0 / (1.0 - beta1.powi(t)), 1.0 / (1.0 - beta2.powi(t))];

        let got = k.each_schedule(&kernel, || {
            let p: Vec<DeviceBuffer> = params.iter().map(|t| upload("param", t)).collect();
            let m: Vec<DeviceBuffer> = sizes.iter().map(|&n| DeviceBuffer::zeroed("m", n * 4)).collect();
            let v: Vec<DeviceBuffer> = sizes.iter().map(|&n| DeviceBuffer::zeroed("v", n * 4)).collect();
            for (step, step_grads) in grads.iter().enumerate() {
                let g: Vec<DeviceBuffer> = step_grads.iter().map(|t| upload("grad", t)).collect();
                let tensors: Vec<AdamWTensor> = (0..sizes.len())
                    .map(|i| AdamWTensor {
                        param: p[i].device_ptr(),
                        grad: g[i].device_ptr(),
                        m: m[i].device_ptr(),
                        v: v[i].device_ptr(),
                        numel: sizes[i] as u64,
                    })
                    .collect();
                let chunks: Vec<AdamWChunk> = sizes
                    .iter()
                    .enumerate()
                    .flat_map(|(i, &n)| {
                        (0..n.div_ceil(chunk_size)).map(move |c| AdamWChunk { tensor: i as u32, chunk: c as u32 })
                    })
                    .collect();
                let (tb, cb) =
                    (DeviceBuffer::from_slice("tensors", &tensors), DeviceBuffer::from_slice("chunks", &chunks));
                let hb = DeviceBuffer::from_slice("hyper", &hyper(step as i32 + 1));
                let args = KernelArgs::new()
                    .buffer(&tb)
                    .buffer(&cb)
                    .u64(chunks.len() as u64)
                    .u64(chunk_size as u64)
                    .buffer(&hb)
                    .f32(beta1)
                    .f32(beta2)
                    .f32(eps)
                    .f32(wd);
                // Fewer blocks than chunks, and blocks both smaller and larger than a chunk.
                let block = if step == 0 { 32 } else { 128 };
                k.launch(&kernel, 5, block, args);
            }
            p.iter().chain(&m).chain(&v).map(DeviceBuffer::to_bytes).collect()
        });

        // The reference: one graph updating every tensor, run for the same two steps.
        let mut g = Graph::new();
        let op = Op::AdamW {
            beta1: F64Bits::new(beta1 as f64),
            beta2: F64Bits::new(beta2 as f64),
            eps: F64Bits::new(eps as f64),
            weight_decay: F64Bits::new(wd as f64),
        };
        let hyper_id = g.input("hyper", Shape(vec![3]), DType::F64);
        let mut ids = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let p = g.param(&format!("p{i}"), Shape(vec![n]), DType::F64, true);
            let gr = g.input(&format!("g{i}"), Shape(vec![n]), DType::F64);
            let m = g.state(&format!("m{i}"), Shape(vec![n]), DType::F64);
            let v = g.state(&format!("v{i}"), Shape(vec![n]), DType::F64);
            g.add_node(op.clone(), &[p, gr, m, v, hyper_id]).unwrap();
            ids.push((p, gr, m, v));
        }
        let wide = |t: &HostTensor| HostTensor::from_f64(t.shape.clone(), DType::F64, &t.to_f64()).unwrap();
        let mut prog = CpuBackend::new(1).compile(g).expect("compile the reference graph");
        for (i, &(p, _, m, v)) in ids.iter().enumerate() {
            prog.upload(p, &wide(&params[i])).unwrap();
            prog.upload(m, &HostTensor::zeros(Shape(vec![sizes[i]]), DType::F64)).unwrap();
            prog.upload(v, &HostTensor::zeros(Shape(vec![sizes[i]]), DType::F64)).unwrap();
        }
        for (step, step_grads) in grads.iter().enumerate() {
            let h: Vec<f64> = hyper(step as i32 + 1).iter().map(|&x| x as f64).collect();
            prog.upload(hyper_id, &HostTensor::from_f64(Shape(vec![3]), DType::F64, &h).unwrap()).unwrap();
            for (i, &(_, gr, _, _)) in ids.iter().enumerate() {
                prog.upload(gr, &wide(&step_grads[i])).unwrap();
            }
            prog.launch().expect("run the reference graph");
        }
        for (i, &(p, _, m, v)) in ids.iter().enumerate() {
            let n = sizes.len();
            for (j, (id, name)) in [(p, "param"), (m, "m"), (v, "v")].into_iter().enumerate() {
                let want = prog.download(id).unwrap();
                check(&format!("{kernel} tensor {i} {name}"), DType::F32, &got[j * n + i], &want);
            }
        }
    }
    accumulate_grad_matches_the_cpu_backend(&k);
    k.assert_all_launched();
}

/// `accumulate_grad_f32`: three micro-batches into one accumulator that starts as NaN (the first, keep = 0, must
/// overwrite it, not add to it), against the CPU backend's `AccumulateGrad` on the same data; exact, since both add
/// the same f32 values in the same order.
fn accumulate_grad_matches_the_cpu_backend(k: &Kernels) {
    let kernel = "accumulate_grad_f32";
    for n in [1usize, 33, 1031] {
        let mut rng = seed(&format!("{kernel} {n}"));
        let grads: Vec<HostTensor> =
            (0..3).map(|_| tensor(&[n], DType::F32, &uniform(&mut rng, n, -1.0, 1.0))).collect();
        let stale = tensor(&[n], DType::F32, &vec![f64::NAN; n]);
        let got = k.each_schedule_and_grid(kernel, 3, grid_for(n, 64, 1024), |grid| {
            let acc = upload("acc", &stale);
            for (micro, g) in grads.iter().enumerate() {
                let (gb, keep) = (upload("grad", g), DeviceBuffer::from_slice("keep", &[micro.min(1) as f32]));
                k.launch(kernel, grid, 64, KernelArgs::new().buffer(&acc).buffer(&gb).buffer(&keep).u64(n as u64));
            }
            vec![acc.to_bytes()]
        });
        let mut g = Graph::new();
        let acc = g.state("acc", Shape(vec![n]), DType::F32);
        let grad = g.input("grad", Shape(vec![n]), DType::F32);
        let keep = g.input("keep", Shape(vec![1]), DType::F32);
        g.add_node(Op::AccumulateGrad, &[acc, grad, keep]).unwrap();
        let mut prog = CpuBackend::new(1).compile(g).expect("compile the reference graph");
        prog.upload(acc, &stale).unwrap();
        for (micro, gr) in grads.iter().enumerate() {
            prog.upload(grad, gr).unwrap();
            prog.upload(keep, &tensor(&[1], DType::F32, &[micro.min(1) as f64])).unwrap();
            prog.launch().unwrap();
        }
        let want = prog.download(acc).unwrap();
        assert_eq!(got[0], want.bytes, "{kernel} n={n}");
        let sum: Vec<f64> = (0..n).map(|i| grads.iter().map(|t| t.to_f64()[i]).sum()).collect();
        check(&format!("{kernel} n={n} against the f64 sum"), DType::F32, &got[0], &tensor(&[n], DType::F64, &sum));
    }
}

// ---- upsample.cu ----------------------------------------------------------------------------------------------------

#[test]
fn upsample_kernels_match_the_cpu_backend() {
    let k = Kernels::new("upsample");
    for dtype in FLOATS {
        let sfx = suffix(dtype);
        for (planes, h, w) in [(1, 1, 1), (3, 5, 7), (2, 33, 3), (1, 17, 31)] {
            let what = format!("{planes}x{h}x{w} {sfx}");
            let mut rng = seed(&what);
            let x = tensor(&[planes, h, w], dtype, &uniform(&mut rng, planes * h * w, -2.0, 2.0));
            let dy = tensor(&[planes, 2 * h, 2 * w], dtype, &uniform(&mut rng, planes * 4 * h * w, -2.0, 2.0));
            let dims = |args: KernelArgs| args.u64(planes as u64).u64(h as u64).u64(w as u64);

            let fwd = format!("upsample2x_{sfx}");
            let got = k.each_schedule(&fwd, || {
                let (xb, y) = (upload("x", &x), output("y", planes * 4 * h * w, dtype));
                k.launch(&fwd, grid_for(4 * planes * h * w, 64, 3), 64, dims(KernelArgs::new().buffer(&xb).buffer(&y)));
                vec![y.to_bytes()]
            });
            let want = cpu_native(&[&x], |g, a| vec![g.upsample2x(a[0]).unwrap()]);
            assert_eq!(got[0], want[0].bytes, "{fwd} {what}: a copy must be exact");

            let bwd = format!("upsample2x_bwd_{sfx}");
            let got = k.each_schedule(&bwd, || {
                let (dyb, dx) = (upload("dy", &dy), output("dx", planes * h * w, dtype));
                k.launch(&bwd, grid_for(planes * h * w, 32, 2), 32, dims(KernelArgs::new().buffer(&dyb).buffer(&dx)));
                vec![dx.to_bytes()]
            });
            let want = cpu(&[&dy], |g, a| g.add_node(Op::Upsample2xBackward, &[a[0]]).unwrap());
            check(&format!("{bwd} {what}"), dtype, &got[0], &want[0]);
        }
    }
    k.assert_all_launched();
}
