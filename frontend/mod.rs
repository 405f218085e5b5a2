//! Configs, checkpoints, datasets, the CLI and the training loops.

pub mod bench_ops;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod forward;
pub mod model_config;
pub mod outputs;
pub mod rng;
pub mod sample;
pub mod step;
pub mod synthetic;
pub mod tokenizer;
pub mod train;
pub mod weights;
pub mod weights_store;
