//! `clip4str convert`: any loadable checkpoint to our safetensors, with the metadata that lets the file load
//! on its own (dimensions, head counts, charsets, input normalisation).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use clip4str::preprocess::Normalization;

use crate::model_file::{check_output, load_model_file, write_model_file, ModelFile, WriteArgs};
use crate::model_source::load_config;

/// Arguments of `clip4str convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Checkpoint to convert: Lightning `.ckpt`, `.pt` state dict, or safetensors.
    pub input: PathBuf,
    /// Output safetensors file.
    pub output: PathBuf,
    #[command(flatten)]
    pub write: WriteArgs,
}

/// Runs `convert`.
pub fn run(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    check_output(
        &args.output,
        std::slice::from_ref(&args.input),
        args.write.force,
    )?;
    let config = load_config(args.write.config.as_deref())?;
    let ModelFile { raw, cfg, expected } = load_model_file(&args.input, config.as_ref())?;
    let mut tensors = Vec::with_capacity(expected.len());
    for (name, _) in &expected {
        let t = raw
            .get(name)
            .with_context(|| format!("{}: tensor {name} vanished", args.input.display()))?;
        tensors.push((name.clone(), t.clone()));
    }
    let source = args.input.file_name().map_or_else(
        || args.input.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    );
    write_model_file(
        &args.output,
        &cfg,
        tensors,
        args.write.dtype.dtype(),
        raw.metadata.get(Normalization::METADATA_KEY),
        ("converted_from", source),
    )?;
    Ok(ExitCode::SUCCESS)
}
