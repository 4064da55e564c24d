//! The character-level side of CLIP4STR (SPEC §5, §13.2): the charset tokenizer whose ids the decoders
//! predict, the `CharsetAdapter` that shapes captions and ground truth to the test charset, and the dataset's
//! label filter. Mirrors `strhub/data/utils.py` and `LmdbDataset._preprocess_labels`.

use std::collections::{HashMap, HashSet};

use unicode_normalization::UnicodeNormalization;

/// The training charset (`configs/charset/94_full.yaml`); its order defines the ids 1..=94.
pub const CHARSET_94: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// The default test charset (`configs/main.yaml` `charset_test`): digits and lowercase letters.
pub const CHARSET_36: &str = "0123456789abcdefghijklmnopqrstuvwxyz";

/// Python's `string.punctuation`, in its order.
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// test.py's `charset_test`: digits + lowercase (+ uppercase if `cased`, + `string.punctuation` if
/// `punctuation`). It decides both the ground truth and the captions the model reads back (SPEC §8.3).
pub fn charset_test(cased: bool, punctuation: bool) -> String {
    let mut charset = String::from(CHARSET_36);
    if cased {
        charset.push_str("ABCDEFGHIJKLMNOPQRSTUVWXYZ");
    }
    if punctuation {
        charset.push_str(PUNCTUATION);
    }
    charset
}

/// Why a label cannot be turned into charset ids.
#[derive(Debug, thiserror::Error)]
pub enum CharsetError {
    /// The label holds a character outside the training charset (the reference raises `KeyError`).
    #[error("label {label:?} contains {ch:?}, which is not in the training charset")]
    UnknownChar {
        /// The whole label, for the error message.
        label: String,
        /// The first character that has no id.
        ch: char,
    },
}

/// Text rendering of the end-of-sequence id (also what `decode_fast` cuts captions at).
const EOS_TEXT: &str = "[E]";

/// The reference `Tokenizer(charset_train)`: `itos = ["[E]"] + chars + ["[B]", "[P]"]`, so EOS = 0,
/// characters 1..=len, BOS = len + 1, PAD = len + 2.
#[derive(Debug, Clone)]
pub struct CharsetTokenizer {
    charset: String,
    itos: Vec<String>,
    stoi: HashMap<char, u32>,
}

impl CharsetTokenizer {
    /// Builds the tokenizer for a training charset (ids follow the charset's character order).
    pub fn new(charset_train: &str) -> Self {
        let mut itos = Vec::with_capacity(charset_train.chars().count() + 3);
        itos.push(EOS_TEXT.to_owned());
        itos.extend(charset_train.chars().map(String::from));
        itos.push("[B]".to_owned());
        itos.push("[P]".to_owned());
        // Like the reference's dict, a repeated character keeps its last id.
        let stoi = charset_train.chars().zip(1u32..).collect();
        Self {
            charset: charset_train.to_owned(),
            itos,
            stoi,
        }
    }

    /// End-of-sequence id (0); also the first of the decoders' output classes.
    pub fn eos_id(&self) -> u32 {
        0
    }

    /// Begin-of-sequence id, the first input token of the decoders.
    pub fn bos_id(&self) -> u32 {
        self.index_to_id(self.itos.len() - 2)
    }

    /// Padding id of batched labels.
    pub fn pad_id(&self) -> u32 {
        self.index_to_id(self.itos.len() - 1)
    }

    /// Number of classes the decoder heads output: EOS + characters (95 for the 94-char charset).
    pub fn num_classes(&self) -> usize {
        self.itos.len() - 2
    }

    /// Vocabulary size including BOS and PAD (97): the rows of the decoders' `text_embed`.
    pub fn len(&self) -> usize {
        self.itos.len()
    }

    /// Always false (EOS, BOS and PAD are always there); present because `len` is.
    pub fn is_empty(&self) -> bool {
        self.itos.is_empty()
    }

    /// The training charset the ids index into.
    pub fn charset(&self) -> &str {
        &self.charset
    }

    /// Text of one id (`"[E]"`, a character, `"[B]"`, `"[P]"`); `None` past the vocabulary.
    pub fn id_to_text(&self, id: u32) -> Option<&str> {
        self.itos.get(id as usize).map(String::as_str)
    }

    fn index_to_id(&self, index: usize) -> u32 {
        u32::try_from(index).unwrap_or(u32::MAX)
    }

    /// `[BOS, ids.., EOS]` for one label (the reference's `encode([label])[0]`).
    pub fn encode(&self, label: &str) -> Result<Vec<u32>, CharsetError> {
        let mut ids = Vec::with_capacity(label.len() + 2);
        ids.push(self.bos_id());
        for ch in label.chars() {
            let id = self
                .stoi
                .get(&ch)
                .ok_or_else(|| CharsetError::UnknownChar {
                    label: label.to_owned(),
                    ch,
                })?;
            ids.push(*id);
        }
        ids.push(self.eos_id());
        Ok(ids)
    }

    /// Encodes a batch and pads every row with PAD to the longest label + 2 (`pad_sequence`).
    pub fn encode_batch(&self, labels: &[&str]) -> Result<Vec<Vec<u32>>, CharsetError> {
        let mut rows = labels
            .iter()
            .map(|label| self.encode(label))
            .collect::<Result<Vec<_>, _>>()?;
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        for row in &mut rows {
            row.resize(width, self.pad_id());
        }
        Ok(rows)
    }

    /// `tokenizer.decode` on one sample's probabilities (row-major `[T, num_classes]`, already softmaxed):
    /// argmax per row (first maximum on ties, NaN wins like in torch), text cut before the first EOS, and the
    /// kept probabilities include the EOS one. A trailing partial row is ignored.
    pub fn decode(&self, probs: &[f32], num_classes: usize) -> Decoded {
        if num_classes == 0 {
            return Decoded {
                text: String::new(),
                char_probs: Vec::new(),
                eos_found: false,
            };
        }
        let mut text = String::new();
        let mut char_probs = Vec::new();
        let mut eos_found = false;
        for row in probs.chunks_exact(num_classes) {
            let (id, prob) = argmax(row);
            char_probs.push(prob);
            if id == self.eos_id() as usize {
                eos_found = true;
                break;
            }
            if let Some(token) = self.itos.get(id) {
                text.push_str(token);
            }
        }
        Decoded {
            text,
            char_probs,
            eos_found,
        }
    }

    /// `decode_fast` as the model uses it for captions: the text of every id joined (EOS renders as `[E]`),
    /// cut at the first `[E]` *text* (so predicted `[`, `E`, `]` also end the caption), then the adapter.
    /// Ids past the vocabulary render as nothing.
    pub fn decode_fast(&self, ids: &[u32], adapter: Option<&CharsetAdapter>) -> String {
        let joined: String = ids.iter().filter_map(|&id| self.id_to_text(id)).collect();
        let caption = joined.split(EOS_TEXT).next().unwrap_or_default();
        match adapter {
            Some(adapter) => adapter.apply(caption),
            None => caption.to_owned(),
        }
    }
}

/// Index and value of the row maximum, torch-style: first of equal maxima, and a NaN beats everything.
fn argmax(row: &[f32]) -> (usize, f32) {
    let mut best = (0, row.first().copied().unwrap_or(f32::NAN));
    for (index, &value) in row.iter().enumerate().skip(1) {
        if best.1.is_nan() {
            break;
        }
        if value.is_nan() || value > best.1 {
            best = (index, value);
        }
    }
    best
}

/// One decoded prediction: the text and the probabilities it was read with.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Decoded {
    /// The predicted characters, before any CharsetAdapter.
    pub text: String,
    /// Maximum probability of each kept position: one per character, plus the EOS one when found.
    pub char_probs: Vec<f32>,
    /// Whether an EOS was predicted (otherwise every position was kept).
    pub eos_found: bool,
}

impl Decoded {
    /// Confidence as test.py reports it: the product of `char_probs` (f32, in order, like `probs.prod()`).
    pub fn confidence(&self) -> f32 {
        self.char_probs.iter().fold(1.0f32, |acc, &p| acc * p)
    }
}

/// The reference `CharsetAdapter(target_charset)`: folds case when the target charset has a single case, then
/// deletes every character outside it. Shapes both the ground truth and the model's captions.
#[derive(Debug, Clone)]
pub struct CharsetAdapter {
    charset: String,
    members: HashSet<char>,
    lowercase_only: bool,
    uppercase_only: bool,
}

impl CharsetAdapter {
    /// Adapter to `target_charset`; a charset without letters counts as lowercase-only, like in Python.
    pub fn new(target_charset: &str) -> Self {
        Self {
            charset: target_charset.to_owned(),
            members: target_charset.chars().collect(),
            lowercase_only: target_charset == target_charset.to_lowercase(),
            uppercase_only: target_charset == target_charset.to_uppercase(),
        }
    }

    /// The target charset.
    pub fn charset(&self) -> &str {
        &self.charset
    }

    /// Whether labels are lowercased first (`charset == charset.lower()`).
    pub fn lowercase_only(&self) -> bool {
        self.lowercase_only
    }

    /// Whether labels are uppercased first (only when not lowercase-only).
    pub fn uppercase_only(&self) -> bool {
        self.uppercase_only
    }

    /// Adapts one label: Unicode-aware case folding as Python's `str.lower`/`str.upper` (`'ß'.upper()` is
    /// `"SS"`), then removal of characters outside the charset.
    pub fn apply(&self, label: &str) -> String {
        let folded = if self.lowercase_only {
            label.to_lowercase()
        } else if self.uppercase_only {
            label.to_uppercase()
        } else {
            label.to_owned()
        };
        folded
            .chars()
            .filter(|c| self.members.contains(c))
            .collect()
    }
}

/// `LmdbDataset._preprocess_labels` for one label (SPEC §13.2): remove whitespace (Python `str.split`
/// whitespace), NFKD then drop non-ASCII, drop labels longer than `max_label_length` characters (before the
/// charset filter), adapt to the charset, drop empty results. `None` means the sample is dropped.
pub fn filter_label(
    raw: &str,
    adapter: &CharsetAdapter,
    max_label_length: usize,
    remove_whitespace: bool,
    normalize_unicode: bool,
) -> Option<String> {
    let mut label = if remove_whitespace {
        raw.chars().filter(|&c| !is_python_space(c)).collect()
    } else {
        raw.to_owned()
    };
    if normalize_unicode {
        label = label.nfkd().filter(char::is_ascii).collect();
    }
    if label.chars().count() > max_label_length {
        return None;
    }
    let label = adapter.apply(&label);
    (!label.is_empty()).then_some(label)
}

/// Python's `str.isspace`: Unicode White_Space plus the separators U+001C..U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_reference_layout() {
        let tokenizer = CharsetTokenizer::new(CHARSET_94);
        assert_eq!(
            (tokenizer.eos_id(), tokenizer.bos_id(), tokenizer.pad_id()),
            (0, 95, 96)
        );
        assert_eq!((tokenizer.num_classes(), tokenizer.len()), (95, 97));
        assert!(!tokenizer.is_empty());
        assert_eq!(tokenizer.encode("a0").ok(), Some(vec![95, 11, 1, 0]));
        assert_eq!(tokenizer.encode("").ok(), Some(vec![95, 0]));
        match tokenizer.encode("caf\u{e9}") {
            Err(CharsetError::UnknownChar { ch, .. }) => assert_eq!(ch, '\u{e9}'),
            other => panic!("expected UnknownChar, got {other:?}"),
        }
        let batch = tokenizer.encode_batch(&["ab", "", "c"]).ok();
        assert_eq!(
            batch,
            Some(vec![
                vec![95, 11, 12, 0],
                vec![95, 0, 96, 96],
                vec![95, 13, 0, 96]
            ])
        );
        assert_eq!(tokenizer.encode_batch(&[]).ok(), Some(vec![]));
    }

    #[test]
    fn repeated_charset_character_keeps_last_id() {
        let tokenizer = CharsetTokenizer::new("aba");
        assert_eq!(tokenizer.encode("a").ok(), Some(vec![4, 3, 0]));
        assert_eq!(tokenizer.num_classes(), 4);
    }

    #[test]
    fn decode_edges() {
        let tokenizer = CharsetTokenizer::new("ab");
        // classes: [E], a, b; the tie in row 2 goes to the first maximum.
        let probs = [0.1, 0.6, 0.3, 0.0, 0.5, 0.5, 0.7, 0.2, 0.1, 0.2, 0.3, 0.5];
        let decoded = tokenizer.decode(&probs, 3);
        assert_eq!(decoded.text, "aa");
        assert_eq!(decoded.char_probs, [0.6, 0.5, 0.7]);
        assert!(decoded.eos_found);
        assert!((decoded.confidence() - 0.21).abs() < 1e-6);
        let no_eos = tokenizer.decode(&probs[..6], 3);
        assert_eq!((no_eos.text.as_str(), no_eos.eos_found), ("aa", false));
        assert_eq!(tokenizer.decode(&probs, 0).text, "");
        assert_eq!(tokenizer.decode(&probs[..5], 3).char_probs, [0.6]);
        assert_eq!(argmax(&[0.1, f32::NAN, 0.9]).0, 1);
    }

    #[test]
    fn decode_fast_cuts_at_eos_text() {
        let tokenizer = CharsetTokenizer::new(CHARSET_94);
        let adapter = CharsetAdapter::new(CHARSET_36);
        // "A[E]b" then EOS, then junk; 999 is past the vocabulary.
        let ids = [37, 85, 41, 87, 12, 0, 13];
        assert_eq!(tokenizer.decode_fast(&ids, None), "A");
        assert_eq!(
            tokenizer.decode_fast(&[37, 999, 12, 0, 13], Some(&adapter)),
            "ab"
        );
        assert_eq!(tokenizer.decode_fast(&[], None), "");
    }

    #[test]
    fn adapter_case_rules() {
        let digits = CharsetAdapter::new("0123456789");
        assert!(digits.lowercase_only() && digits.uppercase_only());
        let upper = CharsetAdapter::new("ABC");
        assert_eq!(upper.apply("abc\u{df}"), "ABC");
        let upper_s = CharsetAdapter::new("S");
        assert_eq!(upper_s.apply("\u{df}"), "SS");
        let lower = CharsetAdapter::new("i\u{307}");
        assert_eq!(lower.apply("\u{130}"), "i\u{307}");
        assert_eq!(CharsetAdapter::new("").apply("abc"), "");
    }

    #[test]
    fn label_filter_order() {
        let adapter = CharsetAdapter::new(CHARSET_36);
        assert_eq!(
            filter_label(" a\u{1f}b\u{3000}", &adapter, 25, true, true).as_deref(),
            Some("ab")
        );
        assert_eq!(
            filter_label("a b", &adapter, 25, false, true).as_deref(),
            Some("ab")
        );
        // Length is checked before unsupported characters are removed.
        assert_eq!(filter_label("abc!", &adapter, 3, true, true), None);
        assert_eq!(
            filter_label("\u{e9}\u{e9}\u{e9}\u{e9}", &adapter, 3, true, false),
            None
        );
        assert_eq!(
            filter_label("\u{e9}\u{e9}\u{e9}", &adapter, 3, true, false),
            None
        );
        assert_eq!(
            filter_label("\u{e9}\u{e9}\u{e9}", &adapter, 3, true, true).as_deref(),
            Some("eee")
        );
        assert_eq!(
            filter_label("\u{2163}", &adapter, 3, true, true).as_deref(),
            Some("iv")
        );
    }

    #[test]
    fn charset_test_variants() {
        assert_eq!(charset_test(false, false), CHARSET_36);
        assert_eq!(charset_test(true, true).len(), 94);
        assert_eq!(
            charset_test(true, true).chars().collect::<HashSet<_>>(),
            CHARSET_94.chars().collect()
        );
    }
}
