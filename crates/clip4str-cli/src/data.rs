//! `clip4str data`: build a reference-layout LMDB from an image folder and a label file (`data create`), and
//! summarise a dataset with a contact sheet (`data show`).

mod create;
mod sheet;
mod show;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Arguments of `clip4str data`.
#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

/// The `data` subcommands.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write an LMDB from images listed in a label file (the reference's create_lmdb_dataset.py).
    ///
    /// The LMDB has the reference layout: num-samples, image-%09d and label-%09d numbered from 1. Images are
    /// checked by decoding them and stored unchanged.
    Create(create::CreateArgs),
    /// Print a dataset's counts, label-length histogram and charset coverage, and draw a contact sheet.
    Show(show::ShowArgs),
}

pub fn run(args: DataArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        DataCommand::Create(args) => create::run(args),
        DataCommand::Show(args) => show::run(args),
    }
}

/// A progress bar on stderr when it is a terminal, hidden otherwise.
fn progress_bar(len: usize, prefix: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    let template = format!("{prefix} {{bar:40}} {{pos}}/{{len}} {{per_sec}} eta {{eta}}");
    bar.set_style(
        ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}
