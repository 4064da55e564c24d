//! An image folder with a `labels.tsv` (`filename<TAB>label` per line, UTF-8, file names relative to the
//! folder): the layout of our evaluation sets, which are small enough not to need an LMDB. The label is
//! everything after the first TAB, kept verbatim (inner spaces, quotes without CSV escaping, further TABs);
//! the reference filter (SPEC §13.2) later removes whitespace as for LMDB labels.

use std::path::{Path, PathBuf};

use super::{default_name, DataError, Dataset, LABELS_FILE};

/// One line of the label file: a usable record, or why it is not one.
#[derive(Debug, Clone)]
enum Entry {
    Record {
        file: String,
        label: String,
        line: usize,
    },
    InvalidUtf8 {
        line: usize,
    },
    Malformed {
        line: usize,
        reason: &'static str,
    },
}

/// A labelled image folder. Records are the non-blank lines of the label file in order; a malformed line is
/// still a record (so indices follow the file) whose label and image are errors naming `line N`.
#[derive(Debug, Clone)]
pub struct FolderDataset {
    name: String,
    labels_file: PathBuf,
    root: PathBuf,
    entries: Vec<Entry>,
}

/// Header names recognised on the first line (`filename<TAB>label` and close variants), compared
/// case-insensitively; such a line is skipped rather than read as an image called `filename`.
const HEADER_FILE_NAMES: &[&str] = &[
    "filename",
    "file",
    "file_name",
    "image",
    "image_path",
    "path",
];
const HEADER_LABEL_NAMES: &[&str] = &["label", "text", "transcription", "gt"];

impl FolderDataset {
    /// Opens folder `dir` through its `labels.tsv`; the name is the folder's name.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, DataError> {
        Self::from_tsv(dir.as_ref().join(LABELS_FILE))
    }

    /// Opens any label file of this format; image names are relative to the file's folder. Alternative label
    /// files (e.g. `labels_cs_punct.tsv`) are named `folder/stem`.
    pub fn from_tsv(labels_file: impl AsRef<Path>) -> Result<Self, DataError> {
        let labels_file = labels_file.as_ref();
        let root = labels_file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Self::from_tsv_with_root(labels_file, root)
    }

    /// Opens a label file whose image names are relative to `root` rather than to the file's own folder
    /// (a label file kept apart from its images); named like [`FolderDataset::from_tsv`].
    pub fn from_tsv_with_root(
        labels_file: impl AsRef<Path>,
        root: impl AsRef<Path>,
    ) -> Result<Self, DataError> {
        let labels_file = labels_file.as_ref();
        let bytes = std::fs::read(labels_file).map_err(DataError::io(labels_file))?;
        Ok(Self {
            name: default_name(labels_file),
            labels_file: labels_file.to_owned(),
            root: root.as_ref().to_owned(),
            entries: parse_labels(&bytes),
        })
    }

    /// Renames the dataset for reports.
    pub fn with_name(mut self, name: &str) -> Self {
        name.clone_into(&mut self.name);
        self
    }

    /// The folder image names are resolved against.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The 1-based line of the label file that record `index` comes from, for reports.
    pub fn line(&self, index: usize) -> Option<usize> {
        match self.entries.get(index)? {
            Entry::Record { line, .. }
            | Entry::InvalidUtf8 { line }
            | Entry::Malformed { line, .. } => Some(*line),
        }
    }

    fn entry(&self, index: usize) -> Result<&Entry, DataError> {
        self.entries
            .get(index)
            .ok_or_else(|| DataError::IndexOutOfRange {
                name: self.name.clone(),
                index,
                len: self.entries.len(),
            })
    }

    fn record(&self, index: usize) -> Result<(&str, &str), DataError> {
        match self.entry(index)? {
            Entry::Record { file, label, .. } => Ok((file, label)),
            Entry::InvalidUtf8 { line } => Err(DataError::InvalidUtf8 {
                path: self.labels_file.clone(),
                key: format!("line {line}"),
            }),
            Entry::Malformed { line, reason } => Err(DataError::BadRecord {
                path: self.labels_file.clone(),
                key: format!("line {line}"),
                reason: (*reason).to_owned(),
            }),
        }
    }
}

/// Splits the label file into entries: UTF-8 BOM dropped, `\n` or `\r\n` line ends, blank lines and a
/// recognised header line skipped, the label split off at the first TAB.
fn parse_labels(bytes: &[u8]) -> Vec<Entry> {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let mut entries = Vec::new();
    for (line_index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = line_index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(text) = std::str::from_utf8(raw) else {
            entries.push(Entry::InvalidUtf8 { line });
            continue;
        };
        let Some((file, label)) = text.split_once('\t') else {
            entries.push(Entry::Malformed {
                line,
                reason: "no TAB between file name and label",
            });
            continue;
        };
        if line == 1 && is_header(file, label) {
            continue;
        }
        if file.trim().is_empty() {
            entries.push(Entry::Malformed {
                line,
                reason: "empty file name",
            });
            continue;
        }
        entries.push(Entry::Record {
            file: file.to_owned(),
            label: label.to_owned(),
            line,
        });
    }
    entries
}

fn is_header(file: &str, label: &str) -> bool {
    let matches = |names: &[&str], field: &str| {
        names
            .iter()
            .any(|name| name.eq_ignore_ascii_case(field.trim()))
    };
    matches(HEADER_FILE_NAMES, file) && matches(HEADER_LABEL_NAMES, label)
}

impl Dataset for FolderDataset {
    fn name(&self) -> &str {
        &self.name
    }

    fn path(&self) -> &Path {
        &self.labels_file
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn key(&self, index: usize) -> String {
        match self.entries.get(index) {
            Some(Entry::Record { file, .. }) => file.clone(),
            Some(Entry::InvalidUtf8 { line } | Entry::Malformed { line, .. }) => {
                format!("line {line}")
            }
            None => format!("#{index}"),
        }
    }

    fn label(&self, index: usize) -> Result<String, DataError> {
        self.record(index).map(|(_, label)| label.to_owned())
    }

    fn image(&self, index: usize) -> Result<Vec<u8>, DataError> {
        let (file, _) = self.record(index)?;
        let path = self.root.join(file);
        std::fs::read(&path).map_err(DataError::io(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::charset::{CharsetAdapter, CHARSET_36};
    use crate::data::test_util::TempDir;

    #[test]
    fn parses_the_quirks() {
        let text = b"\xef\xbb\xbffilename\tlabel\r\n\
            a.png\tHello World\r\n\
            \n\
            b.png\t\"SCAN\"\tx \n\
            no tab here\n\
            c.png\t\xff\n\
            \t orphan label\n\
            d.png\t\n\
            e.png\tlast";
        let entries = parse_labels(text);
        let summary: Vec<String> = entries
            .iter()
            .map(|e| match e {
                Entry::Record { file, label, .. } => format!("{file}={label}"),
                Entry::InvalidUtf8 { line } => format!("utf8@{line}"),
                Entry::Malformed { line, .. } => format!("bad@{line}"),
            })
            .collect();
        assert_eq!(
            summary,
            [
                "a.png=Hello World",
                "b.png=\"SCAN\"\tx ",
                "bad@5",
                "utf8@6",
                "bad@7",
                "d.png=",
                "e.png=last"
            ]
        );
        // A header-like line later in the file is data.
        assert_eq!(parse_labels(b"x.png\tA\nfile\tlabel\n").len(), 2);
        assert!(parse_labels(b"").is_empty());
    }

    #[test]
    fn reads_records_and_reports_bad_lines() {
        let tmp = TempDir::new("folder");
        std::fs::write(
            tmp.path().join(LABELS_FILE),
            "a.png\tCaf\u{e9} 42\nbroken line\nmissing.png\tok\nb.png\t!!\n",
        )
        .expect("write labels");
        std::fs::write(tmp.path().join("a.png"), b"A-bytes").expect("write image");
        std::fs::write(tmp.path().join("b.png"), b"B-bytes").expect("write image");
        let dataset = FolderDataset::open(tmp.path()).expect("open");
        assert_eq!(dataset.len(), 4);
        assert_eq!(dataset.key(1), "line 2");
        assert_eq!((dataset.line(2), dataset.line(4)), (Some(3), None));
        let sample = dataset.get(0).expect("record 0");
        assert_eq!(
            (sample.key.as_str(), sample.label_raw.as_str()),
            ("a.png", "Caf\u{e9} 42")
        );
        assert_eq!(sample.image_bytes, b"A-bytes");
        let filtered = dataset
            .filtered(&CharsetAdapter::new(CHARSET_36), 25, true, true)
            .expect("filter");
        assert_eq!(filtered.indices, [0, 2]);
        assert_eq!(filtered.labels, ["cafe42", "ok"]);
        assert_eq!(filtered.failed.len(), 1);
        assert_eq!(filtered.failed[0].key(), Some("line 2"));
        match dataset.image(2) {
            Err(DataError::Io { path, .. }) => assert!(path.ends_with("missing.png")),
            other => panic!("expected a missing file, got {other:?}"),
        }
        assert!(matches!(
            dataset.label(9),
            Err(DataError::IndexOutOfRange { .. })
        ));
        let alt = tmp.path().join("labels_alt.tsv");
        std::fs::write(&alt, "b.png\tx\n").expect("write");
        let alt = FolderDataset::from_tsv(&alt).expect("open alt");
        let folder_name = tmp
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        assert_eq!(alt.name(), format!("{folder_name}/labels_alt"));
        assert_eq!(alt.image(0).expect("image"), b"B-bytes");

        // A label file kept apart from its images resolves names against the given root.
        let elsewhere = TempDir::new("folder-labels");
        let apart = elsewhere.path().join("list.tsv");
        std::fs::write(&apart, "a.png\tA\n").expect("write");
        let apart = FolderDataset::from_tsv_with_root(&apart, tmp.path()).expect("open apart");
        assert_eq!(apart.root(), tmp.path());
        assert_eq!(apart.image(0).expect("image"), b"A-bytes");
    }
}
