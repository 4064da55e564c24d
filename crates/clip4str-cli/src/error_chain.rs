//! How an error reaches the terminal: one line, each file and cause named once.

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

/// The error and its causes on one line, like `{:#}`, but without the repeat that appears when a library error
/// both prints its source and returns it from `source()` (a context that would name a file its cause already names
/// is not added in the first place: [`name_path_once`]).
pub(crate) fn error_chain(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let msg = cause.to_string();
        if line.ends_with(&msg) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&msg);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::{error_chain, name_path_once};

    /// Shaped like the library's errors: the message includes the source, which is also returned.
    #[derive(Debug)]
    struct Lib {
        source: std::io::Error,
    }

    impl std::fmt::Display for Lib {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "model.ckpt: cannot read the file: {}", self.source)
        }
    }

    impl std::error::Error for Lib {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn a_cause_already_in_its_parent_message_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let err = anyhow::Error::new(Lib { source: io }).context("loading the model");
        assert_eq!(
            error_chain(&err),
            "loading the model: model.ckpt: cannot read the file: No such file"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&plain), "outer: inner");
    }

    #[test]
    fn a_path_the_error_already_names_is_not_added_again() {
        let dir = std::path::Path::new("/data/svt");
        let named = std::io::Error::other("/data/svt/data.mdb: truncated LMDB file");
        assert_eq!(
            error_chain(&name_path_once(named, dir, "opening")),
            "/data/svt/data.mdb: truncated LMDB file"
        );
        let unnamed = std::io::Error::other("wrong tensor shape");
        assert_eq!(
            error_chain(&name_path_once(unnamed, dir, "opening")),
            "opening /data/svt: wrong tensor shape"
        );
    }
}
