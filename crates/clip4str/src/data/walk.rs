//! One walker for folder trees (datasets, image folders, fonts). Symlinked folders are followed, as Python's
//! glob does, but each real folder once, so a link loop ends.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// One thing a walk found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A folder, before its contents.
    Folder(PathBuf),
    /// Anything that is not a folder.
    File(PathBuf),
}

/// A folder the walk could not list (or resolve), and why; the walk goes on without it.
#[derive(Debug)]
pub struct WalkError {
    /// The folder.
    pub path: PathBuf,
    /// The operating system's reason.
    pub error: std::io::Error,
}

/// Everything below `root` (itself first), depth first with each folder's entries in name order, so the
/// order is reproducible; unreadable folders come back as errors where they were met.
pub fn walk(root: &Path) -> Vec<Result<Found, WalkError>> {
    let mut out = Vec::new();
    walk_into(root, &mut HashSet::new(), &mut out);
    out
}

fn walk_into(dir: &Path, seen: &mut HashSet<PathBuf>, out: &mut Vec<Result<Found, WalkError>>) {
    let error = |error| {
        Err(WalkError {
            path: dir.to_path_buf(),
            error,
        })
    };
    let real = match dir.canonicalize() {
        Ok(real) => real,
        Err(e) => return out.push(error(e)),
    };
    if !seen.insert(real) {
        return;
    }
    out.push(Ok(Found::Folder(dir.to_path_buf())));
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return out.push(error(e)),
    };
    let mut paths = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => paths.push(entry.path()),
            Err(e) => out.push(error(e)),
        }
    }
    paths.sort();
    for path in paths {
        if path.is_dir() {
            walk_into(&path, seen, out);
        } else {
            out.push(Ok(Found::File(path)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::TempDir;

    #[test]
    fn walks_in_name_order_and_ends_link_loops() {
        let dir = TempDir::new("walk");
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/inner")).unwrap();
        for f in ["c.png", "a.png", "b/x.png", "b/inner/y.png"] {
            std::fs::write(root.join(f), b"").unwrap();
        }
        #[cfg(unix)]
        std::os::unix::fs::symlink(root, root.join("b/inner/loop")).unwrap();
        let found: Vec<String> = walk(root)
            .into_iter()
            .map(|f| match f.unwrap() {
                Found::Folder(p) => format!("{}/", p.strip_prefix(root).unwrap().display()),
                Found::File(p) => p.strip_prefix(root).unwrap().display().to_string(),
            })
            .collect();
        assert_eq!(
            found,
            [
                "/",
                "a.png",
                "b/",
                "b/inner/",
                "b/inner/y.png",
                "b/x.png",
                "c.png"
            ]
        );
        let missing = walk(&root.join("nope"));
        assert!(matches!(missing.as_slice(), [Err(WalkError { .. })]));
    }
}
