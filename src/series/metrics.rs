//! The series store's metric families, registered on the shared registry by
//! [`SeriesMetrics::register`] when the store is built. Labels are bounded: `source` is one
//! of the ingest paths (`write`, `json`, `tcp`, `upstream`), `reason` one of the store's
//! refusal or eviction reasons.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{Metrics, ReasonLabels, SourceLabels};

#[derive(Default)]
pub struct SeriesMetrics {
    pub points_accepted: Family<SourceLabels, Counter>,
    pub points_rejected: Family<ReasonLabels, Counter>,
    pub series: Gauge,
    pub points_retained: Gauge,
    pub bytes_per_point: Gauge<f64, AtomicU64>,
    pub evictions: Family<ReasonLabels, Counter>,
}

impl SeriesMetrics {
    pub fn register(m: &Metrics) -> Self {
        SeriesMetrics {
            points_accepted: m.add(
                "series_points_accepted",
                "Series points stored, by source (write, json, tcp, upstream)",
            ),
            points_rejected: m.add(
                "series_points_rejected",
                "Series points or lines refused, by reason (late, expired, future, non_finite, overflow, series_limit, invalid, non_numeric)",
            ),
            series: m.add("series", "Series in the store"),
            points_retained: m.add(
                "series_points_retained",
                "Points currently retained across all series",
            ),
            bytes_per_point: m.add(
                "series_bytes_per_point",
                "Compressed bytes per point of the sealed blocks",
            ),
            evictions: m.add(
                "series_evicted_points",
                "Series points dropped, by reason (retention, memory)",
            ),
        }
    }

    /// Counts `n` points stored through `source`.
    pub fn accepted(&self, source: &str, n: u64) {
        if n > 0 {
            self.points_accepted
                .get_or_create(&SourceLabels {
                    source: source.to_string(),
                })
                .inc_by(n);
        }
    }

    /// Counts `n` points or lines refused for `reason`.
    pub fn rejected(&self, reason: &str, n: u64) {
        self.points_rejected
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc_by(n);
    }

    /// Counts `n` points dropped for `reason`.
    pub fn evicted(&self, reason: &str, n: u64) {
        self.evictions
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc_by(n);
    }
}
