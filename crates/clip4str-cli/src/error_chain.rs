//! How an error reaches the terminal: one line (`{:#}`), each file and cause named once. The library's errors
//! print their cause or return it from `source()`, never both, so the chain has no repeats of its own; what is
//! left is a context that would name a file the error already names.

/// Adds "`what` `path`" to `err` unless its message already names the file: most library errors start with the
/// path (often a file inside it), and naming it twice only makes the line longer.
pub(crate) fn name_path_once<E>(err: E, path: &std::path::Path, what: &str) -> anyhow::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    let named = path.display().to_string();
    if err.to_string().contains(&named) {
        anyhow::Error::new(err)
    } else {
        anyhow::Error::new(err).context(format!("{what} {named}"))
    }
}

#[cfg(test)]
mod tests {
    use super::name_path_once;

    #[test]
    fn a_path_the_error_already_names_is_not_added_again() {
        let dir = std::path::Path::new("/data/svt");
        let named = std::io::Error::other("/data/svt/data.mdb: truncated LMDB file");
        assert_eq!(
            format!("{:#}", name_path_once(named, dir, "opening")),
            "/data/svt/data.mdb: truncated LMDB file"
        );
        let unnamed = std::io::Error::other("wrong tensor shape");
        assert_eq!(
            format!("{:#}", name_path_once(unnamed, dir, "opening")),
            "opening /data/svt: wrong tensor shape"
        );
    }
}
