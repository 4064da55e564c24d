//! bf16 linear layers for training: the forward product and the input's gradient `G W` on the AVX512-BF16
//! kernel of [`super::packed`], with f32 master weights, f32 accumulation, and f32 weight and bias
//! gradients (see [`super::fused_grad::linear_backward`] for why the weight's is not a bf16 product). The weight is
//! re-packed from the f32 master on every call, so an optimizer step is seen by the next forward.
//!
//! Only CPUs with AVX512-BF16 take this path ([`linear`] answers `None` elsewhere): emulated bf16 is slower
//! than f32, so training there stays in f32.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::fused_grad::{args_output, linear_backward, trainable, LinearArgs};
use super::packed::{native_supported, PackedLinear};

/// `x [.., K] W^T + b` with `w [N, K]`, `b [N]`, differentiable in all three; `None` when the CPU lacks
/// AVX512-BF16 or a tensor is not f32 on the CPU (the caller keeps its f32 path). Any leading dims are rows:
/// one graph node instead of a reshape on each side, each of which cost a full copy of its gradient.
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    if !native_supported() || !trainable(&[x, w, b]) {
        return Ok(None);
    }
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Bf16Linear)
        .map(Some)
}

struct Bf16Linear;

impl CustomOp3 for Bf16Linear {
    fn name(&self) -> &'static str {
        "bf16-train-linear"
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
        let packed = PackedLinear::from_rows(w, n, k, PackedLinear::padded_bias(b, n));
        let mut out = vec![0f32; m * n];
        packed.run(x, m, &mut out, true);
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
        linear_backward(x, w, b, grad, true)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// The products of bf16-rounded operands in f64: what the kernel computes up to f32 summation order.
    fn round(t: &Tensor) -> Tensor {
        t.to_dtype(candle_core::DType::BF16)
            .and_then(|t| t.to_dtype(candle_core::DType::F64))
            .expect("round")
    }

    #[test]
    fn forward_and_gradients_are_the_bf16_products() -> Result<()> {
        if !native_supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return Ok(());
        }
        let dev = Device::Cpu;
        // Odd sizes: partial panels, odd input counts (padded pairs), more than one row chunk; a leading
        // batch dim, as the decoders pass.
        let (m, k, n) = (301, 67, 45);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (7, m / 7, k), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.2, (n, k), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., n, &dev)?)?;
        let upstream = Tensor::randn(0f32, 1., (7, m / 7, n), &dev)?;
        let y = linear(x.as_tensor(), w.as_tensor(), b.as_tensor())?.expect("native path");
        assert_eq!(y.dims(), [7, m / 7, n]);
        let grads = (&y * &upstream)?.sum_all()?.backward()?;
        assert_eq!(grads.get(&x).expect("dx").dims(), x.dims());

        let rows = |t: &Tensor| t.reshape((m, t.dim(2)?));
        let (x2, up2) = (rows(&x)?, rows(&upstream)?);
        let (x64, w64, g64) = (round(&x2), round(&w), round(&up2));
        let b64 = b.to_dtype(candle_core::DType::F64)?;
        let want_y = x64.matmul(&w64.t()?)?.broadcast_add(&b64)?;
        let want_dx = g64.matmul(&w64)?;
        // The weight's gradient is an f32 product of the unrounded operands.
        let want_dw = up2
            .to_dtype(candle_core::DType::F64)?
            .t()?
            .matmul(&x2.to_dtype(candle_core::DType::F64)?)?;
        let want_db = up2.to_dtype(candle_core::DType::F64)?.sum(0)?;
        let check = |name: &str, got: &Tensor, want: &Tensor| -> Result<()> {
            let got = got.to_dtype(candle_core::DType::F64)?;
            let scale = want.abs()?.max_keepdim(0)?.max_keepdim(0)?.flatten_all()?;
            let scale = scale.to_vec1::<f64>()?[0].max(1.0);
            let err = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()?;
            assert!(
                err / scale < 1e-5,
                "{name}: max error {err} at scale {scale}"
            );
            Ok(())
        };
        check("y", &rows(&y)?, &want_y)?;
        check("dx", &rows(grads.get(&x).expect("dx"))?, &want_dx)?;
        check("dw", grads.get(&w).expect("dw"), &want_dw)?;
        check("db", grads.get(&b).expect("db"), &want_db)?;
        Ok(())
    }
}
