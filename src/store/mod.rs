//! Where job records and results live. One async trait, several implementations:
//! SQLite (default: durable, WAL, group commits), memory (nothing on disk) and Redis
//! (`crate::queue::redis`: shared by several replicas, and their queue too).
//!
//! Architecture Invariant: the trait speaks only of data (ids, records, attempts,
//! outcomes), never of in-process things (channels, closures, threads), so a networked
//! store (Redis) can implement it and several processes can share one.
//!
//! Attempts fence outcomes: each claim of a job is a numbered attempt (see
//! [`crate::queue`]), and a store refuses the outcome of an attempt older than the newest
//! one it has recorded, so a worker that lost its job cannot overwrite a newer result.

use async_trait::async_trait;

use crate::model::{JobCounts, JobId, JobRecord, JobState, JobStatus, ListFilter, NewJob, Outcome};

pub mod memory;
mod spec;
pub mod sqlite;

pub use spec::{RedisUrl, StoreSpec};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store failed in a way that is neither its surroundings nor this write (a bug,
    /// a schema it does not know): not retried, an internal error at the edge. Each store
    /// maps its engine's errors into these variants itself.
    #[error("the {store} store failed: {cause}")]
    Failed { store: &'static str, cause: String },
    /// The store cannot take writes (or answer) right now: a full or read-only disk, an
    /// I/O error, an unreachable server. Transient: the same request can succeed later.
    #[error("the {store} store is unavailable: {cause}")]
    Unavailable { store: &'static str, cause: String },
    /// A write was sent and its answer never came (a timeout, a connection cut after the
    /// send): it may or may not have been applied.
    #[error("the {store} store did not answer in time ({cause}): the outcome is unknown, the write may have been applied")]
    OutcomeUnknown { store: &'static str, cause: String },
    /// The store refused this write for what it holds, not for its surroundings (a value
    /// too large, say): retrying the same write cannot succeed.
    #[error("the {store} store refused the write: {cause}")]
    Rejected { store: &'static str, cause: String },
    #[error("store is closed")]
    Closed,
    #[error("stored record of job {id} is corrupt: {what}")]
    Corrupt { id: u64, what: String },
    #[error("{} is held by another tally process; each SQLite store has one owner", .0.display())]
    Locked(std::path::PathBuf),
    #[error("store I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    /// True when the same operation may succeed later without anything changing in it:
    /// callers retry (outcomes) or answer 503 with `Retry-After` (requests).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable { .. }
            | StoreError::OutcomeUnknown { .. }
            | StoreError::Io(_) => true,
            StoreError::Failed { .. }
            | StoreError::Rejected { .. }
            | StoreError::Closed
            | StoreError::Corrupt { .. }
            | StoreError::Locked(_) => false,
        }
    }
}

/// Resolves once a write is durable, with what the write answers.
pub type Pending<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send>>;

/// Resolves once a submitted record is durable (see [`Store::submit_begin`]).
pub type Durable = Pending<()>;

/// What a submission made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// A new job, queued.
    New(JobId),
    /// Nothing: the submission repeats one with the same idempotency key and the same
    /// request (kind and params) within the key's lifetime; this is that first job.
    Replayed(JobId),
    /// Nothing: the idempotency key was used for a different request, this job's.
    KeyReused(JobId),
}

impl Submitted {
    /// The job the answer names.
    pub fn id(self) -> JobId {
        match self {
            Submitted::New(id) | Submitted::Replayed(id) | Submitted::KeyReused(id) => id,
        }
    }
}

/// How a store recognises a repeated request under one idempotency key: BLAKE3 of the
/// kind and the params in canonical form (object keys sorted, no spaces), so that the
/// same params sent with their keys in another order are the same request.
pub fn fingerprint(job: &NewJob) -> [u8; 32] {
    fn canonical(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(k.clone()).to_string());
                    out.push(':');
                    canonical(&m[k], out);
                }
                out.push('}');
            }
            serde_json::Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canonical(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut text = String::new();
    canonical(&job.params, &mut text);
    let mut h = blake3::Hasher::new();
    h.update(job.kind.as_bytes());
    h.update(b"\0");
    h.update(text.as_bytes());
    *h.finalize().as_bytes()
}

/// What stores keep of a client's idempotency key: its BLAKE3 hash (fixed size, and no
/// client text in keys or indexes).
pub fn key_hash(key: &str) -> [u8; 32] {
    *blake3::hash(key.as_bytes()).as_bytes()
}

/// What a store did with an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Recorded: the job now has this final state.
    Recorded,
    /// The job had already finished (cancelled, timed out, or another outcome won).
    AlreadyFinished,
    /// Refused: a newer attempt of the job has been recorded (fencing).
    Stale,
    /// No such job.
    Unknown,
}

/// A write of an outcome that did not happen; the outcome is handed back (when the store
/// still had it) so the caller can try again without having kept a copy.
#[derive(Debug)]
pub struct FinishFailed {
    pub error: StoreError,
    pub outcome: Option<Outcome>,
}

impl From<StoreError> for FinishFailed {
    fn from(error: StoreError) -> Self {
        FinishFailed {
            error,
            outcome: None,
        }
    }
}

/// Resolves once an outcome is durable (or refused), see [`Store::finish`].
pub type FinishPending =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Finished, FinishFailed>> + Send>>;

/// What a store did with a request to run a finished job again.
#[derive(Debug, Clone, PartialEq)]
pub enum Requeued {
    /// Queued again; the record as it now stands (its `attempts` unchanged: the next
    /// claim is the next attempt).
    Yes(Box<JobRecord>),
    /// Only failed and cancelled jobs run again.
    NotFinished(JobStatus),
    Done,
    Unknown,
}

pub use crate::model::{Attempt, Finish};

/// Whether an outcome of `attempt` may finish a job that stands at `status` with
/// `attempts` recorded (the rule every store applies; Redis in `finish.lua`). A worker's
/// outcome is stale when a newer attempt was recorded, or when its attempt's lease
/// expired and the job waits for its next claim (queued with that attempt counted);
/// only a cancel (`Attempt::Any`) finishes a waiting job.
pub(crate) fn finish_rule(status: JobStatus, attempts: u32, attempt: Attempt) -> Finished {
    match attempt {
        Attempt::Of(a)
            if a < attempts || (a == attempts && a > 0 && status == JobStatus::Queued) =>
        {
            Finished::Stale
        }
        _ if status.is_finished() => Finished::AlreadyFinished,
        _ => Finished::Recorded,
    }
}

/// The attempts a job counts once `attempt` hands it back (see [`Store::release`]).
pub(crate) fn released_attempts(attempt: u32, spent: bool) -> u32 {
    if spent {
        attempt
    } else {
        attempt.saturating_sub(1)
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Allocates an id and records the job as queued. Returns only once the record is
    /// durable (for stores that persist): the id is valid the instant it is returned.
    ///
    /// With an idempotency key, the key is recorded with the job, atomically: a later
    /// submission with the same key within its lifetime makes nothing and answers
    /// [`Submitted::Replayed`] (same request, by [`fingerprint`]) or
    /// [`Submitted::KeyReused`] (another request), naming the first job, and only once
    /// that job's record is durable. Concurrent submissions with one key make one job.
    async fn submit(&self, job: &NewJob, now_ms: i64) -> Result<Submitted, StoreError>;

    /// Starts a submission: allocates the id and puts the record on its way, ordered
    /// before any later write about the same job; the returned future resolves once the
    /// record is durable. The engine queues the job in between, so the work overlaps the
    /// commit, and still returns the id only after the future resolved. Stores without
    /// a pipeline of writes keep the default (all done in `submit`). Only a
    /// [`Submitted::New`] job is to be queued; a submission with an idempotency key may
    /// be answered only once it is durable (the future then resolves at once).
    async fn submit_begin(
        &self,
        job: &NewJob,
        now_ms: i64,
    ) -> Result<(Submitted, Durable), StoreError> {
        let s = self.submit(job, now_ms).await?;
        Ok((s, Box::pin(std::future::ready(Ok(())))))
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError>;

    /// Status, result and error only: the answer to a poll. Stores override it when they
    /// can read less than the whole record.
    async fn state(&self, id: JobId) -> Result<Option<JobState>, StoreError> {
        Ok(self.get(id).await?.map(|r| JobState {
            status: r.status,
            result: r.result,
            error: r.error,
        }))
    }

    /// Records that `attempt` of an unfinished job started: running, `attempts =
    /// attempt` (a newer attempt takes over one whose lease was reclaimed). Called by
    /// worker threads as they claim a job; the write is on its way (ordered before every
    /// later write about the job) when this returns, and nobody waits for it. Ignored
    /// when the job finished or this attempt is not newer than the recorded one.
    fn start(&self, id: JobId, attempt: u32, now_ms: i64) -> Result<(), StoreError>;

    /// Running → queued for `attempt`: an unstarted claim handed back at shutdown (the
    /// attempt is not counted), or, when `spent`, a job whose lease expired (reclaimed:
    /// the attempt stays counted). Ignored unless `attempt` is the one recorded as running.
    async fn release(&self, id: JobId, attempt: u32, spent: bool) -> Result<(), StoreError>;

    /// Queued or running → the outcome's state, with the start time when the job ran,
    /// unless the job already finished or a newer attempt than the outcome's was
    /// recorded. The future resolves once the write is durable, with what became of it.
    ///
    /// The one way to hand an outcome over, from a worker thread or from the runtime:
    /// the write is on its way, ordered after every earlier write about the job, when
    /// this returns (so an outcome often joins the group commit of its own job's insert).
    /// Only when a store's write queue is full does that wait: a worker thread (outside
    /// the runtime) blocks until there is room; within the runtime the write goes when
    /// the future is first polled (callers there await it at once).
    fn finish(&self, f: Finish) -> FinishPending;

    /// Failed or cancelled → queued, keeping the id, params and attempt count, and
    /// clearing the error and times of the last run.
    async fn requeue(&self, id: JobId, now_ms: i64) -> Result<Requeued, StoreError>;

    /// A page of jobs, newest first.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>, StoreError>;

    /// Job ids with their status, oldest first, from the first id after `after`, at
    /// most `limit` of them: a page of the compatible `/api/jobs` listing.
    async fn statuses(
        &self,
        after: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<(JobId, JobStatus)>, StoreError>;

    async fn counts(&self) -> Result<JobCounts, StoreError>;

    /// Jobs left queued or running by an earlier process, reset to queued, oldest first:
    /// the engine runs them again.
    async fn recover_unfinished(&self) -> Result<Vec<JobRecord>, StoreError>;

    /// Returns once everything accepted so far is durable.
    async fn flush(&self) -> Result<(), StoreError>;

    /// Writes what is pending, stops the store's threads and releases what it holds (the
    /// SQLite file's lock). Later writes fail with [`StoreError::Closed`]. Idempotent.
    async fn close(&self) -> Result<(), StoreError> {
        self.flush().await
    }

    /// `Err(cause)` while the store cannot write (a full or read-only disk, say); it
    /// recovers by itself once it can. Drives `/readyz`.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }

    /// True when a read costs about as little as a lookup in a map: the engine then keeps
    /// no copy of just-finished states for polls (it would also outlive the store's own
    /// evictions).
    fn cheap_reads(&self) -> bool {
        false
    }

    /// Finished results dropped to respect a memory cap (0 for stores that keep all).
    fn evictions(&self) -> u64 {
        0
    }

    /// Short name for logs and metrics.
    fn name(&self) -> &'static str;
}
