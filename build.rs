//! Compiles every `kernels/*.cu` to PTX with NVRTC (compute_80 and compute_90), assembles each PTX with
//! `ptxas -v` for sm_80 and sm_90, reports registers and spills, and writes everything `kernels/mod.rs` embeds
//! into OUT_DIR.
//!
//! The crate must build on machines without CUDA: when NVRTC or ptxas is missing this warns, embeds empty PTX and
//! a report saying why, and succeeds, unless ZEROCONV_REQUIRE_KERNELS=1 asks for the kernels (the test script
//! sets it), in which case the build fails. A kernel that does not compile always fails the build.
//!
//! Where the tools come from: ZEROCONV_NVRTC_LIB (a path to libnvrtc.so.12) and ZEROCONV_PTXAS (a path to ptxas),
//! as printed by `scripts/setup-cuda-tools`; otherwise the usual system locations.

// Only `parse` is needed here; the rest serves the library.
#[allow(dead_code)]
#[path = "kernels/ptxas_report.rs"]
mod ptxas_report;

// The library's stable hash (FNV-1a), so cache keys do not change with the Rust version as DefaultHasher's may.
#[allow(dead_code)]
#[path = "hash.rs"]
mod hash;

use std::ffi::c_int;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs, thread};

/// The virtual architecture NVRTC targets and the real one ptxas assembles it for.
struct Target {
    compute: &'static str,
    sm: &'static str,
}

const TARGETS: [Target; 2] =
    [Target { compute: "compute_80", sm: "sm_80" }, Target { compute: "compute_90", sm: "sm_90" }];

/// Bump when the way outputs are produced changes, so cached outputs from an older build.rs are not reused.
const CACHE_SCHEMA: u32 = 1;

const SETUP_HINT: &str = "run `eval \"$(scripts/setup-cuda-tools)\"` and rebuild";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // The whole folder, so an added or removed .cu is noticed; unchanged modules are served from the cache below,
    // so edits to the Rust files in kernels/ only cost a cache check.
    println!("cargo:rerun-if-changed=kernels");
    // LD_LIBRARY_PATH decides where a bare `libnvrtc.so.12` is found. PATH (searched for ptxas) is left out on
    // purpose: it differs between shells and editors often enough to cause rebuild ping-pong; set ZEROCONV_PTXAS.
    for var in [
        "ZEROCONV_NVRTC_LIB",
        "ZEROCONV_PTXAS",
        "ZEROCONV_REQUIRE_KERNELS",
        "CUDA_HOME",
        "CUDA_PATH",
        "LD_LIBRARY_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernels_dir = manifest_dir.join("kernels");
    let require = env::var("ZEROCONV_REQUIRE_KERNELS").is_ok_and(|v| v == "1");

    let sources = list_files(&kernels_dir, "cu").unwrap_or_else(|e| fail(&e));
    let headers = list_files(&kernels_dir, "cuh").unwrap_or_else(|e| fail(&e));
    let header_text: String = headers.iter().map(|h| read(h)).collect();

    let nvrtc = find_nvrtc();
    let ptxas = find_ptxas();
    if require {
        let missing: Vec<&str> =
            [nvrtc.as_ref().err(), ptxas.as_ref().err()].into_iter().flatten().map(String::as_str).collect();
        if !missing.is_empty() {
            fail(&format!("ZEROCONV_REQUIRE_KERNELS=1 but {}; {SETUP_HINT}", missing.join("; and ")));
        }
    }
    let nvrtc_version = nvrtc.as_ref().map(|n| n.version.clone()).ok();
    let ptxas_ok = ptxas.as_ref().ok();

    // One job per (module, target); NVRTC programs and ptxas processes are independent, so run them in parallel.
    let jobs: Vec<(&PathBuf, &Target)> = sources.iter().flat_map(|s| TARGETS.iter().map(move |t| (s, t))).collect();
    let workers = thread::available_parallelism().map_or(2, |n| n.get()).min(jobs.len().max(1));
    let results: Vec<Result<Output, String>> = thread::scope(|scope| {
        let chunks: Vec<Vec<(usize, &(&PathBuf, &Target))>> =
            (0..workers).map(|w| jobs.iter().enumerate().filter(|(i, _)| i % workers == w).collect()).collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let ctx = JobContext {
                    kernels_dir: &kernels_dir,
                    out_dir: &out_dir,
                    header_text: &header_text,
                    nvrtc_version: nvrtc_version.as_deref(),
                    nvrtc_missing: nvrtc.as_ref().err().map(String::as_str),
                    ptxas: ptxas_ok,
                    ptxas_missing: ptxas.as_ref().err().map(String::as_str),
                };
                scope.spawn(move || {
                    chunk.into_iter().map(|(i, (src, t))| (i, build_one(&ctx, src, t))).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(usize, Result<Output, String>)> =
            handles.into_iter().flat_map(|h| h.join().expect("kernel build thread panicked")).collect();
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, r)| r).collect()
    });
    let outputs: Vec<Output> = results.into_iter().map(|r| r.unwrap_or_else(|e| fail(&e))).collect();

    report_warnings(&outputs, nvrtc.as_ref().err(), ptxas.as_ref().err());
    let generated = generate_rust(
        &sources,
        &headers,
        &outputs,
        &out_dir,
        nvrtc.is_ok(),
        ptxas.is_ok(),
        &status_note(&nvrtc, &ptxas),
    );
    write(&out_dir.join("kernels_generated.rs"), generated.as_bytes());
}

// ---- tools -------------------------------------------------------------------------------------------------

/// NVRTC, loaded and checked to be reachable by cudarc. The libraries stay loaded for the whole build script so
/// that cudarc's own by-name load finds the very library we chose (the loader matches the already-loaded soname).
struct Nvrtc {
    version: String,
    _keep_loaded: Vec<libloading::Library>,
}

fn find_nvrtc() -> Result<Nvrtc, String> {
    let candidates: Vec<PathBuf> = match env::var_os("ZEROCONV_NVRTC_LIB") {
        Some(path) => vec![PathBuf::from(path)],
        None => {
            // Bare names go through the dynamic loader's search (LD_LIBRARY_PATH, ld.so.cache).
            let mut c = vec![PathBuf::from("libnvrtc.so.12"), PathBuf::from("libnvrtc.so")];
            let roots = ["CUDA_HOME", "CUDA_PATH"].iter().filter_map(env::var_os).map(PathBuf::from);
            for root in roots.chain([PathBuf::from("/usr/local/cuda")]) {
                c.push(root.join("lib64/libnvrtc.so.12"));
                c.push(root.join("lib/libnvrtc.so.12"));
            }
            c
        }
    };
    let tried = || candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    let Some((path, lib)) = candidates.iter().find_map(|p| {
        // SAFETY: loading NVRTC runs only its own initialisers, which have no preconditions.
        unsafe { libloading::Library::new(p) }.ok().map(|lib| (p, lib))
    }) else {
        return Err(format!("NVRTC not found (tried {})", tried()));
    };
    let own_version = nvrtc_version_of(&lib).map_err(|e| format!("{} is not a usable NVRTC: {e}", path.display()))?;
    let mut keep = vec![lib];
    // libnvrtc loads its builtins library by name when compiling; preloading it from the same folder makes that
    // work even where the folder is not on the loader's search path.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        for builtins in fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()) {
            let name = builtins.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with("libnvrtc-builtins.so") && !name.contains(".alt.") {
                // SAFETY: as above; the builtins library has no initialisers with preconditions.
                if let Ok(lib) = unsafe { libloading::Library::new(&builtins) } {
                    keep.push(lib);
                }
            }
        }
    }
    // cudarc loads NVRTC by a list of names and panics if none loads; make sure one does before calling it.
    // SAFETY: `is_culib_present` only tries to dlopen cudarc's candidate names and drops what it opens.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(format!(
            "{} loads, but not under any name cudarc looks for (e.g. libnvrtc.so.12); put its folder on LD_LIBRARY_PATH",
            path.display()
        ));
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: the library is present (checked above); nvrtcVersion writes two ints through valid pointers.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {status:?}"));
    }
    let version = format!("{major}.{minor}");
    if version != own_version {
        println!(
            "cargo:warning=NVRTC {version} (found by cudarc) is compiling the kernels, not {} ({own_version})",
            path.display()
        );
    }
    Ok(Nvrtc { version: format!("NVRTC {version} ({})", path.display()), _keep_loaded: keep })
}

fn nvrtc_version_of(lib: &libloading::Library) -> Result<String, String> {
    type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
    // SAFETY: nvrtcVersion has this signature in every NVRTC release.
    let f = unsafe { lib.get::<VersionFn>(b"nvrtcVersion\0") }.map_err(|e| e.to_string())?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: writes two ints through valid pointers.
    match unsafe { f(&mut major, &mut minor) } {
        0 => Ok(format!("{major}.{minor}")),
        code => Err(format!("nvrtcVersion returned {code}")),
    }
}

struct Ptxas {
    path: PathBuf,
    version: String,
}

fn find_ptxas() -> Result<Ptxas, String> {
    let candidates: Vec<PathBuf> = match env::var_os("ZEROCONV_PTXAS") {
        Some(path) => vec![PathBuf::from(path)],
        None => {
            let on_path =
                env::var_os("PATH").map(|p| env::split_paths(&p).map(|d| d.join("ptxas")).collect::<Vec<_>>());
            let roots = ["CUDA_HOME", "CUDA_PATH"].iter().filter_map(env::var_os).map(PathBuf::from);
            on_path
                .unwrap_or_default()
                .into_iter()
                .chain(roots.chain([PathBuf::from("/usr/local/cuda")]).map(|r| r.join("bin/ptxas")))
                .collect()
        }
    };
    for path in &candidates {
        if !path.is_file() {
            continue;
        }
        return match Command::new(path).arg("--version").output() {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                let version =
                    text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("unknown version").trim().to_string();
                Ok(Ptxas { path: path.clone(), version })
            }
            Ok(out) => Err(format!("{} --version failed: {}", path.display(), String::from_utf8_lossy(&out.stderr))),
            Err(e) => Err(format!("{} does not run: {e}", path.display())),
        };
    }
    let shown: Vec<String> = if env::var_os("ZEROCONV_PTXAS").is_some() {
        candidates.iter().map(|p| p.display().to_string()).collect()
    } else {
        vec!["ZEROCONV_PTXAS (unset)".into(), "ptxas on PATH".into(), "$CUDA_HOME/bin, /usr/local/cuda/bin".into()]
    };
    Err(format!("ptxas not found (tried {})", shown.join(", ")))
}

// ---- one module on one target ------------------------------------------------------------------------------

struct JobContext<'a> {
    kernels_dir: &'a Path,
    out_dir: &'a Path,
    header_text: &'a str,
    nvrtc_version: Option<&'a str>,
    nvrtc_missing: Option<&'a str>,
    ptxas: Option<&'a Ptxas>,
    ptxas_missing: Option<&'a str>,
}

/// The files produced for one module and target, all inside OUT_DIR.
struct Output {
    module: String,
    sm: &'static str,
    ptx: PathBuf,
    cubin: PathBuf,
    report: PathBuf,
    report_text: String,
}

fn build_one(ctx: &JobContext, source_path: &Path, target: &Target) -> Result<Output, String> {
    let module = source_path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
    let file = |ext: &str| ctx.out_dir.join(format!("{module}.{}.{ext}", target.sm));
    let out = Output {
        module: module.clone(),
        sm: target.sm,
        ptx: file("ptx"),
        cubin: file("cubin"),
        report: file("ptxas.txt"),
        report_text: String::new(),
    };
    let key_path = file("key");
    let source = read(source_path);
    let options = nvrtc_options(ctx.kernels_dir, target);

    let Some(nvrtc_version) = ctx.nvrtc_version else {
        let reason = ctx.nvrtc_missing.unwrap_or("NVRTC not found");
        let text = format!("kernels were not compiled: {reason}; {SETUP_HINT}\n");
        return Ok(finish_uncompiled(out, &key_path, "", &[], text));
    };

    // Every input of the compilation, each prefixed by its length so that no two inputs run together.
    let ptxas = ctx.ptxas.map(|p| format!("{} {}", p.path.display(), p.version)).unwrap_or_default();
    let parts = [
        CACHE_SCHEMA.to_string(),
        source.clone(),
        ctx.header_text.to_string(),
        options.join("\n"),
        nvrtc_version.to_string(),
        ptxas,
    ];
    let key = format!(
        "{:016x}",
        parts.iter().fold(hash::FNV_OFFSET, |h, part| {
            hash::fnv1a_extend(hash::fnv1a_extend(h, &(part.len() as u64).to_le_bytes()), part.as_bytes())
        })
    );
    if fs::read_to_string(&key_path).is_ok_and(|k| k == key) && out.ptx.is_file() && out.cubin.is_file() {
        if let Ok(report_text) = fs::read_to_string(&out.report) {
            return Ok(Output { report_text, ..out });
        }
    }

    let ptx = compile_ptx(&module, &source, options)?;
    write(&out.ptx, ptx.as_bytes());
    let Some(ptxas) = ctx.ptxas else {
        let reason = ctx.ptxas_missing.unwrap_or("ptxas not found");
        let text = format!("PTX compiled by {nvrtc_version} but not assembled: {reason}; {SETUP_HINT}\n");
        return Ok(finish_uncompiled(out, &key_path, &ptx, &[], text));
    };
    let report_text = assemble(ptxas, &out.ptx, &out.cubin, target.sm, &module)?;
    write(&out.report, report_text.as_bytes());
    write(&key_path, key.as_bytes());
    Ok(Output { report_text, ..out })
}

/// Writes the outputs of a module the tools could not fully build and drops its cache key.
fn finish_uncompiled(out: Output, key_path: &Path, ptx: &str, cubin: &[u8], report_text: String) -> Output {
    write(&out.ptx, ptx.as_bytes());
    write(&out.cubin, cubin);
    write(&out.report, report_text.as_bytes());
    let _ = fs::remove_file(key_path);
    Output { report_text, ..out }
}

fn nvrtc_options(kernels_dir: &Path, target: &Target) -> Vec<String> {
    vec![
        format!("--gpu-architecture={}", target.compute),
        "--std=c++17".into(),
        format!("--include-path={}", kernels_dir.display()),
    ]
}

fn compile_ptx(module: &str, source: &str, options: Vec<String>) -> Result<String, String> {
    use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
    if source.contains('\0') {
        return Err(format!("kernels/{module}.cu contains a NUL byte"));
    }
    let opts = CompileOptions { options, name: Some(format!("{module}.cu")), ..Default::default() };
    match compile_ptx_with_opts(source, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { nvrtc, options, log }) => Err(format!(
            "NVRTC failed to compile kernels/{module}.cu ({nvrtc:?}, options {options:?}):\n{}",
            log.to_string_lossy()
        )),
        Err(e) => Err(format!("NVRTC failed on kernels/{module}.cu: {e:?}")),
    }
}

/// Runs `ptxas -v`, writing the cubin, and returns its resource report.
fn assemble(ptxas: &Ptxas, ptx: &Path, cubin: &Path, sm: &str, module: &str) -> Result<String, String> {
    let out = Command::new(&ptxas.path)
        .arg("-v")
        .arg(format!("--gpu-name={sm}"))
        .arg("-o")
        .arg(cubin)
        .arg(ptx)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ptxas.path.display()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!("ptxas rejected the PTX of kernels/{module}.cu for {sm}:\n{text}"));
    }
    Ok(format!("# ptxas -v --gpu-name={sm} ({}) for kernels/{module}.cu\n{text}", ptxas.version))
}

// ---- reporting and generated code --------------------------------------------------------------------------

fn report_warnings(outputs: &[Output], nvrtc_missing: Option<&String>, ptxas_missing: Option<&String>) {
    if let Some(reason) = nvrtc_missing.or(ptxas_missing) {
        println!(
            "cargo:warning=CUDA kernels not built: {reason}. The crate works without them (CPU backend); {SETUP_HINT}."
        );
        if nvrtc_missing.is_some() {
            return;
        }
    }
    for out in outputs {
        let kernels = ptxas_report::parse(&out.report_text);
        let Some(busiest) = kernels.iter().max_by_key(|k| k.registers) else { continue };
        let spilling: Vec<_> = kernels.iter().filter(|k| k.spills()).collect();
        println!(
            "cargo:warning=ptxas {} {}.cu: {} kernels, max {} registers ({}), {} spilling",
            out.sm,
            out.module,
            kernels.len(),
            busiest.registers,
            busiest.name,
            spilling.len()
        );
        for k in spilling {
            println!(
                "cargo:warning=ptxas {} {}: spills {} bytes stored, {} loaded ({} registers)",
                out.sm, k.name, k.spill_store_bytes, k.spill_load_bytes, k.registers
            );
        }
    }
}

fn status_note(nvrtc: &Result<Nvrtc, String>, ptxas: &Result<Ptxas, String>) -> String {
    let n = nvrtc.as_ref().map_or_else(|e| e.clone(), |n| format!("compiled by {}", n.version));
    let p = ptxas.as_ref().map_or_else(|e| e.clone(), |p| format!("assembled by ptxas {}", p.version));
    format!("{n}; {p}")
}

fn generate_rust(
    sources: &[PathBuf],
    headers: &[PathBuf],
    outputs: &[Output],
    out_dir: &Path,
    compiled: bool,
    assembled: bool,
    note: &str,
) -> String {
    let lit = |p: &Path| format!("{:?}", p.display().to_string());
    let file_of = |module: &str, sm: &str, what: fn(&Output) -> &PathBuf| {
        let o = outputs.iter().find(|o| o.module == module && o.sm == sm).expect("one output per module and target");
        lit(what(o))
    };
    let mut s = String::new();
    writeln!(s, "// Generated by build.rs into {}; do not edit.", out_dir.display()).unwrap();
    writeln!(s, "const COMPILED: bool = {compiled};").unwrap();
    writeln!(s, "const ASSEMBLED: bool = {};", compiled && assembled).unwrap();
    writeln!(s, "const BUILD_NOTE: &str = {note:?};").unwrap();
    writeln!(s, "pub const MODULES: &[KernelModule] = &[").unwrap();
    for src in sources {
        let name = src.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        writeln!(s, "    KernelModule {{").unwrap();
        writeln!(s, "        name: {name:?},").unwrap();
        writeln!(s, "        source: include_str!({}),", lit(src)).unwrap();
        for t in &TARGETS {
            let sm = t.sm.trim_start_matches("sm_");
            writeln!(s, "        ptx_sm{sm}: include_str!({}),", file_of(name, t.sm, |o| &o.ptx)).unwrap();
            writeln!(s, "        cubin_sm{sm}: include_bytes!({}),", file_of(name, t.sm, |o| &o.cubin)).unwrap();
            writeln!(s, "        ptxas_report_sm{sm}: include_str!({}),", file_of(name, t.sm, |o| &o.report)).unwrap();
        }
        writeln!(s, "    }},").unwrap();
    }
    writeln!(s, "];").unwrap();
    writeln!(s, "pub const HEADERS: &[KernelHeader] = &[").unwrap();
    for h in headers {
        let name = h.file_name().and_then(|s| s.to_str()).unwrap_or_default();
        writeln!(s, "    KernelHeader {{ name: {name:?}, source: include_str!({}) }},", lit(h)).unwrap();
    }
    writeln!(s, "];").unwrap();
    s
}

// ---- small helpers -----------------------------------------------------------------------------------------

/// The files in `dir` with extension `ext`, sorted so generated code and builds are reproducible.
fn list_files(dir: &Path, ext: &str) -> Result<Vec<PathBuf>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    Ok(files)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", path.display())))
}

fn write(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", path.display())));
}

/// Stops the build with one clear message (no panic backtrace).
fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}
