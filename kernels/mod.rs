//! CUDA C++ kernel sources and their PTX, compiled by `build.rs`.
//!
//! Every `kernels/*.cu` becomes one [`KernelModule`]: its source text, the PTX NVRTC produced for compute_80 and
//! compute_90, the cubins and `ptxas -v` reports for sm_80 and sm_90. When the build machine had no NVRTC the
//! strings are empty and [`compiled`] is false; [`build_note`] says why.

pub mod codegen;
pub mod emulate;
pub mod ptxas_report;

pub use ptxas_report::KernelResources;

/// One `.cu` file and everything built from it.
#[derive(Debug)]
pub struct KernelModule {
    /// The file stem: `unary` for `kernels/unary.cu`.
    pub name: &'static str,
    /// The source as written (it includes headers from [`HEADERS`]; see [`KernelModule::self_contained_source`]).
    pub source: &'static str,
    pub ptx_sm80: &'static str,
    pub cubin_sm80: &'static [u8],
    pub ptxas_report_sm80: &'static str,
    pub ptx_sm90: &'static str,
    pub cubin_sm90: &'static [u8],
    pub ptxas_report_sm90: &'static str,
}

/// A `.cuh` file the modules include.
#[derive(Debug)]
pub struct KernelHeader {
    pub name: &'static str,
    pub source: &'static str,
}

/// The two targets kernels are built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    Sm80,
    Sm90,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Sm80, Arch::Sm90];

    /// `sm_80` or `sm_90`, as ptxas names it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm90 => "sm_90",
        }
    }

    /// The compute capability major version whose devices run this target's cubin natively.
    pub fn major(self) -> u32 {
        match self {
            Arch::Sm80 => 8,
            Arch::Sm90 => 9,
        }
    }

    /// The build to use on a device: sm_90 code from compute capability 9.0 up (newer devices JIT its PTX),
    /// sm_80 code on 8.x; None below 8.0, which neither PTX can target.
    pub fn for_compute_capability(major: u32, _minor: u32) -> Option<Arch> {
        match major {
            0..=7 => None,
            8 => Some(Arch::Sm80),
            _ => Some(Arch::Sm90),
        }
    }
}

impl KernelModule {
    pub fn ptx(&self, arch: Arch) -> &'static str {
        match arch {
            Arch::Sm80 => self.ptx_sm80,
            Arch::Sm90 => self.ptx_sm90,
        }
    }

    /// The cubin ptxas assembled (empty when ptxas was missing at build time).
    pub fn cubin(&self, arch: Arch) -> &'static [u8] {
        match arch {
            Arch::Sm80 => self.cubin_sm80,
            Arch::Sm90 => self.cubin_sm90,
        }
    }

    pub fn ptxas_report(&self, arch: Arch) -> &'static str {
        match arch {
            Arch::Sm80 => self.ptxas_report_sm80,
            Arch::Sm90 => self.ptxas_report_sm90,
        }
    }

    /// The kernel names (`.entry` directives) in this module's PTX, in PTX order.
    pub fn entry_points(&self, arch: Arch) -> Vec<&'static str> {
        ptx_entry_points(self.ptx(arch))
    }

    /// Registers, stack, spills and shared memory per kernel, from the ptxas report.
    pub fn resources(&self, arch: Arch) -> Vec<KernelResources> {
        ptxas_report::parse(self.ptxas_report(arch))
    }

    /// The source with every `#include "x.cuh"` of a header in [`HEADERS`] replaced by that header's text (once
    /// per header, as `#pragma once` would), so a tool that reads the source needs no file system.
    pub fn self_contained_source(&self) -> String {
        self_contained(self.source)
    }
}

/// Any CUDA source (a generated one too) with its `#include "x.cuh"` of [`HEADERS`] inlined.
pub fn self_contained(source: &str) -> String {
    let mut included = Vec::new();
    let mut out = String::with_capacity(source.len() * 2);
    expand_includes(source, &mut included, &mut out);
    out
}

fn expand_includes(source: &str, included: &mut Vec<&'static str>, out: &mut String) {
    for line in source.lines() {
        let header = line
            .trim_start()
            .strip_prefix("#include \"")
            .and_then(|rest| rest.split('"').next())
            .and_then(|name| HEADERS.iter().find(|h| h.name == name));
        match header {
            Some(h) if included.contains(&h.name) => {}
            Some(h) => {
                included.push(h.name);
                expand_includes(h.source, included, out);
            }
            None if line.trim() == "#pragma once" => {}
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
}

/// Names of the `.entry` directives in a PTX text.
pub fn ptx_entry_points(ptx: &str) -> Vec<&str> {
    ptx.lines()
        .filter_map(|line| line.split(".entry ").nth(1))
        .map(|rest| rest.split(|c: char| c == '(' || c.is_whitespace()).next().unwrap_or(rest))
        .filter(|name| !name.is_empty())
        .collect()
}

/// The byte size of each `.param` of the `.entry` named `entry` in a PTX text, in order (None when the PTX has no
/// such entry). `.param .u64 p` is 8 bytes, `.param .align 8 .b8 p[200]` is 200: what a launch must pass.
pub fn ptx_entry_params(ptx: &str, entry: &str) -> Option<Vec<usize>> {
    let start = ptx.find(&format!(".entry {entry}("))?;
    let rest = &ptx[start..];
    let list = &rest[rest.find('(')? + 1..rest.find(')')?];
    let size = |decl: &str| -> Option<usize> {
        let words: Vec<&str> = decl.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == ".b8") {
            let name = words.get(i + 1)?;
            let n = name.split('[').nth(1)?.trim_end_matches(']');
            return n.parse().ok();
        }
        let ty = words.iter().find(|w| w.len() > 2 && w.starts_with('.') && *w != &".param")?;
        ty[2..].parse::<usize>().ok().map(|bits| bits / 8)
    };
    list.split(',').map(str::trim).filter(|d| !d.is_empty()).map(size).collect()
}

/// True when build.rs compiled every module to PTX (NVRTC was found).
pub fn compiled() -> bool {
    COMPILED
}

/// True when ptxas also assembled every module, so cubins and resource reports are embedded.
pub fn assembled() -> bool {
    ASSEMBLED
}

/// Which NVRTC and ptxas built the kernels, or why they were not built.
pub fn build_note() -> &'static str {
    BUILD_NOTE
}

pub fn module(name: &str) -> Option<&'static KernelModule> {
    MODULES.iter().find(|m| m.name == name)
}

/// The module whose PTX defines the kernel `entry`.
pub fn module_of_kernel(entry: &str) -> Option<&'static KernelModule> {
    MODULES.iter().find(|m| m.entry_points(Arch::Sm80).contains(&entry))
}

// Defines COMPILED, ASSEMBLED, BUILD_NOTE, MODULES and HEADERS.
include!(concat!(env!("OUT_DIR"), "/kernels_generated.rs"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_are_read_from_ptx() {
        let ptx = "//\n.version 8.7\n.target sm_80\n\n\t// .globl\tunary_neg_f32\n.visible .entry unary_neg_f32(\n\t.param .u64 a\n)\n{\n}\n.visible .entry fill_bf16(\n)\n";
        assert_eq!(ptx_entry_points(ptx), vec!["unary_neg_f32", "fill_bf16"]);
        assert!(ptx_entry_points("").is_empty());
    }

    #[test]
    fn entry_parameters_are_read_from_ptx() {
        let ptx = ".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .f32 k_param_1,\n\t.param .align 8 .b8 k_param_2[200]\n)\n{\n}\n.visible .entry e(\n)\n";
        assert_eq!(ptx_entry_params(ptx, "k"), Some(vec![8, 4, 200]));
        assert_eq!(ptx_entry_params(ptx, "e"), Some(vec![]));
        assert_eq!(ptx_entry_params(ptx, "missing"), None);
    }

    #[test]
    fn arch_follows_compute_capability() {
        assert_eq!(Arch::for_compute_capability(7, 5), None);
        assert_eq!(Arch::for_compute_capability(8, 0), Some(Arch::Sm80));
        assert_eq!(Arch::for_compute_capability(8, 9), Some(Arch::Sm80));
        assert_eq!(Arch::for_compute_capability(9, 0), Some(Arch::Sm90));
        assert_eq!(Arch::for_compute_capability(12, 0), Some(Arch::Sm90));
    }

    #[test]
    fn every_module_source_is_embedded_and_expands_its_headers() {
        assert!(!MODULES.is_empty(), "no kernel modules embedded");
        assert!(HEADERS.iter().any(|h| h.name == "common.cuh"));
        for m in MODULES {
            assert!(m.source.contains("__global__"), "{}: source not embedded", m.name);
            let full = m.self_contained_source();
            assert!(!full.contains("#include"), "{}: an include was not expanded", m.name);
            assert!(full.contains("__device__ __forceinline__ float warp_sum"), "{}: common.cuh missing", m.name);
            assert_eq!(full.matches("struct __align__(2) bf16").count(), 1, "{}: header inlined twice", m.name);
        }
    }
}
