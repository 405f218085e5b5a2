//! Hostile and careless input (issue 17): every case gives one clear error, or works, and never panics, aborts,
//! overwrites an input or runs out of memory. Tests that run the binary check the exit code, the message and
//! that stderr holds no panic or backtrace.

use crate::common;
use common::cli::run as zeroconv;

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use image::{ImageFormat, Rgb, RgbImage};
use zeroconv::engine::cpu::CpuBackend;
use zeroconv::engine::{Backend, HostTensor, Program};
use zeroconv::graph::autodiff::backward;
use zeroconv::graph::{DType, Graph};
use zeroconv::io::checkpoint::{write_safetensors, Checkpoint};
use zeroconv::io::config::Config;

fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().expect("temporary folder")
}

/// Runs the binary with its address space limited to `mem_mib` MiB and its time to `timeout`: input that expands
/// without bound makes its allocation fail (an abort, which the caller's checks catch) instead of taking the
/// machine's memory, and input that hangs is killed.
fn zeroconv_limited(dir: &Path, args: &[&str], mem_mib: u64, timeout: Duration) -> Output {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {}; exec \"$0\" \"$@\"", mem_mib * 1024))
        .arg(env!("CARGO_BIN_EXE_zeroconv"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run zeroconv");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!("zeroconv {args:?} ran past {timeout:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait")
}

/// The run failed cleanly: a non-zero exit, stderr holding every one of `needles`, and no panic or backtrace.
#[track_caller]
fn assert_clean_error(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected a failure, got success; stderr:\n{stderr}");
    assert!(out.status.code().is_some(), "killed by a signal ({:?}); stderr:\n{stderr}", out.status);
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "a panic:\n{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "stderr lacks {needle:?}:\n{stderr}");
    }
    stderr
}

// ---- the CPU backend and empty tensors ----

/// A batch of 0 through the ops of a U-Net block, forward and backward, on the CPU backend: nothing to compute,
/// so nothing panics (it used to: `chunk_size must not be zero` in GroupNorm), and the parameters' gradients are
/// sums over no samples, zeros.
#[test]
fn cpu_backend_runs_a_batch_of_zero() {
    let mut g = Graph::new();
    let dt = DType::F32;
    let x = g.input("x", [0, 32, 4, 4], dt);
    let w = g.param("w", [32, 32, 3, 3], dt, true);
    let b = g.param("b", [32], dt, true);
    let gamma = g.param("gamma", [32], dt, true);
    let beta = g.param("beta", [32], dt, true);
    let lw = g.param("lw", [16, 16], dt, true);
    let h = g.conv2d(x, w, Some(b), 1, 1).unwrap();
    let h = g.group_norm(h, gamma, beta, 32, 1e-5).unwrap();
    let h = g.silu(h).unwrap();
    let h = g.reshape(h, [0, 32, 16]).unwrap();
    let h = g.linear(h, lw, None).unwrap();
    let h = g.softmax(h).unwrap();
    let loss = g.sum(h, &[0, 1, 2], false).unwrap();
    let wrt = [w, b, gamma, beta, lw];
    let grads = backward(&mut g, loss, &wrt).unwrap();
    g.outputs.push(loss);
    g.outputs.extend(wrt.iter().map(|p| grads[p]));
    let mut p = CpuBackend::new(2).compile(g).expect("compile");
    for (v, n) in [(w, 32 * 32 * 9), (b, 32), (gamma, 32), (beta, 32), (lw, 256)] {
        let shape = p.graph().shape(v).clone();
        p.upload(v, &HostTensor::from_f64(shape, dt, &vec![0.5; n]).unwrap()).unwrap();
    }
    p.launch().expect("a batch of 0 runs");
    assert_eq!(p.download(loss).unwrap().to_f64(), vec![0.0]);
    for pv in wrt {
        let gr = p.download(grads[&pv]).unwrap().to_f64();
        assert!(gr.iter().all(|&v| v == 0.0), "the gradient of {pv} over no samples is zero");
    }

    // An empty piece of a concatenation is nothing to copy; the MSE of nothing is NaN, as in PyTorch.
    let mut g = Graph::new();
    let a = g.input("a", [2, 0], dt);
    let b = g.input("b", [2, 3], dt);
    let c = g.concat(&[a, b], 1).unwrap();
    let e = g.input("e", [0, 4], dt);
    let mse = g.mse_loss(e, e).unwrap();
    g.outputs.extend([c, mse]);
    let mut p = CpuBackend::new(2).compile(g).expect("compile");
    let bv = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    p.upload(b, &HostTensor::from_f64([2, 3], dt, &bv).unwrap()).unwrap();
    p.launch().expect("empty pieces run");
    assert_eq!(p.download(c).unwrap().to_f64(), bv.to_vec());
    assert!(p.download(mse).unwrap().to_f64()[0].is_nan());
}

// ---- YAML: nesting depth and alias expansion ----

/// Writes `text` as `name` in `dir` and runs `inspect --config` on it with little memory and time.
fn inspect_yaml(dir: &Path, name: &str, text: &str) -> Output {
    fs::write(dir.join(name), text).unwrap();
    zeroconv_limited(dir, &["inspect", "--config", name], 1024, Duration::from_secs(30))
}

#[test]
fn deeply_nested_yaml_is_one_error_naming_the_file_and_line() {
    let dir = tempdir("zeroconv-hostile-deep-");
    // 10,000 nested block sequences in 20 KB (they used to overflow the stack and abort), also under the ignored
    // `hydra:` section; the same nesting one level per line; and as flow sequences.
    let compact = format!("hydra:\n  run:\n    {}1\n", "- ".repeat(10_000));
    let out = inspect_yaml(dir.path(), "compact.yaml", &compact);
    assert_clean_error(&out, &["compact.yaml:3:", "nest more than 64 levels"]);
    let compact = format!("model:\n  x:\n    {}1\n", "- ".repeat(10_000));
    let out = inspect_yaml(dir.path(), "model.yaml", &compact);
    assert_clean_error(&out, &["model.yaml:3:", "nest more than 64 levels"]);
    let indented: String = (0..2000).map(|i| format!("{}-\n", " ".repeat(i + 1))).collect();
    let out = inspect_yaml(dir.path(), "indented.yaml", &format!("hydra:\n{indented}"));
    assert_clean_error(&out, &["indented.yaml:65:", "nest more than 64 levels"]);
    let flow = format!("hydra: {}{}\n", "[".repeat(10_000), "]".repeat(10_000));
    let out = inspect_yaml(dir.path(), "flow.yaml", &flow);
    assert_clean_error(&out, &["flow.yaml:1:", "invalid YAML"]);
    // A key of 10,000 dotted names on the command line nests as deep.
    let key = format!("hydra.{}=1", vec!["a"; 10_000].join("."));
    let out = zeroconv_limited(dir.path(), &["inspect", &key], 1024, Duration::from_secs(30));
    assert_clean_error(&out, &["10001 dotted names", "more than the 64"]);
    // Nesting within the limit still loads.
    let ok = format!("hydra:\n  run:\n    {}1\n", "- ".repeat(60));
    Config::from_yaml_str(&ok, "ok.yaml", &[]).expect("60 levels load");
}

#[test]
fn yaml_alias_expansion_is_bounded() {
    let dir = tempdir("zeroconv-hostile-laughs-");
    // A "billion laughs": 9 aliases of 9 aliases ... 9 levels deep, 9^9 strings from 1 KB (it used to take 8 GB and
    // more).
    let mut text = String::from("hydra:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for (prev, name) in "abcdefgh".chars().zip("bcdefghi".chars()) {
        text += &format!("  {name}: &{name} [{}]\n", vec![format!("*{prev}"); 9].join(", "));
    }
    let start = Instant::now();
    let out = inspect_yaml(dir.path(), "laughs.yaml", &text);
    assert_clean_error(&out, &["laughs.yaml:", "aliases expand to more than 10000 nodes"]);
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    // Aliases as configs use them still work, merge keys included.
    let cfg = Config::from_yaml_str(
        "hydra:\n  base: &b {x: 1, y: [1, 2, 3]}\n  one: *b\n  two: {<<: *b, x: 2}\n",
        "ok.yaml",
        &[],
    );
    cfg.expect("a few aliases load");
    // An alias may not carry a deep anchor deeper than the limit either.
    let deep = format!("hydra:\n  a: &a\n    {}1\n  b:\n    {}*a\n", "- ".repeat(40), "- ".repeat(40));
    fs::write(dir.path().join("alias_deep.yaml"), &deep).unwrap();
    let out = zeroconv(dir.path(), &["inspect", "--config", "alias_deep.yaml"]);
    assert_clean_error(&out, &["alias_deep.yaml:5:", "more than the 64 levels"]);
}

// ---- sizes and numbers on the command line ----

const SMALL: [&str; 7] = common::training::SMALL_STEP;

#[test]
fn sizes_steps_and_guidance_are_checked_before_anything_runs() {
    let dir = tempdir("zeroconv-hostile-sizes-");
    let d = dir.path();
    // No weights or hint exist: the flags are checked before any file is read.
    let sample = |extra: &[&str]| {
        let mut args = vec!["sample", "--control", "cn.safetensors", "--hint", "map.png", "--out", "out.png"];
        args.extend(extra);
        zeroconv(d, &args)
    };
    assert_clean_error(&sample(&["--n", "0"]), &["--n 0", "at least 1"]);
    assert_clean_error(&sample(&["--steps", "0"]), &["--steps 0", "between 1 and 1000"]);
    assert_clean_error(&sample(&["--steps", "1001"]), &["--steps 1001", "between 1 and 1000"]);
    assert_clean_error(&sample(&["--cfg", "nan"]), &["--cfg NaN", "finite"]);
    assert_clean_error(&sample(&["--cfg", "inf"]), &["--cfg inf", "finite"]);
    assert_clean_error(&sample(&["--strength", "NaN"]), &["--strength NaN", "finite"]);
    assert_clean_error(&sample(&["--strength=-inf"]), &["--strength -inf", "finite"]);
    assert!(!d.join("out.png").exists());

    assert_clean_error(&zeroconv(d, &["bench", "train", "--steps", "0"]), &["--steps 0", "at least 1 step"]);
    assert_clean_error(&zeroconv(d, &["profile", "--steps", "0"]), &["--steps 0", "at least 1 step"]);
    assert!(!d.join("profile_trace.json").exists());
    assert_clean_error(
        &zeroconv(d, &["inspect", "--plan", "model.micro_batch_size=0"]),
        &["model.micro_batch_size", "at least 1"],
    );
    assert_clean_error(&zeroconv(d, &["inspect", "model.strength=.nan"]), &["model.strength", "finite"]);
    assert_clean_error(
        &zeroconv(d, &["inspect", "infer.unconditional_guidance_scale=.inf"]),
        &["infer.unconditional_guidance_scale", "finite"],
    );
}

#[test]
fn threads_above_the_cores_are_capped_with_a_notice() {
    let dir = tempdir("zeroconv-hostile-threads-");
    let mut args = vec!["bench", "train", "--steps", "1", "--warmup", "0", "--threads", "5000"];
    args.extend(SMALL);
    let start = Instant::now();
    let out = zeroconv(dir.path(), &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        stderr.contains(&format!("--threads 5000 is more than the {cores} cores available; using {cores}")),
        "{stderr}"
    );
    assert!(start.elapsed() < Duration::from_secs(60), "took {:?}", start.elapsed());
}

/// Writes a safetensors file of f32 tensors filled with 0.5.
fn write_tensors(path: &Path, tensors: &[(&str, &[usize])]) {
    let ts: Vec<(String, HostTensor)> = tensors
        .iter()
        .map(|(k, shape)| {
            let n = shape.iter().product();
            (k.to_string(), HostTensor::from_f64(shape.to_vec(), DType::F32, &vec![0.5; n]).unwrap())
        })
        .collect();
    write_safetensors(path, &ts, None).unwrap();
}

#[test]
fn forward_refuses_a_batch_of_zero() {
    let dir = tempdir("zeroconv-hostile-forward0-");
    let d = dir.path();
    write_tensors(&d.join("w.safetensors"), &[("control_model.zero_convs.0.0.bias", &[4])]);
    write_tensors(
        &d.join("in.safetensors"),
        &[("x", &[0, 4, 2, 2]), ("t", &[0]), ("context", &[0, 77, 32]), ("hint", &[0, 3, 16, 16])],
    );
    let args = ["forward", "--ckpt", "w.safetensors", "--inputs", "in.safetensors", "--out", "o.safetensors"];
    assert_clean_error(&zeroconv(d, &args), &["in.safetensors", "'x' has shape [0, 4, 2, 2]", "at least 1"]);
    assert!(!d.join("o.safetensors").exists());
}

// ---- outputs never land on inputs ----

#[test]
fn forward_never_writes_over_its_inputs_or_an_existing_file() {
    let dir = tempdir("zeroconv-hostile-forward-out-");
    let d = dir.path();
    write_tensors(&d.join("w.safetensors"), &[("control_model.zero_convs.0.0.bias", &[4])]);
    write_tensors(&d.join("in.safetensors"), &[("x", &[1, 4, 2, 2])]);
    std::os::unix::fs::symlink("w.safetensors", d.join("link.safetensors")).unwrap();
    fs::hard_link(d.join("in.safetensors"), d.join("hard.safetensors")).unwrap();
    fs::write(d.join("existing.safetensors"), b"keep me").unwrap();
    let before = |name: &str| fs::read(d.join(name)).unwrap();
    let (w, inputs) = (before("w.safetensors"), before("in.safetensors"));
    let forward = |out: &str, force: bool| {
        let mut args = vec!["forward", "--ckpt", "w.safetensors", "--inputs", "in.safetensors", "--out", out];
        if force {
            args.push("--force");
        }
        zeroconv(d, &args)
    };
    for force in [false, true] {
        assert_clean_error(&forward("w.safetensors", force), &["--out w.safetensors", "--ckpt w.safetensors"]);
        assert_clean_error(&forward("./link.safetensors", force), &["same file as --ckpt"]);
        assert_clean_error(&forward("in.safetensors", force), &["same file as --inputs in.safetensors"]);
        assert_clean_error(&forward("hard.safetensors", force), &["same file as --inputs"]);
    }
    assert_clean_error(&forward("existing.safetensors", false), &["existing.safetensors exists", "--force"]);
    assert_eq!(before("existing.safetensors"), b"keep me");
    assert_eq!((before("w.safetensors"), before("in.safetensors")), (w, inputs), "the inputs are untouched");

    // `sample --out` onto its control map or weights.
    fs::write(d.join("map.png"), png(1)).unwrap();
    let sample = |out: &str| {
        let args =
            ["sample", "--ckpt", "w.safetensors", "--control", "in.safetensors", "--hint", "map.png", "--out", out];
        zeroconv(d, &args)
    };
    assert_clean_error(&sample("map.png"), &["--out map.png is the same file as --hint map.png"]);
    assert_clean_error(&sample("link.safetensors"), &["same file as --ckpt w.safetensors"]);
    assert_clean_error(&sample("hard.safetensors"), &["same file as --control in.safetensors"]);
    assert_eq!(before("map.png"), png(1));
}

// ---- dataset make ----

fn png(n: u8) -> Vec<u8> {
    let img = RgbImage::from_fn(16, 16, |x, y| Rgb([n, (x * 16) as u8, (y * 16) as u8]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A fill50k-style folder: `source/N.png`, `target/N.png` and prompt.json lines naming them (`lines` replaces the
/// generated prompt.json when given).
fn fill50k(root: &Path, n: u8, lines: Option<String>) -> PathBuf {
    let input = root.join("fill50k");
    fs::create_dir_all(input.join("source")).unwrap();
    fs::create_dir_all(input.join("target")).unwrap();
    let mut text = String::new();
    for i in 0..n {
        fs::write(input.join(format!("source/{i}.png")), png(i)).unwrap();
        fs::write(input.join(format!("target/{i}.png")), png(i + 100)).unwrap();
        text += &format!("{{\"source\": \"source/{i}.png\", \"target\": \"target/{i}.png\", \"prompt\": \"p{i}\"}}\n");
    }
    fs::write(input.join("prompt.json"), lines.unwrap_or(text)).unwrap();
    input
}

#[test]
fn dataset_make_refuses_an_absurd_shard_number_width() {
    let dir = tempdir("zeroconv-hostile-width-");
    fill50k(dir.path(), 1, None);
    let out = zeroconv(dir.path(), &["dataset", "make", "fill50k", "--output", "x-%999999999d.tar"]);
    assert_clean_error(&out, &["x-%999999999d.tar", "999999999 digits wide is too wide"]);
    let out = zeroconv(dir.path(), &["dataset", "make", "fill50k", "--output", "x-%99999999999999999999999d.tar"]);
    assert_clean_error(&out, &["needs one shard number"]);
}

#[test]
fn dataset_make_refuses_prompt_json_paths_that_leave_the_folder() {
    let dir = tempdir("zeroconv-hostile-escape-");
    let root = dir.path();
    fs::write(root.join("secret.png"), png(7)).unwrap();
    let line = |source: &str, target: &str| {
        format!("{{\"source\": \"{source}\", \"target\": \"{target}\", \"prompt\": \"p\"}}\n")
    };
    let secret = root.join("secret.png").display().to_string();
    let cases = [
        (line("source/0.png", "../secret.png"), "line 1: \"target\": \"../secret.png\" leaves the input folder"),
        (line("source/0.png", "target/../../secret.png"), "leaves the input folder through `..`"),
        (line(&secret, "target/0.png"), "\"source\""),
        (
            format!("{}{}", line("source/0.png", "target/0.png"), line("source/0.png", "target/link.png")),
            "line 2: \"target\": \"target/link.png\" resolves to",
        ),
    ];
    for (k, (lines, want)) in cases.into_iter().enumerate() {
        let case = root.join(format!("case{k}"));
        fs::create_dir_all(&case).unwrap();
        let input = fill50k(&case, 1, Some(lines));
        std::os::unix::fs::symlink(root.join("secret.png"), input.join("target/link.png")).unwrap();
        let out = zeroconv(&case, &["dataset", "make", "fill50k", "--output", "shards/s-%03d.tar"]);
        assert_clean_error(&out, &["prompt.json", want, "refused"]);
        assert!(!case.join("shards").exists(), "nothing is written");
    }
    // Inside the folder, `./` and a symlink that stays inside are fine.
    let case = root.join("fine");
    fs::create_dir_all(&case).unwrap();
    let input = fill50k(&case, 1, Some(line("./source/0.png", "target/inside.png")));
    std::os::unix::fs::symlink("0.png", input.join("target/inside.png")).unwrap();
    let out = zeroconv(&case, &["dataset", "make", "fill50k", "--output", "shards/s-%03d.tar"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(case.join("shards/s-000.tar").is_file());
}

#[test]
fn dataset_make_never_writes_over_its_inputs_or_existing_shards() {
    let dir = tempdir("zeroconv-hostile-make-out-");
    let root = dir.path();
    let input = fill50k(root, 3, None);
    let image = fs::read(input.join("target/0.png")).unwrap();
    // The shard names resolve onto the input images (the case: the images were replaced by tar files).
    for force in [false, true] {
        let mut args = vec!["dataset", "make", "fill50k", "--output", "fill50k/target/%d.png", "--maxcount", "1"];
        if force {
            args.push("--force");
        }
        let out = zeroconv(root, &args);
        assert_clean_error(
            &out,
            &["--output fill50k/target/0.png", "the input image", "refusing to write over an input"],
        );
        assert_eq!(fs::read(input.join("target/0.png")).unwrap(), image, "the input is untouched");
    }
    // Through a symlinked output folder, onto a control map; a pattern that names prompt.json itself.
    std::os::unix::fs::symlink(&input, root.join("alias")).unwrap();
    let out = zeroconv(root, &["dataset", "make", "fill50k", "--output", "alias/source/%d.png", "--force"]);
    assert_clean_error(&out, &["--output alias/source/0.png", "the input control map fill50k/source/0.png"]);
    let out = zeroconv(root, &["dataset", "make", "fill50k", "--output", "alias/prompt.json%0d", "--maxcount", "9"]);
    assert!(out.status.success(), "prompt.json0 is a new name: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read(input.join("source/0.png")).unwrap(), png(0));
    // An existing shard is kept unless --force.
    let first = zeroconv(root, &["dataset", "make", "fill50k", "--output", "shards/s-%03d.tar"]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    fs::write(root.join("shards/s-000.tar"), b"an older shard").unwrap();
    let again = zeroconv(root, &["dataset", "make", "fill50k", "--output", "shards/s-%03d.tar"]);
    assert_clean_error(&again, &["shards/s-000.tar exists", "--force"]);
    assert_eq!(fs::read(root.join("shards/s-000.tar")).unwrap(), b"an older shard");
    let forced = zeroconv(root, &["dataset", "make", "fill50k", "--output", "shards/s-%03d.tar", "--force"]);
    assert!(forced.status.success(), "{}", String::from_utf8_lossy(&forced.stderr));
    assert_ne!(fs::read(root.join("shards/s-000.tar")).unwrap(), b"an older shard");
}

#[test]
fn dataset_make_refuses_fifos_and_devices_as_inputs() {
    let dir = tempdir("zeroconv-hostile-special-");
    let input = dir.path().join("input");
    for sub in ["images", "controls", "captions"] {
        fs::create_dir_all(input.join(sub)).unwrap();
    }
    for name in ["a", "b", "c"] {
        fs::write(input.join(format!("images/{name}.png")), png(1)).unwrap();
        fs::write(input.join(format!("captions/{name}.txt")), "a caption").unwrap();
    }
    fs::write(input.join("controls/a.png"), png(2)).unwrap();
    fs::write(input.join("controls/c.png"), png(3)).unwrap();
    // b's control map is /dev/zero (it used to be read until memory ran out), c's caption a FIFO (opening it used
    // to block forever).
    std::os::unix::fs::symlink("/dev/zero", input.join("controls/b.png")).unwrap();
    fs::remove_file(input.join("captions/c.txt")).unwrap();
    let status = Command::new("mkfifo").arg(input.join("captions/c.txt")).status().expect("mkfifo");
    assert!(status.success());
    let d = dir.path();
    let args = ["dataset", "make", "input", "--output", "shards/s-%03d.tar"];
    let out = zeroconv_limited(d, &args, 2048, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("controls/b.png: a device, not a regular file; refused"), "{stderr}");
    assert!(stderr.contains("captions/c.txt: a FIFO, not a regular file; refused"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote 1 samples into 1 shards (2 skipped)"));
    let strict = ["dataset", "make", "input", "--output", "strict/s-%03d.tar", "--strict"];
    let out = zeroconv_limited(d, &strict, 2048, Duration::from_secs(60));
    assert_clean_error(&out, &["sample 'b'", "not a regular file"]);
}

// ---- checkpoints: .nemo gzip bombs, zip CRCs ----

/// Bits of a DEFLATE stream, least significant first.
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u64, bits: u32) {
        self.acc |= value << self.n;
        self.n += bits;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }
    /// A Huffman code: most significant bit first.
    fn code(&mut self, code: u64, bits: u32) {
        let reversed = (0..bits).fold(0, |r, i| r | ((code >> i) & 1) << (bits - 1 - i));
        self.put(reversed, bits);
    }
    fn align(&mut self) {
        if self.n > 0 {
            self.put(0, 8 - self.n);
        }
    }
}

/// A gzipped tar holding `model_weights.ckpt` of `size` zero bytes, written directly as DEFLATE (a stored block for
/// the tar header, then one fixed-Huffman block of 258-byte matches): about size / 160 bytes.
fn gzip_bomb(size: u64) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_path("model_weights.ckpt").unwrap();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_cksum();
    let zeros = size + (512 - size % 512) % 512 + 1024;
    let mut bits = Bits { out: Vec::new(), acc: 0, n: 0 };
    bits.put(0, 1); // not the last block
    bits.put(0, 2); // stored
    bits.align();
    bits.put(512, 16);
    bits.put(!512u64 & 0xffff, 16);
    for &b in header.as_bytes() {
        bits.put(b as u64, 8);
    }
    bits.put(1, 1); // the last block
    bits.put(1, 2); // fixed Huffman
    bits.code(0x30, 8); // literal 0
    let matches = (zeros - 1) / 258;
    for _ in 0..matches {
        bits.code(0xC5, 8); // length 258
        bits.code(0, 5); // distance 1
    }
    for _ in 0..(zeros - 1) % 258 {
        bits.code(0x30, 8);
    }
    bits.code(0, 7); // end of block
    bits.align();
    let mut gz = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    gz.extend(bits.out);
    gz.extend([0; 4]); // CRC-32: never reached
    gz.extend(((512 + zeros) as u32).to_le_bytes());
    gz
}

#[test]
fn a_gzipped_nemo_bomb_is_refused_before_it_is_inflated() {
    let dir = tempdir("zeroconv-hostile-bomb-");
    let d = dir.path();
    let bomb = gzip_bomb(3 << 30);
    assert!(bomb.len() < 25 << 20, "{}", bomb.len());
    fs::write(d.join("bomb.nemo"), &bomb).unwrap();
    let start = Instant::now();
    let args = ["forward", "--ckpt", "bomb.nemo", "--inputs", "in.safetensors", "--out", "o.safetensors"];
    let out = zeroconv_limited(d, &args, 1024, Duration::from_secs(60));
    assert_clean_error(&out, &["bomb.nemo", "declares 3.0 GiB", "refused before inflating"]);
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    let err = Checkpoint::open(&d.join("bomb.nemo")).unwrap_err().to_string();
    assert!(err.contains("refused before inflating"), "{err}");
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint").join(name)
}

/// Where a zip record's bytes start and how long they are.
fn record_range(bytes: &[u8], name: &str) -> (usize, usize) {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
    let file = zip.by_name(name).unwrap();
    (file.data_start().unwrap() as usize, file.compressed_size() as usize)
}

#[test]
fn a_flipped_byte_in_a_ckpt_record_is_an_error_naming_it() {
    let dir = tempdir("zeroconv-hostile-crc-");
    let clean = fs::read(fixture("tiny.ckpt")).unwrap();
    Checkpoint::open(&fixture("tiny.ckpt")).expect("the fixture's CRCs match");
    for record in ["archive/data/0", "archive/data.pkl"] {
        let (start, len) = record_range(&clean, record);
        let mut bytes = clean.clone();
        bytes[start + len / 2] ^= 0x10;
        let path = dir.path().join("flipped.ckpt");
        fs::write(&path, &bytes).unwrap();
        let err = Checkpoint::open(&path).expect_err("a damaged record").to_string();
        assert!(err.contains("flipped.ckpt") && err.contains(&format!("zip record {record} is damaged")), "{err}");
        assert!(err.contains("CRC-32"), "{err}");
    }
    // The same inside an uncompressed .nemo (the weights member is a torch zip sliced out of the tar).
    let nemo = fs::read(fixture("tiny.nemo")).unwrap();
    let mut tar = tar::Archive::new(Cursor::new(&nemo));
    let member = tar
        .entries_with_seek()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path().unwrap().ends_with("model_weights.ckpt"))
        .expect("the weights member");
    let (at, size) = (member.raw_file_position() as usize, member.size() as usize);
    let (start, len) = record_range(&nemo[at..at + size], "archive/data/0");
    let mut bytes = nemo.clone();
    bytes[at + start + len / 2] ^= 0x01;
    let path = dir.path().join("flipped.nemo");
    fs::write(&path, &bytes).unwrap();
    let err = Checkpoint::open(&path).expect_err("a damaged record").to_string();
    assert!(err.contains("is damaged") && err.contains("CRC-32"), "{err}");
}

/// `model=null` (any section set to null) would silently become the built-in defaults (full SD 1.5): refused,
/// naming the section; `model.optim.sched=null` (no schedule) stays allowed. `inspect` of a config with the pixel
/// first stage reports no VAE weights.
#[test]
fn a_section_set_to_null_is_refused_and_inspect_counts_what_exists() {
    use zeroconv::io::config::load_config;
    let err = load_config(None, &["model=null".to_string()]).unwrap_err().to_string();
    assert!(err.contains("model is a section") && err.contains("built-in"), "{err}");
    let err = load_config(None, &["model.unet_config=null".to_string()]).unwrap_err().to_string();
    assert!(err.contains("model.unet_config is a section"), "{err}");
    let with = load_config(None, &["model.optim.sched.name=CosineAnnealing".into(), "trainer.max_steps=10".into()]);
    assert!(with.unwrap().model.optim.sched.is_some());
    let without =
        load_config(None, &["model.optim.sched.name=CosineAnnealing".into(), "model.optim.sched=null".into()]).unwrap();
    assert!(without.model.optim.sched.is_none());
    let mut out = Vec::new();
    let args = zeroconv::app::cli::inspect::InspectArgs {
        config: zeroconv::app::cli::ConfigArgs { config: None, overrides: vec![] },
        plan: false,
        keys: false,
        device: None,
    };
    zeroconv::app::cli::inspect::run(&args, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let vae = text.lines().find(|l| l.starts_with("VAE")).unwrap();
    assert!(vae.split_whitespace().any(|w| w == "0"), "the pixel first stage has no weights: {vae}");
}

/// An image size the first stage and the U-Net cannot divide is one error naming the setting, not a shape error
/// from inside the model.
#[test]
fn an_image_size_the_model_cannot_divide_names_the_setting() {
    use zeroconv::app::train::train;
    use zeroconv::io::config::{load_config, CropSize};
    let dir = common::training::tmp("hostile-size");
    for side in [60usize, 72] {
        let mut cfg = load_config(None, &["trainer.max_steps=1".into(), "model.base_pretrain_steps=0".into()]).unwrap();
        let a = &mut cfg.model.data.train.augmentations;
        a.resize_smallest_side = Some(side as u32);
        a.center_crop_h_w = Some(CropSize { height: side as u32, width: side as u32 });
        let opts = common::training::opts(&dir.path().join(format!("run{side}")));
        let err = train(&cfg, &opts).unwrap_err().to_string();
        assert!(err.contains(&format!("{side}x{side}")) && err.contains("center_crop_h_w"), "{side}: {err}");
    }
}

/// `sample --out` never replaces an existing image without `--force` (checked before anything is loaded).
#[test]
fn sample_refuses_to_overwrite_an_image_without_force() {
    let dir = tempfile::Builder::new().prefix("zeroconv-hostile-sample-out-").tempdir().unwrap();
    std::fs::write(dir.path().join("out.png"), b"an image the user keeps").unwrap();
    let args = [
        "sample",
        "--ckpt",
        "sd.safetensors",
        "--control",
        "cn.safetensors",
        "--hint",
        "map.png",
        "--prompt",
        "a cat",
        "--out",
        "out.png",
    ];
    let o = zeroconv(dir.path(), &args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.contains("--out out.png exists; pass --force"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("out.png")).unwrap(), b"an image the user keeps");
    // With --force the check passes, and the run goes on to fail on the missing weights instead.
    let mut forced = args.to_vec();
    forced.push("--force");
    let o = zeroconv(dir.path(), &forced);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && !err.contains("exists") && !err.contains("panicked"), "{err}");
}

/// A negative count is one clear error naming the flag, not clap's tip to write `-- -5` (which would pass it as a
/// config override); nothing runs.
#[test]
fn negative_counts_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["sample", "--steps", "-5", "--ckpt", "x", "--control", "y", "--hint", "z", "--out", "o.png"][..],
        &["bench", "train", "--steps", "-1"],
        &["train", "--threads", "-2"],
        &["launch", "--nproc-per-node", "-2", "train"],
    ] {
        let out = zeroconv(dir.path(), args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        let flag = args.iter().find(|a| a.starts_with("--") && err.contains(&format!("'{a} <"))).copied();
        assert!(err.contains("is negative") && flag.is_some(), "{args:?}: {err}");
        assert!(!err.contains("-- -"), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing is written");
}

/// `infer.*` are the defaults of `zeroconv sample` (checked before any weights are read): a config's
/// `infer.inference_steps` or `infer.eta` out of range is refused as the flag would be, and the flag wins over it.
#[test]
fn infer_keys_are_the_defaults_of_sample() {
    let dir = tempfile::tempdir().unwrap();
    let base = ["sample", "--control", "c.safetensors", "--hint", "h.png", "--out", "o.png"];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let out = zeroconv(dir.path(), &args);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["infer.eta=2"]);
    assert!(err.contains("infer.eta") && err.contains("outside"), "{err}");
    let err = run(&["infer.inference_steps=100000"]);
    assert!(err.contains("infer.inference_steps"), "{err}");
    // The flags are checked against the same ranges, and win over the config: --steps 0 is refused even though
    // infer.inference_steps is fine, and a valid --steps with a valid config goes on to the missing files.
    let err = run(&["--steps", "0", "infer.inference_steps=20"]);
    assert!(err.contains("--steps 0"), "{err}");
    let err = run(&["--eta", "1.5"]);
    assert!(err.contains("--eta 1.5"), "{err}");
    let err = run(&["--steps", "10", "infer.inference_steps=20"]);
    assert!(!err.contains("--steps") && err.contains("h.png"), "{err}");
    // infer.num_images_per_prompt is the default of --n: 0 from the config reaches the same check as --n 0.
    let err = run(&["infer.num_images_per_prompt=0"]);
    assert!(err.contains("the number of images must be at least 1"), "{err}");
    assert!(!run(&["--n", "2", "infer.num_images_per_prompt=0"]).contains("number of images"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing is written");
}

/// A sampling request larger than memory is one error with both figures, before any buffer is allocated (it used to
/// abort in the allocator).
#[test]
fn sampling_more_images_than_memory_holds_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    image::RgbImage::new(64, 64).save(dir.path().join("h.png")).unwrap();
    let out = zeroconv(
        dir.path(),
        &["sample", "--control", "c.safetensors", "--hint", "h.png", "--n", "100000000", "--out", "o.png"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("sampling 100000000 images of 64x64 needs") && err.contains("GiB"), "{err}");
    assert!(!err.contains("panicked") && !err.contains("memory allocation"), "{err}");
    assert!(!dir.path().join("o.png").exists());
}
