//! What the fused kernels ([`super::fused`]), their backward passes ([`super::fused_grad`]) and the packed
//! linear layers ([`super::packed`]) share: row-parallel iteration and access to contiguous f32 storage. It
//! sits below all three, so none has to import another's internals.

use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Elements below which a kernel stays on the calling thread, and the least work per rayon task.
pub(super) const PARALLEL_GRAIN: usize = 16 * 1024;

/// Runs `row(i, out_row)` for every row of `out`, in parallel when there is enough work.
pub(super) fn for_each_row(out: &mut [f32], width: usize, row: impl Fn(usize, &mut [f32]) + Sync) {
    if width == 0 {
        return;
    }
    if out.len() < PARALLEL_GRAIN {
        out.chunks_mut(width)
            .enumerate()
            .for_each(|(i, r)| row(i, r));
    } else {
        out.par_chunks_mut(width)
            .enumerate()
            .with_min_len(PARALLEL_GRAIN.div_ceil(width))
            .for_each(|(i, r)| row(i, r));
    }
}

/// The contiguous f32 data of a storage under `layout`.
pub(super) fn contiguous<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected f32 input");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: expected a contiguous input");
    };
    Ok(&data[start..end])
}

/// An output pointer handed to rayon tasks that each write their own disjoint block.
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);
// SAFETY: only used to hand disjoint output blocks to rayon tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor, read in place.
pub(super) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: expected a CPU tensor");
    };
    f(contiguous(cpu, layout, op)?)
}

/// Whether clip4str's kernels may use AVX-512 at all: `CLIP4STR_NO_AVX512=1` makes an AVX-512 CPU run the
/// AVX2 paths (to measure, on one machine, what a CPU without AVX-512 gets).
pub(crate) fn avx512_allowed() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var_os("CLIP4STR_NO_AVX512").is_none_or(|v| v != "1"))
}

/// The one gate of every kernel: all inputs are f32 CPU tensors outside any autograd graph.
///
/// `track_op` is true for `Var`s and everything computed from them, so training never gets here.
pub(crate) fn inference_only(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| !t.track_op() && t.dtype() == DType::F32 && t.device().is_cpu())
}
