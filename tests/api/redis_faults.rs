//! Redis going away: with it down, liveness holds, readiness and submissions say 503
//! naming the store (promptly, never a hang), and the service comes back by itself;
//! with `appendfsync always`, every id ever acknowledged survives a kill -9 of Redis.
//! Also: finished jobs expire after `--result-ttl` and give Redis's memory back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use tally::config::StoreSpec;

use crate::helpers::{TestApp, PATIENCE};
use crate::redis_server::RedisServer;

const ALWAYS: [&str; 6] = [
    "--appendonly",
    "yes",
    "--appendfsync",
    "always",
    "--save",
    "",
];

async fn on_redis(server: &RedisServer, workers: u64) -> TestApp {
    let url = server.url();
    TestApp::spawn_with(move |c| {
        c.store = url.parse::<StoreSpec>().unwrap();
        c.workers = Some(workers);
        c.shutdown_timeout = 2;
        c.lease_ms = 1000;
    })
    .await
}

async fn wait_for(app: &TestApp, what: &str, path: &str, want: StatusCode) {
    let until = Instant::now() + PATIENCE;
    loop {
        if app.get(path).await.0 == want {
            return;
        }
        assert!(
            Instant::now() < until,
            "{what}: {path} never answered {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_restarted_loses_no_acknowledged_job_and_the_service_recovers() {
    let mut server = RedisServer::start_with(&ALWAYS);
    let app = on_redis(&server, 2).await;
    let mut acked = HashMap::new();
    for n in 0..50 {
        let id = app.submit("test.echo", json!({ "n": n, "ms": 20 })).await;
        acked.insert(id, n);
    }
    server.kill9();

    // Down: alive, not ready, submissions refused promptly with the store's name.
    assert_eq!(app.get("/healthz").await.0, StatusCode::OK);
    wait_for(
        &app,
        "readiness to fall",
        "/readyz",
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    let started = Instant::now();
    let (status, body) = app
        .post("/v1/jobs", &json!({ "kind": "test.echo", "params": {} }))
        .await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("redis store is unavailable"),
        "{body}"
    );
    assert!(
        took < Duration::from_secs(10),
        "a submission hung for {took:?}"
    );
    let q = "Percent of adults aged 18 years and older who have obesity";
    let (status, body) = app
        .post("/api/global_mean", &json!({ "question": q }))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "error");

    // Back: the service notices by itself and every acknowledged job finishes.
    server.restart();
    wait_for(&app, "readiness to come back", "/readyz", StatusCode::OK).await;
    for (id, n) in &acked {
        let job = app.wait_job(id).await;
        assert_eq!(job["status"], "done", "{job}");
        assert_eq!(job["result"], json!({ "n": n, "ms": 20 }));
    }
    let id = app.submit("test.echo", json!({ "after": true })).await;
    assert_eq!(app.wait_job(&id).await["status"], "done");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_id_acknowledged_before_a_kill_9_of_redis_with_appendfsync_always_survives() {
    let mut server = RedisServer::start_with(&ALWAYS);
    let app = Arc::new(on_redis(&server, 1).await);
    // Clients keep submitting while Redis is killed under them.
    let submitters: Vec<_> = (0..4)
        .map(|k| {
            let app = app.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for n in 0..10_000 {
                    let res = app
                        .client
                        .post(app.url("/v1/jobs"))
                        .json(
                            &json!({ "kind": "test.echo", "params": { "k": k, "n": n, "ms": 50 } }),
                        )
                        .send()
                        .await;
                    match res {
                        Ok(r) if r.status() == StatusCode::ACCEPTED => {
                            let v: Value = r.json().await.unwrap();
                            acked.push(v["id"].as_str().unwrap().to_string());
                        }
                        _ => break,
                    }
                }
                acked
            })
        })
        .collect();
    // Let a few hundred through, then kill Redis mid-stream.
    let until = Instant::now() + PATIENCE;
    loop {
        let (_, stats) = app.get("/v1/jobs/stats").await;
        if stats["queued"].as_u64().unwrap_or(0) + stats["running"].as_u64().unwrap_or(0) > 200 {
            break;
        }
        assert!(Instant::now() < until, "{stats}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill9();
    let mut acked = Vec::new();
    for s in submitters {
        acked.extend(s.await.unwrap());
    }
    assert!(acked.len() > 200, "only {} acknowledged", acked.len());
    server.restart();
    // Every acknowledged id is there (read Redis directly: its answer is the ground truth).
    let mut c = server.client().get_connection().unwrap();
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| {
            let n = id.trim_start_matches("job_id_");
            !redis::cmd("HEXISTS")
                .arg("{tally}:rec")
                .arg(n)
                .query::<bool>(&mut c)
                .unwrap()
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged ids lost: {missing:?}",
        missing.len()
    );
    eprintln!(
        "{} acknowledged ids all present after kill -9 of redis",
        acked.len()
    );
    drop(app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_finished_jobs_give_redis_its_memory_back_once_they_expire() {
    use tally::jobs::model::{NewJob, Outcome};
    use tally::queue::{JobQueue, LeaseOptions};
    use tally::store::redis::{RedisOptions, RedisStore};
    use tally::store::{Attempt, Store};

    let server = RedisServer::start();
    let store = RedisStore::open(
        RedisOptions {
            url: server.url(),
            capacity: 0,
            result_ttl: Duration::from_secs(15),
            lease: LeaseOptions {
                lease: Duration::from_secs(30),
                max_attempts: 3,
            },
            workers: 1,
            response_timeout: Duration::from_secs(5),
        },
        &tally::metrics::Metrics::new(),
    )
    .await
    .unwrap();
    let before = server.used_memory();
    const N: u64 = 100_000;
    // Submit and finish directly through the store: many at a time.
    stream_jobs(&store, N).await;
    let full = server.used_memory();
    eprintln!("used_memory: {before} before, {full} with {N} finished jobs");
    // They expire 15 s after they finished; the janitor deletes them.
    let until = Instant::now() + Duration::from_secs(60);
    while store.counts().await.unwrap().done > 0 {
        assert!(Instant::now() < until, "finished jobs never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = server.used_memory();
    eprintln!("used_memory after expiry: {after}");
    assert!(
        full > before + 10_000_000,
        "the jobs took memory: {before} -> {full}"
    );
    assert!(
        after < before + (full - before) / 20,
        "memory not given back: {before} before, {full} full, {after} after"
    );
    assert_eq!(store.expirations(), N);
    JobQueue::close(&store);
    Store::close(&store).await.unwrap();

    async fn stream_jobs(store: &RedisStore, n: u64) {
        use futures_util::stream::{self, StreamExt};
        stream::iter(0..n)
            .for_each_concurrent(64, |i| async move {
                let (id, durable) = store
                    .push(
                        &NewJob {
                            kind: "k".into(),
                            params: json!({ "i": i }),
                        },
                        0,
                        &|_, _| {},
                    )
                    .await
                    .unwrap();
                durable.await.unwrap();
                let done = Store::finish(
                    store,
                    id,
                    Attempt::Any,
                    Outcome::Done(format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(100))),
                    None,
                    0,
                )
                .await
                .map_err(|f| f.error)
                .unwrap();
                assert_eq!(done, tally::store::Finished::Recorded);
            })
            .await;
    }
}
