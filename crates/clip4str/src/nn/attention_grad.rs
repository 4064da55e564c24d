//! Multi-head attention for training as one graph node: `softmax(Q K^T * scale + mask) V` per head, read
//! straight from the projections' rows and written straight into the merged heads, with a hand-written
//! backward. The composite is about fifteen candle nodes (two narrows, three head splits with their copies,
//! the products, softmax, dropout, the merge), and candle's backward sweeps every node's gradient into a fresh
//! zero tensor; a narrow's gradient is also padded to the full width by concatenation. Here the heads are
//! strided views for candle's own GEMM (`gemm`), and only the attention weights are kept for the backward.
//!
//! Only f32 CPU tensors take this path; the tests compare it with the composite's autograd.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::softmax_into;
use super::rows::{contiguous, with_f32, SendPtr};

/// Attention of `q [B, L, D]` over `kv [B, S, 2D]` (keys in the first `D` features, values in the rest)
/// with `heads` heads, scores scaled by `scale`, an additive `mask` broadcastable to `[B, H, L, S]` and the
/// inverted-dropout factors `keep [B, H, L, S]` (0 or `1 / (1 - p)`) applied to the weights. Returns the
/// merged heads `[B, L, D]`.
pub(crate) fn attention(
    q: &Tensor,
    kv: &Tensor,
    heads: usize,
    scale: f32,
    mask: Option<&Tensor>,
    keep: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, l, d) = q.dims3()?;
    let (kb, s, d2) = kv.dims3()?;
    if kb != b || d2 != 2 * d || heads == 0 || d % heads != 0 {
        candle_core::bail!(
            "fused attention: queries [{b}, {l}, {d}], keys and values [{kb}, {s}, {d2}] and {heads} heads do not fit"
        );
    }
    let op = Attention {
        dims: Dims {
            b,
            l,
            s,
            d,
            heads,
            hd: d / heads,
        },
        scale,
        mask: mask.map(|m| Mask::new(m, b, heads, l, s)).transpose()?,
        keep: keep
            .map(|k| {
                k.broadcast_as((b, heads, l, s))?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()
            })
            .transpose()?,
        weights: Mutex::new(Vec::new()),
    };
    q.contiguous()?.apply_op2(&kv.contiguous()?, op)
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    l: usize,
    s: usize,
    d: usize,
    heads: usize,
    hd: usize,
}

impl Dims {
    /// Offsets of head `h` of batch `bi` in `q`/`out` `[B, L, D]`, and of its keys and values in
    /// `kv [B, S, 2D]`.
    fn offsets(&self, bi: usize, h: usize) -> (usize, usize, usize) {
        let q = bi * self.l * self.d + h * self.hd;
        let k = bi * self.s * 2 * self.d + h * self.hd;
        (q, k, k + self.d)
    }

    fn weights_len(&self) -> usize {
        self.l * self.s
    }
}

/// An additive mask with its batch and head dims kept only where it varies along them.
struct Mask {
    data: Vec<f32>,
    per_batch: bool,
    per_head: bool,
}

impl Mask {
    fn new(mask: &Tensor, b: usize, heads: usize, l: usize, s: usize) -> Result<Self> {
        let mut dims = mask.dims().to_vec();
        if dims.len() > 4 {
            candle_core::bail!("fused attention: a mask of {dims:?} has more than four dims");
        }
        while dims.len() < 4 {
            dims.insert(0, 1);
        }
        let (mb, mh) = (dims[0], dims[1]);
        let data = mask
            .reshape(dims)?
            .broadcast_as((mb, mh, l, s))?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let fits = |m: usize, full: usize| m == 1 || m == full;
        if !fits(mb, b) || !fits(mh, heads) {
            candle_core::bail!(
                "fused attention: a mask of [{mb}, {mh}, ..] does not broadcast to [{b}, {heads}, ..]"
            );
        }
        Ok(Self {
            data,
            per_batch: mb > 1,
            per_head: mh > 1,
        })
    }

    /// Row `i` of head `h` of batch `bi`.
    fn row(&self, dims: &Dims, bi: usize, h: usize, i: usize) -> &[f32] {
        let heads = if self.per_head { dims.heads } else { 1 };
        let plane =
            (if self.per_batch { bi } else { 0 }) * heads + if self.per_head { h } else { 0 };
        &self.data[(plane * dims.l + i) * dims.s..][..dims.s]
    }
}

struct Attention {
    dims: Dims,
    scale: f32,
    mask: Option<Mask>,
    keep: Option<Vec<f32>>,
    /// The attention weights `[B, H, L, S]` before dropout, kept by the forward for the backward.
    weights: Mutex<Vec<f32>>,
}

/// A strided matrix operand: pointer, row stride, column stride.
type Operand<P> = (P, isize, isize);

/// `dst [m, n] = lhs [m, k] rhs [k, n]` on one thread, every operand strided.
///
/// # Safety
/// Every element the strides reach must lie inside its allocation, and `dst` must not be written by anyone
/// else meanwhile.
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: Operand<*mut f32>,
    lhs: Operand<*const f32>,
    rhs: Operand<*const f32>,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.2,
        dst.1,
        false,
        lhs.0,
        lhs.2,
        lhs.1,
        rhs.0,
        rhs.2,
        rhs.1,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

impl Attention {
    /// The kept attention weights (a poisoned lock, left by a panicking thread, is an error, not a panic).
    fn kept(&self) -> Result<std::sync::MutexGuard<'_, Vec<f32>>> {
        self.weights.lock().map_err(|_| {
            candle_core::Error::Msg("fused attention: the kept weights are poisoned".into())
        })
    }

    /// The weights of head `h` of batch `bi` after dropout, into `out` (the weights themselves without it).
    fn dropped<'a>(
        &self,
        bi: usize,
        h: usize,
        weights: &'a [f32],
        out: &'a mut [f32],
    ) -> &'a [f32] {
        match &self.keep {
            None => weights,
            Some(keep) => {
                let len = self.dims.weights_len();
                let keep = &keep[(bi * self.dims.heads + h) * len..][..len];
                for ((o, w), k) in out.iter_mut().zip(weights).zip(keep) {
                    *o = w * k;
                }
                out
            }
        }
    }
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = contiguous(s1, l1, self.name())?;
        let kv = contiguous(s2, l2, self.name())?;
        let dims = self.dims;
        let Dims {
            b,
            l,
            s,
            d,
            heads,
            hd,
        } = dims;
        let len = dims.weights_len();
        let mut out = vec![0f32; b * l * d];
        let mut weights = vec![0f32; b * heads * len];
        let out_ptr = SendPtr(out.as_mut_ptr());
        weights
            .par_chunks_mut(len.max(1))
            .enumerate()
            .for_each_init(
                || (vec![0f32; len], vec![0f32; len]),
                |(scores, dropped), (task, w)| {
                    let (bi, h) = (task / heads, task % heads);
                    let (qo, ko, vo) = dims.offsets(bi, h);
                    let (d, dd) = (d as isize, 2 * d as isize);
                    // SAFETY: the head's rows lie inside `q` and `kv`, `scores` is [l, s]; the task owns it.
                    unsafe {
                        product(
                            (l, s, hd),
                            (scores.as_mut_ptr(), s as isize, 1),
                            (q.as_ptr().add(qo), d, 1),
                            (kv.as_ptr().add(ko), 1, dd),
                        );
                    }
                    for i in 0..l {
                        let mask = self.mask.as_ref().map(|m| m.row(&dims, bi, h, i));
                        softmax_into(
                            &scores[i * s..][..s],
                            mask,
                            self.scale,
                            &mut w[i * s..][..s],
                        );
                    }
                    let p = self.dropped(bi, h, w, dropped);
                    // SAFETY: head `h` of batch `bi` owns the columns `h * hd ..` of its `l` rows of `out`.
                    unsafe {
                        product(
                            (l, hd, s),
                            (out_ptr.get().add(qo), d, 1),
                            (p.as_ptr(), s as isize, 1),
                            (kv.as_ptr().add(vo), dd, 1),
                        );
                    }
                },
            );
        *self.kept()? = weights;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        kv: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Dims { b, l, s, d, .. } = self.dims;
        let weights = self.kept()?;
        let (q, kv, grad) = (q.contiguous()?, kv.contiguous()?, grad.contiguous()?);
        let mut dq = vec![0f32; b * l * d];
        let mut dkv = vec![0f32; b * s * 2 * d];
        with_f32(&q, self.name(), |q_data| {
            with_f32(&kv, self.name(), |kv_data| {
                with_f32(&grad, self.name(), |g| {
                    self.backward_into(&weights, q_data, kv_data, g, &mut dq, &mut dkv)
                })
            })
        })?;
        let dq = Tensor::from_vec(dq, q.shape(), q.device())?;
        let dkv = Tensor::from_vec(dkv, kv.shape(), kv.device())?;
        Ok((Some(dq), Some(dkv)))
    }
}

impl Attention {
    /// The gradients of the queries and of the keys and values, given the kept weights and the output's
    /// gradient `g`.
    fn backward_into(
        &self,
        weights: &[f32],
        q_data: &[f32],
        kv_data: &[f32],
        g: &[f32],
        dq: &mut [f32],
        dkv: &mut [f32],
    ) -> Result<()> {
        let dims = self.dims;
        let Dims {
            b,
            l,
            s,
            d,
            heads,
            hd,
        } = dims;
        let len = dims.weights_len();
        if [q_data.len(), kv_data.len(), g.len()] != [b * l * d, b * s * 2 * d, b * l * d]
            || weights.len() != b * heads * len
        {
            candle_core::bail!("fused attention: the backward's operands do not fit the forward's");
        }
        let (dq_ptr, dkv_ptr) = (SendPtr(dq.as_mut_ptr()), SendPtr(dkv.as_mut_ptr()));
        weights.par_chunks(len.max(1)).enumerate().for_each_init(
            || (vec![0f32; len], vec![0f32; len]),
            |(dp, dropped), (task, w)| {
                let (bi, h) = (task / heads, task % heads);
                let (qo, ko, vo) = dims.offsets(bi, h);
                let (d, dd, s_) = (d as isize, 2 * d as isize, s as isize);
                let p = self.dropped(bi, h, w, dropped);
                // SAFETY (every product below): the head's rows lie inside their buffers; this task alone
                // writes head `h` of batch `bi` of `dq` and `dkv`, and its own `dp`.
                unsafe {
                    // dV = P^T dO
                    product(
                        (s, hd, l),
                        (dkv_ptr.get().add(vo), dd, 1),
                        (p.as_ptr(), 1, s_),
                        (g.as_ptr().add(qo), d, 1),
                    );
                    // dP = dO V^T
                    product(
                        (l, s, hd),
                        (dp.as_mut_ptr(), s_, 1),
                        (g.as_ptr().add(qo), d, 1),
                        (kv_data.as_ptr().add(vo), 1, dd),
                    );
                }
                // Through dropout, then softmax: dS = scale * W * (dP - sum(dP * W)).
                let keep = self
                    .keep
                    .as_ref()
                    .map(|k| &k[(bi * heads + h) * len..][..len]);
                for i in 0..l {
                    let row = &mut dp[i * s..][..s];
                    if let Some(keep) = keep {
                        row.iter_mut()
                            .zip(&keep[i * s..][..s])
                            .for_each(|(g, k)| *g *= k);
                    }
                    let w = &w[i * s..][..s];
                    let dot: f32 = row.iter().zip(w).map(|(g, w)| g * w).sum();
                    for (g, w) in row.iter_mut().zip(w) {
                        *g = self.scale * w * (*g - dot);
                    }
                }
                unsafe {
                    // dQ = dS K
                    product(
                        (l, hd, s),
                        (dq_ptr.get().add(qo), d, 1),
                        (dp.as_ptr(), s_, 1),
                        (kv_data.as_ptr().add(ko), dd, 1),
                    );
                    // dK = dS^T Q
                    product(
                        (s, hd, l),
                        (dkv_ptr.get().add(ko), dd, 1),
                        (dp.as_ptr(), 1, s_),
                        (q_data.as_ptr().add(qo), d, 1),
                    );
                }
            },
        );
        Ok(())
    }
}
