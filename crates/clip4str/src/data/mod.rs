//! Labelled text-image datasets (SPEC §13.1-13.2): the reference's LMDB layout ([`lmdb`]) and a plain image
//! folder with `labels.tsv` ([`folder`]) behind one [`Dataset`] trait, with the reference's label filtering.
//! A damaged record is an error value for that record (never a panic), so callers can count and report it.

#[cfg(feature = "train")]
pub mod augment;
pub mod folder;
pub mod lmdb;
#[cfg(feature = "train")]
pub mod loader;
pub mod stats;
#[cfg(feature = "train")]
pub mod synth;
pub mod walk;

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::charset::{filter_label, CharsetAdapter};
use crate::preprocess::{decode_rgb, ImageError};

pub use folder::FolderDataset;
pub use lmdb::{LmdbDataset, LmdbWriter};
pub use stats::{Coverage, LabelStats, LengthBin};

/// Name of the LMDB data file that marks a dataset folder.
pub const LMDB_DATA_FILE: &str = "data.mdb";

/// Name of the label file that marks an image-folder dataset.
pub const LABELS_FILE: &str = "labels.tsv";

/// Why a dataset, or one record of it, could not be read. Record-level variants carry the record's key.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read or written.
    #[error("{}: {error}", .path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's reason.
        error: std::io::Error,
    },
    /// LMDB refused an operation on the environment at `path`.
    #[error("{}: LMDB error: {error}", .path.display())]
    Lmdb {
        /// The LMDB folder.
        path: PathBuf,
        /// heed's reason.
        error: heed::Error,
    },
    /// The folder holds neither `data.mdb` nor `labels.tsv`.
    #[error("{}: not a dataset (no data.mdb, no labels.tsv)", .path.display())]
    NotADataset {
        /// The folder that was given.
        path: PathBuf,
    },
    /// A key the record needs is absent (e.g. `label-000000007`).
    #[error("{}: key {key} is missing", .path.display())]
    MissingKey {
        /// The LMDB folder.
        path: PathBuf,
        /// The missing key.
        key: String,
    },
    /// A label is not valid UTF-8 (the reference would raise `UnicodeDecodeError`).
    #[error("{}: {key}: label is not valid UTF-8", .path.display())]
    InvalidUtf8 {
        /// The LMDB folder or the label file.
        path: PathBuf,
        /// The LMDB key, or `line N` of a label file.
        key: String,
    },
    /// `num-samples` is not a decimal count, or exceeds what the database holds.
    #[error("{}: num-samples {value:?} {reason}", .path.display())]
    BadNumSamples {
        /// The LMDB folder.
        path: PathBuf,
        /// The stored value (lossily decoded).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A line of a label file is not `filename<TAB>label`.
    #[error("{}: {key}: {reason}", .path.display())]
    BadRecord {
        /// The label file.
        path: PathBuf,
        /// `line N` (1-based).
        key: String,
        /// What is wrong with the line.
        reason: String,
    },
    /// A record's image bytes do not decode.
    #[error("{key}: {error}")]
    Image {
        /// The record key (`image-000000003`, or the file name).
        key: String,
        /// The decoder's reason.
        error: ImageError,
    },
    /// A record index past the end of the dataset.
    #[error("{name}: index {index} is out of range (dataset has {len} records)")]
    IndexOutOfRange {
        /// The dataset name.
        name: String,
        /// The requested 0-based index.
        index: usize,
        /// The number of records.
        len: usize,
    },
    /// A synthetic-dataset spec (`.toml`) is malformed or names nothing usable.
    #[error("{}: {reason}", .path.display())]
    BadSynthSpec {
        /// The spec file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `data.mdb` is shorter than its own meta page says (an interrupted copy or download); mapping it would
    /// crash the process with SIGBUS on the first read past the end.
    #[error("{}: truncated LMDB file: {size} bytes, but its header needs {needed}", .path.display())]
    TruncatedLmdb {
        /// The `data.mdb` file.
        path: PathBuf,
        /// Its size on disk.
        size: u64,
        /// The size its newest meta page implies.
        needed: u64,
    },
    /// The writer refuses to overwrite an existing LMDB.
    #[error("{}: already exists; refusing to overwrite it", .path.display())]
    AlreadyExists {
        /// The existing `data.mdb`.
        path: PathBuf,
    },
}

impl DataError {
    /// The record key the error is about, when it concerns one record, for per-record reports.
    pub fn key(&self) -> Option<&str> {
        match self {
            DataError::MissingKey { key, .. }
            | DataError::InvalidUtf8 { key, .. }
            | DataError::BadRecord { key, .. }
            | DataError::Image { key, .. } => Some(key),
            _ => None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DataError {
        let path = path.into();
        move |source| DataError::Io {
            path,
            error: source,
        }
    }
}

/// One raw record: what the dataset stores, before label filtering or image decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Stable record identifier for reports: `image-%09d` in an LMDB, the file name in a folder.
    pub key: String,
    /// The label as stored (UTF-8), before whitespace removal, normalisation and the charset adapter.
    pub label_raw: String,
    /// The encoded image file (JPEG, PNG, ...).
    pub image_bytes: Vec<u8>,
}

impl Sample {
    /// Decodes the image like the reference (`Image.open(..).convert('RGB')`), naming the record on failure.
    pub fn decode_rgb(&self) -> Result<RgbImage, DataError> {
        decode_rgb(&self.image_bytes).map_err(|source| DataError::Image {
            key: self.key.clone(),
            error: source,
        })
    }
}

/// The outcome of `LmdbDataset._preprocess_labels` (SPEC §13.2): which records survive and with which label,
/// plus the records that could not be read at all.
#[derive(Debug, Default)]
pub struct FilteredLabels {
    /// 0-based record indices (for [`Dataset::get`]) of the kept samples, in dataset order; the reference's
    /// `filtered_index_list` minus one.
    pub indices: Vec<usize>,
    /// The filtered ground truth of each kept sample (what the model is scored against).
    pub labels: Vec<String>,
    /// Records whose label could not be read (missing key, bad UTF-8, malformed line); each names its key.
    pub failed: Vec<DataError>,
}

impl FilteredLabels {
    /// Number of kept samples (the reference's `len(dataset)`).
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether no sample survived.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// Read access to a labelled image dataset, record by record. Indices are 0-based positions in storage
/// order (LMDB record `i + 1`, label-file line order); they are stable, so filtered index lists stay valid.
pub trait Dataset: Send + Sync {
    /// Short name for reports (e.g. `IIIT5k`).
    fn name(&self) -> &str;

    /// Where the dataset lives (the LMDB folder or the label file).
    fn path(&self) -> &Path;

    /// Number of stored records, before any filtering.
    fn len(&self) -> usize;

    /// Whether there are no records at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Record identifier for reports, available even when the record itself is damaged.
    fn key(&self, index: usize) -> String;

    /// The stored label of one record, unfiltered.
    fn label(&self, index: usize) -> Result<String, DataError>;

    /// The encoded image bytes of one record.
    fn image(&self, index: usize) -> Result<Vec<u8>, DataError>;

    /// Label and image of one record together.
    fn get(&self, index: usize) -> Result<Sample, DataError> {
        Ok(Sample {
            key: self.key(index),
            label_raw: self.label(index)?,
            image_bytes: self.image(index)?,
        })
    }

    /// Every stored label in order, one result per record; the outer error is for failures that concern
    /// the whole dataset. Implementations may override it to read everything in one pass.
    fn labels(&self) -> Result<Vec<Result<String, DataError>>, DataError> {
        Ok((0..self.len()).map(|index| self.label(index)).collect())
    }

    /// The reference's label filtering (SPEC §13.2, `min_image_dim = 0`): whitespace removal, NFKD to ASCII,
    /// the length limit before the charset filter, the adapter, then dropping empty labels.
    fn filtered(
        &self,
        adapter: &CharsetAdapter,
        max_label_length: usize,
        remove_whitespace: bool,
        normalize_unicode: bool,
    ) -> Result<FilteredLabels, DataError> {
        let mut result = FilteredLabels::default();
        for (index, label) in self.labels()?.into_iter().enumerate() {
            match label {
                Ok(raw) => {
                    if let Some(label) = filter_label(
                        &raw,
                        adapter,
                        max_label_length,
                        remove_whitespace,
                        normalize_unicode,
                    ) {
                        result.indices.push(index);
                        result.labels.push(label);
                    }
                }
                Err(error) => result.failed.push(error),
            }
        }
        Ok(result)
    }
}

/// Opens a dataset folder: an LMDB (has `data.mdb`) or an image folder (has `labels.tsv`); a path to a `.tsv`
/// file opens that label file with images relative to its folder, and a `.toml` file is a synthetic dataset
/// rendered on the fly ([`synth::SynthDataset`]). The name is the folder's last component.
pub fn open_dataset(path: impl AsRef<Path>) -> Result<Box<dyn Dataset>, DataError> {
    let path = path.as_ref();
    let name = default_name(path);
    open_dataset_as(path, &name)
}

/// [`open_dataset`] with an explicit report name (e.g. the relative path from [`discover_datasets`]).
pub fn open_dataset_as(path: impl AsRef<Path>, name: &str) -> Result<Box<dyn Dataset>, DataError> {
    let path = path.as_ref();
    if path.is_file() {
        if path.file_name().is_some_and(|n| n == LMDB_DATA_FILE) {
            let folder = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            return Ok(Box::new(LmdbDataset::open(folder)?.with_name(name)));
        }
        if path.extension().is_some_and(|e| e == "toml") {
            #[cfg(feature = "train")]
            return Ok(Box::new(synth::SynthDataset::open(path, name)?));
            #[cfg(not(feature = "train"))]
            return Err(DataError::BadSynthSpec {
                path: path.to_path_buf(),
                reason: "synthetic datasets need the `train` feature of the clip4str crate".into(),
            });
        }
        return Ok(Box::new(FolderDataset::from_tsv(path)?.with_name(name)));
    }
    if path.join(LMDB_DATA_FILE).is_file() {
        return Ok(Box::new(LmdbDataset::open(path)?.with_name(name)));
    }
    if path.join(LABELS_FILE).is_file() {
        return Ok(Box::new(FolderDataset::open(path)?.with_name(name)));
    }
    if !path.exists() {
        return Err(DataError::Io {
            path: path.to_owned(),
            error: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    Err(DataError::NotADataset {
        path: path.to_owned(),
    })
}

/// A label file's dataset is named after its folder (`labels.tsv`) or `folder/stem` for other file names, so
/// that alternative label files of one folder stay distinguishable.
pub(crate) fn default_name(path: &Path) -> String {
    let last = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string())
    };
    if path.is_file() {
        let folder = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| last(&p.canonicalize().unwrap_or_else(|_| p.to_owned())))
            .unwrap_or_default();
        if path
            .file_name()
            .is_some_and(|n| n == LABELS_FILE || n == LMDB_DATA_FILE)
        {
            return folder;
        }
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        return if folder.is_empty() {
            stem
        } else {
            format!("{folder}/{stem}")
        };
    }
    last(&path.canonicalize().unwrap_or_else(|_| path.to_owned()))
}

/// Finds every dataset under `root` like the reference's test/val loaders: when `root/test` exists the search
/// starts there (test sets live at `data_root/test/<name>`). Every folder holding `data.mdb` counts (recursive,
/// like `build_tree_dataset`'s `**/data.mdb` glob), and so does every folder holding `labels.tsv` but no
/// `data.mdb`. Names are the paths relative to the search root with `/` separators (`IIIT5k`, `real/ArT`), or
/// the root's own name when the root itself is a dataset; the list is sorted by name.
pub fn discover_datasets(root: impl AsRef<Path>) -> Result<Vec<(String, PathBuf)>, DataError> {
    let root = root.as_ref();
    let test = root.join("test");
    find_datasets(if test.is_dir() { &test } else { root })
}

/// Every folder below `base` holding `data.mdb` or `labels.tsv`, named by its path relative to `base` with `/`
/// separators (`base`'s own name when it is one), sorted by name; an unreadable folder is an error.
pub(crate) fn find_datasets(base: &Path) -> Result<Vec<(String, PathBuf)>, DataError> {
    let mut found = Vec::new();
    for item in walk::walk(base) {
        let dir = match item {
            Ok(walk::Found::Folder(dir)) => dir,
            Ok(walk::Found::File(_)) => continue,
            Err(walk::WalkError { path, error }) => return Err(DataError::Io { path, error }),
        };
        if dir.join(LMDB_DATA_FILE).is_file() || dir.join(LABELS_FILE).is_file() {
            let relative = dir.strip_prefix(base).unwrap_or(&dir);
            let name = if relative.as_os_str().is_empty() {
                default_name(&dir)
            } else {
                relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/")
            };
            found.push((name, dir));
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh folder under the system temp dir, removed on drop (tests only; no extra dependency).
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let path = std::env::temp_dir().join(format!(
                "clip4str-{tag}-{}-{}-{nanos}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).expect("temp dir is writable");
            Self(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::TempDir;
    use super::*;
    use crate::charset::{CHARSET_36, CHARSET_94};

    #[test]
    fn discovery_prefers_test_folder_and_sorts() {
        let tmp = TempDir::new("discover");
        let test = tmp.path().join("test");
        for name in ["SVT", "IIIT5k"] {
            let mut writer = LmdbWriter::create(test.join(name)).expect("create");
            writer.push(b"x", "a").expect("push");
            writer.finish().expect("finish");
        }
        std::fs::create_dir_all(test.join("nested/folder")).expect("mkdir");
        std::fs::write(test.join("nested/folder/labels.tsv"), "a.png\tA\n").expect("write");
        std::fs::create_dir_all(test.join("empty")).expect("mkdir");
        let found = discover_datasets(tmp.path()).expect("discover");
        let names: Vec<_> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["IIIT5k", "SVT", "nested/folder"]);
        // Without a test/ subfolder the root itself is searched; a dataset root is named after itself.
        let svt = discover_datasets(test.join("SVT")).expect("discover");
        assert_eq!(svt, vec![("SVT".to_owned(), test.join("SVT"))]);

        let dataset = open_dataset(test.join("IIIT5k")).expect("open");
        assert_eq!((dataset.name(), dataset.len()), ("IIIT5k", 1));
        let folder = open_dataset_as(test.join("nested/folder"), "x").expect("open");
        assert_eq!((folder.name(), folder.len()), ("x", 1));
        assert!(matches!(
            open_dataset(test.join("empty")),
            Err(DataError::NotADataset { .. })
        ));
        assert!(matches!(
            open_dataset(test.join("missing")),
            Err(DataError::Io { .. })
        ));
    }

    #[test]
    fn filtering_follows_the_reference_order() {
        let tmp = TempDir::new("filter");
        let labels = [
            "Chicken",
            "  spaced  out ",
            "caf\u{e9}",
            "\u{4e2d}\u{6587}",
            "aaaaaaaaaaaaaaaaaaaaaaaaaa",
            "!!!",
            "",
        ];
        let mut writer = LmdbWriter::create(tmp.path()).expect("create");
        for label in labels {
            writer.push(b"img", label).expect("push");
        }
        writer.finish().expect("finish");
        let dataset = open_dataset(tmp.path()).expect("open");
        let train = dataset
            .filtered(&CharsetAdapter::new(CHARSET_94), 25, true, true)
            .expect("filter");
        assert_eq!(train.indices, [0, 1, 2, 5]);
        assert_eq!(train.labels, ["Chicken", "spacedout", "cafe", "!!!"]);
        let test = dataset
            .filtered(&CharsetAdapter::new(CHARSET_36), 25, true, true)
            .expect("filter");
        assert_eq!(test.indices, [0, 1, 2]);
        assert_eq!(test.labels, ["chicken", "spacedout", "cafe"]);
        assert!(test.failed.is_empty() && test.len() == 3 && !test.is_empty());
        let sample = dataset.get(1).expect("get");
        assert_eq!(sample.key, "image-000000002");
        assert_eq!(sample.label_raw, "  spaced  out ");
        assert_eq!(sample.image_bytes, b"img");
        match sample.decode_rgb() {
            Err(error @ DataError::Image { .. }) => {
                assert_eq!(error.key(), Some("image-000000002"));
                assert!(error.to_string().starts_with("image-000000002: "));
            }
            other => panic!("expected an image error, got {other:?}"),
        }
    }
}
