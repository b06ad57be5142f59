//! Live time series: compressed blocks of `(timestamp_ms, f64)` points ([`gorilla`]), the
//! InfluxDB line-protocol parser ([`line_protocol`]), the in-memory series store
//! ([`store`]), rollups and their scheduler ([`rollup`]), and line-protocol ingest with the
//! TCP listener ([`ingest`]). The HTTP routes are in `api::series`.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod gorilla;
pub mod ingest;
pub mod line_protocol;
pub mod rollup;
pub mod store;
