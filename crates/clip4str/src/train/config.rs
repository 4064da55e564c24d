//! The training run's settings, as `config.toml` holds them: model size, starting weights, data, optimizer and
//! run options. Unknown keys and wrong types are refused (serde's `deny_unknown_fields`), naming the key.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::TrainError;
use crate::config::Clip4StrConfig;

/// Model size: a preset plus optional overrides (all dims explicit for a from-scratch model).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// `tiny`, `small`, `b16`, `b32`, `l14`, `h14`; ignored when initialising from a CLIP4STR checkpoint.
    pub preset: Option<String>,
    /// Input `[height, width]`.
    pub image_size: Option<[usize; 2]>,
    /// Patch `[height, width]`.
    pub patch_size: Option<[usize; 2]>,
    /// ViT width.
    pub vision_width: Option<usize>,
    /// ViT blocks.
    pub vision_layers: Option<usize>,
    /// ViT heads.
    pub vision_heads: Option<usize>,
    /// Text transformer width.
    pub text_width: Option<usize>,
    /// Text blocks.
    pub text_layers: Option<usize>,
    /// Text heads.
    pub text_heads: Option<usize>,
    /// CLIP embedding = decoder width.
    pub embed_dim: Option<usize>,
    /// Decoder heads.
    pub decoder_heads: Option<usize>,
    /// Training charset (default: the 94 printable ASCII characters).
    pub charset_train: Option<String>,
    /// Caption / evaluation charset (default: lowercase alphanumerics).
    pub charset_test: Option<String>,
    /// Frozen text blocks.
    pub text_freeze_nlayer: Option<i64>,
    /// Frozen ViT blocks.
    pub image_freeze_nlayer: Option<i64>,
    /// Decoder dropout.
    pub dropout: Option<f32>,
}

impl ModelSpec {
    /// Resolves the preset and overrides into a validated config.
    pub fn resolve(&self) -> Result<Clip4StrConfig, TrainError> {
        let name = self.preset.as_deref().unwrap_or("small");
        let mut cfg = Clip4StrConfig::by_name(name)
            .ok_or_else(|| TrainError::Config(format!("unknown model preset {name:?}")))?;
        self.apply(&mut cfg);
        cfg.validate()
            .map_err(|e| TrainError::Config(e.to_string()))?;
        Ok(cfg)
    }

    fn apply(&self, cfg: &mut Clip4StrConfig) {
        fn set<T: Clone>(dst: &mut T, src: &Option<T>) {
            if let Some(v) = src {
                *dst = v.clone();
            }
        }
        set(&mut cfg.vision.image_size, &self.image_size);
        set(&mut cfg.vision.patch_size, &self.patch_size);
        set(&mut cfg.vision.width, &self.vision_width);
        set(&mut cfg.vision.layers, &self.vision_layers);
        set(&mut cfg.vision.heads, &self.vision_heads);
        set(&mut cfg.text.width, &self.text_width);
        set(&mut cfg.text.layers, &self.text_layers);
        set(&mut cfg.text.heads, &self.text_heads);
        if let Some(e) = self.embed_dim {
            cfg.embed_dim = e;
            cfg.decoder.dim = e;
            cfg.decoder.mlp_hidden = 4 * e;
        }
        set(&mut cfg.decoder.heads, &self.decoder_heads);
        set(&mut cfg.charset_train, &self.charset_train);
        set(&mut cfg.charset_test, &self.charset_test);
        set(&mut cfg.text_freeze_nlayer, &self.text_freeze_nlayer);
        set(&mut cfg.image_freeze_nlayer, &self.image_freeze_nlayer);
        set(&mut cfg.dropout, &self.dropout);
    }
}

/// Where the starting weights come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "lowercase", deny_unknown_fields)]
pub enum InitSpec {
    /// Reference random initialisation.
    Scratch {
        /// The image encoder's positional embedding at the start.
        #[serde(default)]
        positional: PositionalInit,
    },
    /// Fine-tune a CLIP4STR checkpoint (its dims win over `[model]`).
    Clip4str {
        /// Checkpoint file.
        path: PathBuf,
    },
    /// CLIP weights (OpenAI TorchScript `.pt` or OpenCLIP `.bin`) with random decoders.
    Clip {
        /// CLIP file.
        path: PathBuf,
    },
}

impl Default for InitSpec {
    fn default() -> Self {
        Self::Scratch {
            positional: PositionalInit::default(),
        }
    }
}

/// How a from-scratch run starts the image encoder's positional embedding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PositionalInit {
    /// The reference's `width^-0.5 * randn`.
    #[default]
    Random,
    /// A 2-D sine-cosine table ([`sincos_positional`]): positions are distinguishable from step 0.
    Sincos,
}

/// Datasets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Training roots (every LMDB / labels.tsv dataset below each is used).
    pub train: Vec<PathBuf>,
    /// Times each `train` root is repeated per epoch, one entry per root (default: all 1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repeat: Vec<usize>,
    /// Validation datasets.
    #[serde(default)]
    pub val: Vec<PathBuf>,
    /// RandAugment on training images.
    #[serde(default = "yes")]
    pub augment: bool,
    /// Decoding threads (0: all cores).
    #[serde(default)]
    pub workers: usize,
}

fn yes() -> bool {
    true
}

/// Optimisation settings (SPEC §12.6-12.8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSpec {
    /// Images per step.
    pub batch_size: usize,
    /// Base learning rate before the linear scaling rule (`batch * accumulate / 512 * lr`).
    pub lr: f64,
    /// Optimizer steps (takes precedence over `epochs`).
    pub max_steps: Option<usize>,
    /// Epochs, used when `max_steps` is absent.
    pub epochs: Option<usize>,
    /// One-cycle warm-up fraction.
    pub warmup_pct: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Decoder learning-rate factor.
    pub coef_lr: f64,
    /// Decoder weight-decay factor.
    pub coef_wd: f64,
    /// Gradient-norm clipping.
    pub grad_clip: f64,
    /// Gradient accumulation (micro-batches per step).
    pub accumulate: usize,
    /// Permutations per batch.
    pub perm_num: usize,
    /// Weight of an auxiliary CTC loss on the image tokens (0: off, the reference recipe). Speeds up
    /// training from scratch; the head is kept in the optimizer state file, never in exported weights.
    pub ctc_weight: f64,
}

impl Default for OptimSpec {
    fn default() -> Self {
        Self {
            batch_size: 64,
            lr: 8.4e-5,
            max_steps: None,
            epochs: Some(20),
            warmup_pct: 0.075,
            weight_decay: 0.2,
            coef_lr: 19.0,
            coef_wd: 1.0,
            grad_clip: 20.0,
            accumulate: 1,
            perm_num: 6,
            ctc_weight: 0.0,
        }
    }
}

/// Run bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSpec {
    /// Output directory.
    pub output_dir: PathBuf,
    /// Validate (and save) every this many steps.
    pub val_interval: usize,
    /// Validate on at most this many samples per dataset.
    pub val_limit: Option<usize>,
    /// Log a metrics line every this many steps.
    pub log_interval: usize,
    /// Seed for initialisation, shuffling, augmentation, permutations and dropout.
    pub seed: u64,
    /// Also save `last` (and a `step-<N>` snapshot) every this many steps, between validations: a crash then
    /// loses at most this many. 0: only at validations and on Ctrl-C.
    pub save_interval: usize,
    /// Also save every this many minutes of training (0: never by time), whichever of the two comes first.
    pub save_minutes: f64,
    /// `step-<N>` snapshots kept (the oldest are deleted), each resumable with its optimizer state.
    pub keep_last: usize,
    /// Arithmetic of the linear layers' products, forward and backward.
    pub precision: TrainPrecision,
}

/// How a run multiplies in its linear layers; the weights, optimizer state and everything else stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainPrecision {
    /// bf16 where the CPU has AVX512-BF16 (about twice the multiply rate of f32 there), f32 elsewhere.
    #[default]
    Auto,
    /// f32 everywhere: what the parity tests check against the reference.
    F32,
    /// bf16 products with f32 accumulation and f32 master weights; f32 (with a note from the CLI) on CPUs
    /// without AVX512-BF16, where bf16 could only be emulated, slower than f32.
    Bf16,
}

impl Default for RunSpec {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("runs/clip4str"),
            val_interval: 500,
            val_limit: None,
            log_interval: 10,
            seed: 42,
            save_interval: 0,
            save_minutes: 10.0,
            keep_last: 2,
            precision: TrainPrecision::Auto,
        }
    }
}

/// Everything `clip4str train --config FILE.toml` reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Model size.
    #[serde(default)]
    pub model: ModelSpec,
    /// Starting weights.
    #[serde(default)]
    pub init: InitSpec,
    /// Datasets.
    pub data: DataSpec,
    /// Optimisation.
    #[serde(default)]
    pub optim: OptimSpec,
    /// Bookkeeping.
    #[serde(default)]
    pub run: RunSpec,
}

impl TrainConfig {
    /// Parses TOML.
    pub fn from_toml(text: &str) -> Result<Self, TrainError> {
        toml::from_str(text).map_err(|e| TrainError::Config(e.to_string()))
    }

    /// Serialises to TOML (what `config.toml` in the output directory holds).
    pub fn to_toml(&self) -> Result<String, TrainError> {
        toml::to_string_pretty(self).map_err(|e| TrainError::Config(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_by_name() {
        let good = "[data]\ntrain = [\"data/train\"]\n[optim]\nlr = 1e-4\n";
        assert_eq!(TrainConfig::from_toml(good).unwrap().optim.lr, 1e-4);
        let typo = "[data]\ntrain = [\"data/train\"]\n[optim]\nlearning_rate = 1e-4\n";
        let err = TrainConfig::from_toml(typo).unwrap_err().to_string();
        assert!(err.contains("learning_rate"), "{err}");
        let text = "[data]\ntrain = [\"data/train\"]\n[optim]\nlr = \"fast\"\n";
        let err = TrainConfig::from_toml(text).unwrap_err().to_string();
        assert!(err.contains("lr") && err.contains("fast"), "{err}");
    }
}
