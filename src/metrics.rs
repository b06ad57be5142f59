//! Prometheus metrics: one registry, typed families with bounded label sets (job kinds
//! come from the registry of kinds, routes from the router's matched paths, never raw
//! client input), rendered in the text format at `/metrics`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub kind: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventStatusLabels {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceOutcomeLabels {
    pub source: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceStateLabels {
    pub source: String,
    pub state: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 50 µs .. ~30 min
    Histogram::new(exponential_buckets(0.00005, 2.5, 20))
}

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 14))
}

pub struct Metrics {
    registry: Registry,
    pub jobs_submitted: Family<KindLabels, Counter>,
    pub jobs_finished: Family<OutcomeLabels, Counter>,
    pub job_duration: HistogramFamily<KindLabels>,
    pub jobs_in_store: Family<StateLabels, Gauge>,
    pub queue_depth: Gauge,
    pub queue_rejections: Counter,
    pub queue_leased: Gauge,
    pub queue_reclaims: Counter,
    pub queue_fenced: Counter,
    pub queue_dead_letters: Counter,
    pub store_outcome_retries: Counter,
    pub store_expirations: Counter,
    pub busy_workers: Gauge,
    pub workers: Gauge,
    pub worker_restarts: Counter,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: HistogramFamily<RouteLabels>,
    pub http_connections: Gauge,
    pub http_connections_refused: Counter,
    pub http_connections_timed_out: Family<ReasonLabels, Counter>,
    pub store_commits: Counter,
    pub store_errors: Counter,
    pub store_batch_size: Histogram,
    pub store_commit_duration: Histogram,
    pub store_checkpoint_duration: Histogram,
    pub store_evictions: Gauge,
    pub events_accepted: Counter,
    pub events_journaled: Family<EventStatusLabels, Counter>,
    pub events_rejected: Family<ReasonLabels, Counter>,
    pub events_recovered: Counter,
    pub reorder_buffer: Gauge,
    pub series_points_accepted: Family<SourceLabels, Counter>,
    pub series_points_rejected: Family<ReasonLabels, Counter>,
    pub series_count: Gauge,
    pub series_points_retained: Gauge,
    pub series_bytes_per_point: Gauge<f64, AtomicU64>,
    pub series_evictions: Family<ReasonLabels, Counter>,
    pub series_rollup_duration: Histogram,
    pub series_line_idle_closed: Counter,
    pub source_requests: Family<SourceOutcomeLabels, Counter>,
    pub source_state: Family<SourceStateLabels, Gauge>,
    pub source_restarts: Family<SourceLabels, Counter>,
    /// The last durations of each kind, for the dashboard's p50/p99 (the histogram's
    /// buckets are too coarse and count since the start).
    pub recent_durations: RecentDurations,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tally");
        let m = Metrics {
            jobs_submitted: Family::default(),
            jobs_finished: Family::default(),
            job_duration: Family::new_with_constructor(seconds_histogram),
            jobs_in_store: Family::default(),
            queue_depth: Gauge::default(),
            queue_rejections: Counter::default(),
            queue_leased: Gauge::default(),
            queue_reclaims: Counter::default(),
            queue_fenced: Counter::default(),
            queue_dead_letters: Counter::default(),
            store_outcome_retries: Counter::default(),
            store_expirations: Counter::default(),
            busy_workers: Gauge::default(),
            workers: Gauge::default(),
            worker_restarts: Counter::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(seconds_histogram),
            http_connections: Gauge::default(),
            http_connections_refused: Counter::default(),
            http_connections_timed_out: Family::default(),
            store_commits: Counter::default(),
            store_errors: Counter::default(),
            store_batch_size: batch_histogram(),
            store_commit_duration: seconds_histogram(),
            store_checkpoint_duration: seconds_histogram(),
            store_evictions: Gauge::default(),
            events_accepted: Counter::default(),
            events_journaled: Family::default(),
            events_rejected: Family::default(),
            events_recovered: Counter::default(),
            reorder_buffer: Gauge::default(),
            series_points_accepted: Family::default(),
            series_points_rejected: Family::default(),
            series_count: Gauge::default(),
            series_points_retained: Gauge::default(),
            series_bytes_per_point: Gauge::default(),
            series_evictions: Family::default(),
            series_rollup_duration: seconds_histogram(),
            series_line_idle_closed: Counter::default(),
            source_requests: Family::default(),
            source_state: Family::default(),
            source_restarts: Family::default(),
            recent_durations: RecentDurations::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "jobs_submitted",
            "Jobs accepted, by kind",
            m.jobs_submitted.clone(),
        );
        r.register(
            "jobs_finished",
            "Jobs finished, by kind and outcome (done, failed, cancelled, timeout, panic)",
            m.jobs_finished.clone(),
        );
        r.register(
            "job_duration_seconds",
            "Time a job spent running, by kind",
            m.job_duration.clone(),
        );
        r.register(
            "jobs",
            "Jobs in the store, by state",
            m.jobs_in_store.clone(),
        );
        r.register(
            "queue_depth",
            "Jobs waiting for a worker",
            m.queue_depth.clone(),
        );
        r.register(
            "queue_rejections",
            "Submissions refused because the queue was full",
            m.queue_rejections.clone(),
        );
        r.register(
            "queue_leased",
            "Jobs claimed by a worker under a lease, as this process holds them",
            m.queue_leased.clone(),
        );
        r.register(
            "queue_reclaims",
            "Jobs queued again after their lease expired (a worker died or stalled)",
            m.queue_reclaims.clone(),
        );
        r.register(
            "queue_fenced",
            "Outcomes refused because a newer attempt of the job holds it",
            m.queue_fenced.clone(),
        );
        r.register(
            "queue_dead_letters",
            "Jobs failed for good after using up --max-attempts",
            m.queue_dead_letters.clone(),
        );
        r.register(
            "store_outcome_retries",
            "Job outcomes written again after the store could not take them",
            m.store_outcome_retries.clone(),
        );
        r.register(
            "store_expirations",
            "Finished jobs deleted from the store after --result-ttl",
            m.store_expirations.clone(),
        );
        r.register(
            "busy_workers",
            "Workers running a job",
            m.busy_workers.clone(),
        );
        r.register("workers", "Worker threads alive", m.workers.clone());
        r.register(
            "worker_restarts",
            "Workers replaced after a job panicked",
            m.worker_restarts.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests, by route and status",
            m.http_requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "HTTP request latency, by route",
            m.http_duration.clone(),
        );
        r.register(
            "http_connections",
            "Open HTTP connections",
            m.http_connections.clone(),
        );
        r.register(
            "http_connections_refused",
            "HTTP connections answered 503 and closed because --max-connections were open",
            m.http_connections_refused.clone(),
        );
        r.register(
            "http_connections_timed_out",
            "HTTP connections closed by a timeout, by reason (header: the request head was too slow; idle: no request on a keep-alive connection)",
            m.http_connections_timed_out.clone(),
        );
        r.register(
            "store_commits",
            "Store transactions committed",
            m.store_commits.clone(),
        );
        r.register(
            "store_errors",
            "Store transactions that failed",
            m.store_errors.clone(),
        );
        r.register(
            "store_batch_size",
            "Operations folded into one store transaction",
            m.store_batch_size.clone(),
        );
        r.register(
            "store_commit_duration_seconds",
            "Time to apply and commit one store transaction",
            m.store_commit_duration.clone(),
        );
        r.register(
            "store_checkpoint_duration_seconds",
            "Time to copy the SQLite write-ahead log into the database file",
            m.store_checkpoint_duration.clone(),
        );
        r.register(
            "store_evictions",
            "Finished results evicted to respect the memory store's cap",
            m.store_evictions.clone(),
        );
        r.register(
            "events_accepted",
            "Pipeline events acknowledged (durable in the accepted log)",
            m.events_accepted.clone(),
        );
        r.register(
            "events_journaled",
            "Pipeline events written to the journal, by status (ok, failed)",
            m.events_journaled.clone(),
        );
        r.register(
            "events_rejected",
            "Pipeline events refused, by reason (full, draining)",
            m.events_rejected.clone(),
        );
        r.register(
            "events_recovered",
            "Accepted events journaled by the recovery at start",
            m.events_recovered.clone(),
        );
        r.register(
            "reorder_buffer",
            "Processed events waiting in the reorder buffer for an earlier one",
            m.reorder_buffer.clone(),
        );
        r.register(
            "series_points_accepted",
            "Series points stored, by source (write, json, tcp)",
            m.series_points_accepted.clone(),
        );
        r.register(
            "series_points_rejected",
            "Series points or lines refused, by reason (late, expired, future, non_finite, overflow, series_limit, invalid, non_numeric)",
            m.series_points_rejected.clone(),
        );
        r.register("series", "Series in the store", m.series_count.clone());
        r.register(
            "series_points_retained",
            "Points currently retained across all series",
            m.series_points_retained.clone(),
        );
        r.register(
            "series_bytes_per_point",
            "Compressed bytes per point of the sealed Gorilla blocks",
            m.series_bytes_per_point.clone(),
        );
        r.register(
            "series_evicted_points",
            "Series points dropped, by reason (retention, memory)",
            m.series_evictions.clone(),
        );
        r.register(
            "series_rollup_duration_seconds",
            "Time to recompute and publish the rollup snapshot",
            m.series_rollup_duration.clone(),
        );
        r.register(
            "series_line_idle_closed",
            "TCP line-protocol connections closed after --line-idle-timeout-ms without data",
            m.series_line_idle_closed.clone(),
        );
        r.register(
            "source_requests",
            "Requests of the polled sources, by source and outcome (ok, error, timeout, bad_body)",
            m.source_requests.clone(),
        );
        r.register(
            "source_state",
            "1 for the current supervision state of each polled source (running, restarting)",
            m.source_state.clone(),
        );
        r.register(
            "source_restarts",
            "Restarts of a polled source after its poll loop failed or panicked",
            m.source_restarts.clone(),
        );
        // Both reasons show from the start, at 0.
        for reason in ["header", "idle"] {
            let _ = m.http_connections_timed_out.get_or_create(&ReasonLabels {
                reason: reason.into(),
            });
        }
        Metrics { registry, ..m }
    }

    pub fn store_commit(&self, ops: usize, took: Duration) {
        self.store_commits.inc();
        self.store_batch_size.observe(ops as f64);
        self.store_commit_duration.observe(took.as_secs_f64());
    }

    pub fn job_finished(&self, kind: &str, outcome: &str, ran_for: Option<Duration>) {
        self.jobs_finished
            .get_or_create(&OutcomeLabels {
                kind: kind.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        if let Some(d) = ran_for {
            self.recent_durations.record(kind, d);
            self.job_duration
                .get_or_create(&KindLabels {
                    kind: kind.to_string(),
                })
                .observe(d.as_secs_f64());
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Durations kept per kind by [`RecentDurations`].
pub const RECENT_DURATIONS: usize = 1024;

/// The last [`RECENT_DURATIONS`] run times of each job kind (kinds come from the
/// registry, so the map is bounded too), as microseconds.
#[derive(Default)]
pub struct RecentDurations {
    kinds: parking_lot::Mutex<std::collections::HashMap<String, DurationRing>>,
}

#[derive(Default)]
struct DurationRing {
    micros: Vec<u64>,
    /// Where the next duration goes once the ring is full.
    next: usize,
}

/// Percentiles of one kind's recent durations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DurationSummary {
    /// How many durations the window holds.
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl RecentDurations {
    pub fn record(&self, kind: &str, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let mut kinds = self.kinds.lock();
        let ring = match kinds.get_mut(kind) {
            Some(r) => r,
            None => kinds.entry(kind.to_string()).or_default(),
        };
        if ring.micros.len() < RECENT_DURATIONS {
            ring.micros.push(micros);
        } else {
            ring.micros[ring.next] = micros;
            ring.next = (ring.next + 1) % RECENT_DURATIONS;
        }
    }

    /// The nearest-rank p50 and p99 of a kind's window; `None` before its first run.
    pub fn summary(&self, kind: &str) -> Option<DurationSummary> {
        let mut v = self.kinds.lock().get(kind)?.micros.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let rank = |p: f64| {
            let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i] as f64 / 1000.0
        };
        Some(DurationSummary {
            count: v.len(),
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_durations_give_nearest_rank_percentiles_of_the_last_window() {
        let r = RecentDurations::default();
        assert_eq!(r.summary("k"), None);
        // 1..=100 ms: nearest rank p50 is the 50th value, p99 the 99th.
        for ms in (1..=100).rev() {
            r.record("k", Duration::from_millis(ms));
        }
        let s = r.summary("k").unwrap();
        assert_eq!((s.count, s.p50_ms, s.p99_ms), (100, 50.0, 99.0));
        // A full window of 5 ms durations pushes every older one out.
        for _ in 0..RECENT_DURATIONS {
            r.record("k", Duration::from_millis(5));
        }
        let s = r.summary("k").unwrap();
        assert_eq!((s.count, s.p50_ms, s.p99_ms), (RECENT_DURATIONS, 5.0, 5.0));
        assert_eq!(r.summary("other"), None);
    }

    #[test]
    fn rendering_names_every_family_with_the_prefix() {
        let m = Metrics::new();
        m.worker_restarts.inc();
        m.job_finished("stats.global_mean", "done", Some(Duration::from_millis(3)));
        let text = m.render();
        for name in [
            "tally_worker_restarts_total 1",
            "tally_jobs_finished_total{kind=\"stats.global_mean\",outcome=\"done\"} 1",
            "tally_job_duration_seconds_bucket",
            "tally_queue_depth",
            "tally_busy_workers",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
