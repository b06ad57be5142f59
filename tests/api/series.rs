//! Live series over HTTP and TCP: ingest (line protocol over HTTP and TCP, JSON), the
//! `/getSum` sum and its own listener, late points, retention and memory limits, rollups
//! and range queries against values the tests compute themselves, and bad input.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tally::config::StoreSpec;
use tokio::io::AsyncWriteExt;

use crate::helpers::{eventually, metric, TestApp, PATIENCE};

async fn spawn_series(f: impl FnOnce(&mut tally::config::ServeConfig)) -> TestApp {
    TestApp::spawn_with(|c| {
        c.store = StoreSpec::Memory;
        f(c);
    })
    .await
}

async fn write(app: &TestApp, query: &str, body: String) -> (StatusCode, Value) {
    let res = app
        .client
        .post(app.url(&format!("/write{query}")))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn get_sum(client: &reqwest::Client, base: &str) -> f64 {
    let text = crate::helpers::text_of(client, &format!("{base}/getSum")).await;
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {text:?}"))
}

async fn refresh(app: &TestApp) {
    let (status, body) = app.post("/v1/series/rollups/refresh", &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

fn now_ms() -> i64 {
    tally::now_ms()
}

#[tokio::test]
async fn get_sum_equals_the_sum_of_points_pushed_over_http_line_protocol_tcp_and_json() {
    let app = spawn_series(|c| {
        c.line_listen = Some("127.0.0.1:0".parse().unwrap());
        c.compat_get_sum_bind = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let base = now_ms() - 5_000;
    let mut expected = 0.0;

    // HTTP line protocol, ms precision, two series and one line without a timestamp.
    let mut body = String::new();
    for i in 0..50 {
        let v = 10 + i % 16;
        expected += v as f64;
        body.push_str(&format!("upstream,host=a value={v} {}\n", base + i));
    }
    body.push_str("upstream,host=b value=2.5\n");
    expected += 2.5;
    let (status, res) = write(&app, "?precision=ms", body).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{res}");

    // JSON points.
    let points: Vec<Value> = (0..20)
        .map(|i| json!({ "t": base + 100 + i, "v": i as f64 * 0.25 }))
        .collect();
    expected += (0..20).map(|i| i as f64 * 0.25).sum::<f64>();
    let (status, res) = app.post("/v1/series/pushed/points", &json!(points)).await;
    assert_eq!(status, StatusCode::OK, "{res}");
    assert_eq!(res["accepted"], 20);

    // TCP line protocol (ms precision by default).
    let mut sock = tokio::net::TcpStream::connect(app.line_addr.unwrap())
        .await
        .unwrap();
    let mut lines = String::new();
    for i in 0..30 {
        expected += (i * 3) as f64;
        lines.push_str(&format!("tcp,src=t value={}i {}\n", i * 3, base + 200 + i));
    }
    sock.write_all(lines.as_bytes()).await.unwrap();
    sock.shutdown().await.unwrap();

    eventually(&format!("/getSum to be {expected}"), async || {
        let sum = get_sum(&app.client, &app.addr).await;
        if sum == expected {
            Ok(())
        } else {
            Err(format!("/getSum is {sum}, expected {expected}"))
        }
    })
    .await;

    // The compatible listener answers the same, and only /getSum and /healthz.
    let compat = app.compat_addr.clone().unwrap();
    assert_eq!(get_sum(&app.client, &compat).await, expected);
    let health = app
        .client
        .get(format!("{compat}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let other = app
        .client
        .get(format!("{compat}/v1/series"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::NOT_FOUND);

    let (_, list) = app.get("/v1/series").await;
    let names: Vec<&str> = list["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "pushed",
            "tcp,src=t:value",
            "upstream,host=a:value",
            "upstream,host=b:value"
        ]
    );

    let page = app.metrics().await;
    for (source, n) in [("write", 51.0), ("json", 20.0), ("tcp", 30.0)] {
        assert_eq!(
            metric(
                &page,
                &format!("tally_series_points_accepted_total{{source=\"{source}\"}}")
            ),
            Some(n),
            "{source}"
        );
    }
    assert_eq!(metric(&page, "tally_series"), Some(4.0));
    assert_eq!(metric(&page, "tally_series_points_retained"), Some(101.0));
    app.stop().await;
}

#[tokio::test]
async fn late_points_inside_the_window_are_kept_in_order_and_older_ones_are_rejected_and_counted() {
    let app = spawn_series(|c| c.ooo_window_ms = 1_000).await;
    let t = now_ms() - 10_000;
    let pts = json!([
        { "t": t, "v": 1.0 },
        { "t": t - 500, "v": 2.0 },   // late, inside the window
        { "t": t - 1_500, "v": 4.0 }, // late, outside the window
        { "t": t + 10, "v": 8.0 },
    ]);
    let (status, res) = app.post("/v1/series/late/points", &pts).await;
    assert_eq!(status, StatusCode::OK, "{res}");
    assert_eq!(
        (res["accepted"].as_u64(), res["rejected_late"].as_u64()),
        (Some(3), Some(1))
    );

    let (_, body) = app.get("/v1/series/late").await;
    let got: Vec<(i64, f64)> = body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["t"].as_i64().unwrap(), p["v"].as_f64().unwrap()))
        .collect();
    assert_eq!(got, [(t - 500, 2.0), (t, 1.0), (t + 10, 8.0)]);
    assert_eq!(get_sum(&app.client, &app.addr).await, 11.0);
    let page = app.metrics().await;
    assert_eq!(
        metric(&page, "tally_series_points_rejected_total{reason=\"late\"}"),
        Some(1.0)
    );
    app.stop().await;
}

#[tokio::test]
async fn bad_line_protocol_lines_are_reported_with_their_line_numbers_while_good_lines_are_stored()
{
    let app = spawn_series(|_| {}).await;
    let t = now_ms();
    let body = format!(
        "m value=1 {t}\nnot line protocol\nm value=2 {t}\nm value=abc {t}\nm value=4 {t}\n"
    );
    let (status, res) = write(&app, "?precision=ms", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{res}");
    let lines: Vec<u64> = res["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [2, 4]);
    let detail = res["detail"].as_str().unwrap();
    assert!(detail.contains("2 of 5 lines rejected"), "{detail}");
    assert!(detail.contains("were stored"), "{detail}");
    assert_eq!(get_sum(&app.client, &app.addr).await, 7.0);

    let (status, res) = write(&app, "?precision=hours", "m value=1\n".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        res["detail"].as_str().unwrap().starts_with("precision"),
        "{res}"
    );
    let page = app.metrics().await;
    assert_eq!(
        metric(
            &page,
            "tally_series_points_rejected_total{reason=\"invalid\"}"
        ),
        Some(2.0)
    );
    app.stop().await;
}

#[tokio::test]
async fn bad_json_points_and_names_are_rejected_with_4xx_naming_the_problem() {
    let app = spawn_series(|_| {}).await;
    let long = "x".repeat(257);
    let cases: Vec<(String, Value, &str)> = vec![
        ("s".into(), json!({"t": 1, "v": 1}), "array"),
        ("s".into(), json!([{"t": 1.5, "v": 1}]), "[0].t"),
        ("s".into(), json!([{"t": 1, "v": "1"}]), "[0].v"),
        ("s".into(), json!([{"t": 1}]), "[0].v"),
        (
            "s".into(),
            json!([{"t": 1, "v": 1}, {"t": 2, "v": 2, "x": 0}]),
            "[1]: unknown field",
        ),
        (long, json!([]), "1 to 256 bytes"),
        ("a%01b".into(), json!([]), "control characters"),
    ];
    for (name, body, needle) in cases {
        let (status, res) = app.post(&format!("/v1/series/{name}/points"), &body).await;
        assert!(status.is_client_error(), "{body}: {status} {res}");
        let detail = res["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(needle), "{body}: {detail}");
    }
    // Nothing of a rejected request is stored.
    assert_eq!(get_sum(&app.client, &app.addr).await, 0.0);
    let res = app
        .client
        .post(app.url("/v1/series/s/points"))
        .header("content-type", "application/json")
        .body("[{\"t\": 1, \"v\": 1e999}]")
        .send()
        .await
        .unwrap();
    assert!(res.status().is_client_error());
    app.stop().await;
}

#[tokio::test]
async fn the_memory_limit_evicts_the_oldest_points_and_counts_them() {
    let app = spawn_series(|c| {
        c.max_points = 100;
        c.block_points = 10;
        c.ooo_window_ms = 0;
    })
    .await;
    let t = now_ms() - 60_000;
    let pts: Vec<Value> = (0..300).map(|i| json!({ "t": t + i, "v": 1.0 })).collect();
    let (status, _) = app.post("/v1/series/big/points", &json!(pts)).await;
    assert_eq!(status, StatusCode::OK);
    let (_, list) = app.get("/v1/series").await;
    let s = &list["series"][0];
    assert!(s["points"].as_u64().unwrap() <= 100, "{list}");
    assert_eq!(s["last"], t + 299);
    assert!(s["first"].as_i64().unwrap() >= t + 200, "{list}");
    // The all-time sum keeps what was evicted.
    assert_eq!(get_sum(&app.client, &app.addr).await, 300.0);
    let page = app.metrics().await;
    let evicted = metric(
        &page,
        "tally_series_evicted_points_total{reason=\"memory\"}",
    )
    .unwrap();
    assert!(evicted >= 200.0, "{evicted}");
    assert!(metric(&page, "tally_series_points_retained").unwrap() <= 100.0);
    assert!(metric(&page, "tally_series_bytes_per_point").unwrap() > 0.0);
    app.stop().await;
}

#[tokio::test]
async fn retention_drops_points_older_than_it_and_refuses_points_that_arrive_expired() {
    let app = spawn_series(|c| {
        c.retention = 1;
        c.ooo_window_ms = 0;
    })
    .await;
    let t = now_ms();
    let (_, res) = app
        .post(
            "/v1/series/r/points",
            &json!([{ "t": t - 60_000, "v": 5.0 }, { "t": t - 200, "v": 1.0 }, { "t": t - 100, "v": 2.0 }]),
        )
        .await;
    assert_eq!(
        (res["accepted"].as_u64(), res["rejected_expired"].as_u64()),
        (Some(2), Some(1))
    );
    // Poll the on-demand refresh (which enforces retention) until the points age out.
    wait_expired(&app).await;
    assert_eq!(get_sum(&app.client, &app.addr).await, 3.0);
    let page = app.metrics().await;
    assert_eq!(
        metric(
            &page,
            "tally_series_evicted_points_total{reason=\"retention\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &page,
            "tally_series_points_rejected_total{reason=\"expired\"}"
        ),
        Some(1.0)
    );
    assert_eq!(metric(&page, "tally_series_points_retained"), Some(0.0));
    app.stop().await;
}

#[tokio::test]
async fn rollups_and_stepped_queries_match_sums_the_test_computes_itself() {
    let app = spawn_series(|c| {
        c.block_points = 16;
        c.ooo_window_ms = 0;
    })
    .await;
    // 200 points, 7 s apart, inside the last hour, so they span several minute windows.
    let start = now_ms() - 3_600_000;
    let pts: Vec<(i64, f64)> = (0..200)
        .map(|i| (start + i * 7_000, ((i * 37) % 101) as f64 - 20.5))
        .collect();
    let body: Vec<Value> = pts.iter().map(|(t, v)| json!({ "t": t, "v": v })).collect();
    let (status, _) = app.post("/v1/series/roll/points", &json!(body)).await;
    assert_eq!(status, StatusCode::OK);
    refresh(&app).await;

    let (status, r) = app.get("/v1/series/roll/rollups").await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let sum: f64 = pts.iter().map(|p| p.1).sum();
    assert_eq!(r["total"]["count"], 200);
    assert_eq!(r["total"]["sum"].as_f64(), Some(sum));
    assert_eq!(r["total"]["last"].as_f64(), Some(pts[199].1));
    let min = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    assert_eq!(r["retained"]["min"].as_f64(), Some(min));
    assert!(r["computed_at"].is_i64());

    let mut windows: BTreeMap<i64, (u64, f64)> = BTreeMap::new();
    for &(t, v) in &pts {
        let w = windows.entry(t.div_euclid(60_000) * 60_000).or_default();
        w.0 += 1;
        w.1 += v;
    }
    let got: BTreeMap<i64, (u64, f64)> = r["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["start"].as_i64().unwrap(),
                (w["count"].as_u64().unwrap(), w["sum"].as_f64().unwrap()),
            )
        })
        .collect();
    assert_eq!(got, windows);

    // A stepped range query: 5-minute sums over [from, to).
    let (from, to, step) = (start + 100_000, start + 1_000_000, 300_000);
    let (status, q) = app
        .get(&format!(
            "/v1/series/roll?from={from}&to={to}&step={step}&agg=sum"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{q}");
    let mut expect: BTreeMap<i64, f64> = BTreeMap::new();
    for &(t, v) in pts.iter().filter(|p| p.0 >= from && p.0 < to) {
        *expect.entry(t.div_euclid(step) * step).or_default() += v;
    }
    let got: BTreeMap<i64, f64> = q["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["t"].as_i64().unwrap(), p["v"].as_f64().unwrap()))
        .collect();
    assert_eq!(got, expect);
    app.stop().await;
}

#[tokio::test]
async fn bad_query_parameters_name_the_parameter_and_unknown_series_are_404() {
    let app = spawn_series(|_| {}).await;
    let (status, _) = app
        .post("/v1/series/q/points", &json!([{ "t": now_ms(), "v": 1 }]))
        .await;
    assert_eq!(status, StatusCode::OK);
    for (query, param) in [
        ("from=yesterday", "from"),
        ("to=1.5", "to"),
        ("step=0", "step"),
        ("step=1000&agg=median", "agg"),
        ("agg=sum", "agg"),
        ("from=10&to=5", "to"),
        ("color=red", "color"),
    ] {
        let (status, res) = app.get(&format!("/v1/series/q?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {res}");
        let detail = res["detail"].as_str().unwrap();
        assert!(detail.starts_with(param), "{query}: {detail}");
    }
    for path in ["/v1/series/nope", "/v1/series/nope/rollups"] {
        let (status, res) = app.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {res}");
        assert!(res["detail"].as_str().unwrap().contains("nope"));
    }
    app.stop().await;
}

#[tokio::test]
async fn writes_and_the_rollup_refresh_need_the_token_when_one_is_set() {
    let app = spawn_series(|c| c.auth_token = Some("s3cret".parse().unwrap())).await;
    let (status, _) = write(&app, "", "m value=1\n".into()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = app.post("/v1/series/rollups/refresh", &json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = app.post("/v1/series/x/points", &json!([])).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let res = app
        .client
        .post(app.url("/write"))
        .bearer_auth("s3cret")
        .body("m value=1\n")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    // Reads stay open.
    assert_eq!(get_sum(&app.client, &app.addr).await, 1.0);
    app.stop().await;
}

#[tokio::test]
async fn tcp_garbage_and_over_long_lines_are_counted_and_the_server_keeps_serving() {
    let app = spawn_series(|c| c.line_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let t = now_ms();
    let mut sock = tokio::net::TcpStream::connect(app.line_addr.unwrap())
        .await
        .unwrap();
    let mut payload = Vec::new();
    payload.extend_from_slice(b"\x00\xff\xfe garbage\n");
    payload.extend_from_slice(&vec![b'a'; 70 * 1024]);
    payload.extend_from_slice(b"\n");
    payload.extend_from_slice(format!("ok value=5 {t}\n").as_bytes());
    sock.write_all(&payload).await.unwrap();
    sock.shutdown().await.unwrap();

    eventually("/getSum 5 and 2 invalid lines counted", async || {
        let page = app.metrics().await;
        let invalid = metric(
            &page,
            "tally_series_points_rejected_total{reason=\"invalid\"}",
        );
        let sum = get_sum(&app.client, &app.addr).await;
        if sum == 5.0 && invalid == Some(2.0) {
            Ok(())
        } else {
            Err(format!("/getSum = {sum}, invalid = {invalid:?}"))
        }
    })
    .await;
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn write_has_its_own_body_limit_larger_than_the_general_one() {
    let app = spawn_series(|c| {
        c.max_body_bytes = 64;
        c.max_write_bytes = 4096;
    })
    .await;
    let t = now_ms();
    let body: String = (0..40).map(|i| format!("m value={i} {t}\n")).collect();
    assert!(body.len() > 64 && body.len() < 4096);
    let (status, res) = write(&app, "?precision=ms", body).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{res}");
    assert_eq!(get_sum(&app.client, &app.addr).await, 780.0);
    let (status, res) = write(&app, "?precision=ms", "m value=1\n".repeat(500)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{res}");
    assert!(res["detail"].as_str().unwrap().contains("4096"), "{res}");
    let res = app
        .client
        .post(app.url("/write"))
        .header("content-encoding", "br")
        .body("m value=1\n")
        .send()
        .await
        .unwrap();
    // gzip is taken (compression.rs); an encoding it does not take is refused.
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    app.stop().await;
}

#[tokio::test]
async fn the_memory_store_keeps_live_series_off_the_disk_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let p = crate::helpers::Proc::start(
        dir.path(),
        &["--store", "memory", "--compat-get-sum-bind", "127.0.0.1:0"],
    );
    let client = reqwest::Client::new();
    let t = now_ms();
    let body: String = (0..2_000)
        .map(|i| format!("m,h=a value={} {}\n", i % 16 + 10, t - 2_000 + i))
        .collect();
    let res = client
        .post(format!("{}/write?precision=ms", p.addr))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let res = client
        .post(format!("{}/v1/series/rollups/refresh", p.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let expected: f64 = (0..2_000).map(|i| (i % 16 + 10) as f64).sum();
    assert_eq!(get_sum(&client, &p.addr).await, expected);
    p.signal(libc::SIGTERM);
    let (status, _) = p.wait_exit(Duration::from_secs(10));
    assert!(status.success());
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "files written: {left:?}");
}

async fn get_sum_text(app: &TestApp) -> String {
    let res = app.client.get(app.url("/getSum")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.text().await.unwrap()
}

/// Polls `/metrics` until `name` reads `want`.
async fn wait_metric(app: &TestApp, name: &str, want: f64) {
    eventually(&format!("{name} to be {want}"), async || {
        match metric(&app.metrics().await, name) {
            Some(got) if got == want => Ok(()),
            got => Err(format!("{name} is {got:?}, expected {want}")),
        }
    })
    .await
}

/// Polls the on-demand refresh (which enforces retention) until no series is left.
async fn wait_expired(app: &TestApp) {
    eventually("every series to expire", async || {
        refresh(app).await;
        let (_, list) = app.get("/v1/series").await;
        if list["series"].as_array().unwrap().is_empty() {
            Ok(())
        } else {
            Err(format!("never expired: {list}"))
        }
    })
    .await
}

#[tokio::test]
async fn a_point_stamped_in_2255_is_refused_as_future_and_current_points_keep_being_stored() {
    let app = spawn_series(|c| c.line_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    // 2255-01-01T00:00:00Z, in ms (285 years of 365 days plus 69 leap days).
    let y2255: i64 = (285 * 365 + 69) * 86_400_000;
    let now = now_ms();
    let (status, res) = write(
        &app,
        "?precision=ms",
        format!("m value=100 {y2255}\nm value=1 {now}\n"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{res}");
    assert_eq!(
        res,
        json!({ "accepted": 1, "rejected": 1, "reasons": { "future": 1 } })
    );
    // The series is not poisoned: current points are still on time.
    let (status, res) = write(&app, "?precision=ms", format!("m value=2 {}\n", now + 1)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{res}");

    // The JSON route and the TCP listener refuse it the same way.
    let (status, res) = app
        .post(
            "/v1/series/j/points",
            &json!([{ "t": y2255, "v": 100.0 }, { "t": now, "v": 4.0 }]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{res}");
    assert_eq!(
        (res["accepted"].as_u64(), res["rejected_future"].as_u64()),
        (Some(1), Some(1)),
        "{res}"
    );
    assert_eq!(res["rejected_late"], 0);
    let mut sock = tokio::net::TcpStream::connect(app.line_addr.unwrap())
        .await
        .unwrap();
    sock.write_all(format!("t value=100 {y2255}\nt value=8 {now}\n").as_bytes())
        .await
        .unwrap();
    sock.shutdown().await.unwrap();
    wait_metric(
        &app,
        "tally_series_points_rejected_total{reason=\"future\"}",
        3.0,
    )
    .await;
    wait_metric(
        &app,
        "tally_series_points_accepted_total{source=\"tcp\"}",
        1.0,
    )
    .await;
    assert_eq!(get_sum(&app.client, &app.addr).await, 15.0);
    assert_eq!(
        metric(
            &app.metrics().await,
            "tally_series_points_rejected_total{reason=\"late\"}"
        ),
        None
    );
    app.stop().await;
}

#[tokio::test]
async fn a_point_a_few_minutes_ahead_is_accepted_and_does_not_make_current_points_late() {
    let app = spawn_series(|c| c.ooo_window_ms = 10_000).await;
    let now = now_ms();
    let (status, res) = app
        .post(
            "/v1/series/ahead/points",
            &json!([{ "t": now + 300_000, "v": 1.0 }, { "t": now - 1_000, "v": 2.0 }]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{res}");
    assert_eq!(
        (res["accepted"].as_u64(), res["rejected_late"].as_u64()),
        (Some(2), Some(0)),
        "{res}"
    );
    app.stop().await;
}

#[tokio::test]
async fn get_sum_never_sticks_at_null_it_reads_inf_while_the_totals_overflow_and_comes_back() {
    let app = spawn_series(|_| {}).await;
    let t = now_ms();
    // A point that would push series a's total past f64::MAX is refused and reported.
    let (status, res) = write(
        &app,
        "?precision=ms",
        format!("a value=1.7e308 {t}\na value=1.7e308 {}\n", t + 1),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{res}");
    assert_eq!(
        res,
        json!({ "accepted": 1, "rejected": 1, "reasons": { "overflow": 1 } })
    );
    assert_eq!(get_sum_text(&app).await, "1.7e+308");
    // Two series of 1.7e308 each: 3.4e308 is beyond f64, printed as Python prints it.
    let (status, _) = write(&app, "?precision=ms", format!("b value=1.7e308 {t}\n")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(get_sum_text(&app).await, "inf");
    // A negative point brings the total back to a number.
    let (status, _) = write(
        &app,
        "?precision=ms",
        format!("a value=-1.7e308 {}\n", t + 2),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(get_sum_text(&app).await, "1.7e+308");
    let (status, _) = write(&app, "?precision=ms", format!("a value=-2e308 {}\n", t + 3)).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "an infinite literal is a bad line"
    );
    let (_, res) = app
        .post("/v1/series/c/points", &json!([{ "t": t, "v": -1.7e308 }]))
        .await;
    assert_eq!(res["accepted"], 1, "{res}");
    assert_eq!(get_sum_text(&app).await, "0.0");
    let page = app.metrics().await;
    assert_eq!(
        metric(
            &page,
            "tally_series_points_rejected_total{reason=\"overflow\"}"
        ),
        Some(1.0)
    );

    // A window whose points overflow while the series total does not reads null.
    let (status, _) = write(
        &app,
        "?precision=ms",
        format!(
            "w value=1.7e308 {t}\nw value=-1.7e308 {}\nw value=1.7e308 {}\n",
            t + 2,
            t + 1
        ),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, r) = app.get("/v1/series/w:value/rollups").await;
    assert_eq!(r["total"]["sum"].as_f64(), Some(1.7e308), "{r}");
    let sums: Vec<&Value> = r["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| &w["sum"])
        .collect();
    assert!(sums.contains(&&Value::Null), "{r}");
    app.stop().await;
}

#[tokio::test]
async fn new_series_past_the_limit_are_refused_and_counted_and_removed_series_free_their_slots() {
    let app = spawn_series(|c| {
        c.max_series = 3;
        c.retention = 1;
    })
    .await;
    let t = now_ms();
    let body: String = (0..5).map(|i| format!("s{i} value=1 {t}\n")).collect();
    let (status, res) = write(&app, "?precision=ms", body).await;
    assert_eq!(status, StatusCode::OK, "{res}");
    assert_eq!(
        res,
        json!({ "accepted": 3, "rejected": 2, "reasons": { "series_limit": 2 } })
    );
    // Existing series keep accepting; a new one is refused on every route.
    let (status, _) = write(&app, "?precision=ms", format!("s0 value=1 {}\n", t + 1)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, res) = app
        .post("/v1/series/other/points", &json!([{ "t": t, "v": 1.0 }]))
        .await;
    assert_eq!(
        (
            res["accepted"].as_u64(),
            res["rejected_series_limit"].as_u64()
        ),
        (Some(0), Some(1)),
        "{res}"
    );
    let page = app.metrics().await;
    assert_eq!(
        metric(
            &page,
            "tally_series_points_rejected_total{reason=\"series_limit\"}"
        ),
        Some(3.0)
    );
    assert_eq!(metric(&page, "tally_series"), Some(3.0));

    // Once retention empties them, their slots take new series again.
    wait_expired(&app).await;
    let t = now_ms();
    let body: String = (5..8).map(|i| format!("s{i} value=1 {t}\n")).collect();
    let (status, res) = write(&app, "?precision=ms", body).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{res}");
    // s0..s2, s0 again, then s5..s7.
    assert_eq!(get_sum(&app.client, &app.addr).await, 7.0);
    app.stop().await;
}

#[tokio::test]
async fn the_series_list_is_paged_in_name_order_with_a_cursor_and_bad_parameters_are_named() {
    let app = spawn_series(|_| {}).await;
    let t = now_ms();
    let names = ["b", "a", "d", "e", "c"];
    let body: String = names.iter().map(|n| format!("{n} value=1 {t}\n")).collect();
    let (status, _) = write(&app, "?precision=ms", body).await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let mut pages: Vec<Vec<String>> = Vec::new();
    let mut query = "/v1/series?limit=2".to_string();
    loop {
        let (status, res) = app.get(&query).await;
        assert_eq!(status, StatusCode::OK, "{res}");
        let page: Vec<String> = res["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(res["series"][0]["points"], 1, "{res}");
        pages.push(page);
        match res["next_cursor"].as_str() {
            Some(c) => query = format!("/v1/series?limit=2&cursor={c}"),
            None => break,
        }
        assert!(pages.len() < 10, "{pages:?}");
    }
    assert_eq!(
        pages,
        [
            vec!["a:value", "b:value"],
            vec!["c:value", "d:value"],
            vec!["e:value"]
        ]
    );
    let (_, all) = app.get("/v1/series").await;
    assert_eq!(all["series"].as_array().unwrap().len(), 5);
    assert_eq!(all["next_cursor"], Value::Null);

    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("limit=ten", "limit"),
        ("color=red", "color"),
    ] {
        let (status, res) = app.get(&format!("/v1/series?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {res}");
        let detail = res["detail"].as_str().unwrap();
        assert!(detail.contains(param), "{query}: {detail}");
    }
    app.stop().await;
}

#[tokio::test]
async fn idle_tcp_connections_are_closed_so_a_new_connection_is_served_after_them() {
    let app = spawn_series(|c| {
        c.line_listen = Some("127.0.0.1:0".parse().unwrap());
        c.line_max_connections = 2;
        c.line_idle_timeout_ms = 200;
    })
    .await;
    let addr = app.line_addr.unwrap();
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // One stops mid-line: that unfinished line is dropped, not stored as `value=100`.
    idle[0].write_all(b"m value=100").await.unwrap();
    // Every slot is taken by a silent client; this one waits in the backlog until the
    // server cuts them.
    let mut late = tokio::net::TcpStream::connect(addr).await.unwrap();
    late.write_all(format!("m value=7 {}\n", now_ms()).as_bytes())
        .await
        .unwrap();
    late.shutdown().await.unwrap();
    eventually("the new connection to be served", async || {
        let sum = get_sum(&app.client, &app.addr).await;
        if sum == 7.0 {
            Ok(())
        } else {
            Err(format!("/getSum is {sum}, expected 7"))
        }
    })
    .await;
    // The idle ones were closed by the server (EOF) and counted.
    for mut sock in idle {
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(PATIENCE, tokio::io::AsyncReadExt::read(&mut sock, &mut buf))
            .await
            .expect("the server closes an idle connection")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    wait_metric(&app, "tally_series_line_idle_closed_total", 2.0).await;
    wait_metric(
        &app,
        "tally_series_points_rejected_total{reason=\"invalid\"}",
        1.0,
    )
    .await;
    assert_eq!(get_sum(&app.client, &app.addr).await, 7.0);
    app.stop().await;
}

/// The payload agents send: 700 series alternating line by line (a line per series per
/// round), two tags, nanosecond timestamps, three decimals; every 7th line writes the
/// tags in the other order, which is the same series. Three batches, so the later ones
/// meet series the server has seen.
#[tokio::test]
async fn an_interleaved_payload_keeps_every_series_count_and_sum() {
    let app = spawn_series(|c| {
        // Small blocks, so most points are sealed and read back from blocks.
        c.block_points = 8;
        c.ooo_window_ms = 0;
    })
    .await;
    const SERIES: usize = 700;
    let start_s = now_ms() / 1000 - 3600;
    // name -> points (ms, value) in time order
    let mut expect: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    let mut total = 0.0;
    let mut line = 0usize;
    for batch in 0..3 {
        let mut body = String::new();
        for _ in 0..10_000 {
            let (round, s) = (line / SERIES, line % SERIES);
            let (host, region) = (format!("h{s}"), format!("r{}", s % 8));
            // Multiples of 1/8 written with three decimals: every sum is exact.
            let v = ((line * 37 + batch) % 800) as f64 / 8.0;
            let ts_ns = (start_s + round as i64) * 1_000_000_000;
            if line.is_multiple_of(7) {
                body.push_str(&format!(
                    "sensor,region={region},host={host} value={v:.3} {ts_ns}\n"
                ));
            } else {
                body.push_str(&format!(
                    "sensor,host={host},region={region} value={v:.3} {ts_ns}\n"
                ));
            }
            expect
                .entry(format!("sensor,host={host},region={region}:value"))
                .or_default()
                .push((ts_ns / 1_000_000, v));
            total += v;
            line += 1;
        }
        let (status, r) = write(&app, "?precision=ns", body).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "batch {batch}: {r}");
    }
    refresh(&app).await;

    let (status, page) = app.get("/v1/series?limit=10000").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let listed: BTreeMap<String, u64> = page["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["points"].as_u64().unwrap(),
            )
        })
        .collect();
    let counts: BTreeMap<String, u64> = expect
        .iter()
        .map(|(n, p)| (n.clone(), p.len() as u64))
        .collect();
    assert_eq!(listed, counts);

    for (i, (name, pts)) in expect.iter().enumerate() {
        let (status, r) = app.get(&format!("/v1/series/{name}/rollups")).await;
        assert_eq!(status, StatusCode::OK, "{name}: {r}");
        let sum: f64 = pts.iter().map(|p| p.1).sum();
        assert_eq!(
            r["total"]["count"].as_u64(),
            Some(pts.len() as u64),
            "{name}"
        );
        assert_eq!(r["total"]["sum"].as_f64(), Some(sum), "{name}");
        assert_eq!(r["retained"]["sum"].as_f64(), Some(sum), "{name}");
        // Every 50th series read back point by point (most from sealed blocks).
        if i.is_multiple_of(50) {
            let (status, q) = app.get(&format!("/v1/series/{name}")).await;
            assert_eq!(status, StatusCode::OK, "{name}: {q}");
            let got: Vec<(i64, f64)> = q["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p["t"].as_i64().unwrap(), p["v"].as_f64().unwrap()))
                .collect();
            assert_eq!(&got, pts, "{name}");
        }
    }
    assert_eq!(get_sum(&app.client, &app.url("")).await, total);
    app.stop().await;
}
