//! `clip4str compare`: two `eval --dump` files of the same sets, image by image. It says, per dataset, how
//! many images only one model reads right and how likely that split is by chance (exact McNemar test), which
//! is what decides whether a new file replaces the bundled model (models/default/README.md).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use clip4str::eval::paired::PairedCounts;

use crate::output::ReportFormat;

/// Arguments of `clip4str compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// `eval --dump` file of model A (e.g. the shipped file).
    pub a: PathBuf,
    /// `eval --dump` file of model B (e.g. a candidate), on the same datasets.
    pub b: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    pub format: ReportFormat,
}

/// One dump: per dataset (in the order of the file), per record key, whether the prediction was right.
#[derive(Default)]
struct Dump {
    order: Vec<String>,
    records: HashMap<String, HashMap<String, bool>>,
}

impl Dump {
    fn get(&self, dataset: &str) -> Option<&HashMap<String, bool>> {
        self.records.get(dataset)
    }

    /// Datasets of `self` that `other` lacks.
    fn missing_from(&self, other: &Dump) -> Vec<String> {
        let lacking = |d: &&String| other.get(d).is_none();
        self.order.iter().filter(lacking).cloned().collect()
    }
}

/// Per-dataset comparison plus what could not be paired.
#[derive(Debug, serde::Serialize)]
struct DatasetComparison {
    dataset: String,
    #[serde(flatten)]
    counts: PairedCounts,
    p_value: f64,
    only_in_a: usize,
    only_in_b: usize,
}

/// Runs `compare`.
pub fn run(args: CompareArgs) -> anyhow::Result<ExitCode> {
    let a = read_dump(&args.a)?;
    let b = read_dump(&args.b)?;
    let mut rows = Vec::new();
    for dataset in &a.order {
        let (Some(a_records), Some(b_records)) = (a.get(dataset), b.get(dataset)) else {
            continue;
        };
        let mut counts = PairedCounts::default();
        for (key, &a_correct) in a_records {
            if let Some(&b_correct) = b_records.get(key) {
                counts.add(a_correct, b_correct);
            }
        }
        rows.push(DatasetComparison {
            dataset: dataset.clone(),
            p_value: counts.p_value(),
            only_in_a: a_records.len() - counts.paired,
            only_in_b: b_records.len() - counts.paired,
            counts,
        });
    }
    let (a_alone, b_alone) = (a.missing_from(&b), b.missing_from(&a));
    if rows.iter().all(|r| r.counts.paired == 0) {
        anyhow::bail!(
            "{} and {} share no scored image (datasets {:?} and {:?}): were they dumped from the same sets?",
            args.a.display(),
            args.b.display(),
            a.order,
            b.order
        );
    }
    for (file, sets) in [(&args.a, &a_alone), (&args.b, &b_alone)] {
        if !sets.is_empty() {
            eprintln!(
                "note: only {} has datasets {}; left out",
                file.display(),
                sets.join(", ")
            );
        }
    }
    for r in rows.iter().filter(|r| r.only_in_a > 0 || r.only_in_b > 0) {
        eprintln!(
            "note: {}: {} record(s) only in A and {} only in B are left out",
            r.dataset, r.only_in_a, r.only_in_b
        );
    }
    match args.format {
        ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        ReportFormat::Text => print!("{}", table(&rows)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Markdown table: accuracies of A and B on the paired images, the discordant counts and the p-value.
fn table(rows: &[DatasetComparison]) -> String {
    let width = rows
        .iter()
        .map(|r| r.dataset.chars().count())
        .max()
        .unwrap_or(0)
        .max("Dataset".len());
    let mut out = format!(
        "| {:<width$} | # paired | A accuracy | B accuracy | only A right | only B right | p (McNemar) |\n\
         |{}|---------:|-----------:|-----------:|-------------:|-------------:|------------:|\n",
        "Dataset",
        "-".repeat(width + 2),
    );
    for r in rows {
        let c = &r.counts;
        let pct = |n: usize| 100.0 * n as f64 / c.paired.max(1) as f64;
        out.push_str(&format!(
            "| {:<width$} | {:>8} | {:>10.2} | {:>10.2} | {:>12} | {:>12} | {:>11} |\n",
            r.dataset,
            c.paired,
            pct(c.correct_a),
            pct(c.correct_b),
            c.only_a,
            c.only_b,
            format_p(r.p_value),
        ));
    }
    out
}

/// Three decimals; scientific notation below 0.001, where three decimals would print 0.000.
fn format_p(p: f64) -> String {
    if p >= 1e-3 {
        format!("{p:.3}")
    } else {
        format!("{p:.2e}")
    }
}

/// Reads one dump; every line must hold `dataset`, `key` and `correct`, and no key may repeat in a dataset.
fn read_dump(path: &Path) -> anyhow::Result<Dump> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut dump = Dump::default();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let at = || format!("{}: line {}", path.display(), n + 1);
        let line = line.with_context(at)?;
        if line.trim().is_empty() {
            continue;
        }
        let record: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}: not JSON (is this an `eval --dump` file?)", at()))?;
        let field = |name: &str| {
            record
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("{}: no \"{name}\" field", at()))
        };
        let (dataset, key, correct) = (field("dataset")?, field("key")?, field("correct")?);
        let (Some(dataset), Some(key), Some(correct)) =
            (dataset.as_str(), key.as_str(), correct.as_bool())
        else {
            anyhow::bail!(
                "{}: \"dataset\" and \"key\" must be strings and \"correct\" true or false",
                at()
            );
        };
        if !dump.records.contains_key(dataset) {
            dump.order.push(dataset.to_owned());
        }
        let records = dump.records.entry(dataset.to_owned()).or_default();
        if records.insert(key.to_owned(), correct).is_some() {
            anyhow::bail!(
                "{}: {dataset} record {key} appears twice (two dumps appended into one file?)",
                at()
            );
        }
    }
    if dump.order.is_empty() {
        anyhow::bail!("{}: no records", path.display());
    }
    Ok(dump)
}
