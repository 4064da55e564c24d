//! The high-level API: load a checkpoint once, then read word crops.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use crate::charset::CharsetAdapter;
use crate::checkpoint::{read_checkpoint, LoadError, RawCheckpoint};
use crate::decoding::decode_logits;
use crate::family::{identify, Model};
use crate::model::{ForwardOptions, Output, StageObserver};
use crate::nn::Mode;
pub use crate::nn::Precision;
use crate::preprocess::{resize_bicubic, to_chw, Normalization};

/// Everything that can go wrong between a file on disk and a prediction.
#[derive(Debug, thiserror::Error)]
pub enum RecognizerError {
    /// The checkpoint could not be read or does not fit the model.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The model failed while running (shape or device problem).
    #[error("model error: {0}")]
    Model(candle_core::Error),
    /// Options that contradict each other or the checkpoint.
    #[error("invalid options: {0}")]
    Options(String),
}

// By hand rather than `#[from]`, which would also return the cause from `source()` while the message prints it.
impl From<candle_core::Error> for RecognizerError {
    fn from(error: candle_core::Error) -> Self {
        Self::Model(error)
    }
}

/// Knobs of the recognizer; `Default` reproduces the reference `read.py`.
#[derive(Debug, Clone)]
pub struct RecognizerOptions {
    /// Characters kept in the captions fed to the text encoder; `None` uses the checkpoint's `charset_test`.
    pub charset_test: Option<String>,
    /// Also filter the returned text through `charset_test` (what `test.py` scores).
    pub filter_output: bool,
    /// Images per model batch. The reference's batch-wide early stop makes results batch-dependent.
    pub batch_size: usize,
    /// Refinement passes (1 in the release).
    pub refine_iters: usize,
    /// Validation-mode decoding length (`None`: testing mode with early stop).
    pub max_length: Option<usize>,
    /// Normalisation of the input; `None`: the one recorded in the checkpoint by our trainer, else 0.5/0.5
    /// (the reference's test-time normalisation).
    pub normalization: Option<Normalization>,
    /// Decode each image as if alone (results independent of the batch, bit for bit on the CPU; see
    /// `ForwardOptions`).
    pub per_sample_stop: bool,
    /// Arithmetic of the linear layers (f32 by default).
    pub precision: Precision,
    /// Where [`Recognizer::from_checkpoint`] and [`Recognizer::from_raw`] put the weights and run the model
    /// (CPU by default; a CUDA device needs the `cuda` build). [`Recognizer::from_model`] runs where the
    /// model's weights are instead.
    pub device: Device,
}

impl Default for RecognizerOptions {
    fn default() -> Self {
        Self {
            charset_test: None,
            filter_output: false,
            batch_size: 1,
            refine_iters: 1,
            max_length: None,
            normalization: None,
            per_sample_stop: false,
            precision: Precision::F32,
            device: Device::Cpu,
        }
    }
}

/// What the recognizer says about one image.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Prediction {
    /// The recognised text.
    pub text: String,
    /// The unfiltered prediction over the training charset (what `read.py` prints).
    pub raw: String,
    /// Product of `char_probs` (EOS included when predicted).
    pub confidence: f32,
    /// Max probability of each kept position, EOS last when present.
    pub char_probs: Vec<f32>,
}

/// A loaded model (of any [`crate::family::ModelFamily`]) ready to read images.
#[derive(Debug, Clone)]
pub struct Recognizer {
    model: Model,
    adapter: CharsetAdapter,
    opts: RecognizerOptions,
    device: Device,
}

impl Recognizer {
    /// Loads any supported checkpoint; `config_override` is a `tiny_config.json`-style JSON for files whose head
    /// counts do not follow the released sizes' rule.
    pub fn from_checkpoint(
        path: &Path,
        config_override: Option<&serde_json::Value>,
        opts: RecognizerOptions,
    ) -> Result<Self, RecognizerError> {
        let raw = read_checkpoint(path)?;
        Self::from_raw(&raw, config_override, opts)
    }

    /// Builds the model from an already-read checkpoint.
    pub fn from_raw(
        raw: &RawCheckpoint,
        config_override: Option<&serde_json::Value>,
        opts: RecognizerOptions,
    ) -> Result<Self, RecognizerError> {
        let identified = identify(raw, config_override)?;
        let mut opts = opts;
        if opts.normalization.is_none() {
            if let Some(text) = raw.metadata.get(Normalization::METADATA_KEY) {
                let norm = serde_json::from_str(text).map_err(|e| {
                    RecognizerError::Options(format!(
                        "{}: metadata `{}` is not a normalisation: {e}",
                        raw.path.display(),
                        Normalization::METADATA_KEY
                    ))
                })?;
                opts.normalization = Some(norm);
            }
        }
        let model = Model::build(&identified, raw, &opts.device)?;
        Self::from_model(model, opts)
    }

    /// Wraps a model built elsewhere (e.g. during training); it computes in `opts.precision` from now on (its
    /// weights stay shared with the caller's copy).
    pub fn from_model(
        model: impl Into<Model>,
        opts: RecognizerOptions,
    ) -> Result<Self, RecognizerError> {
        let model = model.into().with_mode(Mode {
            precision: opts.precision,
            ..Mode::default()
        });
        if opts.batch_size == 0 {
            return Err(RecognizerError::Options(
                "batch size must be at least 1".into(),
            ));
        }
        let charset = opts
            .charset_test
            .clone()
            .unwrap_or_else(|| model.charset_test().to_string());
        if charset.is_empty() {
            return Err(RecognizerError::Options("the test charset is empty".into()));
        }
        Ok(Self {
            adapter: CharsetAdapter::new(&charset),
            device: model.device().clone(),
            model,
            opts,
        })
    }

    /// The options this recognizer runs with.
    pub fn options(&self) -> &RecognizerOptions {
        &self.opts
    }

    /// The input normalisation in use.
    pub fn normalization(&self) -> Normalization {
        self.opts.normalization.unwrap_or(Normalization::TEST)
    }

    /// The underlying network.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Input size `[height, width]`.
    pub fn input_size(&self) -> [usize; 2] {
        self.model.input_size()
    }

    /// The longest label the model predicts, in characters.
    pub fn max_label_length(&self) -> usize {
        self.model.max_label_length()
    }

    /// The test transform: Pillow-exact bicubic resize to the input size, then normalisation; `[3, H, W]`.
    pub fn preprocess(&self, image: &RgbImage) -> Vec<f32> {
        let [h, w] = self.input_size();
        to_chw(
            &resize_bicubic(image, w as u32, h as u32),
            &self.normalization(),
        )
    }

    /// Stacks preprocessed images into `[B, 3, H, W]`.
    pub fn batch_tensor(&self, inputs: &[Vec<f32>]) -> Result<Tensor, RecognizerError> {
        let [h, w] = self.input_size();
        let flat: Vec<f32> = inputs.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(
            flat,
            (inputs.len(), 3, h, w),
            &self.device,
        )?)
    }

    /// Full forward of an input batch `[B, 3, H, W]`: image tokens, AR logits, output logits.
    pub fn trace(&self, batch: &Tensor) -> Result<Output, RecognizerError> {
        self.trace_observed(batch, &mut ())
    }

    /// [`Self::trace`], telling `observer` as each stage ends (e.g. to time the stages).
    pub fn trace_observed(
        &self,
        batch: &Tensor,
        observer: &mut dyn StageObserver,
    ) -> Result<Output, RecognizerError> {
        let opts = ForwardOptions {
            max_length: self.opts.max_length,
            refine_iters: self.opts.refine_iters,
            per_sample_stop: self.opts.per_sample_stop,
        };
        Ok(self
            .model
            .forward_trace(batch, &self.adapter, &opts, observer)?)
    }

    /// Reads one model batch `[B, 3, H, W]`.
    pub fn recognize_batch(&self, batch: &Tensor) -> Result<Vec<Prediction>, RecognizerError> {
        let trace = self.trace(batch)?;
        self.decode(&trace.final_logits)
    }

    /// Turns logits `[B, T, C]` into predictions like `tokenizer.decode` (+ the adapter with `filter_output`).
    pub fn decode(&self, logits: &Tensor) -> Result<Vec<Prediction>, RecognizerError> {
        Ok(decode_logits(self.model.tokenizer(), logits)?
            .into_iter()
            .map(|decoded| {
                let text = if self.opts.filter_output {
                    self.adapter.apply(&decoded.text)
                } else {
                    decoded.text.clone()
                };
                Prediction {
                    text,
                    confidence: decoded.confidence(),
                    raw: decoded.text,
                    char_probs: decoded.char_probs,
                }
            })
            .collect())
    }

    /// Reads decoded images, `batch_size` at a time, preprocessing on the rayon pool.
    pub fn recognize(&self, images: &[RgbImage]) -> Result<Vec<Prediction>, RecognizerError> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(self.opts.batch_size) {
            let inputs: Vec<Vec<f32>> = chunk.par_iter().map(|im| self.preprocess(im)).collect();
            out.extend(self.recognize_batch(&self.batch_tensor(&inputs)?)?);
        }
        Ok(out)
    }
}
