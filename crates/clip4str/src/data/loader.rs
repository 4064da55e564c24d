//! Batches for training and validation (SPEC §13): every dataset under the given roots concatenated
//! (`build_tree_dataset`), labels filtered like `LmdbDataset`, a per-epoch shuffle, and the reference train
//! transform (RandAugment on the original image, Pillow bicubic resize, OpenAI normalisation) computed on
//! worker threads ahead of the consumer.
//!
//! Everything random is derived from `(seed, epoch, sample)`, never from a running RNG, so a batch depends
//! only on where it sits in the epoch: training resumes at `(epoch, position)` with the same batches, and the
//! number of worker threads does not change the result.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::augment::RandAugment;
use super::{default_name, open_dataset_as, DataError, Dataset};
use crate::charset::{CharsetAdapter, CHARSET_94};
use crate::preprocess::{decode_rgb, resize_bicubic, ImageError, Normalization};

/// RNG stream tags, so that the shuffle and the augmentation of one `(seed, epoch)` never share draws.
const STREAM_SHUFFLE: u64 = 0x5348_5546; // "SHUF"
const STREAM_AUGMENT: u64 = 0x4155_4731; // "AUG1"

/// What the training loader reads and how it shapes batches. The label filter is the reference's with
/// `remove_whitespace` and `normalize_unicode` on.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainLoaderConfig {
    /// Folders searched for datasets (every LMDB and `labels.tsv` folder below each, see
    /// [`discover_train_datasets`]), or single dataset paths; the reference's `data/train/<train_dir>`.
    pub roots: Vec<PathBuf>,
    /// How many times each root's samples appear per epoch, one entry per root (missing entries count as
    /// 1): oversamples a small real set next to a large synthetic one.
    pub repeats: Vec<usize>,
    /// Charset labels are adapted to (`charset_train`, 94 characters in the reference: case kept).
    pub charset_train: String,
    /// Labels longer than this (after whitespace removal and NFKD) are dropped (25).
    pub max_label_length: usize,
    /// Model input `[height, width]` in pixels.
    pub image_size: [usize; 2],
    /// Samples per batch; the last batch of an epoch may be smaller (DataLoader's `drop_last=False`).
    pub batch_size: usize,
    /// Apply RandAugment (3 ops, magnitude 5) to training images.
    pub augment: bool,
    /// Seed of the epoch shuffles and of the augmentation.
    pub seed: u64,
    /// Threads decoding and augmenting a batch (0 counts as 1).
    pub workers: usize,
    /// Finished batches kept ready ahead of the consumer; memory is about
    /// `(prefetch_batches + 2) * batch_size * 3 * H * W * 4` bytes.
    pub prefetch_batches: usize,
}

impl Default for TrainLoaderConfig {
    /// The reference training setup (94-character charset, 25 characters, 224x224, batch 256, augmentation)
    /// with one worker per available core.
    fn default() -> Self {
        Self {
            roots: Vec::new(),
            repeats: Vec::new(),
            charset_train: CHARSET_94.to_owned(),
            max_label_length: 25,
            image_size: [224, 224],
            batch_size: 256,
            augment: true,
            seed: 0,
            workers: std::thread::available_parallelism().map_or(1, usize::from),
            prefetch_batches: 2,
        }
    }
}

/// What the validation loader reads: the reference's `data/val` sets, labels filtered with `charset_test`,
/// images resized and normalised like training images but never augmented.
#[derive(Debug, Clone, PartialEq)]
pub struct ValLoaderConfig {
    /// Folders searched for datasets, or single dataset paths.
    pub roots: Vec<PathBuf>,
    /// Charset labels are adapted to (`charset_test`, lowercase alphanumerics by default).
    pub charset_test: String,
    /// Labels longer than this are dropped.
    pub max_label_length: usize,
    /// Model input `[height, width]` in pixels.
    pub image_size: [usize; 2],
    /// Samples per batch; the last one may be smaller.
    pub batch_size: usize,
    /// Threads decoding a batch (0 counts as 1).
    pub workers: usize,
    /// Finished batches kept ready ahead of the consumer.
    pub prefetch_batches: usize,
}

/// One batch as the model takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainBatch {
    /// `[B, 3, H, W]` row-major, OpenAI-normalised; `B == labels.len()`.
    pub images: Vec<f32>,
    /// Filtered ground truth of each image.
    pub labels: Vec<String>,
    /// Epoch the batch belongs to.
    pub epoch: usize,
    /// Samples of this epoch consumed once this batch is done; resuming at `(epoch, position)` continues
    /// with the next batch. Records that failed to load count as consumed, so `B` may be below the window.
    pub position: usize,
}

/// Finds the training datasets under `root` like `build_tree_dataset` (every `data.mdb` below it, plus every
/// `labels.tsv` folder without one), without the `test/` preference of [`super::discover_datasets`]. A file
/// path (a `data.mdb` or a label file) is one dataset. Names are relative to `root`, sorted.
pub fn discover_train_datasets(
    root: impl AsRef<Path>,
) -> Result<Vec<(String, PathBuf)>, DataError> {
    let root = root.as_ref();
    if root.is_file() {
        return Ok(vec![(default_name(root), root.to_owned())]);
    }
    super::find_datasets(root)
}

/// The concatenated, filtered samples of all datasets: `(dataset, record)` per sample and its label.
struct Corpus {
    datasets: Vec<Box<dyn Dataset>>,
    /// Samples kept per dataset, for reports.
    kept: Vec<usize>,
    records: Vec<(usize, usize)>,
    label_text: String,
    label_ends: Vec<usize>,
    /// Records dropped because their label could not be read.
    unreadable_labels: usize,
}

impl Corpus {
    fn open(
        roots: &[PathBuf],
        repeats: &[usize],
        charset: &str,
        max_label_length: usize,
    ) -> Result<Self, DataError> {
        let adapter = CharsetAdapter::new(charset);
        let mut corpus = Corpus {
            datasets: Vec::new(),
            kept: Vec::new(),
            records: Vec::new(),
            label_text: String::new(),
            label_ends: Vec::new(),
            unreadable_labels: 0,
        };
        for (r, root) in roots.iter().enumerate() {
            let repeat = repeats.get(r).copied().unwrap_or(1);
            let found = discover_train_datasets(root)?;
            if found.is_empty() {
                return Err(DataError::NotADataset { path: root.clone() });
            }
            for (name, path) in found {
                let dataset = open_dataset_as(&path, &name)?;
                let filtered = dataset.filtered(&adapter, max_label_length, true, true)?;
                let index = corpus.datasets.len();
                corpus.unreadable_labels += filtered.failed.len();
                corpus.kept.push(filtered.len() * repeat);
                for _ in 0..repeat {
                    for (&record, label) in filtered.indices.iter().zip(&filtered.labels) {
                        corpus.records.push((index, record));
                        corpus.label_text.push_str(label);
                        corpus.label_ends.push(corpus.label_text.len());
                    }
                }
                corpus.datasets.push(dataset);
            }
        }
        Ok(corpus)
    }

    fn len(&self) -> usize {
        self.records.len()
    }

    fn label(&self, sample: usize) -> &str {
        let start = if sample == 0 {
            0
        } else {
            self.label_ends[sample - 1]
        };
        &self.label_text[start..self.label_ends[sample]]
    }
}

/// A ChaCha8 stream keyed by `(seed, epoch, index, stream)`: portable and independent of call order.
fn keyed_rng(seed: u64, epoch: usize, index: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (chunk, word) in key
        .chunks_exact_mut(8)
        .zip([seed, epoch as u64, index, stream])
    {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// The sample order of one epoch: a Fisher-Yates shuffle keyed by `(seed, epoch)`.
fn epoch_order(seed: u64, epoch: usize, len: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut keyed_rng(seed, epoch, 0, STREAM_SHUFFLE));
    order
}

/// [`to_chw`](crate::preprocess::to_chw) with [`Normalization::OPENAI`] into a caller's `[3, H, W]` slice,
/// with the same float32 arithmetic, so that a worker writes its sample straight into the batch.
fn write_chw(img: &RgbImage, out: &mut [f32]) {
    let norm = Normalization::OPENAI;
    let plane = img.width() as usize * img.height() as usize;
    for (i, px) in img.pixels().enumerate() {
        for (c, &value) in px.0.iter().enumerate() {
            out[c * plane + i] = (f32::from(value) / 255.0 - norm.mean[c]) / norm.std[c];
        }
    }
}

/// Everything a producer thread needs to turn sample indices into a batch.
struct Pipeline {
    corpus: Corpus,
    height: u32,
    width: u32,
    augment: Option<RandAugment>,
    shuffle: bool,
    seed: u64,
    workers: usize,
    batch_size: usize,
    prefetch_batches: usize,
    /// Samples whose image failed to load, each counted once however often it is visited.
    failures: Mutex<HashSet<usize>>,
}

/// Where a batch stream starts and whether it wraps into further epochs.
#[derive(Debug, Clone, Copy)]
enum Plan {
    Endless { epoch: usize, position: usize },
    SinglePass,
}

impl Pipeline {
    fn new(
        corpus: Corpus,
        image_size: [usize; 2],
        batch_size: usize,
        workers: usize,
        prefetch_batches: usize,
    ) -> Result<Self, DataError> {
        let [height, width] = image_size;
        let invalid = || DataError::Image {
            key: "image_size".to_owned(),
            error: ImageError::InvalidSize {
                width: u32::try_from(width).unwrap_or(u32::MAX),
                height: u32::try_from(height).unwrap_or(u32::MAX),
            },
        };
        let height = u32::try_from(height)
            .ok()
            .filter(|&h| h > 0)
            .ok_or_else(invalid)?;
        let width = u32::try_from(width)
            .ok()
            .filter(|&w| w > 0)
            .ok_or_else(invalid)?;
        Ok(Self {
            corpus,
            height,
            width,
            augment: None,
            shuffle: false,
            seed: 0,
            workers: workers.max(1),
            batch_size: batch_size.max(1),
            prefetch_batches,
            failures: Mutex::new(HashSet::new()),
        })
    }

    fn skipped(&self) -> usize {
        let failed = self
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        self.corpus.unreadable_labels + failed
    }

    fn batches_per_epoch(&self) -> usize {
        self.corpus.len().div_ceil(self.batch_size)
    }

    fn datasets(&self) -> Vec<(String, usize)> {
        self.corpus
            .datasets
            .iter()
            .zip(&self.corpus.kept)
            .map(|(d, &n)| (d.name().to_owned(), n))
            .collect()
    }

    /// Decodes, augments, resizes and normalises one sample into `out` (`[3, H, W]`). A decoder panic is
    /// caught and reported as an image error, so one bad record cannot take the loader down.
    fn load_into(&self, sample: usize, epoch: usize, out: &mut [f32]) -> Result<(), DataError> {
        let (dataset_index, record) = self.corpus.records[sample];
        let dataset = &self.corpus.datasets[dataset_index];
        let run = || -> Result<(), DataError> {
            let bytes = dataset.image(record)?;
            let image = decode_rgb(&bytes).map_err(|source| DataError::Image {
                key: dataset.key(record),
                error: source,
            })?;
            let image = match &self.augment {
                Some(augment) => {
                    let mut rng = keyed_rng(self.seed, epoch, sample as u64, STREAM_AUGMENT);
                    augment.apply(&image, &mut rng)
                }
                None => image,
            };
            write_chw(&resize_bicubic(&image, self.width, self.height), out);
            Ok(())
        };
        catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|_| {
            Err(DataError::Image {
                key: dataset.key(record),
                error: ImageError::Decode {
                    reason: "the image pipeline panicked on this record".to_owned(),
                },
            })
        })
    }

    /// Loads `window` (sample indices) straight into the batch buffer on `workers` threads (this one and
    /// scoped helpers, all finished before it returns). Returns the batch in window order without the
    /// failed samples, and the last failure.
    fn build(
        &self,
        window: &[usize],
        epoch: usize,
        stop: &AtomicBool,
    ) -> (Vec<f32>, Vec<String>, Option<DataError>) {
        let plane = 3 * self.height as usize * self.width as usize;
        let mut images = vec![0f32; window.len() * plane];
        let mut results: Vec<Option<Result<(), DataError>>> = window.iter().map(|_| None).collect();
        let work = Mutex::new(
            images
                .chunks_mut(plane)
                .zip(results.iter_mut())
                .zip(window.iter()),
        );
        let run = || loop {
            let next = work.lock().unwrap_or_else(PoisonError::into_inner).next();
            let Some(((out, result), &sample)) = next else {
                break;
            };
            if stop.load(Ordering::Relaxed) {
                break;
            }
            *result = Some(self.load_into(sample, epoch, out));
        };
        std::thread::scope(|scope| {
            for i in 1..self.workers.min(window.len()) {
                // A helper that cannot be started only means less parallelism.
                let _ = std::thread::Builder::new()
                    .name(format!("clip4str-loader-{i}"))
                    .spawn_scoped(scope, run);
            }
            run();
        });
        let mut kept = 0;
        let mut labels = Vec::with_capacity(window.len());
        let mut last_error = None;
        for (slot, (result, &sample)) in results.into_iter().zip(window).enumerate() {
            match result {
                Some(Ok(())) => {
                    if kept != slot {
                        images.copy_within(slot * plane..(slot + 1) * plane, kept * plane);
                    }
                    kept += 1;
                    labels.push(self.corpus.label(sample).to_owned());
                }
                Some(Err(error)) => {
                    let first = self
                        .failures
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(sample);
                    if first {
                        tracing::warn!(%error, "skipping a record that does not load");
                    }
                    last_error = Some(error);
                }
                None => {}
            }
        }
        images.truncate(kept * plane);
        (images, labels, last_error)
    }

    /// The producer thread: builds batches in order and hands them over until the plan ends, the consumer
    /// hangs up, or `stop` is set. An endless plan gives up (with the last error) after a whole epoch's worth
    /// of consecutive samples failed, instead of spinning forever on unreadable data.
    fn produce(
        &self,
        plan: Plan,
        sender: SyncSender<Result<TrainBatch, DataError>>,
        stop: &AtomicBool,
    ) {
        let len = self.corpus.len();
        if len == 0 {
            return;
        }
        let (mut epoch, mut position, endless) = match plan {
            Plan::Endless { epoch, position } => (epoch, position, true),
            Plan::SinglePass => (0, 0, false),
        };
        let mut order: Option<(usize, Vec<usize>)> = None;
        let mut failed_run = 0usize;
        while !stop.load(Ordering::Relaxed) {
            if position >= len {
                if !endless {
                    return;
                }
                epoch += 1;
                position = 0;
            }
            let end = position.saturating_add(self.batch_size).min(len);
            let window: Vec<usize> = if self.shuffle {
                if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    order = Some((epoch, epoch_order(self.seed, epoch, len)));
                }
                order
                    .as_ref()
                    .map(|(_, o)| o[position..end].to_vec())
                    .unwrap_or_default()
            } else {
                (position..end).collect()
            };
            let (images, labels, last_error) = self.build(&window, epoch, stop);
            if stop.load(Ordering::Relaxed) {
                return;
            }
            position = end;
            if labels.is_empty() {
                failed_run += window.len();
                if endless && failed_run >= len {
                    if let Some(error) = last_error {
                        let _ = sender.send(Err(error));
                    }
                    return;
                }
                continue;
            }
            failed_run = 0;
            let batch = TrainBatch {
                images,
                labels,
                epoch,
                position,
            };
            if sender.send(Ok(batch)).is_err() {
                return;
            }
        }
    }
}

/// Starts a producer thread over `pipeline` and returns the consuming end.
fn spawn_batches(pipeline: &Arc<Pipeline>, plan: Plan) -> Batches {
    let (sender, receiver) = sync_channel(pipeline.prefetch_batches);
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let pipeline = Arc::clone(pipeline);
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("clip4str-loader".to_owned())
            .spawn(move || pipeline.produce(plan, sender, &stop))
    };
    match producer {
        Ok(handle) => Batches {
            receiver: Some(receiver),
            stop,
            producer: Some(handle),
        },
        Err(source) => {
            // No thread: hand out the spawn failure once, then end.
            let (sender, receiver) = sync_channel(1);
            let _ = sender.send(Err(DataError::Io {
                path: PathBuf::from("<loader thread>"),
                error: source,
            }));
            Batches {
                receiver: Some(receiver),
                stop,
                producer: None,
            }
        }
    }
}

/// A running stream of batches, prepared by background threads. Dropping it stops and joins them.
pub struct Batches {
    receiver: Option<Receiver<Result<TrainBatch, DataError>>>,
    stop: Arc<AtomicBool>,
    producer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Batches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batches")
            .field("running", &self.producer.is_some())
            .finish()
    }
}

impl Iterator for Batches {
    type Item = Result<TrainBatch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.receiver.as_ref()?.recv().ok()
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Hanging up unblocks a producer waiting to send; the stop flag ends a batch in progress.
        self.receiver.take();
        if let Some(producer) = self.producer.take() {
            let _ = producer.join();
        }
    }
}

/// The training data: concatenated datasets, filtered with the training charset, shuffled per epoch,
/// augmented and normalised on worker threads.
pub struct TrainLoader {
    pipeline: Arc<Pipeline>,
}

impl std::fmt::Debug for TrainLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainLoader")
            .field("len", &self.len())
            .field("datasets", &self.datasets())
            .finish()
    }
}

impl TrainLoader {
    /// Opens every dataset under the roots and filters all labels (reads every label once). Fails when a
    /// root holds no dataset or a dataset cannot be opened; unreadable single labels are only counted.
    pub fn new(cfg: TrainLoaderConfig) -> Result<Self, DataError> {
        let corpus = Corpus::open(
            &cfg.roots,
            &cfg.repeats,
            &cfg.charset_train,
            cfg.max_label_length,
        )?;
        let mut pipeline = Pipeline::new(
            corpus,
            cfg.image_size,
            cfg.batch_size,
            cfg.workers,
            cfg.prefetch_batches,
        )?;
        pipeline.augment = cfg.augment.then(RandAugment::default);
        pipeline.shuffle = true;
        pipeline.seed = cfg.seed;
        Ok(Self {
            pipeline: Arc::new(pipeline),
        })
    }

    /// Samples per epoch after label filtering (the reference's `len(dataset)`).
    pub fn len(&self) -> usize {
        self.pipeline.corpus.len()
    }

    /// Whether no sample survived filtering.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batches per epoch, counting the last partial one.
    pub fn batches_per_epoch(&self) -> usize {
        self.pipeline.batches_per_epoch()
    }

    /// Each dataset's report name and its number of samples after filtering, in concatenation order.
    pub fn datasets(&self) -> Vec<(String, usize)> {
        self.pipeline.datasets()
    }

    /// Records skipped so far: unreadable labels found when opening, plus distinct records whose image
    /// failed to load in any iteration.
    pub fn skipped(&self) -> usize {
        self.pipeline.skipped()
    }

    /// Endless batches starting at sample `position` of `epoch` (a position at or past the end starts the
    /// next epoch), continuing through later epochs until dropped. Yields an error only when a whole epoch's
    /// worth of consecutive records failed to load, then ends; an empty loader yields nothing.
    pub fn iter_from(&self, epoch: usize, position: usize) -> Batches {
        spawn_batches(&self.pipeline, Plan::Endless { epoch, position })
    }
}

/// Validation data: concatenated datasets in storage order, filtered with the test charset, not augmented.
pub struct ValLoader {
    pipeline: Arc<Pipeline>,
}

impl std::fmt::Debug for ValLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValLoader")
            .field("len", &self.len())
            .field("datasets", &self.datasets())
            .finish()
    }
}

impl ValLoader {
    /// Opens every dataset under the roots and filters the labels with `charset_test`.
    pub fn new(cfg: ValLoaderConfig) -> Result<Self, DataError> {
        let corpus = Corpus::open(&cfg.roots, &[], &cfg.charset_test, cfg.max_label_length)?;
        let pipeline = Pipeline::new(
            corpus,
            cfg.image_size,
            cfg.batch_size,
            cfg.workers,
            cfg.prefetch_batches,
        )?;
        Ok(Self {
            pipeline: Arc::new(pipeline),
        })
    }

    /// Samples after label filtering.
    pub fn len(&self) -> usize {
        self.pipeline.corpus.len()
    }

    /// Whether no sample survived filtering.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each dataset's report name and its number of samples after filtering.
    pub fn datasets(&self) -> Vec<(String, usize)> {
        self.pipeline.datasets()
    }

    /// Records skipped so far (unreadable labels, distinct images that failed to load).
    pub fn skipped(&self) -> usize {
        self.pipeline.skipped()
    }

    /// One pass over all samples in order (epoch 0); failed records are left out of their batch.
    pub fn batches(&self) -> Batches {
        spawn_batches(&self.pipeline, Plan::SinglePass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::charset::CHARSET_36;
    use crate::data::test_util::TempDir;
    use crate::data::{LmdbWriter, LABELS_FILE};
    use crate::preprocess::to_chw;

    const SIZE: [usize; 2] = [8, 16];
    const PLANE: usize = 3 * 8 * 16;

    fn fixture(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/images")
            .join(name);
        std::fs::read(path).expect("fixture exists")
    }

    const IMAGES: [&str; 5] = [
        "synth_gradient_53x37.png",
        "synth_gray192_40x20.png",
        "synth_noise_100x32.png",
        "synth_red_40x20.png",
        "synth_text_L_140x40.png",
    ];

    /// An LMDB of 12 records: 10 usable, one whose label is filtered out, one corrupt image.
    fn write_lmdb(dir: &Path) {
        let mut writer = LmdbWriter::create(dir).expect("create");
        for i in 0..10 {
            let label = format!("Word {i}");
            writer
                .push(&fixture(IMAGES[i % IMAGES.len()]), &label)
                .expect("push");
        }
        writer
            .push(&fixture(IMAGES[0]), "\u{4e2d}\u{6587}")
            .expect("push");
        writer.push(b"not an image", "Broken").expect("push");
        writer.finish().expect("finish");
    }

    /// A labels.tsv folder: case and punctuation kept by the training charset, one over-long label.
    fn write_folder(dir: &Path) {
        std::fs::create_dir_all(dir).expect("mkdir");
        let mut tsv = String::new();
        for (i, name) in IMAGES.iter().enumerate() {
            std::fs::write(dir.join(name), fixture(name)).expect("write");
            tsv.push_str(&format!("{name}\tCaf\u{e9}-{i}!\n"));
        }
        tsv.push_str(&format!("{}\t{}\n", IMAGES[0], "x".repeat(26)));
        std::fs::write(dir.join(LABELS_FILE), tsv).expect("write");
    }

    fn config(roots: Vec<PathBuf>) -> TrainLoaderConfig {
        TrainLoaderConfig {
            roots,
            image_size: SIZE,
            batch_size: 4,
            seed: 7,
            workers: 2,
            ..TrainLoaderConfig::default()
        }
    }

    fn collect(batches: &mut Batches, count: usize) -> Vec<TrainBatch> {
        (0..count)
            .map(|_| batches.next().expect("endless").expect("batch"))
            .collect()
    }

    #[test]
    fn discovery_ignores_the_test_preference() {
        let tmp = TempDir::new("train-discover");
        write_lmdb(&tmp.path().join("real/lmdb"));
        write_folder(&tmp.path().join("folder"));
        write_lmdb(&tmp.path().join("test/ignored-by-eval-only"));
        let found = discover_train_datasets(tmp.path()).expect("discover");
        let names: Vec<_> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["folder", "real/lmdb", "test/ignored-by-eval-only"]);
        let single = discover_train_datasets(tmp.path().join("folder/labels.tsv")).expect("file");
        assert_eq!(single.len(), 1);
        let empty = TempDir::new("train-empty");
        let err = TrainLoader::new(config(vec![empty.path().to_owned()])).expect_err("no data");
        assert!(matches!(err, DataError::NotADataset { .. }));
    }

    #[test]
    fn repeats_oversample_a_root_within_each_epoch() {
        let tmp = TempDir::new("train-repeat");
        let (lmdb, folder) = (tmp.path().join("lmdb"), tmp.path().join("folder"));
        write_lmdb(&lmdb);
        write_folder(&folder);
        let epoch_labels = |roots: Vec<PathBuf>, repeats: Vec<usize>| {
            let mut cfg = config(roots);
            cfg.repeats = repeats;
            let loader = TrainLoader::new(cfg).expect("loader");
            let mut batches = loader.iter_from(0, 0);
            let mut labels: Vec<String> = Vec::new();
            loop {
                let batch = batches.next().expect("endless").expect("batch");
                if batch.epoch > 0 {
                    break;
                }
                labels.extend(batch.labels);
            }
            labels.sort();
            (loader.datasets(), labels)
        };
        let (datasets, mixed) = epoch_labels(vec![lmdb.clone(), folder.clone()], vec![1, 3]);
        assert_eq!(
            datasets,
            [("lmdb".to_owned(), 11), ("folder".to_owned(), 15)]
        );
        // One epoch = the LMDB once and the folder three times, nothing else.
        let (_, mut expected) = epoch_labels(vec![lmdb], vec![]);
        let (_, folder_once) = epoch_labels(vec![folder], vec![]);
        for _ in 0..3 {
            expected.extend(folder_once.iter().cloned());
        }
        expected.sort();
        assert_eq!(mixed, expected);
    }

    #[test]
    fn batches_have_model_shapes_and_training_labels() {
        let tmp = TempDir::new("train-shapes");
        write_lmdb(&tmp.path().join("lmdb"));
        write_folder(&tmp.path().join("folder"));
        let loader = TrainLoader::new(config(vec![tmp.path().to_owned()])).expect("loader");
        // 5 folder samples (one too long) + 11 LMDB samples (one all-CJK label dropped, one corrupt image).
        assert_eq!(loader.len(), 16);
        assert_eq!(loader.batches_per_epoch(), 4);
        assert_eq!(
            loader.datasets(),
            [("folder".to_owned(), 5), ("lmdb".to_owned(), 11)]
        );
        let mut batches = loader.iter_from(0, 0);
        let epoch0 = collect(&mut batches, 4);
        let mut labels = Vec::new();
        for (k, batch) in epoch0.iter().enumerate() {
            assert_eq!(batch.epoch, 0);
            assert_eq!(batch.position, 4 * (k + 1));
            assert_eq!(batch.images.len(), batch.labels.len() * PLANE);
            assert!(batch.images.iter().all(|v| v.is_finite() && v.abs() < 3.0));
            labels.extend(batch.labels.iter().cloned());
        }
        // The corrupt record is left out of its batch and counted once.
        assert_eq!(labels.len(), 15);
        assert_eq!(loader.skipped(), 1);
        labels.sort();
        let mut expected: Vec<String> = (0..5).map(|i| format!("Cafe-{i}!")).collect();
        expected.extend((0..10).map(|i| format!("Word{i}")));
        expected.sort();
        assert_eq!(
            labels, expected,
            "training charset keeps case and punctuation"
        );
        // The next epoch follows on its own.
        let next = batches.next().expect("endless").expect("batch");
        assert_eq!((next.epoch, next.position), (1, 4));
        drop(batches);
        assert_eq!(loader.skipped(), 1, "a bad record is counted once");
    }

    #[test]
    fn last_batch_is_partial() {
        let tmp = TempDir::new("train-partial");
        write_folder(&tmp.path().join("folder"));
        let loader = TrainLoader::new(TrainLoaderConfig {
            batch_size: 3,
            augment: false,
            ..config(vec![tmp.path().to_owned()])
        })
        .expect("loader");
        assert_eq!((loader.len(), loader.batches_per_epoch()), (5, 2));
        let batches = collect(&mut loader.iter_from(0, 0), 3);
        let sizes: Vec<_> = batches
            .iter()
            .map(|b| (b.epoch, b.position, b.labels.len()))
            .collect();
        assert_eq!(sizes, [(0, 3, 3), (0, 5, 2), (1, 3, 3)]);
    }

    #[test]
    fn shuffling_is_per_epoch_and_seeded() {
        let tmp = TempDir::new("train-shuffle");
        write_lmdb(&tmp.path().join("lmdb"));
        let labels_of = |seed: u64, workers: usize| {
            let loader = TrainLoader::new(TrainLoaderConfig {
                seed,
                workers,
                ..config(vec![tmp.path().to_owned()])
            })
            .expect("loader");
            let batches = collect(&mut loader.iter_from(0, 0), 6);
            let epochs: Vec<Vec<String>> = [0, 1]
                .iter()
                .map(|&e| {
                    batches
                        .iter()
                        .filter(|b| b.epoch == e)
                        .flat_map(|b| b.labels.iter().cloned())
                        .collect()
                })
                .collect();
            (epochs, batches)
        };
        let (a, batches_a) = labels_of(7, 2);
        let (b, batches_b) = labels_of(7, 1);
        assert_eq!(a, b, "same seed, same order, whatever the worker count");
        assert_eq!(
            batches_a, batches_b,
            "augmentation too is keyed, not scheduled"
        );
        assert_ne!(a[0], a[1], "each epoch has its own order");
        let (c, _) = labels_of(8, 2);
        assert_ne!(a[0], c[0], "the seed changes the order");
        let mut sorted = a[0].clone();
        sorted.sort();
        let mut other = a[1].clone();
        other.sort();
        assert_eq!(sorted, other, "every sample once per epoch");
    }

    #[test]
    fn resuming_gives_the_same_batches() {
        let tmp = TempDir::new("train-resume");
        write_lmdb(&tmp.path().join("lmdb"));
        write_folder(&tmp.path().join("folder"));
        let loader = TrainLoader::new(config(vec![tmp.path().to_owned()])).expect("loader");
        let full = collect(&mut loader.iter_from(0, 0), 9);
        // Resume after batch 5 (epoch 1, position 4).
        assert_eq!((full[4].epoch, full[4].position), (1, 4));
        let resumed = collect(&mut loader.iter_from(1, 4), 4);
        assert_eq!(resumed[..], full[5..9]);
        // Resuming at the end of an epoch starts the next one.
        let at_end = collect(&mut loader.iter_from(0, 16), 1);
        assert_eq!(at_end[0], full[4]);
        // An unaligned position gives windows from there.
        let odd = collect(&mut loader.iter_from(0, 2), 1);
        assert_eq!((odd[0].epoch, odd[0].position), (0, 6));
    }

    #[test]
    fn unreadable_data_ends_with_an_error_not_a_hang() {
        let tmp = TempDir::new("train-broken");
        let mut writer = LmdbWriter::create(tmp.path().join("bad")).expect("create");
        for i in 0..5 {
            writer
                .push(b"\x89PNG broken", &format!("w{i}"))
                .expect("push");
        }
        writer.finish().expect("finish");
        let loader = TrainLoader::new(config(vec![tmp.path().to_owned()])).expect("loader");
        let mut batches = loader.iter_from(0, 0);
        assert!(matches!(batches.next(), Some(Err(DataError::Image { .. }))));
        assert!(batches.next().is_none());
        assert_eq!(loader.skipped(), 5);
    }

    #[test]
    fn dropping_the_stream_stops_the_workers() {
        let tmp = TempDir::new("train-drop");
        write_folder(&tmp.path().join("folder"));
        let loader = TrainLoader::new(TrainLoaderConfig {
            batch_size: 2,
            prefetch_batches: 1,
            ..config(vec![tmp.path().to_owned()])
        })
        .expect("loader");
        for _ in 0..3 {
            let mut batches = loader.iter_from(0, 0);
            assert!(batches.next().is_some());
            // The producer is blocked on a full channel here; drop must wake and join it.
            drop(batches);
        }
        // Never consumed at all.
        drop(loader.iter_from(3, 1));
        // Still usable afterwards.
        assert!(loader.iter_from(0, 0).next().is_some());
    }

    #[test]
    fn validation_is_ordered_unaugmented_and_uses_the_test_charset() {
        let tmp = TempDir::new("val");
        write_folder(&tmp.path().join("folder"));
        let loader = ValLoader::new(ValLoaderConfig {
            roots: vec![tmp.path().to_owned()],
            charset_test: CHARSET_36.to_owned(),
            max_label_length: 25,
            image_size: SIZE,
            batch_size: 2,
            workers: 2,
            prefetch_batches: 1,
        })
        .expect("loader");
        assert_eq!(loader.len(), 5);
        let batches: Vec<TrainBatch> = loader.batches().map(|b| b.expect("batch")).collect();
        let labels: Vec<&str> = batches
            .iter()
            .flat_map(|b| b.labels.iter().map(String::as_str))
            .collect();
        assert_eq!(labels, ["cafe0", "cafe1", "cafe2", "cafe3", "cafe4"]);
        let positions: Vec<_> = batches.iter().map(|b| (b.epoch, b.position)).collect();
        assert_eq!(positions, [(0, 2), (0, 4), (0, 5)]);
        let image = decode_rgb(&fixture(IMAGES[0])).expect("decode");
        let expected = to_chw(&resize_bicubic(&image, 16, 8), &Normalization::OPENAI);
        assert_eq!(batches[0].images[..PLANE], expected[..]);
        assert_eq!(loader.skipped(), 0);
    }

    #[test]
    fn zero_image_size_is_refused() {
        let tmp = TempDir::new("train-size");
        write_folder(&tmp.path().join("folder"));
        let err = TrainLoader::new(TrainLoaderConfig {
            image_size: [0, 16],
            ..config(vec![tmp.path().to_owned()])
        })
        .expect_err("invalid");
        assert!(matches!(
            err,
            DataError::Image {
                error: ImageError::InvalidSize { .. },
                ..
            }
        ));
    }
}
