//! The engine's metric families (jobs submitted and finished, durations, workers, and
//! what happens to leases), registered on the shared registry by `Engine::start`, and
//! the window of recent durations behind the dashboard's p50/p99.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{
    counter_of, seconds_histogram, HistogramFamily, KindLabels, Metrics, OutcomeLabels,
};
use crate::queue::ClusterTotals;

pub struct EngineMetrics {
    pub submitted: Family<KindLabels, Counter>,
    pub finished: Family<OutcomeLabels, Counter>,
    pub duration: HistogramFamily<KindLabels>,
    pub busy_workers: Gauge,
    pub workers: Gauge,
    pub worker_restarts: Counter,
    pub queue_rejections: Counter,
    pub reclaims: Counter,
    pub fenced: Counter,
    pub dead_letters: Counter,
    pub outcome_retries: Counter,
    /// The last durations of each kind, for the dashboard's p50/p99 (the histogram's
    /// buckets are too coarse and count since the start).
    pub recent: RecentDurations,
}

impl EngineMetrics {
    pub fn register(m: &Metrics) -> Self {
        EngineMetrics {
            submitted: m.add("jobs_submitted", "Jobs accepted, by kind"),
            finished: m.add(
                "jobs_finished",
                "Jobs finished, by kind and outcome (done, failed, cancelled, timeout, panic)",
            ),
            duration: m.register(
                "job_duration_seconds",
                "Time a job spent running, by kind",
                Family::new_with_constructor(seconds_histogram),
            ),
            busy_workers: m.add("busy_workers", "Workers running a job"),
            workers: m.add("workers", "Worker threads alive"),
            worker_restarts: m.add("worker_restarts", "Workers replaced after a job panicked"),
            queue_rejections: m.add(
                "queue_rejections",
                "Submissions refused because the queue was full",
            ),
            reclaims: m.add(
                "queue_reclaims",
                "Jobs queued again after their lease expired (a worker died or stalled)",
            ),
            fenced: m.add(
                "queue_fenced",
                "Outcomes refused because a newer attempt of the job holds it",
            ),
            dead_letters: m.add(
                "queue_dead_letters",
                "Jobs failed for good after using up --max-attempts",
            ),
            outcome_retries: m.add(
                "store_outcome_retries",
                "Job outcomes written again after the store could not take them",
            ),
            recent: RecentDurations::default(),
        }
    }

    /// One kind's counters in this process (failed counts failures, timeouts and panics).
    pub fn kind_totals(&self, kind: &str) -> ClusterTotals {
        let outcome = |outcome: &str| {
            counter_of(
                &self.finished,
                &OutcomeLabels {
                    kind: kind.to_string(),
                    outcome: outcome.to_string(),
                },
            )
        };
        ClusterTotals {
            submitted: counter_of(
                &self.submitted,
                &KindLabels {
                    kind: kind.to_string(),
                },
            ),
            done: outcome("done"),
            failed: outcome("failed") + outcome("timeout") + outcome("panic"),
            cancelled: outcome("cancelled"),
        }
    }

    pub fn job_finished(&self, kind: &str, outcome: &str, ran_for: Option<Duration>) {
        self.finished
            .get_or_create(&OutcomeLabels {
                kind: kind.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        if let Some(d) = ran_for {
            self.recent.record(kind, d);
            self.duration
                .get_or_create(&KindLabels {
                    kind: kind.to_string(),
                })
                .observe(d.as_secs_f64());
        }
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
        let rank = |p: f64| v[crate::metrics::nearest_rank(v.len(), p)] as f64 / 1000.0;
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
    fn the_engine_families_render_with_their_names() {
        let m = Metrics::new();
        let e = EngineMetrics::register(&m);
        e.worker_restarts.inc();
        e.job_finished("stats.global_mean", "done", Some(Duration::from_millis(3)));
        let text = m.render();
        for name in [
            "tally_worker_restarts_total 1",
            "tally_jobs_finished_total{kind=\"stats.global_mean\",outcome=\"done\"} 1",
            "tally_job_duration_seconds_bucket",
            "tally_busy_workers",
            "tally_queue_fenced_total",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
