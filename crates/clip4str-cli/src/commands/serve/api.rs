//! The HTTP endpoints: `POST /v1/read`, `GET /healthz`, `GET /readyz`, `GET /metrics` and the web page `GET /`.
//! Handlers only wait: image decoding runs on tokio's blocking pool (bounded by a semaphore) and the model on
//! the batcher's own threads, so the async workers stay free to accept and answer.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clip4str::preprocess::decode_rgb_limited;
use http_body_util::BodyExt;
use tokio::sync::Semaphore;

use super::batcher::{Batcher, Job, Recognized, Refused};
use super::error::{ApiError, ErrorKind, FileRef, ImageErrors, PerImage};
use super::metrics::Metrics;
use super::request::{parse_body, parse_query, BodyKind, OptionSet, Upload};

/// The web page: one file with its script and style, so the binary serves it offline.
const PAGE: &str = include_str!("page.html");

/// After an oversized body is refused, up to this many more bytes are read and dropped so that the client
/// (still sending) sees the 413 instead of a connection reset; beyond it the connection is simply closed.
const DRAIN_LIMIT: usize = 64 << 20;

/// Draining stops once the client has sent nothing for this long: a client that only announced a huge
/// `Content-Length` gets its 413 at once instead of when the request times out.
const DRAIN_IDLE: Duration = Duration::from_millis(200);

/// Per-request limits.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Largest accepted image, in pixels, checked from the header before decoding.
    pub max_pixels: u64,
    /// Longest a `POST /v1/read` may take, from its first body byte to its answer.
    pub timeout: Duration,
}

/// What every handler shares.
pub struct AppState {
    /// Request limits.
    pub limits: RequestLimits,
    /// The model's queue, set once the model is loaded (`/readyz` turns ready then).
    pub batcher: OnceLock<Arc<Batcher>>,
    /// Which model is served, for `/readyz`.
    pub model_name: String,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Bounds the images being decoded at once (each may take `max_pixels` worth of memory).
    pub decode_permits: Arc<Semaphore>,
}

/// All routes, with request counting and logging around them.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/read", post(read))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), track))
        .with_state(state)
}

/// The metrics label of a path: one of the routes, or `other` (never the raw path, which the client chooses).
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/" => "/",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        "/v1/read" => "/v1/read",
        _ => "other",
    }
}

/// Counts and logs every request.
async fn track(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let endpoint = endpoint_label(request.uri().path());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let kind = response.extensions().get::<ErrorKind>().map(|k| k.0);
    let mut kinds: Vec<&'static str> = kind.into_iter().collect();
    if let Some(images) = response.extensions().get::<ImageErrors>() {
        kinds.extend(&images.0);
    }
    app.metrics
        .record_request(endpoint, status, elapsed, &kinds);
    let ms = (elapsed.as_secs_f64() * 1e5).round() / 1e2;
    match kind {
        Some(error) => tracing::info!(%method, path, status, ms, error, "request"),
        None => tracing::info!(%method, path, status, ms, "request"),
    }
    response
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// Liveness: the process answers HTTP.
async fn healthz() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

/// Readiness: 200 once the model is loaded and its workers run, 503 before.
async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    if app.batcher.get().is_some() {
        json_response(
            StatusCode::OK,
            &serde_json::json!({ "status": "ready", "model": app.model_name }),
        )
    } else {
        let mut response = json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "status": "loading", "model": app.model_name }),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(1));
        response
    }
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

async fn not_found(uri: Uri, body: Body) -> ApiError {
    // Consume what the client sends so that it reads this answer rather than a reset (see `read_images`).
    drain(body).await;
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no endpoint at {}; the API is POST /v1/read (see GET / for a demo page)",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri, body: Body) -> ApiError {
    drain(body).await;
    let allowed = if uri.path() == "/v1/read" {
        "POST"
    } else {
        "GET"
    };
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}; use {allowed}", uri.path()),
    )
}

/// `POST /v1/read`: the whole request runs under the configured timeout; when it expires the request's queued
/// images are dropped by the workers (their reply channels close).
async fn read(
    State(app): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let timeout = app.limits.timeout;
    match tokio::time::timeout(timeout, read_images(&app, query, &headers, body, started)).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => error.into_response(),
        Err(_) => ApiError::unavailable(
            "timeout",
            format!(
                "the request took longer than the server's limit of {} ms",
                timeout.as_millis()
            ),
            1,
        )
        .into_response(),
    }
}

async fn read_images(
    app: &AppState,
    query: Option<String>,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<Response, ApiError> {
    // The body is read before anything can be refused: answering while the client is still sending makes
    // the connection unusable (the client sees a reset instead of our error, or loses its keep-alive).
    let body = read_body(body, headers, app.limits.max_body_bytes).await?;
    let Some(batcher) = app.batcher.get().cloned() else {
        return Err(ApiError::unavailable(
            "not_ready",
            "the model is still loading",
            1,
        ));
    };
    let mut options = OptionSet::default();
    parse_query(query.as_deref(), &mut options)?;
    let content_type = match headers.get(header::CONTENT_TYPE) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            ApiError::bad_request("bad_content_type", "the Content-Type header is not text")
        })?),
    };
    let kind = BodyKind::from_content_type(content_type)?;
    let uploads = parse_body(kind, body, &mut options).await?;
    let min_confidence = options.min_confidence();
    let options = options.finish();
    let received = started.elapsed();

    let decode_started = Instant::now();
    let names: Vec<String> = uploads.iter().map(|u| u.name.clone()).collect();
    let permit = Arc::clone(&app.decode_permits)
        .acquire_owned()
        .await
        .map_err(|_| ApiError::internal("the decoder pool is closed"))?;
    let max_pixels = app.limits.max_pixels;
    let decoder = Arc::clone(&batcher);
    let inputs = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        decode_all(&decoder, uploads, max_pixels)
    })
    .await
    .map_err(|_| ApiError::internal("image decoding failed unexpectedly"))?;
    let decoded = decode_started.elapsed();

    // Only the readable images go to the model; each bad one is answered in its place.
    let mut jobs = Vec::new();
    let mut pending = Vec::with_capacity(inputs.len());
    for input in inputs {
        pending.push(input.map(|input| {
            let (job, reply) = Job::new(input, options);
            jobs.push(job);
            reply
        }));
    }
    if pending.iter().all(Result::is_err) {
        return Err(none_readable(pending, &names));
    }
    let submitted = jobs.len();
    batcher.submit(jobs).map_err(|refused| match refused {
        Refused::Full => ApiError::unavailable(
            "queue_full",
            "the server is busy (its queue is full); retry shortly",
            1,
        ),
        Refused::TooMany { capacity } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_images",
            format!("the request holds {submitted} images, more than the queue's {capacity}"),
        ),
        Refused::Closed => ApiError::unavailable("shutting_down", "the server is shutting down", 1),
    })?;
    let mut results = Vec::with_capacity(pending.len());
    let mut image_errors = Vec::new();
    for (index, (reply, name)) in pending.into_iter().zip(&names).enumerate() {
        let file = FileRef {
            index,
            name: name.clone(),
        };
        let recognized = match reply {
            Ok(reply) => reply
                .await
                .map_err(|_| ApiError::internal("the model worker stopped"))?
                .map_err(|reason| {
                    ApiError::internal(format!("the model failed: {reason}")).for_file(file)
                }),
            Err(error) => Err(error),
        };
        let result = match recognized {
            Ok(recognized) => {
                let mut result = result_json(index, name, recognized);
                if let (Some(min), Some(confidence)) =
                    (min_confidence, result["confidence"].as_f64())
                {
                    result["low_confidence"] = serde_json::json!(confidence < f64::from(min));
                }
                result
            }
            Err(error) => {
                image_errors.push(error.kind);
                failed_json(index, name, &error)
            }
        };
        results.push(result);
    }
    let body = serde_json::json!({
        "results": results,
        "read": results.len() - image_errors.len(),
        "failed": image_errors.len(),
        "options": options,
        "timing_ms": {
            "receive": millis(received),
            "decode": millis(decoded),
            "total": millis(started.elapsed()),
        },
    });
    if image_errors.is_empty() {
        return Ok(json_response(StatusCode::OK, &body));
    }
    // 207 Multi-Status: the request was partly served; each entry of `results` has its own outcome.
    let mut response = json_response(StatusCode::MULTI_STATUS, &body);
    response.extensions_mut().insert(ImageErrors(image_errors));
    Ok(response)
}

/// A request none of whose images can be read. One image: its own error, as it always was. Several: a
/// `no_readable_image` error (with the images' common status, else 400) that lists each image's reason in
/// `results`, as a partly served request would.
fn none_readable<T>(pending: Vec<Result<T, ApiError>>, names: &[String]) -> ApiError {
    let mut errors: Vec<ApiError> = pending.into_iter().filter_map(Result::err).collect();
    if errors.len() == 1 {
        if let Some(error) = errors.pop() {
            return error;
        }
    }
    let status = match errors.first() {
        Some(first) if errors.iter().all(|e| e.status == first.status) => first.status,
        _ => StatusCode::BAD_REQUEST,
    };
    let results = errors
        .iter()
        .zip(names)
        .enumerate()
        .map(|(index, (error, name))| failed_json(index, name, error))
        .collect();
    ApiError {
        per_image: Some(Box::new(PerImage {
            results,
            kinds: errors.iter().map(|e| e.kind).collect(),
        })),
        ..ApiError::new(
            status,
            "no_readable_image",
            format!(
                "none of the request's {} images could be read (see `results` for each)",
                errors.len()
            ),
        )
    }
}

/// One image's failure, in the place its result would have taken.
fn failed_json(index: usize, name: &str, error: &ApiError) -> serde_json::Value {
    serde_json::json!({
        "index": index,
        "file": name,
        "error": { "kind": error.kind, "message": error.message, "status": error.status.as_u16() },
    })
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// One image's answer. `char_probs` has one probability per character of `raw`, plus the end-of-sequence one
/// last when `eos` is true.
fn result_json(index: usize, name: &str, r: Recognized) -> serde_json::Value {
    let eos = r.prediction.char_probs.len() > r.prediction.raw.chars().count();
    serde_json::json!({
        "index": index,
        "file": name,
        "text": r.prediction.text,
        "raw": r.prediction.raw,
        "confidence": r.prediction.confidence,
        "char_probs": r.prediction.char_probs,
        "eos": eos,
        "batch_size": r.batch_size,
        "timing_ms": { "queue": millis(r.queued), "inference": millis(r.inference) },
    })
}

/// Decodes and preprocesses a request's images (on a blocking thread); a bad image gives its own error.
fn decode_all(
    batcher: &Batcher,
    uploads: Vec<Upload>,
    max_pixels: u64,
) -> Vec<Result<Vec<f32>, ApiError>> {
    uploads
        .into_iter()
        .enumerate()
        .map(|(index, upload)| {
            let bytes = upload.bytes?;
            let image = decode_rgb_limited(&bytes, max_pixels).map_err(|e| {
                ApiError::from_image(
                    &e,
                    FileRef {
                        index,
                        name: upload.name.clone(),
                    },
                )
            })?;
            Ok(batcher.preprocess(&image))
        })
        .collect()
}

/// Reads the whole body, refusing more than `max` bytes with a 413 (before reading, when `Content-Length`
/// already says so).
async fn read_body(body: Body, headers: &HeaderMap, max: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than the server's limit of {max} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = body;
    if declared.is_some_and(|n| n > max as u64) {
        // A client that asked `Expect: 100-continue` waits for our verdict before sending: it gets the 413
        // at once and sends nothing. Any other client is already sending, so we read on (see `drain`).
        let waits = headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !waits {
            drain(body).await;
        }
        return Err(too_large());
    }
    let mut data = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::bad_request("body_read", format!("cannot read the request body: {e}"))
        })?;
        if let Ok(chunk) = frame.into_data() {
            if data.len() + chunk.len() > max {
                drain(body).await;
                return Err(too_large());
            }
            data.extend_from_slice(&chunk);
        }
    }
    Ok(Bytes::from(data))
}

/// Reads and drops the rest of a refused body while the client keeps sending, up to [`DRAIN_LIMIT`] bytes.
async fn drain(mut body: Body) {
    let mut dropped = 0usize;
    while dropped < DRAIN_LIMIT {
        match tokio::time::timeout(DRAIN_IDLE, body.frame()).await {
            Ok(Some(Ok(frame))) => dropped += frame.data_ref().map_or(0, |d| d.len()),
            // The end, a broken body, or a client that stopped sending.
            _ => break,
        }
    }
}
