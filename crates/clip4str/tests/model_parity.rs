//! Parity of every forward stage with the PyTorch reference on the tiny model (fixtures/tiny_infer.*).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clip4str::charset::CharsetAdapter;
use clip4str::config::Clip4StrConfig;
use clip4str::model::{Clip4Str, ForwardOptions, Trace};
use common::{fixtures, max_abs_diff};

fn load_model(overrides: &[(&str, &Tensor)]) -> Clip4Str {
    let mut weights =
        candle_core::safetensors::load(fixtures().join("tiny.safetensors"), &Device::Cpu)
            .expect("tiny.safetensors");
    for (name, t) in overrides {
        weights.insert(name.to_string(), (*t).clone());
    }
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    Clip4Str::new(&Clip4StrConfig::tiny(), vb).expect("tiny model builds")
}

struct Fixture {
    tensors: HashMap<String, Tensor>,
    json: serde_json::Value,
}

fn fixture() -> Fixture {
    let tensors =
        candle_core::safetensors::load(fixtures().join("tiny_infer.safetensors"), &Device::Cpu)
            .expect("tiny_infer.safetensors");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny_infer.json")).expect("tiny_infer.json"),
    )
    .expect("valid json");
    Fixture { tensors, json }
}

fn ids(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap()
}

/// Compares every stage of `trace` with the fixture tensors of `case`; returns the max diff per stage.
fn compare(fx: &Fixture, case: &str, trace: &Trace) -> Vec<(&'static str, f32)> {
    let get = |name: &str| {
        fx.tensors
            .get(&format!("{case}/{name}"))
            .unwrap_or_else(|| panic!("fixture tensor {case}/{name}"))
    };
    let meta = fx.json["cases"]
        .get(case)
        .or_else(|| fx.json["batches"].get(case))
        .expect("case in json");
    assert_eq!(
        trace.num_ar_steps as u64,
        meta["num_ar_steps"].as_u64().unwrap(),
        "{case}: AR steps"
    );
    let captions = |k: &str| -> Vec<String> {
        meta[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        trace.captions_ar,
        captions("captions_ar"),
        "{case}: captions_ar"
    );
    assert_eq!(
        trace.captions_refine,
        captions("captions_refine"),
        "{case}: captions_refine"
    );
    assert_eq!(
        ids(&trace.text_ids_ar),
        ids(get("text_ids_ar")),
        "{case}: text_ids_ar"
    );
    assert_eq!(
        ids(trace.text_ids_refine.as_ref().unwrap()),
        ids(get("text_ids_refine")),
        "{case}: text_ids_refine"
    );
    let vis_pred = trace.vis_logits.argmax(2).unwrap();
    assert_eq!(
        ids(&vis_pred),
        ids(get("vis_ar_pred_ids")),
        "{case}: vis pred"
    );
    let cross_pred = trace.cross_logits.argmax(2).unwrap();
    assert_eq!(
        ids(&cross_pred),
        ids(get("cross_ar_pred_ids")),
        "{case}: cross pred"
    );

    let stages = vec![
        ("memory", max_abs_diff(&trace.memory, get("memory"))),
        (
            "vis_ar_logits",
            max_abs_diff(&trace.vis_logits, get("vis_ar_logits")),
        ),
        (
            "text_feats_ar",
            max_abs_diff(&trace.text_feats_ar, get("text_feats_ar")),
        ),
        (
            "cross_ar_logits",
            max_abs_diff(&trace.cross_logits, get("cross_ar_logits")),
        ),
        (
            "refine_vis_logits",
            max_abs_diff(
                trace.refine_vis_logits.as_ref().unwrap(),
                get("refine_vis_logits"),
            ),
        ),
        (
            "text_feats_refine",
            max_abs_diff(
                trace.text_feats_refine.as_ref().unwrap(),
                get("text_feats_refine"),
            ),
        ),
        (
            "final_logits",
            max_abs_diff(&trace.final_logits, get("final_logits")),
        ),
    ];
    for (stage, diff) in &stages {
        assert!(*diff <= 1e-4, "{case}: {stage} differs by {diff}");
    }

    // Decoded strings and confidences, as read.py / test.py produce them.
    let probs = candle_nn::ops::softmax_last_dim(&trace.final_logits).unwrap();
    let model_probs = probs.to_vec3::<f32>().unwrap();
    let decoded = meta["decoded"].as_array().unwrap();
    let adapter = CharsetAdapter::new(fx.json["charset_test"].as_str().unwrap());
    for (sample, want) in model_probs.iter().zip(decoded) {
        let flat: Vec<f32> = sample.iter().flatten().copied().collect();
        let tok = clip4str::charset::CharsetTokenizer::new(clip4str::charset::CHARSET_94);
        let got = tok.decode(&flat, 95);
        assert_eq!(
            got.text,
            want["pred_raw"].as_str().unwrap(),
            "{case}: string"
        );
        assert_eq!(
            adapter.apply(&got.text),
            want["pred_charset_test"].as_str().unwrap()
        );
        assert_eq!(got.eos_found, want["eos_found"].as_bool().unwrap());
        let want_conf = want["confidence"].as_f64().unwrap() as f32;
        let conf = got.confidence();
        assert!(
            (conf - want_conf).abs() <= 1e-5,
            "{case}: confidence {conf} vs {want_conf}"
        );
        let want_probs = want["char_probs"].as_array().unwrap();
        assert_eq!(got.char_probs.len(), want_probs.len());
        for (g, w) in got.char_probs.iter().zip(want_probs) {
            assert!((g - w.as_f64().unwrap() as f32).abs() <= 1e-5);
        }
    }
    stages
}

fn report(case: &str, stages: &[(&str, f32)]) {
    let line: Vec<String> = stages.iter().map(|(s, d)| format!("{s}={d:.2e}")).collect();
    eprintln!("{case}: {}", line.join(" "));
}

#[test]
fn single_images_match_reference() {
    let fx = fixture();
    let model = load_model(&[]);
    let adapter = CharsetAdapter::new(fx.json["charset_test"].as_str().unwrap());
    let cases: Vec<String> = fx.json["cases"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(cases.len(), 12);
    let mut worst: HashMap<&str, f32> = HashMap::new();
    for case in &cases {
        let input = &fx.tensors[&format!("{case}/input")];
        let trace = model
            .forward_trace(input, &adapter, &ForwardOptions::default())
            .unwrap();
        let stages = compare(&fx, case, &trace);
        report(case, &stages);
        for (s, d) in stages {
            let w = worst.entry(s).or_insert(0.0);
            *w = w.max(d);
        }
    }
    eprintln!("worst over single images: {worst:?}");
}

#[test]
fn batches_match_reference_including_early_stop() {
    let fx = fixture();
    let model = load_model(&[]);
    let adapter = CharsetAdapter::new(fx.json["charset_test"].as_str().unwrap());
    for batch in ["batch_A_stop17", "batch_B_nostop", "batch_C_stop11"] {
        let input = &fx.tensors[&format!("{batch}/input")];
        let trace = model
            .forward_trace(input, &adapter, &ForwardOptions::default())
            .unwrap();
        let stages = compare(&fx, batch, &trace);
        report(batch, &stages);

        // Validation mode: max_length=7, no early stop.
        let opts = ForwardOptions {
            max_length: Some(7),
            ..ForwardOptions::default()
        };
        let v = model.forward_trace(input, &adapter, &opts).unwrap();
        let d = max_abs_diff(
            &v.final_logits,
            &fx.tensors[&format!("{batch}/final_logits_max_length_7")],
        );
        eprintln!("{batch}: final_logits_max_length_7={d:.2e}");
        assert!(d <= 1e-4, "{batch}: max_length=7 differs by {d}");
    }
}

#[test]
fn edge_case_t1_with_overridden_bias() {
    let fx = fixture();
    let bias = fx.tensors["override/visual_decoder.head.bias"].clone();
    let model = load_model(&[("visual_decoder.head.bias", &bias)]);
    let adapter = CharsetAdapter::new(fx.json["charset_test"].as_str().unwrap());
    let input = &fx.tensors["edge_T1/input"];
    let trace = model
        .forward_trace(input, &adapter, &ForwardOptions::default())
        .unwrap();
    assert_eq!(trace.num_ar_steps, 1);
    let stages = compare(&fx, "edge_T1", &trace);
    report("edge_T1", &stages);
}

#[test]
fn per_sample_stop_makes_batches_equal_single_images() {
    let fx = fixture();
    let model = load_model(&[]);
    let adapter = CharsetAdapter::new(fx.json["charset_test"].as_str().unwrap());
    let opts = ForwardOptions {
        per_sample_stop: true,
        ..ForwardOptions::default()
    };
    for batch in ["batch_A_stop17", "batch_B_nostop", "batch_C_stop11"] {
        let input = &fx.tensors[&format!("{batch}/input")];
        let trace = model.forward_trace(input, &adapter, &opts).unwrap();
        let images = fx.json["batches"][batch]["images"].as_array().unwrap();
        for (i, image) in images.iter().enumerate() {
            let case = image.as_str().unwrap();
            let single = &fx.tensors[&format!("{case}/final_logits")];
            let ours = trace.final_logits.narrow(0, i, 1).unwrap();
            let d = max_abs_diff(&ours, single);
            assert!(
                d <= 1e-4,
                "{batch}[{i}] ({case}): differs from its single run by {d}"
            );
        }
    }
}

/// Per-sample decoding in a batch goes through exactly the arithmetic of batch 1 (each image refined over its
/// own length), so its logits are bit for bit those of each image read alone, in f32 and bf16. This is what lets
/// `read` batch by default without changing a single answer. Refining the whole batch over its longest length
/// (masked) used to differ in the last bits.
#[test]
fn per_sample_stop_is_bit_identical_to_batch_1() {
    let fx = fixture();
    let adapter = CharsetAdapter::new(fx.json["charset_test"].as_str().unwrap());
    let opts = ForwardOptions {
        per_sample_stop: true,
        ..ForwardOptions::default()
    };
    for precision in [clip4str::Precision::F32, clip4str::Precision::Bf16] {
        let model = load_model(&[]).with_mode(clip4str::nn::Mode {
            precision,
            ..Default::default()
        });
        let mut lengths = std::collections::BTreeSet::new();
        for batch in ["batch_A_stop17", "batch_B_nostop", "batch_C_stop11"] {
            let input = &fx.tensors[&format!("{batch}/input")];
            let trace = model.forward_trace(input, &adapter, &opts).unwrap();
            for i in 0..input.dim(0).unwrap() {
                let alone = model
                    .forward_trace(&input.narrow(0, i, 1).unwrap(), &adapter, &opts)
                    .unwrap();
                lengths.insert(alone.num_ar_steps);
                let bits = |t: &Tensor| -> Vec<u32> {
                    t.flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect()
                };
                let t = alone.num_ar_steps;
                let what = format!("{precision:?} {batch}[{i}]");
                let row = |x: &Tensor| x.narrow(0, i, 1).unwrap();
                let pairs = [
                    (
                        "visual AR",
                        row(&trace.vis_logits).narrow(1, 0, t).unwrap(),
                        &alone.vis_logits,
                    ),
                    (
                        "cross AR",
                        row(&trace.cross_logits).narrow(1, 0, t).unwrap(),
                        &alone.cross_logits,
                    ),
                    (
                        "refined visual",
                        row(trace.refine_vis_logits.as_ref().unwrap()),
                        alone.refine_vis_logits.as_ref().unwrap(),
                    ),
                    ("final", row(&trace.final_logits), &alone.final_logits),
                ];
                for (name, ours, want) in pairs {
                    assert_eq!(bits(&ours), bits(want), "{what}: {name} logits");
                }
                assert_eq!(trace.captions_refine[i], alone.captions_refine[0], "{what}");
            }
        }
        // The case worth testing: images of different lengths in one batch.
        assert!(lengths.len() > 2, "{lengths:?}");
    }
}
