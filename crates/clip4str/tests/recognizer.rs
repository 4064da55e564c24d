//! The high-level API: every checkpoint format gives the same outputs; images go through the full path
//! (decode -> Pillow bicubic -> model) exactly like the reference; bad checkpoints are clear errors.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use clip4str::checkpoint::{read_checkpoint, save_safetensors};
use clip4str::preprocess::decode_rgb;
use clip4str::recognizer::{Recognizer, RecognizerOptions};
use common::{fixtures, max_abs};

fn tiny_config() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny_config.json")).unwrap())
        .unwrap()
}

fn infer_fixture() -> (HashMap<String, Tensor>, serde_json::Value) {
    let t = candle_core::safetensors::load(fixtures().join("tiny_infer.safetensors"), &Device::Cpu)
        .unwrap();
    let j =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny_infer.json")).unwrap())
            .unwrap();
    (t, j)
}

fn load(file: &str, with_config: bool) -> Recognizer {
    let cfg = tiny_config();
    Recognizer::from_checkpoint(
        &fixtures().join(file),
        with_config.then_some(&cfg),
        RecognizerOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn all_checkpoint_formats_give_identical_outputs() {
    let (tensors, _) = infer_fixture();
    let batch = &tensors["batch_B_nostop/input"];
    let reference = load("tiny.ckpt", false).trace(batch).unwrap().final_logits;
    for (file, with_config) in [
        ("tiny.safetensors", true),
        ("tiny.pt", true),
        ("tiny.ckpt", true),
    ] {
        let logits = load(file, with_config).trace(batch).unwrap().final_logits;
        let diff = (logits - &reference)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{file} differs from tiny.ckpt");
    }
    // tiny.ckpt carries its head counts; the flat files need the config (their heads break the released rule).
    let clip4str::ModelConfig::Clip4Str(cfg) = load("tiny.ckpt", false).model().config() else {
        panic!("the tiny checkpoint is a CLIP4STR model");
    };
    assert_eq!(cfg.text.heads, 2);
    assert_eq!(cfg.decoder.heads, 2);
}

#[test]
fn photos_through_the_full_path_match_reference() {
    let Some(shared) = common::shared_fixtures(|p| p.join("images").is_dir()) else {
        eprintln!(
            "skipped: ../shared/fixtures/images not found (third-party photos are not in the repo)"
        );
        return;
    };
    let (tensors, json) = infer_fixture();
    let rec = load("tiny.ckpt", false);
    for (case, meta) in json["cases"].as_object().unwrap() {
        let bytes = std::fs::read(shared.join(meta["image_file"].as_str().unwrap())).unwrap();
        let img = decode_rgb(&bytes).unwrap();
        let input = rec.preprocess(&img);
        let want = tensors[&format!("{case}/input")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(input, want, "{case}: preprocessed input is not bit-exact");
        let pred = &rec.recognize(&[img]).unwrap()[0];
        let decoded = &meta["decoded"][0];
        assert_eq!(pred.text, decoded["pred_raw"].as_str().unwrap(), "{case}");
        let conf = decoded["confidence"].as_f64().unwrap() as f32;
        assert!((pred.confidence - conf).abs() <= 1e-5, "{case}");
    }
}

#[test]
fn batched_reading_reproduces_the_reference_batches() {
    let (tensors, json) = infer_fixture();
    let rec = load("tiny.ckpt", false);
    for batch in ["batch_A_stop17", "batch_B_nostop", "batch_C_stop11"] {
        let preds = rec
            .recognize_batch(&tensors[&format!("{batch}/input")])
            .unwrap();
        let want = json["batches"][batch]["decoded"].as_array().unwrap();
        for (p, w) in preds.iter().zip(want) {
            assert_eq!(p.text, w["pred_raw"].as_str().unwrap(), "{batch}");
        }
    }
}

fn tiny_tensors() -> Vec<(String, Tensor)> {
    read_checkpoint(&fixtures().join("tiny.safetensors"))
        .unwrap()
        .tensors
}

fn write_variant(name: &str, tensors: &[(String, Tensor)]) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "clip4str-{}-{name}.safetensors",
        std::process::id()
    ));
    save_safetensors(&path, tensors, &HashMap::new()).unwrap();
    path
}

fn load_error(path: &PathBuf) -> String {
    let cfg = tiny_config();
    let err = Recognizer::from_checkpoint(path, Some(&cfg), RecognizerOptions::default())
        .expect_err("must not load");
    std::fs::remove_file(path).ok();
    err.to_string()
}

#[test]
fn missing_unexpected_and_misshapen_tensors_are_named() {
    let mut t = tiny_tensors();
    t.retain(|(n, _)| n != "cross_decoder.norm.bias");
    let msg = load_error(&write_variant("missing", &t));
    assert!(
        msg.contains("cross_decoder.norm.bias") && msg.contains("missing"),
        "{msg}"
    );

    let mut t = tiny_tensors();
    t.push((
        "cross_decoder.extra".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    ));
    let msg = load_error(&write_variant("unexpected", &t));
    assert!(msg.contains("cross_decoder.extra"), "{msg}");

    let mut t = tiny_tensors();
    for (n, v) in t.iter_mut() {
        if n == "cross_decoder.norm.bias" {
            *v = Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap();
        }
    }
    let msg = load_error(&write_variant("shape", &t));
    assert!(
        msg.contains("cross_decoder.norm.bias") && msg.contains("[7]") && msg.contains("[32]"),
        "{msg}"
    );
}

#[test]
fn recorded_normalization_is_used_unless_overridden() {
    use clip4str::preprocess::Normalization;
    let raw = read_checkpoint(&fixtures().join("tiny.ckpt")).unwrap();
    let dir = std::env::temp_dir().join(format!("clip4str-norm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny_openai.safetensors");
    let mut meta = HashMap::new();
    meta.insert(
        "hyper_parameters".to_string(),
        serde_json::to_string(raw.hyper_parameters.as_ref().unwrap()).unwrap(),
    );
    meta.insert(
        Normalization::METADATA_KEY.to_string(),
        serde_json::to_string(&Normalization::OPENAI).unwrap(),
    );
    save_safetensors(&path, &raw.tensors, &meta).unwrap();

    let image =
        decode_rgb(&std::fs::read(fixtures().join("images/synth_text_L_140x40.png")).unwrap())
            .unwrap();
    let with = |file: &std::path::Path, norm: Option<Normalization>| {
        let rec = Recognizer::from_checkpoint(
            file,
            None,
            RecognizerOptions {
                normalization: norm,
                ..RecognizerOptions::default()
            },
        )
        .unwrap();
        (rec.normalization(), rec.preprocess(&image))
    };
    let (norm, recorded) = with(&path, None);
    assert_eq!(norm, Normalization::OPENAI);
    let (_, explicit) = with(&fixtures().join("tiny.ckpt"), Some(Normalization::OPENAI));
    assert_eq!(recorded, explicit);
    // Released checkpoints carry no such key and keep the reference's test-time 0.5/0.5.
    let (norm, plain) = with(&fixtures().join("tiny.ckpt"), None);
    assert_eq!(norm, Normalization::TEST);
    assert_ne!(plain, recorded);
    let (norm, _) = with(&path, Some(Normalization::TEST));
    assert_eq!(norm, Normalization::TEST);

    // A malformed value is an error naming the file, not a silent fallback.
    meta.insert(Normalization::METADATA_KEY.to_string(), "[1, 2]".into());
    let bad = dir.join("tiny_badnorm.safetensors");
    save_safetensors(&bad, &raw.tensors, &meta).unwrap();
    let err = Recognizer::from_checkpoint(&bad, None, RecognizerOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("tiny_badnorm.safetensors"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// bf16 mode (bf16 linear layers, f32 accumulation) stays within a stated distance of the f32 path: image
/// tokens and first-step visual logits within 2 % of their largest magnitude. Later steps are not
/// compared: on random weights nearly tied argmaxes send the two AR decodings down different paths.
#[test]
fn bf16_mode_stays_close_to_f32() {
    use clip4str::recognizer::Precision;
    let (tensors, _) = infer_fixture();
    let f32_rec = load("tiny.ckpt", false);
    let bf16_rec = Recognizer::from_checkpoint(
        &fixtures().join("tiny.ckpt"),
        None,
        RecognizerOptions {
            precision: Precision::Bf16,
            ..RecognizerOptions::default()
        },
    )
    .unwrap();
    let (mut memory_rel, mut first_step) = (0f32, 0f32);
    for batch in ["batch_A_stop17", "batch_B_nostop", "batch_C_stop11"] {
        let input = &tensors[&format!("{batch}/input")];
        let a = f32_rec.trace(input).unwrap();
        let b = bf16_rec.trace(input).unwrap();
        let diff = max_abs(&(&a.memory - &b.memory).unwrap());
        assert!(
            diff > 0.0,
            "{batch}: bf16 mode did not change the arithmetic"
        );
        memory_rel = memory_rel.max(diff / max_abs(&a.memory));
        let step0 = |t: &Tensor| t.narrow(1, 0, 1).unwrap();
        let logits = step0(&a.vis_logits);
        let gap = max_abs(&(&logits - step0(&b.vis_logits)).unwrap());
        first_step = first_step.max(gap / max_abs(&logits));
    }
    eprintln!("bf16 vs f32, share of the largest magnitude: image tokens {memory_rel:.4}, first-step logits {first_step:.4}");
    assert!(
        memory_rel < 0.02,
        "image tokens differ by {memory_rel} of their range"
    );
    assert!(
        first_step < 0.02,
        "first-step logits differ by {first_step} of their range"
    );
}
