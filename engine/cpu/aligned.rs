//! Buffers whose first element sits on a 64-byte boundary (a cache line, and one AVX-512 vector).
//!
//! `Vec` only promises the element's alignment, and glibc hands out large allocations from `mmap` 16 bytes past a
//! page boundary: every AVX-512 load and store of such a buffer straddles two cache lines. The memory plan aligns
//! each tensor's offset to [`ALIGN`]; the buffers here make the base match, for the CPU program's arena and
//! sources, and for the kernel benchmarks (whose timings otherwise depend on where the allocator put each buffer).

use crate::graph::passes::memplan::ALIGN;
use std::ops::{Deref, DerefMut};

/// `len` zeroed elements starting on a [`ALIGN`]-byte boundary.
pub struct AlignedVec<T> {
    buf: Vec<T>,
    /// The first element at an aligned address.
    start: usize,
    len: usize,
}

impl<T: Copy + Default> AlignedVec<T> {
    /// `len` elements of `T::default()` (zero for the numeric types, which `vec!` then takes from `calloc`: pages
    /// are committed only as they are written).
    pub fn zeroed(len: usize) -> Self {
        let size = std::mem::size_of::<T>().max(1);
        assert!(ALIGN.is_multiple_of(size), "AlignedVec: {size}-byte elements do not divide {ALIGN}");
        let buf = vec![T::default(); len + ALIGN / size];
        // The vector's start is aligned to `T`, so whole elements reach the next boundary.
        let misalignment = buf.as_ptr() as usize % ALIGN;
        AlignedVec { start: (ALIGN - misalignment) % ALIGN / size, buf, len }
    }

    /// The elements of `values`, copied to an aligned start.
    pub fn from_slice(values: &[T]) -> Self {
        let mut v = Self::zeroed(values.len());
        v.copy_from_slice(values);
        v
    }
}

impl<T> Deref for AlignedVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl<T> DerefMut for AlignedVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_vectors_start_on_a_64_byte_boundary_zeroed_whatever_the_allocator_returns() {
        // Arena-sized allocations come from `mmap` 16 bytes past a page; small ones from the heap at 16 or 32 bytes.
        for len in [0, 1, 7, 100, 4096, 1 << 20, (5 << 20) + 3] {
            let words = AlignedVec::<u64>::zeroed(len);
            assert_eq!(words.as_ptr() as usize % ALIGN, 0, "{len} u64");
            assert_eq!(words.len(), len);
            assert!(words.iter().all(|&w| w == 0), "{len} u64: not zeroed");
            let floats = AlignedVec::<f32>::zeroed(len);
            assert_eq!((floats.as_ptr() as usize % ALIGN, floats.len()), (0, len), "{len} f32");
        }
        let copied = AlignedVec::from_slice(&[1.5f64, -2.0, 3.25]);
        assert_eq!((&*copied, copied.as_ptr() as usize % ALIGN), (&[1.5, -2.0, 3.25][..], 0));
    }
}
