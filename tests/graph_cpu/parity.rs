//! Parity with an independent PyTorch implementation (diffusers / transformers) on tiny
//! configurations: see tests/fixtures/parity/README.md for how the fixtures were made.

use crate::common;

use std::path::PathBuf;
use zeroconv::app::device::DeviceChoice;
use zeroconv::app::parity;
use zeroconv::engine::HostTensor;
use zeroconv::graph::DType;
use zeroconv::io::checkpoint::{write_safetensors, Checkpoint};
use zeroconv::models::control_ldm::ControlLdmConfig;
use zeroconv::models::counts::{clip_params, controlnet_params, unet_params, vae_params};
use zeroconv::models::{ParamSpec, UNetConfig, VaeConfig};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn fixture(name: &str) -> Checkpoint {
    Checkpoint::open(&dir().join(name)).unwrap_or_else(|e| panic!("{e}"))
}

/// The fixture's weight generator, in f64 (the values are f32).
fn generated(key: &str, shape: &[usize]) -> Vec<f64> {
    common::parity_weights(key, shape).into_iter().map(f64::from).collect()
}

/// Checks that the model's parameters are exactly the fixture's key list (names and shapes, in
/// order), then writes the generated weights to a temporary safetensors file and opens it.
fn weights(name: &str, specs: &[ParamSpec]) -> Checkpoint {
    let text = std::fs::read_to_string(dir().join(format!("{name}.keys.json"))).unwrap();
    let list: Vec<(String, Vec<usize>)> = serde_json::from_str(&text).unwrap();
    let ours: Vec<(String, Vec<usize>)> = specs.iter().map(|p| (p.key.clone(), p.shape.dims().to_vec())).collect();
    assert_eq!(ours, list, "{name}: the model's parameters differ from the fixture's key list");
    let tensors: Vec<(String, HostTensor)> = list
        .iter()
        .map(|(k, s)| (k.clone(), HostTensor::from_f64(s.clone(), DType::F32, &generated(k, s)).unwrap()))
        .collect();
    // A uniquely named file per call: the tests of this binary run at the same time.
    let dir = tempfile::Builder::new().prefix(&format!("zeroconv-parity-{name}-")).tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    write_safetensors(&path, &tensors, None).unwrap();
    Checkpoint::open(&path).unwrap() // the mapping stays valid after the folder is removed
}

#[test]
fn weight_generator_matches_the_fixture_contract() {
    let w = generated("model.diffusion_model.input_blocks.0.0.weight", &[32, 4, 3, 3]);
    assert_eq!(
        &w[..3].iter().map(|&v| (v as f32).to_bits()).collect::<Vec<_>>(),
        &[0x3d5e1f07, 0xbe2632b8, 0x3d10193d]
    );
    let b = generated("model.diffusion_model.input_blocks.0.0.bias", &[32]);
    assert_eq!(
        &b[..3].iter().map(|&v| (v as f32).to_bits()).collect::<Vec<_>>(),
        &[0x3dad0d05, 0x3cba2c80, 0x3d8a227d]
    );
    let g = generated("model.diffusion_model.out.0.weight", &[32]);
    assert_eq!(
        &g[..3].iter().map(|&v| (v as f32).to_bits()).collect::<Vec<_>>(),
        &[0x3f6ecc20, 0x3f84fd9f, 0x3f7ef750]
    );
}

/// ‖got − want‖₂ / ‖want‖₂.
fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

fn sd15_tiny() -> UNetConfig {
    common::parity_sd15_tiny_unet()
}

fn sd2_tiny() -> UNetConfig {
    UNetConfig {
        model_channels: 32,
        channel_mult: vec![1, 2, 2],
        num_res_blocks: vec![2, 2, 2],
        attention_resolutions: vec![4, 2],
        num_heads: -1,
        num_head_channels: 16,
        use_linear_in_transformer: true,
        context_dim: 24,
        ..Default::default()
    }
}

/// The ControlNet + locked U-Net of fixture `name` and its generated weights.
fn control_ldm_fixture(name: &str, unet: UNetConfig) -> (ControlLdmConfig, Checkpoint) {
    let cfg = ControlLdmConfig::locked(unet);
    let mut specs = unet_params(&cfg.unet).unwrap();
    specs.extend(controlnet_params(&cfg.control).unwrap());
    let w = weights(name, &specs);
    (cfg, w)
}

fn check_control_ldm(name: &str, unet: UNetConfig, device: DeviceChoice) {
    let (cfg, weights) = control_ldm_fixture(name, unet);
    let inputs = fixture(&format!("{name}.inputs.safetensors"));
    let expected = fixture(&format!("{name}.expected.safetensors"));
    let outs = parity::control_ldm(device, &cfg, &weights, &inputs, true, DType::F32).unwrap();
    let mut grads_checked = 0;
    let max_grad_norm = outs
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .map(|(_, t)| t.to_f64().iter().map(|v| v * v).sum::<f64>().sqrt())
        .fold(0.0, f64::max);
    for (key, got) in &outs {
        let want = expected.tensor(key).unwrap_or_else(|e| panic!("{e}")).to_f64();
        let got = got.to_f64();
        if key.starts_with("grad.") {
            // A few gradients are exactly zero in theory (GroupNorm with one channel per group
            // removes per-channel constants) and float noise in the fixture: compare those
            // against the scale of the largest gradient instead of their own.
            let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt();
            let err = if norm < 1e-6 * max_grad_norm {
                got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt() / max_grad_norm
            } else {
                rel_l2(&got, &want)
            };
            assert!(err < 1e-3, "{name} {key}: relative L2 error {err:.2e}");
            grads_checked += 1;
        } else {
            let err = rel_l2(&got, &want);
            assert!(err < 1e-4, "{name} {key}: relative L2 error {err:.2e}");
        }
    }
    let expected_grads = expected.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(grads_checked, expected_grads, "every ControlNet gradient is compared");
    assert!(expected.keys().filter(|k| !k.starts_with("grad.")).all(|k| outs.iter().any(|(n, _)| n == k)));
}

#[test]
fn sd15_like_controlnet_matches_pytorch() {
    check_control_ldm("sd15_tiny", sd15_tiny(), DeviceChoice::Cpu);
}

/// The CUDA executor (on the emulated device) against the same PyTorch reference, to the same tolerances.
#[test]
fn sd15_like_controlnet_matches_pytorch_on_the_emulated_cuda_device() {
    check_control_ldm("sd15_tiny", sd15_tiny(), DeviceChoice::CudaEmu);
}

#[test]
fn sd2_like_controlnet_matches_pytorch() {
    check_control_ldm("sd2_tiny", sd2_tiny(), DeviceChoice::Cpu);
}

#[test]
fn sd2_like_controlnet_matches_pytorch_on_the_emulated_cuda_device() {
    check_control_ldm("sd2_tiny", sd2_tiny(), DeviceChoice::CudaEmu);
}

#[test]
fn clip_text_encoder_matches_transformers() {
    let cfg = common::parity_clip_tiny();
    let w = weights("clip_tiny", &clip_params(&cfg).unwrap());
    let outs = parity::text(DeviceChoice::Cpu, &cfg, &w, &fixture("clip_tiny.inputs.safetensors")).unwrap();
    let want = fixture("clip_tiny.expected.safetensors").tensor("hidden").unwrap().to_f64();
    let err = rel_l2(&outs[0].1.to_f64(), &want);
    assert!(err < 1e-4, "clip hidden: relative L2 error {err:.2e}");
}

#[test]
fn vae_matches_diffusers() {
    let cfg = VaeConfig {
        ch: 32,
        ch_mult: vec![1, 2],
        num_res_blocks: 1,
        resolution: 32,
        attn_resolutions: vec![],
        ..Default::default()
    };
    let w = weights("vae_tiny", &vae_params(&cfg).unwrap());
    let outs = parity::vae_parts(DeviceChoice::Cpu, &cfg, &w, &fixture("vae_tiny.inputs.safetensors")).unwrap();
    let expected = fixture("vae_tiny.expected.safetensors");
    assert_eq!(outs.len(), 3);
    for (name, got) in &outs {
        let want = expected.tensor(name).unwrap().to_f64();
        let err = rel_l2(&got.to_f64(), &want);
        assert!(err < 1e-4, "vae {name}: relative L2 error {err:.2e}");
    }
}

/// The encoder alone (or the decoder alone) reads the whole VAE's file: the other half's keys are the component's,
/// not unexpected.
#[test]
fn one_half_of_the_vae_accepts_the_whole_vae_file() {
    let cfg = VaeConfig {
        ch: 32,
        ch_mult: vec![1, 2],
        num_res_blocks: 1,
        resolution: 32,
        attn_resolutions: vec![],
        ..Default::default()
    };
    let w = weights("vae_tiny", &vae_params(&cfg).unwrap());
    let inputs = fixture("vae_tiny.inputs.safetensors");
    let expected = fixture("vae_tiny.expected.safetensors");
    let dir = tempfile::Builder::new().prefix("zeroconv-vae-half-").tempdir().unwrap();
    for (input, outputs) in [("image", &["mean", "logvar"][..]), ("z", &["decoded"][..])] {
        let path = dir.path().join(format!("{input}.safetensors"));
        write_safetensors(&path, &[(input.to_string(), inputs.to_host(input).unwrap())], None).unwrap();
        let only = Checkpoint::open(&path).unwrap();
        let outs = parity::vae_parts(DeviceChoice::Cpu, &cfg, &w, &only).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(outs.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), outputs);
        for (name, got) in &outs {
            let err = rel_l2(&got.to_f64(), &expected.tensor(name).unwrap().to_f64());
            assert!(err < 1e-4, "vae {name} from {input} alone: relative L2 error {err:.2e}");
        }
    }
}

/// bf16 compute (fp32 parameters, bf16 activations, f32 accumulation and norm statistics) stays
/// within 2e-2 relative error of the fp32 PyTorch reference, as DESIGN.md's numerics ask.
#[test]
fn bf16_forward_is_within_two_percent_of_the_fp32_reference() {
    let (cfg, weights) = control_ldm_fixture("sd15_tiny", sd15_tiny());
    let inputs = fixture("sd15_tiny.inputs.safetensors");
    let expected = fixture("sd15_tiny.expected.safetensors");
    let outs = parity::control_ldm(DeviceChoice::Cpu, &cfg, &weights, &inputs, false, DType::BF16).unwrap();
    let eps = &outs.iter().find(|(k, _)| k == "eps").unwrap().1;
    assert_eq!(eps.dtype, DType::F32, "eps is returned in fp32");
    let err = rel_l2(&eps.to_f64(), &expected.tensor("eps").unwrap().to_f64());
    assert!(err < 2e-2 && err > 1e-5, "bf16 eps: relative L2 error {err:.2e} (it must round, and stay within 2e-2)");
}

/// Issue 18's check: the ControlNet + U-Net with `use_flash_attention` on the CUDA executor (emulated) in bf16, its
/// eps and every ControlNet gradient against the fp32 PyTorch reference. The fixtures' attention has head dims 16
/// and 32, both built as flash kernels; that the flash path really ran shows in its outputs, which are not the bits
/// of the composite path (GEMMs around a softmax kernel) on the same device and precision.
///
/// Tolerances: eps within DESIGN.md's bf16 bound (2e-2 relative), and all ControlNet gradients together (one vector)
/// within 5e-2. Single small gradients of this tiny model are further off in bf16 on either path (the composite
/// path's worst is 6e-2 for sd15_tiny and 1.2e-1 for sd2_tiny: every activation and its gradient is rounded to bf16),
/// so per key the flash path must be as good as the composite one: its worst error at most 1.5 times the
/// composite's (flash rounds the probabilities to bf16 once more before P·V and the gradient products, as
/// FlashAttention-2 and PyTorch's flash backend do).
#[test]
fn bf16_with_flash_attention_on_the_emulated_cuda_device_meets_the_bf16_tolerance() {
    for (name, unet) in [("sd15_tiny", sd15_tiny()), ("sd2_tiny", sd2_tiny())] {
        let (mut cfg, weights) = control_ldm_fixture(name, unet);
        let inputs = fixture(&format!("{name}.inputs.safetensors"));
        let expected = fixture(&format!("{name}.expected.safetensors"));
        let composite = parity::control_ldm(DeviceChoice::CudaEmu, &cfg, &weights, &inputs, true, DType::BF16).unwrap();
        cfg.unet.use_flash_attention = true;
        cfg.control.unet.use_flash_attention = true;
        let flash = parity::control_ldm(DeviceChoice::CudaEmu, &cfg, &weights, &inputs, true, DType::BF16).unwrap();
        let grads = |outs: &[(String, HostTensor)]| -> Vec<(Vec<f64>, Vec<f64>)> {
            outs.iter()
                .filter(|(k, _)| k.starts_with("grad."))
                .map(|(k, t)| (t.to_f64(), expected.tensor(k).unwrap_or_else(|e| panic!("{e}")).to_f64()))
                .collect()
        };
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let grad_errors = |outs: &[(String, HostTensor)]| -> Vec<f64> {
            let grads = grads(outs);
            let largest = grads.iter().map(|(_, want)| norm(want)).fold(0.0, f64::max);
            // As in check_control_ldm: gradients that are zero in theory are measured against the largest.
            grads
                .iter()
                .map(|(got, want)| {
                    let diff = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
                    diff / if norm(want) < 1e-6 * largest { largest } else { norm(want) }
                })
                .collect()
        };
        let (all_got, all_want): (Vec<f64>, Vec<f64>) =
            grads(&flash).into_iter().flat_map(|(got, want)| got.into_iter().zip(want)).unzip();
        let all = rel_l2(&all_got, &all_want);
        let eps = |outs: &[(String, HostTensor)]| outs.iter().find(|(k, _)| k == "eps").unwrap().1.to_f64();
        let err = rel_l2(&eps(&flash), &expected.tensor("eps").unwrap().to_f64());
        assert!(err < 2e-2, "{name} eps with flash: relative L2 error {err:.2e}");
        assert_ne!(eps(&flash), eps(&composite), "{name}: eps is bit for bit the composite path's: flash did not run");
        let (flash_errs, composite_errs) = (grad_errors(&flash), grad_errors(&composite));
        assert!(!flash_errs.is_empty() && flash_errs.len() == composite_errs.len(), "{name}: gradients compared");
        let worst = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let (worst_flash, worst_composite) = (worst(&flash_errs), worst(&composite_errs));
        eprintln!(
            "{name}: eps {err:.2e}; {} gradients: together {all:.2e}, worst relative L2 error {worst_flash:.2e} with \
             flash, {worst_composite:.2e} composite (bf16, cuda-emu)",
            flash_errs.len()
        );
        assert!(
            all < 5e-2 && worst_flash < 1.5 * worst_composite,
            "{name}: ControlNet gradients with flash: together {all:.2e}, worst {worst_flash:.2e} (composite {worst_composite:.2e})"
        );
    }
}
