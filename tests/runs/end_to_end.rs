//! One training run on the real data path, through the binary as a user runs it: shards written by `zeroconv
//! dataset make` from image/control/caption folders, the frozen U-Net and CLIP text encoder loaded from a diffusers
//! pipeline folder (the layout fixtures diffusers and transformers wrote, tests/fixtures/layouts/) with its
//! tokenizer, a KL VAE with SD's factor 8 (the hint encoder downsamples by 8, so the fixtures' factor-2 VAE cannot
//! serve) from an LDM-layout file, three optimizer steps, and the exported ControlNet (as trained, and exported to the diffusers
//! layout by `zeroconv export`) loaded back by `zeroconv sample`.

use crate::common;
use common::cli::{run_fails as zeroconv_fails, run_ok as zeroconv};
use common::layout_fixtures::{copy_folder, rebuild};
use common::training::tmp;

use std::path::Path;
use zeroconv::engine::HostTensor;
use zeroconv::graph::DType;
use zeroconv::io::checkpoint::write_safetensors;
use zeroconv::models::{counts, VaeConfig};

/// A CLIP BPE vocabulary that fits the tiny text encoder's 100 embeddings: letters (word-final too), two merges,
/// filler, and the start and end tokens at 98 and 99 (the fixture's `bos_token_id`/`eos_token_id`).
fn write_tiny_tokenizer(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut tokens: Vec<String> = ('a'..='z').map(String::from).collect();
    tokens.extend(('a'..='z').map(|c| format!("{c}</w>")));
    tokens.extend(["re".to_string(), "red</w>".to_string()]);
    while tokens.len() < 98 {
        tokens.push(format!("unused{}</w>", tokens.len()));
    }
    tokens.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::json!(i))).collect();
    std::fs::write(dir.join("vocab.json"), serde_json::to_string(&vocab).unwrap()).unwrap();
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\nr e\nre d</w>\n").unwrap();
}

/// A 4-level KL VAE (factor 8, like SD's, at 32 channels) in the LDM layout, with the parity generator's weights.
fn write_vae(path: &Path) {
    let cfg = VaeConfig { ch: 32, ch_mult: vec![1, 1, 1, 1], num_res_blocks: 1, resolution: 64, ..Default::default() };
    let tensors: Vec<(String, HostTensor)> = counts::vae_params(&cfg)
        .unwrap()
        .into_iter()
        .map(|s| {
            let v: Vec<f64> = common::parity_weights(&s.key, s.shape.dims()).iter().map(|&v| v as f64).collect();
            (s.key.clone(), HostTensor::from_f64(s.shape.dims().to_vec(), DType::F32, &v).unwrap())
        })
        .collect();
    write_safetensors(path, &tensors, None).unwrap();
}

/// Six samples in `make`'s folder layout: a coloured JPEG, its PNG control map and a caption.
fn write_inputs(dir: &Path) {
    for sub in ["images", "controls", "captions"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    for i in 0..6u8 {
        let (w, h) = (40 + 4 * i as u32, 40);
        let colour = [40 * i, 255 - 40 * i, 128];
        let image = image::RgbImage::from_fn(w, h, |x, y| {
            if (x as i32 - 20).abs() < 10 && (y as i32 - 20).abs() < 10 {
                image::Rgb(colour)
            } else {
                image::Rgb([250, 250, 250])
            }
        });
        image.save(dir.join(format!("images/{i}.jpg"))).unwrap();
        let control = image::GrayImage::from_fn(w, h, |x, y| {
            image::Luma([if (x as i32 - 20).abs() == 9 || (y as i32 - 20).abs() == 9 { 255 } else { 0 }])
        });
        control.save(dir.join(format!("controls/{i}.png"))).unwrap();
        let caption = if i % 2 == 0 { "a red square" } else { "a blue square" };
        std::fs::write(dir.join(format!("captions/{i}.txt")), caption).unwrap();
    }
}

/// The tiny parity architectures (tests/fixtures/parity/README.md) as a NeMo-style config: the U-Net and
/// ControlNet of `sd15_tiny` and the 2-layer CLIP of `clip_tiny`, read from the pipeline folder `pipe/`, and the
/// VAE of [`write_vae`] from `vae.safetensors` (64-pixel crops give 8x8 latents).
fn config(shards: &[String]) -> String {
    let unet = "
    image_size: 8
    in_channels: 4
    model_channels: 32
    attention_resolutions: [2, 1]
    num_res_blocks: 1
    channel_mult: [1, 2]
    num_heads: 2
    use_spatial_transformer: True
    transformer_depth: 1
    context_dim: 32
    use_linear_in_transformer: False
    legacy: False";
    format!(
        "trainer:
  devices: 1
  num_nodes: 1
  precision: 32
  max_steps: 3
  log_every_n_steps: 1
exp_manager:
  checkpoint_callback_params:
    every_n_train_steps: 3
model:
  micro_batch_size: 2
  global_batch_size: 2
  base_pretrain_steps: 0
  scale_factor: 0.18215
  unet_config:
    from_pretrained: pipe
    out_channels: 4{unet}
  control_stage_config:
    hint_channels: 3{unet}
  first_stage_config:
    kind: autoencoder_kl
    from_pretrained: vae.safetensors
    embed_dim: 4
    ddconfig:
      z_channels: 4
      resolution: 64
      ch: 32
      ch_mult: [1, 1, 1, 1]
      num_res_blocks: 1
  cond_stage_config:
    version: pipe
    from_pretrained: pipe
    max_length: 16
    vocab_size: 100
    hidden_size: 32
    intermediate_size: 64
    num_hidden_layers: 2
    num_attention_heads: 4
    max_position_embeddings: 16
  data:
    num_workers: 1
    train:
      dataset_path: [{}]
      augmentations:
        resize_smallest_side: 64
        center_crop_h_w: 64, 64
",
        shards.join(", ")
    )
}

#[test]
fn shards_from_dataset_make_train_against_a_diffusers_pipeline_and_the_export_samples() {
    let d = tmp("end-to-end");
    let dir = d.path();
    write_inputs(&dir.join("inputs"));
    let made = zeroconv(dir, &["dataset", "make", "inputs", "--output", "shards/part-%02d.tar", "--maxcount", "4"]);
    let shards = ["shards/part-00.tar".to_string(), "shards/part-01.tar".to_string()];
    for s in &shards {
        assert!(dir.join(s).is_file(), "dataset make wrote no {s}: {made}");
    }
    let checked = zeroconv(dir, &["dataset", "check", &shards[0], &shards[1]]);
    assert!(checked.contains("samples: 6 usable, 0 bad"), "{checked}");

    let pipe = dir.join("pipe");
    rebuild("sd15_tiny/unet", &pipe);
    write_vae(&dir.join("vae.safetensors"));
    copy_folder("clip_tiny/text_encoder", &pipe, "text_encoder");
    write_tiny_tokenizer(&pipe.join("tokenizer"));
    std::fs::write(dir.join("e2e.yaml"), config(&shards)).unwrap();

    // NeMo reads diffusers names only with from_NeMo: False; True with this folder is refused, naming both.
    let refused =
        zeroconv_fails(dir, &["train", "--config", "e2e.yaml", "--out", "refused", "model.unet_config.from_NeMo=True"]);
    assert!(refused.contains("from_NeMo") && refused.contains("unet/diffusion_pytorch_model.safetensors"), "{refused}");
    assert!(!dir.join("refused").exists(), "a run refused for its weights leaves no run folder behind");

    let trained = zeroconv(dir, &["train", "--config", "e2e.yaml", "--out", "run", "--threads", "2", "--no-eval"]);
    // Where each component came from: the pipeline folder's files, the ControlNet copied from the U-Net.
    for (component, file) in [("U-Net", "pipe"), ("VAE (first stage)", "vae.safetensors"), ("text encoder", "pipe")] {
        let named =
            trained.lines().any(|l| l.trim_start().starts_with(component) && l.ends_with(&format!("from {file}")));
        assert!(named, "the weight-source table does not say the {component} came from {file}:\n{trained}");
    }
    assert!(!trained.to_lowercase().contains("random"), "no frozen weight may be random:\n{trained}");

    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("loss").and_then(|l| l.as_f64()))
        .collect();
    assert_eq!(losses.len(), 3, "one logged loss per step:\n{metrics}");
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
    assert!(dir.join("run/checkpoints").read_dir().unwrap().count() > 0, "no checkpoint written");

    // The exported ControlNet drives sampling with the same pipeline folder, and so does its diffusers export.
    image::GrayImage::from_pixel(64, 64, image::Luma([255])).save(dir.join("hint.png")).unwrap();
    // `--ckpt` names the weight files (repeatable); without it, the config's `from_pretrained` files.
    let sample = |weights: &[&str], control: &str, out: &str| {
        let mut args = vec!["sample", "--config", "e2e.yaml", "--control", control, "--hint", "hint.png"];
        args.extend(["--prompt", "a red square", "--steps", "2", "--threads", "2", "--out", out]);
        args.extend(weights.iter().flat_map(|w| ["--ckpt", *w]));
        let printed = zeroconv(dir, &args);
        let grid = image::open(dir.join(out)).unwrap_or_else(|e| panic!("{e}\n{printed}"));
        assert_eq!((grid.width(), grid.height()), (2 * 64, 64), "the hint, then one image");
        std::fs::read(dir.join(out)).unwrap()
    };
    let from_ldm = sample(&["pipe", "vae.safetensors"], "run/controlnet.safetensors", "ldm.png");
    let exported = zeroconv(
        dir,
        &["export", "--config", "e2e.yaml", "--from", "run/controlnet.safetensors", "--out", "cn-diffusers"],
    );
    assert!(dir.join("cn-diffusers/config.json").is_file(), "{exported}");
    assert!(from_ldm == sample(&[], "cn-diffusers", "diffusers.png"), "the diffusers export samples differently");
}
