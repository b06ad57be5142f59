//! Error type of the scan engine.

use std::fmt;
use std::path::PathBuf;

/// Where in the input an error is.
///
/// * `record`: 1-based index of the record among the non-blank records of
///   the file, **the header counting as record 1** when there is one (so the
///   first data row is record 2 with a header, record 1 without);
/// * `line`: 1-based physical line (`\n`-separated) of the offending cell or,
///   for a ragged row, of the record's first byte;
/// * `byte`: 0-based byte offset of the same place (a BOM counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub record: u64,
    pub line: u64,
    pub byte: u64,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "record {} (line {}, byte {})",
            self.record, self.line, self.byte
        )
    }
}

/// Everything `sum_file` / `sum_bytes` can fail with. Errors in the data are
/// always the *first* one in file order, whatever the block size and thread
/// count.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    #[error("no column named {0:?}")]
    UnknownColumn(String),
    #[error("column index {index} is out of range: the file has {ncols} columns")]
    ColumnOutOfRange { index: usize, ncols: usize },
    /// `text` is the unquoted, unescaped cell, cut to 80 characters.
    #[error("{at}: column {column} ({name:?}): not a number: {text:?}")]
    NotANumber {
        at: Location,
        column: usize,
        name: String,
        text: String,
    },
    #[error("{at}: column {column} ({name:?}): invalid UTF-8")]
    InvalidUtf8 {
        at: Location,
        column: usize,
        name: String,
    },
    #[error("{at}: expected {expected} fields, found {found}")]
    Ragged {
        at: Location,
        expected: usize,
        found: usize,
    },
    /// A `"` inside an unquoted field, or anything but a separator or line end
    /// after a closing quote (strict RFC 4180).
    #[error("{at}: column {column} ({name:?}): {what}")]
    Malformed {
        at: Location,
        column: usize,
        name: String,
        what: &'static str,
    },
    #[error("{at}: quoted field not closed before end of file")]
    UnterminatedQuote { at: Location },
    #[error("cancelled")]
    Cancelled,
    /// The file shrank, or was rewritten in place, while it was scanned: the sums (or a
    /// data error) would come from a mix of two versions, so there are none. Sizes in
    /// bytes: when the scan began, and when the change was seen.
    #[error("changed during the scan ({})", change(*.before, *.after))]
    Changed { before: u64, after: u64 },
    #[error("cannot start worker threads: {0}")]
    ThreadPool(String),
    /// A broken internal invariant (chunk boundaries disagreeing); a bug.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

fn change(before: u64, after: u64) -> String {
    if before == after {
        format!("modified in place, size {before} unchanged")
    } else {
        format!("size {before} -> {after}")
    }
}
