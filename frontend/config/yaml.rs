//! YAML text to a config tree, keeping each scalar's raw text, quoting and position.
//!
//! Built on saphyr-parser's event stream. Supports what NeMo configs use: block and flow collections, all
//! scalar styles, comments, anchors and aliases, and `<<` merge keys (PyYAML, hence OmegaConf, has them).
//! One document per file; duplicate keys are an error, as in OmegaConf.

use std::collections::HashMap;
use std::sync::Arc;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use super::node::{Entry, Node, Origin, Value};
use crate::error::Error;

/// A problem in the YAML text and where it is.
#[derive(Debug)]
struct YamlError {
    origin: Origin,
    msg: String,
}

type Result<T> = std::result::Result<T, YamlError>;

fn fail<T>(origin: &Origin, msg: impl Into<String>) -> Result<T> {
    Err(YamlError { origin: origin.clone(), msg: msg.into() })
}

/// Parses one YAML document holding a config: a mapping (an empty document gives an empty map). `source`
/// names it in errors.
pub fn parse_document(text: &str, source: &Arc<str>) -> crate::error::Result<Node> {
    parse(text, source, true).map_err(|e| Error::msg(format!("{}: {}", e.origin, e.msg)))
}

/// Parses one YAML value of any kind (an override's right-hand side). Empty text is null. The error names the
/// character where the value stops making sense.
pub fn parse_value(text: &str, source: &Arc<str>) -> std::result::Result<Node, String> {
    parse(text, source, false).map_err(|e| match e.origin {
        Origin::File { col, .. } => format!("{} (at character {col})", e.msg),
        Origin::Override(_) => e.msg,
    })
}

fn parse(text: &str, source: &Arc<str>, root_is_map: bool) -> Result<Node> {
    let mut builder =
        Builder { source: source.clone(), root_is_map, stack: Vec::new(), anchors: HashMap::new(), root: None };
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| {
            let origin = Origin::File { source: source.clone(), line: e.marker().line(), col: e.marker().col() + 1 };
            YamlError { origin, msg: format!("invalid YAML: {}", e.info()) }
        })?;
        builder.on_event(event, span)?;
    }
    let empty =
        || if root_is_map { Value::Map(Vec::new()) } else { Value::Scalar { text: String::new(), quoted: false } };
    let origin = builder.origin_at(None);
    Ok(builder.root.unwrap_or_else(|| Node::new(empty(), origin)))
}

/// A collection being read.
enum Frame {
    Seq { items: Vec<Node>, origin: Origin, anchor: usize },
    Map { entries: Vec<Entry>, merges: Vec<Node>, key: Option<(String, Origin)>, origin: Origin, anchor: usize },
}

struct Builder {
    source: Arc<str>,
    root_is_map: bool,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
}

impl Builder {
    fn origin_at(&self, span: Option<Span>) -> Origin {
        let (line, col) = span.map_or((1, 1), |s| (s.start.line(), s.start.col() + 1));
        Origin::File { source: self.source.clone(), line, col }
    }

    fn on_event(&mut self, event: Event<'_>, span: Span) -> Result<()> {
        let origin = self.origin_at(Some(span));
        match event {
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => Ok(()),
            Event::DocumentStart(_) => match self.root {
                Some(_) => fail(&origin, "a config file holds one YAML document, found a second"),
                None => Ok(()),
            },
            Event::Alias(id) => match self.anchors.get(&id) {
                Some(node) => self.complete(node.clone()),
                None => fail(&origin, "alias to an unknown anchor"),
            },
            Event::Scalar(text, style, anchor, tag) => {
                let is_str_tag = tag.as_ref().is_some_and(|t| t.is_yaml_core_schema() && t.suffix == "str");
                let quoted = is_str_tag || !matches!(style, ScalarStyle::Plain);
                let node = Node::new(Value::Scalar { text: text.into_owned(), quoted }, origin);
                self.remember(anchor, &node);
                self.complete(node)
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push(Frame::Seq { items: Vec::new(), origin, anchor });
                Ok(())
            }
            Event::MappingStart(anchor, _) => {
                self.stack.push(Frame::Map { entries: Vec::new(), merges: Vec::new(), key: None, origin, anchor });
                Ok(())
            }
            Event::SequenceEnd => match self.stack.pop() {
                Some(Frame::Seq { items, origin, anchor }) => {
                    let node = Node::new(Value::Seq(items), origin);
                    self.remember(anchor, &node);
                    self.complete(node)
                }
                _ => fail(&origin, "unbalanced YAML sequence"),
            },
            Event::MappingEnd => match self.stack.pop() {
                Some(Frame::Map { mut entries, merges, origin, anchor, .. }) => {
                    apply_merge_keys(&mut entries, merges)?;
                    let node = Node::new(Value::Map(entries), origin);
                    self.remember(anchor, &node);
                    self.complete(node)
                }
                _ => fail(&origin, "unbalanced YAML mapping"),
            },
        }
    }

    fn remember(&mut self, anchor: usize, node: &Node) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
    }

    /// A finished node goes into the collection that holds it, as a list item, a key or a value.
    fn complete(&mut self, node: Node) -> Result<()> {
        match self.stack.last_mut() {
            None if !self.root_is_map => {
                self.root = Some(node);
                Ok(())
            }
            None => {
                if !matches!(node.value, Value::Map(_)) && !node.is_null() {
                    let msg =
                        format!("a config file must be a mapping of sections (like `model:`), found {}", node.kind());
                    return fail(&node.origin, msg);
                }
                let origin = node.origin.clone();
                self.root = Some(if node.is_null() { Node::empty_map(origin) } else { node });
                Ok(())
            }
            Some(Frame::Seq { items, .. }) => {
                items.push(node);
                Ok(())
            }
            Some(Frame::Map { entries, merges, key, .. }) => match key.take() {
                None => match node.value {
                    Value::Scalar { text, .. } => {
                        *key = Some((text, node.origin));
                        Ok(())
                    }
                    _ => fail(&node.origin, format!("a key must be a plain name, found {}", node.kind())),
                },
                Some((k, _)) if k == "<<" => {
                    merges.push(node);
                    Ok(())
                }
                Some((k, key_origin)) => {
                    if let Some(first) = entries.iter().find(|e| e.key == k) {
                        return fail(&key_origin, format!("duplicate key `{k}` (first given at {})", first.key_origin));
                    }
                    entries.push(Entry { key: k, key_origin, value: node });
                    Ok(())
                }
            },
        }
    }
}

/// `<<: *base` (or a list of them) adds the base's entries that the mapping does not set itself.
fn apply_merge_keys(entries: &mut Vec<Entry>, merges: Vec<Node>) -> Result<()> {
    for merge in merges {
        let sources = match merge.value {
            Value::Seq(items) => items,
            _ => vec![merge],
        };
        for source in sources {
            match source.value {
                Value::Map(base) => {
                    for entry in base {
                        if !entries.iter().any(|e| e.key == entry.key) {
                            entries.push(entry);
                        }
                    }
                }
                _ => return fail(&source.origin, format!("`<<` merges a mapping, found {}", source.kind())),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> crate::error::Result<Node> {
        parse_document(text, &Arc::from("t.yaml"))
    }

    #[test]
    fn keeps_positions_and_quoting() {
        let root = parse("a:\n  b: 16\n  c: '16'\n  d: [1, 2]\n").unwrap();
        let b = root.lookup(&["a".into(), "b".into()]).unwrap();
        assert!(matches!(&b.value, Value::Scalar { text, quoted: false } if text == "16"));
        assert_eq!(b.origin, Origin::File { source: Arc::from("t.yaml"), line: 2, col: 6 });
        let c = root.lookup(&["a".into(), "c".into()]).unwrap();
        assert!(matches!(&c.value, Value::Scalar { quoted: true, .. }));
        assert_eq!(root.lookup(&["a".into(), "d".into(), "1".into()]).unwrap().describe(), "2");
    }

    #[test]
    fn empty_values_are_null_and_empty_file_is_empty_map() {
        let root = parse("a:\nb: ~\n").unwrap();
        assert!(root.get("a").unwrap().is_null());
        assert!(root.get("b").unwrap().is_null());
        assert!(parse("").unwrap().entries().unwrap().is_empty());
        assert!(parse("# only a comment\n").unwrap().entries().unwrap().is_empty());
    }

    #[test]
    fn anchors_and_merge_keys() {
        let root = parse("base: &b {x: 1, y: 2}\nderived:\n  <<: *b\n  y: 3\ncopy: *b\n").unwrap();
        assert_eq!(root.get("derived").unwrap().describe(), "{y: 3, x: 1}");
        assert_eq!(root.get("copy").unwrap().describe(), "{x: 1, y: 2}");
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse("a: 1\nb: 2\na: 3\n").unwrap_err().to_string();
        assert!(err.contains("t.yaml:3:1: duplicate key `a` (first given at t.yaml:1:1)"), "{err}");
        let err = parse("a: [1, 2\n").unwrap_err().to_string();
        assert!(err.starts_with("t.yaml:") && err.contains("invalid YAML"), "{err}");
        let err = parse("- 1\n- 2\n").unwrap_err().to_string();
        assert!(err.contains("must be a mapping"), "{err}");
        let err = parse("a: 1\n---\nb: 2\n").unwrap_err().to_string();
        assert!(err.contains("one YAML document"), "{err}");
        let err = parse_value("[a, b", &Arc::from("value")).unwrap_err();
        assert!(err.starts_with("invalid YAML:") && err.contains("(at character"), "{err}");
    }
}
