//! `zeroconv tokenize`: how the config's tokenizer cuts captions, for people checking their data: each text's ids
//! (with BOS and EOS, before padding), its BPE tokens, and whether `max_length` cut it.

use crate::app::train::tokenizer;
use crate::error::{Error, Result};
use crate::io::config::load_config;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  zeroconv tokenize --config configs/controlnet_sd15.yaml \"a red house\" \"a cat, 4k\""
)]
pub struct TokenizeArgs {
    /// A NeMo-style YAML config whose `model.cond_stage_config` names the tokenizer (default: the built-in tiny
    /// config and its built-in vocabulary).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A config override (repeatable), e.g. `--set model.cond_stage_config.tokenizer=clip-vit-large-patch14/`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// One JSON object per text and line: {"text", "ids", "tokens", "truncated"}.
    #[arg(long)]
    pub json: bool,
    /// The captions.
    #[arg(required = true, value_name = "TEXT")]
    pub texts: Vec<String>,
}

pub fn run(args: &TokenizeArgs, out: &mut dyn Write) -> Result<()> {
    let cfg = load_config(args.config.as_deref(), &args.overrides)?;
    let tok = tokenizer(&cfg)?;
    let io = |e: std::io::Error| Error::msg(format!("stdout: {e}"));
    for text in &args.texts {
        let ids = tok.encode_unpadded(text);
        let all = tok.tokenize(text);
        // BOS and EOS take two of the ids; the tokens kept are those between them.
        let kept = ids.len().saturating_sub(2);
        let truncated = all.len() > kept;
        let tokens = &all[..kept.min(all.len())];
        if args.json {
            let line = serde_json::json!({ "text": text, "ids": ids, "tokens": tokens, "truncated": truncated });
            writeln!(out, "{line}").map_err(io)?;
        } else {
            writeln!(out, "{text:?}").map_err(io)?;
            writeln!(out, "  ids ({} of max_length {}): {ids:?}", ids.len(), tok.max_length()).map_err(io)?;
            writeln!(out, "  tokens: {tokens:?}").map_err(io)?;
            if truncated {
                writeln!(out, "  cut: {} tokens beyond max_length dropped", all.len() - kept).map_err(io)?;
            }
        }
    }
    Ok(())
}
