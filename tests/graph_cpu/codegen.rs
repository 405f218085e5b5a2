//! The fused kernels that the shipped configs generate are committed as
//! `kernels/fused_generated.cu` (so build.rs compiles and ptxas assembles them); this checks the
//! committed file is exactly what the generator produces today.

use std::path::Path;
use zeroconv::app::cli::kernels::{generated_module, shipped_configs};

#[test]
fn committed_generated_kernels_are_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fresh = generated_module(&shipped_configs(root)).unwrap();
    let path = root.join("kernels/fused_generated.cu");
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(fresh.contains("fused_groupnorm_silu_"), "the shipped configs fuse GroupNorm + SiLU");
    assert!(
        fresh == committed,
        "kernels/fused_generated.cu is stale: run `cargo run -- kernels generate --out kernels/fused_generated.cu`"
    );
}
