//! CLIP4STR scene-text recognition on candle.
//!
//! The crate mirrors the paper's figure: a CLIP ViT image encoder ([`clip::vision`]), a PARSeq
//! two-stream visual decoder ([`decoder`]), the CLIP text encoder over the visual prediction
//! ([`clip::text`]) and a cross-modal decoder over `[image tokens ; text tokens]` ([`model`]).
//! Which network a checkpoint holds is decided in one place, [`family`]. The crate does no network access
//! and prints nothing.
//!
//! # Reading a word
//!
//! Load a checkpoint once (any released `.ckpt` or `.pt`, or our safetensors; its size comes from the tensor
//! shapes), then read decoded images:
//!
//! ```
//! use std::path::Path;
//!
//! use clip4str::{decode_rgb, Recognizer, RecognizerOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = Path::new("../../models/default/clip4str-small.safetensors");
//! let recognizer = Recognizer::from_checkpoint(model, None, RecognizerOptions::default())?;
//! let image = decode_rgb(&std::fs::read("../../examples/images/word01.png")?)?;
//! let predictions = recognizer.recognize(&[image])?;
//! println!("{}\t{:.4}", predictions[0].text, predictions[0].confidence);
//! assert_eq!(predictions[0].text, "Vision");
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//!
//! `train` (on by default) adds the trainer ([`train`]), its data loader and augmentation, and the synthetic
//! word renderer ([`data::synth`]). A program that only reads images builds with `default-features = false`
//! and compiles none of their crates (random numbers, fonts, TOML).

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
pub mod decoding;
pub mod eval;
pub mod family;
pub mod model;
pub mod nn;
pub mod preprocess;
pub mod recognizer;
pub mod str_adapter;
#[cfg(feature = "train")]
pub mod train;

pub use charset::{CharsetAdapter, CharsetError, CharsetTokenizer};
pub use checkpoint::{read_checkpoint, CheckpointFormat, LoadError, RawCheckpoint};
pub use config::{Clip4StrConfig, ConfigError, DecoderConfig, TextConfig, VisionConfig};
pub use data::{open_dataset, DataError, Dataset};
pub use family::{identify, Model, ModelConfig, ModelFamily};
pub use model::{Clip4Str, ForwardOptions, Output, Stage, StageObserver, Trace};
pub use nn::{Mode, Precision};
pub use preprocess::{decode_rgb, ImageError, Normalization};
pub use recognizer::{Prediction, Recognizer, RecognizerError, RecognizerOptions};
#[cfg(feature = "train")]
pub use train::{TrainConfig, TrainError, Trainer};

#[cfg(test)]
mod error_tests {
    use std::error::Error;
    use std::path::PathBuf;

    use crate::{checkpoint::LoadError, data::DataError, preprocess::ImageError, RecognizerError};

    /// Each error prints its cause or returns it from `source()`, never both: a printed chain (`{:#}`) then
    /// names every cause once without the CLI having to de-duplicate.
    fn assert_cause_once(e: &(dyn Error + 'static)) {
        let shown = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            assert!(
                !shown.contains(&c.to_string()),
                "{shown:?} prints its cause {:?} and returns it from source()",
                c.to_string()
            );
            cause = c.source();
        }
    }

    fn io() -> std::io::Error {
        std::io::Error::other("disk on fire")
    }

    fn candle() -> candle_core::Error {
        candle_core::Error::Msg("shape mismatch in matmul".into())
    }

    #[test]
    fn no_error_prints_its_source_and_returns_it() {
        let path = PathBuf::from("m.ckpt");
        let image = || ImageError::InvalidSize {
            width: 0,
            height: 0,
        };
        let errors: Vec<Box<dyn Error>> = vec![
            Box::new(LoadError::Io {
                path: path.clone(),
                error: io(),
            }),
            Box::new(LoadError::Write {
                path: path.clone(),
                error: io(),
            }),
            Box::new(LoadError::Tensor {
                path: path.clone(),
                error: candle(),
            }),
            Box::new(DataError::Io {
                path: path.clone(),
                error: io(),
            }),
            Box::new(DataError::Lmdb {
                path: path.clone(),
                error: heed::Error::Io(io()),
            }),
            Box::new(DataError::Image {
                key: "image-000000001".into(),
                error: image(),
            }),
            Box::new(RecognizerError::from(candle())),
            Box::new(RecognizerError::from(LoadError::Io {
                path: path.clone(),
                error: io(),
            })),
        ];
        #[cfg(feature = "train")]
        let errors = {
            use crate::data::synth::SynthError;
            use crate::train::{init::InitError, TrainError};
            let mut errors = errors;
            errors.push(Box::new(SynthError::Io {
                path: path.clone(),
                error: io(),
            }));
            errors.push(Box::new(SynthError::from(image())));
            errors.push(Box::new(InitError::from(candle())));
            errors.push(Box::new(TrainError::from(InitError::from(candle()))));
            errors.push(Box::new(TrainError::from(DataError::Io {
                path: path.clone(),
                error: io(),
            })));
            errors
        };
        for e in &errors {
            assert_cause_once(e.as_ref());
        }
    }
}
