//! Polled sources: each upstream poller is an independent task that asks an HTTP URL for
//! a number every `interval` (up to `concurrency` requests in flight, so a slow upstream
//! does not cap the rate; a timeout per request) and stores each good answer as a point
//! `(time of the answer in ms, value)` in its series.
//!
//! Every poller runs under a supervisor: when the poll loop returns an error or panics,
//! it is restarted after an exponential backoff (100 ms doubling to 30 s, back to 100 ms
//! once a run stayed up a minute). Failed requests (connection errors, non-2xx, bad bodies,
//! timeouts) are counted and logged (rate-limited) and never end the loop.
//!
//! `https://` URLs are fetched over rustls (ring), verified against the system's root
//! certificates, or those of `SSL_CERT_FILE` / `SSL_CERT_DIR` when either is set (the
//! convention of OpenSSL and rustls-native-certs). Without any usable root the client is
//! still built, with a warning: http sources work, and an https source's requests fail,
//! like a certificate that does not verify, with the reason (`invalid peer certificate:
//! UnknownIssuer`) in its `last_error`, the log and `tally_source_requests_total`.
//!
//! Configuration comes from `--source NAME=URL` flags and from the `[[source]]` tables of
//! `--config FILE` (TOML); [`load_specs`] validates both at start-up. `panic_after` is a
//! test-only knob (refused without `--enable-test-jobs`): the poll loop panics after that
//! many polls of each run, to exercise the supervisor.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::store::{validate_name, SeriesStore};
use crate::metrics::{Metrics, SourceLabels};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceOutcomeLabels {
    source: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceStateLabels {
    source: String,
    state: String,
}

/// The pollers' metric families (`tally_source_*`); `source` is a configured source name.
#[derive(Default)]
struct SourceMetrics {
    requests: Family<SourceOutcomeLabels, Counter>,
    state: Family<SourceStateLabels, Gauge>,
    restarts: Family<SourceLabels, Counter>,
}

impl SourceMetrics {
    fn register(m: &Metrics) -> Self {
        SourceMetrics {
            requests: m.add(
                "source_requests",
                "Requests of the polled sources, by source and outcome (ok, error, timeout, bad_body)",
            ),
            state: m.add(
                "source_state",
                "1 for the current supervision state of each polled source (running, restarting)",
            ),
            restarts: m.add(
                "source_restarts",
                "Restarts of a polled source after its poll loop failed or panicked",
            ),
        }
    }
}

/// Smallest poll interval accepted.
pub const MIN_INTERVAL_MS: u64 = 10;
/// Most requests in flight per source.
pub const MAX_CONCURRENCY: u64 = 256;
/// First restart delay; doubled at each restart up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run that stayed up this long resets the backoff.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// At most one failed-request warning per source in this period (the rest are counted).
const WARN_EVERY: Duration = Duration::from_secs(5);

/// One validated upstream poller.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSpec {
    pub name: String,
    pub url: String,
    /// `url` with its password, if any, replaced by `***`: what logs and the API show.
    pub shown_url: String,
    pub interval: Duration,
    pub concurrency: usize,
    pub timeout: Duration,
    /// Dot path of the number in a JSON body; `None`: the body is the number.
    pub field: Option<String>,
    /// Series the points go to (default: the source's name).
    pub series: String,
    /// Test-only: panic after this many polls of each run.
    pub panic_after: Option<u64>,
}

/// Settings of the sources given by `--source` flags.
#[derive(Debug, Clone)]
pub struct FlagDefaults {
    pub interval_ms: u64,
    pub concurrency: u64,
    pub timeout_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceConfigError {
    #[error("--config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("--source {0:?}: expected NAME=URL")]
    FlagSyntax(String),
    #[error("source `{name}`: {field}: {problem}")]
    Invalid {
        name: String,
        field: &'static str,
        problem: String,
    },
    #[error("source `{0}` is defined more than once; names must be unique")]
    Duplicate(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    source: Vec<FileSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSource {
    name: String,
    url: String,
    interval_ms: Option<u64>,
    concurrency: Option<u64>,
    timeout_ms: Option<u64>,
    field: Option<String>,
    series: Option<String>,
    panic_after: Option<u64>,
}

fn invalid(name: &str, field: &'static str, problem: impl Into<String>) -> SourceConfigError {
    SourceConfigError::Invalid {
        name: name.to_string(),
        field,
        problem: problem.into(),
    }
}

/// Validates one source; `test_knobs` allows `panic_after`.
fn validate(raw: FileSource, test_knobs: bool) -> Result<SourceSpec, SourceConfigError> {
    let name = raw.name;
    if name.is_empty() {
        return Err(invalid(&name, "name", "must not be empty"));
    }
    validate_name(&name).map_err(|e| invalid(&name, "name", e.to_string()))?;
    let url = reqwest::Url::parse(&raw.url)
        .map_err(|e| invalid(&name, "url", format!("`{}`: {e}", raw.url)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(
            &name,
            "url",
            format!(
                "scheme `{}` is not supported (only http and https)",
                url.scheme()
            ),
        ));
    }
    let interval_ms = raw.interval_ms.unwrap_or(1000);
    if interval_ms < MIN_INTERVAL_MS {
        return Err(invalid(
            &name,
            "interval_ms",
            format!("{interval_ms} is below the minimum of {MIN_INTERVAL_MS}"),
        ));
    }
    let concurrency = raw.concurrency.unwrap_or(4);
    if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
        return Err(invalid(
            &name,
            "concurrency",
            format!("{concurrency} is outside 1..={MAX_CONCURRENCY}"),
        ));
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(5000);
    if timeout_ms == 0 {
        return Err(invalid(&name, "timeout_ms", "must be at least 1"));
    }
    if let Some(f) = &raw.field {
        if f.is_empty() || f.split('.').any(str::is_empty) {
            return Err(invalid(
                &name,
                "field",
                format!("`{f}` is not a dot path like `data.value`"),
            ));
        }
    }
    let series = raw.series.unwrap_or_else(|| name.clone());
    validate_name(&series).map_err(|e| invalid(&name, "series", e.to_string()))?;
    if raw.panic_after.is_some() && !test_knobs {
        return Err(invalid(
            &name,
            "panic_after",
            "is a test-only option; it needs --enable-test-jobs",
        ));
    }
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    Ok(SourceSpec {
        name,
        url: url.to_string(),
        shown_url: shown.to_string(),
        interval: Duration::from_millis(interval_ms),
        concurrency: concurrency as usize,
        timeout: Duration::from_millis(timeout_ms),
        field: raw.field,
        series,
        panic_after: raw.panic_after,
    })
}

/// Parses the `[[source]]` tables of a TOML configuration text.
pub fn parse_config(
    path: &Path,
    text: &str,
    test_knobs: bool,
) -> Result<Vec<SourceSpec>, SourceConfigError> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| SourceConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    file.source
        .into_iter()
        .map(|s| validate(s, test_knobs))
        .collect()
}

/// Every configured source: the `--source NAME=URL` flags (with `defaults`), then the
/// `[[source]]` tables of `config`; names must be unique across both.
pub fn load_specs(
    flags: &[String],
    defaults: &FlagDefaults,
    config: Option<&Path>,
    test_knobs: bool,
) -> Result<Vec<SourceSpec>, SourceConfigError> {
    let mut specs = Vec::new();
    for flag in flags {
        let (name, url) = flag
            .split_once('=')
            .filter(|(n, u)| !n.is_empty() && !u.is_empty())
            .ok_or_else(|| SourceConfigError::FlagSyntax(flag.clone()))?;
        specs.push(validate(
            FileSource {
                name: name.to_string(),
                url: url.to_string(),
                interval_ms: Some(defaults.interval_ms),
                concurrency: Some(defaults.concurrency),
                timeout_ms: Some(defaults.timeout_ms),
                field: None,
                series: None,
                panic_after: None,
            },
            test_knobs,
        )?);
    }
    if let Some(path) = config {
        let text = std::fs::read_to_string(path).map_err(|source| SourceConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        specs.extend(parse_config(path, &text, test_knobs)?);
    }
    let mut seen = HashSet::new();
    for s in &specs {
        if !seen.insert(s.name.as_str()) {
            return Err(SourceConfigError::Duplicate(s.name.clone()));
        }
    }
    Ok(specs)
}

/// Why a body is not a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the body is not a number: {0:?}")]
    NotANumber(String),
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("field `{0}` is missing or not a finite number")]
    Field(String),
}

/// The value of an answer: the trimmed body as a number, or with `field` the number at
/// that dot path of a JSON body (a JSON string holding a number is accepted too).
pub fn parse_body(body: &str, field: Option<&str>) -> Result<f64, BodyError> {
    let text = body.trim();
    let Some(field) = field else {
        return text
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| BodyError::NotANumber(text.chars().take(64).collect()));
    };
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| BodyError::NotJson(e.to_string()))?;
    let mut at = &json;
    for part in field.split('.') {
        at = at
            .get(part)
            .ok_or_else(|| BodyError::Field(field.to_string()))?;
    }
    match at {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|v| v.is_finite())
    .ok_or_else(|| BodyError::Field(field.to_string()))
}

/// Why a run of the poll loop ended (it is then restarted).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("building the HTTP client: {0}")]
    Client(String),
}

/// Supervision state of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    Running,
    Restarting,
}

impl SourceState {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Running => "running",
            SourceState::Restarting => "restarting",
        }
    }
}

/// What `GET /v1/sources` shows of one source.
#[derive(Debug, Clone)]
pub struct SourceInfo {
    pub name: String,
    pub url: String,
    pub series: String,
    pub state: SourceState,
    pub restarts: u64,
    pub last_error: Option<String>,
    /// Milliseconds since the epoch of the last good answer.
    pub last_success_ms: Option<i64>,
    pub last_value: Option<f64>,
    /// Points this source stored.
    pub points: u64,
}

#[derive(Debug)]
struct Status {
    state: SourceState,
    restarts: u64,
    last_error: Option<String>,
    last_success_ms: Option<i64>,
    last_value: Option<f64>,
    last_warn: Option<Instant>,
    suppressed_warnings: u64,
}

struct Entry {
    spec: SourceSpec,
    status: Mutex<Status>,
    points: AtomicU64,
}

/// Request outcomes, as counted in `tally_source_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Error,
    Timeout,
    BadBody,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::BadBody => "bad_body",
        }
    }
}

struct Shared {
    entry: Arc<Entry>,
    store: Arc<SeriesStore>,
    metrics: Arc<SourceMetrics>,
}

impl Shared {
    fn set_state(&self, state: SourceState) {
        self.entry.status.lock().state = state;
        for s in [SourceState::Running, SourceState::Restarting] {
            self.metrics
                .state
                .get_or_create(&SourceStateLabels {
                    source: self.entry.spec.name.clone(),
                    state: s.as_str().to_string(),
                })
                .set(i64::from(s == state));
        }
    }

    fn count(&self, outcome: Outcome) {
        self.metrics
            .requests
            .get_or_create(&SourceOutcomeLabels {
                source: self.entry.spec.name.clone(),
                outcome: outcome.as_str().to_string(),
            })
            .inc();
    }

    /// Records a failed request: counted, kept as `last_error`, warned at most once per
    /// [`WARN_EVERY`].
    fn failed(&self, outcome: Outcome, error: String) {
        self.count(outcome);
        let mut st = self.entry.status.lock();
        let now = Instant::now();
        let warn = st
            .last_warn
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY);
        let suppressed = st.suppressed_warnings;
        if warn {
            st.last_warn = Some(now);
            st.suppressed_warnings = 0;
        } else {
            st.suppressed_warnings += 1;
        }
        st.last_error = Some(error.clone());
        drop(st);
        if warn {
            tracing::warn!(
                source = %self.entry.spec.name,
                outcome = outcome.as_str(),
                error = %error,
                suppressed,
                "source request failed"
            );
        }
    }

    fn succeeded(&self, value: f64) {
        let now = crate::now_ms();
        let r = self
            .store
            .insert(&self.entry.spec.series, &[(now, value)], now);
        self.count(Outcome::Ok);
        if r.accepted > 0 {
            self.entry.points.fetch_add(r.accepted, Ordering::Relaxed);
            self.store.metrics().accepted("upstream", r.accepted);
        }
        let mut st = self.entry.status.lock();
        st.last_success_ms = Some(now);
        st.last_value = Some(value);
    }
}

/// The configured pollers and their supervision state.
pub struct Sources {
    entries: Vec<Arc<Entry>>,
    store: Arc<SeriesStore>,
    metrics: Arc<SourceMetrics>,
}

impl Sources {
    /// Registers the `tally_source_*` families on `metrics`.
    pub fn new(specs: Vec<SourceSpec>, store: Arc<SeriesStore>, metrics: &Metrics) -> Self {
        let entries = specs
            .into_iter()
            .map(|spec| {
                Arc::new(Entry {
                    spec,
                    status: Mutex::new(Status {
                        state: SourceState::Restarting,
                        restarts: 0,
                        last_error: None,
                        last_success_ms: None,
                        last_value: None,
                        last_warn: None,
                        suppressed_warnings: 0,
                    }),
                    points: AtomicU64::new(0),
                })
            })
            .collect();
        Sources {
            entries,
            store,
            metrics: Arc::new(SourceMetrics::register(metrics)),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every source, in configuration order.
    pub fn list(&self) -> Vec<SourceInfo> {
        self.entries
            .iter()
            .map(|e| {
                let st = e.status.lock();
                SourceInfo {
                    name: e.spec.name.clone(),
                    url: e.spec.shown_url.clone(),
                    series: e.spec.series.clone(),
                    state: st.state,
                    restarts: st.restarts,
                    last_error: st.last_error.clone(),
                    last_success_ms: st.last_success_ms,
                    last_value: st.last_value,
                    points: e.points.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// One supervisor per source, to be spawned by the caller; they end once `stop` is
    /// cancelled.
    pub fn supervisors(
        &self,
        stop: &CancellationToken,
    ) -> Vec<impl std::future::Future<Output = ()> + Send + 'static> {
        if !self.entries.is_empty() {
            report_roots();
        }
        self.entries
            .iter()
            .map(|entry| {
                let shared = Arc::new(Shared {
                    entry: entry.clone(),
                    store: self.store.clone(),
                    metrics: self.metrics.clone(),
                });
                tracing::info!(
                    source = %entry.spec.name,
                    url = %entry.spec.shown_url,
                    interval_ms = entry.spec.interval.as_millis() as u64,
                    concurrency = entry.spec.concurrency,
                    "polling source"
                );
                // Present (at 0) from the start, so dashboards see every source.
                let _ = self.metrics.restarts.get_or_create(&SourceLabels {
                    source: entry.spec.name.clone(),
                });
                supervise(shared, stop.clone())
            })
            .collect()
    }
}

/// The delay before the next restart, given the last one.
pub fn next_backoff(last: Option<Duration>) -> Duration {
    match last {
        None => MIN_BACKOFF,
        Some(d) => d.saturating_mul(2).min(MAX_BACKOFF),
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            format!("panicked: {msg}")
        }
        Err(e) => format!("task ended: {e}"),
    }
}

async fn supervise(shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff: Option<Duration> = None;
    loop {
        if stop.is_cancelled() {
            return;
        }
        shared.set_state(SourceState::Running);
        let started = Instant::now();
        let mut run = tokio::spawn(poll_loop(shared.clone(), stop.clone()));
        let ended = tokio::select! {
            r = &mut run => r,
            _ = stop.cancelled() => {
                // The loop sees the same signal; give it a moment, then cut it off.
                if tokio::time::timeout(Duration::from_secs(1), &mut run).await.is_err() {
                    run.abort();
                }
                return;
            }
        };
        let error = match ended {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => panic_message(e),
        };
        if started.elapsed() >= HEALTHY_RUN {
            backoff = None;
        }
        let delay = next_backoff(backoff);
        backoff = Some(delay);
        {
            let mut st = shared.entry.status.lock();
            st.restarts += 1;
            st.last_error = Some(error.clone());
        }
        shared.set_state(SourceState::Restarting);
        shared
            .metrics
            .restarts
            .get_or_create(&SourceLabels {
                source: shared.entry.spec.name.clone(),
            })
            .inc();
        tracing::warn!(
            source = %shared.entry.spec.name,
            error = %error,
            backoff_ms = delay.as_millis() as u64,
            "source failed; restarting"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// One run: a request every interval, at most `concurrency` in flight. Returns `Ok` once
/// `stop` is cancelled. In-flight requests are aborted when the run ends.
async fn poll_loop(shared: Arc<Shared>, stop: CancellationToken) -> Result<(), SourceError> {
    let spec = &shared.entry.spec;
    let client = http_client(spec.timeout)?;
    let permits = Arc::new(Semaphore::new(spec.concurrency));
    let mut ticker = tokio::time::interval(spec.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut inflight = JoinSet::new();
    let mut polls: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return Ok(()),
        }
        while inflight.try_join_next().is_some() {}
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return Ok(()),
            },
            _ = stop.cancelled() => return Ok(()),
        };
        polls += 1;
        if spec.panic_after.is_some_and(|n| polls > n) {
            panic!("panic_after: {} polls (test-only knob)", polls - 1);
        }
        let (shared, client) = (shared.clone(), client.clone());
        inflight.spawn(async move {
            let _permit = permit;
            poll_once(&shared, &client).await;
        });
    }
}

/// Says once per process, as the sources start, which root certificates https sources
/// verify against: how many were found where, and every file that could not be read.
/// reqwest loads the same store itself (`rustls-tls-native-roots`, at each client build),
/// but keeps quiet when it is empty or partly unreadable.
fn report_roots() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let found = rustls_native_certs::load_native_certs();
        let from = match (
            std::env::var_os("SSL_CERT_FILE"),
            std::env::var_os("SSL_CERT_DIR"),
        ) {
            (None, None) => "the system's store",
            _ => "SSL_CERT_FILE / SSL_CERT_DIR",
        };
        for e in &found.errors {
            tracing::warn!(error = %e, from, "reading the root certificates");
        }
        if found.certs.is_empty() {
            tracing::warn!(
                from,
                "no root certificates found: https sources will fail to verify \
                 (install the system's CA certificates, or set SSL_CERT_FILE)"
            );
        } else {
            tracing::info!(
                count = found.certs.len(),
                from,
                "https sources verify against these root certificates"
            );
        }
    });
}

/// The HTTP client of one poll loop: rustls with the roots [`report_roots`] describes. A
/// store in which no certificate parses makes reqwest refuse to build; the client is then
/// built without those roots (https cannot verify, http works) rather than not at all.
fn http_client(timeout: Duration) -> Result<reqwest::Client, SourceError> {
    let builder = || reqwest::Client::builder().timeout(timeout);
    match builder().build() {
        Ok(client) => Ok(client),
        Err(e) => {
            static ONCE: Once = Once::new();
            let error = chain(e);
            ONCE.call_once(|| {
                tracing::warn!(
                    error = %error,
                    "no usable root certificate, the HTTP client is built without: \
                     https sources will fail to verify"
                );
            });
            builder()
                .tls_built_in_native_certs(false)
                .build()
                .map_err(|e| SourceError::Client(chain(e)))
        }
    }
}

/// An error and its causes, `a: b: c`, without the URL (it may hold a password). A cause
/// already in the text so far is skipped (reqwest and hyper repeat their inner errors).
fn chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

async fn poll_once(shared: &Shared, client: &reqwest::Client) {
    let spec = &shared.entry.spec;
    let res = match client.get(&spec.url).send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => {
            return shared.failed(
                Outcome::Timeout,
                format!("timed out after {:?}", spec.timeout),
            )
        }
        Err(e) => return shared.failed(Outcome::Error, format!("request failed: {}", chain(e))),
    };
    let status = res.status();
    if !status.is_success() {
        return shared.failed(Outcome::Error, format!("upstream answered HTTP {status}"));
    }
    let body = match res.text().await {
        Ok(b) => b,
        Err(e) if e.is_timeout() => {
            return shared.failed(
                Outcome::Timeout,
                format!("timed out after {:?}", spec.timeout),
            )
        }
        Err(e) => return shared.failed(Outcome::Error, format!("reading the body: {}", chain(e))),
    };
    match parse_body(&body, spec.field.as_deref()) {
        Ok(v) => shared.succeeded(v),
        Err(e) => shared.failed(Outcome::BadBody, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> FlagDefaults {
        FlagDefaults {
            interval_ms: 1000,
            concurrency: 4,
            timeout_ms: 5000,
        }
    }

    fn flags(f: &[&str]) -> Result<Vec<SourceSpec>, SourceConfigError> {
        let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
        load_specs(&f, &defaults(), None, false)
    }

    fn config(text: &str, test_knobs: bool) -> Result<Vec<SourceSpec>, String> {
        parse_config(Path::new("tally.toml"), text, test_knobs).map_err(|e| e.to_string())
    }

    #[test]
    fn a_flag_source_takes_the_flag_defaults_and_its_name_as_series() {
        let s = flags(&["up=http://127.0.0.1:4568/"]).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].name.as_str(), s[0].series.as_str()), ("up", "up"));
        assert_eq!(s[0].interval, Duration::from_secs(1));
        assert_eq!(
            (s[0].concurrency, s[0].timeout),
            (4, Duration::from_secs(5))
        );
    }

    #[test]
    fn bad_flags_are_refused_with_a_message_naming_the_problem() {
        let err = |f: &str| flags(&[f]).unwrap_err().to_string();
        assert!(err("nourl").contains("expected NAME=URL"));
        assert!(err("=http://x").contains("expected NAME=URL"));
        let e = err("up=ftp://x/");
        assert!(
            e.contains("source `up`: url") && e.contains("only http and https"),
            "{e}"
        );
        let s = flags(&["up=http://u:hunter2@h/"]).unwrap();
        assert_eq!(s[0].shown_url, "http://u:***@h/");
        let e = err("up=not a url");
        assert!(e.contains("source `up`: url"), "{e}");
        let e = flags(&["a=http://x/", "a=http://y/"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`a` is defined more than once"), "{e}");
    }

    #[test]
    fn a_config_file_source_is_validated_field_by_field() {
        let ok = config(
            "[[source]]\nname = \"up\"\nurl = \"https://h/v\"\ninterval_ms = 20\n\
             concurrency = 8\ntimeout_ms = 100\nfield = \"data.value\"\nseries = \"temp\"\n",
            false,
        )
        .unwrap();
        assert_eq!(ok[0].interval, Duration::from_millis(20));
        assert_eq!(ok[0].field.as_deref(), Some("data.value"));
        assert_eq!((ok[0].series.as_str(), ok[0].concurrency), ("temp", 8));
        let cases = [
            (
                "interval_ms = 9",
                "source `up`: interval_ms: 9 is below the minimum of 10",
            ),
            (
                "concurrency = 0",
                "source `up`: concurrency: 0 is outside 1..=256",
            ),
            (
                "concurrency = 257",
                "source `up`: concurrency: 257 is outside 1..=256",
            ),
            ("timeout_ms = 0", "source `up`: timeout_ms"),
            ("field = \"a..b\"", "source `up`: field"),
            (
                "panic_after = 3",
                "source `up`: panic_after: is a test-only option",
            ),
            ("colour = 1", "unknown field `colour`"),
        ];
        for (extra, want) in cases {
            let text = format!("[[source]]\nname = \"up\"\nurl = \"http://h/\"\n{extra}\n");
            let e = config(&text, false).unwrap_err();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let e = config("[[source]]\nname = \"up\"\n", false).unwrap_err();
        assert!(e.contains("tally.toml") && e.contains("url"), "{e}");
        let e = config("[[source]]\nname = \"up\"\nurl = \"gopher://h/\"\n", false).unwrap_err();
        assert!(e.contains("scheme `gopher`"), "{e}");
        let t = "[[source]]\nname = \"up\"\nurl = \"http://h/\"\npanic_after = 3\n";
        assert_eq!(config(t, true).unwrap()[0].panic_after, Some(3));
    }

    #[test]
    fn duplicate_names_across_flags_and_the_config_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tally.toml");
        std::fs::write(&path, "[[source]]\nname = \"up\"\nurl = \"http://h/\"\n").unwrap();
        let e = load_specs(&["up=http://x/".into()], &defaults(), Some(&path), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`up` is defined more than once"), "{e}");
        let missing = dir.path().join("nope.toml");
        let e = load_specs(&[], &defaults(), Some(&missing), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.toml"), "{e}");
    }

    #[test]
    fn bodies_are_plain_numbers_or_a_json_field() {
        assert_eq!(parse_body(" 17\n", None), Ok(17.0));
        assert_eq!(parse_body("2.5", None), Ok(2.5));
        assert!(matches!(
            parse_body("hello", None),
            Err(BodyError::NotANumber(_))
        ));
        assert!(matches!(
            parse_body("NaN", None),
            Err(BodyError::NotANumber(_))
        ));
        assert_eq!(parse_body(r#"{"value": 3}"#, Some("value")), Ok(3.0));
        assert_eq!(parse_body(r#"{"d": {"v": "4.5"}}"#, Some("d.v")), Ok(4.5));
        assert!(matches!(
            parse_body(r#"{"d": {}}"#, Some("d.v")),
            Err(BodyError::Field(_))
        ));
        assert!(matches!(
            parse_body("17", Some("v")),
            Err(BodyError::Field(_))
        ));
        assert!(matches!(
            parse_body("{", Some("v")),
            Err(BodyError::NotJson(_))
        ));
    }

    #[test]
    fn the_backoff_doubles_from_100_ms_to_at_most_30_s() {
        let mut d = next_backoff(None);
        assert_eq!(d, Duration::from_millis(100));
        d = next_backoff(Some(d));
        assert_eq!(d, Duration::from_millis(200));
        for _ in 0..20 {
            d = next_backoff(Some(d));
        }
        assert_eq!(d, Duration::from_secs(30));
    }
}
