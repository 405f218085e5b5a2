//! Configs, checkpoints and their key layouts, the tokenizer, WebDataset shards and images: the readers of `io/`, on fixtures written by the libraries that define each format.
//!
//! One test binary for these modules: each integration test binary links the whole crate, so grouping them saves
//! most of the suite's link time on a small machine.

#[path = "../common/mod.rs"]
mod common;

mod config;
mod image_fixtures;
mod layouts;
mod megatron_clip;
mod nemo_keys;
mod nemo_layout;
mod nemo_semantics;
mod open_clip;
mod tokenizer;
mod tokenizer_ftfy;
mod webdataset;
mod weight_sources;
