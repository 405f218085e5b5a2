//! Running the `zeroconv` binary from a test, in the test's own folder.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs the binary with `args` in `dir`.
pub fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zeroconv")).args(args).current_dir(dir).output().expect("run zeroconv")
}

/// What a run printed: stdout, then stderr.
pub fn printed(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Runs the binary in `dir`; returns what it printed, failing the test with it when the command fails.
pub fn run_ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    let text = printed(&out);
    assert!(out.status.success(), "zeroconv {args:?} failed:\n{text}");
    text
}

/// Runs the binary in `dir` expecting it to fail; returns what it printed.
pub fn run_fails(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    let text = printed(&out);
    assert!(!out.status.success(), "zeroconv {args:?} should have failed:\n{text}");
    text
}
