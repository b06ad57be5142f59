//! The SQLite store (the default): one file in WAL mode, one writer thread that turns
//! whatever writes are waiting into a single transaction (group commit), and a small
//! pool of read connections that never block the writer.
//!
//! Why group commit: a commit costs one fsync; batching every pending write into one
//! transaction makes the cost per job fall as load rises, while a lone write is still
//! committed at once (the writer never waits to fill a batch, unless
//! `--sqlite-commit-delay-us` asks it to). A job whose start and outcome arrive in the
//! batch of its insert is written once, already finished; equal results are stored once.
//!
//! Durability: `submit` answers only after its batch committed. `start` and `finish`
//! are queued behind it without waiting: readers only ever see committed rows, so a
//! result is visible exactly when it is durable, and `flush` waits for all of them.
//!
//! Failures: a batch that cannot commit is retried a few times, then every write in it
//! is answered with the classified cause (a full or read-only disk is
//! [`StoreError::Unavailable`], and outcomes are handed back so the engine can retry
//! them). While writes fail, [`Store::health`] says why and a probe write runs every
//! second, so the store reports itself healthy again as soon as the disk takes writes,
//! even when no client writes anything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use super::{
    fingerprint, finish_rule, key_hash, released_attempts, Attempt, Finish, FinishFailed,
    FinishPending, Finished, Requeued, Store, StoreError, Submitted,
};
use crate::metrics::{batch_histogram, seconds_histogram, Metrics};
use crate::model::{JobCounts, JobId, JobRecord, JobState, JobStatus, ListFilter, NewJob, Outcome};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

/// The store's metric families (`tally_store_*`).
#[derive(Clone)]
pub struct SqliteMetrics {
    commits: Counter,
    errors: Counter,
    batch_size: Histogram,
    commit_duration: Histogram,
    checkpoint_duration: Histogram,
}

impl SqliteMetrics {
    fn register(m: &Metrics) -> Self {
        let s = SqliteMetrics {
            commits: Counter::default(),
            errors: Counter::default(),
            batch_size: batch_histogram(),
            commit_duration: seconds_histogram(),
            checkpoint_duration: seconds_histogram(),
        };
        m.register(
            "store_commits",
            "Store transactions committed",
            s.commits.clone(),
        );
        m.register(
            "store_errors",
            "Store transactions that failed",
            s.errors.clone(),
        );
        m.register(
            "store_batch_size",
            "Operations folded into one store transaction",
            s.batch_size.clone(),
        );
        m.register(
            "store_commit_duration_seconds",
            "Time to apply and commit one store transaction",
            s.commit_duration.clone(),
        );
        m.register(
            "store_checkpoint_duration_seconds",
            "Time to copy the SQLite write-ahead log into the database file",
            s.checkpoint_duration.clone(),
        );
        s
    }

    fn commit(&self, ops: usize, took: std::time::Duration) {
        self.commits.inc();
        self.batch_size.observe(ops as f64);
        self.commit_duration.observe(took.as_secs_f64());
    }
}

/// Largest number of operations folded into one transaction.
const MAX_BATCH: usize = 4096;
/// Pending writes the channel holds before writers wait (backpressure on workers).
const CHANNEL_CAPACITY: usize = 65_536;
/// Tries of one batch before its writers are told it failed.
const COMMIT_ATTEMPTS: u32 = 5;
/// Idle read connections kept open.
const MAX_IDLE_READERS: usize = 8;
/// Least time between two deletions of expired idempotency keys (done in a batch that
/// records a key, so an idle store writes nothing).
const KEY_SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How often a store that cannot write tries a probe write.
const PROBE_EVERY: Duration = Duration::from_secs(1);

const STORE: &str = "sqlite";

/// How hard SQLite syncs a commit. `full` survives power loss, `normal` survives a
/// process crash; group commit makes `full` cheap, so it is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SqliteSync {
    Full,
    Normal,
}

/// Why a batch failed, as every writer in it is told (errors are not `Clone`).
#[derive(Debug, Clone)]
struct WriteFailure {
    transient: bool,
    cause: String,
}

impl WriteFailure {
    fn error(&self) -> StoreError {
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
fn classify(e: &rusqlite::Error, os_errno: i32) -> WriteFailure {
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
fn os_errno(conn: &Connection) -> i32 {
    // SAFETY: the handle is valid for the life of `conn`, which we borrow; the call only
    // reads the connection's last error number.
    unsafe { rusqlite::ffi::sqlite3_system_errno(conn.handle()) }
}

/// A read error as callers see it: failures of the disk are `Unavailable`.
fn read_error(e: rusqlite::Error) -> StoreError {
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

type Ack = oneshot::Sender<Result<(), StoreError>>;

enum Op {
    Insert {
        id: JobId,
        kind: String,
        params: String,
        at: i64,
        ack: Ack,
    },
    /// A submission with an idempotency key: the writer decides whether it makes a job
    /// (and allocates its id) inside the transaction that records the key, and answers
    /// once that committed.
    InsertKeyed {
        kind: String,
        params: String,
        at: i64,
        key: Box<KeyRow>,
        ack: oneshot::Sender<Result<Submitted, StoreError>>,
    },
    Start {
        id: JobId,
        attempt: u32,
        at: i64,
    },
    Release {
        id: JobId,
        attempt: u32,
        /// The attempt ran (its lease expired): it stays counted.
        spent: bool,
        ack: Ack,
    },
    Finish {
        id: JobId,
        attempt: Attempt,
        outcome: Outcome,
        started_at: Option<i64>,
        at: i64,
        ack: oneshot::Sender<Result<Finished, FinishFailed>>,
    },
    Requeue {
        id: JobId,
        ack: oneshot::Sender<Result<Requeued, StoreError>>,
    },
    Flush {
        ack: Ack,
    },
    /// Running → queued for every job (recovery at start-up).
    Recover {
        ack: Ack,
    },
    /// A write that proves the disk takes writes again (sent while unhealthy).
    Probe,
    /// Commit what came before, answer, and stop the writer.
    Close {
        ack: Ack,
    },
}

/// A row of `idempotency_keys`, as a keyed insert brings it.
struct KeyRow {
    hash: [u8; 32],
    fingerprint: [u8; 32],
    expires_at: i64,
}

/// The threads of an open store, joined when it closes.
#[derive(Default)]
struct Threads {
    writer: Option<JoinHandle<()>>,
    checkpointer: Option<JoinHandle<()>>,
    probe: Option<JoinHandle<()>>,
    /// Dropping it wakes the probe thread, which then ends.
    probe_stop: Option<std::sync::mpsc::Sender<()>>,
}

impl Threads {
    fn join(&mut self) {
        self.probe_stop.take();
        for h in [
            self.writer.take(),
            self.checkpointer.take(),
            self.probe.take(),
        ]
        .into_iter()
        .flatten()
        {
            let _ = h.join();
        }
    }
}

pub struct SqliteStore {
    path: PathBuf,
    /// An exclusive lock on `<file>.lock`, held while the store is open: the writer
    /// thread must be the file's only writer (its counts and ids rely on it). Released
    /// once the writer has stopped, by `close` or on drop.
    lock: Mutex<Option<std::fs::File>>,
    tx: mpsc::Sender<Op>,
    threads: Mutex<Threads>,
    /// Shared with the writer, which allocates the ids of keyed submissions.
    next_id: Arc<AtomicU64>,
    /// Counts per state, kept by the writer after each commit (the store is the file's
    /// only writer, so they never drift), so `num_jobs` costs no query.
    counts: Arc<Mutex<JobCounts>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    /// Why writes fail, while they do (set and cleared by the writer).
    unhealthy: Arc<Mutex<Option<String>>>,
}

/// How the SQLite store commits (`--sqlite-sync`, `--sqlite-commit-delay-us`).
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    pub sync: SqliteSync,
    /// How long the writer waits for more writes before a commit, when writes come
    /// concurrently (see `writer_loop`).
    pub commit_delay: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            sync: SqliteSync::Full,
            commit_delay: Duration::from_micros(DEFAULT_COMMIT_DELAY_US),
        }
    }
}

/// Default of `--sqlite-commit-delay-us`: none. Measured on 2 cores (bench/stats_api.sh,
/// 32 clients, 8 alternating rounds): 50 us raised the share of jobs written as one row
/// to ~87% but lowered throughput (53% vs 58% of the ceiling), since outcomes already
/// catch up with their inserts while the writer is busy committing the batch before.
pub const DEFAULT_COMMIT_DELAY_US: u64 = 0;

/// `results` holds the results of stores written before results were shared (one row
/// per job); it is only read now. New results go to `blobs`, once per distinct body,
/// referenced by `jobs.result_blob` (see [`Blobs`]). `meta` holds the health probe.
/// `idempotency_keys` holds each client key (by its BLAKE3 hash) with its job, written in
/// the job's insert transaction; expired rows are deleted by the writer (at most every
/// [`KEY_SWEEP_EVERY`], in a batch that records a key), and ignored until then.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS jobs (
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
fn migrate(conn: &Connection) -> Result<(), rusqlite::Error> {
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

fn open_conn(path: &Path, sync: SqliteSync) -> Result<Connection, rusqlite::Error> {
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

/// Status and attempt of a job that has not finished, kept by the writer (the file's
/// only writer) so that a state change needs no read first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Live {
    status: JobStatus,
    attempts: u32,
}

type Unfinished = HashMap<i64, Live>;

impl SqliteStore {
    /// Opens (or creates) the file, resets nothing, and starts the writer thread.
    pub fn open(path: &Path, opts: SqliteOptions, metrics: &Metrics) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)?;
            }
        }
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Locked(lock_path));
        }
        let conn = open_conn(path, opts.sync)?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        // Deliberately no index on status: every extra B-tree touched by a write costs
        // pages in each commit (measured: +70% throughput without one). Recovery scans
        // the table once at start-up; listings walk ids newest first. Results live in
        // their own table (`blobs`, shared by equal bodies): adding a row there is
        // cheaper than growing a job's row in place (which splits pages), and job rows
        // stay small.
        let max_id: i64 =
            conn.query_row("SELECT COALESCE(MAX(id), 0) FROM jobs", [], |r| r.get(0))?;
        let mut counts = JobCounts::default();
        {
            let mut stmt = conn.prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (code, n) = row?;
                if let Some(s) = JobStatus::from_code(code) {
                    *counts.slot(s) += n as u64;
                }
            }
        }
        let mut unfinished = HashMap::new();
        {
            let mut stmt =
                conn.prepare("SELECT id, status, attempts FROM jobs WHERE status < 2")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?;
            for row in rows {
                let (id, code, attempts) = row?;
                if let Some(status) = JobStatus::from_code(code) {
                    unfinished.insert(
                        id,
                        Live {
                            status,
                            attempts: attempts.clamp(0, u32::MAX as i64) as u32,
                        },
                    );
                }
            }
        }
        let counts = Arc::new(Mutex::new(counts));
        let unhealthy = Arc::new(Mutex::new(None));
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let checkpointer_conn = open_conn(path, opts.sync)?;
        // A slot of one: commits while the checkpointer is busy or resting fold into it.
        let (committed, commits) = std::sync::mpsc::sync_channel::<()>(1);
        let mut threads = Threads {
            checkpointer: Some(
                thread::Builder::new()
                    .name("sqlite-checkpoint".into())
                    .spawn(move || checkpoint_loop(checkpointer_conn, commits))?,
            ),
            ..Threads::default()
        };
        let next_id = Arc::new(AtomicU64::new(max_id as u64 + 1));
        let writer = Writer {
            next_id: next_id.clone(),
            last_key_sweep: None,
            commit_delay: opts.commit_delay,
            conn,
            unfinished,
            counts: counts.clone(),
            metrics: SqliteMetrics::register(metrics),
            committed,
            unhealthy: unhealthy.clone(),
            blobs: Blobs::default(),
        };
        threads.writer = Some(
            thread::Builder::new()
                .name("sqlite-writer".into())
                .spawn(move || writer.run(rx))?,
        );
        let (probe_stop, probe_wait) = std::sync::mpsc::channel::<()>();
        threads.probe_stop = Some(probe_stop);
        let (weak, sick) = (tx.downgrade(), unhealthy.clone());
        threads.probe = Some(thread::Builder::new().name("sqlite-probe".into()).spawn(
            move || {
                // Ends when the store drops its end of `probe_wait`.
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    probe_wait.recv_timeout(PROBE_EVERY)
                {
                    if sick.lock().is_some() {
                        if let Some(tx) = weak.upgrade() {
                            let _ = tx.try_send(Op::Probe);
                        }
                    }
                }
            },
        )?);
        Ok(SqliteStore {
            path: path.to_path_buf(),
            lock: Mutex::new(Some(lock)),
            tx,
            threads: Mutex::new(threads),
            next_id,
            counts,
            readers: Arc::new(Mutex::new(Vec::new())),
            unhealthy,
        })
    }

    async fn send(&self, op: Op) -> Result<(), StoreError> {
        self.tx.send(op).await.map_err(|_| StoreError::Closed)
    }

    /// A pooled read connection (opened on demand).
    fn reader(&self) -> Result<Connection, StoreError> {
        if let Some(c) = self.readers.lock().pop() {
            return Ok(c);
        }
        let c = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(read_error)?;
        c.busy_timeout(Duration::from_secs(5)).map_err(read_error)?;
        c.pragma_update(None, "cache_size", -1024)
            .map_err(read_error)?;
        Ok(c)
    }

    fn give_back(&self, conn: Connection) {
        let mut pool = self.readers.lock();
        if pool.len() < MAX_IDLE_READERS {
            pool.push(conn);
        }
    }

    /// Runs `f` on a pooled read connection on the blocking pool: for reads that may
    /// scan many rows.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.reader()?;
        let (out, conn) = tokio::task::spawn_blocking(move || (f(&conn), conn))
            .await
            .map_err(|_| StoreError::Closed)?;
        self.give_back(conn);
        out
    }

    /// Stops the writer after everything sent before, joins the store's threads and
    /// releases the file's lock, without a runtime (for `drop`).
    fn shut(&self) {
        if self.lock.lock().is_none() {
            return;
        }
        let (ack, _answer) = oneshot::channel();
        let mut op = Op::Close { ack };
        // The writer may be behind a full queue: wait for room.
        loop {
            match self.tx.try_send(op) {
                Ok(()) => break,
                Err(mpsc::error::TrySendError::Full(back)) => {
                    op = back;
                    thread::sleep(Duration::from_millis(1));
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
        self.release_threads();
    }

    /// Joins the threads of a writer told to close, then lets go of the file.
    fn release_threads(&self) {
        self.threads.lock().join();
        self.readers.lock().clear();
        // Only now: a new owner must not start writing while our writer still could.
        self.lock.lock().take();
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.shut();
    }
}

/// A job's result: its shared body, or its own row for stores from before sharing.
const RESULT_JOIN: &str = "LEFT JOIN blobs b ON b.id = j.result_blob \
     LEFT JOIN results r ON j.result_blob IS NULL AND r.id = j.id";

const SELECT_COLS: &str = "SELECT j.id, j.kind, j.params, j.status, j.submitted_at, \
     j.started_at, j.finished_at, COALESCE(b.body, r.result), j.error, j.attempts, \
     j.retry_base FROM jobs j";

fn row_to_record(r: &rusqlite::Row<'_>) -> Result<JobRecord, rusqlite::Error> {
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

/// Ids of stored result bodies by their BLAKE3 hash, kept by the writer.
///
/// Results are stored once per distinct body: answers repeat (the same question asked
/// again gives the same bytes), and a job row then carries a reference instead of its
/// own copy. Measured on the statistics API: 2.6 KB per job down to ~0.2 KB in the file,
/// and about 10% more jobs per second, since each commit writes fewer pages. A
/// cryptographic hash, because bodies derive from client input: a collision crafted
/// against a weaker hash would serve one client's result to another.
///
/// Ids found during a batch are staged and become known only once it committed (a
/// rolled-back batch's ids do not exist). Bounded: the map is emptied when full (the
/// `UNIQUE` index still finds every body).
#[derive(Default)]
struct Blobs {
    known: HashMap<[u8; 32], i64>,
    staged: HashMap<[u8; 32], i64>,
}

/// Hashes remembered by [`Blobs`] (about 3 MB).
const MAX_KNOWN_BLOBS: usize = 65_536;

impl Blobs {
    fn get(&self, hash: &[u8; 32]) -> Option<i64> {
        self.staged
            .get(hash)
            .or_else(|| self.known.get(hash))
            .copied()
    }

    fn stage(&mut self, hash: [u8; 32], id: i64) {
        self.staged.insert(hash, id);
    }

    fn committed(&mut self) {
        if self.known.len() + self.staged.len() > MAX_KNOWN_BLOBS {
            self.known.clear();
        }
        self.known.extend(self.staged.drain());
    }

    fn rolled_back(&mut self) {
        self.staged.clear();
    }
}

/// The one writer of the file, on its own thread.
struct Writer {
    next_id: Arc<AtomicU64>,
    /// When expired idempotency keys were last deleted.
    last_key_sweep: Option<Instant>,
    commit_delay: Duration,
    conn: Connection,
    unfinished: Unfinished,
    counts: Arc<Mutex<JobCounts>>,
    metrics: SqliteMetrics,
    /// Wakes the checkpointer after a commit.
    committed: std::sync::mpsc::SyncSender<()>,
    unhealthy: Arc<Mutex<Option<String>>>,
    blobs: Blobs,
}

/// What a batch answers each of its operations, decided while it is applied and sent
/// only once it committed.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    None,
    Finish(Finished),
    Requeue(Requeued),
    Submitted(Submitted),
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        // Replaces SQLite's automatic checkpoint (itself a WAL hook): see the end of the loop.
        self.conn.wal_hook(Some(note_wal_pages));
        let mut batch: Vec<Op> = Vec::with_capacity(256);
        let mut last_batch = 0usize;
        while let Some(op) = rx.blocking_recv() {
            batch.push(op);
            // Commit delay: under concurrency (the last batch held more than one write),
            // wait a moment for the writes that are surely coming, above all the outcome
            // of a job whose insert is in this batch: both then go out as one row in one
            // commit. A lone write, or a delay of zero, commits at once.
            if !self.commit_delay.is_zero() && last_batch > 1 {
                thread::sleep(self.commit_delay);
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            // Nothing after a Close is applied: those writes are answered "closed".
            let close_at = batch.iter().position(|op| matches!(op, Op::Close { .. }));
            let after_close = close_at.map(|i| batch.split_off(i + 1));
            last_batch = batch.len();
            self.commit(&mut batch);
            if let Some(rest) = after_close {
                refuse(rest);
                rx.close();
                while let Ok(op) = rx.try_recv() {
                    refuse(vec![op]);
                }
                return;
            }
            self.checkpoint_if_long();
        }
    }

    /// Applies `batch` in one transaction (tried a few times), then answers every op.
    fn commit(&mut self, batch: &mut Vec<Op>) {
        let started = Instant::now();
        let n = batch.len();
        let mut out = Applied::default();
        // A failed transaction rolls back entirely, so the batch can be tried again as a
        // whole; transient errors (a busy disk, a lock) must not lose accepted writes.
        let mut res = Err(rusqlite::Error::InvalidQuery);
        let changes_before = self.conn.total_changes();
        let sweep_keys = batch.iter().any(|op| matches!(op, Op::InsertKeyed { .. }))
            && self
                .last_key_sweep
                .is_none_or(|t| t.elapsed() >= KEY_SWEEP_EVERY);
        if sweep_keys {
            self.last_key_sweep = Some(Instant::now());
        }
        for attempt in 0..COMMIT_ATTEMPTS {
            out = Applied::default();
            self.blobs.rolled_back();
            res = apply_batch(
                &mut self.conn,
                batch,
                &self.unfinished,
                &mut out,
                &mut self.blobs,
                Keys {
                    next_id: &self.next_id,
                    sweep: sweep_keys,
                },
            );
            match &res {
                Ok(()) => break,
                Err(e) => {
                    let f = classify(e, os_errno(&self.conn));
                    tracing::warn!(cause = %f.cause, attempt, ops = n, "sqlite commit failed; retrying");
                    if !f.transient {
                        break;
                    }
                    thread::sleep(Duration::from_millis(10 << attempt));
                }
            }
        }
        self.metrics.commit(n, started.elapsed());
        match res {
            Ok(()) => {
                self.blobs.committed();
                // Only a commit that wrote proves the disk takes writes (one that
                // changed nothing writes nothing, and succeeds on a full disk too).
                if self.conn.total_changes() > changes_before
                    && self.unhealthy.lock().take().is_some()
                {
                    tracing::info!("the sqlite store takes writes again");
                }
                // Wakes the checkpointer unless a wake-up is already pending.
                let _ = self.committed.try_send(());
                for (id, live) in out.changes.drain() {
                    if live.status.is_finished() {
                        self.unfinished.remove(&id);
                    } else {
                        self.unfinished.insert(id, live);
                    }
                }
                {
                    let mut c = self.counts.lock();
                    for s in JobStatus::ALL {
                        *c.slot(s) += *out.into.slot(s);
                        *c.slot(s) = c.slot(s).saturating_sub(*out.out_of.slot(s));
                    }
                }
                for (op, answer) in batch.drain(..).zip(out.answers) {
                    answer_op(op, answer);
                }
            }
            Err(e) => {
                let f = classify(&e, os_errno(&self.conn));
                tracing::error!(cause = %f.cause, ops = n, "sqlite commit failed");
                self.blobs.rolled_back();
                self.metrics.errors.inc();
                if f.transient {
                    *self.unhealthy.lock() = Some(f.cause.clone());
                }
                for op in batch.drain(..) {
                    fail_op(op, &f);
                }
            }
        }
    }

    /// Checkpoints: the checkpointer thread copies the log into the database in the
    /// background; once the log is long, the writer copies what is left (little) right
    /// after a commit's acks, so that the next commit starts the log over. SQLite's
    /// automatic checkpoint instead runs inside a commit, copying a thousand pages (5 ms
    /// here) while every writer of that batch waits for its answer.
    fn checkpoint_if_long(&mut self) {
        if WAL_PAGES.with(std::cell::Cell::get) < CHECKPOINT_PAGES {
            return;
        }
        let started = Instant::now();
        match self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            Ok(()) => WAL_PAGES.with(|p| p.set(0)),
            Err(e) => {
                tracing::warn!(error = %e, "sqlite checkpoint failed; retried after the next commit")
            }
        }
        self.metrics
            .checkpoint_duration
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Sends each op of a committed batch its answer.
fn answer_op(op: Op, answer: Answer) {
    match (op, answer) {
        (
            Op::Insert { ack, .. }
            | Op::Flush { ack }
            | Op::Recover { ack }
            | Op::Release { ack, .. }
            | Op::Close { ack },
            _,
        ) => {
            let _ = ack.send(Ok(()));
        }
        (Op::Finish { ack, .. }, Answer::Finish(f)) => {
            let _ = ack.send(Ok(f));
        }
        (Op::Finish { ack, .. }, _) => {
            let _ = ack.send(Ok(Finished::AlreadyFinished));
        }
        (Op::Requeue { ack, .. }, Answer::Requeue(r)) => {
            let _ = ack.send(Ok(r));
        }
        (Op::Requeue { ack, .. }, _) => {
            let _ = ack.send(Ok(Requeued::Unknown));
        }
        (Op::InsertKeyed { ack, .. }, Answer::Submitted(s)) => {
            let _ = ack.send(Ok(s));
        }
        (Op::InsertKeyed { ack, .. }, _) => {
            let _ = ack.send(Err(StoreError::Closed));
        }
        (Op::Start { .. } | Op::Probe, _) => {}
    }
}

/// Tells each op of a failed batch why; outcomes go back to their sender.
fn fail_op(op: Op, f: &WriteFailure) {
    match op {
        Op::Insert { ack, .. }
        | Op::Flush { ack }
        | Op::Recover { ack }
        | Op::Release { ack, .. }
        | Op::Close { ack } => {
            let _ = ack.send(Err(f.error()));
        }
        Op::Finish { ack, outcome, .. } => {
            let _ = ack.send(Err(FinishFailed {
                error: f.error(),
                outcome: Some(outcome),
            }));
        }
        Op::Requeue { ack, .. } => {
            let _ = ack.send(Err(f.error()));
        }
        Op::InsertKeyed { ack, .. } => {
            let _ = ack.send(Err(f.error()));
        }
        Op::Start { .. } | Op::Probe => {}
    }
}

/// Answers ops that came after the store closed.
fn refuse(ops: Vec<Op>) {
    for op in ops {
        match op {
            Op::Insert { ack, .. }
            | Op::Flush { ack }
            | Op::Recover { ack }
            | Op::Release { ack, .. }
            | Op::Close { ack } => {
                let _ = ack.send(Err(StoreError::Closed));
            }
            Op::Finish { ack, outcome, .. } => {
                let _ = ack.send(Err(FinishFailed {
                    error: StoreError::Closed,
                    outcome: Some(outcome),
                }));
            }
            Op::Requeue { ack, .. } => {
                let _ = ack.send(Err(StoreError::Closed));
            }
            Op::InsertKeyed { ack, .. } => {
                let _ = ack.send(Err(StoreError::Closed));
            }
            Op::Start { .. } | Op::Probe => {}
        }
    }
}

thread_local! {
    // Pages in the write-ahead log after the last commit, as SQLite reports them to the
    // writer thread's WAL hook (one writer thread per store: a thread-local is per store).
    static WAL_PAGES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

/// Log size, in pages, at which the writer checkpoints (SQLite's own default).
const CHECKPOINT_PAGES: i32 = 1000;

/// Least time between two background checkpoints.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(10);

/// The background half of checkpointing (see `Writer::checkpoint_if_long`): after
/// commits, a PASSIVE checkpoint (it never blocks the writer or readers), then a rest of
/// [`CHECKPOINT_EVERY`]. An idle store costs nothing; the thread ends with the writer.
fn checkpoint_loop(conn: Connection, commits: std::sync::mpsc::Receiver<()>) {
    while commits.recv().is_ok() {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "background checkpoint skipped");
        }
        thread::sleep(CHECKPOINT_EVERY);
    }
}

fn note_wal_pages(_: &rusqlite::hooks::Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_PAGES.with(|p| p.set(pages));
    Ok(())
}

/// What applying a batch did, kept apart from the writer's state until it committed.
#[derive(Default)]
struct Applied {
    /// New status and attempt of every job the batch touched: an overlay on
    /// `unfinished`, merged once committed, so a failed batch can be retried as is.
    changes: Unfinished,
    /// Jobs moved into and out of each state, applied to the counts once committed.
    into: JobCounts,
    out_of: JobCounts,
    /// One answer per op, in batch order.
    answers: Vec<Answer>,
}

impl Applied {
    fn moved(&mut self, from: Option<JobStatus>, to: JobStatus) {
        if let Some(f) = from {
            *self.out_of.slot(f) += 1;
        }
        *self.into.slot(to) += 1;
    }
}

/// A job's row as the ops of one batch leave it, for a job inserted in that batch: the
/// row is then written once, in its final state.
struct Folded<'a> {
    status: JobStatus,
    attempts: u32,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    error: Option<&'a str>,
    result: Option<&'a str>,
}

impl<'a> Folded<'a> {
    /// The same rules as the SQL paths of `apply_batch`, on a row not yet written.
    fn apply(&mut self, op: &'a Op) -> Answer {
        match op {
            Op::Start { attempt, at, .. } => {
                if !self.status.is_finished() && *attempt > self.attempts {
                    self.status = JobStatus::Running;
                    self.attempts = *attempt;
                    self.started_at = Some(*at);
                }
                Answer::None
            }
            Op::Release { attempt, spent, .. } => {
                if self.status == JobStatus::Running && self.attempts == *attempt {
                    self.status = JobStatus::Queued;
                    self.attempts = released_attempts(*attempt, *spent);
                    self.started_at = None;
                }
                Answer::None
            }
            Op::Finish {
                attempt,
                outcome,
                started_at,
                at,
                ..
            } => Answer::Finish(match finish_rule(self.status, self.attempts, *attempt) {
                Finished::Recorded => {
                    self.status = outcome.status();
                    self.finished_at = Some(*at);
                    self.started_at = self.started_at.or(*started_at);
                    if let Attempt::Of(a) = attempt {
                        self.attempts = self.attempts.max(*a);
                    }
                    match outcome {
                        Outcome::Done(r) => self.result = Some(r),
                        Outcome::Failed(e) | Outcome::Cancelled(e) => self.error = Some(e),
                    }
                    Finished::Recorded
                }
                other => other,
            }),
            _ => Answer::None,
        }
    }
}

/// What a batch needs for its keyed inserts: where ids come from, and whether to delete
/// expired keys first.
struct Keys<'a> {
    next_id: &'a AtomicU64,
    sweep: bool,
}

/// Applies one batch in one IMMEDIATE transaction (the write lock is taken up front,
/// waiting on the busy handler, rather than failing when a read upgrades to a write).
/// What it changes goes to `out`, merged by the caller only once the commit succeeded.
fn apply_batch(
    conn: &mut Connection,
    batch: &[Op],
    unfinished: &Unfinished,
    out: &mut Applied,
    blobs: &mut Blobs,
    keys: Keys<'_>,
) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Expiry by the clock of the submissions (the one their keys' lifetimes count on).
    let newest_keyed = batch
        .iter()
        .filter_map(|op| match op {
            Op::InsertKeyed { at, .. } => Some(*at),
            _ => None,
        })
        .max();
    if let Some(now) = newest_keyed.filter(|_| keys.sweep) {
        tx.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?1", [now])?;
    }

    // Ops about a job inserted in this batch are folded into its insert: the row is
    // written once, in the state they leave it in (one row instead of an insert and
    // updates). `folded_into[i]` is the insert op an op was folded into.
    let mut inserted_at: HashMap<JobId, usize> = HashMap::new();
    let mut folded_into: Vec<Option<usize>> = vec![None; batch.len()];
    let mut has_folds = false;
    for (i, op) in batch.iter().enumerate() {
        match op {
            Op::Insert { id, .. } => {
                inserted_at.insert(*id, i);
            }
            Op::Start { id, .. } | Op::Release { id, .. } | Op::Finish { id, .. } => {
                if let Some(&j) = inserted_at.get(id) {
                    folded_into[i] = Some(j);
                    has_folds = true;
                }
            }
            _ => {}
        }
    }
    out.answers = vec![Answer::None; batch.len()];
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO jobs (id, kind, params, status, submitted_at, started_at, finished_at, \
             error, result_blob, attempts) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        let mut start = tx.prepare_cached(
            "UPDATE jobs SET status = 1, attempts = ?2, started_at = ?3 WHERE id = ?1",
        )?;
        let mut release = tx.prepare_cached(
            "UPDATE jobs SET status = 0, attempts = ?2, started_at = NULL WHERE id = ?1",
        )?;
        let mut finish = tx.prepare_cached(
            "UPDATE jobs SET status = ?2, finished_at = ?3, error = ?4, \
             started_at = COALESCE(started_at, ?5), result_blob = ?6, \
             attempts = MAX(attempts, ?7) WHERE id = ?1",
        )?;
        let mut lookup = tx.prepare_cached("SELECT status, attempts FROM jobs WHERE id = ?1")?;
        let mut add_blob = tx.prepare_cached(
            "INSERT INTO blobs (hash, body) VALUES (?1, ?2) ON CONFLICT (hash) DO NOTHING",
        )?;
        let mut find_blob = tx.prepare_cached("SELECT id FROM blobs WHERE hash = ?1")?;
        // A key recorded earlier in this batch is found too (same transaction).
        let mut find_key = tx.prepare_cached(
            "SELECT job_id, fingerprint FROM idempotency_keys \
             WHERE key_hash = ?1 AND expires_at > ?2",
        )?;
        let mut add_key = tx.prepare_cached(
            "INSERT INTO idempotency_keys (key_hash, job_id, fingerprint, expires_at) \
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (key_hash) DO UPDATE SET \
             job_id = excluded.job_id, fingerprint = excluded.fingerprint, \
             expires_at = excluded.expires_at",
        )?;
        let mut blob_id = |body: &str| -> Result<i64, rusqlite::Error> {
            let hash = *blake3::hash(body.as_bytes()).as_bytes();
            if let Some(id) = blobs.get(&hash) {
                return Ok(id);
            }
            let id = if add_blob.execute(params![&hash[..], body])? == 1 {
                tx.last_insert_rowid()
            } else {
                find_blob.query_row([&hash[..]], |r| r.get(0))?
            };
            blobs.stage(hash, id);
            Ok(id)
        };
        for (i, op) in batch.iter().enumerate() {
            if folded_into[i].is_some() {
                continue;
            }
            match op {
                Op::Insert {
                    id,
                    kind,
                    params,
                    at,
                    ..
                } => {
                    let mut row = Folded {
                        status: JobStatus::Queued,
                        attempts: 0,
                        started_at: None,
                        finished_at: None,
                        error: None,
                        result: None,
                    };
                    if has_folds {
                        for j in (i + 1)..batch.len() {
                            if folded_into[j] == Some(i) {
                                out.answers[j] = row.apply(&batch[j]);
                            }
                        }
                    }
                    let blob = row.result.map(&mut blob_id).transpose()?;
                    insert.execute(params![
                        id.0 as i64,
                        kind,
                        params,
                        row.status.code(),
                        at,
                        row.started_at,
                        row.finished_at,
                        row.error,
                        blob,
                        row.attempts
                    ])?;
                    out.changes.insert(
                        id.0 as i64,
                        Live {
                            status: row.status,
                            attempts: row.attempts,
                        },
                    );
                    out.moved(None, row.status);
                }
                Op::InsertKeyed {
                    kind,
                    params,
                    at,
                    key,
                    ..
                } => {
                    let seen = find_key
                        .query_row(params![&key.hash[..], at], |r| {
                            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
                        })
                        .optional()?;
                    out.answers[i] = Answer::Submitted(match seen {
                        Some((first, fp)) if fp[..] == key.fingerprint[..] => {
                            Submitted::Replayed(JobId(first as u64))
                        }
                        Some((first, _)) => Submitted::KeyReused(JobId(first as u64)),
                        None => {
                            // Allocated again if the batch is retried: a failed commit
                            // leaves a gap, as it does for unkeyed inserts.
                            let id = keys.next_id.fetch_add(1, Ordering::Relaxed) as i64;
                            insert.execute(params![
                                id,
                                kind,
                                params,
                                JobStatus::Queued.code(),
                                at,
                                None::<i64>,
                                None::<i64>,
                                None::<String>,
                                None::<i64>,
                                0
                            ])?;
                            add_key.execute(params![
                                &key.hash[..],
                                id,
                                &key.fingerprint[..],
                                key.expires_at
                            ])?;
                            out.changes.insert(
                                id,
                                Live {
                                    status: JobStatus::Queued,
                                    attempts: 0,
                                },
                            );
                            out.moved(None, JobStatus::Queued);
                            Submitted::New(JobId(id as u64))
                        }
                    });
                }
                Op::Start { id, attempt, at } => {
                    let key = id.0 as i64;
                    let cur = out
                        .changes
                        .get(&key)
                        .or_else(|| unfinished.get(&key))
                        .copied();
                    // A newer attempt takes over a job whose last attempt was reclaimed.
                    if let Some(live) =
                        cur.filter(|l| !l.status.is_finished() && *attempt > l.attempts)
                    {
                        start.execute(params![key, attempt, at])?;
                        out.changes.insert(
                            key,
                            Live {
                                status: JobStatus::Running,
                                attempts: *attempt,
                            },
                        );
                        out.moved(Some(live.status), JobStatus::Running);
                    }
                }
                Op::Release {
                    id, attempt, spent, ..
                } => {
                    let key = id.0 as i64;
                    let cur = out
                        .changes
                        .get(&key)
                        .or_else(|| unfinished.get(&key))
                        .copied();
                    if cur.is_some_and(|l| l.status == JobStatus::Running && l.attempts == *attempt)
                    {
                        let attempts = released_attempts(*attempt, *spent);
                        release.execute(params![key, attempts])?;
                        out.changes.insert(
                            key,
                            Live {
                                status: JobStatus::Queued,
                                attempts,
                            },
                        );
                        out.moved(Some(JobStatus::Running), JobStatus::Queued);
                    }
                }
                Op::Finish {
                    id,
                    attempt,
                    outcome,
                    started_at,
                    at,
                    ..
                } => {
                    let key = id.0 as i64;
                    let cur = match out.changes.get(&key).or_else(|| unfinished.get(&key)) {
                        Some(l) => Some(*l),
                        // Not unfinished: finished or unknown. Rare (late outcomes,
                        // cancels of finished jobs), so a read is fine.
                        None => lookup
                            .query_row([key], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
                            .optional()?
                            .map(|(code, attempts)| Live {
                                status: JobStatus::from_code(code).unwrap_or(JobStatus::Failed),
                                attempts: attempts.clamp(0, u32::MAX as i64) as u32,
                            }),
                    };
                    let answer = match cur {
                        None => Finished::Unknown,
                        Some(live) => match finish_rule(live.status, live.attempts, *attempt) {
                            Finished::Recorded => {
                                let after = outcome.status();
                                let (error, blob) = match outcome {
                                    Outcome::Done(r) => (None, Some(blob_id(r)?)),
                                    Outcome::Failed(e) | Outcome::Cancelled(e) => {
                                        (Some(e.as_str()), None)
                                    }
                                };
                                let attempts = match attempt {
                                    Attempt::Of(a) => live.attempts.max(*a),
                                    Attempt::Any => live.attempts,
                                };
                                finish.execute(params![
                                    key,
                                    after.code(),
                                    at,
                                    error,
                                    started_at,
                                    blob,
                                    attempts
                                ])?;
                                out.changes.insert(
                                    key,
                                    Live {
                                        status: after,
                                        attempts,
                                    },
                                );
                                out.moved(Some(live.status), after);
                                Finished::Recorded
                            }
                            other => other,
                        },
                    };
                    out.answers[i] = Answer::Finish(answer);
                }
                Op::Requeue { id, .. } => {
                    out.answers[i] = Answer::Requeue(requeue(&tx, *id, out)?);
                }
                Op::Probe => {
                    tx.execute(
                        "INSERT INTO meta (key, value) VALUES ('probe', ?1) \
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        [crate::now_ms()],
                    )?;
                }
                Op::Flush { .. } | Op::Close { .. } => {}
                Op::Recover { .. } => {
                    tx.execute(
                        "UPDATE jobs SET status = 0, started_at = NULL WHERE status = 1",
                        [],
                    )?;
                    let running: Vec<(i64, u32)> = unfinished
                        .iter()
                        .chain(out.changes.iter())
                        .filter(|(_, l)| l.status == JobStatus::Running)
                        .map(|(id, l)| (*id, l.attempts))
                        .collect();
                    for (id, attempts) in running {
                        let cur = out.changes.get(&id).or_else(|| unfinished.get(&id));
                        if cur.is_some_and(|l| l.status == JobStatus::Running) {
                            out.changes.insert(
                                id,
                                Live {
                                    status: JobStatus::Queued,
                                    attempts,
                                },
                            );
                            out.moved(Some(JobStatus::Running), JobStatus::Queued);
                        }
                    }
                }
            }
        }
    }
    tx.commit()
}

/// Failed or cancelled → queued, inside the batch's transaction.
fn requeue(
    tx: &rusqlite::Transaction<'_>,
    id: JobId,
    out: &mut Applied,
) -> Result<Requeued, rusqlite::Error> {
    let key = id.0 as i64;
    let rec = tx
        .prepare_cached(&format!("{SELECT_COLS} {RESULT_JOIN} WHERE j.id = ?1"))?
        .query_row([key], row_to_record)
        .optional()?;
    let Some(mut rec) = rec else {
        return Ok(Requeued::Unknown);
    };
    // This batch may have changed it already.
    if let Some(l) = out.changes.get(&key) {
        rec.status = l.status;
        rec.attempts = l.attempts;
    }
    match rec.status {
        JobStatus::Queued | JobStatus::Running => return Ok(Requeued::NotFinished(rec.status)),
        JobStatus::Done => return Ok(Requeued::Done),
        JobStatus::Failed | JobStatus::Cancelled => {}
    }
    tx.prepare_cached(
        "UPDATE jobs SET status = 0, started_at = NULL, finished_at = NULL, error = NULL, \
         result_blob = NULL, retry_base = attempts WHERE id = ?1",
    )?
    .execute([key])?;
    // A result from a store before shared results must not come back with it.
    tx.prepare_cached("DELETE FROM results WHERE id = ?1")?
        .execute([key])?;
    out.changes.insert(
        key,
        Live {
            status: JobStatus::Queued,
            attempts: rec.attempts,
        },
    );
    out.moved(Some(rec.status), JobStatus::Queued);
    rec.status = JobStatus::Queued;
    rec.started_at = None;
    rec.finished_at = None;
    rec.error = None;
    rec.result = None;
    rec.retry_base = rec.attempts;
    Ok(Requeued::Yes(Box::new(rec)))
}

#[async_trait]
impl Store for SqliteStore {
    async fn submit(&self, job: &NewJob, now_ms: i64) -> Result<Submitted, StoreError> {
        let (s, durable) = self.submit_begin(job, now_ms).await?;
        durable.await?;
        Ok(s)
    }

    async fn submit_begin(
        &self,
        job: &NewJob,
        now_ms: i64,
    ) -> Result<(Submitted, super::Durable), StoreError> {
        if let Some(k) = &job.idempotency {
            // Whether a keyed submission makes a job is known only once the writer
            // looked the key up, and its answer comes after the commit: the first job is
            // durable before anyone learns its id, replays included.
            let (ack, rx) = oneshot::channel();
            let ttl = i64::try_from(k.ttl_ms).unwrap_or(i64::MAX);
            self.send(Op::InsertKeyed {
                kind: job.kind.clone(),
                params: job.params.to_string(),
                at: now_ms,
                key: Box::new(KeyRow {
                    hash: key_hash(&k.key),
                    fingerprint: fingerprint(job),
                    expires_at: now_ms.saturating_add(ttl),
                }),
                ack,
            })
            .await?;
            let s = rx.await.map_err(|_| StoreError::Closed)??;
            return Ok((s, Box::pin(std::future::ready(Ok(())))));
        }
        let id = JobId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (ack, rx) = oneshot::channel();
        // Once sent, the insert precedes in the writer's queue every later op about `id`.
        self.send(Op::Insert {
            id,
            kind: job.kind.clone(),
            params: job.params.to_string(),
            at: now_ms,
            ack,
        })
        .await?;
        Ok((
            Submitted::New(id),
            Box::pin(async move { rx.await.map_err(|_| StoreError::Closed)? }),
        ))
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        // A primary-key lookup in WAL mode takes microseconds and never waits for the
        // writer, so it runs inline rather than paying a hop to the blocking pool.
        let conn = self.reader()?;
        let out = (|| {
            let mut stmt = conn
                .prepare_cached(&format!("{SELECT_COLS} {RESULT_JOIN} WHERE j.id = ?1"))
                .map_err(read_error)?;
            stmt.query_row([id.0 as i64], row_to_record)
                .optional()
                .map_err(read_error)
        })();
        self.give_back(conn);
        out
    }

    async fn state(&self, id: JobId) -> Result<Option<JobState>, StoreError> {
        let conn = self.reader()?;
        let out = (|| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT j.status, COALESCE(b.body, r.result), j.error FROM jobs j \
                     {RESULT_JOIN} WHERE j.id = ?1"
                ))
                .map_err(read_error)?;
            let row = stmt
                .query_row([id.0 as i64], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
                .map_err(read_error)?;
            match row {
                None => Ok(None),
                Some((code, result, error)) => {
                    let status = JobStatus::from_code(code).ok_or_else(|| StoreError::Corrupt {
                        id: id.0,
                        what: format!("status code {code}"),
                    })?;
                    Ok(Some(JobState {
                        status,
                        result,
                        error,
                    }))
                }
            }
        })();
        self.give_back(conn);
        out
    }

    fn start(&self, id: JobId, attempt: u32, now_ms: i64) -> Result<(), StoreError> {
        self.tx
            .blocking_send(Op::Start {
                id,
                attempt,
                at: now_ms,
            })
            .map_err(|_| StoreError::Closed)
    }

    async fn release(&self, id: JobId, attempt: u32, spent: bool) -> Result<(), StoreError> {
        let (ack, rx) = oneshot::channel();
        self.send(Op::Release {
            id,
            attempt,
            spent,
            ack,
        })
        .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    fn finish(&self, f: Finish) -> FinishPending {
        let (ack, rx) = oneshot::channel();
        let op = Op::Finish {
            id: f.id,
            attempt: f.attempt,
            outcome: f.outcome,
            started_at: f.started_at,
            at: f.at,
            ack,
        };
        let answer = async move {
            rx.await
                .map_err(|_| FinishFailed::from(StoreError::Closed))?
        };
        // On its way, in order, before this returns: at once while the write queue has
        // room (the common case, from any thread)...
        let op = match self.tx.try_send(op) {
            Ok(()) => return Box::pin(answer),
            Err(mpsc::error::TrySendError::Closed(op)) => {
                return Box::pin(std::future::ready(Err(closed(op))))
            }
            Err(mpsc::error::TrySendError::Full(op)) => op,
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // ...never blocking a thread of the runtime: on the first poll...
            let tx = self.tx.clone();
            return Box::pin(async move {
                if let Err(mpsc::error::SendError(op)) = tx.send(op).await {
                    return Err(closed(op));
                }
                answer.await
            });
        }
        // ...or, on a worker thread, once the writer made room.
        let sent = self.tx.blocking_send(op);
        Box::pin(async move {
            if let Err(mpsc::error::SendError(op)) = sent {
                return Err(closed(op));
            }
            answer.await
        })
    }

    async fn requeue(&self, id: JobId, _now_ms: i64) -> Result<Requeued, StoreError> {
        let (ack, rx) = oneshot::channel();
        self.send(Op::Requeue { id, ack }).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>, StoreError> {
        let f = filter.clone();
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "{SELECT_COLS} {RESULT_JOIN} WHERE j.id < ?1 AND (?2 IS NULL OR j.status = ?2) \
                     AND (?3 IS NULL OR j.kind = ?3) ORDER BY j.id DESC LIMIT ?4"
                ))
                .map_err(read_error)?;
            let before = f.before.map(|b| b.0 as i64).unwrap_or(i64::MAX);
            let rows = stmt
                .query_map(
                    params![before, f.status.map(|s| s.code()), f.kind, f.limit as i64],
                    row_to_record,
                )
                .map_err(read_error)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(read_error)
        })
        .await
    }

    async fn statuses(
        &self,
        after: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<(JobId, JobStatus)>, StoreError> {
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached("SELECT id, status FROM jobs WHERE id > ?1 ORDER BY id LIMIT ?2")
                .map_err(read_error)?;
            let from = after.map_or(0, |a| a.0 as i64);
            let rows = stmt
                .query_map(params![from, limit as i64], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })
                .map_err(read_error)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, code) = row.map_err(read_error)?;
                let status = JobStatus::from_code(code).ok_or_else(|| StoreError::Corrupt {
                    id: id as u64,
                    what: format!("status code {code}"),
                })?;
                out.push((JobId(id as u64), status));
            }
            Ok(out)
        })
        .await
    }

    async fn counts(&self) -> Result<JobCounts, StoreError> {
        Ok(*self.counts.lock())
    }

    async fn recover_unfinished(&self) -> Result<Vec<JobRecord>, StoreError> {
        // Through the writer, so the counts stay right and no second writer exists.
        let (ack, rx) = oneshot::channel();
        self.send(Op::Recover { ack }).await?;
        rx.await.map_err(|_| StoreError::Closed)??;
        self.read(|c| {
            let mut stmt = c
                .prepare(&format!(
                    "{SELECT_COLS} {RESULT_JOIN} WHERE j.status = 0 ORDER BY j.id"
                ))
                .map_err(read_error)?;
            let rows = stmt.query_map([], row_to_record).map_err(read_error)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(read_error)
        })
        .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let (ack, rx) = oneshot::channel();
        self.send(Op::Flush { ack }).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn close(&self) -> Result<(), StoreError> {
        if self.lock.lock().is_none() {
            return Ok(());
        }
        let (ack, rx) = oneshot::channel();
        let res = match self.send(Op::Close { ack }).await {
            Ok(()) => rx.await.unwrap_or(Err(StoreError::Closed)),
            Err(e) => Err(e),
        };
        // The writer answered and is ending: the joins below wait for microseconds.
        self.release_threads();
        match res {
            Err(StoreError::Closed) => Ok(()),
            other => other,
        }
    }

    fn health(&self) -> Result<(), String> {
        match self.unhealthy.lock().as_ref() {
            None => Ok(()),
            Some(cause) => Err(format!("the sqlite store cannot write: {cause}")),
        }
    }

    fn name(&self) -> &'static str {
        STORE
    }
}

/// The answer to an outcome sent to a store that has stopped: the outcome goes back.
fn closed(op: Op) -> FinishFailed {
    FinishFailed {
        error: StoreError::Closed,
        outcome: match op {
            Op::Finish { outcome, .. } => Some(outcome),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    //! What only this store has: the file's lock, batches folded into one row, the log's
    //! checkpoints, shared result bodies, migrations, disk failures. Everything every
    //! store must do is in the conformance suite (tests/store_conformance.rs).
    use super::*;
    use serde_json::json;

    fn store(dir: &Path) -> SqliteStore {
        store_with_delay(dir, Duration::ZERO)
    }

    fn store_with_delay(dir: &Path, commit_delay: Duration) -> SqliteStore {
        SqliteStore::open(
            &dir.join("t.db"),
            SqliteOptions {
                sync: SqliteSync::Normal,
                commit_delay,
            },
            &Metrics::new(),
        )
        .unwrap()
    }

    fn job(kind: &str, params: serde_json::Value) -> NewJob {
        NewJob::new(kind, params)
    }

    #[tokio::test]
    async fn a_second_store_on_the_same_file_is_refused_until_the_first_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let first = store(dir.path());
        let open_second = || {
            SqliteStore::open(
                &dir.path().join("t.db"),
                SqliteOptions::default(),
                &Metrics::new(),
            )
        };
        let err = open_second().err().expect("the file is taken").to_string();
        assert!(err.contains("held by another tally process"), "{err}");
        first.close().await.unwrap();
        let second = open_second().expect("a closed store lets go of its file");
        drop(second);
        open_second().expect("a dropped store lets go of its file");
        assert!(matches!(
            first.submit(&job("k", json!({})), 1).await,
            Err(StoreError::Closed)
        ));
    }

    #[test]
    fn a_job_started_and_finished_before_its_insert_committed_is_written_once_in_its_final_state() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let insert = |id: u64| {
            let (ack, _) = oneshot::channel();
            Op::Insert {
                id: JobId(id),
                kind: "k".into(),
                params: "{}".into(),
                at: 10,
                ack,
            }
        };
        let start = |id: u64, attempt: u32| Op::Start {
            id: JobId(id),
            attempt,
            at: 11,
        };
        let finish = |id: u64, attempt: u32, outcome: Outcome| Op::Finish {
            id: JobId(id),
            attempt: Attempt::Of(attempt),
            outcome,
            started_at: Some(11),
            at: 12,
            ack: oneshot::channel().0,
        };
        let batch = vec![
            insert(1),
            insert(2),
            insert(3),
            insert(4),
            start(1, 1),
            finish(1, 1, Outcome::Done("{\"x\":1}".into())),
            finish(2, 1, Outcome::Failed("boom".into())),
            // A late outcome for a job finished earlier in the batch changes nothing.
            finish(1, 1, Outcome::Failed("late".into())),
            start(4, 1),
            start(4, 2),
            // Attempt 1's outcome after attempt 2 started: fenced.
            finish(4, 1, Outcome::Done("1".into())),
        ];
        let mut out = Applied::default();
        let mut blobs = Blobs::default();
        let next_id = AtomicU64::new(100);
        let keys = Keys {
            next_id: &next_id,
            sweep: false,
        };
        apply_batch(
            &mut conn,
            &batch,
            &Unfinished::new(),
            &mut out,
            &mut blobs,
            keys,
        )
        .unwrap();
        let finishes: Vec<Finished> = out
            .answers
            .iter()
            .filter_map(|a| match a {
                Answer::Finish(f) => Some(*f),
                _ => None,
            })
            .collect();
        assert_eq!(
            finishes,
            vec![
                Finished::Recorded,
                Finished::Recorded,
                Finished::AlreadyFinished,
                Finished::Stale
            ]
        );
        assert_eq!(
            (
                out.into.queued,
                out.into.running,
                out.into.done,
                out.into.failed
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(
            out.out_of,
            JobCounts::default(),
            "each job went straight to its state"
        );
        type Row = (
            i64,
            i64,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
            i64,
        );
        let rows: Vec<Row> = conn
            .prepare(
                "SELECT j.id, j.status, j.started_at, j.finished_at, j.error, b.body, j.attempts \
                 FROM jobs j LEFT JOIN blobs b ON b.id = j.result_blob ORDER BY j.id",
            )
            .unwrap()
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let code = |s: JobStatus| s.code() as i64;
        assert_eq!(
            rows,
            vec![
                (
                    1,
                    code(JobStatus::Done),
                    Some(11),
                    Some(12),
                    None,
                    Some("{\"x\":1}".into()),
                    1
                ),
                (
                    2,
                    code(JobStatus::Failed),
                    Some(11),
                    Some(12),
                    Some("boom".into()),
                    None,
                    1
                ),
                (3, code(JobStatus::Queued), None, None, None, None, 0),
                (4, code(JobStatus::Running), Some(11), None, None, None, 2),
            ]
        );
        assert_eq!(out.changes.get(&1).map(|l| l.status), Some(JobStatus::Done));
        assert_eq!(
            out.changes.get(&4),
            Some(&Live {
                status: JobStatus::Running,
                attempts: 2
            })
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_write_ahead_log_starts_over_instead_of_growing_under_constant_writes() {
        let dir = tempfile::tempdir().unwrap();
        // With a commit delay, so that path is exercised too (batches here hold many writes).
        let s = Arc::new(store_with_delay(dir.path(), Duration::from_micros(100)));
        // About 16 MB of results, written while readers keep reading: the log must be
        // checkpointed and restarted, not grow with the data.
        // Distinct bodies, so that sharing equal results does not shrink the writes.
        let result = |id: JobId| format!("\"{id}{}\"", "r".repeat(4000));
        let reading = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let reader = {
            let (s, reading) = (s.clone(), reading.clone());
            tokio::spawn(async move {
                while reading.load(Ordering::Relaxed) {
                    let _ = s.state(JobId(1)).await;
                    tokio::task::yield_now().await;
                }
            })
        };
        for _ in 0..80 {
            let mut ids = Vec::new();
            for _ in 0..50 {
                ids.push(s.submit_begin(&job("k", json!({})), 1).await.unwrap());
            }
            for (submitted, durable) in ids {
                let id = submitted.id();
                durable.await.unwrap();
                let done = s
                    .finish(Finish {
                        id,
                        attempt: Attempt::Of(1),
                        outcome: Outcome::Done(result(id)),
                        started_at: Some(2),
                        at: 3,
                    })
                    .await
                    .unwrap();
                assert_eq!(done, Finished::Recorded);
            }
        }
        reading.store(false, Ordering::Relaxed);
        reader.await.unwrap();
        let wal = std::fs::metadata(dir.path().join("t.db-wal"))
            .unwrap()
            .len();
        assert!(
            wal < 8 << 20,
            "the log holds {wal} bytes after 16 MB of writes: it never started over"
        );
        assert_eq!(s.counts().await.unwrap().done, 4000);
    }

    #[tokio::test]
    async fn equal_results_are_stored_once_and_every_job_reads_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut ids = Vec::new();
        for i in 0..6 {
            let id = s
                .submit(&job("k", json!({ "i": i })), 1)
                .await
                .unwrap()
                .id();
            // Three distinct bodies, each finished twice (in separate batches too).
            let body = format!("{{\"answer\":{}}}", i % 3);
            let done = s
                .finish(Finish {
                    id,
                    attempt: Attempt::Of(1),
                    outcome: Outcome::Done(body),
                    started_at: None,
                    at: 2,
                })
                .await
                .unwrap();
            assert_eq!(done, Finished::Recorded);
            ids.push(id);
        }
        for (i, id) in ids.iter().enumerate() {
            let want = format!("{{\"answer\":{}}}", i % 3);
            assert_eq!(
                s.state(*id).await.unwrap().unwrap().result,
                Some(want.clone())
            );
            assert_eq!(s.get(*id).await.unwrap().unwrap().result, Some(want));
        }
        s.flush().await.unwrap();
        let c = Connection::open(dir.path().join("t.db")).unwrap();
        let stored: i64 = c
            .query_row("SELECT COUNT(*) FROM blobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, 3, "one row per distinct body");
    }

    #[tokio::test]
    async fn a_store_from_before_shared_results_and_attempts_opens_and_keeps_its_results() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The layout of earlier versions: no result_blob or attempts column, one
            // result per job.
            let c = Connection::open(dir.path().join("t.db")).unwrap();
            c.execute_batch(
                "CREATE TABLE jobs (id INTEGER PRIMARY KEY, kind TEXT NOT NULL,
                     params TEXT NOT NULL, status INTEGER NOT NULL,
                     submitted_at INTEGER NOT NULL, started_at INTEGER,
                     finished_at INTEGER, error TEXT);
                 CREATE TABLE results (id INTEGER PRIMARY KEY, result TEXT NOT NULL);
                 INSERT INTO jobs VALUES (1, 'k', '{}', 2, 1, 1, 2, NULL);
                 INSERT INTO jobs VALUES (2, 'k', '{}', 3, 1, 1, 2, 'boom');
                 INSERT INTO results VALUES (1, '{\"old\":true}');",
            )
            .unwrap();
        }
        let s = store(dir.path());
        let old = s.get(JobId(1)).await.unwrap().unwrap();
        assert_eq!(old.result.as_deref(), Some("{\"old\":true}"));
        assert_eq!(
            old.attempts, 1,
            "a job that ran before attempts were counted ran once"
        );
        let id = s.submit(&job("k", json!({})), 3).await.unwrap().id();
        assert_eq!(id, JobId(3));
        let done = s
            .finish(Finish {
                id,
                attempt: Attempt::Of(1),
                outcome: Outcome::Done("{\"new\":true}".into()),
                started_at: None,
                at: 4,
            })
            .await
            .unwrap();
        assert_eq!(done, Finished::Recorded);
        assert_eq!(
            s.get(id).await.unwrap().unwrap().result.as_deref(),
            Some("{\"new\":true}")
        );
        assert!(matches!(
            s.requeue(JobId(2), 5).await.unwrap(),
            Requeued::Yes(_)
        ));
        assert_eq!(
            s.get(JobId(2)).await.unwrap().unwrap().status,
            JobStatus::Queued
        );
    }

    #[test]
    fn disk_failures_are_transient_and_name_their_cause() {
        let failure =
            |code: i32| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        let full = classify(&failure(rusqlite::ffi::SQLITE_FULL), 0);
        assert!(full.transient);
        assert_eq!(full.cause, "disk full");
        let io = classify(&failure(rusqlite::ffi::SQLITE_IOERR_WRITE), libc::ENOSPC);
        assert!(io.transient);
        assert!(
            io.cause
                .starts_with("disk I/O error (No space left on device"),
            "{}",
            io.cause
        );
        let ro = classify(&failure(rusqlite::ffi::SQLITE_READONLY), 0);
        assert!(ro.transient && ro.cause.contains("read-only"));
        let big = classify(&failure(rusqlite::ffi::SQLITE_TOOBIG), 0);
        assert!(!big.transient, "retrying a value too large cannot help");
        assert!(matches!(full.error(), StoreError::Unavailable { .. }));
        assert!(matches!(big.error(), StoreError::Rejected { .. }));
    }
}
