//! CLIP BPE tokenization of the captions fed to the CLIP text encoder, matching the reference
//! `SimpleTokenizer.encode` + `clip.tokenize(.., truncate=True)` (SPEC §4).
//!
//! The vocabulary and the byte-level BPE come from the `instant-clip-tokenizer` crate (OpenAI's merges).
//! Around it this module does what that crate leaves out: the reference's text cleaning (the ftfy subset in
//! the private `ftfy` module, `html.unescape` twice, whitespace collapsing, lowercasing) and the word split
//! with the literal `<|startoftext|>` / `<|endoftext|>` strings mapped to [`SOT`] / [`EOT`].
//!
//! Exact on ASCII text (all CLIP4STR captions are ASCII). Known gaps on other text: ftfy's mojibake
//! detection is reduced to the Latin-1/Windows-1252 case, Unicode tables are newer than Python 3.11's, and
//! a case-folded contraction such as `'ſ` (long s) is split in two where the reference keeps one word.

mod ftfy;
mod html;
mod html5_entities;

use std::fmt;
use std::sync::OnceLock;

use regex::Regex;

/// Id of `<|startoftext|>`, the first token of every tokenized caption.
pub const SOT: u32 = 49406;
/// Id of `<|endoftext|>`, the last token of every tokenized caption (also after truncation).
pub const EOT: u32 = 49407;

/// The reference's word pattern (`SimpleTokenizer.pat`, compiled with `re.IGNORECASE`).
const WORD_PATTERN: &str =
    r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";

/// CLIP BPE tokenizer. Cheap to copy: the vocabulary is loaded once per process and shared.
#[derive(Clone, Copy)]
pub struct ClipBpe {
    shared: &'static Shared,
}

struct Shared {
    bpe: instant_clip_tokenizer::Tokenizer,
    words: Regex,
}

impl ClipBpe {
    /// Loads the OpenAI CLIP vocabulary bundled with `instant-clip-tokenizer` (first call only; later calls
    /// share it).
    pub fn new() -> Self {
        static SHARED: OnceLock<Shared> = OnceLock::new();
        let shared = SHARED.get_or_init(|| Shared {
            bpe: instant_clip_tokenizer::Tokenizer::new(),
            words: Regex::new(WORD_PATTERN).expect("valid literal pattern"),
        });
        Self { shared }
    }

    /// BPE ids of `text` without SOT/EOT (`SimpleTokenizer.encode`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let cleaned = clean(text);
        let mut ids = Vec::with_capacity(cleaned.len());
        let mut word_tokens = Vec::new();
        for word in self.shared.words.find_iter(&cleaned) {
            match word.as_str() {
                "<|startoftext|>" => ids.push(SOT),
                "<|endoftext|>" => ids.push(EOT),
                word => {
                    // The crate re-splits with the same pattern (minus IGNORECASE), so a word stays one
                    // word and this is the reference's `bpe(word)`.
                    word_tokens.clear();
                    self.shared.bpe.encode(word, &mut word_tokens);
                    ids.extend(word_tokens.iter().map(|token| u32::from(token.to_u16())));
                }
            }
        }
        ids
    }

    /// `clip.tokenize(text, context_length, truncate=True)` for one caption: `[SOT, ids.., EOT]`, cut to
    /// `context_length` with the last entry forced to EOT, zero padded; always `context_length` long.
    pub fn tokenize(&self, text: &str, context_length: usize) -> Vec<u32> {
        let mut row = Vec::with_capacity(context_length.max(2));
        row.push(SOT);
        row.extend(self.encode(text));
        row.push(EOT);
        if row.len() > context_length {
            row.truncate(context_length);
            if let Some(last) = row.last_mut() {
                *last = EOT;
            }
        }
        row.resize(context_length, 0);
        row
    }
}

impl Default for ClipBpe {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ClipBpe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClipBpe").finish_non_exhaustive()
    }
}

/// The string the reference's word split runs on: `whitespace_clean(basic_clean(text)).lower()`, i.e.
/// ftfy, `html.unescape` twice, whitespace runs collapsed to one space, trimmed, lowercased.
pub fn clean(text: &str) -> String {
    let fixed = ftfy::fix_text(text);
    let unescaped = html::unescape(&html::unescape(&fixed)).into_owned();
    let mut collapsed = String::with_capacity(unescaped.len());
    for word in unescaped.split(is_python_space).filter(|w| !w.is_empty()) {
        if !collapsed.is_empty() {
            collapsed.push(' ');
        }
        collapsed.push_str(word);
    }
    collapsed.to_lowercase()
}

/// Python's `str.isspace` (what `strip` and the `\s` of the reference's patterns remove): Unicode White_Space
/// plus the four information separators U+001C..U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_strings_become_special_ids() {
        let bpe = ClipBpe::new();
        assert_eq!(bpe.encode("<|endoftext|>"), [EOT]);
        assert_eq!(bpe.encode("<|ENDOFTEXT|>"), [EOT]);
        assert_eq!(bpe.encode("<|startoftext|>"), [SOT]);
        let ids = bpe.encode("a<|endoftext|>b");
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[1], EOT);
    }

    #[test]
    fn tokenize_pads_and_truncates() {
        let bpe = ClipBpe::new();
        assert_eq!(bpe.tokenize("", 5), [SOT, EOT, 0, 0, 0]);
        assert_eq!(bpe.tokenize("chicken", 4), [SOT, 3717, EOT, 0]);
        let long = bpe.tokenize(&"1".repeat(40), 16);
        assert_eq!(long.len(), 16);
        assert_eq!(long[15], EOT);
        assert_eq!(bpe.tokenize("chicken", 1), [EOT]);
        assert!(bpe.tokenize("chicken", 0).is_empty());
    }

    #[test]
    fn clean_matches_reference_steps() {
        assert_eq!(clean("  Hello\t\nWORLD  "), "hello world");
        assert_eq!(clean("&amp;amp;"), "&");
        assert_eq!(clean("<b>&amp;amp;</b>"), "<b>&</b>");
        assert_eq!(clean("a&nbsp;b"), "a b");
        assert_eq!(clean("&nbsp;"), "");
        assert_eq!(clean("\u{130}"), "i\u{307}");
        assert_eq!(clean("a\u{1c}b"), "ab");
    }
}
