//! safetensors files: reading tensor by tensor (any element type to f32, `__metadata__` kept) and writing
//! atomically.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::elements::{decode_elements, ElemType};
use super::{CheckpointFormat, LoadError, Loaded, HYPER_PARAMETERS_METADATA_KEY};

/// Largest safetensors JSON header we accept (the format itself caps it at 100 MB).
pub(super) const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

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
        error: source,
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
                error: source,
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

/// One tensor entry of a safetensors header.
struct SafetensorsEntry {
    name: String,
    elem: ElemType,
    shape: Vec<usize>,
    begin: u64,
    end: u64,
}

/// Reads a safetensors file tensor by tensor, so peak memory stays near the f32 result size.
pub(super) fn read_safetensors(path: &Path) -> Result<Loaded, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        error: source,
    };
    let file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    safetensors_from(path, file, file_len)
}

/// The safetensors reader over any seekable source of `file_len` bytes.
pub(super) fn safetensors_from(
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
        error: source,
    };
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|e| corrupt(format!("cannot read the safetensors header size ({e})")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    let data_start = header_len.saturating_add(8);
    if header_len > MAX_SAFETENSORS_HEADER {
        return Err(corrupt(format!(
            "the safetensors header claims {header_len} bytes, more than the format allows \
             ({MAX_SAFETENSORS_HEADER}); the size field is damaged"
        )));
    }
    if data_start > file_len {
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
                    error: source,
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
