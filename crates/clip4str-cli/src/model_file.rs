//! Writing a model file (`convert`, `average`): checked inputs, self-describing safetensors output with the
//! hyper-parameters and normalisation that let it load alone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Tensor};
use clap::{Args, ValueEnum};
use clip4str::checkpoint::{
    read_checkpoint, save_safetensors, RawCheckpoint, HYPER_PARAMETERS_METADATA_KEY,
};
use clip4str::family::{identify, Identified, ModelConfig};
use clip4str::preprocess::Normalization;

/// Storage precision of a written model file.
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
    pub(crate) fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// Options of the commands that write a model file (`convert`, `average`).
#[derive(Debug, Args)]
pub struct WriteArgs {
    /// Storage precision.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// JSON with dimensions and head counts for inputs that carry none (layout of tiny_config.json).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub force: bool,
}

/// A checkpoint read and checked against the model its tensor shapes describe.
pub(crate) struct ModelFile {
    pub raw: RawCheckpoint,
    pub cfg: ModelConfig,
    /// Every tensor the model uses, with its shape, in the model's order.
    pub expected: Vec<(String, Vec<usize>)>,
}

/// Reads `input` and checks it holds exactly the tensors of the model its shapes (or `config`) describe.
pub(crate) fn load_model_file(
    input: &Path,
    config: Option<&serde_json::Value>,
) -> anyhow::Result<ModelFile> {
    check_model_file(read_checkpoint(input)?, config)
}

/// [`load_model_file`] for a checkpoint already read (e.g. a model named with `--model`).
pub(crate) fn check_model_file(
    raw: RawCheckpoint,
    config: Option<&serde_json::Value>,
) -> anyhow::Result<ModelFile> {
    let Identified { config, expected } = identify(&raw, config)?;
    Ok(ModelFile {
        raw,
        cfg: config,
        expected,
    })
}

/// Refuses to replace an existing `output` without `--force`, and to write over one of the `inputs`.
pub(crate) fn check_output(output: &Path, inputs: &[PathBuf], force: bool) -> anyhow::Result<()> {
    if !output.exists() {
        return Ok(());
    }
    if !force {
        anyhow::bail!(
            "{} already exists; pass --force to replace it",
            output.display()
        );
    }
    let target = std::fs::canonicalize(output).ok();
    if inputs
        .iter()
        .any(|input| std::fs::canonicalize(input).ok() == target)
    {
        anyhow::bail!("{}: input and output are the same file", output.display());
    }
    Ok(())
}

/// Writes `tensors` (in `dtype`) as a self-describing model file: the hyper-parameters that let it load alone,
/// the input normalisation when the source had one, and `(key, value)` saying where the weights came from.
pub(crate) fn write_model_file(
    output: &Path,
    cfg: &ModelConfig,
    tensors: Vec<(String, Tensor)>,
    dtype: DType,
    normalization: Option<&String>,
    origin: (&str, String),
) -> anyhow::Result<()> {
    let tensors = tensors
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(dtype)?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut metadata = HashMap::new();
    metadata.insert(
        HYPER_PARAMETERS_METADATA_KEY.to_string(),
        cfg.hyper_parameters().to_string(),
    );
    metadata.insert("format".into(), "clip4str".into());
    if let Some(norm) = normalization {
        metadata.insert(Normalization::METADATA_KEY.into(), norm.clone());
    }
    metadata.insert(origin.0.into(), origin.1);
    // `--out runs/new/x.safetensors` should not fail for want of a folder, as `train` and `synth` do not.
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the folder {}", dir.display()))?;
    }
    save_safetensors(output, &tensors, &metadata)?;
    let size = std::fs::metadata(output).map_or(0, |m| m.len());
    eprintln!(
        "wrote {} ({} tensors, {:?}, {:.1} MB)",
        output.display(),
        tensors.len(),
        dtype,
        size as f64 / 1e6
    );
    Ok(())
}
