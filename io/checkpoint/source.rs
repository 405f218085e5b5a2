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

    /// Tells the kernel that `range` of the mapping will not be read again soon, so its pages leave this process's
    /// resident memory (they stay in the page cache, reclaimable, and a later read faults them back in from the
    /// file). Loading copies each tensor out of the mapping; without this the touched pages of a 4 GB checkpoint
    /// would count twice, once mapped and once copied. Only whole pages inside `range` are released; an owned source
    /// has nothing to release. Advisory: a failure changes nothing but memory use, so it is ignored.
    pub(crate) fn release(&self, range: std::ops::Range<usize>) {
        let Source::Mapped(map) = self else { return };
        let page = page_size();
        let start = range.start.div_ceil(page) * page;
        let end = (range.end.min(map.len()) / page) * page;
        if end > start {
            // SAFETY: DontNeed is "unchecked" because on a private writable mapping it discards the process's
            // changes. This mapping is read-only: nothing was written, and the released pages read back from the file
            // with the same bytes, so every slice borrowed from the mapping stays valid and unchanged.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
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

/// The memory page size the advice is aligned to: 4 KiB on x86-64 (and most aarch64 kernels). On a kernel with larger
/// pages an advice not aligned to them is refused (EINVAL) and ignored: memory use goes up, nothing else changes.
fn page_size() -> usize {
    4096
}
