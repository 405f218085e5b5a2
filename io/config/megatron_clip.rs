//! `FrozenMegatronCLIPEmbedder`, NeMo's own CLIP as an SD text encoder (NeMo's SD 2-style configs), settled on the
//! config tree: the class builds its text tower from a CLIP model config, `cfg` written in the section or the
//! `model_config.yaml` of the CLIP `.nemo` that `restore_from_path` names (which then wins, as in NeMo: both given is
//! refused here, since one of them would be ignored). That config becomes zeroconv's keys:
//!
//! | NeMo CLIP config | zeroconv |
//! | --- | --- |
//! | `text.hidden_size`, `text.num_layers`, `text.num_attention_heads`, `text.ffn_hidden_size` | `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `intermediate_size` |
//! | `text.max_position_embeddings` (the class tokenizes to it) | `max_position_embeddings` and `max_length` |
//! | `text.megatron_legacy` | `megatron.megatron_legacy` (the row order of `query_key_value`) |
//! | `make_vocab_size_divisible_by` × `tensor_model_parallel_size` (128 × 1 unset) | `megatron.vocab_padding` |
//! | the Hugging Face tokenizer (`tokenizer.library: huggingface`), whose pad is its EOS | `pad_token: <\|endoftext\|>` |
//!
//! A written zeroconv key must agree. The tower zeroconv computes is NeMo's for these values only, so others are
//! refused naming the key: `text.activation` other than `gelu`, `text.openai_gelu` or `text.bias_activation_fusion`
//! true (both the tanh approximation of GELU; NeMo's default for the fusion is true, so it must be written false),
//! `text.normalization` other than `layernorm`, `text.layernorm_epsilon` other than 1e-5, `text.position_embedding_type`
//! other than `learned_parameters` (the class adds `position_embeddings` as a parameter), a `text.kv_channels` other
//! than the head width, `text.pre_process: false` (no embeddings), another tokenizer library. The vision tower's and
//! the training keys of the CLIP config do not touch the text tower and are not read. `layer` is `last` (the class's
//! default) or `penultimate`; `always_return_pooled` and `enable_lora_finetune` must be false.
//!
//! The tokenizer files and the vocabulary size stay zeroconv's keys (`tokenizer`, `vocab_size`: NeMo names a Hugging
//! Face tokenizer, which zeroconv does not download). With `restore_from_path` and no `from_pretrained`, the weights
//! are that `.nemo`'s (its `model.text_encoder.*`).

use super::interpolate;
use super::node::{Entry, Node, Origin, Value};
use super::scalar::{resolve_plain, Resolved};
use super::text_encoder::{imply, text_of, SECTION};
use super::yaml;
use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;
use std::path::Path;
use std::sync::Arc;

const CLASS: &str = "FrozenMegatronCLIPEmbedder";

/// Fills in (or checks) the keys `FrozenMegatronCLIPEmbedder`'s CLIP config implies, and replaces `restore_from_path`
/// and `cfg` by `megatron`.
pub fn resolve(section: &mut Node, origin: &Origin) -> Result<()> {
    for key in ["always_return_pooled", "enable_lora_finetune"] {
        if let Some(node) = section.get(key).filter(|n| !n.is_null()) {
            if !matches!(plain(node), Some(Resolved::Bool(false))) {
                return Err(Error::msg(format!(
                    "{}: {SECTION}.{key} is {}, but zeroconv's {CLASS} offers only false",
                    node.origin,
                    node.describe()
                )));
            }
        }
    }
    if let Some((arch, at)) = text_of(section, "arch")? {
        return Err(Error::msg(format!(
            "{at}: {SECTION}.arch: {arch} is an OpenCLIP architecture, but {SECTION}._target_ names {CLASS}, which \
             takes its architecture from restore_from_path or cfg"
        )));
    }
    if let Some((layer, at)) = text_of(section, "layer")? {
        if layer != "last" && layer != "penultimate" {
            return Err(Error::msg(format!(
                "{at}: {SECTION}.layer is {layer}, but {CLASS} offers only last and penultimate"
            )));
        }
    }
    let restore = text_of(section, "restore_from_path")?.map(|(p, at)| (p.to_string(), at.clone()));
    let inline = section.get("cfg").filter(|n| !n.is_null()).cloned();
    let cfg = match (restore, inline) {
        (Some((_, at)), Some(_)) => {
            return Err(Error::msg(format!(
                "{at}: {SECTION}: both restore_from_path and cfg are given; {CLASS} takes the CLIP config from the \
                 .nemo and ignores cfg: remove one"
            )))
        }
        (None, None) => {
            return Err(Error::msg(format!(
                "{origin}: {SECTION}: {CLASS} needs restore_from_path (a NeMo CLIP .nemo) or cfg (a NeMo CLIP model \
                 config), as in NeMo"
            )))
        }
        (None, Some(cfg)) => cfg,
        (Some((path, at)), None) => {
            let cfg = restore_config(Path::new(&path), &at)?;
            if section.get("from_pretrained").is_none_or(Node::is_null) {
                set(section, "from_pretrained", Node::new(Value::Scalar { text: path, quoted: true }, at));
            }
            cfg
        }
    };
    let megatron = from_clip_config(section, &cfg)?;
    if let Value::Map(entries) = &mut section.value {
        entries.retain(|e| e.key != "restore_from_path" && e.key != "cfg");
    }
    set(section, "megatron", megatron);
    Ok(())
}

/// The `model_config.yaml` of the CLIP `.nemo` at `path`, its interpolations resolved within it.
fn restore_config(path: &Path, at: &Origin) -> Result<Node> {
    let context = |e: Error| Error::msg(format!("{at}: {SECTION}.restore_from_path: {e}"));
    let nemo = Checkpoint::open(path).map_err(context)?;
    let Some(text) = nemo.config_yaml() else {
        return Err(context(Error::file(path, "holds no model_config.yaml: not a NeMo model archive")));
    };
    let doc = yaml::parse_document(text, &Arc::from(format!("{}:model_config.yaml", path.display()).as_str()))?;
    Ok(interpolate::resolve(&doc))
}

fn plain(node: &Node) -> Option<Resolved<'_>> {
    match &node.value {
        Value::Scalar { text, quoted: false } => Some(resolve_plain(text)),
        _ => None,
    }
}

/// A CLIP config key's value; `Err` if it cannot be computed.
fn read<'a>(cfg: &'a Node, path: &[&str]) -> Result<Option<&'a Node>> {
    let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
    match cfg.lookup(&path) {
        Some(node) if node.is_null() => Ok(None),
        Some(Node { value: Value::Invalid(msg), origin, .. }) => {
            Err(Error::msg(format!("{origin}: {}: {msg}", path.join("."))))
        }
        other => Ok(other),
    }
}

fn int(cfg: &Node, path: &[&str]) -> Result<Option<i64>> {
    let Some(node) = read(cfg, path)? else { return Ok(None) };
    match plain(node) {
        Some(Resolved::Int(i)) if i > 0 => Ok(Some(i)),
        _ => Err(Error::msg(format!(
            "{}: {}: must be a positive integer, found {}",
            node.origin,
            path.join("."),
            node.describe()
        ))),
    }
}

fn required_int(cfg: &Node, path: &[&str]) -> Result<i64> {
    int(cfg, path)?.ok_or_else(|| Error::msg(format!("{}: {} is required by {CLASS}", cfg.origin, path.join("."))))
}

/// Refuses a CLIP config value zeroconv does not compute: `ok` says whether the value (None: unset) is one it does.
fn only(cfg: &Node, path: &[&str], ok: impl Fn(Option<&Node>) -> bool, why: &str) -> Result<()> {
    let node = read(cfg, path)?;
    if ok(node) {
        return Ok(());
    }
    let (at, value) =
        node.map_or_else(|| (cfg.origin.to_string(), "unset".to_string()), |n| (n.origin.to_string(), n.describe()));
    Err(Error::msg(format!("{at}: {CLASS}'s CLIP config: {} is {value}, but {why}", path.join("."))))
}

fn is_text(node: Option<&Node>, want: &str) -> bool {
    node.is_some_and(|n| matches!(&n.value, Value::Scalar { text, .. } if text.eq_ignore_ascii_case(want)))
}

fn is_bool(node: Option<&Node>, want: bool) -> bool {
    node.is_some_and(|n| matches!(plain(n), Some(Resolved::Bool(b)) if b == want))
}

/// Checks the CLIP config `cfg`, implies zeroconv's keys from it and returns the `megatron` section.
fn from_clip_config(section: &mut Node, cfg: &Node) -> Result<Node> {
    if !matches!(cfg.value, Value::Map(_)) {
        return Err(Error::msg(format!("{}: {SECTION}.cfg must be a NeMo CLIP model config (a map)", cfg.origin)));
    }
    let text = &["text"];
    let key = |k: &'static str| -> [&'static str; 2] { ["text", k] };
    if read(cfg, text)?.is_none_or(|n| !matches!(n.value, Value::Map(_))) {
        return Err(Error::msg(format!("{}: {CLASS}'s CLIP config has no text section", cfg.origin)));
    }
    only(
        cfg,
        &key("activation"),
        |n| n.is_none() || is_text(n, "gelu"),
        "zeroconv's Megatron CLIP MLP is exact GELU (gelu)",
    )?;
    only(
        cfg,
        &key("openai_gelu"),
        |n| n.is_none() || is_bool(n, false),
        "openai_gelu is the tanh approximation of GELU, which zeroconv does not implement",
    )?;
    only(
        cfg,
        &key("bias_activation_fusion"),
        |n| is_bool(n, false),
        "it must be False: true (NeMo's default) fuses the bias with the tanh approximation of GELU, which zeroconv does \
         not implement",
    )?;
    only(
        cfg,
        &key("normalization"),
        |n| n.is_none() || is_text(n, "layernorm"),
        "zeroconv's text transformer uses LayerNorm (layernorm)",
    )?;
    only(
        cfg,
        &key("layernorm_epsilon"),
        |n| n.is_none() || n.and_then(plain).is_some_and(|r| matches!(r, Resolved::Float(e) if e == 1e-5)),
        "zeroconv's text transformer's LayerNorm epsilon is 1e-5",
    )?;
    only(
        cfg,
        &key("position_embedding_type"),
        |n| is_text(n, "learned_parameters"),
        "FrozenMegatronCLIPEmbedder adds position_embeddings as a parameter, which only learned_parameters makes",
    )?;
    only(
        cfg,
        &key("pre_process"),
        |n| n.is_none() || is_bool(n, true),
        "without pre_process the tower has no embeddings",
    )?;
    only(
        cfg,
        &["tokenizer", "library"],
        |n| n.is_none() || is_text(n, "huggingface"),
        "zeroconv reads Hugging Face CLIP tokenizers (huggingface), padded with <|endoftext|> as NeMo's tokenize does",
    )?;
    let legacy = match read(cfg, &key("megatron_legacy"))? {
        Some(n) => match plain(n) {
            Some(Resolved::Bool(b)) => b,
            _ => {
                return Err(Error::msg(format!(
                    "{}: text.megatron_legacy must be true or false, found {}",
                    n.origin,
                    n.describe()
                )))
            }
        },
        None => {
            return Err(Error::msg(format!(
                "{}: {CLASS}'s CLIP config: text.megatron_legacy is required (it orders the rows of each \
                 query_key_value)",
                cfg.origin
            )))
        }
    };
    let hidden = required_int(cfg, &key("hidden_size"))?;
    let heads = required_int(cfg, &key("num_attention_heads"))?;
    if let Some(kv) = int(cfg, &key("kv_channels"))? {
        if kv * heads != hidden {
            return Err(Error::msg(format!(
                "{}: text.kv_channels is {kv}, but zeroconv's attention heads are hidden_size / num_attention_heads \
                 ({hidden} / {heads}) wide",
                cfg.origin
            )));
        }
    }
    let positions = required_int(cfg, &key("max_position_embeddings"))?;
    let divisible = int(cfg, &["make_vocab_size_divisible_by"])?.unwrap_or(128);
    let tp = int(cfg, &["tensor_model_parallel_size"])?.unwrap_or(1);
    let why = |k: &str| format!("{CLASS}'s CLIP config ({}) has {k}", cfg.origin);
    let from = cfg.origin.clone();
    for (ours, theirs) in [
        ("hidden_size", hidden),
        ("num_attention_heads", heads),
        ("num_hidden_layers", required_int(cfg, &key("num_layers"))?),
        ("intermediate_size", required_int(cfg, &key("ffn_hidden_size"))?),
        ("max_position_embeddings", positions),
        ("max_length", positions),
    ] {
        imply(section, ours, &theirs.to_string(), false, &from, &format!("{} {theirs}", why(ours)))?;
    }
    let gelu = format!("{CLASS} (NeMo's CLIP) uses exact GELU (gelu)");
    imply(section, "hidden_act", "gelu", true, &from, &gelu)?;
    let pad = format!("{CLASS} pads with its Hugging Face tokenizer's pad, <|endoftext|>");
    imply(section, "pad_token", "<|endoftext|>", true, &from, &pad)?;
    let scalar = |text: String| Node::new(Value::Scalar { text, quoted: false }, from.clone());
    let entry = |key: &str, value: Node| Entry { key: key.to_string(), key_origin: from.clone(), value };
    Ok(Node::new(
        Value::Map(vec![
            entry("megatron_legacy", scalar(legacy.to_string())),
            entry("vocab_padding", scalar((divisible * tp).to_string())),
        ]),
        from.clone(),
    ))
}

/// Sets `key` of a map node (adding it when absent).
fn set(section: &mut Node, key: &str, value: Node) {
    let Value::Map(entries) = &mut section.value else { return };
    let key_origin = value.origin.clone();
    match entries.iter_mut().find(|e| e.key == key) {
        Some(entry) => entry.value = value,
        None => entries.push(Entry { key: key.to_string(), key_origin, value }),
    }
}
