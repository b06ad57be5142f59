//! Operations: metrics, auth, readiness, log files.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{metric, Proc, TestApp};

const Q1: &str = "Percent of adults aged 18 years and older who have obesity";

#[tokio::test]
async fn metrics_count_jobs_by_kind_and_outcome_and_requests_by_route() {
    let app = TestApp::spawn().await;
    let ok = app.submit("test.echo", json!({})).await;
    let bad = app
        .submit("stats.global_mean", json!({ "question": "nope" }))
        .await;
    app.wait_job(&ok).await;
    app.wait_job(&bad).await;
    app.get("/nowhere").await;
    let page = app.metrics().await;
    for (name, want) in [
        ("tally_jobs_submitted_total{kind=\"test.echo\"}", 1.0),
        (
            "tally_jobs_finished_total{kind=\"test.echo\",outcome=\"done\"}",
            1.0,
        ),
        (
            "tally_jobs_finished_total{kind=\"stats.global_mean\",outcome=\"failed\"}",
            1.0,
        ),
        ("tally_job_duration_seconds_count{kind=\"test.echo\"}", 1.0),
        (
            "tally_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"202\"}",
            2.0,
        ),
        (
            "tally_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"}",
            1.0,
        ),
        ("tally_jobs{state=\"done\"}", 1.0),
        ("tally_jobs{state=\"failed\"}", 1.0),
        ("tally_queue_depth", 0.0),
        ("tally_busy_workers", 0.0),
        ("tally_workers", 2.0),
        ("tally_worker_restarts_total", 0.0),
    ] {
        assert_eq!(metric(&page, name), Some(want), "{name}\n{page}");
    }
    assert!(page.contains("tally_http_request_duration_seconds_bucket"));
    assert!(page.contains("tally_store_commit_duration_seconds_bucket"));
    app.stop().await;
}

#[tokio::test]
async fn with_a_token_mutating_and_admin_routes_need_it_and_reads_do_not() {
    let app = TestApp::spawn_with(|c| c.auth_token = Some("s3cret-token".parse().unwrap())).await;
    let post = |path: &str, token: Option<&str>| {
        let mut req = app
            .client
            .post(app.url(path))
            .json(&json!({ "kind": "test.echo", "question": Q1 }));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    for path in ["/v1/jobs", "/api/states_mean"] {
        let res = post(path, None).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(res.headers()["www-authenticate"], "Bearer");
        assert_eq!(
            post(path, Some("wrong")).await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
    let res = app
        .client
        .get(app.url("/api/graceful_shutdown"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = app
        .client
        .delete(app.url("/v1/jobs/job_id_1"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    let res = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth("s3cret-token")
        .json(&json!({ "kind": "test.echo" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/num_jobs",
        "/api/jobs",
        "/v1/jobs",
        "/v1/jobs/stats",
    ] {
        let res = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_log_file_rotates_by_size_keeps_backups_and_logs_api_requests_in_utc() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("logs/tally.log");
    let log_arg = log.display().to_string();
    let p = Proc::start(
        dir.path(),
        &[
            "--store",
            "memory",
            "--log-file",
            &log_arg,
            "--log-max-bytes",
            "4096",
            "--log-backups",
            "2",
        ],
    );
    let c = p.client();
    for _ in 0..60 {
        c.post(
            "/api/global_mean",
            &json!({ "question": Q1, "state": "Ohio" }),
        )
        .await;
    }
    p.signal(libc::SIGTERM);
    let (status, _) = p.wait_exit(Duration::from_secs(10));
    assert!(status.success());

    let logs = dir.path().join("logs");
    let mut names: Vec<String> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["tally.log", "tally.log.1", "tally.log.2"],
        "two backups kept, older ones dropped"
    );
    for name in &names {
        let size = std::fs::metadata(logs.join(name)).unwrap().len();
        assert!(size < 4096 + 1024, "{name} is {size} bytes");
    }
    let newest = std::fs::read_to_string(&log).unwrap()
        + &std::fs::read_to_string(logs.join("tally.log.1")).unwrap();
    let line = newest
        .lines()
        .find(|l| l.contains("api request in") && l.contains("route=\"global_mean\""))
        .expect("api requests are logged");
    // 2026-11-23T01:25:16.787575Z: RFC 3339 in UTC.
    let ts = line.split_whitespace().next().unwrap();
    assert!(ts.ends_with('Z') && ts.contains('T'), "{ts}");
    assert!(
        line.contains("question=") && line.contains("obesity") && line.contains("state=\"Ohio\""),
        "{line}"
    );
    assert!(
        newest.contains("api response out"),
        "responses are logged too"
    );
}

/// `tally serve --help`, parsed: each heading (a line like `Network:`) and the long flags
/// listed under it, in order.
fn help_sections(help: &str) -> Vec<(String, Vec<String>)> {
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    for line in help.lines() {
        let indent = line.len() - line.trim_start().len();
        if indent == 0 && line.ends_with(':') && !line.contains(' ') {
            sections.push((line.trim_end_matches(':').to_string(), Vec::new()));
        } else if (1..=6).contains(&indent) && line.trim_start().starts_with('-') {
            let flag = line
                .split_whitespace()
                .find(|w| w.starts_with("--"))
                .expect("a flag line names its long flag")
                .trim_end_matches(',');
            sections
                .last_mut()
                .expect("flags come after a heading")
                .1
                .push(flag.to_string());
        }
    }
    sections
}

#[test]
fn serve_help_groups_every_flag_under_its_heading() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let want: &[(&str, &[&str])] = &[
        ("Options", &["--help"]),
        (
            "Network",
            &[
                "--bind",
                "--http-header-timeout-ms",
                "--http-idle-timeout-ms",
                "--max-connections",
                "--max-body-bytes",
                "--compat-get-sum-bind",
            ],
        ),
        (
            "Storage",
            &[
                "--stats-dataset",
                "--store",
                "--data-dir",
                "--max-upload-bytes",
                "--memory-max-results",
                "--sqlite-sync",
                "--sqlite-commit-delay-us",
            ],
        ),
        (
            "Jobs",
            &[
                "--workers",
                "--queue-capacity",
                "--job-timeout",
                "--poll-hold-ms",
                "--lease-ms",
                "--result-ttl",
                "--idempotency-ttl",
                "--max-attempts",
            ],
        ),
        ("Shutdown", &["--shutdown-timeout", "--shutdown-linger-ms"]),
        (
            "Logging",
            &[
                "--log-file",
                "--log-max-bytes",
                "--log-backups",
                "--log-level",
                "--log-format",
            ],
        ),
        (
            "Security",
            &["--auth-token", "--allowed-origin", "--allowed-host"],
        ),
        (
            "Pipeline",
            &["--journal", "--process-delay-max-ms", "--reorder-capacity"],
        ),
        (
            "Series",
            &[
                "--ooo-window-ms",
                "--block-points",
                "--retention",
                "--max-points",
                "--rollup-interval",
                "--rollup-window-ms",
                "--max-write-bytes",
                "--line-listen",
                "--line-precision",
                "--line-max-connections",
                "--max-future-ms",
                "--max-series",
                "--line-idle-timeout-ms",
            ],
        ),
        (
            "Sources",
            &[
                "--source",
                "--source-interval-ms",
                "--source-concurrency",
                "--source-timeout-ms",
                "--config",
            ],
        ),
    ];
    let got = help_sections(&help);
    let got: Vec<(&str, Vec<&str>)> = got
        .iter()
        .map(|(h, flags)| (h.as_str(), flags.iter().map(String::as_str).collect()))
        .collect();
    let want: Vec<(&str, Vec<&str>)> = want.iter().map(|(h, f)| (*h, f.to_vec())).collect();
    // A new flag needs a heading (`help_heading` in src/config.rs) and a place here.
    assert_eq!(got, want, "{help}");
    let store = help
        .lines()
        .skip_while(|l| !l.contains("--store <STORE>"))
        .nth(1)
        .unwrap();
    assert!(store.contains("redis://"), "{store}");
}

#[tokio::test]
async fn with_log_format_json_every_line_is_one_json_object_with_level_target_and_message() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(dir.path(), &["--store", "memory", "--log-format", "json"]);
    let c = p.client();
    c.post(
        "/api/global_mean",
        &json!({ "question": Q1, "state": "Ohio" }),
    )
    .await;
    // A client-controlled value with a line break: still one line, the break escaped.
    c.get("/api/get_results/job%0Aid_1").await;
    p.signal(libc::SIGTERM);
    let (status, lines) = p.wait_exit(Duration::from_secs(10));
    assert!(status.success());
    assert!(lines.len() >= 4, "{lines:?}");
    let mut events = Vec::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        let level = v["level"].as_str().unwrap_or_else(|| panic!("{line}"));
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
            "{line}"
        );
        assert!(v["target"].as_str().is_some(), "{line}");
        assert!(v["timestamp"].as_str().is_some(), "{line}");
        let message = v["fields"]["message"].as_str();
        events.push((message.unwrap_or_else(|| panic!("{line}")).to_string(), v));
    }
    let listening = &events
        .iter()
        .find(|(m, _)| m == "tally is listening")
        .expect("the start-up line")
        .1;
    assert_eq!(listening["fields"]["store"], "memory");
    assert_eq!(listening["target"], "tally::app");
    let polled = &events
        .iter()
        .find(|(m, v)| m == "api request in" && v["fields"]["route"] == "get_results")
        .expect("the poll is logged")
        .1;
    assert_eq!(polled["fields"]["job_id"], "job\nid_1");
}

#[test]
fn an_unknown_log_format_exits_non_zero_naming_the_accepted_ones() {
    let run = |args: &[&str], env: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tally"));
        cmd.arg("serve").args(args).env_remove("TALLY_LOG_FORMAT");
        if let Some(v) = env {
            cmd.env("TALLY_LOG_FORMAT", v);
        }
        cmd.output().unwrap()
    };
    // The flag, and the environment variable (checked before anything starts).
    for out in [run(&["--log-format", "xml"], None), run(&[], Some("xml"))] {
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("'xml'"), "{err}");
        assert!(err.contains("[possible values: text, json]"), "{err}");
    }
}

#[tokio::test]
async fn metrics_has_the_process_metrics_of_the_client_libraries_and_the_build() {
    let app = TestApp::spawn().await;
    let page = app.metrics().await;
    let value = |name: &str| metric(&page, name).unwrap_or_else(|| panic!("{name}\n{page}"));
    for (family, kind) in [
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
        ("process_threads", "gauge"),
        ("tally_build_info", "gauge"),
    ] {
        let line = format!("# TYPE {family} {kind}");
        assert!(page.lines().any(|l| l == line), "{line}\n{page}");
    }
    assert!(value("process_cpu_seconds_total") >= 0.0);
    let rss = value("process_resident_memory_bytes");
    assert!(rss > 0.0);
    assert!(value("process_virtual_memory_bytes") >= rss);
    let open = value("process_open_fds");
    assert!(open > 0.0);
    assert!(value("process_max_fds") >= open);
    assert!(value("process_threads") >= 1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = value("process_start_time_seconds");
    assert!(
        start <= now + 1.0 && start > now - 3600.0,
        "{start} vs {now}"
    );
    let build = format!(
        "tally_build_info{{version=\"{}\",arch=\"{}\",os=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH,
        std::env::consts::OS
    );
    assert!(page.lines().any(|l| l == build), "{build}\n{page}");
    assert!(page.ends_with("# EOF\n"), "one end marker, at the end");
    assert_eq!(page.matches("# EOF").count(), 1);
    app.stop().await;
}
