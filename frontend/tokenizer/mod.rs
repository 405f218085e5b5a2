//! The CLIP tokenizer.
