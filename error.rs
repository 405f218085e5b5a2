//! The one error type of the crate: every failure a user can cause reads as a single clear line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A graph was built with inconsistent shapes or dtypes.
    #[error("shape error in {op}: {msg}")]
    Shape { op: String, msg: String },
    /// A feature or op that a backend does not provide.
    #[error("{backend} backend: {msg}")]
    Unsupported { backend: &'static str, msg: String },
    /// The CUDA runtime or a CUDA library is not usable on this machine.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    /// An input given at run time does not match what the graph declared.
    #[error("input {name}: {msg}")]
    Binding { name: String, msg: String },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn shape(op: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Shape { op: op.into(), msg: msg.into() }
    }
    pub fn msg(msg: impl Into<String>) -> Self {
        Error::Msg(msg.into())
    }
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File { path: path.into(), msg: msg.into() }
    }
}
