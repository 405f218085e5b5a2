//! zeroconv: a ControlNet training engine that compiles the whole training step
//! (forward, backward, optimizer update) into one planned graph and replays it.
//!
//! Layers, each using only those above it in this list (see `../shared/DESIGN.md`):
//! `graph` (IR, autodiff, passes) → `kernels` (CUDA sources) → `engine` (backends) → `models` → `io` (configs,
//! checkpoints, data, tokenizer: reusable, no command line) → `app` (the CLI, training, sampling).

pub mod app;
pub mod engine;
pub mod error;
pub mod graph;
pub mod hash;
pub mod io;
pub mod kernels;
pub mod knobs;
pub mod models;
pub mod rng;

pub use error::{Error, Result};
