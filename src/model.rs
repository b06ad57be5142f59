//! The job record: what a job is (kind + params), where it stands, and how it ended.
//! Plain domain types; the HTTP layer decides how they look on the wire.

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

/// A job id, allocated by the store: a number. How clients write it (`job_id_N`) is the
/// HTTP edge's business (`api::ids`); logs show the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Done,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Done => "done",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_finished(self) -> bool {
        match self {
            JobStatus::Queued | JobStatus::Running => false,
            JobStatus::Done | JobStatus::Failed | JobStatus::Cancelled => true,
        }
    }

    /// Compact code used by stores that keep the status as a number.
    pub fn code(self) -> u8 {
        match self {
            JobStatus::Queued => 0,
            JobStatus::Running => 1,
            JobStatus::Done => 2,
            JobStatus::Failed => 3,
            JobStatus::Cancelled => 4,
        }
    }

    pub fn from_code(code: i64) -> Option<JobStatus> {
        JobStatus::ALL
            .into_iter()
            .find(|s| i64::from(s.code()) == code)
    }
}

impl FromStr for JobStatus {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or(())
    }
}

/// A job as submitted: its kind and its parameters. Jobs are data, never closures, so
/// any store can carry them and any process can run them.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub kind: String,
    pub params: Value,
    /// The client's idempotency key (`Idempotency-Key` at the HTTP edge): a later
    /// submission with the same key and request gets this job instead of a new one.
    pub idempotency: Option<IdempotencyKey>,
}

impl NewJob {
    /// A job without an idempotency key.
    pub fn new(kind: impl Into<String>, params: Value) -> Self {
        NewJob {
            kind: kind.into(),
            params,
            idempotency: None,
        }
    }
}

/// An idempotency key as the store keeps it: the client's text and how long it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub key: String,
    /// The key is forgotten this long after the submission that first used it.
    pub ttl_ms: u64,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The result, already serialized as JSON text (stored and served as is).
    Done(String),
    Failed(String),
    Cancelled(String),
}

impl Outcome {
    pub fn status(&self) -> JobStatus {
        match self {
            Outcome::Done(_) => JobStatus::Done,
            Outcome::Failed(_) => JobStatus::Failed,
            Outcome::Cancelled(_) => JobStatus::Cancelled,
        }
    }
}

/// Everything the store knows about one job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: JobId,
    pub kind: String,
    pub params: Value,
    pub status: JobStatus,
    pub submitted_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// JSON text of the result when `status` is done.
    pub result: Option<String>,
    /// Why the job failed or was cancelled.
    pub error: Option<String>,
    /// How many times a worker claimed it (0 while it waits for its first run).
    pub attempts: u32,
    /// `attempts` when it was last queued again by a retry: its budget of attempts
    /// (`--max-attempts`) counts from there.
    pub retry_base: u32,
}

impl JobRecord {
    /// Queued again by a retry: no times, result or error, and its budget of attempts
    /// counted from here.
    pub fn requeue(&mut self) {
        self.status = JobStatus::Queued;
        self.started_at = None;
        self.finished_at = None;
        self.error = None;
        self.result = None;
        self.retry_base = self.attempts;
    }
}

/// Where a job stands and how it ended: what a poll needs, without params or times.
#[derive(Debug, Clone, PartialEq)]
pub struct JobState {
    pub status: JobStatus,
    pub result: Option<String>,
    pub error: Option<String>,
}

impl From<&Outcome> for JobState {
    fn from(o: &Outcome) -> Self {
        let (result, error) = match o {
            Outcome::Done(r) => (Some(r.clone()), None),
            Outcome::Failed(e) | Outcome::Cancelled(e) => (None, Some(e.clone())),
        };
        JobState {
            status: o.status(),
            result,
            error,
        }
    }
}

/// Number of jobs in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounts {
    pub queued: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl JobCounts {
    pub fn in_progress(&self) -> u64 {
        self.queued + self.running
    }

    pub fn slot(&mut self, s: JobStatus) -> &mut u64 {
        match s {
            JobStatus::Queued => &mut self.queued,
            JobStatus::Running => &mut self.running,
            JobStatus::Done => &mut self.done,
            JobStatus::Failed => &mut self.failed,
            JobStatus::Cancelled => &mut self.cancelled,
        }
    }
}

/// A page request over the job list, newest first.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub kind: Option<String>,
    pub limit: usize,
    /// Only jobs with an id lower than this one (the previous page's last id).
    pub before: Option<JobId>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_round_trip() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::from_code(i64::from(s.code())), Some(s));
            assert_eq!(s.as_str().parse::<JobStatus>(), Ok(s));
        }
        assert_eq!(JobStatus::from_code(9), None);
    }
}

/// Which attempt an outcome belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The outcome of this attempt: refused when a newer one has been recorded.
    Of(u32),
    /// Whatever attempt runs: an operator's cancel.
    Any,
}

/// An outcome on its way to the store: which attempt of which job ended how, and when.
/// The one value every store and queue takes to record an outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub id: JobId,
    pub attempt: Attempt,
    pub outcome: Outcome,
    /// When the attempt started (ms since 1970), when it ran.
    pub started_at: Option<i64>,
    /// When it ended (ms since 1970).
    pub at: i64,
}
