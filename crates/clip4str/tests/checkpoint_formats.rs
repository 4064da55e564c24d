//! Every checkpoint format reads to the same tensors; damaged and foreign files give clear errors.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clip4str::checkpoint::{
    average_checkpoints, check_tensors, read_checkpoint, save_safetensors, tensor_problems,
    CheckpointFormat, LoadError, RawCheckpoint, WeightedAverage, HYPER_PARAMETERS_METADATA_KEY,
};
use common::{f32_bytes, fixture, write_archive, Pickler, TempFile};

fn read(path: &Path) -> RawCheckpoint {
    read_checkpoint(path).unwrap_or_else(|e| panic!("{e}"))
}

fn values(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 tensor")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn err_of(path: &Path) -> LoadError {
    match read_checkpoint(path) {
        Ok(raw) => panic!(
            "{} unexpectedly loaded {} tensors",
            path.display(),
            raw.tensors.len()
        ),
        Err(e) => e,
    }
}

#[test]
fn three_formats_hold_identical_tensors() {
    let st = read(&fixture("tiny.safetensors"));
    let ckpt = read(&fixture("tiny.ckpt"));
    let pt = read(&fixture("tiny.pt"));
    assert_eq!(st.format, CheckpointFormat::Safetensors);
    assert_eq!(ckpt.format, CheckpointFormat::LightningCkpt);
    assert_eq!(pt.format, CheckpointFormat::TorchStateDict);
    for raw in [&st, &ckpt, &pt] {
        assert_eq!(raw.tensors.len(), 114, "{:?}", raw.format);
        assert_eq!(raw.stripped_prefix, None);
        for (name, t) in &raw.tensors {
            assert_eq!(t.dtype(), DType::F32, "{name}");
            assert!(t.device().is_cpu());
        }
    }
    // Pickle formats keep the state_dict order; safetensors keeps data order.
    let ckpt_names: Vec<&str> = ckpt.tensors.iter().map(|(n, _)| n.as_str()).collect();
    let pt_names: Vec<&str> = pt.tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(ckpt_names, pt_names);
    assert_eq!(ckpt_names[0], "clip_model.positional_embedding");
    let mut st_names: Vec<&str> = st.tensors.iter().map(|(n, _)| n.as_str()).collect();
    let mut sorted = ckpt_names.clone();
    st_names.sort_unstable();
    sorted.sort_unstable();
    assert_eq!(st_names, sorted);

    for (name, t) in &st.tensors {
        let expected = values(t);
        for other in [&ckpt, &pt] {
            let o = other.get(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(o.dims(), t.dims(), "{name}");
            assert!(
                values(o) == expected,
                "{name} differs in {:?}",
                other.format
            );
        }
    }
    assert_eq!(
        st.shapes(),
        st.tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        ckpt.get("visual_decoder.head.weight")
            .map(|t| t.dims().to_vec()),
        Some(vec![95, 32])
    );
    assert_eq!(st.metadata.get("format").map(String::as_str), Some("pt"));
    assert!(ckpt.metadata.is_empty() && pt.metadata.is_empty());
    assert!(st.hyper_parameters.is_none() && pt.hyper_parameters.is_none());
}

#[test]
fn lightning_hyper_parameters() {
    let ckpt = read(&fixture("tiny.ckpt"));
    let hp = ckpt.hyper_parameters.as_ref().expect("hyper_parameters");
    assert_eq!(hp["dec_num_heads"], 2);
    assert_eq!(hp["clip_arch"]["transformer_heads"], 2);
    assert_eq!(hp["max_label_length"], 25);
    assert_eq!(
        hp["charset_train"].as_str().map(|s| s.chars().count()),
        Some(94)
    );
    assert_eq!(hp["charset_test"], "0123456789abcdefghijklmnopqrstuvwxyz");
    assert_eq!(hp["img_size"], serde_json::json!([64, 64]));
    assert_eq!(hp["lr"], 8.4e-05);
    assert_eq!(hp["perm_forward"], true);
    assert_eq!(hp["image_freeze_nlayer"], -1);
}

#[test]
fn missing_file() {
    let path = std::env::temp_dir().join("clip4str-definitely-missing.ckpt");
    let e = err_of(&path);
    assert!(matches!(e, LoadError::Io { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("clip4str-definitely-missing.ckpt"), "{msg}");
    assert!(msg.contains("No such file"), "{msg}");
}

#[test]
fn directory_is_an_io_error() {
    let f = TempFile::new("x");
    assert!(matches!(err_of(f.dir()), LoadError::Io { .. }));
}

#[test]
fn empty_file() {
    let f = TempFile::with_bytes("empty.pt", b"");
    let e = err_of(&f.0);
    assert!(matches!(e, LoadError::Corrupt { .. }), "{e:?}");
    assert!(e.to_string().contains("empty.pt"), "{e}");
    assert!(e.to_string().contains("the file is empty (0 bytes)"), "{e}");
}

#[test]
fn foreign_files_are_unsupported() {
    let mut random = Vec::with_capacity(4096);
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..4096 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        random.push((state >> 24) as u8);
    }
    let cases: [(&str, Vec<u8>, &str); 7] = [
        (
            "notes.ckpt",
            b"just some text\nnot weights\n".to_vec(),
            "a text file",
        ),
        (
            "photo.pt",
            b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01".to_vec(),
            "a JPEG image",
        ),
        ("random.safetensors", random, "unknown binary data"),
        ("page.bin", b"<!DOCTYPE html><html>".to_vec(), "HTML"),
        (
            "lfs.pt",
            b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n".to_vec(),
            "git lfs pull",
        ),
        (
            "legacy.pt",
            b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.\x80\x02".to_vec(),
            "legacy torch.save",
        ),
        (
            "bare.pkl",
            b"\x80\x02}q\x00.".to_vec(),
            "bare Python pickle",
        ),
    ];
    for (name, bytes, expected) in cases {
        let f = TempFile::with_bytes(name, &bytes);
        let e = err_of(&f.0);
        assert!(
            matches!(e, LoadError::UnsupportedFormat { .. }),
            "{name}: {e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(name) && msg.contains(expected),
            "{name}: {msg}"
        );
    }
}

/// Cuts each real checkpoint at many points; every cut must give an error, never a panic.
#[test]
fn truncated_files_are_corrupt() {
    for name in ["tiny.safetensors", "tiny.ckpt", "tiny.pt"] {
        let bytes = std::fs::read(fixture(name)).expect("fixture");
        let n = bytes.len();
        for cut in [5, 9, 100, 4000, n / 3, n / 2, n - 30, n - 1] {
            let f = TempFile::with_bytes(&format!("cut-{cut}-{name}"), &bytes[..cut]);
            let e = err_of(&f.0);
            assert!(
                matches!(
                    e,
                    LoadError::Corrupt { .. } | LoadError::UnsupportedFormat { .. }
                ),
                "{name} cut at {cut}: {e:?}"
            );
            if cut >= 100 {
                assert!(
                    matches!(e, LoadError::Corrupt { .. }),
                    "{name} cut at {cut}: {e}"
                );
                assert!(
                    e.to_string().contains("truncated"),
                    "{name} cut at {cut}: {e}"
                );
            }
        }
    }
}

#[test]
fn damaged_safetensors_header() {
    let bytes = std::fs::read(fixture("tiny.safetensors")).expect("fixture");
    let mut damaged = bytes.clone();
    damaged[20] = b'\x01'; // inside the JSON header
    let f = TempFile::with_bytes("bad-header.safetensors", &damaged);
    let e = err_of(&f.0);
    assert!(e.to_string().contains("not valid JSON"), "{e}");
}

/// A size field of 2^40 (a flipped high byte) is a damaged safetensors file, not "a text file"; eight bytes that
/// read as text before a `{` are still a text file.
#[test]
fn impossible_safetensors_header_size_is_named() {
    let mut bytes = std::fs::read(fixture("tiny.safetensors")).expect("fixture");
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let f = TempFile::with_bytes("huge-header.safetensors", &bytes);
    let e = err_of(&f.0);
    assert!(matches!(e, LoadError::Corrupt { .. }), "{e:?}");
    assert!(
        e.to_string().contains("claims 1099511627776 bytes") && e.to_string().contains("damaged"),
        "{e}"
    );
    let text = TempFile::with_bytes("notes.json", b"{\"a\":1}\n{\"b\": 2}\n");
    let e = err_of(&text.0);
    assert!(e.to_string().contains("looks like a JSON file"), "{e}");
    let text = TempFile::with_bytes("notes.txt", b"weights {not really}\n");
    let e = err_of(&text.0);
    assert!(e.to_string().contains("looks like a text file"), "{e}");
}

#[test]
fn safetensors_round_trip_f32_and_f16() {
    let dev = Device::Cpu;
    let a = Tensor::arange(0f32, 12.0, &dev)
        .and_then(|t| t.reshape((3, 4)))
        .expect("a");
    let a_t = a.t().expect("transpose"); // non-contiguous input
    let b = Tensor::new(&[1.5f32, -2.25, 65504.0, 1e-3], &dev).expect("b");
    let b16 = b.to_dtype(DType::F16).expect("f16");
    let scalar = Tensor::new(4.605f32, &dev).expect("scalar");
    let mut metadata = HashMap::new();
    metadata.insert("source".to_string(), "unit test".to_string());
    metadata.insert(
        HYPER_PARAMETERS_METADATA_KEY.to_string(),
        r#"{"dec_num_heads": 2}"#.to_string(),
    );
    let f = TempFile::new("round.safetensors");
    let tensors = vec![
        ("a".to_string(), a.clone()),
        ("a_t".to_string(), a_t.clone()),
        ("b16".to_string(), b16.clone()),
        ("logit_scale".to_string(), scalar.clone()),
    ];
    save_safetensors(&f.0, &tensors, &metadata).expect("save");
    // Only the final file remains: the temporary file was renamed.
    let entries: Vec<_> = std::fs::read_dir(f.dir()).expect("dir").collect();
    assert_eq!(entries.len(), 1);

    let raw = read(&f.0);
    assert_eq!(raw.format, CheckpointFormat::Safetensors);
    assert_eq!(raw.metadata, metadata);
    assert_eq!(
        raw.hyper_parameters,
        Some(serde_json::json!({"dec_num_heads": 2}))
    );
    assert_eq!(values(raw.get("a").expect("a")), values(&a));
    assert_eq!(raw.get("a_t").map(|t| t.dims().to_vec()), Some(vec![4, 3]));
    assert_eq!(
        values(raw.get("a_t").expect("a_t")),
        values(&a_t.contiguous().expect("c"))
    );
    let b_back = raw.get("b16").expect("b16");
    assert_eq!(b_back.dtype(), DType::F32);
    assert_eq!(
        values(b_back),
        values(&b16.to_dtype(DType::F32).expect("f32"))
    );
    assert_eq!(raw.get("logit_scale").map(|t| t.dims().len()), Some(0));
    assert!(
        raw.notes.iter().any(|n| n.contains("F16")),
        "{:?}",
        raw.notes
    );

    // Overwrite in place with the real tiny model and read it back.
    let tiny = read(&fixture("tiny.safetensors"));
    save_safetensors(&f.0, &tiny.tensors, &tiny.metadata).expect("save tiny");
    let again = read(&f.0);
    assert_eq!(again.tensors.len(), 114);
    for (name, t) in &tiny.tensors {
        assert_eq!(
            values(again.get(name).expect("present")),
            values(t),
            "{name}"
        );
    }
}

#[test]
fn save_rejects_bad_input() {
    let f = TempFile::new("bad.safetensors");
    let t = Tensor::zeros(2, DType::F32, &Device::Cpu).expect("t");
    let dup = vec![("x".to_string(), t.clone()), ("x".to_string(), t)];
    let e = save_safetensors(&f.0, &dup, &HashMap::new()).expect_err("duplicate");
    assert!(e.to_string().contains("appears twice"), "{e}");
    assert!(save_safetensors(&f.0, &[], &HashMap::new()).is_err());
    assert!(!f.0.exists());
    let nowhere = f.dir().join("no-such-dir").join("x.safetensors");
    let one = vec![(
        "x".to_string(),
        Tensor::ones(1, DType::F32, &Device::Cpu).expect("t"),
    )];
    let e = save_safetensors(&nowhere, &one, &HashMap::new()).expect_err("no dir");
    assert!(matches!(e, LoadError::Write { .. }), "{e:?}");
    assert!(e.to_string().contains("x.safetensors"), "{e}");
    assert!(e.to_string().contains("cannot write"), "{e}");
}

#[test]
fn check_tensors_reports_problems() {
    let raw = read(&fixture("tiny.ckpt"));
    let expected = raw.shapes();
    check_tensors(&raw, &expected).expect("a file matches its own shapes");

    let mut wrong_shape = expected.clone();
    let head = wrong_shape
        .iter_mut()
        .find(|(n, _)| n == "visual_decoder.head.weight")
        .expect("head");
    head.1 = vec![95, 64];
    let e = check_tensors(&raw, &wrong_shape).expect_err("shape");
    assert!(
        matches!(e, LoadError::ShapeMismatch { more: 0, .. }),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(msg.ends_with(
        "tiny.ckpt: tensor visual_decoder.head.weight has shape [95, 32], the model expects [95, 64]"
    ), "{msg}");

    let mut missing = expected.clone();
    missing.push(("cross_decoder.extra.weight".to_string(), vec![3, 2]));
    let e = check_tensors(&raw, &missing).expect_err("missing");
    assert!(matches!(e, LoadError::MissingTensor { .. }), "{e:?}");
    assert!(
        e.to_string().contains(
            "tensor cross_decoder.extra.weight is missing (the model expects shape [3, 2])"
        ),
        "{e}"
    );

    let unexpected: Vec<_> = expected.iter().skip(1).cloned().collect();
    let e = check_tensors(&raw, &unexpected).expect_err("unexpected");
    assert!(matches!(e, LoadError::UnexpectedTensor { .. }), "{e:?}");
    assert!(
        e.to_string().contains(
            "tensor clip_model.positional_embedding with shape [77, 32] is not part of the model"
        ),
        "{e}"
    );

    // Several problems: the first is returned, the message counts the rest.
    let mut several: Vec<_> = expected.iter().skip(2).cloned().collect();
    several.push(("new.a".to_string(), vec![1]));
    several[0].1 = vec![1, 2, 3];
    let all = tensor_problems(&raw, &several);
    assert_eq!(all.len(), 4);
    let e = check_tensors(&raw, &several).expect_err("several");
    assert!(
        matches!(e, LoadError::ShapeMismatch { more: 3, .. }),
        "{e:?}"
    );
    assert!(
        e.to_string().ends_with("(and 3 more tensor problems)"),
        "{e}"
    );
}

#[test]
fn var_builder_serves_tensors() {
    let raw = read(&fixture("tiny.pt"));
    let vb = raw.var_builder(DType::F32, &Device::Cpu);
    let w = vb
        .pp("visual_decoder")
        .get((95, 32), "head.weight")
        .expect("head weight");
    assert_eq!(
        values(&w),
        values(raw.get("visual_decoder.head.weight").expect("w"))
    );
}

// ---------------------------------------------------------------------------------------------
// Synthetic torch.save archives, built opcode by opcode (common::Pickler), for layouts the fixtures do not cover.

#[test]
fn nested_model_key_with_module_prefix_f16_and_strides() {
    // {'epoch': 3, 'model': OrderedDict{'module.w': f16[2], 'module.t': f32 view [3,2] strides (1,3)}}
    let mut p = Pickler::default();
    p.op(b"\x80\x02}(").str("epoch").int(3).str("model");
    p.global("collections", "OrderedDict").op(b")R(");
    p.str("module.w")
        .tensor("HalfStorage", "0", 2, 0, &[2], &[1]);
    p.str("module.t")
        .tensor("FloatStorage", "1", 7, 1, &[3, 2], &[1, 3]);
    p.op(b"uu");
    let pickle = p.finish();
    let half: Vec<u8> = [1.5f32, -0.25]
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    let f = write_archive(
        "openclip.bin",
        &[
            ("archive/data.pkl", pickle),
            ("archive/byteorder", b"little".to_vec()),
            ("archive/data/0", half),
            (
                "archive/data/1",
                f32_bytes(&[9.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
            ),
        ],
    );
    let raw = read(&f.0);
    assert_eq!(raw.format, CheckpointFormat::TorchStateDict);
    assert_eq!(raw.stripped_prefix.as_deref(), Some("module."));
    let names: Vec<&str> = raw.tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["w", "t"]);
    let w = raw.get("w").expect("w").to_vec1::<f32>().expect("vec");
    assert_eq!(w, vec![1.5, -0.25]);
    let t = raw.get("t").expect("t").to_vec2::<f32>().expect("vec");
    assert_eq!(t, vec![vec![0.0, 3.0], vec![1.0, 4.0], vec![2.0, 5.0]]);
}

#[test]
fn attribute_dict_hyper_parameters() {
    // Lightning-style dict whose hyper_parameters is a dict subclass built with NEWOBJ.
    let mut p = Pickler::default();
    p.op(b"\x80\x02}(").str("state_dict").op(b"}(");
    p.str("model.x")
        .tensor("FloatStorage", "0", 1, 0, &[1], &[1]);
    p.op(b"u").str("hyper_parameters");
    p.global("lightning_fabric.utilities.data", "AttributeDict")
        .op(b")\x81(");
    p.str("dec_num_heads").int(8).str("charset").str("abc");
    p.str("device")
        .global("torch", "device")
        .str("cpu")
        .op(b"\x85R");
    p.str("odd").global("some.module", "Thing").op(b")\x81");
    p.op(b"u")
        .str("pytorch-lightning_version")
        .str("1.9.5")
        .op(b"u");
    let f = write_archive(
        "lightning.ckpt",
        &[
            ("lightning/data.pkl", p.finish()),
            ("lightning/data/0", f32_bytes(&[7.0])),
        ],
    );
    let raw = read(&f.0);
    assert_eq!(raw.format, CheckpointFormat::LightningCkpt);
    assert_eq!(raw.stripped_prefix.as_deref(), Some("model."));
    assert_eq!(raw.get("x").map(|t| t.dims().to_vec()), Some(vec![1]));
    assert_eq!(
        raw.hyper_parameters,
        Some(serde_json::json!({
            "dec_num_heads": 8, "charset": "abc", "device": "cpu",
            "odd": "<some.module.Thing object>"
        }))
    );
}

#[test]
fn archive_problems() {
    let mut p = Pickler::default();
    p.op(b"\x80\x02}(")
        .str("w")
        .tensor("FloatStorage", "0", 4, 0, &[4], &[1])
        .op(b"u");
    let one_tensor = p.finish();

    // A TorchScript archive whose data.pkl is a dict reads like one module (see init_sources.rs for
    // module trees).
    let torchscript = write_archive(
        "ViT-B-16.pt",
        &[
            ("ViT-B-16/data.pkl", one_tensor.clone()),
            ("ViT-B-16/data/0", f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
            ("ViT-B-16/constants.pkl", b"\x80\x02).".to_vec()),
            ("ViT-B-16/code/__torch__/model.py", b"".to_vec()),
        ],
    );
    let raw = read(&torchscript.0);
    assert_eq!(raw.format, CheckpointFormat::TorchScript);
    assert_eq!(
        raw.get("w").map(values),
        Some(values(
            &Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu).expect("tensor")
        ))
    );

    let npz = write_archive("weights.npz", &[("w.npy", b"\x93NUMPY".to_vec())]);
    let e = err_of(&npz.0);
    assert!(
        e.to_string().contains("without data.pkl") && e.to_string().contains("w.npy"),
        "{e}"
    );

    let no_storage = write_archive("nostorage.pt", &[("a/data.pkl", one_tensor.clone())]);
    let e = err_of(&no_storage.0);
    assert!(matches!(e, LoadError::Corrupt { .. }), "{e:?}");
    assert!(
        e.to_string().contains("tensor w: storage record a/data/0"),
        "{e}"
    );

    let short = write_archive(
        "short.pt",
        &[
            ("a/data.pkl", one_tensor),
            ("a/data/0", f32_bytes(&[1.0, 2.0])),
        ],
    );
    let e = err_of(&short.0);
    assert!(
        e.to_string().contains("holds 8 bytes but 16 are needed"),
        "{e}"
    );

    let mut p = Pickler::default();
    p.op(b"\x80\x02}(")
        .str("epoch")
        .int(1)
        .str("state_dict")
        .op(b"}u");
    let no_tensors = write_archive("empty.ckpt", &[("e/data.pkl", p.finish())]);
    let e = err_of(&no_tensors.0);
    assert!(matches!(e, LoadError::Empty { .. }), "{e:?}");
    assert!(e.to_string().contains("contains no tensors"), "{e}");

    let garbage = write_archive(
        "garbage.pt",
        &[("g/data.pkl", b"\x80\x02\xfe\xfe".to_vec())],
    );
    let e = err_of(&garbage.0);
    assert!(matches!(e, LoadError::Corrupt { .. }), "{e:?}");
    assert!(e.to_string().contains("unknown opcode 0xfe"), "{e}");

    let mut p = Pickler::default();
    p.op(b"\x80\x02}(")
        .str("q")
        .tensor("QInt8Storage", "0", 1, 0, &[1], &[1])
        .op(b"u");
    let quant = write_archive(
        "quant.pt",
        &[("q/data.pkl", p.finish()), ("q/data/0", vec![0])],
    );
    let e = err_of(&quant.0);
    assert!(matches!(e, LoadError::UnsupportedFormat { .. }), "{e:?}");
    assert!(e.to_string().contains("QInt8Storage"), "{e}");
}

/// A checkpoint held in memory, named `file`, with the given tensors.
fn in_memory(file: &str, tensors: Vec<(&str, Tensor)>) -> RawCheckpoint {
    RawCheckpoint {
        path: PathBuf::from(file),
        format: CheckpointFormat::Safetensors,
        tensors: tensors
            .into_iter()
            .map(|(n, t)| (n.to_string(), t))
            .collect(),
        hyper_parameters: None,
        metadata: HashMap::new(),
        stripped_prefix: None,
        notes: Vec::new(),
    }
}

fn vector(values: &[f32]) -> Tensor {
    Tensor::new(values, &Device::Cpu).expect("tensor")
}

#[test]
fn averaging_two_f16_files_is_exact_and_weights_are_normalised() {
    // Values an f16 file can hold, read back as f32 (as read_checkpoint does); the mean of -0 and -0 stays -0.
    let a = vector(&[0.5, -1.25, 3.0e-3, 1000.0, -0.0])
        .to_dtype(DType::F16)
        .and_then(|t| t.to_dtype(DType::F32))
        .expect("round to f16");
    let b = vector(&[0.75, 2.0, -7.0e-3, 999.5, -0.0])
        .to_dtype(DType::F16)
        .and_then(|t| t.to_dtype(DType::F32))
        .expect("round to f16");
    let ones = vector(&[1.0, 1.0]);
    let first = in_memory(
        "a.safetensors",
        vec![("w", a.clone()), ("bias", ones.clone())],
    );
    let second = in_memory(
        "b.safetensors",
        vec![("bias", ones.clone()), ("w", b.clone())],
    );
    let names = vec!["w".to_string(), "bias".to_string()];

    let mean = average_checkpoints(&[first.clone(), second.clone()], &[1.0, 1.0], &names)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mean.len(), 2);
    assert_eq!(mean[0].0, "w");
    let (a, b) = (
        a.to_vec1::<f32>().expect("a"),
        b.to_vec1::<f32>().expect("b"),
    );
    let expected: Vec<u32> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x + y) / 2.0).to_bits())
        .collect();
    assert_eq!(values(&mean[0].1), expected);
    assert_eq!(values(&mean[1].1), values(&ones));

    // Weights 3 : 1 mean 0.75 a + 0.25 b, whatever their scale.
    let skewed = average_checkpoints(&[first, second], &[6.0, 2.0], &names)
        .unwrap_or_else(|e| panic!("{e}"));
    let got = skewed[0].1.to_vec1::<f32>().expect("f32");
    for ((g, x), y) in got.iter().zip(&a).zip(&b) {
        let want = 0.75 * x + 0.25 * y;
        assert!(
            (g - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{g} vs {want}"
        );
    }
}

#[test]
fn averaging_names_the_file_that_does_not_fit() {
    let names = vec!["w".to_string()];
    let first = in_memory("a.safetensors", vec![("w", vector(&[1.0, 2.0]))]);
    let longer = in_memory("long.safetensors", vec![("w", vector(&[1.0, 2.0, 3.0]))]);
    let other = in_memory("other.safetensors", vec![("v", vector(&[1.0, 2.0]))]);

    let err = average_checkpoints(&[first.clone(), longer], &[1.0, 1.0], &names)
        .expect_err("shapes differ");
    assert!(matches!(err, LoadError::ShapeMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("long.safetensors") && msg.contains("[3]"),
        "{msg}"
    );

    let err = average_checkpoints(&[first.clone(), other], &[1.0, 1.0], &names)
        .expect_err("tensor missing");
    assert!(matches!(err, LoadError::MissingTensor { .. }), "{err:?}");
    assert!(err.to_string().contains("other.safetensors"), "{err}");

    for (weights, words) in [
        (vec![1.0], "1 weights for 2 checkpoints"),
        (vec![1.0, -1.0], "not a finite number"),
        (vec![1.0, f64::NAN], "not a finite number"),
        (vec![0.0, 0.0], "all zero"),
    ] {
        let err = average_checkpoints(&[first.clone(), first.clone()], &weights, &names)
            .expect_err("bad weights");
        assert!(err.to_string().contains(words), "{weights:?}: {err}");
    }
    let err = average_checkpoints(&[], &[], &names).expect_err("nothing to average");
    assert!(err.to_string().contains("nothing to average"), "{err}");
}

#[test]
fn a_file_that_does_not_fit_leaves_the_running_average_unchanged() {
    let names = vec!["w".to_string(), "v".to_string()];
    let mut average = WeightedAverage::new(names);
    let good = in_memory(
        "a.safetensors",
        vec![("w", vector(&[2.0, 4.0])), ("v", vector(&[1.0]))],
    );
    // `w` fits, `v` does not: neither may enter the sum.
    let bad = in_memory(
        "bad.safetensors",
        vec![("w", vector(&[100.0, 100.0])), ("v", vector(&[1.0, 1.0]))],
    );
    average.add(&good, 1.0).unwrap_or_else(|e| panic!("{e}"));
    let err = average.add(&bad, 1.0).expect_err("v has another shape");
    assert!(err.to_string().contains("bad.safetensors"), "{err}");
    average.add(&good, 3.0).unwrap_or_else(|e| panic!("{e}"));
    let mean = average.finish().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mean[0].1.to_vec1::<f32>().expect("w"), vec![2.0, 4.0]);
    assert_eq!(mean[1].1.to_vec1::<f32>().expect("v"), vec![1.0]);
}
