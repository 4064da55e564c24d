//! A reading-only build (`default-features = false`) links none of the trainer's or the synthetic renderer's
//! crates. CI also compiles that configuration (`.ci/run`); this test reads the dependency graph cargo resolves
//! for it.

use std::process::Command;

/// The crates only the `train` feature brings in.
const TRAINING_CRATES: [&str; 7] = [
    "rand",
    "rand_chacha",
    "rand_distr",
    "toml",
    "ab_glyph",
    "ab_glyph_rasterizer",
    "ttf-parser",
];

/// Of those, the ones nothing else in the graph uses (candle-core itself depends on `rand`, `rand_chacha` and
/// `rand_distr`, so those stay in the tree, just not as our dependencies).
const ABSENT_FROM_WHOLE_TREE: [&str; 5] = [
    "toml",
    "ab_glyph",
    "ab_glyph_rasterizer",
    "ttf-parser",
    "owned_ttf_parser",
];

/// `cargo tree` over the normal dependencies of this crate, one crate name per line.
fn tree(extra: &[&str]) -> Option<Vec<String>> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            "clip4str",
        ])
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect(),
    )
}

#[test]
fn reading_only_build_has_no_training_crates() {
    let Some(direct) = tree(&["--no-default-features", "--depth", "1"]) else {
        panic!("cargo tree could not resolve the reading-only build");
    };
    let Some(whole) = tree(&["--no-default-features"]) else {
        panic!("cargo tree could not resolve the reading-only build");
    };
    let Some(default) = tree(&["--depth", "1"]) else {
        panic!("cargo tree could not resolve the default build");
    };
    for name in TRAINING_CRATES {
        assert!(
            !direct.iter().any(|d| d == name),
            "the reading-only build depends on {name}"
        );
        // The check can fail: the default build does list every one of them.
        assert!(
            default.iter().any(|d| d == name),
            "the default build no longer depends on {name}; update this list"
        );
    }
    for name in ABSENT_FROM_WHOLE_TREE {
        assert!(
            !whole.iter().any(|d| d == name),
            "the reading-only build pulls in {name} through another crate"
        );
    }
}
