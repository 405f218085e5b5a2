//! Where training batches come from: the built-in synthetic shapes, or WebDataset shards through
//! the streaming loader. Either way the position is a small JSON state saved in checkpoints, so a
//! resumed run continues with exactly the samples an uninterrupted one would have seen.
//!
//! Epochs are NeMo's: one pass over the shards (or `synthetic_data_length` synthetic samples). An optimizer step
//! never mixes two epochs: the samples an epoch has left that cannot fill a whole step are skipped, as NeMo's
//! training DataLoader (`drop_last=True`) drops its last incomplete batch ([`DataSource::align_step`]).

use std::collections::VecDeque;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::io::config::{Config, Interpolation};
use crate::io::data::loader::{Loader, LoaderConfig, LoaderState, Sample, SampleStream};
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
        next: u64,
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
    },
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
    pub fn from_config(cfg: &Config, strict: bool) -> Result<DataSource> {
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
            return Ok(DataSource::Synthetic { seed, size: height, length: d.synthetic_data_length.max(1), next: 0 });
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

    /// Makes the next `per_step` samples lie in one epoch: an epoch's leftover too small for a whole optimizer step
    /// is skipped (NeMo's DataLoader drops its last incomplete batch). Returns where that step reads. Calling it
    /// again before the step is drawn changes nothing.
    pub fn align_step(&mut self, per_step: usize) -> Result<StepPosition> {
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
            DataSource::Web { stream, ahead, drops, .. } => {
                while ahead.len() < per_step.max(1) {
                    let sample = match stream.next() {
                        Some(Ok(s)) => s,
                        Some(Err(e)) => return Err(e),
                        None => return Err(Error::msg("the dataset ran out of samples")),
                    };
                    if ahead.front().is_some_and(|f| f.epoch != sample.epoch) {
                        *drops += 1;
                        if *drops > 1 {
                            return Err(Error::msg(format!(
                                "epoch {} of the shards has fewer usable samples ({}) than one optimizer step \
                                 ({per_step}: micro_batch_size x accumulation)",
                                ahead[0].epoch,
                                ahead.len()
                            )));
                        }
                        for s in ahead.drain(..) {
                            s.recycle();
                        }
                    }
                    ahead.push_back(sample);
                }
                Ok(StepPosition { epoch: ahead[0].epoch, index: None })
            }
        }
    }

    pub fn next_batch(&mut self, n: usize) -> Result<HostBatch> {
        match self {
            DataSource::Synthetic { seed, size, length, next } => {
                let mut b = HostBatch { images: Vec::new(), hints: Vec::new(), captions: Vec::new() };
                for _ in 0..n {
                    let s = synthetic::sample(*seed, *next % *length, *size);
                    *next += 1;
                    b.images.extend(s.image);
                    b.hints.extend(s.hint);
                    b.captions.push(s.caption);
                }
                Ok(b)
            }
            DataSource::Web { stream, ahead, drops, .. } => {
                *drops = 0;
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
                let mut fresh = loader.stream(&loader.initial_state())?;
                match fresh.next_batch(n) {
                    Some(Ok(b)) => Ok((b.controls, b.captions)),
                    Some(Err(e)) => Err(e),
                    None => Err(Error::msg("no samples for validation")),
                }
            }
        }
    }

    /// The position, for checkpoints.
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

    pub fn restore(&mut self, json: &str) -> Result<()> {
        match self {
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
                let state = LoaderState::from_json(json)?;
                ahead.clear();
                *drops = 0;
                **stream = loader.stream(&state)?;
                Ok(())
            }
        }
    }
}
