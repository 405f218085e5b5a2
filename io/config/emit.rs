//! Writes a config back as YAML (to print the effective config, or save it beside a checkpoint). The output
//! loads back to the same config.

use serde_json::Value as Json;

use super::scalar::{resolve_plain, Resolved};

pub fn to_yaml(value: &Json) -> String {
    let mut out = String::new();
    match value {
        Json::Object(map) if !map.is_empty() => write_map(map, 0, &mut out),
        other => {
            out.push_str(&inline(other));
            out.push('\n');
        }
    }
    out
}

fn write_map(map: &serde_json::Map<String, Json>, indent: usize, out: &mut String) {
    for (key, value) in map {
        out.push_str(&" ".repeat(indent));
        out.push_str(&string(key));
        out.push(':');
        match value {
            Json::Object(inner) if !inner.is_empty() => {
                out.push('\n');
                write_map(inner, indent + 2, out);
            }
            Json::Array(items) if items.iter().any(|i| matches!(i, Json::Object(_) | Json::Array(_))) => {
                out.push('\n');
                for item in items {
                    out.push_str(&" ".repeat(indent + 2));
                    out.push_str("- ");
                    match item {
                        Json::Object(inner) if !inner.is_empty() => {
                            // The first key goes on the dash's line; the rest align under it.
                            let mut nested = String::new();
                            write_map(inner, indent + 4, &mut nested);
                            out.push_str(nested.trim_start());
                        }
                        other => {
                            out.push_str(&inline(other));
                            out.push('\n');
                        }
                    }
                }
            }
            other => {
                out.push(' ');
                out.push_str(&inline(other));
                out.push('\n');
            }
        }
    }
}

/// A value on one line: scalars, flow lists, `{}`.
fn inline(value: &Json) -> String {
    match value {
        Json::Null => "null".to_string(),
        Json::Bool(b) => if *b { "True" } else { "False" }.to_string(),
        Json::Number(n) => n.to_string(),
        Json::String(s) => string(s),
        Json::Array(items) => format!("[{}]", items.iter().map(inline).collect::<Vec<_>>().join(", ")),
        Json::Object(map) => format!(
            "{{{}}}",
            map.iter().map(|(k, v)| format!("{}: {}", string(k), inline(v))).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// A string plain when it reads back as the same string, double-quoted (JSON escapes are valid YAML) otherwise.
fn string(s: &str) -> String {
    let plain_safe = !s.is_empty()
        && s.trim() == s
        && !s.starts_with(['-', '?', ':', '<'])
        && !s.contains(|c: char| c.is_control() || ":#{}[],&*!|>'\"%@`$\\".contains(c))
        && matches!(resolve_plain(s), Resolved::Str(_));
    if plain_safe {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
    }
}
