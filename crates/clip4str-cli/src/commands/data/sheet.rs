//! The contact sheet of `data show`: a grid of sample images, each scaled to fit a fixed box, with its label
//! drawn underneath in the embedded Caladea font (SIL OFL, licence beside the font file).

use ab_glyph::{point, Font, FontRef, GlyphId, PxScale, ScaleFont};
use image::imageops::{overlay, resize, FilterType};
use image::{Rgb, RgbImage};

/// Caladea Regular, the test font of the repository (OFL; `tests/fixtures/fonts/Caladea-LICENSE.txt`).
const FONT: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/fonts/Caladea-Regular.ttf"
));

/// Tiles per row.
pub const COLUMNS: usize = 4;
/// Size of the box each image is scaled into, preserving its aspect ratio (pixels).
pub const BOX_WIDTH: u32 = 192;
/// Height of the image box (pixels).
pub const BOX_HEIGHT: u32 = 64;
/// Height of the caption strip under each image box (pixels).
pub const CAPTION_HEIGHT: u32 = 24;
/// Margin around and between tiles (pixels).
pub const GAP: u32 = 8;
/// Caption font size (pixels per em).
const CAPTION_PX: f32 = 18.0;

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const BOX_FILL: Rgb<u8> = Rgb([224, 224, 224]);
const UNREADABLE_FILL: Rgb<u8> = Rgb([240, 190, 190]);

/// One sample on the sheet: its decoded image (`None` when unreadable) and the caption under it.
#[derive(Debug, Clone)]
pub struct Tile {
    /// The decoded image, or `None` for a record that could not be read (drawn as a red box).
    pub image: Option<RgbImage>,
    /// The text under the image (the label).
    pub caption: String,
}

/// Pixel size (width, height) of a sheet of `count` tiles: up to [`COLUMNS`] per row.
pub fn sheet_size(count: usize) -> (u32, u32) {
    let columns = count.clamp(1, COLUMNS) as u32;
    let rows = count.div_ceil(COLUMNS).max(1) as u32;
    (
        GAP + columns * (BOX_WIDTH + GAP),
        GAP + rows * (BOX_HEIGHT + CAPTION_HEIGHT + GAP),
    )
}

/// Draws the tiles in reading order on a white sheet of [`sheet_size`].
pub fn render(tiles: &[Tile]) -> RgbImage {
    let font = FontRef::try_from_slice(FONT).expect("the embedded font is a valid TrueType file");
    let (width, height) = sheet_size(tiles.len());
    let mut sheet = RgbImage::from_pixel(width, height, BACKGROUND);
    for (index, tile) in tiles.iter().enumerate() {
        let x = GAP + (index % COLUMNS) as u32 * (BOX_WIDTH + GAP);
        let y = GAP + (index / COLUMNS) as u32 * (BOX_HEIGHT + CAPTION_HEIGHT + GAP);
        let fill = if tile.image.is_some() {
            BOX_FILL
        } else {
            UNREADABLE_FILL
        };
        fill_rect(&mut sheet, x, y, BOX_WIDTH, BOX_HEIGHT, fill);
        if let Some(image) = &tile.image {
            let fitted = fit(image);
            let left = x + (BOX_WIDTH - fitted.width()) / 2;
            let top = y + (BOX_HEIGHT - fitted.height()) / 2;
            overlay(&mut sheet, &fitted, i64::from(left), i64::from(top));
        }
        draw_caption(&mut sheet, &font, &tile.caption, x, y + BOX_HEIGHT);
    }
    sheet
}

/// The image scaled (up or down) to the largest size that fits the box with its aspect ratio kept.
fn fit(image: &RgbImage) -> RgbImage {
    let (width, height) = image.dimensions();
    if width == 0 || height == 0 {
        return RgbImage::new(1, 1);
    }
    let scale =
        (f64::from(BOX_WIDTH) / f64::from(width)).min(f64::from(BOX_HEIGHT) / f64::from(height));
    let scaled = |side: u32, limit: u32| ((f64::from(side) * scale).round() as u32).clamp(1, limit);
    let target = (scaled(width, BOX_WIDTH), scaled(height, BOX_HEIGHT));
    if target == (width, height) {
        return image.clone();
    }
    resize(image, target.0, target.1, FilterType::Triangle)
}

fn fill_rect(sheet: &mut RgbImage, x: u32, y: u32, width: u32, height: u32, colour: Rgb<u8>) {
    for py in y..(y + height).min(sheet.height()) {
        for px in x..(x + width).min(sheet.width()) {
            sheet.put_pixel(px, py, colour);
        }
    }
}

/// Advance width of `text` in pixels, with kerning.
fn text_width<F: Font>(font: &F, scale: PxScale, text: &str) -> f32 {
    let scaled = font.as_scaled(scale);
    let mut width = 0.0;
    let mut previous: Option<GlyphId> = None;
    for c in text.chars() {
        let id = font.glyph_id(c);
        if let Some(previous) = previous {
            width += scaled.kern(previous, id);
        }
        width += scaled.h_advance(id);
        previous = Some(id);
    }
    width
}

/// The caption as drawn: control characters shown as `?`, cut with an ellipsis to fit `max_width` pixels.
fn fitted_caption<F: Font>(font: &F, scale: PxScale, text: &str, max_width: f32) -> String {
    let printable: String = text
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text_width(font, scale, &printable) <= max_width {
        return printable;
    }
    let mut chars: Vec<char> = printable.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let candidate: String = chars.iter().chain(['…'].iter()).collect();
        if text_width(font, scale, &candidate) <= max_width {
            return candidate;
        }
    }
    "…".to_owned()
}

/// Draws the caption centred in the strip of width [`BOX_WIDTH`] whose top-left corner is (`x`, `y`).
fn draw_caption<F: Font>(sheet: &mut RgbImage, font: &F, text: &str, x: u32, y: u32) {
    let scale = PxScale::from(CAPTION_PX);
    let scaled = font.as_scaled(scale);
    let caption = fitted_caption(font, scale, text, BOX_WIDTH as f32 - 4.0);
    let width = text_width(font, scale, &caption);
    let mut caret = x as f32 + (BOX_WIDTH as f32 - width) / 2.0;
    // Centre the font's ascent..descent span vertically in the strip.
    let baseline = y as f32 + (CAPTION_HEIGHT as f32 + scaled.ascent() + scaled.descent()) / 2.0;
    let mut previous: Option<GlyphId> = None;
    for c in caption.chars() {
        let id = font.glyph_id(c);
        if let Some(previous) = previous {
            caret += scaled.kern(previous, id);
        }
        let glyph = id.with_scale_and_position(scale, point(caret, baseline));
        caret += scaled.h_advance(id);
        previous = Some(id);
        let Some(outline) = font.outline_glyph(glyph) else {
            continue;
        };
        let bounds = outline.px_bounds();
        outline.draw(|gx, gy, coverage| {
            let px = bounds.min.x as i64 + i64::from(gx);
            let py = bounds.min.y as i64 + i64::from(gy);
            let (Ok(px), Ok(py)) = (u32::try_from(px), u32::try_from(py)) else {
                return;
            };
            if px < sheet.width() && py < sheet.height() {
                let keep = 1.0 - coverage.clamp(0.0, 1.0);
                let pixel = sheet.get_pixel_mut(px, py);
                for channel in pixel.0.iter_mut() {
                    *channel = (f32::from(*channel) * keep).round() as u8;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_grid() {
        let tile_height = BOX_HEIGHT + CAPTION_HEIGHT + GAP;
        assert_eq!(sheet_size(1), (GAP + BOX_WIDTH + GAP, GAP + tile_height));
        assert_eq!(
            sheet_size(4),
            (GAP + 4 * (BOX_WIDTH + GAP), GAP + tile_height)
        );
        assert_eq!(
            sheet_size(5),
            (GAP + 4 * (BOX_WIDTH + GAP), GAP + 2 * tile_height)
        );
        assert_eq!(sheet_size(32).1, GAP + 8 * tile_height);
    }

    #[test]
    fn fit_keeps_the_aspect_ratio() {
        assert_eq!(fit(&RgbImage::new(128, 32)).dimensions(), (192, 48));
        assert_eq!(fit(&RgbImage::new(10, 100)).dimensions(), (6, 64));
        assert_eq!(fit(&RgbImage::new(4000, 1)).dimensions(), (192, 1));
    }

    #[test]
    fn long_captions_are_cut_and_captions_are_drawn() {
        let font = FontRef::try_from_slice(FONT).expect("font");
        assert_ne!(font.glyph_id('…').0, 0, "the font has an ellipsis");
        let scale = PxScale::from(CAPTION_PX);
        assert_eq!(fitted_caption(&font, scale, "a\tb", 100.0), "a?b");
        let long = "W".repeat(80);
        let cut = fitted_caption(&font, scale, &long, 100.0);
        assert!(cut.ends_with('…') && cut.len() < long.len(), "{cut}");
        assert!(text_width(&font, scale, &cut) <= 100.0);

        let tiles = [
            Tile {
                image: Some(RgbImage::from_pixel(40, 20, Rgb([0, 0, 255]))),
                caption: "Hello".to_owned(),
            },
            Tile {
                image: None,
                caption: "(unreadable)".to_owned(),
            },
        ];
        let sheet = render(&tiles);
        assert_eq!(sheet.dimensions(), sheet_size(2));
        // The image is centred in its box, the unreadable box is red, and the caption strip has dark ink.
        let centre = sheet.get_pixel(GAP + BOX_WIDTH / 2, GAP + BOX_HEIGHT / 2);
        assert_eq!(centre, &Rgb([0, 0, 255]));
        let second = sheet.get_pixel(2 * GAP + BOX_WIDTH + 2, GAP + 2);
        assert_eq!(second, &UNREADABLE_FILL);
        let strip_top = GAP + BOX_HEIGHT;
        let ink = (strip_top..strip_top + CAPTION_HEIGHT)
            .flat_map(|y| (GAP..GAP + BOX_WIDTH).map(move |x| (x, y)))
            .filter(|&(x, y)| sheet.get_pixel(x, y).0[0] < 128)
            .count();
        assert!(ink > 20, "caption ink pixels: {ink}");
    }
}
