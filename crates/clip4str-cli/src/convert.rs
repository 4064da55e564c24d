//! `clip4str convert`: any loadable checkpoint to our safetensors, with the metadata that lets the file load
//! on its own (dimensions, head counts, charsets, input normalisation).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::DType;
use clap::{Args, ValueEnum};
use clip4str::checkpoint::{
    check_tensors, read_checkpoint, save_safetensors, HYPER_PARAMETERS_METADATA_KEY,
};
use clip4str::config::Clip4StrConfig;
use clip4str::model::Clip4Str;
use clip4str::preprocess::Normalization;

use crate::read::load_config;

/// Storage precision of the converted weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// 32-bit floats: exact.
    F32,
    /// IEEE half precision: half the size; the model still computes in f32.
    F16,
    /// bfloat16: half the size, f32's range, fewer mantissa bits than f16.
    Bf16,
}

impl DtypeArg {
    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// Arguments of `clip4str convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Checkpoint to convert: Lightning `.ckpt`, `.pt` state dict, or safetensors.
    pub input: PathBuf,
    /// Output safetensors file.
    pub output: PathBuf,
    /// Storage precision.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// JSON with dimensions and head counts for inputs that carry none (layout of tiny_config.json).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Runs `convert`.
pub fn run(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    if args.output.exists() && !args.force {
        anyhow::bail!(
            "{} already exists; pass --force to replace it",
            args.output.display()
        );
    }
    if std::fs::canonicalize(&args.input).ok() == std::fs::canonicalize(&args.output).ok()
        && args.output.exists()
    {
        anyhow::bail!("input and output are the same file");
    }
    let config = load_config(args.config.as_deref())?;
    let raw = read_checkpoint(&args.input)?;
    let cfg = Clip4StrConfig::from_tensors_with(
        &raw.shapes(),
        raw.hyper_parameters.as_ref(),
        config.as_ref(),
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", args.input.display()))?;
    let expected = Clip4Str::expected_tensors(&cfg)?;
    check_tensors(&raw, &expected)?;

    let dtype = args.dtype.dtype();
    let mut tensors = Vec::with_capacity(expected.len());
    for (name, _) in &expected {
        let t = raw
            .get(name)
            .with_context(|| format!("{}: tensor {name} vanished", args.input.display()))?;
        tensors.push((name.clone(), t.to_dtype(dtype)?));
    }
    let mut metadata = HashMap::new();
    metadata.insert(
        HYPER_PARAMETERS_METADATA_KEY.to_string(),
        cfg.hyper_parameters().to_string(),
    );
    metadata.insert("format".into(), "clip4str".into());
    if let Some(norm) = raw.metadata.get(Normalization::METADATA_KEY) {
        metadata.insert(Normalization::METADATA_KEY.into(), norm.clone());
    }
    if let Some(name) = args.input.file_name() {
        metadata.insert("converted_from".into(), name.to_string_lossy().into_owned());
    }
    save_safetensors(&args.output, &tensors, &metadata)?;
    let size = std::fs::metadata(&args.output).map_or(0, |m| m.len());
    eprintln!(
        "wrote {} ({} tensors, {:?}, {:.1} MB)",
        args.output.display(),
        tensors.len(),
        dtype,
        size as f64 / 1e6
    );
    Ok(ExitCode::SUCCESS)
}
