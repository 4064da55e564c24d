//! Golden tests of `clip4str::preprocess` against the reference pipeline (Pillow 9.5.0 +
//! torchvision, `preprocess.safetensors`, see FORMAT.md): decoded pixels, Pillow bicubic
//! resizes to 224 and 64, and the normalised tensors, all expected to be bit-exact.
//!
//! Three sources: the committed synthetic subset under `tests/fixtures/` (always checked); the
//! committed JPEG variants (`tests/fixtures/jpeg_variants/`, our own synthetic picture encoded
//! in many JPEG flavours, with Pillow's decoded pixels); and the full shared fixture folder with
//! the third-party demo photos (`../shared/fixtures` next to the repository, or
//! `$CLIP4STR_SHARED`), which is skipped with a message when absent.

mod common;

use std::path::{Path, PathBuf};

use clip4str::preprocess::{decode_rgb, resize_bicubic, to_chw, ImageError, Normalization};
use common::fixtures;
use image::RgbImage;
use safetensors::{Dtype, SafeTensors};

/// The shared fixture folder, if this checkout has one.
fn shared_fixtures() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("CLIP4STR_SHARED") {
        let dir = PathBuf::from(dir);
        candidates.push(dir.join("fixtures"));
        candidates.push(dir);
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"));
    candidates
        .into_iter()
        .find(|dir| dir.join("preprocess.safetensors").is_file())
}

fn tensor_u8(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<u8>) {
    let view = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(view.dtype(), Dtype::U8, "{name}");
    (view.shape().to_vec(), view.data().to_vec())
}

fn tensor_f32(st: &SafeTensors, name: &str) -> Option<Vec<f32>> {
    let view = st.tensor(name).ok()?;
    assert_eq!(view.dtype(), Dtype::F32, "{name}");
    Some(
        view.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

/// Summary of one image: a list of mismatches (empty when everything is exact).
struct CaseResult {
    case: String,
    failures: Vec<String>,
    max_norm_diff: f32,
}

fn compare_u8(what: &str, got: &RgbImage, want_shape: &[usize], want: &[u8]) -> Option<String> {
    let got_shape = [got.height() as usize, got.width() as usize, 3];
    if want_shape != got_shape {
        return Some(format!(
            "{what}: shape {got_shape:?}, expected {want_shape:?}"
        ));
    }
    let diffs = got
        .as_raw()
        .iter()
        .zip(want)
        .filter(|(a, b)| a != b)
        .count();
    let max = got
        .as_raw()
        .iter()
        .zip(want)
        .map(|(&a, &b)| (i16::from(a) - i16::from(b)).abs())
        .max()
        .unwrap_or(0);
    (diffs > 0).then(|| format!("{what}: {diffs}/{} values differ, max {max}", want.len()))
}

fn check_case(st: &SafeTensors, images: &Path, case: &str) -> CaseResult {
    let mut result = CaseResult {
        case: case.to_string(),
        failures: Vec::new(),
        max_norm_diff: 0.0,
    };
    let file = std::fs::read_dir(images)
        .expect("listing fixture images")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| path.file_stem().and_then(|s| s.to_str()) == Some(case))
        .unwrap_or_else(|| panic!("no image file for case {case} in {}", images.display()));
    let bytes = std::fs::read(&file).expect("reading fixture image");
    let decoded = match decode_rgb(&bytes) {
        Ok(img) => img,
        Err(e) => {
            result.failures.push(format!("decode failed: {e}"));
            return result;
        }
    };
    let (shape, want) = tensor_u8(st, &format!("{case}/decoded_rgb_u8"));
    result
        .failures
        .extend(compare_u8("decoded", &decoded, &shape, &want));
    // The reference pixels, to check the resize on its own even if decoding differed.
    let reference = RgbImage::from_raw(shape[1] as u32, shape[0] as u32, want)
        .expect("decoded_rgb_u8 is [H, W, 3]");

    for size in [224u32, 64] {
        let (shape, want) = tensor_u8(st, &format!("{case}/resized{size}_u8"));
        let resized = resize_bicubic(&decoded, size, size);
        result.failures.extend(compare_u8(
            &format!("resized{size}"),
            &resized,
            &shape,
            &want,
        ));
        let from_reference = resize_bicubic(&reference, size, size);
        result.failures.extend(compare_u8(
            &format!("resized{size} (from reference pixels)"),
            &from_reference,
            &shape,
            &want,
        ));
        for (name, norm) in [
            (format!("{case}/test{size}"), Normalization::TEST),
            (format!("{case}/train_noaug{size}"), Normalization::OPENAI),
        ] {
            let Some(want) = tensor_f32(st, &name) else {
                continue;
            };
            let got = to_chw(&resized, &norm);
            if got.len() != want.len() {
                result.failures.push(format!(
                    "{name}: {} values, expected {}",
                    got.len(),
                    want.len()
                ));
                continue;
            }
            let max = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            result.max_norm_diff = result.max_norm_diff.max(max);
            if max > 1e-6 {
                result
                    .failures
                    .push(format!("{name}: max abs diff {max:e}"));
            }
        }
    }
    result
}

/// Checks every case of `preprocess.safetensors`-style file against the images in `images`.
fn check_all(tensors: &Path, images: &Path) -> usize {
    let bytes = std::fs::read(tensors).expect("reading fixture tensors");
    let st = SafeTensors::deserialize(&bytes).expect("parsing fixture tensors");
    let mut cases: Vec<String> = st
        .names()
        .iter()
        .filter_map(|name| name.strip_suffix("/decoded_rgb_u8"))
        .map(str::to_string)
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no cases in {}", tensors.display());
    let results: Vec<CaseResult> = cases
        .iter()
        .map(|case| check_case(&st, images, case))
        .collect();
    let failures: Vec<String> = results
        .iter()
        .flat_map(|r| r.failures.iter().map(move |f| format!("{}: {f}", r.case)))
        .collect();
    let max_norm = results
        .iter()
        .map(|r| r.max_norm_diff)
        .fold(0.0f32, f32::max);
    assert!(
        failures.is_empty(),
        "preprocessing differs from the reference:\n{}",
        failures.join("\n")
    );
    assert_eq!(max_norm, 0.0, "normalised tensors should be bit-exact");
    cases.len()
}

#[test]
fn synthetic_images_match_reference() {
    let dir = fixtures();
    let checked = check_all(
        &dir.join("preprocess_synth.safetensors"),
        &dir.join("images"),
    );
    assert_eq!(checked, 5);
}

#[test]
fn all_shared_images_match_reference() {
    let Some(dir) = shared_fixtures() else {
        eprintln!(
            "skipped: ../shared/fixtures not found (set CLIP4STR_SHARED to the shared folder)"
        );
        return;
    };
    let checked = check_all(&dir.join("preprocess.safetensors"), &dir.join("images"));
    assert_eq!(checked, 12);
}

#[test]
fn jpeg_variants_match_pillow() {
    let dir = fixtures();
    let bytes = std::fs::read(dir.join("jpeg_variants.safetensors")).expect("reading tensors");
    let st = SafeTensors::deserialize(&bytes).expect("parsing tensors");
    let (_, metadata) = SafeTensors::read_metadata(&bytes).expect("parsing metadata");
    let pillow_errors: Vec<String> = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("pillow_errors"))
        .map(|list| list.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("jpeg_variants"))
        .expect("listing JPEG variants")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "JPEG variants missing");
    let mut failures = Vec::new();
    for path in &files {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("file name");
        let result = decode_rgb(&std::fs::read(path).expect("reading JPEG"));
        if pillow_errors.iter().any(|e| e == name) {
            if result.is_ok() {
                failures.push(format!("{name}: decoded, but Pillow refuses it"));
            }
            continue;
        }
        if name == "arithmetic" {
            // Known gap: Pillow decodes arithmetic-coded JPEGs, this crate reports them.
            if !matches!(result, Err(ImageError::Unsupported { .. })) {
                failures.push(format!("{name}: expected Unsupported, got {result:?}"));
            }
            continue;
        }
        let (shape, want) = tensor_u8(&st, &format!("{name}/decoded_rgb_u8"));
        match result {
            Ok(img) => failures.extend(compare_u8(name, &img, &shape, &want)),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "JPEG decoding differs from Pillow:\n{}",
        failures.join("\n")
    );
}
