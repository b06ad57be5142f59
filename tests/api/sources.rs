//! Polled sources: the poller against `tally upstream` (the real binary), failing
//! upstreams (connection refused, 500, garbage, timeout) retried and counted while the
//! service stays healthy, a panicking source restarted, a config-file source with a JSON
//! field, bad source configuration refused at start-up, and `https://` sources against a
//! local HTTPS upstream with a CA of its own (trusted through `SSL_CERT_FILE`, or not).

use std::path::Path;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use reqwest::StatusCode;
use serde_json::Value;
use tally::app::Application;
use tally::config::{ServeConfig, StoreSpec};

use crate::helpers::{eventually, metric, Proc, ProcClient, TestApp, UpstreamProc, PATIENCE};
use crate::support::tls::{HttpsUpstream, TestCa};

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

/// `tally serve` as a child process polling `sources` (`NAME=URL`), with `SSL_CERT_FILE`
/// set to `cert_file` and `SSL_CERT_DIR` to an empty folder, so that the machine's own
/// roots play no part. A child process, because the roots are read from its environment.
fn spawn_with_roots(dir: &Path, cert_file: &Path, sources: &[String]) -> Proc {
    let empty = dir.join("no-certs");
    std::fs::create_dir_all(&empty).unwrap();
    let mut args = vec!["--store", "memory", "--source-interval-ms", "20"];
    for s in sources {
        args.extend(["--source", s.as_str()]);
    }
    Proc::start_with_env(
        dir,
        &args,
        &[
            ("SSL_CERT_FILE", cert_file.to_str().unwrap()),
            ("SSL_CERT_DIR", empty.to_str().unwrap()),
        ],
    )
}

/// Polls a child's `/v1/sources` until `f` holds for source `name`; returns that view.
async fn wait_proc_source(
    client: &ProcClient,
    name: &str,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    eventually(what, async || {
        let (status, body) = client.get("/v1/sources").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let s = body["sources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no source {name} in {body}"));
        if f(&s) {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await
}

async fn proc_metrics(client: &ProcClient) -> String {
    let (status, body) = client.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    body.as_str().unwrap().to_string()
}

#[tokio::test]
async fn an_https_source_whose_ca_is_in_ssl_cert_file_is_polled_and_its_values_arrive() {
    let upstream = HttpsUpstream::start("42").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = upstream.ca.write(dir.path(), "ca.pem");
    let p = spawn_with_roots(dir.path(), &ca, &[format!("secure={}", upstream.url)]);
    let client = p.client();

    let s = wait_proc_source(&client, "secure", "ten points over https", |s| {
        s["points"].as_u64() >= Some(10)
    })
    .await;
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["url"], upstream.url.as_str(), "{s}");
    assert_eq!(s["last_value"], 42.0, "{s}");
    assert!(
        s["last_success"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{s}"
    );
    let (status, body) = client.get("/v1/series/secure").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let points = body["points"].as_array().unwrap();
    assert!(points.len() >= 10, "{body}");
    assert!(points.iter().all(|p| p["v"] == 42.0), "{body}");
    let page = proc_metrics(&client).await;
    let ok = metric(
        &page,
        "tally_source_requests_total{source=\"secure\",outcome=\"ok\"}",
    );
    assert!(ok >= Some(10.0), "{page}");
}

#[tokio::test]
async fn an_https_source_whose_certificate_does_not_verify_shows_the_certificate_error() {
    let upstream = HttpsUpstream::start("42").await;
    let dir = tempfile::tempdir().unwrap();
    // Another CA than the one that signed the upstream's certificate.
    let other = TestCa::new("some other CA").write(dir.path(), "other-ca.pem");
    let p = spawn_with_roots(dir.path(), &other, &[format!("untrusted={}", upstream.url)]);
    let client = p.client();

    let s = wait_proc_source(&client, "untrusted", "a certificate error", |s| {
        s["last_error"].is_string()
    })
    .await;
    let err = s["last_error"].as_str().unwrap();
    assert!(
        err.contains("invalid peer certificate") && err.contains("UnknownIssuer"),
        "{s}"
    );
    assert!(!err.contains("scheme is not http"), "{s}");
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["restarts"], 0, "{s}");
    assert_eq!(s["points"], 0, "{s}");
    assert!(s["last_success"].is_null(), "{s}");

    eventually("three certificate errors counted", async || {
        let page = proc_metrics(&client).await;
        let errors = metric(
            &page,
            "tally_source_requests_total{source=\"untrusted\",outcome=\"error\"}",
        );
        match errors {
            Some(n) if n >= 3.0 => {
                assert!(!page.contains("outcome=\"ok\""), "{page}");
                Ok(())
            }
            n => Err(format!("errors counted: {n:?}")),
        }
    })
    .await;
    let (status, _) = client.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let logged = logged_line(&p, &["source request failed", "untrusted"]).await;
    assert!(
        logged.contains("invalid peer certificate") && logged.contains("UnknownIssuer"),
        "{logged}"
    );
}

/// The first line of a child's log holding every one of `needles`.
/// The first log line holding every needle, once the process has written it (its
/// output is read by a thread of its own, so a line can arrive after the metric moved).
async fn logged_line(p: &Proc, needles: &[&str]) -> String {
    eventually(&format!("a log line with {needles:?}"), async || {
        let lines = p.lines.lock().unwrap();
        lines
            .iter()
            .find(|l| needles.iter().all(|n| l.contains(n)))
            .cloned()
            .ok_or_else(|| format!("{lines:?}"))
    })
    .await
}

#[tokio::test]
async fn without_any_usable_root_certificate_the_client_still_builds_with_a_warning() {
    let upstream = HttpsUpstream::start("42").await;
    let plain = serve(Router::new().route("/", get(|| async { "7" }))).await;
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    // A certificate block whose content is no certificate: reqwest refuses to build a
    // client on a store where no certificate parses.
    let broken = dir.path().join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let sources = [format!("secure={}", upstream.url), format!("plain={plain}")];
    for (file, warning) in [
        (&empty, "no root certificates found"),
        (&broken, "no usable root certificate"),
    ] {
        let p = spawn_with_roots(dir.path(), file, &sources);
        let client = p.client();
        wait_proc_source(&client, "plain", "points from the http source", |s| {
            s["points"].as_u64() >= Some(3)
        })
        .await;
        let s = wait_proc_source(&client, "secure", "a certificate error", |s| {
            s["last_error"].is_string()
        })
        .await;
        let err = s["last_error"].as_str().unwrap();
        assert!(err.contains("UnknownIssuer"), "{}: {s}", file.display());
        assert_eq!(s["restarts"], 0, "{s}");
        let logged = logged_line(&p, &[warning]).await;
        assert!(logged.contains("WARN"), "{logged}");
    }
}
