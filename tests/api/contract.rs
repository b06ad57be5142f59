//! The contract test: schemathesis (PyPI) generates requests from `/openapi.json`
//! against a server started here with `--auth-token` (so mutations run, with the
//! header), and checks every answer: no 5xx, and status, content type, headers and body
//! as the description says. It runs from the venv `.ci/run` creates
//! (`.venv-test/`, gitignored); without it the test fails and says how to make it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tally::config::{Secret, StoreSpec};

use crate::helpers::TestApp;

/// Pinned with `.ci/run`.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";
const TOKEN: &str = "contract-s3cret";
/// Generated cases per operation, and the run's time limit: bounded, not exhaustive.
const MAX_EXAMPLES: &str = "25";
const RUN_LIMIT: Duration = Duration::from_secs(600);

fn schemathesis() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-test/bin/schemathesis");
    assert!(
        bin.is_file(),
        "the contract test needs schemathesis in .venv-test/ at the repository's root: \
         python3 -m venv .venv-test && .venv-test/bin/pip install '{SCHEMATHESIS}' \
         (.ci/run does this)"
    );
    bin
}

#[tokio::test]
async fn every_generated_request_gets_an_answer_as_described_and_never_a_server_error() {
    let bin = schemathesis();
    let app = TestApp::spawn_with(|c| {
        c.auth_token = Some(Secret(TOKEN.to_string()));
        // The kinds and routes a production server has.
        c.enable_test_jobs = false;
        c.store = StoreSpec::Memory;
        c.shutdown_timeout = 1;
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let schema = app.url("/openapi.json");
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(bin);
        cmd.current_dir(work.path())
            .args(["run", &schema])
            .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,\
                 response_headers_conformance,response_schema_conformance",
            ])
            // The stateful phase infers links from `Location` headers and trips over
            // `/v1/jobs/cancel` looking like `/v1/jobs/{id}`; the other phases cover
            // every operation.
            .args(["--phases", "examples,coverage,fuzzing"])
            .args(["--max-examples", MAX_EXAMPLES])
            // Reproducible: the same cases on every run.
            .args(["--seed", "20261127"])
            .args(["--workers", "2", "--request-timeout", "10"])
            // The drain route would stop the server under test; the stream never ends.
            // Both have tests of their own.
            .args(["--exclude-path", "/api/graceful_shutdown"])
            .args(["--exclude-path", "/v1/stream"])
            .arg("--no-color")
            .env("NO_COLOR", "1")
            .env("SCHEMATHESIS_TELEMETRY", "false")
            .stdin(Stdio::null());
        let child = cmd.output().expect("schemathesis runs");
        (child, work)
    });
    let (out, _work) = tokio::time::timeout(RUN_LIMIT, out)
        .await
        .expect("schemathesis finished in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found problems ({:?}, {:.0?}):\n{stdout}\n{stderr}",
        out.status,
        started.elapsed()
    );
    // It did test: the summary names the cases it generated, all passed.
    assert!(stdout.contains("generated"), "{stdout}");
    assert!(!stdout.contains("failed"), "{stdout}");
    // The server is still up and sound after all that.
    let (status, _) = app.get("/readyz").await;
    assert_eq!(status, reqwest::StatusCode::OK);
    app.stop().await;
}
