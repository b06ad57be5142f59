//! Shutdown and recovery with the real binary: the graceful-shutdown route, SIGTERM,
//! a second signal, the drain deadline, and kill -9 followed by a restart.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{metric, Proc, ProcClient};

const Q1: &str = "Percent of adults aged 18 years and older who have obesity";

async fn submit_sleepers(c: &ProcClient, n: usize, ms: u64) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(c.submit("test.sleep", json!({ "ms": ms })).await);
    }
    ids
}

#[tokio::test]
async fn the_graceful_shutdown_route_drains_every_queued_job_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("t.db").display());
    let p = Proc::start(
        dir.path(),
        &[
            "--store",
            &db,
            "--workers",
            "1",
            "--shutdown-linger-ms",
            "300",
        ],
    );
    let c = p.client();
    let ids = submit_sleepers(&c, 4, 150).await;
    let stat_id = c
        .post("/api/global_mean", &json!({ "question": Q1 }))
        .await
        .1["job_id"]
        .as_str()
        .unwrap()
        .to_string();

    let (_, first) = c.get("/api/graceful_shutdown").await;
    assert_eq!(first, json!({ "status": "running" }));
    // Intake is closed on both APIs; reads keep working.
    let (status, refused) = c.post("/api/states_mean", &json!({ "question": Q1 })).await;
    assert_eq!(
        refused,
        json!({ "status": "error", "reason": "shutting down" })
    );
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _) = c.post("/v1/jobs", &json!({ "kind": "test.echo" })).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _) = c.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    c.wait_until("num_jobs to reach 0", async |c| {
        c.get("/api/num_jobs").await.1["num_jobs"] == 0
    })
    .await;
    let (_, last) = c.get("/api/graceful_shutdown").await;
    assert_eq!(last, json!({ "status": "done" }));
    for id in &ids {
        let (_, r) = c.get(&format!("/api/get_results/{id}")).await;
        assert_eq!(r["status"], "done", "{id}: {r}");
    }
    let (_, r) = c.get(&format!("/api/get_results/{stat_id}")).await;
    assert_eq!(r["status"], "done");
    let (status, lines) = p.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
    assert!(
        lines.iter().any(|l| l.contains("drain complete")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn sigterm_finishes_queued_work_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("t.db").display());
    let p = Proc::start(dir.path(), &["--store", &db, "--workers", "1"]);
    let c = p.client();
    let ids = submit_sleepers(&c, 3, 200).await;
    p.signal(libc::SIGTERM);
    let (status, _) = p.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");

    // Every job finished before the exit: a restart finds them done, nothing to resume.
    let p = Proc::start(dir.path(), &["--store", &db]);
    let c = p.client();
    for id in &ids {
        assert_eq!(c.status_of(id).await, "done", "{id}");
    }
    assert!(!p
        .lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("resuming")));
}

#[tokio::test]
async fn a_second_signal_exits_at_once_and_the_work_resumes_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("t.db").display());
    let p = Proc::start(
        dir.path(),
        &[
            "--store",
            &db,
            "--workers",
            "1",
            "--shutdown-timeout",
            "600",
        ],
    );
    let c = p.client();
    let ids = submit_sleepers(&c, 2, 3_000).await;
    c.wait_until("the first job to run", async |c| {
        c.status_of(&ids[0]).await == "running"
    })
    .await;
    p.signal(libc::SIGINT);
    c.wait_until("readyz to report draining", async |c| {
        c.get("/readyz").await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    p.signal(libc::SIGINT);
    // A drain would wait for both 3 s jobs and exit 0; the second signal skips the drain
    // and exits 130 (told apart by the status, not by timing).
    let (status, _) = p.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(130),
        "the second signal exits without draining: {status:?}"
    );

    let p = Proc::start(dir.path(), &["--store", &db, "--workers", "2"]);
    let c = p.client();
    for id in &ids {
        c.wait_until("a resumed job to finish", async |c| {
            c.status_of(id).await == "done"
        })
        .await;
    }
}

#[tokio::test]
async fn jobs_unfinished_at_the_drain_deadline_stay_queued_and_run_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("t.db").display());
    let p = Proc::start(
        dir.path(),
        &["--store", &db, "--workers", "1", "--shutdown-timeout", "1"],
    );
    let c = p.client();
    let ids = submit_sleepers(&c, 3, 2_500).await;
    c.wait_until("the first job to run", async |c| {
        c.status_of(&ids[0]).await == "running"
    })
    .await;
    p.signal(libc::SIGTERM);
    let (status, lines) = p.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "a drain that times out still exits 0: {status:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("drain deadline passed")),
        "{lines:?}"
    );

    let p = Proc::start(dir.path(), &["--store", &db, "--workers", "3"]);
    let c = p.client();
    for id in &ids {
        c.wait_until("a resumed job to finish", async |c| {
            c.status_of(id).await == "done"
        })
        .await;
    }
    assert!(p
        .lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("resuming") && l.contains("jobs=3")));
}

fn ms_of(v: &Value) -> i64 {
    let s = v.as_str().unwrap();
    humantime::parse_rfc3339(s)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn after_kill_9_a_restart_runs_every_unfinished_job_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("t.db").display());
    let p = Proc::start(dir.path(), &["--store", &db, "--workers", "2"]);
    let c = p.client();
    let ids = submit_sleepers(&c, 8, 400).await;
    c.wait_until("some jobs to finish", async |c| {
        c.status_of(&ids[0]).await == "done"
    })
    .await;
    p.kill9();
    let restarted_at = tally::now_ms();

    let p = Proc::start(dir.path(), &["--store", &db, "--workers", "2"]);
    let c = p.client();
    let mut rerun = 0;
    for id in &ids {
        c.wait_until("every job to finish", async |c| {
            c.status_of(id).await == "done"
        })
        .await;
        let (_, job) = c.get(&format!("/v1/jobs/{id}")).await;
        if ms_of(&job["finished_at"]) >= restarted_at {
            rerun += 1;
        }
    }
    assert!(
        rerun >= 1 && rerun < ids.len(),
        "some jobs were done before the kill, some after: {rerun}"
    );
    let page = crate::helpers::text_of(&c.http, &format!("{}/metrics", c.addr)).await;
    let finished_here = metric(
        &page,
        "tally_jobs_finished_total{kind=\"test.sleep\",outcome=\"done\"}",
    );
    assert_eq!(
        finished_here,
        Some(rerun as f64),
        "each unfinished job ran once after the restart"
    );
}

#[tokio::test]
async fn the_memory_store_writes_nothing_to_disk() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &["--store", "memory"]);
    let c = p.client();
    for _ in 0..20 {
        let id = c
            .post("/api/states_mean", &json!({ "question": Q1 }))
            .await
            .1["job_id"]
            .as_str()
            .unwrap()
            .to_string();
        c.wait_until("the job", async |c| {
            c.get(&format!("/api/get_results/{id}")).await.1["status"] == "done"
        })
        .await;
    }
    p.signal(libc::SIGTERM);
    let (status, _) = p.wait_exit(Duration::from_secs(10));
    assert!(status.success());
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "files written: {left:?}");
}
