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

mod pickle;
mod torch;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

/// Metadata key under which [`save_safetensors`] callers may store hyper-parameters as JSON;
/// [`read_checkpoint`] parses it back into [`RawCheckpoint::hyper_parameters`].
pub const HYPER_PARAMETERS_METADATA_KEY: &str = "hyper_parameters";

/// Largest safetensors JSON header we accept (the format itself caps it at 100 MB).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

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
    #[error("checkpoint {}: cannot read the file: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file cannot be written (no such folder, permissions, disk full, ...): kept apart from `Io` so that
    /// the message says which of the two failed.
    #[error("checkpoint {}: cannot write the file: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
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
    /// candle failed while building a tensor.
    #[error("checkpoint {}: tensor operation failed: {source}", .path.display())]
    Tensor {
        path: PathBuf,
        source: candle_core::Error,
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
        source,
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

/// The weighted mean, tensor by tensor, of several checkpoints of one model (a "model soup"): runs fine-tuned
/// from a common ancestor stay in one basin, and the mean of their weights often beats each run. `weights` (one
/// per checkpoint, finite, >= 0, not all zero) are normalised to sum to 1; `names` are the tensors to average,
/// which every checkpoint must hold with the same shape. See [`WeightedAverage`] to add files one at a time.
pub fn average_checkpoints(
    checkpoints: &[RawCheckpoint],
    weights: &[f64],
    names: &[String],
) -> Result<Vec<(String, Tensor)>, LoadError> {
    if let Some(first) = checkpoints.first() {
        if weights.len() != checkpoints.len() {
            return Err(LoadError::Config {
                path: first.path.clone(),
                reason: format!(
                    "{} weights for {} checkpoints",
                    weights.len(),
                    checkpoints.len()
                ),
            });
        }
    }
    let mut average = WeightedAverage::new(names.to_vec());
    for (raw, weight) in checkpoints.iter().zip(weights) {
        average.add(raw, *weight)?;
    }
    average.finish()
}

/// A running weighted sum of one model's checkpoints, so that averaging N files holds the sum and one file in
/// memory rather than all N. The sum is f32, so the mean of two f16 files is exact before it is stored again.
#[derive(Debug)]
pub struct WeightedAverage {
    names: Vec<String>,
    /// `sum_i weight_i * tensor_i`, one per name, once a file has been added.
    sums: Vec<Tensor>,
    total_weight: f64,
    /// The first file added: errors about the whole average name it.
    first: Option<PathBuf>,
}

impl WeightedAverage {
    /// An empty average over the tensors `names`.
    pub fn new(names: Vec<String>) -> Self {
        Self {
            names,
            sums: Vec::new(),
            total_weight: 0.0,
            first: None,
        }
    }

    /// Adds `raw` with `weight` (finite, >= 0); it must hold every name with the shape of the first file's.
    pub fn add(&mut self, raw: &RawCheckpoint, weight: f64) -> Result<(), LoadError> {
        let tensor_error = |source| LoadError::Tensor {
            path: raw.path.clone(),
            source,
        };
        if !weight.is_finite() || weight < 0.0 {
            return Err(LoadError::Config {
                path: raw.path.clone(),
                reason: format!("averaging weight {weight} is not a finite number >= 0"),
            });
        }
        let factor = Tensor::new(weight as f32, &Device::Cpu).map_err(tensor_error)?;
        let mut sums = Vec::with_capacity(self.names.len());
        for (i, name) in self.names.iter().enumerate() {
            let sum = self.sums.get(i);
            let tensor = raw.get(name).ok_or_else(|| LoadError::MissingTensor {
                path: raw.path.clone(),
                name: name.clone(),
                expected_shape: sum.map(|s| s.dims().to_vec()).unwrap_or_default(),
                more: 0,
            })?;
            if let Some(sum) = sum.filter(|s| s.dims() != tensor.dims()) {
                return Err(LoadError::ShapeMismatch {
                    path: raw.path.clone(),
                    name: name.clone(),
                    expected: sum.dims().to_vec(),
                    found: tensor.dims().to_vec(),
                    more: 0,
                });
            }
            // A product, not `affine(w, 0.0)`: adding 0.0 would turn -0.0 into +0.0.
            let scaled = tensor
                .to_device(&Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32)?.broadcast_mul(&factor))
                .map_err(tensor_error)?;
            sums.push(match sum {
                None => scaled,
                Some(sum) => sum.add(&scaled).map_err(tensor_error)?,
            });
        }
        // Only a file that fits every tensor changes the sum.
        self.sums = sums;
        self.total_weight += weight;
        self.first.get_or_insert_with(|| raw.path.clone());
        Ok(())
    }

    /// The mean: the weighted sum divided by the sum of the weights, as f32 tensors in `names` order.
    pub fn finish(self) -> Result<Vec<(String, Tensor)>, LoadError> {
        let Some(path) = self.first else {
            return Err(LoadError::Config {
                path: PathBuf::from("(none)"),
                reason: "nothing to average: no checkpoints given".into(),
            });
        };
        if self.total_weight <= 0.0 {
            return Err(LoadError::Config {
                path,
                reason: "the averaging weights are all zero".into(),
            });
        }
        let tensor_error = |source| LoadError::Tensor {
            path: path.clone(),
            source,
        };
        let total = Tensor::new(self.total_weight as f32, &Device::Cpu).map_err(tensor_error)?;
        self.names
            .into_iter()
            .zip(self.sums)
            .map(|(name, sum)| Ok((name, sum.broadcast_div(&total).map_err(tensor_error)?)))
            .collect()
    }
}

/// Writes tensors (in their own dtype) and metadata as a safetensors file. The file is written
/// next to `path` under a temporary name, synced, then renamed, so readers never see half a file.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<(), LoadError> {
    let config = |reason: String| LoadError::Config {
        path: path.to_path_buf(),
        reason,
    };
    let io = |source| LoadError::Write {
        path: path.to_path_buf(),
        source,
    };
    if tensors.is_empty() {
        return Err(config(
            "refusing to save a checkpoint without tensors".into(),
        ));
    }
    let mut seen = HashSet::new();
    let mut views = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(config(format!(
                "cannot save: tensor name {name} appears twice"
            )));
        }
        let view = SaveView::new(tensor)
            .map_err(|source| LoadError::Tensor {
                path: path.to_path_buf(),
                source,
            })?
            .ok_or_else(|| {
                config(format!(
                    "cannot save tensor {name}: dtype {:?} has no safetensors equivalent here",
                    tensor.dtype()
                ))
            })?;
        views.push((name.as_str(), view));
    }

    let file_name = path
        .file_name()
        .ok_or_else(|| config("cannot save: the path has no file name".into()))?;
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{}.{}-{unique}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let info = (!metadata.is_empty()).then(|| metadata.clone());
    let written = safetensors::tensor::serialize_to_file(views, info, &tmp)
        .map_err(|e| match e {
            safetensors::SafeTensorError::IoError(source) => io(source),
            other => config(format!("cannot save: {other}")),
        })
        .and_then(|()| File::open(&tmp).and_then(|f| f.sync_all()).map_err(io))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io));
    if written.is_err() {
        // Best effort: the temporary file is useless after a failure.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// A tensor's bytes in safetensors layout (little-endian, C order).
struct SaveView {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl SaveView {
    fn new(tensor: &Tensor) -> candle_core::Result<Option<Self>> {
        fn le<T, const N: usize>(t: &Tensor, to: fn(T) -> [u8; N]) -> candle_core::Result<Vec<u8>>
        where
            T: candle_core::WithDType,
        {
            let values = t.flatten_all()?.to_vec1::<T>()?;
            Ok(values.into_iter().flat_map(to).collect())
        }
        use safetensors::Dtype as S;
        let t = tensor.to_device(&Device::Cpu)?;
        let (dtype, bytes) = match t.dtype() {
            DType::F32 => (S::F32, le(&t, f32::to_le_bytes)?),
            DType::F16 => (S::F16, le(&t, half::f16::to_le_bytes)?),
            DType::BF16 => (S::BF16, le(&t, half::bf16::to_le_bytes)?),
            DType::F64 => (S::F64, le(&t, f64::to_le_bytes)?),
            DType::U8 => (S::U8, le(&t, u8::to_le_bytes)?),
            DType::U32 => (S::U32, le(&t, u32::to_le_bytes)?),
            DType::I16 => (S::I16, le(&t, i16::to_le_bytes)?),
            DType::I32 => (S::I32, le(&t, i32::to_le_bytes)?),
            DType::I64 => (S::I64, le(&t, i64::to_le_bytes)?),
            _ => return Ok(None),
        };
        Ok(Some(SaveView {
            dtype,
            shape: t.dims().to_vec(),
            bytes,
        }))
    }
}

impl safetensors::View for SaveView {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
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
    let header_len = head
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes);
    if head.get(8) == Some(&b'{') && header_len.is_some_and(|n| n <= MAX_SAFETENSORS_HEADER) {
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

/// Element types we can convert to f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ElemType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
}

impl ElemType {
    fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 | Self::U64 => 8,
            Self::F32 | Self::I32 | Self::U32 => 4,
            Self::F16 | Self::BF16 | Self::I16 | Self::U16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    fn from_safetensors(name: &str) -> Option<Self> {
        Some(match name {
            "F64" => Self::F64,
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            "I64" => Self::I64,
            "I32" => Self::I32,
            "I16" => Self::I16,
            "I8" => Self::I8,
            "U64" => Self::U64,
            "U32" => Self::U32,
            "U16" => Self::U16,
            "U8" => Self::U8,
            "BOOL" => Self::Bool,
            _ => return None,
        })
    }

    fn from_torch_storage(class: &str) -> Option<Self> {
        Some(match class {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }
}

/// Converts packed elements to f32 (integers and f64 are rounded to the nearest f32).
fn decode_elements(bytes: &[u8], elem: ElemType, big_endian: bool) -> Vec<f32> {
    fn each<const N: usize>(
        bytes: &[u8],
        big_endian: bool,
        f: impl Fn([u8; N]) -> f32,
    ) -> Vec<f32> {
        bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                if big_endian {
                    a.reverse();
                }
                f(a)
            })
            .collect()
    }
    let be = big_endian;
    match elem {
        ElemType::F64 => each(bytes, be, |a| f64::from_le_bytes(a) as f32),
        ElemType::F32 => each(bytes, be, f32::from_le_bytes),
        ElemType::F16 => each(bytes, be, |a| half::f16::from_le_bytes(a).to_f32()),
        ElemType::BF16 => each(bytes, be, |a| half::bf16::from_le_bytes(a).to_f32()),
        ElemType::I64 => each(bytes, be, |a| i64::from_le_bytes(a) as f32),
        ElemType::I32 => each(bytes, be, |a| i32::from_le_bytes(a) as f32),
        ElemType::I16 => each(bytes, be, |a| f32::from(i16::from_le_bytes(a))),
        ElemType::I8 => each(bytes, be, |a| f32::from(i8::from_le_bytes(a))),
        ElemType::U64 => each(bytes, be, |a| u64::from_le_bytes(a) as f32),
        ElemType::U32 => each(bytes, be, |a| u32::from_le_bytes(a) as f32),
        ElemType::U16 => each(bytes, be, |a| f32::from(u16::from_le_bytes(a))),
        ElemType::U8 => each(bytes, be, |a: [u8; 1]| f32::from(a[0])),
        ElemType::Bool => each(bytes, be, |a: [u8; 1]| if a[0] != 0 { 1.0 } else { 0.0 }),
    }
}

/// One tensor entry of a safetensors header.
struct SafetensorsEntry {
    name: String,
    elem: ElemType,
    shape: Vec<usize>,
    begin: u64,
    end: u64,
}

/// Reads a safetensors file tensor by tensor, so peak memory stays near the f32 result size.
fn read_safetensors(path: &Path) -> Result<Loaded, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    safetensors_from(path, file, file_len)
}

/// The safetensors reader over any seekable source of `file_len` bytes.
fn safetensors_from(
    path: &Path,
    mut file: impl Read + Seek,
    file_len: u64,
) -> Result<Loaded, LoadError> {
    let corrupt = |reason: String| LoadError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|e| corrupt(format!("cannot read the safetensors header size ({e})")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    let data_start = header_len.saturating_add(8);
    if header_len > MAX_SAFETENSORS_HEADER || data_start > file_len {
        return Err(corrupt(format!(
            "the safetensors header claims {header_len} bytes but the file has {file_len} \
             (truncated?)"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| corrupt(format!("the safetensors header is not valid JSON ({e})")))?;

    let mut metadata = HashMap::new();
    let mut entries = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            for (k, v) in info.as_object().into_iter().flatten() {
                let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                metadata.insert(k.clone(), v);
            }
            continue;
        }
        entries.push(
            parse_entry(name, &info).map_err(|(name, reason)| match reason {
                EntryError::Dtype(dtype) => LoadError::UnsupportedFormat {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tensor {name} has dtype {dtype}, which cannot be converted to f32"
                    ),
                },
                EntryError::Malformed(why) => corrupt(format!("tensor {name}: {why}")),
            })?,
        );
    }
    if entries.is_empty() {
        return Err(LoadError::Empty {
            path: path.to_path_buf(),
        });
    }
    entries.sort_by_key(|e| e.begin);

    let data_len = file_len - data_start;
    let mut tensors = Vec::with_capacity(entries.len());
    let mut source_types: Vec<ElemType> = Vec::new();
    for e in entries {
        if e.end > data_len {
            return Err(corrupt(format!(
                "tensor {} needs bytes {}..{} of the data section but it has only {data_len} \
                 (truncated?)",
                e.name, e.begin, e.end
            )));
        }
        let mut bytes = vec![0u8; (e.end - e.begin) as usize];
        file.seek(SeekFrom::Start(data_start + e.begin))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(io)?;
        let values = decode_elements(&bytes, e.elem, false);
        let tensor =
            Tensor::from_vec(values, e.shape.as_slice(), &Device::Cpu).map_err(|source| {
                LoadError::Tensor {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        if !source_types.contains(&e.elem) {
            source_types.push(e.elem);
        }
        tensors.push((e.name, tensor));
    }

    let mut notes = Vec::new();
    if source_types.iter().any(|t| *t != ElemType::F32) {
        notes.push(format!("converted to f32 from {source_types:?}"));
    }
    let hyper_parameters = match metadata.get(HYPER_PARAMETERS_METADATA_KEY) {
        Some(json) => match serde_json::from_str(json) {
            Ok(value) => Some(value),
            Err(e) => {
                notes.push(format!(
                    "metadata hyper_parameters is not JSON ({e}); ignored"
                ));
                None
            }
        },
        None => None,
    };
    Ok(Loaded {
        format: CheckpointFormat::Safetensors,
        tensors,
        hyper_parameters,
        metadata,
        notes,
    })
}

enum EntryError {
    Dtype(String),
    Malformed(String),
}

fn parse_entry(
    name: String,
    info: &serde_json::Value,
) -> Result<SafetensorsEntry, (String, EntryError)> {
    let malformed = |why: &str| EntryError::Malformed(why.to_string());
    let dtype = match info.get("dtype").and_then(|d| d.as_str()) {
        Some(d) => d,
        None => return Err((name, malformed("no dtype"))),
    };
    let Some(elem) = ElemType::from_safetensors(dtype) else {
        return Err((name, EntryError::Dtype(dtype.to_string())));
    };
    let shape: Option<Vec<usize>> = info
        .get("shape")
        .and_then(|s| s.as_array())
        .and_then(|dims| {
            dims.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        });
    let offsets: Option<Vec<u64>> = info
        .get("data_offsets")
        .and_then(|o| o.as_array())
        .and_then(|o| o.iter().map(|v| v.as_u64()).collect());
    let (Some(shape), Some(&[begin, end])) = (shape, offsets.as_deref()) else {
        return Err((name, malformed("bad shape or data_offsets")));
    };
    let bytes = shape
        .iter()
        .try_fold(elem.size() as u64, |acc, &d| acc.checked_mul(d as u64));
    if end < begin || bytes != Some(end - begin) {
        return Err((
            name,
            malformed("data_offsets do not match the shape and dtype"),
        ));
    }
    Ok(SafetensorsEntry {
        name,
        elem,
        shape,
        begin,
        end,
    })
}
