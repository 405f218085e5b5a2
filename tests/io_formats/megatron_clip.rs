//! NeMo's Megatron CLIP text encoder (`FrozenMegatronCLIPEmbedder`) against open_clip: the open_clip fixture's tiny
//! model converted to NeMo's CLIP names by NeMo's own code (scripts/make_megatron_clip_fixture.py; fixtures under
//! tests/fixtures/nemo/) loads through the real loaders, under both SD prefixes, in both `query_key_value` row orders
//! and from a CLIP `.nemo` named by `restore_from_path`, and gives open_clip's penultimate and last layers
//! (tests/fixtures/open_clip/expected.safetensors, which the generator checks these weights reproduce); configs
//! zeroconv cannot honour and malformed files are refused naming the key.

use crate::common;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use zeroconv::app::device::DeviceChoice;
use zeroconv::app::parity;
use zeroconv::io::checkpoint::{write_safetensors, Architecture, Checkpoint, TensorView};
use zeroconv::io::config::model_config;
use zeroconv::io::config::{Config, HiddenAct, MegatronTextConfig};
use zeroconv::models::{ClipActivation, ClipOutput, CLIP_PREFIX};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// `cond_stage_model.model.*`, `megatron_legacy: True` row order.
fn sd_file() -> PathBuf {
    fixture("nemo/megatron_clip_sd.safetensors")
}

/// `model.cond_stage_model.model.*` in a Lightning-style `.ckpt`, `megatron_legacy: False` (per-head) row order.
fn interleaved_file() -> PathBuf {
    fixture("nemo/megatron_clip_sd_interleaved.ckpt")
}

fn clip_nemo() -> PathBuf {
    fixture("nemo/megatron_clip.nemo")
}

fn expected() -> Checkpoint {
    Checkpoint::open(&fixture("open_clip/expected.safetensors")).unwrap()
}

const CLASS: &str = "nemo.collections.multimodal.modules.stable_diffusion.encoders.modules.FrozenMegatronCLIPEmbedder";

/// The section as a NeMo SD config writes it with an inline CLIP config (`cfg`), the fixture's text sizes, plus
/// zeroconv's tokenizer, vocabulary and weights keys. `text_extra` goes into `cfg.text`.
fn yaml_with_cfg(layer: &str, legacy: bool, weights: &Path, text_extra: &str) -> String {
    format!(
        "model:\n  cond_stage_config:\n    _target_: {CLASS}\n    restore_from_path: null\n    device: cuda\n    \
         freeze: True\n    layer: {layer}\n    vocab_size: 909\n    tokenizer: {}\n    from_pretrained: {}\n    \
         cfg:\n      make_vocab_size_divisible_by: 128\n      tensor_model_parallel_size: 1\n      tokenizer:\n        \
         library: huggingface\n        type: openai/clip-vit-large-patch14\n      text:\n        \
         encoder_seq_length: 77\n        max_position_embeddings: ${{.encoder_seq_length}}\n        \
         position_embedding_type: learned_parameters\n        num_layers: 3\n        hidden_size: 24\n        \
         ffn_hidden_size: 96\n        num_attention_heads: 3\n        kv_channels: null\n        \
         normalization: layernorm\n        layernorm_epsilon: 1e-5\n        openai_gelu: False\n        \
         bias_activation_fusion: False\n        megatron_legacy: {}\n        activation: gelu\n{text_extra}",
        fixture("tokenizer").display(),
        weights.display(),
        if legacy { "True" } else { "False" },
    )
}

fn config(yaml: &str, overrides: &[&str]) -> Result<Config, String> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::from_yaml_str(yaml, "megatron_sd.yaml", &overrides).map_err(|e| e.to_string())
}

/// `parity::text` on the CPU on the fixture's ids with `cfg`'s text encoder and its `from_pretrained` weights.
fn hidden(cfg: &Config) -> Vec<f64> {
    let t = &cfg.model.cond_stage_config;
    let clip = model_config::clip(t).unwrap();
    let ckpt = Checkpoint::open_pretrained(t.from_pretrained.as_ref().unwrap(), &model_config::architecture(cfg))
        .unwrap_or_else(|e| panic!("{e}"));
    parity::text(DeviceChoice::Cpu, &clip, &ckpt, &expected()).unwrap_or_else(|e| panic!("{e}"))[0].1.to_f64()
}

/// [`hidden`] against open_clip's output `want`, within 1e-4 relative (as tests/open_clip.rs).
fn check_hidden(what: &str, cfg: &Config, want: &str) {
    let want = expected().tensor(want).unwrap().to_f64();
    common::assert_close(&format!("{what} vs open_clip"), &hidden(cfg), &want, 1e-4);
}

#[test]
fn the_class_and_its_clip_config_give_the_architecture() {
    let cfg = config(&yaml_with_cfg("penultimate", true, &sd_file(), ""), &[]).unwrap();
    let t = &cfg.model.cond_stage_config;
    assert_eq!(
        (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size, t.max_position_embeddings),
        (24, 3, 3, 96, 77)
    );
    assert_eq!((t.max_length, t.hidden_act, t.pad_token.as_str()), (77, HiddenAct::Gelu, "<|endoftext|>"));
    assert_eq!(t.megatron, Some(MegatronTextConfig { megatron_legacy: true, vocab_padding: 128 }));
    let clip = model_config::clip(t).unwrap();
    assert_eq!((clip.activation, clip.output), (ClipActivation::Gelu, ClipOutput::Penultimate));
    let m = model_config::megatron_clip(t).unwrap();
    assert_eq!((m.vocab_size, m.padded_vocab_size, m.num_heads, m.legacy_qkv), (909, 1024, 3, true));
    // The config that checkpoints record loads back to the same config.
    assert_eq!(Config::from_yaml_str(&cfg.to_yaml(), "written", &[]).unwrap(), cfg);
}

#[test]
fn legacy_order_under_cond_stage_model_matches_open_clip() {
    for layer in ["penultimate", "last"] {
        let cfg = config(&yaml_with_cfg(layer, true, &sd_file(), ""), &[]).unwrap();
        check_hidden(&format!("{} ({layer})", sd_file().display()), &cfg, layer);
    }
}

/// NeMo's own training checkpoint (the Megatron wrapper's `model.`), with a CLIP trained as NeMo's default CLIP
/// config trains it (`megatron_legacy: False`): q, k and v interleaved per head, gathered at load.
#[test]
fn per_head_order_under_the_megatron_wrapper_matches_open_clip() {
    let cfg = config(&yaml_with_cfg("penultimate", false, &interleaved_file(), ""), &[]).unwrap();
    check_hidden(&interleaved_file().display().to_string(), &cfg, "penultimate");
    // Read in the other order, the same file computes something else: the config's megatron_legacy is what decides.
    let wrong = config(&yaml_with_cfg("penultimate", true, &interleaved_file(), ""), &[]).unwrap();
    let want = expected().tensor("penultimate").unwrap().to_f64();
    let err = common::max_rel_err(&hidden(&wrong), &want, 1e-12);
    assert!(err > 1e-2, "the legacy order gave the per-head result (error {err:.2e})");
}

/// Both Megatron files hold, under zeroconv's names, exactly the tensors of the same model in the original SD 2
/// (OpenCLIP) layout; the vocabulary padding is left out; the legacy q/k/v borrow the file, the per-head ones are
/// gathered once.
#[test]
fn the_same_tensors_as_the_open_clip_layout() {
    let open_clip =
        Checkpoint::open_pretrained(&fixture("open_clip/sd2_text_encoder.safetensors"), &Default::default()).unwrap();
    let want: Vec<&str> = open_clip.keys().filter(|k| k.starts_with(CLIP_PREFIX)).collect();
    assert_eq!(want.len(), 2 + 2 + 3 * 16, "embeddings, final norm, 3 blocks");
    for (file, legacy) in [(sd_file(), true), (interleaved_file(), false)] {
        let cfg = config(&yaml_with_cfg("last", legacy, &file, ""), &[]).unwrap();
        let ckpt = Checkpoint::open_pretrained(&file, &model_config::architecture(&cfg)).unwrap();
        let got: Vec<&str> = ckpt.keys().filter(|k| k.starts_with(CLIP_PREFIX)).collect();
        assert_eq!(got, want, "{}", file.display());
        for key in &want {
            assert_eq!(ckpt.shape(key), open_clip.shape(key), "{key}");
            assert_eq!(ckpt.to_f32(key).unwrap(), open_clip.to_f32(key).unwrap(), "{key} in {}", file.display());
        }
        assert_eq!(ckpt.is_mapped(), legacy, "only the per-head q/k/v are gathered, {}", file.display());
        assert!(ckpt.get(&format!("{CLIP_PREFIX}.embeddings.token_embedding.weight")).unwrap().is_borrowed());
        // CLIP's projection head is kept under its own name: an unexpected key, never loaded.
        assert!(ckpt.unmapped().iter().any(|k| k.ends_with("cond_stage_model.model.head.weight")), "{file:?}");
        assert_eq!(ckpt.layouts().count(), 1, "the gathered q/k/v are not another file");
    }
}

/// `restore_from_path` (NeMo's documented SD 2 section): the CLIP `.nemo`'s `model_config.yaml` gives the
/// architecture and, without `from_pretrained`, its `model.text_encoder.*` the weights.
#[test]
fn restore_from_path_reads_the_clip_nemo() {
    let yaml = format!(
        "model:\n  cond_stage_config:\n    _target_: {CLASS}\n    restore_from_path: {}\n    device: cuda\n    \
         freeze: True\n    layer: penultimate\n    vocab_size: 909\n    tokenizer: {}\n",
        clip_nemo().display(),
        fixture("tokenizer").display()
    );
    let cfg = config(&yaml, &[]).unwrap();
    let t = &cfg.model.cond_stage_config;
    assert_eq!(t.from_pretrained.as_deref(), Some(clip_nemo().as_path()));
    assert_eq!((t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size), (24, 3, 3, 96));
    assert_eq!(t.megatron, Some(MegatronTextConfig { megatron_legacy: true, vocab_padding: 128 }));
    check_hidden("the CLIP .nemo", &cfg, "penultimate");
    let ckpt = Checkpoint::open_pretrained(&clip_nemo(), &model_config::architecture(&cfg)).unwrap();
    // CLIP's projection head is listed as unmapped; the rest of the CLIP model keeps its names (outside the text
    // encoder's prefix: unexpected for every component).
    assert_eq!(ckpt.unmapped(), ["model.text_encoder.head.weight"]);
    for key in ["model.logit_scale", "model.vision_encoder.backbone.conv1.weight"] {
        assert!(ckpt.contains(key), "{key}");
    }
    assert!(!ckpt.keys().any(|k| k.starts_with("model.text_encoder.language_model.")));
    // A from_pretrained given beside it is where the weights come from (an SD checkpoint, say).
    let with_weights = format!("{yaml}    from_pretrained: {}\n", sd_file().display());
    let cfg = config(&with_weights, &[]).unwrap();
    assert_eq!(cfg.model.cond_stage_config.from_pretrained.as_deref(), Some(sd_file().as_path()));
}

#[test]
fn configs_zeroconv_cannot_honour_are_refused_naming_the_key() {
    let base = yaml_with_cfg("penultimate", true, &sd_file(), "");
    let replace = |from: &str, to: &str| {
        assert!(base.contains(from), "{from}");
        base.replace(from, to)
    };
    for (yaml, want) in [
        (
            replace("bias_activation_fusion: False", "bias_activation_fusion: True"),
            "text.bias_activation_fusion is True",
        ),
        (replace("        bias_activation_fusion: False\n", ""), "text.bias_activation_fusion is unset"),
        (replace("openai_gelu: False", "openai_gelu: True"), "text.openai_gelu"),
        (replace("activation: gelu", "activation: swiglu"), "text.activation is swiglu"),
        (replace("normalization: layernorm", "normalization: layernorm1p"), "text.normalization"),
        (replace("layernorm_epsilon: 1e-5", "layernorm_epsilon: 1e-6"), "text.layernorm_epsilon"),
        (replace("learned_parameters", "learned_absolute"), "text.position_embedding_type"),
        (replace("kv_channels: null", "kv_channels: 16"), "text.kv_channels is 16"),
        (replace("        megatron_legacy: True\n", ""), "text.megatron_legacy is required"),
        (replace("library: huggingface", "library: sentencepiece"), "tokenizer.library"),
        (replace("restore_from_path: null", &format!("restore_from_path: {}", clip_nemo().display())), "both"),
        (replace("layer: penultimate", "layer: hidden"), "only last and penultimate"),
        (replace("vocab_size: 909", "vocab_size: 909\n    arch: ViT-H-14"), "arch: ViT-H-14 is an OpenCLIP"),
        (replace("vocab_size: 909", "vocab_size: 909\n    hidden_size: 32"), "hidden_size is 32, but"),
        (replace("vocab_size: 909", "vocab_size: 909\n    always_return_pooled: true"), "always_return_pooled"),
    ] {
        let err = config(&yaml, &[]).unwrap_err();
        assert!(err.contains(want) && err.contains("megatron_sd.yaml:"), "{want}: {err}");
    }
    let cut = base.find("    cfg:\n").unwrap();
    let err = config(&base[..cut], &[]).unwrap_err();
    assert!(err.contains("needs restore_from_path") && err.contains("model.cond_stage_config"), "{err}");
    let missing = format!(
        "{}    restore_from_path: /nonexistent/clip.nemo\n",
        &base[..cut].replace("    restore_from_path: null\n", "")
    );
    let err = config(&missing, &[]).unwrap_err();
    assert!(
        err.contains("model.cond_stage_config.restore_from_path") && err.contains("/nonexistent/clip.nemo"),
        "{err}"
    );
}

/// Writes the legacy fixture with `key` dropped or replaced by a zero tensor of `shape` (a malformed file).
fn sd_with(dir: &Path, key: &str, shape: Option<Vec<usize>>) -> PathBuf {
    let raw = Checkpoint::open(&sd_file()).unwrap();
    let mut tensors: Vec<(String, TensorView<'static>)> = Vec::new();
    for k in raw.keys().filter(|k| *k != key) {
        tensors.push((k.to_string(), raw.tensor(k).unwrap().into_owned()));
    }
    if let Some(shape) = shape {
        let n: usize = shape.iter().product::<usize>() * 4;
        let dtype = zeroconv::graph::DType::F32;
        tensors.push((key.to_string(), TensorView::new(shape, dtype, Cow::Owned(vec![0; n])).unwrap()));
    }
    let path = dir.join("bad_megatron_clip.safetensors");
    write_safetensors(&path, &tensors, None).unwrap();
    path
}

#[test]
fn malformed_files_are_one_clear_error_naming_the_key() {
    let dir = common::training::tmp("megatron-clip-bad");
    let cfg = config(&yaml_with_cfg("penultimate", false, &sd_file(), ""), &[]).unwrap();
    let arch = model_config::architecture(&cfg);
    let qkv = "cond_stage_model.model.language_model.encoder.layers.1.self_attention.query_key_value.weight";
    let path = sd_with(dir.path(), qkv, None);
    let err = Checkpoint::open_pretrained(&path, &arch).unwrap_err().to_string();
    assert!(err.contains(qkv) && err.contains(&path.display().to_string()) && err.contains("no tensor"), "{err}");
    // Not [3d, d]; a 1-D weight; rows that the 3 heads do not divide into q, k and v.
    for shape in [vec![71, 24], vec![72, 23], vec![72], vec![75, 25]] {
        let path = sd_with(dir.path(), qkv, Some(shape.clone()));
        let err = Checkpoint::open_pretrained(&path, &arch).unwrap_err().to_string();
        assert!(err.contains(qkv) && err.contains("[3d, d]"), "{shape:?}: {err}");
    }
    let lora = "cond_stage_model.model.language_model.encoder.layers.0.self_attention.adapter_layer.lora.weight";
    let path = sd_with(dir.path(), lora, Some(vec![4, 24]));
    let err = Checkpoint::open_pretrained(&path, &arch).unwrap_err().to_string();
    assert!(err.contains(lora) && err.contains("does not have"), "{err}");
    // A vocabulary the config does not describe: the padded rows do not match.
    let other_vocab =
        config(&yaml_with_cfg("penultimate", true, &sd_file(), ""), &["model.cond_stage_config.vocab_size=1100"]);
    let err = Checkpoint::open_pretrained(&sd_file(), &model_config::architecture(&other_vocab.unwrap()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("word_embeddings.weight") && err.contains("1100 tokens") && err.contains("1152 rows"),
        "{err}"
    );
    // A run whose config is not a Megatron CLIP cannot guess the row order: refused, saying what to set.
    let err = Checkpoint::open_pretrained(&sd_file(), &Architecture::default()).unwrap_err().to_string();
    assert!(err.contains("FrozenMegatronCLIPEmbedder") && err.contains(&sd_file().display().to_string()), "{err}");
}

/// `zeroconv sample`'s loader (`app::sampler::load_weights`) reads a Megatron tower with the config's details, as
/// training does: with the per-head file, the text encoder's tensors are the ones the training loader maps (the
/// U-Net and ControlNet of a tiny pixel-space model come from a second, LDM-named file); without those details the
/// same file is refused, naming what to set.
#[test]
fn sampling_loads_the_megatron_text_tower_as_training_does() {
    let mut overrides = vec!["model.first_stage_config.kind=pixel".to_string()];
    for section in ["unet_config", "control_stage_config"] {
        for kv in [
            "image_size=8",
            "in_channels=3",
            "model_channels=32",
            "channel_mult=[1]",
            "attention_resolutions=[1]",
            "num_res_blocks=1",
            "num_heads=2",
            "context_dim=24",
        ] {
            overrides.push(format!("model.{section}.{kv}"));
        }
    }
    overrides.push("model.unet_config.out_channels=3".into());
    let overrides: Vec<&str> = overrides.iter().map(String::as_str).collect();
    let cfg = config(&yaml_with_cfg("penultimate", false, &interleaved_file(), ""), &overrides).unwrap();
    let models = zeroconv::app::train::step_models(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let specs = zeroconv::app::sampler::sampling_params(&models).unwrap();
    let dir = tempfile::Builder::new().prefix("zeroconv-megatron-sample-").tempdir().unwrap();
    let unet_file = dir.path().join("unet_and_controlnet.safetensors");
    let mut rng = common::Rng::new(7);
    let tensors: Vec<(String, zeroconv::engine::HostTensor)> = specs
        .iter()
        .filter(|s| !s.key.starts_with(CLIP_PREFIX))
        .map(|s| {
            let data: Vec<f64> = (0..s.shape.numel()).map(|_| (rng.uniform() - 0.5) * 0.1).collect();
            let t = zeroconv::engine::HostTensor::from_f64(s.shape.clone(), zeroconv::graph::DType::F32, &data);
            (s.key.clone(), t.unwrap())
        })
        .collect();
    write_safetensors(&unet_file, &tensors, None).unwrap();
    let megatron = model_config::megatron_clip(&cfg.model.cond_stage_config);
    assert!(megatron.is_some(), "the config names a Megatron CLIP");
    let clip_file = interleaved_file();
    let files = [unet_file.as_path(), clip_file.as_path()];
    let store = zeroconv::app::sampler::load_weights(&models, megatron.as_ref(), &files)
        .unwrap_or_else(|e| panic!("sampling's loader: {e}"));
    let trained = Checkpoint::open_pretrained(&interleaved_file(), &model_config::architecture(&cfg)).unwrap();
    let clip_keys: Vec<&str> =
        specs.iter().filter(|s| s.key.starts_with(CLIP_PREFIX)).map(|s| s.key.as_str()).collect();
    assert!(!clip_keys.is_empty());
    for key in clip_keys {
        let got = store.tensors.get(key).unwrap_or_else(|| panic!("{key} not loaded"));
        let want: Vec<f64> = trained.to_f32(key).unwrap().into_iter().map(f64::from).collect();
        assert_eq!(got.to_f64(), want, "{key}");
    }
    let err = zeroconv::app::sampler::load_weights(&models, None, &files).err().expect("refused").to_string();
    assert!(err.contains(&interleaved_file().display().to_string()), "{err}");
}
