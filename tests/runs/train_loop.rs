//! The training loop end to end on the built-in tiny configuration (shrunk further so the tests
//! are quick): resume determinism, checkpoint atomicity, the loss falling, deterministic sampling,
//! and the errors a user meets first.

use crate::common;
use common::training::{opts, tiny, tmp};

use std::path::PathBuf;
use zeroconv::app::sampler::{sample, SampleSettings};
use zeroconv::app::train::{self, train, TrainOptions, TrainReport};
use zeroconv::app::weights::store::WeightStore;
use zeroconv::io::config::Config;
use zeroconv::io::data::synthetic;

/// The tiny config at 64x64 pixels (8x8 latents), batch 2.
fn small(overrides: &[&str]) -> Config {
    let base = [
        "model.micro_batch_size=2",
        "model.base_pretrain_steps=0",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=3",
    ];
    tiny(&base, overrides)
}

fn control_losses(r: &TrainReport) -> Vec<(u64, u64)> {
    r.losses.iter().filter(|l| l.0 == "control").map(|l| (l.1, l.2.to_bits())).collect()
}

#[test]
fn a_resumed_run_logs_the_same_losses_bit_for_bit() {
    // Uninterrupted: 2 base steps, then 6 ControlNet steps.
    let a = tmp("resume-a");
    let full = train(&small(&["model.base_pretrain_steps=2", "trainer.max_steps=6"]), &opts(a.path())).unwrap();
    // Stopped after step 3, then resumed to step 6.
    let b = tmp("resume-b");
    let first = train(&small(&["model.base_pretrain_steps=2", "trainer.max_steps=3"]), &opts(b.path())).unwrap();
    let second = train(
        &small(&["model.base_pretrain_steps=2", "trainer.max_steps=6"]),
        &TrainOptions { resume: true, ..opts(b.path()) },
    )
    .unwrap();
    let mut resumed = control_losses(&first);
    resumed.extend(control_losses(&second));
    assert_eq!(resumed.len(), 6);
    assert_eq!(resumed, control_losses(&full), "losses differ after resuming");
    // The resumed run did not redo the base phase.
    assert!(second.losses.iter().all(|l| l.0 == "control"));
    // Both exported the same ControlNet.
    assert_eq!(
        std::fs::read(a.path().join("controlnet.safetensors")).unwrap(),
        std::fs::read(b.path().join("controlnet.safetensors")).unwrap()
    );
    // metrics.jsonl has the required fields.
    let m = std::fs::read_to_string(b.path().join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(m.lines().last().unwrap()).unwrap();
    for k in ["step", "loss", "lr", "samples_per_s", "peak_memory_bytes"] {
        assert!(last.get(k).is_some(), "metrics.jsonl lacks {k}: {last}");
    }
    assert_eq!(last["step"], 6);
}

#[test]
fn an_interrupted_checkpoint_write_never_replaces_a_good_one() {
    let d = tmp("atomic");
    let cfg3 = small(&["trainer.max_steps=3"]);
    train(&cfg3, &opts(d.path())).unwrap();
    let ckdir = d.path().join("checkpoints");
    let good = train::state::list(&ckdir).last().unwrap().1.clone();
    let before = std::fs::read(&good).unwrap();
    // Resume to 6; the checkpoint at step 6 fails midway through its write.
    let cfg6 = small(&["trainer.max_steps=6"]);
    let err = train(&cfg6, &TrainOptions { resume: true, fail_checkpoint_after: Some(4096), ..opts(d.path()) })
        .unwrap_err()
        .to_string();
    assert!(err.contains("simulated failure"), "{err}");
    assert_eq!(std::fs::read(&good).unwrap(), before, "the good checkpoint is untouched");
    let names: Vec<String> =
        std::fs::read_dir(&ckdir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(names.len(), 1, "no partial or temporary file is left: {names:?}");
    // And the run resumes from it.
    let r = train(&cfg6, &TrainOptions { resume: true, ..opts(d.path()) }).unwrap();
    assert_eq!(r.losses.first().map(|l| l.1), Some(4));
}

#[test]
fn the_loss_falls_on_the_tiny_configuration() {
    let d = tmp("loss");
    // The base model learning the synthetic images: 100 steps of 4 samples.
    let r = train(
        &small(&["model.base_pretrain_steps=100", "trainer.max_steps=1", "model.micro_batch_size=4"]),
        &opts(d.path()),
    )
    .unwrap();
    let base: Vec<f64> = r.losses.iter().filter(|l| l.0 == "base").map(|l| l.2).collect();
    assert_eq!(base.len(), 100);
    let head = base[..10].iter().sum::<f64>() / 10.0;
    let tail = base[90..].iter().sum::<f64>() / 10.0;
    assert!(tail < 0.6 * head, "the loss should fall: first 10 steps {head:.4}, last 10 {tail:.4}");
}

#[test]
fn sampling_is_deterministic_for_a_seed() {
    let cfg = small(&[]);
    let models = train::step_models(&cfg).unwrap();
    let tok = train::tokenizer(&cfg).unwrap();
    let mut store = WeightStore::default();
    let specs = {
        let mut b = zeroconv::models::ModelBuilder::new(zeroconv::graph::DType::F32);
        zeroconv::models::train_step::micro_step(
            &mut b,
            &models,
            zeroconv::models::train_step::TrainPhase::Control,
            1,
            64,
            zeroconv::graph::DType::F32,
            "",
        )
        .unwrap();
        b.params
    };
    store.init_missing(&specs, 3).unwrap();
    let s = synthetic::sample(1, 2, 64);
    let caps = vec![s.caption.clone()];
    let settings = |seed| SampleSettings { steps: 4, cfg_scale: 2.0, seed, threads: Some(2), ..Default::default() };
    let a = sample(&models, &store, &tok, &s.hint, &caps, 64, &settings(5)).unwrap();
    let b = sample(&models, &store, &tok, &s.hint, &caps, 64, &settings(5)).unwrap();
    let c = sample(&models, &store, &tok, &s.hint, &caps, 64, &settings(6)).unwrap();
    assert_eq!(a, b, "the same seed gives the same image");
    assert_ne!(a, c, "another seed gives another image");
    assert_eq!(a.len(), 3 * 64 * 64);
    // A hint of a size the model cannot take is one clear error.
    let err = sample(&models, &store, &tok, &vec![0.0; 3 * 60 * 60], &caps, 60, &settings(5)).unwrap_err().to_string();
    assert!(err.contains("60x60") && err.contains("multiple of"), "{err}");
}

#[test]
fn clear_errors_for_missing_files_and_empty_datasets() {
    // A dataset path with no shards.
    let empty = tmp("empty-shards");
    let mut cfg = small(&["model.data.synthetic_data=False"]);
    cfg.model.data.train.dataset_path = vec![empty.path().to_path_buf()];
    let err = train(&cfg, &opts(tmp("no-shards").path())).unwrap_err().to_string();
    assert!(err.contains("dataset_path") && err.contains(&empty.path().display().to_string()), "{err}");
    // A missing pretrained checkpoint names the file.
    let mut cfg = small(&[]);
    cfg.model.unet_config.from_pretrained = Some(PathBuf::from("/nonexistent/v1-5-pruned.safetensors"));
    let err = train(&cfg, &opts(tmp("missing-ckpt").path())).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/v1-5-pruned.safetensors"), "{err}");
    // Resuming with nothing to resume from.
    let err =
        train(&small(&[]), &TrainOptions { resume: true, ..opts(tmp("nothing").path()) }).unwrap_err().to_string();
    assert!(err.contains("no checkpoint"), "{err}");
}

/// Reduction orders depend on shapes only, so the thread count changes no bit: a run on 1 thread logs the same
/// losses as on 2, and one resumed on another thread count continues exactly.
#[test]
fn the_thread_count_changes_no_bit() {
    // 4 images: enough for 2 threads to split a batch sum differently from 1 thread (with 2, a + b is a + b).
    let cfg = small(&["model.base_pretrain_steps=2", "trainer.max_steps=4", "model.micro_batch_size=4"]);
    let one = tmp("threads-1");
    let a = train(&cfg, &TrainOptions { threads: Some(1), ..opts(one.path()) }).unwrap();
    let two = tmp("threads-2");
    let b = train(&cfg, &TrainOptions { threads: Some(2), ..opts(two.path()) }).unwrap();
    let bits = |r: &TrainReport| r.losses.iter().map(|l| (l.0.clone(), l.1, l.2.to_bits())).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b), "losses differ between 1 and 2 threads");
    assert_eq!(
        std::fs::read(one.path().join("controlnet.safetensors")).unwrap(),
        std::fs::read(two.path().join("controlnet.safetensors")).unwrap()
    );
}
