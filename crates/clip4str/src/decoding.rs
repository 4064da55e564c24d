//! The decoding loops every family shares (SPEC §8.2): greedy AR decoding through a PARSeq two-stream
//! decoder, one query per step, and the cloze refinement pass. CLIP4STR runs them for both of its decoders;
//! STRAdapter for its one.

use candle_core::{Device, Result, Tensor, D};

use crate::charset::{CharsetTokenizer, Decoded};
use crate::decoder::{ContentCache, Decoder, DecoderMasks, MemoryKv};
use crate::nn::causal_mask;

/// Per-row argmax of `[B, T, C]` logits as host ids `[B][T]`.
pub(crate) fn argmax_ids(logits: &Tensor) -> Result<Vec<Vec<u32>>> {
    logits.argmax(D::Minus1)?.to_vec2::<u32>()
}

/// Additive cloze mask `[rows, cols]`: query r sees every content position except r+1 (its own token).
fn cloze_mask(rows: usize, cols: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..rows)
        .flat_map(|r| (0..cols).map(move |c| if c == r + 1 { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (rows, cols), device)
}

/// Additive padding mask `[B, 1, 1, L]`: -inf at and after the first EOS of each row.
fn padding_mask(tgt: &[Vec<u32>], eos: u32, device: &Device) -> Result<Tensor> {
    let b = tgt.len();
    let l = tgt.first().map_or(0, Vec::len);
    let mut data = Vec::with_capacity(b * l);
    for row in tgt {
        let mut seen = false;
        for &t in row {
            seen |= t == eos;
            data.push(if seen { f32::NEG_INFINITY } else { 0.0 });
        }
    }
    Tensor::from_vec(data, (b, 1, 1, l), device)
}

pub(crate) fn ids_tensor(rows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let b = rows.len();
    let l = rows.first().map_or(0, Vec::len);
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (b, l), device)
}

/// `[BOS] + ids[..T-1]` per row.
fn shift_with_bos(ids: &[Vec<u32>], bos: u32, t: usize) -> Vec<Vec<u32>> {
    ids.iter()
        .map(|row| {
            std::iter::once(bos)
                .chain(row.iter().copied().take(t.saturating_sub(1)))
                .collect()
        })
        .collect()
}

/// The AR context before decoding: `num_steps` ids per row, BOS then PAD.
pub fn start_rows(tokenizer: &CharsetTokenizer, batch: usize, num_steps: usize) -> Vec<Vec<u32>> {
    let mut row = vec![tokenizer.pad_id(); num_steps];
    if let Some(first) = row.first_mut() {
        *first = tokenizer.bos_id();
    }
    vec![row; batch]
}

/// Greedy AR decoding with one query per step; returns the logits `[B, T, C]` and the context ids.
///
/// With `early_stop`, stops once every sample has produced an EOS (batch-wide, like the reference).
pub fn decode_ar(
    decoder: &Decoder,
    tokenizer: &CharsetTokenizer,
    memory: &MemoryKv,
    tgt: &mut [Vec<u32>],
    steps: usize,
    early_stop: bool,
    device: &Device,
) -> Result<Tensor> {
    let b = tgt.len();
    let eos = tokenizer.eos_id();
    let mut logits = Vec::with_capacity(steps);
    let mut cache = ContentCache::default();
    for i in 0..steps {
        let j = i + 1;
        let query = decoder.queries(b, i, 1)?;
        let p_i = if decoder.supports_incremental() {
            // Only the new content position is embedded and projected; earlier ones are cached.
            let column: Vec<Vec<u32>> = tgt.iter().map(|r| vec![r[i]]).collect();
            decoder.extend_content(&mut cache, &ids_tensor(&column, device)?, i)?;
            decoder.step(&cache, memory, &query)?
        } else {
            let prefix: Vec<Vec<u32>> = tgt.iter().map(|r| r[..j].to_vec()).collect();
            let content_mask = causal_mask(j, device)?;
            let masks = DecoderMasks {
                query: None, // row i of the causal mask over j columns is all zeros
                content: Some(&content_mask),
                padding: None,
            };
            decoder.forward(&ids_tensor(&prefix, device)?, memory, &query, &masks, false)?
        };
        if j < steps {
            let next = p_i.squeeze(1)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
            for (row, id) in tgt.iter_mut().zip(next) {
                row[j] = id;
            }
            if early_stop && tgt.iter().all(|r| r[..=j].contains(&eos)) {
                logits.push(p_i);
                break;
            }
        }
        logits.push(p_i);
    }
    Tensor::cat(&logits, 1)
}

/// One refinement pass: context `[BOS, argmax(prev[:, :-1])]`, every query, cloze mask, padding after EOS.
pub fn refine_pass(
    decoder: &Decoder,
    tokenizer: &CharsetTokenizer,
    memory: &MemoryKv,
    prev_logits: &Tensor,
    num_steps: usize,
) -> Result<Tensor> {
    let device = prev_logits.device();
    let (b, t, _) = prev_logits.dims3()?;
    let query_mask = cloze_mask(num_steps, t, device)?;
    let content_mask = cloze_mask(t, t, device)?;
    let tgt = shift_with_bos(&argmax_ids(prev_logits)?, tokenizer.bos_id(), t);
    let pad_mask = padding_mask(&tgt, tokenizer.eos_id(), device)?;
    let masks = DecoderMasks {
        query: Some(&query_mask),
        content: Some(&content_mask),
        padding: Some(&pad_mask),
    };
    decoder.forward(
        &ids_tensor(&tgt, device)?,
        memory,
        &decoder.queries(b, 0, num_steps)?,
        &masks,
        false,
    )
}

/// `tokenizer.decode` of every row of logits `[B, T, C]` (softmax over the classes first): the raw text, the
/// kept probabilities, whether an EOS ended it.
pub fn decode_logits(tokenizer: &CharsetTokenizer, logits: &Tensor) -> Result<Vec<Decoded>> {
    let probs = candle_nn::ops::softmax_last_dim(&logits.to_dtype(candle_core::DType::F32)?)?;
    let (_, _, c) = probs.dims3()?;
    Ok(probs
        .to_vec3::<f32>()?
        .iter()
        .map(|sample| {
            let flat: Vec<f32> = sample.iter().flatten().copied().collect();
            tokenizer.decode(&flat, c)
        })
        .collect())
}
