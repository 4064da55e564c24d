//! `clip4str data show`: what a dataset holds. Reads every label (in parallel chunks), prints the counts, a
//! label-length histogram and the coverage of the 94-character training charset, and draws a contact sheet of
//! samples spread evenly over the dataset. Only reads the dataset; damaged records are counted and named.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use clip4str::charset::CHARSET_94;
use clip4str::data::{open_dataset, Dataset, LabelStats};
use clip4str::preprocess::decode_rgb;
use image::{ImageFormat, RgbImage};
use rayon::prelude::*;

use super::progress_bar;
use super::sheet::{self, Tile};
use crate::output::print_stdout;

/// Records read per parallel chunk.
const CHUNK: usize = 4096;
/// Labels longer than this share one histogram row (the reference's default max_label_length is 25).
const HISTOGRAM_OPEN_FROM: usize = 26;
/// Width of the longest histogram bar in characters.
const BAR_WIDTH: u64 = 40;
/// Unreadable records named one by one on stderr; the rest are only counted.
const MAX_NAMED: usize = 100;

const AFTER_HELP: &str = "\
Exit status: 0 when every record read was readable; 1 when some were not (each named on stderr, the first 100);
2 on a usage or I/O error.";

/// Arguments of `clip4str data show`.
#[derive(Debug, Args)]
#[command(after_help = AFTER_HELP)]
pub struct ShowArgs {
    /// Dataset: an LMDB folder (`data.mdb`), a folder with `labels.tsv`, or a `.tsv` label file.
    pub dataset: PathBuf,
    /// Samples on the contact sheet, spread evenly over the dataset; 0 draws no sheet.
    #[arg(short = 'n', long = "n", default_value_t = 32)]
    pub n: usize,
    /// Contact sheet PNG to write [default: `<dataset name>-sheet.png` in the current folder].
    #[arg(long)]
    pub sheet: Option<PathBuf>,
    /// Decode every image to count undecodable ones too (slower); otherwise every label is read but only the
    /// sheet's images.
    #[arg(long)]
    pub check_images: bool,
}

/// What one record contributed: its label, and why it is unreadable if it is.
type Scanned = (Option<String>, Option<String>);

/// Reads record `index`'s label and, with `check_image`, decodes its image.
fn scan(dataset: &dyn Dataset, index: usize, check_image: bool) -> Scanned {
    let label = match dataset.label(index) {
        Ok(label) => label,
        Err(error) => return (None, Some(error.to_string())),
    };
    let problem = if check_image {
        read_image(dataset, index).err()
    } else {
        None
    };
    (Some(label), problem)
}

/// Reads and decodes record `index`'s image; the error names the record.
fn read_image(dataset: &dyn Dataset, index: usize) -> Result<RgbImage, String> {
    let bytes = dataset.image(index).map_err(|e| e.to_string())?;
    decode_rgb(&bytes)
        .map_err(|e| format!("{}: {}: {e}", dataset.path().display(), dataset.key(index)))
}

/// `n` record indices spread evenly over `len` records (all of them when `n >= len`).
fn spread(len: usize, n: usize) -> Vec<usize> {
    if n >= len {
        return (0..len).collect();
    }
    (0..n).map(|i| i * len / n).collect()
}

/// `<dataset name>-sheet.png`, with path separators in the name replaced.
fn default_sheet_path(name: &str) -> PathBuf {
    let stem: String = name
        .chars()
        .map(|c| {
            if matches!(c, '/' | '\\' | ':') {
                '_'
            } else {
                c
            }
        })
        .collect();
    let stem = if stem.is_empty() || stem == "." || stem == ".." {
        "dataset".to_owned()
    } else {
        stem
    };
    PathBuf::from(format!("{stem}-sheet.png"))
}

/// A character for the report: itself when printable ASCII, else quoted with its code point.
fn show_char(c: char) -> String {
    if c.is_ascii_graphic() {
        c.to_string()
    } else {
        format!("{c:?} U+{:04X}", u32::from(c))
    }
}

/// The printed report: counts, histogram, charset coverage and character counts.
fn report(dataset: &dyn Dataset, stats: &LabelStats, unreadable: usize, checked: bool) -> String {
    let mut out = String::new();
    let total = dataset.len();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "dataset: {} ({})",
        dataset.name(),
        dataset.path().display()
    );
    let _ = writeln!(out, "samples: {total}");
    let scope = if checked {
        "labels and images checked"
    } else {
        "labels and the sheet's images checked; --check-images decodes all"
    };
    let _ = writeln!(out, "unreadable records: {unreadable} ({scope})");

    let _ = writeln!(out, "\nlabel length (characters, as stored):");
    let bins = stats.length_histogram(HISTOGRAM_OPEN_FROM);
    let largest = bins.iter().map(|b| b.count).max().unwrap_or(0).max(1);
    for bin in &bins {
        let name = match bin.max {
            Some(_) => bin.min.to_string(),
            None => format!("{}+", bin.min),
        };
        let mut bar = bin.count * BAR_WIDTH / largest;
        if bin.count > 0 && bar == 0 {
            bar = 1;
        }
        let share = 100.0 * bin.count as f64 / stats.labels.max(1) as f64;
        let _ = writeln!(
            out,
            "  {name:>3} |{:<width$} {} ({share:.1}%)",
            "#".repeat(bar as usize),
            bin.count,
            width = BAR_WIDTH as usize
        );
    }

    let coverage = stats.coverage(CHARSET_94);
    let _ = writeln!(
        out,
        "\ncharset: {} of the {} training characters occur",
        coverage.seen.len(),
        CHARSET_94.chars().count()
    );
    let never: String = if coverage.missing.is_empty() {
        "none".to_owned()
    } else {
        coverage.missing.iter().collect()
    };
    let _ = writeln!(out, "  never: {never}");
    let outside_total: u64 = coverage.outside.iter().map(|(_, n)| n).sum();
    let _ = writeln!(
        out,
        "  outside it: {} distinct, {outside_total} occurrences",
        coverage.outside.len()
    );
    write_counts(&mut out, coverage.outside.iter().copied());
    let _ = writeln!(out, "\ncharacter counts:");
    write_counts(&mut out, coverage.seen.iter().copied());
    out
}

/// `char count` entries wrapped to about 100 columns, indented.
fn write_counts(out: &mut String, counts: impl Iterator<Item = (char, u64)>) {
    let mut line = String::new();
    for (c, count) in counts {
        let entry = format!("{} {count}", show_char(c));
        if !line.is_empty() && line.len() + entry.len() + 3 > 100 {
            let _ = writeln!(out, "   {line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push_str("  ");
        }
        line.push_str(&entry);
    }
    if !line.is_empty() {
        let _ = writeln!(out, "   {line}");
    }
}

fn write_png(image: &RgbImage, path: &Path) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut writer = std::io::BufWriter::new(file);
    image
        .write_to(&mut writer, ImageFormat::Png)
        .with_context(|| format!("writing {}", path.display()))?;
    writer
        .flush()
        .with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: ShowArgs) -> anyhow::Result<ExitCode> {
    if let Some(parent) = args.sheet.as_deref().and_then(Path::parent) {
        if !parent.as_os_str().is_empty() && !parent.is_dir() {
            anyhow::bail!("--sheet: folder {} does not exist", parent.display());
        }
    }
    if !args.dataset.exists() {
        anyhow::bail!("{}: no such dataset or folder", args.dataset.display());
    }
    let dataset = open_dataset(&args.dataset)?;
    let dataset = dataset.as_ref();
    let total = dataset.len();

    let progress = progress_bar(total, "show");
    let mut stats = LabelStats::default();
    // First problem of each unreadable record, by index.
    let mut unreadable: BTreeMap<usize, String> = BTreeMap::new();
    for chunk_start in (0..total).step_by(CHUNK) {
        let chunk_end = (chunk_start + CHUNK).min(total);
        let scanned: Vec<Scanned> = (chunk_start..chunk_end)
            .into_par_iter()
            .map(|index| scan(dataset, index, args.check_images))
            .collect();
        for (index, (label, problem)) in (chunk_start..chunk_end).zip(scanned) {
            if let Some(label) = label {
                stats.add(&label);
            }
            if let Some(problem) = problem {
                unreadable.insert(index, problem);
            }
        }
        progress.inc((chunk_end - chunk_start) as u64);
    }
    progress.finish_and_clear();

    let sample_indices = spread(total, args.n);
    let tiles: Vec<Tile> = sample_indices
        .par_iter()
        .map(|&index| {
            let label = dataset.label(index).ok();
            let image = read_image(dataset, index);
            (index, label, image)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|(index, label, image)| {
            let image = match image {
                Ok(image) => Some(image),
                Err(problem) => {
                    unreadable.entry(index).or_insert(problem);
                    None
                }
            };
            let caption = label.unwrap_or_else(|| "(unreadable)".to_owned());
            Tile { image, caption }
        })
        .collect();

    for problem in unreadable.values().take(MAX_NAMED) {
        eprintln!("error: {problem}");
    }
    if unreadable.len() > MAX_NAMED {
        eprintln!(
            "error: ... and {} more unreadable records",
            unreadable.len() - MAX_NAMED
        );
    }
    print_stdout(&report(
        dataset,
        &stats,
        unreadable.len(),
        args.check_images,
    ))?;

    if !tiles.is_empty() {
        let path = args
            .sheet
            .clone()
            .unwrap_or_else(|| default_sheet_path(dataset.name()));
        let image = sheet::render(&tiles);
        write_png(&image, &path)?;
        print_stdout(&format!(
            "\nsheet: {} ({} samples, {}x{} pixels)\n",
            path.display(),
            tiles.len(),
            image.width(),
            image.height()
        ))?;
    } else if args.sheet.is_some() {
        eprintln!("warning: no sheet written: the dataset has no records or -n is 0");
    }
    if unreadable.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_spread_over_the_dataset() {
        assert_eq!(spread(3, 32), [0, 1, 2]);
        assert_eq!(spread(100, 4), [0, 25, 50, 75]);
        assert_eq!(spread(10, 3), [0, 3, 6]);
        assert!(spread(5, 0).is_empty());
    }

    #[test]
    fn sheet_names_and_characters() {
        assert_eq!(
            default_sheet_path("IIIT5k"),
            PathBuf::from("IIIT5k-sheet.png")
        );
        assert_eq!(
            default_sheet_path("crops/labels_alt"),
            PathBuf::from("crops_labels_alt-sheet.png")
        );
        assert_eq!(default_sheet_path(""), PathBuf::from("dataset-sheet.png"));
        assert_eq!(show_char('a'), "a");
        assert_eq!(show_char(' '), "' ' U+0020");
        assert_eq!(show_char('é'), "'é' U+00E9");
    }
}
