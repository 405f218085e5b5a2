//! Which text encoder `model.cond_stage_config` describes, settled on the config tree before it is typed: the family
//! decides the defaults of other keys, and only the tree knows which keys the config wrote.
//!
//! The family is the class the section names, as NeMo (`_target_`) or LDM (`target`) would instantiate it:
//! - `...FrozenCLIPEmbedder`: Hugging Face CLIP, SD 1.x's (the keys' defaults are ViT-L/14's);
//! - `...FrozenOpenCLIPEmbedder`: OpenCLIP's text tower, SD 2.x's;
//! - `...FrozenMegatronCLIPEmbedder`: NeMo's own CLIP, built from a CLIP model config ([`super::megatron_clip`]);
//! - any other class is a model zeroconv does not have: an error.
//!
//! Without a class, `arch` (an OpenCLIP argument) selects OpenCLIP, and CLIP otherwise. `arch` with the CLIP class
//! is a contradiction, refused.
//!
//! For OpenCLIP, as `FrozenOpenCLIPEmbedder` builds it:
//! - `arch` names the open_clip architecture; unset, the class's default `ViT-H-14`. A named architecture fixes the
//!   sizes (`ViT-H-14`: width 1024, 16 heads, 24 layers, MLP 4096, vocabulary 49408, context 77): an unset size key
//!   takes the architecture's value, a written one must equal it. zeroconv's `arch: custom` takes the sizes from the
//!   keys instead, for small OpenCLIP-style towers (tests, experiments).
//! - `hidden_act` is `gelu` (open_clip's `nn.GELU`) and `pad_token` is `!` (id 0: `open_clip.tokenize` pads with
//!   zeros); unset, they take these values, and any other is refused.
//! - `layer` is `last` or `penultimate`, the two the class accepts.

use super::node::{Entry, Node, Origin, Value};
use super::scalar::{resolve_plain, Resolved};
use crate::error::{Error, Result};

pub(super) const SECTION: &str = "model.cond_stage_config";

/// The text-encoder families zeroconv implements, by the class a config names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Hugging Face `CLIPTextModel` (`FrozenCLIPEmbedder`).
    Clip,
    /// OpenCLIP's text tower (`FrozenOpenCLIPEmbedder`).
    OpenClip,
    /// NeMo's Megatron CLIP text tower (`FrozenMegatronCLIPEmbedder`).
    MegatronClip,
}

const CLIP_CLASS: &str = "FrozenCLIPEmbedder";
const OPEN_CLIP_CLASS: &str = "FrozenOpenCLIPEmbedder";
const MEGATRON_CLIP_CLASS: &str = "FrozenMegatronCLIPEmbedder";

/// The OpenCLIP architecture that leaves the sizes to the size keys.
pub const CUSTOM_ARCH: &str = "custom";

/// An open_clip architecture's text tower, under the config's size keys.
struct OpenClipArch {
    name: &'static str,
    /// (key, value) of every size key.
    sizes: [(&'static str, i64); 6],
}

/// The architectures whose sizes zeroconv knows (open_clip's `model_configs/*.json`, `text_cfg`).
const ARCHS: [OpenClipArch; 1] = [OpenClipArch {
    name: "ViT-H-14",
    sizes: [
        ("vocab_size", 49408),
        ("hidden_size", 1024),
        ("intermediate_size", 4096),
        ("num_hidden_layers", 24),
        ("num_attention_heads", 16),
        ("max_position_embeddings", 77),
    ],
}];

/// `FrozenOpenCLIPEmbedder`'s default architecture (NeMo's and LDM's alike).
const DEFAULT_ARCH: &str = "ViT-H-14";

/// Settles the family of `model.cond_stage_config` and fills in (or checks) the keys it implies. A tree without the
/// section is left alone (the defaults are CLIP's).
pub fn resolve(root: &mut Node) -> Result<Option<Family>> {
    let Some(section) = section_mut(root) else { return Ok(None) };
    let origin = section.origin.clone();
    let family = family(section)?;
    match family {
        Family::OpenClip => open_clip_defaults(section, origin)?,
        Family::MegatronClip => super::megatron_clip::resolve(section, &origin)?,
        Family::Clip => {}
    }
    Ok(Some(family))
}

fn section_mut(root: &mut Node) -> Option<&mut Node> {
    let model = child_mut(root, "model")?;
    let section = child_mut(model, "cond_stage_config")?;
    matches!(section.value, Value::Map(_)).then_some(section)
}

fn child_mut<'a>(node: &'a mut Node, key: &str) -> Option<&'a mut Node> {
    match &mut node.value {
        Value::Map(entries) => entries.iter_mut().find(|e| e.key == key).map(|e| &mut e.value),
        _ => None,
    }
}

/// A key's text when it is a non-null scalar; an uncomputable value is an error naming it.
pub(super) fn text_of<'a>(section: &'a Node, key: &str) -> Result<Option<(&'a str, &'a Origin)>> {
    let Some(node) = section.get(key) else { return Ok(None) };
    match &node.value {
        Value::Scalar { .. } if node.is_null() => Ok(None),
        Value::Scalar { text, .. } => Ok(Some((text.as_str(), &node.origin))),
        Value::Invalid(msg) => Err(Error::msg(format!("{}: {SECTION}.{key}: {msg}", node.origin))),
        _ => Err(Error::msg(format!("{}: {SECTION}.{key} must be a string, found {}", node.origin, node.kind()))),
    }
}

fn family(section: &Node) -> Result<Family> {
    let mut named: Option<(Family, String)> = None;
    for key in ["_target_", "target"] {
        let Some((class, origin)) = text_of(section, key)? else { continue };
        let found = match class.rsplit('.').next().unwrap_or(class) {
            CLIP_CLASS => Family::Clip,
            OPEN_CLIP_CLASS => Family::OpenClip,
            MEGATRON_CLIP_CLASS => Family::MegatronClip,
            _ => {
                return Err(Error::msg(format!(
                    "{origin}: {SECTION}.{key}: {class} is a text encoder zeroconv does not implement; it implements \
                     {CLIP_CLASS} (Hugging Face CLIP, SD 1.x), {OPEN_CLIP_CLASS} (OpenCLIP, SD 2.x) and \
                     {MEGATRON_CLIP_CLASS} (NeMo's CLIP)"
                )))
            }
        };
        if let Some((first, first_key)) = &named {
            if *first != found {
                return Err(Error::msg(format!(
                    "{origin}: {SECTION}.{key} names another text encoder than {SECTION}.{first_key}"
                )));
            }
        }
        named = Some((found, key.to_string()));
    }
    let arch = text_of(section, "arch")?;
    match (named, arch) {
        (Some((Family::Clip, key)), Some((arch, origin))) => Err(Error::msg(format!(
            "{origin}: {SECTION}.arch: {arch} is an OpenCLIP architecture, but {SECTION}.{key} names {CLIP_CLASS} \
             (Hugging Face CLIP); for SD 2.x's text encoder name {OPEN_CLIP_CLASS}, else remove arch"
        ))),
        (Some((family, _)), _) => Ok(family),
        (None, Some(_)) => Ok(Family::OpenClip),
        (None, None) => Ok(Family::Clip),
    }
}

/// A written key's value in canonical form: a plain integer as its number, other scalars as written.
fn canonical(node: &Node) -> String {
    match &node.value {
        Value::Scalar { text, quoted: false } => match resolve_plain(text) {
            Resolved::Int(i) => i.to_string(),
            _ => text.clone(),
        },
        Value::Scalar { text, quoted: true } => text.clone(),
        _ => node.describe(),
    }
}

/// Gives `key` the value `want` when the config leaves it unset; a written value must be `want`, else the error
/// says `why`.
pub(super) fn imply(section: &mut Node, key: &str, want: &str, quoted: bool, from: &Origin, why: &str) -> Result<()> {
    if let Some(node) = section.get(key).filter(|n| !n.is_null()) {
        let have = canonical(node);
        if have != want {
            return Err(Error::msg(format!("{}: {SECTION}.{key} is {have}, but {why}", node.origin)));
        }
        return Ok(());
    }
    let Value::Map(entries) = &mut section.value else { return Ok(()) };
    let value = Node::new(Value::Scalar { text: want.to_string(), quoted }, from.clone());
    match entries.iter_mut().find(|e| e.key == key) {
        Some(entry) => entry.value = value,
        None => entries.push(Entry { key: key.to_string(), key_origin: from.clone(), value }),
    }
    Ok(())
}

fn open_clip_defaults(section: &mut Node, origin: Origin) -> Result<()> {
    let (arch, from) = match text_of(section, "arch")? {
        Some((arch, at)) => (arch.to_string(), at.clone()),
        None => {
            // The class's default, as if written where the section is.
            imply(section, "arch", DEFAULT_ARCH, true, &origin, "")?;
            (DEFAULT_ARCH.to_string(), origin)
        }
    };
    let family = format!("{OPEN_CLIP_CLASS} (OpenCLIP)");
    imply(section, "hidden_act", "gelu", true, &from, &format!("{family} uses exact GELU (gelu)"))?;
    imply(
        section,
        "pad_token",
        "!",
        true,
        &from,
        &format!("{family} pads with `!` (id 0), as open_clip.tokenize does"),
    )?;
    if let Some((layer, at)) = text_of(section, "layer")? {
        if layer != "last" && layer != "penultimate" {
            return Err(Error::msg(format!(
                "{at}: {SECTION}.layer is {layer}, but {family} offers only last and penultimate"
            )));
        }
    }
    if arch == CUSTOM_ARCH {
        return Ok(());
    }
    let Some(known) = ARCHS.iter().find(|a| a.name == arch) else {
        let names: Vec<&str> = ARCHS.iter().map(|a| a.name).chain([CUSTOM_ARCH]).collect();
        return Err(Error::msg(format!(
            "{from}: {SECTION}.arch: {arch} is not an OpenCLIP architecture zeroconv knows the sizes of; known: {} \
             (custom: the sizes are the size keys)",
            names.join(", ")
        )));
    };
    for (key, value) in known.sizes {
        imply(section, key, &value.to_string(), false, &from, &format!("arch {arch} has {key} {value}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn tree(yaml: &str) -> Node {
        super::super::yaml::parse_document(yaml, &Arc::from("test.yaml")).unwrap()
    }

    fn key(root: &Node, k: &str) -> Option<String> {
        let path: Vec<String> = ["model", "cond_stage_config", k].iter().map(|s| s.to_string()).collect();
        root.lookup(&path).map(canonical)
    }

    #[test]
    fn the_class_selects_the_family_and_vit_h_fills_the_sizes() {
        let mut t =
            tree("model:\n  cond_stage_config:\n    _target_: a.b.FrozenOpenCLIPEmbedder\n    layer: penultimate\n");
        assert_eq!(resolve(&mut t).unwrap(), Some(Family::OpenClip));
        for (k, v) in [("arch", "ViT-H-14"), ("hidden_size", "1024"), ("num_hidden_layers", "24"), ("pad_token", "!")] {
            assert_eq!(key(&t, k).as_deref(), Some(v), "{k}");
        }
        let mut t = tree("model:\n  cond_stage_config:\n    target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n");
        assert_eq!(resolve(&mut t).unwrap(), Some(Family::Clip));
        assert_eq!(key(&t, "hidden_act"), None, "CLIP keeps its own defaults");
        let mut t = tree("model:\n  cond_stage_config:\n    arch: custom\n    hidden_size: 32\n");
        assert_eq!(resolve(&mut t).unwrap(), Some(Family::OpenClip));
        assert_eq!(key(&t, "hidden_size").as_deref(), Some("32"));
        assert_eq!(resolve(&mut tree("trainer:\n  devices: 1\n")).unwrap(), None);
    }

    #[test]
    fn contradictions_are_refused_naming_the_key() {
        for (yaml, want) in [
            ("_target_: x.FrozenOpenCLIPEmbedder\n    hidden_size: 768", "hidden_size is 768, but arch ViT-H-14 has"),
            ("arch: ViT-H-14\n    hidden_act: quick_gelu", "hidden_act is quick_gelu"),
            ("_target_: x.FrozenCLIPEmbedder\n    arch: ViT-H-14", "names FrozenCLIPEmbedder"),
            ("_target_: x.FrozenMegatronCLIPEmbedder", "needs restore_from_path"),
            ("_target_: x.FrozenT5Embedder", "does not implement"),
            ("arch: ViT-Q-99", "ViT-Q-99 is not an OpenCLIP architecture"),
            ("arch: custom\n    layer: hidden", "only last and penultimate"),
            ("arch: custom\n    pad_token: <|endoftext|>", "pads with `!`"),
        ] {
            let err = resolve(&mut tree(&format!("model:\n  cond_stage_config:\n    {yaml}\n"))).unwrap_err();
            let err = err.to_string();
            assert!(err.contains(want) && err.contains("test.yaml:"), "{yaml}: {err}");
        }
    }
}
