//! Pixel work of the synthetic renderer: vector outlines (flattened to line segments, so any point-wise warp
//! such as an arc or a perspective applies exactly) filled into coverage masks with `ab_glyph_rasterizer`,
//! backgrounds, compositing and blur. Buffers are small (a few thousand pixels), so everything is plain
//! per-pixel loops over `f32`.

use ab_glyph::{point, OutlineCurve, Point};
use ab_glyph_rasterizer::Rasterizer;
use image::RgbImage;
use rand::{Rng, RngCore};

/// Linear RGB-ish colour in 0..=255 per channel (sRGB values, blended without gamma, like most renderers).
pub(super) type Rgb = [f32; 3];

/// Closed contours as line segments (any winding, non-zero fill), in whatever space the caller works in.
#[derive(Debug, Default, Clone)]
pub(super) struct Segments(pub Vec<[Point; 2]>);

/// Largest pieces a curve or line is cut into; bounds the work for huge glyphs.
const MAX_PIECES: usize = 32;

impl Segments {
    /// Appends one font outline curve mapped by `place` (font units to layout space). `px_per_unit` is the
    /// expected output scale, so curves are cut finely enough for ~0.1 px error; `max_len` (layout units)
    /// also cuts long straight lines, so that non-linear warps applied later bend them.
    pub fn push_curve(
        &mut self,
        curve: &OutlineCurve,
        place: impl Fn(Point) -> Point,
        px_per_unit: f32,
        max_len: f32,
    ) {
        match *curve {
            OutlineCurve::Line(p0, p1) => self.push_line(place(p0), place(p1), max_len),
            OutlineCurve::Quad(p0, p1, p2) => {
                let (p0, p1, p2) = (place(p0), place(p1), place(p2));
                let dev = second_difference(p0, p1, p2) * px_per_unit;
                let pieces = pieces_for(dev * 2.5, p0, p2, max_len);
                let mut prev = p0;
                for i in 1..=pieces {
                    let t = i as f32 / pieces as f32;
                    let next = lerp(lerp(p0, p1, t), lerp(p1, p2, t), t);
                    self.0.push([prev, next]);
                    prev = next;
                }
            }
            OutlineCurve::Cubic(p0, p1, p2, p3) => {
                let (p0, p1, p2, p3) = (place(p0), place(p1), place(p2), place(p3));
                let dev =
                    second_difference(p0, p1, p2).max(second_difference(p1, p2, p3)) * px_per_unit;
                let pieces = pieces_for(dev * 7.5, p0, p3, max_len);
                let mut prev = p0;
                for i in 1..=pieces {
                    let t = i as f32 / pieces as f32;
                    let (a, b, c) = (lerp(p0, p1, t), lerp(p1, p2, t), lerp(p2, p3, t));
                    let next = lerp(lerp(a, b, t), lerp(b, c, t), t);
                    self.0.push([prev, next]);
                    prev = next;
                }
            }
        }
    }

    /// Appends a straight edge, cut into pieces no longer than `max_len`.
    pub fn push_line(&mut self, p0: Point, p1: Point, max_len: f32) {
        let pieces = pieces_for(0.0, p0, p1, max_len);
        let mut prev = p0;
        for i in 1..=pieces {
            let next = lerp(p0, p1, i as f32 / pieces as f32);
            self.0.push([prev, next]);
            prev = next;
        }
    }

    /// Appends a closed polygon.
    pub fn push_polygon(&mut self, points: &[Point], max_len: f32) {
        for (i, &p) in points.iter().enumerate() {
            self.push_line(p, points[(i + 1) % points.len()], max_len);
        }
    }

    /// Moves every point through `f`.
    pub fn map(&mut self, f: impl Fn(Point) -> Point) {
        for [p0, p1] in &mut self.0 {
            *p0 = f(*p0);
            *p1 = f(*p1);
        }
    }

    /// Axis-aligned bounds `(min, max)`, or `None` when empty.
    pub fn bounds(&self) -> Option<(Point, Point)> {
        let mut points = self.0.iter().flatten();
        let first = *points.next()?;
        Some(points.fold((first, first), |(lo, hi), p| {
            (
                point(lo.x.min(p.x), lo.y.min(p.y)),
                point(hi.x.max(p.x), hi.y.max(p.y)),
            )
        }))
    }

    /// Fills the contours into a `w`×`h` coverage mask in 0..=1 (pixel coordinates, y down). Geometry outside
    /// the mask is clipped: pieces left of it are pushed onto its left edge (they still wind the pixels to
    /// their right), pieces right of it onto its right edge, where they cancel; rows outside are skipped by
    /// the rasterizer itself.
    pub fn rasterize(&self, w: usize, h: usize) -> Vec<f32> {
        let mut coverage = vec![0.0f32; w * h];
        if w == 0 || h == 0 {
            return coverage;
        }
        let mut raster = Rasterizer::new(w, h);
        let right = w as f32;
        for &[p0, p1] in &self.0 {
            if !(p0.x.is_finite() && p0.y.is_finite() && p1.x.is_finite() && p1.y.is_finite()) {
                continue;
            }
            // Split where the segment crosses x = 0 and x = w, then clamp each piece into [0, w].
            let mut cuts = [0.0f32, 1.0, 1.0, 1.0];
            let mut n = 1;
            let dx = p1.x - p0.x;
            if dx != 0.0 {
                for edge in [0.0, right] {
                    let t = (edge - p0.x) / dx;
                    if t > 0.0 && t < 1.0 {
                        cuts[n] = t;
                        n += 1;
                    }
                }
            }
            cuts[n] = 1.0;
            cuts[..=n].sort_by(f32::total_cmp);
            for pair in cuts[..=n].windows(2) {
                let (a, b) = (lerp(p0, p1, pair[0]), lerp(p0, p1, pair[1]));
                raster.draw_line(
                    point(a.x.clamp(0.0, right), a.y),
                    point(b.x.clamp(0.0, right), b.y),
                );
            }
        }
        raster.for_each_pixel(|i, alpha| coverage[i] = alpha.min(1.0));
        coverage
    }
}

fn pieces_for(curvature: f32, p0: Point, p1: Point, max_len: f32) -> usize {
    let by_curve = curvature.max(0.0).sqrt().ceil();
    let by_length = if max_len > 0.0 {
        (length(p1 - p0) / max_len).ceil()
    } else {
        1.0
    };
    (by_curve.max(by_length) as usize).clamp(1, MAX_PIECES)
}

/// `|a - 2b + c|`: how far a Bézier control polygon bends, which bounds the flattening error.
fn second_difference(a: Point, b: Point, c: Point) -> f32 {
    length(point(a.x - 2.0 * b.x + c.x, a.y - 2.0 * b.y + c.y))
}

fn length(p: Point) -> f32 {
    (p.x * p.x + p.y * p.y).sqrt()
}

fn lerp(a: Point, b: Point, t: f32) -> Point {
    point(a.x + (b.x - a.x) * t, a.y + (b.y - a.y) * t)
}

/// Rec. 601 luma of a colour, 0..=255.
pub(super) fn luminance(c: Rgb) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

/// A random colour of exactly luminance `target`: a random hue and saturation, then mixed towards black or
/// white (luma is linear in RGB, so the mix factor is exact).
pub(super) fn colour_with_luminance<R: Rng>(rng: &mut R, target: f32) -> Rgb {
    let grey = rng.random_range(0.0..255.0f32);
    let saturation = rng.random::<f32>().powi(2);
    let mut c = [0.0; 3];
    for channel in &mut c {
        *channel = grey + (rng.random_range(0.0..255.0f32) - grey) * saturation;
    }
    let target = target.clamp(0.0, 255.0);
    let l = luminance(c);
    if l < target {
        let t = (target - l) / (255.0 - l).max(1e-3);
        c.map(|v| v + (255.0 - v) * t)
    } else {
        let t = target / l.max(1e-3);
        c.map(|v| v * t)
    }
}

fn mix(a: Rgb, b: Rgb, t: f32) -> Rgb {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

/// A smooth random field in 0..=1 (value noise: a random grid, cell `cell` px, smoothstep-interpolated).
fn value_noise<R: Rng>(rng: &mut R, w: usize, h: usize, cell: f32) -> Vec<f32> {
    let cell = cell.max(1.0);
    let gw = (w as f32 / cell).ceil() as usize + 2;
    let gh = (h as f32 / cell).ceil() as usize + 2;
    let grid: Vec<f32> = (0..gw * gh).map(|_| rng.random::<f32>()).collect();
    let (ox, oy) = (rng.random::<f32>(), rng.random::<f32>());
    let mut field = vec![0.0; w * h];
    for y in 0..h {
        let gy = y as f32 / cell + oy;
        let (iy, fy) = (gy.floor() as usize, smoothstep(gy.fract()));
        for x in 0..w {
            let gx = x as f32 / cell + ox;
            let (ix, fx) = (gx.floor() as usize, smoothstep(gx.fract()));
            let at = |i: usize, j: usize| grid[(j.min(gh - 1)) * gw + i.min(gw - 1)];
            let top = at(ix, iy) + (at(ix + 1, iy) - at(ix, iy)) * fx;
            let bottom = at(ix, iy + 1) + (at(ix + 1, iy + 1) - at(ix, iy + 1)) * fx;
            field[y * w + x] = top + (bottom - top) * fy;
        }
    }
    field
}

fn smoothstep(t: f32) -> f32 {
    t * t * (3.0 - 2.0 * t)
}

/// A scene-like background of mean luminance about `luma`: flat, gradient, mottled texture, stripes, or
/// large soft colour blobs. `spread` bounds how far its luminance strays from `luma`, which keeps the
/// caller's text contrast.
pub(super) fn background<R: Rng>(
    rng: &mut R,
    w: usize,
    h: usize,
    luma: f32,
    spread: f32,
) -> Vec<Rgb> {
    let mut pick = || {
        let l = luma + rng.random_range(-spread..=spread);
        l.clamp(0.0, 255.0)
    };
    let (l1, l2) = (pick(), pick());
    let c1 = colour_with_luminance(rng, l1);
    let c2 = if rng.random_bool(0.6) {
        // Same hue family: a lighter/darker version of c1.
        let scale = l2 / luminance(c1).max(1.0);
        c1.map(|v| (v * scale).clamp(0.0, 255.0))
    } else {
        colour_with_luminance(rng, l2)
    };
    let roll = rng.random::<f32>();
    if roll < 0.3 {
        return vec![c1; w * h];
    }
    let field: Vec<f32> = if roll < 0.55 {
        let angle = rng.random_range(0.0..std::f32::consts::TAU);
        let (dx, dy) = (angle.cos(), angle.sin());
        let extent = (w as f32 * dx.abs() + h as f32 * dy.abs()).max(1.0);
        let origin = if dx < 0.0 { -(w as f32) * dx } else { 0.0 }
            + if dy < 0.0 { -(h as f32) * dy } else { 0.0 };
        (0..w * h)
            .map(|i| ((i % w) as f32 * dx + (i / w) as f32 * dy + origin) / extent)
            .collect()
    } else if roll < 0.8 {
        // Mottled surfaces (walls, paper, stone): two octaves of value noise.
        let cell = rng.random_range(2.0..(h as f32 * 0.6).max(3.0));
        let coarse = value_noise(rng, w, h, cell);
        let fine = value_noise(rng, w, h, (cell / 3.0).max(1.0));
        coarse
            .iter()
            .zip(&fine)
            .map(|(a, b)| 0.65 * a + 0.35 * b)
            .collect()
    } else if roll < 0.9 {
        let angle = rng.random_range(0.0..std::f32::consts::PI);
        let period = rng.random_range(3.0..(h as f32).max(4.0));
        let (dx, dy) = (angle.cos() / period, angle.sin() / period);
        let hard = rng.random_bool(0.5);
        (0..w * h)
            .map(|i| {
                let phase = ((i % w) as f32 * dx + (i / w) as f32 * dy).fract().abs();
                if hard {
                    f32::from(phase < 0.5)
                } else {
                    0.5 + 0.5 * (phase * std::f32::consts::TAU).sin()
                }
            })
            .collect()
    } else {
        // Large soft blobs of several colours (out-of-focus scenery).
        let cell = rng.random_range(h as f32 * 0.5..(h as f32 * 2.0).max(2.0));
        let red = value_noise(rng, w, h, cell);
        let green = value_noise(rng, w, h, cell);
        let blue = value_noise(rng, w, h, cell);
        let mut pixels = Vec::with_capacity(w * h);
        for i in 0..w * h {
            let c = [red[i] * 255.0, green[i] * 255.0, blue[i] * 255.0];
            // Keep the blob colour's luminance inside the allowed band.
            let l = luminance(c);
            let target = luma + (l - 127.5) / 127.5 * spread;
            let shift = target - l;
            pixels.push(c.map(|v| (v + shift).clamp(0.0, 255.0)));
        }
        return pixels;
    };
    field.into_iter().map(|t| mix(c1, c2, t)).collect()
}

/// Paints `colour` over `image` with per-pixel opacity `mask * opacity`.
pub(super) fn blend(image: &mut [Rgb], mask: &[f32], colour: Rgb, opacity: f32) {
    for (pixel, &m) in image.iter_mut().zip(mask) {
        let a = m * opacity;
        if a > 0.0 {
            *pixel = mix(*pixel, colour, a);
        }
    }
}

/// Paints a horizontal colour gradient (`left` to `right` across the width) through `mask`.
pub(super) fn blend_gradient(
    image: &mut [Rgb],
    mask: &[f32],
    w: usize,
    left: Rgb,
    right: Rgb,
    opacity: f32,
) {
    let denom = (w.max(2) - 1) as f32;
    for (i, (pixel, &m)) in image.iter_mut().zip(mask).enumerate() {
        let a = m * opacity;
        if a > 0.0 {
            let colour = mix(left, right, (i % w) as f32 / denom);
            *pixel = mix(*pixel, colour, a);
        }
    }
}

/// Grey-level dilation with a square of radius `r` px (separable running max), for outlined text.
pub(super) fn dilate(mask: &[f32], w: usize, h: usize, r: usize) -> Vec<f32> {
    let mut rows = vec![0.0f32; w * h];
    for y in 0..h {
        let row = &mask[y * w..(y + 1) * w];
        for x in 0..w {
            let (lo, hi) = (x.saturating_sub(r), (x + r).min(w - 1));
            rows[y * w + x] = row[lo..=hi].iter().copied().fold(0.0, f32::max);
        }
    }
    let mut out = vec![0.0f32; w * h];
    for y in 0..h {
        let (lo, hi) = (y.saturating_sub(r), (y + r).min(h - 1));
        for x in 0..w {
            out[y * w + x] = (lo..=hi).map(|yy| rows[yy * w + x]).fold(0.0, f32::max);
        }
    }
    out
}

fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    let radius = (sigma * 3.0).ceil().max(1.0) as i32;
    let mut kernel: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= sum);
    kernel
}

/// Separable convolution of any pixel type with `kx` along rows and `ky` along columns (edges clamped).
fn convolve<T: Copy + Default + PixelMath>(
    pixels: &mut [T],
    w: usize,
    h: usize,
    kx: &[f32],
    ky: &[f32],
) {
    let mut tmp = vec![T::default(); w * h];
    let rx = (kx.len() / 2) as isize;
    for y in 0..h {
        for x in 0..w {
            let mut acc = T::default();
            for (k, &weight) in kx.iter().enumerate() {
                let xx = (x as isize + k as isize - rx).clamp(0, w as isize - 1) as usize;
                acc = acc.add_scaled(pixels[y * w + xx], weight);
            }
            tmp[y * w + x] = acc;
        }
    }
    let ry = (ky.len() / 2) as isize;
    for y in 0..h {
        for x in 0..w {
            let mut acc = T::default();
            for (k, &weight) in ky.iter().enumerate() {
                let yy = (y as isize + k as isize - ry).clamp(0, h as isize - 1) as usize;
                acc = acc.add_scaled(tmp[yy * w + x], weight);
            }
            pixels[y * w + x] = acc;
        }
    }
}

/// What [`convolve`] needs from a pixel.
trait PixelMath {
    fn add_scaled(self, other: Self, weight: f32) -> Self;
}

impl PixelMath for f32 {
    fn add_scaled(self, other: f32, weight: f32) -> f32 {
        self + other * weight
    }
}

impl PixelMath for Rgb {
    fn add_scaled(self, other: Rgb, weight: f32) -> Rgb {
        [
            self[0] + other[0] * weight,
            self[1] + other[1] * weight,
            self[2] + other[2] * weight,
        ]
    }
}

/// Gaussian blur of a mask (soft shadows).
pub(super) fn blur_mask(mask: &mut [f32], w: usize, h: usize, sigma: f32) {
    if sigma > 0.05 {
        let kernel = gaussian_kernel(sigma);
        convolve(mask, w, h, &kernel, &kernel);
    }
}

/// Gaussian blur of the image (defocus), or a horizontal box of `motion` px (camera shake) when given.
pub(super) fn blur_image(image: &mut [Rgb], w: usize, h: usize, sigma: f32, motion: usize) {
    if motion > 1 {
        let kx = vec![1.0 / motion as f32; motion | 1];
        convolve(image, w, h, &kx, &[1.0]);
    } else if sigma > 0.05 {
        let kernel = gaussian_kernel(sigma);
        convolve(image, w, h, &kernel, &kernel);
    }
}

/// Uneven lighting: a linear brightness ramp across the crop in a random direction.
pub(super) fn shade<R: Rng>(rng: &mut R, image: &mut [Rgb], w: usize, h: usize) {
    let angle = rng.random_range(0.0..std::f32::consts::TAU);
    let strength = rng.random_range(0.1..0.4);
    let (dx, dy) = (angle.cos() / w.max(1) as f32, angle.sin() / h.max(1) as f32);
    for (i, pixel) in image.iter_mut().enumerate() {
        let t = ((i % w) as f32 - w as f32 / 2.0) * dx + ((i / w) as f32 - h as f32 / 2.0) * dy;
        let gain = 1.0 + strength * 2.0 * t;
        for v in pixel.iter_mut() {
            *v *= gain;
        }
    }
}

/// Sensor noise with standard deviation `sigma` (grey levels): the same for all channels, or per channel.
/// Each value is a sum of four uniforms (close enough to Gaussian, and cheap).
pub(super) fn add_noise<R: RngCore + Rng>(rng: &mut R, image: &mut RgbImage, sigma: f32) {
    let per_channel = rng.random_bool(0.4);
    // Four 16-bit uniforms sum to mean 2, variance 1/3.
    let scale = sigma * 3.0f32.sqrt();
    let draw = |rng: &mut R| {
        let bits = rng.next_u64();
        let sum: f32 = (0..4)
            .map(|k| ((bits >> (16 * k)) & 0xffff) as f32 / 65535.0)
            .sum();
        (sum - 2.0) * scale
    };
    for pixel in image.pixels_mut() {
        if per_channel {
            for v in pixel.0.iter_mut() {
                *v = (f32::from(*v) + draw(rng)).round().clamp(0.0, 255.0) as u8;
            }
        } else {
            let n = draw(rng);
            for v in pixel.0.iter_mut() {
                *v = (f32::from(*v) + n).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn clipped_square_covers_only_its_visible_part() {
        // A 6x4 square sticking out 3 px left and 3 px right of a 4 px wide mask.
        let mut square = Segments::default();
        let corners = [
            point(-3.0, 1.0),
            point(7.0, 1.0),
            point(7.0, 3.0),
            point(-3.0, 3.0),
        ];
        square.push_polygon(&corners, 0.0);
        let mask = square.rasterize(4, 5);
        for y in 0..5 {
            for x in 0..4 {
                let expected = if (1..3).contains(&y) { 1.0 } else { 0.0 };
                assert!(
                    (mask[y * 4 + x] - expected).abs() < 1e-4,
                    "({x},{y}) = {}",
                    mask[y * 4 + x]
                );
            }
        }
        let (lo, hi) = square.bounds().expect("bounds");
        assert_eq!((lo.x, lo.y, hi.x, hi.y), (-3.0, 1.0, 7.0, 3.0));
    }

    #[test]
    fn colours_hit_their_luminance_and_blur_keeps_mass() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for target in [0.0, 30.0, 128.0, 250.0] {
            let c = colour_with_luminance(&mut rng, target);
            assert!((luminance(c) - target).abs() < 0.5, "{c:?}");
        }
        let mut mask = vec![0.0; 9 * 9];
        mask[40] = 1.0;
        blur_mask(&mut mask, 9, 9, 1.0);
        assert!((mask.iter().sum::<f32>() - 1.0).abs() < 1e-3);
        assert!(dilate(&[0.0, 1.0, 0.0, 0.0], 4, 1, 1) == [1.0, 1.0, 1.0, 0.0]);
        let bg = background(&mut rng, 20, 8, 100.0, 20.0);
        assert_eq!(bg.len(), 160);
    }
}
