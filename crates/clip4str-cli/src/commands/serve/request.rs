//! Turning a `POST /v1/read` request into encoded images and read options. Three body shapes are accepted:
//! a raw image (any content type but the two below), `multipart/form-data` with one or more files, and
//! `application/json` `{"images": [base64, ..], "cased": bool, "punctuation": bool}`. Options may also come
//! from the query string. Everything a client can get wrong becomes an [`ApiError`] naming the problem.

use std::convert::Infallible;

use axum::body::Bytes;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;

use super::batcher::ReadOptions;
use super::error::{ApiError, FileRef};

/// One still-encoded image of a request.
#[derive(Debug)]
pub struct Upload {
    /// How errors and results refer to it (file name, field name, `images[i]` or `body`).
    pub name: String,
    /// The encoded image, or why the request could not carry it (bad base64): a problem of this image alone,
    /// answered in its place while the others are read.
    pub bytes: Result<Bytes, ApiError>,
}

/// The read options of a request as they are gathered from the query string and the body; an option given
/// twice with different values is refused rather than silently resolved.
#[derive(Debug, Default)]
pub struct OptionSet {
    cased: Option<bool>,
    punctuation: Option<bool>,
    min_confidence: Option<f32>,
}

/// Every option a request may set, for messages.
const OPTIONS: &str = "cased, punctuation, min_confidence";

impl OptionSet {
    /// Sets option `name` from a textual value (`true/false`, `1/0`, `yes/no`, `on/off`; empty means true; a
    /// number from 0 to 1 for `min_confidence`).
    pub fn set_text(&mut self, name: &str, value: &str) -> Result<(), ApiError> {
        Self::check_name(name)?;
        if name == "min_confidence" {
            return self
                .set_min_confidence(value.trim().parse::<f32>().ok(), &format!("{value:?}"));
        }
        let parsed = match value.trim().to_ascii_lowercase().as_str() {
            "" | "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => {
                return Err(ApiError::bad_request(
                    "bad_option",
                    format!("option `{name}` must be true or false, not {value:?}"),
                ))
            }
        };
        self.set(name, parsed)
    }

    fn check_name(name: &str) -> Result<(), ApiError> {
        match name {
            "cased" | "punctuation" | "min_confidence" => Ok(()),
            _ => Err(ApiError::bad_request(
                "unknown_option",
                format!("unknown option `{name}` (known: {OPTIONS})"),
            )),
        }
    }

    /// Sets option `name` from a JSON value (a boolean, or a string as in [`Self::set_text`]; a number for
    /// `min_confidence`).
    fn set_json(&mut self, name: &str, value: &serde_json::Value) -> Result<(), ApiError> {
        Self::check_name(name)?;
        if name == "min_confidence" {
            return match value {
                serde_json::Value::String(s) => self.set_text(name, s),
                other => {
                    self.set_min_confidence(other.as_f64().map(|x| x as f32), &other.to_string())
                }
            };
        }
        match value {
            serde_json::Value::Bool(b) => self.set(name, *b),
            serde_json::Value::String(s) => self.set_text(name, s),
            other => Err(ApiError::bad_request(
                "bad_option",
                format!("option `{name}` must be true or false, not {other}"),
            )),
        }
    }

    fn set(&mut self, name: &str, value: bool) -> Result<(), ApiError> {
        let slot = match name {
            "cased" => &mut self.cased,
            "punctuation" => &mut self.punctuation,
            _ => {
                return Err(ApiError::bad_request(
                    "unknown_option",
                    format!("unknown option `{name}` (known: {OPTIONS})"),
                ))
            }
        };
        match *slot {
            Some(previous) if previous != value => Err(ApiError::bad_request(
                "conflicting_option",
                format!("option `{name}` is given both as {previous} and as {value}"),
            )),
            _ => {
                *slot = Some(value);
                Ok(())
            }
        }
    }

    /// `value` is the parsed threshold, if it parsed; `shown` is what the client sent, for the message.
    fn set_min_confidence(&mut self, value: Option<f32>, shown: &str) -> Result<(), ApiError> {
        let Some(value) = value.filter(|x| (0.0..=1.0).contains(x)) else {
            return Err(ApiError::bad_request(
                "bad_option",
                format!("option `min_confidence` must be a number from 0 to 1, not {shown}"),
            ));
        };
        match self.min_confidence {
            Some(previous) if previous != value => Err(ApiError::bad_request(
                "conflicting_option",
                format!("option `min_confidence` is given both as {previous} and as {value}"),
            )),
            _ => {
                self.min_confidence = Some(value);
                Ok(())
            }
        }
    }

    /// The threshold below which results are marked `"low_confidence": true`, like `read --min-confidence`.
    pub fn min_confidence(&self) -> Option<f32> {
        self.min_confidence
    }

    /// The options, unset ones false (the defaults of `clip4str read`).
    pub fn finish(&self) -> ReadOptions {
        ReadOptions {
            cased: self.cased.unwrap_or(false),
            punctuation: self.punctuation.unwrap_or(false),
        }
    }
}

/// Reads options from a URL query string such as `cased=true&punctuation=0`.
pub fn parse_query(query: Option<&str>, options: &mut OptionSet) -> Result<(), ApiError> {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(());
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(|e| {
        ApiError::bad_request("bad_query", format!("cannot parse the query string: {e}"))
    })?;
    for (name, value) in pairs {
        options.set_text(&name, &value)?;
    }
    Ok(())
}

/// The body shapes we accept, from the `Content-Type` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyKind {
    /// `multipart/form-data` with its boundary.
    Multipart(String),
    /// `application/json` (or any `+json` type).
    Json,
    /// Anything else: the body is the image.
    Raw,
}

impl BodyKind {
    /// Classifies a request by its `Content-Type`; a multipart type without a usable boundary is an error.
    pub fn from_content_type(content_type: Option<&str>) -> Result<Self, ApiError> {
        let Some(content_type) = content_type else {
            return Ok(Self::Raw);
        };
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence == "multipart/form-data" {
            let boundary = multer::parse_boundary(content_type).map_err(|e| {
                ApiError::bad_request("bad_multipart", format!("bad multipart content type: {e}"))
            })?;
            Ok(Self::Multipart(boundary))
        } else if essence == "application/json" || essence.ends_with("+json") {
            Ok(Self::Json)
        } else {
            Ok(Self::Raw)
        }
    }
}

/// Splits a whole request body into its images, adding any options it carries to `options`.
pub async fn parse_body(
    kind: BodyKind,
    body: Bytes,
    options: &mut OptionSet,
) -> Result<Vec<Upload>, ApiError> {
    let uploads = match kind {
        BodyKind::Raw => {
            if body.is_empty() {
                return Err(ApiError::bad_request(
                    "empty_body",
                    "the request body is empty: send an image, a multipart form or JSON {\"images\": [..]}",
                ));
            }
            vec![Upload {
                name: "body".to_owned(),
                bytes: Ok(body),
            }]
        }
        BodyKind::Json => parse_json(&body, options)?,
        BodyKind::Multipart(boundary) => parse_multipart(body, boundary, options).await?,
    };
    if uploads.is_empty() {
        return Err(ApiError::bad_request(
            "no_images",
            "the request holds no image",
        ));
    }
    Ok(uploads)
}

/// Standard base64, padded or not (browsers pad, some clients do not).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn parse_json(body: &[u8], options: &mut OptionSet) -> Result<Vec<Upload>, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("bad_json", format!("the body is not valid JSON: {e}"))
    })?;
    let serde_json::Value::Object(fields) = value else {
        return Err(ApiError::bad_request(
            "bad_json",
            "the JSON body must be an object {\"images\": [base64, ..]}",
        ));
    };
    let mut images = None;
    for (name, value) in &fields {
        match name.as_str() {
            "images" => images = Some(value),
            "cased" | "punctuation" | "min_confidence" => options.set_json(name, value)?,
            _ => {
                return Err(ApiError::bad_request(
                    "bad_json",
                    format!("unknown field `{name}` (known: images, {OPTIONS})"),
                ))
            }
        }
    }
    let Some(serde_json::Value::Array(images)) = images else {
        return Err(ApiError::bad_request(
            "bad_json",
            "the JSON body needs `images`: an array of base64 strings",
        ));
    };
    Ok(images
        .iter()
        .enumerate()
        .map(|(index, image)| {
            let name = format!("images[{index}]");
            let file = FileRef {
                index,
                name: name.clone(),
            };
            let bytes = match image {
                serde_json::Value::String(text) => {
                    decode_base64(text).map(Bytes::from).map_err(|e| {
                        ApiError::bad_request("bad_base64", format!("invalid base64: {e}"))
                            .for_file(file)
                    })
                }
                _ => Err(
                    ApiError::bad_request("bad_json", "expected a base64 string").for_file(file),
                ),
            };
            Upload { name, bytes }
        })
        .collect())
}

/// Decodes base64, also from a `data:<type>;base64,` URL (what a browser's `FileReader` gives) and with line
/// breaks (MIME-wrapped base64).
fn decode_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let payload = match text.strip_prefix("data:") {
        Some(url) => url.split_once(";base64,").map_or(url, |(_, data)| data),
        None => text,
    };
    if payload.bytes().any(|b| b.is_ascii_whitespace()) {
        let compact: String = payload
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        BASE64.decode(compact)
    } else {
        BASE64.decode(payload)
    }
}

/// Every part is an image except text fields named like an option (`cased`, `punctuation`, `min_confidence`).
async fn parse_multipart(
    body: Bytes,
    boundary: String,
    options: &mut OptionSet,
) -> Result<Vec<Upload>, ApiError> {
    let stream = futures_util::stream::iter([Ok::<Bytes, Infallible>(body)]);
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut uploads = Vec::new();
    let bad = |e: multer::Error| {
        ApiError::bad_request("bad_multipart", format!("bad multipart body: {e}"))
    };
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        let name = field.name().map(str::to_owned);
        let file_name = field.file_name().map(str::to_owned);
        if let (None, Some(option @ ("cased" | "punctuation" | "min_confidence"))) =
            (&file_name, name.as_deref())
        {
            let option = option.to_owned();
            let value = field.text().await.map_err(bad)?;
            options.set_text(&option, &value)?;
            continue;
        }
        let index = uploads.len();
        let display = file_name
            .or(name)
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("part {index}"));
        let bytes = field.bytes().await.map_err(|e| {
            bad(e).for_file(FileRef {
                index,
                name: display.clone(),
            })
        })?;
        uploads.push(Upload {
            name: display,
            bytes: Ok(bytes),
        });
    }
    Ok(uploads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_conflict() {
        let mut o = OptionSet::default();
        parse_query(Some("cased=true&punctuation=0"), &mut o).expect("valid query");
        assert_eq!(
            o.finish(),
            ReadOptions {
                cased: true,
                punctuation: false
            }
        );
        assert_eq!(o.set_text("cased", "1").map_err(|e| e.kind).err(), None);
        assert_eq!(
            o.set_text("cased", "no").map_err(|e| e.kind).err(),
            Some("conflicting_option")
        );
        assert_eq!(
            o.set_text("cased", "maybe").map_err(|e| e.kind).err(),
            Some("bad_option")
        );
        parse_query(Some("min_confidence=0.25"), &mut o).expect("a threshold");
        assert_eq!(o.min_confidence(), Some(0.25));
        assert!(o
            .set_json("min_confidence", &serde_json::json!(0.25))
            .is_ok());
        // A boolean is a bad value, not an unknown option.
        assert_eq!(
            o.set_json("min_confidence", &serde_json::json!(true))
                .map_err(|e| e.kind)
                .err(),
            Some("bad_option")
        );
        for (value, kind) in [
            ("0.5", "conflicting_option"),
            ("1.5", "bad_option"),
            ("x", "bad_option"),
        ] {
            assert_eq!(
                o.set_text("min_confidence", value)
                    .map_err(|e| e.kind)
                    .err(),
                Some(kind),
                "{value}"
            );
        }
        assert_eq!(
            o.set_text("colour", "1").map_err(|e| e.kind).err(),
            Some("unknown_option")
        );
    }

    #[test]
    fn content_types() {
        assert_eq!(BodyKind::from_content_type(None).ok(), Some(BodyKind::Raw));
        assert_eq!(
            BodyKind::from_content_type(Some("Application/JSON; charset=utf-8")).ok(),
            Some(BodyKind::Json)
        );
        assert_eq!(
            BodyKind::from_content_type(Some("multipart/form-data; boundary=xyz")).ok(),
            Some(BodyKind::Multipart("xyz".into()))
        );
        assert_eq!(
            BodyKind::from_content_type(Some("multipart/form-data"))
                .map_err(|e| e.kind)
                .err(),
            Some("bad_multipart")
        );
        assert_eq!(
            BodyKind::from_content_type(Some("image/png")).ok(),
            Some(BodyKind::Raw)
        );
    }

    #[test]
    fn base64_forms() {
        assert_eq!(decode_base64("aGk=").ok(), Some(b"hi".to_vec()));
        assert_eq!(decode_base64("aGk").ok(), Some(b"hi".to_vec()));
        assert_eq!(
            decode_base64("data:image/png;base64,aG\nk=").ok(),
            Some(b"hi".to_vec())
        );
        assert!(decode_base64("not base64!").is_err());
    }

    #[test]
    fn json_bodies() {
        let mut o = OptionSet::default();
        let uploads = parse_json(br#"{"images": ["aGk="], "punctuation": "yes"}"#, &mut o)
            .expect("valid body");
        assert_eq!(uploads.len(), 1);
        assert_eq!(uploads[0].name, "images[0]");
        assert!(o.finish().punctuation);
        // A bad item is that image's problem; the others are still there to read.
        let uploads = parse_json(
            br#"{"images": ["aGk=", "%%", 7]}"#,
            &mut OptionSet::default(),
        )
        .expect("a body with bad items");
        assert_eq!(uploads.len(), 3);
        assert_eq!(uploads[0].bytes.as_deref().ok(), Some(&b"hi"[..]));
        let err = uploads[1].bytes.as_ref().expect_err("bad base64");
        assert_eq!(err.kind, "bad_base64");
        assert_eq!(err.file.as_ref().map(|f| f.index), Some(1));
        let err = uploads[2].bytes.as_ref().expect_err("not a string");
        assert_eq!(err.kind, "bad_json");
        let err = parse_json(br#"{"image": []}"#, &mut OptionSet::default()).expect_err("typo");
        assert_eq!(err.kind, "bad_json");
        let err = parse_json(b"[1]", &mut OptionSet::default()).expect_err("not an object");
        assert_eq!(err.kind, "bad_json");
    }
}
