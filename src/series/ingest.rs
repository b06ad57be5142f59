//! Ingest of line protocol into the series store, shared by `POST /write` and the TCP
//! listener (`--line-listen`): parse, group points by series, insert, count. The
//! [`Ingester`] owns what ingest keeps between batches (the part caches); the store knows
//! nothing of line protocol. The TCP listener itself (bounded lines, bounded connections,
//! idle connections closed, bad lines counted) lives here too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::line_protocol::{
    parse_lines_cached, push_series_field, FieldValue, ParseSummary, Point, Precision, SeriesSink,
};
use super::store::{validate_name, BatchItem, IngestReport, SeriesHandle, SeriesStore};
use crate::metrics::Metrics;

/// Longest line the TCP listener accepts; longer ones are counted as invalid and skipped.
pub const MAX_TCP_LINE_BYTES: usize = 64 * 1024;

/// Outcome of one line-protocol batch.
#[derive(Debug, Clone, Default)]
pub struct LineIngest {
    pub parse: ParseSummary,
    pub store: IngestReport,
    /// Points refused because their series key is not a valid series name.
    pub bad_names: u64,
}

impl LineIngest {
    /// Points of parsed lines that were not stored, by reason (bad series names count as
    /// `invalid`, like in `/metrics`); reasons with no point are left out. String fields
    /// are not points and do not count.
    pub fn rejections(&self) -> Vec<(&'static str, u64)> {
        self.store
            .reasons()
            .into_iter()
            .chain([("invalid", self.bad_names)])
            .filter(|r| r.1 > 0)
            .collect()
    }
}

/// Series parts (a line's measurement and tags, as sent) already seen, by their bytes,
/// kept between batches: a line of a known series costs one hash of those bytes, instead
/// of parsing, unescaping and sorting its tags, building its escaped series key and
/// looking that up in the store. Agents send the same series in every batch, hundreds of
/// them alternating line by line, so after their first batch nearly every line hits.
///
/// The [`Ingester`] keeps a few of these between batches; each holds at most
/// [`MAX_CACHED_PARTS`] parts and [`MAX_CACHED_FIELDS`] fields (past either it is dropped
/// after its batch, or emptied before the next), plus one batch's new ones. Handles may go
/// stale (series removed); the store then finds the successor.
#[derive(Default)]
pub struct PartCache {
    index: HashMap<Box<[u8]>, u32, foldhash::fast::RandomState>,
    parts: Vec<CachedPart>,
    /// Fields cached across all parts.
    fields: usize,
    /// The batch in progress; a field whose `epoch` is older has no group in it yet.
    epoch: u32,
    /// Buffers of the last batch, reused (a batch's points are ~24 bytes per line).
    spare: Buffers,
}

#[derive(Default)]
struct Buffers {
    groups: Vec<(u32, u32)>,
    points: Vec<(u32, i64, f64)>,
    bucketed: Vec<(i64, f64)>,
    starts: Vec<usize>,
}

/// Parts a cache holds before it is emptied (at the start of a batch).
pub const MAX_CACHED_PARTS: usize = 1 << 16;

/// Fields (series) a cache holds before it is emptied.
pub const MAX_CACHED_FIELDS: usize = 1 << 17;

/// A part's fields are found by a linear scan up to this many (agents send one to a few
/// per measurement), through a map past it (a client may send millions).
const FIELD_SCAN: usize = 8;

impl PartCache {
    fn is_full(&self) -> bool {
        self.parts.len() >= MAX_CACHED_PARTS || self.fields >= MAX_CACHED_FIELDS
    }
}

/// Points of the largest batch whose buffers a cache keeps (~3 MiB of buffers).
const SPARE_POINTS: usize = 1 << 16;

struct CachedPart {
    /// Escaped key prefix: `measurement,tag=value...`.
    prefix: Box<str>,
    fields: Vec<CachedField>,
    /// Index of `fields` by name, once there are more than [`FIELD_SCAN`].
    by_field: Option<HashMap<Box<str>, u32, foldhash::fast::RandomState>>,
}

impl CachedPart {
    #[inline]
    fn find(&self, field: &str) -> Option<usize> {
        match &self.by_field {
            None => self.fields.iter().position(|f| &*f.field == field),
            Some(map) => map.get(field).map(|&i| i as usize),
        }
    }

    fn push(&mut self, f: CachedField) -> usize {
        let i = self.fields.len();
        match &mut self.by_field {
            Some(map) => {
                map.insert(f.field.clone(), i as u32);
            }
            None if i + 1 > FIELD_SCAN => {
                let mut map = HashMap::with_capacity_and_hasher(i + 1, Default::default());
                for (j, g) in self.fields.iter().chain([&f]).enumerate() {
                    map.insert(g.field.clone(), j as u32);
                }
                self.by_field = Some(map);
            }
            None => {}
        }
        self.fields.push(f);
        i
    }
}

struct CachedField {
    field: Box<str>,
    /// The series key, `None` when it is not a valid series name.
    name: Option<Box<str>>,
    handle: Option<SeriesHandle>,
    /// Batch in which `group` was assigned.
    epoch: u32,
    group: u32,
}

/// One batch's grouping of points by series, through a [`PartCache`].
struct Grouper<'c> {
    cache: &'c mut PartCache,
    /// `(part, field)` of each group, in order of first appearance.
    groups: Vec<(u32, u32)>,
    /// `(group, timestamp_ms, value)` in input order.
    points: Vec<(u32, i64, f64)>,
}

impl Grouper<'_> {
    #[inline]
    fn group_of(&mut self, part: u32, field: &str) -> u32 {
        let cp = &mut self.cache.parts[part as usize];
        let f = match cp.find(field) {
            Some(f) => f,
            None => {
                let mut name = String::with_capacity(cp.prefix.len() + field.len() + 1);
                name.push_str(&cp.prefix);
                push_series_field(&mut name, field);
                let valid = validate_name(&name).is_ok();
                self.cache.fields += 1;
                cp.push(CachedField {
                    field: field.into(),
                    name: valid.then(|| name.into_boxed_str()),
                    handle: None,
                    epoch: self.cache.epoch.wrapping_sub(1),
                    group: 0,
                })
            }
        };
        let cf = &mut cp.fields[f];
        if cf.epoch != self.cache.epoch {
            cf.epoch = self.cache.epoch;
            cf.group = self.groups.len() as u32;
            self.groups.push((part, f as u32));
        }
        cf.group
    }

    /// Puts the groups' points in `out`, contiguous per group (input order kept within a
    /// group), and where each group starts in `starts` (one more entry than groups).
    fn bucket(&self, out: &mut Vec<(i64, f64)>, starts: &mut Vec<usize>) {
        starts.clear();
        starts.resize(self.groups.len() + 1, 0);
        for &(g, _, _) in &self.points {
            starts[g as usize + 1] += 1;
        }
        for i in 1..starts.len() {
            starts[i] += starts[i - 1];
        }
        out.clear();
        out.resize(self.points.len(), (0, 0.0));
        // `starts[g]` is used as group g's write position, then shifted back.
        for &(g, t, v) in &self.points {
            let at = &mut starts[g as usize];
            out[*at] = (t, v);
            *at += 1;
        }
        for g in (1..starts.len()).rev() {
            starts[g] = starts[g - 1];
        }
        starts[0] = 0;
    }
}

impl<'i> SeriesSink<'i> for Grouper<'_> {
    type Part = u32;

    #[inline]
    fn lookup(&mut self, raw: &'i [u8]) -> Option<u32> {
        self.cache.index.get(raw).copied()
    }

    #[inline]
    fn known(&mut self, part: u32, field: &str, value: FieldValue<'_>, timestamp_ms: i64) {
        let Some(v) = value.as_f64() else { return };
        let g = self.group_of(part, field);
        self.points.push((g, timestamp_ms, v));
    }

    fn point(&mut self, raw: &'i [u8], p: Point<'_>) {
        let part = match self.cache.index.get(raw) {
            Some(&part) => part,
            None => {
                let mut prefix = String::new();
                p.write_series_prefix(&mut prefix);
                let part = self.cache.parts.len() as u32;
                self.cache.parts.push(CachedPart {
                    prefix: prefix.into_boxed_str(),
                    fields: Vec::new(),
                    by_field: None,
                });
                self.cache.index.insert(raw.into(), part);
                part
            }
        };
        self.known(part, p.field(), p.value(), p.timestamp_ms());
    }
}

/// Part caches kept between batches: as many as batches usually run at once.
const MAX_PART_CACHES: usize = 8;

/// Line-protocol ingest into one store, shared by `POST /write` and the TCP listener.
pub struct Ingester {
    store: Arc<SeriesStore>,
    /// One per batch in progress at most, kept between batches (at most
    /// [`MAX_PART_CACHES`]; each bounded by itself). Handles in them belong to `store`.
    part_caches: Mutex<Vec<PartCache>>,
    idle_closed: Counter,
}

impl Ingester {
    /// Registers `tally_series_line_idle_closed_total` on `metrics`.
    pub fn new(store: Arc<SeriesStore>, metrics: &Metrics) -> Self {
        Ingester {
            store,
            part_caches: Mutex::new(Vec::new()),
            idle_closed: metrics.add(
                "series_line_idle_closed",
                "TCP line-protocol connections closed after --line-idle-timeout-ms without data",
            ),
        }
    }

    pub fn store(&self) -> &Arc<SeriesStore> {
        &self.store
    }

    /// Parses `body` and stores its numeric points; string fields are skipped (counted as
    /// rejected, reason `non_numeric`), bad lines are counted (reason `invalid`). Accepted
    /// points are counted under `source`.
    pub fn ingest(
        &self,
        body: &[u8],
        precision: Precision,
        now_ms: i64,
        source: &str,
    ) -> LineIngest {
        let cache = self.part_caches.lock().pop().unwrap_or_default();
        let (out, cache) = ingest_with(&self.store, cache, body, precision, now_ms, source);
        // A cache that outgrew its bounds in this batch is not kept for the next one.
        if !cache.is_full() {
            let mut caches = self.part_caches.lock();
            if caches.len() < MAX_PART_CACHES {
                caches.push(cache);
            }
        }
        out
    }
}

fn ingest_with(
    store: &SeriesStore,
    mut cache: PartCache,
    body: &[u8],
    precision: Precision,
    now_ms: i64,
    source: &str,
) -> (LineIngest, PartCache) {
    if cache.is_full() {
        cache = PartCache::default();
    }
    cache.epoch = cache.epoch.wrapping_add(1);
    let mut buf = std::mem::take(&mut cache.spare);
    buf.groups.clear();
    buf.points.clear();
    let mut grouper = Grouper {
        cache: &mut cache,
        groups: buf.groups,
        points: buf.points,
    };
    let parse = parse_lines_cached(body, precision, now_ms, &mut grouper);
    let mut out = LineIngest {
        parse,
        ..LineIngest::default()
    };
    let (mut points, mut starts) = (buf.bucketed, buf.starts);
    grouper.bucket(&mut points, &mut starts);
    let (groups, by_line) = (grouper.groups, grouper.points);
    let mut items: Vec<BatchItem<'_>> = Vec::with_capacity(groups.len());
    let mut item_group: Vec<usize> = Vec::with_capacity(groups.len());
    for (g, &(part, f)) in groups.iter().enumerate() {
        let pts = &points[starts[g]..starts[g + 1]];
        let cf = &cache.parts[part as usize].fields[f as usize];
        match &cf.name {
            Some(name) => {
                items.push(BatchItem {
                    name,
                    handle: cf.handle.as_ref(),
                    points: pts,
                });
                item_group.push(g);
            }
            None => out.bad_names += pts.len() as u64,
        }
    }
    let (report, updates) = store.insert_handles(&items, now_ms);
    drop(items);
    out.store = report;
    for (i, handle) in updates {
        let (part, f) = groups[item_group[i]];
        cache.parts[part as usize].fields[f as usize].handle = Some(handle);
    }
    // Kept only up to the size of ordinary batches, so idle caches stay small.
    if by_line.capacity() <= SPARE_POINTS {
        cache.spare = Buffers {
            groups,
            points: by_line,
            bucketed: points,
            starts,
        };
    }
    store.metrics().accepted(source, out.store.accepted);
    let invalid = out.parse.error_lines as u64 + out.bad_names;
    if invalid > 0 {
        store.reject("invalid", invalid);
    }
    if out.parse.non_numeric > 0 {
        store.reject("non_numeric", out.parse.non_numeric as u64);
    }
    (out, cache)
}

/// Options of the TCP line-protocol listener.
#[derive(Debug, Clone, Copy)]
pub struct TcpOptions {
    pub precision: Precision,
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
}

/// Accepts connections on `listener` until `stop` is cancelled (then closes them all
/// and returns). Each connection streams newline-delimited line protocol; complete lines
/// are ingested as they arrive.
pub async fn serve_tcp(
    listener: TcpListener,
    ingester: Arc<Ingester>,
    opts: TcpOptions,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = stop.cancelled() => break,
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.cancelled() => break,
            };
            match accepted {
                Ok((sock, peer)) => {
                    let ingester = ingester.clone();
                    let stop = stop.clone();
                    conns.spawn(async move {
                        let _permit = permit;
                        tokio::select! {
                            _ = serve_connection(sock, peer, &ingester, opts) => {}
                            _ = stop.cancelled() => {}
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "accepting a line-protocol connection failed"),
            }
            while conns.try_join_next().is_some() {}
        }
        conns.shutdown().await;
    }
}

async fn serve_connection(
    mut sock: tokio::net::TcpStream,
    peer: SocketAddr,
    ingester: &Ingester,
    opts: TcpOptions,
) {
    let store = ingester.store();
    let precision = opts.precision;
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    // True while skipping the rest of an over-long line.
    let mut skipping = false;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut idle = false;
    loop {
        let read = tokio::time::timeout(opts.idle_timeout, sock.read(&mut chunk)).await;
        let n = match read {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "line-protocol connection failed");
                break;
            }
            Err(_) => {
                tracing::debug!(%peer, "idle line-protocol connection closed");
                ingester.idle_closed.inc();
                idle = true;
                break;
            }
        };
        let mut data = &chunk[..n];
        if skipping {
            match memchr::memchr(b'\n', data) {
                Some(i) => {
                    skipping = false;
                    data = &data[i + 1..];
                }
                None => continue,
            }
        }
        buf.extend_from_slice(data);
        let complete = match memchr::memrchr(b'\n', &buf) {
            Some(i) => i + 1,
            None => 0,
        };
        if complete > 0 {
            ingest_tcp(ingester, &buf[..complete], precision);
            buf.drain(..complete);
        }
        if buf.len() > MAX_TCP_LINE_BYTES {
            tracing::debug!(%peer, "line-protocol line longer than 64 KiB skipped");
            store.reject("invalid", 1);
            buf.clear();
            skipping = true;
        }
    }
    if !buf.is_empty() && !skipping {
        if idle {
            // Cut off mid-line: the rest may never have been sent (`value=12` as `value=1`).
            store.reject("invalid", 1);
        } else {
            ingest_tcp(ingester, &buf, precision);
        }
    }
}

fn ingest_tcp(ingester: &Ingester, lines: &[u8], precision: Precision) {
    let r = ingester.ingest(lines, precision, crate::now_ms(), "tcp");
    if let Some(e) = r.parse.errors.first() {
        tracing::debug!(error = %e, bad_lines = r.parse.error_lines, "bad line protocol over TCP");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::store::StoreOptions;

    fn ingester() -> Ingester {
        let metrics = Metrics::new();
        Ingester::new(
            Arc::new(SeriesStore::new(StoreOptions::default(), &metrics)),
            &metrics,
        )
    }

    #[test]
    fn lines_are_grouped_per_series_and_bad_names_and_strings_are_not_stored() {
        let ingester = ingester();
        let store = ingester.store();
        let long = "m".repeat(300);
        let body =
            format!("a,h=1 x=1,y=2 1000\na,h=1 x=3 1001\n{long} x=5 1000\ns t=\"str\" 1000\nbad\n");
        let r = ingester.ingest(body.as_bytes(), Precision::Milliseconds, 2000, "write");
        assert_eq!(r.store.accepted, 3);
        assert_eq!(
            (r.bad_names, r.parse.error_lines, r.parse.non_numeric),
            (1, 1, 1)
        );
        let names: Vec<String> = store.list().iter().map(|s| s.name.to_string()).collect();
        assert_eq!(names, ["a,h=1:x", "a,h=1:y"]);
        assert_eq!(store.total_sum(), 6.0);
    }

    #[test]
    fn interleaved_series_that_differ_in_one_part_are_kept_apart() {
        let ingester = ingester();
        let store = ingester.store();
        // Each line differs from the one before in exactly one part: tag value, tag key,
        // field, measurement, number of tags; the last repeats the first series.
        let body = "a,h=1 v=1 1000\na,h=2 v=2 1000\na,k=2 v=4 1000\na,k=2 w=8 1000\n\
                    b,k=2 w=16 1000\nb w=32 1000\na,h=1 v=64 1001\n";
        let r = ingester.ingest(body.as_bytes(), Precision::Milliseconds, 2000, "write");
        assert_eq!(r.store.accepted, 7);
        let mut got: Vec<(String, f64)> = store
            .list()
            .iter()
            .map(|s| (s.name.to_string(), s.points as f64))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["a,h=1:v", "a,h=2:v", "a,k=2:v", "a,k=2:w", "b,k=2:w", "b:w"]
        );
        let points: Vec<f64> = got.iter().map(|(_, n)| *n).collect();
        assert_eq!(points, [2.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(store.total_sum(), 127.0);
    }

    #[test]
    fn a_part_with_many_fields_finds_each_through_its_index_across_batches() {
        let ingester = ingester();
        // 3 × FIELD_SCAN fields on one part: past the linear scan.
        let n = 3 * FIELD_SCAN;
        let line = |ts: i64| {
            let fields: Vec<String> = (0..n).map(|f| format!("f{f}={f}")).collect();
            format!("m,h=1 {} {ts}\n", fields.join(","))
        };
        for (batch, ts) in [1000, 1001, 1002].into_iter().enumerate() {
            let r = ingester.ingest(line(ts).as_bytes(), Precision::Milliseconds, 2000, "write");
            assert_eq!(r.store.accepted, n as u64, "batch {batch}");
        }
        let store = ingester.store();
        assert_eq!(store.series_count(), n);
        for s in store.list() {
            assert_eq!(s.points, 3, "{}", s.name);
        }
        let expected: f64 = (0..n).map(|f| 3.0 * f as f64).sum();
        assert_eq!(store.total_sum(), expected);
    }

    #[test]
    fn a_cache_that_outgrew_its_bounds_is_not_kept_for_the_next_batch() {
        let ingester = ingester();
        ingester.ingest(b"m v=1 1000\n", Precision::Milliseconds, 2000, "write");
        assert_eq!(
            ingester.part_caches.lock().len(),
            1,
            "an ordinary cache is kept"
        );
        let fields: Vec<String> = (0..=MAX_CACHED_FIELDS).map(|f| format!("f{f}=1")).collect();
        let body = format!("big {} 1000\n", fields.join(","));
        ingester.ingest(body.as_bytes(), Precision::Milliseconds, 2000, "write");
        assert_eq!(
            ingester.part_caches.lock().len(),
            0,
            "the outgrown cache was dropped"
        );
    }
}
