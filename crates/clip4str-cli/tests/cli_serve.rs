//! End-to-end tests of `clip4str serve`: the real binary on a free port, with the bundled model or the tiny
//! test checkpoint. Each test starts its own server so that its limits can be set for the case at hand.

mod common;
mod serve_support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serve_support::*;

/// Relative float tolerance between a batched and a lone reading (matmul summation order may differ).
const REL_TOLERANCE: f64 = 1e-4;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= REL_TOLERANCE * a.abs().max(b.abs()) + 1e-9
}

/// Asserts that two answers for the same image agree: same text, raw text and EOS, close probabilities.
fn assert_same_reading(got: &serde_json::Value, want: &serde_json::Value, what: &str) {
    assert_eq!(got["text"], want["text"], "{what}: text");
    assert_eq!(got["raw"], want["raw"], "{what}: raw");
    let (g, w) = (
        got["confidence"].as_f64().expect("confidence"),
        want["confidence"].as_f64().expect("confidence"),
    );
    assert!(close(g, w), "{what}: confidence {g} vs {w}");
    let g = got["char_probs"].as_array().expect("char_probs");
    let w = want["char_probs"].as_array().expect("char_probs");
    assert_eq!(g.len(), w.len(), "{what}: char_probs length");
    for (a, b) in g.iter().zip(w) {
        let (a, b) = (a.as_f64().expect("prob"), b.as_f64().expect("prob"));
        assert!(close(a, b), "{what}: char prob {a} vs {b}");
    }
}

fn read_file(path: &PathBuf) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|p| {
            p.file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// One multipart request holding every path, each under its file name.
fn multipart_of(paths: &[PathBuf]) -> (String, Vec<u8>) {
    let data: Vec<Vec<u8>> = paths.iter().map(read_file).collect();
    let file_names = names(paths);
    let parts: Vec<Part> = data
        .iter()
        .zip(&file_names)
        .map(|(d, n)| Part {
            name: "image",
            file_name: Some(n),
            data: d,
        })
        .collect();
    multipart(&parts)
}

#[test]
fn every_endpoint_answers() {
    let server = Server::start(&[]);

    let health = get(&server.url("/healthz"));
    assert_eq!(
        (health.status, health.json()["status"].as_str()),
        (200, Some("ok"))
    );
    let ready = get(&server.url("/readyz"));
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["model"], "bundled clip4str-small");

    let page = get(&server.url("/"));
    assert_eq!(page.status, 200);
    assert!(
        page.content_type.starts_with("text/html"),
        "{}",
        page.content_type
    );
    assert!(page.body.contains("<input id=\"file\""));
    assert!(page.body.contains("/v1/read"));
    // Offline: no external script, style or font.
    assert!(!page.body.contains("https://") && !page.body.contains("http://"));

    let image = read_file(&example_images()[0]);
    let read = post(&server.url("/v1/read"), Some("image/png"), &image);
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(read.content_type, "application/json");
    let answer = read.json();
    let result = &answer["results"][0];
    assert_eq!(answer["results"].as_array().map(Vec::len), Some(1));
    assert_eq!(result["file"], "body");
    assert!(result["text"].is_string());
    let confidence = result["confidence"].as_f64().expect("confidence");
    assert!((0.0..=1.0).contains(&confidence));
    let probs = result["char_probs"].as_array().expect("char_probs");
    let chars = result["raw"].as_str().expect("raw").chars().count();
    assert_eq!(probs.len(), chars + usize::from(result["eos"] == true));
    for key in ["queue", "inference"] {
        assert!(result["timing_ms"][key].as_f64().is_some(), "timing {key}");
    }
    for key in ["receive", "decode", "total"] {
        assert!(answer["timing_ms"][key].as_f64().is_some(), "timing {key}");
    }
    assert_eq!(
        answer["options"],
        serde_json::json!({"cased": false, "punctuation": false})
    );

    // Wrong path and wrong methods are JSON errors too.
    let missing = get(&server.url("/v2/read"));
    assert_eq!(
        (missing.status, missing.error_kind().as_str()),
        (404, "not_found")
    );
    let wrong = get(&server.url("/v1/read"));
    assert_eq!(
        (wrong.status, wrong.error_kind().as_str()),
        (405, "method_not_allowed")
    );
    let wrong = request("DELETE", &server.url("/healthz"));
    assert_eq!(
        (wrong.status, wrong.error_kind().as_str()),
        (405, "method_not_allowed")
    );
    let wrong = post(&server.url("/metrics"), None, b"x");
    assert_eq!(wrong.status, 405);

    let metrics = get(&server.url("/metrics"));
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .content_type
        .starts_with("text/plain; version=0.0.4"));
    for line in [
        "clip4str_http_requests_total{endpoint=\"/v1/read\",status=\"200\"} 1",
        "clip4str_http_requests_total{endpoint=\"/v1/read\",status=\"405\"} 1",
        "clip4str_http_requests_total{endpoint=\"other\",status=\"404\"} 1",
        "clip4str_http_requests_total{endpoint=\"/healthz\",status=\"200\"} 1",
        "clip4str_errors_total{kind=\"method_not_allowed\"} 3",
        "clip4str_errors_total{kind=\"not_found\"} 1",
        "clip4str_batch_size_bucket{le=\"1\"} 1",
        "clip4str_batch_size_count 1",
        "clip4str_read_duration_seconds_count 2",
        "clip4str_inference_duration_seconds_count 1",
        "clip4str_queue_depth 0",
        "clip4str_images_total 1",
    ] {
        assert!(
            metrics.body.contains(line),
            "missing {line:?} in\n{}",
            metrics.body
        );
    }
}

/// The three body shapes give what `clip4str read` prints for the same images, with the bundled model.
#[test]
fn answers_match_cli_read() {
    let server = Server::start(&["--max-batch", "16"]);
    let paths = example_images();
    let cli = cli_read(&[], &paths);
    assert_eq!(cli.len(), paths.len());

    for (path, want) in paths.iter().zip(&cli) {
        let reply = post(&server.url("/v1/read"), None, &read_file(path));
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_same_reading(
            &reply.json()["results"][0],
            want,
            &path.display().to_string(),
        );
    }

    let (content_type, body) = multipart_of(&paths);
    let reply = post(&server.url("/v1/read"), Some(&content_type), &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let results = reply.json()["results"].clone();
    for ((result, want), name) in results
        .as_array()
        .expect("results")
        .iter()
        .zip(&cli)
        .zip(names(&paths))
    {
        assert_eq!(result["file"], name.as_str());
        assert_same_reading(result, want, &name);
    }

    let images: Vec<String> = paths.iter().map(|p| base64(&read_file(p))).collect();
    let reply = post_json(
        &server.url("/v1/read"),
        &serde_json::json!({ "images": images }),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    for (i, (result, want)) in reply.json()["results"]
        .as_array()
        .expect("results")
        .iter()
        .zip(&cli)
        .enumerate()
    {
        assert_eq!(result["file"], format!("images[{i}]"));
        assert_same_reading(result, want, &format!("images[{i}]"));
    }
}

/// `cased` and `punctuation` mean what they mean to `clip4str read`, from the query, JSON or a form field.
/// The tiny checkpoint reads punctuation and upper case, so the options change its answers.
#[test]
fn options_match_cli_read() {
    let model = tiny_model_args();
    let model_refs: Vec<&str> = model.iter().map(String::as_str).collect();
    let server = Server::start(&model_refs);
    let paths: Vec<PathBuf> = example_images()
        .into_iter()
        .chain(fixture_images())
        .collect();
    for (cased, punctuation) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut flags = model.clone();
        if cased {
            flags.push("--cased".into());
        }
        if punctuation {
            flags.push("--punctuation".into());
        }
        let cli = cli_read(&flags, &paths);
        let query = format!("/v1/read?cased={cased}&punctuation={punctuation}");
        let (content_type, body) = multipart_of(&paths);
        let reply = post(&server.url(&query), Some(&content_type), &body);
        assert_eq!(reply.status, 200, "{}", reply.body);
        let answer = reply.json();
        assert_eq!(answer["options"]["cased"], cased);
        assert_eq!(answer["options"]["punctuation"], punctuation);
        for (result, want) in answer["results"]
            .as_array()
            .expect("results")
            .iter()
            .zip(&cli)
        {
            assert_same_reading(result, want, &format!("{query} {}", want["path"]));
        }
        let images: Vec<String> = paths.iter().map(|p| base64(&read_file(p))).collect();
        let reply = post_json(
            &server.url("/v1/read"),
            &serde_json::json!({ "images": images, "cased": cased, "punctuation": punctuation }),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        for (result, want) in reply.json()["results"]
            .as_array()
            .expect("results")
            .iter()
            .zip(&cli)
        {
            assert_same_reading(
                result,
                want,
                &format!("JSON {cased} {punctuation} {}", want["path"]),
            );
        }
    }
    // Sanity: the options do change this model's answers (otherwise the test above proves little).
    let plain = cli_read(&model, &paths[..1]);
    let mut cased = model.clone();
    cased.push("--cased".into());
    assert_ne!(plain[0]["text"], cli_read(&cased, &paths[..1])[0]["text"]);
    let mut all = cased;
    all.push("--punctuation".into());

    // Options as multipart text fields.
    let image = read_file(&paths[0]);
    let (content_type, body) = multipart(&[
        Part {
            name: "cased",
            file_name: None,
            data: b"true",
        },
        Part {
            name: "punctuation",
            file_name: None,
            data: b"1",
        },
        Part {
            name: "image",
            file_name: Some("a.png"),
            data: &image,
        },
    ]);
    let reply = post(&server.url("/v1/read"), Some(&content_type), &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_same_reading(
        &reply.json()["results"][0],
        &cli_read(&all, &paths[..1])[0],
        "form fields",
    );

    // `min_confidence` marks results as `read --min-confidence` does, by query or JSON field; without it there is
    // no mark at all.
    let mut confidences: Vec<f64> = cli_read(&all, &paths)
        .iter()
        .map(|r| r["confidence"].as_f64().expect("confidence"))
        .collect();
    confidences.sort_by(f64::total_cmp);
    let min = (confidences[0] + confidences[confidences.len() - 1]) / 2.0;
    let mut flags = model.clone();
    flags.extend([
        "--min-confidence".to_string(),
        format!("{min}"),
        "--cased".into(),
        "--punctuation".into(),
    ]);
    let marked_by_cli = cli_read(&flags, &paths);
    let images: Vec<String> = paths.iter().map(|p| base64(&read_file(p))).collect();
    let reply = post_json(
        &server.url("/v1/read"),
        &serde_json::json!({ "images": images, "min_confidence": min, "cased": true, "punctuation": true }),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let answer = reply.json();
    let marks: Vec<bool> = answer["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["low_confidence"].as_bool().expect("a mark"))
        .collect();
    let cli_marks: Vec<bool> = marked_by_cli
        .iter()
        .map(|r| r["low_confidence"].as_bool().expect("a mark"))
        .collect();
    assert_eq!(marks, cli_marks);
    assert!(marks.contains(&true) && marks.contains(&false), "{marks:?}");
    let reply = post(
        &server.url(&format!("/v1/read?min_confidence={min}")),
        Some(&content_type),
        &body,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.json()["results"][0]["low_confidence"].is_boolean());
    let plain = post(&server.url("/v1/read"), Some(&content_type), &body).json();
    assert!(plain["results"][0].get("low_confidence").is_none());
    let bad = post(
        &server.url("/v1/read?min_confidence=2"),
        Some(&content_type),
        &body,
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
}

/// An image's answer does not depend on what else is in its model batch: alone, in one request with others,
/// and in concurrent requests that the server batches together. Uses the tiny checkpoint, whose predictions
/// end at different steps (what a batch-wide early stop would change).
#[test]
fn batching_does_not_change_answers() {
    let model = tiny_model_args();
    let mut args: Vec<&str> = model.iter().map(String::as_str).collect();
    args.extend(["--max-batch", "32", "--max-wait-ms", "300"]);
    let server = Server::start(&args);
    let paths: Vec<PathBuf> = example_images()
        .into_iter()
        .chain(fixture_images())
        .collect();
    let cli = cli_read(&model, &paths);

    // Alone: one request at a time (each waits out max-wait alone in its batch).
    let alone: Vec<serde_json::Value> = paths
        .iter()
        .map(|p| {
            let reply = post(&server.url("/v1/read"), None, &read_file(p));
            assert_eq!(reply.status, 200, "{}", reply.body);
            let result = reply.json()["results"][0].clone();
            assert_eq!(result["batch_size"], 1);
            result
        })
        .collect();
    for ((a, want), path) in alone.iter().zip(&cli).zip(&paths) {
        assert_same_reading(a, want, &format!("alone vs read: {}", path.display()));
    }
    let lengths: std::collections::BTreeSet<usize> = alone
        .iter()
        .map(|a| a["char_probs"].as_array().map_or(0, Vec::len))
        .collect();
    assert!(
        lengths.len() > 3,
        "the images should stop at different steps: {lengths:?}"
    );

    // One request with all of them: one model batch.
    let (content_type, body) = multipart_of(&paths);
    let reply = post(&server.url("/v1/read"), Some(&content_type), &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let together = reply.json()["results"].clone();
    for ((t, a), path) in together
        .as_array()
        .expect("results")
        .iter()
        .zip(&alone)
        .zip(&paths)
    {
        assert_eq!(t["batch_size"].as_u64(), Some(paths.len() as u64));
        assert_same_reading(t, a, &format!("one request vs alone: {}", path.display()));
    }

    // Concurrent single-image requests: batched across clients by the server.
    let url = server.url("/v1/read");
    let concurrent: Vec<serde_json::Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = paths
            .iter()
            .map(|p| {
                let (url, data) = (url.clone(), read_file(p));
                scope.spawn(move || post(&url, None, &data))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let reply = h.join().expect("client thread");
                assert_eq!(reply.status, 200, "{}", reply.body);
                reply.json()["results"][0].clone()
            })
            .collect()
    });
    let largest = concurrent
        .iter()
        .filter_map(|c| c["batch_size"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(
        largest > 1,
        "concurrent requests were never batched together"
    );
    for ((c, a), path) in concurrent.iter().zip(&alone).zip(&paths) {
        assert_same_reading(c, a, &format!("concurrent vs alone: {}", path.display()));
    }
}

/// Every kind of bad input gets a 4xx JSON error that names the problem (and the file), and the server keeps
/// serving afterwards.
#[test]
fn bad_input_gets_json_errors() {
    let max_body = 200_000;
    let server = Server::start(&["--max-body-bytes", &max_body.to_string()]);
    let url = server.url("/v1/read");
    let png = read_file(&example_images()[0]);
    let check = |reply: Reply, status: u16, kind: &str| -> serde_json::Value {
        assert_eq!(reply.status, status, "{kind}: {}", reply.body);
        assert_eq!(reply.content_type, "application/json", "{kind}");
        let json = reply.json();
        assert_eq!(json["error"]["kind"], kind, "{}", reply.body);
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{kind}: no message"
        );
        json
    };

    check(post(&url, None, b""), 400, "empty_body");
    check(
        post(&url, Some("image/png"), &png[..png.len() / 2]),
        400,
        "truncated_image",
    );
    let random: Vec<u8> = (0u32..4096)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    check(
        post(&url, Some("application/octet-stream"), &random),
        415,
        "unsupported_image",
    );
    let text = check(
        post(&url, Some("text/plain"), b"hello, world"),
        415,
        "unsupported_image",
    );
    assert_eq!(text["error"]["file"]["name"], "body");
    // A PNG whose header claims 100000 x 100000 pixels is refused before any decoding.
    let bomb = check(
        post(&url, Some("image/png"), &png_bomb(100_000, 100_000)),
        413,
        "image_too_large",
    );
    assert!(bomb["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("100000x100000")));
    // A corrupt PNG (valid header, garbage data).
    check(post(&url, None, &png_bomb(20, 10)), 400, "corrupt_image");
    // Over the body limit, announced by Content-Length...
    check(
        post(&url, None, &vec![0u8; max_body + 1]),
        413,
        "body_too_large",
    );
    // ...or only discovered while reading a chunked body.
    let mut chunked = b"POST /v1/read HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..5 {
        chunked.extend_from_slice(format!("{:x}\r\n", 65_536).as_bytes());
        chunked.extend_from_slice(&[7u8; 65_536]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(&server.addr, &chunked);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"body_too_large\""), "{answer}");
    // A Content-Length far over the limit with (almost) nothing sent: refused from the header at once. It used
    // to wait for the body until the request timeout and answer 503.
    let mut stream = std::net::TcpStream::connect(&server.addr).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("set timeout");
    std::io::Write::write_all(
        &mut stream,
        b"POST /v1/read HTTP/1.1\r\nHost: test\r\nContent-Length: 100000000000\r\n\r\n0123456789",
    )
    .expect("send");
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stream, &mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "after {:?}: {answer}",
        started.elapsed()
    );
    assert!(answer.contains("\"body_too_large\""), "{answer}");

    // JSON bodies.
    let good = base64(&png);
    let bad = check(
        post_json(
            &url,
            &serde_json::json!({ "images": ["not base64 at all!"] }),
        ),
        400,
        "bad_base64",
    );
    assert_eq!(
        bad["error"]["file"],
        serde_json::json!({ "index": 0, "name": "images[0]" })
    );
    check(
        post(&url, Some("application/json"), b"{\"images\": [\"abc\""),
        400,
        "bad_json",
    );
    check(
        post_json(&url, &serde_json::json!({ "images": "abc" })),
        400,
        "bad_json",
    );
    check(
        post_json(&url, &serde_json::json!({ "images": [] })),
        400,
        "no_images",
    );
    check(
        post_json(&url, &serde_json::json!({ "image": [good] })),
        400,
        "bad_json",
    );
    check(
        post_json(&url, &serde_json::json!({ "images": [good], "cased": 3 })),
        400,
        "bad_option",
    );
    // Multipart bodies.
    check(
        post(&url, Some("multipart/form-data"), b"whatever"),
        400,
        "bad_multipart",
    );
    check(
        post(
            &url,
            Some("multipart/form-data; boundary=xyz"),
            b"this is not multipart",
        ),
        400,
        "bad_multipart",
    );
    let (content_type, body) = multipart(&[]);
    check(post(&url, Some(&content_type), &body), 400, "no_images");
    let (content_type, body) = multipart(&[Part {
        name: "image",
        file_name: Some("broken.png"),
        data: &png[..png.len() - 40],
    }]);
    let bad = check(
        post(&url, Some(&content_type), &body),
        400,
        "truncated_image",
    );
    assert_eq!(
        bad["error"]["file"],
        serde_json::json!({ "index": 0, "name": "broken.png" })
    );
    assert!(bad["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("broken.png")));
    let (content_type, body) = multipart(&[Part {
        name: "image",
        file_name: Some("empty.png"),
        data: b"",
    }]);
    check(post(&url, Some(&content_type), &body), 400, "empty_image");
    let (content_type, body) = multipart(&[
        Part {
            name: "cased",
            file_name: None,
            data: b"perhaps",
        },
        Part {
            name: "image",
            file_name: Some("good.png"),
            data: &png,
        },
    ]);
    check(post(&url, Some(&content_type), &body), 400, "bad_option");

    // Options.
    check(
        post(&server.url("/v1/read?cased=maybe"), None, &png),
        400,
        "bad_option",
    );
    check(
        post(&server.url("/v1/read?colour=red"), None, &png),
        400,
        "unknown_option",
    );
    check(
        post_json(
            &server.url("/v1/read?cased=true"),
            &serde_json::json!({ "images": [good], "cased": false }),
        ),
        400,
        "conflicting_option",
    );

    // An early refusal still reads the whole body, so the connection stays usable: a request pipelined
    // behind it is answered.
    let filler = vec![1u8; 150_000];
    for target in ["/v1/read?cased=maybe", "/nowhere", "/healthz"] {
        let mut pipelined = format!(
            "POST {target} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
            filler.len()
        )
        .into_bytes();
        pipelined.extend_from_slice(&filler);
        pipelined
            .extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        let answer = raw_exchange(&server.addr, &pipelined);
        assert!(answer.starts_with("HTTP/1.1 4"), "{target}: {answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 2, "{target}: {answer}");
        assert!(answer.contains("{\"status\":\"ok\"}"), "{target}: {answer}");
    }

    // Still alive and serving.
    assert_eq!(post(&url, None, &png).status, 200);
    assert_eq!(get(&server.url("/healthz")).status, 200);
    let metrics = get(&server.url("/metrics")).body;
    for kind in [
        "empty_body",
        "truncated_image",
        "image_too_large",
        "body_too_large",
        "bad_base64",
        "bad_multipart",
    ] {
        assert!(
            metrics.contains(&format!("clip4str_errors_total{{kind=\"{kind}\"}}")),
            "{kind}"
        );
    }
    assert!(!server.stderr().contains("panicked"), "{}", server.stderr());
}

/// One bad image in a request of several no longer sinks the others: the good ones are read (as they would be
/// alone), each bad one gets an error object naming the file and the reason in its place, and the status, 207,
/// says the request was partly served. A request with no readable image at all is an error that still lists
/// every image's reason. It used to be a 400 for the whole request with nothing for the good images.
#[test]
fn one_bad_image_is_answered_in_its_place() {
    let server = Server::start(&[]);
    let url = server.url("/v1/read");
    let images = example_images();
    let good: Vec<Vec<u8>> = images.iter().take(2).map(read_file).collect();
    let alone: Vec<serde_json::Value> = good
        .iter()
        .map(|g| {
            let reply = post(&url, None, g);
            assert_eq!(reply.status, 200, "{}", reply.body);
            reply.json()["results"][0].clone()
        })
        .collect();
    let check_partial = |reply: &Reply, bad_at: usize, kind: &str, file: &str| {
        assert_eq!(reply.status, 207, "{}", reply.body);
        let json = reply.json();
        let results = json["results"].as_array().expect("results");
        assert_eq!(results.len(), 3, "{}", reply.body);
        assert_eq!(
            (json["read"].as_u64(), json["failed"].as_u64()),
            (Some(2), Some(1))
        );
        let mut good_seen = 0;
        for (index, result) in results.iter().enumerate() {
            assert_eq!(result["index"], index, "{}", reply.body);
            if index == bad_at {
                assert_eq!(result["file"], file);
                assert_eq!(result["error"]["kind"], kind, "{}", reply.body);
                let message = result["error"]["message"].as_str().expect("message");
                assert!(message.contains(file), "{message}");
                assert!(result.get("text").is_none());
            } else {
                assert_same_reading(result, &alone[good_seen], &format!("image {index}"));
                good_seen += 1;
            }
        }
    };

    // Multipart: a truncated PNG between two good ones.
    let truncated = &good[0][..good[0].len() - 40];
    let (content_type, body) = multipart(&[
        Part {
            name: "image",
            file_name: Some("a.png"),
            data: &good[0],
        },
        Part {
            name: "image",
            file_name: Some("broken.png"),
            data: truncated,
        },
        Part {
            name: "image",
            file_name: Some("b.png"),
            data: &good[1],
        },
    ]);
    check_partial(
        &post(&url, Some(&content_type), &body),
        1,
        "truncated_image",
        "broken.png",
    );

    // JSON: bad base64 first, then an image over the pixel limit last.
    let (a, b) = (base64(&good[0]), base64(&good[1]));
    check_partial(
        &post_json(
            &url,
            &serde_json::json!({ "images": ["not base64!", a, b] }),
        ),
        0,
        "bad_base64",
        "images[0]",
    );
    check_partial(
        &post_json(
            &url,
            &serde_json::json!({ "images": [a, b, base64(&png_bomb(100_000, 100_000))] }),
        ),
        2,
        "image_too_large",
        "images[2]",
    );

    // Nothing readable: one error, with every image's own reason.
    let none = post_json(
        &url,
        &serde_json::json!({ "images": ["%%", base64(truncated)] }),
    );
    assert_eq!(none.status, 400, "{}", none.body);
    let json = none.json();
    assert_eq!(json["error"]["kind"], "no_readable_image");
    assert_eq!(json["failed"], 2);
    assert_eq!(json["results"][0]["error"]["kind"], "bad_base64");
    assert_eq!(json["results"][1]["error"]["kind"], "truncated_image");
    assert_eq!(json["results"][1]["file"], "images[1]");

    let metrics = get(&server.url("/metrics")).body;
    for line in [
        "clip4str_http_requests_total{endpoint=\"/v1/read\",status=\"207\"} 3",
        "clip4str_errors_total{kind=\"bad_base64\"} 2",
        "clip4str_errors_total{kind=\"truncated_image\"} 2",
        "clip4str_errors_total{kind=\"image_too_large\"} 1",
        "clip4str_errors_total{kind=\"no_readable_image\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
}

/// A full queue answers 503 with Retry-After; a request that could never fit gets 413.
#[test]
fn full_queue_answers_503() {
    let server = Server::start(&["--queue", "1", "--max-batch", "1", "--max-wait-ms", "0"]);
    let url = server.url("/v1/read");
    let png = read_file(&example_images()[0]);
    let replies: Vec<Reply> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..24)
            .map(|_| scope.spawn(|| post(&url, None, &png)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let full: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    assert!(
        !full.is_empty(),
        "no 503 among {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for reply in &full {
        assert_eq!(reply.error_kind(), "queue_full");
        assert_eq!(reply.retry_after.as_deref(), Some("1"));
    }
    assert!(replies.iter().all(|r| r.status == 200 || r.status == 503));
    assert!(replies.iter().any(|r| r.status == 200));

    // Two images can never fit a queue of one.
    let (content_type, body) = multipart(&[
        Part {
            name: "a",
            file_name: Some("a.png"),
            data: &png,
        },
        Part {
            name: "b",
            file_name: Some("b.png"),
            data: &png,
        },
    ]);
    let reply = post(&url, Some(&content_type), &body);
    assert_eq!(
        (reply.status, reply.error_kind().as_str()),
        (413, "too_many_images")
    );

    // Recovered once the burst is over.
    assert_eq!(post(&url, None, &png).status, 200);
    let metrics = get(&server.url("/metrics")).body;
    assert!(metrics.contains("clip4str_errors_total{kind=\"queue_full\"}"));
}

/// A request that outlives `--timeout-ms` gets 503 `timeout`, and its queued image is dropped unread.
#[test]
fn slow_request_times_out() {
    // The lone image waits up to 2 s for its batch to fill, longer than the 300 ms allowed.
    let server = Server::start(&[
        "--max-batch",
        "8",
        "--max-wait-ms",
        "2000",
        "--timeout-ms",
        "300",
    ]);
    let started = Instant::now();
    let reply = post(
        &server.url("/v1/read"),
        None,
        &read_file(&example_images()[0]),
    );
    assert_eq!(
        (reply.status, reply.error_kind().as_str()),
        (503, "timeout")
    );
    assert!(reply.retry_after.is_some());
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = get(&server.url("/metrics")).body;
        if metrics.contains("clip4str_cancelled_images_total 1\n") {
            assert!(metrics.contains("clip4str_images_total 0\n"), "{metrics}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the timed-out image was not dropped:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM lets an in-flight request finish, then the server exits 0 and stops listening.
#[test]
fn sigterm_finishes_in_flight_requests() {
    // Requests wait up to 1.5 s for a batch, so one is surely in flight when the signal arrives.
    let mut server = Server::start(&["--max-batch", "8", "--max-wait-ms", "1500"]);
    let url = server.url("/v1/read");
    let png = read_file(&example_images()[0]);
    let in_flight = std::thread::spawn(move || post(&url, None, &png));
    std::thread::sleep(Duration::from_millis(400));
    server.terminate();
    let reply = in_flight.join().expect("client thread");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.json()["results"][0]["text"].is_string());
    let status = server
        .wait_exit(Duration::from_secs(20))
        .expect("the server did not exit after SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}; stderr:\n{}",
        server.stderr()
    );
    assert!(
        std::net::TcpStream::connect(&server.addr).is_err(),
        "still listening"
    );
    let log = server.stderr();
    assert!(log.contains("shutting down"), "{log}");
}

/// A client that stalls mid-request cannot hold up shutdown for longer than the request timeout plus a few
/// seconds.
#[test]
fn shutdown_does_not_wait_forever_for_a_stalled_client() {
    let mut server = Server::start(&["--timeout-ms", "200"]);
    let mut stalled = std::net::TcpStream::connect(&server.addr).expect("connect");
    std::io::Write::write_all(&mut stalled, b"GET /healthz HTTP/1.1\r\nHo")
        .expect("send half a request");
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    server.terminate();
    let status = server
        .wait_exit(Duration::from_secs(20))
        .expect("the server did not exit");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(
        server.stderr().contains("connections still open"),
        "{}",
        server.stderr()
    );
}

/// A bad model or bad flag stops the server at startup with a clear error, not later.
#[test]
fn bad_startup_is_an_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clip4str"))
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--checkpoint",
            "/nonexistent/model.safetensors",
        ])
        .output()
        .expect("run clip4str serve");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/model.safetensors"),
        "{stderr}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clip4str"))
        .args(["serve", "--addr", "127.0.0.1:0", "--max-batch", "0"])
        .output()
        .expect("run clip4str serve");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-batch must be at least 1"));
}
