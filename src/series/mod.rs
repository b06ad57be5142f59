//! Time-series building blocks (issue 5, not yet served over HTTP): compressed blocks of
//! `(timestamp_ms, f64)` points ([`gorilla`]) and the InfluxDB line-protocol parser
//! ([`line_protocol`]). Neither knows about the other or about the service; the series
//! store and the ingest routes that compose them come with the live-series work.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod gorilla;
pub mod line_protocol;
