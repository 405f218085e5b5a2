//! Where training batches come from: the built-in synthetic shapes, or WebDataset shards through
//! the streaming loader. Either way the position is a small JSON state saved in checkpoints, so a
//! resumed run continues with exactly the samples an uninterrupted one would have seen.

use crate::error::{Error, Result};
use crate::frontend::config::{Config, Interpolation};
use crate::frontend::data::loader::{Loader, LoaderConfig, LoaderState, SampleStream};
use crate::frontend::data::transform::Filter;
use crate::frontend::synthetic;

/// A batch on the host: NCHW images in [-1, 1] and hints in [0, 1].
pub struct HostBatch {
    pub images: Vec<f32>,
    pub hints: Vec<f32>,
    pub captions: Vec<String>,
}

pub enum DataSource {
    Synthetic { seed: u64, size: usize, length: u64, next: u64 },
    Web { loader: Box<Loader>, stream: Box<SampleStream>, size: usize },
}

/// The training resolution: the crop, else the resize target, else the U-Net's latent size × 8.
pub fn resolution(cfg: &Config) -> usize {
    let a = &cfg.model.data.train.augmentations;
    a.center_crop_h_w
        .as_ref()
        .map(|c| c.height as usize)
        .or(a.resize_smallest_side.map(|s| s as usize))
        .unwrap_or(cfg.model.unet_config.image_size as usize * 8)
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
        let size = resolution(cfg);
        let d = &cfg.model.data;
        let seed = cfg.data_seed();
        if d.synthetic_data {
            return Ok(DataSource::Synthetic { seed, size, length: d.synthetic_data_length.max(1), next: 0 });
        }
        let paths: Vec<String> = d.train.dataset_path.iter().map(|p| p.display().to_string()).collect();
        if paths.is_empty() {
            return Err(Error::msg(
                "model.data.train.dataset_path is empty: give WebDataset shards (paths, brace ranges or folders), \
                 e.g. 'model.data.train.dataset_path=[\"data/shard-{000000..000009}.tar\"]', or set model.data.synthetic_data=True",
            ));
        }
        let lc = LoaderConfig {
            width: size as u32,
            height: size as u32,
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
        Ok(DataSource::Web { loader: Box::new(loader), stream: Box::new(stream), size })
    }

    pub fn size(&self) -> usize {
        match self {
            DataSource::Synthetic { size, .. } | DataSource::Web { size, .. } => *size,
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
            DataSource::Web { stream, .. } => match stream.next_batch(n) {
                Some(Ok(batch)) if batch.len() == n => {
                    Ok(HostBatch { images: batch.images, hints: batch.controls, captions: batch.captions })
                }
                Some(Ok(_)) | None => {
                    Err(Error::msg("the dataset ran out of samples (no usable samples in the shards?)"))
                }
                Some(Err(e)) => Err(e),
            },
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
            DataSource::Web { stream, .. } => stream.state().to_json(),
        }
    }

    pub fn restore(&mut self, json: &str) -> Result<()> {
        match self {
            DataSource::Synthetic { next, .. } => {
                let v: serde_json::Value =
                    serde_json::from_str(json).map_err(|e| Error::msg(format!("checkpoint data state: {e}")))?;
                *next = v
                    .get("synthetic_next")
                    .and_then(|n| n.as_u64())
                    .ok_or_else(|| Error::msg("checkpoint data state is not from the synthetic dataset"))?;
                Ok(())
            }
            DataSource::Web { loader, stream, .. } => {
                let state = LoaderState::from_json(json)?;
                **stream = loader.stream(&state)?;
                Ok(())
            }
        }
    }
}
