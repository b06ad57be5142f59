//! Every kind of bad input gets a clear 4xx (or the compatible API's error shape), and
//! the service stays up.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::TestApp;

struct Case {
    method: Method,
    path: &'static str,
    content_type: Option<&'static str>,
    body: String,
    status: StatusCode,
    /// Text the answer must contain (in `detail` or `reason`).
    says: &'static str,
}

fn case(
    method: Method,
    path: &'static str,
    ct: Option<&'static str>,
    body: &str,
    status: u16,
    says: &'static str,
) -> Case {
    Case {
        method,
        path,
        content_type: ct,
        body: body.to_string(),
        status: StatusCode::from_u16(status).unwrap(),
        says,
    }
}

const JSON: Option<&str> = Some("application/json");

#[tokio::test]
async fn bad_requests_get_a_4xx_that_names_the_problem() {
    let app = TestApp::spawn_with(|c| c.max_body_bytes = 2048).await;
    let big = format!(
        "{{\"kind\":\"test.echo\",\"params\":{{\"pad\":\"{}\"}}}}",
        "x".repeat(4096)
    );
    let big_compat = format!("{{\"question\":\"{}\"}}", "x".repeat(4096));
    let cases = vec![
        // Native API: problem+json.
        case(
            Method::POST,
            "/v1/jobs",
            JSON,
            "{\"kind\":",
            400,
            "EOF while parsing",
        ),
        case(
            Method::POST,
            "/v1/jobs",
            JSON,
            "not json at all",
            400,
            "Failed to parse the request body as JSON",
        ),
        case(
            Method::POST,
            "/v1/jobs",
            Some("text/plain"),
            "{\"kind\":\"test.echo\"}",
            415,
            "Content-Type: application/json",
        ),
        case(
            Method::POST,
            "/v1/jobs",
            None,
            "{\"kind\":\"test.echo\"}",
            415,
            "Content-Type: application/json",
        ),
        case(
            Method::POST,
            "/v1/jobs",
            JSON,
            "{}",
            422,
            "missing field `kind`",
        ),
        case(
            Method::POST,
            "/v1/jobs",
            JSON,
            "{\"kind\":\"test.echo\",\"extra\":1}",
            422,
            "unknown field `extra`",
        ),
        case(
            Method::POST,
            "/v1/jobs",
            JSON,
            "{\"kind\":7}",
            422,
            "invalid type",
        ),
        case(
            Method::POST,
            "/v1/jobs",
            JSON,
            "{\"kind\":\"nope\"}",
            400,
            "unknown job kind \"nope\"",
        ),
        case(
            Method::POST,
            "/v1/jobs",
            JSON,
            "{\"kind\":\"test.echo\",\"params\":[1]}",
            422,
            "params must be a JSON object",
        ),
        case(
            Method::POST,
            "/v1/jobs",
            JSON,
            "{\"kind\":\"stats.state_mean\",\"params\":{\"question\":\"q\"}}",
            422,
            "missing field 'state'",
        ),
        case(
            Method::POST,
            "/v1/jobs",
            JSON,
            "{\"kind\":\"test.sleep\",\"params\":{\"ms\":-1}}",
            422,
            "ms must be an integer",
        ),
        case(
            Method::POST,
            "/v1/jobs",
            JSON,
            &big,
            413,
            "larger than the limit of 2048 bytes",
        ),
        case(
            Method::GET,
            "/v1/jobs/job_id_424242",
            None,
            "",
            404,
            "no job with id",
        ),
        case(
            Method::GET,
            "/v1/jobs/../../etc/passwd",
            None,
            "",
            404,
            "no route",
        ),
        case(
            Method::GET,
            "/v1/jobs/job_id_0",
            None,
            "",
            404,
            "no job with id",
        ),
        case(Method::GET, "/v1/jobs/%00", None, "", 404, "no job with id"),
        case(
            Method::DELETE,
            "/v1/jobs/banana",
            None,
            "",
            404,
            "no job with id",
        ),
        case(
            Method::GET,
            "/v1/jobs?limit=0",
            None,
            "",
            400,
            "limit must be an integer from 1 to 1000",
        ),
        case(
            Method::GET,
            "/v1/jobs?limit=abc",
            None,
            "",
            400,
            "limit must be",
        ),
        case(
            Method::GET,
            "/v1/jobs?status=weird",
            None,
            "",
            400,
            "status must be one of",
        ),
        case(
            Method::GET,
            "/v1/jobs?cursor=x",
            None,
            "",
            400,
            "cursor \"x\" is not a job id",
        ),
        case(
            Method::GET,
            "/v1/jobs?colour=red",
            None,
            "",
            400,
            "unknown query parameter",
        ),
        case(
            Method::GET,
            "/no/such/route",
            None,
            "",
            404,
            "no route for GET /no/such/route",
        ),
        case(
            Method::DELETE,
            "/healthz",
            None,
            "",
            405,
            "DELETE is not allowed on /healthz",
        ),
        case(
            Method::GET,
            "/api/states_mean",
            None,
            "",
            405,
            "GET is not allowed",
        ),
        // Compatible API: {"status": "error", "reason": ...}.
        case(
            Method::POST,
            "/api/states_mean",
            JSON,
            "{\"question\":",
            400,
            "malformed JSON body",
        ),
        case(
            Method::POST,
            "/api/states_mean",
            JSON,
            "[1,2]",
            400,
            "must be an object",
        ),
        case(
            Method::POST,
            "/api/states_mean",
            Some("text/plain"),
            "{\"question\":\"q\"}",
            415,
            "Content-Type: application/json",
        ),
        case(
            Method::POST,
            "/api/states_mean",
            JSON,
            &big_compat,
            413,
            "too large",
        ),
        case(
            Method::GET,
            "/api/get_results/job_id_999999",
            None,
            "",
            404,
            "Invalid job_id",
        ),
        case(
            Method::GET,
            "/api/get_results/nonsense",
            None,
            "",
            404,
            "Invalid job_id",
        ),
        case(
            Method::GET,
            "/api/get_results/job_id_1%27%20OR%201=1",
            None,
            "",
            404,
            "Invalid job_id",
        ),
    ];
    for c in &cases {
        let mut req = app
            .client
            .request(c.method.clone(), app.url(c.path))
            .body(c.body.clone());
        if let Some(ct) = c.content_type {
            req = req.header("content-type", ct);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let ctype = res
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let text = res.text().await.unwrap();
        assert_eq!(status, c.status, "{} {}: {text}", c.method, c.path);
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{} {}: not JSON: {text}", c.method, c.path));
        let message = body["detail"]
            .as_str()
            .or(body["reason"].as_str())
            .unwrap_or("");
        assert!(
            message.contains(c.says),
            "{} {}: {message:?} lacks {:?}",
            c.method,
            c.path,
            c.says
        );
        // Routing errors (405) use problem+json everywhere; compatible handlers answer in
        // their own shape.
        if c.path.starts_with("/api/") && c.status != StatusCode::METHOD_NOT_ALLOWED {
            assert_eq!(
                body["status"], "error",
                "{}: compatible error shape",
                c.path
            );
        } else {
            assert_eq!(ctype, "application/problem+json", "{}", c.path);
            assert_eq!(body["status"], status.as_u16(), "{}", c.path);
        }
    }
    // Still up, and nothing above created a job.
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let (_, stats) = app.get("/v1/jobs/stats").await;
    assert_eq!(
        stats["done"].as_u64().unwrap() + stats["in_progress"].as_u64().unwrap(),
        0
    );
    app.stop().await;
}

#[tokio::test]
async fn a_mistyped_store_url_is_refused_without_printing_its_password() {
    const PW: &str = "Pw-s3cret-91";
    for (store, says) in [
        (format!("redis://user:{PW}@host:6390x/db1"), "bad port"),
        (
            format!("redis://user:{PW}@host:6390/db1"),
            "bad database number",
        ),
        (format!("redis://user:{PW}@:6390/0"), "needs a host"),
        (format!("rediss://user:{PW}@host:6390/0"), "unknown store"),
        (format!("redis://:{PW}/x@host/db"), "needs a host"),
    ] {
        for env in [false, true] {
            let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"));
            cmd.arg("serve").env_remove("TALLY_STORE");
            if env {
                cmd.env("TALLY_STORE", &store);
            } else {
                cmd.args(["--store", &store]);
            }
            let out = cmd.output().await.unwrap();
            assert!(!out.status.success(), "{store}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                !stderr.contains(PW) && !stdout.contains(PW),
                "{stderr}{stdout}"
            );
            assert!(
                stderr.contains("--store") && stderr.contains(says),
                "{store}: {stderr}"
            );
        }
    }
}

#[tokio::test]
async fn help_does_not_show_a_store_password_from_the_environment() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--help"])
        .env("TALLY_STORE", "redis://user:Pw-env-77@host/0")
        .output()
        .await
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("redis://"), "--store names redis: {help}");
    assert!(!help.contains("Pw-env-77"), "{help}");
}
