//! Building a kernel source into a shared library for the host: `g++ -E` (expands the source's own macros so
//! every kernel is visible), the rewrite of `source.rs`, then `g++ -O1 -shared -fPIC` with `cuda_emu.h`.
//! Libraries are cached on disk by a hash of everything that affects them, so a test run compiles only what
//! changed.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::source::host_translation_unit;
use crate::error::{Error, Result};
use crate::kernels::HEADERS;

/// The emulation header, written next to every generated translation unit.
pub(crate) const HEADER: &str = include_str!("cuda_emu.h");
const HEADER_NAME: &str = "cuda_emu.h";

/// Bump when the way libraries are produced changes, so stale cached ones are not reused.
const CACHE_SCHEMA: &str = "zeroconv-emulate-2";

/// The emulated architecture: what `__CUDA_ARCH__` reads during preprocessing (sm_80, the oldest target built).
/// `__CUDACC_EMULATED__` lets a header choose its emulator path while the source's own macros are expanded (the
/// inline PTX of kernels/mma.cuh cannot compile for the host); cuda_emu.h defines it again for the compile.
const PREPROCESS_FLAGS: &[&str] =
    &["-E", "-x", "c++", "-std=c++17", "-D__CUDACC__", "-D__CUDA_ARCH__=800", "-D__CUDACC_EMULATED__=1"];

// -O1 keeps compile time low; no FMA contraction and no strict aliasing, so results do not depend on the host
// CPU's instruction set and type-punning kernel code behaves as on the GPU.
const COMPILE_FLAGS: &[&str] = &[
    "-x",
    "c++",
    "-std=c++17",
    "-O1",
    "-shared",
    "-fPIC",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",
    "-ffp-contract=off",
];

/// The C++ compiler: `ZEROCONV_EMU_CXX` if set, else `g++`, and its version line (part of the cache key).
struct Compiler {
    program: String,
    version: String,
}

fn compiler() -> Result<&'static Compiler> {
    static COMPILER: OnceLock<std::result::Result<Compiler, String>> = OnceLock::new();
    COMPILER
        .get_or_init(|| {
            probe_compiler(&crate::knobs::string(crate::knobs::EMU_CXX).unwrap_or_else(|| "g++".to_string()))
        })
        .as_ref()
        .map_err(|e| Error::msg(e.clone()))
}

fn probe_compiler(program: &str) -> std::result::Result<Compiler, String> {
    let hint = "the CUDA kernel emulator needs a C++17 compiler: install g++ (Debian/Ubuntu: apt-get install g++) \
                or set ZEROCONV_EMU_CXX to one";
    let out = Command::new(program)
        .arg("--version")
        .output()
        .map_err(|e| format!("`{program} --version` could not run ({e}); {hint}"))?;
    if !out.status.success() {
        return Err(format!("`{program} --version` exited with {}; {hint}", out.status));
    }
    let version = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string();
    Ok(Compiler { program: program.to_string(), version })
}

/// FNV-1a, 64 bits: a stable hash (unlike `DefaultHasher`, it is the same across Rust versions).
/// Parts are separated by a 0xff byte, so ["ab", "c"] and ["a", "bc"] differ.
fn fnv1a(parts: &[&str]) -> u64 {
    use crate::hash::{fnv1a_extend, FNV_OFFSET};
    parts.iter().fold(FNV_OFFSET, |h, p| fnv1a_extend(fnv1a_extend(h, p.as_bytes()), &[0xff]))
}

/// Where compiled modules are cached by default: `ZEROCONV_EMU_CACHE` if set; else `emulated-kernels/` in the
/// Cargo profile directory of the running executable (`target/debug/` for tests and the debug binary); else a
/// folder in the system temporary directory.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = crate::knobs::raw(crate::knobs::EMU_CACHE) {
        return PathBuf::from(dir);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(deps) = exe.ancestors().find(|a| a.file_name().is_some_and(|n| n == "deps")) {
            if let Some(profile) = deps.parent() {
                return profile.join("emulated-kernels");
            }
        }
        if let Some(dir) = exe.parent() {
            return dir.join("emulated-kernels");
        }
    }
    std::env::temp_dir().join("zeroconv-emulated-kernels")
}

fn io_error(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::file(path, format!("{what}: {e}"))
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|e| io_error(path, "cannot write", e))
}

/// Runs the compiler; on failure, the error quotes its first lines of diagnostics.
fn run(cxx: &Compiler, args: &[&str], dir: &Path, what: &str) -> Result<Vec<u8>> {
    let out = Command::new(&cxx.program)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| Error::msg(format!("cannot run `{}` to {what}: {e}", cxx.program)))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let diagnostics = String::from_utf8_lossy(&out.stderr);
    let shown: Vec<&str> = diagnostics.lines().take(40).collect();
    let more = diagnostics.lines().count().saturating_sub(shown.len());
    Err(Error::msg(format!(
        "`{}` failed to {what} (files in {}):\n{}{}",
        cxx.program,
        dir.display(),
        shown.join("\n"),
        if more > 0 { format!("\n... ({more} more lines)") } else { String::new() }
    )))
}

/// The path of the shared library for `source`, compiling it unless the cache already holds it.
pub(crate) fn build(cache_dir: &Path, name: &str, source: &str) -> Result<PathBuf> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(Error::msg(format!(
            "emulated module name `{name}` must be non-empty ASCII letters, digits, _ or -"
        )));
    }
    let cxx = compiler()?;
    let flags = format!("{PREPROCESS_FLAGS:?}{COMPILE_FLAGS:?}");
    let mut parts = vec![CACHE_SCHEMA, &cxx.program, &cxx.version, &flags, HEADER, source];
    parts.extend(HEADERS.iter().flat_map(|h| [h.name, h.source]));
    let key = fnv1a(&parts);
    let final_dir = cache_dir.join(format!("{name}-{key:016x}"));
    let library = final_dir.join(format!("{name}.so"));
    if library.is_file() {
        return Ok(library);
    }

    // Build in a private folder and rename it into place, so concurrent test processes never see (or
    // overwrite) each other's half-written files.
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let work = cache_dir.join(format!(
        "{name}-{key:016x}.tmp-{}-{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&work).map_err(|e| io_error(&work, "cannot create the emulator cache folder", e))?;
    let result = build_in(cxx, &work, name, source);
    if let Err(e) = result {
        // Keep the failed build for inspection under a stable name (the error message points there).
        let failed = cache_dir.join(format!("{name}-{key:016x}.failed"));
        let _ = fs::remove_dir_all(&failed);
        let moved = fs::rename(&work, &failed).is_ok();
        let msg = e.to_string().replace(&work.display().to_string(), &failed.display().to_string());
        return Err(if moved { Error::msg(msg) } else { e });
    }
    match fs::rename(&work, &final_dir) {
        Ok(()) => {}
        // Another process finished the same module first; its library is identical.
        Err(_) if library.is_file() => {
            let _ = fs::remove_dir_all(&work);
        }
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(io_error(&work, "build folder vanished", e)),
        Err(e) => return Err(io_error(&final_dir, "cannot move the compiled module into the cache", e)),
    }
    Ok(library)
}

fn build_in(cxx: &Compiler, dir: &Path, name: &str, source: &str) -> Result<()> {
    let source_file = format!("{name}.cu");
    write(&dir.join(&source_file), source)?;
    write(&dir.join(HEADER_NAME), HEADER)?;
    // The project's device headers, so a source (a generated kernel, say) may `#include "common.cuh"`.
    for h in HEADERS {
        write(&dir.join(h.name), h.source)?;
    }
    let mut args: Vec<&str> = PREPROCESS_FLAGS.to_vec();
    args.push(&source_file);
    let preprocessed = run(cxx, &args, dir, &format!("preprocess {source_file}"))?;
    let preprocessed = String::from_utf8(preprocessed)
        .map_err(|_| Error::file(dir.join(&source_file), "the preprocessed source is not UTF-8"))?;
    let (unit, _kernels) = host_translation_unit(&preprocessed, &source_file, HEADER_NAME)?;
    let unit_file = format!("{name}.emu.cpp");
    write(&dir.join(&unit_file), &unit)?;
    let library_file = format!("{name}.so");
    let mut args: Vec<&str> = COMPILE_FLAGS.to_vec();
    args.extend(["-o", &library_file, &unit_file]);
    run(cxx, &args, dir, &format!("compile {unit_file}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_stable_and_separates_parts() {
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a(&["ab", "c"]), fnv1a(&["a", "bc"]));
        assert_eq!(fnv1a(&["kernel"]), fnv1a(&["kernel"]));
    }

    #[test]
    fn a_missing_compiler_is_a_clear_error() {
        let err = probe_compiler("/nonexistent/g++").err().unwrap();
        assert!(
            err.contains("/nonexistent/g++ --version` could not run") && err.contains("apt-get install g++"),
            "{err}"
        );
    }

    #[test]
    fn module_names_must_be_plain() {
        // Names are refused before anything is written, so no file is ever created in this folder.
        let dir = Path::new("/nonexistent/zeroconv-emulator-cache");
        for bad in ["", "a/b", "../x", "a b"] {
            let err = build(dir, bad, "").unwrap_err().to_string();
            assert!(err.contains("module name"), "{bad}: {err}");
        }
    }
}
