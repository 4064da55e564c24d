//! `clip4str models`: list the model names `--model` accepts, and download released checkpoints into the
//! Hugging Face cache.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use clip4str::family::{identify, ModelConfig};
use serde::Serialize;

use crate::hub::{self, HubOptions};
use crate::registry::{self, ModelEntry, Source};

/// Arguments of `clip4str models`.
#[derive(Debug, Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    command: ModelsCommand,
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// List the model names with backbone, training data, size, source and whether they are cached.
    List(ListArgs),
    /// Download a released model into the Hugging Face cache, check that it loads, and print its path.
    Download(DownloadArgs),
}

/// Output formats of `models list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
enum ListFormat {
    /// An aligned table.
    #[default]
    Text,
    /// One JSON array of objects.
    Json,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: ListFormat,
}

#[derive(Debug, Args)]
struct DownloadArgs {
    /// Model name (see `clip4str models list`).
    name: String,
    /// Only look in the cache; fail if the model is not there (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// Hub address (default: $HF_ENDPOINT or https://huggingface.co), e.g. a mirror.
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
}

/// Runs `models`.
pub fn run(args: ModelsArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        ModelsCommand::List(list) => run_list(list),
        ModelsCommand::Download(download) => run_download(download),
    }
}

/// One row of `models list`.
#[derive(Serialize)]
struct Listed {
    #[serde(flatten)]
    entry: ModelEntry,
    /// Usable without a download: bundled, or the file is in the cache.
    cached: bool,
    /// The cached file, for Hub models.
    path: Option<String>,
}

fn run_list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let mut rows = Vec::new();
    for entry in registry::models() {
        let path = match &entry.source {
            Source::Hub(file) => hub::cached(file)?,
            Source::Bundled | Source::Manual { .. } => None,
        };
        let cached = path.is_some() || entry.source == Source::Bundled;
        rows.push(Listed {
            entry,
            cached,
            path: path.map(|p| p.display().to_string()),
        });
    }
    let text = match args.format {
        ListFormat::Json => serde_json::to_string_pretty(&rows)? + "\n",
        ListFormat::Text => table(&rows),
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // The reader went away (`| head`): stop quietly like other Unix tools.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        other => other.context("writing output").map(|()| ExitCode::SUCCESS),
    }
}

/// `models list` as an aligned table, with the entries' notes below it.
fn table(rows: &[Listed]) -> String {
    let header = [
        "NAME",
        "MODEL",
        "BACKBONE",
        "PRE-TRAINING",
        "TRAIN DATA",
        "SIZE",
        "CACHED",
        "SOURCE",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|row| {
            let e = &row.entry;
            let (cached, source) = match &e.source {
                Source::Bundled => (
                    "built in".to_string(),
                    "compiled into the binary".to_string(),
                ),
                Source::Hub(f) => (
                    if row.cached { "yes" } else { "no" }.to_string(),
                    format!("hf:{}/{}", f.repo, f.file),
                ),
                Source::Manual { url, file } => (
                    "manual".to_string(),
                    match file {
                        Some(file) if !url.ends_with(file.as_str()) => format!("{url} ({file})"),
                        _ => url.clone(),
                    },
                ),
            };
            [
                e.name.clone(),
                e.variant.to_string(),
                e.backbone.to_string(),
                e.pretraining.to_string(),
                e.train_data.to_string(),
                registry::format_size(e.approx_bytes),
                cached,
                source,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cols: &[&str]| {
        for (i, (cell, w)) in cols.iter().zip(widths).enumerate() {
            if i + 1 == cols.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push('\n');
    };
    line(&header);
    for row in &cells {
        line(&row.each_ref().map(String::as_str));
    }
    out.push_str(
        "\nSizes are estimates (f32 weights). `manual` models are not on the Hugging Face Hub: download them \
         yourself and pass --checkpoint FILE.\n",
    );
    for row in rows {
        if let Some(note) = row.entry.note {
            out.push_str(&format!("{}: {note}\n", row.entry.name));
        }
    }
    out
}

fn run_download(args: DownloadArgs) -> anyhow::Result<ExitCode> {
    let entry = registry::find(&args.name)?;
    let file = match &entry.source {
        Source::Hub(file) => file,
        Source::Bundled => {
            eprintln!(
                "{} is compiled into the binary; nothing to download",
                entry.name
            );
            return Ok(ExitCode::SUCCESS);
        }
        Source::Manual { url, .. } => anyhow::bail!(
            "model {:?} is not on the Hugging Face Hub; download it from {url} and pass --checkpoint FILE",
            entry.name
        ),
    };
    let opts = HubOptions {
        offline: args.offline,
        endpoint: args.endpoint,
    };
    let fetched = hub::fetch(file, entry.approx_bytes, &opts)
        .with_context(|| format!("getting model {:?}", entry.name))?;
    if !fetched.downloaded {
        eprintln!("{} is already in the cache", entry.name);
    }
    let raw = hub::read_cached_checkpoint(&fetched.path)
        .with_context(|| format!("checking model {:?}", entry.name))?;
    let config = identify(&raw, None)
        .with_context(|| {
            format!(
                "{} is a checkpoint but not a model this build can load",
                fetched.path.display()
            )
        })?
        .config;
    let ModelConfig::Clip4Str(cfg) = config else {
        anyhow::bail!(
            "{} is a {} checkpoint; the model list names CLIP4STR files only",
            fetched.path.display(),
            config.family().name()
        );
    };
    eprintln!(
        "{}: {:?}, {} tensors; image encoder {}x{} (patch {}x{}), text encoder {}x{}, decoder {}",
        entry.name,
        raw.format,
        raw.tensors.len(),
        cfg.vision.width,
        cfg.vision.layers,
        cfg.vision.patch_size[0],
        cfg.vision.patch_size[1],
        cfg.text.width,
        cfg.text.layers,
        cfg.decoder.dim,
    );
    println!("{}", fetched.path.display());
    Ok(ExitCode::SUCCESS)
}
