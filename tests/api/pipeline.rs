//! The ordered pipeline end to end: `tally load` against the real binary, SIGTERM and
//! kill -9 in the middle of a run, failed processing, bad input, a full reorder buffer,
//! and `--store memory` leaving the disk alone.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{eventually, metric, Proc, TestApp, PATIENCE};

/// The journal's lines, parsed; panics on a line that is not JSON (a torn line).
fn journal(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "the journal ends in a torn line"
    );
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("line {}: {e}: {l}", i + 1))
        })
        .collect()
}

/// Polls until the journal has at least `n` lines.
async fn wait_lines(path: &Path, n: usize) -> Vec<Value> {
    eventually(&format!("the journal to have {n} lines"), async || {
        let lines = journal(path);
        if lines.len() >= n {
            Ok(lines)
        } else {
            Err(format!(
                "the journal has {} lines, expected {n}",
                lines.len()
            ))
        }
    })
    .await
}

/// Checks the journal's invariants: sequence numbers 1, 2, 3, ... with no gap and no
/// repeat, and each (conn, conn_seq) at most once. Returns the sequence numbers.
fn assert_ordered_once(lines: &[Value]) -> HashSet<u64> {
    let mut seen = HashSet::new();
    let mut pairs = HashSet::new();
    for (i, l) in lines.iter().enumerate() {
        let seq = l["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {l}"));
        assert_eq!(seq, i as u64 + 1, "line {} has seq {seq}", i + 1);
        let pair = (l["conn"].as_u64().unwrap(), l["conn_seq"].as_u64().unwrap());
        assert!(pairs.insert(pair), "{pair:?} journaled twice");
        seen.insert(seq);
    }
    seen
}

/// `conn conn_seq seq` lines written by `tally load --acks-out`.
fn acked_seqs(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap())
        .collect()
}

/// Runs `tally load --json` against `target`; returns its summary.
fn load(target: &str, acks: &Path, extra: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["load", "--target", target, "--json", "--quiet"])
        .args(["--connection-count", "100", "--connection-value", "100"])
        .args([
            "--delay-range",
            "0.02",
            "--timeout-s",
            "10",
            "--max-retries",
            "2",
        ])
        .arg("--acks-out")
        .arg(acks)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("tally load starts")
}

async fn summary_of(child: tokio::process::Child) -> Value {
    let out = child.wait_with_output().await.expect("tally load ends");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

async fn metrics_text(addr: &str) -> String {
    match reqwest::get(format!("{addr}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Polls `/metrics` until at least `n` events were acknowledged.
async fn wait_accepted(addr: &str, n: f64) {
    eventually(&format!("{n} events to be accepted"), async || {
        let page = metrics_text(addr).await;
        let accepted = metric(&page, "tally_events_accepted_total").unwrap_or(0.0);
        if accepted >= n {
            Ok(())
        } else {
            Err(format!("{accepted} events accepted, fewer than {n}"))
        }
    })
    .await
}

fn serve_args(dir: &Path) -> Vec<String> {
    vec![
        "--store".into(),
        format!("sqlite:{}", dir.join("t.db").display()),
        "--journal".into(),
        dir.join("j.jsonl").display().to_string(),
        "--process-delay-max-ms".into(),
        "20".into(),
    ]
}

fn start(dir: &Path) -> Proc {
    let args = serve_args(dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::start(dir, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_from_a_hundred_connections_are_journaled_once_each_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path());
    let acks = dir.path().join("acks.txt");
    let summary = summary_of(load(&p.addr, &acks, &[])).await;
    assert_eq!(summary["sent"], 10_000, "{summary}");
    assert_eq!(summary["acknowledged"], 10_000, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");

    let j = dir.path().join("j.jsonl");
    let lines = wait_lines(&j, 10_000).await;
    p.signal(libc::SIGTERM);
    let (status, _) = tokio::task::spawn_blocking(move || p.wait_exit(PATIENCE))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let lines_after = journal(&j);
    assert_eq!(lines_after.len(), 10_000);
    assert_eq!(lines.len(), 10_000);
    let seqs = assert_ordered_once(&lines_after);
    let acked = acked_seqs(&acks);
    assert_eq!(acked.len(), 10_000);
    assert!(acked.iter().all(|s| seqs.contains(s)));
    assert!(lines_after.iter().all(|l| l["status"] == "ok"));
    // Everything is journaled: the write-ahead log was emptied at the clean stop.
    assert_eq!(std::fs::metadata(accepted(&j)).unwrap().len(), 0);
}

fn accepted(journal: &Path) -> PathBuf {
    tally::pipeline::accepted_path(journal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_in_the_middle_of_a_run_journals_every_acknowledged_event_before_exit() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path());
    let acks = dir.path().join("acks.txt");
    let child = load(&p.addr, &acks, &[]);
    wait_accepted(&p.addr, 3000.0).await;
    p.signal(libc::SIGTERM);
    let (status, lines) = tokio::task::spawn_blocking(move || p.wait_exit(PATIENCE))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        lines.iter().any(|l| l.contains("pipeline drained")),
        "{lines:?}"
    );
    let summary = summary_of(child).await;
    let j = dir.path().join("j.jsonl");
    let journaled = journal(&j);
    let seqs = assert_ordered_once(&journaled);
    let acked = acked_seqs(&acks);
    assert!(acked.len() >= 2500, "{summary}");
    assert_eq!(
        acked.len() as u64,
        summary["acknowledged"].as_u64().unwrap()
    );
    for s in &acked {
        assert!(
            seqs.contains(s),
            "acknowledged seq {s} is not in the journal"
        );
    }
    assert_eq!(std::fs::metadata(accepted(&j)).unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_a_restart_recovers_every_acknowledged_event_without_torn_or_repeated_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path());
    let acks = dir.path().join("acks.txt");
    let child = load(&p.addr, &acks, &[]);
    wait_accepted(&p.addr, 3000.0).await;
    p.kill9();
    let summary = summary_of(child).await;
    let acked = acked_seqs(&acks);
    assert!(acked.len() >= 2500, "{summary}");

    // What a crash in the middle of a write leaves: a torn last line.
    let j = dir.path().join("j.jsonl");
    let before = std::fs::read_to_string(&j).unwrap();
    std::fs::write(&j, format!("{before}{{\"seq\":99999,\"conn\":")).unwrap();

    let p = start(dir.path());
    let (status, _) = p.client().get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let recovered = journal(&j);
    let seqs = assert_ordered_once(&recovered);
    for s in &acked {
        assert!(
            seqs.contains(s),
            "acknowledged seq {s} is missing after recovery"
        );
    }
    // The numbering goes on after the recovered records.
    let (status, body) = p
        .client()
        .post(
            "/v1/events",
            &json!({"conn": 1, "seq": 1_000, "value": 1, "sent_at": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["seq"].as_u64().unwrap() > recovered.len() as u64,
        "{body}"
    );
    p.signal(libc::SIGTERM);
    let (status, lines) = tokio::task::spawn_blocking(move || p.wait_exit(PATIENCE))
        .await
        .unwrap();
    assert!(status.success());
    assert!(
        lines.iter().any(|l| l.contains("journal recovered")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("torn line")), "{lines:?}");
    let after = journal(&j);
    assert_ordered_once(&after);
    assert_eq!(after.len(), recovered.len() + 1);
}

#[tokio::test]
async fn an_event_that_fails_processing_is_journaled_as_failed_and_later_ones_follow_it() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("events.jsonl");
    let jc = j.clone();
    let app = TestApp::spawn_with(move |c| {
        c.journal = Some(jc);
        c.process_delay_max_ms = 30;
    })
    .await;
    let bodies = [
        json!({"conn": 7, "seq": 1, "value": "not a number", "sent_at": 1_700_000_000}),
        json!({"conn": 7, "seq": 2, "value": 42, "sent_at": 1_700_000_000_000u64}),
        json!({"conn": 7, "seq": 3, "value": "2.5", "sent_at": 1.5}),
    ];
    for (i, b) in bodies.iter().enumerate() {
        let (status, body) = app.post("/v1/events", b).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, json!({"asyncAnswer": "Ok", "seq": i + 1}));
    }
    let lines = wait_lines(&j, 3).await;
    assert_ordered_once(&lines);
    assert_eq!(lines[0]["status"], "failed");
    assert_eq!(lines[0]["result"], Value::Null);
    assert!(
        lines[0]["error"].as_str().unwrap().contains("not a number"),
        "{}",
        lines[0]
    );
    assert_eq!(lines[1]["status"], "ok");
    assert_eq!(lines[1]["result"], 42);
    assert_eq!(lines[2]["result"], 2.5);
    // The counters move just after the write: poll them.
    eventually("1 failed and 2 ok events journaled", async || {
        let page = app.metrics().await;
        let failed = metric(&page, "tally_events_journaled_total{status=\"failed\"}");
        let ok = metric(&page, "tally_events_journaled_total{status=\"ok\"}");
        if (failed, ok) == (Some(1.0), Some(2.0)) {
            Ok(())
        } else {
            Err(format!("journaled counters: {failed:?} failed, {ok:?} ok"))
        }
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn bad_events_get_a_4xx_problem_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let jc = dir.path().join("j.jsonl");
    let app = TestApp::spawn_with(move |c| c.journal = Some(jc)).await;
    let ok = json!({"conn": 1, "seq": 1, "value": 1, "sent_at": 1});
    let mut cases: Vec<(String, u16, &str)> = Vec::new();
    for field in ["conn", "seq", "value", "sent_at"] {
        let mut b = ok.clone();
        b.as_object_mut().unwrap().remove(field);
        cases.push((b.to_string(), 422, field));
    }
    for (field, bad, needle) in [
        ("conn", json!("one"), "conn"),
        ("seq", json!(-1), "seq"),
        ("value", json!({"x": 1}), "value"),
        ("value", json!(true), "value"),
        ("value", json!(null), "value"),
        ("sent_at", json!("now"), "sent_at"),
        ("sent_at", json!(-5), "sent_at"),
        ("extra", json!(1), "unknown field `extra`"),
    ] {
        let mut b = ok.clone();
        b[field] = bad;
        cases.push((b.to_string(), 422, needle));
    }
    cases.push(("{\"conn\": 1,".into(), 400, "JSON"));
    cases.push(("[1, 2]".into(), 422, "expected struct"));
    for (body, want, needle) in &cases {
        let res = app
            .client
            .post(app.url("/v1/events"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), *want, "{body}");
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "{body}"
        );
        let problem: Value = res.json().await.unwrap();
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(needle), "{body}: {detail}");
    }
    let res = app
        .client
        .post(app.url("/v1/events"))
        .body(ok.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let page = app.metrics().await;
    assert_eq!(metric(&page, "tally_events_accepted_total"), Some(0.0));
    app.stop().await;
}

#[tokio::test]
async fn events_need_the_token_when_auth_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let jc = dir.path().join("j.jsonl");
    let app = TestApp::spawn_with(move |c| {
        c.journal = Some(jc);
        c.auth_token = Some(tally::config::Secret("s3cret".into()));
    })
    .await;
    let body = json!({"conn": 1, "seq": 1, "value": 1, "sent_at": 1});
    let (status, _) = app.post("/v1/events", &body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let res = app
        .client
        .post(app.url("/v1/events"))
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn a_full_reorder_buffer_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let jc = dir.path().join("j.jsonl");
    let app = TestApp::spawn_with(move |c| {
        c.journal = Some(jc);
        c.reorder_capacity = 2;
        // Processing waits up to an hour: the first two events hold the buffer.
        c.process_delay_max_ms = 3_600_000;
        c.shutdown_timeout = 0;
    })
    .await;
    for seq in 1..=2 {
        let (status, body) = app
            .post(
                "/v1/events",
                &json!({"conn": 1, "seq": seq, "value": 1, "sent_at": 1}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let res = app
        .client
        .post(app.url("/v1/events"))
        .json(&json!({"conn": 1, "seq": 3, "value": 1, "sent_at": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    let problem: Value = res.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("reorder buffer is full"),
        "{problem}"
    );
    let page = app.metrics().await;
    assert_eq!(
        metric(&page, "tally_events_rejected_total{reason=\"full\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&page, "tally_events_accepted_total"), Some(2.0));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_without_a_journal_flag_writes_nothing_to_disk() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(
        dir.path(),
        &["--store", "memory", "--process-delay-max-ms", "5"],
    );
    let c = p.client();
    for seq in 1..=20u64 {
        let (status, body) = c
            .post(
                "/v1/events",
                &json!({"conn": 1, "seq": seq, "value": seq, "sent_at": 1}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["seq"], seq);
    }
    let addr = p.addr.clone();
    eventually("the 20 events to be journaled", async || {
        match metric(
            &metrics_text(&addr).await,
            "tally_events_journaled_total{status=\"ok\"}",
        ) {
            Some(20.0) => Ok(()),
            ok => Err(format!("{ok:?} events journaled ok")),
        }
    })
    .await;
    p.signal(libc::SIGTERM);
    let (status, _) = tokio::task::spawn_blocking(move || p.wait_exit(PATIENCE))
        .await
        .unwrap();
    assert!(status.success());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "files on disk: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_load_in_jobs_mode_submits_jobs_and_lists_their_ids() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let acks = dir.path().join("acks.txt");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["load", "--target", &app.addr, "--json", "--quiet"])
        .args([
            "--mode",
            "jobs",
            "--kind",
            "test.echo",
            "--params",
            "{\"n\": 1}",
        ])
        .args(["--connection-count", "4", "--connection-value", "5"])
        .args(["--delay-range", "0"])
        .arg("--acks-out")
        .arg(&acks)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (summary["sent"].as_u64(), summary["acknowledged"].as_u64()),
        (Some(20), Some(20))
    );
    let ids: Vec<String> = std::fs::read_to_string(&acks)
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().nth(2).unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 20);
    let job = app.wait_job(&ids[0]).await;
    assert_eq!(job["status"], "done", "{job}");

    // Without --kind, jobs mode says what is missing.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["load", "--target", &app.addr, "--mode", "jobs"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kind"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_given_the_same_journal_answers_503_naming_it_and_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("shared.jsonl");
    let journal = journal.to_str().unwrap();
    let args = ["--store", "memory", "--journal", journal];
    let first = Proc::start(dir.path(), &args);
    let second = Proc::start(dir.path(), &args);
    let event = json!({"conn": 1, "seq": 1, "value": 1, "sent_at": 1});
    let (status, body) = first.client().post("/v1/events", &event).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = second.client().post("/v1/events", &event).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("in use by another tally process"), "{body}");
    let (status, body) = second.client().get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("in use by another tally process"),
        "{body}"
    );
    // The first goes on as the journal's one writer.
    let (status, _) = first.client().get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    let event = json!({"conn": 1, "seq": 2, "value": 2, "sent_at": 1});
    let (status, body) = first.client().post("/v1/events", &event).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
