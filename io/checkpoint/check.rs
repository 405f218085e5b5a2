//! Comparing a checkpoint with the keys and shapes a model expects, reported as one readable error.

use super::Checkpoint;
use crate::error::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};

/// How many entries of each kind the report lists before it says "... and N more".
const SHOWN: usize = 10;

/// Checks that the checkpoint holds exactly the `expected` tensors under `prefix` (names are relative to it), with
/// the expected shapes. Returns one error listing the missing keys (each with the nearest present key when one is
/// close: usually a renamed or mis-prefixed weight), the unexpected keys and the mis-shaped ones, the first
/// ten of each with counts. Keys outside `prefix` are ignored; the dtype is not checked (any is converted on load).
pub fn check_keys(expected: &[(String, Vec<usize>)], ckpt: &Checkpoint, prefix: &str) -> Result<()> {
    let view = ckpt.prefixed(prefix);
    let expected_names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    for (name, shape) in expected {
        match view.shape(name) {
            None => missing.push(name.as_str()),
            Some(found) if found != shape.as_slice() => {
                misshaped.push(format!("{name}: expected {shape:?}, checkpoint has {found:?}"))
            }
            Some(_) => {}
        }
    }
    let unexpected: Vec<&str> = view.keys().filter(|k| !expected_names.contains(k)).collect();
    if missing.is_empty() && unexpected.is_empty() && misshaped.is_empty() {
        return Ok(());
    }

    let mut report = format!(
        "checkpoint does not match the model{}: {} missing, {} unexpected, {} mis-shaped",
        if prefix.is_empty() { String::new() } else { format!(" under prefix '{prefix}'") },
        missing.len(),
        unexpected.len(),
        misshaped.len()
    );
    if !missing.is_empty() {
        // A missing key's likely counterpart is a key nothing else claimed: an unexpected one, or one outside the
        // prefix when the prefix itself is wrong.
        let candidates: Vec<String> = unexpected
            .iter()
            .map(|k| k.to_string())
            .chain(ckpt.keys().filter(|k| !k.starts_with(prefix)).map(str::to_string))
            .collect();
        let lines = missing.iter().take(SHOWN).map(|name| {
            let full = format!("{prefix}{name}");
            if let Some(why) = ckpt.skipped().get(&full) {
                format!("{name} (present but unreadable: {why})")
            } else if let Some(near) = nearest(name, candidates.iter().map(String::as_str)) {
                format!("{name} (nearest present key: {near})")
            } else {
                name.to_string()
            }
        });
        push_section(&mut report, "missing", missing.len(), lines);
    }
    if !unexpected.is_empty() {
        push_section(&mut report, "unexpected", unexpected.len(), unexpected.iter().take(SHOWN).map(|k| k.to_string()));
    }
    if !misshaped.is_empty() {
        push_section(&mut report, "mis-shaped", misshaped.len(), misshaped.iter().take(SHOWN).cloned());
    }
    if view.keys().next().is_none() && !prefix.is_empty() {
        report.push_str(&format!(
            "\n  no key starts with '{prefix}'; the checkpoint's keys start with: {}",
            top_prefixes(ckpt)
        ));
    }
    Err(Error::file(ckpt.path(), report))
}

fn push_section(report: &mut String, title: &str, count: usize, lines: impl Iterator<Item = String>) {
    report.push_str(&format!("\n  {title} ({count}):"));
    for line in lines {
        report.push_str(&format!("\n    {line}"));
    }
    if count > SHOWN {
        report.push_str(&format!("\n    ... and {} more", count - SHOWN));
    }
}

/// The first dotted segment of the keys with counts, e.g. "model. (686), first_stage_model. (248)".
fn top_prefixes(ckpt: &Checkpoint) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for key in ckpt.keys() {
        let head = key.find('.').map_or(key, |i| &key[..=i]);
        *counts.entry(head).or_default() += 1;
    }
    let parts: Vec<String> = counts.iter().take(SHOWN).map(|(p, n)| format!("{p} ({n})")).collect();
    if parts.is_empty() {
        "(the checkpoint is empty)".into()
    } else {
        parts.join(", ")
    }
}

/// The candidate closest to `key` by edit distance, if it is close enough to be a plausible typo or rename:
/// within a quarter of the key's length (at least 3 edits).
pub(crate) fn nearest<'a>(key: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (key.len() / 4).max(3);
    candidates
        .filter(|c| c.len().abs_diff(key.len()) <= limit)
        .map(|c| (edit_distance(key.as_bytes(), c.as_bytes()), c))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, c)| c)
}

/// Levenshtein distance over bytes (keys are ASCII), two rows of memory.
fn edit_distance(a: &[u8], b: &[u8]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, &ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_insertions_deletions_substitutions() {
        assert_eq!(edit_distance(b"kitten", b"sitting"), 3);
        assert_eq!(edit_distance(b"", b"abc"), 3);
        assert_eq!(edit_distance(b"in_layers.1.weight", b"in_layers.2.weight"), 1);
    }

    #[test]
    fn nearest_refuses_far_candidates() {
        let keys = ["input_blocks.1.0.in_layers.2.weight", "time_embed.0.weight"];
        assert_eq!(nearest("input_blocks.1.0.in_layers.1.weight", keys.into_iter()), Some(keys[0]));
        assert_eq!(nearest("completely.different.name", keys.into_iter()), None);
    }
}
