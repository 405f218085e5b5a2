//! The built-in synthetic control dataset: coloured shapes on a grey background. The hint is the
//! shapes' segmentation map (one colour per shape kind, black elsewhere); the caption names the
//! shapes and their colours ("a red circle and a blue square"). So the hint says where and what,
//! the caption says which colour, and a model that follows its hint puts its shapes exactly where
//! the map has them, which `shape_iou` measures (the control-fidelity figure).

use crate::error::Result;
use crate::io::tokenizer::{ClipTokenizer, TokenizerOptions};
use crate::rng::Rng;
use std::collections::HashMap;

pub const COLORS: [(&str, [f32; 3]); 6] = [
    ("red", [0.90, 0.15, 0.15]),
    ("green", [0.15, 0.80, 0.20]),
    ("blue", [0.15, 0.30, 0.95]),
    ("yellow", [0.95, 0.90, 0.15]),
    ("purple", [0.60, 0.20, 0.80]),
    ("orange", [0.95, 0.55, 0.10]),
];
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
/// The segmentation colour of each shape kind in the hint.
pub const HINT_COLORS: [[f32; 3]; 3] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
/// The image background, in [0, 1].
pub const BACKGROUND: [f32; 3] = [0.40, 0.40, 0.40];
/// The name under which the built-in vocabulary is selected (`model.cond_stage_config.version`).
pub const BUILTIN_VOCAB: &str = "builtin:shapes";

pub struct SynthSample {
    /// 3 x size x size in [-1, 1].
    pub image: Vec<f32>,
    /// 3 x size x size in [0, 1].
    pub hint: Vec<f32>,
    pub caption: String,
}

fn inside(kind: usize, x: f32, y: f32, cx: f32, cy: f32, r: f32) -> bool {
    let (dx, dy) = (x - cx, y - cy);
    match kind {
        0 => dx * dx + dy * dy <= r * r,
        1 => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
        // An upward triangle: apex at (cx, cy - r), base at y = cy + r.
        _ => dy >= -r && dy <= r && dx.abs() <= (dy + r) * 0.5,
    }
}

/// Sample `index` of the dataset with `seed`, at `size` x `size` pixels.
pub fn sample(seed: u64, index: u64, size: usize) -> SynthSample {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17));
    let count = 1 + rng.below(2) as usize;
    let n = size * size;
    let mut image: Vec<f32> = (0..3 * n).map(|i| BACKGROUND[i / n]).collect();
    let mut hint = vec![0.0f32; 3 * n];
    let mut words = Vec::new();
    let s = size as f32;
    for _ in 0..count {
        let kind = rng.below(SHAPES.len() as u64) as usize;
        let (cname, color) = COLORS[rng.below(COLORS.len() as u64) as usize];
        let r = s * (0.14 + 0.10 * rng.uniform() as f32);
        let cx = r + (s - 2.0 * r) * rng.uniform() as f32;
        let cy = r + (s - 2.0 * r) * rng.uniform() as f32;
        for py in 0..size {
            for px in 0..size {
                if inside(kind, px as f32 + 0.5, py as f32 + 0.5, cx, cy, r) {
                    let i = py * size + px;
                    for c in 0..3 {
                        image[c * n + i] = color[c];
                        hint[c * n + i] = HINT_COLORS[kind][c];
                    }
                }
            }
        }
        words.push(format!("a {cname} {}", SHAPES[kind]));
    }
    for v in image.iter_mut() {
        *v = *v * 2.0 - 1.0;
    }
    SynthSample { image, hint, caption: words.join(" and ") }
}

/// The pixels a hint marks as shape (any channel lit).
pub fn hint_mask(hint: &[f32], size: usize) -> Vec<bool> {
    let n = size * size;
    (0..n).map(|i| (0..3).any(|c| hint[c * n + i] > 0.5)).collect()
}

/// The pixels of an image (in [-1, 1]) that differ clearly from the background.
pub fn image_mask(image: &[f32], size: usize) -> Vec<bool> {
    let n = size * size;
    (0..n)
        .map(|i| {
            let d: f32 = (0..3).map(|c| (image[c * n + i] - (BACKGROUND[c] * 2.0 - 1.0)).powi(2)).sum();
            d.sqrt() > 0.5
        })
        .collect()
}

/// A 3-channel image averaged over `f` x `f` blocks (the resolution the model generates at, for
/// a block-averaging first stage).
pub fn block_average(img: &[f32], size: usize, f: usize) -> Vec<f32> {
    let s = size / f;
    let (n, m) = (size * size, s * s);
    let mut out = vec![0.0f32; 3 * m];
    for c in 0..3 {
        for y in 0..size {
            for x in 0..size {
                out[c * m + (y / f) * s + x / f] += img[c * n + y * size + x] / (f * f) as f32;
            }
        }
    }
    out
}

/// Intersection over union of two masks (1 when both are empty).
pub fn iou(a: &[bool], b: &[bool]) -> f64 {
    let inter = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
    let union = a.iter().zip(b).filter(|(x, y)| **x || **y).count();
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// The words captions use.
fn words() -> Vec<&'static str> {
    let mut w = vec!["a", "and"];
    w.extend(COLORS.iter().map(|c| c.0));
    w.extend(SHAPES);
    w
}

/// A CLIP tokenizer over the dataset's words: byte-level characters plus the merges that build
/// each word into one token, so captions tokenize exactly as CLIP's BPE would with that vocabulary.
pub fn builtin_tokenizer(max_length: usize) -> Result<ClipTokenizer> {
    let mut vocab: HashMap<String, u32> = HashMap::new();
    let add = |t: String, vocab: &mut HashMap<String, u32>| {
        let n = vocab.len() as u32;
        vocab.entry(t).or_insert(n);
    };
    add("<|startoftext|>".into(), &mut vocab);
    add("<|endoftext|>".into(), &mut vocab);
    for c in 'a'..='z' {
        add(c.to_string(), &mut vocab);
        add(format!("{c}</w>"), &mut vocab);
    }
    let mut merges: Vec<(String, String)> = Vec::new();
    for word in words() {
        let chars: Vec<String> = word.chars().map(|c| c.to_string()).collect();
        let mut acc = chars[0].clone();
        if chars.len() == 1 {
            continue; // "a</w>" is already a token
        }
        for (k, c) in chars.iter().enumerate().skip(1) {
            let right = if k == chars.len() - 1 { format!("{c}</w>") } else { c.clone() };
            let pair = (acc.clone(), right.clone());
            if !merges.contains(&pair) {
                merges.push(pair);
            }
            acc = format!("{acc}{right}");
            add(acc.clone(), &mut vocab);
        }
    }
    ClipTokenizer::new(vocab, merges, TokenizerOptions { max_length, ..Default::default() })
}

/// The vocabulary size the built-in tokenizer needs (ids are below it).
pub fn builtin_vocab_size() -> Result<usize> {
    Ok(builtin_tokenizer(77)?.vocab_size())
}
