//! Fused CPU kernels for inference: scaled and masked softmax, layer norm and QuickGELU over f32 rows.
//!
//! The public entry points return `Ok(None)` unless [`inference_only`] accepts their inputs (plain f32 CPU
//! tensors that track no gradient); the caller then runs its differentiable composite. The `*_trainable`
//! entry points take tensors that do track gradients: the ops carry backward passes
//! ([`super::fused_grad`], tested against the composites' autograd), unlike candle's own fused kernels,
//! which drop gradients silently. Rows are spread over rayon; each row runs with AVX-512, AVX2+FMA or scalar
//! code, picked once at run time.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::rows::{avx512_allowed, contiguous, for_each_row, inference_only, PARALLEL_GRAIN};

/// `softmax(x * scale + mask)` over the last dimension; `mask` is additive and broadcastable to `x`.
///
/// A row whose entries are all `-inf` gives NaN, like the composite. `None`: use the composite.
pub fn softmax_last_dim(x: &Tensor, scale: f32, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
    softmax_with(x, scale, mask, Isa::detect())
}

/// [`softmax_last_dim`] for training: `x` may track gradients (the mask must not).
pub(crate) fn softmax_last_dim_trainable(
    x: &Tensor,
    scale: f32,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if mask.is_some_and(Tensor::track_op) || !super::fused_grad::trainable(&[x]) {
        return Ok(None);
    }
    softmax_gated(x, scale, mask, Isa::detect(), super::fused_grad::trainable)
}

/// Decides whether a kernel may take its inputs.
type Gate = fn(&[&Tensor]) -> bool;

fn softmax_with(x: &Tensor, scale: f32, mask: Option<&Tensor>, isa: Isa) -> Result<Option<Tensor>> {
    softmax_gated(x, scale, mask, isa, inference_only)
}

fn softmax_gated(
    x: &Tensor,
    scale: f32,
    mask: Option<&Tensor>,
    isa: Isa,
    gate: Gate,
) -> Result<Option<Tensor>> {
    let mut inputs = vec![x];
    inputs.extend(mask);
    if !gate(&inputs) || !x.is_contiguous() || x.rank() == 0 {
        return Ok(None);
    }
    let op = Softmax { scale, isa };
    let Some(mask) = mask else {
        return x.apply_op1(op).map(Some);
    };
    // A stride-0 view of the mask over `x`'s shape: the kernel reads each row's mask in place.
    let Ok(mask) = mask.broadcast_as(x.shape()) else {
        return Ok(None);
    };
    let last = x.rank() - 1;
    if mask.stride()[last] != 1 && x.dim(last)? != 1 {
        return Ok(None);
    }
    x.apply_op2(&mask, op).map(Some)
}

/// Layer norm over the last dimension with `weight` and `bias` of that width (biased variance).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    layer_norm_with(x, weight, bias, eps, Isa::detect())
}

/// [`layer_norm`] for training: the inputs may track gradients.
pub(crate) fn layer_norm_trainable(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    layer_norm_gated(
        x,
        weight,
        bias,
        eps,
        Isa::detect(),
        super::fused_grad::trainable,
    )
}

fn layer_norm_with(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    isa: Isa,
) -> Result<Option<Tensor>> {
    layer_norm_gated(x, weight, bias, eps, isa, inference_only)
}

fn layer_norm_gated(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    isa: Isa,
    gate: Gate,
) -> Result<Option<Tensor>> {
    if !gate(&[x, weight, bias]) || x.rank() == 0 {
        return Ok(None);
    }
    let width = x.dim(x.rank() - 1)?;
    let fits = |t: &Tensor| t.is_contiguous() && t.elem_count() == width;
    if !x.is_contiguous() || !fits(weight) || !fits(bias) {
        return Ok(None);
    }
    let op = LayerNormOp {
        eps: eps as f32,
        isa,
    };
    x.apply_op3(weight, bias, op).map(Some)
}

/// QuickGELU `x * sigmoid(1.702 x)`, elementwise.
pub fn quick_gelu(x: &Tensor) -> Result<Option<Tensor>> {
    quick_gelu_with(x, Isa::detect())
}

/// [`quick_gelu`] for training: `x` may track gradients.
pub(crate) fn quick_gelu_trainable(x: &Tensor) -> Result<Option<Tensor>> {
    quick_gelu_gated(x, Isa::detect(), super::fused_grad::trainable)
}

fn quick_gelu_with(x: &Tensor, isa: Isa) -> Result<Option<Tensor>> {
    quick_gelu_gated(x, isa, inference_only)
}

fn quick_gelu_gated(x: &Tensor, isa: Isa, gate: Gate) -> Result<Option<Tensor>> {
    if !gate(&[x]) || !x.is_contiguous() {
        return Ok(None);
    }
    x.apply_op1(QuickGelu { isa }).map(Some)
}

/// The instruction set a kernel runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

impl Isa {
    /// The best instruction set of this CPU, detected once.
    fn detect() -> Self {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if avx512_allowed() && is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    return Isa::Avx2;
                }
            }
            Isa::Scalar
        })
    }
}

/// `softmax(x * scale + mask)` over rows; unary without a mask, binary with one.
struct Softmax {
    scale: f32,
    isa: Isa,
}

impl Softmax {
    fn run(&self, x: &[f32], layout: &Layout, mask: Option<(&[f32], &Layout)>) -> CpuStorage {
        let dims = layout.dims();
        let width = dims[dims.len() - 1];
        let outer = &dims[..dims.len() - 1];
        let mut out = vec![0f32; x.len()];
        for_each_row(&mut out, width, |i, out_row| {
            let x_row = &x[i * width..(i + 1) * width];
            let mask_row = mask.map(|(data, ml)| {
                // Unravel row `i` over the outer dims and follow the mask's (possibly zero) strides.
                let mut rest = i;
                let mut offset = ml.start_offset();
                for (d, &size) in outer.iter().enumerate().rev() {
                    offset += (rest % size) * ml.stride()[d];
                    rest /= size;
                }
                &data[offset..offset + width]
            });
            dispatch_softmax(self.isa, x_row, mask_row, self.scale, out_row);
        });
        CpuStorage::F32(out)
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, "fused-softmax")?;
        Ok((self.run(x, layout, None), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        super::fused_grad::softmax_grad(res, grad, self.scale).map(Some)
    }
}

impl CustomOp2 for Softmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "fused-masked-softmax")?;
        let CpuStorage::F32(mask) = s2 else {
            candle_core::bail!("fused-masked-softmax: expected an f32 mask");
        };
        if l2.dims() != l1.dims() {
            candle_core::bail!("fused-masked-softmax: mask not broadcast to the input");
        }
        Ok((self.run(x, l1, Some((mask, l2))), l1.shape().clone()))
    }

    /// The mask is a constant: no gradient for it.
    fn bwd(
        &self,
        _x: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(super::fused_grad::softmax_grad(res, grad, self.scale)?),
            None,
        ))
    }
}

/// Layer norm over rows: `(x, weight, bias)`.
struct LayerNormOp {
    eps: f32,
    isa: Isa,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let weight = contiguous(s2, l2, self.name())?;
        let bias = contiguous(s3, l3, self.name())?;
        let width = weight.len();
        if bias.len() != width || l1.dims().last() != Some(&width) {
            candle_core::bail!("{}: weight and bias must match the last dim", self.name());
        }
        let mut out = vec![0f32; x.len()];
        for_each_row(&mut out, width, |i, out_row| {
            let x_row = &x[i * width..(i + 1) * width];
            dispatch_layer_norm(self.isa, x_row, weight, bias, self.eps, out_row);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = super::fused_grad::layer_norm_grad(x, weight, grad, self.eps)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// QuickGELU, elementwise.
struct QuickGelu {
    isa: Isa,
}

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "fused-quick-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, self.name())?;
        let mut out = vec![0f32; x.len()];
        // Elementwise: cut the flat data into equal blocks (the last may be short).
        let block = PARALLEL_GRAIN.min(x.len().max(1));
        for_each_row(&mut out, block, |i, out_block| {
            let start = i * block;
            dispatch_quick_gelu(self.isa, &x[start..start + out_block.len()], out_block);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        super::fused_grad::quick_gelu_grad(x, grad).map(Some)
    }
}

/// Generates the per-ISA entry points of a row kernel generic over [`Simd`].
macro_rules! dispatch {
    ($name:ident, $generic:ident, ($($arg:ident: $ty:ty),*)) => {
        fn $name(isa: Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    // SAFETY: the avx512f feature is enabled on this function, which `dispatch` only
                    // calls after `Isa::detect` saw it on this CPU.
                    unsafe { $generic::<x86::F32x16>($($arg),*) }
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    // SAFETY: as above, for avx2 and fma.
                    unsafe { $generic::<x86::F32x8>($($arg),*) }
                }
                match isa {
                    // SAFETY: `Isa::Avx512` is only constructed after detecting avx512f.
                    Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: `Isa::Avx2` is only constructed after detecting avx2 and fma.
                    Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    Isa::Scalar => {}
                }
            }
            let _ = isa;
            // SAFETY: the scalar `Simd` needs no CPU feature.
            unsafe { $generic::<f32>($($arg),*) }
        }
    };
}

/// `softmax(x * scale + mask)` of one row into `out`, with the best kernel of this CPU.
pub(super) fn softmax_into(x: &[f32], mask: Option<&[f32]>, scale: f32, out: &mut [f32]) {
    dispatch_softmax(Isa::detect(), x, mask, scale, out);
}

dispatch!(dispatch_softmax, softmax_row, (x: &[f32], mask: Option<&[f32]>, scale: f32, out: &mut [f32]));
dispatch!(dispatch_layer_norm, layer_norm_row, (x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]));
dispatch!(dispatch_quick_gelu, quick_gelu_row, (x: &[f32], out: &mut [f32]));

/// A vector of f32 lanes with the operations the kernels need.
///
/// The methods are `unsafe`: they may only run on a CPU with the implementing type's target features, and
/// pointers must be valid for `LANES` elements.
trait Simd: Copy {
    const LANES: usize;
    unsafe fn splat(v: f32) -> Self;
    unsafe fn load(src: *const f32) -> Self;
    unsafe fn store(self, dst: *mut f32);
    unsafe fn add(self, rhs: Self) -> Self;
    unsafe fn sub(self, rhs: Self) -> Self;
    unsafe fn mul(self, rhs: Self) -> Self;
    unsafe fn div(self, rhs: Self) -> Self;
    /// `self * b + c` with one rounding.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// Lane-wise max; a NaN in `rhs` propagates.
    unsafe fn max(self, rhs: Self) -> Self;
    /// Lane-wise min; a NaN in `rhs` propagates.
    unsafe fn min(self, rhs: Self) -> Self;
    /// Round to the nearest integer, ties to even.
    unsafe fn round(self) -> Self;
    /// `self * 2^n` for integral `n` in `[-150, 128]` (the product may over- or underflow).
    unsafe fn mul_pow2(self, n: Self) -> Self;
    unsafe fn sum(self) -> f32;
    unsafe fn max_lane(self) -> f32;
    /// `e^self`.
    unsafe fn exp(self) -> Self;

    /// Loads `src` (at most `LANES` long) with the other lanes set to `fill`.
    #[inline(always)]
    unsafe fn load_partial(src: &[f32], fill: f32) -> Self {
        let mut buf = [fill; 16];
        buf[..src.len()].copy_from_slice(src);
        Self::load(buf.as_ptr())
    }

    /// Stores the first `dst.len()` (at most `LANES`) lanes.
    #[inline(always)]
    unsafe fn store_partial(self, dst: &mut [f32]) {
        let mut buf = [0f32; 16];
        self.store(buf.as_mut_ptr());
        let n = dst.len();
        dst.copy_from_slice(&buf[..n]);
    }
}

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split so that `n * LN2_HI` is exact for the `n` that occur (Cephes).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this `e^x` rounds to zero in f32; above the upper bound it overflows to infinity.
const EXP_LO: f32 = -104.0;
const EXP_HI: f32 = 88.8;

/// `e^x` by range reduction `x = n ln2 + r`, `|r| <= ln2 / 2`, and Cephes' degree-6 polynomial for `e^r`
/// (about 1 ulp); `-inf` gives 0, `+inf` gives `+inf`, NaN stays NaN.
#[inline(always)]
unsafe fn exp_poly<S: Simd>(x: S) -> S {
    let x = S::splat(EXP_HI).min(S::splat(EXP_LO).max(x));
    let n = x.mul(S::splat(LOG2_E)).round();
    let r = n.mul_add(S::splat(-LN2_HI), x);
    let r = n.mul_add(S::splat(-LN2_LO), r);
    let mut p = S::splat(1.987_569_1e-4);
    p = p.mul_add(r, S::splat(1.398_199_9e-3));
    p = p.mul_add(r, S::splat(8.333_452e-3));
    p = p.mul_add(r, S::splat(4.166_579_6e-2));
    p = p.mul_add(r, S::splat(1.666_666_5e-1));
    p = p.mul_add(r, S::splat(0.5));
    let e_r = p.mul_add(r.mul(r), r).add(S::splat(1.0));
    e_r.mul_pow2(n)
}

/// `softmax(x * scale + mask)` of one row into `out`.
#[inline(always)]
unsafe fn softmax_row<S: Simd>(x: &[f32], mask: Option<&[f32]>, scale: f32, out: &mut [f32]) {
    let n = x.len();
    let body = n - n % S::LANES;
    // Pass 1: scaled (and masked) scores into `out`, and their max. Multiply then add, like the composite.
    let mut vmax = S::splat(f32::NEG_INFINITY);
    let vscale = S::splat(scale);
    for i in (0..body).step_by(S::LANES) {
        let mut s = S::load(x.as_ptr().add(i)).mul(vscale);
        if let Some(m) = mask {
            s = s.add(S::load(m.as_ptr().add(i)));
        }
        s.store(out.as_mut_ptr().add(i));
        vmax = s.max(vmax);
    }
    let mut max = vmax.max_lane();
    for i in body..n {
        let s = x[i] * scale + mask.map_or(0.0, |m| m[i]);
        out[i] = s;
        max = max.max(s);
    }
    if max == f32::NEG_INFINITY {
        // Fully masked: the composite computes `-inf - -inf` and returns NaN.
        out.fill(f32::NAN);
        return;
    }
    // Pass 2: exponentials and their sum; padded lanes are -inf and contribute 0.
    let vmax = S::splat(max);
    let mut vsum = S::splat(0.0);
    for i in (0..body).step_by(S::LANES) {
        let e = S::load(out.as_ptr().add(i)).sub(vmax).exp();
        e.store(out.as_mut_ptr().add(i));
        vsum = vsum.add(e);
    }
    if body < n {
        let e = S::load_partial(&out[body..], f32::NEG_INFINITY)
            .sub(vmax)
            .exp();
        e.store_partial(&mut out[body..]);
        vsum = vsum.add(e);
    }
    // Pass 3: normalise.
    let inv = 1.0 / vsum.sum();
    let vinv = S::splat(inv);
    for i in (0..body).step_by(S::LANES) {
        S::load(out.as_ptr().add(i))
            .mul(vinv)
            .store(out.as_mut_ptr().add(i));
    }
    for v in &mut out[body..] {
        *v *= inv;
    }
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` of one row into `out`, the last step in the composite's order.
#[inline(always)]
unsafe fn layer_norm_row<S: Simd>(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    let n = x.len();
    let body = n - n % S::LANES;
    let mut vsum = S::splat(0.0);
    for i in (0..body).step_by(S::LANES) {
        vsum = vsum.add(S::load(x.as_ptr().add(i)));
    }
    let rough_mean = (vsum.sum() + x[body..].iter().sum::<f32>()) / n as f32;
    // Corrected two-pass (Chan, Golub & LeVeque): sums of `x - rough_mean` fix the mean's rounding error,
    // which the plain f32 sum of a row with a large offset would carry into every output.
    let vrough = S::splat(rough_mean);
    let (mut vdev, mut vsq) = (S::splat(0.0), S::splat(0.0));
    for i in (0..body).step_by(S::LANES) {
        let c = S::load(x.as_ptr().add(i)).sub(vrough);
        vdev = vdev.add(c);
        vsq = c.mul_add(c, vsq);
    }
    let (mut dev, mut sq) = (vdev.sum(), vsq.sum());
    for v in &x[body..] {
        let c = v - rough_mean;
        dev += c;
        sq += c * c;
    }
    let shift = dev / n as f32;
    let mean = rough_mean + shift;
    let var = (sq / n as f32 - shift * shift).max(0.0);
    let std = (var + eps).sqrt();
    let vmean = S::splat(mean);
    let vstd = S::splat(std);
    for i in (0..body).step_by(S::LANES) {
        let normed = S::load(x.as_ptr().add(i)).sub(vmean).div(vstd);
        normed
            .mul(S::load(weight.as_ptr().add(i)))
            .add(S::load(bias.as_ptr().add(i)))
            .store(out.as_mut_ptr().add(i));
    }
    for i in body..n {
        out[i] = (x[i] - mean) / std * weight[i] + bias[i];
    }
}

/// `x * (1 / (e^(-1.702 x) + 1))` elementwise, in the composite's order.
#[inline(always)]
unsafe fn quick_gelu_row<S: Simd>(x: &[f32], out: &mut [f32]) {
    #[inline(always)]
    unsafe fn gelu<S: Simd>(x: S) -> S {
        let gate = S::splat(1.0).div(x.mul(S::splat(-1.702)).exp().add(S::splat(1.0)));
        x.mul(gate)
    }
    let n = x.len();
    let body = n - n % S::LANES;
    for i in (0..body).step_by(S::LANES) {
        gelu(S::load(x.as_ptr().add(i))).store(out.as_mut_ptr().add(i));
    }
    if body < n {
        gelu(S::load_partial(&x[body..], 0.0)).store_partial(&mut out[body..]);
    }
}

/// One lane: the portable fallback (and the reference for the exp polynomial's test).
impl Simd for f32 {
    const LANES: usize = 1;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        v
    }
    #[inline(always)]
    unsafe fn load(src: *const f32) -> Self {
        *src
    }
    #[inline(always)]
    unsafe fn store(self, dst: *mut f32) {
        *dst = self;
    }
    #[inline(always)]
    unsafe fn add(self, rhs: Self) -> Self {
        self + rhs
    }
    #[inline(always)]
    unsafe fn sub(self, rhs: Self) -> Self {
        self - rhs
    }
    #[inline(always)]
    unsafe fn mul(self, rhs: Self) -> Self {
        self * rhs
    }
    #[inline(always)]
    unsafe fn div(self, rhs: Self) -> Self {
        self / rhs
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        f32::mul_add(self, b, c)
    }
    #[inline(always)]
    unsafe fn max(self, rhs: Self) -> Self {
        if self.is_nan() || rhs.is_nan() {
            rhs
        } else {
            f32::max(self, rhs)
        }
    }
    #[inline(always)]
    unsafe fn min(self, rhs: Self) -> Self {
        if self.is_nan() || rhs.is_nan() {
            rhs
        } else {
            f32::min(self, rhs)
        }
    }
    #[inline(always)]
    unsafe fn round(self) -> Self {
        self.round_ties_even()
    }
    #[inline(always)]
    unsafe fn mul_pow2(self, n: Self) -> Self {
        let n = n as i32;
        let half = n >> 1;
        let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
        self * pow2(n - half) * pow2(half)
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn max_lane(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        f32::exp(self)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{exp_poly, Simd};

    /// `2^k` for integers `k` in `[-126, 127]`, built in the exponent field.
    #[inline(always)]
    unsafe fn pow2_16(k: __m512i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
            k,
            _mm512_set1_epi32(127),
        )))
    }

    /// `2^k` for integers `k` in `[-126, 127]`, built in the exponent field.
    #[inline(always)]
    unsafe fn pow2_8(k: __m256i) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            k,
            _mm256_set1_epi32(127),
        )))
    }

    /// 16 lanes of AVX-512F.
    #[derive(Clone, Copy)]
    pub(super) struct F32x16(__m512);

    /// 8 lanes of AVX2 with FMA.
    #[derive(Clone, Copy)]
    pub(super) struct F32x8(__m256);

    impl Simd for F32x16 {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            Self(_mm512_set1_ps(v))
        }
        #[inline(always)]
        unsafe fn load(src: *const f32) -> Self {
            Self(_mm512_loadu_ps(src))
        }
        #[inline(always)]
        unsafe fn store(self, dst: *mut f32) {
            _mm512_storeu_ps(dst, self.0)
        }
        #[inline(always)]
        unsafe fn add(self, rhs: Self) -> Self {
            Self(_mm512_add_ps(self.0, rhs.0))
        }
        #[inline(always)]
        unsafe fn sub(self, rhs: Self) -> Self {
            Self(_mm512_sub_ps(self.0, rhs.0))
        }
        #[inline(always)]
        unsafe fn mul(self, rhs: Self) -> Self {
            Self(_mm512_mul_ps(self.0, rhs.0))
        }
        #[inline(always)]
        unsafe fn div(self, rhs: Self) -> Self {
            Self(_mm512_div_ps(self.0, rhs.0))
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            Self(_mm512_fmadd_ps(self.0, b.0, c.0))
        }
        #[inline(always)]
        unsafe fn max(self, rhs: Self) -> Self {
            Self(_mm512_max_ps(self.0, rhs.0))
        }
        #[inline(always)]
        unsafe fn min(self, rhs: Self) -> Self {
            Self(_mm512_min_ps(self.0, rhs.0))
        }
        #[inline(always)]
        unsafe fn round(self) -> Self {
            Self(_mm512_roundscale_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(self.0))
        }
        #[inline(always)]
        unsafe fn mul_pow2(self, n: Self) -> Self {
            // 2^n as 2^(n - n/2) * 2^(n/2): both factors stay normal over the whole range.
            let n = _mm512_cvtps_epi32(n.0);
            let half = _mm512_srai_epi32::<1>(n);
            let rest = _mm512_sub_epi32(n, half);
            Self(_mm512_mul_ps(
                _mm512_mul_ps(self.0, pow2_16(rest)),
                pow2_16(half),
            ))
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            _mm512_reduce_add_ps(self.0)
        }
        #[inline(always)]
        unsafe fn max_lane(self) -> f32 {
            _mm512_reduce_max_ps(self.0)
        }
        #[inline(always)]
        unsafe fn exp(self) -> Self {
            exp_poly(self)
        }
    }

    impl Simd for F32x8 {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            Self(_mm256_set1_ps(v))
        }
        #[inline(always)]
        unsafe fn load(src: *const f32) -> Self {
            Self(_mm256_loadu_ps(src))
        }
        #[inline(always)]
        unsafe fn store(self, dst: *mut f32) {
            _mm256_storeu_ps(dst, self.0)
        }
        #[inline(always)]
        unsafe fn add(self, rhs: Self) -> Self {
            Self(_mm256_add_ps(self.0, rhs.0))
        }
        #[inline(always)]
        unsafe fn sub(self, rhs: Self) -> Self {
            Self(_mm256_sub_ps(self.0, rhs.0))
        }
        #[inline(always)]
        unsafe fn mul(self, rhs: Self) -> Self {
            Self(_mm256_mul_ps(self.0, rhs.0))
        }
        #[inline(always)]
        unsafe fn div(self, rhs: Self) -> Self {
            Self(_mm256_div_ps(self.0, rhs.0))
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            Self(_mm256_fmadd_ps(self.0, b.0, c.0))
        }
        #[inline(always)]
        unsafe fn max(self, rhs: Self) -> Self {
            Self(_mm256_max_ps(self.0, rhs.0))
        }
        #[inline(always)]
        unsafe fn min(self, rhs: Self) -> Self {
            Self(_mm256_min_ps(self.0, rhs.0))
        }
        #[inline(always)]
        unsafe fn round(self) -> Self {
            Self(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(self.0))
        }
        #[inline(always)]
        unsafe fn mul_pow2(self, n: Self) -> Self {
            let n = _mm256_cvtps_epi32(n.0);
            let half = _mm256_srai_epi32::<1>(n);
            let rest = _mm256_sub_epi32(n, half);
            Self(_mm256_mul_ps(
                _mm256_mul_ps(self.0, pow2_8(rest)),
                pow2_8(half),
            ))
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let pair = _mm_add_ps(
                _mm256_castps256_ps128(self.0),
                _mm256_extractf128_ps::<1>(self.0),
            );
            let pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
            _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
        }
        #[inline(always)]
        unsafe fn max_lane(self) -> f32 {
            let pair = _mm_max_ps(
                _mm256_castps256_ps128(self.0),
                _mm256_extractf128_ps::<1>(self.0),
            );
            let pair = _mm_max_ps(pair, _mm_movehl_ps(pair, pair));
            _mm_cvtss_f32(_mm_max_ss(pair, _mm_movehdup_ps(pair)))
        }
        #[inline(always)]
        unsafe fn exp(self) -> Self {
            exp_poly(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{attention_softmax_composite, quick_gelu_composite, LayerNorm};
    use candle_core::DType;
    use candle_core::{Device, Var};
    use candle_nn::VarBuilder;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Every instruction set this CPU can run, the scalar fallback included.
    fn isas() -> Vec<Isa> {
        let mut all = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                all.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                all.push(Isa::Avx512);
            }
        }
        all
    }

    fn random(rng: &mut ChaCha8Rng, dims: &[usize], scale: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect();
        Tensor::from_vec(data, dims, &Device::Cpu).expect("tensor")
    }

    /// Max of `|a - b| / max(1, |b|)`; NaN must sit at the same places in both.
    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a: Vec<f32> = a.flatten_all().and_then(|t| t.to_vec1()).expect("a");
        let b: Vec<f32> = b.flatten_all().and_then(|t| t.to_vec1()).expect("b");
        a.iter().zip(&b).fold(0f32, |worst, (x, y)| {
            assert_eq!(x.is_nan(), y.is_nan(), "NaN mismatch: {x} vs {y}");
            if x.is_nan() || x == y {
                worst
            } else {
                worst.max((x - y).abs() / y.abs().max(1.0))
            }
        })
    }

    /// Additive mask `[rows, cols]` with scattered -inf, and row `full_row` (if any) fully masked.
    fn mask(rows: usize, cols: usize, full_row: Option<usize>) -> Tensor {
        let data: Vec<f32> = (0..rows)
            .flat_map(|r| {
                (0..cols).map(move |c| {
                    if Some(r) == full_row || (c > 0 && (r + 2 * c) % 3 == 0) {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("mask")
    }

    #[test]
    fn exp_poly_is_within_two_ulp() {
        let mut worst_ulp = 0u32;
        let mut x = -103.0f32;
        while x < 88.7 {
            // SAFETY: the scalar `Simd` needs no CPU feature.
            let got = unsafe { exp_poly::<f32>(x) };
            let want = (x as f64).exp() as f32;
            if want > f32::MIN_POSITIVE {
                worst_ulp = worst_ulp.max(got.to_bits().abs_diff(want.to_bits()));
            } else {
                assert!(
                    (got - want).abs() <= 2.0 * f32::from_bits(1),
                    "{x}: {got} vs {want}"
                );
            }
            x += 0.000_37;
        }
        eprintln!("exp_poly: worst {worst_ulp} ulp over [-103, 88.7]");
        assert!(worst_ulp <= 2, "exp_poly off by {worst_ulp} ulp");
        // SAFETY: as above.
        let special = unsafe {
            [
                exp_poly::<f32>(f32::NEG_INFINITY),
                exp_poly::<f32>(f32::INFINITY),
                exp_poly::<f32>(89.0),
                exp_poly::<f32>(-200.0),
            ]
        };
        assert_eq!(special, [0.0, f32::INFINITY, f32::INFINITY, 0.0]);
    }

    #[test]
    fn softmax_matches_composite() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let dev = Device::Cpu;
        let padding = Tensor::from_vec(
            vec![0f32, 0., 0., f32::NEG_INFINITY, 0., 0., 0., 0.],
            (2, 1, 1, 4),
            &dev,
        )?;
        let cases: Vec<(&str, Tensor, f64, Option<Tensor>)> = vec![
            (
                "vit [1,12,197,197]",
                random(&mut rng, &[1, 12, 197, 197], 8.0),
                0.125,
                None,
            ),
            (
                "causal [2,8,16,16]",
                random(&mut rng, &[2, 8, 16, 16], 8.0),
                0.125,
                Some(crate::nn::causal_mask(16, &dev)?),
            ),
            (
                "cloze+full row [2,3,27,33]",
                random(&mut rng, &[2, 3, 27, 33], 8.0),
                0.3,
                Some(mask(27, 33, Some(5))),
            ),
            (
                "per-batch [2,1,26,33]",
                random(&mut rng, &[2, 4, 26, 33], 8.0),
                0.3,
                Some(mask(52, 33, None).reshape((2, 1, 26, 33))?),
            ),
            (
                "padding [2,1,1,4]",
                random(&mut rng, &[2, 2, 3, 4], 8.0),
                1.0,
                Some(padding),
            ),
            (
                "rows of one [3,5,1]",
                random(&mut rng, &[3, 5, 1], 8.0),
                1.0,
                None,
            ),
            ("large [4,37]", random(&mut rng, &[4, 37], 3e4), 1.0, None),
            ("rank 1 [19]", random(&mut rng, &[19], 4.0), 1.0, None),
        ];
        for isa in isas() {
            for (name, x, scale, m) in &cases {
                let want = attention_softmax_composite(x, *scale, m.as_ref())?;
                let got =
                    softmax_with(x, *scale as f32, m.as_ref(), isa)?.expect("fused path taken");
                let diff = max_rel_diff(&got, &want);
                eprintln!("softmax {isa:?} {name}: max abs diff {diff:.2e}");
                assert!(diff < 1e-6, "softmax {isa:?} {name}: {diff:.2e}");
            }
        }
        Ok(())
    }

    #[test]
    fn layer_norm_matches_composite() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let cases = [
            ("vit [197,768]", vec![197, 768], 1.0, 0.0),
            ("odd [3,5,17]", vec![3, 5, 17], 1.0, 0.0),
            ("width one [4,1]", vec![4, 1], 1.0, 0.0),
            ("offset [2,26,512]", vec![2, 26, 512], 30.0, 100.0),
        ];
        for isa in isas() {
            for (name, dims, scale, offset) in &cases {
                let width = dims[dims.len() - 1];
                let x = (random(&mut rng, dims, *scale) + *offset)?;
                let weight = (random(&mut rng, &[width], 0.5) + 1.0)?;
                let bias = random(&mut rng, &[width], 0.5);
                let ln = LayerNorm::new(
                    width,
                    VarBuilder::from_tensors(
                        [
                            ("weight".to_string(), weight.clone()),
                            ("bias".to_string(), bias.clone()),
                        ]
                        .into(),
                        DType::F32,
                        &Device::Cpu,
                    ),
                )?;
                let want = ln.forward_composite(&x)?;
                let got =
                    layer_norm_with(&x, &weight, &bias, 1e-5, isa)?.expect("fused path taken");
                let diff = max_rel_diff(&got, &want);
                // With a large mean both f32 paths round the mean differently: judge them against f64.
                let exact = ln
                    .forward_composite(&x.to_dtype(DType::F64)?)?
                    .to_dtype(DType::F32)?;
                let (fused_err, composite_err) =
                    (max_rel_diff(&got, &exact), max_rel_diff(&want, &exact));
                eprintln!(
                    "layer norm {isa:?} {name}: max rel diff {diff:.2e} (vs f64: fused {fused_err:.2e}, composite {composite_err:.2e})"
                );
                assert!(
                    diff < 2e-6 || fused_err <= 1.5 * composite_err,
                    "layer norm {isa:?} {name}: {diff:.2e}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn quick_gelu_matches_composite() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let cases = [
            ("mlp [197,3072]", vec![197, 3072], 4.0),
            ("odd [7,19]", vec![7, 19], 4.0),
            ("one [1]", vec![1], 4.0),
            ("large [33]", vec![33], 120.0),
            ("parallel blocks [5,16411]", vec![5, 16411], 8.0),
        ];
        for isa in isas() {
            for (name, dims, scale) in &cases {
                let x = random(&mut rng, dims, *scale);
                let want = quick_gelu_composite(&x)?;
                let got = quick_gelu_with(&x, isa)?.expect("fused path taken");
                let diff = max_rel_diff(&got, &want);
                eprintln!("quick_gelu {isa:?} {name}: max rel diff {diff:.2e}");
                assert!(diff < 1e-6, "quick_gelu {isa:?} {name}: {diff:.2e}");
            }
        }
        Ok(())
    }

    #[test]
    fn declines_what_it_cannot_serve() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.1f32, 0.7, -0.3], [1.0, 2.0, 3.0]], &dev)?;
        let var = Var::from_tensor(&x)?;
        assert!(
            softmax_last_dim(var.as_tensor(), 1.0, None)?.is_none(),
            "Var input"
        );
        let derived = (var.as_tensor() * 2.0)?;
        assert!(quick_gelu(&derived)?.is_none(), "input computed from a Var");
        assert!(quick_gelu(&x.to_dtype(DType::F64)?)?.is_none(), "f64 input");
        assert!(
            softmax_last_dim(&x.t()?, 1.0, None)?.is_none(),
            "strided input"
        );
        let w = Var::from_tensor(&Tensor::ones(3, DType::F32, &dev)?)?;
        let b = Tensor::zeros(3, DType::F32, &dev)?;
        assert!(
            layer_norm(&x, w.as_tensor(), &b, 1e-5)?.is_none(),
            "Var weight"
        );
        assert!(
            softmax_last_dim(&x, 1.0, None)?.is_some(),
            "plain f32 input"
        );
        Ok(())
    }

    /// Composite vs fused wall time on B/16 shapes (`cargo test --lib fused_timing -- --ignored --nocapture`).
    /// Alternates the two and keeps each one's best, so a busy machine disturbs the ratio less.
    #[test]
    #[ignore = "timing, not a check"]
    fn fused_timing() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        let scores = random(&mut rng, &[1, 12, 197, 197], 8.0);
        let x = random(&mut rng, &[1, 197, 768], 2.0);
        let hidden = random(&mut rng, &[1, 197, 3072], 2.0);
        let causal = crate::nn::causal_mask(197, &Device::Cpu)?;
        let weight = (random(&mut rng, &[768], 0.5) + 1.0)?;
        let bias = random(&mut rng, &[768], 0.5);
        let ln = LayerNorm::new(
            768,
            VarBuilder::from_tensors(
                [
                    ("weight".to_string(), weight.clone()),
                    ("bias".to_string(), bias.clone()),
                ]
                .into(),
                DType::F32,
                &Device::Cpu,
            ),
        )?;
        type Run<'a> = Box<dyn Fn() -> Result<Tensor> + 'a>;
        let cases: Vec<(&str, Run, Run)> = vec![
            (
                "softmax*scale [1,12,197,197]",
                Box::new(|| attention_softmax_composite(&scores, 0.125, None)),
                Box::new(|| Ok(softmax_last_dim(&scores, 0.125, None)?.expect("fused"))),
            ),
            (
                "softmax*scale+causal [1,12,197,197]",
                Box::new(|| attention_softmax_composite(&scores, 0.125, Some(&causal))),
                Box::new(|| Ok(softmax_last_dim(&scores, 0.125, Some(&causal))?.expect("fused"))),
            ),
            (
                "layer norm [197,768]",
                Box::new(|| ln.forward_composite(&x)),
                Box::new(|| Ok(layer_norm(&x, &weight, &bias, 1e-5)?.expect("fused"))),
            ),
            (
                "quick_gelu [197,3072]",
                Box::new(|| quick_gelu_composite(&hidden)),
                Box::new(|| Ok(quick_gelu(&hidden)?.expect("fused"))),
            ),
        ];
        for (name, composite, fused) in &cases {
            let time = |f: &Run| -> Result<f64> {
                let start = std::time::Instant::now();
                for _ in 0..10 {
                    f()?;
                }
                Ok(start.elapsed().as_secs_f64() / 10.0)
            };
            let (mut best_c, mut best_f) = (f64::MAX, f64::MAX);
            for _ in 0..15 {
                best_c = best_c.min(time(composite)?);
                best_f = best_f.min(time(fused)?);
            }
            eprintln!(
                "{name}: composite {:.3} ms, fused {:.3} ms, speed-up {:.1}x",
                best_c * 1e3,
                best_f * 1e3,
                best_c / best_f
            );
        }
        Ok(())
    }
}
