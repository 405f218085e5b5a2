//! zeroconv: a ControlNet training engine that compiles the whole training step
//! (forward, backward, optimizer update) into one planned graph and replays it.
//!
//! Layers, each using only those above it in this list (see `../shared/DESIGN.md`):
//! `graph` (IR, autodiff, passes) → `kernels` (CUDA sources) → `engine` (backends) → `frontend`.

pub mod engine;
pub mod error;
pub mod frontend;
pub mod graph;
pub mod hash;
pub mod kernels;
pub mod knobs;
pub mod models;

pub use error::{Error, Result};
