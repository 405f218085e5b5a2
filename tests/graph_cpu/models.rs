//! Model structure: parameter counts of the SD 1.5 components equal the original PyTorch
//! modules' (counted with `sum(p.numel())` on lllyasviel/ControlNet's cldm_v15.yaml models).

use zeroconv::models::counts::{clip_params, controlnet_params, total, unet_params, vae_params};
use zeroconv::models::{ClipConfig, ControlNetConfig, UNetConfig, VaeConfig};

#[test]
fn sd15_parameter_counts_match_the_original_modules() {
    assert_eq!(total(&unet_params(&UNetConfig::default()).unwrap()), 859_520_964, "U-Net");
    assert_eq!(total(&controlnet_params(&ControlNetConfig::default()).unwrap()), 361_279_120, "ControlNet");
    assert_eq!(total(&vae_params(&VaeConfig::default()).unwrap()), 83_653_863, "VAE");
    assert_eq!(total(&clip_params(&ClipConfig::default()).unwrap()), 123_060_480, "CLIP text encoder");
}

#[test]
fn sd15_keys_follow_the_original_names() {
    let unet = unet_params(&UNetConfig::default()).unwrap();
    let keys: Vec<&str> = unet.iter().map(|p| p.key.as_str()).collect();
    for k in [
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "model.diffusion_model.out.2.bias",
    ] {
        assert!(keys.contains(&k), "missing {k}");
    }
    let cn = controlnet_params(&ControlNetConfig::default()).unwrap();
    let zero_convs = cn.iter().filter(|p| p.key.contains("zero_convs") && p.key.ends_with("weight")).count();
    assert_eq!(zero_convs, 12, "12 zero convs after the input blocks, plus middle_block_out");
    assert!(cn.iter().any(|p| p.key == "control_model.input_hint_block.14.weight"));
    assert!(cn.iter().any(|p| p.key == "control_model.middle_block_out.0.weight"));
    // Every key is unique.
    let mut all: Vec<&str> = cn.iter().chain(&unet).map(|p| p.key.as_str()).collect();
    all.sort();
    let n = all.len();
    all.dedup();
    assert_eq!(n, all.len(), "duplicate keys");
}
