//! The fusion pass (pure: no device handle). See `pass.rs`.

pub mod kernel;
pub mod pass;

pub use kernel::{Anchor, FusedKernel, Instr, MultiAdamW, Reg};
pub use pass::{fuse, FusionReport};
