//! Where a command's weights come from: a checkpoint file, or the default model compiled into the binary
//! (so that `clip4str read` works offline from a single file).

use std::path::Path;

use anyhow::Context;
use clip4str::checkpoint::read_checkpoint_bytes;
use clip4str::recognizer::{Recognizer, RecognizerOptions};

use crate::read::load_config;

/// How the bundled model is named in messages.
pub const BUNDLED_NAME: &str = "bundled clip4str-small";

/// models/default/clip4str-small.safetensors (f16), trained by models/default/train.toml.
static BUNDLED: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../models/default/clip4str-small.safetensors"
));

/// Loads `checkpoint` (with an optional `--config` JSON), or the bundled model when none is given.
pub fn load_recognizer(
    checkpoint: Option<&Path>,
    config: Option<&Path>,
    opts: RecognizerOptions,
) -> anyhow::Result<Recognizer> {
    let config = load_config(config)?;
    match checkpoint {
        Some(path) => Recognizer::from_checkpoint(path, config.as_ref(), opts)
            .with_context(|| format!("loading checkpoint {}", path.display())),
        None => {
            if config.is_some() {
                anyhow::bail!("--config only applies together with --checkpoint");
            }
            let raw = read_checkpoint_bytes(Path::new(BUNDLED_NAME), BUNDLED)?;
            Recognizer::from_raw(&raw, None, opts)
                .with_context(|| format!("loading the {BUNDLED_NAME} model"))
        }
    }
}
