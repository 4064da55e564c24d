//! Dataset readers against the reference: the filtered labels of `lmdb_tiny` (a 12-record LMDB written in the
//! reference format, read read-only without a lock file) must equal what `LmdbDataset(root, charset, 25, 0,
//! True, True)` exposed, for the training (94) and test (36) charsets; a `labels.tsv` folder written here must
//! filter the same labels the same way.

mod common;

use std::path::{Path, PathBuf};

use clip4str::charset::{CharsetAdapter, CHARSET_36, CHARSET_94};
use clip4str::data::{open_dataset, Dataset, LmdbWriter};
use common::fixtures;

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("lmdb_tiny.json")).expect("lmdb_tiny.json");
    serde_json::from_str(&text).expect("valid JSON")
}

/// Checks one `results.<case>` entry: kept indices, labels and decoded image sizes.
fn check_case(dataset: &dyn Dataset, case: &serde_json::Value, check_images: bool) {
    let charset = case["charset"].as_str().expect("charset");
    let json = reference();
    let max_label_length = json["max_label_length"].as_u64().expect("max") as usize;
    let filtered = dataset
        .filtered(
            &CharsetAdapter::new(charset),
            max_label_length,
            json["remove_whitespace"].as_bool().expect("flag"),
            json["normalize_unicode"].as_bool().expect("flag"),
        )
        .expect("filter");
    assert!(filtered.failed.is_empty(), "{:?}", filtered.failed);
    let items = case["items"].as_array().expect("items");
    assert_eq!(
        filtered.len() as u64,
        case["num_samples"].as_u64().expect("n")
    );
    assert_eq!(filtered.len(), items.len());
    for (k, item) in items.iter().enumerate() {
        assert_eq!(item["dataset_index"].as_u64(), Some(k as u64));
        let record = filtered.indices[k];
        assert_eq!(
            Some(record as u64 + 1),
            item["lmdb_index"].as_u64(),
            "item {k}"
        );
        assert_eq!(
            filtered.labels[k],
            item["label"].as_str().expect("label"),
            "item {k}"
        );
        if check_images {
            let image = dataset
                .get(record)
                .expect("record")
                .decode_rgb()
                .expect("image");
            let size = [u64::from(image.width()), u64::from(image.height())];
            let expected: Vec<u64> = item["image_size_wh"]
                .as_array()
                .expect("size")
                .iter()
                .filter_map(serde_json::Value::as_u64)
                .collect();
            assert_eq!(size.as_slice(), expected.as_slice(), "item {k}");
        }
    }
}

#[test]
fn lmdb_tiny_filtered_labels_match_reference() {
    let Some(shared) = common::shared_fixtures(|p| p.join("lmdb_tiny/data.mdb").is_file()) else {
        eprintln!("skipped: ../shared/fixtures/lmdb_tiny not found (third-party photos are not in the repo)");
        return;
    };
    let json = reference();
    let dataset = open_dataset(shared.join("lmdb_tiny")).expect("open lmdb_tiny");
    assert_eq!(dataset.name(), "lmdb_tiny");
    let samples = json["samples"].as_array().expect("samples");
    assert_eq!(dataset.len(), samples.len());
    for (i, sample) in samples.iter().enumerate() {
        let record = dataset.get(i).expect("record");
        assert_eq!(record.label_raw, sample["raw_label"].as_str().expect("raw"));
        assert_eq!(record.key, format!("image-{:09}", i + 1));
        let file = shared.join(sample["image_file"].as_str().expect("file"));
        assert_eq!(record.image_bytes, std::fs::read(file).expect("image file"));
    }
    check_case(dataset.as_ref(), &json["results"]["train_94"], true);
    check_case(dataset.as_ref(), &json["results"]["test_36"], false);
}

/// Writes the fixture's labels with tiny stand-in images, once as an LMDB and once as a folder.
fn write_copies(dir: &Path) -> (PathBuf, PathBuf) {
    let json = reference();
    let lmdb = dir.join("lmdb");
    let folder = dir.join("folder");
    std::fs::create_dir_all(&folder).expect("mkdir");
    let mut writer = LmdbWriter::create(&lmdb).expect("create");
    let mut tsv = String::new();
    for (i, sample) in json["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .enumerate()
    {
        let label = sample["raw_label"].as_str().expect("raw");
        let bytes = format!("image {i}").into_bytes();
        writer.push(&bytes, label).expect("push");
        let file = format!("{i:03}.png");
        std::fs::write(folder.join(&file), &bytes).expect("write image");
        tsv.push_str(&format!("{file}\t{label}\n"));
    }
    writer.finish().expect("finish");
    std::fs::write(folder.join("labels.tsv"), tsv).expect("write labels");
    (lmdb, folder)
}

#[test]
fn written_lmdb_and_label_folder_filter_like_the_reference() {
    let dir = std::env::temp_dir().join(format!("clip4str-data-parity-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (lmdb, folder) = write_copies(&dir);
    let json = reference();
    for path in [&lmdb, &folder] {
        let dataset = open_dataset(path).expect("open");
        assert_eq!(dataset.len(), 12);
        // Every raw label survives the round trip, including the empty one and surrounding spaces.
        for (i, sample) in json["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .enumerate()
        {
            assert_eq!(
                dataset.label(i).expect("label"),
                sample["raw_label"].as_str().expect("raw")
            );
            assert_eq!(
                dataset.image(i).expect("image"),
                format!("image {i}").as_bytes()
            );
        }
        check_case(dataset.as_ref(), &json["results"]["train_94"], false);
        check_case(dataset.as_ref(), &json["results"]["test_36"], false);
        let test = dataset
            .filtered(&CharsetAdapter::new(CHARSET_36), 25, true, true)
            .expect("filter");
        let train = dataset
            .filtered(&CharsetAdapter::new(CHARSET_94), 25, true, true)
            .expect("filter");
        assert!(test.len() < train.len());
    }
    let folder_dataset = open_dataset(&folder).expect("open");
    assert_eq!(folder_dataset.key(0), "000.png");
    let _ = std::fs::remove_dir_all(&dir);
}
