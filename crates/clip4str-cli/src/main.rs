//! `clip4str`: read scene text with CLIP4STR from the command line.

mod average;
mod bench;
mod compare;
mod convert;
mod data;
mod device;
mod eval;
mod hub;
mod model_source;
mod models;
mod read;
mod registry;
mod serve;
mod synth;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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

/// Adds "`what` `path`" to `err` unless its message already names the file: most library errors start with the
/// path (often a file inside it), and naming it twice only makes the line longer.
pub(crate) fn name_path_once<E>(err: E, path: &std::path::Path, what: &str) -> anyhow::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    let named = path.display().to_string();
    if err.to_string().contains(&named) {
        anyhow::Error::new(err)
    } else {
        anyhow::Error::new(err).context(format!("{what} {named}"))
    }
}

/// The error and its causes on one line, like `{:#}`, but without the repeat that appears when a library error
/// both prints its source and returns it from `source()` (a context that would name a file its cause already names
/// is not added in the first place: [`name_path_once`]).
fn error_chain(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let msg = cause.to_string();
        if line.ends_with(&msg) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&msg);
    }
    line
}

fn main() -> ExitCode {
    keep_freed_memory();
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
            eprintln!("error: {}", error_chain(&err));
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{error_chain, name_path_once};

    /// Shaped like the library's errors: the message includes the source, which is also returned.
    #[derive(Debug)]
    struct Lib {
        source: std::io::Error,
    }

    impl std::fmt::Display for Lib {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "model.ckpt: cannot read the file: {}", self.source)
        }
    }

    impl std::error::Error for Lib {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn a_cause_already_in_its_parent_message_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let err = anyhow::Error::new(Lib { source: io }).context("loading the model");
        assert_eq!(
            error_chain(&err),
            "loading the model: model.ckpt: cannot read the file: No such file"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&plain), "outer: inner");
    }

    #[test]
    fn a_path_the_error_already_names_is_not_added_again() {
        let dir = std::path::Path::new("/data/svt");
        let named = std::io::Error::other("/data/svt/data.mdb: truncated LMDB file");
        assert_eq!(
            error_chain(&name_path_once(named, dir, "opening")),
            "/data/svt/data.mdb: truncated LMDB file"
        );
        let unnamed = std::io::Error::other("wrong tensor shape");
        assert_eq!(
            error_chain(&name_path_once(unnamed, dir, "opening")),
            "opening /data/svt: wrong tensor shape"
        );
    }
}
