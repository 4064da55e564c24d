//! Geometry of a synthetic word: glyph outlines set along a baseline with random tracking and per-glyph
//! wobble, then bent as vectors (italic shear, arc or wave, rotation, perspective), plus the line-art
//! distractors (underline, frame, stray lines, cut-off neighbour glyphs). Working on outlines rather than
//! pixels keeps every warp sharp and costs nothing per pixel.

use ab_glyph::{point, Font, GlyphId, Point};
use rand::Rng;

use super::fonts::{LoadedFont, ALPHANUMERIC};
use super::raster::Segments;

/// A word's outlines in ems (y down, baseline at 0), with any neighbour-glyph fragments kept apart so that
/// the crop can be placed to cut through them.
pub(super) struct Shape {
    pub text: Segments,
    /// A cut-off glyph of a neighbouring word before / after the text (not part of the label).
    pub fragments: [Option<Segments>; 2],
}

/// Sets `label` in `font` with random tracking, kerning jitter and per-glyph wobble, adds an underline or
/// neighbour fragments, then bends the whole line (shear, arc or wave, rotation, perspective).
pub(super) fn layout<R: Rng>(rng: &mut R, font: &LoadedFont, label: &str, height_px: f32) -> Shape {
    let unit = 1.0 / font.units_per_em;
    let f = &font.font;
    let stretch = if rng.random_bool(0.3) {
        rng.random_range(0.75..1.35)
    } else {
        1.0
    };
    // Letter spacing in ems: mostly natural, sometimes spaced out (signs), widest only for short labels so
    // that crops stay under ~30:1.
    let tracking = match rng.random::<f32>() {
        r if r < 0.75 => rng.random_range(-0.04..0.08),
        r if r < 0.93 || label.len() > 12 => rng.random_range(0.08..0.3),
        _ => rng.random_range(0.3..0.7),
    };
    let jitter = |rng: &mut R, p: f64, max: f32| {
        if rng.random_bool(p) {
            rng.random_range(0.0..max)
        } else {
            0.0
        }
    };
    let kern_jitter = jitter(rng, 0.3, 0.05);
    let rise_jitter = jitter(rng, 0.15, 0.06);
    let turn_jitter = jitter(rng, 0.1, 0.12);
    let size_jitter = jitter(rng, 0.1, 0.12);
    let shear = if rng.random_bool(0.15) {
        rng.random_range(-0.35..0.35)
    } else {
        0.0
    };
    let warp = match rng.random::<f32>() {
        r if r < 0.10 => {
            Warp::Arc(rng.random_range(0.3..1.6) * if rng.random_bool(0.5) { 1.0 } else { -1.0 })
        }
        r if r < 0.15 => Warp::Wave {
            amplitude: rng.random_range(0.03..0.1),
            periods: rng.random_range(0.5..1.5),
            phase: rng.random_range(0.0..std::f32::consts::TAU),
        },
        _ => Warp::None,
    };
    // Non-linear warps need straight edges cut so that they bend.
    let max_len = if matches!(warp, Warp::None) {
        0.0
    } else {
        0.05
    };

    let mut shape = Shape {
        text: Segments::default(),
        fragments: [None, None],
    };
    let place_glyph = |segments: &mut Segments, rng: &mut R, id: GlyphId, pen: f32| {
        let advance = f.h_advance_unscaled(id) * unit * stretch;
        let Some(outline) = f.outline(id) else {
            return advance;
        };
        let rise = rng.random_range(-1.0..=1.0) * rise_jitter;
        let (sin, cos) = (rng.random_range(-1.0..=1.0) * turn_jitter).sin_cos();
        let size = 1.0 + rng.random_range(-1.0..=1.0) * size_jitter;
        let centre = point(pen + advance / 2.0, -0.35);
        let place = |p: Point| {
            let x = (pen + p.x * unit * stretch - centre.x) * size;
            let y = (-p.y * unit - centre.y) * size;
            point(
                centre.x + x * cos - y * sin,
                centre.y + x * sin + y * cos + rise,
            )
        };
        for curve in &outline.curves {
            segments.push_curve(curve, place, height_px, max_len);
        }
        advance
    };

    let mut pen = 0.0f32;
    let mut previous: Option<GlyphId> = None;
    let mut last_gap = 0.0;
    for c in label.chars() {
        let id = f.glyph_id(c);
        if let Some(prev) = previous {
            pen += f.kern_unscaled(prev, id) * unit * stretch;
        }
        let advance = place_glyph(&mut shape.text, rng, id, pen);
        last_gap = tracking + rng.random_range(-1.0..=1.0) * kern_jitter;
        pen += advance + last_gap;
        previous = Some(id);
    }
    let width = (pen - last_gap).max(0.05);

    if rng.random_bool(0.07) {
        let top = rng.random_range(0.06..0.16);
        let bottom = top + rng.random_range(0.03..0.08);
        let (x0, x1) = (
            -rng.random_range(0.0..0.1),
            width + rng.random_range(0.0..0.1),
        );
        let corners = [
            point(x0, top),
            point(x1, top),
            point(x1, bottom),
            point(x0, bottom),
        ];
        shape.text.push_polygon(&corners, max_len);
    }
    if rng.random_bool(0.08) && label.len() >= 3 {
        // A neighbouring word's glyph, mostly outside the crop: real crops often catch a sliver of one. Not
        // next to very short labels, where the sliver would be as big as the text.
        let pick = |rng: &mut R| {
            let c = char::from(ALPHANUMERIC.as_bytes()[rng.random_range(0..ALPHANUMERIC.len())]);
            f.glyph_id(c)
        };
        let side = rng.random_range(0..3);
        if side != 1 {
            let id = pick(rng);
            let advance = f.h_advance_unscaled(id) * unit * stretch;
            let gap = rng.random_range(0.2..0.4);
            let mut fragment = Segments::default();
            place_glyph(&mut fragment, rng, id, -gap - advance);
            shape.fragments[0] = Some(fragment);
        }
        if side != 0 {
            let id = pick(rng);
            let gap = rng.random_range(0.2..0.4);
            let mut fragment = Segments::default();
            place_glyph(&mut fragment, rng, id, width + gap);
            shape.fragments[1] = Some(fragment);
        }
    }

    // Whole-line bends about the line's middle.
    let mid = point(width / 2.0, -0.35);
    let angle = match rng.random::<f32>() {
        r if r < 0.30 => rng.random_range(-0.12..0.12f32),
        r if r < 0.35 => {
            rng.random_range(0.12..0.4) * if rng.random_bool(0.5) { 1.0 } else { -1.0 }
        }
        _ => 0.0,
    };
    let (sin, cos) = angle.sin_cos();
    let bend = |p: Point| {
        let p = point(p.x - p.y * shear, p.y);
        let p = warp.apply(p, width);
        let (x, y) = (p.x - mid.x, p.y - mid.y);
        point(mid.x + x * cos - y * sin, mid.y + x * sin + y * cos)
    };
    shape.text.map(bend);
    for fragment in shape.fragments.iter_mut().flatten() {
        fragment.map(bend);
    }

    if rng.random_bool(0.3) {
        // Perspective: a homography that foreshortens towards one side and / or the top or bottom.
        if let Some((lo, hi)) = shape.text.bounds() {
            let centre = point((lo.x + hi.x) / 2.0, (lo.y + hi.y) / 2.0);
            let half = point(
                ((hi.x - lo.x) / 2.0).max(1e-3),
                ((hi.y - lo.y) / 2.0).max(1e-3),
            );
            // `a` makes one end taller than the other; `b` is keystone (top wider than bottom), which slants
            // the ends of the word by `b` half-widths per half-height, so it is scaled to slant them by at
            // most 0.25.
            let a = rng.random_range(-0.25..0.25f32);
            let b = rng.random_range(-0.25..0.25f32) * half.y / half.x;
            let project = |p: Point| {
                let (u, v) = ((p.x - centre.x) / half.x, (p.y - centre.y) / half.y);
                // Keep the denominator away from zero for fragments far outside the box.
                let w = (1.0 + a * u + b * v).max(0.3);
                point(centre.x + u / w * half.x, centre.y + v / w * half.y)
            };
            shape.text.map(project);
            for fragment in shape.fragments.iter_mut().flatten() {
                fragment.map(project);
            }
        }
    }
    shape
}

/// Non-linear baseline shapes.
#[derive(Clone, Copy)]
enum Warp {
    None,
    /// Text on a circle, turning through this many radians over its width (sign: arch or smile).
    Arc(f32),
    /// Sinusoidal baseline.
    Wave {
        amplitude: f32,
        periods: f32,
        phase: f32,
    },
}

impl Warp {
    fn apply(self, p: Point, width: f32) -> Point {
        match self {
            Warp::None => p,
            Warp::Arc(turn) => {
                // Circle of radius R centred R below (or above, R < 0) the middle of the baseline; a point's
                // distance from the baseline becomes its distance from the circle.
                let radius = width / turn;
                let angle = (p.x - width / 2.0) / radius;
                let rho = radius - p.y;
                point(width / 2.0 + rho * angle.sin(), radius - rho * angle.cos())
            }
            Warp::Wave {
                amplitude,
                periods,
                phase,
            } => {
                let t = p.x / width.max(1e-3) * periods * std::f32::consts::TAU + phase;
                point(p.x, p.y + amplitude * t.sin())
            }
        }
    }
}

/// A rectangular frame inside the crop's padding (sign borders, table cells), or on the crop's edge when
/// the padding is too thin.
pub(super) fn frame_segments<R: Rng>(
    rng: &mut R,
    w: usize,
    h: usize,
    pad: &[f32; 4],
    text_h_px: f32,
    px: f32,
) -> Segments {
    let thickness = rng.random_range(0.7..1.8) * px;
    let room = |p: f32| (p * text_h_px - thickness).max(0.0);
    let inset = |rng: &mut R, p: f32| rng.random_range(0.0..=room(p) * 0.8);
    let (x0, x1) = (inset(rng, pad[0]), w as f32 - inset(rng, pad[1]));
    let (y0, y1) = (inset(rng, pad[2]), h as f32 - inset(rng, pad[3]));
    let mut frame = Segments::default();
    frame.push_polygon(
        &[point(x0, y0), point(x1, y0), point(x1, y1), point(x0, y1)],
        0.0,
    );
    let (ix0, ix1, iy0, iy1) = (
        x0 + thickness,
        x1 - thickness,
        y0 + thickness,
        y1 - thickness,
    );
    if ix0 < ix1 && iy0 < iy1 {
        // Opposite winding cuts the inside out.
        frame.push_polygon(
            &[
                point(ix0, iy0),
                point(ix0, iy1),
                point(ix1, iy1),
                point(ix1, iy0),
            ],
            0.0,
        );
    }
    frame
}

/// One to three thin straight lines across the crop (cables, edges of other objects).
pub(super) fn stray_lines<R: Rng>(rng: &mut R, w: usize, h: usize, px: f32) -> Segments {
    let mut lines = Segments::default();
    let (wf, hf) = (w as f32, h as f32);
    for _ in 0..rng.random_range(1..=3) {
        let (a, b) = if rng.random_bool(0.6) {
            (
                point(-1.0, rng.random_range(0.0..hf)),
                point(wf + 1.0, rng.random_range(0.0..hf)),
            )
        } else {
            (
                point(rng.random_range(0.0..wf), -1.0),
                point(rng.random_range(0.0..wf), hf + 1.0),
            )
        };
        let half = rng.random_range(0.35..1.0) * px;
        let (dx, dy) = (b.x - a.x, b.y - a.y);
        let norm = (dx * dx + dy * dy).sqrt().max(1e-3);
        let (nx, ny) = (-dy / norm * half, dx / norm * half);
        lines.push_polygon(
            &[
                point(a.x + nx, a.y + ny),
                point(b.x + nx, b.y + ny),
                point(b.x - nx, b.y - ny),
                point(a.x - nx, a.y - ny),
            ],
            0.0,
        );
    }
    lines
}
