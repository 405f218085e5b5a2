//! One CUDA device with the embedded kernel modules loaded for its architecture.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use super::probe::{probe_device, DeviceInfo};
use crate::error::{Error, Result};
use crate::kernels::{self, Arch, KernelModule, MODULES};

/// Which embedded image of a module a device loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleImage {
    /// ptxas output, run natively: no JIT, and no need for a driver as new as the NVRTC that wrote the PTX.
    Cubin(Arch),
    /// PTX, compiled by the driver at load time (for newer architectures than the cubins target).
    Ptx(Arch),
}

/// The image to load for `arch` on a device of compute capability `device_major`.x: the cubin when the device
/// runs that architecture's machine code natively (same major version) and the cubin exists, otherwise the PTX.
pub fn module_image(module: &KernelModule, arch: Arch, device_major: u32) -> ModuleImage {
    if device_major == arch.major() && !module.cubin(arch).is_empty() {
        ModuleImage::Cubin(arch)
    } else {
        ModuleImage::Ptx(arch)
    }
}

/// A device, its context, a stream of its own (graph capture cannot use the legacy default stream), and every
/// kernel module loaded.
pub struct CudaDevice {
    info: DeviceInfo,
    arch: Arch,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Vec<(&'static str, Arc<CudaModule>)>,
}

impl CudaDevice {
    /// Probes device `ordinal`, creates its context and loads every embedded kernel module.
    pub fn open(ordinal: usize) -> Result<Self> {
        let info = probe_device(ordinal)?;
        if !kernels::compiled() {
            return Err(Error::Unsupported {
                backend: "cuda",
                msg: format!(
                    "this build has no CUDA kernels ({}); run `eval \"$(scripts/setup-cuda-tools)\"` and rebuild",
                    kernels::build_note()
                ),
            });
        }
        let (major, minor) = info.compute_capability;
        let arch = Arch::for_compute_capability(major, minor).ok_or_else(|| Error::Unsupported {
            backend: "cuda",
            msg: format!("{} has compute capability {major}.{minor}; kernels need 8.0 or newer", info.name),
        })?;
        let context = CudaContext::new(ordinal).map_err(|e| driver_error("creating the CUDA context", e))?;
        let stream = context.new_stream().map_err(|e| driver_error("creating a stream", e))?;
        let mut modules = Vec::with_capacity(MODULES.len());
        for module in MODULES {
            let image = module_image(module, arch, major);
            let loaded = match image {
                ModuleImage::Cubin(a) => context.load_module(Ptx::from_binary(module.cubin(a).to_vec())),
                ModuleImage::Ptx(a) => context.load_module(Ptx::from_src(module.ptx(a))),
            }
            .map_err(|e| {
                driver_error(&format!("loading kernels/{}.cu ({image:?}) on {}", module.name, info.name), e)
            })?;
            modules.push((module.name, loaded));
        }
        Ok(CudaDevice { info, arch, context, stream, modules })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The build of the kernels this device runs.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The kernel called `name` (e.g. `unary_silu_f32`), from whichever module defines it.
    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        let owner = kernels::module_of_kernel(name)
            .ok_or_else(|| Error::Unsupported { backend: "cuda", msg: format!("no kernel named {name}") })?;
        let module = self
            .modules
            .iter()
            .find(|(n, _)| *n == owner.name)
            .map(|(_, m)| m)
            .ok_or_else(|| Error::msg(format!("kernels/{}.cu is not loaded", owner.name)))?;
        module.load_function(name).map_err(|e| driver_error(&format!("looking up kernel {name}"), e))
    }

    /// Runs a few kernels on small inputs whose sizes are not multiples of the launch shape and compares them with
    /// a host computation. A check that the toolchain, the loaded images and the launch conventions agree; the
    /// full comparison with the CPU backend is the GPU test suite's job.
    pub fn verify_kernels(&self) -> Result<Vec<KernelCheck>> {
        Ok(vec![self.check_silu()?, self.check_softmax()?])
    }

    fn check_silu(&self) -> Result<KernelCheck> {
        let kernel = "unary_silu_f32";
        let n = 1000usize;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) / 40.0).collect();
        let f = self.function(kernel)?;
        let s = &self.stream;
        let err = |e| driver_error(kernel, e);
        let x_dev = s.clone_htod(&x).map_err(err)?;
        let mut y_dev = s.alloc_zeros::<f32>(n).map_err(err)?;
        let n_arg = n as u64;
        // 2 blocks of 128 threads cover 256 < n elements, so the grid-stride loop is exercised.
        let cfg = LaunchConfig { grid_dim: (2, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: unary_silu_f32(const float* x, float* y, u64 n): both buffers hold n f32 values.
        unsafe { s.launch_builder(&f).arg(&x_dev).arg(&mut y_dev).arg(&n_arg).launch(cfg) }.map_err(err)?;
        let y = s.clone_dtoh(&y_dev).map_err(err)?;
        let max_abs_error = x
            .iter()
            .zip(&y)
            .map(|(&xi, &yi)| {
                let xi = f64::from(xi);
                (xi / (1.0 + (-xi).exp()) - f64::from(yi)).abs()
            })
            .fold(0.0, f64::max);
        Ok(KernelCheck { kernel, max_abs_error, tolerance: 1e-5 })
    }

    fn check_softmax(&self) -> Result<KernelCheck> {
        let kernel = "softmax_f32";
        let (rows, cols) = (37usize, 100usize);
        let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0).collect();
        let f = self.function(kernel)?;
        let s = &self.stream;
        let err = |e| driver_error(kernel, e);
        let x_dev = s.clone_htod(&x).map_err(err)?;
        let mut y_dev = s.alloc_zeros::<f32>(rows * cols).map_err(err)?;
        let (rows_arg, cols_arg) = (rows as u64, cols as u64);
        // 3 blocks of 4 warps = 12 warps for 37 rows of 100 (not a multiple of 32) values.
        let cfg = LaunchConfig { grid_dim: (3, 1, 1), block_dim: (32, 4, 1), shared_mem_bytes: 0 };
        // SAFETY: softmax_f32(const float* x, float* y, u64 rows, u64 D): both buffers hold rows * D f32 values.
        unsafe { s.launch_builder(&f).arg(&x_dev).arg(&mut y_dev).arg(&rows_arg).arg(&cols_arg).launch(cfg) }
            .map_err(err)?;
        let y = s.clone_dtoh(&y_dev).map_err(err)?;
        let mut max_abs_error = 0.0f64;
        for (xr, yr) in x.chunks(cols).zip(y.chunks(cols)) {
            let m = xr.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(f64::from(v)));
            let sum: f64 = xr.iter().map(|&v| (f64::from(v) - m).exp()).sum();
            for (&xv, &yv) in xr.iter().zip(yr) {
                max_abs_error = max_abs_error.max(((f64::from(xv) - m).exp() / sum - f64::from(yv)).abs());
            }
        }
        Ok(KernelCheck { kernel, max_abs_error, tolerance: 1e-6 })
    }
}

/// The outcome of one kernel in [`CudaDevice::verify_kernels`].
#[derive(Clone, Debug)]
pub struct KernelCheck {
    pub kernel: &'static str,
    pub max_abs_error: f64,
    pub tolerance: f64,
}

impl KernelCheck {
    pub fn passed(&self) -> bool {
        self.max_abs_error <= self.tolerance
    }
}

fn driver_error(what: &str, e: DriverError) -> Error {
    Error::msg(format!("CUDA: {what}: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH_CUBINS: KernelModule = KernelModule {
        name: "t",
        source: "",
        ptx_sm80: "ptx80",
        cubin_sm80: b"\x7fELF",
        ptxas_report_sm80: "",
        ptx_sm90: "ptx90",
        cubin_sm90: b"\x7fELF",
        ptxas_report_sm90: "",
    };
    const PTX_ONLY: KernelModule = KernelModule { cubin_sm80: b"", cubin_sm90: b"", ..WITH_CUBINS };

    #[test]
    fn cubins_run_on_their_own_major_version_and_ptx_elsewhere() {
        assert_eq!(module_image(&WITH_CUBINS, Arch::Sm80, 8), ModuleImage::Cubin(Arch::Sm80));
        assert_eq!(module_image(&WITH_CUBINS, Arch::Sm90, 9), ModuleImage::Cubin(Arch::Sm90));
        // Blackwell (10.x, 12.x) gets the sm_90 build as PTX, which the driver compiles for it.
        assert_eq!(module_image(&WITH_CUBINS, Arch::Sm90, 10), ModuleImage::Ptx(Arch::Sm90));
        assert_eq!(module_image(&PTX_ONLY, Arch::Sm90, 9), ModuleImage::Ptx(Arch::Sm90));
        assert_eq!(module_image(&PTX_ONLY, Arch::Sm80, 8), ModuleImage::Ptx(Arch::Sm80));
    }
}
