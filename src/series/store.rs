//! The in-memory series store: per series an open, sorted head of recent points (late
//! points accepted within `--ooo-window-ms` of the series' newest timestamp, or of the
//! clock when that is in the future), sealed into blocks ([`super::packed`]) once `--block-points`
//! points are older than that window; retention by age (`--retention`), a global limit on
//! retained points (`--max-points`, oldest blocks evicted first) and on series
//! (`--max-series`, new series refused); points too far ahead of the clock
//! (`--max-future-ms`), not finite, or that would overflow their series' total, refused;
//! running all-time totals and incrementally merged window rollups.
//!
//! Concurrency: a map of series behind a `parking_lot::RwLock`, each series behind its own
//! `Mutex`. A series emptied by retention or eviction is removed from the map and its
//! all-time total folded into `dropped`, so `/getSum` never loses a point; a writer
//! that raced with the removal sees `removed` and retries on a fresh series. A batch
//! ([`SeriesStore::insert_handles`]) reads the map once (writes it once when it creates
//! series) and locks each of its series once; callers that keep [`SeriesHandle`]s between
//! batches (the line-protocol ingest) skip the map for the series they know.

use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use thiserror::Error;

use super::agg::{Agg, AggFn, SeriesRollup};
use super::metrics::SeriesMetrics;
use super::packed::Block as SealedBlock;
use crate::metrics::Metrics;
use crate::neumaier::{Neumaier, WideSum};

/// Largest series name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Most raw points one query may return (use `step` for more).
pub const MAX_RAW_POINTS: usize = 100_000;
/// Most buckets one aggregated query may return.
pub const MAX_BUCKETS: i64 = 100_000;

#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Points up to this many ms older than the series' newest point are still accepted.
    pub ooo_window_ms: i64,
    /// Points per sealed block.
    pub block_points: usize,
    /// Points older than this (wall clock) are dropped; whole blocks at a time.
    pub retention_ms: i64,
    /// Retained points across all series, at most.
    pub max_points: u64,
    /// Width of the rollup windows.
    pub window_ms: i64,
    /// Points stamped more than this many ms ahead of the clock are refused.
    pub max_future_ms: i64,
    /// Series kept at most; points of a new series past it are refused.
    pub max_series: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            ooo_window_ms: 10_000,
            block_points: 1024,
            retention_ms: 86_400_000,
            max_points: 10_000_000,
            window_ms: 60_000,
            max_future_ms: 600_000,
            max_series: 100_000,
        }
    }
}

/// What happened to a batch of points. Each refused point counts once, for the first
/// rule it breaks, in this order: `series_limit` (a new series), `non_finite`, `future`,
/// `expired`, `late`, `overflow`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestReport {
    pub accepted: u64,
    /// Older than the out-of-order window allows.
    pub late: u64,
    /// Already older than the retention when they arrived.
    pub expired: u64,
    /// More than `--max-future-ms` ahead of the clock.
    pub future: u64,
    /// NaN or infinite values.
    pub non_finite: u64,
    /// Would have made their series' all-time total overflow `f64`.
    pub overflow: u64,
    /// Of a new series while `--max-series` series exist.
    pub series_limit: u64,
}

impl IngestReport {
    pub fn add(&mut self, o: IngestReport) {
        self.accepted += o.accepted;
        self.late += o.late;
        self.expired += o.expired;
        self.future += o.future;
        self.non_finite += o.non_finite;
        self.overflow += o.overflow;
        self.series_limit += o.series_limit;
    }

    /// Refused points by reason, as counted in `tally_series_points_rejected_total`.
    pub fn reasons(&self) -> [(&'static str, u64); 6] {
        [
            ("late", self.late),
            ("expired", self.expired),
            ("future", self.future),
            ("non_finite", self.non_finite),
            ("overflow", self.overflow),
            ("series_limit", self.series_limit),
        ]
    }

    /// Points refused, for any reason.
    pub fn rejected(&self) -> u64 {
        self.reasons().iter().map(|r| r.1).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SeriesError {
    #[error("series name must be 1 to {MAX_NAME_BYTES} bytes long (got {0} bytes)")]
    NameLength(usize),
    #[error("series name must not contain control characters")]
    NameControl,
    #[error("no series named `{0}`")]
    NotFound(String),
    #[error("{param}: {message}")]
    BadQuery {
        param: &'static str,
        message: String,
    },
}

/// Checks a series name: 1..=256 bytes, no control characters.
pub fn validate_name(name: &str) -> Result<(), SeriesError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(SeriesError::NameLength(name.len()));
    }
    if name.chars().any(char::is_control) {
        return Err(SeriesError::NameControl);
    }
    Ok(())
}

/// One row of `GET /v1/series`.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesInfo {
    pub name: Arc<str>,
    pub points: u64,
    pub first: Option<i64>,
    pub last: Option<i64>,
}

/// A range query: `[from, to)`, raw when `step` is `None`.
#[derive(Debug, Clone, Copy)]
pub struct RangeQuery {
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub step: Option<i64>,
    pub agg: AggFn,
}

struct Block {
    sealed: SealedBlock,
    first_ts: i64,
    last_ts: i64,
    agg: Agg,
    /// Per rollup window, computed once at seal time.
    windows: Vec<(i64, Agg)>,
}

#[derive(Default)]
struct Series {
    /// Sorted by timestamp (stable for equal timestamps).
    head: Vec<(i64, f64)>,
    blocks: VecDeque<Block>,
    sealed_points: u64,
    newest: Option<i64>,
    total: Agg,
    /// Merge of every block's `windows` / `agg`; rebuilt from the blocks when one is dropped.
    sealed_windows: BTreeMap<i64, Agg>,
    sealed_agg: Agg,
    sealed_dirty: bool,
    removed: bool,
}

impl Series {
    fn points(&self) -> u64 {
        self.sealed_points + self.head.len() as u64
    }

    fn oldest_ts(&self) -> Option<i64> {
        match self.blocks.front() {
            Some(b) => Some(b.first_ts),
            None => self.head.first().map(|p| p.0),
        }
    }

    fn first_last(&self) -> (Option<i64>, Option<i64>) {
        let last = match (self.head.last(), self.blocks.back()) {
            (Some(h), _) => Some(h.0),
            (None, Some(b)) => Some(b.last_ts),
            (None, None) => None,
        };
        (self.oldest_ts(), last)
    }

    fn pop_block(&mut self) -> Option<(u64, usize)> {
        let b = self.blocks.pop_front()?;
        let n = b.sealed.len() as u64;
        self.sealed_points -= n;
        self.sealed_dirty = true;
        Some((n, b.sealed.byte_len()))
    }

    fn rebuild_sealed(&mut self) {
        if !self.sealed_dirty {
            return;
        }
        self.sealed_windows.clear();
        self.sealed_agg = Agg::EMPTY;
        for b in &self.blocks {
            self.sealed_agg.merge(&b.agg);
            for (start, a) in &b.windows {
                self.sealed_windows.entry(*start).or_default().merge(a);
            }
        }
        self.sealed_dirty = false;
    }
}

/// Totals of the series removed after retention or eviction emptied them.
#[derive(Debug, Default)]
struct Dropped {
    count: u64,
    sum: WideSum,
}

type SeriesMap = HashMap<Arc<str>, Arc<Mutex<Series>>, foldhash::fast::RandomState>;

/// A series of the store, kept by callers between batches (the ingest's part caches) so
/// that a known series costs no lookup by name. It may outlive its series (removed by
/// retention or eviction): [`SeriesStore::insert_handles`] then finds its successor.
#[derive(Clone)]
pub struct SeriesHandle(Arc<Mutex<Series>>);

/// One series' points for [`SeriesStore::insert_handles`].
pub struct BatchItem<'a> {
    /// A valid series name (see [`validate_name`]).
    pub name: &'a str,
    /// The series, when the caller kept its handle.
    pub handle: Option<&'a SeriesHandle>,
    pub points: &'a [(i64, f64)],
}

/// The store. Cheap to share behind an `Arc`.
pub struct SeriesStore {
    opts: StoreOptions,
    metrics: SeriesMetrics,
    /// foldhash: keys come from clients, so the hasher is seeded (no flooding), and it is
    /// several times faster than SipHash on short keys, which showed in ingest profiles.
    series: RwLock<SeriesMap>,
    /// All-time totals of series removed after retention or eviction emptied them.
    dropped: Mutex<Dropped>,
    retained: AtomicU64,
    sealed_bytes: AtomicU64,
    sealed_points: AtomicU64,
    evicting: Mutex<()>,
}

impl SeriesStore {
    /// Registers the store's metric families (`tally_series_*`) on `metrics`.
    pub fn new(opts: StoreOptions, metrics: &Metrics) -> Self {
        let opts = StoreOptions {
            block_points: opts.block_points.clamp(1, u32::MAX as usize),
            window_ms: opts.window_ms.max(1),
            ooo_window_ms: opts.ooo_window_ms.max(0),
            ..opts
        };
        SeriesStore {
            opts,
            metrics: SeriesMetrics::register(metrics),
            series: RwLock::new(HashMap::default()),
            dropped: Mutex::new(Dropped::default()),
            retained: AtomicU64::new(0),
            sealed_bytes: AtomicU64::new(0),
            sealed_points: AtomicU64::new(0),
            evicting: Mutex::new(()),
        }
    }

    /// The store's metric families, for the ingest paths to count what they store.
    pub fn metrics(&self) -> &SeriesMetrics {
        &self.metrics
    }

    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// Points currently retained across all series.
    pub fn retained_points(&self) -> u64 {
        self.retained.load(Ordering::Relaxed)
    }

    /// Compressed bytes per sealed point (0 before the first block is sealed).
    pub fn bytes_per_point(&self) -> f64 {
        let p = self.sealed_points.load(Ordering::Relaxed);
        if p == 0 {
            0.0
        } else {
            self.sealed_bytes.load(Ordering::Relaxed) as f64 / p as f64
        }
    }

    pub fn series_count(&self) -> usize {
        self.series.read().len()
    }

    /// The series `name`, created if there is room for one more (`None` otherwise). The
    /// count is checked under the map's write lock, so the limit is exact.
    fn get_or_create(&self, name: &str) -> Option<Arc<Mutex<Series>>> {
        if let Some(s) = self.series.read().get(name) {
            return Some(s.clone());
        }
        let mut map = self.series.write();
        Self::get_or_create_locked(&mut map, name, self.opts.max_series)
    }

    fn get_or_create_locked(
        map: &mut SeriesMap,
        name: &str,
        max_series: u64,
    ) -> Option<Arc<Mutex<Series>>> {
        if let Some(s) = map.get(name) {
            return Some(s.clone());
        }
        if map.len() as u64 >= max_series {
            return None;
        }
        let s = Arc::new(Mutex::new(Series::default()));
        map.insert(Arc::from(name), s.clone());
        Some(s)
    }

    /// Removes `name` if it is still `arc` and holds no point: a series whose every point
    /// was refused must not hold a `--max-series` slot.
    fn remove_if_empty(&self, name: &str, arc: &Arc<Mutex<Series>>) {
        let mut map = self.series.write();
        if !map.get(name).is_some_and(|cur| Arc::ptr_eq(cur, arc)) {
            return;
        }
        let mut s = arc.lock();
        if s.points() == 0 {
            s.removed = true;
            self.fold_dropped(&s.total);
            drop(s);
            map.remove(name);
        }
    }

    fn fold_dropped(&self, total: &Agg) {
        if total.count == 0 {
            return;
        }
        let mut d = self.dropped.lock();
        d.count += total.count;
        d.sum.add(total.neumaier());
    }

    fn get(&self, name: &str) -> Option<Arc<Mutex<Series>>> {
        self.series.read().get(name).cloned()
    }

    /// Inserts points into one series (any order), then enforces `--max-points`. The name
    /// must have passed [`validate_name`].
    pub fn insert(&self, name: &str, points: &[(i64, f64)], now_ms: i64) -> IngestReport {
        self.insert_batch(&[(name, points)], now_ms)
    }

    /// Inserts the points of several series (each in any order; names valid).
    pub fn insert_batch(&self, batch: &[(&str, &[(i64, f64)])], now_ms: i64) -> IngestReport {
        let items: Vec<BatchItem<'_>> = batch
            .iter()
            .map(|&(name, points)| BatchItem {
                name,
                handle: None,
                points,
            })
            .collect();
        self.insert_handles(&items, now_ms).0
    }

    /// Inserts the points of several series (each in any order; names valid, possibly
    /// repeated) into the series their handles name, or found by name when they have none:
    /// the series map is locked once for the whole batch (twice when it creates series),
    /// each series once per item, and refusals, `--max-points` and the gauges are dealt
    /// with once at the end. Returns, by item index, the handles that callers keeping
    /// them should store: new ones, and successors of series removed in the meantime.
    pub fn insert_handles(
        &self,
        items: &[BatchItem<'_>],
        now_ms: i64,
    ) -> (IngestReport, Vec<(usize, SeriesHandle)>) {
        let mut found: Vec<(usize, Arc<Mutex<Series>>)> = Vec::new();
        let missing: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].handle.is_none())
            .collect();
        if !missing.is_empty() {
            let mut still = Vec::new();
            {
                let map = self.series.read();
                for &i in &missing {
                    match map.get(items[i].name) {
                        Some(s) => found.push((i, s.clone())),
                        None => still.push(i),
                    }
                }
            }
            if !still.is_empty() {
                // Created under the write lock, in item order, while there is room: the
                // limit stays exact.
                let mut map = self.series.write();
                for i in still {
                    if let Some(s) =
                        Self::get_or_create_locked(&mut map, items[i].name, self.opts.max_series)
                    {
                        found.push((i, s));
                    }
                }
            }
            found.sort_unstable_by_key(|f| f.0);
        }
        let mut report = IngestReport::default();
        let mut updates = Vec::new();
        let mut new = found.into_iter().peekable();
        // Counted before the points go in (and refusals taken back after), so that an
        // eviction, which needs a series' lock, never subtracts points not yet counted,
        // with one update of the shared counter per batch instead of one per series.
        let points: u64 = items.iter().map(|i| i.points.len() as u64).sum();
        self.retained.fetch_add(points, Ordering::Relaxed);
        for (i, item) in items.iter().enumerate() {
            let created;
            let arc = match &item.handle {
                Some(h) => &h.0,
                None => match new.next_if(|f| f.0 == i) {
                    Some((_, a)) => {
                        created = a;
                        &created
                    }
                    None => {
                        report.series_limit += item.points.len() as u64;
                        continue;
                    }
                },
            };
            let (r, replaced) = self.insert_into(item.name, arc, item.points, now_ms);
            report.add(r);
            match replaced {
                Some(a) => updates.push((i, SeriesHandle(a))),
                None if item.handle.is_none() && r.accepted > 0 => {
                    updates.push((i, SeriesHandle(arc.clone())));
                }
                None => {}
            }
        }
        self.retained
            .fetch_sub(points - report.accepted, Ordering::Relaxed);
        for (reason, n) in report.reasons() {
            if n > 0 {
                self.reject(reason, n);
            }
        }
        self.enforce_memory();
        self.publish_gauges();
        (report, updates)
    }

    /// Inserts into the series `arc` (named `name`), or into its successor when it was
    /// removed in the meantime, which is then returned if it holds points. The caller
    /// has counted `points` as retained.
    fn insert_into(
        &self,
        name: &str,
        arc: &Arc<Mutex<Series>>,
        points: &[(i64, f64)],
        now_ms: i64,
    ) -> (IngestReport, Option<Arc<Mutex<Series>>>) {
        let mut successor: Option<Arc<Mutex<Series>>> = None;
        loop {
            let cur = successor.as_ref().unwrap_or(arc);
            let mut s = cur.lock();
            if s.removed {
                drop(s);
                match self.get_or_create(name) {
                    Some(a) => successor = Some(a),
                    None => {
                        let r = IngestReport {
                            series_limit: points.len() as u64,
                            ..IngestReport::default()
                        };
                        return (r, None);
                    }
                }
                continue;
            }
            let r = self.insert_locked(&mut s, points, now_ms);
            let empty = s.points() == 0;
            drop(s);
            if empty {
                self.remove_if_empty(name, cur);
                return (r, None);
            }
            return (r, successor);
        }
    }

    /// Counts points refused for `reason` in `/metrics`.
    pub fn reject(&self, reason: &str, n: u64) {
        self.metrics.rejected(reason, n);
    }

    fn insert_locked(&self, s: &mut Series, points: &[(i64, f64)], now_ms: i64) -> IngestReport {
        let mut r = IngestReport::default();
        let expiry = now_ms.saturating_sub(self.opts.retention_ms);
        let horizon = now_ms.saturating_add(self.opts.max_future_ms);
        for &(ts, v) in points {
            if !v.is_finite() {
                r.non_finite += 1;
                continue;
            }
            if ts > horizon {
                r.future += 1;
                continue;
            }
            if ts < expiry {
                r.expired += 1;
                continue;
            }
            // Late relative to the newest point, or to the clock when the newest point is
            // ahead of it, so that an accepted future point does not make current ones
            // late; never older than the newest sealed point (blocks are immutable).
            let mut floor = s.newest.map_or(i64::MIN, |n| {
                n.min(now_ms).saturating_sub(self.opts.ooo_window_ms)
            });
            if let Some(b) = s.blocks.back() {
                floor = floor.max(b.last_ts);
            }
            if ts < floor {
                r.late += 1;
                continue;
            }
            if !s.total.try_push(ts, v) {
                r.overflow += 1;
                continue;
            }
            if s.head.last().is_none_or(|p| p.0 <= ts) {
                s.head.push((ts, v));
            } else {
                let at = s.head.partition_point(|p| p.0 <= ts);
                s.head.insert(at, (ts, v));
            }
            s.newest = Some(s.newest.map_or(ts, |n| n.max(ts)));
            r.accepted += 1;
        }
        self.seal(s, now_ms);
        r
    }

    /// Seals full blocks out of the part of the head older than the out-of-order window
    /// (measured from the same reference as lateness, so sealing never overtakes it).
    fn seal(&self, s: &mut Series, now_ms: i64) {
        if s.head.len() < self.opts.block_points {
            return;
        }
        let Some(newest) = s.newest else { return };
        let limit = newest.min(now_ms).saturating_sub(self.opts.ooo_window_ms);
        let bp = self.opts.block_points;
        while s.head.partition_point(|p| p.0 < limit) >= bp {
            let pts: Vec<(i64, f64)> = s.head.drain(..bp).collect();
            let mut agg = Agg::EMPTY;
            let mut windows: Vec<(i64, Agg)> = Vec::new();
            for &(ts, v) in &pts {
                agg.push(ts, v);
                let w = ts.div_euclid(self.opts.window_ms) * self.opts.window_ms;
                match windows.last_mut() {
                    Some((start, a)) if *start == w => a.push(ts, v),
                    _ => {
                        let mut a = Agg::EMPTY;
                        a.push(ts, v);
                        windows.push((w, a));
                    }
                }
            }
            // The head is sorted and holds fewer than u32::MAX points.
            let sealed = SealedBlock::encode(&pts);
            let (first_ts, last_ts) = (pts[0].0, pts[pts.len() - 1].0);
            if !s.sealed_dirty {
                s.sealed_agg.merge(&agg);
                for (start, a) in &windows {
                    s.sealed_windows.entry(*start).or_default().merge(a);
                }
            }
            s.sealed_points += sealed.len() as u64;
            self.sealed_bytes
                .fetch_add(sealed.byte_len() as u64, Ordering::Relaxed);
            self.sealed_points
                .fetch_add(sealed.len() as u64, Ordering::Relaxed);
            s.blocks.push_back(Block {
                sealed,
                first_ts,
                last_ts,
                agg,
                windows,
            });
        }
    }

    fn dropped(&self, reason: &str, points: u64, sealed: Option<(u64, usize)>) {
        if points == 0 {
            return;
        }
        self.retained.fetch_sub(points, Ordering::Relaxed);
        if let Some((n, bytes)) = sealed {
            self.sealed_points.fetch_sub(n, Ordering::Relaxed);
            self.sealed_bytes.fetch_sub(bytes as u64, Ordering::Relaxed);
        }
        self.metrics.evicted(reason, points);
    }

    /// Drops the oldest data (whole blocks first, then head points) until at most
    /// `--max-points` points are retained.
    fn enforce_memory(&self) {
        if self.retained_points() <= self.opts.max_points {
            return;
        }
        let _one = self.evicting.lock();
        while self.retained_points() > self.opts.max_points {
            let oldest = {
                let map = self.series.read();
                map.values()
                    .filter_map(|s| s.lock().oldest_ts().map(|t| (t, s.clone())))
                    .min_by_key(|(t, _)| *t)
            };
            let Some((_, arc)) = oldest else { break };
            let mut s = arc.lock();
            if let Some((n, bytes)) = s.pop_block() {
                self.dropped("memory", n, Some((n, bytes)));
            } else {
                let excess = self.retained_points().saturating_sub(self.opts.max_points);
                let k = (excess as usize).min(s.head.len());
                s.head.drain(..k);
                self.dropped("memory", k as u64, None);
            }
        }
        self.remove_empty();
    }

    /// Drops whole blocks whose newest point is older than the retention, and head points
    /// older than it; removes series left empty.
    pub fn enforce_retention(&self, now_ms: i64) {
        let cutoff = now_ms.saturating_sub(self.opts.retention_ms);
        let all: Vec<_> = self.series.read().values().cloned().collect();
        for arc in all {
            let mut s = arc.lock();
            while s.blocks.front().is_some_and(|b| b.last_ts < cutoff) {
                if let Some((n, bytes)) = s.pop_block() {
                    self.dropped("retention", n, Some((n, bytes)));
                }
            }
            let k = s.head.partition_point(|p| p.0 < cutoff);
            s.head.drain(..k);
            self.dropped("retention", k as u64, None);
        }
        self.remove_empty();
        self.publish_gauges();
    }

    fn remove_empty(&self) {
        let mut map = self.series.write();
        map.retain(|_, arc| {
            let mut s = arc.lock();
            if s.points() == 0 {
                s.removed = true;
                self.fold_dropped(&s.total);
                false
            } else {
                true
            }
        });
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        m.series.set(self.series_count() as i64);
        m.points_retained.set(self.retained_points() as i64);
        m.bytes_per_point.set(self.bytes_per_point());
    }

    /// The sum of every accepted point of every series, including series since removed
    /// (what `/getSum` answers), computed now from the totals. Every series total is
    /// finite; their sum is `±inf` only while it really exceeds `f64`, and a number again
    /// once the totals come back (no partial sum is kept).
    pub fn total_sum(&self) -> f64 {
        let dropped = self.dropped.lock().sum;
        let all: Vec<_> = self.series.read().values().cloned().collect();
        let live: Vec<Neumaier> = all.iter().map(|a| a.lock().total.neumaier()).collect();
        dropped.sum_with(&live)
    }

    /// How many points were ever accepted, across all series, removed ones included.
    pub fn total_count(&self) -> u64 {
        let dropped = self.dropped.lock().count;
        let all: Vec<_> = self.series.read().values().cloned().collect();
        dropped + all.iter().map(|a| a.lock().total.count).sum::<u64>()
    }

    /// The series map's entries at this moment, taken so that no caller holds the map's
    /// lock while it locks a series.
    fn snapshot(&self) -> Vec<(Arc<str>, Arc<Mutex<Series>>)> {
        self.series
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every series, sorted by name.
    pub fn list(&self) -> Vec<SeriesInfo> {
        self.list_page(None, usize::MAX).0
    }

    /// At most `limit` series whose names sort (bytewise) after `after`, in name order,
    /// and whether more follow. One pass over the map keeping the `limit + 1` smallest
    /// names in a heap: memory follows the page, not the number of series.
    pub fn list_page(&self, after: Option<&str>, limit: usize) -> (Vec<SeriesInfo>, bool) {
        let keep = limit.max(1).saturating_add(1);
        let picked: Vec<(Arc<str>, Arc<Mutex<Series>>)> = {
            let map = self.series.read();
            let mut heap: BinaryHeap<&Arc<str>> = BinaryHeap::new();
            for name in map.keys() {
                if after.is_some_and(|a| &**name <= a) {
                    continue;
                }
                if heap.len() < keep {
                    heap.push(name);
                } else if heap.peek().is_some_and(|top| name < *top) {
                    heap.pop();
                    heap.push(name);
                }
            }
            heap.into_sorted_vec()
                .into_iter()
                .filter_map(|n| map.get(n).map(|s| (n.clone(), s.clone())))
                .collect()
        };
        let more = picked.len() > limit.max(1);
        let out = picked
            .into_iter()
            .take(limit.max(1))
            .map(|(name, arc)| {
                let s = arc.lock();
                let (first, last) = s.first_last();
                SeriesInfo {
                    name,
                    points: s.points(),
                    first,
                    last,
                }
            })
            .collect();
        (out, more)
    }

    fn rollup_locked(&self, s: &mut Series) -> SeriesRollup {
        s.rebuild_sealed();
        let mut windows = s.sealed_windows.clone();
        let mut retained = s.sealed_agg;
        let w = self.opts.window_ms;
        for &(ts, v) in &s.head {
            retained.push(ts, v);
            windows.entry(ts.div_euclid(w) * w).or_default().push(ts, v);
        }
        SeriesRollup {
            total: s.total,
            retained,
            windows: windows.into_iter().collect(),
        }
    }

    /// The rollup of one series, computed now.
    pub fn rollup(&self, name: &str) -> Result<SeriesRollup, SeriesError> {
        let arc = self
            .get(name)
            .ok_or_else(|| SeriesError::NotFound(name.to_string()))?;
        let mut s = arc.lock();
        Ok(self.rollup_locked(&mut s))
    }

    /// Every series' rollup, computed now.
    pub fn rollup_all(&self) -> BTreeMap<Arc<str>, SeriesRollup> {
        let all = self.snapshot();
        all.into_iter()
            .map(|(k, arc)| {
                let mut s = arc.lock();
                (k, self.rollup_locked(&mut s))
            })
            .collect()
    }

    /// Points of one series in `[from, to)`: raw `(t, v)` without `step`, else one
    /// `(bucket_start, value)` per non-empty bucket of `step` ms (aligned to the epoch).
    pub fn query(&self, name: &str, q: RangeQuery) -> Result<Vec<(i64, f64)>, SeriesError> {
        let arc = self
            .get(name)
            .ok_or_else(|| SeriesError::NotFound(name.to_string()))?;
        let s = arc.lock();
        let from = q.from.unwrap_or(i64::MIN);
        let to = q.to.unwrap_or(i64::MAX);
        if from >= to {
            return Err(SeriesError::BadQuery {
                param: "to",
                message: "must be greater than from".into(),
            });
        }
        let in_range = |t: i64| t >= from && t < to;
        match q.step {
            None => {
                let mut out = Vec::new();
                let mut push = |p: (i64, f64)| -> Result<(), SeriesError> {
                    if out.len() >= MAX_RAW_POINTS {
                        return Err(SeriesError::BadQuery {
                            param: "step",
                            message: format!(
                                "more than {MAX_RAW_POINTS} raw points in range; narrow from/to or give a step"
                            ),
                        });
                    }
                    out.push(p);
                    Ok(())
                };
                let mut buf = Vec::new();
                for b in s
                    .blocks
                    .iter()
                    .filter(|b| b.last_ts >= from && b.first_ts < to)
                {
                    buf.clear();
                    b.sealed.decode_into(&mut buf);
                    for &p in buf.iter().filter(|p| in_range(p.0)) {
                        push(p)?;
                    }
                }
                for &p in s.head.iter().filter(|p| in_range(p.0)) {
                    push(p)?;
                }
                Ok(out)
            }
            Some(step) => {
                if step <= 0 {
                    return Err(SeriesError::BadQuery {
                        param: "step",
                        message: "must be a positive number of milliseconds".into(),
                    });
                }
                let (lo, hi) = match s.first_last() {
                    (Some(f), Some(l)) => (f.max(from), l.min(to.saturating_sub(1))),
                    _ => return Ok(Vec::new()),
                };
                if lo <= hi && (hi.div_euclid(step) - lo.div_euclid(step)) >= MAX_BUCKETS {
                    return Err(SeriesError::BadQuery {
                        param: "step",
                        message: format!("more than {MAX_BUCKETS} buckets; use a larger step"),
                    });
                }
                let bucket = |t: i64| t.div_euclid(step) * step;
                let mut buckets: BTreeMap<i64, Agg> = BTreeMap::new();
                let mut buf = Vec::new();
                for b in s
                    .blocks
                    .iter()
                    .filter(|b| b.last_ts >= from && b.first_ts < to)
                {
                    if in_range(b.first_ts)
                        && in_range(b.last_ts)
                        && bucket(b.first_ts) == bucket(b.last_ts)
                    {
                        // Whole block inside one bucket: its precomputed aggregate.
                        buckets.entry(bucket(b.first_ts)).or_default().merge(&b.agg);
                    } else {
                        buf.clear();
                        b.sealed.decode_into(&mut buf);
                        for &(t, v) in buf.iter().filter(|p| in_range(p.0)) {
                            buckets.entry(bucket(t)).or_default().push(t, v);
                        }
                    }
                }
                for &(t, v) in s.head.iter().filter(|p| in_range(p.0)) {
                    buckets.entry(bucket(t)).or_default().push(t, v);
                }
                Ok(buckets
                    .into_iter()
                    .filter_map(|(start, a)| a.value(q.agg).map(|v| (start, v)))
                    .collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn store(f: impl FnOnce(&mut StoreOptions)) -> SeriesStore {
        let mut o = StoreOptions::default();
        f(&mut o);
        SeriesStore::new(o, &Metrics::new())
    }

    fn raw(s: &SeriesStore, name: &str) -> Vec<(i64, f64)> {
        s.query(
            name,
            RangeQuery {
                from: None,
                to: None,
                step: None,
                agg: AggFn::Sum,
            },
        )
        .unwrap()
    }

    #[test]
    fn late_points_are_accepted_inside_the_window_and_rejected_outside_it() {
        // (points in arrival order, ooo window, expected accepted, late)
        let cases: &[(&[i64], i64, u64, u64)] = &[
            (&[1000, 2000, 3000], 0, 3, 0),
            (&[3000, 2000], 1000, 2, 0),
            (&[3000, 1999], 1000, 1, 1),
            (&[3000, 2000, 5000, 3999], 1000, 3, 1),
            (&[3000, 3000, 3000], 0, 3, 0),
        ];
        for (i, &(ts, window, acc, late)) in cases.iter().enumerate() {
            let st = store(|o| o.ooo_window_ms = window);
            let mut r = IngestReport::default();
            for &t in ts {
                r.add(st.insert("s", &[(NOW - 10_000 + t, 1.0)], NOW));
            }
            assert_eq!((r.accepted, r.late), (acc, late), "case {i}");
            let got = raw(&st, "s");
            assert!(
                got.windows(2).all(|w| w[0].0 <= w[1].0),
                "case {i}: {got:?}"
            );
        }
    }

    #[test]
    fn full_blocks_are_sealed_and_read_back_in_order() {
        let st = store(|o| {
            o.block_points = 10;
            o.ooo_window_ms = 5;
        });
        let pts: Vec<(i64, f64)> = (0..105).map(|i| (NOW - 1000 + i, i as f64 * 0.5)).collect();
        st.insert("s", &pts, NOW);
        assert!(st.bytes_per_point() > 0.0);
        assert_eq!(raw(&st, "s"), pts);
        assert_eq!(st.retained_points(), 105);
    }

    #[test]
    fn the_memory_limit_drops_the_oldest_points_and_keeps_the_all_time_total() {
        let st = store(|o| {
            o.block_points = 10;
            o.ooo_window_ms = 0;
            o.max_points = 50;
        });
        let pts: Vec<(i64, f64)> = (0..200).map(|i| (NOW - 1000 + i, 1.0)).collect();
        st.insert("a", &pts, NOW);
        assert!(st.retained_points() <= 50);
        let got = raw(&st, "a");
        assert_eq!(got.last().map(|p| p.0), Some(NOW - 1000 + 199));
        assert_eq!(st.total_sum(), 200.0);
    }

    #[test]
    fn retention_drops_old_blocks_and_head_points_and_removes_empty_series() {
        let st = store(|o| {
            o.block_points = 4;
            o.ooo_window_ms = 0;
            o.retention_ms = 1000;
        });
        let pts: Vec<(i64, f64)> = (0..20).map(|i| (NOW - 900 + i * 10, 2.0)).collect();
        st.insert("a", &pts, NOW);
        st.insert("b", &[(NOW, 3.0)], NOW);
        st.enforce_retention(NOW + 2000);
        assert_eq!(st.retained_points(), 0);
        assert_eq!(st.series_count(), 0);
        assert_eq!(st.total_sum(), 43.0);
        // Too old to be kept at all: refused as expired.
        let r = st.insert("a", &[(NOW - 5000, 1.0)], NOW);
        assert_eq!(r.expired, 1);
    }

    #[test]
    fn window_rollups_from_blocks_and_head_match_a_direct_computation() {
        let st = store(|o| {
            o.block_points = 7;
            o.ooo_window_ms = 0;
            o.window_ms = 100;
        });
        let pts: Vec<(i64, f64)> = (0..90).map(|i| (NOW - 5000 + i * 13, i as f64)).collect();
        st.insert("a", &pts, NOW);
        let r = st.rollup("a").unwrap();
        let mut expect: BTreeMap<i64, (u64, f64)> = BTreeMap::new();
        for &(t, v) in &pts {
            let e = expect.entry(t.div_euclid(100) * 100).or_default();
            e.0 += 1;
            e.1 += v;
        }
        let got: BTreeMap<i64, (u64, f64)> = r
            .windows
            .iter()
            .map(|(s, a)| (*s, (a.count, a.sum())))
            .collect();
        assert_eq!(got, expect);
        assert_eq!(r.retained.count, 90);
        assert_eq!(r.total.sum(), (0..90).sum::<i64>() as f64);
    }

    #[test]
    fn stepped_queries_aggregate_per_bucket() {
        let st = store(|o| {
            o.block_points = 5;
            o.ooo_window_ms = 0;
        });
        let pts: Vec<(i64, f64)> = (0..40).map(|i| (NOW - 4000 + i * 100, i as f64)).collect();
        st.insert("a", &pts, NOW);
        let q = |agg| RangeQuery {
            from: Some(NOW - 4000),
            to: Some(NOW),
            step: Some(1000),
            agg,
        };
        let sums = st.query("a", q(AggFn::Sum)).unwrap();
        let expect: Vec<f64> = (0..4)
            .map(|b| (b * 10..b * 10 + 10).sum::<i64>() as f64)
            .collect();
        assert_eq!(sums.iter().map(|p| p.1).collect::<Vec<_>>(), expect);
        let counts = st.query("a", q(AggFn::Count)).unwrap();
        assert!(counts.iter().all(|p| p.1 == 10.0));
        let max = st.query("a", q(AggFn::Max)).unwrap();
        assert_eq!(max[0].1, 9.0);
    }

    #[test]
    fn concurrent_writers_lose_no_point_of_the_total_and_respect_the_limit() {
        let st = Arc::new(store(|o| {
            o.block_points = 8;
            o.ooo_window_ms = 0;
            o.max_points = 500;
        }));
        let threads: Vec<_> = (0..4)
            .map(|k| {
                let st = st.clone();
                std::thread::spawn(move || {
                    for i in 0..250i64 {
                        let name = format!("s{}", (k + i) % 3);
                        st.insert(&name, &[(NOW - 100_000 + i * 4 + k, 1.0)], NOW);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(st.total_count(), 1000 - late_points(&st));
        assert!(st.retained_points() <= 500);
        let listed: u64 = st.list().iter().map(|s| s.points).sum();
        assert_eq!(listed, st.retained_points());
    }

    fn late_points(st: &SeriesStore) -> u64 {
        st.metrics()
            .points_rejected
            .get_or_create(&crate::metrics::ReasonLabels {
                reason: "late".into(),
            })
            .get()
    }

    #[test]
    fn points_too_far_ahead_are_refused_and_lateness_is_measured_from_the_clock_when_the_series_is_ahead(
    ) {
        // (points in arrival order as offsets from NOW, expected accepted, late, future);
        // window 10 s, --max-future-ms 10 min.
        let cases: &[(&[i64], u64, u64, u64)] = &[
            (&[600_000, 600_001], 1, 0, 1),
            // The year 2255.
            (&[8_994_000_000_000 - NOW], 0, 0, 1),
            // A point 5 min ahead, then current points: not late.
            (&[300_000, -1_000, 0], 3, 0, 0),
            // ...but older than the window before the clock still is.
            (&[300_000, -10_001], 1, 1, 0),
            // A series in the past keeps measuring from its newest point.
            (&[-60_000, -70_001, -69_000], 2, 1, 0),
        ];
        for (i, &(offsets, acc, late, future)) in cases.iter().enumerate() {
            let st = store(|o| o.max_future_ms = 600_000);
            let mut r = IngestReport::default();
            for &d in offsets {
                r.add(st.insert("s", &[(NOW + d, 1.0)], NOW));
            }
            assert_eq!(
                (r.accepted, r.late, r.future),
                (acc, late, future),
                "case {i}"
            );
        }
    }

    #[test]
    fn a_point_older_than_the_newest_sealed_point_is_late_even_with_the_series_ahead_of_the_clock()
    {
        let st = store(|o| {
            o.block_points = 4;
            o.ooo_window_ms = 1_000;
        });
        // Eight points sealed into two blocks (the newest sealed at NOW - 1993) once a
        // point ahead of the clock moves the window up to the clock.
        let pts: Vec<(i64, f64)> = (0..8).map(|i| (NOW - 2_000 + i, 1.0)).collect();
        st.insert("s", &pts, NOW);
        st.insert("s", &[(NOW + 60_000, 1.0)], NOW);
        // A batch stamped with an earlier clock (it waited) would allow NOW - 2500, but
        // the sealed block does not take points before its last one.
        let r = st.insert("s", &[(NOW - 1_998, 1.0), (NOW - 1_990, 1.0)], NOW - 1_500);
        assert_eq!((r.accepted, r.late), (1, 1));
        let got = raw(&st, "s");
        assert!(got.windows(2).all(|w| w[0].0 <= w[1].0), "{got:?}");
        assert_eq!(got.len(), 10);
    }

    #[test]
    fn non_finite_points_and_points_that_would_overflow_the_series_total_are_refused() {
        let st = store(|_| {});
        let big = 1.7e308;
        let r = st.insert(
            "s",
            &[
                (NOW, f64::NAN),
                (NOW, f64::INFINITY),
                (NOW, f64::NEG_INFINITY),
                (NOW, big),
                (NOW + 1, big),
                (NOW + 2, -big),
                (NOW + 3, big),
            ],
            NOW,
        );
        assert_eq!((r.accepted, r.non_finite, r.overflow), (3, 3, 1));
        assert_eq!(st.total_sum(), big);
        assert_eq!(st.rollup("s").unwrap().total.count, 3);
    }

    #[test]
    fn the_global_sum_reads_inf_while_the_totals_exceed_f64_and_comes_back_after() {
        let st = store(|o| o.retention_ms = 1_000);
        let big = 1.7e308;
        // Three removed series of 1.7e308 each: their totals add up past f64::MAX.
        for name in ["a", "b", "c"] {
            st.insert(name, &[(NOW, big)], NOW);
        }
        assert_eq!(st.total_sum(), f64::INFINITY);
        st.enforce_retention(NOW + 10_000);
        assert_eq!(st.series_count(), 0);
        assert_eq!(st.total_sum(), f64::INFINITY);
        // Two live series of -1.7e308: 3 - 2 = 1 times 1.7e308.
        st.insert("d", &[(NOW + 10_000, -big)], NOW + 10_000);
        assert_eq!(st.total_sum(), f64::INFINITY);
        st.insert("e", &[(NOW + 10_000, -big)], NOW + 10_000);
        assert_eq!(st.total_sum(), big);
        st.insert("f", &[(NOW + 10_000, -big)], NOW + 10_000);
        st.insert("g", &[(NOW + 10_000, -big)], NOW + 10_000);
        st.insert("h", &[(NOW + 10_000, -big)], NOW + 10_000);
        assert_eq!(st.total_sum(), f64::NEG_INFINITY);
        assert_eq!(st.total_count(), 8);
    }

    #[test]
    fn the_series_limit_is_exact_under_concurrent_writers_and_freed_by_removal() {
        let st = Arc::new(store(|o| {
            o.max_series = 50;
            o.retention_ms = 1_000;
        }));
        let threads: Vec<_> = (0..4)
            .map(|k| {
                let st = st.clone();
                std::thread::spawn(move || {
                    let mut r = IngestReport::default();
                    for i in 0..40 {
                        r.add(st.insert(&format!("s{k}-{i}"), &[(NOW, 1.0)], NOW));
                    }
                    r
                })
            })
            .collect();
        let mut r = IngestReport::default();
        for t in threads {
            r.add(t.join().unwrap());
        }
        assert_eq!((r.accepted, r.series_limit), (50, 110));
        assert_eq!(st.series_count(), 50);
        // Existing series keep accepting; a new one is refused.
        let listed = st.list();
        assert_eq!(
            st.insert(&listed[0].name, &[(NOW + 1, 1.0)], NOW).accepted,
            1
        );
        assert_eq!(st.insert("new", &[(NOW, 1.0)], NOW).series_limit, 1);
        // Emptied by retention, the series free their slots.
        st.enforce_retention(NOW + 10_000);
        assert_eq!(
            st.insert("new", &[(NOW + 10_000, 1.0)], NOW + 10_000)
                .accepted,
            1
        );
    }

    #[test]
    fn a_new_series_whose_points_are_all_refused_holds_no_slot() {
        let st = store(|o| o.max_series = 1);
        let r = st.insert("a", &[(NOW + 3_600_000, 1.0), (NOW, f64::NAN)], NOW);
        assert_eq!((r.accepted, r.future, r.non_finite), (0, 1, 1));
        assert_eq!(st.series_count(), 0);
        assert_eq!(st.insert("b", &[(NOW, 1.0)], NOW).accepted, 1);
    }

    #[test]
    fn pages_list_every_series_once_in_name_order() {
        let st = store(|_| {});
        let mut names: Vec<String> = (0..57).map(|i| format!("s{}", (i * 31) % 57)).collect();
        for n in &names {
            st.insert(n, &[(NOW, 1.0)], NOW);
        }
        names.sort();
        for limit in [1, 7, 56, 57, 100] {
            let (mut got, mut after) = (Vec::new(), None::<String>);
            loop {
                let (page, more) = st.list_page(after.as_deref(), limit);
                assert!(page.len() <= limit);
                got.extend(page.iter().map(|s| s.name.to_string()));
                if !more {
                    break;
                }
                after = page.last().map(|s| s.name.to_string());
            }
            assert_eq!(got, names, "limit {limit}");
        }
        // A cursor need not be a series name.
        let (page, _) = st.list_page(Some("s5"), 2);
        let got: Vec<&str> = page.iter().map(|s| &*s.name).collect();
        assert_eq!(got, ["s50", "s51"]);
    }

    #[test]
    fn names_are_validated() {
        let long = "x".repeat(257);
        let cases: &[(&str, bool)] = &[("cpu", true), ("", false), (&long, false), ("a\nb", false)];
        for &(n, ok) in cases {
            assert_eq!(validate_name(n).is_ok(), ok, "{n:?}");
        }
    }

    #[test]
    fn an_unknown_series_is_not_found() {
        let st = store(|_| {});
        assert!(matches!(st.rollup("nope"), Err(SeriesError::NotFound(_))));
    }
}
