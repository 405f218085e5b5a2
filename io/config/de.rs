//! Fills the typed config (serde) from the config tree, one error naming the full dotted key.
//!
//! Scalars are read by the type the field wants: an integer field parses `16`, a string field takes `16` as
//! text, a boolean field accepts YAML 1.1's `True`/`yes`/`off`. Errors carry the key's path and the position
//! it was written at; an unknown key gets the nearest valid key as a suggestion.

use std::fmt;

use serde::de::value::StrDeserializer;
use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};

use super::nemo::ignored_names_under;
use super::node::{join_path, Entry, Node, Origin, Value};
use super::scalar::{self, resolve_plain, Resolved};
use crate::error::Error;

/// Deserializes `T` from the tree.
pub fn from_node<T: de::DeserializeOwned>(node: &Node) -> Result<T, Error> {
    T::deserialize(NodeDeserializer { node, path: String::new() }).map_err(DeError::into_error)
}

#[derive(Debug)]
enum Problem {
    UnknownKey { key: String, expected: &'static [&'static str] },
    UnknownValue { value: String, expected: &'static [&'static str] },
    Other(String),
}

/// A deserialization error, located (path and origin) by the innermost node that saw it.
#[derive(Debug)]
pub struct DeError {
    problem: Problem,
    path: Option<String>,
    origin: Option<Origin>,
}

impl DeError {
    fn other(msg: impl Into<String>) -> Self {
        DeError { problem: Problem::Other(msg.into()), path: None, origin: None }
    }

    /// Sets the location unless a deeper node already did.
    fn at(mut self, path: &str, origin: &Origin) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_string());
            self.origin = Some(origin.clone());
        }
        self
    }

    fn into_error(self) -> Error {
        let path = self.path.unwrap_or_default();
        let location = self.origin.map(|o| format!("{o}: ")).unwrap_or_default();
        let msg = match self.problem {
            Problem::UnknownKey { key, expected } => {
                let parent = path.rsplit_once('.').map_or("", |(p, _)| p);
                let mut candidates: Vec<&str> = expected.to_vec();
                candidates.extend(ignored_names_under(parent));
                match nearest(&key, &candidates) {
                    Some(best) => format!("unknown key {path} (did you mean {best}?)"),
                    None => format!("unknown key {path} (keys here: {})", expected.join(", ")),
                }
            }
            Problem::UnknownValue { value, expected } => {
                let hint = nearest(&value, expected).map(|b| format!(" (did you mean {b}?)")).unwrap_or_default();
                format!("{path}: unknown value `{value}`{hint}; expected one of {}", expected.join(", "))
            }
            Problem::Other(msg) if path.is_empty() => msg,
            Problem::Other(msg) => format!("{path}: {msg}"),
        };
        Error::msg(format!("{location}{msg}"))
    }
}

/// The candidate closest to `word` by edit distance, if it is close enough to be a likely typo.
pub fn nearest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let lower = word.to_lowercase();
    // Ties go to the candidate of the most similar length (`adamx`: `adamw` before `adam`), then to the first.
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(&lower, &c.to_lowercase()), c.len().abs_diff(word.len()), *c))
        .min_by_key(|&(d, len_diff, _)| (d, len_diff))
        .filter(|(d, _, c)| *d <= 2 || *d * 3 <= word.len().max(c.len()))
        .map(|(_, _, c)| c)
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            Problem::UnknownKey { key, .. } => write!(f, "unknown key {key}"),
            Problem::UnknownValue { value, .. } => write!(f, "unknown value `{value}`"),
            Problem::Other(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError::other(msg.to_string())
    }
    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError { problem: Problem::UnknownKey { key: field.to_string(), expected }, path: None, origin: None }
    }
    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError { problem: Problem::UnknownValue { value: variant.to_string(), expected }, path: None, origin: None }
    }
    fn invalid_type(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        DeError::other(format!("expected {exp}, found {unexp}"))
    }
    fn invalid_value(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        DeError::other(format!("invalid value {unexp}, expected {exp}"))
    }
    fn invalid_length(len: usize, exp: &dyn de::Expected) -> Self {
        DeError::other(format!("expected {exp}, found a list of {len}"))
    }
    fn missing_field(field: &'static str) -> Self {
        DeError::other(format!("missing key {field}"))
    }
}

struct NodeDeserializer<'a> {
    node: &'a Node,
    path: String,
}

impl NodeDeserializer<'_> {
    fn fail(&self, msg: impl Into<String>) -> DeError {
        DeError::other(msg).at(&self.path, &self.node.origin)
    }

    fn locate<T>(&self, result: Result<T, DeError>) -> Result<T, DeError> {
        result.map_err(|e| e.at(&self.path, &self.node.origin))
    }

    /// The scalar's text, or an error naming what was expected.
    fn scalar_text(&self, expected: &str) -> Result<&str, DeError> {
        match &self.node.value {
            Value::Scalar { text, .. } => Ok(text),
            Value::Invalid(msg) => Err(self.fail(msg.clone())),
            _ => Err(self.fail(format!("expected {expected}, found {}", self.node.kind()))),
        }
    }

    fn integer<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let text = self.scalar_text("an integer")?;
        let Some(i) = scalar::parse_int(text) else {
            return Err(self.fail(format!("expected an integer, found {}", self.node.describe())));
        };
        self.locate(if i >= 0 { visitor.visit_u64(i as u64) } else { visitor.visit_i64(i) })
    }

    fn float<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let text = self.scalar_text("a number")?;
        let Some(x) = scalar::parse_float(text) else {
            return Err(self.fail(format!("expected a number, found {}", self.node.describe())));
        };
        self.locate(visitor.visit_f64(x))
    }
}

impl<'de> de::Deserializer<'de> for NodeDeserializer<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match &self.node.value {
            Value::Invalid(msg) => return Err(self.fail(msg.clone())),
            Value::Scalar { text, quoted: true } => visitor.visit_str(text),
            Value::Scalar { text, quoted: false } => match resolve_plain(text) {
                Resolved::Null => visitor.visit_unit(),
                Resolved::Bool(b) => visitor.visit_bool(b),
                Resolved::Int(i) if i >= 0 => visitor.visit_u64(i as u64),
                Resolved::Int(i) => visitor.visit_i64(i),
                Resolved::Float(x) => visitor.visit_f64(x),
                Resolved::Str(s) => visitor.visit_str(s),
            },
            Value::Seq(items) => visitor.visit_seq(SeqAccess { items: items.iter().enumerate(), path: &self.path }),
            Value::Map(entries) => visitor.visit_map(MapAccess::new(entries, &self.path)),
        };
        self.locate(result)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let text = self.scalar_text("a boolean (True or False)")?;
        match scalar::parse_bool(text) {
            Some(b) => self.locate(visitor.visit_bool(b)),
            None => Err(self.fail(format!("expected a boolean (True or False), found {}", self.node.describe()))),
        }
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.integer(visitor)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.integer(visitor)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.integer(visitor)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.integer(visitor)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.integer(visitor)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.integer(visitor)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.integer(visitor)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.integer(visitor)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.float(visitor)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.float(visitor)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.node.is_null() {
            return Err(self.fail("expected a string, found null"));
        }
        let text = self.scalar_text("a string")?;
        self.locate(visitor.visit_str(text))
    }
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, DeError> {
        Err(self.fail("byte strings are not supported in configs"))
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.node.is_null() {
            self.locate(visitor.visit_none())
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.node.is_null() {
            self.locate(visitor.visit_unit())
        } else {
            Err(self.fail(format!("expected null, found {}", self.node.describe())))
        }
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match &self.node.value {
            Value::Seq(items) => visitor.visit_seq(SeqAccess { items: items.iter().enumerate(), path: &self.path }),
            // `key:` with nothing after it reads as an empty list.
            _ if self.node.is_null() => visitor.visit_seq(SeqAccess { items: [].iter().enumerate(), path: &self.path }),
            Value::Invalid(msg) => return Err(self.fail(msg.clone())),
            _ => return Err(self.fail(format!("expected a list like [1, 2], found {}", self.node.describe()))),
        };
        self.locate(result)
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match &self.node.value {
            Value::Map(entries) => visitor.visit_map(MapAccess::new(entries, &self.path)),
            // `section:` with nothing under it keeps every default.
            _ if self.node.is_null() => visitor.visit_map(MapAccess::new(&[], &self.path)),
            Value::Invalid(msg) => return Err(self.fail(msg.clone())),
            _ => return Err(self.fail(format!("expected a section of `key: value` lines, found {}", self.node.kind()))),
        };
        self.locate(result)
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        if self.node.is_null() {
            return Err(self.fail("expected a value, found null"));
        }
        let text = self.scalar_text("a name")?;
        self.locate(visitor.visit_enum(UnitVariant { name: text }))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

struct SeqAccess<'a, I> {
    items: I,
    path: &'a str,
}

impl<'de, 'a, I: Iterator<Item = (usize, &'a Node)>> de::SeqAccess<'de> for SeqAccess<'a, I> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            None => Ok(None),
            Some((i, node)) => {
                seed.deserialize(NodeDeserializer { node, path: format!("{}[{i}]", self.path) }).map(Some)
            }
        }
    }
}

struct MapAccess<'a> {
    entries: std::slice::Iter<'a, Entry>,
    current: Option<&'a Entry>,
    path: &'a str,
}

impl<'a> MapAccess<'a> {
    fn new(entries: &'a [Entry], path: &'a str) -> Self {
        MapAccess { entries: entries.iter(), current: None, path }
    }
}

impl<'de> de::MapAccess<'de> for MapAccess<'_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        let Some(entry) = self.entries.next() else { return Ok(None) };
        self.current = Some(entry);
        let key: StrDeserializer<'_, DeError> = entry.key.as_str().into_deserializer();
        seed.deserialize(key).map(Some).map_err(|e| e.at(&join_path(self.path, &entry.key), &entry.key_origin))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let entry = self.current.take().ok_or_else(|| DeError::other("a value was read before its key"))?;
        seed.deserialize(NodeDeserializer { node: &entry.value, path: join_path(self.path, &entry.key) })
    }
}

/// An enum written as its variant's name (`adamw`, `bf16-mixed`).
struct UnitVariant<'a> {
    name: &'a str,
}

impl<'de, 'a> de::EnumAccess<'de> for UnitVariant<'a> {
    type Error = DeError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), DeError> {
        let name: StrDeserializer<'_, DeError> = self.name.into_deserializer();
        Ok((seed.deserialize(name)?, self))
    }
}

impl<'de> de::VariantAccess<'de> for UnitVariant<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> Result<T::Value, DeError> {
        Err(DeError::other(format!("`{}` needs a value, which a plain name cannot give", self.name)))
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, DeError> {
        Err(DeError::other(format!("`{}` needs values, which a plain name cannot give", self.name)))
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, DeError> {
        Err(DeError::other(format!("`{}` needs a section, which a plain name cannot give", self.name)))
    }
}

#[cfg(test)]
mod tests {
    use super::nearest;

    #[test]
    fn suggests_only_likely_typos() {
        let keys = ["model_channels", "num_res_blocks", "channel_mult", "num_heads"];
        assert_eq!(nearest("model_chanels", &keys), Some("model_channels"));
        assert_eq!(nearest("chanel_mult", &keys), Some("channel_mult"));
        assert_eq!(nearest("num_haeds", &keys), Some("num_heads"));
        assert_eq!(nearest("Model_Channels", &keys), Some("model_channels"));
        assert_eq!(nearest("learning_rate", &keys), None);
        assert_eq!(nearest("adamx", &["adamw", "adam", "fused_adam"]), Some("adamw"));
    }
}
