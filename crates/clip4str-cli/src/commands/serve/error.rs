//! The one error shape of the HTTP API: `{"error": {"kind": "...", "message": "...", "file": {..}}}` with a
//! fitting 4xx/5xx status. `kind` is a stable machine-readable word (also the label of
//! `clip4str_errors_total`); `message` is for people and names the offending file of a batch.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use clip4str::preprocess::ImageError;

/// Which image of a request an error is about.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileRef {
    /// Position among the request's images, from 0.
    pub index: usize,
    /// The multipart file name (or field name), `images[i]` for JSON, `body` for a raw body.
    pub name: String,
}

/// Marks an error response with its kind so that the metrics middleware can count it.
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind(pub &'static str);

/// Marks a response with the kinds of its bad images (a partly served request, or one with no readable
/// image), so that the metrics count each.
#[derive(Debug, Clone)]
pub struct ImageErrors(pub Vec<&'static str>);

/// An error answer of the API.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable kind, e.g. `truncated_image`.
    pub kind: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// The image it is about, in a request with images.
    pub file: Option<FileRef>,
    /// Seconds after which a retry may succeed (sent as `Retry-After`).
    pub retry_after_s: Option<u32>,
    /// Each image's failure, when the error is that none of several images could be read (boxed: errors
    /// travel in every `Result` of the request parsing).
    pub per_image: Option<Box<PerImage>>,
}

/// The images of a request that failed one by one.
#[derive(Debug)]
pub struct PerImage {
    /// One error entry per image, as in a partly served request's `results`.
    pub results: Vec<serde_json::Value>,
    /// Their kinds, for the metrics.
    pub kinds: Vec<&'static str>,
}

impl ApiError {
    /// An error without file or retry hint.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            file: None,
            retry_after_s: None,
            per_image: None,
        }
    }

    /// A 400 Bad Request.
    pub fn bad_request(kind: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, kind, message)
    }

    /// A 500: the server's fault, not the client's.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// A 503 that tells the client when to try again.
    pub fn unavailable(kind: &'static str, message: impl Into<String>, retry_after_s: u32) -> Self {
        Self {
            retry_after_s: Some(retry_after_s),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, kind, message)
        }
    }

    /// Attaches the image the error is about and prefixes the message with its name.
    pub fn for_file(mut self, file: FileRef) -> Self {
        self.message = format!("{} (image {}): {}", file.name, file.index, self.message);
        self.file = Some(file);
        self
    }

    /// Why an uploaded image cannot be read, with the status that fits each cause.
    pub fn from_image(error: &ImageError, file: FileRef) -> Self {
        let (status, kind) = match error {
            ImageError::Empty => (StatusCode::BAD_REQUEST, "empty_image"),
            ImageError::Truncated => (StatusCode::BAD_REQUEST, "truncated_image"),
            ImageError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "image_too_large"),
            ImageError::Unsupported { .. } => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_image")
            }
            ImageError::Decode { .. } | ImageError::InvalidSize { .. } => {
                (StatusCode::BAD_REQUEST, "corrupt_image")
            }
        };
        Self::new(status, kind, error.to_string()).for_file(file)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(kind = self.kind, "{}", self.message);
        } else {
            tracing::debug!(kind = self.kind, "{}", self.message);
        }
        let mut error = serde_json::json!({ "kind": self.kind, "message": self.message });
        if let Some(file) = &self.file {
            error["file"] = serde_json::json!(file);
        }
        let mut body = serde_json::json!({ "error": error });
        let mut image_errors = None;
        if let Some(per_image) = self.per_image {
            body["read"] = serde_json::json!(0);
            body["failed"] = serde_json::json!(per_image.results.len());
            body["results"] = serde_json::Value::Array(per_image.results);
            image_errors = Some(ImageErrors(per_image.kinds));
        }
        let body = body.to_string();
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if self.kind == "body_too_large" {
            // The rest of the body was not read: what follows on the connection is not a next request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(seconds) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response.extensions_mut().insert(ErrorKind(self.kind));
        if let Some(image_errors) = image_errors {
            response.extensions_mut().insert(image_errors);
        }
        response
    }
}
