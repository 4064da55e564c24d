//! PyTorch zip archives: `torch.save` files (Lightning `.ckpt`, flat `.pt` state dicts, OpenCLIP
//! `.bin`) and `torch.jit.save` TorchScript modules (OpenAI's released CLIP `.pt`).
//!
//! Layout: `<name>/data.pkl` (the pickled object), `<name>/data/<key>` (raw storages, stored
//! uncompressed), `<name>/byteorder`. TorchScript archives also carry `constants.pkl` and `code/`;
//! their `data.pkl` pickles the module itself: each module is a `__torch__.*` object whose `BUILD`
//! state is a dict of its attributes (submodules, parameters, buffers, flags), so the dotted path of
//! a tensor attribute is its state-dict name.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::{Device, Tensor};
use zip::ZipArchive;

use super::elements::{decode_elements, ElemType};
use super::pickle::{Id, Node, Pickle, TensorRef};
use super::{CheckpointFormat, LoadError, Loaded};

/// Largest `data.pkl` we are willing to hold in memory (optimizer state can make it big).
const MAX_PICKLE_BYTES: u64 = 1 << 30;

/// Keys under which training scripts nest the model weights, in order of preference.
const NESTED_STATE_KEYS: [&str; 4] = ["state_dict", "model", "model_state_dict", "module"];

type Archive = ZipArchive<BufReader<File>>;

pub(super) fn read(path: &Path) -> Result<Loaded, LoadError> {
    let corrupt = |reason: String| LoadError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let unsupported = |reason: String| LoadError::UnsupportedFormat {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        error: source,
    })?;
    let mut zip = ZipArchive::new(BufReader::new(file))
        .map_err(|e| corrupt(format!("cannot open the zip archive ({e})")))?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();

    let torchscript = names
        .iter()
        .any(|n| n.ends_with("constants.pkl") || n.starts_with("code/") || n.contains("/code/"));
    let pickle_name = names
        .iter()
        .filter(|n| *n == "data.pkl" || (n.ends_with("/data.pkl") && n.matches('/').count() == 1))
        .min_by_key(|n| n.len())
        .cloned()
        .ok_or_else(|| {
            let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
            unsupported(format!(
                "a zip archive without data.pkl, so not a torch.save file (entries: {})",
                if shown.is_empty() {
                    "none".to_string()
                } else {
                    shown.join(", ")
                }
            ))
        })?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();

    let big_endian = match read_entry(&mut zip, &format!("{prefix}byteorder"), 64) {
        Ok(bytes) => bytes.trim_ascii() == b"big",
        Err(_) => false,
    };
    let pickle_bytes = read_entry(&mut zip, &pickle_name, MAX_PICKLE_BYTES)
        .map_err(|e| corrupt(format!("cannot read {pickle_name}: {e}")))?;
    let pickle =
        Pickle::parse(&pickle_bytes).map_err(|e| corrupt(format!("{pickle_name}: {e}")))?;

    let root = pickle.root;
    let module_class = pickle
        .class_name(root)
        .filter(|class| class.starts_with("__torch__."));
    if torchscript || module_class.is_some() {
        let refs = module_tensors(&pickle, root).map_err(corrupt)?;
        if refs.is_empty() {
            return Err(LoadError::Empty {
                path: path.to_path_buf(),
            });
        }
        let mut notes = vec![format!(
            "TorchScript module {}: {} tensors named by their attribute paths",
            module_class.as_deref().unwrap_or("(dict)"),
            refs.len()
        )];
        let tensors = load_all(path, &mut zip, &prefix, big_endian, refs, &mut notes)?;
        return Ok(Loaded {
            format: CheckpointFormat::TorchScript,
            tensors,
            hyper_parameters: None,
            metadata: Default::default(),
            notes,
        });
    }
    if pickle.dict_items(root).is_none() {
        let what = pickle
            .class_name(root)
            .unwrap_or_else(|| "non-dict value".to_string());
        let hint = match pickle.node(root) {
            Node::Object {
                state: Some(state), ..
            } if pickle.get(*state, "_parameters").is_some() => {
                "; this is a whole pickled nn.Module: save model.state_dict() instead"
            }
            _ => "",
        };
        return Err(unsupported(format!(
            "the archive holds a {what}, not a dict of tensors{hint}"
        )));
    }

    let mut notes = Vec::new();
    let (state_dict, format) = match nested_state_dict(&pickle, root) {
        Some((key, id)) => {
            let lightning = pickle.get(root, "hyper_parameters").is_some()
                || pickle.get(root, "pytorch-lightning_version").is_some();
            if lightning {
                (id, CheckpointFormat::LightningCkpt)
            } else {
                notes.push(format!("tensors read from the nested '{key}' dict"));
                (id, CheckpointFormat::TorchStateDict)
            }
        }
        None => (root, CheckpointFormat::TorchStateDict),
    };
    let hyper_parameters = pickle
        .get(root, "hyper_parameters")
        .map(|id| pickle.to_json(id));

    let mut skipped = Vec::new();
    let mut refs: Vec<(String, &TensorRef)> = Vec::new();
    for &(key, value) in pickle.dict_items(state_dict).unwrap_or(&[]) {
        let Some(name) = pickle.str(key) else {
            skipped.push(format!("{:?}", pickle.to_json(key)));
            continue;
        };
        match pickle.node(value) {
            Node::Tensor(t) => refs.push((name.to_string(), t)),
            Node::BadTensor(reason) => {
                return Err(corrupt(format!("tensor {name}: {reason}")));
            }
            _ => skipped.push(name.to_string()),
        }
    }
    if !skipped.is_empty() {
        notes.push(format!(
            "skipped {} non-tensor entries: {}",
            skipped.len(),
            skipped.join(", ")
        ));
    }
    if refs.is_empty() {
        return Err(LoadError::Empty {
            path: path.to_path_buf(),
        });
    }
    let tensors = load_all(path, &mut zip, &prefix, big_endian, refs, &mut notes)?;
    Ok(Loaded {
        format,
        tensors,
        hyper_parameters,
        metadata: Default::default(),
        notes,
    })
}

/// Reads every referenced tensor as f32, noting the storage types that were converted.
fn load_all(
    path: &Path,
    zip: &mut Archive,
    prefix: &str,
    big_endian: bool,
    refs: Vec<(String, &TensorRef)>,
    notes: &mut Vec<String>,
) -> Result<Vec<(String, Tensor)>, LoadError> {
    let corrupt = |reason: String| LoadError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let unsupported = |reason: String| LoadError::UnsupportedFormat {
        path: path.to_path_buf(),
        reason,
    };
    let mut tensors = Vec::with_capacity(refs.len());
    let mut source_types: Vec<&str> = Vec::new();
    for (name, tref) in refs {
        let elem = ElemType::from_torch_storage(&tref.storage_type).ok_or_else(|| {
            unsupported(format!(
                "tensor {name} is stored as {}, which cannot be converted to f32",
                tref.storage_type
            ))
        })?;
        if !source_types.contains(&tref.storage_type.as_str()) {
            source_types.push(&tref.storage_type);
        }
        let tensor = load_tensor(zip, prefix, big_endian, elem, tref)
            .map_err(|reason| corrupt(format!("tensor {name}: {reason}")))?
            .map_err(|source| LoadError::Tensor {
                path: path.to_path_buf(),
                error: source,
            })?;
        tensors.push((name, tensor));
    }
    if source_types.iter().any(|t| *t != "FloatStorage") {
        notes.push(format!("converted to f32 from {}", source_types.join(", ")));
    }
    Ok(tensors)
}

/// Deepest module nesting we follow; real models nest a few levels, deeper means a damaged file.
const MAX_MODULE_DEPTH: usize = 256;

/// Every tensor attribute of a TorchScript module tree with its dotted path (`visual.conv1.weight`),
/// depth first in attribute order, like `Module.state_dict()`.
///
/// A module is an object whose `BUILD` state is a dict of attributes; a plain dict root (a
/// TorchScript archive of a dict) is read like one module. Attributes that are neither tensors nor
/// modules (`training`, ints, `None` biases) are skipped. An object reached again through its own
/// attributes (a cycle, impossible in a real module tree) is not entered twice.
fn module_tensors(pickle: &Pickle, root: Id) -> Result<Vec<(String, &TensorRef)>, String> {
    let mut out = Vec::new();
    let mut path: Vec<Id> = Vec::new();
    walk_module(pickle, root, String::new(), &mut path, &mut out)?;
    Ok(out)
}

fn walk_module<'p>(
    pickle: &'p Pickle,
    id: Id,
    name: String,
    path: &mut Vec<Id>,
    out: &mut Vec<(String, &'p TensorRef)>,
) -> Result<(), String> {
    match pickle.node(id) {
        Node::Tensor(t) if !name.is_empty() => {
            out.push((name, t));
            return Ok(());
        }
        Node::BadTensor(reason) => return Err(format!("tensor {name}: {reason}")),
        _ => {}
    }
    let attributes = match pickle.node(id) {
        Node::Object {
            state: Some(state), ..
        } => pickle.dict_items(*state),
        // A dict is only walked at the root: dict-valued attributes are not module state.
        Node::Dict { .. } if path.is_empty() => pickle.dict_items(id),
        _ => None,
    };
    let Some(attributes) = attributes else {
        return Ok(());
    };
    if path.contains(&id) {
        return Ok(());
    }
    if path.len() >= MAX_MODULE_DEPTH {
        return Err(format!(
            "module {name} is nested more than {MAX_MODULE_DEPTH} levels deep"
        ));
    }
    path.push(id);
    for &(key, value) in attributes {
        let Some(attr) = pickle.str(key) else {
            continue;
        };
        let child = if name.is_empty() {
            attr.to_string()
        } else {
            format!("{name}.{attr}")
        };
        walk_module(pickle, value, child, path, out)?;
    }
    path.pop();
    Ok(())
}

/// The first nested dict (e.g. `checkpoint['state_dict']`) that holds at least one tensor.
fn nested_state_dict(pickle: &Pickle, root: Id) -> Option<(&'static str, Id)> {
    NESTED_STATE_KEYS.iter().find_map(|&key| {
        let id = pickle.get(root, key)?;
        let items = pickle.dict_items(id)?;
        let has_tensor = items
            .iter()
            .any(|&(_, v)| matches!(pickle.node(v), Node::Tensor(_) | Node::BadTensor(_)));
        // An empty Lightning state_dict still identifies the file's layout.
        (has_tensor || (key == "state_dict" && items.is_empty())).then_some((key, id))
    })
}

/// Reads a whole archive entry, refusing entries larger than `limit` bytes.
fn read_entry(zip: &mut Archive, name: &str, limit: u64) -> Result<Vec<u8>, String> {
    let entry = zip.by_name(name).map_err(|e| e.to_string())?;
    if entry.size() > limit {
        return Err(format!("{} bytes is implausibly large", entry.size()));
    }
    let mut bytes = Vec::with_capacity(entry.size().min(1 << 26) as usize);
    entry
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// Reads one tensor's elements from its storage record and converts them to f32.
///
/// The outer error is a description of a damaged file, the inner one a candle error.
fn load_tensor(
    zip: &mut Archive,
    prefix: &str,
    big_endian: bool,
    elem: ElemType,
    tref: &TensorRef,
) -> Result<candle_core::Result<Tensor>, String> {
    if tref.stride.len() != tref.shape.len() {
        return Err(format!(
            "shape {:?} and strides {:?} disagree",
            tref.shape, tref.stride
        ));
    }
    let numel = tref
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or("the shape overflows")?;
    if numel == 0 {
        return Ok(Tensor::zeros(
            tref.shape.as_slice(),
            candle_core::DType::F32,
            &Device::Cpu,
        ));
    }
    // Elements from the first to the last one the view touches.
    let span = tref
        .shape
        .iter()
        .zip(&tref.stride)
        .try_fold(1usize, |acc, (&d, &s)| {
            acc.checked_add((d - 1).checked_mul(s)?)
        })
        .ok_or("the strides overflow")?;
    let end = tref
        .offset
        .checked_add(span)
        .ok_or("the offset overflows")?;
    if end > tref.storage_numel {
        return Err(format!(
            "its view ends at element {end} but its storage holds {}",
            tref.storage_numel
        ));
    }
    let size = elem.size();
    // torch.save and torch.jit.save keep storages under `data/`; some TorchScript writers use `.data/`.
    let record = [
        format!("{prefix}data/{}", tref.storage_key),
        format!("{prefix}.data/{}", tref.storage_key),
    ]
    .into_iter()
    .find(|r| zip.index_for_name(r).is_some())
    .unwrap_or_else(|| format!("{prefix}data/{}", tref.storage_key));
    let entry = zip
        .by_name(&record)
        .map_err(|e| format!("storage record {record} cannot be read ({e})"))?;
    let needed = end.checked_mul(size).ok_or("the storage size overflows")?;
    if entry.size() < needed as u64 {
        return Err(format!(
            "storage record {record} holds {} bytes but {needed} are needed (truncated?)",
            entry.size()
        ));
    }
    let mut reader = entry;
    std::io::copy(
        &mut (&mut reader).take((tref.offset * size) as u64),
        &mut std::io::sink(),
    )
    .map_err(|e| format!("reading {record}: {e}"))?;
    let mut bytes = vec![0u8; span * size];
    reader
        .read_exact(&mut bytes)
        .map_err(|e| format!("reading {record}: {e}"))?;
    let values = decode_elements(&bytes, elem, big_endian);
    let data = if is_row_major(&tref.shape, &tref.stride) {
        values
    } else {
        gather_strided(&values, &tref.shape, &tref.stride, numel)
    };
    Ok(Tensor::from_vec(data, tref.shape.as_slice(), &Device::Cpu))
}

/// True when `stride` is the C-order stride of `shape` (size-1 dims may have any stride).
fn is_row_major(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

/// Copies a strided view (e.g. a saved transpose) into C order.
fn gather_strided(values: &[f32], shape: &[usize], stride: &[usize], numel: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(numel);
    let mut index = vec![0usize; shape.len()];
    let mut offset = 0usize;
    for _ in 0..numel {
        out.push(values.get(offset).copied().unwrap_or(0.0));
        // Odometer increment from the last dimension.
        for dim in (0..shape.len()).rev() {
            index[dim] += 1;
            offset += stride[dim];
            if index[dim] < shape[dim] {
                break;
            }
            offset -= stride[dim] * shape[dim];
            index[dim] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_major_detection() {
        assert!(is_row_major(&[2, 3], &[3, 1]));
        assert!(is_row_major(&[1, 3], &[999, 1]));
        assert!(is_row_major(&[], &[]));
        assert!(!is_row_major(&[2, 3], &[1, 2]));
    }

    #[test]
    fn gather_transposed_view() {
        // storage [[0,1,2],[3,4,5]] viewed as its transpose [3, 2] with strides (1, 3)
        let storage = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        let out = gather_strided(&storage, &[3, 2], &[1, 3], 6);
        assert_eq!(out, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }
}
