//! Model families: which network a checkpoint holds, decided in one place ([`identify`]) from its tensor names,
//! shapes and hyper-parameters, and a loaded model of any family behind one type ([`Model`]).
//!
//! CLIP4STR ([`crate::model`]) is the only family built so far. The others the paper compares with reuse its
//! parts: the CLIP encoders ([`crate::clip`]), the PARSeq two-stream decoder ([`crate::decoder`]) and the
//! charset tokenizer ([`crate::charset`]). Adding one is a module beside `model.rs`, a variant in
//! [`ModelFamily`], [`ModelConfig`] and [`Model`], and a rule in [`ModelFamily::detect`]; the compiler then
//! names every `match` that needs an arm.

use candle_core::{DType, Device, Tensor};

use crate::charset::{CharsetAdapter, CharsetTokenizer};
use crate::checkpoint::{check_tensors, LoadError, RawCheckpoint};
use crate::config::Clip4StrConfig;
use crate::model::{Clip4Str, ForwardOptions, Output, StageObserver};
use crate::nn::Mode;
use crate::str_adapter::{StrAdapter, StrAdapterConfig};

/// The recognizer families this crate builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFamily {
    /// CLIP image and text encoders with a visual and a cross-modal PARSeq decoder (the paper's model).
    Clip4Str,
    /// A frozen CLIP image encoder, an adapter and one PARSeq decoder (the paper's parameter-efficient tuning).
    StrAdapter,
}

/// Whether a checkpoint's tensor names are those of a family.
type NameRule = fn(&Names) -> bool;

/// Families of the reference code that this crate does not build yet, told apart by their tensor names so that
/// their checkpoints are refused by name rather than as "a tensor is missing".
const NOT_BUILT: [(&str, NameRule); 1] =
    [("PARSeq (ViT encoder and PARSeq decoder, no CLIP)", |n| {
        !n.any("clip_model.") && n.any("encoder.") && n.any("decoder.")
    })];

/// The tensor names of a checkpoint, asked by prefix.
struct Names<'a>(&'a [(String, Tensor)]);

impl Names<'_> {
    fn any(&self, prefix: &str) -> bool {
        self.0.iter().any(|(name, _)| name.starts_with(prefix))
    }
}

impl ModelFamily {
    /// Every family this crate builds.
    pub const ALL: [ModelFamily; 2] = [ModelFamily::Clip4Str, ModelFamily::StrAdapter];

    /// The family's name in messages and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Clip4Str => "CLIP4STR",
            Self::StrAdapter => "STRAdapter",
        }
    }

    /// The family whose tensor names `raw` holds. A file that looks like no known family is taken as CLIP4STR,
    /// whose shape inference then names the first tensor it lacks.
    pub fn detect(raw: &RawCheckpoint) -> Result<Self, LoadError> {
        let names = Names(&raw.tensors);
        if names.any("visual_decoder.") || names.any("cross_decoder.") {
            return Ok(Self::Clip4Str);
        }
        if names.any("clip_model.") && (names.any("adapter.") || names.any("decoder.")) {
            return Ok(Self::StrAdapter);
        }
        match NOT_BUILT.iter().find(|(_, matches)| matches(&names)) {
            Some((family, _)) => Err(LoadError::Config {
                path: raw.path.clone(),
                reason: format!(
                    "this is a {family} checkpoint; clip4str reads CLIP4STR and STRAdapter checkpoints"
                ),
            }),
            None => Ok(Self::Clip4Str),
        }
    }
}

/// A family together with that family's configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// A CLIP4STR model.
    Clip4Str(Clip4StrConfig),
    /// An STRAdapter model.
    StrAdapter(StrAdapterConfig),
}

impl ModelConfig {
    /// Which family this configures.
    pub fn family(&self) -> ModelFamily {
        match self {
            Self::Clip4Str(_) => ModelFamily::Clip4Str,
            Self::StrAdapter(_) => ModelFamily::StrAdapter,
        }
    }

    /// The state-dict `(name, shape)` list this configuration loads, in construction order.
    pub fn expected_tensors(&self) -> candle_core::Result<Vec<(String, Vec<usize>)>> {
        match self {
            Self::Clip4Str(cfg) => Clip4Str::expected_tensors(cfg),
            Self::StrAdapter(cfg) => StrAdapter::expected_tensors(cfg),
        }
    }

    /// The hyper-parameters a written model file carries so that it loads alone.
    pub fn hyper_parameters(&self) -> serde_json::Value {
        match self {
            Self::Clip4Str(cfg) => cfg.hyper_parameters(),
            Self::StrAdapter(cfg) => cfg.hyper_parameters(),
        }
    }
}

/// What [`identify`] found: the configuration and the tensors it loads, all present in the file.
#[derive(Debug, Clone)]
pub struct Identified {
    /// Family and configuration.
    pub config: ModelConfig,
    /// Every tensor the model uses, with its shape, in construction order.
    pub expected: Vec<(String, Vec<usize>)>,
}

/// Decides the family of `raw`, infers its configuration (dimensions from tensor shapes, head counts and
/// charsets from its hyper-parameters, then `config_override`), and checks that the file holds exactly the
/// tensors that configuration loads.
pub fn identify(
    raw: &RawCheckpoint,
    config_override: Option<&serde_json::Value>,
) -> Result<Identified, LoadError> {
    let config_error = |error| LoadError::ModelConfig {
        path: raw.path.clone(),
        error,
    };
    let config = match ModelFamily::detect(raw)? {
        ModelFamily::Clip4Str => ModelConfig::Clip4Str(
            Clip4StrConfig::from_tensors_with(
                &raw.shapes(),
                raw.hyper_parameters.as_ref(),
                config_override,
            )
            .map_err(config_error)?,
        ),
        ModelFamily::StrAdapter => ModelConfig::StrAdapter(
            StrAdapterConfig::from_tensors_with(
                &raw.shapes(),
                raw.hyper_parameters.as_ref(),
                config_override,
            )
            .map_err(config_error)?,
        ),
    };
    let mut expected = config
        .expected_tensors()
        .map_err(|source| LoadError::Tensor {
            path: raw.path.clone(),
            error: source,
        })?;
    if config.family() == ModelFamily::StrAdapter {
        // Released files keep all of CLIP, whose text half STRAdapter never reads.
        let used: std::collections::HashSet<String> =
            expected.iter().map(|(n, _)| n.clone()).collect();
        expected.extend(
            raw.shapes()
                .into_iter()
                .filter(|(n, _)| n.starts_with("clip_model.") && !used.contains(n)),
        );
    }
    check_tensors(raw, &expected)?;
    Ok(Identified { config, expected })
}

/// A loaded recognition network of any family.
#[derive(Debug, Clone)]
pub enum Model {
    /// CLIP4STR.
    Clip4Str(Clip4Str),
    /// STRAdapter.
    StrAdapter(StrAdapter),
}

impl From<Clip4Str> for Model {
    fn from(model: Clip4Str) -> Self {
        Self::Clip4Str(model)
    }
}

impl Model {
    /// Builds the model `identified` describes from `raw`'s tensors, on `device`.
    pub fn build(
        identified: &Identified,
        raw: &RawCheckpoint,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let vb = raw.var_builder(DType::F32, device);
        let tensor_error = |source| LoadError::Tensor {
            path: raw.path.clone(),
            error: source,
        };
        match &identified.config {
            ModelConfig::Clip4Str(cfg) => Ok(Self::Clip4Str(
                Clip4Str::new(cfg, vb).map_err(tensor_error)?,
            )),
            ModelConfig::StrAdapter(cfg) => Ok(Self::StrAdapter(
                StrAdapter::new(cfg, vb).map_err(tensor_error)?,
            )),
        }
    }

    /// Which family this is.
    pub fn family(&self) -> ModelFamily {
        match self {
            Self::Clip4Str(_) => ModelFamily::Clip4Str,
            Self::StrAdapter(_) => ModelFamily::StrAdapter,
        }
    }

    /// The family and its configuration.
    pub fn config(&self) -> ModelConfig {
        match self {
            Self::Clip4Str(m) => ModelConfig::Clip4Str(m.config().clone()),
            Self::StrAdapter(m) => ModelConfig::StrAdapter(m.config().clone()),
        }
    }

    /// Where the weights live: inputs go there.
    pub fn device(&self) -> &Device {
        match self {
            Self::Clip4Str(m) => m.device(),
            Self::StrAdapter(m) => m.device(),
        }
    }

    /// Input size `[height, width]`.
    pub fn input_size(&self) -> [usize; 2] {
        match self {
            Self::Clip4Str(m) => m.config().vision.image_size,
            Self::StrAdapter(m) => m.config().vision.image_size,
        }
    }

    /// The charset the model was tested with (the default output filter).
    pub fn charset_test(&self) -> &str {
        match self {
            Self::Clip4Str(m) => &m.config().charset_test,
            Self::StrAdapter(m) => &m.config().charset_test,
        }
    }

    /// The longest label the model predicts, in characters.
    pub fn max_label_length(&self) -> usize {
        match self {
            Self::Clip4Str(m) => m.config().max_label_length,
            Self::StrAdapter(m) => m.config().max_label_length,
        }
    }

    /// Characters <-> class ids.
    pub fn tokenizer(&self) -> &CharsetTokenizer {
        match self {
            Self::Clip4Str(m) => &m.tokenizer,
            Self::StrAdapter(m) => &m.tokenizer,
        }
    }

    /// The same model computing in `mode` (weights shared with `self`).
    pub fn with_mode(&self, mode: Mode) -> Self {
        match self {
            Self::Clip4Str(m) => Self::Clip4Str(m.with_mode(mode)),
            Self::StrAdapter(m) => Self::StrAdapter(m.with_mode(mode)),
        }
    }

    /// Forward pass over images `[B, 3, H, W]`; `observer` hears each stage end.
    pub fn forward_trace(
        &self,
        images: &Tensor,
        adapter: &CharsetAdapter,
        opts: &ForwardOptions,
        observer: &mut dyn StageObserver,
    ) -> candle_core::Result<Output> {
        match self {
            Self::Clip4Str(m) => m
                .forward_observed(images, adapter, opts, observer)
                .map(Output::from),
            Self::StrAdapter(m) => m.forward_observed(images, opts, observer),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use candle_core::{Device, Tensor};

    use super::*;
    use crate::checkpoint::CheckpointFormat;

    fn raw(names: &[&str]) -> RawCheckpoint {
        RawCheckpoint {
            path: PathBuf::from("x.safetensors"),
            format: CheckpointFormat::Safetensors,
            tensors: names
                .iter()
                .map(|n| {
                    (
                        n.to_string(),
                        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
                    )
                })
                .collect(),
            hyper_parameters: None,
            metadata: HashMap::new(),
            stripped_prefix: None,
            notes: Vec::new(),
        }
    }

    #[test]
    fn families_are_told_apart_by_their_tensor_names() {
        let clip4str = raw(&[
            "clip_model.visual.conv1.weight",
            "visual_decoder.head.weight",
            "cross_decoder.head.weight",
        ]);
        assert_eq!(
            ModelFamily::detect(&clip4str).unwrap(),
            ModelFamily::Clip4Str
        );
        // Key lists of the reference's other families (shared/fixtures/parseq, peft).
        let parseq = raw(&[
            "encoder.patch_embed.proj.weight",
            "decoder.layers.0.linear1.weight",
            "head.weight",
        ]);
        let adapter = raw(&[
            "clip_model.visual.conv1.weight",
            "adapter.fc.0.weight",
            "decoder.norm.weight",
        ]);
        assert_eq!(
            ModelFamily::detect(&adapter).unwrap(),
            ModelFamily::StrAdapter
        );
        let err = ModelFamily::detect(&parseq).unwrap_err().to_string();
        assert!(
            err.contains("PARSeq") && err.contains("x.safetensors"),
            "{err}"
        );
        // Anything else is read as CLIP4STR, whose shape inference then names what is missing.
        let other = raw(&["conv.weight"]);
        assert_eq!(ModelFamily::detect(&other).unwrap(), ModelFamily::Clip4Str);
        let err = identify(&other, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("x.safetensors: tensor clip_model.visual.conv1.weight is missing"),
            "{err}"
        );
        // The configuration error stays an enum for library users.
        assert!(
            matches!(
                &err,
                LoadError::ModelConfig {
                    error: crate::config::ConfigError::MissingTensor { name },
                    ..
                } if name == "clip_model.visual.conv1.weight"
            ),
            "{err:?}"
        );
    }
}
