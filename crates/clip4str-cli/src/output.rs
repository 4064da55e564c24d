//! What the commands print: which characters a printed text keeps, the report formats, and progress bars.

use std::io::{IsTerminal, Write};

use clap::ValueEnum;
use clip4str::charset::charset_test;
use clip4str::recognizer::RecognizerOptions;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What `--cased` / `--punctuation` mean to the recognizer: test.py's charset for the captions, and the printed
/// text filtered by it; neither prints the raw prediction like `read.py`. `serve` uses the same rule.
pub fn case_options(cased: bool, punctuation: bool) -> RecognizerOptions {
    let filter = cased || punctuation;
    RecognizerOptions {
        charset_test: filter.then(|| charset_test(cased, punctuation)),
        filter_output: filter,
        ..Default::default()
    }
}

/// Formats of the per-dataset reports (`eval`, `compare`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// Markdown tables (test.py's layout for `eval`).
    Text,
    /// One JSON document.
    Json,
}

/// A progress bar on stderr drawn with `template` (indicatif's syntax), or a hidden one when stderr is not a
/// terminal, so that logs and pipes get no control characters.
pub fn progress_bar(len: usize, template: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Writes `text` to stdout. A closed stdout (`clip4str data show DIR | head -2`) is the reader having had
/// enough, not a failure: the rest of the text is dropped and the command carries on, so the files it writes
/// are still written. Any other write error is returned.
pub fn print_stdout(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
