//! Parameters on the host, by checkpoint key: what moves between the programs of a run (the base
//! phase, the ControlNet phase, the samplers) and what pretrained files fill.

use super::init_value;
use crate::engine::{HostTensor, Program};
use crate::error::{Error, Result};
use crate::graph::passes::ValueMap;
use crate::io::checkpoint::Checkpoint;
use crate::models::ParamSpec;
use crate::rng::Rng;
use std::collections::HashMap;

/// Reads tensor `key` of `ckpt`, refusing a NaN or Inf value (checked once at load: one would silently turn every
/// output non-finite), naming the key and the file. The tensor's pages of the mapping are released once copied, so
/// the weights are held once (the copy), not twice.
pub fn read_finite(ckpt: &Checkpoint, key: &str) -> Result<HostTensor> {
    let t = ckpt.to_host(key)?;
    ckpt.release(key);
    match t.first_non_finite() {
        Some(at) => Err(Error::file(
            ckpt.file_of(key),
            format!(
                "{key} holds a non-finite value (element {at}): the file is damaged, or the run that wrote it diverged"
            ),
        )),
        None => Ok(t),
    }
}

#[derive(Default)]
pub struct WeightStore {
    pub tensors: HashMap<String, HostTensor>,
}

impl WeightStore {
    /// Takes every tensor of `ckpt` whose key one of `specs` has, checking shapes; returns how many.
    pub fn load_matching(&mut self, ckpt: &Checkpoint, specs: &[ParamSpec]) -> Result<usize> {
        let mut n = 0;
        for s in specs {
            if let Some(shape) = ckpt.shape(&s.key) {
                if shape != s.shape.dims() {
                    return Err(Error::file(
                        ckpt.file_of(&s.key),
                        format!("{} has shape {shape:?}; the config's model needs {}", s.key, s.shape),
                    ));
                }
                self.tensors.insert(s.key.clone(), read_finite(ckpt, &s.key)?);
                n += 1;
            }
        }
        Ok(n)
    }

    /// `tool_add_control`: each `control_model.X` without a value copies `model.diffusion_model.X`
    /// when that exists with the same shape. Returns the keys that had no counterpart (new layers).
    pub fn copy_unet_into_control(&mut self, specs: &[ParamSpec]) -> Vec<String> {
        let mut new = Vec::new();
        for s in specs.iter().filter(|s| s.key.starts_with("control_model.")) {
            if self.tensors.contains_key(&s.key) {
                continue;
            }
            let src = s.key.replacen("control_model.", "model.diffusion_model.", 1);
            match self.tensors.get(&src) {
                Some(t) if t.shape == s.shape => {
                    let t = t.clone();
                    self.tensors.insert(s.key.clone(), t);
                }
                _ => new.push(s.key.clone()),
            }
        }
        new
    }

    /// Fills every parameter without a value by its initialiser (seeded per key, so the result
    /// does not depend on which program asks first).
    pub fn init_missing(&mut self, specs: &[ParamSpec], seed: u64) -> Result<()> {
        for s in specs {
            if self.tensors.contains_key(&s.key) {
                continue;
            }
            let h = crate::hash::fnv1a64(s.key.as_bytes());
            let mut rng = Rng::new(seed ^ h);
            let data = init_value(s, &mut rng);
            self.tensors.insert(s.key.clone(), HostTensor::from_f64(s.shape.clone(), crate::graph::DType::F32, &data)?);
        }
        Ok(())
    }

    /// Uploads every parameter of `specs` the program still reads.
    pub fn upload<P: Program>(&self, prog: &mut P, map: &ValueMap, specs: &[ParamSpec]) -> Result<()> {
        for s in specs {
            let Some(v) = map.get(s.value) else { continue };
            let t = self.tensors.get(&s.key).ok_or_else(|| missing(&s.key))?;
            upload_as(prog, v, t)?;
        }
        Ok(())
    }

    /// As [`WeightStore::upload`], moving each tensor out of the store as it is uploaded: afterwards the program
    /// holds the only copy of every weight it reads (on the CPU its buffers are host memory: one copy, not two), and
    /// the host's peak stays near the larger of the two instead of their sum. [`WeightStore::download_all`] brings
    /// them back when the host needs them (validation sampling, the base model's file).
    pub fn upload_and_release<P: Program>(&mut self, prog: &mut P, map: &ValueMap, specs: &[ParamSpec]) -> Result<()> {
        for s in specs {
            let Some(v) = map.get(s.value) else { continue };
            let t = self.tensors.remove(&s.key).ok_or_else(|| missing(&s.key))?;
            upload_as(prog, v, &t)?;
        }
        Ok(())
    }

    /// Downloads every parameter of `specs` the program holds (trainable or frozen) back into the store.
    pub fn download_all<P: Program>(&mut self, prog: &mut P, map: &ValueMap, specs: &[ParamSpec]) -> Result<()> {
        for s in specs {
            if let Some(v) = map.get(s.value) {
                self.tensors.insert(s.key.clone(), prog.download(v)?);
            }
        }
        Ok(())
    }

    /// Drops every parameter of `specs` the program holds from the store (after [`WeightStore::download_all`]).
    pub fn release(&mut self, map: &ValueMap, specs: &[ParamSpec]) {
        for s in specs.iter().filter(|s| map.get(s.value).is_some()) {
            self.tensors.remove(&s.key);
        }
    }

    /// Downloads the trainable parameters of `specs` back into the store.
    pub fn download_trainable<P: Program>(&mut self, prog: &mut P, map: &ValueMap, specs: &[ParamSpec]) -> Result<()> {
        for s in specs.iter().filter(|s| s.trainable) {
            if let Some(v) = map.get(s.value) {
                self.tensors.insert(s.key.clone(), prog.download(v)?);
            }
        }
        Ok(())
    }

    /// The tensors under `prefix`, sorted by key (for export; borrowed, so an export copies nothing).
    pub fn under(&self, prefix: &str) -> Vec<(String, &HostTensor)> {
        let mut v: Vec<(String, &HostTensor)> =
            self.tensors.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, t)| (k.clone(), t)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

fn missing(key: &str) -> Error {
    Error::msg(format!("no value for parameter {key}"))
}

/// Uploads `t` into `v`, converted to the program's dtype for it.
fn upload_as<P: Program>(prog: &mut P, v: crate::graph::ValueId, t: &HostTensor) -> Result<()> {
    let dtype = prog.graph().dtype(v);
    if t.dtype == dtype {
        prog.upload(v, t)
    } else {
        prog.upload(v, &HostTensor::from_f64(t.shape.clone(), dtype, &t.to_f64())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::CpuBackend;
    use crate::engine::Backend;
    use crate::graph::passes::ValueMap;
    use crate::graph::{DType, Graph, Shape};
    use crate::models::builder::Init;

    /// After `upload_and_release` the program holds the only copy; `download_all` brings back the same values and
    /// `release` drops them again. A parameter the program does not read stays in the store.
    #[test]
    fn uploaded_weights_leave_the_store_and_come_back() {
        let mut g = Graph::new();
        let a = g.param("a", [3], DType::F32, true);
        let b = g.param("b", [2], DType::F32, false);
        let s = g.add(a, a).unwrap();
        let t = g.add(b, b).unwrap();
        g.outputs.extend([s, t]);
        let spec = |key: &str, n: usize, value, trainable| ParamSpec {
            key: key.into(),
            shape: Shape(vec![n]),
            trainable,
            init: Init::Zeros,
            value,
        };
        let unused = g.values.len() + 10;
        let specs = vec![spec("a", 3, a, true), spec("b", 2, b, false), spec("c", 1, unused, false)];
        let map = ValueMap::identity(g.values.len());
        let mut prog = CpuBackend::new(1).compile(g).unwrap();
        let mut store = WeightStore::default();
        for (k, vals) in [("a", vec![1.0, 2.0, 3.0]), ("b", vec![4.0, 5.0]), ("c", vec![6.0])] {
            store.tensors.insert(k.into(), HostTensor::from_f64([vals.len()], DType::F32, &vals).unwrap());
        }
        let before = store.tensors.clone();
        store.upload_and_release(&mut prog, &map, &specs).unwrap();
        assert_eq!(store.tensors.keys().collect::<Vec<_>>(), vec!["c"], "only the unread parameter stays");
        store.download_all(&mut prog, &map, &specs).unwrap();
        for k in ["a", "b", "c"] {
            assert_eq!(store.tensors[k].bytes, before[k].bytes, "{k}");
        }
        store.release(&map, &specs);
        assert_eq!(store.tensors.len(), 1);
        let err = store.upload_and_release(&mut prog, &map, &specs).unwrap_err().to_string();
        assert!(err.contains("no value for parameter a"), "{err}");
    }
}
