//! Prometheus metrics: the one shared registry, rendered in the text format at
//! `/metrics`, and the label sets and histogram shapes the subsystems share. Each
//! subsystem defines and registers its own typed families (`EngineMetrics` in `jobs`,
//! `SqliteMetrics` in `store::sqlite`, `PipelineMetrics` in `pipeline`, `HttpMetrics` in
//! `api`, ...): label sets stay bounded (job kinds come from the registry of kinds,
//! routes from the router's matched paths, never raw client input).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

use parking_lot::Mutex;

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

pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Seconds, 50 µs .. ~30 min.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00005, 2.5, 20))
}

/// Counts of things in a batch, 1 .. 8192.
pub fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 14))
}

/// The shared registry (every name gets the `tally_` prefix). Subsystems register their
/// families on it when they start; `/metrics` renders it.
pub struct Metrics {
    registry: Mutex<Registry>,
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
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("tally")),
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
        };
        m.register(
            "series_points_accepted",
            "Series points stored, by source (write, json, tcp)",
            m.series_points_accepted.clone(),
        );
        m.register(
            "series_points_rejected",
            "Series points or lines refused, by reason (late, expired, future, non_finite, overflow, series_limit, invalid, non_numeric)",
            m.series_points_rejected.clone(),
        );
        m.register("series", "Series in the store", m.series_count.clone());
        m.register(
            "series_points_retained",
            "Points currently retained across all series",
            m.series_points_retained.clone(),
        );
        m.register(
            "series_bytes_per_point",
            "Compressed bytes per point of the sealed Gorilla blocks",
            m.series_bytes_per_point.clone(),
        );
        m.register(
            "series_evicted_points",
            "Series points dropped, by reason (retention, memory)",
            m.series_evictions.clone(),
        );
        m.register(
            "series_rollup_duration_seconds",
            "Time to recompute and publish the rollup snapshot",
            m.series_rollup_duration.clone(),
        );
        m.register(
            "series_line_idle_closed",
            "TCP line-protocol connections closed after --line-idle-timeout-ms without data",
            m.series_line_idle_closed.clone(),
        );
        m.register(
            "source_requests",
            "Requests of the polled sources, by source and outcome (ok, error, timeout, bad_body)",
            m.source_requests.clone(),
        );
        m.register(
            "source_state",
            "1 for the current supervision state of each polled source (running, restarting)",
            m.source_state.clone(),
        );
        m.register(
            "source_restarts",
            "Restarts of a polled source after its poll loop failed or panicked",
            m.source_restarts.clone(),
        );
        m
    }

    /// Adds a family (or a single metric) to the registry under `tally_<name>`.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry.lock().register(name, help, metric);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry.lock());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_registered_by_anyone_render_with_the_prefix() {
        let m = Metrics::new();
        let c: Counter = Counter::default();
        m.register("things", "Things counted", c.clone());
        c.inc();
        let text = m.render();
        for name in [
            "tally_things_total 1",
            "tally_series_points_retained",
            "# HELP tally_things Things counted.",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
