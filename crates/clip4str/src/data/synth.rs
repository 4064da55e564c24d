//! Synthetic word crops in the spirit of MJSynth / SynthText, for training the case-sensitive 94-character
//! model: a label ([`text`]) is set in a random system font, bent and warped as vectors (kerning and
//! tracking jitter, per-glyph wobble, italic shear, arcs and waves, rotation, perspective), filled over a
//! colour or texture background with optional outline, shadow, underline, frame, stray lines and cut-off
//! neighbour glyphs, then degraded (lighting, blur, low resolution, noise, JPEG) and cropped tightly or
//! loosely. [`text`] draws labels, [`fonts`] finds and checks fonts, [`layout`] does the geometry and
//! [`raster`] the pixels; this file holds the public API and the order of the steps.
//!
//! Sample `i` is a pure function of `(seed, i)`: its random stream is ChaCha8 stream `i` of the seed, so
//! datasets come out identical whatever the thread count or generation order (on one machine: the
//! rasterizer picks SIMD code by CPU, which may move a pixel by one level elsewhere).

mod dataset;
mod fonts;
mod layout;
mod raster;
mod text;

use std::path::{Path, PathBuf};

use ab_glyph::{point, Point};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::imageops::FilterType;
use image::{ImageEncoder, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::preprocess::decode_rgb;
use fonts::{label_mask, FontSet, ALPHANUMERIC};
use raster::Segments;

pub use dataset::{SynthDataset, SynthSpec};
pub use fonts::{
    default_font_dirs, discover_fonts, family_split, font_family, FontReport, SkipReason,
    SkippedFont,
};
pub use text::{default_word_files, fold_word, load_words};

/// Longest label the recognizer is trained on (the reference's `max_label_length`).
pub const MAX_LABEL_LENGTH: usize = 25;

/// Share of font families held out for testing on unseen fonts, in percent.
pub const HELDOUT_PERCENT: u64 = 10;

/// Which fonts a synthesizer may use: all, or one side of the family-level train / held-out split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FontSplit {
    /// Every usable font.
    #[default]
    All,
    /// The ~90% of font families not held out.
    Train,
    /// The ~10% of font families reserved for a test set with unseen fonts.
    Heldout,
}

/// Everything that defines a synthetic dataset besides the sample count.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    /// Dataset seed; sample `i` depends only on `(seed, i)` (and the fonts and words).
    pub seed: u64,
    /// Font files (`.ttf` / `.otf`), e.g. from [`discover_fonts`]; unusable ones are skipped and reported.
    pub fonts: Vec<PathBuf>,
    /// Which side of the held-out font split to draw from.
    pub font_split: FontSplit,
    /// Dictionary words (already in `CHARSET_94`, e.g. from [`load_words`]); empty: a built-in list.
    pub words: Vec<String>,
    /// Fixed output size `[height, width]` in pixels; `None` keeps the natural crop size.
    pub size: Option<[u32; 2]>,
    /// Range of natural crop heights in pixels, inclusive (the width follows the text).
    pub height: [u32; 2],
    /// Longest label generated (characters).
    pub max_label_length: usize,
    /// Share of labels drawn long ([`LONG_LABEL`] to `max_label_length` characters, lengths spread evenly):
    /// the natural mix has few words of 16 or more characters, and a model trained on it reads none. 0 keeps
    /// every sample identical to a generator without the option.
    pub long_share: f32,
}

/// Shortest label [`SynthConfig::long_share`] counts as long.
pub const LONG_LABEL: usize = 12;

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            fonts: Vec::new(),
            font_split: FontSplit::All,
            words: Vec::new(),
            size: None,
            height: [32, 64],
            max_label_length: MAX_LABEL_LENGTH,
            long_share: 0.0,
        }
    }
}

/// Why a synthesizer could not be built or a sample not produced.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// No font file at all where fonts were looked for.
    #[error("no .ttf/.otf fonts found in {}", .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    NoFontFiles {
        /// The files and folders searched.
        searched: Vec<PathBuf>,
    },
    /// No font survived loading and the split filter.
    #[error("no usable font ({candidates} candidate files, {skipped} skipped as unusable, {other_split} in the other split)")]
    NoFonts {
        /// Font files given.
        candidates: usize,
        /// Files that could not be used (see [`FontReport::skipped`]).
        skipped: usize,
        /// Files excluded by [`SynthConfig::font_split`].
        other_split: usize,
    },
    /// A file could not be read.
    #[error("{}: {error}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        error: std::io::Error,
    },
    /// A configuration value is out of range.
    #[error("invalid synth configuration: {0}")]
    InvalidConfig(String),
    /// Encoding an image failed.
    #[error("image encoding failed: {0}")]
    Encode(image::ImageError),
    /// Decoding a JPEG this module just encoded failed (a bug, reported rather than panicking).
    #[error("JPEG round trip failed: {0}")]
    Decode(crate::preprocess::ImageError),
}

// By hand rather than `#[from]`, which would also return the cause from `source()`: the message prints it
// already, and a printed chain would show it twice.
impl From<image::ImageError> for SynthError {
    fn from(error: image::ImageError) -> Self {
        Self::Encode(error)
    }
}

impl From<crate::preprocess::ImageError> for SynthError {
    fn from(error: crate::preprocess::ImageError) -> Self {
        Self::Decode(error)
    }
}

/// What a synthesizer draws from: font files and a word list.
#[derive(Debug, Clone)]
pub struct Sources {
    /// Font files found.
    pub fonts: Vec<PathBuf>,
    /// Words of the list, folded and filtered by [`load_words`]; empty: the built-in list.
    pub words: Vec<String>,
    /// The word list read, if any.
    pub word_file: Option<PathBuf>,
}

/// Finds the fonts and words the way `clip4str synth` and dataset specs do: font files under `fonts` (files or
/// folders; empty: the system font folders), and the word list `words` (`None`: the system one if present, else
/// the built-in list) with words of up to `max_label_length` characters.
pub fn find_sources(
    fonts: &[PathBuf],
    words: Option<&Path>,
    max_label_length: usize,
) -> Result<Sources, SynthError> {
    let searched = if fonts.is_empty() {
        default_font_dirs()
    } else {
        fonts.to_vec()
    };
    let found = discover_fonts(&searched);
    if found.is_empty() {
        return Err(SynthError::NoFontFiles { searched });
    }
    let word_file = words
        .map(Path::to_path_buf)
        .or_else(|| default_word_files().pop());
    let words = match &word_file {
        Some(file) => load_words(file, max_label_length)?,
        None => Vec::new(),
    };
    Ok(Sources {
        fonts: found,
        words,
        word_file,
    })
}

/// Encoded image format of [`Synthesizer::render_encoded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// Lossless PNG.
    #[default]
    Png,
    /// JPEG at a per-sample random quality (55-95), itself a source of compression artefacts.
    Jpeg,
}

/// The synthetic word-image generator: fonts loaded once, then [`Synthesizer::render`] per sample, from
/// any number of threads.
pub struct Synthesizer {
    seed: u64,
    size: Option<[u32; 2]>,
    height: [u32; 2],
    max_label_length: usize,
    long_share: f32,
    words: Vec<String>,
    fonts: FontSet,
}

impl std::fmt::Debug for Synthesizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synthesizer")
            .field("seed", &self.seed)
            .field("size", &self.size)
            .field("fonts", &self.fonts.fonts.len())
            .field("families", &self.fonts.report.families.len())
            .field("words", &self.words.len())
            .finish()
    }
}

impl Synthesizer {
    /// Loads the configured fonts (in parallel; unusable files are skipped and listed in
    /// [`Synthesizer::font_report`]) and checks the configuration.
    pub fn new(cfg: SynthConfig) -> Result<Self, SynthError> {
        let [h_min, h_max] = cfg.height;
        if h_min < 8 || h_min > h_max || h_max > 1024 {
            return Err(SynthError::InvalidConfig(format!(
                "crop height range {h_min}-{h_max} must lie within 8-1024"
            )));
        }
        if let Some([h, w]) = cfg.size {
            if !(4..=4096).contains(&h) || !(4..=4096).contains(&w) {
                return Err(SynthError::InvalidConfig(format!(
                    "output size {h}x{w} must be 4-4096 on each side"
                )));
            }
        }
        if cfg.max_label_length == 0 {
            return Err(SynthError::InvalidConfig(
                "max_label_length must be at least 1".to_owned(),
            ));
        }
        if !(0.0..=1.0).contains(&cfg.long_share) {
            return Err(SynthError::InvalidConfig(format!(
                "long_share {} is not from 0 to 1",
                cfg.long_share
            )));
        }
        if cfg.long_share > 0.0 && cfg.max_label_length < LONG_LABEL {
            return Err(SynthError::InvalidConfig(format!(
                "long_share needs labels of {LONG_LABEL} or more characters, but max_label_length is {}",
                cfg.max_label_length
            )));
        }
        let fonts = FontSet::load(&cfg.fonts, cfg.font_split);
        if fonts.fonts.is_empty() {
            return Err(SynthError::NoFonts {
                candidates: cfg.fonts.len(),
                skipped: fonts.report.skipped.len(),
                other_split: fonts.report.other_split,
            });
        }
        let mut words: Vec<String> = cfg
            .words
            .iter()
            .filter_map(|w| fold_word(w, cfg.max_label_length))
            .collect();
        if words.is_empty() {
            words = text::builtin_words();
        }
        Ok(Self {
            seed: cfg.seed,
            size: cfg.size,
            height: cfg.height,
            max_label_length: cfg.max_label_length,
            long_share: cfg.long_share,
            words,
            fonts,
        })
    }

    /// Which fonts are in use and which were skipped, for the caller to report.
    pub fn font_report(&self) -> &FontReport {
        &self.fonts.report
    }

    /// Each design family in use with its font files (for listing which designs a split holds).
    pub fn font_families(&self) -> impl Iterator<Item = (&str, Vec<&Path>)> {
        self.fonts.family_files()
    }

    /// Number of words the text sampler draws from.
    pub fn num_words(&self) -> usize {
        self.words.len()
    }

    /// Renders sample `index`: its label (1..=max_label_length characters of `CHARSET_94`) and image
    /// (natural crop size, or the configured fixed size).
    pub fn render(&self, index: u64) -> Result<(String, RgbImage), SynthError> {
        let mut rng = self.rng(index);
        self.render_with(&mut rng)
    }

    /// [`Synthesizer::render`] plus encoding; a JPEG's quality is drawn from the sample's own random stream,
    /// so the bytes are as reproducible as the pixels.
    pub fn render_encoded(
        &self,
        index: u64,
        format: OutputFormat,
    ) -> Result<(String, Vec<u8>), SynthError> {
        let mut rng = self.rng(index);
        let (label, image) = self.render_with(&mut rng)?;
        let bytes = match format {
            OutputFormat::Png => encode_png(&image)?,
            OutputFormat::Jpeg => encode_jpeg(&image, rng.random_range(55..=95))?,
        };
        Ok((label, bytes))
    }

    /// The label of sample `index` without rendering it (the text is drawn first from the sample's stream):
    /// what an on-the-fly dataset needs to filter labels before training.
    pub fn label(&self, index: u64) -> String {
        self.pick_text_and_font(&mut self.rng(index)).0
    }

    fn rng(&self, index: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index);
        rng
    }

    /// Draws a label and a font that has all of its glyphs.
    fn pick_text_and_font(&self, rng: &mut ChaCha8Rng) -> (String, usize) {
        for _ in 0..8 {
            // The long draw only when asked for, so that specs without it keep their samples.
            let long = self.long_share > 0.0 && rng.random::<f32>() < self.long_share;
            let label = if long {
                text::sample_long_label(rng, &self.words, LONG_LABEL, self.max_label_length)
            } else {
                text::sample_label(rng, &self.words, self.max_label_length)
            };
            let mask = label_mask(&label);
            if let Some(font) = self.fonts.pick(rng, mask) {
                return (label, font);
            }
        }
        // Punctuation no font has, again and again: every loaded font has all alphanumerics.
        let len = rng.random_range(1..=self.max_label_length.min(10));
        let label = (0..len)
            .map(|_| char::from(ALPHANUMERIC.as_bytes()[rng.random_range(0..ALPHANUMERIC.len())]))
            .collect();
        (label, rng.random_range(0..self.fonts.fonts.len()))
    }

    fn render_with(&self, rng: &mut ChaCha8Rng) -> Result<(String, RgbImage), SynthError> {
        let (label, font_index) = self.pick_text_and_font(rng);
        let font = &self.fonts.fonts[font_index];
        let height_px = rng.random_range(self.height[0]..=self.height[1]) as f32;

        // 1. Geometry, in ems (y down, baseline at 0).
        let mut shape = layout::layout(rng, font, &label, height_px);
        let (lo, hi) = shape
            .text
            .bounds()
            .unwrap_or((point(0.0, -0.7), point(0.5, 0.0)));

        // 2. Crop box: tight, normal or loose padding, independently per side, in text heights.
        let text_h = (hi.y - lo.y).max(0.5);
        let text_w = (hi.x - lo.x).max(0.25);
        let pad_range = match rng.random::<f32>() {
            r if r < 0.35 => 0.0..0.06,
            r if r < 0.85 => 0.04..0.25,
            _ => 0.2..0.6,
        };
        let mut pad = [0.0f32; 4]; // left, right, top, bottom
        for p in &mut pad {
            *p = rng.random_range(pad_range.clone());
        }
        let framed = rng.random_bool(0.05);
        if framed {
            // Room for a frame that does not touch the glyphs.
            pad.iter_mut().for_each(|p| *p = p.max(0.15));
        }
        // A neighbour glyph shows only its inner 10-35%: the crop edge cuts through it.
        let [left, right] = std::mem::take(&mut shape.fragments);
        if let Some((f_lo, f_hi)) = left.as_ref().and_then(Segments::bounds) {
            let edge = f_hi.x - rng.random_range(0.1..0.35) * (f_hi.x - f_lo.x);
            if edge < lo.x {
                pad[0] = (lo.x - edge) / text_h;
                shape.text.0.extend(left.into_iter().flat_map(|f| f.0));
            }
        }
        if let Some((f_lo, f_hi)) = right.as_ref().and_then(Segments::bounds) {
            let edge = f_lo.x + rng.random_range(0.1..0.35) * (f_hi.x - f_lo.x);
            if edge > hi.x {
                pad[1] = (edge - hi.x) / text_h;
                shape.text.0.extend(right.into_iter().flat_map(|f| f.0));
            }
        }
        let canvas_h = text_h * (1.0 + pad[2] + pad[3]);
        let canvas_w = text_w + text_h * (pad[0] + pad[1]);
        // Very wide strings (25 widely spaced characters) are scaled down rather than made huge.
        let scale = (height_px / canvas_h).min(2000.0 / canvas_w);
        let h = ((canvas_h * scale).round() as usize).max(4);
        let w = ((canvas_w * scale).round() as usize).max(4);
        let origin = point(
            lo.x - text_h * pad[0] - (text_w - (hi.x - lo.x)) / 2.0,
            lo.y - text_h * pad[2] - (text_h - (hi.y - lo.y)) / 2.0,
        );
        let to_px = |p: Point| point((p.x - origin.x) * scale, (p.y - origin.y) * scale);
        shape.text.map(to_px);
        // Effect sizes are given for text 28 px high (a tight 32 px crop).
        let text_px = text_h * scale;
        let px = text_px / 28.0;

        // 3. Colours: background luminance, then text far enough from it.
        let bg_luma = rng.random_range(0.0..=255.0f32);
        let contrast = if rng.random_bool(0.15) {
            rng.random_range(45.0..70.0)
        } else {
            rng.random_range(70.0..200.0f32)
        };
        let text_luma = pick_text_luma(rng, bg_luma, contrast);
        let spread = (contrast * 0.3).min(40.0);
        let mut image = raster::background(rng, w, h, bg_luma, spread);
        let text_colour = raster::colour_with_luminance(rng, text_luma);
        // Translucent text only where contrast is high, so the effective contrast stays above ~45 levels.
        let opacity = if contrast > 90.0 && rng.random_bool(0.2) {
            rng.random_range(0.65..0.95)
        } else {
            1.0
        };

        // 4. Layers under and over the text.
        let mask = shape.text.rasterize(w, h);
        if rng.random_bool(0.1) {
            let shadow_luma = (bg_luma.min(text_luma) * 0.4).min(60.0);
            let shadow = raster::colour_with_luminance(rng, shadow_luma);
            let offset = point(
                rng.random_range(-2.5..2.5) * px,
                rng.random_range(0.5..2.5) * px,
            );
            let mut shifted = shape.text.clone();
            shifted.map(|p| point(p.x + offset.x, p.y + offset.y));
            let mut shadow_mask = shifted.rasterize(w, h);
            raster::blur_mask(&mut shadow_mask, w, h, rng.random_range(0.0..1.5) * px);
            raster::blend(&mut image, &shadow_mask, shadow, rng.random_range(0.5..0.9));
        }
        if rng.random_bool(0.1) {
            let radius = ((rng.random_range(0.6..1.8) * px).round() as usize).max(1);
            let stroke_luma = if text_luma > 127.0 {
                rng.random_range(0.0..60.0)
            } else {
                rng.random_range(190.0..=255.0)
            };
            let stroke = raster::colour_with_luminance(rng, stroke_luma);
            raster::blend(
                &mut image,
                &raster::dilate(&mask, w, h, radius),
                stroke,
                1.0,
            );
        }
        if rng.random_bool(0.12) {
            let shift = if text_luma > bg_luma { -1.0 } else { 1.0 };
            let other_luma = text_luma + shift * rng.random_range(0.0..contrast * 0.5);
            let other = raster::colour_with_luminance(rng, other_luma);
            let (left, right) = if rng.random_bool(0.5) {
                (text_colour, other)
            } else {
                (other, text_colour)
            };
            raster::blend_gradient(&mut image, &mask, w, left, right, opacity);
        } else {
            raster::blend(&mut image, &mask, text_colour, opacity);
        }
        if framed {
            let frame = layout::frame_segments(rng, w, h, &pad, text_h * scale, px);
            let colour = if rng.random_bool(0.6) {
                text_colour
            } else {
                raster::colour_with_luminance(rng, text_luma)
            };
            raster::blend(&mut image, &frame.rasterize(w, h), colour, 1.0);
        }
        if rng.random_bool(0.06) {
            let lines = layout::stray_lines(rng, w, h, px);
            let luma = rng.random_range(0.0..=255.0);
            let colour = raster::colour_with_luminance(rng, luma);
            raster::blend(
                &mut image,
                &lines.rasterize(w, h),
                colour,
                rng.random_range(0.5..1.0),
            );
        }

        // 5. Photometric degradations.
        if rng.random_bool(0.25) {
            raster::shade(rng, &mut image, w, h);
        }
        if rng.random_bool(0.04) {
            let length = rng.random_range(2..=((4.0 * px).round() as usize).max(3));
            raster::blur_image(&mut image, w, h, 0.0, length);
        } else if rng.random_bool(0.35) {
            // Faint text gets only light blur and noise, so that degradations do not stack into illegibility.
            let faint = (contrast / 100.0).min(1.0);
            raster::blur_image(&mut image, w, h, rng.random_range(0.3..1.2) * px * faint, 0);
        }
        let mut rgb = RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let c = image[y as usize * w + x as usize];
            image::Rgb(c.map(|v| v.round().clamp(0.0, 255.0) as u8))
        });
        if rng.random_bool(0.12) {
            // Low resolution, but with the text still at least 12 px high.
            let factor = rng.random_range(0.3..0.7f32).max((12.0 / text_px).min(1.0));
            let (sw, sh) = (
                ((w as f32 * factor) as u32).max(2),
                ((h as f32 * factor) as u32).max(2),
            );
            let small = image::imageops::resize(&rgb, sw, sh, FilterType::Triangle);
            rgb = image::imageops::resize(&small, w as u32, h as u32, FilterType::Triangle);
        }
        if let Some([out_h, out_w]) = self.size {
            rgb = image::imageops::resize(&rgb, out_w, out_h, FilterType::Triangle);
        }
        if rng.random_bool(0.4) {
            let sigma = rng.random_range(2.0..12.0f32).min(contrast / 6.0);
            raster::add_noise(rng, &mut rgb, sigma);
        }
        if rng.random_bool(0.2) {
            let bytes = encode_jpeg(&rgb, rng.random_range(15..=70))?;
            rgb = decode_rgb(&bytes)?;
        }
        Ok((label, rgb))
    }
}

/// A text luminance `contrast` away from the background, on whichever side has room (the larger side
/// when neither has).
fn pick_text_luma<R: Rng>(rng: &mut R, bg_luma: f32, contrast: f32) -> f32 {
    let darker = bg_luma - contrast;
    let lighter = bg_luma + contrast;
    match (darker >= 0.0, lighter <= 255.0) {
        (true, true) => {
            if rng.random_bool(0.5) {
                darker
            } else {
                lighter
            }
        }
        (true, false) => darker,
        (false, true) => lighter,
        (false, false) => {
            if bg_luma > 127.5 {
                0.0
            } else {
                255.0
            }
        }
    }
}

/// Encodes an image as PNG (fast compression: synthetic datasets are written once and read many times,
/// but PNG size matters less than generation speed).
pub fn encode_png(image: &RgbImage) -> Result<Vec<u8>, SynthError> {
    let mut bytes = Vec::new();
    PngEncoder::new(&mut bytes).write_image(
        image.as_raw(),
        image.width(),
        image.height(),
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(bytes)
}

/// Encodes an image as baseline JPEG at `quality` (1-100).
pub fn encode_jpeg(image: &RgbImage, quality: u8) -> Result<Vec<u8>, SynthError> {
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, quality.clamp(1, 100)).write_image(
        image.as_raw(),
        image.width(),
        image.height(),
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(bytes)
}
