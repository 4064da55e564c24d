//! The model loads exactly the tensors of the released sizes (fixtures/KEYS-*.json).

mod common;

use std::collections::BTreeMap;

use clip4str::config::Clip4StrConfig;
use clip4str::model::Clip4Str;
use common::fixture;

fn keys(variant: &str) -> serde_json::Value {
    let path = fixture(&format!("KEYS-{variant}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("KEYS file")).expect("json")
}

fn shapes(keys: &serde_json::Value) -> Vec<(String, Vec<usize>)> {
    keys["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let shape = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (t["name"].as_str().unwrap().to_string(), shape)
        })
        .collect()
}

#[test]
fn configs_inferred_from_key_lists_load_exactly_those_tensors() {
    for (variant, preset) in [
        ("B16", Clip4StrConfig::base16()),
        ("B32", Clip4StrConfig::base32()),
        ("L14", Clip4StrConfig::large14()),
        ("H14", Clip4StrConfig::huge14()),
    ] {
        let k = keys(variant);
        let file: BTreeMap<_, _> = shapes(&k).into_iter().collect();
        let list: Vec<_> = file.clone().into_iter().collect();
        let cfg = Clip4StrConfig::from_tensors(&list, None).expect("infer config");
        assert_eq!(
            cfg, preset,
            "{variant}: inferred config differs from the preset"
        );
        let derived = &k["derived"];
        assert_eq!(
            cfg.vision.heads as u64,
            derived["vision_heads"].as_u64().unwrap()
        );
        assert_eq!(
            cfg.text.heads as u64,
            derived["text_heads"].as_u64().unwrap()
        );
        assert_eq!(
            cfg.decoder.heads as u64,
            derived["decoder_heads"].as_u64().unwrap()
        );
        assert_eq!(
            cfg.vision.num_tokens() as u64,
            derived["num_image_tokens"].as_u64().unwrap()
        );

        let expected: BTreeMap<_, _> = Clip4Str::expected_tensors(&cfg)
            .expect("record shapes")
            .into_iter()
            .collect();
        assert_eq!(
            expected.len(),
            k["num_tensors"].as_u64().unwrap() as usize,
            "{variant}"
        );
        assert_eq!(
            expected, file,
            "{variant}: expected tensors differ from the key list"
        );
    }
}
