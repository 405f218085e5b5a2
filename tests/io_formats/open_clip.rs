//! SD 2.x's OpenCLIP text encoder against open_clip (fixtures and generator: scripts/make_openclip_fixture.py):
//! the original SD 2 layout (`cond_stage_model.model.*`, stacked q/k/v) and an open_clip `state_dict` load through
//! the real loaders, a config naming `FrozenOpenCLIPEmbedder` builds the encoder, and its penultimate (and last)
//! layer output matches what SD 2's `FrozenOpenCLIPEmbedder` computes; the tokenizer gives open_clip's ids; bad
//! files and contradictory configs are refused by name; a tiny SD 2-like ControlNet trains with it.

use crate::common;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use zeroconv::app::device::DeviceChoice;
use zeroconv::app::parity;
use zeroconv::app::train::sources::{account, load_pretrained, Component, Source};
use zeroconv::app::train::{self, train};
use zeroconv::app::weights::store::WeightStore;
use zeroconv::graph::DType;
use zeroconv::io::checkpoint::{write_safetensors, Checkpoint, Layout, TensorView};
use zeroconv::io::config::model_config;
use zeroconv::io::config::{Config, HiddenAct};
use zeroconv::io::tokenizer::ClipTokenizer;
use zeroconv::models::{ClipActivation, ClipOutput, CLIP_PREFIX};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn sd2_file() -> PathBuf {
    fixture("open_clip/sd2_text_encoder.safetensors")
}

fn expected() -> Checkpoint {
    Checkpoint::open(&fixture("open_clip/expected.safetensors")).unwrap()
}

/// The fixture model's section as a NeMo SD 2 config writes it, with zeroconv's `arch: custom` for its tiny sizes.
fn tiny_open_clip_yaml(layer: &str) -> String {
    format!(
        "model:\n  cond_stage_config:\n    _target_: nemo.collections.multimodal.modules.stable_diffusion.encoders.\
         modules.FrozenOpenCLIPEmbedder\n    arch: custom\n    version: laion2b_s32b_b79k\n    layer: {layer}\n    \
         max_length: 77\n    freeze: True\n    vocab_size: 909\n    hidden_size: 24\n    intermediate_size: 96\n    \
         num_hidden_layers: 3\n    num_attention_heads: 3\n    max_position_embeddings: 77\n    tokenizer: {}\n    \
         from_pretrained: {}\n",
        fixture("tokenizer").display(),
        sd2_file().display()
    )
}

fn tiny_open_clip(layer: &str) -> Config {
    Config::from_yaml_str(&tiny_open_clip_yaml(layer), "sd2_tiny.yaml", &[]).unwrap()
}

/// `parity::text` on `device` on the fixture's ids with `cfg`'s text encoder and the weights of `weights` (opened
/// as a `from_pretrained` is).
fn hidden_on(device: DeviceChoice, cfg: &Config, weights: &Path) -> Vec<f64> {
    let clip = model_config::clip(&cfg.model.cond_stage_config).unwrap();
    let ckpt = Checkpoint::open_pretrained(weights, &model_config::architecture(cfg)).unwrap();
    let outs = parity::text(device, &clip, &ckpt, &expected()).unwrap();
    outs[0].1.to_f64()
}

fn hidden(cfg: &Config, weights: &Path) -> Vec<f64> {
    hidden_on(DeviceChoice::Cpu, cfg, weights)
}

/// [`hidden`] against open_clip's output `want`, within 1e-4 relative (f32 against f32).
fn check_hidden(cfg: &Config, weights: &Path, want: &str) {
    let want = expected().tensor(want).unwrap().to_f64();
    common::assert_close(&format!("{} vs open_clip", weights.display()), &hidden(cfg, weights), &want, 1e-4);
}

#[test]
fn the_config_names_open_clip_with_gelu_and_the_penultimate_layer() {
    let cfg = tiny_open_clip("penultimate");
    let t = &cfg.model.cond_stage_config;
    assert_eq!((t.hidden_act, t.pad_token.as_str()), (HiddenAct::Gelu, "!"), "implied by FrozenOpenCLIPEmbedder");
    let clip = model_config::clip(t).unwrap();
    assert_eq!((clip.activation, clip.output, clip.num_layers), (ClipActivation::Gelu, ClipOutput::Penultimate, 3));
    // The config that checkpoints record loads back to the same config (no _target_ left: arch decides).
    assert_eq!(Config::from_yaml_str(&cfg.to_yaml(), "written", &[]).unwrap(), cfg);
}

#[test]
fn sd2_layout_matches_open_clip_penultimate() {
    check_hidden(&tiny_open_clip("penultimate"), &sd2_file(), "penultimate");
}

/// The same on the CUDA executor under emulation: the GELU and the causal attention as a GPU would run them.
#[test]
fn sd2_layout_matches_open_clip_on_the_emulated_cuda_device() {
    let got = hidden_on(DeviceChoice::CudaEmu, &tiny_open_clip("penultimate"), &sd2_file());
    common::assert_close("cuda-emu vs open_clip", &got, &expected().tensor("penultimate").unwrap().to_f64(), 1e-4);
}

#[test]
fn sd2_layout_matches_open_clip_last() {
    check_hidden(&tiny_open_clip("last"), &sd2_file(), "last");
}

#[test]
fn an_open_clip_state_dict_loads_too() {
    let path = fixture("open_clip/open_clip_model.bin");
    let cfg = tiny_open_clip("penultimate");
    let ckpt = Checkpoint::open_pretrained(&path, &model_config::architecture(&cfg)).unwrap();
    assert_eq!(ckpt.layouts().map(|(_, l)| l).collect::<Vec<_>>(), [Layout::OpenClip]);
    // CLIP's contrastive head and the vision tower are kept under their own names: unexpected, never loaded.
    let unmapped = ckpt.unmapped();
    for key in ["text_projection", "logit_scale", "visual.conv1.weight"] {
        assert!(unmapped.iter().any(|k| k == key), "{key} not in {unmapped:?}");
    }
    assert!(unmapped.iter().all(|k| !k.starts_with("transformer.") && !k.starts_with("ln_final")), "{unmapped:?}");
    // Stored in float16, the same values as the float32 SD 2 file.
    assert_eq!(ckpt.dtype(&format!("{CLIP_PREFIX}.encoder.layers.1.self_attn.k_proj.weight")), Some(DType::F16));
    check_hidden(&cfg, &path, "penultimate");
}

/// diffusers' SD 2 `text_encoder/`: a Hugging Face CLIPTextModel with `hidden_act: gelu` and the last block dropped.
#[test]
fn diffusers_sd2_text_encoder_needs_gelu_and_gives_the_penultimate_layer() {
    let folder = fixture("open_clip/sd2_diffusers_text_encoder");
    let yaml = format!(
        "model:\n  cond_stage_config:\n    hidden_act: gelu\n    pad_token: '!'\n    layer: last\n    \
         vocab_size: 909\n    hidden_size: 24\n    intermediate_size: 96\n    num_hidden_layers: 2\n    \
         num_attention_heads: 3\n    max_position_embeddings: 77\n    from_pretrained: {}\n",
        folder.display()
    );
    let mut cfg = Config::from_yaml_str(&yaml, "sd2_diffusers.yaml", &[]).unwrap();
    assert_eq!(cfg.model.cond_stage_config.arch, None, "Hugging Face CLIP");
    check_hidden(&cfg, &folder, "penultimate");
    // With SD 1.x's quick-GELU the same weights compute something else: the key is what selects the activation.
    cfg.model.cond_stage_config.hidden_act = HiddenAct::QuickGelu;
    let want = expected().tensor("penultimate").unwrap().to_f64();
    let err = common::max_rel_err(&hidden(&cfg, &folder), &want, 1e-12);
    assert!(err > 1e-2, "quick_gelu gave the gelu result (error {err:.2e})");
}

#[test]
fn the_split_q_k_v_borrow_the_file() {
    let cfg = tiny_open_clip("penultimate");
    let ckpt = Checkpoint::open_pretrained(&sd2_file(), &model_config::architecture(&cfg)).unwrap();
    let raw = Checkpoint::open(&sd2_file()).unwrap();
    let stacked = raw.to_f32("cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight").unwrap();
    let bias = raw.to_f32("cond_stage_model.model.transformer.resblocks.2.attn.in_proj_bias").unwrap();
    for (i, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
        let w = ckpt.get(&format!("{CLIP_PREFIX}.encoder.layers.2.self_attn.{name}.weight")).unwrap();
        assert!(w.is_borrowed(), "{name} was copied");
        assert_eq!(w.shape, [24, 24]);
        assert_eq!(w.to_f32(), stacked[i * 576..(i + 1) * 576], "{name}.weight: rows {}..{}", i * 24, (i + 1) * 24);
        let b = ckpt.to_f32(&format!("{CLIP_PREFIX}.encoder.layers.2.self_attn.{name}.bias")).unwrap();
        assert_eq!(b, bias[i * 24..(i + 1) * 24], "{name}.bias");
    }
    assert!(!ckpt.contains("cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight"));
    assert!(ckpt.contains("cond_stage_model.model.logit_scale"), "kept, as an unexpected key");
}

/// NeMo's SD 2 checkpoints: the Megatron wrapper's `model.` in front of the SD 2 names, in a `.nemo` (here with the
/// in-projection saved as a strided, transposed view: its q/k/v are strided views too, gathered when read).
#[test]
fn a_nemo_sd2_checkpoint_maps_like_the_original() {
    let cfg = tiny_open_clip("penultimate");
    let arch = model_config::architecture(&cfg);
    let nemo = Checkpoint::open_pretrained(&fixture("open_clip/sd2_text_encoder_part.nemo"), &arch).unwrap();
    let sd2 = Checkpoint::open_pretrained(&sd2_file(), &arch).unwrap();
    let mut names = Vec::new();
    for p in ["q_proj", "k_proj", "v_proj"] {
        names.extend(["weight", "bias"].map(|t| format!("{CLIP_PREFIX}.encoder.layers.1.self_attn.{p}.{t}")));
    }
    names.push(format!("{CLIP_PREFIX}.final_layer_norm.weight"));
    let q = &names[0];
    assert!(!nemo.get(q).unwrap().is_borrowed() && sd2.get(q).unwrap().is_borrowed(), "strided in the .nemo only");
    for key in &names {
        assert_eq!(nemo.shape(key), sd2.shape(key), "{key}");
        assert_eq!(nemo.to_f32(key).unwrap(), sd2.to_f32(key).unwrap(), "{key}");
    }
    let mut keys: Vec<&str> = nemo.keys().collect();
    keys.sort_unstable();
    let mut want: Vec<&str> = names.iter().map(String::as_str).chain(["cond_stage_model.model.logit_scale"]).collect();
    want.sort_unstable();
    assert_eq!(keys, want);
}

#[test]
fn our_tokenizer_gives_open_clips_ids_with_pad_bang() {
    let cfg = tiny_open_clip("penultimate");
    let tok = ClipTokenizer::from_config(&cfg.model.cond_stage_config).unwrap();
    assert_eq!(tok.pad_id(), 0);
    let exp = expected();
    let captions: Vec<String> = serde_json::from_str(&exp.metadata()["captions"]).unwrap();
    let ids = exp.tensor("ids").unwrap().to_i64().unwrap();
    assert_eq!(ids.len(), captions.len() * 77);
    for (caption, want) in captions.iter().zip(ids.chunks(77)) {
        let got: Vec<i64> = tok.encode(caption).into_iter().map(i64::from).collect();
        assert_eq!(got, want, "ids of {caption:?}");
    }
}

#[test]
fn vit_h_14_implies_open_clips_sizes() {
    let yaml = "model:\n  cond_stage_config:\n    _target_: nemo.collections.multimodal.modules.stable_diffusion.\
                encoders.modules.FrozenOpenCLIPEmbedder\n    arch: ViT-H-14\n    version: laion2b_s32b_b79k\n    \
                layer: penultimate\n    max_length: 77\n    freeze: True\n    use_fp16: False\n";
    let t = Config::from_yaml_str(yaml, "sd2.yaml", &[]).unwrap().model.cond_stage_config;
    let exp = expected();
    let open_clip: serde_json::Value = serde_json::from_str(&exp.metadata()["vit_h_14_text_cfg"]).unwrap();
    let n = |k: &str| open_clip[k].as_u64().unwrap() as u32;
    // open_clip's MLP is mlp_ratio (4.0 unless the config says otherwise) times the width.
    let mlp = (open_clip.get("mlp_ratio").and_then(|r| r.as_f64()).unwrap_or(4.0) * f64::from(n("width"))) as u32;
    assert_eq!(
        (t.hidden_size, t.num_attention_heads, t.num_hidden_layers, t.intermediate_size),
        (n("width"), n("heads"), n("layers"), mlp)
    );
    assert_eq!((t.vocab_size, t.max_position_embeddings), (n("vocab_size"), n("context_length")));
    assert_eq!((t.hidden_act, t.pad_token.as_str(), t.arch.as_deref()), (HiddenAct::Gelu, "!", Some("ViT-H-14")));
    // Without `arch`, the class's default architecture.
    let no_arch = yaml.replace("    arch: ViT-H-14\n", "");
    assert_eq!(Config::from_yaml_str(&no_arch, "sd2.yaml", &[]).unwrap().model.cond_stage_config, t);
}

#[test]
fn contradictory_text_encoder_configs_are_refused_naming_the_key() {
    let base = tiny_open_clip_yaml("penultimate");
    for (overrides, want) in [
        (vec!["model.cond_stage_config.arch=ViT-H-14"], "vocab_size is 909, but arch ViT-H-14 has vocab_size 49408"),
        (vec!["+model.cond_stage_config.hidden_act=quick_gelu"], "hidden_act is quick_gelu"),
        (vec!["model.cond_stage_config.layer=hidden"], "only last and penultimate"),
        (vec!["model.cond_stage_config._target_=x.FrozenCLIPEmbedder"], "names FrozenCLIPEmbedder"),
        (vec!["model.cond_stage_config._target_=x.FrozenT5Embedder"], "does not implement"),
        (vec!["model.cond_stage_config.arch=ViT-bigG-99"], "ViT-bigG-99 is not an OpenCLIP architecture"),
    ] {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let err = Config::from_yaml_str(&base, "sd2_tiny.yaml", &overrides).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("model.cond_stage_config."), "{overrides:?}: {err}");
    }
}

/// Writes the SD 2 fixture with one tensor replaced by `bad` (a malformed file for the error tests).
fn sd2_with(dir: &Path, key: &str, bad: Option<(Vec<usize>, DType)>) -> PathBuf {
    let raw = Checkpoint::open(&sd2_file()).unwrap();
    let mut tensors: Vec<(String, TensorView<'static>)> = Vec::new();
    for k in raw.keys() {
        if k != key {
            tensors.push((k.to_string(), raw.tensor(k).unwrap().into_owned()));
        }
    }
    if let Some((shape, dtype)) = bad {
        let n: usize = shape.iter().product::<usize>() * dtype.size();
        tensors.push((key.to_string(), TensorView::new(shape, dtype, Cow::Owned(vec![0; n])).unwrap()));
    }
    let path = dir.join("bad_sd2.safetensors");
    write_safetensors(&path, &tensors, None).unwrap();
    path
}

#[test]
fn a_misshaped_in_proj_is_refused_naming_the_key_and_file() {
    let dir = common::training::tmp("open-clip-in-proj");
    let arch = model_config::architecture(&tiny_open_clip("penultimate"));
    let w = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight";
    let b = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias";
    for (key, shape) in [(w, vec![70, 24]), (w, vec![72, 23]), (w, vec![72]), (b, vec![71])] {
        let path = sd2_with(dir.path(), key, Some((shape.clone(), DType::F32)));
        let err = Checkpoint::open_pretrained(&path, &arch).unwrap_err().to_string();
        assert!(
            err.contains(key) && err.contains(&path.display().to_string()) && err.contains("[3d, d]"),
            "{shape:?}: {err}"
        );
    }
    // A LayerScale (open_clip's ls_1) that zeroconv's block does not have: refused, not dropped.
    let ls = "cond_stage_model.model.transformer.resblocks.0.ls_1.gamma";
    let path = sd2_with(dir.path(), ls, Some((vec![24], DType::F32)));
    let err = Checkpoint::open_pretrained(&path, &arch).unwrap_err().to_string();
    assert!(err.contains(ls) && err.contains("does not have"), "{err}");
    // A missing in_proj: the model's key check names the q/k/v it needed.
    let path = sd2_with(dir.path(), w, None);
    let cfg = tiny_open_clip("penultimate");
    let ckpt = Checkpoint::open_pretrained(&path, &arch).unwrap();
    let clip = model_config::clip(&cfg.model.cond_stage_config).unwrap();
    let err = parity::text(DeviceChoice::Cpu, &clip, &ckpt, &expected()).unwrap_err().to_string();
    assert!(err.contains("encoder.layers.1.self_attn.q_proj.weight") && err.contains("missing"), "{err}");
}

/// The built-in tiny config made SD 2-like: its U-Net and ControlNet read a 24-wide context from the fixture's
/// OpenCLIP text encoder (penultimate layer), loaded from the SD 2 layout.
fn sd2_like_run(extra: &[&str]) -> Config {
    let f = sd2_file().display().to_string();
    let t = fixture("tokenizer").display().to_string();
    let mut overrides: Vec<String> = [
        "model.base_pretrain_steps=0",
        "trainer.max_steps=2",
        "model.unet_config.context_dim=24",
        "model.control_stage_config.context_dim=24",
        "+model.cond_stage_config._target_=nemo.collections.multimodal.modules.stable_diffusion.encoders.modules.\
         FrozenOpenCLIPEmbedder",
        "+model.cond_stage_config.arch=custom",
        "model.cond_stage_config.version=laion2b_s32b_b79k",
        "+model.cond_stage_config.layer=penultimate",
        "model.cond_stage_config.max_length=77",
        "model.cond_stage_config.vocab_size=909",
        "model.cond_stage_config.hidden_size=24",
        "model.cond_stage_config.intermediate_size=96",
        "model.cond_stage_config.num_hidden_layers=3",
        "model.cond_stage_config.num_attention_heads=3",
        "model.cond_stage_config.max_position_embeddings=77",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("+model.cond_stage_config.tokenizer={t}"), format!("+model.cond_stage_config.from_pretrained={f}")])
    .collect();
    overrides.extend(common::training::SMALL_STEP.iter().map(|s| s.to_string()));
    overrides.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = overrides.iter().map(String::as_str).collect();
    common::training::tiny(&refs, &[])
}

#[test]
fn a_tiny_sd2_like_controlnet_trains_with_the_open_clip_encoder_from_its_checkpoint() {
    let cfg = sd2_like_run(&[]);
    let models = train::step_models(&cfg).unwrap();
    assert_eq!((models.clip.activation, models.clip.output), (ClipActivation::Gelu, ClipOutput::Penultimate));
    // Every text-encoder tensor the step uses comes from the SD 2 file (the U-Net is random: no base model here).
    let specs = {
        let mut b = zeroconv::models::ModelBuilder::new(DType::F32);
        let phase = zeroconv::models::train_step::TrainPhase::Control;
        zeroconv::models::train_step::micro_step(&mut b, &models, phase, 1, 64, DType::F32, "").unwrap();
        b.params
    };
    let mut store = WeightStore::default();
    let mut sources = load_pretrained(&cfg, &mut store, &specs).unwrap();
    account(&cfg, &specs, &store, &mut sources, true).unwrap();
    let text = &sources.rows[&Component::TextEncoder];
    assert_eq!(text.keys().collect::<Vec<_>>(), [&Source::File(sd2_file())], "{text:?}");
    // Two layers of three (penultimate), the embeddings and the final norm: 2 × 16 + 2 + 2 tensors.
    assert_eq!(text[&Source::File(sd2_file())], 36);

    let dir = common::training::tmp("open-clip-train");
    let report = train(&cfg, &common::training::opts(&dir.path().join("run"))).unwrap();
    let losses: Vec<f64> = report.losses.iter().map(|(_, _, l)| *l).collect();
    assert_eq!(losses.len(), 2, "{:?}", report.losses);
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
}

#[test]
fn v_prediction_is_refused_not_trained_as_eps() {
    let overrides = vec!["+model.parameterization=v".to_string()];
    let yaml = tiny_open_clip_yaml("penultimate");
    let err = Config::from_yaml_str(&yaml, "sd2_v.yaml", &overrides).unwrap_err().to_string();
    assert!(err.contains("model.parameterization") && err.contains("eps"), "{err}");
}
