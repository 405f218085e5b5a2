//! The GPU half of `scripts/gpu-check`: the CUDA executor on a real GPU ([`CudaDevice`]) against the CPU backend.
//!
//! Without a GPU (ZEROCONV_EXPECT_GPU unset or 0 and no /dev/nvidiactl) only the probe test runs, and checks that
//! opening the device is a `CudaUnavailable` error (never a panic); the others return at once. With
//! ZEROCONV_EXPECT_GPU=1 (what `scripts/gpu-check --run` sets) every test must pass on the GPU:
//! - `a_probe`: the device, every library and its version;
//! - `ab_fragment_layouts`: the tensor-core probes (kernels/mma_probe.cu: ldmatrix registers, mma.sync on exact
//!   tiles) give the GPU the same bytes as the CUDA emulator, whose fragment tables the flash kernels rely on;
//! - `b_kernels`, `c_gemms`, `d_convolutions`: one-node graphs through shipped kernels, cuBLASLt/cuBLAS and cuDNN
//!   (f32 and bf16) against the CPU backend;
//! - `e_training_step`: a conv + GroupNorm + attention + MSE + clip + AdamW step, 3 steps (eager, captured, replayed)
//!   against the CPU, then replay equal to eager bit for bit;
//! - `g_nccl_one_rank`: NCCL on the communication stream (a one-rank communicator: one GPU cannot hold two NCCL
//!   ranks), eager and inside a captured graph with its fork and join.

mod common;

use common::nets::{self, NetSpec};
use common::Rng;
use zeroconv::engine::cpu::CpuBackend;
use zeroconv::engine::cuda::CudaDevice;
use zeroconv::engine::gpu::{GpuBackend, GpuProgram, StepMode};
use zeroconv::engine::{Backend, HostTensor, Program};
use zeroconv::graph::{DType, F64Bits, Graph, Layout, Op, Shape, UnaryOp, ValueId};
use zeroconv::Error;

fn gpu_expected() -> bool {
    match std::env::var("ZEROCONV_EXPECT_GPU").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => std::path::Path::new("/dev/nvidiactl").exists(),
    }
}

fn cuda(mode: StepMode) -> GpuBackend<CudaDevice> {
    GpuBackend::new(|| CudaDevice::open(0), mode)
}

#[test]
fn a_probe() {
    let opened = CudaDevice::open(0);
    if !gpu_expected() {
        match opened {
            Err(Error::CudaUnavailable(m)) => println!("no GPU here, as expected: {m}"),
            Err(other) => panic!("expected CudaUnavailable without a GPU, got {other}"),
            Ok(_) => panic!("no GPU expected, but a device opened; set ZEROCONV_EXPECT_GPU=1"),
        }
        return;
    }
    let d = opened.unwrap_or_else(|e| panic!("GPU probe failed: {e}"));
    let p = d.probe_info();
    println!(
        "device {} (compute {}.{}, {:.1} GiB), driver supports CUDA {}.{}, kernels {}",
        p.name,
        p.compute_capability.0,
        p.compute_capability.1,
        p.total_memory_bytes as f64 / (1u64 << 30) as f64,
        p.driver_version.0,
        p.driver_version.1,
        d.arch().name()
    );
    for lib in d.libraries() {
        println!("{lib}");
    }
}

/// The fragment layouts the emulator implements (from the PTX ISA's tables, tests/emulated/mma_emulated.rs) are the
/// hardware's: every probe launch gives the same bytes on the GPU as on the emulated device.
#[test]
fn ab_fragment_layouts() {
    if !gpu_expected() {
        return;
    }
    let mut gpu = CudaDevice::open(0).unwrap_or_else(|e| panic!("{e}"));
    let mut emu = zeroconv::engine::device::emu::EmuDevice::new(Default::default());
    let (on_gpu, emulated) = (common::mma_probe::run(&mut gpu), common::mma_probe::run(&mut emu));
    assert_eq!(on_gpu.len(), emulated.len());
    for ((what, got), (_, want)) in on_gpu.iter().zip(&emulated) {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        assert!(
            first.is_none(),
            "{what}: the GPU differs from the emulator first at byte {first:?} (lane {:?})",
            first.map(|b| b / 16)
        );
        println!("{what}: {} bytes equal", got.len());
    }
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| if x.is_nan() != y.is_nan() { f64::INFINITY } else { (x - y).abs() })
        .fold(0.0, f64::max)
        / scale
}

/// One op on the GPU and on the CPU, every output compared.
fn check(what: &str, op: Op, inputs: Vec<(Vec<usize>, DType)>, rng: &mut Rng) {
    let mut g = Graph::new();
    let ids: Vec<ValueId> =
        inputs.iter().enumerate().map(|(i, (s, d))| g.input(&format!("in{i}"), Shape::new(s), *d)).collect();
    let outs = g.add_node(op, &ids).unwrap_or_else(|e| panic!("{what}: {e}"));
    g.outputs.extend(&outs);
    let mut cpu = CpuBackend::new(2).compile(g.clone()).unwrap();
    let mut gpu = cuda(StepMode::Eager).compile(g.clone()).unwrap_or_else(|e| panic!("{what}: compile: {e}"));
    for (&v, (s, d)) in ids.iter().zip(&inputs) {
        let t = HostTensor::from_f64(Shape::new(s), *d, &rng.vec(s.iter().product())).unwrap();
        cpu.upload(v, &t).unwrap();
        gpu.upload(v, &t).unwrap();
    }
    cpu.launch().unwrap();
    gpu.launch().unwrap_or_else(|e| panic!("{what}: {e}"));
    for &o in &outs {
        let (want, got) = (cpu.download(o).unwrap().to_f64(), gpu.download(o).unwrap().to_f64());
        let e = rel_err(&got, &want);
        let tol = if g.dtype(o) == DType::F32 { 1e-4 } else { 2e-2 };
        println!("{what}: output {o}: relative error {e:.2e}");
        assert!(e <= tol, "{what}: output {o} relative error {e:.3e} > {tol:.0e}");
    }
}

#[test]
fn b_kernels() {
    if !gpu_expected() {
        return;
    }
    let mut rng = Rng::new(1);
    for d in [DType::F32, DType::BF16, DType::F16] {
        for u in [UnaryOp::Silu, UnaryOp::Exp, UnaryOp::GeluTanh] {
            check(&format!("unary {u:?} {d}"), Op::Unary(u), vec![(vec![3, 1000], d)], &mut rng);
        }
        check(&format!("softmax {d}"), Op::Softmax, vec![(vec![37, 100], d)], &mut rng);
        check(
            &format!("groupnorm {d}"),
            Op::GroupNorm { groups: 2, eps: F64Bits::new(1e-5), layout: Layout::Nchw },
            vec![(vec![2, 4, 5, 5], d), (vec![4], d), (vec![4], d)],
            &mut rng,
        );
        check(
            &format!("groupnorm channels last {d}"),
            Op::GroupNorm { groups: 2, eps: F64Bits::new(1e-5), layout: Layout::Nhwc },
            vec![(vec![2, 5, 5, 4], d), (vec![4], d), (vec![4], d)],
            &mut rng,
        );
    }
}

#[test]
fn c_gemms() {
    if !gpu_expected() {
        return;
    }
    let mut rng = Rng::new(2);
    for d in [DType::F32, DType::BF16] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (m, k, n) = (37, 77, 45);
            for (ba, bb) in [(vec![], vec![]), (vec![4], vec![4]), (vec![2, 3], vec![]), (vec![], vec![3])] {
                let mut a = ba.clone();
                a.extend(if ta { [k, m] } else { [m, k] });
                let mut b = bb.clone();
                b.extend(if tb { [n, k] } else { [k, n] });
                let what = format!("matmul ta={ta} tb={tb} batch {ba:?}x{bb:?} {d}");
                check(&what, Op::MatMul { trans_a: ta, trans_b: tb }, vec![(a, d), (b, d)], &mut rng);
            }
        }
    }
}

#[test]
fn d_convolutions() {
    if !gpu_expected() {
        return;
    }
    let mut rng = Rng::new(3);
    for d in [DType::F32, DType::BF16] {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            for (k, stride, pad, hw) in [(3, 1, 1, 16), (3, 2, 1, 16), (1, 1, 0, 9), (3, 1, 0, 12)] {
                let (n, c, o) = (2, 8, 16);
                let ho = (hw + 2 * pad - k) / stride + 1;
                let what = format!("conv k{k} s{stride} p{pad} {hw}x{hw} {layout:?} {d}");
                let x = (layout.shape([n, c, hw, hw]).0, d);
                let w = (layout.shape([o, c, k, k]).0, d);
                let dy = (layout.shape([n, o, ho, ho]).0, d);
                let fwd = Op::Conv2d { stride, padding: pad, layout };
                check(&what, fwd, vec![x.clone(), w.clone(), (vec![o], d)], &mut rng);
                let bi = Op::Conv2dBackwardInput { stride, padding: pad, h: hw, w: hw, layout };
                check(&format!("{what} backward input"), bi, vec![dy.clone(), w.clone()], &mut rng);
                let bw = Op::Conv2dBackwardWeight { stride, padding: pad, kh: k, kw: k, layout };
                check(&format!("{what} backward weight"), bw, vec![x, dy], &mut rng);
            }
        }
    }
}

type Step = nets::TrainingStep;

fn training_step(dtype: DType) -> Step {
    nets::training_step(&NetSpec { batch: 2, in_ch: 3, ch: 8, hw: 8, blocks: 2, checkpoint: false, dtype }, true)
}

#[test]
fn e_training_step() {
    if !gpu_expected() {
        return;
    }
    for dtype in [DType::F32, DType::BF16] {
        let s = training_step(dtype);
        let mut cpu = CpuBackend::new(2).compile(s.graph.clone()).unwrap();
        let mut gpu: GpuProgram<CudaDevice> = cuda(StepMode::CaptureAfterFirst).compile(s.graph.clone()).unwrap();
        let want = s.run_steps(&mut cpu, 1e-3, 3);
        let got = s.run_steps(&mut gpu, 1e-3, 3);
        let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
        for (t, ((gl, gp), (wl, wp))) in got.iter().zip(&want).enumerate() {
            let e = ((gl - wl) / wl.abs().max(1e-6)).abs();
            println!("{dtype} step {}: loss {gl} (cpu {wl}), relative error {e:.2e}", t + 1);
            assert!(e <= tol, "{dtype} step {}: loss {gl} vs cpu {wl}", t + 1);
            for (i, (a, b)) in gp.iter().zip(wp).enumerate() {
                let e = rel_err(a, b);
                assert!(e <= tol * 10.0, "{dtype} step {}: parameter {i}: relative error {e:.3e}", t + 1);
            }
        }
        // The same program eagerly: steps 2 and 3 above were a capture and a replay, so they must match bit for bit.
        let mut eager: GpuProgram<CudaDevice> = cuda(StepMode::Eager).compile(s.graph.clone()).unwrap();
        let e = s.run_steps(&mut eager, 1e-3, 3);
        for (t, (x, y)) in e.iter().zip(&got).enumerate() {
            assert_eq!(x.0.to_bits(), y.0.to_bits(), "{dtype} step {}: replayed loss differs from eager", t + 1);
            assert!(x.1 == y.1, "{dtype} step {}: replayed parameters differ from eager", t + 1);
        }
        println!("{dtype}: 3 steps match the CPU; capture + replay equal eager bit for bit");
    }
}

/// SD 1.5's attention shapes at 512x512 (8 heads; self-attention at the 64x64, 32x32 and 16x16 levels with head dims
/// 40, 80 and 160; cross-attention over 77 tokens), batch 8 and 32: (what, batch, heads, lq, lk, head dim). The list
/// is scripts/bench/sd15_attention_shapes.csv, which scripts/bench/torch_sdpa.py reads for PyTorch's rows.
fn sd15_attention() -> Vec<(String, usize, usize, usize, usize, usize)> {
    let csv = include_str!("../scripts/bench/sd15_attention_shapes.csv");
    let rows = csv.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#'));
    rows.map(|line| {
        let fields: Vec<&str> = line.split(',').collect();
        let n = |i: usize| fields[i].trim().parse::<usize>().unwrap_or_else(|e| panic!("{line}: field {i}: {e}"));
        assert_eq!(fields.len(), 6, "sd15_attention_shapes.csv: {line}");
        (fields[0].to_string(), n(1), n(2), n(3), n(4), n(5))
    })
    .collect()
}

/// Mean seconds of one launch of `g` on the GPU with flash attention, inputs random, after 3 untimed launches (the
/// first eager, the second captured; the timed ones replay the CUDA graph).
fn time_on_gpu(g: Graph, rng: &mut Rng) -> f64 {
    let mut p =
        cuda(StepMode::CaptureAfterFirst).with_flash_attention(true).compile(g).unwrap_or_else(|e| panic!("{e}"));
    for name in ["q", "k", "v", "dout"] {
        let Some(id) = p.graph().find(name) else { continue };
        let s = p.graph().shape(id).clone();
        let data: Vec<f64> = rng.vec(s.numel());
        p.upload(id, &HostTensor::from_f64(s, DType::BF16, &data).unwrap()).unwrap();
    }
    for _ in 0..3 {
        p.launch().unwrap();
    }
    p.synchronize().unwrap();
    let runs = 10;
    let start = std::time::Instant::now();
    for _ in 0..runs {
        p.launch().unwrap();
    }
    p.synchronize().unwrap();
    start.elapsed().as_secs_f64() / runs as f64
}

/// The flash kernels' throughput at SD 1.5's shapes in bf16, one line per shape, in the form
/// scripts/bench/torch_sdpa.py prints for PyTorch's flash backend on the same GPU. FLOPs by FlashAttention's
/// convention: forward 4·B·H·Lq·Lk·D (two products), backward 2.5 times that.
#[test]
fn f_flash_attention_throughput() {
    if !gpu_expected() {
        return;
    }
    let mut rng = Rng::new(18);
    for (what, b, h, lq, lk, d) in sd15_attention() {
        let scale = F64Bits::new(1.0 / (d as f64).sqrt());
        let build = |with_backward: bool| {
            let mut g = Graph::new();
            let q = g.input("q", [b, h, lq, d], DType::BF16);
            let k = g.input("k", [b, h, lk, d], DType::BF16);
            let v = g.input("v", [b, h, lk, d], DType::BF16);
            let o = g.add_node(Op::Attention { scale, causal: false, lse: false }, &[q, k, v]).unwrap();
            g.outputs.extend(o);
            if with_backward {
                let dout = g.input("dout", [b, h, lq, d], DType::BF16);
                let grads = g.add_node(Op::AttentionBackward { scale, causal: false, lse: false }, &[q, k, v, dout]);
                g.outputs.extend(grads.unwrap());
            }
            g
        };
        let fwd = time_on_gpu(build(false), &mut rng);
        let both = time_on_gpu(build(true), &mut rng);
        let flops = 4.0 * (b * h * lq * lk * d) as f64;
        println!(
            "attention {what}, batch {b}: forward {:.3} ms ({:.1} TFLOP/s), forward+backward {:.3} ms ({:.1} TFLOP/s)",
            fwd * 1e3,
            flops / fwd / 1e12,
            both * 1e3,
            3.5 * flops / both / 1e12
        );
    }
}

/// A world of one rank with a real NCCL id: what the rendezvous hands a GPU rank, without the rendezvous.
struct OneRank([u8; zeroconv::engine::dist::rendezvous::BLOB_LEN]);

impl zeroconv::engine::dist::communicator::Communicator for OneRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: zeroconv::engine::dist::communicator::ReduceBuf<'_>) -> zeroconv::Result<()> {
        Ok(()) // the sum over one rank
    }
    fn nccl_unique_id(&self) -> Option<[u8; zeroconv::engine::dist::rendezvous::BLOB_LEN]> {
        Some(self.0)
    }
}

/// NCCL through `CudaDevice` on the communication stream, as the data-parallel step uses it: the library loads, a
/// communicator initialises from an id made here, and an all-reduce (sum, then average) runs after a fork event and
/// before a join, eagerly and captured into a graph that is then replayed; the buffer keeps its values (the sum and
/// the mean over one rank), and the compute stream's download after the join sees them. Only on a GPU: the NCCL
/// calls, the second stream and the capture's fork and join are checked on the CPU only by the emulated device.
#[test]
fn g_nccl_one_rank() {
    use zeroconv::engine::device::{Device, EventId, Stream};
    if !gpu_expected() {
        return;
    }
    let nccl = zeroconv::engine::cuda::nccl::Nccl::load().unwrap_or_else(|e| panic!("NCCL: {e}"));
    let id = nccl.unique_id().unwrap_or_else(|e| panic!("ncclGetUniqueId: {e}"));
    let mut blob = [0u8; zeroconv::engine::dist::rendezvous::BLOB_LEN];
    blob[..id.len()].copy_from_slice(&id);
    let mut d = CudaDevice::open(0).unwrap_or_else(|e| panic!("GPU: {e}"));
    d.set_communicator(std::sync::Arc::new(OneRank(blob))).unwrap_or_else(|e| panic!("ncclCommInitRank: {e}"));
    let values: Vec<f32> = (0..1 << 20).map(|i| (i % 1000) as f32 * 0.25 - 100.0).collect();
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let buf = d.alloc(bytes.len() as u64, "nccl test buffer").expect("alloc");
    let (fork, join) = (EventId(0), EventId(1));
    let reduce = |d: &mut CudaDevice, average: bool| {
        d.record(Stream::Compute, fork).expect("record fork");
        d.wait(Stream::Comm, fork).expect("wait fork");
        d.all_reduce(Stream::Comm, buf, values.len() as u64, DType::F32, average).unwrap_or_else(|e| panic!("{e}"));
        d.record(Stream::Comm, join).expect("record join");
        d.wait(Stream::Compute, join).expect("wait join");
    };
    let check = |d: &mut CudaDevice, what: &str| {
        let mut back = vec![0u8; bytes.len()];
        d.download(&mut back, buf).expect("download");
        assert!(back == bytes, "{what}: the all-reduce over one rank changed the buffer");
    };
    d.upload(buf, &bytes).expect("upload");
    reduce(&mut d, false);
    check(&mut d, "eager sum");
    reduce(&mut d, true);
    check(&mut d, "eager average");
    d.begin_capture().expect("begin_capture");
    reduce(&mut d, false);
    let graph = d.end_capture().unwrap_or_else(|e| panic!("a capture with NCCL on the comm stream: {e}"));
    for _ in 0..3 {
        d.replay(graph).expect("replay");
    }
    d.synchronize().expect("synchronize");
    check(&mut d, "replayed sum");
    println!("NCCL: one-rank all-reduce of {} floats on the comm stream, eager and captured: ok", values.len());
}

/// The shape list the throughput rows read parses here too (the GPU test itself returns at once without a GPU):
/// SD 1.5's four attention shapes at batch 8 and 32.
#[test]
fn attention_shape_list_parses() {
    let shapes = sd15_attention();
    assert_eq!(shapes.len(), 8, "{shapes:?}");
    for batch in [8, 32] {
        let dims: Vec<_> = shapes.iter().filter(|s| s.1 == batch).map(|s| (s.3, s.4, s.5)).collect();
        assert_eq!(dims, [(4096, 4096, 40), (1024, 1024, 80), (256, 256, 160), (4096, 77, 40)], "batch {batch}");
    }
}
