//! Hydra-style command-line overrides: `model.sd_locked=False`, `trainer.precision=bf16`,
//! `model.data.train.dataset_path=[a.tar,b.tar]`, `+key=value`, `++key=value`, `~key`, `~key=value`.
//!
//! The right-hand side is read as one YAML flow value (so `[a,b]` is a list, `False` a boolean, `'x y'` a
//! string); an empty right-hand side is the empty string, as in Hydra. Unlike Hydra, a plain `key=value` may
//! set a key that the file leaves out: the typed config knows every valid key and its default, and rejects
//! (with a suggestion) any key it does not know, so `+` is never needed; it keeps Hydra's meaning ("add; the
//! key must not be set yet") for scripts written for NeMo.

use std::collections::HashSet;
use std::sync::Arc;

use super::node::{join_path, Entry, Node, Origin, Value};
use super::yaml;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `key=value`: set, adding the key if the file does not have it.
    Set,
    /// `+key=value`: add; an error if the key is already set.
    Add,
    /// `++key=value`: set whether or not the key exists.
    ForceSet,
    /// `~key` or `~key=value`: remove (the default applies again); with a value, only if it matches.
    Delete,
}

#[derive(Debug, Clone)]
pub struct Override {
    pub op: Op,
    pub path: Vec<String>,
    pub value: Option<Node>,
    /// The override as the user typed it, for messages.
    pub text: Arc<str>,
}

fn fail(text: &str, msg: impl std::fmt::Display) -> Error {
    Error::msg(format!("override `{text}`: {msg}"))
}

/// Parses one override. Errors say what is wrong and how it should be written.
pub fn parse(text: &str) -> Result<Override> {
    let (op, rest) = if let Some(r) = text.strip_prefix("++") {
        (Op::ForceSet, r)
    } else if let Some(r) = text.strip_prefix('+') {
        (Op::Add, r)
    } else if let Some(r) = text.strip_prefix('~') {
        (Op::Delete, r)
    } else {
        (Op::Set, text)
    };
    let (key, value_text) = match rest.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None if op == Op::Delete => (rest, None),
        None => {
            return Err(fail(text, "expected key=value, e.g. trainer.max_steps=100 or model.sd_locked=False"));
        }
    };
    if key.contains('@') {
        return Err(fail(text, "Hydra package overrides (`key@package`) are not supported"));
    }
    let path = parse_key(key).map_err(|msg| fail(text, msg))?;
    let origin = Origin::Override(Arc::from(text));
    let value = match value_text {
        None => None,
        Some(v) => Some(parse_value(v, &origin).map_err(|msg| fail(text, msg))?),
    };
    Ok(Override { op, path, value, text: Arc::from(text) })
}

/// `a.b_c.d-e`: dot-separated names of letters, digits, `_` and `-`.
fn parse_key(key: &str) -> std::result::Result<Vec<String>, String> {
    if key.is_empty() {
        return Err("the key is empty (expected e.g. model.sd_locked=False)".to_string());
    }
    let segments: Vec<String> = key.split('.').map(str::to_string).collect();
    if segments.len() > yaml::MAX_DEPTH {
        return Err(format!(
            "the key has {} dotted names: more than the {} a config may nest",
            segments.len(),
            yaml::MAX_DEPTH
        ));
    }
    for segment in &segments {
        if segment.is_empty() {
            return Err(format!("invalid key `{key}`: empty name between dots"));
        }
        if let Some(bad) = segment.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
            return Err(format!("invalid key `{key}`: unexpected character {bad:?}"));
        }
    }
    Ok(segments)
}

fn parse_value(text: &str, origin: &Origin) -> std::result::Result<Node, String> {
    if text.is_empty() {
        return Ok(Node::new(Value::Scalar { text: String::new(), quoted: true }, origin.clone()));
    }
    if has_top_level_comma(text) {
        return Err(format!(
            "a comma outside brackets is a Hydra sweep, which zeroconv does not run; \
             write a list as [{text}] or quote a string as '{text}'"
        ));
    }
    let source: Arc<str> = Arc::from("value");
    let mut node = yaml::parse_value(text, &source)
        .map_err(|msg| format!("invalid value `{text}`: {msg} (quote it if it is a string: '{text}')"))?;
    set_origin(&mut node, origin);
    Ok(node)
}

/// A `,` outside quotes, brackets and braces.
fn has_top_level_comma(text: &str) -> bool {
    let (mut depth, mut quote) = (0i32, None::<char>);
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => return true,
            _ => {}
        }
    }
    false
}

fn set_origin(node: &mut Node, origin: &Origin) {
    node.origin = origin.clone();
    match &mut node.value {
        Value::Seq(items) => items.iter_mut().for_each(|n| set_origin(n, origin)),
        Value::Map(entries) => entries.iter_mut().for_each(|e| {
            e.key_origin = origin.clone();
            set_origin(&mut e.value, origin);
        }),
        _ => {}
    }
}

/// Applies one override to the tree. `unwrapped` holds the paths of sections whose NeMo `params:` wrapper was
/// already merged into them, so that `model.control_stage_config.params.x=1` still reaches `x`.
pub fn apply(root: &mut Node, ov: &Override, unwrapped: &HashSet<String>) -> Result<()> {
    let text = &*ov.text;
    let path = without_merged_params(&ov.path, unwrapped);
    let Some((leaf, parents)) = path.split_last() else {
        return Err(fail(text, "the key names the whole config"));
    };
    let create = ov.op != Op::Delete;
    let mut node = root;
    let mut here = String::new();
    for segment in parents {
        let entries = section_mut(node, &here, text, create)?;
        here = join_path(&here, segment);
        let at = match entries.iter().position(|e| e.key == *segment) {
            Some(at) => at,
            None if !create => return Err(fail(text, format!("{here} is not in the config"))),
            None => {
                let origin = Origin::Override(ov.text.clone());
                let value = Node::empty_map(origin.clone());
                entries.push(Entry { key: segment.clone(), key_origin: origin, value });
                entries.len() - 1
            }
        };
        node = &mut entries[at].value;
    }
    let entries = section_mut(node, &here, text, create)?;
    let full = join_path(&here, leaf);
    let existing = entries.iter().position(|e| e.key == *leaf);
    match (ov.op, existing) {
        (Op::Delete, None) => Err(fail(text, format!("{full} is not in the config"))),
        (Op::Delete, Some(at)) => {
            let current = &entries[at].value;
            if let Some(expected) = ov.value.as_ref().filter(|e| e.describe() != current.describe()) {
                let (now, at) = (current.describe(), &current.origin);
                return Err(fail(text, format!("{full} is {now} (at {at}), not {}", expected.describe())));
            }
            entries.remove(at);
            Ok(())
        }
        (Op::Add, Some(at)) => {
            let current = &entries[at].value;
            let (now, at) = (current.describe(), &current.origin);
            Err(fail(text, format!("{full} is already set (to {now} at {at}); drop the `+` to change it")))
        }
        (Op::Set | Op::Add | Op::ForceSet, existing) => {
            let value = ov.value.clone().ok_or_else(|| fail(text, "a value is required"))?;
            // A whole section set to null would silently fall back to the built-in defaults (for `model`: full
            // SD 1.5), which is never what `key=null` means; only the sections whose null means something (the
            // schema's optional ones) may be nulled.
            const NULLABLE_SECTIONS: [&str; 1] = ["model.optim.sched"];
            if let Some(at) = existing {
                let is_section = matches!(entries[at].value.value, crate::io::config::node::Value::Map(_));
                if is_section && value.is_null() && !NULLABLE_SECTIONS.contains(&full.as_str()) {
                    return Err(fail(
                        text,
                        format!(
                            "{full} is a section; setting it to null would replace it with zeroconv's built-in \
                             defaults. Set the keys inside it you mean to change (`{full}.KEY=VALUE`), or delete \
                             one with `~{full}.KEY`"
                        ),
                    ));
                }
            }
            match existing {
                Some(at) => entries[at].value = value,
                None => {
                    let key_origin = Origin::Override(ov.text.clone());
                    entries.push(Entry { key: leaf.clone(), key_origin, value });
                }
            }
            Ok(())
        }
    }
}

/// The override's path with each `params` segment that names an already merged NeMo wrapper left out.
fn without_merged_params(path: &[String], unwrapped: &HashSet<String>) -> Vec<String> {
    let mut kept: Vec<String> = Vec::with_capacity(path.len());
    for segment in path {
        if segment == "params" && unwrapped.contains(&kept.join(".")) {
            continue;
        }
        kept.push(segment.clone());
    }
    kept
}

/// The entries of the section at `path`; a null section becomes an empty one when `create` is set.
fn section_mut<'a>(node: &'a mut Node, path: &str, text: &str, create: bool) -> Result<&'a mut Vec<Entry>> {
    if create && node.is_null() {
        node.value = Value::Map(Vec::new());
    }
    let kind = node.kind();
    match &mut node.value {
        Value::Map(entries) => Ok(entries),
        _ => {
            let what = if path.is_empty() { "the config root" } else { path };
            Err(fail(text, format!("{what} is {kind}, not a section")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hydra_forms() {
        let set = parse("model.unet_config.model_channels=64").unwrap();
        assert_eq!((set.op, set.path.join("/")), (Op::Set, "model/unet_config/model_channels".to_string()));
        assert_eq!(set.value.unwrap().describe(), "64");
        assert_eq!(parse("+a.b=1").unwrap().op, Op::Add);
        assert_eq!(parse("++a.b=1").unwrap().op, Op::ForceSet);
        let delete = parse("~a.b").unwrap();
        assert!(delete.op == Op::Delete && delete.value.is_none());
        assert_eq!(parse("a=[x.tar, 'y z']").unwrap().value.unwrap().describe(), "[x.tar, \"y z\"]");
        assert_eq!(parse("a=").unwrap().value.unwrap().describe(), "\"\"");
        assert_eq!(parse("a='1,2'").unwrap().value.unwrap().describe(), "\"1,2\"");
        assert!(parse("a=1,2").is_err());
        assert!(parse("a").is_err());
    }

    #[test]
    fn merged_params_segments_are_skipped() {
        let unwrapped: HashSet<String> = ["model.control_stage_config".to_string()].into();
        let path: Vec<String> = "model.control_stage_config.params.x".split('.').map(str::to_string).collect();
        assert_eq!(without_merged_params(&path, &unwrapped).join("."), "model.control_stage_config.x");
        let other: Vec<String> = "model.unet_config.params.x".split('.').map(str::to_string).collect();
        assert_eq!(without_merged_params(&other, &unwrapped).join("."), "model.unet_config.params.x");
    }
}
