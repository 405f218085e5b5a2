//! PyTorch checkpoints (`.ckpt`, `.pth`, `.pt`) in the zip format `torch.save` has written since 1.6:
//! `<archive>/data.pkl` (the pickled object) and one `<archive>/data/<key>` record per storage.
//!
//! torch writes every record uncompressed ("stored"), so a storage is a byte range of the file: only the zip's
//! central directory and `data.pkl` are read; tensors are sliced out of the mapping when asked for.
//!
//! Every record the checkpoint's tensors come from (and `data.pkl`) is checked against its zip CRC-32 when the
//! checkpoint is opened, once per record, so a flipped byte is an error naming the record and the tensor rather
//! than a silently wrong weight. Records no tensor reads (optimizer states, unsupported dtypes) are not read.

use super::pickle::{self, StorageDType, TensorRef, Value};
use super::{DataRef, Index, TensorEntry};
use crate::engine::host_memory::human_bytes;
use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::io::Cursor;
use std::ops::Range;
use std::path::Path;

/// The bytes a pickle protocol-2 legacy `torch.save` (before 1.6, or `_use_new_zipfile_serialization=False`)
/// starts with: PROTO 2, then LONG1 of its magic number 0x1950a86a20f9469cfc6c.
const LEGACY_MAGIC: [u8; 14] = [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

pub(crate) fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06")
}

pub(crate) fn is_legacy(bytes: &[u8]) -> bool {
    bytes.starts_with(&LEGACY_MAGIC)
}

pub(crate) fn legacy_error(path: &Path) -> Error {
    Error::file(
        path,
        "this is PyTorch's legacy (pre-1.6, non-zip) checkpoint format, which zeroconv does not read: re-save it \
         with a recent torch (`torch.save(torch.load(p), p)`) or convert it to .safetensors",
    )
}

/// One zip record: where its bytes are, relative to the start of the zip.
struct Record {
    range: Range<usize>,
    /// The CRC-32 the zip's central directory gives for the record's (uncompressed) bytes.
    crc: u32,
    /// The zip compression method, when not "stored" (torch never compresses; a re-zipped archive might).
    compressed: Option<String>,
}

/// Reads the zip at `bytes`; tensor ranges are returned as offsets into the enclosing source, i.e. shifted by
/// `base` (non-zero when the zip is a member of a `.nemo` tar that is itself mapped).
pub(crate) fn parse(bytes: &[u8], base: usize, path: &Path) -> Result<Index> {
    let records = read_records(bytes, path)?;
    let pkl_name = records
        .keys()
        .filter(|n| n.rsplit_once('/').is_some_and(|(_, file)| file == "data.pkl"))
        .min_by_key(|n| n.len())
        .cloned()
        .ok_or_else(|| {
            let mut names: Vec<&str> = records.keys().map(String::as_str).collect();
            names.sort_unstable();
            names.truncate(8);
            Error::file(
                path,
                format!(
                    "a zip archive without <archive>/data.pkl, so not a torch.save checkpoint (it holds: {})",
                    names.join(", ")
                ),
            )
        })?;
    let prefix = pkl_name.strip_suffix("data.pkl").unwrap_or_default().to_string();
    let record_bytes = |name: &str| -> Result<&[u8]> {
        let rec = &records[name];
        if let Some(method) = &rec.compressed {
            return Err(Error::file(
                path,
                format!("zip record {name} is compressed ({method}); torch.save stores records uncompressed, so the archive was re-packed: re-save it with torch"),
            ));
        }
        let data = &bytes[rec.range.clone()];
        check_crc(name, rec.crc, data).map_err(|e| Error::file(path, e))?;
        Ok(data)
    };

    if records.contains_key(&format!("{prefix}byteorder")) {
        let order = record_bytes(&format!("{prefix}byteorder"))?;
        if order != b"little" {
            return Err(Error::file(
                path,
                format!(
                    "saved on a {} machine; only little-endian checkpoints are supported",
                    String::from_utf8_lossy(order)
                ),
            ));
        }
    }

    let root = pickle::unpickle(record_bytes(&pkl_name)?).map_err(|e| Error::file(path, format!("{pkl_name}: {e}")))?;
    let (state_dict, top_level) = select_state_dict(&root).map_err(|e| Error::file(path, e))?;
    let (state_dict, top_level) = (&state_dict, top_level.as_ref());

    let mut index = Index::default();
    let mut verified = HashSet::new();
    if let Some(top) = top_level {
        // A Lightning-style wrapper: its scalars (epoch, global_step, versions) are the checkpoint's metadata.
        for (key, value) in dict_items(top) {
            if let (Value::Str(k), Some(text)) = (&key, value.scalar_text()) {
                index.metadata.insert(k.to_string(), text);
            }
        }
    }
    for (key, value) in dict_items(state_dict) {
        let key = match key {
            Value::Str(s) => s.to_string(),
            other => {
                index.skipped.insert(format!("<{} key>", other.describe()), "state-dict keys must be strings".into());
                continue;
            }
        };
        match &value {
            Value::Tensor(t) => match tensor_entry(t, &prefix, &records, base, bytes, &mut verified) {
                Ok(Loaded::Tensor(entry)) => {
                    index.tensors.insert(key, entry);
                }
                Ok(Loaded::Unsupported(dtype)) => {
                    index.skipped.insert(key, format!("dtype {dtype} is not supported by zeroconv"));
                }
                Err(e) => return Err(Error::file(path, format!("tensor '{key}': {e}"))),
            },
            other if top_level.is_none() && other.scalar_text().is_some() => {
                // A flat dict mixing tensors and scalars ({"epoch": 3, "w": ...}): the scalars are metadata.
                index.metadata.insert(key, other.scalar_text().unwrap_or_default());
            }
            other => {
                index.skipped.insert(key, format!("{} is not a tensor", other.describe()));
            }
        }
    }
    if index.tensors.is_empty() && !dict_items(state_dict).is_empty() {
        // Most likely the weights are nested under a key this reader does not guess (e.g. {"model": {...}}).
        let entries: Vec<String> = index.skipped.iter().take(10).map(|(k, why)| format!("{k} ({why})")).collect();
        return Err(Error::file(
            path,
            format!(
                "no tensor zeroconv can read at the top level or under 'state_dict'; entries: {}",
                if entries.is_empty() { "only scalars".to_string() } else { entries.join(", ") }
            ),
        ));
    }
    Ok(index)
}

fn read_records(bytes: &[u8], path: &Path) -> Result<HashMap<String, Record>> {
    let damaged = |e: zip::result::ZipError| {
        Error::file(
            path,
            format!("the zip archive is damaged or truncated ({e}); re-download or re-save the checkpoint"),
        )
    };
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(damaged)?;
    let mut records = HashMap::with_capacity(archive.len());
    for i in 0..archive.len() {
        let file = archive.by_index_raw(i).map_err(damaged)?;
        let name = file.name().map_err(damaged)?.into_owned();
        let start = file.data_start().ok_or_else(|| Error::file(path, format!("zip record {name}: no data offset")))?;
        let end = start.saturating_add(file.compressed_size());
        if end > bytes.len() as u64 {
            return Err(Error::file(
                path,
                format!(
                    "zip record {name} ends at {} but the archive has only {}: truncated?",
                    human_bytes(end),
                    human_bytes(bytes.len() as u64)
                ),
            ));
        }
        let compressed = match file.compression() {
            zip::CompressionMethod::Stored if !file.encrypted() => None,
            method => Some(if file.encrypted() { "encrypted".to_string() } else { format!("{method}") }),
        };
        records.insert(name, Record { range: start as usize..end as usize, crc: file.crc32(), compressed });
    }
    Ok(records)
}

/// The dict holding the weights: the top-level dict, or its `state_dict` entry when there is one (Lightning and
/// the original LDM/ControlNet checkpoints). Returns the state dict and, if it was nested, the top-level dict.
fn select_state_dict(root: &Value) -> std::result::Result<(Value, Option<Value>), String> {
    if !matches!(root, Value::Dict(_)) {
        return Err(format!(
            "data.pkl holds {}, not a dict of tensors (a whole pickled model is not supported: save its state_dict())",
            root.describe()
        ));
    }
    match dict_get(root, "state_dict") {
        Some(sd @ Value::Dict(_)) => Ok((sd, Some(root.clone()))),
        _ => Ok((root.clone(), None)),
    }
}

fn dict_items(v: &Value) -> Vec<(Value, Value)> {
    match v {
        Value::Dict(d) => d.borrow().clone(),
        _ => Vec::new(),
    }
}

/// The value of a string key (the last one set wins, as in Python); values are cheap `Rc` clones.
fn dict_get(dict: &Value, key: &str) -> Option<Value> {
    let Value::Dict(d) = dict else { return None };
    let found =
        d.borrow().iter().rev().find(|(k, _)| matches!(k, Value::Str(s) if &**s == key)).map(|(_, v)| v.clone());
    found
}

/// What a state-dict tensor turns out to be.
enum Loaded {
    Tensor(TensorEntry),
    /// A dtype zeroconv does not compute in (bool, uint8, ...), by name.
    Unsupported(String),
}

/// Checks a record's bytes against the CRC-32 of the zip directory.
fn check_crc(name: &str, expected: u32, data: &[u8]) -> std::result::Result<(), String> {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    let got = crc.sum();
    if got != expected {
        return Err(format!(
            "zip record {name} is damaged: its CRC-32 is {got:08x}, the archive says {expected:08x}; re-download or \
             re-save the checkpoint"
        ));
    }
    Ok(())
}

/// Validates a tensor against its storage record, and the record against its CRC-32 (once per record: `verified`
/// holds the records already checked; tensors may share a storage).
fn tensor_entry(
    t: &TensorRef,
    prefix: &str,
    records: &HashMap<String, Record>,
    base: usize,
    zip: &[u8],
    verified: &mut HashSet<String>,
) -> std::result::Result<Loaded, String> {
    let dtype = match &t.storage.dtype {
        StorageDType::Supported(d) => *d,
        StorageDType::Unsupported { name, .. } => return Ok(Loaded::Unsupported(name.clone())),
    };
    let to_usize = |v: u64| usize::try_from(v).map_err(|_| format!("{v} does not fit in memory"));
    let shape: Vec<usize> = t.shape.iter().map(|&d| to_usize(d)).collect::<std::result::Result<_, _>>()?;
    let strides: Vec<usize> = t.strides.iter().map(|&d| to_usize(d)).collect::<std::result::Result<_, _>>()?;
    let offset = to_usize(t.offset)?;
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("its shape overflows")?;
    if numel == 0 {
        return Ok(Loaded::Tensor(TensorEntry { dtype, shape, data: DataRef::Contiguous(0..0), part: 0 }));
    }
    let record_name = format!("{prefix}data/{}", t.storage.key);
    let rec = records
        .get(&record_name)
        .ok_or_else(|| format!("its storage record {record_name} is missing from the archive"))?;
    if let Some(method) = &rec.compressed {
        return Err(format!(
            "its storage record {record_name} is compressed ({method}); re-save the checkpoint with torch"
        ));
    }
    let elem = dtype.size();
    let storage_len = rec.range.len();
    let declared = to_usize(t.storage.numel)?.checked_mul(elem).ok_or("its storage size overflows")?;
    if declared > storage_len {
        return Err(format!(
            "its storage declares {} but record {record_name} holds {}: truncated?",
            human_bytes(declared as u64),
            human_bytes(storage_len as u64)
        ));
    }
    // The last element the view touches must lie inside the storage.
    let last = shape
        .iter()
        .zip(&strides)
        .try_fold(offset, |acc, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x)));
    let last = last.ok_or("its strides overflow")?;
    if last >= declared / elem {
        return Err(format!(
            "shape {shape:?} with strides {strides:?} at offset {offset} reaches element {last} of a storage of {} elements",
            declared / elem
        ));
    }
    debug_assert!(rec.range.end <= zip.len());
    if !verified.contains(&record_name) {
        check_crc(&record_name, rec.crc, &zip[rec.range.clone()])?;
        verified.insert(record_name);
    }
    let storage = base + rec.range.start..base + rec.range.start + declared;
    if is_contiguous(&shape, &strides) {
        let start = storage.start + offset * elem;
        Ok(Loaded::Tensor(TensorEntry {
            dtype,
            shape,
            data: DataRef::Contiguous(start..start + numel * elem),
            part: 0,
        }))
    } else {
        Ok(Loaded::Tensor(TensorEntry { dtype, shape, data: DataRef::Strided { storage, offset, strides }, part: 0 }))
    }
}

/// Row-major contiguous, ignoring the strides of size-1 dimensions (torch leaves arbitrary values there).
fn is_contiguous(shape: &[usize], strides: &[usize]) -> bool {
    let mut expected = 1;
    for (&d, &s) in shape.iter().zip(strides).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected *= d;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity_ignores_unit_dimensions() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[2, 1, 3], &[3, 99, 1]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
        assert!(is_contiguous(&[], &[]));
    }

    #[test]
    fn recognises_the_legacy_format() {
        let mut legacy = LEGACY_MAGIC.to_vec();
        legacy.extend(b".rest");
        assert!(is_legacy(&legacy));
        assert!(!is_legacy(b"PK\x03\x04"));
    }
}
