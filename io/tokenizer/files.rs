//! Reading CLIP tokenizer files: `vocab.json` + `merges.txt` (what the slow tokenizer reads) or a Hugging Face
//! `tokenizer.json` (its `model` section holds the same vocabulary and merges).

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use super::bpe::END_OF_WORD;
use crate::error::{Error, Result};

/// The most merges transformers' CLIPTokenizer reads from merges.txt (CLIP's full merge list).
const MAX_MERGES: usize = 49152 - 256 - 2;

pub type Vocab = HashMap<String, u32>;
pub type MergeList = Vec<(String, String)>;

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))
}

pub fn read_vocab_json(path: &Path) -> Result<Vocab> {
    serde_json::from_str(&read(path)?)
        .map_err(|e| Error::file(path, format!("not a vocab.json (a map from token to id): {e}")))
}

/// Merges as transformers reads them: surrounding whitespace stripped, the `#version` header line skipped, at
/// most [`MAX_MERGES`] lines, each two symbols separated by a space.
pub fn read_merges_txt(path: &Path) -> Result<MergeList> {
    let text = read(path)?;
    let mut merges = Vec::new();
    let mut lines = text.trim().split('\n').enumerate().peekable();
    if lines.peek().is_some_and(|(_, line)| line.starts_with("#version")) {
        lines.next();
    }
    for (index, line) in lines.take(MAX_MERGES) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            [] => continue,
            [a, b] => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(Error::file(
                    path,
                    format!("line {}: expected two symbols separated by a space, found {line:?}", index + 1),
                ))
            }
        }
    }
    Ok(merges)
}

#[derive(Deserialize)]
struct TokenizerJson {
    model: ModelJson,
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
}

#[derive(Deserialize)]
struct ModelJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    vocab: Vocab,
    merges: Vec<MergeJson>,
    end_of_word_suffix: Option<String>,
}

/// tokenizers writes merges as `"a b"` (before 0.20) or `["a", "b"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum MergeJson {
    Joined(String),
    Pair([String; 2]),
}

#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
}

/// The vocabulary (added tokens included) and merges of a CLIP `tokenizer.json`.
pub fn read_tokenizer_json(path: &Path) -> Result<(Vocab, MergeList)> {
    let parsed: TokenizerJson =
        serde_json::from_str(&read(path)?).map_err(|e| Error::file(path, format!("not a tokenizer.json: {e}")))?;
    let model = parsed.model;
    if model.kind.as_deref().is_some_and(|k| k != "BPE") || model.end_of_word_suffix.as_deref() != Some(END_OF_WORD) {
        return Err(Error::file(
            path,
            format!(
                "not a CLIP tokenizer: expected a BPE model with end_of_word_suffix \"{END_OF_WORD}\", found {} with {:?}",
                model.kind.as_deref().unwrap_or("no type"),
                model.end_of_word_suffix
            ),
        ));
    }
    let mut merges = Vec::with_capacity(model.merges.len());
    for (index, merge) in model.merges.into_iter().enumerate() {
        let pair = match merge {
            MergeJson::Pair([a, b]) => (a, b),
            MergeJson::Joined(line) => match line.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => (a.to_string(), b.to_string()),
                _ => return Err(Error::file(path, format!("model.merges[{index}]: expected \"a b\", found {line:?}"))),
            },
        };
        merges.push(pair);
    }
    let mut vocab = model.vocab;
    for token in parsed.added_tokens {
        vocab.entry(token.content).or_insert(token.id);
    }
    Ok((vocab, merges))
}
