//! Line-protocol parser throughput.
//!
//! `cargo run --release --example lp_bench [lines]` (default 1,000,000).
//! Generates lines like `demo,host=h1 value=12.5 1700000000000000000`, parses
//! them with nanosecond precision and reports lines/s, for a sink that only
//! sums values and for one that also builds each point's series key.

use std::hint::black_box;
use std::time::{Duration, Instant};

use tally::series::line_protocol::{parse_lines, Precision};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let mut input = Vec::with_capacity(n * 48);
    for i in 0..n {
        let line = format!(
            "demo,host=h{} value={}.5 {}\n",
            i % 10,
            10 + i % 16,
            1_700_000_000_000_000_000i64 + i as i64 * 2_000_000_000
        );
        input.extend_from_slice(line.as_bytes());
    }
    println!("input: {n} lines, {:.1} MB", input.len() as f64 / 1e6);

    let report = |label: &str, runs: &[Duration]| {
        let mut sorted = runs.to_vec();
        sorted.sort();
        let best = sorted[0].as_secs_f64();
        let median = sorted[sorted.len() / 2].as_secs_f64();
        println!(
            "{label:<28} best {:>6.2} M lines/s ({:>6.1} MB/s), median {:>6.2} M lines/s",
            n as f64 / best / 1e6,
            input.len() as f64 / best / 1e6,
            n as f64 / median / 1e6
        );
    };

    let mut runs = Vec::new();
    for _ in 0..5 {
        let mut sum = 0.0;
        let t = Instant::now();
        let summary = parse_lines(black_box(&input), Precision::Nanoseconds, 0, |p| {
            sum += p.value().as_f64().unwrap_or(0.0);
        });
        runs.push(t.elapsed());
        assert_eq!(summary.points, n, "{:?}", summary.errors.first());
        black_box(sum);
    }
    report("parse (sum values)", &runs);

    let mut runs = Vec::new();
    let mut key = String::new();
    for _ in 0..5 {
        let mut total = 0usize;
        let t = Instant::now();
        parse_lines(black_box(&input), Precision::Nanoseconds, 0, |p| {
            key.clear();
            p.write_series_key(&mut key);
            total += key.len();
        });
        runs.push(t.elapsed());
        black_box(total);
    }
    report("parse + series key", &runs);
}
