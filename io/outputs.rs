//! Output files and the inputs they must not land on: a command never writes over one of its own inputs (the same
//! file under another name, through a symlink or a hard link, included), and an existing output is replaced only
//! with `--force`.

use std::collections::HashMap;
use std::path::Path;
#[cfg(not(unix))]
use std::path::PathBuf;

use crate::error::{Error, Result};

/// What identifies a file whatever the path that reaches it (symlinks followed): device and inode on Unix, the
/// canonical path elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileId(Id);

#[cfg(unix)]
type Id = (u64, u64);
#[cfg(not(unix))]
type Id = PathBuf;

impl FileId {
    /// The file at `path`; `None` when nothing is there.
    pub fn of(path: &Path) -> Option<FileId> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(path).ok()?;
            Some(FileId((m.dev(), m.ino())))
        }
        #[cfg(not(unix))]
        {
            std::fs::canonicalize(path).ok().map(FileId)
        }
    }
}

/// A command's input files, by identity, each with how the user named it (`--ckpt`, or `the input image x.png`).
#[derive(Debug, Default)]
pub struct Inputs {
    ids: HashMap<FileId, String>,
}

impl Inputs {
    pub fn new() -> Inputs {
        Inputs::default()
    }

    /// Adds an input; one that does not exist (yet) cannot be written over and is left out.
    pub fn add(&mut self, path: &Path, described: impl FnOnce() -> String) {
        if let Some(id) = FileId::of(path) {
            self.ids.entry(id).or_insert_with(described);
        }
    }

    /// How the user named the input that `path` is, if it is one.
    pub fn find(&self, path: &Path) -> Option<&str> {
        self.ids.get(&FileId::of(path)?).map(String::as_str)
    }
}

/// Checks that the output `out` (given by `flag`, e.g. `--out`) may be written: it must not be one of `inputs`
/// (even with `--force`), and if it exists, `force` must be set.
pub fn check_output(flag: &str, out: &Path, inputs: &Inputs, force: bool) -> Result<()> {
    check_not_input(flag, out, inputs)?;
    if !force && std::fs::symlink_metadata(out).is_ok() {
        return Err(Error::msg(format!("{flag} {} exists; pass --force to overwrite it", out.display())));
    }
    Ok(())
}

/// Checks that the output `out` (given by `flag`) is not one of `inputs`; an existing output is replaced.
fn check_not_input(flag: &str, out: &Path, inputs: &Inputs) -> Result<()> {
    match inputs.find(out) {
        Some(input) => Err(Error::msg(format!(
            "{flag} {} is the same file as {input}: refusing to write over an input",
            out.display()
        ))),
        None => Ok(()),
    }
}
