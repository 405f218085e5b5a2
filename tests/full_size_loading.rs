//! Full size: an SD 1.5-shaped checkpoint (every U-Net, VAE and CLIP tensor of configs/controlnet_sd15.yaml at its
//! real shape, plus what real files carry besides: the U-Net's EMA copy, the schedule buffers, `position_ids`, the
//! EMA bookkeeping) opened through the training loader's path. Every component's keys must be found, and host
//! memory must stay near one copy of the weights: a tensor is copied out of the mapping once and its mapped pages
//! released, never held twice.
//!
//! The file is sparse (its data is a hole: zeros, which are finite and take no disk), fp16 like the pruned
//! checkpoints people download, about 2 GB of weights plus 1.7 GB of EMA copies never read. Its safetensors header
//! is written here: the format itself is checked against files the safetensors library wrote elsewhere
//! (tests/checkpoint.rs); this test is about what the loader holds in memory. Its own test binary, so the process's
//! peak resident memory is this test's alone.

mod common;

use std::io::Write;
use std::path::Path;
use zeroconv::app::train::sources::{account, load_pretrained, Component, Source};
use zeroconv::app::train::{self};
use zeroconv::app::weights::store::WeightStore;
use zeroconv::graph::DType;
use zeroconv::io::config::{load_config, Config};
use zeroconv::models::ParamSpec;

fn config(file: &Path) -> Config {
    let f = file.display().to_string();
    let overrides = [
        format!("model.unet_config.from_pretrained={f}"),
        format!("model.first_stage_config.from_pretrained={f}"),
        format!("model.cond_stage_config.from_pretrained={f}"),
    ];
    let yaml = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/controlnet_sd15.yaml");
    load_config(Some(&yaml), &overrides).unwrap()
}

/// Every parameter of the training step (ControlNet, U-Net, VAE encoder, text encoder), built symbolically.
fn all_specs(cfg: &Config) -> Vec<ParamSpec> {
    let models = train::step_models(cfg).unwrap();
    let mut b = zeroconv::models::ModelBuilder::new(DType::F32);
    let phase = zeroconv::models::train_step::TrainPhase::Control;
    zeroconv::models::train_step::micro_step(&mut b, &models, phase, 1, 64, DType::F32, "").unwrap();
    b.params
}

/// A sparse safetensors file: the header names every tensor, the data section is a hole of the right length.
fn write_sparse_safetensors(path: &Path, tensors: &[(String, &str, Vec<usize>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (key, dtype, shape) in tensors {
        let size = match *dtype {
            "F16" => 2,
            "F32" | "I32" => 4,
            "I64" => 8,
            other => panic!("{other}"),
        };
        let bytes = size * shape.iter().product::<usize>();
        header.insert(
            key.clone(),
            serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes] }),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&json).unwrap();
    f.set_len(8 + json.len() as u64 + offset as u64).unwrap();
}

/// Peak resident memory of this process so far (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn an_sd15_sized_checkpoint_loads_every_component_holding_the_weights_once() {
    let dir = common::training::tmp("full-size");
    let file = dir.path().join("v1-5-shaped.safetensors");
    let cfg = config(&file);
    let specs = all_specs(&cfg);
    let frozen: Vec<&ParamSpec> = specs.iter().filter(|s| !s.key.starts_with("control_model.")).collect();
    let mut tensors: Vec<(String, &str, Vec<usize>)> =
        frozen.iter().map(|s| (s.key.clone(), "F16", s.shape.dims().to_vec())).collect();
    // What real SD 1.5 files hold besides the weights: the EMA copy of the U-Net (LDM's LitEma names drop the dots),
    // the schedule buffers, CLIP's position ids, the EMA's bookkeeping.
    for s in frozen.iter().filter(|s| s.key.starts_with("model.diffusion_model.")) {
        let ema = format!("model_ema.{}", s.key.trim_start_matches("model.").replace('.', ""));
        tensors.push((ema, "F16", s.shape.dims().to_vec()));
    }
    for buffer in ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "posterior_variance"] {
        tensors.push((buffer.into(), "F32", vec![1000]));
    }
    tensors.push(("cond_stage_model.transformer.text_model.embeddings.position_ids".into(), "I64", vec![1, 77]));
    tensors.push(("model_ema.decay".into(), "F32", vec![]));
    tensors.push(("model_ema.num_updates".into(), "I32", vec![]));
    write_sparse_safetensors(&file, &tensors);

    let before = peak_rss();
    let mut store = WeightStore::default();
    let mut sources = load_pretrained(&cfg, &mut store, &specs).unwrap();
    account(&cfg, &specs, &store, &mut sources, false).unwrap();
    let grown = peak_rss().saturating_sub(before);

    let held: u64 = store.tensors.values().map(|t| t.bytes.len() as u64).sum();
    let weights: u64 = frozen.iter().map(|s| 2 * s.shape.dims().iter().product::<usize>() as u64).sum();
    assert!(weights > 1_900_000_000, "not SD 1.5-sized: {weights} bytes of frozen weights");
    assert!(held >= weights, "the store holds {held} bytes, the frozen weights are {weights}");
    for c in [Component::Unet, Component::Vae, Component::TextEncoder] {
        let rows = &sources.rows[&c];
        assert_eq!(rows.keys().collect::<Vec<_>>(), vec![&Source::File(file.clone())], "{c:?}: {rows:?}");
    }
    let control = &sources.rows[&Component::ControlNet];
    assert!(control.contains_key(&Source::UnetCopy) && control.contains_key(&Source::NewLayer), "{control:?}");
    // One copy of what is held, plus slack for the page cache's transient pages and the allocator: far below the
    // two copies (mapped and copied) the loader held before it released each tensor's pages.
    let allowed = held + held / 10 + (64 << 20);
    assert!(
        grown <= allowed,
        "loading raised the peak resident memory by {:.2} GB for {:.2} GB of weights held (allowed {:.2} GB)",
        grown as f64 / 1e9,
        held as f64 / 1e9,
        allowed as f64 / 1e9
    );
}
