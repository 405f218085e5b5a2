//! The communicator: what a backend calls to run the graph's gradient all-reduce ([`crate::graph::Op::AllReduce`]).
//!
//! One contract for every implementation: a buffer is replaced by its elementwise sum over the ranks, added in rank
//! order in f64 (`((x0 + x1) + x2) + ...`) and rounded once to the buffer's type, so every rank gets the same bits,
//! every run gives the same bits, and the implementations agree with each other bit for bit:
//! - [`StoreCommunicator`]: the rendezvous' host connections (`Store`, a star around rank 0 over TCP), for
//!   processes on the CPU backend (and the emulated CUDA device in separate processes);
//! - [`ThreadGroup`]: ranks as threads of one process (the emulated NCCL of the emulated CUDA device, and tests).
//!
//! Every rank must make the same calls in the same order with buffers of the same length and type; a rank that
//! breaks that, fails or goes away makes the others fail with an error naming it, never hang.

use super::rendezvous::{Store, BLOB_LEN};
use crate::error::{Error, Result};
use crate::graph::DType;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A buffer to sum over the ranks: gradient accumulators are f32 (or f64 in f64 graphs).
pub enum ReduceBuf<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}

impl ReduceBuf<'_> {
    pub fn dtype(&self) -> DType {
        match self {
            ReduceBuf::F32(_) => DType::F32,
            ReduceBuf::F64(_) => DType::F64,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            ReduceBuf::F32(b) => b.len(),
            ReduceBuf::F64(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values, widened to f64 (exactly).
    fn to_f64(&self) -> Vec<f64> {
        match self {
            ReduceBuf::F32(b) => b.iter().map(|&x| x as f64).collect(),
            ReduceBuf::F64(b) => b.to_vec(),
        }
    }

    /// Writes `sum` back, rounding once to the buffer's type.
    fn store(&mut self, sum: &[f64]) {
        match self {
            ReduceBuf::F32(b) => b.iter_mut().zip(sum).for_each(|(x, &s)| *x = s as f32),
            ReduceBuf::F64(b) => b.copy_from_slice(sum),
        }
    }
}

/// What a backend calls to sum a buffer over the data-parallel ranks (see the module documentation for the contract).
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buf` by its elementwise sum over the ranks, added in rank order in f64 and rounded once.
    fn all_reduce_sum(&self, buf: ReduceBuf<'_>) -> Result<()>;
    /// The NCCL unique id rank 0 handed out at the rendezvous, when the ranks train on GPUs: a GPU device sums
    /// through NCCL on its own stream instead of through this communicator.
    fn nccl_unique_id(&self) -> Option<[u8; BLOB_LEN]> {
        None
    }
}

/// Adds the ranks' contributions in rank order, in f64: the one definition of the sum every communicator computes.
pub fn sum_in_rank_order(parts: &[&[f64]]) -> Vec<f64> {
    let mut acc = parts.first().map(|p| p.to_vec()).unwrap_or_default();
    for p in &parts[1.min(parts.len())..] {
        acc.iter_mut().zip(p.iter()).for_each(|(a, &x)| *a += x);
    }
    acc
}

/// The rendezvous' host store as a communicator: the buffer goes to rank 0 over TCP as f64, is summed there in rank
/// order ([`Store::all_reduce_f64_sum`]) and comes back. Every trainable weight's gradient passes through rank 0 each
/// step, so it suits the CPU backend and small runs; GPUs use NCCL.
///
/// The store also carries the training loop's own collectives (barriers, the loss sum, rank 0's checkpoint path);
/// [`StoreCommunicator::store`] lends it out between steps.
pub struct StoreCommunicator {
    store: Mutex<Store>,
    rank: usize,
    world_size: usize,
    nccl_id: Option<[u8; BLOB_LEN]>,
}

impl StoreCommunicator {
    pub fn new(store: Store) -> StoreCommunicator {
        let (rank, world_size) = (store.rank(), store.world_size());
        StoreCommunicator { store: Mutex::new(store), rank, world_size, nccl_id: None }
    }

    /// With the NCCL unique id the rendezvous handed out (GPU ranks).
    pub fn with_nccl_id(mut self, id: [u8; BLOB_LEN]) -> StoreCommunicator {
        self.nccl_id = Some(id);
        self
    }

    /// The store, for the other collectives. A store whose holder panicked mid-collective is refused: the ranks'
    /// call sequences no longer match.
    pub fn store(&self) -> Result<MutexGuard<'_, Store>> {
        self.store
            .lock()
            .map_err(|_| Error::msg("the data-parallel store was left mid-collective by a panic; the job cannot go on"))
    }
}

impl Communicator for StoreCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, mut buf: ReduceBuf<'_>) -> Result<()> {
        let mut values = buf.to_f64();
        self.store()?.all_reduce_f64_sum(&mut values)?;
        buf.store(&values);
        Ok(())
    }

    fn nccl_unique_id(&self) -> Option<[u8; BLOB_LEN]> {
        self.nccl_id
    }
}

/// How long a rank of a [`ThreadGroup`] waits for the others at one all-reduce before failing, naming them.
pub const THREAD_GROUP_TIMEOUT: Duration = Duration::from_secs(300);

/// Ranks as threads of one process sharing their buffers through memory: the emulated NCCL. [`ThreadGroup::new`]
/// makes one handle per rank; each thread keeps its own. Dropping a handle (its thread ended, or unwound from a
/// failure) makes the others' pending and later calls fail naming that rank.
pub struct ThreadGroup {
    shared: Arc<Shared>,
    rank: usize,
    /// The number of this rank's next call; every rank's k-th call meets the others' k-th.
    next: Mutex<u64>,
}

struct Shared {
    world_size: usize,
    timeout: Duration,
    state: Mutex<GroupState>,
    changed: Condvar,
}

#[derive(Default)]
struct GroupState {
    /// The calls in flight, by number.
    rounds: HashMap<u64, Round>,
    /// A rank that left the group (handle dropped) or broke it, and why: every later call fails with it.
    broken: Option<String>,
}

struct Round {
    dtype: DType,
    parts: Vec<Option<Vec<f64>>>,
    sum: Option<Arc<Vec<f64>>>,
    /// Ranks that have not yet taken the sum; the last one removes the round.
    readers: usize,
}

impl ThreadGroup {
    /// One handle per rank of a group of `world_size` ranks, each waiting at most `timeout` for the others.
    pub fn new(world_size: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared =
            Arc::new(Shared { world_size, timeout, state: Mutex::new(GroupState::default()), changed: Condvar::new() });
        (0..world_size).map(|rank| ThreadGroup { shared: shared.clone(), rank, next: Mutex::new(0) }).collect()
    }

    fn lock(&self) -> Result<MutexGuard<'_, GroupState>> {
        self.shared.state.lock().map_err(|_| Error::msg("thread group: a rank panicked while holding the group"))
    }

    /// Marks the group broken with `msg` and wakes every waiter.
    fn break_group(&self, state: &mut GroupState, msg: String) -> Error {
        state.broken.get_or_insert(msg.clone());
        self.shared.changed.notify_all();
        Error::msg(msg)
    }
}

impl Communicator for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn all_reduce_sum(&self, mut buf: ReduceBuf<'_>) -> Result<()> {
        let seq = {
            let mut next = self.next.lock().map_err(|_| Error::msg("thread group: a call panicked"))?;
            *next += 1;
            *next
        };
        let world = self.shared.world_size;
        let (me, dtype, len) = (self.rank, buf.dtype(), buf.len());
        let mine = buf.to_f64();
        let mut state = self.lock()?;
        if let Some(msg) = &state.broken {
            return Err(Error::msg(msg.clone()));
        }
        let round = state.rounds.entry(seq).or_insert_with(|| Round {
            dtype,
            parts: vec![None; world],
            sum: None,
            readers: world,
        });
        let first = round.parts.iter().flatten().next().map(Vec::len);
        if round.dtype != dtype || first.is_some_and(|n| n != len) {
            let msg = format!(
                "all-reduce #{seq}: rank {me} gave {len} {dtype} values, another rank {} {}: every rank must reduce \
                 the same buffers in the same order",
                first.unwrap_or(len),
                round.dtype
            );
            return Err(self.break_group(&mut state, msg));
        }
        round.parts[me] = Some(mine);
        if round.parts.iter().all(Option::is_some) {
            let parts: Vec<&[f64]> = round.parts.iter().flatten().map(Vec::as_slice).collect();
            round.sum = Some(Arc::new(sum_in_rank_order(&parts)));
            self.shared.changed.notify_all();
        }
        let deadline = Instant::now() + self.shared.timeout;
        loop {
            // A finished sum is taken even when the group broke since: the rank that left had finished this call.
            let round = state.rounds.get_mut(&seq).expect("a round stays until every rank has read it");
            if let Some(sum) = round.sum.clone() {
                round.readers -= 1;
                if round.readers == 0 {
                    state.rounds.remove(&seq);
                }
                drop(state);
                buf.store(&sum);
                return Ok(());
            }
            if let Some(msg) = &state.broken {
                return Err(Error::msg(msg.clone()));
            }
            let round = state.rounds.get(&seq).expect("a round stays until every rank has read it");
            let now = Instant::now();
            if now >= deadline {
                let late: Vec<String> =
                    (0..world).filter(|&r| round.parts[r].is_none()).map(|r| format!("rank {r}")).collect();
                let msg = format!(
                    "all-reduce #{seq}: {} did not arrive within {} s (rank {me} did): stuck, much slower, or making \
                     different calls",
                    late.join(", "),
                    self.shared.timeout.as_secs_f64()
                );
                return Err(self.break_group(&mut state, msg));
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .map_err(|_| Error::msg("thread group: a rank panicked while holding the group"))?
                .0;
        }
    }
}

impl Drop for ThreadGroup {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            let msg = format!(
                "rank {} left the thread group (its thread ended or failed) while other ranks still reduce",
                self.rank
            );
            state.broken.get_or_insert(msg);
            self.shared.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sum_adds_in_rank_order_in_f64() {
        // 1e16 + 1 - 1e16 in f64: 0 in this order, 1 in another; the order is the contract.
        assert_eq!(sum_in_rank_order(&[&[1e16], &[1.0], &[-1e16]]), vec![0.0]);
        assert_eq!(sum_in_rank_order(&[&[1.0, 2.0]]), vec![1.0, 2.0]);
        assert!(sum_in_rank_order(&[]).is_empty());
    }
}
