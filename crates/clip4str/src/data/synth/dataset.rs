//! A synthetic dataset rendered on the fly: a small `.toml` spec stands where an LMDB would, and record `i`
//! is rendered when it is read. Training then needs no pre-rendered set on disk (a million crops are ~3 GB
//! as an LMDB), and a machine with many cores renders as fast as it trains. Record `i` equals image `i` of
//! `clip4str synth` run with the same settings, so an LMDB can stand in for a spec and the other way round.
//!
//! ```toml
//! count = 1000000        # records
//! seed = 11
//! fonts = ["fonts"]      # files or folders, relative to this file (default: the system font folders)
//! font_split = "train"   # all | train | heldout
//! words = "words.txt"    # one word per line (default: /usr/share/dict/words if present, else built in)
//! size = [32, 128]       # fixed output size, height and width (default: the natural crop size)
//! height = [32, 64]      # natural crop heights
//! max_length = 25
//! format = "jpeg"        # png | jpeg: how records are encoded (JPEG adds its own artefacts)
//! ```

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Deserialize;

use super::{find_sources, FontSplit, OutputFormat, SynthConfig, Synthesizer, MAX_LABEL_LENGTH};
use crate::data::{DataError, Dataset};

/// The settings of an on-the-fly synthetic dataset, as written in its `.toml` spec.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthSpec {
    /// Number of records.
    pub count: usize,
    /// Dataset seed: record `i` depends on `(seed, i)`, the fonts and the words.
    #[serde(default)]
    pub seed: u64,
    /// Font files or folders; relative paths are relative to the spec. Empty: the system font folders.
    #[serde(default)]
    pub fonts: Vec<PathBuf>,
    /// `all`, `train` or `heldout`.
    #[serde(default)]
    pub font_split: FontSplit,
    /// Word list; relative to the spec. `None`: the system dictionary if present, else a built-in list.
    #[serde(default)]
    pub words: Option<PathBuf>,
    /// Fixed `[height, width]`; `None`: the natural crop size.
    #[serde(default)]
    pub size: Option<[u32; 2]>,
    /// Natural crop height range in pixels.
    #[serde(default = "default_height")]
    pub height: [u32; 2],
    /// Longest label (1..=25).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// `png` or `jpeg`.
    #[serde(default)]
    pub format: OutputFormat,
    /// Share of long labels (see [`SynthConfig::long_share`]); 0 by default.
    #[serde(default)]
    pub long_share: f32,
}

fn default_height() -> [u32; 2] {
    [32, 64]
}

fn default_max_length() -> usize {
    MAX_LABEL_LENGTH
}

/// An on-the-fly synthetic dataset (see the module docs).
pub struct SynthDataset {
    name: String,
    path: PathBuf,
    count: usize,
    format: OutputFormat,
    synth: Synthesizer,
}

impl std::fmt::Debug for SynthDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SynthDataset")
            .field("path", &self.path)
            .field("count", &self.count)
            .field("synth", &self.synth)
            .finish()
    }
}

impl SynthDataset {
    /// Reads the spec at `path` and loads its fonts and words.
    pub fn open(path: &Path, name: &str) -> Result<Self, DataError> {
        let bad = |reason: String| DataError::BadSynthSpec {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(DataError::io(path))?;
        let spec: SynthSpec = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let relative = |p: &PathBuf| {
            if p.is_absolute() {
                p.clone()
            } else {
                base.join(p)
            }
        };
        if spec.count == 0 {
            return Err(bad("count must be at least 1".into()));
        }
        if !(1..=MAX_LABEL_LENGTH).contains(&spec.max_length) {
            return Err(bad(format!(
                "max_length {} is not from 1 to {MAX_LABEL_LENGTH}",
                spec.max_length
            )));
        }
        let fonts: Vec<PathBuf> = spec.fonts.iter().map(relative).collect();
        let sources = find_sources(
            &fonts,
            spec.words.as_ref().map(relative).as_deref(),
            spec.max_length,
        )
        .map_err(|e| bad(e.to_string()))?;
        let synth = Synthesizer::new(SynthConfig {
            seed: spec.seed,
            fonts: sources.fonts,
            font_split: spec.font_split,
            words: sources.words,
            size: spec.size,
            height: spec.height,
            max_label_length: spec.max_length,
            long_share: spec.long_share,
        })
        .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            name: name.to_owned(),
            path: path.to_owned(),
            count: spec.count,
            format: spec.format,
            synth,
        })
    }

    fn check(&self, index: usize) -> Result<u64, DataError> {
        if index >= self.count {
            return Err(DataError::IndexOutOfRange {
                name: self.name.clone(),
                index,
                len: self.count,
            });
        }
        Ok(index as u64)
    }
}

impl Dataset for SynthDataset {
    fn name(&self) -> &str {
        &self.name
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> usize {
        self.count
    }

    fn key(&self, index: usize) -> String {
        format!("synth-{index:09}")
    }

    fn label(&self, index: usize) -> Result<String, DataError> {
        Ok(self.synth.label(self.check(index)?))
    }

    fn image(&self, index: usize) -> Result<Vec<u8>, DataError> {
        let index = self.check(index)?;
        self.synth
            .render_encoded(index, self.format)
            .map(|(_, bytes)| bytes)
            .map_err(|e| DataError::BadSynthSpec {
                path: self.path.clone(),
                reason: format!("rendering record {index}: {e}"),
            })
    }

    /// Labels are drawn without rendering, in parallel: a million take about a second.
    fn labels(&self) -> Result<Vec<Result<String, DataError>>, DataError> {
        Ok((0..self.count as u64)
            .into_par_iter()
            .map(|i| Ok(self.synth.label(i)))
            .collect())
    }
}
