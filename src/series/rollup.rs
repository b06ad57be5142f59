//! Rollups: the published [`RollupSnapshot`] of every series' [`SeriesRollup`], which
//! [`Rollups::refresh`] recomputes on a schedule (`--rollup-interval`) and on demand.
//!
//! Incremental by construction: sealed blocks contribute per-window summaries computed once
//! at seal time (kept merged per series), so a refresh only folds in the open head.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use prometheus_client::metrics::histogram::Histogram;
use tokio_util::sync::CancellationToken;

pub use super::agg::{Agg, AggFn, AggSummary, SeriesRollup};
use super::store::SeriesStore;
use crate::metrics::{seconds_histogram, Metrics};

/// What the last refresh published.
#[derive(Debug, Clone, Default)]
pub struct RollupSnapshot {
    /// Milliseconds since the epoch; 0 before the first refresh.
    pub computed_at_ms: i64,
    pub series: BTreeMap<Arc<str>, SeriesRollup>,
}

/// Owns the published snapshot and the scheduler that refreshes it.
pub struct Rollups {
    store: Arc<SeriesStore>,
    duration: Histogram,
    snapshot: RwLock<Arc<RollupSnapshot>>,
    /// Serializes refreshes (the scheduler and the on-demand route).
    refreshing: parking_lot::Mutex<()>,
}

impl Rollups {
    /// Registers `tally_series_rollup_duration_seconds` on `metrics`.
    pub fn new(store: Arc<SeriesStore>, metrics: &Metrics) -> Arc<Self> {
        Arc::new(Rollups {
            store,
            duration: metrics.register(
                "series_rollup_duration_seconds",
                "Time to recompute and publish the rollup snapshot",
                seconds_histogram(),
            ),
            snapshot: RwLock::new(Arc::new(RollupSnapshot::default())),
            refreshing: parking_lot::Mutex::new(()),
        })
    }

    /// The last published snapshot.
    pub fn snapshot(&self) -> Arc<RollupSnapshot> {
        self.snapshot.read().clone()
    }

    /// Enforces retention, recomputes every series' rollup and publishes the result.
    /// Synchronous (CPU work): call it from a blocking thread.
    pub fn refresh(&self) -> Arc<RollupSnapshot> {
        let _one = self.refreshing.lock();
        let started = Instant::now();
        let now = crate::now_ms();
        self.store.enforce_retention(now);
        let series = self.store.rollup_all();
        let snap = Arc::new(RollupSnapshot {
            computed_at_ms: now,
            series,
        });
        *self.snapshot.write() = snap.clone();
        self.duration.observe(started.elapsed().as_secs_f64());
        snap
    }

    /// Refreshes on a blocking thread (for async callers).
    pub async fn refresh_async(self: &Arc<Self>) -> Arc<RollupSnapshot> {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || me.refresh()).await {
            Ok(s) => s,
            Err(_) => self.snapshot(),
        }
    }

    /// The scheduler: refreshes every `interval` until `stop` is cancelled.
    pub fn scheduler(
        self: &Arc<Self>,
        interval: Duration,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let me = self.clone();
        async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => { me.refresh_async().await; }
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
}
