//! End-to-end tests of `clip4str synth` on the committed fixture font: LMDB output read back with
//! `open_dataset`, thread-count independence, fixed size and JPEG, preview folders, errors.

mod common;

use std::path::PathBuf;

use clip4str::charset::CHARSET_94;
use clip4str::data::open_dataset;
use clip4str::preprocess::decode_rgb;
use common::{clip4str, fixtures, stderr, temp_dir};

fn fonts() -> String {
    fixtures().join("fonts").display().to_string()
}

/// Every record of a dataset as (label, image bytes).
fn records(path: &PathBuf) -> Vec<(String, Vec<u8>)> {
    let dataset = open_dataset(path).expect("open");
    (0..dataset.len())
        .map(|i| {
            let sample = dataset.get(i).expect("record");
            (sample.label_raw, sample.image_bytes)
        })
        .collect()
}

#[test]
fn writes_an_lmdb_that_reads_back_the_same_for_any_thread_count() {
    let dir = temp_dir("lmdb");
    let mut datasets = Vec::new();
    for threads in ["1", "2"] {
        let out = dir.join(format!("threads{threads}"));
        let out_arg = out.display().to_string();
        let fonts = fonts();
        let output = clip4str(&[
            "--threads",
            threads,
            "synth",
            "--out",
            &out_arg,
            "--count",
            "50",
            "--fonts",
            &fonts,
            "--seed",
            "9",
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        let log = stderr(&output);
        assert!(log.contains("1 fonts in 1 families"), "{log}");
        assert!(log.contains("wrote 50 images"), "{log}");
        assert!(log.contains("images/s"), "{log}");
        datasets.push(records(&out));
    }
    assert_eq!(datasets[0], datasets[1]);
    for (label, bytes) in &datasets[0] {
        assert!((1..=25).contains(&label.len()), "{label:?}");
        assert!(label.chars().all(|c| CHARSET_94.contains(c)), "{label:?}");
        assert!(bytes.starts_with(b"\x89PNG"));
        let image = decode_rgb(bytes).expect("decode");
        assert!((32..=64).contains(&image.height()));
    }

    // An existing dataset is never overwritten.
    let out_arg = dir.join("threads1").display().to_string();
    let fonts = fonts();
    let output = clip4str(&[
        "synth", "--out", &out_arg, "--count", "5", "--fonts", &fonts,
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("refusing to overwrite"),
        "{}",
        stderr(&output)
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn fixed_size_jpeg_shards_and_preview() {
    let dir = temp_dir("formats");
    let fonts = fonts();
    let whole = dir.join("whole").display().to_string();
    let output = clip4str(&[
        "synth", "--out", &whole, "--count", "12", "--fonts", &fonts, "--size", "32x128",
        "--format", "jpeg",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let whole = records(&dir.join("whole"));
    for (_, bytes) in &whole {
        assert!(bytes.starts_with(&[0xFF, 0xD8, 0xFF]));
        assert_eq!(decode_rgb(bytes).expect("decode").dimensions(), (128, 32));
    }
    // --start continues the same sequence.
    let tail = dir.join("tail").display().to_string();
    let output = clip4str(&[
        "synth", "--out", &tail, "--count", "4", "--start", "8", "--fonts", &fonts, "--size",
        "32x128", "--format", "jpeg",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(records(&dir.join("tail")), whole[8..]);

    let preview = dir.join("preview");
    let preview_arg = preview.display().to_string();
    let output = clip4str(&[
        "synth",
        "--preview",
        &preview_arg,
        "--count",
        "6",
        "--fonts",
        &fonts,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let shown = records(&preview);
    assert_eq!(shown.len(), 6);
    assert!(preview.join("00000005.png").is_file());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_arguments_are_errors() {
    let dir = temp_dir("errors");
    let empty = dir.join("no-fonts");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let out = dir.join("out").display().to_string();
    let empty_arg = empty.display().to_string();
    let output = clip4str(&[
        "synth", "--out", &out, "--count", "5", "--fonts", &empty_arg,
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("no .ttf/.otf fonts found"),
        "{}",
        stderr(&output)
    );

    let fonts = fonts();
    let output = clip4str(&[
        "synth",
        "--out",
        &out,
        "--count",
        "5",
        "--fonts",
        &fonts,
        "--font-split",
        "train",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("no usable font"),
        "{}",
        stderr(&output)
    );

    let output = clip4str(&["synth", "--out", &out, "--count", "5", "--size", "32"]);
    assert_eq!(output.status.code(), Some(2));
    let output = clip4str(&["synth", "--count", "5"]);
    assert_eq!(output.status.code(), Some(2));
    // An empty dataset is a mistake, not a result: nothing is written.
    let output = clip4str(&["synth", "--out", &out, "--count", "0"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--count"), "{}", stderr(&output));
    assert!(!std::path::Path::new(&out).exists());
    for bad in ["0", "26", "six"] {
        let output = clip4str(&["synth", "--out", &out, "--count", "5", "--max-length", bad]);
        assert_eq!(output.status.code(), Some(2), "--max-length {bad}");
        assert!(
            stderr(&output).contains("is not a label length from 1 to 25"),
            "{}",
            stderr(&output)
        );
    }
    // `--out` onto an existing file: the writer's error names the file, and the CLI does not name it again.
    let file = dir.join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let file_arg = file.display().to_string();
    let output = clip4str(&[
        "synth", "--out", &file_arg, "--count", "5", "--fonts", &fonts,
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_eq!(
        stderr(&output).matches(&file_arg).count(),
        1,
        "{}",
        stderr(&output)
    );
    assert_eq!(std::fs::read(&file).expect("read"), b"x");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn max_length_bounds_every_label() {
    let dir = temp_dir("short");
    let fonts = fonts();
    let out = dir.join("short").display().to_string();
    let output = clip4str(&[
        "synth",
        "--out",
        &out,
        "--count",
        "40",
        "--fonts",
        &fonts,
        "--max-length",
        "3",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let labels: Vec<String> = records(&dir.join("short"))
        .into_iter()
        .map(|(label, _)| label)
        .collect();
    assert_eq!(labels.len(), 40);
    assert!(
        labels.iter().all(|l| (1..=3).contains(&l.chars().count())),
        "{labels:?}"
    );
    // Not one fixed length: the generator still spreads lengths below the bound.
    assert!(labels.iter().any(|l| l.chars().count() < 3), "{labels:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn list_fonts_prints_each_family_and_its_files_without_rendering() {
    let fonts = fonts();
    let font_file = PathBuf::from(&fonts).join("Caladea-Regular.ttf");
    let output = clip4str(&["synth", "--list-fonts", "--fonts", &fonts]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.trim_end(),
        format!("caladea\t{}", font_file.display()),
        "{stdout}"
    );
    assert!(stderr(&output).contains("1 fonts in 1 families"));
    // Caladea is a held-out family: the same list on that side, an error naming the problem on the other.
    let output = clip4str(&[
        "synth",
        "--list-fonts",
        "--fonts",
        &fonts,
        "--font-split",
        "heldout",
    ]);
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("caladea\t"));
    let output = clip4str(&[
        "synth",
        "--list-fonts",
        "--fonts",
        &fonts,
        "--font-split",
        "train",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("no usable font"),
        "{}",
        stderr(&output)
    );
    // Listing writes nothing, so an output folder is a mistake rather than ignored.
    let dir = temp_dir("list-fonts");
    let out = dir.join("out").display().to_string();
    let output = clip4str(&["synth", "--list-fonts", "--out", &out, "--fonts", &fonts]);
    assert_eq!(output.status.code(), Some(2));
    assert!(!dir.join("out").exists());
    std::fs::remove_dir_all(&dir).ok();
}
