//! The untyped config tree: what a YAML file or an override says, before any of it is interpreted.
//!
//! Scalars keep their raw text and whether they were quoted, so that the typed layer can resolve them by the
//! type it expects (`16` is a precision, `"16"` too, `no` is `false` only where a boolean is expected), and
//! every node keeps where it came from, so that an error can point at `file:line:col` or at the override.

use std::fmt;
use std::sync::Arc;

/// Where a node was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A YAML file (or a built-in config) at a 1-based line and column.
    File { source: Arc<str>, line: usize, col: usize },
    /// A command-line override, quoted as the user typed it.
    Override(Arc<str>),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { source, line, col } => write!(f, "{source}:{line}:{col}"),
            Origin::Override(text) => write!(f, "override `{text}`"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub value: Value,
    pub origin: Origin,
}

#[derive(Debug, Clone)]
pub enum Value {
    /// A scalar as written. `quoted` is true for quoted and block scalars (and `!!str`): those are strings,
    /// whatever their text looks like.
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    /// Entries in file order; keys are unique (the YAML reader rejects duplicates).
    Map(Vec<Entry>),
    /// A value that could not be computed (a failed `${...}` interpolation). It is an error only if something
    /// reads it, so that a broken interpolation inside a key zeroconv ignores does not stop a NeMo config.
    Invalid(String),
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    /// Where the key itself was written (errors about the key point here, not at its value).
    pub key_origin: Origin,
    pub value: Node,
}

impl Node {
    pub fn new(value: Value, origin: Origin) -> Node {
        Node { value, origin }
    }

    pub fn empty_map(origin: Origin) -> Node {
        Node::new(Value::Map(Vec::new()), origin)
    }

    /// A plain scalar spelling null (`null`, `~`, or nothing at all), as YAML and OmegaConf read it.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, quoted: false } if super::scalar::is_null(text))
    }

    pub fn entries(&self) -> Option<&Vec<Entry>> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entries()?.iter().find(|e| e.key == key).map(|e| &e.value)
    }

    /// The node at a dotted path; a numeric segment indexes a list.
    pub fn lookup(&self, path: &[String]) -> Option<&Node> {
        let mut node = self;
        for segment in path {
            node = match &node.value {
                Value::Map(_) => node.get(segment)?,
                Value::Seq(items) => items.get(segment.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(node)
    }

    /// A short description of the node's kind for error messages.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Scalar { .. } if self.is_null() => "null",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a section",
            Value::Invalid(_) => "an invalid value",
        }
    }

    /// The value written back as compact YAML-like text, for messages (`[a, b]`, `{x: 1}`).
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Scalar { text, quoted: true } => format!("{text:?}"),
            Value::Scalar { text, quoted: false } if text.is_empty() => "null".to_string(),
            Value::Scalar { text, .. } => text.clone(),
            Value::Seq(items) => format!("[{}]", items.iter().map(Node::describe).collect::<Vec<_>>().join(", ")),
            Value::Map(entries) => format!(
                "{{{}}}",
                entries.iter().map(|e| format!("{}: {}", e.key, e.value.describe())).collect::<Vec<_>>().join(", ")
            ),
            Value::Invalid(msg) => format!("<{msg}>"),
        }
    }
}

/// `a.b.c` from path segments; the root is the empty string.
pub fn join_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}
