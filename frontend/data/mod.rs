//! WebDataset shards: reading, checking, writing and loading them for training.
//!
//! A shard is an uncompressed tar file; consecutive members sharing a key (`000123.jpg`, `000123.png`,
//! `000123.txt`) form one sample: the target image, the control map and the caption.
//!
//! - [`tar`]: streaming tar reader and writer.
//! - [`shards`]: shard paths, brace patterns and directories.
//! - [`group`]: members → samples.
//! - [`decode`]: samples → RGB images and caption; [`transform`]: resize, crop, flip, CHW `f32`.
//! - [`loader`]: the deterministic, resumable, multi-threaded loader.
//! - [`check`], [`make`], [`bench`]: the `zeroconv dataset ...` commands.

pub mod bench;
pub mod check;
pub mod decode;
pub mod group;
pub mod loader;
pub mod make;
pub mod rng;
pub mod shards;
pub mod shuffle;
pub mod tar;
pub mod transform;

pub use decode::Fields;
pub use loader::{Batch, Loader, LoaderConfig, LoaderState, LoaderStats, Sample, SampleStream, SplitMode};
pub use transform::Filter;
