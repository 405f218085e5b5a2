//! Writing `.safetensors`, atomically: a crash, a full disk or an error mid-write never leaves a corrupt or
//! half-written file at the target path, and the previous checkpoint there stays intact until the new one is
//! complete on disk.

use super::view::TensorView;
use crate::engine::HostTensor;
use crate::error::{Error, Result};
use crate::graph::DType;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Anything that can be written as a tensor: [`HostTensor`]s from a backend, or [`TensorView`]s of another
/// checkpoint (converting formats copies nothing but the bytes to the output).
pub trait AsTensorView {
    fn as_tensor_view(&self) -> TensorView<'_>;
}

impl AsTensorView for HostTensor {
    fn as_tensor_view(&self) -> TensorView<'_> {
        TensorView::from(self)
    }
}

impl AsTensorView for TensorView<'_> {
    fn as_tensor_view(&self) -> TensorView<'_> {
        TensorView { shape: self.shape.clone(), dtype: self.dtype, bytes: Cow::Borrowed(&self.bytes) }
    }
}

impl<T: AsTensorView + ?Sized> AsTensorView for &T {
    fn as_tensor_view(&self) -> TensorView<'_> {
        (**self).as_tensor_view()
    }
}

fn safetensors_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::I64 => "I64",
        DType::I32 => "I32",
    }
}

/// Writes `tensors` (and optional string metadata) to `path` as `.safetensors`, atomically (see
/// [`write_atomically`]). Tensors are laid out largest element first, then by name, as the reference writer
/// does, so every tensor starts aligned to its element size.
pub fn write_safetensors<N: AsRef<str>, T: AsTensorView>(
    path: &Path,
    tensors: &[(N, T)],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    write_atomically(path, |w| write_safetensors_to(w, tensors, metadata))
}

/// Serialises to any writer. Everything is validated before the first byte is written.
pub fn write_safetensors_to<N: AsRef<str>, T: AsTensorView>(
    w: &mut dyn Write,
    tensors: &[(N, T)],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let views: Vec<(&str, TensorView<'_>)> = tensors.iter().map(|(n, t)| (n.as_ref(), t.as_tensor_view())).collect();
    for (name, view) in &views {
        TensorView::new(view.shape.clone(), view.dtype, Cow::Borrowed(&view.bytes))
            .map_err(|e| Error::msg(format!("tensor '{name}': {e}")))?;
    }
    let entries: Vec<Entry> =
        views.iter().map(|(n, v)| Entry { name: n.to_string(), dtype: v.dtype, shape: v.shape.clone() }).collect();
    write_safetensors_streamed(w, &entries, metadata, |i| Ok(Cow::Borrowed(&views[i].1.bytes[..])))
}

/// A tensor to be written by [`write_safetensors_streamed`]: its name, dtype and shape.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Serialises tensors whose bytes are produced one at a time by `bytes(i)` (for `entries[i]`), in the file's order,
/// so a writer never holds more than one tensor (a checkpoint streamed from a program's buffers). Names, shapes and
/// dtypes are validated before the first byte is written; a tensor whose bytes do not match its shape is an error.
pub fn write_safetensors_streamed<'a>(
    w: &mut dyn Write,
    entries: &[Entry],
    metadata: Option<&BTreeMap<String, String>>,
    mut bytes: impl FnMut(usize) -> Result<Cow<'a, [u8]>>,
) -> Result<()> {
    let mut seen = BTreeSet::new();
    for e in entries {
        if e.name == "__metadata__" {
            return Err(Error::msg("a tensor cannot be named __metadata__ in a safetensors file"));
        }
        if !seen.insert(e.name.as_str()) {
            return Err(Error::msg(format!("tensor '{}' is given twice", e.name)));
        }
    }
    let size = |e: &Entry| e.shape.iter().product::<usize>() * e.dtype.size();
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|&a, &b| {
        let (ea, eb) = (&entries[a], &entries[b]);
        eb.dtype.size().cmp(&ea.dtype.size()).then(ea.name.cmp(&eb.name))
    });

    let mut header = Map::new();
    if let Some(meta) = metadata {
        let meta: Map<String, Value> = meta.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        header.insert("__metadata__".into(), Value::Object(meta));
    }
    let mut offset = 0usize;
    for &i in &order {
        let e = &entries[i];
        let end = offset + size(e);
        let mut info = Map::new();
        info.insert("dtype".into(), Value::from(safetensors_dtype(e.dtype)));
        info.insert("shape".into(), Value::from(e.shape.clone()));
        info.insert("data_offsets".into(), Value::from(vec![offset, end]));
        header.insert(e.name.clone(), Value::Object(info));
        offset = end;
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::msg(format!("header: {e}")))?;
    // Pad with spaces (valid JSON whitespace) so the data section starts 8-byte aligned.
    header.resize(header.len().next_multiple_of(8), b' ');

    let io = |e: std::io::Error| Error::msg(format!("write failed: {e}"));
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for &i in &order {
        let data = bytes(i)?;
        if data.len() != size(&entries[i]) {
            return Err(Error::msg(format!(
                "tensor '{}': {} bytes for a {:?} {} tensor of {} bytes",
                entries[i].name,
                data.len(),
                entries[i].shape,
                entries[i].dtype,
                size(&entries[i])
            )));
        }
        w.write_all(&data).map_err(io)?;
    }
    Ok(())
}

/// Distinguishes temporary files of concurrent writes from one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes the temporary file unless the write completed (also when `write` panics).
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Produces `path` atomically: `write` fills a temporary file in the same directory, which is flushed and
/// fsynced, then renamed over `path`, and the directory is fsynced so the rename itself survives a power loss.
/// If `write` fails (or panics) the temporary file is removed and `path` is untouched. Renaming also means a
/// reader that has the old file mapped keeps seeing the old bytes.
pub fn write_atomically(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let file_name =
        path.file_name().and_then(|n| n.to_str()).ok_or_else(|| Error::file(path, "the path does not name a file"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp = TempFile { path: dir.join(format!(".{file_name}.tmp-{}-{n}", std::process::id())), keep: false };
    let fail = |what: &str, e: &dyn std::fmt::Display| Error::file(path, format!("not written ({what}: {e})"));

    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp.path)
        .map_err(|e| fail(&format!("cannot create {}", temp.path.display()), &e))?;
    let mut out = BufWriter::with_capacity(8 << 20, file);
    write(&mut out).map_err(|e| fail("the previous file, if any, is unchanged", &e))?;
    let file = out.into_inner().map_err(|e| fail("flush", &e.error().to_string()))?;
    file.sync_all().map_err(|e| fail("fsync", &e))?;
    drop(file);
    fs::rename(&temp.path, path).map_err(|e| fail("rename", &e))?;
    let mut temp = temp;
    temp.keep = true;
    sync_dir(&dir).map_err(|e| fail("fsync of the directory", &e))?;
    Ok(())
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    // Directories cannot be opened for syncing on Windows; NTFS journals the rename itself.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, dtype: DType, shape: &[usize]) -> Entry {
        Entry { name: name.into(), dtype, shape: shape.to_vec() }
    }

    /// Streamed tensors are asked for in the file's order (largest element first, then by name), one at a time, and
    /// the file is what the whole-tensor writer writes.
    #[test]
    fn streamed_tensors_come_one_at_a_time_in_file_order() {
        let tensors = [
            ("b", HostTensor::from_f64([2], DType::F32, &[1.0, 2.0]).unwrap()),
            ("a", HostTensor::from_f64([3], DType::BF16, &[3.0, 4.0, 5.0]).unwrap()),
            ("c", HostTensor::from_f64([1], DType::F64, &[6.0]).unwrap()),
        ];
        let entries: Vec<Entry> = tensors.iter().map(|(n, t)| entry(n, t.dtype, t.shape.dims())).collect();
        let mut asked = Vec::new();
        let mut streamed = Vec::new();
        write_safetensors_streamed(&mut streamed, &entries, None, |i| {
            asked.push(entries[i].name.clone());
            Ok(Cow::Owned(tensors[i].1.bytes.clone()))
        })
        .unwrap();
        assert_eq!(asked, ["c", "b", "a"]);
        let mut whole = Vec::new();
        write_safetensors_to(&mut whole, &tensors, None).unwrap();
        assert_eq!(streamed, whole);
    }

    #[test]
    fn a_streamed_tensor_of_the_wrong_size_is_an_error() {
        let entries = [entry("w", DType::F32, &[4])];
        let err = write_safetensors_streamed(&mut Vec::new(), &entries, None, |_| Ok(Cow::Owned(vec![0u8; 12])))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tensor 'w': 12 bytes") && err.contains("16 bytes"), "{err}");
        let twice = [entry("w", DType::F32, &[1]), entry("w", DType::F32, &[1])];
        let err = write_safetensors_streamed(&mut Vec::new(), &twice, None, |_| Ok(Cow::Owned(vec![0u8; 4])))
            .unwrap_err()
            .to_string();
        assert!(err.contains("given twice"), "{err}");
    }
}
