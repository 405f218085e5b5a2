//! Model hyper-parameters under the LDM/NeMo config key names. `Default` is Stable Diffusion 1.5.
//!
//! The U-Net's architecture keys are listed once, in `unet_architecture!`: that list defines [`UNetConfig`]'s
//! fields and defaults here, and the same keys of the config sections `unet_config` and `control_stage_config`
//! (in the types a config spells them in) with their defaults and their conversion to [`UNetConfig`]. The VAE's
//! `ddconfig` keys likewise, in `vae_architecture!` ([`VaeConfig`] and the `ddconfig` section).

use crate::error::{Error, Result};
use crate::graph::UnaryOp;

/// The U-Net architecture keys (LDM's `UNetModel` arguments), written once: each key's doc, its type in the model's
/// hyper-parameters, `as` the type a config file spells it in (with that spelling's serde attributes), and its
/// default (SD 1.5). Expands to `$callback! { $args architecture { keys } }`. The keys are shared by [`UNetConfig`]
/// (here, through `unet_hyper_parameters!`) and by the config sections `unet_config` and `control_stage_config`
/// (`io::config::schema`, whose `Default` and conversion to [`UNetConfig`] go through the same list). A macro rather
/// than a struct both embed: serde's `flatten` cannot be combined with `deny_unknown_fields`. The config spellings'
/// serde attributes are read only by the config sections, and their paths resolve there.
macro_rules! unet_architecture {
    ($callback:ident! { $($args:tt)* }) => {
        $callback! {
            $($args)*
            architecture {
                /// Latent size the model was built for (informational in LDM; the data decides the real size).
                image_size: usize as u32 = 32,
                in_channels: usize as u32 = 4,
                model_channels: usize as u32 = 320,
                /// Downsampling factors (1, 2, 4, ...) of the levels that have attention.
                attention_resolutions: Vec<usize> as Vec<u32> = vec![4, 2, 1],
                /// ResBlocks per level: one number in a config, for every level.
                num_res_blocks: Vec<usize> as u32 = vec![2; 4],
                channel_mult: Vec<usize> as Vec<u32> = vec![1, 2, 4, 4],
                /// Attention heads; -1 when num_head_channels sets the head width instead.
                num_heads: i64 as #[serde(with = "minus_one_is_none")] Option<u32> = 8,
                /// Channels per attention head (SD 2 style); -1 to use num_heads.
                num_head_channels: i64 as #[serde(with = "minus_one_is_none")] Option<u32> = -1,
                use_spatial_transformer: bool as bool = true,
                transformer_depth: usize as u32 = 1,
                /// Width of the text embeddings that cross-attention reads.
                context_dim: usize as u32 = 768,
                /// Linear instead of 1×1-conv projections around the transformer blocks (SD 2).
                use_linear_in_transformer: bool as bool = false,
                /// LDM's legacy head-count rule (kept for checkpoint compatibility).
                legacy: bool as bool = false,
                /// Recompute each block's activations in the backward instead of keeping them (gradient
                /// checkpointing).
                use_checkpoint: bool as bool = false,
                /// Attention is one op in the graph either way; on the CUDA executor this selects the flash kernels
                /// for it (bf16/f16, supported head dims), and the CPU backend ignores it.
                use_flash_attention: bool as bool = false,
            }
        }
    };
}
pub(crate) use unet_architecture;

/// [`UNetConfig`] from the architecture keys, in their model types, after `out_channels` (which the ControlNet's
/// config section does not have).
macro_rules! unet_hyper_parameters {
    (
        architecture {
            $($(#[$doc:meta])* $key:ident: $model:ty as $(#[$spelling:meta])* $config:ty = $default:expr,)*
        }
    ) => {
        /// A U-Net's hyper-parameters under the LDM/NeMo key names (`num_res_blocks` per level, -1 for an unset
        /// head count). `Default` is Stable Diffusion 1.5.
        #[derive(Clone, Debug, PartialEq)]
        pub struct UNetConfig {
            pub out_channels: usize,
            $($(#[$doc])* pub $key: $model,)*
        }

        impl Default for UNetConfig {
            fn default() -> Self {
                UNetConfig { out_channels: 4, $($key: $default,)* }
            }
        }
    };
}

unet_architecture! { unet_hyper_parameters! {} }

/// GroupNorm's group count in the U-Net, the ControlNet and the VAE: every normalised width is a multiple of it.
pub const GROUP_NORM_GROUPS: usize = 32;

/// The first problem with a U-Net architecture: the key it is about (relative to the config section, e.g.
/// `num_heads`) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchProblem {
    pub key: &'static str,
    pub why: String,
}

impl UNetConfig {
    /// (heads, channels per head) of the attention at `ch` channels, as the LDM code derives them.
    pub fn heads(&self, ch: usize) -> Result<(usize, usize)> {
        self.head_split(ch).map_err(|p| Error::msg(format!("unet_config.{}: {}", p.key, p.why)))
    }

    fn head_split(&self, ch: usize) -> std::result::Result<(usize, usize), ArchProblem> {
        let (heads, dim_head, key) = if self.num_head_channels == -1 {
            if self.num_heads <= 0 {
                return Err(ArchProblem { key: "num_heads", why: "set num_heads or num_head_channels".into() });
            }
            (self.num_heads as usize, ch / self.num_heads as usize, "num_heads")
        } else if self.num_head_channels <= 0 {
            return Err(ArchProblem {
                key: "num_head_channels",
                why: "must be positive, or -1 to use num_heads".into(),
            });
        } else {
            let hc = self.num_head_channels as usize;
            (ch / hc, hc, "num_head_channels")
        };
        // `legacy` derives the head width from the head count for spatial transformers.
        let dim_head = if self.legacy && heads > 0 { ch / heads } else { dim_head };
        if heads == 0 || dim_head == 0 || heads * dim_head != ch {
            return Err(ArchProblem {
                key,
                why: format!("{ch} channels do not split into {heads} heads of {dim_head}"),
            });
        }
        Ok((heads, dim_head))
    }

    pub fn time_embed_dim(&self) -> usize {
        self.model_channels * 4
    }

    /// The architecture keys a ControlNet shares with the U-Net it is copied from, with their values as a config
    /// spells them (-1 for an unset head count), in the config's order: where two sections must agree, this names
    /// the first key that does not.
    pub fn mirrored_keys(&self) -> [(&'static str, String); 12] {
        [
            ("in_channels", self.in_channels.to_string()),
            ("model_channels", self.model_channels.to_string()),
            ("channel_mult", format!("{:?}", self.channel_mult)),
            ("num_res_blocks", format!("{:?}", self.num_res_blocks)),
            ("attention_resolutions", format!("{:?}", self.attention_resolutions)),
            ("num_heads", self.num_heads.to_string()),
            ("num_head_channels", self.num_head_channels.to_string()),
            ("use_spatial_transformer", self.use_spatial_transformer.to_string()),
            ("transformer_depth", self.transformer_depth.to_string()),
            ("context_dim", self.context_dim.to_string()),
            ("use_linear_in_transformer", self.use_linear_in_transformer.to_string()),
            ("legacy", self.legacy.to_string()),
        ]
    }

    /// Everything the LDM constructors assert, and what zeroconv needs on top: the one check of a U-Net (or a
    /// ControlNet's encoder) architecture, used when a config is read and again when a model is built.
    pub fn check(&self) -> std::result::Result<(), ArchProblem> {
        let bad = |key: &'static str, why: String| Err(ArchProblem { key, why });
        if self.channel_mult.is_empty() {
            return bad("channel_mult", "needs at least one level".into());
        }
        if self.num_res_blocks.len() != self.channel_mult.len() {
            return bad(
                "num_res_blocks",
                format!(
                    "has {} entries but channel_mult has {} levels",
                    self.num_res_blocks.len(),
                    self.channel_mult.len()
                ),
            );
        }
        if self.num_res_blocks.contains(&0) {
            return bad("num_res_blocks", "must be at least 1".into());
        }
        if self.in_channels == 0 {
            return bad("in_channels", "must be at least 1".into());
        }
        if !self.use_spatial_transformer {
            return bad(
                "use_spatial_transformer",
                "only SpatialTransformer U-Nets (all SD versions) are supported".into(),
            );
        }
        let widths: Vec<usize> = self.channel_mult.iter().map(|m| m * self.model_channels).collect();
        if self.model_channels == 0 || widths.iter().any(|w| !w.is_multiple_of(GROUP_NORM_GROUPS)) {
            return bad(
                "model_channels",
                format!(
                    "every level's width (model_channels × channel_mult = {widths:?}) must be a positive multiple of \
                     {GROUP_NORM_GROUPS}, the GroupNorm group count"
                ),
            );
        }
        if !self.model_channels.is_multiple_of(2) {
            return bad("model_channels", "must be even (sinusoidal timestep embedding)".into());
        }
        // Level i works at downsampling factor 2^i; an attention resolution that matches no level is a mistake.
        let factors: Vec<usize> = (0..self.channel_mult.len()).map(|i| 1usize << i.min(62)).collect();
        if let Some(r) = self.attention_resolutions.iter().find(|r| !factors.contains(r)) {
            return bad(
                "attention_resolutions",
                format!("{r} matches no level; the levels' downsampling factors are {factors:?}"),
            );
        }
        // The levels with attention, and the middle block, which always has it.
        let attention_widths = factors
            .iter()
            .zip(&widths)
            .filter(|(f, _)| self.attention_resolutions.contains(f))
            .map(|(_, w)| *w)
            .chain(widths.last().copied());
        for ch in attention_widths {
            self.head_split(ch)?;
        }
        if self.context_dim == 0 {
            return bad("context_dim", "must be at least 1".into());
        }
        if self.transformer_depth == 0 {
            return bad("transformer_depth", "must be at least 1".into());
        }
        Ok(())
    }

    /// [`UNetConfig::check`] as an error naming `section` (e.g. `unet_config`) and the key.
    pub fn validate(&self, section: &str) -> Result<()> {
        self.check().map_err(|p| Error::msg(format!("{section}.{}: {}", p.key, p.why)))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ControlNetConfig {
    /// The encoder half of a U-Net (`out_channels` unused).
    pub unet: UNetConfig,
    pub hint_channels: usize,
}

impl Default for ControlNetConfig {
    fn default() -> Self {
        ControlNetConfig { unet: UNetConfig::default(), hint_channels: 3 }
    }
}

/// The VAE's `ddconfig` keys (LDM's `Encoder`/`Decoder` arguments), written once as `unet_architecture!` writes the
/// U-Net's: doc, model type, `as` the config's spelling, default (the SD VAE). Shared by [`VaeConfig`] (through
/// `vae_hyper_parameters!`) and the config section `first_stage_config.params.ddconfig` (`io::config::schema`).
macro_rules! vae_architecture {
    ($callback:ident! { $($args:tt)* }) => {
        $callback! {
            $($args)*
            architecture {
                /// The encoder outputs mean and log-variance (2 × z_channels).
                double_z: bool as bool = true,
                z_channels: usize as u32 = 4,
                /// Image size the model was built for (decides which levels get attention).
                resolution: usize as u32 = 256,
                in_channels: usize as u32 = 3,
                out_ch: usize as u32 = 3,
                ch: usize as u32 = 128,
                ch_mult: Vec<usize> as Vec<u32> = vec![1, 2, 4, 4],
                num_res_blocks: usize as u32 = 2,
                attn_resolutions: Vec<usize> as Vec<u32> = Vec::new(),
            }
        }
    };
}
pub(crate) use vae_architecture;

/// [`VaeConfig`] from the `ddconfig` keys, between `embed_dim` and `scale_factor` (which the config keeps elsewhere).
macro_rules! vae_hyper_parameters {
    (
        architecture {
            $($(#[$doc:meta])* $key:ident: $model:ty as $(#[$spelling:meta])* $config:ty = $default:expr,)*
        }
    ) => {
        /// AutoencoderKL (`first_stage_config`): the latent channels, the `ddconfig` keys and the latent scale.
        #[derive(Clone, Debug, PartialEq)]
        pub struct VaeConfig {
            pub embed_dim: usize,
            $($(#[$doc])* pub $key: $model,)*
            pub scale_factor: f64,
        }

        impl Default for VaeConfig {
            fn default() -> Self {
                VaeConfig { embed_dim: 4, $($key: $default,)* scale_factor: 0.18215 }
            }
        }
    };
}

vae_architecture! { vae_hyper_parameters! {} }

/// The CLIP text transformer (`cond_stage_config`). Default: ViT-L/14 as in SD 1.x.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub layer_norm_eps: f64,
    /// The MLP's activation: quick-GELU in OpenAI's CLIP (SD 1.x), exact GELU in OpenCLIP (SD 2.x).
    pub activation: ClipActivation,
    /// Which hidden state conditions the U-Net.
    pub output: ClipOutput,
}

/// The activation between the two linear layers of each block's MLP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClipActivation {
    /// x * sigmoid(1.702 x): OpenAI's CLIP (`hidden_act: quick_gelu`), SD 1.x's text encoder.
    #[default]
    QuickGelu,
    /// The exact, erf-based GELU (`nn.GELU()`): OpenCLIP's ViT-H-14 (SD 2.x), and diffusers' SD 2 `text_encoder/`
    /// (`hidden_act: gelu`).
    Gelu,
}

impl ClipActivation {
    pub fn op(self) -> UnaryOp {
        match self {
            ClipActivation::QuickGelu => UnaryOp::QuickGelu,
            ClipActivation::Gelu => UnaryOp::GeluErf,
        }
    }
}

/// The text encoder output the U-Net reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipOutput {
    /// The final layer norm of the last layer's output (SD 1.x's FrozenCLIPEmbedder, layer "last").
    Last,
    /// The final layer norm of the second-to-last layer's output (SD 2.x's FrozenOpenCLIPEmbedder,
    /// layer "penultimate", which applies `ln_final` after stopping one block early).
    Penultimate,
    /// The raw output of layer `i` (0-based), no final norm (FrozenCLIPEmbedder, layer "hidden").
    Hidden(usize),
}

impl Default for ClipConfig {
    fn default() -> Self {
        ClipConfig {
            vocab_size: 49408,
            max_position_embeddings: 77,
            hidden_size: 768,
            intermediate_size: 3072,
            num_layers: 12,
            num_heads: 12,
            layer_norm_eps: 1e-5,
            activation: ClipActivation::QuickGelu,
            output: ClipOutput::Last,
        }
    }
}
