//! Snapshots for the dashboard: `GET /v1/overview` (job counts, this process's
//! counters, queue, workers, per-kind p50/p99 of recent durations, replicas, the live
//! series' sum) and `GET /v1/pipeline` (accepted, journaled, waiting). Rates are left to
//! the client: it divides the difference of two snapshots' counters by their `now`s.

use axum::extract::State;
use axum::Json;

use super::error::ApiError;
use super::state::AppState;
use super::wire::{
    replica_views, JobCountsView, KindView, Overview, PipelineView, QueueView, RateHistory,
    SeriesSummary, Totals, Workers,
};
use crate::metrics::{counter_of, EventStatusLabels, ReasonLabels};

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
        Ok(t) => t.map(Totals::from),
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
    let kinds: Vec<KindView> = engine
        .registry()
        .kinds()
        .map(|kind| {
            let summary = m.recent.summary(kind);
            let t = m.kind_totals(kind);
            KindView {
                kind: kind.to_string(),
                submitted: t.submitted,
                done: t.done,
                failed: t.failed,
                cancelled: t.cancelled,
                window: summary.map_or(0, |s| s.count),
                p50_ms: summary.map(|s| s.p50_ms),
                p99_ms: summary.map(|s| s.p99_ms),
            }
        })
        .collect();
    let totals = Totals::from(engine.process_totals());
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

/// `GET /v1/overview/history`: jobs per second over the last 15 minutes, a point a
/// second, for the charts of a page that just opened.
#[utoipa::path(
    get,
    path = "/v1/overview/history",
    tag = "dashboard",
    responses(
        (status = 200, description = "Rates between successive samples of the totals (with a shared store, every replica's)", body = RateHistory),
        (status = 503, description = "Store unavailable"),
    )
)]
pub async fn history(State(st): State<AppState>) -> Result<Json<RateHistory>, ApiError> {
    let (r, cluster) = st.engine.rate_history().await?;
    Ok(Json(RateHistory {
        now: crate::now_ms(),
        scope: if cluster { "cluster" } else { "process" },
        t: r.t,
        submitted: r.submitted,
        done: r.done,
        failed: r.failed,
    }))
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
