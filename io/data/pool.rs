//! Recycled pixel buffers. Decoded images and output tensors are a few MB each; glibc serves every allocation of
//! that size with a fresh `mmap`, so each one costs hundreds of page faults and a kernel zeroing pass, about as
//! long as decoding the image. Buffers handed back here are reused instead. The pool is bounded, so memory
//! returns to the system when the loader stops.

use std::sync::Mutex;

/// Most bytes the pool keeps, across both kinds of buffers.
const MAX_POOLED_BYTES: usize = 256 << 20;

struct Pool {
    bytes: Vec<Vec<u8>>,
    floats: Vec<Vec<f32>>,
    held: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool { bytes: Vec::new(), floats: Vec::new(), held: 0 });

fn lock() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// An empty byte buffer with room for at least `len` bytes.
pub fn take_bytes(len: usize) -> Vec<u8> {
    let mut pool = lock();
    if let Some(i) = pool.bytes.iter().position(|b| b.capacity() >= len) {
        let buf = pool.bytes.swap_remove(i);
        pool.held -= buf.capacity();
        return buf;
    }
    drop(pool);
    Vec::with_capacity(len)
}

/// An empty float buffer with room for at least `len` values.
pub fn take_floats(len: usize) -> Vec<f32> {
    let mut pool = lock();
    if let Some(i) = pool.floats.iter().position(|b| b.capacity() >= len) {
        let buf = pool.floats.swap_remove(i);
        pool.held -= buf.capacity() * 4;
        return buf;
    }
    drop(pool);
    Vec::with_capacity(len)
}

/// Hands a buffer back for reuse (dropped if the pool is full or the buffer is small).
pub fn give_bytes(mut buf: Vec<u8>) {
    if buf.capacity() < 64 << 10 {
        return;
    }
    buf.clear();
    let mut pool = lock();
    if pool.held + buf.capacity() <= MAX_POOLED_BYTES {
        pool.held += buf.capacity();
        pool.bytes.push(buf);
    }
}

/// Hands a buffer back for reuse (dropped if the pool is full or the buffer is small).
pub fn give_floats(mut buf: Vec<f32>) {
    if buf.capacity() < 16 << 10 {
        return;
    }
    buf.clear();
    let mut pool = lock();
    if pool.held + buf.capacity() * 4 <= MAX_POOLED_BYTES {
        pool.held += buf.capacity() * 4;
        pool.floats.push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_empty_with_their_capacity() {
        let mut b = take_floats(100_000);
        b.resize(100_000, 1.0);
        let ptr = b.as_ptr();
        give_floats(b);
        // Other tests may use the pool concurrently; a reused buffer is empty and large enough either way.
        let again = take_floats(100_000);
        assert!(again.is_empty() && again.capacity() >= 100_000);
        let _ = ptr;
        let small = take_bytes(10);
        assert!(small.capacity() >= 10);
        give_bytes(small); // too small to keep; must not panic
    }
}
