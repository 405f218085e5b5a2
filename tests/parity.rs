//! Parity with an independent PyTorch implementation (diffusers / transformers) on tiny
//! configurations: see tests/fixtures/parity/README.md for how the fixtures were made.

use std::path::PathBuf;
use zeroconv::frontend::checkpoint::Checkpoint;
use zeroconv::frontend::forward;
use zeroconv::graph::DType;
use zeroconv::models::control_ldm::ControlLdmConfig;
use zeroconv::models::{ClipConfig, ControlNetConfig, UNetConfig};

fn fixture(name: &str) -> Checkpoint {
    let dir = std::env::var("ZEROCONV_PARITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity"));
    Checkpoint::open(&dir.join(name)).unwrap_or_else(|e| panic!("{e}"))
}

/// ‖got − want‖₂ / ‖want‖₂.
fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

fn sd15_tiny() -> UNetConfig {
    UNetConfig {
        model_channels: 32,
        channel_mult: vec![1, 2],
        num_res_blocks: vec![1, 1],
        attention_resolutions: vec![4, 2, 1],
        num_heads: 2,
        context_dim: 32,
        ..Default::default()
    }
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

fn check_control_ldm(name: &str, unet: UNetConfig) {
    let cfg = ControlLdmConfig {
        control: ControlNetConfig { unet: unet.clone(), hint_channels: 3 },
        unet,
        only_mid_control: false,
        sd_locked: true,
        strength: 1.0,
        guess_mode: false,
    };
    let weights = fixture(&format!("{name}.weights.safetensors"));
    let inputs = fixture(&format!("{name}.inputs.safetensors"));
    let expected = fixture(&format!("{name}.expected.safetensors"));
    let outs = forward::control_ldm(&cfg, &weights, &inputs, true, DType::F32).unwrap();
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
    check_control_ldm("sd15_tiny", sd15_tiny());
}

#[test]
fn sd2_like_controlnet_matches_pytorch() {
    check_control_ldm("sd2_tiny", sd2_tiny());
}

#[test]
fn clip_text_encoder_matches_transformers() {
    let cfg = ClipConfig {
        vocab_size: 100,
        max_position_embeddings: 16,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 4,
        layer_norm_eps: 1e-5,
    };
    let outs = forward::text(&cfg, &fixture("clip_tiny.weights.safetensors"), &fixture("clip_tiny.inputs.safetensors")).unwrap();
    let want = fixture("clip_tiny.expected.safetensors").tensor("hidden").unwrap().to_f64();
    let err = rel_l2(&outs[0].1.to_f64(), &want);
    assert!(err < 1e-4, "clip hidden: relative L2 error {err:.2e}");
}
