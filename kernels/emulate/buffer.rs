//! Host memory standing in for device memory in emulated launches.
//!
//! Each buffer is 256-byte aligned (like `cudaMalloc`) and surrounded by guard bands of 0xff bytes. A kernel that
//! reads past either end reads NaN (0xff.. is NaN in f32, bf16 and f16), which poisons its output; one that
//! writes past either end changes a guard, which the next launch on this thread reports by buffer name.

use std::alloc::{alloc, dealloc, Layout};
use std::cell::RefCell;
use std::ptr::NonNull;

use bytemuck::Pod;

use crate::error::{Error, Result};

const ALIGN: usize = 256;
const GUARD: usize = 256;
const POISON: u8 = 0xff;

/// A buffer kernels read and write through its [`device_ptr`](DeviceBuffer::device_ptr). Not `Send`: it belongs
/// to the thread whose launches use it.
pub struct DeviceBuffer {
    /// The start of the allocation: GUARD bytes, then `len` data bytes, then GUARD bytes.
    base: NonNull<u8>,
    len: usize,
    label: String,
}

/// (allocation start, data length, label) of every live buffer of this thread, checked after each launch.
struct Live {
    base: usize,
    len: usize,
    label: String,
}

thread_local! {
    static LIVE: RefCell<Vec<Live>> = const { RefCell::new(Vec::new()) };
}

impl DeviceBuffer {
    fn layout(len: usize) -> Layout {
        // The size cannot overflow for any buffer the host could fill; a failure here is a caller bug.
        Layout::from_size_align(len + 2 * GUARD, ALIGN).expect("buffer size overflows a Layout")
    }

    fn allocate(label: &str, len: usize, fill: u8) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (two guard bands at least).
        let raw = unsafe { alloc(layout) };
        let Some(base) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        // SAFETY: `base` points at `len + 2 * GUARD` writable bytes just allocated.
        unsafe {
            std::ptr::write_bytes(base.as_ptr(), POISON, GUARD);
            std::ptr::write_bytes(base.as_ptr().add(GUARD), fill, len);
            std::ptr::write_bytes(base.as_ptr().add(GUARD + len), POISON, GUARD);
        }
        LIVE.with(|l| l.borrow_mut().push(Live { base: base.as_ptr() as usize, len, label: label.to_string() }));
        DeviceBuffer { base, len, label: label.to_string() }
    }

    /// `len` bytes of 0xff: like fresh device memory, its contents mean nothing, and any element a kernel fails to
    /// write reads back as NaN.
    pub fn uninit(label: &str, len: usize) -> Self {
        Self::allocate(label, len, POISON)
    }

    pub fn zeroed(label: &str, len: usize) -> Self {
        Self::allocate(label, len, 0)
    }

    pub fn from_bytes(label: &str, bytes: &[u8]) -> Self {
        let mut b = Self::allocate(label, bytes.len(), POISON);
        b.write_bytes(bytes);
        b
    }

    pub fn from_slice<T: Pod>(label: &str, data: &[T]) -> Self {
        Self::from_bytes(label, bytemuck::cast_slice(data))
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: GUARD is within the allocation.
        unsafe { self.base.as_ptr().add(GUARD) }
    }

    /// The address kernels see, for kernel arguments and for device-side tables (such as AdamW's) that hold
    /// pointers.
    pub fn device_ptr(&self) -> u64 {
        self.data() as u64
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // SAFETY: the data bytes are initialised (filled at allocation) and no launch runs while `&self` is held
        // on this thread (launches are synchronous and the buffer is not Send).
        unsafe { std::slice::from_raw_parts(self.data(), self.len) }.to_vec()
    }

    /// The contents as `T`s; `len` must be a multiple of `size_of::<T>()`.
    pub fn to_vec<T: Pod>(&self) -> Result<Vec<T>> {
        let size = std::mem::size_of::<T>();
        if size == 0 || !self.len.is_multiple_of(size) {
            return Err(Error::msg(format!(
                "buffer `{}` holds {} bytes, not a whole number of {size}-byte elements",
                self.label, self.len
            )));
        }
        let mut out = vec![T::zeroed(); self.len / size];
        bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&self.to_bytes());
        Ok(out)
    }

    /// Overwrites the start of the buffer with `bytes` (at most `len` of them).
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.len);
        // SAFETY: `n <= len` bytes fit in the data area; `&mut self` excludes other access on this thread.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data(), n) };
    }
}

/// Checks the guard bands of every live buffer of this thread; names the first buffer a kernel wrote outside.
pub(crate) fn check_guards(kernel: &str) -> Result<()> {
    LIVE.with(|l| {
        for b in l.borrow().iter() {
            // SAFETY: a buffer is in LIVE from allocation until its Drop, so both guard bands are readable.
            let (before, after) = unsafe {
                let base = b.base as *const u8;
                (std::slice::from_raw_parts(base, GUARD), std::slice::from_raw_parts(base.add(GUARD + b.len), GUARD))
            };
            if let Some(k) = before.iter().rposition(|&x| x != POISON) {
                return Err(Error::msg(format!(
                    "kernel `{kernel}` wrote {} bytes before the start of buffer `{}` ({} bytes)",
                    GUARD - k,
                    b.label,
                    b.len
                )));
            }
            if let Some(k) = after.iter().position(|&x| x != POISON) {
                return Err(Error::msg(format!(
                    "kernel `{kernel}` wrote past the end of buffer `{}` ({} bytes), at byte offset {}",
                    b.label,
                    b.len,
                    b.len + k
                )));
            }
        }
        Ok(())
    })
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let base = self.base.as_ptr() as usize;
        LIVE.with(|l| l.borrow_mut().retain(|b| b.base != base));
        // SAFETY: allocated in `allocate` with exactly this layout, and no longer referenced by LIVE.
        unsafe { dealloc(self.base.as_ptr(), Self::layout(self.len)) };
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:?}, {} bytes at {:#x})", self.label, self.len, self.device_ptr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_round_trip_and_fresh_memory_is_nan() {
        let b = DeviceBuffer::from_slice("x", &[1.5f32, -2.0, 3.25]);
        assert_eq!(b.len(), 12);
        assert_eq!(b.device_ptr() % 256, 0);
        assert_eq!(b.to_vec::<f32>().unwrap(), [1.5, -2.0, 3.25]);
        assert!(b.to_vec::<f64>().unwrap_err().to_string().contains("whole number"));
        let u = DeviceBuffer::uninit("y", 8);
        assert!(u.to_vec::<f32>().unwrap().iter().all(|v| v.is_nan()));
        assert!(u.to_vec::<u16>().unwrap().iter().all(|&h| half::bf16::from_bits(h).is_nan()));
        assert!(DeviceBuffer::zeroed("z", 4).to_vec::<f32>().unwrap() == [0.0]);
    }

    #[test]
    fn a_write_outside_a_buffer_is_reported_by_name() {
        let b = DeviceBuffer::zeroed("out", 16);
        check_guards("k").unwrap();
        // SAFETY: writes inside the trailing guard band, which belongs to the allocation.
        unsafe { *(b.device_ptr() as *mut u8).add(17) = 0 };
        let err = check_guards("k").unwrap_err().to_string();
        assert!(err.contains("past the end of buffer `out`") && err.contains("offset 17"), "{err}");
        // SAFETY: restores the guard byte, inside the allocation.
        unsafe { *(b.device_ptr() as *mut u8).add(17) = POISON };
        // SAFETY: writes inside the leading guard band.
        unsafe { *(b.device_ptr() as *mut u8).sub(4) = 1 };
        let err = check_guards("k").unwrap_err().to_string();
        assert!(err.contains("4 bytes before the start of buffer `out`"), "{err}");
        drop(b);
        check_guards("k").unwrap();
    }
}
