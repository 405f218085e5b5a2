//! Config keys doing what NeMo does with them, shown by a run: the learning rate each step logs in metrics.jsonl
//! follows NeMo's scheduler formulas (`nemo/core/optim/lr_scheduler.py`).

use crate::common;
use common::training::{opts, tiny, tmp};

use std::f64::consts::FRAC_1_SQRT_2;
use zeroconv::app::train::train;
use zeroconv::io::config::Config;

/// The built-in tiny config, shrunk (64x64 pixels, batch 1, no base pretraining, every step logged).
fn small(overrides: &[&str]) -> Config {
    tiny(&["model.micro_batch_size=1", "model.base_pretrain_steps=0", "trainer.log_every_n_steps=1"], overrides)
}

fn logged_rates(cfg: &Config) -> Vec<(u64, f64)> {
    let dir = tmp("nemo-lr");
    let opts = opts(&dir.path().join("run"));
    train(cfg, &opts).unwrap();
    let text = std::fs::read_to_string(dir.path().join("run").join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["phase"] == "control")
        .map(|v| (v["step"].as_u64().unwrap(), v["lr"].as_f64().unwrap()))
        .collect()
}

#[test]
fn cosine_annealing_rates_in_metrics_follow_nemo() {
    let cfg = small(&[
        "trainer.max_steps=6",
        "model.optim.lr=1e-3",
        "model.optim.sched.name=CosineAnnealing",
        "model.optim.sched.warmup_steps=2",
        "model.optim.sched.min_lr=1e-5",
    ]);
    // By hand from NeMo's formulas: warmup (k+1)/(2+1), then 1e-5 + 9.9e-4 (1 + cos(pi (k-2)/4)) / 2.
    let want = [
        1e-3 / 3.0,
        2e-3 / 3.0,
        1e-3,
        1e-5 + 9.9e-4 * (1.0 + FRAC_1_SQRT_2) / 2.0,
        1e-5 + 9.9e-4 * 0.5,
        1e-5 + 9.9e-4 * (1.0 - FRAC_1_SQRT_2) / 2.0,
    ];
    let got = logged_rates(&cfg);
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    for ((step, lr), w) in got.iter().zip(want) {
        assert!((lr - w).abs() <= 1e-12, "step {step}: lr {lr} vs NeMo {w}");
    }
}

#[test]
fn a_schedule_nemo_refuses_is_refused_before_training() {
    let cfg = small(&[
        "trainer.max_steps=6",
        "model.optim.lr=1e-5",
        "model.optim.sched.name=CosineAnnealing",
        "model.optim.sched.min_lr=1e-4",
    ]);
    let dir = tmp("nemo-refuse");
    let opts = opts(&dir.path().join("run"));
    let err = train(&cfg, &opts).unwrap_err().to_string();
    assert!(err.contains("min_lr") && err.contains("above model.optim.lr"), "{err}");
    assert!(!dir.path().join("run").exists(), "nothing is written for a refused config");
}
