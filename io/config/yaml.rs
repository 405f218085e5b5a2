//! YAML text to a config tree, keeping each scalar's raw text, quoting and position.
//!
//! Built on saphyr-parser's event stream. Supports what NeMo configs use: block and flow collections, all
//! scalar styles, comments, anchors and aliases, and `<<` merge keys (PyYAML, hence OmegaConf, has them).
//! One document per file; duplicate keys are an error, as in OmegaConf.
//!
//! Hostile text is bounded: collections nest at most [`MAX_DEPTH`] deep (aliases included), and aliases expand to
//! at most [`MAX_ALIAS_NODES`] nodes in all (a "billion laughs" of nested anchors stops at the first alias over
//! the budget, before it is copied), so every later pass over the tree recurses and allocates within limits.

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

/// Deepest nesting of collections (lists and sections inside each other) a config may have. NeMo configs nest
/// about 6 deep; the limit keeps the recursive passes over the tree (and its drop) far from the stack's end.
pub const MAX_DEPTH: usize = 64;

/// Most nodes (scalars, lists, sections) that aliases may add to a document in all. Real configs alias a few
/// small sections; nested anchors can otherwise expand exponentially (9 aliases of 9 aliases of ... ).
pub const MAX_ALIAS_NODES: usize = 10_000;

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
    let mut builder = Builder {
        source: source.clone(),
        root_is_map,
        stack: Vec::new(),
        anchors: HashMap::new(),
        alias_nodes: 0,
        root: None,
    };
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
    /// Each anchored node with its size in nodes and its depth in collections.
    anchors: HashMap<usize, Anchored>,
    /// Nodes added by aliases so far.
    alias_nodes: usize,
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
            Event::Alias(id) => {
                let Some(anchored) = self.anchors.get(&id) else {
                    return fail(&origin, "alias to an unknown anchor");
                };
                if self.stack.len() + anchored.depth > MAX_DEPTH {
                    let msg = format!(
                        "this alias puts its anchor's value ({} levels deep) inside {} levels: more than the \
                         {MAX_DEPTH} levels lists and sections may nest",
                        anchored.depth,
                        self.stack.len()
                    );
                    return fail(&origin, msg);
                }
                let total = self.alias_nodes.saturating_add(anchored.nodes);
                if total > MAX_ALIAS_NODES {
                    let msg = format!(
                        "aliases expand to more than {MAX_ALIAS_NODES} nodes in all (this one adds {}, after {} \
                         before it): nested anchors and aliases that multiply, refused",
                        anchored.nodes, self.alias_nodes
                    );
                    return fail(&origin, msg);
                }
                self.alias_nodes = total;
                let node = anchored.node.clone();
                self.complete(node)
            }
            Event::Scalar(text, style, anchor, tag) => {
                let is_str_tag = tag.as_ref().is_some_and(|t| t.is_yaml_core_schema() && t.suffix == "str");
                let quoted = is_str_tag || !matches!(style, ScalarStyle::Plain);
                let node = Node::new(Value::Scalar { text: text.into_owned(), quoted }, origin);
                self.remember(anchor, &node);
                self.complete(node)
            }
            Event::SequenceStart(anchor, _) => {
                self.check_depth(&origin)?;
                self.stack.push(Frame::Seq { items: Vec::new(), origin, anchor });
                Ok(())
            }
            Event::MappingStart(anchor, _) => {
                self.check_depth(&origin)?;
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

    /// A collection opening here must not nest deeper than [`MAX_DEPTH`].
    fn check_depth(&self, origin: &Origin) -> Result<()> {
        if self.stack.len() >= MAX_DEPTH {
            let msg = format!("lists and sections nest more than {MAX_DEPTH} levels deep here: refused");
            return fail(origin, msg);
        }
        Ok(())
    }

    fn remember(&mut self, anchor: usize, node: &Node) {
        if anchor != 0 {
            let (nodes, depth) = measure(node);
            self.anchors.insert(anchor, Anchored { node: node.clone(), nodes, depth });
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

struct Anchored {
    node: Node,
    nodes: usize,
    depth: usize,
}

/// A node's size in nodes and its depth in collections (a scalar is 0 deep, a list of scalars 1). The builder
/// keeps every tree within [`MAX_DEPTH`], so the recursion is bounded.
fn measure(node: &Node) -> (usize, usize) {
    let children: Box<dyn Iterator<Item = &Node>> = match &node.value {
        Value::Seq(items) => Box::new(items.iter()),
        Value::Map(entries) => Box::new(entries.iter().map(|e| &e.value)),
        Value::Scalar { .. } | Value::Invalid(_) => return (1, 0),
    };
    children.fold((1, 1), |(nodes, depth), child| {
        let (n, d) = measure(child);
        (nodes + n, depth.max(d + 1))
    })
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
    fn nesting_and_alias_expansion_are_limited() {
        let nested = |depth: usize| format!("a: {}{}\n", "[".repeat(depth - 1), "]".repeat(depth - 1));
        parse(&nested(MAX_DEPTH)).expect("the root map and 63 lists: 64 levels");
        let err = parse(&nested(MAX_DEPTH + 1)).unwrap_err().to_string();
        assert!(err.starts_with("t.yaml:1:") && err.contains("nest more than 64 levels"), "{err}");
        // 100 aliases of a 100-node list: exactly the budget, then one more.
        let list = format!("[{}]", vec!["x"; 99].join(", "));
        let aliases = |n: usize| format!("a: &a {list}\nb: [{}]\n", vec!["*a"; n].join(", "));
        parse(&aliases(100)).expect("10,000 aliased nodes");
        let err = parse(&aliases(101)).unwrap_err().to_string();
        assert!(err.starts_with("t.yaml:2:") && err.contains("more than 10000 nodes"), "{err}");
        let err = parse_value(&format!("{}{}", "[".repeat(70), "]".repeat(70)), &Arc::from("value")).unwrap_err();
        assert!(err.contains("nest more than 64 levels"), "{err}");
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
