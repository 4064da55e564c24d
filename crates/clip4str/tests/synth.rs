//! The synthetic word-image generator: determinism, labels, sizes, font handling. Every test runs on the
//! committed fixture font (tests/fixtures/fonts); the held-out split test also uses the system fonts when
//! there are any.
#![cfg(feature = "train")]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use clip4str::charset::CHARSET_94;
use clip4str::data::synth::{
    default_font_dirs, discover_fonts, family_split, font_family, load_words, FontSplit,
    OutputFormat, SkipReason, SynthConfig, SynthError, Synthesizer,
};
use clip4str::preprocess::decode_rgb;
use common::temp_dir;
use rayon::prelude::*;

fn fixture_fonts() -> PathBuf {
    common::fixture("fonts")
}

fn fixture_config(seed: u64) -> SynthConfig {
    SynthConfig {
        seed,
        fonts: discover_fonts(&[fixture_fonts()]),
        ..SynthConfig::default()
    }
}

#[test]
fn fixture_font_is_found_and_used() {
    let fonts = discover_fonts(&[fixture_fonts()]);
    assert_eq!(fonts.len(), 1, "{fonts:?}");
    assert!(fonts[0].ends_with("Caladea-Regular.ttf"));
    let synth = Synthesizer::new(fixture_config(0)).expect("synthesizer");
    assert_eq!(synth.font_report().loaded, fonts);
    assert_eq!(synth.font_report().families, ["caladea"]);
    assert!(synth.num_words() > 100, "built-in words");
}

#[test]
fn samples_are_a_function_of_seed_and_index() {
    let first = Synthesizer::new(fixture_config(7)).expect("synthesizer");
    let second = Synthesizer::new(fixture_config(7)).expect("synthesizer");
    let other_seed = Synthesizer::new(fixture_config(8)).expect("synthesizer");
    let indices: Vec<u64> = (0..40).chain([1_000_000, u64::MAX]).collect();
    let sequential: Vec<_> = indices
        .iter()
        .map(|&i| first.render(i).expect("render"))
        .collect();
    // Any order, any thread: the same samples.
    let parallel: Vec<_> = indices
        .par_iter()
        .rev()
        .map(|&i| second.render(i).expect("render"))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert_eq!(sequential, parallel);
    let labels: HashSet<&str> = sequential.iter().map(|(l, _)| l.as_str()).collect();
    assert!(labels.len() > 30, "labels repeat: {labels:?}");
    let differing = indices
        .iter()
        .zip(&sequential)
        .filter(|(&i, sample)| other_seed.render(i).expect("render") != **sample)
        .count();
    assert_eq!(differing, indices.len());
}

#[test]
fn labels_and_natural_sizes_are_in_range() {
    let synth = Synthesizer::new(fixture_config(1)).expect("synthesizer");
    let mut lengths = HashSet::new();
    for index in 0..300 {
        let (label, image) = synth.render(index).expect("render");
        assert!((1..=25).contains(&label.len()), "{index}: {label:?}");
        assert!(
            label.chars().all(|c| CHARSET_94.contains(c)),
            "{index}: {label:?}"
        );
        // Crops are 32-64 px high; width follows the text (a 2000 px cap for absurdly wide strings).
        assert!(
            (32..=64).contains(&image.height()),
            "{index}: {}",
            image.height()
        );
        assert!(
            (4..=2000).contains(&image.width()),
            "{index}: {}",
            image.width()
        );
        lengths.insert(label.len());
    }
    assert!(lengths.len() > 10, "label lengths vary: {lengths:?}");
}

#[test]
fn fixed_size_and_encodings() {
    let synth = Synthesizer::new(SynthConfig {
        size: Some([32, 128]),
        height: [40, 48],
        max_label_length: 8,
        ..fixture_config(2)
    })
    .expect("synthesizer");
    for index in 0..20 {
        let (label, image) = synth.render(index).expect("render");
        assert!(label.len() <= 8, "{label:?}");
        assert_eq!(image.dimensions(), (128, 32));
        let (png_label, png) = synth.render_encoded(index, OutputFormat::Png).expect("png");
        assert_eq!(png_label, label);
        assert!(png.starts_with(b"\x89PNG"));
        assert_eq!(decode_rgb(&png).expect("decode png"), image);
        let (_, jpeg) = synth
            .render_encoded(index, OutputFormat::Jpeg)
            .expect("jpeg");
        assert!(jpeg.starts_with(&[0xFF, 0xD8, 0xFF]));
        assert_eq!(
            decode_rgb(&jpeg).expect("decode jpeg").dimensions(),
            (128, 32)
        );
        assert_eq!(
            synth
                .render_encoded(index, OutputFormat::Jpeg)
                .expect("jpeg"),
            (label, jpeg)
        );
    }
}

#[test]
fn unusable_fonts_are_skipped_not_fatal() {
    let dir = temp_dir("badfonts");
    std::fs::write(dir.join("garbage.ttf"), b"this is not a font").expect("write");
    std::fs::write(dir.join("empty.otf"), b"").expect("write");
    std::fs::write(dir.join("notes.txt"), b"ignored").expect("write");
    std::fs::copy(
        fixture_fonts().join("Caladea-Regular.ttf"),
        dir.join("Copy.TTF"),
    )
    .expect("copy");
    let mut fonts = discover_fonts(&[dir.clone(), fixture_fonts()]);
    assert_eq!(fonts.len(), 4, "{fonts:?}");
    fonts.push(dir.join("missing.ttf"));
    let synth = Synthesizer::new(SynthConfig {
        fonts,
        ..fixture_config(0)
    })
    .expect("one good font is enough");
    let report = synth.font_report();
    assert_eq!(report.loaded.len(), 1);
    let reason_of = |name: &str| {
        report
            .skipped
            .iter()
            .find(|s| s.path.file_name().and_then(|n| n.to_str()) == Some(name))
            .map(|s| s.reason.clone())
    };
    assert_eq!(report.skipped.len(), 4, "{:?}", report.skipped);
    assert_eq!(reason_of("garbage.ttf"), Some(SkipReason::NotAFont));
    assert_eq!(reason_of("empty.otf"), Some(SkipReason::NotAFont));
    assert!(matches!(
        reason_of("missing.ttf"),
        Some(SkipReason::Unreadable(_))
    ));
    // The fixture and its copy have the same bytes: whichever comes second is the duplicate.
    let duplicates = report
        .skipped
        .iter()
        .filter(|s| matches!(s.reason, SkipReason::Duplicate(_)))
        .count();
    assert_eq!(duplicates, 1);
    synth.render(0).expect("render");

    // Nothing usable at all is an error value, as are bad settings.
    let only_bad = vec![dir.join("garbage.ttf"), dir.join("missing.ttf")];
    assert!(matches!(
        Synthesizer::new(SynthConfig {
            fonts: only_bad,
            ..fixture_config(0)
        }),
        Err(SynthError::NoFonts {
            candidates: 2,
            skipped: 2,
            other_split: 0
        })
    ));
    for bad in [
        SynthConfig {
            height: [64, 32],
            ..fixture_config(0)
        },
        SynthConfig {
            size: Some([0, 128]),
            ..fixture_config(0)
        },
        SynthConfig {
            max_label_length: 0,
            ..fixture_config(0)
        },
    ] {
        assert!(matches!(
            Synthesizer::new(bad),
            Err(SynthError::InvalidConfig(_))
        ));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn heldout_split_is_disjoint() {
    // The fixture's family is held out, so the training side has nothing.
    let fixture = fixture_config(0);
    assert_eq!(family_split("caladea"), FontSplit::Heldout);
    assert!(Synthesizer::new(SynthConfig {
        font_split: FontSplit::Heldout,
        ..fixture.clone()
    })
    .is_ok());
    assert!(matches!(
        Synthesizer::new(SynthConfig {
            font_split: FontSplit::Train,
            ..fixture
        }),
        Err(SynthError::NoFonts { other_split: 1, .. })
    ));

    let system = discover_fonts(&default_font_dirs());
    if system.is_empty() {
        eprintln!(
            "skipping the system-font part: no fonts under {:?} (scripts/install-fonts.sh)",
            default_font_dirs()
        );
        return;
    }
    let load = |font_split| {
        Synthesizer::new(SynthConfig {
            fonts: system.clone(),
            font_split,
            ..SynthConfig::default()
        })
        .ok()
        .map(|s| s.font_report().clone())
    };
    let Some(all) = load(FontSplit::All) else {
        eprintln!("skipping the system-font part: no usable system font");
        return;
    };
    let train = load(FontSplit::Train).unwrap_or_default();
    let heldout = load(FontSplit::Heldout).unwrap_or_default();
    let family_of = |p: &Path| font_family(&std::fs::read(p).expect("read font"), p);
    let train_families: HashSet<String> = train.loaded.iter().map(|p| family_of(p)).collect();
    for path in &heldout.loaded {
        assert!(
            !train_families.contains(&family_of(path)),
            "{} is in both splits",
            path.display()
        );
    }
    let mut union: Vec<&PathBuf> = train.loaded.iter().chain(&heldout.loaded).collect();
    union.sort();
    let mut everything: Vec<&PathBuf> = all.loaded.iter().collect();
    everything.sort();
    // Duplicates may resolve to different copies per split, so compare counts, not paths.
    assert_eq!(union.len(), everything.len());
    eprintln!(
        "system fonts: {} families train, {} held out ({:?})",
        train.families.len(),
        heldout.families.len(),
        heldout.families
    );
}

#[test]
fn word_lists_are_folded_and_filtered() {
    let dir = temp_dir("words");
    let path = dir.join("words.txt");
    std::fs::write(
        &path,
        "café\nAaron's\nstraße\nhello\nhello\n  two words \nabcdefghijklmnopqrstuvwxyz\n\u{4e2d}\n",
    )
    .expect("write");
    let words = load_words(&path, 25).expect("load");
    assert_eq!(words, ["cafe", "hello", "two", "words"]);
    assert!(matches!(
        load_words(&dir.join("missing.txt"), 25),
        Err(SynthError::Io { .. })
    ));
    let synth = Synthesizer::new(SynthConfig {
        words: vec!["zyzzyva".into(), "straße".into()],
        ..fixture_config(4)
    })
    .expect("synthesizer");
    assert_eq!(synth.num_words(), 1);
    let labels: Vec<String> = (0..200)
        .map(|i| synth.render(i).expect("render").0)
        .collect();
    assert!(
        labels.iter().any(|l| l.to_lowercase().contains("zyzzyva")),
        "{labels:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A spec file next to the fixture font, with `extra` lines appended.
fn write_spec(name: &str, extra: &str) -> PathBuf {
    let dir = temp_dir(name);
    let spec = dir.join("synth.toml");
    let fonts = fixture_fonts().canonicalize().expect("fixture fonts");
    std::fs::write(
        &spec,
        format!(
            "count = 40\nseed = 7\nfonts = [{:?}]\n{extra}",
            fonts.display().to_string()
        ),
    )
    .expect("write spec");
    spec
}

#[test]
fn a_spec_file_is_a_dataset_rendered_on_the_fly() {
    use clip4str::data::open_dataset;
    let spec = write_spec(
        "spec-ok",
        "format = \"png\"\nsize = [32, 128]\nmax_length = 8\n",
    );
    let ds = open_dataset(&spec).expect("spec opens as a dataset");
    assert_eq!(ds.len(), 40);
    // Record i is `clip4str synth`'s image i with the same settings (and the same default word list).
    let words = clip4str::data::synth::default_word_files()
        .pop()
        .map(|file| load_words(&file, 8).expect("word list"))
        .unwrap_or_default();
    let synth = Synthesizer::new(SynthConfig {
        size: Some([32, 128]),
        words,
        max_label_length: 8,
        ..fixture_config(7)
    })
    .expect("synthesizer");
    let labels = ds.labels().expect("labels");
    for (i, label) in labels.iter().enumerate() {
        let (want_label, want_bytes) = synth
            .render_encoded(i as u64, OutputFormat::Png)
            .expect("render");
        assert_eq!(label.as_ref().expect("label"), &want_label, "record {i}");
        assert_eq!(ds.label(i).expect("label"), want_label, "record {i}");
        if i < 5 {
            let bytes = ds.image(i).expect("image");
            assert_eq!(bytes, want_bytes, "record {i}");
            let img = decode_rgb(&bytes).expect("decodes");
            assert_eq!(img.dimensions(), (128, 32));
        }
    }
    let err = ds.image(40).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");
}

#[test]
fn bad_specs_name_the_file_and_the_problem() {
    use clip4str::data::open_dataset;
    let cases = [
        (
            "spec-split",
            "font_split = \"test\"\n",
            "unknown variant `test`, expected one of `all`, `train`, `heldout`",
        ),
        (
            "spec-format",
            "format = \"gif\"\n",
            "unknown variant `gif`, expected `png` or `jpeg`",
        ),
        ("spec-length", "max_length = 40\n", "max_length 40"),
        ("spec-field", "colour = 3\n", "colour"),
    ];
    for (name, extra, want) in cases {
        let spec = write_spec(name, extra);
        let err = open_dataset(&spec).err().expect("refused").to_string();
        assert!(
            err.contains("synth.toml") && err.contains(want),
            "{name}: {err}"
        );
    }
    let dir = temp_dir("spec-nofonts");
    let spec = dir.join("synth.toml");
    std::fs::write(&spec, "count = 3\nfonts = [\"missing\"]\n").expect("write spec");
    let err = open_dataset(&spec).err().expect("refused").to_string();
    assert!(err.contains("no .ttf/.otf fonts"), "{err}");
    std::fs::write(&spec, "count = 0\nfonts = [\"missing\"]\n").expect("write spec");
    let err = open_dataset(&spec).err().expect("refused").to_string();
    assert!(err.contains("count must be at least 1"), "{err}");
}

#[test]
fn long_share_spreads_labels_over_the_long_lengths_and_zero_changes_nothing() {
    let labels = |share: f32| {
        let synth = Synthesizer::new(SynthConfig {
            long_share: share,
            ..fixture_config(7)
        })
        .expect("synthesizer");
        (0..2000).map(|i| synth.label(i)).collect::<Vec<_>>()
    };
    // Labels of seed 7 as generated before the option existed: a spec without it keeps its samples.
    let plain = labels(0.0);
    assert_eq!(
        plain[..6],
        [
            "west",
            "0YPGJO2FLMIQ",
            "jlgm",
            "laundry;",
            "No.601",
            "-GAMES-"
        ],
        "{:?}",
        &plain[..6]
    );
    let share = |labels: &[String], min: usize| {
        labels.iter().filter(|l| l.len() >= min).count() as f64 / labels.len() as f64
    };
    let long = labels(0.3);
    assert!(long.iter().all(|l| (1..=25).contains(&l.len())));
    assert!(long
        .iter()
        .all(|l| l.chars().all(|c| CHARSET_94.contains(c))));
    let (plain_12, long_12) = (share(&plain, 12), share(&long, 12));
    assert!(
        (long_12 - (0.3 + 0.7 * plain_12)).abs() < 0.04,
        "12+ characters: {long_12} with the option, {plain_12} without"
    );
    // Lengths spread evenly over 12-25: about half of the long draws have 19 or more characters.
    let long_19 = share(&long, 19) - share(&plain, 19) * 0.7;
    assert!((0.11..0.19).contains(&long_19), "19+ characters: {long_19}");
    assert!(
        share(&plain, 19) < 0.03,
        "19+ without the option: {}",
        share(&plain, 19)
    );

    let bad = |share: f32, max: usize| {
        Synthesizer::new(SynthConfig {
            long_share: share,
            max_label_length: max,
            ..fixture_config(7)
        })
        .expect_err("invalid")
        .to_string()
    };
    assert!(bad(1.5, 25).contains("long_share 1.5 is not from 0 to 1"));
    assert!(bad(0.2, 8).contains("max_label_length is 8"));
}
