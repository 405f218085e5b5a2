//! OmegaConf interpolations: `${trainer.precision}` (absolute), `${.sibling}` and `${..uncle}` (relative), and
//! `prefix_${a.b}_suffix` (string interpolation). NeMo configs use them, e.g. `precision: ${trainer.precision}`.
//!
//! A value that is exactly one interpolation takes the target's value and type; an interpolation inside a
//! longer string is replaced by the target's text. Resolvers (`${oc.env:HOME}`) are not supported. A failed
//! interpolation becomes an [`Value::Invalid`] node, an error only where zeroconv reads that key.

use super::node::{Entry, Node, Value};

/// The tree with every interpolation replaced by its target's value.
pub fn resolve(root: &Node) -> Node {
    let mut stack = Vec::new();
    resolve_node(root, root, &mut Vec::new(), &mut stack)
}

fn resolve_node(node: &Node, root: &Node, path: &mut Vec<String>, stack: &mut Vec<Vec<String>>) -> Node {
    let value = match &node.value {
        Value::Scalar { text, quoted } if text.contains("${") => resolve_scalar(text, *quoted, root, path, stack),
        Value::Seq(items) => Value::Seq(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| with_segment(path, i.to_string(), |p| resolve_node(item, root, p, stack)))
                .collect(),
        ),
        Value::Map(entries) => Value::Map(
            entries
                .iter()
                .map(|e| Entry {
                    key: e.key.clone(),
                    key_origin: e.key_origin.clone(),
                    value: with_segment(path, e.key.clone(), |p| resolve_node(&e.value, root, p, stack)),
                })
                .collect(),
        ),
        other => other.clone(),
    };
    Node::new(value, node.origin.clone())
}

fn with_segment<T>(path: &mut Vec<String>, segment: String, f: impl FnOnce(&mut Vec<String>) -> T) -> T {
    path.push(segment);
    let out = f(path);
    path.pop();
    out
}

/// A piece of a scalar: literal text or the inside of `${...}`.
enum Piece {
    Text(String),
    Ref(String),
}

fn split_pieces(text: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        if rest[..at].ends_with('\\') {
            // `\${` is a literal `${`.
            literal.push_str(&rest[..at - 1]);
            literal.push_str("${");
            rest = &rest[at + 2..];
            continue;
        }
        literal.push_str(&rest[..at]);
        let inner_start = at + 2;
        let close = rest[inner_start..].find('}').ok_or_else(|| format!("unterminated interpolation in `{text}`"))?;
        if !literal.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut literal)));
        }
        pieces.push(Piece::Ref(rest[inner_start..inner_start + close].trim().to_string()));
        rest = &rest[inner_start + close + 1..];
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        pieces.push(Piece::Text(literal));
    }
    Ok(pieces)
}

fn resolve_scalar(text: &str, quoted: bool, root: &Node, path: &[String], stack: &mut Vec<Vec<String>>) -> Value {
    let pieces = match split_pieces(text) {
        Ok(p) => p,
        Err(msg) => return Value::Invalid(msg),
    };
    if let [Piece::Ref(reference)] = pieces.as_slice() {
        return match target(reference, root, path, stack) {
            Ok(node) => node.value,
            Err(msg) => Value::Invalid(msg),
        };
    }
    if !pieces.iter().any(|p| matches!(p, Piece::Ref(_))) {
        // Only escaped `\${`: the text without the escapes.
        let text = pieces.into_iter().map(|p| if let Piece::Text(t) = p { t } else { String::new() }).collect();
        return Value::Scalar { text, quoted };
    }
    let mut out = String::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(&t),
            Piece::Ref(reference) => match target(&reference, root, path, stack) {
                // OmegaConf prints a null as Python does.
                Ok(node) if node.is_null() => out.push_str("None"),
                Ok(Node { value: Value::Scalar { text, .. }, .. }) => out.push_str(&text),
                Ok(node) => {
                    return Value::Invalid(format!(
                        "interpolation `${{{reference}}}` inside a string refers to {}",
                        node.kind()
                    ))
                }
                Err(msg) => return Value::Invalid(msg),
            },
        }
    }
    Value::Scalar { text: out, quoted: true }
}

/// The resolved node that `reference` (the inside of `${...}`) points at from the node at `path`.
fn target(reference: &str, root: &Node, path: &[String], stack: &mut Vec<Vec<String>>) -> Result<Node, String> {
    let shown = format!("${{{reference}}}");
    if reference.contains(':') {
        return Err(format!("interpolation `{shown}`: resolvers (`name:args`) are not supported"));
    }
    let dots = reference.chars().take_while(|&c| c == '.').count();
    let mut target_path: Vec<String> = if dots == 0 {
        Vec::new()
    } else {
        // `.x` is a sibling: it starts from the node's container; each further dot goes one level up.
        if dots > path.len() {
            return Err(format!("interpolation `{shown}` goes above the config root"));
        }
        path[..path.len() - dots].to_vec()
    };
    let rest = &reference[dots..];
    if rest.is_empty() {
        return Err(format!("interpolation `{shown}` names no key"));
    }
    for segment in rest.split('.') {
        if segment.is_empty() {
            return Err(format!("interpolation `{shown}`: empty name between dots"));
        }
        target_path.push(segment.to_string());
    }
    if stack.contains(&target_path) || target_path.as_slice() == path {
        return Err(format!("interpolation `{shown}` is circular"));
    }
    let node = root
        .lookup(&target_path)
        .ok_or_else(|| format!("interpolation `{shown}`: {} is not in the config", target_path.join(".")))?;
    stack.push(path.to_vec());
    let resolved = resolve_node(node, root, &mut target_path, stack);
    stack.pop();
    match &resolved.value {
        Value::Invalid(msg) => Err(msg.clone()),
        _ => Ok(resolved),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::io::config::yaml::parse_document;

    fn resolved(text: &str, path: &str) -> Node {
        let root = parse_document(text, &Arc::from("t.yaml")).unwrap();
        let path: Vec<String> = path.split('.').map(str::to_string).collect();
        resolve(&root).lookup(&path).unwrap().clone()
    }

    #[test]
    fn whole_value_keeps_the_type() {
        let n = resolved("trainer: {precision: 16}\nmodel: {precision: '${trainer.precision}'}\n", "model.precision");
        assert!(matches!(n.value, Value::Scalar { ref text, quoted: false } if text == "16"));
        let n = resolved("a: {b: [1, 2]}\nc: ${a.b}\n", "c");
        assert_eq!(n.describe(), "[1, 2]");
        let n = resolved("a: {b: [1, 2]}\nc: ${a.b.1}\n", "c");
        assert_eq!(n.describe(), "2");
    }

    #[test]
    fn chains_relative_and_string_interpolation() {
        let doc = "a: ${b}\nb: ${c}\nc: 3\ns:\n  x: 1\n  y: ${.x}\n  z: ${..c}\n  w: run_${c}_${s.x}\n  v: '\\${c}'\n";
        assert_eq!(resolved(doc, "a").describe(), "3");
        assert_eq!(resolved(doc, "s.y").describe(), "1");
        assert_eq!(resolved(doc, "s.z").describe(), "3");
        assert_eq!(resolved(doc, "s.w").describe(), "\"run_3_1\"");
        assert_eq!(resolved(doc, "s.v").describe(), "\"${c}\"");
    }

    #[test]
    fn failures_are_lazy_invalid_values() {
        let doc = "a: ${nope.x}\nb: ${c}\nc: ${b}\nd: ${oc.env:HOME}\ne: x${a\nok: 1\n";
        let invalid = |path| match resolved(doc, path).value {
            Value::Invalid(msg) => msg,
            other => panic!("{path} resolved to {other:?}"),
        };
        assert!(invalid("a").contains("nope.x is not in the config"));
        assert!(invalid("b").contains("is circular"));
        assert!(invalid("d").contains("resolvers"));
        assert!(invalid("e").contains("unterminated"));
        assert_eq!(resolved(doc, "ok").describe(), "1");
    }
}
