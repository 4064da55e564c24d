//! `clip4str convert`: any loadable checkpoint to our safetensors, with the metadata that lets the file load
//! on its own (dimensions, head counts, charsets, input normalisation).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use clip4str::preprocess::Normalization;

use crate::hub::HubOptions;
use crate::model_file::{
    check_model_file, check_output, load_model_file, write_model_file, ModelFile, WriteArgs,
};
use crate::model_source::{load_config, named_checkpoint};

/// Arguments of `clip4str convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// `INPUT OUTPUT`: the checkpoint to convert (Lightning `.ckpt`, `.pt` state dict, or safetensors) and the
    /// safetensors file to write; with --model, only `OUTPUT`.
    #[arg(required = true, num_args = 1..=2, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Convert a model by name instead of a file (`clip4str models list`): `small` is the bundled one, a
    /// released one comes from the Hugging Face cache (downloaded there first unless --offline).
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// With --model: never download (also HF_HUB_OFFLINE=1).
    #[arg(long, requires = "model")]
    pub offline: bool,
    #[command(flatten)]
    pub write: WriteArgs,
}

/// What `convert` reads: a checkpoint file, or a model by name.
enum Input {
    File(PathBuf),
    Model(String),
}

/// Runs `convert`.
pub fn run(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    let (input, output) = match (&args.model, args.files.as_slice()) {
        (None, [input, output]) => (Input::File(input.clone()), output.clone()),
        (Some(name), [output]) => (Input::Model(name.clone()), output.clone()),
        (None, _) => anyhow::bail!("give INPUT OUTPUT, or --model NAME OUTPUT"),
        (Some(name), _) => {
            anyhow::bail!("--model {name} names the input: give only the OUTPUT file")
        }
    };
    let inputs: Vec<PathBuf> = match &input {
        Input::File(path) => vec![path.clone()],
        Input::Model(_) => Vec::new(),
    };
    check_output(&output, &inputs, args.write.force)?;
    let config = load_config(args.write.config.as_deref())?;
    let (ModelFile { raw, cfg, expected }, source) = match &input {
        Input::File(path) => (
            load_model_file(path, config.as_ref())?,
            path.file_name().map_or_else(
                || path.display().to_string(),
                |name| name.to_string_lossy().into_owned(),
            ),
        ),
        Input::Model(name) => {
            let hub = HubOptions {
                offline: args.offline,
                endpoint: None,
            };
            let raw = named_checkpoint(name, &hub)?;
            (
                check_model_file(raw, config.as_ref())?,
                format!("model {name}"),
            )
        }
    };
    let mut tensors = Vec::with_capacity(expected.len());
    for (name, _) in &expected {
        let t = raw
            .get(name)
            .with_context(|| format!("{}: tensor {name} vanished", raw.path.display()))?;
        tensors.push((name.clone(), t.clone()));
    }
    write_model_file(
        &output,
        &cfg,
        tensors,
        args.write.dtype.dtype(),
        raw.metadata.get(Normalization::METADATA_KEY),
        ("converted_from", source),
    )?;
    Ok(ExitCode::SUCCESS)
}
