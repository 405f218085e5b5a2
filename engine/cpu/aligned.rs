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
    /// The elements and [`pad`] more, so that an aligned start always leaves room for all of them.
    buf: Vec<T>,
    /// The first element at an aligned address.
    start: usize,
}

/// Elements of `T` in [`ALIGN`] bytes: the most an aligned start can lie past the vector's own.
fn pad<T>() -> usize {
    ALIGN / std::mem::size_of::<T>().max(1)
}

impl<T: Copy + Default> AlignedVec<T> {
    /// `len` elements of `T::default()` (zero for the numeric types, which `vec!` then takes from `calloc`: pages
    /// are committed only as they are written).
    pub fn zeroed(len: usize) -> Self {
        let size = std::mem::size_of::<T>().max(1);
        assert!(ALIGN.is_multiple_of(size), "AlignedVec: {size}-byte elements do not divide {ALIGN}");
        let buf = vec![T::default(); len + pad::<T>()];
        // The vector's start is aligned to `T`, so whole elements reach the next boundary.
        let misalignment = buf.as_ptr() as usize % ALIGN;
        AlignedVec { start: (ALIGN - misalignment) % ALIGN / size, buf }
    }
}

impl<T> AlignedVec<T> {
    /// Where the elements end in `buf`.
    fn end(&self) -> usize {
        self.start + self.buf.len() - pad::<T>()
    }
}

impl<T> Deref for AlignedVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.start..self.end()]
    }
}

impl<T> DerefMut for AlignedVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        let end = self.end();
        &mut self.buf[self.start..end]
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
    }
}
