//! Fused kernels of a config that is not shipped are compiled by NVRTC at run time, cached on
//! disk by source hash and architecture, and assembled by ptxas. Runs where the test command
//! installed NVRTC and ptxas (scripts/test sets ZEROCONV_REQUIRE_KERNELS=1); without them it fails
//! with the way to install them rather than passing silently.

use zeroconv::app::step;
use zeroconv::engine::cuda::nvrtc::compile_cached;
use zeroconv::io::config::load_config;
use zeroconv::kernels::codegen;
use zeroconv::kernels::Arch;

#[test]
fn generated_kernels_compile_at_run_time_and_hit_the_cache() {
    if std::env::var("ZEROCONV_NVRTC_LIB").is_err() && std::env::var("ZEROCONV_REQUIRE_KERNELS").is_err() {
        panic!("NVRTC is not set up: run `eval \"$(scripts/setup-cuda-tools)\"` (scripts/test does) and rerun");
    }
    // A config nobody ships: linear projections and 16-channel heads, so its groups differ.
    let cfg = load_config(
        None,
        &[
            "model.unet_config.use_linear_in_transformer=True".into(),
            "model.control_stage_config.use_linear_in_transformer=True".into(),
            "trainer.precision=bf16".into(),
        ],
    )
    .unwrap();
    let st = step::latent_step(&cfg, 2).unwrap();
    let opt = step::optimize(&cfg, &st, false).unwrap();
    let gens: Vec<codegen::Generated> = codegen::for_graph(&opt.graph).unwrap().into_iter().map(|(_, g)| g).collect();
    assert!(!gens.is_empty());
    let source = codegen::module_source(&gens);
    let scratch = tempfile::Builder::new().prefix("zeroconv-kcache-").tempdir().unwrap();
    let dir = scratch.path().join("cache");
    for arch in [Arch::Sm80, Arch::Sm90] {
        let (ptx, cached) = compile_cached(&source, arch, &dir).unwrap();
        assert!(!cached, "first compile");
        for g in &gens {
            assert!(ptx.contains(&format!(".entry {}", g.function)), "{} missing from the PTX", g.function);
        }
        let (again, cached) = compile_cached(&source, arch, &dir).unwrap();
        assert!(cached && again == ptx, "the second request is served from the cache");
        // ptxas accepts it.
        if let Ok(ptxas) = std::env::var("ZEROCONV_PTXAS") {
            let f = dir.join(format!("check-{}.ptx", arch.name()));
            std::fs::write(&f, &ptx).unwrap();
            let out = std::process::Command::new(ptxas)
                .args([&format!("-arch={}", arch.name()), "-o", "/dev/null", f.to_str().unwrap()])
                .output()
                .unwrap();
            assert!(out.status.success(), "ptxas: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    assert_eq!(
        std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "ptx"))
            .count(),
        4
    );
}
