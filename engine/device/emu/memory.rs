//! Host memory standing in for device memory: 256-byte aligned allocations between guard bands of 0xff, address
//! lookup for range checks, and the liveness checks (poison dead bytes before a command, find unexpected writes
//! after it).

use crate::engine::device::{DevPtr, Span};
use crate::error::{Error, Result};
use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;

const ALIGN: usize = 256;
const GUARD: usize = 256;
/// 0xff bytes read as NaN in f32, bf16 and f16.
pub const POISON: u8 = 0xff;

/// One allocation: GUARD bytes, `len` data bytes, GUARD bytes.
struct Allocation {
    base: NonNull<u8>,
    len: usize,
    what: String,
}

impl Allocation {
    fn layout(len: usize) -> Result<Layout> {
        Layout::from_size_align(len + 2 * GUARD, ALIGN)
            .map_err(|_| Error::msg(format!("emulated device: an allocation of {len} bytes is too large")))
    }
    fn data(&self) -> *mut u8 {
        // SAFETY: the allocation spans GUARD + len + GUARD bytes from `base`.
        unsafe { self.base.as_ptr().add(GUARD) }
    }
    fn start(&self) -> u64 {
        self.data() as u64
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes from `data()` belong to this allocation; the device is the only writer and
        // nothing writes while `&self` is borrowed here.
        unsafe { std::slice::from_raw_parts(self.data(), self.len) }
    }
    fn guards_intact(&self) -> bool {
        // SAFETY: both guard bands lie inside the allocation.
        let (front, back) = unsafe {
            (
                std::slice::from_raw_parts(self.base.as_ptr(), GUARD),
                std::slice::from_raw_parts(self.data().add(self.len), GUARD),
            )
        };
        front.iter().chain(back).all(|&b| b == POISON)
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        // SAFETY: allocated in `Memory::alloc` with this layout (which was valid then).
        unsafe { dealloc(self.base.as_ptr(), Allocation::layout(self.len).expect("valid at allocation")) }
    }
}

/// All of an emulated device's memory.
#[derive(Default)]
pub struct Memory {
    allocations: Vec<Allocation>,
    /// Contents of every allocation before the current command (when checking).
    snapshot: Option<Vec<Vec<u8>>>,
}

// SAFETY: the allocations are owned exclusively by this value; moving it moves that ownership.
unsafe impl Send for Memory {}

impl Memory {
    /// `bytes` of fresh memory, filled with 0xff like memory nobody wrote (it reads as NaN).
    pub fn alloc(&mut self, bytes: u64, what: &str) -> Result<DevPtr> {
        let len = usize::try_from(bytes).map_err(|_| Error::msg(format!("{what}: {bytes} bytes do not fit")))?;
        let layout = Allocation::layout(len)?;
        // SAFETY: the layout has a non-zero size (two guard bands at least).
        let raw = unsafe { alloc(layout) };
        let base = NonNull::new(raw).ok_or_else(|| {
            Error::msg(format!("emulated device: out of host memory allocating {len} bytes for {what}"))
        })?;
        // SAFETY: `base` points at `len + 2 * GUARD` writable bytes just allocated.
        unsafe { std::ptr::write_bytes(base.as_ptr(), POISON, len + 2 * GUARD) };
        let a = Allocation { base, len, what: what.to_string() };
        let ptr = DevPtr(a.start());
        self.allocations.push(a);
        Ok(ptr)
    }

    fn find(&self, ptr: DevPtr) -> Option<&Allocation> {
        self.allocations.iter().find(|a| ptr.0 >= a.start() && ptr.0 < a.start() + a.len as u64)
    }

    /// Checks that `span` lies inside one allocation; `what` names the operand in the error.
    pub fn check(&self, span: Span, what: &str) -> Result<()> {
        if span.bytes == 0 {
            return Ok(());
        }
        match self.find(span.ptr) {
            Some(a) if span.end() <= a.start() + a.len as u64 => Ok(()),
            Some(a) => Err(Error::msg(format!(
                "{what}: {} bytes at offset {} run past the end of `{}` ({} bytes)",
                span.bytes,
                span.ptr.0 - a.start(),
                a.what,
                a.len
            ))),
            None => Err(Error::msg(format!("{what}: address {:#x} is not device memory", span.ptr.0))),
        }
    }

    /// Checks that a kernel's pointer argument points into device memory (or is null).
    pub fn check_pointer(&self, ptr: DevPtr, what: &str) -> Result<()> {
        if ptr == DevPtr::NULL || self.find(ptr).is_some() {
            Ok(())
        } else {
            Err(Error::msg(format!("{what}: address {:#x} is not device memory", ptr.0)))
        }
    }

    /// The bytes of `span` (checked).
    pub fn read(&self, span: Span, what: &str) -> Result<&[u8]> {
        self.check(span, what)?;
        // SAFETY: checked to lie inside one allocation, which nothing writes while `&self` is borrowed.
        Ok(unsafe { std::slice::from_raw_parts(span.ptr.0 as *const u8, span.bytes as usize) })
    }

    /// The bytes of `span` (checked), writable.
    pub fn write(&mut self, span: Span, what: &str) -> Result<&mut [u8]> {
        self.check(span, what)?;
        // SAFETY: checked to lie inside one allocation, exclusively borrowed through `&mut self`.
        Ok(unsafe { std::slice::from_raw_parts_mut(span.ptr.0 as *mut u8, span.bytes as usize) })
    }

    /// Before a command: fills every byte of `arena` outside `live` with 0xff, then remembers all memory.
    pub fn poison_and_snapshot(&mut self, arena: Span, live: &[Span]) -> Result<()> {
        let mut keep: Vec<(u64, u64)> = live.iter().filter(|s| s.bytes > 0).map(|s| (s.ptr.0, s.end())).collect();
        keep.sort_unstable();
        let mut at = arena.ptr.0;
        for (start, end) in keep.into_iter().chain([(arena.end(), arena.end())]) {
            let start = start.clamp(arena.ptr.0, arena.end());
            if start > at {
                self.write(Span::new(DevPtr(at), start - at), "poisoning")?.fill(POISON);
            }
            at = at.max(end.min(arena.end()));
        }
        self.snapshot = Some(self.allocations.iter().map(|a| a.bytes().to_vec()).collect());
        Ok(())
    }

    /// After a command: every byte outside `writes` must equal the snapshot, and every guard band must be intact.
    pub fn check_unchanged(&mut self, what: &str, writes: &[Span]) -> Result<()> {
        for a in &self.allocations {
            if !a.guards_intact() {
                return Err(Error::msg(format!(
                    "{what} wrote outside device memory `{}` (a guard band changed)",
                    a.what
                )));
            }
        }
        let Some(before) = self.snapshot.take() else { return Ok(()) };
        for (a, old) in self.allocations.iter().zip(&before) {
            let now = a.bytes();
            if now == old.as_slice() {
                continue;
            }
            let allowed = |addr: u64| writes.iter().any(|w| addr >= w.ptr.0 && addr < w.end());
            if let Some(i) = (0..a.len).find(|&i| now[i] != old[i] && !allowed(a.start() + i as u64)) {
                return Err(Error::msg(format!(
                    "{what} wrote byte {i} of `{}`, outside its outputs and scratch (was {:#04x}, now {:#04x})",
                    a.what, old[i], now[i]
                )));
            }
        }
        Ok(())
    }
}
