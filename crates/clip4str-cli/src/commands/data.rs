//! `clip4str data`: build a reference-layout LMDB from an image folder and a label file (`data create`), and
//! summarise a dataset with a contact sheet (`data show`).

mod create;
mod sheet;
mod show;

use std::process::ExitCode;

use clap::{Args, Subcommand};

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

/// A progress bar for a `data` subcommand, named by `prefix`.
fn progress_bar(len: usize, prefix: &str) -> indicatif::ProgressBar {
    crate::output::progress_bar(
        len,
        &format!("{prefix} {{bar:40}} {{pos}}/{{len}} {{per_sec}} eta {{eta}}"),
    )
}
