//! Moving model parameters between checkpoints and a compiled program: checking a checkpoint
//! against what the model expects, uploading (converting dtypes), random initialisation, and
//! collecting parameters for export.

pub mod store;

use crate::engine::{HostTensor, Program};
use crate::error::{Error, Result};
use crate::graph::passes::ValueMap;
use crate::io::checkpoint::{check_keys, Checkpoint};
use crate::models::{Init, ParamSpec};

/// The (key relative to `prefix`, shape) pairs of the parameters under `prefix`.
pub fn expected_under(specs: &[ParamSpec], prefix: &str) -> Vec<(String, Vec<usize>)> {
    specs.iter().filter_map(|p| p.key.strip_prefix(prefix).map(|k| (k.to_string(), p.shape.dims().to_vec()))).collect()
}

/// Checks, then uploads every parameter whose key starts with one of `prefixes` from `ckpt`.
/// `map` takes the model's value ids to the compiled program's. The keys under each prefix are checked against
/// `component` (the whole component's parameters, when the graph uses only a part of it, as the VAE's encoder
/// alone does: the component's file holds the other part too, which is then expected, not an error).
pub fn load_params<P: Program>(
    prog: &mut P,
    map: &ValueMap,
    specs: &[ParamSpec],
    component: &[ParamSpec],
    ckpt: &Checkpoint,
    prefixes: &[&str],
) -> Result<usize> {
    for prefix in prefixes {
        let with_dot = format!("{prefix}.");
        check_keys(&expected_under(component, &with_dot), ckpt, &with_dot)?;
    }
    let mut n = 0;
    for spec in specs.iter().filter(|s| prefixes.iter().any(|p| s.key.starts_with(&format!("{p}.")))) {
        let Some(v) = map.get(spec.value) else { continue }; // removed as dead code: nothing reads it
        let t = ckpt.tensor(&spec.key)?;
        let dtype = prog.graph().dtype(v);
        let host = HostTensor::from_f64(spec.shape.clone(), dtype, &t.to_f64())?;
        prog.upload(v, &host)?;
        n += 1;
    }
    Ok(n)
}

/// A fresh value for a parameter, as PyTorch's default initialisers would give it.
pub fn init_value(spec: &ParamSpec, rng: &mut crate::rng::Rng) -> Vec<f64> {
    let n = spec.shape.numel();
    match spec.init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Uniform(bound) => (0..n).map(|_| rng.uniform_symmetric() * bound).collect(),
        Init::Normal(std) => (0..n).map(|_| rng.normal() * std).collect(),
    }
}

/// Downloads every parameter under `prefix` as (key, tensor), for export.
pub fn collect_params<P: Program>(
    prog: &mut P,
    map: &ValueMap,
    specs: &[ParamSpec],
    prefix: &str,
) -> Result<Vec<(String, HostTensor)>> {
    specs
        .iter()
        .filter(|s| s.key.starts_with(prefix))
        .map(|s| {
            let v = map.get(s.value).ok_or_else(|| Error::msg(format!("parameter {} was optimised away", s.key)))?;
            Ok((s.key.clone(), prog.download(v)?))
        })
        .collect()
}

/// Uploads a fresh initialisation of every parameter (PyTorch's default initialisers; zero
/// convolutions start at zero), and zeroes are already in optimizer state. For benchmarks and
/// training from scratch.
pub fn init_params<P: Program>(prog: &mut P, map: &ValueMap, specs: &[ParamSpec], seed: u64) -> Result<()> {
    let mut rng = crate::rng::Rng::new(seed);
    for spec in specs {
        let Some(v) = map.get(spec.value) else { continue };
        let data = init_value(spec, &mut rng);
        let dtype = prog.graph().dtype(v);
        prog.upload(v, &HostTensor::from_f64(spec.shape.clone(), dtype, &data)?)?;
    }
    Ok(())
}
