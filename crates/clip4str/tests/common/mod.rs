//! Helpers shared by the integration tests of `clip4str` (each test file declares `mod common;`).
// Every test file is its own crate and uses only some of these helpers; the rest would warn as dead code.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Tensor};

/// The committed fixtures at the repository root (`tests/fixtures`).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// One file or folder of the committed fixtures: `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// The shared fixtures folder (`CLIP4STR_SHARED` or its `fixtures` subfolder, else `../shared/fixtures` next to
/// the repository) if `holds` accepts it. It contains third-party photos, so it is not in the repository and
/// tests that need it skip, saying so, when this is `None`.
pub fn shared_fixtures(holds: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let p = std::env::var_os("CLIP4STR_SHARED")
        .map(PathBuf::from)
        .map(|p| {
            if p.join("fixtures").is_dir() {
                p.join("fixtures")
            } else {
                p
            }
        })
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
        });
    holds(&p).then_some(p)
}

/// An emptied, freshly created folder `clip4str-<test file>-<pid>-<name>` in the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "clip4str-{}-{}-{name}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A file path `.0` in a fresh, unique temp folder of its own; the folder is removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// A path named `name` (nothing is written yet).
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "clip4str-{}-{}-{n}",
            env!("CARGO_CRATE_NAME"),
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempFile(dir.join(name))
    }

    /// A file named `name` holding `bytes`.
    pub fn with_bytes(name: &str, bytes: &[u8]) -> Self {
        let f = Self::new(name);
        std::fs::write(&f.0, bytes).expect("write temp file");
        f
    }

    /// The folder that holds the file.
    pub fn dir(&self) -> &Path {
        self.0.parent().expect("temp file has a parent")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Emits pickle protocol 2 opcodes the way `torch.save` and TorchScript's pickler do, for test archives in
/// layouts the fixtures do not cover.
#[derive(Default)]
pub struct Pickler {
    bytes: Vec<u8>,
    /// The `requires_grad` that [`Pickler::tensor`] writes (`False` for [`Pickler::default`]).
    requires_grad: bool,
}

impl Pickler {
    /// A pickler whose tensors say `requires_grad=True` (as TorchScript parameters do).
    pub fn requiring_grad() -> Self {
        Pickler {
            bytes: Vec::new(),
            requires_grad: true,
        }
    }
    /// Raw opcode bytes.
    pub fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(bytes);
        self
    }
    /// `BINUNICODE` string.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes.push(b'X');
        self.bytes
            .extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.op(s.as_bytes())
    }
    /// `BININT` integer.
    pub fn int(&mut self, i: i32) -> &mut Self {
        self.bytes.push(b'J');
        self.op(&i.to_le_bytes())
    }
    /// `GLOBAL module.name`.
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    /// A tuple of integers.
    pub fn ints(&mut self, v: &[usize]) -> &mut Self {
        self.op(b"(");
        for &i in v {
            self.int(i as i32);
        }
        self.op(b"t")
    }
    /// `_rebuild_tensor_v2(('storage', torch.<storage>, key, 'cpu', numel), offset, shape, stride,
    /// requires_grad, OrderedDict())`
    pub fn tensor(
        &mut self,
        storage: &str,
        key: &str,
        numel: usize,
        offset: usize,
        shape: &[usize],
        stride: &[usize],
    ) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"((");
        self.str("storage")
            .global("torch", storage)
            .str(key)
            .str("cpu");
        self.int(numel as i32).op(b"tQ");
        self.int(offset as i32).ints(shape).ints(stride);
        // NEWTRUE / NEWFALSE
        self.op(if self.requires_grad { b"\x88" } else { b"\x89" })
            .global("collections", "OrderedDict")
            .op(b")Rt")
            .op(b"R")
    }
    /// `NEWOBJ` of a TorchScript class, memoised as `memo`, then the start of its attribute dict.
    pub fn module_start(&mut self, class: &str, memo: u8) -> &mut Self {
        let (module, name) = class.rsplit_once('.').expect("qualified class");
        self.global(module, name)
            .op(b")\x81")
            .op(&[b'q', memo])
            .op(b"}(")
    }
    /// End of the attribute dict (`SETITEMS`) and `BUILD`.
    pub fn module_end(&mut self) -> &mut Self {
        self.op(b"ub")
    }
    /// `STOP`, and the pickle so far (the pickler is left empty).
    pub fn finish(&mut self) -> Vec<u8> {
        self.op(b".");
        std::mem::take(&mut self.bytes)
    }
}

/// A stored (uncompressed) zip file named `name` with `entries` (entry name, bytes), like `torch.save` writes.
pub fn write_archive<S: AsRef<str>>(name: &str, entries: &[(S, Vec<u8>)]) -> TempFile {
    let f = TempFile::new(name);
    let file = std::fs::File::create(&f.0).expect("create");
    let mut zip = zip::ZipWriter::new(file);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (entry, bytes) in entries {
        zip.start_file(entry.as_ref(), options)
            .expect("start entry");
        zip.write_all(bytes).expect("write entry");
    }
    zip.finish().expect("finish zip");
    f
}

/// Little-endian bytes of `v`, as a torch storage holds them.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Every element of `t` as f32, flattened.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 values")
}

/// The largest of `values` (0 when empty); NaN if any is NaN, so that a `<= tolerance` check fails.
fn largest(values: impl Iterator<Item = f32>) -> f32 {
    values.fold(0.0, |m, v| {
        if m.is_nan() || v.is_nan() {
            f32::NAN
        } else {
            m.max(v)
        }
    })
}

/// Largest elementwise `|a - b|` (compared as f32); panics when the shapes differ.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    largest(flat(a).iter().zip(flat(b)).map(|(x, y)| (x - y).abs()))
}

/// Largest `|x|` over the elements of `t` (as f32).
pub fn max_abs(t: &Tensor) -> f32 {
    largest(flat(t).into_iter().map(f32::abs))
}
