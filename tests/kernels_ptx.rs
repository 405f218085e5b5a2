//! Every CUDA source in kernels/ is compiled by NVRTC and assembled by ptxas for sm_80 and sm_90 on every test run
//! (DESIGN.md, "Verifying GPU code without a GPU"). Needs the tools from scripts/setup-cuda-tools; without them
//! these tests fail rather than pass vacuously.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

use zeroconv::graph::{BinaryOp, UnaryOp};
use zeroconv::kernels::{self, ptxas_report, Arch, KernelModule, MODULES};

const HOW_TO_BUILD: &str = "run `eval \"$(scripts/setup-cuda-tools)\"` and then \
    `ZEROCONV_REQUIRE_KERNELS=1 cargo test --test kernels_ptx -- --nocapture`";

fn require_built() {
    assert!(
        kernels::compiled() && kernels::assembled(),
        "the CUDA kernels were not built into this binary ({}); {HOW_TO_BUILD}",
        kernels::build_note()
    );
}

fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

/// The stems of kernels/*.cu, read from disk now (not from what the build embedded).
fn sources_on_disk() -> BTreeSet<String> {
    fs::read_dir(kernels_dir())
        .expect("kernels/ is listable")
        .map(|e| e.expect("kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .map(|p| p.file_stem().and_then(|s| s.to_str()).expect("UTF-8 file name").to_string())
        .collect()
}

#[test]
fn every_source_has_ptx_cubin_and_report_for_both_archs() {
    require_built();
    let on_disk = sources_on_disk();
    let embedded: BTreeSet<String> = MODULES.iter().map(|m| m.name.to_string()).collect();
    assert_eq!(on_disk, embedded, "kernels/*.cu and the embedded modules differ; rebuild");
    assert!(on_disk.len() >= 9, "expected the first kernel set (unary, binary, cast, reduce, norm, ...)");

    for m in MODULES {
        let text = fs::read_to_string(kernels_dir().join(format!("{}.cu", m.name))).expect("source readable");
        assert_eq!(m.source, text, "{}.cu changed since the build embedded it", m.name);
        let entries_80 = m.entry_points(Arch::Sm80);
        for arch in Arch::ALL {
            let ptx = m.ptx(arch);
            assert!(!ptx.trim().is_empty(), "{}: empty PTX for {}", m.name, arch.name());
            assert!(ptx.contains(&format!(".target {}", arch.name())), "{}: PTX is not for {}", m.name, arch.name());
            let entries = m.entry_points(arch);
            assert!(!entries.is_empty(), "{}: no kernels in the {} PTX", m.name, arch.name());
            assert_eq!(entries, entries_80, "{}: sm_80 and {} PTX define different kernels", m.name, arch.name());
            assert!(!m.cubin(arch).is_empty(), "{}: no {} cubin", m.name, arch.name());
            assert_eq!(&m.cubin(arch)[..4], b"\x7fELF", "{}: {} cubin is not an ELF image", m.name, arch.name());

            // The report must account for exactly the kernels in the PTX, each with a register count.
            let resources = m.resources(arch);
            let reported: BTreeSet<&str> = resources.iter().map(|k| k.name.as_str()).collect();
            let defined: BTreeSet<&str> = entries.iter().copied().collect();
            assert_eq!(reported, defined, "{}: ptxas report and PTX disagree for {}", m.name, arch.name());
            for k in &resources {
                assert_eq!(k.arch, arch.name(), "{}: report entry for the wrong arch", k.name);
                assert!(k.registers > 0, "{}: no register count in the {} report", k.name, arch.name());
            }
        }
    }
}

#[test]
fn kernel_names_are_unique_across_modules() {
    require_built();
    let mut seen = BTreeSet::new();
    for m in MODULES {
        for entry in m.entry_points(Arch::Sm90) {
            assert!(seen.insert(entry), "kernel {entry} is defined by more than one module");
            assert_eq!(kernels::module_of_kernel(entry).map(|k| k.name), Some(m.name));
        }
    }
}

#[test]
fn expected_kernels_exist_in_every_dtype() {
    require_built();
    let all: BTreeSet<&str> = MODULES.iter().flat_map(|m| m.entry_points(Arch::Sm90)).collect();
    let op_stems =
        UnaryOp::ALL.iter().flat_map(|u| [format!("unary_{}", u.name()), format!("unary_{}_bwd", u.name())]).chain(
            BinaryOp::ALL.iter().flat_map(|b| [format!("binary_{}", b.name()), format!("binary_{}_bcast", b.name())]),
        );
    let stems = [
        "affine",
        "sum_rows",
        "sum_axis",
        "groupnorm",
        "groupnorm_bwd",
        "layernorm",
        "layernorm_bwd",
        "layernorm_bwd_params",
        "norm_params_finish",
        "softmax",
        "softmax_bwd",
        "mse_partial",
        "mse_finish",
        "mse_bwd",
        "upsample2x",
        "upsample2x_bwd",
        "adamw_grad",
    ];
    for stem in stems.into_iter().map(String::from).chain(op_stems) {
        for dtype in ["f32", "bf16", "f16"] {
            let name = format!("{stem}_{dtype}");
            assert!(all.contains(name.as_str()), "kernel {name} missing");
        }
    }
    for (from, to) in
        [("f32", "bf16"), ("f32", "f16"), ("bf16", "f32"), ("f16", "f32"), ("bf16", "f16"), ("f16", "bf16")]
    {
        assert!(all.contains(format!("cast_{from}_{to}").as_str()), "cast {from} -> {to} missing");
    }
}

/// Prints the sm_90 ptxas report of every kernel (visible with `-- --nocapture`).
#[test]
fn print_sm90_register_and_spill_report() {
    require_built();
    let mut total = 0;
    for m in MODULES {
        let resources = m.resources(Arch::Sm90);
        assert!(!resources.is_empty(), "{}: empty sm_90 report", m.name);
        total += resources.len();
        println!("== kernels/{}.cu, sm_90 ==\n{}", m.name, ptxas_report::format_table(&resources));
    }
    let spilling: Vec<String> = MODULES
        .iter()
        .flat_map(|m| m.resources(Arch::Sm90))
        .filter(|k| k.spills())
        .map(|k| format!("{} ({} B stored, {} B loaded)", k.name, k.spill_store_bytes, k.spill_load_bytes))
        .collect();
    println!(
        "{total} kernels on sm_90; spilling: {}",
        if spilling.is_empty() { "none".into() } else { spilling.join(", ") }
    );
    println!("built with: {}", kernels::build_note());
}

fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = env::var_os("ZEROCONV_PTXAS") {
        return Some(PathBuf::from(p));
    }
    env::split_paths(&env::var_os("PATH")?).map(|d| d.join("ptxas")).find(|p| p.is_file())
}

/// Assembles the embedded PTX again, now, so a test binary whose PTX ptxas rejects cannot pass.
#[test]
fn ptxas_accepts_the_embedded_ptx() {
    require_built();
    let Some(ptxas) = find_ptxas() else {
        let required = env::var("ZEROCONV_REQUIRE_KERNELS").as_deref() == Ok("1");
        assert!(
            !required,
            "ZEROCONV_REQUIRE_KERNELS=1 but no ptxas (set ZEROCONV_PTXAS or put ptxas on PATH); {HOW_TO_BUILD}"
        );
        eprintln!("SKIPPED re-assembly: no ptxas (set ZEROCONV_PTXAS or put ptxas on PATH); {HOW_TO_BUILD}");
        return;
    };
    let dir = tempfile::Builder::new().prefix("zeroconv-kernels-ptx-").tempdir().expect("temp dir");
    for m in MODULES {
        for arch in Arch::ALL {
            assemble(&ptxas, dir.path(), m, arch);
        }
    }
}

fn assemble(ptxas: &Path, dir: &Path, m: &KernelModule, arch: Arch) {
    let ptx = dir.join(format!("{}.{}.ptx", m.name, arch.name()));
    let cubin = ptx.with_extension("cubin");
    fs::write(&ptx, m.ptx(arch)).expect("write PTX");
    let out = Command::new(ptxas)
        .arg(format!("--gpu-name={}", arch.name()))
        .arg("-o")
        .arg(&cubin)
        .arg(&ptx)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", ptxas.display()));
    assert!(
        out.status.success(),
        "ptxas rejected {} for {}:\n{}{}",
        m.name,
        arch.name(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let size = fs::metadata(&cubin).map(|md| md.len()).unwrap_or(0);
    assert!(size > 0, "ptxas produced no cubin for {} {}", m.name, arch.name());
}
