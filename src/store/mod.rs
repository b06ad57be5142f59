//! Where job records and results live. One async trait, several implementations:
//! SQLite (default: durable, WAL, group commits) and memory (nothing on disk).
//!
//! Architecture Invariant: the trait speaks only of data (ids, records, outcomes), never
//! of in-process things (channels, closures, threads), so a networked store (Redis) can
//! implement it and several processes can share one.

use async_trait::async_trait;

use crate::jobs::model::{
    JobCounts, JobId, JobRecord, JobState, JobStatus, ListFilter, NewJob, Outcome,
};

pub mod memory;
pub mod sqlite;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store is closed")]
    Closed,
    #[error("stored record of job {id} is corrupt: {what}")]
    Corrupt { id: u64, what: String },
    #[error("{} is held by another tally process; each SQLite store has one owner", .0.display())]
    Locked(std::path::PathBuf),
    #[error("store I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Resolves once a write is durable, with what the write answers.
pub type Pending<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send>>;

/// Resolves once a submitted record is durable (see [`Store::submit_begin`]).
pub type Durable = Pending<()>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Allocates an id and records the job as queued. Returns only once the record is
    /// durable (for stores that persist): the id is valid the instant it is returned.
    async fn submit(&self, job: &NewJob, now_ms: i64) -> Result<JobId, StoreError>;

    /// Starts a submission: allocates the id and puts the record on its way, ordered
    /// before any later write about the same job; the returned future resolves once the
    /// record is durable. The engine queues the job in between, so the work overlaps the
    /// commit, and still returns the id only after the future resolved. Stores without
    /// a pipeline of writes keep the default (all done in `submit`).
    async fn submit_begin(
        &self,
        job: &NewJob,
        now_ms: i64,
    ) -> Result<(JobId, Durable), StoreError> {
        let id = self.submit(job, now_ms).await?;
        Ok((id, Box::pin(std::future::ready(Ok(())))))
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

    /// Queued → running. Stores that apply it asynchronously may return true before
    /// checking; the engine decides cancellation in process, not from this answer.
    async fn mark_running(&self, id: JobId, now_ms: i64) -> Result<bool, StoreError>;

    /// Queued or running → the outcome's state, with the start time when the job ran
    /// (`mark_running` may never have been called for a short job). Returns false when
    /// the job had already finished (a late result after a timeout or a cancel is dropped).
    async fn finish(
        &self,
        id: JobId,
        outcome: Outcome,
        started_at: Option<i64>,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// `finish` for callers outside the async runtime (worker threads): the write is on
    /// its way, ordered after every earlier write about the job, when this returns; the
    /// future resolves once it is durable, with `finish`'s answer. Worker threads hand
    /// outcomes straight to the store this way instead of through a task, so an outcome
    /// often joins the group commit of its own job's insert. Must not be called from
    /// within the async runtime (it may block briefly on a full write queue).
    fn finish_begin(
        &self,
        id: JobId,
        outcome: Outcome,
        started_at: Option<i64>,
        now_ms: i64,
    ) -> Pending<bool>;

    /// A page of jobs, newest first.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRecord>, StoreError>;

    /// Every job id with its status, oldest first (the compatible `/api/jobs` listing).
    async fn statuses(&self) -> Result<Vec<(JobId, JobStatus)>, StoreError>;

    async fn counts(&self) -> Result<JobCounts, StoreError>;

    /// Jobs left queued or running by an earlier process, reset to queued, oldest first:
    /// the engine runs them again.
    async fn recover_unfinished(&self) -> Result<Vec<JobRecord>, StoreError>;

    /// Returns once everything accepted so far is durable.
    async fn flush(&self) -> Result<(), StoreError>;

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
