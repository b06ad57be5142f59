//! Snapshots for the dashboard: `GET /v1/overview` (job counts, this process's
//! counters, queue, workers, per-kind p50/p99 of recent durations, replicas, the live
//! series' sum) and `GET /v1/pipeline` (accepted, journaled, waiting). Rates are left to
//! the client: it divides the difference of two snapshots' counters by their `now`s.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::v1::rfc3339;
use super::AppState;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::{EventStatusLabels, KindLabels, OutcomeLabels, ReasonLabels};

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

/// The queue as a whole (every replica's).
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueView {
    /// Jobs waiting for a worker.
    pub waiting: u64,
    /// Jobs claimed by a worker under a lease.
    pub leased: u64,
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

/// Reads a counter without creating its label set (which would add a zero line to
/// `/metrics`).
fn counter_of<L>(family: &Family<L, Counter>, labels: &L) -> u64
where
    L: Clone + std::hash::Hash + Eq,
{
    family.get(labels).map_or(0, |c| c.get())
}

pub(crate) fn replica_views(replicas: Vec<crate::queue::Replica>) -> Vec<ReplicaView> {
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

/// The overview, with what the store could not answer left null.
pub async fn snapshot(st: &AppState) -> Overview {
    let engine = &st.engine;
    let m = engine.metrics();
    let mut store_error = None;
    // The four reads go to the store at once (four round trips in parallel with Redis).
    let (counts, stats, cluster, replicas) = tokio::join!(
        engine.counts(),
        engine.queue_stats(),
        engine.cluster_totals(),
        engine.replicas(),
    );
    let jobs = match counts {
        Ok(c) => Some(JobCountsView {
            queued: c.queued,
            running: c.running,
            done: c.done,
            failed: c.failed,
            cancelled: c.cancelled,
            in_progress: c.in_progress(),
        }),
        Err(e) => {
            store_error = Some(e.to_string());
            None
        }
    };
    let queue = match stats {
        Ok(q) => Some(QueueView {
            waiting: q.waiting,
            leased: q.leased,
        }),
        Err(e) => {
            store_error.get_or_insert(e.to_string());
            None
        }
    };
    let cluster_totals = match cluster {
        Ok(t) => t.map(|t| Totals {
            submitted: t.submitted,
            done: t.done,
            failed: t.failed,
            cancelled: t.cancelled,
        }),
        Err(e) => {
            store_error.get_or_insert(e.to_string());
            None
        }
    };
    let replicas = match replicas {
        Ok(r) => Some(replica_views(r)),
        Err(e) => {
            store_error.get_or_insert(e.to_string());
            None
        }
    };
    let outcome = |kind: &str, outcome: &str| {
        counter_of(
            &m.finished,
            &OutcomeLabels {
                kind: kind.to_string(),
                outcome: outcome.to_string(),
            },
        )
    };
    let kinds: Vec<KindView> = engine
        .registry()
        .kinds()
        .map(|kind| {
            let summary = m.recent.summary(kind);
            KindView {
                kind: kind.to_string(),
                submitted: counter_of(
                    &m.submitted,
                    &KindLabels {
                        kind: kind.to_string(),
                    },
                ),
                done: outcome(kind, "done"),
                failed: outcome(kind, "failed") + outcome(kind, "timeout") + outcome(kind, "panic"),
                cancelled: outcome(kind, "cancelled"),
                window: summary.map_or(0, |s| s.count),
                p50_ms: summary.map(|s| s.p50_ms),
                p99_ms: summary.map(|s| s.p99_ms),
            }
        })
        .collect();
    let totals = Totals {
        submitted: kinds.iter().map(|k| k.submitted).sum(),
        done: kinds.iter().map(|k| k.done).sum(),
        failed: kinds.iter().map(|k| k.failed).sum(),
        cancelled: kinds.iter().map(|k| k.cancelled).sum(),
    };
    Overview {
        now: crate::now_ms(),
        store: engine.store_name().to_string(),
        draining: engine.is_draining(),
        jobs,
        totals,
        cluster_totals,
        queue,
        workers: Workers {
            alive: m.workers.get(),
            busy: m.busy_workers.get(),
        },
        kinds,
        replicas,
        series: SeriesSummary {
            get_sum: super::series::float_text(st.series.total_sum()),
            series: st.series.series_count(),
            retained_points: st.series.retained_points(),
        },
        store_error,
    }
}

/// The pipeline's counters and buffer.
pub fn pipeline_view(st: &AppState) -> PipelineView {
    let m = st.pipeline.metrics();
    let journaled = |status: &str| {
        counter_of(
            &m.events_journaled,
            &EventStatusLabels {
                status: status.to_string(),
            },
        )
    };
    let rejected = |reason: &str| {
        counter_of(
            &m.events_rejected,
            &ReasonLabels {
                reason: reason.to_string(),
            },
        )
    };
    let (ok, failed) = (journaled("ok"), journaled("failed"));
    PipelineView {
        accepted: m.events_accepted.get(),
        journaled: ok + failed,
        journaled_ok: ok,
        journaled_failed: failed,
        waiting: st.pipeline.in_flight() as u64,
        reorder_buffer: m.reorder_buffer.get(),
        capacity: st.pipeline.capacity() as u64,
        rejected_full: rejected("full"),
        rejected_draining: rejected("draining"),
        recovered: m.events_recovered.get(),
        journal: st.pipeline.journal_path().map(|p| p.display().to_string()),
        draining: st.pipeline.is_draining(),
    }
}

/// `GET /v1/overview`: what the dashboard's first page shows, in one read.
#[utoipa::path(
    get,
    path = "/v1/overview",
    tag = "dashboard",
    responses((status = 200, description = "A snapshot; parts the store could not answer are null", body = Overview))
)]
pub async fn overview(State(st): State<AppState>) -> Result<Json<Overview>, ApiError> {
    Ok(Json(snapshot(&st).await))
}

/// `GET /v1/pipeline`: the ordered pipeline's counters and buffer.
#[utoipa::path(
    get,
    path = "/v1/pipeline",
    tag = "pipeline",
    responses((status = 200, description = "The pipeline now", body = PipelineView))
)]
pub async fn pipeline(State(st): State<AppState>) -> Json<PipelineView> {
    Json(pipeline_view(&st))
}
