//! The part of `ftfy.fix_text` (ftfy 6.3, default settings) that the reference runs on every caption before
//! BPE (`basic_clean`). Exact for ASCII input, which is what CLIP4STR's own captions are: HTML entities
//! (ftfy's stricter decoder, repeated until nothing changes and switched off from the first line holding a
//! `<`), terminal escapes, control characters, line breaks. For other text it also does ftfy's table-driven
//! repairs (C1 controls, Latin ligatures, full-width forms, curly quotes, NFC) and the common mojibake case
//! (UTF-8 read as Latin-1 / Windows-1252); ftfy's badness heuristic and its other code pages are left out.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::{Captures, Regex};
use unicode_normalization::UnicodeNormalization;

use super::html::{self, CP1252_C1};
use super::html5_entities::HTML5_ENTITIES;

/// ftfy's `max_decode_length`: a line longer than this (in characters) is fixed in pieces.
const MAX_SEGMENT_CHARS: usize = 1_000_000;

/// ftfy repeats its fixes until the text stops changing; this bound only guards against a cycle.
const MAX_PASSES: usize = 64;

/// `ftfy.fix_text(text)`.
pub(super) fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape_html = true;
    for line in text.split_inclusive('\n') {
        for segment in chunks_of_chars(line, MAX_SEGMENT_CHARS) {
            // "auto" mode: text that contains '<' may be HTML, so entities stay from here on.
            if segment.contains('<') {
                unescape_html = false;
            }
            out.push_str(&fix_segment(segment, unescape_html));
        }
    }
    out
}

fn chunks_of_chars(text: &str, max_chars: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = rest
            .char_indices()
            .nth(max_chars)
            .map_or(rest.len(), |(i, _)| i);
        let (chunk, tail) = rest.split_at(cut);
        rest = tail;
        Some(chunk)
    })
}

/// `ftfy.fix_and_explain` on one segment: all fixes in ftfy's order, repeated until nothing changes.
fn fix_segment(segment: &str, unescape_html: bool) -> String {
    let mut text = segment.to_owned();
    for _ in 0..MAX_PASSES {
        let before = text.clone();
        if unescape_html {
            text = unescape_entities(&text);
        }
        text = fix_encoding(text);
        text = fix_c1_controls(&text);
        text = fix_latin_ligatures(&text);
        text = fix_character_width(&text);
        text = uncurl_quotes(&text);
        text = fix_line_breaks(&text);
        text = remove_terminal_escapes(&text);
        text = remove_control_chars(&text);
        text = text.nfc().collect();
        if text == before {
            break;
        }
    }
    text
}

/// `ftfy.fixes.unescape_html`: only `&...;` forms of at most 24 ASCII letters/digits, the HTML5 names that end
/// in `;` plus upper-cased versions of the lower-case ones (`&EACUTE;` -> `É`), and numeric references only
/// when `html.unescape` consumes the whole match.
fn unescape_entities(text: &str) -> String {
    if !text.contains('&') {
        return text.to_owned();
    }
    let tables = tables();
    tables
        .entity
        .replace_all(text, |caps: &Captures| {
            let matched = &caps[0];
            if let Some(expansion) = tables.entities.get(matched) {
                return expansion.clone();
            }
            if matched.starts_with("&#") {
                let decoded = html::unescape(matched);
                if !decoded.contains(';') {
                    return decoded.into_owned();
                }
            }
            matched.to_owned()
        })
        .into_owned()
}

struct Tables {
    /// `chardata.HTML_ENTITY_RE`.
    entity: Regex,
    /// `chardata.HTML_ENTITIES`: `&name;` -> expansion.
    entities: HashMap<String, String>,
    /// `fixes.remove_terminal_escapes`'s ANSI pattern.
    ansi_escape: Regex,
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| Tables {
        entity: Regex::new(r"&#?[0-9A-Za-z]{1,24};").expect("valid literal pattern"),
        entities: build_entities(),
        ansi_escape: Regex::new(r"\x1b\[(?:\d|;)*[a-zA-Z]").expect("valid literal pattern"),
    })
}

/// `chardata._build_html_entities`.
fn build_entities() -> HashMap<String, String> {
    let mut entities = HashMap::with_capacity(HTML5_ENTITIES.len() * 2);
    for &(name, expansion) in HTML5_ENTITIES {
        if !name.ends_with(';') {
            continue;
        }
        entities.insert(format!("&{name}"), expansion.to_owned());
        if name == name.to_lowercase() {
            let upper = format!("&{}", name.to_uppercase());
            // Only when the upper-case spelling means nothing to html.unescape (so no real entity is shadowed).
            if html::unescape(&upper) == upper {
                entities.insert(upper, expansion.to_uppercase());
            }
        }
    }
    entities
}

/// ftfy's `fix_encoding` for its most common case: text that is UTF-8 bytes decoded as Latin-1 or
/// Windows-1252 (`cafÃ©` -> `café`), undone while it keeps decoding as valid UTF-8.
fn fix_encoding(mut text: String) -> String {
    for _ in 0..MAX_PASSES {
        if text.is_ascii() {
            break;
        }
        let redecoded = [encode_latin1(&text), encode_sloppy_cp1252(&text)]
            .into_iter()
            .flatten()
            .find_map(|bytes| String::from_utf8(bytes).ok());
        match redecoded {
            Some(fixed) if fixed != text => text = fixed,
            _ => break,
        }
    }
    text
}

fn encode_latin1(text: &str) -> Option<Vec<u8>> {
    text.chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect()
}

/// ftfy's "sloppy-windows-1252": Windows-1252, with its unassigned bytes passing through as C1 controls.
fn encode_sloppy_cp1252(text: &str) -> Option<Vec<u8>> {
    text.chars()
        .map(|c| match u32::from(c) {
            code @ (0..=0x7f | 0xa0..=0xff) => u8::try_from(code).ok(),
            _ => CP1252_C1
                .iter()
                .position(|&mapped| mapped == c)
                .and_then(|offset| u8::try_from(0x80 + offset).ok()),
        })
        .collect()
}

/// `fixes.fix_c1_controls`: C1 control characters are almost always Windows-1252 bytes read as Latin-1.
fn fix_c1_controls(text: &str) -> String {
    text.chars()
        .map(|c| match u32::from(c) {
            code @ 0x80..=0x9f => CP1252_C1[(code - 0x80) as usize],
            _ => c,
        })
        .collect()
}

/// `chardata.LIGATURES`.
fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        '\u{132}' => "IJ",
        '\u{133}' => "ij",
        '\u{149}' => "\u{2bc}n",
        '\u{1f1}' => "DZ",
        '\u{1f2}' => "Dz",
        '\u{1f3}' => "dz",
        '\u{1c4}' => "D\u{17d}",
        '\u{1c5}' => "D\u{17e}",
        '\u{1c6}' => "d\u{17e}",
        '\u{1c7}' => "LJ",
        '\u{1c8}' => "Lj",
        '\u{1c9}' => "lj",
        '\u{1ca}' => "NJ",
        '\u{1cb}' => "Nj",
        '\u{1cc}' => "nj",
        '\u{fb00}' => "ff",
        '\u{fb01}' => "fi",
        '\u{fb02}' => "fl",
        '\u{fb03}' => "ffi",
        '\u{fb04}' => "ffl",
        '\u{fb05}' => "\u{17f}t",
        '\u{fb06}' => "st",
        _ => return None,
    })
}

fn fix_latin_ligatures(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match ligature(c) {
            Some(letters) => out.push_str(letters),
            None => out.push(c),
        }
    }
    out
}

/// `chardata.WIDTH_MAP`: U+3000 and the half-/full-width forms U+FF01..U+FFEF -> their NFKC form.
fn fix_character_width(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{3000}' => out.push(' '),
            '\u{ff01}'..='\u{ffef}' => out.extend(std::iter::once(c).nfkc()),
            _ => out.push(c),
        }
    }
    out
}

fn uncurl_quotes(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
            '\u{201c}'..='\u{201f}' => '"',
            _ => c,
        })
        .collect()
}

fn fix_line_breaks(text: &str) -> String {
    text.replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n")
}

fn remove_terminal_escapes(text: &str) -> String {
    if !text.contains('\x1b') {
        return text.to_owned();
    }
    tables().ansi_escape.replace_all(text, "").into_owned()
}

/// `chardata.CONTROL_CHARS`: controls other than tab/line breaks, deprecated format characters, the BOM and
/// interlinear annotation marks.
fn remove_control_chars(text: &str) -> String {
    text.chars()
        .filter(|&c| {
            !matches!(c,
                '\u{0}'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}'
                | '\u{206a}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffc}')
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities_decoded_until_stable_but_not_in_html() {
        assert_eq!(fix_text("&amp;amp;amp;amp;"), "&");
        assert_eq!(fix_text("<b>&amp;amp;</b>"), "<b>&amp;amp;</b>");
        // The '<' switch is sticky for the following lines, not for the earlier ones.
        assert_eq!(fix_text("&lt;\n<\n&lt;"), "<\n<\n&lt;");
        assert_eq!(fix_text("P&EACUTE;REZ"), "P\u{c9}REZ");
        assert_eq!(fix_text("&nTILDE;"), "&nTILDE;");
        assert_eq!(fix_text("BUNDESSTRA&SZLIG;E"), "BUNDESSTRASSE");
        // ftfy only takes references with ';' (legacy names stay for html.unescape).
        assert_eq!(fix_text("&amp"), "&amp");
        assert_eq!(fix_text("&#59;"), "&#59;");
        assert_eq!(fix_text("&#x41;"), "A");
    }

    #[test]
    fn controls_escapes_and_line_breaks() {
        assert_eq!(fix_text("ctrl\x07bell"), "ctrlbell");
        assert_eq!(fix_text("\x1b[31mred\x1b[0m"), "red");
        assert_eq!(fix_text("a\r\nb\rc"), "a\nb\nc");
        assert_eq!(fix_text("\u{feff}bom"), "bom");
        assert_eq!(fix_text("x\u{85}"), "x\u{2026}");
        assert_eq!(fix_text("tab\there\x0c"), "tab\there\x0c");
    }

    #[test]
    fn table_repairs_and_mojibake() {
        assert_eq!(fix_text("\u{fb02}ower"), "flower");
        assert_eq!(fix_text("\u{ff21}\u{3000}1"), "A 1");
        assert_eq!(fix_text("\u{201c}q\u{2019}"), "\"q'");
        assert_eq!(fix_text("e\u{301}"), "\u{e9}");
        assert_eq!(fix_text("caf\u{c3}\u{a9}"), "caf\u{e9}");
        assert_eq!(
            fix_text("\u{e2}\u{20ac}\u{153}x\u{e2}\u{20ac}\u{9d}"),
            "\"x\""
        );
        assert_eq!(fix_text("caf\u{e9}"), "caf\u{e9}");
        assert_eq!(fix_text("\u{b0}C"), "\u{b0}C");
    }
}
