//! The CUDA backend: finding the driver and a device without ever panicking, and loading the embedded kernels.
//!
//! Everything goes through cudarc with `dynamic-loading`, so the crate links and runs on machines without CUDA.
//! cudarc panics when it cannot load a library, so [`probe`] first checks with libloading that the driver library
//! loads, and only then calls cudarc; without a driver every entry point returns `Error::CudaUnavailable`.
//! Executing compiled graphs on the device comes later.

mod device;
pub mod nvrtc;
mod probe;

pub use device::{module_image, CudaDevice, KernelCheck, ModuleImage};
pub use probe::{driver_library_names, probe, probe_device, DeviceInfo};
