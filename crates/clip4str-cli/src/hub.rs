//! The Hugging Face cache and downloads into it (hf-hub's blocking API over ureq): where the cache is, whether a
//! file is there, fetching it with a progress bar, and removing a cached file that is not a checkpoint.
//!
//! The cache layout is the standard one (`<cache>/models--owner--name/{blobs,snapshots,refs}`), shared with
//! Python's `huggingface_hub` and other hf-hub users. Environment, as `huggingface_hub` reads it (hf-hub 0.4
//! itself only knows `HF_HOME` and `HF_ENDPOINT`):
//! * cache: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//!   `~/.cache/huggingface/hub`;
//! * endpoint: `--endpoint`, else `HF_ENDPOINT`, else `https://huggingface.co`;
//! * offline: `--offline` or `HF_HUB_OFFLINE=1`;
//! * token: `HF_TOKEN`, else the file `$HF_HOME/token` (public repositories need none).
//!
//! Interrupted downloads resume: hf-hub writes `blobs/<etag>.part` and, on the next attempt (in the same run,
//! up to [`RETRIES`] times, or in a later run), asks for the rest with an HTTP `Range` request.

use std::io::{ErrorKind, IsTerminal};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use clip4str::checkpoint::{read_checkpoint, LoadError, RawCheckpoint};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::registry::{format_size, HubFile};

/// The public Hub.
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How often a broken-off transfer is resumed within one run before giving up.
const RETRIES: usize = 3;

/// Network policy of a command.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Use only the cache (also set by `HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Hub address; `None` means `HF_ENDPOINT` or the public Hub.
    pub endpoint: Option<String>,
}

impl HubOptions {
    fn offline(&self) -> bool {
        self.offline || env_truthy("HF_HUB_OFFLINE")
    }

    fn endpoint(&self) -> String {
        let endpoint = self
            .endpoint
            .clone()
            .or_else(|| non_empty_env("HF_ENDPOINT"))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        endpoint.trim_end_matches('/').to_string()
    }
}

/// A file in the local cache.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// `snapshots/<commit>/<file>` (a link to the blob).
    pub path: PathBuf,
    /// Whether this run downloaded it (false: it was already cached).
    pub downloaded: bool,
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `huggingface_hub`'s truth values: 1, ON, YES, TRUE (any case).
fn env_truthy(name: &str) -> bool {
    non_empty_env(name)
        .is_some_and(|v| ["1", "on", "yes", "true"].contains(&v.to_ascii_lowercase().as_str()))
}

fn hf_home() -> anyhow::Result<PathBuf> {
    if let Some(home) = non_empty_env("HF_HOME") {
        return Ok(home.into());
    }
    let cache = match non_empty_env("XDG_CACHE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::home_dir()
            .context(
                "no home directory to put the Hugging Face cache in; set HF_HOME or HF_HUB_CACHE",
            )?
            .join(".cache"),
    };
    Ok(cache.join("huggingface"))
}

/// The Hub cache folder (see the module docs for the environment variables).
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    match non_empty_env("HF_HUB_CACHE") {
        Some(dir) => Ok(dir.into()),
        None => Ok(hf_home()?.join("hub")),
    }
}

fn token() -> Option<String> {
    non_empty_env("HF_TOKEN").or_else(|| {
        let text = std::fs::read_to_string(hf_home().ok()?.join("token")).ok()?;
        Some(text.trim().to_string()).filter(|t| !t.is_empty())
    })
}

fn repo(file: &HubFile) -> Repo {
    Repo::with_revision(file.repo.clone(), RepoType::Model, file.revision.clone())
}

/// The cached copy of `file`, looked up on disk only.
pub fn cached(file: &HubFile) -> anyhow::Result<Option<PathBuf>> {
    Ok(Cache::new(cache_dir()?).repo(repo(file)).get(&file.file))
}

/// A progress bar on stderr when it is a terminal; silent otherwise.
struct DownloadBar(ProgressBar);

impl Progress for DownloadBar {
    fn init(&mut self, size: usize, _filename: &str) {
        self.0.set_length(size as u64);
        self.0.set_position(0);
    }

    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }

    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}

fn download_bar(label: &str) -> DownloadBar {
    if !std::io::stderr().is_terminal() {
        return DownloadBar(ProgressBar::hidden());
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        )
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    DownloadBar(bar)
}

/// `file` from the cache, or downloaded into it unless offline. `approx_bytes` only feeds the message.
pub fn fetch(
    file: &HubFile,
    approx_bytes: Option<u64>,
    opts: &HubOptions,
) -> anyhow::Result<Fetched> {
    let cache = cache_dir()?;
    if let Some(path) = Cache::new(cache.clone()).repo(repo(file)).get(&file.file) {
        return Ok(Fetched {
            path,
            downloaded: false,
        });
    }
    if opts.offline() {
        anyhow::bail!(
            "{}/{} is not in the Hugging Face cache {} and downloads are off (--offline or HF_HUB_OFFLINE); \
             run `clip4str models download` while online, or point HF_HOME / HF_HUB_CACHE at a cache that has it",
            file.repo,
            file.file,
            cache.display()
        );
    }
    let endpoint = opts.endpoint();
    let api = ApiBuilder::from_cache(Cache::new(cache.clone()))
        .with_endpoint(endpoint.clone())
        .with_token(token())
        .with_progress(false)
        .with_retries(RETRIES)
        .with_user_agent("clip4str", env!("CARGO_PKG_VERSION"))
        .build()
        .context("setting up the Hugging Face client")?;
    let api_repo = api.repo(repo(file));
    let url = api_repo.url(&file.file);
    let size = approx_bytes.map_or_else(String::new, |b| format!(" (~{})", format_size(Some(b))));
    eprintln!("downloading {url}{size} into {}", cache.display());
    let path = api_repo
        .download_with_progress(&file.file, download_bar(&file.file))
        .map_err(|e| explain(e, &url))?;
    Ok(Fetched {
        path,
        downloaded: true,
    })
}

/// A download error in words, with what to do about it.
fn explain(err: ApiError, url: &str) -> anyhow::Error {
    match err {
        ApiError::RequestError(inner) => match *inner {
            ureq::Error::Status(code, response) => {
                let hint = match code {
                    401 | 403 => "; the repository needs a login: set HF_TOKEN",
                    404 => "; no such repository, branch or file at this endpoint",
                    500..=599 => "; the server failed, try again later",
                    _ => "",
                };
                anyhow!("{url}: HTTP {code} {}{hint}", response.status_text())
            }
            // The transport error names the URL itself.
            ureq::Error::Transport(transport) => anyhow!("cannot reach the Hub: {transport}"),
        },
        ApiError::MissingHeader(header) => anyhow!(
            "{url}: the answer lacks the `{header}` header; is the endpoint a Hugging Face Hub (or mirror)?"
        ),
        ApiError::TooManyRetries(first) => {
            explain(*first, url).context(format!("gave up after {RETRIES} retries"))
        }
        ApiError::IoError(io) => {
            let broken_off = matches!(
                io.kind(),
                ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::TimedOut
                    | ErrorKind::BrokenPipe
            );
            let what = if broken_off {
                format!("downloading {url} broke off; run the command again to resume from the partial file")
            } else {
                format!("downloading {url} into the cache failed")
            };
            anyhow!(io).context(what)
        }
        ApiError::LockAcquisition(lock) => anyhow!(
            "another process is downloading the same file (lock {}); wait for it or remove a stale lock",
            lock.display()
        ),
        other => anyhow!("{url}: {other}"),
    }
}

/// Removes a cached file: the snapshot entry and, when it is a link, the blob it points to.
fn evict(snapshot: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(snapshot)?
        .file_type()
        .is_symlink()
    {
        std::fs::remove_file(std::fs::canonicalize(snapshot)?)?;
    }
    std::fs::remove_file(snapshot)
}

/// Reads a cached checkpoint; a file that is not one (damaged, truncated, wrong format) is removed from the
/// cache so that the next attempt downloads it again.
pub fn read_cached_checkpoint(path: &Path) -> anyhow::Result<RawCheckpoint> {
    match read_checkpoint(path) {
        Ok(raw) => Ok(raw),
        Err(
            err @ (LoadError::Corrupt { .. }
            | LoadError::UnsupportedFormat { .. }
            | LoadError::Empty { .. }),
        ) => {
            let removed = match evict(path) {
                Ok(()) => {
                    "removed it from the cache; the next download fetches it again".to_string()
                }
                Err(e) => format!(
                    "could not remove it from the cache ({e}); delete {} by hand",
                    path.display()
                ),
            };
            Err(anyhow!(err).context(format!(
                "the cached file is not a usable checkpoint; {removed}"
            )))
        }
        Err(err) => Err(err.into()),
    }
}
