//! `/openapi.json` against the answers the service really gives: one table of probes
//! (a request and the status it provokes) covering every operation of the description,
//! sent to a server with `--auth-token`. For each answer, the operation must describe its
//! status, and its `Content-Type` (without parameters) must be one the description gives
//! for that status; a body-less 204 or 304 must be described without content. The probes
//! every route shares (another method on the path: 405 with `Allow`; a foreign `Host`:
//! 421; no or a wrong token on guarded routes: 401; another site's page changing state:
//! 403) are derived from the table's success rows, so a new route gets them too. Last,
//! the service drains (`/api/graceful_shutdown`) and the intake routes are probed for 503.

use std::collections::BTreeSet;
use std::io::Write;

use reqwest::header::{self, HeaderMap};
use reqwest::Method;
use serde_json::{json, Value};
use tally::config::Secret;

use crate::helpers::{accepted_id, reply, TestApp};

const TOKEN: &str = "coverage-s3cret";
/// `--max-body-bytes`, `--max-write-bytes` and `--max-upload-bytes` of the server.
const LIMIT: usize = 4096;
/// A method no route serves.
const UNSERVED: &str = "PATCH";

/// What a probe sends beside the right bearer token.
#[derive(Debug, Clone)]
enum Input {
    Nothing,
    Json(Value),
    /// This body with this Content-Type.
    Body(&'static str, Vec<u8>),
    /// `{}` compressed as this Content-Encoding claims (it is not: only gzip is taken).
    Encoded(&'static str),
    /// One more header.
    Header(&'static str, String),
    NoToken,
    WrongToken,
    ForeignHost,
    OtherSite,
}

impl Input {
    /// For messages: the kind of input, not the bytes.
    fn label(&self) -> String {
        match self {
            Input::Json(v) => format!("{:.60}", v.to_string()),
            Input::Body(ct, body) => format!("{} bytes of {ct}", body.len()),
            other => format!("{other:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Serving,
    /// After `GET /api/graceful_shutdown`, in table order.
    Draining,
}

#[derive(Debug, Clone)]
struct Probe {
    phase: Phase,
    method: Method,
    /// The path as `/openapi.json` names it.
    route: String,
    path: String,
    send: Input,
    status: u16,
}

/// Ids and validators the table's paths need, made before it runs.
struct Fixture {
    done: String,
    failed: String,
    sleeper: String,
    compat_done: String,
    etag: String,
}

/// `op` is `METHOD /route`, as the description names it; `path` what is sent (the route
/// itself when empty, the route and a query when it starts with `?`).
fn row(phase: Phase, op: &str, path: &str, send: Input, status: u16) -> Probe {
    let (method, route) = op.split_once(' ').unwrap();
    let path = match path {
        "" => route.to_string(),
        q if q.starts_with('?') => format!("{route}{q}"),
        p => p.to_string(),
    };
    Probe {
        phase,
        method: method.parse().unwrap(),
        route: route.to_string(),
        path,
        send,
        status,
    }
}

fn json_body(text: &str) -> Input {
    Input::Body("application/json", text.as_bytes().to_vec())
}

/// A JSON object larger than [`LIMIT`].
fn too_large() -> Input {
    json_body(&json!({ "kind": "test.echo", "pad": "x".repeat(2 * LIMIT) }).to_string())
}

/// The table: every operation's success, and the errors its own input provokes.
#[rustfmt::skip]
fn table(f: &Fixture) -> Vec<Probe> {
    use Input::*;
    use Phase::{Draining as D, Serving as S};
    let now = tally::now_ms();
    let echo = || Json(json!({ "kind": "test.echo", "params": {} }));
    let event = || Json(json!({ "conn": 1, "seq": 0, "value": 1, "sent_at": now }));
    let points = || Json(json!([{ "t": now, "v": 1.5 }]));
    let text = |s: &str| Body("text/plain", s.as_bytes().to_vec());
    let csv = |s: &str| Body("text/csv", s.as_bytes().to_vec());
    let job = |id: &str| format!("/v1/jobs/{id}");
    let retry = |id: &str| format!("/v1/jobs/{id}/retry");
    let (done, failed, sleeper) = (f.done.as_str(), f.failed.as_str(), f.sleeper.as_str());
    let unknown = "job_id_999999";
    let mut t = vec![
        row(S, "GET /", "", Nothing, 200),
        row(S, "GET /docs", "", Nothing, 200),
        row(S, "GET /ui/{path}", "/ui/js/app.js", Nothing, 200),
        row(S, "GET /ui/{path}", "/ui/js/app.js", Header("if-none-match", f.etag.clone()), 304),
        row(S, "GET /ui/{path}", "/ui/nothing.js", Nothing, 404),
        row(S, "GET /openapi.json", "", Nothing, 200),
        row(S, "GET /healthz", "", Nothing, 200),
        row(S, "GET /readyz", "", Nothing, 200),
        row(S, "GET /metrics", "", Nothing, 200),
        row(S, "POST /v1/jobs", "", echo(), 202),
        row(S, "POST /v1/jobs", "", json_body("{"), 400),
        row(S, "POST /v1/jobs", "", Json(json!({ "kind": "no.such" })), 400),
        row(S, "POST /v1/jobs", "", too_large(), 413),
        row(S, "POST /v1/jobs", "", text("{}"), 415),
        row(S, "POST /v1/jobs", "", Encoded("br"), 415),
        row(S, "POST /v1/jobs", "", Json(json!({ "kind": "test.sleep", "params": { "ms": "long" } })), 422),
        row(S, "GET /v1/jobs", "", Nothing, 200),
        row(S, "GET /v1/jobs", "?status=bogus", Nothing, 400),
        row(S, "GET /v1/jobs/stats", "", Nothing, 200),
        row(S, "GET /v1/overview", "", Nothing, 200),
        row(S, "GET /v1/overview/history", "", Nothing, 200),
        row(S, "GET /v1/pipeline", "", Nothing, 200),
        row(S, "GET /v1/stream", "", Nothing, 200),
        row(S, "GET /v1/stream", "?interval_ms=1", Nothing, 400),
        row(S, "GET /v1/replicas", "", Nothing, 200),
        row(S, "GET /v1/queue", "", Nothing, 200),
        row(S, "GET /v1/jobs/{id}", &job(done), Nothing, 200),
        row(S, "GET /v1/jobs/{id}", &job(unknown), Nothing, 404),
        row(S, "DELETE /v1/jobs/{id}", &job(sleeper), Nothing, 200),
        row(S, "DELETE /v1/jobs/{id}", &job(done), Nothing, 409),
        row(S, "DELETE /v1/jobs/{id}", &job(unknown), Nothing, 404),
        row(S, "POST /v1/jobs/{id}/retry", &retry(sleeper), Nothing, 202),
        row(S, "POST /v1/jobs/{id}/retry", &retry(done), Nothing, 409),
        row(S, "POST /v1/jobs/{id}/retry", &retry(unknown), Nothing, 404),
        row(S, "POST /v1/jobs/cancel", "", Json(json!({ "kind": "no.such" })), 200),
        row(S, "POST /v1/jobs/cancel", "", json_body("{"), 400),
        row(S, "POST /v1/jobs/cancel", "", too_large(), 413),
        row(S, "POST /v1/jobs/cancel", "", text("{}"), 415),
        row(S, "POST /v1/jobs/cancel", "", Json(json!({ "status": "done" })), 422),
        row(S, "POST /v1/jobs/retry", "", Json(json!({ "kind": "no.such" })), 200),
        row(S, "POST /v1/jobs/retry", "", json_body("{"), 400),
        row(S, "POST /v1/jobs/retry", "", too_large(), 413),
        row(S, "POST /v1/jobs/retry", "", text("{}"), 415),
        row(S, "POST /v1/jobs/retry", "", Json(json!({ "status": "running" })), 422),
        row(S, "GET /api/get_results/{id}", &format!("/api/get_results/{}", f.compat_done), Nothing, 200),
        row(S, "GET /api/get_results/{id}", &format!("/api/get_results/{unknown}"), Nothing, 404),
        row(S, "GET /api/jobs", "", Nothing, 200),
        row(S, "GET /api/num_jobs", "", Nothing, 200),
        row(S, "POST /api/noop", "", Json(json!({})), 200),
        row(S, "POST /api/noop", "", json_body("[1]"), 400),
        row(S, "POST /api/noop", "", too_large(), 413),
        row(S, "POST /api/noop", "", text("{}"), 415),
        row(S, "GET /api/noop_result/{id}", "/api/noop_result/job_id_0", Nothing, 200),
        row(S, "POST /v1/events", "", event(), 200),
        row(S, "POST /v1/events", "", json_body("{"), 400),
        row(S, "POST /v1/events", "", too_large(), 413),
        row(S, "POST /v1/events", "", text("{}"), 415),
        row(S, "POST /v1/events", "", Encoded("br"), 415),
        row(S, "POST /v1/events", "", Json(json!({ "conn": 1 })), 422),
        row(S, "POST /write", "?precision=ms", text(&format!("probe v=1 {now}")), 204),
        // Nanoseconds by default: a point of 1970, older than --retention, is refused.
        row(S, "POST /write", "", text("old v=1 1"), 200),
        row(S, "POST /write", "", text("not line protocol"), 400),
        row(S, "POST /write", "?precision=weeks", text("probe v=1 1"), 400),
        row(S, "POST /write", "", text(&"probe v=1 1\n".repeat(LIMIT)), 413),
        row(S, "POST /write", "", Encoded("br"), 415),
        row(S, "POST /v1/series/{name}/points", "/v1/series/probe/points", points(), 200),
        row(S, "POST /v1/series/{name}/points", "/v1/series/probe/points", json_body("["), 400),
        row(S, "POST /v1/series/{name}/points", "/v1/series/probe/points", too_large(), 413),
        row(S, "POST /v1/series/{name}/points", "/v1/series/probe/points", text("[]"), 415),
        row(S, "POST /v1/series/{name}/points", "/v1/series/probe/points", Encoded("br"), 415),
        row(S, "POST /v1/series/{name}/points", "/v1/series/probe/points", Json(json!({})), 422),
        row(S, "POST /v1/series/rollups/refresh", "", Nothing, 200),
        row(S, "GET /getSum", "", Nothing, 200),
        row(S, "GET /v1/series", "", Nothing, 200),
        row(S, "GET /v1/series", "?limit=0", Nothing, 400),
        row(S, "GET /v1/series/{name}", "/v1/series/probe", Nothing, 200),
        row(S, "GET /v1/series/{name}", "/v1/series/probe?agg=sum", Nothing, 400),
        row(S, "GET /v1/series/{name}", "/v1/series/nothing", Nothing, 404),
        row(S, "GET /v1/series/{name}/rollups", "/v1/series/probe/rollups", Nothing, 200),
        row(S, "GET /v1/series/{name}/rollups", "/v1/series/nothing/rollups", Nothing, 404),
        row(S, "GET /v1/sources", "", Nothing, 200),
        row(S, "GET /v1/datasets", "", Nothing, 200),
        row(S, "PUT /v1/datasets/{name}", "/v1/datasets/probe.csv", csv("a\n1\n"), 201),
        row(S, "PUT /v1/datasets/{name}", "/v1/datasets/probe.csv", csv("a\n2\n"), 200),
        row(S, "PUT /v1/datasets/{name}", "/v1/datasets/.hidden", csv("a\n"), 400),
        row(S, "PUT /v1/datasets/{name}", "/v1/datasets/big.csv", csv(&"1\n".repeat(LIMIT)), 413),
        row(S, "GET /csv_name={file}", "/csv_name=probe.csv", Nothing, 200),
        row(S, "GET /csv_name={file}", "/csv_name=.hidden", Nothing, 400),
        row(S, "GET /csv_name={file}", "/nothing", Nothing, 404),
        row(S, "DELETE /v1/datasets/{name}", "/v1/datasets/probe.csv", Nothing, 204),
        row(S, "DELETE /v1/datasets/{name}", "/v1/datasets/probe.csv", Nothing, 404),
        row(S, "DELETE /v1/datasets/{name}", "/v1/datasets/.hidden", Nothing, 400),
        row(S, "GET /storage/get_counter", "", Nothing, 200),
        row(S, "GET /storage/get_json/{id}", &format!("/storage/get_json/{done}"), Nothing, 200),
        row(S, "GET /storage/get_json/{id}", &format!("/storage/get_json/{unknown}"), Nothing, 404),
        // The drain: intake refused, reads still answered; cancelling the sleeper ends it.
        row(D, "GET /api/graceful_shutdown", "", Nothing, 200),
        row(D, "GET /readyz", "", Nothing, 503),
        row(D, "POST /v1/jobs", "", echo(), 503),
        row(D, "POST /v1/jobs/{id}/retry", &retry(failed), Nothing, 503),
        row(D, "POST /v1/events", "", event(), 503),
        row(D, "GET /v1/stream", "", Nothing, 503),
        row(D, "GET /csv_name={file}", "/csv_name=probe.csv", Nothing, 503),
        row(D, "POST /api/global_mean", "", Json(json!({})), 503),
        row(D, "DELETE /v1/jobs/{id}", &job(sleeper), Nothing, 200),
    ];
    // The nine statistics routes, from one template like their description.
    for q in tally::stats::Query::ALL {
        let op = format!("POST /api/{}", tally::api::compat::route(q));
        for (send, status) in [(Json(json!({})), 200), (json_body("[1]"), 400), (too_large(), 413), (text("{}"), 415)] {
            t.push(row(S, &op, "", send, status));
        }
    }
    t
}

/// The probes every route shares, from the first success row of each operation.
fn shared(table: &[Probe], doc: &Value) -> Vec<Probe> {
    let mut out = Vec::new();
    let mut paths = BTreeSet::new();
    let successes = table.iter().filter(|p| p.status < 300);
    let mut seen = BTreeSet::new();
    for p in successes {
        if !seen.insert((p.method.clone(), p.route.clone())) {
            continue;
        }
        let with = |send: Input, status: u16| Probe {
            phase: Phase::Serving,
            send,
            status,
            ..p.clone()
        };
        out.push(with(Input::ForeignHost, 421));
        if operation(doc, p).get("security").is_some() {
            out.push(with(Input::NoToken, 401));
            out.push(with(Input::WrongToken, 401));
        }
        let safe = matches!(p.method, Method::GET | Method::HEAD);
        if !safe || operation(doc, p).get("security").is_some() {
            out.push(with(Input::OtherSite, 403));
        }
        if paths.insert(p.route.clone()) {
            // The catch-all that serves `csv_name=` answers other methods 404.
            let status = if p.route == "/csv_name={file}" {
                404
            } else {
                405
            };
            out.push(Probe {
                method: UNSERVED.parse().unwrap(),
                ..with(Input::Nothing, status)
            });
        }
    }
    out
}

fn operation<'a>(doc: &'a Value, p: &Probe) -> &'a Value {
    &doc["paths"][&p.route][p.method.as_str().to_ascii_lowercase()]
}

/// The operations of the description, as `(METHOD, path)`.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let methods = ["get", "put", "post", "delete", "patch", "head", "options"];
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in item.as_object().unwrap().keys() {
            if methods.contains(&m.as_str()) {
                out.insert((m.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    out
}

async fn send(app: &TestApp, p: &Probe) -> reqwest::Response {
    let mut req = app.client.request(p.method.clone(), app.url(&p.path));
    let token = match &p.send {
        Input::NoToken => None,
        Input::WrongToken => Some("not-the-token"),
        _ => Some(TOKEN),
    };
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    req = match &p.send {
        Input::Json(v) => req.json(v),
        Input::Body(ct, body) => req.header(header::CONTENT_TYPE, *ct).body(body.clone()),
        Input::Encoded(enc) => req
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_ENCODING, *enc)
            .body(gzip(b"{}")),
        Input::Header(name, value) => req.header(*name, value),
        Input::ForeignHost => req.header(header::HOST, "rebind.example"),
        Input::OtherSite => req.header(header::ORIGIN, "https://other.example"),
        Input::Nothing | Input::NoToken | Input::WrongToken => req,
    };
    req.send().await.expect("the service answers")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// What is wrong between this answer and the description; nothing when they agree.
fn disagreement(doc: &Value, p: &Probe, status: u16, headers: &HeaderMap) -> Option<String> {
    let what = format!("{} {} ({})", p.method, p.path, p.send.label());
    if status != p.status {
        return Some(format!(
            "{what}: answered {status}, the table expects {}",
            p.status
        ));
    }
    // An unserved method is described on every operation of the path.
    let ops: Vec<(&str, &Value)> =
        if operations(doc).contains(&(p.method.to_string(), p.route.clone())) {
            vec![(p.method.as_str(), operation(doc, p))]
        } else {
            doc["paths"][&p.route]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(m, op)| (m.as_str(), op))
                .collect()
        };
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let mut problems = Vec::new();
    for (m, op) in ops {
        let described = &op["responses"][status.to_string()];
        let on = format!("{} {}", m.to_ascii_uppercase(), p.route);
        if !described.is_object() {
            problems.push(format!("{what}: {status} is not described on {on}"));
            continue;
        }
        let content = described.get("content").and_then(Value::as_object);
        match (status, &ct) {
            // No body: described without content (a 304 keeps the representation's type).
            (204 | 304, _) => {
                if content.is_some_and(|c| !c.is_empty()) {
                    problems.push(format!("{what}: {status} on {on} is described with a body"));
                }
            }
            (_, None) => {
                if content.is_some_and(|c| !c.is_empty()) {
                    problems.push(format!("{what}: {status} on {on} answered no Content-Type"));
                }
            }
            (_, Some(ct)) => {
                if !content.is_some_and(|c| c.contains_key(ct)) {
                    let listed: Vec<&String> = content.into_iter().flat_map(|c| c.keys()).collect();
                    problems.push(format!(
                        "{what}: {status} on {on} answered {ct}, described as {listed:?}"
                    ));
                }
            }
        }
        if status == 405 && described.pointer("/headers/Allow").is_none() {
            problems.push(format!(
                "{what}: 405 on {on} does not describe its Allow header"
            ));
        }
    }
    if status == 405 {
        // RFC 9110: a 405 names the methods the path serves.
        let allow = headers
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let allowed: BTreeSet<String> = allow.split(',').map(|m| m.trim().to_string()).collect();
        for (m, path) in operations(doc) {
            if path == p.route && !allowed.contains(&m) {
                problems.push(format!("{what}: Allow {allow:?} does not name {m}"));
            }
        }
    }
    (!problems.is_empty()).then(|| problems.join("\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_and_content_type_the_service_answers_is_described_on_its_route() {
    let app = TestApp::spawn_with(|c| {
        c.auth_token = Some(Secret(TOKEN.to_string()));
        c.max_body_bytes = LIMIT;
        c.max_write_bytes = LIMIT;
        c.max_upload_bytes = LIMIT as u64;
        // The drain lasts until the sleeper is cancelled, the table's last row.
        c.shutdown_timeout = 600;
    })
    .await;
    let (_, doc) = app.get("/openapi.json").await;
    let post = |path: &str, body: Value| {
        reply(
            app.client
                .post(app.url(path))
                .bearer_auth(TOKEN)
                .json(&body),
        )
    };
    let submit = async |kind: &str, params: Value| {
        accepted_id(post("/v1/jobs", json!({ "kind": kind, "params": params })).await)
    };
    let done = submit("test.echo", json!({})).await;
    let failed = submit("test.panic", json!({})).await;
    let sleeper = submit("test.sleep", json!({ "ms": 600_000 })).await;
    app.wait_job(&done).await;
    app.wait_job(&failed).await;
    let (_, compat) = post("/api/global_mean", json!({})).await;
    let compat_done = compat["job_id"].as_str().unwrap().to_string();
    let asset = row(
        Phase::Serving,
        "GET /ui/{path}",
        "/ui/js/app.js",
        Input::Nothing,
        200,
    );
    let etag = send(&app, &asset).await.headers()[header::ETAG]
        .to_str()
        .unwrap()
        .to_string();
    let fixture = Fixture {
        done,
        failed,
        sleeper,
        compat_done,
        etag,
    };

    let mut probes = table(&fixture);
    probes.extend(shared(&probes, &doc));
    // Stable: the drain's rows last, in table order.
    probes.sort_by_key(|p| p.phase == Phase::Draining);

    // The table covers the description: every operation has a success row, and names
    // no operation the description lacks.
    let documented = operations(&doc);
    let mut succeeds: BTreeSet<(String, String)> = BTreeSet::new();
    let mut failures = Vec::new();
    for p in &probes {
        let op = (p.method.to_string(), p.route.clone());
        if p.status < 300 {
            succeeds.insert(op.clone());
        }
        if p.method.as_str() != UNSERVED && !documented.contains(&op) {
            failures.push(format!(
                "the table probes {op:?}, which /openapi.json lacks"
            ));
        }
    }
    for op in documented.difference(&succeeds) {
        failures.push(format!("no probe answers {op:?} with success"));
    }

    let mut statuses: BTreeSet<u16> = BTreeSet::new();
    for p in &probes {
        let res = send(&app, p).await;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        statuses.insert(status);
        if let Some(d) = disagreement(&doc, p, status, &headers) {
            let streams = headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            let body = if streams {
                String::new()
            } else {
                res.text().await.unwrap_or_default()
            };
            failures.push(format!("{d}\n    body: {:.300}", body));
        }
    }
    assert!(
        failures.is_empty(),
        "{} disagreements between the service and /openapi.json:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The table provoked every answer the task names.
    for s in [
        200, 201, 202, 204, 304, 400, 401, 403, 404, 405, 409, 413, 415, 421, 422, 503,
    ] {
        assert!(statuses.contains(&s), "no probe answered {s}");
    }
    app.stop().await;
}
