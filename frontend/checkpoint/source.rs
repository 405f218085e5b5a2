//! The bytes a checkpoint is read from: the file mapped into memory, or (for a compressed archive member) a buffer.

use crate::error::{Error, Result};
use memmap2::Mmap;
use std::fs::File;
use std::path::Path;

pub(crate) enum Source {
    /// The whole file, mapped read-only: tensors are slices of the page cache, never copied.
    Mapped(Mmap),
    /// Bytes that had to be produced (decompressed), e.g. the weights inside a gzipped `.nemo`.
    Owned(Vec<u8>),
}

impl Source {
    pub(crate) fn map(path: &Path) -> Result<Source> {
        let file = File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
        let meta = file.metadata().map_err(|e| Error::file(path, format!("cannot stat: {e}")))?;
        if !meta.is_file() {
            return Err(Error::file(path, "not a regular file"));
        }
        if meta.len() == 0 {
            return Err(Error::file(path, "the file is empty"));
        }
        // SAFETY: the mapping is read-only and private to this process. It is undefined behaviour only if another
        // process truncates or rewrites the file in place while it is mapped; zeroconv's own writer never does that
        // (it writes a temporary file and renames it over the target, which leaves a mapped inode untouched), and
        // checkpoint files are not expected to be modified in place by other tools while a run reads them.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::file(path, format!("cannot map into memory: {e}")))?;
        Ok(Source::Mapped(map))
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Source::Mapped(m) => m,
            Source::Owned(v) => v,
        }
    }

    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self, Source::Mapped(_))
    }
}
