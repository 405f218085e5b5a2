//! The setup shared by the tests that run the training loop: the built-in tiny config shrunk to 64x64 pixels,
//! the options of a test run, and a unique temporary folder per run.
#![allow(dead_code)]

use std::path::Path;
use tempfile::TempDir;
use zeroconv::app::device::DeviceChoice;
use zeroconv::app::train::TrainOptions;
use zeroconv::io::config::{load_config, Config, CropSize};

/// A fresh, uniquely named folder, removed when the test ends.
pub fn tmp(name: &str) -> TempDir {
    tempfile::Builder::new().prefix(&format!("zeroconv-{name}-")).tempdir().expect("temporary folder")
}

/// The built-in tiny config at 64x64 pixels (8x8 latents): `base` overrides, then the test's own.
pub fn tiny(base: &[&str], overrides: &[&str]) -> Config {
    let all: Vec<String> = base.iter().chain(overrides).map(|s| s.to_string()).collect();
    let mut cfg = load_config(None, &all).unwrap();
    let a = &mut cfg.model.data.train.augmentations;
    a.resize_smallest_side = Some(64);
    a.center_crop_h_w = Some(CropSize { height: 64, width: 64 });
    cfg
}

/// A test run into `out` on 2 CPU threads, quiet, without evaluation. Random frozen weights are allowed: most
/// tests skip the base pretraining, so their U-Net and text encoder are random on purpose.
pub fn opts(out: &Path) -> TrainOptions {
    TrainOptions {
        out_dir: out.to_path_buf(),
        resume: false,
        threads: Some(2),
        device: DeviceChoice::Cpu,
        allow_random_weights: true,
        strict: false,
        progress: false,
        evaluate: false,
        fail_checkpoint_after: None,
    }
}

/// Overrides that shrink the tiny config to a step that runs in well under a second, even under the CUDA emulator:
/// batch 1, 8x8 latents, one level (with attention).
pub const SMALL_STEP: [&str; 7] = [
    "model.micro_batch_size=1",
    "model.unet_config.image_size=8",
    "model.control_stage_config.image_size=8",
    "model.unet_config.channel_mult=[1]",
    "model.control_stage_config.channel_mult=[1]",
    "model.unet_config.attention_resolutions=[1]",
    "model.control_stage_config.attention_resolutions=[1]",
];
