//! End-to-end test of `clip4str bench` on random tiny weights: the report is complete and consistent.
//! (Speed itself is measured by running the command, not asserted here.)

mod common;

use common::clip4str;

#[test]
fn json_report_has_every_stage() {
    let out = clip4str(&[
        "bench",
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--steps",
        "7",
        "--format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc["batch_size"], 2);
    assert_eq!(doc["steps"], "7");
    assert_eq!(doc["runs"], 2);
    let stages = doc["stages"].as_object().expect("stages");
    let mut sum = 0.0;
    for name in [
        "preprocess",
        "encoder",
        "visual_decode",
        "text_encoder",
        "cross_decode",
        "refine",
        "postprocess",
    ] {
        let s = &stages[name];
        let (med, min) = (
            s["median_ms"].as_f64().unwrap(),
            s["min_ms"].as_f64().unwrap(),
        );
        assert!(min > 0.0 && min <= med, "{name}: min {min} median {med}");
        sum += min;
    }
    let total = &stages["total"];
    assert!(total["median_ms"].as_f64().unwrap() >= sum * 0.5);
    let ips = doc["images_per_second"].as_f64().unwrap();
    let expected = 2.0 / (total["median_ms"].as_f64().unwrap() / 1e3);
    assert!(
        (ips - expected).abs() < 1e-6 * expected,
        "{ips} vs {expected}"
    );
}

#[test]
fn bad_arguments_are_refused() {
    for (args, needle) in [
        (vec!["bench", "--preset", "nope"], "unknown preset"),
        (
            vec!["bench", "--preset", "tiny", "--batch-size", "0"],
            "--batch-size",
        ),
        (vec!["bench", "--preset", "tiny", "--runs", "0"], "--runs"),
        (
            vec!["bench", "--checkpoint", "/nonexistent/x.ckpt"],
            "x.ckpt",
        ),
        (
            vec!["bench", "--train", "--preset", "nope"],
            "unknown preset",
        ),
        (
            vec![
                "bench",
                "--train",
                "--preset",
                "tiny",
                "--label-length",
                "9-3",
            ],
            "--label-length",
        ),
        (vec!["bench", "--train", "--label-length", "x"], "MIN-MAX"),
        (
            vec!["bench", "--train", "--checkpoint", "a.ckpt"],
            "cannot be used with",
        ),
    ] {
        let out = clip4str(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// `bench --train` times the phases of a real training step (forward, backward, clipping, AdamW) and names the
/// CPU and its SIMD level, so that it can be set beside the reference's step on the same machine.
#[test]
fn train_step_report_has_every_phase() {
    let out = clip4str(&[
        "--threads",
        "1",
        "bench",
        "--train",
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--perm-num",
        "2",
        "--label-length",
        "3-5",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--encoder-share",
        "--format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let phase = |name: &str| doc["phases"][name]["median_ms"].as_f64().unwrap_or(-1.0);
    for name in ["data", "forward", "backward", "clip", "optimizer"] {
        assert!(phase(name) >= 0.0, "{name}: {doc}");
        assert!(phase(name) <= phase("total"), "{name}: {doc}");
    }
    assert!(phase("forward") > 0.0 && phase("backward") > 0.0, "{doc}");
    let ips = doc["images_per_second"].as_f64().unwrap();
    assert!(
        (ips - 2.0 / (phase("total") / 1e3)).abs() < 1e-6 * ips.max(1.0),
        "{doc}"
    );
    assert!(doc["trainable"].as_u64().unwrap() < doc["parameters"].as_u64().unwrap());
    assert!(!doc["cpu"].as_str().unwrap().is_empty());
    assert!(!doc["simd"].as_str().unwrap().is_empty());
    assert_eq!(doc["label_lengths"], serde_json::json!([3, 5]));
    assert!(doc["peak_rss_mib"].as_f64().is_some_and(|m| m > 0.0));
    // The encoder alone, forward and backward (a part of the step's, timed apart).
    for (part, of) in [
        ("encoder forward", "forward"),
        ("encoder backward", "backward"),
    ] {
        let t = doc["encoder_alone"][part]["median_ms"]
            .as_f64()
            .unwrap_or(-1.0);
        assert!(t > 0.0, "{part}: {doc}");
        assert!(t < 10.0 * phase(of), "{part} {t} vs {of} {}", phase(of));
    }
}

/// `CLIP4STR_NO_AVX512=1` makes an AVX-512 CPU run (and report) the AVX2 paths, so one machine can measure
/// what a CPU without AVX-512 gets.
#[test]
fn avx512_can_be_turned_off_and_the_report_says_so() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clip4str"))
        .env("CLIP4STR_NO_AVX512", "1")
        .args(["--threads", "1", "bench", "--train", "--preset", "tiny"])
        .args(["--batch-size", "2", "--perm-num", "2", "--runs", "1"])
        .args(["--warmup", "0", "--format", "json"])
        .output()
        .expect("run clip4str");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let simd = doc["simd"].as_str().unwrap();
    assert!(!simd.starts_with("AVX-512"), "{simd}");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        assert_eq!(simd, "AVX2 (AVX-512 turned off by CLIP4STR_NO_AVX512=1)");
    }
}
