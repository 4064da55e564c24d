//! CLIP4STR scene-text recognition on candle.
//!
//! The crate mirrors the paper's figure: a CLIP ViT image encoder ([`clip::vision`]), a PARSeq
//! two-stream visual decoder ([`decoder`]), the CLIP text encoder over the visual prediction
//! ([`clip::text`]) and a cross-modal decoder over `[image tokens ; text tokens]` ([`model`]).
//! It does no network access and prints nothing.

// The MKL build links the library through this crate; nothing else refers to it.
#[cfg(feature = "mkl")]
extern crate intel_mkl_src;

/// How this build multiplies matrices, for benchmark reports ("whichever build, state it").
pub const GEMM_BACKEND: &str = if cfg!(feature = "mkl") {
    "candle + Intel MKL"
} else {
    "pure Rust (candle gemm)"
};

pub mod charset;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod data;
pub mod decoder;
pub mod eval;
pub mod model;
pub mod nn;
pub mod preprocess;
pub mod recognizer;
pub mod train;
