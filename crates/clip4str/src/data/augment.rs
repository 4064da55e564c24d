//! Training-time RandAugment (SPEC §13.3): timm 0.6 `rand_augment_transform(magnitude=5, num_layers=3)` over
//! CLIP4STR's 16-op list, applied to the original-size RGB image before the resize.
//!
//! Each op follows the Pillow (`ImageOps`, `ImageEnhance`, `Image.transform`) or imgaug routine the reference
//! calls, with its arithmetic (fixed-point grey conversion, truncating blends, Pillow's affine sampling and edge
//! rules), so that the training distribution matches even though the random draws differ from Python's.
//! Randomness comes only from the caller's RNG, so a seeded RNG gives a reproducible image.

use image::{Rgb, RgbImage};
use rand::Rng;
use rand_distr::{Distribution, Poisson};

use crate::preprocess::geometry::rotate_expand_matrix;

/// Grey fill of the geometric ops where the source image does not reach (timm's `fillcolor=(128, 128, 128)`).
pub const FILL: Rgb<u8> = Rgb([128, 128, 128]);

/// timm's `_LEVEL_DENOM`: magnitudes run from 0 to 10 and the op arguments scale with `magnitude / 10`.
pub const MAX_MAGNITUDE: f32 = 10.0;

/// Probability with which each chosen op is applied (timm `AugmentOp(prob=0.5)`).
const OP_PROB: f64 = 0.5;
/// CLIP4STR's timm hyper-parameters at full magnitude: degrees, shear factors, translation fractions.
const ROTATE_DEG: f64 = 30.0;
const SHEAR_X_PCT: f64 = 0.9;
const SHEAR_Y_PCT: f64 = 0.2;
const TRANSLATE_X_PCT: f64 = 0.10;
const TRANSLATE_Y_PCT: f64 = 0.30;
/// `_enhance_increasing_level_to_arg`: factor `1 ± level * 0.9`.
const ENHANCE_RANGE: f64 = 0.9;
/// `_posterize_increasing_level_to_arg`: keep `4 - int(level * 4)` bits.
const POSTERIZE_BITS: f64 = 4.0;
/// `_solarize_add_level_to_arg`: add `int(level * 110)` below the threshold.
const SOLARIZE_ADD_MAX: f64 = 110.0;
/// Threshold below which SolarizeAdd brightens (timm `solarize_add(thresh=128)`).
const SOLARIZE_ADD_THRESHOLD: u8 = 128;
/// strhub `LEVEL_TO_ARG` maxima of the two extra ops (radius 4, lambda 40 at magnitude 10).
const BLUR_MAX: f64 = 4.0;
const POISSON_MAX: f64 = 40.0;

/// One of the 16 ops of the reference list, in its order (timm `_RAND_INCREASING_TRANSFORMS` without
/// `SharpnessIncreasing`, plus strhub's `GaussianBlur` and `PoissonNoise`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AugmentOp {
    /// `ImageOps.autocontrast`: per channel, stretch the darkest..brightest level to 0..255.
    AutoContrast,
    /// `ImageOps.equalize`: per-channel histogram equalisation with Pillow's LUT.
    Equalize,
    /// `ImageOps.invert`: `255 - v`.
    Invert,
    /// `img.rotate(±deg, expand=True)` with grey fill; the canvas grows to hold the whole image.
    Rotate,
    /// `ImageOps.posterize`: keep the top `4 - int(level * 4)` bits (2 at magnitude 5).
    Posterize,
    /// `ImageOps.solarize`: invert levels at or above `256 - int(level * 256)` (128 at magnitude 5).
    Solarize,
    /// timm `solarize_add`: add `int(level * 110)` (55) to levels below 128, clipped at 255.
    SolarizeAdd,
    /// `ImageEnhance.Color`: blend with the grey image, factor `1 ± level * 0.9`.
    Color,
    /// `ImageEnhance.Contrast`: blend with the mean grey level, factor `1 ± level * 0.9`.
    Contrast,
    /// `ImageEnhance.Brightness`: blend with black, factor `1 ± level * 0.9`.
    Brightness,
    /// Affine `(1, ±level * 0.9, 0, 0, 1, 0)`: horizontal shear.
    ShearX,
    /// Affine `(1, 0, 0, ±level * 0.2, 1, 0)`: vertical shear.
    ShearY,
    /// Affine `(1, 0, ±level * 0.1 * width, 0, 1, 0)`: horizontal shift.
    TranslateXRel,
    /// Affine `(1, 0, 0, 0, 1, ±level * 0.3 * height)`: vertical shift.
    TranslateYRel,
    /// `ImageFilter.GaussianBlur(radius)`, radius 1 or 2 from the image size (see [`blur_radius`]).
    GaussianBlur,
    /// imgaug `AdditivePoissonNoise(lam)`: ± Poisson(lam) per pixel, same for all channels.
    PoissonNoise,
}

impl AugmentOp {
    /// The reference op list, in its order.
    pub const ALL: [AugmentOp; 16] = [
        AugmentOp::AutoContrast,
        AugmentOp::Equalize,
        AugmentOp::Invert,
        AugmentOp::Rotate,
        AugmentOp::Posterize,
        AugmentOp::Solarize,
        AugmentOp::SolarizeAdd,
        AugmentOp::Color,
        AugmentOp::Contrast,
        AugmentOp::Brightness,
        AugmentOp::ShearX,
        AugmentOp::ShearY,
        AugmentOp::TranslateXRel,
        AugmentOp::TranslateYRel,
        AugmentOp::GaussianBlur,
        AugmentOp::PoissonNoise,
    ];

    /// The reference's op name (timm / strhub spelling), for logs.
    pub fn name(self) -> &'static str {
        match self {
            AugmentOp::AutoContrast => "AutoContrast",
            AugmentOp::Equalize => "Equalize",
            AugmentOp::Invert => "Invert",
            AugmentOp::Rotate => "Rotate",
            AugmentOp::Posterize => "PosterizeIncreasing",
            AugmentOp::Solarize => "SolarizeIncreasing",
            AugmentOp::SolarizeAdd => "SolarizeAdd",
            AugmentOp::Color => "ColorIncreasing",
            AugmentOp::Contrast => "ContrastIncreasing",
            AugmentOp::Brightness => "BrightnessIncreasing",
            AugmentOp::ShearX => "ShearX",
            AugmentOp::ShearY => "ShearY",
            AugmentOp::TranslateXRel => "TranslateXRel",
            AugmentOp::TranslateYRel => "TranslateYRel",
            AugmentOp::GaussianBlur => "GaussianBlur",
            AugmentOp::PoissonNoise => "PoissonNoise",
        }
    }
}

/// Interpolation of the geometric ops; timm picks one of the two at random on every call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// Pillow `BILINEAR` (2x2 neighbours, result truncated).
    Bilinear,
    /// Pillow `BICUBIC` as in `Image.transform` (4x4 neighbours, cubic with a = -1, clipped and truncated).
    Bicubic,
}

/// timm `RandAugment`: pick `num_ops` distinct ops uniformly, in random order, and apply each with
/// probability 0.5 at a fixed magnitude.
#[derive(Debug, Clone, PartialEq)]
pub struct RandAugment {
    num_ops: usize,
    magnitude: f32,
}

impl Default for RandAugment {
    /// The reference setting: 3 ops at magnitude 5.
    fn default() -> Self {
        Self::new(3, 5.0)
    }
}

impl RandAugment {
    /// `num_ops` distinct ops per image (at most 16) at `magnitude` on timm's 0..=10 scale (clamped there,
    /// as timm does; NaN counts as 0).
    pub fn new(num_ops: usize, magnitude: f32) -> Self {
        let magnitude = if magnitude.is_nan() {
            0.0
        } else {
            magnitude.clamp(0.0, MAX_MAGNITUDE)
        };
        Self {
            num_ops: num_ops.min(AugmentOp::ALL.len()),
            magnitude,
        }
    }

    /// Ops drawn per image.
    pub fn num_ops(&self) -> usize {
        self.num_ops
    }

    /// Magnitude on the 0..=10 scale.
    pub fn magnitude(&self) -> f32 {
        self.magnitude
    }

    /// `magnitude / 10`, the fraction of each op's full-strength argument.
    fn level(&self) -> f64 {
        f64::from(self.magnitude / MAX_MAGNITUDE)
    }

    /// The distinct ops one image gets, in application order (numpy `choice(replace=False)` with uniform
    /// weights); each is then applied with probability 0.5 by [`RandAugment::apply`].
    pub fn choose_ops(&self, rng: &mut impl Rng) -> Vec<AugmentOp> {
        rand::seq::index::sample(rng, AugmentOp::ALL.len(), self.num_ops)
            .into_iter()
            .map(|i| AugmentOp::ALL[i])
            .collect()
    }

    /// Augments one image: draws the ops, applies each with probability 0.5. Geometric ops may change the
    /// size (Rotate expands the canvas); the result is what the resize to the model size receives.
    pub fn apply(&self, img: &RgbImage, rng: &mut impl Rng) -> RgbImage {
        let mut current: Option<RgbImage> = None;
        for op in self.choose_ops(rng) {
            if rng.random_bool(OP_PROB) {
                let source = current.as_ref().unwrap_or(img);
                current = Some(self.apply_op(op, source, rng));
            }
        }
        current.unwrap_or_else(|| img.clone())
    }

    /// Applies one op unconditionally at this magnitude, drawing its random sign, resampling filter or noise
    /// from `rng`. An empty image is returned unchanged.
    pub fn apply_op(&self, op: AugmentOp, img: &RgbImage, rng: &mut impl Rng) -> RgbImage {
        if img.width() == 0 || img.height() == 0 {
            return img.clone();
        }
        let level = self.level();
        let (w, h) = (f64::from(img.width()), f64::from(img.height()));
        match op {
            AugmentOp::AutoContrast => auto_contrast(img),
            AugmentOp::Equalize => equalize(img),
            AugmentOp::Invert => invert(img),
            AugmentOp::Posterize => posterize(img, posterize_bits(level)),
            AugmentOp::Solarize => solarize(img, solarize_threshold(level)),
            AugmentOp::SolarizeAdd => solarize_add(img, solarize_add_amount(level)),
            AugmentOp::Color => color(img, enhance_factor(level, rng)),
            AugmentOp::Contrast => contrast(img, enhance_factor(level, rng)),
            AugmentOp::Brightness => brightness(img, enhance_factor(level, rng)),
            AugmentOp::Rotate => {
                let degrees = randomly_negate(level * ROTATE_DEG, rng);
                rotate_expand(img, degrees, random_resample(rng), FILL)
            }
            AugmentOp::ShearX => {
                let factor = randomly_negate(level * SHEAR_X_PCT, rng);
                let coeffs = [1.0, factor, 0.0, 0.0, 1.0, 0.0];
                affine_same_size(img, coeffs, rng)
            }
            AugmentOp::ShearY => {
                let factor = randomly_negate(level * SHEAR_Y_PCT, rng);
                let coeffs = [1.0, 0.0, 0.0, factor, 1.0, 0.0];
                affine_same_size(img, coeffs, rng)
            }
            AugmentOp::TranslateXRel => {
                let pixels = randomly_negate(level * TRANSLATE_X_PCT, rng) * w;
                let coeffs = [1.0, 0.0, pixels, 0.0, 1.0, 0.0];
                affine_same_size(img, coeffs, rng)
            }
            AugmentOp::TranslateYRel => {
                let pixels = randomly_negate(level * TRANSLATE_Y_PCT, rng) * h;
                let coeffs = [1.0, 0.0, 0.0, 0.0, 1.0, pixels];
                affine_same_size(img, coeffs, rng)
            }
            AugmentOp::GaussianBlur => gaussian_blur(img, blur_radius(level * BLUR_MAX, w.max(h))),
            AugmentOp::PoissonNoise => {
                poisson_noise(img, poisson_lambda(level * POISSON_MAX, w.max(h)), rng)
            }
        }
    }
}

/// One op at the reference magnitude (5), unconditionally; see [`RandAugment::apply_op`].
pub fn apply_op(op: AugmentOp, img: &RgbImage, rng: &mut impl Rng) -> RgbImage {
    RandAugment::default().apply_op(op, img, rng)
}

/// timm `_randomly_negate`: the sign flips with probability 0.5.
fn randomly_negate(value: f64, rng: &mut impl Rng) -> f64 {
    if rng.random_bool(0.5) {
        -value
    } else {
        value
    }
}

/// timm `_interpolation`: BILINEAR or BICUBIC with equal chance.
fn random_resample(rng: &mut impl Rng) -> Resample {
    if rng.random_bool(0.5) {
        Resample::Bilinear
    } else {
        Resample::Bicubic
    }
}

/// `1 ± level * 0.9` (0.55 or 1.45 at magnitude 5).
fn enhance_factor(level: f64, rng: &mut impl Rng) -> f64 {
    1.0 + randomly_negate(level * ENHANCE_RANGE, rng)
}

/// Bits kept by Posterize: `4 - int(level * 4)`.
fn posterize_bits(level: f64) -> u32 {
    (POSTERIZE_BITS - (level * POSTERIZE_BITS).trunc()).max(0.0) as u32
}

/// Solarize threshold: `256 - int(level * 256)`.
fn solarize_threshold(level: f64) -> u32 {
    (256.0 - (level * 256.0).trunc()).max(0.0) as u32
}

/// SolarizeAdd increment: `int(level * 110)`.
fn solarize_add_amount(level: f64) -> u32 {
    (level * SOLARIZE_ADD_MAX).trunc().max(0.0) as u32
}

/// strhub `_get_param(level, img, 0.02)`: `round(min(level, max(1, 0.02 * max(w, h))))` with Python's
/// half-to-even rounding, i.e. radius 1 below 75 px and 2 from 75 px at magnitude 5.
pub fn blur_radius(level_arg: f64, max_side: f64) -> u32 {
    let bound = (0.02 * max_side).max(1.0);
    level_arg.min(bound).round_ties_even().max(0.0) as u32
}

/// strhub `_get_param(level, img, 0.2) | 1`: the odd Poisson lambda, 21 for images of 100 px and more at
/// magnitude 5.
pub fn poisson_lambda(level_arg: f64, max_side: f64) -> u32 {
    let bound = (0.2 * max_side).max(1.0);
    (level_arg.min(bound).round_ties_even().max(0.0) as u32) | 1
}

/// Maps every channel through its own 256-entry table (Pillow `Image.point` on an RGB image).
fn apply_luts(img: &RgbImage, luts: &[[u8; 256]; 3]) -> RgbImage {
    let mut out = img.clone();
    for px in out.pixels_mut() {
        for (c, value) in px.0.iter_mut().enumerate() {
            *value = luts[c][usize::from(*value)];
        }
    }
    out
}

/// One table for all channels.
fn apply_lut(img: &RgbImage, lut: &[u8; 256]) -> RgbImage {
    apply_luts(img, &[*lut; 3])
}

/// Per-channel 256-bin histograms (Pillow `Image.histogram()` of an RGB image).
fn histograms(img: &RgbImage) -> [[u64; 256]; 3] {
    let mut hist = [[0u64; 256]; 3];
    for px in img.pixels() {
        for (c, &value) in px.0.iter().enumerate() {
            hist[c][usize::from(value)] += 1;
        }
    }
    hist
}

fn identity_lut() -> [u8; 256] {
    std::array::from_fn(|i| i as u8)
}

/// `ImageOps.autocontrast(img)` (cutoff 0, no preserve_tone): each channel's lowest..highest used level is
/// mapped linearly onto 0..255 with `int(ix * scale + offset)`; a single-level channel is left alone.
fn auto_contrast(img: &RgbImage) -> RgbImage {
    let hist = histograms(img);
    let luts = hist.map(|h| {
        let lo = h.iter().position(|&n| n > 0);
        let hi = h.iter().rposition(|&n| n > 0);
        match (lo, hi) {
            (Some(lo), Some(hi)) if hi > lo => {
                let scale = 255.0 / (hi - lo) as f64;
                let offset = -(lo as f64) * scale;
                std::array::from_fn(|ix| {
                    (ix as f64 * scale + offset).trunc().clamp(0.0, 255.0) as u8
                })
            }
            _ => identity_lut(),
        }
    });
    apply_luts(img, &luts)
}

/// `ImageOps.equalize(img)`: per channel, `step = (count - count of the last used level) // 255`, and level
/// `i` maps to `(step // 2 + pixels below i) // step` (clipped to 255 as `Image.point` does); channels with
/// one used level or `step == 0` are left alone.
fn equalize(img: &RgbImage) -> RgbImage {
    let hist = histograms(img);
    let luts = hist.map(|h| {
        let used: Vec<u64> = h.iter().copied().filter(|&n| n > 0).collect();
        let Some(&last) = used.last() else {
            return identity_lut();
        };
        if used.len() <= 1 {
            return identity_lut();
        }
        let step = (used.iter().sum::<u64>() - last) / 255;
        if step == 0 {
            return identity_lut();
        }
        let mut lut = [0u8; 256];
        let mut n = step / 2;
        for (i, entry) in lut.iter_mut().enumerate() {
            *entry = (n / step).min(255) as u8;
            n += h[i];
        }
        lut
    });
    apply_luts(img, &luts)
}

/// `ImageOps.invert`.
fn invert(img: &RgbImage) -> RgbImage {
    apply_lut(img, &std::array::from_fn(|i| 255 - i as u8))
}

/// `ImageOps.posterize(img, bits)`: keep the top `bits` bits; 8 or more bits leave the image alone (timm's
/// early return), 0 bits make it black.
fn posterize(img: &RgbImage, bits: u32) -> RgbImage {
    if bits >= 8 {
        return img.clone();
    }
    let mask = !((1u32 << (8 - bits)) - 1) as u8;
    apply_lut(img, &std::array::from_fn(|i| i as u8 & mask))
}

/// `ImageOps.solarize(img, threshold)`: levels `>= threshold` are inverted.
fn solarize(img: &RgbImage, threshold: u32) -> RgbImage {
    apply_lut(
        img,
        &std::array::from_fn(|i| {
            if (i as u32) < threshold {
                i as u8
            } else {
                255 - i as u8
            }
        }),
    )
}

/// timm `solarize_add(img, add, thresh=128)`: levels below 128 get `+add`, clipped at 255.
fn solarize_add(img: &RgbImage, add: u32) -> RgbImage {
    apply_lut(
        img,
        &std::array::from_fn(|i| {
            if i < usize::from(SOLARIZE_ADD_THRESHOLD) {
                (i as u32 + add).min(255) as u8
            } else {
                i as u8
            }
        }),
    )
}

/// Pillow's RGB to L conversion, `(R*19595 + G*38470 + B*7471 + 0x8000) >> 16`: the fixed-point form of
/// `L = R*299/1000 + G*587/1000 + B*114/1000`, rounded.
fn luma(px: &Rgb<u8>) -> u8 {
    let [r, g, b] = px.0.map(u32::from);
    ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
}

/// Pillow `Image.blend(degenerate, img, alpha)` for one 8-bit sample: `degenerate + alpha * (v - degenerate)`
/// in float32, clipped to 0..255 and truncated (the saturating cast does both).
fn blend_sample(degenerate: u8, value: u8, alpha: f32) -> u8 {
    let d = f32::from(degenerate);
    (d + alpha * (f32::from(value) - d)) as u8
}

/// `ImageEnhance.Color(img).enhance(factor)`: blend with the image's own grey version.
fn color(img: &RgbImage, factor: f64) -> RgbImage {
    let alpha = factor as f32;
    let mut out = img.clone();
    for px in out.pixels_mut() {
        let grey = luma(px);
        px.0 = px.0.map(|v| blend_sample(grey, v, alpha));
    }
    out
}

/// `ImageEnhance.Contrast(img).enhance(factor)`: blend with a flat image at the mean grey level, rounded
/// (`int(mean + 0.5)`).
fn contrast(img: &RgbImage, factor: f64) -> RgbImage {
    let count = u64::from(img.width()) * u64::from(img.height());
    if count == 0 {
        return img.clone();
    }
    let total: u64 = img.pixels().map(|px| u64::from(luma(px))).sum();
    let mean = (total as f64 / count as f64 + 0.5).trunc() as u8;
    let alpha = factor as f32;
    let lut = std::array::from_fn(|i| blend_sample(mean, i as u8, alpha));
    apply_lut(img, &lut)
}

/// `ImageEnhance.Brightness(img).enhance(factor)`: blend with black, i.e. scale and clip.
fn brightness(img: &RgbImage, factor: f64) -> RgbImage {
    let alpha = factor as f32;
    let lut = std::array::from_fn(|i| blend_sample(0, i as u8, alpha));
    apply_lut(img, &lut)
}

/// A same-size affine op with a random filter.
fn affine_same_size(img: &RgbImage, coeffs: [f64; 6], rng: &mut impl Rng) -> RgbImage {
    let resample = random_resample(rng);
    affine_transform(img, img.width(), img.height(), coeffs, resample, FILL)
}

/// Pillow `img.transform((width, height), Image.AFFINE, coeffs, resample, fillcolor=fill)`: the output pixel
/// whose centre is `(x + 0.5, y + 0.5)` samples the input at `(a*x' + b*y' + c, d*x' + e*y' + f)`. A sample
/// point outside `[0, w) x [0, h)` gives `fill`; inside, neighbours beyond the border are clamped (the fill
/// never bleeds into the image).
pub fn affine_transform(
    img: &RgbImage,
    width: u32,
    height: u32,
    coeffs: [f64; 6],
    resample: Resample,
    fill: Rgb<u8>,
) -> RgbImage {
    let mut out = RgbImage::from_pixel(width, height, fill);
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    if in_w == 0 || in_h == 0 {
        return out;
    }
    let [a, b, c, d, e, f] = coeffs;
    let src = img.as_raw();
    let (wf, hf) = (in_w as f64, in_h as f64);
    for (y, row) in out.enumerate_rows_mut() {
        let yc = f64::from(y) + 0.5;
        for (x, _, px) in row {
            let xc = f64::from(x) + 0.5;
            let xin = a * xc + b * yc + c;
            let yin = d * xc + e * yc + f;
            // Also rejects NaN coordinates.
            if !(xin >= 0.0 && xin < wf && yin >= 0.0 && yin < hf) {
                continue;
            }
            px.0 = match resample {
                Resample::Bilinear => sample_bilinear(src, in_w, in_h, xin, yin),
                Resample::Bicubic => sample_bicubic(src, in_w, in_h, xin, yin),
            };
        }
    }
    out
}

/// Clamps a possibly negative index into `0..len` (Pillow's `XCLIP`/`YCLIP`).
fn clip_index(i: isize, len: usize) -> usize {
    i.clamp(0, len as isize - 1) as usize
}

/// Splits a pixel-centre coordinate into the first tap and the fraction (Pillow's `xin -= 0.5; FLOOR`).
fn split_coordinate(v: f64) -> (isize, f64) {
    let shifted = v - 0.5;
    let base = shifted.floor();
    (base as isize, shifted - base)
}

/// Pillow `bilinear_filter32RGB`: interpolate two rows horizontally, then vertically; truncate.
fn sample_bilinear(src: &[u8], w: usize, h: usize, xin: f64, yin: f64) -> [u8; 3] {
    let (x, dx) = split_coordinate(xin);
    let (y, dy) = split_coordinate(yin);
    let (x0, x1) = (clip_index(x, w) * 3, clip_index(x + 1, w) * 3);
    let (row0, row1) = (clip_index(y, h) * w * 3, clip_index(y + 1, h) * w * 3);
    let at = |offset: usize| f64::from(src[offset]);
    std::array::from_fn(|ch| {
        let (a, b) = (at(row0 + x0 + ch), at(row0 + x1 + ch));
        let top = a + (b - a) * dx;
        let (a, b) = (at(row1 + x0 + ch), at(row1 + x1 + ch));
        let bottom = a + (b - a) * dx;
        (top + (bottom - top) * dy) as u8
    })
}

/// Pillow's `BICUBIC` macro of `Geometry.c` (cubic convolution with a = -1), evaluated in its order so that
/// a flat neighbourhood gives back exactly its level.
fn cubic(v: [f64; 4], d: f64) -> f64 {
    let p2 = v[2] - v[0];
    let p3 = 2.0 * (v[0] - v[1]) + v[2] - v[3];
    let p4 = -v[0] + v[1] - v[2] + v[3];
    v[1] + d * (p2 + d * (p3 + d * p4))
}

/// Pillow `bicubic_filter32RGB`: 4x4 taps around the sample point, clipped to 0..255 and truncated.
fn sample_bicubic(src: &[u8], w: usize, h: usize, xin: f64, yin: f64) -> [u8; 3] {
    let (x, dx) = split_coordinate(xin);
    let (y, dy) = split_coordinate(yin);
    let columns: [usize; 4] = std::array::from_fn(|k| clip_index(x - 1 + k as isize, w) * 3);
    let rows: [usize; 4] = std::array::from_fn(|k| clip_index(y - 1 + k as isize, h) * w * 3);
    std::array::from_fn(|ch| {
        let row_value = |row: usize| cubic(columns.map(|c| f64::from(src[row + c + ch])), dx);
        cubic(rows.map(row_value), dy).clamp(0.0, 255.0) as u8
    })
}

/// Pillow `img.rotate(degrees, resample, expand=True, fillcolor=fill)`: counter-clockwise about the centre,
/// the canvas grown to `ceil(max) - floor(min)` of the rotated corners, the image centred in it.
pub fn rotate_expand(img: &RgbImage, degrees: f64, resample: Resample, fill: Rgb<u8>) -> RgbImage {
    if !degrees.is_finite() {
        return img.clone();
    }
    let (m, new_w, new_h) = rotate_expand_matrix(img.width(), img.height(), degrees);
    affine_transform(img, new_w, new_h, m, resample, fill)
}

/// `ImageFilter.GaussianBlur(radius)`; Pillow's radius is the standard deviation. Implemented as a true
/// Gaussian (`image::imageops::blur`, edges replicated) rather than Pillow's three extended box passes.
fn gaussian_blur(img: &RgbImage, radius: u32) -> RgbImage {
    if radius == 0 {
        return img.clone();
    }
    image::imageops::blur(img, radius as f32)
}

/// imgaug `AdditivePoissonNoise(lam, per_channel=False)`: one `±Poisson(lam)` draw per pixel (sign 50/50),
/// added to all three channels and clipped to 0..255.
fn poisson_noise(img: &RgbImage, lambda: u32, rng: &mut impl Rng) -> RgbImage {
    let Ok(poisson) = Poisson::new(f64::from(lambda.max(1))) else {
        return img.clone();
    };
    let mut out = img.clone();
    for px in out.pixels_mut() {
        let magnitude = poisson.sample(rng);
        let noise = if rng.random_bool(0.5) {
            magnitude
        } else {
            -magnitude
        };
        px.0 = px.0.map(|v| (f64::from(v) + noise).clamp(0.0, 255.0) as u8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// A colourful deterministic test image.
    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                (x * 255 / (w - 1).max(1)) as u8,
                (y * 255 / (h - 1).max(1)) as u8,
                ((x * 7 + y * 13) % 256) as u8,
            ])
        })
    }

    fn fixture(name: &str) -> RgbImage {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/images")
            .join(name);
        let bytes = std::fs::read(&path).expect("fixture exists");
        crate::preprocess::decode_rgb(&bytes).expect("fixture decodes")
    }

    #[test]
    fn magnitude_five_arguments_match_the_table() {
        let level = RandAugment::default().level();
        assert_eq!(posterize_bits(level), 2);
        assert_eq!(solarize_threshold(level), 128);
        assert_eq!(solarize_add_amount(level), 55);
        assert!((level * ROTATE_DEG - 15.0).abs() < 1e-9);
        assert!((level * SHEAR_X_PCT - 0.45).abs() < 1e-9);
        assert!((level * SHEAR_Y_PCT - 0.10).abs() < 1e-9);
        assert!((level * TRANSLATE_X_PCT - 0.05).abs() < 1e-9);
        assert!((level * TRANSLATE_Y_PCT - 0.15).abs() < 1e-9);
        let mut r = rng(0);
        for _ in 0..20 {
            let f = enhance_factor(level, &mut r);
            assert!((f - 0.55).abs() < 1e-9 || (f - 1.45).abs() < 1e-9, "{f}");
        }
        // GaussianBlur radius and Poisson lambda depend on the image size.
        assert_eq!(blur_radius(level * BLUR_MAX, 40.0), 1);
        assert_eq!(blur_radius(level * BLUR_MAX, 74.0), 1);
        assert_eq!(blur_radius(level * BLUR_MAX, 75.0), 2);
        assert_eq!(blur_radius(level * BLUR_MAX, 500.0), 2);
        assert_eq!(poisson_lambda(level * POISSON_MAX, 100.0), 21);
        assert_eq!(poisson_lambda(level * POISSON_MAX, 1000.0), 21);
        assert_eq!(poisson_lambda(level * POISSON_MAX, 40.0), 9);
        assert_eq!(poisson_lambda(level * POISSON_MAX, 2.0), 1);
        // Magnitude is clamped to timm's 0..=10.
        assert_eq!(RandAugment::new(3, 50.0).magnitude(), 10.0);
        assert_eq!(RandAugment::new(3, f32::NAN).magnitude(), 0.0);
        assert_eq!(RandAugment::new(40, 5.0).num_ops(), 16);
    }

    #[test]
    fn invert_twice_is_identity() {
        let img = pattern(23, 11);
        let once = apply_op(AugmentOp::Invert, &img, &mut rng(1));
        assert_eq!(
            once.get_pixel(3, 4).0,
            img.get_pixel(3, 4).0.map(|v| 255 - v)
        );
        assert_eq!(apply_op(AugmentOp::Invert, &once, &mut rng(2)), img);
    }

    #[test]
    fn posterize_keeps_two_bits() {
        let img = pattern(64, 9);
        let out = apply_op(AugmentOp::Posterize, &img, &mut rng(3));
        for (a, b) in img.pixels().zip(out.pixels()) {
            assert_eq!(b.0, a.0.map(|v| v & 0b1100_0000));
        }
        assert_eq!(posterize(&img, 8), img);
        assert!(posterize(&img, 0).pixels().all(|p| p.0 == [0, 0, 0]));
    }

    #[test]
    fn solarize_inverts_from_128() {
        let img = RgbImage::from_fn(4, 1, |x, _| Rgb([[0, 127, 128, 200][x as usize]; 3]));
        let out = apply_op(AugmentOp::Solarize, &img, &mut rng(4));
        let got: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert_eq!(got, [0, 127, 127, 55]);
    }

    #[test]
    fn solarize_add_adds_55_below_128() {
        let img = RgbImage::from_fn(6, 1, |x, _| {
            Rgb([[0, 100, 127, 128, 200, 250][x as usize]; 3])
        });
        let out = apply_op(AugmentOp::SolarizeAdd, &img, &mut rng(5));
        let got: Vec<u8> = out.pixels().map(|p| p.0[1]).collect();
        assert_eq!(got, [55, 155, 182, 128, 200, 250]);
        // Clipped at 255 for a large increment.
        assert_eq!(solarize_add(&img, 200).get_pixel(2, 0).0, [255; 3]);
    }

    #[test]
    fn brightness_scales_and_clips() {
        let img = RgbImage::from_fn(3, 1, |x, _| Rgb([[10, 100, 200][x as usize], 0, 255]));
        let darker = brightness(&img, 0.55);
        assert_eq!(darker.get_pixel(0, 0).0, [5, 0, 140]); // 5.5 -> 5, 140.25 -> 140
        assert_eq!(darker.get_pixel(2, 0).0[0], 110);
        let brighter = brightness(&img, 1.45);
        assert_eq!(brighter.get_pixel(0, 0).0, [14, 0, 255]); // 14.5 -> 14, clipped
        assert_eq!(brighter.get_pixel(1, 0).0[0], 145);
        assert_eq!(brighter.get_pixel(2, 0).0[0], 255);
        // The random op uses one of the two factors.
        let out = apply_op(AugmentOp::Brightness, &img, &mut rng(6));
        assert!(out == darker || out == brighter);
    }

    #[test]
    fn contrast_blends_with_the_mean_grey() {
        // Grey levels 50 and 150: mean 100.
        let img = RgbImage::from_fn(2, 1, |x, _| Rgb([[50, 150][x as usize]; 3]));
        let low = contrast(&img, 0.55);
        assert_eq!(low.get_pixel(0, 0).0, [72; 3]); // 100 - 0.55 * 50 = 72.5
        assert_eq!(low.get_pixel(1, 0).0, [127; 3]); // 127.5
        let high = contrast(&img, 1.45);
        assert_eq!(high.get_pixel(0, 0).0, [27; 3]); // 27.5
        assert_eq!(high.get_pixel(1, 0).0, [172; 3]); // 172.5
        let flat = RgbImage::from_pixel(5, 4, Rgb([90, 90, 90]));
        assert_eq!(apply_op(AugmentOp::Contrast, &flat, &mut rng(7)), flat);
    }

    #[test]
    fn color_blends_with_the_grey_image() {
        let grey = RgbImage::from_fn(4, 4, |x, y| Rgb([(x * 40 + y) as u8; 3]));
        assert_eq!(apply_op(AugmentOp::Color, &grey, &mut rng(8)), grey);
        let red = RgbImage::from_pixel(1, 1, Rgb([200, 0, 0]));
        // L = (200 * 19595 + 0x8000) >> 16 = 60.
        assert_eq!(luma(red.get_pixel(0, 0)), 60);
        // float32 like Pillow: 0.55f32 * -60 rounds to -33.0, so 60 - 33 = 27 exactly.
        assert_eq!(color(&red, 0.55).get_pixel(0, 0).0, [137, 27, 27]);
        assert_eq!(color(&red, 1.45).get_pixel(0, 0).0, [255, 0, 0]);
    }

    #[test]
    fn auto_contrast_stretches_each_channel() {
        let img = RgbImage::from_fn(3, 1, |x, _| {
            Rgb([[64, 128, 192][x as usize], 7, [0, 10, 20][x as usize]])
        });
        let out = apply_op(AugmentOp::AutoContrast, &img, &mut rng(9));
        let red: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert_eq!(red, [0, 127, 255]);
        assert!(
            out.pixels().all(|p| p.0[1] == 7),
            "a one-level channel stays"
        );
        let blue: Vec<u8> = out.pixels().map(|p| p.0[2]).collect();
        assert_eq!(blue, [0, 127, 255]);
    }

    #[test]
    fn equalize_follows_pillows_lut() {
        // 256 pixels at 10 and 256 at 200: step = (512 - 256) // 255 = 1, so 10 -> 0 and 200 -> 256 -> 255.
        let img = RgbImage::from_fn(32, 16, |x, _| Rgb([if x < 16 { 10 } else { 200 }; 3]));
        let out = apply_op(AugmentOp::Equalize, &img, &mut rng(10));
        assert_eq!(out.get_pixel(0, 0).0, [0; 3]);
        assert_eq!(out.get_pixel(31, 15).0, [255; 3]);
        // Too few pixels for a step: unchanged.
        let tiny = RgbImage::from_fn(2, 1, |x, _| Rgb([[10, 200][x as usize]; 3]));
        assert_eq!(equalize(&tiny), tiny);
        // A uniform ramp over many pixels stays (nearly) a ramp and spans the range.
        let ramp = RgbImage::from_fn(256, 4, |x, _| Rgb([x as u8; 3]));
        let eq = equalize(&ramp);
        assert_eq!(eq.get_pixel(0, 0).0[0], 0);
        assert!(eq.get_pixel(255, 0).0[0] >= 250);
    }

    #[test]
    fn identity_affine_is_exact_for_both_filters() {
        let img = pattern(17, 9);
        for resample in [Resample::Bilinear, Resample::Bicubic] {
            let out = affine_transform(&img, 17, 9, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], resample, FILL);
            assert_eq!(out, img, "{resample:?}");
        }
    }

    #[test]
    fn translate_shifts_and_fills_grey() {
        let img = pattern(20, 10);
        for resample in [Resample::Bilinear, Resample::Bicubic] {
            // Output x samples input x + 3: content moves left, the right strip is grey.
            let out =
                affine_transform(&img, 20, 10, [1.0, 0.0, 3.0, 0.0, 1.0, 0.0], resample, FILL);
            for y in 0..10 {
                for x in 0..17 {
                    assert_eq!(out.get_pixel(x, y), img.get_pixel(x + 3, y));
                }
                for x in 17..20 {
                    assert_eq!(*out.get_pixel(x, y), FILL);
                }
            }
        }
        // The random op keeps the size and moves by 0.05 * width = 2 px (40 px wide) either way.
        let img = pattern(40, 8);
        for seed in 0..8 {
            let out = apply_op(AugmentOp::TranslateXRel, &img, &mut rng(seed));
            assert_eq!(out.dimensions(), (40, 8));
            let left_grey = (0..8).all(|y| (0..2).all(|x| *out.get_pixel(x, y) == FILL));
            let right_grey = (0..8).all(|y| (38..40).all(|x| *out.get_pixel(x, y) == FILL));
            assert!(left_grey ^ right_grey, "seed {seed}");
        }
        // TranslateYRel: 0.15 * height = 3 px of a 20 px high image.
        let img = RgbImage::from_pixel(6, 20, Rgb([9, 9, 9]));
        let out = apply_op(AugmentOp::TranslateYRel, &img, &mut rng(11));
        let grey_rows = (0..20).filter(|&y| *out.get_pixel(0, y) == FILL).count();
        assert_eq!(grey_rows, 3);
    }

    #[test]
    fn shear_keeps_size_and_fills_corners() {
        let img = RgbImage::from_pixel(40, 20, Rgb([10, 20, 30]));
        for seed in 0..6 {
            let out = apply_op(AugmentOp::ShearX, &img, &mut rng(seed));
            assert_eq!(out.dimensions(), (40, 20));
            // |0.45| * 19.5 rows ≈ 9 px of shift at the bottom: one bottom corner is grey, the top-left
            // region close to the shear origin keeps the image.
            let corners = [*out.get_pixel(0, 19), *out.get_pixel(39, 19)];
            assert!(corners.contains(&FILL), "seed {seed}");
            assert_eq!(out.get_pixel(2, 0).0, [10, 20, 30]);
            assert!(out.pixels().all(|p| *p == FILL || p.0 == [10, 20, 30]));
        }
        // ShearY: 0.1 * 39.5 ≈ 4 px at the right edge.
        let out = apply_op(AugmentOp::ShearY, &img, &mut rng(12));
        assert_eq!(out.dimensions(), (40, 20));
        let grey_right = (0..20).filter(|&y| *out.get_pixel(39, y) == FILL).count();
        assert!((3..=4).contains(&grey_right), "{grey_right}");
        assert!((0..20).all(|y| *out.get_pixel(0, y) != FILL));
    }

    #[test]
    fn rotate_expands_like_pillow() {
        let img = fixture("synth_noise_100x32.png");
        // Same canvas rule as the exact nearest-neighbour rotate used for --rotation.
        for degrees in [15.0, -15.0, 30.0] {
            let expected = crate::preprocess::rotate_expand(&img, degrees as f32).dimensions();
            for resample in [Resample::Bilinear, Resample::Bicubic] {
                let out = rotate_expand(&img, degrees, resample, FILL);
                assert_eq!(out.dimensions(), expected, "{degrees} {resample:?}");
                assert_eq!(*out.get_pixel(0, 0), FILL);
                let (w, h) = out.dimensions();
                assert_eq!(*out.get_pixel(w - 1, h - 1), FILL);
            }
        }
        // 100x32 rotated by 15 degrees: the rotated corners span x -2.44..102.44, y -12.40..44.40.
        let out = apply_op(AugmentOp::Rotate, &img, &mut rng(13));
        assert_eq!(out.dimensions(), (106, 58));
        // A flat image stays flat inside the rotated rectangle.
        let flat = RgbImage::from_pixel(100, 32, Rgb([7, 8, 9]));
        let out = rotate_expand(&flat, 15.0, Resample::Bicubic, FILL);
        assert_eq!(out.get_pixel(53, 28).0, [7, 8, 9]);
        assert!(out.pixels().all(|p| *p == FILL || p.0 == [7, 8, 9]));
    }

    #[test]
    fn gaussian_blur_smooths_and_keeps_flat_images() {
        let flat = RgbImage::from_pixel(30, 12, Rgb([100, 50, 200]));
        assert_eq!(apply_op(AugmentOp::GaussianBlur, &flat, &mut rng(14)), flat);
        let mut line = RgbImage::from_pixel(31, 11, Rgb([0, 0, 0]));
        for y in 0..11 {
            line.put_pixel(15, y, Rgb([255, 255, 255]));
        }
        let out = apply_op(AugmentOp::GaussianBlur, &line, &mut rng(15));
        assert_eq!(out.dimensions(), (31, 11));
        let centre = out.get_pixel(15, 5).0[0];
        let side = out.get_pixel(16, 5).0[0];
        let far = out.get_pixel(25, 5).0[0];
        // Radius 1 (sigma 1): about 0.40 of the line stays in the centre column, 0.24 spreads to the next.
        assert!((80..=125).contains(&centre), "{centre}");
        assert!((40..=80).contains(&side), "{side}");
        assert_eq!(far, 0);
    }

    #[test]
    fn poisson_noise_is_shared_across_channels() {
        let img = RgbImage::from_pixel(120, 40, Rgb([128, 128, 128]));
        let out = apply_op(AugmentOp::PoissonNoise, &img, &mut rng(16));
        assert_eq!(out.dimensions(), (120, 40));
        let deltas: Vec<f64> = out
            .pixels()
            .map(|p| {
                assert!(p.0[0] == p.0[1] && p.0[1] == p.0[2]);
                f64::from(p.0[0]) - 128.0
            })
            .collect();
        let n = deltas.len() as f64;
        let mean = deltas.iter().sum::<f64>() / n;
        let mean_abs = deltas.iter().map(|d| d.abs()).sum::<f64>() / n;
        let up = deltas.iter().filter(|&&d| d > 0.0).count() as f64 / n;
        // lambda 21: E|noise| = 21, random sign.
        assert!(mean.abs() < 1.5, "{mean}");
        assert!((19.5..22.5).contains(&mean_abs), "{mean_abs}");
        assert!((0.45..0.55).contains(&up), "{up}");
        // Clipping at the ends of the range.
        let white = RgbImage::from_pixel(50, 50, Rgb([255, 255, 255]));
        let out = apply_op(AugmentOp::PoissonNoise, &white, &mut rng(17));
        assert!(out.pixels().any(|p| p.0[0] == 255) && out.pixels().any(|p| p.0[0] < 255));
    }

    #[test]
    fn every_op_handles_fixtures_and_tiny_images() {
        let images = [
            fixture("synth_text_L_140x40.png"),
            fixture("synth_red_40x20.png"),
            RgbImage::from_pixel(1, 1, Rgb([3, 4, 5])),
            RgbImage::new(0, 0),
        ];
        for img in &images {
            for op in AugmentOp::ALL {
                let out = apply_op(op, img, &mut rng(18));
                if op == AugmentOp::Rotate {
                    assert!(out.width() >= img.width() && out.height() >= img.height());
                } else {
                    assert_eq!(out.dimensions(), img.dimensions(), "{}", op.name());
                }
            }
        }
    }

    #[test]
    fn rand_augment_picks_distinct_ops_deterministically() {
        let aug = RandAugment::default();
        let mut seen = std::collections::HashSet::new();
        let mut r = rng(19);
        for _ in 0..400 {
            let ops = aug.choose_ops(&mut r);
            assert_eq!(ops.len(), 3);
            assert!(
                ops[0] != ops[1] && ops[1] != ops[2] && ops[0] != ops[2],
                "{ops:?}"
            );
            seen.extend(ops);
        }
        assert_eq!(seen.len(), 16, "every op gets picked");
        assert_eq!(RandAugment::new(20, 5.0).choose_ops(&mut r).len(), 16);

        let img = fixture("synth_text_L_140x40.png");
        let a = aug.apply(&img, &mut rng(20));
        let b = aug.apply(&img, &mut rng(20));
        assert_eq!(a, b);
        let changed = (0..20)
            .filter(|&seed| aug.apply(&img, &mut rng(100 + seed)) != img)
            .count();
        // P(no op applied) = 1/8; nearly all seeds change the image.
        assert!(changed >= 12, "{changed}");
        assert_eq!(RandAugment::new(0, 5.0).apply(&img, &mut rng(21)), img);
    }
}
