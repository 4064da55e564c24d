//! Parity of the STRAdapter family with the PyTorch reference (fixtures/peft, five adapter types): the memory
//! after the adapter, the side network's output before its gate, the AR and refined logits, and the decoded
//! strings and confidences, for 12 single images and a batch of 4.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clip4str::str_adapter::{AdapterType, StrAdapter, StrAdapterConfig};
use common::{fixtures, max_abs_diff};

struct Fixture {
    tensors: HashMap<String, Tensor>,
    infer: serde_json::Value,
    peft: serde_json::Value,
}

fn load_json(name: &str) -> serde_json::Value {
    let path = fixtures().join("peft").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("peft json")).expect("valid json")
}

fn fixture() -> Fixture {
    Fixture {
        tensors: candle_core::safetensors::load(
            fixtures().join("peft/peft_infer.safetensors"),
            &Device::Cpu,
        )
        .expect("peft_infer.safetensors"),
        infer: load_json("peft_infer.json"),
        peft: load_json("peft.json"),
    }
}

/// The reference state dict of `kind`: the tiny model's CLIP and the type's own tensors; the config from their
/// shapes and the checkpoint's hyper-parameters.
fn load(kind: AdapterType, fx: &Fixture) -> StrAdapter {
    let mut weights =
        candle_core::safetensors::load(fixtures().join("tiny.safetensors"), &Device::Cpu)
            .expect("tiny.safetensors");
    weights.retain(|name, _| name.starts_with("clip_model."));
    let own = candle_core::safetensors::load(
        fixtures().join(format!("peft/{}.safetensors", kind.name())),
        &Device::Cpu,
    )
    .expect("type weights");
    weights.extend(own);
    let shapes: Vec<(String, Vec<usize>)> = weights
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    let hparams = &fx.peft["types"][kind.name()]["hyper_parameters"];
    let cfg = StrAdapterConfig::from_tensors(&shapes, Some(hparams)).expect("config");
    assert_eq!(cfg.adapter, kind);
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    StrAdapter::new(&cfg, vb).expect("model builds")
}

fn input(fx: &Fixture, case: &str) -> Tensor {
    if case == "batch4" {
        let names = fx.infer["batches"]["batch4"]
            .as_array()
            .expect("batch4 images");
        let parts: Vec<Tensor> = names
            .iter()
            .map(|n| fx.tensors[&format!("{}/input", n.as_str().unwrap())].clone())
            .collect();
        Tensor::cat(&parts, 0).expect("batch")
    } else {
        fx.tensors[&format!("{case}/input")].clone()
    }
}

#[test]
fn every_adapter_type_matches_the_reference() {
    let fx = fixture();
    let mut cases: Vec<String> = fx.infer["cases"]
        .as_object()
        .expect("cases")
        .keys()
        .cloned()
        .collect();
    cases.push("batch4".into());
    let mut worst = HashMap::new();
    for kind in AdapterType::ALL {
        let model = load(kind, &fx);
        let meta = &fx.infer["types"][kind.name()];
        for case in &cases {
            let x = input(&fx, case);
            let key = |q: &str| format!("{}/{case}/{q}", kind.name());
            let memory = model.encode(&x).expect("encode");
            let mut check = |what: &str, got: &Tensor, want: &Tensor, tol: f32| {
                let d = max_abs_diff(got, want);
                assert!(d <= tol, "{} {case} {what}: off by {d}", kind.name());
                let w = worst.entry((kind.name(), what.to_string())).or_insert(0f32);
                *w = w.max(d);
            };
            check("memory", &memory, &fx.tensors[&key("memory")], 1e-4);
            if let Some(want) = fx.tensors.get(&key("debug/side_output_before_mix")) {
                let side = model.side_output(&x).expect("side").expect("a ladder");
                check("side output", &side, want, 1e-4);
            }
            let (ar, refined) = model.forward(&x).expect("forward");
            check("AR logits", &ar, &fx.tensors[&key("ar_logits")], 1e-4);
            check("logits", &refined, &fx.tensors[&key("logits")], 1e-4);
            let decoded =
                clip4str::decoding::decode_logits(&model.tokenizer, &refined).expect("decode");
            let want = if case == "batch4" {
                &meta["batches"]["batch4"]["decoded"]
            } else {
                &meta["cases"][case.as_str()]["decoded"]
            };
            let want = want.as_array().expect("decoded");
            assert_eq!(decoded.len(), want.len());
            for (got, want) in decoded.iter().zip(want) {
                assert_eq!(
                    got.text,
                    want["pred_raw"].as_str().unwrap(),
                    "{} {case}",
                    kind.name()
                );
                let conf = want["confidence"].as_f64().unwrap() as f32;
                assert!(
                    (got.confidence() - conf).abs() <= 1e-5,
                    "{} {case}: confidence {} vs {conf}",
                    kind.name(),
                    got.confidence()
                );
            }
        }
    }
    let mut worst: Vec<_> = worst.into_iter().collect();
    worst.sort_by(|a, b| a.0.cmp(&b.0));
    for ((kind, what), d) in worst {
        eprintln!("{kind:>15} {what:<12} max |diff| {d:.2e}");
    }
}

/// The adapter type comes from the tensor names when the hyper-parameters do not say it, and hyper-parameters
/// that contradict the file are refused with the reason.
#[test]
fn adapter_type_from_names_and_contradictions_refused() {
    let fx = fixture();
    for kind in AdapterType::ALL {
        let mut names: Vec<(String, Vec<usize>)> =
            candle_core::safetensors::load(fixtures().join("tiny.safetensors"), &Device::Cpu)
                .expect("tiny")
                .into_iter()
                .filter(|(n, _)| n.starts_with("clip_model."))
                .chain(
                    candle_core::safetensors::load(
                        fixtures().join(format!("peft/{}.safetensors", kind.name())),
                        &Device::Cpu,
                    )
                    .expect("type weights"),
                )
                .map(|(n, t)| (n, t.dims().to_vec()))
                .collect();
        names.sort();
        let mut hparams = fx.peft["types"][kind.name()]["hyper_parameters"].clone();
        let full = hparams.clone();
        hparams.as_object_mut().unwrap().remove("adapter_type");
        let cfg = StrAdapterConfig::from_tensors(&names, Some(&hparams)).expect("config");
        assert_eq!(cfg.adapter, kind, "{}", kind.name());
        if matches!(
            kind,
            AdapterType::Ladder | AdapterType::LinearLadder | AdapterType::LadderPruning
        ) {
            let mut wrong = full;
            wrong["block_ids"] = serde_json::json!([0, 1, 1]);
            let err = StrAdapterConfig::from_tensors(&names, Some(&wrong)).unwrap_err();
            assert!(err.to_string().contains("side blocks"), "{err}");
        }
    }
}

/// `ladder_pruning`'s side network as the reference builds it from CLIP (pruned by L1 norm, SPEC §16): the
/// fixture file holds exactly the construction-time values (only `alpha` was changed after), so every derived
/// tensor must be bit-identical; `ln_post` and `proj` are CLIP's.
#[test]
fn ladder_pruning_side_network_is_derived_from_clip_exactly() {
    let fx = fixture();
    let clip = candle_core::safetensors::load(fixtures().join("tiny.safetensors"), &Device::Cpu)
        .expect("tiny");
    let file = candle_core::safetensors::load(
        fixtures().join("peft/ladder_pruning.safetensors"),
        &Device::Cpu,
    )
    .expect("ladder_pruning");
    let model = load(AdapterType::LadderPruning, &fx);
    let derived = clip4str::str_adapter::ladder_init(&clip, model.config()).expect("init");
    let mut checked = 0;
    for (name, t) in derived {
        if name == "adapter.alpha" {
            assert_eq!(t.to_vec1::<f32>().unwrap(), vec![0.0; 2]);
            continue;
        }
        let want = &file[&name];
        assert_eq!(t.dims(), want.dims(), "{name}");
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name}"
        );
        checked += 1;
    }
    // ln_post (2) + proj + 2 blocks x 12 tensors.
    assert_eq!(checked, 27);
}

/// A complete STRAdapter file (CLIP and the adapter's tensors, hyper-parameters in the safetensors metadata)
/// loads through the family dispatch like any checkpoint and reads the fixture images as the reference does:
/// raw strings, the charset_test strings and confidences.
#[test]
fn a_complete_file_reads_through_the_recognizer() {
    use clip4str::checkpoint::{save_safetensors, HYPER_PARAMETERS_METADATA_KEY};
    use clip4str::recognizer::{Recognizer, RecognizerOptions};
    let fx = fixture();
    let dir = common::temp_dir("str_adapter_files");
    for kind in [AdapterType::Linear, AdapterType::LadderPruning] {
        let mut tensors: Vec<(String, Tensor)> =
            candle_core::safetensors::load(fixtures().join("tiny.safetensors"), &Device::Cpu)
                .expect("tiny")
                .into_iter()
                .filter(|(n, _)| n.starts_with("clip_model."))
                .collect();
        tensors.extend(
            candle_core::safetensors::load(
                fixtures().join(format!("peft/{}.safetensors", kind.name())),
                &Device::Cpu,
            )
            .expect("type weights"),
        );
        let hparams = fx.peft["types"][kind.name()]["hyper_parameters"].to_string();
        let metadata = HashMap::from([(HYPER_PARAMETERS_METADATA_KEY.to_string(), hparams)]);
        let path = dir.join(format!("{}.safetensors", kind.name()));
        save_safetensors(&path, &tensors, &metadata).expect("save");
        let opts = RecognizerOptions {
            filter_output: true,
            ..RecognizerOptions::default()
        };
        let rec = Recognizer::from_checkpoint(&path, None, opts.clone())
            .unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
        // Without hyper-parameters the head count is unknown (the default 12 does not divide 32): an error
        // naming the file, until a --config gives what the shapes cannot tell.
        let bare = dir.join(format!("{}-bare.safetensors", kind.name()));
        save_safetensors(&bare, &tensors, &HashMap::new()).expect("save");
        let err = Recognizer::from_checkpoint(&bare, None, opts.clone()).unwrap_err();
        assert!(
            err.to_string().contains("bare.safetensors") && err.to_string().contains("heads"),
            "{err}"
        );
        let hp = &fx.peft["types"][kind.name()]["hyper_parameters"];
        let config = serde_json::json!({"hyper_parameters": {
            "dec_num_heads": hp["dec_num_heads"],
            "block_ids": hp["block_ids"],
            "prune_reduction": hp["prune_reduction"],
            "img_size": hp["img_size"],
        }});
        Recognizer::from_checkpoint(&bare, Some(&config), opts.clone()).expect("with --config");
        assert_eq!(rec.model().family().name(), "STRAdapter");
        let cases = fx.infer["cases"].as_object().expect("cases");
        for (case, _) in cases {
            let preds = rec
                .recognize_batch(&fx.tensors[&format!("{case}/input")])
                .expect("read");
            let want = &fx.infer["types"][kind.name()]["cases"][case]["decoded"][0];
            assert_eq!(preds[0].raw, want["pred_raw"].as_str().unwrap(), "{case}");
            assert_eq!(
                preds[0].text,
                want["pred_charset_test"].as_str().unwrap(),
                "{case}"
            );
            let conf = want["confidence"].as_f64().unwrap() as f32;
            assert!((preds[0].confidence - conf).abs() <= 1e-5, "{case}");
        }
    }
}

/// One training step of every adapter type against the reference (fixtures/peft/peft_train, dropout off, fixed
/// permutations): the memory after the adapter, each permutation's logits and target count, the loss, the
/// gradient of every trainable tensor, the total gradient norm and the clip coefficient.
#[cfg(feature = "train")]
#[test]
fn one_training_step_matches_the_reference() {
    use candle_core::Var;
    use clip4str::train::{
        clip_grad_norm, str_adapter_groups, str_adapter_loss, AdamW, AdamWConfig, OptimizerConfig,
    };
    let fx = fixture();
    let train = candle_core::safetensors::load(
        fixtures().join("peft/peft_train.safetensors"),
        &Device::Cpu,
    )
    .expect("peft_train");
    let meta = load_json("peft_train.json");
    let labels: Vec<String> = meta["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let perms: Vec<Vec<usize>> = meta["perms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect()
        })
        .collect();
    let images = &train["train/images"];
    for kind in AdapterType::ALL {
        let name = kind.name();
        let want = &meta["types"][name];
        // Every non-CLIP tensor as a Var (the trainable ones), CLIP as constants.
        let mut weights =
            candle_core::safetensors::load(fixtures().join("tiny.safetensors"), &Device::Cpu)
                .expect("tiny");
        weights.retain(|n, _| n.starts_with("clip_model."));
        let own = candle_core::safetensors::load(
            fixtures().join(format!("peft/{name}.safetensors")),
            &Device::Cpu,
        )
        .expect("type weights");
        let vars: Vec<(String, Var)> = own
            .into_iter()
            .map(|(n, t)| (n, Var::from_tensor(&t).expect("var")))
            .collect();
        for (n, v) in &vars {
            weights.insert(n.clone(), v.as_tensor().clone());
        }
        let shapes: Vec<(String, Vec<usize>)> = weights
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        let cfg = StrAdapterConfig::from_tensors(
            &shapes,
            Some(&fx.peft["types"][name]["hyper_parameters"]),
        )
        .expect("config");
        let model = StrAdapter::new(
            &cfg,
            VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        )
        .expect("model");
        let out = str_adapter_loss(&model, images, &labels, &perms, false).expect("loss");
        let d = max_abs_diff(&out.memory, &train[&format!("{name}/memory")]);
        assert!(d < 1e-4, "{name} memory off by {d}");
        for (i, ((n, ce, logits), want_perm)) in out
            .perms
            .iter()
            .zip(want["per_perm"].as_array().unwrap())
            .enumerate()
        {
            assert_eq!(
                *n as u64,
                want_perm["n"].as_u64().unwrap(),
                "{name} perm {i}"
            );
            let want_ce = want_perm["ce"].as_f64().unwrap() as f32;
            assert!(
                (ce - want_ce).abs() < 1e-4 * want_ce.abs().max(1.0),
                "{name} perm {i} CE"
            );
            let d = max_abs_diff(logits, &train[&format!("{name}/perm{i}/logits")]);
            assert!(d < 1e-4, "{name} perm {i} logits off by {d}");
        }
        let loss: f32 = out.loss.to_scalar().unwrap();
        let want_loss = want["loss"].as_f64().unwrap() as f32;
        assert!(
            ((loss - want_loss) / want_loss).abs() < 1e-5,
            "{name}: {loss} vs {want_loss}"
        );
        let mut grads = out.loss.backward().expect("backward");
        let mut worst = 0f32;
        for (n, v) in &vars {
            let want = &train[&format!("{name}/grad/{n}")];
            let got = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
            let err = max_abs_diff(got, want) / common::max_abs(want).max(1e-12);
            assert!(
                err < 1e-4,
                "{name}: gradient of {n}, relative error {err:.2e}"
            );
            worst = worst.max(err);
        }
        let norm = clip_grad_norm(&mut grads, vars.iter().map(|(_, v)| v), 20.0).expect("clip");
        let want_norm = want["grad_total_norm_before_clip"].as_f64().unwrap();
        assert!(
            (norm.total_norm - want_norm).abs() < 1e-5 * want_norm,
            "{name} norm"
        );
        let want_coef = want["clip_coef"].as_f64().unwrap();
        assert!(
            (norm.clip_coef - want_coef).abs() < 1e-5,
            "{name} clip coef"
        );
        // The reference's groups and one AdamW step at the step-0 learning rates.
        let groups = str_adapter_groups(
            &vars,
            &OptimizerConfig::default(),
            matches!(kind, AdapterType::Ladder | AdapterType::LadderPruning),
        );
        let want_groups = &fx.peft["types"][name]["optimizer_groups"];
        for (g, (settings, members)) in groups.iter().enumerate() {
            // Members as sets: their order follows the caller's parameter order (here a HashMap's).
            let mut got: Vec<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
            let mut want: Vec<&str> = want_groups[g]["params"]
                .as_array()
                .unwrap_or_else(|| panic!("{name}: groups {want_groups}"))
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want, "{name}: group {g}");
            let max_lr = want_groups[g]["max_lr"].as_f64().unwrap();
            assert!(
                (settings.lr - max_lr).abs() <= 1e-12 * max_lr,
                "{name}: group {g} lr"
            );
            let wd = want_groups[g]["weight_decay"].as_f64().unwrap();
            assert_eq!(settings.weight_decay, wd, "{name}: group {g} weight decay");
        }
        let mut opt = AdamW::with_groups(groups, AdamWConfig::default());
        let lrs: Vec<f64> = want["lrs_used"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        opt.set_lrs(&lrs);
        opt.step(&grads).expect("step");
        // The key third of an attention's in_proj_bias has a mathematically zero gradient (softmax is shift
        // invariant): both sides hold rounding noise, which Adam's normalisation turns into updates of up to the
        // learning rate in either direction. There the reference's gradient must be noise, and the two updates
        // may differ by at most twice the largest learning rate.
        let lr_max = lrs.iter().copied().fold(0f64, f64::max) as f32;
        let mut worst_param = 0f32;
        for (n, v) in &vars {
            let want = &train[&format!("{name}/after_step1/{n}")];
            let got = v.as_tensor();
            if n.ends_with("in_proj_bias") {
                let d = got.dim(0).unwrap() / 3;
                let part = |t: &Tensor, k: usize| t.narrow(0, k * d, d).unwrap();
                for k in [0, 2] {
                    let diff = max_abs_diff(&part(got, k), &part(want, k));
                    assert!(
                        diff < 1e-6,
                        "{name}: {n} part {k} after the step off by {diff}"
                    );
                    worst_param = worst_param.max(diff);
                }
                let g = &train[&format!("{name}/grad/{n}")];
                let noise = common::max_abs(&part(g, 1)) / common::max_abs(g).max(1e-12);
                assert!(
                    noise < 1e-5,
                    "{name}: {n} key gradient is not noise ({noise:.1e})"
                );
                let diff = max_abs_diff(&part(got, 1), &part(want, 1));
                assert!(
                    diff <= 2.0 * lr_max,
                    "{name}: {n} key part after the step off by {diff}"
                );
            } else {
                let diff = max_abs_diff(got, want);
                assert!(diff < 1e-6, "{name}: {n} after the step off by {diff}");
                worst_param = worst_param.max(diff);
            }
        }
        eprintln!(
            "{name:>15}: loss {loss} (reference {want_loss}), worst gradient error {worst:.2e}, norm {:.5}, parameters after AdamW within {worst_param:.1e}",
            norm.total_norm
        );
    }
}
