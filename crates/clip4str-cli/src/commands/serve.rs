//! `clip4str serve`: an HTTP server that reads word crops. Requests are decoded on tokio's blocking pool,
//! batched across clients by [`batcher`] and answered as JSON by [`api`]; a small web page is served at `/`.
//!
//! Startup prints `listening on http://ADDR` on stdout (so `--addr 127.0.0.1:0` can be used by scripts and
//! tests), then loads the model while `/healthz` already answers; `/readyz` turns 200 once it is loaded.
//! SIGTERM or Ctrl-C stops accepting connections, lets in-flight requests finish, then exits 0.

mod api;
mod batcher;
mod error;
mod metrics;
mod request;

use std::future::IntoFuture;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use clip4str::recognizer::RecognizerOptions;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify, Semaphore};

use crate::model_source::{load_recognizer, ModelArgs};
use api::{AppState, RequestLimits};
use batcher::{BatchLimits, Batcher};
use metrics::Metrics;

/// How long, beyond the request timeout, shutdown waits for open connections before closing them.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(5);

/// Arguments of `clip4str serve` (the global `--threads` sets the model's thread count).
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on; port 0 picks a free port (the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Most images per model call; concurrent requests are grouped up to this size.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Longest time (ms) the oldest waiting image waits for its batch to fill.
    #[arg(long, default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Model worker threads, each running its own batches (they share the weights and the `--threads` pool).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Largest request body in bytes (larger ones get 413).
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Largest image in pixels, checked from its header before decoding (larger ones get 413).
    #[arg(long, default_value_t = super::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Longest a read request may take in ms, body upload included (then 503 with `"kind": "timeout"`).
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// Most images waiting for the model; when full, requests get 503 with `Retry-After`.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
}

impl ServeArgs {
    fn validate(&self) -> anyhow::Result<()> {
        for (name, value) in [
            ("--max-batch", self.max_batch as u64),
            ("--workers", self.workers as u64),
            ("--max-body-bytes", self.max_body_bytes as u64),
            ("--max-pixels", self.max_pixels),
            ("--timeout-ms", self.timeout_ms),
            ("--queue", self.queue as u64),
        ] {
            if value == 0 {
                anyhow::bail!("{name} must be at least 1");
            }
        }
        Ok(())
    }
}

/// Runs the server until SIGTERM or Ctrl-C.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    args.validate()?;
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("clip4str-http")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

/// Logs go to stderr; `RUST_LOG` filters them (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Another subscriber may already be installed (e.g. by an embedding program); keep it then.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let listener = TcpListener::bind(&args.addr)
        .await
        .with_context(|| format!("listening on {}", args.addr))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let metrics = Arc::new(Metrics::default());
    let decoders = std::thread::available_parallelism().map_or(1, usize::from);
    let state = Arc::new(AppState {
        limits: RequestLimits {
            max_body_bytes: args.max_body_bytes,
            max_pixels: args.max_pixels,
            timeout: Duration::from_millis(args.timeout_ms),
        },
        batcher: OnceLock::new(),
        model_name: args.model.label(),
        metrics: Arc::clone(&metrics),
        decode_permits: Arc::new(Semaphore::new(decoders)),
    });
    println!("listening on http://{addr}");
    // Scripts wait for this line; stdout may be a pipe, which would otherwise hold it back.
    std::io::stdout().flush().context("writing to stdout")?;
    tracing::info!(%addr, "listening");

    let timeout_ms = args.timeout_ms;
    let (load_failed, load_failure) = oneshot::channel::<anyhow::Error>();
    let loader_state = Arc::clone(&state);
    let limits = BatchLimits {
        max_batch: args.max_batch,
        max_wait: Duration::from_millis(args.max_wait_ms),
        queue: args.queue,
        workers: args.workers,
    };
    tokio::task::spawn_blocking(move || {
        let loaded = load_batcher(&args.model, limits, metrics);
        match loaded {
            Ok(batcher) => {
                let _ = loader_state.batcher.set(Arc::new(batcher));
                tracing::info!(model = loader_state.model_name, "ready");
            }
            Err(e) => {
                let _ = load_failed.send(e);
            }
        }
    });

    // A failed model load ends the server like a signal does, and becomes its error.
    let load_error = Arc::new(Mutex::new(None));
    let shutdown_started = Arc::new(Notify::new());
    let shutdown = {
        let load_error = Arc::clone(&load_error);
        let shutdown_started = Arc::clone(&shutdown_started);
        async move {
            tokio::select! {
                () = termination() => {
                    tracing::info!("shutting down: finishing in-flight requests");
                }
                Ok(error) = load_failure => {
                    *load_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
                }
            }
            shutdown_started.notify_one();
        }
    };
    let server = axum::serve(listener, api::router(Arc::clone(&state)))
        .with_graceful_shutdown(shutdown)
        .into_future();
    // In-flight reads end within their timeout; a connection that stays open longer (a client that stalls
    // mid-request) must not keep the process alive forever.
    let grace = Duration::from_millis(timeout_ms) + SHUTDOWN_SLACK;
    tokio::select! {
        served = server => served.context("serving HTTP")?,
        () = async {
            shutdown_started.notified().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(
                "connections still open {:.1} s after the shutdown signal; closing them",
                grace.as_secs_f64()
            );
        }
    }

    if let Some(batcher) = state.batcher.get().cloned() {
        tokio::task::spawn_blocking(move || batcher.close())
            .await
            .context("stopping the model workers")?;
    }
    if let Some(error) = load_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    {
        return Err(error);
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Loads the model and starts the batch workers.
fn load_batcher(
    model: &ModelArgs,
    limits: BatchLimits,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Batcher> {
    let recognizer = load_recognizer(
        model,
        RecognizerOptions {
            batch_size: limits.max_batch,
            per_sample_stop: true,
            ..Default::default()
        },
    )?;
    Batcher::start(&recognizer, limits, metrics)
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
async fn termination() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
