//! tally: slow, asynchronous data work as a fast, observable HTTP service.
//!
//! Module map (see `ARCHITECTURE.md` for the longer tour):
//! - [`config`]: the command line (clap, every flag also `TALLY_<FLAG>`), parsed once.
//! - [`jobs`]: jobs as data (kind + JSON params), the kind registry, and the engine that
//!   queues them and runs them on a pool of worker threads.
//! - [`model`]: the plain data every room speaks (ids, records, states, outcomes); the
//!   ground floor.
//! - [`store`]: where job records and results live: the [`store::Store`] trait with an
//!   SQLite (default, durable, group-committed) and an in-memory implementation.
//! - [`cluster`]: what replicas on one Redis share besides jobs: the connection (one
//!   server or a Redis Cluster) and named leases with fencing tokens.
//! - [`queue`]: where jobs wait and who holds them: the [`queue::JobQueue`] trait (claims
//!   are leases with numbered attempts), its in-process implementation over a store, and
//!   Redis (`queue::redis`), which is store and queue at once for several replicas, with
//!   Lua scripts for every multi-key change; [`queue::open`] opens the pair a spec names.
//! - [`stats`]: the survey dataset and the nine statistics computations.
//! - [`csv`]: the hand-written parallel CSV column-sum engine, the `csv.column_sum` job
//!   kind and the data directory it reads from.
//! - [`api`]: the HTTP edge (axum): native `/v1` routes, the compatible `/api` routes,
//!   health, metrics; the only layer that knows about HTTP and JSON shapes.
//! - [`neumaier`]: the compensated running sum every module that adds numbers uses.
//! - [`decimal`]: plain decimals from bytes on the fast paths the CSV scan and the
//!   line-protocol parser share.
//! - [`metrics`]: the Prometheus registry and typed metric families.
//! - [`series`]: live time series: Gorilla-compressed blocks, the line-protocol parser, the
//!   in-memory series store with incremental rollups, the TCP line listener, the
//!   supervised upstream pollers (sources).
//! - [`pipeline`]: the ordered pipeline: events acknowledged once durable in a
//!   write-ahead log, processed after a random delay, journaled strictly in order.
//! - [`cli`]: the subcommands beside `serve`: `tally sum`, `tally load` (the pipeline's
//!   and the job API's load client) and `tally upstream` (the demo upstream).
//! - [`origin`]: web origins, as `--allowed-origin` names them and browsers send them.
//! - [`lifecycle`]: the `Component` shutdown shape every background piece implements, and
//!   the cancellation and task-tracking plumbing they share.
//! - [`telemetry`]: tracing setup (UTC timestamps, rotating log file).
//! - [`app`]: [`app::Application`], the one start-up path shared by `main` and the tests.

pub mod api;
pub mod app;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod csv;
pub mod decimal;
pub mod jobs;
pub mod lifecycle;
pub mod metrics;
pub mod model;
pub mod neumaier;
pub mod origin;
pub mod pipeline;
pub mod queue;
pub mod series;
pub mod stats;
pub mod store;
pub mod telemetry;

/// Milliseconds since the Unix epoch, the one clock every record uses.
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
