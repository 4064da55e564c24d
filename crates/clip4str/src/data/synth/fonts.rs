//! The font side of the synthesizer: finding font files, keeping only those that draw `0-9a-zA-Z` as
//! Latin letters with distinct cases, grouping them into design families (for family-first sampling and
//! the held-out split) and picking one that has every glyph of a label.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use ab_glyph::{point, Font, FontVec, Point};
use rand::Rng;
use rayon::prelude::*;

use super::raster::Segments;
use super::{FontSplit, HELDOUT_PERCENT};
use crate::charset::CHARSET_94;

/// The 62 characters every usable font must draw.
pub(super) const ALPHANUMERIC: &str =
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// Why a font file was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// The file could not be read.
    Unreadable(String),
    /// The bytes are not a TrueType / OpenType font.
    NotAFont,
    /// Some of `0-9a-zA-Z` have no outline (non-Latin scripts, symbol and icon fonts); lists them.
    MissingGlyphs(String),
    /// Lower case is drawn as capitals, so case-sensitive labels would be wrong.
    CapsOnly,
    /// Letters are drawn as something else (Greek, dingbats, key caps); holds the evidence.
    SymbolFont(String),
    /// Same bytes as an earlier file (Debian installs some fonts twice).
    Duplicate(PathBuf),
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::Unreadable(reason) => write!(f, "unreadable: {reason}"),
            SkipReason::NotAFont => f.write_str("not a TrueType/OpenType font"),
            SkipReason::MissingGlyphs(chars) => write!(f, "no glyphs for {chars:?}"),
            SkipReason::CapsOnly => f.write_str("capitals only"),
            SkipReason::SymbolFont(evidence) => write!(f, "symbol font ({evidence})"),
            SkipReason::Duplicate(first) => write!(f, "duplicate of {}", first.display()),
        }
    }
}

/// One font file that was not used, and why.
#[derive(Debug, Clone)]
pub struct SkippedFont {
    /// The font file.
    pub path: PathBuf,
    /// Why it was skipped.
    pub reason: SkipReason,
}

/// What happened to the configured font files.
#[derive(Debug, Clone, Default)]
pub struct FontReport {
    /// Fonts in use, in configuration order.
    pub loaded: Vec<PathBuf>,
    /// The design families among them (see [`font_family`]), sorted; fonts are drawn family first.
    pub families: Vec<String>,
    /// Files that could not be used.
    pub skipped: Vec<SkippedFont>,
    /// Files left out by the font split.
    pub other_split: usize,
}

/// The usual system font folders that exist on this machine (`/usr/share/fonts` and friends).
pub fn default_font_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![
        PathBuf::from("/usr/share/fonts"),
        PathBuf::from("/usr/local/share/fonts"),
        // Debian's fonts-texgyre installs here (fontconfig is told about it, we are not).
        PathBuf::from("/usr/share/texmf/fonts/opentype"),
    ];
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".local/share/fonts"));
        dirs.push(Path::new(&home).join(".fonts"));
    }
    dirs.retain(|d| d.is_dir());
    dirs
}

/// Every `.ttf` / `.otf` file under `dirs` (recursively, symlinks followed once, unreadable folders
/// skipped), each real file once, sorted by path so that font indices are reproducible.
pub fn discover_fonts(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut seen_files = HashSet::new();
    for root in dirs {
        let files: Vec<PathBuf> = if root.is_file() {
            vec![root.clone()]
        } else {
            crate::data::walk::walk(root)
                .into_iter()
                .filter_map(|item| match item {
                    Ok(crate::data::walk::Found::File(path)) => Some(path),
                    _ => None,
                })
                .collect()
        };
        for path in files {
            if is_font_file(&path) && seen_files.insert(path.canonicalize().unwrap_or(path.clone()))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn is_font_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("ttf") || e.eq_ignore_ascii_case("otf"))
}

/// Family-name words that name a width, weight, optical size or edition rather than a design.
const STYLE_WORDS: &[&str] = &[
    "condensed",
    "cond",
    "cn",
    "semicondensed",
    "narrow",
    "extended",
    "expanded",
    "thin",
    "hairline",
    "extralight",
    "ultralight",
    "light",
    "book",
    "regular",
    "medium",
    "semibold",
    "demibold",
    "demi",
    "bold",
    "extrabold",
    "ultrabold",
    "heavy",
    "black",
    "italic",
    "oblique",
    "display",
    "text",
    "caption",
    "keyboard",
    "o",
    "ps",
    "std",
    "pro",
    "minus",
    "no2",
    "no3",
    "math",
];

/// Designs shipped under several names (URW clones of the PostScript 35, their TeX Gyre and GNU FreeFont
/// derivatives, Carlito from Lato): one family each, so a held-out design is not seen under another name.
const CLONES: &[(&str, &str)] = &[
    ("nimbussans", "helvetica"),
    ("texgyreheros", "helvetica"),
    ("freesans", "helvetica"),
    ("nimbusroman", "times"),
    ("texgyretermes", "times"),
    ("freeserif", "times"),
    ("nimbusmono", "courier"),
    ("texgyrecursor", "courier"),
    ("freemono", "courier"),
    ("c059", "centuryschoolbook"),
    ("texgyreschola", "centuryschoolbook"),
    ("p052", "palatino"),
    ("texgyrepagella", "palatino"),
    ("urwbookman", "bookman"),
    ("texgyrebonum", "bookman"),
    ("urwgothic", "avantgarde"),
    ("texgyreadventor", "avantgarde"),
    ("z003", "zapfchancery"),
    ("texgyrechorus", "zapfchancery"),
    ("carlito", "lato"),
    // Chrome OS core fonts: Liberation 2 is built from them.
    ("arimo", "liberationsans"),
    ("tinos", "liberationserif"),
    ("cousine", "liberationmono"),
    // The Uralic fonts extend the URW base 35.
    ("bookmanuralic", "bookman"),
    ("chanceryuralic", "zapfchancery"),
    ("gothicuralic", "avantgarde"),
    ("monouralic", "courier"),
    ("palladiouralic", "palatino"),
    ("romanuralic", "times"),
    ("sansuralic", "helvetica"),
    ("schoolbookuralic", "centuryschoolbook"),
    // Computer Modern Unicode and Latin Modern are both Knuth's Computer Modern.
    ("cmuserif", "computermodern"),
    ("cmuserifupright", "computermodern"),
    ("cmuserifextra", "computermodern"),
    ("latinmodernroman", "computermodern"),
    ("latinmodernromanslanted", "computermodern"),
    ("latinmodernromanunslanted", "computermodern"),
    ("latinmodernromandunhill", "computermodern"),
    ("latinmodern", "computermodern"),
    ("cmusansserif", "computermodernsans"),
    ("latinmodernsans", "computermodernsans"),
    ("latinmodernsansquotation", "computermodernsans"),
    ("cmutypewriter", "computermoderntypewriter"),
    ("cmutypewritervariablewidth", "computermoderntypewriter"),
    ("latinmodernmono", "computermoderntypewriter"),
    ("latinmodernmonocaps", "computermoderntypewriter"),
    ("latinmodernmonoprop", "computermoderntypewriter"),
    ("latinmodernmonoslanted", "computermoderntypewriter"),
    // Width series of one road-sign design, and of one signage design.
    ("roadgeekseriesb", "roadgeek"),
    ("roadgeekseriesc", "roadgeek"),
    ("roadgeekseriesd", "roadgeek"),
    ("roadgeekseriese", "roadgeek"),
    ("roadgeekserieseem", "roadgeek"),
    ("roadgeekseriesem", "roadgeek"),
    ("roadgeekseriesf", "roadgeek"),
    ("tiresiasinfofont", "tiresias"),
    ("tiresiasinfofontz", "tiresias"),
    ("tiresiaskeyfontv2", "tiresias"),
    ("tiresiaslpfont", "tiresias"),
    ("tiresiaspcfont", "tiresias"),
    ("tiresiaspcfontz", "tiresias"),
    ("tiresiassignfont", "tiresias"),
    ("tiresiassignfontz", "tiresias"),
    ("opendyslexicalta", "opendyslexic"),
    ("opendyslexicmono", "opendyslexic"),
    ("aerialmono", "aerial"),
    ("gentiumalt", "gentium"),
    ("gentiumplus", "gentium"),
    ("routedgothichalf", "routedgothic"),
    ("routedgothicwide", "routedgothic"),
    ("routedgothicwidehalf", "routedgothic"),
    // Noto's script fonts carry Noto Sans's Latin.
    ("notosanssymbols", "notosans"),
    ("nototraditionalnushu", "notosans"),
];

/// The typographic family name (name ID 16, else 1) as stored in the font, if readable.
fn family_name(bytes: &[u8]) -> Option<String> {
    let face = ttf_parser::Face::parse(bytes, 0).ok()?;
    [16u16, 1].into_iter().find_map(|id| {
        face.names()
            .into_iter()
            .filter(|n| n.name_id == id && n.is_unicode())
            .find_map(|n| n.to_string())
            .filter(|n| !n.trim().is_empty())
    })
}

/// Family-name words of fonts whose letters are pictures (key caps, ornaments), not text.
const PICTURE_FONT_WORDS: &[&str] = &["keyboard", "dingbat", "ornament", "emoji", "icon"];

/// The design family of a font: its typographic family name (name ID 16, else 1; else the file name up to
/// the first `-`/`_`), lower-cased, without width/weight/edition words, with known clones merged
/// (`Roboto Condensed Light` -> `roboto`, `TeX Gyre Heros` -> `helvetica`). All styles of a design share
/// one family, so they land on the same side of the held-out split.
pub fn font_family(bytes: &[u8], path: &Path) -> String {
    let from_names = family_name(bytes);
    let from_file = || {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        stem.split(['-', '_']).next().unwrap_or_default().to_owned()
    };
    let key = design_key(&from_names.unwrap_or_else(from_file));
    CLONES
        .iter()
        .find(|(name, _)| *name == key)
        .map(|(_, design)| (*design).to_owned())
        .unwrap_or(key)
}

fn design_key(name: &str) -> String {
    let lower = name.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let kept: String = words
        .iter()
        .filter(|w| !STYLE_WORDS.contains(w) && !w.chars().all(|c| c.is_ascii_digit()))
        .copied()
        .collect();
    if kept.is_empty() {
        words.concat()
    } else {
        kept
    }
}

/// The side of the held-out split a font family falls on: a stable hash (FNV-1a) of its name, the same on
/// every machine; about [`HELDOUT_PERCENT`]% of families are held out.
pub fn family_split(family: &str) -> FontSplit {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in family.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    if hash % 100 < HELDOUT_PERCENT {
        FontSplit::Heldout
    } else {
        FontSplit::Train
    }
}

/// Position of `c` in `CHARSET_94` (the bit of a coverage mask).
fn charset_bit(c: char) -> Option<u32> {
    CHARSET_94.find(c).map(|i| i as u32)
}

/// Coverage mask of a label: which `CHARSET_94` characters it uses.
pub(super) fn label_mask(label: &str) -> u128 {
    label
        .chars()
        .filter_map(charset_bit)
        .fold(0, |mask, bit| mask | 1 << bit)
}

/// Why a font that covers `0-9a-zA-Z` still does not draw Latin text, if it does not: a picture-font family
/// name, or a glyph name behind `a` / `A` that says it is something else (URW Standard Symbols and
/// Dingbats map ASCII to Greek letters and ornaments under a Unicode cmap). Fonts without glyph names pass.
fn symbol_evidence(bytes: &[u8]) -> Option<String> {
    if let Some(name) = family_name(bytes) {
        let lower = name.to_lowercase();
        if PICTURE_FONT_WORDS.iter().any(|w| lower.contains(w)) {
            return Some(format!("family {name:?}"));
        }
    }
    let face = ttf_parser::Face::parse(bytes, 0).ok()?;
    ['a', 'A'].into_iter().find_map(|c| {
        let name = face.glyph_name(face.glyph_index(c)?)?;
        let expected = c.to_string();
        let latin = name == expected
            || name.starts_with(&format!("{c}."))
            || name.starts_with(&format!("{c}_"))
            || name.eq_ignore_ascii_case(&format!("uni{:04X}", u32::from(c)))
            || name.eq_ignore_ascii_case(&format!("u{:04X}", u32::from(c)));
        (!latin).then(|| format!("glyph {c:?} is named {name:?}"))
    })
}

/// Whether two glyphs have the same shape up to size: each outline is scaled to fill a 16x16 box and
/// rasterized, and the masks may differ by at most 8% on average (a/A, e/E, g/G, r/R differ by far more
/// in ordinary fonts).
fn same_shape(font: &FontVec, first: char, second: char) -> bool {
    const SIDE: usize = 16;
    let normalized = |c: char| {
        let outline = font.outline(font.glyph_id(c))?;
        let (min, max) = (outline.bounds.min, outline.bounds.max);
        let (w, h) = (
            (max.x - min.x).abs().max(1e-3),
            (max.y - min.y).abs().max(1e-3),
        );
        let (x0, y0) = (min.x.min(max.x), min.y.min(max.y));
        let mut segments = Segments::default();
        let fit = |p: Point| {
            point(
                (p.x - x0) / w * SIDE as f32,
                SIDE as f32 - (p.y - y0) / h * SIDE as f32,
            )
        };
        for curve in &outline.curves {
            segments.push_curve(curve, fit, 1.0, 0.0);
        }
        Some(segments.rasterize(SIDE, SIDE))
    };
    match (normalized(first), normalized(second)) {
        (Some(a), Some(b)) => {
            let diff: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum();
            diff / (SIDE * SIDE) as f32 <= 0.08
        }
        _ => false,
    }
}

/// A parsed font with what layout needs precomputed.
pub(super) struct LoadedFont {
    pub font: FontVec,
    /// Font units per em (layout works in ems).
    pub units_per_em: f32,
    /// Which `CHARSET_94` characters have an outline.
    coverage: u128,
}

/// What became of one font file.
enum Loaded {
    Font {
        font: LoadedFont,
        family: String,
        digest: u64,
    },
    OtherSplit,
    Skipped(SkipReason),
}

fn load_font(path: &Path, split: FontSplit) -> Loaded {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => return Loaded::Skipped(SkipReason::Unreadable(e.to_string())),
    };
    let family = font_family(&bytes, path);
    if split != FontSplit::All && family_split(&family) != split {
        return Loaded::OtherSplit;
    }
    match check_font(bytes) {
        Ok((font, digest)) => Loaded::Font {
            font,
            family,
            digest,
        },
        Err(reason) => Loaded::Skipped(reason),
    }
}

fn check_font(bytes: Vec<u8>) -> Result<(LoadedFont, u64), SkipReason> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    let digest = hasher.finish();
    if let Some(evidence) = symbol_evidence(&bytes) {
        return Err(SkipReason::SymbolFont(evidence));
    }
    let font = FontVec::try_from_vec(bytes).map_err(|_| SkipReason::NotAFont)?;
    let has_outline = |c: char| {
        let id = font.glyph_id(c);
        id.0 != 0 && font.outline(id).is_some()
    };
    let coverage = CHARSET_94
        .chars()
        .filter(|&c| has_outline(c))
        .filter_map(charset_bit)
        .fold(0u128, |mask, bit| mask | 1 << bit);
    let missing: String = ALPHANUMERIC
        .chars()
        .filter(|&c| charset_bit(c).is_none_or(|bit| coverage & (1 << bit) == 0))
        .collect();
    if !missing.is_empty() {
        return Err(SkipReason::MissingGlyphs(missing));
    }
    // Capitals-only and small-caps fonts draw lower case as (smaller) capitals.
    let caps_like = "aegr"
        .chars()
        .filter(|&c| same_shape(&font, c, c.to_ascii_uppercase()))
        .count();
    if caps_like >= 3 {
        return Err(SkipReason::CapsOnly);
    }
    let units_per_em = font
        .units_per_em()
        .filter(|u| *u > 0.0)
        .unwrap_or_else(|| (font.ascent_unscaled() - font.descent_unscaled()).max(1.0));
    Ok((
        LoadedFont {
            font,
            units_per_em,
            coverage,
        },
        digest,
    ))
}

/// The usable fonts, grouped by family.
pub(super) struct FontSet {
    pub fonts: Vec<LoadedFont>,
    /// Font indices per family, families in name order: fonts are drawn family first, so that a design
    /// shipped in 18 weights (Lato) is not 18 times as likely as one shipped in one.
    families: Vec<Vec<usize>>,
    pub report: FontReport,
}

impl FontSet {
    /// Reads and checks `paths` in parallel (results in path order, so indices are reproducible).
    pub fn load(paths: &[PathBuf], split: FontSplit) -> FontSet {
        let loaded: Vec<Loaded> = paths.par_iter().map(|p| load_font(p, split)).collect();
        let mut report = FontReport::default();
        let mut fonts = Vec::new();
        let mut by_family: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut digests: HashMap<u64, PathBuf> = HashMap::new();
        for (path, outcome) in paths.iter().zip(loaded) {
            let reason = match outcome {
                Loaded::OtherSplit => {
                    report.other_split += 1;
                    continue;
                }
                Loaded::Skipped(reason) => reason,
                Loaded::Font {
                    font,
                    family,
                    digest,
                } => match digests.get(&digest) {
                    Some(first) => SkipReason::Duplicate(first.clone()),
                    None => {
                        digests.insert(digest, path.clone());
                        by_family.entry(family).or_default().push(fonts.len());
                        fonts.push(font);
                        report.loaded.push(path.clone());
                        continue;
                    }
                },
            };
            report.skipped.push(SkippedFont {
                path: path.clone(),
                reason,
            });
        }
        report.families = by_family.keys().cloned().collect();
        FontSet {
            fonts,
            families: by_family.into_values().collect(),
            report,
        }
    }

    /// Each design family with the files of its fonts, families in name order.
    pub fn family_files(&self) -> impl Iterator<Item = (&str, Vec<&Path>)> {
        self.report
            .families
            .iter()
            .zip(&self.families)
            .map(|(name, members)| {
                let files = members
                    .iter()
                    .map(|&i| self.report.loaded[i].as_path())
                    .collect();
                (name.as_str(), files)
            })
    }

    /// A random font (family first, then style) that has a glyph for every character in `mask`, or `None`
    /// after a dozen misses.
    pub fn pick<R: Rng>(&self, rng: &mut R, mask: u128) -> Option<usize> {
        if self.families.is_empty() {
            return None;
        }
        for _ in 0..12 {
            let family = &self.families[rng.random_range(0..self.families.len())];
            let font = family[rng.random_range(0..family.len())];
            if self.fonts[font].coverage & mask == mask {
                return Some(font);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_merge_styles_and_clones() {
        let family = |name: &str| {
            let key = design_key(name);
            CLONES
                .iter()
                .find(|(n, _)| *n == key)
                .map(|(_, d)| (*d).to_owned())
                .unwrap_or(key)
        };
        assert_eq!(family("Roboto Condensed Light"), "roboto");
        assert_eq!(family("EB Garamond 08"), "ebgaramond");
        assert_eq!(family("Gillius ADF No2 Cond"), "gilliusadf");
        assert_eq!(family("TeX Gyre Heros Cn"), "helvetica");
        assert_eq!(family("Nimbus Sans Narrow"), "helvetica");
        assert_eq!(family("Noto Sans Display"), "notosans");
        // Clones and width series land on one side of the held-out split together.
        assert_eq!(family("Arimo"), family("Liberation Sans"));
        assert_eq!(family("CMU Serif"), family("Latin Modern Roman Slanted"));
        assert_eq!(
            family("CMU Typewriter Text"),
            family("Latin Modern Mono Prop")
        );
        assert_eq!(
            family("Roadgeek 2014 Series B"),
            family("Roadgeek 2014 Series EEM")
        );
        assert_eq!(family("Tiresias LPfont"), family("Tiresias Signfont Z"));
        assert_eq!(family("Schoolbook Uralic"), family("C059"));
        assert_eq!(family("Regular"), "regular");
        // Without a parsable name table the file name decides.
        assert_eq!(
            font_family(b"not a font", Path::new("/x/Lobster-Two.otf")),
            "lobster"
        );
    }

    #[test]
    fn split_is_stable_and_about_ten_percent() {
        assert_eq!(family_split("lato"), family_split("lato"));
        let heldout = (0..1000)
            .filter(|i| family_split(&format!("family{i}")) == FontSplit::Heldout)
            .count();
        assert!((60..140).contains(&heldout), "{heldout} of 1000 held out");
    }

    #[test]
    fn label_masks_use_charset_positions() {
        assert_eq!(label_mask("0"), 1);
        assert_eq!(label_mask("10"), 3);
        assert_eq!(label_mask("~"), 1 << 93);
    }
}
