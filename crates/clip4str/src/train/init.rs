//! Where a training run's first weights come from: the reference's random initialisation, a CLIP4STR
//! checkpoint to fine-tune, or pre-trained CLIP weights with freshly initialised decoders (SPEC §2.4, §3).
//!
//! CLIP files come in two layouts, both read by [`crate::checkpoint::read_checkpoint`]: OpenAI's
//! TorchScript `.pt` (a pickled module tree; its JIT-only buffers `input_resolution`, `context_length`
//! and `vocab_size` are dropped here, as `build_model` does) and OpenCLIP's `open_clip_pytorch_model.bin`
//! (a plain state dict with OpenAI's names, possibly `module.`-prefixed). Both map to `clip_model.*`.
//!
//! Random tensors are drawn from a ChaCha8 stream chosen by the seed and the tensor's name, so every
//! tensor is reproducible on its own: the decoders of `Clip { seed }` equal those of `Scratch { seed }`,
//! and adding a layer does not change the others.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::checkpoint::{check_tensors, read_checkpoint, LoadError, RawCheckpoint};
use crate::config::{clip_heads, Clip4StrConfig, ClipShapes, VisionConfig};
use crate::model::Clip4Str;

/// State-dict prefix of the CLIP backbone inside CLIP4STR.
const CLIP_PREFIX: &str = "clip_model.";

/// Buffers of OpenAI's TorchScript models that are not CLIP parameters (`clip.py` `build_model`).
const JIT_ONLY: [&str; 3] = ["input_resolution", "context_length", "vocab_size"];

/// Std of PARSeq's `trunc_normal_(std=.02)`; PyTorch truncates at the absolute values ±2.
const DECODER_STD: f64 = 0.02;
const TRUNC_BOUND: f64 = 2.0;

/// Where the first weights of a training run come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitSource {
    /// Everything random, as the reference initialises a new model (SPEC §2.4).
    Scratch {
        /// Seed of every random tensor.
        seed: u64,
    },
    /// Fine-tune: every tensor from a CLIP4STR checkpoint (any format `read_checkpoint` reads).
    Clip4Str(PathBuf),
    /// CLIP from an OpenAI TorchScript `.pt` or an OpenCLIP `.bin`; both decoders random.
    Clip {
        /// The CLIP weights file.
        path: PathBuf,
        /// Seed of the decoders' random tensors.
        seed: u64,
    },
}

/// Why initial weights could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A weights file could not be read or does not fit the configuration.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The configuration cannot be built, or cannot be inferred from the CLIP weights.
    #[error("model configuration: {0}")]
    Config(String),
    /// The configuration built does not hold together (printed, not returned as a source).
    #[error("model configuration: {0}")]
    Invalid(crate::config::ConfigError),
    /// A tensor could not be created.
    #[error("weight initialisation: {0}")]
    Tensor(candle_core::Error),
}

// By hand rather than `#[from]`, which would also return the cause from `source()` while the message prints it.
impl From<candle_core::Error> for InitError {
    fn from(error: candle_core::Error) -> Self {
        Self::Tensor(error)
    }
}

/// The CLIP tensors of a file as `clip_model.*` f32 tensors, ready to be checked against a model.
///
/// Reads OpenAI TorchScript archives, OpenCLIP state dicts (a `module.` prefix is removed by the
/// reader) and OpenAI's non-JIT `{'model': state_dict}` files; the JIT-only buffers are dropped and
/// fp16 weights come back as f32. A CLIP4STR checkpoint (names already `clip_model.*`) yields its
/// backbone. A file without CLIP weights is an error, never an empty list.
pub fn clip_weights(path: &Path) -> Result<Vec<(String, Tensor)>, LoadError> {
    clip_weights_from(read_checkpoint(path)?)
}

/// [`clip_weights`] for a checkpoint already read.
pub fn clip_weights_from(raw: RawCheckpoint) -> Result<Vec<(String, Tensor)>, LoadError> {
    let path = raw.path;
    let already_prefixed = raw.tensors.iter().any(|(n, _)| n.starts_with(CLIP_PREFIX));
    let tensors: Vec<(String, Tensor)> = if already_prefixed {
        raw.tensors
            .into_iter()
            .filter(|(n, _)| n.starts_with(CLIP_PREFIX))
            .collect()
    } else {
        raw.tensors
            .into_iter()
            .filter(|(n, _)| !JIT_ONLY.contains(&n.as_str()))
            .map(|(n, t)| (format!("{CLIP_PREFIX}{n}"), t))
            .collect()
    };
    if tensors.is_empty() {
        return Err(LoadError::Empty { path });
    }
    let core = [
        "visual.conv1.weight",
        "token_embedding.weight",
        "text_projection",
    ];
    if let Some(missing) = core
        .iter()
        .find(|c| !tensors.iter().any(|(n, _)| &n[CLIP_PREFIX.len()..] == **c))
    {
        let shown: Vec<&str> = tensors
            .iter()
            .take(3)
            .map(|(n, _)| &n[CLIP_PREFIX.len()..])
            .collect();
        return Err(LoadError::Config {
            path,
            reason: format!(
                "not a CLIP ViT model: tensor {missing} is missing (the file has {} tensors, e.g. {})",
                tensors.len(),
                shown.join(", ")
            ),
        });
    }
    Ok(tensors)
}

/// The configuration of a CLIP4STR model built on these CLIP weights, like the reference's
/// `build_model` + `VL4STR.__init__`.
///
/// Read from the shapes: ViT width, depth, patch and (square) input size, text width, depth,
/// vocabulary and positional rows, and the embedding size, which is also the decoder width. CLIP
/// heads are `width / 64` (20 for ViT-H/14, as the reference builds it); a width that is not a
/// multiple of 64 keeps `base`'s head count if it divides the width. Decoders get the reference's 8
/// heads and 4x MLP (`base`'s heads when 8 does not divide the width) and `base`'s depth; charsets,
/// label length, context length, freezing and dropout come from `base`.
pub fn config_from_clip(
    tensors: &[(String, Tensor)],
    base: &Clip4StrConfig,
) -> Result<Clip4StrConfig, InitError> {
    let clip = ClipShapes::read(tensors.iter().map(|(n, t)| (n.as_str(), t.dims())))
        .map_err(InitError::Invalid)?;
    let (vw, [ph, pw]) = (clip.vision_width, clip.patch_size);
    let (tw, embed_dim) = (clip.text_width, clip.embed_dim);
    let image_size = clip.square_image_size().map_err(InitError::Invalid)?;
    let heads = |what: &str, width: usize, fallback: usize| -> Result<usize, InitError> {
        if let Some(heads) = clip_heads(width) {
            Ok(heads)
        } else if fallback > 0 && width.is_multiple_of(fallback) {
            Ok(fallback)
        } else {
            Err(InitError::Config(format!(
                "{what} width {width} is not a multiple of 64 and the base configuration's \
                 {fallback} heads do not divide it; give the head count explicitly"
            )))
        }
    };
    let dec_heads = if embed_dim.is_multiple_of(8) {
        8
    } else {
        base.decoder.heads
    };

    let mut cfg = base.clone();
    cfg.vision.width = vw;
    cfg.vision.layers = clip.vision_layers;
    cfg.vision.heads = heads("vision", vw, base.vision.heads)?;
    cfg.vision.patch_size = [ph, pw];
    cfg.vision.image_size = image_size;
    cfg.text.vocab_size = clip.vocab_size;
    cfg.text.positional_rows = clip.text_rows;
    cfg.text.width = tw;
    cfg.text.layers = clip.text_layers;
    cfg.text.heads = heads("text", tw, base.text.heads)?;
    cfg.embed_dim = embed_dim;
    cfg.decoder.dim = embed_dim;
    cfg.decoder.heads = dec_heads;
    cfg.decoder.mlp_hidden = 4 * embed_dim;
    cfg.validate().map_err(InitError::Invalid)?;
    Ok(cfg)
}

/// Every tensor of [`Clip4Str::expected_tensors`] initialised as the reference initialises a new
/// model (SPEC §2.4), in that order, f32 on the CPU. Deterministic for a seed.
pub fn init_weights(cfg: &Clip4StrConfig, seed: u64) -> Result<Vec<(String, Tensor)>, InitError> {
    let plan = init_plan(cfg)?;
    generate(&plan, seed)
}

/// The full named tensor list of [`Clip4Str::expected_tensors`] for `cfg`, from `source`.
///
/// File tensors must match the configuration exactly (names and shapes, like a strict
/// `load_state_dict`); errors name the file and the first offending tensor.
pub fn initial_weights(
    source: &InitSource,
    cfg: &Clip4StrConfig,
) -> Result<Vec<(String, Tensor)>, InitError> {
    match source {
        InitSource::Scratch { seed } => init_weights(cfg, *seed),
        InitSource::Clip4Str(path) => {
            cfg.validate().map_err(InitError::Invalid)?;
            let raw = read_checkpoint(path)?;
            let expected = Clip4Str::expected_tensors(cfg)?;
            check_tensors(&raw, &expected)?;
            let mut by_name: HashMap<String, Tensor> = raw.tensors.into_iter().collect();
            Ok(expected
                .into_iter()
                .filter_map(|(name, _)| by_name.remove(&name).map(|t| (name, t)))
                .collect())
        }
        InitSource::Clip { path, seed } => {
            let clip = clip_weights(path)?;
            weights_from_clip(path, clip, cfg, *seed)
        }
    }
}

/// CLIP tensors already read with [`clip_weights`] (from `path`, named in errors) completed with
/// freshly initialised decoders; avoids reading a large file twice when the configuration was
/// inferred from it with [`config_from_clip`].
pub fn weights_from_clip(
    path: &Path,
    clip: Vec<(String, Tensor)>,
    cfg: &Clip4StrConfig,
    seed: u64,
) -> Result<Vec<(String, Tensor)>, InitError> {
    let plan = init_plan(cfg)?;
    let expected_clip: Vec<(String, Vec<usize>)> = plan
        .iter()
        .filter(|p| p.name.starts_with(CLIP_PREFIX))
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect();
    let raw = RawCheckpoint {
        path: path.to_path_buf(),
        format: crate::checkpoint::CheckpointFormat::TorchStateDict,
        tensors: clip,
        hyper_parameters: None,
        metadata: HashMap::new(),
        stripped_prefix: None,
        notes: Vec::new(),
    };
    check_tensors(&raw, &expected_clip)?;
    let mut by_name: HashMap<String, Tensor> = raw.tensors.into_iter().collect();
    let decoders: Vec<TensorPlan> = plan
        .iter()
        .filter(|p| !p.name.starts_with(CLIP_PREFIX))
        .cloned()
        .collect();
    let mut random: HashMap<String, Tensor> = generate(&decoders, seed)?.into_iter().collect();
    plan.into_iter()
        .map(|p| {
            let tensor = by_name
                .remove(&p.name)
                .or_else(|| random.remove(&p.name))
                .ok_or_else(|| {
                    InitError::Config(format!("tensor {} was neither read nor generated", p.name))
                })?;
            Ok((p.name, tensor))
        })
        .collect()
}

/// How one tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    Zeros,
    Ones,
    Constant(f64),
    /// `N(0, std)`.
    Normal(f64),
    /// `N(0, std)` restricted to `[-bound, bound]` (PyTorch `trunc_normal_` with absolute bounds).
    TruncNormal {
        std: f64,
        bound: f64,
    },
    /// `U(-bound, bound)`: kaiming-uniform (`a = sqrt(5)`) weights and Linear biases give
    /// `1 / sqrt(fan_in)`, xavier-uniform gives `sqrt(6 / (fan_in + fan_out))`.
    Uniform(f64),
}

#[derive(Debug, Clone)]
struct TensorPlan {
    name: String,
    shape: Vec<usize>,
    rule: Rule,
}

/// The rule of every expected tensor; a tensor without a rule is an error, so a model change
/// cannot silently leave weights uninitialised.
fn init_plan(cfg: &Clip4StrConfig) -> Result<Vec<TensorPlan>, InitError> {
    cfg.validate().map_err(InitError::Invalid)?;
    Clip4Str::expected_tensors(cfg)?
        .into_iter()
        .map(|(name, shape)| {
            let rule = rule_for(&name, &shape, cfg).ok_or_else(|| {
                InitError::Config(format!(
                    "no initialisation rule for tensor {name} {shape:?}"
                ))
            })?;
            Ok(TensorPlan { name, shape, rule })
        })
        .collect()
}

fn rule_for(name: &str, shape: &[usize], cfg: &Clip4StrConfig) -> Option<Rule> {
    if let Some(rest) = name.strip_prefix("clip_model.visual.") {
        visual_rule(rest, shape, cfg.vision.width)
    } else if let Some(rest) = name.strip_prefix(CLIP_PREFIX) {
        text_rule(rest, cfg.text.width, cfg.text.layers)
    } else if let Some(rest) = name
        .strip_prefix("visual_decoder.")
        .or_else(|| name.strip_prefix("cross_decoder."))
    {
        decoder_rule(rest, shape)
    } else {
        None
    }
}

/// `weight` -> ones, `bias` -> zeros for the LayerNorms named in `norms`.
fn layer_norm(rest: &str, norms: &[&str]) -> Option<Rule> {
    let (module, leaf) = rest.rsplit_once('.')?;
    if !norms.contains(&module) {
        return None;
    }
    match leaf {
        "weight" => Some(Rule::Ones),
        "bias" => Some(Rule::Zeros),
        _ => None,
    }
}

/// The part of a block tensor's name after `transformer.resblocks.N.`.
fn block_param(rest: &str) -> Option<&str> {
    let after = rest.strip_prefix("transformer.resblocks.")?;
    let (index, param) = after.split_once('.')?;
    index.parse::<usize>().ok().map(|_| param)
}

/// Fan-in of a weight `[out, in, ...]`: every dimension but the first.
fn fan_in(shape: &[usize]) -> usize {
    shape.iter().skip(1).product()
}

/// `sqrt(6 / (fan_in + fan_out))` of a 2-D weight `[fan_out, fan_in]`.
fn xavier(shape: &[usize]) -> Rule {
    let fan_out = shape.first().copied().unwrap_or(1);
    Rule::Uniform((6.0 / (fan_in(shape) + fan_out).max(1) as f64).sqrt())
}

fn kaiming(fan_in: usize) -> Rule {
    Rule::Uniform(1.0 / (fan_in.max(1) as f64).sqrt())
}

/// ViT: class/positional embeddings and `proj` are `width^-0.5 * randn`; everything else keeps
/// PyTorch's construction defaults (`initialize_parameters` does not touch the visual blocks).
fn visual_rule(rest: &str, shape: &[usize], width: usize) -> Option<Rule> {
    let scale = (width as f64).powf(-0.5);
    match rest {
        "conv1.weight" => return Some(kaiming(fan_in(shape))),
        "class_embedding" | "positional_embedding" | "proj" => return Some(Rule::Normal(scale)),
        _ => {}
    }
    if let Some(rule) = layer_norm(rest, &["ln_pre", "ln_post"]) {
        return Some(rule);
    }
    let param = block_param(rest)?;
    Some(match param {
        // nn.MultiheadAttention._reset_parameters: xavier in_proj, zero biases; out_proj keeps
        // the Linear default weight.
        "attn.in_proj_weight" => xavier(shape),
        "attn.in_proj_bias" | "attn.out_proj.bias" => Rule::Zeros,
        "attn.out_proj.weight" | "mlp.c_fc.weight" | "mlp.c_proj.weight" => kaiming(fan_in(shape)),
        // A Linear's bias bound is 1/sqrt(fan_in) of its weight.
        "mlp.c_fc.bias" => kaiming(width),
        "mlp.c_proj.bias" => kaiming(4 * width),
        other => return layer_norm(other, &["ln_1", "ln_2"]),
    })
}

/// Text encoder: `CLIP.initialize_parameters` (L310-337).
fn text_rule(rest: &str, width: usize, layers: usize) -> Option<Rule> {
    let width_f = width as f64;
    let attn_std = width_f.powf(-0.5);
    let proj_std = attn_std * ((2 * layers) as f64).powf(-0.5);
    let fc_std = (2.0 * width_f).powf(-0.5);
    match rest {
        "token_embedding.weight" => return Some(Rule::Normal(0.02)),
        "positional_embedding" => return Some(Rule::Normal(0.01)),
        "text_projection" => return Some(Rule::Normal(attn_std)),
        // `CLIP.logit_scale` at construction.
        "logit_scale" => return Some(Rule::Constant((1.0f64 / 0.07).ln())),
        _ => {}
    }
    if let Some(rule) = layer_norm(rest, &["ln_final"]) {
        return Some(rule);
    }
    let param = block_param(rest)?;
    Some(match param {
        "attn.in_proj_weight" => Rule::Normal(attn_std),
        "attn.out_proj.weight" | "mlp.c_proj.weight" => Rule::Normal(proj_std),
        "mlp.c_fc.weight" => Rule::Normal(fc_std),
        "attn.in_proj_bias" | "attn.out_proj.bias" => Rule::Zeros,
        "mlp.c_fc.bias" => kaiming(width),
        "mlp.c_proj.bias" => kaiming(4 * width),
        other => return layer_norm(other, &["ln_1", "ln_2"]),
    })
}

/// PARSeq decoder: `init_weights` (Linear and Embedding trunc-normal .02, zero biases, LayerNorm
/// 1/0; an MHA's out_proj is a Linear, its in_proj keeps xavier and zero bias) and `pos_queries`.
fn decoder_rule(rest: &str, shape: &[usize]) -> Option<Rule> {
    let trunc = Rule::TruncNormal {
        std: DECODER_STD,
        bound: TRUNC_BOUND,
    };
    match rest {
        "pos_queries" | "text_embed.embedding.weight" | "head.weight" => return Some(trunc),
        "head.bias" => return Some(Rule::Zeros),
        _ => {}
    }
    if let Some(rule) = layer_norm(rest, &["norm"]) {
        return Some(rule);
    }
    let after = rest.strip_prefix("layers.")?;
    let (index, param) = after.split_once('.')?;
    index.parse::<usize>().ok()?;
    let (module, leaf) = param.rsplit_once('.')?;
    match (module, leaf) {
        ("self_attn" | "cross_attn", "in_proj_weight") => Some(xavier(shape)),
        ("self_attn" | "cross_attn", "in_proj_bias") => Some(Rule::Zeros),
        ("self_attn.out_proj" | "cross_attn.out_proj" | "linear1" | "linear2", "weight") => {
            Some(trunc)
        }
        ("self_attn.out_proj" | "cross_attn.out_proj" | "linear1" | "linear2", "bias") => {
            Some(Rule::Zeros)
        }
        _ => layer_norm(param, &["norm1", "norm2", "norm_q", "norm_c"]),
    }
}

/// FNV-1a of a tensor name: the ChaCha stream of its random values.
fn name_stream(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A standard normal sample (Box-Muller; the second value of each pair is discarded for simplicity
/// of the stream layout).
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    // 1 - U(0,1) lies in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Generates the tensors of `plan` (in parallel; each from its own stream).
fn generate(plan: &[TensorPlan], seed: u64) -> Result<Vec<(String, Tensor)>, InitError> {
    plan.par_iter()
        .map(|p| Ok((p.name.clone(), sample(p, seed)?)))
        .collect()
}

fn sample(p: &TensorPlan, seed: u64) -> candle_core::Result<Tensor> {
    let shape = p.shape.as_slice();
    let device = &Device::Cpu;
    let numel: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(name_stream(&p.name));
    let values: Vec<f32> = match p.rule {
        Rule::Zeros => return Tensor::zeros(shape, DType::F32, device),
        Rule::Ones => return Tensor::ones(shape, DType::F32, device),
        Rule::Constant(v) => return Tensor::full(v as f32, shape, device),
        Rule::Normal(std) => (0..numel)
            .map(|_| (std * standard_normal(&mut rng)) as f32)
            .collect(),
        Rule::TruncNormal { std, bound } => (0..numel)
            .map(|_| loop {
                let v = std * standard_normal(&mut rng);
                // Rejection sampling; with the decoders' bound of 100 std it almost never repeats.
                if v.abs() <= bound {
                    break v as f32;
                }
            })
            .collect(),
        Rule::Uniform(bound) => (0..numel)
            .map(|_| ((2.0 * rng.random::<f64>() - 1.0) * bound) as f32)
            .collect(),
    };
    Tensor::from_vec(values, shape, device)
}

/// Name of the image encoder's positional embedding in the state dict.
pub const VISUAL_POSITIONAL: &str = "clip_model.visual.positional_embedding";

/// A fixed 2-D sine-cosine table for the image encoder's positional embedding `[1 + rows*cols, width]`
/// (MAE's layout: the first half of the channels encodes the row, the second half the column; the class
/// token's row is zero).
///
/// Not what the reference does (it draws `width^-0.5 * randn`): an option for training from scratch,
/// where random positions leave the decoders' position queries nothing to align with at first and the
/// model sits longer on the language-model plateau. The table stays trainable.
pub fn sincos_positional(vision: &VisionConfig) -> Result<Tensor, InitError> {
    let width = vision.width;
    if !width.is_multiple_of(4) {
        return Err(InitError::Config(format!(
            "a sine-cosine positional table needs a vision width divisible by 4, not {width}"
        )));
    }
    let [rows, cols] = vision.grid();
    let quarter = width / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64))
        .collect();
    let mut table = vec![0f32; (1 + rows * cols) * width];
    for r in 0..rows {
        for c in 0..cols {
            let row = &mut table[(1 + r * cols + c) * width..][..width];
            for (half, pos) in [(0, r), (1, c)] {
                let base = half * width / 2;
                for (i, w) in omega.iter().enumerate() {
                    let angle = pos as f64 * w;
                    row[base + i] = angle.sin() as f32;
                    row[base + quarter + i] = angle.cos() as f32;
                }
            }
        }
    }
    Ok(Tensor::from_vec(
        table,
        (1 + rows * cols, width),
        &Device::Cpu,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DecoderConfig, TextConfig};

    /// ViT-B/16 proportions (patch 16, 64-wide heads, 4x MLP, 77 text rows, full vocabulary) at a
    /// size a unit test can generate.
    fn b16_small() -> Clip4StrConfig {
        let mut cfg = Clip4StrConfig::base16();
        cfg.vision = VisionConfig {
            width: 256,
            layers: 2,
            heads: 4,
            patch_size: [16, 16],
            image_size: [64, 64],
        };
        cfg.text = TextConfig {
            vocab_size: 49408,
            positional_rows: 77,
            width: 128,
            layers: 2,
            heads: 2,
        };
        cfg.embed_dim = 128;
        cfg.decoder = DecoderConfig {
            dim: 128,
            heads: 8,
            mlp_hidden: 512,
            depth: 1,
        };
        cfg
    }

    fn stats(t: &Tensor) -> (f64, f64, f64, usize) {
        let v: Vec<f32> = t
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("f32 tensor");
        let n = v.len();
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        let max = v.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
        (mean, var.sqrt(), max, n)
    }

    /// The reference's distribution of each tensor, written out independently of `rule_for`:
    /// (expected std, bound on |x| if any); `None` for constants checked separately.
    fn reference(name: &str, shape: &[usize], cfg: &Clip4StrConfig) -> Option<(f64, Option<f64>)> {
        let vw = cfg.vision.width as f64;
        let tw = cfg.text.width as f64;
        let tl = cfg.text.layers as f64;
        let uniform = |b: f64| Some((b / 3f64.sqrt(), Some(b)));
        let leaf = name.rsplit('.').next().unwrap_or(name);
        if name.contains("ln_") || name.contains(".norm") {
            return None;
        }
        if name.starts_with("clip_model.visual.") {
            if name.ends_with("conv1.weight") {
                return uniform(
                    1.0 / ((3 * cfg.vision.patch_size[0] * cfg.vision.patch_size[1]) as f64).sqrt(),
                );
            }
            if matches!(leaf, "class_embedding" | "positional_embedding" | "proj") {
                return Some((vw.powf(-0.5), None));
            }
            if leaf == "in_proj_weight" {
                return uniform((6.0 / (4.0 * vw)).sqrt());
            }
            if name.ends_with("in_proj_bias") || name.ends_with("out_proj.bias") {
                return None;
            }
            if name.contains("c_proj") {
                return uniform(1.0 / (4.0 * vw).sqrt());
            }
            return uniform(1.0 / vw.sqrt()); // out_proj.weight, c_fc.*
        }
        if let Some(rest) = name.strip_prefix("clip_model.") {
            let proj = tw.powf(-0.5) * (2.0 * tl).powf(-0.5);
            return match rest {
                "token_embedding.weight" => Some((0.02, None)),
                "positional_embedding" => Some((0.01, None)),
                "text_projection" => Some((tw.powf(-0.5), None)),
                "logit_scale" => None,
                _ if leaf == "in_proj_weight" => Some((tw.powf(-0.5), None)),
                _ if name.ends_with("out_proj.weight") || name.ends_with("c_proj.weight") => {
                    Some((proj, None))
                }
                _ if name.ends_with("c_fc.weight") => Some(((2.0 * tw).powf(-0.5), None)),
                _ if name.ends_with("c_fc.bias") => uniform(1.0 / tw.sqrt()),
                _ if name.ends_with("c_proj.bias") => uniform(1.0 / (4.0 * tw).sqrt()),
                _ => None, // zero biases
            };
        }
        // decoders
        if leaf == "in_proj_weight" {
            let d = shape[1] as f64;
            return uniform((6.0 / (4.0 * d)).sqrt());
        }
        if leaf == "bias" || leaf == "in_proj_bias" {
            return None;
        }
        Some((0.02, Some(2.0)))
    }

    fn check_statistics(cfg: &Clip4StrConfig, weights: &[(String, Tensor)]) {
        let expected = Clip4Str::expected_tensors(cfg).expect("expected tensors");
        let names: Vec<(&str, &[usize])> = weights
            .iter()
            .map(|(n, t)| (n.as_str(), t.dims()))
            .collect();
        let want: Vec<(&str, &[usize])> = expected
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        assert_eq!(
            names, want,
            "init_weights must produce exactly expected_tensors"
        );
        for (name, t) in weights {
            assert_eq!(t.dtype(), DType::F32, "{name}");
            let (mean, std, max, n) = stats(t);
            let leaf = name.rsplit('.').next().unwrap_or(name);
            let is_norm =
                name.contains(".ln_") || name.contains("ln_final") || name.contains("norm");
            if is_norm && leaf == "weight" {
                assert!(
                    mean == 1.0 && std == 0.0,
                    "{name}: LayerNorm weight must be 1"
                );
                continue;
            }
            if name == "clip_model.logit_scale" {
                assert!(
                    (mean - (1.0f64 / 0.07).ln()).abs() < 1e-6,
                    "{name} = {mean}"
                );
                continue;
            }
            match reference(name, t.dims(), cfg) {
                None => assert!(max == 0.0, "{name} must be zero, max |x| = {max}"),
                Some((want_std, bound)) => {
                    if let Some(b) = bound {
                        assert!(max <= b * (1.0 + 1e-6), "{name}: |x| = {max} > {b}");
                    }
                    if n >= 500 {
                        let tol = 4.0 / (n as f64).sqrt();
                        assert!(
                            (std / want_std - 1.0).abs() < 0.05 + 2.0 * tol,
                            "{name}: std {std}, expected {want_std}"
                        );
                        assert!(mean.abs() < want_std * tol, "{name}: mean {mean}");
                    } else {
                        assert!(std > 0.0 && max > 0.0, "{name}: not random");
                    }
                }
            }
        }
    }

    #[test]
    fn sincos_table_encodes_row_and_column() {
        let vision = VisionConfig {
            width: 16,
            layers: 1,
            heads: 1,
            patch_size: [4, 8],
            image_size: [8, 32],
        };
        let table = sincos_positional(&vision).unwrap();
        assert_eq!(table.dims(), &[1 + 2 * 4, 16]);
        let rows: Vec<Vec<f32>> = table.to_vec2().unwrap();
        assert!(rows[0].iter().all(|&v| v == 0.0), "class token row is zero");
        // Token (r=1, c=2) is row 1 + 1*4 + 2: channel 0 is sin(r), channel 4 cos(r), 8 sin(c), 12 cos(c).
        let t = &rows[1 + 4 + 2];
        assert!((t[0] - 1f32.sin()).abs() < 1e-6);
        assert!((t[4] - 1f32.cos()).abs() < 1e-6);
        assert!((t[8] - 2f32.sin()).abs() < 1e-6);
        assert!((t[12] - 2f32.cos()).abs() < 1e-6);
        // Every patch gets a distinct code.
        for a in 1..rows.len() {
            for b in a + 1..rows.len() {
                assert_ne!(rows[a], rows[b], "tokens {a} and {b} share a code");
            }
        }
        let odd = VisionConfig {
            width: 18,
            ..vision
        };
        assert!(matches!(sincos_positional(&odd), Err(InitError::Config(_))));
    }

    #[test]
    fn tiny_init_follows_the_reference() {
        let cfg = Clip4StrConfig::tiny();
        let weights = init_weights(&cfg, 1).expect("init");
        check_statistics(&cfg, &weights);
    }

    #[test]
    fn b16_shaped_init_follows_the_reference() {
        let cfg = b16_small();
        let weights = init_weights(&cfg, 2).expect("init");
        check_statistics(&cfg, &weights);
    }

    #[test]
    fn every_preset_has_a_rule_for_every_tensor() {
        for cfg in [
            Clip4StrConfig::base16(),
            Clip4StrConfig::base32(),
            Clip4StrConfig::large14(),
            Clip4StrConfig::huge14(),
            Clip4StrConfig::tiny(),
        ] {
            let plan = init_plan(&cfg).expect("plan");
            let expected = Clip4Str::expected_tensors(&cfg).expect("expected");
            assert_eq!(plan.len(), expected.len());
        }
    }

    #[test]
    fn deterministic_per_seed_and_per_name() {
        let cfg = Clip4StrConfig::tiny();
        let a = init_weights(&cfg, 7).expect("init");
        let b = init_weights(&cfg, 7).expect("init");
        let c = init_weights(&cfg, 8).expect("init");
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).expect("f32");
            v.into_iter().map(f32::to_bits).collect()
        };
        let name = "visual_decoder.layers.0.linear1.weight";
        let get =
            |w: &[(String, Tensor)]| bits(&w.iter().find(|(n, _)| n == name).expect("tensor").1);
        for ((_, x), (_, y)) in a.iter().zip(&b) {
            assert_eq!(bits(x), bits(y));
        }
        assert_ne!(get(&a), get(&c));
        // Same rule and shape, different name: different values.
        let other = "cross_decoder.layers.0.linear1.weight";
        let get_other = bits(&a.iter().find(|(n, _)| n == other).expect("tensor").1);
        assert_ne!(get(&a), get_other);
    }

    #[test]
    fn initialised_model_runs_without_nan() {
        let cfg = Clip4StrConfig::tiny();
        let weights = init_weights(&cfg, 3).expect("init");
        let vb = candle_nn::VarBuilder::from_tensors(
            weights.into_iter().collect(),
            DType::F32,
            &Device::Cpu,
        );
        let model = Clip4Str::new(&cfg, vb).expect("model");
        let [h, w] = cfg.vision.image_size;
        let images = Tensor::randn(0f32, 1.0, (2, 3, h, w), &Device::Cpu).expect("images");
        let adapter = crate::charset::CharsetAdapter::new(&cfg.charset_test);
        let logits = model.forward(&images, &adapter).expect("forward");
        let v: Vec<f32> = logits.flatten_all().and_then(|t| t.to_vec1()).expect("f32");
        assert!(!v.is_empty() && v.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn invalid_config_is_an_error() {
        let mut cfg = Clip4StrConfig::tiny();
        cfg.decoder.heads = 3;
        let err = init_weights(&cfg, 0).unwrap_err();
        assert!(matches!(err, InitError::Invalid(_)), "{err}");
    }

    #[test]
    fn config_from_b16_shapes() {
        // Shapes of OpenAI ViT-B/16 and of OpenCLIP ViT-H/14 (20 heads from width / 64).
        let b16 = Clip4StrConfig::base16();
        let h14 = Clip4StrConfig::huge14();
        for want in [b16, h14] {
            let clip: Vec<(String, Tensor)> = Clip4Str::expected_tensors(&want)
                .expect("expected")
                .into_iter()
                .filter(|(n, _)| n.starts_with(CLIP_PREFIX))
                .map(|(n, s)| {
                    let t = Tensor::zeros((), DType::F32, &Device::Cpu)
                        .and_then(|z| z.broadcast_as(s.as_slice()))
                        .expect("zeros");
                    (n, t)
                })
                .collect();
            let got = config_from_clip(&clip, &Clip4StrConfig::tiny()).expect("config");
            assert_eq!(got.vision, want.vision);
            assert_eq!(got.text, want.text);
            assert_eq!(got.embed_dim, want.embed_dim);
            assert_eq!(got.decoder, want.decoder);
            // Non-CLIP settings come from the base.
            assert_eq!(got.text_freeze_nlayer, 1);
        }
    }
}
