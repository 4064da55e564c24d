//! `clip4str`: read scene text with CLIP4STR from the command line.

mod commands;
mod device;
mod error_chain;
mod hub;
mod model_file;
mod model_source;
mod output;
mod registry;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands::{
    average, bench, compare, convert, data, eval, models, read, serve, synth, train,
};

/// mimalloc keeps freed tensor buffers for reuse; glibc returns large ones to the kernel and every new
/// tensor then page-faults afresh (measured: training backward 30 % slower, much of it in the kernel).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CLIP4STR scene-text recognition.
#[derive(Debug, Parser)]
#[command(name = "clip4str", version, about)]
struct Cli {
    /// Worker threads for the model and image decoding (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read the text in word-crop images and print `path<TAB>text<TAB>confidence`.
    Read(read::ReadArgs),
    /// Score a checkpoint on LMDB benchmarks or labelled image folders (the reference test.py table).
    Eval(eval::EvalArgs),
    /// Train or fine-tune CLIP4STR (permuted sequence modelling with the cross-modal loss).
    Train(train::TrainArgs),
    /// Generate synthetic word images (MJSynth-style) into an LMDB for training.
    Synth(synth::SynthArgs),
    /// Time each stage of a read (encoder, decoders, text encoder, refinement) and report images/s.
    Bench(bench::BenchArgs),
    /// Convert any loadable checkpoint to a self-describing safetensors file (optionally f16/bf16).
    Convert(convert::ConvertArgs),
    /// Average the weights of several checkpoints of one model (a model soup) into one safetensors file.
    Average(average::AverageArgs),
    /// Compare two models image by image from their `eval --dump` files (exact McNemar test per dataset).
    Compare(compare::CompareArgs),
    /// Build an LMDB from images and a label file, or summarise a dataset (counts, label lengths, charset,
    /// contact sheet).
    Data(data::DataArgs),
    /// List the model names `--model` accepts, or download a released checkpoint into the Hugging Face cache.
    Models(models::ModelsArgs),
    /// Serve recognition over HTTP (`POST /v1/read`) with dynamic batching, metrics and a demo web page.
    Serve(serve::ServeArgs),
}

fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        // candle's CPU kernels size their pool from RAYON_NUM_THREADS; set it before any model code runs.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow::anyhow!("cannot start {n} threads: {e}"))?;
    }
    Ok(())
}

/// Tells mimalloc never to hand freed memory back to the kernel: tensors of the same sizes are allocated
/// every step, and re-faulting fresh zeroed pages cost a third of a training step (the resident size stays
/// at its peak instead).
fn keep_freed_memory() {
    /// `mi_option_purge_delay` in mimalloc.h (not named by libmimalloc-sys).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets a process-wide integer option; mimalloc reads options atomically.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

/// `println!` panics when stdout is a closed pipe (`clip4str eval ... | head -3`). That is the reader having had
/// enough, not a failure: the process ends quietly with status 0 instead of a panic message and status 101.
/// Commands that write files after printing use `output::print_stdout`, so they get to finish; this hook is the
/// net under every other `println!`.
fn end_quietly_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    keep_freed_memory();
    end_quietly_on_closed_stdout();
    let cli = Cli::parse();
    let result = set_threads(cli.threads).and_then(|()| match cli.command {
        Command::Read(args) => read::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Train(args) => train::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Average(args) => average::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Data(args) => data::run(args),
        Command::Models(args) => models::run(args),
        Command::Serve(args) => serve::run(args),
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
