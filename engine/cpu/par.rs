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
