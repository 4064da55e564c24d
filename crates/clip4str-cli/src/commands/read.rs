//! `clip4str read`: images or folders in, one line per image out.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use clip4str::data::walk::{walk, Found, WalkError};
use clip4str::preprocess::decode_rgb_limited;
use clip4str::recognizer::{Prediction, RecognizerOptions};
use indicatif::ProgressBar;
use rayon::prelude::*;

use crate::device::DeviceArg;
use crate::model_source::{load_recognizer, ModelArgs};
use crate::output::{case_options, progress_bar};

/// Output formats of `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `path<TAB>text<TAB>confidence`
    Text,
    /// One JSON object per line with text, confidence and per-character probabilities.
    Json,
}

/// Arguments of `clip4str read`.
#[derive(Debug, Args)]
pub struct ReadArgs {
    #[command(flatten)]
    pub weights: ModelArgs,
    /// Filter the output like test.py --cased: letters of both cases and digits, no punctuation unless
    /// --punctuation is given too (`$5,098.80` prints as `509880`). Without either flag, read prints the raw
    /// prediction, as read.py does (`$5,098.80`, `PARKING`).
    #[arg(long)]
    pub cased: bool,
    /// Filter the output like test.py --punctuation: lower case, digits and punctuation (`PARKING` prints as
    /// `parking`); with --cased too, all 94 characters (`$5,098.80`, `PARKING`).
    #[arg(long)]
    pub punctuation: bool,
    /// Images per model batch (default: 64 on the CPU, 1 on a GPU). Each image of a batch is decoded as if it
    /// were alone (its own early stop and refinement length), which on the CPU gives batch 1's results bit for
    /// bit: the batch only makes reading faster. --batch-size 1 is the reference read.py exactly.
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Stop a batch's decoding only when every image of it has ended, like the reference's batched test.py
    /// (answers then depend on the batch).
    #[arg(long)]
    pub batch_stop: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Largest image in pixels, checked from its header before decoding; a larger one is reported and the others
    /// are still read (the limit `serve` uses too).
    #[arg(long, default_value_t = super::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Mark readings whose confidence is below this (0-1): a fourth column `low` in text, `"low_confidence"` in
    /// JSON. Junk such as a repeated letter at confidence 1e-9 otherwise prints like any other line.
    #[arg(long, value_name = "X", value_parser = parse_confidence)]
    pub min_confidence: Option<f32>,
    /// With --min-confidence: leave those readings out instead of marking them (their count goes to stderr).
    #[arg(long, requires = "min_confidence")]
    pub drop_low: bool,
    /// Per-image decoding, the default now; kept so that scripts that ask for it still run.
    #[arg(long, hide = true, conflicts_with = "batch_stop")]
    pub per_sample_stop: bool,
    /// Image files or folders (searched recursively); `-` reads stdin: the bytes of one image, or else a list of
    /// files and folders, one per line.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

/// `read`'s batch on the CPU: faster than batch 1 (CUTE80 with the bundled model: 1.3-1.8x), with the same answers.
const DEFAULT_CPU_BATCH: usize = 64;

const IMAGE_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp", "pbm", "pgm", "ppm", "pnm",
];

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The name `-` stands for stdin in inputs and in the output.
const STDIN: &str = "-";

/// What `-` read from stdin.
enum Stdin {
    /// The bytes of one image (its output line is named `-`).
    Image(Vec<u8>),
    /// Files and folders, one per line.
    Paths(Vec<PathBuf>),
}

/// Reads stdin whole: an image if its first bytes are an image format's, else a list of paths.
fn read_stdin() -> anyhow::Result<Stdin> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut bytes)
        .context("reading stdin")?;
    if bytes.is_empty() {
        anyhow::bail!("-: stdin is empty (expected the bytes of an image, or paths one per line)");
    }
    if image::guess_format(&bytes).is_ok() {
        return Ok(Stdin::Image(bytes));
    }
    let text = String::from_utf8(bytes).map_err(|_| {
        anyhow::anyhow!(
            "-: stdin is neither an image this build reads nor a list of paths (UTF-8 text)"
        )
    })?;
    Ok(Stdin::Paths(
        text.lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .collect(),
    ))
}

/// Files given directly are kept whatever their name; folders contribute their image files, sorted (each real
/// folder once, so a symlink loop ends).
fn collect_inputs(inputs: &[PathBuf], errors: &mut Vec<(PathBuf, String)>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let (before, errors_before) = (out.len(), errors.len());
            for item in walk(input) {
                match item {
                    Ok(Found::File(path)) if is_image(&path) => out.push(path),
                    Ok(_) => {}
                    Err(WalkError { path, error }) => {
                        errors.push((path, format!("cannot list folder: {error}")));
                    }
                }
            }
            if out.len() == before && errors.len() == errors_before {
                errors.push((
                    input.clone(),
                    format!(
                        "no image files in this folder (looked for .{})",
                        IMAGE_EXTENSIONS.join(", .")
                    ),
                ));
            }
        } else if input.exists() {
            out.push(input.clone());
        } else {
            errors.push((input.clone(), "no such file or folder".into()));
        }
    }
    out
}

/// A confidence threshold: a number from 0 to 1.
fn parse_confidence(text: &str) -> Result<f32, String> {
    match text.parse::<f32>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err(format!("{text:?} is not a confidence from 0 to 1")),
    }
}

/// `low`: `None` without --min-confidence, else whether the reading is below it (marked in the output).
fn print_prediction(
    out: &mut impl Write,
    format: Format,
    path: &Path,
    p: &Prediction,
    low: Option<bool>,
) -> std::io::Result<()> {
    match format {
        Format::Text => {
            // Four decimals for usual confidences; scientific notation keeps tiny ones informative.
            let conf = if p.confidence >= 1e-4 || p.confidence == 0.0 {
                format!("{:.4}", p.confidence)
            } else {
                format!("{:.3e}", p.confidence)
            };
            let mark = if low == Some(true) { "\tlow" } else { "" };
            writeln!(out, "{}\t{}\t{conf}{mark}", path.display(), p.text)
        }
        Format::Json => {
            let mut obj = serde_json::json!({
                "path": path.display().to_string(),
                "text": p.text,
                "raw": p.raw,
                "confidence": p.confidence,
                "char_probs": p.char_probs,
            });
            if let Some(low) = low {
                obj["low_confidence"] = serde_json::json!(low);
            }
            writeln!(out, "{obj}")
        }
    }
}

/// Runs `read`; exit code 1 when some image could not be read.
pub fn run(args: ReadArgs) -> anyhow::Result<ExitCode> {
    // A GPU's batched kernels round differently from its batch-1 ones, so there the default stays at 1.
    let batch_size = args.batch_size.unwrap_or(match args.weights.device {
        DeviceArg::Cpu => DEFAULT_CPU_BATCH,
        DeviceArg::Cuda(_) => 1,
    });
    if batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let opts = RecognizerOptions {
        batch_size,
        per_sample_stop: !args.batch_stop,
        ..case_options(args.cased, args.punctuation)
    };
    let recognizer = load_recognizer(&args.weights, opts)?;

    let stdin_inputs = args
        .inputs
        .iter()
        .filter(|p| p.as_os_str() == STDIN)
        .count();
    if stdin_inputs > 1 {
        anyhow::bail!("`-` (stdin) can be given once");
    }
    // In the order given; `-` stands where it was.
    let mut stdin_image = None;
    let mut failures: Vec<(PathBuf, String)> = Vec::new();
    let mut paths = Vec::new();
    for input in &args.inputs {
        if input.as_os_str() != STDIN {
            paths.extend(collect_inputs(std::slice::from_ref(input), &mut failures));
            continue;
        }
        match read_stdin()? {
            Stdin::Image(bytes) => {
                stdin_image = Some(bytes);
                paths.push(PathBuf::from(STDIN));
            }
            Stdin::Paths(list) => paths.extend(collect_inputs(&list, &mut failures)),
        }
    }
    for (path, reason) in &failures {
        eprintln!("error: {}: {reason}", path.display());
    }

    // A handful of images needs no bar.
    let progress = if paths.len() > 8 {
        progress_bar(
            paths.len(),
            "{bar:40} {pos}/{len} images {per_sec} eta {eta}",
        )
    } else {
        ProgressBar::hidden()
    };

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut failed = failures.len();
    let mut dropped = 0usize;
    for chunk in paths.chunks(batch_size) {
        // Decode and preprocess the batch in parallel; a bad file is reported and skipped.
        let decoded: Vec<(PathBuf, Result<Vec<f32>, String>)> = chunk
            .par_iter()
            .map(|p| {
                let bytes = match (&stdin_image, p.as_os_str() == STDIN) {
                    (Some(image), true) => Ok(image.clone()),
                    _ => std::fs::read(p).map_err(|e| format!("cannot read file: {e}")),
                };
                let input = bytes
                    .and_then(|bytes| {
                        decode_rgb_limited(&bytes, args.max_pixels).map_err(|e| e.to_string())
                    })
                    .map(|img| recognizer.preprocess(&img));
                (p.clone(), input)
            })
            .collect();
        let mut ok_paths = Vec::new();
        let mut inputs = Vec::new();
        for (path, input) in decoded {
            match input {
                Ok(x) => {
                    ok_paths.push(path);
                    inputs.push(x);
                }
                Err(reason) => {
                    progress.suspend(|| eprintln!("error: {}: {reason}", path.display()));
                    failed += 1;
                }
            }
        }
        if !inputs.is_empty() {
            let batch = recognizer.batch_tensor(&inputs)?;
            let preds = recognizer.recognize_batch(&batch)?;
            let written = ok_paths
                .iter()
                .zip(&preds)
                .try_for_each(|(path, p)| {
                    let low = args.min_confidence.map(|min| p.confidence < min);
                    if low == Some(true) && args.drop_low {
                        dropped += 1;
                        return Ok(());
                    }
                    print_prediction(&mut out, args.format, path, p, low)
                })
                .and_then(|()| out.flush());
            match written {
                // The reader went away (`| head`): stop quietly like other Unix tools.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    progress.finish_and_clear();
                    return Ok(ExitCode::SUCCESS);
                }
                other => other.context("writing output")?,
            }
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    if let (Some(min), true) = (args.min_confidence, dropped > 0) {
        eprintln!("{dropped} reading(s) below confidence {min} left out");
    }
    if failed > 0 {
        eprintln!("{failed} input(s) could not be read");
        Ok(ExitCode::from(1))
    } else {
        Ok(ExitCode::SUCCESS)
    }
}
