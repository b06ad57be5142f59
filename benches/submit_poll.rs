//! Submit-then-poll load client for `bench/stats_api.sh` (run with `cargo bench --bench
//! submit_poll -- URL SUBMIT_PATH RESULT_PREFIX CLIENTS SECONDS`). Each client POSTs a
//! job, then polls its result until it is no longer running, and starts the next one.
//! Prints one JSON line: jobs, jobs/s, latency percentiles (submit → done seen), polls.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::json;

/// The submit answer. Replies are parsed into just the fields the client acts on (the
/// rest is still parsed through, so a malformed reply counts as an error): a full JSON
/// tree per reply would make the client, which shares the machine's cores with the
/// server, spend twice as much per job on a 1.5 KB answer as on the no-op's 30 bytes,
/// and that would be charged to the server.
#[derive(Deserialize)]
struct Submitted {
    job_id: String,
}

#[derive(Deserialize)]
struct Polled {
    status: String,
    #[allow(dead_code)]
    #[serde(default)]
    data: Option<IgnoredAny>,
}

const QUESTION: &str = "Percent of adults aged 18 years and older who have obesity";

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.len() != 5 && args.len() != 6 {
        eprintln!("usage: submit_poll URL SUBMIT_PATH RESULT_PREFIX CLIENTS SECONDS [MAX_JOBS]");
        std::process::exit(2);
    }
    let base = args[0].clone();
    let submit = format!("{base}{}", args[1]);
    let result_prefix = format!("{base}{}", args[2]);
    let clients: usize = args[3].parse().expect("CLIENTS is a number");
    let seconds: f64 = args[4].parse().expect("SECONDS is a number");
    // With MAX_JOBS, clients stop after that many submissions in all (or at SECONDS).
    let budget = Arc::new(AtomicU64::new(
        args.get(5)
            .map_or(u64::MAX, |m| m.parse().expect("MAX_JOBS is a number")),
    ));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .tcp_nodelay(true)
        .build()
        .expect("client");
    let body = json!({ "question": QUESTION });

    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, submit, result_prefix, body) = (
            http.clone(),
            submit.clone(),
            result_prefix.clone(),
            body.clone(),
        );
        let budget = budget.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut submit_lat = Vec::new();
            let mut polls = 0u64;
            let mut errors = 0u64;
            while Instant::now() < deadline
                && budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                    .is_ok()
            {
                let t = Instant::now();
                let res = match http.post(&submit).json(&body).send().await {
                    Ok(r) => r,
                    Err(_) => {
                        errors += 1;
                        continue;
                    }
                };
                let Ok(Submitted { job_id }) = res.json::<Submitted>().await else {
                    errors += 1;
                    continue;
                };
                submit_lat.push(t.elapsed());
                let url = format!("{result_prefix}{job_id}");
                loop {
                    polls += 1;
                    let status = match http.get(&url).send().await {
                        Ok(r) => r.json::<Polled>().await.map(|p| p.status).ok(),
                        Err(_) => None,
                    };
                    match status.as_deref() {
                        Some("running") => tokio::task::yield_now().await,
                        Some("done") => break,
                        _ => {
                            errors += 1;
                            break;
                        }
                    }
                }
                lat.push(t.elapsed());
            }
            (lat, submit_lat, polls, errors)
        }));
    }
    let started = Instant::now();
    let (mut lat, mut submit_lat) = (Vec::new(), Vec::new());
    let (mut polls, mut errors) = (0u64, 0u64);
    for t in tasks {
        let (l, s, p, e) = t.await.expect("client task");
        lat.extend(l);
        submit_lat.extend(s);
        polls += p;
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort();
    submit_lat.sort();
    let pct_of = |lat: &[Duration], p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i].as_secs_f64() * 1000.0
    };
    let pct = |p: f64| pct_of(&lat, p);
    println!(
        "{}",
        json!({
            "jobs": lat.len(),
            "jobs_per_s": lat.len() as f64 / elapsed,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            // The submit alone (until its id is back): the share of the store's commit.
            "submit_p50_ms": pct_of(&submit_lat, 0.50),
            "submit_p99_ms": pct_of(&submit_lat, 0.99),
            "polls_per_job": polls as f64 / lat.len().max(1) as f64,
            "errors": errors,
        })
    );
}
