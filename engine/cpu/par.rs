//! Splitting work across the CPU threads (rayon's pool) in chunks large enough to amortise it.

use rayon::prelude::*;

/// Elements per task: big enough that scheduling costs little, small enough to balance.
pub const MIN_CHUNK: usize = 16 * 1024;

pub fn chunk_len(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    n.div_ceil(threads * 4).max(MIN_CHUNK).max(1)
}

/// Calls `f(start, chunk)` on disjoint chunks of `out`, in parallel.
pub fn par_chunks<T: Send>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    par_chunks_by_work(out, 1, f);
}

/// As [`par_chunks`], for outputs that each cost `work` elements of input (a reduction's output reads many): the
/// chunks hold enough outputs to amortise a task, however few the outputs are.
pub fn par_chunks_by_work<T: Send>(out: &mut [T], work: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let threads = rayon::current_num_threads().max(1);
    let total = out.len().saturating_mul(work.max(1));
    let per_task = total.div_ceil(threads * 4).max(MIN_CHUNK);
    let c = per_task.div_ceil(work.max(1)).max(1);
    if out.len() <= c {
        f(0, out);
        return;
    }
    out.par_chunks_mut(c).enumerate().for_each(|(i, o)| f(i * c, o));
}

/// Calls `f(row, row_slice)` for each row of `row_len` elements, rows grouped into parallel tasks.
pub fn par_rows<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows_per = (chunk_len(out.len()) / row_len.max(1)).max(1);
    out.par_chunks_mut(rows_per * row_len).enumerate().for_each(|(i, block)| {
        for (j, row) in block.chunks_mut(row_len).enumerate() {
            f(i * rows_per + j, row);
        }
    });
}

/// Sums `f(lo, hi)` over a fixed split of 0..n: the split depends only on n, so the result is
/// the same whatever the thread count.
pub fn par_sum(n: usize, f: impl Fn(usize, usize) -> f64 + Sync) -> f64 {
    let c = MIN_CHUNK;
    let parts: Vec<f64> = (0..n.div_ceil(c)).into_par_iter().map(|i| f(i * c, ((i + 1) * c).min(n))).collect();
    parts.iter().sum()
}

/// Scratch slots for parallel tasks that outnumber the threads: each task takes whichever slot is free, so that a
/// thread that finishes early takes over work still queued instead of waiting (a fixed split of the work over the
/// threads waits for the slowest, e.g. a core the hypervisor or another process holds). Tasks must not wait on
/// other parallel work while they hold a slot (no rayon calls inside), so the running tasks never outnumber the
/// threads, and with a slot per thread one is always free.
pub struct SlotPool<'a, T> {
    slots: Vec<std::sync::Mutex<&'a mut [T]>>,
}

impl<'a, T: Send> SlotPool<'a, T> {
    /// `count` slots of `slot_len` elements cut from the front of `scratch`.
    pub fn new(scratch: &'a mut [T], slot_len: usize, count: usize) -> Self {
        let slots = if slot_len == 0 {
            Vec::new()
        } else {
            scratch.chunks_exact_mut(slot_len).take(count).map(std::sync::Mutex::new).collect()
        };
        SlotPool { slots }
    }

    /// Runs `f` on a slot no other task holds meanwhile (an empty one when the pool has none).
    pub fn with<R>(&self, f: impl FnOnce(&mut [T]) -> R) -> R {
        use std::sync::TryLockError;
        if self.slots.is_empty() {
            return f(&mut []);
        }
        let n = self.slots.len();
        // Start at this thread's own slot, so that without contention each thread keeps its slot (and its cache).
        let first = rayon::current_thread_index().unwrap_or(0);
        loop {
            for i in 0..n {
                let mut slot = match self.slots[(first + i) % n].try_lock() {
                    Ok(slot) => slot,
                    // A task that panicked holding it: the panic propagates anyway; the scratch is only scratch.
                    Err(TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(TryLockError::WouldBlock) => continue,
                };
                return f(&mut slot);
            }
            // More tasks running than slots (a pool smaller than the thread count): wait for one to finish.
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More tasks than threads and fewer slots than threads: no two tasks ever hold one slot at once (each fills
    /// its slot with its own number, lets the others run, and finds the slot unchanged), and every task runs.
    #[test]
    fn tasks_never_share_a_slot() {
        let threads = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let mut scratch = vec![0usize; 3 * 16];
        let pool = SlotPool::new(&mut scratch, 16, 2);
        let ran = std::sync::atomic::AtomicUsize::new(0);
        threads.install(|| {
            (0..64usize).into_par_iter().with_max_len(1).for_each(|i| {
                let task = i + 1;
                pool.with(|slot| {
                    assert_eq!(slot.len(), 16);
                    slot.fill(task);
                    std::thread::yield_now();
                    assert!(slot.iter().all(|&v| v == task), "task {task} found its slot changed");
                    ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                })
            })
        });
        assert_eq!(ran.into_inner(), 64);
        // Only the two slots asked for were used.
        assert!(scratch[32..].iter().all(|&v| v == 0));
        let mut none: Vec<usize> = Vec::new();
        assert_eq!(SlotPool::new(&mut none, 0, 2).with(|slot| slot.len()), 0);
    }
}
