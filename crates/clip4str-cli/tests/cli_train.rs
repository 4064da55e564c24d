//! End-to-end test of `clip4str train` on an LMDB written here: what it says before and as it starts.

mod common;

use clip4str::data::LmdbWriter;
use common::{clip4str, fixtures, stderr, temp_dir};

/// Within seconds, before any step, `train` says what it is doing and what it trains (model size, trainable
/// parameters); it used to say nothing about the model until the first log line.
#[test]
fn first_lines_name_the_data_and_the_model() {
    let dir = temp_dir("train");
    let db = dir.join("data");
    std::fs::create_dir_all(&db).unwrap();
    let mut images: Vec<_> = std::fs::read_dir(fixtures().join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("synth_"))
        })
        .collect();
    images.sort();
    let mut writer = LmdbWriter::create(&db).unwrap();
    for (i, image) in images.iter().take(4).enumerate() {
        writer
            .push(&std::fs::read(image).unwrap(), &format!("word{i}"))
            .unwrap();
    }
    writer.finish().unwrap();
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npreset = \"tiny\"\n[init]\nsource = \"scratch\"\n[data]\ntrain = [{:?}]\naugment = false\n\
             workers = 1\n[optim]\nbatch_size = 2\nmax_steps = 2\n[run]\noutput_dir = {:?}\nlog_interval = 1\n",
            db.display().to_string(),
            dir.join("run").display().to_string()
        ),
    )
    .unwrap();
    let out = clip4str(&[
        "--threads",
        "1",
        "train",
        "--config",
        config.to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines[0].starts_with("starting: opening the datasets and building the model on cpu"),
        "{err}"
    );
    assert!(
        lines[1].starts_with("training 4 samples, step 0/2"),
        "{err}"
    );
    assert!(
        lines[2].starts_with("model: ") && lines[2].contains(" M trainable; input 64x64"),
        "{err}"
    );
    assert!(dir.join("run/last.safetensors").is_file());
    std::fs::remove_dir_all(&dir).ok();
}
