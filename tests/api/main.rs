//! Black-box tests: each starts its own server on port 0 (in process, or the real binary
//! when signals and crashes are involved) and talks HTTP to it.

mod bad_input;
mod browser;
mod compression;
mod contract;
mod cross_origin;
mod csv;
mod dashboard;
mod edge;
mod helpers;
mod idempotency;
mod jobs;
mod leases;
mod load_write;
mod openapi_coverage;
mod ops;
mod pipeline;
mod redis;
mod redis_cluster;
mod redis_faults;
mod replicas;
mod series;
mod shutdown;
mod sources;
mod stats;
mod store_failures;
#[path = "../support/mod.rs"]
mod support;
mod webdriver;

pub use support::{nginx, redis_server, tcp_proxy};
