//! Reading and writing model checkpoints in the formats Stable Diffusion / ControlNet users bring:
//! `.safetensors`, PyTorch `.ckpt`/`.pth`/`.pt` (torch.save's zip format, Lightning checkpoints included) and NeMo
//! `.nemo` archives; writing is `.safetensors` only, atomically.
//!
//! A checkpoint is mapped once and its tensors are slices of the mapping: a 4 GB file costs address space, not
//! memory, and only the tensors a model asks for are ever paged in. The one copy made is for strided PyTorch views
//! (a saved transpose), which [`Checkpoint::get`] makes contiguous on demand; a gzipped `.nemo` is decompressed.
//!
//! ```no_run
//! # use zeroconv::io::checkpoint::Checkpoint;
//! let ckpt = Checkpoint::open("control_sd15_canny.pth".as_ref())?.into_ldm_keys()?;
//! let control = ckpt.prefixed("control_model.");
//! let w = control.to_f32("input_hint_block.0.weight")?;
//! # Ok::<(), zeroconv::Error>(())
//! ```

mod check;
pub mod diffusers;
pub mod diffusers_export;
mod folder;
pub mod megatron_clip;
pub mod nemo;
pub mod open_clip;
mod pickle;
mod safetensors;
mod source;
mod torch_zip;
mod view;
mod write;

pub use check::check_keys;
pub use view::TensorView;
pub use write::{
    write_atomically, write_safetensors, write_safetensors_streamed, write_safetensors_to, AsTensorView, Entry,
};

use crate::engine::HostTensor;
use crate::error::{Error, Result};
use crate::graph::DType;
pub use diffusers::{Architecture, Layout};
use source::Source;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The container a checkpoint was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    /// torch.save's zip format (`.ckpt`, `.pth`, `.pt`), including Lightning checkpoints.
    TorchZip,
    /// A NeMo archive; `compressed` when its tar was gzipped (its weights then live in memory, not in the mapping).
    Nemo {
        compressed: bool,
    },
}

/// Where a tensor's bytes are in the checkpoint's source.
#[derive(Clone, Debug)]
pub(crate) enum DataRef {
    /// Row-major bytes, exactly `numel * dtype.size()` of them.
    Contiguous(Range<usize>),
    /// A strided view of a storage (a saved transpose or slice): gathered into a contiguous copy when read.
    Strided { storage: Range<usize>, offset: usize, strides: Vec<usize> },
}

#[derive(Clone, Debug)]
pub(crate) struct TensorEntry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: DataRef,
    /// Which file of the checkpoint holds it (a diffusers folder is several files).
    pub part: usize,
}

/// What a format reader finds: the tensors (validated against the source's length), entries it had to skip, and
/// string metadata.
#[derive(Debug, Default)]
pub(crate) struct Index {
    pub tensors: BTreeMap<String, TensorEntry>,
    pub skipped: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
}

/// An opened checkpoint: owns the mapping and knows where every tensor is.
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    /// The files the tensors are read from (one, or the component files of a diffusers folder), each with the
    /// layout its keys were in.
    sources: Vec<Part>,
    tensors: BTreeMap<String, TensorEntry>,
    skipped: BTreeMap<String, String>,
    metadata: BTreeMap<String, String>,
    config_yaml: Option<String>,
    /// Keys of a diffusers/HF file that map to no LDM name (kept under their own names: unexpected keys).
    unmapped: Vec<String>,
}

struct Part {
    path: PathBuf,
    source: Source,
    layout: Layout,
    /// Bytes made at load from another part's tensors (a Megatron CLIP's de-interleaved q/k/v), not a file.
    derived: bool,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("tensors", &self.tensors.len())
            .field("skipped", &self.skipped.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens a checkpoint, recognising the format by its content (the extension only shapes error messages), and
    /// validates every tensor's location, so later reads cannot fail or go out of bounds.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let source = Source::map(path)?;
        let bytes = source.bytes();
        if torch_zip::is_zip(bytes) {
            let index = torch_zip::parse(bytes, 0, path)?;
            return Ok(Self::new(path, Format::TorchZip, source, index, None));
        }
        if torch_zip::is_legacy(bytes) {
            return Err(torch_zip::legacy_error(path));
        }
        if nemo::is_gzip(bytes) || nemo::is_tar(bytes) {
            return Self::open_nemo(path, source);
        }
        if safetensors::looks_like(bytes) {
            let index = safetensors::parse(bytes, path)?;
            return Ok(Self::new(path, Format::Safetensors, source, index, None));
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        let head: Vec<String> = bytes.iter().take(4).map(|b| format!("{b:02x}")).collect();
        let head = head.join(" ");
        Err(match ext.as_str() {
            // A damaged safetensors file fails the sniff (e.g. a huge length field): let the parser say why.
            "safetensors" => safetensors::parse(bytes, path).err().unwrap_or_else(|| Error::file(path, "unreadable")),
            "ckpt" | "pth" | "pt" | "bin" if bytes.first() == Some(&0x80) => Error::file(
                path,
                "a raw pickle, not torch.save's zip format: re-save it with a recent torch or convert it to .safetensors",
            ),
            "ckpt" | "pth" | "pt" | "bin" => Error::file(
                path,
                format!("not a PyTorch checkpoint: torch.save writes a zip archive, this file starts with {head}"),
            ),
            "nemo" => Error::file(path, format!("not a .nemo archive: expected a tar or gzip file, it starts with {head}")),
            _ => Error::file(
                path,
                format!("unrecognised checkpoint format (starts with {head}); expected .safetensors, a torch.save zip or .nemo"),
            ),
        })
    }

    fn open_nemo(path: &Path, source: Source) -> Result<Checkpoint> {
        let archive = nemo::read(source.bytes(), path)?;
        let inner = |msg: Error| match msg {
            Error::File { msg, .. } => Error::file(path, format!("model_weights.ckpt: {msg}")),
            other => other,
        };
        match archive.weights {
            nemo::Weights::Member(range) => {
                let index = torch_zip::parse(&source.bytes()[range.clone()], range.start, path).map_err(inner)?;
                Ok(Self::new(path, Format::Nemo { compressed: false }, source, index, archive.config_yaml))
            }
            nemo::Weights::Decompressed(bytes) => {
                let index = torch_zip::parse(&bytes, 0, path).map_err(inner)?;
                let source = Source::Owned(bytes);
                Ok(Self::new(path, Format::Nemo { compressed: true }, source, index, archive.config_yaml))
            }
        }
    }

    fn new(path: &Path, format: Format, source: Source, index: Index, config_yaml: Option<String>) -> Checkpoint {
        Checkpoint {
            path: path.to_path_buf(),
            format,
            sources: vec![Part { path: path.to_path_buf(), source, layout: Layout::Ldm, derived: false }],
            tensors: index.tensors,
            skipped: index.skipped,
            metadata: index.metadata,
            config_yaml,
            unmapped: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Whether the tensors are read from a memory mapping of the file (false only for a gzipped `.nemo`).
    pub fn is_mapped(&self) -> bool {
        self.sources.iter().all(|p| p.source.is_mapped())
    }

    /// The file that holds `key` (for a diffusers folder, the component's file; else [`Checkpoint::path`]).
    pub fn file_of(&self, key: &str) -> &Path {
        self.tensors.get(key).map_or(&self.path, |e| &self.sources[e.part].path)
    }

    /// Each file read and the key layout it was in (detected by [`Checkpoint::into_ldm_keys_for`]).
    pub fn layouts(&self) -> impl Iterator<Item = (&Path, Layout)> + '_ {
        self.sources.iter().filter(|p| !p.derived).map(|p| (p.path.as_path(), p.layout))
    }

    /// Keys of diffusers / Hugging Face files that have no LDM name: kept under their own names, so the models
    /// see them as unexpected keys.
    pub fn unmapped(&self) -> &[String] {
        &self.unmapped
    }

    /// Number of readable tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// Tensor names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.tensors.keys().map(String::as_str)
    }

    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|t| t.shape.as_slice())
    }

    pub fn dtype(&self, key: &str) -> Option<DType> {
        self.tensors.get(key).map(|t| t.dtype)
    }

    /// The tensor, borrowed from the mapping when it is stored contiguously (the normal case), else a contiguous
    /// copy of the strided view.
    pub fn get(&self, key: &str) -> Option<TensorView<'_>> {
        let entry = self.tensors.get(key)?;
        let bytes = self.sources[entry.part].source.bytes();
        let data = match &entry.data {
            DataRef::Contiguous(range) => Cow::Borrowed(&bytes[range.clone()]),
            DataRef::Strided { storage, offset, strides } => {
                Cow::Owned(gather(&bytes[storage.clone()], entry.dtype.size(), *offset, &entry.shape, strides))
            }
        };
        Some(TensorView { shape: entry.shape.clone(), dtype: entry.dtype, bytes: data })
    }

    /// Releases the resident pages of `key`'s bytes in the mapping (see `Source::release`): for a tensor that has been
    /// copied out and will not be read again, so a checkpoint's weights are not held twice while a run loads them.
    pub fn release(&self, key: &str) {
        let Some(entry) = self.tensors.get(key) else { return };
        let range = match &entry.data {
            DataRef::Contiguous(range) => range.clone(),
            DataRef::Strided { storage, .. } => storage.clone(),
        };
        self.sources[entry.part].source.release(range);
    }

    /// Like [`Checkpoint::get`], but a missing key is an error naming the file and the nearest present key.
    pub fn tensor(&self, key: &str) -> Result<TensorView<'_>> {
        self.get(key).ok_or_else(|| self.missing(key))
    }

    /// The tensor's values as f32, whatever its stored dtype.
    pub fn to_f32(&self, key: &str) -> Result<Vec<f32>> {
        Ok(self.tensor(key)?.to_f32())
    }

    /// An owned copy, ready to hand to a backend.
    pub fn to_host(&self, key: &str) -> Result<HostTensor> {
        Ok(self.tensor(key)?.to_host())
    }

    /// Entries that are not readable tensors, with the reason: unsupported dtypes (bool, uint8, ...) and
    /// non-tensor values inside a state dict.
    pub fn skipped(&self) -> &BTreeMap<String, String> {
        &self.skipped
    }

    /// String metadata: a safetensors `__metadata__`, or the scalars beside a Lightning `state_dict` (`epoch`,
    /// `global_step`, ...).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The `model_config.yaml` of a `.nemo` archive.
    pub fn config_yaml(&self) -> Option<&str> {
        self.config_yaml.as_deref()
    }

    /// A view whose keys are relative to `prefix` (e.g. "control_model."), the way a model's modules name them.
    pub fn prefixed<'a>(&'a self, prefix: &str) -> Prefixed<'a> {
        Prefixed { ckpt: self, prefix: prefix.to_string() }
    }

    /// Renames every tensor (and skipped entry); two names mapping to one is an error naming both.
    pub fn rename_keys(&mut self, mut rename: impl FnMut(&str) -> String) -> Result<()> {
        self.remap(|k| Some((rename(k), 0)))
    }

    /// Renames (and, where `unit_dims` > 0, appends that many unit dimensions to the shape of) every tensor that
    /// `map` has a name for; the others keep their names and are listed in [`Checkpoint::unmapped`].
    fn remap(&mut self, mut map: impl FnMut(&str) -> Option<(String, usize)>) -> Result<()> {
        let mut renamed = BTreeMap::new();
        let mut origin: BTreeMap<String, String> = BTreeMap::new();
        for (key, mut entry) in std::mem::take(&mut self.tensors) {
            let new = match map(&key) {
                Some((new, unit_dims)) => {
                    // A trailing unit dimension changes neither the element order nor the byte size; a strided
                    // view keeps its strides for the real dimensions.
                    entry.shape.extend(std::iter::repeat_n(1, unit_dims));
                    if let DataRef::Strided { strides, .. } = &mut entry.data {
                        strides.extend(std::iter::repeat_n(1, unit_dims));
                    }
                    new
                }
                None => {
                    self.unmapped.push(key.clone());
                    key.clone()
                }
            };
            if let Some(first) = origin.insert(new.clone(), key.clone()) {
                return Err(Error::file(
                    &self.path,
                    format!("renaming keys maps both '{first}' and '{key}' to '{new}'"),
                ));
            }
            renamed.insert(new, entry);
        }
        self.tensors = renamed;
        self.skipped = std::mem::take(&mut self.skipped)
            .into_iter()
            .map(|(k, why)| (map(&k).map_or(k, |(new, _)| new), why))
            .collect();
        Ok(())
    }

    /// Renames NeMo's keys ([`nemo`]) to the original LDM/ControlNet names; a file in another layout is returned
    /// unchanged. A diffusers or Hugging Face file needs [`Checkpoint::into_ldm_keys_for`].
    pub fn into_ldm_keys(self) -> Result<Checkpoint> {
        self.into_ldm_keys_for(&Architecture::default())
    }

    /// Renames the keys of any layout zeroconv reads to the original LDM/ControlNet names: NeMo (by the container),
    /// diffusers U-Net / ControlNet / VAE and Hugging Face CLIP (detected from the keys, see [`diffusers`]). The
    /// diffusers block numbering comes from `arch`; a diffusers file of a component `arch` lacks is an error. An
    /// OpenCLIP text encoder (SD 2's `cond_stage_model.model.*`, or an open_clip `state_dict`) takes the Hugging Face
    /// CLIP names the text encoder reads ([`open_clip`]); so does NeMo's Megatron CLIP, as `arch.megatron_clip` describes
    /// it ([`megatron_clip`]).
    pub fn into_ldm_keys_for(mut self, arch: &Architecture) -> Result<Checkpoint> {
        let (is_nemo, wrapped, layout) = {
            let keys: Vec<&str> = self.keys().collect();
            let is_nemo = matches!(self.format, Format::Nemo { .. }) || nemo::is_nemo_layout(keys.iter().copied());
            (is_nemo, nemo::is_megatron_wrapped(keys.iter().copied()), diffusers::detect(&keys))
        };
        if is_nemo {
            self.rename_keys(|k| nemo::nemo_key_to_ldm(k, wrapped))?;
            self.rename_megatron_clip(arch.megatron_clip.as_ref())?;
            // An SD 2 model's OpenCLIP text encoder, now under the original LDM prefix.
            self.rename_open_clip(open_clip::SD2_PREFIX)?;
            for part in &mut self.sources {
                part.layout = Layout::Nemo;
            }
            return Ok(self);
        }
        let path = self.path.clone();
        let no_config = |what: &str| {
            Error::file(
                &path,
                format!(
                    "holds a {} (diffusers layout), but the run has no {what} config to number its blocks by",
                    layout.describe()
                ),
            )
        };
        match layout {
            // The original LDM names, with SD 2's OpenCLIP text encoder (when there is one) under its own.
            Layout::Ldm | Layout::Nemo => {
                self.rename_megatron_clip(arch.megatron_clip.as_ref())?;
                self.rename_open_clip(open_clip::SD2_PREFIX)?;
                return Ok(self);
            }
            Layout::OpenClip => self.rename_open_clip("")?,
            Layout::DiffusersUnet => {
                let blocks = diffusers::UnetBlocks::new(arch.unet.as_ref().ok_or_else(|| no_config("U-Net"))?);
                self.remap(|k| diffusers::unet_key(k, &blocks).map(|n| (n, 0)))?;
            }
            Layout::DiffusersControlNet => {
                let cfg = arch.control.clone().ok_or_else(|| no_config("ControlNet"))?;
                self.remap(|k| diffusers::controlnet_key(k, &cfg).map(|n| (n, 0)))?;
            }
            Layout::DiffusersVae => {
                let cfg = arch.vae.clone().ok_or_else(|| no_config("VAE (first stage)"))?;
                self.remap(|k| diffusers::vae_key(k, &cfg).map(|m| (m.key, m.unit_dims)))?;
            }
            Layout::HfClip => self.remap(|k| diffusers::clip_key(k).map(|n| (n, 0)))?,
        }
        for part in &mut self.sources {
            part.layout = layout;
        }
        Ok(self)
    }

    /// Opens what a `from_pretrained` or `--ckpt` names: a checkpoint file in any layout, a diffusers component
    /// folder (`unet/`, holding `diffusion_pytorch_model.safetensors`, ...) or a diffusers pipeline folder (its
    /// `unet/`, `controlnet/`, `vae/` and `text_encoder/`), with the keys renamed to the LDM names.
    pub fn open_pretrained(path: &Path, arch: &Architecture) -> Result<Checkpoint> {
        if !path.is_dir() {
            return Checkpoint::open(path)?.into_ldm_keys_for(arch);
        }
        let files = folder::weight_files(path)?;
        let parts = files
            .iter()
            .map(|f| Checkpoint::open(f).and_then(|c| c.into_ldm_keys_for(arch)))
            .collect::<Result<Vec<_>>>()?;
        Checkpoint::merge(path, parts)
    }

    /// One checkpoint of several files' tensors (named `path`); a key in two of them is an error naming both.
    fn merge(path: &Path, parts: Vec<Checkpoint>) -> Result<Checkpoint> {
        let mut all = Checkpoint {
            path: path.to_path_buf(),
            format: parts.first().map_or(Format::Safetensors, |p| p.format),
            sources: Vec::new(),
            tensors: BTreeMap::new(),
            skipped: BTreeMap::new(),
            metadata: BTreeMap::new(),
            config_yaml: None,
            unmapped: Vec::new(),
        };
        for part in parts {
            let base = all.sources.len();
            for (key, mut entry) in part.tensors {
                entry.part += base;
                if let Some(first) = all.tensors.get(&key) {
                    return Err(Error::file(
                        path,
                        format!(
                            "'{key}' is in both {} and {}",
                            all.sources[first.part].path.display(),
                            part.sources[entry.part - base].path.display()
                        ),
                    ));
                }
                all.tensors.insert(key, entry);
            }
            all.skipped.extend(part.skipped);
            all.metadata.extend(part.metadata);
            all.unmapped.extend(part.unmapped);
            all.sources.extend(part.sources);
        }
        Ok(all)
    }

    fn missing(&self, key: &str) -> Error {
        if let Some(why) = self.skipped.get(key) {
            return Error::file(&self.path, format!("'{key}' cannot be read: {why}"));
        }
        let hint =
            check::nearest(key, self.keys()).map(|k| format!(" (nearest present key: '{k}')")).unwrap_or_default();
        Error::file(&self.path, format!("no tensor '{key}' in the checkpoint{hint}"))
    }
}

/// A checkpoint seen through a key prefix: `get("conv.weight")` reads `<prefix>conv.weight`.
#[derive(Clone, Debug)]
pub struct Prefixed<'a> {
    ckpt: &'a Checkpoint,
    prefix: String,
}

impl<'a> Prefixed<'a> {
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.ckpt
    }

    /// Keys under the prefix, with the prefix removed, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &'a str> + '_ {
        let prefix = self.prefix.as_str();
        self.ckpt.keys().filter_map(move |k| k.strip_prefix(prefix))
    }

    pub fn get(&self, name: &str) -> Option<TensorView<'a>> {
        self.ckpt.get(&format!("{}{name}", self.prefix))
    }

    pub fn tensor(&self, name: &str) -> Result<TensorView<'a>> {
        self.ckpt.tensor(&format!("{}{name}", self.prefix))
    }

    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.ckpt.to_f32(&format!("{}{name}", self.prefix))
    }

    pub fn shape(&self, name: &str) -> Option<&'a [usize]> {
        self.ckpt.shape(&format!("{}{name}", self.prefix))
    }

    /// A deeper prefix: `ckpt.prefixed("model.").prefixed("diffusion_model.")`.
    pub fn prefixed(&self, more: &str) -> Prefixed<'a> {
        Prefixed { ckpt: self.ckpt, prefix: format!("{}{more}", self.prefix) }
    }
}

/// Copies a strided view into row-major order. The bounds were checked when the checkpoint was opened.
fn gather(storage: &[u8], elem: usize, offset: usize, shape: &[usize], strides: &[usize]) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel * elem);
    if numel == 0 {
        return out;
    }
    let Some((&inner, outer)) = shape.split_last() else {
        out.extend_from_slice(&storage[offset * elem..(offset + 1) * elem]);
        return out;
    };
    let inner_stride = strides[strides.len() - 1];
    let mut index = vec![0usize; outer.len()];
    loop {
        let base = offset + index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        if inner_stride == 1 {
            out.extend_from_slice(&storage[base * elem..(base + inner) * elem]);
        } else {
            for j in 0..inner {
                let at = (base + j * inner_stride) * elem;
                out.extend_from_slice(&storage[at..at + elem]);
            }
        }
        // Advance the outer multi-index like an odometer.
        let mut axis = outer.len();
        loop {
            if axis == 0 {
                return out;
            }
            axis -= 1;
            index[axis] += 1;
            if index[axis] < outer[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::gather;

    #[test]
    fn gather_transposes_and_slices() {
        // storage 0..12 as a 4x3 matrix; its transpose is shape [3, 4] with strides [1, 3].
        let storage: Vec<u8> = (0..12).collect();
        assert_eq!(gather(&storage, 1, 0, &[3, 4], &[1, 3]), vec![0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]);
        // Columns 1 and 2 of the 4x3 matrix: shape [4, 2], strides [3, 1], offset 1.
        assert_eq!(gather(&storage, 1, 1, &[4, 2], &[3, 1]), vec![1, 2, 4, 5, 7, 8, 10, 11]);
        // Two-byte elements keep their bytes together; a scalar is one element.
        assert_eq!(gather(&storage, 2, 0, &[2, 2], &[1, 2]), vec![0, 1, 4, 5, 2, 3, 6, 7]);
        assert_eq!(gather(&storage, 4, 2, &[], &[]), vec![8, 9, 10, 11]);
        assert!(gather(&storage, 4, 0, &[0, 3], &[3, 1]).is_empty());
    }
}
