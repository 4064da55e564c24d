//! End-to-end tests of `clip4str data create` and `clip4str data show` on images written by the test: skipped
//! records and exit codes, the LMDB read back byte for byte, the printed summary, the contact sheet, errors.

mod common;

use std::path::Path;

use clip4str::data::{open_dataset, LmdbWriter};
use common::{clip4str_in, fixtures, stderr, stdout, temp_dir};
use image::{ImageFormat, Rgb, RgbImage};

/// Pixel size of a contact sheet of `count` tiles: 4 columns of 192x64 image boxes over 24-pixel captions,
/// 8-pixel gaps (the constants of `crates/clip4str-cli/src/data/sheet.rs`).
fn sheet_size(count: u32) -> (u32, u32) {
    let columns = count.min(4);
    let rows = count.div_ceil(4);
    (8 + columns * (192 + 8), 8 + rows * (64 + 24 + 8))
}

fn encode(image: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, format).expect("encode");
    bytes.into_inner()
}

/// An image folder with three good images, a corrupt one, and a `labels.tsv` that also lists a missing file,
/// an empty label, a label with a TAB and a line without one. Returns the good (file, label, bytes).
fn write_folder(dir: &Path) -> Vec<(&'static str, &'static str, Vec<u8>)> {
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
    let red = encode(
        &RgbImage::from_pixel(40, 20, Rgb([200, 30, 30])),
        ImageFormat::Png,
    );
    let text =
        std::fs::read(fixtures().join("images/synth_text_L_140x40.png")).expect("fixture image");
    let gradient = RgbImage::from_fn(64, 32, |x, y| Rgb([(x * 4) as u8, (y * 8) as u8, 128]));
    let jpeg = encode(&gradient, ImageFormat::Jpeg);
    let good = vec![
        ("a.png", "Hello", red),
        ("sub/b.png", "World 42", text),
        ("c.jpg", "café!", jpeg),
    ];
    for (file, _, bytes) in &good {
        std::fs::write(dir.join(file), bytes).expect("write image");
    }
    std::fs::write(dir.join("bad.png"), b"\x89PNG\r\n\x1a\nnot really").expect("write");
    std::fs::write(
        dir.join("labels.tsv"),
        "a.png\tHello\n\
         sub/b.png\tWorld 42\n\
         bad.png\tnope\n\
         missing.png\tgone\n\
         a.png\t\n\
         c.jpg\tcafé!\n\
         a.png\tx\ty\n\
         no tab on this line\n",
    )
    .expect("write labels");
    good
}

#[test]
fn create_skips_bad_records_and_show_summarises_the_lmdb() {
    let dir = temp_dir("create");
    let good = write_folder(&dir.join("imgs"));
    let output = clip4str_in(
        &dir,
        &[
            "data",
            "create",
            "--images",
            "imgs",
            "--labels",
            "imgs/labels.tsv",
            "--out",
            "lmdb",
        ],
    );
    let log = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{log}");
    for expected in [
        "bad.png: ",
        "missing.png: no such file (line 4 of imgs/labels.tsv)",
        "imgs/labels.tsv: line 5: a.png: empty label",
        "imgs/labels.tsv: line 7: a.png: label holds a TAB",
        "imgs/labels.tsv: line 8: no TAB between file name and label",
        "wrote 3 images to lmdb",
        "skipped 5 of 8 records (1 bad image, 2 bad labels, 1 malformed line, 1 missing file)",
    ] {
        assert!(log.contains(expected), "missing {expected:?} in:\n{log}");
    }

    // The LMDB holds the good records in label-file order, image bytes unchanged, keys numbered from 1.
    let lmdb = dir.join("lmdb");
    let dataset = open_dataset(&lmdb).expect("open");
    assert_eq!(dataset.len(), good.len());
    for (index, (_, label, bytes)) in good.iter().enumerate() {
        let sample = dataset.get(index).expect("record");
        assert_eq!(sample.key, format!("image-{:09}", index + 1));
        assert_eq!(&sample.label_raw, label);
        assert!(sample.image_bytes == *bytes, "image {index} differs");
    }
    drop(dataset);
    let raw = std::fs::read(lmdb.join("data.mdb")).expect("read data.mdb");
    let holds = |key: &str| raw.windows(key.len()).any(|w| w == key.as_bytes());
    assert!(holds("num-samples") && holds("image-000000001") && holds("label-000000003"));
    assert!(!holds("image-000000000") && !holds("label-000000004"));

    // An existing dataset is never overwritten.
    let output = clip4str_in(
        &dir,
        &[
            "data",
            "create",
            "--images",
            "imgs",
            "--labels",
            "imgs/labels.tsv",
            "--out",
            "lmdb",
        ],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("refusing to overwrite"),
        "{}",
        stderr(&output)
    );

    let output = clip4str_in(
        &dir,
        &[
            "data",
            "show",
            "lmdb",
            "-n",
            "2",
            "--sheet",
            "out/sheet.png",
        ],
    );
    assert_eq!(
        output.status.code(),
        Some(2),
        "the sheet folder does not exist"
    );
    assert!(stderr(&output).contains("out"), "{}", stderr(&output));

    let output = clip4str_in(
        &dir,
        &["data", "show", "lmdb", "--n", "2", "--sheet", "sheet.png"],
    );
    let text = stdout(&output);
    assert!(output.status.success(), "{}{text}", stderr(&output));
    for expected in [
        "samples: 3\n",
        "unreadable records: 0 ",
        "\n    5 |",
        "\n    8 |",
        "charset: 13 of the 94 training characters occur",
        "outside it: 2 distinct, 2 occurrences",
        "' ' U+0020 1",
        "'é' U+00E9 1",
        "sheet: sheet.png (2 samples, 408x104 pixels)",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    let never = text
        .lines()
        .find(|l| l.contains("never:"))
        .expect("never line");
    assert!(never.contains('Z') && !never.contains('H'), "{never}");
    let sheet = image::open(dir.join("sheet.png")).expect("sheet is a PNG");
    assert_eq!((sheet.width(), sheet.height()), sheet_size(2));

    // `data show lmdb | head -2`: stdout closed before anything is printed. A normal end (it used to panic with
    // "Broken pipe", status 101), and the sheet is still drawn.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_clip4str"))
        .args(["data", "show", "lmdb", "--n", "2", "--sheet", "piped.png"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run clip4str");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("wait for clip4str");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stderr(&output).is_empty(), "{}", stderr(&output));
    assert!(dir.join("piped.png").is_file(), "the sheet was not written");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn show_counts_damaged_records_without_failing() {
    let dir = temp_dir("show");
    write_folder(&dir.join("imgs"));

    // A folder dataset: labels only, no sheet. The malformed line is the one unreadable record.
    let output = clip4str_in(&dir, &["data", "show", "imgs", "-n", "0"]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        text.contains("samples: 8\n") && text.contains("unreadable records: 1 "),
        "{text}"
    );
    assert!(stderr(&output).contains("line 8"), "{}", stderr(&output));
    assert!(!text.contains("sheet:") && !dir.join("imgs-sheet.png").exists());

    // Decoding every image finds the corrupt and the missing file too; the sheet goes to the current folder.
    let output = clip4str_in(&dir, &["data", "show", "imgs", "--check-images"]);
    let text = stdout(&output);
    let log = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{log}");
    assert!(
        text.contains("unreadable records: 3 (labels and images checked)"),
        "{text}"
    );
    assert!(
        log.contains("bad.png") && log.contains("missing.png"),
        "{log}"
    );
    assert!(
        text.contains("    0 |"),
        "the empty label is counted: {text}"
    );
    assert!(
        text.contains("sheet: imgs-sheet.png (8 samples, 808x200 pixels)"),
        "{text}"
    );
    let sheet = image::open(dir.join("imgs-sheet.png")).expect("sheet is a PNG");
    assert_eq!((sheet.width(), sheet.height()), sheet_size(8));

    // An LMDB record whose image is not an image: counted, named by key, drawn as an empty tile.
    let lmdb = dir.join("damaged");
    let mut writer = LmdbWriter::create(&lmdb).expect("create");
    let png = encode(
        &RgbImage::from_pixel(30, 10, Rgb([0, 90, 0])),
        ImageFormat::Png,
    );
    writer.push(&png, "ok").expect("push");
    writer.push(b"garbage", "broken").expect("push");
    writer.finish().expect("finish");
    let output = clip4str_in(&dir, &["data", "show", "damaged"]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("image-000000002"),
        "{}",
        stderr(&output)
    );
    assert!(text.contains("unreadable records: 1 "), "{text}");
    let sheet = image::open(dir.join("damaged-sheet.png")).expect("sheet is a PNG");
    assert_eq!((sheet.width(), sheet.height()), sheet_size(2));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_arguments_are_errors() {
    let dir = temp_dir("errors");
    write_folder(&dir.join("imgs"));
    std::fs::write(dir.join("empty.tsv"), "").expect("write");
    std::fs::write(dir.join("hopeless.tsv"), "missing.png\tx\nbad.png\ty\n").expect("write");
    std::fs::write(dir.join("file"), "").expect("write");
    std::fs::create_dir_all(dir.join("folder-set")).expect("mkdir");
    std::fs::write(dir.join("folder-set/labels.tsv"), "a.png\tA\n").expect("write");

    let create = |images: &str, labels: &str, out: &str| {
        clip4str_in(
            &dir,
            &[
                "data", "create", "--images", images, "--labels", labels, "--out", out,
            ],
        )
    };
    let cases = [
        (
            create("nope", "imgs/labels.tsv", "o1"),
            "--images nope: no such folder",
        ),
        (
            create("file", "imgs/labels.tsv", "o1"),
            "--images file: is not a folder",
        ),
        (create("imgs", "nope.tsv", "o1"), "nope.tsv: No such file"),
        (create("imgs", "empty.tsv", "o1"), "empty.tsv: no records"),
        (
            create("imgs", "imgs/labels.tsv", "file"),
            "file: exists and is not a folder",
        ),
        (
            create("imgs", "imgs/labels.tsv", "folder-set"),
            "refusing to overwrite",
        ),
        (create("imgs", "hopeless.tsv", "o2"), "nothing written"),
        (
            clip4str_in(&dir, &["data", "show", "nope"]),
            "nope: no such dataset or folder",
        ),
        (
            clip4str_in(&dir, &["data", "show", "imgs/sub"]),
            "not a dataset",
        ),
        (
            clip4str_in(&dir, &["data", "show", "imgs", "-n", "x"]),
            "invalid value",
        ),
        (
            clip4str_in(&dir, &["data", "create", "--images", "imgs"]),
            "--labels",
        ),
        (clip4str_in(&dir, &["data"]), "Usage"),
    ];
    for (output, expected) in cases {
        let log = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{expected}: {log}");
        assert!(log.contains(expected), "missing {expected:?} in:\n{log}");
    }
    assert!(!dir.join("o1").exists() && !dir.join("o2/data.mdb").exists());
    std::fs::remove_dir_all(&dir).ok();
}
