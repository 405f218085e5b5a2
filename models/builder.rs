//! Building a model into a graph while recording every parameter under its original checkpoint
//! key (`model.diffusion_model.input_blocks.1.0.in_layers.2.weight`, ...), with its shape,
//! whether it trains, and how a fresh model initialises it.

use crate::error::Result;
use crate::graph::{DType, Graph, Shape, ValueId};

/// How a parameter starts when no checkpoint provides it (PyTorch's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// U(-bound, bound): nn.Linear / nn.Conv2d's kaiming-uniform(a=√5) gives bound = 1/√fan_in.
    Uniform(f64),
    /// Normal(0, std): nn.Embedding.
    Normal(f64),
    Zeros,
    Ones,
}

#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub key: String,
    pub shape: Shape,
    pub trainable: bool,
    pub init: Init,
    pub value: ValueId,
}

/// The graph under construction plus the parameter registry.
pub struct ModelBuilder {
    pub g: Graph,
    pub params: Vec<ParamSpec>,
    /// Storage dtype of parameters (f32 master weights, or f64 for gradient checks).
    pub param_dtype: DType,
    /// Whether parameters created now train.
    pub trainable: bool,
    /// When set, activations of blocks are recomputed in the backward (`use_checkpoint`).
    pub checkpoint_blocks: bool,
    /// Key → index in `params`, so building a model twice (gradient accumulation unrolls the
    /// step per micro-batch) shares one set of parameters.
    by_key: std::collections::HashMap<String, usize>,
}

impl ModelBuilder {
    pub fn new(param_dtype: DType) -> Self {
        ModelBuilder {
            g: Graph::new(),
            params: Vec::new(),
            param_dtype,
            trainable: false,
            checkpoint_blocks: false,
            by_key: Default::default(),
        }
    }

    /// The parameter under `key`: created on first use, shared afterwards.
    pub fn param(&mut self, key: &str, shape: impl Into<Shape>, init: Init) -> ValueId {
        let shape = shape.into();
        if let Some(&i) = self.by_key.get(key) {
            assert_eq!(self.params[i].shape, shape, "model bug: {key} built with two shapes");
            return self.params[i].value;
        }
        self.by_key.insert(key.to_string(), self.params.len());
        let value = self.g.param(key, shape.clone(), self.param_dtype, self.trainable);
        self.params.push(ParamSpec { key: key.to_string(), shape, trainable: self.trainable, init, value });
        value
    }

    /// Runs `f` with new parameters trainable or frozen.
    pub fn with_trainable<T>(&mut self, trainable: bool, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let saved = std::mem::replace(&mut self.trainable, trainable);
        let r = f(self);
        self.trainable = saved;
        r
    }

    /// Runs a block, under activation checkpointing when `checkpoint_blocks` is set: its
    /// activations are recomputed in the backward instead of kept.
    pub fn block<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let saved = self.g.set_checkpointing(self.checkpoint_blocks || self.g.checkpointing());
        let r = f(self);
        self.g.set_checkpointing(saved);
        r
    }

    /// Parameter count, optionally only the trainable ones.
    pub fn count(&self, trainable_only: bool) -> usize {
        self.params.iter().filter(|p| p.trainable || !trainable_only).map(|p| p.shape.numel()).sum()
    }

    pub fn count_prefix(&self, prefix: &str) -> usize {
        self.params.iter().filter(|p| p.key.starts_with(prefix)).map(|p| p.shape.numel()).sum()
    }
}
