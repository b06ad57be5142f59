//! Polled sources: the poller against `tally upstream` (the real binary), failing
//! upstreams (connection refused, 500, garbage, timeout) retried and counted while the
//! service stays healthy, a panicking source restarted, a config-file source with a JSON
//! field, and bad source configuration refused at start-up.

use std::path::Path;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use reqwest::StatusCode;
use serde_json::Value;
use tally::app::Application;
use tally::config::{ServeConfig, StoreSpec};

use crate::helpers::{eventually, metric, TestApp, UpstreamProc, PATIENCE};

/// Serves `router` on 127.0.0.1:0 for the rest of the test; returns its base URL.
async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{addr}/")
}

/// A URL nobody listens on: a port bound, then released.
fn closed_port_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}/")
}

async fn spawn_sources(f: impl FnOnce(&mut ServeConfig)) -> TestApp {
    TestApp::spawn_with(|c| {
        c.store = StoreSpec::Memory;
        c.source_interval_ms = 20;
        c.source_concurrency = 4;
        f(c);
    })
    .await
}

async fn source(app: &TestApp, name: &str) -> Value {
    let (status, body) = app.get("/v1/sources").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no source {name} in {body}"))
}

/// Polls `/v1/sources` until `f` holds for source `name`; returns that view of it.
async fn wait_source(app: &TestApp, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    eventually(what, async || {
        let s = source(app, name).await;
        if f(&s) {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await
}

async fn series_points(app: &TestApp, name: &str) -> Vec<f64> {
    let (status, body) = app.get(&format!("/v1/series/{name}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["v"].as_f64().unwrap())
        .collect()
}

async fn get_sum(app: &TestApp) -> f64 {
    let (_, body) = app.get("/getSum").await;
    body.as_f64()
        .or_else(|| body.as_str().and_then(|s| s.trim().parse().ok()))
        .unwrap_or_else(|| panic!("not a number: {body}"))
}

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("tally.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn points_polled_from_tally_upstream_are_in_range_and_get_sum_equals_the_series_sum() {
    let upstream = UpstreamProc::start(&["--delay-ms", "50", "--min", "10", "--max", "25"]);
    let url = upstream.url.clone();
    let app = spawn_sources(|c| c.sources = vec![format!("demo={url}")]).await;

    let s = wait_source(&app, "demo", "ten points", |s| {
        s["points"].as_u64() >= Some(10)
    })
    .await;
    assert_eq!(s["kind"], "upstream");
    assert_eq!(s["state"], "running");
    assert_eq!(s["url"], url.as_str());
    assert!(
        s["last_success"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{s}"
    );
    let last = s["last_value"].as_f64().unwrap();
    assert!((10.0..=25.0).contains(&last), "{s}");

    // Stop the upstream, so that the series stops growing, then compare once two reads
    // of /getSum around the read of the series agree.
    upstream.kill();
    let points = eventually("/getSum to settle on the series' sum", async || {
        let before = get_sum(&app).await;
        let points = series_points(&app, "demo").await;
        let after = get_sum(&app).await;
        let sum = points.iter().sum::<f64>();
        if before == after && sum == after {
            Ok(points)
        } else {
            Err(format!(
                "/getSum {before} then {after}, the series' {} points sum to {sum}",
                points.len()
            ))
        }
    })
    .await;
    assert!(points.len() >= 10);
    for v in &points {
        assert!((10.0..=25.0).contains(v) && v.fract() == 0.0, "{v}");
    }
    let s = source(&app, "demo").await;
    assert_eq!(s["points"].as_u64(), Some(points.len() as u64), "{s}");
    let page = app.metrics().await;
    let ok = metric(
        &page,
        "tally_source_requests_total{source=\"demo\",outcome=\"ok\"}",
    );
    assert!(ok >= Some(10.0), "{page}");
    app.stop().await;
}

#[tokio::test]
async fn tally_upstream_answers_a_number_in_its_range_and_stops_on_sigterm() {
    let upstream = UpstreamProc::start(&["--delay-ms", "0", "--min", "-3", "--max", "-3"]);
    let text = reqwest::get(&upstream.url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text, "-3");
    let status = tokio::task::spawn_blocking(move || upstream.terminate(PATIENCE))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_slow_upstream_gets_several_requests_in_flight_but_never_more_than_the_concurrency() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let inflight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (i, m) = (inflight.clone(), most.clone());
    let slow = serve(Router::new().route(
        "/",
        get(move || {
            let (i, m) = (i.clone(), m.clone());
            async move {
                let now = i.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                i.fetch_sub(1, Ordering::SeqCst);
                "1"
            }
        }),
    ))
    .await;
    let app = spawn_sources(|c| {
        c.source_concurrency = 3;
        c.sources = vec![format!("slow={slow}")];
    })
    .await;
    eventually("3 requests in flight", async || {
        match most.load(Ordering::SeqCst) {
            n if n >= 3 => Ok(()),
            n => Err(format!("at most {n} in flight so far")),
        }
    })
    .await;
    wait_source(&app, "slow", "six points", |s| {
        s["points"].as_u64() >= Some(6)
    })
    .await;
    assert_eq!(
        most.load(Ordering::SeqCst),
        3,
        "more requests in flight than allowed"
    );
    app.stop().await;
}

#[tokio::test]
async fn failing_upstreams_are_retried_and_counted_by_outcome_while_the_service_stays_healthy() {
    let failing = serve(Router::new().route(
        "/",
        get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
    ))
    .await;
    let garbage = serve(Router::new().route("/", get(|| async { "not a number" }))).await;
    let slow = serve(Router::new().route(
        "/",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            "1"
        }),
    ))
    .await;
    let refused = closed_port_url();
    let app = spawn_sources(|c| {
        c.source_timeout_ms = 100;
        c.sources = vec![
            format!("refused={refused}"),
            format!("failing={failing}"),
            format!("garbage={garbage}"),
            format!("slow={slow}"),
        ];
    })
    .await;

    let wanted = [
        ("refused", "error"),
        ("failing", "error"),
        ("garbage", "bad_body"),
        ("slow", "timeout"),
    ];
    eventually("every failure to be counted 3 times", async || {
        let page = app.metrics().await;
        let counts: Vec<Option<f64>> = wanted
            .iter()
            .map(|(s, o)| {
                metric(
                    &page,
                    &format!("tally_source_requests_total{{source=\"{s}\",outcome=\"{o}\"}}"),
                )
            })
            .collect();
        if counts.iter().all(|c| *c >= Some(3.0)) {
            assert!(!page.contains("outcome=\"ok\""), "{page}");
            return Ok(());
        }
        let (status, _) = app.get("/healthz").await;
        assert_eq!(status, StatusCode::OK);
        Err(format!("not every failure counted 3 times: {counts:?}"))
    })
    .await;

    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    for (name, needle) in [
        ("refused", "request failed"),
        ("failing", "500"),
        ("garbage", "not a number"),
        ("slow", "timed out"),
    ] {
        let s = source(&app, name).await;
        assert_eq!(s["state"], "running", "{s}");
        assert_eq!(s["restarts"], 0, "{s}");
        assert_eq!(s["points"], 0, "{s}");
        assert!(s["last_success"].is_null(), "{s}");
        let err = s["last_error"].as_str().unwrap_or("");
        assert!(err.contains(needle), "{name}: {s}");
    }
    assert_eq!(get_sum(&app).await, 0.0);
    app.stop().await;
}

#[tokio::test]
async fn a_panicking_source_is_restarted_and_keeps_producing_points() {
    let seven = serve(Router::new().route("/", get(|| async { "7" }))).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[[source]]\nname = \"flaky\"\nurl = \"{seven}\"\ninterval_ms = 20\n\
             concurrency = 2\npanic_after = 3\n"
        ),
    );
    let app = spawn_sources(|c| c.config = Some(config)).await;

    let s = wait_source(&app, "flaky", "a restart", |s| {
        s["restarts"].as_u64() >= Some(1)
    })
    .await;
    assert!(
        s["last_error"].as_str().unwrap_or("").contains("panicked"),
        "{s}"
    );
    let seen = s["points"].as_u64().unwrap();
    wait_source(&app, "flaky", "points after the restart", |s| {
        s["points"].as_u64() > Some(seen)
    })
    .await;
    wait_source(&app, "flaky", "a second restart", |s| {
        s["restarts"].as_u64() >= Some(2)
    })
    .await;
    let page = app.metrics().await;
    let restarts = metric(&page, "tally_source_restarts_total{source=\"flaky\"}");
    assert!(restarts >= Some(2.0), "{page}");
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    for v in series_points(&app, "flaky").await {
        assert_eq!(v, 7.0);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_config_file_source_reads_a_json_field_into_its_own_series() {
    let json = serve(Router::new().route(
        "/",
        get(|| async { axum::Json(serde_json::json!({ "data": { "value": 2.5 } })) }),
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[[source]]\nname = \"sensor\"\nurl = \"{json}\"\ninterval_ms = 20\n\
             field = \"data.value\"\nseries = \"temperature\"\n"
        ),
    );
    let app = spawn_sources(|c| c.config = Some(config)).await;

    let s = wait_source(&app, "sensor", "three points", |s| {
        s["points"].as_u64() >= Some(3)
    })
    .await;
    assert_eq!(s["series"], "temperature");
    assert_eq!(s["last_value"], 2.5);
    let points = series_points(&app, "temperature").await;
    assert!(points.len() >= 3);
    assert!(points.iter().all(|v| *v == 2.5), "{points:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_bad_source_configuration_is_refused_at_start_up_naming_the_source_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let build = |f: Box<dyn FnOnce(&mut ServeConfig)>| {
        let mut c = ServeConfig::defaults();
        c.bind = "127.0.0.1:0".parse().unwrap();
        c.store = StoreSpec::Memory;
        c.data_dir = dir.path().join("data");
        f(&mut c);
        async move {
            match Application::build(c).await {
                Ok(_) => panic!("a bad source configuration was accepted"),
                Err(e) => format!("{e:#}"),
            }
        }
    };
    let e = build(Box::new(|c| c.sources = vec!["up=ftp://127.0.0.1/".into()])).await;
    assert!(
        e.contains("source `up`: url") && e.contains("only http and https"),
        "{e}"
    );
    let e = build(Box::new(|c| c.sources = vec!["just-a-name".into()])).await;
    assert!(e.contains("expected NAME=URL"), "{e}");
    let config = write_config(
        dir.path(),
        "[[source]]\nname = \"cfg\"\nurl = \"http://127.0.0.1/\"\ninterval_ms = 5\n",
    );
    let e = build(Box::new(move |c| c.config = Some(config))).await;
    assert!(e.contains("source `cfg`: interval_ms"), "{e}");
    let config = write_config(
        dir.path(),
        "[[source]]\nname = \"cfg\"\nurl = \"http://127.0.0.1/\"\npanic_after = 1\n",
    );
    let e = build(Box::new(move |c| c.config = Some(config))).await;
    assert!(
        e.contains("panic_after") && e.contains("--enable-test-jobs"),
        "{e}"
    );
    let e = build(Box::new(|c| {
        c.sources = vec!["a=http://127.0.0.1/".into(), "a=http://127.0.0.1/".into()]
    }))
    .await;
    assert!(e.contains("`a` is defined more than once"), "{e}");
}
