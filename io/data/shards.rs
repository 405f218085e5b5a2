//! Turning the user's shard specifications into a list of files: plain paths, brace patterns
//! (`shard-{000000..000099}.tar`, `{train,val}-{0..3}.tar`) and directories (every `*.tar` inside, sorted).

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Expands one brace pattern into the list of strings it stands for, in order.
///
/// `{A..B}` is a numeric range (inclusive, ascending or descending); if either bound has a leading zero, every
/// number is zero-padded to the wider bound's width, as in `braceexpand`. `{a,b,c}` is a list. Several groups
/// multiply out left to right. Groups do not nest.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err(Error::msg(format!("shard pattern {pattern:?}: '}}' without '{{'")));
        }
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find('}')
        .map(|i| open + i)
        .ok_or_else(|| Error::msg(format!("shard pattern {pattern:?}: '{{' without '}}'")))?;
    let body = &pattern[open + 1..close];
    if body.contains('{') {
        return Err(Error::msg(format!("shard pattern {pattern:?}: nested braces are not supported")));
    }
    let alternatives = expand_group(body).map_err(|msg| Error::msg(format!("shard pattern {pattern:?}: {msg}")))?;
    let head = &pattern[..open];
    let tails = expand_braces(&pattern[close + 1..])?;
    let mut out = Vec::with_capacity(alternatives.len() * tails.len());
    for alt in &alternatives {
        for tail in &tails {
            out.push(format!("{head}{alt}{tail}"));
        }
    }
    Ok(out)
}

/// The alternatives of one `{...}` group.
fn expand_group(body: &str) -> std::result::Result<Vec<String>, String> {
    if let Some((lo, hi)) = body.split_once("..") {
        let parse = |s: &str| s.parse::<u64>().map_err(|_| format!("range bound {s:?} is not a non-negative number"));
        let (a, b) = (parse(lo)?, parse(hi)?);
        let padded = (lo.len() > 1 && lo.starts_with('0')) || (hi.len() > 1 && hi.starts_with('0'));
        let width = if padded { lo.len().max(hi.len()) } else { 0 };
        let count = a.abs_diff(b) + 1;
        if count > 10_000_000 {
            return Err(format!("range {{{body}}} has {count} elements, more than any dataset needs"));
        }
        let numbers: Vec<u64> = if a <= b { (a..=b).collect() } else { (b..=a).rev().collect() };
        return Ok(numbers.into_iter().map(|n| format!("{n:0width$}")).collect());
    }
    if body.contains(',') {
        return Ok(body.split(',').map(str::to_string).collect());
    }
    Err(format!("{{{body}}} is neither a range {{A..B}} nor a list {{a,b}}"))
}

/// Resolves shard specifications to existing files, in the order given.
///
/// A directory contributes its `*.tar` files (not recursive) sorted by name; a pattern contributes its expansion.
/// A path that does not exist is an error naming it, as is a directory with no shards or an empty selection.
pub fn resolve_shards(specs: &[String]) -> Result<Vec<PathBuf>> {
    let (shards, mut problems) = resolve_shards_lenient(specs)?;
    if !problems.is_empty() {
        return Err(problems.swap_remove(0));
    }
    if shards.is_empty() {
        return Err(Error::msg("no shards given"));
    }
    Ok(shards)
}

/// Like [`resolve_shards`], but missing paths and empty directories are collected instead of stopping the
/// expansion (for `dataset check`, which reports them all). Malformed patterns are still an error.
pub fn resolve_shards_lenient(specs: &[String]) -> Result<(Vec<PathBuf>, Vec<Error>)> {
    let mut shards = Vec::new();
    let mut problems = Vec::new();
    for spec in specs {
        for path in expand_braces(spec)? {
            let path = PathBuf::from(path);
            if path.is_dir() {
                match tar_files_in(&path) {
                    Ok(found) if found.is_empty() => {
                        problems.push(Error::file(&path, "directory holds no .tar shards"));
                    }
                    Ok(found) => shards.extend(found),
                    Err(e) => problems.push(e),
                }
            } else if path.is_file() {
                shards.push(path);
            } else {
                problems.push(Error::file(&path, "shard not found"));
            }
        }
    }
    Ok((shards, problems))
}

fn tar_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::file(dir, format!("cannot list directory: {e}")))?;
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::file(dir, format!("cannot list directory: {e}")))?.path();
        if path.is_file() && path.extension().is_some_and(|ext| ext == "tar") {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_padded_range() {
        let v = expand_braces("shard-{000000..000003}.tar").unwrap();
        assert_eq!(v, ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]);
        let v = expand_braces("s{08..11}").unwrap();
        assert_eq!(v, ["s08", "s09", "s10", "s11"]);
    }

    #[test]
    fn plain_descending_list_and_product() {
        assert_eq!(expand_braces("{9..11}").unwrap(), ["9", "10", "11"]);
        assert_eq!(expand_braces("x{3..1}").unwrap(), ["x3", "x2", "x1"]);
        assert_eq!(expand_braces("{a,b}-{0..1}.tar").unwrap(), ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]);
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
    }

    #[test]
    fn malformed_patterns_are_errors() {
        for bad in ["a{0..3", "a}b", "{a{b}}", "{x..3}", "{single}"] {
            let err = expand_braces(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }
}
