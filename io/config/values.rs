//! Config values that NeMo spells in more than one way (`precision: 16` or `bf16-mixed`, `max_steps: -1`,
//! `center_crop_h_w: 512, 512`), and the closed sets of names zeroconv implements.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Training precision (PyTorch Lightning's names). Half precisions are mixed: fp32 master weights and optimizer
/// state, half-precision activations and tensor-core inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// `32`, `"32"`, `32-true`.
    #[default]
    F32,
    /// `16`, `"16"`, `16-mixed`.
    F16Mixed,
    /// `bf16`, `bf16-mixed`.
    Bf16Mixed,
}

impl Precision {
    const EXPECTED: &'static str = "32, 16, 16-mixed, bf16 or bf16-mixed";

    fn from_name(name: &str) -> Result<Precision, String> {
        match name {
            "32" | "32-true" => Ok(Precision::F32),
            "16" | "16-mixed" => Ok(Precision::F16Mixed),
            "bf16" | "bf16-mixed" => Ok(Precision::Bf16Mixed),
            "16-true" | "bf16-true" => Err(format!(
                "`{name}` (half-precision weights) is not supported: zeroconv keeps fp32 master weights; \
                 use {}-mixed",
                name.trim_end_matches("-true")
            )),
            _ => {
                let names = ["32", "16", "16-mixed", "bf16", "bf16-mixed"];
                let hint =
                    super::de::nearest(name, &names).map(|n| format!(" (did you mean {n}?)")).unwrap_or_default();
                Err(format!("unknown precision `{name}`{hint}; expected {}", Precision::EXPECTED))
            }
        }
    }

    /// The name zeroconv writes back (and prints).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "32",
            Precision::F16Mixed => "16-mixed",
            Precision::Bf16Mixed => "bf16-mixed",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Precision {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Precision::F32 => s.serialize_u64(32),
            other => s.serialize_str(other.name()),
        }
    }
}

impl<'de> Deserialize<'de> for Precision {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Precision;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(Precision::EXPECTED)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Precision, E> {
                Precision::from_name(&v.to_string()).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Precision, E> {
                Precision::from_name(&v.to_string()).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Precision, E> {
                Precision::from_name(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Where to train: `auto` picks CUDA when it is usable and the CPU otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    #[default]
    Auto,
    Cpu,
    #[serde(alias = "cuda")]
    Gpu,
}

/// The optimizer (`model.optim.name`). NeMo's `fused_adam` is Apex FusedAdam, whose default is AdamW's
/// decoupled weight decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OptimizerName {
    #[default]
    #[serde(rename = "adamw")]
    AdamW,
    #[serde(rename = "adam")]
    Adam,
    #[serde(rename = "fused_adam")]
    FusedAdam,
}

impl OptimizerName {
    /// AdamW-style weight decay (applied to the weights) rather than Adam's L2 term in the gradient.
    pub fn decoupled_weight_decay(self) -> bool {
        !matches!(self, OptimizerName::Adam)
    }
}

/// NeMo's learning-rate schedules (`model.optim.sched.name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchedulerName {
    /// Linear warmup, then the base rate held (for hold_steps), then constant.
    WarmupHoldPolicy,
    /// Linear warmup, then constant.
    WarmupPolicy,
    /// Linear warmup, then cosine decay to min_lr at trainer.max_steps.
    CosineAnnealing,
}

/// Which text-encoder hidden state conditions the U-Net.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClipLayer {
    /// The final layer norm's output (SD 1.x).
    #[default]
    Last,
    /// The second-to-last layer's output through the final layer norm (SD 2.x's FrozenOpenCLIPEmbedder).
    Penultimate,
    /// The output of layer `layer_idx`.
    Hidden,
}

/// The activation of the text encoder's MLPs (Hugging Face `CLIPTextConfig.hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// x * sigmoid(1.702 x): OpenAI's CLIP (SD 1.x).
    #[default]
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP (SD 2.x), and diffusers' SD 2 `text_encoder/`.
    Gelu,
}

/// How captions are cleaned before CLIP's BPE (`model.cond_stage_config.text_cleanup`): the two paths of
/// transformers' `CLIPTokenizer`, which takes the first when the `ftfy` package is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextCleanup {
    /// `ftfy.fix_text` (HTML entities, mojibake, ligatures, full-width forms, ...), whitespace collapsed,
    /// lowercased: what SD and ControlNet were trained with (OpenAI's CLIP and open_clip require ftfy).
    #[default]
    Ftfy,
    /// BERT's BasicTokenizer, transformers' fallback without ftfy: controls removed, CJK ideographs split
    /// apart, NFC, lowercased.
    Basic,
}

/// Image resampling filter for resizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Nearest,
    Bilinear,
    /// What NeMo's `resize_smallest_side` uses (torchvision `Resize(..., interpolation=BICUBIC, antialias=True)`).
    #[default]
    Bicubic,
    /// Pixel-area averaging (OpenCV INTER_AREA, used by the original ControlNet scripts).
    Area,
    Lanczos,
}

/// The sampler of `zeroconv sample` (`infer.sampler_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SamplerName {
    #[default]
    #[serde(rename = "DDIM")]
    Ddim,
}

/// Crop size, written `512, 512` (NeMo's string form), `[512, 512]` or `512` (square).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropSize {
    pub height: u32,
    pub width: u32,
}

impl CropSize {
    fn parse(text: &str) -> Result<CropSize, String> {
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        let number = |s: &str| s.parse::<u32>().ok().filter(|&n| n > 0);
        match parts.as_slice() {
            [side] => number(side).map(|s| CropSize { height: s, width: s }),
            [h, w] => number(h).zip(number(w)).map(|(height, width)| CropSize { height, width }),
            _ => None,
        }
        .ok_or_else(|| format!("expected a crop size like `512, 512` (height, width), found {text:?}"))
    }
}

impl Serialize for CropSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}, {}", self.height, self.width))
    }
}

impl<'de> Deserialize<'de> for CropSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CropSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a crop size like `512, 512` (height, width)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CropSize, E> {
                CropSize::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CropSize, E> {
                CropSize::parse(v).map_err(E::custom)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<CropSize, A::Error> {
                let mut sides = Vec::new();
                while let Some(side) = seq.next_element::<u32>()? {
                    sides.push(side);
                }
                match sides[..] {
                    [height, width] if height > 0 && width > 0 => Ok(CropSize { height, width }),
                    _ => Err(de::Error::custom(format!("expected [height, width], found {sides:?}"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `trainer.val_check_interval`: an integer counts steps, a float in (0, 1] is a fraction of an epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValCheckInterval {
    Steps(u64),
    EpochFraction(f64),
}

impl Serialize for ValCheckInterval {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            ValCheckInterval::Steps(n) => s.serialize_u64(n),
            ValCheckInterval::EpochFraction(x) => s.serialize_f64(x),
        }
    }
}

impl<'de> Deserialize<'de> for ValCheckInterval {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ValCheckInterval;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of steps, or a fraction of an epoch in (0, 1]")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ValCheckInterval, E> {
                Ok(ValCheckInterval::Steps(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ValCheckInterval, E> {
                if v > 0.0 && v <= 1.0 {
                    Ok(ValCheckInterval::EpochFraction(v))
                } else {
                    Err(E::custom(format!("a fraction of an epoch must be in (0, 1], found {v}")))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// NeMo's "-1 means none" integers (`max_steps: -1`, `save_top_k: -1`, `num_head_channels: -1`), as options:
/// `-1` and null read as `None`, which is written back as `-1`.
pub mod minus_one_is_none {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;

    pub fn serialize<T: Copy + Into<u64>, S: Serializer>(value: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => s.serialize_u64((*v).into()),
            None => s.serialize_i64(-1),
        }
    }

    pub fn deserialize<'de, T: TryFrom<u64>, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<T: TryFrom<u64>> Visitor<'_> for V<T> {
            type Value = Option<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer, or -1 for none")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
                Ok(None)
            }
            fn visit_none<E: de::Error>(self) -> Result<Option<T>, E> {
                Ok(None)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<T>, E> {
                match v {
                    -1 => Ok(None),
                    v if v >= 0 => self.visit_u64(v as u64),
                    _ => Err(E::custom(format!("expected a non-negative integer, or -1 for none, found {v}"))),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<T>, E> {
                T::try_from(v).map(Some).map_err(|_| E::custom(format!("{v} is too large")))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// How a config section spells one of the model's hyper-parameters of type `M` (the U-Net and VAE architecture keys
/// of `models::config::unet_architecture!` and `vae_architecture!`): `u32` for a `usize`, `Option<u32>` (-1 for none) for LDM's `i64` that
/// is -1 when unset, one number for a per-level list. Both ways, so that the sections' defaults are the model's.
pub trait Spelling<M> {
    /// The model's value; `levels` is the U-Net's level count, for a key a config gives once for every level.
    fn to_model(&self, levels: usize) -> M;
    /// The config's spelling of a model value: used for the defaults (SD 1.5), which fit every spelling.
    fn from_model(model: &M) -> Self;
}

impl Spelling<bool> for bool {
    fn to_model(&self, _levels: usize) -> bool {
        *self
    }
    fn from_model(model: &bool) -> bool {
        *model
    }
}

impl Spelling<usize> for u32 {
    fn to_model(&self, _levels: usize) -> usize {
        *self as usize
    }
    fn from_model(model: &usize) -> u32 {
        u32::try_from(*model).expect("the model's defaults fit in u32")
    }
}

impl Spelling<Vec<usize>> for Vec<u32> {
    fn to_model(&self, levels: usize) -> Vec<usize> {
        self.iter().map(|v| Spelling::<usize>::to_model(v, levels)).collect()
    }
    fn from_model(model: &Vec<usize>) -> Vec<u32> {
        model.iter().map(<u32 as Spelling<usize>>::from_model).collect()
    }
}

/// With `minus_one_is_none`: none is the model's -1.
impl Spelling<i64> for Option<u32> {
    fn to_model(&self, _levels: usize) -> i64 {
        self.map_or(-1, i64::from)
    }
    fn from_model(model: &i64) -> Option<u32> {
        u32::try_from(*model).ok()
    }
}

/// One number for every level.
impl Spelling<Vec<usize>> for u32 {
    fn to_model(&self, levels: usize) -> Vec<usize> {
        vec![*self as usize; levels]
    }
    fn from_model(model: &Vec<usize>) -> u32 {
        let first = model.first().copied().unwrap_or_default();
        debug_assert!(model.iter().all(|&n| n == first), "one value for every level");
        <u32 as Spelling<usize>>::from_model(&first)
    }
}
