//! `clip4str average`: the weighted mean of several checkpoints of one model (a "model soup"), written like
//! `convert` writes, so that a released or bundled file made this way can be rebuilt by one command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use clip4str::checkpoint::{RawCheckpoint, WeightedAverage};
use clip4str::preprocess::Normalization;

use crate::model_file::{check_output, load_model_file, write_model_file, ModelFile, WriteArgs};
use crate::model_source::load_config;

/// Arguments of `clip4str average`.
#[derive(Debug, Args)]
pub struct AverageArgs {
    /// Checkpoints of one model (same sizes and charsets), e.g. the ends of runs fine-tuned from one start.
    #[arg(required = true, num_args = 2..)]
    pub inputs: Vec<PathBuf>,
    /// Output safetensors file.
    #[arg(long, short)]
    pub out: PathBuf,
    /// One weight per input, comma-separated (normalised to sum to 1); default: all equal.
    #[arg(long, value_delimiter = ',')]
    pub weights: Option<Vec<f64>>,
    #[command(flatten)]
    pub write: WriteArgs,
}

/// Runs `average`.
pub fn run(args: AverageArgs) -> anyhow::Result<ExitCode> {
    check_output(&args.out, &args.inputs, args.write.force)?;
    let weights = args
        .weights
        .clone()
        .unwrap_or_else(|| vec![1.0; args.inputs.len()]);
    if weights.len() != args.inputs.len() {
        anyhow::bail!(
            "--weights has {} values for {} checkpoints",
            weights.len(),
            args.inputs.len()
        );
    }
    let config = load_config(args.write.config.as_deref())?;
    // One file at a time: the running sum and the file being added are all that is held in memory.
    let norm_of = |raw: &RawCheckpoint| raw.metadata.get(Normalization::METADATA_KEY).cloned();
    let ModelFile { raw, cfg, expected } = load_model_file(&args.inputs[0], config.as_ref())?;
    let normalization = norm_of(&raw);
    let mut average = WeightedAverage::new(expected.into_iter().map(|(n, _)| n).collect());
    average.add(&raw, weights[0])?;
    drop(raw);
    for (input, weight) in args.inputs.iter().zip(&weights).skip(1) {
        let file = load_model_file(input, config.as_ref())?;
        if file.cfg != cfg {
            anyhow::bail!(
                "{} and {} are different models ({}); only checkpoints of one model can be averaged",
                args.inputs[0].display(),
                input.display(),
                differing_settings(
                    &cfg.hyper_parameters(),
                    &file.cfg.hyper_parameters()
                )
            );
        }
        if norm_of(&file.raw) != normalization {
            anyhow::bail!(
                "{} and {} expect differently normalised input images; only checkpoints of one model can be \
                 averaged",
                args.inputs[0].display(),
                input.display()
            );
        }
        average.add(&file.raw, *weight)?;
    }
    let averaged = average.finish()?;

    let total: f64 = weights.iter().sum();
    let origin = args
        .inputs
        .iter()
        .zip(&weights)
        .map(|(input, w)| {
            let name = input.file_name().map_or_else(
                || input.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            format!("{name} ({:.4})", w / total)
        })
        .collect::<Vec<_>>()
        .join(", ");
    write_model_file(
        &args.out,
        &cfg,
        averaged,
        args.write.dtype.dtype(),
        normalization.as_ref(),
        ("averaged_from", origin),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// The hyper-parameter names whose values differ between two models (nested ones as `clip_arch.embed_dim`), for
/// the error message.
fn differing_settings(a: &serde_json::Value, b: &serde_json::Value) -> String {
    fn collect(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a.as_object(), b.as_object()) {
            (Some(a), Some(b)) => {
                let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
                keys.sort();
                keys.dedup();
                for key in keys {
                    let null = serde_json::Value::Null;
                    let name = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    collect(
                        &name,
                        a.get(key).unwrap_or(&null),
                        b.get(key).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ if a != b => out.push(prefix.to_string()),
            _ => {}
        }
    }
    let mut names = Vec::new();
    collect("", a, b, &mut names);
    if names.is_empty() {
        "their settings differ".into()
    } else {
        format!("{} differ", names.join(", "))
    }
}
