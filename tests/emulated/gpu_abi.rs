//! The ABI check of the CUDA executor's lowering at full size, without emulation: every kernel launch of a lowered
//! training step must match the parameter list of its `.entry` in the embedded PTX (count and byte sizes), so a
//! launch the real driver would feed wrong arguments (it never checks) fails here. Also counts a step's commands.

use std::collections::BTreeMap;
use std::path::Path;
use zeroconv::app::step;
use zeroconv::engine::device::shared_memory::opt_in_limit;
use zeroconv::engine::device::Arg;
use zeroconv::engine::gpu::lower::Cmd;
use zeroconv::engine::gpu::lower_graph;
use zeroconv::io::config::load_config;
use zeroconv::kernels::{self, Arch};

fn lowered(config: &str, overrides: &[&str], batch: usize) -> Vec<Vec<Cmd>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(config);
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let cfg = load_config(Some(&path), &overrides).unwrap();
    let st = step::latent_step(&cfg, batch).unwrap();
    let opt = step::optimize(&cfg, &st, false).unwrap();
    let flash = zeroconv::app::train::compile_options(&cfg, None).unwrap().flash_attention;
    lower_graph(&opt.graph, flash).unwrap_or_else(|e| panic!("{config}: lowering: {e}"))
}

/// Checks every launch against the PTX; returns the command counts by kind.
fn check_abi(what: &str, nodes: &[Vec<Cmd>]) -> BTreeMap<&'static str, usize> {
    let required = std::env::var("ZEROCONV_REQUIRE_KERNELS").as_deref() == Ok("1");
    assert!(kernels::compiled() || !required, "ZEROCONV_REQUIRE_KERNELS=1 but the kernels were built without NVRTC");
    let mut counts = BTreeMap::new();
    for (i, cmds) in nodes.iter().enumerate() {
        for c in cmds {
            *counts.entry(c.kind()).or_insert(0) += 1;
            let Cmd::Launch(l) = c else { continue };
            let module = kernels::module(&l.kernel.module).unwrap_or_else(|| {
                panic!("{what}: node {i} launches `{}` from unbuilt module `{}`", l.kernel.name, l.kernel.module)
            });
            if !kernels::compiled() {
                assert!(
                    module.source.contains(&l.kernel.name),
                    "{what}: `{}` not in {}.cu",
                    l.kernel.name,
                    module.name
                );
                continue;
            }
            for arch in Arch::ALL {
                let params = kernels::ptx_entry_params(module.ptx(arch), &l.kernel.name).unwrap_or_else(|| {
                    panic!("{what}: node {i}: no `.entry {}` in {} ({})", l.kernel.name, module.name, arch.name())
                });
                let given: Vec<usize> = l.args.iter().map(Arg::size).collect();
                assert_eq!(
                    given, params,
                    "{what}: node {i}: `{}` arguments (bytes) differ from its PTX",
                    l.kernel.name
                );
            }
            let [gx, gy, gz] = l.dims.grid;
            let [bx, by, bz] = l.dims.block;
            assert!(gx >= 1 && gy >= 1 && gz >= 1 && gx < 1 << 31, "{what}: node {i}: grid {:?}", l.dims.grid);
            assert!(bx * by * bz <= 1024 && bx * by * bz >= 32, "{what}: node {i}: block {:?}", l.dims.block);
            // Dynamic shared memory within what an A100 (the smaller of the two targets) allows with the opt-in.
            let limit = opt_in_limit((8, 0)).unwrap();
            assert!(l.dims.shared_bytes <= limit, "{what}: node {i}: `{}` {:?}", l.kernel.name, l.dims);
        }
    }
    if !kernels::compiled() {
        println!("{what}: PTX not built (no NVRTC): only kernel names were checked");
    }
    counts
}

#[test]
fn sd15_training_step_launches_match_the_ptx() {
    let nodes = lowered("configs/controlnet_sd15.yaml", &["trainer.precision=bf16-mixed"], 4);
    let counts = check_abi("SD 1.5 bf16 batch 4", &nodes);
    println!("SD 1.5 ControlNet step, bf16, batch 4: {} nodes, commands {counts:?}", nodes.len());
    assert!(counts["gemm"] > 100 && counts["conv"] > 100 && counts["launch"] > 1000, "{counts:?}");
    // The config sets use_flash_attention: SD 1.5's head dims (40, 80, 160) and CLIP's (64) all take the flash
    // kernels, forward and backward, so no attention softmax of the composite path is left.
    let names: Vec<&str> = nodes
        .iter()
        .flatten()
        .filter_map(|c| if let Cmd::Launch(l) = c { Some(l.kernel.name.as_str()) } else { None })
        .collect();
    for d in [40, 80, 160] {
        for k in ["flash_attn_fwd_bf16", "flash_attn_bwd_dkdv_bf16", "flash_attn_bwd_dq_bf16"] {
            assert!(names.contains(&format!("{k}_d{d}").as_str()), "no {k}_d{d} launch");
        }
    }
    assert!(!names.iter().any(|n| n.starts_with("attn_softmax")), "a composite attention is left");
}

#[test]
fn bench_small_and_tiny_steps_launch_match_the_ptx() {
    for (config, batch) in [("configs/bench_small.yaml", 2), ("configs/tiny.yaml", 2)] {
        for precision in ["32", "bf16-mixed"] {
            let what = format!("{config} {precision}");
            let nodes = lowered(config, &[&format!("trainer.precision={precision}")], batch);
            let counts = check_abi(&what, &nodes);
            println!("{what}: {} nodes, commands {counts:?}", nodes.len());
        }
    }
}
