//! What a resume may change. Every checkpoint records the whole config it was trained with (as JSON, in its
//! metadata under [`CONFIG_KEY`]); a resume compares it key by key with the config it is given. A change to
//! anything that changes the computation (seed, batch sizes, precision, optimizer, architecture, noise schedule,
//! data augmentation, gradient clipping, ...) is refused, listing every difference. Allowed are the keys in
//! [`MAY_CHANGE`] (the learning rate, its schedule and the run's length, which a user changes on purpose) and
//! the keys in [`NOT_COMPUTATION`] (where files are, how often to log or checkpoint, execution switches).
//!
//! The comparison is over every leaf of the config, so a key added later is checked without being listed here;
//! a key that only one of the two configs has (a checkpoint from an older or newer zeroconv) is skipped.

use crate::error::{Error, Result};
use crate::io::config::Config;
use serde_json::Value;
use std::collections::BTreeMap;

/// The checkpoint metadata key holding the config (JSON) the checkpoint was trained with.
pub const CONFIG_KEY: &str = "zeroconv.config";

/// Keys (and sections) a resume may change on purpose.
pub const MAY_CHANGE: &[&str] = &["model.optim.lr", "model.optim.sched", "trainer.max_steps", "trainer.max_epochs"];

/// Keys (and sections) that do not change what a step computes: where things are, how often to log, checkpoint
/// or validate, sampling settings, and execution switches that compute the same step another way.
pub const NOT_COMPUTATION: &[&str] = &[
    "exp_manager",
    "infer",
    "trainer.log_every_n_steps",
    "trainer.val_check_interval",
    "trainer.accelerator",
    "model.resume_from_checkpoint",
    "model.restore_from_path",
    "model.strength",
    "model.guess_mode",
    "model.inductor",
    "model.data.num_workers",
    "model.data.train.dataset_path",
    "model.data.webdataset.local_root_path",
];

/// Leaf names that are paths, file formats or execution switches wherever they appear.
const NOT_COMPUTATION_LEAVES: &[&str] =
    &["from_pretrained", "from_pretrained_unet", "from_NeMo", "tokenizer", "use_checkpoint", "use_flash_attention"];

/// Keys added after checkpoints were first written, with the value that describes what a zeroconv without the key
/// did: a checkpoint that lacks one is compared as if it held that value, so a resume cannot switch the behaviour
/// silently (an older run tokenized with the basic cleanup and used quick-GELU text encoders).
const BEFORE_THE_KEY: &[(&str, &str)] =
    &[("model.cond_stage_config.text_cleanup", "basic"), ("model.cond_stage_config.hidden_act", "quick_gelu")];

/// Keys compared through the global batch they make, not one by one (the same batch can be written several ways).
const BATCH_KEYS: &[&str] =
    &["model.global_batch_size", "trainer.accumulate_grad_batches", "trainer.devices", "trainer.num_nodes"];

/// The name a difference in the global batch is reported under.
pub const GLOBAL_BATCH: &str =
    "global batch size (model.global_batch_size, or micro_batch_size x devices x num_nodes x accumulate_grad_batches)";

/// One key whose value differs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    /// In the checkpoint's config.
    pub before: String,
    /// In the config given now.
    pub now: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} in the checkpoint, {} now", self.key, self.before, self.now)
    }
}

/// The differences between a checkpoint's config and the one given now.
#[derive(Clone, Debug, Default)]
pub struct Comparison {
    /// Changes to the computation: the resume is refused.
    pub refused: Vec<Change>,
    /// Changes of [`MAY_CHANGE`] keys (worth a notice).
    pub allowed: Vec<Change>,
}

/// The config as a checkpoint records it.
pub fn record(cfg: &Config) -> Result<String> {
    serde_json::to_string(cfg).map_err(|e| Error::msg(format!("the config cannot be recorded in checkpoints: {e}")))
}

/// Compares a recorded config (from [`record`]) with `now`.
pub fn compare(recorded: &str, now: &Config) -> Result<Comparison> {
    let before: Value = serde_json::from_str(recorded)
        .map_err(|e| Error::msg(format!("the recorded config is not valid JSON: {e}")))?;
    let now = serde_json::to_value(now).map_err(|e| Error::msg(format!("the config cannot be compared: {e}")))?;
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten(&before, "", &mut a);
    flatten(&now, "", &mut b);
    for (key, old) in BEFORE_THE_KEY {
        if !a.is_empty() && !a.contains_key(*key) {
            a.insert(key.to_string(), Value::String(old.to_string()));
        }
    }
    let mut out = Comparison::default();
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for key in keys {
        if covered(key, BATCH_KEYS) || covered(key, NOT_COMPUTATION) || is_path_leaf(key) {
            continue;
        }
        let (va, vb) = match (a.get(key), b.get(key)) {
            (Some(va), Some(vb)) => (render(va), render(vb)),
            // A section that is null on one side and filled on the other (model.optim.sched).
            (Some(va), None) if has_leaf_ancestor(key, &b) => (render(va), "null".to_string()),
            (None, Some(vb)) if has_leaf_ancestor(key, &a) => ("null".to_string(), render(vb)),
            // A key one zeroconv version has and the other has not.
            _ => continue,
        };
        if va == vb {
            continue;
        }
        let change = Change { key: key.clone(), before: va, now: vb };
        if covered(key, MAY_CHANGE) {
            out.allowed.push(change);
        } else {
            out.refused.push(change);
        }
    }
    // The global batch, compared as the number it makes.
    if let (Some(x), Some(y)) = (global_batch(&a), global_batch(&b)) {
        if x != y {
            out.refused.push(Change { key: GLOBAL_BATCH.to_string(), before: x.to_string(), now: y.to_string() });
        }
    }
    Ok(out)
}

fn flatten(v: &Value, path: &str, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, inner) in map {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                flatten(inner, &p, out);
            }
        }
        _ => {
            out.insert(path.to_string(), v.clone());
        }
    }
}

/// `key` is one of `prefixes` or inside one of them.
fn covered(key: &str, prefixes: &[&str]) -> bool {
    prefixes.iter().any(|p| key == *p || key.strip_prefix(p).is_some_and(|rest| rest.starts_with('.')))
}

fn is_path_leaf(key: &str) -> bool {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    NOT_COMPUTATION_LEAVES.contains(&leaf)
}

fn has_leaf_ancestor(key: &str, map: &BTreeMap<String, Value>) -> bool {
    let mut k = key;
    while let Some((parent, _)) = k.rsplit_once('.') {
        if map.contains_key(parent) {
            return true;
        }
        k = parent;
    }
    false
}

fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn global_batch(flat: &BTreeMap<String, Value>) -> Option<u64> {
    let num = |k: &str| flat.get(k).and_then(Value::as_u64);
    if let Some(g) = num("model.global_batch_size") {
        return Some(g);
    }
    let micro = num("model.micro_batch_size")?;
    let devices = num("trainer.devices").unwrap_or(1);
    let nodes = num("trainer.num_nodes").unwrap_or(1);
    let accum = num("trainer.accumulate_grad_batches").unwrap_or(1);
    Some(micro * devices * nodes * accum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed(f: impl FnOnce(&mut Config)) -> Comparison {
        let base = Config::builtin_tiny();
        let mut now = base.clone();
        f(&mut now);
        compare(&record(&base).unwrap(), &now).unwrap()
    }

    #[test]
    fn the_same_config_has_no_differences() {
        let c = changed(|_| {});
        assert!(c.refused.is_empty() && c.allowed.is_empty(), "{c:?}");
    }

    #[test]
    fn computation_changes_are_refused_and_lr_is_allowed() {
        let c = changed(|c| {
            c.model.seed += 1;
            c.model.optim.betas[1] = 0.99;
            c.model.optim.lr *= 2.0;
            c.trainer.max_steps = Some(77);
            c.exp_manager.checkpoint_callback_params.every_n_train_steps = Some(5);
            c.model.unet_config.use_checkpoint = !c.model.unet_config.use_checkpoint;
        });
        let refused: Vec<&str> = c.refused.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(refused, ["model.optim.betas", "model.seed"], "{c:?}");
        let allowed: Vec<&str> = c.allowed.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(allowed, ["model.optim.lr", "trainer.max_steps"], "{c:?}");
    }

    #[test]
    fn the_global_batch_is_compared_as_a_number() {
        // The same batch written another way is no change.
        let c = changed(|c| {
            c.model.global_batch_size = Some(c.model.micro_batch_size * c.trainer.accumulate_grad_batches);
        });
        assert!(c.refused.is_empty(), "{c:?}");
        let c = changed(|c| c.trainer.accumulate_grad_batches = 2);
        assert_eq!(c.refused.len(), 1, "{c:?}");
        assert_eq!(c.refused[0].key, GLOBAL_BATCH);
    }

    #[test]
    fn a_checkpoint_older_than_a_key_is_compared_with_what_it_did() {
        let now = Config::default();
        let mut recorded: Value = serde_json::from_str(&record(&now).unwrap()).unwrap();
        let text_encoder = recorded["model"]["cond_stage_config"].as_object_mut().unwrap();
        text_encoder.remove("text_cleanup");
        text_encoder.remove("hidden_act");
        let c = compare(&recorded.to_string(), &now).unwrap();
        let keys: Vec<&str> = c.refused.iter().map(|ch| ch.key.as_str()).collect();
        assert_eq!(keys, vec!["model.cond_stage_config.text_cleanup"], "{:?}", c.refused);
        let mut basic = now.clone();
        basic.model.cond_stage_config.text_cleanup = crate::io::config::TextCleanup::Basic;
        assert!(compare(&recorded.to_string(), &basic).unwrap().refused.is_empty());
    }

    #[test]
    fn keys_of_another_version_are_skipped() {
        let base = Config::builtin_tiny();
        let mut v: Value = serde_json::from_str(&record(&base).unwrap()).unwrap();
        v["model"]["a_key_from_another_version"] = Value::from(3);
        v["model"].as_object_mut().unwrap().remove("text_embedding_dropout_rate");
        let c = compare(&v.to_string(), &base).unwrap();
        assert!(c.refused.is_empty(), "{c:?}");
    }
}
