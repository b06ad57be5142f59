//! A store that cannot write (a full disk, simulated with the process's file size
//! limit, which makes every write fail as ENOSPC would, and can be lifted at once): clients get 503 naming the cause,
//! `/readyz` says so, outcomes are kept until they can be written, and everything
//! recovers by itself once there is room again.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{eventually, metric, Proc, PATIENCE};

/// A file size limit under which no write to any file can succeed.
const NO_ROOM: Option<u64> = Some(1);

#[tokio::test]
async fn a_full_disk_answers_503_naming_the_cause_and_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &["--store", "sqlite:t.db"]);
    let c = p.client();
    p.set_max_file_size(NO_ROOM);
    let res = c
        .http
        .post(format!("{}/v1/jobs", c.addr))
        .json(&json!({ "kind": "test.echo", "params": {} }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        res.headers()["content-type"],
        "application/problem+json",
        "a problem document"
    );
    assert!(res.headers().contains_key("retry-after"));
    let body: Value = res.json().await.unwrap();
    let detail = body["detail"].as_str().unwrap_or_default().to_string();
    assert!(
        detail.contains("sqlite store is unavailable") && detail.contains("File too large"),
        "the detail names the store and the cause: {detail}"
    );

    // Readiness says so; liveness does not.
    let (status, ready) = c.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert!(
        ready["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot write"),
        "{ready}"
    );
    assert_eq!(c.get("/healthz").await.0, StatusCode::OK);

    // The compatible API answers in its own shape.
    let q = "Percent of adults aged 18 years and older who have obesity";
    let (status, body) = c.post("/api/global_mean", &json!({ "question": q })).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "error");
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("File too large"),
        "{body}"
    );

    // Room again: no request needed, the store notices by itself.
    p.set_max_file_size(None);
    c.wait_until("/readyz to answer 200 again", async |c| {
        c.get("/readyz").await.0 == StatusCode::OK
    })
    .await;
    let id = c.submit("test.echo", json!({ "after": true })).await;
    c.wait_until("the job after recovery to finish", async |c| {
        c.status_of(&id).await == "done"
    })
    .await;
}

#[tokio::test]
async fn an_outcome_that_cannot_be_written_is_kept_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &["--store", "sqlite:t.db"]);
    let c = p.client();
    // Accepted while there is room; its outcome comes once there is none.
    let id = c
        .submit(
            "test.blob",
            json!({ "bytes": 3 << 20, "ms": 1000, "seed": "outcome" }),
        )
        .await;
    p.set_max_file_size(NO_ROOM);
    c.wait_until("the outcome write to fail and be retried", async |c| {
        let (_, m) = c.get("/metrics").await;
        metric(
            m.as_str().unwrap_or(""),
            "tally_store_outcome_retries_total",
        )
        .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    // Not lost, not finished: still in flight, and counted as such everywhere.
    assert_eq!(c.status_of(&id).await, "running");
    assert_eq!(c.get("/api/num_jobs").await.1, json!({ "num_jobs": 1 }));
    assert_eq!(c.get("/storage/get_counter").await.1, json!(1));

    p.set_max_file_size(None);
    c.wait_until("the kept outcome to be written", async |c| {
        c.status_of(&id).await == "done"
    })
    .await;
    let (_, job) = c.get(&format!("/v1/jobs/{id}")).await;
    let result = job["result"].as_str().unwrap_or_default();
    assert_eq!(result.len(), 3 << 20);
    assert!(result.starts_with("outcome"));
    assert_eq!(job["attempts"], 1, "written, not run again");
    assert_eq!(c.get("/api/num_jobs").await.1, json!({ "num_jobs": 0 }));
}

#[tokio::test]
async fn a_drain_does_not_claim_success_while_an_outcome_is_unwritten() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(
        dir.path(),
        &["--store", "sqlite:t.db", "--shutdown-timeout", "1"],
    );
    let c = p.client();
    let id = c
        .submit(
            "test.blob",
            json!({ "bytes": 3 << 20, "ms": 1000, "seed": "drain" }),
        )
        .await;
    p.set_max_file_size(NO_ROOM);
    c.wait_until("the outcome write to fail", async |c| {
        let (_, m) = c.get("/metrics").await;
        metric(
            m.as_str().unwrap_or(""),
            "tally_store_outcome_retries_total",
        )
        .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    p.signal(libc::SIGTERM);
    let (status, lines) = p.wait_exit(PATIENCE);
    assert!(status.success(), "{status:?}");
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("every accepted job finished")),
        "the drain claimed success: {lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("drain deadline passed")),
        "{lines:#?}"
    );

    // The next start (with room) runs it again and records it.
    let p = Proc::start(dir.path(), &["--store", "sqlite:t.db"]);
    let c = p.client();
    let job = eventually("the job to finish after the restart", async || {
        let (_, job) = c.get(&format!("/v1/jobs/{id}")).await;
        if job["status"] == "done" {
            Ok(job)
        } else {
            Err(job.to_string())
        }
    })
    .await;
    assert!(job["result"]
        .as_str()
        .unwrap_or_default()
        .starts_with("drain"));
    // Run again: its first start may or may not have reached the disk.
    assert!(job["attempts"].as_u64().unwrap_or(0) >= 1, "{job}");
}
