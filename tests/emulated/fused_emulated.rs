//! Every fused kernel the shipped configs generate (kernels/fused_generated.cu) runs under the
//! CUDA emulation on the CPU and matches the CPU backend's fused-kernel interpreter on the same
//! inputs, with launches whose blocks and grids do not divide the data. A group anchored on a
//! convolution or a matrix product generates its epilogue alone (the library call computes the
//! product), so that pointwise kernel is what is checked for it.

use std::collections::BTreeSet;
use std::path::Path;
use zeroconv::app::step;
use zeroconv::engine::cpu::CpuBackend;
use zeroconv::engine::{Backend, HostTensor, Program};
use zeroconv::graph::fusion::{Anchor, FusedKernel};
use zeroconv::graph::{DType, Graph, Op, Shape};
use zeroconv::io::config::load_config;
use zeroconv::kernels::codegen::{self, InputKind};
use zeroconv::kernels::emulate::{self, DeviceBuffer, KernelArgs, LaunchConfig};

/// `ZcBcast` as the generated prelude declares it (an explicit pad keeps the layout padding-free).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ZcBcast {
    rank: i32,
    _pad: i32,
    dims: [i64; 8],
    strides: [i64; 8],
}

fn bcast(input: &Shape, out: &Shape) -> ZcBcast {
    let st = input.broadcast_strides(out);
    let mut b = ZcBcast { rank: out.rank() as i32, _pad: 0, dims: [1; 8], strides: [0; 8] };
    for (a, (&d, &s)) in out.dims().iter().zip(&st).enumerate() {
        b.dims[a] = d as i64;
        b.strides[a] = s as i64;
    }
    b
}

/// A deterministic value in [-2, 2) for element `i` of input `k`.
fn value(k: usize, i: usize) -> f64 {
    let mut z = (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^= z >> 31;
    z = z.wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
}

/// The CPU backend's result for the fused node alone.
fn reference(k: &FusedKernel, dtypes: &[DType], inputs: &[HostTensor]) -> Vec<HostTensor> {
    let mut g = Graph::new();
    let ins: Vec<usize> = k
        .input_shapes
        .iter()
        .zip(dtypes)
        .enumerate()
        .map(|(i, (s, &d))| g.input(&format!("in{i}"), s.clone(), d))
        .collect();
    let outs = g.add_node(Op::Fused(Box::new(k.clone())), &ins).unwrap();
    g.outputs = outs.clone();
    let mut p = CpuBackend::new(2).compile(g).unwrap();
    for (v, t) in ins.iter().zip(inputs) {
        p.upload(*v, t).unwrap();
    }
    p.launch().unwrap();
    outs.iter().map(|&o| p.download(o).unwrap()).collect()
}

#[test]
fn generated_fused_kernels_match_the_cpu_backend_under_emulation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(root.join("kernels/fused_generated.cu")).unwrap();
    let module = emulate::compile("fused_generated", &source).unwrap_or_else(|e| panic!("{e}"));
    let all: BTreeSet<String> = module.kernels().iter().map(|k| k.name.clone()).collect();
    let mut checked: BTreeSet<String> = BTreeSet::new();
    for cfg_path in zeroconv::app::cli::kernels::shipped_configs(root) {
        for precision in ["32", "bf16-mixed"] {
            let cfg =
                load_config(Some(&cfg_path), &[format!("trainer.precision={precision}"), "model.inductor=True".into()])
                    .unwrap();
            let st = step::latent_step(&cfg, 2).unwrap();
            let opt = step::optimize(&cfg, &st, false).unwrap();
            for (node, generated) in codegen::for_graph(&opt.graph).unwrap() {
                if !checked.insert(generated.function.clone()) {
                    continue;
                }
                let n = &opt.graph.nodes[node];
                let Op::Fused(full) = &n.op else { unreachable!() };
                let node_dtypes: Vec<DType> = n.inputs.iter().map(|&v| opt.graph.dtype(v)).collect();
                let (k, dtypes) = match full.split_epilogue() {
                    Some(split) => {
                        let mut d: Vec<DType> = split.inputs.iter().map(|&i| node_dtypes[i]).collect();
                        d.push(node_dtypes[0]);
                        (split.kernel, d)
                    }
                    None => ((**full).clone(), node_dtypes),
                };
                let k = &k;
                let inputs: Vec<HostTensor> = k
                    .input_shapes
                    .iter()
                    .zip(&dtypes)
                    .enumerate()
                    .map(|(i, (s, &d))| {
                        let data: Vec<f64> = (0..s.numel())
                            .map(|e| {
                                // Norm scales near 1, everything else spread out.
                                if k.anchor != Anchor::None && i == 1 {
                                    1.0 + 0.25 * value(i, e)
                                } else {
                                    value(i, e)
                                }
                            })
                            .collect();
                        HostTensor::from_f64(s.clone(), d, &data).unwrap()
                    })
                    .collect();
                let want = reference(k, &dtypes, &inputs);
                // Launch: the inputs, the outputs, n, the broadcast descriptors, the anchor's sizes.
                let bufs: Vec<DeviceBuffer> = inputs
                    .iter()
                    .enumerate()
                    .map(|(i, t)| DeviceBuffer::from_bytes(&format!("in{i}"), &t.bytes))
                    .collect();
                let outs: Vec<DeviceBuffer> = want
                    .iter()
                    .enumerate()
                    .map(|(o, t)| DeviceBuffer::uninit(&format!("out{o}"), t.bytes.len()))
                    .collect();
                let total = k.shape.numel();
                let mut args = KernelArgs::new();
                for b in bufs.iter().chain(&outs) {
                    args = args.buffer(b);
                }
                args = args.u64(total as u64);
                for (i, kind) in generated.inputs.iter().enumerate() {
                    if *kind == InputKind::Broadcast {
                        args = args.value(bcast(&k.input_shapes[i], &k.shape));
                    }
                }
                let cfg = match &k.anchor {
                    Anchor::None => LaunchConfig::new(3u32, 96u32),
                    Anchor::GroupNorm { groups, eps } => {
                        let d = k.shape.dims();
                        let (c, s) = (d[1], total / (d[0] * d[1]));
                        let unit = c / groups * s;
                        args = args.u64(unit as u64).u64(s as u64).u64(c as u64).f32(eps.get() as f32);
                        LaunchConfig::new((total / unit) as u32, 96u32)
                    }
                    Anchor::LayerNorm { eps } => {
                        let dd = *k.shape.dims().last().unwrap();
                        args = args.u64(dd as u64).u64(1).u64(dd as u64).f32(eps.get() as f32);
                        LaunchConfig::new((total / dd) as u32, 64u32)
                    }
                    Anchor::Conv2d { .. } | Anchor::Conv2dBackwardInput { .. } | Anchor::MatMul { .. } => {
                        unreachable!("product-anchored groups were split into their epilogue above")
                    }
                };
                // SAFETY: every buffer holds the elements of its tensor, as the kernel indexes them.
                unsafe { module.launch(&generated.function, &cfg, &args) }
                    .unwrap_or_else(|e| panic!("{}: {e}", generated.function));
                for (o, (buf, w)) in outs.iter().zip(&want).enumerate() {
                    let got = HostTensor { shape: w.shape.clone(), dtype: w.dtype, bytes: buf.to_bytes() }.to_f64();
                    let wv = w.to_f64();
                    let scale = wv.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
                    let tol = match w.dtype {
                        DType::F32 => 2e-5,
                        _ => 1.6e-2, // two bf16 ulps, for rounding of differently ordered f32 arithmetic
                    };
                    let err = got.iter().zip(&wv).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max) / scale;
                    assert!(
                        err <= tol && got.iter().all(|v| v.is_finite()),
                        "{} output {o} [{}]: max error {err:.2e} of {scale:.3} (tolerance {tol:.0e})",
                        generated.function,
                        k.ops.join(" ")
                    );
                }
            }
        }
    }
    assert_eq!(checked, all, "every kernel of fused_generated.cu is checked, and nothing else is generated");
}
