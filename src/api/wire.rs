//! The bodies the API answers with: each handler returns one of these (the bulk routes
//! keep their request and answer beside their handler, in `bulk.rs`), and the OpenAPI
//! document's schemas are derived from the same types, so a body cannot drift from its
//! description. Errors are [`Problem`] (built by `error.rs`) and its variants with one
//! more field. This room imports no handler: handlers and `openapi.rs` import it.
//!
//! Four shapes are only described here, never built: the compatible routes' hot answers
//! (`CompatJobId`, `CompatResult`, `CompatJobs`) are written as text straight from the
//! stored bytes, and `CompatQuestion` is parsed by hand; the contract test holds those
//! answers to these descriptions.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use utoipa::ToSchema;

use super::ids;
use crate::model::JobRecord;

/// How far a running job got, in units of its own (bytes, rows).
#[derive(Serialize, ToSchema)]
struct Progress {
    done: u64,
    total: u64,
}

/// A job on the wire.
#[derive(Serialize, ToSchema)]
pub struct JobView {
    id: String,
    kind: String,
    /// `queued`, `running`, `done`, `failed` or `cancelled`.
    #[schema(value_type = String, pattern = "^(queued|running|done|failed|cancelled)$")]
    status: &'static str,
    #[schema(value_type = Object)]
    params: Value,
    /// RFC 3339 (ms).
    submitted_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    /// The job's answer once done (any JSON).
    #[schema(value_type = Option<Value>)]
    result: Option<Box<RawValue>>,
    error: Option<String>,
    /// Runs of the job so far (a worker that died or stalled, or a retry, adds one).
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<Progress>,
}

pub(crate) fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn view(r: JobRecord, progress: Option<(u64, u64)>) -> JobView {
    JobView {
        id: ids::text(r.id),
        kind: r.kind,
        status: r.status.as_str(),
        params: r.params,
        submitted_at: rfc3339(r.submitted_at),
        started_at: r.started_at.map(rfc3339),
        finished_at: r.finished_at.map(rfc3339),
        // Stored results are JSON we wrote ourselves; a corrupt one shows as null.
        result: r.result.and_then(|s| RawValue::from_string(s).ok()),
        error: r.error,
        attempts: r.attempts,
        progress: progress.map(|(done, total)| Progress { done, total }),
    }
}

/// Jobs in the store, by state (every replica's, with Redis).
#[derive(Debug, Serialize, ToSchema)]
pub struct JobCountsView {
    pub queued: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// queued + running.
    pub in_progress: u64,
}

impl From<crate::model::JobCounts> for JobCountsView {
    fn from(c: crate::model::JobCounts) -> Self {
        JobCountsView {
            queued: c.queued,
            running: c.running,
            done: c.done,
            failed: c.failed,
            cancelled: c.cancelled,
            in_progress: c.in_progress(),
        }
    }
}

/// Job counters: this process's since it started (`totals`) or every replica's
/// (`cluster_totals`); the client derives rates from them.
#[derive(Debug, Serialize, ToSchema)]
pub struct Totals {
    pub submitted: u64,
    pub done: u64,
    /// Failed, timed out or panicked.
    pub failed: u64,
    pub cancelled: u64,
}

impl From<crate::queue::ClusterTotals> for Totals {
    fn from(t: crate::queue::ClusterTotals) -> Self {
        Totals {
            submitted: t.submitted,
            done: t.done,
            failed: t.failed,
            cancelled: t.cancelled,
        }
    }
}

/// `GET /v1/overview/history`: columns of equal length, ready for a chart.
#[derive(Debug, Serialize, ToSchema)]
pub struct RateHistory {
    /// The server's time (ms since the epoch).
    pub now: i64,
    /// `cluster` (every replica's, from the shared store) or `process` (this one's).
    #[schema(example = "process")]
    pub scope: &'static str,
    /// Each point's time, seconds since the epoch (the end of the second it covers).
    pub t: Vec<f64>,
    /// Jobs submitted per second.
    pub submitted: Vec<f64>,
    /// Jobs done per second.
    pub done: Vec<f64>,
    /// Jobs failed (or timed out, or panicked) per second.
    pub failed: Vec<f64>,
}

/// The queue as a whole (every replica's).
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueView {
    /// Jobs waiting for a worker.
    pub waiting: u64,
    /// Jobs claimed by a worker under a lease.
    pub leased: u64,
}

impl From<crate::queue::QueueStats> for QueueView {
    fn from(q: crate::queue::QueueStats) -> Self {
        QueueView {
            waiting: q.waiting,
            leased: q.leased,
        }
    }
}

/// This process's worker threads.
#[derive(Debug, Serialize, ToSchema)]
pub struct Workers {
    pub alive: i64,
    pub busy: i64,
}

/// One job kind: this process's counters and the percentiles of its recent run times.
#[derive(Debug, Serialize, ToSchema)]
pub struct KindView {
    pub kind: String,
    pub submitted: u64,
    pub done: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Run times the percentiles are computed from (the last 1024 at most).
    pub window: usize,
    /// Median run time of the window (ms); null before the first run.
    pub p50_ms: Option<f64>,
    /// 99th percentile (nearest rank) of the window (ms); null before the first run.
    pub p99_ms: Option<f64>,
}

/// A process taking work from the queue.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicaView {
    /// Its consumer name (unique per process start).
    pub name: String,
    pub host: String,
    pub pid: u32,
    pub workers: u32,
    /// Workers inside a job when it last reported.
    pub busy: u32,
    /// When it last reported (RFC 3339).
    pub last_seen: String,
    pub seen_ms_ago: i64,
    /// True for the process answering.
    pub this: bool,
}

/// `GET /v1/replicas`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicasBody {
    /// The store's kind (`sqlite`, `memory`, `redis`).
    pub store: String,
    pub replicas: Vec<ReplicaView>,
}

/// The live series at a glance.
#[derive(Debug, Serialize, ToSchema)]
pub struct SeriesSummary {
    /// What `GET /getSum` answers now, as text (`inf` while the sum exceeds `f64`).
    pub get_sum: String,
    pub series: usize,
    pub retained_points: u64,
}

/// `GET /v1/overview`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Overview {
    /// Server time of the snapshot (ms since the epoch).
    pub now: i64,
    pub store: String,
    /// True once this process stopped taking work (shutting down).
    pub draining: bool,
    /// Null when the store could not answer (`store_error` says why).
    pub jobs: Option<JobCountsView>,
    pub totals: Totals,
    /// Every replica's totals (a shared store: Redis), which the dashboard's rates come
    /// from; null with an in-process queue (`totals` is then the whole) or when the store
    /// could not answer.
    pub cluster_totals: Option<Totals>,
    /// Null when the store could not answer.
    pub queue: Option<QueueView>,
    pub workers: Workers,
    pub kinds: Vec<KindView>,
    /// Null when the store could not answer.
    pub replicas: Option<Vec<ReplicaView>>,
    pub series: SeriesSummary,
    /// Why some parts are null: the store is unreachable or failing.
    pub store_error: Option<String>,
}

/// `GET /v1/pipeline`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PipelineView {
    /// Events acknowledged since this process started (durable in the accepted log).
    pub accepted: u64,
    /// Events written to the journal since start, ok or failed.
    pub journaled: u64,
    pub journaled_ok: u64,
    pub journaled_failed: u64,
    /// Accepted and not yet in the journal (in their processing delay or waiting for
    /// an earlier one).
    pub waiting: u64,
    /// Processed events held in the reorder buffer for an earlier one.
    pub reorder_buffer: i64,
    /// `--reorder-capacity`: `waiting` at most; past it new events get 503.
    pub capacity: u64,
    pub rejected_full: u64,
    pub rejected_draining: u64,
    /// Accepted events journaled by the recovery at start.
    pub recovered: u64,
    /// The journal file; null when events are not written (`--store memory`).
    pub journal: Option<String>,
    pub draining: bool,
}

pub fn replica_views(replicas: Vec<crate::queue::Replica>) -> Vec<ReplicaView> {
    let now = crate::now_ms();
    replicas
        .into_iter()
        .map(|r| ReplicaView {
            last_seen: rfc3339(r.last_seen_ms),
            seen_ms_ago: (now - r.last_seen_ms).max(0),
            name: r.name,
            host: r.host,
            pid: r.pid,
            workers: r.workers,
            busy: r.busy,
            this: r.this,
        })
        .collect()
}

/// An error of the native API (RFC 9457 problem details).
#[derive(Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub title: &'static str,
    pub status: u16,
    /// What is wrong, for a person.
    pub detail: String,
    /// On a 503 to a submission: `unknown` when the store never answered, so the job may
    /// exist; retry with the same Idempotency-Key to get it rather than a second one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    /// On a 422 for a reused Idempotency-Key: the job that key made (`job_id_N`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

impl Problem {
    pub fn new(status: axum::http::StatusCode, detail: String) -> Self {
        Problem {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail,
            outcome: None,
            job_id: None,
        }
    }
}

/// A job taken: its id is valid on every route at once.
#[derive(Serialize, ToSchema)]
pub struct Accepted {
    pub id: String,
    /// `queued`.
    pub status: &'static str,
}

impl Accepted {
    pub fn queued(id: crate::model::JobId) -> Self {
        Accepted {
            id: ids::text(id),
            status: "queued",
        }
    }
}

/// A job cancelled.
#[derive(Serialize, ToSchema)]
pub struct CancelledJob {
    pub id: String,
    /// `cancelled`.
    pub status: &'static str,
}

/// A page of jobs, newest first.
#[derive(Serialize, ToSchema)]
pub struct JobPage {
    pub jobs: Vec<JobView>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// The body of the nine statistics routes.
#[derive(Serialize, ToSchema)]
pub struct CompatQuestion {
    pub question: String,
    /// The state, for `state_mean`, `state_diff_from_mean`, `state_mean_by_category`.
    pub state: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct CompatJobId {
    /// `job_id_N`.
    pub job_id: String,
}

/// An error of the compatible routes.
#[derive(Serialize, ToSchema)]
pub struct CompatError {
    /// `error`.
    pub status: &'static str,
    pub reason: String,
    /// `unknown` when the store never answered a submission: the job may exist.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
}

/// `running`, `done` with `data`, or `error` with `reason`.
#[derive(Serialize, ToSchema)]
pub struct CompatResult {
    pub status: String,
    pub data: Option<Value>,
    pub reason: Option<String>,
}

/// Every job with its state (`done` or `running`), one object per job.
#[derive(Serialize, ToSchema)]
pub struct CompatJobs {
    pub status: String,
    pub data: Vec<BTreeMap<String, String>>,
}

#[derive(Serialize, ToSchema)]
pub struct NumJobs {
    /// Jobs queued or running.
    pub num_jobs: u64,
}

/// `running` while work remains, then `done`.
#[derive(Serialize, ToSchema)]
pub struct ShutdownStatus {
    pub status: &'static str,
}

/// `ok`, `ready`, `draining` or `unavailable`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
    /// Why the service is not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Health {
    pub fn is(status: &'static str) -> Self {
        Health {
            status,
            detail: None,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct EventAnswer {
    /// `Ok`.
    #[serde(rename = "asyncAnswer")]
    pub async_answer: &'static str,
    /// The event's place in the journal (gap-free, from 1).
    pub seq: u64,
}

/// Points refused, by reason (only those that occurred).
#[derive(Serialize, ToSchema)]
pub struct WriteReport {
    pub accepted: u64,
    pub rejected: u64,
    pub reasons: Reasons,
}

/// `{"late": 2, "future": 1}`: reasons points were refused for and how many, in the
/// order the store counts them.
#[derive(ToSchema)]
#[schema(value_type = BTreeMap<String, u64>)]
pub struct Reasons(pub Vec<(&'static str, u64)>);

impl Serialize for Reasons {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().copied())
    }
}

#[derive(Serialize, ToSchema)]
pub struct LineError {
    pub line: u64,
    pub message: String,
}

/// A bad request; when lines were bad, which ones, and what the others stored.
#[derive(Serialize, ToSchema)]
pub struct WriteProblem {
    #[serde(flatten)]
    pub problem: Problem,
    /// The first bad lines (absent, as are the counts, for a bad precision).
    #[schema(required = false)]
    pub errors: Vec<LineError>,
    #[schema(required = false)]
    pub accepted_points: u64,
    #[schema(required = false)]
    pub accepted: u64,
    #[schema(required = false)]
    pub rejected: u64,
    #[schema(required = false)]
    pub reasons: Reasons,
}

/// A point: time (ms since the epoch) and value.
#[derive(Serialize, ToSchema)]
pub struct Point {
    pub t: i64,
    pub v: f64,
}

#[derive(Serialize, ToSchema)]
pub struct PointsReport {
    pub accepted: u64,
    pub rejected_late: u64,
    pub rejected_expired: u64,
    pub rejected_future: u64,
    pub rejected_non_finite: u64,
    pub rejected_overflow: u64,
    pub rejected_series_limit: u64,
}

#[derive(Serialize, ToSchema)]
pub struct Refreshed {
    /// When the rollups were computed (ms since the epoch).
    pub computed_at: i64,
    pub series: u64,
}

#[derive(Serialize, ToSchema)]
pub struct SeriesInfo {
    pub name: String,
    pub points: u64,
    pub first: Option<i64>,
    pub last: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct SeriesPage {
    pub series: Vec<SeriesInfo>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// Raw points, or one aggregate per bucket of `step` ms.
#[derive(Serialize, ToSchema)]
pub struct SeriesPoints {
    pub name: String,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub step: Option<i64>,
    pub agg: Option<String>,
    /// `v` is null where an aggregate is not finite.
    pub points: Vec<Point>,
}

/// An aggregate; `sum` and `mean` are null when not finite.
#[derive(Serialize, ToSchema)]
pub struct AggSummary {
    pub count: u64,
    pub sum: Option<f64>,
    pub mean: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub last: Option<f64>,
}

impl From<crate::series::agg::AggSummary> for AggSummary {
    fn from(a: crate::series::agg::AggSummary) -> Self {
        AggSummary {
            count: a.count,
            // Written as null when not finite, as serde_json writes any such float.
            sum: Some(a.sum),
            mean: a.mean,
            min: a.min,
            max: a.max,
            last: a.last,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct RollupWindow {
    pub start: i64,
    #[serde(flatten)]
    pub agg: AggSummary,
}

#[derive(Serialize, ToSchema)]
pub struct Rollups {
    pub name: String,
    /// Every point ever accepted.
    pub total: AggSummary,
    /// The points kept now.
    pub retained: AggSummary,
    pub window_ms: i64,
    pub windows: Vec<RollupWindow>,
    /// Null when computed on the spot for a series newer than the last refresh.
    pub computed_at: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct Source {
    pub name: String,
    /// `upstream`.
    pub kind: &'static str,
    pub url: String,
    pub series: String,
    /// `running` or `restarting`.
    pub state: &'static str,
    pub restarts: u64,
    pub last_error: Option<String>,
    /// RFC 3339.
    pub last_success: Option<String>,
    pub last_value: Option<f64>,
    pub points: u64,
}

#[derive(Serialize, ToSchema)]
pub struct Sources {
    pub sources: Vec<Source>,
}

#[derive(Serialize, ToSchema)]
pub struct Dataset {
    pub name: String,
    pub size: u64,
    /// RFC 3339.
    pub modified: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Datasets {
    pub datasets: Vec<Dataset>,
}

#[derive(Serialize, ToSchema)]
pub struct Uploaded {
    pub name: String,
    pub size: u64,
}

#[derive(Serialize, ToSchema)]
pub struct CsvStarted {
    #[serde(rename = "Task started, your id")]
    pub id: String,
}

/// A task of the storage service that did not give a result.
#[derive(Serialize, ToSchema)]
pub struct StorageStatus {
    /// `running`, `failed`, `cancelled` or `error`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
