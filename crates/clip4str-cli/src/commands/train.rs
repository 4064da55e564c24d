//! `clip4str train`: PSM training / fine-tuning with progress bar, Ctrl-C checkpointing and a loss plot.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use clip4str::nn::Precision;
use clip4str::train::{StepMetrics, TrainConfig, TrainObserver, TrainPrecision, Trainer};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::device::DeviceArg;

/// Arguments of `clip4str train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training configuration (TOML: [model], [init], [data], [optim], [run]).
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    pub config: Option<PathBuf>,
    /// Continue the run in this output directory from its last checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Override run.output_dir.
    #[arg(long, conflicts_with = "resume")]
    pub output_dir: Option<PathBuf>,
    /// Override optim.max_steps; with --resume, re-plans the learning-rate schedule of the run (saved to its
    /// config.toml).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Stop (and save) once this many steps are done, leaving the schedule as planned.
    #[arg(long, value_name = "STEP")]
    pub stop_at: Option<usize>,
    /// Override optim.batch_size.
    #[arg(long, conflicts_with = "resume")]
    pub batch_size: Option<usize>,
    /// Override optim.lr (before the linear scaling rule).
    #[arg(long, conflicts_with = "resume")]
    pub lr: Option<f64>,
    /// Override run.val_interval.
    #[arg(long)]
    pub val_interval: Option<usize>,
    /// Override run.seed.
    #[arg(long, conflicts_with = "resume")]
    pub seed: Option<u64>,
    /// Override run.precision: auto (bf16 products where the CPU has AVX512-BF16, else f32), f32, or bf16
    /// (f32 with a note on CPUs without AVX512-BF16).
    #[arg(long, value_enum, conflicts_with = "resume")]
    pub precision: Option<PrecisionArg>,
    /// Where to train: cpu, or cuda / cuda:N (a build with `--features cuda`). Not part of the run: a run
    /// can be resumed on another device.
    #[arg(long, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
}

/// `--precision` values (run.precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    /// bf16 where the CPU has AVX512-BF16, f32 elsewhere.
    Auto,
    /// f32 everywhere.
    F32,
    /// bf16 products, f32 weights and accumulation.
    Bf16,
}

impl From<PrecisionArg> for TrainPrecision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Auto => Self::Auto,
            PrecisionArg::F32 => Self::F32,
            PrecisionArg::Bf16 => Self::Bf16,
        }
    }
}

/// What the run multiplies in, and why, e.g. `precision: bf16 products, f32 weights and accumulation
/// (AVX512-BF16)`; a note when bf16 was asked for and cannot be had.
fn precision_line(trainer: &Trainer) -> String {
    match (trainer.config().run.precision, trainer.precision()) {
        (_, Precision::Bf16) => {
            "precision: bf16 products, f32 weights and accumulation (this CPU has AVX512-BF16)"
                .into()
        }
        (TrainPrecision::Bf16, _) => {
            "note: no AVX512-BF16 here (or not a CPU), where bf16 could only be \
             emulated, slower than f32: training in f32"
                .into()
        }
        (TrainPrecision::Auto, _) => "precision: f32 (bf16 needs a CPU with AVX512-BF16)".into(),
        (TrainPrecision::F32, _) => "precision: f32".into(),
    }
}

/// Progress bar, and `loss.png` re-drawn at every validation.
struct CliObserver {
    bar: ProgressBar,
    plot: PathBuf,
}

impl TrainObserver for CliObserver {
    fn on_step(&mut self, m: &StepMetrics) {
        self.bar.set_position(m.step as u64);
        let val = m
            .val_accuracy
            .map(|a| format!(" val {a:.2}%"))
            .unwrap_or_default();
        self.bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.1} img/s{val}",
            m.loss, m.lr, m.images_per_second
        ));
        if !self.bar.is_hidden() {
            return;
        }
        // Not a terminal: one plain line per logged step.
        eprintln!(
            "step {}/{} epoch {} loss {:.4} lr {:.3e} grad-norm {:.3} {:.1} img/s{val}",
            m.step, m.total_steps, m.epoch, m.loss, m.lr, m.grad_norm, m.images_per_second
        );
    }

    fn on_validation(&mut self, _m: &StepMetrics, history: &[StepMetrics]) {
        if let Err(e) = draw_loss(&self.plot, history) {
            self.bar
                .suspend(|| eprintln!("warning: cannot draw {}: {e:#}", self.plot.display()));
        }
    }
}

/// A system font for plot labels; none found means an unlabelled plot.
fn register_plot_font() -> bool {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DONE.get_or_init(|| {
        let candidates = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        ];
        for c in candidates {
            if let Ok(bytes) = std::fs::read(c) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(
                    "sans-serif",
                    plotters::style::FontStyle::Normal,
                    bytes,
                )
                .is_ok()
                {
                    return true;
                }
            }
        }
        false
    })
}

/// `loss.png`: training loss and validation loss on a log axis (losses span orders of magnitude), validation
/// accuracy, and the learning rate, one panel each over the steps.
fn draw_loss(path: &Path, history: &[StepMetrics]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    if history.is_empty() {
        return Ok(());
    }
    let labelled = register_plot_font();
    let max_step = history.iter().map(|m| m.step).max().unwrap_or(1).max(1) as f64;
    let train: Vec<(f64, f64)> = history
        .iter()
        .filter(|m| m.loss > 0.0 && m.loss.is_finite())
        .map(|m| (m.step as f64, m.loss))
        .collect();
    let val: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|m| Some((m.step as f64, m.val_loss.filter(|l| *l > 0.0)?)))
        .collect();
    let accuracy: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|m| Some((m.step as f64, m.val_accuracy?)))
        .collect();
    let lr: Vec<(f64, f64)> = history.iter().map(|m| (m.step as f64, m.lr)).collect();
    let (lo, hi) = train
        .iter()
        .chain(&val)
        .fold((f64::MAX, f64::MIN), |(lo, hi), &(_, l)| {
            (lo.min(l), hi.max(l))
        });
    let (lo, hi) = if lo <= hi {
        (lo / 1.2, hi * 1.2)
    } else {
        (0.01, 10.0)
    };

    let root = BitMapBackend::new(path, (900, 820)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, rest) = root.split_vertically(420);
    let (middle, bottom) = rest.split_vertically(200);
    let chart_on = |area, caption: &str| -> ChartBuilder<'_, '_, BitMapBackend<'_>> {
        let mut builder = ChartBuilder::on(area);
        builder.margin(12);
        if labelled {
            builder
                .caption(caption, ("sans-serif", 18))
                .x_label_area_size(30)
                .y_label_area_size(65);
        }
        builder
    };

    let mut losses = chart_on(&top, "loss (log scale)")
        .build_cartesian_2d(0f64..max_step, (lo..hi).log_scale())?;
    if labelled {
        losses
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()?;
    }
    losses
        .draw_series(LineSeries::new(train, &BLUE))?
        .label("training")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE));
    if !val.is_empty() {
        losses
            .draw_series(LineSeries::new(val.clone(), &RED))?
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED));
        losses.draw_series(val.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
    }
    if labelled {
        losses
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
    }

    let mut acc = chart_on(&middle, "validation accuracy (%)")
        .build_cartesian_2d(0f64..max_step, 0f64..100f64)?;
    if labelled {
        acc.configure_mesh().y_desc("%").draw()?;
    }
    acc.draw_series(LineSeries::new(accuracy.clone(), &GREEN))?;
    acc.draw_series(accuracy.iter().map(|&p| Circle::new(p, 3, GREEN.filled())))?;

    let max_lr = lr.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-12) * 1.05;
    let mut rate = chart_on(&bottom, "learning rate (encoder group)")
        .build_cartesian_2d(0f64..max_step, 0f64..max_lr)?;
    if labelled {
        rate.configure_mesh()
            .x_desc("step")
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .draw()?;
    }
    rate.draw_series(LineSeries::new(lr, &BLACK))?;
    root.present()?;
    Ok(())
}

fn replan(dir: &Path, max_steps: Option<usize>, val_interval: Option<usize>) -> anyhow::Result<()> {
    let path = dir.join("config.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut cfg =
        TrainConfig::from_toml(&text).with_context(|| format!("parsing {}", path.display()))?;
    if let Some(s) = max_steps {
        cfg.optim.max_steps = Some(s);
    }
    if let Some(v) = val_interval {
        cfg.run.val_interval = v;
    }
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, cfg.to_toml()?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The model's size and how much of it trains, e.g. `model: 9.69 M parameters, 9.18 M trainable; input 32x128, ...`.
fn model_line(trainer: &Trainer) -> String {
    let store = trainer.params();
    let trainable: usize = store.trainable().iter().map(|(_, v)| v.elem_count()).sum();
    let total: usize = store.state_dict().values().map(|t| t.elem_count()).sum();
    let cfg = trainer.model_config();
    let millions = |n: usize| n as f64 / 1e6;
    format!(
        "model: {:.2} M parameters, {:.2} M trainable; input {}x{}, ViT {} wide x {} blocks, text encoder {} x {}, \
         decoders {} wide",
        millions(total),
        millions(trainable),
        cfg.vision.image_size[0],
        cfg.vision.image_size[1],
        cfg.vision.width,
        cfg.vision.layers,
        cfg.text.width,
        cfg.text.layers,
        cfg.decoder.dim
    )
}

/// Runs `train`.
pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let device = args.device.open()?;
    // Opening every dataset and building the model can take a while: say so before it starts.
    eprintln!(
        "{}: opening the datasets and building the model on {}",
        if args.resume.is_some() {
            "resuming"
        } else {
            "starting"
        },
        args.device
    );
    let mut trainer = match (&args.resume, &args.config) {
        (Some(dir), _) => {
            if args.max_steps.is_some() || args.val_interval.is_some() {
                replan(dir, args.max_steps, args.val_interval)?;
            }
            Trainer::resume_on(dir, &device)
                .map_err(|e| crate::error_chain::name_path_once(e, dir, "resuming"))?
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let mut cfg = TrainConfig::from_toml(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            if let Some(d) = &args.output_dir {
                cfg.run.output_dir = d.clone();
            }
            if let Some(s) = args.max_steps {
                cfg.optim.max_steps = Some(s);
            }
            if let Some(b) = args.batch_size {
                cfg.optim.batch_size = b;
            }
            if let Some(lr) = args.lr {
                cfg.optim.lr = lr;
            }
            if let Some(v) = args.val_interval {
                cfg.run.val_interval = v;
            }
            if let Some(s) = args.seed {
                cfg.run.seed = s;
            }
            if let Some(p) = args.precision {
                cfg.run.precision = p.into();
            }
            Trainer::new_on(cfg, &device)
                .with_context(|| format!("starting the run of {}", path.display()))?
        }
        (None, None) => anyhow::bail!("give --config FILE.toml or --resume DIR"),
    };

    if let Some(step) = args.stop_at {
        trainer.set_stop_at(step)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                // Second Ctrl-C: the user insists.
                std::process::exit(130);
            }
        })
        .context("installing the Ctrl-C handler")?;
    }

    let out_dir = match (&args.resume, &args.output_dir) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => {
            let text = std::fs::read_to_string(args.config.as_ref().expect("config given"))?;
            TrainConfig::from_toml(&text)?.run.output_dir
        }
    };
    eprintln!(
        "training {} samples, step {}/{}, output {}",
        trainer.num_train_samples(),
        trainer.step(),
        trainer.total_steps(),
        out_dir.display()
    );
    eprintln!("{}", model_line(&trainer));
    eprintln!("{}", precision_line(&trainer));
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(
            Some(trainer.total_steps() as u64),
            ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(trainer.step() as u64);
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut observer = CliObserver {
        bar,
        plot: out_dir.join("loss.png"),
    };
    trainer.run(&mut observer, &stop).context("training")?;
    observer.bar.finish_and_clear();
    if let Err(e) = draw_loss(&out_dir.join("loss.png"), trainer.history()) {
        eprintln!("warning: cannot draw loss.png: {e:#}");
    }
    if stop.load(Ordering::SeqCst) {
        eprintln!(
            "interrupted at step {}; saved {}",
            trainer.step(),
            out_dir.join("last.safetensors").display()
        );
        return Ok(ExitCode::from(130));
    }
    eprintln!(
        "done: {} steps, weights in {}",
        trainer.step(),
        out_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
