//! Python's `html.unescape`: the reference runs it twice on every caption (`basic_clean`), so `&amp;amp;`
//! reaches the BPE as `&`. Follows CPython's `html/__init__.py`: HTML5 named references (legacy names also
//! without `;`, longest legacy prefix), decimal and hex references with the HTML5 rules for invalid numbers.

use std::borrow::Cow;

use super::html5_entities::HTML5_ENTITIES;

/// What Windows-1252 makes of bytes 0x80..=0x9F; its five unassigned bytes stay the C1 control of the same
/// value. Shared by numeric references (`&#150;` is an en dash) and ftfy's C1-control repair.
pub(super) const CP1252_C1: [char; 32] = [
    '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}', '\u{2021}',
    '\u{2c6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}', '\u{8f}',
    '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{2022}', '\u{2013}', '\u{2014}',
    '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}', '\u{17e}', '\u{178}',
];

/// Longest name `html.unescape` tries after a `&` (its pattern reads at most 32 characters).
const MAX_NAME_CHARS: usize = 32;

/// Expansion of an HTML5 entity name (without `&`, with `;` when the name has one).
pub(super) fn named_entity(name: &str) -> Option<&'static str> {
    HTML5_ENTITIES
        .binary_search_by(|(candidate, _)| candidate.cmp(&name))
        .ok()
        .map(|index| HTML5_ENTITIES[index].1)
}

/// `html.unescape(text)`.
pub(super) fn unescape(text: &str) -> Cow<'_, str> {
    if !text.contains('&') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        match char_reference(after, &mut out) {
            Some(consumed) => rest = &after[consumed..],
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Decodes the reference that starts right after a `&` into `out`; returns the bytes consumed, or `None` when
/// the text after the `&` is not a reference at all (the `&` then stays as it is).
fn char_reference(after: &str, out: &mut String) -> Option<usize> {
    let bytes = after.as_bytes();
    if bytes.first() == Some(&b'#') {
        let decimal = count_leading(&bytes[1..], |b| b.is_ascii_digit());
        let (digits, radix, start) = if decimal > 0 {
            (decimal, 10, 1)
        } else if matches!(bytes.get(1), Some(b'x' | b'X')) {
            (count_leading(&bytes[2..], |b| b.is_ascii_hexdigit()), 16, 2)
        } else {
            return None;
        };
        if digits == 0 {
            return None;
        }
        let end = start + digits;
        push_numeric_reference(parse_saturating(&after[start..end], radix), out);
        Some(end + usize::from(bytes.get(end) == Some(&b';')))
    } else {
        named_reference(after, out)
    }
}

fn count_leading(bytes: &[u8], accept: impl Fn(&u8) -> bool) -> usize {
    bytes.iter().take_while(|b| accept(b)).count()
}

/// Parses ASCII digits, saturating just above the Unicode range (anything larger means the same: U+FFFD).
fn parse_saturating(digits: &str, radix: u32) -> u32 {
    const TOO_LARGE: u32 = 0x11_0000;
    digits
        .chars()
        .filter_map(|c| c.to_digit(radix))
        .fold(0u32, |acc, d| {
            acc.saturating_mul(radix).saturating_add(d).min(TOO_LARGE)
        })
}

/// The HTML5 rules for `&#N;`, as `html._replace_charref` applies them.
fn push_numeric_reference(code: u32, out: &mut String) {
    let replacement = match code {
        0x00 => Some('\u{fffd}'),
        0x0d => Some('\r'),
        0x80..=0x9f => CP1252_C1.get((code - 0x80) as usize).copied(),
        0xd800..=0xdfff => Some('\u{fffd}'),
        c if c > 0x10_ffff => Some('\u{fffd}'),
        0x01..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0xfdd0..=0xfdef => None,
        c if c & 0xfffe == 0xfffe => None,
        c => char::from_u32(c),
    };
    if let Some(ch) = replacement {
        out.push(ch);
    }
}

/// `&name;` or a legacy `&name` (possibly followed by more text, as in `&ampfoo` -> `&foo`).
fn named_reference(after: &str, out: &mut String) -> Option<usize> {
    let mut end = 0;
    let mut boundaries = Vec::with_capacity(MAX_NAME_CHARS + 1);
    for (index, ch) in after.char_indices().take(MAX_NAME_CHARS) {
        if matches!(ch, '\t' | '\n' | '\x0c' | ' ' | '<' | '&' | '#' | ';') {
            break;
        }
        boundaries.push(index);
        end = index + ch.len_utf8();
    }
    if end == 0 {
        return None;
    }
    if after.as_bytes().get(end) == Some(&b';') {
        boundaries.push(end);
        end += 1;
    }
    boundaries.push(end);
    let name = &after[..end];
    if let Some(expansion) = named_entity(name) {
        out.push_str(expansion);
        return Some(end);
    }
    // Longest prefix of at least two characters that is an entity name (only legacy names can match,
    // since a prefix never ends in ';').
    let chars = boundaries.len() - 1;
    for prefix_chars in (2..chars).rev() {
        let cut = boundaries[prefix_chars];
        if let Some(expansion) = named_entity(&name[..cut]) {
            out.push_str(expansion);
            out.push_str(&name[cut..]);
            return Some(end);
        }
    }
    out.push('&');
    out.push_str(name);
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn un(text: &str) -> String {
        unescape(text).into_owned()
    }

    #[test]
    fn table_is_sorted_and_complete() {
        assert_eq!(HTML5_ENTITIES.len(), 2231);
        assert!(HTML5_ENTITIES.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(named_entity("amp;"), Some("&"));
        assert_eq!(named_entity("amp"), Some("&"));
        assert_eq!(named_entity("ampx"), None);
    }

    #[test]
    fn named_references_like_python() {
        assert_eq!(un("&amp;amp;"), "&amp;");
        assert_eq!(un("AT&amp;T"), "AT&T");
        assert_eq!(un("&eacute;"), "\u{e9}");
        assert_eq!(un("&unknown;"), "&unknown;");
        assert_eq!(un("&"), "&");
        assert_eq!(un("&;"), "&;");
        assert_eq!(un("&amp"), "&");
        assert_eq!(un("&ampfoo;"), "&foo;");
        assert_eq!(un("&notit;"), "\u{ac}it;");
        assert_eq!(un("&notin;"), "\u{2209}");
        assert_eq!(un("&AMP"), "&");
        assert_eq!(un("&nbsp"), "\u{a0}");
        assert_eq!(un("&NotEqualTilde;"), "\u{2242}\u{338}");
        assert_eq!(un("a & b"), "a & b");
        assert_eq!(un("&&lt;"), "&<");
        assert_eq!(un("&l"), "&l");
        assert_eq!(un("&lt"), "<");
        assert_eq!(un("&ltx"), "<x");
    }

    #[test]
    fn numeric_references_like_python() {
        assert_eq!(un("&#39;"), "'");
        assert_eq!(un("&#x27;"), "'");
        assert_eq!(un("&#X27"), "'");
        assert_eq!(un("&#8364;"), "\u{20ac}");
        assert_eq!(un("&#"), "&#");
        assert_eq!(un("&#;"), "&#;");
        assert_eq!(un("&#x;"), "&#x;");
        assert_eq!(un("&#0;"), "\u{fffd}");
        assert_eq!(un("&#13;"), "\r");
        assert_eq!(un("&#150;"), "\u{2013}");
        assert_eq!(un("&#129;"), "\u{81}");
        assert_eq!(un("&#127;"), "");
        assert_eq!(un("&#1;"), "");
        assert_eq!(un("&#xd800;"), "\u{fffd}");
        assert_eq!(un("&#x110000;"), "\u{fffd}");
        assert_eq!(un("&#99999999999999999999999;"), "\u{fffd}");
        assert_eq!(un("&#xFFFE;"), "");
        assert_eq!(un("&#x10FFFF;"), "");
        assert_eq!(un("&#65abc;"), "Aabc;");
        assert_eq!(un("&#x41g"), "Ag");
    }
}
