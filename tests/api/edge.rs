//! Hardening at the HTTP edge: slow and idle connections, the connection cap, forged log
//! lines, the bearer scheme's case, and cross-site requests from browsers.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::helpers::{eventually, metric, Proc, TestApp, PATIENCE};

const Q1: &str = "Percent of adults aged 18 years and older who have obesity";

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.addr.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Sends `GET path` on an open connection and reads its response (head and body).
async fn get_on(s: &mut TcpStream, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: tally\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = timeout(PATIENCE, s.read(&mut chunk))
            .await
            .expect("a response within PATIENCE")
            .unwrap();
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        if buf.len() >= end + 4 + len {
            return String::from_utf8_lossy(&buf).into_owned();
        }
    }
}

/// Whether the server closes `s` (end of stream or reset) within PATIENCE, reading and
/// discarding anything it sends first.
async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 1024];
    let until = Instant::now() + PATIENCE;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
    false
}

async fn metric_of(app: &TestApp, name: &str) -> f64 {
    let page = app.metrics().await;
    metric(&page, name).unwrap_or_else(|| panic!("{name} missing from\n{page}"))
}

#[tokio::test]
async fn a_client_sending_its_head_a_byte_at_a_time_is_cut_off_while_healthz_answers() {
    let app = TestApp::spawn_with(|c| {
        c.http_header_timeout_ms = 300;
        c.http_idle_timeout_ms = 60_000;
    })
    .await;
    // A keep-alive connection that goes idle before the slow client starts.
    let mut idle = connect(&app).await;
    assert!(get_on(&mut idle, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));

    let mut slow = connect(&app).await;
    let head = b"GET /healthz HTTP/1.1\r\nHost: tally\r\nX-Slow: ";
    let until = Instant::now() + PATIENCE;
    let (mut sent, mut healthz_meanwhile) = (0, false);
    let mut buf = [0u8; 256];
    loop {
        assert!(Instant::now() < until, "the slow client was never cut off");
        let byte = head.get(sent).copied().unwrap_or(b'a');
        if slow.write_all(&[byte]).await.is_err() {
            break;
        }
        sent += 1;
        // The client's pace: one byte every 50 ms, watching for the server to close.
        match timeout(Duration::from_millis(50), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => panic!("an incomplete head got an answer: {:?}", &buf[..n]),
            Err(_) => {}
        }
        if !healthz_meanwhile {
            assert_eq!(app.get("/healthz").await.0, StatusCode::OK);
            healthz_meanwhile = true;
        }
    }
    assert!(healthz_meanwhile);
    assert_eq!(app.get("/healthz").await.0, StatusCode::OK);
    assert_eq!(
        metric_of(
            &app,
            "tally_http_connections_timed_out_total{reason=\"header\"}"
        )
        .await,
        1.0
    );
    // The idle connection has waited longer than the header timeout (it was idle before
    // the slow client connected): that wait is not a slow head, so it is still served.
    assert!(get_on(&mut idle, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));
    app.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let app = TestApp::spawn_with(|c| {
        c.http_header_timeout_ms = 60_000;
        c.http_idle_timeout_ms = 300;
    })
    .await;
    let mut conn = connect(&app).await;
    assert!(get_on(&mut conn, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(get_on(&mut conn, "/readyz")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(
        closed_by_server(&mut conn).await,
        "the idle connection stayed open"
    );
    let page = app.metrics().await;
    let idle = metric(
        &page,
        "tally_http_connections_timed_out_total{reason=\"idle\"}",
    );
    assert!(idle.is_some_and(|n| n >= 1.0), "{page}");
    assert_eq!(
        metric(
            &page,
            "tally_http_connections_timed_out_total{reason=\"header\"}"
        ),
        Some(0.0)
    );
    app.stop().await;
}

#[tokio::test]
async fn idle_connections_do_not_hold_up_a_shutdown() {
    // Default timeouts (10 s, 75 s): only the shutdown can close these connections.
    let app = TestApp::spawn().await;
    let mut idle = connect(&app).await;
    assert!(get_on(&mut idle, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));
    let mut silent = connect(&app).await;
    // Wait until both are accepted (the gauge counts this request's connection too).
    eventually("the connections to be accepted", async || {
        let n = metric_of(&app, "tally_http_connections").await;
        if n >= 3.0 {
            Ok(())
        } else {
            Err(format!("tally_http_connections is {n}, expected 3"))
        }
    })
    .await;
    app.stop().await;
    assert!(closed_by_server(&mut idle).await, "the idle connection");
    assert!(closed_by_server(&mut silent).await, "the silent connection");
}

#[tokio::test]
async fn past_max_connections_a_new_connection_gets_503_and_healthz_answers_once_slots_free() {
    const CAP: usize = 3;
    let app = TestApp::spawn_with(|c| {
        c.max_connections = CAP as u64;
        // The held connections send nothing: this timeout frees their slots.
        c.http_header_timeout_ms = 1_500;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(connect(&app).await);
    }
    // Accepted after the held ones (the kernel's accept queue is FIFO), so past the cap.
    let mut extra = connect(&app).await;
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    timeout(PATIENCE, extra.read_to_end(&mut answer))
        .await
        .expect("the refused connection is closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(
        answer.starts_with("http/1.1 503 service unavailable\r\n"),
        "{answer}"
    );
    assert!(answer.contains("\r\nretry-after: 1\r\n"), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");

    // The held connections time out; then /healthz answers again.
    eventually("/healthz to answer again", async || {
        match app.client.get(app.url("/healthz")).send().await {
            Ok(r) if r.status() == StatusCode::OK => Ok(()),
            Ok(r) => Err(format!("/healthz answered {}", r.status())),
            Err(e) => Err(format!("/healthz failed: {e}")),
        }
    })
    .await;
    for mut conn in held {
        assert!(closed_by_server(&mut conn).await);
    }
    let page = app.metrics().await;
    let refused = metric(&page, "tally_http_connections_refused_total");
    assert!(refused.is_some_and(|n| n >= 1.0), "{page}");
    assert_eq!(
        metric(
            &page,
            "tally_http_connections_timed_out_total{reason=\"header\"}"
        ),
        Some(CAP as f64)
    );
    app.stop().await;
}

#[tokio::test]
async fn a_job_id_with_line_breaks_cannot_forge_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("tally.log");
    let log_arg = log.display().to_string();
    let p = Proc::start(dir.path(), &["--store", "memory", "--log-file", &log_arg]);
    let c = p.client();
    for path in [
        "/api/get_results/job_id_1%0A2026-01-01T00:00:00.000000Z%20ERROR%20tally::app:%20FORGED",
        "/api/get_results/job_id_2%00nul%0D%0Ajunk%E2%80%A8sep%C2%85next",
    ] {
        let (status, _) = c.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    p.signal(libc::SIGTERM);
    let (status, _) = p.wait_exit(Duration::from_secs(10));
    assert!(status.success());

    let bytes = std::fs::read(&log).unwrap();
    assert!(!bytes.contains(&0), "a raw NUL reached the log");
    let text = String::from_utf8(bytes).unwrap();
    for line in text.lines() {
        let ts = line.split_whitespace().next().unwrap_or("");
        assert!(
            humantime::parse_rfc3339(ts).is_ok(),
            "a line that does not start with a timestamp: {line:?}"
        );
        assert!(
            !line.starts_with("2026-01-01T00:00:00.000000Z"),
            "a forged line: {line:?}"
        );
        assert!(!line.contains(['\r', '\u{2028}', '\u{85}']), "{line:?}");
    }
    let forged: Vec<&str> = text.lines().filter(|l| l.contains("FORGED")).collect();
    assert!(!forged.is_empty(), "the request is logged:\n{text}");
    for line in forged {
        assert!(line.contains("api request in") || line.contains("api response out"));
        assert!(
            line.contains(r"job_id=job_id_1\n2026-01-01T00:00:00.000000Z ERROR tally::app: FORGED"),
            "the escaped id is visible: {line}"
        );
    }
    assert!(
        text.contains(r"job_id=job_id_2\0nul\r\njunk\u{2028}sep\u{85}next"),
        "{text}"
    );
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_and_may_be_followed_by_several_spaces() {
    const TOKEN: &str = "s3cret-token";
    let app = TestApp::spawn_with(|c| c.auth_token = Some(TOKEN.parse().unwrap())).await;
    let submit = |auth: String| {
        app.client
            .post(app.url("/v1/jobs"))
            .header("authorization", auth)
            .json(&json!({ "kind": "test.echo" }))
            .send()
    };
    let start_csv = |auth: String| {
        app.client
            .get(app.url("/csv_name=missing.csv"))
            .header("authorization", auth)
            .send()
    };
    for auth in [
        format!("bearer {TOKEN}"),
        format!("BEARER {TOKEN}"),
        format!("Bearer  {TOKEN}"),
        format!("bEaReR {TOKEN}"),
    ] {
        let res = submit(auth.clone()).await.unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED, "{auth}");
        let res = start_csv(auth.clone()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{auth}");
    }
    for auth in [
        "bearer wrong-token".to_string(),
        format!("Basic {TOKEN}"),
        format!("Token {TOKEN}"),
        format!("Bearer{TOKEN}"),
        TOKEN.to_string(),
    ] {
        let res = submit(auth.clone()).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{auth}");
        let res = start_csv(auth.clone()).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{auth}");
    }
    app.stop().await;
}

/// The origin the cross-site tests allow with `--allowed-origin`.
const DASHBOARD: &str = "http://dash.example:8080";

async fn spawn_with_dashboard() -> TestApp {
    TestApp::spawn_with(|c| c.allowed_origins = vec![DASHBOARD.parse().unwrap()]).await
}

/// Header sets a browser could send with a request the service must accept: none (a
/// script), its own origin, and the allowed dashboard's.
fn accepted_headers(app: &TestApp) -> Vec<Vec<(&'static str, String)>> {
    vec![
        vec![],
        vec![
            ("origin", app.addr.clone()),
            ("sec-fetch-site", "same-origin".into()),
        ],
        vec![
            ("origin", DASHBOARD.into()),
            ("sec-fetch-site", "cross-site".into()),
        ],
    ]
}

fn with_headers(
    mut req: reqwest::RequestBuilder,
    headers: &[(&'static str, String)],
) -> reqwest::RequestBuilder {
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    req
}

#[tokio::test]
async fn a_page_of_another_site_cannot_shut_the_service_down() {
    let app = spawn_with_dashboard().await;
    for headers in [
        vec![("origin", "http://evil.example".to_string())],
        vec![("sec-fetch-site", "cross-site".to_string())],
        vec![("origin", "null".to_string())],
    ] {
        let res = with_headers(app.client.get(app.url("/api/graceful_shutdown")), &headers)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{headers:?}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["status"], "error", "{body}");
        assert!(
            body["reason"].as_str().unwrap().contains("refused"),
            "{body}"
        );
    }
    let (status, _) = app.get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "the service is not draining");
    app.stop().await;

    // The same request without a foreign origin is obeyed (each on its own service).
    for case in 0..3 {
        let app = spawn_with_dashboard().await;
        let headers = accepted_headers(&app).swap_remove(case);
        let res = with_headers(app.client.get(app.url("/api/graceful_shutdown")), &headers)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{headers:?}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body, json!({ "status": "done" }), "{headers:?}");
        app.stop().await;
    }
}

#[tokio::test]
async fn a_page_of_another_site_cannot_write_points() {
    let app = spawn_with_dashboard().await;
    let t = tally::now_ms();
    let write = |i: i64, headers: &[(&'static str, String)]| {
        with_headers(
            app.client
                .post(app.url("/write?precision=ms"))
                .header("content-type", "text/plain")
                .body(format!("csrf,host=a value=1 {}", t + i)),
            headers,
        )
        .send()
    };
    let res = write(0, &[("sec-fetch-site", "cross-site".into())])
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let problem: Value = res.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Sec-Fetch-Site"),
        "{problem}"
    );
    let (_, series) = app.get("/v1/series").await;
    assert_eq!(series["series"], json!([]), "nothing was stored");

    for (i, headers) in accepted_headers(&app).iter().enumerate() {
        let res = write(1 + i as i64, headers).await.unwrap();
        assert_eq!(res.status(), StatusCode::NO_CONTENT, "{headers:?}");
    }
    let sum = crate::helpers::text_of(&app.client, &app.url("/getSum")).await;
    assert_eq!(sum, "3.0", "one point per accepted write");
    app.stop().await;
}

#[tokio::test]
async fn a_page_of_another_site_cannot_start_jobs() {
    let app = spawn_with_dashboard().await;
    let submit = |headers: &[(&'static str, String)]| {
        with_headers(
            app.client
                .post(app.url("/api/states_mean"))
                .json(&json!({ "question": Q1 })),
            headers,
        )
        .send()
    };
    let res = submit(&[("origin", "http://evil.example".into())])
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "error", "{body}");
    assert!(
        body["reason"].as_str().unwrap().contains("Origin"),
        "{body}"
    );
    let (_, jobs) = app.get("/api/jobs").await;
    assert_eq!(jobs["data"], json!([]), "no job was started: {jobs}");

    for headers in accepted_headers(&app) {
        let res = submit(&headers).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{headers:?}");
        let body: Value = res.json().await.unwrap();
        assert!(body["job_id"].as_str().is_some(), "{body}");
    }
    let (_, jobs) = app.get("/api/jobs").await;
    assert_eq!(jobs["data"].as_array().unwrap().len(), 3, "{jobs}");
    app.stop().await;
}

/// A client that sends a whole too-large batch before it reads (as agents do) gets the
/// 413 and a clean close: the service reads and discards the rest of the body after
/// answering instead of closing on unread bytes, which makes the kernel reset the
/// connection and the client lose the answer.
#[tokio::test]
async fn a_too_large_body_sent_in_full_gets_its_413_not_a_reset() {
    let app = TestApp::spawn_with(|c| c.max_write_bytes = 4096).await;
    let body = "big v=1 1\n".repeat(800_000);
    for _ in 0..3 {
        let mut s = connect(&app).await;
        let head = format!(
            "POST /write HTTP/1.1\r\nHost: tally\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let (mut rd, mut wr) = s.split();
        let send = async {
            wr.write_all(head.as_bytes()).await?;
            wr.write_all(body.as_bytes()).await
        };
        let read = async {
            let mut got = Vec::new();
            let r = timeout(PATIENCE, rd.read_to_end(&mut got)).await;
            (r, got)
        };
        let (sent, (read, got)) = tokio::join!(send, read);
        let answer = String::from_utf8_lossy(&got);
        assert!(
            answer.starts_with("HTTP/1.1 413"),
            "answer {answer:?}, read {read:?}, send {sent:?}"
        );
        assert!(matches!(read, Ok(Ok(_))), "a clean close: {read:?}");
        assert!(sent.is_ok(), "the whole body was taken: {sent:?}");
    }
    app.stop().await;
}
