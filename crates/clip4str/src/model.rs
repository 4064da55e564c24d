//! CLIP4STR: encode -> visual AR decode -> captions -> text encoder -> cross-modal AR decode -> refine.
//!
//! Follows `VL4STR.forward` (SPEC §8) step by step, including its batch-wide early stop and the
//! text features being recomputed from the refined visual logits.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::charset::{CharsetAdapter, CharsetTokenizer};
use crate::clip::bpe::ClipBpe;
use crate::clip::text::TextTransformer;
use crate::clip::vision::VisionTransformer;
use crate::config::Clip4StrConfig;
use crate::decoder::{Decoder, MemoryKv};
use crate::decoding::{argmax_ids, decode_ar, ids_tensor, refine_pass, start_rows};
use crate::nn::Mode;

/// The whole CLIP4STR network; field names follow the state-dict prefixes.
#[derive(Clone)]
pub struct Clip4Str {
    /// `clip_model.visual`.
    pub visual: VisionTransformer,
    /// Text half of `clip_model`.
    pub text: TextTransformer,
    /// `visual_decoder`: reads the image tokens.
    pub visual_decoder: Decoder,
    /// `cross_decoder`: reads `[image tokens ; text tokens]`.
    pub cross_decoder: Decoder,
    /// Characters <-> class ids.
    pub tokenizer: CharsetTokenizer,
    bpe: Arc<ClipBpe>,
    cfg: Clip4StrConfig,
}

impl std::fmt::Debug for Clip4Str {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clip4Str")
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// How to run one forward pass.
#[derive(Debug, Clone)]
pub struct ForwardOptions {
    /// `None`: testing mode (26 steps, early stop when every sample has an EOS);
    /// `Some(L)`: validation mode, `min(L, max_label_length) + 1` steps, no early stop.
    pub max_length: Option<usize>,
    /// Refinement passes (the release uses 1).
    pub refine_iters: usize,
    /// Each sample decodes as if it were alone (its own stopping step and refinement length), so results do
    /// not depend on the batch: on the CPU they are batch 1's bit for bit. The default reproduces the
    /// reference's batch-wide early stop.
    pub per_sample_stop: bool,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self {
            max_length: None,
            refine_iters: 1,
            per_sample_stop: false,
        }
    }
}

/// Every intermediate of a forward pass, so a user (or a parity test) can stop at any stage.
#[derive(Debug, Clone)]
pub struct Trace {
    /// Image tokens `[B, S, E]`.
    pub memory: Tensor,
    /// AR steps actually run (`T`).
    pub num_ar_steps: usize,
    /// Visual AR logits `[B, T, C]`.
    pub vis_logits: Tensor,
    /// Captions from the visual AR prediction (after the charset adapter).
    pub captions_ar: Vec<String>,
    /// Their CLIP tokens `[B, context]` (u32).
    pub text_ids_ar: Tensor,
    /// Text features `[B, context, E]`.
    pub text_feats_ar: Tensor,
    /// Cross-modal AR logits `[B, T, C]`.
    pub cross_logits: Tensor,
    /// Refined visual logits `[B, num_steps, C]` (None without refinement).
    pub refine_vis_logits: Option<Tensor>,
    /// Captions from the refined visual logits.
    pub captions_refine: Vec<String>,
    /// Their CLIP tokens.
    pub text_ids_refine: Option<Tensor>,
    /// Their text features.
    pub text_feats_refine: Option<Tensor>,
    /// The output: refined cross-modal logits `[B, num_steps, C]`.
    pub final_logits: Tensor,
}

/// What every family's forward pass gives: the image tokens the decoder read, the AR logits, and the output.
#[derive(Debug, Clone)]
pub struct Output {
    /// Image tokens `[B, S, E]` (after the adapter, for STRAdapter).
    pub memory: Tensor,
    /// AR steps actually run (`T`).
    pub num_ar_steps: usize,
    /// The (visual) decoder's AR logits `[B, T, C]`.
    pub vis_logits: Tensor,
    /// The output logits `[B, num_steps, C]`: CLIP4STR's refined cross-modal logits, STRAdapter's refined ones.
    pub final_logits: Tensor,
}

impl From<Trace> for Output {
    fn from(t: Trace) -> Self {
        Self {
            memory: t.memory,
            num_ar_steps: t.num_ar_steps,
            vis_logits: t.vis_logits,
            final_logits: t.final_logits,
        }
    }
}

/// The stages of a forward pass (SPEC §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Image encoder (ViT).
    Encoder,
    /// Visual decoder: memory projection and AR decoding.
    VisualDecode,
    /// CLIP text encoder over captions (after AR decoding, and again inside each refinement pass).
    TextEncoder,
    /// Cross-modal decoder: AR decoding over `[image ; text]`.
    CrossDecode,
    /// A refinement pass of one decoder (the text encoder between them excluded).
    Refine,
}

/// Hears each stage of a forward pass end, e.g. to time it: the model keeps no clock. Everything since the
/// previous call belongs to `stage`.
pub trait StageObserver {
    /// `stage` has just finished one of its runs.
    fn stage_done(&mut self, stage: Stage);
}

/// No observer.
impl StageObserver for () {
    fn stage_done(&mut self, _: Stage) {}
}

/// What the visual decoder's AR pass leaves for the next steps.
struct VisualPass {
    /// The visual decoder's projection of the image tokens, reused by refinement.
    kv: MemoryKv,
    /// AR logits `[B, T, C]`.
    logits: Tensor,
    /// The decoded ids, `[BOS] + predictions`, `num_steps` per row.
    tgt: Vec<Vec<u32>>,
}

/// Captions from logits and their text features.
struct TextPass {
    captions: Vec<String>,
    ids: Tensor,
    features: Tensor,
}

/// What the refinement passes produce.
struct RefinePass {
    vis_logits: Tensor,
    text: TextPass,
    cross_logits: Tensor,
}

impl Clip4Str {
    /// Builds the model; `vb` is rooted at the state dict (`clip_model.*`, `visual_decoder.*`, `cross_decoder.*`).
    pub fn new(cfg: &Clip4StrConfig, vb: VarBuilder) -> Result<Self> {
        let clip = vb.pp("clip_model");
        let nc = cfg.num_classes();
        let cs = cfg.charset_size();
        let nq = cfg.num_queries();
        Ok(Self {
            visual: VisionTransformer::new(&cfg.vision, cfg.embed_dim, clip.pp("visual"))?,
            text: TextTransformer::new(&cfg.text, cfg.embed_dim, clip)?,
            visual_decoder: Decoder::new(
                &cfg.decoder,
                nc,
                cs,
                nq,
                cfg.dropout,
                vb.pp("visual_decoder"),
            )?,
            cross_decoder: Decoder::new(
                &cfg.decoder,
                nc,
                cs,
                nq,
                cfg.dropout,
                vb.pp("cross_decoder"),
            )?,
            tokenizer: CharsetTokenizer::new(&cfg.charset_train),
            bpe: Arc::new(ClipBpe::new()),
            cfg: cfg.clone(),
        })
    }

    /// Computes in `mode` from now on.
    pub fn set_mode(&mut self, mode: Mode) {
        self.visual.set_mode(mode);
        self.text.set_mode(mode);
        self.visual_decoder.set_mode(mode);
        self.cross_decoder.set_mode(mode);
    }

    /// The same model computing in `mode`; the weights (and packed forms) are shared with `self`.
    pub fn with_mode(&self, mode: Mode) -> Self {
        let mut model = self.clone();
        model.set_mode(mode);
        model
    }

    /// Builds the model on `device` from named f32 tensors (e.g. freshly initialised weights).
    pub fn from_tensors(
        cfg: &Clip4StrConfig,
        weights: std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        Self::new(cfg, VarBuilder::from_tensors(weights, DType::F32, device))
    }

    /// Where the weights live: inputs go there.
    pub fn device(&self) -> &Device {
        self.visual.device()
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &Clip4StrConfig {
        &self.cfg
    }

    /// Images `[B, 3, H, W]` -> memory `[B, S, E]`.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let _span = tracing::debug_span!("encode").entered();
        self.visual.forward(images)
    }

    /// Captions from logits like `decode_fast`: argmax of every position, cut at EOS, charset adapter.
    pub fn captions(&self, logits: &Tensor, adapter: &CharsetAdapter) -> Result<Vec<String>> {
        Ok(argmax_ids(logits)?
            .iter()
            .map(|ids| self.tokenizer.decode_fast(ids, Some(adapter)))
            .collect())
    }

    /// CLIP BPE of each caption (context 16, truncated) and its text features.
    pub fn text_features(&self, captions: &[String], device: &Device) -> Result<(Tensor, Tensor)> {
        let _span = tracing::debug_span!("text_encoder").entered();
        let ctx = self.cfg.context_length;
        let rows: Vec<Vec<u32>> = captions.iter().map(|c| self.bpe.tokenize(c, ctx)).collect();
        let ids = ids_tensor(&rows, device)?;
        let feats = self.text.forward(&ids)?;
        Ok((ids, feats))
    }

    /// The released model's forward: returns refined cross-modal logits `[B, num_steps, C]`.
    pub fn forward(&self, images: &Tensor, adapter: &CharsetAdapter) -> Result<Tensor> {
        Ok(self
            .forward_trace(images, adapter, &ForwardOptions::default())?
            .final_logits)
    }

    /// Forward pass keeping every intermediate (SPEC §8).
    pub fn forward_trace(
        &self,
        images: &Tensor,
        adapter: &CharsetAdapter,
        opts: &ForwardOptions,
    ) -> Result<Trace> {
        self.forward_observed(images, adapter, opts, &mut ())
    }

    /// [`Self::forward_trace`], telling `observer` as each stage ends.
    pub fn forward_observed(
        &self,
        images: &Tensor,
        adapter: &CharsetAdapter,
        opts: &ForwardOptions,
        observer: &mut dyn StageObserver,
    ) -> Result<Trace> {
        let images = images.to_dtype(DType::F32)?;
        let memory = self.encode(&images)?;
        observer.stage_done(Stage::Encoder);
        let testing = opts.max_length.is_none();
        let max_len = self.cfg.max_label_length;
        let num_steps = opts.max_length.map_or(max_len, |l| l.min(max_len)) + 1;

        let mut visual = self.visual_decode(&memory, num_steps, testing)?;
        observer.stage_done(Stage::VisualDecode);
        let t = visual.logits.dim(1)?;
        let lengths = (opts.per_sample_stop && testing).then(|| self.own_lengths(&visual.tgt, t));

        // Cross-modal features from the visual prediction, then cross-modal AR decoding (no early stop).
        let text_ar = self.text_encode(&visual.logits, adapter)?;
        observer.stage_done(Stage::TextEncoder);
        let cross_logits = self.cross_decode(&memory, &text_ar.features, &mut visual.tgt, t)?;
        observer.stage_done(Stage::CrossDecode);

        let refined = match lengths.as_deref() {
            Some(lengths) if lengths.iter().any(|&l| l != t) => self.refine_by_length(
                &memory,
                &visual.logits,
                &cross_logits,
                num_steps,
                lengths,
                adapter,
                opts.refine_iters,
                observer,
            )?,
            _ => self.refine(
                &memory,
                &visual.kv,
                &visual.logits,
                &cross_logits,
                num_steps,
                adapter,
                opts.refine_iters,
                observer,
            )?,
        };
        let (refine_vis_logits, captions_refine, text_ids_refine, text_feats_refine, final_logits) =
            match refined {
                Some(r) => (
                    Some(r.vis_logits),
                    r.text.captions,
                    Some(r.text.ids),
                    Some(r.text.features),
                    r.cross_logits,
                ),
                None => (None, Vec::new(), None, None, cross_logits.clone()),
            };
        Ok(Trace {
            memory,
            num_ar_steps: t,
            vis_logits: visual.logits,
            captions_ar: text_ar.captions,
            text_ids_ar: text_ar.ids,
            text_feats_ar: text_ar.features,
            cross_logits,
            refine_vis_logits,
            captions_refine,
            text_ids_refine,
            text_feats_refine,
            final_logits,
        })
    }

    /// The visual decoder over the image tokens: AR decoding of `num_steps` positions, stopping early (batch-wide)
    /// in testing mode.
    fn visual_decode(
        &self,
        memory: &Tensor,
        num_steps: usize,
        testing: bool,
    ) -> Result<VisualPass> {
        let _span = tracing::debug_span!("visual_decode").entered();
        let kv = self.visual_decoder.memory_kv(memory)?;
        let mut tgt = start_rows(&self.tokenizer, memory.dim(0)?, num_steps);
        let logits = decode_ar(
            &self.visual_decoder,
            &self.tokenizer,
            &kv,
            &mut tgt,
            num_steps,
            testing,
            memory.device(),
        )?;
        Ok(VisualPass { kv, logits, tgt })
    }

    /// Each sample's own AR length: the step after its first EOS (what it would run alone).
    fn own_lengths(&self, tgt: &[Vec<u32>], t: usize) -> Vec<usize> {
        tgt.iter()
            .map(|row| {
                row[1..t.min(row.len())]
                    .iter()
                    .position(|&x| x == self.tokenizer.eos_id())
                    .map_or(t, |p| p + 1)
            })
            .collect()
    }

    /// Captions from `logits` (after the charset adapter) through the CLIP text encoder.
    fn text_encode(&self, logits: &Tensor, adapter: &CharsetAdapter) -> Result<TextPass> {
        let captions = self.captions(logits, adapter)?;
        let (ids, features) = self.text_features(&captions, logits.device())?;
        Ok(TextPass {
            captions,
            ids,
            features,
        })
    }

    /// The cross-modal decoder over `[image tokens ; text tokens]`: `t` AR steps, no early stop; `tgt` receives
    /// its predictions.
    fn cross_decode(
        &self,
        memory: &Tensor,
        text_features: &Tensor,
        tgt: &mut [Vec<u32>],
        t: usize,
    ) -> Result<Tensor> {
        let _span = tracing::debug_span!("cross_decode").entered();
        let cross_memory = Tensor::cat(&[memory, text_features], 1)?;
        let kv = self.cross_decoder.memory_kv(&cross_memory)?;
        decode_ar(
            &self.cross_decoder,
            &self.tokenizer,
            &kv,
            tgt,
            t,
            false,
            memory.device(),
        )
    }

    /// `iters` refinement passes with the cloze mask, so both branches see all their other predictions: the
    /// visual decoder refines its logits, their captions are re-encoded, and the cross-modal decoder refines its
    /// own over the new text features. `None` when `iters` is 0.
    #[allow(clippy::too_many_arguments)]
    fn refine(
        &self,
        memory: &Tensor,
        visual_kv: &MemoryKv,
        visual_logits: &Tensor,
        cross_logits: &Tensor,
        num_steps: usize,
        adapter: &CharsetAdapter,
        iters: usize,
        observer: &mut dyn StageObserver,
    ) -> Result<Option<RefinePass>> {
        let mut vis_logits = visual_logits.clone();
        let mut cross_logits = cross_logits.clone();
        let mut last = None;
        for _ in 0..iters {
            let _span = tracing::debug_span!("refine").entered();
            let vis_ref = refine_pass(
                &self.visual_decoder,
                &self.tokenizer,
                visual_kv,
                &vis_logits,
                num_steps,
            )?;
            observer.stage_done(Stage::Refine);
            let text = self.text_encode(&vis_ref, adapter)?;
            observer.stage_done(Stage::TextEncoder);
            let cross_memory = Tensor::cat(&[memory, &text.features], 1)?;
            let cross_kv = self.cross_decoder.memory_kv(&cross_memory)?;
            // A second pass refines the refined logits over the full query length.
            cross_logits = refine_pass(
                &self.cross_decoder,
                &self.tokenizer,
                &cross_kv,
                &cross_logits,
                num_steps,
            )?;
            observer.stage_done(Stage::Refine);
            vis_logits = vis_ref;
            last = Some(RefinePass {
                vis_logits: vis_logits.clone(),
                text,
                cross_logits: cross_logits.clone(),
            });
        }
        Ok(last)
    }
}

impl Clip4Str {
    /// Refinement with each sample's own AR length, as if it had been decoded alone: the batch is split into
    /// groups of equal length, each refined over exactly that many positions. Every row then goes through the
    /// same arithmetic as at batch 1 (padding to the batch's longest and masking gives the same values only up
    /// to summation order), so `per_sample_stop` reproduces batch-1 logits bit for bit on the CPU.
    #[allow(clippy::too_many_arguments)]
    fn refine_by_length(
        &self,
        memory: &Tensor,
        visual_logits: &Tensor,
        cross_logits: &Tensor,
        num_steps: usize,
        lengths: &[usize],
        adapter: &CharsetAdapter,
        iters: usize,
        observer: &mut dyn StageObserver,
    ) -> Result<Option<RefinePass>> {
        let device = memory.device();
        let mut groups: std::collections::BTreeMap<usize, Vec<u32>> = Default::default();
        for (row, &len) in lengths.iter().enumerate() {
            groups.entry(len).or_default().push(row as u32);
        }
        let mut order = Vec::with_capacity(lengths.len());
        let mut parts: Vec<RefinePass> = Vec::with_capacity(groups.len());
        for (len, rows) in groups {
            let index = Tensor::new(rows.as_slice(), device)?;
            let group_memory = memory.index_select(&index, 0)?;
            let group_kv = self.visual_decoder.memory_kv(&group_memory)?;
            let group_logits = visual_logits.index_select(&index, 0)?.narrow(1, 0, len)?;
            let group_cross = cross_logits.index_select(&index, 0)?.narrow(1, 0, len)?;
            let Some(part) = self.refine(
                &group_memory,
                &group_kv,
                &group_logits,
                &group_cross,
                num_steps,
                adapter,
                iters,
                observer,
            )?
            else {
                return Ok(None);
            };
            order.extend(rows);
            parts.push(part);
        }
        // Back to the batch's order: `order[k]` is the row that the k-th concatenated result belongs to.
        let mut inverse = vec![0u32; order.len()];
        for (k, &row) in order.iter().enumerate() {
            inverse[row as usize] = k as u32;
        }
        let inverse_t = Tensor::new(inverse.as_slice(), device)?;
        let gather = |pick: fn(&RefinePass) -> &Tensor| -> Result<Tensor> {
            let pieces: Vec<&Tensor> = parts.iter().map(pick).collect();
            Tensor::cat(&pieces, 0)?.index_select(&inverse_t, 0)
        };
        let captions_sorted: Vec<&String> = parts.iter().flat_map(|p| &p.text.captions).collect();
        Ok(Some(RefinePass {
            vis_logits: gather(|p| &p.vis_logits)?,
            cross_logits: gather(|p| &p.cross_logits)?,
            text: TextPass {
                captions: inverse
                    .iter()
                    .map(|&k| captions_sorted[k as usize].clone())
                    .collect(),
                ids: gather(|p| &p.text.ids)?,
                features: gather(|p| &p.text.features)?,
            },
        }))
    }
}

/// Records every `(name, shape)` the model asks for, handing out zero-cost broadcast zeros.
/// `(name, shape)` pairs in request order.
type ShapeList = Vec<(String, Vec<usize>)>;

struct ShapeRecorder(Arc<std::sync::Mutex<ShapeList>>);

impl candle_nn::var_builder::SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        if let Ok(mut seen) = self.0.lock() {
            seen.push((name.to_string(), s.dims().to_vec()));
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("shape recorder: {name} requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The `(name, shape)` list a constructor asks its `VarBuilder` for, in order: derived by running the real
/// constructor, so it cannot drift from the model code.
pub(crate) fn record_shapes(
    build: impl FnOnce(VarBuilder) -> Result<()>,
) -> Result<Vec<(String, Vec<usize>)>> {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let vb = VarBuilder::from_backend(
        Box::new(ShapeRecorder(seen.clone())),
        DType::F32,
        Device::Cpu,
    );
    build(vb)?;
    let list = seen
        .lock()
        .map_err(|_| candle_core::Error::Msg("shape recorder poisoned".into()))?
        .clone();
    Ok(list)
}

impl Clip4Str {
    /// The state-dict `(name, shape)` list this configuration loads, in construction order.
    pub fn expected_tensors(cfg: &Clip4StrConfig) -> Result<Vec<(String, Vec<usize>)>> {
        record_shapes(|vb| Self::new(cfg, vb).map(|_| ()))
    }
}
