//! The training data loader: shards → samples → shuffle → decode/resize on a thread pool → samples in a fixed order.
//!
//! Determinism: the order of samples depends only on the shards, the seed and the partition (rank, worker), never
//! on the number of decoding threads. One reader thread produces the epoch's items in order (shard order shuffled
//! per epoch, then a shuffle buffer); each item gets a sequence number; decoding threads work on items in any order
//! and the consumer puts them back in sequence order. Every random choice comes from a generator derived from
//! (seed, epoch, partition, sequence number), so a position is fully described by [`LoaderState`] (epoch and items
//! consumed): resuming replays the epoch's reading and shuffling up to that point without decoding anything.
//!
//! Memory: at most `prefetch` items are in flight between the reader and the consumer, plus the shuffle buffer;
//! shards are read member by member.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use super::decode::{decode_sample, recycle_image, Fields};
use super::group::{RawSample, SampleReader, ShardItem};
use super::pool;
use super::rng::{Fnv, SplitMix64};
use super::shards::resolve_shards;
use super::shuffle::ShuffleBuffer;
use super::stride::{common_prefix, Stride};
use super::transform::{resize_crop_as, Chw, Filter, Normalize, Resize};
use crate::{Error, Result};

/// How the data is divided among data-parallel ranks and workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitMode {
    /// Each partition reads its own shards (shard i of the epoch's order goes to partition i mod n). Cheapest;
    /// needs at least as many shards as partitions.
    Shards,
    /// Every partition reads and shuffles the whole stream exactly as one process does, and decodes only its
    /// stride of it ([`super::stride`]): item `i` of an epoch goes to rank `i mod world_size`, and among that rank's
    /// workers to worker `(i / world_size) mod num_workers`. Exact even with one shard, and the partitions together
    /// see one process's order and flips; costs n× reading (not decoding).
    ///
    /// A bad sample is skipped by the partition that meets it, which takes its next own item instead: its batches
    /// stay full, and may then hold items one process would have put in its next batch. NeMo does the same per
    /// rank: each rank reads its own shards and its WebDataset pipeline decodes with `warn_and_continue`, which
    /// logs a failing sample and goes on with the rank's next one (nemo/collections/multimodal/data/common/
    /// webdataset.py, `WebDatasetCommon`; the shard split in data_samplers.py, `WDSUrlsRandomSampler`).
    Samples,
}

/// Everything that shapes the loader's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoaderConfig {
    /// Output size: the middle `width` x `height` of the image after `resize`.
    pub width: u32,
    pub height: u32,
    /// How images are resized before the crop: by default just enough to cover the output (shortest side for a
    /// square); training configs use NeMo's rule (`resize_smallest_side`, see [`Resize`]).
    pub resize: Resize,
    pub image_filter: Filter,
    pub control_filter: Filter,
    /// Probability of mirroring image and control map together (left-right).
    pub flip_prob: f64,
    pub fields: Fields,
    pub seed: u64,
    /// Samples held for shuffling; 0 or 1 keeps the shard order.
    pub shuffle_buffer: usize,
    /// Shuffle the order of shards every epoch.
    pub shuffle_shards: bool,
    pub rank: usize,
    pub world_size: usize,
    pub worker: usize,
    pub num_workers: usize,
    pub split: SplitMode,
    /// Decoding threads; 0 means one per core. Does not change the output.
    pub threads: usize,
    /// Items decoded ahead of the consumer, at most.
    pub prefetch: usize,
    /// Make a bad sample or a damaged shard an error instead of skipping it.
    pub strict: bool,
    /// How many skipped samples to name on stderr (all are counted in [`LoaderStats`]).
    pub warn_first: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            width: 512,
            height: 512,
            resize: Resize::Cover,
            image_filter: Filter::Bicubic,
            control_filter: Filter::Nearest,
            flip_prob: 0.0,
            fields: Fields::default(),
            seed: 0,
            shuffle_buffer: 1000,
            shuffle_shards: true,
            rank: 0,
            world_size: 1,
            worker: 0,
            num_workers: 1,
            split: SplitMode::Shards,
            threads: 0,
            prefetch: 64,
            strict: false,
            warn_first: 5,
        }
    }
}

impl LoaderConfig {
    fn validate(&self, shard_count: usize) -> Result<()> {
        let bad = |msg: String| Err(Error::msg(format!("loader config: {msg}")));
        if self.width == 0 || self.height == 0 {
            return bad(format!("resolution {}x{} must be positive", self.width, self.height));
        }
        if self.world_size == 0 || self.rank >= self.world_size {
            return bad(format!("rank {} is not below world size {}", self.rank, self.world_size));
        }
        if self.num_workers == 0 || self.worker >= self.num_workers {
            return bad(format!("worker {} is not below worker count {}", self.worker, self.num_workers));
        }
        if !(0.0..=1.0).contains(&self.flip_prob) {
            return bad(format!("flip probability {} is not in [0, 1]", self.flip_prob));
        }
        if self.prefetch == 0 {
            return bad("prefetch must be at least 1".into());
        }
        if self.fields.image.is_empty() || self.fields.control.is_empty() || self.fields.caption.is_empty() {
            return bad("every field (image, control, caption) needs at least one member extension".into());
        }
        let parts = self.partitions();
        if self.split == SplitMode::Shards && shard_count < parts {
            return bad(format!(
                "{shard_count} shards cannot be split among {parts} partitions (world size × workers); \
                 use more shards or split by samples"
            ));
        }
        Ok(())
    }

    fn partitions(&self) -> usize {
        self.world_size * self.num_workers
    }

    fn partition(&self) -> usize {
        self.rank * self.num_workers + self.worker
    }

    /// The partition's stride of the whole stream when it strides ([`SplitMode::Samples`], or a single partition,
    /// which is the whole stream either way); `None` when it reads shards of its own.
    fn stride(&self) -> Option<Stride> {
        let count = self.partitions() as u64;
        match self.split {
            SplitMode::Samples => Some(Stride { index: (self.worker * self.world_size + self.rank) as u64, count }),
            SplitMode::Shards if count == 1 => Some(Stride::WHOLE),
            SplitMode::Shards => None,
        }
    }

    /// The partition that keys the random streams: a striding partition draws as one process does, so its items
    /// get the same shuffle and flips whichever rank decodes them.
    fn rng_partition(&self) -> u64 {
        if self.stride().is_some() {
            0
        } else {
            self.partition() as u64
        }
    }
}

/// Bumped whenever the sample order for a given seed changes (RNG derivation, shuffle or split rules), so a state
/// saved by other code is refused instead of resuming somewhere else.
pub const STATE_VERSION: u32 = 1;

/// A position in the data stream, enough to resume bit-exactly.
///
/// There is no generator state to save: every random stream is derived from `seed`, the epoch, the partition and
/// a sequence number, so (`epoch`, `consumed`) pins the shard order, the shuffle-buffer draws and the flips.
/// A striding partition ([`SplitMode::Samples`]) counts its own items only; `part` of `parts` says whose they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// [`STATE_VERSION`] of the code that saved it: the RNG derivation and item order it describes.
    pub version: u32,
    pub epoch: u64,
    /// Items of this epoch already handed out, bad samples and shard errors included.
    pub consumed: u64,
    /// The stride that saved it ([`super::stride`]): 0 of 1 for one process (and absent from its JSON, which
    /// older versions wrote).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub part: u64,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub parts: u64,
    pub seed: u64,
    /// Hash of the shard list and the settings that decide the order; resuming with other ones is refused.
    pub fingerprint: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

impl LoaderState {
    fn stride(&self) -> Stride {
        Stride { index: self.part, count: self.parts }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<LoaderState> {
        serde_json::from_str(text).map_err(|e| Error::msg(format!("loader state: {e}")))
    }
}

/// One training sample, ready for the model.
#[derive(Debug, Clone)]
pub struct Sample {
    pub key: String,
    pub shard: Arc<str>,
    /// 3 x height x width in [-1, 1].
    pub image: Chw,
    /// 3 x height x width in [0, 1].
    pub control: Chw,
    pub caption: String,
    pub flipped: bool,
    pub epoch: u64,
    /// Position in this partition's stream of the epoch (what [`LoaderState::consumed`] counts).
    pub index: u64,
    /// Position in the epoch's whole stream (as one process reads it) when the partition strides; else `index`.
    pub global_index: u64,
}

impl Sample {
    /// Hands the pixel buffers back for reuse by later samples (optional; saves page faults, see `pool`).
    pub fn recycle(self) {
        pool::give_floats(self.image.data);
        pool::give_floats(self.control.data);
    }
}

/// Samples stacked for a training step (NCHW).
#[derive(Debug, Clone)]
pub struct Batch {
    pub keys: Vec<String>,
    pub captions: Vec<String>,
    pub images: Vec<f32>,
    pub controls: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What was skipped so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoaderStats {
    pub samples: u64,
    pub bad: u64,
    pub shard_errors: u64,
    /// The first problems, each naming its shard.
    pub first_problems: Vec<String>,
}

const KEEP_PROBLEMS: usize = 20;

/// An item of an epoch's stream, in the order the reader produces it.
#[derive(Debug)]
pub enum Item {
    Sample(RawSample),
    /// A shard that could not be opened or is damaged; its message names the shard.
    ShardError(String),
}

struct Inner {
    shards: Vec<PathBuf>,
    names: Vec<Arc<str>>,
    config: LoaderConfig,
    fingerprint: u64,
}

/// A configured dataset; cheap to clone, makes [`SampleStream`]s.
#[derive(Clone)]
pub struct Loader {
    inner: Arc<Inner>,
}

/// Purposes of the derived random streams.
const RNG_SHARDS: u64 = 1;
const RNG_BUFFER: u64 = 2;
const RNG_FLIP: u64 = 3;

impl Loader {
    /// Resolves shard specifications (paths, brace patterns, directories) and checks the config.
    pub fn open(specs: &[String], config: LoaderConfig) -> Result<Loader> {
        Loader::new(resolve_shards(specs)?, config)
    }

    pub fn new(shards: Vec<PathBuf>, config: LoaderConfig) -> Result<Loader> {
        if shards.is_empty() {
            return Err(Error::msg("no shards given"));
        }
        config.validate(shards.len())?;
        let names: Vec<Arc<str>> = shards.iter().map(|p| Arc::from(p.display().to_string())).collect();
        let mut hash = Fnv::default();
        hash.u64(config.seed).u64(config.shuffle_buffer as u64).u64(config.shuffle_shards as u64);
        // The stream's identity: a striding partition reads one process's stream (and says which stride it takes
        // in its state), so it shares one process's fingerprint; a partition with shards of its own has its own.
        let (split, partitions, partition) = match config.stride() {
            Some(_) => (SplitMode::Shards, 1, 0),
            None => (config.split, config.partitions(), config.partition()),
        };
        hash.u64(split as u64).u64(partitions as u64).u64(partition as u64);
        for list in [&config.fields.image, &config.fields.control, &config.fields.caption] {
            hash.u64(list.len() as u64);
            for ext in list {
                hash.bytes(ext.as_bytes());
            }
        }
        // File names, not full paths: a dataset moved to another folder (or named by a relative path) resumes fine.
        for path in &shards {
            hash.bytes(path.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        }
        let fingerprint = hash.finish();
        Ok(Loader { inner: Arc::new(Inner { shards, names, config, fingerprint }) })
    }

    pub fn shards(&self) -> &[PathBuf] {
        &self.inner.shards
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.inner.config
    }

    /// The position before the first sample of epoch 0.
    pub fn initial_state(&self) -> LoaderState {
        let stride = self.inner.config.stride().unwrap_or(Stride::WHOLE);
        LoaderState {
            version: STATE_VERSION,
            epoch: 0,
            consumed: 0,
            part: stride.index,
            parts: stride.count,
            seed: self.inner.config.seed,
            fingerprint: self.inner.fingerprint,
        }
    }

    /// The same data read whole, as one process reads it (rank 0 of 1, one worker).
    pub fn whole(&self) -> Result<Loader> {
        let config = LoaderConfig { rank: 0, world_size: 1, worker: 0, num_workers: 1, ..self.inner.config.clone() };
        Loader::new(self.inner.shards.clone(), config)
    }

    /// This partition's position, from the states every stride of a run saved (`saved[i]` by stride `i`): its
    /// own when the run had as many strides; otherwise the point of the stream they mark together, when they
    /// consumed exactly its first items (always for one process; for several, when none of them skipped ahead
    /// past a bad sample: see [`super::stride::common_prefix`]). Anything else is refused, naming the positions.
    pub fn resume_state(&self, saved: &[LoaderState]) -> Result<LoaderState> {
        let here = self.initial_state();
        let Some(first) = saved.first() else { return Err(Error::msg("no data position saved")) };
        let count = saved.len() as u64;
        for (i, s) in saved.iter().enumerate() {
            if s.part != i as u64 || s.parts != count {
                return Err(Error::msg(format!(
                    "data position {i} of {count} was saved by stride {} of {} (a damaged or hand-edited checkpoint)",
                    s.part, s.parts
                )));
            }
        }
        if count == here.parts {
            return Ok(saved[here.part as usize]);
        }
        let Some(stride) = self.inner.config.stride() else {
            return Err(Error::msg(format!(
                "the data positions were saved by {count} partitions and this loader has {}, and it reads shards of \
                 its own (split by shards): positions cannot be mapped",
                here.parts
            )));
        };
        let at: Vec<String> = saved.iter().map(|s| format!("item {} of epoch {}", s.consumed, s.epoch)).collect();
        let consumed: Vec<u64> = saved.iter().map(|s| s.consumed).collect();
        if saved.iter().any(|s| (s.version, s.seed, s.fingerprint) != (first.version, first.seed, first.fingerprint)) {
            return Err(Error::msg("the saved data positions are of different data streams (seed, shards or order)"));
        }
        let same_epoch = saved.iter().all(|s| s.epoch == first.epoch);
        match common_prefix(&consumed).filter(|_| same_epoch) {
            // The stream's identity is the saved one: starting the stream checks it against this loader's.
            Some(c) => Ok(LoaderState { consumed: stride.own_before(c), part: here.part, parts: here.parts, ..*first }),
            None => Err(Error::msg(format!(
                "the data positions were saved by {count} ranks and this run has {}: they are at {} (of their own \
                 samples), which is not one point of the data stream (a rank skipped a bad sample and went on with its \
                 next), so they cannot be mapped onto {} ranks exactly; resume with {count}",
                here.parts,
                at.join(", "),
                here.parts
            ))),
        }
    }

    /// Indices (into [`Loader::shards`]) of the shards this partition reads in `epoch`, in reading order.
    pub fn epoch_shards(&self, epoch: u64) -> Vec<usize> {
        let cfg = &self.inner.config;
        let mut order: Vec<usize> = (0..self.inner.shards.len()).collect();
        if cfg.shuffle_shards {
            // Same permutation on every rank and worker, so the split below is a partition.
            SplitMix64::derive(cfg.seed, &[RNG_SHARDS, epoch]).shuffle(&mut order);
        }
        match cfg.split {
            SplitMode::Shards => order
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % cfg.partitions() == cfg.partition())
                .map(|(_, s)| s)
                .collect(),
            SplitMode::Samples => order,
        }
    }

    /// This partition's items of the epoch in their final order, each with its position in the epoch's stream
    /// (see [`Sample::global_index`]), read and shuffled on the calling thread, nothing decoded.
    pub fn epoch_items(&self, epoch: u64) -> impl Iterator<Item = (u64, Item)> + Send + 'static {
        let cfg = &self.inner.config;
        let reader =
            EpochReader { inner: self.inner.clone(), shards: self.epoch_shards(epoch).into_iter(), current: None };
        let rng = SplitMix64::derive(cfg.seed, &[RNG_BUFFER, epoch, cfg.rng_partition()]);
        let shuffled = ShuffleBuffer::new(reader, cfg.shuffle_buffer, rng, |item| matches!(item, Item::ShardError(_)));
        // Striding after the shuffle: every stride shuffles the same whole stream and keeps its own positions.
        let stride = cfg.stride().unwrap_or(Stride::WHOLE);
        shuffled.enumerate().map(|(i, item)| (i as u64, item)).filter(move |(i, _)| stride.owns(*i))
    }

    /// Decodes and transforms one sample as the loader does (`flip` decided by the caller).
    pub fn prepare(&self, raw: &RawSample, flip: bool) -> std::result::Result<(Chw, Chw, String), String> {
        prepare(&self.inner.config, raw, flip)
    }

    /// Samples from `from` onwards, through every later epoch (an epoch with no usable sample is an error).
    pub fn stream(&self, from: &LoaderState) -> Result<SampleStream> {
        SampleStream::start(self.inner.clone(), from, None)
    }

    /// Samples from `from` to the end of `from.epoch`.
    pub fn stream_epoch(&self, from: &LoaderState) -> Result<SampleStream> {
        SampleStream::start(self.inner.clone(), from, Some(from.epoch))
    }
}

/// Reads the epoch's shards in order and yields their samples (and shard errors).
struct EpochReader {
    inner: Arc<Inner>,
    shards: std::vec::IntoIter<usize>,
    current: Option<SampleReader<BufReader<File>>>,
}

impl Iterator for EpochReader {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        let cfg = &self.inner.config;
        loop {
            if let Some(reader) = self.current.as_mut() {
                match reader.next() {
                    Some(ShardItem::Sample(raw)) => return Some(Item::Sample(raw)),
                    Some(ShardItem::Damaged(err)) => {
                        let name = reader.shard_name();
                        self.current = None;
                        return Some(Item::ShardError(format!("{name}: {err}")));
                    }
                    None => self.current = None,
                }
            }
            let shard = self.shards.next()?;
            let path = &self.inner.shards[shard];
            let name = self.inner.names[shard].clone();
            match File::open(path) {
                Ok(file) => {
                    let fields = cfg.fields.clone();
                    let keep = Arc::new(move |ext: &str| fields.wants(ext));
                    self.current = Some(SampleReader::new(BufReader::with_capacity(1 << 16, file), name, keep));
                }
                Err(e) => return Some(Item::ShardError(format!("{name}: cannot open: {e}"))),
            }
        }
    }
}

/// Decode, check, resize, crop, flip and normalise one sample.
fn prepare(cfg: &LoaderConfig, raw: &RawSample, flip: bool) -> std::result::Result<(Chw, Chw, String), String> {
    let decoded = decode_sample(raw, &cfg.fields)?;
    let (w, h, resize) = (cfg.width, cfg.height, cfg.resize);
    let image = resize_crop_as(&decoded.image, resize, w, h, cfg.image_filter, flip, Normalize::SIGNED);
    let control = resize_crop_as(&decoded.control, resize, w, h, cfg.control_filter, flip, Normalize::UNIT);
    recycle_image(decoded.image);
    recycle_image(decoded.control);
    Ok((image, control, decoded.caption))
}

enum Work {
    /// `seq`: the item's position in this partition's stream; `global`: in the epoch's whole stream.
    Item {
        epoch: u64,
        seq: u64,
        global: u64,
        item: Item,
    },
    EpochEnd {
        epoch: u64,
        seq: u64,
    },
    Fatal {
        epoch: u64,
        seq: u64,
        msg: String,
    },
}

enum Done {
    Good(Box<Sample>),
    Bad(String),
    ShardError(String),
    EpochEnd,
    Fatal(String),
}

/// Shared between the consumer and the reader: how many items the consumer has taken, to bound read-ahead.
struct Window {
    stop: AtomicBool,
    delivered: Mutex<u64>,
    changed: Condvar,
}

impl Window {
    /// Blocks until fewer than `limit` items are in flight; false when the stream is being dropped.
    fn wait_for_room(&self, sent: u64, limit: u64) -> bool {
        let mut delivered = self.delivered.lock().unwrap_or_else(|e| e.into_inner());
        while !self.stop.load(Ordering::Acquire) && sent - *delivered >= limit {
            delivered = self.changed.wait(delivered).unwrap_or_else(|e| e.into_inner());
        }
        !self.stop.load(Ordering::Acquire)
    }
}

/// Decoded samples in a deterministic order; see the module documentation.
pub struct SampleStream {
    inner: Arc<Inner>,
    epoch: u64,
    seq: u64,
    end_epoch: Option<u64>,
    good_this_epoch: u64,
    pending: BTreeMap<(u64, u64), Done>,
    results: Option<mpsc::Receiver<((u64, u64), Done)>>,
    window: Arc<Window>,
    threads: Vec<JoinHandle<()>>,
    stats: LoaderStats,
    finished: bool,
}

impl SampleStream {
    fn start(inner: Arc<Inner>, from: &LoaderState, end_epoch: Option<u64>) -> Result<SampleStream> {
        if from.version != STATE_VERSION {
            return Err(Error::msg(format!(
                "loader state has version {}, this build resumes version {STATE_VERSION} only",
                from.version
            )));
        }
        if from.fingerprint != inner.fingerprint || from.seed != inner.config.seed {
            return Err(Error::msg(
                "loader state was saved with other shards or other order settings (seed, shuffle, split, fields)",
            ));
        }
        let cfg = &inner.config;
        let stride = cfg.stride().unwrap_or(Stride::WHOLE);
        if from.stride() != stride {
            return Err(Error::msg(format!(
                "loader state was saved by stride {} of {} of the data stream, this loader reads stride {} of {}",
                from.part, from.parts, stride.index, stride.count
            )));
        }
        let threads =
            if cfg.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { cfg.threads };
        let window =
            Arc::new(Window { stop: AtomicBool::new(false), delivered: Mutex::new(0), changed: Condvar::new() });
        let (work_tx, work_rx) = mpsc::channel::<Work>();
        let (done_tx, done_rx) = mpsc::channel();
        let work_rx = Arc::new(Mutex::new(work_rx));
        let mut handles = Vec::with_capacity(threads + 1);
        for i in 0..threads {
            let (inner, work_rx, done_tx) = (inner.clone(), work_rx.clone(), done_tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("wds-decode-{i}"))
                .spawn(move || decode_worker(&inner, &work_rx, &done_tx))
                .map_err(|e| Error::msg(format!("cannot start a decoding thread: {e}")))?;
            handles.push(handle);
        }
        drop(done_tx);
        let (reader_inner, reader_window, start) = (inner.clone(), window.clone(), *from);
        let reader = std::thread::Builder::new()
            .name("wds-reader".into())
            .spawn(move || read_items(&reader_inner, &reader_window, start, end_epoch, &work_tx))
            .map_err(|e| Error::msg(format!("cannot start the shard reader thread: {e}")))?;
        handles.push(reader);
        Ok(SampleStream {
            inner,
            epoch: from.epoch,
            seq: from.consumed,
            end_epoch,
            // Resumed mid-epoch: the part already consumed is not seen again, so do not call the epoch empty.
            good_this_epoch: from.consumed,
            pending: BTreeMap::new(),
            results: Some(done_rx),
            window,
            threads: handles,
            stats: LoaderStats::default(),
            finished: false,
        })
    }

    /// Where the next call to `next` continues from; save it to resume later.
    pub fn state(&self) -> LoaderState {
        LoaderState { epoch: self.epoch, consumed: self.seq, ..Loader { inner: self.inner.clone() }.initial_state() }
    }

    pub fn stats(&self) -> &LoaderStats {
        &self.stats
    }

    /// Up to `size` samples stacked; shorter only at the end of a bounded stream.
    pub fn next_batch(&mut self, size: usize) -> Option<Result<Batch>> {
        let mut batch: Option<Batch> = None;
        while batch.as_ref().map_or(0, Batch::len) < size {
            match self.next() {
                Some(Ok(mut sample)) => {
                    let b = batch.get_or_insert_with(|| Batch {
                        keys: Vec::with_capacity(size),
                        captions: Vec::with_capacity(size),
                        images: Vec::with_capacity(size * sample.image.data.len()),
                        controls: Vec::with_capacity(size * sample.control.data.len()),
                        height: sample.image.height,
                        width: sample.image.width,
                    });
                    b.keys.push(std::mem::take(&mut sample.key));
                    b.captions.push(std::mem::take(&mut sample.caption));
                    b.images.extend_from_slice(&sample.image.data);
                    b.controls.extend_from_slice(&sample.control.data);
                    sample.recycle();
                }
                Some(Err(e)) => return Some(Err(e)),
                None => break,
            }
        }
        batch.map(Ok)
    }

    fn note_problem(&mut self, msg: &str) {
        if self.stats.first_problems.len() < KEEP_PROBLEMS {
            self.stats.first_problems.push(msg.to_string());
        }
        let shown = self.stats.bad + self.stats.shard_errors;
        let warn_first = self.inner.config.warn_first as u64;
        if !self.inner.config.strict && shown <= warn_first {
            // Among data-parallel ranks, the one that met it says so (each skips only its own samples).
            let cfg = &self.inner.config;
            let who = if cfg.world_size > 1 { format!(" (rank {})", cfg.rank) } else { String::new() };
            eprintln!("warning{who}: skipped {msg}");
            if shown == warn_first {
                eprintln!("warning: further skipped samples are counted but not named");
            }
        }
    }

    fn fail(&mut self, msg: String) -> Option<Result<Sample>> {
        self.finished = true;
        Some(Err(Error::msg(msg)))
    }

    fn advance(&mut self) {
        let mut delivered = self.window.delivered.lock().unwrap_or_else(|e| e.into_inner());
        *delivered += 1;
        self.window.changed.notify_all();
    }
}

impl Iterator for SampleStream {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Result<Sample>> {
        loop {
            if self.finished {
                return None;
            }
            let key = (self.epoch, self.seq);
            let Some(done) = self.pending.remove(&key) else {
                let received = self.results.as_ref().and_then(|rx| rx.recv().ok());
                match received {
                    Some((k, d)) => {
                        self.pending.insert(k, d);
                        continue;
                    }
                    None => return self.fail("data loader threads stopped unexpectedly".into()),
                }
            };
            self.advance();
            match done {
                Done::Good(sample) => {
                    self.seq += 1;
                    self.good_this_epoch += 1;
                    self.stats.samples += 1;
                    return Some(Ok(*sample));
                }
                Done::Bad(msg) => {
                    self.seq += 1;
                    self.stats.bad += 1;
                    self.note_problem(&msg);
                    if self.inner.config.strict {
                        return self.fail(msg);
                    }
                }
                Done::ShardError(msg) => {
                    self.seq += 1;
                    self.stats.shard_errors += 1;
                    self.note_problem(&msg);
                    if self.inner.config.strict {
                        return self.fail(msg);
                    }
                }
                Done::EpochEnd => {
                    let empty = self.good_this_epoch == 0;
                    let last = self.end_epoch == Some(self.epoch);
                    self.epoch += 1;
                    self.seq = 0;
                    self.good_this_epoch = 0;
                    if last {
                        self.finished = true;
                        return None;
                    }
                    if empty {
                        let msg = format!(
                            "epoch {} yielded no usable sample for partition {} of {}",
                            self.epoch - 1,
                            self.inner.config.partition(),
                            self.inner.config.partitions()
                        );
                        return self.fail(msg);
                    }
                }
                Done::Fatal(msg) => return self.fail(msg),
            }
        }
    }
}

impl Drop for SampleStream {
    fn drop(&mut self) {
        self.window.stop.store(true, Ordering::Release);
        {
            let _guard = self.window.delivered.lock().unwrap_or_else(|e| e.into_inner());
            self.window.changed.notify_all();
        }
        self.results = None;
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// The reader thread: produces every epoch's items in order, skipping the ones a resumed state already consumed.
fn read_items(
    inner: &Arc<Inner>,
    window: &Window,
    start: LoaderState,
    end_epoch: Option<u64>,
    work: &mpsc::Sender<Work>,
) {
    let loader = Loader { inner: inner.clone() };
    let limit = inner.config.prefetch as u64;
    let mut sent = 0u64;
    let mut epoch = start.epoch;
    loop {
        let skip = if epoch == start.epoch { start.consumed } else { 0 };
        let mut seq = 0u64;
        for (global, item) in loader.epoch_items(epoch) {
            if window.stop.load(Ordering::Acquire) {
                return;
            }
            if seq >= skip {
                if !window.wait_for_room(sent, limit) || work.send(Work::Item { epoch, seq, global, item }).is_err() {
                    return;
                }
                sent += 1;
            }
            seq += 1;
        }
        if !window.wait_for_room(sent, limit) {
            return;
        }
        let message = if seq < skip {
            let msg = format!(
                "loader state points at item {skip} of epoch {epoch}, but the epoch has only {seq}: the shards changed"
            );
            Work::Fatal { epoch, seq: skip, msg }
        } else {
            Work::EpochEnd { epoch, seq }
        };
        let fatal = matches!(message, Work::Fatal { .. });
        if work.send(message).is_err() || fatal {
            return;
        }
        sent += 1;
        if end_epoch == Some(epoch) {
            return;
        }
        epoch += 1;
    }
}

fn decode_worker(inner: &Inner, work: &Mutex<mpsc::Receiver<Work>>, done: &mpsc::Sender<((u64, u64), Done)>) {
    let cfg = &inner.config;
    loop {
        let next = work.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(next) = next else { return };
        let (key, result) = match next {
            Work::EpochEnd { epoch, seq } => ((epoch, seq), Done::EpochEnd),
            Work::Fatal { epoch, seq, msg } => ((epoch, seq), Done::Fatal(msg)),
            Work::Item { epoch, seq, item: Item::ShardError(msg), .. } => ((epoch, seq), Done::ShardError(msg)),
            Work::Item { epoch, seq, global, item: Item::Sample(raw) } => {
                // Keyed by the position in the stream the partition's random draws follow (see `rng_partition`).
                let flip = cfg.flip_prob > 0.0
                    && SplitMix64::derive(cfg.seed, &[RNG_FLIP, epoch, cfg.rng_partition(), global]).unit_f64()
                        < cfg.flip_prob;
                let outcome = catch_unwind(AssertUnwindSafe(|| prepare(cfg, &raw, flip)));
                let result = match outcome {
                    Ok(Ok((image, control, caption))) => Done::Good(Box::new(Sample {
                        key: raw.key.clone(),
                        shard: raw.shard.clone(),
                        image,
                        control,
                        caption,
                        flipped: flip,
                        epoch,
                        index: seq,
                        global_index: global,
                    })),
                    Ok(Err(reason)) => Done::Bad(bad_message(&raw, &reason)),
                    Err(_) => Done::Bad(bad_message(&raw, "the decoder crashed on this sample")),
                };
                ((epoch, seq), result)
            }
        };
        if done.send((key, result)).is_err() {
            return;
        }
    }
}

/// "shard: sample 'key' (byte N): reason".
pub fn bad_message(raw: &RawSample, reason: &str) -> String {
    format!("{}: sample '{}' (byte {}): {}", raw.shard, raw.key, raw.offset, reason)
}
