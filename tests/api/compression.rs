//! Compression with the clients people use: line protocol gzipped by `gzip` and sent by
//! curl with `Content-Encoding: gzip` (what Telegraf sends with compression on), JSON
//! points gzipped, a gzip bomb against the real binary (413, and its memory stays put),
//! and answers compressed for curl `--compressed` and for Chromium.

use std::io::Write;
use std::process::{Command, Stdio};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{eventually, TestApp};
use crate::support::process::Proc;
use crate::webdriver::Browser;

/// `data` through the `gzip` program.
fn gzip_cli(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip runs");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let feed = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    feed.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// curl's status code and body for `args` (curl prints the status last). Async: the
/// server under test runs on this test's runtime.
async fn curl(args: &[&str]) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

fn now_ns() -> i64 {
    tally::now_ms() * 1_000_000
}

#[tokio::test]
async fn line_protocol_and_json_points_sent_gzipped_are_stored() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let t = now_ns();
    let lines: String = (0..1000)
        .map(|i| format!("cpu,host=h{} usage={} {}\n", i % 10, i, t + i))
        .collect();
    let body = dir.path().join("batch.lp.gz");
    std::fs::write(&body, gzip_cli(lines.as_bytes())).unwrap();
    let file = format!("@{}", body.display());
    // curl POSTing `data` to /write as `encoding`.
    let write = async |encoding: &str, data: &str| {
        let header = format!("Content-Encoding: {encoding}");
        let url = app.url("/write");
        curl(&[
            "-H",
            &header,
            "-H",
            "Content-Type: text/plain",
            "--data-binary",
            data,
            &url,
        ])
        .await
    };
    let (code, text) = write("gzip", &file).await;
    assert_eq!(code, 204, "{text}");
    // An encoding it does not take is named.
    let (code, text) = write("br", &file).await;
    assert_eq!(code, 415, "{text}");
    assert!(
        text.contains("Content-Encoding br") && text.contains("gzip"),
        "{text}"
    );
    // Broken gzip is a 400 naming it; nothing of it is stored.
    let (code, text) = write("gzip", "cpu usage=1").await;
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("does not inflate"), "{text}");

    let points =
        json!([{ "t": tally::now_ms(), "v": 1.5 }, { "t": tally::now_ms() + 1, "v": 2.5 }]);
    let res = app
        .client
        .post(app.url("/v1/series/zipped/points"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gzip_cli(points.to_string().as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let report: Value = res.json().await.unwrap();
    assert_eq!(report["accepted"], 2, "{report}");
    // 1000 + 4 = 1004 points in all: the line protocol's sum plus the JSON points'.
    let expected = (0..1000).sum::<i64>() as f64 + 4.0;
    eventually(&format!("/getSum to be {expected}"), async || {
        let text = app
            .client
            .get(app.url("/getSum"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        let got: f64 = text.trim().parse().map_err(|_| text.clone())?;
        if got == expected {
            Ok(())
        } else {
            Err(format!("{got}"))
        }
    })
    .await;
    app.stop().await;
}

/// The process's peak resident memory (`VmHWM`), in KiB.
fn peak_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_gzip_bomb_answers_413_and_costs_no_memory_beyond_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let proc = Proc::start(
        dir.path(),
        &["--store", "memory", "--max-write-bytes", "1048576"],
    );
    let http = reqwest::Client::new();
    // Warm up the write path, then take the peak as the baseline.
    let res = http
        .post(format!("{}/write", proc.addr))
        .header("content-encoding", "gzip")
        .body(gzip_cli(b"warm v=1\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let before = peak_kib(proc.pid());
    // 256 MiB of zeros in 256 gzip members of 1 MiB each: about 260 KB on the wire.
    let member = gzip_cli(&vec![0u8; 1 << 20]);
    let bomb: Vec<u8> = member.repeat(256);
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    let post = async |path: &str, content_type: &str| {
        http.post(format!("{}{path}", proc.addr))
            .header("content-type", content_type)
            .header("content-encoding", "gzip")
            .body(bomb.clone())
            .send()
            .await
            .unwrap()
    };
    for _ in 0..4 {
        let res = post("/write", "text/plain").await;
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let text = res.text().await.unwrap();
        assert!(text.contains("1048576"), "{text}");
    }
    // The same bomb as JSON points, against --max-body-bytes.
    let res = post("/v1/series/bomb/points", "application/json").await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let grown_mib = (peak_kib(proc.pid()) - before) / 1024;
    // Inflating the whole bomb would take 256 MiB; the limits are 1 MiB each (what the
    // peak grows by besides is the allocator's and the runtime's threads: tens of MiB).
    assert!(grown_mib < 100, "the peak grew by {grown_mib} MiB");
}

#[tokio::test]
async fn answers_are_compressed_for_clients_that_ask_and_small_ones_never() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("headers");
    for (path, accept, encoding) in [
        ("/openapi.json", "gzip", "gzip"),
        ("/ui/vendor/swagger-ui/swagger-ui-bundle.js", "br", "br"),
        ("/ui/vendor/swagger-ui/swagger-ui.css", "gzip, br", "br"),
    ] {
        let plain = app
            .client
            .get(app.url(path))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let out = dir.path().join("body");
        let (code, _) = curl(&[
            "-H",
            &format!("Accept-Encoding: {accept}"),
            "-D",
            headers.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            &app.url(path),
        ])
        .await;
        assert_eq!(code, 200, "{path}");
        let h = std::fs::read_to_string(&headers)
            .unwrap()
            .to_ascii_lowercase();
        assert!(
            h.contains(&format!("content-encoding: {encoding}")),
            "{path}: {h}"
        );
        let sent = std::fs::metadata(&out).unwrap().len();
        assert!(
            sent * 3 < plain.len() as u64,
            "{path}: {sent} of {}",
            plain.len()
        );
        // curl --compressed decodes it back to the very bytes.
        let (code, _) = curl(&["--compressed", "-o", out.to_str().unwrap(), &app.url(path)]).await;
        assert_eq!(code, 200);
        assert_eq!(std::fs::read(&out).unwrap(), plain.to_vec(), "{path}");
    }
    // A small hot answer is sent as it is.
    let (code, _) = curl(&[
        "-H",
        "Accept-Encoding: gzip",
        "-D",
        headers.to_str().unwrap(),
        &app.url("/healthz"),
    ])
    .await;
    assert_eq!(code, 200);
    let h = std::fs::read_to_string(&headers)
        .unwrap()
        .to_ascii_lowercase();
    assert!(!h.contains("content-encoding"), "{h}");

    // Chromium asks for gzip and br: the reference's library arrives compressed.
    let b = Browser::open(&app.addr).await;
    b.goto("/docs").await;
    b.wait_js(
        "the rendered reference",
        "return document.querySelector('.swagger-ui .info .title')?.textContent.includes('tally')",
    )
    .await;
    let sizes = b
        .js("return performance.getEntriesByType('resource')
               .filter(e => e.name.includes('swagger-ui-bundle.js'))
               .map(e => [e.encodedBodySize, e.decodedBodySize])[0]")
        .await;
    let (encoded, decoded) = (sizes[0].as_u64().unwrap(), sizes[1].as_u64().unwrap());
    assert!(encoded * 3 < decoded, "{encoded} of {decoded} bytes");
    b.close().await;
    app.stop().await;
}
