//! End-to-end tests of `clip4str models` and `--model NAME` against a fake Hugging Face Hub served from this
//! process (std `TcpListener`), with a temporary cache. The test-only variable `CLIP4STR_TEST_MODEL` registers
//! `tinytest` as `test-org/clip4str-tiny:tiny.ckpt`, the tiny Lightning checkpoint of tests/fixtures.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use common::{fixtures, stderr, stdout};

const REPO: &str = "test-org/clip4str-tiny";
const FILE: &str = "tiny.ckpt";
const NAME: &str = "tinytest";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const ETAG: &str = "5f3a0c6e1d2b4a7988e1f0c2d3b4a5968778695a4b3c2d1e0f1a2b3c4d5e6f70";

fn image() -> String {
    fixtures()
        .join("images/synth_text_L_140x40.png")
        .display()
        .to_string()
}

/// How the fake Hub answers.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Like the Hub: `etag`, `x-repo-commit`, `Content-Range`, byte ranges.
    Serve,
    /// Every request gets this status.
    Status(u16),
    /// Announces the full length but sends at most this many body bytes, then closes.
    Truncate(usize),
    /// Sends no length and closes after this many body bytes (the client cannot tell it is short).
    CloseEarly(usize),
}

#[derive(Debug)]
struct HubState {
    mode: Mode,
    /// `(path, Range header)` of every request.
    requests: Vec<(String, Option<String>)>,
}

/// A Hub on 127.0.0.1 serving tests/fixtures/tiny.ckpt as `REPO/FILE` on branch `main`.
struct FakeHub {
    url: String,
    state: Arc<Mutex<HubState>>,
}

impl FakeHub {
    fn start(mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(HubState {
            mode,
            requests: Vec::new(),
        }));
        let data = Arc::new(std::fs::read(fixtures().join(FILE)).unwrap());
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                // A broken connection only fails that request; the client reports it.
                let _ = answer(stream, &data, &shared);
            }
        });
        Self { url, state }
    }

    fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    fn take_requests(&self) -> Vec<(String, Option<String>)> {
        std::mem::take(&mut self.state.lock().unwrap().requests)
    }
}

fn answer(mut stream: TcpStream, data: &[u8], state: &Mutex<HubState>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((key, value)) = line.split_once(':') {
            if key.eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            }
        }
    }
    let mode = {
        let mut st = state.lock().unwrap();
        st.requests.push((path.clone(), range.clone()));
        st.mode
    };
    let expected_path = format!("/{REPO}/resolve/main/{FILE}");
    let status = match mode {
        Mode::Status(code) => Some(code),
        _ if path != expected_path => Some(404),
        _ => None,
    };
    if let Some(code) = status {
        let reason = if code == 404 { "Not Found" } else { "Error" };
        let body = format!("{code} {reason}");
        write!(
            stream,
            "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    let size = data.len();
    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(spec) => {
            let (a, b) = spec.split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b: usize = if b.is_empty() {
                size - 1
            } else {
                b.parse().unwrap()
            };
            (a, b.min(size - 1))
        }
        None => (0, size - 1),
    };
    let body = &data[start..=end];
    let (status_line, content_range) = if range.is_some() {
        (
            "206 Partial Content",
            format!("Content-Range: bytes {start}-{end}/{size}\r\n"),
        )
    } else {
        ("200 OK", String::new())
    };
    let (length_header, sent) = match mode {
        Mode::Truncate(max) => (
            format!("Content-Length: {}\r\n", body.len()),
            &body[..body.len().min(max)],
        ),
        Mode::CloseEarly(max) => (String::new(), &body[..body.len().min(max)]),
        _ => (format!("Content-Length: {}\r\n", body.len()), body),
    };
    write!(
        stream,
        "HTTP/1.1 {status_line}\r\n{content_range}{length_header}ETag: \"{ETAG}\"\r\n\
         X-Repo-Commit: {COMMIT}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n"
    )?;
    stream.write_all(sent)?;
    stream.flush()
}

/// Runs the binary with `cache` as HF_HOME, the test model registered, and no proxy or Hub settings inherited.
fn clip4str_env(cache: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clip4str"));
    for var in [
        "HF_ENDPOINT",
        "HF_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "HF_TOKEN",
        "XDG_CACHE_HOME",
        "ALL_PROXY",
        "all_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HF_HOME", cache)
        .env("CLIP4STR_TEST_MODEL", format!("{NAME}={REPO}:{FILE}"))
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run clip4str")
}

fn clip4str(cache: &Path, args: &[&str]) -> Output {
    clip4str_env(cache, &[], args)
}

fn repo_dir(cache: &Path) -> PathBuf {
    cache.join("hub/models--test-org--clip4str-tiny")
}

/// Files under `dir`, recursively, relative to it (empty when it does not exist).
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, base, out);
            } else {
                out.push(path.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// No snapshot entry and no complete blob (a `.part` kept for resuming, the `.lock` and the branch's
/// `refs/main` are allowed).
fn assert_not_cached(cache: &Path) {
    let files = files_under(&repo_dir(cache));
    for f in &files {
        assert!(
            f.ends_with(".part") || f.ends_with(".lock") || f == "refs/main",
            "unexpected cache file {f} in {files:?}"
        );
    }
}

fn list_json(cache: &Path) -> Vec<serde_json::Value> {
    let out = clip4str(cache, &["models", "list", "--format", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn entry<'a>(list: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    list.iter().find(|e| e["name"] == name).unwrap()
}

#[test]
fn download_then_cache_hit_then_offline_read() {
    let hub = FakeHub::start(Mode::Serve);
    let cache = tempfile::tempdir().unwrap();
    let cache = cache.path();

    let out = clip4str(cache, &["models", "download", NAME, "--endpoint", &hub.url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let path = PathBuf::from(stdout(&out).trim());
    assert_eq!(
        path,
        repo_dir(cache).join(format!("snapshots/{COMMIT}/{FILE}")),
        "standard cache layout"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(fixtures().join(FILE)).unwrap()
    );
    assert!(repo_dir(cache).join(format!("blobs/{ETAG}")).is_file());
    assert_eq!(
        std::fs::read_to_string(repo_dir(cache).join("refs/main")).unwrap(),
        COMMIT
    );
    assert!(stderr(&out).contains("tensors"), "{}", stderr(&out));
    assert!(!hub.take_requests().is_empty());

    // Cached: the server is not asked again, by `models download`, `models list` or `read --model`.
    let out = clip4str(cache, &["models", "download", NAME, "--endpoint", &hub.url]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already in the cache"),
        "{}",
        stderr(&out)
    );
    assert_eq!(PathBuf::from(stdout(&out).trim()), path);

    let list = list_json(cache);
    assert_eq!(entry(&list, NAME)["cached"], true);
    assert_eq!(entry(&list, NAME)["path"], path.display().to_string());

    let img = image();
    let named = clip4str(cache, &["read", "--model", NAME, "--offline", &img]);
    assert!(named.status.success(), "{}", stderr(&named));
    let ckpt = fixtures().join(FILE);
    let direct = clip4str(
        cache,
        &["read", "--checkpoint", ckpt.to_str().unwrap(), &img],
    );
    assert!(direct.status.success(), "{}", stderr(&direct));
    assert_eq!(stdout(&named), stdout(&direct));
    assert!(
        hub.take_requests().is_empty(),
        "the cache hit contacted the server"
    );
}

#[test]
fn read_model_downloads_a_missing_model_from_hf_endpoint() {
    let hub = FakeHub::start(Mode::Serve);
    let cache = tempfile::tempdir().unwrap();
    let img = image();
    let out = clip4str_env(
        cache.path(),
        &[("HF_ENDPOINT", &hub.url)],
        &["read", "--model", NAME, &img],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 1);
    assert!(stdout(&out).starts_with(&img), "{}", stdout(&out));
    assert!(!hub.take_requests().is_empty());
    assert_eq!(entry(&list_json(cache.path()), NAME)["cached"], true);
}

#[test]
fn offline_with_an_empty_cache_is_a_clear_error() {
    let hub = FakeHub::start(Mode::Serve);
    let cache = tempfile::tempdir().unwrap();
    let cache = cache.path();
    let img = image();
    let runs = [
        clip4str(
            cache,
            &[
                "models",
                "download",
                NAME,
                "--offline",
                "--endpoint",
                &hub.url,
            ],
        ),
        clip4str(cache, &["read", "--model", NAME, "--offline", &img]),
        clip4str_env(
            cache,
            &[("HF_HUB_OFFLINE", "1"), ("HF_ENDPOINT", &hub.url)],
            &["read", "--model", NAME, &img],
        ),
    ];
    for out in runs {
        assert_eq!(out.status.code(), Some(2));
        let err = stderr(&out);
        assert!(err.contains("not in the Hugging Face cache"), "{err}");
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    }
    assert!(hub.take_requests().is_empty());
}

#[test]
fn unknown_names_and_conflicting_options_are_refused() {
    let cache = tempfile::tempdir().unwrap();
    let cache = cache.path();
    let img = image();
    for args in [
        vec!["models", "download", "nope"],
        vec!["read", "--model", "nope", img.as_str()],
    ] {
        let out = clip4str(cache, &args);
        assert_eq!(out.status.code(), Some(2));
        let err = stderr(&out);
        assert!(err.contains("unknown model \"nope\""), "{err}");
        assert!(err.contains("small, base, large, huge, huge-dfn"), "{err}");
    }
    let ckpt = fixtures().join(FILE);
    let ckpt = ckpt.to_str().unwrap();
    for args in [
        vec![
            "read",
            "--model",
            "small",
            "--checkpoint",
            ckpt,
            img.as_str(),
        ],
        vec!["bench", "--preset", "tiny", "--model", "small"],
        vec!["bench", "--preset", "tiny", "--checkpoint", ckpt],
    ] {
        let out = clip4str(cache, &args);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("cannot be used with"),
            "{}",
            stderr(&out)
        );
    }
    // Not on the Hub: say where it is instead.
    let out = clip4str(cache, &["models", "download", "base-openai"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("github.com/VamosC/CLIP4STR/releases"), "{err}");
    assert!(err.contains("--checkpoint"), "{err}");
    // The bundled model needs no download and reads by name.
    let out = clip4str(cache, &["models", "download", "small"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let named = clip4str(cache, &["read", "--model", "small", &img]);
    let default = clip4str(cache, &["read", &img]);
    assert!(named.status.success(), "{}", stderr(&named));
    assert_eq!(stdout(&named), stdout(&default));
}

#[test]
fn http_errors_are_reported_and_nothing_is_cached() {
    let hub = FakeHub::start(Mode::Status(404));
    let cache = tempfile::tempdir().unwrap();
    let cache = cache.path();
    let url = format!("{}/{REPO}/resolve/main/{FILE}", hub.url);
    for (code, words) in [(404, "no such repository"), (500, "try again later")] {
        hub.set_mode(Mode::Status(code));
        let out = clip4str(cache, &["models", "download", NAME, "--endpoint", &hub.url]);
        assert_eq!(out.status.code(), Some(2));
        let err = stderr(&out);
        assert!(err.contains(&format!("HTTP {code}")), "{err}");
        assert!(err.contains(&url), "{err}");
        assert!(err.contains(words), "{err}");
        assert_not_cached(cache);
    }
}

#[test]
fn a_broken_off_download_leaves_only_a_partial_file_and_resumes() {
    let chunk = 1 << 20;
    let hub = FakeHub::start(Mode::Truncate(chunk));
    let cache = tempfile::tempdir().unwrap();
    let cache = cache.path();
    let out = clip4str(cache, &["models", "download", NAME, "--endpoint", &hub.url]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("broke off"), "{err}");
    assert!(err.contains("resume"), "{err}");
    assert_not_cached(cache);
    let part = repo_dir(cache).join(format!("blobs/{ETAG}.part"));
    let kept = std::fs::metadata(&part).unwrap().len() as usize;
    assert!(kept >= chunk, "partial file of {kept} bytes");
    hub.take_requests();

    hub.set_mode(Mode::Serve);
    let out = clip4str(cache, &["models", "download", NAME, "--endpoint", &hub.url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ranges: Vec<Option<String>> = hub.take_requests().into_iter().map(|r| r.1).collect();
    assert!(
        ranges.contains(&Some(format!("bytes={kept}-"))),
        "no resumed range request in {ranges:?}"
    );
    let path = PathBuf::from(stdout(&out).trim());
    assert_eq!(
        std::fs::read(path).unwrap(),
        std::fs::read(fixtures().join(FILE)).unwrap()
    );
}

#[test]
fn a_short_download_the_client_cannot_detect_is_removed_from_the_cache() {
    let hub = FakeHub::start(Mode::CloseEarly(4096));
    let cache = tempfile::tempdir().unwrap();
    let cache = cache.path();
    let out = clip4str(cache, &["models", "download", NAME, "--endpoint", &hub.url]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("removed it from the cache"), "{err}");
    assert_not_cached(cache);
    assert_eq!(entry(&list_json(cache), NAME)["cached"], false);
}

#[test]
fn models_list_names_every_release() {
    let cache = tempfile::tempdir().unwrap();
    let cache = cache.path();
    let list = list_json(cache);
    let small = entry(&list, "small");
    assert_eq!(small["source"]["kind"], "bundled");
    assert_eq!(small["cached"], true);
    for (name, file) in [
        ("base", "clip4str_base_6e9fe947ac.pt"),
        ("large", "clip4str_large_3c9d881b88.pt"),
        ("huge", "clip4str_huge_5eef9f86e2.pt"),
        ("huge-dfn", "clip4str_huge_3e942729b1.pt"),
    ] {
        let e = entry(&list, name);
        assert_eq!(e["source"]["kind"], "hub");
        assert_eq!(e["source"]["repo"], "mzhaoshuai/CLIP4STR");
        assert_eq!(e["source"]["file"], file);
        assert_eq!(e["cached"], false);
    }
    assert_eq!(entry(&list, "base-openai")["source"]["kind"], "manual");

    let out = clip4str(cache, &["models", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("NAME"), "{text}");
    assert!(
        text.contains("hf:mzhaoshuai/CLIP4STR/clip4str_huge_3e942729b1.pt"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("small ") && l.contains("built in")),
        "{text}"
    );
}
