//! Data parallelism on the CPU, with real processes: `zeroconv launch` starts the ranks with torchrun's variables,
//! they meet at the rendezvous, and every optimizer step sums their gradients before the update. Two ranks train
//! what one process trains on the same samples (same losses within f32 rounding, same ControlNet), with and without
//! accumulation, on WebDataset shards too, where each rank decodes only its half of the samples; a bad sample is
//! skipped by the rank that meets it alone; a resume restores every rank's own data position; a rank started with
//! another config is refused at the handshake, naming it.

use crate::common;
use common::training::tmp;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use zeroconv::io::checkpoint::Checkpoint;
use zeroconv::io::data::tar::TarWriter;

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

/// Its stderr, once it succeeded.
fn ok(what: &str, out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what} failed:\n{err}");
    err
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

/// `launch --nproc-per-node 2 train ...` with the tiny config into `dir`: its stderr, both ranks'.
fn two_ranks(dir: &str, overrides: &[&str]) -> Output {
    let mut launch = vec!["launch", "--nproc-per-node", "2", "--master-port", "0"];
    launch.extend(train_args(dir, overrides));
    zeroconv(&launch)
}

/// One process with a batch of `single` against `launch --nproc-per-node 2` with `ranks` overrides; their stderr.
fn compare(name: &str, single: &[&str], ranks: &[&str]) -> (String, String) {
    let dir = tmp(name);
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let (one_s, two_s) = (one.to_str().unwrap(), two.to_str().unwrap());
    let err_one = ok("one process", zeroconv(&train_args(one_s, single)));
    let err_two = ok("two ranks", two_ranks(two_s, ranks));
    assert_same_run(&one, &two);
    // Rank 0 alone wrote: one metrics line per step, and no second export.
    assert_eq!(std::fs::read_to_string(two.join("metrics.jsonl")).unwrap().lines().count(), 3);
    (err_one, err_two)
}

/// A 64x64 PNG whose colours tell sample `n` apart.
fn png(n: usize) -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(n * 37 % 256) as u8, (x * 4) as u8, (y * 4) as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// One shard in `dir` of `count` samples (`s00000`, ...), the one at position `bad` (if any) with an image that
/// is not an image; returns the overrides that train on it in shard order.
fn shard(dir: &Path, count: usize, bad: Option<usize>) -> (PathBuf, Vec<String>) {
    let path = dir.join("data-000000.tar");
    let mut w = TarWriter::new(std::fs::File::create(&path).unwrap());
    for n in 0..count {
        let image = if bad == Some(n) { b"not an image".to_vec() } else { png(n) };
        w.append(&format!("s{n:05}.jpg"), &image).unwrap();
        w.append(&format!("s{n:05}.png"), &png(n + 100)).unwrap();
        w.append(&format!("s{n:05}.txt"), format!("sample {n}").as_bytes()).unwrap();
    }
    w.finish().unwrap();
    let overrides = vec![
        "model.data.synthetic_data=False".to_string(),
        "model.data.shuffle_buffer=0".to_string(),
        "model.data.num_workers=1".to_string(),
        format!("model.data.train.dataset_path=[{}]", path.display()),
    ];
    (path, overrides)
}

/// The counts in the line `data<who>: N samples used, D dropped at epoch ends, M bad samples and K damaged shards
/// skipped`: (N, D, M).
fn data_usage(stderr: &str, who: &str) -> (u64, u64, u64) {
    let prefix = format!("data{who}: ");
    let line = stderr.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {prefix}:\n{stderr}"));
    let numbers: Vec<u64> = line.split(' ').filter_map(|w| w.parse().ok()).collect();
    (numbers[0], numbers[1], numbers[2])
}

#[test]
fn two_ranks_train_what_one_process_trains() {
    compare(
        "dp-batch",
        &["model.micro_batch_size=2"],
        &["model.micro_batch_size=1", "model.global_batch_size=2", "trainer.devices=2"],
    );
}

/// On shards, each rank decodes its half of one process's samples and the run is still one process's. An epoch
/// of 5 samples holds two steps: one process drops item 4; rank 0 (items 0, 2, 4) could fill a third step from
/// epoch 0, rank 1 (items 1, 3) cannot, so both start epoch 1 for step 3, as one process does.
#[test]
fn two_ranks_on_shards_train_what_one_process_trains_decoding_half_each() {
    let dir = tmp("dp-shards");
    let (_, data) = shard(dir.path(), 5, None);
    let data: Vec<&str> = data.iter().map(String::as_str).collect();
    let single = [&["model.micro_batch_size=2"][..], &data].concat();
    let ranks = [&["model.micro_batch_size=1", "model.global_batch_size=2", "trainer.devices=2"][..], &data].concat();
    let (one, two) = compare("dp-shards-runs", &single, &ranks);
    assert_eq!(data_usage(&one, ""), (6, 1, 0), "{one}");
    assert_eq!(data_usage(&two, " (rank 0 of 2)"), (3, 1, 0), "{two}");
    assert_eq!(data_usage(&two, " (rank 1 of 2)"), (3, 0, 0), "{two}");
}

/// A bad sample at position 1 is rank 1's: rank 1 alone decodes it, logs it once and takes its next sample
/// (position 3), so both ranks' batches stay full. Each rank saves its own position (rank 1 is one item further),
/// and a 2-rank resume restores both: it logs exactly the losses of the uninterrupted run. One process cannot
/// take these positions over (they are not one point of the stream): refused, saying why.
#[test]
fn a_bad_sample_is_skipped_by_its_rank_and_a_resume_restores_every_ranks_position() {
    let dir = tmp("dp-bad");
    let (_, data) = shard(dir.path(), 14, Some(1));
    let data: Vec<&str> = data.iter().map(String::as_str).collect();
    let ranks = [&["model.micro_batch_size=1", "model.global_batch_size=2", "trainer.devices=2"][..], &data].concat();
    let whole = dir.path().join("whole");
    let err = ok("six steps", two_ranks(whole.to_str().unwrap(), &[&ranks[..], &["trainer.max_steps=6"]].concat()));
    let skipped: Vec<&str> = err.lines().filter(|l| l.contains("skipped") && l.contains("'s00001'")).collect();
    assert_eq!(skipped.len(), 1, "{err}");
    assert!(skipped[0].starts_with("warning (rank 1): skipped ") && skipped[0].contains("data-000000.tar"), "{err}");
    assert_eq!(data_usage(&err, " (rank 0 of 2)"), (6, 0, 0), "{err}");
    assert_eq!(data_usage(&err, " (rank 1 of 2)"), (6, 0, 1), "{err}");
    let full = losses(&whole);
    assert_eq!(full.len(), 6);

    let part = dir.path().join("part");
    let part_s = part.to_str().unwrap();
    ok("three steps", two_ranks(part_s, &[&ranks[..], &["trainer.max_steps=3"]].concat()));
    // Another world size with the same global batch (the config allows it): refused by the data positions.
    let mut alone = train_args(part_s, &data);
    alone.extend(["--resume", "trainer.max_steps=6", "model.micro_batch_size=1", "model.global_batch_size=2"]);
    let out = zeroconv(&alone);
    let refused = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{refused}");
    assert!(
        refused.contains("saved by 2 ranks and this run has 1")
            && refused.contains("item 3 of epoch 0, item 4 of epoch 0")
            && refused.contains("resume with 2"),
        "{refused}"
    );
    let mut resume = vec!["--resume", "trainer.max_steps=6"];
    resume.extend(&ranks);
    ok("resumed", two_ranks(part_s, &resume));
    assert_eq!(losses(&part), full, "the resumed run logs the uninterrupted run's losses bit for bit");
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
