//! Dynamic micro-batching: images of concurrent requests wait in one bounded queue, and dedicated worker threads
//! (not tokio's: the model is CPU-bound and would stall the runtime) take up to `max_batch` of them at a time,
//! waiting at most `max_wait` after the oldest arrived for the batch to fill.
//!
//! Every recognizer decodes with `per_sample_stop`, so an image's answer does not depend on the other images in
//! its batch. Requests with different read options may share a queue pull; they are split into one model call
//! per option set, since the options change the captions the model reads back.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clip4str::recognizer::{Prediction, Recognizer, RecognizerOptions};
use image::RgbImage;
use tokio::sync::oneshot;

use super::metrics::Metrics;

/// The per-request options of `POST /v1/read`, with the meaning of `clip4str read --cased/--punctuation`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReadOptions {
    /// Keep upper case: the test charset gains A-Z and the output is filtered by it.
    pub cased: bool,
    /// Keep punctuation: the test charset gains punctuation and the output is filtered by it.
    pub punctuation: bool,
}

impl ReadOptions {
    /// All option sets, in [`Self::index`] order.
    const ALL: [Self; 4] = [
        Self::new(false, false),
        Self::new(false, true),
        Self::new(true, false),
        Self::new(true, true),
    ];

    const fn new(cased: bool, punctuation: bool) -> Self {
        Self { cased, punctuation }
    }

    /// Position in [`Self::ALL`], which is also the position of its recognizer.
    fn index(self) -> usize {
        usize::from(self.cased) * 2 + usize::from(self.punctuation)
    }

    /// The recognizer options `clip4str read` builds for these flags, plus batch-independent decoding.
    fn recognizer_options(self, base: &Recognizer, max_batch: usize) -> RecognizerOptions {
        RecognizerOptions {
            batch_size: max_batch,
            per_sample_stop: true,
            normalization: Some(base.normalization()),
            precision: base.options().precision,
            ..crate::output::case_options(self.cased, self.punctuation)
        }
    }
}

/// What a worker sends back for one image.
#[derive(Debug)]
pub struct Recognized {
    /// The model's answer.
    pub prediction: Prediction,
    /// Time from entering the queue to the start of its model call.
    pub queued: Duration,
    /// Wall time of the model call it was part of.
    pub inference: Duration,
    /// Images in that model call.
    pub batch_size: usize,
}

/// A worker's reply: the recognition, or why the model failed (an internal error, never the client's).
pub type Reply = Result<Recognized, String>;

/// One preprocessed image waiting for the model.
#[derive(Debug)]
pub struct Job {
    /// The normalised `[3, H, W]` input from [`Batcher::preprocess`].
    pub input: Vec<f32>,
    /// How to read it.
    pub options: ReadOptions,
    /// Where the answer goes; a closed channel means the request has ended and the job is skipped.
    pub reply: oneshot::Sender<Reply>,
    enqueued: Instant,
}

impl Job {
    /// A job for `input`, and the receiver of its reply.
    pub fn new(input: Vec<f32>, options: ReadOptions) -> (Self, oneshot::Receiver<Reply>) {
        let (reply, receiver) = oneshot::channel();
        let job = Self {
            input,
            options,
            reply,
            enqueued: Instant::now(),
        };
        (job, receiver)
    }
}

/// Why [`Batcher::submit`] refused a request's images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue has no room for them now; the client should retry later.
    Full,
    /// More images than the queue can ever hold.
    TooMany {
        /// The queue capacity.
        capacity: usize,
    },
    /// The server is shutting down.
    Closed,
}

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most images per model call.
    pub max_batch: usize,
    /// Longest time the oldest queued image waits for its batch to fill.
    pub max_wait: Duration,
    /// Most images waiting at once.
    pub queue: usize,
    /// Worker threads, each running its own model calls.
    pub workers: usize,
}

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when jobs arrive or the queue closes.
    wakeup: Condvar,
    limits: BatchLimits,
    /// One recognizer per [`ReadOptions`], all sharing the same weights.
    recognizers: Vec<Recognizer>,
    metrics: Arc<Metrics>,
}

/// The queue and its worker threads.
pub struct Batcher {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Batcher {
    /// Starts `limits.workers` threads reading with `base`'s weights (cloning a recognizer shares its tensors).
    pub fn start(
        base: &Recognizer,
        limits: BatchLimits,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let recognizers = ReadOptions::ALL
            .iter()
            .map(|o| {
                Recognizer::from_model(
                    base.model().clone(),
                    o.recognizer_options(base, limits.max_batch),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::with_capacity(limits.queue),
                closed: false,
            }),
            wakeup: Condvar::new(),
            limits,
            recognizers,
            metrics,
        });
        let workers = (0..limits.workers)
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("clip4str-model-{i}"))
                    .spawn(move || shared.work())
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            shared,
            workers: Mutex::new(workers),
        })
    }

    /// The test transform of the loaded model (the same for every option set).
    pub fn preprocess(&self, image: &RgbImage) -> Vec<f32> {
        self.shared.recognizers[0].preprocess(image)
    }

    /// Queues all of a request's images, or none of them.
    pub fn submit(&self, jobs: Vec<Job>) -> Result<(), Refused> {
        let capacity = self.shared.limits.queue;
        if jobs.len() > capacity {
            return Err(Refused::TooMany { capacity });
        }
        let mut queue = self.shared.lock();
        if queue.closed {
            return Err(Refused::Closed);
        }
        if queue.jobs.len() + jobs.len() > capacity {
            return Err(Refused::Full);
        }
        queue.jobs.extend(jobs);
        self.shared.metrics.set_queue_depth(queue.jobs.len());
        drop(queue);
        self.shared.wakeup.notify_all();
        Ok(())
    }

    /// Lets the workers finish what is queued, then stops and joins them.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.wakeup.notify_all();
        let workers =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(PoisonError::into_inner));
        for worker in workers {
            if worker.join().is_err() {
                tracing::error!("a model worker panicked");
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A worker's life: take batches until the queue is closed and empty.
    fn work(&self) {
        while let Some(batch) = self.next_batch() {
            self.run(batch);
        }
    }

    /// Waits for a batch: `max_batch` images, or fewer once the oldest has waited `max_wait` (or at shutdown).
    fn next_batch(&self) -> Option<Vec<Job>> {
        let mut queue = self.lock();
        loop {
            match queue.jobs.front() {
                None if queue.closed => return None,
                None => {
                    queue = self
                        .wakeup
                        .wait(queue)
                        .unwrap_or_else(PoisonError::into_inner)
                }
                Some(oldest) => {
                    let deadline = oldest.enqueued + self.limits.max_wait;
                    let now = Instant::now();
                    if queue.jobs.len() >= self.limits.max_batch || now >= deadline || queue.closed
                    {
                        break;
                    }
                    queue = self
                        .wakeup
                        .wait_timeout(queue, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
        let n = queue.jobs.len().min(self.limits.max_batch);
        let batch: Vec<Job> = queue.jobs.drain(..n).collect();
        self.metrics.set_queue_depth(queue.jobs.len());
        Some(batch)
    }

    /// Runs one model call per option set present in `batch` and answers every job.
    fn run(&self, batch: Vec<Job>) {
        let (live, gone): (Vec<Job>, Vec<Job>) =
            batch.into_iter().partition(|job| !job.reply.is_closed());
        if !gone.is_empty() {
            self.metrics.record_cancelled(gone.len());
        }
        let mut groups: [Vec<Job>; 4] = Default::default();
        for job in live {
            groups[job.options.index()].push(job);
        }
        for (index, jobs) in groups.into_iter().enumerate() {
            if !jobs.is_empty() {
                self.run_group(&self.recognizers[index], jobs);
            }
        }
    }

    /// One model call over jobs with the same options.
    fn run_group(&self, recognizer: &Recognizer, jobs: Vec<Job>) {
        let started = Instant::now();
        let (inputs, waiting): (Vec<Vec<f32>>, Vec<_>) = jobs
            .into_iter()
            .map(|job| (job.input, (job.reply, job.enqueued)))
            .unzip();
        let _span = tracing::debug_span!("model_batch", images = inputs.len()).entered();
        // A panic in the model must not take the worker (and with it the server) down: it becomes a 500.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            recognizer
                .batch_tensor(&inputs)
                .and_then(|batch| recognizer.recognize_batch(&batch))
        }));
        let inference = started.elapsed();
        let predictions = match outcome {
            Ok(Ok(p)) if p.len() == inputs.len() => Ok(p),
            Ok(Ok(p)) => Err(format!(
                "the model returned {} predictions for {} images",
                p.len(),
                inputs.len()
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the model panicked".to_owned()),
        };
        let batch_size = inputs.len();
        self.metrics.record_batch(batch_size, inference);
        match predictions {
            Ok(predictions) => {
                for ((reply, enqueued), prediction) in waiting.into_iter().zip(predictions) {
                    let recognized = Recognized {
                        prediction,
                        queued: started.saturating_duration_since(enqueued),
                        inference,
                        batch_size,
                    };
                    // The request may have ended meanwhile; nobody is left to tell.
                    let _ = reply.send(Ok(recognized));
                }
            }
            Err(reason) => {
                tracing::error!(images = batch_size, "model call failed: {reason}");
                for (reply, _) in waiting {
                    let _ = reply.send(Err(reason.clone()));
                }
            }
        }
    }
}
