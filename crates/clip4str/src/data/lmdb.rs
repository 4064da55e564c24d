//! The reference's LMDB dataset layout (SPEC §13.1, `strhub/data/dataset.py`, `tools/create_lmdb_dataset.py`):
//! ASCII keys `num-samples` (decimal count), `label-%09d` (UTF-8) and `image-%09d` (encoded image), numbered
//! from 1. Reading opens the environment read-only without a lock file, like `lmdb.open(.., readonly=True,
//! lock=False, readahead=False)`, so read-only folders and lock-less copies work.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, EnvFlags, EnvOpenOptions, MdbError};

use super::{DataError, Dataset, LMDB_DATA_FILE};

/// Key of the record count.
pub const NUM_SAMPLES_KEY: &str = "num-samples";

/// Key of record `index`'s label (`index` counts from 1, as in the reference).
pub fn label_key(index: usize) -> String {
    format!("label-{index:09}")
}

/// Key of record `index`'s image bytes (`index` counts from 1).
pub fn image_key(index: usize) -> String {
    format!("image-{index:09}")
}

/// An opened environment and its unnamed database, shared by every dataset over the same folder: heed allows
/// one open environment per path and process, so datasets must not each open their own.
struct SharedEnv {
    env: Env,
    db: Database<'static, Bytes, Bytes>,
}

/// Read-only environments currently open in this process, by canonical path; an entry dies with its last
/// dataset, which closes the environment.
static OPEN_ENVS: Mutex<Vec<(PathBuf, Weak<SharedEnv>)>> = Mutex::new(Vec::new());

fn lmdb_error(path: &Path) -> impl FnOnce(heed::Error) -> DataError + '_ {
    move |source| DataError::Lmdb {
        path: path.to_owned(),
        error: source,
    }
}

fn open_env_read_only(path: &Path) -> heed::Result<Env> {
    let mut options = EnvOpenOptions::new();
    // SAFETY: NO_LOCK gives up LMDB's reader/writer coordination; this environment only ever reads, and
    // datasets are inputs that nothing in this process writes while they are open (the reference opens them
    // with lock=False too). Modifying the file from elsewhere while it is mapped is the caller's error, as
    // with any memory-mapped file.
    unsafe {
        options.flags(EnvFlags::READ_ONLY | EnvFlags::NO_LOCK | EnvFlags::NO_READ_AHEAD);
        options.open(path)
    }
}

/// Byte offsets inside an LMDB meta page of a 64-bit build (`mdb.c`: 16-byte page header, then `MDB_meta`).
const META_MAGIC: usize = 16;
const META_VERSION: usize = 20;
const META_PAGE_SIZE: usize = 40; // mm_dbs[FREE_DBI].md_pad holds the page size
const META_LAST_PAGE: usize = 136;
const META_TXNID: usize = 144;
const LMDB_MAGIC: u32 = 0xBEEF_C0DE;

/// Refuses a `data.mdb` shorter than its newest meta page's last page. LMDB maps the file and trusts its
/// header, so a truncated copy would otherwise kill the process with SIGBUS instead of returning an error.
/// Files this layout does not recognise (another word size or byte order) are left to LMDB's own checks.
fn check_not_truncated(data_file: &Path) -> Result<(), DataError> {
    use std::io::{Read, Seek, SeekFrom};
    let io = DataError::io;
    let mut file = std::fs::File::open(data_file).map_err(io(data_file))?;
    let size = file.metadata().map_err(io(data_file))?.len();
    let u32_at =
        |b: &[u8], at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let u64_at =
        |b: &[u8], at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let mut first = [0u8; META_TXNID + 8];
    if size < first.len() as u64 {
        return Ok(()); // too short to be LMDB at all: LMDB says so itself
    }
    file.read_exact(&mut first).map_err(io(data_file))?;
    if u32_at(&first, META_MAGIC) != LMDB_MAGIC || u32_at(&first, META_VERSION) != 1 {
        return Ok(());
    }
    let page_size = u64::from(u32_at(&first, META_PAGE_SIZE));
    if !(512..=1 << 20).contains(&page_size) || !page_size.is_power_of_two() {
        return Ok(());
    }
    // Both meta pages must be present; the newer one (larger txnid) is the one LMDB uses.
    let mut needed = 2 * page_size;
    if size >= needed {
        let mut second = [0u8; META_TXNID + 8];
        file.seek(SeekFrom::Start(page_size))
            .and_then(|_| file.read_exact(&mut second))
            .map_err(io(data_file))?;
        let newest = if u32_at(&second, META_MAGIC) == LMDB_MAGIC
            && u64_at(&second, META_TXNID) > u64_at(&first, META_TXNID)
        {
            &second
        } else {
            &first
        };
        needed = u64_at(newest, META_LAST_PAGE)
            .saturating_add(1)
            .saturating_mul(page_size);
    }
    if size < needed {
        return Err(DataError::TruncatedLmdb {
            path: data_file.to_owned(),
            size,
            needed,
        });
    }
    Ok(())
}

fn open_shared_read_only(path: &Path) -> Result<Arc<SharedEnv>, DataError> {
    let canonical = path.canonicalize().map_err(DataError::io(path))?;
    let mut registry = OPEN_ENVS.lock().unwrap_or_else(PoisonError::into_inner);
    registry.retain(|(_, shared)| shared.strong_count() > 0);
    if let Some(shared) = registry
        .iter()
        .filter(|(open_path, _)| *open_path == canonical)
        .find_map(|(_, shared)| shared.upgrade())
    {
        return Ok(shared);
    }
    let env = match open_env_read_only(&canonical) {
        Err(heed::Error::EnvAlreadyOpened) => {
            // The last dataset over this folder may still be closing on another thread (or a writer has it
            // open): give it a moment, then try once more.
            if let Some(closing) = heed::env_closing_event(&canonical) {
                closing.wait_timeout(Duration::from_secs(5));
            }
            open_env_read_only(&canonical)
        }
        other => other,
    }
    .map_err(lmdb_error(path))?;
    let rtxn = env.read_txn().map_err(lmdb_error(path))?;
    let db = env
        .open_databases_and_commit(rtxn, |opener, rtxn| {
            opener
                .open_database::<Bytes, Bytes>(rtxn, None)
                .map(CommitOrAbort::<_, ()>::Commit)
        })
        .map_err(lmdb_error(path))?
        .unwrap_commit()
        .ok_or_else(|| DataError::Lmdb {
            path: path.to_owned(),
            error: heed::Error::Mdb(MdbError::NotFound),
        })?;
    let shared = Arc::new(SharedEnv { env, db });
    registry.push((canonical, Arc::downgrade(&shared)));
    Ok(shared)
}

/// A reference-format LMDB dataset, read-only. Record `i` (0-based) is LMDB index `i + 1`; each record is
/// read in its own short read transaction, so the dataset can be shared across threads.
pub struct LmdbDataset {
    name: String,
    path: PathBuf,
    shared: Arc<SharedEnv>,
    num_samples: usize,
}

impl std::fmt::Debug for LmdbDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmdbDataset")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("num_samples", &self.num_samples)
            .finish()
    }
}

impl LmdbDataset {
    /// Opens the LMDB in folder `path` (which holds `data.mdb`) and reads `num-samples`; the name defaults to
    /// the folder's name.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let data_file = path.join(LMDB_DATA_FILE);
        if !data_file.is_file() {
            return Err(DataError::Io {
                path: data_file,
                error: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        check_not_truncated(&data_file)?;
        let shared = open_shared_read_only(path)?;
        let rtxn = shared.env.read_txn().map_err(lmdb_error(path))?;
        let stored = shared
            .db
            .get(&rtxn, NUM_SAMPLES_KEY.as_bytes())
            .map_err(lmdb_error(path))?
            .ok_or_else(|| DataError::MissingKey {
                path: path.to_owned(),
                key: NUM_SAMPLES_KEY.to_owned(),
            })?;
        let value = String::from_utf8_lossy(stored).into_owned();
        let num_samples = value
            .trim()
            .parse::<usize>()
            .map_err(|_| DataError::BadNumSamples {
                path: path.to_owned(),
                value: value.clone(),
                reason: "is not a decimal count".to_owned(),
            })?;
        // Every record has two keys, so a larger count is corrupt; refusing it also keeps a damaged count from
        // driving huge allocations.
        let entries = shared.db.len(&rtxn).map_err(lmdb_error(path))?;
        if num_samples as u64 > entries {
            return Err(DataError::BadNumSamples {
                path: path.to_owned(),
                value,
                reason: format!("exceeds the {entries} entries stored"),
            });
        }
        drop(rtxn);
        let name = path
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| path.display().to_string());
        Ok(Self {
            name,
            path: path.to_owned(),
            shared,
            num_samples,
        })
    }

    /// Renames the dataset for reports (e.g. to its path relative to a data root).
    pub fn with_name(mut self, name: &str) -> Self {
        name.clone_into(&mut self.name);
        self
    }

    fn lmdb_index(&self, index: usize) -> Result<usize, DataError> {
        if index < self.num_samples {
            Ok(index + 1)
        } else {
            Err(DataError::IndexOutOfRange {
                name: self.name.clone(),
                index,
                len: self.num_samples,
            })
        }
    }

    fn read(&self, key: &str) -> Result<Vec<u8>, DataError> {
        let rtxn = self.shared.env.read_txn().map_err(lmdb_error(&self.path))?;
        self.read_in(&rtxn, key)
    }

    fn read_in(&self, rtxn: &heed::RoTxn, key: &str) -> Result<Vec<u8>, DataError> {
        self.shared
            .db
            .get(rtxn, key.as_bytes())
            .map_err(lmdb_error(&self.path))?
            .map(<[u8]>::to_vec)
            .ok_or_else(|| DataError::MissingKey {
                path: self.path.clone(),
                key: key.to_owned(),
            })
    }

    fn decode_label(&self, key: String, bytes: Vec<u8>) -> Result<String, DataError> {
        String::from_utf8(bytes).map_err(|_| DataError::InvalidUtf8 {
            path: self.path.clone(),
            key,
        })
    }
}

impl Dataset for LmdbDataset {
    fn name(&self) -> &str {
        &self.name
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> usize {
        self.num_samples
    }

    fn key(&self, index: usize) -> String {
        image_key(index + 1)
    }

    fn label(&self, index: usize) -> Result<String, DataError> {
        let key = label_key(self.lmdb_index(index)?);
        let bytes = self.read(&key)?;
        self.decode_label(key, bytes)
    }

    fn image(&self, index: usize) -> Result<Vec<u8>, DataError> {
        self.read(&image_key(self.lmdb_index(index)?))
    }

    fn labels(&self) -> Result<Vec<Result<String, DataError>>, DataError> {
        let rtxn = self.shared.env.read_txn().map_err(lmdb_error(&self.path))?;
        Ok((1..=self.num_samples)
            .map(|index| {
                let key = label_key(index);
                let bytes = self.read_in(&rtxn, &key)?;
                self.decode_label(key, bytes)
            })
            .collect())
    }
}

/// Writes a reference-format LMDB (what `tools/create_lmdb_dataset.py` produces): records are buffered and
/// committed in batches, the memory map grows on demand, and [`LmdbWriter::finish`] stores `num-samples`.
/// A writer dropped without `finish` leaves no valid dataset (no count), like an interrupted reference run.
pub struct LmdbWriter {
    path: PathBuf,
    env: Env,
    db: Database<'static, Bytes, Bytes>,
    map_size: usize,
    written: usize,
    pending: Vec<(Vec<u8>, String)>,
    pending_bytes: usize,
}

impl std::fmt::Debug for LmdbWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmdbWriter")
            .field("path", &self.path)
            .field("len", &self.len())
            .finish()
    }
}

/// First map size; LMDB files are sparse, so only written pages take disk space.
const INITIAL_MAP_SIZE: usize = 256 << 20;
/// Largest map the writer grows to before giving up (a record would need to be absurdly large).
const MAX_MAP_SIZE: usize = {
    let limit = 1u64 << 40;
    if limit > usize::MAX as u64 {
        usize::MAX / 2 + 1
    } else {
        limit as usize
    }
};
/// Records per write transaction (the reference commits every 1000).
const RECORDS_PER_COMMIT: usize = 1000;
/// Buffered image bytes that force a commit, bounding the writer's memory.
const BYTES_PER_COMMIT: usize = 64 << 20;

impl LmdbWriter {
    /// Creates a new LMDB in folder `dir` (created if needed). Refuses a folder that already holds `data.mdb`,
    /// so that an existing dataset is never mixed with new records.
    pub fn create(dir: impl AsRef<Path>) -> Result<Self, DataError> {
        Self::create_with_map_size(dir.as_ref(), INITIAL_MAP_SIZE)
    }

    fn create_with_map_size(dir: &Path, map_size: usize) -> Result<Self, DataError> {
        let path = dir.to_owned();
        std::fs::create_dir_all(&path).map_err(DataError::io(&path))?;
        let data_file = path.join(LMDB_DATA_FILE);
        if data_file.exists() {
            return Err(DataError::AlreadyExists { path: data_file });
        }
        let mut options = EnvOpenOptions::new();
        options.map_size(map_size);
        // SAFETY: a fresh environment with LMDB's normal locking; this writer is its only user in the process
        // (heed refuses a second open of the same path), and the map is only resized between transactions.
        let env = unsafe { options.open(&path) }.map_err(lmdb_error(&path))?;
        let wtxn = env.write_txn().map_err(lmdb_error(&path))?;
        let db = env
            .create_databases_and_commit(wtxn, |opener, wtxn| {
                opener
                    .create_database::<Bytes, Bytes>(wtxn, None)
                    .map(CommitOrAbort::<_, ()>::Commit)
            })
            .map_err(lmdb_error(&path))?
            .unwrap_commit();
        Ok(Self {
            path,
            env,
            db,
            map_size,
            written: 0,
            pending: Vec::new(),
            pending_bytes: 0,
        })
    }

    /// Appends one record and returns its 1-based LMDB index. The label is stored as given (the reference
    /// filters labels at read time, not when writing).
    pub fn push(&mut self, image_bytes: &[u8], label: &str) -> Result<usize, DataError> {
        self.pending.push((image_bytes.to_vec(), label.to_owned()));
        self.pending_bytes += image_bytes.len() + label.len();
        let index = self.len();
        if self.pending.len() >= RECORDS_PER_COMMIT || self.pending_bytes >= BYTES_PER_COMMIT {
            self.flush(false)?;
        }
        Ok(index)
    }

    /// Number of records pushed so far (committed or buffered).
    pub fn len(&self) -> usize {
        self.written + self.pending.len()
    }

    /// Whether nothing has been pushed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Commits the remaining records and `num-samples`, syncs to disk and closes; returns the record count.
    pub fn finish(mut self) -> Result<usize, DataError> {
        self.flush(true)?;
        self.env.force_sync().map_err(lmdb_error(&self.path))?;
        Ok(self.written)
    }

    /// Writes the buffered records (and the count when `with_count`) in one transaction, doubling the map
    /// whenever LMDB reports it full; the failed transaction is aborted first, so retrying is exact.
    fn flush(&mut self, with_count: bool) -> Result<(), DataError> {
        loop {
            match self.write_pending(with_count) {
                Ok(()) => break,
                Err(heed::Error::Mdb(MdbError::MapFull)) if self.map_size < MAX_MAP_SIZE => {
                    let grown = (self.map_size * 2).min(MAX_MAP_SIZE);
                    // SAFETY: the failed write transaction was dropped (aborted) inside `write_pending`, and
                    // this writer owns the only handle to the environment, so no transaction is active.
                    unsafe { self.env.resize(grown) }.map_err(lmdb_error(&self.path))?;
                    self.map_size = grown;
                }
                Err(source) => {
                    return Err(DataError::Lmdb {
                        path: self.path.clone(),
                        error: source,
                    })
                }
            }
        }
        self.written += self.pending.len();
        self.pending.clear();
        self.pending_bytes = 0;
        Ok(())
    }

    fn write_pending(&self, with_count: bool) -> heed::Result<()> {
        let mut wtxn = self.env.write_txn()?;
        for (offset, (image, label)) in self.pending.iter().enumerate() {
            let index = self.written + offset + 1;
            self.db.put(&mut wtxn, image_key(index).as_bytes(), image)?;
            self.db
                .put(&mut wtxn, label_key(index).as_bytes(), label.as_bytes())?;
        }
        if with_count {
            let count = (self.written + self.pending.len()).to_string();
            self.db
                .put(&mut wtxn, NUM_SAMPLES_KEY.as_bytes(), count.as_bytes())?;
        }
        wtxn.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::charset::{CharsetAdapter, CHARSET_94};
    use crate::data::test_util::TempDir;

    /// Writes raw key/value pairs, to build damaged datasets the writer would never produce.
    fn write_raw(dir: &Path, entries: &[(&str, &[u8])]) {
        std::fs::create_dir_all(dir).expect("mkdir");
        let mut options = EnvOpenOptions::new();
        options.map_size(16 << 20);
        let env = unsafe { options.open(dir) }.expect("open env");
        let wtxn = env.write_txn().expect("txn");
        let db = env
            .create_databases_and_commit(wtxn, |opener, wtxn| {
                opener
                    .create_database::<Bytes, Bytes>(wtxn, None)
                    .map(CommitOrAbort::<_, ()>::Commit)
            })
            .expect("db")
            .unwrap_commit();
        let mut wtxn = env.write_txn().expect("txn");
        for (key, value) in entries {
            db.put(&mut wtxn, key.as_bytes(), value).expect("put");
        }
        wtxn.commit().expect("commit");
    }

    #[test]
    fn writer_round_trip() {
        let tmp = TempDir::new("lmdb-roundtrip");
        let dir = tmp.path().join("set");
        let mut writer = LmdbWriter::create(&dir).expect("create");
        assert!(writer.is_empty());
        let count = 2 * RECORDS_PER_COMMIT + 7;
        for i in 0..count {
            let index = writer
                .push(format!("bytes{i}").as_bytes(), &format!("label {i}"))
                .expect("push");
            assert_eq!(index, i + 1);
        }
        assert_eq!(writer.finish().expect("finish"), count);
        assert!(matches!(
            LmdbWriter::create(&dir),
            Err(DataError::AlreadyExists { .. })
        ));

        let dataset = LmdbDataset::open(&dir).expect("open");
        assert_eq!((dataset.name(), dataset.len()), ("set", count));
        let sample = dataset.get(count - 1).expect("get");
        assert_eq!(sample.key, format!("image-{count:09}"));
        assert_eq!(sample.label_raw, format!("label {}", count - 1));
        assert_eq!(sample.image_bytes, format!("bytes{}", count - 1).as_bytes());
        assert!(matches!(
            dataset.get(count),
            Err(DataError::IndexOutOfRange { .. })
        ));
        // A second dataset over the same folder shares the environment instead of failing.
        let again = LmdbDataset::open(&dir)
            .expect("open twice")
            .with_name("again");
        assert_eq!(
            (again.name(), again.label(0).expect("label")),
            ("again", "label 0".to_owned())
        );
        drop((dataset, again));
        assert_eq!(LmdbDataset::open(&dir).expect("reopen").len(), count);
    }

    #[test]
    fn writer_grows_the_map() {
        let tmp = TempDir::new("lmdb-grow");
        let mut writer = LmdbWriter::create_with_map_size(tmp.path(), 1 << 20).expect("create");
        let big = vec![7u8; 400 << 10];
        for _ in 0..4 {
            writer.push(&big, "big").expect("push");
        }
        writer.flush(false).expect("flush");
        assert!(
            writer.map_size >= 2 << 20,
            "map grew to {}",
            writer.map_size
        );
        writer.push(&big, "big").expect("push");
        assert_eq!(writer.finish().expect("finish"), 5);
        let dataset = LmdbDataset::open(tmp.path()).expect("open");
        assert_eq!(dataset.image(4).expect("image").len(), big.len());
    }

    #[test]
    fn damaged_records_are_errors_with_their_key() {
        let tmp = TempDir::new("lmdb-damaged");
        write_raw(
            tmp.path(),
            &[
                ("num-samples", b" 4\n"),
                ("label-000000001", b"good"),
                ("image-000000001", b"not an image"),
                ("image-000000002", b"label missing"),
                ("label-000000003", b"\xffbad utf8"),
                ("image-000000003", b"x"),
                ("label-000000004", b"image missing"),
            ],
        );
        let dataset = LmdbDataset::open(tmp.path()).expect("open");
        assert_eq!(dataset.len(), 4);
        let filtered = dataset
            .filtered(&CharsetAdapter::new(CHARSET_94), 25, true, true)
            .expect("filter");
        assert_eq!(filtered.indices, [0, 3]);
        assert_eq!(filtered.labels, ["good", "imagemissing"]);
        let keys: Vec<_> = filtered.failed.iter().filter_map(DataError::key).collect();
        assert_eq!(keys, ["label-000000002", "label-000000003"]);
        assert!(matches!(filtered.failed[0], DataError::MissingKey { .. }));
        assert!(matches!(filtered.failed[1], DataError::InvalidUtf8 { .. }));
        assert!(filtered.failed[0]
            .to_string()
            .ends_with("key label-000000002 is missing"));

        match dataset.get(3) {
            Err(error @ DataError::MissingKey { .. }) => {
                assert_eq!(error.key(), Some("image-000000004"))
            }
            other => panic!("expected a missing image, got {other:?}"),
        }
        let sample = dataset.get(0).expect("record 1 reads");
        let error = sample.decode_rgb().expect_err("garbage image");
        assert_eq!(error.key(), Some("image-000000001"));
    }

    #[test]
    fn truncated_files_refuse_to_open() {
        let tmp = TempDir::new("lmdb-truncated");
        let whole = tmp.path().join("whole");
        let big = vec![7u8; 64 << 10];
        write_raw(&whole, &[("num-samples", b"1"), ("image-000000001", &big)]);
        let bytes = std::fs::read(whole.join(LMDB_DATA_FILE)).expect("read");
        check_not_truncated(&whole.join(LMDB_DATA_FILE)).expect("a whole file passes");
        // Cut inside the second meta page and inside the data pages: both are refused before LMDB maps them.
        for cut in [5000, bytes.len() - 4096] {
            let dir = tmp.path().join(format!("cut{cut}"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join(LMDB_DATA_FILE), &bytes[..cut]).expect("write");
            match LmdbDataset::open(&dir) {
                Err(error @ DataError::TruncatedLmdb { .. }) => {
                    let text = error.to_string();
                    assert!(
                        text.contains("truncated") && text.contains(&cut.to_string()),
                        "{text}"
                    );
                }
                other => panic!("expected a truncated file at {cut} bytes, got {other:?}"),
            }
        }
    }

    #[test]
    fn bad_counts_refuse_to_open() {
        let tmp = TempDir::new("lmdb-count");
        for (name, count) in [("text", &b"twelve"[..]), ("huge", b"99999999999")] {
            let dir = tmp.path().join(name);
            write_raw(&dir, &[("num-samples", count), ("label-000000001", b"a")]);
            assert!(matches!(
                LmdbDataset::open(&dir),
                Err(DataError::BadNumSamples { .. })
            ));
        }
        let dir = tmp.path().join("nocount");
        write_raw(&dir, &[("label-000000001", b"a")]);
        match LmdbDataset::open(&dir) {
            Err(error @ DataError::MissingKey { .. }) => {
                assert!(error.to_string().contains("num-samples"))
            }
            other => panic!("expected a missing count, got {other:?}"),
        }
        assert!(matches!(
            LmdbDataset::open(tmp.path().join("absent")),
            Err(DataError::Io { .. })
        ));
    }
}
