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
//!
//! The files, by concern: this one has the `Store` impl, the options, the metrics and
//! the threads; `protocol.rs` the ops callers send the writer; `writer.rs` the writer
//! thread (batching, commit, answers); `batch.rs` a batch applied in its transaction
//! (folding, requeues); `blobs.rs` result bodies stored once; `schema.rs` the tables,
//! migrations and row mapping; `checkpoint.rs` the WAL checkpoints; `error.rs` SQLite's
//! errors classified into `StoreError`. The files share one namespace (`use super::*`).

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

mod batch;
mod blobs;
mod checkpoint;
mod error;
mod protocol;
mod schema;
mod writer;

use self::{batch::*, blobs::*, checkpoint::*, error::*, protocol::*, schema::*, writer::*};

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
        SqliteMetrics {
            commits: m.add("store_commits", "Store transactions committed"),
            errors: m.add("store_errors", "Store transactions that failed"),
            batch_size: m.register(
                "store_batch_size",
                "Operations folded into one store transaction",
                batch_histogram(),
            ),
            commit_duration: m.register(
                "store_commit_duration_seconds",
                "Time to apply and commit one store transaction",
                seconds_histogram(),
            ),
            checkpoint_duration: m.register(
                "store_checkpoint_duration_seconds",
                "Time to copy the SQLite write-ahead log into the database file",
                seconds_histogram(),
            ),
        }
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

    /// Finishes attempt 1 of `id` with `result`, which must be recorded.
    async fn finish_done(
        s: &SqliteStore,
        id: JobId,
        result: String,
        started_at: Option<i64>,
        at: i64,
    ) {
        let f = Finish {
            id,
            attempt: Attempt::Of(1),
            outcome: Outcome::Done(result),
            started_at,
            at,
        };
        assert_eq!(s.finish(f).await.unwrap(), Finished::Recorded);
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
                finish_done(&s, id, result(id), Some(2), 3).await;
            }
        }
        reading.store(false, Ordering::Relaxed);
        reader.await.unwrap();
        // The log's header counts its restarts (SQLite's checkpoint sequence number,
        // bytes 12..16, big-endian); the file's length is the longest the log ever grew.
        // How long it grows between restarts depends on how often a reader holds an old
        // snapshot across the writer's checkpoint, which a loaded machine makes common;
        // that it restarts, and stays well below the data written, does not.
        let wal = std::fs::read(dir.path().join("t.db-wal")).unwrap();
        let restarts = u32::from_be_bytes(wal[12..16].try_into().unwrap());
        assert!(
            restarts >= 2 && wal.len() < 12 << 20,
            "after 16 MB of writes the log started over {restarts} times and holds {} bytes",
            wal.len()
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
            finish_done(&s, id, body, None, 2).await;
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
        finish_done(&s, id, "{\"new\":true}".into(), None, 4).await;
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
