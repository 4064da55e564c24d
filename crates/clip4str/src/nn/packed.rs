//! Linear layers for inference with weights packed once into column panels, in f32 or bf16.
//!
//! f32: candle's GEMM re-packs the weight on every call, which dominates when few rows go through a layer
//! (decoding steps, the 16-token text encoder); the pre-packed kernel (AVX-512, or AVX2 with FMA) streams
//! the weight once. Training uses it too, for the forward product and the input's gradient. CPUs without
//! either keep candle's path.
//!
//! bf16: weights and activations rounded to bfloat16, products accumulated in f32 (what
//! `torch.autocast(bfloat16)` does for `nn.Linear` on CPU). candle's CPU backend widens bf16 to f32 before
//! multiplying, which gains nothing; here AVX512-BF16 `vdpbf16ps` does two multiply-adds per lane and
//! instruction, picked at run time. CPUs without AVX512-BF16 get a portable kernel with the same rounding,
//! much slower than f32: there bf16 mode is for checking, not for speed.
//!
//! Which of the two a layer uses is its [`super::Mode`], so two models of one process can use different
//! precisions. Like the fused kernels, the path only takes f32 CPU tensors outside any autograd graph;
//! training never reaches it.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::rows::{avx512_allowed, inference_only, SendPtr};

/// Output columns of one packed panel: two 16-lane f32 accumulators per row.
const PANEL: usize = 32;
/// Rows of one micro-tile.
const ROWS: usize = 8;
/// Rows handed to one rayon task (a slice of activations that stays in L2 while its panels stream by).
const ROW_CHUNK: usize = 128;

/// The instructions of the packed f32 kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Kernel {
    /// 8 rows x 32 columns per micro-tile in 16 zmm accumulators.
    Avx512,
    /// 6 rows x 16 columns per micro-tile in 12 ymm accumulators (each panel in two halves).
    Avx2,
}

impl F32Kernel {
    /// Rows of one micro-tile.
    fn rows(self) -> usize {
        match self {
            F32Kernel::Avx512 => ROWS,
            F32Kernel::Avx2 => 6,
        }
    }

    /// The instruction set's name.
    pub fn name(self) -> &'static str {
        match self {
            F32Kernel::Avx512 => "AVX-512",
            F32Kernel::Avx2 => "AVX2",
        }
    }
}

/// The packed f32 kernel this CPU runs: AVX-512F, else AVX2 with FMA; `None` elsewhere (candle's matmul).
pub fn f32_kernel() -> Option<F32Kernel> {
    static KERNEL: OnceLock<Option<F32Kernel>> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if avx512_allowed() && is_x86_feature_detected!("avx512f") {
                return Some(F32Kernel::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Some(F32Kernel::Avx2);
            }
        }
        None
    })
}

/// Whether this CPU runs the packed f32 kernel ([`f32_kernel`]).
pub fn f32_supported() -> bool {
    f32_kernel().is_some()
}

/// Whether this CPU has AVX-512F (and clip4str may use it).
fn avx512f() -> bool {
    f32_kernel() == Some(F32Kernel::Avx512)
}

/// Whether this CPU has the AVX512-BF16 instructions the fast bf16 kernel needs. `CLIP4STR_NO_AVX512_BF16=1`
/// says no on any CPU: the portable kernel then runs, as on a CPU without them (to compare the two, or to see
/// what such a CPU does).
pub fn native_supported() -> bool {
    static NATIVE: OnceLock<bool> = OnceLock::new();
    *NATIVE.get_or_init(|| {
        if std::env::var_os("CLIP4STR_NO_AVX512_BF16").is_some_and(|v| v == "1") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            avx512f() && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// f32 to bf16 bits, rounding to nearest even (NaN stays NaN), like `vcvtneps2bf16` and torch.
pub fn to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounding = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

fn from_bf16_bits(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// The weight as f32 rows `[N][K]` and the bias zero-padded to whole panels (zeros without a bias).
fn weight_and_bias(
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(usize, usize, Vec<f32>, Vec<f32>)> {
    let (n, k) = weight.dims2()?;
    let w: Vec<f32> = weight
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let mut padded = vec![0f32; n.div_ceil(PANEL) * PANEL];
    if let Some(b) = bias {
        let b: Vec<f32> = b.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        if b.len() != n {
            candle_core::bail!(
                "packed linear: bias has {} entries, the weight {n} rows",
                b.len()
            );
        }
        padded[..n].copy_from_slice(&b);
    }
    Ok((n, k, w, padded))
}

/// Applies the packed product `op` to `x [.., K]` as `[rows, K]` and restores the leading dims with `n`
/// features; `None` when `x` is not an f32 CPU tensor outside an autograd graph.
fn forward_rows(x: &Tensor, k: usize, n: usize, op: &impl CustomOp1) -> Result<Option<Tensor>> {
    if !inference_only(&[x]) {
        return Ok(None);
    }
    let dims = x.dims();
    if dims.last() != Some(&k) {
        candle_core::bail!(
            "packed linear: input has {:?} features, the layer takes {k}",
            dims.last()
        );
    }
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank >= 1") = n;
    let y = x.contiguous()?.reshape((rows, k))?.apply_op1_no_bwd(op)?;
    y.reshape(out_dims).map(Some)
}

/// Runs a packed product's `cpu_fwd`: `run(x [M, K], M, out [M, N])` on the op's contiguous input.
fn run_rows(
    storage: &CpuStorage,
    layout: &Layout,
    op: &str,
    n: usize,
    run: impl FnOnce(&[f32], usize, &mut [f32]),
) -> Result<(CpuStorage, Shape)> {
    let x = super::rows::contiguous(storage, layout, op)?;
    let (m, _) = layout.shape().dims2()?;
    let mut out = vec![0f32; m * n];
    run(x, m, &mut out);
    Ok((CpuStorage::F32(out), Shape::from((m, n))))
}

/// Calls `tile(row, rows, panel, cols, c)` for every micro-tile (up to `tile_rows` rows by one 32-column panel) of an
/// `[M, N]` product into `out`, where `c` points at the tile's first output; rayon tasks take row chunks x
/// panels when the product is big enough. Tiles are disjoint, so each may write its own block through `c`.
fn for_each_tile(
    (m, n, k): (usize, usize, usize),
    tile_rows: usize,
    out: &mut [f32],
    tile: impl Fn(usize, usize, usize, usize, *mut f32) + Sync,
) {
    let panels = n.div_ceil(PANEL);
    let chunks = m.div_ceil(ROW_CHUNK);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (chunk, panel) = (t / panels, t % panels);
        let last = ((chunk + 1) * ROW_CHUNK).min(m);
        let cols = (n - panel * PANEL).min(PANEL);
        let mut row = chunk * ROW_CHUNK;
        while row < last {
            let rows = (last - row).min(tile_rows);
            // SAFETY: `row < m` and `panel * PANEL < n`, so the offset lies inside `out`.
            let c = unsafe { out_ptr.get().add(row * n + panel * PANEL) };
            tile(row, rows, panel, cols, c);
            row += rows;
        }
    };
    if m * n * k >= 1 << 20 {
        (0..chunks * panels).into_par_iter().for_each(task);
    } else {
        (0..chunks * panels).for_each(task);
    }
}

/// A linear layer's weight `[N, K]` (and bias `[N]`) rounded to bf16 and laid out for the kernel: panels of
/// 32 output columns; inside a panel, for each pair of inputs `(2p, 2p+1)`, the 32 columns' two values
/// side by side (one 512-bit register). Columns and inputs past the weight's size are zeros.
pub struct PackedLinear {
    n: usize,
    k: usize,
    pairs: usize,
    data: Vec<u16>,
    bias: Vec<f32>,
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedLinear")
            .field("out", &self.n)
            .field("in", &self.k)
            .finish_non_exhaustive()
    }
}

impl PackedLinear {
    /// Packs `weight [N, K]` and the optional `bias [N]` (any float dtype).
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k, w, bias) = weight_and_bias(weight, bias)?;
        Ok(Self::from_rows(&w, n, k, bias))
    }

    /// Packs `w [N, K]` (row-major f32) with `bias` already padded to whole panels.
    pub(super) fn from_rows(w: &[f32], n: usize, k: usize, bias: Vec<f32>) -> Self {
        let pairs = k.div_ceil(2);
        let mut data = vec![0u16; n.div_ceil(PANEL) * pairs * PANEL * 2];
        for col in 0..n {
            let (panel, c) = (col / PANEL, col % PANEL);
            for (i, &v) in w[col * k..(col + 1) * k].iter().enumerate() {
                let (p, e) = (i / 2, i % 2);
                data[((panel * pairs + p) * PANEL + c) * 2 + e] = to_bf16_bits(v);
            }
        }
        Self {
            n,
            k,
            pairs,
            data,
            bias,
        }
    }

    /// A bias of `n` values zero-padded to whole panels, as [`Self::from_rows`] takes it.
    pub(super) fn padded_bias(bias: &[f32], n: usize) -> Vec<f32> {
        let mut padded = vec![0f32; n.div_ceil(PANEL) * PANEL];
        padded[..bias.len().min(n)].copy_from_slice(&bias[..bias.len().min(n)]);
        padded
    }

    /// `x W^T + b` for `x [.., K]` (f32, any rank); `None` when `x` is not an f32 CPU tensor outside an
    /// autograd graph, so the caller runs its f32 path.
    pub fn forward(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let op = Bf16Matmul {
            packed: self,
            native: native_supported(),
        };
        forward_rows(x, self.k, self.n, &op)
    }

    /// Packs the transpose of `src [rows, cols]` (row-major f32) as the weight: `[cols, rows]`, no bias.
    /// Training's input gradient multiplies by `W`, the transpose of a layer's `W^T`; reading the source row
    /// by row keeps the writes inside one panel, where packing a transposed copy would scatter them.
    pub(super) fn from_transposed(src: &[f32], rows: usize, cols: usize) -> Self {
        let (n, k) = (cols, rows);
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0u16; panels * pairs * PANEL * 2];
        let panel_len = pairs * PANEL * 2;
        let fill = |(panel, dst): (usize, &mut [u16])| {
            let c0 = panel * PANEL;
            let width = (n - c0).min(PANEL);
            for (i, row) in src.chunks_exact(cols).enumerate() {
                let (p, e) = (i / 2, i % 2);
                let out = &mut dst[p * PANEL * 2..(p + 1) * PANEL * 2];
                for (c, &v) in row[c0..c0 + width].iter().enumerate() {
                    out[c * 2 + e] = to_bf16_bits(v);
                }
            }
        };
        if rows * cols >= 64 * 1024 {
            data.par_chunks_mut(panel_len).enumerate().for_each(fill);
        } else {
            data.chunks_mut(panel_len).enumerate().for_each(fill);
        }
        Self {
            n,
            k,
            pairs,
            data,
            bias: vec![0f32; panels * PANEL],
        }
    }

    /// `x [M, K]` (row-major f32) times the packed weight into `out [M, N]`, plus bias.
    pub(super) fn run(&self, x: &[f32], m: usize, out: &mut [f32], native: bool) {
        // Activations as bf16 pairs, rows padded to an even length.
        let mut a = vec![0u16; m * self.pairs * 2];
        let width = self.pairs * 2;
        let convert = |(row, dst): (usize, &mut [u16])| {
            let src = &x[row * self.k..(row + 1) * self.k];
            convert_row(src, &mut dst[..self.k], native);
        };
        if m * self.k >= 64 * 1024 {
            a.par_chunks_mut(width).enumerate().for_each(convert);
        } else {
            a.chunks_mut(width).enumerate().for_each(convert);
        }
        let panel_len = self.pairs * PANEL * 2;
        for_each_tile(
            (m, self.n, self.k),
            ROWS,
            out,
            |row, rows, panel, cols, c| {
                let b = &self.data[panel * panel_len..(panel + 1) * panel_len];
                let bias = &self.bias[panel * PANEL..(panel + 1) * PANEL];
                let tile_a = &a[row * width..(row + rows) * width];
                // SAFETY: `c` is this tile's own block of `out` (see `for_each_tile`).
                unsafe { micro_tile(rows, tile_a, self.pairs, b, bias, c, self.n, cols, native) };
            },
        );
    }
}

fn convert_row(src: &[f32], dst: &mut [u16], native: bool) {
    #[cfg(target_arch = "x86_64")]
    if native {
        // SAFETY: AVX512-BF16 was detected.
        unsafe { convert_row_avx512(src, dst) };
        return;
    }
    let _ = native;
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = to_bf16_bits(s);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert_row_avx512(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let full = src.len() / 16 * 16;
    let mut i = 0;
    while i < full {
        let v = _mm512_loadu_ps(src.as_ptr().add(i));
        let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, h);
        i += 16;
    }
    for j in full..src.len() {
        dst[j] = to_bf16_bits(src[j]);
    }
}

/// One tile of `rows ≤ 8` rows times one panel, written to `c` (row stride `ldc`, `cols ≤ 32` columns).
///
/// # Safety
/// `c` must be valid for `rows` rows of `cols` floats at stride `ldc`.
#[allow(clippy::too_many_arguments)]
unsafe fn micro_tile(
    rows: usize,
    a: &[u16],
    pairs: usize,
    b: &[u16],
    bias: &[f32],
    c: *mut f32,
    ldc: usize,
    cols: usize,
    native: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if native {
        macro_rules! tile {
            ($($r:literal)*) => {
                match rows {
                    $($r => tile_avx512::<$r>(a, pairs, b, bias, c, ldc, cols),)*
                    _ => unreachable!("tiles have 1 to 8 rows"),
                }
            };
        }
        tile!(1 2 3 4 5 6 7 8);
        return;
    }
    let _ = native;
    tile_portable(rows, a, pairs, b, bias, c, ldc, cols);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_avx512<const R: usize>(
    a: &[u16],
    pairs: usize,
    b: &[u16],
    bias: &[f32],
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let width = pairs * 2;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let a_ptr = a.as_ptr() as *const i32;
    let b_ptr = b.as_ptr();
    for p in 0..pairs {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b_ptr.add(p * 64) as *const _));
        let b1: __m512bh =
            std::mem::transmute(_mm512_loadu_si512(b_ptr.add(p * 64 + 32) as *const _));
        for (r, acc) in acc.iter_mut().enumerate() {
            // The pair (x[r, 2p], x[r, 2p+1]) broadcast to all 16 lanes.
            let pair = _mm512_set1_epi32(*a_ptr.add(r * width / 2 + p));
            let pair: __m512bh = std::mem::transmute(pair);
            acc[0] = _mm512_dpbf16_ps(acc[0], pair, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], pair, b1);
        }
    }
    let bias0 = _mm512_loadu_ps(bias.as_ptr());
    let bias1 = _mm512_loadu_ps(bias.as_ptr().add(16));
    let (m0, m1) = column_masks(cols);
    for (r, acc) in acc.iter().enumerate() {
        let row = c.add(r * ldc);
        _mm512_mask_storeu_ps(row, m0, _mm512_add_ps(acc[0], bias0));
        _mm512_mask_storeu_ps(row.add(16), m1, _mm512_add_ps(acc[1], bias1));
    }
}

/// The same sums without AVX512-BF16: exact bf16 products, f32 accumulation pair by pair.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_portable(
    rows: usize,
    a: &[u16],
    pairs: usize,
    b: &[u16],
    bias: &[f32],
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    let width = pairs * 2;
    for r in 0..rows {
        let mut acc = [0f32; PANEL];
        let x = &a[r * width..(r + 1) * width];
        for p in 0..pairs {
            let (x0, x1) = (from_bf16_bits(x[2 * p]), from_bf16_bits(x[2 * p + 1]));
            let panel = &b[p * PANEL * 2..(p + 1) * PANEL * 2];
            for (j, acc) in acc.iter_mut().enumerate() {
                let w0 = from_bf16_bits(panel[2 * j]);
                let w1 = from_bf16_bits(panel[2 * j + 1]);
                *acc += x0 * w0 + x1 * w1;
            }
        }
        for j in 0..cols {
            *c.add(r * ldc + j) = acc[j] + bias[j];
        }
    }
}

struct Bf16Matmul<'a> {
    packed: &'a PackedLinear,
    /// AVX512-BF16 kernels (false: the portable ones).
    native: bool,
}

impl CustomOp1 for Bf16Matmul<'_> {
    fn name(&self) -> &'static str {
        "bf16-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        run_rows(storage, layout, self.name(), self.packed.n, |x, m, out| {
            self.packed.run(x, m, out, self.native);
        })
    }
}

/// A linear layer's weight `[N, K]` and bias `[N]` in f32 column panels: for each input `k`, the 32 columns'
/// values side by side (two 512-bit registers). Columns past the weight's size are zeros.
#[derive(Clone)]
pub struct PackedLinearF32 {
    n: usize,
    k: usize,
    data: Vec<f32>,
    bias: Vec<f32>,
    kernel: F32Kernel,
}

/// Where weight `[col, i]` lives in the f32 panels of a layer with `k` inputs.
fn f32_panel_index(k: usize, col: usize, i: usize) -> usize {
    ((col / PANEL) * k + i) * PANEL + col % PANEL
}

impl std::fmt::Debug for PackedLinearF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedLinearF32")
            .field("out", &self.n)
            .field("in", &self.k)
            .finish_non_exhaustive()
    }
}

impl PackedLinearF32 {
    /// Packs `weight [N, K]` and the optional `bias [N]`; `None` on CPUs without a kernel ([`f32_kernel`]).
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Self>> {
        if !f32_supported() {
            return Ok(None);
        }
        let (n, k, w, bias) = weight_and_bias(weight, bias)?;
        Ok(Self::from_rows(&w, n, k, bias))
    }

    /// Packs `w [N, K]` (row-major) with `bias` padded to whole panels ([`PackedLinear::padded_bias`]);
    /// `None` on CPUs without a kernel.
    pub(super) fn from_rows(w: &[f32], n: usize, k: usize, bias: Vec<f32>) -> Option<Self> {
        let kernel = f32_kernel()?;
        let mut data = vec![0f32; n.div_ceil(PANEL) * k * PANEL];
        for col in 0..n {
            for (i, &v) in w[col * k..(col + 1) * k].iter().enumerate() {
                data[f32_panel_index(k, col, i)] = v;
            }
        }
        Some(Self {
            n,
            k,
            data,
            bias,
            kernel,
        })
    }

    /// Packs `src [rows, cols]` read as the weight of a product with `rows` inputs and `cols` outputs (its
    /// transpose), without a bias: `G W` for a linear layer's input gradient.
    pub(super) fn from_transposed(src: &[f32], rows: usize, cols: usize) -> Option<Self> {
        let kernel = f32_kernel()?;
        let mut data = vec![0f32; cols.div_ceil(PANEL) * rows * PANEL];
        for (i, row) in src.chunks_exact(cols.max(1)).enumerate() {
            for (col, &v) in row.iter().enumerate() {
                data[f32_panel_index(rows, col, i)] = v;
            }
        }
        Some(Self {
            n: cols,
            k: rows,
            data,
            bias: vec![0f32; cols.div_ceil(PANEL) * PANEL],
            kernel,
        })
    }

    /// `x W^T + b` for `x [.., K]`; `None` when `x` is not an f32 CPU tensor outside an autograd graph.
    pub fn forward(&self, x: &Tensor) -> Result<Option<Tensor>> {
        forward_rows(x, self.k, self.n, &F32Matmul { packed: self })
    }

    /// The weight `[N, K]` back out of the panels, exactly.
    pub fn unpack(&self) -> Result<Tensor> {
        let mut w = vec![0f32; self.n * self.k];
        for (col, row) in w.chunks_exact_mut(self.k.max(1)).enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                *v = self.data[f32_panel_index(self.k, col, i)];
            }
        }
        Tensor::from_vec(w, (self.n, self.k), &candle_core::Device::Cpu)
    }

    pub(super) fn run(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let panel_len = self.k * PANEL;
        let kernel = self.kernel;
        for_each_tile(
            (m, self.n, self.k),
            kernel.rows(),
            out,
            |row, rows, panel, cols, c| {
                let b = &self.data[panel * panel_len..(panel + 1) * panel_len];
                let bias = &self.bias[panel * PANEL..(panel + 1) * PANEL];
                let tile_a = &x[row * self.k..(row + rows) * self.k];
                // SAFETY: the kernel's instructions were detected when packing; `c` is this tile's own block of
                // `out`.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    macro_rules! tile {
                        ($f:ident, $($r:literal)*) => {
                            match rows {
                                $($r => $f::<$r>(tile_a, self.k, b, bias, c, self.n, cols),)*
                                _ => unreachable!("tiles have 1 to {} rows", kernel.rows()),
                            }
                        };
                    }
                    match kernel {
                        F32Kernel::Avx512 => tile!(tile_f32_avx512, 1 2 3 4 5 6 7 8),
                        F32Kernel::Avx2 => tile!(tile_f32_avx2, 1 2 3 4 5 6),
                    }
                }
            },
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_f32_avx2<const R: usize>(
    a: &[f32],
    k: usize,
    b: &[f32],
    bias: &[f32],
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let (a_ptr, b_ptr) = (a.as_ptr(), b.as_ptr());
    // The panel's two 16-column halves, each in 2 x R accumulators.
    for half in 0..2 {
        let c0 = half * 16;
        if cols <= c0 {
            break;
        }
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for i in 0..k {
            let b0 = _mm256_loadu_ps(b_ptr.add(i * PANEL + c0));
            let b1 = _mm256_loadu_ps(b_ptr.add(i * PANEL + c0 + 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a_ptr.add(r * k + i));
                acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
            }
        }
        let bias0 = _mm256_loadu_ps(bias.as_ptr().add(c0));
        let bias1 = _mm256_loadu_ps(bias.as_ptr().add(c0 + 8));
        let width = (cols - c0).min(16);
        for (r, acc) in acc.iter().enumerate() {
            let row = c.add(r * ldc + c0);
            let (lo, hi) = (_mm256_add_ps(acc[0], bias0), _mm256_add_ps(acc[1], bias1));
            if width == 16 {
                _mm256_storeu_ps(row, lo);
                _mm256_storeu_ps(row.add(8), hi);
            } else {
                let mut tmp = [0f32; 16];
                _mm256_storeu_ps(tmp.as_mut_ptr(), lo);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), hi);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), row, width);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_f32_avx512<const R: usize>(
    a: &[f32],
    k: usize,
    b: &[f32],
    bias: &[f32],
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let (a_ptr, b_ptr) = (a.as_ptr(), b.as_ptr());
    for i in 0..k {
        let b0 = _mm512_loadu_ps(b_ptr.add(i * PANEL));
        let b1 = _mm512_loadu_ps(b_ptr.add(i * PANEL + 16));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*a_ptr.add(r * k + i));
            acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
        }
    }
    let bias0 = _mm512_loadu_ps(bias.as_ptr());
    let bias1 = _mm512_loadu_ps(bias.as_ptr().add(16));
    let (m0, m1) = column_masks(cols);
    for (r, acc) in acc.iter().enumerate() {
        let row = c.add(r * ldc);
        _mm512_mask_storeu_ps(row, m0, _mm512_add_ps(acc[0], bias0));
        _mm512_mask_storeu_ps(row.add(16), m1, _mm512_add_ps(acc[1], bias1));
    }
}

/// Store masks of the two 16-column halves of a panel with `cols` valid columns.
fn column_masks(cols: usize) -> (u16, u16) {
    if cols >= PANEL {
        (0xFFFF, 0xFFFF)
    } else {
        let lo = cols.min(16);
        let hi = cols.saturating_sub(16);
        (((1u32 << lo) - 1) as u16, ((1u32 << hi) - 1) as u16)
    }
}

struct F32Matmul<'a> {
    packed: &'a PackedLinearF32,
}

impl CustomOp1 for F32Matmul<'_> {
    fn name(&self) -> &'static str {
        "packed-f32-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        run_rows(storage, layout, self.name(), self.packed.n, |x, m, out| {
            self.packed.run(x, m, out);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn rounded(t: &Tensor) -> Tensor {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    /// The product of the bf16-rounded operands in f64, then f32.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor) -> Vec<Vec<f32>> {
        let x: Vec<Vec<f32>> = rounded(x).to_vec2().unwrap();
        let w: Vec<Vec<f32>> = rounded(w).to_vec2().unwrap();
        let b: Vec<f32> = b.to_vec1().unwrap();
        x.iter()
            .map(|row| {
                w.iter()
                    .zip(&b)
                    .map(|(col, bias)| {
                        let s: f64 = row.iter().zip(col).map(|(a, c)| f64::from(a * c)).sum();
                        (s + f64::from(*bias)) as f32
                    })
                    .collect()
            })
            .collect()
    }

    fn check(m: usize, k: usize, n: usize) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let packed = PackedLinear::new(&w, Some(&b)).unwrap();
        let want = reference(&x, &w, &b);
        let mut paths = vec![false];
        if native_supported() {
            paths.push(true);
        }
        for native in paths {
            let op = Bf16Matmul {
                packed: &packed,
                native,
            };
            let got: Vec<Vec<f32>> = x.apply_op1_no_bwd(&op).unwrap().to_vec2().unwrap();
            for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                for (j, (g, r)) in g.iter().zip(r).enumerate() {
                    assert!(
                        (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                        "{m}x{k}x{n} (native {native}) at ({i},{j}): {g} vs {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn matches_the_rounded_product_on_ragged_shapes() {
        for &(m, k, n) in &[
            (1, 2, 1),
            (1, 7, 33),
            (3, 64, 32),
            (8, 96, 64),
            (9, 33, 70),
            (17, 130, 31),
            (130, 48, 40),
            (300, 256, 96),
        ] {
            check(m, k, n);
        }
    }

    #[test]
    fn packed_f32_matches_the_plain_product() {
        let dev = Device::Cpu;
        for &(m, k, n) in &[(1, 3, 1), (5, 64, 33), (9, 100, 70), (200, 48, 96)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.1, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let Some(packed) = PackedLinearF32::new(&w, Some(&b)).unwrap() else {
                eprintln!("skipped: this CPU has neither AVX2 with FMA nor AVX-512F");
                return;
            };
            let unpacked: Vec<Vec<f32>> = packed.unpack().unwrap().to_vec2().unwrap();
            assert_eq!(unpacked, w.to_vec2::<f32>().unwrap(), "unpack {n}x{k}");
            let want = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            // Every kernel this CPU can run, whichever `f32_kernel` picked.
            let mut kernels = vec![F32Kernel::Avx2];
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx512f") {
                kernels.push(F32Kernel::Avx512);
            }
            for kernel in kernels {
                let packed = PackedLinearF32 {
                    kernel,
                    ..packed.clone()
                };
                let got = packed.forward(&x).unwrap().unwrap();
                let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
                assert!(
                    diff.to_scalar::<f32>().unwrap() < 1e-4,
                    "{kernel:?} {m}x{k}x{n}"
                );
            }
        }
    }

    #[test]
    fn keeps_leading_dims_and_refuses_what_it_cannot_take() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 6), &dev).unwrap();
        let packed = PackedLinear::new(&w, None).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6), &dev).unwrap();
        assert_eq!(packed.forward(&x).unwrap().unwrap().dims(), [2, 3, 5]);
        // A tensor that tracks gradients goes back to the f32 path.
        let var = candle_core::Var::from_tensor(&x).unwrap();
        assert!(packed.forward(var.as_tensor()).unwrap().is_none());
        let wrong = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        assert!(packed.forward(&wrong).is_err());
    }

    #[test]
    fn rounding_is_nearest_even() {
        assert_eq!(to_bf16_bits(1.0), 0x3F80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(to_bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(to_bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert!(from_bf16_bits(to_bf16_bits(f32::NAN)).is_nan());
        for v in [0.1f32, -3.7, 1e-20, 6.5e4] {
            let t = Tensor::new(&[v], &Device::Cpu).unwrap();
            assert_eq!(
                from_bf16_bits(to_bf16_bits(v)),
                rounded(&t).to_vec1::<f32>().unwrap()[0]
            );
        }
    }
}
