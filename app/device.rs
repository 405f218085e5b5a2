//! The device choice, in one place: every command that runs a graph (train, sample, forward, bench train,
//! profile) compiles it through [`compile_program`], which picks the backend for `--device`.
//!
//! - `cpu`: the CPU backend (the reference, and the default).
//! - `cuda-emu`: the CUDA executor ([`GpuBackend`]) on the emulated device: the same lowered commands a GPU runs,
//!   executed on the CPU under an emulation of the CUDA execution model (slow: for checking the executor).
//! - `cuda`: the CUDA executor on a real GPU ([`CudaDevice`]). Without a usable GPU (no driver, no device, a missing
//!   library or symbol) it is one clear error line naming what was probed and what is missing, before any config,
//!   weight or data is loaded.
//!
//! `use_flash_attention` (the config's two keys, which must agree: see [`flash_attention`]) reaches the CUDA executor
//! through [`CompileOptions`]; the CPU backend ignores it and computes the same attention either way.

use crate::engine::cpu::{CpuBackend, CpuProgram};
use crate::engine::cuda::CudaDevice;
use crate::engine::device::emu::{EmuDevice, EmuOptions};
use crate::engine::gpu::lower::Cmd;
use crate::engine::gpu::{GpuBackend, GpuProgram, StepMode};
use crate::engine::profile::Profile;
use crate::engine::{Backend, HostTensor, Program};
use crate::error::{Error, Result};
use crate::graph::passes::MemoryPlan;
use crate::graph::{Graph, ValueId, ValueKind};
use crate::io::config::Accelerator;

/// Where graphs run (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeviceChoice {
    /// The CPU backend (the reference).
    #[default]
    Cpu,
    /// The CUDA executor on a GPU (device 0).
    Cuda,
    /// The CUDA executor on the CPU under emulation of the CUDA execution model (slow: for checking).
    CudaEmu,
}

impl DeviceChoice {
    /// The name `--device` takes.
    pub fn name(self) -> &'static str {
        match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
            DeviceChoice::CudaEmu => "cuda-emu",
        }
    }

    /// Fails early (before configs, weights or data are loaded) for a device that cannot run graphs.
    pub fn check_available(self) -> Result<()> {
        match self {
            DeviceChoice::Cuda => CudaDevice::check_available(0),
            DeviceChoice::Cpu | DeviceChoice::CudaEmu => Ok(()),
        }
    }

    /// The device of a command: `--device` when given, else the config's `trainer.accelerator` as Lightning reads
    /// it: `cpu`; `gpu` (a clear error without a usable GPU, saying what was probed); `auto`, the GPU when one is
    /// usable, else the CPU with one line saying why.
    pub fn resolve(flag: Option<DeviceChoice>, accelerator: Accelerator) -> Result<DeviceChoice> {
        if let Some(d) = flag {
            d.check_available()?;
            return Ok(d);
        }
        match accelerator {
            Accelerator::Cpu => Ok(DeviceChoice::Cpu),
            Accelerator::Gpu => DeviceChoice::Cuda
                .check_available()
                .map(|()| DeviceChoice::Cuda)
                .map_err(|e| Error::msg(format!("trainer.accelerator is gpu, but {e} (or pass --device cpu)"))),
            Accelerator::Auto => match DeviceChoice::Cuda.check_available() {
                Ok(()) => Ok(DeviceChoice::Cuda),
                Err(e) => {
                    static NOTE: std::sync::Once = std::sync::Once::new();
                    NOTE.call_once(|| eprintln!("trainer.accelerator=auto: no usable GPU ({e}); running on the CPU"));
                    Ok(DeviceChoice::Cpu)
                }
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A compiled program on the chosen device. It implements [`Program`], so everything that uploads, launches and
/// downloads is the same for every device; the device-specific extras are behind [`DeviceProgram::as_cpu_mut`] and
/// [`DeviceProgram::as_emulated`].
pub struct DeviceProgram {
    inner: Inner,
    /// `ZEROCONV_CHECK_FINITE=1` where the backend has no per-kernel check: the step's inputs, outputs and
    /// parameters/state are checked after each step instead (see [`DeviceProgram::set_check_finite`]).
    check_after_step: bool,
}

enum Inner {
    Cpu(Box<CpuProgram>),
    CudaEmu(Box<GpuProgram<EmuDevice>>),
    Cuda(Box<GpuProgram<CudaDevice>>),
}

/// `--threads` as the CPU backend gets it: more threads than cores only slow every kernel down (and each thread
/// gets its own kernel scratch), so a request above the cores available is capped there, with a notice (once per
/// process). Results do not depend on the thread count, so the cap changes only the time.
pub fn cap_threads(threads: Option<usize>) -> Option<usize> {
    static NOTICE: std::sync::Once = std::sync::Once::new();
    let cores = CpuBackend::default_threads();
    match threads {
        Some(t) if t > cores => {
            NOTICE
                .call_once(|| eprintln!("note: --threads {t} is more than the {cores} cores available; using {cores}"));
            Some(cores)
        }
        other => other,
    }
}

/// How a graph is compiled, besides the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompileOptions {
    /// The CPU backend's thread count (default: one per core; capped at the cores available, see
    /// [`cap_threads`]); the CUDA executor ignores it.
    pub threads: Option<usize>,
    /// The CUDA executor runs attention on the flash kernels where they fit
    /// ([`GpuBackend::with_flash_attention`]); the CPU backend ignores it (its attention is the reference).
    pub flash_attention: bool,
}

impl CompileOptions {
    pub fn threads(threads: Option<usize>) -> Self {
        CompileOptions { threads, flash_attention: false }
    }
}

/// `model.unet_config.use_flash_attention` and `model.control_stage_config.use_flash_attention` as one setting. NeMo
/// reads them per module, but the CUDA executor chooses attention kernels per compiled graph, where the U-Net's
/// attention and the ControlNet's are the same op, so two different values are refused rather than half-honoured.
/// (Config validation refuses them first; this guards configs built in code.)
pub fn flash_attention(unet: bool, control: bool) -> Result<bool> {
    if unet != control {
        return Err(Error::msg(format!(
            "model.unet_config.use_flash_attention is {unet} but model.control_stage_config.use_flash_attention is \
             {control}: the CUDA executor selects flash attention for the whole step, so set both to the same value"
        )));
    }
    Ok(unet)
}

/// Compiles `graph` for `device` with `options`.
pub fn compile_program(device: DeviceChoice, graph: Graph, options: &CompileOptions) -> Result<DeviceProgram> {
    device.check_available()?;
    let threads = cap_threads(options.threads);
    let inner = match device {
        DeviceChoice::Cpu => {
            // The CPU program reads ZEROCONV_CHECK_FINITE and ZEROCONV_DEBUG itself.
            let backend = threads.map_or_else(CpuBackend::default, CpuBackend::new);
            Inner::Cpu(Box::new(backend.compile(graph)?))
        }
        // The GPU program reads ZEROCONV_DEBUG (per-kernel echo) itself.
        DeviceChoice::CudaEmu => Inner::CudaEmu(Box::new(
            GpuBackend::emulated(EmuOptions::default())
                .with_check_finite(crate::knobs::check_finite())
                .with_flash_attention(options.flash_attention)
                .compile(graph)?,
        )),
        DeviceChoice::Cuda => Inner::Cuda(Box::new(
            GpuBackend::new(|| CudaDevice::open(0), StepMode::CaptureAfterFirst)
                .with_check_finite(crate::knobs::check_finite())
                .with_flash_attention(options.flash_attention)
                .compile(graph)?,
        )),
    };
    let mut p = DeviceProgram { inner, check_after_step: false };
    if crate::knobs::check_finite() {
        p.set_check_finite(true);
    }
    Ok(p)
}

impl DeviceProgram {
    pub fn device(&self) -> DeviceChoice {
        match self.inner {
            Inner::Cpu(_) => DeviceChoice::Cpu,
            Inner::CudaEmu(_) => DeviceChoice::CudaEmu,
            Inner::Cuda(_) => DeviceChoice::Cuda,
        }
    }

    /// The CPU program, on `--device cpu`.
    pub fn as_cpu_mut(&mut self) -> Option<&mut CpuProgram> {
        match &mut self.inner {
            Inner::Cpu(p) => Some(p),
            Inner::CudaEmu(_) | Inner::Cuda(_) => None,
        }
    }

    /// The CUDA executor's program on the emulated device, on `--device cuda-emu`.
    pub fn as_emulated(&self) -> Option<&GpuProgram<EmuDevice>> {
        match &self.inner {
            Inner::Cpu(_) | Inner::Cuda(_) => None,
            Inner::CudaEmu(p) => Some(p),
        }
    }

    /// The lowered device commands of one step, with their node, where the backend lowers to commands (the CUDA
    /// executor); `None` on the CPU.
    pub fn commands(&self) -> Option<Vec<(usize, &Cmd)>> {
        match &self.inner {
            Inner::Cpu(_) => None,
            Inner::CudaEmu(p) => Some(p.all_commands().collect()),
            Inner::Cuda(p) => Some(p.all_commands().collect()),
        }
    }

    /// Turns the NaN/Inf check on or off (also on with `ZEROCONV_CHECK_FINITE=1`). On the CPU every kernel's outputs
    /// are checked and the step stops at the first kernel that produces a NaN or Inf. The CUDA executor compiled
    /// with `ZEROCONV_CHECK_FINITE=1` checks every kernel's outputs on the device and names the first node; turned on
    /// after compiling, it checks the step's inputs, outputs, parameters and optimizer state after each step instead
    /// and names the first non-finite one (a note on stderr says so).
    pub fn set_check_finite(&mut self, on: bool) {
        match &mut self.inner {
            Inner::Cpu(p) => p.set_check_finite(on),
            // Compiled with the per-kernel check (ZEROCONV_CHECK_FINITE=1): the program checks every kernel.
            Inner::CudaEmu(p) if p.checks_finite() => {}
            Inner::Cuda(p) if p.checks_finite() => {}
            Inner::CudaEmu(_) | Inner::Cuda(_) => {
                let device = self.device();
                static NOTE: std::sync::Once = std::sync::Once::new();
                if on {
                    NOTE.call_once(|| {
                        eprintln!(
                        "note: the NaN/Inf check was turned on after compiling for --device {}: the step's inputs, \
                         outputs, parameters and optimizer state are checked after each step (set \
                         ZEROCONV_CHECK_FINITE=1 before compiling to check every kernel)",
                            device
                        )
                    });
                }
                self.check_after_step = on;
            }
        }
    }

    /// After a step: the first non-finite element among the float inputs, outputs, parameters and state.
    fn check_step_finite(&mut self) -> Result<()> {
        let g = self.graph();
        let rank = |k: &ValueKind| match k {
            ValueKind::Input => 0,
            ValueKind::Intermediate => 1,
            ValueKind::Param { .. } => 2,
            ValueKind::State => 3,
        };
        let mut values: Vec<ValueId> = (0..g.values.len())
            .filter(|&v| g.values[v].kind.is_source() || g.outputs.contains(&v))
            .filter(|&v| g.dtype(v).is_float())
            .collect();
        values.sort_by_key(|&v| rank(&g.values[v].kind));
        for v in values {
            let t = self.download(v)?;
            if let Some((at, x)) = t.to_f64().into_iter().enumerate().find(|(_, x)| !x.is_finite()) {
                let val = &self.graph().values[v];
                let what = match val.kind {
                    ValueKind::Input => "input",
                    ValueKind::Intermediate => "output",
                    ValueKind::Param { .. } => "parameter",
                    ValueKind::State => "optimizer state",
                };
                return Err(Error::msg(format!(
                    "the first non-finite value after the step: {x} at element {at} of {what} {} ({} {}); --device {} \
                     checks after each step, not each kernel: rerun with --device cpu and ZEROCONV_CHECK_FINITE=1 to \
                     stop at the kernel that produces it",
                    val.name,
                    val.shape,
                    val.dtype,
                    self.device()
                )));
            }
        }
        Ok(())
    }

    fn program(&self) -> &dyn Program {
        match &self.inner {
            Inner::Cpu(p) => p.as_ref(),
            Inner::CudaEmu(p) => p.as_ref(),
            Inner::Cuda(p) => p.as_ref(),
        }
    }

    fn program_mut(&mut self) -> &mut dyn Program {
        match &mut self.inner {
            Inner::Cpu(p) => p.as_mut(),
            Inner::CudaEmu(p) => p.as_mut(),
            Inner::Cuda(p) => p.as_mut(),
        }
    }
}

impl Program for DeviceProgram {
    fn graph(&self) -> &Graph {
        self.program().graph()
    }

    fn plan(&self) -> &MemoryPlan {
        self.program().plan()
    }

    fn upload(&mut self, v: ValueId, t: &HostTensor) -> Result<()> {
        self.program_mut().upload(v, t)
    }

    fn download(&mut self, v: ValueId) -> Result<HostTensor> {
        self.program_mut().download(v)
    }

    fn launch_nodes(&mut self, nodes: std::ops::Range<usize>) -> Result<()> {
        self.program_mut().launch_nodes(nodes)?;
        if self.check_after_step {
            self.program_mut().synchronize()?;
            self.check_step_finite()?;
        }
        Ok(())
    }

    fn synchronize(&mut self) -> Result<()> {
        self.program_mut().synchronize()
    }

    fn set_communicator(&mut self, comm: std::sync::Arc<dyn crate::engine::dist::Communicator>) -> Result<()> {
        self.program_mut().set_communicator(comm)
    }

    fn set_profiling(&mut self, on: bool, echo: bool) {
        self.program_mut().set_profiling(on, echo)
    }

    fn profile(&self) -> Option<&Profile> {
        self.program().profile()
    }
}
