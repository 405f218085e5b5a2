//! The CUDA executor on the emulated device: kernels, cuBLAS/cuDNN arguments, flash attention, lowering, capture and replay, library probing and the device choice.
//!
//! One test binary for these modules: each integration test binary links the whole crate, so grouping them saves
//! most of the suite's link time on a small machine.

#[path = "../common/mod.rs"]
mod common;

mod all_reduce;
mod comm_stream;
mod cuda_args;
mod device_choice;
mod device_libs;
mod flash_attention_emulated;
mod flash_lowering_emulated;
mod fused_emulated;
mod gpu_abi;
mod gpu_check_script;
mod gpu_emulated;
mod kernels_emulated;
mod kernels_layout_emulated;
mod library_workspace;
mod mma_emulated;
mod runtime_nvrtc;
