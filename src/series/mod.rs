//! Live time series: compressed blocks of `(timestamp_ms, f64)` points ([`gorilla`], and
//! [`packed`], the smaller of Gorilla and zstd-compressed columns, as sealed blocks), the
//! InfluxDB line-protocol parser ([`line_protocol`]), the in-memory series store
//! ([`store`]), the mergeable aggregates it keeps ([`agg`]), the published rollups and
//! their scheduler ([`rollup`]), and line-protocol ingest with the
//! TCP listener ([`ingest`]) and the supervised upstream pollers ([`sources`]). The HTTP
//! routes are in `api::series` and `api::sources`; the demo upstream of `tally upstream`
//! is in `cli::upstream`.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod agg;
pub mod gorilla;
pub mod ingest;
pub mod line_protocol;
pub mod metrics;
pub mod packed;
pub mod rollup;
pub mod sources;
pub mod store;
