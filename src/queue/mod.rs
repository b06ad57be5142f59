//! Where jobs wait for a worker and who holds them while they run: the [`JobQueue`]
//! trait, a queue whose claims are leases; its in-process implementation
//! ([`local::LocalQueue`], over the SQLite and memory stores); Redis ([`redis`]), which is
//! store and queue at once and the one several replicas share; and [`open`], which opens
//! the store and queue a `--store` spec names.
//!
//! The rules every implementation keeps (they are what lets a job survive a dead or
//! stalled worker, in one process or across replicas):
//! - A claim leases a job to one worker for a while and numbers the attempt (1, 2, ...):
//!   the attempt is the fencing token.
//! - The engine renews the leases of the jobs its workers are visibly working on; a
//!   lease that is not renewed expires, and the job is reclaimed: queued again, for its
//!   next attempt, or failed for good once it used up `--max-attempts` (a dead letter).
//! - An outcome is recorded only for the attempt that holds the job; a stale attempt's
//!   outcome is refused ([`Finished::Stale`]), counted and logged by the engine.
//! - At shutdown, claims not yet started are handed back at once (`release`).
//!
//! Architecture Invariant: the engine knows no queue implementation; it sees this trait.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use async_trait::async_trait;
use serde_json::Value;

use crate::model::{JobId, NewJob};
use crate::store::{
    Durable, Finish, FinishPending, Finished, Requeued, Store, StoreError, Submitted,
};

pub mod local;
pub mod redis;

/// A claimed job: who it is, which attempt this is, and what to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub id: JobId,
    /// 1 for the first run; the fencing token of this claim.
    pub attempt: u32,
    /// Attempts used before the job was last queued again by a retry: this run's budget
    /// of attempts starts after them.
    pub retry_base: u32,
    pub kind: String,
    pub params: Value,
}

/// An admitted submission: what it made (only a [`Submitted::New`] job was queued; the
/// others name the first job of the submission's idempotency key, already durable).
pub struct Pushed {
    pub submitted: Submitted,
    /// Resolves once the record is durable; the id may be handed out only then.
    pub durable: Durable,
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("the queue is full ({capacity} jobs waiting); retry later")]
    Full { capacity: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The queue stopped handing out work (shutdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the queue is closed")]
pub struct Closed;

/// What became of a lease the engine asked to renew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours, for another lease period.
    Held,
    /// Expired and reclaimed, or finished by someone else: stop; the outcome will be
    /// refused.
    Lost,
    /// Cancelled by a request (possibly on another replica): stop.
    Cancelled,
}

/// A process taking work from the queue, as the queue knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Its consumer name (host, pid and random bits; unique per process start).
    pub name: String,
    pub host: String,
    pub pid: u32,
    pub workers: u32,
    /// Workers inside a job when it last reported.
    pub busy: u32,
    /// When it last reported (ms since epoch).
    pub last_seen_ms: i64,
    /// True for the process answering.
    pub this: bool,
}

/// The size of a queue, for `/metrics` and the dashboard.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    pub waiting: u64,
    pub leased: u64,
}

/// Jobs submitted and ended on every replica since the shared store began (counted where
/// states change, never lowered by expiry): the dashboard's rates across replicas.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClusterTotals {
    pub submitted: u64,
    pub done: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// The totals at one moment (ms since the epoch), one of the samples behind the
/// dashboard's rate history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TotalsSample {
    pub at_ms: i64,
    pub totals: ClusterTotals,
}

/// How far back the rate history goes: 15 minutes, a sample a second.
pub const HISTORY_SECS: u64 = 900;

/// Leases that expired, as one reclaim pass found them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    /// Queued again for their next attempt.
    pub requeued: Vec<(JobId, u32)>,
    /// Failed for good: they used up their attempts.
    pub dead: Vec<(JobId, u32)>,
}

/// Called with the id of a job the moment the queue has it, before any worker can see
/// it, and whether a worker of this process will run it (the engine then tracks it from
/// there, so that polls of it are answered and held here).
pub type Admitted<'a> = &'a (dyn Fn(JobId, bool) + Send + Sync);

#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Admits a job: its record on its way to the store and the job on the queue. The
    /// returned future resolves once the record is durable; the id may be handed out
    /// only then. A submission whose idempotency key the store already holds queues
    /// nothing and calls no `admitted`: it answers [`Submitted::Replayed`] (the same
    /// request) or [`Submitted::KeyReused`] (another one), naming the first job. A full
    /// queue refuses those too (the client retries later and then gets its answer).
    async fn push(
        &self,
        job: &NewJob,
        now_ms: i64,
        admitted: Admitted<'_>,
    ) -> Result<Pushed, PushError>;

    /// For worker threads (blocking): waits up to `wait` for the next job and leases it
    /// to the caller as its next attempt. `Ok(None)` when nothing came in time.
    fn claim(&self, wait: Duration) -> Result<Option<Lease>, Closed>;

    /// Extends the leases of the jobs the engine's workers are visibly working on, one
    /// answer per lease, in order.
    async fn renew(&self, held: &[(JobId, u32)], now_ms: i64) -> Result<Vec<Renewal>, StoreError>;

    /// Records a worker's outcome (`Attempt::Of` its attempt) unless the attempt no longer
    /// holds the job (then `Finished::Stale`). From a worker thread the write is on its
    /// way when this returns; from the runtime (timeouts, retries of outcomes the store
    /// could not take) it goes when the future is first polled (see [`Store::finish`]).
    /// The future says what became of it, and hands the outcome back when it could not
    /// be written.
    fn finish(&self, f: Finish) -> FinishPending;

    /// Hands a claimed but unstarted job back (shutdown): queued again at once, this
    /// attempt not counted.
    async fn release(&self, id: JobId, attempt: u32) -> Result<(), StoreError>;

    /// Reclaims the jobs whose lease expired: queued again, or dead letters.
    async fn reclaim_expired(&self, now_ms: i64) -> Result<Reclaimed, StoreError>;

    /// Cancels a job wherever it is: its state is `cancelled` at once; a worker running
    /// it learns at its next renewal (or directly, when it runs in this process).
    async fn cancel(&self, id: JobId, now_ms: i64) -> Result<Finished, StoreError>;

    /// Runs a failed or cancelled job again: same id, its next attempt.
    async fn retry(
        &self,
        id: JobId,
        now_ms: i64,
        admitted: Admitted<'_>,
    ) -> Result<Requeued, PushError>;

    /// Queues again what an earlier run of this process left unfinished (for queues
    /// that live in the process); returns how many jobs that is.
    async fn recover(&self) -> Result<usize, StoreError>;

    /// Stops handing out work: blocked and later claims answer [`Closed`].
    fn close(&self);

    /// Jobs waiting for a worker (as far as this process can tell cheaply).
    fn waiting(&self) -> usize;

    /// Waits up to `hold` for a job that runs elsewhere to finish (long polling across
    /// replicas); returns at once when it finished already. Queues whose jobs all run in
    /// this process keep the default (the engine knows their jobs' ends itself).
    async fn wait_finished(&self, _id: JobId, _hold: Duration) {}

    /// The queue as a whole: jobs waiting and jobs leased (on every replica).
    async fn stats(&self) -> Result<QueueStats, StoreError>;

    /// Every replica's totals, for a queue shared between processes; `None` for an
    /// in-process queue, whose process counters are already the whole.
    async fn cluster_totals(&self) -> Result<Option<ClusterTotals>, StoreError> {
        Ok(None)
    }

    /// Every replica's totals, a sample a second for the last [`HISTORY_SECS`], oldest
    /// first, for a queue shared between processes (its replicas record them); `None`
    /// for an in-process queue, whose engine samples its own counters.
    async fn totals_history(&self) -> Result<Option<Vec<TotalsSample>>, StoreError> {
        Ok(None)
    }

    /// The processes taking work from this queue, this one included (an in-process
    /// queue has only this one).
    async fn replicas(&self) -> Result<Vec<Replica>, StoreError>;

    /// True when only this process's workers ever run the jobs it queues (the jobs
    /// admitted here are then tracked from their admission).
    fn is_local(&self) -> bool;
}

/// How long a worker's lease lasts without renewal (`--lease-ms`), how often the engine
/// renews and reclaims, and how many attempts a job gets (`--max-attempts`).
#[derive(Debug, Clone, Copy)]
pub struct LeaseOptions {
    pub lease: Duration,
    pub max_attempts: u32,
}

impl LeaseOptions {
    /// Renew well before expiry, and often enough that a cancel on another replica
    /// reaches the worker within a second.
    pub fn renew_every(&self) -> Duration {
        (self.lease / 3).min(Duration::from_millis(500))
    }
}

/// The error a dead letter ends with (`attempts` is a number, or a placeholder for a
/// queue that formats it elsewhere).
pub fn gave_up(attempts: impl std::fmt::Display) -> String {
    format!(
        "gave up after {attempts} attempts: each one's lease expired before it finished \
         (its worker died or stalled)"
    )
}

/// This machine's name, as processes report it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// What opening a store and its queue takes besides the spec.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// `--queue-capacity`: jobs waiting at most (with Redis, in the shared queue).
    pub capacity: usize,
    /// Worker threads of this process.
    pub workers: usize,
    pub lease: LeaseOptions,
    /// Redis: how long finished jobs stay (`--result-ttl`).
    pub result_ttl: Duration,
    /// Redis: how long a command may take before the store counts as unavailable.
    pub redis_response_timeout: Duration,
    pub sqlite: crate::store::sqlite::SqliteOptions,
    /// Memory: finished results kept (`--memory-max-results`).
    pub memory_max_results: usize,
}

/// Opens the store `spec` names and the queue that goes with it: an in-process queue
/// ([`local::LocalQueue`]) over SQLite or memory, or Redis, which is both.
pub async fn open(
    spec: &crate::store::StoreSpec,
    o: OpenOptions,
    metrics: &crate::metrics::Metrics,
) -> anyhow::Result<(Arc<dyn Store>, Arc<dyn JobQueue>)> {
    use crate::store::{memory::MemoryStore, sqlite::SqliteStore, StoreSpec};
    let store: Arc<dyn Store> = match spec {
        StoreSpec::Redis(url) => {
            let redis = redis::RedisStore::open(
                redis::RedisOptions {
                    url: url.expose().to_string(),
                    capacity: o.capacity,
                    result_ttl: o.result_ttl,
                    lease: o.lease,
                    workers: o.workers,
                    response_timeout: o.redis_response_timeout,
                },
                metrics,
            )
            .await
            .with_context(|| format!("connecting to the store {spec}"))?;
            return Ok((Arc::new(redis.clone()), Arc::new(redis)));
        }
        StoreSpec::Sqlite(path) => Arc::new(
            SqliteStore::open(path, o.sqlite, metrics)
                .with_context(|| format!("opening the store {spec}"))?,
        ),
        StoreSpec::Memory => Arc::new(MemoryStore::new(o.memory_max_results)),
    };
    let queue = Arc::new(local::LocalQueue::new(
        store.clone(),
        o.capacity,
        o.workers,
        o.lease,
    ));
    Ok((store, queue))
}
