//! SQLite's errors, classified: what a failed write is to the rest of tally (a full or
//! read-only disk is `Unavailable`), mapped here so the `Store` trait knows no engine.

use super::*;

/// Why a batch failed, as every writer in it is told (errors are not `Clone`).
#[derive(Debug, Clone)]
pub(super) struct WriteFailure {
    pub(super) transient: bool,
    pub(super) cause: String,
}

impl WriteFailure {
    pub(super) fn error(&self) -> StoreError {
        if self.transient {
            StoreError::Unavailable {
                store: STORE,
                cause: self.cause.clone(),
            }
        } else {
            StoreError::Rejected {
                store: STORE,
                cause: self.cause.clone(),
            }
        }
    }
}

/// Names what went wrong in words an operator acts on, with the OS error when SQLite
/// had one (`disk I/O error (No space left on device (os error 28))`). Failures of the
/// surroundings (disk, permissions, locks) are transient: the same write succeeds once
/// they are fixed. The rest (a value too large, a constraint) would fail again.
pub(super) fn classify(e: &rusqlite::Error, os_errno: i32) -> WriteFailure {
    let os = if os_errno != 0 {
        format!(" ({})", std::io::Error::from_raw_os_error(os_errno))
    } else {
        String::new()
    };
    match e {
        rusqlite::Error::SqliteFailure(f, _) => {
            let (transient, what) = match f.code {
                ErrorCode::DiskFull => (true, "disk full".to_string()),
                ErrorCode::ReadOnly => (true, "the database is read-only".to_string()),
                ErrorCode::SystemIoFailure => (true, "disk I/O error".to_string()),
                ErrorCode::CannotOpen => (true, "cannot open the database file".to_string()),
                ErrorCode::PermissionDenied => (true, "permission denied".to_string()),
                ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
                    (true, "the database is locked".to_string())
                }
                ErrorCode::OutOfMemory => (true, "out of memory".to_string()),
                ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                    (true, "the database file is corrupt".to_string())
                }
                _ => (false, e.to_string()),
            };
            WriteFailure {
                transient,
                cause: format!("{what}{os}"),
            }
        }
        other => WriteFailure {
            transient: false,
            cause: other.to_string(),
        },
    }
}

/// The OS error behind the connection's last failure (0 when none).
pub(super) fn os_errno(conn: &Connection) -> i32 {
    // SAFETY: the handle is valid for the life of `conn`, which we borrow; the call only
    // reads the connection's last error number.
    unsafe { rusqlite::ffi::sqlite3_system_errno(conn.handle()) }
}

/// A read error as callers see it: failures of the disk are `Unavailable`.
pub(super) fn read_error(e: rusqlite::Error) -> StoreError {
    let f = classify(&e, 0);
    if f.transient {
        f.error()
    } else {
        StoreError::from(e)
    }
}

/// What SQLite's own errors are to the rest of tally: the trait's error type knows no
/// engine. (Failures of the surroundings go through [`classify`] first.)
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Failed {
            store: "sqlite",
            cause: e.to_string(),
        }
    }
}
