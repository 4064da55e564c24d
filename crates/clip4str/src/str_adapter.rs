//! STRAdapter (SPEC §16), the paper's parameter-efficient tuning: CLIP's image encoder stays frozen, an adapter
//! reshapes its tokens, and one PARSeq two-stream decoder reads them. There is no text branch and no cross-modal
//! decoder. The adapters are the reference's five: CLIP-Adapter (`linear`), an attention block (`attention`), and
//! the ladder side networks of LST (`ladder`, `linear_ladder`, `ladder_pruning`), which read the inputs of chosen
//! CLIP blocks and are gated against CLIP's own output.

use std::collections::HashMap;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::charset::{CharsetTokenizer, CHARSET_36, CHARSET_94};
use crate::clip::transformer::ResidualAttentionBlock;
use crate::clip::vision::VisionTransformer;
use crate::config::{
    clip_heads, count_blocks, tensor_dim, ClipShapes, ConfigError, DecoderConfig, VisionConfig,
};
use crate::decoder::Decoder;
use crate::decoding::{decode_ar, refine_pass, start_rows};
use crate::model::{ForwardOptions, Output, Stage, StageObserver};
use crate::nn::{LayerNorm, Linear, Mode};

/// Which adapter sits between the frozen encoder and the decoder (`adapter_type` of the reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterType {
    /// CLIP-Adapter: `0.2 relu(fc2(relu(fc1 m))) + 0.8 m` per token.
    Linear,
    /// A CLIP residual block over the tokens: `0.5 block(m) + 0.5 m`.
    Attention,
    /// LST: copies of CLIP blocks as a side network.
    Ladder,
    /// LST with CLIP-Adapter side blocks.
    LinearLadder,
    /// LST with side blocks pruned from CLIP's by L1 norm.
    LadderPruning,
}

impl AdapterType {
    /// Every adapter type.
    pub const ALL: [AdapterType; 5] = [
        Self::Linear,
        Self::Attention,
        Self::Ladder,
        Self::LinearLadder,
        Self::LadderPruning,
    ];

    /// The reference's name (`adapter_type`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Attention => "attention",
            Self::Ladder => "ladder",
            Self::LinearLadder => "linear_ladder",
            Self::LadderPruning => "ladder_pruning",
        }
    }

    /// The type named `name`, if the reference has it.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    fn is_ladder(self) -> bool {
        matches!(
            self,
            Self::Ladder | Self::LinearLadder | Self::LadderPruning
        )
    }
}

/// Everything needed to build an STRAdapter.
#[derive(Debug, Clone, PartialEq)]
pub struct StrAdapterConfig {
    /// The frozen CLIP image encoder.
    pub vision: VisionConfig,
    /// CLIP's embedding width `E` (`proj`'s output); the decoder's width. The reference's `embed_dim`
    /// hyper-parameter is ignored, as there.
    pub embed_dim: usize,
    /// The PARSeq decoder.
    pub decoder: DecoderConfig,
    /// The adapter.
    pub adapter: AdapterType,
    /// CLIP blocks whose inputs the ladder side network reads, in order (ladder types only).
    pub block_ids: Vec<usize>,
    /// Width reduction of `ladder_pruning`'s side blocks.
    pub prune_reduction: usize,
    /// Training charset (decoder classes minus EOS).
    pub charset_train: String,
    /// Charset the output is reduced to in evaluation.
    pub charset_test: String,
    /// Longest label; the decoder has one more position query.
    pub max_label_length: usize,
    /// Dropout of the decoder in training.
    pub dropout: f32,
}

impl StrAdapterConfig {
    /// [`Self::from_tensors`] with a user override (a `--config` JSON: its keys at the top or in a
    /// `hyper_parameters` section, the layout of tiny_config.json) laid over the file's hyper-parameters: what a
    /// file without them cannot tell.
    pub fn from_tensors_with(
        shapes: &[(String, Vec<usize>)],
        hparams: Option<&serde_json::Value>,
        config_override: Option<&serde_json::Value>,
    ) -> std::result::Result<Self, ConfigError> {
        let o = match config_override {
            None => return Self::from_tensors(shapes, hparams),
            Some(serde_json::Value::Object(o)) => o,
            Some(other) => {
                return Err(ConfigError::WrongType {
                    key: "(the whole file)".into(),
                    expected: "a JSON object",
                    found: other.to_string(),
                })
            }
        };
        let mut merged = hparams
            .and_then(|h| h.as_object())
            .cloned()
            .unwrap_or_default();
        let section = o.get("hyper_parameters").and_then(|v| v.as_object());
        let top = o.iter().filter(|(k, _)| k.as_str() != "hyper_parameters");
        merged.extend(
            top.chain(section.into_iter().flatten())
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        Self::from_tensors(shapes, Some(&serde_json::Value::Object(merged)))
    }

    /// Every dimension from state-dict shapes; the head counts, adapter type, `block_ids` and
    /// `prune_reduction` from the Lightning `hyper_parameters` where the shapes cannot tell.
    pub fn from_tensors(
        shapes: &[(String, Vec<usize>)],
        hparams: Option<&serde_json::Value>,
    ) -> std::result::Result<Self, ConfigError> {
        let pairs = shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice()));
        let dim = |name: &str, i: usize| tensor_dim(pairs.clone(), name, i);
        let names = || pairs.clone().map(|(n, _)| n);
        let has = |prefix: &str| names().any(|n| n.starts_with(prefix));
        let clip = ClipShapes::read(pairs.clone())?;
        let hp = |key: &str| hparams.and_then(|h| h.get(key));
        let hp_usize = |key: &str| hp(key).and_then(|v| v.as_u64()).map(|v| v as usize);

        let adapter = match hp("adapter_type").and_then(|v| v.as_str()) {
            Some(name) => AdapterType::from_name(name).ok_or_else(|| ConfigError::Adapter {
                reason: format!("adapter_type {name:?} is not one of the reference's"),
            })?,
            None if has("adapter.fc.") => AdapterType::Linear,
            None if has("adapter.attn.") => AdapterType::Attention,
            None if has("adapter.resblocks.0.fc.") => AdapterType::LinearLadder,
            None if has("adapter.resblocks.") => {
                let full =
                    dim("adapter.resblocks.0.attn.in_proj_weight", 0)? == 3 * clip.vision_width;
                if full {
                    AdapterType::Ladder
                } else {
                    AdapterType::LadderPruning
                }
            }
            None => {
                return Err(ConfigError::Adapter {
                    reason: "no adapter tensors (adapter.*) and no adapter_type".into(),
                })
            }
        };
        let side_blocks = count_blocks(names(), "adapter.resblocks.");
        let block_ids: Vec<usize> = match hp("block_ids").and_then(|v| v.as_array()) {
            Some(ids) => ids
                .iter()
                .map(|v| v.as_u64().map(|v| v as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ConfigError::Adapter {
                    reason: "block_ids holds something other than block numbers".into(),
                })?,
            // Without hyper-parameters, the side blocks are taken as CLIP's first ones.
            None => (0..side_blocks).collect(),
        };
        if adapter.is_ladder() {
            if block_ids.len() != side_blocks {
                return Err(ConfigError::Adapter {
                    reason: format!(
                        "block_ids {block_ids:?} name {} blocks, the file has {side_blocks} side blocks",
                        block_ids.len()
                    ),
                });
            }
            if let Some(bad) = block_ids.iter().find(|&&b| b >= clip.vision_layers) {
                return Err(ConfigError::Adapter {
                    reason: format!(
                        "block_ids names block {bad}, CLIP has {} blocks",
                        clip.vision_layers
                    ),
                });
            }
        }
        let prune_reduction = match adapter {
            AdapterType::LadderPruning => {
                let rows = dim("adapter.resblocks.0.attn.in_proj_weight", 0)?;
                hp_usize("prune_reduction").unwrap_or(3 * clip.vision_width / rows.max(1))
            }
            _ => hp_usize("prune_reduction").unwrap_or(1),
        };

        let (ph, pw) = (clip.patch_size[0], clip.patch_size[1]);
        let patches = clip.vision_rows - 1;
        let image_size = match hp("img_size").and_then(|v| v.as_array()) {
            Some(a) if a.len() == 2 => {
                let size = |i: usize| a[i].as_u64().unwrap_or(0) as usize;
                let (h, w) = (size(0), size(1));
                if ph > 0 && pw > 0 && (h / ph) * (w / pw) == patches {
                    [h, w]
                } else {
                    clip.square_image_size()?
                }
            }
            _ => clip.square_image_size()?,
        };
        let vision_heads = hp("clip_arch")
            .and_then(|a| a.get("vision_heads"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .or_else(|| clip_heads(clip.vision_width))
            .ok_or(ConfigError::UnknownHeads {
                part: "vision",
                width: clip.vision_width,
            })?;
        let num_classes = dim("head.weight", 0)?;
        let charset = |key: &str, default: &str| {
            hp(key)
                .and_then(|v| v.as_str())
                .unwrap_or(default)
                .to_string()
        };
        let charset_train = charset("charset_train", CHARSET_94);
        if charset_train.chars().count() + 1 != num_classes {
            return Err(ConfigError::CharsetMismatch {
                classes: num_classes,
                characters: charset_train.chars().count(),
            });
        }
        let depth = count_blocks(names(), "decoder.layers.");
        if depth == 0 {
            return Err(ConfigError::NoBlocks);
        }
        let embed_dim = clip.embed_dim;
        let decoder = DecoderConfig {
            dim: dim("head.weight", 1)?,
            heads: hp_usize("dec_num_heads").unwrap_or(12),
            mlp_hidden: dim("decoder.layers.0.linear1.weight", 0)?,
            depth,
        };
        if decoder.dim != embed_dim {
            return Err(ConfigError::DecoderWidth {
                decoder: decoder.dim,
                embed: embed_dim,
            });
        }
        if !decoder.dim.is_multiple_of(decoder.heads) {
            return Err(ConfigError::IndivisibleHeads {
                part: "decoder",
                width: decoder.dim,
                heads: decoder.heads,
            });
        }
        Ok(Self {
            vision: VisionConfig {
                width: clip.vision_width,
                layers: clip.vision_layers,
                heads: vision_heads,
                patch_size: [ph, pw],
                image_size,
            },
            embed_dim,
            decoder,
            adapter,
            block_ids,
            prune_reduction,
            charset_train,
            charset_test: charset("charset_test", CHARSET_36),
            max_label_length: dim("pos_queries", 1)?.saturating_sub(1),
            dropout: hp("dropout").and_then(|v| v.as_f64()).unwrap_or(0.1) as f32,
        })
    }
}

impl StrAdapterConfig {
    /// Lightning-style `hyper_parameters` so [`StrAdapterConfig::from_tensors`] restores everything the shapes
    /// do not tell.
    pub fn hyper_parameters(&self) -> serde_json::Value {
        serde_json::json!({
            "adapter_type": self.adapter.name(),
            "block_ids": self.block_ids,
            "prune_reduction": self.prune_reduction,
            "img_size": self.vision.image_size,
            "patch_size": self.vision.patch_size,
            "dec_num_heads": self.decoder.heads,
            "dec_depth": self.decoder.depth,
            "charset_train": self.charset_train,
            "charset_test": self.charset_test,
            "max_label_length": self.max_label_length,
            "dropout": self.dropout,
            "clip_arch": { "vision_heads": self.vision.heads },
        })
    }
}

/// `relu(fc2(relu(fc1 x)))` without biases: CLIP-Adapter's bottleneck (`fc.0`, `fc.2`).
#[derive(Debug, Clone)]
struct Bottleneck {
    fc1: Linear,
    fc2: Linear,
    /// Weight of the bottleneck's output against its input.
    ratio: f64,
}

impl Bottleneck {
    fn new(dim: usize, reduction: usize, ratio: f64, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("fc");
        Ok(Self {
            fc1: Linear::from_weights(vb.get((dim / reduction, dim), "0.weight")?, None),
            fc2: Linear::from_weights(vb.get((dim, dim / reduction), "2.weight")?, None),
            ratio,
        })
    }

    fn set_mode(&mut self, mode: Mode) {
        self.fc1.set_mode(mode);
        self.fc2.set_mode(mode);
    }

    /// `ratio * bottleneck(x) + (1 - ratio) * x`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.fc2.forward(&self.fc1.forward(x)?.relu()?)?.relu()?;
        (y * self.ratio)? + (x * (1.0 - self.ratio))?
    }
}

/// One block of a ladder side network.
#[derive(Debug, Clone)]
enum SideBlock {
    /// A CLIP residual block, full (`ladder`) or pruned (`ladder_pruning`).
    Residual(Box<ResidualAttentionBlock>),
    /// A CLIP-Adapter bottleneck (`linear_ladder`).
    Bottleneck(Bottleneck),
}

impl SideBlock {
    /// Side block `adapter.resblocks.k` of a ladder adapter.
    fn new(cfg: &StrAdapterConfig, vb: VarBuilder) -> Result<Self> {
        let (width, heads) = (cfg.vision.width, cfg.vision.heads);
        Ok(match cfg.adapter {
            AdapterType::LinearLadder => Self::Bottleneck(Bottleneck::new(width, 4, 0.5, vb)?),
            AdapterType::LadderPruning => Self::Residual(Box::new(ResidualAttentionBlock::pruned(
                width,
                cfg.prune_reduction,
                heads,
                vb,
            )?)),
            _ => Self::Residual(Box::new(ResidualAttentionBlock::new(width, heads, vb)?)),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Residual(block) => block.forward(x, None),
            Self::Bottleneck(b) => b.forward(x),
        }
    }

    fn set_mode(&mut self, mode: Mode) {
        match self {
            Self::Residual(block) => block.set_mode(mode),
            Self::Bottleneck(b) => b.set_mode(mode),
        }
    }
}

/// LST's side network: blocks over the inputs of CLIP blocks `block_ids`, its own `ln_post` and `proj`, and the
/// gates `W = sigmoid(alpha / 0.1)`.
#[derive(Debug, Clone)]
struct Ladder {
    blocks: Vec<SideBlock>,
    alpha: Tensor,
    ln_post: LayerNorm,
    proj: Tensor,
}

/// The reference's temperature of the ladder gates.
const LADDER_T: f64 = 0.1;

impl Ladder {
    /// The gates `W = sigmoid(alpha / T)` `[K]`, in the graph (alpha trains).
    fn gates(&self) -> Result<Tensor> {
        let x = (&self.alpha / LADDER_T)?;
        // 1 / (1 + exp(-x)), written out so that its gradient is candle's.
        (x.neg()?.exp()? + 1.0)?.recip()
    }

    /// `w[k] * a + (1 - w[k]) * b` for the gate `k` of `w [K]`.
    fn mix(w: &Tensor, k: usize, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let wk = w.narrow(0, k, 1)?.to_dtype(a.dtype())?;
        a.broadcast_mul(&wk)? + b.broadcast_mul(&(wk.neg()? + 1.0)?)?
    }

    /// The side network's output `ln_post(x) @ proj` before the final gate, from the CLIP block inputs `h`.
    fn side_output(&self, h: &[Tensor]) -> Result<Tensor> {
        let w = self.gates()?;
        let mut x = self.blocks[0].forward(&h[0])?;
        for (k, (block, h)) in self.blocks.iter().zip(h).enumerate().skip(1) {
            x = block.forward(&Self::mix(&w, k, h, &x)?)?;
        }
        VisionTransformer::project(&self.ln_post, &self.proj, &x)
    }
}

/// The adapter on CLIP's tokens.
#[derive(Debug, Clone)]
enum Adapter {
    Linear(Bottleneck),
    Attention(Box<ResidualAttentionBlock>),
    Ladder(Ladder),
}

/// The whole STRAdapter network; field names follow the state-dict prefixes.
#[derive(Debug, Clone)]
pub struct StrAdapter {
    /// `clip_model.visual` (frozen).
    pub visual: VisionTransformer,
    adapter: Adapter,
    /// `decoder.*`, `head`, `text_embed`, `pos_queries`.
    pub decoder: Decoder,
    /// Characters <-> class ids.
    pub tokenizer: CharsetTokenizer,
    cfg: StrAdapterConfig,
}

impl StrAdapter {
    /// Loads the network from a reference state dict (`clip_model.*`, `adapter.*`, `decoder.*`, `head.*`,
    /// `text_embed.*`, `pos_queries`).
    pub fn new(cfg: &StrAdapterConfig, vb: VarBuilder) -> Result<Self> {
        let (e, wv) = (cfg.embed_dim, cfg.vision.width);
        let visual = VisionTransformer::new(&cfg.vision, e, vb.pp("clip_model").pp("visual"))?;
        let avb = vb.pp("adapter");
        let adapter =
            match cfg.adapter {
                AdapterType::Linear => Adapter::Linear(Bottleneck::new(e, 2, 0.2, avb)?),
                AdapterType::Attention => Adapter::Attention(Box::new(
                    ResidualAttentionBlock::new(e, cfg.decoder.heads, avb.pp("attn"))?,
                )),
                _ => Adapter::Ladder(Ladder {
                    blocks: (0..cfg.block_ids.len())
                        .map(|k| SideBlock::new(cfg, avb.pp("resblocks").pp(k)))
                        .collect::<Result<Vec<_>>>()?,
                    alpha: avb.get(cfg.block_ids.len(), "alpha")?,
                    ln_post: LayerNorm::new(wv, avb.pp("ln_post"))?,
                    proj: avb.get((wv, e), "proj")?,
                }),
            };
        let tokenizer = CharsetTokenizer::new(&cfg.charset_train);
        let sizes = (
            tokenizer.num_classes(),
            tokenizer.num_classes() + 2,
            cfg.max_label_length + 1,
        );
        let decoder = Decoder::split(&cfg.decoder, sizes, cfg.dropout, vb.pp("decoder"), vb)?;
        Ok(Self {
            visual,
            adapter,
            decoder,
            tokenizer,
            cfg: cfg.clone(),
        })
    }

    /// The state-dict `(name, shape)` list this configuration loads, in construction order. A released file
    /// also holds CLIP's text half, which STRAdapter never reads (see [`crate::family::identify`]).
    pub fn expected_tensors(cfg: &StrAdapterConfig) -> Result<Vec<(String, Vec<usize>)>> {
        crate::model::record_shapes(|vb| Self::new(cfg, vb).map(|_| ()))
    }

    /// Where the weights live: inputs go there.
    pub fn device(&self) -> &candle_core::Device {
        self.visual.device()
    }

    /// The same model computing in `mode` (weights shared with `self`).
    pub fn with_mode(&self, mode: Mode) -> Self {
        let mut m = self.clone();
        m.set_mode(mode);
        m
    }

    /// Computes in `mode` from now on.
    pub fn set_mode(&mut self, mode: Mode) {
        self.visual.set_mode(mode);
        match &mut self.adapter {
            Adapter::Linear(b) => b.set_mode(mode),
            Adapter::Attention(block) => block.set_mode(mode),
            Adapter::Ladder(l) => {
                l.blocks.iter_mut().for_each(|b| b.set_mode(mode));
                l.ln_post.set_mode(mode);
            }
        }
        self.decoder.set_mode(mode);
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &StrAdapterConfig {
        &self.cfg
    }

    /// CLIP's tokens through the adapter: the memory `[B, 1 + patches, E]` the decoder reads. CLIP runs outside
    /// any autograd graph (it is frozen), so training keeps no activations for it.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let images = images.detach();
        match &self.adapter {
            Adapter::Linear(b) => b.forward(&self.visual.forward(&images)?.detach()),
            Adapter::Attention(block) => {
                let m = self.visual.forward(&images)?.detach();
                (block.forward(&m, None)? * 0.5)? + (m * 0.5)?
            }
            Adapter::Ladder(ladder) => {
                let (m, h) = self
                    .visual
                    .forward_with_block_inputs(&images, &self.cfg.block_ids)?;
                let h: Vec<Tensor> = h.iter().map(Tensor::detach).collect();
                let x = ladder.side_output(&h)?;
                Ladder::mix(&ladder.gates()?, 0, &m.detach(), &x)
            }
        }
    }

    /// The side network's output before the final gate (ladder types): the fixtures' check point.
    pub fn side_output(&self, images: &Tensor) -> Result<Option<Tensor>> {
        let Adapter::Ladder(ladder) = &self.adapter else {
            return Ok(None);
        };
        let (_, h) = self
            .visual
            .forward_with_block_inputs(images, &self.cfg.block_ids)?;
        ladder.side_output(&h).map(Some)
    }

    /// Test-mode forward (SPEC §16, the PARSeq forward): greedy AR decoding with the batch-wide early stop, then
    /// one cloze refinement. Returns the AR logits `[B, T, C]` and the refined logits `[B, 26, C]`.
    pub fn forward(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let out = self.forward_observed(images, &ForwardOptions::default(), &mut ())?;
        Ok((out.vis_logits, out.final_logits))
    }

    /// The forward pass under `opts` (validation length, refinement passes), telling `observer` as the encoder
    /// (CLIP and the adapter), the AR decoding and each refinement end.
    pub fn forward_observed(
        &self,
        images: &Tensor,
        opts: &ForwardOptions,
        observer: &mut dyn StageObserver,
    ) -> Result<Output> {
        let memory = self.encode(&images.to_dtype(DType::F32)?)?;
        observer.stage_done(Stage::Encoder);
        let testing = opts.max_length.is_none();
        let max_len = self.cfg.max_label_length;
        let num_steps = opts.max_length.map_or(max_len, |l| l.min(max_len)) + 1;
        let mut tgt = start_rows(&self.tokenizer, memory.dim(0)?, num_steps);
        let kv = self.decoder.memory_kv(&memory)?;
        let ar = decode_ar(
            &self.decoder,
            &self.tokenizer,
            &kv,
            &mut tgt,
            num_steps,
            testing,
            memory.device(),
        )?;
        observer.stage_done(Stage::VisualDecode);
        let mut logits = ar.clone();
        for _ in 0..opts.refine_iters {
            logits = refine_pass(&self.decoder, &self.tokenizer, &kv, &logits, num_steps)?;
            observer.stage_done(Stage::Refine);
        }
        Ok(Output {
            num_ar_steps: ar.dim(1)?,
            memory,
            vis_logits: ar,
            final_logits: logits,
        })
    }
}

/// The indices of the `n` largest of `values`, ascending (the reference's `prune_v2` selection).
fn keep_largest(values: &[f32], n: usize) -> Vec<u32> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    let mut kept: Vec<u32> = order[..n.min(values.len())]
        .iter()
        .map(|&i| i as u32)
        .collect();
    kept.sort_unstable();
    kept
}

/// Row (`dim` 0) or column (`dim` 1) L1 norms of a matrix.
fn l1_norms(w: &Tensor, dim: usize) -> Result<Vec<f32>> {
    w.abs()?.sum(1 - dim)?.to_dtype(DType::F32)?.to_vec1()
}

/// `w` with only the rows (`dim` 0) or columns (`dim` 1) of largest L1 norm, `n` of them.
fn prune_by_norm(w: &Tensor, dim: usize, n: usize) -> Result<Tensor> {
    let kept = keep_largest(&l1_norms(w, dim)?, n);
    w.index_select(&Tensor::new(kept, w.device())?, dim)
}

/// `b` with only its `n` entries of largest magnitude.
fn prune_bias(b: &Tensor, n: usize) -> Result<Tensor> {
    let kept = keep_largest(&b.abs()?.to_dtype(DType::F32)?.to_vec1()?, n);
    b.index_select(&Tensor::new(kept, b.device())?, 0)
}

/// The construction-time values of a ladder adapter's CLIP-derived tensors (SPEC §16): `ln_post` and `proj`
/// copied from CLIP's, gates `alpha = 0`, and for `ladder` / `ladder_pruning` each side block `k` derived from
/// CLIP visual block `block_ids[k]` (`prune_v2`: every tensor pruned on its own by L1 norm or magnitude,
/// `int(rows / prune_reduction)` kept, in their original order; a reduction of 1 copies the block).
/// `linear_ladder`'s side blocks are not derived from CLIP and are not returned.
pub fn ladder_init(
    weights: &HashMap<String, Tensor>,
    cfg: &StrAdapterConfig,
) -> Result<Vec<(String, Tensor)>> {
    let get = |name: &str| {
        weights
            .get(name)
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg(format!("{name} is missing")))
    };
    let visual = "clip_model.visual";
    let mut out = vec![
        (
            "adapter.ln_post.weight".to_string(),
            get(&format!("{visual}.ln_post.weight"))?,
        ),
        (
            "adapter.ln_post.bias".to_string(),
            get(&format!("{visual}.ln_post.bias"))?,
        ),
        ("adapter.proj".to_string(), get(&format!("{visual}.proj"))?),
    ];
    let proj = get(&format!("{visual}.proj"))?;
    let alpha = Tensor::zeros(cfg.block_ids.len(), proj.dtype(), proj.device())?;
    out.push(("adapter.alpha".to_string(), alpha));
    let r = match cfg.adapter {
        AdapterType::Ladder => 1,
        AdapterType::LadderPruning => cfg.prune_reduction.max(1),
        _ => return Ok(out),
    };
    let w = cfg.vision.width;
    for (k, b) in cfg.block_ids.iter().enumerate() {
        let src = |n: &str| get(&format!("{visual}.transformer.resblocks.{b}.{n}"));
        let mut put = |n: &str, t: Tensor| out.push((format!("adapter.resblocks.{k}.{n}"), t));
        let (in_w, in_b) = (src("attn.in_proj_weight")?, src("attn.in_proj_bias")?);
        let thirds =
            |t: &Tensor| -> Result<Vec<Tensor>> { (0..3).map(|i| t.narrow(0, i * w, w)).collect() };
        let weight_rows = thirds(&in_w)?
            .iter()
            .map(|t| prune_by_norm(t, 0, w / r))
            .collect::<Result<Vec<_>>>()?;
        put("attn.in_proj_weight", Tensor::cat(&weight_rows, 0)?);
        let bias = thirds(&in_b)?
            .iter()
            .map(|t| prune_bias(t, w / r))
            .collect::<Result<Vec<_>>>()?;
        put("attn.in_proj_bias", Tensor::cat(&bias, 0)?);
        put(
            "attn.out_proj.weight",
            prune_by_norm(&src("attn.out_proj.weight")?, 1, w / r)?,
        );
        put(
            "mlp.c_fc.weight",
            prune_by_norm(&src("mlp.c_fc.weight")?, 0, 4 * w / r)?,
        );
        put(
            "mlp.c_fc.bias",
            prune_bias(&src("mlp.c_fc.bias")?, 4 * w / r)?,
        );
        put(
            "mlp.c_proj.weight",
            prune_by_norm(&src("mlp.c_proj.weight")?, 1, 4 * w / r)?,
        );
        for n in [
            "attn.out_proj.bias",
            "mlp.c_proj.bias",
            "ln_1.weight",
            "ln_1.bias",
            "ln_2.weight",
            "ln_2.bias",
        ] {
            put(n, src(n)?);
        }
    }
    Ok(out)
}
