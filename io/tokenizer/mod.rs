//! The CLIP tokenizer, giving the ids transformers' slow `CLIPTokenizer` gives with
//! `padding="max_length", max_length=77, truncation=True`: `[BOS] tokens [EOS] [pad]...`, cut so that EOS is
//! always kept last. Its text cleanup is either of CLIPTokenizer's two ([`TextCleanup`]): with the ftfy package
//! installed (the default, as SD was trained) or without.
//!
//! ```no_run
//! use std::path::Path;
//! use zeroconv::io::tokenizer::{ClipTokenizer, TokenizerOptions};
//!
//! let tokenizer = ClipTokenizer::from_path(Path::new("clip-vit-large-patch14"), TokenizerOptions::default())?;
//! let ids: Vec<u32> = tokenizer.encode("a photo of a cat"); // 77 ids: 49406, ..., 49407, 49407, ...
//! # Ok::<(), zeroconv::Error>(())
//! ```
//!
//! The steps, as in transformers: (1) the text is split around special tokens (BOS, EOS and the pad token are
//! matched literally and kept as single ids); (2) each other piece is cleaned ([`clean`]): by `ftfy.fix_text`
//! ([`ftfy`]), whitespace collapsed and lowercased, or by BERT's BasicTokenizer (control characters removed,
//! whitespace collapsed, CJK ideographs split apart, NFC, lowercased); (3) it is split by CLIP's regex into words, numbers (one
//! digit each), contractions and runs of other symbols; (4) each piece is BPE-encoded over its UTF-8 bytes.

mod bpe;
mod clean;
mod files;
pub mod ftfy;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use regex::Regex;

use crate::error::{Error, Result};
pub use crate::io::config::TextCleanup;
use crate::io::config::TextEncoderConfig;
use bpe::{byte_to_char_table, Merges, END_OF_WORD};

pub const BOS_TOKEN: &str = "<|startoftext|>";
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits, other symbol runs.
const SPLIT_PATTERN: &str =
    r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerOptions {
    /// Ids per caption, BOS and EOS included (CLIP: 77).
    pub max_length: usize,
    /// `<|endoftext|>` (SD 1.x, transformers' default) or `!` (id 0: SD 2.x / OpenCLIP).
    pub pad_token: String,
    /// The caption cleanup before BPE: ftfy (default) or BERT's BasicTokenizer.
    pub text_cleanup: TextCleanup,
}

impl Default for TokenizerOptions {
    fn default() -> Self {
        TokenizerOptions { max_length: 77, pad_token: EOS_TOKEN.to_string(), text_cleanup: TextCleanup::Ftfy }
    }
}

pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    id_to_token: HashMap<u32, String>,
    merges: Merges,
    split: Regex,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    /// Tokens matched literally in the input before cleaning (transformers' added tokens), longest first.
    special: Vec<(String, u32)>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
    text_cleanup: TextCleanup,
}

impl ClipTokenizer {
    /// From a vocabulary and merge list (already read).
    pub fn new(vocab: HashMap<String, u32>, merges: Vec<(String, String)>, options: TokenizerOptions) -> Result<Self> {
        if options.max_length < 2 {
            return Err(Error::msg(format!(
                "tokenizer max_length must be at least 2 (BOS and EOS), found {}",
                options.max_length
            )));
        }
        let id_of = |token: &str, role: &str| {
            vocab.get(token).copied().ok_or_else(|| {
                Error::msg(format!(
                    "the tokenizer's vocabulary has no {role} token {token:?}; is this a CLIP tokenizer?"
                ))
            })
        };
        let (bos_id, eos_id, pad_id) =
            (id_of(BOS_TOKEN, "BOS")?, id_of(EOS_TOKEN, "EOS")?, id_of(&options.pad_token, "pad")?);
        let mut special = vec![(BOS_TOKEN.to_string(), bos_id), (EOS_TOKEN.to_string(), eos_id)];
        if !special.iter().any(|(t, _)| *t == options.pad_token) {
            special.push((options.pad_token.clone(), pad_id));
        }
        special.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        let split = Regex::new(SPLIT_PATTERN).map_err(|e| Error::msg(format!("CLIP split pattern: {e}")))?;
        let byte_to_char = byte_to_char_table();
        let char_to_byte = byte_to_char.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let id_to_token = vocab.iter().map(|(t, &id)| (id, t.clone())).collect();
        Ok(ClipTokenizer {
            vocab,
            id_to_token,
            merges: Merges::new(merges),
            split,
            byte_to_char,
            char_to_byte,
            special,
            bos_id,
            eos_id,
            pad_id,
            max_length: options.max_length,
            text_cleanup: options.text_cleanup,
        })
    }

    /// From `vocab.json` and `merges.txt`.
    pub fn from_vocab_and_merges(vocab: &Path, merges: &Path, options: TokenizerOptions) -> Result<Self> {
        Self::new(files::read_vocab_json(vocab)?, files::read_merges_txt(merges)?, options)
    }

    /// From a Hugging Face `tokenizer.json` (its vocabulary and merges; the text handling is CLIPTokenizer's).
    pub fn from_tokenizer_json(path: &Path, options: TokenizerOptions) -> Result<Self> {
        let (vocab, merges) = files::read_tokenizer_json(path)?;
        Self::new(vocab, merges, options)
    }

    /// From a `tokenizer.json` file, or a directory holding `tokenizer.json` or `vocab.json` + `merges.txt`
    /// (directly or in a `tokenizer/` subdirectory, as in diffusers model folders).
    pub fn from_path(path: &Path, options: TokenizerOptions) -> Result<Self> {
        if path.is_file() {
            return Self::from_tokenizer_json(path, options);
        }
        for dir in [path.to_path_buf(), path.join("tokenizer")] {
            let (json, vocab, merges) = (dir.join("tokenizer.json"), dir.join("vocab.json"), dir.join("merges.txt"));
            if vocab.is_file() && merges.is_file() {
                return Self::from_vocab_and_merges(&vocab, &merges, options);
            }
            if json.is_file() {
                return Self::from_tokenizer_json(&json, options);
            }
        }
        Err(Error::file(path, "no tokenizer here: expected tokenizer.json, or vocab.json and merges.txt"))
    }

    /// The tokenizer `model.cond_stage_config` names: its `tokenizer` path, else `version` when that is a
    /// local directory. (zeroconv does not download: a Hugging Face model name must be downloaded first.)
    pub fn from_config(config: &TextEncoderConfig) -> Result<Self> {
        let options = TokenizerOptions {
            max_length: config.max_length as usize,
            pad_token: config.pad_token.clone(),
            text_cleanup: config.text_cleanup,
        };
        let path = match &config.tokenizer {
            Some(path) => path.clone(),
            None if Path::new(&config.version).is_dir() => PathBuf::from(&config.version),
            None => {
                return Err(Error::msg(format!(
                    "model.cond_stage_config: no tokenizer files: `version` ({}) is not a local directory; set \
                     model.cond_stage_config.tokenizer to a tokenizer.json or a directory with vocab.json and \
                     merges.txt",
                    config.version
                )))
            }
        };
        Self::from_path(&path, options)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    pub fn max_length(&self) -> usize {
        self.max_length
    }
    pub fn text_cleanup(&self) -> TextCleanup {
        self.text_cleanup
    }
    /// The same vocabulary with another caption cleanup.
    pub fn with_text_cleanup(mut self, text_cleanup: TextCleanup) -> Self {
        self.text_cleanup = text_cleanup;
        self
    }
    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }
    /// Merge rules in use.
    pub fn merge_count(&self) -> usize {
        self.merges.len()
    }

    /// The BPE tokens of `text`, without BOS/EOS (transformers' `tokenize`).
    pub fn tokenize(&self, text: &str) -> Vec<String> {
        let mut tokens = Vec::new();
        for piece in self.split_special(text) {
            match piece {
                Piece::Special(token, _) => tokens.push(token.to_string()),
                Piece::Text(text) => self.bpe_tokens(text, &mut tokens),
            }
        }
        tokens
    }

    /// `[BOS] ids [EOS]`, cut to at most max_length ids with EOS kept last; no padding.
    pub fn encode_unpadded(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        let mut tokens = Vec::new();
        for piece in self.split_special(text) {
            if ids.len() >= self.max_length - 1 {
                break;
            }
            match piece {
                Piece::Special(_, id) => ids.push(id),
                Piece::Text(text) => {
                    tokens.clear();
                    self.bpe_tokens(text, &mut tokens);
                    ids.extend(tokens.iter().map(|t| self.token_id(t)));
                }
            }
        }
        ids.truncate(self.max_length - 1);
        ids.push(self.eos_id);
        ids
    }

    /// Exactly max_length ids: [`Self::encode_unpadded`] padded with the pad id.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = self.encode_unpadded(text);
        ids.resize(self.max_length, self.pad_id);
        ids
    }

    /// A batch as one row-major `[texts.len(), max_length]` array.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Vec<u32> {
        texts.iter().flat_map(|t| self.encode(t.as_ref())).collect()
    }

    /// The text of `ids`, without BOS, EOS and padding (for logs and debugging).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for id in ids {
            if [self.bos_id, self.eos_id, self.pad_id].contains(id) {
                continue;
            }
            let Some(token) = self.id_to_token.get(id) else { continue };
            let token = token.replace(END_OF_WORD, " ");
            bytes.extend(token.chars().map(|c| self.char_to_byte.get(&c).copied().unwrap_or(b' ')));
        }
        String::from_utf8_lossy(&bytes).split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// Unknown tokens map to EOS, CLIP's unknown token.
    fn token_id(&self, token: &str) -> u32 {
        self.vocab.get(token).copied().unwrap_or(self.eos_id)
    }

    fn split_special<'t>(&self, text: &'t str) -> Vec<Piece<'t, '_>> {
        let mut pieces = Vec::new();
        let mut start = 0;
        let mut at = 0;
        while at < text.len() {
            match self.special.iter().find(|(token, _)| text[at..].starts_with(token.as_str())) {
                Some((token, id)) => {
                    if start < at {
                        pieces.push(Piece::Text(&text[start..at]));
                    }
                    pieces.push(Piece::Special(token, *id));
                    at += token.len();
                    start = at;
                }
                None => at += text[at..].chars().next().map_or(1, char::len_utf8),
            }
        }
        if start < text.len() {
            pieces.push(Piece::Text(&text[start..]));
        }
        pieces
    }

    /// A piece of caption (between special tokens) as the configured cleanup leaves it, before the split into
    /// words: what CLIPTokenizer's `_tokenize` splits.
    pub fn clean(&self, text: &str) -> String {
        match self.text_cleanup {
            TextCleanup::Ftfy => clean::ftfy(text),
            TextCleanup::Basic => clean::basic(text),
        }
    }

    fn bpe_tokens(&self, text: &str, out: &mut Vec<String>) {
        let cleaned = self.clean(text);
        for word in self.split.find_iter(&cleaned).map(|m| m.as_str()) {
            // The split pattern also matches special tokens typed in another case (`<|ENDOFTEXT|>` after
            // lowercasing); transformers' BPE cache returns them whole, so they become their ids.
            if word == BOS_TOKEN || word == EOS_TOKEN {
                out.push(word.to_string());
                continue;
            }
            let encoded: String = word.bytes().map(|b| self.byte_to_char[usize::from(b)]).collect();
            out.extend(self.merges.apply(&encoded));
        }
    }
}

enum Piece<'t, 's> {
    Text(&'t str),
    Special(&'s str, u32),
}
