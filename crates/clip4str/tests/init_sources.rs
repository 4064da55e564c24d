//! Initial weights for training: OpenAI TorchScript and OpenCLIP CLIP files, CLIP4STR checkpoints,
//! and the reference's random initialisation, end to end through the model.
//!
//! `tests/fixtures/clip_jit_tiny.pt` and `clip_jit_empty.pt` were written by PyTorch 1.13's
//! `torch.jit.save` (`tests/fixtures/make_clip_jit_tiny.py`); other archives are written here with the
//! same pickle opcodes and zip layout.
#![cfg(feature = "train")]

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use clip4str::checkpoint::{read_checkpoint, CheckpointFormat, LoadError};
use clip4str::config::Clip4StrConfig;
use clip4str::model::Clip4Str;
use clip4str::train::init::{
    clip_weights, config_from_clip, init_weights, initial_weights, InitError, InitSource,
};
use common::{f32_bytes, fixture, write_archive, Pickler, TempFile};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 tensor")
}

fn bits(t: &Tensor) -> Vec<u32> {
    values(t).into_iter().map(f32::to_bits).collect()
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// The fixture generator's values: `((i + h) % 251 - 125) / 128`, `h` = byte sum of the name % 251.
fn pattern(name: &str, numel: usize) -> Vec<f32> {
    let h = name.bytes().map(usize::from).sum::<usize>() % 251;
    (0..numel)
        .map(|i| ((((i + h) % 251) as f64 - 125.0) / 128.0) as f32)
        .collect()
}

/// `torch.save(state_dict)` of `tensors` (f32), optionally prefixed and nested like OpenCLIP and
/// DDP checkpoints.
fn write_state_dict(
    file: &str,
    tensors: &[(String, Tensor)],
    prefix: &str,
    nest_under: Option<&str>,
) -> TempFile {
    let mut p = Pickler::requiring_grad();
    p.op(b"\x80\x02}(");
    if let Some(key) = nest_under {
        p.str("epoch").int(32).str(key).op(b"}(");
    }
    let mut entries = Vec::new();
    for (i, (name, t)) in tensors.iter().enumerate() {
        let shape = t.dims().to_vec();
        let v = values(t);
        p.str(&format!("{prefix}{name}")).tensor(
            "FloatStorage",
            &i.to_string(),
            v.len(),
            0,
            &shape,
            &contiguous_strides(&shape),
        );
        entries.push((format!("archive/data/{i}"), f32_bytes(&v)));
    }
    p.op(b"u");
    if nest_under.is_some() {
        p.op(b"u");
    }
    entries.push(("archive/data.pkl".to_string(), p.finish()));
    entries.push(("archive/version".to_string(), b"3\n".to_vec()));
    write_archive(file, &entries)
}

fn jit_clip() -> Vec<(String, Tensor)> {
    clip_weights(&fixture("clip_jit_tiny.pt")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn openai_torchscript_archive_is_read_completely() {
    let path = fixture("clip_jit_tiny.pt");
    let raw = read_checkpoint(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(raw.format, CheckpointFormat::TorchScript);
    assert_eq!(
        raw.tensors.len(),
        65,
        "every parameter and buffer of the module tree"
    );
    let scalar = |name: &str| values(raw.get(name).expect(name));
    assert_eq!(scalar("input_resolution"), vec![32.0]);
    assert_eq!(scalar("context_length"), vec![77.0]);
    assert_eq!(scalar("vocab_size"), vec![64.0]);
    for (name, t) in &raw.tensors {
        if ["input_resolution", "context_length", "vocab_size"].contains(&name.as_str()) {
            continue;
        }
        // fp16 and fp32 storages both come back exactly.
        assert_eq!(values(t), pattern(name, t.elem_count()), "{name}");
    }
    let shape = |name: &str| raw.get(name).expect(name).dims().to_vec();
    assert_eq!(shape("visual.conv1.weight"), vec![32, 3, 8, 8]);
    assert_eq!(
        shape("visual.transformer.resblocks.1.attn.in_proj_weight"),
        vec![96, 32]
    );
    assert_eq!(
        shape("transformer.resblocks.1.mlp.c_proj.weight"),
        vec![16, 64]
    );
    assert_eq!(shape("positional_embedding"), vec![77, 16]);
    assert_eq!(shape("logit_scale"), Vec::<usize>::new());
    assert!(
        raw.notes.iter().any(|n| n.contains("HalfStorage")),
        "{:?}",
        raw.notes
    );

    let clip = jit_clip();
    assert_eq!(clip.len(), 62, "the three JIT-only buffers are dropped");
    assert!(clip.iter().all(|(n, _)| n.starts_with("clip_model.")));
    assert!(!clip.iter().any(|(n, _)| n.ends_with("input_resolution")
        || n == "clip_model.context_length"
        || n == "clip_model.vocab_size"));
    let text_proj = &clip
        .iter()
        .find(|(n, _)| n == "clip_model.text_projection")
        .expect("text_projection")
        .1;
    assert_eq!(text_proj.dtype(), DType::F32);
    assert_eq!(values(text_proj), pattern("text_projection", 256));

    // The recovered names and shapes are exactly what a CLIP4STR model of that size loads.
    let cfg = config_from_clip(&clip, &Clip4StrConfig::tiny()).unwrap_or_else(|e| panic!("{e}"));
    let mut want: Vec<(String, Vec<usize>)> = Clip4Str::expected_tensors(&cfg)
        .expect("expected")
        .into_iter()
        .filter(|(n, _)| n.starts_with("clip_model."))
        .collect();
    let mut got: Vec<(String, Vec<usize>)> = clip
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
}

#[test]
fn config_inferred_from_clip_weights() {
    let cfg =
        config_from_clip(&jit_clip(), &Clip4StrConfig::tiny()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.vision.width, 32);
    assert_eq!(cfg.vision.layers, 2);
    assert_eq!(cfg.vision.patch_size, [8, 8]);
    assert_eq!(cfg.vision.image_size, [32, 32]);
    // 32 and 16 are not multiples of 64: the base's 2 heads divide them.
    assert_eq!(cfg.vision.heads, 2);
    assert_eq!(cfg.text.heads, 2);
    assert_eq!(cfg.text.width, 16);
    assert_eq!(cfg.text.layers, 2);
    assert_eq!(cfg.text.vocab_size, 64);
    assert_eq!(cfg.text.positional_rows, 77);
    assert_eq!(cfg.embed_dim, 16);
    assert_eq!(cfg.decoder.dim, 16);
    assert_eq!(cfg.decoder.heads, 8);
    assert_eq!(cfg.decoder.mlp_hidden, 64);
    assert_eq!(cfg.context_length, 16);

    let mut base = Clip4StrConfig::tiny();
    base.vision.heads = 3;
    let err = config_from_clip(&jit_clip(), &base).unwrap_err();
    assert!(err.to_string().contains("vision width 32"), "{err}");
    let no_conv: Vec<(String, Tensor)> = jit_clip()
        .into_iter()
        .filter(|(n, _)| !n.contains("conv1"))
        .collect();
    let err = config_from_clip(&no_conv, &Clip4StrConfig::tiny()).unwrap_err();
    assert!(
        err.to_string().contains("clip_model.visual.conv1.weight"),
        "{err}"
    );
}

#[test]
fn torchscript_archive_without_tensors_is_an_error() {
    // Written by torch.jit.save: a scripted module whose only attributes are `training` and an int.
    let path = fixture("clip_jit_empty.pt");
    let err = read_checkpoint(&path).unwrap_err();
    assert!(matches!(err, LoadError::Empty { .. }), "{err:?}");
    assert!(err.to_string().contains("clip_jit_empty.pt"), "{err}");
    assert!(matches!(clip_weights(&path), Err(LoadError::Empty { .. })));

    // The same from a module tree with submodules but no tensor anywhere.
    let mut p = Pickler::requiring_grad();
    p.op(b"\x80\x02")
        .module_start("__torch__.model.Multimodal", 0);
    p.str("training").op(b"\x89").str("visual");
    p.module_start("__torch__.model.VisualTransformer", 1)
        .str("training")
        .op(b"\x89")
        .str("bias")
        .op(b"N")
        .module_end();
    p.module_end();
    let archive = write_archive(
        "ViT-B-16.pt",
        &[
            ("ViT-B-16/data.pkl", p.finish()),
            ("ViT-B-16/constants.pkl", b"\x80\x02).".to_vec()),
            ("ViT-B-16/code/__torch__/model.py", b"".to_vec()),
            ("ViT-B-16/version", b"3\n".to_vec()),
        ],
    );
    let err = read_checkpoint(&archive.0).unwrap_err();
    assert!(matches!(err, LoadError::Empty { .. }), "{err:?}");

    // Only a JIT-only buffer: readable, but no CLIP weight at all.
    let mut p = Pickler::requiring_grad();
    p.op(b"\x80\x02")
        .module_start("__torch__.model.Multimodal", 0)
        .str("input_resolution")
        .tensor("LongStorage", "0", 1, 0, &[], &[])
        .module_end();
    let buffers_only = write_archive(
        "RN50.pt",
        &[
            ("RN50/data.pkl", p.finish()),
            ("RN50/data/0", 224i64.to_le_bytes().to_vec()),
            ("RN50/constants.pkl", b"\x80\x02).".to_vec()),
        ],
    );
    assert_eq!(
        read_checkpoint(&buffers_only.0)
            .expect("read")
            .tensors
            .len(),
        1
    );
    let err = clip_weights(&buffers_only.0).unwrap_err();
    assert!(matches!(err, LoadError::Empty { .. }), "{err:?}");

    let err = initial_weights(
        &InitSource::Clip {
            path: archive.0.clone(),
            seed: 0,
        },
        &Clip4StrConfig::tiny(),
    )
    .unwrap_err();
    assert!(
        matches!(err, InitError::Load(LoadError::Empty { .. })),
        "{err:?}"
    );
}

#[test]
fn torchscript_layout_written_here() {
    // Multimodal { training, visual: VisualTransformer { conv1: Conv2d { weight, bias: None },
    // proj (a transposed view), shared: <conv1 again, memoised> }, token_embedding: Embedding
    // { weight }, text_projection, logit_scale, input_resolution (int64), parent: <the root> }
    let mut p = Pickler::requiring_grad();
    p.op(b"\x80\x02").module_start(
        "__torch__.multimodal.model.multimodal_transformer.Multimodal",
        0,
    );
    p.str("training").op(b"\x89");
    p.str("visual").module_start(
        "__torch__.multimodal.model.multimodal_transformer.___torch_mangle_3.VisualTransformer",
        1,
    );
    p.str("conv1")
        .module_start("__torch__.torch.nn.modules.conv.Conv2d", 2)
        .str("weight")
        .tensor(
            "HalfStorage",
            "0",
            2 * 3 * 2 * 2,
            0,
            &[2, 3, 2, 2],
            &[12, 4, 2, 1],
        )
        .str("bias")
        .op(b"N")
        .str("training")
        .op(b"\x89")
        .module_end();
    // proj [2, 3] stored as the transpose of a [3, 2] storage.
    p.str("proj")
        .tensor("FloatStorage", "1", 6, 0, &[2, 3], &[1, 2]);
    p.str("shared").op(b"h\x02");
    p.module_end();
    p.str("token_embedding")
        .module_start("__torch__.torch.nn.modules.sparse.Embedding", 3)
        .str("weight")
        .tensor("FloatStorage", "2", 8, 0, &[4, 2], &[2, 1])
        .module_end();
    // text_projection shares storage 2 at an offset (like a tied weight view).
    p.str("text_projection")
        .tensor("FloatStorage", "2", 8, 4, &[2, 2], &[2, 1]);
    p.str("logit_scale")
        .tensor("FloatStorage", "3", 1, 0, &[], &[]);
    p.str("input_resolution")
        .tensor("LongStorage", "4", 1, 0, &[], &[]);
    p.str("parent").op(b"h\x00");
    p.module_end();

    let half: Vec<u8> = (0..24)
        .flat_map(|i| half::f16::from_f32(i as f32 * 0.5).to_le_bytes())
        .collect();
    let archive = write_archive(
        "ViT-X.pt",
        &[
            ("ViT-X/data.pkl", p.finish()),
            ("ViT-X/data/0", half),
            ("ViT-X/data/1", f32_bytes(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0])),
            (
                "ViT-X/data/2",
                f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]),
            ),
            ("ViT-X/data/3", f32_bytes(&[4.6052])),
            ("ViT-X/data/4", 224i64.to_le_bytes().to_vec()),
            ("ViT-X/constants.pkl", b"\x80\x02).".to_vec()),
            ("ViT-X/code/__torch__/multimodal.py", b"".to_vec()),
            ("ViT-X/version", b"3\n".to_vec()),
        ],
    );
    let raw = read_checkpoint(&archive.0).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(raw.format, CheckpointFormat::TorchScript);
    let names: Vec<&str> = raw.tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "visual.conv1.weight",
            "visual.proj",
            "visual.shared.weight",
            "token_embedding.weight",
            "text_projection",
            "logit_scale",
            "input_resolution",
        ]
    );
    let get = |n: &str| values(raw.get(n).expect(n));
    let conv: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
    assert_eq!(get("visual.conv1.weight"), conv);
    assert_eq!(get("visual.shared.weight"), conv);
    assert_eq!(get("visual.proj"), vec![0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
    assert_eq!(get("text_projection"), vec![5.0, 6.0, 7.0, 8.0]);
    assert_eq!(get("input_resolution"), vec![224.0]);
    assert!(raw
        .notes
        .iter()
        .any(|n| n.contains("multimodal_transformer.Multimodal")));

    let clip = clip_weights(&archive.0).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = clip.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "clip_model.visual.conv1.weight",
            "clip_model.visual.proj",
            "clip_model.visual.shared.weight",
            "clip_model.token_embedding.weight",
            "clip_model.text_projection",
            "clip_model.logit_scale",
        ]
    );
}

#[test]
fn openclip_state_dicts_map_to_the_same_names() {
    let reference = jit_clip();
    let openai_names: Vec<(String, Tensor)> = reference
        .iter()
        .map(|(n, t)| (n.trim_start_matches("clip_model.").to_string(), t.clone()))
        .collect();
    let plain = write_state_dict("open_clip_pytorch_model.bin", &openai_names, "", None);
    let ddp = write_state_dict("epoch_32.pt", &openai_names, "module.", Some("state_dict"));
    for file in [&plain, &ddp] {
        let got = clip_weights(&file.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.len(), reference.len());
        for ((gn, gt), (rn, rt)) in got.iter().zip(&reference) {
            assert_eq!(gn, rn);
            assert_eq!(gt.dims(), rt.dims(), "{gn}");
            assert_eq!(bits(gt), bits(rt), "{gn}");
        }
    }
    let raw = read_checkpoint(&ddp.0).expect("read");
    assert_eq!(raw.stripped_prefix.as_deref(), Some("module."));

    // A dict without CLIP weights is refused with a reason.
    let other = write_state_dict("weights.bin", &openai_names[..1], "", None);
    let err = clip_weights(&other.0).unwrap_err();
    assert!(matches!(err, LoadError::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("not a CLIP ViT model"), "{err}");
}

#[test]
fn clip_source_keeps_clip_and_draws_decoders() {
    let path = fixture("clip_jit_tiny.pt");
    let clip = jit_clip();
    let cfg = config_from_clip(&clip, &Clip4StrConfig::tiny()).unwrap_or_else(|e| panic!("{e}"));
    let weights = initial_weights(
        &InitSource::Clip {
            path: path.clone(),
            seed: 5,
        },
        &cfg,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let expected = Clip4Str::expected_tensors(&cfg).expect("expected");
    let names: Vec<&String> = weights.iter().map(|(n, _)| n).collect();
    let want: Vec<&String> = expected.iter().map(|(n, _)| n).collect();
    assert_eq!(names, want);

    let clip: HashMap<String, Tensor> = clip.into_iter().collect();
    let scratch: HashMap<String, Tensor> =
        init_weights(&cfg, 5).expect("init").into_iter().collect();
    for (name, t) in &weights {
        let source = clip.get(name).unwrap_or_else(|| &scratch[name]);
        assert_eq!(bits(t), bits(source), "{name}");
    }

    // A configuration the file does not fit: the error names the file and a tensor.
    let err = initial_weights(
        &InitSource::Clip {
            path: path.clone(),
            seed: 5,
        },
        &Clip4StrConfig::tiny(),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("clip_jit_tiny.pt") && msg.contains("clip_model."),
        "{msg}"
    );
}

#[test]
fn model_on_openclip_weights_with_random_decoders_runs() {
    // The fixture's CLIP with the full BPE vocabulary (the captions use ids up to 49407), saved
    // as an OpenCLIP state dict.
    let clip: Vec<(String, Tensor)> = jit_clip()
        .into_iter()
        .map(|(n, t)| {
            let t = if n == "clip_model.token_embedding.weight" {
                Tensor::randn(0f32, 0.02, (49408, 16), &Device::Cpu).expect("embedding")
            } else {
                t
            };
            (n.trim_start_matches("clip_model.").to_string(), t)
        })
        .collect();
    let bin = write_state_dict("open_clip_pytorch_model.bin", &clip, "", None);
    let read = clip_weights(&bin.0).unwrap_or_else(|e| panic!("{e}"));
    let cfg = config_from_clip(&read, &Clip4StrConfig::tiny()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.text.vocab_size, 49408);
    let weights = initial_weights(
        &InitSource::Clip {
            path: bin.0.clone(),
            seed: 9,
        },
        &cfg,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let vb = candle_nn::VarBuilder::from_tensors(
        weights.into_iter().collect(),
        DType::F32,
        &Device::Cpu,
    );
    let model = Clip4Str::new(&cfg, vb).expect("model");
    let images = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).expect("images");
    let adapter = clip4str::charset::CharsetAdapter::new(&cfg.charset_test);
    let logits = model.forward(&images, &adapter).expect("forward");
    assert_eq!(logits.dim(0).expect("batch"), 2);
    assert!(values(&logits).iter().all(|x| x.is_finite()));
}

#[test]
fn clip4str_source_reproduces_the_checkpoint() {
    let path = fixture("tiny.safetensors");
    let cfg = Clip4StrConfig::tiny();
    let weights = initial_weights(&InitSource::Clip4Str(path.clone()), &cfg)
        .unwrap_or_else(|e| panic!("{e}"));
    let raw = read_checkpoint(&path).expect("read");
    let expected = Clip4Str::expected_tensors(&cfg).expect("expected");
    assert_eq!(weights.len(), expected.len());
    for ((name, t), (want_name, _)) in weights.iter().zip(&expected) {
        assert_eq!(name, want_name);
        assert_eq!(bits(t), bits(raw.get(name).expect("in file")), "{name}");
    }

    let err = initial_weights(
        &InitSource::Clip4Str(path.clone()),
        &Clip4StrConfig::base16(),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("tiny.safetensors") && msg.contains("tensor "),
        "{msg}"
    );

    // The backbone of a CLIP4STR checkpoint is usable as a CLIP source.
    let clip = clip_weights(&path).expect("clip part");
    assert!(!clip.is_empty() && clip.iter().all(|(n, _)| n.starts_with("clip_model.")));
    assert_eq!(
        clip.len(),
        expected
            .iter()
            .filter(|(n, _)| n.starts_with("clip_model."))
            .count()
    );

    let missing =
        initial_weights(&InitSource::Clip4Str(fixture("no-such-file.ckpt")), &cfg).unwrap_err();
    assert!(
        matches!(missing, InitError::Load(LoadError::Io { .. })),
        "{missing:?}"
    );
}
