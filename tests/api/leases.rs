//! Leases, attempts and retries through the HTTP API: a stalled worker loses its job to
//! another and its late outcome is refused; a failed or cancelled job runs again under
//! its id; on every store.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{eventually, metric, on_every_store, Backend, TestApp};

on_every_store!(
    a_stalled_worker_loses_its_job_and_its_late_outcome_is_refused,
    a_job_that_stalls_every_time_fails_for_good_after_max_attempts,
    a_failed_or_cancelled_job_runs_again_under_its_id_with_its_next_attempt,
    a_job_sees_its_attempt_number_from_its_first_run,
);

async fn a_stalled_worker_loses_its_job_and_its_late_outcome_is_refused(store: Backend) {
    let app = TestApp::on(store, |c| {
        c.lease_ms = 300;
        c.workers = Some(2);
    })
    .await;
    // Attempt 1 sleeps 2 s without a sign of life; attempt 2 answers at once.
    let id = app
        .submit("test.stall", json!({ "ms": 2000, "stall_attempts": 1 }))
        .await;
    let job = app.wait_job(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["result"], json!({ "attempt": 2 }), "{job}");
    assert_eq!(job["attempts"], 2);

    // The stalled attempt wakes up later; its outcome is refused and counted.
    eventually("the stale outcome to be refused", async || {
        let fenced = metric(&app.metrics().await, "tally_queue_fenced_total");
        if fenced == Some(1.0) {
            Ok(())
        } else {
            Err(format!("tally_queue_fenced_total {fenced:?}"))
        }
    })
    .await;
    let m = app.metrics().await;
    assert_eq!(metric(&m, "tally_queue_reclaims_total"), Some(1.0));
    let (_, job) = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(
        (
            job["status"].clone(),
            job["result"].clone(),
            job["attempts"].clone()
        ),
        (json!("done"), json!({ "attempt": 2 }), json!(2)),
        "the job ended once, with the newer attempt's result"
    );
    let (_, counts) = app.get("/v1/jobs/stats").await;
    assert_eq!(counts["done"], 1);
    assert_eq!(counts["in_progress"], 0);
}

async fn a_job_that_stalls_every_time_fails_for_good_after_max_attempts(store: Backend) {
    let app = TestApp::on(store, |c| {
        c.lease_ms = 200;
        c.workers = Some(3);
        c.max_attempts = 2;
    })
    .await;
    let id = app
        .submit("test.stall", json!({ "ms": 1500, "stall_attempts": 10 }))
        .await;
    let job = app.wait_job(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempts"], 2);
    let err = job["error"].as_str().unwrap_or_default();
    assert!(err.contains("gave up after 2 attempts"), "{err}");
    assert_eq!(
        metric(&app.metrics().await, "tally_queue_dead_letters_total"),
        Some(1.0)
    );
}

async fn a_failed_or_cancelled_job_runs_again_under_its_id_with_its_next_attempt(store: Backend) {
    let app = TestApp::on(store, |_| {}).await;
    let failed = app
        .submit("test.panic", json!({ "message": "first" }))
        .await;
    let job = app.wait_job(&failed).await;
    assert_eq!(
        (job["status"].clone(), job["attempts"].clone()),
        (json!("failed"), json!(1))
    );

    let (status, body) = app
        .post(&format!("/v1/jobs/{failed}/retry"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body, json!({ "id": failed, "status": "queued" }));
    let job = app.wait_job(&failed).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["attempts"], 2, "{job}");

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
    assert_eq!(job["error"], json!(null), "the last run's error is cleared");

    // Only failed and cancelled jobs run again.
    let (status, body) = app
        .post(&format!("/v1/jobs/{slow}/retry"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("is running"),
        "{body}"
    );
    let done = app.submit("test.echo", json!({})).await;
    app.wait_job(&done).await;
    let (status, _) = app
        .post(&format!("/v1/jobs/{done}/retry"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = app.post("/v1/jobs/job_id_999999/retry", &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.post("/v1/jobs/nope/retry", &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn retrying_needs_the_token_when_one_is_set() {
    let app = TestApp::spawn_with(|c| {
        c.auth_token = Some(tally::config::Secret("s3cret".into()));
    })
    .await;
    let (status, _) = app.post("/v1/jobs/job_id_1/retry", &json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

async fn a_job_sees_its_attempt_number_from_its_first_run(store: Backend) {
    // Tracked from its admission, the job's record and its running code agree.
    let app = TestApp::on(store, |_| {}).await;
    let id = app
        .submit("test.stall", json!({ "ms": 0, "stall_attempts": 0 }))
        .await;
    let job = app.wait_job(&id).await;
    assert_eq!(
        (job["result"].clone(), job["attempts"].clone()),
        (json!({ "attempt": 1 }), json!(1)),
        "{job}"
    );
}
