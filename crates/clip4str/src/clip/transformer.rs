//! CLIP's pre-LN residual attention blocks, shared by the image and the text encoder.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{LayerNorm, Linear, Mode, MultiheadAttention};

/// One `ResidualAttentionBlock`: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))` with QuickGELU.
#[derive(Debug, Clone)]
pub struct ResidualAttentionBlock {
    ln_1: LayerNorm,
    attn: MultiheadAttention,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    mode: Mode,
}

impl ResidualAttentionBlock {
    /// Loads `ln_1`, `attn`, `ln_2`, `mlp.c_fc`, `mlp.c_proj` of width `dim` (MLP 4x).
    pub fn new(dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Self::pruned(dim, 1, heads, vb)
    }

    /// A block of width `dim` whose attention and MLP are `reduction` times narrower inside (attention
    /// `dim / reduction`, MLP `4 dim / reduction`), as LST's pruned side blocks; `reduction` 1 is CLIP's block.
    pub fn pruned(dim: usize, reduction: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let (inner, hidden) = (dim / reduction, 4 * dim / reduction);
        Ok(Self {
            ln_1: LayerNorm::new(dim, vb.pp("ln_1"))?,
            attn: MultiheadAttention::with_inner(dim, inner, heads, 0.0, vb.pp("attn"))?,
            ln_2: LayerNorm::new(dim, vb.pp("ln_2"))?,
            c_fc: Linear::new(dim, hidden, vb.pp("mlp").pp("c_fc"))?,
            c_proj: Linear::new(hidden, dim, vb.pp("mlp").pp("c_proj"))?,
            mode: Mode::default(),
        })
    }

    /// Computes in `mode` from now on.
    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
        self.ln_1.set_mode(mode);
        self.attn.set_mode(mode);
        self.ln_2.set_mode(mode);
        self.c_fc.set_mode(mode);
        self.c_proj.set_mode(mode);
    }

    /// `x [B, L, D]`, `mask` additive `[L, L]` or none.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self.ln_1.forward(x)?;
        let x = (x + self.attn.forward(&h, &h, mask, false)?)?;
        let h = self.c_proj.forward(
            &self
                .mode
                .quick_gelu(&self.c_fc.forward(&self.ln_2.forward(&x)?)?)?,
        )?;
        x + h
    }
}

/// A stack of residual attention blocks (`transformer.resblocks.N`).
#[derive(Debug, Clone)]
pub struct Transformer {
    /// The blocks, in order.
    pub resblocks: Vec<ResidualAttentionBlock>,
}

impl Transformer {
    /// Loads `layers` blocks under `resblocks.N`.
    pub fn new(dim: usize, layers: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("resblocks");
        let resblocks = (0..layers)
            .map(|i| ResidualAttentionBlock::new(dim, heads, vb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { resblocks })
    }

    /// Computes in `mode` from now on.
    pub fn set_mode(&mut self, mode: Mode) {
        self.resblocks.iter_mut().for_each(|b| b.set_mode(mode));
    }

    /// Runs every block with the same mask.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for block in &self.resblocks {
            x = block.forward(&x, mask)?;
        }
        Ok(x)
    }
}
