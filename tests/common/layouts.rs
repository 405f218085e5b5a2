//! The layout fixtures (tests/fixtures/layouts/): diffusers component folders rebuilt from the headers diffusers'
//! `save_pretrained` wrote and the parity weight generator, and the whole-file CLIP folders copied out.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The test fixtures folder.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The parity fixtures' weight generator.
pub fn generated(key: &str, shape: &[usize]) -> Vec<f32> {
    super::parity_weights(key, shape)
}

/// The LDM keys and shapes of parity fixture `name`.
pub fn ldm_keys(name: &str) -> Vec<(String, Vec<usize>)> {
    let text = std::fs::read_to_string(fixtures().join(format!("parity/{name}.keys.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Rebuilds a diffusers component folder under `into`: its `config.json`, and the weight file from the header
/// save_pretrained wrote followed by each tensor's generated values (those of the LDM key diffusers' conversion
/// took it from), in the header's offset order.
pub fn rebuild(component: &str, into: &Path) -> PathBuf {
    let from = fixtures().join("layouts").join(component);
    let out = into.join(Path::new(component).file_name().unwrap());
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(from.join("config.json"), out.join("config.json")).unwrap();
    let header = std::fs::read(from.join("diffusion_pytorch_model.safetensors.header")).unwrap();
    let meta: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header[8..]).unwrap();
    let sources: BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(from.join("ldm_sources.json")).unwrap()).unwrap();
    let parity = if component.starts_with("vae") { "vae_tiny" } else { "sd15_tiny" };
    let shapes: BTreeMap<String, Vec<usize>> = ldm_keys(parity).into_iter().collect();
    let mut entries: Vec<(u64, u64, &str)> = meta
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let off = v["data_offsets"].as_array().unwrap();
            (off[0].as_u64().unwrap(), off[1].as_u64().unwrap(), k.as_str())
        })
        .collect();
    entries.sort();
    let mut bytes = header.clone();
    for (start, end, key) in entries {
        assert_eq!((bytes.len() - header.len()) as u64, start, "{component}: {key} is not next in the file");
        let ldm = &sources[key];
        bytes.extend(generated(ldm, &shapes[ldm]).iter().flat_map(|v| v.to_le_bytes()));
        assert_eq!((bytes.len() - header.len()) as u64, end, "{component}: {key} and {ldm} differ in size");
    }
    std::fs::write(out.join("diffusion_pytorch_model.safetensors"), bytes).unwrap();
    out
}

/// Copies a fixture folder of whole files (the CLIP text encoders) under `into` as `name`.
pub fn copy_folder(from: &str, into: &Path, name: &str) -> PathBuf {
    let out = into.join(name);
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(fixtures().join("layouts").join(from)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), out.join(entry.file_name())).unwrap();
    }
    out
}
