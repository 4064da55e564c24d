//! Checkpoint files -> named f32 tensors (+ hyper-parameters), and back to safetensors.
//!
//! Reads, recognising the format from the first bytes rather than the extension:
//! * safetensors (F32/F16/BF16/... converted to f32, `__metadata__` kept);
//! * Lightning `.ckpt` (`torch.save({'state_dict', 'hyper_parameters', ...})`);
//! * flat `.pt`/`.bin` state dicts (released CLIP4STR `.pt`, OpenCLIP `.bin`) and dicts that
//!   nest the weights under `state_dict`/`model`;
//! * TorchScript archives (`torch.jit.save`, e.g. OpenAI's original CLIP `.pt`): the tensors of the
//!   pickled module tree under their dotted attribute paths, as `torch.jit.load(f).state_dict()`.
//!
//! No Python code is ever executed: pickles are interpreted by a small reader of our own.
//!
//! This file sniffs the format, dispatches to a reader and checks tensors against a model; each format has its
//! own file (`safetensors_file`, `torch` with `pickle`), and so does averaging ([`WeightedAverage`]).

mod average;
mod elements;
mod pickle;
mod safetensors_file;
mod torch;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use average::{average_checkpoints, WeightedAverage};
pub use safetensors_file::save_safetensors;
use safetensors_file::{read_safetensors, safetensors_from, MAX_SAFETENSORS_HEADER};

/// Metadata key under which [`save_safetensors`] callers may store hyper-parameters as JSON;
/// [`read_checkpoint`] parses it back into [`RawCheckpoint::hyper_parameters`].
pub const HYPER_PARAMETERS_METADATA_KEY: &str = "hyper_parameters";

/// Container format of a checkpoint file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// safetensors (our own conversion output).
    Safetensors,
    /// PyTorch Lightning checkpoint: `state_dict` + `hyper_parameters`.
    LightningCkpt,
    /// `torch.save` of a state dict, flat or nested under `model`/`state_dict`.
    TorchStateDict,
    /// `torch.jit.save` of a module (OpenAI CLIP `.pt`); names are attribute paths, and the
    /// JIT-only buffers (`input_resolution`, ...) are kept as stored.
    TorchScript,
}

/// Every tensor of a checkpoint as f32 on the CPU, plus what the file says about the model.
#[derive(Debug, Clone)]
pub struct RawCheckpoint {
    /// The file as given by the caller (used in error messages).
    pub path: PathBuf,
    /// Container format detected from the content.
    pub format: CheckpointFormat,
    /// Names as stored (minus [`Self::stripped_prefix`]), in file order; all F32 on the CPU.
    pub tensors: Vec<(String, Tensor)>,
    /// Lightning `hyper_parameters` (or safetensors metadata `hyper_parameters`) as JSON.
    pub hyper_parameters: Option<serde_json::Value>,
    /// safetensors `__metadata__` (empty for other formats).
    pub metadata: HashMap<String, String>,
    /// `model.` or `module.` when every stored name had that prefix and it was removed.
    pub stripped_prefix: Option<String>,
    /// Human-readable remarks about the conversion (skipped entries, dtype conversion, ...).
    pub notes: Vec<String>,
}

impl RawCheckpoint {
    /// The tensor stored under `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// `(name, shape)` of every tensor, in file order; the input of shape inference.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect()
    }

    /// A `VarBuilder` over these tensors, converting to `dtype`/`device` when a tensor is used.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> candle_nn::VarBuilder<'static> {
        let map: HashMap<String, Tensor> = self.tensors.iter().cloned().collect();
        candle_nn::VarBuilder::from_tensors(map, dtype, device)
    }
}

/// Why a checkpoint could not be read or does not fit the model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file cannot be opened or read (missing, a directory, permissions, ...).
    #[error("checkpoint {}: cannot read the file: {error}", .path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file cannot be written (no such folder, permissions, disk full, ...): kept apart from `Io` so that
    /// the message says which of the two failed.
    #[error("checkpoint {}: cannot write the file: {error}", .path.display())]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Not a checkpoint we can read (text, image, legacy torch format, ...).
    #[error("checkpoint {}: unsupported format: {reason}", .path.display())]
    UnsupportedFormat { path: PathBuf, reason: String },
    /// A known format whose content is inconsistent, usually an incomplete download.
    #[error("checkpoint {}: damaged or truncated file: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// The file parsed but holds no tensors (readers must never return an empty list).
    #[error("checkpoint {}: the file contains no tensors", .path.display())]
    Empty { path: PathBuf },
    /// The model needs a tensor the file lacks; `more` counts further problems.
    #[error(
        "checkpoint {}: tensor {name} is missing (the model expects shape {expected_shape:?}){}",
        .path.display(), more_problems(*.more)
    )]
    MissingTensor {
        path: PathBuf,
        name: String,
        expected_shape: Vec<usize>,
        more: usize,
    },
    /// The file has a tensor the model does not use; `more` counts further problems.
    #[error(
        "checkpoint {}: tensor {name} with shape {shape:?} is not part of the model{}",
        .path.display(), more_problems(*.more)
    )]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        shape: Vec<usize>,
        more: usize,
    },
    /// A tensor's shape differs from the model's; `more` counts further problems.
    #[error(
        "checkpoint {}: tensor {name} has shape {found:?}, the model expects {expected:?}{}",
        .path.display(), more_problems(*.more)
    )]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        more: usize,
    },
    /// The file's settings or the caller's request cannot be used.
    #[error("checkpoint {}: {reason}", .path.display())]
    Config { path: PathBuf, reason: String },
    /// The model configuration its tensors (and hyper-parameters, and the caller's override) describe does not
    /// hold together; the cause is printed, not returned as a source.
    #[error("checkpoint {}: {error}", .path.display())]
    ModelConfig {
        path: PathBuf,
        error: crate::config::ConfigError,
    },
    /// candle failed while building a tensor.
    #[error("checkpoint {}: tensor operation failed: {error}", .path.display())]
    Tensor {
        path: PathBuf,
        error: candle_core::Error,
    },
}

fn more_problems(more: usize) -> String {
    match more {
        0 => String::new(),
        1 => " (and 1 more tensor problem)".to_string(),
        n => format!(" (and {n} more tensor problems)"),
    }
}

/// What a format reader produces before prefix handling.
struct Loaded {
    format: CheckpointFormat,
    tensors: Vec<(String, Tensor)>,
    hyper_parameters: Option<serde_json::Value>,
    metadata: HashMap<String, String>,
    notes: Vec<String>,
}

/// Reads any supported checkpoint file; the format is detected from its content.
pub fn read_checkpoint(path: &Path) -> Result<RawCheckpoint, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        error: source,
    };
    let mut head = Vec::with_capacity(64);
    File::open(path)
        .and_then(|f| f.take(64).read_to_end(&mut head))
        .map_err(io)?;
    let kind = sniff(&head).map_err(|reason| {
        let path = path.to_path_buf();
        if head.is_empty() {
            LoadError::Corrupt { path, reason }
        } else {
            LoadError::UnsupportedFormat { path, reason }
        }
    })?;
    // Third-party zip/tensor code must not take the caller down on a malformed file.
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match kind {
        Sniffed::Safetensors => read_safetensors(path),
        Sniffed::TorchZip => torch::read(path),
    }))
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(LoadError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("the decoder failed on malformed data ({what})"),
        })
    })?;

    Ok(finish(path, loaded))
}

/// Reads a safetensors checkpoint held in memory (e.g. weights embedded in a binary); `label` names it in
/// errors and in [`RawCheckpoint::path`].
pub fn read_checkpoint_bytes(label: &Path, bytes: &[u8]) -> Result<RawCheckpoint, LoadError> {
    match sniff(&bytes[..bytes.len().min(64)]) {
        Ok(Sniffed::Safetensors) => {}
        Ok(Sniffed::TorchZip) => {
            return Err(LoadError::UnsupportedFormat {
                path: label.to_path_buf(),
                reason: "only safetensors can be read from memory".into(),
            })
        }
        Err(reason) => {
            return Err(LoadError::Corrupt {
                path: label.to_path_buf(),
                reason,
            })
        }
    }
    let loaded = safetensors_from(label, std::io::Cursor::new(bytes), bytes.len() as u64)?;
    Ok(finish(label, loaded))
}

/// Removes a `model.`/`module.` prefix shared by every name and assembles the result.
fn finish(path: &Path, loaded: Loaded) -> RawCheckpoint {
    let Loaded {
        format,
        mut tensors,
        hyper_parameters,
        metadata,
        mut notes,
    } = loaded;
    let stripped_prefix = ["module.", "model."]
        .into_iter()
        .find(|p| {
            tensors
                .iter()
                .all(|(n, _)| n.len() > p.len() && n.starts_with(p))
        })
        .map(str::to_string);
    if let Some(prefix) = &stripped_prefix {
        for (name, _) in tensors.iter_mut() {
            name.drain(..prefix.len());
        }
        notes.push(format!(
            "removed the prefix '{prefix}' from every tensor name"
        ));
    }
    RawCheckpoint {
        path: path.to_path_buf(),
        format,
        tensors,
        hyper_parameters,
        metadata,
        stripped_prefix,
        notes,
    }
}

/// Every mismatch between the file's tensors and the `(name, shape)` list a model expects:
/// missing and mis-shaped tensors in model order, then unused file tensors in file order.
/// Each error has `more == 0`.
pub fn tensor_problems(raw: &RawCheckpoint, expected: &[(String, Vec<usize>)]) -> Vec<LoadError> {
    let path = || raw.path.clone();
    let found: HashMap<&str, &[usize]> = raw
        .tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.dims()))
        .collect();
    let mut problems = Vec::new();
    for (name, shape) in expected {
        match found.get(name.as_str()) {
            None => problems.push(LoadError::MissingTensor {
                path: path(),
                name: name.clone(),
                expected_shape: shape.clone(),
                more: 0,
            }),
            Some(dims) if *dims != shape.as_slice() => problems.push(LoadError::ShapeMismatch {
                path: path(),
                name: name.clone(),
                expected: shape.clone(),
                found: dims.to_vec(),
                more: 0,
            }),
            Some(_) => {}
        }
    }
    let wanted: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    for (name, tensor) in &raw.tensors {
        if !wanted.contains(name.as_str()) {
            problems.push(LoadError::UnexpectedTensor {
                path: path(),
                name: name.clone(),
                shape: tensor.dims().to_vec(),
                more: 0,
            });
        }
    }
    problems
}

/// Checks that the file holds exactly the tensors a model expects. Returns the first problem,
/// its `more` field (and message) counting the others; see [`tensor_problems`] for all.
pub fn check_tensors(
    raw: &RawCheckpoint,
    expected: &[(String, Vec<usize>)],
) -> Result<(), LoadError> {
    let problems = tensor_problems(raw, expected);
    let others = problems.len().saturating_sub(1);
    match problems.into_iter().next() {
        None => Ok(()),
        Some(mut first) => {
            if let LoadError::MissingTensor { more, .. }
            | LoadError::UnexpectedTensor { more, .. }
            | LoadError::ShapeMismatch { more, .. } = &mut first
            {
                *more = others;
            }
            Err(first)
        }
    }
}

enum Sniffed {
    Safetensors,
    TorchZip,
}

/// Recognises the container from the first bytes; the error explains what the file looks like.
fn sniff(head: &[u8]) -> Result<Sniffed, String> {
    const EXPECTED: &str =
        "expected safetensors or a PyTorch .ckpt/.pt/.bin (torch.save zip archive)";
    // pickle PROTO 2 + LONG1 0x1950a86a20f9469cfc6c: the magic number of the pre-1.6 format.
    const LEGACY_TORCH: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";
    if head.is_empty() {
        return Err("the file is empty (0 bytes)".to_string());
    }
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Ok(Sniffed::TorchZip);
    }
    let len_bytes = head.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok());
    let header_len = len_bytes.map(u64::from_le_bytes);
    // A size past the limit is still safetensors (a damaged one, which the reader reports as such) unless its
    // eight bytes read as text, as in a JSON or text file whose ninth character happens to be `{`.
    let binary_size = len_bytes.is_some_and(|b| {
        b.iter()
            .any(|c| !c.is_ascii_graphic() && !c.is_ascii_whitespace())
    });
    if head.get(8) == Some(&b'{')
        && (header_len.is_some_and(|n| n <= MAX_SAFETENSORS_HEADER) || binary_size)
    {
        return Ok(Sniffed::Safetensors);
    }
    let looks_like = if head.starts_with(LEGACY_TORCH) {
        return Err("legacy torch.save format (PyTorch < 1.6 or \
             _use_new_zipfile_serialization=False) is not supported; re-save it with a \
             recent PyTorch"
            .to_string());
    } else if head.first() == Some(&0x80) {
        "a bare Python pickle, not a torch.save archive"
    } else if head.starts_with(b"version https://git-lfs") {
        return Err(
            "this is a Git LFS pointer, not the weights; fetch them with `git lfs pull`"
                .to_string(),
        );
    } else if head.starts_with(b"\xff\xd8\xff") {
        "a JPEG image"
    } else if head.starts_with(b"\x89PNG") {
        "a PNG image"
    } else if head.starts_with(b"\x1f\x8b") {
        "a gzip file"
    } else if head.starts_with(b"GGUF") {
        "a GGUF file"
    } else if head.starts_with(b"\x89HDF") {
        "an HDF5 file"
    } else if std::str::from_utf8(head).is_ok()
        || head
            .iter()
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
    {
        let text = String::from_utf8_lossy(head);
        let t = text.trim_start();
        if t.starts_with('<') {
            "an HTML/XML document (a failed download?)"
        } else if t.starts_with('{') || t.starts_with('[') {
            "a JSON file"
        } else {
            "a text file"
        }
    } else {
        "unknown binary data"
    };
    Err(format!("the file looks like {looks_like}; {EXPECTED}"))
}
