//! Kernel semantics checked on the CPU (DESIGN.md, "Verifying GPU code without a GPU", point 3): the same CUDA C++
//! source that NVRTC compiles for the GPU is compiled by the host `g++` against an emulation of the CUDA
//! execution model (`cuda_emu.h`), loaded into the process and launched like a CUDA kernel, so tests compare its
//! output with the CPU backend's on any machine.
//!
//! - [`compile`] / [`compile_module`]: source text -> [`EmuModule`] (compiled once per process, cached on disk by
//!   source hash in [`default_cache_dir`]).
//! - [`EmuModule::launch`]: a kernel by name, a [`LaunchConfig`] (grid, block, dynamic shared bytes, thread
//!   [`Schedule`]) and [`KernelArgs`] ([`DeviceBuffer`]s for pointers, plain values and `#[repr(C)]` structs),
//!   each checked against the parameter list the compiler saw.
//!
//! How threads, barriers, warp shuffles and shared memory are emulated, and what is reported as an error, is
//! described at the top of `cuda_emu.h`. This is test infrastructure: nothing on the training path uses it.

mod buffer;
mod compile;
mod module;
mod source;

pub use buffer::DeviceBuffer;
pub use compile::default_cache_dir;
pub use module::{
    compile, compile_in, compile_module, Dim3, EmuModule, KernelArgs, KernelSig, LaunchConfig, Param, Schedule,
};
