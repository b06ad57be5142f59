//! What every handler may use: the shared state behind one `Arc`, and the metric
//! families the edge keeps on it. Handlers import this room and `router` (in `mod.rs`)
//! imports the handlers, so no handler imports the file that lists it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::server;
use crate::config::Secret;
use crate::csv::datasets::DataDir;
use crate::jobs::engine::Engine;
use crate::metrics::{
    seconds_histogram, HistogramFamily, HttpLabels, Metrics, RouteLabels, StateLabels,
};
use crate::pipeline::Pipeline;

/// What every handler may use; shared behind one `Arc`, so that handing it to a
/// request costs one reference count.
pub type AppState = Arc<AppContext>;

pub struct AppContext {
    pub engine: Engine,
    /// The shared registry (`/metrics` renders it; each subsystem registered its own
    /// families on it when it was built).
    pub metrics: Arc<Metrics>,
    /// Requests by route and status, and their latency.
    pub http_metrics: HttpMetrics,
    /// Open, refused and timed-out connections of every listener.
    pub server_metrics: Arc<server::ServerMetrics>,
    /// Values owned by the store and the queue, sampled when `/metrics` is scraped.
    pub gauges: Gauges,
    /// `Some` when `--auth-token` is set.
    pub auth: Option<Secret>,
    /// Cancelled to ask the application to drain and stop (`/api/graceful_shutdown`).
    pub shutdown: tokio_util::sync::CancellationToken,
    /// `--idempotency-ttl`: how long a submission's `Idempotency-Key` holds.
    pub idempotency_ttl: std::time::Duration,
    /// How long `/api/get_results` may hold a poll of an unfinished job (long polling).
    pub poll_hold: std::time::Duration,
    /// `--data-dir`: datasets of `csv.column_sum` jobs.
    pub datasets: DataDir,
    /// `--max-upload-bytes`: largest dataset upload.
    pub max_upload_bytes: u64,
    /// The ordered pipeline behind `POST /v1/events`.
    pub pipeline: Pipeline,
    /// The in-memory live series.
    pub series: Arc<crate::series::store::SeriesStore>,
    /// Line-protocol ingest into `series` (`POST /write` and the TCP listener).
    pub ingest: Arc<crate::series::ingest::Ingester>,
    /// The published rollups of the live series and their refresh.
    pub rollups: Arc<crate::series::rollup::Rollups>,
    /// `--max-write-bytes`: largest `POST /write` body.
    pub max_write_bytes: usize,
    /// The polled sources (`--source`, `--config`) and their supervision state.
    pub sources: Arc<crate::series::sources::Sources>,
}

impl AppContext {
    pub fn request_shutdown(&self) {
        self.shutdown.cancel();
    }
}

/// The HTTP edge's request families (`tally_http_requests`, `..._duration_seconds`).
#[derive(Clone)]
pub struct HttpMetrics {
    pub(super) requests: Family<HttpLabels, Counter>,
    pub(super) duration: HistogramFamily<RouteLabels>,
}

impl HttpMetrics {
    pub fn register(m: &Metrics) -> Self {
        HttpMetrics {
            requests: m.add("http_requests", "HTTP requests, by route and status"),
            duration: m.register(
                "http_request_duration_seconds",
                "HTTP request latency, by route",
                Family::new_with_constructor(seconds_histogram),
            ),
        }
    }
}

/// Values owned by the store and the queue (which may live in Redis, shared by every
/// replica), sampled when `/metrics` is scraped rather than kept up to date.
#[derive(Clone, Default)]
pub struct Gauges {
    pub(super) jobs_in_store: Family<StateLabels, Gauge>,
    /// The store's eviction count, a counter (`tally_store_evictions_total`): each scrape
    /// adds what the store counted since the last ([`Gauges::sample_evictions`]).
    evictions: Counter,
    /// The store's count the counter has reached.
    evictions_seen: Arc<AtomicU64>,
    pub(super) queue_depth: Gauge,
    pub(super) queue_leased: Gauge,
}

impl Gauges {
    pub fn register(m: &Metrics) -> Self {
        Gauges {
            jobs_in_store: m.add("jobs", "Jobs in the store, by state"),
            evictions: m.add(
                "store_evictions",
                "Finished results evicted to respect the memory store's cap",
            ),
            evictions_seen: Arc::default(),
            queue_depth: m.add(
                "queue_depth",
                "Jobs waiting for a worker (on every replica)",
            ),
            queue_leased: m.add(
                "queue_leased",
                "Jobs claimed by a worker under a lease (on every replica)",
            ),
        }
    }

    /// Brings the eviction counter up to the store's count (which only grows); concurrent
    /// scrapes add each eviction once.
    pub(super) fn sample_evictions(&self, store_count: u64) {
        let before = self
            .evictions_seen
            .fetch_max(store_count, Ordering::Relaxed);
        if store_count > before {
            self.evictions.inc_by(store_count - before);
        }
    }
}
