//! Logging throughput: the four request lines a statistics job logs, formatted the way
//! `tally serve` formats them (`EscapedFields`) and with tracing-subscriber's default
//! fields, into the buffered log writer, in alternating rounds.
//!
//!     cargo run --release --example log_lines [ROUNDS] [LINES_PER_ROUND]

use std::time::Instant;

use tally::telemetry::{BufferedLog, EscapedFields};
use tracing_subscriber::fmt::format::DefaultFields;
use tracing_subscriber::fmt::FormatFields;

const QUESTION: &str = "Percent of adults aged 18 years and older who have obesity";

/// The lines of one submit-then-poll job.
fn one_job(i: u64) {
    let id = format!("job_id_{i}");
    tracing::info!(
        route = "states_mean",
        question = QUESTION,
        state = "",
        "api request in"
    );
    tracing::info!(route = "states_mean", job_id = %id, "api response out");
    tracing::info!(route = "get_results", job_id = %id, "api request in");
    tracing::info!(route = "get_results", job_id = %id, status = 200u16, "api response out");
}

/// Nanoseconds per line with field formatter `fields`.
fn run<N>(fields: N, lines: u64) -> f64
where
    N: for<'w> FormatFields<'w> + Send + Sync + 'static,
{
    let (log, guard) = BufferedLog::start(std::io::sink(), 64 * 1024).expect("log thread");
    let subscriber = tracing_subscriber::fmt()
        .fmt_fields(fields)
        .with_writer(log)
        .with_ansi(false)
        .finish();
    let started = Instant::now();
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..lines / 4 {
            one_job(i);
        }
    });
    let took = started.elapsed();
    drop(guard);
    took.as_nanos() as f64 / lines as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = args.first().copied().unwrap_or(9);
    let lines = args.get(1).copied().unwrap_or(400_000);
    let (mut plain, mut escaped) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain.push(run(DefaultFields::new(), lines));
        escaped.push(run(EscapedFields, lines));
    }
    let (p, e) = (median(&mut plain), median(&mut escaped));
    println!("{rounds} rounds of {lines} lines; median ns per line:");
    println!("default fields  {p:7.0}");
    println!("escaped fields  {e:7.0}  ({:+.1}%)", (e / p - 1.0) * 100.0);
}
