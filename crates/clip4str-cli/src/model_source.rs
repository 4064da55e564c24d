//! Where a command's weights come from: a checkpoint file, a model name (the bundled model or a released
//! checkpoint from the Hugging Face cache), or by default the model compiled into the binary (so that
//! `clip4str read` works offline from a single file).
//!
//! Every command that runs a model flattens [`ModelArgs`] into its arguments and calls [`load_recognizer`].

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use clip4str::checkpoint::{read_checkpoint_bytes, RawCheckpoint};
use clip4str::recognizer::{Precision as LibPrecision, Recognizer, RecognizerOptions};

use crate::device::DeviceArg;
use crate::hub::{self, HubOptions};
use crate::registry::{self, Source};

/// How the bundled model is named in messages.
pub const BUNDLED_NAME: &str = "bundled clip4str-small";

/// models/default/clip4str-small.safetensors (f16); how it was trained: models/default/README.md.
static BUNDLED: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../models/default/clip4str-small.safetensors"
));

/// The weights a command runs: `--checkpoint FILE` or `--model NAME` (default: the bundled model).
#[derive(Debug, Clone, Default, Args)]
pub struct ModelArgs {
    /// Checkpoint: Lightning `.ckpt`, flat `.pt` state dict, or safetensors (default: the bundled model).
    #[arg(long, conflicts_with = "model")]
    pub checkpoint: Option<PathBuf>,
    /// JSON with dimensions and head counts for files that carry none (layout of tiny_config.json).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A model by name (`clip4str models list`): `small` is the bundled one; a released checkpoint is taken from
    /// the Hugging Face cache, downloaded there first if missing.
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// Never download: a named model must already be in the Hugging Face cache (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// Arithmetic of the linear layers: f32 (parity-tested) or bf16 (bf16 weights and activations, f32
    /// accumulation). bf16 needs AVX512-BF16: elsewhere it could only be emulated, slower than f32, so bf16 reads
    /// in f32 with a note; bf16-always runs bf16 on any CPU (to check bf16 answers where it is emulated).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Where the model runs: cpu, or cuda / cuda:N (a build with `--features cuda`). `--precision bf16` is
    /// a CPU path; on a GPU the model runs in f32.
    #[arg(long, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
}

/// `--precision` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    /// 32-bit floats everywhere.
    #[default]
    F32,
    /// bf16 linear layers with f32 accumulation where the CPU has AVX512-BF16; f32 elsewhere.
    Bf16,
    /// bf16 even where the CPU has to emulate it (slower than f32).
    #[value(name = "bf16-always")]
    Bf16Always,
}

impl Precision {
    /// The library's setting. bf16 without AVX512-BF16 would be an emulation, 2.4x slower than f32: f32
    /// instead, said once on stderr.
    pub fn apply(self, opts: RecognizerOptions) -> RecognizerOptions {
        let precision = match self {
            Self::F32 => LibPrecision::F32,
            Self::Bf16 if !clip4str::nn::bf16_native_supported() => {
                eprintln!(
                    "note: this CPU has no AVX512-BF16, so bf16 could only be emulated (slower than f32):                      computing in f32 (--precision bf16-always forces bf16)"
                );
                LibPrecision::F32
            }
            Self::Bf16 | Self::Bf16Always => LibPrecision::Bf16,
        };
        RecognizerOptions { precision, ..opts }
    }
}

/// How a recognizer computes, for reports: `f32`, `bf16`, or `bf16 (emulated)`.
pub fn precision_name(precision: LibPrecision) -> &'static str {
    match precision {
        LibPrecision::F32 => "f32",
        LibPrecision::Bf16 if clip4str::nn::bf16_native_supported() => "bf16",
        LibPrecision::Bf16 => "bf16 (emulated)",
    }
}

impl ModelArgs {
    /// How the weights are named in reports: the file, the model name, or the bundled model.
    pub fn label(&self) -> String {
        match (&self.checkpoint, &self.model) {
            (Some(path), _) => path.display().to_string(),
            (None, Some(name)) if name != registry::BUNDLED => name.clone(),
            _ => BUNDLED_NAME.to_string(),
        }
    }

    fn hub_options(&self) -> HubOptions {
        HubOptions {
            offline: self.offline,
            endpoint: None,
        }
    }
}

/// Loads the weights `args` name; a named Hub model is fetched into the cache first unless `--offline`.
pub fn load_recognizer(args: &ModelArgs, opts: RecognizerOptions) -> anyhow::Result<Recognizer> {
    let opts = RecognizerOptions {
        device: args.device.open()?,
        ..args.precision.apply(opts)
    };
    let config = load_config(args.config.as_deref())?;
    if let Some(path) = &args.checkpoint {
        return Recognizer::from_checkpoint(path, config.as_ref(), opts)
            .map_err(|e| crate::error_chain::name_path_once(e, path, "loading checkpoint"));
    }
    let Some(name) = &args.model else {
        return load_bundled(config.is_some(), opts);
    };
    if matches!(registry::find(name)?.source, Source::Bundled) {
        return load_bundled(config.is_some(), opts);
    }
    let raw = named_checkpoint(name, &args.hub_options())?;
    Recognizer::from_raw(&raw, config.as_ref(), opts)
        .with_context(|| format!("loading model {name:?} from {}", raw.path.display()))
}

/// The checkpoint a model name stands for (`clip4str models list`): the bundled file, or a released one from the
/// Hugging Face cache, fetched there first unless the options say offline.
pub fn named_checkpoint(name: &str, hub_options: &HubOptions) -> anyhow::Result<RawCheckpoint> {
    let entry = registry::find(name)?;
    match &entry.source {
        Source::Bundled => Ok(read_checkpoint_bytes(Path::new(BUNDLED_NAME), BUNDLED)?),
        Source::Hub(file) => {
            let fetched = hub::fetch(file, entry.approx_bytes, hub_options)
                .with_context(|| format!("getting model {name:?}"))?;
            hub::read_cached_checkpoint(&fetched.path)
                .with_context(|| format!("loading model {name:?}"))
        }
        Source::Manual { url, .. } => anyhow::bail!(
            "model {name:?} is not on the Hugging Face Hub; download it from {url} and pass --checkpoint FILE"
        ),
    }
}

fn load_bundled(has_config: bool, opts: RecognizerOptions) -> anyhow::Result<Recognizer> {
    if has_config {
        anyhow::bail!(
            "--config only applies to a checkpoint file or a downloaded model, not the bundled one"
        );
    }
    let raw = read_checkpoint_bytes(Path::new(BUNDLED_NAME), BUNDLED)?;
    Recognizer::from_raw(&raw, None, opts)
        .with_context(|| format!("loading the {BUNDLED_NAME} model"))
}

/// Reads a `--config` JSON file, if given.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Option<serde_json::Value>> {
    let Some(p) = path else { return Ok(None) };
    let text =
        std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?;
    let json =
        serde_json::from_str(&text).with_context(|| format!("parsing config {}", p.display()))?;
    Ok(Some(json))
}
