//! The overview's rate history: jobs submitted, done and failed per second over the last
//! 15 minutes, sent to a dashboard page when it opens, so that its chart shows what the
//! service did before anyone watched. An in-process queue's engine samples its own
//! counters once a second into a [`Ring`] here; a shared queue's replicas record the
//! cluster's totals in Redis with their heartbeats (see `heartbeat.lua`), so every
//! replica answers with the same history, and a replica started a minute ago has it too.

use std::collections::VecDeque;

use parking_lot::Mutex;

use crate::queue::{TotalsSample, HISTORY_SECS};

/// The last [`HISTORY_SECS`] of samples, oldest first (one a second: a fixed size).
#[derive(Default)]
pub struct Ring {
    samples: Mutex<VecDeque<TotalsSample>>,
}

impl Ring {
    pub fn record(&self, sample: TotalsSample) {
        let mut samples = self.samples.lock();
        samples.push_back(sample);
        while samples.len() > HISTORY_SECS as usize + 1 {
            samples.pop_front();
        }
    }

    pub fn samples(&self) -> Vec<TotalsSample> {
        self.samples.lock().iter().copied().collect()
    }
}

/// Rates between successive samples, as columns: `t` is each interval's end in seconds
/// since the epoch (what the dashboard's charts take), the others jobs per second.
#[derive(Debug, Default, PartialEq)]
pub struct Rates {
    pub t: Vec<f64>,
    pub submitted: Vec<f64>,
    pub done: Vec<f64>,
    pub failed: Vec<f64>,
}

/// The rates of the samples no older than [`HISTORY_SECS`] before `now_ms`. An interval
/// in which a counter went down (a store that started over) has no rate, as the live
/// chart draws none across a reset.
pub fn rates(samples: &[TotalsSample], now_ms: i64) -> Rates {
    let since = now_ms - HISTORY_SECS as i64 * 1000;
    let mut out = Rates::default();
    for w in samples.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let (x, y) = (&a.totals, &b.totals);
        let went_down = y.submitted < x.submitted || y.done < x.done || y.failed < x.failed;
        if a.at_ms < since || b.at_ms <= a.at_ms || went_down {
            continue;
        }
        let secs = (b.at_ms - a.at_ms) as f64 / 1000.0;
        let per_s = |from: u64, to: u64| (to - from) as f64 / secs;
        out.t.push(b.at_ms as f64 / 1000.0);
        out.submitted.push(per_s(x.submitted, y.submitted));
        out.done.push(per_s(x.done, y.done));
        out.failed.push(per_s(x.failed, y.failed));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::ClusterTotals;

    fn at(at_ms: i64, submitted: u64, done: u64, failed: u64) -> TotalsSample {
        TotalsSample {
            at_ms,
            totals: ClusterTotals {
                submitted,
                done,
                failed,
                cancelled: 0,
            },
        }
    }

    #[test]
    fn rates_are_differences_over_the_time_between_samples_and_skip_resets_and_old_ones() {
        let now = 2_000_000;
        let samples = [
            // Older than 15 minutes: its interval is left out.
            at(now - 901_000, 0, 0, 0),
            at(now - 3_000, 10, 5, 0),
            at(now - 2_000, 30, 15, 1),
            // Two seconds later, half of it per second.
            at(now, 50, 35, 1),
            // The store started over.
            at(now + 1_000, 2, 0, 0),
            // The same moment twice: no rate.
            at(now + 1_000, 3, 0, 0),
            at(now + 1_500, 4, 1, 0),
        ];
        let r = rates(&samples, now);
        assert_eq!(r.t, vec![1998.0, 2000.0, 2001.5]);
        assert_eq!(r.submitted, vec![20.0, 10.0, 2.0]);
        assert_eq!(r.done, vec![10.0, 10.0, 2.0]);
        assert_eq!(r.failed, vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn the_ring_keeps_fifteen_minutes_of_samples() {
        let ring = Ring::default();
        for s in 0..2000 {
            ring.record(at(s * 1000, s as u64, 0, 0));
        }
        let kept = ring.samples();
        assert_eq!(kept.len(), HISTORY_SECS as usize + 1);
        assert_eq!(kept.last().unwrap().at_ms, 1_999_000);
        assert_eq!(kept[0].at_ms, (1999 - HISTORY_SECS as i64) * 1000);
    }
}
