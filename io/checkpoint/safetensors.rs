//! The `.safetensors` format: an 8-byte little-endian header length, a JSON header, then the raw tensor bytes.
//!
//! The header is validated completely before any tensor is handed out, so a damaged file fails at `open` with one
//! message that says what is wrong, instead of later as garbage weights or an out-of-bounds slice.

use super::view::byte_len;
use super::{DataRef, Index, TensorEntry};
use crate::engine::host_memory::human_bytes;
use crate::error::{Error, Result};
use crate::graph::DType;
use serde_json::Value;
use std::path::Path;

/// The reference implementation refuses headers above 100 MB; a larger length field means a corrupt file.
const MAX_HEADER_LEN: u64 = 100_000_000;

/// True when the bytes start like a safetensors file: a plausible header length followed by a JSON object.
pub(crate) fn looks_like(bytes: &[u8]) -> bool {
    bytes.len() >= 9
        && u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0xff; 8])) <= MAX_HEADER_LEN
        && bytes[8] == b'{'
}

/// The element type named in a header, with its size in bytes where zeroconv knows it.
enum HeaderDType {
    Supported(DType),
    /// A real safetensors dtype zeroconv cannot compute in (bool, u8, f8, ...): skipped, with its element size so
    /// its offsets can still be checked.
    Unsupported(usize),
    /// A name this reader has never seen: skipped; only bounds and overlaps can be checked.
    Unknown,
}

fn header_dtype(name: &str) -> HeaderDType {
    match name {
        "F32" => HeaderDType::Supported(DType::F32),
        "F16" => HeaderDType::Supported(DType::F16),
        "BF16" => HeaderDType::Supported(DType::BF16),
        "F64" => HeaderDType::Supported(DType::F64),
        "I64" => HeaderDType::Supported(DType::I64),
        "I32" => HeaderDType::Supported(DType::I32),
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => HeaderDType::Unsupported(1),
        "I16" | "U16" => HeaderDType::Unsupported(2),
        "U32" => HeaderDType::Unsupported(4),
        "U64" | "C64" => HeaderDType::Unsupported(8),
        _ => HeaderDType::Unknown,
    }
}

/// Parses and validates the header; tensor byte ranges are absolute offsets into `bytes`.
pub(crate) fn parse(bytes: &[u8], path: &Path) -> Result<Index> {
    let bad = |msg: String| Error::file(path, format!("not a valid safetensors file: {msg}"));
    let file_len = bytes.len() as u64;
    if bytes.len() < 8 {
        return Err(bad(format!("the file has only {file_len} bytes, less than the 8-byte header length")));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().map_err(|_| bad("unreadable length".into()))?);
    if header_len > MAX_HEADER_LEN {
        return Err(bad(format!(
            "the header length field says {} (more than the 100 MB limit): the file is corrupt or not safetensors",
            human_bytes(header_len)
        )));
    }
    if 8 + header_len > file_len {
        return Err(bad(format!(
            "the header says it is {} long but the file has only {}: truncated?",
            human_bytes(header_len),
            human_bytes(file_len)
        )));
    }
    let data_start = 8 + header_len as usize;
    let header: Value = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| bad(format!("the header is not valid JSON ({e})")))?;
    let Value::Object(fields) = header else {
        return Err(bad("the header is not a JSON object".into()));
    };

    let data_len = bytes.len() - data_start;
    let mut index = Index::default();
    // (begin, end, name) of every tensor, for the bounds and overlap checks done once all are known.
    let mut ranges: Vec<(usize, usize, String)> = Vec::with_capacity(fields.len());
    for (name, info) in &fields {
        if name == "__metadata__" {
            let Value::Object(meta) = info else {
                return Err(bad("__metadata__ is not a JSON object of strings".into()));
            };
            for (k, v) in meta {
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                index.metadata.insert(k.clone(), text);
            }
            continue;
        }
        let entry = |msg: &str| bad(format!("tensor '{name}': {msg}"));
        let dtype_name = info.get("dtype").and_then(Value::as_str).ok_or_else(|| entry("no \"dtype\" string"))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|dims| dims.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect())
            .ok_or_else(|| entry("\"shape\" is not a list of non-negative integers"))?;
        let offsets: Vec<usize> = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|o| o.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect())
            .ok_or_else(|| entry("\"data_offsets\" is not a list of non-negative integers"))?;
        let [begin, end] = offsets[..] else {
            return Err(entry(&format!("\"data_offsets\" has {} numbers, not [begin, end]", offsets.len())));
        };
        if begin > end {
            return Err(entry(&format!("data_offsets [{begin}, {end}] end before they begin")));
        }
        let elem_size = match header_dtype(dtype_name) {
            HeaderDType::Supported(d) => Some(d.size()),
            HeaderDType::Unsupported(size) => Some(size),
            HeaderDType::Unknown => None,
        };
        if let Some(size) = elem_size {
            let need = shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d));
            if need != Some(end - begin) {
                let need = need.map_or("more than the address space".to_string(), |n| format!("{n} bytes"));
                return Err(entry(&format!(
                    "data_offsets [{begin}, {end}] hold {} bytes but shape {shape:?} of {dtype_name} needs {need}",
                    end - begin
                )));
            }
        }
        ranges.push((begin, end, name.clone()));
        match header_dtype(dtype_name) {
            HeaderDType::Supported(dtype) => {
                debug_assert_eq!(byte_len(&shape, dtype), Some(end - begin));
                let data = DataRef::Contiguous(data_start + begin..data_start + end);
                index.tensors.insert(name.clone(), TensorEntry { dtype, shape, data, part: 0 });
            }
            _ => {
                index.skipped.insert(name.clone(), format!("dtype {dtype_name} is not supported by zeroconv"));
            }
        }
    }

    if let Some((_, end, name)) = ranges.iter().max_by_key(|r| r.1) {
        if *end > data_len {
            return Err(bad(format!(
                "the header describes {} of tensor data (tensor '{name}' ends there) but the file has only {} after \
                 the header: truncated?",
                human_bytes(*end as u64),
                human_bytes(data_len as u64)
            )));
        }
    }
    // Empty tensors occupy no bytes and may sit anywhere; every other pair must be disjoint.
    ranges.retain(|r| r.0 < r.1);
    ranges.sort();
    for pair in ranges.windows(2) {
        let ((b0, e0, n0), (b1, e1, n1)) = (&pair[0], &pair[1]);
        if e0 > b1 {
            return Err(bad(format!("tensors '{n0}' [{b0}, {e0}) and '{n1}' [{b1}, {e1}) overlap")));
        }
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    fn err(bytes: &[u8]) -> String {
        parse(bytes, Path::new("x.safetensors")).unwrap_err().to_string()
    }

    #[test]
    fn reads_offsets_relative_to_the_data_section() {
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BOOL","shape":[1],"data_offsets":[8,9]}}"#;
        let bytes = file(h, &[0; 9]);
        let index = parse(&bytes, Path::new("x")).unwrap();
        let start = 8 + h.len();
        assert!(matches!(&index.tensors["a"].data, DataRef::Contiguous(r) if *r == (start..start + 8)));
        assert!(index.skipped["b"].contains("BOOL"));
    }

    #[test]
    fn rejects_bad_shapes_offsets_and_overlaps() {
        let e = err(&file(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, &[0; 8]));
        assert!(e.contains("hold 8 bytes but shape [3] of F32 needs 12 bytes"), "{e}");
        let e = err(&file(r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}"#, &[0; 8]));
        assert!(e.contains("\"shape\" is not a list of non-negative integers"), "{e}");
        let e = err(&file(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, &[0; 8]));
        assert!(e.contains("end before they begin"), "{e}");
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        let e = err(&file(h, &[0; 12]));
        assert!(e.contains("'a' [0, 8) and 'b' [4, 12) overlap"), "{e}");
        let e = err(&file(r#"[1,2]"#, &[]));
        assert!(e.contains("not a JSON object"), "{e}");
        let e = err(&file(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &[0; 8]));
        assert!(
            e.contains("describes 16 B of tensor data") && e.contains("only 8 B") && e.contains("truncated?"),
            "{e}"
        );
        let e = err(&[1, 2, 3]);
        assert!(e.contains("only 3 bytes"), "{e}");
    }

    #[test]
    fn zero_sized_tensors_may_share_an_offset() {
        let h = r#"{"e":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let index = parse(&file(h, &[0; 8]), Path::new("x")).unwrap();
        assert_eq!(index.tensors.len(), 2);
    }
}
