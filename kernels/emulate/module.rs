//! A compiled emulation module: the loaded shared library, its kernel table, and launching a kernel by name.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use bytemuck::Pod;
use libloading::Library;

use super::buffer::{check_guards, DeviceBuffer};
use super::compile::{build, default_cache_dir};
use crate::error::{Error, Result};
use crate::kernels::KernelModule;

/// Mirror of `zc_emu::KernelInfo` in cuda_emu.h.
#[repr(C)]
struct RawKernelInfo {
    name: *const c_char,
    arity: u64,
    param_sizes: *const u64,
    param_is_pointer: *const u8,
    invoke: *const c_void,
}

/// Mirror of `zc_emu::LaunchConfig` in cuda_emu.h.
#[repr(C)]
struct RawLaunchConfig {
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_shared_bytes: u64,
    thread_order: u32,
    block_order: u32,
    seed: u64,
}

const ABI_VERSION: u32 = 1;
type AbiVersionFn = unsafe extern "C" fn() -> u32;
type KernelsFn = unsafe extern "C" fn(*mut u64) -> *const RawKernelInfo;
type LaunchFn =
    unsafe extern "C" fn(*const RawKernelInfo, *mut *mut c_void, *const RawLaunchConfig, *mut c_char, u64) -> c_int;

/// One kernel parameter, as the compiler laid it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param {
    pub bytes: usize,
    pub is_pointer: bool,
}

/// A kernel of a module: its name and parameter list.
#[derive(Clone, Debug)]
pub struct KernelSig {
    pub name: String,
    pub params: Vec<Param>,
    index: usize,
}

/// A grid or block shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

impl From<u32> for Dim3 {
    fn from(x: u32) -> Self {
        Dim3 { x, y: 1, z: 1 }
    }
}
impl From<(u32, u32)> for Dim3 {
    fn from((x, y): (u32, u32)) -> Self {
        Dim3 { x, y, z: 1 }
    }
}
impl From<(u32, u32, u32)> for Dim3 {
    fn from((x, y, z): (u32, u32, u32)) -> Self {
        Dim3 { x, y, z }
    }
}

/// The order in which the emulator runs the threads of a block between synchronisation points, and the blocks of
/// the grid. Every one is a legal GPU schedule, so a correct kernel gives the same result under all of them;
/// running a kernel under several is how tests catch a missing barrier or a race.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Schedule {
    /// Warp 0 first, as far as it can go (until its threads wait at `__syncthreads` or exit), then warp 1, ...;
    /// blocks in order. Early warps run arbitrarily far ahead of later ones.
    #[default]
    Ascending,
    /// The same from the last warp (and last lane, last block) down.
    Descending,
    /// All threads advance one synchronisation point per pass, in thread order: warps side by side.
    Lockstep,
    /// Lockstep passes, each in a pseudo-random thread order drawn from the seed.
    Shuffled(u64),
}

#[derive(Clone, Copy, Debug)]
pub struct LaunchConfig {
    pub grid: Dim3,
    pub block: Dim3,
    pub dynamic_shared_bytes: u32,
    pub schedule: Schedule,
}

impl LaunchConfig {
    pub fn new(grid: impl Into<Dim3>, block: impl Into<Dim3>) -> Self {
        LaunchConfig { grid: grid.into(), block: block.into(), dynamic_shared_bytes: 0, schedule: Schedule::default() }
    }
    pub fn with_shared_bytes(mut self, bytes: u32) -> Self {
        self.dynamic_shared_bytes = bytes;
        self
    }
    pub fn with_schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }
}

#[derive(Clone, Debug)]
enum Arg {
    Pointer {
        address: u64,
        what: String,
    },
    /// The bytes of a by-value parameter, in 16-byte aligned storage (the most any parameter type may need).
    Value {
        words: Vec<u128>,
        len: usize,
    },
}

/// The arguments of one launch, in parameter order: buffers (or null) for pointer parameters, plain-old-data
/// values for the others (scalars and `#[repr(C)]` structs, checked against the kernel's parameter sizes).
#[derive(Clone, Debug, Default)]
pub struct KernelArgs {
    args: Vec<Arg>,
}

impl KernelArgs {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn buffer(mut self, b: &DeviceBuffer) -> Self {
        self.args.push(Arg::Pointer { address: b.device_ptr(), what: format!("buffer `{}`", b.label()) });
        self
    }
    /// A raw device address (an emulated device's allocation, which the emulator cannot bound-check): `what` names
    /// it in errors.
    pub fn address(mut self, address: u64, what: &str) -> Self {
        self.args.push(Arg::Pointer { address, what: what.to_string() });
        self
    }
    /// The bytes of a by-value parameter, as the kernel's parameter list lays them out.
    pub fn value_bytes(mut self, bytes: &[u8]) -> Self {
        let mut words = vec![0u128; bytes.len().div_ceil(16)];
        bytemuck::cast_slice_mut::<u128, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        self.args.push(Arg::Value { words, len: bytes.len() });
        self
    }
    pub fn null(mut self) -> Self {
        self.args.push(Arg::Pointer { address: 0, what: "null".into() });
        self
    }
    pub fn value<T: Pod>(self, v: T) -> Self {
        self.value_bytes(bytemuck::bytes_of(&v))
    }
    pub fn u64(self, v: u64) -> Self {
        self.value(v)
    }
    pub fn u32(self, v: u32) -> Self {
        self.value(v)
    }
    pub fn i32(self, v: i32) -> Self {
        self.value(v)
    }
    pub fn f32(self, v: f32) -> Self {
        self.value(v)
    }
}

/// A kernel source compiled for the host, loaded into this process (for its lifetime: modules are never unloaded,
/// since thread-local storage in them may outlive any handle).
pub struct EmuModule {
    name: String,
    library_path: PathBuf,
    kernels: Vec<KernelSig>,
    by_name: HashMap<String, usize>,
    table: *const RawKernelInfo,
    launch: LaunchFn,
    _library: Library,
}

// SAFETY: the kernel table is immutable data inside the loaded library, which lives as long as the module, and
// zc_emu_launch keeps all its state in thread-local storage, so launches from several threads do not interfere.
unsafe impl Send for EmuModule {}
// SAFETY: as above; `&EmuModule` only reads the table and calls the thread-safe launcher.
unsafe impl Sync for EmuModule {}

impl EmuModule {
    fn load(name: &str, path: &Path) -> Result<Self> {
        let err = |msg: String| Error::file(path, msg);
        // SAFETY: the library was just built by `compile::build` from cuda_emu.h and a generated translation unit;
        // its initialisers only set up static tables.
        let library = unsafe { Library::new(path) }.map_err(|e| err(format!("cannot load: {e}")))?;
        // SAFETY: the symbols are defined by cuda_emu.h and the generated table with exactly these signatures.
        let (abi, kernels_fn, launch) = unsafe {
            let abi = *library.get::<AbiVersionFn>(b"zc_emu_abi_version\0").map_err(|e| err(e.to_string()))?;
            let kernels_fn = *library.get::<KernelsFn>(b"zc_emu_kernels\0").map_err(|e| err(e.to_string()))?;
            let launch = *library.get::<LaunchFn>(b"zc_emu_launch\0").map_err(|e| err(e.to_string()))?;
            (abi, kernels_fn, launch)
        };
        // SAFETY: a plain function of the library with no arguments.
        let version = unsafe { abi() };
        if version != ABI_VERSION {
            return Err(err(format!("emulator ABI {version}, expected {ABI_VERSION}; delete the cache folder")));
        }
        let mut count = 0u64;
        // SAFETY: writes the table length into `count` and returns the static table.
        let table = unsafe { kernels_fn(&mut count) };
        let mut kernels = Vec::with_capacity(count as usize);
        for index in 0..count as usize {
            // SAFETY: `table` has `count` entries; each names a NUL-terminated string and `arity` sizes and flags,
            // all static data of the library.
            let sig = unsafe {
                let info = &*table.add(index);
                let name = CStr::from_ptr(info.name).to_string_lossy().into_owned();
                let params = (0..info.arity as usize)
                    .map(|p| Param {
                        bytes: *info.param_sizes.add(p) as usize,
                        is_pointer: *info.param_is_pointer.add(p) != 0,
                    })
                    .collect();
                KernelSig { name, params, index }
            };
            kernels.push(sig);
        }
        let by_name = kernels.iter().map(|k| (k.name.clone(), k.index)).collect();
        Ok(EmuModule {
            name: name.to_string(),
            library_path: path.to_path_buf(),
            kernels,
            by_name,
            table,
            launch,
            _library: library,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shared library this module was loaded from (in the cache folder, next to its generated C++ source).
    pub fn library_path(&self) -> &Path {
        &self.library_path
    }

    /// Every kernel, in source order.
    pub fn kernels(&self) -> &[KernelSig] {
        &self.kernels
    }

    pub fn kernel(&self, name: &str) -> Result<&KernelSig> {
        match self.by_name.get(name) {
            Some(&i) => Ok(&self.kernels[i]),
            None => {
                let nearest = self
                    .kernels
                    .iter()
                    .map(|k| (strsim::levenshtein(&k.name, name), &k.name))
                    .min()
                    .map(|(_, n)| format!("; did you mean `{n}`?"))
                    .unwrap_or_default();
                Err(Error::msg(format!("module `{}` has no kernel `{name}`{nearest}", self.name)))
            }
        }
    }

    /// Runs `kernel` over the whole grid on this thread and returns when it has finished, checking first that
    /// the arguments match the kernel's parameters (count, pointer or value, size) and afterwards that no live
    /// buffer of this thread was written outside its bounds.
    ///
    /// # Safety
    /// Like a CUDA launch: the kernel dereferences the pointers it is given (and any inside by-value arguments or
    /// device-side tables) at the offsets its own logic computes. The caller must make sure the buffers are large
    /// enough for the sizes passed; the guard bands catch small overruns but not wild pointers.
    pub unsafe fn launch(&self, kernel: &str, config: &LaunchConfig, args: &KernelArgs) -> Result<()> {
        let sig = self.kernel(kernel)?;
        if args.args.len() != sig.params.len() {
            return Err(Error::msg(format!(
                "kernel `{kernel}` takes {} parameters, {} arguments given",
                sig.params.len(),
                args.args.len()
            )));
        }
        // Pointer values need a place in memory too: the launcher receives the address of every argument.
        let mut pointers: Vec<u64> = Vec::with_capacity(args.args.len());
        for (i, (arg, param)) in args.args.iter().zip(&sig.params).enumerate() {
            match arg {
                Arg::Pointer { address, what } => {
                    if !param.is_pointer {
                        return Err(Error::msg(format!(
                            "kernel `{kernel}` argument {i}: {what} given for a {}-byte value parameter",
                            param.bytes
                        )));
                    }
                    pointers.push(*address);
                }
                Arg::Value { len, .. } => {
                    if param.is_pointer {
                        return Err(Error::msg(format!(
                            "kernel `{kernel}` argument {i}: a {len}-byte value given for a pointer parameter \
                             (pass a buffer or null)"
                        )));
                    }
                    if *len != param.bytes {
                        return Err(Error::msg(format!(
                            "kernel `{kernel}` argument {i}: {len} bytes given, the parameter has {} bytes",
                            param.bytes
                        )));
                    }
                    pointers.push(0);
                }
            }
        }
        let mut argv: Vec<*mut c_void> = Vec::with_capacity(args.args.len());
        for (arg, slot) in args.args.iter().zip(pointers.iter_mut()) {
            argv.push(match arg {
                Arg::Pointer { .. } => slot as *mut u64 as *mut c_void,
                Arg::Value { words, .. } => words.as_ptr() as *mut c_void,
            });
        }
        let (thread_order, block_order, seed) = match config.schedule {
            Schedule::Ascending => (0, 0, 0),
            Schedule::Descending => (1, 1, 0),
            Schedule::Lockstep => (2, 0, 0),
            Schedule::Shuffled(seed) => (3, (seed & 1) as u32, seed),
        };
        let raw = RawLaunchConfig {
            grid: [config.grid.x, config.grid.y, config.grid.z],
            block: [config.block.x, config.block.y, config.block.z],
            dynamic_shared_bytes: config.dynamic_shared_bytes as u64,
            thread_order,
            block_order,
            seed,
        };
        let mut message = vec![0 as c_char; 2048];
        // SAFETY: `table` entry `sig.index` exists; `argv` holds one pointer per parameter to storage of the
        // parameter's size (checked above) that outlives the call; `message` has the stated length. What the
        // kernel does with the pointers is the caller's responsibility (see # Safety).
        let status = unsafe {
            (self.launch)(
                self.table.add(sig.index),
                argv.as_mut_ptr(),
                &raw,
                message.as_mut_ptr(),
                message.len() as u64,
            )
        };
        if status != 0 {
            // SAFETY: zc_emu_launch NUL-terminates whatever it writes into `message` (snprintf).
            let text = unsafe { CStr::from_ptr(message.as_ptr()) }.to_string_lossy().into_owned();
            return Err(Error::msg(format!("emulated launch of `{kernel}` failed: {text}")));
        }
        check_guards(kernel)
    }
}

impl std::fmt::Debug for EmuModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EmuModule({:?}, {} kernels, {})", self.name, self.kernels.len(), self.library_path.display())
    }
}

/// One module's load, shared by every caller asking for it (errors kept as text, since `Error` is not `Clone`).
type Cell = Arc<OnceLock<std::result::Result<Arc<EmuModule>, String>>>;
/// The modules of this process by (cache folder, name, source).
type Loaded = Mutex<HashMap<(PathBuf, String, String), Cell>>;

/// Compiles (or finds in the cache folder) and loads `source`, once per process per (folder, name, source):
/// later calls return the same module. Compilations of different sources run in parallel.
pub fn compile_in(cache_dir: &Path, name: &str, source: &str) -> Result<Arc<EmuModule>> {
    static LOADED: OnceLock<Loaded> = OnceLock::new();
    let cell = {
        let mut map = LOADED.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        map.entry((cache_dir.to_path_buf(), name.to_string(), source.to_string())).or_default().clone()
    };
    cell.get_or_init(|| {
        let path = build(cache_dir, name, source).map_err(|e| e.to_string())?;
        EmuModule::load(name, &path).map(Arc::new).map_err(|e| e.to_string())
    })
    .clone()
    .map_err(Error::msg)
}

/// [`compile_in`] the default cache folder ([`default_cache_dir`]).
pub fn compile(name: &str, source: &str) -> Result<Arc<EmuModule>> {
    compile_in(&default_cache_dir(), name, source)
}

/// The emulation of one of the hand-written modules of `kernels/`.
pub fn compile_module(module: &KernelModule) -> Result<Arc<EmuModule>> {
    compile(module.name, &module.self_contained_source())
}
