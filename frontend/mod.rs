//! Configs, checkpoints, datasets, the CLI and the training loops.
pub mod checkpoint;
pub mod forward;
pub mod rng;
pub mod weights;
