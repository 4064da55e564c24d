//! One module per subcommand: its flags and its `run`. What several commands share lives beside this folder
//! (model source, output, model-file writing, error chain).

pub mod average;
pub mod bench;
pub mod compare;
pub mod convert;
pub mod data;
pub mod eval;
pub mod models;
pub mod read;
pub mod serve;
pub mod synth;
pub mod train;

/// Largest image, in pixels, that `read` and `serve` decode unless told otherwise (`--max-pixels`), checked from
/// the header before any pixel buffer exists: 16 megapixels is 48 MB of RGB, while a 519 KB PNG can announce
/// 13000 x 13000 (507 MB).
pub const DEFAULT_MAX_PIXELS: u64 = 16_000_000;
