//! Redis going away: with it down, liveness holds, readiness and submissions say 503
//! naming the store (promptly, never a hang), and the service comes back by itself;
//! with `appendfsync always`, every id ever acknowledged survives a kill -9 of Redis.
//! Also: finished jobs expire after `--result-ttl` and give Redis's memory back.
//!
//! And the faults short of going away: a link that stalls past the reply timeout (a TCP
//! proxy holding traffic), a full Redis (`CONFIG SET maxmemory` below what it holds), a
//! paused Redis (SIGSTOP), a Redis that forgot its data (restarted without persistence),
//! a replica whose clock is off (libfaketime).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use tally::config::StoreSpec;

use crate::helpers::{eventually, eventually_within, Proc, TestApp};
use crate::redis_server::RedisServer;
use crate::tcp_proxy::TcpProxy;

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
    eventually(&format!("{what}: {path} to answer {want}"), async || {
        let (status, body) = app.get(path).await;
        if status == want {
            Ok(())
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await
}

async fn readiness_falls(app: &TestApp) {
    wait_for(
        app,
        "readiness to fall",
        "/readyz",
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await
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
    readiness_falls(&app).await;
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
    eventually("more than 200 jobs queued or running", async || {
        let (_, stats) = app.get("/v1/jobs/stats").await;
        if stats["queued"].as_u64().unwrap_or(0) + stats["running"].as_u64().unwrap_or(0) > 200 {
            Ok(())
        } else {
            Err(stats.to_string())
        }
    })
    .await;
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
    use tally::model::{NewJob, Outcome};
    use tally::queue::redis::{RedisOptions, RedisStore};
    use tally::queue::{JobQueue, LeaseOptions};
    use tally::store::{Attempt, Finish, Store};

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
    eventually_within(
        Duration::from_secs(60),
        "finished jobs to expire",
        async || match store.counts().await.unwrap().done {
            0 => Ok(()),
            done => Err(format!("{done} finished jobs left")),
        },
    )
    .await;
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
                let pushed = store
                    .push(&NewJob::new("k", json!({ "i": i })), 0, &|_, _| {})
                    .await
                    .unwrap();
                let id = pushed.submitted.id();
                pushed.durable.await.unwrap();
                let done = Store::finish(
                    store,
                    Finish {
                        id,
                        attempt: Attempt::Any,
                        outcome: Outcome::Done(format!(
                            "{{\"i\":{i},\"pad\":\"{}\"}}",
                            "x".repeat(100)
                        )),
                        started_at: None,
                        at: 0,
                    },
                )
                .await
                .map_err(|f| f.error)
                .unwrap();
                assert_eq!(done, tally::store::Finished::Recorded);
            })
            .await;
    }
}

/// Sets Redis's `maxmemory` (0: no limit); `noeviction` is Redis's default and what the
/// README asks for.
fn set_maxmemory(server: &RedisServer, bytes: u64) {
    let _: () = server.query(
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(bytes.to_string()),
    );
}

/// A Redis that refuses writes from now on: its limit below what it holds.
fn fill_up(server: &RedisServer) {
    let used = server.used_memory();
    set_maxmemory(server, used / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_taken_for_a_replica_whose_link_stalled_runs_once_the_link_is_back() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(server.port).await;
    let dir = tempfile::tempdir().unwrap();
    let args = |url: &str| -> Vec<String> {
        ["--store", url, "--workers", "1", "--lease-ms", "2000"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let a_args = args(&proxy.redis_url());
    let b_args = args(&server.url());
    let a = Proc::start(
        dir.path(),
        &a_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let b = Proc::start(
        dir.path(),
        &b_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let (ac, bc) = (a.client(), b.client());
    // B's only worker is busy for the whole test, so B never takes the job itself.
    let busy = bc.submit("test.sleep", json!({ "ms": 600_000 })).await;
    bc.wait_until("B's worker to be busy", async |c| {
        c.status_of(&busy).await == "running"
    })
    .await;
    // A's fetcher waits in a blocking move (BLMOVE) on Redis for the next job...
    eventually("A's fetcher to block on the queue", async || {
        let list: String = server.query(redis::cmd("CLIENT").arg("LIST"));
        if list.lines().any(|l| l.contains("cmd=blmove")) {
            Ok(())
        } else {
            Err(format!("CLIENT LIST: {list}"))
        }
    })
    .await;
    // ...then its link stalls: Redis moves the job submitted through B into A's
    // in-flight list, and the reply waits in the proxy past A's reply timeout.
    proxy.hold();
    let id = bc.submit("test.echo", json!({ "n": 1 })).await;
    let n = id.trim_start_matches("job_id_").to_string();
    eventually("Redis to move the job towards A", async || {
        let wait: Vec<String> =
            server.query(redis::cmd("LRANGE").arg("{tally}:wait").arg(0).arg(-1));
        if wait.contains(&n) {
            Err(format!("{n} still in {{tally}}:wait: {wait:?}"))
        } else {
            Ok(())
        }
    })
    .await;
    // The partition lasts 4.5 s, longer than A's reply timeout of 3 s for the blocking
    // move: this is the fault being injected, not a wait for something to happen.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    proxy.release();

    // Nothing stays stranded: the job runs (on A, the only replica with a free worker).
    ac.wait_until("the job to be done", async |c| {
        c.status_of(&id).await == "done"
    })
    .await;
    let (_, job) = ac.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(job["result"], json!({ "n": 1 }), "{job}");
    let left: Vec<String> = server.query(redis::cmd("KEYS").arg("{tally}:inflight:*"));
    for list in left {
        let len: u64 = server.query(redis::cmd("LLEN").arg(&list));
        assert_eq!(len, 0, "{list} still holds ids");
    }
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_finishes_while_redis_is_full_keeps_its_result() {
    let server = RedisServer::start();
    let app = on_redis(&server, 1).await;
    let id = app
        .submit("test.echo", json!({ "ms": 1500, "kept": "the result" }))
        .await;
    app.wait_status(&id, &["running"]).await;
    // Redis fills up while the job runs: its outcome cannot be written for now.
    fill_up(&server);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let (_, job) = app.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(job["status"], "running", "{job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = app.metrics().await;
    assert!(
        crate::helpers::metric(&page, "tally_store_outcome_retries_total").unwrap_or(0.0) > 0.0,
        "the outcome was not retried"
    );
    // Memory comes back: the real outcome is written, not a failure.
    set_maxmemory(&server, 0);
    let job = app.wait_job(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["result"], json!({ "ms": 1500, "kept": "the result" }));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_answers_503_naming_the_cause_and_readiness_stays_down() {
    let server = RedisServer::start();
    let app = on_redis(&server, 1).await;
    fill_up(&server);
    let res = app
        .client
        .post(app.url("/v1/jobs"))
        .json(&json!({ "kind": "test.echo", "params": {} }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        res.headers().contains_key("retry-after"),
        "{:?}",
        res.headers()
    );
    let body: Value = res.json().await.unwrap();
    let detail = body["detail"].as_str().unwrap_or("");
    assert!(detail.contains("out of memory"), "{body}");
    let q = "Percent of adults aged 18 years and older who have obesity";
    let (status, body) = app
        .post("/api/global_mean", &json!({ "question": q }))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "error");
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or("")
            .contains("out of memory"),
        "{body}"
    );

    // Not ready while full, in every sample, though reads keep working.
    readiness_falls(&app).await;
    for _ in 0..20 {
        let (status, body) = app.get("/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(app.get("/v1/jobs/stats").await.0, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    set_maxmemory(&server, 0);
    wait_for(&app, "readiness to come back", "/readyz", StatusCode::OK).await;
    let id = app.submit("test.echo", json!({ "after": true })).await;
    assert_eq!(app.wait_job(&id).await["status"], "done");
    app.stop().await;
}

/// A full Redis that also forgot its data: the epoch check that follows may write (it
/// keeps memory level), but its success does not mean Redis takes writes again, so
/// readiness stays down until a write that grows memory succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_that_forgot_its_data_stays_not_ready() {
    let server = RedisServer::start();
    let app = on_redis(&server, 1).await;
    fill_up(&server);
    let (status, body) = app.post("/v1/jobs", &json!({ "kind": "test.echo" })).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    readiness_falls(&app).await;
    let _: () = server.query(&mut redis::cmd("FLUSHALL"));
    set_maxmemory(&server, 1);
    eventually("the replica to notice Redis forgot its data", async || {
        let resets = crate::helpers::metric(&app.metrics().await, "tally_store_resets_total");
        if resets >= Some(1.0) {
            Ok(())
        } else {
            Err(format!("{resets:?}"))
        }
    })
    .await;
    // Across several heartbeats (one a second), not ready in every sample.
    for _ in 0..25 {
        let (status, body) = app.get("/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    set_maxmemory(&server, 0);
    wait_for(&app, "readiness to come back", "/readyz", StatusCode::OK).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_recovers_by_itself_as_finished_jobs_expire() {
    let server = RedisServer::start();
    let url = server.url();
    let app = TestApp::spawn_with(move |c| {
        c.store = url.parse::<StoreSpec>().unwrap();
        c.workers = Some(2);
        c.lease_ms = 1000;
        c.result_ttl = 4;
    })
    .await;
    // About 1.2 MB of finished jobs, then a limit below what Redis holds.
    let pad = "x".repeat(2000);
    let mut ids = Vec::new();
    for n in 0..300 {
        ids.push(app.submit("test.echo", json!({ "n": n, "pad": pad })).await);
    }
    for id in &ids {
        assert_eq!(app.wait_job(id).await["status"], "done");
    }
    let used = server.used_memory();
    set_maxmemory(&server, used - 200_000);
    let (status, body) = app
        .post("/v1/jobs", &json!({ "kind": "test.echo", "params": {} }))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    // Nobody frees anything by hand: the finished jobs expire and the service takes
    // work again.
    eventually("the service to take work again", async || {
        let (status, body) = app
            .post(
                "/v1/jobs",
                &json!({ "kind": "test.echo", "params": { "after": true } }),
            )
            .await;
        if status == StatusCode::ACCEPTED {
            Ok(())
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await;
    wait_for(&app, "readiness to come back", "/readyz", StatusCode::OK).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_redis_never_answered_says_its_outcome_is_unknown() {
    let server = RedisServer::start();
    let app = on_redis(&server, 1).await;
    // Redis knows the scripts (a replica that has been serving has run them all).
    let first = app.submit("test.echo", json!({ "n": 0 })).await;
    app.wait_job(&first).await;
    let pid = server.pid().unwrap() as i32;
    // SAFETY: signals to our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let res = app
        .client
        .post(app.url("/v1/jobs"))
        .json(&json!({ "kind": "test.echo", "params": { "n": 1 } }))
        .send()
        .await
        .unwrap();
    let status = res.status();
    let retry_after = res.headers().contains_key("retry-after");
    let body: Value = res.json().await.unwrap();
    let q = "Percent of adults aged 18 years and older who have obesity";
    let (compat_status, compat) = app
        .post("/api/global_mean", &json!({ "question": q }))
        .await;
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(retry_after);
    assert_eq!(body["outcome"], "unknown", "{body}");
    let detail = body["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("outcome is unknown") && detail.contains("Idempotency-Key"),
        "{body}"
    );
    assert_eq!(compat_status, StatusCode::SERVICE_UNAVAILABLE, "{compat}");
    assert_eq!(compat["outcome"], "unknown", "{compat}");
    // It was in fact created once Redis went on: that is what "unknown" warns of.
    wait_for(&app, "readiness to come back", "/readyz", StatusCode::OK).await;
    let (_, page) = app.get("/v1/jobs?kind=test.echo").await;
    assert_eq!(page["jobs"].as_array().map(Vec::len), Some(2), "{page}");
    app.stop().await;
}

/// Issue 18, item 5: the client told "outcome unknown" retries as told, with its
/// Idempotency-Key, and gets the job the paused Redis made after all: one job, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_idempotency_key_after_an_unknown_outcome_gets_that_one_job() {
    use crate::idempotency::{jobs_of, submit_keyed};

    let server = RedisServer::start();
    let app = on_redis(&server, 1).await;
    // Redis knows the scripts (a replica that has been serving has run them all).
    let first = app.submit("test.echo", json!({ "n": 0 })).await;
    app.wait_job(&first).await;
    let body = json!({ "kind": "test.echo", "params": { "n": 1, "order": "A-17" } });
    let key = b"order-A-17";
    let pid = server.pid().unwrap() as i32;
    // SAFETY: signals to our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let unknown = submit_keyed(&app, key, &body).await;
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(
        unknown.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        unknown.body
    );
    assert_eq!(unknown.body["outcome"], "unknown", "{}", unknown.body);
    let detail = unknown.body["detail"].as_str().unwrap_or("");
    assert!(detail.contains("same Idempotency-Key"), "{}", unknown.body);
    wait_for(&app, "readiness to come back", "/readyz", StatusCode::OK).await;

    // The retry, as the answer told: the job Redis made once it went on.
    let retry = submit_keyed(&app, key, &body).await;
    assert_eq!(retry.status, StatusCode::ACCEPTED, "{}", retry.body);
    assert_eq!(retry.replayed.as_deref(), Some("true"), "{}", retry.body);
    let id = retry.body["id"].as_str().unwrap().to_string();
    let made: Vec<Value> = jobs_of(&app, "test.echo")
        .await
        .into_iter()
        .filter(|j| j["params"]["order"] == "A-17")
        .collect();
    assert_eq!(made.len(), 1, "exactly one job for the order: {made:?}");
    assert_eq!(made[0]["id"], json!(id));
    assert_eq!(app.wait_job(&id).await["status"], "done");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_answers_a_poll_from_the_store_after_the_job_was_retried_elsewhere() {
    let server = RedisServer::start();
    let a = on_redis(&server, 1).await;
    // Fails in its first attempt, on A (alone so far); nobody polls A for it yet.
    let id = a
        .submit("test.echo", json!({ "fail_attempts": 1, "v": 7 }))
        .await;
    let failed = a.wait_job(&id).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    // A's one worker is kept busy, so the retry runs on B.
    let hold = a.submit("test.sleep", json!({ "ms": 600_000 })).await;
    a.wait_status(&hold, &["running"]).await;
    let b = on_redis(&server, 1).await;
    let (status, body) = b.post(&format!("/v1/jobs/{id}/retry"), &json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let done = b.wait_job(&id).await;
    assert_eq!(done["status"], "done", "{done}");
    // A's first poll since the failure: the store's answer, not the failure it saw.
    let (_, r) = a.get(&format!("/api/get_results/{id}")).await;
    assert_eq!(r["status"], "done", "{r}");
    assert_eq!(r["data"], json!({ "fail_attempts": 1, "v": 7 }), "{r}");
    let (_, r) = a.get(&format!("/storage/get_json/{id}")).await;
    assert_eq!(r, json!({ "fail_attempts": 1, "v": 7 }), "{r}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_never_handed_out_again_after_redis_forgets() {
    let mut server = RedisServer::start();
    let a = on_redis(&server, 1).await;
    let b = on_redis(&server, 1).await;
    let mut old = Vec::new();
    for n in 0..3 {
        let id = a.submit("test.echo", json!({ "old": n })).await;
        a.wait_job(&id).await;
        old.push(id);
    }
    assert_eq!(old, ["job_id_1", "job_id_2", "job_id_3"]);
    // Redis comes back empty (no persistence): its counter would start again at 1.
    server.restart();
    wait_for(&a, "A to be ready again", "/readyz", StatusCode::OK).await;
    wait_for(&b, "B to be ready again", "/readyz", StatusCode::OK).await;
    let mut new = Vec::new();
    for n in 0..3 {
        new.push(b.submit("test.echo", json!({ "new": n })).await);
        new.push(a.submit("test.echo", json!({ "new": n })).await);
    }
    for id in &new {
        assert!(
            !old.contains(id),
            "{id} was handed out again: old {old:?}, new {new:?}"
        );
    }
    let mut distinct = new.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), new.len(), "{new:?}");
    // An old client's id is unknown on every replica, never someone else's result.
    for app in [&a, &b] {
        for id in &old {
            let (_, r) = app.get(&format!("/api/get_results/{id}")).await;
            assert_eq!(
                r,
                json!({ "status": "error", "reason": "Invalid job_id" }),
                "{id}"
            );
        }
    }
    let page = a.metrics().await;
    let resets = crate::helpers::metric(&page, "tally_store_resets_total").unwrap_or(0.0)
        + crate::helpers::metric(&b.metrics().await, "tally_store_resets_total").unwrap_or(0.0);
    assert!(resets >= 1.0, "the reset was not counted");
    // The cluster's totals count the jobs made since, not the ids skipped: the
    // dashboard's rates do not spike by the jump of the id range.
    let (_, o) = a.get("/v1/overview").await;
    assert_eq!(o["cluster_totals"]["submitted"], 6, "{o}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_clock_is_behind_is_seen_alive_by_the_others() {
    let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(
        std::path::Path::new(lib).exists(),
        "libfaketime is not installed (apt-get install faketime); this test needs it"
    );
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let args = [
        "--store",
        url.as_str(),
        "--workers",
        "1",
        "--lease-ms",
        "1000",
    ];
    let a = Proc::start(dir.path(), &args);
    // B's clock is 20 s behind A's and Redis's.
    let b = Proc::start_with_env(
        dir.path(),
        &args,
        &[
            ("LD_PRELOAD", lib),
            ("FAKETIME", "-20s"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let (ac, bc) = (a.client(), b.client());
    let (_, a_view) = ac.get("/v1/overview").await;
    let (_, b_view) = bc.get("/v1/overview").await;
    let skew = a_view["now"].as_i64().unwrap() - b_view["now"].as_i64().unwrap();
    assert!(skew > 15_000, "B's clock is not behind: {skew} ms");
    // Over a few seconds (longer than the 10 s after which a silent replica counts as
    // dead would not be needed: a 20 s skew looks dead at once), A always sees B, fresh.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let (_, r) = ac.get("/v1/replicas").await;
        let others: Vec<&Value> = r["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["this"] == false)
            .collect();
        assert_eq!(others.len(), 1, "A does not see B: {r}");
        let ago = others[0]["seen_ms_ago"].as_i64().unwrap();
        assert!(ago < 3000, "B looks {ago} ms stale to A: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lines = a.lines.lock().unwrap().clone();
    assert!(
        !lines.iter().any(|l| l.contains("dead replica")),
        "A took B for dead: {lines:?}"
    );
    // The rate history (samples stamped by Redis's clock) is given on each replica's
    // own clock, as its live points are: B's newest sample is not 20 s in its future.
    let (_, h) = bc.get("/v1/overview/history").await;
    let (_, b_view) = bc.get("/v1/overview").await;
    let newest = h["t"].as_array().and_then(|t| t.last()?.as_f64());
    let b_now = b_view["now"].as_f64().unwrap() / 1000.0;
    assert!(
        newest.is_some_and(|t| (t - b_now).abs() < 5.0),
        "B's newest sample {newest:?} against its now {b_now}: {h}"
    );
    drop((a, b));
}
