//! The CUDA backend's real device: finding the driver and the libraries without ever panicking, the pure library
//! argument builders, and [`CudaDevice`], the device seam on a GPU.
//!
//! Everything goes through cudarc with `dynamic-loading`, so the crate links and runs on machines without CUDA.
//! cudarc panics when it cannot load a library or a symbol, so [`libs`] and [`probe`] first check with libloading
//! that every library and every symbol the executor calls is there, and only then is cudarc called; without a
//! driver every entry point returns `Error::CudaUnavailable`.

pub mod args;
mod device;
mod handles;
pub mod libs;
pub mod nccl;
pub mod nvrtc;
pub mod nvtx;
mod probe;

pub use device::{module_image, CudaDevice, ModuleImage};
pub use probe::{driver_library_names, probe, probe_device, DeviceInfo};
