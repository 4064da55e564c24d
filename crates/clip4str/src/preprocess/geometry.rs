//! Pillow's geometry for `Image.rotate(angle, expand=True)`, shared by `test.py --rotation` (nearest
//! neighbour, [`super::rotate_expand`]) and RandAugment's rotation (bilinear or bicubic, in `data::augment`):
//! the same matrix, rounding and canvas size, whatever the resampling.

/// Python's `round(x, 15)` (what `Image.rotate` applies to its cosines and sines): correctly rounded to 15
/// decimals, then back to the nearest double.
fn round_15(x: f64) -> f64 {
    format!("{x:.15}").parse().unwrap_or(x)
}

/// The inverse affine matrix (output -> input pixel) of a counter-clockwise rotation by `degrees` about the
/// centre of a `width` x `height` image, and the grown canvas `(width, height)`: `ceil(max) - floor(min)` of the
/// rotated corners, the image centred in it. Computed in `Image.rotate`'s operation order; the caller applies
/// Pillow's `angle % 360` and its transpose shortcuts first where it wants them.
pub(crate) fn rotate_expand_matrix(width: u32, height: u32, degrees: f64) -> ([f64; 6], u32, u32) {
    let (w, h) = (f64::from(width), f64::from(height));
    let radians = -(degrees * (std::f64::consts::PI / 180.0));
    let (cos, sin) = (round_15(radians.cos()), round_15(radians.sin()));
    let mut m = [cos, sin, 0.0, -sin, cos, 0.0];
    let apply =
        |m: &[f64; 6], x: f64, y: f64| (m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5]);
    let (cx, cy) = (w / 2.0, h / 2.0);
    let (tx, ty) = apply(&m, -cx, -cy);
    m[2] = tx + cx;
    m[5] = ty + cy;
    let corners = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)].map(|(x, y)| apply(&m, x, y));
    let (mut min_x, mut max_x, mut min_y, mut max_y) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in corners {
        min_x = min_x.min(x);
        max_x = max_x.max(x);
        min_y = min_y.min(y);
        max_y = max_y.max(y);
    }
    let new_w = max_x.ceil() - min_x.floor();
    let new_h = max_y.ceil() - min_y.floor();
    let (tx, ty) = apply(&m, -(new_w - w) / 2.0, -(new_h - h) / 2.0);
    m[2] = tx;
    m[5] = ty;
    let to_u32 = |v: f64| v.clamp(0.0, f64::from(u32::MAX)) as u32;
    (m, to_u32(new_w), to_u32(new_h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_15_is_pythons_round() {
        // round(math.cos(math.radians(-30)), 15) and round(0.1 + 0.2, 15) in CPython.
        assert_eq!(round_15((-30f64).to_radians().cos()), 0.866025403784439);
        assert_eq!(round_15(0.1 + 0.2), 0.3);
        assert_eq!(round_15(-0.5), -0.5);
    }

    #[test]
    fn canvas_sizes_are_pillows() {
        // Image.new("RGB", (40, 10)).rotate(a, expand=True).size in Pillow 13.0.
        for (degrees, size) in [(90.0, (10, 40)), (30.0, (40, 30)), (-12.5, (42, 20))] {
            let (_, w, h) = rotate_expand_matrix(40, 10, degrees);
            assert_eq!((w, h), size, "{degrees} degrees");
        }
        let (m, _, _) = rotate_expand_matrix(40, 10, 90.0);
        assert_eq!([m[0], m[4]], [0.0, 0.0], "cos 90 rounds to exactly 0");
    }
}
