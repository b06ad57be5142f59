//! The dashboard's server side over HTTP: the embedded pages, `/openapi.json`, the
//! overview and pipeline snapshots, bulk cancel and retry, and the event stream
//! (including a drain with a stream open, with the real binary).

use std::time::Instant;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{eventually, on_every_store, Backend, Proc, TestApp, PATIENCE};

#[tokio::test]
async fn the_dashboard_and_its_assets_are_served_from_the_binary_with_a_same_origin_policy() {
    let app = TestApp::spawn().await;
    let res = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/html; charset=utf-8");
    let csp = res.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    let etag = res.headers()["etag"].clone();
    let html = res.text().await.unwrap();
    assert!(html.contains("/ui/js/app.js"), "{html}");
    // Every script and style the page names is served, and none is from elsewhere.
    for asset in [
        "/ui/js/app.js",
        "/ui/css/app.css",
        "/ui/vendor/uplot/uPlot.min.css",
    ] {
        assert!(html.contains(asset), "{asset}");
        let r = app.client.get(app.url(asset)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{asset}");
    }
    assert!(!html.contains("http://") && !html.contains("https://"));
    // A reload with the ETag is answered 304.
    let again = app
        .client
        .get(app.url("/"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    let docs = app.client.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap().contains("swagger-ui-bundle.js"));
    let (status, body) = app.get("/ui/nothing-here.js").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = app.get("/ui/../Cargo.toml").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn openapi_json_describes_the_job_api_with_this_servers_kinds_and_the_bearer_scheme() {
    let app = TestApp::spawn().await;
    let (status, doc) = app.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/jobs"]["post"].is_object());
    assert!(doc["paths"]["/api/states_mean"]["post"].is_object());
    assert!(doc["paths"]["/csv_name={file}"]["get"].is_object());
    assert_eq!(
        doc["paths"]["/v1/jobs"]["post"]["security"],
        json!([{ "bearer": [] }])
    );
    assert!(doc["paths"]["/v1/jobs"]["get"]["security"].is_null());
    let kinds = doc
        .pointer("/components/schemas/SubmitBody/properties/kind/enum")
        .unwrap();
    assert!(kinds.as_array().unwrap().contains(&json!("csv.column_sum")));
    assert!(kinds.as_array().unwrap().contains(&json!("test.echo")));
}

#[tokio::test]
async fn the_overview_counts_jobs_and_gives_percentiles_of_recent_run_times() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.submit("test.sleep", json!({ "ms": 30 })).await);
    }
    ids.push(app.submit("test.panic", json!({})).await);
    for id in &ids {
        app.wait_job(id).await;
    }
    // The store's counts follow the jobs' records a moment later.
    let o = eventually("no job in progress in the overview", async || {
        let (status, o) = app.get("/v1/overview").await;
        assert_eq!(status, StatusCode::OK, "{o}");
        if o["jobs"]["in_progress"] == 0 {
            Ok(o)
        } else {
            Err(o.to_string())
        }
    })
    .await;
    assert_eq!(o["store"], "sqlite");
    assert_eq!(o["draining"], false);
    assert_eq!(o["store_error"], Value::Null);
    assert_eq!(
        o["jobs"],
        json!({ "queued": 0, "running": 0, "done": 3, "failed": 1, "cancelled": 0, "in_progress": 0 })
    );
    assert_eq!(
        o["totals"],
        json!({ "submitted": 4, "done": 3, "failed": 1, "cancelled": 0 })
    );
    assert_eq!(
        o["cluster_totals"],
        Value::Null,
        "an in-process queue is the whole"
    );
    assert_eq!(o["workers"]["alive"], 2);
    assert_eq!(o["queue"], json!({ "waiting": 0, "leased": 0 }));
    let kind = |name: &str| {
        o["kinds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kind"] == name)
            .cloned()
            .unwrap()
    };
    let sleep = kind("test.sleep");
    assert_eq!(
        (sleep["submitted"].clone(), sleep["done"].clone()),
        (json!(3), json!(3))
    );
    assert_eq!(sleep["window"], 3);
    // Each run slept 30 ms, so no percentile of them can be shorter.
    assert!(sleep["p50_ms"].as_f64().unwrap() >= 30.0, "{sleep}");
    assert!(sleep["p99_ms"].as_f64().unwrap() >= sleep["p50_ms"].as_f64().unwrap());
    let never = kind("csv.column_sum");
    assert_eq!(never["p50_ms"], Value::Null);
    assert_eq!(never["window"], 0);
    assert_eq!(kind("test.panic")["failed"], 1);
    let replicas = o["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 1);
    assert_eq!(replicas[0]["this"], true);
    assert_eq!(o["series"]["get_sum"], "0.0");
}

#[tokio::test]
async fn the_pipeline_snapshot_counts_accepted_and_journaled_events() {
    let app = TestApp::spawn().await;
    for (i, value) in [json!(1), json!("2.5"), json!("not a number")]
        .iter()
        .enumerate()
    {
        let (status, body) = app
            .post(
                "/v1/events",
                &json!({ "conn": 7, "seq": i, "value": value, "sent_at": 1_700_000_000_000u64 }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let p = eventually("3 events journaled", async || {
        let (_, p) = app.get("/v1/pipeline").await;
        if p["journaled"] == 3 {
            Ok(p)
        } else {
            Err(p.to_string())
        }
    })
    .await;
    assert_eq!(p["accepted"], 3);
    assert_eq!(p["journaled_ok"], 2);
    assert_eq!(p["journaled_failed"], 1);
    assert_eq!(p["waiting"], 0);
    assert_eq!(p["capacity"], 10_000);
    assert_eq!(p["draining"], false);
    assert!(
        p["journal"].as_str().unwrap().ends_with("journal.jsonl"),
        "{p}"
    );
}

/// Five jobs that wait for a worker behind one that sleeps for a long time.
async fn busy_app() -> (TestApp, String, Vec<String>) {
    let app = TestApp::spawn_with(|c| {
        c.workers = Some(1);
        c.shutdown_timeout = 1;
    })
    .await;
    let running = app.submit("test.sleep", json!({ "ms": 600000 })).await;
    app.wait_status(&running, &["running"]).await;
    let mut queued = Vec::new();
    for _ in 0..5 {
        queued.push(app.submit("test.sleep", json!({ "ms": 600000 })).await);
    }
    (app, running, queued)
}

#[tokio::test]
async fn bulk_cancel_stops_what_matches_the_filter_and_bulk_retry_queues_it_again_page_by_page() {
    let (app, running, queued) = busy_app().await;
    let echo = app.submit("test.echo", json!({})).await;

    // Queued sleepers only: the running one and the echo are left alone.
    let (status, r) = app
        .post(
            "/v1/jobs/cancel",
            &json!({ "status": "queued", "kind": "test.sleep" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(
        (r["matched"].clone(), r["affected"].clone()),
        (json!(5), json!(5))
    );
    assert_eq!(r["more"], false);
    for id in &queued {
        assert_eq!(
            app.get(&format!("/v1/jobs/{id}")).await.1["status"],
            "cancelled"
        );
    }
    assert_eq!(
        app.get(&format!("/v1/jobs/{running}")).await.1["status"],
        "running"
    );
    assert_eq!(
        app.get(&format!("/v1/jobs/{echo}")).await.1["status"],
        "queued"
    );

    // Retry two at a time: 2, then 2 more, then the last one.
    let mut affected = Vec::new();
    let mut more = Vec::new();
    for _ in 0..3 {
        let (status, r) = app
            .post(
                "/v1/jobs/retry",
                &json!({ "status": "cancelled", "limit": 2 }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{r}");
        affected.push(r["affected"].as_u64().unwrap());
        more.push(r["more"].as_bool().unwrap());
    }
    assert_eq!(affected, [2, 2, 1]);
    assert_eq!(more, [true, true, false]);
    for id in &queued {
        let j = app.get(&format!("/v1/jobs/{id}")).await.1;
        assert_eq!(j["status"], "queued", "{j}");
    }
    // Nothing cancelled is left to retry.
    let (_, r) = app.post("/v1/jobs/retry", &json!({})).await;
    assert_eq!(
        (r["matched"].clone(), r["affected"].clone()),
        (json!(0), json!(0))
    );

    // Everything in progress, running or not: the sleepers and the echo queued behind.
    let (_, r) = app.post("/v1/jobs/cancel", &json!({})).await;
    assert_eq!(r["affected"], 7, "{r}");
    assert_eq!(
        app.get(&format!("/v1/jobs/{running}")).await.1["status"],
        "cancelled"
    );
    app.stop().await;
}

on_every_store!(retry_all_matching_retries_each_failed_job_once_though_it_fails_again_at_once);

/// Submits `n` jobs that fail at once on every attempt and waits until all have failed.
pub async fn submit_failing_jobs(app: &TestApp, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(app.submit("test.panic", json!({})).await);
    }
    wait_failed(app, n).await;
    ids
}

/// Waits until `n` jobs have failed and none is queued or running.
pub async fn wait_failed(app: &TestApp, n: usize) {
    eventually("every job to have failed", async || {
        let stats = app.get("/v1/jobs/stats").await.1;
        if stats["failed"] == n && stats["in_progress"] == 0 {
            Ok(())
        } else {
            Err(stats.to_string())
        }
    })
    .await;
}

/// Each job's `attempts`, counted: attempts → jobs.
pub async fn attempts_of(app: &TestApp, ids: &[String]) -> std::collections::BTreeMap<u64, usize> {
    let mut by = std::collections::BTreeMap::new();
    for id in ids {
        let j = app.get(&format!("/v1/jobs/{id}")).await.1;
        *by.entry(j["attempts"].as_u64().unwrap_or(0)).or_default() += 1;
    }
    by
}

/// 600 jobs that fail again as soon as they run, and "retry all matching" as the
/// dashboard drives it (pages of 500, each call given the last one's cursor): each job
/// is queued again exactly once, and the calls say so (600 in all, not 711).
async fn retry_all_matching_retries_each_failed_job_once_though_it_fails_again_at_once(
    store: Backend,
) {
    let app = TestApp::on(store, |c| c.workers = Some(4)).await;
    let ids = submit_failing_jobs(&app, 600).await;
    let mut cursor = Value::Null;
    let mut affected = 0;
    let mut calls = 0;
    loop {
        calls += 1;
        assert!(calls <= 10, "the walk ends");
        let (status, r) = app
            .post("/v1/jobs/retry", &json!({ "limit": 500, "cursor": cursor }))
            .await;
        assert_eq!(status, StatusCode::OK, "{r}");
        assert_eq!(r["stopped"], Value::Null, "{r}");
        affected += r["affected"].as_u64().unwrap();
        if r["more"] == false {
            assert_eq!(r["next_cursor"], Value::Null, "{r}");
            break;
        }
        cursor = r["next_cursor"].clone();
        assert!(cursor.is_string(), "{r}");
    }
    assert_eq!(affected, 600);
    wait_failed(&app, 600).await;
    assert_eq!(
        attempts_of(&app, &ids).await,
        [(2, 600)].into(),
        "attempts → jobs"
    );
    // The walk started over finds them all again, once more each.
    let (_, r) = app.post("/v1/jobs/retry", &json!({ "limit": 1000 })).await;
    assert_eq!(
        (r["affected"].clone(), r["more"].clone()),
        (json!(600), json!(false)),
        "{r}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_bulk_cursor_that_is_not_an_id_is_refused() {
    let app = TestApp::spawn().await;
    for cursor in [json!("job_id_"), json!("x"), json!(7)] {
        let (status, r) = app
            .post("/v1/jobs/retry", &json!({ "cursor": cursor }))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{cursor}: {r}");
    }
    let (status, r) = app
        .post("/v1/jobs/cancel", &json!({ "cursor": "job_id_5" }))
        .await;
    assert_eq!(status, StatusCode::OK, "{r}");
}

#[tokio::test]
async fn bulk_actions_refuse_states_they_cannot_change_and_bad_limits() {
    let app = TestApp::spawn().await;
    for (route, body) in [
        ("/v1/jobs/cancel", json!({ "status": "done" })),
        ("/v1/jobs/cancel", json!({ "status": "failed" })),
        ("/v1/jobs/retry", json!({ "status": "running" })),
        ("/v1/jobs/retry", json!({ "status": "nonsense" })),
        ("/v1/jobs/cancel", json!({ "limit": 0 })),
        ("/v1/jobs/retry", json!({ "limit": 1001 })),
        ("/v1/jobs/retry", json!({ "colour": "red" })),
    ] {
        let (status, r) = app.post(route, &body).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{route} {body}: {r}"
        );
        assert!(r["detail"].as_str().unwrap().len() > 10, "{r}");
    }
}

#[tokio::test]
async fn bulk_actions_need_the_token_when_one_is_set_and_are_refused_to_other_sites() {
    let app = TestApp::spawn_with(|c| c.auth_token = Some("tok".parse().unwrap())).await;
    for route in ["/v1/jobs/cancel", "/v1/jobs/retry"] {
        let (status, _) = app.post(route, &json!({})).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{route}");
        let res = app
            .client
            .post(app.url(route))
            .bearer_auth("tok")
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{route}");
        let res = app
            .client
            .post(app.url(route))
            .bearer_auth("tok")
            .header("sec-fetch-site", "cross-site")
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{route}");
    }
}

/// Reads server-sent events until `stop` says enough or the stream ends; returns
/// `(event, data)` pairs and whether the stream ended.
async fn read_events(
    res: &mut reqwest::Response,
    mut stop: impl FnMut(&[(String, Value)]) -> bool,
) -> (Vec<(String, Value)>, bool) {
    let mut buf = String::new();
    let mut events = Vec::new();
    let until = Instant::now() + PATIENCE;
    loop {
        let chunk = tokio::time::timeout_at(until.into(), res.chunk())
            .await
            .expect("the stream went quiet");
        let Some(chunk) = chunk.unwrap() else {
            return (events, true);
        };
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut name = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = v.to_string();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            if !data.is_empty() {
                events.push((name, serde_json::from_str(&data).unwrap()));
            }
        }
        if stop(&events) {
            return (events, false);
        }
    }
}

#[tokio::test]
async fn the_stream_sends_the_topics_asked_for_and_the_job_each_round() {
    let app = TestApp::spawn().await;
    let id = app.submit("test.echo", json!({ "n": 1 })).await;
    app.wait_job(&id).await;
    let mut res = app
        .client
        .get(app.url(&format!(
            "/v1/stream?interval_ms=250&topics=overview,pipeline,sources&job={id}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    assert_eq!(res.headers()["x-accel-buffering"], "no");
    let (events, ended) = read_events(&mut res, |e| e.len() >= 8).await;
    assert!(!ended);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["overview", "pipeline", "sources", "job", "overview", "pipeline", "sources", "job"]
    );
    assert_eq!(events[0].1["totals"]["submitted"], 1);
    assert_eq!(events[1].1["accepted"], 0);
    assert_eq!(events[2].1, json!({ "sources": [] }));
    assert_eq!(events[3].1["id"], id);
    assert_eq!(events[3].1["result"], json!({ "n": 1 }));
    // Two rounds, two snapshots taken at different times.
    let now = |i: usize| {
        events[i].1["now"]
            .as_i64()
            .expect("a snapshot has its time")
    };
    assert!(now(4) > now(0), "the second round is a later snapshot");

    for bad in [
        "/v1/stream?interval_ms=10",
        "/v1/stream?topics=metrics",
        "/v1/stream?job=42",
        "/v1/stream?colour=red",
    ] {
        let (status, body) = app.get(bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
}

#[tokio::test]
async fn the_stream_says_when_a_job_cannot_be_read() {
    let app = TestApp::spawn().await;
    let mut res = app
        .client
        .get(app.url("/v1/stream?interval_ms=250&topics=&job=job_id_999"))
        .send()
        .await
        .unwrap();
    let (events, _) = read_events(&mut res, |e| !e.is_empty()).await;
    assert_eq!(events[0].0, "job_error");
    assert!(events[0].1["detail"]
        .as_str()
        .unwrap()
        .contains("job_id_999"));
}

#[tokio::test]
async fn a_drain_completes_with_an_event_stream_open_which_ends_with_a_shutdown_event() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("t.db").display());
    let p = Proc::start(dir.path(), &["--store", &db, "--workers", "1"]);
    let c = p.client();
    let id = c.submit("test.sleep", json!({ "ms": 300 })).await;
    // A tab that asks for an update only every minute.
    let mut res = c
        .http
        .get(format!("{}/v1/stream?interval_ms=60000", c.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let (first, _) = read_events(&mut res, |e| !e.is_empty()).await;
    assert_eq!(first[0].0, "overview");

    p.signal(libc::SIGTERM);
    let (events, ended) = read_events(&mut res, |_| false).await;
    assert!(ended, "the stream did not end: {events:?}");
    assert_eq!(
        events.last().map(|(n, _)| n.as_str()),
        Some("shutdown"),
        "{events:?}"
    );
    let (status, lines) = p.wait_exit(PATIENCE);
    assert!(status.success(), "exit status {status:?}");
    assert!(
        lines.iter().any(|l| l.contains("drain complete")),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("did not close")),
        "an open stream held up the stop: {lines:?}"
    );
    // The queued job was finished by the drain, not cut short by the stream's end.
    let p = Proc::start(dir.path(), &["--store", &db]);
    assert_eq!(p.client().status_of(&id).await, "done");
}
