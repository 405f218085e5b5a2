//! Run folders (`--out DIR`): one run at a time (a lock naming its holder, stale locks taken over, released on
//! errors and panics), no new run over another run's files, pruning and resume limited to the folder's own run,
//! and resume hygiene (metrics.jsonl cut back to the checkpoint, leftover temporary files removed, a config that
//! changes the computation refused). Each test runs the shrunk tiny configuration for a few steps in its own
//! temporary folder.

use crate::common;
use common::training::{opts, tiny, tmp};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use zeroconv::app::train::lock::{hostname, RunLock, LOCK_FILE};
use zeroconv::app::train::{state, train, TrainOptions, TrainReport};
use zeroconv::io::checkpoint::{write_safetensors, Checkpoint};
use zeroconv::io::config::Config;

/// The tiny config at 64x64 pixels (8x8 latents), batch 2, no base phase, a checkpoint every 3 steps.
fn small(overrides: &[&str]) -> Config {
    let base = [
        "model.micro_batch_size=2",
        "model.base_pretrain_steps=0",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=3",
    ];
    tiny(&base, overrides)
}

fn resumed(out: &Path) -> TrainOptions {
    TrainOptions { resume: true, ..opts(out) }
}

fn first_step(r: &TrainReport) -> Option<u64> {
    r.losses.first().map(|l| l.1)
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    v.sort();
    v
}

/// The (phase, step) of every line of metrics.jsonl; every line must be complete JSON.
fn metric_steps(dir: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(text.ends_with('\n'), "metrics.jsonl ends in a broken line: {text:?}");
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            v["step"].as_u64().unwrap()
        })
        .collect()
}

#[test]
fn a_folder_in_use_is_refused_naming_its_holder() {
    let d = tmp("in-use");
    // Another run holds the folder.
    let held = RunLock::acquire(d.path()).unwrap();
    for o in [opts(d.path()), resumed(d.path())] {
        let err = train(&small(&["trainer.max_steps=1"]), &o).unwrap_err().to_string();
        assert!(err.contains("in use by another zeroconv run"), "{err}");
        let who = format!("pid {} on host {} since ", std::process::id(), hostname());
        assert!(err.contains(&who) && err.contains(" UTC") && err.contains("--out"), "{err}");
    }
    assert_eq!(names(d.path()), [LOCK_FILE], "a refused run writes nothing");
    // Released: the run goes ahead, and releases the folder when it ends.
    drop(held);
    assert!(!d.path().join(LOCK_FILE).exists());
    train(&small(&["trainer.max_steps=1"]), &opts(d.path())).unwrap();
    assert!(!d.path().join(LOCK_FILE).exists(), "the lock is released at the end");
}

#[test]
fn a_stale_lock_of_a_dead_process_is_taken_over() {
    let d = tmp("stale");
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = format!("{{\"pid\":{dead},\"host\":\"{}\",\"since\":1700000000}}\n", hostname());
    std::fs::write(d.path().join(LOCK_FILE), &stale).unwrap();
    let lock = RunLock::acquire(d.path()).unwrap();
    let before = lock.took_over.clone().expect("the stale holder is reported");
    assert_eq!((before.pid, before.since), (dead, 1_700_000_000));
    drop(lock);
    // And a run takes it over.
    std::fs::write(d.path().join(LOCK_FILE), &stale).unwrap();
    train(&small(&["trainer.max_steps=1"]), &opts(d.path())).unwrap();
    assert!(d.path().join("controlnet.safetensors").exists());
    assert!(!d.path().join(LOCK_FILE).exists());
}

#[test]
fn the_lock_is_released_on_errors_and_panics() {
    let d = tmp("release");
    let panicked = std::panic::catch_unwind(|| {
        let _lock = RunLock::acquire(d.path()).unwrap();
        panic!("a panic while the folder is locked");
    });
    assert!(panicked.is_err());
    drop(RunLock::acquire(d.path()).expect("free after a panic"));
    // A run that fails midway (its checkpoint write fails).
    let o = TrainOptions { fail_checkpoint_after: Some(4096), ..opts(d.path()) };
    let err = train(&small(&["trainer.max_steps=3"]), &o).unwrap_err().to_string();
    assert!(err.contains("simulated failure"), "{err}");
    assert!(!d.path().join(LOCK_FILE).exists());
    drop(RunLock::acquire(d.path()).expect("free after an error"));
}

#[test]
fn a_fresh_run_into_a_folder_with_a_run_is_refused() {
    let d = tmp("fresh-over-old");
    train(&small(&["trainer.max_steps=3"]), &opts(d.path())).unwrap();
    let before = snapshot(d.path());
    let err = train(&small(&["trainer.max_steps=3"]), &opts(d.path())).unwrap_err().to_string();
    assert!(
        err.contains("already holds a run's files")
            && err.contains("metrics.jsonl")
            && err.contains("checkpoints/step_10000003.safetensors")
            && err.contains("--resume")
            && err.contains("another --out"),
        "{err}"
    );
    assert_eq!(snapshot(d.path()), before, "the old run's files are untouched");
    // A folder holding only files of no run is fine, and they stay.
    let e = tmp("fresh-beside-notes");
    std::fs::write(e.path().join("notes.txt"), "mine").unwrap();
    train(&small(&["trainer.max_steps=1"]), &opts(e.path())).unwrap();
    assert_eq!(std::fs::read_to_string(e.path().join("notes.txt")).unwrap(), "mine");
}

#[test]
fn pruning_and_resume_touch_only_this_runs_checkpoints() {
    // A checkpoint of another run, planted in this run's folder as the oldest and as the newest file.
    let other = tmp("other-run");
    train(&small(&["trainer.max_steps=3", "model.seed=99"]), &opts(other.path())).unwrap();
    let foreign = std::fs::read(other.path().join("checkpoints/step_10000003.safetensors")).unwrap();
    let d = tmp("prune");
    let keep2 = "exp_manager.checkpoint_callback_params.save_top_k=2";
    train(&small(&["trainer.max_steps=3", keep2]), &opts(d.path())).unwrap();
    let ck = d.path().join("checkpoints");
    std::fs::write(ck.join("step_00000001.safetensors"), &foreign).unwrap();
    std::fs::write(ck.join("step_10000099.safetensors"), &foreign).unwrap();
    std::fs::write(ck.join("notes.txt"), "mine").unwrap();
    // The resume continues this run's step 3, not the other run's "step 99".
    let r = train(&small(&["trainer.max_steps=12", keep2]), &resumed(d.path())).unwrap();
    assert_eq!(first_step(&r), Some(4));
    assert_eq!(
        names(&ck),
        [
            "notes.txt",
            "step_00000001.safetensors",
            "step_10000009.safetensors",
            "step_10000012.safetensors",
            "step_10000099.safetensors"
        ],
        "this run keeps its newest 2; the other files stay"
    );
    assert_eq!(std::fs::read(ck.join("step_00000001.safetensors")).unwrap(), foreign);
}

#[test]
fn save_top_k_minus_one_keeps_every_checkpoint() {
    let d = tmp("keep-all");
    train(&small(&["trainer.max_steps=9", "exp_manager.checkpoint_callback_params.save_top_k=-1"]), &opts(d.path()))
        .unwrap();
    let ids: Vec<u64> = state::list(&d.path().join("checkpoints")).iter().map(|c| c.0).collect();
    assert_eq!(ids, [10_000_003, 10_000_006, 10_000_009]);
}

#[test]
fn a_resume_cuts_metrics_and_removes_temporary_files() {
    let d = tmp("hygiene");
    train(&small(&["trainer.max_steps=3"]), &opts(d.path())).unwrap();
    assert_eq!(metric_steps(d.path()), [1, 3]);
    // A run killed after logging steps 4 and 5, midway through a line, and through checkpoint and export writes.
    let m = d.path().join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&m).unwrap();
    text += "{\"phase\":\"control\",\"step\":4,\"loss\":0.5}\n{\"phase\":\"control\",\"step\":5,\"loss\":0.5}\n{\"phase\":\"con";
    std::fs::write(&m, text).unwrap();
    let temps = [
        d.path().join("checkpoints/.step_10000006.safetensors.tmp-4242-0"),
        d.path().join(".controlnet.safetensors.tmp-4242-1"),
        d.path().join(".val_step_000006.png.tmp-4242-2"),
    ];
    for t in &temps {
        std::fs::write(t, vec![0u8; 1000]).unwrap();
    }
    // Files that only look alike are the user's.
    let mine = [d.path().join(".notes.txt.tmp-1-1"), d.path().join("checkpoints/.tmp-1-1")];
    for t in &mine {
        std::fs::write(t, "mine").unwrap();
    }
    let r = train(&small(&["trainer.max_steps=6"]), &resumed(d.path())).unwrap();
    assert_eq!(first_step(&r), Some(4));
    assert_eq!(metric_steps(d.path()), [1, 3, 4, 6], "one line per logged step, none duplicated");
    for t in &temps {
        assert!(!t.exists(), "{} is removed", t.display());
    }
    for t in &mine {
        assert!(t.exists(), "{} is kept", t.display());
    }
}

#[test]
fn a_resume_that_changes_the_computation_is_refused() {
    let d = tmp("changed");
    train(&small(&["trainer.max_steps=3"]), &opts(d.path())).unwrap();
    let before = snapshot(d.path());
    let changed = [
        "trainer.max_steps=6",
        "model.seed=7",
        "model.micro_batch_size=1",
        "trainer.precision=bf16",
        "model.optim.betas=[0.8,0.99]",
    ];
    let err = train(&small(&changed), &resumed(d.path())).unwrap_err().to_string();
    for line in [
        "model.seed: 0 in the checkpoint, 7 now",
        "model.micro_batch_size: 2 in the checkpoint, 1 now",
        "trainer.precision: 32 in the checkpoint, bf16-mixed now",
        "model.optim.betas: [0.9,0.999] in the checkpoint, [0.8,0.99] now",
        "global batch size",
        "another --out",
    ] {
        assert!(err.contains(line), "missing `{line}` in:\n{err}");
    }
    assert!(!err.contains("max_steps:"), "max_steps may change: {err}");
    assert_eq!(snapshot(d.path()), before, "a refused resume changes nothing");
    // The learning rate and the length may change.
    let r = train(&small(&["trainer.max_steps=6", "model.optim.lr=1e-4"]), &resumed(d.path())).unwrap();
    assert_eq!(first_step(&r), Some(4));
    let m = std::fs::read_to_string(d.path().join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(m.lines().last().unwrap()).unwrap();
    assert_eq!((last["step"].as_u64(), last["lr"].as_f64()), (Some(6), Some(1e-4)));
}

#[test]
fn checkpoints_of_older_versions_still_resume() {
    let d = tmp("older");
    let keep1 = "exp_manager.checkpoint_callback_params.save_top_k=1";
    train(&small(&["trainer.max_steps=3", keep1]), &opts(d.path())).unwrap();
    // Rewrite the checkpoint as older versions wrote it: no run id, no config, no run.json.
    let path = d.path().join("checkpoints/step_10000003.safetensors");
    let (ck, mut st) = state::load(&path).unwrap();
    st.run = None;
    let tensors: Vec<(String, _)> = ck.keys().map(|k| (k.to_string(), ck.to_host(k).unwrap())).collect();
    let meta = BTreeMap::from([(state::STATE_KEY.to_string(), serde_json::to_string(&st).unwrap())]);
    drop(ck);
    write_safetensors(&path, &tensors, Some(&meta)).unwrap();
    std::fs::remove_file(d.path().join("run.json")).unwrap();
    assert_eq!(Checkpoint::open(&path).unwrap().metadata().len(), 1);
    let r = train(&small(&["trainer.max_steps=9", keep1]), &resumed(d.path())).unwrap();
    assert_eq!(first_step(&r), Some(4));
    // The old checkpoint is not this run's to prune; the run's own newest one is kept.
    let ids: Vec<u64> = state::list(&d.path().join("checkpoints")).iter().map(|c| c.0).collect();
    assert_eq!(ids, [10_000_003, 10_000_009]);
    assert!(d.path().join("run.json").exists());
}
