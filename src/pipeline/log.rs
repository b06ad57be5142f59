//! The append-only JSON-lines files of the pipeline: a [`Sink`] (a file, or nothing on
//! disk with `--store memory`) that appends whole batches and rolls a failed one back,
//! and [`scan`], which reads a log at start and finds where its last complete line ends.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Where a log's bytes go.
pub(crate) enum Sink {
    /// A file; `len` is the end of the last complete batch.
    File { file: File, len: u64 },
    /// Nothing on disk (`--store memory` without `--journal`): only the length is kept.
    Memory { len: u64 },
    /// A file not created yet: it is created (and locked) by the first append, so that a
    /// service that never receives an event leaves nothing on disk.
    Pending { path: PathBuf },
}

impl Sink {
    /// Opens (or creates) `path` for reading and writing, without truncating it.
    pub fn open(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
    }

    pub fn file(file: File, len: u64) -> Sink {
        Sink::File { file, len }
    }

    pub fn len(&self) -> u64 {
        match self {
            Sink::File { len, .. } | Sink::Memory { len } => *len,
            Sink::Pending { .. } => 0,
        }
    }

    /// Creates and locks the file of a `Pending` sink.
    fn materialize(&mut self) -> io::Result<()> {
        let Sink::Pending { path } = self else {
            return Ok(());
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = Sink::open(path)?;
        if !lock_exclusive(&file)? {
            return Err(io::Error::other(format!(
                "{} is in use by another tally process",
                path.display()
            )));
        }
        let len = file.metadata()?.len();
        if len != 0 {
            return Err(io::Error::other(format!(
                "{} appeared while this process was running; refusing to append to it",
                path.display()
            )));
        }
        sync_dir(path)?;
        *self = Sink::File { file, len: 0 };
        Ok(())
    }

    /// Appends `bytes` at the end of the last complete batch. On failure the file is cut
    /// back to where it was, so a failed batch leaves no partial line behind.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.materialize()?;
        match self {
            Sink::Pending { .. } => Err(io::Error::other("the log file was not created")),
            Sink::Memory { len } => {
                *len += bytes.len() as u64;
                Ok(())
            }
            Sink::File { file, len } => match file.write_all_at(bytes, *len) {
                Ok(()) => {
                    *len += bytes.len() as u64;
                    Ok(())
                }
                Err(e) => {
                    let _ = file.set_len(*len);
                    Err(e)
                }
            },
        }
    }

    /// fdatasync: what was appended is on the disk when this returns.
    pub fn sync(&mut self) -> io::Result<()> {
        match self {
            Sink::Memory { .. } | Sink::Pending { .. } => Ok(()),
            Sink::File { file, .. } => file.sync_data(),
        }
    }

    /// Cuts the log back to `to` bytes (a batch whose sync failed is not kept).
    pub fn rollback(&mut self, to: u64) -> io::Result<()> {
        match self {
            Sink::Pending { .. } => Ok(()),
            Sink::Memory { len } => {
                *len = to;
                Ok(())
            }
            Sink::File { file, len } => {
                file.set_len(to)?;
                *len = to;
                file.sync_data()
            }
        }
    }
}

/// Takes an exclusive advisory lock on `file` (released when the process ends, even by
/// kill -9), so that two processes never append to the same log.
pub(crate) fn lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock(2) on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// fsyncs a directory, so that a file just created in it survives a crash.
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// What [`scan`] found in a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scanned {
    /// Bytes up to the end of the last complete, valid line.
    pub good_len: u64,
    /// Complete, valid lines.
    pub lines: u64,
    /// A torn last line followed `good_len` (no trailing newline, or not valid JSON).
    pub torn: bool,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ScanError {
    #[error("reading: {0}")]
    Io(#[from] io::Error),
    #[error("line {line} is not a valid record ({reason}) and more lines follow it")]
    Corrupt { line: u64, reason: String },
    #[error("line {line}: {reason}")]
    Rejected { line: u64, reason: String },
}

/// Reads every line of `file` from the start, hands each complete one that parses as `T`
/// to `each` (which may reject it), and tells where the valid prefix ends. Only the last
/// line may be torn; an invalid line in the middle is an error, never silently dropped.
pub(crate) fn scan<T: DeserializeOwned>(
    file: &mut File,
    mut each: impl FnMut(T) -> Result<(), String>,
) -> Result<Scanned, ScanError> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::with_capacity(1 << 16, &mut *file);
    let mut buf = Vec::with_capacity(512);
    let mut out = Scanned {
        good_len: 0,
        lines: 0,
        torn: false,
    };
    // A bad line seen and not yet known to be the last one.
    let mut bad: Option<(u64, String)> = None;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        if let Some((line, reason)) = bad.take() {
            return Err(ScanError::Corrupt { line, reason });
        }
        let line_no = out.lines + 1;
        if buf.last() != Some(&b'\n') {
            out.torn = true;
            break;
        }
        match serde_json::from_slice::<T>(&buf[..buf.len() - 1]) {
            Ok(v) => {
                each(v).map_err(|reason| ScanError::Rejected {
                    line: line_no,
                    reason,
                })?;
                out.good_len += n as u64;
                out.lines += 1;
            }
            Err(e) => bad = Some((line_no, e.to_string())),
        }
    }
    if bad.is_some() {
        out.torn = true;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut f = Sink::open(&path).unwrap();
        f.write_all(bytes).unwrap();
        (dir, f)
    }

    fn seqs(bytes: &[u8]) -> (Result<Scanned, ScanError>, Vec<u64>) {
        let (_d, mut f) = file_with(bytes);
        let mut got = Vec::new();
        let r = scan::<Seq>(&mut f, |s| {
            got.push(s.seq);
            Ok(())
        });
        (r, got)
    }

    #[test]
    fn a_clean_log_scans_to_its_end() {
        let text = b"{\"seq\":1}\n{\"seq\":2}\n";
        let (r, got) = seqs(text);
        let r = r.unwrap();
        assert_eq!(got, [1, 2]);
        assert_eq!((r.good_len, r.lines, r.torn), (text.len() as u64, 2, false));
    }

    #[test]
    fn a_last_line_without_newline_is_torn_and_excluded() {
        let (r, got) = seqs(b"{\"seq\":1}\n{\"seq\":2}");
        let r = r.unwrap();
        assert_eq!(got, [1]);
        assert_eq!((r.good_len, r.lines, r.torn), (10, 1, true));
    }

    #[test]
    fn an_invalid_last_line_with_newline_is_torn_too() {
        let (r, got) = seqs(b"{\"seq\":1}\n{\"se\n");
        let r = r.unwrap();
        assert_eq!(got, [1]);
        assert!(r.torn);
        assert_eq!(r.good_len, 10);
    }

    #[test]
    fn an_invalid_line_in_the_middle_is_an_error() {
        let (r, _) = seqs(b"{\"seq\":1}\ngarbage\n{\"seq\":3}\n");
        assert!(
            matches!(r, Err(ScanError::Corrupt { line: 2, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn a_failed_append_leaves_the_file_as_it_was() {
        let (_d, f) = file_with(b"");
        let mut sink = Sink::file(f, 0);
        sink.append(b"{\"seq\":1}\n").unwrap();
        sink.sync().unwrap();
        sink.rollback(0).unwrap();
        assert_eq!(sink.len(), 0);
        let mut mem = Sink::Memory { len: 0 };
        mem.append(b"abc").unwrap();
        assert_eq!(mem.len(), 3);
    }

    #[test]
    fn a_pending_log_is_created_by_its_first_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("later/log");
        let mut pending = Sink::Pending { path: path.clone() };
        pending.sync().unwrap();
        assert!(!path.exists(), "nothing is created before the first append");
        pending.append(b"{\"seq\":1}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"seq\":1}\n");
    }
}
