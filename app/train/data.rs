//! Where training batches come from: the built-in synthetic shapes, or WebDataset shards through
//! the streaming loader. Either way the position is a small JSON state saved in checkpoints, so a
//! resumed run continues with exactly the samples an uninterrupted one would have seen.
//!
//! Epochs are NeMo's: one pass over the shards (or `synthetic_data_length` synthetic samples). An optimizer step
//! never mixes two epochs: the samples an epoch has left that cannot fill a whole step are skipped, as NeMo's
//! training DataLoader (`drop_last=True`) drops its last incomplete batch ([`DataSource::align_step`]).
//!
//! Data-parallel ranks: rank `r` of `W` reads and decodes only its stride of the stream one process reads, the
//! samples at positions `i ≡ r (mod W)` of each epoch (io/data/stride.rs), so an optimizer step's samples over
//! all ranks are one process's batch, each decoded once. A rank that meets a bad sample takes its next own
//! sample instead, so the ranks' positions can drift apart; each rank's position goes into the checkpoint.

use std::collections::VecDeque;
use std::path::PathBuf;

use super::parallel::Parallel;
use crate::error::{Error, Result};
use crate::io::config::{Config, Interpolation};
use crate::io::data::loader::{Loader, LoaderConfig, LoaderState, Sample, SampleStream, SplitMode};
use crate::io::data::stride::Stride;
use crate::io::data::synthetic;
use crate::io::data::transform::{Filter, Resize};

/// A batch on the host: NCHW images in [-1, 1] and hints in [0, 1].
pub struct HostBatch {
    pub images: Vec<f32>,
    pub hints: Vec<f32>,
    pub captions: Vec<String>,
}

pub enum DataSource {
    Synthetic {
        seed: u64,
        size: usize,
        length: u64,
        /// The first sample of the next optimizer step, over every rank (the same on every rank).
        next: u64,
        /// This rank's stride of each step's samples.
        stride: Stride,
    },
    Web {
        loader: Box<Loader>,
        stream: Box<SampleStream>,
        height: usize,
        width: usize,
        /// Samples read from the stream for the next step and not used yet (the position saved in checkpoints is
        /// the first of them).
        ahead: VecDeque<Sample>,
        /// Epochs whose leftover was dropped since the last step (two in a row: an epoch smaller than a step).
        drops: u32,
        /// Samples this process put into batches, and those it dropped at epoch ends.
        used: u64,
        dropped: u64,
    },
}

/// A process's samples: put into batches, dropped at epoch ends, and skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataUsage {
    pub used: u64,
    pub dropped: u64,
    pub bad: u64,
    pub damaged_shards: u64,
}

impl std::fmt::Display for DataUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} samples used, {} dropped at epoch ends, {} bad samples and {} damaged shards skipped",
            self.used, self.dropped, self.bad, self.damaged_shards
        )
    }
}

/// Where the next optimizer step reads, from [`DataSource::align_step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepPosition {
    /// The epoch (0-based, counted from the start of the data stream).
    pub epoch: u64,
    /// Synthetic data: the step's index in its epoch and the steps an epoch holds (unknown for shards).
    pub index: Option<(u64, u64)>,
}

/// The training resolution, (height, width): the crop (NeMo's `center_crop_h_w` is height, width), else, for
/// the synthetic shapes, the resize target or the U-Net's latent size × 8.
pub fn image_size(cfg: &Config) -> (usize, usize) {
    let a = &cfg.model.data.train.augmentations;
    match &a.center_crop_h_w {
        Some(c) => (c.height as usize, c.width as usize),
        None => {
            let s = a.resize_smallest_side.map_or(cfg.model.unet_config.image_size as usize * 8, |s| s as usize);
            (s, s)
        }
    }
}

/// The side of square training images (see [`image_size`]; the height of non-square ones).
pub fn resolution(cfg: &Config) -> usize {
    image_size(cfg).0
}

/// The shard paths of `model.data.train.dataset_path`, relative ones under `model.data.webdataset.local_root_path`
/// (NeMo joins every shard path to it).
pub fn dataset_paths(cfg: &Config) -> Vec<String> {
    let d = &cfg.model.data;
    let root = d.webdataset.local_root_path.as_ref();
    d.train
        .dataset_path
        .iter()
        .map(|p| root.map_or_else(|| p.clone(), |r: &PathBuf| r.join(p)).display().to_string())
        .collect()
}

fn filter(i: Interpolation) -> Filter {
    match i {
        Interpolation::Nearest => Filter::Nearest,
        Interpolation::Bilinear | Interpolation::Area => Filter::Bilinear,
        Interpolation::Bicubic => Filter::Bicubic,
        Interpolation::Lanczos => Filter::Lanczos3,
    }
}

impl DataSource {
    /// The data of `cfg` for `rank` of `world_size` data-parallel ranks (0 of 1 alone).
    pub fn from_config(cfg: &Config, strict: bool, rank: usize, world_size: usize) -> Result<DataSource> {
        let stride = Stride { index: rank as u64, count: world_size.max(1) as u64 };
        let (height, width) = image_size(cfg);
        let d = &cfg.model.data;
        let seed = cfg.data_seed();
        let aug = &d.train.augmentations;
        if d.synthetic_data {
            if height != width {
                return Err(Error::msg(format!(
                    "model.data.train.augmentations.center_crop_h_w is {height}, {width}: the built-in synthetic shapes \
                     are square (crop to a square, or train on shards)"
                )));
            }
            let length = d.synthetic_data_length.max(1);
            return Ok(DataSource::Synthetic { seed, size: height, length, next: 0, stride });
        }
        if aug.center_crop_h_w.is_none() {
            return Err(Error::msg(
                "model.data.train.augmentations.center_crop_h_w is null: NeMo then trains every image at its own size \
                 (its shorter side resize_smallest_side), but zeroconv compiles the step for one image size: set \
                 center_crop_h_w (e.g. '512, 512')",
            ));
        }
        let paths = dataset_paths(cfg);
        if paths.is_empty() {
            return Err(Error::msg(
                "model.data.train.dataset_path is empty: give WebDataset shards (paths, brace ranges or folders), \
                 e.g. 'model.data.train.dataset_path=[\"data/shard-{000000..000009}.tar\"]', or set model.data.synthetic_data=True",
            ));
        }
        let lc = LoaderConfig {
            width: width as u32,
            height: height as u32,
            resize: aug.resize_smallest_side.map_or(Resize::Keep, Resize::ShorterSide),
            image_filter: filter(d.train.augmentations.resize_interpolation),
            control_filter: Filter::Nearest,
            flip_prob: if d.train.augmentations.horizontal_flip { 0.5 } else { 0.0 },
            seed,
            shuffle_buffer: d.shuffle_buffer as usize,
            threads: d.num_workers as usize,
            strict,
            rank,
            world_size,
            split: SplitMode::Samples,
            ..LoaderConfig::default()
        };
        let loader = Loader::open(&paths, lc)
            .map_err(|e| Error::msg(format!("model.data.train.dataset_path {paths:?}: {e}")))?;
        let stream = loader.stream(&loader.initial_state())?;
        Ok(DataSource::Web {
            loader: Box::new(loader),
            stream: Box::new(stream),
            height,
            width,
            ahead: VecDeque::new(),
            drops: 0,
            used: 0,
            dropped: 0,
        })
    }

    /// The side of square images (the height of non-square ones; see [`DataSource::image_size`]).
    pub fn size(&self) -> usize {
        self.image_size().0
    }

    /// (height, width) of the images.
    pub fn image_size(&self) -> (usize, usize) {
        match self {
            DataSource::Synthetic { size, .. } => (*size, *size),
            DataSource::Web { height, width, .. } => (*height, *width),
        }
    }

    /// Samples in one epoch, when known before reading it (synthetic data).
    pub fn epoch_samples(&self) -> Option<u64> {
        match self {
            DataSource::Synthetic { length, .. } => Some(*length),
            DataSource::Web { .. } => None,
        }
    }

    /// Makes the next optimizer step's `per_step` samples (over every rank) lie in one epoch: an epoch's leftover
    /// too small for a whole step is skipped (NeMo's DataLoader drops its last incomplete batch). Returns where
    /// that step reads. Calling it again before the step is drawn changes nothing. Every rank calls it together:
    /// with shards, the ranks agree on the epoch through `par` (a rank's share of an epoch depends on the bad
    /// samples it met, so one rank can run out of an epoch before the others).
    pub fn align_step(&mut self, per_step: usize, par: &mut Parallel) -> Result<StepPosition> {
        let per = per_step.max(1) as u64;
        match self {
            DataSource::Synthetic { length, next, .. } => {
                if *length < per {
                    return Err(Error::msg(format!(
                        "model.data.synthetic_data_length ({length}) is smaller than one optimizer step ({per} samples): \
                         an epoch would hold no step"
                    )));
                }
                let left = *length - *next % *length;
                if left < per {
                    *next += left;
                }
                Ok(StepPosition { epoch: *next / *length, index: Some((*next % *length / per, *length / per)) })
            }
            DataSource::Web { stream, ahead, drops, dropped, .. } => {
                let share = (per_step / par.world_size).max(1);
                let mut from_epoch = 0;
                loop {
                    fill_share(stream, ahead, (drops, dropped), share, from_epoch, par.rank)?;
                    let epochs = par.all_gather_u64(ahead[0].epoch)?;
                    let latest = epochs.iter().copied().max().unwrap_or(0);
                    if epochs.iter().all(|&e| e == latest) {
                        return Ok(StepPosition { epoch: latest, index: None });
                    }
                    // Another rank ran out of the epoch: the step starts the next one on every rank.
                    from_epoch = latest;
                }
            }
        }
    }

    /// This rank's `n` samples of the next optimizer step (of `n` × world size over every rank): its stride of them.
    pub fn next_batch(&mut self, n: usize) -> Result<HostBatch> {
        match self {
            DataSource::Synthetic { seed, size, length, next, stride } => {
                let mut b = HostBatch { images: Vec::new(), hints: Vec::new(), captions: Vec::new() };
                for k in 0..n as u64 {
                    let s = synthetic::sample(*seed, (*next + stride.global(k)) % *length, *size);
                    b.images.extend(s.image);
                    b.hints.extend(s.hint);
                    b.captions.push(s.caption);
                }
                *next += n as u64 * stride.count;
                Ok(b)
            }
            DataSource::Web { stream, ahead, drops, used, .. } => {
                *drops = 0;
                *used += n as u64;
                let mut b = HostBatch { images: Vec::new(), hints: Vec::new(), captions: Vec::new() };
                for _ in 0..n {
                    let sample = match ahead.pop_front() {
                        Some(s) => s,
                        None => match stream.next() {
                            Some(Ok(s)) => s,
                            Some(Err(e)) => return Err(e),
                            None => {
                                return Err(Error::msg(
                                    "the dataset ran out of samples (no usable samples in the shards?)",
                                ))
                            }
                        },
                    };
                    b.images.extend_from_slice(&sample.image.data);
                    b.hints.extend_from_slice(&sample.control.data);
                    b.captions.push(sample.caption.clone());
                    sample.recycle();
                }
                Ok(b)
            }
        }
    }

    /// Hints and captions for validation, the same every time and independent of the training
    /// stream: held-out synthetic samples, or the first samples of the shards.
    pub fn validation_samples(&self, n: usize, seed: u64) -> Result<(Vec<f32>, Vec<String>)> {
        match self {
            DataSource::Synthetic { size, .. } => {
                let (mut hints, mut caps) = (Vec::new(), Vec::new());
                for i in 0..n {
                    let s = synthetic::sample(seed ^ 0x05EE_D7A1, 1_000_000_007 + i as u64, *size);
                    hints.extend(s.hint);
                    caps.push(s.caption);
                }
                Ok((hints, caps))
            }
            DataSource::Web { loader, .. } => {
                // The first samples of the whole stream, whichever rank asks.
                let whole = loader.whole()?;
                let mut fresh = whole.stream(&whole.initial_state())?;
                match fresh.next_batch(n) {
                    Some(Ok(b)) => Ok((b.controls, b.captions)),
                    Some(Err(e)) => Err(e),
                    None => Err(Error::msg("no samples for validation")),
                }
            }
        }
    }

    /// What this process did with its samples since it started (shards only).
    pub fn usage(&self) -> Option<DataUsage> {
        match self {
            DataSource::Synthetic { .. } => None,
            DataSource::Web { stream, used, dropped, .. } => Some(DataUsage {
                used: *used,
                dropped: *dropped,
                bad: stream.stats().bad,
                damaged_shards: stream.stats().shard_errors,
            }),
        }
    }

    /// This rank's position, for checkpoints.
    pub fn state_json(&self) -> String {
        match self {
            DataSource::Synthetic { next, .. } => format!("{{\"synthetic_next\":{next}}}"),
            // Samples read ahead are not used yet: the position is the first of them.
            DataSource::Web { stream, ahead, .. } => match ahead.front() {
                Some(s) => LoaderState { epoch: s.epoch, consumed: s.index, ..stream.state() }.to_json(),
                None => stream.state().to_json(),
            },
        }
    }

    /// Continues from the positions a checkpoint saved, one per rank of the run that wrote it (see
    /// [`Loader::resume_state`] for a run with another number of ranks).
    pub fn restore(&mut self, saved: &[&str]) -> Result<()> {
        let json = *saved.first().ok_or_else(|| Error::msg("the checkpoint holds no data position"))?;
        match self {
            // The synthetic position is the step's first sample over every rank: the same on every rank.
            DataSource::Synthetic { next, .. } => {
                let v: serde_json::Value =
                    serde_json::from_str(json).map_err(|e| Error::msg(format!("checkpoint data state: {e}")))?;
                *next = v.get("synthetic_next").and_then(|n| n.as_u64()).ok_or_else(|| {
                    Error::msg(
                        "the checkpoint was trained on WebDataset shards, and this run reads the synthetic \
                             dataset (model.data.synthetic_data): a resume continues the same data stream; set \
                             model.data.synthetic_data=False and the checkpoint's dataset_path, or start a new run",
                    )
                })?;
                Ok(())
            }
            DataSource::Web { loader, stream, ahead, drops, .. } => {
                if json.contains("\"synthetic_next\"") {
                    return Err(Error::msg(
                        "the checkpoint was trained on the synthetic dataset, and this run reads WebDataset shards \
                         (model.data.train.dataset_path): a resume continues the same data stream; set \
                         model.data.synthetic_data=True, or start a new run",
                    ));
                }
                let states = saved.iter().map(|j| LoaderState::from_json(j)).collect::<Result<Vec<_>>>()?;
                let state =
                    loader.resume_state(&states).map_err(|e| Error::msg(format!("checkpoint data state: {e}")))?;
                ahead.clear();
                *drops = 0;
                **stream = loader.stream(&state)?;
                Ok(())
            }
        }
    }
}

/// Reads this rank's `share` of a step into `ahead`, all from one epoch, from `from_epoch` on: samples of an earlier
/// epoch, and an epoch's leftover that cannot fill the share, are dropped (`drops.0` counts the epochs whose end
/// was dropped since the last step: a second one means an epoch smaller than a step; `drops.1` the samples).
fn fill_share(
    stream: &mut SampleStream,
    ahead: &mut VecDeque<Sample>,
    drops: (&mut u32, &mut u64),
    share: usize,
    from_epoch: u64,
    rank: usize,
) -> Result<()> {
    let (drops, dropped) = drops;
    let drop_ahead = |ahead: &mut VecDeque<Sample>, drops: &mut u32, dropped: &mut u64| -> Result<()> {
        *drops += 1;
        *dropped += ahead.len() as u64;
        if *drops > 1 {
            return Err(Error::msg(format!(
                "epoch {} of the shards has fewer usable samples for rank {rank} ({}) than its share of one \
                 optimizer step ({share}: micro_batch_size x accumulation)",
                ahead[0].epoch,
                ahead.len()
            )));
        }
        ahead.drain(..).for_each(Sample::recycle);
        Ok(())
    };
    if ahead.front().is_some_and(|f| f.epoch < from_epoch) {
        drop_ahead(ahead, drops, dropped)?;
    }
    while ahead.len() < share {
        let sample = match stream.next() {
            Some(Ok(s)) => s,
            Some(Err(e)) => return Err(e),
            None => return Err(Error::msg("the dataset ran out of samples")),
        };
        if sample.epoch < from_epoch {
            *dropped += 1;
            sample.recycle();
            continue;
        }
        if ahead.front().is_some_and(|f| f.epoch != sample.epoch) {
            drop_ahead(ahead, drops, dropped)?;
        }
        ahead.push_back(sample);
    }
    Ok(())
}
