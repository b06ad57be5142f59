//! The job engine through the native API: bursts, a full queue, panics, timeouts,
//! cancellation, listing.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::helpers::{metric, TestApp};

const Q1: &str = "Percent of adults aged 18 years and older who have obesity";

#[tokio::test]
async fn jobs_and_num_jobs_count_a_burst_of_1000_concurrent_submissions() {
    // One worker held by a long job keeps the burst queued, so "during" is exact.
    let app = TestApp::spawn_with(|c| c.workers = Some(1)).await;
    let blocker = app.submit("test.sleep", json!({ "ms": 600_000 })).await;
    app.wait_status(&blocker, &["running"]).await;

    let mut set = JoinSet::new();
    for _ in 0..1000 {
        let (client, url) = (app.client.clone(), app.url("/api/global_mean"));
        set.spawn(async move {
            let res = client
                .post(url)
                .json(&json!({ "question": Q1 }))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            let body: Value = res.json().await.unwrap();
            body["job_id"].as_str().unwrap().to_string()
        });
    }
    let mut ids = Vec::new();
    while let Some(id) = set.join_next().await {
        ids.push(id.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1000, "every submission got its own id");

    let (_, n) = app.get("/api/num_jobs").await;
    assert_eq!(
        n["num_jobs"], 1001,
        "the blocker and the whole burst are in progress"
    );
    let (_, jobs) = app.get("/api/jobs").await;
    let listed = jobs["data"].as_array().unwrap();
    assert_eq!(listed.len(), 1001);
    assert!(listed
        .iter()
        .all(|e| e.as_object().unwrap().values().all(|s| s == "running")));

    let res = app
        .client
        .delete(app.url(&format!("/v1/jobs/{blocker}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    for id in &ids {
        let r = app.compat_result(id).await;
        assert_eq!(r["status"], "done", "{id}: {r}");
    }
    let (_, n) = app.get("/api/num_jobs").await;
    assert_eq!(n["num_jobs"], 0);
    let (_, jobs) = app.get("/api/jobs").await;
    let listed = jobs["data"].as_array().unwrap();
    assert_eq!(listed.len(), 1001);
    assert!(listed
        .iter()
        .all(|e| e.as_object().unwrap().values().all(|s| s == "done")));
    let (_, stats) = app.get("/v1/jobs/stats").await;
    assert_eq!(
        stats,
        json!({"queued": 0, "running": 0, "done": 1000, "failed": 0, "cancelled": 1, "in_progress": 0})
    );
    app.stop().await;
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after_on_both_apis() {
    let app = TestApp::spawn_with(|c| {
        c.workers = Some(1);
        c.queue_capacity = 2;
    })
    .await;
    let blocker = app.submit("test.sleep", json!({ "ms": 600_000 })).await;
    app.wait_status(&blocker, &["running"]).await;
    let queued = [
        app.submit("test.echo", json!({})).await,
        app.submit("test.echo", json!({})).await,
    ];

    let res = app
        .client
        .post(app.url("/v1/jobs"))
        .json(&json!({ "kind": "test.echo" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    let body: Value = res.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("queue is full"),
        "{body}"
    );

    let res = app
        .client
        .post(app.url("/api/states_mean"))
        .json(&json!({ "question": Q1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key("retry-after"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "error");

    let page = app.metrics().await;
    assert_eq!(metric(&page, "tally_queue_rejections_total"), Some(2.0));
    assert_eq!(metric(&page, "tally_queue_depth"), Some(2.0));
    // Freeing the worker drains the queue; new work is accepted again.
    app.client
        .delete(app.url(&format!("/v1/jobs/{blocker}")))
        .send()
        .await
        .unwrap();
    for id in &queued {
        app.wait_job(id).await;
    }
    let id = app.submit("test.echo", json!({ "x": 1 })).await;
    assert_eq!(app.wait_job(&id).await["result"], json!({ "x": 1 }));
    app.stop().await;
}

#[tokio::test]
async fn a_panicking_job_fails_with_its_message_and_its_worker_is_replaced() {
    let app = TestApp::spawn_with(|c| c.workers = Some(1)).await;
    for round in 1..=3 {
        let id = app
            .submit("test.panic", json!({ "message": format!("boom {round}") }))
            .await;
        let job = app.wait_job(&id).await;
        assert_eq!(job["status"], "failed");
        assert_eq!(job["error"], format!("worker panicked: boom {round}"));
        // The only worker died; a job still runs, so it was replaced.
        let ok = app.submit("test.echo", json!({ "round": round })).await;
        assert_eq!(app.wait_job(&ok).await["result"], json!({ "round": round }));
    }
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let page = app.metrics().await;
    assert_eq!(metric(&page, "tally_worker_restarts_total"), Some(3.0));
    assert_eq!(metric(&page, "tally_workers"), Some(1.0));
    assert_eq!(
        metric(
            &page,
            "tally_jobs_finished_total{kind=\"test.panic\",outcome=\"panic\"}"
        ),
        Some(3.0)
    );
    app.stop().await;
}

#[tokio::test]
async fn a_job_past_its_timeout_fails_as_timed_out_and_frees_its_worker() {
    let app = TestApp::spawn_with(|c| {
        c.workers = Some(1);
        c.job_timeout = 1;
    })
    .await;
    let id = app.submit("test.sleep", json!({ "ms": 600_000 })).await;
    let job = app.wait_job(&id).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"], "timed out after 1 s");
    let next = app.submit("test.echo", json!({})).await;
    assert_eq!(app.wait_job(&next).await["status"], "done");
    let page = app.metrics().await;
    assert_eq!(
        metric(
            &page,
            "tally_jobs_finished_total{kind=\"test.sleep\",outcome=\"timeout\"}"
        ),
        Some(1.0)
    );
    app.stop().await;
}

#[tokio::test]
async fn running_and_queued_jobs_can_be_cancelled_once() {
    let app = TestApp::spawn_with(|c| c.workers = Some(1)).await;
    let running = app.submit("test.sleep", json!({ "ms": 600_000 })).await;
    app.wait_status(&running, &["running"]).await;
    let queued = app.submit("test.echo", json!({})).await;

    for id in [&queued, &running] {
        let res = app
            .client
            .delete(app.url(&format!("/v1/jobs/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body, json!({ "id": id, "status": "cancelled" }));
    }
    let q = app.wait_job(&queued).await;
    assert_eq!(q["status"], "cancelled");
    assert_eq!(
        q["started_at"],
        Value::Null,
        "a job cancelled in the queue never starts"
    );
    assert_eq!(app.wait_job(&running).await["status"], "cancelled");

    let res = app
        .client
        .delete(app.url(&format!("/v1/jobs/{running}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    let res = app
        .client
        .delete(app.url("/v1/jobs/job_id_999999"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    // The worker is free again.
    let next = app.submit("test.echo", json!({})).await;
    assert_eq!(app.wait_job(&next).await["status"], "done");
    app.stop().await;
}

#[tokio::test]
async fn the_job_list_pages_newest_first_and_filters() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = app.submit("test.echo", json!({ "i": i })).await;
        app.wait_job(&id).await;
        ids.push(id);
    }
    let failed = app
        .submit("stats.global_mean", json!({ "question": "nope" }))
        .await;
    app.wait_job(&failed).await;

    let (_, page) = app.get("/v1/jobs?limit=2&kind=test.echo").await;
    let got: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[4].as_str(), ids[3].as_str()]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, page) = app
        .get(&format!("/v1/jobs?limit=2&kind=test.echo&cursor={cursor}"))
        .await;
    let got: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[2].as_str(), ids[1].as_str()]);

    let (_, page) = app.get("/v1/jobs?status=failed").await;
    let jobs = page["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["id"], failed.as_str());
    assert_eq!(page["next_cursor"], Value::Null);
    app.stop().await;
}

#[tokio::test]
async fn healthz_answers_in_milliseconds_while_every_worker_is_busy() {
    let app = TestApp::spawn_with(|c| c.workers = Some(2)).await;
    let a = app.submit("test.sleep", json!({ "ms": 600_000 })).await;
    let b = app.submit("test.sleep", json!({ "ms": 600_000 })).await;
    app.wait_status(&a, &["running"]).await;
    app.wait_status(&b, &["running"]).await;
    let page = app.metrics().await;
    assert_eq!(metric(&page, "tally_busy_workers"), Some(2.0));
    // Bounded, not timed: the request must complete while both workers stay busy.
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        app.client.get(app.url("/healthz")).send(),
    )
    .await
    .expect("healthz answers while workers are busy")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    for id in [&a, &b] {
        app.client
            .delete(app.url(&format!("/v1/jobs/{id}")))
            .send()
            .await
            .unwrap();
    }
    app.stop().await;
}

#[tokio::test]
async fn the_memory_store_evicts_the_oldest_results_past_its_cap() {
    let app = TestApp::spawn_with(|c| {
        c.store = tally::config::StoreSpec::Memory;
        c.memory_max_results = 3;
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = app.submit("test.echo", json!({ "i": i })).await;
        app.wait_job(&id).await;
        ids.push(id);
    }
    let (status, _) = app.get(&format!("/v1/jobs/{}", ids[0])).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, r) = app.get(&format!("/api/get_results/{}", ids[1])).await;
    assert_eq!(r["reason"], "Invalid job_id");
    let (_, last) = app.get(&format!("/v1/jobs/{}", ids[4])).await;
    assert_eq!(last["result"], json!({ "i": 4 }));
    // A counter: TYPE counter, `_total`, and a second scrape adds nothing.
    for _ in 0..2 {
        let page = app.metrics().await;
        assert!(
            page.lines()
                .any(|l| l == "# TYPE tally_store_evictions counter"),
            "{page}"
        );
        assert_eq!(metric(&page, "tally_store_evictions_total"), Some(2.0));
    }
    app.stop().await;
}
