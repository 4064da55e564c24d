//! `clip4str synth`: write a synthetic training set (an LMDB in the reference layout), or a folder of PNGs
//! with `labels.tsv` for looking at. Samples are rendered in parallel in chunks and written in index order,
//! so the output is the same for any `--threads`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use clip4str::data::synth::{
    find_sources, FontSplit, OutputFormat, SkipReason, SynthConfig, SynthError, Synthesizer,
    MAX_LABEL_LENGTH,
};
use clip4str::data::LmdbWriter;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

/// Samples rendered per parallel chunk before they are written in order.
const CHUNK: u64 = 512;

/// Which fonts to draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SplitArg {
    /// Every usable font.
    All,
    /// Fonts whose family is not held out (for training sets).
    Train,
    /// The ~10% held-out families (for a test set with unseen fonts).
    Heldout,
}

/// Encoded image format in the LMDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Lossless PNG.
    Png,
    /// JPEG at a random quality per sample (55-95).
    Jpeg,
}

/// Arguments of `clip4str synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output LMDB folder (created; must not already hold a dataset).
    #[arg(
        long,
        required_unless_present_any = ["preview", "list_fonts"],
        conflicts_with = "preview"
    )]
    pub out: Option<PathBuf>,
    /// Number of images.
    #[arg(long, required_unless_present = "list_fonts", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Font files or folders searched for .ttf/.otf (default: the system font folders).
    #[arg(long, num_args = 1..)]
    pub fonts: Vec<PathBuf>,
    /// Word list, one word per line (default: /usr/share/dict/words if present, else a built-in list).
    #[arg(long)]
    pub words: Option<PathBuf>,
    /// Dataset seed; image i depends only on (seed, i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Index of the first image, to extend a dataset or generate shards of one.
    #[arg(long, default_value_t = 0)]
    pub start: u64,
    /// Emit every image at this fixed size, HEIGHTxWIDTH (e.g. 32x128); default: natural crop size.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<[u32; 2]>,
    /// Natural crop height range in pixels, MIN-MAX.
    #[arg(long, value_parser = parse_range, default_value = "32-64")]
    pub height: [u32; 2],
    /// Longest label in characters (1-25); shorter words make an easier set for the start of training.
    #[arg(long, default_value_t = MAX_LABEL_LENGTH, value_parser = parse_max_length)]
    pub max_length: usize,
    /// Share of labels drawn long (12 to --max-length characters, lengths spread evenly), e.g. 0.25: the
    /// natural mix has few of 16 or more characters. 0 keeps the images of a set made without the option.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub long_share: f32,
    /// Fonts to draw from: all, or one side of the held-out font split.
    #[arg(long, value_enum, default_value_t = SplitArg::All)]
    pub font_split: SplitArg,
    /// Image encoding stored in the LMDB.
    #[arg(long, value_enum, default_value_t = FormatArg::Png)]
    pub format: FormatArg,
    /// Write the images as DIR/NNNNNNNN.png plus DIR/labels.tsv instead of an LMDB, for eyeballing.
    #[arg(long)]
    pub preview: Option<PathBuf>,
    /// Print the font families this split draws from (family, then its files) and exit: for checking
    /// which designs a training or held-out set will hold before rendering it.
    #[arg(long, conflicts_with_all = ["out", "preview"])]
    pub list_fonts: bool,
}

fn parse_size(text: &str) -> Result<[u32; 2], String> {
    let (h, w) = text
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{text:?} is not HEIGHTxWIDTH (e.g. 32x128)"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("{v:?} in {text:?} is not a pixel count"))
    };
    Ok([parse(h)?, parse(w)?])
}

fn parse_share(text: &str) -> Result<f32, String> {
    match text.trim().parse::<f32>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{text:?} is not a share from 0 to 1")),
    }
}

fn parse_max_length(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_LABEL_LENGTH).contains(&n) => Ok(n),
        _ => Err(format!(
            "{text:?} is not a label length from 1 to {MAX_LABEL_LENGTH}"
        )),
    }
}

fn parse_range(text: &str) -> Result<[u32; 2], String> {
    let (lo, hi) = text.split_once('-').unwrap_or((text, text));
    let parse = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("{v:?} in {text:?} is not a pixel count"))
    };
    Ok([parse(lo)?, parse(hi)?])
}

/// One line summarising the fonts: how many are used and why others were not.
fn font_summary(synth: &Synthesizer) -> String {
    let report = synth.font_report();
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for skipped in &report.skipped {
        let kind = match skipped.reason {
            SkipReason::Unreadable(_) => "unreadable",
            SkipReason::NotAFont => "not a font",
            SkipReason::MissingGlyphs(_) => "no Latin alphanumerics",
            SkipReason::CapsOnly => "capitals only",
            SkipReason::SymbolFont(_) => "symbol fonts",
            SkipReason::Duplicate(_) => "duplicates",
        };
        *reasons.entry(kind).or_default() += 1;
    }
    let mut line = format!(
        "{} fonts in {} families",
        report.loaded.len(),
        report.families.len()
    );
    if !reasons.is_empty() {
        let parts: Vec<String> = reasons.iter().map(|(k, n)| format!("{n} {k}")).collect();
        line += &format!(", skipped {}", parts.join(", "));
    }
    if report.other_split > 0 {
        line += &format!(", {} in the other split", report.other_split);
    }
    line
}

/// Fewer default font families than this gets a note: a model trained on a handful of faces reads little else.
const FEW_FAMILIES: usize = 20;

/// One note when the default sources are thin (few system fonts, or the built-in word list), naming the script
/// that installs what the bundled model was trained on; `None` when the user chose the fonts or there are many.
fn thin_sources_note(
    default_fonts: bool,
    families: usize,
    built_in_words: Option<usize>,
) -> Option<String> {
    let mut thin = Vec::new();
    if default_fonts && families < FEW_FAMILIES {
        thin.push(format!("{families} font families"));
    }
    if let Some(words) = built_in_words {
        thin.push(format!("the built-in list of {words} words"));
    }
    (!thin.is_empty()).then(|| {
        format!(
            "note: drawing from {} only; scripts/install-fonts.sh installs the fonts (189 training families) \
             and the word list the bundled model was trained on, or pass --fonts DIR / --words FILE",
            thin.join(" and ")
        )
    })
}

pub fn run(args: SynthArgs) -> anyhow::Result<ExitCode> {
    let sources =
        find_sources(&args.fonts, args.words.as_deref(), args.max_length).map_err(|e| match e {
            SynthError::NoFontFiles { .. } => {
                anyhow::anyhow!("{e}; install some (scripts/install-fonts.sh) or pass --fonts DIR")
            }
            e => anyhow::anyhow!("reading the word list: {e}"),
        })?;
    let cfg = SynthConfig {
        seed: args.seed,
        fonts: sources.fonts,
        font_split: match args.font_split {
            SplitArg::All => FontSplit::All,
            SplitArg::Train => FontSplit::Train,
            SplitArg::Heldout => FontSplit::Heldout,
        },
        words: sources.words,
        size: args.size,
        height: args.height,
        max_label_length: args.max_length,
        long_share: args.long_share,
    };
    let synth = Synthesizer::new(cfg).context("setting up the synthesizer")?;
    for skipped in &synth.font_report().skipped {
        if matches!(
            skipped.reason,
            SkipReason::Unreadable(_) | SkipReason::NotAFont
        ) {
            eprintln!("warning: {}: {}", skipped.path.display(), skipped.reason);
        }
    }
    eprintln!(
        "synth: {}; {} words{}",
        font_summary(&synth),
        synth.num_words(),
        sources
            .word_file
            .as_ref()
            .map(|p| format!(" from {}", p.display()))
            .unwrap_or_else(|| " (built-in list)".to_owned())
    );
    if let Some(note) = thin_sources_note(
        args.fonts.is_empty(),
        synth.font_report().families.len(),
        sources.word_file.is_none().then(|| synth.num_words()),
    ) {
        eprintln!("{note}");
    }
    if args.list_fonts {
        let mut out = std::io::stdout().lock();
        for (family, files) in synth.font_families() {
            let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            writeln!(out, "{family}\t{}", files.join("\t"))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let count = args
        .count
        .context("--count is required unless --list-fonts is given")?;

    let format = match (args.format, &args.preview) {
        (_, Some(_)) | (FormatArg::Png, None) => OutputFormat::Png,
        (FormatArg::Jpeg, None) => OutputFormat::Jpeg,
    };
    let mut sink = match (&args.preview, &args.out) {
        (Some(dir), _) => Sink::preview(dir)?,
        (None, Some(out)) => Sink::Lmdb(
            LmdbWriter::create(out)
                .map_err(|e| crate::error_chain::name_path_once(e, out, "creating"))?,
        ),
        (None, None) => anyhow::bail!("give --out LMDB_DIR or --preview DIR"),
    };

    let progress = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(Some(count), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("synth {bar:40} {pos}/{len} {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    let end = args
        .start
        .checked_add(count)
        .context("--start + --count overflows")?;
    let mut chunk_start = args.start;
    while chunk_start < end {
        let chunk_end = chunk_start.saturating_add(CHUNK).min(end);
        let rendered: Vec<_> = (chunk_start..chunk_end)
            .into_par_iter()
            .map(|index| synth.render_encoded(index, format))
            .collect();
        for (index, sample) in (chunk_start..chunk_end).zip(rendered) {
            let (label, bytes) = sample.with_context(|| format!("rendering image {index}"))?;
            sink.push(index, &bytes, &label)?;
        }
        progress.inc(chunk_end - chunk_start);
        chunk_start = chunk_end;
    }
    let written = sink.finish()?;
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let target = args.out.as_ref().or(args.preview.as_ref());
    eprintln!(
        "synth: wrote {written} images to {} in {seconds:.1} s ({:.0} images/s)",
        target.map(|p| p.display().to_string()).unwrap_or_default(),
        written as f64 / seconds.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

/// Where rendered samples go.
enum Sink {
    Lmdb(LmdbWriter),
    Preview {
        dir: PathBuf,
        labels: std::io::BufWriter<std::fs::File>,
        count: usize,
    },
}

impl Sink {
    fn preview(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("labels.tsv");
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Sink::Preview {
            dir: dir.to_owned(),
            labels: std::io::BufWriter::new(file),
            count: 0,
        })
    }

    fn push(&mut self, index: u64, bytes: &[u8], label: &str) -> anyhow::Result<()> {
        match self {
            Sink::Lmdb(writer) => {
                writer.push(bytes, label)?;
            }
            Sink::Preview { dir, labels, count } => {
                let name = format!("{index:08}.png");
                let path = dir.join(&name);
                std::fs::write(&path, bytes)
                    .with_context(|| format!("writing {}", path.display()))?;
                writeln!(labels, "{name}\t{label}")
                    .with_context(|| format!("writing {}", dir.join("labels.tsv").display()))?;
                *count += 1;
            }
        }
        Ok(())
    }

    fn finish(self) -> anyhow::Result<usize> {
        match self {
            Sink::Lmdb(writer) => Ok(writer.finish()?),
            Sink::Preview {
                dir,
                mut labels,
                count,
            } => {
                labels
                    .flush()
                    .with_context(|| format!("writing {}", dir.join("labels.tsv").display()))?;
                Ok(count)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ranges_parse() {
        assert_eq!(parse_size("32x128"), Ok([32, 128]));
        assert_eq!(parse_size("64X256"), Ok([64, 256]));
        assert!(parse_size("32").is_err() && parse_size("ax3").is_err());
        assert_eq!(parse_range("32-64"), Ok([32, 64]));
        assert_eq!(parse_range("48"), Ok([48, 48]));
        assert!(parse_range("x-3").is_err());
    }

    #[test]
    fn thin_default_sources_get_one_note() {
        let note = thin_sources_note(true, 4, Some(274)).expect("a note");
        assert!(
            note.contains("4 font families and the built-in list of 274 words"),
            "{note}"
        );
        assert!(note.contains("scripts/install-fonts.sh"), "{note}");
        assert!(thin_sources_note(true, 4, None).is_some_and(|n| !n.contains("built-in")));
        // Fonts the user chose, or plenty of them, with a real word list: nothing to say.
        assert_eq!(thin_sources_note(false, 4, None), None);
        assert_eq!(thin_sources_note(true, 189, None), None);
    }
}
