//! `tally load`: the pipeline's client (and a load generator for the job API and for
//! line-protocol ingest): many concurrent connections, each sending records (or batches
//! of lines) with a random delay before each, 503s retried after the server's
//! `Retry-After`, a progress bar on a terminal, and a summary of what was sent,
//! acknowledged and how fast.
//!
//! `--mode write` gives each connection one series, `demo,host=h<conn> value=<v>`, with
//! timestamps 1 ms apart ending at the moment the run starts (so that none is in the
//! future, which servers refuse past a limit), and sends `--batch-lines` lines
//! per request to `/write?precision=ms` (the same route on tally, InfluxDB and
//! VictoriaMetrics), so the summary's `lines_per_s` is samples per second.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use reqwest::{header, StatusCode};
use serde_json::{json, Value};

use crate::config::{LoadArgs, LoadMode, LoadValues};

/// Longest `Retry-After` honoured; a larger one is clipped.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// What every connection needs, checked once.
struct Plan {
    url: reqwest::Url,
    mode: LoadMode,
    per_connection: u64,
    delay_range: Duration,
    kind: String,
    params: Value,
    timeout: Duration,
    max_retries: u32,
    token: Option<String>,
    batch_lines: u64,
    values: LoadValues,
    /// First timestamp of every series in `--mode write`.
    start_ms: u64,
    /// `--acks-out` was given: keep every acknowledgement until the end.
    keep_acks: bool,
}

/// Latencies of the acknowledged records of the whole run, in microseconds: an HDR
/// histogram of fixed size (1 µs to an hour at 3 significant digits, about 180 KiB,
/// however many requests are made), so percentiles come within 0.1% of the exact
/// nearest-rank ones; the largest latency is kept exactly.
pub(crate) struct Latencies {
    hist: hdrhistogram::Histogram<u64>,
    max: Duration,
}

impl Latencies {
    /// Largest latency told apart: one hour (larger ones count as one hour, `max` aside).
    const HIGHEST_US: u64 = 3_600_000_000;

    pub(crate) fn new() -> Self {
        let hist = hdrhistogram::Histogram::new_with_bounds(1, Self::HIGHEST_US, 3)
            .expect("valid histogram bounds");
        Latencies {
            hist,
            max: Duration::ZERO,
        }
    }

    pub(crate) fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.hist.saturating_record(us);
        self.max = self.max.max(d);
    }

    pub(crate) fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The nearest-rank `q` quantile (0 < q <= 1), in milliseconds; 0 without samples.
    pub(crate) fn percentile_ms(&self, q: f64) -> f64 {
        if self.hist.is_empty() {
            return 0.0;
        }
        // The top of the sample's bucket, never past the largest sample.
        let max_us = self.max.as_secs_f64() * 1e6;
        (self.hist.value_at_quantile(q) as f64).min(max_us) / 1000.0
    }

    pub(crate) fn max_ms(&self) -> f64 {
        self.max.as_secs_f64() * 1000.0
    }

    /// Bytes of the histogram's counts: fixed at creation.
    #[cfg(test)]
    pub(crate) fn footprint_bytes(&self) -> usize {
        self.hist.distinct_values() * std::mem::size_of::<u64>()
    }
}

/// What one connection saw.
#[derive(Default)]
struct ConnReport {
    sent: u64,
    /// `conn conn_seq ack` lines (kept only for `--acks-out`).
    acks: Vec<String>,
    retries: u64,
    errors: BTreeMap<String, u64>,
    /// Lines of acknowledged batches (`--mode write`).
    lines: u64,
}

/// One connection's series for `--mode write`: `demo,host=h<conn> value=<v> <ts_ms>`
/// lines, timestamps 1 ms apart, increasing across batches.
pub struct LineBatches {
    prefix: Vec<u8>,
    values: LoadValues,
    next_ts: u64,
}

impl LineBatches {
    /// Connection `conn`'s series, its first timestamp `start_ms`.
    pub fn new(conn: u64, values: LoadValues, start_ms: u64) -> LineBatches {
        LineBatches {
            prefix: format!("demo,host=h{conn} value=").into_bytes(),
            values,
            next_ts: start_ms,
        }
    }

    /// The next `lines` lines, each ending in a newline.
    pub fn next_batch(&mut self, lines: u64, rng: &mut impl Rng) -> Vec<u8> {
        let mut out = Vec::with_capacity(lines as usize * (self.prefix.len() + 36));
        for _ in 0..lines {
            out.extend_from_slice(&self.prefix);
            match self.values {
                LoadValues::Demo => push_u64(&mut out, rng.random_range(10..=25)),
                LoadValues::Random => {
                    // serde_json writes the shortest round-trip form (ryu), about twice as
                    // fast as `Display` here; below 1e-5 it uses an exponent (`1.5e-6`),
                    // which line protocol allows.
                    let v = rng.random::<f64>() * 100.0;
                    let _ = serde_json::to_writer(&mut out, &v);
                }
                LoadValues::Constant => out.push(b'1'),
            }
            out.push(b' ');
            push_u64(&mut out, self.next_ts);
            out.push(b'\n');
            self.next_ts += 1;
        }
        out
    }
}

fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// A request body: a JSON record or job, or a batch of line protocol.
enum Body {
    Json(Value),
    Lines(Bytes),
}

fn plan(args: &LoadArgs) -> anyhow::Result<Plan> {
    let base = reqwest::Url::parse(&args.target)
        .with_context(|| format!("--target {:?} is not a URL", args.target))?;
    if !matches!(base.scheme(), "http" | "https") {
        bail!("--target must be an http:// URL, not {:?}", base.scheme());
    }
    if !args.delay_range.is_finite() || args.delay_range < 0.0 || args.delay_range > 3600.0 {
        bail!("--delay-range must be between 0 and 3600 seconds");
    }
    let (path, kind, params) = match args.mode {
        LoadMode::Events => ("/v1/events", String::new(), Value::Null),
        LoadMode::Jobs => {
            let Some(kind) = args.kind.clone() else {
                bail!("--mode jobs needs --kind (e.g. --kind stats.global_mean)");
            };
            let params: Value =
                serde_json::from_str(&args.params).context("--params is not valid JSON")?;
            if !params.is_object() {
                bail!("--params must be a JSON object");
            }
            ("/v1/jobs", kind, params)
        }
        LoadMode::Write => ("/write?precision=ms", String::new(), Value::Null),
    };
    let url = base
        .join(path)
        .with_context(|| format!("joining {path} to --target"))?;
    Ok(Plan {
        url,
        mode: args.mode,
        per_connection: args.connection_value,
        delay_range: Duration::from_secs_f64(args.delay_range),
        kind,
        params,
        timeout: Duration::from_secs(args.timeout_s),
        max_retries: args.max_retries,
        token: args.auth_token.as_ref().map(|s| s.0.clone()),
        batch_lines: args.batch_lines,
        values: args.values,
        start_ms: u64::try_from(crate::now_ms())
            .unwrap_or(0)
            .saturating_sub(args.connection_value.saturating_mul(args.batch_lines)),
        keep_acks: args.acks_out.is_some(),
    })
}

pub fn run(args: &LoadArgs) -> anyhow::Result<()> {
    let plan = Arc::new(plan(args)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let total = args.connection_count.saturating_mul(args.connection_value);
    let bar = if !args.quiet && std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(if args.mode == LoadMode::Write {
            "{elapsed_precise} [{bar:40}] {pos}/{len} batches ({per_sec}) {msg}"
        } else {
            "{elapsed_precise} [{bar:40}] {pos}/{len} records ({per_sec}) {msg}"
        }) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let latencies = Arc::new(Mutex::new(Latencies::new()));
    let started = Instant::now();
    let reports = rt.block_on(async {
        let mut tasks = Vec::with_capacity(args.connection_count as usize);
        for conn in 1..=args.connection_count {
            let client = reqwest::Client::builder()
                .timeout(plan.timeout)
                .pool_max_idle_per_host(1)
                .build()
                .context("building the HTTP client")?;
            tasks.push(tokio::spawn(connection(
                conn,
                plan.clone(),
                client,
                bar.clone(),
                latencies.clone(),
            )));
        }
        let mut reports = Vec::with_capacity(tasks.len());
        for t in tasks {
            reports.push(t.await.context("a connection task failed")?);
        }
        anyhow::Ok(reports)
    })?;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let summary = summarize(args, &reports, &latencies.lock(), elapsed);
    if let Some(path) = &args.acks_out {
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("creating --acks-out {}", path.display()))?,
        );
        for r in &reports {
            for line in &r.acks {
                writeln!(out, "{line}")?;
            }
        }
        out.flush()
            .with_context(|| format!("writing --acks-out {}", path.display()))?;
    }
    if args.json {
        println!("{summary}");
    } else {
        print_text(&summary);
    }
    let (sent, acked) = (summary["sent"].as_u64(), summary["acknowledged"].as_u64());
    if sent != acked {
        bail!(
            "{} of {} records were not acknowledged",
            sent.unwrap_or(0).saturating_sub(acked.unwrap_or(0)),
            sent.unwrap_or(0)
        );
    }
    Ok(())
}

async fn connection(
    conn: u64,
    plan: Arc<Plan>,
    client: reqwest::Client,
    bar: ProgressBar,
    latencies: Arc<Mutex<Latencies>>,
) -> ConnReport {
    let mut report = ConnReport::default();
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let mut lines = LineBatches::new(conn, plan.values, plan.start_ms);
    for conn_seq in 1..=plan.per_connection {
        let delay = plan.delay_range.mul_f64(rng.random::<f64>());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let body = match plan.mode {
            LoadMode::Events => Body::Json(json!({
                "conn": conn,
                "seq": conn_seq,
                "value": rng.random_range(0..1_000_000i64),
                "sent_at": crate::now_ms(),
            })),
            LoadMode::Jobs => Body::Json(json!({ "kind": plan.kind, "params": plan.params })),
            LoadMode::Write => {
                Body::Lines(Bytes::from(lines.next_batch(plan.batch_lines, &mut rng)))
            }
        };
        report.sent += 1;
        let started = Instant::now();
        let mut retries = 0;
        let outcome = loop {
            let mut req = client.post(plan.url.clone());
            req = match &body {
                Body::Json(v) => req.json(v),
                Body::Lines(b) => req
                    .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                    .body(b.clone()),
            };
            if let Some(t) = &plan.token {
                req = req.bearer_auth(t);
            }
            match req.send().await {
                Ok(res) if res.status().is_success() && plan.mode == LoadMode::Write => {
                    // 204 on tally and VictoriaMetrics; drain any body to reuse the connection.
                    match res.bytes().await {
                        Ok(_) => break Ok(plan.batch_lines.to_string()),
                        Err(e) => break Err(format!("reading the answer: {}", short(&e))),
                    }
                }
                Ok(res) if res.status().is_success() => match res.json::<Value>().await {
                    Ok(v) => {
                        break ack_of(plan.mode, &v).ok_or_else(|| format!("unexpected answer {v}"))
                    }
                    Err(e) => break Err(format!("reading the answer: {}", short(&e))),
                },
                Ok(res)
                    if res.status() == StatusCode::SERVICE_UNAVAILABLE
                        && retries < plan.max_retries =>
                {
                    retries += 1;
                    report.retries += 1;
                    let wait = res
                        .headers()
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map_or(Duration::from_secs(1), Duration::from_secs)
                        .min(MAX_RETRY_AFTER);
                    tokio::time::sleep(wait).await;
                }
                Ok(res) => break Err(format!("HTTP {}", res.status().as_u16())),
                Err(e) => break Err(short(&e)),
            }
        };
        match outcome {
            Ok(ack) => {
                if plan.mode == LoadMode::Write {
                    report.lines += plan.batch_lines;
                }
                let took = started.elapsed();
                latencies.lock().record(took);
                if plan.keep_acks {
                    report.acks.push(format!("{conn} {conn_seq} {ack}"));
                }
            }
            Err(kind) => *report.errors.entry(kind).or_default() += 1,
        }
        bar.inc(1);
    }
    report
}

/// The acknowledgement in an answer: the event's `seq`, or the job's `id`.
fn ack_of(mode: LoadMode, v: &Value) -> Option<String> {
    match mode {
        LoadMode::Events => {
            (v["asyncAnswer"] == "Ok").then_some(())?;
            v["seq"].as_u64().map(|s| s.to_string())
        }
        LoadMode::Jobs => v["id"].as_str().map(str::to_string),
        LoadMode::Write => None,
    }
}

/// A request error without the URL, so that errors group by kind.
fn short(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection refused or reset"
    } else if e.is_decode() {
        "bad answer body"
    } else if e.is_body() || e.is_request() {
        "request failed (connection closed?)"
    } else {
        "HTTP error"
    };
    what.to_string()
}

fn summarize(args: &LoadArgs, reports: &[ConnReport], lat: &Latencies, elapsed: Duration) -> Value {
    let sent: u64 = reports.iter().map(|r| r.sent).sum();
    let acked = lat.count();
    let retries: u64 = reports.iter().map(|r| r.retries).sum();
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for r in reports {
        for (k, n) in &r.errors {
            *kinds.entry(k.clone()).or_default() += n;
        }
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    let lines: u64 = reports.iter().map(|r| r.lines).sum();
    let mut s = json!({
        "mode": match args.mode {
            LoadMode::Events => "events",
            LoadMode::Jobs => "jobs",
            LoadMode::Write => "write",
        },
        "target": args.target,
        "connections": args.connection_count,
        "per_connection": args.connection_value,
        "sent": sent,
        "acknowledged": acked,
        "errors": sent - acked,
        "retries_503": retries,
        "error_kinds": kinds,
        "elapsed_s": round(secs),
        "throughput_per_s": round(acked as f64 / secs),
        "latency_ms": {
            "p50": round(lat.percentile_ms(0.50)),
            "p90": round(lat.percentile_ms(0.90)),
            "p99": round(lat.percentile_ms(0.99)),
            "max": round(lat.max_ms()),
        },
    });
    if args.mode == LoadMode::Write {
        s["batch_lines"] = json!(args.batch_lines);
        s["lines_acknowledged"] = json!(lines);
        s["lines_per_s"] = json!(round(lines as f64 / secs));
    }
    s
}

fn print_text(s: &Value) {
    let l = &s["latency_ms"];
    println!(
        "{} mode against {}: {} connections x {} records",
        s["mode"].as_str().unwrap_or(""),
        s["target"].as_str().unwrap_or(""),
        s["connections"],
        s["per_connection"]
    );
    println!(
        "sent {}  acknowledged {}  errors {}  503 retries {}",
        s["sent"], s["acknowledged"], s["errors"], s["retries_503"]
    );
    if let Some(kinds) = s["error_kinds"].as_object() {
        for (k, n) in kinds {
            println!("  {n} x {k}");
        }
    }
    println!(
        "elapsed {} s  throughput {} acknowledged/s",
        s["elapsed_s"], s["throughput_per_s"]
    );
    println!(
        "latency ms  p50 {}  p90 {}  p99 {}  max {}",
        l["p50"], l["p90"], l["p99"], l["max"]
    );
    if s["mode"] == "write" {
        println!(
            "lines acknowledged {} ({} per batch)  {} lines/s (samples/s)",
            s["lines_acknowledged"], s["batch_lines"], s["lines_per_s"]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_batch_parses_into_exactly_its_lines_with_increasing_timestamps() {
        use crate::series::line_protocol::{parse_lines, FieldValue, Precision};
        let mut rng = SmallRng::seed_from_u64(7);
        for values in [LoadValues::Demo, LoadValues::Random, LoadValues::Constant] {
            let mut gen = LineBatches::new(3, values, 1_700_000_000_000);
            let mut points: Vec<(String, i64, f64)> = Vec::new();
            for _ in 0..2 {
                let batch = gen.next_batch(1000, &mut rng);
                let summary = parse_lines(&batch, Precision::Milliseconds, 0, |p| {
                    let v = match p.value() {
                        FieldValue::Float(v) => v,
                        other => panic!("not a float: {other:?}"),
                    };
                    points.push((p.series_key(), p.timestamp_ms(), v));
                });
                assert_eq!(
                    (summary.points, summary.error_lines),
                    (1000, 0),
                    "{values:?}"
                );
            }
            assert_eq!(points.len(), 2000);
            assert!(points.iter().all(|p| p.0 == "demo,host=h3:value"));
            assert!(points.windows(2).all(|w| w[1].1 == w[0].1 + 1));
            assert_eq!(points[0].1, 1_700_000_000_000);
            let ok = |v: f64| match values {
                LoadValues::Demo => v.fract() == 0.0 && (10.0..=25.0).contains(&v),
                LoadValues::Random => (0.0..100.0).contains(&v),
                LoadValues::Constant => v == 1.0,
            };
            assert!(points.iter().all(|p| ok(p.2)), "{values:?}");
        }
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let mut l = Latencies::new();
        assert_eq!((l.percentile_ms(0.5), l.max_ms(), l.count()), (0.0, 0.0, 0));
        // Below 2 ms the histogram is exact to the microsecond.
        for us in 1..=100 {
            l.record(Duration::from_micros(us * 10));
        }
        assert_eq!(l.percentile_ms(0.5), 0.5);
        assert_eq!(l.percentile_ms(0.99), 0.99);
        assert_eq!(l.percentile_ms(1.0), 1.0);
        assert_eq!((l.max_ms(), l.count()), (1.0, 100));
    }

    /// The exact nearest-rank `q` quantile of `sorted`.
    fn exact(sorted: &[u64], q: f64) -> f64 {
        sorted[crate::metrics::nearest_rank(sorted.len(), q)] as f64
    }

    #[test]
    fn a_million_latencies_take_fixed_memory_and_percentiles_within_a_percent() {
        let n = 1_000_000u64;
        // Two known distributions, in microseconds: uniform over 1 µs .. 1 s, and
        // exponential with a 20 ms mean (its quantile function at evenly spaced points),
        // recorded in a scrambled order.
        let uniform: Vec<u64> = (1..=n).collect();
        let exponential: Vec<u64> = (0..n)
            .map(|i| (-(1.0 - (i as f64 + 0.5) / n as f64).ln() * 20_000.0).round() as u64)
            .collect();
        for values in [uniform, exponential] {
            let mut l = Latencies::new();
            let footprint = l.footprint_bytes();
            assert!(footprint < 256 * 1024, "{footprint} bytes");
            let mut order: Vec<usize> = (0..values.len()).collect();
            order.sort_by_key(|&i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            for (k, &i) in order.iter().enumerate() {
                l.record(Duration::from_micros(values[i]));
                if k % 100_000 == 0 {
                    assert_eq!(l.footprint_bytes(), footprint, "after {k} samples");
                }
            }
            assert_eq!(l.footprint_bytes(), footprint);
            assert_eq!(l.count(), n);
            let mut sorted = values.clone();
            sorted.sort_unstable();
            for q in [0.5, 0.9, 0.99] {
                let want = exact(&sorted, q) / 1000.0;
                let got = l.percentile_ms(q);
                assert!(
                    (got - want).abs() <= want * 0.01,
                    "q {q}: {got} ms, exactly {want} ms"
                );
            }
            assert_eq!(l.max_ms(), *sorted.last().unwrap() as f64 / 1000.0);
            // Past the histogram's range (1 h) it saturates instead of growing.
            l.record(Duration::from_secs(10 * 3600));
            assert_eq!(l.footprint_bytes(), footprint, "after a 10 h sample");
        }
    }

    #[test]
    fn an_event_ack_needs_async_answer_ok_and_a_seq() {
        assert_eq!(
            ack_of(LoadMode::Events, &json!({"asyncAnswer": "Ok", "seq": 7})),
            Some("7".into())
        );
        assert_eq!(ack_of(LoadMode::Events, &json!({"seq": 7})), None);
        assert_eq!(
            ack_of(LoadMode::Jobs, &json!({"id": "job_id_3"})),
            Some("job_id_3".into())
        );
    }
}
