//! The parity tool's core: run one model part on given weights and inputs and return every
//! tensor a PyTorch user would compare (`zeroconv forward`).

use super::device::{compile_program, flash_attention, CompileOptions, DeviceChoice};
use super::weights::load_params;
use crate::engine::{HostTensor, Program};
use crate::error::{Error, Result};
use crate::graph::autodiff::backward;
use crate::graph::passes::PassOptions;
use crate::graph::{DType, Graph, ValueId};
use crate::io::checkpoint::Checkpoint;
use crate::models::control_ldm::{self, Batch, ControlLdmConfig};
use crate::models::{
    clip, vae, ClipConfig, ClipOutput, ModelBuilder, VaeConfig, CLIP_PREFIX, CONTROL_PREFIX, UNET_PREFIX, VAE_PREFIX,
};

/// Reads input `name` with the expected rank, naming the file and the tensor on error.
fn input(inputs: &Checkpoint, name: &str, rank: usize) -> Result<(Vec<usize>, HostTensor)> {
    let t = inputs.tensor(name).map_err(|_| {
        Error::file(
            inputs.path(),
            format!("has no tensor '{name}' (it has: {})", inputs.keys().collect::<Vec<_>>().join(", ")),
        )
    })?;
    if t.shape.len() != rank {
        return Err(Error::file(inputs.path(), format!("'{name}' must have rank {rank}, has shape {:?}", t.shape)));
    }
    if t.shape.contains(&0) {
        return Err(Error::file(
            inputs.path(),
            format!("'{name}' has shape {:?}: every dimension must be at least 1 (a batch of 0?)", t.shape),
        ));
    }
    Ok((t.shape.clone(), t.to_host()))
}

/// The weights a graph reads: its parameters, the whole component they belong to (the keys the file is checked
/// against), the file and the key prefixes.
struct Weights<'a> {
    specs: &'a [crate::models::ParamSpec],
    component: &'a [crate::models::ParamSpec],
    ckpt: &'a Checkpoint,
    prefixes: &'a [&'a str],
}

/// Compiles `g` with outputs `outs` for `device` (with `options`), loads the weights, uploads `feeds`, runs one step
/// and downloads `outs` under their names.
fn run_graph(
    device: DeviceChoice,
    options: &CompileOptions,
    mut g: Graph,
    w: Weights,
    feeds: &[(ValueId, HostTensor)],
    outs: &[(String, ValueId)],
) -> Result<Vec<(String, HostTensor)>> {
    g.outputs = outs.iter().map(|(_, v)| *v).collect();
    let opt = super::step::run_passes(&g, &PassOptions::default())?;
    let mut prog = compile_program(device, opt.graph, options)?;
    load_params(&mut prog, &opt.map, w.specs, w.component, w.ckpt, w.prefixes)?;
    for (v, t) in feeds {
        let Some(nv) = opt.map.get(*v) else { continue };
        let dtype = prog.graph().dtype(nv);
        let t = if t.dtype == dtype { t.clone() } else { HostTensor::from_f64(t.shape.clone(), dtype, &t.to_f64())? };
        prog.upload(nv, &t)?;
    }
    prog.launch()?;
    prog.synchronize()?;
    outs.iter()
        .map(|(name, v)| {
            let nv = opt.map.get(*v).ok_or_else(|| Error::msg(format!("output {name} was optimised away")))?;
            Ok((name.clone(), prog.download(nv)?))
        })
        .collect()
}

/// ControlNet + locked U-Net: `eps`, `control.{i}`, and with `grad` also `loss` and
/// `grad.<key>` for every ControlNet parameter.
pub fn control_ldm(
    device: DeviceChoice,
    cfg: &ControlLdmConfig,
    ckpt: &Checkpoint,
    inputs: &Checkpoint,
    grad: bool,
    compute: DType,
) -> Result<Vec<(String, HostTensor)>> {
    let (xs, x) = input(inputs, "x", 4)?;
    let (ts, t) = input(inputs, "t", 1)?;
    let (cs, c) = input(inputs, "context", 3)?;
    let (hs, h) = input(inputs, "hint", 4)?;
    let shape = Batch { batch: xs[0], latent_h: xs[2], latent_w: xs[3], context_len: cs[1] };
    let expect = |what: &str, got: &[usize], want: Vec<usize>| -> Result<()> {
        if got == want.as_slice() {
            Ok(())
        } else {
            Err(Error::file(inputs.path(), format!("'{what}' has shape {got:?}; with x {xs:?} it must be {want:?}")))
        }
    };
    expect("x", &xs, vec![shape.batch, cfg.unet.in_channels, shape.latent_h, shape.latent_w])?;
    expect("t", &ts, vec![shape.batch])?;
    expect("context", &cs, vec![shape.batch, shape.context_len, cfg.unet.context_dim])?;
    expect("hint", &hs, vec![shape.batch, cfg.control.hint_channels, 8 * shape.latent_h, 8 * shape.latent_w])?;
    let t = HostTensor::from_f64(t.shape.clone(), DType::I64, &t.to_f64())?;
    let mut m = control_ldm::build(cfg, shape, DType::F32, compute, grad)?;
    let mut feeds = vec![(m.x, x), (m.t, t), (m.context, c), (m.hint, h)];
    let mut outs: Vec<(String, ValueId)> = vec![("eps".into(), m.eps)];
    outs.extend(m.control.iter().enumerate().map(|(i, &v)| (format!("control.{i}"), v)));
    if grad {
        let (tgs, target) = input(inputs, "target", 4)?;
        expect("target", &tgs, vec![shape.batch, cfg.unet.out_channels, shape.latent_h, shape.latent_w])?;
        let loss = m.loss.expect("built with a loss");
        feeds.push((m.target.expect("built with a target"), target));
        let params: Vec<(String, ValueId)> =
            m.b.params.iter().filter(|p| p.key.starts_with(CONTROL_PREFIX)).map(|p| (p.key.clone(), p.value)).collect();
        let wrt: Vec<ValueId> = params.iter().map(|p| p.1).collect();
        let grads = backward(&mut m.b.g, loss, &wrt)?;
        outs.push(("loss".into(), loss));
        for (key, v) in params {
            match grads.get(&v) {
                Some(&d) => outs.push((format!("grad.{key}"), d)),
                None => return Err(Error::msg(format!("the loss does not depend on {key}"))),
            }
        }
    }
    let w = Weights { specs: &m.b.params, component: &m.b.params, ckpt, prefixes: &[UNET_PREFIX, CONTROL_PREFIX] };
    let flash = flash_attention(cfg.unet.use_flash_attention, cfg.control.unet.use_flash_attention)?;
    let options = CompileOptions { threads: None, flash_attention: flash };
    run_graph(device, &options, m.b.g, w, &feeds, &outs)
}

/// The VAE: `image` → `mean`, `logvar` (when present) and `z` → `decoded` (when present).
pub fn vae_parts(
    device: DeviceChoice,
    cfg: &VaeConfig,
    ckpt: &Checkpoint,
    inputs: &Checkpoint,
) -> Result<Vec<(String, HostTensor)>> {
    let mut b = ModelBuilder::new(DType::F32);
    let mut feeds = Vec::new();
    let mut outs = Vec::new();
    if inputs.contains("image") {
        let (s, img) = input(inputs, "image", 4)?;
        let x = b.g.input("image", s, DType::F32);
        let (mean, logvar) = vae::vae_encode(&mut b, VAE_PREFIX, cfg, x)?;
        feeds.push((x, img));
        outs.push(("mean".to_string(), mean));
        outs.push(("logvar".to_string(), logvar));
    }
    if inputs.contains("z") {
        let (s, z) = input(inputs, "z", 4)?;
        let zv = b.g.input("z", s, DType::F32);
        let d = vae::vae_decode(&mut b, VAE_PREFIX, cfg, zv)?;
        feeds.push((zv, z));
        outs.push(("decoded".to_string(), d));
    }
    if outs.is_empty() {
        return Err(Error::file(inputs.path(), "holds neither 'image' (to encode) nor 'z' (to decode)"));
    }
    // The encoder or the decoder alone still accepts the whole VAE's file.
    let whole = crate::models::counts::vae_params(cfg)?;
    let w = Weights { specs: &b.params, component: &whole, ckpt, prefixes: &[VAE_PREFIX] };
    // use_flash_attention belongs to the U-Net and ControlNet sections: the VAE alone keeps the composite attention.
    run_graph(device, &CompileOptions::default(), b.g, w, &feeds, &outs)
}

/// The CLIP text encoder: `ids` [B, L] → `hidden` [B, L, D].
pub fn text(
    device: DeviceChoice,
    cfg: &ClipConfig,
    ckpt: &Checkpoint,
    inputs: &Checkpoint,
) -> Result<Vec<(String, HostTensor)>> {
    let (s, ids) = input(inputs, "ids", 2)?;
    let mut b = ModelBuilder::new(DType::F32);
    let iv = b.g.input("ids", s, DType::I64);
    let ids = HostTensor::from_f64(ids.shape.clone(), DType::I64, &ids.to_f64())?;
    let h = clip::clip_text(&mut b, CLIP_PREFIX, cfg, iv)?;
    // A model that stops early (SD 2's penultimate layer) still accepts the whole encoder's file.
    let whole = crate::models::counts::clip_params(&ClipConfig { output: ClipOutput::Last, ..cfg.clone() })?;
    let w = Weights { specs: &b.params, component: &whole, ckpt, prefixes: &[CLIP_PREFIX] };
    // As for the VAE: the text encoder alone is not covered by use_flash_attention.
    run_graph(device, &CompileOptions::default(), b.g, w, &[(iv, ids)], &[("hidden".to_string(), h)])
}
