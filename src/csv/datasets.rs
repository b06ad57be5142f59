//! The data directory (`--data-dir`): client-given dataset names resolved safely inside it.
//!
//! A name is accepted only when it is a plain file name: non-empty, at most 255 bytes, no
//! `/`, `\`, NUL, not `.` or `..`, and no leading `.` (hidden files, and the temporary files
//! of uploads in progress). A file is opened with `O_NOFOLLOW` and must be a regular file,
//! so a symbolic link — even one placed inside the directory by someone else — is refused
//! and never followed. Nothing here knows HTTP: callers map [`DatasetError`] to statuses.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// Longest accepted name, in bytes (the usual file-system limit).
pub const MAX_NAME_BYTES: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The name is not a plain file name; nothing was opened.
    #[error("invalid dataset name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("no dataset named {0:?}")]
    NotFound(String),
    /// A symbolic link, a directory, a FIFO...: refused.
    #[error("dataset {0:?} is not a regular file (symbolic links are refused)")]
    NotAFile(String),
    #[error("dataset {name:?}: {source}")]
    Io {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Checks that `name` is a plain file name (see the module docs).
pub fn check_name(name: &str) -> Result<(), DatasetError> {
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_BYTES {
        Some("it is longer than 255 bytes")
    } else if name.contains('/') || name.contains('\\') {
        Some("it must be a plain file name, without '/' or '\\'")
    } else if name.contains('\0') {
        Some("it contains a NUL byte")
    } else if name == "." || name == ".." {
        Some("'.' and '..' are not file names")
    } else if name.starts_with('.') {
        Some("names starting with '.' are reserved")
    } else if name.chars().any(char::is_control) {
        Some("it contains a control character")
    } else {
        None
    };
    match why {
        Some(why) => Err(DatasetError::BadName {
            name: name.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// One entry of [`DataDir::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetInfo {
    pub name: String,
    pub size: u64,
    pub modified: Option<SystemTime>,
}

/// The directory datasets live in. It need not exist until the first upload.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

/// Distinguishes temporary upload files of one process.
static UPLOAD_SEQ: AtomicU64 = AtomicU64::new(0);

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io(name: &str) -> impl FnOnce(io::Error) -> DatasetError + '_ {
        move |source| DatasetError::Io {
            name: name.to_string(),
            source,
        }
    }

    /// Opens a dataset for reading: checked name, `O_NOFOLLOW`, regular files only.
    /// Returns the file and its path (for messages).
    pub fn open(&self, name: &str) -> Result<(File, PathBuf), DatasetError> {
        check_name(name)?;
        let path = self.root.join(name);
        // O_NONBLOCK: opening a FIFO must not hang a worker; it is refused just below.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => DatasetError::NotAFile(name.to_string()),
                _ if e.kind() == io::ErrorKind::NotFound => {
                    DatasetError::NotFound(name.to_string())
                }
                _ => DatasetError::Io {
                    name: name.to_string(),
                    source: e,
                },
            })?;
        let meta = file.metadata().map_err(Self::io(name))?;
        if !meta.is_file() {
            return Err(DatasetError::NotAFile(name.to_string()));
        }
        Ok((file, path))
    }

    /// Checks, without opening it, that `name` is a plain name of an existing regular
    /// file (used to refuse a job at submission; [`DataDir::open`] checks again).
    pub fn check_exists(&self, name: &str) -> Result<(), DatasetError> {
        check_name(name)?;
        match fs::symlink_metadata(self.root.join(name)) {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(DatasetError::NotAFile(name.to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(DatasetError::NotFound(name.to_string()))
            }
            Err(e) => Err(DatasetError::Io {
                name: name.to_string(),
                source: e,
            }),
        }
    }

    /// Regular files with acceptable names, sorted by name. A missing directory is empty.
    pub fn list(&self) -> Result<Vec<DatasetInfo>, DatasetError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io("")(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(Self::io(""))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if check_name(&name).is_err() {
                continue;
            }
            // DirEntry::metadata does not follow symbolic links.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            out.push(DatasetInfo {
                name,
                size: meta.len(),
                modified: meta.modified().ok(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes a dataset (a regular file; anything else is refused).
    pub fn delete(&self, name: &str) -> Result<(), DatasetError> {
        self.check_exists(name)?;
        fs::remove_file(self.root.join(name)).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                DatasetError::NotFound(name.to_string())
            } else {
                Self::io(name)(e)
            }
        })
    }

    /// Starts an upload of `name`: creates the directory if needed and a new hidden
    /// temporary file next to the final one (same file system, so the rename is atomic).
    /// Returns the upload and the temporary file to write to.
    pub fn begin_upload(&self, name: &str) -> Result<(Upload, File), DatasetError> {
        check_name(name)?;
        fs::create_dir_all(&self.root).map_err(Self::io(name))?;
        let seq = UPLOAD_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join(format!(".upload-{}-{seq}.tmp", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(Self::io(name))?;
        let upload = Upload {
            tmp,
            dest: self.root.join(name),
            name: name.to_string(),
            root: self.root.clone(),
        };
        Ok((upload, file))
    }
}

/// An upload in progress. Dropped without [`Upload::commit`], its temporary file is
/// removed and the previous dataset of that name, if any, stays.
pub struct Upload {
    tmp: PathBuf,
    dest: PathBuf,
    name: String,
    root: PathBuf,
}

impl Upload {
    /// fsync the data written to `file`, rename it over the destination, fsync the
    /// directory.
    pub fn commit(self, file: File) -> Result<(), DatasetError> {
        let name = self.name.clone();
        file.sync_all().map_err(DataDir::io(&name))?;
        drop(file);
        // Anything but a regular file or nothing in the way (a link, a directory) is
        // refused. (Were a link to appear after this check, rename() would replace the
        // link itself, never its target.)
        match fs::symlink_metadata(&self.dest) {
            Ok(m) if !m.is_file() => return Err(DatasetError::NotAFile(name)),
            _ => {}
        }
        fs::rename(&self.tmp, &self.dest).map_err(DataDir::io(&name))?;
        if let Ok(dir) = File::open(&self.root) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // After a successful rename the temporary path no longer exists; harmless.
        let _ = fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn only_plain_file_names_are_accepted() {
        for good in ["a.csv", "data 1.csv", "ü.csv", "a..b", "x"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(256);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/etc/passwd",
            "a/b",
            "a\\b",
            "a\0b",
            ".hidden",
            long.as_str(),
            "a\nb",
        ] {
            assert!(
                matches!(check_name(bad), Err(DatasetError::BadName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn symlinks_are_refused_and_regular_files_open() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link.csv")).unwrap();
        fs::write(dir.path().join("ok.csv"), "a\n1\n").unwrap();
        let d = DataDir::new(dir.path());
        assert!(matches!(d.open("link.csv"), Err(DatasetError::NotAFile(_))));
        assert!(matches!(
            d.check_exists("link.csv"),
            Err(DatasetError::NotAFile(_))
        ));
        assert!(matches!(d.open("nope.csv"), Err(DatasetError::NotFound(_))));
        assert!(d.open("ok.csv").is_ok());
        let names: Vec<String> = d.list().unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["ok.csv"]);
    }

    #[test]
    fn an_upload_appears_only_once_committed_and_a_missing_dir_lists_empty() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path().join("sub"));
        assert!(d.list().unwrap().is_empty());
        let (up, mut f) = d.begin_upload("x.csv").unwrap();
        f.write_all(b"a\n1\n").unwrap();
        assert!(d.list().unwrap().is_empty(), "temporary files are hidden");
        drop(up);
        drop(f);
        assert_eq!(fs::read_dir(d.root()).unwrap().count(), 0);
        let (up, mut f) = d.begin_upload("x.csv").unwrap();
        f.write_all(b"a\n1\n").unwrap();
        up.commit(f).unwrap();
        let list = d.list().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].size, 4);
        d.delete("x.csv").unwrap();
        assert!(matches!(d.delete("x.csv"), Err(DatasetError::NotFound(_))));
    }
}
