//! Config loading: the shipped configs, the benchmark config, NeMo compatibility, overrides, and the
//! errors a user sees for mistakes.

use std::path::{Path, PathBuf};

use zeroconv::io::config::{
    load_config, load_config_with_report, Accelerator, ClipLayer, Config, CropSize, OptimizerName, Precision,
    SchedulerName, IGNORED_KEYS,
};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn overrides(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn sd15(list: &[&str]) -> zeroconv::Result<Config> {
    load_config(Some(&repo("configs/controlnet_sd15.yaml")), &overrides(list))
}

fn sd15_err(list: &[&str]) -> String {
    sd15(list).err().unwrap_or_else(|| panic!("{list:?} should be refused")).to_string()
}

/// Loads YAML text (named `test.yaml` in errors) and returns the error message.
fn yaml_err(text: &str) -> String {
    Config::from_yaml_str(text, "test.yaml", &[])
        .err()
        .unwrap_or_else(|| panic!("should be refused:\n{text}"))
        .to_string()
}

#[test]
fn sd15_config_is_the_full_sd15_controlnet() {
    let (c, report) =
        load_config_with_report(Some(&repo("configs/controlnet_sd15.yaml")), &[]).expect("controlnet_sd15.yaml");
    let u = &c.model.unet_config;
    assert_eq!((u.model_channels, u.num_res_blocks, u.context_dim), (320, 2, 768));
    assert_eq!(u.channel_mult, vec![1, 2, 4, 4]);
    assert_eq!(u.attention_resolutions, vec![4, 2, 1]);
    assert_eq!((u.num_heads, u.num_head_channels), (Some(8), None));
    assert!(u.use_spatial_transformer && !u.use_linear_in_transformer && !u.legacy);
    // The ControlNet's keys sit in NeMo's `params:` wrapper.
    let cn = &c.model.control_stage_config;
    assert_eq!((cn.hint_channels, cn.model_channels, cn.context_dim), (3, 320, 768));
    assert_eq!(cn.channel_mult, vec![1, 2, 4, 4]);
    let vae = &c.model.first_stage_config;
    assert_eq!((vae.embed_dim, vae.ddconfig.ch, vae.ddconfig.z_channels, vae.ddconfig.num_res_blocks), (4, 128, 4, 2));
    assert_eq!(vae.ddconfig.ch_mult, vec![1, 2, 4, 4]);
    assert!(vae.ddconfig.double_z && vae.ddconfig.attn_resolutions.is_empty());
    let clip = &c.model.cond_stage_config;
    assert_eq!((clip.version.as_str(), clip.max_length, clip.hidden_size), ("openai/clip-vit-large-patch14", 77, 768));
    assert_eq!((clip.layer, clip.pad_token.as_str()), (ClipLayer::Last, "<|endoftext|>"));
    assert_eq!(c.trainer.precision, Precision::Bf16Mixed);
    assert_eq!(c.trainer.accelerator, Accelerator::Gpu);
    assert_eq!(
        (c.trainer.max_steps, c.trainer.max_epochs, c.trainer.gradient_clip_val),
        (Some(20000), None, Some(1.0))
    );
    assert_eq!((c.model.scale_factor, c.model.linear_start, c.model.linear_end), (0.18215, 0.00085, 0.012));
    assert_eq!(c.model.optim.name, OptimizerName::AdamW);
    assert_eq!((c.model.optim.lr, c.model.optim.weight_decay, c.model.optim.betas), (1e-5, 0.0, [0.9, 0.999]));
    let sched = c.model.optim.sched.as_ref().expect("sched");
    assert_eq!(
        (sched.name, sched.warmup_steps, sched.hold_steps),
        (SchedulerName::WarmupHoldPolicy, Some(0), Some(10_000_000_000_000))
    );
    assert_eq!(c.model.data.train.augmentations.center_crop_h_w, Some(CropSize { height: 512, width: 512 }));
    assert_eq!(c.exp_manager.checkpoint_callback_params.save_top_k, Some(3));
    // `resume_from_checkpoint: ${model.resume_from_checkpoint}` resolved to null.
    assert_eq!(c.resume_checkpoint(), None);
    assert_eq!((c.global_batch_size(), c.grad_accumulation()), (4, 1));
    // NeMo keys accepted without being read, reported for a verbose log.
    for key in ["model.parameterization", "exp_manager.ema", "model.control_stage_config._target_", "trainer.logger"] {
        assert!(report.ignored_keys.iter().any(|k| k == key), "{key} not reported in {:?}", report.ignored_keys);
    }
}

#[test]
fn tiny_config_is_built_in_and_tiny() {
    let built_in = Config::builtin_tiny();
    assert_eq!(load_config(None, &[]).unwrap(), built_in);
    assert_eq!(load_config(Some(&repo("configs/tiny.yaml")), &[]).unwrap(), built_in);
    let m = &built_in.model;
    assert!(m.unet_config.model_channels <= 32 && m.unet_config.channel_mult.len() <= 2);
    assert!(m.unet_config.context_dim <= 64 && m.cond_stage_config.hidden_size == m.unet_config.context_dim);
    // Images 128x128 through the weightless 8x block-average first stage: 16x16 latents of 3 channels.
    let crop = m.data.train.augmentations.center_crop_h_w.expect("crop");
    assert_eq!(m.first_stage_config.kind, zeroconv::io::config::FirstStageKind::Pixel);
    assert_eq!((crop.height / 8, m.unet_config.image_size, m.unet_config.in_channels), (16, 16, 3));
    assert_eq!(m.cond_stage_config.version, "builtin:shapes");
    assert!(m.data.synthetic_data, "trains without files");
    assert_eq!(built_in.trainer.precision, Precision::F32);
    // Overrides apply to the built-in config too.
    let c = load_config(None, &overrides(&["trainer.max_steps=5"])).unwrap();
    assert_eq!(c.trainer.max_steps, Some(5));
}

/// The benchmark config is kept in the repository so the suite needs nothing beside it; where the shared copy that
/// the PyTorch reference reads (`../shared/bench/bench_small.yaml`) is present too, the two must be identical.
#[test]
fn bench_config_matches_the_shared_copy_when_present() {
    // The benchmark's two halves: zeroconv's config and the PyTorch step scripts/bench-vs-torch runs beside it.
    for (ours, name) in
        [("configs/bench_small.yaml", "bench_small.yaml"), ("scripts/bench/torch_bench.py", "torch_bench.py")]
    {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mine = std::fs::read_to_string(root.join(ours)).expect(ours);
        // The project's shared folder sits beside the repository; CI may lay it there, a user's clone never has it.
        let shared = root.parent().map(|p| p.join("shared").join("bench").join(name)).unwrap_or_default();
        match std::fs::read_to_string(&shared) {
            Ok(theirs) => {
                assert_eq!(mine, theirs, "{ours} differs from {}: copy the shared one over it", shared.display())
            }
            Err(e) => {
                println!("no shared copy to compare with ({}: {e}); the in-repo {ours} is used", shared.display())
            }
        }
    }
}

#[test]
fn bench_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/bench_small.yaml");
    let c = load_config(Some(&path), &[]).expect("bench_small.yaml");
    let u = &c.model.unet_config;
    assert_eq!((u.model_channels, u.context_dim, u.num_res_blocks, u.num_heads), (64, 128, 1, Some(4)));
    assert_eq!((u.channel_mult.clone(), u.attention_resolutions.clone()), (vec![1, 2, 2], vec![4, 2]));
    assert_eq!((c.model.control_stage_config.hint_channels, c.model.micro_batch_size), (3, 2));
    assert_eq!((c.model.optim.name, c.model.optim.lr), (OptimizerName::AdamW, 1e-5));
    assert_eq!((c.trainer.precision, c.model.sd_locked, c.model.only_mid_control), (Precision::F32, true, false));
    assert_eq!(c.model.control_key, "hint");
}

#[test]
fn nemo_inference_config_loads_unchanged() {
    // The shape of NeMo's controlnet_infer.yaml.
    let text = "\
name: stable-diffusion-train
infer:
  unconditional_guidance_scale: 3
  num_images_per_prompt: 4
  hint_image_size: 512
  height: 512
  width: 512
  down_factor: 8
  inference_steps: 50
  sampler_type: 'DDIM'
  eta: 0
  output_type: 'pil'
  save_to_file: True
  out_path: 'controlnet'
  seed: 355
  prompts:
    - high quality picture of a house in oil painting style
  control:
    - /datasets/house.png
  control_image_preprocess:
trainer:
  devices: 1
  num_nodes: 1
  accelerator: gpu
  precision: 16
  logger: False
model:
  restore_from_path: /ckpts/controlnet/30k.nemo
  precision: ${trainer.precision}
  strength: 2.0
  guess_mode: False
";
    let c = Config::from_yaml_str(text, "controlnet_infer.yaml", &[]).expect("NeMo inference config");
    assert_eq!((c.infer.unconditional_guidance_scale, c.infer.num_images_per_prompt, c.infer.seed), (3.0, 4, 355));
    assert_eq!(c.infer.prompts, vec!["high quality picture of a house in oil painting style".to_string()]);
    assert_eq!(c.infer.control, vec![PathBuf::from("/datasets/house.png")]);
    assert_eq!(c.model.restore_from_path, Some(PathBuf::from("/ckpts/controlnet/30k.nemo")));
    assert_eq!((c.model.strength, c.trainer.precision), (2.0, Precision::F16Mixed));
}

#[test]
fn legacy_ldm_target_params_wrappers_unwrap() {
    let text = "\
model:
  unet_config:
    target: ldm.modules.diffusionmodules.openaimodel.UNetModel
    params:
      model_channels: 64
      channel_mult: [1, 2]
      attention_resolutions: [2]
      context_dim: 128
  control_stage_config:
    target: cldm.cldm.ControlNet
    params:
      model_channels: 64
      channel_mult: [1, 2]
      attention_resolutions: [2]
      context_dim: 128
";
    let c = Config::from_yaml_str(
        text,
        "ldm.yaml",
        &overrides(&["model.unet_config.params.num_heads=4", "model.control_stage_config.num_heads=4"]),
    )
    .expect("LDM-style config");
    assert_eq!((c.model.unet_config.model_channels, c.model.unet_config.num_heads), (64, Some(4)));
    let twice = yaml_err(
        "model:\n  unet_config:\n    _target_: x\n    model_channels: 64\n    params:\n      model_channels: 32\n",
    );
    assert!(twice.contains("test.yaml:6:7: model.unet_config.model_channels is given twice"), "{twice}");
}

#[test]
fn overrides_parse_yaml_scalars_and_lists() {
    let c = sd15(&[
        "model.sd_locked=False",
        "model.only_mid_control=yes",
        "trainer.precision=bf16",
        "trainer.max_steps=-1",
        "trainer.max_epochs=10",
        "model.optim.lr=2.5e-4",
        "model.optim.betas=[0.8, 0.99]",
        "model.data.train.dataset_path=[a.tar,b.tar]",
        "model.data.train.augmentations.center_crop_h_w='256, 384'",
        "model.cond_stage_config.pad_token='!'",
        "exp_manager.name=\"my run\"",
        "exp_manager.exp_dir=null",
        "model.global_batch_size=8",
    ])
    .expect("overrides");
    assert!(!c.model.sd_locked && c.model.only_mid_control);
    assert_eq!(
        (c.trainer.precision, c.trainer.max_steps, c.trainer.max_epochs),
        (Precision::Bf16Mixed, None, Some(10))
    );
    assert_eq!((c.model.optim.lr, c.model.optim.betas), (2.5e-4, [0.8, 0.99]));
    assert_eq!(c.model.data.train.dataset_path, vec![PathBuf::from("a.tar"), PathBuf::from("b.tar")]);
    assert_eq!(c.model.data.train.augmentations.center_crop_h_w, Some(CropSize { height: 256, width: 384 }));
    assert_eq!((c.model.cond_stage_config.pad_token.as_str(), c.exp_manager.name.as_str()), ("!", "my run"));
    assert_eq!((c.global_batch_size(), c.grad_accumulation()), (8, 2));
    // Later overrides win; `~key` restores the default; `++` sets whether or not the key exists.
    let c = sd15(&[
        "trainer.devices=2",
        "trainer.devices=4",
        "~model.global_batch_size",
        "~trainer.precision",
        "++model.seed=7",
        "++model.data.seed=9",
    ])
    .unwrap();
    assert_eq!((c.trainer.devices, c.trainer.precision, c.model.seed, c.data_seed()), (4, Precision::F32, 7, 9));
    assert_eq!((c.global_batch_size(), c.grad_accumulation()), (16, 1));
    // Interpolations see overridden values: model.precision and exp_manager's resume path follow.
    let c = sd15(&["model.resume_from_checkpoint=/runs/a/last.ckpt"]).unwrap();
    assert_eq!(c.exp_manager.resume_from_checkpoint, Some(PathBuf::from("/runs/a/last.ckpt")));
    // `+key=value` adds a key the file does not set; `~key=value` deletes when the value matches.
    assert_eq!(sd15(&["+model.data.shuffle_buffer=64"]).unwrap().model.data.shuffle_buffer, 64);
    assert_eq!(sd15(&["~trainer.devices=1"]).unwrap().trainer.devices, 1);
}

#[test]
fn bad_override_syntax_is_one_clear_error() {
    let cases: &[(&str, &str)] = &[
        ("model.sd_locked", "expected key=value"),
        ("=3", "the key is empty"),
        ("model..sd_locked=1", "empty name between dots"),
        ("model.sd locked=1", "unexpected character ' '"),
        ("model.data.train.dataset_path=a.tar,b.tar", "write a list as [a.tar,b.tar]"),
        ("model.data.train.dataset_path=[a.tar,b.tar", "invalid value `[a.tar,b.tar`"),
        ("model.unet@pkg=1", "package overrides"),
        ("+trainer.devices=2", "trainer.devices is already set (to 1 at "),
        ("~model.nothing_here", "model.nothing_here is not in the config"),
        ("~trainer.devices=3", "trainer.devices is 1 (at "),
        ("trainer.devices.count=2", "trainer.devices is a scalar, not a section"),
    ];
    for (text, expected) in cases {
        let err = sd15_err(&[text]);
        assert!(err.starts_with(&format!("override `{text}`: ")), "{text}: {err}");
        assert!(err.contains(expected), "{text}: expected {expected:?} in: {err}");
    }
}

#[test]
fn unknown_keys_name_the_path_and_suggest() {
    let err = yaml_err("model:\n  unet_config:\n    model_chanels: 320\n");
    assert_eq!(err, "test.yaml:3:5: unknown key model.unet_config.model_chanels (did you mean model_channels?)");
    let err = sd15_err(&["model.unet_config.model_chanels=3"]);
    assert_eq!(
        err,
        "override `model.unet_config.model_chanels=3`: unknown key model.unet_config.model_chanels (did you mean \
         model_channels?)"
    );
    // A new key is refused, `+` or not; the suggestion may be a NeMo key zeroconv ignores.
    let err = sd15_err(&["+model.parametrization=eps"]);
    assert!(err.ends_with("unknown key model.parametrization (did you mean parameterization?)"), "{err}");
    // No close match: the valid keys of that section are listed.
    let err = yaml_err("trainer:\n  zzz: 1\n");
    assert!(err.starts_with("test.yaml:2:3: unknown key trainer.zzz (keys here: devices, num_nodes,"), "{err}");
    let err = yaml_err("modle:\n  sd_locked: False\n");
    assert!(err.contains("unknown key modle (did you mean model?)"), "{err}");
    let err = yaml_err("defaults:\n  - base\n");
    assert!(err.contains("Hydra `defaults` lists"), "{err}");
}

#[test]
fn wrong_types_name_the_path_and_line() {
    let cases: &[(&str, &str)] = &[
        (
            "model:\n  micro_batch_size: four\n",
            "test.yaml:2:21: model.micro_batch_size: expected an integer, found four",
        ),
        (
            "model:\n  sd_locked: maybe\n",
            "test.yaml:2:14: model.sd_locked: expected a boolean (True or False), found maybe",
        ),
        ("model:\n  optim:\n    lr: fast\n", "test.yaml:3:9: model.optim.lr: expected a number, found fast"),
        ("model:\n  optim:\n    betas: [0.9]\n", "model.optim.betas: expected an array of length 2, found a list of 1"),
        (
            "model:\n  unet_config:\n    channel_mult: 4\n",
            "model.unet_config.channel_mult: expected a list like [1, 2], found 4",
        ),
        (
            "model:\n  unet_config:\n    channel_mult: [1, x]\n",
            "test.yaml:3:23: model.unet_config.channel_mult[1]: expected an integer, found x",
        ),
        ("model:\n  unet_config: 5\n", "model.unet_config: expected a section of `key: value` lines, found a scalar"),
        ("model:\n  micro_batch_size: -2\n", "model.micro_batch_size: invalid value integer `-2`, expected u32"),
        (
            "model:\n  optim:\n    name: adamx\n",
            "model.optim.name: unknown value `adamx` (did you mean adamw?); expected one of adamw, adam, fused_adam",
        ),
        ("trainer:\n  precision: 64\n", "trainer.precision: unknown precision `64`"),
        ("trainer:\n  precision: bf16-true\n", "use bf16-mixed"),
        ("trainer:\n  max_steps: -5\n", "trainer.max_steps: expected a non-negative integer, or -1 for none, found -5"),
        (
            "model:\n  data:\n    train:\n      augmentations:\n        center_crop_h_w: 512 x 512\n",
            "expected a crop size",
        ),
        ("model:\n  control_key: null\n", "model.control_key: expected a string, found null"),
        (
            "model:\n  seed: ${trainer.sed}\n",
            "test.yaml:2:9: model.seed: interpolation `${trainer.sed}`: trainer.sed is not in the config",
        ),
    ];
    for (text, expected) in cases {
        let err = yaml_err(text);
        assert!(err.contains(expected), "expected {expected:?} in: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn ignored_nemo_keys_are_checked_against_what_zeroconv_implements() {
    // Anything goes for keys with no effect.
    let c = sd15(&["model.log_every_t=7", "trainer.benchmark=True", "model.nsys_profile.enabled=True"]);
    assert!(c.is_ok(), "{:?}", c.err());
    // Keys whose other values would change training are accepted only at the value zeroconv implements.
    let cases: &[(&str, &str)] = &[
        ("model.parameterization=v", "model.parameterization is v, but zeroconv accepts only eps here"),
        ("model.loss_type=l1", "accepts only l2"),
        ("model.use_ema=True", "model.use_ema is True, but zeroconv accepts only false"),
        ("exp_manager.ema.enable=True", "exp_manager.ema.enable is True"),
        ("model.ckpt_path=/x.ckpt", "load weights with unet_config.from_pretrained"),
        ("model.l_simple_weight=2", "accepts only 1"),
    ];
    for (text, expected) in cases {
        let err = sd15_err(&[text]);
        assert!(err.contains(expected), "{text}: expected {expected:?} in: {err}");
    }
    // The value check sees through the file too (0.0 and 0 are the same number).
    assert!(Config::from_yaml_str("model:\n  original_elbo_weight: 0.0\n", "t.yaml", &[]).is_ok());
    let err = yaml_err("model:\n  beta_schedule: cosine\n");
    assert!(err.starts_with("test.yaml:2:18: model.beta_schedule is cosine"), "{err}");
}

#[test]
fn cross_key_checks() {
    let err = sd15_err(&["model.control_stage_config.model_channels=64"]);
    assert!(
        err.contains(
            "model.control_stage_config.model_channels: 64 differs from model.unet_config.model_channels (320)"
        ),
        "{err}"
    );
    let err = sd15_err(&["model.global_batch_size=6"]);
    assert!(err.contains("model.global_batch_size: 6 is not a multiple of"), "{err}");
    let err = sd15_err(&["model.global_batch_size=8", "trainer.accumulate_grad_batches=2"]);
    assert!(err.contains("trainer.accumulate_grad_batches: must stay 1"), "{err}");
    let err = sd15_err(&["model.unet_config.model_channels=48", "model.control_stage_config.model_channels=48"]);
    assert!(err.contains("multiple of 32"), "{err}");
    let err = sd15_err(&[
        "model.unet_config.attention_resolutions=[16]",
        "model.control_stage_config.attention_resolutions=[16]",
    ]);
    assert!(err.contains("16 matches no level"), "{err}");
    let err = sd15_err(&["model.cond_stage_config.layer=hidden"]);
    assert!(err.contains("layer: hidden needs a layer_idx"), "{err}");
    let ok = sd15(&["model.cond_stage_config.layer=hidden", "model.cond_stage_config.layer_idx=-2"]).unwrap();
    assert_eq!(ok.model.cond_stage_config.layer_idx, Some(-2));
    let err = sd15_err(&["model.resume_from_checkpoint=/a.ckpt", "exp_manager.resume_from_checkpoint=/b.ckpt"]);
    assert!(err.contains("differs from model.resume_from_checkpoint"), "{err}");
    // The file position of the offending key is given when it comes from the file.
    let err = yaml_err("model:\n  micro_batch_size: 0\n");
    assert_eq!(err, "test.yaml:2:21: model.micro_batch_size: must be at least 1");
}

#[test]
fn written_config_loads_back_the_same() {
    for config in [
        sd15(&[]).unwrap(),
        Config::builtin_tiny(),
        sd15(&["model.optim.sched=null", "trainer.val_check_interval=0.5"]).unwrap(),
    ] {
        let yaml = config.to_yaml();
        let again = Config::from_yaml_str(&yaml, "written.yaml", &[]).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(again, config);
    }
}

/// The config sections' U-Net architecture keys and the model's hyper-parameters come from one list: the sections'
/// defaults are the model's (SD 1.5), and a section's keys reach the model as a config spells them (one ResBlock
/// count for every level, -1 for an unset head count), the keys not written keeping the file's values.
#[test]
fn unet_sections_convert_to_the_model_hyper_parameters() {
    use zeroconv::io::config::{model_config, ControlNetConfig, UNetConfig};
    let sd = zeroconv::models::UNetConfig::default();
    assert_eq!(model_config::unet(&UNetConfig::default()), sd);
    assert_eq!(
        model_config::controlnet(&ControlNetConfig::default(), 4),
        zeroconv::models::ControlNetConfig::default()
    );
    let mut keys = Vec::new();
    for section in ["unet_config", "control_stage_config"] {
        for kv in ["num_res_blocks=1", "channel_mult=[1,2,2]", "num_heads=-1", "num_head_channels=64"] {
            keys.push(format!("model.{section}.{kv}"));
        }
    }
    let c = sd15(&keys.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    let want = zeroconv::models::UNetConfig {
        num_res_blocks: vec![1; 3],
        channel_mult: vec![1, 2, 2],
        num_heads: -1,
        num_head_channels: 64,
        use_flash_attention: true,
        ..sd
    };
    assert_eq!(model_config::unet(&c.model.unet_config), want);
    let control = model_config::controlnet(&c.model.control_stage_config, 4);
    assert_eq!((control.unet, control.hint_channels), (want, 3));
}

/// The `ddconfig` section's keys come from the same list as the model's VAE hyper-parameters
/// (`models::config::vae_architecture!`): the defaults are the model's, and every key reaches the model.
#[test]
fn ddconfig_section_converts_to_the_model_vae() {
    use zeroconv::io::config::{model_config, AutoencoderConfig};
    let sd = zeroconv::models::VaeConfig::default();
    assert_eq!(model_config::vae(&AutoencoderConfig::default(), sd.scale_factor), sd);
    let keys = [
        "model.first_stage_config.embed_dim=8",
        "model.first_stage_config.ddconfig.double_z=False",
        "model.first_stage_config.ddconfig.z_channels=8",
        "model.first_stage_config.ddconfig.resolution=64",
        "model.first_stage_config.ddconfig.in_channels=1",
        "model.first_stage_config.ddconfig.out_ch=2",
        "model.first_stage_config.ddconfig.ch=32",
        "model.first_stage_config.ddconfig.ch_mult=[1,2]",
        "model.first_stage_config.ddconfig.num_res_blocks=1",
        "model.first_stage_config.ddconfig.attn_resolutions=[32]",
    ];
    let c = sd15(&keys).unwrap();
    let want = zeroconv::models::VaeConfig {
        embed_dim: 8,
        double_z: false,
        z_channels: 8,
        resolution: 64,
        in_channels: 1,
        out_ch: 2,
        ch: 32,
        ch_mult: vec![1, 2],
        num_res_blocks: 1,
        attn_resolutions: vec![32],
        scale_factor: 0.5,
    };
    assert_eq!(model_config::vae(&c.model.first_stage_config, 0.5), want);
}

#[test]
fn readme_fragment_lists_every_key() {
    let readme = std::fs::read_to_string(repo("README-config.md")).expect("README-config.md");
    let read = Config::key_paths();
    assert!(read.len() > 100 && read.contains(&"model.unet_config.model_channels".to_string()));
    for key in read {
        assert!(readme.contains(&format!("`{key}`")), "README-config.md does not list the key {key}");
    }
    for ignored in IGNORED_KEYS {
        assert!(readme.contains(&format!("`{}`", ignored.path)), "README-config.md does not list {}", ignored.path);
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let err = load_config(Some(Path::new("/nonexistent/x.yaml")), &[]).unwrap_err().to_string();
    assert!(err.starts_with("/nonexistent/x.yaml: cannot read the config"), "{err}");
}

/// Every key the config reads is used by code outside the config module: a key that is parsed, listed in
/// README-config.md's "read" table, and then never looked at would be the silent wrongness that table must not hide.
/// "Used" is read from the source: the key's field is accessed (`.field`) in a Rust file outside `io/config/`
/// (where it is only declared, defaulted and validated), in that module's `mod.rs` accessors (`run_dir`, ...), or
/// in `model_config.rs`, which turns the sections into the models' hyper-parameters. The keys whose whole effect is a check in the config
/// module are listed here, each with that effect.
#[test]
fn every_read_key_is_used_outside_the_config_module() {
    const CHECKED_ONLY: &[(&str, &str)] = &[
        ("model.first_stage_key", "NeMo's batch-entry name: any name is accepted, the members are fixed"),
        ("model.cond_stage_key", "NeMo's batch-entry name: any name is accepted, the members are fixed"),
        ("model.control_key", "NeMo's batch-entry name: any name is accepted, the members are fixed"),
        (
            "model.first_stage_config.ddconfig.dropout",
            "checked in [0, 1); the frozen VAE runs in eval mode (so in NeMo)",
        ),
        ("infer.sampler_type", "only DDIM parses, the sampler zeroconv runs"),
    ];
    let mut source = String::new();
    let mut stack = vec![repo("")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(repo("")).unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if !["target", "tests", ".git", ".tools"].contains(&rel.as_str()) {
                    stack.push(path);
                }
            } else if rel.ends_with(".rs")
                && (!rel.starts_with("io/config/")
                    || ["io/config/mod.rs", "io/config/model_config.rs"].contains(&rel.as_str()))
            {
                source.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut unused = Vec::new();
    for key in Config::key_paths() {
        let leaf = key.rsplit('.').next().unwrap();
        let field = if leaf == "from_NeMo" { "from_nemo" } else { leaf };
        let used = source.match_indices(&format!(".{field}")).any(|(at, m)| {
            let next = source[at + m.len()..].chars().next();
            !next.is_some_and(|c| c.is_alphanumeric() || c == '_')
        });
        if !used && !CHECKED_ONLY.iter().any(|(k, _)| *k == key) {
            unused.push(key);
        }
    }
    assert!(unused.is_empty(), "read keys no code outside io/config/ uses: {unused:?}");
}
