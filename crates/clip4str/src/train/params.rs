//! Which weights train (SPEC §12.5) and a weight store that makes frozen weights constants.
//!
//! Trainable tensors are candle `Var`s, so autograd reaches them and the optimizer updates them in
//! place (the model keeps views of the same storage). Frozen tensors are plain tensors: no gradient is
//! ever computed for them, and a branch whose weights are all frozen is not even traced.

use std::collections::HashMap;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::TrainError;
use crate::config::Clip4StrConfig;
use crate::model::Clip4Str;

/// Block index of `name` if it is inside `prefix<N>.`.
fn block_index(name: &str, prefix: &str) -> Option<i64> {
    name.strip_prefix(prefix)?.split('.').next()?.parse().ok()
}

/// Whether the reference trains the state-dict tensor `name` (`freeze_cip_layers`).
///
/// `image_freeze_nlayer = n > -1` freezes the ViT's class and positional embeddings and blocks `< n`;
/// `text_freeze_nlayer = n > -1` freezes the token and positional embeddings, `logit_scale` and text blocks
/// `< n`. A value of 12 or more freezes the whole branch (the reference's literal threshold, whatever the
/// depth). Decoder tensors always train.
pub fn is_trainable(name: &str, cfg: &Clip4StrConfig) -> bool {
    let Some(clip) = name.strip_prefix("clip_model.") else {
        return true;
    };
    if let Some(visual) = clip.strip_prefix("visual.") {
        let n = cfg.image_freeze_nlayer;
        if n >= 12 {
            return false;
        }
        if n <= -1 {
            return true;
        }
        if ["ln_post.", "proj", "conv1", "ln_pre"]
            .iter()
            .any(|p| visual.starts_with(p))
        {
            return true;
        }
        return block_index(visual, "transformer.resblocks.").is_some_and(|layer| layer >= n);
    }
    let n = cfg.text_freeze_nlayer;
    if n >= 12 {
        return false;
    }
    if n <= -1 {
        return true;
    }
    if clip.starts_with("ln_final.") || clip.starts_with("text_projection") {
        return true;
    }
    block_index(clip, "transformer.resblocks.").is_some_and(|layer| layer >= n)
}

/// Every weight of a model being trained: trainable ones as `Var`s, frozen ones as constants.
#[derive(Clone)]
pub struct ParamStore {
    trainable: Vec<(String, Var)>,
    index: HashMap<String, usize>,
    frozen: HashMap<String, Tensor>,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for ParamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamStore")
            .field("trainable", &self.trainable.len())
            .field("frozen", &self.frozen.len())
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

impl ParamStore {
    /// Splits a state dict into trainable and frozen weights following `cfg` (names as in a Lightning
    /// checkpoint). Every tensor the configuration needs must be present with its shape; extra tensors are
    /// ignored. Weights are copied to `device` in `dtype` (training is meant for f32).
    pub fn new(
        cfg: &Clip4StrConfig,
        weights: &HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let mut trainable = Vec::new();
        let mut index = HashMap::new();
        let mut frozen = HashMap::new();
        for (name, shape) in Clip4Str::expected_tensors(cfg)? {
            let tensor = weights.get(&name).ok_or_else(|| TrainError::Parameter {
                name: name.clone(),
                reason: "missing from the weights".into(),
            })?;
            if tensor.dims() != shape.as_slice() {
                return Err(TrainError::Parameter {
                    name,
                    reason: format!("shape {:?}, expected {shape:?}", tensor.dims()),
                });
            }
            let tensor = tensor.to_device(device)?.to_dtype(dtype)?;
            if is_trainable(&name, cfg) {
                index.insert(name.clone(), trainable.len());
                trainable.push((name, Var::from_tensor(&tensor.detach())?));
            } else {
                frozen.insert(name, tensor.detach());
            }
        }
        Ok(Self {
            trainable,
            index,
            frozen,
            dtype,
            device: device.clone(),
        })
    }

    /// A `VarBuilder` for [`Clip4Str::new`] that hands out the `Var`s themselves (not copies), so optimizer
    /// updates reach the model without rebuilding it.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), self.dtype, self.device.clone())
    }

    /// Builds the model on these weights.
    pub fn build_model(&self, cfg: &Clip4StrConfig) -> Result<Clip4Str, TrainError> {
        Ok(Clip4Str::new(cfg, self.var_builder())?)
    }

    /// Trainable `(name, Var)` pairs in construction order.
    pub fn trainable(&self) -> &[(String, Var)] {
        &self.trainable
    }

    /// Names of the frozen tensors (unordered).
    pub fn frozen_names(&self) -> impl Iterator<Item = &str> {
        self.frozen.keys().map(String::as_str)
    }

    /// The trainable `Var` called `name`, if it trains.
    pub fn var(&self, name: &str) -> Option<&Var> {
        self.index.get(name).map(|&i| &self.trainable[i].1)
    }

    /// Current value of any weight (detached).
    pub fn get(&self, name: &str) -> Option<Tensor> {
        self.var(name)
            .map(Var::as_detached_tensor)
            .or_else(|| self.frozen.get(name).cloned())
    }

    /// Current values of every weight, e.g. to save a checkpoint (detached copies of the references).
    pub fn state_dict(&self) -> HashMap<String, Tensor> {
        let mut out: HashMap<String, Tensor> = self.frozen.clone();
        for (name, var) in &self.trainable {
            out.insert(name.clone(), var.as_detached_tensor());
        }
        out
    }
}

impl SimpleBackend for ParamStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            candle_core::bail!(
                "parameter {name}: shape {:?}, the model expects {s:?}",
                tensor.dims()
            );
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some(var) = self.var(name) {
            // A converted copy would silently stop tracking the optimizer's in-place updates.
            if var.dtype() != dtype || !var.device().same_device(dev) {
                candle_core::bail!(
                    "parameter {name} is a {:?} Var, requested as {dtype:?} on another device",
                    var.dtype()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        match self.frozen.get(name) {
            Some(t) => t.to_device(dev)?.to_dtype(dtype),
            None => candle_core::bail!("parameter {name} is not in the store"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name) || self.frozen.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_freezing() {
        let cfg = Clip4StrConfig::base16();
        let t = |n: &str| is_trainable(n, &cfg);
        assert!(!t("clip_model.token_embedding.weight"));
        assert!(!t("clip_model.positional_embedding"));
        assert!(!t("clip_model.logit_scale"));
        assert!(!t("clip_model.transformer.resblocks.5.ln_1.weight"));
        assert!(t("clip_model.transformer.resblocks.6.ln_1.weight"));
        assert!(t("clip_model.transformer.resblocks.11.mlp.c_fc.weight"));
        assert!(t("clip_model.ln_final.weight"));
        assert!(t("clip_model.text_projection"));
        assert!(t("clip_model.visual.class_embedding"));
        assert!(t(
            "clip_model.visual.transformer.resblocks.0.attn.in_proj_weight"
        ));
        assert!(t("cross_decoder.head.weight"));
    }

    #[test]
    fn image_and_whole_branch_freezing() {
        let mut cfg = Clip4StrConfig::base16();
        cfg.image_freeze_nlayer = 3;
        let t = |n: &str, c: &Clip4StrConfig| is_trainable(n, c);
        assert!(!t("clip_model.visual.class_embedding", &cfg));
        assert!(!t("clip_model.visual.positional_embedding", &cfg));
        assert!(!t(
            "clip_model.visual.transformer.resblocks.2.ln_1.bias",
            &cfg
        ));
        assert!(t(
            "clip_model.visual.transformer.resblocks.3.ln_1.bias",
            &cfg
        ));
        assert!(t("clip_model.visual.conv1.weight", &cfg));
        assert!(t("clip_model.visual.ln_pre.weight", &cfg));
        assert!(t("clip_model.visual.proj", &cfg));
        cfg.image_freeze_nlayer = 12;
        cfg.text_freeze_nlayer = 12;
        assert!(!t("clip_model.visual.proj", &cfg));
        assert!(!t("clip_model.visual.conv1.weight", &cfg));
        assert!(!t("clip_model.ln_final.bias", &cfg));
        assert!(!t("clip_model.text_projection", &cfg));
        assert!(t("visual_decoder.pos_queries", &cfg));
        cfg.text_freeze_nlayer = -1;
        assert!(t("clip_model.logit_scale", &cfg));
        assert!(t("clip_model.token_embedding.weight", &cfg));
    }
}
