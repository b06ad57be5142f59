//! The SQLite store (the default): one file in WAL mode, one writer thread that turns
//! whatever writes are waiting into a single transaction (group commit), and a small
//! pool of read connections that never block the writer.
//!
//! Why group commit: a commit costs one fsync; batching every pending write into one
//! transaction makes the cost per job fall as load rises, while a lone write is still
//! committed at once (the writer never waits to fill a batch, unless
//! `--sqlite-commit-delay-us` asks it to). A job whose outcome arrives in the batch of
//! its insert is written once, already finished; equal results are stored once.
//!
//! Durability: `submit` answers only after its batch committed. `mark_running` and
//! `finish` are queued behind it without waiting: readers only ever see committed rows,
//! so a result is visible exactly when it is durable, and `flush` waits for all of them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use super::{Store, StoreError};
use crate::config::SqliteSync;
use crate::jobs::model::{
    JobCounts, JobId, JobRecord, JobState, JobStatus, ListFilter, NewJob, Outcome,
};
use crate::metrics::Metrics;

/// Largest number of operations folded into one transaction.
const MAX_BATCH: usize = 4096;
/// Pending writes the channel holds before writers wait (backpressure on workers).
const CHANNEL_CAPACITY: usize = 65_536;
/// Tries of one batch before its writers are told it failed.
const COMMIT_ATTEMPTS: u32 = 5;
/// Idle read connections kept open.
const MAX_IDLE_READERS: usize = 8;

enum Op {
    Insert {
        id: JobId,
        kind: String,
        params: String,
        at: i64,
        ack: oneshot::Sender<Result<(), String>>,
    },
    MarkRunning {
        id: JobId,
        at: i64,
    },
    Finish {
        id: JobId,
        outcome: Outcome,
        started_at: Option<i64>,
        at: i64,
        ack: Option<oneshot::Sender<bool>>,
    },
    Flush {
        ack: oneshot::Sender<Result<(), String>>,
    },
    /// Running → queued for every job (recovery at start-up).
    Requeue {
        ack: oneshot::Sender<Result<(), String>>,
    },
}

pub struct SqliteStore {
    path: PathBuf,
    /// An exclusive lock on `<file>.lock`, held while the store is open: the writer
    /// thread must be the file's only writer (its counts and ids rely on it).
    _lock: std::fs::File,
    tx: mpsc::Sender<Op>,
    next_id: AtomicU64,
    /// Counts per state, kept by the writer after each commit (the store is the file's
    /// only writer, so they never drift), so `num_jobs` costs no query.
    counts: Arc<Mutex<JobCounts>>,
    readers: Arc<Mutex<Vec<Connection>>>,
}

/// How the SQLite store commits (`--sqlite-sync`, `--sqlite-commit-delay-us`).
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    pub sync: SqliteSync,
    /// How long the writer waits for more writes before a commit, when writes come
    /// concurrently (see `writer_loop`).
    pub commit_delay: std::time::Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            sync: SqliteSync::Full,
            commit_delay: std::time::Duration::from_micros(DEFAULT_COMMIT_DELAY_US),
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
/// referenced by `jobs.result_blob` (see [`Blobs`]).
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        params TEXT NOT NULL,
        status INTEGER NOT NULL,
        submitted_at INTEGER NOT NULL,
        started_at INTEGER,
        finished_at INTEGER,
        error TEXT,
        result_blob INTEGER
    );
    CREATE TABLE IF NOT EXISTS results (
        id INTEGER PRIMARY KEY,
        result TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS blobs (
        id INTEGER PRIMARY KEY,
        hash BLOB NOT NULL UNIQUE,
        body TEXT NOT NULL
    );";

/// Brings a store written by an earlier version up to [`SCHEMA`].
fn migrate(conn: &Connection) -> Result<(), rusqlite::Error> {
    let has_blob_column = conn
        .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'result_blob'")?
        .exists([])?;
    if !has_blob_column {
        conn.execute_batch("ALTER TABLE jobs ADD COLUMN result_blob INTEGER")?;
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
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
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

impl SqliteStore {
    /// Opens (or creates) the file, resets nothing, and starts the writer thread.
    pub fn open(
        path: &Path,
        opts: SqliteOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
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
            let mut stmt = conn.prepare("SELECT id, status FROM jobs WHERE status < 2")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (id, code) = row?;
                if let Some(s) = JobStatus::from_code(code) {
                    unfinished.insert(id, s);
                }
            }
        }
        let counts = Arc::new(Mutex::new(counts));
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let writer_counts = counts.clone();
        let checkpointer = open_conn(path, opts.sync)?;
        // A slot of one: commits while the checkpointer is busy or resting fold into it.
        let (committed, commits) = std::sync::mpsc::sync_channel::<()>(1);
        thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, commits))?;
        thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                writer_loop(
                    opts.commit_delay,
                    conn,
                    rx,
                    unfinished,
                    writer_counts,
                    metrics,
                    committed,
                )
            })?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            _lock: lock,
            tx,
            next_id: AtomicU64::new(max_id as u64 + 1),
            counts,
            readers: Arc::new(Mutex::new(Vec::new())),
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
        )?;
        c.busy_timeout(std::time::Duration::from_secs(5))?;
        c.pragma_update(None, "cache_size", -1024)?;
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
}

/// A job's result: its shared body, or its own row for stores from before sharing.
const RESULT_JOIN: &str = "LEFT JOIN blobs b ON b.id = j.result_blob \
     LEFT JOIN results r ON j.result_blob IS NULL AND r.id = j.id";

const SELECT_COLS: &str = "SELECT j.id, j.kind, j.params, j.status, j.submitted_at, \
     j.started_at, j.finished_at, COALESCE(b.body, r.result), j.error FROM jobs j";

fn row_to_record(r: &rusqlite::Row<'_>) -> Result<JobRecord, rusqlite::Error> {
    let id: i64 = r.get(0)?;
    let params: String = r.get(2)?;
    let code: i64 = r.get(3)?;
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

/// Status of every unfinished job, kept by the writer (the file's only writer) so that
/// a state change needs no read first.
type Unfinished = HashMap<i64, JobStatus>;

fn writer_loop(
    commit_delay: std::time::Duration,
    mut conn: Connection,
    mut rx: mpsc::Receiver<Op>,
    mut unfinished: Unfinished,
    counts: Arc<Mutex<JobCounts>>,
    metrics: Arc<Metrics>,
    committed: std::sync::mpsc::SyncSender<()>,
) {
    // Replaces SQLite's automatic checkpoint (itself a WAL hook): see the end of the loop.
    conn.wal_hook(Some(note_wal_pages));
    let mut changes: Unfinished = HashMap::new();
    let mut blobs = Blobs::default();
    let mut batch: Vec<Op> = Vec::with_capacity(256);
    let mut last_batch = 0usize;
    while let Some(op) = rx.blocking_recv() {
        batch.push(op);
        // Commit delay: under concurrency (the last batch held more than one write), wait
        // a moment for the writes that are surely coming, above all the outcome of a job
        // whose insert is in this batch: both then go out as one row in one commit. A
        // lone write, or a delay of zero, commits at once.
        if !commit_delay.is_zero() && last_batch > 1 {
            thread::sleep(commit_delay);
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let n = batch.len();
        last_batch = n;
        let mut moved = Moved::default();
        let mut finish_results: Vec<bool> = Vec::with_capacity(n);
        // A failed transaction rolls back entirely, so the batch can be tried again as a
        // whole; transient errors (a busy disk, a lock) must not lose accepted writes.
        let mut res = Err(rusqlite::Error::InvalidQuery);
        for attempt in 0..COMMIT_ATTEMPTS {
            moved = Moved::default();
            finish_results.clear();
            changes.clear();
            blobs.rolled_back();
            res = apply_batch(
                &mut conn,
                &batch,
                &unfinished,
                &mut changes,
                &mut moved,
                &mut finish_results,
                &mut blobs,
            );
            match &res {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, attempt, ops = n, "sqlite commit failed; retrying");
                    thread::sleep(std::time::Duration::from_millis(10 << attempt));
                }
            }
        }
        metrics.store_commit(n, started.elapsed());
        match res {
            Ok(()) => {
                blobs.committed();
                // Wakes the checkpointer unless a wake-up is already pending.
                let _ = committed.try_send(());
                for (id, status) in changes.drain() {
                    if status.is_finished() {
                        unfinished.remove(&id);
                    } else {
                        unfinished.insert(id, status);
                    }
                }
                {
                    let mut c = counts.lock();
                    for s in JobStatus::ALL {
                        *c.slot(s) += *moved.into.slot(s);
                        *c.slot(s) = c.slot(s).saturating_sub(*moved.out_of.slot(s));
                    }
                }
                let mut fin = finish_results.into_iter();
                for op in batch.drain(..) {
                    match op {
                        Op::Insert { ack, .. } | Op::Flush { ack } | Op::Requeue { ack } => {
                            let _ = ack.send(Ok(()));
                        }
                        Op::Finish { ack, .. } => {
                            let changed = fin.next().unwrap_or(false);
                            if let Some(ack) = ack {
                                let _ = ack.send(changed);
                            }
                        }
                        Op::MarkRunning { .. } => {}
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, ops = n, "sqlite commit failed");
                blobs.rolled_back();
                metrics.store_errors.inc();
                let msg = e.to_string();
                for op in batch.drain(..) {
                    match op {
                        Op::Insert { ack, .. } | Op::Flush { ack } | Op::Requeue { ack } => {
                            let _ = ack.send(Err(msg.clone()));
                        }
                        Op::Finish { ack: Some(ack), .. } => {
                            let _ = ack.send(false);
                        }
                        Op::Finish { ack: None, .. } | Op::MarkRunning { .. } => {}
                    }
                }
            }
        }
        // Checkpoints: the checkpointer thread copies the log into the database in the
        // background; once the log is long, the writer copies what is left (little)
        // right after a commit's acks, so that the next commit starts the log over.
        // SQLite's automatic checkpoint instead runs inside a commit, copying a thousand
        // pages (5 ms here) while every writer of that batch waits for its answer.
        if WAL_PAGES.with(std::cell::Cell::get) >= CHECKPOINT_PAGES {
            let started = Instant::now();
            match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                Ok(()) => WAL_PAGES.with(|p| p.set(0)),
                Err(e) => {
                    tracing::warn!(error = %e, "sqlite checkpoint failed; retried after the next commit")
                }
            }
            metrics
                .store_checkpoint_duration
                .observe(started.elapsed().as_secs_f64());
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
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// The background half of checkpointing (see `writer_loop`): after commits, a PASSIVE
/// checkpoint (it never blocks the writer or readers), then a rest of
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

/// Jobs a batch moved into and out of each state, applied to the counts once committed.
#[derive(Default)]
struct Moved {
    into: JobCounts,
    out_of: JobCounts,
}

/// Applies one batch in one IMMEDIATE transaction (the write lock is taken up front,
/// waiting on the busy handler, rather than failing when a read upgrades to a write).
/// State changes go to `changes`, an overlay on `unfinished` that the caller merges only
/// once the commit succeeded, so a failed batch can be retried from the same start.
fn apply_batch(
    conn: &mut Connection,
    batch: &[Op],
    unfinished: &Unfinished,
    changes: &mut Unfinished,
    moved: &mut Moved,
    finish_results: &mut Vec<bool>,
    blobs: &mut Blobs,
) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // A job that finished before its insert was committed is written once, already in
    // its final state: one row instead of an insert and an update.
    let mut finish_of: HashMap<JobId, usize> = HashMap::new();
    for (i, op) in batch.iter().enumerate() {
        if let Op::Finish { id, .. } = op {
            finish_of.entry(*id).or_insert(i);
        }
    }
    let mut merged = vec![false; if finish_of.is_empty() { 0 } else { batch.len() }];
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO jobs (id, kind, params, status, submitted_at) VALUES (?1, ?2, ?3, 0, ?4)",
        )?;
        let mut insert_finished = tx.prepare_cached(
            "INSERT INTO jobs (id, kind, params, status, submitted_at, started_at, finished_at, \
             error, result_blob) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        let mut running =
            tx.prepare_cached("UPDATE jobs SET status = 1, started_at = ?2 WHERE id = ?1")?;
        let mut finish = tx.prepare_cached(
            "UPDATE jobs SET status = ?2, finished_at = ?3, error = ?4, \
             started_at = COALESCE(started_at, ?5), result_blob = ?6 WHERE id = ?1",
        )?;
        let mut add_blob = tx.prepare_cached(
            "INSERT INTO blobs (hash, body) VALUES (?1, ?2) ON CONFLICT (hash) DO NOTHING",
        )?;
        let mut find_blob = tx.prepare_cached("SELECT id FROM blobs WHERE hash = ?1")?;
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
        let current = |changes: &Unfinished, id: i64| {
            changes.get(&id).or_else(|| unfinished.get(&id)).copied()
        };
        for (i, op) in batch.iter().enumerate() {
            match op {
                Op::Insert {
                    id,
                    kind,
                    params,
                    at,
                    ..
                } => {
                    let later = finish_of.get(id).copied().filter(|&j| j > i);
                    if let Some(Op::Finish {
                        outcome,
                        started_at,
                        at: finished_at,
                        ..
                    }) = later.map(|j| &batch[j])
                    {
                        let after = outcome.status();
                        let (error, blob) = match outcome {
                            Outcome::Done(r) => (None, Some(blob_id(r)?)),
                            Outcome::Failed(e) | Outcome::Cancelled(e) => (Some(e.as_str()), None),
                        };
                        insert_finished.execute(params![
                            id.0 as i64,
                            kind,
                            params,
                            after.code(),
                            at,
                            started_at,
                            finished_at,
                            error,
                            blob
                        ])?;
                        changes.insert(id.0 as i64, after);
                        *moved.into.slot(after) += 1;
                        if let Some(j) = later {
                            merged[j] = true;
                        }
                    } else {
                        insert.execute(params![id.0 as i64, kind, params, at])?;
                        changes.insert(id.0 as i64, JobStatus::Queued);
                        moved.into.queued += 1;
                    }
                }
                Op::MarkRunning { id, at } => {
                    let id = id.0 as i64;
                    if current(changes, id) == Some(JobStatus::Queued) {
                        running.execute(params![id, at])?;
                        changes.insert(id, JobStatus::Running);
                        moved.out_of.queued += 1;
                        moved.into.running += 1;
                    }
                }
                Op::Finish { .. } if merged.get(i).copied().unwrap_or(false) => {
                    finish_results.push(true);
                }
                Op::Finish {
                    id,
                    outcome,
                    started_at,
                    at,
                    ..
                } => {
                    let id = id.0 as i64;
                    let changed = match current(changes, id) {
                        Some(before) if !before.is_finished() => {
                            let after = outcome.status();
                            let (error, blob) = match outcome {
                                Outcome::Done(r) => (None, Some(blob_id(r)?)),
                                Outcome::Failed(e) | Outcome::Cancelled(e) => {
                                    (Some(e.as_str()), None)
                                }
                            };
                            finish.execute(params![
                                id,
                                after.code(),
                                at,
                                error,
                                started_at,
                                blob
                            ])?;
                            changes.insert(id, after);
                            *moved.out_of.slot(before) += 1;
                            *moved.into.slot(after) += 1;
                            true
                        }
                        _ => false,
                    };
                    finish_results.push(changed);
                }
                Op::Flush { .. } => {}
                Op::Requeue { .. } => {
                    tx.execute(
                        "UPDATE jobs SET status = 0, started_at = NULL WHERE status = 1",
                        [],
                    )?;
                    let running_ids: Vec<i64> = unfinished
                        .iter()
                        .chain(changes.iter())
                        .filter(|(_, s)| **s == JobStatus::Running)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in running_ids {
                        if current(changes, id) == Some(JobStatus::Running) {
                            changes.insert(id, JobStatus::Queued);
                            moved.out_of.running += 1;
                            moved.into.queued += 1;
                        }
                    }
                }
            }
        }
    }
    tx.commit()
}

fn map_ack_err(r: Result<Result<(), String>, oneshot::error::RecvError>) -> Result<(), StoreError> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(msg)) => Err(StoreError::Io(std::io::Error::other(msg))),
        Err(_) => Err(StoreError::Closed),
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn submit(&self, job: &NewJob, now_ms: i64) -> Result<JobId, StoreError> {
        let (id, durable) = self.submit_begin(job, now_ms).await?;
        durable.await?;
        Ok(id)
    }

    async fn submit_begin(
        &self,
        job: &NewJob,
        now_ms: i64,
    ) -> Result<(JobId, super::Durable), StoreError> {
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
        Ok((id, Box::pin(async move { map_ack_err(rx.await) })))
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        // A primary-key lookup in WAL mode takes microseconds and never waits for the
        // writer, so it runs inline rather than paying a hop to the blocking pool.
        let conn = self.reader()?;
        let out = (|| {
            let mut stmt =
                conn.prepare_cached(&format!("{SELECT_COLS} {RESULT_JOIN} WHERE j.id = ?1"))?;
            Ok(stmt.query_row([id.0 as i64], row_to_record).optional()?)
        })();
        self.give_back(conn);
        out
    }

    async fn state(&self, id: JobId) -> Result<Option<JobState>, StoreError> {
        let conn = self.reader()?;
        let out = (|| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT j.status, COALESCE(b.body, r.result), j.error FROM jobs j \
                 {RESULT_JOIN} WHERE j.id = ?1"
            ))?;
            let row = stmt
                .query_row([id.0 as i64], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
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

    async fn mark_running(&self, id: JobId, now_ms: i64) -> Result<bool, StoreError> {
        self.send(Op::MarkRunning { id, at: now_ms }).await?;
        Ok(true)
    }

    async fn finish(
        &self,
        id: JobId,
        outcome: Outcome,
        started_at: Option<i64>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let (ack, rx) = oneshot::channel();
        self.send(Op::Finish {
            id,
            outcome,
            started_at,
            at: now_ms,
            ack: Some(ack),
        })
        .await?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    fn finish_begin(
        &self,
        id: JobId,
        outcome: Outcome,
        started_at: Option<i64>,
        now_ms: i64,
    ) -> super::Pending<bool> {
        let (ack, rx) = oneshot::channel();
        let sent = self.tx.blocking_send(Op::Finish {
            id,
            outcome,
            started_at,
            at: now_ms,
            ack: Some(ack),
        });
        Box::pin(async move {
            sent.map_err(|_| StoreError::Closed)?;
            rx.await.map_err(|_| StoreError::Closed)
        })
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>, StoreError> {
        let f = filter.clone();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "{SELECT_COLS} {RESULT_JOIN} WHERE j.id < ?1 AND (?2 IS NULL OR j.status = ?2) \
                 AND (?3 IS NULL OR j.kind = ?3) ORDER BY j.id DESC LIMIT ?4"
            ))?;
            let before = f.before.map(|b| b.0 as i64).unwrap_or(i64::MAX);
            let rows = stmt.query_map(
                params![before, f.status.map(|s| s.code()), f.kind, f.limit as i64],
                row_to_record,
            )?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(StoreError::from)
        })
        .await
    }

    async fn statuses(&self) -> Result<Vec<(JobId, JobStatus)>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT id, status FROM jobs ORDER BY id")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (id, code) = row?;
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
        self.send(Op::Requeue { ack }).await?;
        map_ack_err(rx.await)?;
        self.read(|c| {
            let mut stmt = c.prepare(&format!(
                "{SELECT_COLS} {RESULT_JOIN} WHERE j.status = 0 ORDER BY j.id"
            ))?;
            let rows = stmt.query_map([], row_to_record)?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(StoreError::from)
        })
        .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let (ack, rx) = oneshot::channel();
        self.send(Op::Flush { ack }).await?;
        map_ack_err(rx.await)
    }

    fn name(&self) -> &'static str {
        "sqlite"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store(dir: &Path) -> SqliteStore {
        store_with_delay(dir, std::time::Duration::ZERO)
    }

    fn store_with_delay(dir: &Path, commit_delay: std::time::Duration) -> SqliteStore {
        SqliteStore::open(
            &dir.join("t.db"),
            SqliteOptions {
                sync: SqliteSync::Normal,
                commit_delay,
            },
            Arc::new(Metrics::new()),
        )
        .unwrap()
    }

    fn job(kind: &str, params: serde_json::Value) -> NewJob {
        NewJob {
            kind: kind.into(),
            params,
        }
    }

    #[tokio::test]
    async fn a_submitted_job_is_readable_at_once_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let s = store(dir.path());
            let id = s.submit(&job("k", json!({"a": 1})), 5).await.unwrap();
            let r = s.get(id).await.unwrap().unwrap();
            assert_eq!(r.status, JobStatus::Queued);
            assert_eq!(r.params, json!({"a": 1}));
            s.mark_running(id, 6).await.unwrap();
            s.flush().await.unwrap();
            id
        };
        let s = store(dir.path());
        assert_eq!(s.counts().await.unwrap().running, 1);
        let again = s.recover_unfinished().await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].id, id);
        assert_eq!(again[0].status, JobStatus::Queued);
        assert_eq!(s.counts().await.unwrap().queued, 1);
        let next = s.submit(&job("k", json!({})), 7).await.unwrap();
        assert!(next.0 > id.0, "ids are never reused after a restart");
    }

    #[tokio::test]
    async fn a_second_store_on_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = store(dir.path());
        let second = SqliteStore::open(
            &dir.path().join("t.db"),
            SqliteOptions::default(),
            Arc::new(Metrics::new()),
        );
        let err = second.err().expect("the file is taken").to_string();
        assert!(err.contains("held by another tally process"), "{err}");
    }

    #[tokio::test]
    async fn finish_is_applied_once_and_listed_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut ids = Vec::new();
        for i in 0..5 {
            let kind = if i % 2 == 0 { "even" } else { "odd" };
            ids.push(s.submit(&job(kind, json!({})), i).await.unwrap());
        }
        assert!(s
            .finish(ids[0], Outcome::Done("{\"x\":1}".into()), None, 9)
            .await
            .unwrap());
        assert!(!s
            .finish(ids[0], Outcome::Failed("late".into()), None, 10)
            .await
            .unwrap());
        let r = s.get(ids[0]).await.unwrap().unwrap();
        assert_eq!(r.result.as_deref(), Some("{\"x\":1}"));
        assert_eq!(r.error, None);
        let c = s.counts().await.unwrap();
        assert_eq!((c.queued, c.done), (4, 1));

        let page = s
            .list(&ListFilter {
                limit: 2,
                ..ListFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(
            page.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![ids[4], ids[3]]
        );
        let evens = s
            .list(&ListFilter {
                limit: 10,
                kind: Some("even".into()),
                status: Some(JobStatus::Queued),
                before: Some(ids[4]),
            })
            .await
            .unwrap();
        assert_eq!(evens.iter().map(|r| r.id).collect::<Vec<_>>(), vec![ids[2]]);
        assert_eq!(s.statuses().await.unwrap().len(), 5);
    }

    #[test]
    fn a_job_finished_before_its_insert_committed_is_written_once_in_its_final_state() {
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
        let finish = |id: u64, outcome: Outcome| Op::Finish {
            id: JobId(id),
            outcome,
            started_at: Some(11),
            at: 12,
            ack: None,
        };
        let batch = vec![
            insert(1),
            insert(2),
            insert(3),
            finish(1, Outcome::Done("{\"x\":1}".into())),
            finish(2, Outcome::Failed("boom".into())),
            // A late outcome for a job finished earlier in the batch changes nothing.
            finish(1, Outcome::Failed("late".into())),
        ];
        let (unfinished, mut changes) = (Unfinished::new(), Unfinished::new());
        let (mut moved, mut results) = (Moved::default(), Vec::new());
        let mut blobs = Blobs::default();
        apply_batch(
            &mut conn,
            &batch,
            &unfinished,
            &mut changes,
            &mut moved,
            &mut results,
            &mut blobs,
        )
        .unwrap();
        assert_eq!(results, vec![true, true, false]);
        let into = &moved.into;
        assert_eq!((into.queued, into.done, into.failed), (1, 1, 1));
        assert_eq!(
            moved.out_of,
            JobCounts::default(),
            "nothing left queued to subtract"
        );
        type Row = (
            i64,
            i64,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = conn
            .prepare(
                "SELECT j.id, j.status, j.started_at, j.finished_at, j.error, b.body \
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
                ))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            vec![
                (
                    1,
                    JobStatus::Done.code() as i64,
                    Some(11),
                    Some(12),
                    None,
                    Some("{\"x\":1}".into())
                ),
                (
                    2,
                    JobStatus::Failed.code() as i64,
                    Some(11),
                    Some(12),
                    Some("boom".into()),
                    None
                ),
                (3, JobStatus::Queued.code() as i64, None, None, None, None),
            ]
        );
        assert_eq!(changes.get(&1), Some(&JobStatus::Done));
        assert_eq!(changes.get(&3), Some(&JobStatus::Queued));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_write_ahead_log_starts_over_instead_of_growing_under_constant_writes() {
        let dir = tempfile::tempdir().unwrap();
        // With a commit delay, so that path is exercised too (batches here hold many writes).
        let s = Arc::new(store_with_delay(
            dir.path(),
            std::time::Duration::from_micros(100),
        ));
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
            for (id, durable) in ids {
                durable.await.unwrap();
                assert!(s
                    .finish(id, Outcome::Done(result(id)), Some(2), 3)
                    .await
                    .unwrap());
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
            let id = s.submit(&job("k", json!({ "i": i })), 1).await.unwrap();
            // Three distinct bodies, each finished twice (in separate batches too).
            let body = format!("{{\"answer\":{}}}", i % 3);
            assert!(s.finish(id, Outcome::Done(body), None, 2).await.unwrap());
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
        let listed = s
            .list(&ListFilter {
                limit: 10,
                ..ListFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(listed.len(), 6);
        assert!(listed.iter().all(|r| r.result.is_some()));
        s.flush().await.unwrap();
        let c = Connection::open(dir.path().join("t.db")).unwrap();
        let stored: i64 = c
            .query_row("SELECT COUNT(*) FROM blobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, 3, "one row per distinct body");
    }

    #[tokio::test]
    async fn a_store_from_before_shared_results_opens_and_keeps_its_results() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The layout of earlier versions: no result_blob column, one result per job.
            let c = Connection::open(dir.path().join("t.db")).unwrap();
            c.execute_batch(
                "CREATE TABLE jobs (id INTEGER PRIMARY KEY, kind TEXT NOT NULL,
                     params TEXT NOT NULL, status INTEGER NOT NULL,
                     submitted_at INTEGER NOT NULL, started_at INTEGER,
                     finished_at INTEGER, error TEXT);
                 CREATE TABLE results (id INTEGER PRIMARY KEY, result TEXT NOT NULL);
                 INSERT INTO jobs VALUES (1, 'k', '{}', 2, 1, 1, 2, NULL);
                 INSERT INTO results VALUES (1, '{\"old\":true}');",
            )
            .unwrap();
        }
        let s = store(dir.path());
        assert_eq!(
            s.state(JobId(1)).await.unwrap().unwrap().result.as_deref(),
            Some("{\"old\":true}")
        );
        let id = s.submit(&job("k", json!({})), 3).await.unwrap();
        assert_eq!(id, JobId(2));
        assert!(s
            .finish(id, Outcome::Done("{\"new\":true}".into()), None, 4)
            .await
            .unwrap());
        assert_eq!(
            s.get(id).await.unwrap().unwrap().result.as_deref(),
            Some("{\"new\":true}")
        );
        assert_eq!(
            s.get(JobId(1)).await.unwrap().unwrap().result.as_deref(),
            Some("{\"old\":true}")
        );
    }
}
