//! The file's tables, their migrations from earlier versions, how a connection is
//! opened, and how a row becomes a `JobRecord`.

use super::*;

/// `results` holds the results of stores written before results were shared (one row
/// per job); it is only read now. New results go to `blobs`, once per distinct body,
/// referenced by `jobs.result_blob` (see [`Blobs`]). `meta` holds the health probe.
/// `idempotency_keys` holds each client key (by its BLAKE3 hash) with its job, written in
/// the job's insert transaction; expired rows are deleted by the writer (at most every
/// [`KEY_SWEEP_EVERY`], in a batch that records a key), and ignored until then.
pub(super) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        params TEXT NOT NULL,
        status INTEGER NOT NULL,
        submitted_at INTEGER NOT NULL,
        started_at INTEGER,
        finished_at INTEGER,
        error TEXT,
        result_blob INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        retry_base INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE IF NOT EXISTS results (
        id INTEGER PRIMARY KEY,
        result TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS blobs (
        id INTEGER PRIMARY KEY,
        hash BLOB NOT NULL UNIQUE,
        body TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value
    );
    CREATE TABLE IF NOT EXISTS idempotency_keys (
        key_hash BLOB PRIMARY KEY,
        job_id INTEGER NOT NULL,
        fingerprint BLOB NOT NULL,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID;";

/// Brings a store written by an earlier version up to [`SCHEMA`].
pub(super) fn migrate(conn: &Connection) -> Result<(), rusqlite::Error> {
    let has_column = |name: &str| -> Result<bool, rusqlite::Error> {
        conn.prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = ?1")?
            .exists([name])
    };
    if !has_column("result_blob")? {
        conn.execute_batch("ALTER TABLE jobs ADD COLUMN result_blob INTEGER")?;
    }
    if !has_column("attempts")? {
        // Jobs that ran before attempts were counted ran once.
        conn.execute_batch(
            "ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
             UPDATE jobs SET attempts = 1 WHERE started_at IS NOT NULL;",
        )?;
    }
    if !has_column("retry_base")? {
        conn.execute_batch("ALTER TABLE jobs ADD COLUMN retry_base INTEGER NOT NULL DEFAULT 0")?;
    }
    Ok(())
}

pub(super) fn open_conn(path: &Path, sync: SqliteSync) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match sync {
            SqliteSync::Full => "FULL",
            SqliteSync::Normal => "NORMAL",
        },
    )?;
    // A bounded page cache per connection: the store's memory does not grow with jobs.
    conn.pragma_update(None, "cache_size", -2048)?;
    // The writer completes a checkpoint every 1000 pages (see `writer_loop`): right
    // after one, the next commit starts the log over from its beginning, overwriting
    // blocks the file already has, and an fsync of overwritten blocks costs about half
    // that of an append here (110 vs 225 us). A checkpointer thread alone is not enough:
    // under constant writes it never catches up, the log never restarts (it grew to
    // 250 MB in 6 s), so the writer finishes the job.
    // After a checkpoint, truncate the WAL file back to this size, so a burst of writes
    // does not leave a huge WAL behind.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    Ok(conn)
}

/// A job's result: its shared body, or its own row for stores from before sharing.
pub(super) const RESULT_JOIN: &str = "LEFT JOIN blobs b ON b.id = j.result_blob \
     LEFT JOIN results r ON j.result_blob IS NULL AND r.id = j.id";

pub(super) const SELECT_COLS: &str = "SELECT j.id, j.kind, j.params, j.status, j.submitted_at, \
     j.started_at, j.finished_at, COALESCE(b.body, r.result), j.error, j.attempts, \
     j.retry_base FROM jobs j";

pub(super) fn row_to_record(r: &rusqlite::Row<'_>) -> Result<JobRecord, rusqlite::Error> {
    let id: i64 = r.get(0)?;
    let params: String = r.get(2)?;
    let code: i64 = r.get(3)?;
    let attempts: i64 = r.get(9)?;
    let retry_base: i64 = r.get(10)?;
    Ok(JobRecord {
        id: JobId(id as u64),
        kind: r.get(1)?,
        params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
        status: JobStatus::from_code(code).unwrap_or(JobStatus::Failed),
        submitted_at: r.get(4)?,
        started_at: r.get(5)?,
        finished_at: r.get(6)?,
        result: r.get(7)?,
        error: r.get(8)?,
        attempts: attempts.clamp(0, u32::MAX as i64) as u32,
        retry_base: retry_base.clamp(0, u32::MAX as i64) as u32,
    })
}
