//! The web page of `clip4str serve` in a real headless Chromium, driven over the DevTools protocol: images are
//! put into the page's own file input (`DOM.setFileInputFiles`, as a user picking files), the page's script
//! posts them to `/v1/read`, and the text it shows must be what the API answers for the same images. A
//! screenshot is saved under the cargo target dir. Skipped, with a message, when no Chromium is installed
//! (`apt-get install chromium`; or point `CHROMIUM` at a Chrome/Chromium binary).

mod common;
mod serve_support;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use serve_support::*;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// Where a Chromium-family browser may be found, first hit wins.
fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM").map(PathBuf::from) {
        return path.is_file().then_some(path);
    }
    let names = [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
        "chrome",
        "headless_shell",
    ];
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    names
        .iter()
        .flat_map(|name| dirs.iter().map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// A headless browser with its own throw-away profile; closed (and if need be killed) when dropped.
struct Browser {
    child: Child,
    /// Held so that the profile folder lives as long as the browser, and is removed after it.
    _profile: tempfile::TempDir,
    port: u16,
}

impl Browser {
    fn start(binary: &Path) -> Self {
        let profile = tempfile::tempdir().expect("temporary profile");
        let log = std::fs::File::create(profile.path().join("chromium.log")).expect("log file");
        let child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--window-size=1000,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        // With port 0 Chromium writes the port it chose to DevToolsActivePort in the profile.
        let active_port = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(60);
        let port = loop {
            let port = std::fs::read_to_string(&active_port)
                .ok()
                .and_then(|text| text.lines().next().and_then(|l| l.trim().parse().ok()));
            if let Some(port) = port {
                break port;
            }
            assert!(
                Instant::now() < deadline,
                "Chromium did not open its DevTools port; its log:\n{}",
                std::fs::read_to_string(profile.path().join("chromium.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Self {
            child,
            _profile: profile,
            port,
        }
    }

    /// A DevTools connection to the browser's first page tab.
    fn page(&self) -> Cdp {
        let targets: Value = get(&format!("http://127.0.0.1:{}/json/list", self.port)).json();
        let url = targets
            .as_array()
            .and_then(|list| list.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page target in {targets}"))
            .to_owned();
        Cdp::connect(&url)
    }
}

impl Drop for Browser {
    /// Gives Chromium a moment to exit after `Browser.close`, then kills it (its profile folder goes after).
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal Chrome DevTools protocol client: numbered commands, events skipped.
struct Cdp {
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Cdp {
    fn connect(url: &str) -> Self {
        let (socket, _) = tungstenite::connect(url).expect("open the DevTools websocket");
        if let MaybeTlsStream::Plain(stream) = socket.get_ref() {
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .expect("set a read timeout");
        }
        Self { socket, next_id: 1 }
    }

    /// Sends a command and waits for its result (panics on a protocol error).
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let command = json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(Message::text(command.to_string()))
            .unwrap_or_else(|e| panic!("sending {method}: {e}"));
        loop {
            let message = self
                .socket
                .read()
                .unwrap_or_else(|e| panic!("waiting for {method}: {e}"));
            let Message::Text(text) = message else {
                continue;
            };
            let reply: Value = serde_json::from_str(text.as_str()).expect("DevTools sends JSON");
            if reply["id"] != id {
                continue;
            }
            if let Some(error) = reply.get("error") {
                panic!("{method} failed: {error}");
            }
            return reply["result"].clone();
        }
    }

    /// Asks the browser to quit (its answer may never come: the connection closes with it).
    fn close_browser(mut self) {
        let command = json!({ "id": self.next_id, "method": "Browser.close", "params": {} });
        let _ = self.socket.send(Message::text(command.to_string()));
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression} threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is truthy.
    fn wait_for(&mut self, expression: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.eval(expression).as_bool().unwrap_or(false) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {expression}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn page_reads_uploaded_images_like_the_api() {
    let Some(chromium) = find_chromium() else {
        println!(
            "skipping serve_page: no chromium binary found (apt-get install chromium, or set CHROMIUM)"
        );
        return;
    };
    let server = Server::start(&[]);
    let browser = Browser::start(&chromium);
    let mut page = browser.page();

    page.call("Page.enable", json!({}));
    page.call("Page.navigate", json!({ "url": server.url("/") }));
    page.wait_for(
        "document.readyState === 'complete' && !!document.getElementById('file')",
        Duration::from_secs(30),
    );

    // Pick three images with the page's own file input; its change handler posts them.
    let files: Vec<PathBuf> = example_images()
        .into_iter()
        .take(2)
        .chain(fixture_images().into_iter().take(1))
        .collect();
    let absolute: Vec<String> = files
        .iter()
        .map(|p| {
            std::fs::canonicalize(p)
                .expect("image path")
                .display()
                .to_string()
        })
        .collect();
    let document = page.call("DOM.getDocument", json!({}));
    let input = page.call(
        "DOM.querySelector",
        json!({ "nodeId": document["root"]["nodeId"], "selector": "#file" }),
    );
    page.call(
        "DOM.setFileInputFiles",
        json!({ "nodeId": input["nodeId"], "files": absolute }),
    );
    page.wait_for(
        "['done', 'error'].includes(document.getElementById('status').dataset.state)",
        Duration::from_secs(60),
    );
    let status = page.eval("document.getElementById('status').dataset.state + ': ' + document.getElementById('status').textContent");
    assert!(
        status.as_str().is_some_and(|s| s.starts_with("done")),
        "{status}"
    );

    let shown = page.eval(
        "Array.from(document.querySelectorAll('.result')).map(r => ({ \
            file: r.querySelector('.file').textContent, \
            text: r.querySelector('.text').textContent, \
            confidence: Number(r.querySelector('.meta').dataset.confidence), \
            probs: Array.from(r.querySelectorAll('.bar')).map(b => Number(b.dataset.prob)) }))",
    );
    let shown = shown.as_array().expect("results on the page").clone();
    assert_eq!(shown.len(), files.len(), "{shown:?}");

    // The same images through the API.
    let mut api_text = Vec::new();
    for (path, on_page) in files.iter().zip(&shown) {
        let reply = post(
            &server.url("/v1/read"),
            None,
            &std::fs::read(path).expect("image"),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        let want = reply.json()["results"][0].clone();
        let name = path.file_name().expect("file name").to_string_lossy();
        assert_eq!(on_page["file"], name.as_ref());
        assert_eq!(on_page["text"], want["text"], "{name}");
        let (got, expected) = (on_page["confidence"].as_f64(), want["confidence"].as_f64());
        assert!(
            matches!((got, expected), (Some(g), Some(e)) if (g - e).abs() <= 1e-6 * e.abs().max(1e-12)),
            "{name}: confidence {got:?} vs {expected:?}"
        );
        let bars = on_page["probs"].as_array().expect("bars");
        assert_eq!(
            bars.len(),
            want["char_probs"].as_array().map_or(0, Vec::len),
            "{name}: one bar per position"
        );
        api_text.push(want["text"].clone());
    }

    // The page's upload was one API request of three images, read in one model call; then came ours, alone.
    let metrics = get(&server.url("/metrics")).body;
    for line in [
        "clip4str_http_requests_total{endpoint=\"/v1/read\",status=\"200\"} 4",
        "clip4str_batch_size_bucket{le=\"2\"} 3",
        "clip4str_batch_size_bucket{le=\"4\"} 4",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }

    // A partly readable upload: the two good images are read, the broken one shows its reason, and the status
    // line says the request was partly served (the page used to show only the error).
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve_page");
    std::fs::create_dir_all(&dir).expect("artefact folder");
    let broken = dir.join("broken.png");
    let whole = std::fs::read(&files[0]).expect("image");
    std::fs::write(&broken, &whole[..whole.len() / 2]).expect("write the broken image");
    let mixed = [
        absolute[0].clone(),
        broken.display().to_string(),
        absolute[1].clone(),
    ];
    page.eval("document.getElementById('status').dataset.state = 'idle'");
    page.call(
        "DOM.setFileInputFiles",
        json!({ "nodeId": input["nodeId"], "files": mixed }),
    );
    page.wait_for(
        "['done', 'error', 'partial'].includes(document.getElementById('status').dataset.state)",
        Duration::from_secs(60),
    );
    let status = page.eval("document.getElementById('status').dataset.state + ': ' + document.getElementById('status').textContent");
    assert!(
        status
            .as_str()
            .is_some_and(|s| s.starts_with("partial") && s.contains("2 of 3")),
        "{status}"
    );
    let cards = page.eval(
        "Array.from(document.querySelectorAll('.result')).map(r => ({ \
            text: r.querySelector('.text') ? r.querySelector('.text').textContent : null, \
            error: r.querySelector('.error') ? r.querySelector('.error').textContent : null }))",
    );
    let cards = cards.as_array().expect("cards").clone();
    assert_eq!(cards.len(), 3, "{cards:?}");
    assert_eq!(cards[0]["text"], api_text[0], "{cards:?}");
    assert_eq!(cards[2]["text"], api_text[1], "{cards:?}");
    assert!(cards[1]["text"].is_null(), "{cards:?}");
    assert!(
        cards[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("broken.png") && e.contains("truncated")),
        "{cards:?}"
    );

    let screenshot = page.call("Page.captureScreenshot", json!({ "format": "png" }));
    let png = base64::engine::general_purpose::STANDARD
        .decode(screenshot["data"].as_str().expect("screenshot data"))
        .expect("screenshot base64");
    assert!(png.starts_with(b"\x89PNG"));
    let path = dir.join("page.png");
    std::fs::write(&path, &png).expect("write the screenshot");
    println!("page showed {api_text:?}; screenshot: {}", path.display());

    page.close_browser();
}
