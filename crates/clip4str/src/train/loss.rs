//! The training objective of `VL4STR.training_step` (SPEC §12.1): permutation language modelling on the
//! visual decoder and, on the same permutations, on the cross-modal decoder reading `[image ; caption]`.

use candle_core::{Device, Tensor, D};

use super::perms::generate_attn_masks;
use super::TrainError;
use crate::charset::CharsetAdapter;
use crate::decoder::DecoderMasks;
use crate::decoding::ids_tensor;
use crate::model::Clip4Str;
use crate::str_adapter::StrAdapter;

/// Switches of the training step that the reference exposes as hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LossOptions {
    /// Weight of the cross-modal CE (`cross_loss_w`, 1).
    pub cross_loss_weight: f64,
    /// Dropout on (training); off reproduces the reference with dropout disabled.
    pub dropout: bool,
    /// Stop gradients from the cross-modal branch into the image encoder (`image_detach`, true).
    pub image_detach: bool,
}

impl Default for LossOptions {
    /// The release's settings: cross weight 1, dropout on, image memory detached for the cross branch.
    fn default() -> Self {
        Self {
            cross_loss_weight: 1.0,
            dropout: true,
            image_detach: true,
        }
    }
}

/// What one permutation contributed (everything detached).
#[derive(Debug, Clone)]
pub struct PermLoss {
    /// The permutation (BOS 0 first, EOS last).
    pub perm: Vec<usize>,
    /// Non-padding targets counted for this permutation (the loss weight).
    pub n: usize,
    /// Mean CE of the visual decoder over those targets.
    pub visual_ce: f32,
    /// Mean CE of the cross-modal decoder.
    pub cross_ce: f32,
    /// Visual decoder logits `[B, L+1, C]`.
    pub visual_logits: Tensor,
    /// Cross-modal decoder logits `[B, L+1, C]`.
    pub cross_logits: Tensor,
    /// Captions read from the visual logits (after the test-charset adapter).
    pub captions: Vec<String>,
    /// Their CLIP tokens `[B, context]` (u32).
    pub text_ids: Tensor,
}

/// The loss of one batch and how it was made.
#[derive(Debug, Clone)]
pub struct TrainingLoss {
    /// Scalar loss `Σ n_i (CE_vis_i + w CE_cross_i) / Σ n_i`, attached to the graph: call `backward()`.
    pub loss: Tensor,
    /// Target ids `[B][L+2]`: BOS, characters, EOS, PAD.
    pub tgt: Vec<Vec<u32>>,
    /// Image memory `[B, S, E]`, attached to the graph so auxiliary losses can train the encoder through it.
    pub memory: Tensor,
    /// Per permutation, in order.
    pub perms: Vec<PermLoss>,
}

/// Mean cross-entropy of `logits [B, T, C]` against `targets [B][T]`, ignoring `ignore` (torch's
/// `F.cross_entropy(.., ignore_index)`); returns the loss and the number of counted targets. Zero targets
/// give a zero loss (torch would give NaN).
pub fn cross_entropy(
    logits: &Tensor,
    targets: &[Vec<u32>],
    ignore: u32,
) -> Result<(Tensor, usize), TrainError> {
    let (b, t, c) = logits.dims3()?;
    if targets.len() != b || targets.iter().any(|row| row.len() != t) {
        return Err(candle_core::Error::Msg(format!(
            "cross_entropy: targets are not [{b}, {t}] like the logits"
        ))
        .into());
    }
    let count = targets.iter().flatten().filter(|&&id| id != ignore).count();
    if count == 0 {
        return Ok((Tensor::zeros((), logits.dtype(), logits.device())?, 0));
    }
    // Weights 1/count at each (row, target) pair: the CE is then a single weighted sum, and stays
    // differentiable without gather.
    let mut weights = vec![0f32; b * t * c];
    let scale = 1.0 / count as f32;
    for (row, &id) in targets.iter().flatten().enumerate() {
        if id == ignore {
            continue;
        }
        let id = id as usize;
        if id >= c {
            return Err(candle_core::Error::Msg(format!(
                "cross_entropy: target {id} is not one of the {c} classes"
            ))
            .into());
        }
        weights[row * c + id] = scale;
    }
    let weights =
        Tensor::from_vec(weights, (b * t, c), logits.device())?.to_dtype(logits.dtype())?;
    let flat = logits.reshape((b * t, c))?;
    let shifted = flat.broadcast_sub(&flat.max_keepdim(D::Minus1)?)?;
    let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    let loss = (log_probs * weights)?.sum_all()?.neg()?;
    Ok((loss, count))
}

/// A batch's targets as every family's permutation loss uses them (SPEC §12.1).
struct Targets {
    /// `[B][L+2]`: BOS, characters, EOS, PAD.
    tgt: Vec<Vec<u32>>,
    /// The decoder's context `tgt[:, :-1]`, `[B, L+1]`.
    tgt_in: Tensor,
    /// The targets `tgt[:, 1:]`.
    tgt_out: Vec<Vec<u32>>,
    /// Additive key-padding mask `[B, 1, 1, L+1]`: -inf where the context is PAD or EOS.
    padding: Tensor,
    /// `L + 1`, the number of positions decoded.
    len: usize,
}

impl Targets {
    /// Encodes `labels` and checks that every permutation fits them.
    fn new(
        tok: &crate::charset::CharsetTokenizer,
        labels: &[&str],
        perms: &[Vec<usize>],
        device: &Device,
    ) -> Result<Self, TrainError> {
        let (pad, eos) = (tok.pad_id(), tok.eos_id());
        let tgt = tok.encode_batch(labels)?;
        let width = tgt.first().map(Vec::len).ok_or(TrainError::EmptyBatch)?;
        if perms.is_empty() {
            return Err(TrainError::InvalidPermutation {
                perm: Vec::new(),
                reason: "no permutations given".into(),
            });
        }
        if let Some(p) = perms.iter().find(|p| p.len() != width) {
            return Err(TrainError::InvalidPermutation {
                perm: p.clone(),
                reason: format!("length {}, the targets need {width}", p.len()),
            });
        }
        let (b, l) = (tgt.len(), width - 1);
        let tgt_in_rows: Vec<Vec<u32>> = tgt.iter().map(|r| r[..l].to_vec()).collect();
        let tgt_out = tgt.iter().map(|r| r[1..].to_vec()).collect();
        let padding: Vec<f32> = tgt_in_rows
            .iter()
            .flatten()
            .map(|&id| {
                if id == pad || id == eos {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Self {
            tgt_in: ids_tensor(&tgt_in_rows, device)?,
            padding: Tensor::from_vec(padding, (b, 1, 1, l), device)?,
            tgt,
            tgt_out,
            len: l,
        })
    }

    /// After the first two permutations EOS targets are ignored (SPEC §18.14).
    fn after_perm(&mut self, i: usize, eos: u32, pad: u32) {
        if i == 1 {
            for id in self.tgt_out.iter_mut().flatten() {
                if *id == eos {
                    *id = pad;
                }
            }
        }
    }
}

/// `Σ n_i CE_i / Σ n_i` over the permutations (each weighted by its counted targets), kept in the graph.
#[derive(Default)]
struct PermAverage {
    total: Option<Tensor>,
    count: usize,
}

impl PermAverage {
    fn add(&mut self, ce: &Tensor, n: usize) -> Result<(), TrainError> {
        let term = (ce * n as f64)?;
        self.total = Some(match self.total.take() {
            Some(acc) => (acc + term)?,
            None => term,
        });
        self.count += n;
        Ok(())
    }

    fn finish(self) -> Result<Tensor, TrainError> {
        let total = self.total.ok_or(TrainError::EmptyBatch)?;
        Ok(if self.count > 0 {
            (total / self.count as f64)?
        } else {
            total
        })
    }
}

/// One STRAdapter training step's loss (SPEC §16: the permutation loss of its single decoder).
#[derive(Debug, Clone)]
pub struct AdapterLoss {
    /// Scalar `Σ n_i CE_i / Σ n_i`, attached to the graph (the adapter and the decoder; CLIP is frozen).
    pub loss: Tensor,
    /// Memory after the adapter `[B, S, E]`.
    pub memory: Tensor,
    /// Per permutation: counted targets, mean CE, logits `[B, L+1, C]` (detached).
    pub perms: Vec<(usize, f32, Tensor)>,
}

/// The training loss of an STRAdapter batch for the given permutations; `dropout` on in training.
pub fn str_adapter_loss(
    model: &StrAdapter,
    images: &Tensor,
    labels: &[&str],
    perms: &[Vec<usize>],
    dropout: bool,
) -> Result<AdapterLoss, TrainError> {
    let device = images.device().clone();
    let tok = &model.tokenizer;
    let (pad, eos) = (tok.pad_id(), tok.eos_id());
    let mut targets = Targets::new(tok, labels, perms, &device)?;
    let memory = model.encode(images)?;
    let dtype = memory.dtype();
    let kv = model.decoder.memory_kv(&memory)?;
    let queries = model.decoder.queries(targets.tgt.len(), 0, targets.len)?;
    let padding = targets.padding.to_dtype(dtype)?;
    let mut average = PermAverage::default();
    let mut details = Vec::with_capacity(perms.len());
    for (i, perm) in perms.iter().enumerate() {
        let (content_mask, query_mask) = generate_attn_masks(perm, &device)?;
        let (content_mask, query_mask) =
            (content_mask.to_dtype(dtype)?, query_mask.to_dtype(dtype)?);
        let masks = DecoderMasks {
            query: Some(&query_mask),
            content: Some(&content_mask),
            padding: Some(&padding),
        };
        let logits = model
            .decoder
            .forward(&targets.tgt_in, &kv, &queries, &masks, dropout)?;
        let (ce, n) = cross_entropy(&logits, &targets.tgt_out, pad)?;
        average.add(&ce, n)?;
        let ce_value = ce.to_dtype(candle_core::DType::F32)?.to_scalar()?;
        details.push((n, ce_value, logits.detach()));
        targets.after_perm(i, eos, pad);
    }
    let loss = average.finish()?;
    Ok(AdapterLoss {
        loss,
        memory,
        perms: details,
    })
}

/// The training loss of one batch (SPEC §12.1) for the given permutations.
///
/// `labels` must only hold training-charset characters (filtered like the data pipeline does); every
/// permutation must have length `longest label + 2` (see [`super::gen_tgt_perms`]). The visual CE trains
/// the image encoder and the visual decoder; the cross-modal branch reads captions decoded from this
/// permutation's visual logits with the ground-truth context, and trains the cross decoder and the
/// unfrozen text layers. After the first two permutations EOS targets are ignored (SPEC §18.14).
pub fn training_loss(
    model: &Clip4Str,
    images: &Tensor,
    labels: &[&str],
    perms: &[Vec<usize>],
    opts: &LossOptions,
) -> Result<TrainingLoss, TrainError> {
    let device = images.device().clone();
    let tok = &model.tokenizer;
    let (pad, eos) = (tok.pad_id(), tok.eos_id());
    let mut targets = Targets::new(tok, labels, perms, &device)?;
    let (b, l) = (targets.tgt.len(), targets.len);

    let memory = model.encode(images)?; // [B, S, E]
    let dtype = memory.dtype();
    let vis_kv = model.visual_decoder.memory_kv(&memory)?;
    let image_for_cross = if opts.image_detach {
        memory.detach()
    } else {
        memory.clone()
    };
    let padding = targets.padding.to_dtype(dtype)?;
    let vis_queries = model.visual_decoder.queries(b, 0, l)?;
    let cross_queries = model.cross_decoder.queries(b, 0, l)?;
    let adapter = CharsetAdapter::new(&model.config().charset_test);

    let mut average = PermAverage::default();
    let mut details = Vec::with_capacity(perms.len());
    for (i, perm) in perms.iter().enumerate() {
        let _span = tracing::debug_span!("train_perm", i).entered();
        let (content_mask, query_mask) = generate_attn_masks(perm, &device)?;
        let (content_mask, query_mask) =
            (content_mask.to_dtype(dtype)?, query_mask.to_dtype(dtype)?);
        let masks = DecoderMasks {
            query: Some(&query_mask),
            content: Some(&content_mask),
            padding: Some(&padding),
        };
        let visual_logits = model.visual_decoder.forward(
            &targets.tgt_in,
            &vis_kv,
            &vis_queries,
            &masks,
            opts.dropout,
        )?;
        let (visual_ce, n) = cross_entropy(&visual_logits, &targets.tgt_out, pad)?;

        // Cross-modal branch: captions of this permutation's visual prediction, ground-truth context.
        let visual_detached = visual_logits.detach();
        let captions = model.captions(&visual_detached, &adapter)?;
        let (text_ids, text_feats) = model.text_features(&captions, &device)?;
        let cross_memory = Tensor::cat(&[&image_for_cross, &text_feats], 1)?;
        let cross_kv = model.cross_decoder.memory_kv(&cross_memory)?;
        let cross_logits = model.cross_decoder.forward(
            &targets.tgt_in,
            &cross_kv,
            &cross_queries,
            &masks,
            opts.dropout,
        )?;
        let (cross_ce, _) = cross_entropy(&cross_logits, &targets.tgt_out, pad)?;

        average.add(&(&visual_ce + (&cross_ce * opts.cross_loss_weight)?)?, n)?;
        details.push(PermLoss {
            perm: perm.clone(),
            n,
            visual_ce: visual_ce.to_dtype(candle_core::DType::F32)?.to_scalar()?,
            cross_ce: cross_ce.to_dtype(candle_core::DType::F32)?.to_scalar()?,
            visual_logits: visual_detached,
            cross_logits: cross_logits.detach(),
            captions,
            text_ids,
        });
        targets.after_perm(i, eos, pad);
    }
    let loss = average.finish()?;
    Ok(TrainingLoss {
        loss,
        tgt: targets.tgt,
        memory,
        perms: details,
    })
}
