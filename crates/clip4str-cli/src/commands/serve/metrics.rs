//! The server's counters and histograms, rendered in the Prometheus text exposition format (version 0.0.4) for
//! `GET /metrics`. Written by hand: a handful of series do not justify a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Upper bounds (seconds) of the request and inference latency buckets.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds (images) of the model batch size buckets.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A cumulative histogram with fixed bucket bounds, like a Prometheus client's.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistogramState>,
}

#[derive(Debug, Default)]
struct HistogramState {
    /// Observations per bucket (not cumulative; one more than `bounds` for `+Inf`).
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            state: Mutex::new(HistogramState {
                counts: vec![0; bounds.len() + 1],
                sum: 0.0,
            }),
        }
    }

    fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.counts[bucket] += 1;
        state.sum += value;
    }

    /// Appends the `_bucket`, `_sum` and `_count` lines of `name`.
    fn render(&self, out: &mut String, name: &str) {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&state.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += state.counts[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", state.sum);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Everything `/metrics` reports. Shared by the HTTP handlers and the batch workers.
#[derive(Debug)]
pub struct Metrics {
    /// Finished HTTP requests by (endpoint, status code).
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Error responses by error kind (the `kind` of the JSON error).
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Wall time of `POST /v1/read` requests, seconds.
    read_seconds: Histogram,
    /// Images per model call.
    batch_size: Histogram,
    /// Wall time of one model call, seconds.
    inference_seconds: Histogram,
    /// Images waiting for a worker right now.
    queue_depth: AtomicUsize,
    /// Images read by the model.
    images: AtomicU64,
    /// Queued images dropped because their request had already ended (timeout, disconnect).
    cancelled: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            errors: Mutex::default(),
            read_seconds: Histogram::new(SECONDS_BUCKETS),
            batch_size: Histogram::new(BATCH_BUCKETS),
            inference_seconds: Histogram::new(SECONDS_BUCKETS),
            queue_depth: AtomicUsize::new(0),
            images: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts one finished request; `endpoint` must come from a fixed set (never the raw path, which a client
    /// controls and would make the series unbounded).
    pub fn record_request(
        &self,
        endpoint: &'static str,
        status: u16,
        elapsed: Duration,
        error_kinds: &[&'static str],
    ) {
        *self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((endpoint, status))
            .or_default() += 1;
        if !error_kinds.is_empty() {
            let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
            for kind in error_kinds {
                *errors.entry(*kind).or_default() += 1;
            }
        }
        if endpoint == "/v1/read" {
            self.read_seconds.observe(elapsed.as_secs_f64());
        }
    }

    /// Counts one model call over `images` images that took `elapsed`.
    pub fn record_batch(&self, images: usize, elapsed: Duration) {
        self.batch_size.observe(images as f64);
        self.inference_seconds.observe(elapsed.as_secs_f64());
        self.images.fetch_add(images as u64, Ordering::Relaxed);
    }

    /// Counts queued images whose request went away before a worker reached them.
    pub fn record_cancelled(&self, images: usize) {
        self.cancelled.fetch_add(images as u64, Ordering::Relaxed);
    }

    /// Sets the number of images waiting for a worker.
    pub fn set_queue_depth(&self, depth: usize) {
        self.queue_depth.store(depth, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP clip4str_http_requests_total HTTP requests answered, by endpoint and status.\n",
        );
        out.push_str("# TYPE clip4str_http_requests_total counter\n");
        for ((endpoint, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "clip4str_http_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP clip4str_errors_total Errors by kind: error responses, and each bad image of a request.\n");
        out.push_str("# TYPE clip4str_errors_total counter\n");
        for (kind, n) in self
            .errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(out, "clip4str_errors_total{{kind=\"{kind}\"}} {n}");
        }
        out.push_str(
            "# HELP clip4str_read_duration_seconds Wall time of POST /v1/read requests.\n",
        );
        out.push_str("# TYPE clip4str_read_duration_seconds histogram\n");
        self.read_seconds
            .render(&mut out, "clip4str_read_duration_seconds");
        out.push_str("# HELP clip4str_batch_size Images per model call.\n");
        out.push_str("# TYPE clip4str_batch_size histogram\n");
        self.batch_size.render(&mut out, "clip4str_batch_size");
        out.push_str("# HELP clip4str_inference_duration_seconds Wall time of one model call.\n");
        out.push_str("# TYPE clip4str_inference_duration_seconds histogram\n");
        self.inference_seconds
            .render(&mut out, "clip4str_inference_duration_seconds");
        out.push_str("# HELP clip4str_queue_depth Images waiting for a model worker.\n");
        out.push_str("# TYPE clip4str_queue_depth gauge\n");
        let _ = writeln!(
            out,
            "clip4str_queue_depth {}",
            self.queue_depth.load(Ordering::Relaxed)
        );
        out.push_str("# HELP clip4str_images_total Images read by the model.\n");
        out.push_str("# TYPE clip4str_images_total counter\n");
        let _ = writeln!(
            out,
            "clip4str_images_total {}",
            self.images.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP clip4str_cancelled_images_total Queued images dropped because their request had ended.\n",
        );
        out.push_str("# TYPE clip4str_cancelled_images_total counter\n");
        let _ = writeln!(
            out,
            "clip4str_cancelled_images_total {}",
            self.cancelled.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x");
        assert_eq!(
            out,
            "x_bucket{le=\"1\"} 2\nx_bucket{le=\"2\"} 3\nx_bucket{le=\"+Inf\"} 4\nx_sum 6\nx_count 4\n"
        );
    }

    #[test]
    fn requests_and_errors_are_labelled() {
        let m = Metrics::default();
        m.record_request("/v1/read", 200, Duration::from_millis(3), &[]);
        m.record_request(
            "/v1/read",
            400,
            Duration::from_millis(1),
            &["corrupt_image"],
        );
        m.record_request(
            "/v1/read",
            207,
            Duration::from_millis(1),
            &["corrupt_image", "bad_base64"],
        );
        m.record_request("/healthz", 200, Duration::ZERO, &[]);
        let text = m.render();
        assert!(
            text.contains("clip4str_http_requests_total{endpoint=\"/v1/read\",status=\"200\"} 1\n")
        );
        assert!(text.contains("clip4str_errors_total{kind=\"corrupt_image\"} 2\n"));
        assert!(text.contains("clip4str_errors_total{kind=\"bad_base64\"} 1\n"));
        assert!(text.contains("clip4str_read_duration_seconds_count 3\n"));
    }
}
