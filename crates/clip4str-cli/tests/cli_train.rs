//! End-to-end test of `clip4str train` on an LMDB written here: what it says before and as it starts.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clip4str::data::LmdbWriter;
use common::{clip4str, fixtures, stderr, temp_dir};

/// An LMDB of the committed synthetic crops under made-up words.
fn write_lmdb(db: &Path, count: usize) {
    std::fs::create_dir_all(db).unwrap();
    let mut images: Vec<PathBuf> = std::fs::read_dir(fixtures().join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("synth_"))
        })
        .collect();
    images.sort();
    let mut writer = LmdbWriter::create(db).unwrap();
    for (i, image) in images.iter().cycle().take(count).enumerate() {
        writer
            .push(&std::fs::read(image).unwrap(), &format!("word{i}"))
            .unwrap();
    }
    writer.finish().unwrap();
}

/// Within seconds, before any step, `train` says what it is doing and what it trains (model size, trainable
/// parameters); it used to say nothing about the model until the first log line.
#[test]
fn first_lines_name_the_data_and_the_model() {
    let dir = temp_dir("train");
    let db = dir.join("data");
    write_lmdb(&db, 4);
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

/// The line after the model's says what the linear layers multiply in: bf16 on a CPU with AVX512-BF16 unless
/// f32 is asked for; f32 elsewhere, with a note when bf16 was asked for. `CLIP4STR_NO_AVX512_BF16=1` plays
/// a CPU without the instructions, so every case runs on every machine.
#[test]
fn the_precision_line_names_what_the_run_multiplies_in() {
    let dir = temp_dir("precision");
    let db = dir.join("data");
    write_lmdb(&db, 4);
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "{SMALL_MODEL}[data]\ntrain = [{:?}]\naugment = false\nworkers = 1\n[optim]\nbatch_size = 2\n\
             max_steps = 1\n[run]\noutput_dir = {:?}\nlog_interval = 1\n",
            db.display().to_string(),
            dir.join("run").display().to_string()
        ),
    )
    .unwrap();
    let native = clip4str::nn::bf16_native_supported();
    let line = |precision: &str, no_bf16: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clip4str"));
        cmd.args([
            "--threads",
            "1",
            "train",
            "--config",
            config.to_str().unwrap(),
        ]);
        cmd.args(["--precision", precision]);
        if no_bf16 {
            cmd.env("CLIP4STR_NO_AVX512_BF16", "1");
        }
        let out = cmd.output().unwrap();
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        std::fs::remove_dir_all(dir.join("run")).unwrap();
        err.lines().nth(3).unwrap_or_default().to_owned()
    };
    let bf16 = "precision: bf16 products, f32 weights and accumulation (this CPU has AVX512-BF16)";
    let f32_auto = "precision: f32 (bf16 needs a CPU with AVX512-BF16)";
    assert_eq!(line("auto", false), if native { bf16 } else { f32_auto });
    assert_eq!(line("bf16", false).starts_with("note: "), !native);
    assert_eq!(line("f32", false), "precision: f32");
    assert_eq!(line("auto", true), f32_auto);
    let note = line("bf16", true);
    assert!(
        note.starts_with("note: no AVX512-BF16") && note.ends_with("training in f32"),
        "{note}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A model small enough for a step to take a fraction of a second in a debug build, trained from scratch.
const SMALL_MODEL: &str = "[model]\npreset = \"small\"\nimage_size = [16, 32]\npatch_size = [8, 8]\n\
    vision_width = 64\nvision_layers = 1\nvision_heads = 1\ntext_width = 64\ntext_layers = 1\ntext_heads = 1\n\
    embed_dim = 32\ndecoder_heads = 2\ndropout = 0.1\n[init]\nsource = \"scratch\"\n";

/// The metrics lines of a run: (step, loss, grad-norm, lr) with the exact floats written.
fn losses(run: &Path) -> Vec<(u64, f64, f64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let m: serde_json::Value = serde_json::from_str(l).unwrap();
            let f = |k: &str| m[k].as_f64().unwrap();
            (
                m["step"].as_u64().unwrap(),
                f("loss"),
                f("grad_norm"),
                f("lr"),
            )
        })
        .collect()
}

/// `kill -9` part-way, then `--resume`: the resumed run logs exactly the losses of an uninterrupted one, with
/// augmentation and dropout on (their randomness is keyed by seed and step, the logging window is saved), and
/// the kill loses at most `save_interval` steps. A resumed run used to drift (dropout masks came from a thread
/// RNG) and only validations saved.
#[test]
fn kill_9_and_resume_give_the_uninterrupted_losses() {
    let dir = temp_dir("resume");
    let db = dir.join("data");
    write_lmdb(&db, 12);
    let config = |name: &str| {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "{SMALL_MODEL}[data]\ntrain = [{:?}]\naugment = true\nworkers = 1\n[optim]\nbatch_size = 4\nmax_steps = 40\n\
                 [run]\noutput_dir = {:?}\nlog_interval = 3\nval_interval = 1000\nsave_interval = 4\nkeep_last = 2\n",
                db.display().to_string(),
                dir.join(name).display().to_string()
            ),
        )
        .unwrap();
        path
    };
    let train = |args: &[&str]| {
        let mut all = vec!["--threads", "1", "train"];
        all.extend_from_slice(args);
        let out = clip4str(&all);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let whole = config("whole");
    train(&["--config", whole.to_str().unwrap()]);
    let want = losses(&dir.join("whole"));
    assert_eq!(want.len(), 40 / 3 + 1);

    // The same run, killed once it has logged step 9 (saved at 8), then resumed.
    let cut = config("cut");
    let run = dir.join("cut");
    let mut child = Command::new(env!("CARGO_BIN_EXE_clip4str"))
        .args(["--threads", "1", "train", "--config", cut.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl"))
        .map_or(true, |t| !t.lines().any(|l| l.starts_with("{\"step\":9,")))
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        assert!(started.elapsed() < Duration::from_secs(300), "no step 9");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("last.json")).unwrap()).unwrap();
    let at = saved["step"].as_u64().unwrap();
    // Saved by the 4-step interval, at step 8 or (a late kill) after it.
    assert!(at >= 8 && at.is_multiple_of(4), "last saved at {at}");
    assert!(run.join(format!("step-{at:08}.safetensors")).is_file());
    train(&["--resume", run.to_str().unwrap()]);
    assert_eq!(losses(&run), want);
    // Only the newest `keep_last` snapshots stay, each with its optimizer state.
    let mut snapshots: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-") || n.starts_with("state-"))
        .collect();
    snapshots.sort();
    assert_eq!(
        snapshots,
        [
            "state-00000032.safetensors",
            "state-00000036.safetensors",
            "state-00000040.safetensors",
            "step-00000032.safetensors",
            "step-00000036.safetensors",
        ]
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `loss.png` shows the training loss and the validation loss on a log axis, the validation accuracy and the
/// learning rate; `metrics.jsonl` has the validation loss it plots. The plot used to hold the training loss
/// alone, on a linear axis.
#[test]
fn the_plot_shows_both_losses_accuracy_and_learning_rate() {
    let dir = temp_dir("plot");
    let db = dir.join("data");
    write_lmdb(&db, 8);
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "{SMALL_MODEL}[data]\ntrain = [{db:?}]\n\
             val = [{db:?}]\naugment = false\nworkers = 1\n[optim]\nbatch_size = 4\nlr = 1e-2\nmax_steps = 12\n\
             [run]\noutput_dir = {:?}\nlog_interval = 1\nval_interval = 3\n",
            dir.join("run").display().to_string(),
            db = db.display().to_string(),
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
    assert!(out.status.success(), "{}", stderr(&out));
    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    let validated: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m.get("val_accuracy").is_some())
        .collect();
    assert_eq!(validated.len(), 4, "{metrics}");
    for m in &validated {
        let loss = m["val_loss"].as_f64().unwrap_or(f64::NAN);
        assert!(loss.is_finite() && loss > 0.0, "{m}");
    }
    let plot = image::open(dir.join("run/loss.png")).unwrap().to_rgb8();
    assert_eq!(plot.dimensions(), (900, 820));
    // Each curve has its colour (anti-aliased, so counted by dominant channel): training loss blue,
    // validation loss red, accuracy green; more pixels than the legend's short strokes.
    let count = |channel: usize| {
        plot.pixels()
            .filter(|p| {
                (0..3).all(|c| c == channel || i32::from(p.0[channel]) > i32::from(p.0[c]) + 60)
            })
            .count()
    };
    for (name, channel) in [
        ("training loss", 2),
        ("validation loss", 0),
        ("validation accuracy", 1),
    ] {
        assert!(count(channel) > 100, "no {name} curve in loss.png");
    }
    // The learning-rate panel (the bottom 200 rows) has a curve, not only its axes: black pixels in the
    // plotting area's middle columns.
    let dark = (650..810)
        .flat_map(|y| (200..800).map(move |x| (x, y)))
        .filter(|&(x, y)| plot.get_pixel(x, y).0 == [0, 0, 0])
        .count();
    assert!(dark > 100, "no learning-rate curve");
    std::fs::remove_dir_all(&dir).ok();
}
