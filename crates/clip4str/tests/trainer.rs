//! A short from-scratch run end to end: output files, a checkpoint `read` can load alone, resume.
#![cfg(feature = "train")]

mod common;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use clip4str::data::LmdbWriter;
use clip4str::recognizer::{Recognizer, RecognizerOptions};
use clip4str::train::init::{sincos_positional, VISUAL_POSITIONAL};
use clip4str::train::{
    InitSpec, PositionalInit, StepMetrics, TrainConfig, TrainObserver, TrainPrecision, Trainer,
    CTC_HEAD_PREFIX,
};
use common::fixtures;

struct Quiet;
impl TrainObserver for Quiet {}

/// A very small model so a few steps take well under a second each on 2 cores.
const CONFIG: &str = r#"
[model]
preset = "small"
image_size = [16, 32]
patch_size = [8, 8]
vision_width = 64
vision_layers = 1
vision_heads = 1
text_width = 64
text_layers = 1
text_heads = 1
embed_dim = 32
decoder_heads = 2

[data]
train = ["TRAIN"]
val = ["VAL"]
augment = true
workers = 1

[optim]
batch_size = 4
lr = 1e-3
max_steps = 4

[run]
output_dir = "OUT"
val_interval = 2
log_interval = 1
seed = 7
"#;

fn make_lmdb(dir: &PathBuf) {
    let mut images: Vec<PathBuf> = std::fs::read_dir(fixtures().join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    images.sort();
    let mut w = LmdbWriter::create(dir).unwrap();
    let labels = ["Hello42", "gray", "noise", "RED", "text!"];
    for (img, label) in images.iter().zip(labels) {
        w.push(&std::fs::read(img).unwrap(), label).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn short_run_saves_loads_and_resumes() {
    let root = std::env::temp_dir().join(format!("clip4str-trainer-{}", std::process::id()));
    std::fs::remove_dir_all(&root).ok();
    let (train, val, out) = (root.join("train"), root.join("val"), root.join("out"));
    std::fs::create_dir_all(&train).unwrap();
    std::fs::create_dir_all(&val).unwrap();
    make_lmdb(&train);
    make_lmdb(&val);
    let text = CONFIG
        .replace("TRAIN", train.to_str().unwrap())
        .replace("VAL", val.to_str().unwrap())
        .replace("OUT", out.to_str().unwrap());
    let mut cfg = TrainConfig::from_toml(&text).unwrap();
    cfg.optim.max_steps = Some(2);
    let stop = AtomicBool::new(false);
    let mut t = Trainer::new(cfg.clone()).unwrap();
    t.run(&mut Quiet, &stop).unwrap();
    assert_eq!(t.step(), 2);
    for f in [
        "config.toml",
        "last.safetensors",
        "last.json",
        "best.safetensors",
        "metrics.jsonl",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let metrics: Vec<StepMetrics> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), 2);
    assert!(metrics.iter().all(|m| m.loss.is_finite() && m.loss > 0.0));
    assert!(metrics[1].val_accuracy.is_some());

    // A new run may not overwrite it.
    assert!(Trainer::new(cfg).is_err());

    // The checkpoint loads alone (dims and heads from its metadata).
    let rec = Recognizer::from_checkpoint(
        &out.join("last.safetensors"),
        None,
        RecognizerOptions::default(),
    )
    .unwrap();
    let clip4str::ModelConfig::Clip4Str(cfg) = rec.model().config() else {
        panic!("a CLIP4STR model");
    };
    assert_eq!(cfg.vision.image_size, [16, 32]);
    assert_eq!(cfg.decoder.heads, 2);

    // Resume continues at step 2 with the same schedule length; the file's max_steps still says 2, so
    // raise it in config.toml like a user extending a run.
    let cfg_path = out.join("config.toml");
    let edited = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("max_steps = 2", "max_steps = 4");
    std::fs::write(&cfg_path, edited).unwrap();
    let mut t = Trainer::resume(&out).unwrap();
    assert_eq!(t.step(), 2);
    t.run(&mut Quiet, &stop).unwrap();
    assert_eq!(t.step(), 4);
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<usize> = lines
        .lines()
        .map(|l| serde_json::from_str::<StepMetrics>(l).unwrap().step)
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn sincos_positional_init_starts_from_the_table() {
    let root = std::env::temp_dir().join(format!("clip4str-sincos-{}", std::process::id()));
    std::fs::remove_dir_all(&root).ok();
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    make_lmdb(&data);
    let text = CONFIG
        .replace("TRAIN", data.to_str().unwrap())
        .replace("VAL", data.to_str().unwrap())
        .replace("OUT", root.join("out").to_str().unwrap())
        .replace(
            "[data]",
            "[init]\nsource = \"scratch\"\npositional = \"sincos\"\n\n[data]",
        );
    let cfg = TrainConfig::from_toml(&text).unwrap();
    assert_eq!(
        cfg.init,
        InitSpec::Scratch {
            positional: PositionalInit::Sincos
        }
    );
    let t = Trainer::new(cfg).unwrap();
    let table = sincos_positional(&t.model_config().vision).unwrap();
    let start = t.params().get(VISUAL_POSITIONAL).unwrap();
    let diff = (start - &table)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    // The default stays the reference's random draw.
    let plain = TrainConfig::from_toml(
        &CONFIG
            .replace("TRAIN", data.to_str().unwrap())
            .replace("VAL", data.to_str().unwrap())
            .replace("OUT", root.join("out2").to_str().unwrap()),
    )
    .unwrap();
    assert_eq!(plain.init, InitSpec::default());
    let t = Trainer::new(plain).unwrap();
    let start = t.params().get(VISUAL_POSITIONAL).unwrap();
    assert!(start.to_vec2::<f32>().unwrap()[0].iter().any(|&v| v != 0.0));
    std::fs::remove_dir_all(&root).ok();
}

/// `set_stop_at` ends a run part-way with `last` saved and the schedule untouched; resuming finishes it with
/// the same learning rates as an uninterrupted run.
#[test]
fn stop_at_saves_part_way_and_keeps_the_schedule() {
    let root = std::env::temp_dir().join(format!("clip4str-stopat-{}", std::process::id()));
    std::fs::remove_dir_all(&root).ok();
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    make_lmdb(&data);
    let config = |out: &str| {
        let text = CONFIG
            .replace("TRAIN", data.to_str().unwrap())
            .replace("VAL", data.to_str().unwrap())
            .replace("OUT", root.join(out).to_str().unwrap())
            .replace("val_interval = 2", "val_interval = 100");
        TrainConfig::from_toml(&text).unwrap()
    };
    let stop = AtomicBool::new(false);
    let mut whole = Trainer::new(config("whole")).unwrap();
    whole.run(&mut Quiet, &stop).unwrap();
    let mut part = Trainer::new(config("part")).unwrap();
    part.set_stop_at(3).unwrap();
    part.run(&mut Quiet, &stop).unwrap();
    assert_eq!(part.step(), 3);
    assert_eq!(part.total_steps(), 4);
    let last: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("part/last.json")).unwrap())
            .unwrap();
    assert_eq!(last["step"], 3);
    assert!(part.set_stop_at(2).is_err());
    let mut rest = Trainer::resume(&root.join("part")).unwrap();
    rest.run(&mut Quiet, &stop).unwrap();
    assert_eq!(rest.step(), 4);
    let lrs = |t: &Trainer| -> Vec<f64> { t.history().iter().map(|m| m.lr).collect() };
    assert_eq!(lrs(&rest), lrs(&whole));
    std::fs::remove_dir_all(&root).ok();
}

/// The auxiliary CTC head trains with the model, is saved and restored with the optimizer state, and never
/// reaches the exported weights (which must load as a plain CLIP4STR).
#[test]
fn ctc_head_is_kept_in_the_state_file_only() {
    let root = std::env::temp_dir().join(format!("clip4str-ctc-{}", std::process::id()));
    std::fs::remove_dir_all(&root).ok();
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    make_lmdb(&data);
    let out = root.join("out");
    let text = CONFIG
        .replace("TRAIN", data.to_str().unwrap())
        .replace("VAL", data.to_str().unwrap())
        .replace("OUT", out.to_str().unwrap())
        .replace("max_steps = 4", "max_steps = 2\nctc_weight = 0.5");
    let cfg = TrainConfig::from_toml(&text).unwrap();
    assert_eq!(cfg.optim.ctc_weight, 0.5);
    let stop = AtomicBool::new(false);
    let mut t = Trainer::new(cfg).unwrap();
    let start = t
        .ctc_head()
        .unwrap()
        .weight
        .as_detached_tensor()
        .copy()
        .unwrap();
    t.run(&mut Quiet, &stop).unwrap();
    let trained = t.ctc_head().unwrap().weight.as_detached_tensor();
    let moved = (&trained - &start)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(
        moved.to_scalar::<f32>().unwrap() > 0.0,
        "the CTC head did not train"
    );

    let state =
        candle_core::safetensors::load(out.join("state-00000002.safetensors"), &Device::Cpu)
            .unwrap();
    let saved = &state[&format!("{CTC_HEAD_PREFIX}weight")];
    assert!(state.contains_key(&format!("exp_avg/{CTC_HEAD_PREFIX}weight")));
    let last = candle_core::safetensors::load(out.join("last.safetensors"), &Device::Cpu).unwrap();
    assert!(last.keys().all(|k| !k.starts_with("aux.")));
    Recognizer::from_checkpoint(
        &out.join("last.safetensors"),
        None,
        RecognizerOptions::default(),
    )
    .unwrap();

    let t = Trainer::resume(&out).unwrap();
    let restored = t.ctc_head().unwrap().weight.as_detached_tensor();
    let gap = (&restored - saved)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(gap.to_scalar::<f32>().unwrap(), 0.0);
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn shipped_training_configs_parse() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("synth-") && name.ends_with(".toml") {
            // On-the-fly synthetic dataset specs that the configs name.
            let text = std::fs::read_to_string(&path).unwrap();
            toml::from_str::<clip4str::data::synth::SynthSpec>(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        } else if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let cfg =
                TrainConfig::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if matches!(cfg.init, InitSpec::Scratch { .. }) {
                cfg.model
                    .resolve()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            seen += 1;
        }
    }
    assert!(
        seen >= 3,
        "expected the default model's configs in {}",
        dir.display()
    );
}

/// A bf16 run follows the f32 run's losses to within bf16 rounding (the same data, permutations and dropout),
/// and differs from it where the CPU has AVX512-BF16: the bf16 products really ran. Without the instructions
/// `bf16` trains in f32, identically.
#[test]
fn bf16_training_follows_the_f32_losses() {
    let root = std::env::temp_dir().join(format!("clip4str-trainer-bf16-{}", std::process::id()));
    std::fs::remove_dir_all(&root).ok();
    let (train, val) = (root.join("train"), root.join("val"));
    std::fs::create_dir_all(&train).unwrap();
    std::fs::create_dir_all(&val).unwrap();
    make_lmdb(&train);
    make_lmdb(&val);
    let losses = |precision: TrainPrecision| {
        let out = root.join(format!("{precision:?}"));
        let text = CONFIG
            .replace("TRAIN", train.to_str().unwrap())
            .replace("VAL", val.to_str().unwrap())
            .replace("OUT", out.to_str().unwrap());
        let mut cfg = TrainConfig::from_toml(&text).unwrap();
        cfg.optim.max_steps = Some(6);
        cfg.run.val_interval = 100;
        cfg.run.precision = precision;
        let mut t = Trainer::new(cfg).unwrap();
        t.run(&mut Quiet, &AtomicBool::new(false)).unwrap();
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<StepMetrics>(l).unwrap().loss)
            .collect::<Vec<f64>>()
    };
    let f32 = losses(TrainPrecision::F32);
    let bf16 = losses(TrainPrecision::Bf16);
    assert_eq!(f32.len(), 6);
    for (step, (a, b)) in f32.iter().zip(&bf16).enumerate() {
        assert!(
            (a - b).abs() / a < 0.02,
            "step {}: f32 {a}, bf16 {b}",
            step + 1
        );
    }
    assert_eq!(
        f32 != bf16,
        clip4str::nn::bf16_native_supported(),
        "f32 {f32:?}, bf16 {bf16:?}"
    );
    std::fs::remove_dir_all(&root).ok();
}
