//! Model hyper-parameters under the LDM/NeMo config key names. `Default` is Stable Diffusion 1.5.

use crate::error::{Error, Result};
use crate::graph::UnaryOp;

#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    pub image_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub model_channels: usize,
    pub attention_resolutions: Vec<usize>,
    /// Per level (a single number in a config applies to every level).
    pub num_res_blocks: Vec<usize>,
    pub channel_mult: Vec<usize>,
    /// -1 when `num_head_channels` decides.
    pub num_heads: i64,
    /// -1 when `num_heads` decides.
    pub num_head_channels: i64,
    pub use_spatial_transformer: bool,
    pub transformer_depth: usize,
    pub context_dim: usize,
    pub use_linear_in_transformer: bool,
    pub legacy: bool,
    /// Recompute each block's activations in the backward instead of keeping them.
    pub use_checkpoint: bool,
    /// Attention is one op in the graph either way; on the CUDA executor this selects the flash kernels for it
    /// (bf16/f16, supported head dims), and the CPU backend ignores it.
    pub use_flash_attention: bool,
}

impl Default for UNetConfig {
    fn default() -> Self {
        UNetConfig {
            image_size: 32,
            in_channels: 4,
            out_channels: 4,
            model_channels: 320,
            attention_resolutions: vec![4, 2, 1],
            num_res_blocks: vec![2; 4],
            channel_mult: vec![1, 2, 4, 4],
            num_heads: 8,
            num_head_channels: -1,
            use_spatial_transformer: true,
            transformer_depth: 1,
            context_dim: 768,
            use_linear_in_transformer: false,
            legacy: false,
            use_checkpoint: false,
            use_flash_attention: false,
        }
    }
}

impl UNetConfig {
    /// (heads, channels per head) of the attention at `ch` channels, as the LDM code derives them.
    pub fn heads(&self, ch: usize) -> Result<(usize, usize)> {
        let (heads, dim_head) = if self.num_head_channels == -1 {
            if self.num_heads <= 0 {
                return Err(Error::msg("unet_config: set num_heads or num_head_channels"));
            }
            (self.num_heads as usize, ch / self.num_heads as usize)
        } else {
            let hc = self.num_head_channels as usize;
            (ch / hc, hc)
        };
        // `legacy` derives the head width from the head count for spatial transformers.
        let dim_head = if self.legacy { ch / heads } else { dim_head };
        if heads == 0 || dim_head == 0 || heads * dim_head != ch {
            return Err(Error::msg(format!(
                "unet_config: {ch} channels do not split into {heads} heads of {dim_head}"
            )));
        }
        Ok((heads, dim_head))
    }

    pub fn time_embed_dim(&self) -> usize {
        self.model_channels * 4
    }

    /// Checks what the LDM constructors assert, with errors that name the key.
    pub fn validate(&self, section: &str) -> Result<()> {
        let bad = |k: &str, why: String| Err(Error::msg(format!("{section}.{k}: {why}")));
        if self.channel_mult.is_empty() {
            return bad("channel_mult", "must list at least one level".into());
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
        if !self.use_spatial_transformer {
            return bad(
                "use_spatial_transformer",
                "only SpatialTransformer U-Nets (all SD versions) are supported".into(),
            );
        }
        for (level, m) in self.channel_mult.iter().enumerate() {
            let ch = m * self.model_channels;
            if !ch.is_multiple_of(32) {
                return bad(
                    "model_channels",
                    format!("level {level} has {ch} channels, not a multiple of GroupNorm's 32 groups"),
                );
            }
            if self.attention_resolutions.contains(&(1 << level)) {
                self.heads(ch)?;
            }
        }
        if !self.model_channels.is_multiple_of(2) {
            return bad("model_channels", "must be even (sinusoidal timestep embedding)".into());
        }
        Ok(())
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

/// AutoencoderKL (`first_stage_config`), ddconfig keys.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    pub embed_dim: usize,
    pub double_z: bool,
    pub z_channels: usize,
    pub resolution: usize,
    pub in_channels: usize,
    pub out_ch: usize,
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_resolutions: Vec<usize>,
    pub scale_factor: f64,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            embed_dim: 4,
            double_z: true,
            z_channels: 4,
            resolution: 256,
            in_channels: 3,
            out_ch: 3,
            ch: 128,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_resolutions: vec![],
            scale_factor: 0.18215,
        }
    }
}

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
