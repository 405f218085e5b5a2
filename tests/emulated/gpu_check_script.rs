//! `scripts/gpu-check --run` on a machine without a GPU fails cleanly: non-zero exit, one line naming the failed
//! step and why, a summary table last. With a prepared `.gpu/` (scripts/gpu-check --prepare) the failure is the
//! probe step's ("CUDA unavailable"); without one, the missing archive is named.

use std::process::Command;

#[test]
fn run_without_a_gpu_fails_in_its_probe_step_with_a_clear_message() {
    let has_gpu = std::env::var("ZEROCONV_EXPECT_GPU").as_deref() == Ok("1")
        || (std::env::var("ZEROCONV_EXPECT_GPU").is_err() && std::path::Path::new("/dev/nvidiactl").exists());
    if has_gpu {
        println!("a GPU is expected here: the GPU-less failure is not checked");
        return;
    }
    let repo = env!("CARGO_MANIFEST_DIR");
    let logs = tempfile::tempdir().unwrap();
    let o = Command::new(format!("{repo}/scripts/gpu-check"))
        .args(["--run", logs.path().to_str().unwrap()])
        .env_remove("ZEROCONV_EXPECT_GPU")
        .output()
        .expect("run scripts/gpu-check");
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "gpu-check --run succeeded without a GPU:\n{out}\n{err}");
    if std::path::Path::new(repo).join(".gpu/bin.tar.gz").exists() {
        assert!(err.contains("gpu-check: probe FAILED") && err.contains("CUDA unavailable"), "{out}\n{err}");
        assert!(out.lines().last().is_some_and(|l| l.starts_with("| ")), "summary table last:\n{out}");
        assert!(out.contains("| probe | FAILED |") && out.contains("| GEMMs vs CPU | skipped |"), "{out}");
        assert!(logs.path().join("summary.md").exists());
    } else {
        assert!(err.contains("is missing: run scripts/gpu-check --prepare"), "{err}");
    }
}
