//! The command line: one clap tree, parsed once in `main`, passed down explicitly.
//!
//! Every flag of `tally serve` can also be set through the environment as `TALLY_<FLAG>`
//! (`--shutdown-timeout` is `TALLY_SHUTDOWN_TIMEOUT`), which is what container
//! deployments use.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tally",
    version,
    about = "Slow, asynchronous data work as a fast, observable HTTP service"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the `Serve` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service.
    Serve(ServeConfig),
    /// Sum every N-th column of a CSV file with the service's engine; prints the JSON a
    /// `csv.column_sum` job returns.
    Sum(SumArgs),
    /// Drive a running service: concurrent connections sending events (or jobs) with
    /// random delays, a progress bar, and a summary.
    Load(LoadArgs),
    /// The slow demo upstream: `GET /` answers a random integer in [--min, --max] as
    /// plain text after --delay-ms.
    Upstream(UpstreamArgs),
}

/// What `tally load` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadMode {
    /// `POST /v1/events` records `{conn, seq, value, sent_at}`.
    Events,
    /// `POST /v1/jobs` with `--kind` and `--params`.
    Jobs,
    /// `POST /write?precision=ms`: batches of `--batch-lines` lines of Influx line
    /// protocol, one series per connection (`demo,host=h<conn> value=<v> <ts_ms>`).
    Write,
}

/// The values `tally load --mode write` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadValues {
    /// Random integers in 10..=25, like the demo upstream.
    Demo,
    /// Random floats in [0, 100).
    Random,
    /// Always 1 (so the sum of what was sent is the number of lines).
    Constant,
}

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Base URL of the service.
    #[arg(long, default_value = "http://127.0.0.1:5000")]
    pub target: String,

    /// Concurrent connections.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub connection_count: u64,

    /// Records each connection sends.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub connection_value: u64,

    /// Before each record a connection sleeps a random delay in [0, this many seconds].
    #[arg(long, default_value_t = 5.0)]
    pub delay_range: f64,

    /// What to send.
    #[arg(long, value_enum, default_value_t = LoadMode::Events)]
    pub mode: LoadMode,

    /// Job kind for `--mode jobs`.
    #[arg(long)]
    pub kind: Option<String>,

    /// Job params (a JSON object) for `--mode jobs`.
    #[arg(long, default_value = "{}")]
    pub params: String,

    /// Seconds one request may take before it counts as an error.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_s: u64,

    /// Retries of a record answered 503 (each after the server's Retry-After).
    #[arg(long, default_value_t = 10)]
    pub max_retries: u32,

    /// Bearer token, for a service started with --auth-token.
    #[arg(long, env = "TALLY_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<Secret>,

    /// Print the summary as JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// Write one line per acknowledged record to this file: `conn conn_seq seq`
    /// (events) or `conn conn_seq id` (jobs).
    #[arg(long)]
    pub acks_out: Option<PathBuf>,

    /// Never show the progress bar (it only shows when stderr is a terminal).
    #[arg(long)]
    pub quiet: bool,

    /// Lines per batch for `--mode write` (each connection sends `--connection-value`
    /// batches).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub batch_lines: u64,

    /// Values for `--mode write`.
    #[arg(long, value_enum, default_value_t = LoadValues::Demo)]
    pub values: LoadValues,
}

#[derive(Debug, Clone, Args)]
pub struct UpstreamArgs {
    /// Address to listen on.
    #[arg(long, env = "TALLY_UPSTREAM_BIND", default_value = "127.0.0.1:4568")]
    pub bind: SocketAddr,

    /// Milliseconds each answer waits (asynchronously) before it is sent.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub delay_ms: u64,

    /// Smallest value answered.
    #[arg(long, default_value_t = 10, allow_negative_numbers = true)]
    pub min: i64,

    /// Largest value answered (at least --min).
    #[arg(long, default_value_t = 25, allow_negative_numbers = true)]
    pub max: i64,

    /// Log filter (tracing's EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, env = "TALLY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

#[derive(Debug, Clone, Args)]
pub struct SumArgs {
    /// The CSV file (RFC 4180; LF or CRLF; optional UTF-8 BOM).
    pub file: PathBuf,

    /// Sum every N-th column.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub every: u64,

    /// First column summed (0-based).
    #[arg(long, default_value_t = 0)]
    pub offset: u64,

    /// Scan threads (default: the number of CPU cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub threads: Option<u64>,

    /// The first line is data, not a header (keys are then col0, col10, ...).
    #[arg(long)]
    pub no_header: bool,

    /// Never show the progress bar (it only shows when stderr is a terminal).
    #[arg(long)]
    pub quiet: bool,
}

pub use crate::store::sqlite::SqliteSync;
pub use crate::store::{RedisUrl, StoreSpec};
pub use crate::telemetry::LogFormat;

/// A bearer token that never shows up in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("the auth token must not be empty".into());
        }
        Ok(Secret(s.to_string()))
    }
}

/// `--store`'s parser: clap's own error would print the value as given, a Redis
/// password included; this one names the problem without it.
#[derive(Clone)]
struct StoreParser;

impl clap::builder::TypedValueParser for StoreParser {
    type Value = StoreSpec;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<StoreSpec, clap::Error> {
        let refuse = |why: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '--store': {why}\n"),
            )
            .with_cmd(cmd)
        };
        let s = value.to_str().ok_or_else(|| refuse("not UTF-8".into()))?;
        s.parse().map_err(refuse)
    }
}

/// Largest `--max-future-ms`: ten years of 365 days.
pub const MAX_FUTURE_MS_LIMIT: u64 = 10 * 365 * 86_400_000;

/// The headings of `tally serve --help`: every flag sits under one.
const NETWORK: &str = "Network";
const SECURITY: &str = "Security";
const STORAGE: &str = "Storage";
const JOBS: &str = "Jobs";
const SHUTDOWN: &str = "Shutdown";
const PIPELINE: &str = "Pipeline";
const SERIES: &str = "Series";
const SOURCES: &str = "Sources";
const LOGGING: &str = "Logging";

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on. Loopback by default; use 0.0.0.0:5000 to expose it.
    #[arg(help_heading = NETWORK, long, env = "TALLY_BIND", default_value = "127.0.0.1:5000")]
    pub bind: SocketAddr,

    /// CSV for the statistics API. Without it, a bundled 2,000-row sample is used.
    #[arg(help_heading = STORAGE, long, env = "TALLY_STATS_DATASET")]
    pub stats_dataset: Option<PathBuf>,

    /// Where jobs live: memory | sqlite:PATH | redis://[USER:PASSWORD@]HOST[:PORT][/DB]
    /// (Redis: shared by several replicas; a Redis Cluster node is found to be one, or
    /// say redis+cluster://).
    #[arg(help_heading = STORAGE, long, env = "TALLY_STORE", hide_env_values = true, default_value = "sqlite:tally.db", value_parser = StoreParser)]
    pub store: StoreSpec,

    /// Worker threads that run jobs (default: the number of CPU cores).
    #[arg(help_heading = JOBS, long, env = "TALLY_WORKERS", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub workers: Option<u64>,

    /// Jobs that may wait in the queue; past it, submissions get 503 with Retry-After.
    #[arg(help_heading = JOBS, long, env = "TALLY_QUEUE_CAPACITY", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub queue_capacity: u64,

    /// Seconds a job may run before it is failed as timed out (0 = no limit).
    #[arg(help_heading = JOBS, long, env = "TALLY_JOB_TIMEOUT", default_value_t = 300)]
    pub job_timeout: u64,

    /// Seconds a drain may take before the rest is left in the store for the next start.
    #[arg(help_heading = SHUTDOWN, long, env = "TALLY_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,

    /// After a drain asked for by `/api/graceful_shutdown`, keep answering reads this many
    /// milliseconds so that pollers can see the final state, then exit.
    #[arg(help_heading = SHUTDOWN, long, env = "TALLY_SHUTDOWN_LINGER_MS", default_value_t = 1000)]
    pub shutdown_linger_ms: u64,

    /// `/api/get_results` of an unfinished job waits up to this many milliseconds for it
    /// to finish before answering "running" (long polling; 0 answers at once).
    #[arg(help_heading = JOBS, long, env = "TALLY_POLL_HOLD_MS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub poll_hold_ms: u64,

    /// Write logs to this file (rotated by size) instead of standard output.
    #[arg(help_heading = LOGGING, long, env = "TALLY_LOG_FILE")]
    pub log_file: Option<PathBuf>,

    /// Rotate the log file when it reaches this many bytes.
    #[arg(help_heading = LOGGING, long, env = "TALLY_LOG_MAX_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub log_max_bytes: usize,

    /// How many rotated log files to keep.
    #[arg(help_heading = LOGGING, long, env = "TALLY_LOG_BACKUPS", default_value_t = 5)]
    pub log_backups: usize,

    /// Log filter (tracing's EnvFilter syntax); RUST_LOG overrides it.
    #[arg(help_heading = LOGGING, long, env = "TALLY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log line format: `text` (`<time> <LEVEL> <target>: <message> key=value ...`) or
    /// `json` (one object per line: `timestamp`, `level`, `fields`, `target`).
    #[arg(help_heading = LOGGING, long, env = "TALLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// When set, mutating and admin routes need `Authorization: Bearer TOKEN`.
    #[arg(help_heading = SECURITY, long, env = "TALLY_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<Secret>,

    /// Milliseconds a client has to send a whole request head: the first from the
    /// connection's start, later ones from their first byte. Past it the connection is
    /// closed without an answer (slow clients cannot hold connections).
    #[arg(help_heading = NETWORK, long, env = "TALLY_HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub http_header_timeout_ms: u64,

    /// Milliseconds a keep-alive connection may wait for its next request before it is
    /// closed. Longer than nginx's upstream keepalive_timeout (60 s), so the proxy closes
    /// first and never sends a request on a connection being closed.
    #[arg(help_heading = NETWORK, long, env = "TALLY_HTTP_IDLE_TIMEOUT_MS", default_value_t = 75_000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub http_idle_timeout_ms: u64,

    /// Open HTTP connections per listener, at most; past it a new connection is answered
    /// 503 with `Retry-After: 1` and closed.
    #[arg(help_heading = NETWORK, long, env = "TALLY_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,

    /// An origin (`scheme://host[:port]`) whose pages may send state-changing requests,
    /// e.g. a dashboard served from elsewhere (repeatable; the environment variable takes a
    /// comma-separated list). Other cross-site requests that change state get 403.
    #[arg(
        help_heading = SECURITY,
        long = "allowed-origin",
        env = "TALLY_ALLOWED_ORIGIN",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<crate::origin::AllowedOrigin>,

    /// A host name the service is reached by (`tally.example.com`, or `*.example.com` for
    /// every name below it), besides names of one label (`localhost`), loopback addresses
    /// and the addresses it listens on; needed behind a proxy or DNS name that passes its `Host` on
    /// (repeatable; the environment variable takes a comma-separated list). Requests for any
    /// other host get 421: a defence against DNS rebinding.
    #[arg(
        help_heading = SECURITY,
        long = "allowed-host",
        env = "TALLY_ALLOWED_HOST",
        value_name = "HOST",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<crate::origin::AllowedHost>,

    /// Directory of the datasets of `csv.column_sum` jobs; names resolve only inside it.
    /// Created at the first upload.
    #[arg(help_heading = STORAGE, long, env = "TALLY_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// Largest dataset accepted by `PUT /v1/datasets/{name}`, in bytes.
    #[arg(help_heading = STORAGE, long, env = "TALLY_MAX_UPLOAD_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub max_upload_bytes: u64,

    /// Largest request body accepted, in bytes.
    #[arg(help_heading = NETWORK, long, env = "TALLY_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// With `--store memory`: finished results kept before the oldest are evicted.
    #[arg(help_heading = STORAGE, long, env = "TALLY_MEMORY_MAX_RESULTS", default_value_t = 100_000)]
    pub memory_max_results: usize,

    /// How long a claimed job stays leased to its worker without a sign of life (a
    /// checkpoint or progress) before another worker may run it again.
    #[arg(help_heading = JOBS, long, env = "TALLY_LEASE_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub lease_ms: u64,

    /// How long finished jobs and their results are kept (Redis store), in seconds.
    #[arg(help_heading = JOBS, long, env = "TALLY_RESULT_TTL", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..=365 * 86_400))]
    pub result_ttl: u64,

    /// How long an `Idempotency-Key` of a submission holds, in seconds: a submission with
    /// the same key within it gets the first job instead of a new one (every store).
    #[arg(help_heading = JOBS, long, env = "TALLY_IDEMPOTENCY_TTL", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..=365 * 86_400))]
    pub idempotency_ttl: u64,

    /// Runs of a job whose lease expired before it is failed for good (a dead letter).
    #[arg(help_heading = JOBS, long, env = "TALLY_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_attempts: u32,

    /// SQLite durability of a commit.
    #[arg(help_heading = STORAGE, long, env = "TALLY_SQLITE_SYNC", value_enum, default_value_t = SqliteSync::Full)]
    pub sqlite_sync: SqliteSync,

    /// Microseconds the SQLite writer waits for more writes before a commit when writes
    /// arrive concurrently (0, the default: commit at once). A short job's outcome then
    /// more often shares the commit of its own insert, and a commit carries more jobs:
    /// worth trying where an fsync is slow next to the CPU a commit takes.
    #[arg(help_heading = STORAGE, long, env = "TALLY_SQLITE_COMMIT_DELAY_US",
          default_value_t = crate::store::sqlite::DEFAULT_COMMIT_DELAY_US,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub sqlite_commit_delay_us: u64,

    /// Enable the job kinds and routes used by tests and benchmarks (`test.sleep`,
    /// `test.panic`, `/api/noop`). Off in production.
    #[arg(help_heading = JOBS, long, env = "TALLY_ENABLE_TEST_JOBS", hide = true)]
    pub enable_test_jobs: bool,

    /// The ordered pipeline's journal (JSON lines); its write-ahead log is
    /// `<journal>.accepted`. Default: `journal.jsonl` next to the SQLite file; with
    /// `--store memory` or `--store redis://...` and no `--journal`, nothing is written to
    /// disk (events are numbered, processed and ordered the same, then dropped; with Redis
    /// the start-up log warns). The journal is per process: give each replica its own (a
    /// second process on the same journal answers its events 503 and `/readyz` 503,
    /// naming the file). Files are created by the first event.
    #[arg(help_heading = PIPELINE, long, env = "TALLY_JOURNAL")]
    pub journal: Option<PathBuf>,

    /// Pipeline processing delay: uniform in [0, this many milliseconds].
    #[arg(help_heading = PIPELINE, long, env = "TALLY_PROCESS_DELAY_MAX_MS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    pub process_delay_max_ms: u64,

    /// Events accepted but not yet journaled, at most; past it, 503 with Retry-After.
    #[arg(help_heading = PIPELINE, long, env = "TALLY_REORDER_CAPACITY", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub reorder_capacity: u64,

    /// Live series: a point up to this many milliseconds older than its series' newest
    /// point is still accepted (kept in order); older ones are rejected and counted.
    #[arg(help_heading = SERIES, long, env = "TALLY_OOO_WINDOW_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    pub ooo_window_ms: u64,

    /// Live series: points per sealed block.
    #[arg(help_heading = SERIES, long, env = "TALLY_BLOCK_POINTS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub block_points: u64,

    /// Live series: seconds a point is kept (whole blocks are dropped once all their
    /// points are older).
    #[arg(help_heading = SERIES, long, env = "TALLY_RETENTION", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..=100 * 365 * 86_400))]
    pub retention: u64,

    /// Live series: points retained across all series, at most; the oldest are evicted.
    #[arg(help_heading = SERIES, long, env = "TALLY_MAX_POINTS", default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_points: u64,

    /// Live series: seconds between two recomputations of the published rollups.
    #[arg(help_heading = SERIES, long, env = "TALLY_ROLLUP_INTERVAL", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub rollup_interval: u64,

    /// Live series: width in milliseconds of the fixed rollup windows.
    #[arg(help_heading = SERIES, long, env = "TALLY_ROLLUP_WINDOW_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub rollup_window_ms: u64,

    /// Largest `POST /write` body, in bytes.
    #[arg(help_heading = SERIES, long, env = "TALLY_MAX_WRITE_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_write_bytes: usize,

    /// Also accept line protocol over TCP on this address (newline-delimited).
    #[arg(help_heading = SERIES, long, env = "TALLY_LINE_LISTEN")]
    pub line_listen: Option<SocketAddr>,

    /// Timestamp precision of the TCP line protocol: ns, us, ms or s.
    #[arg(help_heading = SERIES, long, env = "TALLY_LINE_PRECISION", default_value = "ms")]
    pub line_precision: crate::series::line_protocol::Precision,

    /// Concurrent TCP line-protocol connections, at most (more wait to be accepted).
    #[arg(help_heading = SERIES, long, env = "TALLY_LINE_MAX_CONNECTIONS", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub line_max_connections: u64,

    /// Live series: a point stamped more than this many milliseconds ahead of the server
    /// clock is refused (reason `future`) on every intake path.
    #[arg(help_heading = SERIES, long, env = "TALLY_MAX_FUTURE_MS", default_value_t = 600_000, value_parser = clap::value_parser!(u64).range(0..=MAX_FUTURE_MS_LIMIT))]
    pub max_future_ms: u64,

    /// Live series: series kept at most; a point of a new series past it is refused
    /// (reason `series_limit`), existing series keep accepting.
    #[arg(help_heading = SERIES, long, env = "TALLY_MAX_SERIES", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_series: u64,

    /// A TCP line-protocol connection that sends nothing for this many milliseconds is
    /// closed, so idle clients cannot hold every --line-max-connections slot.
    #[arg(help_heading = SERIES, long, env = "TALLY_LINE_IDLE_TIMEOUT_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(100..=86_400_000))]
    pub line_idle_timeout_ms: u64,

    /// A second listener serving only `GET /getSum` and `/healthz`, like the original live
    /// sum service (e.g. 127.0.0.1:4567).
    #[arg(help_heading = NETWORK, long, env = "TALLY_COMPAT_GET_SUM_BIND")]
    pub compat_get_sum_bind: Option<SocketAddr>,

    /// A polled upstream source, `NAME=URL` (repeatable): every --source-interval-ms, a
    /// GET whose plain-text number becomes a point of series NAME. The environment
    /// variable holds one.
    #[arg(help_heading = SOURCES, long = "source", env = "TALLY_SOURCE")]
    pub sources: Vec<String>,

    /// Poll interval of the --source sources, in milliseconds.
    #[arg(help_heading = SOURCES, long, env = "TALLY_SOURCE_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=86_400_000))]
    pub source_interval_ms: u64,

    /// Requests in flight per --source source, at most.
    #[arg(help_heading = SOURCES, long, env = "TALLY_SOURCE_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub source_concurrency: u64,

    /// Per-request timeout of the --source sources, in milliseconds.
    #[arg(help_heading = SOURCES, long, env = "TALLY_SOURCE_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub source_timeout_ms: u64,

    /// A TOML configuration file; its `[[source]]` tables (name, url, interval_ms,
    /// concurrency, timeout_ms, field, series) add polled sources.
    #[arg(help_heading = SOURCES, long, env = "TALLY_CONFIG")]
    pub config: Option<PathBuf>,
}

impl ServeConfig {
    /// A configuration with every default, as `tally serve` alone would have.
    pub fn defaults() -> Self {
        Cli::parse_from(["tally", "serve"]).serve_config()
    }

    pub fn worker_count(&self) -> usize {
        match self.workers {
            Some(n) => n as usize,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        }
    }

    pub fn job_timeout(&self) -> Option<Duration> {
        (self.job_timeout > 0).then(|| Duration::from_secs(self.job_timeout))
    }

    /// The series store's options.
    pub fn series_options(&self) -> crate::series::store::StoreOptions {
        let ms = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        crate::series::store::StoreOptions {
            ooo_window_ms: ms(self.ooo_window_ms),
            block_points: self.block_points as usize,
            retention_ms: ms(self.retention.saturating_mul(1000)),
            max_points: self.max_points,
            window_ms: ms(self.rollup_window_ms),
            max_future_ms: ms(self.max_future_ms),
            max_series: self.max_series,
        }
    }

    /// Where the pipeline's journal goes: `--journal`, else `journal.jsonl` next to the
    /// SQLite file; `None` (memory only) with `--store memory` and no `--journal`, and
    /// with Redis and no `--journal` (replicas must not share one journal file; a
    /// cluster-wide journal is not built yet).
    pub fn journal_path(&self) -> Option<PathBuf> {
        match (&self.journal, &self.store) {
            (Some(p), _) => Some(p.clone()),
            (None, StoreSpec::Memory | StoreSpec::Redis(_)) => None,
            (None, StoreSpec::Sqlite(db)) => Some(db.parent().map_or_else(
                || PathBuf::from("journal.jsonl"),
                |d| d.join("journal.jsonl"),
            )),
        }
    }
}

impl Cli {
    fn serve_config(self) -> ServeConfig {
        match self.command {
            Command::Serve(c) => c,
            // Only reached with the arguments of `defaults()`, which name `serve`.
            Command::Sum(_) => unreachable!("serve_config() on a `sum` command line"),
            Command::Load(_) => unreachable!("serve_config() on a `load` command line"),
            Command::Upstream(_) => {
                unreachable!("serve_config() on an `upstream` command line")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_flags_are_repeatable_and_have_the_documented_defaults() {
        use clap::Parser;
        let Command::Serve(c) = Cli::parse_from([
            "tally",
            "serve",
            "--source",
            "a=http://h/",
            "--source",
            "b=https://h/x",
        ])
        .command
        else {
            panic!("not a serve command");
        };
        assert_eq!(c.sources, ["a=http://h/", "b=https://h/x"]);
        assert_eq!(
            (
                c.source_interval_ms,
                c.source_concurrency,
                c.source_timeout_ms
            ),
            (1000, 4, 5000)
        );
        assert!(c.config.is_none());
        for bad in [
            ["--source-interval-ms", "9"],
            ["--source-concurrency", "0"],
            ["--source-concurrency", "257"],
            ["--source-timeout-ms", "0"],
        ] {
            let args = ["tally", "serve", bad[0], bad[1]];
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn defaults_bind_loopback_and_use_sqlite() {
        let c = ServeConfig::defaults();
        assert_eq!(c.bind, "127.0.0.1:5000".parse::<SocketAddr>().unwrap());
        assert_eq!(c.store, StoreSpec::Sqlite(PathBuf::from("tally.db")));
        assert_eq!(c.shutdown_timeout, 30);
        assert_eq!(c.max_body_bytes, 1024 * 1024);
        assert!(c.auth_token.is_none());
        assert!(!c.enable_test_jobs);
        assert!(c.worker_count() >= 1);
        assert_eq!((c.lease_ms, c.max_attempts), (30_000, 3));
    }

    #[test]
    fn store_specs_parse_or_name_the_problem() {
        let cases: &[(&str, Result<StoreSpec, &str>)] = &[
            ("memory", Ok(StoreSpec::Memory)),
            (
                "sqlite:/tmp/x.db",
                Ok(StoreSpec::Sqlite("/tmp/x.db".into())),
            ),
            ("sqlite:", Err("needs a path")),
            ("redis://", Err("needs a host")),
            ("redis://h:0", Err("bad port")),
            ("redis://h:99999", Err("bad port")),
            ("redis://h:6379/x", Err("bad database")),
            ("postgres://x", Err("unknown store")),
        ];
        for (input, expect) in cases {
            let got = input.parse::<StoreSpec>();
            match (got, expect) {
                (Ok(g), Ok(e)) => assert_eq!(&g, e, "{input}"),
                (Err(g), Err(e)) => assert!(g.contains(e), "{input}: {g}"),
                (g, e) => panic!("{input}: got {g:?}, expected {e:?}"),
            }
        }
        for ok in [
            "redis://127.0.0.1:6379",
            "redis://h:1/3",
            "redis://:pw@h:6379/0",
            "redis://h",
        ] {
            assert!(
                matches!(ok.parse::<StoreSpec>(), Ok(StoreSpec::Redis(_))),
                "{ok}"
            );
        }
    }

    #[test]
    fn a_redis_password_never_shows_when_the_store_is_printed() {
        let s: StoreSpec = "redis://user:s3cret@db.local:6379/2".parse().unwrap();
        assert_eq!(s.to_string(), "redis://***@db.local:6379/2");
        assert!(!format!("{s:?}").contains("s3cret"));
        let StoreSpec::Redis(u) = s else { panic!() };
        assert!(u.expose().contains("s3cret"), "the client still gets it");
    }

    #[test]
    fn sum_takes_a_file_and_a_stride_of_at_least_one() {
        let Command::Sum(a) = Cli::parse_from(["tally", "sum", "f.csv"]).command else {
            panic!("not a sum command");
        };
        assert_eq!((a.every, a.offset, a.threads), (10, 0, None));
        assert_eq!(a.file, PathBuf::from("f.csv"));
        assert!(Cli::try_parse_from(["tally", "sum", "f.csv", "--every", "0"]).is_err());
        let c = ServeConfig::defaults();
        assert_eq!(c.data_dir, PathBuf::from("data"));
        assert_eq!(c.max_upload_bytes, 1 << 30);
    }

    #[test]
    fn the_journal_sits_next_to_the_sqlite_file_and_stays_in_memory_with_the_memory_store() {
        let c = ServeConfig::defaults();
        assert_eq!(c.journal_path(), Some(PathBuf::from("journal.jsonl")));
        assert_eq!((c.process_delay_max_ms, c.reorder_capacity), (0, 10_000));
        let c = Cli::parse_from(["tally", "serve", "--store", "sqlite:/v/t.db"]).serve_config();
        assert_eq!(c.journal_path(), Some(PathBuf::from("/v/journal.jsonl")));
        let c = Cli::parse_from(["tally", "serve", "--store", "memory"]).serve_config();
        assert_eq!(c.journal_path(), None);
        let c = Cli::parse_from(["tally", "serve", "--store", "memory", "--journal", "j"])
            .serve_config();
        assert_eq!(c.journal_path(), Some(PathBuf::from("j")));
    }

    #[test]
    fn load_defaults_to_a_hundred_by_a_hundred_events() {
        let Command::Load(a) = Cli::parse_from(["tally", "load"]).command else {
            panic!("not a load command");
        };
        assert_eq!((a.connection_count, a.connection_value), (100, 100));
        assert_eq!((a.delay_range, a.mode), (5.0, LoadMode::Events));
        assert_eq!((a.batch_lines, a.values), (10_000, LoadValues::Demo));
        assert!(Cli::try_parse_from(["tally", "load", "--batch-lines", "0"]).is_err());
    }

    #[test]
    fn live_series_flags_have_the_documented_defaults() {
        let c = ServeConfig::defaults();
        assert_eq!(
            (c.ooo_window_ms, c.block_points, c.retention),
            (10_000, 1024, 86_400)
        );
        assert_eq!((c.max_points, c.rollup_interval), (10_000_000, 5));
        assert_eq!(c.max_write_bytes, 32 * 1024 * 1024);
        assert_eq!(c.line_precision.as_str(), "ms");
        assert!(c.line_listen.is_none() && c.compat_get_sum_bind.is_none());
        assert!(Cli::try_parse_from(["tally", "serve", "--line-precision", "h"]).is_err());
        assert!(Cli::try_parse_from(["tally", "serve", "--rollup-interval", "0"]).is_err());
    }

    #[test]
    fn series_limits_have_the_documented_defaults_and_ranges() {
        let c = ServeConfig::defaults();
        assert_eq!(
            (c.max_future_ms, c.max_series, c.line_idle_timeout_ms),
            (600_000, 100_000, 60_000)
        );
        // (flag, value, accepted)
        let cases: &[(&str, &str, bool)] = &[
            ("--max-future-ms", "0", true),
            ("--max-future-ms", "315360000000", true),
            ("--max-future-ms", "315360000001", false),
            ("--max-future-ms", "-1", false),
            ("--max-series", "0", false),
            ("--max-series", "1", true),
            ("--max-series", "100000000", true),
            ("--max-series", "100000001", false),
            ("--line-idle-timeout-ms", "99", false),
            ("--line-idle-timeout-ms", "100", true),
            ("--line-idle-timeout-ms", "86400000", true),
            ("--line-idle-timeout-ms", "86400001", false),
        ];
        for &(flag, value, ok) in cases {
            let got = Cli::try_parse_from(["tally", "serve", flag, value]).is_ok();
            assert_eq!(got, ok, "{flag} {value}");
        }
    }

    #[test]
    fn http_edge_flags_have_the_documented_defaults_and_ranges() {
        let c = ServeConfig::defaults();
        assert_eq!(
            (
                c.http_header_timeout_ms,
                c.http_idle_timeout_ms,
                c.max_connections
            ),
            (10_000, 75_000, 10_000)
        );
        assert!(c.allowed_origins.is_empty());
        for bad in [
            ["--max-connections", "0"],
            ["--max-connections", "1000001"],
            ["--http-header-timeout-ms", "0"],
            ["--http-idle-timeout-ms", "0"],
            ["--allowed-origin", "dash.example"],
        ] {
            assert!(
                Cli::try_parse_from(["tally", "serve", bad[0], bad[1]]).is_err(),
                "{bad:?}"
            );
        }
        let c = Cli::parse_from([
            "tally",
            "serve",
            "--allowed-origin",
            "https://a.example,http://b.example:8080",
            "--allowed-origin",
            "https://c.example",
        ])
        .serve_config();
        let origins: Vec<String> = c.allowed_origins.iter().map(|o| o.to_string()).collect();
        assert_eq!(
            origins,
            [
                "https://a.example:443",
                "http://b.example:8080",
                "https://c.example:443"
            ]
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Cli::parse_from(["tally", "serve", "--auth-token", "hunter2"]).serve_config();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
