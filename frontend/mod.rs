//! Configs, checkpoints, datasets, the CLI and the training loops.

pub mod bench_ops;
