//! The mergeable running aggregate [`Agg`] (count, Neumaier sum, min, max, last) that the
//! series store keeps per series, per sealed block and per fixed window, the aggregation
//! functions of range queries ([`AggFn`]) and one series' rollup ([`SeriesRollup`]). Plain
//! values: the store computes them, `rollup` publishes them, the API renders them.

use serde::Serialize;

use crate::neumaier::Neumaier;

/// A mergeable aggregate of `(timestamp_ms, value)` points.
///
/// `sum` is Neumaier-compensated; `last` is the value with the latest timestamp (for equal
/// timestamps, the last pushed or merged). An empty `Agg` has `count == 0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agg {
    pub count: u64,
    sum: Neumaier,
    pub min: f64,
    pub max: f64,
    pub last: f64,
    pub last_ts: i64,
}

impl Default for Agg {
    fn default() -> Self {
        Agg::EMPTY
    }
}

impl Agg {
    pub const EMPTY: Agg = Agg {
        count: 0,
        sum: Neumaier::IDENTITY,
        min: f64::NAN,
        max: f64::NAN,
        last: f64::NAN,
        last_ts: i64::MIN,
    };

    /// Adds one point.
    #[inline]
    pub fn push(&mut self, ts: i64, v: f64) {
        self.sum.add(v);
        self.note(ts, v);
    }

    /// Everything of [`Agg::push`] but the sum.
    #[inline]
    fn note(&mut self, ts: i64, v: f64) {
        self.count += 1;
        if !v.is_nan() {
            if self.min.is_nan() || v < self.min {
                self.min = v;
            }
            if self.max.is_nan() || v > self.max {
                self.max = v;
            }
        }
        if ts >= self.last_ts {
            self.last = v;
            self.last_ts = ts;
        }
    }

    /// Adds one point unless it would make the sum non-finite (then nothing changes and
    /// `false` is returned): a series' all-time total stays a number.
    #[inline]
    pub fn try_push(&mut self, ts: i64, v: f64) -> bool {
        let mut sum = self.sum;
        sum.add(v);
        if !sum.value().is_finite() {
            return false;
        }
        self.sum = sum;
        self.note(ts, v);
        true
    }

    /// The running sum itself, for totals summed across series.
    pub fn neumaier(&self) -> Neumaier {
        self.sum
    }

    /// Folds another aggregate in (as if its points had been pushed after ours).
    pub fn merge(&mut self, o: &Agg) {
        if o.count == 0 {
            return;
        }
        self.count += o.count;
        self.sum.merge(&o.sum);
        if !o.min.is_nan() && (self.min.is_nan() || o.min < self.min) {
            self.min = o.min;
        }
        if !o.max.is_nan() && (self.max.is_nan() || o.max > self.max) {
            self.max = o.max;
        }
        if o.last_ts >= self.last_ts {
            self.last = o.last;
            self.last_ts = o.last_ts;
        }
    }

    /// The compensated sum (`-0.0`... `0.0` for no points is reported as `0.0`).
    pub fn sum(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum.value()
        }
    }

    /// `sum / count`; `None` without points.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum() / self.count as f64)
    }

    /// The value of one aggregation function; `None` when it has no value (no points).
    pub fn value(&self, f: AggFn) -> Option<f64> {
        if self.count == 0 {
            return match f {
                AggFn::Count => Some(0.0),
                AggFn::Sum => Some(0.0),
                _ => None,
            };
        }
        Some(match f {
            AggFn::Sum => self.sum(),
            AggFn::Count => self.count as f64,
            AggFn::Mean => self.sum() / self.count as f64,
            AggFn::Min => self.min,
            AggFn::Max => self.max,
            AggFn::Last => self.last,
        })
    }

    /// The wire summary `{count, sum, mean, min, max, last}`.
    pub fn summary(&self) -> AggSummary {
        let some = |v: f64| (self.count > 0).then_some(v);
        AggSummary {
            count: self.count,
            sum: self.sum(),
            mean: self.mean(),
            min: some(self.min),
            max: some(self.max),
            last: some(self.last),
        }
    }
}

/// An aggregation function of `GET /v1/series/{name}?agg=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggFn {
    Sum,
    Count,
    Mean,
    Min,
    Max,
    Last,
}

impl std::str::FromStr for AggFn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "sum" => AggFn::Sum,
            "count" => AggFn::Count,
            "mean" | "avg" => AggFn::Mean,
            "min" => AggFn::Min,
            "max" => AggFn::Max,
            "last" => AggFn::Last,
            other => {
                return Err(format!(
                    "unknown aggregation `{other}` (expected sum, count, mean, min, max or last)"
                ))
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AggSummary {
    pub count: u64,
    pub sum: f64,
    pub mean: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub last: Option<f64>,
}

/// The rollup of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesRollup {
    /// Every point ever accepted into the series (retention and evictions do not subtract).
    pub total: Agg,
    /// The points currently retained.
    pub retained: Agg,
    /// Fixed windows (`--rollup-window-ms`) over the retained points: `(start_ms, agg)`,
    /// in time order, only windows with points.
    pub windows: Vec<(i64, Agg)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_two_aggregates_equals_pushing_all_points_into_one() {
        let pts: Vec<(i64, f64)> = (0..100).map(|i| (i, (i as f64) * 0.1 - 3.0)).collect();
        let mut all = Agg::EMPTY;
        pts.iter().for_each(|&(t, v)| all.push(t, v));
        let (mut a, mut b) = (Agg::EMPTY, Agg::EMPTY);
        pts[..37].iter().for_each(|&(t, v)| a.push(t, v));
        pts[37..].iter().for_each(|&(t, v)| b.push(t, v));
        a.merge(&b);
        assert_eq!(a.count, all.count);
        assert!((a.sum() - all.sum()).abs() < 1e-9);
        assert_eq!((a.min, a.max, a.last), (all.min, all.max, all.last));
    }

    #[test]
    fn an_empty_aggregate_has_a_zero_sum_and_no_mean() {
        let s = Agg::EMPTY.summary();
        assert_eq!((s.count, s.sum, s.mean, s.min), (0, 0.0, None, None));
        assert_eq!(Agg::EMPTY.value(AggFn::Count), Some(0.0));
        assert_eq!(Agg::EMPTY.value(AggFn::Max), None);
    }

    #[test]
    fn last_follows_the_latest_timestamp_not_the_arrival_order() {
        let mut a = Agg::EMPTY;
        a.push(10, 1.0);
        a.push(5, 2.0);
        assert_eq!(a.last, 1.0);
        a.push(10, 3.0);
        assert_eq!(a.last, 3.0);
    }

    #[test]
    fn aggregation_names_parse_or_name_the_problem() {
        for (s, f) in [
            ("sum", AggFn::Sum),
            ("count", AggFn::Count),
            ("mean", AggFn::Mean),
            ("min", AggFn::Min),
            ("max", AggFn::Max),
            ("last", AggFn::Last),
        ] {
            assert_eq!(s.parse::<AggFn>(), Ok(f));
        }
        assert!("median".parse::<AggFn>().unwrap_err().contains("median"));
    }
}
