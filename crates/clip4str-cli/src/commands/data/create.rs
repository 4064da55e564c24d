//! `clip4str data create`: the reference's `tools/create_lmdb_dataset.py`. Every record of the label file is
//! checked (label usable, image file present and decodable) on worker threads in chunks, and the good ones are
//! written in label-file order with their image bytes unchanged. Bad records are named and skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use clip4str::data::{DataError, Dataset, FolderDataset, LmdbWriter, LABELS_FILE, LMDB_DATA_FILE};
use clip4str::preprocess::decode_rgb;
use rayon::prelude::*;

use super::progress_bar;

/// Records checked in parallel before they are written in order.
const CHUNK: usize = 256;

const AFTER_HELP: &str = "\
Labels are stored verbatim (the training filter later removes whitespace and unsupported characters); a record is
skipped when its line is malformed, its label is empty or holds a TAB or other control character, or its image is
missing or does not decode. Each skipped record is named on stderr with its problem, then a summary.

Exit status: 0 when every record was written; 1 when some were skipped (the LMDB holds the others); 2 on a usage
or I/O error, or when no record is usable (then nothing is written).";

/// Arguments of `clip4str data create`.
#[derive(Debug, Args)]
#[command(after_help = AFTER_HELP)]
pub struct CreateArgs {
    /// Folder that the image paths in the label file are relative to.
    #[arg(long)]
    pub images: PathBuf,
    /// Label file: `relative/path<TAB>label` per line, UTF-8 (the `labels.tsv` format of folder datasets).
    #[arg(long)]
    pub labels: PathBuf,
    /// Output LMDB folder (created; must not already hold a dataset).
    #[arg(long)]
    pub out: PathBuf,
}

/// Why a record of the label file is not written.
#[derive(Debug)]
enum Problem {
    /// The line is not `path<TAB>label`, or not UTF-8; the error names the label file and the line.
    Line(DataError),
    /// The label is empty or only whitespace.
    EmptyLabel,
    /// The label holds a control character (a TAB usually means a third column).
    ControlInLabel(char),
    /// The image file does not exist.
    MissingFile,
    /// The image file exists but cannot be read.
    Unreadable(std::io::Error),
    /// The image bytes do not decode (the reference's `checkImageIsValid`).
    BadImage(String),
}

impl Problem {
    /// Summary category, singular.
    fn kind(&self) -> &'static str {
        match self {
            Problem::Line(_) => "malformed line",
            Problem::EmptyLabel | Problem::ControlInLabel(_) => "bad label",
            Problem::MissingFile => "missing file",
            Problem::Unreadable(_) | Problem::BadImage(_) => "bad image",
        }
    }
}

/// Whether a label is worth storing: not blank, and free of control characters (which no line-based label
/// file can carry faithfully).
fn check_label(label: &str) -> Result<(), Problem> {
    if label.trim().is_empty() {
        return Err(Problem::EmptyLabel);
    }
    match label.chars().find(|c| c.is_control()) {
        Some(c) => Err(Problem::ControlInLabel(c)),
        None => Ok(()),
    }
}

/// Reads and checks record `index`: its label and its image bytes, decoded once to prove they are an image.
fn check_record(dataset: &FolderDataset, index: usize) -> Result<(String, Vec<u8>), Problem> {
    let label = dataset.label(index).map_err(Problem::Line)?;
    check_label(&label)?;
    let bytes = match dataset.image(index) {
        Ok(bytes) => bytes,
        Err(DataError::Io { error: source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Err(Problem::MissingFile)
        }
        Err(DataError::Io { error: source, .. }) => return Err(Problem::Unreadable(source)),
        Err(other) => return Err(Problem::Line(other)),
    };
    let image = decode_rgb(&bytes).map_err(|e| Problem::BadImage(e.to_string()))?;
    if image.width() == 0 || image.height() == 0 {
        return Err(Problem::BadImage(format!(
            "image has no pixels ({}x{})",
            image.width(),
            image.height()
        )));
    }
    Ok((label, bytes))
}

/// One stderr line naming the record's file and line and what is wrong with it.
fn describe(dataset: &FolderDataset, index: usize, problem: &Problem) -> String {
    let labels = dataset.path().display();
    let line = dataset.line(index).unwrap_or(index + 1);
    let file = dataset.key(index);
    let image = dataset.root().join(&file);
    let image = image.display();
    match problem {
        Problem::Line(error) => error.to_string(),
        Problem::EmptyLabel => format!("{labels}: line {line}: {file}: empty label"),
        Problem::ControlInLabel('\t') => {
            format!("{labels}: line {line}: {file}: label holds a TAB (more than two columns?)")
        }
        Problem::ControlInLabel(c) => format!(
            "{labels}: line {line}: {file}: label holds control character U+{:04X}",
            u32::from(*c)
        ),
        Problem::MissingFile => format!("{image}: no such file (line {line} of {labels})"),
        Problem::Unreadable(error) => format!("{image}: {error} (line {line} of {labels})"),
        Problem::BadImage(reason) => format!("{image}: {reason} (line {line} of {labels})"),
    }
}

/// Refuses an output path that is a file or already holds a dataset, before any work is done.
fn check_output(out: &Path) -> anyhow::Result<()> {
    if out.exists() && !out.is_dir() {
        anyhow::bail!("{}: exists and is not a folder", out.display());
    }
    for (file, kind) in [
        (LMDB_DATA_FILE, "an LMDB"),
        (LABELS_FILE, "a labels.tsv dataset"),
    ] {
        let path = out.join(file);
        if path.exists() {
            anyhow::bail!(
                "{}: already holds {kind} ({}); refusing to overwrite it",
                out.display(),
                path.display()
            );
        }
    }
    Ok(())
}

/// `3 bad images, 1 missing file`.
fn summary(skipped: &BTreeMap<&str, usize>) -> String {
    skipped
        .iter()
        .map(|(kind, &n)| format!("{n} {kind}{}", if n == 1 { "" } else { "s" }))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn run(args: CreateArgs) -> anyhow::Result<ExitCode> {
    if !args.images.is_dir() {
        let problem = if args.images.exists() {
            "is not a folder"
        } else {
            "no such folder"
        };
        anyhow::bail!("--images {}: {problem}", args.images.display());
    }
    check_output(&args.out)?;
    let dataset = FolderDataset::from_tsv_with_root(&args.labels, &args.images)
        .context("reading the label file")?;
    let total = dataset.len();
    if total == 0 {
        anyhow::bail!("{}: no records (empty label file)", args.labels.display());
    }

    let progress = progress_bar(total, "create");
    let mut writer: Option<LmdbWriter> = None;
    let mut skipped: BTreeMap<&str, usize> = BTreeMap::new();
    for chunk_start in (0..total).step_by(CHUNK) {
        let chunk_end = (chunk_start + CHUNK).min(total);
        let checked: Vec<_> = (chunk_start..chunk_end)
            .into_par_iter()
            .map(|index| check_record(&dataset, index))
            .collect();
        for (index, record) in (chunk_start..chunk_end).zip(checked) {
            match record {
                Ok((label, bytes)) => {
                    if writer.is_none() {
                        // Created on the first good record, so that a run with none leaves nothing behind.
                        writer = Some(LmdbWriter::create(&args.out).map_err(|e| {
                            crate::error_chain::name_path_once(e, &args.out, "creating")
                        })?);
                    }
                    writer
                        .as_mut()
                        .expect("the writer was created above")
                        .push(&bytes, &label)
                        .context("writing the LMDB")?;
                }
                Err(problem) => {
                    progress.suspend(|| {
                        eprintln!("error: {}", describe(&dataset, index, &problem));
                    });
                    *skipped.entry(problem.kind()).or_default() += 1;
                }
            }
        }
        progress.inc((chunk_end - chunk_start) as u64);
    }
    progress.finish_and_clear();

    let skipped_total: usize = skipped.values().sum();
    let Some(writer) = writer else {
        anyhow::bail!(
            "{}: none of the {total} records is usable ({}); nothing written",
            args.labels.display(),
            summary(&skipped)
        );
    };
    let written = writer.finish().context("writing the LMDB")?;
    eprintln!(
        "data create: wrote {written} images to {}",
        args.out.display()
    );
    if skipped_total > 0 {
        eprintln!(
            "data create: skipped {skipped_total} of {total} records ({})",
            summary(&skipped)
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked() {
        assert!(check_label("Hello World").is_ok());
        assert!(check_label(" x ").is_ok());
        assert!(matches!(check_label(""), Err(Problem::EmptyLabel)));
        assert!(matches!(check_label(" \u{3000}"), Err(Problem::EmptyLabel)));
        assert!(matches!(
            check_label("a\tb"),
            Err(Problem::ControlInLabel('\t'))
        ));
        assert!(matches!(
            check_label("a\rb"),
            Err(Problem::ControlInLabel('\r'))
        ));
    }

    #[test]
    fn summary_pluralises() {
        let skipped = BTreeMap::from([("bad image", 2), ("missing file", 1)]);
        assert_eq!(summary(&skipped), "2 bad images, 1 missing file");
    }
}
