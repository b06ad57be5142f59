//! Pages of other sites, in a real Chromium (see `webdriver.rs`): a page of an origin
//! allowed with `--allowed-origin` calls the API with the token (CORS preflight
//! included) and succeeds, a page of any other origin fails, and a page whose own name was
//! rebound to this machine (DNS rebinding) can neither read, submit nor shut down.

use reqwest::StatusCode;
use serde_json::Value;
use tally::config::Secret;

use crate::helpers::TestApp;
use crate::webdriver::Browser;

const TOKEN: &str = "cross-origin-s3cret";

/// A plain page on 127.0.0.1:0 (another origin than tally's): what a dashboard served
/// from elsewhere is. Answers until the runtime ends.
async fn other_site() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let page = axum::Router::new().route(
        "/",
        axum::routing::get(|| async {
            axum::response::Html("<!doctype html><title>elsewhere</title><p>another site")
        }),
    );
    tokio::spawn(async move { axum::serve(listener, page).await });
    port
}

async fn job_count(app: &TestApp) -> u64 {
    let (status, body) = app.get("/v1/jobs/stats").await;
    assert_eq!(status, StatusCode::OK);
    ["queued", "running", "done", "failed", "cancelled"]
        .iter()
        .map(|k| body[k].as_u64().expect("a count"))
        .sum()
}

#[tokio::test]
async fn a_page_of_an_allowed_origin_calls_the_api_with_its_token_and_others_cannot() {
    let site = other_site().await;
    let app = TestApp::spawn_with(|c| {
        c.auth_token = Some(Secret(TOKEN.to_string()));
        c.allowed_origins = vec![format!("http://127.0.0.1:{site}").parse().unwrap()];
    })
    .await;
    let submit = format!(
        "{{ method: 'POST', headers: {{ 'Authorization': 'Bearer {TOKEN}', \
         'Content-Type': 'application/json', 'Idempotency-Key': 'k1' }}, \
         body: JSON.stringify({{ kind: 'test.echo', params: {{ n: 1 }} }}) }}"
    );
    let url = app.url("/v1/jobs");

    // The allowed origin: the preflight (Authorization and a JSON body are not "simple")
    // passes, then the POST, and the page can read the answer.
    let b = Browser::open(&format!("http://127.0.0.1:{site}")).await;
    b.goto("/").await;
    let got = b.fetch(&url, &submit).await;
    assert!(got.starts_with("202 "), "from the allowed origin: {got}");
    let body: Value = serde_json::from_str(&got[4..]).unwrap();
    let id = body["id"].as_str().expect("the job id").to_string();
    assert_eq!(app.wait_job(&id).await["status"], "done");
    // A read with the token, and the token's absence answered in a way the page can see.
    let got = b
        .fetch(
            &app.url(&format!("/v1/jobs/{id}")),
            &format!("{{ headers: {{ 'Authorization': 'Bearer {TOKEN}' }} }}"),
        )
        .await;
    assert!(got.starts_with("200 "), "{got}");
    let got = b.fetch(&url, &submit.replace(TOKEN, "wrong")).await;
    assert!(got.starts_with("401 "), "a wrong token: {got}");
    b.close().await;

    // Another origin (the same server named otherwise): the browser itself refuses.
    let before = job_count(&app).await;
    let b = Browser::open(&format!("http://localhost:{site}")).await;
    b.goto("/").await;
    let got = b.fetch(&url, &submit.replace("k1", "k2")).await;
    assert!(got.starts_with("error "), "from another origin: {got}");
    assert_eq!(job_count(&app).await, before, "no job made");
    b.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_page_whose_name_was_rebound_to_this_machine_is_refused_everything() {
    let app = TestApp::spawn().await;
    let port = app.addr.rsplit(':').next().unwrap().to_string();
    // What a DNS rebinding attack achieves: the attacker's name now resolves to 127.0.0.1,
    // so its page is same-origin with the service.
    let b = Browser::open_with(
        &format!("http://rebind.example:{port}"),
        &["--host-resolver-rules=MAP rebind.example 127.0.0.1"],
    )
    .await;
    b.goto("/").await;
    let page = b.text("body").await;
    assert!(page.contains("--allowed-host"), "the page: {page}");
    let submit = "{ method: 'POST', headers: { 'Content-Type': 'application/json' }, \
                  body: JSON.stringify({ kind: 'test.echo', params: {} }) }";
    for (what, path, init) in [
        ("submit", "/v1/jobs", submit),
        ("read", "/v1/jobs", "{}"),
        ("shut down", "/api/graceful_shutdown", "{}"),
    ] {
        let got = b.fetch(path, init).await;
        assert!(got.starts_with("421 "), "{what}: {got}");
    }
    b.close().await;
    assert_eq!(job_count(&app).await, 0);
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, StatusCode::OK, "still running");
    app.stop().await;
}

#[tokio::test]
async fn a_host_the_service_is_not_reachable_as_gets_421_naming_the_flag_unless_allowed() {
    let app = TestApp::spawn().await;
    let port = app.addr.rsplit(':').next().unwrap().to_string();
    for path in ["/v1/jobs", "/api/num_jobs", "/", "/healthz"] {
        let res = app
            .client
            .get(app.url(path))
            .header("host", format!("rebind.example:{port}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::MISDIRECTED_REQUEST, "{path}");
        let text = res.text().await.unwrap();
        assert!(text.contains("'rebind.example:"), "{path}: {text}");
        assert!(text.contains("--allowed-host"), "{path}: {text}");
    }
    for host in ["localhost", "127.0.0.1", "[::1]"] {
        let res = app
            .client
            .get(app.url("/v1/jobs"))
            .header("host", format!("{host}:{port}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{host}");
    }
    app.stop().await;

    let app = TestApp::spawn_with(|c| {
        c.allowed_hosts = vec!["tally.example".parse().unwrap()];
        c.allowed_origins = vec!["https://dash.example".parse().unwrap()];
    })
    .await;
    for host in ["tally.example", "TALLY.example:8080", "dash.example"] {
        let res = app
            .client
            .get(app.url("/v1/jobs"))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{host}");
    }
    app.stop().await;
}
