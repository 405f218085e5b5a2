//! The application: the `zeroconv` command line (`main.rs` routes, `cli/` holds one file per command), the
//! training loop (`train/`), sampling (`sampler`), the parity tool (`parity`), the choice of device, the training step as
//! every command compiles it (`step`), and the weights of a run (`weights/`: initialisation, upload, the host store).
//! It reads everything through `crate::io`.

pub mod cli;
pub mod device;
pub mod parity;
pub mod sampler;
pub mod step;
pub mod train;
pub mod weights;
