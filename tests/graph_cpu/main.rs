//! The graph (ops against f64 references and finite differences, passes, fusion, accumulation, codegen) and the models on the CPU backend, with parity against PyTorch/diffusers fixtures.
//!
//! One test binary for these modules: each integration test binary links the whole crate, so grouping them saves
//! most of the suite's link time on a small machine.

#[path = "../common/mod.rs"]
mod common;

mod accumulation;
mod attention_lse;
mod channels_last;
mod codegen;
mod conv_epilogue;
mod cpu_kernels;
mod ddim_schedule;
mod fusion;
mod graph_passes;
mod models;
mod ops;
mod parity;
mod sample_pipeline;
