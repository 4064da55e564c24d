//! Helpers shared by the integration tests of the `clip4str` binary (each test file declares `mod common;`).
// Every test file is its own crate and uses only some of these helpers; the rest would warn as dead code.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The committed fixtures at the repository root (`tests/fixtures`).
pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// Runs the `clip4str` binary with `args` and waits for its output.
pub fn clip4str(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clip4str"))
        .args(args)
        .output()
        .expect("run clip4str")
}

/// Runs the `clip4str` binary with `args` in the working directory `dir`.
pub fn clip4str_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clip4str"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run clip4str")
}

/// What a finished command printed on stdout (lossy UTF-8).
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What a finished command printed on stderr (lossy UTF-8).
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// An emptied, freshly created folder `clip4str-<test file>-<pid>-<name>` in the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "clip4str-{}-{}-{name}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
