//! Where every parameter of a run comes from, decided before anything is compiled.
//!
//! Each component reads its own pretrained file (`unet_config.from_pretrained` the locked U-Net,
//! `first_stage_config.from_pretrained` the VAE, `cond_stage_config.from_pretrained` the text encoder;
//! `control_stage_config.from_pretrained_unet` initialises the ControlNet from a U-Net, as `tool_add_control` does,
//! and never touches the locked U-Net). Only what the recipe creates new may be initialised: the ControlNet's hint
//! block and zero convolutions, the rest of the ControlNet when no U-Net is given to copy, and the base model that the
//! built-in demo's own base pretraining trains. A frozen component with a missing key is one error naming the
//! component, the missing keys and the file that was read; `--allow-random-weights` (tests, benchmarks) lets them be
//! initialised at random, and says so.

use crate::app::weights::store::WeightStore;
use crate::error::{Error, Result};
use crate::io::checkpoint::{Checkpoint, Layout};
use crate::io::config::Config;
use crate::models::{ParamSpec, CONTROL_PREFIX, UNET_PREFIX, VAE_PREFIX};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The parts of a ControlLDM that hold weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    Unet,
    ControlNet,
    Vae,
    TextEncoder,
}

impl Component {
    pub const ALL: [Component; 4] = [Component::Unet, Component::ControlNet, Component::Vae, Component::TextEncoder];

    pub fn of_key(key: &str) -> Option<Component> {
        let under = |p: &str| key.strip_prefix(p).is_some_and(|r| r.starts_with('.'));
        if under(CONTROL_PREFIX) {
            Some(Component::ControlNet)
        } else if under(UNET_PREFIX) {
            Some(Component::Unet)
        } else if under(VAE_PREFIX) {
            Some(Component::Vae)
        } else if key.starts_with("cond_stage_model.") {
            Some(Component::TextEncoder)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "U-Net",
            Component::ControlNet => "ControlNet",
            Component::Vae => "VAE (first stage)",
            Component::TextEncoder => "text encoder",
        }
    }

    /// The config key that names this component's file.
    pub fn config_key(self) -> &'static str {
        match self {
            Component::Unet => "model.unet_config.from_pretrained",
            Component::ControlNet => "model.control_stage_config.from_pretrained_unet",
            Component::Vae => "model.first_stage_config.from_pretrained",
            Component::TextEncoder => "model.cond_stage_config.from_pretrained",
        }
    }
}

/// Where one tensor comes from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    File(PathBuf),
    /// `tool_add_control`: the locked U-Net's tensor of the same name.
    UnetCopy,
    /// A layer the recipe creates new (hint block, zero convolutions).
    NewLayer,
    /// Initialised, for a ControlNet with no U-Net to copy.
    Initialised,
    /// Trained by the built-in demo's base pretraining (or its saved base model).
    BasePretraining,
    /// The built-in demo's text encoder: random and frozen by design, the one its base U-Net learned with (saved in
    /// base_model.safetensors).
    DemoTextEncoder,
    /// Random, allowed by `--allow-random-weights`.
    Random,
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::File(p) => format!("from {}", p.display()),
            Source::UnetCopy => "copied from the locked U-Net (tool_add_control)".into(),
            Source::NewLayer => "initialised (new layers: hint block, zero convolutions)".into(),
            Source::Initialised => "initialised (no U-Net given to copy)".into(),
            Source::BasePretraining => "trained by the base pretraining of this run".into(),
            Source::DemoTextEncoder => {
                "random and frozen by design (the demo's text encoder, which its base U-Net learns with)".into()
            }
            Source::Random => "RANDOM (--allow-random-weights)".into(),
        }
    }
}

/// How many tensors of each component come from where.
#[derive(Debug, Default)]
pub struct WeightSources {
    pub rows: BTreeMap<Component, BTreeMap<Source, usize>>,
    /// Per file: keys read, keys the model has no use for.
    pub files: Vec<(PathBuf, usize, usize)>,
}

impl WeightSources {
    /// The table `zeroconv train` prints before compiling.
    pub fn render(&self) -> String {
        let mut s = String::from("weights:\n");
        for (c, sources) in &self.rows {
            for (src, n) in sources {
                s.push_str(&format!("  {:<18} {:>6} tensors {}\n", c.name(), n, src.describe()));
            }
        }
        for (path, used, ignored) in &self.files {
            if *ignored > 0 {
                s.push_str(&format!(
                    "  {}: {used} tensors used, {ignored} ignored (EMA copies, schedule buffers, position ids, other \
                     components, ...)\n",
                    path.display()
                ));
            }
        }
        s
    }
}

/// The ControlNet tensors the recipe creates new: the hint block and the zero convolutions.
fn is_new_control_layer(key: &str) -> bool {
    let rest = key.strip_prefix(CONTROL_PREFIX).unwrap_or(key);
    rest.starts_with(".input_hint_block.") || rest.starts_with(".zero_convs.") || rest.starts_with(".middle_block_out.")
}

/// Fills the store from the config's pretrained files, each into its own component, and returns the files read.
pub fn load_pretrained(cfg: &Config, store: &mut WeightStore, specs: &[ParamSpec]) -> Result<WeightSources> {
    let m = &cfg.model;
    let mut sources = WeightSources::default();
    let wanted = [
        (Component::Unet, m.unet_config.from_pretrained.clone(), Some(("model.unet_config", m.unet_config.from_nemo))),
        (
            Component::Vae,
            m.first_stage_config.from_pretrained.clone(),
            Some(("model.first_stage_config", m.first_stage_config.from_nemo)),
        ),
        (Component::TextEncoder, m.cond_stage_config.from_pretrained.clone(), None),
    ];
    // Each file is opened once, however many components it holds.
    let mut opened: Vec<(PathBuf, Checkpoint)> = Vec::new();
    let arch = crate::io::config::model_config::architecture(cfg);
    let open = |opened: &mut Vec<(PathBuf, Checkpoint)>, path: &Path| -> Result<usize> {
        if let Some(i) = opened.iter().position(|(p, _)| p == path) {
            return Ok(i);
        }
        opened.push((path.to_path_buf(), Checkpoint::open_pretrained(path, &arch)?));
        Ok(opened.len() - 1)
    };
    let mut used: BTreeMap<PathBuf, usize> = BTreeMap::new();
    for (component, path, from_nemo) in wanted {
        let Some(path) = path else { continue };
        let i = open(&mut opened, &path)?;
        let ckpt = &opened[i].1;
        if let Some((section, flag)) = from_nemo {
            check_from_nemo(section, flag, ckpt)?;
        }
        let mine: Vec<ParamSpec> =
            specs.iter().filter(|s| Component::of_key(&s.key) == Some(component)).cloned().collect();
        // A tensor the file has but cannot be read (an unsupported dtype, say) is that, not a missing key.
        if let Some((key, why)) = mine.iter().find_map(|s| ckpt.skipped().get(&s.key).map(|why| (&s.key, why))) {
            return Err(Error::file(&path, format!("{key} is in the file but cannot be read: {why}")));
        }
        let n = store.load_matching(ckpt, &mine)?;
        if n == 0 && !mine.is_empty() {
            return Err(Error::file(
                &path,
                format!(
                    "{} (set by {}) holds none of the {}'s keys ({}); nearest keys in the file: {}",
                    path.display(),
                    component.config_key(),
                    component.name(),
                    mine[0].key,
                    nearest_keys(ckpt, &mine[0].key)
                ),
            ));
        }
        *used.entry(path.clone()).or_default() += n;
    }
    if let Some(path) = &m.control_stage_config.from_pretrained_unet {
        // tool_add_control: control_model.X from the file's model.diffusion_model.X (or its own control_model.X).
        let i = open(&mut opened, path)?;
        let ckpt = &opened[i].1;
        check_from_nemo("model.control_stage_config", m.control_stage_config.from_nemo, ckpt)?;
        let mut n = 0;
        for s in specs.iter().filter(|s| Component::of_key(&s.key) == Some(Component::ControlNet)) {
            let from_unet = s.key.replacen(CONTROL_PREFIX, UNET_PREFIX, 1);
            let key = if ckpt.contains(&s.key) { s.key.clone() } else { from_unet };
            match ckpt.shape(&key) {
                Some(shape) if shape == s.shape.dims() => {
                    store.tensors.insert(s.key.clone(), crate::app::weights::store::read_finite(ckpt, &key)?);
                    n += 1;
                }
                Some(shape) => {
                    return Err(Error::file(
                        path,
                        format!("{key} has shape {shape:?}; the ControlNet's {} needs {}", s.key, s.shape),
                    ))
                }
                None => {}
            }
        }
        if n == 0 {
            return Err(Error::file(
                path,
                format!(
                    "holds no U-Net keys to initialise the ControlNet from (model.control_stage_config.\
                     from_pretrained_unet); nearest keys in the file: {}",
                    nearest_keys(ckpt, &format!("{UNET_PREFIX}.input_blocks.0.0.weight"))
                ),
            ));
        }
        *used.entry(path.clone()).or_default() += n;
    }
    for (path, ckpt) in &opened {
        let n = used.get(path).copied().unwrap_or(0);
        sources.files.push((path.clone(), n, ckpt.len().saturating_sub(n)));
    }
    Ok(sources)
}

/// `from_NeMo` as NeMo reads it: `False` renames diffusers keys before loading, `True` does not (both load LDM and
/// NeMo names). zeroconv recognises the layout from the keys, so only the combination NeMo itself cannot load is
/// refused: `True` with a file in the diffusers layout.
fn check_from_nemo(section: &str, from_nemo: bool, ckpt: &Checkpoint) -> Result<()> {
    if !from_nemo {
        return Ok(());
    }
    let diffusers =
        |l: &Layout| matches!(l, Layout::DiffusersUnet | Layout::DiffusersControlNet | Layout::DiffusersVae);
    match ckpt.layouts().find(|(_, l)| diffusers(l)) {
        Some((file, layout)) => Err(Error::file(
            file,
            format!(
                "holds a {}, but {section}.from_NeMo is True: NeMo renames diffusers keys only with                  from_NeMo: False, so NeMo would not load this file. Set {section}.from_NeMo=False (zeroconv reads                  the layout from the keys either way)",
                layout.describe()
            ),
        )),
        None => Ok(()),
    }
}

/// The three keys of `ckpt` closest to `want`, for error messages.
fn nearest_keys(ckpt: &Checkpoint, want: &str) -> String {
    let mut keys: Vec<(usize, &str)> = ckpt.keys().map(|k| (strsim::levenshtein(k, want), k)).collect();
    keys.sort_unstable();
    let shown: Vec<&str> = keys.iter().take(3).map(|(_, k)| *k).collect();
    if shown.is_empty() {
        "(the file holds no tensors)".into()
    } else {
        shown.join(", ")
    }
}

/// Decides where every parameter of `specs` comes from, given what `load_pretrained` put in the store. A frozen
/// tensor with nowhere to come from is an error (unless `allow_random`), listing the missing keys per component.
pub fn account(
    cfg: &Config,
    specs: &[ParamSpec],
    store: &WeightStore,
    loaded: &mut WeightSources,
    allow_random: bool,
) -> Result<()> {
    let m = &cfg.model;
    let base_trained = m.base_pretrain_steps > 0;
    let builtin_text = m.cond_stage_config.version == crate::io::data::synthetic::BUILTIN_VOCAB;
    let file_of = |c: Component| -> Option<PathBuf> {
        match c {
            Component::Unet => m.unet_config.from_pretrained.clone(),
            Component::ControlNet => m.control_stage_config.from_pretrained_unet.clone(),
            Component::Vae => m.first_stage_config.from_pretrained.clone(),
            Component::TextEncoder => m.cond_stage_config.from_pretrained.clone(),
        }
    };
    let mut missing: BTreeMap<Component, Vec<&str>> = BTreeMap::new();
    for s in specs {
        let Some(c) = Component::of_key(&s.key) else { continue };
        let source = if store.tensors.contains_key(&s.key) {
            match file_of(c) {
                Some(p) => Source::File(p),
                None => Source::File(PathBuf::from("(a file of another component)")),
            }
        } else {
            match c {
                Component::ControlNet if is_new_control_layer(&s.key) => Source::NewLayer,
                Component::ControlNet => {
                    let twin = s.key.replacen(CONTROL_PREFIX, UNET_PREFIX, 1);
                    if base_trained || store.tensors.get(&twin).is_some_and(|t| t.shape == s.shape) {
                        Source::UnetCopy
                    } else {
                        // No U-Net to copy (or none with this layer): initialised, as the recipe allows.
                        Source::Initialised
                    }
                }
                Component::Unet if base_trained => Source::BasePretraining,
                Component::TextEncoder if base_trained && builtin_text => Source::DemoTextEncoder,
                _ if allow_random => Source::Random,
                _ => {
                    missing.entry(c).or_default().push(&s.key);
                    continue;
                }
            }
        };
        *loaded.rows.entry(c).or_default().entry(source).or_default() += 1;
    }
    if missing.is_empty() {
        return Ok(());
    }
    let mut msg = String::from(
        "these frozen weights have no source, and training against random ones would be silently wrong:\n",
    );
    for (c, keys) in &missing {
        let shown: Vec<&str> = keys.iter().take(3).copied().collect();
        let more = if keys.len() > 3 { format!(" and {} more", keys.len() - 3) } else { String::new() };
        let read = match file_of(*c) {
            Some(p) => format!("{} does not hold them", p.display()),
            None => format!("{} is not set", c.config_key()),
        };
        msg.push_str(&format!("  {}: {} tensors missing ({}{more}); {read}\n", c.name(), keys.len(), shown.join(", ")));
    }
    msg.push_str(
        "set the component's from_pretrained to a file that holds it, or pass --allow-random-weights to train \
         against random weights on purpose (tests, benchmarks)",
    );
    Err(Error::msg(msg))
}
