//! The service on the Redis store (a private redis-server per test): the statistics
//! API, CSV sums and their storage-service routes, the native job API, metrics and the
//! drain work as they do on SQLite; two applications on one Redis share one view.

use reqwest::StatusCode;
use serde_json::{json, Value};
use tally::config::{ServeConfig, StoreSpec};

use crate::helpers::{eventually, metric, TestApp};
use crate::redis_server::RedisServer;

async fn on_redis(server: &RedisServer, f: impl FnOnce(&mut ServeConfig)) -> TestApp {
    let url = server.url();
    TestApp::spawn_with(move |c| {
        c.store = url.parse::<StoreSpec>().expect("a redis URL");
        f(c);
    })
    .await
}

#[tokio::test]
async fn the_statistics_api_gives_the_pandas_numbers_on_redis() {
    let server = RedisServer::start();
    let app = on_redis(&server, |_| {}).await;
    crate::stats::check_every_route_against_pandas(&app).await;
    let (_, n) = app.get("/api/num_jobs").await;
    assert_eq!(n, json!({ "num_jobs": 0 }));
    app.stop().await;
}

#[tokio::test]
async fn csv_sums_and_the_storage_routes_work_on_redis() {
    let server = RedisServer::start();
    let app = on_redis(&server, |_| {}).await;
    std::fs::create_dir_all(&app.data_dir).unwrap();
    // Every 2nd column of a small table, summed by hand: a = 1 + 4 = 5, c = 3 + 6 = 9.
    std::fs::write(app.data_dir.join("t.csv"), "a,b,c\n1,2,3\n4,5,6\n").unwrap();
    let id = app
        .submit("csv.column_sum", json!({ "dataset": "t.csv", "every": 2 }))
        .await;
    let job = app.wait_job(&id).await;
    assert_eq!(job["result"], json!({ "a": 5.0, "c": 9.0 }), "{job}");

    let (status, body) = app.get("/csv_name=t.csv").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["Task started, your id"].as_str().unwrap().to_string();
    let r = eventually(&format!("{id} to finish"), async || {
        let (_, r) = app.get(&format!("/storage/get_json/{id}")).await;
        if r.get("status").is_none() {
            Ok(r)
        } else {
            Err(r.to_string())
        }
    })
    .await;
    // csv_name= sums every 10th column: here only the first.
    assert_eq!(r, json!({ "a": 5.0 }));
    assert_eq!(app.get("/storage/get_counter").await.1, json!(0));
    app.stop().await;
}

#[tokio::test]
async fn the_job_api_metrics_and_the_drain_work_on_redis() {
    let server = RedisServer::start();
    let app = on_redis(&server, |c| {
        c.workers = Some(2);
        c.shutdown_timeout = 1;
    })
    .await;
    let done = app.submit("test.echo", json!({ "x": 1 })).await;
    let job = app.wait_job(&done).await;
    assert_eq!(
        (
            job["status"].clone(),
            job["result"].clone(),
            job["attempts"].clone()
        ),
        (json!("done"), json!({ "x": 1 }), json!(1))
    );
    let slow = app.submit("test.sleep", json!({ "ms": 600_000 })).await;
    app.wait_status(&slow, &["running"]).await;
    let res = app
        .client
        .delete(app.url(&format!("/v1/jobs/{slow}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let (status, _) = app
        .post(&format!("/v1/jobs/{slow}/retry"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let job = app.wait_status(&slow, &["running"]).await;
    assert_eq!(job["attempts"], 2, "{job}");
    let (_, list) = app.get("/v1/jobs?limit=1").await;
    assert_eq!(list["jobs"][0]["id"], json!(slow), "newest first");
    let (_, stats) = app.get("/v1/jobs/stats").await;
    assert_eq!(
        (
            stats["done"].clone(),
            stats["running"].clone(),
            stats["in_progress"].clone()
        ),
        (json!(1), json!(1), json!(1))
    );
    let m = app.metrics().await;
    assert_eq!(metric(&m, "tally_queue_leased"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "tally_queue_depth"), Some(0.0));
    let (_, replicas) = app.get("/v1/replicas").await;
    assert_eq!(replicas["store"], "redis");
    assert_eq!(
        replicas["replicas"].as_array().unwrap().len(),
        1,
        "{replicas}"
    );
    // The drain hands the running job back: queued again, this attempt not counted.
    app.stop().await;
    let mut c = server.client().get_connection().unwrap();
    let counts: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg("{tally}:counts")
        .query(&mut c)
        .unwrap();
    assert_eq!(counts.get("queued"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("running"), Some(&0), "{counts:?}");
}

#[tokio::test]
async fn two_applications_on_one_redis_share_ids_results_counters_and_cancels() {
    let server = RedisServer::start();
    let a = on_redis(&server, |c| c.workers = Some(1)).await;
    let b = on_redis(&server, |c| c.workers = Some(1)).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let app = if i % 2 == 0 { &a } else { &b };
        let id = app.submit("test.echo", json!({ "i": i })).await;
        // Readable on the other one the instant it was returned.
        let other = if i % 2 == 0 { &b } else { &a };
        let (status, _) = other.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, StatusCode::OK);
        ids.push(id);
    }
    let numbers: Vec<u64> = ids
        .iter()
        .map(|id| id.trim_start_matches("job_id_").parse().unwrap())
        .collect();
    let mut unique = numbers.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 20, "ids never collide: {numbers:?}");
    for (i, id) in ids.iter().enumerate() {
        let job = b.wait_job(id).await;
        assert_eq!(job["result"], json!({ "i": i }), "{job}");
        let (_, r) = a.get(&format!("/api/get_results/{id}")).await;
        assert_eq!(r["data"], json!({ "i": i }));
    }
    let slow = a.submit("test.sleep", json!({ "ms": 600_000 })).await;
    a.wait_status(&slow, &["running"]).await;
    let (sa, sb) = (
        a.get("/v1/jobs/stats").await.1,
        b.get("/v1/jobs/stats").await.1,
    );
    assert_eq!(sa, sb, "both see the same counters");
    assert_eq!(sa["done"], 20);
    // A cancel through one stops the job wherever it runs.
    let res = b
        .client
        .delete(b.url(&format!("/v1/jobs/{slow}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    eventually("the cancelled job to free its worker", async || {
        let busy: f64 =
            [&a, &b]
                .iter()
                .map(|app| async move {
                    metric(&app.metrics().await, "tally_busy_workers").unwrap_or(0.0)
                })
                .collect::<futures_util::future::JoinAll<_>>()
                .await
                .into_iter()
                .sum();
        if busy == 0.0 {
            Ok(())
        } else {
            Err(format!(
                "the cancelled job kept its worker busy: {busy} busy workers"
            ))
        }
    })
    .await;
    let (_, job) = a.get(&format!("/v1/jobs/{slow}")).await;
    assert_eq!(job["status"], "cancelled");
    let (_, replicas) = a.get("/v1/replicas").await;
    let list: &Vec<Value> = replicas["replicas"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{replicas}");
    assert_eq!(list.iter().filter(|r| r["this"] == true).count(), 1);
    // The dashboard's rates: every replica's totals, the same on both; each process's
    // own counters only its share.
    let (_, oa) = a.get("/v1/overview").await;
    let (_, ob) = b.get("/v1/overview").await;
    let everything = json!({ "submitted": 21, "done": 20, "failed": 0, "cancelled": 1 });
    assert_eq!(oa["cluster_totals"], everything, "{oa}");
    assert_eq!(ob["cluster_totals"], everything, "{ob}");
    assert_eq!(oa["totals"]["submitted"], 11);
    assert_eq!(ob["totals"]["submitted"], 10);
    a.stop().await;
    b.stop().await;
}

/// The cluster's submitted count is counted by the scripts; a data set written by an
/// older tally, without that count, starts it from the ids handed out.
#[tokio::test]
async fn the_clusters_submitted_count_carries_on_from_a_data_set_without_it() {
    let server = RedisServer::start();
    let app = on_redis(&server, |_| {}).await;
    for n in 0..3 {
        let id = app.submit("test.echo", json!({ "n": n })).await;
        app.wait_job(&id).await;
    }
    let (_, o) = app.get("/v1/overview").await;
    assert_eq!(o["cluster_totals"]["submitted"], 3, "{o}");
    // As an older version left it: no ever:submitted in the counts.
    let _: i64 = server.query(
        redis::cmd("HDEL")
            .arg("{tally}:counts")
            .arg("ever:submitted"),
    );
    app.submit("test.echo", json!({})).await;
    let (_, o) = app.get("/v1/overview").await;
    assert_eq!(o["cluster_totals"]["submitted"], 4, "{o}");
    assert!(o["cluster_totals"]["done"].as_u64().unwrap() <= 4, "{o}");
    app.stop().await;
}

#[tokio::test]
async fn the_rate_history_is_the_clusters_and_a_replica_started_later_has_it() {
    let server = RedisServer::start();
    let a = on_redis(&server, |_| {}).await;
    crate::browser::burst_into_history(&a, 100).await;
    assert!(crate::browser::history_peak(&a, "done").await > 0.0);
    let started = tally::now_ms() as f64 / 1000.0;
    // A replica that saw none of it answers with the same history, the cluster's.
    let b = on_redis(&server, |_| {}).await;
    let (status, h) = b.get("/v1/overview/history").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["scope"], "cluster");
    let before: Vec<f64> = h["t"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .filter(|t| *t < started)
        .collect();
    assert!(!before.is_empty(), "points from before b started: {h}");
    for name in ["submitted", "done"] {
        assert_eq!(
            crate::browser::history_peak(&b, name).await,
            crate::browser::history_peak(&a, name).await,
            "{name}"
        );
    }
    a.stop().await;
    b.stop().await;
}
