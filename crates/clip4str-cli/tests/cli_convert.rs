//! End-to-end tests of the commands that write model files. `convert`: the converted file loads alone and reads like
//! the original. `average`: the mean of one model's files loads alone and reads like the model; files of different
//! models, bad weights and taken outputs are refused with the file named.

mod common;

use std::path::Path;

use common::{clip4str, fixtures, root, stderr};

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `read --format json` over the committed synthetic images with `checkpoint`.
fn read_json(checkpoint: &Path) -> Vec<serde_json::Value> {
    let images = fixtures().join("images");
    let out = clip4str(&[
        "read",
        "--format",
        "json",
        "--checkpoint",
        path_str(checkpoint),
        path_str(&images),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

#[test]
fn f32_conversion_reads_identically_and_f16_closely() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let f32_out = tmp.path().join("tiny32.safetensors");
    let f16_out = tmp.path().join("tiny16.safetensors");
    let ckpt = fixtures().join("tiny.ckpt");
    let out = clip4str(&["convert", path_str(&ckpt), path_str(&f32_out)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = clip4str(&[
        "convert",
        path_str(&ckpt),
        path_str(&f16_out),
        "--dtype",
        "f16",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let size32 = std::fs::metadata(&f32_out).expect("f32 file").len();
    let size16 = std::fs::metadata(&f16_out).expect("f16 file").len();
    assert!(
        size16 * 10 < size32 * 6,
        "f16 {size16} bytes vs f32 {size32}"
    );

    let original = read_json(&ckpt);
    assert_eq!(original.len(), 5);
    assert_eq!(read_json(&f32_out), original);
    // Rounding the random tiny model's weights to f16 may flip a near-tie, but not the bulk of the output.
    let half = read_json(&f16_out);
    let same = half
        .iter()
        .zip(&original)
        .filter(|(a, b)| a["text"] == b["text"])
        .count();
    assert!(same >= 4, "only {same}/5 strings survive f16 storage");
}

#[test]
fn file_without_head_counts_needs_config_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_path = tmp.path().join("tiny.safetensors");
    let pt = fixtures().join("tiny.pt");
    let out = clip4str(&["convert", path_str(&pt), path_str(&out_path)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
    assert!(
        !out_path.exists(),
        "a failed conversion must not leave a file"
    );

    let config = fixtures().join("tiny_config.json");
    let out = clip4str(&[
        "convert",
        path_str(&pt),
        path_str(&out_path),
        "--config",
        path_str(&config),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The converted file carries the dimensions: no --config needed any more.
    assert_eq!(
        read_json(&out_path),
        read_json(&fixtures().join("tiny.ckpt"))
    );
}

#[test]
fn existing_output_is_kept_unless_forced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_path = tmp.path().join("taken.safetensors");
    std::fs::write(&out_path, b"precious").expect("write");
    let ckpt = fixtures().join("tiny.ckpt");
    let out = clip4str(&["convert", path_str(&ckpt), path_str(&out_path)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(&out_path).expect("read"), b"precious");
    let out = clip4str(&["convert", "--force", path_str(&ckpt), path_str(&out_path)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read_json(&out_path), read_json(&ckpt));
}

#[test]
fn broken_input_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad = tmp.path().join("broken.ckpt");
    std::fs::write(&bad, b"PK\x03\x04 not really a zip").expect("write");
    let out_path = tmp.path().join("out.safetensors");
    let out = clip4str(&["convert", path_str(&bad), path_str(&out_path)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.ckpt"));
    assert!(!out_path.exists());
}

/// The `__metadata__` of a safetensors file.
fn metadata(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).expect("read output");
    let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + len]).expect("safetensors header");
    header["__metadata__"].clone()
}

#[test]
fn mean_of_one_models_files_reads_like_the_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A folder that does not exist yet is created, as the rebuild script's `--out runs/default-p9avg/...` needs.
    let out_path = tmp.path().join("new").join("soup.safetensors");
    let ckpt = fixtures().join("tiny.ckpt");
    // The same weights as a bare `.pt` state dict, which needs the head counts from --config.
    let pt = fixtures().join("tiny.pt");
    let config = fixtures().join("tiny_config.json");
    let out = clip4str(&[
        "average",
        path_str(&ckpt),
        path_str(&pt),
        "--out",
        path_str(&out_path),
        "--config",
        path_str(&config),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("wrote"), "{}", stderr(&out));
    // The mean of equal weights is those weights, bit for bit, so the reads are identical.
    assert_eq!(read_json(&out_path), read_json(&ckpt));
    let meta = metadata(&out_path);
    assert_eq!(
        meta["averaged_from"],
        "tiny.ckpt (0.5000), tiny.pt (0.5000)"
    );
    assert_eq!(meta["format"], "clip4str");
}

#[test]
fn different_models_are_refused_and_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_path = tmp.path().join("soup.safetensors");
    let tiny = fixtures().join("tiny.ckpt");
    let bundled = root().join("models/default/clip4str-small.safetensors");
    let out = clip4str(&[
        "average",
        path_str(&tiny),
        path_str(&bundled),
        "--out",
        path_str(&out_path),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let msg = stderr(&out);
    assert!(
        msg.contains("tiny.ckpt")
            && msg.contains("clip4str-small.safetensors")
            && msg.contains("different models")
            && msg.contains("embed_dim"),
        "{msg}"
    );
    assert!(
        !out_path.exists(),
        "a refused average must not leave a file"
    );
}

#[test]
fn bad_weights_taken_outputs_and_broken_inputs_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_path = tmp.path().join("soup.safetensors");
    let ckpt = fixtures().join("tiny.ckpt");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "average",
            path_str(&ckpt),
            path_str(&ckpt),
            "--out",
            path_str(&out_path),
        ];
        args.extend_from_slice(extra);
        clip4str(&args)
    };
    for (weights, words) in [
        ("1", "--weights has 1 values for 2 checkpoints"),
        ("1,-2", "not a finite number"),
        ("0,0", "all zero"),
    ] {
        let out = run(&["--weights", weights]);
        assert_eq!(out.status.code(), Some(2), "{weights}: {}", stderr(&out));
        assert!(stderr(&out).contains(words), "{weights}: {}", stderr(&out));
        assert!(!out_path.exists());
    }

    // One input is not an average.
    let out = clip4str(&["average", path_str(&ckpt), "--out", path_str(&out_path)]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    let bad = tmp.path().join("broken.ckpt");
    std::fs::write(&bad, b"PK\x03\x04 not really a zip").expect("write");
    let out = clip4str(&[
        "average",
        path_str(&ckpt),
        path_str(&bad),
        "--out",
        path_str(&out_path),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("broken.ckpt"), "{}", stderr(&out));
    assert!(!out_path.exists());

    std::fs::write(&out_path, b"precious").expect("write");
    let out = run(&["--weights", "3,1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&out_path).expect("read"), b"precious");
    let out = run(&["--weights", "3,1", "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        metadata(&out_path)["averaged_from"],
        "tiny.ckpt (0.7500), tiny.ckpt (0.2500)"
    );
}

/// `convert --model small OUT` writes the bundled model (the name, not a path, is the input) and the file reads
/// exactly like the bundled model; an input file beside --model, or a lone file without it, is a usage error.
#[test]
fn a_model_named_instead_of_a_file_converts() {
    let dir = common::temp_dir("convert-model");
    let out_file = dir.join("small.safetensors");
    let out = clip4str(&["convert", "--model", "small", path_str(&out_file)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(metadata(&out_file)["converted_from"], "model small");
    let examples = root().join("examples/images");
    let read = |extra: &[&str]| {
        let mut args = vec!["read", "--format", "json"];
        args.extend_from_slice(extra);
        args.push(path_str(&examples));
        let out = clip4str(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).expect("utf-8")
    };
    // f16 weights widened to f32 are the same numbers: the bundled model's output, byte for byte.
    assert_eq!(read(&["--checkpoint", path_str(&out_file)]), read(&[]));

    let both = clip4str(&["convert", "--model", "small", "in.pt", "out.safetensors"]);
    assert_eq!(both.status.code(), Some(2));
    assert!(
        stderr(&both).contains("give only the OUTPUT file"),
        "{}",
        stderr(&both)
    );
    let lone = clip4str(&["convert", "out.safetensors"]);
    assert_eq!(lone.status.code(), Some(2));
    assert!(stderr(&lone).contains("INPUT OUTPUT"), "{}", stderr(&lone));
    std::fs::remove_dir_all(&dir).ok();
}
