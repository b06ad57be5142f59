//! `Idempotency-Key` on `POST /v1/jobs`, on every store: a retry with the same key and
//! request gets the first job (`Idempotent-Replayed: true`), the same key with another
//! request is 422 naming that job, a malformed key is 400, concurrent submissions with
//! one key make one job, and a key is free again after `--idempotency-ttl`.
//! (The Redis pause that makes a client retry is in redis_faults.rs.)

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tally::config::StoreSpec;

use crate::helpers::{on_every_store, Backend, TestApp};

/// What a keyed submission was answered.
pub struct Answer {
    pub status: StatusCode,
    pub replayed: Option<String>,
    pub location: Option<String>,
    pub body: Value,
}

/// `POST /v1/jobs` with `Idempotency-Key: key` (raw bytes, so malformed keys can be sent).
pub async fn submit_keyed(app: &TestApp, key: &[u8], body: &Value) -> Answer {
    let value = reqwest::header::HeaderValue::from_bytes(key).expect("a sendable header");
    let res = app
        .client
        .post(app.url("/v1/jobs"))
        .header("idempotency-key", value)
        .json(body)
        .send()
        .await
        .unwrap();
    let header = |name: &str| {
        res.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let (replayed, location) = (header("idempotent-replayed"), header("location"));
    let status = res.status();
    let text = res.text().await.unwrap();
    Answer {
        status,
        replayed,
        location,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

/// The jobs of `kind` the service lists.
pub async fn jobs_of(app: &TestApp, kind: &str) -> Vec<Value> {
    let (status, page) = app.get(&format!("/v1/jobs?kind={kind}&limit=100")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["jobs"].as_array().cloned().unwrap_or_default()
}

async fn a_retry_gets_the_first_job(store: Backend) {
    let app = TestApp::on(store, |_| {}).await;
    a_retry_gets_the_first_job_on(&app).await;
    app.stop().await;
}

async fn a_retry_gets_the_first_job_on(app: &TestApp) {
    let body = json!({ "kind": "test.echo", "params": { "order": 17, "lines": [1, 2] } });
    let first = submit_keyed(app, b"order-17-attempt", &body).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    assert_eq!(first.replayed, None, "a first submission is not a replay");
    let id = first.body["id"].as_str().unwrap().to_string();
    assert_eq!(first.location.as_deref(), Some(&*format!("/v1/jobs/{id}")));
    app.wait_job(&id).await;

    // The client retries (its params' keys in another order are the same request).
    let again = json!({ "kind": "test.echo", "params": { "lines": [1, 2], "order": 17 } });
    for retry in [&body, &again] {
        let r = submit_keyed(app, b"order-17-attempt", retry).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
        assert_eq!(r.body["id"], json!(id), "{}", r.body);
        assert_eq!(r.replayed.as_deref(), Some("true"));
        assert_eq!(r.location, first.location);
    }
    let jobs = jobs_of(app, "test.echo").await;
    assert_eq!(jobs.len(), 1, "one job, not three: {jobs:?}");

    // Another key is another job.
    let other = submit_keyed(app, b"order-17-other", &body).await;
    assert_eq!(other.status, StatusCode::ACCEPTED, "{}", other.body);
    assert_ne!(other.body["id"], json!(id));
    assert_eq!(other.replayed, None);
}

async fn another_request_with_the_key_is_422(store: Backend) {
    let app = TestApp::on(store, |_| {}).await;
    another_request_with_the_key_is_422_on(&app).await;
    app.stop().await;
}

async fn another_request_with_the_key_is_422_on(app: &TestApp) {
    let body = json!({ "kind": "test.echo", "params": { "n": 1 } });
    let first = submit_keyed(app, b"reused-key", &body).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    let id = first.body["id"].as_str().unwrap().to_string();
    for other in [
        json!({ "kind": "test.echo", "params": { "n": 2 } }),
        json!({ "kind": "test.sleep", "params": { "ms": 1 } }),
    ] {
        let r = submit_keyed(app, b"reused-key", &other).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
        assert_eq!(r.body["job_id"], json!(id), "{}", r.body);
        let detail = r.body["detail"].as_str().unwrap_or("");
        assert!(
            detail.contains("Idempotency-Key") && detail.contains(&id),
            "{}",
            r.body
        );
        assert_eq!(r.replayed, None);
    }
    assert_eq!(jobs_of(app, "test.echo").await.len(), 1);
    assert_eq!(jobs_of(app, "test.sleep").await.len(), 0);
}

async fn concurrent_submissions_make_one_job(store: Backend) {
    let app = TestApp::on(store, |_| {}).await;
    concurrent_submissions_make_one_job_on(&app).await;
    app.stop().await;
}

async fn concurrent_submissions_make_one_job_on(app: &TestApp) {
    let body = json!({ "kind": "test.echo", "params": { "burst": true } });
    let answers =
        futures_util::future::join_all((0..20).map(|_| submit_keyed(app, b"one-burst", &body)))
            .await;
    let first = answers[0].body["id"].clone();
    for a in &answers {
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
        assert_eq!(a.body["id"], first, "{}", a.body);
    }
    let fresh = answers.iter().filter(|a| a.replayed.is_none()).count();
    assert_eq!(fresh, 1, "one answer made the job, the others replayed it");
    let jobs: Vec<Value> = jobs_of(app, "test.echo")
        .await
        .into_iter()
        .filter(|j| j["params"]["burst"] == json!(true))
        .collect();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
}

on_every_store!(
    a_retry_gets_the_first_job,
    another_request_with_the_key_is_422,
    concurrent_submissions_make_one_job,
);

#[tokio::test]
async fn a_malformed_idempotency_key_is_400_and_makes_no_job() {
    let app = TestApp::spawn().await;
    let body = json!({ "kind": "test.echo", "params": {} });
    let long = vec![b'k'; 256];
    for (key, problem) in [
        (&b""[..], "1 to 255 characters"),
        (&long[..], "1 to 255 characters"),
        (&b"has space"[..], "visible ASCII"),
        (&b"tab\there"[..], "visible ASCII"),
        ("caf\u{e9}".as_bytes(), "visible ASCII"),
    ] {
        let r = submit_keyed(&app, key, &body).await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "{:?}: {}",
            String::from_utf8_lossy(key),
            r.body
        );
        let detail = r.body["detail"].as_str().unwrap_or("");
        assert!(
            detail.contains("Idempotency-Key") && detail.contains(problem),
            "{}",
            r.body
        );
    }
    // Twice in one request.
    let res = app
        .client
        .post(app.url("/v1/jobs"))
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert!(jobs_of(&app, "test.echo").await.is_empty());
    // The longest key and every visible character are fine.
    let longest = vec![b'k'; 255];
    let visible: Vec<u8> = (b'!'..=b'~').collect();
    for key in [&longest[..], &visible[..]] {
        let r = submit_keyed(&app, key, &body).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_key_is_free_again_after_the_idempotency_ttl() {
    let app = TestApp::spawn_with(|c| {
        c.store = StoreSpec::Memory;
        c.idempotency_ttl = 1;
    })
    .await;
    let body = json!({ "kind": "test.echo", "params": { "n": 1 } });
    let first = submit_keyed(&app, b"short-lived", &body).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    let again = submit_keyed(&app, b"short-lived", &body).await;
    assert_eq!(again.body["id"], first.body["id"]);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let later = submit_keyed(&app, b"short-lived", &body).await;
    assert_eq!(later.status, StatusCode::ACCEPTED, "{}", later.body);
    assert_ne!(
        later.body["id"], first.body["id"],
        "the key outlived its ttl"
    );
    assert_eq!(later.replayed, None);
    app.stop().await;
}

#[tokio::test]
async fn the_openapi_document_describes_the_header_and_its_answers() {
    let app = TestApp::spawn().await;
    let (_, doc) = app.get("/openapi.json").await;
    let op = &doc["paths"]["/v1/jobs"]["post"];
    let params = op["parameters"].as_array().cloned().unwrap_or_default();
    let key = params
        .iter()
        .find(|p| p["name"] == "Idempotency-Key")
        .unwrap_or_else(|| panic!("no Idempotency-Key parameter: {op}"));
    assert_eq!(key["in"], "header", "{key}");
    assert_eq!(key["required"], json!(false), "{key}");
    assert_eq!(key["schema"]["maxLength"], json!(255), "{key}");
    let accepted = &op["responses"]["202"]["headers"];
    assert!(accepted.get("Idempotent-Replayed").is_some(), "{op}");
    let refused = op["responses"]["422"]["description"].as_str().unwrap_or("");
    assert!(refused.contains("Idempotency-Key"), "{op}");
    // Both answers are problem documents whose schema has the member they carry.
    for (status, schema, member) in [("422", "Problem", "job_id"), ("503", "Problem", "outcome")] {
        let content = &op["responses"][status]["content"]["application/problem+json"];
        assert_eq!(
            content["schema"]["$ref"],
            json!(format!("#/components/schemas/{schema}")),
            "{op}"
        );
        let props = &doc["components"]["schemas"][schema]["properties"];
        assert!(props.get(member).is_some(), "{schema}: {props}");
    }
    app.stop().await;
}
