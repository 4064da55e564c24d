//! CLIP text transformer with the causal mask cut to the context length, returning all token features.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::transformer::Transformer;
use crate::config::TextConfig;
use crate::nn::{causal_mask, LayerNorm, Mode};

/// The text half of `clip_model` (its tensors live at the root of `clip_model.`).
#[derive(Debug, Clone)]
pub struct TextTransformer {
    token_embedding: Tensor,
    positional_embedding: Tensor,
    transformer: Transformer,
    ln_final: LayerNorm,
    text_projection: Tensor,
    /// `logit_scale` is in every state dict; CLIP4STR never uses it.
    _logit_scale: Tensor,
}

impl TextTransformer {
    /// Loads `token_embedding`, `positional_embedding`, `transformer`, `ln_final`, `text_projection`, `logit_scale`.
    pub fn new(cfg: &TextConfig, embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            token_embedding: vb.get((cfg.vocab_size, cfg.width), "token_embedding.weight")?,
            positional_embedding: vb
                .get((cfg.positional_rows, cfg.width), "positional_embedding")?,
            transformer: Transformer::new(cfg.width, cfg.layers, cfg.heads, vb.pp("transformer"))?,
            ln_final: LayerNorm::new(cfg.width, vb.pp("ln_final"))?,
            text_projection: vb.get((cfg.width, embed_dim), "text_projection")?,
            _logit_scale: vb.get((), "logit_scale")?,
        })
    }

    /// Computes in `mode` from now on.
    pub fn set_mode(&mut self, mode: Mode) {
        self.transformer.set_mode(mode);
        self.ln_final.set_mode(mode);
    }

    /// `ids [B, L]` (u32 BPE ids, L = context length) -> features `[B, L, embed_dim]` for every position.
    ///
    /// No padding mask: padding tokens (id 0) are encoded like any other token (SPEC §18.5).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let width = self.token_embedding.dim(1)?;
        let x = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, width))?;
        let x = x.broadcast_add(&self.positional_embedding.narrow(0, 0, l)?)?;
        let mask = causal_mask(l, x.device())?;
        let x = self.transformer.forward(&x, Some(&mask))?;
        let x = self.ln_final.forward(&x)?;
        x.reshape((b * l, width))?
            .matmul(&self.text_projection)?
            .reshape((b, l, self.text_projection.dim(1)?))
    }
}
