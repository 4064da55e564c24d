//! What the synthetic images say: dictionary words in three casings mixed with the non-dictionary strings
//! that scene text is full of (codes, numbers, dates, prices, web addresses, punctuation), so that a
//! case-sensitive 94-character model sees every class often enough. Labels use only `CHARSET_94` (no space).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rand::Rng;
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

use super::SynthError;
use crate::charset::CHARSET_94;

/// Scene-text vocabulary used when no word list is available, so that generation never depends on a
/// system dictionary being installed.
const BUILTIN_WORDS: &str = "the of and to in is for on with at by from open close exit enter push pull stop \
    sale free new hot cold coffee tea bar cafe hotel motel parking taxi bus stop station street road avenue \
    lane drive north south east west city park garden market bakery pizza burger grill restaurant kitchen \
    menu today special fresh bread milk cheese wine beer water juice ice cream pharmacy bank post office \
    police fire hospital school library museum church center centre shop store mall books music video \
    games toys shoes fashion beauty salon hair nails gym fitness sport club team love life home house \
    room floor level gate door window entrance welcome thank you please caution danger warning keep out \
    private no smoking only staff toilet ladies gentlemen men women kids family service repair auto car \
    tyres tires oil gas fuel diesel wash clean laundry dry express fast food super market grocery deli \
    fish meat fruit vegetables flowers gift cards phone mobile internet wifi computer electronics design \
    studio art gallery photo print copy office supply hardware paint tools garden pets vet dental clinic \
    doctor health care insurance travel tours tickets cinema theatre theater show live news daily times \
    world star sun moon river lake mountain valley island beach ocean sea harbour harbor bridge tower castle \
    palace royal grand old great little big best good fine quality original classic modern golden silver \
    red blue green black white orange yellow purple brown pink gray grey dark light night day morning \
    evening week month year spring summer autumn winter january february march april may june july \
    august september october november december monday tuesday wednesday thursday friday saturday sunday";

/// Word endings and wrappers that turn a dictionary word into punctuated scene text.
const WORD_PUNCTUATION: &[(&str, &str)] = &[
    ("", "."),
    ("", ","),
    ("", "!"),
    ("", "?"),
    ("", ":"),
    ("", ";"),
    ("", "'s"),
    ("", "..."),
    ("", "!!"),
    ("", "*"),
    ("", "-"),
    ("(", ")"),
    ("[", "]"),
    ("{", "}"),
    ("<", ">"),
    ("\"", "\""),
    ("'", "'"),
    ("`", "'"),
    ("#", ""),
    ("@", ""),
    ("&", ""),
    ("*", "*"),
    ("-", "-"),
    ("_", "_"),
    ("~", "~"),
    ("/", ""),
    ("\\", ""),
    ("|", "|"),
    ("^", ""),
    ("+", ""),
    ("=", ""),
    ("%", ""),
    ("$", ""),
];

/// Separators used to join two words without a space (`fast-food`, `and/or`, `R&D`, `snake_case`).
const JOINERS: &[&str] = &["-", "/", "&", "_", ".", "+", ":", "'", ""];

const MONTHS: &[&str] = &[
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

const TLDS: &[&str] = &[
    "com", "org", "net", "io", "co", "uk", "de", "fr", "info", "biz",
];

/// Folds a word list entry to a label: NFKD with combining marks dropped (`café` -> `cafe`); `None` when the
/// result is empty, longer than `max_len`, or has characters outside `CHARSET_94` (e.g. `ß`, CJK).
pub fn fold_word(raw: &str, max_len: usize) -> Option<String> {
    let folded: String = raw.nfkd().filter(|&c| !is_combining_mark(c)).collect();
    let ok = !folded.is_empty()
        && folded.len() <= max_len
        && folded.chars().all(|c| CHARSET_94.contains(c));
    ok.then_some(folded)
}

/// Word lists commonly installed on Debian (`wamerican`, `wbritish`), those that exist.
pub fn default_word_files() -> Vec<PathBuf> {
    [
        "/usr/share/dict/words",
        "/usr/share/dict/american-english",
        "/usr/share/dict/british-english",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|p| p.is_file())
    .take(1)
    .collect()
}

/// Reads a word list (one word per line, or whitespace-separated), folds each word to ASCII and keeps the
/// distinct ones of 1..=`max_len` characters from `CHARSET_94`. Possessives (`Aaron's`) are dropped: they
/// are a quarter of Debian's lists, and the generator adds `'s` itself at a sensible rate.
pub fn load_words(path: &Path, max_len: usize) -> Result<Vec<String>, SynthError> {
    let bytes = std::fs::read(path).map_err(|source| SynthError::Io {
        path: path.to_owned(),
        error: source,
    })?;
    let mut seen = HashSet::new();
    let mut words = Vec::new();
    for raw in String::from_utf8_lossy(&bytes).split_whitespace() {
        if raw.ends_with("'s") {
            continue;
        }
        if let Some(word) = fold_word(raw, max_len) {
            if seen.insert(word.clone()) {
                words.push(word);
            }
        }
    }
    Ok(words)
}

/// The built-in fallback vocabulary (lower case).
pub(super) fn builtin_words() -> Vec<String> {
    BUILTIN_WORDS
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Which kind of string a label is; the weights are the share of each kind in the output.
#[derive(Clone, Copy)]
enum Source {
    Word,
    PunctuatedWord,
    JoinedWords,
    Alphanumeric,
    Number,
    Date,
    Price,
    WebOrCode,
    Printable,
}

const SOURCES: &[(Source, f32)] = &[
    (Source::Word, 0.44),
    (Source::PunctuatedWord, 0.10),
    (Source::JoinedWords, 0.04),
    (Source::Alphanumeric, 0.10),
    (Source::Number, 0.09),
    (Source::Date, 0.06),
    (Source::Price, 0.06),
    (Source::WebOrCode, 0.07),
    (Source::Printable, 0.04),
];

/// Draws one label of 1..=`max_len` characters from `CHARSET_94`; `words` must not be empty.
pub(super) fn sample_label<R: Rng>(rng: &mut R, words: &[String], max_len: usize) -> String {
    let max_len = max_len.max(1);
    for _ in 0..8 {
        let label = sample_any(rng, words);
        if !label.is_empty() && label.len() <= max_len {
            return label;
        }
    }
    // Long strings keep coming (a tiny max_len, or a list of long words): fall back to a short code.
    let len = rng.random_range(1..=max_len.min(8));
    random_from(rng, ALNUM, len)
}

/// Draws one label of a length drawn evenly from `min_len..=max_len` (give or take two characters): scene text
/// of that length where the generator makes it (addresses, codes, joined words), else words joined until long
/// enough. `words` must not be empty; `1 <= min_len <= max_len`.
pub(super) fn sample_long_label<R: Rng>(
    rng: &mut R,
    words: &[String],
    min_len: usize,
    max_len: usize,
) -> String {
    let target = rng.random_range(min_len..=max_len);
    let (lo, hi) = (
        target.saturating_sub(2).max(min_len),
        (target + 2).min(max_len),
    );
    for _ in 0..4 {
        let label = sample_any(rng, words);
        if (lo..=hi).contains(&label.len()) {
            return label;
        }
    }
    // One casing for the whole label, as signs print long names (`FIRE-STATION`, `BookShop`, `post.office`).
    let casing = rng.random_range(0..3);
    let case = |word: &str| match casing {
        0 => word.to_ascii_lowercase(),
        1 => title_case(&word.to_ascii_lowercase()),
        _ => word.to_ascii_uppercase(),
    };
    for _ in 0..8 {
        let mut label = case(&words[rng.random_range(0..words.len())]);
        while label.len() < lo {
            let joiner = JOINERS[rng.random_range(0..JOINERS.len())];
            let next = case(&words[rng.random_range(0..words.len())]);
            label = format!("{label}{joiner}{next}");
        }
        if label.len() <= hi {
            return label;
        }
    }
    random_from(rng, ALNUM, target)
}

fn sample_any<R: Rng>(rng: &mut R, words: &[String]) -> String {
    let mut pick = rng.random::<f32>() * SOURCES.iter().map(|(_, w)| w).sum::<f32>();
    let mut source = Source::Word;
    for &(candidate, weight) in SOURCES {
        source = candidate;
        if pick < weight {
            break;
        }
        pick -= weight;
    }
    match source {
        Source::Word => cased_word(rng, words),
        Source::PunctuatedWord => {
            let (before, after) = WORD_PUNCTUATION[rng.random_range(0..WORD_PUNCTUATION.len())];
            format!("{before}{}{after}", cased_word(rng, words))
        }
        Source::JoinedWords => {
            let first = cased_word(rng, words);
            let joiner = JOINERS[rng.random_range(0..JOINERS.len())];
            let mut second = cased_word(rng, words);
            if joiner.is_empty() {
                // CamelCase compounds, as in brand names.
                second = title_case(&second);
            }
            format!("{first}{joiner}{second}")
        }
        Source::Alphanumeric => alphanumeric(rng),
        Source::Number => number(rng),
        Source::Date => date(rng),
        Source::Price => price(rng),
        Source::WebOrCode => web_or_code(rng, words),
        Source::Printable => {
            let len = rng.random_range(1..=10);
            random_from(rng, CHARSET_94.as_bytes(), len)
        }
    }
}

const DIGITS: &[u8] = b"0123456789";
const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const ALNUM: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
const UPPER_DIGITS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";

fn random_from<R: Rng>(rng: &mut R, alphabet: &[u8], len: usize) -> String {
    (0..len)
        .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
        .collect()
}

fn title_case(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

/// A dictionary word as signs print it: lower case, Title case or UPPER case.
fn cased_word<R: Rng>(rng: &mut R, words: &[String]) -> String {
    let word = words[rng.random_range(0..words.len())].as_str();
    let roll = rng.random::<f32>();
    if roll < 0.45 {
        word.to_ascii_lowercase()
    } else if roll < 0.75 {
        title_case(&word.to_ascii_lowercase())
    } else if roll < 0.97 {
        word.to_ascii_uppercase()
    } else {
        // Kept as listed (proper nouns, acronyms).
        word.to_owned()
    }
}

/// Codes and random strings: product codes, plates, serials, gibberish in every case mix.
fn alphanumeric<R: Rng>(rng: &mut R) -> String {
    let len = rng.random_range(1..=12);
    match rng.random_range(0..6) {
        0 => random_from(rng, UPPER_DIGITS, len),
        1 => random_from(rng, LOWER, len),
        2 => random_from(rng, UPPER, len),
        3 => {
            let letters = rng.random_range(1..=3);
            let digits = rng.random_range(1..=5);
            format!(
                "{}{}{}",
                random_from(rng, UPPER, letters),
                if rng.random_bool(0.4) { "-" } else { "" },
                random_from(rng, DIGITS, digits)
            )
        }
        _ => random_from(rng, ALNUM, len),
    }
}

fn digits<R: Rng>(rng: &mut R, len: usize) -> String {
    let mut text = random_from(rng, DIGITS, len);
    if len > 1 && text.starts_with('0') && rng.random_bool(0.8) {
        text.replace_range(0..1, &rng.random_range(1..=9).to_string());
    }
    text
}

fn thousands(value: u64) -> String {
    let plain = value.to_string();
    let mut out = String::with_capacity(plain.len() + plain.len() / 3);
    for (i, c) in plain.chars().enumerate() {
        if i > 0 && (plain.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn number<R: Rng>(rng: &mut R) -> String {
    match rng.random_range(0..9) {
        0 | 1 => {
            let len = rng.random_range(1..=6);
            digits(rng, len)
        }
        2 => thousands(rng.random_range(1_000..10_000_000)),
        3 => {
            let (int_len, frac_len) = (rng.random_range(1..=4), rng.random_range(1..=3));
            format!("{}.{}", digits(rng, int_len), digits(rng, frac_len))
        }
        4 => format!("{}%", rng.random_range(0..=100)),
        5 => format!("-{}", rng.random_range(1..1000)),
        6 => {
            let n = rng.random_range(1..200u32);
            let suffix = match (n % 10, n % 100) {
                (_, 11..=13) => "th",
                (1, _) => "st",
                (2, _) => "nd",
                (3, _) => "rd",
                _ => "th",
            };
            format!("{n}{suffix}")
        }
        7 => format!(
            "{}-{}",
            rng.random_range(100..1000),
            rng.random_range(1000..10000)
        ),
        _ => format!(
            "+{}({}){}",
            rng.random_range(1..100),
            rng.random_range(10..1000),
            rng.random_range(100_000..10_000_000)
        ),
    }
}

fn date<R: Rng>(rng: &mut R) -> String {
    let (day, month, year) = (
        rng.random_range(1..=31u32),
        rng.random_range(1..=12u32),
        rng.random_range(1950..=2039u32),
    );
    let month_name = MONTHS[(month - 1) as usize];
    match rng.random_range(0..9) {
        0 => format!("{day:02}/{month:02}/{year}"),
        1 => format!("{month}/{day}/{}", year % 100),
        2 => format!("{year}-{month:02}-{day:02}"),
        3 => format!("{day}.{month}.{year}"),
        4 => format!("{day}{}{year}", month_name.to_ascii_uppercase()),
        5 => format!("{month_name}.{day}"),
        6 => format!("{}:{:02}", rng.random_range(0..24), rng.random_range(0..60)),
        7 => format!(
            "{}:{:02}{}",
            rng.random_range(1..=12),
            rng.random_range(0..60),
            ["am", "pm", "AM", "PM"][rng.random_range(0..4)]
        ),
        _ => format!("'{:02}", year % 100),
    }
}

fn price<R: Rng>(rng: &mut R) -> String {
    let whole = match rng.random_range(0..3) {
        0 => rng.random_range(0..10),
        1 => rng.random_range(10..100),
        _ => rng.random_range(100..10_000),
    };
    let cents = rng.random_range(0..100);
    let amount = if rng.random_bool(0.7) {
        format!("{}.{cents:02}", thousands(whole))
    } else {
        thousands(whole)
    };
    match rng.random_range(0..8) {
        0..=3 => format!("${amount}"),
        4 => format!("{amount}$"),
        5 => format!(
            "{}{amount}",
            ["USD", "EUR", "GBP", "Rs.", "R$"][rng.random_range(0..5)]
        ),
        6 => format!(
            "{whole}.{}",
            ["99", "95", "49", "-"][rng.random_range(0..4)]
        ),
        _ => format!("{cents}c"),
    }
}

fn web_or_code<R: Rng>(rng: &mut R, words: &[String]) -> String {
    let word = |rng: &mut R| words[rng.random_range(0..words.len())].to_ascii_lowercase();
    let tld = TLDS[rng.random_range(0..TLDS.len())];
    match rng.random_range(0..7) {
        0 => format!("www.{}.{tld}", word(rng)),
        1 => format!("{}@{}.{tld}", word(rng), word(rng)),
        2 => format!("{}.{tld}", word(rng)),
        3 => format!("#{}", word(rng)),
        4 => format!("@{}{}", word(rng), rng.random_range(0..100)),
        5 => format!(
            "{}-{}",
            random_from(rng, UPPER, 2),
            rng.random_range(100..10_000)
        ),
        _ => format!("No.{}", rng.random_range(1..1000)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn folding_keeps_charset_and_length() {
        assert_eq!(fold_word("café", 25).as_deref(), Some("cafe"));
        assert_eq!(fold_word("Ångström", 25).as_deref(), Some("Angstrom"));
        assert_eq!(fold_word("straße", 25), None);
        assert_eq!(fold_word("two words", 25), None);
        assert_eq!(fold_word("abcdef", 5), None);
        assert_eq!(fold_word("", 5), None);
    }

    #[test]
    fn every_source_stays_in_charset() {
        let words = builtin_words();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..20_000 {
            let label = sample_label(&mut rng, &words, 25);
            assert!((1..=25).contains(&label.len()), "{label:?}");
            assert!(label.chars().all(|c| CHARSET_94.contains(c)), "{label:?}");
        }
        for _ in 0..200 {
            assert!(sample_label(&mut rng, &words, 3).len() <= 3);
        }
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(999), "999");
    }
}
