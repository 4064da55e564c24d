//! PARSeq's two-stream decoder: used twice, as the visual decoder and as the cross-modal decoder.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::DecoderConfig;
use crate::nn::{dropout, KeyValue, LayerNorm, Linear, Mode, MultiheadAttention};

/// One pre-LN two-stream layer (XLNet style): a query stream and a content stream sharing weights.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    self_attn: MultiheadAttention,
    cross_attn: MultiheadAttention,
    linear1: Linear,
    linear2: Linear,
    norm1: LayerNorm,
    norm2: LayerNorm,
    norm_q: LayerNorm,
    norm_c: LayerNorm,
    dropout: f32,
}

/// Masks for one decoder call; all additive (0 / -inf).
#[derive(Debug, Clone, Default)]
pub struct DecoderMasks<'a> {
    /// `[Q, L]`: which content positions each query sees.
    pub query: Option<&'a Tensor>,
    /// `[L, L]`: content self-attention (only used when the content stream is updated, depth > 1).
    pub content: Option<&'a Tensor>,
    /// `[B, 1, 1, L]`: padded content positions.
    pub padding: Option<&'a Tensor>,
}

fn combine(mask: Option<&Tensor>, padding: Option<&Tensor>) -> Result<Option<Tensor>> {
    Ok(match (mask, padding) {
        (Some(m), Some(p)) => Some(m.broadcast_add(p)?),
        (Some(m), None) => Some(m.clone()),
        (None, Some(p)) => Some(p.clone()),
        (None, None) => None,
    })
}

impl DecoderLayer {
    /// Loads `self_attn`, `cross_attn`, `linear1/2`, `norm1/2`, `norm_q`, `norm_c`.
    pub fn new(cfg: &DecoderConfig, dropout: f32, vb: VarBuilder) -> Result<Self> {
        let d = cfg.dim;
        Ok(Self {
            self_attn: MultiheadAttention::new(d, cfg.heads, dropout, vb.pp("self_attn"))?,
            cross_attn: MultiheadAttention::new(d, cfg.heads, dropout, vb.pp("cross_attn"))?,
            linear1: Linear::new(d, cfg.mlp_hidden, vb.pp("linear1"))?,
            linear2: Linear::new(cfg.mlp_hidden, d, vb.pp("linear2"))?,
            norm1: LayerNorm::new(d, vb.pp("norm1"))?,
            norm2: LayerNorm::new(d, vb.pp("norm2"))?,
            norm_q: LayerNorm::new(d, vb.pp("norm_q"))?,
            norm_c: LayerNorm::new(d, vb.pp("norm_c"))?,
            dropout,
        })
    }

    /// Computes in `mode` from now on.
    pub fn set_mode(&mut self, mode: Mode) {
        self.self_attn.set_mode(mode);
        self.cross_attn.set_mode(mode);
        for linear in [&mut self.linear1, &mut self.linear2] {
            linear.set_mode(mode);
        }
        for norm in [
            &mut self.norm1,
            &mut self.norm2,
            &mut self.norm_q,
            &mut self.norm_c,
        ] {
            norm.set_mode(mode);
        }
    }

    /// Projects the image (or cross-modal) memory into this layer's cross-attention keys/values.
    pub fn memory_kv(&self, memory: &Tensor) -> Result<KeyValue> {
        self.cross_attn.key_value(memory)
    }

    /// One stream: self-attention over the content, cross-attention to the memory, MLP.
    fn stream(
        &self,
        tgt: &Tensor,
        tgt_norm: &Tensor,
        content_kv: &KeyValue,
        memory: &KeyValue,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let p = self.dropout;
        let sa = self
            .self_attn
            .forward_kv(tgt_norm, content_kv, mask, train)?;
        let tgt = (tgt + dropout(&sa, p, train)?)?;
        let ca = self
            .cross_attn
            .forward_kv(&self.norm1.forward(&tgt)?, memory, None, train)?;
        let tgt = (&tgt + dropout(&ca, p, train)?)?;
        let hidden = dropout(
            &self
                .linear1
                .forward(&self.norm2.forward(&tgt)?)?
                .gelu_erf()?,
            p,
            train,
        )?;
        let mlp = self.linear2.forward(&hidden)?;
        tgt + dropout(&mlp, p, train)?
    }

    /// Self-attention keys/values of content positions: `self_attn` projections of `norm_c(content)`.
    ///
    /// A content position depends only on its own token, so decoding can project each new position once.
    pub fn content_kv(&self, content: &Tensor) -> Result<KeyValue> {
        self.self_attn.key_value(&self.norm_c.forward(content)?)
    }

    /// The query stream alone over already projected content keys/values (what depth-1 decoding needs).
    pub fn query_stream(
        &self,
        query: &Tensor,
        content_kv: &KeyValue,
        memory: &KeyValue,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let query_norm = self.norm_q.forward(query)?;
        self.stream(query, &query_norm, content_kv, memory, mask, train)
    }

    /// Returns the updated `(query, content)`; both streams attend to `norm_c(content)`.
    pub fn forward(
        &self,
        query: &Tensor,
        content: &Tensor,
        memory: &KeyValue,
        masks: &DecoderMasks,
        update_content: bool,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let query_norm = self.norm_q.forward(query)?;
        let content_norm = self.norm_c.forward(content)?;
        let content_kv = self.self_attn.key_value(&content_norm)?;
        let query_mask = combine(masks.query, masks.padding)?;
        let new_query = self.stream(
            query,
            &query_norm,
            &content_kv,
            memory,
            query_mask.as_ref(),
            train,
        )?;
        let new_content = if update_content {
            let content_mask = combine(masks.content, masks.padding)?;
            self.stream(
                content,
                &content_norm,
                &content_kv,
                memory,
                content_mask.as_ref(),
                train,
            )?
        } else {
            content.clone()
        };
        Ok((new_query, new_content))
    }
}

/// Content-stream keys/values of the positions decoded so far (depth-1 incremental decoding).
#[derive(Debug, Clone, Default)]
pub struct ContentCache {
    kv: Option<KeyValue>,
}

/// Memory keys/values of every layer, computed once per forward and reused by every decoding step.
#[derive(Debug, Clone)]
pub struct MemoryKv {
    layers: Vec<KeyValue>,
}

/// `Decoder` with its token embedding, position queries, final norm and classification head.
#[derive(Debug, Clone)]
pub struct Decoder {
    layers: Vec<DecoderLayer>,
    text_embed: Tensor,
    /// Position queries `[1, max_label_length + 1, D]`.
    pub pos_queries: Tensor,
    norm: LayerNorm,
    head: Linear,
    dim: usize,
    dropout: f32,
}

impl Decoder {
    /// Loads `layers.N`, `text_embed.embedding.weight [charset_size, D]`, `pos_queries`, `norm`, `head`.
    pub fn new(
        cfg: &DecoderConfig,
        num_classes: usize,
        charset_size: usize,
        num_queries: usize,
        dropout: f32,
        vb: VarBuilder,
    ) -> Result<Self> {
        Self::split(
            cfg,
            (num_classes, charset_size, num_queries),
            dropout,
            vb.clone(),
            vb,
        )
    }

    /// Loads `layers.N` and `norm` from `stack`, and `text_embed`, `pos_queries`, `head` from `system`: the
    /// layout of STRAdapter and PARSeq, whose decoder module is a bare stack and whose system holds the rest.
    /// `sizes` are (classes, charset size, position queries).
    pub fn split(
        cfg: &DecoderConfig,
        (num_classes, charset_size, num_queries): (usize, usize, usize),
        dropout: f32,
        stack: VarBuilder,
        system: VarBuilder,
    ) -> Result<Self> {
        let layers = (0..cfg.depth)
            .map(|i| DecoderLayer::new(cfg, dropout, stack.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            text_embed: system.get((charset_size, cfg.dim), "text_embed.embedding.weight")?,
            pos_queries: system.get((1, num_queries, cfg.dim), "pos_queries")?,
            norm: LayerNorm::new(cfg.dim, stack.pp("norm"))?,
            head: Linear::new(cfg.dim, num_classes, system.pp("head"))?,
            dim: cfg.dim,
            dropout,
        })
    }

    /// Computes in `mode` from now on.
    pub fn set_mode(&mut self, mode: Mode) {
        self.layers.iter_mut().for_each(|l| l.set_mode(mode));
        self.norm.set_mode(mode);
        self.head.set_mode(mode);
    }

    /// Projects `memory [B, S, D]` for every layer's cross-attention.
    pub fn memory_kv(&self, memory: &Tensor) -> Result<MemoryKv> {
        let layers = self
            .layers
            .iter()
            .map(|l| l.memory_kv(memory))
            .collect::<Result<Vec<_>>>()?;
        Ok(MemoryKv { layers })
    }

    /// `sqrt(D) * embedding(tokens)`.
    fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, l) = tokens.dims2()?;
        let e = self
            .text_embed
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, l, self.dim))?;
        e * (self.dim as f64).sqrt()
    }

    /// Content stream input: BOS embedding without position, then `pos_queries[j-1] + embed(tgt[j])`.
    fn content(&self, tgt: &Tensor) -> Result<Tensor> {
        let (_, l) = tgt.dims2()?;
        let null_ctx = self.embed(&tgt.narrow(1, 0, 1)?)?;
        if l == 1 {
            return Ok(null_ctx);
        }
        let tgt_emb = self
            .embed(&tgt.narrow(1, 1, l - 1)?)?
            .broadcast_add(&self.pos_queries.narrow(1, 0, l - 1)?)?;
        Tensor::cat(&[&null_ctx, &tgt_emb], 1)
    }

    /// `tgt [B, L]` (u32 token ids starting with BOS), `query [B, Q, D]` -> logits `[B, Q, num_classes]`.
    pub fn forward(
        &self,
        tgt: &Tensor,
        memory: &MemoryKv,
        query: &Tensor,
        masks: &DecoderMasks,
        train: bool,
    ) -> Result<Tensor> {
        let mut content = dropout(&self.content(tgt)?, self.dropout, train)?;
        let mut query = dropout(query, self.dropout, train)?;
        let last = self.layers.len().saturating_sub(1);
        for (i, (layer, kv)) in self.layers.iter().zip(&memory.layers).enumerate() {
            let (q, c) = layer.forward(&query, &content, kv, masks, i != last, train)?;
            query = q;
            content = c;
        }
        self.head.forward(&self.norm.forward(&query)?)
    }

    /// True when greedy decoding can reuse per-position content keys/values (one layer, as released).
    pub fn supports_incremental(&self) -> bool {
        self.layers.len() == 1
    }

    /// Appends content position `pos` (token ids `[B, 1]`) to `cache`: its embedding is projected once.
    pub fn extend_content(
        &self,
        cache: &mut ContentCache,
        tokens: &Tensor,
        pos: usize,
    ) -> Result<()> {
        let emb = self.embed(tokens)?;
        let emb = if pos == 0 {
            emb
        } else {
            emb.broadcast_add(&self.pos_queries.narrow(1, pos - 1, 1)?)?
        };
        let kv = self.layers[0].content_kv(&emb)?;
        cache.kv = Some(match cache.kv.take() {
            None => kv,
            Some(prev) => prev.append(&kv)?,
        });
        Ok(())
    }

    /// One decoding step of a depth-1 decoder: `query [B, 1, D]` over the cached content -> logits `[B, 1, C]`.
    pub fn step(&self, cache: &ContentCache, memory: &MemoryKv, query: &Tensor) -> Result<Tensor> {
        let kv = cache
            .kv
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("decoding step before any content".into()))?;
        let q = self.layers[0].query_stream(query, kv, &memory.layers[0], None, false)?;
        self.head.forward(&self.norm.forward(&q)?)
    }

    /// Position queries `[B, n, D]` starting at `start`.
    pub fn queries(&self, batch: usize, start: usize, n: usize) -> Result<Tensor> {
        self.pos_queries
            .narrow(1, start, n)?
            .broadcast_as((batch, n, self.dim))?
            .contiguous()
    }
}
