//! NeMo's own key names load into the LDM names, whatever the container: the names come from NeMo's code
//! (`_legacy_unet_ckpt_mapping` and `te_fp8_key_mapping` of its U-Net, run by scripts/make_nemo_fixture.py on the tiny
//! parity model's keys: tests/fixtures/nemo/names.json), and `training.ckpt` is a NeMo training checkpoint as
//! PyTorch Lightning saves it (torch.save), with the Megatron wrapper's prefixes, schedule buffers and Transformer
//! Engine `_extra_state` entries.

use crate::common;
use common::layout_fixtures::{fixtures, generated, ldm_keys};

use std::collections::BTreeMap;
use zeroconv::engine::HostTensor;
use zeroconv::graph::DType;
use zeroconv::io::checkpoint::{write_safetensors, Architecture, Checkpoint, Layout};
use zeroconv::models::ControlNetConfig;

fn arch() -> Architecture {
    let unet = common::parity_sd15_tiny_unet();
    Architecture {
        unet: Some(unet.clone()),
        control: Some(ControlNetConfig { unet, hint_channels: 3 }),
        vae: None,
        megatron_clip: None,
    }
}

/// {variant: {NeMo key: LDM key}} as NeMo's mapping functions gave them.
fn names() -> BTreeMap<String, BTreeMap<String, String>> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("nemo/names.json")).unwrap()).unwrap()
}

/// Every key of `ckpt` that the `expected` LDM keys name holds its generated tensor, bit for bit.
fn assert_generated(ckpt: &Checkpoint, expected: &BTreeMap<String, Vec<usize>>) {
    for (key, shape) in expected {
        let t = ckpt.tensor(key).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&t.shape, shape, "{key}");
        let got: Vec<u32> = t.to_f32().iter().map(|v| v.to_bits()).collect();
        let want: Vec<u32> = generated(key, shape).iter().map(|v| v.to_bits()).collect();
        assert!(got == want, "{key}: not the tensor NeMo stores under that name (a wrong mapping?)");
    }
}

#[test]
fn nemo_names_with_and_without_transformer_engine_load_under_ldm_names() {
    let shapes: BTreeMap<String, Vec<usize>> = ldm_keys("sd15_tiny").into_iter().collect();
    let dir = common::training::tmp("nemo-names");
    for (variant, table) in names() {
        assert_eq!(table.len(), shapes.len(), "{variant}: one NeMo name per LDM key");
        let renamed = table.iter().filter(|(nemo, ldm)| !nemo.ends_with(ldm.split_once('.').unwrap().1)).count();
        assert!(renamed > 0, "{variant}: the fixture renames nothing");
        let mut tensors: Vec<(String, HostTensor)> = table
            .iter()
            .map(|(nemo, ldm)| {
                let v: Vec<f64> = generated(ldm, &shapes[ldm]).iter().map(|&v| v as f64).collect();
                (nemo.clone(), HostTensor::from_f64(shapes[ldm].clone(), DType::F32, &v).unwrap())
            })
            .collect();
        tensors.push(("model.betas".into(), HostTensor::zeros([4], DType::F32)));
        let path = dir.path().join(format!("{variant}.safetensors"));
        write_safetensors(&path, &tensors, None).unwrap();
        let ckpt = Checkpoint::open_pretrained(&path, &arch()).unwrap();
        assert_eq!(ckpt.layouts().map(|(_, l)| l).collect::<Vec<_>>(), vec![Layout::Nemo], "{variant}");
        assert_generated(&ckpt, &shapes);
        assert!(ckpt.contains("betas"), "{variant}: the wrapper's model. is dropped from buffers too");
        assert_eq!(ckpt.len(), shapes.len() + 1, "{variant}: nothing left under a NeMo name");
    }
}

#[test]
fn a_nemo_training_checkpoint_loads_through_the_lightning_container() {
    let path = fixtures().join("nemo/training.ckpt");
    let ckpt = Checkpoint::open_pretrained(&path, &arch()).unwrap();
    let block = ".input_blocks.1.1.transformer_blocks.0.";
    let expected: BTreeMap<String, Vec<usize>> =
        ldm_keys("sd15_tiny").into_iter().filter(|(k, _)| k.contains(block)).collect();
    assert!(expected.keys().any(|k| k.starts_with("control_model.")) && expected.len() > 20);
    assert_generated(&ckpt, &expected);
    for k in ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.norm1.weight", "betas"] {
        assert!(ckpt.contains(k), "{k} missing; keys: {:?}", ckpt.keys().collect::<Vec<_>>());
    }
    // Transformer Engine's state is not a weight: it never takes a model key's place.
    assert!(ckpt.keys().all(|k| !k.contains("norm_to_q") || k.ends_with("_extra_state")));
}
