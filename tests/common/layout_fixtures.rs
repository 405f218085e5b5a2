//! The tiny models' weights in the layouts zeroconv reads, as the layout tests and the sampling comparison load them:
//! LDM-layout files from the parity weight generator, and diffusers folders rebuilt from the files diffusers'
//! save_pretrained wrote (tests/fixtures/layouts/README.md).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use zeroconv::engine::HostTensor;
use zeroconv::graph::DType;
use zeroconv::io::checkpoint::write_safetensors;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The parity fixtures' weight generator: the tensor of LDM key `key`.
pub fn generated(key: &str, shape: &[usize]) -> Vec<f32> {
    super::parity_weights(key, shape)
}

/// The LDM keys and shapes of parity fixture `name` (sd15_tiny, vae_tiny, clip_tiny, ...).
pub fn ldm_keys(name: &str) -> Vec<(String, Vec<usize>)> {
    let text = std::fs::read_to_string(fixtures().join(format!("parity/{name}.keys.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// One LDM-layout safetensors file at `path` with the generated weights of every key of the parity fixtures
/// `names`, as a full SD checkpoint holds all its components in one file.
pub fn write_ldm_file(names: &[&str], path: &Path) {
    let all: Vec<(String, HostTensor)> = names
        .iter()
        .flat_map(|n| ldm_keys(n))
        .map(|(k, s)| {
            let v: Vec<f64> = generated(&k, &s).iter().map(|&v| v as f64).collect();
            (k, HostTensor::from_f64(s, DType::F32, &v).unwrap())
        })
        .collect();
    write_safetensors(path, &all, None).unwrap();
}

/// Rebuilds a diffusers component folder (`sd15_tiny/unet`, `sd15_tiny/controlnet`, `vae_tiny/vae`) under `into`:
/// its `config.json`, and the weight file from the header save_pretrained wrote followed by each tensor's generated
/// values (those of the LDM key diffusers' conversion took it from), in the header's offset order.
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
        bytes.extend(super::parity_weights(ldm, &shapes[ldm]).iter().flat_map(|v| v.to_le_bytes()));
        assert_eq!((bytes.len() - header.len()) as u64, end, "{component}: {key} and {ldm} differ in size");
    }
    std::fs::write(out.join("diffusion_pytorch_model.safetensors"), bytes).unwrap();
    out
}

/// Copies a layout fixture folder of whole files (the CLIP text encoders) under `into` as `name`.
pub fn copy_folder(from: &str, into: &Path, name: &str) -> PathBuf {
    let out = into.join(name);
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(fixtures().join("layouts").join(from)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), out.join(entry.file_name())).unwrap();
    }
    out
}

/// A diffusers pipeline folder under `into`/`name` (unet/, controlnet/, vae/ and the transformers-written
/// text_encoder/ `text_encoder` names under clip_tiny/).
pub fn pipeline_folder(into: &Path, name: &str, text_encoder: &str) -> PathBuf {
    let pipe = into.join(name);
    std::fs::create_dir_all(&pipe).unwrap();
    rebuild("sd15_tiny/unet", &pipe);
    rebuild("sd15_tiny/controlnet", &pipe);
    rebuild("vae_tiny/vae", &pipe);
    copy_folder(&format!("clip_tiny/{text_encoder}"), &pipe, "text_encoder");
    pipe
}
