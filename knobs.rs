//! Every environment variable zeroconv reads, in one table ([`KNOBS`]: name, what it takes, default, one line), and
//! the one place that reads them. Each is read once per process (the first time it is asked for) and the value
//! kept, so a run cannot change behaviour halfway. build.rs reads three more at build time ([`BUILD_KNOBS`]); a
//! build script cannot use the crate, so they are only documented here.
//!
//! `ZEROCONV_DEBUG` has levels, each including the ones below it:
//! 1. the pass pipeline's summary and the fusion report (kernels before/after, fused groups, planned peak);
//! 2. one line per kernel as it runs (name, shape, time, GFLOP/s, GB/s);
//! 3. every fusion decision (fused, refused with the reason, undone);
//! 4. the generated source of every fused kernel the CUDA executor compiles.

use crate::error::{Error, Result};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;

/// An environment variable zeroconv reads.
#[derive(Clone, Copy, Debug)]
pub struct Knob {
    pub name: &'static str,
    /// What it takes.
    pub takes: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
}

pub const DEBUG: &str = "ZEROCONV_DEBUG";
pub const LOG: &str = "ZEROCONV_LOG";
pub const CHECK_FINITE: &str = "ZEROCONV_CHECK_FINITE";
pub const KERNEL_CACHE: &str = "ZEROCONV_KERNEL_CACHE";
pub const NVRTC_LIB: &str = "ZEROCONV_NVRTC_LIB";
pub const CUDA_LIB_DIRS: &str = "ZEROCONV_CUDA_LIB_DIRS";
pub const EMU_CXX: &str = "ZEROCONV_EMU_CXX";
pub const EMU_CACHE: &str = "ZEROCONV_EMU_CACHE";
pub const LIBRARY_WORKSPACE_MIB: &str = "ZEROCONV_LIBRARY_WORKSPACE_MIB";

/// The run-time knobs.
pub const KNOBS: &[Knob] = &[
    Knob {
        name: DEBUG,
        takes: "0-4",
        default: "0",
        doc: "1: pass summary and fusion report; 2: also one line per kernel as it runs; 3: also every fusion \
              decision; 4: also the generated source of every fused CUDA kernel",
    },
    Knob {
        name: LOG,
        takes: "comma-separated topics: fusion",
        default: "",
        doc: "`fusion` prints every fusion decision (as ZEROCONV_DEBUG=3, without the per-kernel lines)",
    },
    Knob {
        name: CHECK_FINITE,
        takes: "1",
        default: "off",
        doc: "check every kernel's outputs for NaN/Inf and stop at the first kernel that produces one, naming it",
    },
    Knob {
        name: KERNEL_CACHE,
        takes: "a folder",
        default: "$XDG_CACHE_HOME/zeroconv/kernels or ~/.cache/zeroconv/kernels",
        doc: "where NVRTC-compiled fused kernels are cached",
    },
    Knob {
        name: NVRTC_LIB,
        takes: "a path to libnvrtc",
        default: "the loader's search path",
        doc: "the NVRTC library to load (also read by build.rs)",
    },
    Knob {
        name: CUDA_LIB_DIRS,
        takes: "colon-separated folders",
        default: "",
        doc: "where to look first for the CUDA driver, cuBLAS(Lt), cuDNN and NVRTC libraries",
    },
    Knob {
        name: EMU_CXX,
        takes: "a C++ compiler",
        default: "g++",
        doc: "the compiler the CUDA emulator builds kernels with",
    },
    Knob {
        name: EMU_CACHE,
        takes: "a folder",
        default: "emulated-kernels/ in the build's target folder, else the system temp folder",
        doc: "where emulated kernel modules are cached",
    },
    Knob {
        name: LIBRARY_WORKSPACE_MIB,
        takes: "a whole number of MiB",
        default: "32",
        doc: "the CUDA executor's one workspace for cuBLASLt and cuDNN (0: none, which rules out the algorithms that \
              need one)",
    },
];

/// The build-time knobs (read by build.rs, listed here for the documentation).
pub const BUILD_KNOBS: &[Knob] = &[
    Knob {
        name: "ZEROCONV_REQUIRE_KERNELS",
        takes: "1",
        default: "off",
        doc: "fail the build when NVRTC or ptxas is missing or a kernel does not compile (scripts/test sets it)",
    },
    Knob {
        name: NVRTC_LIB,
        takes: "a path to libnvrtc",
        default: "the loader's search path",
        doc: "the NVRTC the build compiles kernels with",
    },
    Knob { name: "ZEROCONV_PTXAS", takes: "a path to ptxas", default: "PATH", doc: "the assembler of the cubins" },
];

/// The raw value of knob `name`, read once per process. `name` must be in [`KNOBS`].
pub fn raw(name: &str) -> Option<OsString> {
    static VALUES: OnceLock<Vec<(&'static str, Option<OsString>)>> = OnceLock::new();
    let values = VALUES.get_or_init(|| KNOBS.iter().map(|k| (k.name, std::env::var_os(k.name))).collect());
    match values.iter().find(|(n, _)| *n == name) {
        Some((_, v)) => v.clone(),
        None => panic!("{name} is not in knobs::KNOBS: every environment variable zeroconv reads is listed there"),
    }
}

/// A knob as a string (`None` when unset or not UTF-8).
pub fn string(name: &str) -> Option<String> {
    raw(name).and_then(|v| v.into_string().ok())
}

/// A knob as a path (`None` when unset or empty).
pub fn path(name: &str) -> Option<PathBuf> {
    raw(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// `ZEROCONV_DEBUG`'s level (0 when unset or not a number).
pub fn debug_level() -> u32 {
    string(DEBUG).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// `ZEROCONV_LIBRARY_WORKSPACE_MIB` in bytes ([`crate::engine::gpu::LIBRARY_WORKSPACE`] when unset); a value that is
/// not a whole number of MiB is an error naming the variable.
pub fn library_workspace_bytes() -> Result<u64> {
    match string(LIBRARY_WORKSPACE_MIB) {
        None => Ok(crate::engine::gpu::LIBRARY_WORKSPACE),
        Some(v) => mib_to_bytes(LIBRARY_WORKSPACE_MIB, &v),
    }
}

/// `value` (a whole number of MiB, surrounding spaces allowed) in bytes, or an error naming `name` and the value.
fn mib_to_bytes(name: &str, value: &str) -> Result<u64> {
    value.trim().parse::<u64>().ok().and_then(|m| m.checked_mul(1 << 20)).ok_or_else(|| {
        Error::msg(format!("{name}={value:?}: expected a whole number of MiB (0 for no library workspace)"))
    })
}

/// `ZEROCONV_CHECK_FINITE=1`.
pub fn check_finite() -> bool {
    string(CHECK_FINITE).is_some_and(|v| v.trim() == "1")
}

/// Whether every fusion decision is printed: `ZEROCONV_LOG` names `fusion`, or `ZEROCONV_DEBUG` is 3 or more.
pub fn log_fusion_decisions() -> bool {
    debug_level() >= 3 || string(LOG).is_some_and(|v| v.split(',').any(|t| t.trim() == "fusion"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No source file reads a `ZEROCONV_*` variable except through this module (build.rs, a separate program, is
    /// the exception), and README documents every knob.
    #[test]
    fn every_knob_is_read_here_and_documented() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut offenders = Vec::new();
        let mut stack: Vec<PathBuf> =
            ["app", "engine", "graph", "io", "kernels", "models"].iter().map(|d| root.join(d)).collect();
        stack.push(root.join("lib.rs"));
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            } else if p.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for pat in ["var(\"ZEROCONV_", "var_os(\"ZEROCONV_"] {
                    if text.contains(pat) {
                        offenders.push(p.display().to_string());
                    }
                }
            }
        }
        assert!(offenders.is_empty(), "read ZEROCONV_* through knobs.rs instead: {offenders:?}");
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        for k in KNOBS.iter().chain(BUILD_KNOBS) {
            assert!(readme.contains(&format!("`{}`", k.name)), "README.md does not document {}", k.name);
        }
    }

    #[test]
    fn the_library_workspace_is_whole_mib_and_a_bad_value_names_the_variable() {
        assert_eq!(mib_to_bytes(LIBRARY_WORKSPACE_MIB, "32").unwrap(), 32 << 20);
        assert_eq!(mib_to_bytes(LIBRARY_WORKSPACE_MIB, " 0 ").unwrap(), 0);
        for bad in ["", "1.5", "-1", "32MiB", "99999999999999999"] {
            let e = mib_to_bytes(LIBRARY_WORKSPACE_MIB, bad).unwrap_err().to_string();
            assert!(e.contains("ZEROCONV_LIBRARY_WORKSPACE_MIB") && e.contains("whole number of MiB"), "{bad}: {e}");
        }
    }

    #[test]
    #[should_panic(expected = "not in knobs::KNOBS")]
    fn an_unlisted_knob_is_a_bug() {
        raw("ZEROCONV_NOT_A_KNOB");
    }
}
