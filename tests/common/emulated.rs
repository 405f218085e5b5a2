//! The harness of the emulated-kernel tests: one hand-written module under the CUDA emulator, launched under every
//! thread schedule, recording which kernels a test launched so it can insist that every kernel was checked.
#![allow(dead_code)]

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::sync::Arc;
use zeroconv::kernels;
use zeroconv::kernels::emulate::{self, EmuModule, KernelArgs, LaunchConfig, Schedule};

/// Every legal schedule the emulator offers; a correct kernel gives the same bits under all of them.
pub const SCHEDULES: [Schedule; 4] =
    [Schedule::Ascending, Schedule::Descending, Schedule::Lockstep, Schedule::Shuffled(0x5eed)];

pub struct Kernels {
    pub module: Arc<EmuModule>,
    launched: RefCell<BTreeSet<String>>,
    schedule: Cell<Schedule>,
}

impl Kernels {
    pub fn new(name: &str) -> Self {
        let m = kernels::module(name).unwrap_or_else(|| panic!("no kernel module `{name}`"));
        let module = emulate::compile_module(m).unwrap_or_else(|e| panic!("emulating kernels/{name}.cu: {e}"));
        Self::from_module(module)
    }

    /// A module compiled from another source (a deliberately broken copy, say).
    pub fn from_module(module: Arc<EmuModule>) -> Self {
        Kernels { module, launched: RefCell::default(), schedule: Cell::new(Schedule::Ascending) }
    }

    pub fn launch(
        &self,
        kernel: &str,
        grid: impl Into<emulate::Dim3>,
        block: impl Into<emulate::Dim3>,
        args: KernelArgs,
    ) {
        self.launch_with_shared(kernel, grid, block, 0, args);
    }

    /// [`Kernels::launch`] with `shared_bytes` of dynamic shared memory.
    pub fn launch_with_shared(
        &self,
        kernel: &str,
        grid: impl Into<emulate::Dim3>,
        block: impl Into<emulate::Dim3>,
        shared_bytes: u32,
        args: KernelArgs,
    ) {
        self.launched.borrow_mut().insert(kernel.to_string());
        let cfg = LaunchConfig::new(grid, block).with_shared_bytes(shared_bytes).with_schedule(self.schedule.get());
        // SAFETY: every caller sizes the buffers it passes for the element counts it passes, as documented in
        // the kernel's .cu file; the emulator checks argument sizes and guard bands besides.
        unsafe { self.module.launch(kernel, &cfg, &args) }.unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs `case` (which uploads, launches and downloads) under every schedule, checks the outputs are
    /// bit-identical and returns them.
    pub fn each_schedule(&self, what: &str, case: impl Fn() -> Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let mut first: Option<Vec<Vec<u8>>> = None;
        for s in SCHEDULES {
            self.schedule.set(s);
            let out = case();
            match &first {
                None => first = Some(out),
                Some(f) => {
                    for (k, (a, b)) in f.iter().zip(&out).enumerate() {
                        assert!(
                            a == b,
                            "{what}: output {k} differs between the {:?} and {s:?} schedules (a race, a missing \
                             barrier, or a read of memory the kernel was not given)",
                            SCHEDULES[0]
                        );
                    }
                }
            }
        }
        self.schedule.set(Schedule::Ascending);
        first.unwrap_or_default()
    }

    /// [`Kernels::each_schedule`] with the small grid `small`, then once more with the grid `full` that covers the
    /// data in one pass, which must give the same bytes again (for kernels whose result does not depend on the
    /// grid). Returns the outputs.
    pub fn each_schedule_and_grid(
        &self,
        what: &str,
        small: u32,
        full: u32,
        case: impl Fn(u32) -> Vec<Vec<u8>>,
    ) -> Vec<Vec<u8>> {
        let first = self.each_schedule(what, || case(small));
        let out = case(full);
        for (k, (a, b)) in first.iter().zip(&out).enumerate() {
            assert!(a == b, "{what}: output {k} differs between a grid of {small} and one of {full} blocks");
        }
        first
    }

    /// Fails unless every kernel of the module was launched by the test.
    pub fn assert_all_launched(&self) {
        let all: BTreeSet<String> = self.module.kernels().iter().map(|k| k.name.clone()).collect();
        let launched = self.launched.borrow();
        let missing: Vec<&String> = all.difference(&launched).collect();
        assert!(missing.is_empty(), "module `{}`: kernels never checked: {missing:?}", self.module.name());
    }
}
