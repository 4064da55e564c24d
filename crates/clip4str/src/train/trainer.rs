//! The training loop: data -> PSM loss -> AdamW/OneCycle, validation, checkpoints and resume.
//!
//! Output directory layout (everything a later `--resume` or `read --checkpoint` needs):
//! `config.toml` (the run's settings), `last.safetensors` / `best.safetensors` (weights with the model's
//! hyper-parameters in the metadata, loadable alone), `last.json` / `best.json` (charset, dims, step,
//! validation figures), `state-<step>.safetensors` (AdamW moments, referenced by `last.safetensors`),
//! `step-<step>.safetensors` (the newest `run.keep_last` snapshots of `last` taken by `run.save_interval` /
//! `run.save_minutes`, each with its state file) and `metrics.jsonl`. Files are written to a temporary name
//! and renamed, and the optimizer state is written before the weights that point at it, so a kill at any
//! moment leaves a consistent `last`.
//!
//! Every random draw is keyed by the seed and a position (sample order and augmentation by epoch and sample,
//! permutations and dropout masks by step), and `last` keeps the partial logging window, so a run resumed
//! from `last` repeats the uninterrupted run's losses exactly (same machine and thread count).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::config::{InitSpec, PositionalInit, TrainConfig, TrainPrecision};
use super::ctc::ctc_loss;
use super::init::{initial_weights, sincos_positional, InitSource, VISUAL_POSITIONAL};
use super::{
    clip_grad_norm, gen_tgt_perms, training_loss, AdamW, CtcHead, LossOptions, OneCycleLr,
    OptimizerConfig, ParamStore, TrainError,
};
use crate::charset::CharsetAdapter;
use crate::checkpoint::{read_checkpoint, save_safetensors};
use crate::config::Clip4StrConfig;
use crate::data::loader::{Batches, TrainLoader, TrainLoaderConfig};
use crate::data::{open_dataset, Dataset};
use crate::eval::DatasetResult;
use crate::model::Clip4Str;
use crate::nn::{Mode, Precision};
use crate::preprocess::{decode_rgb, Normalization};
use crate::recognizer::{Recognizer, RecognizerOptions};

/// One logged training step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps done.
    pub step: usize,
    /// Planned steps.
    pub total_steps: usize,
    /// Epoch of the last batch.
    pub epoch: usize,
    /// Mean loss over the logged window.
    pub loss: f64,
    /// Encoder learning rate used by this step.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Training images per second over the window.
    pub images_per_second: f64,
    /// Validation accuracy (percent), on validation steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    /// Validation 1-NED (percent), on validation steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_one_minus_ned: Option<f64>,
    /// Validation loss, on validation steps: the reference's `val_loss`, cross-entropy of the refined
    /// cross-modal logits decoded to the labels' length (no early stop) against the labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

/// Receives progress; the CLI draws bars and plots from it.
pub trait TrainObserver {
    /// A metrics line was logged.
    fn on_step(&mut self, _m: &StepMetrics) {}
    /// A validation finished and checkpoints were written.
    fn on_validation(&mut self, _m: &StepMetrics, _history: &[StepMetrics]) {}
}

/// Resume bookkeeping stored in the metadata of `last.safetensors`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RunState {
    step: usize,
    epoch: usize,
    position: usize,
    best_accuracy: Option<f64>,
    /// The steps since the last logged line, so that a resumed run logs the same averages.
    #[serde(default)]
    window: WindowState,
}

/// The part of [`Window`] that a checkpoint keeps (not its clock).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct WindowState {
    loss: f64,
    steps: usize,
}

/// A training run in progress.
pub struct Trainer {
    cfg: TrainConfig,
    model_cfg: Clip4StrConfig,
    store: ParamStore,
    model: Clip4Str,
    optimizer: AdamW,
    schedule: OneCycleLr,
    loader: TrainLoader,
    /// Auxiliary CTC head when `optim.ctc_weight > 0`.
    ctc: Option<CtcHead>,
    state: RunState,
    total_steps: usize,
    /// Step at which [`Trainer::run`] stops and saves, leaving the schedule as it is.
    stop_at: Option<usize>,
    history: Vec<StepMetrics>,
    device: Device,
}

/// What a run's [`TrainPrecision`] computes in on `device`: bf16 only on a CPU with AVX512-BF16 (the GPU
/// path and emulated bf16 stay f32).
pub fn effective_precision(wanted: TrainPrecision, device: &Device) -> Precision {
    let native = device.is_cpu() && crate::nn::bf16_native_supported();
    match wanted {
        TrainPrecision::Auto | TrainPrecision::Bf16 if native => Precision::Bf16,
        _ => Precision::F32,
    }
}

/// What one optimizer step did.
struct StepDone {
    /// Its loss (summed over the accumulated batches).
    loss: f64,
    /// Gradient norm before clipping.
    grad_norm: f64,
    /// The encoder group's learning rate it used.
    lr: f64,
    /// Training images it saw.
    images: usize,
}

/// The steps since the last logged line, averaged into the next one.
struct Window {
    loss: f64,
    steps: usize,
    images: usize,
    start: Instant,
}

impl Window {
    fn start() -> Self {
        Self::resume(WindowState::default())
    }

    /// Continues a window saved mid-way; images per second count from now.
    fn resume(saved: WindowState) -> Self {
        Self {
            loss: saved.loss,
            steps: saved.steps,
            images: 0,
            start: Instant::now(),
        }
    }

    fn saved(&self) -> WindowState {
        WindowState {
            loss: self.loss,
            steps: self.steps,
        }
    }

    fn add(&mut self, done: &StepDone) {
        self.loss += done.loss;
        self.steps += 1;
        self.images += done.images;
    }

    /// The log line for the trainer's current step (validation figures not yet filled in).
    fn metrics(&self, trainer: &Trainer, lr: f64, grad_norm: f64) -> StepMetrics {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        StepMetrics {
            step: trainer.state.step,
            total_steps: trainer.total_steps,
            epoch: trainer.state.epoch,
            loss: self.loss / self.steps.max(1) as f64,
            lr,
            grad_norm,
            images_per_second: self.images as f64 / secs,
            val_accuracy: None,
            val_one_minus_ned: None,
            val_loss: None,
        }
    }
}

/// Validation cross-entropy summed over every scored target, as Lightning averages `val_loss`.
#[derive(Default)]
struct ValLoss {
    sum: f64,
    count: usize,
}

impl ValLoss {
    fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// CTC frames per patch column: a 16-column grid gives 32 frames, room for labels of up to ~25 characters.
const CTC_STEPS_PER_COLUMN: usize = 2;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Config(format!("{}: {e}", path.display()))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

impl Trainer {
    /// Starts a new run in `cfg.run.output_dir` (which must not hold a run already), on the CPU.
    pub fn new(cfg: TrainConfig) -> Result<Self, TrainError> {
        Self::new_on(cfg, &Device::Cpu)
    }

    /// [`Trainer::new`] with the weights, optimizer state and batches on `device`. The device is not part of
    /// the run: a run started on a GPU can be resumed on the CPU and the other way round.
    pub fn new_on(cfg: TrainConfig, device: &Device) -> Result<Self, TrainError> {
        let out = cfg.run.output_dir.clone();
        if out.join("last.safetensors").exists() {
            return Err(TrainError::Config(format!(
                "{} already holds a run; use --resume to continue it or choose another output_dir",
                out.display()
            )));
        }
        std::fs::create_dir_all(&out).map_err(io_err(&out))?;
        let (model_cfg, weights) = match &cfg.init {
            InitSpec::Clip4str { path } => {
                let raw = read_checkpoint(path)?;
                let mc = Clip4StrConfig::from_tensors(&raw.shapes(), raw.hyper_parameters.as_ref())
                    .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
                let w = initial_weights(&InitSource::Clip4Str(path.clone()), &mc)?;
                (mc, w)
            }
            InitSpec::Clip { path } => {
                let mc = cfg.model.resolve()?;
                let src = InitSource::Clip {
                    path: path.clone(),
                    seed: cfg.run.seed,
                };
                (mc.clone(), initial_weights(&src, &mc)?)
            }
            InitSpec::Scratch { positional } => {
                let mc = cfg.model.resolve()?;
                let mut w = initial_weights(&InitSource::Scratch { seed: cfg.run.seed }, &mc)?;
                if *positional == PositionalInit::Sincos {
                    let table = sincos_positional(&mc.vision)?;
                    for (name, tensor) in &mut w {
                        if name == VISUAL_POSITIONAL {
                            *tensor = table.clone();
                        }
                    }
                }
                (mc, w)
            }
        };
        write_atomic(&out.join("config.toml"), cfg.to_toml()?.as_bytes())?;
        std::fs::write(out.join("metrics.jsonl"), b"").map_err(io_err(&out))?;
        let weights: HashMap<String, Tensor> = weights.into_iter().collect();
        Self::build(cfg, model_cfg, &weights, RunState::default(), None, device)
    }

    /// Continues the run in `dir` from its `last` checkpoint: same config, optimizer moments, schedule
    /// position and data position; metrics logged after that checkpoint are dropped so curves continue.
    pub fn resume(dir: &Path) -> Result<Self, TrainError> {
        Self::resume_on(dir, &Device::Cpu)
    }

    /// [`Trainer::resume`] on `device`.
    pub fn resume_on(dir: &Path, device: &Device) -> Result<Self, TrainError> {
        let cfg_path = dir.join("config.toml");
        let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
        let mut cfg = TrainConfig::from_toml(&text)?;
        cfg.run.output_dir = dir.to_path_buf();
        let last = dir.join("last.safetensors");
        let raw = read_checkpoint(&last)?;
        let state: RunState = raw
            .metadata
            .get("run_state")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| TrainError::State(format!("{} has no run state", last.display())))?;
        let model_cfg = Clip4StrConfig::from_tensors(&raw.shapes(), raw.hyper_parameters.as_ref())
            .map_err(|e| TrainError::Config(format!("{}: {e}", last.display())))?;
        let weights: HashMap<String, Tensor> = raw.tensors.into_iter().collect();
        let opt_path = dir.join(format!("state-{:08}.safetensors", state.step));
        let opt_state = candle_core::safetensors::load(&opt_path, device)
            .map_err(|e| TrainError::State(format!("{}: {e}", opt_path.display())))?;
        let mut trainer = Self::build(cfg, model_cfg, &weights, state, Some(opt_state), device)?;
        trainer.reload_history()?;
        Ok(trainer)
    }

    fn build(
        cfg: TrainConfig,
        model_cfg: Clip4StrConfig,
        weights: &HashMap<String, Tensor>,
        state: RunState,
        opt_state: Option<HashMap<String, Tensor>>,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let device = device.clone();
        let store = ParamStore::new(&model_cfg, weights, DType::F32, &device)?;
        let mut model = store.build_model(&model_cfg)?;
        model.set_mode(Mode {
            precision: effective_precision(cfg.run.precision, &device),
            ..Mode::default()
        });
        let o = &cfg.optim;
        let repeat = &cfg.data.repeat;
        if !repeat.is_empty() && repeat.len() != cfg.data.train.len() {
            return Err(TrainError::Config(format!(
                "data.repeat has {} entries but data.train has {} roots; give one count per root",
                repeat.len(),
                cfg.data.train.len()
            )));
        }
        if repeat.contains(&0) {
            return Err(TrainError::Config(
                "data.repeat counts must be at least 1 (remove the root instead)".into(),
            ));
        }
        if o.batch_size == 0 || o.accumulate == 0 {
            return Err(TrainError::Config(
                "batch_size and accumulate must be at least 1".into(),
            ));
        }
        let opt_cfg = OptimizerConfig {
            base_lr: o.lr,
            batch_size: o.batch_size,
            num_devices: 1,
            accumulate_grad_batches: o.accumulate,
            weight_decay: o.weight_decay,
            coef_lr: o.coef_lr,
            coef_wd: o.coef_wd,
            ..OptimizerConfig::default()
        };
        let ctc = if o.ctc_weight > 0.0 {
            let classes = model.tokenizer.num_classes();
            let grid = model_cfg.vision.grid();
            let saved = match &opt_state {
                Some(s) => CtcHead::from_named(s, grid, classes, CTC_STEPS_PER_COLUMN)?,
                None => None,
            };
            Some(match saved {
                Some(head) => head,
                None => CtcHead::new(
                    model_cfg.embed_dim,
                    grid,
                    classes,
                    CTC_STEPS_PER_COLUMN,
                    cfg.run.seed,
                    &device,
                )?,
            })
        } else {
            None
        };
        let mut optimized: Vec<(String, Var)> = store.trainable().to_vec();
        if let Some(head) = &ctc {
            optimized.extend(head.named());
        }
        let mut optimizer = AdamW::new(&optimized, &opt_cfg);
        if let Some(s) = &opt_state {
            optimizer.load_state_dict(s)?;
        }
        let loader = TrainLoader::new(TrainLoaderConfig {
            roots: cfg.data.train.clone(),
            repeats: cfg.data.repeat.clone(),
            charset_train: model_cfg.charset_train.clone(),
            max_label_length: model_cfg.max_label_length,
            image_size: model_cfg.vision.image_size,
            batch_size: o.batch_size,
            augment: cfg.data.augment,
            seed: cfg.run.seed,
            workers: cfg.data.workers,
            prefetch_batches: 4,
        })?;
        if loader.is_empty() {
            return Err(TrainError::Config(
                "no training samples left after label filtering".into(),
            ));
        }
        let total_steps = match (o.max_steps, o.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => (e * loader.batches_per_epoch()).div_ceil(o.accumulate),
            (None, None) => {
                return Err(TrainError::Config(
                    "set optim.max_steps or optim.epochs".into(),
                ))
            }
        }
        .max(1);
        let mut schedule = OneCycleLr::new(opt_cfg.max_lrs(), total_steps, o.warmup_pct)?;
        schedule.set_step_count(state.step);
        Ok(Self {
            cfg,
            model_cfg,
            store,
            model,
            optimizer,
            schedule,
            loader,
            ctc,
            state,
            total_steps,
            stop_at: None,
            history: Vec::new(),
            device,
        })
    }

    fn reload_history(&mut self) -> Result<(), TrainError> {
        let path = self.cfg.run.output_dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let kept: Vec<StepMetrics> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<StepMetrics>(l).ok())
            .filter(|m| m.step <= self.state.step)
            .collect();
        let mut out = String::new();
        for m in &kept {
            out.push_str(&serde_json::to_string(m).unwrap_or_default());
            out.push('\n');
        }
        write_atomic(&path, out.as_bytes())?;
        self.history = kept;
        Ok(())
    }

    /// The model being trained (weights update in place).
    pub fn model(&self) -> &Clip4Str {
        &self.model
    }

    /// The weights being trained, by state-dict name.
    pub fn params(&self) -> &ParamStore {
        &self.store
    }

    /// The auxiliary CTC head, when `optim.ctc_weight > 0`.
    pub fn ctc_head(&self) -> Option<&CtcHead> {
        self.ctc.as_ref()
    }

    /// The model configuration.
    pub fn model_config(&self) -> &Clip4StrConfig {
        &self.model_cfg
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// What the linear layers compute in (the run's `precision` on this CPU).
    pub fn precision(&self) -> Precision {
        effective_precision(self.cfg.run.precision, &self.device)
    }

    /// Optimizer steps done so far.
    pub fn step(&self) -> usize {
        self.state.step
    }

    /// Planned optimizer steps.
    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    /// Makes [`Self::run`] stop and save `last` once `step` steps are done, without changing the learning-rate
    /// schedule (which still plans `total_steps`): to reproduce a checkpoint taken part-way, or to train in
    /// slices. A step already passed is an error.
    pub fn set_stop_at(&mut self, step: usize) -> Result<(), TrainError> {
        if step <= self.state.step {
            return Err(TrainError::Config(format!(
                "cannot stop at step {step}: the run is already at step {}",
                self.state.step
            )));
        }
        self.stop_at = Some(step);
        Ok(())
    }

    /// Training samples after label filtering.
    pub fn num_train_samples(&self) -> usize {
        self.loader.len()
    }

    /// Metrics logged so far.
    pub fn history(&self) -> &[StepMetrics] {
        &self.history
    }

    /// Trains until `total_steps` or until `stop` is set; saves `last` on the way out either way.
    pub fn run(
        &mut self,
        observer: &mut dyn TrainObserver,
        stop: &AtomicBool,
    ) -> Result<(), TrainError> {
        let mut batches = self.loader.iter_from(self.state.epoch, self.state.position);
        let mut window = Window::resume(self.state.window);
        let end = self
            .stop_at
            .map_or(self.total_steps, |s| s.min(self.total_steps));
        let mut saved_at = None;
        let mut last_save = Instant::now();
        let run = &self.cfg.run;
        let (save_interval, save_every) = (
            run.save_interval,
            (run.save_minutes > 0.0).then(|| Duration::from_secs_f64(run.save_minutes * 60.0)),
        );
        while self.state.step < end && !stop.load(Ordering::Relaxed) {
            let done = self.train_step(&mut batches)?;
            window.add(&done);
            let step = self.state.step;
            let log_now =
                step.is_multiple_of(self.cfg.run.log_interval.max(1)) || step == self.total_steps;
            let val_now =
                step.is_multiple_of(self.cfg.run.val_interval.max(1)) || step == self.total_steps;
            if log_now || val_now {
                let mut m = window.metrics(self, done.lr, done.grad_norm);
                if val_now {
                    self.validate_into(&mut m)?;
                }
                self.log(&m)?;
                observer.on_step(&m);
                window = Window::start();
                if val_now {
                    self.state.window = window.saved();
                    self.save_checkpoints(&m)?;
                    saved_at = Some(step);
                    last_save = Instant::now();
                    observer.on_validation(&m, &self.history);
                }
            }
            let interval_due = save_interval > 0 && step.is_multiple_of(save_interval);
            let time_due = save_every.is_some_and(|every| last_save.elapsed() >= every);
            if saved_at != Some(step) && step < end && (interval_due || time_due) {
                self.save_now(&window, done.lr, done.grad_norm)?;
                self.snapshot()?;
                saved_at = Some(step);
                last_save = Instant::now();
            }
        }
        // Interrupted, or stopped early by `stop_at`, between validations (possibly before the first log
        // line): keep what was learned.
        let stopped_early = stop.load(Ordering::Relaxed) || self.state.step < self.total_steps;
        if stopped_early && self.state.step > 0 && saved_at != Some(self.state.step) {
            let lr = self.optimizer.lrs().first().copied().unwrap_or(0.0);
            let grad_norm = self.history.last().map_or(0.0, |p| p.grad_norm);
            self.save_now(&window, lr, grad_norm)?;
        }
        Ok(())
    }

    /// Saves `last` between log lines, with the window so far (a resumed run goes on averaging it).
    fn save_now(&mut self, window: &Window, lr: f64, grad_norm: f64) -> Result<(), TrainError> {
        let mut m = window.metrics(self, lr, grad_norm);
        if window.steps == 0 {
            m.loss = self.history.last().map_or(0.0, |p| p.loss);
        }
        self.state.window = window.saved();
        self.save_last(&m)
    }

    /// One optimizer step: `optim.accumulate` batches through the PSM loss (plus CTC when on), their
    /// gradients summed, clipped, and applied with the scheduled learning rates.
    fn train_step(&mut self, batches: &mut Batches) -> Result<StepDone, TrainError> {
        let o = self.cfg.optim.clone();
        let loss_opts = LossOptions {
            dropout: true,
            ..LossOptions::default()
        };
        let [h, w] = self.model_cfg.vision.image_size;
        let lr = self.schedule.lrs()?;
        self.schedule.apply(&mut self.optimizer)?;
        let mut accumulated: Option<candle_core::backprop::GradStore> = None;
        let mut step_loss = 0.0;
        let mut images = 0;
        for micro in 0..o.accumulate {
            let batch = batches
                .next()
                .ok_or_else(|| TrainError::Config("the training data ran out".into()))??;
            let b = batch.labels.len();
            let batch_images = Tensor::from_vec(batch.images, (b, 3, h, w), &self.device)?;
            let labels: Vec<&str> = batch.labels.iter().map(String::as_str).collect();
            let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1);
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                self.cfg.run.seed ^ (self.state.step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let perms = gen_tgt_perms(longest, o.perm_num, true, true, &mut rng);
            // Dropout masks keyed by (seed, step, micro-batch): a resumed run draws the same ones.
            let _masks = crate::nn::DropoutStream::install(
                self.cfg.run.seed
                    ^ (self.state.step as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
                    ^ (micro as u64).wrapping_mul(0x8CB9_2BA7_2F3D_8DD7),
            );
            let out = training_loss(&self.model, &batch_images, &labels, &perms, &loss_opts)?;
            let mut loss = out.loss.clone();
            if let Some(head) = &self.ctc {
                // Character ids between BOS and EOS; the charset's EOS id (0) is the blank.
                let eos = self.model.tokenizer.eos_id();
                let targets: Vec<Vec<u32>> = out
                    .tgt
                    .iter()
                    .map(|row| row[1..].iter().copied().take_while(|&c| c != eos).collect())
                    .collect();
                let (ctc, _) = ctc_loss(&head.log_probs(&out.memory)?, &targets, eos)?;
                loss = (loss + (ctc * o.ctc_weight)?)?;
            }
            let loss = (loss / o.accumulate as f64)?;
            step_loss += loss.to_scalar::<f32>()? as f64;
            let grads = loss.backward()?;
            accumulated = Some(match accumulated {
                None => grads,
                Some(mut acc) => {
                    for var in self.optimizer.vars() {
                        if let Some(g) = grads.get(var.as_tensor()) {
                            let sum = match acc.get(var.as_tensor()) {
                                Some(a) => (a + g)?.detach(),
                                None => g.detach(),
                            };
                            acc.insert(var.as_tensor(), sum);
                        }
                    }
                    acc
                }
            });
            self.state.epoch = batch.epoch;
            self.state.position = batch.position;
            images += b;
        }
        let mut grads = accumulated.ok_or(TrainError::EmptyBatch)?;
        let vars: Vec<&Var> = self.optimizer.vars().collect();
        let grad_norm = clip_grad_norm(&mut grads, vars, o.grad_clip)?.total_norm;
        if !step_loss.is_finite() || !grad_norm.is_finite() {
            return Err(TrainError::Diverged {
                step: self.state.step + 1,
                loss: step_loss,
                grad_norm,
            });
        }
        self.optimizer.step(&grads)?;
        self.schedule.step();
        self.state.step += 1;
        Ok(StepDone {
            loss: step_loss,
            grad_norm,
            lr: lr.first().copied().unwrap_or(0.0),
            images,
        })
    }

    /// Adds the validation figures to `m` (when the run has a validation set).
    fn validate_into(&self, m: &mut StepMetrics) -> Result<(), TrainError> {
        if let Some((v, loss)) = self.validate()? {
            m.val_accuracy = Some(v.accuracy());
            m.val_one_minus_ned = Some(v.one_minus_ned());
            m.val_loss = loss;
        }
        Ok(())
    }

    /// After a validation: `best` when the accuracy improved, and always `last`.
    fn save_checkpoints(&mut self, m: &StepMetrics) -> Result<(), TrainError> {
        let better = match (m.val_accuracy, self.state.best_accuracy) {
            (Some(a), Some(b)) => a > b,
            (Some(_), None) => true,
            _ => false,
        };
        if better {
            self.state.best_accuracy = m.val_accuracy;
            self.save("best", m)?;
        }
        self.save_last(m)
    }

    fn log(&mut self, m: &StepMetrics) -> Result<(), TrainError> {
        let path = self.cfg.run.output_dir.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let line = serde_json::to_string(m).map_err(|e| TrainError::Config(e.to_string()))?;
        writeln!(f, "{line}").map_err(io_err(&path))?;
        self.history.push(m.clone());
        Ok(())
    }

    /// Validation with the test protocol (charset_test, filtered labels), accuracy over all val sets, and the
    /// validation loss (`None` when no label could be scored).
    fn validate(&self) -> Result<Option<(DatasetResult, Option<f64>)>, TrainError> {
        if self.cfg.data.val.is_empty() {
            return Ok(None);
        }
        let charset = self.model_cfg.charset_test.clone();
        let opts = RecognizerOptions {
            charset_test: Some(charset.clone()),
            filter_output: true,
            batch_size: 64,
            normalization: Some(Normalization::OPENAI),
            ..RecognizerOptions::default()
        };
        let rec = Recognizer::from_model(self.model.clone(), opts)
            .map_err(|e| TrainError::Config(e.to_string()))?;
        let adapter = CharsetAdapter::new(&charset);
        let mut total = DatasetResult::new("val");
        let mut loss = ValLoss::default();
        for path in &self.cfg.data.val {
            let ds: Box<dyn Dataset> = open_dataset(path)?;
            let mut kept = ds.filtered(&adapter, self.model_cfg.max_label_length, true, true)?;
            if let Some(limit) = self.cfg.run.val_limit {
                kept.indices.truncate(limit);
                kept.labels.truncate(limit);
            }
            let mut images = Vec::new();
            let mut labels = Vec::new();
            for (&i, label) in kept.indices.iter().zip(&kept.labels) {
                let Ok(bytes) = ds.image(i) else { continue };
                let Ok(img) = decode_rgb(&bytes) else {
                    continue;
                };
                images.push(img);
                labels.push(label.clone());
            }
            // Each batch is preprocessed once and serves both the reading and the loss.
            let model_err =
                |e: crate::recognizer::RecognizerError| TrainError::Config(e.to_string());
            let batch_size = rec.options().batch_size;
            for (images, labels) in images.chunks(batch_size).zip(labels.chunks(batch_size)) {
                let inputs: Vec<Vec<f32>> =
                    images.par_iter().map(|im| rec.preprocess(im)).collect();
                let batch = rec.batch_tensor(&inputs).map_err(model_err)?;
                let preds = rec.recognize_batch(&batch).map_err(model_err)?;
                for (p, gt) in preds.iter().zip(labels) {
                    total.add(&p.text, gt, f64::from(p.confidence));
                }
                self.add_val_loss(&adapter, &batch, labels, &mut loss)?;
            }
        }
        Ok(Some((total, loss.mean())))
    }

    /// The reference's `forward_logits_loss` on one batch: decode `longest label` steps without early stop,
    /// cross-entropy against `[labels, EOS, PAD..]` with PAD ignored.
    fn add_val_loss(
        &self,
        adapter: &CharsetAdapter,
        batch: &Tensor,
        labels: &[String],
        loss: &mut ValLoss,
    ) -> Result<(), TrainError> {
        let tokenizer = &self.model.tokenizer;
        // A label the training charset cannot encode has no target; it still counts for accuracy.
        let (rows, targets): (Vec<u32>, Vec<Vec<u32>>) = labels
            .iter()
            .enumerate()
            .filter_map(|(row, label)| {
                Some((row as u32, tokenizer.encode(label).ok()?[1..].to_vec()))
            })
            .unzip();
        let Some(width) = targets.iter().map(Vec::len).max() else {
            return Ok(());
        };
        let targets: Vec<Vec<u32>> = targets
            .into_iter()
            .map(|mut row| {
                row.resize(width, tokenizer.pad_id());
                row
            })
            .collect();
        let batch = if rows.len() == labels.len() {
            batch.clone()
        } else {
            batch.index_select(&Tensor::new(rows.as_slice(), batch.device())?, 0)?
        };
        let opts = crate::model::ForwardOptions {
            max_length: Some(width - 1),
            ..Default::default()
        };
        let logits = self
            .model
            .forward_trace(&batch, adapter, &opts)?
            .final_logits;
        let (mean, count) = super::loss::cross_entropy(&logits, &targets, tokenizer.pad_id())?;
        loss.sum += f64::from(mean.to_scalar::<f32>()?) * count as f64;
        loss.count += count;
        Ok(())
    }

    fn metadata(&self, m: &StepMetrics) -> Result<HashMap<String, String>, TrainError> {
        let mut meta = HashMap::new();
        meta.insert(
            crate::checkpoint::HYPER_PARAMETERS_METADATA_KEY.to_string(),
            self.model_cfg.hyper_parameters().to_string(),
        );
        meta.insert(
            "run_state".into(),
            serde_json::to_string(&self.state).map_err(|e| TrainError::Config(e.to_string()))?,
        );
        meta.insert(
            "metrics".into(),
            serde_json::to_string(m).map_err(|e| TrainError::Config(e.to_string()))?,
        );
        meta.insert("format".into(), "clip4str".into());
        // The loader normalises with the OpenAI mean/std (as the reference trains); reading must match.
        meta.insert(
            Normalization::METADATA_KEY.into(),
            serde_json::to_string(&Normalization::OPENAI)
                .map_err(|e| TrainError::Config(e.to_string()))?,
        );
        Ok(meta)
    }

    fn weights(&self) -> Vec<(String, Tensor)> {
        let mut sd: Vec<(String, Tensor)> = self.store.state_dict().into_iter().collect();
        sd.sort_by(|a, b| a.0.cmp(&b.0));
        sd
    }

    /// Writes `<name>.safetensors` and `<name>.json`.
    fn save(&self, name: &str, m: &StepMetrics) -> Result<(), TrainError> {
        let dir = &self.cfg.run.output_dir;
        save_safetensors(
            &dir.join(format!("{name}.safetensors")),
            &self.weights(),
            &self.metadata(m)?,
        )?;
        let info = serde_json::json!({
            "step": self.state.step,
            "metrics": m,
            "hyper_parameters": self.model_cfg.hyper_parameters(),
        });
        write_atomic(
            &dir.join(format!("{name}.json")),
            serde_json::to_string_pretty(&info)
                .map_err(|e| TrainError::Config(e.to_string()))?
                .as_bytes(),
        )
    }

    /// Optimizer state first, then the weights that name it, then old states are removed.
    fn save_last(&self, m: &StepMetrics) -> Result<(), TrainError> {
        let dir = &self.cfg.run.output_dir;
        let state_name = format!("state-{:08}.safetensors", self.state.step);
        let mut opt: Vec<(String, Tensor)> = self.optimizer.state_dict()?.into_iter().collect();
        if let Some(head) = &self.ctc {
            opt.extend(
                head.named()
                    .into_iter()
                    .map(|(name, var)| (name, var.as_detached_tensor())),
            );
        }
        save_safetensors(&dir.join(&state_name), &opt, &HashMap::new())?;
        self.save("last", m)?;
        self.prune(self.state.step)
    }

    /// Keeps `last` as `step-<N>.safetensors` too (a hard link, else a copy), with its optimizer state, and
    /// deletes the snapshots beyond `run.keep_last`.
    fn snapshot(&self) -> Result<(), TrainError> {
        let dir = &self.cfg.run.output_dir;
        let name = dir.join(format!("step-{:08}.safetensors", self.state.step));
        let tmp = name.with_extension("safetensors.tmp");
        let last = dir.join("last.safetensors");
        std::fs::remove_file(&tmp).ok();
        if std::fs::hard_link(&last, &tmp).is_err() {
            std::fs::copy(&last, &tmp).map_err(io_err(&tmp))?;
        }
        std::fs::rename(&tmp, &name).map_err(io_err(&name))?;
        self.prune(self.state.step)
    }

    /// Deletes old snapshots (all but the newest `keep_last`) and every optimizer state that neither `last`
    /// (at step `last`) nor a kept snapshot needs.
    fn prune(&self, last: usize) -> Result<(), TrainError> {
        let dir = &self.cfg.run.output_dir;
        let step_of = |name: &str, prefix: &str| -> Option<usize> {
            name.strip_prefix(prefix)?
                .strip_suffix(".safetensors")?
                .parse()
                .ok()
        };
        let names: Vec<String> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let mut snapshots: Vec<usize> = names.iter().filter_map(|n| step_of(n, "step-")).collect();
        snapshots.sort_unstable();
        let cut = snapshots.len().saturating_sub(self.cfg.run.keep_last);
        for old in &snapshots[..cut] {
            let path = dir.join(format!("step-{old:08}.safetensors"));
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
        let kept = &snapshots[cut..];
        for name in &names {
            if let Some(step) = step_of(name, "state-") {
                if step != last && !kept.contains(&step) {
                    std::fs::remove_file(dir.join(name)).ok();
                }
            }
        }
        Ok(())
    }
}
