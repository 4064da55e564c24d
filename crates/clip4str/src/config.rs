//! Model dimensions: presets for the released sizes and inference from tensor shapes.
//!
//! Released CLIP4STR files carry no architecture description, so the primary path is
//! [`Clip4StrConfig::from_tensors`]: every width, depth and vocabulary size is read from the state-dict
//! shapes. Head counts are invisible in shapes; they come from hyper-parameters when present, else from
//! the rule the reference uses for the released sizes (CLIP heads = width / 64, decoder heads = 8).

use serde::{Deserialize, Serialize};

use crate::charset::{CHARSET_36, CHARSET_94};

/// Why a configuration could not be inferred, overridden or accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Shape inference needs a tensor the file lacks.
    #[error("tensor {name} is missing, cannot infer the model size")]
    MissingTensor {
        /// The tensor's state-dict name.
        name: String,
    },
    /// A tensor has fewer dimensions than shape inference reads.
    #[error("tensor {name} has shape {shape:?}, expected at least {needed} dims")]
    TooFewDims {
        /// The tensor's state-dict name.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
        /// How many dimensions are read.
        needed: usize,
    },
    /// An encoder or decoder without blocks.
    #[error("no transformer blocks found (is this a CLIP4STR state dict?)")]
    NoBlocks,
    /// The visual positional table cannot hold a class token and patches.
    #[error(
        "clip_model.visual.positional_embedding has {rows} rows, expected a class token plus patches"
    )]
    NoPatches {
        /// Rows of the table.
        rows: usize,
    },
    /// Without an image size, the patches must form a square grid.
    #[error("{patches} patches do not form a square grid; give the image size in the config")]
    NotSquare {
        /// Number of patches.
        patches: usize,
    },
    /// The classification head and the training charset disagree.
    #[error(
        "visual_decoder.head.weight predicts {classes} classes but the charset has {characters} characters (+1 EOS)"
    )]
    CharsetMismatch {
        /// Classes of the head.
        classes: usize,
        /// Characters of the charset.
        characters: usize,
    },
    /// A head count that shapes cannot show and the released rule cannot give.
    #[error(
        "{part} width {width} is not a multiple of 64, so its head count cannot be inferred \
         (the released sizes use width / 64); give the heads in a config file (--config)"
    )]
    UnknownHeads {
        /// `vision`, `text` or `decoder`.
        part: &'static str,
        /// Its width.
        width: usize,
    },
    /// An STRAdapter's adapter tensors and hyper-parameters do not fit together.
    #[error("STRAdapter: {reason}")]
    Adapter {
        /// What does not fit.
        reason: String,
    },
    /// Heads that do not divide the width.
    #[error("{part}: width {width} is not divisible by {heads} heads")]
    IndivisibleHeads {
        /// `vision`, `text` or `decoder`.
        part: &'static str,
        /// Its width.
        width: usize,
        /// The head count.
        heads: usize,
    },
    /// The decoders read CLIP features, so their width is CLIP's embedding dimension.
    #[error("decoder width {decoder} differs from the CLIP embedding dimension {embed}")]
    DecoderWidth {
        /// Decoder width.
        decoder: usize,
        /// CLIP embedding dimension.
        embed: usize,
    },
    /// The caption context is longer than the text positional table.
    #[error("context length {context} does not fit the text positional table of {rows} rows")]
    ContextLength {
        /// Tokens per caption.
        context: usize,
        /// Rows of the table.
        rows: usize,
    },
    /// The image is not tiled by the patches.
    #[error("image size {height}x{width} is not a multiple of the patch size {ph}x{pw}")]
    PatchMismatch {
        /// Image height.
        height: usize,
        /// Image width.
        width: usize,
        /// Patch height.
        ph: usize,
        /// Patch width.
        pw: usize,
    },
    /// An override key this crate does not read (a typo would otherwise change nothing, silently).
    #[error("config key {key:?} is not known; known keys: {known}")]
    UnknownKey {
        /// The key as written.
        key: String,
        /// The keys that are read, comma-separated.
        known: String,
    },
    /// An override value of the wrong type.
    #[error("config key {key:?} must be {expected}, not {found}")]
    WrongType {
        /// The key, with its section (`derived.vision_heads`).
        key: String,
        /// What the key takes.
        expected: &'static str,
        /// The JSON value found.
        found: String,
    },
}

/// CLIP ViT image encoder dimensions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    /// Transformer width (`conv1` output channels).
    pub width: usize,
    /// Number of residual attention blocks.
    pub layers: usize,
    /// Attention heads; the reference hard-codes `width / 64` (20 for ViT-H/14, SPEC §18.4).
    pub heads: usize,
    /// Patch size `[height, width]` in pixels.
    pub patch_size: [usize; 2],
    /// Input image size `[height, width]` in pixels.
    pub image_size: [usize; 2],
}

impl VisionConfig {
    /// Patch grid `[rows, cols]`.
    pub fn grid(&self) -> [usize; 2] {
        [
            self.image_size[0] / self.patch_size[0],
            self.image_size[1] / self.patch_size[1],
        ]
    }

    /// Tokens returned by the encoder: one per patch plus the class token.
    pub fn num_tokens(&self) -> usize {
        let [gh, gw] = self.grid();
        gh * gw + 1
    }
}

/// CLIP text transformer dimensions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    /// BPE vocabulary size (49408 for every released model).
    pub vocab_size: usize,
    /// Rows of the positional table (77 in the pre-trained CLIP; only `context_length` are used).
    pub positional_rows: usize,
    /// Transformer width.
    pub width: usize,
    /// Number of residual attention blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
}

/// PARSeq two-stream decoder dimensions (shared by the visual and the cross-modal decoder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    /// Model width; equals the CLIP embedding dimension (`use_share_dim`).
    pub dim: usize,
    /// Attention heads (8 in every released config).
    pub heads: usize,
    /// MLP hidden width (`dim * dec_mlp_ratio`).
    pub mlp_hidden: usize,
    /// Number of decoder layers (1 in every released config).
    pub depth: usize,
}

/// Everything needed to build a CLIP4STR model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Clip4StrConfig {
    /// Image encoder.
    pub vision: VisionConfig,
    /// Text encoder.
    pub text: TextConfig,
    /// Joint CLIP embedding dimension (`visual.proj` and `text_projection` output).
    pub embed_dim: usize,
    /// Visual and cross-modal decoders.
    pub decoder: DecoderConfig,
    /// Characters the model was trained on; order defines the class ids.
    pub charset_train: String,
    /// Default characters kept in captions and evaluation (`charset_test`).
    pub charset_test: String,
    /// Longest label; the decoders have `max_label_length + 1` position queries.
    pub max_label_length: usize,
    /// Tokens fed to the text encoder (16 in CLIP4STR).
    pub context_length: usize,
    /// Text blocks below this index are frozen in training (6 of 12 in the release).
    pub text_freeze_nlayer: i64,
    /// ViT blocks below this index are frozen in training (-1: none).
    pub image_freeze_nlayer: i64,
    /// Dropout in the decoders during training.
    pub dropout: f32,
}

/// The reference's head rule for CLIP (`width // 64`); `None` when it cannot apply (width not a multiple of 64).
pub(crate) fn clip_heads(width: usize) -> Option<usize> {
    (width >= 64 && width.is_multiple_of(64)).then_some(width / 64)
}

/// Dimension `i` of the tensor `name` among `(name, shape)` pairs.
pub(crate) fn tensor_dim<'a>(
    shapes: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    name: &str,
    i: usize,
) -> Result<usize, ConfigError> {
    let (_, shape) = shapes
        .into_iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| ConfigError::MissingTensor { name: name.into() })?;
    shape
        .get(i)
        .copied()
        .ok_or_else(|| ConfigError::TooFewDims {
            name: name.into(),
            shape: shape.to_vec(),
            needed: i + 1,
        })
}

/// `1 +` the largest block index `N` among names `{prefix}N.…`; 0 when there is none.
pub(crate) fn count_blocks<'a>(names: impl IntoIterator<Item = &'a str>, prefix: &str) -> usize {
    names
        .into_iter()
        .filter_map(|n| {
            n.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1)
}

/// What CLIP's tensor shapes (`clip_model.*` names) say about its size; head counts are not among them. Shared
/// by checkpoint loading ([`Clip4StrConfig::from_tensors_with`]) and training from CLIP weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClipShapes {
    /// ViT width (`conv1` output channels).
    pub vision_width: usize,
    /// ViT blocks.
    pub vision_layers: usize,
    /// Patch `[height, width]`.
    pub patch_size: [usize; 2],
    /// Rows of the visual positional table (class token + patches).
    pub vision_rows: usize,
    /// Text transformer width.
    pub text_width: usize,
    /// Text transformer blocks.
    pub text_layers: usize,
    /// Output width of both projections.
    pub embed_dim: usize,
    /// BPE vocabulary size.
    pub vocab_size: usize,
    /// Rows of the text positional table.
    pub text_rows: usize,
}

impl ClipShapes {
    /// Reads the shapes from `(name, shape)` pairs; a missing tensor, a tensor with too few dimensions, no
    /// blocks, or a positional table without patches is an error naming it.
    pub(crate) fn read<'a>(
        shapes: impl IntoIterator<Item = (&'a str, &'a [usize])> + Clone,
    ) -> Result<Self, ConfigError> {
        let dim = |name: &str, i: usize| tensor_dim(shapes.clone(), name, i);
        let blocks =
            |prefix: &str| count_blocks(shapes.clone().into_iter().map(|(n, _)| n), prefix);
        let conv = "clip_model.visual.conv1.weight";
        let dims = Self {
            vision_width: dim(conv, 0)?,
            patch_size: [dim(conv, 2)?, dim(conv, 3)?],
            vision_rows: dim("clip_model.visual.positional_embedding", 0)?,
            vision_layers: blocks("clip_model.visual.transformer.resblocks."),
            text_width: dim("clip_model.ln_final.weight", 0)?,
            text_layers: blocks("clip_model.transformer.resblocks."),
            embed_dim: dim("clip_model.text_projection", 1)?,
            vocab_size: dim("clip_model.token_embedding.weight", 0)?,
            text_rows: dim("clip_model.positional_embedding", 0)?,
        };
        if dims.vision_layers == 0 || dims.text_layers == 0 {
            return Err(ConfigError::NoBlocks);
        }
        if dims.vision_rows < 2 {
            return Err(ConfigError::NoPatches {
                rows: dims.vision_rows,
            });
        }
        Ok(dims)
    }

    /// The input size of a square patch grid, the only kind the positional table alone can describe.
    pub(crate) fn square_image_size(&self) -> Result<[usize; 2], ConfigError> {
        let [ph, pw] = self.patch_size;
        square_size(self.vision_rows - 1, ph, pw)
    }
}

impl Clip4StrConfig {
    fn preset(
        vision: (usize, usize, usize, usize),
        text: (usize, usize, usize),
        embed_dim: usize,
    ) -> Self {
        let (vw, vl, vh, patch) = vision;
        let (tw, tl, th) = text;
        Self {
            vision: VisionConfig {
                width: vw,
                layers: vl,
                heads: vh,
                patch_size: [patch, patch],
                image_size: [224, 224],
            },
            text: TextConfig {
                vocab_size: 49408,
                positional_rows: 77,
                width: tw,
                layers: tl,
                heads: th,
            },
            embed_dim,
            decoder: DecoderConfig {
                dim: embed_dim,
                heads: 8,
                mlp_hidden: embed_dim * 4,
                depth: 1,
            },
            charset_train: CHARSET_94.to_string(),
            charset_test: CHARSET_36.to_string(),
            max_label_length: 25,
            context_length: 16,
            text_freeze_nlayer: 6,
            image_freeze_nlayer: -1,
            dropout: 0.1,
        }
    }

    /// CLIP4STR-B (ViT-B/16, 224x224).
    pub fn base16() -> Self {
        Self::preset((768, 12, 12, 16), (512, 12, 8), 512)
    }

    /// CLIP4STR-B/32 (ViT-B/32, 224x224).
    pub fn base32() -> Self {
        Self::preset((768, 12, 12, 32), (512, 12, 8), 512)
    }

    /// CLIP4STR-L (ViT-L/14, 224x224).
    pub fn large14() -> Self {
        Self::preset((1024, 24, 16, 14), (768, 12, 12), 768)
    }

    /// CLIP4STR-H (ViT-H/14 with the reference's 20 heads, 224x224).
    pub fn huge14() -> Self {
        Self::preset((1280, 32, 20, 14), (1024, 24, 16), 1024)
    }

    /// The 64x64 test model of the fixtures (`tiny_config.json`).
    pub fn tiny() -> Self {
        let mut cfg = Self::preset((128, 2, 2, 8), (32, 2, 2), 32);
        cfg.vision.image_size = [64, 64];
        cfg.decoder.heads = 2;
        cfg.text_freeze_nlayer = 1;
        cfg
    }

    /// A small model for training from scratch on CPU: 32x128 input, 4x8 patches, ViT 192 wide / 6 blocks.
    pub fn small() -> Self {
        let mut cfg = Self::preset((192, 6, 3, 4), (128, 4, 2), 192);
        cfg.vision.image_size = [32, 128];
        cfg.vision.patch_size = [4, 8];
        cfg.text_freeze_nlayer = 0;
        cfg
    }

    /// Preset by name (`b16`, `b32`, `l14`, `h14`, `tiny`, `small`).
    pub fn by_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "b16" | "base16" | "base" => Some(Self::base16()),
            "b32" | "base32" => Some(Self::base32()),
            "l14" | "large14" | "large" => Some(Self::large14()),
            "h14" | "huge14" | "huge" => Some(Self::huge14()),
            "tiny" => Some(Self::tiny()),
            "small" => Some(Self::small()),
            _ => None,
        }
    }

    /// Lightning-style `hyper_parameters` so [`Clip4StrConfig::from_tensors`] restores every dimension.
    pub fn hyper_parameters(&self) -> serde_json::Value {
        let cfg = self;
        serde_json::json!({
            "charset_train": cfg.charset_train,
            "charset_test": cfg.charset_test,
            "max_label_length": cfg.max_label_length,
            "context_length": cfg.context_length,
            "img_size": cfg.vision.image_size,
            "patch_size": cfg.vision.patch_size,
            "dec_num_heads": cfg.decoder.heads,
            "dec_depth": cfg.decoder.depth,
            "text_freeze_nlayer": cfg.text_freeze_nlayer,
            "image_freeze_nlayer": cfg.image_freeze_nlayer,
            "dropout": cfg.dropout,
            "clip_arch": {
                "embed_dim": cfg.embed_dim,
                "vision_width": cfg.vision.width,
                "vision_layers": cfg.vision.layers,
                "vision_heads": cfg.vision.heads,
                "vision_patch_size": cfg.vision.patch_size,
                "transformer_width": cfg.text.width,
                "transformer_layers": cfg.text.layers,
                "transformer_heads": cfg.text.heads,
                "vocab_size": cfg.text.vocab_size,
                "context_length": cfg.text.positional_rows,
            },
        })
    }

    /// Number of position queries (`max_label_length + 1`).
    pub fn num_queries(&self) -> usize {
        self.max_label_length + 1
    }

    /// Decoder output classes: EOS + training characters.
    pub fn num_classes(&self) -> usize {
        self.charset_train.chars().count() + 1
    }

    /// Rows of the decoders' token embedding: classes + BOS + PAD.
    pub fn charset_size(&self) -> usize {
        self.num_classes() + 2
    }

    /// Infer every dimension from state-dict names and shapes.
    ///
    /// `hparams` (a Lightning `hyper_parameters` dict) supplies head counts and charsets when present.
    pub fn from_tensors(
        shapes: &[(String, Vec<usize>)],
        hparams: Option<&serde_json::Value>,
    ) -> Result<Self, ConfigError> {
        Self::from_tensors_with(shapes, hparams, None)
    }

    /// Like [`Self::from_tensors`], then applies a user override (see [`Self::apply_override`]) before validating.
    pub fn from_tensors_with(
        shapes: &[(String, Vec<usize>)],
        hparams: Option<&serde_json::Value>,
        config_override: Option<&serde_json::Value>,
    ) -> Result<Self, ConfigError> {
        let pairs = shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice()));
        let dim = |name: &str, i: usize| tensor_dim(pairs.clone(), name, i);
        let clip = ClipShapes::read(pairs.clone())?;
        let (vw, [ph, pw], pos_rows) = (clip.vision_width, clip.patch_size, clip.vision_rows);
        let (vl, tw, tl) = (clip.vision_layers, clip.text_width, clip.text_layers);
        let (embed_dim, vocab, text_pos) = (clip.embed_dim, clip.vocab_size, clip.text_rows);
        let dec_dim = dim("visual_decoder.head.weight", 1)?;
        let num_classes = dim("visual_decoder.head.weight", 0)?;
        let num_queries = dim("visual_decoder.pos_queries", 1)?;
        let mlp_hidden = dim("visual_decoder.layers.0.linear1.weight", 0)?;
        let depth = count_blocks(pairs.clone().map(|(n, _)| n), "visual_decoder.layers.");
        if depth == 0 {
            return Err(ConfigError::NoBlocks);
        }

        let hp = |key: &str| hparams.and_then(|h| h.get(key));
        let hp_usize =
            |v: Option<&serde_json::Value>| v.and_then(|v| v.as_u64()).map(|v| v as usize);

        // Image size: explicit hyper-parameter wins; otherwise a square grid like every released model.
        let patches = pos_rows - 1;
        let image_size = match hp("img_size").and_then(|v| v.as_array()) {
            Some(a) if a.len() == 2 => {
                let h = a[0].as_u64().unwrap_or(0) as usize;
                let w = a[1].as_u64().unwrap_or(0) as usize;
                if ph > 0 && pw > 0 && (h / ph) * (w / pw) == patches {
                    [h, w]
                } else {
                    clip.square_image_size()?
                }
            }
            _ => clip.square_image_size()?,
        };

        let clip_arch = hp("clip_arch");
        let text_heads =
            hp_usize(clip_arch.and_then(|a| a.get("transformer_heads"))).or_else(|| clip_heads(tw));
        let vision_heads =
            hp_usize(clip_arch.and_then(|a| a.get("vision_heads"))).or_else(|| clip_heads(vw));
        let dec_heads = hp_usize(hp("dec_num_heads")).unwrap_or(8);

        let charset_train = hp("charset_train")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| CHARSET_94.to_string());
        if charset_train.chars().count() + 1 != num_classes {
            return Err(ConfigError::CharsetMismatch {
                classes: num_classes,
                characters: charset_train.chars().count(),
            });
        }
        let charset_test = hp("charset_test")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| CHARSET_36.to_string());
        let context_length = hp_usize(hp("context_length")).unwrap_or(16);
        let freeze = |key: &str, default: i64| hp(key).and_then(|v| v.as_i64()).unwrap_or(default);

        let cfg = Self {
            vision: VisionConfig {
                width: vw,
                layers: vl,
                heads: vision_heads.unwrap_or(0),
                patch_size: [ph, pw],
                image_size,
            },
            text: TextConfig {
                vocab_size: vocab,
                positional_rows: text_pos,
                width: tw,
                layers: tl,
                heads: text_heads.unwrap_or(0),
            },
            embed_dim,
            decoder: DecoderConfig {
                dim: dec_dim,
                heads: dec_heads,
                mlp_hidden,
                depth,
            },
            charset_train,
            charset_test,
            max_label_length: num_queries.saturating_sub(1),
            context_length,
            text_freeze_nlayer: freeze("text_freeze_nlayer", 6),
            image_freeze_nlayer: freeze("image_freeze_nlayer", -1),
            dropout: hp("dropout").and_then(|v| v.as_f64()).unwrap_or(0.1) as f32,
        };
        let mut cfg = cfg;
        if let Some(json) = config_override {
            cfg.apply_override_unchecked(json)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check that head counts divide widths and the pieces fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let check_heads = |part: &'static str, width: usize, heads: usize| {
            if heads == 0 {
                Err(ConfigError::UnknownHeads { part, width })
            } else if !width.is_multiple_of(heads) {
                Err(ConfigError::IndivisibleHeads { part, width, heads })
            } else {
                Ok(())
            }
        };
        check_heads("vision", self.vision.width, self.vision.heads)?;
        check_heads("text", self.text.width, self.text.heads)?;
        check_heads("decoder", self.decoder.dim, self.decoder.heads)?;
        if self.decoder.dim != self.embed_dim {
            return Err(ConfigError::DecoderWidth {
                decoder: self.decoder.dim,
                embed: self.embed_dim,
            });
        }
        if self.context_length == 0 || self.context_length > self.text.positional_rows {
            return Err(ConfigError::ContextLength {
                context: self.context_length,
                rows: self.text.positional_rows,
            });
        }
        let [ph, pw] = self.vision.patch_size;
        let [height, width] = self.vision.image_size;
        if ph == 0 || pw == 0 || !height.is_multiple_of(ph) || !width.is_multiple_of(pw) {
            return Err(ConfigError::PatchMismatch {
                height,
                width,
                ph,
                pw,
            });
        }
        Ok(())
    }

    /// Apply a JSON override in the layout of `tiny_config.json` (`hyper_parameters`, `clip_arch`,
    /// `derived`) or a flat object with the keys [`OVERRIDE_KEYS`] names. An unknown top-level key, or a key
    /// that is read but holds the wrong type, is an error naming it. Inside the three sections other keys are
    /// the reference's own records and are passed over.
    pub fn apply_override(&mut self, json: &serde_json::Value) -> Result<(), ConfigError> {
        self.apply_override_unchecked(json)?;
        self.validate()
    }

    fn apply_override_unchecked(&mut self, json: &serde_json::Value) -> Result<(), ConfigError> {
        let Some(top) = json.as_object() else {
            return Err(ConfigError::WrongType {
                key: "(the whole file)".into(),
                expected: "a JSON object",
                found: json.to_string(),
            });
        };
        for key in top.keys() {
            let known = OVERRIDE_KEYS.contains(&key.as_str())
                || OVERRIDE_SECTIONS.contains(&key.as_str())
                || OVERRIDE_RECORDS.contains(&key.as_str())
                || key.starts_with("note");
            if !known {
                return Err(ConfigError::UnknownKey {
                    key: key.clone(),
                    known: [OVERRIDE_SECTIONS.as_slice(), OVERRIDE_KEYS.as_slice()]
                        .concat()
                        .join(", "),
                });
            }
        }
        // The first of `keys` found, sections first, with its full name for messages.
        let get = |keys: &[&str]| -> Option<(String, &serde_json::Value)> {
            for section in OVERRIDE_SECTIONS {
                if let Some(sec) = json.get(section) {
                    for k in keys {
                        if let Some(v) = sec.get(*k) {
                            return Some((format!("{section}.{k}"), v));
                        }
                    }
                }
            }
            keys.iter()
                .find_map(|k| json.get(*k).map(|v| (k.to_string(), v)))
        };
        let wrong = |key: String, expected: &'static str, value: &serde_json::Value| {
            ConfigError::WrongType {
                key,
                expected,
                found: value.to_string(),
            }
        };
        const COUNT: &str = "a non-negative integer";
        let as_usize = |v: &serde_json::Value| v.as_u64().map(|v| v as usize);
        let set = |target: &mut usize, keys: &[&str]| -> Result<(), ConfigError> {
            if let Some((key, v)) = get(keys) {
                *target = as_usize(v).ok_or_else(|| wrong(key, COUNT, v))?;
            }
            Ok(())
        };
        set(&mut self.vision.heads, &["vision_heads"])?;
        set(&mut self.vision.width, &["vision_width"])?;
        set(&mut self.vision.layers, &["vision_layers"])?;
        set(&mut self.text.heads, &["text_heads", "transformer_heads"])?;
        set(&mut self.text.width, &["text_width", "transformer_width"])?;
        set(
            &mut self.text.layers,
            &["text_layers", "transformer_layers"],
        )?;
        set(&mut self.decoder.heads, &["decoder_heads", "dec_num_heads"])?;
        set(&mut self.decoder.depth, &["decoder_layers", "dec_depth"])?;
        set(&mut self.embed_dim, &["embed_dim"])?;
        set(&mut self.max_label_length, &["max_label_length"])?;
        set(
            &mut self.context_length,
            &["context_length_used", "text_context_length_used"],
        )?;
        if let Some((key, v)) = get(&["image_size", "img_size"]) {
            const PAIR: &str = "[height, width]";
            let Some([h, w]) = v
                .as_array()
                .map(Vec::as_slice)
                .and_then(|a| <&[_; 2]>::try_from(a).ok())
            else {
                return Err(wrong(key, PAIR, v));
            };
            let (Some(h), Some(w)) = (as_usize(h), as_usize(w)) else {
                return Err(wrong(key, PAIR, v));
            };
            self.vision.image_size = [h, w];
        }
        for (target, name) in [
            (&mut self.charset_train, "charset_train"),
            (&mut self.charset_test, "charset_test"),
        ] {
            if let Some((key, v)) = get(&[name]) {
                *target = v
                    .as_str()
                    .ok_or_else(|| wrong(key, "a string", v))?
                    .to_string();
            }
        }
        if let Some((key, v)) = get(&["text_freeze_nlayer"]) {
            self.text_freeze_nlayer = v.as_i64().ok_or_else(|| wrong(key, "an integer", v))?;
        }
        Ok(())
    }
}

/// Keys an override sets, flat or inside a section.
pub const OVERRIDE_KEYS: [&str; 22] = [
    "vision_heads",
    "vision_width",
    "vision_layers",
    "text_heads",
    "transformer_heads",
    "text_width",
    "transformer_width",
    "text_layers",
    "transformer_layers",
    "decoder_heads",
    "dec_num_heads",
    "decoder_layers",
    "dec_depth",
    "embed_dim",
    "max_label_length",
    "context_length_used",
    "text_context_length_used",
    "image_size",
    "img_size",
    "charset_train",
    "charset_test",
    "text_freeze_nlayer",
];

/// The sections of `tiny_config.json` an override reads, in the order they are searched.
const OVERRIDE_SECTIONS: [&str; 3] = ["derived", "clip_arch", "hyper_parameters"];

/// The other top-level records of `tiny_config.json`, kept there for people and passed over.
const OVERRIDE_RECORDS: [&str; 6] = [
    "description",
    "init",
    "preprocessing",
    "files",
    "num_tensors",
    "num_params",
];

fn square_size(patches: usize, ph: usize, pw: usize) -> Result<[usize; 2], ConfigError> {
    let g = (patches as f64).sqrt().round() as usize;
    if g * g != patches {
        return Err(ConfigError::NotSquare { patches });
    }
    Ok([g * ph, g * pw])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate() {
        for cfg in [
            Clip4StrConfig::base16(),
            Clip4StrConfig::base32(),
            Clip4StrConfig::large14(),
            Clip4StrConfig::huge14(),
            Clip4StrConfig::tiny(),
        ] {
            cfg.validate().expect("preset must be valid");
        }
        assert_eq!(Clip4StrConfig::base16().vision.num_tokens(), 197);
        assert_eq!(Clip4StrConfig::huge14().vision.heads, 20);
    }

    #[test]
    fn missing_tensor_is_an_error() {
        let err = Clip4StrConfig::from_tensors(&[], None).unwrap_err();
        assert_eq!(
            err,
            ConfigError::MissingTensor {
                name: "clip_model.visual.conv1.weight".into()
            }
        );
    }

    #[test]
    fn overrides_name_unknown_keys_and_wrong_types() {
        let mut cfg = Clip4StrConfig::tiny();
        let typo = serde_json::json!({ "vision_head": 2 });
        match cfg.apply_override(&typo) {
            Err(ConfigError::UnknownKey { key, known }) => {
                assert_eq!(key, "vision_head");
                assert!(known.contains("vision_heads"), "{known}");
            }
            other => panic!("a misspelt key was taken: {other:?}"),
        }
        let text = serde_json::json!({ "derived": { "vision_heads": "2" } });
        let err = cfg.apply_override(&text).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"config key "derived.vision_heads" must be a non-negative integer, not "2""#
        );
        let size = serde_json::json!({ "image_size": [64] });
        assert!(matches!(
            cfg.apply_override(&size),
            Err(ConfigError::WrongType { key, .. }) if key == "image_size"
        ));
        // The sections' own records (the reference's hyper-parameters) are passed over; read keys still apply.
        let layout = serde_json::json!({
            "description": "tiny",
            "note_heads": "read heads from this file",
            "hyper_parameters": { "lr": 1e-4, "dec_num_heads": 2 },
        });
        cfg.apply_override(&layout)
            .expect("tiny_config.json layout");
        assert_eq!(cfg.decoder.heads, 2);
    }
}
