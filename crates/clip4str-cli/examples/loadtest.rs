//! Load test for `clip4str serve`: many concurrent clients send a fixed mix of valid and invalid requests,
//! then the run is summarised (status counts per class, latency percentiles, throughput) and checked: no valid
//! request may get a 5xx (nor any non-2xx), and every invalid one must get a 4xx.
//!
//! ```text
//! clip4str serve --addr 127.0.0.1:8080 &
//! cargo run --release -p clip4str-cli --example loadtest -- --addr 127.0.0.1:8080 --clients 32 --requests 2000
//! ```
//! With `--pid` the server's resident memory (VmRSS from /proc) is reported before and after the run.
//! Exits 1 when a check fails.

#[path = "../tests/serve_support/bodies.rs"]
mod bodies;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bodies::{base64, multipart, png_bomb, Part};

/// The kinds of request sent, in the order they are cycled through (valid ones are the majority).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    RawImage,
    MultipartImages,
    JsonImages,
    CasedQuery,
    EmptyBody,
    TruncatedPng,
    RandomBytes,
    TextBody,
    PixelBomb,
    BadBase64,
    BadOption,
}

impl Class {
    /// One cycle of the mix: 13 valid requests and 7 invalid ones, interleaved.
    const MIX: &'static [Class] = &[
        Class::RawImage,
        Class::MultipartImages,
        Class::RawImage,
        Class::JsonImages,
        Class::EmptyBody,
        Class::RawImage,
        Class::CasedQuery,
        Class::TruncatedPng,
        Class::RawImage,
        Class::MultipartImages,
        Class::RandomBytes,
        Class::RawImage,
        Class::JsonImages,
        Class::TextBody,
        Class::RawImage,
        Class::PixelBomb,
        Class::RawImage,
        Class::BadBase64,
        Class::CasedQuery,
        Class::BadOption,
    ];

    fn valid(self) -> bool {
        matches!(
            self,
            Class::RawImage | Class::MultipartImages | Class::JsonImages | Class::CasedQuery
        )
    }
}

/// A ready-to-send request.
struct Prepared {
    path: String,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// Builds the body of request number `n` of class `class` from the example images.
fn prepare(class: Class, n: usize, images: &[Vec<u8>]) -> Prepared {
    let image = &images[n % images.len()];
    let raw = |path: &str, ct: Option<&str>, body: Vec<u8>| Prepared {
        path: path.to_owned(),
        content_type: ct.map(str::to_owned),
        body,
    };
    match class {
        Class::RawImage => raw("/v1/read", Some("image/png"), image.clone()),
        Class::CasedQuery => raw("/v1/read?cased=true&punctuation=true", None, image.clone()),
        Class::MultipartImages => {
            let second = &images[(n + 1) % images.len()];
            let third = &images[(n + 2) % images.len()];
            let (ct, body) = multipart(&[
                Part {
                    name: "image",
                    file_name: Some("a.png"),
                    data: image,
                },
                Part {
                    name: "image",
                    file_name: Some("b.png"),
                    data: second,
                },
                Part {
                    name: "image",
                    file_name: Some("c.png"),
                    data: third,
                },
            ]);
            raw("/v1/read", Some(&ct), body)
        }
        Class::JsonImages => {
            let second = &images[(n + 3) % images.len()];
            let body = format!(
                r#"{{"images": ["{}", "{}"]}}"#,
                base64(image),
                base64(second)
            );
            raw("/v1/read", Some("application/json"), body.into_bytes())
        }
        Class::EmptyBody => raw("/v1/read", None, Vec::new()),
        Class::TruncatedPng => raw(
            "/v1/read",
            Some("image/png"),
            image[..image.len() / 2].to_vec(),
        ),
        Class::RandomBytes => {
            let mut state = n as u64 ^ 0x9E37_79B9_7F4A_7C15;
            let bytes = (0..2048)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 24) as u8
                })
                .collect();
            raw("/v1/read", Some("application/octet-stream"), bytes)
        }
        Class::TextBody => raw(
            "/v1/read",
            Some("text/plain"),
            b"this is not an image".to_vec(),
        ),
        Class::PixelBomb => raw("/v1/read", Some("image/png"), png_bomb(100_000, 100_000)),
        Class::BadBase64 => raw(
            "/v1/read",
            Some("application/json"),
            br#"{"images": ["%%% not base64 %%%"]}"#.to_vec(),
        ),
        Class::BadOption => raw("/v1/read?cased=sometimes", None, image.clone()),
    }
}

/// The outcome of one request.
struct Sample {
    class: Class,
    /// HTTP status, or `None` when the connection failed.
    status: Option<u16>,
    latency: Duration,
}

struct Args {
    base: String,
    clients: usize,
    requests: usize,
    images: PathBuf,
    pid: Option<u32>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        base: "http://127.0.0.1:8080".into(),
        clients: 32,
        requests: 2000,
        images: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/images"),
        pid: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => {
                let addr = value()?;
                args.base = if addr.starts_with("http://") {
                    addr.trim_end_matches('/').to_owned()
                } else {
                    format!("http://{addr}")
                };
            }
            "--clients" => {
                args.clients = value()?.parse().map_err(|e| format!("--clients: {e}"))?
            }
            "--requests" => {
                args.requests = value()?.parse().map_err(|e| format!("--requests: {e}"))?
            }
            "--images" => args.images = PathBuf::from(value()?),
            "--pid" => args.pid = Some(value()?.parse().map_err(|e| format!("--pid: {e}"))?),
            "-h" | "--help" => {
                return Err(
                    "usage: loadtest [--addr HOST:PORT] [--clients N] [--requests N] \
                            [--images DIR] [--pid SERVER_PID]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.clients == 0 || args.requests == 0 {
        return Err("--clients and --requests must be at least 1".into());
    }
    Ok(args)
}

/// Resident memory of a process in KiB, from /proc (Linux only).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn load_images(dir: &PathBuf) -> Result<Vec<Vec<u8>>, String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("listing {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(format!("no .png or .jpg images in {}", dir.display()));
    }
    paths
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display())))
        .collect()
}

fn send(agent: &ureq::Agent, base: &str, request: &Prepared) -> Option<u16> {
    let mut call = agent.post(&format!("{base}{}", request.path));
    if let Some(ct) = &request.content_type {
        call = call.set("Content-Type", ct);
    }
    let response = match call.send_bytes(&request.body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(_) => return None,
    };
    let status = response.status();
    // Read the body to the end so that the connection can be reused.
    let _ = response.into_string();
    Some(status)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// Mean images per model call, from the server's batch-size histogram.
fn mean_batch(metrics: &str) -> Option<f64> {
    let value = |name: &str| -> Option<f64> {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    let (sum, count) = (
        value("clip4str_batch_size_sum ")?,
        value("clip4str_batch_size_count ")?,
    );
    (count > 0.0).then(|| sum / count)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let images = match load_images(&args.images) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .max_idle_connections_per_host(args.clients)
        .build();
    match agent.get(&format!("{}/readyz", args.base)).call() {
        Ok(r) if r.status() == 200 => {}
        other => {
            eprintln!("error: the server at {} is not ready: {other:?}", args.base);
            return ExitCode::from(2);
        }
    }
    let rss_before = args.pid.and_then(rss_kib);

    println!(
        "{} requests from {} clients to {} ({} example images)",
        args.requests,
        args.clients,
        args.base,
        images.len()
    );
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let samples: Vec<Sample> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..args.clients)
            .map(|_| {
                let (agent, next, images, base) = (&agent, &next, &images, &args.base);
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= args.requests {
                            return mine;
                        }
                        let class = Class::MIX[n % Class::MIX.len()];
                        let request = prepare(class, n, images);
                        let clock = Instant::now();
                        let status = send(agent, base, &request);
                        mine.push(Sample {
                            class,
                            status,
                            latency: clock.elapsed(),
                        });
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("client thread"))
            .collect()
    });
    let wall = started.elapsed();
    let rss_after = args.pid.and_then(rss_kib);

    // Status counts per class.
    let mut table: BTreeMap<Class, BTreeMap<String, usize>> = BTreeMap::new();
    for s in &samples {
        let status = s.status.map_or("conn-error".to_owned(), |c| c.to_string());
        *table.entry(s.class).or_default().entry(status).or_default() += 1;
    }
    println!("\n{:<16} {:>6}  statuses", "class", "count");
    for (class, statuses) in &table {
        let total: usize = statuses.values().sum();
        let list: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        println!(
            "{:<16} {total:>6}  {}",
            format!("{class:?}"),
            list.join(", ")
        );
    }

    let mut failures = Vec::new();
    for s in &samples {
        let ok = match (s.class.valid(), s.status) {
            (true, Some(code)) => (200..300).contains(&code),
            (false, Some(code)) => (400..500).contains(&code),
            (_, None) => false,
        };
        if !ok {
            failures.push(format!("{:?} got {:?}", s.class, s.status));
        }
    }

    println!(
        "\n{:<10} {:>6} {:>9} {:>9} {:>9}",
        "requests", "count", "p50 ms", "p99 ms", "max ms"
    );
    for (name, filter) in [
        ("all", None),
        ("valid", Some(true)),
        ("invalid", Some(false)),
    ] {
        let mut latencies: Vec<Duration> = samples
            .iter()
            .filter(|s| filter.is_none_or(|v| s.class.valid() == v))
            .map(|s| s.latency)
            .collect();
        latencies.sort();
        println!(
            "{name:<10} {:>6} {:>9} {:>9} {:>9}",
            latencies.len(),
            ms(percentile(&latencies, 50.0)),
            ms(percentile(&latencies, 99.0)),
            ms(latencies.last().copied().unwrap_or_default())
        );
    }
    let valid_images: usize = samples
        .iter()
        .filter(|s| s.status == Some(200))
        .map(|s| match s.class {
            Class::MultipartImages => 3,
            Class::JsonImages => 2,
            _ => 1,
        })
        .sum();
    println!(
        "\nwall {:.2} s: {:.1} requests/s, {:.1} images read/s",
        wall.as_secs_f64(),
        samples.len() as f64 / wall.as_secs_f64(),
        valid_images as f64 / wall.as_secs_f64()
    );
    let metrics = agent
        .get(&format!("{}/metrics", args.base))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok());
    if let Some(mean) = metrics.as_deref().and_then(mean_batch) {
        println!("server: {mean:.2} images per model call on average (since it started)");
    }
    if let (Some(pid), Some(before), Some(after)) = (args.pid, rss_before, rss_after) {
        println!(
            "server pid {pid} VmRSS: {:.1} MiB before, {:.1} MiB after",
            before as f64 / 1024.0,
            after as f64 / 1024.0
        );
    }

    if failures.is_empty() {
        println!("\nOK: no 5xx (nor any non-2xx) for valid requests, a 4xx for every invalid one");
        ExitCode::SUCCESS
    } else {
        println!(
            "\nFAILED: {} requests got an unexpected answer:",
            failures.len()
        );
        for f in failures.iter().take(20) {
            println!("  {f}");
        }
        ExitCode::from(1)
    }
}
