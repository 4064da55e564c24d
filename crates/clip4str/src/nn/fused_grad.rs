//! Backward passes of the fused kernels, so training gets them too: each composite they replace is a chain of
//! 5-10 candle ops that each allocate and sweep memory (measured: a third of a training step went to those
//! elementwise ops and to candle's strided reductions). The gradients are tested against the composites'
//! autograd in this module's tests.
//!
//! Only f32 CPU tensors take this path (see [`trainable`]); f64 (gradient checks against finite
//! differences) keeps the composites.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::packed::{PackedLinear, PackedLinearF32};
use super::rows::{contiguous, for_each_row, PARALLEL_GRAIN};

/// Whether the differentiable fused ops take these tensors: f32 CPU ones (the caller's [`super::Mode`]
/// decides whether fused kernels are wanted at all).
pub(crate) fn trainable(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

/// Column sums of `rows` rows of `width`, over rayon chunks.
fn column_sums(width: usize, rows: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let per_task = PARALLEL_GRAIN.div_ceil(width.max(1)).max(1);
    (0..rows.div_ceil(per_task))
        .into_par_iter()
        .map(|chunk| {
            let mut acc = vec![0f32; width];
            for r in chunk * per_task..((chunk + 1) * per_task).min(rows) {
                row(r, &mut acc);
            }
            acc
        })
        .reduce(
            || vec![0f32; width],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// `d softmax(x * scale + mask) / dx` given the output `y` and its gradient `g`: `scale * y * (g - Σ g y)`.
pub(crate) fn softmax_grad(y: &Tensor, g: &Tensor, scale: f32) -> Result<Tensor> {
    y.contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad { scale })
}

struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = contiguous(s1, l1, self.name())?;
        let g = contiguous(s2, l2, self.name())?;
        let width = l1.dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; y.len()];
        for_each_row(&mut out, width, |i, row| {
            let (y, g) = (&y[i * width..][..width], &g[i * width..][..width]);
            let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
            for ((o, y), g) in row.iter_mut().zip(y).zip(g) {
                *o = self.scale * y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Gradients of layer norm over the last dimension for input `x`, `weight` and output gradient `g`:
/// `(dx, dweight, dbias)`.
pub(crate) fn layer_norm_grad(
    x: &Tensor,
    weight: &Tensor,
    g: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let width = weight.elem_count();
    let rows = x.elem_count() / width.max(1);
    let packed = x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &g.contiguous()?,
        &LayerNormGrad { eps },
    )?;
    let dx = packed.narrow(0, 0, rows * width)?.reshape(x.shape())?;
    let dweight = packed.narrow(0, rows * width, width)?;
    let dbias = packed.narrow(0, (rows + 1) * width, width)?;
    Ok((dx, dweight, dbias))
}

/// Output: `dx` (rows x width), then `dweight`, then `dbias`, flat.
struct LayerNormGrad {
    eps: f32,
}

/// Mean and 1/std of one row (biased variance, like the forward).
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, self.name())?;
        let w = contiguous(s2, l2, self.name())?;
        let g = contiguous(s3, l3, self.name())?;
        let width = w.len();
        if width == 0 || x.len() % width != 0 || g.len() != x.len() {
            candle_core::bail!("{}: shapes do not match", self.name());
        }
        let rows = x.len() / width;
        let n = width as f32;
        let mut out = vec![0f32; (rows + 2) * width];
        let (dx, params) = out.split_at_mut(rows * width);
        for_each_row(dx, width, |i, row| {
            let (x, g) = (&x[i * width..][..width], &g[i * width..][..width]);
            let (mean, inv) = row_stats(x, self.eps);
            // dx = inv * (gw - mean(gw) - xhat * mean(gw * xhat)), gw = g * weight.
            let (mut sum_gw, mut sum_gw_xhat) = (0f32, 0f32);
            for ((x, g), w) in x.iter().zip(g).zip(w) {
                let gw = g * w;
                sum_gw += gw;
                sum_gw_xhat += gw * (x - mean) * inv;
            }
            let (mean_gw, mean_gw_xhat) = (sum_gw / n, sum_gw_xhat / n);
            for (((o, x), g), w) in row.iter_mut().zip(x).zip(g).zip(w) {
                let xhat = (x - mean) * inv;
                *o = inv * (g * w - mean_gw - xhat * mean_gw_xhat);
            }
        });
        let sums = column_sums(2 * width, rows, |i, acc| {
            let (x, g) = (&x[i * width..][..width], &g[i * width..][..width]);
            let (mean, inv) = row_stats(x, self.eps);
            let (dw, db) = acc.split_at_mut(width);
            for (j, (x, g)) in x.iter().zip(g).enumerate() {
                dw[j] += g * (x - mean) * inv;
                db[j] += g;
            }
        });
        params.copy_from_slice(&sums);
        Ok((CpuStorage::F32(out), Shape::from(((rows + 2) * width,))))
    }
}

/// `d quick_gelu(x) / dx` times `g`: `g (s + 1.702 x s (1 - s))`, `s = sigmoid(1.702 x)`.
pub(crate) fn quick_gelu_grad(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &QuickGeluGrad)
}

struct QuickGeluGrad;

impl CustomOp2 for QuickGeluGrad {
    fn name(&self) -> &'static str {
        "fused-quick-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, self.name())?;
        let g = contiguous(s2, l2, self.name())?;
        let mut out = vec![0f32; x.len()];
        let block = PARALLEL_GRAIN.min(x.len().max(1));
        for_each_row(&mut out, block, |i, chunk| {
            let start = i * block;
            for ((o, x), g) in chunk.iter_mut().zip(&x[start..]).zip(&g[start..]) {
                let s = 1.0 / (1.0 + (-1.702 * x).exp());
                *o = g * (s + 1.702 * x * s * (1.0 - s));
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `y + bias` over the last dimension, differentiable: the bias gradient is a fused column sum instead of
/// candle's strided reduction.
pub(crate) fn add_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    y.contiguous()?.apply_op2(&bias.contiguous()?, BiasAdd)
}

struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "fused-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = contiguous(s1, l1, self.name())?;
        let b = contiguous(s2, l2, self.name())?;
        let width = b.len();
        if width == 0 || l1.dims().last() != Some(&width) {
            candle_core::bail!("{}: bias does not match the last dim", self.name());
        }
        let mut out = vec![0f32; y.len()];
        for_each_row(&mut out, width, |i, row| {
            for ((o, y), b) in row.iter_mut().zip(&y[i * width..]).zip(b) {
                *o = y + b;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let width = bias.elem_count();
        let g = grad.detach().contiguous()?;
        let g = g.reshape((g.elem_count() / width.max(1), width))?;
        Ok((Some(grad.clone()), Some(bias_grad(&g, bias)?)))
    }
}

/// `x [.., K] W^T + b` with `w [N, K]`, `b [N]` in f32 as one graph node. The composite (reshape, transpose,
/// product, bias, reshape) is five nodes, and candle's backward copies every node's gradient once more (it adds
/// it to a fresh zero tensor); the sums are candle's own (the same GEMM, then the bias, and the
/// gradients as candle's product backward forms them).
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearF32)
}

struct LinearF32;

impl CustomOp3 for LinearF32 {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let LinearArgs { x, w, b, m, k, n } =
            LinearArgs::read(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let mut out = vec![0f32; m * n];
        if let Some(packed) = PackedLinearF32::from_rows(w, n, k, PackedLinear::padded_bias(b, n)) {
            packed.run(x, m, &mut out);
            return Ok(args_output(l1, n, out));
        }
        let threads = rayon::current_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: `out` is [m, n] row-major, `x` [m, k] row-major and `w` [n, k] row-major read as W^T [k, n]
        // (row stride 1, column stride k); every index the strides reach lies inside its slice.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        // The bias after the product, as candle's composite adds it (a GEMM that reads a bias-filled output
        // was measured slower).
        for_each_row(&mut out, n, |_, row| {
            row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
        });
        Ok(args_output(l1, n, out))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        linear_backward(x, w, b, grad, false)
    }
}

/// The gradients of a training linear layer `x W^T + b` given its output's: the input's `G W` on the packed
/// kernel (bf16 operands when `bf16`, else f32; candle's product on CPUs without the f32 kernel), the weight's
/// `G^T X` as an f32 product (its sum runs over all rows, which the bf16 kernel would need transposed into
/// pairs: measured as slow as the product saved, 8192 rows, 192 -> 576, 18 ms either way on an AMD EPYC with
/// 2 threads), the bias's as column sums. Only for operands in the graph ([`wanted`]).
pub(super) fn linear_backward(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    grad: &Tensor,
    bf16: bool,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (g, x2) = linear_grad_rows(x, w, grad)?;
    let dx = wanted(x, || {
        if bf16 || super::packed::f32_supported() {
            g.apply_op2_no_bwd(&w.detach(), &InputGrad { bf16 })?
        } else {
            g.matmul(&w.detach())?
        }
        .reshape(x.shape())
    })?;
    let dw = wanted(w, || g.t()?.matmul(&x2))?;
    Ok((dx, dw, wanted(b, || bias_grad(&g, b))?))
}

/// `grad()` when `arg` takes part in the graph; nothing for a frozen weight or an input computed from
/// constants (the image into the first layer, a detached memory), whose gradient candle would still store.
fn wanted(arg: &Tensor, grad: impl FnOnce() -> Result<Tensor>) -> Result<Option<Tensor>> {
    if arg.track_op() {
        grad().map(Some)
    } else {
        Ok(None)
    }
}

/// `G [M, N] W [N, K]`, a linear layer's input gradient, on the packed kernel: f32, or bf16 operands with f32
/// accumulation (AVX512-BF16). `W` is packed as the weight of a product with K outputs and N inputs.
struct InputGrad {
    bf16: bool,
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "fused-linear-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = contiguous(s1, l1, self.name())?;
        let w = contiguous(s2, l2, self.name())?;
        let (m, n) = l1.shape().dims2()?;
        let (_, k) = l2.shape().dims2()?;
        let mut out = vec![0f32; m * k];
        if self.bf16 {
            PackedLinear::from_transposed(w, n, k).run(g, m, &mut out, true);
        } else {
            let Some(packed) = PackedLinearF32::from_transposed(w, n, k) else {
                candle_core::bail!("{}: this CPU has no packed f32 kernel", self.name());
            };
            packed.run(g, m, &mut out);
        }
        Ok((CpuStorage::F32(out), Shape::from((m, k))))
    }
}

/// A linear layer's operands as its custom ops (f32 here, bf16 in `packed_grad`) read them: `x [.., K]` as
/// `m` rows, `w [n, k]`, `b [n]`.
pub(super) struct LinearArgs<'a> {
    pub x: &'a [f32],
    pub w: &'a [f32],
    pub b: &'a [f32],
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl<'a> LinearArgs<'a> {
    /// The contiguous operands, or an error naming `op` when their shapes do not fit.
    pub(super) fn read(
        op: &str,
        x: (&'a CpuStorage, &Layout),
        w: (&'a CpuStorage, &Layout),
        b: (&'a CpuStorage, &Layout),
    ) -> Result<Self> {
        let dims = x.1.dims();
        let (xs, ws, bs) = (
            contiguous(x.0, x.1, op)?,
            contiguous(w.0, w.1, op)?,
            contiguous(b.0, b.1, op)?,
        );
        let k = dims.last().copied().unwrap_or(0);
        let (n, wk) = w.1.shape().dims2()?;
        if wk != k || bs.len() != n {
            candle_core::bail!(
                "{op}: input {dims:?}, weight [{n}, {wk}] and bias [{}] do not fit",
                bs.len()
            );
        }
        Ok(Self {
            x: xs,
            w: ws,
            b: bs,
            m: xs.len() / k.max(1),
            k,
            n,
        })
    }
}

/// A linear layer's output `out` in the input's leading dims (`x_layout`) with `n` features.
pub(super) fn args_output(x_layout: &Layout, n: usize, out: Vec<f32>) -> (CpuStorage, Shape) {
    let mut dims = x_layout.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    (CpuStorage::F32(out), Shape::from(dims))
}

/// A linear layer's output gradient and input outside the graph, as rows `(G [M, N], X [M, K])`: reshaping
/// detached tensors copies nothing.
fn linear_grad_rows(x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, k) = w.dims2()?;
    let g = grad.detach().contiguous()?;
    let g = g.reshape((g.elem_count() / n.max(1), n))?;
    let x2 = x.detach().reshape((x.elem_count() / k.max(1), k))?;
    Ok((g, x2))
}

/// The bias's gradient: the column sums of `g [M, N]`, read in place.
pub(super) fn bias_grad(g: &Tensor, b: &Tensor) -> Result<Tensor> {
    g.apply_op1_no_bwd(&ColumnSums)?.reshape(b.shape())
}

/// Column sums of `[M, N]`, read in place: a linear layer's bias gradient.
struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "fused-column-sums"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous(storage, layout, self.name())?;
        let (m, n) = layout.shape().dims2()?;
        let sums = column_sums(n, m, |i, acc| {
            for (a, v) in acc.iter_mut().zip(&g[i * n..][..n]) {
                *a += v;
            }
        });
        Ok((CpuStorage::F32(sums), Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use crate::nn::{self, Mode};

    fn close(a: &candle_core::Tensor, b: &candle_core::Tensor, what: &str) {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(
            diff <= 1e-5 * (1.0 + scale),
            "{what}: off by {diff} (scale {scale})"
        );
    }

    /// Outputs and gradients of `f` at `inputs` with the fused ops on and off, compared.
    fn compare(
        what: &str,
        inputs: &[candle_core::Tensor],
        f: impl Fn(Mode, &[candle_core::Tensor]) -> candle_core::Tensor,
    ) {
        let eval = |fused: bool, weights: Option<&candle_core::Tensor>| {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let tensors: Vec<candle_core::Tensor> =
                vars.iter().map(|v| v.as_tensor().clone()).collect();
            let mode = Mode {
                fused,
                ..Mode::default()
            };
            let out = f(mode, &tensors);
            // A weighted sum, so every output element gets a different gradient.
            let weights = weights.cloned().unwrap_or_else(|| randn(out.dims()));
            let grads = (&out * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gs: Vec<candle_core::Tensor> = vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).expect("a gradient").clone())
                .collect();
            (out, weights, gs)
        };
        let (out_fused, weights, grads_fused) = eval(true, None);
        let (out_plain, _, grads_plain) = eval(false, Some(&weights));
        close(&out_fused, &out_plain, &format!("{what} forward"));
        for (i, (a, b)) in grads_fused.iter().zip(&grads_plain).enumerate() {
            close(a, b, &format!("{what} gradient {i}"));
        }
    }

    fn randn(shape: &[usize]) -> candle_core::Tensor {
        candle_core::Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn linear_gradients_match_the_composite() {
        // A 3-D input as the decoders pass it; sizes that are not multiples of any kernel's tile.
        compare(
            "linear",
            &[randn(&[3, 37, 19]), randn(&[23, 19]), randn(&[23])],
            |mode, t| {
                let mut layer = nn::Linear::from_weights(t[1].clone(), Some(t[2].clone()));
                layer.set_mode(mode);
                candle_core::Module::forward(&layer, &t[0]).unwrap()
            },
        );
    }

    /// Sizes of the attention tests: batch, queries, keys, width, heads.
    const ATTN: (usize, usize, usize, usize, usize) = (3, 7, 13, 12, 3);

    /// An attention from `weights` (`in_proj_weight`, `in_proj_bias`, `out_proj.weight`, `.bias`).
    fn attention(
        mode: Mode,
        weights: &[candle_core::Tensor],
        dropout: f32,
    ) -> nn::MultiheadAttention {
        let (_, _, _, d, heads) = ATTN;
        let names = [
            "in_proj_weight",
            "in_proj_bias",
            "out_proj.weight",
            "out_proj.bias",
        ];
        let weights = names
            .iter()
            .zip(weights)
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        let vb =
            candle_nn::VarBuilder::from_tensors(weights, candle_core::DType::F32, &Device::Cpu);
        let mut attn = nn::MultiheadAttention::new(d, heads, dropout, vb).unwrap();
        attn.set_mode(mode);
        attn
    }

    /// `leading` random inputs, then random attention weights.
    fn attention_inputs(leading: &[&[usize]]) -> Vec<candle_core::Tensor> {
        let d = ATTN.3;
        let mut inputs: Vec<_> = leading.iter().map(|s| randn(s)).collect();
        inputs.extend([
            randn(&[3 * d, d]),
            randn(&[3 * d]),
            randn(&[d, d]),
            randn(&[d]),
        ]);
        inputs
    }

    /// Self-attention without a mask: output and the gradients of the input and every weight.
    #[test]
    fn attention_gradients_match_the_composite() {
        let (b, _, s, d, _) = ATTN;
        compare(
            "self-attention",
            &attention_inputs(&[&[b, s, d]]),
            |mode, t| {
                attention(mode, &t[1..], 0.0)
                    .forward(&t[0], &t[0], None, true)
                    .unwrap()
            },
        );
    }

    /// Cross-attention with a causal mask, a per-sample padding mask and dropout (the same seeded masks on
    /// both paths).
    #[cfg(feature = "train")]
    #[test]
    fn masked_attention_with_dropout_gradients_match_the_composite() {
        let dev = Device::Cpu;
        let (b, l, s, d, _) = ATTN;
        let causal = nn::causal_mask(s, &dev)
            .unwrap()
            .narrow(0, s - l, l)
            .unwrap();
        let mut padding = vec![0f32; b * s];
        padding[s - 2..s].fill(f32::NEG_INFINITY);
        padding[2 * s - 5..2 * s].fill(f32::NEG_INFINITY);
        let padding = candle_core::Tensor::from_vec(padding, (b, 1, 1, s), &dev).unwrap();
        let mask = causal.broadcast_add(&padding).unwrap();
        let inputs = attention_inputs(&[&[b, l, d], &[b, s, d]]);
        for (what, mask) in [("causal", &causal), ("causal and padding", &mask)] {
            compare(
                &format!("cross-attention, {what} mask, dropout"),
                &inputs,
                |mode, t| {
                    let _stream = nn::DropoutStream::install(7);
                    attention(mode, &t[2..], 0.1)
                        .forward(&t[0], &t[1], Some(mask), true)
                        .unwrap()
                },
            );
        }
    }

    #[test]
    fn softmax_gradients_match_the_composite() {
        let mask = candle_core::Tensor::from_vec(
            vec![
                0f32,
                f32::NEG_INFINITY,
                0.0,
                0.0,
                0.0,
                0.0,
                f32::NEG_INFINITY,
                0.0,
                0.0,
            ],
            (1, 1, 1, 9),
            &Device::Cpu,
        )
        .unwrap();
        compare("masked softmax", &[randn(&[2, 3, 5, 9])], |mode, t| {
            mode.attention_softmax(&t[0], 0.125, Some(&mask)).unwrap()
        });
        compare("softmax", &[randn(&[7, 130])], |mode, t| {
            mode.softmax(&t[0]).unwrap()
        });
    }

    #[test]
    fn layer_norm_gradients_match_the_composite() {
        for rows in [3, 2000] {
            compare(
                "layer norm",
                &[randn(&[rows, 48]), randn(&[48]), randn(&[48])],
                |mode, t| {
                    let mut ln = nn::LayerNorm::from_weights(t[1].clone(), t[2].clone());
                    ln.set_mode(mode);
                    candle_core::Module::forward(&ln, &t[0]).unwrap()
                },
            );
        }
    }

    #[test]
    fn quick_gelu_and_bias_gradients_match_the_composite() {
        compare("quick gelu", &[randn(&[5, 40000])], |mode, t| {
            mode.quick_gelu(&t[0]).unwrap()
        });
        compare(
            "linear",
            &[randn(&[4, 6, 24]), randn(&[10, 24]), randn(&[10])],
            |mode, t| {
                let mut lin = nn::Linear::from_weights(t[1].clone(), Some(t[2].clone()));
                lin.set_mode(mode);
                candle_core::Module::forward(&lin, &t[0]).unwrap()
            },
        );
    }
}
