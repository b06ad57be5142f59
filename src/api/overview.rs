//! Snapshots for the dashboard: `GET /v1/overview` (job counts, this process's
//! counters, queue, workers, per-kind p50/p99 of recent durations, replicas, the live
//! series' sum) and `GET /v1/pipeline` (accepted, journaled, waiting). Rates are left to
//! the client: it divides the difference of two snapshots' counters by their `now`s.

use axum::extract::State;
use axum::Json;

use super::error::ApiError;
use super::state::AppState;
use super::wire::{
    replica_views, JobCountsView, KindView, Overview, PipelineView, QueueView, SeriesSummary,
    Totals, Workers,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::{EventStatusLabels, KindLabels, OutcomeLabels, ReasonLabels};

/// Reads a counter without creating its label set (which would add a zero line to
/// `/metrics`).
fn counter_of<L>(family: &Family<L, Counter>, labels: &L) -> u64
where
    L: Clone + std::hash::Hash + Eq,
{
    family.get(labels).map_or(0, |c| c.get())
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
        Ok(c) => Some(JobCountsView::from(c)),
        Err(e) => {
            store_error = Some(e.to_string());
            None
        }
    };
    let queue = match stats {
        Ok(q) => Some(QueueView::from(q)),
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
