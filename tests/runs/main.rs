//! The `zeroconv` binary end to end: training runs, run folders, resume, sampling, data-parallel launches, the rendezvous and hostile input.
//!
//! One test binary for these modules: each integration test binary links the whole crate, so grouping them saves
//! most of the suite's link time on a small machine.

#[path = "../common/mod.rs"]
mod common;

mod data_parallel;
mod end_to_end;
mod hostile_input;
mod rendezvous;
mod run_folders;
mod sample_cli;
mod train;
mod train_loop;
