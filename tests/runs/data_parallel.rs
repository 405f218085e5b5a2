//! Data parallelism on the CPU, with real processes: `zeroconv launch` starts the ranks with torchrun's variables,
//! they meet at the rendezvous, and every optimizer step sums their gradients before the update. Two ranks train
//! what one process trains on the same samples (same losses within f32 rounding, same ControlNet), with and without
//! accumulation; a rank started with another config is refused at the handshake, naming it.

use crate::common;
use common::training::tmp;

use std::path::Path;
use std::process::{Command, Output};
use zeroconv::io::checkpoint::Checkpoint;

const TINY: [&str; 5] = [
    "model.base_pretrain_steps=0",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "model.data.train.augmentations.resize_smallest_side=64",
    "model.data.train.augmentations.center_crop_h_w=64",
];

fn zeroconv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zeroconv")).args(args).output().expect("run zeroconv")
}

fn ok(what: &str, out: Output) {
    assert!(out.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// `train --out dir` with the tiny config and `overrides`, on one thread per process.
fn train_args<'a>(dir: &'a str, overrides: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["train", "--no-eval", "--allow-random-weights", "--threads", "1", "--out", dir];
    a.extend(TINY);
    a.extend(overrides);
    a
}

fn losses(dir: &Path) -> Vec<f64> {
    let m = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    m.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect()
}

fn assert_same_run(a: &Path, b: &Path) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), 3);
    common::assert_close("losses", &lb, &la, 1e-5);
    let (ca, cb) = (
        Checkpoint::open(&a.join("controlnet.safetensors")).unwrap(),
        Checkpoint::open(&b.join("controlnet.safetensors")).unwrap(),
    );
    let keys: Vec<String> = ca.keys().map(str::to_string).collect();
    assert!(!keys.is_empty());
    assert_eq!(keys, cb.keys().map(str::to_string).collect::<Vec<_>>());
    for k in keys {
        let (x, y) = (ca.to_host(&k).unwrap().to_f64(), cb.to_host(&k).unwrap().to_f64());
        // Three AdamW steps move a weight by about 3 lr; gradients summed in another order differ by rounding.
        common::assert_close(&k, &y, &x, 1e-4);
    }
}

/// One process with a batch of `single` against `launch --nproc-per-node 2` with `ranks` overrides.
fn compare(name: &str, single: &[&str], ranks: &[&str]) {
    let dir = tmp(name);
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let (one_s, two_s) = (one.to_str().unwrap(), two.to_str().unwrap());
    ok("one process", zeroconv(&train_args(one_s, single)));
    let mut launch = vec!["launch", "--nproc-per-node", "2", "--master-port", "0"];
    launch.extend(train_args(two_s, ranks));
    ok("two ranks", zeroconv(&launch));
    assert_same_run(&one, &two);
    // Rank 0 alone wrote: one metrics line per step, and no second export.
    assert_eq!(std::fs::read_to_string(two.join("metrics.jsonl")).unwrap().lines().count(), 3);
}

#[test]
fn two_ranks_train_what_one_process_trains() {
    compare(
        "dp-batch",
        &["model.micro_batch_size=2"],
        &["model.micro_batch_size=1", "model.global_batch_size=2", "trainer.devices=2"],
    );
}

#[test]
fn two_ranks_with_accumulation_train_what_one_process_trains() {
    compare(
        "dp-accum",
        &["model.micro_batch_size=4"],
        &["model.micro_batch_size=1", "model.global_batch_size=4", "trainer.devices=2"],
    );
}

/// Two processes started by hand (as torchrun would), the second with another config: the handshake refuses it,
/// both exit with an error, and nothing hangs.
#[test]
fn a_rank_with_another_config_is_refused_at_the_handshake() {
    let dir = tmp("dp-mismatch");
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let spawn = |rank: &str, extra: &str| {
        let mut args = train_args(out_s, &["model.micro_batch_size=1", "trainer.devices=2"]);
        args.push(extra);
        Command::new(env!("CARGO_BIN_EXE_zeroconv"))
            .args(&args)
            .env("RANK", rank)
            .env("WORLD_SIZE", "2")
            .env("LOCAL_RANK", rank)
            .env("LOCAL_WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let r0 = spawn("0", "model.optim.lr=1e-4");
    let r1 = spawn("1", "model.optim.lr=2e-4");
    let (o0, o1) = (r0.wait_with_output().unwrap(), r1.wait_with_output().unwrap());
    assert!(!o0.status.success() && !o1.status.success());
    let e1 = String::from_utf8_lossy(&o1.stderr);
    assert!(e1.contains("rank 1") && e1.contains("hash"), "{e1}");
    assert!(!out.join("metrics.jsonl").exists() || losses(&out).is_empty(), "no step ran");
}

/// The processes `zeroconv launch` (pid `parent`) started: (pid, RANK).
fn ranks_of(parent: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The fields after the command name (which may hold spaces) start after the last ')'.
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let rank = environ
            .split(|&b| b == 0)
            .find_map(|v| v.strip_prefix(b"RANK=").map(|r| String::from_utf8_lossy(r).into_owned()));
        if let Some(r) = rank {
            out.push((pid, r));
        }
    }
    out
}

/// A rank killed in the middle of training: the other rank fails at the next gradient sum naming it, `zeroconv
/// launch` exits with an error naming it, and no process is left behind.
#[test]
fn a_rank_killed_mid_training_stops_the_job_naming_it() {
    let dir = tmp("dp-kill");
    let out = dir.path().join("run");
    let log = dir.path().join("stderr.txt");
    let mut args = vec!["launch", "--nproc-per-node", "2", "--master-port", "0"];
    let long = ["model.micro_batch_size=1", "trainer.devices=2", "trainer.max_steps=100000"];
    args.extend(train_args(out.to_str().unwrap(), &long));
    let mut launch = Command::new(env!("CARGO_BIN_EXE_zeroconv"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let metrics = out.join("metrics.jsonl");
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() < 2) {
        assert!(
            started.elapsed().as_secs() < 120,
            "training never started: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(launch.try_wait().unwrap().is_none(), "{}", std::fs::read_to_string(&log).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let ranks = ranks_of(launch.id());
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    let (victim, _) = ranks.iter().find(|(_, r)| r == "1").unwrap();
    assert!(Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap().success());
    let status = loop {
        if let Some(s) = launch.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed().as_secs() < 240, "the job did not stop after rank 1 was killed");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(!status.success());
    let err = std::fs::read_to_string(&log).unwrap();
    // Rank 1 is named first, as killed; rank 0 failed at the next gradient sum, naming rank 1 too.
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("zeroconv: rank 1 was killed by signal 9"), "{err}");
    assert!(err.contains("rank 1 (host") && err.contains("closed its connection"), "{err}");
    for (pid, _) in &ranks {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "rank process {pid} is still there");
    }
}
