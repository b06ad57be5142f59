//! Line-protocol ingest without HTTP: parse, group and store batch files.
//!
//! `cargo run --release --example ingest_bench DIR [ROUNDS]` ingests the batch files
//! `DIR/c<conn>-<k>.lp` written by `bench/lp_payload.py` (connection by connection, in
//! order; nanosecond timestamps unless the files' first timestamp has 13 digits) into a
//! fresh store per round, on one thread, and prints lines/s per round.

use std::sync::Arc;
use std::time::Instant;

use tally::metrics::Metrics;
use tally::series::ingest::Ingester;
use tally::series::line_protocol::Precision;
use tally::series::store::{SeriesStore, StoreOptions};

// The server's allocator, so allocation costs are the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: ingest_bench DIR [ROUNDS]");
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let mut batches = Vec::new();
    for conn in 0.. {
        let mut k = 0;
        while let Ok(b) = std::fs::read(format!("{dir}/c{conn}-{k}.lp")) {
            batches.push(b);
            k += 1;
        }
        if k == 0 {
            break;
        }
    }
    let first_ts = batches[0]
        .split(|&b| b == b'\n')
        .next()
        .and_then(|l| l.rsplit(|&b| b == b' ').next())
        .map_or(0, <[u8]>::len);
    let precision = if first_ts == 13 {
        Precision::Milliseconds
    } else {
        Precision::Nanoseconds
    };
    let lines: usize = batches
        .iter()
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .sum();
    println!("{} batches, {lines} lines, {precision}", batches.len());
    let now = tally::now_ms();
    for _ in 0..rounds {
        let metrics = Metrics::new();
        let opts = StoreOptions {
            max_points: u64::MAX,
            ..StoreOptions::default()
        };
        let ingester = Ingester::new(Arc::new(SeriesStore::new(opts, &metrics)), &metrics);
        let store = ingester.store();
        let t = Instant::now();
        let mut accepted = 0;
        for b in &batches {
            accepted += ingester.ingest(b, precision, now, "write").store.accepted;
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{:.2} M lines/s ({:.0} ns/line), {accepted} points stored, {:.2} bytes/point",
            lines as f64 / s / 1e6,
            s * 1e9 / lines as f64,
            store.bytes_per_point()
        );
    }
}
