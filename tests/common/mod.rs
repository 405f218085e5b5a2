//! Shared test machinery: a deterministic RNG, graph running helpers, and the f64 gradient check.
#![allow(dead_code)]

pub mod cli;
pub mod emulated;
pub mod layout_fixtures;
pub mod mma_probe;
pub mod nets;
pub mod reference;
pub mod training;

use zeroconv::engine::cpu::CpuBackend;
use zeroconv::engine::{Backend, HostTensor, Program};
use zeroconv::graph::autodiff::backward;
use zeroconv::graph::{DType, Graph, Shape, ValueId};

/// A small, deterministic generator (SplitMix64), so tests need no RNG crate and never flake.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.uniform()).collect()
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A tensor for references: shape and row-major f64 data.
#[derive(Clone, Debug)]
pub struct T64 {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}
impl T64 {
    pub fn new(shape: &[usize], data: Vec<f64>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        T64 { shape: shape.to_vec(), data }
    }
    pub fn zeros(shape: &[usize]) -> Self {
        T64::new(shape, vec![0.0; shape.iter().product()])
    }
}

/// Compiles `g` on the CPU backend, uploads `inputs` by value id, runs one step, downloads `outs`.
pub fn run(g: Graph, inputs: &[(ValueId, HostTensor)], outs: &[ValueId]) -> Vec<HostTensor> {
    let mut p = CpuBackend::new(2).compile(g).expect("compile");
    for (v, t) in inputs {
        p.upload(*v, t).expect("upload");
    }
    p.launch().expect("launch");
    p.synchronize().expect("sync");
    outs.iter().map(|&o| p.download(o).expect("download")).collect()
}

/// Largest |a-b| / (|b|_inf + floor) over all elements.
pub fn max_rel_err(a: &[f64], b: &[f64], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(floor);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = max_rel_err(got, want, 1e-12);
    assert!(
        e <= tol,
        "{what}: relative error {e:.3e} > {tol:.1e}\n got[..4]={:?}\nwant[..4]={:?}",
        &got[..got.len().min(4)],
        &want[..want.len().min(4)]
    );
    assert!(got.iter().all(|x| x.is_finite()), "{what}: non-finite output");
}

/// What a graph input is.
#[derive(Clone, Debug)]
pub enum Arg {
    /// A float tensor, differentiated in gradient checks.
    Float(Vec<usize>),
    /// A float tensor that is not differentiated (e.g. where the op is not smooth).
    Fixed(Vec<usize>),
    /// Integer ids below `vocab`.
    Ids(Vec<usize>, usize),
}

impl Arg {
    pub fn shape(&self) -> &[usize] {
        match self {
            Arg::Float(s) | Arg::Fixed(s) | Arg::Ids(s, _) => s,
        }
    }
}

pub fn random_args(args: &[Arg], rng: &mut Rng) -> Vec<T64> {
    args.iter()
        .map(|a| match a {
            Arg::Float(s) | Arg::Fixed(s) => T64::new(s, rng.vec(s.iter().product())),
            Arg::Ids(s, v) => T64::new(s, (0..s.iter().product()).map(|_| rng.below(*v as u64) as f64).collect()),
        })
        .collect()
}

type Build<'a> = dyn Fn(&mut Graph, &[ValueId]) -> zeroconv::Result<ValueId> + 'a;

/// Declares the args as graph sources of `dtype` (ids as i64).
fn declare(g: &mut Graph, args: &[Arg], dtype: DType) -> Vec<ValueId> {
    args.iter()
        .enumerate()
        .map(|(i, a)| match a {
            Arg::Float(s) => g.param(&format!("arg{i}"), Shape::new(s), dtype, true),
            Arg::Fixed(s) => g.param(&format!("arg{i}"), Shape::new(s), dtype, false),
            Arg::Ids(s, _) => g.input(&format!("arg{i}"), Shape::new(s), DType::I64),
        })
        .collect()
}

fn upload_args(ids: &[ValueId], args: &[Arg], vals: &[T64], dtype: DType) -> Vec<(ValueId, HostTensor)> {
    ids.iter()
        .zip(args.iter().zip(vals))
        .map(|(&v, (a, t))| {
            let dt = if matches!(a, Arg::Ids(..)) { DType::I64 } else { dtype };
            (v, HostTensor::from_f64(Shape::new(&t.shape), dt, &t.data).unwrap())
        })
        .collect()
}

/// Runs the op built by `build` on `vals` in `dtype`; returns the output as f64.
pub fn forward(build: &Build<'_>, args: &[Arg], vals: &[T64], dtype: DType) -> T64 {
    let mut g = Graph::new();
    let ids = declare(&mut g, args, dtype);
    let y = build(&mut g, &ids).expect("build");
    g.outputs.push(y);
    let shape = g.shape(y).dims().to_vec();
    let out = run(g, &upload_args(&ids, args, vals, dtype), &[y]);
    T64::new(&shape, out[0].to_f64())
}

/// Checks the op's autodiff gradients against central finite differences, in f64.
/// The scalar is L = Σ y ⊙ R for a fixed random R, so every output element matters.
pub fn grad_check(name: &str, build: &Build<'_>, args: &[Arg], vals: &[T64], tol: f64) {
    let mut rng = Rng::new(0xC0FFEE);
    // Analytic gradients.
    let mut g = Graph::new();
    let ids = declare(&mut g, args, DType::F64);
    let y = build(&mut g, &ids).expect("build");
    let yshape = g.shape(y).clone();
    let r = g.param("weights_r", yshape.clone(), DType::F64, false);
    let rv = rng.vec(yshape.numel());
    let prod = g.mul(y, r).unwrap();
    let axes: Vec<usize> = (0..yshape.rank()).collect();
    let loss = if axes.is_empty() { prod } else { g.sum(prod, &axes, false).unwrap() };
    let wrt: Vec<ValueId> = ids.iter().zip(args).filter(|(_, a)| matches!(a, Arg::Float(_))).map(|(&v, _)| v).collect();
    let grads = backward(&mut g, loss, &wrt).expect("backward");
    g.outputs.push(loss);
    let gids: Vec<ValueId> = wrt.iter().map(|w| grads[w]).collect();
    g.outputs.extend(&gids);
    let mut uploads = upload_args(&ids, args, vals, DType::F64);
    uploads.push((r, HostTensor::from_f64(yshape.clone(), DType::F64, &rv).unwrap()));
    let analytic = run(g, &uploads, &gids);

    // Numerical gradients through a forward-only program, re-uploading perturbed inputs.
    let mut g = Graph::new();
    let ids = declare(&mut g, args, DType::F64);
    let y = build(&mut g, &ids).expect("build");
    let r = g.param("weights_r", yshape.clone(), DType::F64, false);
    let prod = g.mul(y, r).unwrap();
    let loss = if axes.is_empty() { prod } else { g.sum(prod, &axes, false).unwrap() };
    g.outputs.push(loss);
    let mut p = CpuBackend::new(2).compile(g).expect("compile");
    for (v, t) in upload_args(&ids, args, vals, DType::F64) {
        p.upload(v, &t).unwrap();
    }
    p.upload(r, &HostTensor::from_f64(yshape, DType::F64, &rv).unwrap()).unwrap();
    let eval = |p: &mut zeroconv::engine::cpu::CpuProgram| {
        p.launch().unwrap();
        p.download(loss).unwrap().to_f64()[0]
    };
    let mut k = 0;
    for (i, a) in args.iter().enumerate() {
        if !matches!(a, Arg::Float(_)) {
            continue;
        }
        let an = analytic[k].to_f64();
        k += 1;
        let n = vals[i].data.len();
        // Every element for small tensors; a spread sample for large ones.
        let picks: Vec<usize> = if n <= 64 { (0..n).collect() } else { (0..48).map(|j| j * n / 48).collect() };
        let h = 1e-6;
        let mut num = Vec::new();
        let mut ana = Vec::new();
        for &e in &picks {
            let mut plus = vals[i].clone();
            plus.data[e] += h;
            p.upload(ids[i], &HostTensor::from_f64(Shape::new(&plus.shape), DType::F64, &plus.data).unwrap()).unwrap();
            let lp = eval(&mut p);
            let mut minus = vals[i].clone();
            minus.data[e] -= h;
            p.upload(ids[i], &HostTensor::from_f64(Shape::new(&minus.shape), DType::F64, &minus.data).unwrap())
                .unwrap();
            let lm = eval(&mut p);
            num.push((lp - lm) / (2.0 * h));
            ana.push(an[e]);
        }
        p.upload(ids[i], &HostTensor::from_f64(Shape::new(&vals[i].shape), DType::F64, &vals[i].data).unwrap())
            .unwrap();
        let e = max_rel_err(&ana, &num, 1e-3);
        assert!(
            e <= tol,
            "{name}: gradient of arg{i} off by {e:.3e} (> {tol:.0e})\n analytic={:?}\n numeric ={:?}",
            &ana[..ana.len().min(6)],
            &num[..num.len().min(6)]
        );
    }
}

/// The parity fixtures' weight generator (tests/fixtures/parity/README.md, "The weight generator"): FNV-1a of the
/// key seeds a SplitMix64 stream, one draw per element, scaled by the key's kind; f32 values, as the fixtures hold.
pub fn parity_weights(key: &str, shape: &[usize]) -> Vec<f32> {
    let mut state = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    let mut draw = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let n: usize = shape.iter().product();
    let fan_in: usize = shape[1..].iter().product();
    (0..n)
        .map(|_| {
            let s = 2.0 * ((draw() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)) - 1.0;
            let v = if key.ends_with(".bias") {
                0.1 * s
            } else if shape.len() == 1 {
                1.0 + 0.1 * s
            } else {
                s / (fan_in as f64).sqrt()
            };
            v as f32
        })
        .collect()
}

/// The U-Net of the `sd15_tiny` parity fixture (tests/fixtures/parity): the configuration its keys and reference
/// outputs were made with. The fixture's LDM config lists SD 1.5's attention resolutions [4, 2, 1], of which this
/// two-level model has 2 and 1 (LDM ignores the 4; zeroconv refuses a resolution that matches no level).
pub fn parity_sd15_tiny_unet() -> zeroconv::models::UNetConfig {
    zeroconv::models::UNetConfig {
        model_channels: 32,
        channel_mult: vec![1, 2],
        num_res_blocks: vec![1, 1],
        attention_resolutions: vec![2, 1],
        num_heads: 2,
        context_dim: 32,
        ..Default::default()
    }
}

/// The text encoder of the `clip_tiny` parity fixture (tests/fixtures/parity): a 2-layer, 32-wide CLIP over 100
/// tokens, quick-GELU, the last layer's output through the final norm.
pub fn parity_clip_tiny() -> zeroconv::models::ClipConfig {
    zeroconv::models::ClipConfig {
        vocab_size: 100,
        max_position_embeddings: 16,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 4,
        layer_norm_eps: 1e-5,
        activation: zeroconv::models::ClipActivation::QuickGelu,
        output: zeroconv::models::ClipOutput::Last,
    }
}
