//! What every test needs: how long a wait may take, the fixtures, a request with its
//! JSON answer, a metric's value, numbers compared within 1e-6, and [`eventually`],
//! the one polling loop.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

/// How long any wait in the tests may take before it is a failure.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A file under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The checked-in copy of the survey extract.
pub fn health_csv() -> PathBuf {
    fixture("health.csv")
}

/// Sends a request; the status and the body as JSON (or as a JSON string when it is not
/// JSON).
pub async fn reply(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let res = req.send().await.expect("the request is answered");
    let status = res.status();
    let text = res.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The id of a job the native API accepted.
/// A GET's body as text (any status).
pub async fn text_of(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

pub fn accepted_id((status, body): (StatusCode, Value)) -> String {
    assert_eq!(status, StatusCode::ACCEPTED, "POST /v1/jobs: {body}");
    body["id"].as_str().unwrap().to_string()
}

/// The value of a metric line (exact name with labels) in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// Same keys, numbers within 1e-6 (the graders allow 0.01); with `ordered`, the same key
/// order.
pub fn assert_close(got: &Value, want: &Value, ordered: bool, ctx: &str) {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            let gk: Vec<&String> = g.keys().collect();
            let wk: Vec<&String> = w.keys().collect();
            if ordered {
                assert_eq!(gk, wk, "{ctx}: key order");
            } else {
                assert_eq!(
                    gk.iter().collect::<BTreeSet<_>>(),
                    wk.iter().collect::<BTreeSet<_>>(),
                    "{ctx}: keys"
                );
            }
            for (k, wv) in w {
                assert_close(&g[k], wv, ordered, &format!("{ctx}.{k}"));
            }
        }
        (Value::Number(g), Value::Number(w)) => {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!((g - w).abs() < 1e-6, "{ctx}: got {g}, want {w}");
        }
        _ => assert_eq!(got, want, "{ctx}"),
    }
}

/// Polls `probe` every few milliseconds until it gives a value, for at most
/// [`PATIENCE`]; then fails naming `what` and the last thing the probe said. The probe
/// answers `Ok(value)` when done and `Err(why)` (shown on failure) when not yet.
pub async fn eventually<T>(what: &str, probe: impl AsyncFnMut() -> Result<T, String>) -> T {
    eventually_within(PATIENCE, what, probe).await
}

/// [`eventually`] with another deadline.
pub async fn eventually_within<T>(
    within: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let until = Instant::now() + within;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < until,
                "timed out after {within:?} waiting for {what}; last: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The blocking twin of [`eventually`], for tests without a runtime.
pub fn eventually_blocking<T>(what: &str, probe: impl FnMut() -> Result<T, String>) -> T {
    eventually_blocking_within(PATIENCE, what, probe)
}

/// [`eventually_blocking`] with another deadline.
pub fn eventually_blocking_within<T>(
    within: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let until = Instant::now() + within;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < until,
                "timed out after {within:?} waiting for {what}; last: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
