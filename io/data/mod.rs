//! WebDataset shards: reading, checking, writing and loading them for training.
//!
//! A shard is an uncompressed tar file; consecutive members sharing a key (`000123.jpg`, `000123.png`,
//! `000123.txt`) form one sample: the target image, the control map and the caption.
//!
//! - [`tar`]: streaming tar reader and writer.
//! - [`shards`]: shard paths, brace patterns and directories.
//! - [`group`]: members → samples.
//! - [`decode`]: samples → RGB images and caption; [`transform`]: resize, crop, flip, CHW `f32`.
//! - [`loader`]: the deterministic, resumable, multi-threaded loader, built on [`shuffle`] (the shuffle buffer),
//!   [`rng`] (seed-derived random streams), [`stride`] (data-parallel ranks' shares of one stream) and [`pool`]
//!   (recycled pixel buffers).
//! - [`check`] (scan shards), [`make`] (write shards from a folder), [`bench`](mod@bench) (the loader's
//!   throughput): what the `zeroconv dataset ...` commands run (app/cli/dataset.rs).

pub mod bench;
pub mod check;
pub mod complete;
pub mod decode;
pub mod group;
pub mod loader;
pub mod make;
pub mod pool;
pub mod rng;
pub mod shards;
pub mod shuffle;
pub mod stride;
pub mod synthetic;
pub mod tar;
pub mod transform;

pub use bench::BenchOptions;
pub use check::check_shards;
pub use decode::Fields;
pub use loader::{Batch, Loader, LoaderConfig, LoaderState, LoaderStats, Sample, SampleStream, SplitMode};
pub use make::{make_shards, MakeOptions};
pub use transform::Filter;
