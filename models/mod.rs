//! Stable Diffusion's models built on the graph IR, with the original checkpoint key names:
//! the U-Net, the ControlNet, the VAE, the CLIP text encoder and the noise schedule.
//! Nothing here touches a device.

pub mod builder;
pub mod clip;
pub mod config;
pub mod control_ldm;
pub mod controlnet;
pub mod counts;
pub mod layers;
pub mod schedule;
pub mod train_step;
pub mod unet;
pub mod vae;

pub use builder::{Init, ModelBuilder, ParamSpec};
pub use config::{
    ArchProblem, ClipActivation, ClipConfig, ClipOutput, ControlNetConfig, UNetConfig, VaeConfig, GROUP_NORM_GROUPS,
};

/// Checkpoint key prefixes of the original `ControlLDM` / `LatentDiffusion`.
pub const UNET_PREFIX: &str = "model.diffusion_model";
pub const CONTROL_PREFIX: &str = "control_model";
pub const VAE_PREFIX: &str = "first_stage_model";
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.text_model";
