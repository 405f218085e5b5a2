//! `--device`: the one place that picks the backend. The same training step on `cpu` and on `cuda-emu` (the CUDA
//! executor under emulation) prints the same loss; `cuda` without a GPU is one clear line (non-zero exit, no panic); `profile
//! --device cuda-emu` lists the lowered device commands; the NaN/Inf check works on both devices.
//!
//! The emulated device runs every kernel under the CUDA emulator (with liveness poisoning), about 10 s per step of
//! the tiny config shrunk below on 2 cores, so these runs use one micro-batch, 8x8 latents and one U-Net level.

use crate::common;

use std::process::{Command, Output};
use tempfile::TempDir;
use zeroconv::app::device::{compile_program, CompileOptions, DeviceChoice};
use zeroconv::engine::{HostTensor, Program};
use zeroconv::graph::{DType, Graph, UnaryOp};

const SMALL: [&str; 7] = common::training::SMALL_STEP;

fn tmp(name: &str) -> TempDir {
    tempfile::Builder::new().prefix(&format!("zeroconv-{name}-")).tempdir().expect("temporary folder")
}

fn config() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.yaml").to_string()
}

/// Runs the binary in `dir` with `args`.
fn zeroconv(dir: &TempDir, args: &[&str]) -> Output {
    zeroconv_with(dir, args, &[])
}

/// [`zeroconv`] with environment variables set.
fn zeroconv_with(dir: &TempDir, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zeroconv"))
        .args(args)
        .current_dir(dir.path())
        .env_remove("ZEROCONV_DEBUG")
        .env_remove("ZEROCONV_CHECK_FINITE")
        .env_remove("ZEROCONV_LIBRARY_WORKSPACE_MIB")
        .envs(env.iter().copied())
        .output()
        .expect("run zeroconv")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// `bench train` on `device`: the loss it prints after the timed steps.
fn bench_loss(device: &str) -> f64 {
    bench_loss_with(device, &[])
}

/// [`bench_loss`] with more overrides.
fn bench_loss_with(device: &str, overrides: &[&str]) -> f64 {
    let dir = tmp(&format!("bench-{device}"));
    let cfg = config();
    let mut args = vec!["bench", "train", "--config", &cfg, "--steps", "3", "--warmup", "0", "--device", device];
    args.extend(SMALL);
    args.extend(overrides);
    // Randomly initialised, the U-Net's output convolution is zero (as in LDM), so with the U-Net locked nothing
    // receives a gradient and the loss never moves. Unlocked, the output convolution trains from step 1 and the
    // loss printed after step 3 depends on the whole updated network (1.05285 -> 1.03282 on the CPU).
    args.push("model.sd_locked=False");
    let o = zeroconv(&dir, &args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "bench train --device {device} failed:\n{out}\n{err}");
    assert!(out.lines().last().is_some_and(|l| l.ends_with("samples/s")), "{out}");
    let line = out.lines().find(|l| l.starts_with("step:")).unwrap_or_else(|| panic!("no step line:\n{out}"));
    let loss = line.split("(loss ").nth(1).and_then(|s| s.strip_suffix(')')).unwrap_or_else(|| panic!("{line}"));
    loss.parse().unwrap_or_else(|e| panic!("{line}: {e}"))
}

#[test]
fn bench_train_on_cuda_emu_prints_the_cpu_loss() {
    let cpu = bench_loss("cpu");
    let emu = bench_loss("cuda-emu");
    assert!(cpu.is_finite() && cpu > 0.0, "{cpu}");
    // 1e-5 relative, plus the rounding of the five printed decimals.
    assert!((emu - cpu).abs() <= 1e-5 * cpu.abs() + 1e-5, "cpu loss {cpu}, cuda-emu loss {emu}");
}

/// The channels-last step through the CUDA path (cuDNN NHWC descriptors, GroupNorm through planar scratch, the
/// upsampling as a broadcast) trains as the planar step does on the CPU.
#[test]
fn a_channels_last_step_on_cuda_emu_prints_the_planar_cpu_loss() {
    let cpu = bench_loss("cpu");
    let emu = bench_loss_with("cuda-emu", &["model.channels_last=True"]);
    assert!((emu - cpu).abs() <= 1e-5 * cpu.abs() + 1e-5, "planar cpu loss {cpu}, channels-last cuda-emu loss {emu}");
}

/// Whether this machine has a GPU: ZEROCONV_EXPECT_GPU=1 or 0 when set, else the NVIDIA driver's control device.
fn gpu_expected() -> bool {
    match std::env::var("ZEROCONV_EXPECT_GPU").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => std::path::Path::new("/dev/nvidiactl").exists(),
    }
}

#[test]
fn device_cuda_without_a_gpu_is_one_clear_line_not_a_panic() {
    if gpu_expected() {
        println!("a GPU is expected here: the GPU-less error path is not checked");
        return;
    }
    let dir = tmp("cuda");
    let cfg = config();
    let runs: [&[&str]; 5] = [
        &["bench", "train", "--config", &cfg, "--device", "cuda"],
        &["profile", "--config", &cfg, "--device", "cuda"],
        &["train", "--config", &cfg, "--device", "cuda", "trainer.max_steps=1"],
        &[
            "sample",
            "--config",
            &cfg,
            "--device",
            "cuda",
            "--control",
            "c.safetensors",
            "--hint",
            "h.png",
            "--prompt",
            "a cat",
            "--out",
            "s.png",
        ],
        &[
            "forward",
            "--ckpt",
            "w.safetensors",
            "--inputs",
            "in.safetensors",
            "--out",
            "o.safetensors",
            "--device",
            "cuda",
        ],
    ];
    for args in runs {
        let o = zeroconv(&dir, args);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: expected a failure exit:\n{out}\n{err}");
        assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: expected one line on stderr:\n{err}");
        // What was probed and what is missing: the driver library, by the names tried.
        assert!(
            lines[0].contains("CUDA unavailable") && lines[0].contains("libcuda.so"),
            "{args:?}: unclear error:\n{err}"
        );
    }
    // Nothing was written (the check comes before any work).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn profile_on_cuda_emu_lists_the_lowered_commands() {
    let dir = tmp("profile");
    let cfg = config();
    let trace = dir.path().join("trace.json");
    let trace = trace.to_str().unwrap();
    let mut args =
        vec!["profile", "--config", &cfg, "--steps", "1", "--top", "5", "--trace", trace, "--device", "cuda-emu"];
    args.push("--commands");
    args.extend(SMALL);
    let o = zeroconv(&dir, &args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "profile --device cuda-emu failed:\n{out}\n{err}");
    assert!(std::path::Path::new(trace).exists());
    let summary = out
        .lines()
        .find(|l| l.starts_with("device commands per step: "))
        .unwrap_or_else(|| panic!("no command summary:\n{out}"));
    // "device commands per step: N (launch a, gemm b, conv c, copy d, memset e)"
    let total: usize = summary.split_whitespace().nth(4).unwrap().parse().unwrap();
    let counts: Vec<(String, usize)> = summary
        .split_once('(')
        .unwrap()
        .1
        .trim_end_matches(')')
        .split(", ")
        .map(|kv| {
            let (k, v) = kv.split_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect();
    let kinds: Vec<&str> = counts.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["launch", "gemm", "conv", "copy", "memset"], "{summary}");
    assert_eq!(counts.iter().map(|c| c.1).sum::<usize>(), total, "{summary}");
    for k in ["launch", "gemm", "conv"] {
        assert!(counts.iter().any(|(n, c)| n == k && *c > 0), "no {k} commands: {summary}");
    }
    // --commands: one line per command, `node N (op): <describe()>`.
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("node ")).collect();
    assert_eq!(lines.len(), total, "{out}");
    assert!(lines.iter().any(|l| l.contains("(conv2d): conv ")), "{out}");
    assert!(lines.iter().any(|l| l.contains(": launch ")), "{out}");
    assert!(lines.iter().any(|l| l.contains(": gemm ")), "{out}");

    // --commands needs the CUDA executor.
    let o = zeroconv(&dir, &["profile", "--config", &cfg, "--commands"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("--device cuda-emu"), "{}", text(&o).1);
}

#[test]
fn the_finite_check_runs_on_every_device() {
    // log(-1) = NaN at element 2, carried through silu into the output.
    let build = || {
        let mut g = Graph::new();
        let x = g.input("x", [4], DType::F32);
        let a = g.unary(UnaryOp::Exp, x).unwrap();
        let l = g.unary(UnaryOp::Log, x).unwrap();
        let s = g.add(a, l).unwrap();
        let y = g.silu(s).unwrap();
        g.outputs.push(y);
        (g, x)
    };
    let x_data = HostTensor::from_f64([4], DType::F32, &[1.0, 2.0, -1.0, 3.0]).unwrap();
    for device in [DeviceChoice::Cpu, DeviceChoice::CudaEmu] {
        let (g, x) = build();
        let mut p = compile_program(device, g, &CompileOptions::threads(Some(1))).unwrap();
        assert_eq!(p.device(), device);
        p.upload(x, &x_data).unwrap();
        p.launch().unwrap(); // unchecked: the NaN flows through
        p.set_check_finite(true);
        let err = p.launch().unwrap_err().to_string();
        assert!(err.contains("NaN") && err.contains("element 2"), "{device}: {err}");
        match device {
            // The CPU names the kernel that made it.
            DeviceChoice::Cpu => assert!(err.contains("(log)"), "{err}"),
            // The CUDA executor checks after the step and says how to find the kernel.
            _ => assert!(err.contains("output") && err.contains("--device cpu"), "{err}"),
        }
        p.set_check_finite(false);
        p.launch().unwrap();
    }
    if !gpu_expected() {
        assert!(compile_program(DeviceChoice::Cuda, build().0, &CompileOptions::default()).is_err());
    }
}

/// Without `--device`, the config's `trainer.accelerator` chooses: `gpu` without a usable GPU is one clear line
/// naming the key (non-zero exit, nothing run); `auto` runs on the CPU and says why once; `cpu` says nothing; an
/// explicit `--device cpu` wins over `gpu`.
#[test]
fn trainer_accelerator_chooses_the_device_when_no_flag_does() {
    if gpu_expected() {
        println!("a GPU is expected here: the GPU-less accelerator paths are not checked");
        return;
    }
    let dir = tmp("accelerator");
    let cfg = config();
    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", "train", "--config", &cfg, "--steps", "1", "--warmup", "0"];
        args.extend(SMALL);
        args.extend(extra);
        zeroconv(&dir, &args)
    };
    let o = bench(&["trainer.accelerator=gpu"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(err.contains("trainer.accelerator is gpu") && err.contains("libcuda"), "{err}");
    assert_eq!(err.lines().filter(|l| !l.trim().is_empty()).count(), 1, "{err}");
    assert!(out.is_empty(), "nothing ran: {out}");

    let o = bench(&["trainer.accelerator=auto"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("trainer.accelerator=auto: no usable GPU") && err.contains("running on the CPU"), "{err}");
    assert!(out.lines().last().is_some_and(|l| l.ends_with("samples/s")), "{out}");

    for extra in [&["trainer.accelerator=cpu"][..], &["--device", "cpu", "trainer.accelerator=gpu"]] {
        let o = bench(extra);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{extra:?}: {err}");
        assert!(!err.contains("accelerator"), "{extra:?}: {err}");
        assert!(out.lines().last().is_some_and(|l| l.ends_with("samples/s")), "{out}");
    }
}

/// `inspect --plan --device cuda` plans the CUDA executor's device memory without a GPU (nothing is allocated), the
/// library workspace on a line of its own, sized by `ZEROCONV_LIBRARY_WORKSPACE_MIB`; without `--device` there is no
/// such line.
#[test]
fn inspect_plans_the_cuda_executors_memory_without_a_gpu() {
    let dir = tmp("inspect-cuda");
    let cfg = config();
    let o = zeroconv(&dir, &["inspect", "--config", &cfg, "--plan", "--device", "cuda"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let line = out.lines().find(|l| l.starts_with("CUDA executor")).unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("GiB of device memory") && line.contains("arena") && line.contains("optimizer state"),
        "{line}"
    );
    let workspace = |out: &str| -> String {
        out.lines().find(|l| l.trim_start().starts_with("library workspace:")).unwrap_or_else(|| panic!("{out}")).into()
    };
    let ws = workspace(&out);
    assert!(ws.contains(" 32.0 MiB") && ws.contains("ZEROCONV_LIBRARY_WORKSPACE_MIB"), "{ws}");
    let args = ["inspect", "--config", &cfg, "--plan", "--device", "cuda"];
    let o = zeroconv_with(&dir, &args, &[("ZEROCONV_LIBRARY_WORKSPACE_MIB", "0")]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(workspace(&text(&o).0).contains(" 0.0 MiB"), "{}", text(&o).0);
    let o = zeroconv_with(&dir, &args, &[("ZEROCONV_LIBRARY_WORKSPACE_MIB", "lots")]);
    let err = text(&o).1;
    assert!(!o.status.success() && err.contains("ZEROCONV_LIBRARY_WORKSPACE_MIB=\"lots\""), "{err}");
    let plain = zeroconv(&dir, &["inspect", "--config", &cfg, "--plan"]);
    assert!(!text(&plain).0.contains("CUDA executor"), "only with --device");
}
