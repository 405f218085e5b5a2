//! Data parallelism across processes: how a process learns its place in the job ([`env`]: torchrun's and SLURM's
//! variables) and how the processes find each other and agree before training ([`rendezvous`]: a TCP handshake
//! through rank 0 that hands out the NCCL unique id and stays open as a small host store for barriers, gathers and
//! deterministic sums), and the [`communicator`] backends call to run the graph's gradient all-reduce. See
//! `../shared/DESIGN-CUDA.md` §10 and issue 12.

pub mod communicator;
pub mod env;
pub mod rendezvous;

pub use communicator::{Communicator, ReduceBuf, StoreCommunicator, ThreadGroup};
pub use env::{DistEnv, Launcher};
pub use rendezvous::{Hello, Member, Rendezvous, RendezvousListener, Store, Timeouts, BLOB_LEN, PROTOCOL_VERSION};
