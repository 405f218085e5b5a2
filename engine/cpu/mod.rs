//! The CPU backend: the reference every other backend is checked against, and a usable trainer
//! for small configurations.

pub mod conv;
pub mod float;
pub mod gemm;
pub mod peak;
