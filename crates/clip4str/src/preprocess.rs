//! Test-time image preprocessing, bit-exact with the reference (SPEC §10): Pillow's
//! `Image.open(f).convert('RGB')`, Pillow 9.x `img.resize((W, H), BICUBIC)`, torchvision
//! `ToTensor()` + `Normalize(mean, std)`, and `img.rotate(deg, expand=True)` for `--rotation`.
//!
//! Exactness matters because the recognizer is evaluated on small crops where a grey level of
//! difference can flip a character. JPEG goes through [`jpeg`], a decoder that reproduces
//! libjpeg-turbo (Pillow's JPEG library); other formats go through the `image` crate.

pub(crate) mod geometry;
mod jpeg;

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader, Limits, RgbImage};

/// Per-channel normalisation applied after the `/255` of `ToTensor`: `(x - mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalization {
    /// Subtracted from each channel (R, G, B) in `[0, 1]` units.
    pub mean: [f32; 3],
    /// Divides each channel (R, G, B) after the mean is subtracted.
    pub std: [f32; 3],
}

impl Normalization {
    /// Checkpoint metadata key under which our trainer records the normalisation its weights were trained
    /// with, so that reading uses the same one (released checkpoints have none and read with [`Self::TEST`]).
    pub const METADATA_KEY: &'static str = "normalization";

    /// `(x - 0.5) / 0.5`: what `read.py` and `test.py` use, so the one to reproduce reference
    /// predictions and benchmark numbers.
    pub const TEST: Self = Self {
        mean: [0.5; 3],
        std: [0.5; 3],
    };

    /// OpenAI CLIP mean/std, used by the reference for training and validation only. The values
    /// are rounded from the Python doubles to f32 exactly as `torch.as_tensor` does.
    pub const OPENAI: Self = Self {
        mean: [
            0.48145466_f64 as f32,
            0.4578275_f64 as f32,
            0.40821073_f64 as f32,
        ],
        std: [
            0.26862954_f64 as f32,
            0.26130258_f64 as f32,
            0.27577711_f64 as f32,
        ],
    };
}

/// Pillow's decompression-bomb threshold (`2 * Image.MAX_IMAGE_PIXELS`): [`decode_rgb`] refuses
/// larger images, as Pillow raises `DecompressionBombError` for them.
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

/// Why an image could not be turned into pixels.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No bytes at all.
    #[error("image data is empty")]
    Empty,
    /// The data ends before the image is complete.
    #[error("image data is truncated")]
    Truncated,
    /// The header announces more pixels than allowed (decompression-bomb guard).
    #[error("image is {width}x{height}, more than the limit of {max_pixels} pixels")]
    TooLarge {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// The limit that was exceeded.
        max_pixels: u64,
    },
    /// A target size of zero was requested.
    #[error("invalid target size {width}x{height}")]
    InvalidSize {
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
    },
    /// The format is not recognised, or a variant of it is not supported.
    #[error("unsupported image: {reason}")]
    Unsupported {
        /// What is unsupported.
        reason: String,
    },
    /// The data is corrupt.
    #[error("cannot decode image: {reason}")]
    Decode {
        /// The decoder's message.
        reason: String,
    },
}

/// Decodes an encoded image like Pillow's `Image.open(..).convert('RGB')`, refusing images over
/// [`DEFAULT_MAX_PIXELS`]. Alpha is dropped without compositing, grey is replicated, palettes are
/// expanded, 16-bit samples keep their high byte (16-bit grey is clamped to 255, as Pillow's mode
/// `I`), CMYK JPEGs are read with Adobe polarity. JPEG pixels match libjpeg-turbo exactly.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    decode_rgb_limited(bytes, DEFAULT_MAX_PIXELS)
}

/// [`decode_rgb`] with an explicit pixel limit, checked from the header before any pixel buffer
/// is allocated, so that untrusted files cannot exhaust memory.
pub fn decode_rgb_limited(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    // Pillow's JPEG plugin accepts files starting with SOI followed by any marker.
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        decode_jpeg(bytes, max_pixels)
    } else {
        decode_with_image_crate(bytes, max_pixels)
    }
}

fn decode_jpeg(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    let decoded = jpeg::decode(bytes, max_pixels).map_err(|error| match error {
        jpeg::JpegError::Truncated => ImageError::Truncated,
        jpeg::JpegError::Unsupported(reason) => ImageError::Unsupported { reason },
        jpeg::JpegError::TooLarge { width, height } => ImageError::TooLarge {
            width,
            height,
            max_pixels,
        },
        jpeg::JpegError::Invalid(_) => ImageError::Decode {
            reason: error.to_string(),
        },
    })?;
    let rgb: Vec<u8> = match decoded.color {
        jpeg::JpegColor::Gray => decoded.data.iter().flat_map(|&v| [v, v, v]).collect(),
        jpeg::JpegColor::Rgb => decoded.data,
        jpeg::JpegColor::Cmyk => decoded
            .data
            .chunks_exact(4)
            .flat_map(|px| {
                // Pillow reads JPEG CMYK as "CMYK;I" (inverted), then converts with cmyk2rgb.
                let [c, m, y, k] = [px[0], px[1], px[2], px[3]].map(|v| 255 - i32::from(v));
                let not_k = 255 - k;
                [c, m, y].map(|v| (not_k - mul_div_255(v, not_k)).clamp(0, 255) as u8)
            })
            .collect(),
    };
    rgb_image(decoded.width, decoded.height, rgb)
}

/// Pillow's `MULDIV255`: `a * b / 255` rounded, computed with shifts.
fn mul_div_255(a: i32, b: i32) -> i32 {
    let t = a * b + 128;
    ((t >> 8) + t) >> 8
}

fn rgb_image(width: u32, height: u32, data: Vec<u8>) -> Result<RgbImage, ImageError> {
    RgbImage::from_raw(width, height, data).ok_or_else(|| ImageError::Decode {
        reason: "decoded buffer does not match the image size".into(),
    })
}

fn decode_with_image_crate(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode {
            reason: e.to_string(),
        })?;
    let Some(format) = reader.format() else {
        return Err(ImageError::Unsupported {
            reason: "unrecognised image format".into(),
        });
    };
    let (width, height) = reader.into_dimensions().map_err(map_image_error)?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ImageError::TooLarge {
            width,
            height,
            max_pixels,
        });
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::no_limits();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // Room for the largest pixel type (4 x f32) plus decoder scratch space.
    limits.max_alloc = Some(u64::from(width) * u64::from(height) * 16 + (64 << 20));
    reader.limits(limits);
    let decoded = reader.decode().map_err(map_image_error)?;
    let gray16_is_mode_i = format == ImageFormat::Png && png_is_plain_gray16(bytes);
    Ok(to_rgb_like_pillow(decoded, gray16_is_mode_i))
}

fn map_image_error(error: image::ImageError) -> ImageError {
    match error {
        image::ImageError::Unsupported(e) => ImageError::Unsupported {
            reason: e.to_string(),
        },
        image::ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ImageError::Truncated
        }
        other => ImageError::Decode {
            reason: other.to_string(),
        },
    }
}

/// Whether a PNG is 16-bit greyscale without alpha channel (IHDR colour type 0), which Pillow
/// opens as mode `I` even when a tRNS chunk makes `image` report grey+alpha.
fn png_is_plain_gray16(bytes: &[u8]) -> bool {
    bytes.len() > 25 && &bytes[12..16] == b"IHDR" && bytes[24] == 16 && bytes[25] == 0
}

/// Pillow's `convert('RGB')` for the pixel types `image` produces.
fn to_rgb_like_pillow(decoded: DynamicImage, gray16_is_mode_i: bool) -> RgbImage {
    let (width, height) = (decoded.width(), decoded.height());
    let from_fn = |f: &dyn Fn(u32, u32) -> [u8; 3]| {
        RgbImage::from_fn(width, height, |x, y| image::Rgb(f(x, y)))
    };
    // Pillow keeps the high byte of 16-bit colour; 16-bit grey becomes mode I and is clamped.
    let high = |v: u16| (v >> 8) as u8;
    let clamp = |v: u16| v.min(255) as u8;
    match decoded {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgba8(rgba) => from_fn(&|x, y| {
            let p = rgba.get_pixel(x, y).0;
            [p[0], p[1], p[2]]
        }),
        DynamicImage::ImageLuma8(gray) => from_fn(&|x, y| [gray.get_pixel(x, y).0[0]; 3]),
        DynamicImage::ImageLumaA8(gray) => from_fn(&|x, y| [gray.get_pixel(x, y).0[0]; 3]),
        DynamicImage::ImageLuma16(gray) => from_fn(&|x, y| [clamp(gray.get_pixel(x, y).0[0]); 3]),
        DynamicImage::ImageLumaA16(gray) => from_fn(&|x, y| {
            let v = gray.get_pixel(x, y).0[0];
            [if gray16_is_mode_i { clamp(v) } else { high(v) }; 3]
        }),
        DynamicImage::ImageRgb16(rgb) => from_fn(&|x, y| rgb.get_pixel(x, y).0.map(high)),
        DynamicImage::ImageRgba16(rgba) => from_fn(&|x, y| {
            let p = rgba.get_pixel(x, y).0;
            [high(p[0]), high(p[1]), high(p[2])]
        }),
        other => other.to_rgb8(),
    }
}

/// Pillow 9.x `Image.resize((width, height), Image.BICUBIC)`, which is what torchvision's
/// `Resize(.., BICUBIC)` runs on a PIL image: separable cubic convolution (a = -0.5) whose
/// support widens with the downscale factor (antialiasing), 22-bit fixed-point weights, the
/// horizontal pass first into an 8-bit intermediate, then the vertical pass. Bit-exact.
/// A zero-sized target gives an empty image; an empty source gives black.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(width, height);
    }
    if (in_w, in_h) == (width, height) {
        return img.clone();
    }
    let (in_w, in_h, out_w, out_h) = (
        in_w as usize,
        in_h as usize,
        width as usize,
        height as usize,
    );
    let vertical = ResampleCoefficients::new(in_h, out_h);
    let src = img.as_raw();

    let (intermediate, inter_w, row_offset) = if in_w != out_w {
        // Only the source rows the vertical pass reads are resampled horizontally.
        let first = vertical.bounds[0].0;
        let last = vertical.bounds[out_h - 1].0 + vertical.bounds[out_h - 1].1;
        let horizontal = ResampleCoefficients::new(in_w, out_w);
        let mut tmp = vec![0u8; (last - first) * out_w * 3];
        for (y, out_row) in tmp.chunks_exact_mut(out_w * 3).enumerate() {
            let in_row = &src[(first + y) * in_w * 3..(first + y + 1) * in_w * 3];
            for (x, out_px) in out_row.chunks_exact_mut(3).enumerate() {
                let (start, weights) = horizontal.taps(x);
                let mut sums = [1i32 << (PRECISION_BITS - 1); 3];
                for (i, &w) in weights.iter().enumerate() {
                    let px = &in_row[(start + i) * 3..(start + i) * 3 + 3];
                    for c in 0..3 {
                        sums[c] = sums[c].wrapping_add(i32::from(px[c]).wrapping_mul(w));
                    }
                }
                out_px.copy_from_slice(&sums.map(clip8));
            }
        }
        (tmp, out_w, first)
    } else {
        (src.to_vec(), in_w, 0)
    };

    if in_h == out_h {
        return RgbImage::from_raw(width, height, intermediate)
            .expect("horizontal pass produced width x height pixels");
    }
    let stride = inter_w * 3;
    let mut out = vec![0u8; out_h * stride];
    for (y, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (start, weights) = vertical.taps(y);
        let start = start - row_offset;
        for (x, out_value) in out_row.iter_mut().enumerate() {
            let mut sum = 1i32 << (PRECISION_BITS - 1);
            for (i, &w) in weights.iter().enumerate() {
                let v = intermediate[(start + i) * stride + x];
                sum = sum.wrapping_add(i32::from(v).wrapping_mul(w));
            }
            *out_value = clip8(sum);
        }
    }
    RgbImage::from_raw(width, height, out).expect("vertical pass produced width x height pixels")
}

/// Fractional bits of Pillow's 8-bit resampling weights (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Pillow's `clip8`: drop the fraction bits and clamp to a byte.
#[inline]
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's cubic convolution kernel with `a = -0.5`, evaluated in the same operation order.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point weights of one resampling axis (Pillow's `precompute_coeffs` followed by
/// `normalize_coeffs_8bpc`).
struct ResampleCoefficients {
    /// Per output index: first source index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `ksize` weights per output index, the first `bounds[i].1` of them used.
    weights: Vec<i32>,
    ksize: usize,
}

impl ResampleCoefficients {
    fn new(in_size: usize, out_size: usize) -> Self {
        // Pillow computes the box width as a float difference, then widens to double.
        let scale = f64::from(in_size as f32) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = 2.0 * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut k = vec![0f64; ksize];
        for (xx, row) in weights.chunks_exact_mut(ksize).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C casts truncate toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let taps = (xmax - xmin).clamp(0, ksize as i64) as usize;
            let mut total = 0.0;
            for (x, slot) in k.iter_mut().take(taps).enumerate() {
                let w = bicubic_filter(((x as i64 + xmin) as f64 - center + 0.5) * ss);
                *slot = w;
                total += w;
            }
            for (slot, &w) in row.iter_mut().zip(&k[..taps]) {
                let w = if total != 0.0 { w / total } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                *slot = if w < 0.0 {
                    (-0.5 + scaled) as i32
                } else {
                    (0.5 + scaled) as i32
                };
            }
            bounds.push((xmin as usize, taps));
        }
        ResampleCoefficients {
            bounds,
            weights,
            ksize,
        }
    }

    /// First source index and the weights for output index `i`.
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (start, count) = self.bounds[i];
        (start, &self.weights[i * self.ksize..i * self.ksize + count])
    }
}

/// torchvision `ToTensor()` + `Normalize(mean, std)`: a `[3, H, W]` row-major float32 tensor
/// with `(u8 / 255 - mean) / std`, computed with float32 divisions exactly as torch does.
pub fn to_chw(img: &RgbImage, norm: &Normalization) -> Vec<f32> {
    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(px.0[c]) / 255.0 - norm.mean[c]) / norm.std[c];
        }
    }
    out
}

/// The whole reference test transform for one encoded image: decode like Pillow, resize to
/// `height x width` with Pillow bicubic (aspect ratio not kept), then [`to_chw`]. Returns a
/// `[3, height, width]` tensor.
pub fn preprocess(
    bytes: &[u8],
    height: u32,
    width: u32,
    norm: &Normalization,
) -> Result<Vec<f32>, ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::InvalidSize { width, height });
    }
    let img = decode_rgb(bytes)?;
    Ok(to_chw(&resize_bicubic(&img, width, height), norm))
}

/// Pillow `img.rotate(degrees, expand=True)` as used by `test.py --rotation`: counter-clockwise,
/// nearest neighbour, black outside the source, canvas grown to hold the whole rotated image
/// with Pillow's size rounding. Multiples of 90 degrees are exact transposes. A non-finite
/// angle returns the image unchanged.
pub fn rotate_expand(img: &RgbImage, degrees: f32) -> RgbImage {
    let angle = f64::from(degrees);
    if !angle.is_finite() {
        return img.clone();
    }
    // Python's `angle % 360.0` (result has the sign of the divisor).
    let angle = angle.rem_euclid(360.0);
    let (w, h) = img.dimensions();
    if angle == 0.0 {
        return img.clone();
    }
    if angle == 180.0 {
        return RgbImage::from_fn(w, h, |x, y| *img.get_pixel(w - 1 - x, h - 1 - y));
    }
    if angle == 90.0 {
        return RgbImage::from_fn(h, w, |x, y| *img.get_pixel(w - 1 - y, x));
    }
    if angle == 270.0 {
        return RgbImage::from_fn(h, w, |x, y| *img.get_pixel(y, h - 1 - x));
    }

    let (m, out_w, out_h) = geometry::rotate_expand_matrix(w, h, angle);
    let mut out = RgbImage::new(out_w, out_h);
    if m[1] == 0.0 && m[3] == 0.0 {
        affine_scale_nearest(img, &mut out, &m);
    } else {
        let fits = |x: f64, y: f64| {
            (x * m[0] + y * m[1] + m[2]).abs() < 32768.0
                && (x * m[3] + y * m[4] + m[5]).abs() < 32768.0
        };
        let (ow, oh) = (f64::from(out_w), f64::from(out_h));
        if fits(0.0, 0.0) && fits(ow, oh) && fits(0.0, oh) && fits(ow, 0.0) {
            affine_fixed_nearest(img, &mut out, &m);
        } else {
            affine_float_nearest(img, &mut out, &m);
        }
    }
    out
}

/// Pillow's `COORD`: truncate toward zero, with every negative value mapping to -1.
fn coord(v: f64) -> i64 {
    if v < 0.0 {
        -1
    } else {
        v as i64
    }
}

/// Pillow's nearest-neighbour affine transform in 16.16 fixed point (`affine_fixed`), the path
/// taken whenever all mapped corners stay within +-32768.
fn affine_fixed_nearest(src: &RgbImage, out: &mut RgbImage, m: &[f64; 6]) {
    let fix = |v: f64| (v * 65536.0 + 0.5).floor() as i32;
    let (a0, a1, a3, a4) = (fix(m[0]), fix(m[1]), fix(m[3]), fix(m[4]));
    let mut a2 = fix(m[2] + m[0] * 0.5 + m[1] * 0.5);
    let mut a5 = fix(m[5] + m[3] * 0.5 + m[4] * 0.5);
    let (in_w, in_h) = (src.width() as i32, src.height() as i32);
    let out_w = out.width();
    for y in 0..out.height() {
        let (mut xx, mut yy) = (a2, a5);
        for x in 0..out_w {
            let xin = xx >> 16;
            let yin = yy >> 16;
            if (0..in_w).contains(&xin) && (0..in_h).contains(&yin) {
                out.put_pixel(x, y, *src.get_pixel(xin as u32, yin as u32));
            }
            xx = xx.wrapping_add(a0);
            yy = yy.wrapping_add(a3);
        }
        a2 = a2.wrapping_add(a1);
        a5 = a5.wrapping_add(a4);
    }
}

/// Pillow's floating-point nearest-neighbour affine transform, used for very large canvases.
fn affine_float_nearest(src: &RgbImage, out: &mut RgbImage, m: &[f64; 6]) {
    let mut xo = m[2] + m[1] * 0.5 + m[0] * 0.5;
    let mut yo = m[5] + m[4] * 0.5 + m[3] * 0.5;
    let (in_w, in_h) = (i64::from(src.width()), i64::from(src.height()));
    let out_w = out.width();
    for y in 0..out.height() {
        let (mut xx, mut yy) = (xo, yo);
        for x in 0..out_w {
            let xin = coord(xx);
            let yin = coord(yy);
            if (0..in_w).contains(&xin) && (0..in_h).contains(&yin) {
                out.put_pixel(x, y, *src.get_pixel(xin as u32, yin as u32));
            }
            xx += m[0];
            yy += m[3];
        }
        xo += m[1];
        yo += m[4];
    }
}

/// Pillow's `ImagingScaleAffine`, taken when the rounded matrix has no rotation terms (angles a
/// hair away from 0 or 360 degrees). Columns between the first and last valid ones that map
/// outside the source read column 0, as Pillow's zero-initialised lookup table does.
fn affine_scale_nearest(src: &RgbImage, out: &mut RgbImage, m: &[f64; 6]) {
    let (in_w, in_h) = (i64::from(src.width()), i64::from(src.height()));
    let out_w = out.width() as usize;
    let mut xo = m[2] + m[0] * 0.5;
    let mut yo = m[5] + m[4] * 0.5;
    let mut column = vec![0u32; out_w];
    let (mut xmin, mut xmax) = (out_w, 0usize);
    for (x, slot) in column.iter_mut().enumerate() {
        let xin = coord(xo);
        if (0..in_w).contains(&xin) {
            xmax = x + 1;
            xmin = xmin.min(x);
            *slot = xin as u32;
        }
        xo += m[0];
    }
    for y in 0..out.height() {
        let yin = coord(yo);
        if (0..in_h).contains(&yin) {
            for (x, &xin) in column.iter().enumerate().take(xmax).skip(xmin) {
                out.put_pixel(x as u32, y, *src.get_pixel(xin, yin as u32));
            }
        }
        yo += m[4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};

    fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), format)
            .expect("encoding a test image");
        bytes
    }

    fn gradient(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            Rgb([(x * 7 + y * 3) as u8, (x * 13) as u8, (255 - y * 5) as u8])
        })
    }

    #[test]
    fn resize_of_constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, Rgb([10, 128, 250]));
        for (w, h) in [(224, 224), (64, 64), (5, 3), (37, 100), (1, 1), (300, 7)] {
            let out = resize_bicubic(&img, w, h);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| p.0 == [10, 128, 250]), "{w}x{h}");
        }
    }

    #[test]
    fn resize_same_size_is_identity_and_zero_size_is_empty() {
        let img = gradient(9, 4);
        assert_eq!(resize_bicubic(&img, 9, 4), img);
        assert_eq!(resize_bicubic(&img, 0, 4).dimensions(), (0, 4));
        let empty = RgbImage::new(0, 0);
        assert!(resize_bicubic(&empty, 3, 2)
            .pixels()
            .all(|p| p.0 == [0, 0, 0]));
    }

    #[test]
    fn resize_one_axis_only() {
        // Width kept: only the vertical pass runs, so columns stay independent.
        let img = RgbImage::from_fn(3, 10, |x, _| Rgb([x as u8 * 100, 0, 0]));
        let out = resize_bicubic(&img, 3, 4);
        for (x, _, p) in out.enumerate_pixels() {
            assert_eq!(p.0, [x as u8 * 100, 0, 0]);
        }
    }

    #[test]
    fn resize_matches_pillow_on_small_case() {
        // Pillow 9.5.0: Image.frombytes('RGB', (4, 1), bytes([0,0,0, 255,255,255]*2))
        //   .resize((2, 3), Image.BICUBIC) -> every row (107, 107, 107), (148, 148, 148).
        let img = RgbImage::from_fn(4, 1, |x, _| Rgb([if x % 2 == 0 { 0 } else { 255 }; 3]));
        let out = resize_bicubic(&img, 2, 3);
        for y in 0..3 {
            assert_eq!(out.get_pixel(0, y).0, [107; 3]);
            assert_eq!(out.get_pixel(1, y).0, [148; 3]);
        }
    }

    #[test]
    fn bicubic_weights_sum_to_one_in_fixed_point() {
        for (input, output) in [(1774, 224), (30, 224), (224, 224), (7, 3)] {
            let coefficients = ResampleCoefficients::new(input, output);
            for i in 0..output {
                let taps = coefficients.taps(i).1;
                let sum: i32 = taps.iter().sum();
                // Each weight is rounded separately: at most half a unit off each.
                let tolerance = taps.len() as i32 / 2 + 1;
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= tolerance,
                    "{input}->{output}"
                );
            }
        }
    }

    #[test]
    fn to_chw_layout_and_values() {
        let img = RgbImage::from_fn(2, 1, |x, _| Rgb([0, 255, x as u8 * 51]));
        let t = to_chw(&img, &Normalization::TEST);
        assert_eq!(t.len(), 6);
        assert_eq!(&t[0..2], &[-1.0, -1.0]);
        assert_eq!(&t[2..4], &[1.0, 1.0]);
        assert_eq!(t[4], -1.0);
        assert_eq!(t[5], (51.0f32 / 255.0 - 0.5) / 0.5);
        let o = to_chw(&img, &Normalization::OPENAI);
        assert_eq!(o[0], (0.0 - 0.481_454_66_f32) / 0.268_629_54_f32);
    }

    #[test]
    fn rotate_multiples_of_90() {
        let img = gradient(3, 2);
        let r90 = rotate_expand(&img, 90.0);
        assert_eq!(r90.dimensions(), (2, 3));
        // Counter-clockwise: the top-right source pixel becomes the top-left one.
        assert_eq!(r90.get_pixel(0, 0), img.get_pixel(2, 0));
        assert_eq!(r90.get_pixel(1, 2), img.get_pixel(0, 1));
        let r270 = rotate_expand(&img, -90.0);
        assert_eq!(r270.get_pixel(0, 0), img.get_pixel(0, 1));
        let r180 = rotate_expand(&img, 180.0);
        assert_eq!(r180.get_pixel(0, 0), img.get_pixel(2, 1));
        assert_eq!(rotate_expand(&img, 360.0), img);
        assert_eq!(rotate_expand(&img, 0.0), img);
        assert_eq!(rotate_expand(&img, f32::NAN), img);
        let back = rotate_expand(&rotate_expand(&img, 90.0), 270.0);
        assert_eq!(back, img);
    }

    #[test]
    fn rotate_arbitrary_angle_matches_pillow() {
        // Pillow 9.5.0 on a 5x3 image with pixel value (10*x + y, 0, 0):
        //   im.rotate(30, expand=True) -> size (7, 7), red channel row by row below.
        let img = RgbImage::from_fn(5, 3, |x, y| Rgb([(10 * x + y) as u8 + 1, 0, 0]));
        let out = rotate_expand(&img, 30.0);
        assert_eq!(out.dimensions(), (7, 7));
        let red: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        let expected: [u8; 49] = [
            0, 0, 0, 0, 0, 0, 0, //
            0, 0, 0, 0, 41, 0, 0, //
            0, 0, 21, 31, 32, 42, 0, //
            0, 1, 12, 22, 33, 43, 0, //
            0, 2, 12, 23, 23, 0, 0, //
            0, 0, 3, 0, 0, 0, 0, //
            0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(red, expected);
    }

    #[test]
    fn rgba_png_drops_alpha_without_compositing() {
        let img = ImageBuffer::from_fn(3, 2, |x, y| Rgba([x as u8 * 80, y as u8 * 90, 7, 0]));
        let bytes = encode(DynamicImage::ImageRgba8(img), ImageFormat::Png);
        let rgb = decode_rgb(&bytes).expect("decoding RGBA PNG");
        assert_eq!(rgb.get_pixel(2, 1).0, [160, 90, 7]);
    }

    #[test]
    fn grey_png_is_replicated() {
        let img = ImageBuffer::from_fn(4, 2, |x, _| Luma([x as u8 * 60]));
        let rgb = decode_rgb(&encode(DynamicImage::ImageLuma8(img), ImageFormat::Png))
            .expect("decoding grey PNG");
        assert_eq!(rgb.get_pixel(3, 0).0, [180; 3]);
        let img = ImageBuffer::from_fn(2, 2, |_, _| LumaA([77u8, 3]));
        let rgb = decode_rgb(&encode(DynamicImage::ImageLumaA8(img), ImageFormat::Png))
            .expect("decoding grey+alpha PNG");
        assert_eq!(rgb.get_pixel(1, 1).0, [77; 3]);
    }

    #[test]
    fn sixteen_bit_png_like_pillow() {
        let img = ImageBuffer::from_fn(2, 1, |x, _| Rgb([0x12ffu16, 0xab00, x as u16 * 0x00ff]));
        let rgb = decode_rgb(&encode(DynamicImage::ImageRgb16(img), ImageFormat::Png))
            .expect("decoding 16-bit RGB PNG");
        assert_eq!(rgb.get_pixel(1, 0).0, [0x12, 0xab, 0x00]);
        // 16-bit grey opens as mode I in Pillow, whose RGB conversion clamps at 255.
        let img = ImageBuffer::from_fn(3, 1, |x, _| Luma([[100u16, 255, 4000][x as usize]]));
        let rgb = decode_rgb(&encode(DynamicImage::ImageLuma16(img), ImageFormat::Png))
            .expect("decoding 16-bit grey PNG");
        let got: Vec<u8> = rgb.pixels().map(|p| p.0[0]).collect();
        assert_eq!(got, [100, 255, 255]);
    }

    #[test]
    fn jpeg_roundtrip_is_close() {
        let img = gradient(37, 21);
        let bytes = encode(DynamicImage::ImageRgb8(img.clone()), ImageFormat::Jpeg);
        let rgb = decode_rgb(&bytes).expect("decoding JPEG");
        assert_eq!(rgb.dimensions(), (37, 21));
        let mean_abs: f64 = rgb
            .as_raw()
            .iter()
            .zip(img.as_raw())
            .map(|(&a, &b)| (f64::from(a) - f64::from(b)).abs())
            .sum::<f64>()
            / rgb.as_raw().len() as f64;
        assert!(mean_abs < 6.0, "mean abs error {mean_abs}");
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        assert!(matches!(decode_rgb(&[]), Err(ImageError::Empty)));
        assert!(decode_rgb(b"not an image at all").is_err());
        assert!(decode_rgb(&[0xFF, 0xD8, 0xFF]).is_err());
        assert!(decode_rgb(&[0xFF, 0xD8, 0xFF, 0xD9]).is_err());
        assert!(preprocess(b"\x89PNG\r\n\x1a\n", 224, 224, &Normalization::TEST).is_err());
        assert!(matches!(
            preprocess(&[1, 2, 3], 0, 224, &Normalization::TEST),
            Err(ImageError::InvalidSize { .. })
        ));
    }

    #[test]
    fn truncated_files_are_errors() {
        let img = DynamicImage::ImageRgb8(gradient(40, 30));
        for format in [ImageFormat::Png, ImageFormat::Jpeg] {
            let bytes = encode(img.clone(), format);
            for cut in [bytes.len() / 3, bytes.len() / 2, bytes.len() - 20] {
                assert!(
                    decode_rgb(&bytes[..cut]).is_err(),
                    "{format:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn corrupted_jpeg_never_panics() {
        let bytes = encode(DynamicImage::ImageRgb8(gradient(40, 30)), ImageFormat::Jpeg);
        let mut state = 0x1234_5678u32;
        for _ in 0..300 {
            let mut corrupted = bytes.clone();
            for _ in 0..4 {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let i = state as usize % corrupted.len();
                corrupted[i] = (state >> 24) as u8;
            }
            let _ = decode_rgb(&corrupted);
        }
    }

    #[test]
    fn pixel_limit_is_checked_from_the_header() {
        let img = DynamicImage::ImageRgb8(gradient(40, 30));
        for format in [ImageFormat::Png, ImageFormat::Jpeg] {
            let bytes = encode(img.clone(), format);
            assert!(decode_rgb_limited(&bytes, 1200).is_ok());
            match decode_rgb_limited(&bytes, 1199) {
                Err(ImageError::TooLarge {
                    width: 40,
                    height: 30,
                    max_pixels: 1199,
                }) => {}
                other => panic!("{format:?}: expected TooLarge, got {other:?}"),
            }
        }
    }
}
