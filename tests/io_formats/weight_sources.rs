//! Every parameter is accounted for before step 1: frozen components with no file are refused (naming the
//! component, the missing keys and the file), each file fills only its own component, `from_pretrained_unet`
//! initialises the ControlNet without touching the locked U-Net, and `zeroconv train` prints where each component
//! came from.

use std::path::{Path, PathBuf};
use tempfile::TempDir;
use zeroconv::app::device::DeviceChoice;
use zeroconv::app::train::sources::{account, load_pretrained, Component, Source};
use zeroconv::app::train::{self, train, TrainOptions};
use zeroconv::app::weights::store::WeightStore;
use zeroconv::engine::HostTensor;
use zeroconv::graph::DType;
use zeroconv::io::checkpoint::write_safetensors;
use zeroconv::io::config::{load_config, Config, CropSize};
use zeroconv::models::ParamSpec;

fn tmp(name: &str) -> TempDir {
    tempfile::Builder::new().prefix(&format!("zeroconv-weights-{name}-")).tempdir().unwrap()
}

/// The built-in tiny config without base pretraining, with a small KL VAE instead of the pixel first stage, so
/// every component has weights.
fn config(overrides: &[&str]) -> Config {
    let mut all: Vec<String> = [
        "model.micro_batch_size=1",
        "model.base_pretrain_steps=0",
        "trainer.max_steps=1",
        "model.first_stage_config.kind=autoencoder_kl",
        "model.first_stage_config.embed_dim=3",
        "model.first_stage_config.ddconfig.z_channels=3",
        "model.first_stage_config.ddconfig.ch=32",
        "model.first_stage_config.ddconfig.ch_mult=[1,1,1,1]",
        "model.first_stage_config.ddconfig.num_res_blocks=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    all.extend(overrides.iter().map(|s| s.to_string()));
    let mut cfg = load_config(None, &all).unwrap();
    let a = &mut cfg.model.data.train.augmentations;
    a.resize_smallest_side = Some(64);
    a.center_crop_h_w = Some(CropSize { height: 64, width: 64 });
    cfg
}

fn all_specs(cfg: &Config) -> Vec<ParamSpec> {
    let models = train::step_models(cfg).unwrap();
    let mut b = zeroconv::models::ModelBuilder::new(DType::F32);
    zeroconv::models::train_step::micro_step(
        &mut b,
        &models,
        zeroconv::models::train_step::TrainPhase::Control,
        1,
        64,
        DType::F32,
        "",
    )
    .unwrap();
    b.params
}

/// Writes the model's tensors whose keys start with one of `prefixes` (zeros), plus `extra` keys, to a file.
fn checkpoint(dir: &Path, name: &str, cfg: &Config, prefixes: &[&str], extra: &[&str]) -> PathBuf {
    let mut tensors: Vec<(String, HostTensor)> = all_specs(cfg)
        .into_iter()
        .filter(|s| prefixes.iter().any(|p| s.key.starts_with(p)))
        .map(|s| (s.key.clone(), HostTensor::zeros(s.shape.clone(), DType::F32)))
        .collect();
    tensors.extend(extra.iter().map(|k| (k.to_string(), HostTensor::zeros([2], DType::F32))));
    let path = dir.join(name);
    write_safetensors(&path, &tensors, None).unwrap();
    path
}

fn opts(out: &Path, allow_random_weights: bool) -> TrainOptions {
    TrainOptions {
        out_dir: out.to_path_buf(),
        resume: false,
        threads: Some(2),
        device: DeviceChoice::Cpu,
        allow_random_weights,
        strict: false,
        progress: false,
        evaluate: false,
        fail_checkpoint_after: None,
    }
}

#[test]
fn training_without_the_frozen_components_is_refused_naming_them() {
    let dir = tmp("refused");
    let cfg = config(&[]);
    let err = train(&cfg, &opts(&dir.path().join("run"), false)).unwrap_err().to_string();
    for want in
        ["U-Net", "VAE", "text encoder", "model.first_stage_config.from_pretrained is not set", "tensors missing"]
    {
        assert!(err.contains(want), "missing {want:?} in: {err}");
    }
    assert!(!err.contains("ControlNet:"), "the ControlNet may be initialised: {err}");
    assert!(!dir.path().join("run").join("checkpoints").exists(), "nothing was trained");
}

#[test]
fn a_unet_only_file_is_refused_for_the_vae_and_text_encoder() {
    let dir = tmp("unet-only");
    let base = config(&[]);
    let unet = checkpoint(dir.path(), "unet.safetensors", &base, &["model.diffusion_model."], &[]);
    let u = unet.display().to_string();
    let cfg = config(&[
        &format!("model.unet_config.from_pretrained={u}"),
        // The same file named for the other components: it holds none of their keys.
        &format!("model.cond_stage_config.from_pretrained={u}"),
    ]);
    let err = train(&cfg, &opts(&dir.path().join("run"), false)).unwrap_err().to_string();
    assert!(err.contains(&u) && err.contains("text encoder") && err.contains("model.cond_stage_config"), "{err}");
}

#[test]
fn a_complete_checkpoint_trains_and_says_where_each_component_came_from() {
    let dir = tmp("complete");
    let cfg0 = config(&[]);
    let full = checkpoint(
        dir.path(),
        "sd.safetensors",
        &cfg0,
        &["model.diffusion_model.", "first_stage_model.", "cond_stage_model."],
        &["model_ema.decay", "betas", "cond_stage_model.transformer.text_model.embeddings.position_ids"],
    );
    let f = full.display().to_string();
    let cfg = config(&[
        &format!("model.unet_config.from_pretrained={f}"),
        &format!("model.first_stage_config.from_pretrained={f}"),
        &format!("model.cond_stage_config.from_pretrained={f}"),
    ]);
    let specs = all_specs(&cfg);
    let mut store = WeightStore::default();
    let mut sources = load_pretrained(&cfg, &mut store, &specs).unwrap();
    account(&cfg, &specs, &store, &mut sources, false).unwrap();
    let file = Source::File(full.clone());
    for c in [Component::Unet, Component::Vae, Component::TextEncoder] {
        let rows = &sources.rows[&c];
        assert_eq!(rows.keys().collect::<Vec<_>>(), vec![&file], "{c:?}: {rows:?}");
    }
    let control = &sources.rows[&Component::ControlNet];
    assert!(control.contains_key(&Source::UnetCopy) && control.contains_key(&Source::NewLayer), "{control:?}");
    assert!(!control.contains_key(&Source::Random) && !control.contains_key(&Source::Initialised), "{control:?}");
    let table = sources.render();
    assert!(table.contains("U-Net") && table.contains(&f) && table.contains("ignored"), "{table}");
    // And the run itself goes through.
    train(&cfg, &opts(&dir.path().join("run"), false)).unwrap();
}

#[test]
fn from_pretrained_unet_initialises_only_the_controlnet() {
    let dir = tmp("control-init");
    let cfg0 = config(&[]);
    // Two U-Net files: the locked one (zeros), and another whose weights must reach only the ControlNet.
    let locked = checkpoint(dir.path(), "locked.safetensors", &cfg0, &["model.diffusion_model."], &[]);
    let other_specs = all_specs(&cfg0);
    let ones: Vec<(String, HostTensor)> = other_specs
        .iter()
        .filter(|s| s.key.starts_with("model.diffusion_model."))
        .map(|s| {
            (s.key.clone(), HostTensor::from_f64(s.shape.clone(), DType::F32, &vec![1.0; s.shape.numel()]).unwrap())
        })
        .collect();
    let other = dir.path().join("other.safetensors");
    write_safetensors(&other, &ones, None).unwrap();
    let cfg = config(&[
        &format!("model.unet_config.from_pretrained={}", locked.display()),
        &format!("model.control_stage_config.from_pretrained_unet={}", other.display()),
    ]);
    let specs = all_specs(&cfg);
    let mut store = WeightStore::default();
    load_pretrained(&cfg, &mut store, &specs).unwrap();
    let unet_key = "model.diffusion_model.input_blocks.0.0.weight";
    let control_key = "control_model.input_blocks.0.0.weight";
    assert!(store.tensors[unet_key].to_f64().iter().all(|&v| v == 0.0), "the locked U-Net kept its own file");
    assert!(store.tensors[control_key].to_f64().iter().all(|&v| v == 1.0), "the ControlNet came from the other");
}

#[test]
fn random_frozen_weights_only_on_request_and_named_as_such() {
    let cfg = config(&[]);
    let specs = all_specs(&cfg);
    let store = WeightStore::default();
    let mut sources = Default::default();
    assert!(account(&cfg, &specs, &store, &mut sources, false).is_err());
    let mut sources = Default::default();
    account(&cfg, &specs, &store, &mut sources, true).unwrap();
    assert!(sources.render().contains("RANDOM (--allow-random-weights)"), "{}", sources.render());
    assert_eq!(
        sources.rows[&Component::ControlNet].get(&Source::Random),
        None,
        "the ControlNet is initialised, not random"
    );
}

#[test]
fn a_nan_weight_is_refused_at_load_naming_the_key() {
    let dir = tmp("nan");
    let cfg0 = config(&[]);
    let mut tensors: Vec<(String, HostTensor)> = all_specs(&cfg0)
        .into_iter()
        .filter(|s| s.key.starts_with("model.diffusion_model."))
        .map(|s| (s.key.clone(), HostTensor::zeros(s.shape.clone(), DType::F32)))
        .collect();
    let bad = tensors[3].0.clone();
    let n = tensors[3].1.numel();
    let mut vals = vec![0.0; n];
    vals[n - 1] = f64::NAN;
    tensors[3].1 = HostTensor::from_f64(tensors[3].1.shape.clone(), DType::F32, &vals).unwrap();
    let path = dir.path().join("nan.safetensors");
    write_safetensors(&path, &tensors, None).unwrap();
    let cfg = config(&[&format!("model.unet_config.from_pretrained={}", path.display())]);
    let mut store = WeightStore::default();
    let err = load_pretrained(&cfg, &mut store, &all_specs(&cfg)).unwrap_err().to_string();
    assert!(err.contains(&bad) && err.contains("non-finite") && err.contains(&format!("element {}", n - 1)), "{err}");
}

#[test]
fn a_step_larger_than_memory_is_refused_before_allocating() {
    let dir = tmp("huge");
    // A batch whose planned arena is far beyond this machine's memory (the plan is known before allocating).
    let cfg = config(&["model.micro_batch_size=100000"]);
    let err = train(&cfg, &opts(&dir.path().join("run"), true)).unwrap_err().to_string();
    assert!(err.contains("GiB of memory is available") && err.contains("needs"), "{err}");
}

/// A tensor the file holds in a dtype zeroconv cannot read is reported as that, not as a missing key.
#[test]
fn an_unreadable_dtype_is_named_not_reported_missing() {
    let dir = tmp("f8");
    let cfg0 = config(&[]);
    let spec = all_specs(&cfg0).into_iter().find(|s| s.key.starts_with("model.diffusion_model.")).unwrap();
    // A safetensors file by hand: an 8-byte header length, the JSON header, then the data (one byte per f8 value).
    let n = spec.shape.numel();
    let header =
        format!(r#"{{"{}":{{"dtype":"F8_E4M3","shape":{:?},"data_offsets":[0,{n}]}}}}"#, spec.key, spec.shape.dims());
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(vec![0u8; n]);
    let path = dir.path().join("f8.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let cfg = config(&[&format!("model.unet_config.from_pretrained={}", path.display())]);
    let mut store = WeightStore::default();
    let err = load_pretrained(&cfg, &mut store, &all_specs(&cfg)).unwrap_err().to_string();
    assert!(err.contains(&spec.key) && err.contains("cannot be read") && err.contains("F8_E4M3"), "{err}");
}
