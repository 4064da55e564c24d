//! Building blocks shared by the CLIP encoders and the PARSeq decoders.
//!
//! Everything here is written with differentiable candle ops: candle's fused layer norm and
//! `softmax_last_dim` drop gradients silently, and the same modules serve training. Inference (inputs that
//! track no gradient) takes the kernels of [`fused`] instead, which refuse anything that does.

mod attention_grad;
pub(crate) mod fused;
pub(crate) mod fused_grad;
pub(crate) mod packed;
mod packed_grad;
mod rows;

/// Arithmetic of the linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 everywhere: the parity-tested path.
    #[default]
    F32,
    /// Linear layers with bf16 weights and activations, f32 accumulation (like `torch.autocast(bfloat16)`);
    /// fast on CPUs with AVX512-BF16 ([`bf16_native_supported`]), emulated elsewhere.
    Bf16,
}

/// How the layers compute. Each module carries its own copy (set by `set_mode` when a model is built or
/// re-moded), never a process-wide or per-thread flag: rayon workers and two models in one process each
/// compute as they were asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Arithmetic of the linear layers.
    pub precision: Precision,
    /// clip4str's fused CPU kernels (softmax, layer norm, QuickGELU, packed f32 linear layers, and their
    /// backward passes in training); `false` runs the plain candle composites, e.g. to measure the kernels.
    pub fused: bool,
}

impl Default for Mode {
    fn default() -> Self {
        Self {
            precision: Precision::F32,
            fused: true,
        }
    }
}

impl Mode {
    /// `x * sigmoid(1.702 x)`, the activation of every CLIP block (SPEC §18.3).
    pub fn quick_gelu(self, x: &Tensor) -> Result<Tensor> {
        if self.fused {
            if let Some(y) = fused::quick_gelu(x)? {
                return Ok(y);
            }
            if let Some(y) = fused::quick_gelu_trainable(x)? {
                return Ok(y);
            }
        }
        quick_gelu_composite(x)
    }

    /// Numerically stable softmax over the last dimension.
    pub fn softmax(self, x: &Tensor) -> Result<Tensor> {
        if self.fused {
            if let Some(y) = fused::softmax_last_dim(x, 1.0, None)? {
                return Ok(y);
            }
            if let Some(y) = fused::softmax_last_dim_trainable(x, 1.0, None)? {
                return Ok(y);
            }
        }
        softmax_composite(x)
    }

    /// Attention weights `softmax(scores * scale + mask)` over the last dimension; `mask` is additive
    /// (0 / -inf) and broadcastable to `scores [B, H, L, S]`.
    pub fn attention_softmax(
        self,
        scores: &Tensor,
        scale: f64,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.fused {
            if let Some(y) = fused::softmax_last_dim(scores, scale as f32, mask)? {
                return Ok(y);
            }
            if let Some(y) = fused::softmax_last_dim_trainable(scores, scale as f32, mask)? {
                return Ok(y);
            }
        }
        attention_softmax_composite(scores, scale, mask)
    }
}

/// Whether this CPU computes bf16 linear layers natively (AVX512-BF16); elsewhere [`Precision::Bf16`] is
/// emulated and slower than f32.
pub fn bf16_native_supported() -> bool {
    packed::native_supported()
}

/// Whether clip4str's kernels may use this CPU's AVX-512 (`CLIP4STR_NO_AVX512=1` turns it off, to measure
/// what a CPU with AVX2 alone gets).
pub fn avx512_allowed() -> bool {
    rows::avx512_allowed()
}

/// Whether this CPU runs the pre-packed f32 linear kernel (AVX-512F, or AVX2 with FMA); elsewhere linear
/// layers use candle's matmul.
pub fn packed_f32_supported() -> bool {
    packed::f32_supported()
}

/// The instruction set of the packed f32 kernel this CPU runs (`"AVX-512"`, `"AVX2"`), if any.
pub fn packed_f32_kernel() -> Option<&'static str> {
    packed::f32_kernel().map(packed::F32Kernel::name)
}

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// Layer normalisation over the last dimension, biased variance, computed in f32 like CLIP's `LayerNorm`
/// (f64 inputs stay f64, so gradients can be checked against finite differences).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    mode: Mode,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of width `dim`; eps is PyTorch's default 1e-5.
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self::from_weights(
            vb.get(dim, "weight")?,
            vb.get(dim, "bias")?,
        ))
    }

    /// Wraps tensors already loaded (eps 1e-5).
    pub fn from_weights(weight: Tensor, bias: Tensor) -> Self {
        Self {
            weight,
            bias,
            eps: 1e-5,
            mode: Mode::default(),
        }
    }

    /// Computes in `mode` from now on.
    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }

    /// The differentiable composite, used whenever the fused kernel declines (training, f64, ...).
    pub fn forward_composite(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let compute = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let x = x.to_dtype(compute)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight.to_dtype(compute)?)?
            .broadcast_add(&self.bias.to_dtype(compute)?)?
            .to_dtype(dtype)
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.mode.fused {
            if let Some(y) = fused::layer_norm(x, &self.weight, &self.bias, self.eps)? {
                return Ok(y);
            }
            if let Some(y) = fused::layer_norm_trainable(x, &self.weight, &self.bias, self.eps)? {
                return Ok(y);
            }
        }
        self.forward_composite(x)
    }
}

/// A linear layer `x W^T + b` that accepts inputs of any rank.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, until inference packs it into f32 panels: the panels hold the same numbers, and keeping
    /// both doubled the memory of every linear layer (B/16: +0.5 GB). Shared by clones, like the packed forms.
    weight: Arc<Mutex<Option<Tensor>>>,
    bias: Option<Tensor>,
    /// The weight packed for [`Precision::Bf16`], made on first use and shared by clones; `None` when it
    /// cannot be (trainable weights, whose values change).
    packed: Arc<OnceLock<Option<packed::PackedLinear>>>,
    /// The weight in f32 panels for inference, likewise (`None` also on CPUs without AVX2 or AVX-512).
    packed_f32: Arc<OnceLock<Option<packed::PackedLinearF32>>>,
    mode: Mode,
}

impl Linear {
    /// Loads `weight [out, in]` and `bias [out]`.
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self::from_weights(
            vb.get((out_dim, in_dim), "weight")?,
            Some(vb.get(out_dim, "bias")?),
        ))
    }

    /// Wraps tensors already loaded (e.g. a slice of a fused projection).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Arc::new(Mutex::new(Some(weight))),
            bias,
            packed: Arc::new(OnceLock::new()),
            packed_f32: Arc::new(OnceLock::new()),
            mode: Mode::default(),
        }
    }

    /// Computes in `mode` from now on (clones made before keep theirs; the packed forms stay shared).
    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }

    /// The weight `[out, in]`: the loaded tensor, or rebuilt from the f32 panels once those replaced it
    /// (the paths that still need it then, bf16 packing and the plain-op fallback, are not the fast path).
    fn weight(&self) -> Result<Tensor> {
        if let Some(w) = self.lock_weight().as_ref() {
            return Ok(w.clone());
        }
        // The weight goes only when packing succeeds; another thread may still be storing the panels.
        match self.packed_f32.wait() {
            Some(p) => p.unpack(),
            None => candle_core::bail!("linear layer lost its weight without packing it"),
        }
    }

    fn lock_weight(&self) -> std::sync::MutexGuard<'_, Option<Tensor>> {
        // A panic while holding the lock cannot leave the Option half-written.
        self.weight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn packed_f32(&self) -> Option<&packed::PackedLinearF32> {
        self.packed_f32
            .get_or_init(|| {
                let mut weight = self.lock_weight();
                let w = weight.as_ref()?;
                if w.track_op() || !w.device().is_cpu() || w.dtype() != DType::F32 {
                    return None;
                }
                let packed = packed::PackedLinearF32::new(w, self.bias.as_ref())
                    .ok()
                    .flatten()?;
                *weight = None;
                Some(packed)
            })
            .as_ref()
    }

    fn packed(&self) -> Option<&packed::PackedLinear> {
        self.packed
            .get_or_init(|| {
                let w = self.weight().ok()?;
                if w.track_op() || !w.device().is_cpu() {
                    return None;
                }
                packed::PackedLinear::new(&w, self.bias.as_ref()).ok()
            })
            .as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.mode.precision == Precision::Bf16 {
            if let Some(y) = self.packed().map(|p| p.forward(x)).transpose()?.flatten() {
                return Ok(y);
            }
        } else if self.mode.fused && x.dtype() == DType::F32 && !x.track_op() {
            if let Some(y) = self
                .packed_f32()
                .map(|p| p.forward(x))
                .transpose()?
                .flatten()
            {
                return Ok(y);
            }
        }
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let weight = self.weight()?;
        // Training: the layer as one graph node, its products in bf16 when asked for (and native).
        if let Some(b) = self
            .bias
            .as_ref()
            .filter(|_| x.track_op() || weight.track_op())
        {
            if self.mode.precision == Precision::Bf16 {
                if let Some(y) = packed_grad::linear(x, &weight, b)? {
                    return Ok(y);
                }
            }
            if self.mode.fused && fused_grad::trainable(&[x, &weight, b]) {
                return fused_grad::linear(x, &weight, b);
            }
        }
        let y = x.reshape((rows, in_dim))?.matmul(&weight.t()?)?;
        let y = match &self.bias {
            Some(b)
                if self.mode.fused
                    && (y.track_op() || b.track_op())
                    && fused_grad::trainable(&[&y, b]) =>
            {
                fused_grad::add_bias(&y, b)?
            }
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = weight.dim(0)?;
        y.reshape(out_dims)
    }
}

/// [`Mode::quick_gelu`] in the default mode (fused kernels on).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Mode::default().quick_gelu(x)
}

/// [`quick_gelu`] from differentiable ops.
pub fn quick_gelu_composite(x: &Tensor) -> Result<Tensor> {
    let gate = ((x * -1.702)?.exp()? + 1.0)?.recip()?;
    x * gate
}

/// [`Mode::softmax`] in the default mode (fused kernels on).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    Mode::default().softmax(x)
}

/// [`softmax`] from differentiable ops.
pub fn softmax_composite(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// [`Mode::attention_softmax`] in the default mode (fused kernels on).
pub fn attention_softmax(scores: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    Mode::default().attention_softmax(scores, scale, mask)
}

/// [`attention_softmax`] from differentiable ops.
pub fn attention_softmax_composite(
    scores: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let scores = (scores * scale)?;
    match mask {
        Some(mask) => softmax_composite(&scores.broadcast_add(mask)?),
        None => softmax_composite(&scores),
    }
}

/// Inverted dropout, identity when `p == 0` or outside training. Inside a [`DropoutStream`] the masks come
/// from that seeded stream (a resumed run redraws exactly the masks of an uninterrupted one); elsewhere from
/// candle's thread RNG.
pub fn dropout(x: &Tensor, p: f32, train: bool) -> Result<Tensor> {
    if !(train && p > 0.0) {
        return Ok(x.clone());
    }
    x * dropout_mask(x.shape(), p, x.device())?.to_dtype(x.dtype())?
}

/// The scaled keep-mask of [`dropout`] (`0` or `1 / (1 - p)`, f32) on `device`: from the installed
/// [`DropoutStream`] if any, else from candle's RNG.
fn dropout_mask(
    shape: impl Into<candle_core::Shape>,
    p: f32,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let shape = shape.into();
    #[cfg(feature = "train")]
    if let Some(mask) = stream::mask(&shape, p, device)? {
        return Ok(mask);
    }
    let keep = Tensor::rand(0f32, 1f32, &shape, device)?
        .ge(p as f64)?
        .to_dtype(DType::F32)?;
    keep.affine(1.0 / (1.0 - p as f64), 0.0)
}

#[cfg(feature = "train")]
pub use stream::DropoutStream;

#[cfg(feature = "train")]
mod stream {
    use std::cell::RefCell;

    use candle_core::{Result, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    thread_local! {
        static STREAM: RefCell<Option<ChaCha8Rng>> = const { RefCell::new(None) };
    }

    /// Makes the dropout masks drawn on this thread, until the guard is dropped, a function of `key` alone
    /// (the trainer keys it by seed and step). The forward pass draws its masks in a fixed order, so the same
    /// key gives the same masks.
    #[must_use = "the stream is uninstalled when the guard is dropped"]
    pub struct DropoutStream {
        previous: Option<ChaCha8Rng>,
    }

    impl DropoutStream {
        /// Installs the stream for `key`.
        pub fn install(key: u64) -> Self {
            let previous = STREAM.with(|s| s.replace(Some(ChaCha8Rng::seed_from_u64(key))));
            Self { previous }
        }
    }

    impl Drop for DropoutStream {
        fn drop(&mut self) {
            let previous = self.previous.take();
            STREAM.with(|s| *s.borrow_mut() = previous);
        }
    }

    /// The scaled keep-mask (`0` or `1 / (1 - p)`) of `shape`, when a stream is installed.
    pub(super) fn mask(
        shape: &candle_core::Shape,
        p: f32,
        device: &candle_core::Device,
    ) -> Result<Option<Tensor>> {
        STREAM.with(|s| {
            let mut s = s.borrow_mut();
            let Some(rng) = s.as_mut() else {
                return Ok(None);
            };
            let keep = 1.0 / (1.0 - p);
            let values: Vec<f32> = (0..shape.elem_count())
                .map(|_| if rng.random::<f32>() >= p { keep } else { 0.0 })
                .collect();
            Tensor::from_vec(values, shape, device).map(Some)
        })
    }
}

/// `torch.nn.MultiheadAttention` with a fused `in_proj` (q, k, v rows stacked), batch first.
#[derive(Debug, Clone)]
pub struct MultiheadAttention {
    q_proj: Linear,
    kv_proj: Linear,
    out_proj: Linear,
    heads: usize,
    /// Width of the queries, keys and values (the stream's width except in pruned blocks).
    dim: usize,
    dropout: f32,
    mode: Mode,
}

/// Keys and values of one attention, projected once (a memory read by every decoding step or permutation).
#[derive(Debug, Clone)]
pub struct KeyValue(Kv);

impl KeyValue {
    /// These positions followed by `next`'s (a decoding cache growing by one step).
    pub fn append(&self, next: &KeyValue) -> Result<KeyValue> {
        Ok(KeyValue(match (&self.0, &next.0) {
            (Kv::Heads { k, v }, Kv::Heads { k: k2, v: v2 }) => Kv::Heads {
                k: Tensor::cat(&[k, k2], 2)?,
                v: Tensor::cat(&[v, v2], 2)?,
            },
            (Kv::Rows(a), Kv::Rows(b)) => Kv::Rows(Tensor::cat(&[a, b], 1)?),
            _ => candle_core::bail!("keys and values of training and inference appended together"),
        }))
    }
}

#[derive(Debug, Clone)]
enum Kv {
    /// Split into heads, `[B, H, S, hd]` each: the composite's form.
    Heads { k: Tensor, v: Tensor },
    /// The projection's rows `[B, S, 2D]`, which the fused training attention reads as strided heads.
    Rows(Tensor),
}

impl MultiheadAttention {
    /// Loads `in_proj_weight [3D, D]`, `in_proj_bias [3D]` and `out_proj`.
    pub fn new(dim: usize, heads: usize, dropout: f32, vb: VarBuilder) -> Result<Self> {
        Self::with_inner(dim, dim, heads, dropout, vb)
    }

    /// An attention whose queries, keys and values are `inner` wide on a `dim`-wide stream (`in_proj_weight
    /// [3 inner, dim]`, `out_proj [dim, inner]`): the pruned side blocks of LST (SPEC §16).
    pub fn with_inner(
        dim: usize,
        inner: usize,
        heads: usize,
        dropout: f32,
        vb: VarBuilder,
    ) -> Result<Self> {
        let in_w = vb.get((3 * inner, dim), "in_proj_weight")?;
        let in_b = vb.get(3 * inner, "in_proj_bias")?;
        let q_proj =
            Linear::from_weights(in_w.narrow(0, 0, inner)?, Some(in_b.narrow(0, 0, inner)?));
        let kv_proj = Linear::from_weights(
            in_w.narrow(0, inner, 2 * inner)?,
            Some(in_b.narrow(0, inner, 2 * inner)?),
        );
        let out_proj = Linear::new(inner, dim, vb.pp("out_proj"))?;
        let dim = inner;
        Ok(Self {
            q_proj,
            kv_proj,
            out_proj,
            heads,
            dim,
            dropout,
            mode: Mode::default(),
        })
    }

    /// Computes in `mode` from now on.
    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
        for proj in [&mut self.q_proj, &mut self.kv_proj, &mut self.out_proj] {
            proj.set_mode(mode);
        }
    }

    /// `[B, L, D]` -> `[B, H, L, hd]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        x.reshape((b, l, self.heads, self.dim / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Whether training takes the fused attention ([`attention_grad`]) for these tensors: one graph node
    /// instead of about fifteen.
    fn fused_training(&self, tensors: &[&Tensor]) -> bool {
        self.mode.fused && tensors.iter().any(|t| t.track_op()) && fused_grad::trainable(tensors)
    }

    /// Project keys and values once, so a memory reused across decoding steps is projected once.
    pub fn key_value(&self, kv_in: &Tensor) -> Result<KeyValue> {
        let kv = self.kv_proj.forward(kv_in)?; // [B, S, 2D]
        if self.fused_training(&[&kv]) {
            return Ok(KeyValue(Kv::Rows(kv)));
        }
        Ok(KeyValue(Kv::Heads {
            k: self.split_heads(&kv.narrow(2, 0, self.dim)?)?,
            v: self.split_heads(&kv.narrow(2, self.dim, self.dim)?)?,
        }))
    }

    /// Attention of `q_in [B, L, D]` over `kv_in [B, S, D]` with an additive mask broadcastable to `[B, H, L, S]`.
    pub fn forward(
        &self,
        q_in: &Tensor,
        kv_in: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let kv = self.key_value(kv_in)?;
        self.forward_kv(q_in, &kv, mask, train)
    }

    /// Attention over keys and values already projected by [`Self::key_value`].
    pub fn forward_kv(
        &self,
        q_in: &Tensor,
        kv: &KeyValue,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, l, _) = q_in.dims3()?;
        let hd = self.dim / self.heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let q = self.q_proj.forward(q_in)?;
        let (k, v) = match &kv.0 {
            Kv::Rows(rows) if mask.is_none_or(|m| !m.track_op()) => {
                let (_, s, _) = rows.dims3()?;
                let keep = if train && self.dropout > 0.0 {
                    Some(dropout_mask(
                        (b, self.heads, l, s),
                        self.dropout,
                        rows.device(),
                    )?)
                } else {
                    None
                };
                let out = attention_grad::attention(
                    &q,
                    rows,
                    self.heads,
                    scale as f32,
                    mask,
                    keep.as_ref(),
                )?;
                return self.out_proj.forward(&out);
            }
            Kv::Rows(rows) => (
                self.split_heads(&rows.narrow(2, 0, self.dim)?)?,
                self.split_heads(&rows.narrow(2, self.dim, self.dim)?)?,
            ),
            Kv::Heads { k, v } => (k.clone(), v.clone()),
        };
        let q = self.split_heads(&q)?;
        let scores = q.matmul(&k.t()?)?; // [B, H, L, S], scaled inside the softmax
        let attn = self.mode.attention_softmax(&scores, scale, mask)?;
        let attn = dropout(&attn, self.dropout, train)?;
        let out = attn.matmul(&v)?; // [B, H, L, hd]
        let out = out.transpose(1, 2)?.reshape((b, l, self.dim))?;
        self.out_proj.forward(&out)
    }
}

/// Additive causal mask `[n, n]`: 0 on and below the diagonal, -inf above.
pub fn causal_mask(n: usize, device: &candle_core::Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (n, n), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn packing_frees_the_weight_and_every_path_still_sees_it() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.1, (70, 45), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 70, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 9, 45), &dev).unwrap();
        let fresh = || Linear::from_weights(w.clone(), Some(b.clone()));
        let lin = fresh();
        let first = lin.forward(&x).unwrap();
        if !packed::f32_supported() {
            eprintln!(
                "skipped: this CPU has neither AVX2 with FMA nor AVX-512F, nothing is packed"
            );
            return;
        }
        assert!(
            lin.lock_weight().is_none(),
            "the weight is kept next to its panels"
        );
        assert_eq!(
            lin.weight().unwrap().to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
        // A clone shares the packed form; an input that tracks gradients takes candle's matmul on the rebuilt weight.
        let tracked = candle_core::Var::from_tensor(&x).unwrap();
        let plain = lin.clone().forward(tracked.as_tensor()).unwrap();
        let diff = (&plain - &first).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        // bf16 packs from the rebuilt weight exactly as from the loaded one.
        let bf16 = Mode {
            precision: Precision::Bf16,
            ..Mode::default()
        };
        let bf = |l: &Linear| {
            let mut l = l.clone();
            l.set_mode(bf16);
            l.forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(bf(&lin), bf(&fresh()));
    }

    #[test]
    fn layer_norm_normalises() -> Result<()> {
        let dev = Device::Cpu;
        let ln = LayerNorm::from_weights(
            Tensor::ones(4, DType::F32, &dev)?,
            Tensor::zeros(4, DType::F32, &dev)?,
        );
        let x = Tensor::new(&[[1f32, 2., 3., 4.]], &dev)?;
        let y = ln.forward(&x)?.to_vec2::<f32>()?;
        let mean: f32 = y[0].iter().sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6);
        assert!((y[0][3] - 1.3416355).abs() < 1e-5, "{:?}", y);
        Ok(())
    }

    #[test]
    fn softmax_handles_neg_inf() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0f32, f32::NEG_INFINITY, 0.]], &dev)?;
        let y = softmax(&x)?.to_vec2::<f32>()?;
        assert_eq!(y[0], vec![0.5, 0.0, 0.5]);
        Ok(())
    }

    #[test]
    fn quick_gelu_matches_formula() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[-2f32, 0., 1.5], &dev)?;
        let y = quick_gelu(&x)?.to_vec1::<f32>()?;
        for (xi, yi) in [-2f32, 0., 1.5].iter().zip(y) {
            let want = xi / (1.0 + (-1.702 * xi).exp());
            assert!((want - yi).abs() < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn causal_mask_shape() -> Result<()> {
        let m = causal_mask(3, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(m[0][1], f32::NEG_INFINITY);
        assert_eq!(m[2][0], 0.0);
        assert_eq!(m[1][1], 0.0);
        Ok(())
    }
}
