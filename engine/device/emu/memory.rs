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
    /// When checking: what every allocation must hold, outside the spans the running node may write. Writes made
    /// outside nodes (uploads, memsets) are mirrored into it; a node's declared writes are copied in after the
    /// node passes its check. Comparing against it costs one `memcmp` of memory per node, and no copy.
    shadow: Option<Vec<Vec<u8>>>,
    /// Between `poison_dead` and `check_unchanged`: writes are the node's, checked afterwards.
    in_node: bool,
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

    /// Writes `span` (checked) through `fill`; outside a node, the shadow copy follows.
    pub fn write_with(&mut self, span: Span, what: &str, fill: impl FnOnce(&mut [u8])) -> Result<()> {
        self.check(span, what)?;
        // SAFETY: checked to lie inside one allocation, exclusively borrowed through `&mut self`.
        fill(unsafe { std::slice::from_raw_parts_mut(span.ptr.0 as *mut u8, span.bytes as usize) });
        if !self.in_node {
            self.sync_shadow(span);
        }
        Ok(())
    }

    /// Copies `span`'s current bytes into the shadow (when there is one).
    fn sync_shadow(&mut self, span: Span) {
        let Some(shadow) = self.shadow.as_mut() else { return };
        if span.bytes == 0 {
            return;
        }
        for (a, copy) in self.allocations.iter().zip(shadow.iter_mut()) {
            let (lo, hi) = (a.start(), a.start() + a.len as u64);
            let (s, e) = (span.ptr.0.max(lo), span.end().min(hi));
            if s < e {
                let (s, e) = ((s - lo) as usize, (e - lo) as usize);
                copy[s..e].copy_from_slice(&a.bytes()[s..e]);
            }
        }
    }

    /// Before a node: fills every byte of `arena` outside `live` with 0xff (in the shadow too).
    pub fn poison_dead(&mut self, arena: Span, live: &[Span]) -> Result<()> {
        if self.shadow.is_none() {
            self.shadow = Some(self.allocations.iter().map(|a| a.bytes().to_vec()).collect());
        }
        let mut keep: Vec<(u64, u64)> = live.iter().filter(|s| s.bytes > 0).map(|s| (s.ptr.0, s.end())).collect();
        keep.sort_unstable();
        let mut at = arena.ptr.0;
        for (start, end) in keep.into_iter().chain([(arena.end(), arena.end())]) {
            let start = start.clamp(arena.ptr.0, arena.end());
            if start > at {
                self.write_with(Span::new(DevPtr(at), start - at), "poisoning", |b| b.fill(POISON))?;
            }
            at = at.max(end.min(arena.end()));
        }
        self.in_node = true;
        Ok(())
    }

    /// After a node: every byte outside `writes` must equal the shadow, and every guard band must be intact; then
    /// the shadow takes the node's writes.
    pub fn check_unchanged(&mut self, what: &str, writes: &[Span]) -> Result<()> {
        self.in_node = false;
        for a in &self.allocations {
            if !a.guards_intact() {
                return Err(Error::msg(format!(
                    "{what} wrote outside device memory `{}` (a guard band changed)",
                    a.what
                )));
            }
        }
        let Some(shadow) = self.shadow.as_ref() else { return Ok(()) };
        let mut spans: Vec<(u64, u64)> = writes.iter().filter(|w| w.bytes > 0).map(|w| (w.ptr.0, w.end())).collect();
        spans.sort_unstable();
        for (a, old) in self.allocations.iter().zip(shadow) {
            let (lo, hi) = (a.start(), a.start() + a.len as u64);
            let now = a.bytes();
            // The ranges of this allocation no write span covers, compared a whole range at a time.
            let mut at = lo;
            for &(s, e) in spans.iter().chain(&[(hi, hi)]) {
                let (s, e) = (s.clamp(lo, hi), e.clamp(lo, hi));
                if s > at {
                    let (x, y) = ((at - lo) as usize, (s - lo) as usize);
                    if now[x..y] != old[x..y] {
                        let i = x + (x..y).position(|i| now[i] != old[i]).unwrap_or(0);
                        return Err(Error::msg(format!(
                            "{what} wrote byte {i} of `{}`, outside its outputs and scratch (was {:#04x}, now {:#04x})",
                            a.what, old[i], now[i]
                        )));
                    }
                }
                at = at.max(e);
            }
        }
        for w in writes {
            self.sync_shadow(*w);
        }
        Ok(())
    }
}
