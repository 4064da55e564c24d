//! Shared by the `clip4str serve` tests: start the real binary on a free port, talk HTTP to it, build request
//! bodies. Not every test file uses every helper. A test file that declares `mod serve_support;` declares
//! `mod common;` (the repository paths) too.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod bodies;
#[allow(unused_imports)]
pub use bodies::*;

use super::common::{fixtures, root};

/// `examples/images/word01.png` .. `word10.png`.
pub fn example_images() -> Vec<PathBuf> {
    (1..=10)
        .map(|i| root().join(format!("examples/images/word{i:02}.png")))
        .collect()
}

/// The synthetic fixture images (odd sizes and colours).
pub fn fixture_images() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixtures().join("images"))
        .expect("list fixture images")
        .map(|e| e.expect("fixture entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    paths.sort();
    paths
}

/// Arguments that serve the tiny test checkpoint (fast, and its predictions differ in length and charset).
pub fn tiny_model_args() -> Vec<String> {
    let fixtures = fixtures();
    vec![
        "--checkpoint".into(),
        fixtures.join("tiny.safetensors").display().to_string(),
        "--config".into(),
        fixtures.join("tiny_config.json").display().to_string(),
    ]
}

/// A running `clip4str serve`, killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// `127.0.0.1:PORT`
    pub addr: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    /// Starts the server on a free port with `args` and waits until `/readyz` says ready.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_clip4str"))
            .args(["serve", "--addr", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start clip4str serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let stderr = Arc::clone(&stderr);
            let pipe = child.stderr.take().expect("stderr pipe");
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut log = stderr.lock().expect("log lock");
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout pipe"));
        let mut first = String::new();
        stdout.read_line(&mut first).expect("read the address line");
        // Keep draining stdout so that the server never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let url = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line {first:?}; stderr:\n{}",
                    stderr.lock().expect("log lock")
                )
            })
            .to_owned();
        let addr = url.trim_start_matches("http://").to_owned();
        let server = Self {
            child,
            url,
            addr,
            stderr,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if get(&self.url("/readyz")).status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server not ready after 60 s; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The full URL of `path` (with its query, if any).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// What the server logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("log lock").clone()
    }

    /// The process id (for signals and `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("poll the server") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub retry_after: Option<String>,
    pub body: String,
}

impl Reply {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// `error.kind` of a JSON error answer.
    pub fn error_kind(&self) -> String {
        self.json()["error"]["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("no error kind in {}", self.body))
            .to_owned()
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

fn finish(result: Result<ureq::Response, ureq::Error>) -> Reply {
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("HTTP transport error: {e}"),
    };
    Reply {
        status: response.status(),
        content_type: response
            .header("content-type")
            .unwrap_or_default()
            .to_owned(),
        retry_after: response.header("retry-after").map(str::to_owned),
        body: response.into_string().expect("read the answer"),
    }
}

/// `GET url`.
pub fn get(url: &str) -> Reply {
    finish(agent().get(url).call())
}

/// Any method without a body.
pub fn request(method: &str, url: &str) -> Reply {
    finish(agent().request(method, url).call())
}

/// `POST url` with `body` and an optional content type.
pub fn post(url: &str, content_type: Option<&str>, body: &[u8]) -> Reply {
    let mut request = agent().post(url);
    if let Some(ct) = content_type {
        request = request.set("Content-Type", ct);
    }
    finish(request.send_bytes(body))
}

/// `POST url` with a JSON body.
pub fn post_json(url: &str, body: &serde_json::Value) -> Reply {
    post(url, Some("application/json"), body.to_string().as_bytes())
}

/// Sends raw bytes on a fresh connection and returns everything the server answers until it closes.
pub fn raw_exchange(addr: &str, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set timeout");
    stream.write_all(request).expect("send");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// What `clip4str read --format json` prints for `paths` with `extra` options, one JSON object per image.
pub fn cli_read(extra: &[String], paths: &[PathBuf]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_clip4str"))
        .args(["read", "--format", "json"])
        .args(extra)
        .args(paths)
        .output()
        .expect("run clip4str read");
    assert!(
        out.status.success(),
        "clip4str read failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}
