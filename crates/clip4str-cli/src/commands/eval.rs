//! `clip4str eval`: the reference test.py protocol on LMDB benchmarks or labelled image folders.
//!
//! Images are read, decoded and preprocessed on worker threads while the model runs on the previous
//! batch (a bounded pipeline), so the model does not wait for JPEG decoding.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use clip4str::charset::{charset_test, CharsetAdapter};
use clip4str::data::{discover_datasets, open_dataset_as, Dataset, FilteredLabels};
use clip4str::eval::{combined, results_table, DatasetResult, TEST_BENCHMARK, TEST_NEW};
use clip4str::preprocess::{decode_rgb, rotate_expand};
use clip4str::recognizer::{Recognizer, RecognizerOptions};
use rayon::prelude::*;

use crate::model_source::{load_recognizer, ModelArgs};
use crate::output::{progress_bar, ReportFormat};

/// Which named benchmark group to evaluate when a root holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Benchmark {
    /// IIIT5k, SVT, IC13_1015, IC15_1811, IC15_2077, SVTP, CUTE80, HOST, WOST.
    Std,
    /// ArT, COCOv1.4, Uber.
    New,
    /// Both groups.
    All,
}

/// Arguments of `clip4str eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub weights: ModelArgs,
    /// Dataset folders (LMDB `data.mdb` or `labels.tsv`) or roots holding them (e.g. `root/test/<name>`).
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Case-sensitive protocol (test.py --cased).
    #[arg(long)]
    pub cased: bool,
    /// Keep punctuation (test.py --punctuation).
    #[arg(long)]
    pub punctuation: bool,
    /// Benchmark group to evaluate when a root holds the reference's datasets; without it, every dataset found.
    #[arg(long, value_enum)]
    pub benchmark: Option<Benchmark>,
    /// Images per model batch (test.py uses 512; the batch-wide early stop makes results batch-dependent).
    #[arg(long, default_value_t = 512)]
    pub batch_size: usize,
    /// Rotate every image counter-clockwise by this many degrees before resizing (test.py --rotation).
    #[arg(long, default_value_t = 0.0)]
    pub rotation: f32,
    /// Evaluate at most this many samples per dataset (after label filtering).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    pub format: ReportFormat,
    /// Decode every image as if it were alone, so results do not depend on the batch (the reference stops
    /// a batch only when all images have ended).
    #[arg(long)]
    pub per_sample_stop: bool,
    /// Write one JSON line per sample (dataset, index, key, label, prediction, confidence, correct).
    #[arg(long)]
    pub dump: Option<PathBuf>,
}

/// Datasets as `(report name, folder)`.
type NamedPaths = Vec<(String, PathBuf)>;

/// One dataset to score, with its kept labels.
struct Job {
    dataset: Box<dyn Dataset>,
    labels: FilteredLabels,
}

/// One preprocessed sample (or why it could not be read).
struct Item {
    job: usize,
    index: usize,
    key: String,
    label: String,
    input: Result<Vec<f32>, String>,
}

/// Datasets named by the arguments: a dataset folder is taken as is; a root contributes the benchmark group
/// (reporting missing members) or everything under it.
///
/// Without `--benchmark`, a root holding any of test.py's standard benchmark names is evaluated like test.py
/// (the standard group); the chosen group is returned for printing.
fn resolve_datasets(args: &EvalArgs) -> anyhow::Result<(NamedPaths, Option<Benchmark>)> {
    let mut out = Vec::new();
    let mut chosen = args.benchmark;
    for path in &args.data {
        if !path.exists() {
            anyhow::bail!("{}: no such dataset or folder", path.display());
        }
        let found = discover_datasets(path)
            .with_context(|| format!("searching {} for datasets", path.display()))?;
        let is_single = found.len() == 1 && found[0].1 == *path;
        let holds_benchmarks = found
            .iter()
            .any(|(n, _)| TEST_BENCHMARK.contains(&n.as_str()));
        let group = match args.benchmark {
            None if holds_benchmarks && !is_single => Some(Benchmark::Std),
            other => other,
        };
        if group.is_some() && chosen.is_none() {
            chosen = group;
        }
        let wanted: Option<Vec<&str>> = match group {
            _ if is_single => None,
            Some(Benchmark::Std) => Some(TEST_BENCHMARK.to_vec()),
            Some(Benchmark::New) => Some(TEST_NEW.to_vec()),
            Some(Benchmark::All) => Some(
                TEST_BENCHMARK
                    .iter()
                    .chain(TEST_NEW.iter())
                    .copied()
                    .collect(),
            ),
            None => None,
        };
        match wanted {
            Some(names) => {
                for name in names {
                    match found.iter().find(|(n, _)| n == name) {
                        Some(entry) => out.push(entry.clone()),
                        None => eprintln!(
                            "warning: {}: dataset {name} not found, skipped",
                            path.display()
                        ),
                    }
                }
            }
            None if found.is_empty() => {
                anyhow::bail!(
                    "{}: no dataset found (no data.mdb or labels.tsv below it)",
                    path.display()
                )
            }
            None => out.extend(found),
        }
    }
    Ok((out, chosen))
}

fn load_item(
    dataset: &dyn Dataset,
    rec: &Recognizer,
    rotation: f32,
    index: usize,
) -> Result<Vec<f32>, String> {
    let bytes = dataset.image(index).map_err(|e| e.to_string())?;
    let img = decode_rgb(&bytes).map_err(|e| format!("{}: {e}", dataset.key(index)))?;
    let img = if rotation != 0.0 {
        rotate_expand(&img, rotation)
    } else {
        img
    };
    Ok(rec.preprocess(&img))
}

/// Runs `eval`; exit code 1 when some record could not be read.
pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    if args.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    if !args.rotation.is_finite() {
        anyhow::bail!("--rotation must be a finite number of degrees");
    }
    let charset = charset_test(args.cased, args.punctuation);
    let opts = RecognizerOptions {
        charset_test: Some(charset.clone()),
        filter_output: true,
        batch_size: args.batch_size,
        per_sample_stop: args.per_sample_stop,
        ..Default::default()
    };
    let rec = load_recognizer(&args.weights, opts)?;
    let adapter = CharsetAdapter::new(&charset);
    let max_len = rec.max_label_length();

    let mut jobs = Vec::new();
    let mut failed_total = 0usize;
    let (datasets, benchmark) = resolve_datasets(&args)?;
    for (name, path) in datasets {
        let dataset = open_dataset_as(&path, &name)
            .map_err(|e| crate::error_chain::name_path_once(e, &path, "opening"))?;
        let mut labels = dataset
            .filtered(&adapter, max_len, true, true)
            .map_err(|e| crate::error_chain::name_path_once(e, &path, "reading labels of"))?;
        for err in &labels.failed {
            eprintln!("error: {name}: {err}");
        }
        if let Some(limit) = args.limit {
            labels.indices.truncate(limit);
            labels.labels.truncate(limit);
        }
        jobs.push(Job { dataset, labels });
    }
    let total: usize = jobs.iter().map(|j| j.labels.len()).sum();

    let mut dump = match &args.dump {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let progress = progress_bar(total, "{msg:12} {bar:40} {pos}/{len} {per_sec} eta {eta}");

    let mut results: Vec<DatasetResult> = jobs
        .iter()
        .map(|j| {
            let mut r = DatasetResult::new(j.dataset.name());
            r.failed_records = j.labels.failed.len();
            r
        })
        .collect();
    let started = Instant::now();
    let mut scored = 0usize;

    std::thread::scope(|scope| -> anyhow::Result<()> {
        // Two batches in flight: one being decoded while the model runs the other.
        let (tx, rx) = sync_channel::<Vec<Item>>(2);
        let jobs_ref = &jobs;
        let rec_ref = &rec;
        let (batch_size, rotation) = (args.batch_size, args.rotation);
        scope.spawn(move || {
            for (j, job) in jobs_ref.iter().enumerate() {
                let pairs: Vec<(usize, &String)> = job
                    .labels
                    .indices
                    .iter()
                    .copied()
                    .zip(&job.labels.labels)
                    .collect();
                for chunk in pairs.chunks(batch_size) {
                    let items: Vec<Item> = chunk
                        .par_iter()
                        .map(|&(index, label)| Item {
                            job: j,
                            index,
                            key: job.dataset.key(index),
                            label: label.clone(),
                            input: load_item(job.dataset.as_ref(), rec_ref, rotation, index),
                        })
                        .collect();
                    if tx.send(items).is_err() {
                        return;
                    }
                }
            }
        });
        for items in rx {
            let Some(first) = items.first() else { continue };
            progress.set_message(jobs[first.job].dataset.name().to_string());
            let (ok, bad): (Vec<Item>, Vec<Item>) =
                items.into_iter().partition(|i| i.input.is_ok());
            for item in &bad {
                if let Err(reason) = &item.input {
                    progress.suspend(|| {
                        eprintln!("error: {}: {reason}", jobs[item.job].dataset.name())
                    });
                }
                results[item.job].failed_records += 1;
            }
            if ok.is_empty() {
                progress.inc(bad.len() as u64);
                continue;
            }
            // Move the preprocessed pixels out instead of copying them (every item in `ok` is `Ok`).
            let mut ok = ok;
            let inputs: Vec<Vec<f32>> = ok
                .iter_mut()
                .filter_map(|i| std::mem::replace(&mut i.input, Ok(Vec::new())).ok())
                .collect();
            let preds = rec.recognize_batch(&rec.batch_tensor(&inputs)?)?;
            for (item, pred) in ok.iter().zip(&preds) {
                results[item.job].add(&pred.text, &item.label, f64::from(pred.confidence));
                if let Some(out) = dump.as_mut() {
                    let line = serde_json::json!({
                        "dataset": jobs[item.job].dataset.name(),
                        "index": item.index,
                        "key": item.key,
                        "label": item.label,
                        "prediction": pred.text,
                        "confidence": pred.confidence,
                        "correct": pred.text == item.label,
                    });
                    writeln!(out, "{line}").context("writing the dump")?;
                }
            }
            scored += ok.len();
            progress.inc((ok.len() + bad.len()) as u64);
        }
        Ok(())
    })?;
    progress.finish_and_clear();
    if let Some(mut out) = dump {
        out.flush().context("writing the dump")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let images_per_second = scored as f64 / seconds.max(1e-9);
    failed_total += results.iter().map(|r| r.failed_records).sum::<usize>();

    print_results(args.format, benchmark, &results, images_per_second, seconds)?;
    if failed_total > 0 {
        eprintln!("{failed_total} record(s) could not be read");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_results(
    format: ReportFormat,
    benchmark: Option<Benchmark>,
    results: &[DatasetResult],
    ips: f64,
    seconds: f64,
) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match format {
        ReportFormat::Text => {
            let mut groups: Vec<(&str, Vec<DatasetResult>)> = Vec::new();
            let pick = |names: &[&str]| -> Vec<DatasetResult> {
                names
                    .iter()
                    .filter_map(|n| results.iter().find(|r| r.name == *n).cloned())
                    .collect()
            };
            match benchmark {
                Some(Benchmark::Std) => groups.push(("Benchmark", pick(&TEST_BENCHMARK))),
                Some(Benchmark::New) => groups.push(("New", pick(&TEST_NEW))),
                Some(Benchmark::All) => {
                    groups.push(("Benchmark", pick(&TEST_BENCHMARK)));
                    groups.push(("New", pick(&TEST_NEW)));
                }
                None => groups.push(("Datasets", results.to_vec())),
            }
            for (name, group) in groups {
                if group.is_empty() {
                    continue;
                }
                writeln!(out, "{}", results_table(name, &group))?;
            }
            writeln!(
                out,
                "{:.1} images/s ({:.1} s, {} threads)",
                ips,
                seconds,
                rayon::current_num_threads()
            )?;
        }
        ReportFormat::Json => {
            let doc = serde_json::json!({
                "datasets": results.iter().map(|r| r.row()).collect::<Vec<_>>(),
                "combined": combined(results),
                "images_per_second": ips,
                "seconds": seconds,
                "threads": rayon::current_num_threads(),
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        }
    }
    Ok(())
}
