//! The typed config: every key zeroconv reads, with its default. Key names and layout are NeMo's ControlNet
//! config (`examples/multimodal/text_to_image/controlnet/conf/controlnet_v1-5.yaml`), so a NeMo file loads
//! unchanged; the keys NeMo has that zeroconv does not read are listed in [`super::nemo::IGNORED_KEYS`].
//! Defaults are Stable Diffusion 1.5 ControlNet's (what NeMo's file sets), or PyTorch's where NeMo leaves a
//! key out. A key that is neither read here nor ignored there is an error.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::values::{
    minus_one_is_none, Accelerator, ClipLayer, CropSize, HiddenAct, Interpolation, OptimizerName, Precision,
    SamplerName, SchedulerName, Spelling, TextCleanup, ValCheckInterval,
};
use crate::models::config::{unet_architecture, vae_architecture};

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub trainer: TrainerConfig,
    pub exp_manager: ExpManagerConfig,
    pub model: ModelConfig,
    /// Settings of `zeroconv sample` (NeMo's `controlnet_infer.yaml`).
    pub infer: InferConfig,
}

/// PyTorch Lightning trainer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerConfig {
    /// Devices per node (data parallel).
    pub devices: u32,
    pub num_nodes: u32,
    pub accelerator: Accelerator,
    pub precision: Precision,
    /// Optimizer steps to train for; -1 for no limit (then max_epochs applies).
    #[serde(with = "minus_one_is_none")]
    pub max_steps: Option<u64>,
    /// Passes over the data; -1 or null for no limit.
    #[serde(with = "minus_one_is_none")]
    pub max_epochs: Option<u64>,
    pub log_every_n_steps: u64,
    /// How often validation runs, when a validation set is configured.
    pub val_check_interval: Option<ValCheckInterval>,
    /// Clip the global gradient norm to this value; null or 0 to not clip.
    pub gradient_clip_val: Option<f64>,
    /// Micro-batches per optimizer step, when model.global_batch_size is not set.
    pub accumulate_grad_batches: u32,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            devices: 1,
            num_nodes: 1,
            accelerator: Accelerator::Auto,
            precision: Precision::F32,
            max_steps: None,
            max_epochs: None,
            log_every_n_steps: 50,
            val_check_interval: None,
            gradient_clip_val: None,
            accumulate_grad_batches: 1,
        }
    }
}

/// Where runs, logs and checkpoints go (NeMo's exp_manager).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExpManagerConfig {
    /// Root of all runs; null for `./zeroconv_experiments`.
    pub exp_dir: Option<PathBuf>,
    /// Run name: the run's directory is `exp_dir/name`.
    pub name: String,
    /// Write this run's files exactly here instead of `exp_dir/name`.
    pub explicit_log_dir: Option<PathBuf>,
    /// Save checkpoints at all.
    pub create_checkpoint_callback: bool,
    pub checkpoint_callback_params: CheckpointParams,
    /// Resume from the newest checkpoint in the run directory when there is one.
    pub resume_if_exists: bool,
    /// With resume_if_exists, start afresh instead of failing when the directory has no checkpoint.
    pub resume_ignore_no_checkpoint: bool,
    /// Resume from this checkpoint (NeMo interpolates it from model.resume_from_checkpoint).
    pub resume_from_checkpoint: Option<PathBuf>,
}

impl Default for ExpManagerConfig {
    fn default() -> Self {
        ExpManagerConfig {
            exp_dir: None,
            name: "zeroconv".to_string(),
            explicit_log_dir: None,
            create_checkpoint_callback: true,
            checkpoint_callback_params: CheckpointParams::default(),
            resume_if_exists: false,
            resume_ignore_no_checkpoint: false,
            resume_from_checkpoint: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointParams {
    /// Save a checkpoint every this many optimizer steps; null to save only at the end.
    pub every_n_train_steps: Option<u64>,
    /// Keep the newest K checkpoints; -1 keeps all, 0 keeps none but the last.
    #[serde(with = "minus_one_is_none")]
    pub save_top_k: Option<u32>,
}

impl Default for CheckpointParams {
    fn default() -> Self {
        CheckpointParams { every_n_train_steps: None, save_top_k: Some(3) }
    }
}

/// The ControlNet training setup (NeMo's `model:` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Samples per device per micro-step.
    pub micro_batch_size: u32,
    /// Samples per optimizer step over all devices; null for micro_batch_size × devices × num_nodes ×
    /// trainer.accumulate_grad_batches. Gradient accumulation follows from it, as in NeMo.
    pub global_batch_size: Option<u32>,
    /// Linear beta schedule (in sqrt space, as LDM's "linear"): first and last beta, and the step count.
    pub linear_start: f64,
    pub linear_end: f64,
    pub timesteps: u32,
    /// Batch keys of the image, the caption and the control (hint) image.
    pub first_stage_key: String,
    pub cond_stage_key: String,
    pub control_key: String,
    /// Latents are the VAE's samples times this.
    pub scale_factor: f64,
    /// Probability of replacing a caption by the empty caption in training (classifier-free guidance).
    pub text_embedding_dropout_rate: f64,
    /// Fuse kernels when compiling the step (NeMo: torch.compile). zeroconv always compiles the step into one
    /// graph; False keeps one kernel per op, for debugging. Defaults to True, unlike NeMo.
    pub inductor: bool,
    /// Run the convolutions and GroupNorms on channels-last (NHWC) activations (NeMo: torch.channels_last memory
    /// format). The step computes the same function (up to the order of some sums); parameters, checkpoints and
    /// exported weights keep their usual layout. Defaults to False.
    pub channels_last: bool,
    /// Add the ControlNet's residuals to the U-Net's middle block only.
    pub only_mid_control: bool,
    /// Keep the U-Net frozen (train the ControlNet only); False also trains the U-Net's decoder half.
    pub sd_locked: bool,
    /// Seed of weight initialisation, noise and (unless data.seed is set) data order.
    pub seed: u64,
    /// Resume training from this checkpoint.
    pub resume_from_checkpoint: Option<PathBuf>,
    /// Sampling: the trained ControlNet checkpoint to load.
    pub restore_from_path: Option<PathBuf>,
    /// Sampling: scale of the control residuals.
    pub strength: f64,
    /// Sampling: ControlNet "guess mode" (control on the conditional branch only, scaled per level).
    pub guess_mode: bool,
    /// zeroconv: before training the ControlNet, train the U-Net itself (all of it) for this many steps. For
    /// setups with no pretrained U-Net, such as the built-in demo; 0 (the default) skips it.
    pub base_pretrain_steps: u64,
    pub unet_config: UNetConfig,
    pub control_stage_config: ControlNetConfig,
    pub first_stage_config: AutoencoderConfig,
    pub cond_stage_config: TextEncoderConfig,
    pub data: DataConfig,
    pub optim: OptimConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            micro_batch_size: 1,
            global_batch_size: None,
            linear_start: 0.00085,
            linear_end: 0.012,
            timesteps: 1000,
            first_stage_key: "images".to_string(),
            cond_stage_key: "captions".to_string(),
            control_key: "hint".to_string(),
            scale_factor: 0.18215,
            text_embedding_dropout_rate: 0.0,
            inductor: true,
            channels_last: false,
            only_mid_control: false,
            sd_locked: true,
            seed: 1234,
            resume_from_checkpoint: None,
            restore_from_path: None,
            strength: 1.0,
            guess_mode: false,
            base_pretrain_steps: 0,
            unet_config: UNetConfig::default(),
            control_stage_config: ControlNetConfig::default(),
            first_stage_config: AutoencoderConfig::default(),
            cond_stage_config: TextEncoderConfig::default(),
            data: DataConfig::default(),
            optim: OptimConfig::default(),
        }
    }
}

/// Defines a config section holding the U-Net architecture keys after the section's own keys, with `Default` and
/// the conversion to the model's hyper-parameters. The keys, their config types and their defaults are the one list
/// in `models::config::unet_architecture!`, which the second arm asks to call the first with it: `unet_config` and
/// `control_stage_config` spell the same keys, and serde's `flatten` cannot be combined with `deny_unknown_fields`.
/// Each key converts through its [`Spelling`].
macro_rules! unet_section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: $ty:ty = $default:expr,)* }
        architecture {
            $($(#[$kmeta:meta])* $key:ident: $model:ty as $(#[$spelling:meta])* $config:ty = $kdefault:expr,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            $($(#[$kmeta])* $(#[$spelling])* pub $key: $config,)*
        }

        impl Default for $name {
            /// The section's own defaults, and the architecture of `models::UNetConfig::default()` (SD 1.5).
            fn default() -> Self {
                let model = crate::models::UNetConfig::default();
                $name {
                    $($field: $default,)*
                    $($key: <$config as Spelling<$model>>::from_model(&model.$key),)*
                }
            }
        }

        impl $name {
            /// The model's U-Net hyper-parameters for this section's architecture keys, with `out_channels`.
            pub fn architecture(&self, out_channels: usize) -> crate::models::UNetConfig {
                let levels = self.channel_mult.len();
                crate::models::UNetConfig {
                    out_channels,
                    $($key: <$config as Spelling<$model>>::to_model(&self.$key, levels),)*
                }
            }
        }
    };
    ($(#[$meta:meta])* pub struct $name:ident { $($fields:tt)* }) => {
        unet_architecture! { unet_section! { $(#[$meta])* pub struct $name { $($fields)* } } }
    };
}

unet_section! {
    /// The (locked) Stable Diffusion U-Net, LDM's `UNetModel` arguments. Defaults: SD 1.5.
    pub struct UNetConfig {
        /// Weights to load (a .ckpt/.safetensors holding the U-Net).
        pub from_pretrained: Option<PathBuf> = None,
        /// As NeMo reads it: `False` also accepts diffusers key names (see README-config.md).
        #[serde(rename = "from_NeMo")]
        pub from_nemo: bool = false,
        pub out_channels: u32 = 4,
    }
}

unet_section! {
    /// The trained ControlNet: a copy of the U-Net's encoder plus the hint encoder and zero convolutions.
    /// Its architecture keys must equal unet_config's (it starts as a copy of those weights).
    pub struct ControlNetConfig {
        /// Initialise from this U-Net checkpoint (the usual start); null for random weights.
        pub from_pretrained_unet: Option<PathBuf> = None,
        #[serde(rename = "from_NeMo")]
        pub from_nemo: bool = false,
        /// Channels of the control image (3 for RGB hints).
        pub hint_channels: u32 = 3,
    }
}

/// What turns images into latents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FirstStageKind {
    #[default]
    AutoencoderKl,
    Pixel,
}

/// The frozen KL autoencoder (LDM's `AutoencoderKL`). Defaults: the SD VAE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoencoderConfig {
    /// zeroconv: `autoencoder_kl` (SD's VAE, the default) or `pixel`: no weights, latents are the image averaged
    /// over 8x8 blocks (decoded by nearest upsampling); for the built-in demo, which has no pretrained VAE.
    pub kind: FirstStageKind,
    pub from_pretrained: Option<PathBuf>,
    #[serde(rename = "from_NeMo")]
    pub from_nemo: bool,
    /// Latent channels.
    pub embed_dim: u32,
    pub ddconfig: DdConfig,
}

impl Default for AutoencoderConfig {
    fn default() -> Self {
        AutoencoderConfig {
            kind: FirstStageKind::AutoencoderKl,
            from_pretrained: None,
            from_nemo: false,
            embed_dim: 4,
            ddconfig: DdConfig::default(),
        }
    }
}

/// Defines the `ddconfig` section from the keys of `models::config::vae_architecture!` (one list, see
/// `unet_section!`) and `dropout`, with `Default` (the model's) and the conversion to the model's VAE.
macro_rules! dd_section {
    (
        architecture {
            $($(#[$kmeta:meta])* $key:ident: $model:ty as $(#[$spelling:meta])* $config:ty = $kdefault:expr,)*
        }
    ) => {
        /// The autoencoder's encoder/decoder shape.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct DdConfig {
            $($(#[$kmeta])* $(#[$spelling])* pub $key: $config,)*
            /// Unused by the frozen VAE (accepted because LDM's configs carry it).
            pub dropout: f64,
        }

        impl Default for DdConfig {
            /// The SD VAE: `models::VaeConfig::default()`.
            fn default() -> Self {
                let model = crate::models::VaeConfig::default();
                DdConfig { $($key: <$config as Spelling<$model>>::from_model(&model.$key),)* dropout: 0.0 }
            }
        }

        impl DdConfig {
            /// The model's VAE hyper-parameters for these keys, with the latent channels and scale.
            pub fn architecture(&self, embed_dim: usize, scale_factor: f64) -> crate::models::VaeConfig {
                crate::models::VaeConfig {
                    embed_dim,
                    $($key: <$config as Spelling<$model>>::to_model(&self.$key, self.ch_mult.len()),)*
                    scale_factor,
                }
            }
        }
    };
}

vae_architecture! { dd_section! {} }

/// The frozen CLIP text encoder and its tokenizer. Defaults: CLIP ViT-L/14 (SD 1.x). The section's `_target_` class
/// selects the family (Hugging Face CLIP or OpenCLIP), which sets the defaults of the keys below (see
/// [`super::text_encoder`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextEncoderConfig {
    /// Hugging Face model name or a local directory holding the tokenizer (and weights); for OpenCLIP, the
    /// pretrained tag (e.g. laion2b_s32b_b79k), informational.
    pub version: String,
    /// OpenCLIP architecture (FrozenOpenCLIPEmbedder's `arch`): `ViT-H-14` fixes the sizes below, `custom` leaves
    /// them to the keys; null: Hugging Face CLIP (or, with the OpenCLIP class, ViT-H-14).
    pub arch: Option<String>,
    /// The MLP activation: `quick_gelu` (OpenAI CLIP, SD 1.x) or `gelu` (OpenCLIP, SD 2.x).
    pub hidden_act: HiddenAct,
    /// Tokenizer files: a tokenizer.json, or a directory with tokenizer.json or vocab.json + merges.txt.
    /// Null: `version`, when it is a local directory.
    pub tokenizer: Option<PathBuf>,
    /// Text-encoder weights (safetensors); null: from `version`'s directory.
    pub from_pretrained: Option<PathBuf>,
    /// Tokens per caption, BOS and EOS included (longer captions are cut, EOS kept last).
    pub max_length: u32,
    /// Padding token: `<|endoftext|>` (id 49407) for SD 1.x, `!` (id 0) for SD 2.x / OpenCLIP.
    pub pad_token: String,
    /// Caption cleanup before BPE: `ftfy` (as SD was trained) or `basic` (transformers without ftfy).
    pub text_cleanup: TextCleanup,
    pub layer: ClipLayer,
    /// With layer: hidden, the layer whose output is used (negative counts from the end).
    pub layer_idx: Option<i32>,
    pub vocab_size: u32,
    pub hidden_size: u32,
    pub intermediate_size: u32,
    pub num_hidden_layers: u32,
    pub num_attention_heads: u32,
    pub max_position_embeddings: u32,
    /// NeMo's Megatron CLIP text tower (`FrozenMegatronCLIPEmbedder`): what its weights do not tell, filled from the
    /// class's CLIP config. Null for the other text encoders.
    pub megatron: Option<MegatronTextConfig>,
}

/// What a Megatron CLIP text tower's weights do not tell (see `io/checkpoint/megatron_clip.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MegatronTextConfig {
    /// NeMo's `megatron_legacy`: each `query_key_value`'s rows are all q, all k, all v (true) or interleaved per
    /// head (false).
    pub megatron_legacy: bool,
    /// `word_embeddings` holds `vocab_size` rows padded up to a multiple of this (`make_vocab_size_divisible_by` ×
    /// `tensor_model_parallel_size`); the padding rows are left out.
    pub vocab_padding: u32,
}

impl Default for TextEncoderConfig {
    fn default() -> Self {
        TextEncoderConfig {
            version: "openai/clip-vit-large-patch14".to_string(),
            arch: None,
            hidden_act: HiddenAct::QuickGelu,
            tokenizer: None,
            from_pretrained: None,
            max_length: 77,
            pad_token: "<|endoftext|>".to_string(),
            text_cleanup: TextCleanup::Ftfy,
            layer: ClipLayer::Last,
            layer_idx: None,
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            megatron: None,
        }
    }
}

/// Training data: webdataset tar shards of (image, caption, hint) samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Loader threads decoding and augmenting samples.
    pub num_workers: u32,
    /// Train on random tensors instead of files (no dataset_path needed).
    pub synthetic_data: bool,
    /// Samples in one epoch of synthetic data.
    pub synthetic_data_length: u64,
    /// Samples held in the shuffle buffer.
    pub shuffle_buffer: u32,
    /// Seed of the data order and augmentations; null: model.seed.
    pub seed: Option<u64>,
    pub train: TrainDataConfig,
    pub webdataset: WebdatasetConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            num_workers: 2,
            synthetic_data: false,
            synthetic_data_length: 10000,
            shuffle_buffer: 1000,
            seed: None,
            train: TrainDataConfig::default(),
            webdataset: WebdatasetConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainDataConfig {
    /// Tar shards (relative paths are under webdataset.local_root_path).
    pub dataset_path: Vec<PathBuf>,
    pub augmentations: Augmentations,
}

/// Applied in this order to the image and the hint alike, as NeMo's augmentations: resize the shorter side, centre
/// crop (padding with zeros where the crop is larger than the image), flip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Augmentations {
    /// Resize so that the shorter side has this many pixels; null to not resize.
    pub resize_smallest_side: Option<u32>,
    pub resize_interpolation: Interpolation,
    /// Center crop to `height, width` (NeMo passes the two numbers to torchvision's `CenterCrop` in this order).
    /// Null: NeMo trains every image at its own size, which zeroconv's fixed-size step refuses (WebDataset shards);
    /// the synthetic shapes then use `resize_smallest_side`.
    pub center_crop_h_w: Option<CropSize>,
    /// Flip horizontally with probability 1/2.
    pub horizontal_flip: bool,
}

impl Default for Augmentations {
    fn default() -> Self {
        Augmentations {
            resize_smallest_side: Some(512),
            resize_interpolation: Interpolation::Bicubic,
            center_crop_h_w: Some(CropSize { height: 512, width: 512 }),
            horizontal_flip: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebdatasetConfig {
    /// Directory that relative dataset paths start from.
    pub local_root_path: Option<PathBuf>,
}

/// Optimizer and learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub name: OptimizerName,
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Null: the rate stays lr.
    pub sched: Option<SchedConfig>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            name: OptimizerName::AdamW,
            lr: 1e-5,
            weight_decay: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            sched: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedConfig {
    pub name: SchedulerName,
    /// Linear warmup length, in steps or as a fraction of trainer.max_steps (give one of the two).
    pub warmup_steps: Option<u64>,
    pub warmup_ratio: Option<f64>,
    /// WarmupHoldPolicy: steps (or fraction of max_steps) until the end of the hold.
    pub hold_steps: Option<u64>,
    pub hold_ratio: Option<f64>,
    /// CosineAnnealing: the rate reached at trainer.max_steps.
    pub min_lr: f64,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            name: SchedulerName::WarmupHoldPolicy,
            warmup_steps: None,
            warmup_ratio: None,
            hold_steps: None,
            hold_ratio: None,
            min_lr: 0.0,
        }
    }
}

/// `zeroconv sample` settings (NeMo's `infer:` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InferConfig {
    pub prompts: Vec<String>,
    /// One control image per prompt.
    pub control: Vec<PathBuf>,
    pub num_images_per_prompt: u32,
    /// Classifier-free guidance scale.
    pub unconditional_guidance_scale: f64,
    /// The control image is resized to this size.
    pub hint_image_size: u32,
    pub height: u32,
    pub width: u32,
    /// Image pixels per latent pixel (8 for the SD VAE).
    pub down_factor: u32,
    pub inference_steps: u32,
    pub sampler_type: SamplerName,
    /// DDIM eta: 0 is deterministic.
    pub eta: f64,
    pub save_to_file: bool,
    pub out_path: PathBuf,
    pub seed: u64,
}

impl Default for InferConfig {
    fn default() -> Self {
        InferConfig {
            prompts: Vec::new(),
            control: Vec::new(),
            num_images_per_prompt: 1,
            unconditional_guidance_scale: 7.5,
            hint_image_size: 512,
            height: 512,
            width: 512,
            down_factor: 8,
            inference_steps: 50,
            sampler_type: SamplerName::Ddim,
            eta: 0.0,
            save_to_file: true,
            out_path: PathBuf::from("samples"),
            seed: 0,
        }
    }
}
