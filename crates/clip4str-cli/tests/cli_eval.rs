//! End-to-end tests of `clip4str eval`: an LMDB written here, a labels.tsv folder, the shared lmdb_tiny; and of
//! `clip4str compare` on its dumps.

mod common;

use std::path::{Path, PathBuf};

use clip4str::charset::{CharsetAdapter, CHARSET_36};
use clip4str::data::LmdbWriter;
use common::{clip4str, fixtures, temp_dir};

fn shared_fixtures() -> Option<PathBuf> {
    let p = std::env::var_os("CLIP4STR_SHARED")
        .map(PathBuf::from)
        .map(|p| {
            if p.join("fixtures").is_dir() {
                p.join("fixtures")
            } else {
                p
            }
        })
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
        });
    p.join("lmdb_tiny").is_dir().then_some(p)
}

fn synth_images() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures().join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn ckpt() -> String {
    fixtures().join("tiny.ckpt").display().to_string()
}

/// `read` on files, filtered by the 36-char adapter: what eval must predict at batch size 1.
fn read_predictions(files: &[PathBuf]) -> Vec<String> {
    let mut args = vec![
        "read".to_string(),
        "--checkpoint".into(),
        ckpt(),
        "--format".into(),
        "json".into(),
    ];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = clip4str(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let adapter = CharsetAdapter::new(CHARSET_36);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            adapter.apply(v["raw"].as_str().unwrap())
        })
        .collect()
}

fn dump_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn own_lmdb_with_a_corrupt_record_is_scored_and_reported() {
    let root = temp_dir("lmdb");
    let db = root.join("test").join("CUTE80");
    std::fs::create_dir_all(&db).unwrap();
    let images = synth_images();
    let mut w = LmdbWriter::create(&db).unwrap();
    let labels = ["Hello42", "gray", "noise", "RED", "text!"];
    for (img, label) in images.iter().zip(labels) {
        w.push(&std::fs::read(img).unwrap(), label).unwrap();
    }
    w.push(b"not an image at all", "broken").unwrap();
    w.push(&std::fs::read(&images[0]).unwrap(), "").unwrap(); // empty label: filtered out, not scored
    w.finish().unwrap();

    let dump = root.join("dump.jsonl");
    let out = clip4str(&[
        "eval",
        "--checkpoint",
        &ckpt(),
        "--data",
        root.to_str().unwrap(),
        "--batch-size",
        "1",
        "--dump",
        dump.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stderr.contains("image-000000006"), "stderr: {stderr}");
    assert!(stderr.contains("IIIT5k not found"), "stderr: {stderr}");
    assert!(
        stdout.contains("| CUTE80   |         5 |"),
        "stdout: {stdout}"
    );
    assert!(
        stdout.contains("| Combined |         5 |"),
        "stdout: {stdout}"
    );
    // The unreadable record is in no figure, and the table says so (it used to appear on stderr only).
    assert!(stdout.contains("| Unreadable |"), "stdout: {stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("| CUTE80 ") && l.ends_with("|          1 |")),
        "stdout: {stdout}"
    );
    assert!(stdout.contains("images/s"));

    // Per-sample predictions equal what `read` gives on the same images.
    let dumped = dump_lines(&dump);
    assert_eq!(dumped.len(), 5);
    let read = read_predictions(&images);
    for (d, r) in dumped.iter().zip(&read) {
        assert_eq!(d["prediction"].as_str().unwrap(), r);
        assert_eq!(d["dataset"], "CUTE80");
    }
    assert_eq!(dumped[0]["label"], "hello42"); // test.py lowercases ground truth
    assert_eq!(dumped[4]["label"], "text"); // and drops unsupported characters
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn labels_tsv_folder_json_output_and_limit() {
    let dir = temp_dir("folder");
    let images = synth_images();
    let mut tsv = String::new();
    for (i, img) in images.iter().enumerate() {
        let name = format!("img{i}.png");
        std::fs::copy(img, dir.join(&name)).unwrap();
        tsv.push_str(&format!("{name}\tword{i}\n"));
    }
    std::fs::write(dir.join("labels.tsv"), tsv).unwrap();
    let out = clip4str(&[
        "eval",
        "--checkpoint",
        &ckpt(),
        "--data",
        dir.to_str().unwrap(),
        "--format",
        "json",
        "--limit",
        "3",
        "--rotation",
        "90",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["datasets"][0]["num_samples"], 3);
    assert_eq!(v["combined"]["num_samples"], 3);
    assert!(v["images_per_second"].as_f64().unwrap() > 0.0);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_data_and_bad_flags_are_errors() {
    let out = clip4str(&[
        "eval",
        "--checkpoint",
        &ckpt(),
        "--data",
        "/nonexistent/data",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/data"));
    let out = clip4str(&[
        "eval",
        "--checkpoint",
        &ckpt(),
        "--data",
        fixtures().to_str().unwrap(),
        "--batch-size",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn shared_lmdb_tiny_matches_read() {
    let Some(shared) = shared_fixtures() else {
        eprintln!("skipped: ../shared/fixtures/lmdb_tiny not found");
        return;
    };
    let dir = temp_dir("tiny");
    let dump = dir.join("dump.jsonl");
    let out = clip4str(&[
        "eval",
        "--checkpoint",
        &ckpt(),
        "--data",
        shared.join("lmdb_tiny").to_str().unwrap(),
        "--batch-size",
        "1",
        "--dump",
        dump.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("lmdb_tiny.json")).unwrap())
            .unwrap();
    let samples = json["samples"].as_array().unwrap();
    let items = json["results"]["test_36"]["items"].as_array().unwrap();
    let dumped = dump_lines(&dump);
    assert_eq!(dumped.len(), items.len());
    let files: Vec<PathBuf> = items
        .iter()
        .map(|it| {
            let lmdb_index = it["lmdb_index"].as_u64().unwrap();
            let s = samples
                .iter()
                .find(|s| s["lmdb_index"].as_u64() == Some(lmdb_index))
                .unwrap();
            shared.join(s["image_file"].as_str().unwrap())
        })
        .collect();
    let read = read_predictions(&files);
    for ((d, it), r) in dumped.iter().zip(items).zip(&read) {
        assert_eq!(d["label"], it["label"]);
        assert_eq!(d["prediction"].as_str().unwrap(), r);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_broken_lmdb_is_named_once() {
    let dir = temp_dir("broken-lmdb");
    std::fs::write(dir.join("data.mdb"), vec![0u8; 100]).unwrap();
    let data = dir.to_str().unwrap();
    let out = clip4str(&["eval", "--data", data]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("not an LMDB file"), "stderr: {stderr}");
    // The library's message names the folder; the CLI must not name it a second time.
    assert_eq!(stderr.matches(data).count(), 1, "stderr: {stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn compare_pairs_two_dumps_image_by_image() {
    let root = temp_dir("compare");
    let set = root.join("words");
    std::fs::create_dir_all(&set).unwrap();
    let mut labels = String::new();
    for (i, img) in synth_images().iter().enumerate() {
        let name = format!("w{i}.png");
        std::fs::copy(img, set.join(&name)).unwrap();
        labels.push_str(&format!("{name}\tword{i}\n"));
    }
    std::fs::write(set.join("labels.tsv"), labels).unwrap();
    let dump_a = root.join("a.jsonl");
    let out = clip4str(&[
        "eval",
        "--checkpoint",
        &ckpt(),
        "--data",
        set.to_str().unwrap(),
        "--dump",
        dump_a.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Verdicts set here, so that both kinds of disagreement occur whatever the tiny model reads: A is the
    // dump with only its first image right; B has the even-numbered images right, lacks A's last record and
    // lists its records in reverse, so that only pairing by key, not by line, gives the expected counts.
    let mut a = dump_lines(&dump_a);
    assert!(a.len() >= 4, "{a:?}");
    for (i, rec) in a.iter_mut().enumerate() {
        rec["correct"] = (i == 0).into();
    }
    let mut b = a.clone();
    b.pop();
    for (i, rec) in b.iter_mut().enumerate() {
        rec["correct"] = (i % 2 == 0).into();
    }
    b.reverse();
    let counts = |pairs: Vec<(&serde_json::Value, &serde_json::Value)>| {
        let verdicts = pairs.iter().map(|(x, y)| {
            (
                x["correct"].as_bool().unwrap(),
                y["correct"].as_bool().unwrap(),
            )
        });
        verdicts.fold((0, 0), |(only_a, only_b), (x, y)| {
            (only_a + usize::from(x && !y), only_b + usize::from(y && !x))
        })
    };
    let by_key = counts(
        a.iter()
            .filter_map(|x| b.iter().find(|y| y["key"] == x["key"]).map(|y| (x, y)))
            .collect(),
    );
    assert_ne!(
        by_key,
        counts(a.iter().zip(&b).collect()),
        "the test must tell keys from lines"
    );
    let (only_a, only_b) = by_key;
    let write = |path: &Path, records: &[serde_json::Value]| {
        let lines: Vec<String> = records.iter().map(|r| r.to_string()).collect();
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    };
    write(&dump_a, &a);
    let dump_b = root.join("b.jsonl");
    write(&dump_b, &b);

    let out = clip4str(&[
        "compare",
        dump_a.to_str().unwrap(),
        dump_b.to_str().unwrap(),
        "--format",
        "json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("1 record(s) only in A"), "{stderr}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &rows[0];
    assert_eq!(row["dataset"], "words");
    assert_eq!(row["paired"], b.len());
    assert_eq!(row["only_a"], only_a);
    assert_eq!(row["only_b"], only_b);
    let p = clip4str::eval::paired::mcnemar_exact(only_a, only_b);
    assert!(
        (row["p_value"].as_f64().unwrap() - p).abs() < 1e-12,
        "{row}"
    );

    // A file that is not a dump is named with its line.
    std::fs::write(root.join("bad.jsonl"), "{\"dataset\": \"words\"}\n").unwrap();
    let out = clip4str(&[
        "compare",
        dump_a.to_str().unwrap(),
        root.join("bad.jsonl").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.jsonl: line 1: no \"key\" field"),
        "{stderr}"
    );
}
