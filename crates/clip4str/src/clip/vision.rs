//! CLIP ViT image encoder returning every token (class token included) after `ln_post` and `proj`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::transformer::Transformer;
use crate::config::VisionConfig;
use crate::nn::{LayerNorm, Mode};

/// `clip_model.visual`: patchify, class token, positional embedding, blocks, `ln_post`, `@ proj`.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    /// `conv1.weight` flattened to `[width, 3 * ph * pw]` in (c, ky, kx) order.
    patch_weight: Tensor,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    transformer: Transformer,
    ln_post: LayerNorm,
    proj: Tensor,
    cfg: VisionConfig,
}

impl VisionTransformer {
    /// Loads the encoder; `embed_dim` is the output width of `proj`.
    pub fn new(cfg: &VisionConfig, embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        let [ph, pw] = cfg.patch_size;
        let w = cfg.width;
        let conv = vb.get((w, 3, ph, pw), "conv1.weight")?;
        Ok(Self {
            patch_weight: conv.reshape((w, 3 * ph * pw))?,
            class_embedding: vb.get(w, "class_embedding")?,
            positional_embedding: vb.get((cfg.num_tokens(), w), "positional_embedding")?,
            ln_pre: LayerNorm::new(w, vb.pp("ln_pre"))?,
            transformer: Transformer::new(w, cfg.layers, cfg.heads, vb.pp("transformer"))?,
            ln_post: LayerNorm::new(w, vb.pp("ln_post"))?,
            proj: vb.get((w, embed_dim), "proj")?,
            cfg: cfg.clone(),
        })
    }

    /// Computes in `mode` from now on.
    pub fn set_mode(&mut self, mode: Mode) {
        self.ln_pre.set_mode(mode);
        self.transformer.set_mode(mode);
        self.ln_post.set_mode(mode);
    }

    /// Where the weights live (inputs must be put there).
    pub fn device(&self) -> &candle_core::Device {
        self.patch_weight.device()
    }

    /// Stride-`patch` convolution as a reshape plus one matmul (exact, and works for rectangles).
    fn patchify(&self, images: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = images.dims4()?;
        let [ph, pw] = self.cfg.patch_size;
        let (gh, gw) = (h / ph, w / pw);
        let patches = images
            .reshape((b, c, gh, ph, gw, pw))?
            .permute((0, 2, 4, 1, 3, 5))? // [B, gh, gw, c, ph, pw]
            .contiguous()?
            .reshape((b * gh * gw, c * ph * pw))?;
        patches
            .matmul(&self.patch_weight.t()?)?
            .reshape((b, gh * gw, self.cfg.width)) // [B, g*g, width], row-major patch order
    }

    /// `images [B, 3, H, W]` -> memory `[B, 1 + g*g, embed_dim]`.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_block_inputs(images, &[])?.0)
    }

    /// [`Self::forward`], also returning the input of each block in `blocks` (`ln_pre`'s output for block 0,
    /// else the previous block's output), in the order asked: what LST's side network reads (SPEC §16).
    pub fn forward_with_block_inputs(
        &self,
        images: &Tensor,
        blocks: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (b, _, h, w) = images.dims4()?;
        let [ih, iw] = self.cfg.image_size;
        if (h, w) != (ih, iw) {
            candle_core::bail!("image is {h}x{w}, the model expects {ih}x{iw}");
        }
        if let Some(&bad) = blocks.iter().find(|&&i| i >= self.cfg.layers) {
            candle_core::bail!("block {bad} asked for, the encoder has {}", self.cfg.layers);
        }
        let x = self.patchify(images)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, self.cfg.width))?
            .broadcast_as((b, 1, self.cfg.width))?
            .to_dtype(x.dtype())?;
        let x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.positional_embedding)?;
        let mut x = self.ln_pre.forward(&x)?;
        let mut inputs = vec![None; blocks.len()];
        for (i, block) in self.transformer.resblocks.iter().enumerate() {
            for (slot, _) in inputs.iter_mut().zip(blocks).filter(|(_, &b)| b == i) {
                *slot = Some(x.clone());
            }
            x = block.forward(&x, None)?;
        }
        let memory = Self::project(&self.ln_post, &self.proj, &x)?;
        Ok((memory, inputs.into_iter().flatten().collect()))
    }

    /// `ln(x) @ proj` over every token: the encoder's head, and LST's side network's own copy of it.
    pub fn project(ln: &LayerNorm, proj: &Tensor, x: &Tensor) -> Result<Tensor> {
        let x = ln.forward(x)?;
        let (b, t, d) = x.dims3()?;
        x.reshape((b * t, d))?
            .matmul(proj)?
            .reshape((b, t, proj.dim(1)?))
    }
}
