//! The diffusers and Hugging Face layouts load into the LDM key names, against files written by diffusers' and
//! transformers' own `save_pretrained` (tests/fixtures/layouts/README.md): every tensor, renamed, is bitwise the
//! generated LDM tensor diffusers' conversion put there, and the models give the same outputs as on LDM-layout
//! weights.

use crate::common;

use common::layout_fixtures::{copy_folder, fixtures, generated, ldm_keys, pipeline_folder, rebuild, write_ldm_file};
use std::collections::BTreeMap;
use std::path::Path;
use zeroconv::app::device::DeviceChoice;
use zeroconv::app::parity;
use zeroconv::engine::HostTensor;
use zeroconv::graph::DType;
use zeroconv::io::checkpoint::diffusers_export::write_controlnet_diffusers;
use zeroconv::io::checkpoint::{Architecture, Checkpoint, Layout};
use zeroconv::models::control_ldm::ControlLdmConfig;
use zeroconv::models::{ControlNetConfig, UNetConfig, VaeConfig};

fn sd15_tiny() -> UNetConfig {
    common::parity_sd15_tiny_unet()
}

fn vae_tiny() -> VaeConfig {
    VaeConfig { ch: 32, ch_mult: vec![1, 2], num_res_blocks: 1, resolution: 32, ..Default::default() }
}

fn arch() -> Architecture {
    Architecture {
        unet: Some(sd15_tiny()),
        control: Some(ControlNetConfig { unet: sd15_tiny(), hint_channels: 3 }),
        vae: Some(vae_tiny()),
        megatron_clip: None,
    }
}

fn tmp(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("zeroconv-layouts-{name}-")).tempdir().unwrap()
}

/// Every LDM key of `parity` under `prefix` is in `ckpt` with its shape and, bit for bit, its generated values;
/// returns how many.
fn assert_generated(ckpt: &Checkpoint, parity: &str, prefix: &str) -> usize {
    let mut n = 0;
    for (key, shape) in ldm_keys(parity).iter().filter(|(k, _)| k.starts_with(prefix)) {
        let t = ckpt.tensor(key).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.shape, *shape, "{key}");
        let got: Vec<u32> = t.to_f32().iter().map(|v| v.to_bits()).collect();
        let want: Vec<u32> = generated(key, shape).iter().map(|v| v.to_bits()).collect();
        assert!(got == want, "{key}: the values are not the generated tensor of that key (a wrong mapping?)");
        n += 1;
    }
    assert!(n > 0, "no {prefix} keys in {parity}");
    n
}

#[test]
fn diffusers_component_folders_load_bitwise_under_ldm_names() {
    let dir = tmp("components");
    for (component, parity, prefix, layout) in [
        ("sd15_tiny/unet", "sd15_tiny", "model.diffusion_model.", Layout::DiffusersUnet),
        ("sd15_tiny/controlnet", "sd15_tiny", "control_model.", Layout::DiffusersControlNet),
        ("vae_tiny/vae", "vae_tiny", "first_stage_model.", Layout::DiffusersVae),
    ] {
        let folder = rebuild(component, dir.path());
        // The folder, and the weight file alone.
        for path in [folder.clone(), folder.join("diffusion_pytorch_model.safetensors")] {
            let ckpt = Checkpoint::open_pretrained(&path, &arch()).unwrap_or_else(|e| panic!("{component}: {e}"));
            assert_eq!(ckpt.layouts().map(|(_, l)| l).collect::<Vec<_>>(), [layout], "{component}");
            assert!(ckpt.unmapped().is_empty(), "{component}: unmapped {:?}", ckpt.unmapped());
            let n = assert_generated(&ckpt, parity, prefix);
            assert_eq!(ckpt.len(), n, "{component}: every tensor of the file is one of the model's");
        }
    }
}

#[test]
fn hf_clip_text_models_load_with_and_without_text_model_prefix() {
    let dir = tmp("clip");
    for (from, file) in [
        ("clip_tiny/text_encoder", "model.safetensors"),
        ("clip_tiny/text_encoder_v4", "model.safetensors"),
        ("clip_tiny/text_encoder_bin", "pytorch_model.bin"),
    ] {
        let folder = copy_folder(from, dir.path(), from.rsplit('/').next().unwrap());
        let raw = Checkpoint::open(&folder.join(file)).unwrap();
        let prefixed = raw.keys().all(|k| k.starts_with("text_model."));
        assert_eq!(prefixed, from != "clip_tiny/text_encoder", "{from}: the fixture has the layout it claims");
        for path in [folder.clone(), folder.join(file)] {
            let ckpt = Checkpoint::open_pretrained(&path, &Architecture::default()).unwrap();
            assert_eq!(ckpt.layouts().map(|(_, l)| l).collect::<Vec<_>>(), [Layout::HfClip]);
            assert!(ckpt.unmapped().is_empty(), "{from}: unmapped {:?}", ckpt.unmapped());
            let n = assert_generated(&ckpt, "clip_tiny", "cond_stage_model.transformer.text_model.");
            assert_eq!(ckpt.len(), n, "{from}");
        }
    }
}

fn bits(outs: &[(String, HostTensor)]) -> Vec<(String, Vec<u64>)> {
    outs.iter().map(|(k, t)| (k.clone(), t.to_f64().iter().map(|v| v.to_bits()).collect())).collect()
}

#[test]
fn a_diffusers_pipeline_folder_gives_the_same_outputs_as_ldm_weights() {
    let dir = tmp("pipeline");
    let pipe = pipeline_folder(dir.path(), "pipe", "text_encoder_v4");
    let ckpt = Checkpoint::open_pretrained(&pipe, &arch()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ckpt.layouts().count(), 4);
    assert_eq!(
        ckpt.file_of("control_model.zero_convs.0.0.weight"),
        pipe.join("controlnet/diffusion_pytorch_model.safetensors")
    );
    let n = assert_generated(&ckpt, "sd15_tiny", "")
        + assert_generated(&ckpt, "vae_tiny", "")
        + assert_generated(&ckpt, "clip_tiny", "");
    assert_eq!(ckpt.len(), n);

    let parity = fixtures().join("parity");
    let inputs = |n: &str| Checkpoint::open(&parity.join(format!("{n}.inputs.safetensors"))).unwrap();
    let cfg = ControlLdmConfig::locked(sd15_tiny());
    let (sd_in, vae_in, clip_in) = (inputs("sd15_tiny"), inputs("vae_tiny"), inputs("clip_tiny"));
    let run_all = |w: &Checkpoint| {
        let clip = common::parity_clip_tiny();
        let mut outs = parity::control_ldm(DeviceChoice::Cpu, &cfg, w, &sd_in, false, DType::F32).unwrap();
        outs.extend(parity::vae_parts(DeviceChoice::Cpu, &vae_tiny(), w, &vae_in).unwrap());
        outs.extend(parity::text(DeviceChoice::Cpu, &clip, w, &clip_in).unwrap());
        outs
    };
    let from_diffusers = run_all(&ckpt);
    let ldm = dir.path().join("ldm");
    std::fs::create_dir_all(&ldm).unwrap();
    // One LDM file with all three components, as a full SD checkpoint would be.
    write_ldm_file(&["sd15_tiny", "vae_tiny", "clip_tiny"], &ldm.join("all.safetensors"));
    let from_ldm = run_all(&Checkpoint::open(&ldm.join("all.safetensors")).unwrap());
    assert_eq!(from_diffusers.len(), from_ldm.len());
    assert!(bits(&from_diffusers) == bits(&from_ldm), "the diffusers-layout weights give different outputs");
    // And both are the PyTorch reference (eps from diffusers' models, as tests/graph_cpu/parity.rs checks).
    let expected = Checkpoint::open(&parity.join("sd15_tiny.expected.safetensors")).unwrap();
    let eps = &from_diffusers.iter().find(|(k, _)| k == "eps").unwrap().1;
    let want = expected.to_f32("eps").unwrap();
    let got = eps.to_f64();
    let num: f64 = got.iter().zip(&want).map(|(a, &b)| (a - b as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    assert!((num / den).sqrt() < 1e-4, "eps from the diffusers folder differs from diffusers' own output");
}

#[test]
fn a_diffusers_file_needs_the_model_config_and_unknown_blocks_stay_unexpected() {
    let dir = tmp("errors");
    let unet = rebuild("sd15_tiny/unet", dir.path());
    let err = Checkpoint::open_pretrained(&unet, &Architecture::default()).unwrap_err().to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors") && err.contains("no U-Net config"), "{err}");

    // A config with one level fewer than the file: the second level's blocks map nowhere and are kept under their
    // own names (unexpected), never renamed onto another block.
    let mut one_level = sd15_tiny();
    one_level.channel_mult = vec![1];
    one_level.num_res_blocks = vec![1];
    let arch = Architecture { unet: Some(one_level), ..Default::default() };
    let ckpt = Checkpoint::open_pretrained(&unet, &arch).unwrap();
    assert!(ckpt.unmapped().iter().any(|k| k.starts_with("down_blocks.1.")), "{:?}", ckpt.unmapped());
    assert!(ckpt.unmapped().iter().all(|k| ckpt.contains(k)));
    assert!(ckpt.unmapped().iter().all(|k| !k.starts_with("down_blocks.0.resnets.") && !k.starts_with("mid_block.")));

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = Checkpoint::open_pretrained(&empty, &arch).unwrap_err().to_string();
    assert!(err.contains("empty") && err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

/// The ControlNet written in the diffusers layout is what diffusers itself wrote for the same weights: the same keys,
/// shapes and dtypes as `ControlNetModel.save_pretrained`'s file, each tensor bitwise the LDM tensor diffusers'
/// conversion put under that key, the same `config.json` fields and values; and it loads back bitwise.
#[test]
fn the_controlnet_exports_in_the_layout_diffusers_writes() {
    let dir = tmp("export");
    let cfg = ControlNetConfig { unet: sd15_tiny(), hint_channels: 3 };
    let tensors: Vec<(String, HostTensor)> = ldm_keys("sd15_tiny")
        .into_iter()
        .filter(|(k, _)| k.starts_with("control_model."))
        .map(|(k, s)| {
            let v: Vec<f64> = generated(&k, &s).iter().map(|&v| v as f64).collect();
            (k, HostTensor::from_f64(s, DType::F32, &v).unwrap())
        })
        .collect();
    let out = dir.path().join("exported");
    let weights = write_controlnet_diffusers(&out, &cfg, &tensors).unwrap();

    let fixture = fixtures().join("layouts/sd15_tiny/controlnet");
    let header = std::fs::read(fixture.join("diffusion_pytorch_model.safetensors.header")).unwrap();
    let theirs: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header[8..]).unwrap();
    let sources: BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("ldm_sources.json")).unwrap()).unwrap();
    let ours = Checkpoint::open(&weights).unwrap();
    let their_keys: Vec<&String> = theirs.keys().filter(|k| *k != "__metadata__").collect();
    let mut our_keys: Vec<&str> = ours.keys().collect();
    our_keys.sort();
    assert_eq!(our_keys, their_keys, "the exported keys are not the ones diffusers writes");
    for key in their_keys {
        let t = ours.tensor(key).unwrap();
        let shape: Vec<usize> = serde_json::from_value(theirs[key]["shape"].clone()).unwrap();
        assert_eq!((t.shape.clone(), theirs[key]["dtype"].as_str()), (shape, Some("F32")), "{key}");
        let ldm = &sources[key];
        let want: Vec<u32> = generated(ldm, &t.shape).iter().map(|v| v.to_bits()).collect();
        let got: Vec<u32> = t.to_f32().iter().map(|v| v.to_bits()).collect();
        assert!(got == want, "{key}: diffusers holds {ldm} there, the export something else");
    }
    let config = |p: &Path| -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
    };
    let mut theirs = config(&fixture);
    theirs.remove("_diffusers_version");
    assert_eq!(config(&out), theirs, "config.json differs from the one diffusers wrote");

    // And it reads back through the loader, bitwise.
    let back = Checkpoint::open_pretrained(&out, &arch()).unwrap();
    assert_eq!(assert_generated(&back, "sd15_tiny", "control_model."), tensors.len());
}
