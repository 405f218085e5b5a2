//! Training checkpoints: the trainable parameters under their original keys, the AdamW moments, the step, RNG
//! state, data position, run id and the config trained with, in one safetensors file written atomically (temp
//! file, fsync, rename), so an interrupted write never replaces a good checkpoint.

use crate::engine::Program;
use crate::error::{Error, Result};
use crate::graph::ValueId;
use crate::io::checkpoint::{write_atomically, write_safetensors_streamed, Checkpoint, Entry};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const STATE_KEY: &str = "zeroconv.train_state";
pub const M_PREFIX: &str = "optimizer.adam_m.";
pub const V_PREFIX: &str = "optimizer.adam_v.";

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// "base" or "control".
    pub phase: String,
    pub rng: [u64; 4],
    /// The data position: rank 0's in a data-parallel run.
    pub data: String,
    /// Every other rank's data position, in rank order after rank 0's (`data`); empty for one process. Each rank
    /// reads its own stride of the data, so each has its own position (app/train/data.rs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_ranks: Vec<String>,
    /// The run that wrote the checkpoint (its `run.json` id); absent in checkpoints of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

impl TrainState {
    /// The data position of every rank of the run that wrote it, in rank order.
    pub fn data_positions(&self) -> Vec<&str> {
        std::iter::once(self.data.as_str()).chain(self.data_ranks.iter().map(String::as_str)).collect()
    }
}

/// Fails after `budget` bytes: simulates a crash midway through a checkpoint write (tests).
struct Budget<'a> {
    inner: &'a mut dyn Write,
    budget: u64,
}

impl Write for Budget<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.budget {
            return Err(std::io::Error::other("simulated failure midway through the write"));
        }
        self.budget -= buf.len() as u64;
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the program's `values` (from [`checkpoint_values`]), `state` and the run's config (JSON, see
/// [`super::config_diff`]) to `path` atomically, downloading each tensor as it is written: the host never holds more
/// than one of them (a checkpoint of SD 1.5's ControlNet holds 4 GB of weights and moments). `fail_after`
/// simulates an interruption.
pub fn save<P: Program>(
    path: &Path,
    prog: &mut P,
    values: &[(String, ValueId)],
    state: &TrainState,
    config: Option<&str>,
    fail_after: Option<u64>,
) -> Result<()> {
    let mut meta = BTreeMap::new();
    meta.insert(STATE_KEY.to_string(), serde_json::to_string(state).map_err(|e| Error::msg(e.to_string()))?);
    if let Some(config) = config {
        meta.insert(super::config_diff::CONFIG_KEY.to_string(), config.to_string());
    }
    let g = prog.graph();
    let entries: Vec<Entry> = values
        .iter()
        .map(|(k, v)| Entry { name: k.clone(), dtype: g.dtype(*v), shape: g.shape(*v).dims().to_vec() })
        .collect();
    let fetch = |i: usize| -> Result<Cow<'static, [u8]>> { Ok(Cow::Owned(prog.download(values[i].1)?.bytes)) };
    write_atomically(path, |w| match fail_after {
        Some(budget) => write_safetensors_streamed(&mut Budget { inner: w, budget }, &entries, Some(&meta), fetch),
        None => write_safetensors_streamed(w, &entries, Some(&meta), fetch),
    })
}

/// Reads a checkpoint and its training state.
pub fn load(path: &Path) -> Result<(Checkpoint, TrainState)> {
    let ckpt = Checkpoint::open(path)?;
    let text = ckpt
        .metadata()
        .get(STATE_KEY)
        .ok_or_else(|| Error::file(path, "is not a zeroconv training checkpoint (no training state in its metadata)"))?
        .clone();
    let state: TrainState =
        serde_json::from_str(&text).map_err(|e| Error::file(path, format!("training state: {e}")))?;
    Ok((ckpt, state))
}

/// The training state of a checkpoint, from its header alone (no tensor is mapped or read): for deciding which
/// run a checkpoint belongs to.
pub fn read_state(path: &Path) -> Result<TrainState> {
    use std::io::Read;
    let bad = |m: String| Error::file(path, m);
    let mut f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let len = u64::from_le_bytes(len);
    let file_len = f.metadata().map_err(|e| bad(e.to_string()))?.len();
    if len > 100_000_000 || len > file_len.saturating_sub(8) {
        return Err(bad(format!("not a safetensors file (header length {len})")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let text = header
        .get("__metadata__")
        .and_then(|m| m.get(STATE_KEY))
        .and_then(|s| s.as_str())
        .ok_or_else(|| bad("is not a zeroconv training checkpoint (no training state in its metadata)".into()))?;
    serde_json::from_str(text).map_err(|e| bad(format!("training state: {e}")))
}

/// The checkpoints in `dir`, oldest first (by step, from the file names `step_NNNNNNNN.safetensors`).
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<(u64, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step_")?.strip_suffix(".safetensors")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

pub fn path_for(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step_{step:08}.safetensors"))
}

/// What a checkpoint holds, as (key, program value): every trainable parameter under its key and its AdamW moments
/// under [`M_PREFIX`] / [`V_PREFIX`].
pub fn checkpoint_values<P: Program>(
    prog: &P,
    map: &crate::graph::passes::ValueMap,
    specs: &[crate::models::ParamSpec],
) -> Vec<(String, ValueId)> {
    let mut out = Vec::new();
    for s in specs.iter().filter(|s| s.trainable) {
        let Some(v) = map.get(s.value) else { continue };
        out.push((s.key.clone(), v));
        for (prefix, suffix) in [(M_PREFIX, "adam_m"), (V_PREFIX, "adam_v")] {
            if let Some(sv) = prog.graph().find(&format!("{}.{suffix}", s.key)) {
                out.push((format!("{prefix}{}", s.key), sv));
            }
        }
    }
    out
}

/// Uploads parameters and moments a checkpoint holds (see [`checkpoint_values`]).
pub fn restore<P: Program>(
    prog: &mut P,
    map: &crate::graph::passes::ValueMap,
    specs: &[crate::models::ParamSpec],
    ckpt: &Checkpoint,
) -> Result<()> {
    for s in specs.iter().filter(|s| s.trainable) {
        let Some(v) = map.get(s.value) else { continue };
        prog.upload(v, &ckpt.to_host(&s.key)?)?;
        for (prefix, suffix) in [(M_PREFIX, "adam_m"), (V_PREFIX, "adam_v")] {
            if let Some(sv) = prog.graph().find(&format!("{}.{suffix}", s.key)) {
                prog.upload(sv, &ckpt.to_host(&format!("{prefix}{}", s.key))?)?;
            }
        }
    }
    Ok(())
}
