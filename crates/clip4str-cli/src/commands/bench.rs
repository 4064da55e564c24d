//! `clip4str bench`: per-stage timing of a full CLIP4STR read (preprocess, encoder, decoders, text encoder,
//! refinement) on a checkpoint, the bundled model, or random weights of a preset's exact shapes; with
//! `--train`, the phases of a training step ([`train`]).

mod report;
mod train;

use report::{cpu_name, BenchFormat, Part, Summary};

use std::collections::HashMap;
use std::io::Cursor;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};
use clip4str::config::Clip4StrConfig;
use clip4str::model::{Clip4Str, Stage, StageObserver};
use clip4str::preprocess::decode_rgb;
use clip4str::recognizer::{Recognizer, RecognizerOptions};
use clip4str::train::init::init_weights;
use image::{ImageFormat, Rgb, RgbImage};
use rayon::prelude::*;

use crate::model_source::{load_recognizer, precision_name, ModelArgs};

/// How many decoding steps to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Steps {
    /// All 26 positions, no early stop (the reference benchmark; random weights never emit EOS anyway).
    Full,
    /// `max_length = 7`: 8 positions, like the reference's short measurement.
    #[value(name = "7")]
    Seven,
    /// Stop when every image has ended, as `read` does (meaningful for trained weights).
    Auto,
}

/// Arguments of `clip4str bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Weights to time (default: the bundled model unless --preset is given).
    #[command(flatten)]
    pub weights: ModelArgs,
    /// Random weights with the exact shapes of a preset: b16, b32, l14, h14, tiny, small.
    #[arg(long, conflicts_with_all = ["checkpoint", "config", "model"])]
    pub preset: Option<String>,
    /// Time a training step (forward, backward, clipping, AdamW) on random data of --preset's shapes
    /// (default: small) instead of a read.
    #[arg(long, conflicts_with_all = ["checkpoint", "config", "model", "steps"])]
    pub train: bool,
    /// Images per forward (default: 1; 64 with --train).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// With --train: PSM permutations per batch.
    #[arg(long, default_value_t = 6, requires = "train")]
    pub perm_num: usize,
    /// With --train: also time the image encoder alone, forward and backward (the share of the step it takes).
    #[arg(long, requires = "train")]
    pub encoder_share: bool,
    /// With --train: the random labels' lengths, MIN-MAX characters.
    #[arg(long, default_value = "5-10", value_parser = parse_range, requires = "train")]
    pub label_length: (usize, usize),
    /// Decoding length (default: full for presets, auto for trained weights).
    #[arg(long, value_enum)]
    pub steps: Option<Steps>,
    /// Timed runs after the warm-up (median and min are reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = BenchFormat::Text)]
    pub format: BenchFormat,
}

/// Wall time of each stage of one forward (CPU ops are synchronous, so wall time per stage is exact).
#[derive(Debug, Clone, Copy, Default)]
struct StageTimings {
    encoder: Duration,
    visual_decode: Duration,
    text_encoder: Duration,
    cross_decode: Duration,
    refine: Duration,
}

/// Times the stages of a forward from the model's stage-end notices: everything since the previous notice
/// belongs to the stage that just ended.
struct StageClock {
    last: Instant,
    timings: StageTimings,
}

impl StageClock {
    fn start() -> Self {
        Self {
            last: Instant::now(),
            timings: StageTimings::default(),
        }
    }
}

impl StageObserver for StageClock {
    fn stage_done(&mut self, stage: Stage) {
        let now = Instant::now();
        let spent = now - self.last;
        self.last = now;
        let t = &mut self.timings;
        *match stage {
            Stage::Encoder => &mut t.encoder,
            Stage::VisualDecode => &mut t.visual_decode,
            Stage::TextEncoder => &mut t.text_encoder,
            Stage::CrossDecode => &mut t.cross_decode,
            Stage::Refine => &mut t.refine,
        } += spent;
    }
}

/// One timed run: preprocessing, then the model's stages, then logits to strings.
struct Run {
    preprocess: Duration,
    stages: StageTimings,
    postprocess: Duration,
    total: Duration,
}

/// A word-crop-like test image (dark strokes on a light gradient), stored as PNG so preprocessing includes
/// decoding as it does for real files.
fn sample_png() -> anyhow::Result<Vec<u8>> {
    let img = RgbImage::from_fn(160, 48, |x, y| {
        let stroke = (x / 9 + y / 7) % 4 == 0 && (8..40).contains(&y);
        if stroke {
            Rgb([20, 24, 30])
        } else {
            let v = 180 + ((x + 2 * y) % 60) as u8;
            Rgb([v, v, 255 - v / 3])
        }
    });
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .context("encoding the benchmark image")?;
    Ok(bytes)
}

fn random_model(preset: &str, device: &Device) -> anyhow::Result<(Clip4Str, String)> {
    let cfg = Clip4StrConfig::by_name(preset).with_context(|| {
        format!("unknown preset {preset:?}; choose b16, b32, l14, h14, tiny or small")
    })?;
    let weights: HashMap<String, Tensor> = init_weights(&cfg, 0)?.into_iter().collect();
    let model = Clip4Str::from_tensors(&cfg, weights, device)?;
    Ok((model, format!("{preset} (random weights)")))
}

/// `MIN-MAX` (or a single `N`).
fn parse_range(text: &str) -> Result<(usize, usize), String> {
    let bad = || format!("{text:?} is not MIN-MAX (e.g. 5-10)");
    let (min, max) = text.split_once('-').unwrap_or((text, text));
    let min = min.trim().parse().map_err(|_| bad())?;
    let max = max.trim().parse().map_err(|_| bad())?;
    Ok((min, max))
}

/// Runs `bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let batch_size = args.batch_size.unwrap_or(if args.train { 64 } else { 1 });
    if batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    if args.runs == 0 {
        anyhow::bail!("--runs must be at least 1");
    }
    if args.train {
        return train::run(&train::TrainBench {
            preset: args.preset.as_deref().unwrap_or("small"),
            batch_size,
            perm_num: args.perm_num,
            label_lengths: args.label_length,
            runs: args.runs,
            warmup: args.warmup,
            format: args.format,
            device: args.weights.device.open()?,
            encoder_share: args.encoder_share,
            precision: args
                .weights
                .precision
                .apply(RecognizerOptions::default())
                .precision,
        });
    }
    let steps = args.steps.unwrap_or(if args.preset.is_some() {
        Steps::Full
    } else {
        Steps::Auto
    });
    let max_length = match steps {
        Steps::Full => Some(usize::MAX),
        Steps::Seven => Some(7),
        Steps::Auto => None,
    };
    // The recognizer clamps the length to the model's max_label_length.
    let opts = RecognizerOptions {
        batch_size,
        max_length,
        ..RecognizerOptions::default()
    };
    let (recognizer, model_name) = match &args.preset {
        Some(preset) => {
            let (model, name) = random_model(preset, &args.weights.device.open()?)?;
            (
                Recognizer::from_model(model, args.weights.precision.apply(opts))?,
                name,
            )
        }
        None => {
            let rec = load_recognizer(&args.weights, opts)?;
            (rec, args.weights.label())
        }
    };
    let [input_h, input_w] = recognizer.input_size();
    let png = sample_png()?;

    let one_run = || -> anyhow::Result<Run> {
        let start = Instant::now();
        let inputs: Vec<Vec<f32>> = (0..batch_size)
            .into_par_iter()
            .map(|_| decode_rgb(&png).map(|img| recognizer.preprocess(&img)))
            .collect::<Result<_, _>>()?;
        let batch = recognizer.batch_tensor(&inputs)?;
        let preprocess = start.elapsed();
        let mut clock = StageClock::start();
        let trace = recognizer.trace_observed(&batch, &mut clock)?;
        let post = Instant::now();
        let preds = recognizer.decode(&trace.final_logits)?;
        debug_assert_eq!(preds.len(), batch_size);
        Ok(Run {
            preprocess,
            stages: clock.timings,
            postprocess: post.elapsed(),
            total: start.elapsed(),
        })
    };
    for _ in 0..args.warmup {
        one_run()?;
    }
    let mut runs = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        runs.push(one_run()?);
    }

    let all_stages: [Part<Run>; 8] = [
        ("preprocess", |r| r.preprocess),
        ("encoder", |r| r.stages.encoder),
        ("visual_decode", |r| r.stages.visual_decode),
        ("text_encoder", |r| r.stages.text_encoder),
        ("cross_decode", |r| r.stages.cross_decode),
        ("refine", |r| r.stages.refine),
        ("postprocess", |r| r.postprocess),
        ("total", |r| r.total),
    ];
    // STRAdapter has no text branch: no rows that could only read zero.
    let text_branch = recognizer.model().family() == clip4str::ModelFamily::Clip4Str;
    let stages: Vec<Part<Run>> = all_stages
        .into_iter()
        .filter(|(name, _)| text_branch || !matches!(*name, "text_encoder" | "cross_decode"))
        .collect();
    let summary = Summary::of(&runs, &stages);
    let get = |name: &str| summary.get(name);
    let total = get("total");
    let images_per_second = batch_size as f64 / total.as_secs_f64().max(1e-12);
    let decoding = get("visual_decode")
        + get("refine")
        + if text_branch {
            get("cross_decode")
        } else {
            Duration::ZERO
        };
    let decode_pct = 100.0 * decoding.as_secs_f64() / get("encoder").as_secs_f64().max(1e-12);
    let threads = rayon::current_num_threads();
    let steps_name = match steps {
        Steps::Full => "full",
        Steps::Seven => "7",
        Steps::Auto => "auto",
    };
    let build = match clip4str::nn::packed_f32_kernel() {
        Some(isa) => format!(
            "{}; linear layers: clip4str packed {isa}",
            clip4str::GEMM_BACKEND
        ),
        None => clip4str::GEMM_BACKEND.to_string(),
    };

    match args.format {
        BenchFormat::Json => {
            let doc = serde_json::json!({
                "model": model_name,
                "image_size": [input_h, input_w],
                "batch_size": batch_size,
                "steps": steps_name,
                "precision": precision_name(recognizer.options().precision),
                "threads": threads,
                "build": build,
                "cpu": cpu_name(),
                "runs": args.runs,
                "warmup": args.warmup,
                "stages": summary.json(),
                "images_per_second": images_per_second,
                "decode_percent_of_encoder": decode_pct,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        BenchFormat::Text => {
            println!(
                "model {model_name}, input {}x{}, batch {}, steps {steps_name}, {}, {threads} threads, {build}",
                input_h, input_w, batch_size, precision_name(recognizer.options().precision)
            );
            println!(
                "cpu {}; {} timed runs after {} warm-up",
                cpu_name(),
                args.runs,
                args.warmup
            );
            summary.print_table("stage");
            println!("{images_per_second:.2} images/s end to end (median run)");
            let parts = if text_branch {
                "visual + cross + refine"
            } else {
                "visual + refine"
            };
            println!("decoding ({parts}) = {decode_pct:.1}% of encoder time");
        }
    }
    Ok(ExitCode::SUCCESS)
}
