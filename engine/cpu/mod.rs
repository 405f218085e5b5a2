//! The CPU backend: the reference every other backend is checked against, and the embedded
//! default that runs anywhere.

pub mod aligned;
pub mod conv;
pub mod conv_nhwc;
pub mod direct_conv;
pub mod elementwise;
pub mod epilogue;
pub mod exec;
pub mod float;
pub mod fused;
pub mod gemm;
pub mod layout;
pub mod linalg;
pub mod norm;
pub mod par;
pub mod peak;
pub mod winograd;

pub use exec::{CpuBackend, CpuProgram};
