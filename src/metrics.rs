//! Prometheus metrics: the one shared registry, rendered in the text format at
//! `/metrics`, and the label sets and histogram shapes the subsystems share. Each
//! subsystem defines and registers its own typed families (`EngineMetrics` in `jobs`,
//! `SqliteMetrics` in `store::sqlite`, `PipelineMetrics` in `pipeline`, `HttpMetrics` in
//! `api`, ...): label sets stay bounded (job kinds come from the registry of kinds,
//! routes from the router's matched paths, never raw client input).

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

use parking_lot::Mutex;

pub mod process;

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

pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Reads a counter without creating its label set (which would add a zero line to
/// `/metrics`).
pub fn counter_of<L>(
    family: &Family<L, prometheus_client::metrics::counter::Counter>,
    labels: &L,
) -> u64
where
    L: Clone + std::hash::Hash + Eq,
{
    family.get(labels).map_or(0, |c| c.get())
}

/// Seconds, 50 µs .. ~30 min.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00005, 2.5, 20))
}

/// The index of the nearest-rank `q` quantile (0 < q <= 1) in a sorted slice of `len`
/// (> 0) values.
pub fn nearest_rank(len: usize, q: f64) -> usize {
    ((q * len as f64).ceil() as usize).clamp(1, len) - 1
}

/// Counts of things in a batch, 1 .. 8192.
pub fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 14))
}

/// The shared registry (every name gets the `tally_` prefix). Subsystems register their
/// families on it when they start; `/metrics` renders it, then the unprefixed
/// `process_*` metrics ([`process::ProcessCollector`]). `tally_build_info` is there from
/// the start.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Names without the prefix: the `process_*` metrics every client library exports.
    unprefixed: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tally");
        registry.register(
            "build_info",
            "The running build: its version, architecture and OS (always 1)",
            process::build_info(),
        );
        let mut unprefixed = Registry::default();
        unprefixed.register_collector(Box::new(process::ProcessCollector));
        Metrics {
            registry: Mutex::new(registry),
            unprefixed,
        }
    }

    /// Adds a family (or a single metric) to the registry under `tally_<name>`, and hands
    /// it back (a clone shares the values the registry renders).
    pub fn register<M: Metric + Clone>(&self, name: &str, help: &str, metric: M) -> M {
        self.registry.lock().register(name, help, metric.clone());
        metric
    }

    /// A new (empty) family or metric, registered under `tally_<name>`.
    pub fn add<M: Metric + Clone + Default>(&self, name: &str, help: &str) -> M {
        self.register(name, help, M::default())
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry.lock())
            .and_then(|()| encode_registry(&mut out, &self.unprefixed))
            .and_then(|()| encode_eof(&mut out));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn families_registered_by_anyone_render_with_the_prefix() {
        let m = Metrics::new();
        let c: Counter = m.add("things", "Things counted");
        c.inc();
        let text = m.render();
        for name in [
            "tally_things_total 1",
            "# HELP tally_things Things counted.",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
