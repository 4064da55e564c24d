//! `clip4str bench --train`: the cost of one training step on random data of a preset's shapes, phase by
//! phase (forward, backward, clipping, AdamW), the way the trainer runs it: same loss, same permutations,
//! dropout on, the same parameter groups. The numbers compare with the reference's training step of the same
//! model, batch and permutations on the same machine.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use clip4str::config::Clip4StrConfig;
use clip4str::nn::{DropoutStream, Mode, Precision};
use clip4str::train::init::init_weights;
use clip4str::train::{
    clip_grad_norm, effective_precision, gen_tgt_perms, training_loss, AdamW, LossOptions,
    OptimizerConfig, ParamStore, TrainPrecision,
};
use rand::{Rng, SeedableRng};

use super::report::{cpu_name, simd_level, BenchFormat, Part, Summary};
use crate::model_source::precision_name;

/// What `bench --train` needs from the command line.
pub struct TrainBench<'a> {
    pub preset: &'a str,
    pub batch_size: usize,
    pub perm_num: usize,
    pub label_lengths: (usize, usize),
    pub runs: usize,
    pub warmup: usize,
    pub format: BenchFormat,
    pub device: Device,
    /// Also time the image encoder alone, forward and backward.
    pub encoder_share: bool,
    /// What the linear layers multiply in (bf16 only where the CPU has AVX512-BF16).
    pub precision: Precision,
}

/// One timed forward and backward of the image encoder alone.
struct EncoderRun {
    forward: Duration,
    backward: Duration,
}

/// One timed step.
struct Step {
    data: Duration,
    forward: Duration,
    backward: Duration,
    clip: Duration,
    optimizer: Duration,
    total: Duration,
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Runs the training benchmark.
pub fn run(bench: &TrainBench) -> anyhow::Result<ExitCode> {
    let cfg = Clip4StrConfig::by_name(bench.preset).with_context(|| {
        format!(
            "unknown preset {:?}; choose b16, b32, l14, h14, tiny or small",
            bench.preset
        )
    })?;
    let (min_len, max_len) = bench.label_lengths;
    if min_len == 0 || min_len > max_len || max_len > cfg.max_label_length {
        anyhow::bail!(
            "--label-length {min_len}-{max_len}: give 1 <= MIN <= MAX <= {}",
            cfg.max_label_length
        );
    }
    let weights: HashMap<String, Tensor> = init_weights(&cfg, 0)?.into_iter().collect();
    let store = ParamStore::new(&cfg, &weights, DType::F32, &bench.device)?;
    let mut model = store.build_model(&cfg)?;
    // Training has no emulated bf16 (it would be slower than f32): bf16 only where the CPU has it.
    let precision = effective_precision(
        match bench.precision {
            Precision::Bf16 => TrainPrecision::Bf16,
            Precision::F32 => TrainPrecision::F32,
        },
        &bench.device,
    );
    model.set_mode(Mode {
        precision,
        ..Mode::default()
    });
    let opt_cfg = OptimizerConfig {
        batch_size: bench.batch_size,
        ..OptimizerConfig::default()
    };
    let mut optimizer = AdamW::new(store.trainable(), &opt_cfg);
    let trainable: usize = store.trainable().iter().map(|(_, v)| v.elem_count()).sum();
    let total_params: usize = store.state_dict().values().map(|t| t.elem_count()).sum();
    let loss_opts = LossOptions::default();
    let [h, w] = cfg.vision.image_size;
    let charset: Vec<char> = cfg.charset_train.chars().collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);

    let mut one_step = |step: u64| -> anyhow::Result<Step> {
        let start = Instant::now();
        let b = bench.batch_size;
        let pixels: Vec<f32> = (0..b * 3 * h * w)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let images = Tensor::from_vec(pixels, (b, 3, h, w), &bench.device)?;
        let labels: Vec<String> = (0..b)
            .map(|_| {
                let len = rng.random_range(min_len..=max_len);
                (0..len)
                    .map(|_| charset[rng.random_range(0..charset.len())])
                    .collect()
            })
            .collect();
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1);
        let perms = gen_tgt_perms(longest, bench.perm_num, true, true, &mut rng);
        let data = start.elapsed();

        let t = Instant::now();
        let out = {
            let _masks = DropoutStream::install(step);
            training_loss(&model, &images, &labels, &perms, &loss_opts)?
        };
        out.loss.to_scalar::<f32>()?;
        let forward = t.elapsed();

        let t = Instant::now();
        let mut grads = out.loss.backward()?;
        let backward = t.elapsed();

        let t = Instant::now();
        let vars: Vec<&Var> = optimizer.vars().collect();
        clip_grad_norm(&mut grads, vars, 20.0)?;
        let clip = t.elapsed();

        let t = Instant::now();
        optimizer.step(&grads)?;
        let optimizer_time = t.elapsed();
        Ok(Step {
            data,
            forward,
            backward,
            clip,
            optimizer: optimizer_time,
            total: start.elapsed(),
        })
    };
    for step in 0..bench.warmup {
        one_step(step as u64)?;
    }
    let steps: Vec<Step> = (0..bench.runs)
        .map(|i| one_step((bench.warmup + i) as u64))
        .collect::<anyhow::Result<_>>()?;
    let encoder = if bench.encoder_share {
        // The encoder's gradient with a fixed random upstream gradient: the same backward work the step does
        // through it, without the decoders.
        let images = Tensor::rand(-1f32, 1., (bench.batch_size, 3, h, w), &bench.device)?;
        let upstream = model.encode(&images)?.detach().rand_like(-1., 1.)?;
        let one = || -> anyhow::Result<EncoderRun> {
            let t = Instant::now();
            let loss = (model.encode(&images)? * &upstream)?.sum_all()?;
            loss.to_scalar::<f32>()?;
            let forward = t.elapsed();
            let t = Instant::now();
            loss.backward()?;
            Ok(EncoderRun {
                forward,
                backward: t.elapsed(),
            })
        };
        for _ in 0..bench.warmup {
            one()?;
        }
        let runs: Vec<EncoderRun> = (0..bench.runs)
            .map(|_| one())
            .collect::<anyhow::Result<_>>()?;
        let parts: [Part<EncoderRun>; 2] = [
            ("encoder forward", |r| r.forward),
            ("encoder backward", |r| r.backward),
        ];
        Some(Summary::of(&runs, &parts))
    } else {
        None
    };

    let phases: [Part<Step>; 6] = [
        ("data", |s| s.data),
        ("forward", |s| s.forward),
        ("backward", |s| s.backward),
        ("clip", |s| s.clip),
        ("optimizer", |s| s.optimizer),
        ("total", |s| s.total),
    ];
    let summary = Summary::of(&steps, &phases);
    let total = summary.get("total");
    let images_per_second = bench.batch_size as f64 / total.as_secs_f64().max(1e-12);
    let threads = rayon::current_num_threads();
    let rss = peak_rss_mib();
    let (min_len, max_len) = bench.label_lengths;
    match bench.format {
        BenchFormat::Json => {
            let mut doc = serde_json::json!({
                "preset": bench.preset,
                "image_size": [h, w],
                "batch_size": bench.batch_size,
                "perm_num": bench.perm_num,
                "label_lengths": [min_len, max_len],
                "parameters": total_params,
                "trainable": trainable,
                "threads": threads,
                "cpu": cpu_name(),
                "simd": simd_level(),
                "precision": precision_name(precision),
                "runs": bench.runs,
                "warmup": bench.warmup,
                "phases": summary.json(),
                "images_per_second": images_per_second,
                "peak_rss_mib": rss,
            });
            if let Some(encoder) = &encoder {
                doc["encoder_alone"] = encoder.json();
            }
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        BenchFormat::Text => {
            println!(
                "training step: preset {}, input {h}x{w}, batch {}, {} permutations, labels of {min_len}-{max_len} \
                 characters, {:.2} M parameters ({:.2} M trainable), {threads} threads, {}",
                bench.preset,
                bench.batch_size,
                bench.perm_num,
                total_params as f64 / 1e6,
                trainable as f64 / 1e6,
                precision_name(precision)
            );
            println!(
                "cpu {} ({}); {} timed steps after {} warm-up",
                cpu_name(),
                simd_level(),
                bench.runs,
                bench.warmup
            );
            summary.print_table("phase");
            println!("{images_per_second:.2} images/s (median step)");
            if let Some(encoder) = &encoder {
                println!("the image encoder alone (inside forward and backward above):");
                encoder.print_rows();
            }
            if let Some(rss) = rss {
                println!("peak RSS {rss:.0} MiB");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
