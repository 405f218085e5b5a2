//! Finding the weight files of a diffusers folder: a component folder (`unet/`, `vae/`, `controlnet/`,
//! `text_encoder/`) or a pipeline folder holding those components.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The component folders of a pipeline that zeroconv's models read (the tokenizer and scheduler folders hold no
/// weights; SDXL's `text_encoder_2` is not a model zeroconv has).
const COMPONENTS: [&str; 4] = ["unet", "controlnet", "vae", "text_encoder"];

/// The weight file names `save_pretrained` writes, preferred in this order: diffusers' and transformers'
/// safetensors, their fp16 variants, then the torch.save `.bin` files of older repositories.
const WEIGHT_FILES: [&str; 8] = [
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "pytorch_model.fp16.bin",
];

/// The files to read for `dir`: its own weight file (or shards) when it is a component folder, else those of each
/// component subfolder present.
pub(crate) fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if let Some(files) = component_files(dir)? {
        return Ok(files);
    }
    let mut files = Vec::new();
    for name in COMPONENTS {
        let sub = dir.join(name);
        if !sub.is_dir() {
            continue;
        }
        match component_files(&sub)? {
            Some(found) => files.extend(found),
            None => return Err(Error::file(&sub, format!("holds no weight file (looked for {})", looked_for()))),
        }
    }
    if files.is_empty() {
        return Err(Error::file(
            dir,
            format!(
                "is a folder but neither a diffusers component folder (with one of {}) nor a pipeline folder (with \
                 {}/)",
                looked_for(),
                COMPONENTS.join("/, ")
            ),
        ));
    }
    Ok(files)
}

fn looked_for() -> String {
    WEIGHT_FILES.join(", ")
}

/// A component folder's weight files: the first of [`WEIGHT_FILES`] present, or the shards a
/// `*.safetensors.index.json` lists; `None` when the folder has neither.
fn component_files(dir: &Path) -> Result<Option<Vec<PathBuf>>> {
    if let Some(name) = WEIGHT_FILES.iter().find(|n| dir.join(n).is_file()) {
        return Ok(Some(vec![dir.join(name)]));
    }
    for index in ["diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"] {
        let path = dir.join(index);
        if path.is_file() {
            return shards(&path).map(Some);
        }
    }
    Ok(None)
}

/// The files a sharded checkpoint's index names (`{"weight_map": {key: file}}`), each once, in name order.
fn shards(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::file(index, format!("cannot read: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(index, format!("not a shard index: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::file(index, "has no \"weight_map\" object"))?;
    let mut names: Vec<&str> = Vec::new();
    for file in map.values() {
        let name = file.as_str().ok_or_else(|| Error::file(index, "a weight_map value is not a file name"))?;
        // Shards live beside the index: a path that leaves the folder is refused.
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(Error::file(index, format!("names a shard outside its folder: {name:?}")));
        }
        names.push(name);
    }
    names.sort_unstable();
    names.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}
