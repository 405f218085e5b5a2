//! Backends that execute a compiled graph behind one interface (`Backend`, `Program`).

pub mod backend;
pub mod bench_ops;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod dist;
pub mod gpu;
pub mod host_memory;
pub mod profile;
pub mod tensor;

pub use backend::{Backend, Program};
pub use tensor::HostTensor;
