//! Data-parallel training across processes, one per device, launched by torchrun, srun or `zeroconv launch`
//! (engine/dist/env.rs reads their variables; engine/dist/rendezvous.rs joins the ranks).
//!
//! Every rank builds the same step and runs it on its own share of each optimizer step's samples; the gradients
//! are summed over the ranks by the step itself, at the start of its update (the all-reduce nodes of
//! graph/passes/all_reduce.rs, over the accumulators of the accumulating step of graph/optim.rs), so every rank
//! applies the same update to the same weights. The compiled program sums through the communicator it is handed
//! ([`Parallel::communicator`]): here the rendezvous' host store, in rank order and in f64, so a run gives the same
//! bits every time. Rank 0 alone writes: the run folder, metrics, checkpoints and exports.

use crate::app::device::DeviceChoice;
use crate::engine::cuda::nccl::{Nccl, UNIQUE_ID_BYTES};
use crate::engine::dist::communicator::{Communicator, StoreCommunicator};
use crate::engine::dist::env::DistEnv;
use crate::engine::dist::rendezvous::{Rendezvous, Timeouts, BLOB_LEN};
use crate::error::{Error, Result};
use crate::hash::fnv1a64;
use crate::io::config::Config;
use std::sync::Arc;

// The rendezvous' blob is an `ncclUniqueId`.
const _: () = assert!(BLOB_LEN == UNIQUE_ID_BYTES);

/// This process's place in the job, and its connection to the other ranks (none for a world of one).
pub struct Parallel {
    pub rank: usize,
    pub world_size: usize,
    /// The rendezvous' connections: the step's gradient sums and the loop's own collectives.
    comm: Option<Arc<StoreCommunicator>>,
}

impl Parallel {
    /// One process alone.
    pub fn single() -> Parallel {
        Parallel { rank: 0, world_size: 1, comm: None }
    }

    /// Joins the job the launcher's variables describe: checks `WORLD_SIZE == trainer.devices × trainer.num_nodes`
    /// (a config asking for several devices without a launcher is refused), then meets the other ranks. Every rank
    /// must train the same config: its hash is part of the handshake.
    ///
    /// On `--device cuda` rank 0 makes an NCCL unique id (a clear error when NCCL is missing) and the rendezvous hands
    /// it to every rank, whose device then sums through NCCL.
    pub fn join(cfg: &Config, env: &DistEnv, device: DeviceChoice) -> Result<Parallel> {
        env.check_world_size(cfg.trainer.devices as usize, cfg.trainer.num_nodes as usize)?;
        if !env.is_distributed() {
            return Ok(Parallel::single());
        }
        // The config as every rank resolved it (paths and all): two ranks started with different overrides are
        // refused by the handshake.
        let hash = fnv1a64(format!("{cfg:?}").as_bytes());
        let gpus = device == DeviceChoice::Cuda;
        let make_id = || if gpus { Nccl::load()?.unique_id() } else { Ok([0u8; BLOB_LEN]) };
        let rv = Rendezvous::join(env, hash, Timeouts::default(), make_id)?;
        if env.rank == 0 {
            eprintln!("data parallel: {} processes ({} on this node)", rv.world_size, env.local_world_size);
        }
        let mut comm = StoreCommunicator::new(rv.store);
        if gpus {
            comm = comm.with_nccl_id(rv.blob);
        }
        Ok(Parallel { rank: rv.rank, world_size: rv.world_size, comm: Some(Arc::new(comm)) })
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// What the compiled step sums its gradients through (`Program::set_communicator`); `None` alone.
    pub fn communicator(&self) -> Option<Arc<dyn Communicator>> {
        self.comm.clone().map(|c| c as Arc<dyn Communicator>)
    }

    /// Replaces `values` by their sum over the ranks (added in rank order, in f64: the same bits on every rank and
    /// in every run).
    pub fn sum(&mut self, values: &mut [f64]) -> Result<()> {
        match self.comm.as_ref() {
            Some(c) => c.store()?.all_reduce_f64_sum(values),
            None => Ok(()),
        }
    }

    /// Every rank's `bytes`, in rank order, on every rank.
    pub fn all_gather(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        match self.comm.as_ref() {
            Some(c) => c.store()?.all_gather_bytes(bytes),
            None => Ok(vec![bytes.to_vec()]),
        }
    }

    /// Every rank's `value`, in rank order, on every rank.
    pub fn all_gather_u64(&mut self, value: u64) -> Result<Vec<u64>> {
        let all = self.all_gather(&value.to_le_bytes())?;
        all.iter()
            .map(|b| {
                let bytes: [u8; 8] = b[..].try_into().map_err(|_| Error::msg("a rank sent a malformed u64"))?;
                Ok(u64::from_le_bytes(bytes))
            })
            .collect()
    }

    /// Rank 0's `bytes` on every rank (the others' arguments are ignored).
    pub fn from_root(&mut self, bytes: &[u8]) -> Result<Vec<u8>> {
        let mine = if self.is_root() { bytes } else { &[] };
        let mut all = self.all_gather(mine)?;
        Ok(std::mem::take(&mut all[0]))
    }

    /// Fails unless every rank gives the same `hash` of `what` (the compiled step), naming the first that differs.
    /// The hash is computed only when there are other ranks to compare with.
    pub fn check_same(&mut self, what: &str, hash: impl FnOnce() -> u64) -> Result<()> {
        if self.comm.is_none() {
            return Ok(());
        }
        let all = self.all_gather(&hash().to_le_bytes())?;
        for (rank, h) in all.iter().enumerate() {
            if h[..] != all[0][..] {
                return Err(Error::msg(format!(
                    "rank {rank} compiled a different {what} than rank 0: every rank must run the same zeroconv \
                     build with the same config"
                )));
            }
        }
        Ok(())
    }

    /// Waits for every rank (rank 0 finishing its files before the others exit, for instance).
    pub fn barrier(&mut self) -> Result<()> {
        match self.comm.as_ref() {
            Some(c) => c.store()?.barrier(),
            None => Ok(()),
        }
    }
}
