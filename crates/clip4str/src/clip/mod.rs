//! The CLIP backbone: image encoder, text encoder and BPE tokenizer.

pub mod bpe;
pub mod text;
pub mod transformer;
pub mod vision;
