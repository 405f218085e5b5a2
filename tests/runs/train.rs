//! The optimizer update inside the compiled step, training end to end on the CPU backend, and
//! half-precision storage.

use crate::common;
use common::nets::{self, NetSpec};
use common::*;
use zeroconv::engine::cpu::CpuBackend;
use zeroconv::engine::{Backend, HostTensor, Program};
use zeroconv::graph::optim::{adamw_hyper, append_training_step, AdamWConfig, HYPER_INPUT};
use zeroconv::graph::passes::{self, PassOptions};
use zeroconv::graph::{DType, Graph};

#[test]
fn adamw_matches_the_pytorch_update_rule() {
    // loss = Σ p·c, so the gradient is c at every step.
    let c = [0.5, -2.0, 0.0, 3.0];
    let p0 = [1.0, -1.0, 0.25, 2.0];
    let mut g = Graph::new();
    let p = g.param("p", [4], DType::F64, true);
    let cv = g.input("c", [4], DType::F64);
    let prod = g.mul(p, cv).unwrap();
    let loss = g.sum(prod, &[0], false).unwrap();
    g.outputs.push(loss);
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let hyper = append_training_step(&mut g, loss, &cfg).unwrap();
    let mut prog = CpuBackend::new(2).compile(g).unwrap();
    prog.upload(p, &HostTensor::from_f64([4], DType::F64, &p0).unwrap()).unwrap();
    prog.upload(cv, &HostTensor::from_f64([4], DType::F64, &c).unwrap()).unwrap();
    let lr = 0.1;
    // The reference: torch.optim.AdamW's algorithm written out.
    let (mut pr, mut m, mut v) = (p0.to_vec(), [0.0; 4], [0.0; 4]);
    for t in 1..=3u64 {
        let h = adamw_hyper(&cfg, lr, t);
        prog.upload(hyper, &HostTensor::from_f64([3], DType::F32, &h).unwrap()).unwrap();
        prog.launch().unwrap();
        for i in 0..4 {
            pr[i] *= 1.0 - lr * cfg.weight_decay;
            m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * c[i];
            v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * c[i] * c[i];
            let bc1 = 1.0 - cfg.beta1.powi(t as i32);
            let bc2 = 1.0 - cfg.beta2.powi(t as i32);
            pr[i] -= lr / bc1 * m[i] / ((v[i] / bc2).sqrt() + cfg.eps);
        }
        let got = prog.download(p).unwrap().to_f64();
        // lr arrives through an f32 hyper buffer, so agreement is to f32 precision of lr.
        assert_close(&format!("adamw step {t}"), &got, &pr, 1e-7);
        let mv = prog.download(prog.graph().find("p.adam_m").unwrap()).unwrap().to_f64();
        assert_close(&format!("adamw m step {t}"), &mv, &m, 1e-12);
    }
}

#[test]
fn a_small_conv_attention_net_learns() {
    let s = NetSpec { batch: 4, in_ch: 3, ch: 8, hw: 6, blocks: 2, checkpoint: false, dtype: DType::F32 };
    let mut net = nets::build(&s);
    let init = nets::init_values(&net.g, &net.params, 1);
    net.g.outputs.push(net.loss);
    let cfg = AdamWConfig { weight_decay: 0.0, ..Default::default() };
    append_training_step(&mut net.g, net.loss, &cfg).unwrap();
    let opt = passes::optimize(&net.g, &PassOptions::default()).unwrap();
    let mut prog = CpuBackend::new(2).compile(opt.graph).unwrap();
    for (v, t) in &init {
        prog.upload(opt.map.get(*v).unwrap(), t).unwrap();
    }
    // The task: predict a fixed smooth function of the input (a blurred, scaled copy).
    let mut rng = Rng::new(4);
    let n = 4 * 3 * 36;
    let x = rng.vec(n);
    let target: Vec<f64> = (0..n).map(|i| 0.5 * x[i] + 0.25 * x[(i + 1) % n] - 0.1).collect();
    prog.upload_named("x", &HostTensor::from_f64([4, 3, 6, 6], DType::F32, &x).unwrap()).unwrap();
    prog.upload_named("target", &HostTensor::from_f64([4, 3, 6, 6], DType::F32, &target).unwrap()).unwrap();
    let loss_id = opt.map.get(net.loss).unwrap();
    let mut losses = Vec::new();
    for t in 1..=60 {
        prog.upload_named(HYPER_INPUT, &HostTensor::from_f64([3], DType::F32, &adamw_hyper(&cfg, 1e-2, t)).unwrap())
            .unwrap();
        prog.launch().unwrap();
        losses.push(prog.download(loss_id).unwrap().to_f64()[0]);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(last < 0.2 * first, "loss should fall by 5x in 60 steps: {first:.4} -> {last:.4} ({losses:?})");
}

#[test]
fn half_precision_storage_computes_in_f32() {
    // A bf16 / f16 conv + groupnorm + attention net against the same net in f32.
    let mut outs = Vec::new();
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let s = NetSpec { batch: 2, in_ch: 3, ch: 4, hw: 5, blocks: 1, checkpoint: false, dtype: dt };
        let mut net = nets::build(&s);
        let init = nets::init_values(&net.g, &net.params, 3);
        net.g.outputs.push(net.out);
        let mut prog = CpuBackend::new(2).compile(net.g).unwrap();
        for (v, t) in &init {
            prog.upload(*v, t).unwrap();
        }
        let mut rng = Rng::new(8);
        let x = rng.vec(2 * 3 * 25);
        prog.upload(net.x, &HostTensor::from_f64([2, 3, 5, 5], dt, &x).unwrap()).unwrap();
        prog.launch().unwrap();
        let out = prog.download(net.out).unwrap();
        assert_eq!(out.dtype, dt);
        outs.push(out.to_f64());
    }
    let e_bf16 = max_rel_err(&outs[1], &outs[0], 1e-6);
    let e_f16 = max_rel_err(&outs[2], &outs[0], 1e-6);
    assert!(e_bf16 < 2e-2, "bf16 vs f32: {e_bf16}");
    assert!(e_f16 < 5e-3, "f16 vs f32: {e_f16}");
    assert!(e_bf16 > 0.0 && e_f16 > 0.0, "half storage must actually round");
}
