//! Golden tests of the tokenizers against outputs of the PyTorch reference (`tests/fixtures/`, see FORMAT.md):
//! CLIP BPE (`tokenizer_clip.json`), the charset tokenizer, CharsetAdapter and label filtering
//! (`tokenizer_charset.json` / `.safetensors`) and the LMDB label lists (`lmdb_tiny.json`).

mod common;

use clip4str::charset::{filter_label, CharsetAdapter, CharsetTokenizer, CHARSET_36, CHARSET_94};
use clip4str::clip::bpe::{self, ClipBpe, EOT, SOT};
use common::fixtures;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// Non-ASCII strings of `tokenizer_clip.json` this implementation tokenizes like the reference (of 79);
/// raise it when the ftfy subset improves, never lower it.
const NON_ASCII_MATCHED_AT_LEAST: usize = 79;

fn load_json(name: &str) -> Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {value}"))
}

fn u32s(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or_else(|| panic!("not an id: {v}"))
        })
        .collect()
}

fn f32s(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")) as f32)
        .collect()
}

/// `None` for JSON null (a dropped sample), else the label.
fn opt_str(value: &Value) -> Option<String> {
    value.as_str().map(str::to_owned)
}

#[test]
fn clip_bpe_matches_reference() {
    let fixture = load_json("tokenizer_clip.json");
    assert_eq!(fixture["sot"].as_u64(), Some(u64::from(SOT)));
    assert_eq!(fixture["eot"].as_u64(), Some(u64::from(EOT)));
    let cases = fixture["cases"].as_array().expect("cases array");
    assert_eq!(cases.len(), 343);

    let tokenizer = ClipBpe::new();
    let (mut ascii_total, mut non_ascii_total, mut non_ascii_matched) = (0, 0, 0);
    let mut non_ascii_misses = Vec::new();
    for case in cases {
        let text = str_of(case, "text");
        let cleaned = bpe::clean(text);
        let ids = tokenizer.encode(text);
        let tokens16 = tokenizer.tokenize(text, 16);
        let tokens77 = tokenizer.tokenize(text, 77);
        let matches = cleaned == str_of(case, "cleaned_lower")
            && ids == u32s(&case["bpe_ids"])
            && tokens16 == u32s(&case["tokens16"])
            && tokens77 == u32s(&case["tokens77"]);
        if text.is_ascii() {
            ascii_total += 1;
            assert_eq!(
                cleaned,
                str_of(case, "cleaned_lower"),
                "cleaned text of {text:?}"
            );
            assert_eq!(ids, u32s(&case["bpe_ids"]), "bpe_ids of {text:?}");
            assert_eq!(tokens16, u32s(&case["tokens16"]), "tokens16 of {text:?}");
            assert_eq!(tokens77, u32s(&case["tokens77"]), "tokens77 of {text:?}");
        } else {
            non_ascii_total += 1;
            if matches {
                non_ascii_matched += 1;
            } else {
                non_ascii_misses.push(text.to_owned());
            }
        }
    }
    eprintln!(
        "CLIP BPE: ASCII {ascii_total}/{ascii_total} match; non-ASCII {non_ascii_matched}/{non_ascii_total} \
         match (misses: {non_ascii_misses:?})"
    );
    assert_eq!(ascii_total, 264);
    assert!(
        non_ascii_matched >= NON_ASCII_MATCHED_AT_LEAST,
        "non-ASCII parity regressed: {non_ascii_matched} < {NON_ASCII_MATCHED_AT_LEAST}; misses {non_ascii_misses:?}"
    );
}

#[test]
fn charset_tokenizer_layout_matches_reference() {
    let fixture = load_json("tokenizer_charset.json");
    assert_eq!(str_of(&fixture, "charset_train"), CHARSET_94);
    let tokenizer = CharsetTokenizer::new(CHARSET_94);
    let itos: Vec<&str> = fixture["itos"]
        .as_array()
        .expect("itos")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(itos.len(), tokenizer.len());
    for (id, expected) in itos.iter().enumerate() {
        assert_eq!(tokenizer.id_to_text(id as u32), Some(*expected));
    }
    assert_eq!(
        fixture["eos_id"].as_u64(),
        Some(u64::from(tokenizer.eos_id()))
    );
    assert_eq!(
        fixture["bos_id"].as_u64(),
        Some(u64::from(tokenizer.bos_id()))
    );
    assert_eq!(
        fixture["pad_id"].as_u64(),
        Some(u64::from(tokenizer.pad_id()))
    );
    assert_eq!(
        fixture["num_classes"].as_u64(),
        Some(tokenizer.num_classes() as u64)
    );
}

#[test]
fn charset_encode_matches_reference() {
    let fixture = load_json("tokenizer_charset.json");
    let tokenizer = CharsetTokenizer::new(CHARSET_94);
    for case in fixture["encode_per_label"]
        .as_array()
        .expect("encode_per_label")
    {
        let label = str_of(case, "label");
        let ids = tokenizer.encode(label).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ids, u32s(&case["ids"]), "encode {label:?}");
    }

    let labels: Vec<&str> = fixture["encode_batched_labels"]
        .as_array()
        .expect("labels")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(labels.len(), 50);
    let batch = tokenizer
        .encode_batch(&labels)
        .unwrap_or_else(|e| panic!("{e}"));

    let bytes = std::fs::read(fixtures().join("tokenizer_charset.safetensors"))
        .expect("reading safetensors");
    let tensors = SafeTensors::deserialize(&bytes).expect("parsing safetensors");
    let expected = tensors
        .tensor("encode_batched")
        .expect("encode_batched tensor");
    assert_eq!(expected.dtype(), Dtype::I64);
    let [rows, cols] = expected.shape() else {
        panic!("encode_batched is not 2-D")
    };
    let expected: Vec<i64> = expected
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    assert_eq!(batch.len(), *rows);
    for (row, expected_row) in batch.iter().zip(expected.chunks_exact(*cols)) {
        let expected_row: Vec<u32> = expected_row.iter().map(|&v| v as u32).collect();
        assert_eq!(row, &expected_row);
    }
}

#[test]
fn charset_decode_matches_reference() {
    let fixture = load_json("tokenizer_charset.json");
    let tokenizer = CharsetTokenizer::new(CHARSET_94);
    let adapter36 = CharsetAdapter::new(CHARSET_36);
    let bytes = std::fs::read(fixtures().join("tokenizer_charset.safetensors"))
        .expect("reading safetensors");
    let tensors = SafeTensors::deserialize(&bytes).expect("parsing safetensors");

    let cases = fixture["decode_cases"].as_array().expect("decode_cases");
    assert!(!cases.is_empty());
    for case in cases {
        let name = str_of(case, "name");
        let view = tensors
            .tensor(&format!("decode/{name}/probs"))
            .expect("probs tensor");
        assert_eq!(view.dtype(), Dtype::F32);
        assert_eq!(view.shape(), [1, 26, 95]);
        let probs: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();

        let decoded = tokenizer.decode(&probs, 95);
        let expected = &case["decode"];
        assert_eq!(
            decoded.text,
            str_of(expected, "text"),
            "decode text of {name}"
        );
        let expected_probs = f32s(&expected["probs"]);
        assert_eq!(
            decoded.char_probs.len(),
            expected_probs.len(),
            "kept probs of {name}"
        );
        for (got, want) in decoded.char_probs.iter().zip(&expected_probs) {
            assert!((got - want).abs() <= 1e-6, "{name}: prob {got} vs {want}");
        }
        let confidence = expected["confidence"].as_f64().expect("confidence") as f32;
        assert!(
            (decoded.confidence() - confidence).abs() <= 1e-6,
            "{name}: confidence"
        );
        assert_eq!(
            decoded.eos_found,
            u32s(&case["argmax_ids"]).contains(&0),
            "{name}: eos_found"
        );

        let argmax_ids = u32s(&case["argmax_ids"]);
        let fast_adapted = tokenizer.decode_fast(&argmax_ids, Some(&adapter36));
        assert_eq!(
            fast_adapted,
            str_of(&case["decode_fast_adapter36"], "text"),
            "decode_fast+adapter {name}"
        );
        let fast_raw = tokenizer.decode_fast(&argmax_ids, None);
        assert_eq!(
            fast_raw,
            str_of(&case["decode_fast_no_adapter"], "text"),
            "decode_fast {name}"
        );
    }
}

#[test]
fn charset_adapter_matches_reference() {
    let fixture = load_json("tokenizer_charset.json");
    let adapters = fixture["charset_adapter"]
        .as_object()
        .expect("charset_adapter");
    assert_eq!(adapters.len(), 5);
    for (name, case) in adapters {
        let adapter = CharsetAdapter::new(str_of(case, "charset"));
        assert_eq!(
            Some(adapter.lowercase_only()),
            case["lowercase_only"].as_bool(),
            "{name}"
        );
        assert_eq!(
            Some(adapter.uppercase_only()),
            case["uppercase_only"].as_bool(),
            "{name}"
        );
        for (input, output) in case["outputs"].as_object().expect("outputs") {
            assert_eq!(
                adapter.apply(input),
                output.as_str().unwrap_or_default(),
                "{name}: {input:?}"
            );
        }
    }
}

#[test]
fn dataset_label_filter_matches_reference() {
    let fixture = load_json("tokenizer_charset.json");
    let train = CharsetAdapter::new(CHARSET_94);
    let test = CharsetAdapter::new(CHARSET_36);
    let cases = fixture["dataset_label_preprocess"]
        .as_array()
        .expect("dataset_label_preprocess");
    assert!(!cases.is_empty());
    for case in cases {
        let raw = str_of(case, "raw");
        assert_eq!(
            filter_label(raw, &train, 25, true, true),
            opt_str(&case["train_94"]),
            "train_94 {raw:?}"
        );
        assert_eq!(
            filter_label(raw, &test, 25, true, true),
            opt_str(&case["test_36"]),
            "test_36 {raw:?}"
        );
    }
}

#[test]
fn lmdb_tiny_labels_match_reference() {
    let fixture = load_json("lmdb_tiny.json");
    let max_len = fixture["max_label_length"]
        .as_u64()
        .expect("max_label_length") as usize;
    let remove_whitespace = fixture["remove_whitespace"]
        .as_bool()
        .expect("remove_whitespace");
    let normalize_unicode = fixture["normalize_unicode"]
        .as_bool()
        .expect("normalize_unicode");
    let samples = fixture["samples"].as_array().expect("samples");
    for split in ["train_94", "test_36"] {
        let result = &fixture["results"][split];
        let adapter = CharsetAdapter::new(str_of(result, "charset"));
        let kept: Vec<(u64, String)> = samples
            .iter()
            .filter_map(|sample| {
                let index = sample["lmdb_index"].as_u64().expect("lmdb_index");
                let raw = str_of(sample, "raw_label");
                filter_label(raw, &adapter, max_len, remove_whitespace, normalize_unicode)
                    .map(|l| (index, l))
            })
            .collect();
        let expected: Vec<(u64, String)> = result["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|item| {
                (
                    item["lmdb_index"].as_u64().expect("lmdb_index"),
                    str_of(item, "label").to_owned(),
                )
            })
            .collect();
        assert_eq!(result["num_samples"].as_u64(), Some(expected.len() as u64));
        assert_eq!(kept, expected, "{split}");
    }
}
